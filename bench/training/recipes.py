"""The recipe registry: one class per training recipe, registered by name as verifiers are
(`@register_recipe`). A recipe holds its default arguments, checks their values, says what
training must set up for it (``needs``: the network's Lipschitz graph or its bound
propagator) and gives its loss on a batch after ``progress`` epochs; a certified-training
recipe also names its optimiser and training relaxation (what the paradox study and the
report's GLS section read). `train.train_model` runs any of them.

- ``standard``: cross-entropy.
- ``noise`` (Cohen, Rosenfeld and Kolter 2019, Sec. 4: "we train the base classifier with
  Gaussian data augmentation"): cross-entropy on x + N(0, sigma^2 I), not clipped to
  [0, 1], the base classifier randomized smoothing at the same sigma needs.
- ``gloro`` (Leino, Wang and Fredrikson 2021, "Globally-Robust Neural Networks", Sec. 3):
  cross-entropy over the logits plus a bottom logit f_bot = max_{i != j} f_i + eps * K_ji,
  with j the predicted class and K_ji = L(penultimate) * ||w_j - w_i||; the model learns to
  predict a class whose eps-ball is certified. ``eps`` ramps over ``ramp_epochs``,
  linearly from 0 or, with ``ramp_shape = "log"``, as GloRo's library ramps it (`ramp`);
  training eps is usually set above the test eps, as in the paper's scripts.
  ``trades_lambda > 0`` selects the TRADES-style variant (GloRo's library's ``Trades``):
  CE(f) + lambda * KL(softmax(f) || softmax(f, f_bot)).
- ``lmt`` (Tsuzuku, Sato and Sugiyama 2018, "Lipschitz-Margin Training", Alg. 1): add
  sqrt(2) * c * L to every non-target logit, L the bound of the whole network, then
  cross-entropy. ``c`` ramps like GloRo's eps. ``margin = "pairwise"`` adds
  c * L(penultimate) * ||w_i - w_y|| to logit i instead (the paper's Sec. 4.2 bound for
  the last layer, its code's ``lmt-fc`` mode, which its MNIST configuration uses);
  ``scale_by_margin = true`` scales the addition, per sample, by the reference code's
  factor min_i clip((f_y - f_i) / a_i, 0, 1), held constant in the gradient (a_i the
  addition to logit i): a misclassified point gets none, a point with a small margin
  only what closes it.

  Lipschitz bounds inside these two losses are the verifier's own sound bounds
  (`certbench.verifiers.global_lipschitz`), recomputed from the weights at every step and
  differentiated through (``lipschitz = "exact"``), or power-iteration estimates with
  vectors kept between steps (``lipschitz = "power"``, as GloRo's and LMT's own code
  train; much cheaper for wide convolutions). ``power_steps`` sets the steps a training
  step takes (the first step converges 30 undifferentiated steps from a seeded vector;
  resume points keep the vectors): 1 (default) is spectral normalisation's update, not
  differentiated through; with ``power_gradient = "steps"`` (default) more are
  differentiated through, as GloRo's paper snapshot trains (its
  ``spectral_power_all.10``); with ``"final"`` they are constants and the gradient flows
  through the last ||A u|| alone, as GloRo's library trains (its ``PowerMethod``).
  ``power_converge = true`` also runs the vectors to convergence before the first epoch
  and after every epoch, as the library does (its ``UpdatePowerIterates``): a few steps a
  training step lag the top singular vector while the weights move. Certification always
  uses the exact bound.
  BatchNorm enters with its running statistics.
- ``ibp`` (Gowal et al. 2018) and ``crown-ibp`` (Zhang et al. 2020, "Towards stable and
  efficient training of verifiably robust neural networks", Eq. 6-7): with m the lower
  bounds of the margins f_y - f_j over the eps-ball (the engine of
  `certbench.verifiers.bound_propagation`), minimise
  kappa * CE(f(x), y) + (1 - kappa) * CE(-m, y). eps ramps linearly from 0 over
  ``ramp_epochs`` and kappa from 1 to ``kappa_end`` alongside it. For ``crown-ibp`` the
  bound is beta * CROWN-IBP + (1 - beta) * IBP with beta going from 1 to 0 on the same
  ramp, as in the paper; for ``ibp`` it is IBP alone. Bounds use BatchNorm's running
  statistics. ``crown`` is the same loss with CROWN bounds alone (GRAD + CROWN, the
  baseline of the paradox of certified training). For ``crown-ibp``, ``fusion`` chooses
  how the bounds are computed (`loss_fusion`): ``"exact"`` (default: the specification
  folded into the last layer and one IBP pass shared, the same loss to rounding at lower
  cost), ``"none"`` (the plain computation) or ``"lirpa"`` (auto_LiRPA's loss fusion: a
  different, looser bound of the loss, one backward row for all classes).
- ``gls-pgpe`` and ``gls-rgs``: Gaussian Loss Smoothing (Balauca et al. 2025), PGPE and
  randomized gradient smoothing over a named relaxation; see `gls`.

The recipes with the common arguments (all but ``standard`` and the GLS ones) take
``lr_schedule``: ``"cosine"`` (default: cosine annealing from ``lr`` to ``lr_end``,
default 0), ``"constant"`` (LMT's reference: ``lr`` throughout), ``"hold-decay"``
(GloRo's scripts: ``lr`` for the first half of the epochs, then a geometric decay towards
``lr_end``), ``"exponential"`` (GloRo's library: the geometric decay from the first
epoch) or ``"multistep"`` (CROWN-IBP's configs: ``lr``
times ``lr_gamma`` at each epoch of ``lr_milestones``); `train.lr_scheduler` has the
formulas. Arguments added after checkpoints were first named (`NAMING_NEUTRAL`) stay out
of a checkpoint's name while they keep their default. The bound recipes also take
``warmup_epochs``: plain cross-entropy for that many epochs before eps and kappa start
their ramp (CROWN-IBP's ``schedule_start``).

Adding a recipe is one class here with ``@register_recipe``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from certbench.errors import UserError
from certbench.training.gls import GLS_DEFAULTS, make_gls_loss
from certbench.training.gls import validate as validate_gls
from certbench.training.loss_fusion import (
    FUSIONS,
    certified_fraction,
    crown_ibp_margins,
    lirpa_fused_ce,
)
from certbench.verifiers.bound_propagation import Ball, BoundPropagator, margin_spec
from certbench.verifiers.global_lipschitz import LipschitzGraph

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, float], torch.Tensor]
"""loss(model, x, y, progress): progress is the number of epochs done (fractional)."""
RELAXATION_NAMES = {"ibp": "IBP", "crown-ibp": "CROWN-IBP", "crown": "CROWN",
                    "alpha-crown": "alpha-CROWN"}
_COMMON = {"epochs": 40, "lr": 1e-3, "batch_size": 128, "lr_schedule": "cosine", "lr_end": 0.0,
           "lr_milestones": [], "lr_gamma": 0.1}
LR_SCHEDULES = ("cosine", "constant", "hold-decay", "exponential", "multistep")
NAMING_NEUTRAL = {"lr_schedule": "cosine", "lr_end": 0.0, "lr_milestones": [], "lr_gamma": 0.1,
                  "warmup_epochs": 0, "margin": "network", "scale_by_margin": False,
                  "power_steps": 1, "ramp_shape": "linear", "power_gradient": "steps",
                  "power_converge": False}
"""Arguments added after checkpoints were first named, at defaults that train exactly as
before they existed: `provision.model_stem` leaves them out of the hash while they hold
these values, so that a checkpoint trained before keeps its name."""


class Recipe:
    """A training recipe (module docstring). ``needs``: ``"lipschitz"`` (the loss gets a
    `LipschitzGraph`), ``"bounds"`` (a `BoundPropagator`) or None; ``optimiser``: GRAD,
    PGPE or RGS for certified-training recipes, None for the others."""

    name: ClassVar[str]
    defaults: ClassVar[dict[str, Any]]
    needs: ClassVar[str | None] = None
    optimiser: ClassVar[str | None] = None

    def validate(self, args: dict[str, Any]) -> None:
        """Raise ValueError naming an argument whose value the recipe cannot use."""

    def relaxation(self, args: dict[str, Any]) -> str | None:
        """The relaxation certified training bounds with (IBP, CROWN, ...), or None."""
        return None

    def loss(self, args: dict[str, Any], graph: LipschitzGraph | None,
             propagator: BoundPropagator | None, seed: int,
             log: list[torch.Tensor] | None) -> LossFn:
        raise NotImplementedError


RECIPES: dict[str, Recipe] = {}


def register_recipe(cls: type[Recipe]) -> type[Recipe]:
    RECIPES[cls.name] = cls()
    return cls


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise UserError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}")
    return RECIPES[name]


def ramp(value: float, ramp_epochs: float, progress: float, shape: str = "linear") -> float:
    """``value`` ramped over ``ramp_epochs`` epochs, t = progress / ramp_epochs of it done:
    ``"linear"``, value * t from 0; ``"log"`` (GloRo's library, the ``-log-`` transition of
    its schedules), log((e^value - e^s) t + e^s) from s = value / 100: concave, its slope
    falling by a factor e^(value - s) (eps 1.738: 23 % of the way at a tenth of the ramp,
    70 % at half). The library starts at a hundredth of the test eps and steps per epoch
    one epoch behind; here the ramp moves every step."""
    if ramp_epochs <= 0 or progress >= ramp_epochs:
        return value
    t = progress / ramp_epochs
    if shape == "log":
        start = value / 100
        return math.log((math.exp(value) - math.exp(start)) * t + math.exp(start))
    return value * t


@register_recipe
class Standard(Recipe):
    name = "standard"
    defaults = {"epochs": 20, "lr": 1e-3, "batch_size": 128}

    def loss(self, args, graph, propagator, seed, log):
        return lambda model, x, y, progress: F.cross_entropy(model(x), y)


def gloro_logits(logits: torch.Tensor, pairwise_k: torch.Tensor, eps: float) -> torch.Tensor:
    """Logits with GloRo's bottom logit appended: f_bot = max_{i != j} f_i + eps * K_ji,
    j = argmax f (Leino et al. 2021, Eq. 4)."""
    j = logits.argmax(dim=1)
    lifted = logits + eps * pairwise_k[j]
    lifted = lifted.masked_fill(F.one_hot(j, logits.shape[1]).bool(), -math.inf)
    return torch.cat([logits, lifted.max(dim=1, keepdim=True).values], dim=1)


class _LipschitzRecipe(Recipe):
    needs = "lipschitz"

    def validate(self, args):
        if args["lipschitz"] not in ("exact", "power"):
            raise ValueError("lipschitz must be 'exact' or 'power'")
        steps = args["power_steps"]
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"power_steps must be an integer of at least 1, got {steps!r}")
        if steps != 1 and args["lipschitz"] != "power":
            raise ValueError("power_steps applies to lipschitz = 'power' only")
        if args["power_gradient"] not in ("steps", "final"):
            raise ValueError("power_gradient must be 'steps' or 'final'")
        if not isinstance(args["power_converge"], bool):
            raise ValueError("power_converge must be true or false")
        if args["power_converge"] and args["lipschitz"] != "power":
            raise ValueError("power_converge applies to lipschitz = 'power' only")


@register_recipe
class GloRo(_LipschitzRecipe):
    name = "gloro"
    defaults = {**_COMMON, "eps": 0.3, "ramp_epochs": None, "ramp_shape": "linear",
                "trades_lambda": 0.0, "lipschitz": "exact", "power_steps": 1,
                "power_gradient": "steps", "power_converge": False}

    def validate(self, args):
        super().validate(args)
        if args["ramp_shape"] not in ("linear", "log"):
            raise ValueError("ramp_shape must be 'linear' or 'log'")

    def loss(self, args, graph, propagator, seed, log):
        def gloro(model, x, y, progress):
            logits = model(x)
            k = graph.bounds(torch.float32).pairwise()
            eps = ramp(args["eps"], args["ramp_epochs"], progress, args["ramp_shape"])
            extended = gloro_logits(logits, k, eps)
            if args["trades_lambda"] <= 0:
                return F.cross_entropy(extended, y)
            p = F.log_softmax(logits, dim=1)
            q = F.log_softmax(extended, dim=1)[:, :-1]
            kl = (p.exp() * (p - q)).sum(dim=1).mean()
            return F.cross_entropy(logits, y) + args["trades_lambda"] * kl

        return gloro


@register_recipe
class Lmt(_LipschitzRecipe):
    name = "lmt"
    defaults = {**_COMMON, "c": 0.3, "ramp_epochs": None, "lipschitz": "exact",
                "power_steps": 1, "power_gradient": "steps", "power_converge": False,
                "margin": "network", "scale_by_margin": False}

    def validate(self, args):
        super().validate(args)
        if args["margin"] not in ("network", "pairwise"):
            raise ValueError("margin must be 'network' or 'pairwise'")

    def loss(self, args, graph, propagator, seed, log):
        def lmt(model, x, y, progress):
            logits = model(x)
            bounds = graph.bounds(torch.float32)
            c = ramp(args["c"], args["ramp_epochs"], progress)
            others = 1.0 - F.one_hot(y, logits.shape[1]).to(logits.dtype)
            if args["margin"] == "pairwise":
                addition = c * bounds.pairwise()[y] * others
            else:
                addition = math.sqrt(2) * c * bounds.network * others
            if args["scale_by_margin"]:
                addition = addition * margin_factor(logits.detach(), addition.detach(), y)
            return F.cross_entropy(logits + addition, y)

        return lmt


def margin_factor(logits: torch.Tensor, addition: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LMT's reference-code scaling of the addition a (module docstring), per sample:
    min over classes i != y of clip((f_y - f_i) / a_i, 0, 1), read as 1 where
    f_y - f_i >= a_i; shape (n, 1). With the pairwise addition it is min(1, r / c) for a
    correctly classified point of GloRo radius r, and 0 for a misclassified one."""
    gap = logits.gather(1, y[:, None]) - logits
    ratio = torch.where(gap >= addition, 1.0, gap / addition.clamp_min(1e-20))
    ratio = ratio.masked_fill(F.one_hot(y, logits.shape[1]).bool(), 1.0)
    return ratio.clamp(0.0, 1.0).amin(dim=1, keepdim=True)


