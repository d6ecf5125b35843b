"""VNN-COMP instances: ONNX network + VNN-LIB property + timeout, answered by each verifier.

`certbench vnncomp INSTANCES_CSV` reads the competition's ``instances.csv`` (rows
``onnx,vnnlib,timeout``, paths relative to the file; ``.gz`` files are found for names
without it) and answers every instance with every chosen verifier:

Each (instance, verifier) is a task (`InstanceJob`) run by an executor (`run.executors`;
by default each in a fresh worker process):

1. *overhead* (timed apart, as the competition scores it): load and convert the network,
   parse the property, ``prepare`` the verifier; every instance is charged its own
   (a worker process that answers the next instance of the same network, as the inline
   executor does, reuses them and is charged the times they took once);
2. *falsification*: PGD on the box for each region (`run.attacks.box_pgd`; no step starts
   after the instance's budget);
3. *verification*: the verifier's ``check_spec`` on each region of the property.

Answers, each kept apart: ``unsat`` (every region proved), ``sat`` (a counterexample found
by the attack or by a complete verifier and accepted by the competition's judge, `judge`:
the original ONNX network run by onnxruntime, the box and the unsafe set each with the
competition's tolerance of 1e-4; ``confirmed_strict`` says whether it also holds with
none), ``unknown`` (the bound does not decide, or a candidate was not accepted),
``timeout`` (the verification time exceeded the instance's timeout x ``timeout_scale``),
``error`` (the verifier failed, or its worker crashed; the reason is kept), ``oom`` (the
worker passed the memory limit). Budgets are kept twice: the verifier gets the remaining
time as its limit, and the worker is killed at the budget plus ``overhead_s``
(`OVERHEAD_ALLOWANCE_S`, the competition's 60 s), so that a hang costs one instance, not
the run.

Outputs in RESULTS_DIR: ``instances.parquet`` (one row per instance and verifier, upserted
by ``instance_key``; a rerun skips answered instances, retries ``error`` and ``oom`` rows), and per
verifier ``vnncomp/<verifier>/results.csv`` (the competition's columns) plus one result
file per instance, ``<benchmark>/<onnx>__<vnnlib>.txt`` (the benchmark is the folder of
its instances.csv): the answer on the first line and, for
``sat``, the counterexample in the competition's format ``((X_0 v) ... (Y_0 v) ...)``.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from certbench.atomic import write_atomic
from certbench.errors import UserError
from certbench.io.onnx_import import (
    OnnxNetwork,
    OnnxRuntime,
    UnsupportedOnnxOperation,
    load_onnx,
    read_onnx_bytes,
)
from certbench.io.vnnlib import Property, read_vnnlib
from certbench.matrix import VerifierSpec, add_plugin_folders, check_verifiers, import_plugins
from certbench.provenance import canonical_json, git_commit, library_versions
from certbench.run.attacks import box_pgd
from certbench.run.executors import Executor, Outcome, ProcessExecutor
from certbench.store import ResultsStore, instance_name
from certbench.verifiers import get_verifier
from certbench.verifiers.specification import (
    OutputSpec,
    SpecificationVerifier,
    SpecResult,
    SpecVerdict,
)
from certbench.vnncomp.judge import KILL_ALLOWANCE_S, Judgement, judge

DEFAULT_VERIFIERS = ("crown", "alpha-crown", "exact")
OVERHEAD_ALLOWANCE_S = KILL_ALLOWANCE_S
"""Seconds a worker may take beyond the instance's budget (loading the network, parsing
the property, ``prepare``, the attack's last step) before it is stopped as ``timeout``:
the competition's own allowance (`judge.KILL_ALLOWANCE_S`, 60 s)."""
COMPETITION_RESULT = {"oom": "error"}
"""certbench answers the competition's result files have no word for."""


@dataclass(frozen=True)
class Instance:
    benchmark: str
    onnx: Path
    vnnlib: Path
    timeout_s: float

    @property
    def name(self) -> str:
        return instance_name(self.onnx, self.vnnlib)


