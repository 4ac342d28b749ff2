"""GPT-2, as published, in Flax NNX.

The model is written as the program ONE device runs inside `jax.shard_map` (see shard.py): a weight
split for tensor parallelism arrives as its local shard, and the two row-parallel matmuls end in a
`psum` over the 'model' axis. On a 1x1 mesh the shards are the whole weights and the psums move nothing.

Each weight records its layout as `out_sharding` metadata, a mesh axis name ('model', 'data') or None
per array axis; shard.py derives every partition spec from it: a layout is written once, beside its init.

Needs: nothing from the other files.
"""
import math
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

# Params only *record* their layout; shard.py places them (jit with out_shardings), so the model
# can be built anywhere, with or without a mesh.
nnx.use_eager_sharding(False)
f32 = jnp.float32

@dataclass(frozen=True)
class GPTConfig:
    block_size: int = 1024  # context length T
    vocab_size: int = 50257  # the tokenizer's; the embedding is padded up to a multiple of 128
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768  # C
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers and LayerNorms, as GPT-2
    # how to compute, not what: none of these changes the function the model computes
    attention: str = 'xla'  # xla: plain softmax | blockwise: flash attention in JAX | cudnn
    remat: str = 'none'  # recompute in the backward pass: none | block | dots (keep matmul outputs)
    unroll: bool = False  # compile every layer (faster on CPU) instead of one block run in a loop
    fsdp: int = 1  # FSDP: also split the weights over this many devices of the 'data' axis (1: off)

    @property
    def padded_vocab(self):  # 50257 -> 50304: matmuls with a dimension that tiles evenly run faster
        return -(-self.vocab_size // 128) * 128

# --- mixed precision: bf16 in, float32 accumulation, bf16 out --------------------------------
def matmul(spec, x, w, out=None):
    """jnp.einsum(spec, x, w), accumulated in float32, returned as `out` (x's dtype by default).
    Named, so that a remat policy can keep matmul outputs and recompute the rest."""
    return checkpoint_name(_matmul(spec, x, w, out), 'matmul')

@partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _matmul(spec, x, w, out):
    # The backward is written out so that its two matmuls also take bf16 and accumulate in float32:
    # autodiff would feed them the float32 accumulator's gradient, at half the speed on XLA:CPU (jax 0.10).
    return jnp.einsum(spec, x, w, preferred_element_type=f32).astype(out or x.dtype)

def _matmul_bwd(spec, out, res, g):  # the gradient of 'x,w->y' is 'y,w->x' and 'x,y->w'
    x, w = res
    (xs, ws), ys = spec.split('->')[0].split(','), spec.split('->')[1]
    g = g.astype(x.dtype)
    return matmul(f'{ys},{ws}->{xs}', g, w), matmul(f'{xs},{ys}->{ws}', x, g, w.dtype)

_matmul.defvjp(lambda spec, x, w, out: (_matmul(spec, x, w, out), (x, w)), _matmul_bwd)

def add_bias(y, b):
    """y + b in float32: the bias's gradient is a sum over every token, which XLA:CPU does ten
    times slower in bf16 than in float32 (it splits the sum into windows to keep precision)."""
    return y if b is None else (y.astype(f32) + b).astype(y.dtype)

@jax.checkpoint  # recomputed in the backward pass from x: its float32 intermediates are not kept
def gelu(x):  # GPT-2's tanh GELU, 0.5 x (1 + tanh(z)), written as x sigmoid(2z): the same function
    x32 = x.astype(f32)  # in float32: bf16 would round every intermediate (and the 1.5957... too)
    return (x32 * jax.nn.sigmoid(1.5957691216057308 * (x32 + 0.044715 * x32 * x32 * x32))).astype(x.dtype)

def dropout(x, rate, key):
    """Inverted dropout; key=None (evaluation, sampling) or rate=0 (the default) is the identity."""
    if key is None or rate == 0.0:
        return x
    return jnp.where(jax.random.bernoulli(key, 1.0 - rate, x.shape), x / (1.0 - rate), 0).astype(x.dtype)

@partial(jax.tree_util.register_dataclass, data_fields=['q', 'scale'], meta_fields=[])
@dataclass
class Int8:
    """A weight stored as int8 (sample.py --quantize=int8): w ~ q * scale, one scale per output
    channel and per group of input rows; w[...] dequantizes it, in the scale's dtype."""
    q: jax.Array  # int8, the weight's shape: (in, out...)
    scale: jax.Array  # (groups, out...): the input axis cut into groups, each with its own scale

    def __getitem__(self, index):
        g = self.scale.shape[0]
        q = self.q.reshape(g, -1, *self.q.shape[1:]).astype(self.scale.dtype)  # (groups, in/groups, out...)
        return (q * self.scale[:, None]).reshape(self.q.shape)[index]

# --- attention: q (B, Tq, H, D), k and v (B, Tk, H, D) -> (B, Tq, H, D) ----------------------
# Causal by positions: a query sees the keys at positions up to its own. In training both are
# 0..T-1; with a KV cache (sampling) the keys are every slot of the cache.

def attention(q, k, v, q_pos, k_pos, impl):
    if impl == 'cudnn':  # NVIDIA's fused flash attention kernel
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation='cudnn')
    if impl == 'blockwise':
        return blockwise_attention(q, k, v, q_pos, k_pos)
    # 'xla': the textbook formula, the (B, H, Tq, Tk) scores held in memory
    s = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=f32) / math.sqrt(q.shape[-1])
    s = jnp.where(q_pos[:, None] >= k_pos[None, :], s, -jnp.inf)
    return jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(s, axis=-1).astype(v.dtype), v)

