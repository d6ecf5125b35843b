"""Counterexamples judged as VNN-COMP 2022 judged them, with certbench's strict check beside.

The competition's checker (public repository ChristopherBrix/vnncomp2022_results,
``SCORING/counterexamples.py``, tolerance ``COUNTEREXAMPLE_TOL = 1e-4`` in
``SCORING/settings.py``) accepts a reported point (x, y) of a property with regions
``box_r × ⋁_i {C_ri y <= d_ri}`` when

1. onnxruntime's output at x, cast to the network's input type, is within ``tol`` of the
   reported y in the l_inf norm;
2. x lies in some region's box widened by ``tol``: ``lower_r - tol <= x <= upper_r + tol``;
3. the *reported* y lies in that region's unsafe set widened by ``tol``: ``C_ri y <= d_ri +
   tol`` row by row, for some disjunct i.

certbench reports y = onnxruntime's output at the float32 x it prints (exactly), so 1 holds
by construction, and `judge` applies 2 and 3: ``accepted``. Beside it, certbench's own
check, ``strict``: the float32 x lies inside the box with no tolerance and its output in
the unsafe set with none; a strict point refutes every proof of the property.

Degenerate boxes by design. A fixed input (lower = upper) whose value float32 cannot hold
(1.40240924) has no float32 point in its box: the point judged is the float32 value
nearest to the box in each coordinate (`float32_point`), which is inside the box where one
exists and otherwise within half an ulp of it (6e-8 relative), far inside the tolerance.
So such a property can be answered ``sat`` (accepted) while ``strict`` says that no float32
point of its box exists.

The harness of the competition (its ``run_single_instance.sh``) stopped ``run_instance.sh``
at the instance's timeout plus 60 s (`KILL_ALLOWANCE_S`), after a ``prepare_instance.sh``
of its own 60 s.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from certbench.io.onnx_import import OnnxRuntime
from certbench.io.vnnlib import Region

COUNTEREXAMPLE_TOL = 1e-4
KILL_ALLOWANCE_S = 60.0


@dataclass(frozen=True)
class Judgement:
    """A candidate as reported: x (float32 values, held in float64) and onnxruntime's y;
    ``accepted`` by the competition's rule, ``strict`` by certbench's (strict implies
    accepted); ``margin``: min_i max_j (C_i y - d_i)_j (<= 0: y in the unsafe set)."""

    x: np.ndarray
    y: np.ndarray
    accepted: bool
    strict: bool
    margin: float


def float32_point(point: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """The float32 point nearest to ``point`` clipped to the box: rounded, then moved one
    ulp inward in a coordinate where rounding left the box and a float32 value lies inside
    it; where none does (a fixed value float32 cannot hold), the float32 nearest to it."""
    clipped = np.clip(np.asarray(point, dtype=np.float64), lower, upper)
    x = clipped.astype(np.float32)
    up = np.nextafter(x, np.float32(np.inf))
    down = np.nextafter(x, np.float32(-np.inf))
    x = np.where((x < lower) & (up <= upper), up, x)
    return np.where((x > upper) & (down >= lower), down, x).astype(np.float32)


def unsafe_margin(y: np.ndarray, region: Region) -> float:
    """min_i max_j (C_i y - d_i)_j in float64: <= 0 exactly when y is in the unsafe set."""
    return min(float((c @ y - d).max()) for c, d in region.constraints)


def judge(runtime: OnnxRuntime, point: torch.Tensor | np.ndarray, region: Region,
          tol: float = COUNTEREXAMPLE_TOL) -> Judgement:
    """The candidate ``point`` (any shape with the inputs' count) as the point certbench
    would report, judged by the competition's rule and by the strict one."""
    if torch.is_tensor(point):
        point = point.detach().cpu().double().numpy()
    x = float32_point(np.reshape(point, -1), region.lower, region.upper)
    y = runtime(x.reshape(1, *runtime.network.input_shape))[0]
    margin = unsafe_margin(y, region)
    inside = bool(((x >= region.lower) & (x <= region.upper)).all())
    near = bool(((x >= region.lower - tol) & (x <= region.upper + tol)).all())
    return Judgement(x.astype(np.float64), y, near and margin <= tol, inside and margin <= 0,
                     margin)
