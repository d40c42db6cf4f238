"""Timing and peak-memory helpers shared by the benchmark scripts.

Every benchmark reports ratios against a plain Hugging Face forward measured in the same
process, so machine speed cancels out. Peak memory is the high-water mark above the level
before the call: on CUDA from the allocator's counters, on CPU from a thread sampling the
process's resident set every millisecond (large tensors are mmap-backed and returned to the
OS when freed, so RSS tracks them).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil
import torch


def exec_with_mmap_allocations() -> None:
    """Re-run this script with glibc serving every allocation over 64 kB by ``mmap``.

    By default glibc keeps freed memory in its heap, so a second call that reuses it shows no
    growth in the resident set and the sampler below would read a peak of 0. With the
    threshold fixed, large tensors are mapped and unmapped on free and RSS tracks them.
    """
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or sys.platform != "linux":
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


@dataclass
class Measurement:
    name: str
    seconds: float  # fastest of the repeats (the least disturbed by other load)
    peak_mb: float  # peak memory above the starting level

    def row(self, baseline: Measurement | None = None) -> str:
        ratio = f"{self.seconds / baseline.seconds:6.2f}x" if baseline else "   -   "
        return f"| {self.name:<44} | {self.seconds * 1e3:9.1f} | {ratio} | {self.peak_mb:8.1f} |"


class _RssSampler:
    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        self.peak = max(self.peak, self.proc.memory_info().rss)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(0.001)

    def __enter__(self) -> _RssSampler:
        self.start = self.proc.memory_info().rss
        self.peak = self.start
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def _timed(fn: Callable[[], object], cuda: bool) -> float:
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    del out
    return elapsed


def _peak_mb(fn: Callable[[], object], cuda: bool) -> float:
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - start) / 2**20
        del out
        return peak
    with _RssSampler() as sampler:
        out = fn()
        sampler.sample()  # the result itself, before it is freed
        del out
    return (sampler.peak - sampler.start) / 2**20


def measure(
    name: str,
    fn: Callable[[], object],
    *,
    repeats: int = 5,
    warmup: int = 1,
    device: torch.device | None = None,
) -> Measurement:
    """Fastest time of ``fn()`` over ``repeats`` runs and its peak extra memory (MB).

    The minimum, not the median: on a shared machine other load only ever adds time, so the
    fastest run is the best estimate of the cost itself.
    """
    return measure_all([(name, fn)], repeats=repeats, warmup=warmup, device=device)[0]


def measure_all(
    named: list[tuple[str, Callable[[], object]]],
    *,
    repeats: int = 5,
    warmup: int = 1,
    device: torch.device | None = None,
) -> list[Measurement]:
    """:func:`measure` for several functions, timed round-robin.

    Each round runs every function once, so a stretch of load from elsewhere slows all of
    them alike instead of one row; each row keeps its fastest round.
    """
    cuda = device is not None and device.type == "cuda"
    for _, fn in named:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in named]
    for _ in range(repeats):
        for i, (_, fn) in enumerate(named):
            times[i].append(_timed(fn, cuda))
    return [Measurement(name, min(ts), _peak_mb(fn, cuda)) for (name, fn), ts in zip(named, times)]


def header(title: str) -> str:
    return (
        f"\n### {title}\n\n| {'what':<44} | time (ms) | ratio  | peak MB  |\n"
        f"|{'-' * 46}|-----------|--------|----------|"
    )
