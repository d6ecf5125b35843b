"""The same linear-relaxation methods through auto_LiRPA (Xu et al. 2020), when a usable
version is installed: ``lirpa:ibp``, ``lirpa:crown``, ``lirpa:crown-ibp``,
``lirpa:alpha-crown``.

auto_LiRPA is optional. PyPI only has 0.3 (2022), which does not import with current
torch and numpy; releases >= 0.4 live in its public repository (see the README for an
install that keeps your torch). Without a usable version these verifiers are still
listed, and preparing one fails with a one-line reason, recorded on the cell.

The input set matches certbench's engine: for l_inf the ball intersected with [0, 1]
(auto_LiRPA's x_L / x_U); for l2 auto_LiRPA bounds the plain ball, so these cells are
compared with the engine's ``clip = false``.

l2 balls are refused unless the network's first operation is a Linear or Conv2d layer
(a Flatten before it is fine). auto_LiRPA (seen with 0.7.1) sets x_L = x_U = x for
non-l_inf perturbations and relies on the first linear layer to apply the norm; with a
normalisation layer first, the perturbation is lost and the bounds are unsound (IBP
returns the clean margin at every eps; CROWN's bound exceeds margins that PGD reaches).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from certbench.verifiers.base import (
    Certificate,
    Verdict,
    check_certify_call,
    float_slack,
    register,
    verdict_code,
)
from certbench.verifiers.bound_propagation.graph import TracedNetwork
from certbench.verifiers.bound_propagation.operators import Conv, Dense, Reshape
from certbench.verifiers.bound_propagation.verifier import margin_spec

MINIMUM_VERSION = (0, 4)
_METHOD_NAMES = {
    "ibp": "IBP",
    "crown-ibp": "CROWN-IBP",
    "crown": "CROWN",
    "alpha-crown": "alpha-CROWN",
}


def lirpa_status() -> tuple[bool, str]:
    """(usable, version or the reason it is not), without raising."""
    try:
        import auto_LiRPA
    except Exception as exc:  # ImportError, or an old release failing on import
        return False, f"auto_LiRPA is not importable ({type(exc).__name__}: {exc})"
    version = str(getattr(auto_LiRPA, "__version__", "0"))
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if parts < MINIMUM_VERSION:
        return False, f"auto_LiRPA {version} is too old: install >= 0.4 from its repository"
    return True, version


class LirpaVerifier:
    """Margins bounded by auto_LiRPA's BoundedModule with ``method``."""

    def __init__(
        self, method: str, alpha_iterations: int = 20, alpha_lr: float = 0.1,
        conv_mode: str = "matrix",
    ):
        if method not in _METHOD_NAMES:
            raise ValueError(f"method must be one of {tuple(_METHOD_NAMES)}, got {method!r}")
        self.method = method
        self.name = f"lirpa:{method}"
        self.alpha_iterations, self.alpha_lr = alpha_iterations, alpha_lr
        self.conv_mode = conv_mode  # "patches" fails on 28x28 CNNs with 0.7.1 and torch 2.13
        self.module = None

    def prepare(self, model: nn.Module, input_shape: Sequence[int]) -> None:
        usable, detail = lirpa_status()
        if not usable:
            raise RuntimeError(detail)
        from auto_LiRPA import BoundedModule

        param = next(model.parameters())
        example = torch.zeros(1, *input_shape, dtype=param.dtype, device=param.device)
        options = {"optimize_bound_args": {
            "iteration": self.alpha_iterations, "lr_alpha": self.alpha_lr,
        }, "verbosity": 0, "conv_mode": self.conv_mode}
        self.model = model.eval()
        self.l2_safe = _first_layer_is_linear(model, input_shape)
        self.module = BoundedModule(model, example, device=param.device, bound_opts=options,
                                    verbose=False)

    def margin_lower_bounds(
        self, x: torch.Tensor, spec: torch.Tensor, eps: float, norm: str
    ) -> torch.Tensor:
        from auto_LiRPA import BoundedTensor, PerturbationLpNorm

        if norm == "inf":
            ptb = PerturbationLpNorm(norm=math.inf, eps=eps, x_L=(x - eps).clamp(min=0),
                                     x_U=(x + eps).clamp(max=1))
        elif not self.l2_safe:
            raise ValueError(
                "auto_LiRPA's l2 bounds are unsound when the first layer is not Linear or "
                "Conv2d (here: a normalisation layer); use the engine's verifiers for l2"
            )
        else:
            ptb = PerturbationLpNorm(norm=2, eps=eps)
        bounded = BoundedTensor(x, ptb)
        with torch.enable_grad():  # alpha-CROWN optimises: a caller's no_grad would stop it
            lower, _ = self.module.compute_bounds(
                x=(bounded,), C=spec, method=_METHOD_NAMES[self.method], bound_upper=False
            )
        return lower.detach()

    def certify(self, x: torch.Tensor, norm: str, eps: Sequence[float]) -> Certificate:
        check_certify_call(self.module, norm)
        with torch.no_grad():
            logits = self.model(x)
        prediction = logits.argmax(1)
        spec = margin_spec(prediction, logits.shape[1]).to(x.dtype)
        slack = float_slack(logits)
        verdicts = torch.empty((len(x), len(eps)), dtype=torch.int8)
        margin_lb = torch.empty((len(x), len(eps)), dtype=torch.float64)
        for k, e in enumerate(eps):
            lb = self.margin_lower_bounds(x, spec, e, norm).min(dim=1).values.double().cpu()
            margin_lb[:, k] = lb
            verdicts[:, k] = torch.where(
                lb > slack.cpu(), verdict_code(Verdict.CERTIFIED),
                verdict_code(Verdict.NOT_CERTIFIED),
            ).to(torch.int8)
        return Certificate(prediction=prediction.cpu(), verdicts=verdicts,
                           columns={"margin_lb": margin_lb})


def _first_layer_is_linear(model: nn.Module, input_shape: Sequence[int]) -> bool:
    nodes = TracedNetwork(model, input_shape).nodes[1:]
    while nodes and isinstance(nodes[0].op, Reshape):
        nodes = nodes[1:]
    return bool(nodes) and isinstance(nodes[0].op, (Dense, Conv))


def _factory(method: str):
    def make(**options) -> LirpaVerifier:
        return LirpaVerifier(method, **options)

    return make


for _method in _METHOD_NAMES:
    register(f"lirpa:{_method}", f"{_method} through auto_LiRPA (optional backend)")(
        _factory(_method)
    )
