"""The memory plan: its estimate against allocation measured on the CPU, micro-batches equal
to one batch, and the error when nothing fits (the free-memory probe is faked, the model and
the forward are real)."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import oculi
from models import prompt_ids, tiny_model
from oculi.capture import memory
from oculi.capture.configs import CaptureConfig, MLPConfig, ResidualConfig
from oculi.capture.engine import record
from oculi.errors import MemoryPlanError

FACTOR = 2.0  # the estimate is within this factor of the measured peak, either way


class PeakAllocation(TorchDispatchMode):
    """Peak bytes of live tensor storage created by torch ops inside the ``with`` (CPU).

    Every op's fresh outputs are counted when created and uncounted when their tensor is
    freed (views keep their base alive, so a storage is freed with its last view).
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.sizes: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.live -= self.sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t._base is None:
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.sizes:
                    self.sizes[key] = storage.nbytes()
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self._free, key)
        return out


def _batch(adapter, b: int, t: int):
    return adapter.prepare(torch.stack([prompt_ids(t, seed=s) for s in range(b)]))


@pytest.mark.parametrize(
    "requests",
    [
        {"resid_pre": (0, 1, 2), "resid_post": (0, 1, 2)},
        {"pattern": (0, 1, 2), "q": (0, 1, 2)},
        {"mlp_post": (0, 1, 2), "mlp_out": (1,)},
    ],
    ids=["residual", "patterns", "mlp"],
)
def test_estimate_is_within_a_factor_of_measured_allocation(requests):
    adapter = oculi.attach(tiny_model("llama_gqa"))
    batch = _batch(adapter, 8, 64)
    plan = memory.plan_capture(adapter, batch, requests)
    assert plan.rows == 8  # fits: one forward
    with torch.no_grad(), PeakAllocation() as peak:
        out = record(adapter, batch, requests)
    result = sum(t.nbytes for _, t in out.values())
    assert result > 0
    ratio = plan.need["cpu"] / peak.peak
    assert 1 / FACTOR <= ratio <= FACTOR, (plan.need["cpu"], peak.peak, result)


def test_micro_batches_equal_one_batch(monkeypatch):
    adapter = oculi.attach(tiny_model("gemma3"))
    ids = torch.stack([prompt_ids(12, seed=s) for s in range(5)])
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in one row
    parts = dict(attention=CaptureConfig(), residual=ResidualConfig(), mlp=MLPConfig())
    whole = adapter.capture_full(ids, attention_mask=mask, **parts)
    batch = adapter.prepare(ids, mask)
    requests = {"resid_pre": (0, 1, 2), "pattern": (0, 2), "head_out": (1,)}
    need = memory.plan_capture(adapter, batch, requests).need["cpu"]
    # free memory a little short of one forward: the plan splits the batch of 5
    fake = {"cpu": int(need / memory.SHARE * 0.9)}
    plan = memory.plan_capture(adapter, batch, requests, free=fake)
    assert 1 <= plan.rows < 5
    split = memory.record_planned(adapter, batch, requests, free=fake)
    one = record(adapter, batch, requests)
    for kind, (layers, tensor) in one.items():
        assert split[kind][0] == layers
        torch.testing.assert_close(split[kind][1], tensor, atol=1e-6, rtol=0)
    # the public capture goes through the plan (seen by a pass-through spy on it)
    plans = []
    planner = memory.plan_capture

    def spy(*args, **kwargs):
        plans.append(planner(*args, **kwargs))
        return plans[-1]

    monkeypatch.setattr(memory, "plan_capture", spy)
    adapter.capture_full(ids, attention_mask=mask, **parts)
    whole_need = plans[-1].need["cpu"]
    monkeypatch.setattr(memory, "free_bytes", lambda device: int(whole_need / memory.SHARE * 0.9))
    small = adapter.capture_full(ids, attention_mask=mask, **parts)
    assert 1 <= plans[-1].rows < 5
    for part, name in (("attention", "patterns"), ("residual", "post_mlp"), ("mlp", "output")):
        got, want = getattr(getattr(small, part), name), getattr(getattr(whole, part), name)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_nothing_fits_names_estimate_free_memory_and_knobs(monkeypatch):
    adapter = oculi.attach(tiny_model("llama_gqa"))
    monkeypatch.setattr(memory, "free_bytes", lambda device: 4096)
    with pytest.raises(
        MemoryPlanError,
        match=r"does not fit in memory: it needs about [\d.]+ KiB on cpu for the batch of 3 "
        r"\([\d.]+ KiB even in micro-batches of one row\), 4.00 KiB free .*Try fewer `layers` "
        r"or sites, or a smaller `storage_dtype`, or fewer or shorter inputs per call",
    ):
        adapter.capture_residual(torch.stack([prompt_ids(30, seed=s) for s in range(3)]))
    # on an accelerator the message also offers storage_device="cpu" (faked device name)
    msg = memory._message({"cuda:0": 10}, {"cuda:0": 30}, {"cuda:0": 1}, {"cuda:0": 5}, "cuda:0", 3)
    assert '`storage_device="cpu"`' in msg


def test_free_memory_probes(monkeypatch):
    assert memory.free_bytes("cpu") > 0
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (123, 456))
    assert memory.free_bytes("cuda:0") == 123
    assert memory.free_bytes("meta") is None


def test_only_a_cuda_forward_streams_into_pinned_host_buffers():
    from oculi.capture.engine import streams_to_host

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert streams_to_host(cuda, cpu)
    assert not streams_to_host(cpu, cpu) and not streams_to_host(cuda, cuda)
    # on the CPU the buffers are plain (pinning needs CUDA) and hold exactly the forward's
    adapter = oculi.attach(tiny_model("llama_gqa"))
    ids = prompt_ids(9).unsqueeze(0)
    res = adapter.capture_residual(ids, ResidualConfig(storage_device="cpu"))
    assert not res.pre_attn.is_pinned()
    with torch.no_grad():
        hidden = adapter.model(ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(res.pre_attn[1], hidden[1][0], atol=0, rtol=0)


@pytest.mark.parametrize("strategy", ["fused", "layered"])
def test_sweeps_split_into_copies_that_fit_with_equal_numbers(strategy, monkeypatch):
    from oculi import patching
    from test_patching import CORRECT, WRONG, _pair

    adapter, clean, corrupt = _pair("llama_gqa")
    metric = patching.logit_diff(CORRECT, WRONG)
    kwargs = dict(metric=metric, strategy=strategy, progress=False)
    whole = patching.activation_patching(adapter, clean, corrupt, batch_size=None, **kwargs)
    per_copy = memory.forward_bytes(adapter, clean.shape[1], eager_layers=True)
    assert memory.plan_sweep(adapter, 9, None, 27, free=int(3 * per_copy / memory.SHARE)) == 3
    monkeypatch.setattr(memory, "free_bytes", lambda device: int(3 * per_copy / memory.SHARE))
    split = patching.activation_patching(adapter, clean, corrupt, batch_size=None, **kwargs)
    torch.testing.assert_close(split.values, whole.values, atol=1e-5, rtol=0)
    monkeypatch.setattr(memory, "free_bytes", lambda device: per_copy // 2)
    with pytest.raises(
        MemoryPlanError,
        match=r"one patched copy of this 9-token prompt needs about [\d.]+ KiB on cpu, "
        r"[\d.]+ KiB free .*shorter prompt",
    ):
        patching.activation_patching(adapter, clean, corrupt, **kwargs)
