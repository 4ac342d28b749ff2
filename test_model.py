"""Tests: run with `python -m pytest -q test_model.py` (8 simulated CPU devices, a few minutes).

Each test checks a claim the code makes, against an independent computation: the sharded step
against the 1x1 mesh, accumulated gradients against one big batch, a resumed run against one
that was never stopped.
"""
import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                           + ' --xla_force_host_platform_device_count=8')
# Many tests (and the train.py runs they start) compile the same small programs: one compilation
# cache for this session, on disk so that subprocesses share it, makes the repeats loads.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      __import__('tempfile').mkdtemp(prefix='jaxgpt-test-cache-'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

import dataclasses
import hashlib
import json
import math
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import attention
import checkpoint
import data
import hf
import int8
import model
import optim
import perf
import sample
import shard
import train
from model import GPTConfig

HERE = Path(__file__).parent
CFG = GPTConfig(block_size=16, vocab_size=256, n_layer=2, n_head=8, n_embd=64)


def tcfg(**kw):  # a training config for the tiny model
    base = dict(dtype='float32', batch_size=16, block_size=16, warmup_iters=0, max_iters=100,
                learning_rate=1e-2, min_lr=1e-3)
    return train.Config(**{**base, **kw})


def grads_fn(graphdef, specs, mesh, tc):
    return shard.make_grads(graphdef, specs, mesh, tc.grad_accum, tc.dropout > 0)


def step_fn(graphdef, specs, mesh, tx, tc):
    return shard.make_train_step(graphdef, specs, mesh, tx, tc.dtype, tc.grad_accum,
                                 tc.dropout > 0)


def tokens(seed, shape=(16, 17)):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, shape).astype(np.int32)


def mesh_of(spec):
    return shard.make_mesh(spec, jax.devices()[:math.prod(int(p[-1]) for p in spec.split(','))])


def grads_on(spec, cfg=CFG, dtype=jnp.float32, batch=None, apply=None, **kw):
    """(loss, grads, params after one optimizer step with the gradients `apply`, or with its own
    if None), all as numpy, computed on mesh `spec`."""
    mesh = mesh_of(spec)
    tc = tcfg(**kw)
    with jax.set_mesh(mesh):
        graphdef, params, specs = shard.init_params(cfg, mesh, 0, dtype)
        batch = tokens(0) if batch is None else batch
        loss, grads = grads_fn(graphdef, specs, mesh, tc)(params, batch, jax.random.key(0))
        given = grads if apply is None else jax.tree.unflatten(  # the same gradients, on this mesh
            jax.tree.structure(params),
            [jax.device_put(g, p.sharding)
             for g, p in zip(jax.tree.leaves(apply), jax.tree.leaves(params))])
        tx = optim.make_optimizer(tc, params)
        update = jax.jit(lambda p, g: optax.apply_updates(p, tx.update(g, tx.init(p), p)[0]))
        return jax.device_get((loss, grads, update(params, given)))


def assert_close(a, b, rel=1e-5):
    assert len(jax.tree.leaves(a)) == len(jax.tree.leaves(b))
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        err = np.max(np.abs(np.asarray(x, np.float64) - y)) / (np.max(np.abs(y)) + 1e-30)
        assert err <= rel, f"{jax.tree_util.keystr(path)}: relative error {err:.2e} > {rel}"


# --- the model ----------------------------------------------------------------------------------

def forward(graphdef, specs, mesh):
    # -> jitted (params, idx (B, T)) -> (B, T, padded vocab), no cache
    return jax.jit(jax.shard_map(lambda p, i: model.nnx.merge(graphdef, p)(i)[0], mesh=mesh,
                                 in_specs=(specs, P()), out_specs=P()))


def full_logits(graphdef, specs, mesh, params, idx):  # (B, T) -> (B, T, vocab), no cache
    return np.asarray(forward(graphdef, specs, mesh)(params, idx))[..., :CFG.vocab_size]


def logits_on_1x1(idx):
    mesh = mesh_of('data=1,model=1')
    with jax.set_mesh(mesh):
        graphdef, params, specs = shard.init_params(CFG, mesh, 0, jnp.float32)
        return full_logits(graphdef, specs, mesh, params, idx)


def test_causal():
    idx = tokens(1, (2, 16))
    changed = idx.copy()
    changed[:, 10:] = (changed[:, 10:] + 1) % CFG.vocab_size
    a, b = logits_on_1x1(idx), logits_on_1x1(changed)
    np.testing.assert_array_equal(a[:, :10], b[:, :10])  # the past never sees the future
    assert np.abs(a[:, 10:] - b[:, 10:]).max() > 1e-3  # ... but the changed positions do change


def test_loss_at_init_is_uniform():
    loss, _, _ = grads_on('data=1,model=1')
    assert abs(loss - math.log(CFG.vocab_size)) < 0.05, loss


def test_overfits_one_batch():
    mesh = mesh_of('data=1,model=1')
    tc = tcfg(batch_size=4)
    batch = tokens(2, (4, 17))
    with jax.set_mesh(mesh):
        graphdef, params, specs = shard.init_params(CFG, mesh, 0, jnp.float32)
        tx = optim.make_optimizer(tc, params)
        step, opt = step_fn(graphdef, specs, mesh, tx, tc), jax.jit(tx.init)(params)
        for i in range(100):
            params, opt, loss = step(params, opt, batch, jax.random.key(0))
    assert float(loss) < 0.1, float(loss)  # from 5.5: it memorized 64 random tokens


# --- sharding, accumulation, the collectives -----------------------------------------------------

@pytest.fixture(scope='module')
def reference():
    return grads_on('data=1,model=1')


@pytest.mark.parametrize('spec', ['data=8,model=1', 'data=4,model=2', 'data=2,model=4',
                                  'data=1,model=8'])
def test_sharded_equals_unsharded(spec, reference):
    ref_loss, ref_grads, ref_params = reference
    loss, grads, params = grads_on(spec, apply=ref_grads)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    assert_close(grads, ref_grads)
    # The optimizer step on sharded arrays (global-norm clipping across shards, decay mask),
    # fed the reference gradients. Fed its own, Adam's first step, about lr * g / (|g| + eps),
    # would turn float32 rounding in the gradients nearest zero into a visible fraction of lr.
    assert_close(params, ref_params, rel=1e-6)


@pytest.mark.parametrize('spec', ['data=8,model=1', 'data=4,model=2'])
def test_fsdp_equals_unsharded(spec, reference):
    """--fsdp splits weights over 'data' too: with 2 micro-batches (each gathers and scatters),
    the loss, gradients and an optimizer step equal the 1x1 mesh's, and each device holds
    1/data of every weight FSDP splits (and those are nearly all the bytes)."""
    n_data = int(spec.split(',')[0][-1])
    cfg = dataclasses.replace(CFG, fsdp=n_data)
    ref_loss, ref_grads, ref_params = reference
    loss, grads, params = grads_on(spec, cfg=cfg, apply=ref_grads, grad_accum=2)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    assert_close(grads, ref_grads)
    assert_close(params, ref_params, rel=1e-6)
    mesh = mesh_of(spec)
    with jax.set_mesh(mesh):
        _, params, specs = shard.init_params(cfg, mesh, 0, jnp.float32)
        opt_state = jax.jit(optim.make_optimizer(tcfg(), params).init)(params)
    split = [(x, s) for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(specs)) if 'data' in s]
    for x, s in split:
        assert (x.addressable_shards[0].data.size
                == x.size // n_data // (mesh.shape['model'] if 'model' in s else 1))
    assert (sum(x.nbytes for x, _ in split)
            > 0.95 * sum(x.nbytes for x in jax.tree.leaves(params)))
    # weights, and Adam's moments: 1/data of the bytes per device, or less
    for tree in (params, opt_state):
        assert (shard.per_device_bytes(tree)
                < 1.1 * sum(x.nbytes for x in jax.tree.leaves(tree)) / n_data)


def test_accumulation_equals_one_big_batch():
    loss1, grads1, _ = grads_on('data=2,model=4', grad_accum=1)
    loss4, grads4, _ = grads_on('data=2,model=4', grad_accum=4)  # 4 micro-batches of 2 per device
    assert abs(loss4 - loss1) <= 1e-5 * abs(loss1)
    assert_close(grads4, grads1)


def test_weight_decay_only_on_matrices():
    mesh = mesh_of('data=1,model=1')
    with jax.set_mesh(mesh):
        _, params, _ = shard.init_params(CFG, mesh, 0, jnp.float32)
        tx = optim.make_optimizer(tcfg(learning_rate=1.0, weight_decay=0.5), params)
        zero = jax.tree.map(jnp.zeros_like, params)  # no gradient: what moves is weight decay
        updates, _ = tx.update(zero, tx.init(params), params)
    for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]:
        name = jax.tree_util.keystr(path)
        decays = bool(np.abs(np.asarray(u)).max() > 0)
        assert decays == (not ('bias' in name or 'scale' in name)), name


def replica_groups(line):
    """The device groups of an HLO collective, from any of the ways XLA prints them:
    {{0,2,4,6},{1,3,5,7}}; as an iota, [2,4]<=[4,2]T(1,0); by mesh axes,
    mesh['data'=4,'model'=2] {'data'}."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}", line)
    if m:  # the groups run along the named axes, one group per position on the others
        axes = re.findall(r"'(\w+)'=(\d+)", m.group(1))
        names, sizes = [a for a, _ in axes], [int(n) for _, n in axes]
        over = [names.index(a) for a in re.findall(r"'(\w+)'", m.group(2))]
        others = [i for i in range(len(sizes)) if i not in over]
        ids = np.arange(math.prod(sizes)).reshape(sizes).transpose(others + over)
        return sorted(tuple(g) for g in ids.reshape(-1, math.prod(sizes[i] for i in over)).tolist())
    m = re.search(r'replica_groups=(\{[\d,{}]*\})', line)
    if m:
        return sorted(tuple(map(int, g.split(',')))
                      for g in re.findall(r'\{([\d,]+)\}', m.group(1)))
    iota = r'replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?'
    shape, dims, perm = re.search(iota, line).groups()
    ids = np.arange(math.prod(map(int, dims.split(',')))).reshape([int(d) for d in dims.split(',')])
    ids = ids.transpose([int(p) for p in perm.split(',')]) if perm else ids
    return sorted(tuple(g) for g in ids.reshape([int(s) for s in shape.split(',')]).tolist())


def test_replica_groups_parser():
    assert (replica_groups('x, replica_groups={{0,2,4,6},{1,3,5,7}}, y')
            == [(0, 2, 4, 6), (1, 3, 5, 7)])
    assert replica_groups('x, replica_groups=[2,4]<=[4,2]T(1,0), y') == [(0, 2, 4, 6), (1, 3, 5, 7)]
    assert replica_groups('x, replica_groups=[4,2]<=[8], y') == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert (replica_groups("x, replica_groups=mesh['data'=4,'model'=2] {'data'}, y")
            == [(0, 2, 4, 6), (1, 3, 5, 7)])
    assert (replica_groups("x, replica_groups=mesh['data'=4,'model'=2] {'model'}, y")
            == [(0, 1), (2, 3), (4, 5), (6, 7)])


def test_remat_gives_the_same_gradients(reference):
    remat = dataclasses.replace(CFG, remat='block')
    mesh = mesh_of('data=1,model=1')
    with jax.set_mesh(mesh):
        graphdef, params, specs = shard.init_params(remat, mesh, 0, jnp.float32)
        f = grads_fn(graphdef, specs, mesh, tcfg())
        assert 'remat' in str(jax.make_jaxpr(f)(params, tokens(0), jax.random.key(0)))  # it is on
    loss, grads, _ = grads_on('data=2,model=4', cfg=remat)
    assert abs(loss - reference[0]) <= 1e-5 * abs(reference[0])
    assert_close(grads, reference[1])


def test_softmax_backward_equals_autodiff():
    """attention.softmax's own backward gives jax.nn.softmax's gradient, masked scores included."""
    T = 6
    s = jnp.where(jnp.tril(jnp.ones((T, T), bool)), jax.random.normal(jax.random.key(0), (T, T)),
                  -jnp.inf)
    w = jax.random.normal(jax.random.key(1), (T, T))  # so that every gradient entry matters
    ours, autodiff = (jax.grad(lambda s: (f(s) * w).sum()) for f in (
        attention.softmax, lambda s: jax.nn.softmax(s, axis=-1)))
    np.testing.assert_allclose(ours(s), autodiff(s), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('T', [128, 200])  # a multiple of the 128-key block, and not
def test_blockwise_attention_matches_xla(T):
    """Flash attention's outputs and gradients equal the textbook formula's: float32, 2e-5."""
    q, k, v, w = (jax.random.normal(jax.random.key(i), (2, T, 3, 16)) for i in range(4))
    pos = jnp.arange(T)

    def loss(impl):  # a random weighting of the outputs, so every gradient entry matters
        return jax.value_and_grad(
            lambda q, k, v: (attention.attention(q, k, v, pos, pos, impl) * w).sum(), (0, 1, 2))
    (lx, gx), (lb, gb) = loss('xla')(q, k, v), loss('blockwise')(q, k, v)
    assert abs(lb - lx) <= 2e-5 * abs(lx)
    assert_close(gb, gx, rel=2e-5)
    if jax.default_backend() == 'gpu':  # cuDNN's kernel, in bf16, where there is one
        bf = [a.astype(jnp.bfloat16) for a in (q, k, v)]
        np.testing.assert_allclose(attention.attention(*bf, pos, pos, 'cudnn'),
                                   attention.attention(*bf, pos, pos, 'xla'), atol=2e-2)


def test_blockwise_model_in_shard_map(reference):
    """The whole model with blockwise attention, split 2x4, gives the 1x1 xla model's gradients
    (T=16 here, so the keys are padded up to the 128-key block)."""
    loss, grads, _ = grads_on('data=2,model=4', cfg=dataclasses.replace(CFG, attention='blockwise'))
    assert abs(loss - reference[0]) <= 1e-5 * abs(reference[0])
    assert_close(grads, reference[1])


def dense_attention(q, k, v, window, keep=None, rate=0.0):
    """Attention as a loop over queries in numpy: each sees the keys from q - window + 1 (or 0)
    to itself; keep (B, H, T, T), if given, is the dropout mask of a dropout at `rate`."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    out = np.zeros_like(q)
    for i in range(q.shape[1]):
        lo = max(0, i - window + 1) if window else 0
        s = np.einsum('bhd,bkhd->bhk', q[:, i], k[:, lo:i + 1]) / np.sqrt(q.shape[-1])
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        if keep is not None:
            p = p * keep[:, :, i, lo:i + 1] / (1 - rate)
        out[:, i] = np.einsum('bhk,bkhd->bhd', p, v[:, lo:i + 1])
    return out


