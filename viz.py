"""Pictures of this project: a run's curves, what a checkpoint attends to, where the memory of a
training step goes, and which device holds which slice of each weight.

    python viz.py loss OUT_DIR [OUT_DIR ...]         # train and val loss, lr, tokens/s
    python viz.py attention OUT_DIR --start="def "   # one heatmap per (layer, head)
    python viz.py memory                             # GPT-2 124M's step, per device, and a table
    python viz.py mesh                               # a block's weights over 8 devices

Each writes one PNG (--out; `python viz.py SUBCOMMAND --help` lists the flags). Nothing here
trains: `loss` reads metrics.jsonl (during a run too), `attention` runs the checkpoint's forward
pass, `memory` compiles train.py's step and reads XLA's memory analysis, never running it.

Needs: train.py (the config, presets and model config), shard.py (mesh, params, the step),
bench.py (train.py's step, compiled), model.py (the GPT and its layouts),
attention.py (the probabilities), sample.py and checkpoint.py (reading a checkpoint), data.py
(tokenizers), flags.py (the command line); matplotlib, which no other file imports.
"""
import os

# 8 simulated devices on a CPU, for memory's FSDP rows and for mesh; set before jax starts (other
# backends ignore it)
if 'device_count' not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                               + ' --xla_force_host_platform_device_count=8')

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import attention
import bench
import checkpoint
import data
import flags
import sample
import shard
import train
from flags import flag
from model import GPT

MiB = 2**20


def pyplot():  # matplotlib's pyplot, imported only when a picture is drawn
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("matplotlib is not installed: pip install matplotlib") from None
    return plt


# --- loss: a run's curves, from metrics.jsonl ---------------------------------------------------
def read_metrics(out_dir):
    """-> the rows of OUT_DIR/metrics.jsonl that are whole JSON objects with a step: a live run's
    last line may be half written, and is skipped."""
    path = Path(out_dir) / 'metrics.jsonl'
    if not path.is_file():
        raise ValueError(f"{path} not found: pass the --out_dir of a train.py run (it writes "
                         "metrics.jsonl from its first log step)")
    rows = []
    for line in path.read_bytes().splitlines():
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):  # cut short, not UTF-8, or nested too deep
            continue
        if isinstance(row, dict) and type(row.get('step')) is int and plain(row['step']):
            rows.append(row)
    if not any(isinstance(row.get('loss'), float) for row in rows):
        raise ValueError(f"{path} holds no loss yet: wait for the run's first log step "
                         "(--log_interval), or pass another out_dir")
    return rows


def plain(x):  # a number a float holds: not a bool, a 400-digit int or NaN
    return isinstance(x, (int, float)) and not isinstance(x, bool) and abs(x) < 1e300


def curves(rows):
    """metrics rows -> ({'loss', 'val_loss', 'lr', 'tokens_per_s'}: (x, y) arrays, the x axis's
    name). x is the tokens seen by that step, step x the tokens of a step (from the log rows);
    before the first log row, the step itself."""
    logs = [r for r in rows if type(r.get('tokens')) is int and plain(r['tokens'])
            and r['step'] > 0]
    per_step = logs[-1]['tokens'] / logs[-1]['step'] if logs else 1

    def points(key, value):
        picked = [r for r in rows if plain(r.get(key)) and (key != 'ms_per_step' or r[key] > 0)]
        return (np.array([r['step'] * per_step for r in picked], float),
                np.array([value(r) for r in picked], float))

    return ({'loss': points('loss', lambda r: r['loss']),
             'val_loss': points('val_loss', lambda r: r['val_loss']),
             'lr': points('lr', lambda r: r['lr']),
             'tokens_per_s': points('ms_per_step', lambda r: per_step * 1000 / r['ms_per_step'])},
            'tokens seen' if logs else 'step')


def loss_figure(out_dirs):
    """One figure for any number of runs: loss (train, each step; val, each evaluation), the
    learning rate and tokens/s, each against tokens seen, each run in its own colour."""
    runs = {out_dir: curves(read_metrics(out_dir)) for out_dir in out_dirs}  # before drawing
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax_loss, ax_lr, ax_speed = axes
    for out_dir, (series, x_name) in runs.items():
        line, = ax_loss.plot(*series['loss'], lw=0.7, alpha=0.7, label=f'{out_dir} train')
        colour = line.get_color()
        ax_loss.plot(*series['val_loss'], 'o-', color=colour, ms=4, label=f'{out_dir} val')
        ax_lr.plot(*series['lr'], color=colour, label=out_dir)
        ax_speed.plot(*series['tokens_per_s'], '.-', color=colour, label=out_dir)
    titles = ('loss (nats per token)', 'learning rate', 'tokens/s (each log interval)')
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel(x_name)
        ax.grid(alpha=0.3)
    ax_loss.legend(fontsize=8)
    ax_speed.set_ylim(bottom=0)
    fig.tight_layout()
    return fig


