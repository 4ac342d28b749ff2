"""Train a GPT. `python train.py` trains a small one on the standard library's source, on CPU, in
minutes; `--preset=shakespeare` is nanoGPT's baby GPT; `--preset=gpt2` is GPT-2 124M.

    python train.py --help                       # every flag, with its default
    python train.py --preset=shakespeare --mesh=data=4,model=2 --max_iters=2000
    python train.py --bench                      # time the step: ms, tokens/s, MFU, memory

A script, top to bottom: the config and its flags, the data, the mesh and the sharded params,
then the loop (log, evaluate, checkpoint), then a sample. Every step is one call of the
compiled shard_map step in shard.py. A checkpoint holds everything the next step depends on
(params, optimizer state, step, PRNG key, data cursor, config), so --resume continues exactly.

Needs: model.py (GPTConfig), data.py (flags, tokens, batches), shard.py (mesh, step, checkpoints).
"""
import ctypes
import dataclasses
import glob
import json
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass

# XLA:CPU allocates each step's temporary buffers afresh (5 GB for the baby GPT) and glibc hands
# big freed blocks back to the kernel, so every step paid a page fault per 4 KB it touched: a
# third of the step on 2 cores (README: Performance). Keep freed memory for the next step.
if sys.platform == 'linux':
    try:  # M_ARENA_MAX = 1, M_MMAP_MAX = 0, M_TRIM_THRESHOLD = never
        for option, v in ((-8, 1), (-4, 0), (-1, -1)):
            ctypes.CDLL('libc.so.6').mallopt(option, v)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass

import jax
import numpy as np

import data
import shard
from model import GPTConfig


@dataclass
class Config:
    # data
    data: str = 'stdlib'  # stdlib | shakespeare | a file, folder or glob | a folder with train.bin/val.bin
    tokenizer: str = 'byte'  # byte | gpt2
    cache_dir: str = os.path.join(os.path.expanduser('~'), '.cache', 'jaxgpt')
    # model (the fields of model.GPTConfig, but vocab_size, which the tokenizer sets)
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True
    # how to compute it: the defaults are what measured fastest (README: Performance)
    dtype: str = 'bfloat16'  # what the model computes with: bfloat16 | float32
    master_weights: bool = True  # keep float32 params for the optimizer; False: bf16 only
    attention: str = ''  # xla | blockwise | cudnn; empty: cudnn on NVIDIA GPUs with bf16, else xla
    remat: str = 'none'  # recompute in the backward pass, to fit bigger batches: none | block | dots
    unroll: bool = None  # compile every layer, not one looped block; empty: on for CPU only
    mesh: str = ''  # e.g. data=4,model=2; empty: every device on the data axis
    # optimization
    batch_size: int = 32  # sequences per step, over all devices and micro-batches
    grad_accum: int = 1  # micro-batches per step, scanned in sequence
    max_iters: int = 600
    learning_rate: float = 2e-3
    min_lr: float = 2e-4  # cosine decay ends here, at max_iters
    warmup_iters: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 1337
    # logging, evaluation, checkpoints
    out_dir: str = 'out'
    log_interval: int = 50
    eval_interval: int = 200
    eval_iters: int = 10  # batches per validation estimate
    keep_checkpoints: int = 3
    resume: bool = False  # continue from the newest checkpoint in out_dir
    overwrite: bool = False  # start afresh in an out_dir that holds checkpoints, deleting them
    sample_tokens: int = 200  # printed at the end; 0 for none
    bench: bool = False  # time the step (compile, ms, tokens/s, MFU, memory), then exit
    profile: str = ''  # a folder: write a jax.profiler trace of three steps after warm-up
    preset: str = ''


