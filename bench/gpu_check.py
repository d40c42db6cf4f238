"""Every benchmark on both random-weight shapes, in one process, as JSON lines under ``$OUT``.

Run on the GPU machine (nothing to download; oculi from ``src/``)::

    bash bench/gpu_check.sh                 # DEV=cuda: the full set, under 5 minutes on an H200
    DEV=cpu SMOKE=1 bash bench/gpu_check.sh  # the same steps on the CPU, tiny shapes, < 1 minute

Each step is one benchmark script's ``main`` with its options (the table below); it writes its
table to ``$OUT/<step>.jsonl`` and its printout to ``$OUT/<step>.log``. A failing or overlong
step (``SIGALRM`` after its time limit) is recorded and the next one runs.
``$OUT/summary.jsonl`` gets one line per step (ok, seconds, error) and the environment first.
Add a step by adding a row to :data:`STEPS`.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import platform
import signal
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_capture  # noqa: E402
import bench_patching  # noqa: E402

# (step, script, options, time limit in seconds). Shapes as in the engine issue: the Gemma 3 270M
# shape at 8 x 512 tokens, the Llama-3-8B shape at 4 x 1024; lens over 18 x 128 and 32 x 256
# rows; IOI sweep and causal tracing (10 samples); the 8B sweep once more in fp32 for exactness.
STEPS = [
    ("capture_gemma", bench_capture, "--shape gemma-270m --inputs 8x512 --lens-tokens 128", 40),
    # two repeats: streaming the 8B capture (27 GB) to the host took 7.4 s a call before #9
    (
        "capture_llama8b",
        bench_capture,
        "--shape llama-8b --inputs 4x1024 --lens-tokens 256 --repeats 2",
        90,
    ),
    ("patching_gemma", bench_patching, "--shape gemma-270m --samples 10", 50),
    ("patching_llama8b", bench_patching, "--shape llama-8b --samples 10 --only sweep", 60),
    (
        "patching_llama8b_fp32",
        bench_patching,
        "--shape llama-8b --dtype float32 --only sweep --repeats 1",
        50,
    ),
]
# SMOKE=1: the same steps with the toy shapes of the same families and small inputs.
SMOKE = {
    "gemma-270m": "tiny",
    "llama-8b": "tiny-llama",
    "8x512": "2x24",
    "4x1024": "2x32",
    "--lens-tokens 128": "--lens-tokens 16",
    "--lens-tokens 256": "--lens-tokens 16",
    "--samples 10": "--samples 2",
}


# ...and on the CPU, the strategies "auto" picks on CUDA, so the dry run takes the GPU's paths.
SMOKE_STRATEGIES = {
    "bench_capture": " --lens-strategy rows",
    "bench_patching": " --strategy fused",
}


class StepTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise StepTimeout("time limit reached")


def environment(device: str) -> dict:
    import transformers

    info = {
        "step": "environment",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device,
        "cuda": torch.version.cuda,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if device == "cuda" and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        info |= {"gpu": torch.cuda.get_device_name(), "gpu_total_gb": round(total / 2**30, 1)}
    return info


def run_step(name, module, options: str, limit: int, out: Path, device: str, smoke: bool) -> dict:
    if smoke:
        for big, small in SMOKE.items():
            options = options.replace(big, small)
        options = options.replace("--repeats 2", "") + " --repeats 1"
        if device == "cpu":
            options += SMOKE_STRATEGIES[module.__name__]
    argv = [*options.split(), "--device", device, "--json", str(out / f"{name}.jsonl")]
    print(f"== {name}: {module.__name__} {' '.join(argv)}", flush=True)
    log = io.StringIO()
    t0, error = time.perf_counter(), None
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(limit)
    try:
        with contextlib.redirect_stdout(log):
            module.main(argv)
    except BaseException as exc:  # a failing step must not stop the others
        if isinstance(exc, KeyboardInterrupt):
            raise
        error = f"{type(exc).__name__}: {exc}"
        log.write("\n" + traceback.format_exc())
    finally:
        signal.alarm(0)
    seconds = time.perf_counter() - t0
    (out / f"{name}.log").write_text(log.getvalue())
    print(log.getvalue()[-3000:] if error else log.getvalue(), flush=True)
    print(f"== {name}: {'ok' if error is None else error} in {seconds:.1f} s", flush=True)
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"step": name, "ok": error is None, "seconds": round(seconds, 2), "error": error}


def main() -> int:
    device = os.environ.get("DEV", "cuda")
    smoke = os.environ.get("SMOKE", "0") not in ("", "0")
    out = Path(os.environ.get("OUT") or Path(__file__).parent / "results" / "gpu_check")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    summary = [environment(device)]
    print(json.dumps(summary[0]), flush=True)
    t0 = time.perf_counter()
    for name, module, options, limit in STEPS:
        summary.append(run_step(name, module, options, limit, out, device, smoke))
        with open(out / "summary.jsonl", "w") as fh:  # rewritten after each step: kept if cut
            fh.writelines(json.dumps(row) + "\n" for row in summary)
    failed = [row["step"] for row in summary[1:] if not row["ok"]]
    print(f"\n{len(STEPS) - len(failed)}/{len(STEPS)} steps ok in {time.perf_counter() - t0:.0f} s")
    print(f"failed: {', '.join(failed)}" if failed else "all ok", f"; JSON lines under {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
