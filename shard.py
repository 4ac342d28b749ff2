"""How one model is split across many devices: the mesh, the params placed in their layouts, the
training step and the loss as one `jax.shard_map`, and arrays moved between devices and the host.

The devices form a 2-D mesh ('data', 'model'):
  - 'data' splits the batch (data parallelism); with FSDP (--fsdp) it splits the weights too,
    each on an axis that 'model' leaves whole (model.layout), gathered as each layer runs.
  - 'model' splits the weights inside each layer (Megatron tensor parallelism):

      weight                      layout (see model.py)   each device holds
      attn c_attn  (C, 3, C)      (None, None, 'model')   whole heads of q, k and v
      attn c_proj  (C, C)         ('model', None)         the rows for those heads   -> psum
      mlp  c_fc    (C, 4C)        (None, 'model')         a slice of the hidden units
      mlp  c_proj  (4C, C)        ('model', None)         the rows for that slice    -> psum
      wte, wpe, LayerNorms, the biases after a psum       replicated

Inside `shard_map`, code sees its device's local arrays and every collective is written out (or,
where JAX inserts it, named in a comment). One device is a 1x1 mesh running the same code.

Needs: model.py (GPT).
"""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental.multihost_utils import process_allgather
from jax.sharding import PartitionSpec as P

from model import GPT


def all_devices():  # jax.devices(), or one line where JAX_PLATFORMS or XLA_FLAGS ask the impossible
    try:
        return jax.devices()
    except (RuntimeError, AssertionError) as e:  # no such platform here, or 0 CPU devices
        raise ValueError(f"JAX could not start a backend ({str(e)[:150] or 'none found'}): check "
                         "the JAX_PLATFORMS and XLA_FLAGS this was run with") from None


def make_mesh(spec, devices=None):
    """'data=4,model=2' -> a 4x2 mesh. '' puts every device on the data axis."""
    devices = all_devices() if devices is None else devices
    sizes = {'data': 1, 'model': 1} if spec else {'data': len(devices), 'model': 1}
    seen = []
    for part in filter(None, spec.split(',')):
        name, _, n = part.partition('=')
        if name not in ('data', 'model') or name in seen or not n.isdecimal() or int(n) < 1:
            raise ValueError(f"--mesh={spec!r}: write it as data=N,model=M with positive integers")
        sizes[name] = int(n)
        seen.append(name)
    needed = sizes['data'] * sizes['model']
    if needed != len(devices):
        raise ValueError(f"--mesh={spec!r} needs {needed} devices but {len(devices)} are present: "
                         f"make data*model equal {len(devices)}")
    return jax.make_mesh((sizes['data'], sizes['model']), ('data', 'model'), devices=devices)


def check_divisible(cfg, model_axis=1):  # the heads split evenly: over C, and over 'model'
    if cfg.n_embd % cfg.n_head:
        raise ValueError(f"n_embd={cfg.n_embd} is not divisible by n_head={cfg.n_head}: "
                         "change one")
    if cfg.n_head % model_axis:
        raise ValueError(f"n_head={cfg.n_head} is not divisible by the model axis "
                         f"({model_axis}): choose a --mesh model size that divides n_head")


def cast(params, dtype):  # float arrays only: int8 weights stay int8
    def cast_one(x):
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
    return jax.tree.map(cast_one, params)


def init_params(cfg, mesh, seed, dtype):
    """Build the GPT straight into its sharded layout -> (graphdef, params, specs). params, the
    model's nnx.State, is a plain pytree of arrays; specs holds a PartitionSpec for each, read
    from the layouts in model.py. The same seed gives the same weights on 1 device or 8."""
    graphdef, shapes = nnx.split(nnx.eval_shape(lambda: GPT(cfg, nnx.Rngs(seed))))  # no memory
    specs = nnx.get_partition_spec(shapes)
    shardings = jax.tree.map(lambda spec: jax.NamedSharding(mesh, spec), specs)

    @partial(jax.jit, out_shardings=shardings)  # each device computes and keeps its own shards
    def init():
        return cast(nnx.state(GPT(cfg, nnx.Rngs(seed))), dtype)

    return graphdef, init(), specs


def per_device_bytes(tree):  # bytes one device holds of a sharded pytree (device 0's shards)
    return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))


