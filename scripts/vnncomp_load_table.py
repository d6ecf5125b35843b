"""The load table of a VNN-COMP benchmarks folder: per benchmark, its networks, whether each
loads (or which operation is missing, or that the file is not available here), the
largest difference from onnxruntime on random points of its properties' boxes, whether
every property file parses, and the verifiers that apply.

    python scripts/vnncomp_load_table.py vnncomp2022_benchmarks/benchmarks > table.md

A network listed in instances.csv whose file is absent (public snapshots leave out files
over about 4 MiB) is "not available here", kept apart from one that fails to load.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

import numpy as np
import torch

from certbench.io.onnx_import import OnnxImportError, OnnxRuntime, load_onnx
from certbench.io.vnnlib import VnnlibError, read_vnnlib
from certbench.verifiers.base import UnsupportedLayerError
from certbench.verifiers.bound_propagation.graph import TracedNetwork
from certbench.vnncomp.pipeline import existing_file

BOUND_METHODS = "ibp, crown-ibp, crown, alpha-crown"
EXACT_METHODS = ("exact", "bab", "local-lipschitz")


def network_row(path: Path | None, boxes: list) -> dict:
    """Load one network: status, max |ours - onnxruntime|, the methods that apply."""
    if path is None:
        return {"status": "not available here"}
    try:
        network = load_onnx(path)
    except OnnxImportError as exc:
        text = str(exc)
        op = text.split("unsupported ONNX operation ")[-1].split(" ")[0] if (
            "unsupported ONNX operation" in text) else text[:80]
        return {"status": f"missing {op}"}
    gen = np.random.default_rng(0)
    points = [lo + (hi - lo) * gen.random(lo.shape) for lo, hi in boxes[:4] for _ in range(2)]
    x = torch.tensor(np.stack(points), dtype=torch.float32).reshape(-1, *network.input_shape)
    with torch.no_grad():
        ours = network.module(x).double().numpy()
    difference = float(np.abs(ours - OnnxRuntime(network)(x)).max())
    try:
        traced = TracedNetwork(network.module, network.input_shape)
    except UnsupportedLayerError as exc:
        return {"status": "yes", "difference": difference, "methods": f"none ({exc})"}
    methods = [BOUND_METHODS]
    for method in EXACT_METHODS:
        try:
            traced.check_supported(method)
            methods.append(method)
        except UnsupportedLayerError:
            pass
    return {"status": "yes", "difference": difference, "methods": ", ".join(methods)}


def benchmark_rows(folder: Path) -> list[str]:
    rows = list(csv.reader((folder / "instances.csv").open()))
    networks = sorted({r[0].strip() for r in rows if r})
    properties = sorted({r[1].strip() for r in rows if r})
    boxes: dict[str, list] = {name: [] for name in networks}
    parsed = 0
    for name in properties:
        path = existing_file(folder / name)
        try:
            prop = read_vnnlib(path if path is not None else folder / name)
            parsed += 1
        except VnnlibError as exc:
            print(f"{folder.name}: {exc}", file=sys.stderr)
            continue
        for network in (r[0].strip() for r in rows if r and r[1].strip() == name):
            if len(boxes[network]) < 4:
                boxes[network] += [(region.lower, region.upper) for region in prop.regions]
    lines = []
    for name in networks:
        path = existing_file(folder / name)
        size = f"{path.stat().st_size / 2**20:.1f}" if path else "-"
        row = network_row(path, boxes[name])
        difference = row.get("difference", math.nan)
        lines.append(f"| {folder.name} | {Path(name).name} | {size} | {row['status']} | "
                     f"{difference:.1e} | {parsed}/{len(properties)} | {row.get('methods', '-')} |")
        print(lines[-1], file=sys.stderr, flush=True)
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmarks", type=Path, help="folder of benchmark folders")
    parser.add_argument("--only", nargs="*", default=None, help="these benchmarks only")
    args = parser.parse_args()
    print("| benchmark | network | MiB (gz) | loads | max diff. to onnxruntime | "
          "properties parsed | verifiers that apply |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for folder in sorted(p for p in args.benchmarks.iterdir() if (p / "instances.csv").exists()):
        if args.only is None or folder.name in args.only:
            print("\n".join(benchmark_rows(folder)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
