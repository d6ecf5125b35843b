"""Layers that certified networks use and torch lacks.

- `MinMax` (Anil, Lucas and Grosse 2019, "Sorting out Lipschitz function approximation",
  Sec. 4: GroupSort with groups of 2; GloRo's reference architectures call it MinMax):
  the channels (dimension 1) are split into halves a and b, channel k paired with channel
  k + C/2, and the layer returns (min(a, b), max(a, b)) as its two halves. (GloRo pairs
  neighbouring channels instead: a fixed permutation of the channels, which the next
  layer's weights absorb.) It is 1-Lipschitz in every l_p norm and its Jacobian is a
  permutation wherever it exists, so it keeps gradient norms that ReLU loses. Written here
  because torch has no such module; the engine's rule for it is
  `bound_propagation.operators.MinMax`.
"""

from __future__ import annotations

import torch
from torch import nn


def min_max(x: torch.Tensor) -> torch.Tensor:
    """(min(a, b), max(a, b)) for the channel halves a, b of ``x`` (batch, C, ...), C even,
    computed as (a - r, b + r) with r = relu(a - b): equal up to rounding, and forward
    and backward take a quarter of the time of ``amin``/``amax`` over pairs on the CPU
    (a 512 x 32 x 28 x 28 batch: 61 against 261 ms, 130 with ``minimum``/``maximum``)."""
    if x.shape[1] % 2:
        raise ValueError(f"MinMax pairs channels: it needs an even count, got {x.shape[1]}")
    a, b = x.chunk(2, 1)
    r = torch.relu(a - b)
    return torch.cat((a - r, b + r), 1)


class MinMax(nn.Module):
    """GroupSort of group size 2 over channel pairs (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return min_max(x)
