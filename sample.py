"""Sample text from a trained checkpoint.

    python sample.py                                   # from out/, the default run's folder
    python sample.py --start="def main(" --num_samples=3 --max_new_tokens=200
    python sample.py --start=FILE:prompt.txt --temperature=0.8 --top_k=200 --seed=1

The model, tokenizer and dtype come from the checkpoint's saved config; the weights are loaded
onto a mesh of all devices (--mesh as in training, e.g. model=2 to split a big model), and run
through the same shard_map code as training.

Needs: model.py (GPTConfig), shard.py (mesh, params, checkpoint loading), data.py (tokenizers).
"""
import glob
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import jax

import data
import shard
from model import GPTConfig


@dataclass
class SampleConfig:
    out_dir: str = 'out'  # the folder train.py wrote its checkpoints to
    start: str = '\n'  # the prompt, or FILE:path to read it from a file
    num_samples: int = 2
    max_new_tokens: int = 300
    temperature: float = 0.8  # < 1 sharper, > 1 more random
    top_k: int = 200  # 0 keeps every token
    seed: int = 1337
    mesh: str = ''


def main(argv):
    cfg = data.parse_flags(argv, SampleConfig(), presets={})
    ckpts = sorted(glob.glob(os.path.join(cfg.out_dir, 'ckpt_*.npz')))
    if not ckpts:
        sys.exit(f"sample.py: no checkpoint in {cfg.out_dir}/: run python train.py first, or pass --out_dir")
    try:
        arrays, meta = shard.read(ckpts[-1])
        model_cfg, tc = GPTConfig(**meta['model']), meta['config']
        tok = data.get_tokenizer(tc['tokenizer'])
        start = Path(cfg.start[5:]).read_text() if cfg.start.startswith('FILE:') else cfg.start
        mesh = shard.make_mesh(cfg.mesh)
        shard.check_divisible(model_cfg, mesh)
    except (ValueError, OSError) as e:  # one line, as train.py
        sys.exit(f"sample.py: {e}")
    with jax.set_mesh(mesh):
        graphdef, params, specs = shard.init_params(model_cfg, mesh, 0, shard.storage_dtype(tc))
        params = shard.place(arrays, {'params': params})['params']
        prompt = tok.encode(start).tolist() or [tok.eot]
        logits_fn = shard.make_logits(graphdef, specs, mesh, tc['dtype'])
        out = shard.generate(logits_fn, params, prompt, cfg.max_new_tokens, model_cfg.block_size,
                       model_cfg.vocab_size, cfg.temperature, cfg.top_k, jax.random.key(cfg.seed),
                       cfg.num_samples)
    for row in out:
        print(tok.decode(row))
        print('---------------')


if __name__ == '__main__':
    main(sys.argv[1:])
