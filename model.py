"""GPT-2, as published, in Flax NNX.

The model is written as the program ONE device runs inside `jax.shard_map` (see shard.py): every
weight that is split for tensor parallelism arrives here as the local shard, and the two
row-parallel matmuls end in a `psum` over the 'model' mesh axis. On a 1x1 mesh those shards are
the whole weights and the psums move nothing, so this one file serves one device and many.

Each weight records its tensor-parallel layout as `out_sharding` metadata: a name per array axis,
'model' where the axis is split over the model axis, None where it is whole. shard.py derives
every partition spec from that, so the layout of a weight is written once, next to its init.

Needs: nothing from the other files.
"""
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

# Params only *record* their layout; shard.py places them (jit with out_shardings), so the model
# can be built anywhere, with or without a mesh.
nnx.use_eager_sharding(False)


@dataclass(frozen=True)
class GPTConfig:
    block_size: int = 1024  # context length T
    vocab_size: int = 50257  # the tokenizer's; the embedding is padded up to a multiple of 128
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768  # C
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers and LayerNorms, as GPT-2
    remat: bool = False  # recompute each block in the backward pass: ~1/3 more compute, far less memory

    @property
    def padded_vocab(self):  # 50257 -> 50304: matmuls with a dimension that tiles evenly run faster
        return -(-self.vocab_size // 128) * 128


def normal(rngs, shape, std, sharding):
    return nnx.Param(std * jax.random.normal(rngs.params(), shape), out_sharding=sharding)


def zeros(shape, sharding, use=True):
    return nnx.Param(jnp.zeros(shape), out_sharding=sharding) if use else None


def dropout(x, rate, key):
    """Inverted dropout; key=None (evaluation, sampling) or rate=0 (the default) is the identity."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class LayerNorm(nnx.Module):
    def __init__(self, cfg: GPTConfig):
        self.scale = nnx.Param(jnp.ones(cfg.n_embd), out_sharding=(None,))
        self.bias = zeros(cfg.n_embd, (None,), cfg.bias)

    def __call__(self, x):  # (B, T, C), statistics in float32 whatever the param dtype
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + 1e-5) * self.scale[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y.astype(x.dtype)


class CausalSelfAttention(nnx.Module):
    """Column-parallel q/k/v (whole heads per device), row-parallel output projection."""

    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
        C = cfg.n_embd
        assert C % cfg.n_head == 0, "n_embd must be a multiple of n_head"
        self.head_dim = C // cfg.n_head
        # The fused q/k/v kernel is (C, 3, C): GPT-2's (C, 3C) reshaped. Splitting its last axis
        # over 'model' hands each device the same whole heads of q, k and v.
        self.c_attn = normal(rngs, (C, 3, C), 0.02, (None, None, 'model'))
        self.c_attn_bias = zeros((3, C), (None, 'model'), cfg.bias)
        # residual projections get a smaller init, per GPT-2 paper: std 0.02/sqrt(2 * n_layer)
        self.c_proj = normal(rngs, (C, C), 0.02 / math.sqrt(2 * cfg.n_layer), ('model', None))
        self.c_proj_bias = zeros(C, (None,), cfg.bias)

    def __call__(self, x):  # (B, T, C)
        B, T, _ = x.shape
        qkv = jnp.einsum('btc,ckd->kbtd', x, self.c_attn[...])  # (3, B, T, C / model)
        if self.c_attn_bias is not None:
            qkv = qkv + self.c_attn_bias[...][:, None, None, :]
        # local heads: derived from the shard's width, so the same code runs on any mesh
        q, k, v = qkv.reshape(3, B, T, -1, self.head_dim)  # each (B, T, local heads, head_dim)
        y = jax.nn.dot_product_attention(q, k, v, is_causal=True)  # (B, T, local heads, head_dim)
        y = y.reshape(B, T, -1) @ self.c_proj[...]  # (B, T, C): this device's partial sum
        # Megatron's "g": add up the partial sums of all model shards. The bias goes after the
        # psum so it is added once, not once per device.
        y = jax.lax.psum(y, 'model')
        return y + self.c_proj_bias[...] if self.c_proj_bias is not None else y


class MLP(nnx.Module):
    """Column-parallel expansion to 4C, GELU, row-parallel projection back to C."""

    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
        C = cfg.n_embd
        self.c_fc = normal(rngs, (C, 4 * C), 0.02, (None, 'model'))
        self.c_fc_bias = zeros(4 * C, ('model',), cfg.bias)
        self.c_proj = normal(rngs, (4 * C, C), 0.02 / math.sqrt(2 * cfg.n_layer), ('model', None))
        self.c_proj_bias = zeros(C, (None,), cfg.bias)

    def __call__(self, x):  # (B, T, C)
        h = x @ self.c_fc[...]  # (B, T, 4C / model)
        if self.c_fc_bias is not None:
            h = h + self.c_fc_bias[...]
        h = jax.nn.gelu(h, approximate=True)  # GPT-2 uses the tanh approximation
        y = jax.lax.psum(h @ self.c_proj[...], 'model')  # (B, T, C), as in attention
        return y + self.c_proj_bias[...] if self.c_proj_bias is not None else y


class Block(nnx.Module):
    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
        self.ln_1 = LayerNorm(cfg)
        self.attn = CausalSelfAttention(cfg, rngs)
        self.ln_2 = LayerNorm(cfg)
        self.mlp = MLP(cfg, rngs)
        self.rate = cfg.dropout

    def __call__(self, x, key=None):  # (B, T, C) -> (B, T, C), pre-LayerNorm residual block
        k1, k2 = jax.random.split(key) if key is not None else (None, None)
        x = x + dropout(self.attn(self.ln_1(x)), self.rate, k1)
        return x + dropout(self.mlp(self.ln_2(x)), self.rate, k2)


class GPT(nnx.Module):
    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        # Embeddings are replicated: the lookup is cheap, and the tied LM head needs all of wte.
        self.wte = normal(rngs, (cfg.padded_vocab, cfg.n_embd), 0.02, (None, None))
        self.wpe = normal(rngs, (cfg.block_size, cfg.n_embd), 0.02, (None, None))

        # n_layer Blocks built at once and stacked: every param gets a leading layer axis
        # (L, ...), and its layout a leading None. The forward pass scans over that axis, so
        # XLA compiles one block, not n_layer copies.
        @nnx.split_rngs(splits=cfg.n_layer)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
        def make_blocks(rngs):
            return Block(cfg, rngs)

        self.h = make_blocks(rngs)
        self.ln_f = LayerNorm(cfg)

    def __call__(self, idx, key=None):  # idx (B, T) int32 -> logits (B, T, padded_vocab) f32
        B, T = idx.shape
        wte = self.wte[...]
        x = wte[idx] + self.wpe[...][:T]  # (B, T, C), in the param dtype
        if key is not None:
            key, k_emb = jax.random.split(key)
            x = dropout(x, self.cfg.dropout, k_emb)
        keys = jax.random.split(key, self.cfg.n_layer) if key is not None else None

        graphdef, layers = nnx.split(self.h)  # layers: the stacked params, (L, ...) each

        def body(x, layer_and_key):
            layer, k = layer_and_key
            return nnx.merge(graphdef, layer)(x, k), None

        # remat keeps only each block's input for the backward pass, not its activations
        x, _ = jax.lax.scan(jax.checkpoint(body) if self.cfg.remat else body, x, (layers, keys))
        x = self.ln_f(x)
        # LM head tied to the token embedding; bf16 inputs, float32 products and logits
        return jnp.einsum('btc,vc->btv', x, wte, preferred_element_type=jnp.float32)

    def loss(self, idx, targets, key=None):  # mean cross-entropy in float32, a scalar
        logits = self(idx, key)
        logz = jax.nn.logsumexp(logits, axis=-1)  # (B, T)
        true = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        return jnp.mean(logz - true)
