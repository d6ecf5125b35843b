"""Linear maps that pick, copy and add up a tensor's entries: slicing, gathering at fixed
indices, splitting, transposing, padding with a constant, nearest-neighbour resizing,
tiling and summing over axes (ONNX's Slice, Gather, Split, Transpose, Pad, Resize, Tile,
Expand, DepthToSpace, SpaceToDepth, ReduceSum, ReduceMean).

Each is y = S x + b on the flattened tensors (batch dimension apart), with S a sparse
matrix given by its nonzeros ``(out_index[k], in_index[k], weight[k])`` and b a constant
(a pad value). One layer, `IndexMap`, and one bound rule, `IndexMapOperation`, serve them
all, so a structural operation only has to say which input entry goes where.

Bounds (all exact for a linear map): interval arithmetic by centre and radius, S c + b
and |S| r; CROWN's backward step is the transpose, a -> a S, with constant a . b; the l2
operator norm is at most sqrt(||S||_1 ||S||_inf), the largest absolute column sum times
the largest absolute row sum (Schur's test), which for a selection is sqrt of the most
copies any input entry has.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from certbench.verifiers.bound_propagation.operators import Operation


class IndexMap(nn.Module):
    """y[b, j] = sum_{k: out_index[k] = j} weight[k] x[b, in_index[k]] + bias[j], on the
    flattened sample; input (batch, *input_shape), output (batch, *output_shape)."""

    def __init__(self, out_index: torch.Tensor, in_index: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor, input_shape: Sequence[int], output_shape: Sequence[int]):
        super().__init__()
        self.input_shape, self.output_shape = tuple(input_shape), tuple(output_shape)
        n_in, n_out = math.prod(self.input_shape), math.prod(self.output_shape)
        if len(in_index) and (int(in_index.max()) >= n_in or int(out_index.max()) >= n_out):
            raise ValueError("index map: an index past the end of its tensor")
        self.register_buffer("out_index", out_index.long())
        self.register_buffer("in_index", in_index.long())
        self.register_buffer("weight", weight.float())
        self.register_buffer("bias", bias.float().reshape(n_out))

    def apply(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
              ) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1)
        y = flat.new_zeros(x.shape[0], self.bias.numel())
        y = y.index_add(1, self.out_index, flat[:, self.in_index] * weight.to(flat))
        if bias is not None:
            y = y + bias.to(flat)
        return y.reshape(x.shape[0], *self.output_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply(x, self.weight, self.bias)


class IndexMapOperation(Operation):
    """The bound rule of `IndexMap` (module docstring)."""

    @classmethod
    def from_module(cls, module, input_shape, output_shape):
        return cls(module)

    def __init__(self, module: IndexMap):
        self.module = module

    def forward(self, x):
        return self.module(x)

    def ibp(self, bounds):
        lower, upper = bounds
        centre = self.module((lower + upper) / 2)
        radius = self.module.apply((upper - lower) / 2, self.module.weight.abs(), None)
        return centre - radius, centre + radius

    def _transpose(self, a: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        m = self.module
        flat = a.reshape(*a.shape[:2], -1)
        back = flat.new_zeros(*a.shape[:2], math.prod(m.input_shape))
        back = back.index_add(2, m.in_index, flat[..., m.out_index] * weight.to(flat))
        return back.reshape(*a.shape[:2], *m.input_shape)

    def backward(self, a):
        bias = self.module.bias
        constant = (a.reshape(*a.shape[:2], -1) * bias.to(a)).sum(-1) if bias.any() else 0.0
        return [self._transpose(a, self.module.weight)], constant

    def abs_backward(self, a):
        return [self._transpose(a, self.module.weight.abs())]

    def lipschitz(self, inputs, estimate=None):
        m = self.module
        weight = m.weight.abs().double()
        rows = torch.zeros(m.bias.numel(), dtype=torch.float64, device=weight.device)
        cols = torch.zeros(math.prod(m.input_shape), dtype=torch.float64, device=weight.device)
        rows = rows.index_add(0, m.out_index, weight)
        cols = cols.index_add(0, m.in_index, weight)
        if not len(weight):
            return inputs[0] * 0
        norm = torch.sqrt(rows.max() * cols.max())
        return inputs[0] * norm.to(inputs[0])
