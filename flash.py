"""Flash attention (Dao et al., 2022) in plain JAX: the softmax of the scores computed one key
block at a time, so that the (Tq, Tk) scores are never held, in the forward pass or the backward.
Memory grows as Tq x block instead of Tq x Tk; model.py uses it for --attention=blockwise.

Needs: nothing from the other files.
"""
import math
from functools import partial

import jax
import jax.numpy as jnp

f32 = jnp.float32


def blockwise_attention(q, k, v, q_pos, k_pos, block=128):
    """q (B, Tq, H, D), k and v (B, Tk, H, D) -> (B, Tq, H, D), causal by positions.

    A `lax.scan` walks the keys and values one block at a time. Each query keeps a running max m
    of its scores, the running total of exp(score - m), and o, the values weighted so; a block
    with a larger max rescales what came before by exp(m_old - m_new), and o / total ends the
    softmax. The backward (custom_vjp below) recomputes each block's probabilities from the saved
    m + log(total). Keys are padded to a multiple of the block, at a position no query reaches."""
    pad = -k.shape[1] % block
    k, v = (jnp.pad(a, [(0, 0), (0, pad), (0, 0), (0, 0)]) for a in (k, v))
    k_pos = jnp.pad(k_pos, (0, pad), constant_values=2**30)
    return _flash(q, k, v, q_pos, k_pos, block)


def _kv_blocks(k, v, k_pos, block):  # -> k and v blocks (n, B, block, H, D), positions (n, block)
    B, T, H, D = k.shape
    k_blocks, v_blocks = (a.reshape(B, T // block, block, H, D).swapaxes(0, 1) for a in (k, v))
    return k_blocks, v_blocks, k_pos.reshape(-1, block)


def _scores(q, kj, q_pos, kj_pos):  # -> (B, Tq, H, block) scores against one key block, masked
    s = jnp.einsum('bqhd,bkhd->bqhk', q, kj, preferred_element_type=f32) / math.sqrt(q.shape[-1])
    return jnp.where((q_pos[:, None] >= kj_pos[None, :])[None, :, None, :], s, -jnp.inf)


@partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, q_pos, k_pos, block):
    return _flash_fwd(q, k, v, q_pos, k_pos, block)[0]


def _flash_fwd(q, k, v, q_pos, k_pos, block):
    def step(carry, kv):
        o, m, total = carry  # (B, Tq, H, D), (B, Tq, H), (B, Tq, H), all float32
        kj, vj, kj_pos = kv
        s = _scores(q, kj, q_pos, kj_pos)
        m_new = jnp.maximum(m, s.max(-1))  # finite from block 0 on: every query sees position 0
        p = jnp.exp(s - m_new[..., None])  # (B, Tq, H, block)
        rescale = jnp.exp(m - m_new)  # the old weights were relative to the old max
        pv = jnp.einsum('bqhk,bkhd->bqhd', p.astype(vj.dtype), vj, preferred_element_type=f32)
        return (o * rescale[..., None] + pv, m_new, total * rescale + p.sum(-1)), None

    o = jnp.zeros_like(q, f32)
    m = jnp.full_like(q[..., 0], -jnp.inf, f32)
    total = jnp.zeros_like(q[..., 0], f32)
    (o, m, total), _ = jax.lax.scan(step, (o, m, total), _kv_blocks(k, v, k_pos, block))
    o = (o / total[..., None]).astype(q.dtype)
    return o, (q, k, v, q_pos, k_pos, o, m + jnp.log(total))


def _flash_bwd(block, residuals, g):  # g = dL/do; the softmax backward, one key block at a time
    q, k, v, q_pos, k_pos, o, lse = residuals
    delta = jnp.sum(g.astype(f32) * o, -1)  # (B, Tq, H): sum_k p * dp, the softmax's correction

    def step(dq, kv):
        kj, vj, kj_pos = kv
        p = jnp.exp(_scores(q, kj, q_pos, kj_pos) - lse[..., None])  # recomputed probabilities
        dv = jnp.einsum('bqhk,bqhd->bkhd', p.astype(g.dtype), g)
        dp = jnp.einsum('bqhd,bkhd->bqhk', g, vj, preferred_element_type=f32)
        ds = (p * (dp - delta[..., None]) / math.sqrt(q.shape[-1])).astype(q.dtype)  # d(score)
        dk = jnp.einsum('bqhk,bqhd->bkhd', ds, q)
        dq = dq + jnp.einsum('bqhk,bkhd->bqhd', ds, kj, preferred_element_type=f32)
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(step, jnp.zeros_like(q, f32), _kv_blocks(k, v, k_pos, block))
    dk, dv = (a.swapaxes(0, 1).reshape(k.shape) for a in (dk, dv))  # the blocks back in a row
    return dq.astype(q.dtype), dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
