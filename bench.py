"""Benchmarks that back the README's figures; each subcommand prints the machine and one table.

    python bench.py attention   # temporary memory of the compiled step, xla vs blockwise attention
    python bench.py windows     # blockwise attention with a sliding window: its time and memory
    python bench.py sampling [OUT_DIR]  # a checkpoint: tokens/s with and without KV cache, int8
    python bench.py workarounds # each CPU workaround switched off in turn, both shapes and dtypes
    python bench.py nanogpt NANOGPT_DIR [PYTHON_WITH_TORCH [DTYPE]]  # nanoGPT's step against ours

Each times the training step as `train.py` builds it, on a 1x1 mesh. Memory is XLA's analysis of
the compiled step (a CPU has no runtime statistics), so `attention` can measure contexts this
machine could never run. Needs: train.py, optim.py, perf.py, sample.py, shard.py, model.py,
data.py, int8.py, flags.py. Writes nothing.
"""
import itertools
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

import data
import flags
import int8
import model
import optim
import perf
import sample
import shard
import train

MiB = 2**20


def train_dtype():  # what train.py computes with here when --dtype is not given
    return perf.default_dtype(jax.default_backend(), perf.cpu_features())[0]


def compiled(B, T, vocab=256, **flags):
    """The training step as train.py builds it, at batch B and context T, compiled; flags are
    train.Config's model fields (n_layer, attention, remat, ...). -> (the step, its arguments)."""
    cfg = train.Config(batch_size=B, block_size=T, **flags)  # optimizer, dtype: train.py's
    cfg.dtype = cfg.dtype or train_dtype()
    cfg.unroll = jax.default_backend() == 'cpu' if cfg.unroll is None else cfg.unroll  # train.py's
    step, args = compile_step(cfg, vocab)
    perf.keep_freed_memory(step=step)  # as train.py: kept where 4x the step's memory is available
    return step, args


def compile_step(cfg, vocab, n_devices=1):
    """train.py's step for the train.Config cfg on a data=n_devices mesh, compiled, not run ->
    (the step, its arguments: params, optimizer state, a (B, T+1) batch of zeros, a key)."""
    mesh = shard.make_mesh(f'data={n_devices},model=1', jax.devices()[:n_devices])
    jax.set_mesh(mesh)
    model_cfg = train.model_config(cfg, vocab, n_devices if cfg.fsdp else 1)
    graphdef, params, specs = shard.init_params(model_cfg, mesh, cfg.seed, train.params_dtype(cfg))
    tx = optim.make_optimizer(cfg, params)
    batch = jax.device_put(np.zeros((cfg.batch_size, cfg.block_size + 1), np.int32),
                           jax.NamedSharding(mesh, P('data')))  # split as train.py feeds it
    args = (params, jax.jit(tx.init)(params), batch, jax.random.key(0))
    step = shard.make_train_step(graphdef, specs, mesh, tx, cfg.dtype, cfg.grad_accum)
    return step.lower(*args).compile(), args


def timed_steps(exe, args, warmup, steps):
    """perf.timed_steps on one fixed batch. -> (ms of each of `steps` steps after `warmup`, the
    arguments to use next: the step donates the params and optimizer state it is given)."""
    params, opt_state, batch, key = args
    seconds, params, opt_state, _ = perf.timed_steps(
        exe, params, opt_state, lambda cursor: (batch, cursor), key, warmup, steps)
    return seconds * 1000, (params, opt_state, batch, key)


