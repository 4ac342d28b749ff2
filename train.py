"""Train a GPT. `python train.py` trains a small one on the standard library's source, on CPU, in
minutes; `--preset=shakespeare` is nanoGPT's baby GPT; `--preset=gpt2` is GPT-2 124M.

    python train.py --help                       # every flag: what it does, its default, choices
    python train.py --preset=shakespeare --mesh=data=4,model=2 --max_iters=2000
    python train.py --bench                      # time the step: ms, tokens/s, MFU, memory
    python train.py --init_from=gpt2 --data=my.txt --block_size=256     # fine-tune GPT-2's weights
    python train.py --eval_only --resume         # val loss, perplexity, bits per byte

A script in the order of a run (`run`, below): check the flags, read the data, claim the out_dir,
build the sharded model and its optimizer, resume, then the loop (log, evaluate, checkpoint),
then a sample. Every step is one call of the compiled shard_map step in shard.py. A checkpoint
holds everything the next step depends on (params, optimizer state, step, PRNG key, data cursor,
config), so --resume continues exactly.

Needs: model.py (GPTConfig), data.py (tokens, batches), shard.py (mesh, params, the step),
optim.py (AdamW and its schedule), checkpoint.py (the out_dir on disk), hf.py (GPT-2's weights),
sample.py (the closing sample), perf.py (speed, --bench), processes.py (--distributed), flags.py
(the command line).
"""
import contextlib
import dataclasses
import os
import signal
import sys
import time
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import numpy as np
from jax.experimental.multihost_utils import process_allgather
from jax.sharding import PartitionSpec as P

import checkpoint
import data
import flags
import hf
import optim
import perf
import processes
import sample
import shard
from flags import flag
from model import GPTConfig

CACHE_DIR = os.path.join(os.path.expanduser('~'), '.cache', 'jaxgpt')
SIGNALS = []  # each SIGTERM or Ctrl-C: one whose exception a gc callback swallowed still stops
POSITIVE, COUNT = '[1, 2**24]', '[0, 2**31)'  # sizes that fit memory; steps that fit int32


