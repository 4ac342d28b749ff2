"""Sample text from a trained checkpoint, with a KV cache.

    python sample.py                                   # from out/, the default run's folder
    python sample.py --start="def main(" --num_samples=3 --max_new_tokens=200
    python sample.py --start=FILE:prompt.txt --temperature=0 --seed=1   # greedy
    python sample.py --init_from=gpt2 --top_p=0.9      # GPT-2's weights, in Hugging Face's layout
    python sample.py --quantize=int8                   # int8 weights
    python sample.py --export=my-gpt2                  # the checkpoint as GPT-2, for transformers

The model and tokenizer come from the checkpoint's saved config; the weights are loaded onto a
mesh of all devices (--mesh as in training, e.g. model=2 to split a big model) and run through
the same shard_map code as training. The first sample is printed as it is produced.

Needs: model.py (GPTConfig), shard.py (mesh, params), checkpoint.py (reading one), hf.py
(GPT-2's weights), int8.py (--quantize), data.py (tokenizers), flags.py (the command line).
"""
import codecs
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

import checkpoint
import data
import flags
import hf
import int8
import shard
from flags import flag
from model import GPTConfig


@dataclass
class SampleConfig:
    out_dir: str = flag('out', 'the folder train.py wrote its checkpoints to')
    start: str = flag('\n', 'the prompt, or FILE:path to read it from a file')
    num_samples: int = flag(2, 'samples drawn side by side', within='[1, inf)')
    max_new_tokens: int = flag(300, 'tokens to draw per sample', within='[0, 2**31)')
    temperature: float = flag(0.8, 'below 1 sharper, above 1 wilder, 0 greedy', within='[0, 1e6]')
    top_k: int = flag(200, 'keep the k most likely tokens; 0 keeps all', within='[0, inf)')
    top_p: float = flag(1.0, 'keep the fewest likeliest tokens holding top_p', within='(0, 1]')
    seed: int = flag(1337, 'seeds the draws', within='[0, 2**63)')
    mesh: str = flag('', 'e.g. model=2 to split a big model; empty: every device on data')
    init_from: str = flag('', "a GPT-2 folder (config.json, model.safetensors) to sample instead")
    dtype: str = flag('', "the compute dtype; '': the weights' own",
                      choices=('bfloat16', 'float32', ''))
    quantize: str = flag('', "int8: the layers' matmul weights as int8", choices=('int8', ''))
    export: str = flag('', "write the checkpoint to this folder as GPT-2 (Hugging Face), exit")
    cache: bool = flag(True, 'False reruns the whole context for every new token (to compare)')


# --- the next token -------------------------------------------------------------------------------
def pick(logits, key, temperature, top_k, top_p):
    """(N, vocab) float32 logits -> (N,) next ids. temperature 0 is greedy (and below 1e-6, where
    logits / temperature would overflow float32); top_k keeps the k most likely tokens (0: all);
    top_p keeps the fewest whose probabilities add up to top_p (nucleus)."""
    if temperature < 1e-6:
        return jnp.argmax(logits, -1)
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1:
        ranked = jnp.sort(logits, -1)[:, ::-1]  # descending
        p = jax.nn.softmax(ranked, -1)
        keep = jnp.sum(jnp.cumsum(p, -1) - p < top_p, -1)  # those with < top_p mass before them
        smallest_kept = jnp.take_along_axis(ranked, keep[:, None] - 1, -1)
        logits = jnp.where(logits < smallest_kept, -jnp.inf, logits)
    return jax.random.categorical(key, logits)


# --- the KV-cache sampler -------------------------------------------------------------------------
CACHE = P(None, None, None, 'model', None)  # (L, N, S, heads, head_dim): heads split, as attention


