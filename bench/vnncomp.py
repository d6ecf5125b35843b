"""VNN-COMP instances: ONNX network + VNN-LIB property + timeout, answered by each verifier.

`certbench vnncomp INSTANCES_CSV` reads the competition's ``instances.csv`` (rows
``onnx,vnnlib,timeout``, paths relative to the file; ``.gz`` files are found for names
without it) and answers every instance with every chosen verifier:

1. *overhead* (timed apart, as the competition scores it): load and convert the network
   (once per network), ``prepare`` the verifier, parse the property;
2. *falsification*: PGD on the box for each region (`attacks.box_pgd`; no step starts
   after the instance's budget);
3. *verification*: the verifier's ``check_spec`` on each region of the property.

Answers, each kept apart: ``unsat`` (every region proved), ``sat`` (a counterexample that
the original ONNX network, run by onnxruntime in float32, confirms inside the box; found by
the attack or by a complete verifier), ``unknown`` (the bound does not decide, or a
candidate was not confirmed), ``timeout`` (the verification time exceeded the instance's
timeout x ``timeout_scale``), ``error`` (the verifier failed; the reason is kept).
Timeouts: the exact verifier gets the remaining time as its solver limit; bound methods
are not interrupted, and an answer that came too late is recorded as ``timeout`` (this
command does not use the matrix runner's worker processes, executors.py, yet).

Outputs in RESULTS_DIR: ``instances.parquet`` (one row per instance and verifier, upserted
by ``instance_key``; a rerun skips answered instances, retries ``error`` rows), and per
verifier ``vnncomp/<verifier>/results.csv`` (the competition's columns) plus one result
file per instance, ``<benchmark>/<onnx>__<vnnlib>.txt`` (the benchmark is the folder of
its instances.csv): the answer on the first line and, for
``sat``, the counterexample in the competition's format ``((X_0 v) ... (Y_0 v) ...)``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from certbench.attacks import box_pgd
from certbench.errors import UserError
from certbench.matrix import canonical_json
from certbench.onnx_import import OnnxNetwork, OnnxRuntime, load_onnx, read_onnx_bytes
from certbench.provenance import git_commit, library_versions
from certbench.verifiers import get_verifier
from certbench.verifiers.specification import (
    OutputSpec,
    SpecificationVerifier,
    SpecResult,
    SpecVerdict,
)
from certbench.vnnlib import Property, read_vnnlib

TABLE = "instances"
DEFAULT_VERIFIERS = ("crown", "alpha-crown", "exact")
ANSWERS = ("unsat", "sat", "unknown", "timeout", "error")


@dataclass(frozen=True)
class Instance:
    benchmark: str
    onnx: Path
    vnnlib: Path
    timeout_s: float

    @property
    def name(self) -> str:
        return f"{_stem(self.onnx)}__{_stem(self.vnnlib)}"


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".onnx", ".vnnlib"):
        name = name.removesuffix(suffix)
    return name


def _existing(path: Path) -> Path | None:
    if path.exists():
        return path
    gz = Path(str(path) + ".gz")
    return gz if gz.exists() else None


def read_instances(csv_path: str | Path) -> list[Instance]:
    """The instances of a VNN-COMP ``instances.csv``; UserError naming the first missing
    file or malformed row (nothing is run before every file is found)."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise UserError(f"instances file {csv_path} not found")
    benchmark = csv_path.parent.name
    instances = []
    with open(csv_path, newline="") as handle:
        for number, row in enumerate(csv.reader(handle), start=1):
            if not row or not "".join(row).strip():
                continue
            if len(row) != 3:
                raise UserError(f"{csv_path}:{number}: expected onnx,vnnlib,timeout; got {row}")
            try:
                timeout = float(row[2])
            except ValueError as exc:
                raise UserError(f"{csv_path}:{number}: timeout {row[2]!r} is not a number") from exc
            paths = []
            for name in row[:2]:
                found = _existing(csv_path.parent / name.strip())
                if found is None:
                    raise UserError(f"{csv_path}:{number}: file {name.strip()} not found "
                                    f"(looked in {csv_path.parent})")
                paths.append(found)
            instances.append(Instance(benchmark, paths[0], paths[1], timeout))
    if not instances:
        raise UserError(f"{csv_path} lists no instances")
    return instances


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def instance_key(instance: Instance, onnx_sha: str, verifier: str, options: dict,
                 timeout_s: float, attack: dict) -> str:
    identity = {"onnx": onnx_sha, "vnnlib": _sha256(instance.vnnlib.read_bytes()),
                "verifier": verifier, "options": options, "timeout_s": timeout_s,
                "attack": attack}
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()[:16]


