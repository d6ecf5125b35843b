"""Per-operation bound rules: forward, interval propagation (IBP) and the backward step of
linear relaxation (CROWN), one small class per operation family.

Shapes: activations are (batch, *shape). A backward coefficient tensor ``a`` has shape
(batch, rows, *shape): row r of sample b is the linear function sum(a[b, r] * y) of this
operation's output y that is being bounded from below. ``backward`` rewrites it as a
linear function of the operation's input plus a constant (batch, rows).

Each operation also has its global l2 Lipschitz rule, ``lipschitz`` (composed along the
graph by global_lipschitz.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from certbench.verifiers import operator_norms
from certbench.verifiers.base import UnsupportedLayerError
from certbench.verifiers.bound_propagation.patches import (
    Patches,
    rowdot,
    rowsum,
    unit_windows,
)
from certbench.verifiers.bound_propagation.s_shaped import (
    s_shaped_relaxation,
    sigmoid_derivative,
    tanh_derivative,
)
from certbench.verifiers.layers import min_max


def _fold(a: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """(batch, rows, *shape) -> (batch * rows, *shape), to run a layer's transpose."""
    return a.reshape(a.shape[0] * a.shape[1], *a.shape[2:]), (a.shape[0], a.shape[1])


def _unfold(t: torch.Tensor, lead: tuple[int, int]) -> torch.Tensor:
    return t.reshape(*lead, *t.shape[1:])


NormEstimate = Callable[[Callable[[torch.Tensor], torch.Tensor]], torch.Tensor]
"""Given a linear map x -> A x (on a batch of one input), an estimate of ||A||_2."""


Part = tuple["Operation", tuple[int, ...], tuple[int, ...]]
"""(operation, inputs, output shape) of one node of an operation's `decomposition`."""


