"""How one model is split across many devices: the mesh, the layouts, the training step, the
sampler with its KV cache, and weights on disk (checkpoints, and GPT-2's in Hugging Face's layout).

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

The step is one `jax.shard_map`: inside it, code sees its device's local arrays and every
collective is written out (or, where JAX inserts it, named in a comment). One device is a 1x1
mesh running the same code.

Needs: model.py (GPT, Int8), data.py (atomic writes, safetensors, tokenizers).
"""
import json
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental.multihost_utils import process_allgather
from jax.sharding import PartitionSpec as P

from data import atomic_write, get_tokenizer, read_safetensors, write_safetensors
from model import GPT, Int8

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
    """Build the GPT straight into its sharded layout -> (graphdef, params, specs); params, the model's
    nnx.State, is a plain pytree of arrays. The same seed gives the same weights on 1 device or 8."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: GPT(cfg, nnx.Rngs(seed))))  # shapes, layouts: no memory
    specs = nnx.get_partition_spec(abstract)  # one PartitionSpec per param, from model.py
    # jitted, so that each device computes and keeps only its own shards
    params = jax.jit(lambda: jax.sharding.reshard(cast(nnx.state(GPT(cfg, nnx.Rngs(seed))), dtype), specs))()
    return graphdef, params, specs

def cast(params, dtype):  # float arrays only: int8 weights stay int8
    return jax.tree.map(lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)

def check_divisible(cfg, mesh):
    if cfg.n_embd % cfg.n_head:
        raise ValueError(f"n_embd={cfg.n_embd} is not divisible by n_head={cfg.n_head}: change one")
    if cfg.n_head % mesh.shape['model']:
        raise ValueError(f"n_head={cfg.n_head} is not divisible by the model axis ({mesh.shape['model']}): "
                         "choose a --mesh model size that divides n_head")

def per_device_bytes(tree):  # bytes one device holds of a sharded pytree (device 0's shards)
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
    """AdamW with lr_schedule and global-norm clipping; weight decay on matrices, not biases or LayerNorm scales."""
    lr = lr_schedule(cfg)
    decay = jax.tree_util.tree_map_with_path(
        lambda path, _: not any(w in str(k) for k in path for w in ('bias', 'scale')), params)
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                     # Adam's moments in the params' dtype: float32 gradients would otherwise promote them
                     optax.adamw(lr, b1=cfg.beta1, b2=cfg.beta2, weight_decay=cfg.weight_decay, mask=decay,
                                 mu_dtype=jax.tree.leaves(params)[0].dtype))
    return tx, lr

def make_grads(graphdef, specs, mesh, cfg):
    """Returns grads(params, batch, key) -> (mean loss, mean gradients), for the global batch. params: in
    the compute dtype; batch: (B, T+1) int32 token windows, split over 'data' and, on each device, into
    cfg.grad_accum micro-batches that run one after another."""
    n_data, n_micro = mesh.shape['data'], cfg.grad_accum

    def local_grads(params, batch, key):
        # Runs on each device. params: local shards in the compute dtype; batch: (B/data, T+1).
        # A param invariant over 'data' meeting data that varies gets an implicit cast whose backward
        # is an all-reduce over 'data': one per micro-batch, inside the scan. Casting to 'varying' once,
        # here, keeps gradients local until the one psum after it. (FSDP's weights vary already.)
        params = jax.tree.map(lambda p, s: p if 'data' in s else jax.lax.pcast(p, 'data', to='varying'), params, specs)
        key = jax.random.fold_in(key, jax.lax.axis_index('data'))  # own dropout mask per shard
        micro = batch.reshape(n_micro, -1, batch.shape[-1])  # (n_micro, B/data/n_micro, T+1)

        def body(acc, i):
            x, y = micro[i, :, :-1], micro[i, :, 1:]  # inputs and next-token targets, (b, T)
            k = jax.random.fold_in(key, i) if cfg.dropout > 0 else None
            loss, grads = jax.value_and_grad(lambda p: nnx.merge(graphdef, p).loss(x, y, k))(params)
            # bf16 gradients are summed in float32, so small micro-batch terms are not lost
            return jax.tree.map(jnp.add, acc, (loss, cast(grads, jnp.float32))), None

        # the carry varies over the mesh axes of what is added to it: each param's (zeros_like), 'data' for the loss
        zero = (jax.lax.pcast(jnp.zeros(()), 'data', to='varying'),
                jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), params))
        (loss, grads), _ = jax.lax.scan(body, zero, jnp.arange(n_micro))
        # THE data-parallel all-reduce: one per step, after all micro-batches, summing every device's
        # gradient; divided by the count, the sum becomes the batch mean. 'model'-split gradients stay
        # split: each device reduces only its shard. FSDP's are left out: they were reduce-scattered
        # already, per micro-batch (the transpose of the all-gathers in model.value).
        loss, summed = jax.lax.psum((loss, jax.tree.map(lambda g, s: None if 'data' in s else g, grads, specs)), 'data')
        grads = jax.tree.map(lambda r, g: g if r is None else r, summed, grads, is_leaf=lambda r: r is None)
        return jax.tree.map(lambda g: g / (n_data * n_micro), (loss, grads))

    grads = jax.shard_map(local_grads, mesh=mesh, in_specs=(specs, P('data'), P()), out_specs=(P(), specs))
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

def make_loss(graphdef, specs, mesh, dtype, n_micro=1):
    """Returns loss(params, batch) -> the batch's mean loss, for evaluation (no dropout), a micro-batch at a time."""

    def local_loss(params, batch):
        micro = batch.reshape(n_micro, -1, batch.shape[-1])  # (n_micro, B/data/n_micro, T+1)
        loss = jax.lax.map(lambda b: nnx.merge(graphdef, params).loss(b[:, :-1], b[:, 1:]), micro).mean()
        return jax.lax.pmean(loss, 'data')  # each shard saw B/data sequences; average them

    f = jax.shard_map(local_loss, mesh=mesh, in_specs=(specs, P('data')), out_specs=P())
    return jax.jit(lambda params, batch: f(cast(params, dtype), jax.sharding.reshard(batch, P('data'))))