@pytest.mark.parametrize('T, window', [(200, 1), (200, 40), (300, 130), (256, 0)])
def test_sliding_window_equals_a_dense_masked_softmax(T, window):
    """xla and blockwise attention with a window both equal the loop above (float32, 1e-5)."""
    q, k, v = (jax.random.normal(jax.random.key(i), (2, T, 3, 16)) for i in range(3))
    pos = jnp.arange(T)
    expected = dense_attention(q, k, v, window)
    for impl in ('xla', 'blockwise'):
        got = attention.attention(q, k, v, pos, pos, impl, window)
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=impl)


def scan_lengths(jaxpr):  # the trip counts of every lax.scan in a jaxpr, nested ones too
    lengths = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == 'scan':
            lengths.append(eqn.params['length'])
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            lengths += scan_lengths(sub)
    return lengths


def test_blockwise_window_skips_the_blocks_no_query_sees():
    """At T=2048 (16 blocks of 128), a window of 256 reaches 3 key blocks back from a query's
    block: the forward and backward scans walk 3 key blocks, not 16, so time grows as T x W."""
    q, k, v = (jnp.ones((1, 2048, 2, 64)) for _ in range(3))
    pos = jnp.arange(2048)

    def lengths(window):
        def loss(q, k, v):
            return attention.attention(q, k, v, pos, pos, 'blockwise', window).sum()
        return scan_lengths(jax.make_jaxpr(jax.grad(loss, (0, 1, 2)))(q, k, v).jaxpr)
    assert lengths(256) == [3, 3] and lengths(0) == [16, 16]


def test_attention_dropout_blockwise_equals_xla():
    """With the same key, blockwise drops exactly the probabilities xla drops: outputs and all
    gradients agree (2e-5), the mask equals an independent draw of the same hash, about the rate
    is dropped, and sequences and heads draw different masks."""
    B, T, H, rate = 2, 200, 3, 0.3
    q, k, v, w = (jax.random.normal(jax.random.key(i), (B, T, H, 16)) for i in range(4))
    pos = jnp.arange(T)
    drop = (jax.random.key(7), rate, jnp.arange(H))

    def loss(impl):  # a random weighting of the outputs, so every gradient entry matters
        return jax.value_and_grad(lambda q, k, v: (attention.attention(
            q, k, v, pos, pos, impl, 40, drop) * w).sum(), (0, 1, 2))
    (lx, gx), (lb, gb) = loss('xla')(q, k, v), loss('blockwise')(q, k, v)
    assert abs(lb - lx) <= 2e-5 * abs(lx)
    assert_close(gb, gx, rel=2e-5)
    keep = np.asarray(attention.kept(drop, np.arange(B)[:, None, None, None],
                                     np.arange(H)[:, None, None], pos[:, None], pos))
    assert abs(keep.mean() - (1 - rate)) < 0.01
    assert (keep[0] != keep[1]).mean() > 0.3 and (keep[:, 0] != keep[:, 1]).mean() > 0.3
    np.testing.assert_allclose(attention.attention(q, k, v, pos, pos, 'xla', 40, drop),
                               dense_attention(q, k, v, 40, keep, rate), atol=1e-5)


def test_attention_dropout_in_the_model_on_any_split_of_heads(reference):
    """The whole model with dropout 0.1: blockwise gives xla's loss and gradients, and splitting
    the heads over 'model' (each device draws its heads' masks by their global index) gives one
    device's."""
    dropped = dataclasses.replace(CFG, dropout=0.1)
    loss, grads, _ = grads_on('data=1,model=1', cfg=dropped, dropout=0.1)
    assert abs(loss - reference[0]) > 1e-4  # it did drop something
    for spec, impl in (('data=1,model=1', 'blockwise'), ('data=1,model=4', 'xla')):
        other = grads_on(spec, cfg=dataclasses.replace(dropped, attention=impl), dropout=0.1)
        assert abs(other[0] - loss) <= 1e-5 * abs(loss), (spec, impl)
        assert_close(other[1], grads)


