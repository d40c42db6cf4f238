"""Latent explanations (top activations over a store, contexts, histograms, logit effects, the
HTML page) and feature attribution (DLA, AtP), against brute force and hand computations."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import oculi
from models import WORDS, tiny_model, tiny_tokenizer
from oculi.intervention import InterventionContext
from oculi.sae import SAE, SAEPatch, feature_attribution, logit_effects, top_activations
from oculi.visualize.browser import chromium_path, offline_page

LAYER = 1


@pytest.fixture(scope="module")
def adapter():
    return oculi.attach(tiny_model("gemma3"), tiny_tokenizer())


@pytest.fixture(scope="module")
def store(adapter, tmp_path_factory):
    pytest.importorskip("zarr")
    out = tmp_path_factory.mktemp("acts")
    rng = np.random.default_rng(0)
    prompts = [" ".join(rng.choice(WORDS, rng.integers(3, 14))) for _ in range(80)]
    oculi.harvest(adapter, prompts, sites="resid_post", layers=[LAYER, 2], out=out,
                  chunk_rows=64, unit_rows=256, progress=False)  # fmt: skip
    return oculi.open_harvest(out)


def random_sae(d, layer=LAYER, seed=0) -> SAE:
    sae = SAE(d, 48, "topk", k=5, site="resid_post", layer=layer).init_weights(seed)
    with torch.no_grad():
        sae.W_enc.mul_(2.0)
        sae.b_dec.copy_(0.05 * torch.randn(d, generator=torch.Generator().manual_seed(seed)))
    return sae.requires_grad_(False)


def test_top_activations_equal_brute_force(store, adapter):
    sae = random_sae(adapter.d_model)
    feats = top_activations(store, sae, k=6, batch_rows=37)  # batches that cut chunks
    acts = sae.encode(torch.from_numpy(np.asarray(store["resid_post", LAYER])))
    want = acts.topk(6, dim=0)
    torch.testing.assert_close(feats.values, want.values, atol=0, rtol=0)
    positive = want.values > 0
    # rows hold those values (ties, e.g. every <bos> row, may pick either row)
    at_rows = acts.gather(0, feats.rows.clamp(min=0))
    assert torch.equal(at_rows[positive], want.values[positive])
    assert (feats.rows[positive] == want.indices[positive]).float().mean() > 0.9
    assert (feats.rows[~positive] == -1).all()
    assert torch.equal(feats.counts, (acts > 0).sum(0))
    assert torch.equal(feats.hist.sum(1), feats.counts)  # every non-zero value binned once
    latent = int(feats.counts.argmax())
    edges = oculi.sae.features.BINS
    vals = acts[:, latent][acts[:, latent] > 0].double()
    want_hist = torch.histogram(vals.clamp(edges[0], edges[-1] * 0.999), edges).hist
    assert torch.equal(feats.hist[latent], want_hist.long())
    assert feats.n_tokens == store.n_rows
    torch.testing.assert_close(feats.density, (acts > 0).double().mean(0))


def test_contexts_come_from_the_prompt(store, adapter):
    sae = random_sae(adapter.d_model)
    feats = top_activations(store, sae, k=4)
    latent = int(feats.counts.argmax())
    index = store.index.to_pydict()
    for ctx in feats.contexts(latent, window=3):
        assert ctx.activation == pytest.approx(ctx.activations[ctx.center], rel=1e-6)
        assert ctx.token_ids[ctx.center] == index["token_id"][ctx.row]
        rows = range(ctx.row - ctx.center, ctx.row - ctx.center + len(ctx.token_ids))
        assert {index["prompt_id"][r] for r in rows} == {ctx.prompt_id}
        assert [index["token_id"][r] for r in rows] == ctx.token_ids
        assert len(ctx.token_ids) <= 7


def test_logit_effects_by_hand(adapter):
    sae = random_sae(adapter.d_model, layer=2)
    ids = adapter.prepare("the cat sat on the mat").input_ids[0]
    up, down = logit_effects(adapter, sae, 7, context=ids, position=4, k=5)
    res = adapter.capture_residual(ids)
    x = res.post_mlp[-1, 4]  # the residual entering the final norm at position 4
    with torch.no_grad():
        normed = adapter.model.model.norm(x)
    a = normed.double() / x.double()  # RMSNorm frozen at this position: norm(c) = a * c
    w_u = adapter.model.lm_head.weight.detach().double()
    effect = w_u @ (a * sae.W_dec[7].double())
    assert [t for t, _ in up] == effect.topk(5).indices.tolist()
    assert [t for t, _ in down] == (-effect).topk(5).indices.tolist()
    np.testing.assert_allclose([v for _, v in up], effect.topk(5).values.numpy(), rtol=1e-5)


def test_feature_page(store, adapter, tmp_path):
    sae = random_sae(adapter.d_model)
    feats = top_activations(store, sae, k=4)
    latents = feats.counts.topk(3).indices.tolist()
    path = oculi.visualize.write_feature_page(feats, adapter, tmp_path / "f.html", latents)
    page = path.read_text()
    assert page.startswith("<!DOCTYPE html>")
    for latent in latents:
        assert f'id="latent-{latent}"' in page
        assert f"{int(feats.counts[latent]):,} of {feats.n_tokens:,} tokens" in page
    top = feats.contexts(latents[0])[0]
    assert f'data-v="{top.activations[top.center]!r}"' in page
    if chromium_path() is None:
        if os.environ.get("OCULI_REQUIRE_BROWSER"):
            pytest.fail("OCULI_REQUIRE_BROWSER is set but no Chromium executable was found")
        pytest.skip("no Chromium executable")
    with offline_page() as browser:
        browser.goto(path.resolve().as_uri())
        assert browser.locator("section.oc-detail").count() == 3
        assert browser.locator("svg rect").count() > 0
        assert browser.oculi_errors == [] and browser.oculi_requests == []


# -- attribution ------------------------------------------------------------------------------
def test_dla_shares_add_up_to_the_logit_for_a_last_layer_sae(adapter):
    sae = random_sae(adapter.d_model, layer=2)  # the residual entering the final norm
    prompt = "the cat sat on the mat"
    fa = feature_attribution(adapter, sae, prompt, 17, position=-1)
    from oculi.analysis.readout import readout

    res = adapter.capture_residual(prompt)
    r = readout(res, 17, -1, adapter)
    u = r.u.reshape(-1, adapter.d_model)[0]
    x = res.post_mlp[-1, -1].double()
    err = x - sae(x[None].float())[0].double()
    total = fa.dla.sum() + sae.b_dec.double() @ u + err @ u + r.bias.reshape(-1)[0]
    assert float(total) == pytest.approx(float(adapter.forward(prompt)[-1, 17]), abs=1e-4)
    assert fa.metric == pytest.approx(float(adapter.forward(prompt)[-1, 17]), abs=1e-4)


def test_atp_gradient_matches_finite_differences(adapter):
    sae = random_sae(adapter.d_model)
    prompt = "the cat sat on the mat"
    target = (17, 30)
    fa = feature_attribution(adapter, sae, prompt, target)
    torch.testing.assert_close(fa.atp, -fa.activations * fa.gradient)
    h = 1e-2
    for latent in fa.top(3):
        i = latent[0]
        vals = []
        for c in (h, -h):
            with InterventionContext(
                adapter, [SAEPatch(sae, error=True, steer={i: c}, positions=[-1])]
            ):
                logits = adapter.forward(prompt)[-1].double()
            vals.append(float(logits[17] - logits[30]))
        fd = (vals[0] - vals[1]) / (2 * h)
        assert fd == pytest.approx(float(fa.gradient[i]), rel=2e-2, abs=1e-4)
    with pytest.raises(ValueError, match="by must be 'atp' or 'dla'"):
        fa.top(3, by="grad")


def test_cli_features_page(store, adapter, tmp_path):
    from click.testing import CliRunner

    from oculi.cli import cli

    folder = tmp_path / "tiny"
    adapter.model.save_pretrained(folder)
    adapter.tokenizer.save_pretrained(folder)
    sae = random_sae(adapter.d_model)
    sae.save(tmp_path / "s.safetensors")
    out = tmp_path / "p.html"
    args = ["sae", "features", str(tmp_path / "s.safetensors"), "--store", str(store.path),
            "-o", str(out), "-m", str(folder), "--latents", "1,2"]  # fmt: skip
    done = CliRunner().invoke(cli, args)
    assert done.exit_code == 0, done.output
    feats = top_activations(store, sae)
    alive = int((feats.counts > 0).sum())
    assert (
        done.output.strip()
        == f"wrote {out}: {alive:,} of 48 latents fired on {store.n_rows:,} tokens"
    )
    assert 'id="latent-1"' in out.read_text() and 'id="latent-3"' not in out.read_text()
    bad = CliRunner().invoke(cli, [*args[:-1], "1,99"])
    assert bad.exit_code == 2 and "latent 99 out of range for d_sae=48 (0..47)" in bad.output


def test_latent_patching_equals_hand_patches(adapter):
    from oculi.sae import latent_patching

    sae = random_sae(adapter.d_model)
    clean, corrupt = "the cat sat on the mat", "the dog sat on the rug"
    target = (17, 30)
    res = latent_patching(adapter, sae, clean, corrupt, target, n_exact=4)
    a_clean = capture_latents_at(adapter, sae, clean)
    a_corrupt = capture_latents_at(adapter, sae, corrupt)
    for i, value in res.exact.items():
        delta = (a_clean[i] - a_corrupt[i]) * sae.W_dec[i]

        def hook(_m, _a, out, delta=delta):
            x = (out[0] if isinstance(out, tuple) else out).clone()
            x[:, -1] += delta
            return (x, *out[1:]) if isinstance(out, tuple) else x

        handle = adapter.layer_modules[LAYER].register_forward_hook(hook)
        try:
            logits = adapter.forward(corrupt)[-1]
        finally:
            handle.remove()
        assert value == pytest.approx(float(logits[17] - logits[30]), abs=1e-5)
    base = adapter.forward(corrupt)[-1]
    assert res.corrupt_metric == pytest.approx(float(base[17] - base[30]), abs=1e-5)
    assert len(res.exact) == 4 and len(res.top(2)) == 2
    same = latent_patching(adapter, sae, corrupt, corrupt, target, n_exact=2)
    assert (same.estimate == 0).all()
    assert all(v == pytest.approx(same.corrupt_metric, abs=1e-6) for v in same.exact.values())
    with pytest.raises(ValueError, match="same number of tokens"):
        latent_patching(adapter, sae, clean, "a dog", target)


def capture_latents_at(adapter, sae, prompt):
    from oculi.sae import capture_latents

    return capture_latents(adapter, prompt, sae)[0][0, -1]