# --- the README's tables -------------------------------------------------------------------------
def attention():
    """Flash attention's point: the (B, H, T, T) scores, and their gradient, are never held. xla
    keeps each layer's float32 probabilities for the backward: 768 MiB a layer at T=4096."""
    print("Temporary memory of the compiled training step (compiled, not run): 12 layers, 12 "
          "heads, 768 wide, vocab 256, B=1, bf16 compute; layers scanned (the default off CPU) "
          "or unrolled (train.py's CPU default)\n")
    print("| T | remat | layers | xla temp MiB | blockwise temp MiB | xla / blockwise | "
          "args MiB (params, Adam, batch) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for remat, T, unroll in itertools.product(('none', 'block'), (4096, 8192), (False, True)):
        m = {impl: compiled(1, T, n_layer=12, n_head=12, n_embd=768, attention=impl,
                            remat=remat, unroll=unroll)[0].memory_analysis()
             for impl in ('xla', 'blockwise')}
        x, b = m['xla'].temp_size_in_bytes / MiB, m['blockwise'].temp_size_in_bytes / MiB
        args = m['xla'].argument_size_in_bytes / MiB
        print(f"| {T} | {remat} | {'unrolled' if unroll else 'scanned'} | {x:,.0f} | "
              f"{b:,.0f} | {x / b:.1f}x | {args:,.0f} |", flush=True)


def windows(steps=3):
    """A sliding window's point: with blockwise attention, the key blocks no query of a block can
    see are skipped. GPT-2 124M's shape at B=1: one layer's attention, forward and backward, timed
    (the median of `steps` after one) and its temporary memory; and the temporary memory of the
    whole compiled training step (12 layers, scanned, not run)."""
    dtype = train_dtype()
    print(f"GPT-2 124M shape (12 layers, 12 heads, 768 wide), B=1, blockwise, {dtype}\n")
    print("| T | window | one layer's attention, fwd+bwd ms | its temp MiB | full / this | "
          "training step temp MiB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for T in (4096, 8192):
        q, k, v = (jnp.ones((1, T, 12, 64), dtype) for _ in range(3))
        pos = jnp.arange(T)
        full_ms = None
        for window in (0, 1024, 256):
            def loss(q, k, v):
                out = model.attention(q, k, v, pos, pos, 'blockwise', window)
                return out.astype(jnp.float32).sum()
            exe = jax.jit(jax.grad(loss, (0, 1, 2))).lower(q, k, v).compile()
            times = []
            for _ in range(steps + 1):
                t0 = time.perf_counter()
                jax.block_until_ready(exe(q, k, v))
                times.append((time.perf_counter() - t0) * 1000)
            ms = float(np.median(times[1:]))
            full_ms = full_ms or ms
            step = compiled(1, T, n_layer=12, n_head=12, n_embd=768, attention='blockwise',
                            window=window, unroll=False)[0]
            print(f"| {T} | {window or 'full'} | {ms:,.0f} | "
                  f"{exe.memory_analysis().temp_size_in_bytes / MiB:,.0f} | {full_ms / ms:.1f}x | "
                  f"{step.memory_analysis().temp_size_in_bytes / MiB:,.0f} |", flush=True)


SHAPES = {'default (4/4/128, T=128, B=32)': (4, 4, 128, 128, 32),  # layers, heads, width, T, B
          'baby GPT (6/6/384, T=256, B=64)': (6, 6, 384, 256, 64)}


def workarounds(warmup=3, steps=4):
    """Each CPU workaround's worth (README: Performance): the step as it is, then with each one
    switched off in turn, model.py's function swapped for the plain one."""
    kept = {'matmul': model.matmul, 'add_bias': model.add_bias}

    def autodiff_matmul(spec, x, w, out=None):  # the same forward, autodiff's backward
        return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32).astype(out or x.dtype)

    rows = {'all on: the code as it is': {},
            'matmul backward left to autodiff': {'matmul': autodiff_matmul},
            'bias add in the compute dtype': {
                'add_bias': lambda y, b: y if b is None else y + b[...].astype(y.dtype)},
            'layers scanned': {'unroll': False},
            # last: glibc's defaults, set once jax's threads run, could give them arenas of their
            # own (each big block mmapped afresh), and a later row would be measured so
            'malloc as glibc leaves it': {'malloc': True}}
    columns = [(dtype, shape) for dtype in ('float32', 'bfloat16') for shape in SHAPES]
    print(f"ms/step, median of {steps} after {warmup} warm-up; float32 masters, xla attention, "
          "vocab 256\n")
    print("| switched off | " + " | ".join(f"{d}, {s.split(' (')[0]}" for d, s in columns) + " |")
    print("| --- |" + " --- |" * len(columns))
    for name, off in rows.items():
        for function, default in kept.items():  # the last row puts back the code as it is
            setattr(model, function, off.get(function, default))
        times = []
        for dtype, shape in columns:
            L, H, C, T, B = SHAPES[shape]
            exe, args = compiled(B, T, n_layer=L, n_head=H, n_embd=C, attention='xla',
                                 unroll=off.get('unroll', True), dtype=dtype)
            if 'malloc' in off:
                perf.keep_freed_memory(False)
            times.append(f"{np.median(timed_steps(exe, args, warmup, steps)[0]):,.0f}")
            del args, exe
        print(f"| {name} | " + " | ".join(times) + " |", flush=True)


NANOGPT_STEP = """
import sys, time, torch
print('torch', torch.__version__, 'CPU capability', torch.backends.cpu.get_cpu_capability())
sys.path.insert(0, sys.argv[1])
from model import GPT, GPTConfig  # nanoGPT's own model.py, from the clone given
L, H, C, T, B, n = map(int, sys.argv[2:8])
torch.manual_seed(0)
m = GPT(GPTConfig(block_size=T, vocab_size=256, n_layer=L, n_head=H, n_embd=C, dropout=0.0,
                  bias=True))
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


def nanogpt(path, python=sys.executable, dtype='', rounds=3, warmup=3, steps=5):
    """nanoGPT's PyTorch training step (model.py in the clone at `path`, run by `python`, with
    torch: float32, dropout 0, its AdamW, clipping at 1.0) against ours at the same shapes (in
    `dtype`; '': train.py's default here), interleaved so both see the same machine: `rounds`
    times each, `steps` after `warmup`."""
    if not (Path(path) / 'model.py').is_file():  # before compiling ours
        raise ValueError(f"{path}/model.py not found: pass the folder of a nanoGPT clone")
    print(f"nanoGPT from {path} (run by {python}) against this project; ms/step per round\n")
    print("| shape | nanoGPT | this project | nanoGPT / this project |")
    print("| --- | --- | --- | --- |")
    for name, (L, H, C, T, B) in SHAPES.items():
        exe, args = compiled(B, T, n_layer=L, n_head=H, n_embd=C, attention='xla', unroll=True,
                             dtype=dtype)
        theirs, ours = [], []
        for _ in range(rounds):
            command = [python, '-c', NANOGPT_STEP, path, *map(str, (L, H, C, T, B, warmup + steps))]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            torch_line = out.splitlines()[0]
            theirs.append(np.median([float(t) for t in out.split()[-steps:]]) * 1000)  # timed
            times, args = timed_steps(exe, args, warmup, steps)
            ours.append(np.median(times))
        print(f"| {name} | {', '.join(f'{t:,.0f}' for t in theirs)} | "
              f"{', '.join(f'{t:,.0f}' for t in ours)} | "
              f"{np.median(theirs) / np.median(ours):.2f}x |", flush=True)
        del args, exe
    print(f"\n{torch_line}; this project computes in {dtype or train_dtype()}")


def sampling(out_dir='out', new_tokens=256, eval_batches=20):
    """The KV cache, and int8 weights (int8.quantize), on one checkpoint (train.py's default
    run): sample.py's sampler's tokens/s, the weights' MiB and the validation loss."""
    mesh = shard.make_mesh('data=1,model=1', jax.devices()[:1])
    jax.set_mesh(mesh)
    cfg, graphdef, params, specs, meta = sample.load_checkpoint(out_dir, mesh)
    run_cfg = meta['config']
    val_tokens = data.load_tokens(run_cfg['data'], run_cfg['tokenizer'], run_cfg['cache_dir'])[1]
    val = data.Batches(val_tokens, cfg.block_size, run_cfg['batch_size'], run_cfg['seed'], 'val')
    dtype = meta['params_dtype']  # as sample.py: the weights' own dtype
    loss = shard.make_loss(graphdef, specs, mesh, dtype)
    print(f"{out_dir}/ at step {meta['step']}: {cfg.n_layer} layers, {cfg.n_head} heads, "
          f"{cfg.n_embd} wide, context {cfg.block_size}, {dtype} compute; {new_tokens} new "
          f"tokens from a 1-token prompt, greedy, 1 sample; val loss over {eval_batches} batches "
          f"of {run_cfg['batch_size']}\n")
    print("| weights | MiB | KV cache | tokens/s | val loss |")
    print("| --- | --- | --- | --- | --- |")
    for weights in ('float32', 'int8'):
        if weights == 'int8':
            params = int8.quantize(params, mesh)
        generate = sample.make_sampler(graphdef, specs, mesh, cfg, dtype, temperature=0)
        batches = [val.get(i * run_cfg['batch_size'])[0] for i in range(eval_batches)]
        v = np.mean([loss(params, batch)[0] for batch in batches])
        for cached in (True, False) if weights == 'float32' else (True,):
            def all_tokens():
                tokens = generate(params, [0], new_tokens, jax.random.key(0), 1, cached)
                return jax.block_until_ready(list(tokens))
            all_tokens()  # compiles every shape
            t0 = time.perf_counter()
            all_tokens()
            seconds = time.perf_counter() - t0
            print(f"| {weights} | {shard.per_device_bytes(params) / MiB:.2f} | "
                  f"{'with' if cached else 'without'} | {new_tokens / seconds:,.0f} | {v:.4f} |",
                  flush=True)


COMMANDS = {'attention': attention, 'windows': windows, 'sampling': sampling,
            'workarounds': workarounds, 'nanogpt': nanogpt}
USAGE = (f"usage: python bench.py {{{'|'.join(COMMANDS)}}}  (sampling [OUT_DIR], nanogpt "
         "NANOGPT_DIR [TORCH_PYTHON [DTYPE]])")

if __name__ == '__main__':
    name, args = (sys.argv[1:2] or [''])[0], sys.argv[2:]
    fewest, most = {'sampling': (0, 1), 'nanogpt': (1, 3)}.get(name, (0, 0))  # arguments taken
    if name not in COMMANDS or not fewest <= len(args) <= most:
        sys.exit(USAGE)
    perf.keep_freed_memory()  # as train.py, so times compare with `train.py --bench`
    print(f"{perf.describe_cpu()}; jax {jax.__version__} on {jax.devices()[0].platform} "
          f"({jax.devices()[0].device_kind})")
    t0 = time.perf_counter()
    print(f"\n## {name}\n")
    if name == 'nanogpt' and args[2:] not in ([], ['bfloat16'], ['float32']):
        sys.exit(f"bench.py nanogpt: DTYPE is bfloat16 or float32, not {args[2]!r}")
    try:
        COMMANDS[name](*args)
    except (ValueError, OSError) as e:  # a path that is not one
        sys.exit(flags.one_line(f"bench.py {name}: {e}"))
    except subprocess.CalledProcessError as e:  # nanoGPT's side: its own last line says why
        sys.exit(f"bench.py {name}: nanoGPT's step failed ({e.stderr.strip().splitlines()[-1]}): "
                 "pass a nanoGPT clone and a Python with torch")
    print(f"\n({name}: {time.perf_counter() - t0:.0f} s wall)")
