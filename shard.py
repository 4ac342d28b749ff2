"""How one model is split across many devices: the mesh, the layouts, and the training step.

The devices form a 2-D mesh ('data', 'model'):
  - 'data' splits the batch (data parallelism): each row of devices sees different sequences
    and holds a full copy of the weights it is given.
  - 'model' splits the weights inside each layer (Megatron tensor parallelism):

      weight                      layout (see model.py)   each device holds
      attn c_attn  (C, 3, C)      (None, None, 'model')   whole heads of q, k and v
      attn c_proj  (C, C)         ('model', None)         the rows for those heads   -> psum
      mlp  c_fc    (C, 4C)        (None, 'model')         a slice of the hidden units
      mlp  c_proj  (4C, C)        ('model', None)         the rows for that slice    -> psum
      wte, wpe, LayerNorms, the biases after a psum       replicated

The step is one `jax.shard_map`: inside it, code sees its device's local arrays and every
collective is written out (or, where JAX inserts it, named in a comment). One device is a 1x1
mesh running the same code.

Needs: model.py (GPT), data.py (atomic_write, for checkpoints).
"""
import json
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from data import atomic_write
from model import GPT


def make_mesh(spec, devices=None):
    """'data=4,model=2' -> a 4x2 mesh. '' puts every device on the data axis."""
    devices = jax.devices() if devices is None else devices
    sizes = {'data': len(devices), 'model': 1} if not spec else {'data': 1, 'model': 1}
    for part in filter(None, spec.split(',')):
        name, _, n = part.partition('=')
        if name not in ('data', 'model') or not n.isdigit() or int(n) < 1:
            raise ValueError(f"--mesh={spec!r}: write it as data=N,model=M with positive integers")
        sizes[name] = int(n)
    if sizes['data'] * sizes['model'] != len(devices):
        raise ValueError(f"--mesh={spec!r} needs {sizes['data'] * sizes['model']} devices but "
                         f"{len(devices)} are present: make data*model equal {len(devices)}")
    return jax.make_mesh((sizes['data'], sizes['model']), ('data', 'model'), devices=devices)


def init_params(cfg, mesh, seed, dtype):
    """Build the GPT straight into its sharded layout; returns (graphdef, params, specs).

    params is the model's nnx.State, a plain pytree of arrays from here on. The values do not
    depend on the mesh: the same seed gives the same weights on 1 device or 8.
    """
    abstract = nnx.eval_shape(lambda: GPT(cfg, nnx.Rngs(seed)))  # shapes and layouts, no memory
    graphdef, abstract_state = nnx.split(abstract)
    specs = nnx.get_partition_spec(abstract_state)  # one PartitionSpec per param, from model.py

    @jax.jit
    def init():  # each device computes and keeps only its own shards
        params = nnx.state(GPT(cfg, nnx.Rngs(seed)))
        return jax.sharding.reshard(cast(params, dtype), specs)

    return graphdef, init(), specs


def cast(params, dtype):
    return jax.tree.map(lambda p: p.astype(dtype), params)


def check_divisible(cfg, mesh):
    m = mesh.shape['model']
    if cfg.n_embd % cfg.n_head:
        raise ValueError(f"n_embd={cfg.n_embd} is not divisible by n_head={cfg.n_head}: change one")
    if cfg.n_head % m:
        raise ValueError(f"n_head={cfg.n_head} is not divisible by the model axis ({m}): "
                         "choose a --mesh model size that divides n_head")


def per_device_bytes(tree):
    """Bytes one device holds of a sharded pytree (device 0's shards)."""
    return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))


def storage_dtype(cfg):  # the params' dtype: float32 master copies, or the compute dtype itself
    return 'float32' if cfg['master_weights'] else cfg['dtype']


def lr_schedule(cfg):
    """nanoGPT's: a linear warmup that starts at lr / (warmup + 1), so the first step learns, then
    a cosine decay to min_lr at max_iters. Takes optax's count: 0 for the first step."""
    def lr(count):
        warm = cfg.learning_rate * (count + 1) / (cfg.warmup_iters + 1)
        t = jnp.clip((count - cfg.warmup_iters) / max(cfg.max_iters - cfg.warmup_iters, 1), 0.0, 1.0)
        decay = cfg.min_lr + 0.5 * (1 + jnp.cos(jnp.pi * t)) * (cfg.learning_rate - cfg.min_lr)
        return jnp.where(count < cfg.warmup_iters, warm, decay)
    return lr


