"""SAE latents harvested into a store, against latents computed here from plain torch hooks.

The reference runs each prompt alone through the Hugging Face model with a
``register_forward_hook`` (the decoder layer's output is ``resid_post``; the MLP's input is
``mlp_in``) and encodes what it caught with ``sae.encode``: the store's rows (prompts in order,
tokens in order) must equal those latents.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import oculi
from models import WORDS, tiny_model, tiny_tokenizer
from oculi.errors import InputError
from oculi.harvest import HarvestStoreError
from oculi.sae import SAE

pytest.importorskip("zarr")
pytest.importorskip("pyarrow")

SMALL = dict(chunk_rows=16, unit_rows=64, batch_tokens=64, progress=False)


def word_prompts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(1, 12))) for _ in range(n)]


def random_sae(d_in, layer, site="resid_post", write_site=None, seed=0, kind="topk") -> SAE:
    k = {"k": 6} if kind == "topk" else {}
    sae = SAE(d_in, 48, kind, site=site, layer=layer, write_site=write_site, **k)
    sae = sae.init_weights(seed)
    with torch.no_grad():
        sae.W_enc.mul_(3.0)
        sae.b_enc.fill_(-0.05)
    return sae.requires_grad_(False)


def reference(a, prompts, module, sae, use_input=False) -> np.ndarray:
    """Latents of every token, prompt by prompt, from a plain hook on ``module``."""
    rows = []
    for p in prompts:
        caught: dict = {}

        def hook(_m, args, out, caught=caught):
            x = args[0] if use_input else (out[0] if isinstance(out, tuple) else out)
            caught["x"] = x.detach()

        handle = module.register_forward_hook(hook)
        try:
            a.model(a.prepare(p).input_ids)
        finally:
            handle.remove()
        rows.append(sae.encode(caught["x"][0]))
    return torch.cat(rows).numpy()


def test_harvested_latents_equal_hand_encoded_captures(tmp_path):
    a = oculi.attach(tiny_model("llama_gqa"), tiny_tokenizer())
    prompts = word_prompts(30, seed=1)
    sae = random_sae(a.d_model, layer=-2)  # a negative layer is resolved (layer 1 of 3)
    tc = random_sae(a.d_model, 2, site="mlp_in", write_site="mlp_out", seed=4, kind="relu")
    summary = oculi.harvest(a, prompts, sites=["resid_post"], layers=[0], out=tmp_path,
                            saes={"l1": sae, "tc": tc}, **SMALL)  # fmt: skip
    store = oculi.open_harvest(tmp_path)
    assert set(store.keys) == {("resid_post", 0), ("sae.l1", 1), ("sae.tc", 2)}
    assert summary.rows["sae.l1/1"] == store.n_rows
    got = np.asarray(store["sae.l1", 1])
    want = reference(a, prompts, a.layer_modules[1], sae)
    assert got.shape == (store.n_rows, 48)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert (got > 0).sum(1).max() == 6 and (got > 0).mean() > 0.05  # TopK, k=6, and firing
    got_tc = np.asarray(store["sae.tc", 2])
    want_tc = reference(a, prompts, a.layer_modules[2].mlp, tc, use_input=True)
    np.testing.assert_allclose(got_tc, want_tc, atol=1e-5, rtol=1e-5)
    assert (got_tc > 0).any()
    # the site's own array is untouched by the SAEs' extra recordings
    want0 = []
    for p in prompts:
        hs = a.model(a.prepare(p).input_ids, output_hidden_states=True).hidden_states
        want0.append(hs[1][0].detach())
    np.testing.assert_allclose(
        np.asarray(store["resid_post", 0]), torch.cat(want0).numpy(), atol=1e-5, rtol=0
    )


def test_resume_checks_the_sae_and_latents_alone(tmp_path):
    a = oculi.attach(tiny_model("gemma3"), tiny_tokenizer())
    prompts = word_prompts(20)
    sae = random_sae(a.d_model, layer=1)
    first = oculi.harvest(a, prompts, sites=[], layers=None, out=tmp_path, saes=sae, **SMALL)
    store = oculi.open_harvest(tmp_path)
    assert store.keys == [("sae.resid_post", 1)]  # latents only: no site stored
    again = oculi.harvest(a, prompts, sites=[], layers=None, out=tmp_path, saes=sae, **SMALL)
    assert again.units_computed == 0 and first.units_computed == first.units
    other = random_sae(a.d_model, layer=1, seed=9)
    with pytest.raises(HarvestStoreError):
        oculi.harvest(a, prompts, sites=[], layers=None, out=tmp_path, saes=other, **SMALL)
    # replacing the store (resume=False) removes its latent folders as its own
    oculi.harvest(a, prompts, sites=[], layers=None, out=tmp_path, saes=other, resume=False,
                  **SMALL)  # fmt: skip
    want = reference(a, prompts, a.layer_modules[1], other)
    got = np.asarray(oculi.open_harvest(tmp_path)["sae.resid_post", 1])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_bad_saes_are_refused(tmp_path):
    a = oculi.attach(tiny_model("gemma3"), tiny_tokenizer())
    prompts = word_prompts(5)
    sae = random_sae(a.d_model, layer=1)
    with pytest.raises(InputError, match="oculi.sae.SAE"):
        oculi.harvest(a, prompts, sites=[], layers=None, out=tmp_path, saes=["x"], **SMALL)
    with pytest.raises(InputError, match="same array"):
        oculi.harvest(a, prompts, sites=[], layers=None, out=tmp_path, saes=[sae, sae], **SMALL)
    with pytest.raises(InputError, match="not a folder name"):
        oculi.harvest(a, prompts, sites=[], layers=None, out=tmp_path, saes={"a/b": sae},
                      **SMALL)  # fmt: skip
    with pytest.raises(ValueError, match="bound to no site"):
        oculi.harvest(a, prompts, sites=[], layers=None, out=tmp_path,
                      saes=SAE(a.d_model, 8, "relu"), **SMALL)  # fmt: skip
    wide = SAE(a.d_model + 1, 8, "relu", site="resid_post", layer=1)
    with pytest.raises(ValueError, match="another model or site"):
        oculi.harvest(a, prompts, sites=[], layers=None, out=tmp_path, saes=wide, **SMALL)
    with pytest.raises(InputError, match="sites is empty"):
        oculi.harvest(a, prompts, sites=[], layers=None, out=tmp_path, **SMALL)