PRESETS = {
    # nanoGPT's config/train_shakespeare_char.py; bytes of this ASCII text are its characters
    'shakespeare': dict(data='shakespeare', block_size=256, n_layer=6, n_head=6, n_embd=384,
                        dropout=0.2, bias=False, batch_size=64, max_iters=5000, learning_rate=1e-3,
                        min_lr=1e-4, warmup_iters=100, beta2=0.99, log_interval=10, eval_interval=250,
                        eval_iters=200),
    # GPT-2 124M and 350M with nanoGPT's config/train_gpt2.py schedule (~0.5M tokens a step), but
    # with biases (bias=True), as GPT-2 was, so its released weights load (--init_from).
    # grad_accum is per device: 40 micro-batches of 12 on one GPU; on 8 pass --grad_accum=5
    'gpt2': dict(tokenizer='gpt2', block_size=1024, n_layer=12, n_head=12, n_embd=768, remat='block',
                 batch_size=480, grad_accum=40, max_iters=600000, learning_rate=6e-4, min_lr=6e-5,
                 warmup_iters=2000, eval_interval=1000, eval_iters=100, log_interval=10),
    'gpt2-medium': dict(tokenizer='gpt2', block_size=1024, n_layer=24, n_head=16, n_embd=1024,
                        remat='block', batch_size=480, grad_accum=40, max_iters=600000, learning_rate=3e-4,
                        min_lr=3e-5, warmup_iters=2000, eval_interval=1000, eval_iters=100,
                        log_interval=10),
}

# Flags that say how or where to compute, not what: all others must match to --resume a run.
HOW = {'cache_dir', 'dtype', 'attention', 'remat', 'unroll', 'mesh', 'grad_accum', 'out_dir',
       'log_interval', 'eval_interval', 'eval_iters', 'keep_checkpoints', 'resume', 'overwrite',
       'sample_tokens', 'bench', 'profile', 'preset'}
CHOICES = {'tokenizer': ('byte', 'gpt2'), 'dtype': ('bfloat16', 'float32'),
           'attention': ('xla', 'blockwise', 'cudnn'), 'remat': ('none', 'block', 'dots')}

# Dense peak FLOP/s (bfloat16, float32) from the vendors' data sheets, by jax's device_kind.
PEAK = {'H100 PCIe': (756e12, 51e12), 'H100': (989e12, 67e12), 'H200': (989e12, 67e12),
        'A100': (312e12, 19.5e12), 'L4': (121e12, 30.3e12), 'TPU v4': (275e12, None),
        'TPU v5 lite': (197e12, None), 'TPU v5': (459e12, None), 'TPU v6 lite': (918e12, None)}


def peak_flops(dtype):  # per device, or None where no data sheet applies (CPUs)
    kind = jax.devices()[0].device_kind
    peaks = next((p for name, p in PEAK.items() if name in kind), (None, None))
    return peaks[dtype == 'float32']


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


def main(argv):
    cfg = data.parse_flags(argv, Config(), PRESETS)
    try:
        run(cfg)
    except (ValueError, FloatingPointError) as e:  # bad input: one line, nothing overwritten
        sys.exit(f"train.py: {e}")


