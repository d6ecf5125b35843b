"""Upper bounds on the l2 operator norm of single layers.

Every function returns a value that is *proven* to be at least the true operator norm
(up to the float64 rounding of an SVD, a relative error near 1e-15). None of them is a
power-iteration estimate, which approaches the norm from below and so can undershoot it
(the soundness bug reported as issue #8 of GloRo's reference code).

All functions are differentiable in the weights, so training recipes (LMT, GloRo) use
them too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from certbench.verifiers.base import UnsupportedLayerError


def dense_norm(weight: torch.Tensor) -> torch.Tensor:
    """Exact spectral norm sigma_max(W) of a dense layer x -> W x + b (via an SVD)."""
    return torch.linalg.matrix_norm(weight, ord=2)


def conv2d_norm(
    weight: torch.Tensor,
    input_hw: Sequence[int],
    padding: Sequence[int],
    stride: Sequence[int] = (1, 1),
    dilation: Sequence[int] = (1, 1),
) -> torch.Tensor:
    """Upper bound on the l2 operator norm of a zero-padded 2-D convolution.

    Argument. Let the padded input be M_h x M_w (M = n + 2p). A stride-1 zero-padded
    convolution equals Select o Circ_M o Embed, where Embed places the input inside an
    M_h x M_w zero image, Circ_M is the *circular* convolution with the same kernel on that
    size (no output that Select keeps wraps around, since kept positions are at most
    M - k), and Select keeps the valid outputs. Embed and Select have norm 1, so
    ||conv|| <= ||Circ_M||. The singular values of a circular convolution are exactly
    the singular values of the c_out x c_in matrices K_hat(u, v), the 2-D DFT of the kernel
    at the M_h x M_w frequencies (Sedghi, Gupta and Long 2019, "The singular values of
    convolutional layers", Theorem 6). Hence ||conv|| <= max_{u,v} sigma_max(K_hat(u, v)),
    computed here exactly with one batched SVD.

    Dilation is a kernel with zeros inserted. A stride-s convolution is rewritten exactly
    as a stride-1 convolution on the polyphase (space-to-depth) decomposition of the padded
    input, a permutation and hence an isometry, with the kernel split the same way into
    c_in * s_h * s_w channels of ceil(k / s) taps; bounding that is much tighter than
    bounding the stride-1 convolution and subsampling.
    """
    if weight.dim() != 4:
        raise UnsupportedLayerError(f"conv2d_norm expects a 4-D kernel, got {tuple(weight.shape)}")
    kernel = weight
    c_out, c_in, kh, kw = weight.shape
    if tuple(dilation) != (1, 1):
        dh, dw = dilation
        kernel = weight.new_zeros(c_out, c_in, (kh - 1) * dh + 1, (kw - 1) * dw + 1)
        kernel[:, :, ::dh, ::dw] = weight
        kh, kw = kernel.shape[2:]
    m_h = input_hw[0] + 2 * padding[0]
    m_w = input_hw[1] + 2 * padding[1]
    sh, sw = stride
    if (sh, sw) != (1, 1):
        qh, qw = math.ceil(kh / sh), math.ceil(kw / sw)
        kernel = nn.functional.pad(kernel, (0, qw * sw - kw, 0, qh * sh - kh))
        kernel = kernel.reshape(c_out, c_in, qh, sh, qw, sw).permute(0, 1, 3, 5, 2, 4)
        kernel = kernel.reshape(c_out, c_in * sh * sw, qh, qw)
        m_h, m_w = math.ceil(m_h / sh), math.ceil(m_w / sw)
    if m_h < kernel.shape[2] or m_w < kernel.shape[3]:
        raise UnsupportedLayerError("convolution kernel larger than its padded input")
    spectrum = torch.fft.fft2(kernel, s=(m_h, m_w))  # (c_out, c_in', m_h, m_w)
    per_frequency = spectrum.permute(2, 3, 0, 1)  # (m_h, m_w, c_out, c_in')
    return torch.linalg.matrix_norm(per_frequency, ord=2).max()


def avg_pool2d_norm(kernel: Sequence[int], stride: Sequence[int]) -> float:
    """Upper bound on the l2 norm of average pooling (count_include_pad semantics).

    Schur's test: ||A||_2 <= sqrt(||A||_1 ||A||_inf). Every output averages kh*kw inputs
    with weight 1/(kh*kw), so each row sums to at most 1; an input lies in at most
    ceil(kh/sh) * ceil(kw/sw) windows, so each column sums to at most that over kh*kw.
    """
    kh, kw = kernel
    sh, sw = stride
    column_sum = math.ceil(kh / sh) * math.ceil(kw / sw) / (kh * kw)
    return math.sqrt(column_sum)


def global_avg_pool_norm(input_hw: Sequence[int]) -> float:
    """Exact l2 norm of averaging an H x W map to one value per channel: 1 / sqrt(H W)."""
    return 1.0 / math.sqrt(input_hw[0] * input_hw[1])


def batchnorm_norm(bn: nn.modules.batchnorm._BatchNorm, dtype: torch.dtype) -> torch.Tensor:
    """Exact l2 norm of BatchNorm in eval mode, a diagonal scaling by
    gamma / sqrt(running_var + eps): the largest absolute scale."""
    if bn.running_var is None:
        raise UnsupportedLayerError(f"{type(bn).__name__} without running statistics")
    scale = 1.0 / torch.sqrt(bn.running_var.to(dtype) + bn.eps)
    if bn.weight is not None:
        scale = bn.weight.to(dtype) * scale
    return scale.abs().max()


def power_iteration_estimate(
    apply: Callable[[torch.Tensor], torch.Tensor], u: torch.Tensor, steps: int,
    differentiate: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """An ESTIMATE of ||apply|| from below, for training only (never for certificates).

    ``apply`` is a linear map (a layer without its bias); ``u`` the vector carried over
    from the previous call. Each step sets u <- A^T A u / ||A^T A u|| (A^T through
    autograd); returns ||A u|| and u after the last step (a unit vector).

    - ``differentiate=False``: the steps are constants in the gradient, which flows
      through the final ||A u|| alone (Miyato et al. 2018, spectral normalisation: with
      the vector kept between training steps, one step per step).
    - ``differentiate=True``: the steps are part of the graph (``create_graph``), so
      the gradient also sees how u moves with the weights, as GloRo's reference code
      trains (its ``spectral_power_all.N``: N steps a training step from kept vectors).
    """
    u = u.detach().requires_grad_(True)
    for _ in range(steps):
        out = apply(u)
        (u,) = torch.autograd.grad(
            out, u, grad_outputs=out if differentiate else out.detach(),
            create_graph=differentiate,
        )
        u = u / u.norm().clamp_min(1e-12)
        if not differentiate:
            u = u.detach().requires_grad_(True)
    if not differentiate:
        u = u.detach()
    return apply(u).norm(), u.detach()
