"""GPT-2, as published, in Flax NNX, written as the program ONE device runs inside `jax.shard_map`
(shard.py): a weight split for tensor parallelism arrives as its local shard, and the two
row-parallel matmuls end in a `psum` over 'model'. On a 1x1 mesh the psums move nothing.

Each weight records its layout as `out_sharding` metadata (a mesh axis or None per array axis),
from which shard.py derives every partition spec: a layout is written once, beside its init.
Params are built with `eager_sharding=False`: importing this file changes no setting of Flax.

Needs: attention.py (attention's implementations, RoPE, attention dropout).
"""
import math
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from attention import attention, rope

f32 = jnp.float32


@dataclass(frozen=True)
class GPTConfig:
    block_size: int = 1024  # context length T
    vocab_size: int = 50257  # the tokenizer's; the embedding is padded up to a multiple of 128
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768  # C
    dropout: float = 0.0  # of the residual stream's branches and of attention's probabilities
    bias: bool = True  # biases in Linear layers and LayerNorms, as GPT-2
    window: int = 0  # a query sees its `window` newest positions; 0: all before it (GPT-2)
    pos: str = 'learned'  # learned: GPT-2's position embedding wpe | rope: rotary, in attention
    # how to compute, not what: none of these changes the function the model computes
    attention: str = 'xla'  # xla: plain softmax | blockwise: flash attention in JAX | cudnn
    remat: str = 'none'  # recompute in the backward pass: none | block | dots (keep matmul outputs)
    unroll: bool = False  # compile every layer (faster on CPU) instead of one block run in a loop
    fsdp: int = 1  # FSDP: also split the weights over this many devices of 'data' (1: off)

    @property
    def padded_vocab(self):  # 50257 -> 50304: a dimension that tiles evenly runs faster
        return -(-self.vocab_size // 128) * 128


# --- weights and their layouts ------------------------------------------------------------------
def layout(cfg, shape, spec):
    """A weight's layout: `spec` names the axes split over 'model'. With FSDP (cfg.fsdp > 1 devices
    on 'data'), the first other axis that cfg.fsdp divides is split over 'data' too."""
    for i, n in enumerate(shape):
        if cfg.fsdp > 1 and spec[i] is None and n % cfg.fsdp == 0:
            return spec[:i] + ('data',) + spec[i + 1:]
    return spec


def param(cfg, value, spec):
    return nnx.Param(value, out_sharding=layout(cfg, value.shape, spec), eager_sharding=False)


def normal(rngs, shape, std):
    return std * jax.random.normal(rngs.params(), shape)


def fsdp_gather(tree):
    """FSDP: the weights in `tree` split over 'data', all-gathered whole; inside the layer scan,
    so one layer at a time is whole. The backward's transpose of an all-gather is a reduce-scatter:
    each device receives the sum over 'data' of its own slice of the gradient."""
    def gather(v):
        spec = v.out_sharding
        if 'data' not in spec:
            return v
        x = v[...]
        spec = spec[len(spec) - x.ndim:]  # inside the layer scan a weight has lost the layer axis
        return v.replace(jax.lax.all_gather(x, 'data', axis=spec.index('data'), tiled=True))
    return jax.tree.map(gather, tree, is_leaf=lambda v: isinstance(v, nnx.Variable))


# --- numerics: how matmuls and bias adds compute (backend details, measured by `python
# bench.py workarounds`; none changes what the model computes) -------------------------------------
def matmul(spec, x, w, out=None):
    """jnp.einsum(spec, x, w), accumulated in float32, returned as `out` (x's dtype by default).
    Named, so that a remat policy can keep matmul outputs and recompute the rest."""
    return checkpoint_name(_matmul(spec, x, w, out), 'matmul')


# The backward is written out: its matmuls take bf16 and accumulate in float32 (autodiff would
# give them the float32 accumulator's gradient, at half speed on XLA:CPU); and the weight's
# gradient x^T dy, for which XLA:CPU's matmul library transposes its first operand, is computed
# as (dy^T x)^T when x is the bigger (the MLP's 4C-wide hidden layer): the smaller is transposed.
@partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _matmul(spec, x, w, out):
    return jnp.einsum(spec, x, w, preferred_element_type=f32).astype(out or x.dtype)


def _matmul_fwd(spec, x, w, out):
    return _matmul(spec, x, w, out), (x, w)


def _matmul_bwd(spec, out, residuals, dy):  # the gradient of 'x,w->y' is 'y,w->x' and 'x,y->w'
    x, w = residuals
    inputs, y_axes = spec.split('->')
    x_axes, w_axes = inputs.split(',')
    dy = dy.astype(x.dtype)
    dx = matmul(f'{y_axes},{w_axes}->{x_axes}', dy, w)
    if x.size > dy.size:
        dw = matmul(f'{y_axes},{x_axes}->{w_axes[::-1]}', dy, x, w.dtype).T
    else:
        dw = matmul(f'{x_axes},{y_axes}->{w_axes}', x, dy, w.dtype)
    return dx, dw


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def add_bias(y, bias):
    """y + bias in float32 (y itself if the layer has no bias): with bf16 compute, the bias's
    gradient is a sum over every token, which XLA:CPU does ten times slower in bf16 (it sums in
    windows, for precision)."""
    return y if bias is None else (y.astype(f32) + bias[...]).astype(y.dtype)


def dropout(x, rate, key):  # inverted dropout; the identity without a key or at rate 0
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


# --- the layers -----------------------------------------------------------------------------------
class LayerNorm(nnx.Module):
    def __init__(self, cfg: GPTConfig):
        self.scale = param(cfg, jnp.ones(cfg.n_embd), (None,))
        self.bias = param(cfg, jnp.zeros(cfg.n_embd), (None,)) if cfg.bias else None

    def __call__(self, x):  # (B, T, C), statistics in float32 whatever the param dtype
        x32 = x.astype(f32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + 1e-5) * self.scale[...]
        return add_bias(y, self.bias).astype(x.dtype)


class CausalSelfAttention(nnx.Module):
    """Column-parallel q/k/v (whole heads per device), row-parallel output projection."""

    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
        C = cfg.n_embd
        self.head_dim, self.cfg = C // cfg.n_head, cfg
        # The fused q/k/v kernel is (C, 3, C): GPT-2's (C, 3C) reshaped. Splitting its last axis
        # over 'model' hands each device the same whole heads of q, k and v.
        self.c_attn = param(cfg, normal(rngs, (C, 3, C), 0.02), (None, None, 'model'))
        self.c_attn_bias = param(cfg, jnp.zeros((3, C)), (None, 'model')) if cfg.bias else None
        # residual projections get a smaller init, per GPT-2 paper: std 0.02/sqrt(2 * n_layer)
        std = 0.02 / math.sqrt(2 * cfg.n_layer)
        self.c_proj = param(cfg, normal(rngs, (C, C), std), ('model', None))
        self.c_proj_bias = param(cfg, jnp.zeros(C), (None,)) if cfg.bias else None

    def qkv(self, x, pos):  # x (B, T, C) -> q, k, v (B, T, local heads, head_dim)
        # Megatron's "f": x is the same on every model shard, the weights are not. Identity here;
        # in the backward pass, a psum over 'model' of x's gradient (JAX derives it).
        x = jax.lax.pcast(x, 'model', to='varying')
        qkv = add_bias(matmul('btc,ckd->btkd', x, self.c_attn[...]), self.c_attn_bias)
        # local heads: derived from the shard's width, so the same code runs on any mesh
        q, k, v = (a.reshape(*x.shape[:2], -1, self.head_dim) for a in jnp.split(qkv, 3, axis=2))
        return (rope(q, pos), rope(k, pos), v) if self.cfg.pos == 'rope' else (q, k, v)

    def __call__(self, x, pos, key=None, cache=None):  # x (B, T, C), pos (T,): their positions
        q, k, v = self.qkv(x, pos)
        k_pos, impl, H = pos, self.cfg.attention, q.shape[2]
        drop = None  # attention dropout: (key, rate, each local head's global index)
        if key is not None and self.cfg.dropout > 0:
            drop = (key, self.cfg.dropout, jax.lax.axis_index('model') * H + jnp.arange(H))
        if cache is not None:  # sampling: position p's keys and values go into slot p % S
            S = cache[0].shape[1]  # (B, S, local heads, head_dim): a ring, if S is the window
            cache = tuple(c.at[:, pos[-S:] % S].set(a[:, -S:].astype(c.dtype))
                          for c, a in zip(cache, (k, v)))
            if x.shape[1] == 1:  # one new token: it attends to the ring (a prefill, to itself)
                k, v = cache
                k_pos = pos[0] - (pos[0] - jnp.arange(S)) % S  # slot s's newest; < 0: unwritten
                impl = 'xla'  # cuDNN's causal mask assumes query i sits at key i
        y = attention(q, k, v, pos, k_pos, impl, self.cfg.window, drop)  # (B, T, H, D)
        y = y.reshape(*x.shape[:2], -1)  # (B, T, C / model)
        # Megatron's "g": add up every model shard's partial product. The bias goes after the
        # psum so it is added once, not once per device.
        y = jax.lax.psum(matmul('btc,cd->btd', y, self.c_proj[...]), 'model')  # (B, T, C)
        return add_bias(y, self.c_proj_bias), cache


class MLP(nnx.Module):
    """Column-parallel expansion to 4C, GELU, row-parallel projection back to C."""

    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
        C = cfg.n_embd
        self.c_fc = param(cfg, normal(rngs, (C, 4 * C), 0.02), (None, 'model'))
        self.c_fc_bias = param(cfg, jnp.zeros(4 * C), ('model',)) if cfg.bias else None
        std = 0.02 / math.sqrt(2 * cfg.n_layer)
        self.c_proj = param(cfg, normal(rngs, (4 * C, C), std), ('model', None))
        self.c_proj_bias = param(cfg, jnp.zeros(C), (None,)) if cfg.bias else None

    def __call__(self, x):  # (B, T, C); "f" and "g" as in attention
        x = jax.lax.pcast(x, 'model', to='varying')
        h = add_bias(matmul('btc,cd->btd', x, self.c_fc[...]), self.c_fc_bias)
        h = jax.nn.gelu(h, approximate=True)  # (B, T, 4C / model): GPT-2's tanh GELU
        y = jax.lax.psum(matmul('btc,cd->btd', h, self.c_proj[...]), 'model')
        return add_bias(y, self.c_proj_bias)


class Block(nnx.Module):
    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
        self.ln_1, self.attn = LayerNorm(cfg), CausalSelfAttention(cfg, rngs)
        self.ln_2, self.mlp = LayerNorm(cfg), MLP(cfg, rngs)
        self.rate = cfg.dropout

    def __call__(self, x, pos, key=None, cache=None):  # (B, T, C) -> (B, T, C), pre-LN residual
        k1, k2, k3 = jax.random.split(key, 3) if key is not None else (None, None, None)
        y, cache = self.attn(self.ln_1(x), pos, k3, cache)
        x = x + dropout(y, self.rate, k1)
        return x + dropout(self.mlp(self.ln_2(x)), self.rate, k2), cache


# --- the GPT --------------------------------------------------------------------------------------
# the layers' matmul weights: what int8.py stores as int8 and --prune prunes (optim.py)
KERNELS = (('attn', 'c_attn'), ('attn', 'c_proj'), ('mlp', 'c_fc'), ('mlp', 'c_proj'))
REMAT = {'none': None, 'block': jax.checkpoint_policies.nothing_saveable,
         'dots': jax.checkpoint_policies.save_only_these_names('matmul')}


class GPT(nnx.Module):
    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        # Embeddings are not split over 'model': the lookup is cheap, and the tied head needs all
        # of wte. The padding rows are zeros: the loss never reads their logits, so they stay zero.
        wte = normal(rngs, (cfg.padded_vocab, cfg.n_embd), 0.02)
        self.wte = param(cfg, wte.at[cfg.vocab_size:].set(0), (None, None))
        wpe = normal(rngs, (cfg.block_size, cfg.n_embd), 0.02)
        self.wpe = param(cfg, wpe, (None, None)) if cfg.pos == 'learned' else None

        # n_layer Blocks built at once and stacked: every param gets a leading layer axis (L, ...)
        # and its layout a leading None; the forward pass scans over it (XLA compiles one block)
        @nnx.split_rngs(splits=cfg.n_layer)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
        def make_blocks(rngs):
            return Block(cfg, rngs)

        self.h = make_blocks(rngs)
        self.ln_f = LayerNorm(cfg)

    def __call__(self, idx, key=None, cache=None, start=0):
        """idx (B, T) int32, the tokens at positions start.. -> logits (B, T, padded_vocab)
        float32, and the cache (sampling: every layer's keys and values, (L, B, S, heads, D))."""
        T, L = idx.shape[1], self.cfg.n_layer
        wte, wpe, ln_f = fsdp_gather((self.wte, self.wpe, self.ln_f))
        pos = start + jnp.arange(T)
        x = wte[...][idx]  # (B, T, C)
        if wpe is not None:
            x = x + jax.lax.dynamic_slice_in_dim(wpe[...], start, T)
        keys = None  # one dropout key per layer, in training
        if key is not None:
            key, k_emb = jax.random.split(key)
            x = dropout(x, self.cfg.dropout, k_emb)
            keys = jax.random.split(key, L)

        graphdef, layers = nnx.split(self.h)  # layers: the stacked params, (L, ...) each

        def body(x, xs):
            layer, k, p, c = xs
            block = nnx.merge(graphdef, fsdp_gather(layer))  # this layer's weights, whole
            return block(x, p, k, c)

        if self.cfg.remat != 'none':  # keep only what the policy saves for the backward pass
            body = jax.checkpoint(body, policy=REMAT[self.cfg.remat])
        # The positions go in once per layer, not as one constant: JAX hoists what depends only
        # on constants out of the loop, and would build every layer's (B, H, T, T) mask at once.
        xs = (layers, keys, jnp.broadcast_to(pos, (L, T)), cache)
        x, cache = jax.lax.scan(body, x, xs, unroll=self.cfg.unroll)
        logits = matmul('btc,vc->btv', ln_f(x), wte[...], f32)  # the head tied to wte
        return logits, cache

    def loss(self, idx, targets, key=None, accuracy=False):
        """The mean cross-entropy in float32, a scalar; with accuracy, also the fraction of
        tokens whose likeliest next token is the target."""
        logits, _ = self(idx, key)
        logits = logits[..., :self.cfg.vocab_size]  # (B, T, vocab): the padding dropped
        true = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # (B, T)
        loss = jnp.mean(jax.nn.logsumexp(logits, axis=-1) - true)
        return (loss, jnp.mean(logits.argmax(-1) == targets)) if accuracy else loss