@dataclass
class Config:
    # data
    data: str = flag('stdlib', 'stdlib, shakespeare, a file, folder or glob, or train.bin/val.bin')
    tokenizer: str = flag('byte', 'how text becomes token ids', choices=('byte', 'gpt2'))
    cache_dir: str = flag(CACHE_DIR, 'where tokenized text is kept, keyed by its contents')
    # the model: the fields of model.GPTConfig, but vocab_size, which the tokenizer sets
    block_size: int = flag(128, 'the context length, in tokens', within=POSITIVE)
    n_layer: int = flag(4, 'transformer blocks', within=POSITIVE)
    n_head: int = flag(4, 'attention heads per block', within=POSITIVE)
    n_embd: int = flag(128, 'the width of the residual stream', within=POSITIVE)
    dropout: float = flag(0.0, 'the dropout rate, in training (attention too)', within='[0, 1)')
    bias: bool = flag(True, 'biases in Linear layers and LayerNorms, as GPT-2')
    window: int = flag(0, 'a sliding window: each query sees this many newest positions; 0: all',
                       within='[0, 2**24]')
    pos: str = flag('learned', "positions: GPT-2's learned wpe, or rotary (RoPE, in attention)",
                    choices=('learned', 'rope'))
    # how to compute it: the defaults are what measured fastest (README: Performance)
    dtype: str = flag('', "the compute dtype; '': bf16 where native, else float32",
                      choices=('bfloat16', 'float32', ''))
    master_weights: bool = flag(True, 'keep float32 params for the optimizer; False: bf16 only')
    attention: str = flag('', "'': cudnn on NVIDIA GPUs in bf16, else xla",
                          choices=('xla', 'blockwise', 'cudnn', ''))
    remat: str = flag('none', 'recompute in the backward pass (dots: keep matmul outputs)',
                      choices=('none', 'block', 'dots'))
    unroll: bool = flag(None, 'compile every layer, not one block in a loop; unset: on for CPUs')
    mesh: str = flag('', "devices as data=N,model=M; '': every device on data, of every process")
    distributed: str = flag('', "auto (SLURM, TPU pods), or process 0's HOST:PORT,count,this id")
    fsdp: bool = flag(False, "also split weights, float32 masters and Adam's moments over data")
    peer_timeout: int = flag(60, 'seconds to wait for a process that has not joined or answered',
                             within='[1, 86400]')
    # optimization
    batch_size: int = flag(32, 'sequences per step, all devices and micro-batches', within=POSITIVE)
    grad_accum: int = flag(1, 'micro-batches per step, scanned in sequence', within=POSITIVE)
    max_iters: int = flag(600, 'training steps', within=COUNT)
    learning_rate: float = flag(2e-3, 'the peak learning rate, after warmup', within='(0, 100]')
    min_lr: float = flag(2e-4, 'the cosine decay ends here, at max_iters', within='[0, 100]')
    warmup_iters: int = flag(50, 'steps of linear warmup', within=COUNT)
    weight_decay: float = flag(0.1, 'AdamW\'s, on matrices only', within='[0, 100]')
    beta1: float = flag(0.9, 'Adam\'s decay of the mean gradient', within='[0, 1)')
    beta2: float = flag(0.95, 'Adam\'s decay of the mean squared gradient', within='[0, 1)')
    grad_clip: float = flag(1.0, 'clip the gradients to this global norm', within='(0, 1e6]')
    prune: float = flag(0.0, "prune the layers' matmul weights to this sparsity, by magnitude",
                        within='[0, 1)')
    prune_interval: int = flag(10, 'steps between recomputing the pruning masks', within=POSITIVE)
    seed: int = flag(1337, 'seeds the weights, the batches and dropout', within='[0, 2**63)')
    # logging, evaluation, checkpoints
    out_dir: str = flag('out', 'where checkpoints and metrics.jsonl go')
    log_interval: int = flag(50, 'steps between log lines', within=POSITIVE)
    eval_interval: int = flag(200, 'steps between evaluations and checkpoints', within=POSITIVE)
    eval_iters: int = flag(10, 'batches per validation estimate', within=POSITIVE)
    keep_checkpoints: int = flag(3, 'the newest checkpoints kept', within=POSITIVE)
    resume: bool = flag(False, 'continue from the newest checkpoint in out_dir')
    init_from: str = flag('', "start from a GPT-2 folder (config.json, model.safetensors)")
    eval_only: bool = flag(False, 'print the val loss, perplexity and bits per byte, then exit')
    overwrite: bool = flag(False, "start afresh in an out_dir with checkpoints: they go later")
    sample_tokens: int = flag(200, 'tokens sampled at the end; 0 for none', within=COUNT)
    bench: bool = flag(False, 'time the step (compile, ms, tokens/s, MFU, memory), then exit')
    profile: str = flag('', 'with --bench: a folder to write a jax.profiler trace of 3 steps to')
    memory_profile: str = flag('', "after the first step, write the device memory's profile "
                               "(pprof) to this file")
    preset: str = flag('', 'several flags at once (below); your flags go on top')


PRESETS = {
    # nanoGPT's config/train_shakespeare_char.py; bytes of this ASCII text are its characters
    'shakespeare': dict(data='shakespeare', block_size=256, n_layer=6, n_head=6, n_embd=384,
                        dropout=0.2, bias=False, batch_size=64, max_iters=5000,
                        learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, beta2=0.99,
                        log_interval=10, eval_interval=250, eval_iters=200),
    # GPT-2 124M with nanoGPT's config/train_gpt2.py schedule (~0.5M tokens a step), but with
    # biases (bias=True), as GPT-2 was, so its released weights load (--init_from).
    # grad_accum is per device: 40 micro-batches of 12 on one GPU; on 8 pass --grad_accum=5
    'gpt2': dict(tokenizer='gpt2', block_size=1024, n_layer=12, n_head=12, n_embd=768,
                 remat='block', batch_size=480, grad_accum=40, max_iters=600000,
                 learning_rate=6e-4, min_lr=6e-5, warmup_iters=2000, eval_interval=1000,
                 eval_iters=100, log_interval=10),
}
PRESETS['gpt2-medium'] = dict(PRESETS['gpt2'], n_layer=24, n_head=16, n_embd=1024,
                              learning_rate=3e-4, min_lr=3e-5)  # GPT-2 350M

