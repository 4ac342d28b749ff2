"""GPT-2's own weights, in and out, in Hugging Face's layout: a folder of config.json and
model.safetensors, as transformers saves and loads it. The safetensors format is read and
written by hand (it is a JSON header and raw arrays), so there is no dependency to add.

Needs: model.py (GPT: the params' shapes), shard.py (params built and placed on a mesh),
checkpoint.py (atomic_write).
"""
import json
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from checkpoint import atomic_write
from model import GPT, GPTConfig
from shard import check_divisible, init_params, put

# Hugging Face's names for layer i's tensors (h.{i}.NAME) -> ours, in the stacked layers GPT.h.
# Conv1D weights are (in, out), as ours; only the fused q/k/v is reshaped: (C, 3C) <-> (C, 3, C).
LAYER_NAMES = {
    'ln_1.weight': ('ln_1', 'scale'), 'ln_1.bias': ('ln_1', 'bias'),
    'attn.c_attn.weight': ('attn', 'c_attn'), 'attn.c_attn.bias': ('attn', 'c_attn_bias'),
    'attn.c_proj.weight': ('attn', 'c_proj'), 'attn.c_proj.bias': ('attn', 'c_proj_bias'),
    'ln_2.weight': ('ln_2', 'scale'), 'ln_2.bias': ('ln_2', 'bias'),
    'mlp.c_fc.weight': ('mlp', 'c_fc'), 'mlp.c_fc.bias': ('mlp', 'c_fc_bias'),
    'mlp.c_proj.weight': ('mlp', 'c_proj'), 'mlp.c_proj.bias': ('mlp', 'c_proj_bias'),
}
# What a config.json must say (or leave out) for this model to compute its function
FIXED = dict(model_type='gpt2', activation_function='gelu_new', layer_norm_epsilon=1e-5,
             scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
             reorder_and_upcast_attn=False, tie_word_embeddings=True)
SAFETENSORS_DTYPES = {'F32': '<f4', 'F16': '<f2', 'BF16': '<u2'}


# --- safetensors: an 8-byte little-endian header length, a JSON header, then the raw arrays -----
def read_safetensors(path):
    """{name: float32 array} from a .safetensors file of F32, F16 or BF16 tensors."""
    try:
        if not Path(path).is_file():  # a folder, a FIFO or a device would block or fail later
            raise ValueError("it is not a regular file")
        with open(path, 'rb') as f:
            n = int.from_bytes(f.read(8), 'little')
            if n > Path(path).stat().st_size - 8:
                raise ValueError(f"its header claims {n:,} bytes, more than the file holds")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
        raw = np.memmap(path, np.uint8, 'r', offset=8 + n)  # read from disk as each is used
        spans = sorted(tuple(e['data_offsets']) for k, e in header.items() if k != '__metadata__')
        ends = [0] + [end for _, end in spans]  # each span starts where the one before ended
        if [start for start, _ in spans] != ends[:-1] or ends[-1] != raw.size:
            raise ValueError("its tensors' bytes overlap, leave gaps or do not end at its end")
        out = {}
        for name, entry in header.items():
            if name == '__metadata__':
                continue
            a = raw[slice(*entry['data_offsets'])].view(SAFETENSORS_DTYPES[entry['dtype']])
            if entry['dtype'] == 'BF16':  # a bf16 number is the top half of a float32's bits
                a = (a.astype('<u4') << 16).view('<f4')
            out[name] = np.array(a, np.float32).reshape(entry['shape'])
        return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise ValueError(f"{path} is not a readable safetensors file of F32, F16 or BF16 tensors "
                         f"({type(e).__name__}: {e})") from None


def write_safetensors(path, arrays):  # {name: array}, written as float32, atomically
    header, offset = {}, 0
    for name, a in arrays.items():
        end = offset + 4 * a.size
        header[name] = dict(dtype='F32', shape=list(a.shape), data_offsets=[offset, end])
        offset = end
    head = json.dumps(header).encode()
    head += b' ' * (-len(head) % 8)  # the data starts 8-byte aligned, as the format asks

    def write(f):
        f.write(len(head).to_bytes(8, 'little'))
        f.write(head)
        for a in arrays.values():
            f.write(np.ascontiguousarray(a, '<f4').tobytes())
    atomic_write(path, write)