def make_optimizer(cfg, params):
    """AdamW with lr_schedule, global-norm clipping at 1.0; weight decay only on matrices
    (kernels and embeddings), not on biases and LayerNorm scales."""
    lr = lr_schedule(cfg)
    no_decay = ('bias', 'scale')
    decay = jax.tree_util.tree_map_with_path(
        lambda path, _: not any(w in str(k) for k in path for w in no_decay), params)
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        # Adam's moments in the params' dtype: float32 gradients would otherwise promote them
        optax.adamw(lr, b1=cfg.beta1, b2=cfg.beta2, weight_decay=cfg.weight_decay, mask=decay,
                    mu_dtype=jax.tree.leaves(params)[0].dtype))
    return tx, lr


def make_grads(graphdef, specs, mesh, cfg):
    """Returns grads(params, batch, key) -> (mean loss, mean gradients), for the global batch.

    params: in the compute dtype. batch: (B, T+1) int32 token windows, split over 'data' and,
    on each device, into cfg.grad_accum micro-batches that run one after another."""
    n_data, n_micro = mesh.shape['data'], cfg.grad_accum

    def local_grads(params, batch, key):
        # Runs on each device. params: local shards in the compute dtype; batch: (B/data, T+1).
        # A param invariant over 'data' used with data that varies would get an implicit cast
        # whose backward is an all-reduce over 'data'; inside the scan below that would be one
        # all-reduce per micro-batch. Casting to 'varying' once, here, keeps each device's
        # gradients local until the single psum after the scan.
        params = jax.lax.pcast(params, 'data', to='varying')
        key = jax.random.fold_in(key, jax.lax.axis_index('data'))  # own dropout mask per shard
        micro = batch.reshape(n_micro, -1, batch.shape[-1])  # (n_micro, B/data/n_micro, T+1)

        def loss_fn(p, x, y, k):
            return nnx.merge(graphdef, p).loss(x, y, k)

        def body(acc, i):
            x, y = micro[i, :, :-1], micro[i, :, 1:]  # inputs and next-token targets, (b, T)
            k = jax.random.fold_in(key, i) if cfg.dropout > 0 else None
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y, k)
            # bf16 gradients are summed in float32, so small micro-batch terms are not lost
            grads = cast(grads, jnp.float32)
            return jax.tree.map(jnp.add, acc, (loss, grads)), None

        # the carry must vary over the same mesh axes as what is added to it: zeros_like keeps
        # each param's; the loss varies over 'data' only
        zero = (jax.lax.pcast(jnp.zeros(()), 'data', to='varying'),
                jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), params))
        (loss, grads), _ = jax.lax.scan(body, zero, jnp.arange(n_micro))
        # THE data-parallel all-reduce: one per step, after all micro-batches. It sums every
        # device's gradient; dividing by the count turns the sum into the mean over the batch.
        # Gradients of 'model'-split weights stay split: each device reduces only its shard.
        loss, grads = jax.lax.psum((loss, grads), 'data')
        return jax.tree.map(lambda g: g / (n_data * n_micro), (loss, grads))

    grads = jax.shard_map(local_grads, mesh=mesh, in_specs=(specs, P('data'), P()),
                          out_specs=(P(), specs))
    # each data row of devices gets its own slice of the batch
    return jax.jit(lambda params, batch, key: grads(params, jax.sharding.reshard(batch, P('data')), key))


def make_train_step(graphdef, specs, mesh, tx, cfg):
    """Returns step(params, opt_state, batch, key) -> (params, opt_state, loss)."""
    grads_fn = make_grads(graphdef, specs, mesh, cfg)

    @partial(jax.jit, donate_argnums=(0, 1))  # the new params and state reuse the old buffers
    def step(params, opt_state, batch, key):
        # params may be float32 master weights; the model computes with cfg.dtype (bf16) copies
        loss, grads = grads_fn(cast(params, cfg.dtype), batch, key)
        # The optimizer runs on the global (sharded) arrays outside shard_map: every op is
        # elementwise except the global norm, which XLA reduces across shards by itself.
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def make_loss(graphdef, specs, mesh, dtype):
    """Returns loss(params, batch) -> mean loss over the batch, for evaluation (no dropout)."""

    def local_loss(params, batch):
        loss = nnx.merge(graphdef, params).loss(batch[:, :-1], batch[:, 1:])
        return jax.lax.pmean(loss, 'data')  # each shard saw B/data sequences; average them

    f = jax.shard_map(local_loss, mesh=mesh, in_specs=(specs, P('data')), out_specs=P())
    return jax.jit(lambda params, batch: f(cast(params, dtype), jax.sharding.reshard(batch, P('data'))))