# Flags that say how or where to compute, not what: all others must match to --resume a run.
HOW = {'cache_dir', 'dtype', 'attention', 'remat', 'unroll', 'mesh', 'fsdp', 'distributed',
       'peer_timeout', 'grad_accum', 'out_dir', 'log_interval', 'eval_interval', 'eval_iters',
       'keep_checkpoints', 'resume', 'overwrite', 'sample_tokens', 'bench', 'profile', 'preset',
       'eval_only', 'memory_profile'}


def model_config(cfg, vocab_size, fsdp=1):  # the flags that name GPTConfig's fields -> GPTConfig
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(GPTConfig)
              if f.name not in ('vocab_size', 'fsdp')}
    return GPTConfig(**fields, vocab_size=vocab_size, fsdp=fsdp)


def params_dtype(cfg):  # float32 master copies, or the compute dtype itself
    return 'float32' if cfg.master_weights else cfg.dtype


def check_inputs(cfg):
    """Every check that needs no device, so each process fails at once with the same line, before
    it joins the others. -> the tokenizer (with --init_from, config.json's, and its shape)."""
    vocab_size = None
    if cfg.init_from:  # the weights set the model's shape; the context may be cut (wpe is cropped)
        fields, cfg.tokenizer = hf.read_config(cfg.init_from)
        if cfg.block_size > fields['block_size']:
            raise ValueError(f"--block_size={cfg.block_size} is longer than {cfg.init_from}'s "
                             f"{fields['block_size']}")
        cfg.n_layer, cfg.n_head, cfg.n_embd = fields['n_layer'], fields['n_head'], fields['n_embd']
        cfg.bias, vocab_size = fields['bias'], fields['vocab_size']
    tok = data.get_tokenizer(cfg.tokenizer)
    if vocab_size not in (None, tok.vocab_size):
        raise ValueError(f"{cfg.init_from} has a vocabulary of {vocab_size}, the "
                         f"{cfg.tokenizer} tokenizer {tok.vocab_size}")
    shard.check_divisible(cfg)
    if cfg.pos == 'rope' and (cfg.n_embd // cfg.n_head % 2 or cfg.init_from):
        raise ValueError("--pos=rope rotates pairs of dimensions, and needs an even head size "
                         "(n_embd / n_head) and no --init_from (GPT-2 learned its positions)")
    has_checkpoints = bool(checkpoint.in_folder(cfg.out_dir))
    if cfg.resume and not has_checkpoints:
        raise ValueError(f"--resume: no checkpoint in {cfg.out_dir}/: drop --resume to start a "
                         "new run")
    if has_checkpoints and not (cfg.resume or cfg.overwrite or cfg.bench or cfg.eval_only):
        owner = checkpoint.holder(cfg.out_dir)
        if owner:  # then --resume and --overwrite would be refused too: say what is so
            raise ValueError(f"{cfg.out_dir}/ is in use by a live run (process {owner}): let it "
                             "finish, stop it, or pass another --out_dir")
        raise ValueError(f"{cfg.out_dir}/ already holds checkpoints: pass --resume to continue, "
                         "another --out_dir, or --overwrite to delete them")
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume and --overwrite contradict each other: drop one of them")
    if cfg.eval_only and not (cfg.resume or cfg.init_from):  # else: untrained weights
        raise ValueError("--eval_only evaluates trained weights: add --resume (out_dir's newest "
                         "checkpoint) or --init_from")
    if not cfg.cache_dir:  # Path('') is the current folder
        raise ValueError("--cache_dir is empty: pass a folder for the tokenized text")
    if cfg.profile and not cfg.bench:
        raise ValueError("--profile traces --bench's steps: add --bench, or drop --profile")
    perf.check_profiles(cfg.profile, cfg.memory_profile)
    return tok


def check_devices(cfg, tok):  # the checks that need the devices, and the defaults they set
    shard.all_devices()
    if not cfg.dtype:
        cfg.dtype, why = perf.default_dtype(jax.default_backend(), perf.cpu_features())
        print(f"{cfg.dtype} compute: {why} (--dtype to choose)")
    if not cfg.attention:
        on_gpu = jax.default_backend() == 'gpu' and cfg.dtype == 'bfloat16'
        cfg.attention = 'cudnn' if on_gpu and not cfg.dropout else 'xla'
    if cfg.attention == 'cudnn' and (jax.default_backend() != 'gpu' or cfg.dropout):
        raise ValueError(f"--attention=cudnn needs an NVIDIA GPU (this machine computes on "
                         f"{jax.default_backend()}) and --dropout=0 (the kernel has no attention "
                         "dropout): use --attention=xla or blockwise")
    if cfg.unroll is None:
        cfg.unroll = jax.default_backend() == 'cpu'
    mesh = shard.make_mesh(cfg.mesh)
    model_cfg = model_config(cfg, tok.vocab_size, mesh.shape['data'] if cfg.fsdp else 1)
    shard.check_divisible(model_cfg, mesh.shape['model'])
    per_step = mesh.shape['data'] * cfg.grad_accum
    if cfg.batch_size % per_step:
        raise ValueError(f"--batch_size={cfg.batch_size} is not divisible by data axis x "
                         f"grad_accum = {per_step}: use a multiple of {per_step}, or a smaller "
                         "--grad_accum")
    return model_cfg, mesh


def load_data(cfg, tok):  # -> train and val Batches
    train_tokens, val_tokens = data.load_tokens(cfg.data, cfg.tokenizer, cfg.cache_dir)
    if max(t.max(initial=0) for t in (train_tokens, val_tokens)) >= tok.vocab_size:  # memmapped
        raise ValueError(f"--data={cfg.data} holds token ids beyond the {cfg.tokenizer} "
                         f"tokenizer's {tok.vocab_size}: pass the --tokenizer it was made with, or "
                         "delete a damaged cache folder to tokenize again")
    return (data.Batches(train_tokens, cfg.block_size, cfg.batch_size, cfg.seed, 'train'),
            data.Batches(val_tokens, cfg.block_size, cfg.batch_size, cfg.seed, 'val'))


def claim_out_dir(cfg):
    """The first write, once every input has been checked: out_dir, and its lock (one run at a
    time). -> the lock, or None for processes but 0, --bench and --eval_only (no writes)."""
    if cfg.bench or cfg.eval_only:
        return None
    checkpoint.make_out_dir(cfg.out_dir)
    lock, owner = checkpoint.lock(cfg.out_dir) if jax.process_index() == 0 else (None, None)
    refused = np.int32(jax.process_index() == 0 and lock is None)
    if process_allgather(refused).max():  # every process learns what process 0 found
        raise ValueError(f"{cfg.out_dir}/ is in use by a live run (process "
                         f"{owner or 'of process 0'}): let it finish, stop it, or pass another "
                         "--out_dir")
    check_inputs(cfg)  # again, now that the folder is ours: a run may have saved there meanwhile
    return lock


def resume(cfg, model_cfg, tokens_crc, params, opt_state):
    """-> params, opt_state, step, cursor, key of the newest checkpoint in out_dir."""
    path = checkpoint.in_folder(cfg.out_dir)[-1]
    arrays, meta = checkpoint.read(path)
    checkpoint.check_meta(meta, path)
    checkpoint.check_finite(arrays, path)
    # a flag the checkpoint lacks (an older version's, or a damaged header) had its default
    saved = {f.name: f.default for f in dataclasses.fields(Config)} | meta['config']
    how = HOW - {'grad_accum'} if cfg.dropout else HOW  # micro-batches draw their own masks
    how = how if cfg.master_weights else how - {'dtype'}  # then also the params' dtype
    changed = {k: v for k, v in saved.items()
               if k not in how and k in vars(cfg) and v != getattr(cfg, k)}
    if changed:
        flags_given = ', '.join(f"--{k}={v}" for k, v in changed.items())
        raise ValueError(f"{path} was trained with {flags_given}: pass the same flags (or its "
                         "--preset) to continue it exactly")
    implied = {k: v for k, v in dataclasses.asdict(model_cfg).items() if k not in HOW}
    checkpoint.check_same_run(meta, path, implied, tokens_crc)
    state = shard.place(arrays, {'params': params, 'opt': opt_state})
    key = jax.random.wrap_key_data(np.array(meta['key'], np.uint32))
    print(f"resumed from {path} at step {meta['step']}")
    return state['params'], state['opt'], meta['step'], meta['cursor'], key


def print_header(cfg, mesh, params, opt_state, batches, n_params):
    device = jax.devices()[0]
    without_wpe = n_params - (cfg.block_size * cfg.n_embd if cfg.pos == 'learned' else 0)
    print(f"mesh: {dict(mesh.shape)} over {mesh.devices.size} {device.platform} device(s) "
          f"({device.device_kind})")
    print(f"model: {n_params / 1e6:.2f}M params ({without_wpe:,} without position embeddings), "
          f"{cfg.dtype} compute, {params_dtype(cfg)} params, {cfg.attention} attention, remat "
          f"{cfg.remat}, layers {'unrolled' if cfg.unroll else 'scanned'}"
          + (', FSDP' if cfg.fsdp else ''))
    print(f"memory per device: params {shard.per_device_bytes(params) / 2**20:.1f} MiB, "
          f"optimizer state {shard.per_device_bytes(opt_state) / 2**20:.1f} MiB")
    n_train, n_val = (len(b.tokens) for b in batches)
    print(f"data: {n_train:,} train and {n_val:,} val tokens; "
          f"{cfg.batch_size * cfg.block_size:,} tokens per step")


def feed(batches, mesh):
    """-> next_batch(cursor) -> (the global (B, T+1) batch, split over 'data'; the next cursor).
    Each process reads the rows its devices hold; JAX assembles the global array from them."""
    sharding, shape = jax.NamedSharding(mesh, P('data')), (batches.B, batches.T + 1)
    held = [index[0].indices(batches.B) for index in
            sharding.addressable_devices_indices_map(shape).values()]
    rows = slice(min(start for start, _, _ in held), max(stop for _, stop, _ in held))

    def next_batch(cursor):
        local, cursor = batches.get(cursor, rows)
        return jax.make_array_from_process_local_data(sharding, local, shape), cursor
    return next_batch


def mean_val_loss(eval_loss, params, next_val_batch, cfg):  # over eval_iters fixed batches
    both = [eval_loss(params, next_val_batch(i * cfg.batch_size)[0])
            for i in range(cfg.eval_iters)]
    return np.mean(jax.device_get(both), 0).tolist()  # [loss, accuracy]


def report_eval(cfg, eval_loss, params, batches, tok, mesh):
    """--eval_only: the val loss, its perplexity, bits per byte (the loss in bits, spread over
    the bytes of the text it predicted, which compares a byte model with a BPE one) and accuracy."""
    loss, accuracy = mean_val_loss(eval_loss, params, feed(batches, mesh), cfg)
    n_bytes = sum(tok.token_bytes[batches.get(i * cfg.batch_size)[0][:, 1:]].sum()
                  for i in range(cfg.eval_iters))
    n_tokens = cfg.eval_iters * cfg.batch_size * cfg.block_size
    bits_per_byte = loss * n_tokens / n_bytes / np.log(2)
    print(f"val loss {loss:.4f} | perplexity {np.exp(loss):.2f} | {bits_per_byte:.4f} bits per "
          f"byte | next-token accuracy {accuracy:.1%} | over {cfg.eval_iters} batches: "
          f"{n_tokens:,} tokens, {n_bytes:,} bytes of text")


def save_checkpoint(cfg, model_cfg, tokens_crc, lock, replacing, params, opt_state, step, cursor,
                    key):
    """Write out_dir/ckpt_STEP.npz, gathered from every device of every process (process 0
    writes), and keep the newest keep_checkpoints. The first save of a run that replaces an old
    one (--overwrite) deletes the old run's checkpoints, listed in `replacing`, and puts its own
    log in place: until then the old run is whole. -> the path."""
    arrays = shard.gather({'params': params, 'opt': opt_state})
    meta = dict(step=step, cursor=cursor, key=jax.random.key_data(key).tolist(),
                config=vars(cfg), model=dataclasses.asdict(model_cfg),
                params_dtype=params_dtype(cfg), tokens_crc=tokens_crc)
    path = checkpoint.path_for(cfg.out_dir, step)
    if not lock:
        return path
    try:
        checkpoint.remove_killed_saves(cfg.out_dir)  # their space is needed now
        checkpoint.save(path, arrays, meta)
    except OSError as e:  # an --overwrite run's first save: the old run is still the folder's
        newest = (checkpoint.in_folder(cfg.out_dir) or ['none'])[-1]
        then = '--overwrite again' if replacing else '--resume'
        raise ValueError(f"could not write {path} ({e.strerror}): free some space, then {then}; "
                         f"the newest checkpoint is still {newest}") from None
    checkpoint.rotate(cfg.out_dir, path, replacing, cfg.keep_checkpoints)
    return path


def check_finite(what, values, step, out_dir):  # values: those of the steps up to `step`
    if not np.all(np.isfinite(values)):
        first_bad = int(np.argmin(np.isfinite(values)))
        raise FloatingPointError(f"the {what} became {values[first_bad]} at step "
                                 f"{step - len(values) + 1 + first_bad}: stopped; the last good "
                                 f"checkpoint in {out_dir}/ is untouched. Try a lower "
                                 "--learning_rate")


def train(cfg, train_step, next_batch, evaluate, save, log, speed, params, opt_state, step,
          cursor, key):
    """The loop, from `step` to max_iters, one compiled step per batch: every log_interval the
    losses are read back, checked, logged; every eval_interval (and at the end) an evaluation and
    a checkpoint. SIGTERM or Ctrl-C: after this step (with other processes: at the next log step),
    check, save and return None, without evaluating (a pre-empted job has seconds). -> params."""
    stop = SIGNALS  # the signal handlers' flag, with any that came before the loop
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(True))
    lr = optim.lr_schedule(cfg)
    first_step, pending = step, []  # pending: the losses not yet read back from the device
    t_start = t_log = time.perf_counter()
    while step < cfg.max_iters:
        batch, cursor = next_batch(cursor)
        params, opt_state, loss = train_step(params, opt_state, batch,
                                             jax.random.fold_in(key, step))
        pending.append(loss)  # read back only at log time, so the host never waits on the device
        perf.trim_heap()
        step += 1
        if step == first_step + 1 and cfg.memory_profile:  # all the loop keeps is live by now
            jax.profiler.save_device_memory_profile(cfg.memory_profile)
        at_eval = step % cfg.eval_interval == 0 or step == cfg.max_iters
        # a signal: alone, stop after this step; with other processes, where they all meet
        stop_now = stop and jax.process_count() == 1
        if not (at_eval or step % cfg.log_interval == 0 or stop_now):
            continue
        # never save unchecked losses; all processes agree to stop here, where they wait anyway
        stopping = process_allgather(np.int32(len(stop))).max() > 0
        losses = np.array(jax.device_get(pending))
        check_finite('loss', losses, step, cfg.out_dir)
        seconds = (time.perf_counter() - t_log) / len(losses)
        eta = (cfg.max_iters - step) * (time.perf_counter() - t_start) / (step - first_step)
        rate = float(lr(step - 1))
        print(f"step {step:5d} | loss {losses[-1]:.4f} | lr {rate:.2e} | {speed(seconds)} | "
              f"eta {eta / 60:.1f} min")
        for i, step_loss in enumerate(losses):  # every step's loss, for exact comparisons
            log(step=step - len(losses) + 1 + i, loss=float(step_loss))
        log(step=step, lr=rate, ms_per_step=seconds * 1000,
            tokens=step * cfg.batch_size * cfg.block_size)  # tokens seen, for viz.py's plots
        pending, t_log = [], time.perf_counter()
        if stopping:
            path = save(params, opt_state, step, cursor, key)
            print(f"stopped by signal at step {step}; saved {path}; resume with: python train.py "
                  f"--resume --out_dir={cfg.out_dir} (and the same flags)")
            return None
        if at_eval:
            val, accuracy = evaluate(params)
            check_finite('validation loss', np.array([val]), step, cfg.out_dir)
            print(f"step {step:5d} | val loss {val:.4f} | accuracy {accuracy:.1%} | saved "
                  f"{save(params, opt_state, step, cursor, key)}")
            log(step=step, val_loss=val, val_accuracy=accuracy)
            t_log = time.perf_counter()  # evaluation and saving are not training time
    for sig in (signal.SIGTERM, signal.SIGINT):  # from here on, a signal stops the run at once
        signal.signal(sig, stop_before_training)
    peak = perf.device_memory('peak_bytes_in_use')
    print(f"trained {step - first_step} steps in {(time.perf_counter() - t_start) / 60:.1f} min"
          + (f"; peak device memory {peak / 2**30:.2f} GiB" if peak else ''))
    return params


