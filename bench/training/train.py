"""Training recipes, each a loss on a batch given the model and the current step.

- ``standard``: cross-entropy.
- ``gloro`` (Leino, Wang and Fredrikson 2021, "Globally-Robust Neural Networks", Sec. 3):
  cross-entropy over the logits plus a bottom logit
  f_bot = max_{i != j} f_i + eps * K_ji, with j the predicted class and
  K_ji = L(penultimate) * ||w_j - w_i||; the model learns to predict a class whose
  eps-ball is certified. ``eps`` ramps linearly from 0 over ``ramp_epochs``; training eps
  is usually set above the test eps, as in the paper's scripts. ``trades_lambda > 0``
  selects the TRADES-style variant: CE(f) + lambda * KL(softmax(f) || softmax(f, f_bot)).
- ``lmt`` (Tsuzuku, Sato and Sugiyama 2018, "Lipschitz-Margin Training", Alg. 1): add
  sqrt(2) * c * L to every non-target logit, L the bound of the whole network, then
  cross-entropy. ``c`` ramps like GloRo's eps.

Lipschitz bounds inside the losses are the verifier's own sound bounds
(`certbench.verifiers.global_lipschitz`), recomputed from the weights at every step and
differentiated through (``lipschitz = "exact"``), or power-iteration estimates with
vectors kept between steps (``lipschitz = "power"``, as GloRo's and LMT's own code train;
much cheaper for wide convolutions). Certification always uses the exact bound.
BatchNorm enters with its running statistics.

- ``ibp`` (Gowal et al. 2018) and ``crown-ibp`` (Zhang et al. 2020, "Towards stable and
  efficient training of verifiably robust neural networks", Eq. 6-7): with m the lower
  bounds of the margins f_y - f_j over the eps-ball (the engine of
  `certbench.verifiers.bound_propagation`), minimise
  kappa * CE(f(x), y) + (1 - kappa) * CE(-m, y). eps ramps linearly from 0 over
  ``ramp_epochs`` and kappa from 1 to ``kappa_end`` alongside it. For ``crown-ibp`` the
  bound is beta * CROWN-IBP + (1 - beta) * IBP with beta going from 1 to 0 on the same
  ramp, as in the paper; for ``ibp`` it is IBP alone. Bounds use BatchNorm's running
  statistics. ``crown`` is the same loss with CROWN bounds alone (intermediate bounds by
  CROWN too; GRAD + CROWN, the baseline of the paradox of certified training). For
  ``crown-ibp``, ``fusion`` chooses how the bounds are computed (`certbench.training.loss_fusion`):
  ``"exact"`` (default: the specification folded into the last layer and one IBP pass
  shared, the same loss to rounding at lower cost), ``"none"`` (the plain computation) or
  ``"lirpa"`` (auto_LiRPA's loss fusion: a different, looser bound of the loss, one
  backward row for all classes).
- ``gls-pgpe`` and ``gls-rgs``: Gaussian Loss Smoothing (Balauca et al. 2025), PGPE and
  randomized gradient smoothing over a named relaxation; see `certbench.training.gls`.
- ``noise`` (Cohen, Rosenfeld and Kolter 2019, Sec. 4: "we train the base classifier with
  Gaussian data augmentation"): cross-entropy on x + N(0, sigma^2 I), not clipped to
  [0, 1], the base classifier randomized smoothing at the same sigma needs.

Training is seeded, shows a progress bar, and resumes from the last finished epoch: the
state is saved after every epoch to ``STEM.train-state.pt`` (tensors and numbers only,
reloaded with ``weights_only=True``) and removed when the checkpoint is written.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from certbench.atomic import write_atomic
from certbench.data import Dataset
from certbench.errors import UserError
from certbench.models import build_model, checkpoint_paths, save_checkpoint
from certbench.provenance import library_versions
from certbench.training.gls import GLS_DEFAULTS, make_gls_loss
from certbench.training.gls import validate as validate_gls
from certbench.training.loss_fusion import (
    FUSIONS,
    certified_fraction,
    crown_ibp_margins,
    lirpa_fused_ce,
)
from certbench.verifiers.bound_propagation import Ball, BoundPropagator, TracedNetwork
from certbench.verifiers.global_lipschitz import LipschitzGraph

RECIPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "standard": {"epochs": 20, "lr": 1e-3, "batch_size": 128},
    "gloro": {
        "epochs": 40, "lr": 1e-3, "batch_size": 128, "eps": 0.3, "ramp_epochs": None,
        "trades_lambda": 0.0, "lipschitz": "exact",
    },
    "lmt": {
        "epochs": 40, "lr": 1e-3, "batch_size": 128, "c": 0.3, "ramp_epochs": None,
        "lipschitz": "exact",
    },
    "ibp": {
        "epochs": 40, "lr": 1e-3, "batch_size": 128, "eps": 0.1, "norm": "inf",
        "ramp_epochs": None, "kappa_end": 0.5,
    },
    "crown-ibp": {
        "epochs": 40, "lr": 1e-3, "batch_size": 128, "eps": 0.1, "norm": "inf",
        "ramp_epochs": None, "kappa_end": 0.0, "fusion": "exact",
    },
    "crown": {
        "epochs": 40, "lr": 1e-3, "batch_size": 128, "eps": 0.1, "norm": "inf",
        "ramp_epochs": None, "kappa_end": 0.0,
    },
    "noise": {"epochs": 40, "lr": 1e-3, "batch_size": 128, "sigma": 0.25},
    **GLS_DEFAULTS,
}
CERTIFIED_RECIPES = ("ibp", "crown-ibp", "crown", *GLS_DEFAULTS)
RECIPES = tuple(RECIPE_DEFAULTS)


def recipe_args(recipe: str, args: dict[str, Any] | None) -> dict[str, Any]:
    """The recipe's hyperparameters: defaults overridden by ``args``; unknown keys refused."""
    if recipe not in RECIPE_DEFAULTS:
        raise UserError(f"unknown recipe {recipe!r}; choose one of: {', '.join(RECIPES)}")
    defaults = RECIPE_DEFAULTS[recipe]
    unknown = set(args or {}) - set(defaults)
    if unknown:
        raise UserError(
            f"recipe {recipe!r} has no argument(s) {sorted(unknown)}; it takes {sorted(defaults)}"
        )
    merged = dict(defaults, **(args or {}))
    if merged.get("norm", "inf") not in ("inf", "2"):
        raise UserError(f"recipe {recipe!r}: norm must be 'inf' or '2'")
    if merged.get("lipschitz", "exact") not in ("exact", "power"):
        raise UserError(f"recipe {recipe!r}: lipschitz must be 'exact' or 'power'")
    if merged.get("fusion", "exact") not in FUSIONS:
        raise UserError(f"recipe {recipe!r}: fusion must be one of {', '.join(FUSIONS)}")
    if recipe in GLS_DEFAULTS:
        try:
            validate_gls(recipe, merged)
        except ValueError as exc:
            raise UserError(f"recipe {recipe!r}: {exc}") from exc
    if "ramp_epochs" in merged and merged["ramp_epochs"] is None:
        merged["ramp_epochs"] = merged["epochs"] / 2
    return merged


