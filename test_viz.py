"""Tests of viz.py: run with `python -m pytest -q test_viz.py` (needs matplotlib; well under a
minute on two CPU cores).

The attention maps are checked against an independent numpy GPT-2 forward pass, the memory
figures against XLA's analysis of the step bench.py compiles, the loss plot against the rows
written, and each bad input against its one line.
"""
import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                           + ' --xla_force_host_platform_device_count=8')  # as viz.py would

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import bench
import checkpoint
import shard
import viz
from model import GPTConfig

HERE = Path(__file__).parent
PNG = b'\x89PNG\r\n\x1a\n'


def write_metrics(out_dir, steps=120, log_interval=50, tokens_per_step=4096):
    """metrics.jsonl as train.py writes it, and a last line cut short as by a live run."""
    lines = []
    for step in range(1, steps + 1):
        lines.append(json.dumps(dict(step=step, loss=5.5 - step / 100)))
        if step % log_interval == 0:
            lines.append(json.dumps(dict(step=step, lr=1e-3, ms_per_step=200.0 + step,
                                         tokens=step * tokens_per_step)))
        if step == 100:
            lines.append(json.dumps(dict(step=step, val_loss=4.6)))
    Path(out_dir).mkdir(exist_ok=True)
    (Path(out_dir) / 'metrics.jsonl').write_text('\n'.join(lines) + '\n{"step": 121, "lo')


