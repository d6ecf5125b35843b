"""Executors: where and how tasks (cells, attacks) run.

A task is a value with ``run()`` (cells.py: `Cell`, `AttackJob`), a ``label``, a
``device`` and an optional ``timeout_s``. An executor takes a list of tasks and yields
``(task, Outcome)`` as each one ends; it never writes results (the driver does).

- `ProcessExecutor` (the default, `certbench run --workers N`): every task in a fresh
  worker process, forked from a clean server process that has imported certbench and
  torch once (``multiprocessing``'s *forkserver*; no heavy work ever happens in it, so a
  worker starts with no memory freed by an earlier task, and its peak resident memory is
  the task's own, plus a few MiB of library code paged in on first use). The driver
  polls each worker: past ``timeout_s`` it is killed and the task ends as ``timeout``;
  past ``memory_limit_bytes`` of resident memory (read from ``/proc``, every 20 ms) it is
  killed and ends as ``oom``; a worker that dies (a signal such as SIGSEGV, or an exit
  without a result) ends as ``error`` naming the signal. Up to ``workers`` tasks run side
  by side, each with ``threads`` torch threads (by default the cores divided among the
  workers). A worker whose driver has died exits by itself.
- `InlineExecutor` (``--executor inline``, and the Python API's default, whose models
  may be classes a worker cannot import): tasks in the driver's own process, one after
  the other; exceptions are contained, but there is no time limit, no protection from
  crashes, and CPU memory may read low when a task reuses memory an earlier one freed.
- `RayExecutor` (ray_executor.py, ``--executor ray``): the same isolation on the nodes of
  a Ray cluster.

Why by hand and not ``concurrent.futures.ProcessPoolExecutor``: a pool reuses its
workers (so memory could not be measured per task) and cannot kill one task's worker
for a timeout or a memory limit without breaking the whole pool.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from certbench.errors import UserError

POLL_S = 0.02
DRIVER_CHECK_S = 1.0
DEFAULT_MEMORY_FRACTION = 0.85
PRELOAD = ["certbench.run.cells", "torch.fx.experimental.symbolic_shapes"]
"""Imported once by the fork server, so that no worker pays (or is charged) for them: the
harness with every verifier, and sympy, which torch.fx's shape propagation imports
lazily (about 33 MiB, once charged to every bound-propagation cell)."""


class Task(Protocol):
    label: str
    device: str
    timeout_s: float | None

    def run(self) -> Any: ...


@dataclass
class Outcome:
    """How a task ended: ``status`` ok / error / timeout / oom, its ``value`` when ok, the
    ``reason`` otherwise, and the wall-clock seconds from start to end."""

    status: str
    value: Any = None
    reason: str | None = None
    seconds: float = 0.0


class Executor(Protocol):
    """Where tasks run: ``run`` yields ``(task, Outcome)`` as each task ends, in any order;
    ``remote`` says whether tasks run on other machines (models are then trained as
    tasks too); ``resolve_device`` reads a device name as the workers will see it."""

    name: str
    remote: bool

    def resolve_device(self, name: str) -> torch.device: ...

    def run(self, tasks: Iterable[Task]) -> Iterator[tuple[Task, Outcome]]: ...


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def physical_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def default_memory_limit() -> int | None:
    """The per-task resident-memory limit when none is given: 85 % of physical memory,
    so that a runaway task is stopped by the driver before the kernel's OOM killer
    picks a process."""
    total = physical_memory_bytes()
    return None if total is None else int(DEFAULT_MEMORY_FRACTION * total)


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA if present), ``cpu`` or ``cuda[:N]``, on this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UserError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but CUDA is not available; use cpu or auto")
    return device


def _contained(task: Task) -> Outcome:
    """Run ``task`` here; an exception becomes an ``error`` (or ``oom``) outcome."""
    started = time.perf_counter()
    try:
        value = task.run()
    except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
        return Outcome("oom", reason=f"{type(exc).__name__}: {exc}".splitlines()[0],
                       seconds=time.perf_counter() - started)
    except Exception as exc:
        return Outcome("error", reason=f"{type(exc).__name__}: {exc}",
                       seconds=time.perf_counter() - started)
    return Outcome("ok", value, seconds=time.perf_counter() - started)


class InlineExecutor:
    """Tasks in this process, one after the other (see the module docstring)."""

    remote = False
    name = "inline"
    resolve_device = staticmethod(resolve_device)

    def run(self, tasks: Iterable[Task]) -> Iterator[tuple[Task, Outcome]]:
        for task in tasks:
            yield task, _contained(task)


def _exit_with_driver(driver_pid: int) -> None:
    """Daemon thread of a worker: exit when the driver is gone (a killed run must not
    leave workers behind; the worker's parent is the fork server, not the driver)."""
    def watch() -> None:
        while True:
            time.sleep(DRIVER_CHECK_S)
            try:
                os.kill(driver_pid, 0)
            except ProcessLookupError:
                os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def _worker(conn: Any, task_bytes: bytes, threads: int, driver_pid: int,
            environment: dict[str, str]) -> None:
    """A worker's life: the task and its outcome travel as plain pickles (multiprocessing's
    own pickler would pass tensors as shared-memory handles that die with the worker).
    ``environment``: what the worker takes from the driver (`_driver_environment`)."""
    os.environ.update(environment)
    _exit_with_driver(driver_pid)
    torch.set_num_threads(threads)
    try:
        task = pickle.loads(task_bytes)
    except Exception as exc:  # e.g. a class the worker cannot import
        outcome = Outcome("error", reason=f"the worker cannot load the task ({exc}); "
                          "run it with the inline executor")
    else:
        outcome = _contained(task)
    try:
        payload = pickle.dumps(outcome)
    except Exception as exc:  # the value would not pickle
        payload = pickle.dumps(Outcome("error", reason=f"result not transferable: {exc}",
                                       seconds=outcome.seconds))
    conn.send_bytes(payload)
    conn.close()


def _driver_environment() -> dict[str, str]:
    """What a worker takes from the driver's environment as it is now (the fork server
    may be older): the GPU assignment and the folders of the matrix's plugins."""
    return {k: v for k, v in os.environ.items()
            if k in ("CUDA_VISIBLE_DEVICES", "CERTBENCH_PLUGIN_PATH")}


def _resident_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(code).name
    except ValueError:
        return f"signal {code}"


@dataclass
class _Running:
    task: Task
    process: Any
    conn: Any
    started: float
    peak_rss: int = 0


def _context() -> multiprocessing.context.BaseContext:
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")  # not POSIX: slower starts, same rules
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


class ProcessExecutor:
    """Each task in a fresh worker process (see the module docstring)."""

    remote = False
    resolve_device = staticmethod(resolve_device)

    def __init__(self, workers: int = 1, threads: int | None = None,
                 memory_limit_bytes: int | None = None):
        if workers < 1:
            raise UserError("--workers must be at least 1")
        self.workers = workers
        self.threads = threads or max(1, available_cores() // workers)
        self.memory_limit_bytes = memory_limit_bytes or default_memory_limit()
        self._context = _context()
        self.name = f"process[workers={workers},threads={self.threads}]"

    def _start(self, task: Task) -> _Running:
        receive, send = self._context.Pipe(duplex=False)
        process = self._context.Process(target=_worker, name=f"certbench: {task.label}",
                                        args=(send, pickle.dumps(task), self.threads,
                                              os.getpid(), _driver_environment()),
                                        daemon=True)
        process.start()
        send.close()
        return _Running(task, process, receive, time.perf_counter())

    def _check(self, job: _Running) -> Outcome | None:
        """The outcome of a worker that has ended (or was just stopped), else None."""
        elapsed = time.perf_counter() - job.started
        if job.conn.poll():
            try:
                outcome = pickle.loads(job.conn.recv_bytes())
            except EOFError:  # died while sending
                outcome = None
            job.process.join()
            if outcome is not None:
                return outcome
        if not job.process.is_alive():
            job.process.join()
            code = job.process.exitcode
            reason = (f"worker killed by {_signal_name(-code)}" if code < 0 else
                      f"worker exited with code {code} and no result")
            if code == -signal.SIGKILL:
                reason += " (on Linux usually the kernel's OOM killer; set a memory limit)"
            return Outcome("error", reason=reason, seconds=elapsed)
        timeout = job.task.timeout_s
        if timeout is not None and elapsed > timeout:
            job.process.kill()
            job.process.join()
            return Outcome("timeout", reason=f"exceeded the limit of {timeout:g} s wall clock",
                           seconds=elapsed)
        rss = _resident_bytes(job.process.pid)
        if rss is not None:
            job.peak_rss = max(job.peak_rss, rss)
            limit = self.memory_limit_bytes
            if limit is not None and rss > limit:
                job.process.kill()
                job.process.join()
                return Outcome("oom", reason=f"resident memory {rss / 2**30:.2f} GiB exceeded "
                               f"the limit of {limit / 2**30:.2f} GiB", seconds=elapsed)
        return None

    def run(self, tasks: Iterable[Task]) -> Iterator[tuple[Task, Outcome]]:
        queue = list(tasks)[::-1]
        running: list[_Running] = []
        try:
            while queue or running:
                while queue and len(running) < self.workers:
                    task = queue.pop()
                    try:
                        running.append(self._start(task))
                    except (pickle.PicklingError, TypeError, AttributeError) as exc:
                        yield task, Outcome("error", reason=f"cannot send the task to a "
                                            f"worker ({exc}); run it with the inline executor")
                for job in list(running):
                    outcome = self._check(job)
                    if outcome is not None:
                        running.remove(job)
                        job.conn.close()
                        yield job.task, outcome
                time.sleep(POLL_S)
        finally:  # the consumer stopped early (an exception, Ctrl-C): stop the workers
            for job in running:
                job.process.kill()
                job.process.join()
