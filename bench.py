"""Benchmarks that back the README's figures; each subcommand prints the machine and one table.

    python bench.py attention   # temporary memory of the compiled step, xla vs blockwise attention
    python bench.py remat       # GPT-2 124M: memory and ms/step with remat none, block, dots
    python bench.py compile     # compile time in depth: layers scanned vs unrolled
    python bench.py all         # the three, in that order
    python bench.py sampling [OUT_DIR]   # a checkpoint: tokens/s with and without the KV cache, int8
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python bench.py memory [MESH]  # FSDP's memory
    python bench.py changes     # what each CPU speed change bought, at the default and baby shapes
    python bench.py nanogpt NANOGPT_DIR [PYTHON_WITH_TORCH]   # nanoGPT's step against ours, interleaved

`train.py --bench` calls `training` below on the configured step. The tables' figures are of the
real training step, `shard.make_train_step` on a one-device 1x1 mesh as `train.py` builds it
(float32 master weights, bf16 compute, AdamW). Memory comes from XLA's analysis of the compiled
step (`memory_analysis()`: a CPU has no runtime memory statistics), so `attention` only compiles
and can measure contexts this machine could never run.

Needs: train.py (its malloc setting, Config, presets), shard.py, model.py, data.py. Writes nothing.
"""
import dataclasses
import glob
import math
import os
import platform
import subprocess
import sys
import time

import train  # first: it tunes malloc before jax loads, so times compare with `train.py --bench`

import jax
import jax.numpy as jnp
import numpy as np

import data
import shard
from flax import nnx
from model import GPT, GPTConfig

MiB = 2**20


def machine():
    try:  # platform.processor() is often empty on Linux; the kernel names the CPU
        cpu = next(l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name'))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    return (f"machine: {cpu}, {os.cpu_count()} CPUs; jax {jax.__version__} on "
            f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind})")


def build(B, T, vocab=256, **flags):
    """The training step as train.py builds it, at batch B and context T; flags are train.Config's
    model fields (n_layer, attention, remat, unroll, ...). -> (jitted step, its arguments)."""
    cfg = train.Config(batch_size=B, block_size=T, **flags)  # optimizer, dtype: train.py's defaults
    model_cfg = GPTConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(GPTConfig)
                             if f.name != 'vocab_size'}, vocab_size=vocab)
    mesh = shard.make_mesh('data=1,model=1', jax.devices()[:1])
    jax.set_mesh(mesh)
    graphdef, params, specs = shard.init_params(model_cfg, mesh, cfg.seed, shard.storage_dtype(vars(cfg)))
    tx, _ = shard.make_optimizer(cfg, params)
    batch = np.zeros((B, T + 1), np.int32)  # (B, T+1) token windows: inputs and shifted targets
    args = (params, jax.jit(tx.init)(params), batch, jax.random.key(0))
    return shard.make_train_step(graphdef, specs, mesh, tx, cfg), args


def timed_steps(exe, args, warmup, steps):
    """-> (ms of each of `steps` steps after `warmup`, the clock read once each has finished; the
    arguments after them: the step donates the params and optimizer state it is given)."""
    params, opt_state, batch, key = args
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        params, opt_state, loss = exe(params, opt_state, batch, jax.random.fold_in(key, i))
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t)
    return np.array(times[warmup:]) * 1000, (params, opt_state, batch, key)


def compiled(B, T, vocab=256, **flags):  # -> (compiled step, its arguments, lower+compile seconds)
    step, args = build(B, T, vocab, **flags)
    t0 = time.perf_counter()
    exe = step.lower(*args).compile()
    return exe, args, time.perf_counter() - t0


# --- train.py --bench: the configured step --------------------------------------------------

