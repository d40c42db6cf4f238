"""Timing, peak-memory, model and report helpers shared by the benchmark scripts.

Every benchmark reports ratios against a plain Hugging Face forward measured in the same
process, so machine speed cancels out. Peak memory is the high-water mark above the level
before the call: on CUDA from the allocator's counters, on CPU from a thread sampling the
process's resident set every millisecond (large tensors are mmap-backed and returned to the
OS when freed, so RSS tracks them). On CUDA every timed call is bracketed by
``torch.cuda.synchronize()``, after a warm-up, and the fastest of the repeats is kept.

Every script takes the same options (:func:`add_run_args`): ``--device cpu|cuda``, a real model
(``--model``, the default Gemma 3 270M) or a random-weight model of a real shape
(``--shape gemma-270m|llama-8b|tiny|tiny-llama``: built on the device from a config embedded
below, nothing downloaded, prompts tokenised by a word-level tokenizer built in memory),
``--dtype``, ``--repeats`` and ``--json PATH`` (default ``bench/results/<script>-<device>-
<model>.jsonl``): the printed table is also written there, one JSON object per row.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import oculi
from shapes import DTYPES, SHAPES, random_model


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
        peak = (
            f"{self.peak_mb:8.1f}" if self.peak_mb == self.peak_mb else "       -"
        )  # NaN: not measured
        return f"| {self.name:<44} | {self.seconds * 1e3:9.1f} | {ratio} | {peak} |"


class _RssSampler:
    def __init__(self) -> None:
        import psutil  # CPU runs only (installed with accelerate)

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


def add_run_args(parser: argparse.ArgumentParser, *, repeats: int) -> None:
    """The options every benchmark script shares (see the module docstring)."""
    parser.add_argument("--model", default="gemma-3-270m", help="a real model (oculi.load)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None, help="random weights")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="model dtype (default: the model's own; for --shape, bfloat16 on cuda, else float32)",
    )
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--json", default=None, help="where to write the table as JSON lines")
    parser.add_argument(
        "--exact-rss",
        action="store_true",
        help="serve every allocation over 64 kB by mmap, so peak MB is exact; times then "
        "include page faults of every intermediate tensor, so take times from a plain run",
    )


def build_adapter(args: argparse.Namespace, texts: Iterable[str] = ()) -> Any:
    """The adapter the options ask for; ``texts`` feed a random model's word tokenizer."""
    if args.exact_rss:
        exec_with_mmap_allocations()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no CUDA device")
    if args.shape:
        default = torch.bfloat16 if args.device == "cuda" else torch.float32
        dtype = DTYPES[args.dtype] if args.dtype else default
        return random_model(args.shape, args.device, dtype, texts)
    adapter = oculi.load(args.model, device=args.device)
    if args.dtype:
        adapter.model.to(DTYPES[args.dtype])
    return adapter


# -- the report --------------------------------------------------------------------------
class Report:
    """Prints the Markdown table and keeps every row for :meth:`write` (JSON lines).

    Each JSON row carries the run's context (script, device, model or shape, dtype, versions),
    the section, the row's name, its time, its ratio to the section's baseline and peak memory.
    """

    def __init__(self, script: str, args: argparse.Namespace, adapter: Any) -> None:
        import transformers

        model = args.shape or args.model
        self.path = Path(
            args.json or Path(__file__).parent / "results" / f"{script}-{args.device}-{model}.jsonl"
        )
        self.context = {
            "script": script,
            "device": str(adapter.device),
            "gpu": torch.cuda.get_device_name() if adapter.device.type == "cuda" else None,
            "model": model,
            "random_weights": bool(args.shape),
            "dtype": str(adapter.model.dtype).removeprefix("torch."),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d"),
        }
        self.section = ""
        self.rows: list[dict[str, Any]] = []
        print(f"model: {adapter}\n" + ", ".join(f"{k} {v}" for k, v in self.context.items()))

    def start(self, title: str) -> None:
        self.section = title
        print(header(title))

    def add(
        self, m: Measurement, baseline: Measurement | None = None, note: str = "", **extra: Any
    ) -> None:
        print(m.row(baseline), note)
        self.rows.append(
            {
                **self.context,
                "section": self.section,
                "name": m.name,
                "ms": round(m.seconds * 1e3, 4),
                "baseline": baseline.name if baseline else None,
                "ratio": round(m.seconds / baseline.seconds, 4) if baseline else None,
                "peak_mb": round(m.peak_mb, 2) if m.peak_mb == m.peak_mb else None,
                **({"note": note.strip()} if note else {}),
                **extra,
            }
        )

    def fact(self, name: str, value: Any, text: str | None = None) -> None:
        """A number that is not a timing (an agreement, a count), printed and kept."""
        print(text if text is not None else f"\n{name} = {value}")
        self.rows.append({**self.context, "section": self.section, "name": name, "value": value})

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w") as fh:
            for row in self.rows:
                fh.write(json.dumps(row) + "\n")
        print(f"\n(table written to {self.path})")