def gloro_logits(logits: torch.Tensor, pairwise_k: torch.Tensor, eps: float) -> torch.Tensor:
    """Logits with GloRo's bottom logit appended: f_bot = max_{i != j} f_i + eps * K_ji,
    j = argmax f (Leino et al. 2021, Eq. 4)."""
    j = logits.argmax(dim=1)
    lifted = logits + eps * pairwise_k[j]
    lifted = lifted.masked_fill(F.one_hot(j, logits.shape[1]).bool(), -math.inf)
    return torch.cat([logits, lifted.max(dim=1, keepdim=True).values], dim=1)


def _ramp(value: float, ramp_epochs: float, progress: float) -> float:
    return value if ramp_epochs <= 0 else value * min(1.0, progress / ramp_epochs)


LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, float], torch.Tensor]


def make_loss(
    recipe: str,
    args: dict[str, Any],
    graph: LipschitzGraph | None,
    propagator: BoundPropagator | None = None,
    seed: int = 0,
    log: list[float] | None = None,
) -> LossFn:
    """The loss of ``recipe``; ``progress`` is the number of epochs done (fractional).
    Certified recipes append the batch's training-time certified accuracy (at the ramped
    eps) to ``log``; ``seed`` seeds the GLS recipes' noise."""
    if recipe == "standard":
        return lambda model, x, y, progress: F.cross_entropy(model(x), y)
    if recipe == "noise":
        sigma = args["sigma"]
        return lambda model, x, y, progress: F.cross_entropy(
            model(x + sigma * torch.randn_like(x)), y
        )
    if recipe == "gloro":

        def gloro(model, x, y, progress):
            logits = model(x)
            k = graph.bounds(torch.float32).pairwise()
            extended = gloro_logits(logits, k, _ramp(args["eps"], args["ramp_epochs"], progress))
            if args["trades_lambda"] <= 0:
                return F.cross_entropy(extended, y)
            p = F.log_softmax(logits, dim=1)
            q = F.log_softmax(extended, dim=1)[:, :-1]
            kl = (p.exp() * (p - q)).sum(dim=1).mean()
            return F.cross_entropy(logits, y) + args["trades_lambda"] * kl

        return gloro
    if recipe in GLS_DEFAULTS:
        return make_gls_loss(recipe, args, propagator, seed, log)
    if recipe in ("ibp", "crown-ibp", "crown"):
        fusion = args.get("fusion", "none")

        def certified(model, x, y, progress):
            logits = model(x)
            ramp = 1.0 if args["ramp_epochs"] <= 0 else min(1.0, progress / args["ramp_epochs"])
            kappa = 1.0 + (args["kappa_end"] - 1.0) * ramp
            ball = Ball(x, args["eps"] * ramp, args["norm"])
            beta = 1.0 - ramp
            if recipe == "crown-ibp" and fusion == "lirpa":
                robust = lirpa_fused_ce(propagator, ball, y, logits.shape[1], beta)
                return kappa * F.cross_entropy(logits, y) + (1 - kappa) * robust
            if recipe == "crown-ibp" and fusion == "exact":
                bound, crown_ibp = crown_ibp_margins(propagator, ball, y, logits.shape[1],
                                                     crown=beta > 0)
                if crown_ibp is not None:
                    bound = beta * crown_ibp + (1 - beta) * bound
            else:
                eye = torch.eye(logits.shape[1], device=x.device, dtype=x.dtype)
                spec = eye[y][:, None, :] - eye[None]  # rows e_y - e_j, all j (row y is 0)
                bound = propagator.lower_bound(spec, ball, "crown" if recipe == "crown"
                                               else "ibp")
                if recipe == "crown-ibp" and beta > 0:
                    bound = beta * propagator.lower_bound(spec, ball, "crown-ibp") + (
                        1 - beta) * bound
            if log is not None:
                log.append(certified_fraction(bound.detach(), y))
            robust = F.cross_entropy(-bound, y)
            return kappa * F.cross_entropy(logits, y) + (1 - kappa) * robust

        return certified
    if recipe == "lmt":

        def lmt(model, x, y, progress):
            logits = model(x)
            lip = graph.bounds(torch.float32).network
            c = _ramp(args["c"], args["ramp_epochs"], progress)
            others = 1.0 - F.one_hot(y, logits.shape[1]).to(logits.dtype)
            return F.cross_entropy(logits + math.sqrt(2) * c * lip * others, y)

        return lmt
    raise UserError(f"unknown recipe {recipe!r}; choose one of: {', '.join(RECIPES)}")


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    device = next(model.parameters()).device
    correct = sum(
        (model(x[i : i + batch].to(device)).argmax(1).cpu() == y[i : i + batch]).sum().item()
        for i in range(0, len(y), batch)
    )
    return correct / len(y)