def run(cfg):
    # --- checks that must pass before anything is read or written -----------------------------
    for name, choices in CHOICES.items():  # an empty --attention means the backend's default
        value = getattr(cfg, name)
        if value not in choices and not (name == 'attention' and value == ''):
            raise ValueError(f"--{name}={value!r} is not one of {', '.join(choices)}")
    for name in ('batch_size', 'grad_accum', 'block_size', 'n_layer', 'n_head', 'n_embd',
                 'log_interval', 'eval_interval', 'eval_iters', 'keep_checkpoints'):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name}={getattr(cfg, name)} must be at least 1")
    if not 0 <= cfg.dropout < 1:
        raise ValueError(f"--dropout={cfg.dropout} must be in [0, 1)")
    gpu = jax.default_backend() == 'gpu'
    cfg.attention = cfg.attention or ('cudnn' if gpu and cfg.dtype == 'bfloat16' else 'xla')
    cfg.unroll = jax.default_backend() == 'cpu' if cfg.unroll is None else cfg.unroll
    tok = data.get_tokenizer(cfg.tokenizer)
    model_cfg = GPTConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(GPTConfig)
                             if f.name != 'vocab_size'}, vocab_size=tok.vocab_size)
    mesh = shard.make_mesh(cfg.mesh)
    shard.check_divisible(model_cfg, mesh)
    per_step = mesh.shape['data'] * cfg.grad_accum
    if cfg.batch_size % per_step:
        raise ValueError(f"--batch_size={cfg.batch_size} is not divisible by data axis x grad_accum "
                         f"= {per_step}: use a multiple of {per_step}, or a smaller --grad_accum")
    ckpts = sorted(glob.glob(os.path.join(cfg.out_dir, 'ckpt_*.npz')))
    if cfg.resume and not ckpts:
        raise ValueError(f"--resume: no checkpoint in {cfg.out_dir}/: drop --resume to start a new run")
    if ckpts and not cfg.resume and not cfg.overwrite and not cfg.bench:
        raise ValueError(f"{cfg.out_dir}/ already holds checkpoints: pass --resume to continue, "
                         "another --out_dir, or --overwrite to delete them")

    # --- data: tokens on disk, batches as a pure function of (seed, cursor) ------------------
    train_tokens, val_tokens = data.load_tokens(cfg.data, cfg.tokenizer, cfg.cache_dir)
    if max(t[:10**6].max(initial=0) for t in (train_tokens, val_tokens)) >= tok.vocab_size:  # a glance
        raise ValueError(f"--data={cfg.data} holds token ids beyond the {cfg.tokenizer} tokenizer's "
                         f"{tok.vocab_size}: pass the --tokenizer it was made with")
    train_batches = data.Batches(train_tokens, cfg.block_size, cfg.batch_size, cfg.seed, 'train')
    val_batches = data.Batches(val_tokens, cfg.block_size, cfg.batch_size, cfg.seed, 'val')
    if not cfg.bench:
        try:  # the first write to out_dir, once every input has been checked
            os.makedirs(cfg.out_dir, exist_ok=True)
            tempfile.TemporaryFile(dir=cfg.out_dir).close()  # can we write there? (leaves nothing)
        except OSError as e:
            raise ValueError(f"--out_dir={cfg.out_dir} cannot be written ({e.strerror}): choose another folder")

    # --- the model, sharded, and the optimizer ------------------------------------------------
    jax.set_mesh(mesh)
    graphdef, params, specs = shard.init_params(model_cfg, mesh, cfg.seed, shard.storage_dtype(vars(cfg)))
    tx, lr_schedule = shard.make_optimizer(cfg, params)
    opt_state = jax.jit(tx.init)(params)
    step, cursor, key = 0, 0, jax.random.key(cfg.seed)

    if cfg.resume:
        arrays, meta = shard.read(ckpts[-1])
        saved = meta['config']
        wrong = [k for k in saved if k not in HOW and k in vars(cfg) and saved[k] != getattr(cfg, k)]
        if wrong:
            raise ValueError(f"{ckpts[-1]} was trained with " + ', '.join(f"--{k}={saved[k]}" for k in wrong)
                             + ": pass the same flags (or its --preset) to continue it exactly")
        state = shard.place(arrays, {'params': params, 'opt': opt_state})
        params, opt_state = state['params'], state['opt']
        step, cursor = meta['step'], meta['cursor']
        key = jax.random.wrap_key_data(np.array(meta['key'], np.uint32))
        print(f"resumed from {ckpts[-1]} at step {step}")
    elif ckpts and not cfg.bench:  # --overwrite
        for f in ckpts:
            os.remove(f)

    n_params = sum(x.size for x in jax.tree.leaves(params))
    n_devices = mesh.devices.size
    tokens_per_step = cfg.batch_size * cfg.block_size
    # Model FLOPs per token (PaLM's appendix B, as nanoGPT): 6 per parameter that multiplies
    # (forward 2, backward 4; the position embeddings only add) and 12 * L * C * T for the scores
    # and the weighted sum of attention, counted in full although causal masking skips half.
    flops_per_token = 6 * (n_params - cfg.block_size * cfg.n_embd) + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
    peak = peak_flops(cfg.dtype)
    print(f"mesh: {dict(mesh.shape)} over {n_devices} {jax.devices()[0].platform} device(s) "
          f"({jax.devices()[0].device_kind})")
    print(f"model: {n_params / 1e6:.2f}M params ({n_params - cfg.block_size * cfg.n_embd:,} without position "
          f"embeddings), {cfg.dtype} compute, {shard.storage_dtype(vars(cfg))} params, {cfg.attention} attention, "
          f"remat {cfg.remat}, layers {'unrolled' if cfg.unroll else 'scanned'}")
    print(f"memory per device: params {shard.per_device_bytes(params) / 2**20:.1f} MiB, "
          f"optimizer state {shard.per_device_bytes(opt_state) / 2**20:.1f} MiB")
    print(f"data: {len(train_tokens):,} train and {len(val_tokens):,} val tokens; {tokens_per_step:,} tokens per step")

    # The step, compiled ahead of time: compilation is reported once, not hidden in step one.
    batch, _ = train_batches.get(cursor)
    t0 = time.perf_counter()
    train_step = shard.make_train_step(graphdef, specs, mesh, tx, cfg).lower(params, opt_state, batch, key).compile()
    print(f"compiled the training step in {time.perf_counter() - t0:.1f} s")
    eval_loss = shard.make_loss(graphdef, specs, mesh, cfg.dtype)

    def speed(seconds_per_step):  # the figures every log line and the benchmark share
        flops = flops_per_token * tokens_per_step / seconds_per_step
        mfu = f" ({flops / (peak * n_devices):.1%} MFU)" if peak else ''
        mem = (jax.devices()[0].memory_stats() or {}).get('bytes_in_use')  # GPU and TPU only
        return (f"{seconds_per_step * 1000:7.1f} ms/step | {tokens_per_step / seconds_per_step:8.0f} tok/s | "
                f"{flops / 1e12:.3g} TFLOP/s{mfu}" + (f" | {mem / 2**30:.1f} GiB in use" if mem else ''))

    if cfg.bench:
        return benchmark(cfg, train_step, params, opt_state, train_batches, key, speed,
                         flops_per_token * tokens_per_step, peak)

    def evaluate():  # mean loss over eval_iters fixed batches, in chunks the size of a micro-batch
        chunks = [c for i in range(cfg.eval_iters)
                  for c in np.split(val_batches.get(i * cfg.batch_size)[0], cfg.grad_accum)]
        return float(np.mean(jax.device_get([eval_loss(params, c) for c in chunks])))

    def save_checkpoint():
        meta = dict(step=step, cursor=cursor, key=jax.random.key_data(key).tolist(), config=vars(cfg),
                    model=dataclasses.asdict(model_cfg))
        path = os.path.join(cfg.out_dir, f'ckpt_{step:07d}.npz')
        shard.save(path, {'params': params, 'opt': opt_state}, meta)
        for old in sorted(glob.glob(os.path.join(cfg.out_dir, 'ckpt_*.npz')))[:-cfg.keep_checkpoints]:
            os.remove(old)
        return path

    # metrics.jsonl: every step's loss. A resumed run first drops what was logged after its
    # checkpoint (a killed run logs steps it never saved), so each step appears once.
    metrics_path = os.path.join(cfg.out_dir, 'metrics.jsonl')
    if cfg.resume and os.path.exists(metrics_path):
        with open(metrics_path) as f:
            kept = [line for line in f if json.loads(line)['step'] <= step]
        data.atomic_write(metrics_path, lambda f: f.write(''.join(kept).encode()))
    metrics = open(metrics_path, 'a' if cfg.resume else 'w')
    log = lambda **kw: print(json.dumps(kw), file=metrics, flush=True)

    # SIGTERM (pre-emption) and Ctrl-C: finish the step, log and check its loss, save, exit 0.
    # No evaluation: a pre-empted job has seconds, not the minutes a full evaluation can take.
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(True))

    # --- the loop -----------------------------------------------------------------------------
    pending, start_step, t_start = [], step, time.perf_counter()
    t0 = t_start
    while step < cfg.max_iters:
        if cfg.profile and step == start_step + 3:  # after warm-up: three steps, then stop
            jax.profiler.start_trace(cfg.profile)
        batch, cursor = train_batches.get(cursor)
        params, opt_state, loss = train_step(params, opt_state, batch, jax.random.fold_in(key, step))
        pending.append(loss)  # read back only at log time, so the host never waits on the device
        step += 1
        if cfg.profile and step == start_step + 6:
            jax.block_until_ready(loss)
            jax.profiler.stop_trace()
            print(f"wrote a profile of steps {step - 2}-{step} to {cfg.profile}/")
        at_eval = step % cfg.eval_interval == 0 or step == cfg.max_iters
        if at_eval or stop or step % cfg.log_interval == 0:  # never save without checking the losses
            losses = np.array(jax.device_get(pending))
            if not np.all(np.isfinite(losses)):
                bad = step - len(losses) + 1 + int(np.argmin(np.isfinite(losses)))
                raise FloatingPointError(f"the loss became {losses[~np.isfinite(losses)][0]} at step {bad}: "
                                         f"stopped; the last good checkpoint in {cfg.out_dir}/ is untouched. "
                                         "Try a lower --learning_rate")
            dt = (time.perf_counter() - t0) / len(pending)
            eta = (cfg.max_iters - step) * (time.perf_counter() - t_start) / (step - start_step)
            lr = float(lr_schedule(step - 1))
            print(f"step {step:5d} | loss {losses[-1]:.4f} | lr {lr:.2e} | {speed(dt)} | eta {eta / 60:.1f} min")
            for i, l in enumerate(losses):  # every step's loss, for exact comparisons between runs
                log(step=step - len(losses) + 1 + i, loss=float(l))
            log(step=step, lr=lr, ms_per_step=dt * 1000)
            pending, t0 = [], time.perf_counter()
        if stop:
            print(f"stopped by signal at step {step}; saved {save_checkpoint()}; resume with: "
                  f"python train.py --resume --out_dir={cfg.out_dir} (and the same flags)")
            return
        if at_eval:
            val = evaluate()
            if not np.isfinite(val):
                raise FloatingPointError(f"the validation loss became {val} at step {step}: stopped; "
                                         f"the last good checkpoint in {cfg.out_dir}/ is untouched")
            print(f"step {step:5d} | val loss {val:.4f} | saved {save_checkpoint()}")
            log(step=step, val_loss=val)
            t0 = time.perf_counter()  # evaluation and saving are not training time
    peak_mem = (jax.devices()[0].memory_stats() or {}).get('peak_bytes_in_use')  # GPU/TPU only
    print(f"trained {step - start_step} steps in {(time.perf_counter() - t_start) / 60:.1f} min"
          + (f"; peak device memory {peak_mem / 2**30:.2f} GiB" if peak_mem else ''))

    if cfg.sample_tokens:
        logits_fn = shard.make_logits(graphdef, specs, mesh, cfg.dtype)
        ids = shard.generate(logits_fn, params, [tok.eot], cfg.sample_tokens, cfg.block_size,
                             tok.vocab_size, temperature=0.8, top_k=200, key=key)
        print('sample:\n' + tok.decode(ids[0][1:]))