def blockwise_attention(q, k, v, q_pos, k_pos, block=128):
    """Flash attention (Dao et al., 2022) in plain JAX: memory O(Tq x block), not O(Tq x Tk).

    A `lax.scan` walks the keys and values one block at a time. Each query keeps a running max m of
    its scores, the running sum l of exp(score - m), and o, the values weighted so; a block with a
    larger max rescales what came before by exp(m_old - m_new), and o / l ends the softmax. The
    backward (custom_vjp below) recomputes each block's probabilities from the saved m + log(l).
    Keys are padded to a multiple of the block at a position no query reaches: the mask hides them."""
    pad = -k.shape[1] % block
    k, v = (jnp.pad(a, [(0, 0), (0, pad), (0, 0), (0, 0)]) for a in (k, v))
    return _flash(q, k, v, q_pos, jnp.pad(k_pos, (0, pad), constant_values=2**30), block)

def _kv_blocks(k, v, k_pos, block):  # -> key blocks (n, B, block, H, D), value blocks, positions (n, block)
    B, T, H, D = k.shape
    split = lambda a: a.reshape(B, T // block, block, H, D).swapaxes(0, 1)
    return split(k), split(v), k_pos.reshape(-1, block)

def _scores(q, kj, q_pos, kj_pos):  # -> (B, Tq, H, block) scores against one key block, masked
    s = jnp.einsum('bqhd,bkhd->bqhk', q, kj, preferred_element_type=f32) / math.sqrt(q.shape[-1])
    return jnp.where((q_pos[:, None] >= kj_pos[None, :])[None, :, None, :], s, -jnp.inf)

@partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, q_pos, k_pos, block):
    return _flash_fwd(q, k, v, q_pos, k_pos, block)[0]

