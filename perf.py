"""How fast the training step runs on this machine, and the settings that make it fast there:
the compute dtype that suits the CPU, malloc kept for XLA:CPU, the model's FLOPs and the device's
peak, the speed each log line reports, and `train.py --bench` (and its profiles' names checked).

Needs: nothing from the other files.
"""
import ctypes
import os
import platform
import time
from pathlib import Path

import jax
import numpy as np

# Dense peak TFLOP/s per device from the vendors' data sheets, by jax's device_kind (the first
# name it contains). CPUs have none: --bench measures a matmul instead.
PEAK_TFLOPS = {'H100 PCIe': dict(bfloat16=756, float32=51), 'H100': dict(bfloat16=989, float32=67),
               'H200': dict(bfloat16=989, float32=67), 'A100': dict(bfloat16=312, float32=19.5),
               'L4': dict(bfloat16=121, float32=30.3), 'TPU v4': dict(bfloat16=275),
               'TPU v5 lite': dict(bfloat16=197), 'TPU v5': dict(bfloat16=459),
               'TPU v6 lite': dict(bfloat16=918)}

# Where a CPU multiplies bf16 natively: x86's AVX-512 BF16 and AMX, arm64's BFDOT/BFMMLA (Linux's
# names, as /proc/cpuinfo lists them). Elsewhere XLA:CPU widens every bf16 operand to float32
# first, and bf16 compute is slower than float32 (README: Performance).
NATIVE_BF16 = {'avx512_bf16', 'amx_bf16', 'bf16'}
HEAP_BOUND = 0  # bytes of resident memory: keep_freed_memory sets it, trim_heap reads it


def proc_values(path, *fields):  # these fields' values in Linux's /proc/cpuinfo or meminfo
    try:
        lines = open(path).read().splitlines()
    except OSError:
        return []
    return [line.split(':', 1)[1].strip() for line in lines if line.startswith(fields)]


def proc_bytes(path, field):  # a field of /proc/meminfo or /proc/self/status (kB there), in bytes
    return int(proc_values(path, field)[0].split()[0]) * 1024


def isa_cap():  # XLA_FLAGS' --xla_cpu_max_isa (AVX2, ...): what XLA:CPU may emit at most
    caps = [f.split('=')[1] for f in os.environ.get('XLA_FLAGS', '').split() if 'max_isa=' in f]
    return caps[-1] if caps else 'none'


def cpu_features(path='/proc/cpuinfo', capped=True):
    """The CPU's flags ('flags' on x86, 'Features' on arm64), less AVX-512's and AMX's where
    XLA_FLAGS caps XLA:CPU at AVX2 or below (capped): then it is treated as that kind of CPU."""
    features = {flag for value in proc_values(path, 'flags', 'Features') for flag in value.split()}
    if capped and isa_cap() in ('SSE4_2', 'AVX', 'AVX2'):
        features = {flag for flag in features if not flag.startswith(('avx512', 'amx'))}
    return features


def default_dtype(backend, features):
    """The compute dtype when --dtype is not given -> (dtype, the reason, for the log). GPUs and
    TPUs: bf16 (with float32 master weights). CPUs: bf16 only where they multiply it natively."""
    if backend != 'cpu':
        return 'bfloat16', f"the {backend}'s native bf16"
    native = sorted(NATIVE_BF16 & features)
    if native:
        return 'bfloat16', f"this CPU has a native bf16 dot product ({', '.join(native)})"
    return 'float32', 'this CPU has no native bf16'


def describe_cpu():
    """One line: the CPU, its widest vector instructions, native bf16, XLA_FLAGS' cap on XLA:CPU."""
    features = cpu_features(capped=False)
    name = (proc_values('/proc/cpuinfo', 'model name') or [platform.machine()])[0]
    family_model = proc_values('/proc/cpuinfo', 'cpu family', 'model\t')[:2]  # Zen 4: 25, 17
    if len(family_model) == 2:
        name += ' (family {}, model {})'.format(*family_model)
    isa = next((isa for flag, isa in (('avx512f', 'AVX-512'), ('avx2', 'AVX2'), ('asimd', 'NEON'))
                if flag in features), 'no AVX2')
    return (f"cpu: {name}, {os.cpu_count()} cores, {isa}; native bf16: "
            f"{', '.join(sorted(NATIVE_BF16 & features)) or 'none'}; XLA:CPU cap: "
            f"{isa_cap()}")


