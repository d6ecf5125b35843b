"""One prepared run on a GPU machine: the CUDA tests, the GPU matrices and branch and
bound on VNN-COMP instances, each stage under its own deadline, everything written to one
output folder as it goes; or, with ``--zoo NAME``, a zoo network's training.

    python3 scripts/gpu_run.py --carry .gpu-carry --out "$OUT"          # on the GPU machine
    python scripts/gpu_run.py --carry .gpu-carry --out /tmp/out --dry-run   # here, on the CPU
    python3 scripts/gpu_run.py --carry .gpu-carry --out "$OUT" --zoo gloro-mnist-4c3f-converged

The carried folder comes from scripts/gpu_prepare.py (wheels, data, checkpoints). Stages:

1. *setup*: every import certbench needs is tried; the carried wheels of those that fail
   are installed offline (``pip install --no-index``); certbench itself is imported from
   this checkout through a folder of links (no build step, so no setuptools needed);
2. *tests*: ``pytest -m cuda`` (tests/test_cuda.py) with the carried data;
3. *matrices*: ``quick``, ``gpu-mnist`` and a slice of ``cifar-third-party`` on ``cuda``
   with the carried checkpoints, cells in this process (``--executor inline``: one CUDA
   context for the run instead of one per cell; the per-cell CUDA peak is reset for every
   cell), then a report and ``certbench compare`` against the CPU reference
   (results/examples/gpu-h200/cpu/, written by gpu_prepare.py --cpu-reference);
4. *bab*: ``certbench vnncomp`` with ``bab`` on ``cuda`` on the carried sample of VNN-COMP
   2022 mnist_fc instances.

*zoo* (``--zoo NAME``: setup and this stage alone): ``certbench zoo --build NAME`` on
``cuda`` until the run's deadline, in a scratch copy of the zoo folder that holds the
network's committed files and the carried ones (``zoo/`` in the carried folder:
``NAME.optimizer.pt``, Adam's moments, which stay out of git). Training saves a resume
point after every epoch, so a build killed at the deadline loses at most one epoch; what
the build wrote comes back in ``zoo/`` (the resume point and the optimiser state, or the
weights and the card once it finished): copy it into bench/zoo/networks/ and commit the
resume point or the finished network (`certbench zoo --build NAME` here goes on from it).

Each stage runs as a child process killed at its deadline, so an overrun loses that stage
only; the whole run keeps within ``--budget-s``, and a stage that finds no time left is
skipped (reports and comparisons can then be made from the tables where they land).

Out: ``log.txt`` (every command and its output), ``summary.json`` (stage, status,
seconds), ``cuda-tests.xml``, ``compare.txt``, and ``results.tar.gz`` / ``reports.tar.gz``:
at most 8 files come back from the device tool, so the tables and reports are written in a
scratch folder and packed at the end.
``--dry-run`` does the same on the CPU with tiny sizes (the CUDA tests CPU against CPU),
to check the script before the device time is spent.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPORTS = {"pydantic": "pydantic", "sklearn": "scikit-learn", "onnx": "onnx",
           "onnxruntime": "onnxruntime", "safetensors": "safetensors", "pandas": "pandas",
           "pyarrow": "pyarrow", "scipy": "scipy", "tqdm": "tqdm", "matplotlib": "matplotlib",
           "tabulate": "tabulate", "pytest": "pytest",
           **({"tomli": "tomli"} if sys.version_info < (3, 11) else {})}
"""Module -> distribution, for every import certbench and its tests need (torch aside)."""
DEPENDENCIES = {"pydantic": ["pydantic-core", "annotated-types", "typing-inspection",
                             "typing-extensions"],
                "scikit-learn": ["joblib", "threadpoolctl"]}
STAGES = {"setup": 60, "tests": 90, "quick": 140, "gpu-mnist": 150,
          "cifar-third-party": 50, "bab": 80, "reports": 30}
"""Stage -> its deadline in seconds on the GPU (the budget is about 9 minutes; a dry run
on the CPU gets three times as long per stage)."""
MATRIX_SAMPLES = {"quick": None, "gpu-mnist": None, "cifar-third-party": 10}
BAB_TIMEOUT_SCALE = 0.05  # 6 s / 15 s per instance (mnist_fc: 120 s / 300 s)
ZOO_FILES = (".safetensors", ".json", ".resume.safetensors", ".optimizer.pt")
"""A zoo network's files: weights and card once built; resume point and Adam's moments
while it trains."""
COPY_BACK_S = 15.0  # what the zoo stage leaves of the run's budget to copy its files back
DRY_SAMPLES = 3


class Run:
    """The output folder, its log and the stages' summary."""

    def __init__(self, out: Path, work: Path, budget_s: float):
        self.out, self.work, self.deadline = out, work, time.monotonic() + budget_s
        out.mkdir(parents=True, exist_ok=True)
        self.log_file = (out / "log.txt").open("a", encoding="utf-8")
        self.summary: list[dict] = []

    def log(self, text: str) -> None:
        self.log_file.write(text.rstrip() + "\n")
        self.log_file.flush()
        print(text.rstrip(), flush=True)

    def stage(self, name: str, command: list[str], limit_s: float,
              env: dict[str, str] | None = None) -> bool:
        """Run ``command`` with its output in the log, killed after ``limit_s`` (or at
        the run's deadline, whichever is first)."""
        limit = min(limit_s, self.deadline - time.monotonic())
        if limit <= 5:
            self.record(name, "skipped", 0.0, "no time left")
            return False
        self.log(f"== {name} (deadline {limit:.0f} s): {' '.join(command)}")
        started = time.monotonic()
        try:
            done = subprocess.run(command, stdout=self.log_file, stderr=subprocess.STDOUT,
                                  timeout=limit, env={**os.environ, **(env or {})},
                                  cwd=ROOT)
            status = "ok" if done.returncode == 0 else f"exit {done.returncode}"
        except subprocess.TimeoutExpired:
            status = "deadline"
        self.record(name, status, time.monotonic() - started)
        return status == "ok"

    def record(self, name: str, status: str, seconds: float, note: str = "") -> None:
        self.summary.append({"stage": name, "status": status, "seconds": round(seconds, 1),
                             "note": note})
        self.log(f"== {name}: {status} after {seconds:.1f} s {note}".rstrip())
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=2) + "\n")