def train_model(
    stem: str | Path,
    dataset: Dataset,
    arch: str,
    arch_args: dict[str, Any] | None,
    recipe: str,
    args: dict[str, Any] | None = None,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train and save a checkpoint at ``stem``; resume from ``STEM.train-state.pt``."""
    if len(dataset.x_train) == 0:
        raise UserError(f"dataset {dataset.name!r} has no training images; train on another "
                        "dataset or give the model as a checkpoint or an ONNX file")
    hp = recipe_args(recipe, args)
    torch.manual_seed(seed)
    model = build_model(
        arch, dataset.input_shape, dataset.num_classes, dataset.mean, dataset.std, arch_args
    ).to(device)
    graph = None
    if recipe in ("gloro", "lmt"):
        graph = LipschitzGraph(
            model, dataset.input_shape, power_iteration=hp["lipschitz"] == "power"
        )
    propagator = None
    if recipe in CERTIFIED_RECIPES:
        propagator = BoundPropagator(TracedNetwork(model, dataset.input_shape))
    log: list[float] = []  # training-time certified accuracy per step (certified recipes)
    loss_fn = make_loss(recipe, hp, graph, propagator, seed, log)
    optimizer = torch.optim.Adam(model.parameters(), lr=hp["lr"])
    epochs = int(hp["epochs"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    weights_path, _ = checkpoint_paths(stem)
    state_path = weights_path.with_name(weights_path.stem + ".train-state.pt")
    start, elapsed = 0, 0.0
    generator = torch.Generator().manual_seed(seed)
    if state_path.exists():
        state = torch.load(state_path, weights_only=True, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        start, elapsed = int(state["epoch"]), float(state["elapsed"])

    n, batch = len(dataset.y_train), int(hp["batch_size"])
    steps = math.ceil(n / batch)
    bar = tqdm(
        range(start, epochs), initial=start, total=epochs, desc=f"train {weights_path.stem}",
        unit="epoch", disable=not progress,
    )
    for epoch in bar:
        began = time.perf_counter()
        model.train()
        order = torch.randperm(n, generator=generator)
        total = 0.0
        del log[:]
        for step in range(steps):
            idx = order[step * batch : (step + 1) * batch]
            x, y = dataset.x_train[idx].to(device), dataset.y_train[idx].to(device)
            loss = loss_fn(model, x, y, epoch + step / steps)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
        scheduler.step()
        elapsed += time.perf_counter() - began
        shown = {"loss": f"{total / steps:.4f}"}
        if log:
            shown["cert"] = f"{sum(log) / len(log):.3f}"
        bar.set_postfix(**shown)
        state = {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
            "epoch": epoch + 1, "elapsed": elapsed,
        }
        write_atomic(state_path, lambda path, state=state: torch.save(state, path))

    model.eval()
    card = {
        "arch": arch,
        "arch_args": arch_args or {},
        "dataset": dataset.name,
        "input_shape": list(dataset.input_shape),
        "num_classes": dataset.num_classes,
        "normalization": {"mean": list(dataset.mean), "std": list(dataset.std)},
        "recipe": recipe,
        "recipe_args": hp,
        "seed": seed,
        "clean_acc": accuracy(model, dataset.x_test, dataset.y_test),
        "train_time_s": round(elapsed, 3),
        "train_device": str(device),
        "versions": library_versions(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    save_checkpoint(model.cpu(), card, stem)
    state_path.unlink(missing_ok=True)
    return model, card


OPTIMISER = {"ibp": "GRAD", "crown-ibp": "GRAD", "crown": "GRAD", "gls-pgpe": "PGPE",
             "gls-rgs": "RGS"}
RELAXATION = {"ibp": "IBP", "crown-ibp": "CROWN-IBP", "crown": "CROWN",
              "alpha-crown": "alpha-CROWN"}


def training_relaxation(recipe: str, args: dict) -> tuple[str, str] | None:
    """(optimiser, relaxation) of a certified-training recipe, None for the others."""
    if recipe not in OPTIMISER:
        return None
    bound = args.get("bound", GLS_DEFAULTS["gls-rgs"]["bound"]) if recipe in GLS_DEFAULTS \
        else recipe
    return OPTIMISER[recipe], RELAXATION[bound]