def test_loss_writes_a_png(tmp_path):
    write_metrics(tmp_path / 'run')
    out = tmp_path / 'loss.png'
    done = subprocess.run([sys.executable, 'viz.py', 'loss', str(tmp_path / 'run'),
                           f'--out={out}'], cwd=HERE, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes().startswith(PNG) and out.stat().st_size > 10_000


def test_loss_curves_against_tokens():
    rows = [dict(step=s, loss=1.0 / s) for s in range(1, 101)]
    rows += [dict(step=50, lr=1e-3, ms_per_step=250.0, tokens=50 * 512),
             dict(step=100, lr=5e-4, ms_per_step=500.0, tokens=100 * 512),
             dict(step=100, val_loss=0.5)]
    series, x_name = viz.curves(rows)
    assert x_name == 'tokens seen'
    np.testing.assert_array_equal(series['loss'][0], 512 * np.arange(1, 101))
    np.testing.assert_array_equal(series['loss'][1], 1.0 / np.arange(1, 101))
    np.testing.assert_array_equal(series['val_loss'][0], [100 * 512])
    np.testing.assert_allclose(series['tokens_per_s'][1], [512 / 0.25, 512 / 0.5])


def test_half_written_last_line_is_skipped(tmp_path):
    write_metrics(tmp_path)
    rows = viz.read_metrics(tmp_path)
    assert max(r['step'] for r in rows) == 120  # step 121's cut row is not there
    assert sum('loss' in r for r in rows) == 120


# --- attention -----------------------------------------------------------------------------------
CFG = GPTConfig(block_size=16, vocab_size=256, n_layer=2, n_head=4, n_embd=32)


def save_peaky_checkpoint(out_dir, cfg=CFG):
    """A checkpoint of a random GPT whose q/k weights are scaled up, so that attention is far
    from uniform. -> its arrays, keyed as in the file."""
    mesh = shard.make_mesh('data=1,model=1', jax.devices()[:1])
    with jax.set_mesh(mesh):
        _, params, _ = shard.init_params(cfg, mesh, 3, 'float32')
        arrays = shard.gather({'params': params})
    key = "['params']['h']['attn']['c_attn'].value"
    arrays[key] = arrays[key] * 40
    meta = dict(step=0, cursor=0, key=[0, 0], config=dict(tokenizer='byte'),
                model=dataclasses.asdict(cfg), params_dtype='float32')
    checkpoint.save(checkpoint.path_for(out_dir, 0), arrays, meta)
    return {k.removeprefix("['params']").removesuffix('.value'): v for k, v in arrays.items()}


def numpy_attention(w, idx, cfg=CFG):
    """GPT-2's forward in numpy, from the weights alone -> (L, H, T, T) probabilities. With
    pos='rope', q and k are rotated: pairs (i, i + D/2) by the angle pos * 10000^(-2i/D)."""
    def norm(x, w, name):
        mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + 1e-5) * w[f"{name}['scale']"] + w[f"{name}['bias']"]

    def gelu(x):
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    def rope(x):  # (T, H, D)
        angle = np.arange(T)[:, None] * 10000.0 ** (-np.arange(D // 2) / (D // 2))  # (T, D/2)
        cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
        x1, x2 = x[..., :D // 2], x[..., D // 2:]
        return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)

    T, H, D = len(idx), cfg.n_head, cfg.n_embd // cfg.n_head
    x = w["['wte']"][idx] + (w["['wpe']"][:T] if cfg.pos == 'learned' else 0)  # (T, C)
    later = np.triu(np.ones((T, T), bool), 1)  # a query never sees a later key
    maps = []
    for i in range(cfg.n_layer):
        layer = {k.replace("['h']", '', 1): v[i] for k, v in w.items() if k.startswith("['h']")}
        w_i = {**w, **layer}
        qkv = np.einsum('tc,ckd->tkd', norm(x, w_i, "['ln_1']"), w_i["['attn']['c_attn']"])
        q, k, v = (qkv + w_i["['attn']['c_attn_bias']"]).transpose(1, 0, 2).reshape(3, T, H, D)
        q, k = (rope(q), rope(k)) if cfg.pos == 'rope' else (q, k)
        scores = np.einsum('qhd,khd->hqk', q, k) / math.sqrt(D)
        scores = np.where(later, -np.inf, scores)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)  # (H, T, T)
        maps.append(p)
        y = np.einsum('hqk,khd->qhd', p, v).reshape(T, -1)
        x = x + y @ w_i["['attn']['c_proj']"] + w_i["['attn']['c_proj_bias']"]
        h = gelu(norm(x, w_i, "['ln_2']") @ w_i["['mlp']['c_fc']"] + w_i["['mlp']['c_fc_bias']"])
        x = x + h @ w_i["['mlp']['c_proj']"] + w_i["['mlp']['c_proj_bias']"]
    return np.stack(maps)


@pytest.mark.parametrize('pos', ['learned', 'rope'])
def test_attention_is_the_models_own_softmax(tmp_path, pos):
    cfg = dataclasses.replace(CFG, pos=pos)
    weights = save_peaky_checkpoint(tmp_path, cfg)
    prompt = 'def f(x): return'
    model_cfg, graphdef, params, specs, mesh, ids, labels = viz.load_for_attention(tmp_path,
                                                                                   prompt)
    with jax.set_mesh(mesh):
        maps = viz.attention_maps(model_cfg, graphdef, params, specs, mesh, ids)
    T = len(prompt)
    assert maps.shape == (cfg.n_layer, cfg.n_head, T, T) and len(labels) == T
    assert np.all(maps >= 0)
    np.testing.assert_allclose(maps.sum(-1), 1, rtol=1e-5)
    assert np.all(maps[..., np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]] == 0)  # causal
    assert maps.max(-1).mean() > 0.5  # peaky, so the comparison below means something
    np.testing.assert_allclose(maps, numpy_attention(weights, ids[0], cfg), atol=2e-4)
    with pytest.raises(ValueError, match='cannot read it'):  # a prompt that is not Unicode
        viz.load_for_attention(tmp_path, os.fsdecode(b'a\xff'))


# --- memory --------------------------------------------------------------------------------------
def test_memory_parts_are_the_compiled_steps():
    flags = dict(n_layer=2, n_head=4, n_embd=64, dtype='float32', attention='xla', unroll=False)
    cfg = viz.train.Config(batch_size=4, block_size=32, **flags)
    parts, _ = viz.step_memory(cfg)
    exe, args = bench.compiled(4, 32, **flags)  # the same step, built by bench.py
    m = exe.memory_analysis()
    assert sum(parts.values()) == (m.argument_size_in_bytes + m.temp_size_in_bytes
                                   + m.output_size_in_bytes - m.alias_size_in_bytes)
    assert parts['gradients (float32)'] + parts['activations, temporaries'] == m.temp_size_in_bytes
    n_params = sum(x.size for x in jax.tree.leaves(args[0]))
    assert parts['weights'] == 4 * n_params  # float32 masters
    assert parts["Adam's moments"] >= 8 * n_params  # mu and nu, and its step count
    fsdp, _ = viz.step_memory(dataclasses.replace(cfg, fsdp=True, batch_size=16), 4)
    assert fsdp['weights'] < parts['weights'] / 2  # most of the bytes split four ways