def existing_file(path: Path) -> Path | None:
    """``path``, or ``path.gz`` where only that exists (the competition lists names without
    ``.gz``), or None."""
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
                found = existing_file(csv_path.parent / name.strip())
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
    counterexample: Judgement | None = None
    found_by: str | None = None
    error: str | None = None
    columns: dict | None = None
    method: str | None = None  # SpecResult.method of the last region verified


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
                network.module, lower.to(param), upper.to(param),
                spec.to(param.dtype).disjunct_violations,
                steps=attack.get("steps", 50), restarts=attack.get("restarts", 8),
                deadline=started + budget_s)
            attack_s += time.perf_counter() - t0
            found = None if value > 0 else judge(runtime, point, region)
            if found is not None and found.accepted:
                return Answer("sat", 0.0, attack_s, found, "attack")
    method = None
    for spec, lower, upper, region in regions:
        remaining = budget_s - (time.perf_counter() - started)
        if remaining <= 0:
            return Answer("timeout", 0.0, attack_s, columns=columns)
        result: SpecResult = verifier.check_spec(lower, upper, spec, remaining)
        columns.update(result.columns)
        method = result.method or method
        if result.verdict == SpecVerdict.SAT:
            found = judge(runtime, result.counterexample, region)
            if found.accepted:
                return Answer("sat", 0.0, attack_s, found, "verifier", columns=columns,
                              method=method)
            columns["unconfirmed_counterexample"] = 1.0
            return Answer("unknown", 0.0, attack_s, columns=columns, method=method)
        if result.verdict != SpecVerdict.UNSAT:
            return Answer(result.verdict.value, 0.0, attack_s, columns=columns, method=method)
    return Answer("unsat", 0.0, attack_s, columns=columns, method=method)


def _write_competition_files(results_dir: Path, row: dict, text: str,
                             table: pd.DataFrame) -> None:
    folder = results_dir / "vnncomp" / row["verifier"]
    write_atomic(folder / row["benchmark"] / f"{row['instance']}.txt", text)
    mine = table[table["verifier"] == row["verifier"]].sort_values(["benchmark", "instance"])
    lines = [",".join(map(str, (r.benchmark, r.onnx, r.vnnlib, f"{r.overhead_s:.6f}",
                                 COMPETITION_RESULT.get(r.result, r.result),
                                 f"{r.time_s:.6f}"))) for r in mine.itertuples()]
    write_atomic(folder / "results.csv", "\n".join(lines) + "\n")


@dataclass
class _Loaded:
    """The network a process answers instances of, kept while the next instance uses the
    same file (instances are grouped by network), with the verifiers prepared on it."""

    file: tuple[Path, int, int, str]
    network: OnnxNetwork
    runtime: OnnxRuntime
    load_s: float
    prepared: dict[str, tuple[SpecificationVerifier | str, float]]


_LOADED: list[_Loaded] = []


def loaded_network(path: Path, device: str = "cpu") -> _Loaded:
    """The ONNX network at ``path`` converted and moved to ``device`` (and its onnxruntime
    session, on the CPU), reusing this process's last one for the same, unchanged file."""
    stat = path.stat()
    file = (path, stat.st_mtime_ns, stat.st_size, device)
    if not _LOADED or _LOADED[0].file != file:
        _LOADED.clear()
        t0 = time.perf_counter()
        network = load_onnx(path)
        network.module.to(device)
        _LOADED.append(_Loaded(file, network, OnnxRuntime(network),
                               time.perf_counter() - t0, {}))
    return _LOADED[0]


