"""Attention, every way this project computes it: q (B, Tq, H, D), k and v (B, Tk, H, D) ->
(B, Tq, H, D). A query sees the keys at positions up to its own (causal) and, with a sliding
window of W, only the W newest of those, its own included. Three implementations of one function:

  xla        the textbook formula, the (B, H, Tq, Tk) probabilities held in memory
  blockwise  flash attention (Dao et al., 2022) in plain JAX: one block of keys at a time, so
             memory grows as T x block, not T x T; with a window, the blocks no query of a block
             can see are skipped, so time grows as T x W
  cudnn      NVIDIA's fused kernel

And what acts on q and k around them: rotary position embeddings (RoPE), and attention dropout,
whose mask is a hash of the key and each score's coordinates, so that blockwise (forward and
backward, block by block) drops exactly what xla drops.

Needs: nothing from the other files.
"""
import math
from functools import partial

import jax
import jax.numpy as jnp
from jax.extend.random import threefry2x32_p

f32 = jnp.float32
NOWHERE = 2**30  # the position of a padding key: causal masking hides it from every query


def visible(q_pos, k_pos, window=0):
    """(Tq, Tk) bool: a query sees a key at or before it, within the window (0: no window). A key
    at a negative position is not there (an unwritten slot of the sampler's KV cache)."""
    behind = q_pos[:, None] - k_pos[None, :]
    seen = (behind >= 0) & (k_pos[None, :] >= 0)
    return seen & (behind < window) if window else seen


def rope(x, pos):
    """Rotary position embeddings (Su et al., 2021), x (B, T, H, D), pos (T,). Dimensions i and
    i + D/2 are a 2-D vector, rotated by the angle pos * 10000^(-2i/D). Rotating q by angle a and
    k by angle b turns their dot product by b - a only: attention then sees relative positions."""
    half = x.shape[-1] // 2
    angle = pos[:, None] * 10000.0 ** (-jnp.arange(half) / half)  # (T, D/2)
    cos, sin = jnp.cos(angle)[:, None], jnp.sin(angle)[:, None]  # (T, 1, D/2): one per head
    x1, x2 = jnp.split(x.astype(f32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).astype(x.dtype)


def kept(drop, b, h, q_pos, k_pos):
    """Attention dropout's mask: True where a probability is kept. drop: (key, rate, the global
    index of each local head). b, h, q_pos and k_pos index each score (sequence, local head,
    positions), broadcast together. Threefry, JAX's own hash, keyed by the PRNG key, hashes
    (sequence, head) and then (query position, key position): any block of the mask equals the
    same block of the whole."""
    key, rate, heads = drop
    k1, k2 = jax.random.key_data(key)
    u32 = partial(jnp.asarray, dtype=jnp.uint32)
    s1, s2 = _threefry(k1, k2, u32(b), u32(heads[h]))
    bits, _ = _threefry(s1, s2, u32(q_pos), u32(k_pos))
    return bits >= u32(rate * 2.0**32)


def _threefry(*words):  # (key, key, count, count) uint32, broadcast -> two words of hash
    # all of one shape and one type: a key that varies over 'data' and heads that vary over
    # 'model' would give the hash's inner loop a carry of two types
    zero = (words[0] ^ words[1] ^ words[2] ^ words[3]) & 0
    return threefry2x32_p.bind(*(w ^ zero for w in words))


@jax.custom_vjp
def softmax(s):  # over the last axis
    return jax.nn.softmax(s, axis=-1)


def _softmax_fwd(s):
    p = softmax(s)
    return p, p


def _softmax_bwd(p, dp):
    """d(score) = p (dp - sum_k p dp): the backward needs only the probabilities. Differentiated
    as written, jax.nn.softmax keeps its exps and sums too, and the whole step's memory for
    the baby GPT grows by a quarter (README: Performance)."""
    return (p * (dp - jnp.sum(p * dp, -1, keepdims=True)),)


softmax.defvjp(_softmax_fwd, _softmax_bwd)


def probabilities(q, k, q_pos, k_pos, window=0):
    """The softmax of the scaled scores, (B, H, Tq, Tk) float32: what the xla path multiplies the
    values by (before dropout), and what viz.py draws."""
    s = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=f32) / math.sqrt(q.shape[-1])
    return softmax(jnp.where(visible(q_pos, k_pos, window), s, -jnp.inf))


