"""Cells as Ray tasks, for a matrix on many machines (the optional extra ``certbench[ray]``).

    ray start --head                        # on the first machine; prints its address
    ray start --address HEAD_IP:6379        # on every other machine
    certbench run --matrix M --executor ray --address HEAD_IP:6379

Each task (a cell, the PGD attack of a model, the training of a missing model) becomes a
Ray task with ``cpus_per_task`` CPUs and one GPU when its device is CUDA. On its node the
task runs as in the local executor (executors.py: a fresh worker process with the time
limit, the memory limit and the crash containment; its CPU memory measured there), and
its rows come back to the driver, the only writer of the store, so a killed run resumes
as locally. At most as many tasks are in flight as the cluster has room for (its CPUs
over ``cpus_per_task``, or ``workers``), so a task's time limit starts when it starts.

What every node needs: certbench with the same version of torch, the modules of the
matrix's ``imports``, and, for training, the dataset (the same ``--data-dir`` path, or
``download = true``). Models and points travel with the tasks; nothing else is shared.
A CUDA cell on a cluster without GPUs fails at once with a message instead of pending.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from certbench.errors import UserError
from certbench.run.executors import Outcome, ProcessExecutor, Task


def _run_on_node(task: Task, threads: int, memory_limit_bytes: int | None) -> Outcome:
    """A Ray task's body: the task in a fresh local worker process on this node."""
    executor = ProcessExecutor(1, threads=threads, memory_limit_bytes=memory_limit_bytes)
    (_, outcome), = executor.run([task])
    return outcome


class RayExecutor:
    """Tasks on a Ray cluster (see the module docstring)."""

    remote = True

    def __init__(self, address: str | None = None, workers: int = 1,
                 memory_limit_bytes: int | None = None, cpus_per_task: int = 1):
        try:
            import ray
        except ImportError as exc:
            raise UserError("the ray executor needs Ray: pip install 'certbench[ray]'") from exc
        if not ray.is_initialized():
            try:
                ray.init(address=address, include_dashboard=False,
                         logging_level=logging.WARNING)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise UserError(f"cannot connect to the Ray cluster at {address!r} ({exc}); "
                                "start one with `ray start --head`") from exc
        self._ray = ray
        resources = ray.cluster_resources()
        self.gpus = int(resources.get("GPU", 0))
        self.cpus_per_task = cpus_per_task
        self.memory_limit_bytes = memory_limit_bytes
        room = max(1, int(resources.get("CPU", 1)) // cpus_per_task)
        self.in_flight = workers if workers > 1 else room
        self.name = (f"ray[cpus={int(resources.get('CPU', 0))},gpus={self.gpus},"
                     f"cpus_per_task={cpus_per_task}]")
        self._remote = ray.remote(_run_on_node)

    def resolve_device(self, name: str) -> torch.device:
        """``auto`` is CUDA when the cluster has GPUs; CUDA on a cluster without any is an
        error now rather than a task pending for ever."""
        if name == "auto":
            return torch.device("cuda" if self.gpus else "cpu")
        try:
            device = torch.device(name)
        except RuntimeError as exc:
            raise UserError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from exc
        if device.type == "cuda" and not self.gpus:
            raise UserError(f"device {name!r} asked for, but the Ray cluster has no GPU; use "
                            "--device cpu, or add GPU nodes (`ray start --num-gpus N`)")
        return device

    def _submit(self, task: Task) -> Any:
        gpu = torch.device(task.device).type == "cuda"
        return self._remote.options(
            num_cpus=self.cpus_per_task, num_gpus=1 if gpu else 0, max_retries=0,
            name=task.label[:100],
        ).remote(task, self.cpus_per_task, self.memory_limit_bytes)

    def run(self, tasks: Iterable[Task]) -> Iterator[tuple[Task, Outcome]]:
        ray = self._ray
        queue = list(tasks)[::-1]
        running: dict[Any, Task] = {}
        try:
            while queue or running:
                while queue and len(running) < self.in_flight:
                    task = queue.pop()
                    running[self._submit(task)] = task
                (ref,), _ = ray.wait(list(running), num_returns=1)
                task = running.pop(ref)
                try:
                    outcome = ray.get(ref)
                except ray.exceptions.OutOfMemoryError as exc:  # Ray's memory monitor
                    outcome = Outcome("oom", reason=f"Ray stopped the task: {exc}"[:500])
                except ray.exceptions.RayError as exc:  # a lost node or worker
                    outcome = Outcome("error", reason=f"{type(exc).__name__}: {exc}"[:500])
                yield task, outcome
        finally:
            for ref in running:
                ray.cancel(ref, force=True)