class _BoundRecipe(Recipe):
    """kappa * CE(f(x), y) + (1 - kappa) * CE(-m, y) with the margin bounds m of
    `margins` (the module docstring's ``ibp`` / ``crown-ibp`` / ``crown``)."""

    needs = "bounds"
    optimiser = "GRAD"

    def validate(self, args):
        if args["norm"] not in ("inf", "2"):
            raise ValueError("norm must be 'inf' or '2'")

    def relaxation(self, args):
        return RELAXATION_NAMES[self.name]

    def margins(self, propagator: BoundPropagator, ball: Ball, y: torch.Tensor, classes: int,
                beta: float, args: dict[str, Any]) -> torch.Tensor:
        spec = margin_spec(y, classes, ball.center.dtype, all_rows=True)
        return propagator.lower_bound(spec, ball, self.name)

    def robust_term(self, propagator, ball, y, logits, beta, args, log) -> torch.Tensor:
        bound = self.margins(propagator, ball, y, logits.shape[1], beta, args)
        if log is not None:
            log.append(certified_fraction(bound.detach(), y))
        return F.cross_entropy(-bound, y)

    def loss(self, args, graph, propagator, seed, log):
        def certified(model, x, y, progress):
            logits = model(x)
            ramped = progress - args["warmup_epochs"]
            if ramped < 0:
                return F.cross_entropy(logits, y)
            share = 1.0 if args["ramp_epochs"] <= 0 else min(1.0, ramped / args["ramp_epochs"])
            kappa = 1.0 + (args["kappa_end"] - 1.0) * share
            ball = Ball(x, args["eps"] * share, args["norm"])
            robust = self.robust_term(propagator, ball, y, logits, 1.0 - share, args, log)
            return kappa * F.cross_entropy(logits, y) + (1 - kappa) * robust

        return certified


