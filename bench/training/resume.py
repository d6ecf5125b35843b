"""Where an interrupted training run resumes: two files beside the checkpoint, rewritten
after every epoch and removed when the checkpoint is written.

- ``STEM.resume.safetensors``, the *resume point*: the float32 weights, the data
  order's random state and, for power-iteration Lipschitz estimates, the kept vectors
  (`LipschitzGraph.vectors`) as tensors; the finished epochs, the training seconds, the
  hyperparameters and the learning-rate scheduler's state as metadata. It holds no
  optimiser state, so a network that takes several sessions to train can be committed
  mid-way (the zoo keeps optimiser states out of the history) and resumed on a fresh
  clone.
- ``STEM.optimizer.pt``, Adam's moments after the same epoch (git-ignored; tensors and
  numbers only, reloaded with ``weights_only=True``). With it the resumed run is the
  uninterrupted one, bit for bit. Without it (a fresh clone), or when it belongs to
  another epoch, Adam starts its moments from zero at the scheduled learning rate: the
  recipe is unchanged, but the run is not the uninterrupted one, so a warning says so.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from certbench.atomic import write_atomic
from certbench.errors import UserError
from certbench.training.recipes import NAMING_NEUTRAL

_MODEL, _GENERATOR, _VECTOR = "model.", "generator", "power."


def paths(weights: Path) -> tuple[Path, Path]:
    """(resume point, optimizer state) beside the checkpoint's weights file."""
    return (weights.with_name(weights.stem + ".resume.safetensors"),
            weights.with_name(weights.stem + ".optimizer.pt"))


def save(weights: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
         scheduler: torch.optim.lr_scheduler.LRScheduler, generator: torch.Generator,
         epoch: int, elapsed: float, hp: dict[str, Any],
         vectors: dict[int, torch.Tensor] | None = None) -> None:
    """Write both files after ``epoch`` finished epochs (the optimizer state first, so a
    resume point never names an epoch its optimizer file has not reached); ``vectors``:
    the power iteration's kept vectors by node, where the loss has them."""
    point, moments = paths(weights)
    state = {"optimizer": optimizer.state_dict(), "epoch": epoch}
    write_atomic(moments, lambda path: torch.save(state, path))
    tensors = {_MODEL + k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors[_GENERATOR] = generator.get_state()
    tensors |= {f"{_VECTOR}{i}": v.detach().cpu().contiguous()
                for i, v in (vectors or {}).items()}
    metadata = {"epoch": str(epoch), "elapsed": repr(elapsed), "hp": json.dumps(hp),
                "scheduler": json.dumps(scheduler.state_dict())}
    write_atomic(point, lambda path: save_file(tensors, str(path), metadata=metadata))


def load(weights: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
         scheduler: torch.optim.lr_scheduler.LRScheduler, generator: torch.Generator,
         hp: dict[str, Any], vectors: dict[int, torch.Tensor] | None = None,
         ) -> tuple[int, float]:
    """Restore a resume point if there is one; returns (finished epochs, training
    seconds), (0, 0.0) for a fresh run. UserError if it was saved with other
    hyperparameters (an argument added since, `NAMING_NEUTRAL`, counts at its default).
    ``vectors`` (the power iteration's, by node) is filled with those the point holds; a
    point saved without them (before they were saved) restarts them, with a warning."""
    point, moments = paths(weights)
    if not point.exists():
        return 0, 0.0
    with safe_open(str(point), framework="pt") as found:
        metadata = found.metadata()
        tensors = {key: found.get_tensor(key) for key in found.keys()}
    saved = json.loads(metadata["hp"])
    added_since = {k: v for k, v in NAMING_NEUTRAL.items() if k in hp and k not in saved}
    if {**added_since, **saved} != json.loads(json.dumps(hp)):
        raise UserError(f"{point} was saved by a run with other hyperparameters "
                        f"({metadata['hp']}); delete it to train anew with {hp}")
    epoch = int(metadata["epoch"])
    device = next(model.parameters()).device
    model.load_state_dict({k[len(_MODEL):]: v.to(device) for k, v in tensors.items()
                           if k.startswith(_MODEL)})
    generator.set_state(tensors[_GENERATOR])
    if vectors is not None:
        kept = {int(k[len(_VECTOR):]): v.to(device) for k, v in tensors.items()
                if k.startswith(_VECTOR)}
        vectors.update(kept)
        if not kept:
            warnings.warn(f"resuming {weights.stem} after epoch {epoch} without the power "
                          "iteration's vectors (the point predates them): they restart from a "
                          "seeded vector, so the run differs from an uninterrupted one",
                          stacklevel=2)
    scheduler.load_state_dict(json.loads(metadata["scheduler"]))
    state = torch.load(moments, weights_only=True, map_location="cpu") \
        if moments.exists() else None
    if state is not None and state["epoch"] == epoch:
        optimizer.load_state_dict(state["optimizer"])
    else:
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
            group["lr"] = lr
        why = "from another epoch" if state is not None else "absent"
        warnings.warn(f"resuming {weights.stem} after epoch {epoch} without Adam's moments "
                      f"for that epoch ({moments} is {why}): they restart from zero, so the "
                      "run differs from an uninterrupted one", stacklevel=2)
    return epoch, float(metadata["elapsed"])


def finished_epochs(weights: Path) -> int | None:
    """The epochs a resume point beside ``weights`` has finished, None without one."""
    point, _ = paths(weights)
    if not point.exists():
        return None
    with safe_open(str(point), framework="pt") as found:
        return int(found.metadata()["epoch"])


def remove(weights: Path) -> None:
    for path in paths(weights):
        path.unlink(missing_ok=True)
