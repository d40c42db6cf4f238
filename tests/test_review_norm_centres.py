"""Whether the final norm centres is read off the model, not off a list of family names.

A LayerNorm's frozen map subtracts each write's mean before scaling (``a ⊙ (c - mean(c))``);
an RMSNorm's does not. Per-component shares differ between the two although both add up to the
same logit, so a LayerNorm model under an anatomy whose family name oculi does not know (any
anatomy a user registers) must still be read as centring. The reference is a hand computation
from the HF model's ``ln_f`` weight and epsilon and the captured residual.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import oculi
from models import prompt_ids, tiny_model
from oculi.analysis import AttributionMethods
from oculi.models import anatomy as anatomy_module

TARGET = 7


@pytest.fixture
def renamed_gpt2(monkeypatch):
    """A tiny GPT-2 read through a copy of the GPT-2 anatomy under a family name of its own."""
    model = tiny_model("gpt2")
    oculi.attach(model)  # registers the built-in families
    mine = dataclasses.replace(anatomy_module._REGISTRY["gpt2"], family="my_gpt2")
    monkeypatch.setitem(anatomy_module._REGISTRY, "gpt2", mine)
    adapter = oculi.attach(model)
    assert adapter.anatomy.family == "my_gpt2"
    return adapter


def _by_hand(adapter, residual, target):
    """Per-layer shares and the embedding's through ln_f frozen at the last position."""
    ln = adapter.model.transformer.ln_f
    w_u = adapter.model.lm_head.weight.detach().double()[target]
    x = residual.post_mlp[-1, -1].double()
    sigma = torch.sqrt(x.var(unbiased=False) + ln.eps)

    def share(c):
        return float(((c - c.mean()) / sigma * ln.weight.detach().double()) @ w_u)

    layers = [
        share(residual.post_mlp[i, -1].double() - residual.pre_attn[i, -1].double())
        for i in range(adapter.n_layers)
    ]
    return layers, share(residual.pre_attn[0, -1].double())


def test_seed_form_centres_a_layernorm_of_an_unknown_family(renamed_gpt2):
    adapter = renamed_gpt2
    residual = adapter.capture_residual(prompt_ids())
    unembed = adapter.model.lm_head.weight
    dla = AttributionMethods.direct_logit_attribution(residual, unembed, TARGET)
    layers, embedding = _by_hand(adapter, residual, TARGET)
    torch.testing.assert_close(
        dla.values, torch.tensor(layers, dtype=torch.float64), rtol=1e-6, atol=1e-9
    )
    assert float(dla.embedding) == pytest.approx(embedding, rel=1e-6, abs=1e-9)
    with torch.no_grad():
        logit = float(adapter.model(input_ids=prompt_ids()[None]).logits[0, -1, TARGET])
    assert float(dla.total) == pytest.approx(logit, rel=1e-5)
    assert residual.metadata["final_norm_centers"] is True
    # a capture saved before the metadata recorded it: the adapter's norm is read instead
    del residual.metadata["final_norm_centers"]
    old = AttributionMethods.direct_logit_attribution(residual, unembed, TARGET, adapter=adapter)
    torch.testing.assert_close(old.values, dla.values, rtol=0, atol=1e-12)
    # or the norm module passed by hand
    ln_f = adapter.model.transformer.ln_f
    by_module = AttributionMethods.direct_logit_attribution(
        residual, unembed, TARGET, final_norm=ln_f
    )
    torch.testing.assert_close(by_module.values, dla.values, rtol=0, atol=1e-12)


def test_full_form_centres_a_layernorm_of_an_unknown_family(renamed_gpt2):
    adapter = renamed_gpt2
    full = adapter.capture_full(prompt_ids())
    dla = AttributionMethods.direct_logit_attribution(full, TARGET)
    layers, embedding = _by_hand(adapter, full.residual, TARGET)
    torch.testing.assert_close(
        dla.values, torch.tensor(layers, dtype=torch.float64), rtol=1e-6, atol=1e-9
    )
    assert float(dla.embedding) == pytest.approx(embedding, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("family", ["llama_gqa", "gemma3", "gpt2", "neox_parallel", "olmo2"])
def test_capture_records_whether_the_final_norm_centres(family):
    adapter = oculi.attach(tiny_model(family))
    residual = adapter.capture_residual(prompt_ids())
    centres = isinstance(adapter.module(adapter.anatomy.final_norm), torch.nn.LayerNorm)
    assert residual.metadata["final_norm_centers"] is centres
    assert centres == (family in ("gpt2", "neox_parallel"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_norm_centers_reads_the_module(dtype):
    from oculi.models.weights import norm_centers

    gen = torch.Generator().manual_seed(1)
    layer = torch.nn.LayerNorm(64, dtype=dtype)
    rms = torch.nn.RMSNorm(64, dtype=dtype)
    bare = torch.nn.LayerNorm(64, elementwise_affine=False, dtype=dtype)  # OLMo's kind
    with torch.no_grad():
        for norm in (layer, rms):
            norm.weight.copy_(torch.randn(64, generator=gen) * 10)
        layer.bias.copy_(torch.randn(64, generator=gen))
    assert norm_centers(layer, 64) and norm_centers(bare, 64)
    assert not norm_centers(rms, 64)