_BOUND_COMMON = {**_COMMON, "eps": 0.1, "norm": "inf", "ramp_epochs": None, "warmup_epochs": 0}


@register_recipe
class Ibp(_BoundRecipe):
    name = "ibp"
    defaults = {**_BOUND_COMMON, "kappa_end": 0.5}


@register_recipe
class CrownIbp(_BoundRecipe):
    name = "crown-ibp"
    defaults = {**_BOUND_COMMON, "kappa_end": 0.0, "fusion": "exact"}

    def validate(self, args):
        super().validate(args)
        if args["fusion"] not in FUSIONS:
            raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}")

    def margins(self, propagator, ball, y, classes, beta, args):
        if args["fusion"] == "exact":
            bound, crown_ibp = crown_ibp_margins(propagator, ball, y, classes, crown=beta > 0)
            return bound if crown_ibp is None else beta * crown_ibp + (1 - beta) * bound
        spec = margin_spec(y, classes, ball.center.dtype, all_rows=True)
        bound = propagator.lower_bound(spec, ball, "ibp")
        if beta > 0:
            bound = beta * propagator.lower_bound(spec, ball, "crown-ibp") + (1 - beta) * bound
        return bound

    def robust_term(self, propagator, ball, y, logits, beta, args, log):
        if args["fusion"] == "lirpa":
            return lirpa_fused_ce(propagator, ball, y, logits.shape[1], beta)
        return super().robust_term(propagator, ball, y, logits, beta, args, log)