def test_rope_is_a_rotation_that_sees_relative_positions():
    """rope equals rotating each pair (i, i + D/2) by pos * 10000^(-2i/D), written as 2x2
    matrices; and q(m) . k(n) after it depends on m - n only."""
    D = 8
    x = np.asarray(jax.random.normal(jax.random.key(0), (1, 5, 2, D)))
    pos = np.arange(5) + 3
    expected = np.empty_like(x)
    for t, p in enumerate(pos):
        for i in range(D // 2):
            a = p * 10000.0 ** (-2 * i / D)
            rotation = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
            expected[0, t, :, [i, i + D // 2]] = rotation @ x[0, t, :, [i, i + D // 2]]
    np.testing.assert_allclose(attention.rope(jnp.asarray(x), jnp.asarray(pos)), expected,
                               atol=1e-5)
    q, k = x[:, :1], x[:, 1:2]

    def score(m, n):
        return float((attention.rope(q, jnp.array([m])) * attention.rope(k, jnp.array([n]))).sum())
    assert abs(score(7, 3) - score(104, 100)) < 1e-4 and abs(score(7, 3) - score(3, 7)) > 1e-3


def prune_cfg(**kw):
    return tcfg(**{'prune': 0.5, 'prune_interval': 2, 'warmup_iters': 2, 'max_iters': 8, **kw})


def test_sparsity_follows_the_cubic_schedule():
    """0 through warmup, S * (1 - (1 - t)^3) on the way, S from 3/4 of max_iters on."""
    tc = prune_cfg()
    at = [float(optim.sparsity(tc, t)) for t in (0, 2, 4, 6, 8)]
    np.testing.assert_allclose(at, [0, 0, 0.5 * (1 - 0.5 ** 3), 0.5, 0.5], rtol=1e-6)


def train_pruned(spec, steps=8, **kw):
    """-> (mesh, params) after `steps` training steps with --prune=0.5 on mesh `spec`."""
    mesh = mesh_of(spec)
    tc = prune_cfg(**kw)
    cfg = dataclasses.replace(CFG, fsdp=mesh.shape['data'] if tc.fsdp else 1)
    with jax.set_mesh(mesh):
        graphdef, params, specs = shard.init_params(cfg, mesh, 0, jnp.float32)
        tx = optim.make_optimizer(tc, params)
        state = jax.jit(tx.init)(params)
        step = step_fn(graphdef, specs, mesh, tx, tc)
        for i in range(steps):
            params, state, _ = step(params, state, tokens(i), jax.random.key(i))
    return mesh, params


def pruned_params(spec, **kw):  # as numpy
    return jax.device_get(model.nnx.to_pure_dict(train_pruned(spec, **kw)[1]))


def test_pruning_reaches_its_sparsity():
    """After max_iters, each layer's four matmul kernels are half zeros, and nothing else is."""
    one = pruned_params('data=1,model=1')
    for module, name in model.KERNELS:
        w = one['h'][module][name]
        zeros = (w.reshape(w.shape[0], -1) == 0).mean(1)  # per layer
        assert np.all(zeros >= 0.5) and np.all(zeros < 0.52), (name, zeros)
    assert (one['wte'] != 0).mean() > 0.9 and (one['h']['attn']['c_attn_bias'] == 0).mean() < 1


def pruning_steps(spec, fsdp=False, steps=4):
    """The params after `steps` optimizer steps with --prune=0.5, all given the same gradients,
    on mesh `spec`: the masks are computed from the whole arrays, whatever their split."""
    mesh = mesh_of(spec)
    tc = prune_cfg(warmup_iters=0, max_iters=4, prune_interval=1)
    cfg = dataclasses.replace(CFG, fsdp=mesh.shape['data'] if fsdp else 1)
    with jax.set_mesh(mesh):
        _, params, _ = shard.init_params(cfg, mesh, 0, jnp.float32)
        tx = optim.make_optimizer(tc, params)
        state = jax.jit(tx.init)(params)
        rng = np.random.default_rng(0)
        grads = jax.tree.map(lambda p: shard.put(rng.normal(size=p.shape) * 0.01, p), params)

        @jax.jit
        def update(params, state):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        for _ in range(steps):
            params, state = update(params, state)
    return jax.device_get(model.nnx.to_pure_dict(params))


def test_pruning_is_the_same_on_every_mesh():
    """data=2,model=2 and FSDP over 4 prune exactly the weights one device prunes."""
    one = pruning_steps('data=1,model=1')
    assert (one['h']['mlp']['c_fc'] == 0).mean() >= 0.5
    for spec, fsdp in (('data=2,model=2', False), ('data=4,model=1', True)):
        other = pruning_steps(spec, fsdp)
        for module, name in model.KERNELS:
            np.testing.assert_array_equal(other['h'][module][name] == 0,
                                          one['h'][module][name] == 0, err_msg=spec)
        assert_close(other, one, rel=1e-6)


def test_int8_keeps_pruned_zeros():
    """sample.py --quantize=int8 on a pruned model: every pruned weight is still exactly 0."""
    mesh, params = train_pruned('data=1,model=1')
    pruned = jax.device_get(model.nnx.to_pure_dict(params))
    params = int8.quantize(params, mesh)
    for module, name in model.KERNELS:
        w = pruned['h'][module][name]
        assert (w == 0).mean() >= 0.5
        assert np.all(np.asarray(params['h'][module][name][...])[w == 0] == 0)


def test_evaluation_reports_the_next_token_accuracy():
    """make_loss's accuracy is the fraction of targets that are the argmax of the logits: on a
    batch whose even positions are followed by the model's own greedy choice, over half."""
    mesh = mesh_of('data=2,model=1')
    batch = tokens(0)
    with jax.set_mesh(mesh):
        graphdef, params, specs = shard.init_params(CFG, mesh, 0, jnp.float32)
        logits_of = forward(graphdef, specs, mesh)
        for t in range(0, 16, 2):  # causal: a later change leaves position t's logits as they are
            logits = np.asarray(logits_of(params, batch[:, :-1]))[..., :CFG.vocab_size]
            batch[:, t + 1] = logits[:, t].argmax(-1)
        logits = np.asarray(logits_of(params, batch[:, :-1]))[..., :CFG.vocab_size]
        loss, accuracy = shard.make_loss(graphdef, specs, mesh, jnp.float32, 2)(params, batch)
    hits = logits.argmax(-1) == batch[:, 1:]
    assert hits.mean() >= 0.5 and np.isclose(accuracy, hits.mean())
    true = np.take_along_axis(logits, batch[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(loss, np.mean(np.log(np.exp(logits).sum(-1)) - true), rtol=1e-5)


def test_schedule_first_step_learns():
    tc = tcfg(warmup_iters=10, learning_rate=1e-3, max_iters=100, min_lr=1e-4)
    lr = optim.lr_schedule(tc)
    np.testing.assert_allclose([lr(0), lr(9), lr(10), lr(100)],
                               [1e-3 / 11, 1e-3 * 10 / 11, 1e-3, 1e-4], rtol=1e-6)
    mesh = mesh_of('data=1,model=1')
    with jax.set_mesh(mesh):
        graphdef, params, specs = shard.init_params(CFG, mesh, 0, jnp.float32)
        tx = optim.make_optimizer(tc, params)
        before = jax.device_get(params)
        after, _, _ = step_fn(graphdef, specs, mesh, tx, tc)(
            params, jax.jit(tx.init)(params), tokens(0), jax.random.key(0))
    assert not np.array_equal(after['wte'], before['wte'])  # the first step moved the weights


def test_one_data_allreduce_per_step():
    """The compiled step with 4 micro-batches all-reduces gradients over 'data' once, outside
    the micro-batch loop; the 'model' axis all-reduces (the psums in model.py) are separate."""
    mesh = mesh_of('data=4,model=2')
    with jax.set_mesh(mesh):
        graphdef, params, specs = shard.init_params(CFG, mesh, 0, jnp.float32)
        f = grads_fn(graphdef, specs, mesh, tcfg(grad_accum=4))
        hlo = f.lower(params, tokens(0), jax.random.key(0)).compile().as_text()
        jaxpr = jax.make_jaxpr(f)(params, tokens(0), jax.random.key(0)).jaxpr
    # the mesh's columns
    data_groups = sorted(tuple(col) for col in np.arange(8).reshape(4, 2).T.tolist())
    where, computation, operands = [], None, 0
    for line in hlo.splitlines():
        if line.endswith('{') and not line.startswith(' '):
            computation = 'ENTRY' if line.startswith('ENTRY') else line.split()[0]
        if re.search(r' all-reduce(-start)?\(', line) and replica_groups(line) == data_groups:
            where.append(computation)
            operands = line.split(' all-reduce')[0].count('f32[')  # the tuple it returns
    assert where == ['ENTRY'], where  # one, and not inside the scan's while loop
    assert operands == 1 + len(jax.tree.leaves(params))  # the loss and every gradient, together
    # The same claim one level up, where no change in XLA's printing can hide it: in the jaxpr,
    # the loss and every gradient are summed over 'data' outside the scan, and nothing inside it
    sums = [(scope, n) for name, scope, n in collectives(jaxpr, 'data') if name.startswith('psum')]
    assert all('shard_map' in s and 'scan' not in s for s, _ in sums), sums
    assert sum(n for _, n in sums) == 1 + len(jax.tree.leaves(params))


def collectives(jaxpr, axis, scope=()):
    """(primitive, the primitives around it, operands) for each collective over `axis`
    in a jaxpr."""
    for e in jaxpr.eqns:
        if axis in e.params.get('axes', ()) or e.params.get('axis_name') in (axis, (axis,)):
            yield e.primitive.name, scope, len(e.invars)
        for v in e.params.values():
            for sub in v if isinstance(v, (list, tuple)) else [v]:
                if hasattr(getattr(sub, 'jaxpr', sub), 'eqns'):
                    yield from collectives(getattr(sub, 'jaxpr', sub), axis,
                                           scope + (e.primitive.name,))


# --- precision ----------------------------------------------------------------------------------

def train_losses(dtype, master, steps=40):
    mesh = mesh_of('data=2,model=4')
    tc = tcfg(dtype=dtype, master_weights=master, max_iters=steps, learning_rate=3e-3)
    text = (HERE / 'model.py').read_text()
    ids = data.ByteTokenizer().encode(text)[:16 * 17 * 8].reshape(-1, 17).astype(np.int32)
    with jax.set_mesh(mesh):
        graphdef, params, specs = shard.init_params(CFG, mesh, 0, 'float32' if master else dtype)
        tx = optim.make_optimizer(tc, params)
        step, opt = step_fn(graphdef, specs, mesh, tx, tc), jax.jit(tx.init)(params)
        losses = []
        for i in range(steps):
            params, opt, loss = step(params, opt, ids[(i % 8) * 16:][:16], jax.random.key(i))
            losses.append(float(loss))
    stored = jnp.dtype('float32' if master else dtype)  # params and Adam's moments stay in it
    assert {x.dtype for x in jax.tree.leaves((params, opt[1][0].mu, opt[1][0].nu))} == {stored}
    return np.array(losses)


def test_bf16_trains_close_to_float32():
    f32, bf16, bf16_only = (train_losses('float32', True), train_losses('bfloat16', True),
                            train_losses('bfloat16', False))
    assert f32[-5:].mean() < 0.8 * f32[:5].mean()  # float32 learns (5.5 -> about 3.4)
    assert not np.array_equal(bf16, f32) and not np.array_equal(bf16_only, bf16)  # dtypes were used
    # stated tolerance: the mean of the last 5 losses within 5% of float32's
    assert abs(bf16[-5:].mean() - f32[-5:].mean()) < 0.05 * f32[-5:].mean(), (bf16[-5:], f32[-5:])
    assert (abs(bf16_only[-5:].mean() - f32[-5:].mean())
            < 0.05 * f32[-5:].mean()), (bf16_only[-5:], f32[-5:])


def test_compute_dtype_fits_the_cpu(tmp_path, capsys):
    """Without --dtype, a CPU computes in bf16 only where it multiplies bf16 natively: the flags
    of an AVX2 Zen 3 give float32, a Zen 4's (avx512_bf16) and an arm64 with bf16 give bf16, as do
    GPUs, and a Zen 4 under XLA_FLAGS' AVX2 cap gives float32; the run says which and why. The
    CPU's features are injected, not read."""
    zen3 = 'processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n'
    zen4 = zen3.replace('fma', 'fma avx512f avx512_bf16')
    arm64 = 'Features\t: fp asimd bf16\n'
    for cpuinfo, want in ((zen3, 'float32'), (zen4, 'bfloat16'), (arm64, 'bfloat16')):
        (tmp_path / 'cpuinfo').write_text(cpuinfo)
        assert perf.default_dtype('cpu', perf.cpu_features(tmp_path / 'cpuinfo'))[0] == want
    assert perf.cpu_features(tmp_path / 'no such file') == set()  # macOS: no /proc/cpuinfo
    assert perf.default_dtype('cpu', set()) == ('float32', 'this CPU has no native bf16')
    assert perf.default_dtype('gpu', set())[0] == 'bfloat16'
    (tmp_path / 'cpuinfo').write_text(zen4)  # capped at AVX2, a Zen 4 is treated as a Zen 3
    with pytest.MonkeyPatch.context() as env:
        env.setenv('XLA_FLAGS', '--xla_cpu_max_isa=AVX2')
        assert perf.default_dtype('cpu', perf.cpu_features(tmp_path / 'cpuinfo'))[0] == 'float32'
    cfg = tcfg(dtype='', out_dir=str(tmp_path / 'out'))
    train.check_devices(cfg, data.ByteTokenizer())
    rule = perf.default_dtype(jax.default_backend(), perf.cpu_features())
    assert cfg.dtype == rule[0] and f"{rule[0]} compute: {rule[1]}" in capsys.readouterr().out


@pytest.mark.skipif(not Path('/proc/self/status').exists(), reason='reads Linux resident memory')
def test_trim_heap_hands_kept_memory_back(monkeypatch):
    """Kept, a freed 256 MiB block stays resident; past HEAP_BOUND, trim_heap hands it back (the
    bound on a kept heap that grows when a step's temporaries come before the last's are freed)."""
    if not perf.keep_freed_memory():
        pytest.skip("glibc's mallopt is not here")

    def resident():
        return perf.proc_bytes('/proc/self/status', 'VmRSS')

    block = np.ones(256 << 17)  # 256 MiB of float64, from the kept heap
    held = resident()
    del block
    assert resident() > held - (128 << 20)  # freed, but kept
    monkeypatch.setattr(perf, 'HEAP_BOUND', 1)
    perf.trim_heap()
    assert resident() < held - (192 << 20)


# --- data -----------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', ['byte', 'gpt2'])
def test_tokenizer_round_trip(name):
    tok = data.get_tokenizer(name)
    text = "def f(x):\n    return x ** 2  # héllo, wörld ✓\n"
    ids = tok.encode(text)
    assert ids.dtype == np.uint16 and ids.max() < tok.vocab_size
    assert tok.decode(ids) == text
    if name == 'gpt2':  # GPT-2's own ids, so its published weights would read our tokens
        assert tok.encode('Hello world').tolist() == [15496, 995]


def test_batches_deterministic_disjoint_and_per_shard():
    toks = np.arange(17 * 41, dtype=np.uint16)  # room for 40 windows of T+1 = 17 at any shift
    a, b = data.Batches(toks, 16, 8, seed=3), data.Batches(toks, 16, 8, seed=3)
    assert a.n == 40
    starts = [a.window_starts(c) for c in range(0, 160, 8)]  # four epochs
    np.testing.assert_array_equal(starts[3], b.window_starts(24))  # a pure function of the cursor
    epochs = [np.concatenate(starts[i:i + 5]) for i in range(0, 20, 5)]
    for e in epochs:  # every window of the epoch's grid once: 40 starts, 17 apart, one shift
        assert len(set(e % 17)) == 1 and sorted(e - e[0] % 17) == list(range(0, 17 * 40, 17))
        assert e.max() + 17 <= len(toks)
    assert len({tuple(e) for e in epochs}) == 4  # a new order each epoch
    assert len({e[0] % 17 for e in epochs}) > 1  # and a new grid
    batch, cursor = a.get(0)
    assert cursor == 8 and batch.shape == (8, 17)
    shards = batch.reshape(4, 2, 17)  # what a 4-way data axis hands each device
    assert len({tuple(s[:, 0]) for s in shards}) == 4  # different windows on every shard
    np.testing.assert_array_equal(batch[:, 1:], batch[:, :-1] + 1)  # windows are contiguous text


def test_dataset_split_and_cache(tmp_path):
    folder = tmp_path / 'docs'
    folder.mkdir()
    for i in range(30):
        (folder / f'doc{i}.txt').write_text(f'document {i} ' * 50)
    train_a, val_a = data.load_tokens(str(folder), 'byte', tmp_path / 'cache')
    cached = {p: p.stat().st_mtime_ns for p in (tmp_path / 'cache').rglob('*.bin')}
    train_b, val_b = data.load_tokens(str(folder), 'byte', tmp_path / 'cache')  # from the cache
    assert cached == {p: p.stat().st_mtime_ns for p in (tmp_path / 'cache').rglob('*.bin')}
    np.testing.assert_array_equal(train_a, train_b)
    (folder / 'doc3.txt').write_text('edited')  # a changed file makes a new cache
    data.load_tokens(str(folder), 'byte', tmp_path / 'cache')
    assert len(list((tmp_path / 'cache').iterdir())) == 2
    (folder / 'out').mkdir()  # a run's out_dir inside the data: not data (its log grows)
    for name in ('lock', 'metrics.jsonl'):
        (folder / 'out' / name).write_text('{"step": 1, "loss": 5.0}\n')
    data.load_tokens(str(folder), 'byte', tmp_path / 'cache')
    assert len(list((tmp_path / 'cache').iterdir())) == 2  # the same files: the same cache
    for _ in range(2):  # a cache inside the data: not data either
        data.load_tokens(str(folder), 'byte', folder / 'cache')
    assert len(list((folder / 'cache').iterdir())) == 1
    texts = [data.ByteTokenizer().decode(t).split('<|endoftext|>')[:-1] for t in (train_a, val_a)]
    assert len(texts[0]) + len(texts[1]) == 30 and len(texts[1]) >= 1  # whole documents each side
    assert not set(texts[0]) & set(texts[1])
    one = tmp_path / 'one.txt'
    one.write_text('abcdefghij' * 100)
    train_c, val_c = data.load_tokens(str(one), 'byte', tmp_path / 'cache')
    assert (len(train_c), len(val_c)) == (901, 101)  # 90% / 10% of the text, plus <|endoftext|>


def test_folder_reads_text_only(tmp_path, capsys):
    """A folder skips hidden paths (.git/) and files that are not UTF-8 text, and says so."""
    folder = tmp_path / 'repo'
    for name, content in [('a.py', b'print(1)\n'), ('b.txt', b'hello\n'),
                          ('.git/HEAD', b'ref: main\n'), ('.git/objects/ab', b'x\x00\x9c'),
                          ('c.pyc', b'\x00\x01binary'), ('d.bin', b'\xff\xfe')]:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    root, files = data.source_files(str(folder), tmp_path / 'cache')
    assert [p.name for p in files] == ['a.py', 'b.txt', 'c.pyc', 'd.bin']  # nothing under .git/
    train, val = data.split_documents(root, files)
    assert sorted(train + val) == ['hello\n', 'print(1)\n']
    assert 'skipped 2 of 4 files that are not UTF-8 text' in capsys.readouterr().out


def test_cache_sees_same_size_edits(tmp_path):
    """An edit that keeps the size and the modification time (cp -p, rsync -t) is still seen."""
    f = tmp_path / 'text.txt'
    f.write_text('abcdefghij' * 100)
    stat = f.stat()
    a = np.array(data.load_tokens(str(f), 'byte', tmp_path / 'cache')[0])
    f.write_text('ABCDEFGHIJ' * 100)
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    b = np.array(data.load_tokens(str(f), 'byte', tmp_path / 'cache')[0])
    assert (f.stat().st_mtime_ns == stat.st_mtime_ns
            and bytes(b[:3].astype(np.uint8)) == b'ABC' != bytes(a[:3].astype(np.uint8)))


def test_named_download_checks_its_hash(tmp_path, monkeypatch):
    """--data=shakespeare downloads once, keeps the file only if its sha256 matches, then
    reuses it."""
    served = tmp_path / 'served.txt'
    served.write_text('To be, or not to be' * 100)
    # a local file stands in for the web
    monkeypatch.setattr(data, 'SHAKESPEARE_URL', served.as_uri())
    with pytest.raises(data.DataError, match='sha256'):
        data.source_files('shakespeare', tmp_path / 'cache')
    assert not (tmp_path / 'cache' / 'shakespeare.txt').exists()  # nothing kept
    monkeypatch.setattr(data, 'SHAKESPEARE_SHA256', hashlib.sha256(served.read_bytes()).hexdigest())
    _, files = data.source_files('shakespeare', tmp_path / 'cache')
    served.unlink()  # the second call must not need the network
    assert data.source_files('shakespeare', tmp_path / 'cache')[1] == files
    assert files[0].read_text() == 'To be, or not to be' * 100


# --- sampling -----------------------------------------------------------------------------------

WINDOWED = dataclasses.replace(CFG, window=5)  # its sampler keeps a ring of 5 slots


@pytest.mark.parametrize('spec, cfg', [('data=1,model=1', CFG), ('data=4,model=2', CFG),
                                       ('data=1,model=1', WINDOWED), ('data=4,model=2', WINDOWED)])
def test_kv_cache_equals_full_forward(spec, cfg):
    """Greedy decoding with the cache gives the tokens of greedy decoding without it, and every
    step's logits equal a full forward pass over the context, for prompts of several lengths; so
    too with a sliding window, whose cache is a ring of `window` slots."""
    mesh = mesh_of(spec)
    with jax.set_mesh(mesh):
        graphdef, params, specs = shard.init_params(cfg, mesh, 0, jnp.float32)
        generate = sample.make_sampler(graphdef, specs, mesh, cfg, 'float32', temperature=0)
        for t in (1, 5, 12):
            prompt = tokens(t, (t,)).tolist()
            n = CFG.block_size - t  # up to a full context
            cached = list(generate(params, prompt, n, jax.random.key(0), num_samples=2))
            uncached = list(generate(params, prompt, n, jax.random.key(0), num_samples=2,
                                     cached=False))
            ids = np.stack([nxt for nxt, _ in cached], 1)  # (2, n)
            np.testing.assert_array_equal(ids, np.stack([nxt for nxt, _ in uncached], 1))
            full = full_logits(graphdef, specs, mesh, params,
                               np.array([prompt + ids[0].tolist()]))[0]
            np.testing.assert_allclose(np.stack([np.asarray(logits[0]) for _, logits in cached]),
                                       full[t - 1:t - 1 + n], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('cfg', [CFG, WINDOWED])
def test_kv_cache_slides_past_the_context(cfg):
    """Past block_size the cache is refilled with the newest half of the text: every token is the
    argmax of a full forward pass over the context that rule gives."""
    mesh = mesh_of('data=1,model=1')
    S = cfg.block_size
    with jax.set_mesh(mesh):
        graphdef, params, specs = shard.init_params(cfg, mesh, 0, jnp.float32)
        generate = sample.make_sampler(graphdef, specs, mesh, cfg, 'float32', temperature=0)
        ids = [3, 1, 4]
        context = len(ids)
        logits = forward(graphdef, specs, mesh)  # built once: one compilation for every window
        for nxt, _ in generate(params, ids, 3 * S, jax.random.key(0)):
            # one shape, one compilation; causal: the padding is never read
            window = np.zeros((1, S), np.int32)
            window[0, :context] = ids[-context:]
            next_logits = np.asarray(logits(params, window))[0, context - 1, :CFG.vocab_size]
            assert nxt[0] == next_logits.argmax()
            ids.append(int(nxt[0]))
            context = context + 1 if context < S else S // 2  # a full cache is refilled with half


def test_windowed_rope_cache_runs_past_the_context_without_refill():
    """A windowed RoPE model has no position table to run out of: its ring of 5 slots runs on
    past block_size, and every step's logits equal one forward pass over the whole text (48
    tokens, three contexts), which a window makes exact: no token sees more than the cache."""
    cfg = dataclasses.replace(WINDOWED, pos='rope')
    mesh = mesh_of('data=2,model=2')
    with jax.set_mesh(mesh):
        graphdef, params, specs = shard.init_params(cfg, mesh, 0, jnp.float32)
        generate = sample.make_sampler(graphdef, specs, mesh, cfg, 'float32', temperature=0)
        prompt = [3, 1, 4]
        steps = list(generate(params, prompt, 3 * cfg.block_size - 3, jax.random.key(0)))
        ids = np.array([prompt + [int(nxt[0]) for nxt, _ in steps]])
        full = full_logits(graphdef, specs, mesh, params, ids)[0]
    np.testing.assert_allclose(np.stack([np.asarray(logits[0]) for _, logits in steps]),
                               full[2:-1], atol=1e-5, rtol=1e-5)


def test_top_k_and_top_p_stay_in_their_set():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 50)) * 2, jnp.float32)
    ranked = np.argsort(-np.asarray(logits), -1)
    p = np.take_along_axis(np.asarray(jax.nn.softmax(logits)), ranked, -1)
    nucleus = [set(ranked[i, :np.searchsorted(np.cumsum(p[i]), 0.6) + 1]) for i in range(4)]
    pick = jax.jit(jax.vmap(sample.pick, in_axes=(None, 0, None, None, None)),
                   static_argnums=(2, 3, 4))
    keys = jax.random.split(jax.random.key(0), 500)
    for top_k, top_p, allowed in ((5, 1.0, [set(r[:5]) for r in ranked]), (0, 0.6, nucleus)):
        drawn = np.asarray(pick(logits, keys, 1.0, top_k, top_p))  # (500, 4)
        for i in range(4):
            assert set(drawn[:, i]) <= allowed[i] and len(set(drawn[:, i])) > 1
    # temperature 0 is greedy, and so is one too small to divide by (1e-320 is 0 in float32)
    for temperature in (0, 1e-320, 1e-7):
        np.testing.assert_array_equal(sample.pick(logits, keys[0], temperature, 0, 1.0),
                                      ranked[:, 0])


@pytest.mark.parametrize('spec', ['data=1,model=1', 'data=4,model=2'])
def test_int8_weights_within_half_a_step(spec):
    """Each int8 weight dequantizes to within half its scale (max |w| / 127 of its output channel,
    per model-axis group of input rows) of the float32 weight; the logits barely move."""
    mesh = mesh_of(spec)
    groups = mesh.shape['model']
    with jax.set_mesh(mesh):
        graphdef, params, specs = shard.init_params(CFG, mesh, 0, jnp.float32)
        before = jax.device_get(model.nnx.to_pure_dict(params))
        idx = tokens(1, (2, 16))
        logits = full_logits(graphdef, specs, mesh, params, idx)
        params = int8.quantize(params, mesh)
        for module, name in (('attn', 'c_attn'), ('attn', 'c_proj'),
                             ('mlp', 'c_fc'), ('mlp', 'c_proj')):
            w, stored = before['h'][module][name], params['h'][module][name].get_value()
            assert stored.q.dtype == jnp.int8
            g = w.reshape(w.shape[0], groups, -1, *w.shape[2:])
            scale = np.abs(g).max(2, keepdims=True) / 127
            q = np.asarray(stored.q).reshape(g.shape)
            dequantized = q * np.asarray(stored.scale)[:, :, None]
            err = np.abs(g - dequantized)
            assert (err <= scale / 2 * (1 + 1e-5)).all() and err.max() > 0
        quantized = full_logits(graphdef, specs, mesh, shard.cast(params, jnp.float32), idx)
    assert np.abs(quantized - logits).max() < 0.02 * np.abs(logits).max()


@pytest.mark.parametrize('flag, message', [
    ('--temperature=-1', '--temperature=-1.0 must be in [0, 1e6]'),
    ('--top_k=-5', '--top_k=-5 must be in [0, inf)'),
    ('--top_p=0', '--top_p=0.0 must be in (0, 1]'),
    ('--num_samples=0', '--num_samples=0 must be in [1, inf)')])
def test_bad_sampling_flags(flag, message, tmp_path):
    with pytest.raises(SystemExit) as e:
        sample.main([flag, f'--out_dir={tmp_path}'])
    assert e.value.code.startswith(f'sample.py: {message}') and not list(tmp_path.iterdir())


# --- GPT-2's weights in Hugging Face's layout -------------------------------------------------

# vocab_size 250: 6 padding rows
HF_CFG = GPTConfig(block_size=16, vocab_size=250, n_layer=2, n_head=4, n_embd=32)


def hf_folder(path, cfg=HF_CFG, seed=0):
    """A GPT-2 as Hugging Face saves it, with random weights (and its causal-mask buffers)."""
    rng = np.random.default_rng(seed)
    C, L = cfg.n_embd, cfg.n_layer
    shapes = {'wte.weight': (cfg.vocab_size, C), 'wpe.weight': (cfg.block_size, C),
              'ln_f.weight': (C,), 'ln_f.bias': (C,)}
    for i in range(L):
        shapes.update({f'h.{i}.ln_1.weight': (C,), f'h.{i}.ln_1.bias': (C,),
                       f'h.{i}.ln_2.weight': (C,), f'h.{i}.ln_2.bias': (C,),
                       f'h.{i}.attn.c_attn.weight': (C, 3 * C), f'h.{i}.attn.c_attn.bias': (3 * C,),
                       f'h.{i}.attn.c_proj.weight': (C, C), f'h.{i}.attn.c_proj.bias': (C,),
                       f'h.{i}.mlp.c_fc.weight': (C, 4 * C), f'h.{i}.mlp.c_fc.bias': (4 * C,),
                       f'h.{i}.mlp.c_proj.weight': (4 * C, C), f'h.{i}.mlp.c_proj.bias': (C,)})
    t = {f'transformer.{k}': (rng.normal(size=s) * (0.3 if len(s) == 2 else 0.1)
                              + k.endswith('ln_1.weight')).astype(np.float32)
         for k, s in shapes.items()}
    t.update({f'transformer.h.{i}.attn.bias':
              np.tril(np.ones((1, 1, cfg.block_size, cfg.block_size), np.float32))
              for i in range(L)})
    path.mkdir(parents=True, exist_ok=True)
    hf.write_safetensors(path / 'model.safetensors', t)
    (path / 'config.json').write_text(json.dumps(dict(
        model_type='gpt2', activation_function='gelu_new', n_layer=L, n_head=cfg.n_head, n_embd=C,
        n_positions=cfg.block_size, vocab_size=cfg.vocab_size, n_inner=None)))
    return {k.removeprefix('transformer.'): v for k, v in t.items()}


def gpt2_reference(t, idx, cfg=HF_CFG):
    """GPT-2's forward pass as Hugging Face's modeling_gpt2 computes it, in numpy float64."""
    t = {k: v.astype(np.float64) for k, v in t.items()}

    def ln(x, p):
        return ((x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
                * t[p + '.weight'] + t[p + '.bias'])
    T, H = len(idx), cfg.n_head
    x = t['wte.weight'][idx] + t['wpe.weight'][:T]
    for i in range(cfg.n_layer):
        h = f'h.{i}.'
        qkv = ln(x, h + 'ln_1') @ t[h + 'attn.c_attn.weight'] + t[h + 'attn.c_attn.bias']
        q, k, v = np.split(qkv, 3, -1)
        q, k, v = (a.reshape(T, H, -1).transpose(1, 0, 2) for a in (q, k, v))  # (H, T, D)
        s = q @ k.transpose(0, 2, 1) / np.sqrt(q.shape[-1]) + np.triu(np.full((T, T), -np.inf), 1)
        a = np.exp(s - s.max(-1, keepdims=True))
        y = ((a / a.sum(-1, keepdims=True)) @ v).transpose(1, 0, 2).reshape(T, -1)
        x = x + y @ t[h + 'attn.c_proj.weight'] + t[h + 'attn.c_proj.bias']
        u = ln(x, h + 'ln_2') @ t[h + 'mlp.c_fc.weight'] + t[h + 'mlp.c_fc.bias']
        u = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u ** 3)))  # gelu_new
        x = x + u @ t[h + 'mlp.c_proj.weight'] + t[h + 'mlp.c_proj.bias']
    return ln(x, 'ln_f') @ t['wte.weight'].T  # the head is tied to the token embedding


@pytest.mark.parametrize('spec', ['data=1,model=1', 'data=2,model=4'])
def test_gpt2_weights_give_gpt2_logits(spec, tmp_path):
    t = hf_folder(tmp_path)
    mesh = mesh_of(spec)
    fields, tokenizer = hf.read_config(tmp_path)
    assert GPTConfig(**fields) == HF_CFG and tokenizer == 'gpt2'
    with jax.set_mesh(mesh):
        graphdef, params, specs = shard.init_params(HF_CFG, mesh, 0, jnp.float32)
        params = hf.load(hf.read_weights(tmp_path, HF_CFG), params)
        idx = tokens(3, (2, 16)) % HF_CFG.vocab_size
        ours = full_logits(graphdef, specs, mesh, params, idx)[..., :HF_CFG.vocab_size]
    for b in range(2):
        np.testing.assert_allclose(ours[b], gpt2_reference(t, idx[b]), atol=1e-4, rtol=1e-4)


def test_export_then_import_is_bit_exact(tmp_path):
    """Params after a training step on a 2x4 mesh, exported and loaded back onto 1x1: every bit."""
    mesh = mesh_of('data=2,model=4')
    with jax.set_mesh(mesh):
        graphdef, params, specs = shard.init_params(HF_CFG, mesh, 0, jnp.float32)
        tx = optim.make_optimizer(tcfg(), params)
        params, _, _ = step_fn(graphdef, specs, mesh, tx, tcfg())(
            params, jax.jit(tx.init)(params), tokens(0) % HF_CFG.vocab_size, jax.random.key(0))
        hf.export(tmp_path, params, HF_CFG, 'gpt2', eot=50256)
        before = jax.device_get(params)
    mesh = mesh_of('data=1,model=1')
    with jax.set_mesh(mesh):
        _, fresh, _ = shard.init_params(HF_CFG, mesh, 1, jnp.float32)
        after = jax.device_get(hf.load(hf.read_weights(tmp_path, HF_CFG), fresh))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('change', [dict(pos='rope'), dict(window=8)])
def test_export_refuses_what_gpt2_lacks(change, tmp_path):
    cfg = dataclasses.replace(HF_CFG, **change)
    mesh = mesh_of('data=1,model=1')
    with jax.set_mesh(mesh):
        _, params, _ = shard.init_params(cfg, mesh, 0, jnp.float32)
        with pytest.raises(ValueError, match='GPT-2 has learned positions'):
            hf.export(tmp_path / 'out', params, cfg, 'gpt2', eot=50256)
    assert not (tmp_path / 'out').exists()


def break_folder(folder, how):
    t = hf.read_safetensors(folder / 'model.safetensors')
    if how == 'missing':
        del t['transformer.h.1.mlp.c_fc.bias']
    if how == 'extra':
        t['transformer.h.2.mlp.c_fc.bias'] = t['transformer.h.1.mlp.c_fc.bias']
    if how == 'misshapen':
        t['transformer.h.0.attn.c_proj.weight'] = t['transformer.h.0.attn.c_proj.weight'][:, :-1]
    hf.write_safetensors(folder / 'model.safetensors', t)
    if how == 'config':
        c = json.loads((folder / 'config.json').read_text())
        (folder / 'config.json').write_text(json.dumps({**c, 'activation_function': 'relu'}))


@pytest.mark.parametrize('how, message', [
    ('missing', 'model.safetensors lacks tensors h.1.mlp.c_fc.bias'),
    ('extra', 'model.safetensors has unexpected tensors h.2.mlp.c_fc.bias'),
    ('misshapen',
     'model.safetensors: h.0.attn.c_proj.weight is (32, 31), but config.json implies (32, 32)'),
    ('config', "config.json has activation_function='relu', but this model is GPT-2")])
def test_bad_gpt2_folder_one_line(how, message, tmp_path):
    hf_folder(tmp_path)
    break_folder(tmp_path, how)
    mesh = mesh_of('data=1,model=1')
    with jax.set_mesh(mesh), pytest.raises(ValueError, match=re.escape(message)):
        _, params, _ = shard.init_params(HF_CFG, mesh, 0, jnp.float32)
        hf.load(hf.read_weights(tmp_path, GPTConfig(**hf.read_config(tmp_path)[0])), params)


# --- train.py and sample.py as a user runs them ---------------------------------------------------

TINY = ['--block_size=16', '--n_layer=2', '--n_head=4', '--n_embd=32', '--batch_size=8',
        '--eval_iters=2', '--log_interval=1', '--sample_tokens=0', '--dtype=float32']


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
    """A small real text (this repo's own source), and a cache folder for its tokens."""
    root = tmp_path_factory.mktemp('corpus')
    (root / 'code.txt').write_text(''.join((HERE / f).read_text()
                                           for f in ('model.py', 'shard.py', 'data.py')))
    return root


def cli(script, corpus, *flags, devices=1, wait=True):
    cmd = [sys.executable, str(HERE / script)]
    if script == 'train.py':
        cmd += [f"--data={corpus / 'code.txt'}", f"--cache_dir={corpus / 'cache'}", *TINY]
    env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
               PYTHONUNBUFFERED='1')
    if not wait:
        return subprocess.Popen(cmd + list(flags), env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd + list(flags), env=env, capture_output=True, text=True, timeout=300)


