"""Train a GPT. `python train.py` trains a small one on the standard library's source, on CPU, in
minutes; `--preset=shakespeare` is nanoGPT's baby GPT; `--preset=gpt2` is GPT-2 124M.

    python train.py --help                       # every flag, with its default
    python train.py --preset=shakespeare --mesh=data=4,model=2 --max_iters=2000

A script, top to bottom: the config and its flags, the data, the mesh and the sharded params,
then the loop (log, evaluate, checkpoint), then a sample. Every step is one jitted call to the
shard_map step in shard.py. A checkpoint holds everything the next step depends on (params,
optimizer state, step, PRNG key, data cursor, config), so --resume continues exactly.

Needs: model.py, data.py, shard.py, sample.py.
"""
import dataclasses
import glob
import json
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass

import jax
import numpy as np

import data
import sample
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
    remat: bool = False  # recompute activations in the backward pass, to fit bigger batches
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
    dtype: str = 'bfloat16'  # what the model computes with: bfloat16 | float32
    master_weights: bool = True  # keep float32 params for the optimizer; False: bf16 only
    mesh: str = ''  # e.g. data=4,model=2; empty: every device on the data axis
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
    preset: str = ''


PRESETS = {
    # nanoGPT's config/train_shakespeare_char.py; bytes of this ASCII text are its characters
    'shakespeare': dict(data='shakespeare', block_size=256, n_layer=6, n_head=6, n_embd=384,
                        dropout=0.2, bias=False, batch_size=64, max_iters=5000, learning_rate=1e-3,
                        min_lr=1e-4, warmup_iters=100, beta2=0.99, log_interval=10, eval_interval=250,
                        eval_iters=200),
    # GPT-2 124M and 350M, trained as nanoGPT's config/train_gpt2.py (~0.5M tokens a step).
    # grad_accum is per device: 40 micro-batches of 12 on one GPU; on 8 pass --grad_accum=5
    'gpt2': dict(tokenizer='gpt2', block_size=1024, n_layer=12, n_head=12, n_embd=768, remat=True,
                 batch_size=480, grad_accum=40, max_iters=600000, learning_rate=6e-4, min_lr=6e-5,
                 warmup_iters=2000, eval_interval=1000, eval_iters=100, log_interval=10),
    'gpt2-medium': dict(tokenizer='gpt2', block_size=1024, n_layer=24, n_head=16, n_embd=1024,
                        remat=True, batch_size=480, grad_accum=40, max_iters=600000, learning_rate=3e-4,
                        min_lr=3e-5, warmup_iters=2000, eval_interval=1000, eval_iters=100,
                        log_interval=10),
}


def parse_flags(argv, cfg, presets):
    """--name=value for every field of the dataclass `cfg`; --flag alone means --flag=True."""
    names, prog = {f.name: f for f in dataclasses.fields(cfg)}, os.path.basename(sys.argv[0])
    if '-h' in argv or '--help' in argv:
        print(f"usage: python {prog} [--name=value ...]\n")
        for f in names.values():
            print(f"  --{f.name}={getattr(cfg, f.name)!r}  ({f.type.__name__})")
        if presets:
            print(f"\npresets (--preset=NAME, then your flags on top): {', '.join(presets)}")
        sys.exit(0)
    pairs = []
    for arg in argv:
        name, eq, value = arg.removeprefix('--').partition('=')
        if not arg.startswith('--') or name not in names:
            sys.exit(f"{prog}: unknown flag {arg!r}: see --help for the flags")
        pairs.append((name, value if eq else 'True'))
    preset = dict(pairs).get('preset')
    if preset is not None:
        if preset not in presets:
            sys.exit(f"{prog}: unknown preset {preset!r}: choose one of {', '.join(presets)}")
        pairs = list(presets[preset].items()) + pairs
    for name, value in pairs:
        kind = names[name].type
        try:
            if kind is bool:
                if str(value).lower() not in ('true', 'false', '1', '0'):
                    raise ValueError
                value = str(value).lower() in ('true', '1')
            setattr(cfg, name, kind(value))
        except ValueError:
            sys.exit(f"{prog}: --{name}={value!r} is not a valid {kind.__name__}")
    return cfg


def storage_dtype(cfg):  # float32 master copies, or the compute dtype itself
    return 'float32' if cfg['master_weights'] else cfg['dtype']


