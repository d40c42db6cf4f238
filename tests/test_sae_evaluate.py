"""oculi.sae.evaluate against the model's own loss and plain torch hooks."""

from __future__ import annotations

import pytest
import torch

import oculi
from models import tiny_model, tiny_tokenizer
from oculi.sae import SAE, evaluate

PROMPTS = ["the cat sat on the big red tree and the dog ran", "a dog saw the small blue house"]


def adapter():
    return oculi.attach(tiny_model("llama_gqa"), tiny_tokenizer())


def exact_sae(d: int) -> SAE:
    """ReLU SAE that reconstructs exactly: latents x⁺ and x⁻ with decoder rows +I and -I."""
    sae = SAE(d, 2 * d, "relu", site="resid_post", layer=1, center_input=False)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
    return sae.requires_grad_(False)


def hf_loss(a, text, hook=None) -> tuple[float, int]:
    ids = a.prepare(text).input_ids
    handle = a.layer_modules[1].register_forward_hook(hook) if hook else None
    try:
        loss = a.model(input_ids=ids, labels=ids).loss  # transformers' own shifted CE
    finally:
        if handle:
            handle.remove()
    return float(loss.detach()), ids.shape[1] - 1


def _out(fn):
    return lambda _m, _a, out: (fn(out[0]), *out[1:]) if isinstance(out, tuple) else fn(out)


def test_losses_equal_the_models_own_with_hand_hooks():
    a = adapter()
    sae = SAE(a.d_model, 96, "topk", k=4, site="resid_post", layer=1).init_weights(0)
    sae.requires_grad_(False)
    got = evaluate(a, sae, PROMPTS, batch_size=2)  # a padded batch
    parts = [hf_loss(a, p) for p in PROMPTS]
    spliced = [hf_loss(a, p, _out(lambda x: sae(x))) for p in PROMPTS]
    zero = [hf_loss(a, p, _out(torch.zeros_like)) for p in PROMPTS]

    def mean(rows):
        return sum(loss * n for loss, n in rows) / sum(n for _, n in rows)

    assert got.ce_clean == pytest.approx(mean(parts), abs=1e-5)
    assert got.ce_spliced == pytest.approx(mean(spliced), abs=1e-5)
    assert got.ce_zero == pytest.approx(mean(zero), abs=1e-5)
    want = (got.ce_zero - got.ce_spliced) / (got.ce_zero - got.ce_clean)
    assert got.ce_recovered == pytest.approx(want)
    assert got.l0 == 4.0 and got.n_tokens == sum(n + 1 for _, n in parts)
    res = a.capture_residual(PROMPTS[0]).post_mlp[1]
    one = evaluate(a, sae, PROMPTS[:1])
    assert one.fvu == pytest.approx(sae.fvu(res), rel=1e-6)
    assert "CE loss recovered" in got.table()


def test_an_exact_sae_recovers_everything():
    a = adapter()
    got = evaluate(a, exact_sae(a.d_model), PROMPTS)
    assert got.fvu < 1e-10 and got.ce_recovered == pytest.approx(1.0, abs=1e-5)
    assert got.kl_spliced == pytest.approx(0.0, abs=1e-6)


@pytest.mark.gemma
def test_gemma_evaluate_and_attribution(gemma):
    prompts = ["The Eiffel Tower is located in the city of Paris.", "Water is made of hydrogen and"]
    sae = exact_sae(gemma.d_model)
    sae.layer = 6
    got = evaluate(gemma, sae, prompts, batch_size=2)
    ids = [gemma.prepare(p).input_ids for p in prompts]
    with torch.no_grad():
        losses = [(float(gemma.model(input_ids=i, labels=i).loss), i.shape[1] - 1) for i in ids]
    clean = sum(v * n for v, n in losses) / sum(n for _, n in losses)
    assert got.ce_clean == pytest.approx(clean, abs=1e-4)
    assert got.ce_spliced == pytest.approx(clean, abs=1e-4) and got.fvu < 1e-10
    assert got.ce_zero > clean + 1.0 and got.ce_recovered == pytest.approx(1.0, abs=1e-4)
    # DLA of a last-layer SAE adds up to the logit (the exact SAE has no error term)
    from oculi.sae import feature_attribution

    last = exact_sae(gemma.d_model)
    last.layer = gemma.n_layers - 1
    paris = gemma.to_single_token(" Paris")
    fa = feature_attribution(gemma, last, "The Eiffel Tower is located in the city of", paris)
    logit = float(gemma.forward("The Eiffel Tower is located in the city of")[-1, paris])
    assert fa.metric == pytest.approx(logit, abs=1e-3)
    from oculi.analysis.readout import readout

    r = readout(gemma.capture_residual("The Eiffel Tower is located in the city of"), paris, -1,
                gemma)  # fmt: skip
    assert float(fa.dla.sum() + r.bias.reshape(-1)[0]) == pytest.approx(logit, abs=1e-3)