def quantize(params, mesh):
    """int8 weights (model.Int8) for the layers' four matmul kernels, for sampling: a float32 scale,
    max |w| / 127, per output channel and per model-axis group of input rows, so that each device's
    shard of a row-parallel kernel has its own scales and every layout stays as written."""
    h = params['h']
    for module, name in (('attn', 'c_attn'), ('attn', 'c_proj'), ('mlp', 'c_fc'), ('mlp', 'c_proj')):
        w = np.asarray(jax.device_get(h[module][name][...]), np.float32)
        g = w.reshape(w.shape[0], mesh.shape['model'], -1, *w.shape[2:])  # (L, groups, in/groups, out...)
        scale = np.maximum(np.abs(g).max(2), 1e-30) / 127  # (L, groups, out...)
        q = np.round(g / scale[:, :, None]).astype(np.int8).reshape(w.shape)
        sharding = h[module][name][...].sharding
        h[module][name].set_value(Int8(jax.device_put(q, sharding), jax.device_put(scale, sharding)))
    return params

# --- sampling: a KV cache filled by one pass over the prompt, then one token per step ---------
CACHE = P(None, None, None, 'model', None)  # (L, N, S, heads, head_dim): heads split, as attention's

def pick(logits, key, temperature, top_k, top_p):
    """(N, vocab) float32 logits -> (N,) next ids. temperature 0 is greedy; top_k keeps the k most
    likely tokens (0: all); top_p keeps the fewest whose probabilities add up to top_p (nucleus)."""
    if temperature == 0:
        return jnp.argmax(logits, -1)
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1:
        ranked = jnp.sort(logits, -1)[:, ::-1]  # descending
        p = jax.nn.softmax(ranked, -1)
        keep = jnp.sum(jnp.cumsum(p, -1) - p < top_p, -1)  # tokens whose mass before them is < top_p
        logits = jnp.where(logits < jnp.take_along_axis(ranked, keep[:, None] - 1, -1), -jnp.inf, logits)
    return jax.random.categorical(key, logits)

