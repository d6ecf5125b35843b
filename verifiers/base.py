"""The verifier protocol, the Certificate record and the registry.

A verifier is prepared once per model (`prepare`: work that does not depend on the input,
timed by the harness as *setup*) and then certifies batches (`certify`). It never imports
the harness; the harness finds it through `get_verifier(name)`.

Conventions (see docs/architecture.md):
- inputs are in [0, 1] and epsilon is measured in that pixel space;
- norms are the strings ``"2"`` and ``"inf"``;
- a sample is *certified at eps* when ``verdict == CERTIFIED`` and its prediction equals its
  label; the verifier only proves the prediction is constant on the ball, the harness
  compares with the label.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol, runtime_checkable

import torch

# Bounds need IEEE float32 on GPUs too: TF32 products and convolutions (cuDNN's default)
# round to 10-bit mantissas, errors of 1e-3 relative against the 6e-8 of float32 that the
# float allowances of every verifier (`float_slack`) are sized for.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

ABSTAIN = -1
"""Prediction value for a sample on which the (smoothed) classifier abstains."""

NORMS = ("2", "inf")


class Verdict(str, Enum):
    """What a verifier says about one sample at one epsilon."""

    CERTIFIED = "certified"
    NOT_CERTIFIED = "not_certified"
    FALSIFIED = "falsified"
    ABSTAIN = "abstain"
    TIMEOUT = "timeout"
    ERROR = "error"


VERDICTS = tuple(Verdict)
"""Verdict codes: ``Certificate.verdicts`` holds indices into this tuple."""


def verdict_code(verdict: Verdict) -> int:
    return VERDICTS.index(verdict)


class UnsupportedLayerError(ValueError):
    """The network contains an operation the verifier has no sound rule for."""


@dataclass
class Certificate:
    """The answer of a verifier for a batch of ``n`` samples and an epsilon grid of ``k``.

    prediction: (n,) int64, ``ABSTAIN`` where the method abstains.
    verdicts: (n, k) int8 codes, ``VERDICTS[code]`` is the Verdict of sample i at eps j.
    radius: (n,) float64 certified radius in the requested norm, or None if the method
        yields no radius. 0 where nothing is certified.
    columns: method-specific columns, each (n,) per sample or (n, k) per sample and
        epsilon (``margin_lb``, ``lipschitz_bound``, ``p_a_lower``, ...).
    probabilistic: True when the certificate holds only with probability 1 - alpha.
    alpha: that failure probability, else None.
    counterexamples: for complete verifiers, {(sample i, eps index j): point} with a
        point (1, *input_shape) in the ball of eps j around sample i whose prediction is
        not sample i's (the proof behind a *falsified* verdict).
    """

    prediction: torch.Tensor
    verdicts: torch.Tensor
    radius: torch.Tensor | None = None
    columns: dict[str, torch.Tensor] = field(default_factory=dict)
    probabilistic: bool = False
    alpha: float | None = None
    counterexamples: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)


def check_certify_call(prepared: object, norm: str) -> None:
    """The checks every ``certify`` starts with: prepared first, and a known norm."""
    if prepared is None:
        raise RuntimeError("call prepare(model, input_shape) before certify")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


FLOAT_SLACK = 1e-5


def float_slack(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample allowance for float rounding, subtracted from margin bounds before a
    verdict: FLOAT_SLACK * (1 + max_j |f_j(x)|), float64. A conservative allowance for
    float32 arithmetic, not a rigorous floating-point analysis."""
    return FLOAT_SLACK * (1.0 + logits.detach().abs().amax(dim=1).to(torch.float64))


class Verifier(Protocol):
    """A certification method. Instances hold per-model state set by ``prepare``."""

    name: str

    def prepare(self, model: torch.nn.Module, input_shape: Sequence[int]) -> None:
        """Do the input-independent work for ``model`` (eval mode, inputs of ``input_shape``
        without the batch dimension)."""
        ...

    def certify(
        self, x: torch.Tensor, norm: str, eps: Sequence[float]
    ) -> Certificate:
        """Certify the batch ``x`` (on the model's device) for every epsilon of ``eps``."""
        ...


@runtime_checkable
class SmoothedClassifier(Protocol):
    """A verifier whose certificates are about a smoothed classifier g(x) = argmax_c
    P(f(x + e) = c), e ~ N(0, sigma^2 I): the harness attacks g with noise of ``sigma``
    and asks ``predict`` (Cohen et al.'s PREDICT with ``n`` draws; ``ABSTAIN`` where it
    abstains) which class g gives the attacked point."""

    sigma: float

    def predict(self, x: torch.Tensor, n: int) -> torch.Tensor:
        ...


@runtime_checkable
class Diagnosed(Protocol):
    """A verifier with per-sample figures that explain its certificates without being
    part of them (the local-Lipschitz verifier's sampled estimate of the constant it
    bounds). The harness calls ``diagnostics`` once per cell, after the timed passes, so
    their cost is never counted as certification time; it returns columns as
    ``Certificate.columns`` does, (n,) or (n, k) for the batch ``x`` and the grid ``eps``."""

    def diagnostics(self, x: torch.Tensor, norm: str, eps: Sequence[float]
                    ) -> dict[str, torch.Tensor]:
        ...


VerifierFactory = Callable[..., Verifier]
_REGISTRY: dict[str, tuple[VerifierFactory, str]] = {}


def register(name: str, summary: str) -> Callable[[VerifierFactory], VerifierFactory]:
    """Class decorator: make a verifier constructible by ``name`` with keyword options."""

    def decorate(factory: VerifierFactory) -> VerifierFactory:
        if name in _REGISTRY:
            raise ValueError(f"verifier {name!r} registered twice")
        _REGISTRY[name] = (factory, summary)
        return factory

    return decorate


def verifier_names() -> dict[str, str]:
    """Registered verifier names with a one-line summary each."""
    return {name: summary for name, (_, summary) in sorted(_REGISTRY.items())}


def takes_option(name: str, option: str) -> bool:
    """Whether the registered verifier ``name``'s constructor has a parameter ``option``
    (or takes any keyword)."""
    parameters = inspect.signature(_REGISTRY[name][0]).parameters.values()
    return any(p.name == option or p.kind is p.VAR_KEYWORD for p in parameters)


def get_verifier(name: str, **options: object) -> Verifier:
    """Construct the verifier ``name``; KeyError or TypeError with a clear message if the
    name or an option is unknown."""
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise KeyError(f"unknown verifier {name!r}; known verifiers: {known}")
    factory, _ = _REGISTRY[name]
    try:
        return factory(**options)
    except TypeError as exc:
        raise TypeError(f"bad options for verifier {name!r}: {exc}") from exc