def keep_freed_memory(keep=True, step=None):
    """XLA:CPU allocates each step's temporaries afresh (5 GB for the baby GPT), and glibc hands
    big freed blocks back to the kernel: a page fault per 4 KB touched, a third of the step on 2
    cores (README: Performance). Asked to keep them (M_ARENA_MAX=1, M_MMAP_MAX=0, M_TRIM_THRESHOLD
    never), the next step reuses them; call it before jax starts its threads. But a step's
    temporaries are at times allocated before the last step's are freed, and the kept heap grows
    by a step's memory each time: 5x the step's in 40 steps of the baby GPT. Given the compiled
    `step`, glibc's defaults come back where 4x its memory would not fit in available memory, and
    HEAP_BOUND is set: the resident memory past which `trim_heap` hands freed memory back, what
    the process holds now and 2.5x the step's. Other C libraries (macOS, musl) are left as they
    are. -> whether freed memory is kept."""
    global HEAP_BOUND
    HEAP_BOUND = 0
    try:
        libc = ctypes.CDLL('libc.so.6')  # glibc's, or an OSError
        if step is not None and jax.default_backend() == 'cpu':
            m = step.memory_analysis()
            step_memory = m.temp_size_in_bytes + m.argument_size_in_bytes
            libc.malloc_trim(0)  # what an earlier step kept counts as available, as it is
            keep = 4 * step_memory < proc_bytes('/proc/meminfo', 'MemAvailable')
            HEAP_BOUND = int(keep and proc_bytes('/proc/self/status', 'VmRSS') + 2.5 * step_memory)
            if not keep:
                print("malloc as glibc has it: 4x this step's memory is more than is available")
        for option, kept, glibc_default in ((-8, 1, 0), (-4, 0, 65536), (-1, -1, 128 << 10)):
            libc.mallopt(option, kept if keep else glibc_default)
    except (OSError, AttributeError, IndexError):
        return False
    return keep


def trim_heap():
    """Past HEAP_BOUND of resident memory, hand the heap's freed memory back to the kernel (glibc's
    malloc_trim): the next step faults its temporaries in again. Called after each step."""
    if HEAP_BOUND and proc_bytes('/proc/self/status', 'VmRSS') > HEAP_BOUND:
        ctypes.CDLL('libc.so.6').malloc_trim(0)


def check_profiles(profile, memory_profile):
    """train.py's --profile (a folder the trace makes) and --memory_profile (a new file): written
    after the steps, so a name that cannot be fails now, before any work."""
    there = Path(os.path.abspath(profile)) if profile else None
    while there and not there.exists():  # the trace makes the folders below the nearest that is
        there = there.parent
    if there and not (there.is_dir() and os.access(there, os.W_OK)):
        why = 'Not a directory' if not there.is_dir() else 'Permission denied'
        raise ValueError(f"--profile={profile}: the trace cannot be made there ({why}): choose "
                         "another folder")
    try:  # made and removed: it overwrites nothing, and leaves nothing
        if memory_profile:
            open(memory_profile, 'x').close()
            os.unlink(memory_profile)
    except OSError:
        raise ValueError(f"--memory_profile={memory_profile}: name a new file in a folder that "
                         "exists (it overwrites nothing)") from None


def step_flops(cfg, batch_size, n_params):
    """Model FLOPs of a training step of the GPTConfig `cfg` (PaLM's appendix B, as nanoGPT): per
    token, 6 per multiplying parameter (forward 2, backward 4; wpe only adds) and 12 L C T for
    attention's scores and weighted sum, in full though causal attention skips half (a sliding
    window: W keys a query, not T)."""
    multiplying = n_params - (cfg.block_size * cfg.n_embd if cfg.pos == 'learned' else 0)
    keys = min(cfg.window or cfg.block_size, cfg.block_size)
    per_token = 6 * multiplying + 12 * cfg.n_layer * cfg.n_embd * keys
    return per_token * batch_size * cfg.block_size