# --- the training step --------------------------------------------------------------------------
def make_grads(graphdef, specs, mesh, grad_accum=1, use_dropout=False):
    """-> grads(params, batch, key) -> (mean loss, mean gradients) over the global batch. params:
    in the compute dtype; batch: (B, T+1) int32 token windows, split over 'data' and, on each
    device, into grad_accum micro-batches that run one after another. use_dropout: draw a key per
    micro-batch for the model's dropout (its rate is in the model's config)."""
    n_data = mesh.shape['data']
    fsdp_split = ['data' in spec for spec in jax.tree.leaves(specs)]  # FSDP's, split over 'data'

    def local_grads(params, batch, key):
        # Runs on each device. params: local shards in the compute dtype; batch: (B/data, T+1).
        # A param invariant over 'data' meeting data that varies gets an implicit cast whose
        # backward is an all-reduce over 'data': one per micro-batch, inside the scan. Casting it
        # to 'varying' once, here, keeps gradients local until the one psum after the scan.
        def vary_over_data(x, spec):  # FSDP's weights vary over 'data' already
            return x if 'data' in spec else jax.lax.pcast(x, 'data', to='varying')

        params = jax.tree.map(vary_over_data, params, specs)
        key = jax.random.fold_in(key, jax.lax.axis_index('data'))  # own dropout mask per shard
        micro = batch.reshape(grad_accum, -1, batch.shape[-1])  # (grad_accum, b, T+1)

        def body(acc, i):
            x, y = micro[i, :, :-1], micro[i, :, 1:]  # inputs and next-token targets, (b, T)
            k = jax.random.fold_in(key, i) if use_dropout else None
            loss, grads = jax.value_and_grad(
                lambda p: nnx.merge(graphdef, p).loss(x, y, k))(params)
            # bf16 gradients are summed in float32, so small micro-batch terms are not lost
            return jax.tree.map(jnp.add, acc, (loss, cast(grads, jnp.float32))), None

        # the carry varies over the axes of what is added to it: the params' and, for the loss, data
        zero_loss = jax.lax.pcast(jnp.zeros(()), 'data', to='varying')
        zero_grads = jax.tree.map(lambda x: jnp.zeros_like(x, jnp.float32), params)
        (loss, grads), _ = jax.lax.scan(body, (zero_loss, zero_grads), jnp.arange(grad_accum))

        # THE data-parallel all-reduce: one per step, after all micro-batches, summing every
        # device's gradient. 'model'-split gradients stay split: each device reduces its shard.
        # FSDP's are left out: they were reduce-scattered already, per micro-batch (the transpose
        # of model.fsdp_gather's all-gathers).
        grad_list, treedef = jax.tree.flatten(grads)
        to_sum = [g for g, split in zip(grad_list, fsdp_split) if not split]
        loss, summed = jax.lax.psum((loss, to_sum), 'data')
        summed = iter(summed)
        grad_list = [g if split else next(summed) for g, split in zip(grad_list, fsdp_split)]
        grads = jax.tree.unflatten(treedef, grad_list)
        # divided by the global batch's count of micro-batches, the sums become means
        return jax.tree.map(lambda g: g / (n_data * grad_accum), (loss, grads))

    sharded_grads = jax.shard_map(local_grads, mesh=mesh, in_specs=(specs, P('data'), P()),
                                  out_specs=(P(), specs))

    @jax.jit
    def grads(params, batch, key):  # the batch, wherever it is, split over 'data' first
        return sharded_grads(params, jax.sharding.reshard(batch, P('data')), key)
    return grads


def make_train_step(graphdef, specs, mesh, tx, dtype, grad_accum=1, use_dropout=False):
    """-> step(params, opt_state, batch, key) -> (params, opt_state, loss). tx: an optax
    optimizer; dtype: what the model computes with."""
    grads_fn = make_grads(graphdef, specs, mesh, grad_accum, use_dropout)

    @partial(jax.jit, donate_argnums=(0, 1))  # the new params and state reuse the old buffers
    def step(params, opt_state, batch, key):
        # params may be float32 master weights; the model computes with dtype (bf16) copies
        loss, grads = grads_fn(cast(params, dtype), batch, key)
        # The optimizer runs on the global (sharded) arrays outside shard_map: every op is
        # elementwise except the global norm, which XLA reduces across shards by itself.
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def make_loss(graphdef, specs, mesh, dtype, grad_accum=1):
    """-> loss(params, batch) -> (2,): the batch's mean loss and next-token accuracy, for
    evaluation (no dropout), computed a micro-batch at a time."""
    def local_loss(params, batch):
        micro = batch.reshape(grad_accum, -1, batch.shape[-1])  # (grad_accum, b, T+1)
        model = nnx.merge(graphdef, params)
        both = jax.lax.map(lambda b: jnp.stack(model.loss(b[:, :-1], b[:, 1:], accuracy=True)),
                           micro).mean(0)
        return jax.lax.pmean(both, 'data')  # each shard saw B/data sequences; average them

    sharded_loss = jax.shard_map(local_loss, mesh=mesh, in_specs=(specs, P('data')),
                                 out_specs=P())

    @jax.jit
    def loss(params, batch):
        return sharded_loss(cast(params, dtype), jax.sharding.reshard(batch, P('data')))
    return loss


# --- between the devices and the host: whole arrays out, shards in --------------------------------
def gather(tree):
    """A pytree of (sharded) arrays -> {its key path: the whole numpy array}, from every device of
    every process (each process gets all of it)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): np.asarray(process_allgather(x, tiled=True))
            for path, x in flat}


def put(a, like):  # numpy -> like's dtype and sharding: each device, of every process, its shard
    a = np.asarray(a, like.dtype)
    return jax.make_array_from_callback(a.shape, like.sharding, lambda index: a[index])


def relayout(tree, like):
    """-> `tree`'s arrays, each moved to the sharding of its counterpart in `like` (the same
    params in another layout: FSDP's split weights made whole, say), in `like`'s pytree."""
    shardings = [x.sharding for x in jax.tree.leaves(like)]
    leaves = jax.device_put(jax.tree.leaves(tree), shardings)
    return jax.tree.unflatten(jax.tree.structure(like), leaves)


def place(arrays, template):
    """{key path: numpy array} (as `gather` makes them) -> the pytree `template`, each array with
    its template's dtype and sharding, on the current mesh (which may differ from the mesh they
    were gathered from)."""
    def place_one(path, like):
        key = jax.tree_util.keystr(path)
        a = arrays.get(key)
        if a is None or (a.shape, a.dtype) != (like.shape, like.dtype):  # never cast silently
            held = 'missing' if a is None else f"{a.dtype}{list(a.shape)}"
            raise ValueError(f"the checkpoint's {key} is {held}, the model's {like.dtype}"
                             f"{list(like.shape)}: it holds another model (to train.py, pass "
                             "the flags it was trained with)")
        return put(a, like)
    return jax.tree_util.tree_map_with_path(place_one, template)
