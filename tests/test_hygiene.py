"""Hygiene: a capture leaves the model exactly as it found it, also when it fails.

After every capture, successful or raising, the model carries no oculi hook, every config's
attention implementation is what it was, parameters and buffers hash the same, train/eval mode
and ``requires_grad`` are unchanged, the user's own hooks are still registered (and fired during
the capture), and a plain forward gives bit-identical logits.

transformers installs persistent output-capturing hooks the first time a forward asks for
attentions or hidden states; those are not oculi's, so hooks are told apart by the module
their function was defined in.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

import oculi
from models import prompt_ids, tiny_model
from oculi import CaptureConfig, LogitConfig, MLPConfig, ResidualConfig
from oculi.capture import bridge

FAMILIES = ["llama_gqa", "gemma2", "gemma3", "gpt2", "neox_parallel", "olmo2"]


def _hook_fns(model: torch.nn.Module):
    for module in model.modules():
        for hooks in (
            module._forward_hooks,
            module._forward_pre_hooks,
            module._backward_hooks,
            module._backward_pre_hooks,
        ):
            yield from hooks.values()
    yield from torch.nn.modules.module._global_forward_hooks.values()
    yield from torch.nn.modules.module._global_forward_pre_hooks.values()


def oculi_hooks(model: torch.nn.Module) -> int:
    return sum(1 for fn in _hook_fns(model) if getattr(fn, "__module__", "").startswith("oculi"))


def configs(model: torch.nn.Module) -> list:
    seen = {id(model.config): model.config}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            seen[id(cfg)] = cfg
    return list(seen.values())


def snapshot(model: torch.nn.Module) -> dict:
    digest = hashlib.sha256()
    for name, tensor in [*model.state_dict().items(), *model.named_buffers()]:
        digest.update(name.encode())
        digest.update(
            tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        )
    return {
        "hash": digest.hexdigest(),
        "attn": [c._attn_implementation for c in configs(model)],
        "training": [m.training for m in model.modules()],
        "grad": [p.requires_grad for p in model.parameters()],
        "hooks": sorted(id(fn) for fn in _hook_fns(model)),
    }


def logits(model, ids):
    with torch.no_grad():
        return model(ids[None]).logits


def ALL_CAPTURES(adapter, ids):  # noqa: N802 - a table of calls
    n = adapter.n_layers
    return {
        "capture": lambda: adapter.capture(ids),
        "capture_pre_rope": lambda: adapter.capture(ids, CaptureConfig(qk_stage="pre_rope")),
        "capture_heads": lambda: adapter.capture(
            ids, CaptureConfig(capture_head_outputs=True, capture_head_contributions=True)
        ),
        "capture_layer_0": lambda: adapter.capture(ids, CaptureConfig(layers=[0])),
        "residual": lambda: adapter.capture_residual(
            ids, ResidualConfig(capture_attn_out=True, capture_mlp_out=True)
        ),
        "residual_first": lambda: adapter.capture_residual(ids, ResidualConfig(layers=[0])),
        "mlp": lambda: adapter.capture_mlp(ids, MLPConfig(layers=[n - 1])),
        "logits": lambda: adapter.capture_logits(ids, LogitConfig(top_k=3)).top_k_indices,
        "full": lambda: adapter.capture_full(ids),
        "batch": lambda: adapter.capture_full(
            torch.stack([ids, ids]), attention_mask=torch.ones(2, len(ids), dtype=torch.long)
        ),
    }


def captured_tensors(result):
    if isinstance(result, torch.Tensor):
        return [result]
    parts = [result]
    if isinstance(result, oculi.FullCapture):
        parts = [result.attention, result.residual, result.mlp]
        parts = [p for p in parts if p is not None]
        out = [result.logits.normalized, result.logits.final_normalized]
    else:
        out = []
    for part in parts:
        out += list(part.tensors().values())
    return out


class UserHook:
    """A user's own hooks: count calls, optionally raise inside the forward."""

    def __init__(self, raises: type[BaseException] | None = None):
        self.calls = 0
        self.raises = raises

    def __call__(self, _module, _args, _output=None):
        self.calls += 1
        if self.raises is not None:
            raise self.raises("raised by a user hook inside the forward")