# --- GPT-2's config and names <-> ours ------------------------------------------------------------
def read_config(folder):
    """config.json -> (the GPTConfig fields it sets, the tokenizer's name), or a ValueError naming
    what this model cannot express."""
    try:
        if not (Path(folder) / 'config.json').is_file():  # a FIFO would block
            raise FileNotFoundError('no regular file config.json')
        config = json.loads((Path(folder) / 'config.json').read_text())
        if not isinstance(config, dict):
            raise TypeError('it is not a JSON object')
        inner = config.get('n_inner') and 4 * config['n_embd']  # None: 4 n_embd, the only width
        for k, want in {**FIXED, 'n_inner': inner}.items():
            if config.get(k, want) != want:
                raise ValueError(f"{folder}/config.json has {k}={config[k]!r}, but this model is "
                                 f"GPT-2, with {k}={want!r}")
        fields = dict(n_layer=config['n_layer'], n_head=config['n_head'], n_embd=config['n_embd'],
                      block_size=config['n_positions'], vocab_size=config['vocab_size'])
        for k, v in fields.items():
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 2**24:
                raise ValueError(f"{folder}/config.json has {k}={v!r}: a GPT-2's sizes are "
                                 "whole numbers from 1 to 2**24")
        tokenizer = config.get('jaxgpt_tokenizer', 'gpt2')
        if tokenizer not in ('byte', 'gpt2'):
            raise ValueError(f"{folder}/config.json names jaxgpt_tokenizer={tokenizer!r}: "
                             "this project has byte and gpt2")
        return dict(fields, bias=True), tokenizer
    except (OSError, KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError,
            RecursionError) as e:
        raise ValueError(f"--init_from={folder}: no usable config.json ({type(e).__name__}: "
                         f"{e}): pass a folder holding GPT-2's config.json and model.safetensors"
                         ) from None


def hf_shape(name, shape):  # our per-layer shape -> Hugging Face's: the fused q/k/v flattened
    if name in ('c_attn', 'c_attn_bias'):  # (C, 3, C) -> (C, 3C); (3, C) -> (3C,)
        return (*shape[:-2], shape[-2] * shape[-1])
    return tuple(shape)


def to_hf(params, cfg):
    """params (an nnx.State, on any mesh) -> {Hugging Face name: float32 numpy array}."""
    p = jax.device_get(nnx.to_pure_dict(params))  # nested dicts of whole (gathered) arrays
    out = {'wte.weight': p['wte'][:cfg.vocab_size], 'wpe.weight': p['wpe'],  # vocab padding cut
           'ln_f.weight': p['ln_f']['scale'], 'ln_f.bias': p['ln_f']['bias']}
    for hf_name, (module, name) in LAYER_NAMES.items():
        for i, a in enumerate(p['h'][module][name]):
            out[f'h.{i}.{hf_name}'] = a.reshape(hf_shape(name, a.shape))
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


