"""The optimizer: AdamW with nanoGPT's learning-rate schedule, global-norm clipping, weight
decay on the matrices only, and magnitude pruning (--prune). An optax chain, so that what it does
to each update reads in order.

Needs: model.py (KERNELS, what --prune prunes); cfg: train.py's Config, or anything with its
fields.
"""
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from model import KERNELS


def lr_schedule(cfg):
    """nanoGPT's: a linear warmup that starts at lr / (warmup + 1), so the first step learns, then
    a cosine decay to min_lr at max_iters. Takes optax's count: 0 for the first step."""
    def lr(count):
        warm = cfg.learning_rate * (count + 1) / (cfg.warmup_iters + 1)
        decay_steps = max(cfg.max_iters - cfg.warmup_iters, 1)
        t = jnp.clip((count - cfg.warmup_iters) / decay_steps, 0.0, 1.0)
        cosine = 0.5 * (1 + jnp.cos(jnp.pi * t))  # 1 -> 0
        decay = cfg.min_lr + cosine * (cfg.learning_rate - cfg.min_lr)
        return jnp.where(count < cfg.warmup_iters, warm, decay)
    return lr


def make_optimizer(cfg, params):
    """AdamW with lr_schedule and clipping; no weight decay on biases or LayerNorm scales."""
    def decays(path, _):
        return not any(word in str(k) for k in path for word in ('bias', 'scale'))

    adamw = optax.adamw(lr_schedule(cfg), b1=cfg.beta1, b2=cfg.beta2, weight_decay=cfg.weight_decay,
                        mask=jax.tree_util.tree_map_with_path(decays, params),
                        # the moments in the params' dtype: float32 gradients would promote them
                        mu_dtype=jax.tree.leaves(params)[0].dtype)
    steps = [optax.clip_by_global_norm(cfg.grad_clip), adamw]
    if cfg.prune:  # the layers' matmul kernels only: embeddings, biases and LayerNorms stay whole
        def kernels(path, _):  # ['h']['mlp']['c_fc'].value, say
            name = jax.tree_util.keystr(path)
            return any(f"['h']['{module}']['{kernel}']" in name for module, kernel in KERNELS)
        steps.append(optax.masked(magnitude_pruning(cfg),
                                  jax.tree_util.tree_map_with_path(kernels, params)))
    return optax.chain(*steps)


# --- pruning ------------------------------------------------------------------------------------
def sparsity(cfg, count):
    """Zhu and Gupta's (2017) cubic schedule: 0 until warmup ends, then rising, fast at first, to
    cfg.prune at three quarters of max_iters, and held there."""
    start = cfg.warmup_iters
    end = max(0.75 * cfg.max_iters, start + 1)
    t = jnp.clip((count - start) / (end - start), 0.0, 1.0)
    return cfg.prune * (1 - (1 - t) ** 3)


def magnitude_pruning(cfg):
    """An optax step, the chain's last: every prune_interval steps each kernel's mask is recomputed
    from the weights the step would leave, keeping in each layer the weights of largest magnitude
    and zeroing the smallest sparsity(count) of them; between, the masks hold. A pruned weight
    gets the update -w, so it is zero after the step, whatever Adam proposed. The masks are the
    state: a checkpoint keeps them, and they are computed on the whole (global) arrays, so every
    mesh prunes the same weights."""
    def init(params):
        masks = jax.tree.map(lambda w: jnp.ones_like(w, bool), params)  # w's sharding
        return {'count': jnp.zeros([], jnp.int32), 'masks': masks}

    def remask(w, count):  # w (L, ...): a threshold per layer, the k-th smallest magnitude
        whole = jax.sharding.reshard(w, P())  # a shard's weights alone would give its own cut
        size = jnp.abs(whole.reshape(w.shape[0], -1).astype(jnp.float32))  # (L, n)
        k = (sparsity(cfg, count) * size.shape[1]).astype(jnp.int32)
        cut = jnp.sort(size, axis=1)[:, k]  # (L,): the smallest magnitude kept
        keep = (size >= cut[:, None]).reshape(w.shape)
        return jax.sharding.reshard(keep, jax.typeof(w).sharding.spec)  # split as w is

    def update(updates, state, params):
        count = state['count']
        masks = jax.lax.cond(
            count % cfg.prune_interval == 0,
            lambda: jax.tree.map(lambda w, u: remask(w + u, count), params, updates),
            lambda: state['masks'])
        updates = jax.tree.map(lambda u, w, m: jnp.where(m, u, -w), updates, params, masks)
        return updates, {'count': count + 1, 'masks': masks}

    return optax.GradientTransformation(init, update)
