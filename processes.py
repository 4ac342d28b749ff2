"""More than one process: JAX's multi-process runtime, joined as each host starts, and a watchdog
that reports in one line a process that does not join or stops answering, after --peer_timeout
seconds (JAX's own runtime would abort later, with a C++ stack trace). A peer that dies in the
middle of a collective is reported by train.py's main, from the error the collective raises.

Needs: nothing from the other files.
"""
import itertools
import os
import sys
import threading
import time

import jax


def start(distributed, peer_timeout):
    """--distributed=auto or HOST:PORT,N,I: join the other processes; from here on the devices
    are every process's, and process 0 alone prints."""
    if distributed:
        parts = [] if distributed == 'auto' else distributed.split(',')
        if len(parts) not in (0, 3) or not all(p.isdecimal() for p in parts[1:]):
            raise ValueError(f"--distributed={distributed!r}: write auto, or HOST:PORT,N,I")
        joined = threading.Event()
        threading.Thread(target=watch_peers, args=(peer_timeout, joined), daemon=True).start()
        later = peer_timeout + 60  # JAX's timeouts: after ours
        jax.distributed.initialize(*parts[:1], *(int(p) for p in parts[1:]),
                                   initialization_timeout=later, heartbeat_timeout_seconds=later)
        joined.set()
    if jax.process_index():  # every process computes; process 0 alone prints and writes
        sys.stdout = open(os.devnull, 'w')


def watch_peers(timeout, joined):
    """A thread: wait for every process to join; then each second write this process's heartbeat
    into JAX's key-value store, and read the others'. One that stops beating for `timeout`
    seconds is reported, and this process exits."""
    def stop(problem):
        print(f"train.py: {problem}: see its log; then start every process again, with --resume",
              file=sys.stderr, flush=True)
        os._exit(1)
    if not joined.wait(timeout):
        stop(f"the processes did not all join within --peer_timeout={timeout} s (one crashed, "
             "has other flags, or another HOST:PORT)")
    client = jax._src.distributed.global_state.client  # the runtime's store (no public name)
    me, peers = jax.process_index(), range(jax.process_count())
    last = {peer: (None, time.monotonic()) for peer in peers}
    for beat in itertools.count():
        client.key_value_set(f'jaxgpt/alive/{me}', str(beat), allow_overwrite=True)
        time.sleep(1)
        for peer in peers:
            try:
                seen = client.key_value_try_get(f'jaxgpt/alive/{peer}')
            except Exception:  # not written yet (the store says NOT_FOUND with an exception)
                seen = None
            if seen != last[peer][0]:
                last[peer] = (seen, time.monotonic())
            elif time.monotonic() - last[peer][1] > timeout:
                stop(f"process {peer} has not answered for --peer_timeout={timeout} s")
