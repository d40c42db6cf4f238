"""SAE latents as a patching site, against plain-PyTorch references written here.

Exact patching of latent ``i`` at position ``p`` (clean value into the corrupt run, the SAE
spliced with its error term) must equal a forward of the corrupt prompt whose site got
``(a_clean[p, i] - a_corrupt[p, i]) · W_dec[i]`` added at ``p`` by a ``register_forward_hook``
(no oculi hook code). Attribution patching's per-cell estimate must equal the derivative of
that same hand-patched forward along the patch, measured by central finite differences in
float64.
"""

from __future__ import annotations

import pytest
import torch

import oculi
from models import tiny_model, tiny_tokenizer
from oculi import patching
from oculi.errors import InputError
from oculi.sae import SAE, LatentPatchingResult, capture_latents, sae_activation_patching

CLEAN = "the cat sat on the big red tree and the dog ran"
CORRUPT = "the dog sat on the big red tree and the cat ran"
LAYER = 1
GOOD, BAD = 7, 11  # token ids: the metric is logit[7] - logit[11] at the last position


def adapter_for(family: str, dtype=torch.float32) -> oculi.Adapter:
    return oculi.attach(tiny_model(family).to(dtype), tiny_tokenizer())


def random_sae(a, kind="topk", site="resid_post", write_site=None, seed=0) -> SAE:
    d_in = a.d_model
    k = {"k": 8} if kind == "topk" else {}
    sae = SAE(d_in, 96, kind, site=site, write_site=write_site, layer=LAYER, **k)
    sae = sae.init_weights(seed).to(a.dtype)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.b_dec.copy_(0.1 * torch.randn(sae.d_out, generator=g))
        sae.W_enc.mul_(3.0)
    return sae.requires_grad_(False)


def hooked_metric(a, sae, module, add) -> float:
    """The corrupt run's metric with ``add [T, d]`` added to ``module``'s output by hand."""

    def hook(_m, _args, out):
        if isinstance(out, tuple):
            return (out[0] + add.to(out[0].dtype), *out[1:])
        return out + add.to(out.dtype)

    handle = module.register_forward_hook(hook)
    try:
        logits = a.model(a.prepare(CORRUPT).input_ids).logits[0, -1]
    finally:
        handle.remove()
    return float((logits[GOOD] - logits[BAD]).detach())


def deltas(a, sae):
    clean, corrupt = (capture_latents(a, p, sae)[0][0] for p in (CLEAN, CORRUPT))
    return clean - corrupt  # [T, d_sae]


