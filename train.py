"""Train a GPT. `python train.py` trains a small one on the standard library's source, on CPU, in
minutes; `--preset=shakespeare` is nanoGPT's baby GPT; `--preset=gpt2` is GPT-2 124M.

    python train.py --help                       # every flag, with its default
    python train.py --preset=shakespeare --mesh=data=4,model=2 --max_iters=2000
    python train.py --bench                      # time the step: ms, tokens/s, MFU, memory (bench.py)
    python train.py --init_from=gpt2 --data=my.txt --block_size=256     # fine-tune GPT-2's weights
    python train.py --eval_only --resume         # val loss, perplexity, bits per byte

A script, top to bottom: the config and its flags, the data, the mesh and the sharded params,
then the loop (log, evaluate, checkpoint), then a sample. Every step is one call of the
compiled shard_map step in shard.py. A checkpoint holds everything the next step depends on
(params, optimizer state, step, PRNG key, data cursor, config), so --resume continues exactly.

Needs: model.py (GPTConfig), data.py (flags, tokens, batches, the out_dir lock), shard.py (mesh, step,
checkpoints, GPT-2's weights, the sampler); bench.py for --bench.
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

# XLA:CPU allocates each step's temporaries afresh (5 GB for the baby GPT), and glibc handed big freed blocks
# back to the kernel: a page fault per 4 KB touched, a third of the step on 2 cores (README: Performance).
try:  # M_ARENA_MAX = 1, M_MMAP_MAX = 0, M_TRIM_THRESHOLD = never
    for option, v in ((-8, 1), (-4, 0), (-1, -1)):
        ctypes.CDLL('libc.so.6').mallopt(option, v)
except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
    pass

import jax
import numpy as np
from jax.experimental.multihost_utils import process_allgather
from jax.sharding import PartitionSpec as P

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
    mesh: str = ''  # e.g. data=4,model=2; empty: every device on the data axis, of every process
    distributed: str = ''  # many processes: auto (SLURM, TPU pods, ...) or HOST:PORT,N,I (process 0's address, count, this id)
    fsdp: bool = False  # also split weights, float32 masters and Adam's moments over the data axis
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
    init_from: str = ''  # start from GPT-2's weights: a folder with Hugging Face's config.json, model.safetensors
    eval_only: bool = False  # print the val loss, perplexity and bits per byte over eval_iters batches, exit
    overwrite: bool = False  # start afresh in an out_dir that holds checkpoints, deleting them
    sample_tokens: int = 200  # printed at the end; 0 for none
    bench: bool = False  # time the step (compile, ms, tokens/s, MFU, memory), then exit
    profile: str = ''  # with --bench: a folder to write a jax.profiler trace of three steps to
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
}
PRESETS['gpt2-medium'] = dict(PRESETS['gpt2'], n_layer=24, n_head=16, n_embd=1024, learning_rate=3e-4, min_lr=3e-5)

# Flags that say how or where to compute, not what: all others must match to --resume a run.
HOW = {'cache_dir', 'dtype', 'attention', 'remat', 'unroll', 'mesh', 'fsdp', 'distributed', 'grad_accum', 'out_dir',
       'log_interval', 'eval_interval', 'eval_iters', 'keep_checkpoints', 'resume', 'overwrite',
       'sample_tokens', 'bench', 'profile', 'preset', 'eval_only'}
CHOICES = {'tokenizer': ('byte', 'gpt2'), 'dtype': ('bfloat16', 'float32'),
           'attention': ('xla', 'blockwise', 'cudnn'), 'remat': ('none', 'block', 'dots')}

# Dense peak FLOP/s (bfloat16, float32) from the vendors' data sheets, by jax's device_kind.
PEAK = {'H100 PCIe': (756e12, 51e12), 'H100': (989e12, 67e12), 'H200': (989e12, 67e12),
        'A100': (312e12, 19.5e12), 'L4': (121e12, 30.3e12), 'TPU v4': (275e12, None),
        'TPU v5 lite': (197e12, None), 'TPU v5': (459e12, None), 'TPU v6 lite': (918e12, None)}

def main(argv):
    cfg = data.parse_flags(argv, Config(), PRESETS)
    try:
        run(cfg)
    except (ValueError, FloatingPointError) as e:  # bad input: one line, nothing overwritten
        sys.exit(f"train.py: {e}")

def run(cfg):
    if cfg.distributed:  # JAX's multi-process runtime: from here on the devices are every process's
        parts = [] if cfg.distributed == 'auto' else cfg.distributed.split(',')
        if len(parts) not in (0, 3) or not all(p.isdigit() for p in parts[1:]):
            raise ValueError(f"--distributed={cfg.distributed!r}: write auto, or HOST:PORT,N,I")
        jax.distributed.initialize(*(parts[:1] + [int(p) for p in parts[1:]]))
    if jax.process_index():  # every process computes; process 0 alone prints and writes
        sys.stdout = open(os.devnull, 'w')

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
    cfg.attention = cfg.attention or ('cudnn' if jax.default_backend() == 'gpu' and cfg.dtype == 'bfloat16' else 'xla')
    cfg.unroll = jax.default_backend() == 'cpu' if cfg.unroll is None else cfg.unroll
    if cfg.init_from:  # the weights set the model's shape; the context may be cut (wpe is cropped)
        fields, cfg.tokenizer = shard.hf_config(cfg.init_from)
        if cfg.block_size > fields['block_size']:
            raise ValueError(f"--block_size={cfg.block_size} is longer than {cfg.init_from}'s {fields['block_size']}")
        cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.bias = (fields[k] for k in ('n_layer', 'n_head', 'n_embd', 'bias'))
    tok = data.get_tokenizer(cfg.tokenizer)
    if cfg.init_from and fields['vocab_size'] != tok.vocab_size:
        raise ValueError(f"{cfg.init_from} has a vocabulary of {fields['vocab_size']}, the {cfg.tokenizer} tokenizer {tok.vocab_size}")
    mesh = shard.make_mesh(cfg.mesh)
    model_cfg = GPTConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(GPTConfig)
                             if f.name not in ('vocab_size', 'fsdp')}, vocab_size=tok.vocab_size,
                          fsdp=mesh.shape['data'] if cfg.fsdp else 1)
    shard.check_divisible(model_cfg, mesh)
    per_step = mesh.shape['data'] * cfg.grad_accum
    if cfg.batch_size % per_step:
        raise ValueError(f"--batch_size={cfg.batch_size} is not divisible by data axis x grad_accum "
                         f"= {per_step}: use a multiple of {per_step}, or a smaller --grad_accum")
    ckpts = sorted(glob.glob(os.path.join(cfg.out_dir, 'ckpt_*.npz')))
    if cfg.resume and not ckpts:
        raise ValueError(f"--resume: no checkpoint in {cfg.out_dir}/: drop --resume to start a new run")
    if ckpts and not cfg.resume and not cfg.overwrite and not cfg.bench and not cfg.eval_only:
        raise ValueError(f"{cfg.out_dir}/ already holds checkpoints: pass --resume to continue, "
                         "another --out_dir, or --overwrite to delete them")

    # --- data: tokens on disk, batches as a pure function of (seed, cursor) ------------------
    train_tokens, val_tokens = data.load_tokens(cfg.data, cfg.tokenizer, cfg.cache_dir)
    if max(t[:10**6].max(initial=0) for t in (train_tokens, val_tokens)) >= tok.vocab_size:  # a glance
        raise ValueError(f"--data={cfg.data} holds token ids beyond the {cfg.tokenizer} tokenizer's "
                         f"{tok.vocab_size}: pass the --tokenizer it was made with")
    train_batches = data.Batches(train_tokens, cfg.block_size, cfg.batch_size, cfg.seed, 'train')
    val_batches = data.Batches(val_tokens, cfg.block_size, cfg.batch_size, cfg.seed, 'val')
    held = None  # the out_dir's lock, in process 0 of a run that writes there
    if not cfg.bench and not cfg.eval_only:
        try:  # the first write to out_dir, once every input has been checked
            os.makedirs(cfg.out_dir, exist_ok=True)
            tempfile.TemporaryFile(dir=cfg.out_dir).close()  # can we write there? (leaves nothing)
        except OSError as e:
            raise ValueError(f"--out_dir={cfg.out_dir} cannot be written ({e.strerror}): choose another folder")
        # One run per out_dir: its process 0 holds out_dir/lock as long as it lives
        held, owner = data.lock(cfg.out_dir) if jax.process_index() == 0 else (None, None)
        if process_allgather(np.int32(held is None)).ravel()[0]:
            raise ValueError(f"{cfg.out_dir}/ is in use by a live run (process {owner or 'of process 0'}): "
                             "let it finish, stop it, or pass another --out_dir")
        ckpts = sorted(glob.glob(os.path.join(cfg.out_dir, 'ckpt_*.npz')))  # as of holding the lock

    # --- the model, sharded, and the optimizer ------------------------------------------------
    jax.set_mesh(mesh)
    graphdef, params, specs = shard.init_params(model_cfg, mesh, cfg.seed, shard.storage_dtype(vars(cfg)))
    tx, lr_schedule = shard.make_optimizer(cfg, params)
    opt_state = jax.jit(tx.init)(params)
    step, cursor, key = 0, 0, jax.random.key(cfg.seed)

    if cfg.resume:
        arrays, meta = shard.read(ckpts[-1])
        wrong = {k: v for k, v in meta['config'].items() if k not in HOW and k in vars(cfg) and v != getattr(cfg, k)}
        if wrong:
            raise ValueError(f"{ckpts[-1]} was trained with " + ', '.join(f"--{k}={v}" for k, v in wrong.items())
                             + ": pass the same flags (or its --preset) to continue it exactly")
        state = shard.place(arrays, {'params': params, 'opt': opt_state})
        params, opt_state = state['params'], state['opt']
        step, cursor, key = meta['step'], meta['cursor'], jax.random.wrap_key_data(np.array(meta['key'], np.uint32))
        print(f"resumed from {ckpts[-1]} at step {step}")
    elif cfg.init_from:
        params = shard.from_hf(cfg.init_from, params, model_cfg)
        print(f"loaded the weights of {cfg.init_from}")
    if cfg.overwrite and held and not cfg.resume:
        for f in ckpts:
            os.remove(f)

    n_params, n_devices = sum(x.size for x in jax.tree.leaves(params)), mesh.devices.size
    tokens_per_step = cfg.batch_size * cfg.block_size
    # Model FLOPs per token (PaLM's appendix B, as nanoGPT): 6 per multiplying parameter (forward 2, backward 4;
    # wpe only adds) and 12 * L * C * T for attention's scores and weighted sum, in full though causal skips half.
    flops_per_token = 6 * (n_params - cfg.block_size * cfg.n_embd) + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
    peak = next((p for name, p in PEAK.items() if name in jax.devices()[0].device_kind), (None, None))[
        cfg.dtype == 'float32']  # per device; None where no data sheet applies (CPUs)
    print(f"mesh: {dict(mesh.shape)} over {n_devices} {jax.devices()[0].platform} device(s) "
          f"({jax.devices()[0].device_kind})")
    print(f"model: {n_params / 1e6:.2f}M params ({n_params - cfg.block_size * cfg.n_embd:,} without position "
          f"embeddings), {cfg.dtype} compute, {shard.storage_dtype(vars(cfg))} params, {cfg.attention} attention, "
          f"remat {cfg.remat}, layers {'unrolled' if cfg.unroll else 'scanned'}" + (', FSDP' if cfg.fsdp else ''))
    print(f"memory per device: params {shard.per_device_bytes(params) / 2**20:.1f} MiB, "
          f"optimizer state {shard.per_device_bytes(opt_state) / 2**20:.1f} MiB")
    print(f"data: {len(train_tokens):,} train and {len(val_tokens):,} val tokens; {tokens_per_step:,} tokens per step")

    # Each process reads only the rows of a batch that its own devices hold ('data' splits the
    # batch); JAX assembles the global array from every process's rows.
    batch_sharding, shape = jax.NamedSharding(mesh, P('data')), (cfg.batch_size, cfg.block_size + 1)
    mine = [i[0].indices(cfg.batch_size) for i in batch_sharding.addressable_devices_indices_map(shape).values()]
    rows = slice(min(r[0] for r in mine), max(r[1] for r in mine))

    def get(batches, cursor):  # -> the global (B, T+1) batch, split over 'data', and the next cursor
        local, cursor = batches.get(cursor, rows)
        return jax.make_array_from_process_local_data(batch_sharding, local, shape), cursor

    eval_loss = shard.make_loss(graphdef, specs, mesh, cfg.dtype, cfg.grad_accum)

    def evaluate():  # mean loss over eval_iters fixed batches
        return float(np.mean(jax.device_get([eval_loss(params, get(val_batches, i * cfg.batch_size)[0])
                                             for i in range(cfg.eval_iters)])))

    if cfg.eval_only:  # bits per byte: the loss in bits, spread over the bytes of the text it predicted
        loss = evaluate()
        n_bytes = sum(tok.token_bytes[val_batches.get(i * cfg.batch_size)[0][:, 1:]].sum() for i in range(cfg.eval_iters))
        n_tokens = cfg.eval_iters * tokens_per_step
        return print(f"val loss {loss:.4f} | perplexity {np.exp(loss):.2f} | {loss * n_tokens / n_bytes / np.log(2):.4f} "
                     f"bits per byte | over {cfg.eval_iters} batches: {n_tokens:,} tokens, {n_bytes:,} bytes of text")

    # The step, compiled ahead of time: compilation is reported once, not hidden in step one.
    batch, _ = get(train_batches, cursor)
    t0 = time.perf_counter()
    train_step = shard.make_train_step(graphdef, specs, mesh, tx, cfg).lower(params, opt_state, batch, key).compile()
    print(f"compiled the training step in {time.perf_counter() - t0:.1f} s")

    def speed(seconds_per_step):  # the figures every log line and the benchmark share
        flops = flops_per_token * tokens_per_step / seconds_per_step
        mfu = f" ({flops / (peak * n_devices):.1%} MFU)" if peak else ''
        mem = (jax.local_devices()[0].memory_stats() or {}).get('bytes_in_use')  # GPU and TPU only
        return (f"{seconds_per_step * 1000:7.1f} ms/step | {tokens_per_step / seconds_per_step:8.0f} tok/s | "
                f"{flops / 1e12:.3g} TFLOP/s{mfu}" + (f" | {mem / 2**30:.1f} GiB in use" if mem else ''))

    if cfg.bench:
        import bench  # the timing loop, and on a CPU the matmul to measure against, live in bench.py
        return bench.training(cfg, train_step, params, opt_state, lambda c: get(train_batches, c), key, speed,
                              flops_per_token * tokens_per_step, peak)

    def save_checkpoint():
        meta = dict(step=step, cursor=cursor, key=jax.random.key_data(key).tolist(), config=vars(cfg),
                    model=dataclasses.asdict(model_cfg))
        path = os.path.join(cfg.out_dir, f'ckpt_{step:07d}.npz')
        shard.save(path, {'params': params, 'opt': opt_state}, meta)
        for old in sorted(glob.glob(os.path.join(cfg.out_dir, 'ckpt_*.npz')))[:-cfg.keep_checkpoints]:
            if held:  # process 0
                os.remove(old)
        return path

    # metrics.jsonl: every step's loss. A resumed run first drops what was logged after its
    # checkpoint (a killed run logs steps it never saved), so each step appears once.
    metrics_path = os.path.join(cfg.out_dir, 'metrics.jsonl') if held else os.devnull
    if cfg.resume and held and os.path.exists(metrics_path):
        with open(metrics_path) as f:
            kept = [line for line in f if json.loads(line)['step'] <= step]
        data.atomic_write(metrics_path, lambda f: f.write(''.join(kept).encode()))
    metrics = open(metrics_path, 'a' if cfg.resume else 'w')
    log = lambda **kw: print(json.dumps(kw), file=metrics, flush=True)

    # SIGTERM (pre-emption) and Ctrl-C: at the next log step, check the losses, save, exit 0.
    # No evaluation: a pre-empted job has seconds, not the minutes a full evaluation can take.
    stop, stopping = [], False
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(True))

    # --- the loop -----------------------------------------------------------------------------
    pending, start_step, t_start = [], step, time.perf_counter()
    t0 = t_start
    while step < cfg.max_iters:
        batch, cursor = get(train_batches, cursor)
        params, opt_state, loss = train_step(params, opt_state, batch, jax.random.fold_in(key, step))
        pending.append(loss)  # read back only at log time, so the host never waits on the device
        step += 1
        at_eval = step % cfg.eval_interval == 0 or step == cfg.max_iters
        if at_eval or step % cfg.log_interval == 0:  # never save without checking the losses
            # every process stops at the same step: they agree here, where they wait anyway
            stopping = process_allgather(np.int32(len(stop))).max() > 0
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
        if stopping:
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
    peak_mem = (jax.local_devices()[0].memory_stats() or {}).get('peak_bytes_in_use')  # GPU/TPU only
    print(f"trained {step - start_step} steps in {(time.perf_counter() - t_start) / 60:.1f} min"
          + (f"; peak device memory {peak_mem / 2**30:.2f} GiB" if peak_mem else ''))

    if cfg.sample_tokens:  # with whole weights: FSDP's split is for training
        model_cfg = dataclasses.replace(model_cfg, fsdp=1)
        graphdef, whole, specs = shard.init_params(model_cfg, mesh, 0, shard.storage_dtype(vars(cfg)))
        params = jax.tree.unflatten(jax.tree.structure(whole), [jax.device_put(p, w.sharding) for p, w in
                                                                zip(jax.tree.leaves(params), jax.tree.leaves(whole))])
        generate = shard.make_sampler(graphdef, specs, mesh, model_cfg, cfg.dtype, temperature=0.8, top_k=200)
        ids = [int(nxt[0]) for nxt, _ in generate(params, [tok.eot], cfg.sample_tokens, key)]
        print('sample:\n' + tok.decode(ids))

if __name__ == '__main__':
    main(sys.argv[1:])
