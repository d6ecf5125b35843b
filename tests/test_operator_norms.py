"""Each per-layer bound is at least the exact operator norm of the layer's dense matrix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from certbench.verifiers import operator_norms


def exact_norm(layer: nn.Module, input_shape: tuple[int, ...]) -> float:
    """sigma_max of the layer's (linear part's) Jacobian, computed densely."""
    x = torch.zeros(1, *input_shape, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: layer(v).flatten(), x)
    return torch.linalg.matrix_norm(jac.reshape(jac.shape[0], -1), ord=2).item()


@pytest.mark.parametrize(
    "c_in,c_out,k,stride,padding,dilation,size",
    [
        (1, 4, 3, 1, 1, 1, 6),
        (3, 5, 3, 1, 0, 1, 7),
        (2, 3, 4, 2, 1, 1, 8),
        (4, 4, 3, 2, 1, 1, 7),
        (2, 2, 3, 1, 2, 2, 6),
        (3, 6, 1, 1, 0, 1, 5),
        (2, 3, 5, 3, 2, 1, 9),
    ],
)
def test_conv_bound_is_at_least_the_exact_norm(c_in, c_out, k, stride, padding, dilation, size):
    torch.manual_seed(c_in * 100 + k)
    conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=padding, dilation=dilation,
                     bias=False).double()
    exact = exact_norm(conv, (c_in, size, size))
    bound = operator_norms.conv2d_norm(
        conv.weight, (size, size), conv.padding, conv.stride, conv.dilation
    ).item()
    assert bound >= exact * (1 - 1e-12)
    # a bound that is sound but useless would also pass the line above; this one is tight
    assert bound <= 1.4 * exact


def test_conv_bound_is_exact_for_a_circular_convolution():
    """With a 1x1 kernel there is no boundary effect: the bound equals the norm."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 1, bias=False).double()
    bound = operator_norms.conv2d_norm(conv.weight, (5, 5), (0, 0)).item()
    assert bound == pytest.approx(exact_norm(conv, (3, 5, 5)), rel=1e-10)


def test_dense_bound_equals_the_spectral_norm():
    torch.manual_seed(0)
    layer = nn.Linear(20, 7, bias=False).double()
    assert operator_norms.dense_norm(layer.weight).item() == pytest.approx(
        exact_norm(layer, (20,)), rel=1e-12
    )


@pytest.mark.parametrize("kernel,stride,size", [(2, 2, 8), (3, 1, 6), (3, 2, 7), (2, 1, 5)])
def test_avg_pool_bound_is_at_least_the_exact_norm(kernel, stride, size):
    pool = nn.AvgPool2d(kernel, stride)
    exact = exact_norm(pool, (1, size, size))
    bound = operator_norms.avg_pool2d_norm((kernel, kernel), (stride, stride))
    assert bound >= exact * (1 - 1e-12)


def test_global_avg_pool_norm_is_exact():
    pool = nn.AdaptiveAvgPool2d(1)
    assert operator_norms.global_avg_pool_norm((4, 6)) == pytest.approx(
        exact_norm(pool, (2, 4, 6)), rel=1e-12
    )


def test_batchnorm_norm_is_exact():
    bn = nn.BatchNorm2d(3).double().eval()
    bn.running_var.copy_(torch.tensor([0.5, 2.0, 0.1]))
    bn.weight.data.copy_(torch.tensor([1.0, -3.0, 0.2]))
    bn.running_mean.zero_()
    bn.bias.data.zero_()
    assert operator_norms.batchnorm_norm(bn, torch.float64).item() == pytest.approx(
        exact_norm(bn, (3, 2, 2)), rel=1e-9
    )