def test_memory_rows_and_table(capsys):
    mc = viz.MemoryConfig(rows='0,3')
    settings = viz.memory_settings(mc)
    assert settings[3][1]['remat'] == 'block' and settings[0][1]['remat'] == 'none'
    assert settings[-1][2] == mc.devices and settings[-1][1]['fsdp']
    table = [('plain', {'weights': 3 * viz.MiB, 'b': viz.MiB}, None),
             ('--remat=block', {'weights': 3 * viz.MiB, 'b': 0}, 'plain')]
    viz.print_memory(table)
    out = capsys.readouterr().out
    assert '| plain | 3 | 1 | 4 |' in out and '| 3 | 25% of plain |' in out


# --- the mesh picture ----------------------------------------------------------------------------
def test_block_layouts_cover_each_weight():
    cfg = dataclasses.replace(CFG, fsdp=2)
    mesh = shard.make_mesh('data=2,model=4', jax.devices()[:8])
    layouts = viz.block_layouts(cfg, mesh)
    shape, spec, holders = layouts['attn.c_attn']
    assert spec == ('data', None, 'model') and len(holders) == 8  # each device its own slice
    covered = np.zeros(shape, int)
    for bounds, ids in holders:
        covered[tuple(slice(*b) for b in bounds)] += len(ids)
    assert np.all(covered == 1)
    _, spec, holders = layouts['mlp.c_fc_bias']
    assert spec == ('model',) and all(len(ids) == 2 for _, ids in holders)  # replicated on data


# --- bad input: one line and a non-zero exit ---------------------------------------------------
@pytest.mark.parametrize('argv, says', [
    (['nonsense'], 'unknown subcommand'),
    (['loss'], 'takes one or more OUT_DIRs'),
    (['loss', '{tmp}'], 'metrics.jsonl not found'),
    (['loss', '{garbage}'], 'holds no loss yet'),
    (['attention', '{tmp}'], 'no checkpoint in'),
    (['memory', '--rows=9'], '--rows'),
    (['mesh', '--model=gpt9'], 'is not one of'),
    (['mesh', '--out='], 'name a .png file'),
    (['mesh', '--out={tmp}'], 'name a .png file'),
    (['mesh', '--out={garbage}/metrics.jsonl/x.png'], 'cannot be written (Not a directory)'),
])
def test_bad_input_gets_one_line(tmp_path, argv, says):
    (tmp_path / 'garbage').mkdir()
    (tmp_path / 'garbage' / 'metrics.jsonl').write_text('not json\n{"step": 1, "lr"')
    argv = [a.format(tmp=tmp_path, garbage=tmp_path / 'garbage') for a in argv]
    with pytest.raises(SystemExit) as stop:
        viz.main(argv)
    message = str(stop.value.code)
    assert message.startswith('viz.py') and says in message and '\n' not in message


def test_rows_no_float_holds_are_skipped(tmp_path):
    """Numbers a float cannot hold (a 400-digit step, tokens or val_loss; a zero ms_per_step) are
    not well formed: skipped, as a cut line is, and the picture is drawn."""
    write_metrics(tmp_path)
    huge = '1' + '0' * 400
    with open(tmp_path / 'metrics.jsonl', 'a') as f:
        f.write(f'\n{{"step": {huge}, "loss": 4.0}}\n{{"step": 1, "tokens": {huge}}}\n'
                f'{{"step": 2, "val_loss": {huge}}}\n{{"step": 3, "ms_per_step": 0}}\n')
    viz.main(['loss', str(tmp_path), f'--out={tmp_path}/loss.png'])
    assert (tmp_path / 'loss.png').stat().st_size > 1000


def test_missing_matplotlib_one_line_no_traceback(tmp_path):
    write_metrics(tmp_path)
    code = ("import sys; sys.modules['matplotlib'] = None; import viz; "
            f"viz.main(['loss', {str(tmp_path)!r}])")
    done = subprocess.run([sys.executable, '-c', code], cwd=HERE, capture_output=True, text=True)
    assert done.returncode != 0
    assert done.stderr.strip() == 'viz.py: matplotlib is not installed: pip install matplotlib'