def make_sampler(graphdef, specs, mesh, cfg, dtype, temperature=1.0, top_k=0, top_p=1.0):
    """-> generate(params, prompt, max_new_tokens, key, num_samples=1, cached=True), which yields
    (next ids (N,), their logits (N, vocab)) once per new token. With the cache, one pass over the
    prompt fills it, then each step runs the newest token alone; a full cache (block_size) is
    refilled with the newest half of the text, recomputed at its new positions. A sliding window
    W needs only W slots, a ring; with RoPE (no wpe to run out of) it is never refilled.
    cached=False reruns the newest block_size tokens for every token: the same tokens, to test
    and time."""
    def local(params, idx, cache, start, last, key, i):  # idx (N, T): tokens at start..start+T-1
        logits, cache = nnx.merge(graphdef, params)(idx, cache=cache, start=start)
        logits = logits[:, last, :cfg.vocab_size]  # (N, vocab) at idx[:, last], padding dropped
        next_ids = pick(logits, jax.random.fold_in(key, i), temperature, top_k, top_p)
        return next_ids, logits, cache

    # The model axis splits the cache by heads; the samples are replicated over 'data'.
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(specs, P(), CACHE, P(), P(), P(), P()),
                            out_specs=(P(), P(), CACHE))
    step = jax.jit(sharded, donate_argnums=(2,))  # the cache is updated in place
    S = cfg.block_size
    slots = min(cfg.window or S, S)
    endless = cfg.window and cfg.pos == 'rope'  # positions may grow past block_size

    def generate(params, prompt, max_new_tokens, key, num_samples=1, cached=True):
        shape = (cfg.n_layer, num_samples, slots, cfg.n_head, cfg.n_embd // cfg.n_head)
        cache = tuple(jnp.zeros(shape, dtype, device=jax.NamedSharding(mesh, CACHE))
                      for _ in 'kv')  # a tuple, as the model returns it: one compilation
        # the newest S tokens of each sample: all that a prefill ever reads
        recent = np.tile(np.asarray(prompt, np.int32), (num_samples, 1))[:, -S:]
        params, n = shard.cast(params, dtype), 0  # n: tokens seen, at positions 0..n-1
        for i in range(max_new_tokens):
            if cached and 0 < n and (n < S or endless):  # decode: the newest token, at position n
                next_ids, logits, cache = step(params, recent[:, -1:], cache, n, 0, key, i)
                n += 1
            else:  # prefill: the prompt, a full cache's newest half, or (uncached) everything
                if not cached:
                    n, width = min(recent.shape[1], S), S
                else:
                    n = min(recent.shape[1], S // 2 if n == S else S)
                    width = min(S, 1 << (n - 1).bit_length())  # powers of two: few compilations
                    width = n if width > slots else width  # padding must not wrap round a ring
                window = np.zeros((num_samples, width), np.int32)  # causal: padding never read
                window[:, :n] = recent[:, -n:]
                next_ids, logits, cache = step(params, window, cache, 0, n - 1, key, i)
            next_ids = np.asarray(next_ids, np.int32)
            recent = np.concatenate([recent, next_ids[:, None]], 1)[:, -S:]
            yield next_ids, logits

    return generate


# --- the script -----------------------------------------------------------------------------------
def load_checkpoint(out_dir, mesh):
    """-> (model config, graphdef, params, specs, meta) of the newest checkpoint in out_dir, with
    whole weights (FSDP's split is for training), on `mesh`."""
    paths = checkpoint.in_folder(out_dir)
    if not paths:
        raise ValueError(f"no checkpoint in {out_dir}/: run python train.py first, or pass "
                         "--out_dir")
    arrays, meta = checkpoint.read(paths[-1])
    checkpoint.check_meta(meta, paths[-1])
    meta.setdefault('params_dtype', 'float32')  # an older version's checkpoint lacks it
    try:
        model_cfg = GPTConfig(**{**meta['model'], 'fsdp': 1})
    except TypeError:
        raise ValueError(f"checkpoint {paths[-1]}'s model is not a GPTConfig of this version: "
                         "sample it with the version that trained it") from None
    checkpoint.check_finite(arrays, paths[-1])
    shard.check_divisible(model_cfg, mesh.shape['model'])
    graphdef, params, specs = shard.init_params(model_cfg, mesh, 0, meta['params_dtype'])
    params = shard.place(arrays, {'params': params})['params']
    return model_cfg, graphdef, params, specs, meta


def read_prompt(start):  # --start: the prompt, or FILE:path
    try:
        if start.startswith('FILE:') and not Path(start[5:]).is_file():
            raise FileNotFoundError(2, 'not a file')  # a folder, a device such as /dev/zero
        text = Path(start[5:]).read_text() if start.startswith('FILE:') else start
        text.encode('utf-8')  # a str that is not valid Unicode (lone surrogates) fails here
        return text
    except (OSError, UnicodeError, MemoryError) as e:
        reason = getattr(e, 'strerror', None) or 'not UTF-8 text, or too big'
        raise ValueError(f"--start={start}: cannot read it ({reason}): pass a readable text "
                         "file") from None


def main(argv):
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `sample.py | head`: end quietly, as tools do
    sys.stdout.reconfigure(errors='replace')  # a terminal that is not UTF-8 gets '?', not a crash
    cfg = flags.parse('sample.py', argv, SampleConfig())
    try:
        mesh = shard.make_mesh(cfg.mesh)
        jax.set_mesh(mesh)
        if cfg.init_from:
            model_cfg, graphdef, params, specs, meta = hf.load_model(cfg.init_from, mesh)
        else:
            model_cfg, graphdef, params, specs, meta = load_checkpoint(cfg.out_dir, mesh)
        tokenizer = meta['config']['tokenizer']
        tok = data.get_tokenizer(tokenizer)
        if model_cfg.vocab_size != tok.vocab_size:
            raise ValueError(f"the model's vocabulary of {model_cfg.vocab_size} is not the "
                             f"{tokenizer} tokenizer's {tok.vocab_size}: it cannot be sampled")
        start = read_prompt(cfg.start)
        if cfg.export:
            hf.export(cfg.export, params, model_cfg, tokenizer, tok.eot)
            print(f"wrote {cfg.export}/config.json and model.safetensors (Hugging Face's layout)")
            return
        if cfg.quantize:
            params = int8.quantize(params, mesh)
    except (ValueError, OSError) as e:  # one line, as train.py
        sys.exit(flags.one_line(f"sample.py: {e}"))
    try:
        stream(cfg, tok, start, make_sampler(graphdef, specs, mesh, model_cfg,
                                             cfg.dtype or meta['params_dtype'], cfg.temperature,
                                             cfg.top_k, cfg.top_p), params)
    except jax.errors.JaxRuntimeError as e:
        if 'RESOURCE_EXHAUSTED' not in str(e):
            raise
        sys.exit("sample.py: out of device memory: ask for fewer --num_samples")
    except KeyboardInterrupt:  # Ctrl-C: stop, without Python's teardown mid-way through C++
        print("\nsample.py: stopped", file=sys.stderr, flush=True)
        os._exit(130)


def stream(cfg, tok, start, generate, params):
    """Print the first sample as it comes, through a UTF-8 decoder that holds back a character's
    bytes until it is whole (each token costs the same, however long the text); then the rest."""
    prompt = tok.encode(start).tolist() or [tok.eot]
    print(tok.decode(prompt), end='', flush=True)
    utf8 = codecs.getincrementaldecoder('utf-8')(errors='replace')
    rows = []
    key = jax.random.key(cfg.seed)
    for next_ids, _ in generate(params, prompt, cfg.max_new_tokens, key, cfg.num_samples,
                                cfg.cache):
        rows.append(next_ids)
        print(utf8.decode(tok.to_bytes(next_ids[:1])), end='', flush=True)
    print(utf8.decode(b'', final=True) + '\n---------------')
    samples = np.stack(rows, 1) if rows else np.zeros((cfg.num_samples, 0), np.int32)  # (N, new)
    for row in samples[1:]:
        print(tok.decode(prompt + row.tolist()) + '\n---------------')


if __name__ == '__main__':
    main(sys.argv[1:])
