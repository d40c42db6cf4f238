"""Splicing SAEs into tiny random models, against plain-PyTorch hooks written here.

The references never use oculi's hook system: a ``register_forward_hook`` on the decoder
layer (its output is ``resid_post``) or on the MLP module (input ``mlp_in``, output
``mlp_out`` in LLaMA, which has no post-MLP norm) that edits the activation by hand.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

import oculi
from models import oculi_hooks, tiny_model, tiny_tokenizer
from oculi.intervention import InterventionContext
from oculi.sae import SAE, SAEPatch, capture_latents

PROMPT = "the cat sat on the big red tree and the dog ran"
LAYER = 1


def adapter_for(family: str) -> oculi.Adapter:
    return oculi.attach(tiny_model(family), tiny_tokenizer())


def random_sae(d_in, kind="topk", seed=0, site="resid_post", **kw) -> SAE:
    k = {"k": 8} if kind == "topk" else {}
    sae = SAE(d_in, 96, kind, site=site, layer=LAYER, **k, **kw).init_weights(seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.b_dec.copy_(0.1 * torch.randn(sae.d_out, generator=g))
        sae.b_enc.copy_(0.05 * torch.randn(sae.d_sae, generator=g))
        sae.W_enc.mul_(3.0)
    return sae.requires_grad_(False)


def state_hash(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode() + t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class layer_output_hook:  # noqa: N801 - a context manager used like a function
    """A plain torch forward hook on the decoder layer: ``resid_post := fn(resid_post)``."""

    def __init__(self, adapter, layer, fn):
        self.module, self.fn = adapter.layer_modules[layer], fn

    def __enter__(self):
        def hook(_m, _args, out):
            if isinstance(out, tuple):
                return (self.fn(out[0]), *out[1:])
            return self.fn(out)

        self.handle = self.module.register_forward_hook(hook)

    def __exit__(self, *exc):
        self.handle.remove()


def _ids(a, text=PROMPT):
    return a.prepare(text).input_ids[0]


FAMILIES = ["llama_gqa", "gemma3", "gpt2"]


@pytest.mark.parametrize("family", FAMILIES)
def test_splice_with_error_term_leaves_logits_unchanged(family):
    a = adapter_for(family)
    ids = _ids(a)
    base = a.forward(ids)
    sae = random_sae(a.d_model)
    patch = SAEPatch(sae, error=True, record=True)  # recording forces the hooks to run
    with InterventionContext(a, [patch]):
        got = a.forward(ids)
    torch.testing.assert_close(got, base, atol=1e-5, rtol=0)
    assert len(patch.recorded) == 1 and patch.recorded[0].shape == (1, len(ids), 96)
    # no edits: the activation is passed on untouched, so the logits are bit-equal
    assert torch.equal(got, base)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["topk", "relu", "jumprelu"])
def test_splice_without_error_equals_a_hand_replacement(family, kind):
    a = adapter_for(family)
    ids = _ids(a)
    sae = random_sae(a.d_model, kind)
    if kind == "jumprelu":
        sae.threshold.fill_(0.3)
    with layer_output_hook(a, LAYER, lambda x: sae.decode(sae.encode(x))):
        want = a.forward(ids)
    with InterventionContext(a, [SAEPatch(sae)]):
        got = a.forward(ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got - a.forward(ids)).abs().max() > 1e-3  # the splice does change the model


def _hand_edit(sae, ablate=(), steer=None):
    steer = steer or {}

    def fn(x):
        a = sae.encode(x)
        out = x.clone()
        for i in ablate:
            out = out - a[..., i : i + 1] * sae.W_dec[i]
        for i, c in steer.items():
            out = out + c * sae.W_dec[i]
        return out

    return fn


@pytest.mark.parametrize("family", FAMILIES)
def test_latent_ablation_and_steering_equal_hand_edits_in_a_forward(family):
    a = adapter_for(family)
    ids = _ids(a)
    sae = random_sae(a.d_model)
    acts = capture_latents(a, ids, sae)[0][0]
    active = acts.sum(0).topk(3).indices.tolist()  # latents that do fire on this prompt
    cases = [
        (dict(ablate=active), _hand_edit(sae, ablate=active)),
        (dict(steer={5: 4.0, 17: -2.5}), _hand_edit(sae, steer={5: 4.0, 17: -2.5})),
        (dict(ablate=active[:1], steer={9: 3.0}), _hand_edit(sae, active[:1], {9: 3.0})),
    ]
    for kw, fn in cases:
        with layer_output_hook(a, LAYER, fn):
            want = a.forward(ids)
        with InterventionContext(a, [SAEPatch(sae, error=True, **kw)]):
            got = a.forward(ids)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert (got - a.forward(ids)).abs().max() > 1e-4, kw


@pytest.mark.parametrize("family", ["llama_gqa", "gemma3"])
def test_latent_edits_in_generate_with_the_kv_cache(family):
    a = adapter_for(family)
    batch = a.prepare([PROMPT, "the dog ran"])  # a padded batch
    sae = random_sae(a.d_model)
    gen = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=8,
               do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)  # fmt: skip

    def generate(**kw):
        out = a.model.generate(**gen, **kw)
        return out.sequences, torch.stack(out.logits)

    plain_ids, plain_logits = generate()
    for kw, fn in [
        (dict(steer={5: 6.0}), _hand_edit(sae, steer={5: 6.0})),
        (dict(ablate=list(range(0, 96, 2))), _hand_edit(sae, ablate=range(0, 96, 2))),
    ]:
        with layer_output_hook(a, LAYER, fn):
            want_ids, want_logits = generate()
        patch = SAEPatch(sae, error=True, record=True, **kw)
        with InterventionContext(a, [patch]):
            cached_ids, cached_logits = generate()
            uncached_ids, uncached_logits = generate(use_cache=False)
        assert torch.equal(cached_ids, want_ids) and torch.equal(uncached_ids, want_ids)
        torch.testing.assert_close(cached_logits, want_logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(uncached_logits, want_logits, atol=1e-4, rtol=0)
        assert (cached_logits - plain_logits).abs().max() > 1e-3  # the edit does something
        # with the cache: the prompt pass, then one column per generated token
        n = batch.input_ids.shape[1]
        assert [r.shape[1] for r in patch.recorded[:8]] == [n] + [1] * 7


def test_positions_restrict_the_splice():
    a = adapter_for("llama_gqa")
    ids = _ids(a)
    sae = random_sae(a.d_model)

    def only_at_3(x):
        out = x.clone()
        out[:, 3] = sae.decode(sae.encode(x[:, 3]))
        return out

    with layer_output_hook(a, LAYER, only_at_3):
        want = a.forward(ids)
    with InterventionContext(a, [SAEPatch(sae, positions=[3])]):
        got = a.forward(ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_transcoder_replaces_the_mlp_output():
    a = adapter_for("llama_gqa")
    ids = _ids(a)
    tc = random_sae(a.d_model, "relu", site="mlp_in", write_site="mlp_out", skip=True,
                    center_input=False)  # fmt: skip
    tc.W_skip.copy_(
        0.05 * torch.randn(a.d_model, a.d_model, generator=torch.Generator().manual_seed(2))
    )
    mlp = a.layer_modules[LAYER].mlp
    handle = mlp.register_forward_hook(lambda _m, args, _out: tc(args[0]))
    try:
        want = a.forward(ids)
    finally:
        handle.remove()
    with InterventionContext(a, [SAEPatch(tc)]):
        got = a.forward(ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # with the error term and an ablation: mlp_out - a_i W_dec[i], a read at mlp_in
    handle = mlp.register_forward_hook(
        lambda _m, args, out: out - tc.encode(args[0])[..., 7:8] * tc.W_dec[7]
    )
    try:
        want = a.forward(ids)
    finally:
        handle.remove()
    with InterventionContext(a, [SAEPatch(tc, error=True, ablate=7)]):
        got = a.forward(ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_capture_latents_equal_encoding_the_captured_site():
    a = adapter_for("gemma3")
    prompts = [PROMPT, "the dog ran"]
    s1, s2 = random_sae(a.d_model), random_sae(a.d_model, "relu", seed=3)
    s2.layer = 2
    dense = capture_latents(a, prompts, [s1, s2])
    sparse = capture_latents(a, prompts, [s1, s2], sparse=True)
    res = a.capture_residual(prompts)
    batch = a.prepare(prompts)
    mask = batch.attention_mask.bool()[..., None]
    for sae, got, sp in zip((s1, s2), dense, sparse):
        want = sae.encode(res.post_mlp[:, sae.layer]) * mask
        assert got.shape == (2, batch.input_ids.shape[1], 96)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        assert sp.is_sparse and torch.equal(sp.to_dense(), got)
    assert (dense[0][~mask[..., 0]] == 0).all()  # padding has no latents


def test_capture_full_saes_records_latents_beside_the_parts_in_one_forward(tmp_path):
    a = adapter_for("llama_gqa")
    prompts = [PROMPT, "the dog ran"]
    s1, tc = random_sae(a.d_model), random_sae(a.d_model, "relu", seed=5, site="mlp_in")
    tc.layer = 2
    calls = []
    handle = a.decoder.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        full = a.capture_full(prompts, attention=None, mlp=None, logits=None, saes=[s1, tc])
    finally:
        handle.remove()
    assert len(calls) == 1  # the parts and the latents from one forward
    res = a.capture_residual(prompts)
    mask = a.prepare(prompts).attention_mask.bool()[..., None]
    want = [s1.encode(res.post_mlp[:, LAYER]) * mask, tc.encode(res.pre_mlp[:, 2]) * mask]
    for got, ref in zip(full.latents, want):
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(full.residual.post_mlp, res.post_mlp, atol=0, rtol=0)
    # SAELens' names; the first SAE at a site answers
    assert full[f"blocks.{LAYER}.hook_resid_post.hook_sae_acts_post"] is full.latents[0]
    assert full["blocks.2.ln2.hook_normalized.hook_sae_acts_post"] is full.latents[1]
    with pytest.raises(KeyError, match="no SAE read resid_post of layer 0 in this capture"):
        full["blocks.0.hook_resid_post.hook_sae_acts_post"]
    # latents alone, one prompt, sparse; then a file round trip keeps them
    one = a.capture_full(
        PROMPT, attention=None, residual=None, mlp=None, logits=None, saes=s1, sparse_latents=True
    )
    assert one.latents[0].is_sparse and one.latents[0].shape == (want[0].shape[1], 96)
    torch.testing.assert_close(one.latents[0].to_dense(), s1.encode(res.post_mlp[0, LAYER]))
    full.save(tmp_path / "c.safetensors")
    back = oculi.load_capture(tmp_path / "c.safetensors")
    assert back.metadata["saes"] == full.metadata["saes"]
    for got, ref in zip(back.latents, full.latents):
        assert torch.equal(got, ref)
    with pytest.raises(oculi.InputError, match="saes= does not stream"):
        a.capture_full(PROMPT, saes=s1, stream_to=tmp_path / "s")
    with pytest.raises(TypeError, match="takes an SAE or a non-empty list"):
        a.capture_full(PROMPT, saes=[])


def test_saelens_run_with_saes_and_run_with_cache_with_saes():
    """SAELens' HookedSAETransformer calls: the splice equals SAEPatch's, the cached latents
    equal encoding the plain forward's site, and the cache downstream sees the splice."""
    a = adapter_for("llama_gqa")
    ids = a.prepare([PROMPT, PROMPT]).input_ids
    sae = random_sae(a.d_model)
    plain = a.run_with_hooks(ids)
    with InterventionContext(a, [SAEPatch(sae)]):
        spliced = a.run_with_hooks(ids)
    assert (spliced - plain).abs().max() > 1e-2  # the splice changes the output
    torch.testing.assert_close(a.run_with_saes(ids, saes=[sae]), spliced, atol=0, rtol=0)
    with_error = a.run_with_saes(ids, saes=sae, use_error_term=True)
    torch.testing.assert_close(with_error, plain, atol=1e-5, rtol=0)

    name = f"blocks.{LAYER}.hook_resid_post.hook_sae_acts_post"
    _, clean = a.run_with_cache(ids, names_filter=f"blocks.{LAYER}.hook_resid_post")
    x = clean[f"blocks.{LAYER}.hook_resid_post"]
    logits, cache = a.run_with_cache_with_saes(ids, saes=[sae])
    torch.testing.assert_close(logits, spliced, atol=1e-5, rtol=0)  # patterns: eager attention
    torch.testing.assert_close(cache[name], sae.encode(x), atol=1e-5, rtol=1e-5)
    # the next block reads the reconstruction
    torch.testing.assert_close(
        cache[f"blocks.{LAYER + 1}.hook_resid_pre"], sae.decode(sae.encode(x)), atol=1e-5, rtol=0
    )
    # filters: the latents alone, by name; a predicate; the batch dimension removed
    _, only = a.run_with_cache_with_saes(ids[:1], saes=[sae], names_filter=name,
                                         remove_batch_dim=True)  # fmt: skip
    assert list(only.cache_dict) == [name] and only[name].shape == (ids.shape[1], 96)
    _, some = a.run_with_cache_with_saes(ids, saes=[sae], names_filter=lambda n: "resid_pre" in n)
    assert name not in some.cache_dict and f"blocks.{LAYER}.hook_resid_pre" in some.cache_dict
    with pytest.raises(oculi.InputError, match="no SAE given reads"):
        a.run_with_cache_with_saes(ids, saes=[sae], names_filter=[name.replace("1", "0", 1)])
    with pytest.raises(oculi.InputError, match="two SAEs read the same hook"):
        a.run_with_saes(ids, saes=[sae, random_sae(a.d_model, seed=4)])
    assert not oculi_hooks(a.model)


