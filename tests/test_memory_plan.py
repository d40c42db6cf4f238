"""The memory plan counts what the forward allocates for the attention implementation in use
(issue 16, item 14).

An eager model materialises every layer's attention scores ``[B, H, T, T]`` whether or not
patterns are captured; sdpa does not. The plan's estimate is checked against the peak resident
memory of a fresh process (``VmHWM``; it sees every allocation torch makes, unlike
tracemalloc) on a tiny LLaMA at a length where scores dominate, and a 30,000-token residual
capture of an eager model is refused with the numbers where sdpa fits.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import oculi
from models import _config
from oculi.capture import memory
from oculi.errors import MemoryPlanError

TESTS = Path(__file__).resolve().parent
GIB = 2**30
LOW, HIGH = 0.8, 1.25  # measured peak / estimate, for a capture whose scores dominate

SCRIPT = r"""
import json, os, sys
import torch
sys.path.insert(0, sys.argv[4])
from models import _config
from procmem import keep_returns, proc_status
from transformers import AutoModelForCausalLM
import oculi
from oculi import CaptureConfig
from oculi.capture import memory

impl, what, t = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = _config("llama_gqa")
cfg.max_position_embeddings = t
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation=impl)
adapter = oculi.attach(model.eval())
ids = torch.randint(3, 96, (t,), generator=torch.Generator().manual_seed(0))
plans = keep_returns(memory, "plan_capture")
capture = {
    "residual": adapter.capture_residual,
    "q": lambda x: adapter.capture(x, CaptureConfig(capture_keys=False, capture_values=False,
                                                    capture_patterns=False)),
}[what]
capture(ids[:32])  # warm up: allocator, lazy imports
with open("/proc/self/statm") as f:
    before = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
peak_before = proc_status("VmHWM")
capture(ids)
peak = proc_status("VmHWM")
print(json.dumps({"estimate": plans[-1].need["cpu"], "measured": peak - before,
                  "peak_before": peak_before, "before": before}))
"""


def measure(impl: str, what: str, t: int) -> dict:
    """The plan's estimate and the measured peak growth of one capture, in a fresh process."""
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, impl, what, str(t), str(TESTS)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_eager_scores_are_counted_without_patterns_and_match_measured_peak():
    """4,096 tokens, 4 heads: each score tensor is 268 MB, the rest ~40 MB."""
    got = measure("eager", "residual", 4096)
    assert got["peak_before"] < got["before"] + 50 * 2**20  # the capture made the peak
    ratio = got["measured"] / got["estimate"]
    assert LOW <= ratio <= HIGH, got
    assert got["measured"] > 2 * 268 * 10**6  # two score tensors alive: what the old plan missed


@pytest.mark.parametrize("what", ["residual", "q"])
def test_sdpa_is_planned_without_scores_and_never_underestimated(what):
    got = measure("sdpa", what, 4096)
    eager = tiny_long("eager", 4096)
    requests = RESIDUAL if what == "residual" else {"q": (0, 1, 2)}
    eager_plan = memory.plan_capture(eager, batch_of(eager, 1, 4096), requests)
    assert got["estimate"] < eager_plan.need["cpu"] / 4
    assert got["measured"] <= HIGH * got["estimate"], got


def tiny_long(impl: str, t: int = 30_000) -> oculi.Adapter:
    cfg = _config("llama_gqa")
    cfg.max_position_embeddings = t
    from transformers import AutoModelForCausalLM

    # 3 layers of width 64: tiny whatever the context; only planned, never run at length t
    return oculi.attach(AutoModelForCausalLM.from_config(cfg, attn_implementation=impl))


def batch_of(adapter: oculi.Adapter, b: int, t: int):
    ids = torch.randint(3, 96, (b, t), generator=torch.Generator().manual_seed(0))
    return adapter.prepare(ids)


RESIDUAL = {"resid_pre": (0, 1, 2), "resid_post": (0, 1, 2)}


def test_a_30k_token_residual_capture_of_an_eager_model_runs_blocked_or_is_refused():
    eager, sdpa = tiny_long("eager"), tiny_long("sdpa")
    free = {"cpu": 16 * GIB}
    ok = memory.plan_capture(sdpa, batch_of(sdpa, 1, 30_000), RESIDUAL, free=free)
    assert ok.rows == 1 and ok.need["cpu"] < 5 * GIB and ok.block is None
    scores = 4 * 30_000**2 * 8  # H·T²·(4 + 4) bytes: 26.8 GiB
    # the scores do not fit: attention runs a block of query positions at a time (issue 20)
    blocked = memory.plan_capture(eager, batch_of(eager, 1, 30_000), RESIDUAL, free=free)
    assert blocked.block is not None and blocked.block < 30_000
    assert blocked.need["cpu"] < 5 * GIB
    # and not even that fits in 1 GiB (the boolean mask alone is 0.84 GiB): refused
    with pytest.raises(MemoryPlanError) as err:
        memory.plan_capture(eager, batch_of(eager, 1, 30_000), RESIDUAL, free={"cpu": GIB})
    msg = str(err.value)
    assert f"whose scores take {scores / GIB:.2f} GiB per row at 30000 tokens" in msg
    assert "1.00 GiB free" in msg and "set_attn_implementation('sdpa')" in msg
    assert "block of query positions" in msg


def test_eager_batches_are_micro_batched_by_their_scores():
    eager = tiny_long("eager", 8192)
    per_row = memory.forward_bytes(eager, 8192, False, implementation="eager", bridged=False)
    assert per_row > 4 * 8192**2 * 8  # the scores are in
    plan = memory.plan_capture(
        eager, batch_of(eager, 4, 8192), RESIDUAL, free={"cpu": int(2.5 * per_row / 0.8)}
    )
    assert plan.rows == 2


def test_implementation_is_read_through_an_open_context():
    from models import tiny_model
    from oculi.intervention import InterventionContext, SteeringVector

    model = tiny_model("gemma2")  # eager (soft-capping)
    adapter = oculi.attach(model)
    assert memory.attention_implementation(adapter) == "eager"
    vec = torch.ones(adapter.d_model)
    with InterventionContext(adapter, [SteeringVector(vec, layer=0)]):
        assert model.config._attn_implementation in ("oculi", "eager")
        assert memory.attention_implementation(adapter) == "eager"