def attention(q, k, v, q_pos, k_pos, impl='xla', window=0, drop=None):
    """drop: (key, rate, heads) for attention dropout in training, else None."""
    if impl == 'cudnn':  # train.py refuses it with dropout: the kernel has none
        local = (window - 1, 0) if window else None
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=local,
                                            implementation='cudnn')
    if impl == 'blockwise':
        return blockwise_attention(q, k, v, q_pos, k_pos, window, drop)
    p = probabilities(q, k, q_pos, k_pos, window)
    if drop is not None:
        B, H, Tq, Tk = p.shape
        keep = kept(drop, jnp.arange(B)[:, None, None, None], jnp.arange(H)[:, None, None],
                    q_pos[:, None], k_pos)
        p = jnp.where(keep, p / (1 - drop[1]), 0)
    return jnp.einsum('bhqk,bkhd->bqhd', p.astype(v.dtype), v)


# --- blockwise: flash attention ------------------------------------------------------------------
def blockwise_attention(q, k, v, q_pos, k_pos, window=0, drop=None, block=128):
    """The same function, for queries and keys at the same positions (training, a prefill).

    Queries and keys are cut into blocks of `block`. A `lax.scan` walks key blocks, step j
    handing query block i the key block i - n + 1 + j, so that in n steps each query block meets
    the n key blocks that end at its own: all of them, causal, or the few that a window reaches.
    Each query keeps a running max m of its scores, the running total of exp(score - m), and o,
    the values weighted so; a block with a larger max rescales what came before by
    exp(m_old - m_new), and o / total ends the softmax. The backward (custom_vjp below) recomputes
    each block's probabilities from the saved m + log(total)."""
    pad = -q.shape[1] % block
    q, k, v = (jnp.pad(a, [(0, 0), (0, pad), (0, 0), (0, 0)]) for a in (q, k, v))
    q_pos = jnp.pad(q_pos, (0, pad), mode='edge')  # padding queries copy the last: finite
    k_pos = jnp.pad(k_pos, (0, pad), constant_values=NOWHERE)
    blocks = q.shape[1] // block
    n = blocks if not window else min(blocks, -(-(window - 1) // block) + 1)
    out = _flash(q, k, v, q_pos, k_pos, window, drop, block, n)
    return out[:, :out.shape[1] - pad]


def _blocks(a, block):  # (B, T, ...) -> (B, T / block, block, ...)
    return a.reshape(a.shape[0], -1, block, *a.shape[2:])


def _key_blocks(k, v, k_pos, block, n):
    """-> the key blocks, (B, n - 1 + T / block, block, H, D) for k and v, (.., block) positions:
    n - 1 blocks of padding first, so that query block i's j-th key block is block i + j."""
    k, v = (jnp.pad(_blocks(a, block), [(0, 0), (n - 1, 0)] + [(0, 0)] * 3) for a in (k, v))
    return k, v, jnp.pad(k_pos.reshape(-1, block), [(n - 1, 0), (0, 0)],
                         constant_values=NOWHERE)


def _step_blocks(kb, vb, kb_pos, j, count):  # step j's key block for each of count query blocks
    take = partial(jax.lax.dynamic_slice_in_dim, start_index=j, slice_size=count)
    return take(kb, axis=1), take(vb, axis=1), take(kb_pos, axis=0)


def _scores(q, kj, q_pos, kj_pos, window):  # -> (B, nq, bq, H, bk) scores, masked, float32
    s = jnp.einsum('bnqhd,bnkhd->bnqhk', q, kj, preferred_element_type=f32)
    s = s / math.sqrt(q.shape[-1])
    seen = jax.vmap(visible, (0, 0, None))(q_pos, kj_pos, window)  # (nq, bq, bk)
    return jnp.where(seen[None, :, :, None, :], s, -1e30)  # finite: a block may hide all


def _dropped(p, drop, q_pos, kj_pos):  # p (B, nq, bq, H, bk) -> p with dropout, as xla's
    if drop is None:
        return p
    B, _, _, H, _ = p.shape
    keep = kept(drop, jnp.arange(B)[:, None, None, None, None], jnp.arange(H)[:, None],
                q_pos[:, :, None, None], kj_pos[:, None, None, :])
    return jnp.where(keep, p / (1 - drop[1]), 0)


@partial(jax.custom_vjp, nondiff_argnums=(5, 7, 8))
def _flash(q, k, v, q_pos, k_pos, window, drop, block, n):
    return _flash_fwd(q, k, v, q_pos, k_pos, window, drop, block, n)[0]


def _flash_fwd(q, k, v, q_pos, k_pos, window, drop, block, n):
    qb, qb_pos = _blocks(q, block), q_pos.reshape(-1, block)  # (B, nq, bq, H, D), (nq, bq)
    kb, vb, kb_pos = _key_blocks(k, v, k_pos, block, n)

    def step(carry, j):
        o, m, total = carry  # (B, nq, bq, H, D), (B, nq, bq, H), (B, nq, bq, H), all float32
        kj, vj, kj_pos = _step_blocks(kb, vb, kb_pos, j, qb.shape[1])
        s = _scores(qb, kj, qb_pos, kj_pos, window)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.exp(s - m_new[..., None])  # (B, nq, bq, H, bk)
        rescale = jnp.exp(m - m_new)  # the old weights were relative to the old max
        pv = jnp.einsum('bnqhk,bnkhd->bnqhd', _dropped(p, drop, qb_pos, kj_pos).astype(vj.dtype),
                        vj, preferred_element_type=f32)
        return (o * rescale[..., None] + pv, m_new, total * rescale + p.sum(-1)), None

    o = jnp.zeros_like(qb, f32)
    m = jnp.full_like(qb[..., 0], -jnp.inf, f32)
    total = jnp.zeros_like(qb[..., 0], f32)
    (o, m, total), _ = jax.lax.scan(step, (o, m, total), jnp.arange(n))
    o = (o / total[..., None]).astype(q.dtype).reshape(q.shape)
    return o, (q, k, v, q_pos, k_pos, drop, o, m + jnp.log(total))


def _flash_bwd(window, block, n, residuals, g):  # the softmax backward, a key block at a time
    q, k, v, q_pos, k_pos, drop, o, lse = residuals
    qb, qb_pos, gb = _blocks(q, block), q_pos.reshape(-1, block), _blocks(g, block)
    kb, vb, kb_pos = _key_blocks(k, v, k_pos, block, n)
    delta = jnp.sum(gb.astype(f32) * _blocks(o, block), -1)  # sum_k p dp: the softmax's part

    def step(carry, j):
        dq, dk, dv = carry
        kj, vj, kj_pos = _step_blocks(kb, vb, kb_pos, j, qb.shape[1])
        p = jnp.exp(_scores(qb, kj, qb_pos, kj_pos, window) - lse[..., None])  # recomputed
        pd = _dropped(p, drop, qb_pos, kj_pos)  # what multiplied the values
        dvj = jnp.einsum('bnqhk,bnqhd->bnkhd', pd.astype(g.dtype), gb, preferred_element_type=f32)
        dp = _dropped(jnp.einsum('bnqhd,bnkhd->bnqhk', gb, vj, preferred_element_type=f32),
                      drop, qb_pos, kj_pos)
        ds = (p * (dp - delta[..., None]) / math.sqrt(q.shape[-1])).astype(q.dtype)  # d(score)
        dkj = jnp.einsum('bnqhk,bnqhd->bnkhd', ds, qb, preferred_element_type=f32)
        dq = dq + jnp.einsum('bnqhk,bnkhd->bnqhd', ds, kj, preferred_element_type=f32)
        add = partial(_add_at, j=j)
        return (dq, add(dk, dkj), add(dv, dvj)), None

    zeros = [jnp.zeros_like(a, f32) for a in (qb, kb, vb)]
    (dq, dk, dv), _ = jax.lax.scan(step, tuple(zeros), jnp.arange(n))
    dk, dv = (a[:, n - 1:].reshape(k.shape).astype(k.dtype) for a in (dk, dv))
    return dq.reshape(q.shape).astype(q.dtype), dk, dv, None, None, None


def _add_at(acc, part, j):  # acc[:, j:j + nq] += part, the blocks step j read
    start = (0, j) + (0,) * (acc.ndim - 2)
    return jax.lax.dynamic_update_slice(
        acc, jax.lax.dynamic_slice(acc, start, part.shape) + part, start)


_flash.defvjp(_flash_fwd, _flash_bwd)