def closing_sample(cfg, model_cfg, mesh, params, tok, key):
    """sample_tokens tokens, with whole weights (FSDP's split is for training)."""
    whole_cfg = dataclasses.replace(model_cfg, fsdp=1)
    graphdef, whole, specs = shard.init_params(whole_cfg, mesh, 0, params_dtype(cfg))
    params = shard.relayout(params, whole)
    generate = sample.make_sampler(graphdef, specs, mesh, whole_cfg, cfg.dtype, temperature=0.8,
                                   top_k=200)
    ids = [int(next_ids[0]) for next_ids, _ in generate(params, [tok.eot], cfg.sample_tokens, key)]
    print('sample:\n' + tok.decode(ids))


def run(cfg):
    tok = check_inputs(cfg)
    processes.start(cfg.distributed, cfg.peer_timeout,
                    {k: v for k, v in vars(cfg).items() if k not in HOW})
    model_cfg, mesh = check_devices(cfg, tok)
    train_batches, val_batches = load_data(cfg, tok)
    tokens_crc = [zlib.crc32(b.tokens) for b in (train_batches, val_batches)]  # what was trained on
    gpt2 = hf.read_weights(cfg.init_from, model_cfg) if cfg.init_from and not cfg.resume else None
    lock = claim_out_dir(cfg)

    jax.set_mesh(mesh)
    graphdef, params, specs = shard.init_params(model_cfg, mesh, cfg.seed, params_dtype(cfg))
    tx = optim.make_optimizer(cfg, params)
    opt_state = jax.jit(tx.init)(params)
    step, cursor, key = 0, 0, jax.random.key(cfg.seed)
    if cfg.resume:
        params, opt_state, step, cursor, key = resume(cfg, model_cfg, tokens_crc, params, opt_state)
    elif cfg.init_from:
        params = hf.load(gpt2, params)
        print(f"loaded the weights of {cfg.init_from}")
    # --overwrite: the old run's checkpoints, deleted only once this run has saved its first
    fresh_over_old = cfg.overwrite and lock and not cfg.resume
    replacing = checkpoint.in_folder(cfg.out_dir) if fresh_over_old else []
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print_header(cfg, mesh, params, opt_state, (train_batches, val_batches), n_params)

    eval_loss = shard.make_loss(graphdef, specs, mesh, cfg.dtype, cfg.grad_accum)
    if cfg.eval_only:
        report_eval(cfg, eval_loss, params, val_batches, tok, mesh)
        return
    next_batch = feed(train_batches, mesh)
    # the step, compiled ahead of time: compilation is reported once, not hidden in step one
    train_step = shard.make_train_step(graphdef, specs, mesh, tx, cfg.dtype, cfg.grad_accum,
                                       cfg.dropout > 0)
    t0 = time.perf_counter()
    train_step = train_step.lower(params, opt_state, next_batch(0)[0], key).compile()
    print(f"compiled the training step in {time.perf_counter() - t0:.1f} s")
    perf.keep_freed_memory(step=train_step)  # on a CPU, where the memory allows
    flops = perf.step_flops(model_cfg, cfg.batch_size, n_params)
    speed = perf.make_speed(cfg.batch_size * cfg.block_size, flops, cfg.dtype, mesh.devices.size)
    if cfg.bench:
        perf.benchmark(train_step, params, opt_state, next_batch, key, speed, flops, cfg.dtype,
                       cfg.profile)
        return

    evaluate = partial(mean_val_loss, eval_loss, next_val_batch=feed(val_batches, mesh), cfg=cfg)
    save = partial(save_checkpoint, cfg, model_cfg, tokens_crc, lock, replacing)
    log = (checkpoint.open_log(cfg.out_dir, cfg.resume, step, bool(replacing)) if lock
           else lambda **row: None)  # only the process that writes keeps metrics.jsonl
    try:
        params = train(cfg, train_step, next_batch, evaluate, save, log, speed,
                       params, opt_state, step, cursor, key)
    finally:  # an --overwrite run stopped before its first save: the old run's folder as it was
        if replacing:
            Path(cfg.out_dir, 'metrics.jsonl.next').unlink(missing_ok=True)
    if params is not None and cfg.sample_tokens:
        closing_sample(cfg, model_cfg, mesh, params, tok, key)


