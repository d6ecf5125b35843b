"""Prepare the carried folder of a GPU run (scripts/gpu_run.py), on this CPU machine.

    python scripts/gpu_prepare.py [--carry .gpu-carry] [--shared ../shared/data] [--cpu-reference]
    python scripts/gpu_prepare.py --zoo gloro-mnist-4c3f-converged   # a zoo training run

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

With ``--zoo NAME ...`` the folder is for ``gpu_run.py --zoo`` instead: the wheels
(scikit-learn aside: a build does not need it), the networks' datasets, and in ``zoo/`` each
network's Adam's moments where a build here left them, if they fit (they are git-ignored, so
only this folder takes them; the resume point travels with the working tree).

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
SKLEARN = {"scikit-learn", "joblib", "threadpoolctl"}
LIMIT = 64 * 2**20
"""What the device tool carries: the working tree and the carried folder together."""
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


def fetch_wheels(folder: Path, names: list[str] = WHEELS) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--only-binary=:all:", "--python-version", "3.12",
                        "--platform", "manylinux2014_x86_64",
                        "--platform", "manylinux_2_17_x86_64", "--platform", "any",
                        "-d", str(folder), name], check=True)


def copy_data(shared: Path, folder: Path, items: list[str] = DATA) -> None:
    for item in items:
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


def carry_zoo(carry: Path, names: list[str], shared: Path) -> None:
    """Wheels, datasets and resume files for training ``names`` on the GPU machine."""
    from certbench import zoo

    entries = zoo.catalog()
    unknown = [name for name in names if name not in entries]
    if unknown:
        raise SystemExit(f"no zoo network {', '.join(unknown)}; the zoo has: "
                         f"{', '.join(entries)}")
    fetch_wheels(carry / "wheels", [w for w in WHEELS if w not in SKLEARN])
    copy_data(shared, carry / "data", sorted({entries[name].dataset for name in names}))
    (carry / "zoo").mkdir(parents=True, exist_ok=True)
    for name in names:  # the resume point travels with the working tree
        moments = zoo.FOLDER / (name + ".optimizer.pt")
        if not moments.exists():
            continue
        total = tree_bytes() + folder_bytes(carry) + moments.stat().st_size
        if total > LIMIT:
            print(f"{moments.name} left behind: with it {total / 2**20:.1f} MiB would travel, "
                  f"over {LIMIT / 2**20:.0f} MiB; the GPU run restarts Adam's moments")
            continue
        shutil.copy2(moments, carry / "zoo" / moments.name)
        print(f"carried {moments.name}")


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def tree_bytes() -> int:
    """What of the checkout travels to the GPU machine: the tracked files and the untracked
    ones git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], cwd=ROOT, capture_output=True,
                            check=True).stdout.decode().split("\0")
    return sum((ROOT / name).stat().st_size for name in listed
               if name and (ROOT / name).is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--carry", type=Path, default=ROOT / ".gpu-carry")
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--cpu-reference", action="store_true",
                        help="also run the CPU side into results/examples/gpu-h200/cpu/")
    parser.add_argument("--zoo", nargs="+", default=[], metavar="NAME",
                        help="prepare a zoo training run (gpu_run.py --zoo) instead")
    args = parser.parse_args(argv)
    if args.zoo:
        carry_zoo(args.carry, args.zoo, args.shared)
    else:
        fetch_wheels(args.carry / "wheels")
        copy_data(args.shared, args.carry / "data")
        sample_bab_instances(args.carry / "data", BAB_INSTANCES)
        train_checkpoints(args.carry)
    if args.cpu_reference:
        cpu_reference(args.carry)
    size, tree = folder_bytes(args.carry), tree_bytes()
    print(f"{args.carry}: {size / 2**20:.1f} MiB, with the working tree "
          f"{(size + tree) / 2**20:.1f} MiB (the device tool carries at most 64 MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