def _flash_fwd(q, k, v, q_pos, k_pos, block):
    def step(carry, kv):
        o, m, l = carry  # (B, Tq, H, D), (B, Tq, H), (B, Tq, H), all float32
        kj, vj, kj_pos = kv
        s = _scores(q, kj, q_pos, kj_pos)
        m_new = jnp.maximum(m, s.max(-1))  # finite from block 0 on: every query sees position 0
        p = jnp.exp(s - m_new[..., None])  # (B, Tq, H, block)
        rescale = jnp.exp(m - m_new)  # the old weights were relative to the old max
        o = o * rescale[..., None] + jnp.einsum('bqhk,bkhd->bqhd', p.astype(vj.dtype), vj, preferred_element_type=f32)
        return (o, m_new, l * rescale + p.sum(-1)), None

    init = (jnp.zeros_like(q, f32), jnp.full_like(q[..., 0], -jnp.inf, f32), jnp.zeros_like(q[..., 0], f32))
    (o, m, l), _ = jax.lax.scan(step, init, _kv_blocks(k, v, k_pos, block))
    o = (o / l[..., None]).astype(q.dtype)
    return o, (q, k, v, q_pos, k_pos, o, m + jnp.log(l))

def _flash_bwd(block, res, g):  # g = dL/do; the softmax backward, one key block at a time
    q, k, v, q_pos, k_pos, o, lse = res
    delta = jnp.sum(g.astype(f32) * o, -1)  # (B, Tq, H): sum_k p * dp, the softmax's correction term

    def step(dq, kv):
        kj, vj, kj_pos = kv
        p = jnp.exp(_scores(q, kj, q_pos, kj_pos) - lse[..., None])  # recomputed probabilities
        dv = jnp.einsum('bqhk,bqhd->bkhd', p.astype(g.dtype), g)
        dp = jnp.einsum('bqhd,bkhd->bqhk', g, vj, preferred_element_type=f32)
        ds = (p * (dp - delta[..., None]) / math.sqrt(q.shape[-1])).astype(q.dtype)  # d(score)
        dk = jnp.einsum('bqhk,bqhd->bkhd', ds, q)
        return dq + jnp.einsum('bqhk,bkhd->bqhd', ds, kj, preferred_element_type=f32), (dk, dv)

    dq, (dk, dv) = jax.lax.scan(step, jnp.zeros_like(q, f32), _kv_blocks(k, v, k_pos, block))
    unblock = lambda a: a.swapaxes(0, 1).reshape(k.shape)
    return dq.astype(q.dtype), unblock(dk), unblock(dv), None, None

_flash.defvjp(_flash_fwd, _flash_bwd)

# --- the layers ---------------------------------------------------------------------------------
def layout(cfg, shape, spec):
    """A weight's layout: `spec` names the axes split over 'model'. With FSDP, cfg.fsdp > 1 devices
    on 'data', the first other axis that cfg.fsdp divides is split over 'data' too."""
    for i, n in enumerate(shape):
        if cfg.fsdp > 1 and spec[i] is None and n % cfg.fsdp == 0:
            return spec[:i] + ('data',) + spec[i + 1:]
    return spec

def normal(cfg, rngs, shape, std, spec):
    return nnx.Param(std * jax.random.normal(rngs.params(), shape), out_sharding=layout(cfg, shape, spec))

def zeros(cfg, shape, spec, use=True):
    return nnx.Param(jnp.zeros(shape), out_sharding=layout(cfg, shape, spec)) if use else None

def value(param):
    """A Param's array (None for an absent bias). A weight FSDP split over 'data' is all-gathered here,
    inside the layer scan, so one layer at a time is whole; its transpose in the backward pass is a
    reduce-scatter: each device gets the sum over 'data' of its own slice of the gradient."""
    if param is None:
        return None
    x, spec = param[...], param.out_sharding
    spec = spec[len(spec) - x.ndim:]  # a stacked layer's layout starts with the layer axis
    return jax.lax.all_gather(x, 'data', axis=spec.index('data'), tiled=True) if 'data' in spec else x