def losses(out_dir):  # step -> loss, the last logged value of each step
    rows = [json.loads(line) for line in (Path(out_dir) / 'metrics.jsonl').read_text().splitlines()]
    return {r['step']: r['loss'] for r in rows if 'loss' in r}


def test_train_then_sample(corpus, tmp_path):
    r = cli('train.py', corpus, f'--out_dir={tmp_path}', '--max_iters=8', '--eval_interval=4',
            '--sample_tokens=20', f'--memory_profile={tmp_path / "memory.prof"}')
    assert r.returncode == 0, r.stderr
    assert 'val loss' in r.stdout and 'sample:' in r.stdout and 'memory per device' in r.stdout
    assert (tmp_path / 'memory.prof').read_bytes()[:2] == b'\x1f\x8b'  # pprof: gzipped
    # once, not folded into the first step's time
    assert 'compiled the training step in' in r.stdout
    log = losses(tmp_path)
    assert sorted(log) == list(range(1, 9)) and log[8] < log[1]
    r = cli('sample.py', corpus, f'--out_dir={tmp_path}', '--start=def ', '--max_new_tokens=10',
            '--num_samples=2')
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith('def ') and r.stdout.count('---------------') == 2


def test_bench_and_profile(corpus, tmp_path):
    """--bench times the step and prints its figures (not asserted: machines differ); --profile
    writes a trace that TensorBoard or Perfetto can open. Nothing else is written."""
    r = cli('train.py', corpus, f'--out_dir={tmp_path / "out"}', '--bench',
            f'--profile={tmp_path / "trace"}')
    assert r.returncode == 0, r.stderr
    for figure in ('compiled the training step in', 'ms/step', 'tok/s', 'GFLOP/s here',
                   'device memory'):
        assert figure in r.stdout, figure
    assert list((tmp_path / 'trace').rglob('*.xplane.pb')) and not (tmp_path / 'out').exists()