@dataclass(frozen=True, eq=False)
class InstanceJob:
    """One instance answered by one verifier, as an executor task (`run.executors`): in
    a worker process by default, so that ``timeout_s`` (the instance's budget plus the
    overhead allowance) is a hard limit and a hang, a crash or a runaway allocation costs
    this instance only. ``run`` returns the instance's row (with the result file's text
    under ``_file_text``)."""

    label: str
    instance: Instance
    verifier: str
    options: dict
    budget_s: float
    attack: dict
    timeout_s: float | None = None
    imports: tuple[str, ...] = ()
    device: str = "cpu"

    def run(self) -> dict:
        import_plugins(self.imports)
        started_at = pd.Timestamp.now(tz="UTC").isoformat()
        loaded = loaded_network(self.instance.onnx, self.device)
        network = loaded.network
        t0 = time.perf_counter()
        prop = read_vnnlib(self.instance.vnnlib, math.prod(network.input_shape),
                           network.num_outputs)
        parse_s = time.perf_counter() - t0
        key = f"{self.verifier}{canonical_json(self.options)}"
        if key not in loaded.prepared:
            t0 = time.perf_counter()
            try:
                verifier = get_verifier(self.verifier, **self.options)
                verifier.prepare(network.module, network.input_shape)
            except Exception as exc:  # a verifier that cannot take this network: recorded
                verifier = f"{type(exc).__name__}: {exc}"
            loaded.prepared[key] = (verifier, time.perf_counter() - t0)
        verifier, prepare_s = loaded.prepared[key]
        error = verifier if isinstance(verifier, str) else None
        answer = None
        if error is None:
            try:
                answer = answer_instance(verifier, network, loaded.runtime, prop,
                                         self.budget_s, self.attack)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
        if answer is None:
            answer = Answer("error", 0.0, 0.0, error=error)
        text = answer.result + "\n"
        found = answer.counterexample
        if found is not None:
            text += counterexample_text(found.x, found.y)
        columns = answer.columns or {}
        return {
            **self.base_row(started_at), "result": answer.result, "time_s": answer.time_s,
            "method": answer.method or self.verifier,
            "overhead_s": loaded.load_s + parse_s + prepare_s, "attack_s": answer.attack_s,
            "found_by": answer.found_by,
            "counterexample_accepted": found is not None,
            "confirmed_strict": found is not None and found.strict,
            "error": answer.error,
            **{k: float(v) for k, v in columns.items() if k != "unconfirmed_counterexample"},
            "unconfirmed_counterexample": bool(columns.get("unconfirmed_counterexample", False)),
            "device": str(next(network.module.parameters()).device),
            "finished_at": pd.Timestamp.now(tz="UTC").isoformat(), "_file_text": text,
        }

    def base_row(self, started_at: str) -> dict:
        instance = self.instance
        return {
            "benchmark": instance.benchmark, "instance": instance.name,
            "onnx": str(instance.onnx.name), "vnnlib": str(instance.vnnlib.name),
            "method": self.verifier, "timeout_s": self.budget_s, "bound": math.nan,
            "milp_solves": math.nan, "started_at": started_at,
        }

    def failed_row(self, outcome: Outcome) -> dict:
        """The row of an instance whose worker did not return: ``timeout`` past the hard
        limit, ``oom`` past the memory limit, ``error`` for a crash (the reason kept)."""
        now = pd.Timestamp.now(tz="UTC")
        started = (now - pd.Timedelta(seconds=outcome.seconds)).isoformat()
        return {
            **self.base_row(started), "result": outcome.status, "time_s": outcome.seconds,
            "overhead_s": math.nan, "attack_s": math.nan, "found_by": None,
            "counterexample_accepted": False, "confirmed_strict": False,
            "error": outcome.reason,
            "unconfirmed_counterexample": False, "device": self.device,
            "finished_at": now.isoformat(), "_file_text": outcome.status + "\n",
        }