def stop_before_training(*_):  # SIGTERM outside the loop's own handlers: as Ctrl-C
    SIGNALS.append(True)
    raise KeyboardInterrupt


def main(argv):
    perf.keep_freed_memory()  # before jax starts its threads
    cfg = flags.parse('train.py', argv, Config(), PRESETS)
    SIGNALS.clear()  # a run in the same process before this one (the tests) leaves none
    for sig in (signal.SIGTERM, signal.SIGINT):  # Ctrl-C too: Python's own records nothing
        signal.signal(sig, stop_before_training)
    try:
        return run(cfg)
    except (ValueError, FloatingPointError) as e:  # bad input: one line, nothing overwritten
        problem = str(e)
    except KeyboardInterrupt:
        problem = "stopped by a signal outside the loop: every checkpoint saved is whole"
    except OSError as e:  # the outside world: a full disk, a file that cannot be opened
        where = e.filename or f'a file in {cfg.out_dir}/'  # a write's error names no file
        newest = checkpoint.in_folder(cfg.out_dir)  # an --overwrite run's may be the old run's
        then = f' (--resume continues from {newest[-1].name})' if newest else ''
        problem = f"{e.strerror}: {where}: fix the path, or free some space, then run again{then}"
        if isinstance(e, BrokenPipeError):  # stdout a pipe whose reader ended (`| head`)
            problem = f"its output was closed (a pipe's reader ended): run again{then}"

    except jax.errors.JaxRuntimeError as e:
        if 'RESOURCE_EXHAUSTED' in str(e):
            problem = ("out of device memory: make the model, --batch_size or --block_size "
                       "smaller, or use --grad_accum, --remat=block or --fsdp")
        elif cfg.distributed:  # a collective with a process that died (its socket closed)
            problem = (f"another process stopped ({str(e).splitlines()[0][:120]}): see its log; "
                       "then start every process again, with --resume")
        else:
            raise
    with contextlib.suppress(OSError):  # stdout may be the closed pipe
        sys.stdout.flush()
    print(flags.one_line(f"train.py: {problem}"), file=sys.stderr, flush=True)
    # Skip Python's exit: its teardown can crash after a signal stopped C++ code mid-way, and
    # with other processes JAX's would wait for them (and the watchdog's line would follow).
    os._exit(1)


if __name__ == '__main__':
    main(sys.argv[1:])