# --- attention: the checkpoint's own probabilities, layer by layer --------------------------------
def attention_maps(model_cfg, graphdef, params, specs, mesh, idx):
    """The attention probabilities of every layer and head on tokens idx (1, T) -> (L, H, T, T)
    float32 numpy. The model's own code, a block at a time: each block's ln_1 and qkv give that
    layer's q and k (after RoPE), attention.probabilities their softmax, and the block itself
    the residual stream the next layer reads. Inside shard_map, as in training: the model's
    pcast and psum are over 'model'."""
    def local(params, idx):  # on each device: its own heads' probabilities
        gpt = nnx.merge(graphdef, params)
        pos = jnp.arange(idx.shape[1])
        x = gpt.wte[...][idx]  # (1, T, C)
        if gpt.wpe is not None:
            x = x + gpt.wpe[...][:idx.shape[1]]
        block_def, layers = nnx.split(gpt.h)  # layers: the stacked params, (L, ...) each
        maps = []
        for i in range(model_cfg.n_layer):
            block = nnx.merge(block_def, jax.tree.map(lambda a: a[i], layers))
            q, k, _ = block.attn.qkv(block.ln_1(x), pos)  # (1, T, local heads, head_dim)
            maps.append(attention.probabilities(q, k, pos, pos, model_cfg.window)[0])
            x, _ = block(x, pos)  # (1, T, C)
        return jnp.stack(maps)  # (L, local heads, T, T)

    run = jax.shard_map(local, mesh=mesh, in_specs=(specs, P()), out_specs=P(None, 'model'))
    return np.asarray(jax.jit(run)(params, jnp.asarray(idx, jnp.int32)))


def token_labels(tok, ids):  # each token as text, with the invisible ones made visible
    def label(i):
        text = tok.to_bytes([i]).decode('utf-8', 'replace')
        return text.replace(' ', '·').replace('\n', '\\n').replace('\t', '\\t')
    return [label(int(i)) for i in ids]


def attention_figure(maps, labels):
    """maps (L, H, T, T) -> a grid of heatmaps, a row per layer and a column per head; the
    queries down, the keys across, each labelled by its token."""
    plt = pyplot()
    L, H, T, _ = maps.shape
    size = max(1.6, 0.09 * T + 0.8)  # inches a heatmap
    fig, axes = plt.subplots(L, H, figsize=(size * H, size * L), squeeze=False)
    for (layer, head), ax in np.ndenumerate(axes):
        ax.imshow(maps[layer, head], cmap='magma', vmin=0, vmax=1, interpolation='nearest')
        ax.set_title(f'layer {layer}, head {head}', fontsize=9)
        ax.set_xticks(range(T), labels if layer == L - 1 else [], rotation=90, fontsize=6)
        ax.set_yticks(range(T), labels if head == 0 else [], fontsize=6)
    fig.supxlabel('key (the token attended to)')
    fig.supylabel('query (the token attending)')
    fig.tight_layout()
    return fig


def load_for_attention(out_dir, start):
    """-> (model config, graphdef, params, specs, mesh, prompt ids (1, T), token labels) from the
    newest checkpoint in out_dir, on a 1x1 mesh, the prompt cut to the context."""
    if not checkpoint.in_folder(out_dir):
        raise ValueError(f"no checkpoint in {out_dir}/: pass the out_dir of a train.py run that "
                         "has saved one (every --eval_interval steps)")
    mesh = shard.make_mesh('data=1,model=1', jax.devices()[:1])
    jax.set_mesh(mesh)
    model_cfg, graphdef, params, specs, meta = sample.load_checkpoint(out_dir, mesh)
    tok = data.get_tokenizer(meta['config']['tokenizer'])
    ids = tok.encode(sample.read_prompt(start))[-model_cfg.block_size:]  # as sample.py reads it
    if len(ids) == 0:
        raise ValueError("--start is empty: give a prompt, e.g. --start='def main('")
    return model_cfg, graphdef, params, specs, mesh, np.asarray(ids)[None], token_labels(tok, ids)