def run_vnncomp(
    instances_csv: str | Path, results_dir: str | Path, verifiers: list[tuple[str, dict]],
    timeout_scale: float = 1.0, attack: dict | None = None, force: bool = False,
    progress: bool = True, limit: int | None = None, executor: Executor | None = None,
    overhead_s: float = OVERHEAD_ALLOWANCE_S, imports: tuple[str, ...] = (),
    device: str = "cpu",
) -> pd.DataFrame:
    """Answer every instance with every verifier (name, options) through ``executor`` (a
    `ProcessExecutor` by default: each instance in a worker with a hard limit of its
    budget plus ``overhead_s``); returns this run's rows. ``imports``: modules that
    register the verifiers named (imported here and in every worker); ``device``: where
    the networks and the verifiers run (onnxruntime's confirmation stays on the CPU)."""
    add_plugin_folders([Path.cwd()])
    try:
        import_plugins(imports)
    except ImportError as exc:
        raise UserError(f"--import: {exc}; modules are looked up on Python's path and in the "
                        "working folder; for one elsewhere, add its folder to PYTHONPATH"
                        ) from exc
    instances = read_instances(instances_csv)[:limit]
    attack = {"enabled": True, "steps": 50, "restarts": 8, **(attack or {})}
    results_dir = Path(results_dir)
    store = ResultsStore(results_dir)
    done = store.done_instances()
    check_spec_verifiers(verifiers)
    shas = {}  # every file is read here before anything runs, so that a bad one is one line
    refused: dict[Path, str] = {}  # networks with an operation certbench cannot convert
    for instance in tqdm(instances, desc="loading", unit="instance", disable=not progress):
        if instance.onnx not in shas:
            shas[instance.onnx] = _sha256(read_onnx_bytes(instance.onnx))
        if instance.onnx in refused:
            continue
        try:
            network = loaded_network(instance.onnx).network
        except UnsupportedOnnxOperation as exc:
            refused[instance.onnx] = str(exc)
            continue
        read_vnnlib(instance.vnnlib, math.prod(network.input_shape), network.num_outputs)
    if len(refused) == len(shas):
        raise UserError(next(iter(refused.values())))
    jobs, keys = [], {}
    for instance in instances:
        budget = instance.timeout_s * timeout_scale
        for name, options in verifiers:
            key = instance_key(instance, shas[instance.onnx], name, options, budget, attack)
            if key in done and not force:
                continue
            label = name if not options else f"{name}[{canonical_json(options)}]"
            jobs.append(InstanceJob(f"{label} {instance.name}", instance, name, options,
                                    budget, attack, budget + overhead_s, tuple(imports),
                                    device))
            keys[id(jobs[-1])] = key
    executor = executor or ProcessExecutor()
    run_id, versions, commit = uuid.uuid4().hex[:12], library_versions(), git_commit()
    rows = []
    bar = tqdm(total=len(jobs), desc="vnncomp", unit="instance", disable=not progress)
    runnable = [job for job in jobs if job.instance.onnx not in refused]
    outcomes = itertools.chain(
        ((job, Outcome("error", reason=refused[job.instance.onnx])) for job in jobs
         if job.instance.onnx in refused), executor.run(runnable))
    for job, outcome in outcomes:
        row = outcome.value if outcome.status == "ok" else job.failed_row(outcome)
        row.update(instance_key=keys[id(job)], run_id=run_id,
                   verifier=job.label.rpartition(" ")[0], onnx_sha256=shas[job.instance.onnx],
                   options=canonical_json(job.options), versions=json.dumps(versions),
                   git_commit=commit, attack=canonical_json(attack), executor=executor.name)
        text = row.pop("_file_text")
        _write_competition_files(results_dir, row, text, store.write_instance(row))
        rows.append(row)
        bar.set_postfix_str(f"{job.label}: {row['result']}"[:60])
        bar.update()
    bar.close()
    return pd.DataFrame(rows)


def check_spec_verifiers(verifiers: list[tuple[str, dict]]) -> None:
    """UserError for a verifier name that is not registered, options its constructor
    refuses, or a verifier that cannot check VNN-LIB properties (before any work)."""
    check_verifiers([VerifierSpec(name=name, options=options) for name, options in verifiers],
                    "--verifiers")
    for name, options in verifiers:
        if not isinstance(get_verifier(name, **options), SpecificationVerifier):
            raise UserError(f"verifier {name!r} cannot check VNN-LIB properties; choose from "
                            f"those with check_spec (e.g. {', '.join(DEFAULT_VERIFIERS)})")