def benchmark(cfg, train_step, params, opt_state, batches, key, speed, flops_per_step, peak,
              warmup=3, steps=10):
    """Time `steps` steps after `warmup`, reading the clock only once each step has finished."""
    cursor, times = 0, []
    for i in range(warmup + steps):
        batch, cursor = batches.get(cursor)
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
    stats = jax.devices()[0].memory_stats() or {}
    if 'peak_bytes_in_use' in stats:
        print(f"peak device memory {stats['peak_bytes_in_use'] / 2**30:.2f} GiB")
    else:  # no runtime statistics (CPU): what the compiled step reserves
        m = train_step.memory_analysis()
        print(f"device memory of the compiled step: {(m.temp_size_in_bytes + m.argument_size_in_bytes) / 2**30:.2f} "
              f"GiB ({m.temp_size_in_bytes / 2**30:.2f} GiB temporary, the rest params, optimizer state, batch)")
    if cfg.profile:
        jax.profiler.start_trace(cfg.profile)
        for i in range(3):
            batch, cursor = batches.get(cursor)
            params, opt_state, loss = train_step(params, opt_state, batch, key)
        jax.block_until_ready(loss)
        jax.profiler.stop_trace()
        print(f"wrote a profile of 3 steps to {cfg.profile}/")


if __name__ == '__main__':
    main(sys.argv[1:])
