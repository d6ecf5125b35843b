"""The data of the paradox study that the results tables do not hold: each trained model's
recipe arguments and training cost (from its checkpoint card) and the certified loss along
a random direction in weight space, raw and Gaussian-smoothed, for IBP and CROWN
(`certbench.training.gls.loss_along_direction`; Balauca et al. 2025, Fig. 1: the discontinuity of
tight relaxations' loss that smoothing removes). Written next to a run's results, read by
`certbench report`'s GLS section:

    certbench paradox results/gls-paradox --matrix gls-paradox

writes RESULTS/training.parquet (model, recipe, optimiser, relaxation, recipe_args as
JSON, seed, train_time_s, clean_acc) and RESULTS/landscape.parquet (model, bound, eps,
sigma, t, raw, smoothed).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from certbench.data import load_dataset
from certbench.matrix import load_matrix
from certbench.models import load_checkpoint
from certbench.run.provision import model_stem
from certbench.training.gls import GLS_DEFAULTS, loss_along_direction
from certbench.training.recipes import RELAXATION_NAMES, training_relaxation
from certbench.verifiers.bound_propagation import BoundPropagator, TracedNetwork


def write_study(results: str | Path, matrix: str, checkpoint_dir: str | Path,
                landscape_model: str | None = None, points: int = 41, samples: int = 16,
                radius: float = 0.5) -> tuple[Path, Path]:
    """Write training.parquet and landscape.parquet into ``results``; the landscape is
    drawn at ``landscape_model`` (default: the GRAD + CROWN model, else the first one),
    on 100 training points at the model's training eps, sigma its GLS default."""
    spec = load_matrix(matrix)
    dataset = load_dataset(spec.dataset)
    rows, models = [], {}
    for m in spec.models:
        if m.arch is None:
            continue
        model, card = load_checkpoint(model_stem(m, spec.dataset, Path(checkpoint_dir)))
        kind = training_relaxation(card["recipe"], card["recipe_args"])
        rows.append({"model": m.name, "recipe": card["recipe"],
                     "optimiser": kind[0] if kind else None,
                     "relaxation": kind[1] if kind else None,
                     "recipe_args": json.dumps(card["recipe_args"], sort_keys=True),
                     "seed": card["seed"], "train_time_s": card["train_time_s"],
                     "clean_acc": card["clean_acc"]})
        models[m.name] = (model, card)
    folder = Path(results)
    training = folder / "training.parquet"
    pd.DataFrame(rows).to_parquet(training, index=False)
    chosen = landscape_model or next(
        (r["model"] for r in rows if r["recipe"] == "crown"), rows[0]["model"])
    model, card = models[chosen]
    prop = BoundPropagator(TracedNetwork(model.eval(), dataset.input_shape))
    x, y = dataset.x_train[:100], dataset.y_train[:100]
    eps = card["recipe_args"].get("eps", 0.1)
    norm = card["recipe_args"].get("norm", "inf")
    sigma = GLS_DEFAULTS["gls-rgs"]["sigma"]
    curves = []
    for bound in ("ibp", "crown"):
        curve = loss_along_direction(model, prop, x, y, eps, bound, norm, radius=radius,
                                     points=points, sigma=sigma, samples=samples)
        curves.append(pd.DataFrame({"model": chosen, "bound": RELAXATION_NAMES[bound], "eps": eps,
                                    "sigma": sigma, **curve}))
    landscape = folder / "landscape.parquet"
    pd.concat(curves).to_parquet(landscape, index=False)
    return training, landscape