def matmul_flops(dtype, n=2048):
    """FLOP/s of one large matmul of the model's kind (bf16 in, float32 accumulation), best of 5:
    what this CPU can do at most, to measure a step against."""
    a = jax.numpy.ones((n, n), dtype)
    f = jax.jit(lambda a: jax.numpy.dot(a, a, preferred_element_type=np.float32))
    f(a).block_until_ready()
    best = min(timed(lambda: f(a).block_until_ready()) for _ in range(5))
    return 2 * n**3 / best


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def training(cfg, train_step, params, opt_state, next_batch, key, speed, flops_per_step, peak,
             warmup=3, steps=10):
    """train.py --bench: time `steps` steps after `warmup`, reading the clock only once each step
    has finished; then FLOP/s against the peak (or, on a CPU, a measured matmul), and memory."""
    cursor, times = 0, []
    for i in range(warmup + steps):
        batch, cursor = next_batch(cursor)
        t0 = time.perf_counter()
        params, opt_state, loss = train_step(params, opt_state, batch, jax.random.fold_in(key, i))
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t0)
    times = np.array(times[warmup:])
    print(f"{steps} steps after {warmup} warm-up: median {speed(np.median(times))}; "
          f"spread {times.min() * 1000:.1f}-{times.max() * 1000:.1f} ms")
    if not peak:  # a CPU: measure its limit instead of looking one up
        limit = matmul_flops(cfg.dtype)
        print(f"a {cfg.dtype} 2048x2048 matmul runs at {limit / 1e9:.0f} GFLOP/s here; the step's model "
              f"FLOPs ran at {flops_per_step / np.median(times) / limit:.0%} of that")
    else:
        print(f"MFU against {peak / 1e12:.0f} TFLOP/s per device ({jax.devices()[0].device_kind}, {cfg.dtype})")
    stats = jax.local_devices()[0].memory_stats() or {}
    if 'peak_bytes_in_use' in stats:
        print(f"peak device memory {stats['peak_bytes_in_use'] / 2**30:.2f} GiB")
    else:  # no runtime statistics (CPU): what the compiled step reserves
        m = train_step.memory_analysis()
        print(f"device memory of the compiled step: {(m.temp_size_in_bytes + m.argument_size_in_bytes) / 2**30:.2f} "
              f"GiB ({m.temp_size_in_bytes / 2**30:.2f} GiB temporary, the rest params, optimizer state, batch)")
    if cfg.profile:
        jax.profiler.start_trace(cfg.profile)
        for i in range(3):
            batch, cursor = next_batch(cursor)
            params, opt_state, loss = train_step(params, opt_state, batch, key)
        jax.block_until_ready(loss)
        jax.profiler.stop_trace()
        print(f"wrote a profile of 3 steps to {cfg.profile}/")


# --- the README's tables ------------------------------------------------------------------------