def make_sampler(graphdef, specs, mesh, cfg, dtype, temperature=1.0, top_k=0, top_p=1.0):
    """Returns generate(params, prompt, max_new_tokens, key, num_samples=1, cached=True), which yields
    (next ids (N,), their logits (N, vocab)) once per new token. With the cache, one pass over the prompt
    fills it, then each step runs the newest token alone; a full cache (block_size) is refilled with the
    newest half of the text, recomputed at its new positions. cached=False reruns the newest block_size
    tokens for every token, as a model without a cache must: the same tokens, to test and time against."""

    def local(params, idx, cache, start, last, key, i):  # idx (N, T): the tokens at start..start+T-1
        logits, cache = nnx.merge(graphdef, params)(idx, cache=cache, start=start)
        logits = logits[:, last, :cfg.vocab_size]  # (N, vocab) at idx[:, last], the padding dropped
        return pick(logits, jax.random.fold_in(key, i), temperature, top_k, top_p), logits, cache  # i: the token's number

    # The model axis splits the cache by heads; the samples are replicated over 'data'.
    f = jax.shard_map(local, mesh=mesh, in_specs=(specs, P(), CACHE, P(), P(), P(), P()), out_specs=(P(), P(), CACHE))
    step = jax.jit(f, donate_argnums=(2,))  # the cache is updated in place
    S = cfg.block_size

    def generate(params, prompt, max_new_tokens, key, num_samples=1, cached=True):
        shape = (cfg.n_layer, num_samples, S, cfg.n_head, cfg.n_embd // cfg.n_head)
        cache = tuple(jnp.zeros(shape, dtype, device=jax.NamedSharding(mesh, CACHE)) for _ in 'kv')
        ids = np.tile(np.asarray(prompt, np.int32), (num_samples, 1))  # (N, t)
        params, n = cast(params, dtype), 0  # n: tokens in the cache, at positions 0..n-1
        for i in range(max_new_tokens):
            if cached and 0 < n < S:  # decode: the newest token, at position n
                nxt, logits, cache = step(params, ids[:, -1:], cache, n, 0, key, i)
                n += 1
            else:  # prefill from the newest n tokens: the prompt, or half of a full cache
                n = min(ids.shape[1], S // 2 if cached and n else S)
                T = min(S, 1 << (n - 1).bit_length()) if cached else S  # few shapes, few compilations
                window = np.zeros((num_samples, T), np.int32)  # causal: the padding after n is never read
                window[:, :n] = ids[:, -n:]
                nxt, logits, cache = step(params, window, cache, 0, n - 1, key, i)
            ids = np.concatenate([ids, np.asarray(nxt, np.int32)[:, None]], 1)
            yield ids[:, -1], logits

    return generate

# --- GPT-2's own weights, in Hugging Face's layout: config.json and model.safetensors ----------
# Hugging Face's names for layer i's tensors (h.{i}.NAME) -> ours, in the stacked layers GPT.h.
# Its Conv1D weights are (in, out), as ours; only the fused q/k/v is reshaped, (C, 3C) <-> (C, 3, C).
HF_LAYER = {'ln_1.weight': ('ln_1', 'scale'), 'ln_1.bias': ('ln_1', 'bias'),
            'attn.c_attn.weight': ('attn', 'c_attn'), 'attn.c_attn.bias': ('attn', 'c_attn_bias'),
            'attn.c_proj.weight': ('attn', 'c_proj'), 'attn.c_proj.bias': ('attn', 'c_proj_bias'),
            'ln_2.weight': ('ln_2', 'scale'), 'ln_2.bias': ('ln_2', 'bias'),
            'mlp.c_fc.weight': ('mlp', 'c_fc'), 'mlp.c_fc.bias': ('mlp', 'c_fc_bias'),
            'mlp.c_proj.weight': ('mlp', 'c_proj'), 'mlp.c_proj.bias': ('mlp', 'c_proj_bias')}
# What a config.json must say (or leave out) for this model to compute its function
HF_FIXED = dict(model_type='gpt2', activation_function='gelu_new', layer_norm_epsilon=1e-5,
                scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
                reorder_and_upcast_attn=False, tie_word_embeddings=True)

def hf_shape(name, s):  # our per-layer shape -> Hugging Face's
    return (s[0], s[1] * s[2]) if name == 'c_attn' else (s[0] * s[1],) if name == 'c_attn_bias' else tuple(s)

def to_hf(params, cfg):
    """params (an nnx.State, on any mesh) -> {Hugging Face name: float32 numpy array}."""
    p = jax.device_get(nnx.to_pure_dict(params))  # nested dicts of whole (gathered) arrays
    out = {'wte.weight': p['wte'][:cfg.vocab_size], 'wpe.weight': p['wpe'],  # the vocab padding dropped
           'ln_f.weight': p['ln_f']['scale'], 'ln_f.bias': p['ln_f']['bias']}
    for hf, (module, name) in HF_LAYER.items():
        for i, a in enumerate(p['h'][module][name]):
            out[f'h.{i}.{hf}'] = a.reshape(hf_shape(name, a.shape))
    return {k: np.asarray(v, np.float32) for k, v in out.items()}

def hf_config(folder):
    """config.json -> (the GPTConfig fields it sets, the tokenizer), or a ValueError naming what it can't express."""
    try:
        c = json.loads((Path(folder) / 'config.json').read_text())
        inner = c.get('n_inner') and 4 * c['n_embd']  # None means 4 * n_embd, the only width here
        for k, want in {**HF_FIXED, 'n_inner': inner}.items():
            if c.get(k, want) != want:
                raise ValueError(f"{folder}/config.json has {k}={c[k]!r}, but this model is GPT-2, with {k}={want!r}")
        return dict(n_layer=c['n_layer'], n_head=c['n_head'], n_embd=c['n_embd'], block_size=c['n_positions'],
                    vocab_size=c['vocab_size'], bias=True), c.get('jaxgpt_tokenizer', 'gpt2')
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"--init_from={folder}: no usable config.json ({type(e).__name__}: {e}): pass a "
                         "folder holding GPT-2's config.json and model.safetensors") from None

def from_hf(folder, params, cfg):
    """folder/model.safetensors -> params (same shapes, dtypes, shardings), or a ValueError naming
    a missing, unexpected or misshapen tensor. A longer wpe is cropped to cfg.block_size."""
    t = {k.removeprefix('transformer.'): v for k, v in read_safetensors(Path(folder) / 'model.safetensors').items()
         if not k.endswith(('.attn.bias', '.attn.masked_bias', 'lm_head.weight'))}  # mask buffers; tied head
    p, C = nnx.to_pure_dict(params), cfg.n_embd
    shapes = {'wte.weight': (cfg.vocab_size, C), 'wpe.weight': (cfg.block_size, C), 'ln_f.weight': (C,), 'ln_f.bias': (C,)}
    shapes.update({f'h.{i}.{hf}': hf_shape(name, p['h'][m][name].shape[1:])
                   for hf, (m, name) in HF_LAYER.items() for i in range(cfg.n_layer)})
    if 'wpe.weight' in t:
        t['wpe.weight'] = t['wpe.weight'][:cfg.block_size]
    for problem, names in (('lacks', shapes.keys() - t.keys()), ('has unexpected', t.keys() - shapes.keys())):
        if names:
            raise ValueError(f"{folder}/model.safetensors {problem} tensors {', '.join(sorted(names)[:3])}"
                             f"{' ...' if len(names) > 3 else ''}: is it a GPT-2 saved by Hugging Face?")
    for k, shape in shapes.items():
        if t[k].shape != shape:
            raise ValueError(f"{folder}/model.safetensors: {k} is {t[k].shape}, but config.json implies {shape}")
    new = {'wte': np.pad(t['wte.weight'], [(0, cfg.padded_vocab - cfg.vocab_size), (0, 0)]),  # zero rows, never read
           'wpe': t['wpe.weight'], 'ln_f': {'scale': t['ln_f.weight'], 'bias': t['ln_f.bias']}, 'h': {}}
    for hf, (m, name) in HF_LAYER.items():
        new['h'].setdefault(m, {})[name] = np.stack([t[f'h.{i}.{hf}'] for i in range(cfg.n_layer)]).reshape(p['h'][m][name].shape)
    state = jax.tree.map(lambda x: x, params)  # a copy to fill: nested like params, numpy leaves
    nnx.replace_by_pure_dict(state, new)
    return jax.tree.map(put, state, params)

def export_hf(folder, params, cfg, tokenizer):
    """Write params as GPT-2 in Hugging Face's layout: transformers' GPT2LMHeadModel loads it."""
    eot = get_tokenizer(tokenizer).eot
    config = dict(HF_FIXED, architectures=['GPT2LMHeadModel'], n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                  n_positions=cfg.block_size, vocab_size=cfg.vocab_size, bos_token_id=eot, eos_token_id=eot,
                  jaxgpt_tokenizer=tokenizer)  # which of data.py's tokenizers it reads
    write_safetensors(Path(folder) / 'model.safetensors', to_hf(params, cfg))
    atomic_write(Path(folder) / 'config.json', lambda f: f.write(json.dumps(config, indent=2).encode()))

# --- checkpoints: gathered from all devices into one .npz, placed back onto any mesh -----------
def save(path, tree, meta):
    """Write a pytree of (sharded) arrays and a JSON-able dict to one .npz file, atomically.
    No pickle anywhere: bf16 is stored as its uint16 bits, the dict as UTF-8 JSON bytes."""
    arrays = {}
    for path_, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = np.asarray(process_allgather(x, tiled=True))  # the shards of every device, of every process
        arrays[jax.tree_util.keystr(path_)] = a.view(np.uint16) if a.dtype == jnp.bfloat16 else a
    arrays['__meta__'] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    if jax.process_index() == 0:  # one writer
        atomic_write(path, lambda f: np.savez(f, **arrays))

def read(path):
    """-> (arrays, meta) of a checkpoint, or ValueError saying it is corrupt."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        return arrays, json.loads(arrays.pop('__meta__').tobytes())
    except FileNotFoundError:  # listed a moment ago: something else deletes checkpoints here
        raise ValueError(f"checkpoint {path} vanished while it was being read: is another program "
                         "deleting checkpoints in that folder?") from None
    except Exception as e:  # truncated zip, bad CRC, missing meta, bad JSON: all the same to the user
        raise ValueError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}): "
                         "delete it to resume from an earlier one") from None

def put(a, like):  # numpy -> like's dtype and sharding: each device, of every process, takes its shard
    a = np.asarray(a, like.dtype)
    return jax.make_array_from_callback(a.shape, like.sharding, lambda index: a[index])

def place(arrays, template):
    """Put checkpoint arrays into the shapes, dtypes and shardings of `template`, a pytree of
    arrays on the current mesh (which may differ from the mesh they were saved from)."""
    def one(path, t):
        key = jax.tree_util.keystr(path)
        a = arrays.get(key)
        if a is None or a.shape != t.shape:
            raise ValueError(f"the checkpoint's {key} has shape {None if a is None else a.shape}, "
                             f"the model's {t.shape}: pass the model flags it was trained with")
        return put(a.view(jnp.bfloat16) if a.dtype == np.uint16 else a, t)
    return jax.tree_util.tree_map_with_path(one, template)