def test_resume_after_sigkill_is_exact(corpus, tmp_path):
    """Kill -9 at a random step, resume, and every step's loss equals an uninterrupted run's,
    bit for bit (dropout on, attention's too, so the step's PRNG keys must line up, as must the
    data cursor; and pruning, whose masks the checkpoint keeps)."""
    # steps take ~3 ms: room to kill
    flags = ['--max_iters=300', '--eval_interval=25', '--dropout=0.1', '--prune=0.5']
    assert cli('train.py', corpus, f'--out_dir={tmp_path / "a"}', *flags).returncode == 0
    p = cli('train.py', corpus, f'--out_dir={tmp_path / "b"}', *flags, wait=False)
    kill_at = np.random.default_rng().integers(30, 100)
    metrics = tmp_path / 'b' / 'metrics.jsonl'
    while (p.poll() is None
           and max(losses(tmp_path / 'b') if metrics.exists() else {}, default=0) < kill_at):
        time.sleep(0.02)
    p.kill()
    assert p.wait() == -9, "the run ended before it could be killed"
    r = cli('train.py', corpus, f'--out_dir={tmp_path / "b"}', *flags, '--resume')
    assert r.returncode == 0 and 'resumed from' in r.stdout, r.stderr
    assert losses(tmp_path / 'b') == losses(tmp_path / 'a')
    rows = [json.loads(line)
            for line in (tmp_path / 'b' / 'metrics.jsonl').read_text().splitlines()]
    steps = [r['step'] for r in rows if 'loss' in r]
    # the steps logged after the checkpoint, then killed, appear once
    assert steps == sorted(set(steps))


def test_resume_on_another_mesh(corpus, tmp_path):
    flags = ['--max_iters=8', '--eval_interval=4']
    r = cli('train.py', corpus, f'--out_dir={tmp_path / "a"}', '--mesh=data=8', *flags, devices=8)
    assert r.returncode == 0, r.stderr
    (tmp_path / 'b').mkdir()
    (tmp_path / 'b' / 'ckpt_0000004.npz').write_bytes(
        (tmp_path / 'a' / 'ckpt_0000004.npz').read_bytes())
    r = cli('train.py', corpus, f'--out_dir={tmp_path / "b"}', '--mesh=data=2,model=4', *flags,
            '--resume', devices=8)
    assert r.returncode == 0 and 'resumed from' in r.stdout, r.stderr
    a, b = losses(tmp_path / 'a'), losses(tmp_path / 'b')
    assert sorted(b) == [5, 6, 7, 8]
    np.testing.assert_allclose([b[s] for s in b], [a[s] for s in b], rtol=1e-5)


def test_fsdp_checkpoint_resumes_without_it(corpus, tmp_path):
    """A run saved with --fsdp resumes without it with the losses it logged itself (float32)."""
    flags = ['--dtype=float32', '--mesh=data=2', '--max_iters=6', '--eval_interval=2']
    r = cli('train.py', corpus, f'--out_dir={tmp_path}', *flags, '--fsdp', '--sample_tokens=5',
            devices=2)
    assert r.returncode == 0 and 'sample:' in r.stdout, r.stderr
    before = losses(tmp_path)
    (tmp_path / 'ckpt_0000006.npz').unlink()  # resume from step 4
    r = cli('train.py', corpus, f'--out_dir={tmp_path}', *flags, '--resume', devices=2)
    assert r.returncode == 0 and 'resumed from' in r.stdout, r.stderr
    after = losses(tmp_path)
    assert (sorted(after) == list(range(1, 7))
            and all(abs(after[s] - before[s]) <= 1e-5 * before[s] for s in before))


