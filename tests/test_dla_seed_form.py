"""Seed 000/001 chapter 7's DLA form, ``(residual, unembed, target)``: exact or refused.

The references are independent of oculi's attribution code: the Hugging Face model's own
logits (its forward, soft-cap undone where the family caps), and for ``raw=True`` the raw
residual dotted with ``W_U[target]`` by hand. Every residual capture holding the last layer
records the final norm's output, so the seed's form equals the ``(full, target)`` form; a
capture that cannot know the norm is refused with the call to make.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import oculi
from models import FAMILIES, prompt_ids, tiny_model
from oculi import InputError, ResidualCapture, ResidualConfig
from oculi.analysis import AttributionMethods

PROMPT = "The Eiffel Tower is located in the city of"
TARGET = 7


def hf_logits(model, ids):
    """The model's own last-position logits ``[V]`` (float64), from a plain HF forward."""
    with torch.no_grad():
        return model(input_ids=ids[None]).logits[0, -1].double()


def uncapped(logit: float, cap: float | None) -> float:
    """The pre-cap logit ``z`` of ``cap * tanh(z / cap)``."""
    return logit if not cap else cap * math.atanh(logit / cap)


@pytest.fixture(scope="module")
def tiny():
    return {f: oculi.attach(tiny_model(f)) for f in FAMILIES}


# -- Gemma 3 270M ---------------------------------------------------------------------------
@pytest.mark.gemma
def test_seed_form_on_gemma_is_the_models_logit(gemma):
    ids = gemma.tokenize(PROMPT)
    paris = gemma.to_single_token(" Paris")
    logit = float(hf_logits(gemma.model, ids)[paris])
    unembed = gemma.model.lm_head.weight
    full = gemma.capture_full(ids)
    # seed 001 chapter 7, cell by cell
    dla = AttributionMethods.direct_logit_attribution(full.residual, unembed, paris, position=-1)
    assert dla.values.shape == (18,) and dla.note == ""
    assert float(dla.values.sum() + dla.embedding + dla.bias) == pytest.approx(logit, rel=1e-3)
    assert float(dla.total) == pytest.approx(logit, rel=1e-5)
    exact = AttributionMethods.direct_logit_attribution(full, paris, position=-1)
    torch.testing.assert_close(dla.values, exact.values, rtol=0, atol=1e-9)
    torch.testing.assert_close(dla.embedding, exact.embedding, rtol=0, atol=1e-9)
    comp = AttributionMethods.component_attribution(full.residual, full.mlp, unembed, paris)
    assert comp.values.shape == (18, 2)
    torch.testing.assert_close(comp.values[:, 0], exact.attention, rtol=0, atol=1e-9)
    torch.testing.assert_close(comp.values[:, 1], exact.mlp, rtol=0, atol=1e-9)
    assert float(comp.total) == pytest.approx(logit, rel=1e-5)
    # seed 000's capture_residual gives the same
    residual = gemma.capture_residual(ids)
    alone = AttributionMethods.direct_logit_attribution(residual, unembed, paris)
    assert float(alone.total) == pytest.approx(logit, rel=1e-5)
    # what the seed form used to return, now only by name: ~-3400 against a logit of ~24
    raw = AttributionMethods.direct_logit_attribution(residual, unembed, paris, raw=True)
    x = residual.post_mlp[-1, -1].double()
    by_hand = float(x @ unembed[paris].detach().double())
    # the shares are differences of float32 residuals: they telescope to x within its rounding
    assert float(raw.total) == pytest.approx(by_hand, rel=1e-6)
    assert float(raw.logit) == pytest.approx(by_hand, rel=1e-9)
    assert "not the model's logit" in raw.note and abs(by_hand - logit) > 100


