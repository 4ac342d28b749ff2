"""The optimizer: AdamW with nanoGPT's learning-rate schedule, global-norm clipping, and weight
decay on the matrices only. An optax chain, so that what it does to each update reads in order.

Needs: nothing from the other files (cfg: train.py's Config, or anything with its fields).
"""
import jax
import jax.numpy as jnp
import optax


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
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)
