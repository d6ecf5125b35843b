"""Wall-clock timers and peak-memory probes, CUDA and CPU.

- Time: ``time.perf_counter`` around the work, with ``torch.cuda.synchronize`` before
  reading the clock on CUDA so that queued kernels are counted; `timed_cpu` adds the
  process's CPU time (``time.process_time``: every thread of the process, user and
  system), which another process on the machine does not inflate the way it does wall
  clock, but which counts a spinning thread as work.
- Memory on CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``,
  so the peak belongs to the measured block (``mem_kind = "cuda"``).
- Memory on CPU (Linux): the kernel's resident-set high-water mark (VmHWM) is reset by
  writing 5 to ``/proc/self/clear_refs``; the peak attributable to the block is then
  VmHWM after it minus VmRSS before it (``mem_kind = "rss"``). It counts everything the
  process allocated meanwhile, torch's allocator included. Where that file cannot be
  written (not Linux), the memory is recorded as missing (``mem_kind = "unavailable"``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

T = TypeVar("T")
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], T], device: torch.device) -> tuple[T, float]:
    """Run ``fn`` and return its result and wall-clock seconds (CUDA synchronised)."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def timed_cpu(fn: Callable[[], T], device: torch.device) -> tuple[T, float, float]:
    """Run ``fn``; its result, wall-clock seconds (CUDA synchronised) and CPU seconds."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def _status_kib(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


@dataclass
class PeakMemory:
    """Context manager: ``peak_bytes`` and ``kind`` of the block it wraps."""

    device: torch.device
    peak_bytes: int | None = None
    kind: str = "unavailable"

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = 0
        else:
            try:
                _CLEAR_REFS.write_text("5")
                self._base = _status_kib("VmRSS")
            except (OSError, KeyError):
                self._base = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
            self.kind = "cuda"
        elif self._base is not None:
            self.peak_bytes = max(0, _status_kib("VmHWM") - self._base) * 1024
            self.kind = "rss"