def confirm(runtime: OnnxRuntime, point: torch.Tensor, lower: np.ndarray, upper: np.ndarray,
            spec: OutputSpec) -> tuple[np.ndarray, np.ndarray] | None:
    """(x, y) if the float32 point lies in the box and onnxruntime's output of it lies in
    the unsafe set (no tolerance), else None."""
    x = point.detach().cpu().double().reshape(-1).numpy().astype(np.float32)
    x = np.clip(x, lower, upper).astype(np.float32)  # the box in float64, x in float32
    if (x < lower).any() or (x > upper).any():
        x = np.where(x < lower, np.nextafter(x, np.float32(np.inf)), x)
        x = np.where(x > upper, np.nextafter(x, np.float32(-np.inf)), x).astype(np.float32)
        if (x < lower).any() or (x > upper).any():
            return None
    y = runtime(x[None].reshape(1, *runtime.network.input_shape))
    if float(spec.violation(torch.from_numpy(y))) <= 0:
        return x.astype(np.float64), y[0]
    return None


def counterexample_text(x: np.ndarray, y: np.ndarray) -> str:
    """The competition's counterexample format (float32 values printed exactly)."""
    lines = [f"(X_{i} {float(np.float32(v))!r})" for i, v in enumerate(x)]
    lines += [f"(Y_{j} {float(v)!r})" for j, v in enumerate(y)]
    return "(" + "\n ".join(lines) + ")\n"


@dataclass
class Answer:
    result: str
    time_s: float
    attack_s: float
    counterexample: tuple[np.ndarray, np.ndarray] | None = None
    found_by: str | None = None
    error: str | None = None
    columns: dict | None = None


def answer_instance(
    verifier: SpecificationVerifier, network: OnnxNetwork, runtime: OnnxRuntime,
    prop: Property, budget_s: float, attack: dict,
) -> Answer:
    """Falsify, then verify, region by region (module docstring); any answer that came
    after ``budget_s`` is a timeout."""
    started = time.perf_counter()
    answer = _falsify_then_verify(verifier, network, runtime, prop, budget_s, attack, started)
    answer.time_s = time.perf_counter() - started
    if answer.time_s > budget_s:
        answer.result, answer.counterexample = "timeout", None
    return answer


def _falsify_then_verify(verifier, network, runtime, prop, budget_s, attack, started) -> Answer:
    param = next(network.module.parameters())
    shape = (1, *network.input_shape)
    regions, attack_s, columns = [], 0.0, {}
    for region in prop.regions:
        spec = OutputSpec(tuple((torch.from_numpy(c), torch.from_numpy(d))
                                for c, d in region.constraints))
        lower = torch.from_numpy(region.lower).reshape(shape)
        upper = torch.from_numpy(region.upper).reshape(shape)
        regions.append((spec, lower, upper, region))
        if attack.get("enabled", True):
            t0 = time.perf_counter()
            point, value = box_pgd(
                network.module, lower.to(param), upper.to(param), spec.to(param.dtype).violation,
                steps=attack.get("steps", 50), restarts=attack.get("restarts", 8),
                deadline=started + budget_s)
            attack_s += time.perf_counter() - t0
            found = None if value > 0 else confirm(runtime, point, region.lower, region.upper,
                                                   spec)
            if found is not None:
                return Answer("sat", 0.0, attack_s, found, "attack")
    for spec, lower, upper, region in regions:
        remaining = budget_s - (time.perf_counter() - started)
        if remaining <= 0:
            return Answer("timeout", 0.0, attack_s, columns=columns)
        result: SpecResult = verifier.check_spec(lower, upper, spec, remaining)
        columns.update(result.columns)
        if result.verdict == SpecVerdict.SAT:
            found = confirm(runtime, result.counterexample, region.lower, region.upper, spec)
            if found is not None:
                return Answer("sat", 0.0, attack_s, found, "verifier", columns=columns)
            columns["unconfirmed_counterexample"] = 1.0
            return Answer("unknown", 0.0, attack_s, columns=columns)
        if result.verdict != SpecVerdict.UNSAT:
            return Answer(result.verdict.value, 0.0, attack_s, columns=columns)
    return Answer("unsat", 0.0, attack_s, columns=columns)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_table(results_dir: str | Path) -> pd.DataFrame:
    path = Path(results_dir) / f"{TABLE}.parquet"
    return pd.read_parquet(path) if path.exists() else pd.DataFrame()