def missing_distributions() -> list[str]:
    """The distributions to install: those whose module does not import, with their own
    dependencies."""
    missing = []
    for module, distribution in IMPORTS.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing += [distribution, *DEPENDENCIES.get(distribution, [])]
    return missing


def link_farm(folder: Path) -> Path:
    """A folder on which ``import certbench`` finds bench/ as ``certbench`` and verifiers/
    as ``certbench.verifiers``, as the installed package maps them."""
    package = folder / "certbench"
    package.mkdir(parents=True)
    for entry in (ROOT / "bench").iterdir():
        if entry.name != "verifiers":
            (package / entry.name).symlink_to(entry)
    (package / "verifiers").symlink_to(ROOT / "verifiers")
    return folder


def setup(run: Run, carry: Path, farm: Path) -> dict[str, str]:
    """Install what is missing from the carried wheels; the environment for the stages."""
    import torch

    run.log(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda "
            f"{torch.version.cuda}, devices: "
            f"{[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}")
    missing = missing_distributions()
    carried = {wheel.name.split("-")[0].lower().replace("_", "-")
               for wheel in (carry / "wheels").glob("*.whl")}
    if set(missing) - carried:
        run.log(f"not carried, so not installed: {', '.join(sorted(set(missing) - carried))}")
        missing = [name for name in missing if name in carried]
    if missing:
        run.stage("setup", [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps",
                            "--find-links", str(carry / "wheels"), *missing],
                  STAGES["setup"])
    else:
        run.record("setup", "ok", 0.0, "nothing to install")
    path = os.pathsep.join([str(link_farm(farm)), os.environ.get("PYTHONPATH", "")])
    return {"PYTHONPATH": path.rstrip(os.pathsep), "CERTBENCH_SHARED_DATA": str(carry / "data"),
            "CERTBENCH_DATA": str(carry / "data"), "PYTHONDONTWRITEBYTECODE": "1"}


def zoo_folder(farm: Path, carry: Path, names: list[str]) -> Path:
    """Turn the link farm's ``certbench/zoo`` into a folder of its own (its module and
    catalogue copied: the zoo finds its networks from the module's path) whose
    ``networks/`` holds the files of ``names``, the carried ones over the committed ones;
    returns that ``networks/``. The checkout's zoo folder is never written."""
    package = farm / "certbench" / "zoo"
    source = package.resolve()
    package.unlink()
    networks = package / "networks"
    networks.mkdir(parents=True)
    for item in ("__init__.py", "catalog.toml"):
        shutil.copy2(source / item, package / item)
    for name in names:
        for suffix in ZOO_FILES:
            for origin in (carry / "zoo" / (name + suffix), source / "networks" / (name + suffix)):
                if origin.exists():
                    shutil.copy2(origin, networks / origin.name)
                    break
    return networks


def build_zoo(run: Run, names: list[str], networks: Path, dry_run: bool,
              env: dict[str, str]) -> None:
    """``certbench zoo --build`` for each of ``names`` until the run's deadline (less the
    time to copy back), then every file the builds wrote into ``out/zoo/``."""
    started = time.time()
    back = run.out / "zoo"
    back.mkdir(exist_ok=True)
    try:
        for name in names:
            limit = run.deadline - time.monotonic() - COPY_BACK_S
            run.stage(f"zoo {name}", certbench(
                "zoo", "--build", name, "--device", "cpu" if dry_run else "cuda",
                "--data-dir", env["CERTBENCH_DATA"], "--quiet"), limit, env)
    finally:
        for path in sorted(networks.iterdir()):
            if not path.name.startswith(".") and path.stat().st_mtime >= started:
                shutil.copy2(path, back / path.name)
                run.log(f"back: zoo/{path.name} ({path.stat().st_size / 2**20:.1f} MiB)")


