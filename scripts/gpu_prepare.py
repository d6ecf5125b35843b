"""Prepare the carried folder of a GPU run (scripts/gpu_run.py), on this CPU machine.

    python scripts/gpu_prepare.py [--carry .gpu-carry] [--shared ../shared/data] [--cpu-reference]

The GPU machine has no network and none of this repository's data: everything a run needs
travels in one git-ignored folder (at most 64 MiB):

- ``wheels/``: wheels for CPython 3.12 x86-64 of the packages the GPU image may lack
  (pydantic and scikit-learn with their own dependencies; the run installs only those it
  cannot import), fetched with ``pip download --only-binary=:all:``;
- ``data/``: MNIST, the first 100 CIFAR-10 test images (ERAN's CSV), the ONNX networks of
  the ``gpu-mnist`` and ``cifar-third-party`` matrices, the VNN-COMP 2021 ``test`` suite
  (for the CUDA tests) and VNN-COMP 2022 ``mnist_fc`` with ``bab_instances.csv``, a
  seeded sample of its instances for branch and bound;
- ``checkpoints/``: the recipe models of the ``quick`` and ``gpu-mnist`` matrices, trained
  here (no training on the GPU machine, so that both sides certify the same weights).

With ``--cpu-reference`` the same matrices (and bab on the sampled instances) also run
here, into ``results/examples/gpu-h200/cpu/``: the CPU side of the comparison, measured on
this machine with ``--workers 1``. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import csv
import random
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ["pydantic", "pydantic-core", "annotated-types", "typing-inspection",
          "typing-extensions", "scikit-learn", "joblib", "threadpoolctl", "tomli"]
DATA = ["mnist", "eran_data/cifar10_test.csv", "eran_data/mnist_test.csv",
        "vnncomp2021/mnistfc/mnist-net_256x2.onnx", "vnncomp2021/mnistfc/mnist-net_256x4.onnx",
        "vnncomp2021/eran/nets/mnist_relu_9_200.onnx",
        *(f"vnncomp2021/oval21/nets/cifar_{size}_kw.onnx" for size in ("base", "wide", "deep")),
        "vnncomp2021/cifar10_resnet/onnx/resnet_2b.onnx",
        "vnncomp2021/cifar10_resnet/onnx/resnet_4b.onnx", "vnncomp2021/test",
        "vnncomp2022/mnist_fc"]
"""What the GPU run reads (the tests, the matrices' networks and the bab sample): about
30 MiB with the wheels and checkpoints, leaving room in the 64 MiB the device tool carries
for the working tree."""
MATRICES = {"quick": None, "gpu-mnist": None, "cifar-third-party": 10}
"""Matrix -> the number of points the GPU run takes (None: the matrix's own)."""
BAB_INSTANCES = 8
BAB_TIMEOUT_SCALE = 0.05
CPU_REFERENCE = ROOT / "results" / "examples" / "gpu-h200" / "cpu"


def certbench(*args: str) -> None:
    command = [sys.executable, "-m", "certbench.cli", *args]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def fetch_wheels(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in WHEELS:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--only-binary=:all:", "--python-version", "3.12",
                        "--platform", "manylinux2014_x86_64",
                        "--platform", "manylinux_2_17_x86_64", "--platform", "any",
                        "-d", str(folder), name], check=True)


def copy_data(shared: Path, folder: Path) -> None:
    for item in DATA:
        source, target = shared / item, folder / item
        if not source.exists():
            raise SystemExit(f"{source} not found: point --shared at the shared data folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)
        else:
            shutil.copy2(source, target)


def sample_bab_instances(data: Path, count: int, seed: int = 0) -> Path:
    """A seeded sample of VNN-COMP 2022 mnist_fc instances, as an instances.csv next to
    the benchmark's own (paths relative to it)."""
    folder = data / "vnncomp2022" / "mnist_fc"
    rows = [r for r in csv.reader((folder / "instances.csv").open()) if r]
    chosen = sorted(random.Random(seed).sample(range(len(rows)), count))
    target = folder / "bab_instances.csv"
    target.write_text("".join(",".join(rows[i]) + "\n" for i in chosen))
    return target


def cpu_reference(carry: Path) -> None:
    data, checkpoints = carry / "data", carry / "checkpoints"
    for matrix, samples in MATRICES.items():
        certbench("run", "--matrix", matrix, "--device", "cpu", "--data-dir", str(data),
                  "--checkpoint-dir", str(checkpoints), "--results",
                  str(CPU_REFERENCE / matrix), "--quiet",
                  *(["--samples", str(samples)] if samples else []))
    certbench("vnncomp", str(data / "vnncomp2022" / "mnist_fc" / "bab_instances.csv"),
              "--verifiers", "bab", "--timeout-scale", str(BAB_TIMEOUT_SCALE),
              "--results", str(CPU_REFERENCE / "vnncomp-mnist_fc"), "--quiet")


def train_checkpoints(carry: Path) -> None:
    """Train the recipe models of the matrices that have them (`run.provision`: the same
    checkpoint names a run looks for), on this CPU."""
    import torch

    from certbench.data import load_dataset
    from certbench.matrix import load_matrix
    from certbench.run.executors import InlineExecutor
    from certbench.run.provision import ensure_models

    for matrix in ("quick", "gpu-mnist"):
        spec = load_matrix(matrix)
        dataset = load_dataset(spec.dataset, carry / "data")
        ensure_models(spec, dataset, carry / "checkpoints", torch.device("cpu"),
                      InlineExecutor(), progress=True, data_dir=carry / "data")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--carry", type=Path, default=ROOT / ".gpu-carry")
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--cpu-reference", action="store_true",
                        help="also run the CPU side into results/examples/gpu-h200/cpu/")
    args = parser.parse_args(argv)
    fetch_wheels(args.carry / "wheels")
    copy_data(args.shared, args.carry / "data")
    sample_bab_instances(args.carry / "data", BAB_INSTANCES)
    train_checkpoints(args.carry)
    if args.cpu_reference:
        cpu_reference(args.carry)
    size = sum(p.stat().st_size for p in args.carry.rglob("*") if p.is_file())
    print(f"{args.carry}: {size / 2**20:.1f} MiB (the device tool carries at most 64 MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