def main(argv):
    cfg = parse_flags(argv, Config(), PRESETS)
    try:
        run(cfg)
    except (ValueError, FloatingPointError) as e:  # bad input: one line, nothing overwritten
        sys.exit(f"train.py: {e}")


def run(cfg):
    # --- checks that must pass before anything is read or written -----------------------------
    tok = data.get_tokenizer(cfg.tokenizer)
    vocab_size = tok.vocab_size
    model_cfg = GPTConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(GPTConfig)
                             if f.name != 'vocab_size'}, vocab_size=vocab_size)
    for name in ('batch_size', 'grad_accum', 'block_size', 'n_layer', 'n_head', 'n_embd',
                 'log_interval', 'eval_interval', 'eval_iters', 'keep_checkpoints'):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name}={getattr(cfg, name)} must be at least 1")
    if not 0 <= cfg.dropout < 1:
        raise ValueError(f"--dropout={cfg.dropout} must be in [0, 1)")
    mesh = shard.make_mesh(cfg.mesh)
    shard.check_divisible(model_cfg, mesh)
    per_step = mesh.shape['data'] * cfg.grad_accum
    if cfg.batch_size % per_step:
        raise ValueError(f"--batch_size={cfg.batch_size} is not divisible by data axis x grad_accum "
                         f"= {per_step}: use a multiple of {per_step}, or a smaller --grad_accum")
    ckpts = sorted(glob.glob(os.path.join(cfg.out_dir, 'ckpt_*.npz')))
    if cfg.resume and not ckpts:
        raise ValueError(f"--resume: no checkpoint in {cfg.out_dir}/: drop --resume to start a new run")
    if ckpts and not cfg.resume and not cfg.overwrite:
        raise ValueError(f"{cfg.out_dir}/ already holds checkpoints: pass --resume to continue, "
                         "another --out_dir, or --overwrite to delete them")

    # --- data: tokens on disk, batches as a pure function of (seed, cursor) ------------------
    train_tokens, val_tokens = data.load_tokens(cfg.data, cfg.tokenizer, cfg.cache_dir)
    if max(t[:10**6].max(initial=0) for t in (train_tokens, val_tokens)) >= vocab_size:  # a glance
        raise ValueError(f"--data={cfg.data} holds token ids beyond the {cfg.tokenizer} tokenizer's "
                         f"{vocab_size}: pass the --tokenizer it was made with")
    train_batches = data.Batches(train_tokens, cfg.block_size, cfg.batch_size, cfg.seed, 'train')
    val_batches = data.Batches(val_tokens, cfg.block_size, cfg.batch_size, cfg.seed, 'val')
    try:  # the first write to out_dir, once every input has been checked
        os.makedirs(cfg.out_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=cfg.out_dir).close()  # can we write there? (leaves nothing)
    except OSError as e:
        raise ValueError(f"--out_dir={cfg.out_dir} cannot be written ({e.strerror}): choose another folder")

    # --- the model, sharded, and the optimizer ------------------------------------------------
    jax.set_mesh(mesh)
    graphdef, params, specs = shard.init_params(model_cfg, mesh, cfg.seed, storage_dtype(vars(cfg)))
    tx, lr_schedule = shard.make_optimizer(cfg, params)
    opt_state = jax.jit(tx.init)(params)
    train_step = shard.make_train_step(graphdef, specs, mesh, tx, cfg)
    eval_loss = shard.make_loss(graphdef, specs, mesh, cfg.dtype)
    step, cursor, key = 0, 0, jax.random.key(cfg.seed)

    if cfg.resume:
        arrays, meta = shard.read(ckpts[-1])
        saved = {**meta['model'], 'tokenizer': meta['config']['tokenizer']}
        wrong = [k for k in ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'tokenizer')
                 if getattr(cfg, k) != saved[k]]
        if wrong:
            raise ValueError(f"{ckpts[-1]} was trained with " + ', '.join(f"--{k}={saved[k]}" for k in wrong)
                             + ": pass the same flags (or its --preset) to resume it")
        state = shard.place(arrays, {'params': params, 'opt': opt_state})
        params, opt_state = state['params'], state['opt']
        step, cursor = meta['step'], meta['cursor']
        key = jax.random.wrap_key_data(np.array(meta['key'], np.uint32))
        print(f"resumed from {ckpts[-1]} at step {step}")
    elif ckpts:  # --overwrite
        for f in ckpts:
            os.remove(f)

    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"mesh: {dict(mesh.shape)} over {mesh.devices.size} {jax.devices()[0].platform} device(s)")
    print(f"model: {n_params / 1e6:.2f}M params ({n_params - model_cfg.block_size * model_cfg.n_embd:,} "
          f"without position embeddings), {cfg.dtype} compute, {storage_dtype(vars(cfg))} params")
    print(f"memory per device: params {shard.per_device_bytes(params) / 2**20:.1f} MiB, "
          f"optimizer state {shard.per_device_bytes(opt_state) / 2**20:.1f} MiB")
    print(f"data: {len(train_tokens):,} train and {len(val_tokens):,} val tokens; "
          f"{cfg.batch_size * cfg.block_size:,} tokens per step")

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

    # SIGTERM (pre-emption) and Ctrl-C finish the current step, save, and exit cleanly
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(True))

    # --- the loop -----------------------------------------------------------------------------
    metrics = open(os.path.join(cfg.out_dir, 'metrics.jsonl'), 'a' if cfg.resume else 'w')
    log = lambda **kw: print(json.dumps(kw), file=metrics, flush=True)
    pending, t0, t_start, start_step = [], time.time(), time.time(), step
    while step < cfg.max_iters and not stop:
        batch, cursor = train_batches.get(cursor)
        params, opt_state, loss = train_step(params, opt_state, batch, jax.random.fold_in(key, step))
        pending.append(loss)  # read back only at log time, so the host never waits on the device
        step += 1
        at_eval = step % cfg.eval_interval == 0 or step == cfg.max_iters or stop
        if at_eval or step % cfg.log_interval == 0:  # never save without checking the losses
            losses = np.array(jax.device_get(pending))
            if not np.all(np.isfinite(losses)):
                bad = step - len(losses) + 1 + int(np.argmin(np.isfinite(losses)))
                raise FloatingPointError(f"the loss became {losses[~np.isfinite(losses)][0]} at step {bad}: "
                                         f"stopped; the last good checkpoint in {cfg.out_dir}/ is untouched. "
                                         "Try a lower --learning_rate")
            dt = (time.time() - t0) / len(pending)
            eta = (cfg.max_iters - step) * (time.time() - t_start) / (step - start_step)
            lr = float(lr_schedule(step - 1))
            print(f"step {step:5d} | loss {losses[-1]:.4f} | lr {lr:.2e} | {dt * 1000:6.1f} ms/step | "
                  f"{cfg.batch_size * cfg.block_size / dt:8.0f} tok/s | eta {eta / 60:.1f} min")
            for i, l in enumerate(losses):  # every step's loss, for exact comparisons between runs
                log(step=step - len(losses) + 1 + i, loss=float(l))
            log(step=step, lr=lr, ms_per_step=dt * 1000)
            pending, t0 = [], time.time()
        if at_eval:
            val = evaluate()
            if not np.isfinite(val):
                raise FloatingPointError(f"the validation loss became {val} at step {step}: stopped; "
                                         f"the last good checkpoint in {cfg.out_dir}/ is untouched")
            print(f"step {step:5d} | val loss {val:.4f} | saved {save_checkpoint()}")
            log(step=step, val_loss=val)
            t0 = time.time()  # evaluation and saving are not training time
    if stop:
        print(f"stopped by signal at step {step}; resume with: python train.py --resume "
              f"--out_dir={cfg.out_dir} (and the same flags)")
        return
    peak = (jax.devices()[0].memory_stats() or {}).get('peak_bytes_in_use')  # GPU/TPU only
    print(f"trained {step - start_step} steps in {(time.time() - t_start) / 60:.1f} min"
          + (f"; peak device memory {peak / 2**30:.2f} GiB" if peak else ''))

    if cfg.sample_tokens:
        logits_fn = shard.make_logits(graphdef, specs, mesh, cfg.dtype)
        ids = sample.generate(logits_fn, params, [tok.eot], cfg.sample_tokens, cfg.block_size,
                              vocab_size, temperature=0.8, top_k=200, key=key)
        print('sample:\n' + tok.decode(ids[0][1:]))


if __name__ == '__main__':
    main(sys.argv[1:])
