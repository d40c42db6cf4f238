"""The memory plan of a half-precision eager model counts the softmax's float32 copies.

Eager attention's ``softmax(scores, dtype=float32).to(dtype)`` copies bfloat16 scores to
float32 and casts the probabilities back: 10 bytes per score element at its peak, not the
``size + 4`` = 6 the plan counted (it held only for float32, 8 = 4 + 4). Measured as
tests/test_memory_plan.py measures float32: the peak resident memory growth of a fresh process
capturing 4,096 tokens of a tiny eager LLaMA, now in bfloat16 (the old plan: ratio ~1.6).
"""

from __future__ import annotations

import json
import subprocess
import sys

from test_memory_plan import HIGH, LOW, SCRIPT, TESTS


def test_bfloat16_eager_scores_match_the_measured_peak():
    script = SCRIPT.replace("dtype=torch.float32", "dtype=torch.bfloat16")
    assert script != SCRIPT
    out = subprocess.run(
        [sys.executable, "-c", script, "eager", "residual", "4096", str(TESTS)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["peak_before"] < got["before"] + 50 * 2**20  # the capture made the peak
    ratio = got["measured"] / got["estimate"]
    assert LOW <= ratio <= HIGH, got
    # 4 heads x 4096² scores: more than 8 bytes each alive at once (the old plan counted 6)
    assert got["measured"] > 8 * 4 * 4096**2