# -- every family ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
def test_seed_form_equals_the_full_form_and_the_models_logit(tiny, family):
    adapter = tiny[family]
    ids = prompt_ids()
    w_u, _bias, cap = adapter.unembedding()
    want = uncapped(float(hf_logits(adapter.model, ids)[TARGET]), cap)
    full = adapter.capture_full(ids)
    seed = AttributionMethods.direct_logit_attribution(full.residual, w_u, TARGET, position=-1)
    ref = AttributionMethods.direct_logit_attribution(full, TARGET, position=-1)
    assert float(seed.total) == pytest.approx(want, rel=1e-4, abs=1e-5)
    assert float(seed.logit) == pytest.approx(want, rel=1e-4, abs=1e-5)
    for name in ("values", "embedding", "bias", "attention", "mlp"):
        torch.testing.assert_close(getattr(seed, name), getattr(ref, name), rtol=0, atol=1e-9)
    if cap:
        assert "pre-cap" in seed.note
        hf = float(hf_logits(adapter.model, ids)[TARGET])
        assert float(seed.capped_logit) == pytest.approx(hf, rel=1e-4, abs=1e-5)
    comp = AttributionMethods.component_attribution(full.residual, full.mlp, w_u, TARGET)
    assert float(comp.total) == pytest.approx(want, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "gemma3"])
def test_seed_form_in_batches_and_at_several_positions(tiny, family):
    adapter = tiny[family]
    a, b = prompt_ids(9, seed=1), prompt_ids(6, seed=2)
    w_u = adapter.unembedding()[0]
    padded = torch.zeros(2, 9, dtype=torch.long)  # left padding with id 0
    padded[0], padded[1, 3:] = a, b
    mask = (torch.arange(9) >= torch.tensor([[0], [3]])).long()
    batch = adapter.capture_residual(padded, attention_mask=mask)
    dla = AttributionMethods.direct_logit_attribution(batch, w_u, (TARGET, 9), position=[-1, 2])
    assert dla.values.shape == (2, 2, adapter.n_layers)
    for row, ids in enumerate((a, b)):
        logits = hf_logits(adapter.model, ids)
        want = float(logits[TARGET] - logits[9])
        assert float(dla.total[row, 0]) == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_fp16_storage_still_adds_up(tiny):
    adapter = tiny["llama_gqa"]
    ids = prompt_ids()
    half = adapter.capture_residual(ids, ResidualConfig(storage_dtype=torch.float16))
    dla = AttributionMethods.direct_logit_attribution(half, adapter.unembedding()[0], TARGET)
    assert float(dla.total) == pytest.approx(float(dla.logit), rel=1e-9, abs=1e-9)
    want = float(hf_logits(adapter.model, ids)[TARGET])
    assert float(dla.logit) == pytest.approx(want, rel=1e-2, abs=1e-2)