class LayerNorm(nnx.Module):
    def __init__(self, cfg: GPTConfig):
        self.scale = nnx.Param(jnp.ones(cfg.n_embd), out_sharding=layout(cfg, (cfg.n_embd,), (None,)))
        self.bias = zeros(cfg, (cfg.n_embd,), (None,), cfg.bias)

    def __call__(self, x):  # (B, T, C), statistics in float32 whatever the param dtype
        x32 = x.astype(f32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + 1e-5) * value(self.scale)
        return add_bias(y, value(self.bias)).astype(x.dtype)

class CausalSelfAttention(nnx.Module):
    """Column-parallel q/k/v (whole heads per device), row-parallel output projection."""

    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
        C = cfg.n_embd
        self.head_dim, self.impl = C // cfg.n_head, cfg.attention
        # The fused q/k/v kernel is (C, 3, C): GPT-2's (C, 3C) reshaped. Splitting its last axis
        # over 'model' hands each device the same whole heads of q, k and v.
        self.c_attn = normal(cfg, rngs, (C, 3, C), 0.02, (None, None, 'model'))
        self.c_attn_bias = zeros(cfg, (3, C), (None, 'model'), cfg.bias)
        # residual projections get a smaller init, per GPT-2 paper: std 0.02/sqrt(2 * n_layer)
        self.c_proj = normal(cfg, rngs, (C, C), 0.02 / math.sqrt(2 * cfg.n_layer), ('model', None))
        self.c_proj_bias = zeros(cfg, (C,), (None,), cfg.bias)

    def __call__(self, x, pos, cache=None):  # x (B, T, C), pos (T,) the tokens' positions
        B, T, _ = x.shape
        # Megatron's "f": x is the same on every model shard, the weights are not. Identity here;
        # in the backward pass, a psum over 'model' of x's gradient (JAX derives it).
        x = jax.lax.pcast(x, 'model', to='varying')
        qkv = add_bias(matmul('btc,ckd->btkd', x, value(self.c_attn)), value(self.c_attn_bias))
        # local heads: derived from the shard's width, so the same code runs on any mesh
        q, k, v = (a.reshape(B, T, -1, self.head_dim) for a in jnp.split(qkv, 3, axis=2))
        k_pos, impl = pos, self.impl
        if cache is not None:  # sampling: write this step's keys and values into their slots,
            cache = tuple(jax.lax.dynamic_update_slice_in_dim(c, a.astype(c.dtype), pos[0], axis=1)
                          for c, a in zip(cache, (k, v)))  # (B, S, local heads, head_dim) each
            (k, v), k_pos, impl = cache, jnp.arange(cache[0].shape[1]), 'xla'  # attend to all S slots
        y = attention(q, k, v, pos, k_pos, impl).reshape(B, T, -1)  # (B, T, C / model)
        # Megatron's "g": add up every model shard's partial product. The bias goes after the
        # psum so it is added once, not once per device.
        y = jax.lax.psum(matmul('btc,cd->btd', y, value(self.c_proj)), 'model')  # (B, T, C)
        return add_bias(y, value(self.c_proj_bias)), cache

class MLP(nnx.Module):
    """Column-parallel expansion to 4C, GELU, row-parallel projection back to C."""

    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
        C = cfg.n_embd
        self.c_fc = normal(cfg, rngs, (C, 4 * C), 0.02, (None, 'model'))
        self.c_fc_bias = zeros(cfg, (4 * C,), ('model',), cfg.bias)
        self.c_proj = normal(cfg, rngs, (4 * C, C), 0.02 / math.sqrt(2 * cfg.n_layer), ('model', None))
        self.c_proj_bias = zeros(cfg, (C,), (None,), cfg.bias)

    def __call__(self, x):  # (B, T, C); "f" and "g" as in attention
        x = jax.lax.pcast(x, 'model', to='varying')
        h = gelu(add_bias(matmul('btc,cd->btd', x, value(self.c_fc)), value(self.c_fc_bias)))  # (B, T, 4C / model)
        y = jax.lax.psum(matmul('btc,cd->btd', h, value(self.c_proj)), 'model')
        return add_bias(y, value(self.c_proj_bias))