def attention():
    """Flash attention's point: the (B, H, T, T) scores, and their gradient, are never held. xla
    keeps each layer's float32 probabilities for the backward: 768 MiB a layer at T=4096, 3 GiB at 8192."""
    print("Temporary memory of the compiled training step (compiled, not run): 12 layers, 12 heads, "
          "768 wide, vocab 256, B=1, bf16 compute; layers scanned (the default off CPU) or unrolled "
          "(train.py's CPU default)\n")
    print("| T | remat | layers | xla temp MiB | blockwise temp MiB | xla / blockwise | args MiB (params, Adam, batch) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for remat in ('none', 'block'):
        for T in (4096, 8192):
            for unroll in (False, True):
                m = {a: compiled(1, T, n_layer=12, n_head=12, n_embd=768, attention=a, remat=remat,
                                 unroll=unroll)[0].memory_analysis() for a in ('xla', 'blockwise')}
                x, b = m['xla'].temp_size_in_bytes / MiB, m['blockwise'].temp_size_in_bytes / MiB
                print(f"| {T} | {remat} | {'unrolled' if unroll else 'scanned'} | {x:,.0f} | {b:,.0f} | "
                      f"{x / b:.1f}x | {m['xla'].argument_size_in_bytes / MiB:,.0f} |", flush=True)


def remat(B=4, T=256, warmup=2, steps=3):
    """Recomputation trades time for memory: 'block' keeps only each block's input, 'dots' also
    keeps the matmul outputs and recomputes the elementwise rest."""
    print(f"GPT-2 124M (12 layers, 12 heads, 768 wide, vocab 50257 padded to 50304), T={T}, B={B}, "
          f"xla attention, bf16 compute; layers scanned, or unrolled (train.py's CPU default); "
          f"ms/step: median of {steps} after {warmup} warm-up\n")
    print("| layers | remat | temp MiB | args MiB | temp + args MiB | compile s | ms/step (spread) | tok/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for unroll in (False, True):
        for r in ('none', 'block', 'dots'):
            exe, args, secs = compiled(B, T, 50257, n_layer=12, n_head=12, n_embd=768, attention='xla',
                                       remat=r, unroll=unroll)
            m, (times, args) = exe.memory_analysis(), timed_steps(exe, args, warmup, steps)
            temp, arg = m.temp_size_in_bytes / MiB, m.argument_size_in_bytes / MiB
            print(f"| {'unrolled' if unroll else 'scanned'} | {r} | {temp:,.0f} | {arg:,.0f} | {temp + arg:,.0f} | "
                  f"{secs:.1f} | {np.median(times):,.0f} ({times.min():,.0f}-{times.max():,.0f}) | "
                  f"{B * T / np.median(times) * 1000:,.0f} |", flush=True)
            del args, exe  # free this step's buffers before the next is built


def changes(warmup=3, steps=5):
    """What each CPU speed change bought (README: Performance): the step timed with the changes
    switched on one at a time, in the order they were made, from none of them (the code before,
    rebuilt here by swapping model.py's functions for the plain ones) to all (the code as it is)."""
    import ctypes
    import model
    libc, kept = ctypes.CDLL('libc.so.6'), (model.attention, model.matmul, model.add_bias, model.gelu)
    before = (lambda q, k, v, q_pos, k_pos, impl: jax.nn.dot_product_attention(q, k, v, is_causal=True),
              lambda spec, x, w, out=None: jnp.einsum(spec, x, w).astype(out or x.dtype),  # autodiff's backward
              lambda y, b: y if b is None else y + b.astype(y.dtype),  # in bf16
              lambda x: jax.nn.gelu(x, approximate=True))  # in bf16, every intermediate stored
    steps_on = ['none: the code before', '+ mallopt keeps freed memory', '+ attention written out',
                '+ bf16 matmuls with float32 accumulation both ways', '+ bias adds and GELU in float32',
                '+ layers unrolled: the code as it is']
    shapes = {'default (4/4/128, T=128, B=32)': dict(B=32, T=128, n_layer=4, n_head=4, n_embd=128),
              "baby GPT (6/6/384, T=256, B=64)": dict(B=64, T=256, n_layer=6, n_head=6, n_embd=384)}
    print(f"bf16 compute, float32 masters, xla attention, vocab 256; ms/step: median of {steps} after {warmup} warm-up\n")
    print("| change | " + " | ".join(shapes) + " |")
    print("| --- |" + " --- |" * len(shapes))
    for n, name in enumerate(steps_on):
        for option, on, off in ((-4, 0, 65536), (-1, -1, 128 * 1024)):  # M_MMAP_MAX, M_TRIM_THRESHOLD
            libc.mallopt(option, on if n >= 1 else off)
        model.attention, model.matmul, model.add_bias = (kept[i] if n >= s else before[i] for i, s in ((0, 2), (1, 3), (2, 4)))
        model.gelu = kept[3] if n >= 4 else before[3]
        row = []
        for shape in shapes.values():
            exe, args, _ = compiled(**shape, attention='xla', unroll=n >= 5)
            row.append(f"{np.median(timed_steps(exe, args, warmup, steps)[0]):,.0f}")
            del args, exe
        print(f"| {name} | " + " | ".join(row) + " |", flush=True)
    model.attention, model.matmul, model.add_bias, model.gelu = kept


NANOGPT_STEP = """
import sys, time, torch
sys.path.insert(0, sys.argv[1])
from model import GPT, GPTConfig  # nanoGPT's own model.py, from the clone given
L, H, C, T, B, n = map(int, sys.argv[2:8])
torch.manual_seed(0)
m = GPT(GPTConfig(block_size=T, vocab_size=256, n_layer=L, n_head=H, n_embd=C, dropout=0.0, bias=True))
opt = m.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')
x, y = torch.randint(256, (B, T)), torch.randint(256, (B, T))
for _ in range(n):
    t = time.perf_counter()
    _, loss = m(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    print(time.perf_counter() - t, flush=True)
"""


def nanogpt(path, python=sys.executable, rounds=3, warmup=3, steps=5):
    """nanoGPT's PyTorch training step (model.py from your clone at `path`, run by `python`, which
    needs torch: float32, dropout 0, its AdamW, clipping at 1.0) against this project's default
    step (bf16 compute, float32 masters, unrolled layers) at the same shapes, interleaved in one
    run so that both see the same machine: `rounds` times each, median of `steps` after `warmup`."""
    shapes = {'default (4/4/128, T=128, B=32)': (4, 4, 128, 128, 32), "baby GPT (6/6/384, T=256, B=64)": (6, 6, 384, 256, 64)}
    print(f"nanoGPT from {path} (run by {python}) against this project; ms/step per round\n")
    print("| shape | nanoGPT | this project | nanoGPT / this project |")
    print("| --- | --- | --- | --- |")
    for name, (L, H, C, T, B) in shapes.items():
        exe, args, _ = compiled(B, T, n_layer=L, n_head=H, n_embd=C, attention='xla', unroll=True)
        theirs, ours = [], []
        for _ in range(rounds):
            out = subprocess.run([python, '-c', NANOGPT_STEP, path, *map(str, (L, H, C, T, B, warmup + steps))],
                                 capture_output=True, text=True, check=True).stdout.splitlines()
            theirs.append(np.median([float(t) for t in out[-steps:]]) * 1000)  # its last lines: the timed steps
            times, args = timed_steps(exe, args, warmup, steps)
            ours.append(np.median(times))
        print(f"| {name} | {', '.join(f'{t:,.0f}' for t in theirs)} | {', '.join(f'{t:,.0f}' for t in ours)} | "
              f"{np.median(theirs) / np.median(ours):.2f}x |", flush=True)
        del args, exe


def compile_time(depths=(6, 12, 24)):
    """A scan over layers compiles one block whatever the depth; unrolled, XLA compiles each."""
    print("Lower + compile of the training step: 4 heads, 256 wide, vocab 256, T=128, B=8 "
          "(one small compile first, untimed, so no row pays for jax's start-up)\n")
    compiled(8, 128, n_layer=1, n_head=4, n_embd=256, attention='xla', unroll=False)
    print("| layers | scanned s | unrolled s | unrolled / scanned |")
    print("| --- | --- | --- | --- |")
    for L in depths:
        s, u = (compiled(8, 128, n_layer=L, n_head=4, n_embd=256, attention='xla', unroll=un)[2]
                for un in (False, True))
        print(f"| {L} | {s:.1f} | {u:.1f} | {u / s:.1f}x |", flush=True)


def sampling(out_dir='out', new_tokens=256, eval_batches=20):
    """The KV cache, and int8 weights, on one checkpoint (train.py's default run: python train.py):
    tokens/s of sample.py's sampler with and without the cache, and with int8 weights (one scale
    per output channel, shard.quantize), the bytes of the weights and the validation loss."""
    arrays, meta = shard.read(sorted(glob.glob(os.path.join(out_dir, 'ckpt_*.npz')))[-1])
    cfg, tc = GPTConfig(**{**meta['model'], 'fsdp': 1}), meta['config']
    mesh = shard.make_mesh('data=1,model=1', jax.devices()[:1])
    jax.set_mesh(mesh)
    graphdef, params, specs = shard.init_params(cfg, mesh, 0, shard.storage_dtype(tc))
    params = shard.place(arrays, {'params': params})['params']
    val = data.Batches(data.load_tokens(tc['data'], tc['tokenizer'], tc['cache_dir'])[1], cfg.block_size,
                       tc['batch_size'], tc['seed'], 'val')
    dtype = shard.storage_dtype(tc)  # as sample.py: the weights' own dtype
    loss = shard.make_loss(graphdef, specs, mesh, dtype)
    print(f"{out_dir}/ at step {meta['step']}: {cfg.n_layer} layers, {cfg.n_head} heads, {cfg.n_embd} wide, "
          f"context {cfg.block_size}, {dtype} compute; {new_tokens} new tokens from a 1-token prompt, "
          f"greedy, 1 sample; val loss over {eval_batches} batches of {tc['batch_size']}\n")
    print("| weights | MiB | KV cache | tokens/s | val loss |")
    print("| --- | --- | --- | --- | --- |")
    for weights in ('float32', 'int8'):
        if weights == 'int8':
            params = shard.quantize(params, mesh)
        generate = shard.make_sampler(graphdef, specs, mesh, cfg, dtype, temperature=0)
        v = np.mean([loss(params, val.get(i * tc['batch_size'])[0]) for i in range(eval_batches)])
        for cached in (True, False) if weights == 'float32' else (True,):
            list(generate(params, [0], new_tokens, jax.random.key(0), 1, cached))  # compiles every shape
            t = timed(lambda: jax.block_until_ready(list(generate(params, [0], new_tokens, jax.random.key(0), 1, cached))))
            print(f"| {weights} | {shard.per_device_bytes(params) / MiB:.2f} | {'with' if cached else 'without'} | "
                  f"{new_tokens / t:,.0f} | {v:.4f} |", flush=True)


def memory(spec='data=8,model=1'):
    """Where FSDP puts the weights: bytes per device of the float32 params and Adam's state for GPT-2
    124M and 350M, with and without --fsdp, from the arrays' shardings (jax.eval_shape: nothing is
    allocated). XLA_FLAGS=--xla_force_host_platform_device_count=8 python bench.py memory"""
    mesh = shard.make_mesh(spec)
    jax.set_mesh(mesh)
    per_device = lambda tree: sum(math.prod(x.sharding.shard_shape(x.shape) if x.sharding else x.shape) * x.dtype.itemsize
                                  for x in jax.tree.leaves(tree)) / MiB  # device 0's shards
    print(f"mesh {dict(mesh.shape)}; MiB per device, float32 params and Adam's two moments\n")
    print("| model | --fsdp | params MiB | optimizer state MiB | both |")
    print("| --- | --- | --- | --- | --- |")
    for name in ('gpt2', 'gpt2-medium'):
        cfg = train.Config(**train.PRESETS[name])
        for fsdp in (1, mesh.shape['data']):
            model_cfg = GPTConfig(cfg.block_size, 50257, cfg.n_layer, cfg.n_head, cfg.n_embd, fsdp=fsdp)
            specs = nnx.get_partition_spec(nnx.split(nnx.eval_shape(lambda: GPT(model_cfg, nnx.Rngs(0))))[1])
            params = jax.eval_shape(lambda: jax.sharding.reshard(nnx.state(GPT(model_cfg, nnx.Rngs(0))), specs))
            p, o = per_device(params), per_device(jax.eval_shape(shard.make_optimizer(cfg, params)[0].init, params))
            print(f"| {name} | {'on' if fsdp > 1 else 'off'} | {p:,.1f} | {o:,.1f} | {p + o:,.1f} |", flush=True)


COMMANDS = {'attention': attention, 'remat': remat, 'compile': compile_time, 'sampling': sampling,
            'memory': memory, 'changes': changes,
            'nanogpt': nanogpt}

if __name__ == '__main__':
    name, args = (sys.argv[1:2] or ['all'])[0], sys.argv[2:]  # sampling takes an out_dir (default: out)
    if name not in (*COMMANDS, 'all') or (args and name not in ('sampling', 'memory', 'nanogpt')):
        sys.exit(f"usage: python bench.py {{{'|'.join(COMMANDS)}|all}}  (sampling [OUT_DIR], memory [MESH], nanogpt NANOGPT_DIR [TORCH_PYTHON]; all: the first three)")
    print(machine())
    for name in ('attention', 'remat', 'compile') if name == 'all' else [name]:
        t0 = time.perf_counter()
        print(f"\n## {name}\n")
        COMMANDS[name](*args)
        print(f"\n({name}: {time.perf_counter() - t0:.0f} s wall)")