def certbench(*args: str) -> list[str]:
    return [sys.executable, "-m", "certbench.cli", *args]


def run_all(run: Run, carry: Path, dry_run: bool, env: dict[str, str],
            matrices: list[str], pytest_args: list[str]) -> None:
    device = "cpu" if dry_run else "cuda"
    slack = 3.0 if dry_run else 1.0
    test_env = {**env, "CERTBENCH_TEST_DEVICE": device}
    run.stage("tests", [sys.executable, "-m", "pytest", "-m", "cuda", "-p", "no:cacheprovider",
                        "-q", "--junitxml", str(run.out / "cuda-tests.xml"),
                        "tests/test_cuda.py", *pytest_args], STAGES["tests"] * slack, test_env)
    results, reports = run.work / "results", run.work / "reports"
    for matrix in matrices:  # a stage past its deadline keeps the cells it finished
        samples = DRY_SAMPLES if dry_run else MATRIX_SAMPLES.get(matrix)
        name = Path(matrix).stem
        run.stage(name, certbench(
            "run", "--matrix", matrix, "--device", device, "--executor", "inline",
            "--checkpoint-dir", str(carry / "checkpoints"), "--data-dir", str(carry / "data"),
            "--results", str(results / name), "--quiet",
            *(["--samples", str(samples)] if samples else [])),
            STAGES.get(name, 100) * slack, env)
    instances = carry / "data" / "vnncomp2022" / "mnist_fc" / "bab_instances.csv"
    if instances.exists():
        run.stage("bab", certbench(
            "vnncomp", str(instances), "--verifiers", "bab", "--device", device,
            "--executor", "inline", "--timeout-scale",
            str(0.01 if dry_run else BAB_TIMEOUT_SCALE),
            *(["--limit", "1"] if dry_run else []),
            "--results", str(results / "vnncomp-mnist_fc"), "--quiet"), STAGES["bab"] * slack, env)
    else:
        run.record("bab", "skipped", 0.0, f"{instances} not carried")
    started = time.monotonic()
    for folder in sorted(p for p in results.iterdir() if p.is_dir()) if results.exists() else []:
        run.stage(f"report {folder.name}", certbench("report", str(folder), "--out",
                                                     str(reports / folder.name)),
                  STAGES["reports"] * slack, env)
        reference = ROOT / "results" / "examples" / "gpu-h200" / "cpu" / folder.name
        if reference.exists() and (folder / "cells.parquet").exists():
            with (run.work / f"compare-{folder.name}.txt").open("w") as handle:
                subprocess.run(certbench("compare", str(reference), str(folder),
                                         "--rule", "ratio"), stdout=handle,
                               stderr=subprocess.STDOUT, env={**os.environ, **env}, cwd=ROOT,
                               timeout=60)
    run.log(f"reports and comparisons: {time.monotonic() - started:.1f} s")


def pack(work: Path, out: Path) -> None:
    """At most 8 files come back from the device tool: the tables and the reports as two
    archives, the comparisons as one text, beside the log, the summary and the tests'
    XML."""
    for name in ("results", "reports"):
        folder = work / name
        if folder.exists():
            with tarfile.open(out / f"{name}.tar.gz", "w:gz") as archive:
                archive.add(folder, arcname=name)
    compares = sorted(work.glob("compare-*.txt"))
    if compares:
        (out / "compare.txt").write_text("".join(f"### {p.stem}\n{p.read_text()}\n"
                                                 for p in compares))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--carry", type=Path, default=ROOT / ".gpu-carry")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget-s", type=float, default=530.0,
                        help="the whole run's deadline (default 530 s)")
    parser.add_argument("--dry-run", action="store_true",
                        help="on the CPU with tiny sizes, to check the script")
    parser.add_argument("--matrices", nargs="+", default=list(MATRIX_SAMPLES),
                        help="packaged matrix names or TOML files (default: %(default)s)")
    parser.add_argument("--zoo", nargs="+", default=[], metavar="NAME",
                        help="train these zoo networks instead of the tests, matrices and bab")
    parser.add_argument("--pytest-args", nargs=argparse.REMAINDER, default=[],
                        help="extra pytest arguments for the tests stage (last option)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        run = Run(args.out, Path(scratch) / "work", args.budget_s)
        env = setup(run, args.carry, Path(scratch) / "links")
        if args.zoo:
            networks = zoo_folder(Path(scratch) / "links", args.carry, args.zoo)
            build_zoo(run, args.zoo, networks, args.dry_run, env)
        else:
            try:
                run_all(run, args.carry, args.dry_run, env, args.matrices, args.pytest_args)
            finally:
                pack(run.work, args.out)
    failed = [s["stage"] for s in run.summary if s["status"] not in ("ok", "skipped")]
    run.log(f"done; stages not ok: {', '.join(failed) or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