def test_checkpoint_loads_into_fsdp_and_back(tmp_path):
    """Saving gathers every shard; loading splits them for the template's layout: a checkpoint
    of plain data parallelism loads into FSDP's layout and back, bit for bit."""
    mesh = mesh_of('data=8,model=1')
    with jax.set_mesh(mesh):
        params = {f: shard.init_params(dataclasses.replace(CFG, fsdp=f), mesh, f, jnp.float32)[1]
                  for f in (1, 8)}
        checkpoint.save(tmp_path / 'plain.npz', shard.gather({'params': params[1]}), {})
        fsdp = shard.place(checkpoint.read(tmp_path / 'plain.npz')[0],
                           {'params': params[8]})['params']
        checkpoint.save(tmp_path / 'fsdp.npz', shard.gather({'params': fsdp}), {})
        back = shard.place(checkpoint.read(tmp_path / 'fsdp.npz')[0],
                           {'params': params[1]})['params']
    for loaded, template in ((fsdp, params[8]), (back, params[1])):
        for a, b, c in zip(jax.tree.leaves(params[1]), jax.tree.leaves(loaded),
                           jax.tree.leaves(template)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            assert b.sharding == c.sharding  # the template's layout, not the checkpoint's


def test_two_processes_equal_one(corpus, tmp_path):
    """2 processes of 4 devices, talking over localhost, train as 1 process of 8 with the same
    mesh: the same loss at every step. Then one process resumes the 2-process run's checkpoint."""
    flags = ['--mesh=data=4,model=2', '--max_iters=4', '--eval_interval=2']
    assert cli('train.py', corpus, f'--out_dir={tmp_path / "one"}', *flags,
               devices=8).returncode == 0
    with socket.socket() as s:  # a free port for process 0's coordinator
        s.bind(('localhost', 0))
        port = s.getsockname()[1]
    procs = [cli('train.py', corpus, f'--out_dir={tmp_path / "two"}', *flags,
                 f'--distributed=localhost:{port},2,{i}', devices=4, wait=False)
             for i in range(2)]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs
    assert 'val loss' in outs[0][0] and 'step' not in outs[1][0]  # process 0 alone prints
    one, two = losses(tmp_path / 'one'), losses(tmp_path / 'two')
    assert sorted(two) == [1, 2, 3, 4] and all(abs(one[s] - two[s]) <= 1e-5 * one[s] for s in one)
    (tmp_path / 'two' / 'ckpt_0000004.npz').unlink()
    r = cli('train.py', corpus, f'--out_dir={tmp_path / "two"}', *flags, '--resume', devices=8)
    assert r.returncode == 0 and 'resumed from' in r.stdout, r.stderr
    resumed = losses(tmp_path / 'two')
    assert (sorted(resumed) == [1, 2, 3, 4]
            and all(abs(resumed[s] - two[s]) <= 1e-5 * two[s] for s in two))


def test_a_peer_that_dies_or_never_comes_is_reported_in_one_line(corpus, tmp_path):
    """--distributed with --peer_timeout=5: a process started alone, one whose peer is killed -9
    mid-run, and one whose peer was given a bad flag each stop with one line within the timeout
    (and a little start-up), not JAX's C++ abort minutes later; two given different seeds both
    stop, in one line, once they have joined."""
    def start(i, port, *extra):
        return cli('train.py', corpus, f'--out_dir={tmp_path / "run"}', '--max_iters=100000',
                   '--mesh=data=2', f'--distributed=localhost:{port},2,{i}', '--peer_timeout=5',
                   *extra, devices=1, wait=False)

    def free_port():
        with socket.socket() as s:
            s.bind(('localhost', 0))
            return s.getsockname()[1]

    alone = start(1, free_port())
    port = free_port()
    pair = [start(0, port), start(1, port)]
    while pair[0].poll() is None and 'step' not in pair[0].stdout.readline():
        pass
    pair[1].kill()
    port = free_port()
    bad = [start(0, port), start(1, port, '--n_embd=30')]
    port = free_port()
    other_seed = [start(0, port), start(1, port, '--seed=2')]  # joins, but would train otherwise
    for p, line in ((alone, 'did not all join'), (pair[0], 'process'),
                    (bad[1], 'not divisible by n_head'), (bad[0], 'did not all join'),
                    (other_seed[0], 'given different flags'),
                    (other_seed[1], 'given different flags')):
        err = p.communicate(timeout=60)[1]
        assert p.returncode == 1 and line in err and len(err.strip().splitlines()) == 1, err


def test_one_run_per_out_dir(corpus, tmp_path):
    """A second run on a live run's out_dir refuses, naming it; kill -9 frees the folder; a
    checkpoint that vanishes as it is read is not called corrupt."""
    first = cli('train.py', corpus, f'--out_dir={tmp_path}', '--max_iters=100000',
                '--eval_interval=5', wait=False)
    try:
        while not list(tmp_path.glob('ckpt_*.npz')):
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.2)
        for resuming in (['--resume'], []):  # a fresh run too: not told to --resume or overwrite
            r = cli('train.py', corpus, f'--out_dir={tmp_path}', '--max_iters=100000',
                    '--eval_interval=5', *resuming)
            assert (r.returncode != 0
                    and f'is in use by a live run (process {first.pid})' in r.stderr), r.stderr
    finally:
        first.kill()
        first.wait()
    r = cli('train.py', corpus, f'--out_dir={tmp_path}', '--max_iters=100000',
            '--eval_interval=5', '--resume', wait=False)
    try:
        while 'resumed from' not in r.stdout.readline():
            assert r.poll() is None, r.stderr.read()
    finally:
        r.kill()
        r.wait()
    with pytest.raises(ValueError, match='vanished while it was being read'):
        checkpoint.read(tmp_path / 'ckpt_9999999.npz')


def test_overwrite_keeps_the_old_run_until_its_first_checkpoint(corpus, tmp_path):
    """--overwrite replaces an old run only once it has a checkpoint of its own: a new run killed
    before its first leaves every file of the old one as it was; one that saves replaces them,
    and metrics.jsonl then holds the new run's steps alone."""
    assert cli('train.py', corpus, f'--out_dir={tmp_path}', '--max_iters=8',
               '--eval_interval=4').returncode == 0
    old = snapshot(tmp_path)
    p = cli('train.py', corpus, f'--out_dir={tmp_path}', '--overwrite', '--max_iters=100000',
            '--eval_interval=100000', wait=False)
    new_log = tmp_path / 'metrics.jsonl.next'  # where it logs until its first checkpoint
    while p.poll() is None and not (new_log.exists() and new_log.stat().st_size):
        time.sleep(0.05)
    p.kill()
    assert p.wait() == -9
    assert {k: v for k, v in snapshot(tmp_path).items() if k in old} == old
    r = cli('train.py', corpus, f'--out_dir={tmp_path}', '--overwrite', '--max_iters=4',
            '--eval_interval=4')
    assert r.returncode == 0, r.stderr
    assert [p.name for p in checkpoint.in_folder(tmp_path)] == ['ckpt_0000004.npz']
    assert sorted(losses(tmp_path)) == [1, 2, 3, 4]


def test_checkpoints_are_ordered_by_their_step(corpus, trained, tmp_path):
    """The newest checkpoint is the one of the highest step, not the last name in text order, and
    a file that only looks like one (a user's ckpt_old.npz, or ckpt_00000012.npz: not as train.py
    names step 12) is not a checkpoint at all."""
    for name in ('ckpt_9999995.npz', 'ckpt_10000000.npz', 'ckpt_old.npz', 'ckpt_0000012.npz.tmp',
                 'ckpt_00000012.npz'):
        (tmp_path / name).write_bytes(b'')
    assert [p.name for p in checkpoint.in_folder(tmp_path)] == ['ckpt_9999995.npz',
                                                                'ckpt_10000000.npz']
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'ckpt_0000004.npz').write_bytes((trained / 'ckpt_0000004.npz').read_bytes())
    (out / 'ckpt_old.npz').write_bytes(b'not a checkpoint')
    r = cli('sample.py', corpus, f'--out_dir={out}', '--max_new_tokens=3')
    assert r.returncode == 0, r.stderr  # it sampled ckpt_0000004, not the junk ckpt_old.npz


def test_resume_past_a_damaged_metrics_log(corpus, tmp_path):
    """A metrics.jsonl cut mid-line (a full disk), or holding a blank, a non-UTF-8 or a stepless
    row, does not stop a resume: the well-formed rows up to the checkpoint are kept, the rest
    dropped with a count, and each step is logged once."""
    flags = ['--max_iters=8', '--eval_interval=4']
    assert cli('train.py', corpus, f'--out_dir={tmp_path}', *flags).returncode == 0
    (tmp_path / 'ckpt_0000008.npz').unlink()
    with open(tmp_path / 'metrics.jsonl', 'ab') as f:
        f.write(b'\n\xff\xfe not UTF-8\n{"loss": 1}\n{"step": 9, "lo')
    r = cli('train.py', corpus, f'--out_dir={tmp_path}', *flags, '--resume')
    assert r.returncode == 0 and 'dropped' in r.stdout, r.stderr
    steps = [row['step'] for row in map(json.loads, open(tmp_path / 'metrics.jsonl'))
             if 'loss' in row]
    assert steps == list(range(1, 9))


