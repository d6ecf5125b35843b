"""Backward coefficients of convolutional nodes kept as patches, not dense tensors.

A row that bounds one neuron of a convolution's output depends, k layers down, only on
that neuron's receptive field. Stored densely its coefficients fill the whole feature
map, mostly with zeros, and every later step (the activation's relaxation, the next
transposed convolution, the input's concretisation) pays for the zeros. auto_LiRPA's
"patches mode" (Xu et al. 2020, "Automatic Perturbation Analysis", App. D) stores each
row as a small window instead; this module does the same with one window per row, placed
at its own corner, which suits rows chosen per sample (the unstable neurons).

Invariant: a window's entries that fall outside the feature map are zero, so a window
means exactly the dense tensor it would scatter to. Operations that know patches
(convolutions, elementwise maps, activations, the input) use them; the walker turns a
patch into its dense tensor before any other operation, and when a window grows to the
size of its feature map it stops paying off and goes dense.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class Patches:
    """Row r of sample b is ``values[b, r]`` (C, kh, kw) with its top-left corner at
    (``top[b, r]``, ``left[b, r]``) of a (C, H, W) feature map (corners may lie outside
    it, by up to the window's size)."""

    values: torch.Tensor  # (batch, rows, C, kh, kw)
    top: torch.Tensor  # (batch, rows) long
    left: torch.Tensor  # (batch, rows) long
    shape: tuple[int, int, int]  # (C, H, W) of the feature map
    _index: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def window(self) -> tuple[int, int]:
        return self.values.shape[-2], self.values.shape[-1]

    def _flat_index(self) -> tuple[torch.Tensor, tuple[int, int]]:
        """Index (batch, rows, C*kh*kw) of every window entry into the feature map padded
        by the window size on each side and flattened, and that padding (computed once
        per placement: `with_values` keeps it)."""
        c, h, w = self.shape
        kh, kw = self.window
        if self._index is not None:
            return self._index, (kh, kw)
        hp, wp = h + 2 * kh, w + 2 * kw
        device = self.top.device
        rows = (self.top + kh)[..., None, None] + torch.arange(kh, device=device)[:, None]
        cols = (self.left + kw)[..., None, None] + torch.arange(kw, device=device)[None]
        spatial = rows * wp + cols  # (batch, rows, kh, kw)
        channel = torch.arange(c, device=device).reshape(c, 1, 1) * (hp * wp)
        self._index = (channel + spatial.unsqueeze(-3)).flatten(2)
        return self._index, (kh, kw)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """The windows at every row of a tensor shaped (batch or 1, C, H, W), or of one
        per row (batch, rows, C, H, W): (batch, rows, C, kh, kw), zero outside the map."""
        index, (kh, kw) = self._flat_index()
        t = F.pad(t, (kw, kw, kh, kh))
        if t.dim() == 4:
            flat = t.expand(len(self.values), *t.shape[1:]).flatten(1)
            return flat.gather(1, index.flatten(1)).reshape(self.values.shape)
        return t.flatten(2).gather(2, index).reshape(self.values.shape)

    def to_dense(self) -> torch.Tensor:
        """The dense coefficients (batch, rows, C, H, W)."""
        batch, rows = self.values.shape[:2]
        c, h, w = self.shape
        index, (kh, kw) = self._flat_index()
        dense = self.values.new_zeros(batch, rows, c * (h + 2 * kh) * (w + 2 * kw))
        dense = dense.scatter(2, index, self.values.flatten(2))
        dense = dense.reshape(batch, rows, c, h + 2 * kh, w + 2 * kw)
        return dense[..., kh : kh + h, kw : kw + w]

    def with_values(self, values: torch.Tensor) -> Patches:
        """The same placement with other values of the same window size."""
        return Patches(values, self.top, self.left, self.shape, self._index)

    def select(self, index: torch.Tensor) -> Patches:
        """The placements of rows ``index`` (batch, R) of a one-sample Patches, for a
        batch (values without meaning)."""
        values = self.values.new_zeros(()).expand(*index.shape, *self.values.shape[2:])
        return Patches(values, self.top[0][index], self.left[0][index], self.shape)

    def inside(self) -> torch.Tensor:
        """(batch, rows, 1, kh, kw) mask of the window entries inside the feature map."""
        kh, kw = self.window
        h, w = self.shape[1:]
        rows = self.top[..., None] + torch.arange(kh, device=self.top.device)
        cols = self.left[..., None] + torch.arange(kw, device=self.top.device)
        ok_rows = (rows >= 0) & (rows < h)
        ok_cols = (cols >= 0) & (cols < w)
        return (ok_rows[..., :, None] & ok_cols[..., None, :]).unsqueeze(-3)

    def worth_keeping(self) -> bool:
        kh, kw = self.window
        return kh * kw < self.shape[1] * self.shape[2]

    def join(self, other: Patches) -> Patches | None:
        """``self + other`` as windows (a residual join: both branches' rows meet at the
        block's input), each row's window the smallest that holds both of its windows.
        None where that needs a window size per row (the two corners of a row are not
        at one offset in every row) or where the join is as large as the map: the
        caller adds the dense tensors then."""
        if other.shape != self.shape or other.top.shape != self.top.shape:
            return None
        dt, dl = other.top - self.top, other.left - self.left
        if dt.numel() == 0 or (dt != dt.flatten()[0]).any() or (dl != dl.flatten()[0]).any():
            return None
        dt, dl = int(dt.flatten()[0]), int(dl.flatten()[0])
        (ha, wa), (hb, wb) = self.window, other.window
        top, left = min(0, dt), min(0, dl)  # the join's corner, from self's
        h, w = max(ha, dt + hb) - top, max(wa, dl + wb) - left
        joined = Patches(self.values.new_zeros(()).expand(*self.values.shape[:3], h, w),
                         self.top + top, self.left + left, self.shape)
        if not joined.worth_keeping():
            return None
        mine = F.pad(self.values, (-left, w - wa + left, -top, h - ha + top))
        theirs = F.pad(other.values, (dl - left, w - wb - dl + left, dt - top, h - hb - dt + top))
        return Patches(mine + theirs, joined.top, joined.left, self.shape)


def unit_windows(index: torch.Tensor, shape: tuple[int, int, int], weight: torch.Tensor
                 ) -> Patches:
    """The one-hot rows e_index (``index`` (batch, rows) into the flattened (C, H, W) map)
    times ``weight`` (batch, rows), as 1 x 1 windows: the first step of an intermediate
    pass from an elementwise node, so that the convolutions below take its rows as
    windows."""
    c, h, w = shape
    values = F.one_hot(index // (h * w), c).to(weight.dtype) * weight.unsqueeze(-1)
    return Patches(values[..., None, None], (index // w) % h, index % w, tuple(shape))


def rowsum(a: torch.Tensor | Patches) -> torch.Tensor:
    values = a.values if isinstance(a, Patches) else a
    return values.flatten(2).sum(-1)


def rowdot(a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """sum_k a[b, r, k] v[b, k] for a (batch, rows, k) and v (batch, k): (batch, rows).
    A v of one row (1, k) serves every b: one matrix-vector product. Otherwise
    ``vecdot``, not ``bmm``: with torch 2.13 on this project's 2-core CPU a batched
    matrix-vector ``bmm`` took 4-7x as long at every shape measured (8 x 400 x 784:
    1.42 against 0.22 ms; 2048 x 1 x 784, bab's subdomains at the input: 0.95 against
    0.21 ms; with the backward pass 1.6-2x)."""
    if len(v) == 1:
        return a @ v[0]
    return torch.linalg.vecdot(a, v.unsqueeze(1))