def _upsert(results_dir: Path, row: dict) -> None:
    old = read_table(results_dir)
    if not old.empty:
        old = old[old["instance_key"] != row["instance_key"]]
    new = pd.DataFrame([row])
    table = pd.concat([old, new], ignore_index=True) if not old.empty else new
    results_dir.mkdir(parents=True, exist_ok=True)
    tmp = results_dir / f".{TABLE}.parquet.tmp"
    table.to_parquet(tmp, index=False)
    os.replace(tmp, results_dir / f"{TABLE}.parquet")


def _write_competition_files(results_dir: Path, row: dict, text: str) -> None:
    folder = results_dir / "vnncomp" / row["verifier"]
    _write_atomic(folder / row["benchmark"] / f"{row['instance']}.txt", text)
    table = read_table(results_dir)
    mine = table[table["verifier"] == row["verifier"]].sort_values(["benchmark", "instance"])
    lines = [",".join(map(str, (r.benchmark, r.onnx, r.vnnlib, f"{r.overhead_s:.6f}",
                                 r.result, f"{r.time_s:.6f}"))) for r in mine.itertuples()]
    _write_atomic(folder / "results.csv", "\n".join(lines) + "\n")


def run_vnncomp(
    instances_csv: str | Path, results_dir: str | Path, verifiers: list[tuple[str, dict]],
    timeout_scale: float = 1.0, attack: dict | None = None, force: bool = False,
    progress: bool = True, limit: int | None = None,
) -> pd.DataFrame:
    """Answer every instance with every verifier (name, options); returns this run's rows."""
    instances = read_instances(instances_csv)[:limit]
    attack = {"enabled": True, "steps": 50, "restarts": 8, **(attack or {})}
    results_dir = Path(results_dir)
    done = read_table(results_dir)
    done = set() if done.empty else set(done.loc[done["result"] != "error", "instance_key"])
    for name, options in verifiers:  # unknown names and options fail before any work
        verifier = get_verifier(name, **options)
        if not isinstance(verifier, SpecificationVerifier):
            raise UserError(f"verifier {name!r} cannot check VNN-LIB properties; choose from "
                            f"those with check_spec (e.g. {', '.join(DEFAULT_VERIFIERS)})")
    networks, properties = {}, {}  # every file is read before anything runs
    for instance in tqdm(instances, desc="loading", unit="instance", disable=not progress):
        if instance.onnx not in networks:
            t0 = time.perf_counter()
            onnx_sha = _sha256(read_onnx_bytes(instance.onnx))
            network = load_onnx(instance.onnx)
            networks[instance.onnx] = (network, OnnxRuntime(network), onnx_sha,
                                       time.perf_counter() - t0, {})
        network = networks[instance.onnx][0]
        t0 = time.perf_counter()
        prop = read_vnnlib(instance.vnnlib, math.prod(network.input_shape), network.num_outputs)
        properties[instance] = (prop, time.perf_counter() - t0)
    run_id, versions, commit = uuid.uuid4().hex[:12], library_versions(), git_commit()
    rows, charged = [], set()
    bar = tqdm(total=len(instances) * len(verifiers), desc="vnncomp", unit="instance",
               disable=not progress)
    for instance in instances:
        network, runtime, onnx_sha, load_s, prepared = networks[instance.onnx]
        prop, parse_s = properties[instance]
        budget = instance.timeout_s * timeout_scale
        for name, options in verifiers:
            label = name if not options else f"{name}[{canonical_json(options)}]"
            key = instance_key(instance, onnx_sha, name, options, budget, attack)
            bar.set_postfix_str(f"{label} {instance.name}"[:60])
            if key in done and not force:
                bar.update()
                continue
            first_use = instance.onnx not in charged  # loading counts once per network
            charged.add(instance.onnx)
            row = _run_one(instance, network, runtime, parse_s + load_s * first_use, prepared,
                           prop, name, options, budget, attack)
            row.update(instance_key=key, run_id=run_id, verifier=label, onnx_sha256=onnx_sha,
                       options=canonical_json(options), versions=json.dumps(versions),
                       git_commit=commit, attack=canonical_json(attack))
            text = row.pop("_file_text")
            _upsert(results_dir, row)
            _write_competition_files(results_dir, row, text)
            rows.append(row)
            bar.update()
    bar.close()
    return pd.DataFrame(rows)


