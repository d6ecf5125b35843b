"""Loss fusion in CROWN-IBP training: one training step's certified loss (the crown-ibp
recipe's mix 0.5 * CROWN-IBP + 0.5 * IBP margins, then CE) and its backward pass, unfused
("none"), exactly fused ("exact", the default: the same loss) and auto_LiRPA's fused bound
("lirpa", a different loss), on the digits MLP (64, 64) with its 10 classes and with a
synthetic 200-class head, batch 128, l_inf eps 0.05. The ratio none / exact at each class
count is the saving of the default; lirpa's shows what the looser bound would buy. And one
exactly fused step on the zoo's grey-scale CNNs (CROWN-IBP's model_cnn_2layer, widths 1 and
2, batch 256), where the backward pass runs through a convolution into one channel.

Run: pytest tests/benchmarks/test_loss_fusion_speed.py --benchmark-enable
     --benchmark-group-by=param:classes --benchmark-columns=median,stddev,rounds
"""

from __future__ import annotations

import pytest
import torch

from certbench.models import build_model
from certbench.training.loss_fusion import crown_ibp_margins, lirpa_fused_ce, robust_ce
from certbench.verifiers.bound_propagation import Ball, BoundPropagator, TracedNetwork
from conftest import bench_rounds

SHAPE = (1, 8, 8)
BATCH, EPS, BETA = 128, 0.05, 0.5


def _setup(classes: int):
    torch.manual_seed(0)
    model = build_model("mlp", SHAPE, classes, (0.3,), (0.4,), {"widths": [64, 64]})
    prop = BoundPropagator(TracedNetwork(model, SHAPE))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(BATCH, *SHAPE, generator=g)
    y = torch.randint(0, classes, (BATCH,), generator=g)
    return model, prop, Ball(x, EPS, "inf"), y


def _step(model, prop, ball, y, classes, fusion):
    model.zero_grad(set_to_none=True)
    if fusion == "lirpa":
        loss = lirpa_fused_ce(prop, ball, y, classes, BETA)
    else:
        ibp, crown_ibp = crown_ibp_margins(prop, ball, y, classes, True, fusion)
        loss = robust_ce(BETA * crown_ibp + (1 - BETA) * ibp, y)
    loss.backward()
    return loss.detach()


def _timed_step(benchmark, *args):
    """`_step` once in the plain test run; 2 warm-up and 10 timed rounds under
    --benchmark-enable. Returns the loss."""
    return benchmark.pedantic(_step, args=args,
                              rounds=1 if benchmark.disabled else bench_rounds(10), iterations=1,
                              warmup_rounds=0 if benchmark.disabled else 2)


@pytest.mark.parametrize("fusion", ["none", "exact", "lirpa"])
@pytest.mark.parametrize("classes", [10, 200])
def test_crown_ibp_loss_step(benchmark, classes, fusion):
    model, prop, ball, y = _setup(classes)
    loss = _timed_step(benchmark, model, prop, ball, y, classes, fusion)
    benchmark.extra_info["loss"] = float(loss)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("width", [1, 2])
def test_crown_ibp_step_on_a_grey_scale_cnn(benchmark, width):
    """One CROWN-IBP training step (exact fusion) on CROWN-IBP's model_cnn_2layer at the
    zoo's widths (1: linear 128, 2: linear 256), MNIST-sized inputs, batch 256, l_inf 0.2:
    the backward pass through a convolution into one input channel, recorded by autograd."""
    torch.manual_seed(0)
    shape = (1, 28, 28)
    model = build_model("cnn-small", shape, 10, (0.1307,), (0.3081,),
                        {"width": width, "linear_size": 128 * width})
    prop = BoundPropagator(TracedNetwork(model, shape))
    g = torch.Generator().manual_seed(0)
    ball = Ball(torch.rand(256, *shape, generator=g), 0.2, "inf")
    y = torch.randint(0, 10, (256,), generator=g)
    assert torch.isfinite(_timed_step(benchmark, model, prop, ball, y, 10, "exact"))