def assert_clean(model, before: dict, ref_logits, ids):
    after = snapshot(model)
    assert oculi_hooks(model) == 0
    assert after["attn"] == before["attn"], "attention implementation not restored"
    assert after["hash"] == before["hash"], "parameters or buffers changed"
    assert after["training"] == before["training"]
    assert after["grad"] == before["grad"]
    assert after["hooks"] == before["hooks"], "hooks added or removed"
    assert not bridge._ACTIVE, "an attention bridge is still active"
    assert torch.equal(logits(model, ids), ref_logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_successful_captures_leave_no_trace(family: str):
    model = tiny_model(family)
    adapter = oculi.attach(model)
    ids = prompt_ids()
    layer = adapter.layer_modules[0]
    user_post, user_pre = UserHook(), UserHook()
    handles = [layer.register_forward_hook(user_post), layer.register_forward_pre_hook(user_pre)]
    try:
        ref_logits = logits(model, ids)
        before = snapshot(model)
        calls = user_post.calls
        for name, run in ALL_CAPTURES(adapter, ids).items():
            result = run()
            assert oculi_hooks(model) == 0, name
            for tensor in captured_tensors(result):  # plain data: no autograd graph kept
                assert tensor.grad_fn is None and not tensor.requires_grad, name
            assert_clean(model, before, ref_logits, ids)
        # the user's hooks stayed registered and fired in every capture (and forward)
        assert user_post.calls >= calls + len(ALL_CAPTURES(adapter, ids))
        assert user_pre.calls == user_post.calls
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("raises", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_capture_that_raises_leaves_no_trace(family: str, raises):
    model = tiny_model(family)
    adapter = oculi.attach(model)
    ids = prompt_ids()
    ref_logits = logits(model, ids)
    before = snapshot(model)
    # a hook of the user's own that raises inside layer 1's attention, while oculi's hooks and
    # the attention bridge are in place (layer 2 is hooked too, so nothing stopped early)
    attn = adapter.part(1, adapter.anatomy.attn)
    bomb = UserHook(raises=raises)
    handle = attn.register_forward_hook(bomb)
    before_with_bomb = snapshot(model)
    try:
        for name, run in ALL_CAPTURES(adapter, ids).items():
            if name in ("capture_layer_0", "residual_first"):
                continue  # stops before layer 1
            with pytest.raises(raises, match="raised by a user hook"):
                run()
            assert oculi_hooks(model) == 0, name
            assert not bridge._ACTIVE, name
            assert [c._attn_implementation for c in configs(model)] == before["attn"], name
            assert snapshot(model)["hooks"] == before_with_bomb["hooks"], name
        assert bomb.calls > 0
    finally:
        handle.remove()
    assert_clean(model, before, ref_logits, ids)


@pytest.mark.parametrize("family", ["llama_gqa", "gemma3"])
def test_bad_requests_raise_before_touching_the_model(family: str):
    model = tiny_model(family)
    adapter = oculi.attach(model)
    ids = prompt_ids()
    ref_logits = logits(model, ids)
    before = snapshot(model)
    with pytest.raises(oculi.LayerIndexError):
        adapter.capture(ids, CaptureConfig(layers=[0, 99]))
    with pytest.raises(oculi.InputError):
        adapter.capture_residual(torch.tensor([0, 1, 10_000]))
    with pytest.raises(oculi.InputError):
        adapter.capture_full(torch.stack([ids, ids]), attention_mask=torch.ones(3, 3))
    assert_clean(model, before, ref_logits, ids)


def test_default_attention_implementation_is_used_and_restored_on_eager():
    """A model switched to eager by its user stays eager after a capture that used the bridge."""
    model = tiny_model("llama_gqa")
    adapter = oculi.attach(model)
    ids = prompt_ids()
    original = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        seen = []
        attn = adapter.part(0, adapter.anatomy.attn)
        handle = attn.register_forward_pre_hook(
            lambda m, a: seen.append(m.config._attn_implementation)
        )
        try:
            adapter.capture(ids)
        finally:
            handle.remove()
        assert seen == ["oculi"]  # the bridge was in place during the forward
        assert [c._attn_implementation for c in configs(model)] == ["eager"] * len(configs(model))
    finally:
        model.set_attn_implementation(original)
    assert model.config._attn_implementation == original
