"""The GPU benchmark script stays runnable: its CPU dry run (tiny shapes) completes every step.

A GPU machine is lent rarely and each start costs minutes, so ``bench/gpu_check.py`` must not
reach it broken. This runs ``DEV=cpu SMOKE=1`` (the same steps with tiny shapes and the
strategies CUDA would pick; only the CUDA synchronisation is left out) and checks each step's
JSON lines.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_run_on_cpu(tmp_path):
    env = dict(os.environ, DEV="cpu", SMOKE="1", OUT=str(tmp_path), OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    summary = [json.loads(line) for line in (tmp_path / "summary.jsonl").read_text().splitlines()]
    assert summary[0]["step"] == "environment" and summary[0]["device"] == "cpu"
    failed = {row["step"]: row["error"] for row in summary[1:] if not row["ok"]}
    assert failed == {}, done.stdout[-4000:]
    assert done.returncode == 0
    steps = [row["step"] for row in summary[1:]]
    assert len(steps) == 5
    for step in steps:
        rows = [json.loads(line) for line in (tmp_path / f"{step}.jsonl").read_text().splitlines()]
        assert rows and all(row["device"] == "cpu" and row["random_weights"] for row in rows)
        timed = [row for row in rows if "ms" in row]
        assert timed and all(row["ms"] > 0 for row in timed)
    capture = [
        json.loads(line) for line in (tmp_path / "capture_gemma.jsonl").read_text().splitlines()
    ]
    assert {row["model"] for row in capture} == {"tiny"}
    # fp32 on the CPU, with the strategies CUDA would pick: sweeps and tracing equal the naive loops
    agreement = [
        row["value"]
        for step in steps
        for row in map(json.loads, (tmp_path / f"{step}.jsonl").read_text().splitlines())
        if row["name"] == "max |naive - oculi|"
    ]
    assert len(agreement) == 4 and max(agreement) < 1e-4