@pytest.mark.parametrize("family", ["llama_gqa", "gemma3", "gpt2"])
def test_exact_latent_patching_equals_a_hand_written_hook(family):
    a = adapter_for(family)
    sae = random_sae(a)
    metric = patching.logit_diff(GOOD, BAD)
    res = patching.activation_patching(a, CLEAN, CORRUPT, site=("sae", sae), metric=metric,
                                       progress=False)  # fmt: skip
    assert isinstance(res, LatentPatchingResult) and res.method == "exact"
    t = a.prepare(CORRUPT).input_ids.shape[1]
    assert res.values.shape == (t, sae.d_sae) and res.layers == (LAYER,)
    d = deltas(a, sae)
    module = a.layer_modules[LAYER]  # its output is resid_post
    zero = torch.zeros(t, a.d_model)
    assert res.corrupt_metric == pytest.approx(hooked_metric(a, sae, module, zero), abs=1e-5)
    live = d.nonzero().tolist()
    assert len(live) > 20  # the prompts differ in many latents
    for p, i in live[:: max(1, len(live) // 12)]:
        add = zero.clone()
        add[p] = d[p, i] * sae.W_dec[i]
        assert float(res.values[p, i]) == pytest.approx(
            hooked_metric(a, sae, module, add), abs=1e-4
        ), (p, i)
    # cells whose clean and corrupt latent agree are the corrupt metric exactly
    assert bool((res.values[d == 0] == res.corrupt_metric).all())
    # and the patches do move the metric
    assert (res.values - res.corrupt_metric).abs().max() > 1e-3
    latent, pos, value = res.top(1, normalized=False)[0]
    assert value == float(res.values[pos, latent])


def test_whole_latent_patch_and_a_transcoder_equal_hand_hooks():
    a = adapter_for("llama_gqa")
    metric = patching.logit_diff(GOOD, BAD)
    t = a.prepare(CORRUPT).input_ids.shape[1]
    # a latent patched at every position at once: delta[:, i] ⊗ W_dec[i] on resid_post
    sae = random_sae(a, kind="relu")
    res = sae_activation_patching(a, CLEAN, CORRUPT, sae, metric=metric, per_position=False,
                                  progress=False, batch_size=5)  # fmt: skip
    assert res.values.shape == (sae.d_sae,) and res.axis is None
    d = deltas(a, sae)
    changed = d.abs().sum(0).nonzero()[:, 0].tolist()
    assert len(changed) > 5
    for i in changed[:6]:
        add = d[:, i, None] * sae.W_dec[i]
        want = hooked_metric(a, sae, a.layer_modules[LAYER], add)
        assert float(res.values[i]) == pytest.approx(want, abs=1e-4), i
    # a transcoder reads mlp_in and writes mlp_out: the patch adds to the MLP's output
    tc = random_sae(a, kind="relu", site="mlp_in", write_site="mlp_out", seed=3)
    res = patching.activation_patching(a, CLEAN, CORRUPT, site=("sae", tc), metric=metric,
                                       positions=[-1, 3], progress=False)  # fmt: skip
    d = deltas(a, tc)
    mlp = a.layer_modules[LAYER].mlp
    cells = [(p, i) for p in (3, t - 1) for i in d[p].nonzero()[:, 0].tolist()[:3]]
    assert len(cells) >= 4
    for p, i in cells:
        add = torch.zeros(t, a.d_model)
        add[p] = d[p, i] * tc.W_dec[i]
        assert float(res.values[p, i]) == pytest.approx(hooked_metric(a, tc, mlp, add), abs=1e-4)
    # positions outside the list are not swept
    assert bool((res.values[[0, 1, 2, 4]] == res.corrupt_metric).all())


def test_patching_clean_into_clean_changes_nothing():
    a = adapter_for("gemma3")
    sae = random_sae(a)
    metric = patching.logit_diff(GOOD, BAD)
    clean = a.model(a.prepare(CLEAN).input_ids).logits[0, -1]
    want = float(clean[GOOD] - clean[BAD])
    for fn in (patching.activation_patching, patching.attribution_patching):
        res = fn(a, CLEAN, CLEAN, site=("sae", sae), metric=metric)
        assert res.clean_metric == pytest.approx(want, abs=1e-5)
        assert torch.allclose(res.values, torch.tensor(want), atol=1e-5)


@pytest.mark.parametrize("family", ["llama_gqa", "gemma3"])
def test_attribution_over_latents_is_the_derivative_of_the_exact_patch(family):
    a = adapter_for(family, torch.float64)
    sae = random_sae(a, kind="relu")
    metric = patching.logit_diff(GOOD, BAD)
    est = patching.attribution_patching(a, CLEAN, CORRUPT, site=("sae", sae), metric=metric)
    assert est.method == "attribution" and est.values.shape[1] == sae.d_sae
    d = deltas(a, sae)
    t = d.shape[0]
    module = a.layer_modules[LAYER]
    checked = 0
    for p, i in d.nonzero().tolist()[::7][:8]:
        direction = torch.zeros(t, a.d_model, dtype=torch.float64)
        direction[p] = d[p, i] * sae.W_dec[i]

        def central(h, direction=direction):  # d metric / d s of corrupt + s·delta·W_dec[i]
            plus = hooked_metric(a, sae, module, h * direction)  # (error O(h²))
            return (plus - hooked_metric(a, sae, module, -h * direction)) / (2 * h)

        # Richardson: the O(h²) terms cancel; the steps are large because HF's rotary
        # embedding runs in float32 even in a float64 model, which small steps would resolve
        slope = (4 * central(0.05) - central(0.1)) / 3
        got = float(est.values[p, i]) - est.corrupt_metric
        assert got == pytest.approx(slope, rel=1e-3, abs=5e-6), (p, i)
        checked += 1
    assert checked >= 5
    assert (est.values - est.corrupt_metric).abs().max() > 1e-4
    # summed over positions without per_position
    from oculi.sae import sae_attribution_patching

    whole = sae_attribution_patching(a, CLEAN, CORRUPT, sae, metric=metric, per_position=False)
    torch.testing.assert_close(
        whole.values.double() - whole.corrupt_metric,
        (est.values.double() - est.corrupt_metric).sum(0),
        atol=1e-5,
        rtol=1e-5,
    )


def test_bad_latent_sites_are_refused():
    a = adapter_for("gemma3")
    sae = random_sae(a)
    metric = patching.logit_diff(GOOD, BAD)
    with pytest.raises(InputError, match=r"\('sae', sae\)"):
        patching.activation_patching(a, CLEAN, CORRUPT, site=("sae", "x"), metric=metric)
    with pytest.raises(InputError, match="layers= and per_head= do not apply"):
        patching.activation_patching(a, CLEAN, CORRUPT, site=("sae", sae), metric=metric,
                                     layers=[0])  # fmt: skip
    with pytest.raises(InputError, match="layers= and per_head= do not apply"):
        patching.attribution_patching(a, CLEAN, CORRUPT, site=("sae", sae), metric=metric,
                                      per_head=True)  # fmt: skip
    with pytest.raises(InputError, match="same token length"):
        patching.activation_patching(a, CLEAN, "the cat", site=("sae", sae), metric=metric)
    with pytest.raises(IndexError, match=r"valid 0\.\.95"):
        sae_activation_patching(a, CLEAN, CORRUPT, sae, metric=metric, latents=[96])
    with pytest.raises(IndexError, match="out of range"):
        sae_activation_patching(a, CLEAN, CORRUPT, sae, metric=metric, positions=[40])
    with pytest.raises(InputError, match="batch_size"):
        sae_activation_patching(a, CLEAN, CORRUPT, sae, metric=metric, batch_size=0)
    unbound = SAE(a.d_model, 32, "relu")
    with pytest.raises(ValueError, match="bound to no site"):
        patching.activation_patching(a, CLEAN, CORRUPT, site=("sae", unbound), metric=metric)


def test_latent_result_views():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    a = adapter_for("gemma3")
    sae = random_sae(a)
    metric = patching.logit_diff(GOOD, BAD)
    res = patching.activation_patching(a, CLEAN, CORRUPT, site=("sae", sae), metric=metric,
                                       positions=[-1], progress=False)  # fmt: skip
    (latent, pos, value), *_ = res.top(3, normalized=False)
    t = a.prepare(CORRUPT).input_ids.shape[1]
    assert pos == t - 1 and value == float(res.values[pos, latent])
    table = res.table()
    assert f"{latent:>7} {pos} 'ran'" in table and "exact patching of sae:resid_post L1" in table
    assert "<pre>" in res._repr_html_()
    rec = res.normalized()
    assert float(rec[pos, latent]) == pytest.approx(
        (value - res.corrupt_metric) / (res.clean_metric - res.corrupt_metric)
    )
    ax = res.plot(k=5)
    assert len(ax.get_xticklabels()) == 5


def test_kl_metric_over_latents_equals_a_hand_kl():
    a = adapter_for("llama_gqa")
    sae = random_sae(a)
    metric = patching.kl_divergence()
    res = sae_activation_patching(a, CLEAN, CORRUPT, sae, metric=metric, positions=[-1],
                                  progress=False)  # fmt: skip
    clean = torch.log_softmax(a.model(a.prepare(CLEAN).input_ids).logits[0, -1].detach(), -1)
    assert res.clean_metric == pytest.approx(0.0, abs=1e-5)
    d = deltas(a, sae)
    t = d.shape[0]
    cells = d[t - 1].nonzero()[:, 0].tolist()
    assert len(cells) >= 4
    for i in cells[:4]:
        add = torch.zeros(t, a.d_model)
        add[t - 1] = d[t - 1, i] * sae.W_dec[i]
        handle = a.layer_modules[LAYER].register_forward_hook(
            lambda _m, _a, out, add=add: (
                (out[0] + add, *out[1:]) if isinstance(out, tuple) else out + add
            )
        )
        try:
            logits = a.model(a.prepare(CORRUPT).input_ids).logits[0, -1].detach()
        finally:
            handle.remove()
        patched = torch.log_softmax(logits, -1)
        want = float((clean.exp() * (clean - patched)).sum())
        assert float(res.values[t - 1, i]) == pytest.approx(want, abs=1e-5), i