class Block(nnx.Module):
    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
        self.ln_1, self.attn = LayerNorm(cfg), CausalSelfAttention(cfg, rngs)
        self.ln_2, self.mlp, self.rate = LayerNorm(cfg), MLP(cfg, rngs), cfg.dropout

    def __call__(self, x, pos, key=None, cache=None):  # (B, T, C) -> (B, T, C), pre-LayerNorm residual
        k1, k2 = jax.random.split(key) if key is not None else (None, None)
        y, cache = self.attn(self.ln_1(x), pos, cache)
        x = x + dropout(y, self.rate, k1)
        return x + dropout(self.mlp(self.ln_2(x)), self.rate, k2), cache

# --- the GPT ------------------------------------------------------------------------------------
REMAT = {'none': None, 'block': jax.checkpoint_policies.nothing_saveable,
         'dots': jax.checkpoint_policies.save_only_these_names('matmul')}

class GPT(nnx.Module):
    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        # Embeddings are not split over 'model': the lookup is cheap, and the tied head needs all of wte.
        # The padding rows are zeros: the loss never reads their logits, so they stay zero.
        wte = 0.02 * jax.random.normal(rngs.params(), (cfg.padded_vocab, cfg.n_embd))
        self.wte = nnx.Param(wte.at[cfg.vocab_size:].set(0), out_sharding=layout(cfg, wte.shape, (None, None)))
        self.wpe = normal(cfg, rngs, (cfg.block_size, cfg.n_embd), 0.02, (None, None))

        # n_layer Blocks built at once and stacked: every param gets a leading layer axis (L, ...) and its
        # layout a leading None. The forward pass scans over that axis: XLA compiles one block, not L.
        @nnx.split_rngs(splits=cfg.n_layer)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
        def make_blocks(rngs):
            return Block(cfg, rngs)

        self.h = make_blocks(rngs)
        self.ln_f = LayerNorm(cfg)

    def __call__(self, idx, key=None, cache=None, start=0):
        """idx (B, T) int32 -> logits (B, T, padded_vocab) float32, and the updated cache. cache: None in
        training; in sampling, every layer's keys and values, (L, B, S, local heads, head_dim) each, and
        idx holds the tokens at positions start..start+T-1."""
        T, L, wte = idx.shape[1], self.cfg.n_layer, value(self.wte)
        pos = start + jnp.arange(T)
        x = wte[idx] + jax.lax.dynamic_slice_in_dim(value(self.wpe), start, T)  # (B, T, C)
        if key is not None:
            key, k_emb = jax.random.split(key)
            x = dropout(x, self.cfg.dropout, k_emb)
        keys = jax.random.split(key, L) if key is not None else None

        graphdef, layers = nnx.split(self.h)  # layers: the stacked params, (L, ...) each

        def body(x, xs):
            layer, k, p, c = xs
            return nnx.merge(graphdef, layer)(x, p, k, c)

        if self.cfg.remat != 'none':  # keep only what the policy saves for the backward pass
            body = jax.checkpoint(body, policy=REMAT[self.cfg.remat])
        # The positions go in once per layer, not as one constant: JAX hoists what depends only on
        # constants out of the loop, and would build every layer's causal mask, (B, H, T, T), at once.
        x, cache = jax.lax.scan(body, x, (layers, keys, jnp.broadcast_to(pos, (L, T)), cache), unroll=self.cfg.unroll)
        return matmul('btc,vc->btv', self.ln_f(x), wte, f32), cache  # LM head tied to wte; float32 logits

    def loss(self, idx, targets, key=None):  # mean cross-entropy in float32, a scalar
        logits = self(idx, key)[0][..., :self.cfg.vocab_size]  # (B, T, vocab): the padding dropped
        true = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # (B, T)
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - true)