def test_model_is_restored_and_bad_patches_are_refused():
    a = adapter_for("llama_gqa")
    before = state_hash(a.model)
    sae = random_sae(a.d_model)
    with (
        pytest.raises(RuntimeError, match="boom"),
        InterventionContext(a, [SAEPatch(sae, ablate=[1])]),
    ):
        a.forward(_ids(a))
        raise RuntimeError("boom")
    assert state_hash(a.model) == before
    assert not oculi_hooks(a.model)  # transformers' own output-capturing hooks may stay
    with pytest.raises(
        IndexError, match=r"ablate latent 96 out of range for d_sae=96 \(valid 0\.\.95\)"
    ):
        SAEPatch(sae, ablate=[96])
    with pytest.raises(ValueError, match="steer maps latents to numbers"):
        SAEPatch(sae, steer=[3])
    with pytest.raises(
        ValueError, match=r"d_in=32 but site 'resid_post' of this model is d_model=64"
    ):
        InterventionContext(a, [SAEPatch(random_sae(32))])
    unbound = SAE(64, 96, "relu")
    with pytest.raises(ValueError, match="bound to no site"):
        InterventionContext(a, [SAEPatch(unbound)])
    far = random_sae(a.d_model)
    far.layer = 7
    with pytest.raises(IndexError, match="layer 7"):
        InterventionContext(a, [SAEPatch(far)])


# -- Gemma 3 270M -----------------------------------------------------------------------------
@pytest.mark.gemma
def test_gemma_splice_with_and_without_error_term(gemma):
    prompt = "The Eiffel Tower is located in the city of"
    base = gemma.forward(prompt)
    sae = SAE(gemma.d_model, 512, "topk", k=16, site="resid_post", layer=6).init_weights(0)
    sae.requires_grad_(False)
    with InterventionContext(gemma, [SAEPatch(sae, error=True, record=True)]):
        same = gemma.forward(prompt)
    assert torch.equal(same, base)
    with layer_output_hook(gemma, 6, lambda x: sae.decode(sae.encode(x)).to(x.dtype)):
        want = gemma.forward(prompt)
    with InterventionContext(gemma, [SAEPatch(sae)]):
        got = gemma.forward(prompt)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    acts = capture_latents(gemma, prompt, sae)[0]
    with layer_output_hook(gemma, 6, _hand_edit(sae, steer={int(acts[0, -1].argmax()): 50.0})):
        want = gemma.forward(prompt)
    with InterventionContext(
        gemma, [SAEPatch(sae, error=True, steer={int(acts[0, -1].argmax()): 50.0})]
    ):
        got = gemma.forward(prompt)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
