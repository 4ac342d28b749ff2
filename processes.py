"""More than one process: JAX's multi-process runtime, joined as each host starts, with a timer
that reports in one line, after --peer_timeout seconds, processes that do not all join (JAX's
own runtime would abort later, with a C++ stack trace). A peer that dies later is reported by
train.py's main, from the error the next collective with it raises at once.

Needs: nothing from the other files.
"""
import hashlib
import json
import os
import re
import socket
import sys
import threading

import jax
import numpy as np
from jax.experimental.multihost_utils import process_allgather


def start(distributed, peer_timeout, flags):
    """--distributed=auto or HOST:PORT,N,I: join the other processes, and check that each was
    given the same `flags` (a dict: what is trained); from here on the devices are every
    process's, and process 0 alone prints."""
    if distributed:
        address = re.fullmatch(r'(.+:([0-9]+)),([0-9]+),([0-9]+)', distributed)  # ASCII digits
        port, count, index = map(int, address.groups()[1:]) if address else (0, 0, 0)
        if distributed != 'auto' and not (address and 0 < port < 2**16 and index < count <= 2**16):
            raise ValueError(f"--distributed={distributed!r}: write auto, or HOST:PORT,N,I (a port "
                             "from 1 to 65535, this process's id I below the count N, N at most "
                             "65536)")
        where = (address.group(1), count, index) if address else ()
        if address and index == 0:  # it serves PORT: one in use would crash JAX's service
            check_free(port, distributed)
        timer = threading.Timer(peer_timeout, not_all_joined, args=(peer_timeout,))
        timer.daemon = True
        timer.start()
        later = peer_timeout + 60  # JAX's timeouts: after ours
        try:
            jax.distributed.initialize(*where, initialization_timeout=later,
                                       heartbeat_timeout_seconds=later)
        except ValueError as e:  # auto outside a cluster JAX knows
            raise ValueError(f"--distributed={distributed}: {e} (auto finds SLURM and TPU "
                             "pods): pass HOST:PORT,N,I") from None
        timer.cancel()
        digest = hashlib.sha256(json.dumps(flags, sort_keys=True).encode()).digest()
        digests = process_allgather(np.frombuffer(digest, np.uint8))  # (processes, 32)
        if (digests != digests[0]).any():  # a different seed would train unnoticed
            raise ValueError("the processes were given different flags: give every process the "
                             "same, but for --distributed's id")
        if jax.process_index():  # every process computes; process 0 alone prints and writes
            sys.stdout = open(os.devnull, 'w')


def check_free(port, distributed):  # bound and let go at once, as JAX's service will bind it
    ipv6 = socket.has_dualstack_ipv6()
    try:
        socket.create_server(('', port), family=socket.AF_INET6 if ipv6 else socket.AF_INET,
                             dualstack_ipv6=ipv6).close()
    except OSError as e:
        raise ValueError(f"--distributed={distributed}: process 0 cannot serve port {port} "
                         f"({os.strerror(e.errno)}): pass another port to every process") from None


def not_all_joined(timeout):  # the timer's end: one line, and this process exits
    print(f"train.py: the processes did not all join within --peer_timeout={timeout} s (one "
          "crashed, has other flags, or another HOST:PORT): see their logs, then start them again",
          file=sys.stderr, flush=True)
    os._exit(1)