def read_weights(folder, cfg):
    """folder/model.safetensors -> our params as nested dicts of numpy arrays, all checked before
    anything is written, or a ValueError naming the tensor at fault."""
    tensors = {}
    for k, v in read_safetensors(Path(folder) / 'model.safetensors').items():
        if not k.endswith(('.attn.bias', '.attn.masked_bias', 'lm_head.weight')):  # masks; tied
            tensors[k.removeprefix('transformer.')] = v
    ours = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: GPT(cfg, nnx.Rngs(0)))))  # shapes
    C = cfg.n_embd
    shapes = {'wte.weight': (cfg.vocab_size, C), 'wpe.weight': (cfg.block_size, C),
              'ln_f.weight': (C,), 'ln_f.bias': (C,)}
    for hf_name, (module, name) in LAYER_NAMES.items():
        for i in range(cfg.n_layer):
            shapes[f'h.{i}.{hf_name}'] = hf_shape(name, ours['h'][module][name].shape[1:])
    if 'wpe.weight' in tensors:
        tensors['wpe.weight'] = tensors['wpe.weight'][:cfg.block_size]  # a longer one: cropped
    for problem, names in (('lacks', shapes.keys() - tensors.keys()),
                           ('has unexpected', tensors.keys() - shapes.keys())):
        if names:
            shown = ', '.join(sorted(names)[:3]) + (' ...' if len(names) > 3 else '')
            raise ValueError(f"{folder}/model.safetensors {problem} tensors {shown}: "
                             "is it a GPT-2 saved by Hugging Face?")
    for k, shape in shapes.items():
        if tensors[k].shape != shape:
            raise ValueError(f"{folder}/model.safetensors: {k} is {tensors[k].shape}, but "
                             f"config.json implies {shape}")
        if not np.isfinite(tensors[k]).all():
            raise ValueError(f"{folder}/model.safetensors: {k} holds NaN or infinite values: "
                             "these weights are broken; export or download them again")
    vocab_padding = [(0, cfg.padded_vocab - cfg.vocab_size), (0, 0)]  # zero rows, never read
    new = {'wte': np.pad(tensors['wte.weight'], vocab_padding), 'wpe': tensors['wpe.weight'],
           'ln_f': {'scale': tensors['ln_f.weight'], 'bias': tensors['ln_f.bias']}, 'h': {}}
    for hf_name, (module, name) in LAYER_NAMES.items():
        stacked = np.stack([tensors[f'h.{i}.{hf_name}'] for i in range(cfg.n_layer)])
        new['h'].setdefault(module, {})[name] = stacked.reshape(ours['h'][module][name].shape)
    return new


def load(weights, params):
    """read_weights' arrays -> params, with the same shapes, dtypes and shardings."""
    state = jax.tree.map(lambda x: x, params)  # a copy to fill in: nested like params
    nnx.replace_by_pure_dict(state, weights)
    return jax.tree.map(put, state, params)


def load_model(folder, mesh):
    """A GPT-2 folder -> (model config, graphdef, params, specs, meta) for sampling, as sample.py's
    load_checkpoint gives a checkpoint's: float32 weights, placed on `mesh`."""
    fields, tokenizer = read_config(folder)
    cfg = GPTConfig(**fields)
    check_divisible(cfg, mesh.shape['model'])
    graphdef, params, specs = init_params(cfg, mesh, 0, 'float32')
    params = load(read_weights(folder, cfg), params)
    return cfg, graphdef, params, specs, dict(config=dict(tokenizer=tokenizer),
                                              params_dtype='float32')


def export(folder, params, cfg, tokenizer, eot):
    """sample.py --export: params as GPT-2 in Hugging Face's layout, which transformers'
    GPT2LMHeadModel loads. eot: the tokenizer's <|endoftext|> id."""
    if not cfg.bias:
        raise ValueError("GPT-2's layout has biases, and this model has none: export a model "
                         "trained with --bias=True")
    if cfg.pos != 'learned' or cfg.window:
        raise ValueError("GPT-2 has learned positions and full causal attention, and this model "
                         "has --pos=rope or a --window: transformers would compute another model")
    config = dict(FIXED, architectures=['GPT2LMHeadModel'], n_layer=cfg.n_layer,
                  n_head=cfg.n_head, n_embd=cfg.n_embd, n_positions=cfg.block_size,
                  vocab_size=cfg.vocab_size, bos_token_id=eot, eos_token_id=eot,
                  jaxgpt_tokenizer=tokenizer)  # which of data.py's tokenizers it reads
    folder = Path(folder)
    if folder.exists() and not (folder.is_dir() and not any(folder.iterdir())):
        raise ValueError(f"--export={folder} exists and is not an empty folder: name a new one "
                         "(an export replaces nothing)")
    written = [folder / 'model.safetensors', folder / 'config.json']
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_safetensors(written[0], to_hf(params, cfg))
        atomic_write(written[1], lambda f: f.write(json.dumps(config, indent=2).encode()))
    except OSError as e:  # a full disk: no half of a pair left behind
        for path in written if folder.is_dir() else []:
            path.unlink(missing_ok=True)
        raise ValueError(f"--export={folder} cannot be written ({e.strerror}): choose another "
                         "folder") from None
