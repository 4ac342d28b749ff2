"""int8 weights for sampling (sample.py --quantize=int8): the layers' four matmul kernels stored
as int8 with float32 scales, dequantized where the model reads them, so the model's code runs on
them unchanged.

Needs: model.py (KERNELS, the weights it stores).
"""
from dataclasses import dataclass
from functools import partial

import jax
import numpy as np

from model import KERNELS


@partial(jax.tree_util.register_dataclass, data_fields=['q', 'scale'], meta_fields=[])
@dataclass
class Int8:
    """A weight stored as int8: w ~ q * scale, one scale per output channel and per group of input
    rows; w[...] dequantizes it, in the scale's dtype, wherever the model reads a weight."""
    q: jax.Array  # int8, the weight's shape: (in, out...)
    scale: jax.Array  # (groups, out...): the input axis cut into groups, each with its own scale

    def __getitem__(self, index):
        groups = self.scale.shape[0]
        q = self.q.reshape(groups, -1, *self.q.shape[1:])  # (groups, in / groups, out...)
        w = q.astype(self.scale.dtype) * self.scale[:, None]
        return w.reshape(self.q.shape)[index]


def quantize(params, mesh):
    """int8 weights for the layers' four matmul kernels, in place: a float32 scale, max |w| / 127,
    per output channel and per model-axis group of input rows, so that each device's shard of a
    row-parallel kernel has its own scales and every layout stays as written. -> params."""
    layers = params['h']
    for module, name in KERNELS:
        weight = layers[module][name]
        w = np.asarray(jax.device_get(weight[...]), np.float32)  # (L, in, out...)
        grouped = w.reshape(w.shape[0], mesh.shape['model'], -1, *w.shape[2:])  # (L, g, in/g, ..)
        scale = np.maximum(np.abs(grouped).max(2), 1e-30) / 127  # (L, groups, out...)
        q = np.round(grouped / scale[:, :, None]).astype(np.int8).reshape(w.shape)
        sharding = weight[...].sharding
        weight.set_value(Int8(jax.device_put(q, sharding), jax.device_put(scale, sharding)))
    return params