@register_recipe
class Crown(_BoundRecipe):
    name = "crown"
    defaults = {**_BOUND_COMMON, "kappa_end": 0.0}


@register_recipe
class Noise(Recipe):
    name = "noise"
    defaults = {**_COMMON, "sigma": 0.25}

    def loss(self, args, graph, propagator, seed, log):
        sigma = args["sigma"]
        return lambda model, x, y, progress: F.cross_entropy(
            model(x + sigma * torch.randn_like(x)), y)


class _GlsRecipe(Recipe):
    """Gaussian Loss Smoothing over the relaxation ``bound`` (`gls`)."""

    needs = "bounds"

    def validate(self, args):
        if args["norm"] not in ("inf", "2"):
            raise ValueError("norm must be 'inf' or '2'")
        validate_gls(self.name, args)

    def relaxation(self, args):
        return RELAXATION_NAMES[args["bound"]]

    def loss(self, args, graph, propagator, seed, log):
        return make_gls_loss(self.name, args, propagator, seed, log)


@register_recipe
class GlsPgpe(_GlsRecipe):
    name = "gls-pgpe"
    defaults = GLS_DEFAULTS["gls-pgpe"]
    optimiser = "PGPE"


@register_recipe
class GlsRgs(_GlsRecipe):
    name = "gls-rgs"
    defaults = GLS_DEFAULTS["gls-rgs"]
    optimiser = "RGS"