# --- memory: where the bytes of a training step go, per device ----------------------------------
def step_memory(cfg, n_devices=1):
    """Compile (never run) train.py's step for train.Config cfg on a data=n_devices mesh -> (the
    bytes of each part, per device, XLA's memory analysis). The weights and Adam's moments are
    read from the arrays' shards; the float32 gradients are counted (4 bytes per weight held)
    out of XLA's temporaries, and the rest of those are activations and other temporaries."""
    vocab = data.get_tokenizer(cfg.tokenizer).vocab_size
    step, (params, opt_state, _, _) = bench.compile_step(cfg, vocab, n_devices)
    analysis = step.memory_analysis()
    weights, moments = shard.per_device_bytes(params), shard.per_device_bytes(opt_state)
    grads = 4 * sum(x.addressable_shards[0].data.size for x in jax.tree.leaves(params))
    parts = {'weights': weights, "Adam's moments": moments, 'gradients (float32)': grads,
             'activations, temporaries': analysis.temp_size_in_bytes - grads,
             'batch, key, outputs not aliased': (analysis.argument_size_in_bytes - weights
                                                 - moments + analysis.output_size_in_bytes
                                                 - analysis.alias_size_in_bytes)}
    return parts, analysis


@dataclass
class MemoryConfig:
    model: str = flag('gpt2', "the model's shape: that of one of train.py's presets",
                      choices=tuple(train.PRESETS))
    batch_size: int = flag(12, 'sequences per device per step (per micro-batch without accum)',
                           within=train.POSITIVE)
    long_context: int = flag(4096, 'the context of the blockwise attention rows',
                             within=train.POSITIVE)
    devices: int = flag(8, 'devices of the FSDP rows (simulated on a CPU)', within='[2, 4096]')
    grad_accum: int = flag(4, 'micro-batches of the accumulation rows', within=train.POSITIVE)
    dtype: str = flag('bfloat16', 'the compute dtype of every row but the float32 one',
                      choices=('bfloat16', 'float32'))
    unroll: bool = flag(False, 'compile every layer (the CPU default); False: a scan, as on GPUs')
    rows: str = flag('', "the rows to compile, by number: 0 plain, 1 float32, 2 bf16 weights, "
                     "3 remat, 4 accumulation, 5-6 long context, 7 FSDP, 8 all; '': all")
    out: str = flag('memory.png', 'the picture to write')


