"""Sample text from a trained checkpoint, with a KV cache.

    python sample.py                                   # from out/, the default run's folder
    python sample.py --start="def main(" --num_samples=3 --max_new_tokens=200
    python sample.py --start=FILE:prompt.txt --temperature=0 --seed=1   # greedy
    python sample.py --init_from=gpt2 --top_p=0.9      # GPT-2's weights, in Hugging Face's layout
    python sample.py --quantize=int8                   # int8 weights
    python sample.py --export=my-gpt2                  # write the checkpoint as GPT-2, for transformers

The model and tokenizer come from the checkpoint's saved config; the weights are loaded
onto a mesh of all devices (--mesh as in training, e.g. model=2 to split a big model), and run
through the same shard_map code as training. The first sample is printed as it is produced.

Needs: model.py (GPTConfig), shard.py (mesh, params, checkpoints, the sampler), data.py (flags,
tokenizers).
"""
import glob
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

import data
import shard
from model import GPTConfig

@dataclass
class SampleConfig:
    out_dir: str = 'out'  # the folder train.py wrote its checkpoints to
    start: str = '\n'  # the prompt, or FILE:path to read it from a file
    num_samples: int = 2
    max_new_tokens: int = 300
    temperature: float = 0.8  # < 1 sharper, > 1 more random, 0 always the most likely token
    top_k: int = 200  # keep the k most likely tokens; 0 keeps all
    top_p: float = 1.0  # keep the fewest most likely tokens whose probabilities reach top_p; 1 keeps all
    seed: int = 1337
    mesh: str = ''
    init_from: str = ''  # sample GPT-2's weights instead: a folder with config.json, model.safetensors
    dtype: str = ''  # bfloat16 | float32; empty: the weights' own (float32 masters: float32, exact)
    quantize: str = ''  # int8: the layers' matmul weights stored as int8 (shard.quantize), for sampling
    export: str = ''  # write the checkpoint as GPT-2 in Hugging Face's layout to this folder, exit
    cache: bool = True  # False reruns the whole context for every new token (to compare)

def check(cfg):
    for name, ok, rule in (('temperature', cfg.temperature >= 0, '>= 0 (0 is greedy)'),
                           ('top_k', cfg.top_k >= 0, '>= 0 (0 keeps every token)'),
                           ('top_p', 0 < cfg.top_p <= 1, 'in (0, 1] (1 keeps every token)'),
                           ('num_samples', cfg.num_samples >= 1, 'at least 1'),
                           ('max_new_tokens', cfg.max_new_tokens >= 0, '>= 0'),
                           ('dtype', cfg.dtype in ('', 'bfloat16', 'float32'), 'bfloat16 or float32'),
                           ('quantize', cfg.quantize in ('', 'int8'), "int8 (or '' for none)")):
        if not ok:
            raise ValueError(f"--{name}={getattr(cfg, name)} must be {rule}")

def main(argv):
    cfg = data.parse_flags(argv, SampleConfig(), presets={})
    try:
        check(cfg)
        if cfg.init_from:
            fields, tokenizer = shard.hf_config(cfg.init_from)
            model_cfg, dtype, storage = GPTConfig(**fields), cfg.dtype or 'float32', 'float32'
        else:
            ckpts = sorted(glob.glob(os.path.join(cfg.out_dir, 'ckpt_*.npz')))
            if not ckpts:
                raise ValueError(f"no checkpoint in {cfg.out_dir}/: run python train.py first, or pass --out_dir")
            arrays, meta = shard.read(ckpts[-1])
            model_cfg, tokenizer = GPTConfig(**{**meta['model'], 'fsdp': 1}), meta['config']['tokenizer']  # whole weights
            storage = shard.storage_dtype(meta['config'])
            dtype = cfg.dtype or storage  # on a CPU also the faster: bf16 weights are widened every token
        tok = data.get_tokenizer(tokenizer)
        start = Path(cfg.start[5:]).read_text() if cfg.start.startswith('FILE:') else cfg.start
        mesh = shard.make_mesh(cfg.mesh)
        shard.check_divisible(model_cfg, mesh)
        jax.set_mesh(mesh)
        graphdef, params, specs = shard.init_params(model_cfg, mesh, 0, storage)
        params = shard.from_hf(cfg.init_from, params, model_cfg) if cfg.init_from else \
            shard.place(arrays, {'params': params})['params']
        if cfg.export:
            shard.export_hf(cfg.export, params, model_cfg, tokenizer)
            return print(f"wrote {cfg.export}/config.json and model.safetensors (Hugging Face's GPT-2 layout)")
        if cfg.quantize:
            params = shard.quantize(params, mesh)
    except (ValueError, OSError) as e:  # one line, as train.py
        sys.exit(f"sample.py: {e}")
    prompt = tok.encode(start).tolist() or [tok.eot]
    generate = shard.make_sampler(graphdef, specs, mesh, model_cfg, dtype, cfg.temperature, cfg.top_k, cfg.top_p)

    rows, shown = [], tok.decode(prompt)
    print(shown, end='', flush=True)
    for nxt, _ in generate(params, prompt, cfg.max_new_tokens, jax.random.key(cfg.seed), cfg.num_samples, cfg.cache):
        rows.append(nxt)
        text = tok.decode(prompt + [r[0] for r in rows])  # the first sample, so far
        if not text.endswith('\ufffd'):  # not in the middle of a multi-byte character
            print(text[len(shown):], end='', flush=True)
            shown = text
    rows = np.stack(rows, 1) if rows else np.zeros((cfg.num_samples, 0), np.int32)
    print(tok.decode(prompt + rows[0].tolist())[len(shown):] + '\n---------------')
    for row in rows[1:]:
        print(tok.decode(prompt + row.tolist()) + '\n---------------')

if __name__ == '__main__':
    main(sys.argv[1:])