def _validate_lr_schedule(args: dict[str, Any]) -> None:
    """Raise ValueError unless the learning-rate arguments describe a schedule
    `train.lr_scheduler` can run."""
    schedule = args.get("lr_schedule", "cosine")
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}")
    if schedule in ("hold-decay", "exponential") and not 0 < args["lr_end"] < args["lr"]:
        raise ValueError(f"lr_schedule {schedule!r} needs 0 < lr_end < lr (it decays "
                         "geometrically from lr to lr_end)")
    milestones = args.get("lr_milestones", [])
    if not isinstance(milestones, list) or not all(isinstance(m, int) for m in milestones):
        raise ValueError("lr_milestones must be a list of whole epochs")
    if schedule == "multistep" and (not milestones or milestones != sorted(set(milestones))
                                    or not 0 < milestones[0] <= milestones[-1] < args["epochs"]
                                    or not args["lr_gamma"] > 0):
        raise ValueError("lr_schedule 'multistep' needs lr_milestones: increasing epochs "
                         "between 1 and epochs - 1, and lr_gamma > 0")


def recipe_args(recipe: str, args: dict[str, Any] | None) -> dict[str, Any]:
    """The recipe's hyperparameters: defaults overridden by ``args``; unknown keys and
    values the recipe cannot use refused (UserError); ``ramp_epochs`` None is half the
    epochs."""
    chosen = get_recipe(recipe)
    unknown = set(args or {}) - set(chosen.defaults)
    if unknown:
        raise UserError(f"recipe {recipe!r} has no argument(s) {sorted(unknown)}; it takes "
                        f"{sorted(chosen.defaults)}")
    merged = dict(chosen.defaults, **(args or {}))
    try:
        chosen.validate(merged)
        _validate_lr_schedule(merged)
    except ValueError as exc:
        raise UserError(f"recipe {recipe!r}: {exc}") from exc
    if "ramp_epochs" in merged and merged["ramp_epochs"] is None:
        merged["ramp_epochs"] = merged["epochs"] / 2
    return merged


def make_loss(recipe: str, args: dict[str, Any], graph: LipschitzGraph | None,
              propagator: BoundPropagator | None = None, seed: int = 0,
              log: list[torch.Tensor] | None = None) -> LossFn:
    """The loss of ``recipe`` with its arguments (`recipe_args`). Certified recipes append
    the batch's training-time certified accuracy (at the ramped eps) to ``log``; ``seed``
    seeds the GLS recipes' noise."""
    return get_recipe(recipe).loss(args, graph, propagator, seed, log)


def training_relaxation(recipe: str, args: dict) -> tuple[str, str] | None:
    """(optimiser, relaxation) of a certified-training recipe, None for the others."""
    chosen = RECIPES.get(recipe)
    if chosen is None or chosen.optimiser is None:
        return None
    return chosen.optimiser, chosen.relaxation({**chosen.defaults, **args})