def memory_settings(mc):
    """-> [(label, train.Config's flags, devices, the label of the row it saves against)]: each
    technique alone, then all at once. The long-context rows keep the tokens per step."""
    base = dict(train.PRESETS[mc.model], batch_size=mc.batch_size, grad_accum=1, remat='none',
                attention='xla', dtype=mc.dtype, unroll=mc.unroll, master_weights=True)
    long = dict(block_size=mc.long_context,
                batch_size=max(1, mc.batch_size * base['block_size'] // mc.long_context))
    n, accum = mc.devices, mc.grad_accum
    xla_long = f"context {mc.long_context}, xla"
    rows = [('plain', {}, 1, None),
            ('float32 compute (no mixed precision)', dict(dtype='float32'), 1, 'plain'),
            ('--master_weights=False', dict(master_weights=False), 1, 'plain'),
            ('--remat=block', dict(remat='block'), 1, 'plain'),
            (f'--grad_accum={accum}', dict(grad_accum=accum), 1, 'plain'),
            (xla_long, long, 1, None),
            (f"context {mc.long_context}, --attention=blockwise",
             dict(long, attention='blockwise'), 1, xla_long),
            (f'--fsdp on {n} devices', dict(fsdp=True, batch_size=mc.batch_size * n), n, 'plain'),
            ('all combined', dict(master_weights=False, remat='block', grad_accum=accum,
                                  attention='blockwise', fsdp=True, batch_size=mc.batch_size * n),
             n, 'plain')]
    return [(label, {**base, **changes}, devices, against)
            for label, changes, devices, against in rows]


def memory_table(mc):
    """-> [(label, {part: bytes per device}, the label it saves against)], for mc.rows."""
    settings = memory_settings(mc)
    numbers = [str(i) for i in range(len(settings))]
    if mc.rows and not set(mc.rows.split(',')) <= set(numbers):
        raise ValueError(f"--rows={mc.rows}: give row numbers 0 to {len(settings) - 1}, "
                         "separated by commas")
    chosen = [int(i) for i in mc.rows.split(',')] if mc.rows else range(len(settings))
    table = []
    for i in chosen:
        label, config_flags, devices, against = settings[i]
        parts, _ = step_memory(train.Config(**config_flags), devices)
        table.append((label, parts, against))
        print(f"compiled: {label}", file=sys.stderr, flush=True)
    return table


def print_memory(table):  # the same numbers as the bars, as a markdown table
    names = list(table[0][1])
    totals = {label: sum(parts.values()) for label, parts, _ in table}
    print('| setting | ' + ' | '.join(names) + ' | total MiB | saves |')
    print('| --- ' * (len(names) + 3) + '|')
    for label, parts, against in table:
        saving = (f"{1 - totals[label] / totals[against]:.0%} of {against}"
                  if against in totals else '')
        print(f"| {label} | " + ' | '.join(f"{parts[n] / MiB:,.0f}" for n in names)
              + f" | {totals[label] / MiB:,.0f} | {saving} |")


def memory_figure(table, title):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(11, 0.55 * len(table) + 1.8))
    labels = [label for label, _, _ in table][::-1]  # the first row on top
    left = np.zeros(len(table))
    for name in table[0][1]:
        widths = np.array([parts[name] for _, parts, _ in table][::-1]) / 2**30
        ax.barh(labels, widths, left=left, label=name)
        left += widths
    for y, total in enumerate(left):
        ax.text(total, y, f' {total:,.1f} GiB', va='center', fontsize=8)
    ax.set_xlabel('GiB per device (compiled, not run)')
    ax.set_title(title, fontsize=10)
    ax.set_xlim(0, left.max() * 1.15)
    ax.legend(fontsize=8, loc='lower right')
    fig.tight_layout()
    return fig


# --- mesh: which device holds which slice of each weight ----------------------------------------
BLOCK_WEIGHTS = (('attn', 'c_attn'), ('attn', 'c_proj'), ('mlp', 'c_fc'), ('mlp', 'c_proj'),
                 ('mlp', 'c_fc_bias'), ('ln_1', 'scale'))
SPLITS = (('data=8', False, 'data parallel, data=8'), ('data=2,model=4', False,
                                                         'tensor parallel, data=2 x model=4'),
          ('data=8', True, 'FSDP, data=8'), ('data=2,model=4', True, 'FSDP and tensor, 2 x 4'))


def block_layouts(model_cfg, mesh):
    """-> {name: (one layer's shape, its layout, [(slice of each axis, the devices holding it)])}
    for a block's weights: the specs init_params derives from model.py's layouts, applied to
    the mesh by jax's own NamedSharding."""
    shapes = nnx.state(nnx.eval_shape(lambda: GPT(model_cfg, nnx.Rngs(0))))  # no memory
    specs = nnx.get_partition_spec(shapes)
    layouts = {}
    for module, name in BLOCK_WEIGHTS:
        shape = shapes['h'][module][name].shape[1:]  # the layer axis dropped
        spec = P(*specs['h'][module][name].get_value()[1:])
        holders = {}
        for device, index in NamedSharding(mesh, spec).devices_indices_map(shape).items():
            bounds = tuple(s.indices(n)[:2] for s, n in zip(index, shape))  # ((start, stop), ..)
            holders.setdefault(bounds, []).append(device.id)
        layouts[f'{module}.{name}'] = (shape, tuple(spec), sorted(holders.items()))
    return layouts


def device_names(ids):  # [0, 1, 2, 3] -> 'd0-3'; [0, 4] -> 'd0,4'
    ids = sorted(ids)
    if len(ids) > 2 and ids == list(range(ids[0], ids[-1] + 1)):
        return f'd{ids[0]}-{ids[-1]}'
    return 'd' + ','.join(map(str, ids))


def draw_layout(ax, shape, holders):
    """One weight as a 2-D picture (a vector as one row; (C, 3, C) as (C, 3C): q, k, v side by
    side), each slice coloured by the devices that hold it and labelled with them."""
    owner = np.zeros(shape, int)
    for colour, (bounds, _) in enumerate(holders):
        owner[tuple(slice(*b) for b in bounds)] = colour
    picture = owner.reshape(shape[0], -1) if len(shape) > 1 else owner[None]
    ax.imshow(picture % 10, cmap='tab10', vmin=0, vmax=9, aspect='auto', interpolation='nearest')
    for bounds, ids in holders:
        row = np.mean(bounds[0]) if len(shape) > 1 else 0
        col = np.mean(bounds[-1]) + (bounds[1][0] * shape[-1] if len(shape) == 3 else 0)
        ax.text(col, row, device_names(ids), ha='center', va='center', fontsize=6)
    for edge in range(1, shape[1]) if len(shape) == 3 else ():  # where q ends, and k
        ax.axvline(edge * shape[-1] - 0.5, color='white', lw=1.5)
    ax.set_xticks([])
    ax.set_yticks([])


def mesh_figure(model_cfg):
    """A block's weights (rows) under each way of splitting them (columns), on 8 devices."""
    plt = pyplot()
    fig, axes = plt.subplots(len(BLOCK_WEIGHTS), len(SPLITS), figsize=(16, 11), squeeze=False)
    for col, (mesh_spec, fsdp, title) in enumerate(SPLITS):
        mesh = shard.make_mesh(mesh_spec, jax.devices('cpu')[:8])  # layouts only: any 8 do
        cfg = dataclasses.replace(model_cfg, fsdp=mesh.shape['data'] if fsdp else 1)
        for row, (name, (shape, spec, holders)) in enumerate(block_layouts(cfg, mesh).items()):
            draw_layout(axes[row, col], shape, holders)
            axes[row, col].set_title(f'{name} {shape}\nlayout {spec}', fontsize=8)
            if row == 0:
                axes[row, col].annotate(title, (0.5, 1.6), xycoords='axes fraction',
                                        ha='center', fontsize=11, weight='bold')
    fig.tight_layout()
    return fig


# --- the command line -----------------------------------------------------------------------------
@dataclass
class LossConfig:
    out: str = flag('loss.png', 'the picture to write')


@dataclass
class AttentionConfig:
    start: str = flag('def add(a, b):\n    return a + b',
                      'the prompt whose attention is drawn (cut to the context)')
    out: str = flag('attention.png', 'the picture to write')


@dataclass
class MeshConfig:
    model: str = flag('gpt2', "the model's shape: that of one of train.py's presets",
                      choices=tuple(train.PRESETS))
    out: str = flag('mesh.png', 'the picture to write')


def loss(out_dirs, cfg):
    return loss_figure(out_dirs)


def attention_command(out_dirs, cfg):
    if len(out_dirs) != 1:
        raise ValueError("attention takes one OUT_DIR, the run whose checkpoint is drawn")
    model_cfg, graphdef, params, specs, mesh, ids, labels = load_for_attention(out_dirs[0],
                                                                               cfg.start)
    return attention_figure(attention_maps(model_cfg, graphdef, params, specs, mesh, ids), labels)


def memory(_, mc):
    table = memory_table(mc)
    print_memory(table)
    title = (f"{mc.model}: memory of one training step per device, {mc.dtype} compute, "
             f"{mc.batch_size} sequences per device")
    return memory_figure(table, title)


def mesh(_, cfg):  # the vocabulary does not reach a block's weights: GPT-2's, for any preset
    return mesh_figure(train.model_config(train.Config(**train.PRESETS[cfg.model]), 50257))


COMMANDS = {  # name: (what draws its figure, its flags, whether it takes OUT_DIRs)
    'loss': (loss, LossConfig, True),
    'attention': (attention_command, AttentionConfig, True),
    'memory': (memory, MemoryConfig, False),
    'mesh': (mesh, MeshConfig, False),
}
USAGE = "python viz.py {loss OUT_DIR [OUT_DIR ...] | attention OUT_DIR | memory | mesh} [--flags]"


def main(argv):
    name = argv[0] if argv else ''
    if name not in COMMANDS:
        sys.exit(f"viz.py: unknown subcommand {name!r}: usage: {USAGE}")
    command, config, takes_dirs = COMMANDS[name]
    cfg = flags.parse(f'viz.py {name}', [a for a in argv[1:] if a.startswith('--')], config())
    out_dirs = [a for a in argv[1:] if not a.startswith('--')]
    if takes_dirs != bool(out_dirs):
        sys.exit(f"viz.py: {name} takes {'one or more OUT_DIRs' if takes_dirs else 'no OUT_DIR'}"
                 f": usage: {USAGE}")
    if not cfg.out.endswith('.png') or os.path.isdir(cfg.out):
        sys.exit(f"viz.py: --out={cfg.out!r}: name a .png file to write")
    try:
        pyplot()
        import matplotlib
        matplotlib.use('Agg')  # files only: no window
        figure = command(out_dirs, cfg)
    except (ValueError, OSError) as e:
        sys.exit(flags.one_line(f"viz.py: {e}"))
    try:
        figure.savefig(cfg.out, dpi=100)
    except OSError as e:
        sys.exit(f"viz.py: --out={cfg.out!r} cannot be written ({e.strerror}): choose another path")
    print(f"wrote {cfg.out}")


if __name__ == '__main__':
    main(sys.argv[1:])
