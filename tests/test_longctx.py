"""Long contexts (issue 20, item 3): patterns at 4k-16k tokens, blocked and streamed to disk.

A 16,384-token pattern capture of a tiny LLaMA streams 1 GiB of patterns to a capture folder
in a fresh process whose peak resident memory (``VmHWM``) grows by less than the patterns
alone, and which equals the in-memory capture on a prefix (causal attention: the prefix's
patterns are the top-left block, and nothing of a prefix row lies beyond it) and a hand
softmax of the captured queries and keys on the last row. Gemma 3 270M streams 4,096 tokens.
A capture that cannot fit is refused before any forward with the estimate; an error in the
middle of a streamed forward leaves no folder, no hidden folder and no hook.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import oculi
from models import _config, oculi_hooks, tiny_model
from oculi import CaptureConfig, ResidualConfig
from oculi.capture import memory
from oculi.capture.engine import record
from oculi.errors import FileWriteError, MemoryPlanError, OutputExistsError

TESTS = Path(__file__).resolve().parent
PATTERNS_ONLY = dict(capture_queries=False, capture_keys=False, capture_values=False)

SCRIPT = r"""
import json, os, sys
import torch
sys.path.insert(0, sys.argv[3])
from models import _config
from procmem import keep_returns, proc_status
from transformers import AutoModelForCausalLM
import oculi
from oculi import CaptureConfig
from oculi.capture import stream