@pytest.mark.parametrize('script', ['train.py', 'sample.py'])
def test_impossible_backend_one_line(script, tmp_path):
    """An environment that asks JAX for what cannot be (here: zero CPU devices) gets one line."""
    no_devices = '--xla_force_host_platform_device_count=0'
    env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=no_devices)
    r = subprocess.run([sys.executable, str(HERE / script), f'--out_dir={tmp_path}/out'], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert 'JAX could not start a backend' in r.stderr and not (tmp_path / 'out').exists()


def test_damaged_cache_and_undecodable_names(corpus, trained, tmp_path):
    """A token cache missing its train.bin is named, with the fix, in one line; a file whose name
    is not UTF-8 is read like any other (its bytes are hashed)."""
    shutil.copytree(corpus / 'cache', tmp_path / 'cache')
    for train_bin in (tmp_path / 'cache').glob('*/train.bin'):
        train_bin.unlink()
    r = cli('train.py', corpus, f'--out_dir={tmp_path}/out', f'--cache_dir={tmp_path}/cache')
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert 'is damaged (No such file or directory): delete it' in r.stderr
    (tmp_path / 'texts').mkdir()
    (tmp_path / 'texts' / 'a.txt').write_text((corpus / 'code.txt').read_text())
    (tmp_path / 'texts' / os.fsdecode(b'b\xff.txt')).write_text('x = 1\n' * 2000)
    train, val = data.load_tokens(str(tmp_path / 'texts'), 'byte', tmp_path / 'cache2')
    assert len(train) + len(val) == len((corpus / 'code.txt').read_bytes()) + 12000 + 2


@pytest.mark.parametrize('args, says', [(['sampling', 'out', 'extra'], 'usage:'),
                                         (['sampling', '/no/such/run'], 'no checkpoint in'),
                                         (['nanogpt', '/no/such/clone'], 'model.py not found'),
                                         (['nanogpt', '/x', 'python', 'x'], 'DTYPE is bfloat16')])
def test_bench_bad_arguments_one_line(args, says):
    r = subprocess.run([sys.executable, str(HERE / 'bench.py'), *args], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_port_in_use_one_line(corpus, tmp_path):
    """Process 0 serves --distributed's port; one in use is said before JAX's service crashes."""
    taken = socket.create_server(('', 0))
    port = taken.getsockname()[1]
    r = cli('train.py', corpus, f'--out_dir={tmp_path}/out', f'--distributed=localhost:{port},1,0')
    taken.close()
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f'cannot serve port {port} (Address already in use)' in r.stderr
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('script', ['train.py', 'sample.py'])
def test_closed_output_ends_quietly(script, corpus, trained, tmp_path):
    """`| head`: sample.py ends as Unix tools do (SIGPIPE, no word); train.py, which was training,
    says so in one line. And a terminal that is not UTF-8 gets its text, not a traceback."""
    out = tmp_path / 'out' if script == 'train.py' else trained
    long_run = (['--max_iters=100000', '--eval_interval=100000'] if script == 'train.py'
                else ['--max_new_tokens=100000'])
    p = cli(script, corpus, f'--out_dir={out}', *long_run, wait=False)
    p.stdout.readline()
    p.stdout.close()  # the reader ends
    err = p.stderr.read()
    p.wait(timeout=300)
    if script == 'sample.py':
        assert p.returncode == -signal.SIGPIPE and err == ''
        env = dict(os.environ, PYTHONIOENCODING='ascii')
        r = subprocess.run([sys.executable, str(HERE / script), f'--out_dir={out}',
                            '--max_new_tokens=50'], env=env, capture_output=True, timeout=300)
        assert r.returncode == 0, r.stderr
    else:
        assert p.returncode == 1 and err.strip().splitlines() == [
            'train.py: its output was closed (a pipe\'s reader ended): run again'], err


def test_export_replaces_nothing(corpus, trained, tmp_path):
    """--export writes a new (or empty) folder and refuses one that holds files, with one line; an
    export the disk refuses (a limit on file size stands in) leaves no half of the pair behind."""
    export = ('sample.py', corpus, f'--out_dir={trained}', f'--export={tmp_path}/a')
    assert cli(*export).returncode == 0
    before = snapshot(tmp_path)
    r = cli(*export)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert 'is not an empty folder' in r.stderr and snapshot(tmp_path) == before
    small_disk = ('import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, '
                  'signal.SIG_IGN); resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096)); '
                  'sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name="__main__")')
    r = subprocess.run([sys.executable, '-c', small_disk, str(HERE / 'sample.py'),
                        f'--out_dir={trained}', f'--export={tmp_path}/b'], capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, JAX_COMPILATION_CACHE_DIR=''))
    assert r.returncode == 1 and 'cannot be written (File too large)' in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and list((tmp_path / 'b').iterdir()) == []


def test_full_disk_one_line_previous_checkpoint_kept(corpus, tmp_path):
    """A save that the disk refuses (a limit on file size stands in for a full disk) stops the run
    with one line; its temporary file is gone and the previous checkpoint is still the newest. An
    --overwrite run whose first save fails leaves the old run as it was, its own log gone too."""
    flags = ['--max_iters=8', '--eval_interval=4']
    assert cli('train.py', corpus, f'--out_dir={tmp_path}', *flags).returncode == 0
    (tmp_path / 'ckpt_0000008.npz').unlink()
    limit = (tmp_path / 'ckpt_0000004.npz').stat().st_size // 2
    small_disk = ('import os, resource, signal, sys; n = int(sys.argv[1]); '
                  'signal.signal(signal.SIGXFSZ, signal.SIG_IGN); '  # a write past n fails
                  'resource.setrlimit(resource.RLIMIT_FSIZE, (n, n)); '
                  'os.execv(sys.executable, [sys.executable] + sys.argv[2:])')
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')

    def run(*extra, limit=limit):
        return subprocess.run([sys.executable, '-c', small_disk, str(limit),
                               str(HERE / 'train.py'), f"--data={corpus / 'code.txt'}",
                               f"--cache_dir={corpus / 'cache'}", *TINY, f'--out_dir={tmp_path}',
                               *flags, *extra], env=env, capture_output=True, text=True,
                              timeout=300)

    r = run('--resume')
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert 'could not write' in r.stderr and 'ckpt_0000004.npz' in r.stderr
    assert [p.name for p in tmp_path.iterdir() if p.suffix == '.tmp'] == []
    assert [p.name for p in checkpoint.in_folder(tmp_path)] == ['ckpt_0000004.npz']
    before = snapshot(tmp_path)
    r = run('--overwrite', '--seed=7')  # a new run over the old: its first save fails
    assert r.returncode != 0 and 'then --overwrite again' in r.stderr, r.stderr
    assert snapshot(tmp_path) == before  # the old run as it was, and no metrics.jsonl.next
    r = run('--overwrite', '--seed=7', limit=10)  # not even its first log line fits
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert 'File too large' in r.stderr and snapshot(tmp_path) == before


def test_signal_before_training_one_line(corpus, tmp_path):
    """SIGTERM while the step compiles stops the run with one line (or, if it lands once the loop
    runs, saves and exits 0): never a traceback, never killed without a word."""
    p = cli('train.py', corpus, f'--out_dir={tmp_path}', '--max_iters=100000', wait=False)
    while p.poll() is None and not p.stdout.readline().startswith('data:'):
        pass
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    if p.returncode == 0:
        assert 'stopped by signal' in out
    else:
        assert p.returncode == 1 and 'stopped by a signal outside the loop' in err, err
        assert len(err.strip().splitlines()) == 1 and not list(tmp_path.glob('ckpt_*'))


def test_sampling_far_past_the_context_streams_each_token_once(corpus, trained, monkeypatch,
                                                               capsys):
    """Streaming costs the same per token at token 2,000 as at token 10: each new token's bytes go
    through an incremental decoder once, and the whole text is never decoded again."""
    whole_decodes, token_bytes = [], []
    decode, to_bytes = data.ByteTokenizer.decode, data.ByteTokenizer.to_bytes
    monkeypatch.setattr(data.ByteTokenizer, 'decode',
                        lambda self, ids: whole_decodes.append(len(ids)) or decode(self, ids))
    monkeypatch.setattr(data.ByteTokenizer, 'to_bytes',
                        lambda self, ids: token_bytes.append(len(ids)) or to_bytes(self, ids))
    sample.main([f'--out_dir={trained}', '--max_new_tokens=2000', '--num_samples=1',
                 '--temperature=0'])
    assert len(capsys.readouterr().out) > 2000
    assert whole_decodes == [1]  # the prompt, once
    assert token_bytes.count(1) >= 2000 and max(token_bytes) == 1


def test_half_written_checkpoint_leaves_the_previous_one(corpus, tmp_path):
    r = cli('train.py', corpus, f'--out_dir={tmp_path}', '--max_iters=12', '--eval_interval=4')
    assert r.returncode == 0, r.stderr
    # a kill during a save leaves the temporary file half written; it is never the newest checkpoint
    half = (tmp_path / 'ckpt_0000012.npz').read_bytes()
    (tmp_path / 'ckpt_0000012.npz').unlink()
    (tmp_path / 'ckpt_0000012.npz.4242.tmp').write_bytes(half[:len(half) // 2])
    (tmp_path / 'ckpt_notes.tmp').write_text("a user's file, named like one")
    r = cli('train.py', corpus, f'--out_dir={tmp_path}', '--max_iters=12', '--eval_interval=4',
            '--resume')
    assert r.returncode == 0 and 'ckpt_0000008.npz at step 8' in r.stdout, r.stderr
    assert sorted(p.name for p in tmp_path.glob('*.tmp')) == ['ckpt_notes.tmp']  # its space freed


def test_save_is_atomic(tmp_path, monkeypatch):
    """A save that dies half way (here: the writer raises) leaves the old checkpoint whole."""
    path = tmp_path / 'ckpt.npz'
    checkpoint.save(path, shard.gather({'w': jnp.ones(3)}), {'step': 1})

    def dies_half_way(f, **arrays):
        f.write(b'PK\x03\x04 half a zip')
        raise KeyboardInterrupt
    monkeypatch.setattr(np, 'savez', dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(path, shard.gather({'w': jnp.zeros(3)}), {'step': 2})
    arrays, meta = checkpoint.read(path)
    assert meta == {'step': 1} and arrays["['w']"].tolist() == [1, 1, 1]


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT])  # pre-emption, and Ctrl-C
def test_signal_saves_and_exits_cleanly(sig, corpus, tmp_path):
    # log_interval 10**5: the run stops after the current step, not at a log step minutes later;
    # eval_iters 10**6: an evaluation would take hours, so the run must save and exit without one
    p = cli('train.py', corpus, f'--out_dir={tmp_path}', '--max_iters=100000',
            '--eval_interval=100000', '--log_interval=100000', '--eval_iters=1000000', wait=False)
    while p.poll() is None and 'compiled the training step' not in p.stdout.readline():
        pass
    time.sleep(1)
    p.send_signal(sig)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    step = int(re.search(r'stopped by signal at step (\d+)', out).group(1))
    assert (tmp_path / f'ckpt_{step:07d}.npz').exists() and 'val loss' not in out
    assert sorted(losses(tmp_path)) == list(range(1, step + 1))  # no step's loss was dropped


def test_nonfinite_loss_stops_and_keeps_the_checkpoint(corpus, tmp_path):
    flags = ['--max_iters=8', '--eval_interval=4']
    assert cli('train.py', corpus, f'--out_dir={tmp_path}', *flags).returncode == 0
    (tmp_path / 'ckpt_0000008.npz').unlink()
    with np.load(tmp_path / 'ckpt_0000004.npz') as f:  # a weight far too big: finite, but the
        arrays = {k: f[k] for k in f.files}  # gradients overflow, and a later loss is nan
    c_fc = "['params']['h']['mlp']['c_fc'].value"
    arrays[c_fc] = arrays[c_fc] * np.float32(1e30)
    np.savez(tmp_path / 'ckpt_0000004.npz', **arrays)
    before = snapshot(tmp_path)
    r = cli('train.py', corpus, f'--out_dir={tmp_path}', *flags, '--resume')
    assert r.returncode != 0 and re.search(r'the loss became nan at step [5-8]', r.stderr), r.stderr
    assert ({k: v for k, v in snapshot(tmp_path).items() if 'ckpt' in k}
            == {k: v for k, v in before.items() if 'ckpt' in k})


def snapshot(folder):  # every file but the lock, which holds the pid of the last run to start
    return {str(p): p.read_bytes()
            for p in Path(folder).rglob('*') if p.is_file() and p.name != 'lock'}


@pytest.fixture(scope='module')
def trained(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp('trained')
    assert cli('train.py', corpus, f'--out_dir={out}', '--max_iters=4',
               '--eval_interval=4').returncode == 0
    return out


BAD = {  # flags -> what the one-line message must say
    'missing data': (['--out_dir={fresh}', '--data=/no/such/file.txt'],
                     'no regular file, folder or glob match'),
    'empty data': (['--out_dir={fresh}', '--data={empty}'], 'the dataset is empty'),
    'data shorter than a batch': (['--out_dir={fresh}', '--data={tiny}'], 'fewer than one batch'),
    'val split too small': (['--out_dir={fresh}', '--data={short}', '--batch_size=4'],
                            'the val split has'),
    'mesh size': (['--out_dir={fresh}', '--mesh=data=3'], 'needs 3 devices but 2 are present'),
    'mesh syntax': (['--out_dir={fresh}', '--mesh=pipeline=2'], 'write it as data=N,model=M'),
    'batch not divisible': (['--out_dir={fresh}', '--batch_size=6', '--grad_accum=4'],
                            'not divisible by data axis x grad_accum'),
    'heads not divisible': (['--out_dir={fresh}', '--mesh=model=2', '--n_head=3', '--n_embd=48'],
                            'not divisible by the model axis'),
    'unknown flag': (['--learning_rat=1e-3'], "unknown flag '--learning_rat=1e-3'"),
    'wrong type': (['--batch_size=lots'], "--batch_size='lots' is not a valid int"),
    'unknown preset': (['--preset=gpt5'], "unknown preset 'gpt5'"),
    'unknown dtype': (['--out_dir={fresh}', '--dtype=float16'],
                      "--dtype='float16' is not one of bfloat16, float32"),
    'unknown attention': (['--out_dir={fresh}', '--attention=flash'],
                          "--attention='flash' is not one of xla, blockwise, cudnn"),
    'empty --data': (['--out_dir={fresh}', '--data='], "--data is empty: pass stdlib"),
    'unknown tokenizer': (['--out_dir={fresh}', '--tokenizer=sentencepiece'],
                          "--tokenizer='sentencepiece' is not one of byte, gpt2"),
    'resume without checkpoint': (['--out_dir={fresh}', '--resume'], 'no checkpoint in'),
    'out_dir with a newline': (['--out_dir={fresh}\nx', '--resume'], 'fresh\\nx/: drop --resume'),
    'init_from a folder without GPT-2': (['--out_dir={fresh}', '--init_from={fresh}'],
                                         'no usable config.json'),
    'corrupt checkpoint': (['--out_dir={corrupt}', '--resume'], 'is corrupt or truncated'),
    'checkpoint of another shape': (['--resume', '--n_layer=3'], 'was trained with --n_layer=2'),
    'resume with another schedule': (['--resume', '--max_iters=9'],
                                     'was trained with --max_iters=4'),
    'new run over a checkpoint': ([], 'already holds checkpoints: pass --resume'),
    'unwritable out_dir': (['--out_dir={file}/out'], 'cannot be written'),
    # every numeric flag has its range, checked before anything runs
    'negative learning rate': (['--out_dir={fresh}', '--learning_rate=-1'],
                               '--learning_rate=-1.0 must be in (0, 100]'),
    'no clipping': (['--out_dir={fresh}', '--grad_clip=0'], '--grad_clip=0.0 must be in (0, 1e6]'),
    'beta1 of 2': (['--out_dir={fresh}', '--beta1=2'], '--beta1=2.0 must be in [0, 1)'),
    'negative steps': (['--out_dir={fresh}', '--max_iters=-5'],
                       '--max_iters=-5 must be in [0, 2**31)'),
    'negative warmup': (['--out_dir={fresh}', '--warmup_iters=-1'],
                        '--warmup_iters=-1 must be in [0, 2**31)'),
    'seed beyond 64 bits': (['--out_dir={fresh}', '--seed=' + '9' * 25], 'must be in [0, 2**63)'),
    'negative seed': (['--out_dir={fresh}', '--seed=-1'], '--seed=-1 must be in [0, 2**63)'),
    # the outside world, and the files given: each checked before a file is written
    'data name too long': (['--out_dir={fresh}', '--data=' + 'a' * 5000], 'cannot be read'),
    'cache_dir under a file': (['--out_dir={fresh}', '--cache_dir={file}/cache'],
                               'cannot hold the tokens'),
    'cudnn on a CPU': (['--out_dir={fresh}', '--attention=cudnn'], 'needs an NVIDIA GPU'),
    'train.bin of odd length': (['--out_dir={fresh}', '--data={odd_bins}'], 'an odd length'),
    'empty train.bin': (['--out_dir={fresh}', '--data={empty_bins}'], 'train.bin is empty'),
    'token ids beyond the vocabulary late': (['--out_dir={fresh}', '--data={late_bins}'],
                                             'holds token ids beyond'),
    'GPT-2 config with no heads': (['--out_dir={fresh}', '--init_from={hf_no_heads}'],
                                   'has n_head=0'),
    'GPT-2 config of 10**30 positions': (['--out_dir={fresh}', '--init_from={hf_huge_context}'],
                                         'has block_size=' + str(10**30)),
    'safetensors a FIFO': (['--out_dir={fresh}', '--init_from={hf_fifo}'],
                           'not a regular file'),
    'checkpoint a FIFO': (['--out_dir={ckpt_fifo}', '--resume'], 'is corrupt or truncated'),
    'GPT-2 config a JSON list': (['--out_dir={fresh}', '--init_from={hf_list}'],
                                 'no usable config.json'),
    'safetensors header of 2**40': (['--out_dir={fresh}', '--init_from={hf_huge_header}'],
                                    'more than the file holds'),
    'safetensors tensors sharing bytes': (['--out_dir={fresh}', '--init_from={hf_overlap}'],
                                          "tensors' bytes overlap"),
    'safetensors with trailing bytes': (['--out_dir={fresh}', '--init_from={hf_trailing}'],
                                        'do not end at its end'),
    'GPT-2 weights with NaN': (['--out_dir={fresh}', '--init_from={hf_nan}'],
                               'holds NaN or infinite values'),
    'checkpoint of step -7': (['--out_dir={step_minus_7}', '--resume'], 'no valid step'),
    'checkpoint without a cursor': (['--out_dir={no_cursor}', '--resume'], 'no valid cursor'),
    'metrics.jsonl a folder': (['--out_dir={metrics_folder}', '--resume'], 'is a folder'),
    'metrics.jsonl a link out of out_dir': (['--out_dir={metrics_link}', '--max_iters=4'],
                                            'a device or a link'),
    'port out of range': (['--out_dir={fresh}', '--distributed=localhost:99999,2,0'],
                          'a port from 1 to 65535'),
    'port 0': (['--out_dir={fresh}', '--distributed=localhost:0,1,0'], 'a port from 1 to 65535'),
    'negative window': (['--out_dir={fresh}', '--window=-1'], '--window=-1 must be in [0, 2**24]'),
    'unknown positions': (['--out_dir={fresh}', '--pos=alibi'],
                          "--pos='alibi' is not one of learned, rope"),
    'RoPE with an odd head size': (['--out_dir={fresh}', '--pos=rope', '--n_embd=36'],
                                   'needs an even head size'),
    'pruning everything': (['--out_dir={fresh}', '--prune=1'], '--prune=1.0 must be in [0, 1)'),
    'no pruning interval': (['--out_dir={fresh}', '--prune=0.5', '--prune_interval=0'],
                            '--prune_interval=0 must be in [1, 2**24]'),
    'process count beyond C++ int': (['--out_dir={fresh}', '--distributed=localhost:1234,' +
                                      '9' * 20 + ',0'], 'N at most 65536'),
    'port in full-width digits': (['--out_dir={fresh}', '--distributed=localhost:\uff11\uff12,1,0'],
                                  "write auto, or HOST:PORT,N,I"),
    'process id beyond the count': (['--out_dir={fresh}', '--distributed=localhost:1234,2,5'],
                                    'id I below the count N'),
    'profile without bench': (['--out_dir={fresh}', '--profile={fresh}/trace'],
                              '--profile traces --bench'),
    'profile folder that cannot be': (['--out_dir={fresh}', '--bench', '--profile={file}/trace'],
                                      'trace cannot be made there (Not a directory)'),
    'profile of a run refused later': (['--out_dir={fresh}', '--bench', '--profile={fresh}/trace',
                                        '--data=/no/such/file.txt'], 'no regular file'),
    'checkpoint of another dtype': (['--out_dir={float64_wte}', '--resume', '--max_iters=4'],
                                    "['params']['wte'].value is float64[256, 32]"),
    'checkpoint with NaN weights': (['--out_dir={nan_wte}', '--resume', '--max_iters=4'],
                                    'holds NaN or infinite weights'),
    'lock a link to a checkpoint': (['--out_dir={lock_link}', '--resume', '--max_iters=4'],
                                    'cannot be used as a lock'),
    'memory profile onto a checkpoint': (['--resume', '--max_iters=4',
                                          '--memory_profile={trained}/ckpt_0000004.npz'],
                                         'name a new file in a folder that exists'),
    'memory profile named as a folder': (['--out_dir={fresh}', '--memory_profile={fresh}/'],
                                         'name a new file in a folder that exists'),
    'memory profile name too long': (['--out_dir={fresh}', '--memory_profile=' + 'x' * 300],
                                     'name a new file in a folder that exists'),
    'checkpoint copied under a later name': (['--out_dir={copied}', '--resume', '--max_iters=4'],
                                             'holds step 4, not its name'),
    'dropout resumed with other micro-batches': (['--out_dir={dropout_run}', '--resume',
                                                  '--max_iters=4', '--dropout=0.1',
                                                  '--grad_accum=2'],
                                                 'was trained with --grad_accum=1'),
    'checkpoint config lacking a flag': (['--out_dir={no_learning_rate}', '--resume',
                                          '--learning_rate=0.001'],
                                         '--learning_rate=0.002'),
    'a lock that is a FIFO, a new run': (['--out_dir={lock_fifo}', '--max_iters=4'],
                                         'already holds checkpoints'),
    'a lock that is a FIFO, resumed': (['--out_dir={lock_fifo}', '--max_iters=4', '--resume'],
                                       'cannot be used as a lock (not a regular file)'),
    'params dtype changed on resume': (['--out_dir={bf16_only}', '--max_iters=4', '--resume',
                                        '--master_weights=False'],
                                       'was trained with --dtype=bfloat16'),
    'evaluating untrained weights': (['--out_dir={fresh}', '--eval_only'],
                                     'evaluates trained weights: add --resume'),
    'empty cache_dir': (['--out_dir={fresh}', '--cache_dir='], '--cache_dir is empty'),
    'resumed on edited data': (['--out_dir={other_tokens}', '--resume', '--max_iters=4'],
                               'was trained on other tokens than --data holds now'),
    'header model of another vocabulary': (['--out_dir={vocab_in_padding}', '--resume',
                                            '--max_iters=4'], "model header does not match"),
}


def bad_inputs(tmp_path, trained):
    """The files BAD's flags name, made in tmp_path -> {name: path}."""
    (tmp_path / 'empty.txt').write_text('')
    (tmp_path / 'tiny.txt').write_text('too short')
    (tmp_path / 'short.txt').write_text('x' * 600)  # 540 train tokens, 60 val: fewer than 4 x 17
    (tmp_path / 'file').write_text('a file, not a folder')
    corrupt = tmp_path / 'corrupt'
    corrupt.mkdir()
    (corrupt / 'ckpt_0000004.npz').write_bytes((trained / 'ckpt_0000004.npz').read_bytes()[:5000])
    (corrupt / 'ckpt_0000008.npz.4242.tmp').write_bytes(b'a killed save: kept until the next one')
    ids = np.arange(2 * 10**6, dtype=np.uint16) % 200
    ids[-1] = 300  # beyond the byte tokenizer's 256, after the first million tokens
    for name, train_bin in (('odd_bins', b'abc'), ('empty_bins', b''), ('late_bins', ids)):
        (tmp_path / name).mkdir()
        (tmp_path / name / 'train.bin').write_bytes(bytes(train_bin))
        (tmp_path / name / 'val.bin').write_bytes(ids[:10**4].tobytes())
    byte_gpt2 = dataclasses.replace(HF_CFG, vocab_size=256)
    for name in ('hf_no_heads', 'hf_list', 'hf_huge_header', 'hf_nan', 'hf_huge_context',
                 'hf_fifo', 'hf_overlap', 'hf_trailing'):
        t = hf_folder(tmp_path / name, byte_gpt2)
        config = json.loads((tmp_path / name / 'config.json').read_text())
        (tmp_path / name / 'config.json').write_text(json.dumps(
            [config] if name == 'hf_list' else
            {**config, 'jaxgpt_tokenizer': 'byte', 'n_head': 0 if name == 'hf_no_heads' else 4,
             'n_positions': 10**30 if name == 'hf_huge_context' else config['n_positions']}))
    with open(tmp_path / 'hf_trailing' / 'model.safetensors', 'ab') as f:
        f.write(bytes(1000))  # bytes no tensor owns
    (tmp_path / 'hf_fifo' / 'model.safetensors').unlink()
    os.mkfifo(tmp_path / 'hf_fifo' / 'model.safetensors')
    raw = (tmp_path / 'hf_huge_header' / 'model.safetensors').read_bytes()
    (tmp_path / 'hf_huge_header' / 'model.safetensors').write_bytes((2**40).to_bytes(8, 'little')
                                                                    + raw[8:])
    raw = (tmp_path / 'hf_overlap' / 'model.safetensors').read_bytes()
    n = int.from_bytes(raw[:8], 'little')
    header = json.loads(raw[8:8 + n])
    first, second = [name for name in header if name.endswith('c_proj.bias')][:2]
    header[second]['data_offsets'] = header[first]['data_offsets']  # same shape, same bytes
    text = json.dumps(header).encode()
    (tmp_path / 'hf_overlap' / 'model.safetensors').write_bytes(
        len(text).to_bytes(8, 'little') + text + raw[8 + n:])
    hf.write_safetensors(tmp_path / 'hf_nan' / 'model.safetensors',
                         {**t, 'h.0.mlp.c_fc.bias': t['h.0.mlp.c_fc.bias'] * np.nan})
    arrays, meta = checkpoint.read(trained / 'ckpt_0000004.npz')
    config = {k: v for k, v in meta['config'].items() if k != 'learning_rate'}
    wte = "['params']['wte'].value"
    for name, header, held in (
            ('step_minus_7', {**meta, 'step': -7}, arrays),
            ('no_cursor', {k: v for k, v in meta.items() if k != 'cursor'}, arrays),
            ('float64_wte', meta, {**arrays, wte: arrays[wte].astype(np.float64)}),
            ('nan_wte', meta, {**arrays, wte: arrays[wte] * np.nan}),
            ('lock_link', meta, arrays),
            ('dropout_run', {**meta, 'config': {**meta['config'], 'dropout': 0.1}}, arrays),
            ('no_learning_rate', {**meta, 'config': config}, arrays),
            ('vocab_in_padding', {**meta, 'model': {**meta['model'], 'vocab_size': 200}}, arrays),
            ('other_tokens', {**meta, 'tokens_crc': [1, 2]}, arrays),
            ('lock_fifo', meta, arrays),
            ('bf16_only', {**meta, 'config': {**meta['config'], 'master_weights': False,
                                              'dtype': 'bfloat16'}}, arrays)):
        checkpoint.save(tmp_path / name / 'ckpt_0000004.npz', held, header)
        (tmp_path / name / 'metrics.jsonl').write_bytes((trained / 'metrics.jsonl').read_bytes())
    (tmp_path / 'copied').mkdir()
    for name in ('ckpt_0000004.npz', 'ckpt_0000012.npz'):
        (tmp_path / 'copied' / name).write_bytes((trained / 'ckpt_0000004.npz').read_bytes())
    (tmp_path / 'lock_link' / 'lock').symlink_to(tmp_path / 'lock_link' / 'ckpt_0000004.npz')
    os.mkfifo(tmp_path / 'lock_fifo' / 'lock')
    (tmp_path / 'ckpt_fifo').mkdir()
    os.mkfifo(tmp_path / 'ckpt_fifo' / 'ckpt_0000004.npz')
    (tmp_path / 'metrics_link').mkdir()
    (tmp_path / 'metrics_link' / 'metrics.jsonl').symlink_to(tmp_path / 'file')  # a user's file
    (tmp_path / 'metrics_folder' / 'metrics.jsonl').mkdir(parents=True)
    checkpoint.save(tmp_path / 'metrics_folder' / 'ckpt_0000004.npz', arrays, meta)
    names = ['empty', 'tiny', 'short']
    return dict({name: tmp_path / f'{name}.txt' for name in names}, file=tmp_path / 'file',
                fresh=tmp_path / 'fresh', corrupt=corrupt,
                **{p.name: p for p in tmp_path.iterdir() if p.is_dir() and p.name != 'corrupt'})


@pytest.mark.parametrize('case', BAD)
def test_bad_input_one_line_nothing_touched(case, corpus, trained, tmp_path):
    flags, message = BAD[case]
    names = bad_inputs(tmp_path, trained)
    before = snapshot(trained), snapshot(tmp_path)
    given = [f.format(**names, trained=trained) for f in flags]
    r = cli('train.py', corpus, f'--out_dir={trained}', *given, devices=2)
    assert r.returncode != 0
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert (snapshot(trained), snapshot(tmp_path)) == before
    assert not (tmp_path / 'fresh').exists()  # no out_dir made where there was none