# -- what is saved keeps the norm; what cannot know it is refused -----------------------------
@pytest.mark.parametrize("fmt", ["safetensors", "npz", "hdf5"])
def test_saved_residual_keeps_the_recorded_norm(tiny, tmp_path, fmt):
    if fmt == "hdf5":
        pytest.importorskip("h5py")
    adapter = tiny["gpt2"]  # a LayerNorm: the bias is recorded too
    ids = [prompt_ids(9, seed=1), prompt_ids(9, seed=2)]
    residual = adapter.capture_residual(torch.stack(ids))
    path = tmp_path / f"r.{fmt}"
    residual.save(path, format=fmt)
    loaded = oculi.load_capture(path)
    assert torch.equal(loaded.final_normalized, residual.final_normalized)
    assert torch.equal(loaded.final_norm_bias, residual.final_norm_bias)
    assert loaded.final_norm_bias.shape == (adapter.d_model,)  # no batch dim
    w_u = adapter.unembedding()[0]
    dla = AttributionMethods.direct_logit_attribution(loaded, w_u, TARGET)
    for row, seq in enumerate(ids):
        want = float(hf_logits(adapter.model, seq)[TARGET])
        assert float(dla.total[row]) == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_capture_without_the_norm_is_refused_naming_the_call(tiny, tmp_path):
    adapter = tiny["llama_mha"]
    ids = prompt_ids()
    new = adapter.capture_residual(ids)
    # a file written before residual captures recorded the final norm
    old = ResidualCapture(
        layers=new.layers,
        pre_attn=new.pre_attn,
        post_attn=new.post_attn,
        post_mlp=new.post_mlp,
        metadata={k: v for k, v in new.metadata.items() if k not in ("final_softcap",)},
    )
    old.save(tmp_path / "old.safetensors")
    loaded = oculi.load_capture(tmp_path / "old.safetensors")
    w_u = adapter.model.lm_head.weight
    call = r"direct_logit_attribution\(residual, unembed, target, adapter=adapter\)"
    with pytest.raises(InputError, match=call) as err:
        AttributionMethods.direct_logit_attribution(loaded, w_u, TARGET)
    assert "raw=True" in str(err.value)
    with pytest.raises(InputError, match=call):
        AttributionMethods.component_attribution(loaded, None, w_u, TARGET)
    want = float(hf_logits(adapter.model, ids)[TARGET])
    for how in ({"adapter": adapter}, {"final_norm": adapter.model.model.norm}):
        dla = AttributionMethods.direct_logit_attribution(loaded, w_u, TARGET, **how)
        assert float(dla.total) == pytest.approx(want, rel=1e-4, abs=1e-5)
    raw = AttributionMethods.direct_logit_attribution(loaded, w_u, TARGET, raw=True)
    by_hand = float(new.post_mlp[-1, -1].double() @ w_u[TARGET].detach().double())
    assert float(raw.total) == pytest.approx(by_hand, rel=1e-6)


def test_some_layers_are_refused_unless_raw(tiny):
    adapter = tiny["qwen2"]
    ids = prompt_ids()
    some = adapter.capture_residual(ids, ResidualConfig(layers=[0, 1]))
    assert some.final_normalized is None  # the last layer is not held
    w_u = adapter.unembedding()[0]
    with pytest.raises(InputError, match=r"adapter.capture_residual\(ids\)") as err:
        AttributionMethods.direct_logit_attribution(some, w_u, TARGET)
    assert "layers [0, 1]" in str(err.value) and "raw=True" in str(err.value)
    raw = AttributionMethods.direct_logit_attribution(some, w_u, TARGET, raw=True)
    assert raw.values.shape == (2,) and raw.embedding is None and raw.logit is None
    w = w_u[TARGET].double()
    for i in range(2):
        attn = (some.post_attn[i, -1] - some.pre_attn[i, -1]).double() @ w
        mlp = (some.post_mlp[i, -1] - some.post_attn[i, -1]).double() @ w
        assert float(raw.attention[i]) == pytest.approx(float(attn), rel=1e-9, abs=1e-12)
        assert float(raw.mlp[i]) == pytest.approx(float(mlp), rel=1e-9, abs=1e-12)
    with pytest.raises(InputError, match="every layer"):
        raw.total  # noqa: B018 - the property is what is tested


def test_unembedding_bias_needs_the_module(tiny):
    model = copy.deepcopy(tiny_model("llama_gqa"))
    old = model.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.copy_(torch.linspace(-1, 1, old.out_features))
    model.lm_head = head
    adapter = oculi.attach(model)
    ids = prompt_ids()
    residual = adapter.capture_residual(ids)
    with pytest.raises(InputError, match=r"unembed=model.lm_head"):
        AttributionMethods.direct_logit_attribution(residual, head.weight, TARGET)
    dla = AttributionMethods.direct_logit_attribution(residual, head, TARGET)
    want = float(hf_logits(model, ids)[TARGET])
    assert float(dla.total) == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_wrong_unembedding_width_is_refused(tiny):
    adapter = tiny["gemma"]
    residual = adapter.capture_residual(prompt_ids())
    with pytest.raises(InputError, match="d_model=64"):
        AttributionMethods.direct_logit_attribution(residual, torch.zeros(96, 32), TARGET)