def device_memory(stat):  # 'bytes_in_use' or 'peak_bytes_in_use': GPU and TPU only, else None
    return (jax.local_devices()[0].memory_stats() or {}).get(stat)


def peak_tflops(dtype):  # per device, from PEAK_TFLOPS; None where no data sheet applies
    kind = jax.devices()[0].device_kind
    return next((p for name, p in PEAK_TFLOPS.items() if name in kind), {}).get(dtype)


def make_speed(tokens_per_step, flops_per_step, dtype, n_devices):
    """-> speed(seconds per step): the figures each log line and the benchmark print."""
    peak = peak_tflops(dtype)

    def speed(seconds):
        flops = flops_per_step / seconds
        mfu = f" ({flops / (peak * 1e12 * n_devices):.1%} MFU)" if peak else ''
        in_use = device_memory('bytes_in_use')
        memory = f" | {in_use / 2**30:.1f} GiB in use" if in_use else ''
        return (f"{seconds * 1000:7.1f} ms/step | {tokens_per_step / seconds:8.0f} tok/s | "
                f"{flops / 1e12:.3g} TFLOP/s{mfu}{memory}")
    return speed


def matmul_flops(dtype, n=2048):
    """FLOP/s of one large matmul of the model's kind (float32 accumulation), best of 5: what this
    CPU can do at most, to measure a step against."""
    a = jax.numpy.ones((n, n), dtype)
    matmul = jax.jit(lambda a: jax.numpy.dot(a, a, preferred_element_type=np.float32))
    matmul(a).block_until_ready()
    best = float('inf')
    for _ in range(5):
        t0 = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def timed_steps(train_step, params, opt_state, next_batch, key, warmup, steps):
    """Run warmup + steps steps, each timed until it has finished. -> (the seconds of the last
    `steps`, and the params, optimizer state and cursor after them: the step donates its own)."""
    cursor, times = 0, []
    for i in range(warmup + steps):
        batch, cursor = next_batch(cursor)
        t0 = time.perf_counter()
        params, opt_state, loss = train_step(params, opt_state, batch, jax.random.fold_in(key, i))
        trim_heap()
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t0)
    return np.array(times[warmup:]), params, opt_state, cursor


def benchmark(train_step, params, opt_state, next_batch, key, speed, flops_per_step, dtype,
              profile='', warmup=3, steps=10):
    """train.py --bench: time `steps` steps after `warmup`; then the step's FLOP/s against the
    device's peak, its memory, and with `profile` (a folder) a jax.profiler trace of 3 more."""
    times, params, opt_state, _ = timed_steps(train_step, params, opt_state, next_batch, key,
                                              warmup, steps)
    if jax.default_backend() == 'cpu':
        print(describe_cpu())
    print(f"{steps} steps after {warmup} warm-up: median {speed(np.median(times))}; "
          f"spread {times.min() * 1000:.1f}-{times.max() * 1000:.1f} ms")
    peak = peak_tflops(dtype)
    if peak:
        print(f"MFU against {peak} TFLOP/s per device ({jax.devices()[0].device_kind}, {dtype})")
    else:  # no data sheet: measure what this device can do at most
        limit = matmul_flops(dtype)
        print(f"a {dtype} 2048x2048 matmul runs at {limit / 1e9:.0f} GFLOP/s here; the step's "
              f"model FLOPs ran at {flops_per_step / np.median(times) / limit:.0%} of that")
    peak_memory = device_memory('peak_bytes_in_use')
    if peak_memory:
        print(f"peak device memory {peak_memory / 2**30:.2f} GiB")
    else:  # no runtime statistics (CPU): what the compiled step reserves
        m = train_step.memory_analysis()
        temp, args = m.temp_size_in_bytes / 2**30, m.argument_size_in_bytes / 2**30
        print(f"device memory of the compiled step: {temp + args:.2f} GiB ({temp:.2f} GiB "
              "temporary, the rest params, optimizer state, batch)")
    if profile:
        os.makedirs(profile, exist_ok=True)  # train.py checked it can be
        jax.profiler.start_trace(profile)
        timed_steps(train_step, params, opt_state, next_batch, key, 0, 3)
        jax.profiler.stop_trace()
        print(f"wrote a profile of 3 steps to {profile}/")
