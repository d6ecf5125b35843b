"""Training a network with a recipe (`recipes`: the registry of recipes, each with its
defaults, setup and loss): Adam with the recipe's learning-rate schedule over its
epochs (`lr_scheduler`), seeded, with a progress bar, written as a checkpoint
(safetensors + JSON card). The training set is moved to the device once and the loss is
summed there, so a GPU step waits for no host transfer or synchronisation.

Training resumes from the last finished epoch: `resume` saves the state after every epoch
(a committable resume point without optimiser state, and Adam's moments beside it) and
removes it when the checkpoint is written. A Lipschitz recipe with ``power_converge`` has
its power-iteration vectors run to convergence before the first epoch and after each
(`LipschitzGraph.converge`), so each resume point holds converged vectors.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from certbench.data import Dataset
from certbench.errors import UserError
from certbench.models import build_model, checkpoint_paths, save_checkpoint
from certbench.provenance import library_versions
from certbench.training import resume
from certbench.training.recipes import get_recipe, make_loss, recipe_args
from certbench.verifiers.bound_propagation import BoundPropagator, TracedNetwork
from certbench.verifiers.global_lipschitz import LipschitzGraph


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    device = next(model.parameters()).device
    correct = sum(
        (model(x[i : i + batch].to(device)).argmax(1).cpu() == y[i : i + batch]).sum().item()
        for i in range(0, len(y), batch)
    )
    return correct / len(y)


def lr_scheduler(optimizer: torch.optim.Optimizer, hp: dict[str, Any],
                 epochs: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The recipe's ``lr_schedule`` as a factor of ``lr`` for epoch e (0-based, stepped
    once per epoch; E epochs): ``cosine``, annealing to ``lr_end``; ``constant``, 1;
    ``multistep``,
    lr_gamma^(number of lr_milestones <= e); ``hold-decay``, 1 for e <= E/2, then
    (lr_end / lr)^((e - E/2) / (E/2)), the geometric decay that would reach lr_end at e = E
    (GloRo's scripts); ``exponential``, (lr_end / lr)^(e / E), that decay from the start
    (GloRo's library)."""
    schedule = hp.get("lr_schedule", "cosine")
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(epochs, 1), eta_min=hp.get("lr_end", 0.0))
    if schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1.0)
    if schedule == "multistep":
        milestones, gamma = list(hp["lr_milestones"]), hp["lr_gamma"]
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda e: gamma ** sum(m <= e for m in milestones))
    half, ratio = epochs / 2, hp["lr_end"] / hp["lr"]
    if schedule == "exponential":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: ratio ** (e / epochs))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda e: 1.0 if e <= half else ratio ** ((e - half) / half))


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
    """Train and save a checkpoint at ``stem``, resuming from its resume point (`resume`)."""
    if len(dataset.x_train) == 0:
        raise UserError(f"dataset {dataset.name!r} has no training images; train on another "
                        "dataset or give the model as a checkpoint or an ONNX file")
    hp = recipe_args(recipe, args)
    needs = get_recipe(recipe).needs
    torch.manual_seed(seed)
    model = build_model(
        arch, dataset.input_shape, dataset.num_classes, dataset.mean, dataset.std, arch_args
    ).to(device)
    graph = None
    if needs == "lipschitz":
        graph = LipschitzGraph(
            model, dataset.input_shape, power_iteration=hp["lipschitz"] == "power",
            power_steps=hp["power_steps"], power_gradient=hp["power_gradient"],
        )
    propagator = None
    if needs == "bounds":
        propagator = BoundPropagator(TracedNetwork(model, dataset.input_shape))
    log: list[torch.Tensor] = []  # training-time certified share per step (certified recipes)
    loss_fn = make_loss(recipe, hp, graph, propagator, seed, log)
    optimizer = torch.optim.Adam(model.parameters(), lr=hp["lr"])
    epochs = int(hp["epochs"])
    scheduler = lr_scheduler(optimizer, hp, epochs)
    weights_path, _ = checkpoint_paths(stem)
    generator = torch.Generator().manual_seed(seed)
    vectors = graph.vectors if graph is not None and graph.power_iteration else None
    start, elapsed = resume.load(weights_path, model, optimizer, scheduler, generator, hp,
                                 vectors)
    converge = graph.converge if hp.get("power_converge") else None
    if converge is not None:
        converge()

    x_train, y_train = dataset.x_train.to(device), dataset.y_train.to(device)
    n, batch = len(dataset.y_train), int(hp["batch_size"])
    steps = math.ceil(n / batch)
    bar = tqdm(
        range(start, epochs), initial=start, total=epochs, desc=f"train {weights_path.stem}",
        unit="epoch", disable=not progress,
    )
    for epoch in bar:
        began = time.perf_counter()
        model.train()
        order = torch.randperm(n, generator=generator).to(device)
        total = torch.zeros((), device=device)
        del log[:]
        for step in range(steps):
            idx = order[step * batch : (step + 1) * batch]
            x, y = x_train[idx], y_train[idx]
            loss = loss_fn(model, x, y, epoch + step / steps)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach()
        scheduler.step()
        if converge is not None:
            converge()
        elapsed += time.perf_counter() - began
        shown = {"loss": f"{total.item() / steps:.4f}"}
        if log:
            shown["cert"] = f"{float(sum(log)) / len(log):.3f}"
        bar.set_postfix(**shown)
        resume.save(weights_path, model, optimizer, scheduler, generator, epoch + 1, elapsed,
                    hp, vectors)

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
    resume.remove(weights_path)
    return model, card