class Operation:
    """A node's operation: its forward pass and interval rule, and for a linear operation
    (``linear = True``) its transpose ``backward`` and ``abs_backward``. Non-linear
    operations are `Activation`s and relax themselves given their input bounds."""

    linear = True
    accepts_patches = False  # backward takes `Patches` as well as dense coefficients

    @classmethod
    def from_module(cls, module: nn.Module, input_shape: tuple, output_shape: tuple):
        """The operation of a module, given its input and output shapes (no batch
        dimension): graph.py's conversion table calls this."""
        return cls()

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def ibp(self, *bounds: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def backward(self, a: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | float]:
        """Coefficients for each input, and the constant term (batch, rows) or 0."""
        raise NotImplementedError

    def backward_rows(
        self, index: torch.Tensor, output_shape: tuple[int, ...], dtype: torch.dtype
    ) -> tuple[list[torch.Tensor], torch.Tensor | float]:
        """``backward`` of the one-hot rows e_index, ``index`` of shape (batch, rows) into
        the flattened output: the first step of every intermediate-bound pass. Operations
        override it where the rows can be read off their weights."""
        a = F.one_hot(index, math.prod(output_shape)).to(dtype)
        return self.backward(a.reshape(*index.shape, *output_shape))

    def abs_backward(self, a: torch.Tensor) -> list[torch.Tensor]:
        """``backward`` through the operation with every weight replaced by its absolute
        value, no constant: |W|^T a, the radius rule of interval arithmetic on
        coefficients (local Lipschitz bounds)."""
        raise NotImplementedError

    def decomposition(self, input_shape: tuple, output_shape: tuple) -> list[Part] | None:
        """Operations that compute this one and that linear relaxation bounds more
        tightly, or None (kept whole): the parts of `TracedNetwork.decomposed`, in order,
        the last giving the output. A part's inputs are -1 for this operation's input or
        k >= 0 for the k-th part."""
        return None

    def refusal(self, method: str) -> str | None:
        """Why ``method`` (``exact``: the MILP; ``bab``: branch and bound's splits;
        ``local-lipschitz``: the gradient bound) has no exact rule for this operation, or
        None when it has one. Linear operations have one for every method."""
        if self.linear:
            return None
        return f"{method} has no rule for {type(self).__name__}"

    def lipschitz(
        self, inputs: Sequence[torch.Tensor], estimate: NormEstimate | None = None
    ) -> torch.Tensor:
        """An upper bound on the l2 Lipschitz constant of this operation's output as a
        function of the network input, given such bounds ``inputs`` for its inputs (0-dim
        tensors of one dtype, which the result keeps). Differentiable in the weights:
        training recipes backpropagate through it.

        ``estimate``, if given, replaces the proven operator norm of a linear layer by the
        caller's estimate of it, computed from the layer's map alone. Operations whose
        proven norm is costly (Dense, Conv: an SVD) pass it their map x -> A x; the others
        ignore it. So the caller's estimator (power iteration with vectors kept per node,
        global_lipschitz.py) needs no knowledge of the operation, nor the operation of the
        estimator. An estimate can fall below the true norm: training only.
        """
        raise UnsupportedLayerError(f"no Lipschitz rule for {type(self).__name__}")


class Dense(Operation):
    """y = x W^T + b."""

    @classmethod
    def from_module(cls, module, input_shape, output_shape):
        return cls(module)

    def __init__(self, module: nn.Linear):
        self.weight, self.bias = module.weight, module.bias

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def ibp(self, bounds):
        lower, upper = bounds
        mid, rad = (upper + lower) / 2, (upper - lower) / 2
        mid = F.linear(mid, self.weight, self.bias)
        rad = F.linear(rad, self.weight.abs())
        return mid - rad, mid + rad

    def backward(self, a):
        const = 0.0 if self.bias is None else a @ self.bias
        return [a @ self.weight], const

    def abs_backward(self, a):
        return [a @ self.weight.abs()]

    def backward_rows(self, index, output_shape, dtype):
        const = 0.0 if self.bias is None else self.bias[index]
        return [self.weight[index]], const

    def lipschitz(self, inputs, estimate=None):
        """||W||_2 L_in: the exact spectral norm (or the caller's estimate of it)."""
        if estimate is not None:
            return estimate(lambda x: F.linear(x, self.weight)) * inputs[0]
        return operator_norms.dense_norm(self.weight.to(inputs[0].dtype)) * inputs[0]


class Conv(Operation):
    """y = conv2d(x, W) + b, transposed with ``torch.nn.grad.conv2d_input``."""

    @classmethod
    def from_module(cls, module, input_shape, output_shape):
        return cls(module, input_shape)

    def __init__(self, module: nn.Conv2d, input_shape: Sequence[int]):
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise UnsupportedLayerError("Conv2d: only numeric zero padding is supported")
        self.module = module
        self.input_shape = tuple(input_shape)

    def _conv(self, x, weight, bias):
        m = self.module
        return F.conv2d(x, weight, bias, m.stride, m.padding, m.dilation, m.groups)

    def forward(self, x):
        return self._conv(x, self.module.weight, self.module.bias)

    def ibp(self, bounds):
        lower, upper = bounds
        mid, rad = (upper + lower) / 2, (upper - lower) / 2
        mid = self._conv(mid, self.module.weight, self.module.bias)
        rad = self._conv(rad, self.module.weight.abs(), None)
        return mid - rad, mid + rad

    accepts_patches = True

    def backward(self, a):
        m = self.module
        if isinstance(a, Patches):
            const = 0.0 if m.bias is None else a.values.sum((-2, -1)) @ m.bias
            return [self._transpose_patches(a)], const
        flat, lead = _fold(a)
        grad = self._transpose(flat, m.weight)
        const = 0.0 if m.bias is None else (a.sum(dim=(-2, -1)) @ m.bias)
        return [_unfold(grad, lead)], const

    def backward_rows(self, index, output_shape, dtype):
        """The kernel of each indexed output neuron, as a patch on its receptive field:
        no convolution at all (patches.py)."""
        m = self.module
        c_out, h_out, w_out = output_shape
        c_in = self.input_shape[0]
        (kh, kw), (sh, sw), (dh, dw), (ph, pw) = m.kernel_size, m.stride, m.dilation, m.padding
        channel, h, w = index // (h_out * w_out), (index // w_out) % h_out, index % w_out
        weight = m.weight[channel]  # (batch, rows, c_in / groups, kh, kw)
        if m.groups == 1 and dh == dw == 1:
            values = weight
        else:
            group_in = c_in // m.groups
            values = weight.new_zeros(*index.shape, c_in, (kh - 1) * dh + 1, (kw - 1) * dw + 1)
            first = (channel // (c_out // m.groups)) * group_in
            channels = first[..., None] + torch.arange(group_in, device=index.device)
            spread = values.new_zeros(*index.shape, group_in, *values.shape[-2:])
            spread[..., ::dh, ::dw] = weight
            values = values.scatter(2, channels[..., None, None].expand_as(spread), spread)
        patches = Patches(values, h * sh - ph, w * sw - pw, self.input_shape)
        patches = patches.with_values(values * patches.inside())
        const = 0.0 if m.bias is None else m.bias[channel]
        return [patches if patches.worth_keeping() else patches.to_dense()], const

    def abs_backward(self, a):
        m = self.module
        flat, lead = _fold(a)
        return [_unfold(self._transpose(flat, m.weight.abs()), lead)]

    def lipschitz(self, inputs, estimate=None):
        """||conv|| L_in, the norm bounded on the zero-padded input of this size
        (operator_norms.conv2d_norm), or the caller's estimate of it."""
        m = self.module
        if m.groups != 1:
            raise UnsupportedLayerError(
                f"Conv2d with groups={m.groups}: the Lipschitz bound handles groups=1 only"
            )
        if estimate is not None:
            return estimate(lambda x: self._conv(x, m.weight, None)) * inputs[0]
        norm = operator_norms.conv2d_norm(
            m.weight.to(inputs[0].dtype), self.input_shape[-2:], m.padding, m.stride,
            m.dilation,
        )
        return norm * inputs[0]

    FOLD_CHANNELS = 1
    """Up to this many input channels conv2d's transpose is one matrix product and
    kh * kw strided additions (`_few_channel_transpose`); above, conv_transpose2d.
    Measured on the 2-core CPU (torch 2.13), 4x4 kernels, stride 2: windows of 12 256
    rows into 1 channel 6 against 37 ms (F.fold, used before for windows, 17 ms: it
    loops over the rows); 1 328 dense rows of 16 x 14 x 14 into 1 channel 9.7 against
    20.8 ms, into 2 channels 27.8 against 19.9, into 3 channels (from 8 x 16 x 16)
    108 against 20 ms."""

    def _transpose_patches(self, a: Patches) -> Patches | torch.Tensor:
        """A window's transpose is the transposed convolution of the window alone, placed
        at corner * stride - padding."""
        m = self.module
        flat, lead = _fold(a.values)
        if m.groups == 1 and m.in_channels <= self.FOLD_CHANNELS:
            values = self._few_channel_transpose(flat)
        else:
            values = F.conv_transpose2d(flat, m.weight, None, m.stride, 0, 0, m.groups,
                                        m.dilation)
        values = _unfold(values, lead)
        out = Patches(values, a.top * m.stride[0] - m.padding[0],
                      a.left * m.stride[1] - m.padding[1], self.input_shape)
        out = out.with_values(values * out.inside())
        return out if out.worth_keeping() else out.to_dense()

    def _few_channel_transpose(self, flat: torch.Tensor, weight: torch.Tensor | None = None
                               ) -> torch.Tensor:
        """conv2d's transpose without padding, (n, c_out, h, w) to (n, c_in, (h - 1) *
        stride + dilation * (k - 1) + 1, ...): one matrix product, then kh * kw strided
        additions (for the first layer of grey-scale networks: see FOLD_CHANNELS)."""
        m = self.module
        weight = m.weight if weight is None else weight
        h, w = flat.shape[-2:]
        (sh, sw), (dh, dw), (kh, kw) = m.stride, m.dilation, m.kernel_size
        values = flat.new_zeros(len(flat), m.in_channels, (h - 1) * sh + dh * (kh - 1) + 1,
                                (w - 1) * sw + dw * (kw - 1) + 1)
        columns = (flat.flatten(2).transpose(1, 2) @ weight.flatten(1)).reshape(
            len(flat), h, w, m.in_channels, kh * kw)
        # unbind, not indexing: its gradient is one stack, not kh * kw zero-filled copies
        pieces = iter(columns.permute(4, 0, 3, 1, 2).unbind(0))
        for i in range(kh):
            for j in range(kw):
                values[..., i * dh: i * dh + sh * (h - 1) + 1: sh,
                       j * dw: j * dw + sw * (w - 1) + 1: sw] += next(pieces)
        return values

    def _transpose(self, a, weight):
        """conv2d's transpose, with the output padding that recovers the input size
        (conv_transpose2d: measured 20-25 % faster than conv2d_input on CPU; with few
        input channels `_few_channel_transpose`, cropped, unless autograd records the
        step: its kh * kw in-place additions each copy the whole gradient back, and
        conv_transpose2d was 2x faster there, forward and backward, on 2 304 rows of
        4 x 14 x 14 into 1 channel, CROWN-IBP training's shape: 26 against 49-53 ms)."""
        m = self.module
        recorded = torch.is_grad_enabled() and (a.requires_grad or weight.requires_grad)
        if m.groups == 1 and m.in_channels <= self.FOLD_CHANNELS and not recorded:
            full = self._few_channel_transpose(a, weight)
            (ph, pw), (h, w) = m.padding, self.input_shape[-2:]
            full = F.pad(full, (0, max(0, pw + w - full.shape[-1]),
                                0, max(0, ph + h - full.shape[-2])))
            return full[..., ph: ph + h, pw: pw + w]
        size = [(s - 1) * st - 2 * p + d * (k - 1) + 1 for s, st, p, d, k in zip(
            a.shape[-2:], m.stride, m.padding, m.dilation, m.kernel_size, strict=True)]
        extra = [want - got for want, got in zip(self.input_shape[-2:], size, strict=True)]
        return F.conv_transpose2d(a, weight, None, m.stride, m.padding, extra, m.groups,
                                  m.dilation)


class ConvTranspose(Operation):
    """y = conv_transpose2d(x, W) + b (upsampling layers); its own transpose is conv2d
    with the same weight, stride, padding, dilation and groups (the output padding only
    adds rows that conv2d's stride skips). l2 bound: sqrt(||A||_1 ||A||_inf) (Schur's
    test), each bounded by the largest absolute kernel sum over the output or the input
    channels; or the caller's estimate."""

    @classmethod
    def from_module(cls, module, input_shape, output_shape):
        return cls(module)

    def __init__(self, module: nn.ConvTranspose2d):
        if module.padding_mode != "zeros":
            raise UnsupportedLayerError("ConvTranspose2d: only zero padding is supported")
        self.module = module

    def _apply(self, x, weight, bias):
        m = self.module
        return F.conv_transpose2d(x, weight, bias, m.stride, m.padding, m.output_padding,
                                  m.groups, m.dilation)

    def forward(self, x):
        return self._apply(x, self.module.weight, self.module.bias)

    def ibp(self, bounds):
        lower, upper = bounds
        mid = self._apply((upper + lower) / 2, self.module.weight, self.module.bias)
        rad = self._apply((upper - lower) / 2, self.module.weight.abs(), None)
        return mid - rad, mid + rad

    def _transpose(self, a, weight):
        m = self.module
        flat, lead = _fold(a)
        return _unfold(F.conv2d(flat, weight, None, m.stride, m.padding, m.dilation, m.groups),
                       lead)

    def backward(self, a):
        m = self.module
        const = 0.0 if m.bias is None else a.sum(dim=(-2, -1)) @ m.bias
        return [self._transpose(a, m.weight)], const

    def abs_backward(self, a):
        return [self._transpose(a, self.module.weight.abs())]

    def lipschitz(self, inputs, estimate=None):
        m = self.module
        if estimate is not None:
            return estimate(lambda x: self._apply(x, m.weight, None)) * inputs[0]
        w = m.weight.abs().to(inputs[0].dtype)  # (c_in, c_out / groups, kh, kw)
        per_input = w.sum((1, 2, 3)).max()  # an input entry's weights, all outputs
        per_output = w.sum((0, 2, 3)).max()  # at most every kernel entry reaches one output
        return torch.sqrt(per_input * per_output) * inputs[0]


class Elementwise(Operation):
    """y = x * scale + shift with constant tensors broadcast over the batch (the
    normalisation layer, BatchNorm in eval mode, arithmetic with constants)."""

    def __init__(self, scale: torch.Tensor | float, shift: torch.Tensor | float):
        self.scale, self.shift = scale, shift

    def forward(self, x):
        return x * self.scale + self.shift

    def ibp(self, bounds):
        lower, upper = bounds
        a, b = lower * self.scale + self.shift, upper * self.scale + self.shift
        return torch.minimum(a, b), torch.maximum(a, b)

    accepts_patches = True

    def backward(self, a):
        values = a.values if isinstance(a, Patches) else a
        scale, shift = (torch.as_tensor(t, dtype=values.dtype, device=values.device)
                        for t in (self.scale, self.shift))
        if isinstance(a, Patches):  # per-channel constants: their windows
            scale = a.gather(scale.expand(1, *a.shape)) if scale.dim() else scale
            shift = a.gather(shift.expand(1, *a.shape)) if shift.dim() else shift
        const = rowsum(values * shift) if shift.any() else 0.0
        values = values * scale
        return [a.with_values(values) if isinstance(a, Patches) else values], const

    def backward_rows(self, index, output_shape, dtype):
        """Row e_(c, i, j) of a feature map is scale[c, i, j] at (c, i, j) of the input: a
        1 x 1 window (patches.py), so that a convolution before BatchNorm takes its rows as
        windows too. Other shapes: the one-hot rows."""
        if len(output_shape) != 3 or math.prod(output_shape[1:]) == 1:
            return super().backward_rows(index, output_shape, dtype)
        scale, shift = (torch.as_tensor(t, dtype=dtype, device=index.device)
                        .broadcast_to((1, *output_shape)).flatten()
                        for t in (self.scale, self.shift))
        return ([unit_windows(index, output_shape, scale[index])],
                shift[index] if shift.any() else 0.0)

    def abs_backward(self, a):
        return [a * abs(self.scale)]

    def lipschitz(self, inputs, estimate=None):
        """max |scale| L_in: a diagonal scaling (division by c is scaling by 1 / c)."""
        scale = torch.as_tensor(self.scale, dtype=inputs[0].dtype)
        return scale.abs().max() * inputs[0]


class AvgPool(Operation):
    """Average pooling: linear with non-negative weights; transposed through autograd."""

    @classmethod
    def from_module(cls, module, input_shape, output_shape):
        return cls(module, input_shape)

    def __init__(self, module: nn.Module, input_shape: Sequence[int]):
        self.module = module
        self.input_shape = tuple(input_shape)

    def forward(self, x):
        return self.module(x)

    def ibp(self, bounds):
        return self.module(bounds[0]), self.module(bounds[1])

    def backward(self, a):
        flat, lead = _fold(a)
        primal = torch.zeros(flat.shape[0], *self.input_shape, dtype=a.dtype, device=a.device)
        _, vjp = torch.func.vjp(self.module, primal)
        return [_unfold(vjp(flat)[0], lead)], 0.0

    def abs_backward(self, a):  # averaging weights are non-negative
        return self.backward(a)[0]

    def lipschitz(self, inputs, estimate=None):
        """AvgPool2d: Schur's test (operator_norms.avg_pool2d_norm), which needs every
        weight to be 1 / (kh kw): refused with a custom divisor, with partial windows at the
        border (ceil_mode) and with count_include_pad=False and padding. Global average
        pooling: exactly 1 / sqrt(H W). Other adaptive pools are refused."""
        m, pair = self.module, nn.modules.utils._pair
        if isinstance(m, nn.AvgPool2d):
            kernel = pair(m.kernel_size)
            stride = pair(m.stride or kernel)
            padding = pair(m.padding)
            partial = m.ceil_mode and any(
                (n + 2 * p - k) % s
                for n, p, k, s in zip(self.input_shape[-2:], padding, kernel, stride, strict=True)
            )
            if m.divisor_override is not None or partial or (
                    any(padding) and not m.count_include_pad):
                raise UnsupportedLayerError(
                    "AvgPool2d with divisor_override, ceil_mode partial windows or "
                    "count_include_pad=False with padding has no Lipschitz rule"
                )
            return operator_norms.avg_pool2d_norm(kernel, stride) * inputs[0]
        if isinstance(m, nn.AdaptiveAvgPool2d) and pair(m.output_size) == (1, 1):
            return operator_norms.global_avg_pool_norm(self.input_shape[-2:]) * inputs[0]
        raise UnsupportedLayerError(f"no Lipschitz rule for {type(m).__name__} {m}")


class Reshape(Operation):
    """Flatten / view: the same numbers in another shape."""

    @classmethod
    def from_module(cls, module, input_shape, output_shape):
        return cls(input_shape, output_shape)

    def __init__(self, input_shape: Sequence[int], output_shape: Sequence[int]):
        self.input_shape, self.output_shape = tuple(input_shape), tuple(output_shape)

    def forward(self, x):
        return x.reshape(x.shape[0], *self.output_shape)

    def ibp(self, bounds):
        return self.forward(bounds[0]), self.forward(bounds[1])

    def backward(self, a):
        return [a.reshape(*a.shape[:2], *self.input_shape)], 0.0

    def abs_backward(self, a):
        return self.backward(a)[0]

    def lipschitz(self, inputs, estimate=None):
        return inputs[0]  # an isometry


class Sum(Operation):
    """y = sum_i sign_i * x_i (residual additions, differences of two activations)."""

    def __init__(self, signs: Sequence[float]):
        self.signs = tuple(signs)

    def forward(self, *xs):
        return sum(s * x for s, x in zip(self.signs, xs, strict=True))

    def ibp(self, *bounds):
        lower = sum(lo if s > 0 else -hi for s, (lo, hi) in zip(self.signs, bounds, strict=True))
        upper = sum(hi if s > 0 else -lo for s, (lo, hi) in zip(self.signs, bounds, strict=True))
        return lower, upper

    accepts_patches = True

    def backward(self, a):
        if isinstance(a, Patches):
            return [a.with_values(a.values * s) for s in self.signs], 0.0
        return [a * s for s in self.signs], 0.0

    def backward_rows(self, index, output_shape, dtype):
        """Row e_i of a feature map is sign_k e_i on input k: 1 x 1 windows (patches.py),
        which the convolutions of both branches take as windows. Other shapes: one-hot."""
        if len(output_shape) != 3 or math.prod(output_shape[1:]) == 1:
            return super().backward_rows(index, output_shape, dtype)
        ones = torch.ones(index.shape, dtype=dtype, device=index.device)
        return [unit_windows(index, output_shape, ones * s) for s in self.signs], 0.0

    def abs_backward(self, a):
        return [a * abs(s) for s in self.signs]

    def lipschitz(self, inputs, estimate=None):
        """sum_i |sign_i| L_i (triangle inequality)."""
        return sum(abs(s) * lip for s, lip in zip(self.signs, inputs, strict=True))


def unstable_rows(unstable: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices (batch, R) of each sample's neurons where ``unstable`` (batch, *shape)
    holds, padded to the largest count R (with distinct other neurons), and the mask
    (batch, R) of the real entries."""
    unstable = unstable.flatten(1)
    counts = unstable.sum(1)
    width = int(counts.max()) if len(counts) else 0
    order = torch.argsort((~unstable).to(torch.int8), dim=1, stable=True)[:, :width]
    valid = torch.arange(width, device=unstable.device)[None] < counts[:, None]
    return order, valid


def _row_view(a, lower, upper, alpha):
    """Coefficient values, and the input bounds and slopes aligned with them: windows for
    `Patches`, a broadcast rows dimension for dense coefficients."""
    if isinstance(a, Patches):
        return a.values, a.gather(lower), a.gather(upper), _window_slopes(a, alpha)
    return a, lower.unsqueeze(1), upper.unsqueeze(1), alpha


def _window_slopes(a: Patches, alpha: torch.Tensor | None) -> torch.Tensor | None:
    """Slopes (batch, rows, ...) on ``a``'s windows: as given where they are kept per
    window (`AlphaOptimiser`: (C, kh, kw) each), read off the map where they cover it
    (C, H, W). A window kept as one is smaller than its map, so the shapes tell them apart."""
    if alpha is None or alpha.shape[2:] == a.values.shape[2:]:
        return alpha
    return a.gather(alpha)


def _like(a, values):
    return a.with_values(values) if isinstance(a, Patches) else values


class Activation(Operation):
    """A non-linear operation y = g(z), elementwise but for MaxPool and MinMax (which
    override what reads neurons one by one). Its backward step needs the bounds
    [lower, upper] of its input and its linear relaxation there,

        lower_slope * z + lower_intercept <= g(z) <= upper_slope * z + upper_intercept,

    in which a free parameter ``alpha`` (alpha-CROWN) may choose among sound lower
    relaxations; ``initial_alpha`` returns its start value, or None if it has none."""

    linear = False
    accepts_patches = True
    slopes: tuple[float, float] | None = None
    """(left, right): the slopes of a convex piecewise-linear activation with one kink at
    0 and g(0) = 0 (ReLU: (0, 1); LeakyReLU: (s, 1)). Declaring them is what the MILP
    (one binary per unstable neuron), branch and bound (a split at 0 makes each side
    linear) and the local-Lipschitz bound (g' lies between them) need; None (Sigmoid,
    Tanh): those methods refuse the activation."""

    def relaxation(self, lower, upper, alpha=None) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def refusal(self, method: str) -> str | None:
        if self.slopes is not None:
            return None
        what = {"exact": "no MILP encoding", "bab": "no split that makes it linear",
                "local-lipschitz": "no derivative bound"}.get(method, "no rule")
        return (f"{method} has {what} for {type(self).__name__}: it takes linear operations "
                "and piecewise-linear activations that declare their `slopes`")

    def lipschitz(self, inputs, estimate=None):
        """max(|left|, |right|) times the input's bound, from ``slopes``."""
        if self.slopes is None:
            return super().lipschitz(inputs, estimate)
        return max(abs(s) for s in self.slopes) * inputs[0]

    def derivative_bounds(self, lower: torch.Tensor, upper: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """Elementwise bounds of g'(z) over z in [lower, upper], from ``slopes``: one
        slope on a stable side, both where the interval holds the kink."""
        left, right = self.slopes
        low, high = min(left, right), max(left, right)
        inside = (lower < 0) & (upper > 0)
        side = torch.where(lower >= 0, right, left).to(lower.dtype)
        return torch.where(inside, low, side), torch.where(inside, high, side)

    def gradient_bounds(self, g_lower, g_upper, z_lower, z_upper
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Bounds of g'(z) * v for v in [g_lower, g_upper] and z in [z_lower, z_upper]
        (a backward step of the local-Lipschitz interval pass): the extremes of the four
        corner products."""
        d_lower, d_upper = self.derivative_bounds(z_lower, z_upper)
        corners = torch.stack([g_lower * d_lower, g_lower * d_upper, g_upper * d_lower,
                               g_upper * d_upper])
        return corners.min(0).values, corners.max(0).values

    def initial_alpha(self, lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor | None:
        return None

    def inexact(self, lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
        """Neurons whose relaxation is not exact on [lower, upper]: the ones that a
        tighter input bound can help, and so the only ones CROWN bounds."""
        return upper > lower

    def relaxed_backward(self, a, lower, upper, alpha=None, cache=None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Backward step for a lower bound of sum(a * y): positive coefficients take the
        lower relaxation, negative ones the upper (each row separately). ``cache``: a
        dict the caller keeps while [lower, upper] stay the same, where an operation may
        keep what of its relaxation depends on the bounds alone (`Relu` does; the others
        recompute it: only branch and bound, which takes ReLU networks, passes one)."""
        values, lower, upper, alpha = _row_view(a, lower, upper, alpha)
        lower_slope, lower_icpt, upper_slope, upper_icpt = self.relaxation(lower, upper, alpha)
        a_pos, a_neg = values.clamp(min=0), values.clamp(max=0)
        const = rowsum(a_pos * lower_icpt + a_neg * upper_icpt)
        return _like(a, a_pos * lower_slope + a_neg * upper_slope), const

    def backward(self, a):
        raise TypeError(f"{type(self).__name__} is not linear: use relaxed_backward")

    def abs_backward(self, a):
        raise TypeError(f"{type(self).__name__} is not linear")


class Relu(Activation):
    """y = max(z, 0). Relaxation (Zhang et al. 2018, CROWN, Sec. 3.1): stable neurons are
    exact (slope 1 if lower >= 0, 0 if upper <= 0); an unstable one (lower < 0 < upper)
    gets the chord of the triangle as its upper bound and a lower slope in [0, 1]:
    ``alpha`` if given (alpha-CROWN), else CROWN's adaptive choice, 1 if upper > -lower
    and 0 otherwise (the slope that minimises the relaxation's area)."""

    def forward(self, x):
        return torch.relu(x)

    def ibp(self, bounds):
        return torch.relu(bounds[0]), torch.relu(bounds[1])

    def relaxation(self, lower, upper, alpha=None):
        unstable = (lower < 0) & (upper > 0)
        active = (lower >= 0).to(lower.dtype)
        width = (upper - lower).clamp(min=1e-12)
        upper_slope = torch.where(unstable, upper / width, active)
        upper_intercept = torch.where(unstable, -upper_slope * lower, torch.zeros_like(lower))
        if alpha is None:
            alpha = self.initial_alpha(lower, upper)
        lower_slope = torch.where(unstable, alpha, active)
        return lower_slope, torch.zeros_like(lower), upper_slope, upper_intercept

    slopes = (0.0, 1.0)

    def initial_alpha(self, lower, upper):
        return (upper > -lower).to(lower.dtype)

    def lipschitz(self, inputs, estimate=None):
        return inputs[0]  # 1-Lipschitz

    def gradient_bounds(self, g_lower, g_upper, z_lower, z_upper):
        """`Activation.gradient_bounds` for g' in {0, 1}: the interval itself where the
        neuron is active, 0 where inactive, the interval widened to 0 where unstable."""
        active, inactive = z_lower >= 0, z_upper <= 0
        zero = torch.zeros_like(g_lower)
        return (torch.where(active, g_lower, torch.where(inactive, zero, g_lower.clamp(max=0))),
                torch.where(active, g_upper, torch.where(inactive, zero, g_upper.clamp(min=0))))

    def inexact(self, lower, upper):
        return (lower < 0) & (upper > 0)

    def relaxed_backward(self, a, lower, upper, alpha=None, cache=None):
        """`Activation.relaxed_backward` in fewer passes over ``a`` (the hot loop of
        CROWN): the slopes are computed once on the input's shape, the lower relaxation
        has no intercept and the upper one's is -slope * lower, so the constant is
        -sum(min(a, 0) * slope * lower) over unstable neurons (`_patches_backward`,
        `_dense_backward`). The slopes' gradient is the bound's derivative: a positive
        coefficient's lower slope moves a' by max(a, 0), never the constant.
        ``cache`` keeps everything but the lower slope, which alone depends on alpha."""
        parts = None if cache is None else cache.get("parts")
        if parts is None:
            unstable = (lower < 0) & (upper > 0)
            active = (lower >= 0).to(lower.dtype)
            upper_slope = torch.where(unstable, upper / (upper - lower).clamp(min=1e-12),
                                      active)
            parts = unstable, active, upper_slope, torch.where(unstable, -lower, 0.0)
            if cache is not None:
                cache["parts"] = parts
        unstable, active, upper_slope, shift = parts
        if isinstance(a, Patches):
            return self._patches_backward(a, lower, upper, alpha, parts)
        columns = None if cache is None else cache.get("columns")
        if columns is None:
            columns = unstable_rows(unstable)
            if cache is not None:
                cache["columns"] = columns
        return self._dense_backward(a, lower, upper, alpha, parts, columns)

    def _patches_backward(self, a, lower, upper, alpha, parts):
        """Windows: a' = a * upper_slope + max(a, 0) * (lower_slope - upper_slope), the
        gap nonzero only at unstable neurons, and the constant sum(min(a, 0) * slope *
        shift); maps gathered into windows, no elementwise select (``where`` is many
        times slower than a product on CPU). ``alpha``: each row's slopes on its window
        (batch, rows, C, kh, kw), as `AlphaOptimiser` keeps them, or on the whole map."""
        unstable, _, upper_slope, shift = parts
        values = a.values
        window_slope = a.gather(upper_slope)
        if alpha is None:
            gap = a.gather(torch.where(unstable, self.initial_alpha(lower, upper) - upper_slope,
                                       0.0))
        else:
            gap = (_window_slopes(a, alpha) - window_slope) * a.gather(unstable.to(values.dtype))
        positive = values.clamp(min=0)
        a_in = values * window_slope
        a_in.addcmul_(positive, gap)
        const = rowsum((values - positive) * a.gather(upper_slope * shift))
        return a.with_values(a_in), const

    def _dense_backward(self, a, lower, upper, alpha, parts, columns):
        """Dense rows: every neuron takes the upper slope (exact where the neuron is
        stable), then only each sample's unstable columns are read again, where a
        positive coefficient takes the lower slope instead and a negative one the
        chord's intercept. One full pass over ``a``, the rest on the unstable share
        (a quarter or less of the columns on ERAN's MLPs)."""
        unstable, _, upper_slope, shift = parts
        index, valid = columns
        flat = a.flatten(2)
        a_in = flat * upper_slope.flatten(1).unsqueeze(1)
        if index.shape[1] == 0:
            return a_in.view_as(a), flat.new_zeros(flat.shape[:2])
        if len(index) != len(flat):  # bounds of one sample for a batch of rows
            index, valid = index.expand(len(flat), -1), valid.expand(len(flat), -1)
        rows = index.unsqueeze(1).expand(-1, flat.shape[1], -1)
        picked = flat.gather(2, rows)
        positive = picked.clamp(min=0)
        if alpha is None:
            chosen = self.initial_alpha(lower, upper).flatten(1).expand(len(flat), -1)
            chosen = chosen.gather(1, index).unsqueeze(1)
        else:
            chosen = alpha.flatten(2).expand(len(flat), flat.shape[1], -1).gather(2, rows)
        slope = upper_slope.flatten(1).expand(len(flat), -1).gather(1, index)
        gap = torch.where(valid.unsqueeze(1), chosen - slope.unsqueeze(1), 0.0)
        a_in.scatter_add_(2, rows, positive * gap)
        intercept = (slope * shift.flatten(1).expand(len(flat), -1).gather(1, index))
        const = rowdot(picked - positive, intercept * valid)
        return a_in.view_as(a), const


def _pairs(t: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The halves of ``t`` along ``dim``: the first and second members of MinMax's pairs."""
    first, second = t.chunk(2, dim)
    return first, second


def _join(first: torch.Tensor, second: torch.Tensor, dim: int) -> torch.Tensor:
    """The inverse of `_pairs`."""
    return torch.cat((first, second), dim)


class MinMax(Activation):
    """y = (min(a, b), max(a, b)) for the channel halves a, b of z: GroupSort of size 2
    (`certbench.verifiers.layers.MinMax`). Monotone in each input, so its
    interval rule is the layer applied to each end; 1-Lipschitz.

    Relaxation: min(a, b) = a - r and max(a, b) = b + r with r = relu(d), d = a - b. A
    backward row with coefficients (c_min, c_max) on a pair is c_min a + c_max b + k r,
    k = c_max - c_min, and r takes ReLU's relaxation (CROWN, Zhang et al. 2018, Sec. 3.1)
    on d in [l_a - u_b, u_a - l_b]: the lower line (slope 1 if u_d > -l_d, else 0) where
    k >= 0, the chord where k < 0. So a receives c_min + k s, b receives c_max - k s, s
    the chosen slope. Exact where the pair's intervals do not overlap. d's interval is the
    difference of the two boxes, not a bound of d itself: sound, looser where a and b
    move together. So the CROWN and alpha-CROWN verifiers take the operation's
    `decomposition` instead, where d is a node CROWN bounds and r a ReLU with a free
    slope: on the zoo's GloRo 4C3F network (l2, 4 points) its margin bounds were about 3x
    tighter. The MILP and branch and bound take the decomposition
    too: r is a ReLU, encoded and split as any other, so they stay complete. This
    whole-operation rule serves CROWN-IBP (IBP's intervals of the whole are exact for a
    box, those of the parts are not) and the local-Lipschitz bound's intermediate bounds;
    that bound takes the whole operation's derivative rule (`gradient_bounds`)."""

    accepts_patches = True  # pairs are channels, so a window holds both members

    def forward(self, x):
        return min_max(x)

    def decomposition(self, input_shape, output_shape):
        """d = a - b (`PairDifference`), r = relu(d), y = (a - r, b + r) (`PairMerge`):
        the same function, with d a node of its own, so CROWN bounds d itself rather
        than subtracting the boxes of a and b, and alpha-CROWN frees r's lower slope."""
        half = (input_shape[0] // 2, *input_shape[1:])
        return [(PairDifference(), (-1,), half), (Relu(), (0,), half),
                (PairMerge(), (-1, 1), tuple(output_shape))]

    def ibp(self, bounds):
        return min_max(bounds[0]), min_max(bounds[1])

    def lipschitz(self, inputs, estimate=None):
        return inputs[0]  # a permutation of its input wherever differentiable

    def refusal(self, method):
        return None  # the MILP and bab take its decomposition, whose r is a ReLU

    @staticmethod
    def _difference(lower, upper, dim):
        """Bounds of d = a - b per pair, from the boxes of a and b."""
        (la, lb), (ua, ub) = _pairs(lower, dim), _pairs(upper, dim)
        return la - ub, ua - lb

    def inexact(self, lower, upper):
        dl, du = self._difference(lower, upper, 1)
        unstable = (dl < 0) & (du > 0)
        return _join(unstable, unstable, 1)

    def relaxed_backward(self, a, lower, upper, alpha=None, cache=None):
        values, lower, upper, _ = _row_view(a, lower, upper, None)
        dl, du = self._difference(lower, upper, 2)
        c_min, c_max = _pairs(values, 2)
        k = c_max - c_min
        unstable = (dl < 0) & (du > 0)
        active = (dl >= 0).to(values.dtype)
        chord = torch.where(unstable, du / (du - dl).clamp(min=1e-12), active)
        lower_slope = torch.where(unstable, (du > -dl).to(values.dtype), active)
        m = k * torch.where(k >= 0, lower_slope, chord)
        const = rowsum(k.clamp(max=0) * chord * torch.where(unstable, -dl, 0.0))
        return _like(a, _join(c_min + m, c_max - m, 2)), const

    def gradient_bounds(self, g_lower, g_upper, z_lower, z_upper):
        """Input-gradient bounds: where a <= b on the whole box, a gets min's gradient
        and b max's; where a >= b the other way round; where the order can change, each
        gets the hull of the two (the Jacobian is one of the two permutations)."""
        dl, du = self._difference(z_lower, z_upper, 2)
        ordered, swapped = du <= 0, dl >= 0

        def route(g, hull):  # hull: torch.minimum for the lower end, maximum for the upper
            g_min, g_max = _pairs(g, 2)
            joint = hull(g_min, g_max)
            to_a = torch.where(ordered, g_min, torch.where(swapped, g_max, joint))
            to_b = torch.where(ordered, g_max, torch.where(swapped, g_min, joint))
            return _join(to_a, to_b, 2)

        return route(g_lower, torch.minimum), route(g_upper, torch.maximum)


class PairDifference(Operation):
    """d = a - b for the channel halves (a, b) of z, MinMax's pairs (`MinMax.decomposition`).
    Its transpose puts a row c on d as (c, -c) on z."""

    accepts_patches = True

    def forward(self, x):
        a, b = _pairs(x, 1)
        return a - b

    def ibp(self, bounds):
        (la, lb), (ua, ub) = _pairs(bounds[0], 1), _pairs(bounds[1], 1)
        return la - ub, ua - lb

    def backward(self, a):
        if isinstance(a, Patches):
            values, (c, h, w) = _join(a.values, -a.values, 2), a.shape
            return [Patches(values, a.top, a.left, (2 * c, h, w))], 0.0
        return [_join(a, -a, 2)], 0.0

    def backward_rows(self, index, output_shape, dtype):
        """Row e_i of a feature map of differences is (e_i, -e_i) on the pair: 1 x 1
        windows (patches.py), which the convolution before takes as windows."""
        if len(output_shape) != 3 or math.prod(output_shape[1:]) == 1:
            return super().backward_rows(index, output_shape, dtype)
        ones = torch.ones(index.shape, dtype=dtype, device=index.device)
        return self.backward(unit_windows(index, output_shape, ones))

    def abs_backward(self, a):
        return [_join(a, a, 2)]


class PairMerge(Operation):
    """y = (a - r, b + r) from z = (a, b) and r (`MinMax.decomposition`, r = relu(a - b)).
    Its transpose of a row (c_min, c_max) on y is the same row on z and c_max - c_min
    on r."""

    accepts_patches = True

    def forward(self, z, r):
        a, b = _pairs(z, 1)
        return _join(a - r, b + r, 1)

    def ibp(self, z, r):
        (la, lb), (ua, ub) = _pairs(z[0], 1), _pairs(z[1], 1)
        (lr, ur) = r
        return _join(la - ur, lb + lr, 1), _join(ua - lr, ub + ur, 1)

    def backward(self, a):
        values = a.values if isinstance(a, Patches) else a
        c_min, c_max = _pairs(values, 2)
        if isinstance(a, Patches):
            c, h, w = a.shape
            return [a, Patches(c_max - c_min, a.top, a.left, (c // 2, h, w))], 0.0
        return [a, c_max - c_min], 0.0

    def abs_backward(self, a):
        c_min, c_max = _pairs(a, 2)
        return [a, c_min + c_max]


class _SShaped(Activation):
    """A monotone S-shaped activation: IBP maps the ends; the relaxation is CROWN's
    chord / tangent construction (s_shaped.py). No free slope: alpha-CROWN keeps it."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    derivative: Callable[[torch.Tensor], torch.Tensor]

    def forward(self, x):
        return type(self).fn(x)

    def ibp(self, bounds):
        return type(self).fn(bounds[0]), type(self).fn(bounds[1])

    def relaxation(self, lower, upper, alpha=None):
        return s_shaped_relaxation(lower, upper, type(self).fn, type(self).derivative)

    max_slope: float  # sup of the derivative: the Lipschitz constant of fn

    def lipschitz(self, inputs, estimate=None):
        return self.max_slope * inputs[0]


class Sigmoid(_SShaped):
    fn, derivative = torch.sigmoid, sigmoid_derivative
    max_slope = 0.25  # sigmoid'(0)


class Tanh(_SShaped):
    fn, derivative = torch.tanh, tanh_derivative
    max_slope = 1.0  # tanh'(0)


class Concat(Operation):
    """y = cat(x_1, ..., x_k) along a feature dimension (DenseNet-style blocks); its
    transpose splits the coefficients."""

    def __init__(self, dim: int, sizes: Sequence[int]):
        self.dim, self.sizes = dim, tuple(sizes)  # dim counts the batch dimension

    def forward(self, *xs):
        return torch.cat(xs, self.dim)

    def ibp(self, *bounds):
        return (torch.cat([lo for lo, _ in bounds], self.dim),
                torch.cat([hi for _, hi in bounds], self.dim))

    def backward(self, a):
        return list(a.split(self.sizes, self.dim + 1)), 0.0

    def abs_backward(self, a):
        return self.backward(a)[0]

    def lipschitz(self, inputs, estimate=None):
        """sqrt(sum_i L_i^2): the squared distances of the parts add up."""
        return torch.linalg.vector_norm(torch.stack(list(inputs)))


class BatchNormEval(Elementwise):
    """BatchNorm with its running statistics, read from the module at every use so that
    certified training sees the current parameters."""

    @classmethod
    def from_module(cls, module, input_shape, output_shape):
        return cls(module, input_shape)

    def __init__(self, module: nn.modules.batchnorm._BatchNorm, input_shape: Sequence[int]):
        if module.running_var is None:
            raise UnsupportedLayerError("BatchNorm without running statistics")
        self.module, self.view = module, (-1,) + (1,) * (len(input_shape) - 1)

    @property
    def scale(self):
        m = self.module
        scale = torch.rsqrt(m.running_var + m.eps)
        if m.weight is not None:
            scale = scale * m.weight
        return scale.view(self.view)

    @property
    def shift(self):
        m = self.module
        shift = -m.running_mean * torch.rsqrt(m.running_var + m.eps)
        if m.weight is not None:
            shift = shift * m.weight
        if m.bias is not None:
            shift = shift + m.bias
        return shift.view(self.view)

    def lipschitz(self, inputs, estimate=None):
        """max |gamma / sqrt(running_var + eps)| L_in, computed in the requested dtype."""
        return operator_norms.batchnorm_norm(self.module, inputs[0].dtype) * inputs[0]


class MaxPool(Activation):
    """y = max over each window of the input (MaxPool2d; dilation 1, floor mode).

    Relaxation (DeepPoly, Singh et al. 2019, Sec. 4.4; auto_LiRPA's BoundMaxPool), per
    window with input bounds [l_i, u_i] and j = argmax_i l_i: below, y >= x_j; above, y <=
    x_j when j dominates (l_j >= max_{i != j} u_i, so y = x_j on the box), else y <= max_i
    u_i. Not elementwise: the backward step routes each window's coefficient to its j
    (summing where windows overlap) and has no free slope."""

    accepts_patches = False

    def __init__(self, module: nn.MaxPool2d, input_shape: Sequence[int]):
        pair = nn.modules.utils._pair
        if module.ceil_mode or pair(module.dilation) != (1, 1):
            raise UnsupportedLayerError("MaxPool2d with ceil_mode or dilation is not supported")
        self.module, self.input_shape = module, tuple(input_shape)
        self.kernel, self.stride = pair(module.kernel_size), pair(module.stride)
        self.padding = pair(module.padding)

    @classmethod
    def from_module(cls, module, input_shape, output_shape):
        return cls(module, input_shape)

    def forward(self, x):
        return self.module(x)

    def ibp(self, bounds):
        return self.module(bounds[0]), self.module(bounds[1])

    def _windows(self, t: torch.Tensor) -> torch.Tensor:
        """(batch, C, k*k, L): every window's entries, -inf on the padding."""
        ph, pw = self.padding
        t = F.pad(t, (pw, pw, ph, ph), value=-math.inf)
        cols = F.unfold(t, self.kernel, stride=self.stride)
        return cols.reshape(t.shape[0], t.shape[1], -1, cols.shape[-1])

    def relaxed_backward(self, a, lower, upper, alpha=None, cache=None):
        low, up = self._windows(lower), self._windows(upper)
        best = low.argmax(2, keepdim=True)  # j of each window
        others = up.scatter(2, best, -math.inf).amax(2, keepdim=True)
        dominant = (low.gather(2, best) >= others).squeeze(2)  # (batch, C, L)
        u_max = up.amax(2)
        flat = a.flatten(-2)  # (batch, rows, C, L)
        routed = flat.clamp(min=0) + flat.clamp(max=0) * dominant.unsqueeze(1)
        const = (flat.clamp(max=0) * (u_max * ~dominant).unsqueeze(1)).flatten(2).sum(-1)
        batch, rows, c, windows = flat.shape
        cols = flat.new_zeros(batch, rows, c, self.kernel[0] * self.kernel[1], windows)
        index = best.unsqueeze(1).expand(batch, rows, c, 1, windows)
        cols = cols.scatter(3, index, routed.unsqueeze(3))
        (ph, pw), (h, w) = self.padding, self.input_shape[1:]
        dense = F.fold(cols.reshape(batch * rows, c * cols.shape[3], windows),
                       (h + 2 * ph, w + 2 * pw), self.kernel, stride=self.stride)
        dense = dense[..., ph : ph + h, pw : pw + w]
        return dense.reshape(batch, rows, *self.input_shape), const

    def lipschitz(self, inputs, estimate=None):
        """sqrt(ceil(kh/sh) ceil(kw/sw)) L_in: |max_w x - max_w y| <= max_{i in w} |x_i -
        y_i|, so the squared distance is at most the sum over windows of their inputs'
        squared differences, and no input lies in more than that many windows."""
        overlap = math.ceil(self.kernel[0] / self.stride[0]) * math.ceil(
            self.kernel[1] / self.stride[1])
        return math.sqrt(overlap) * inputs[0]