t, folder = int(sys.argv[1]), sys.argv[2]
cfg = _config("llama_gqa")
cfg.max_position_embeddings = t
cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 1, 1, 64
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
adapter = oculi.attach(model)
ids = torch.randint(3, 96, (t,), generator=torch.Generator().manual_seed(0))
config = CaptureConfig(layers=[1], capture_values=False)
plans = keep_returns(stream, "plan_stream")
adapter.capture(ids[:64], config, stream_to=folder)  # warm up: allocator, lazy imports
before = proc_status("VmRSS")
cap = adapter.capture(ids, config, stream_to=folder)
peak = proc_status("VmHWM")
after = proc_status("VmRSS")
n = 512
ref = adapter.capture(ids[:n], config)  # in memory
got = cap.patterns[:, :, :n]
q, k = cap.queries[0, 0], cap.keys[0, 0]  # [T, D] post-RoPE
hand = torch.softmax((q[-1] @ k.T) * q.shape[-1] ** -0.5, dim=-1)
print(json.dumps({
    "shape": list(cap.patterns.shape),
    "growth": peak - before,
    "left_after": after - before,
    "estimate": plans[-1].need["cpu"],
    "disk": plans[-1].disk,
    "prefix_err": (got[:, :, :, :n] - ref.patterns).abs().max().item(),
    "beyond_prefix": got[:, :, :, n:].abs().max().item(),
    "last_row_err": (cap.patterns[0, 0, -1] - hand).abs().max().item(),
    "last_row_sum": cap.patterns[0, 0, -1].sum().item(),
    "queries_err": (cap.queries[:, :, :n] - ref.queries).abs().max().item(),
    "files": sorted(os.listdir(folder)),
}))
"""


def test_16k_patterns_stream_to_disk_in_bounded_memory_and_equal_in_memory(tmp_path):
    t = 16384
    folder = tmp_path / "long"
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(t), str(folder), str(TESTS)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    patterns = t * t * 4  # one head, one layer, float32: 1 GiB
    assert got["shape"] == [1, 1, t, t]
    assert got["disk"] >= patterns
    # in memory the patterns alone would be 1 GiB, and eager scores 2 GiB more
    assert got["growth"] < 0.6 * patterns, got
    assert got["growth"] <= 1.25 * got["estimate"], got
    assert got["prefix_err"] <= 1e-6 and got["queries_err"] <= 1e-5, got
    assert got["beyond_prefix"] == 0.0  # causal: a prefix row attends only to the prefix
    assert got["last_row_err"] <= 1e-6 and abs(got["last_row_sum"] - 1) < 1e-5, got
    assert "oculi-capture.json" in got["files"] and "pattern.safetensors" in got["files"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no hidden folder
    before = _rss()
    loaded = oculi.load_capture(folder)  # memory-mapped, without the model
    assert loaded.attention.patterns.shape == (1, 1, t, t)
    assert float(loaded.attention.patterns[0, 0, -1].sum()) == pytest.approx(1, abs=1e-5)
    assert _rss() - before < 64 * 2**20  # 1 GiB of patterns opened, one row read


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) * 1024


@pytest.mark.gemma
def test_gemma_4k_patterns_streamed_equal_in_memory(gemma, tmp_path):
    ids = torch.randint(10, 20000, (4096,), generator=torch.Generator().manual_seed(1))
    layers = [4, 5]  # a sliding-window layer (window 512) and a full one
    config = CaptureConfig(layers=layers, **PATTERNS_ONLY)
    got = gemma.capture(ids, config, stream_to=tmp_path / "gemma")
    assert got.patterns.shape == (len(layers), gemma.n_heads, 4096, 4096)
    whole = gemma.capture(ids, config)  # in memory, the model's own eager attention
    assert (got.patterns - whole.patterns).abs().max() <= 1e-6
    n = 600  # beyond the sliding window
    ref = gemma.capture(ids[:n], config)
    # a 600-token forward differs from the first 600 positions of a 4,096-token one by float32
    # rounding (matmuls of other shapes; 2.6e-6 here), in memory as streamed
    assert (got.patterns[:, :, :n, :n] - ref.patterns).abs().max() <= 1e-5
    assert got.patterns[:, :, :n, n:].abs().max() == 0
    rows = got.patterns[:, :, -1]
    assert torch.allclose(rows.sum(-1), torch.ones_like(rows[..., 0]), atol=1e-5)
    assert rows[0, :, : 4096 - 512].abs().max() == 0  # layer 4 slides: the window of 512
    assert rows[1, :, : 4096 - 512].abs().max() > 0  # layer 5 attends to everything


def _long_llama(t: int, eager: bool = False):
    from transformers import AutoModelForCausalLM

    cfg = _config("llama_gqa")
    cfg.max_position_embeddings = t
    torch.manual_seed(0)
    kw = {"attn_implementation": "eager"} if eager else {}
    return oculi.attach(AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, **kw).eval())


def _count_forwards(adapter) -> list:
    calls: list = []
    adapter.layer_modules[0].register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def test_a_capture_that_cannot_fit_is_refused_before_any_forward_with_the_estimate(tmp_path):
    t = 32768  # every layer's patterns: 3 x 4 x 32768^2 x 4 bytes = 48 GiB
    adapter = _long_llama(t)
    calls = _count_forwards(adapter)
    ids = torch.randint(3, 96, (t,))
    with pytest.raises(MemoryPlanError) as err:
        adapter.capture(ids, CaptureConfig(**PATTERNS_ONLY))
    text = str(err.value)
    assert "'pattern' (layers 0-2): 48.00 GiB" in text, text
    assert "free" in text and "stream_to=" in text
    # streamed, a disk too small for them is refused the same way, before the folder exists
    t = 131072  # 768 GiB of patterns
    adapter = _long_llama(t)
    calls += _count_forwards(adapter)
    with pytest.raises(MemoryPlanError) as err:
        adapter.capture(
            torch.randint(3, 96, (t,)), CaptureConfig(**PATTERNS_ONLY), stream_to=tmp_path / "x"
        )
    text = str(err.value)
    assert "does not fit on the disk" in text and "'pattern' (layers 0-2): 768.00 GiB" in text
    assert calls == [] and list(tmp_path.iterdir()) == []


@contextlib.contextmanager
def failing_at(adapter, layer: int, error: type[BaseException]):
    """While open, the forward raises ``error`` on entering ``layer`` (after the layers
    before it were streamed)."""

    def fail(*_):
        raise error("stopped mid-stream")

    handle = adapter.layer_modules[layer].register_forward_pre_hook(fail)
    try:
        yield
    finally:
        handle.remove()


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_an_error_mid_stream_leaves_no_folder_and_no_hook(tmp_path, error):
    adapter = oculi.attach(tiny_model("llama_gqa"))
    impl = adapter.model.config._attn_implementation

    with failing_at(adapter, 2, error), pytest.raises(error, match="mid-stream"):
        adapter.capture_full(torch.arange(3, 40), stream_to=tmp_path / "cap")
    assert list(tmp_path.iterdir()) == []  # layers 0-1 were written aside, then removed
    assert oculi_hooks(adapter.model) == []
    assert adapter.model.config._attn_implementation == impl
    # and the same call without the error completes
    full = adapter.capture_full(torch.arange(3, 40), stream_to=tmp_path / "cap")
    assert full.attention.patterns.shape[-1] == 37


def test_streamed_capture_equals_in_memory_for_every_part(tmp_path):
    for family in ("gemma2", "gpt2", "neox_parallel"):
        adapter = oculi.attach(tiny_model(family))
        ids = torch.arange(3, 30)
        config = CaptureConfig(capture_head_contributions=True, capture_head_outputs=True)
        ref = adapter.capture_full(ids, attention=config)
        got = adapter.capture_full(ids, attention=config, stream_to=tmp_path / family)
        for part in ("attention", "residual", "mlp"):
            a, b = getattr(ref, part), getattr(got, part)
            for name in a.__dataclass_fields__:
                x, y = getattr(a, name), getattr(b, name)
                if isinstance(x, torch.Tensor):
                    scale = x.abs().max().clamp_min(1)
                    assert ((x - y).abs().max() / scale) <= 3e-6, (family, part, name)
        assert torch.equal(ref.logits.top_k_indices, got.logits.top_k_indices)
        # head contributions (derived from z after the forward) went to disk a layer at a time
        assert (tmp_path / family / "head_out.safetensors").exists()
        again = oculi.load_capture(tmp_path / family)
        assert torch.equal(again.attention.patterns, got.attention.patterns)


def test_the_folder_is_replaced_only_when_it_is_oculis(tmp_path):
    adapter = oculi.attach(tiny_model("llama_gqa"))
    ids = torch.arange(3, 12)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    with pytest.raises(FileWriteError, match="oculi replaces only its own capture folders"):
        adapter.capture(ids, stream_to=theirs)
    assert (theirs / "notes.txt").read_text() == "mine"
    adapter.capture(ids, stream_to=tmp_path / "ours")
    with pytest.raises(OutputExistsError):
        adapter.capture_full(ids, stream_to=tmp_path / "ours", overwrite=False)
    again = adapter.capture(ids[:5], stream_to=tmp_path / "ours")  # replaced
    assert again.patterns.shape[-1] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours", "theirs"]
    with pytest.raises(FileWriteError, match="does not exist"):
        adapter.capture(ids, stream_to=tmp_path / "missing" / "cap")


def test_the_plan_runs_attention_in_blocks_where_scores_do_not_fit():
    """In memory: 4,096 tokens of an eager model whose scores (4 x 4096^2 x 8 bytes = 512 MiB
    per layer) exceed the free memory given, while the residual (3 MiB) fits."""
    t = 4096
    adapter = _long_llama(t, eager=True)
    ids = torch.randint(3, 96, (t,), generator=torch.Generator().manual_seed(2))
    batch = adapter.prepare(ids, None)
    requests = {"resid_post": (0, 1, 2), "pattern": (2,)}
    free = {"cpu": 700 * 2**20}
    whole = memory.forward_bytes(adapter, t, True)
    assert whole > 0.8 * free["cpu"]  # the unblocked forward does not fit
    plan = memory.plan_capture(adapter, batch, requests, free=free)
    assert plan.block is not None and plan.block < t
    assert plan.need["cpu"] <= 0.8 * free["cpu"]
    got = memory.record_planned(adapter, batch, requests, free=free)
    ref = record(adapter, batch, requests)
    for kind in requests:
        x, y = ref[kind][1], got[kind][1]
        assert ((x - y).abs().max() / x.abs().max()) <= 2e-6, kind
    # and too little for even a block of rows: refused naming the blocked estimate
    with pytest.raises(MemoryPlanError, match="block of query positions"):
        memory.plan_capture(adapter, batch, requests, free={"cpu": 50 * 2**20})


def test_blocked_attention_equals_the_models_own_for_every_family():
    from models import FAMILIES, prompt_ids

    for family in FAMILIES:
        adapter = oculi.attach(tiny_model(family))
        batch = adapter.prepare(prompt_ids(11)[None].repeat(2, 1), None)
        requests = {"pattern": (0, 1, 2), "z": (0, 1, 2), "resid_post": (0, 1, 2)}
        ref = record(adapter, batch, requests)
        for rows in (1, 4, 11):
            got = record(adapter, batch, requests, rows=rows)
            for kind in requests:
                x, y = ref[kind][1], got[kind][1]
                err = ((x - y).abs().max() / x.abs().max()).item()
                assert err <= (0 if rows == 11 else 2e-6), (family, rows, kind, err)
        assert oculi_hooks(adapter.model) == []


def test_residual_stream_capture_of_an_eager_model_streams_without_patterns(tmp_path):
    adapter = _long_llama(2048, eager=True)
    ids = torch.randint(3, 96, (2048,), generator=torch.Generator().manual_seed(4))
    got = adapter.capture_residual(ids, ResidualConfig(layers=[1]), stream_to=tmp_path / "r")
    ref = adapter.capture_residual(ids, ResidualConfig(layers=[1]))
    assert ((got.post_mlp - ref.post_mlp).abs().max() / ref.post_mlp.abs().max()) <= 2e-6
    assert os.path.exists(tmp_path / "r" / "oculi-capture.json")


def test_a_streamed_lens_stays_lazy_until_asked(tmp_path):
    adapter = oculi.attach(tiny_model("gemma2"))  # soft-capped final logits
    ids = torch.arange(3, 40)
    ref = adapter.capture_logits(ids)
    got = adapter.capture_logits(ids, stream_to=tmp_path / "lens")
    assert got._topk is None  # nothing computed at write time
    assert torch.equal(ref.top_k_indices, got.top_k_indices)
    assert torch.allclose(ref.top_k_probs, got.top_k_probs, atol=1e-6)
    loaded = oculi.load_capture(tmp_path / "lens")  # no model: the top-k needs it
    with pytest.raises(Exception, match="attach_unembedding"):
        loaded.logits.top_k_indices  # noqa: B018
    loaded.logits.attach_unembedding(adapter)
    assert torch.equal(loaded.logits.top_k_indices, ref.top_k_indices)


def test_a_padded_batch_streams_as_in_memory(tmp_path):
    adapter = oculi.attach(tiny_model("qwen2"))  # sliding window on later layers
    ids = torch.randint(3, 96, (2, 21), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # left padding on the second row
    config = CaptureConfig(capture_head_outputs=True)
    ref = adapter.capture(ids, config, attention_mask=mask)
    got = adapter.capture(ids, config, attention_mask=mask, stream_to=tmp_path / "batch")
    for name in ("queries", "keys", "values", "patterns", "head_outputs"):
        x, y = getattr(ref, name), getattr(got, name)
        assert x.shape == y.shape and x.shape[0] == 2, name
        assert ((x - y).abs().max() / x.abs().max()) <= 2e-6, name


def test_an_error_while_replacing_a_capture_folder_keeps_the_old_one(tmp_path):
    adapter = oculi.attach(tiny_model("gemma3"))
    old = adapter.capture(torch.arange(3, 20), stream_to=tmp_path / "cap")

    with failing_at(adapter, 1, RuntimeError), pytest.raises(RuntimeError, match="mid-stream"):
        adapter.capture(torch.arange(3, 40), stream_to=tmp_path / "cap")
    assert [p.name for p in tmp_path.iterdir()] == ["cap"]  # no hidden folder left
    kept = oculi.load_capture(tmp_path / "cap").attention
    assert torch.equal(kept.patterns, old.patterns)
    assert oculi_hooks(adapter.model) == []


def test_lens_and_dla_of_a_long_streamed_capture_equal_the_full_computation(tmp_path):
    """2,048 tokens: the lens's blocks (a small chunk_size forces many) give the top-k of the
    full logits ``final_norm(resid) @ W_U^T`` computed at once; DLA read a layer at a time
    from the streamed capture equals DLA of the in-memory one and adds up to the logit."""
    from oculi import LogitConfig
    from oculi.analysis import AttributionMethods

    adapter = _long_llama(2048)
    ids = torch.randint(3, 96, (2048,), generator=torch.Generator().manual_seed(6))
    lens = LogitConfig(chunk_size=4096, top_k=5)  # 42 rows of the 96-token vocabulary a block
    got = adapter.capture_full(ids, attention=None, mlp=None, logits=lens, stream_to=tmp_path / "f")
    ref = adapter.capture_full(ids, attention=None, mlp=None, logits=lens)
    model = adapter.model
    with torch.no_grad():
        full = model.lm_head(model.model.norm(ref.residual.post_mlp))  # [L, T, V] at once
    values, indices = full.topk(5, dim=-1)
    assert torch.allclose(got.logits.top_k_values, values, atol=1e-4)
    assert (got.logits.top_k_indices == indices).float().mean() > 0.999  # ties may swap
    for position in (-1, 100, 2047):
        a = AttributionMethods.direct_logit_attribution(got, 7, position=position)
        b = AttributionMethods.direct_logit_attribution(ref, 7, position=position)
        assert torch.allclose(a.values, b.values, rtol=1e-6, atol=1e-9)
        assert abs(a.total - a.logit) <= 1e-4 * abs(a.logit).clamp_min(1)
        assert abs(a.logit - full[-1, position, 7]) <= 1e-4 * abs(a.logit).clamp_min(1)