def make_logits(graphdef, specs, mesh, dtype):
    """Returns logits(params, idx (B, T)) -> (B, T, padded_vocab) float32, for sampling.

    The batch is small and replicated; the weights stay split over 'model'."""
    f = jax.shard_map(lambda p, idx: nnx.merge(graphdef, p)(idx)[0], mesh=mesh,
                      in_specs=(specs, P()), out_specs=P())
    return jax.jit(lambda params, idx: f(cast(params, dtype), idx))


# --- sampling ---------------------------------------------------------------------------------

def generate(logits_fn, params, prompt, max_new_tokens, block_size, vocab_size,
             temperature=1.0, top_k=None, key=None, num_samples=1):
    """Autoregressive sampling. prompt: list of token ids -> (num_samples, len + new) ids.

    Each step runs the model on a fixed (num_samples, block_size) window, so it compiles once:
    the context is left-aligned and padded on the right, and causal attention guarantees the
    padding never affects the position we read (pos). Past block_size the window slides."""

    @jax.jit
    def next_token(params, window, pos, key):  # window (N, T) int32 -> (N,) next ids
        logits = logits_fn(params, window)[:, pos, :vocab_size] / temperature  # drop the padding
        if top_k:  # keep the k most likely tokens, renormalize over them
            kth = jax.lax.top_k(logits, min(top_k, vocab_size))[0][:, -1:]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        return jax.random.categorical(key, logits)

    key = jax.random.key(0) if key is None else key
    ids = np.tile(np.asarray(prompt, np.int32), (num_samples, 1))  # (N, t)
    for i in range(max_new_tokens):
        context = ids[:, -block_size:]
        window = np.zeros((num_samples, block_size), np.int32)
        window[:, :context.shape[1]] = context
        nxt = next_token(params, window, context.shape[1] - 1, jax.random.fold_in(key, i))
        ids = np.concatenate([ids, np.asarray(nxt)[:, None]], axis=1)
    return ids



# --- checkpoints: gathered from all devices into one .npz, placed back onto any mesh -----------

def save(path, tree, meta):
    """Write a pytree of (sharded) arrays and a JSON-able dict to one .npz file, atomically.
    No pickle anywhere: bf16 is stored as its uint16 bits, the dict as UTF-8 JSON bytes."""
    arrays = {}
    for path_, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = np.asarray(jax.device_get(x))  # gathers the shards of every device
        arrays[jax.tree_util.keystr(path_)] = a.view(np.uint16) if a.dtype == jnp.bfloat16 else a
    arrays['__meta__'] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    atomic_write(path, lambda f: np.savez(f, **arrays))


def read(path):
    """-> (arrays, meta) of a checkpoint, or ValueError saying it is corrupt."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        return arrays, json.loads(arrays.pop('__meta__').tobytes())
    except Exception as e:  # truncated zip, bad CRC, missing meta, bad JSON: all the same to the user
        raise ValueError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}): "
                         "delete it to resume from an earlier one") from None


def place(arrays, template):
    """Put checkpoint arrays into the shapes, dtypes and shardings of `template`, a pytree of
    arrays on the current mesh (which may differ from the mesh they were saved from)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    out = []
    for path, t in leaves:
        key = jax.tree_util.keystr(path)
        a = arrays.get(key)
        if a is None or a.shape != t.shape:
            raise ValueError(f"the checkpoint's {key} has shape {None if a is None else a.shape}, "
                             f"the model's {t.shape}: pass the model flags it was trained with")
        a = a.view(jnp.bfloat16) if a.dtype == np.uint16 else a
        out.append(jax.device_put(a.astype(t.dtype), t.sharding))  # each device takes its shard
    return jax.tree_util.tree_unflatten(treedef, out)