def _run_one(instance, network, runtime, load_s, prepared, prop, name, options, budget,
             attack) -> dict:
    """One instance with one verifier as a row of the instances table. Overhead: parsing
    the property, plus loading the network and ``prepare`` where this instance is the
    first to use them (``load_s`` carries the first two)."""
    started_at = pd.Timestamp.now(tz="UTC").isoformat()
    t0 = time.perf_counter()
    answer, error = None, None
    try:
        if name not in prepared:
            verifier = get_verifier(name, **options)
            verifier.prepare(network.module, network.input_shape)
            prepared[name] = verifier
    except Exception as exc:  # a verifier that cannot take this network: recorded
        error = f"{type(exc).__name__}: {exc}"
        prepared[name] = error
    overhead = time.perf_counter() - t0 + load_s
    if isinstance(prepared[name], str):
        error = prepared[name]
    else:
        try:
            answer = answer_instance(prepared[name], network, runtime, prop, budget, attack)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
    if answer is None:
        answer = Answer("error", 0.0, 0.0, error=error)
    text = answer.result + "\n"
    if answer.counterexample is not None:
        text += counterexample_text(*answer.counterexample)
    columns = answer.columns or {}
    return {
        "benchmark": instance.benchmark, "instance": instance.name,
        "onnx": str(instance.onnx.name), "vnnlib": str(instance.vnnlib.name),
        "method": name, "timeout_s": budget, "result": answer.result,
        "time_s": answer.time_s, "overhead_s": overhead, "attack_s": answer.attack_s,
        "found_by": answer.found_by, "counterexample_confirmed": answer.counterexample is not None,
        "error": answer.error, "bound": math.nan, "milp_solves": math.nan,
        **{k: float(v) for k, v in columns.items() if k != "unconfirmed_counterexample"},
        "unconfirmed_counterexample": bool(columns.get("unconfirmed_counterexample", False)),
        "device": str(next(network.module.parameters()).device),
        "started_at": started_at, "finished_at": pd.Timestamp.now(tz="UTC").isoformat(),
        "_file_text": text,
    }


def solved_table(table: pd.DataFrame) -> pd.DataFrame:
    """Per benchmark and verifier: instances per answer, the median verification time of
    the solved ones (unsat or sat), the median overhead and the (scaled) timeout."""
    counts = table.pivot_table(index=["benchmark", "verifier"], columns="result",
                               values="instance", aggfunc="count", fill_value=0)
    counts = counts.reindex(columns=list(ANSWERS), fill_value=0)
    solved = table[table["result"].isin(["unsat", "sat"])]
    counts["solved"] = counts["unsat"] + counts["sat"]
    counts["median_s (solved)"] = solved.groupby(["benchmark", "verifier"])["time_s"].median()
    counts["median_overhead_s"] = table.groupby(["benchmark", "verifier"])["overhead_s"].median()
    counts["timeout_s"] = table.groupby(["benchmark", "verifier"])["timeout_s"].max()
    return counts.reset_index()


def format_vnncomp(results_dir: str | Path) -> str:
    table = read_table(results_dir)
    summary = solved_table(table)
    lines = [f"VNN-COMP instances ({results_dir}): unsat = proved, sat = counterexample "
             "confirmed by onnxruntime",
             summary.to_string(index=False, float_format=lambda v: f"{v:.3g}", na_rep="-")]
    errors = table[table["result"] == "error"]
    for _, row in errors.head(10).iterrows():
        lines.append(f"error: {row['verifier']} / {row['instance']}: {row['error']}")
    return "\n".join(lines)
