"""Interventions against identities and hand computations, on tiny random models.

Every check compares oculi's numbers with an independent reference: a hand-edited copy of the
model, a softmax computed here, the model's own forward, or generation without the KV cache.
"""

from __future__ import annotations

import copy
import hashlib
import warnings

import pytest
import torch

import oculi
from models import oculi_hooks, tiny_model, tiny_tokenizer
from oculi.capture.configs import CaptureConfig, ResidualConfig
from oculi.capture.engine import record
from oculi.intervention import (
    ActivationPatch,
    HeadAblation,
    InterventionContext,
    NoEffectWarning,
    SpectraScaler,
    SteeringVector,
    run_with_interventions,
)

PROMPT = "the cat sat on the big red tree and the dog ran"  # 13 tokens with <bos>
OTHER = "a dog saw the small blue house and a man went home"
SITES = [
    "resid_pre", "attn_in", "q_pre", "k_pre", "q", "k", "v", "pattern", "z", "attn_out",
    "resid_mid", "mlp_in", "mlp_gate", "mlp_up", "mlp_post", "mlp_out", "resid_post",
]  # fmt: skip
BRIDGE = {"q", "k", "v", "pattern", "z"}
EXACT = 0.0
BRIDGE_TOL = 2e-5  # the attention bridge runs sdpa with an explicit mask: last-bit differences


def adapter_for(family: str) -> oculi.Adapter:
    return oculi.attach(tiny_model(family), tiny_tokenizer())


def ids_of(adapter, text=PROMPT) -> torch.Tensor:
    return adapter.prepare(text).input_ids[0]


def state_hash(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def attn_impls(adapter) -> list[str]:
    return [c._attn_implementation for c in adapter.attention_configs]


def random_vector(n: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(n, generator=torch.Generator().manual_seed(seed))


# -- SpectraScaler -------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama_gqa", "gemma3", "gpt2"])
def test_spectra_alpha_one_is_exact_noop(family):
    a = adapter_for(family)
    ids = ids_of(a)
    base = a.forward(ids)
    with InterventionContext(a, [SpectraScaler(layer=1, head=2, alpha=1.0)]):
        assert torch.equal(a.forward(ids), base)


@pytest.mark.parametrize("family", ["llama_gqa", "gemma3", "gpt2"])
@pytest.mark.parametrize("alpha", [0.5, 2.5])
def test_spectra_patterns_equal_softmax_of_scaled_scores(family, alpha):
    a = adapter_for(family)
    ids = ids_of(a)
    layer, head = 1, 2  # gemma3's layer 1 is a full-attention layer
    cfg = CaptureConfig(layers=[layer], capture_values=False)
    clean = a.capture(ids, cfg)
    with InterventionContext(a, [SpectraScaler(layer=layer, head=head, alpha=alpha)]):
        scaled = a.capture(ids, cfg)
    q, k = clean.queries[0, head], clean.keys[0, head // (a.n_heads // a.n_kv_heads)]
    scores = q @ k.T * a.d_head**-0.5
    t = ids.shape[0]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    by_hand = torch.softmax((alpha * scores).masked_fill(~causal, float("-inf")), dim=-1)
    torch.testing.assert_close(scaled.patterns[0, head], by_hand, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scaled.queries[0, head], alpha * q, atol=1e-6, rtol=1e-6)
    others = [h for h in range(a.n_heads) if h != head]
    # GQA: the other heads of the group share the key and must not change
    torch.testing.assert_close(
        scaled.patterns[0, others], clean.patterns[0, others], atol=1e-6, rtol=0
    )
    torch.testing.assert_close(scaled.keys, clean.keys, atol=0, rtol=0)
    entropy = lambda p: -(p * p.clamp_min(1e-30).log()).sum(-1).mean()  # noqa: E731
    sharper = entropy(scaled.patterns[0, head]) < entropy(clean.patterns[0, head])
    assert sharper == (alpha > 1)


# -- HeadAblation --------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama_gqa", "gemma3", "gpt2", "neox_parallel"])
def test_zero_ablation_equals_zeroing_o_proj_columns(family):
    a = adapter_for(family)
    ids = ids_of(a)
    layer, head, d = 1, 3, a.d_head
    edited = copy.deepcopy(a.model)
    anat = a.anatomy
    o_proj = oculi.models.anatomy.get_path(
        edited, f"{anat.layers}.{layer}.{anat.attn}.{anat.o_proj}"
    )
    with torch.no_grad():
        if anat.conv1d:  # GPT-2 Conv1D stores [in, out]
            o_proj.weight[head * d : (head + 1) * d, :] = 0
        else:
            o_proj.weight[:, head * d : (head + 1) * d] = 0
        reference = edited(ids[None]).logits[0]
    with InterventionContext(a, [HeadAblation(layer=layer, head=head)]):
        ablated = a.forward(ids)
    torch.testing.assert_close(ablated, reference, atol=BRIDGE_TOL, rtol=0)
    assert (ablated - a.forward(ids)).abs().max() > 1e-3


def test_mean_ablation_uses_the_prompt_mean_per_row():
    a = adapter_for("llama_gqa")
    prompts = [PROMPT, "the dog ran home"]  # left-padded second row
    batch = a.prepare(prompts)
    layer, head = 1, 0
    cfg = CaptureConfig(layers=[layer], capture_head_outputs=True)
    clean = a.capture(prompts, cfg).head_outputs[:, 0, head]  # [B, T, D]
    with InterventionContext(a, [HeadAblation(layer, head, "mean")]):
        z = a.capture(prompts, cfg).head_outputs[:, 0, head]
    m = batch.attention_mask.float()[..., None]
    mean = (clean * m).sum(1) / m.sum(1)  # over real tokens only
    for r in range(2):
        real = batch.attention_mask[r].bool()
        torch.testing.assert_close(
            z[r, real], mean[r].expand(int(real.sum()), -1), atol=1e-6, rtol=0
        )


def test_mean_ablation_with_reference_and_resample():
    a = adapter_for("gemma3")
    layer, head = 2, 1
    cfg = CaptureConfig(layers=[layer], capture_head_outputs=True)
    reference = [OTHER, "the king and the queen"]
    ref_batch = a.prepare(reference)
    ref_z = a.capture(reference, cfg).head_outputs[:, 0, head]
    m = ref_batch.attention_mask.float()[..., None]
    dataset_mean = (ref_z * m).sum((0, 1)) / m.sum()
    with InterventionContext(a, [HeadAblation(layer, head, "mean", reference=reference)]):
        z = a.capture(PROMPT, cfg).head_outputs[0, head]
    torch.testing.assert_close(z, dataset_mean.expand_as(z), atol=1e-6, rtol=0)

    source_z = a.capture(OTHER, cfg).head_outputs[0, head]
    assert ids_of(a, OTHER).shape == ids_of(a).shape
    with InterventionContext(a, [HeadAblation(layer, head, "resample", source=OTHER)]):
        z = a.capture(PROMPT, cfg).head_outputs[0, head]
    torch.testing.assert_close(z, source_z, atol=1e-6, rtol=0)
    with (
        pytest.raises(ValueError, match="source has 5 tokens but the input has 13"),
        InterventionContext(a, [HeadAblation(layer, head, "resample", source="a b c d")]),
    ):
        a.forward(PROMPT)


# -- ActivationPatch -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "family", ["llama_gqa", "qwen3", "gemma3", "gpt2", "phi3", "neox_parallel", "olmo2"]
)
def test_patching_clean_into_clean_changes_nothing(family):
    a = adapter_for(family)
    ids = ids_of(a)
    base = a.forward(ids)
    layer = 1
    sites = [s for s in SITES if s != "mlp_gate" or a.anatomy.gated]
    # module sites recorded without the attention bridge, so their values are bit-exact
    clean = record(a, a.prepare(ids), {s: (layer,) for s in sites if s not in BRIDGE})
    clean |= record(a, a.prepare(ids), {s: (layer,) for s in BRIDGE})
    for site in sites:
        value = clean[site][1][:, 0]  # [1, ...] in capture layout
        for position, v in ((None, value), (4, value[..., 4, :])):
            with InterventionContext(a, [ActivationPatch(site, layer, position, v)]):
                got = a.forward(ids)
            tol = BRIDGE_TOL if site in BRIDGE else EXACT
            torch.testing.assert_close(got, base, atol=tol, rtol=0, msg=f"{site} at {position}")


@pytest.mark.parametrize("family", ["llama_gqa", "gemma2", "gpt2"])
def test_patching_last_resid_post_restores_clean_logits(family):
    a = adapter_for(family)
    clean_ids, corrupt_ids = ids_of(a), ids_of(a, OTHER)
    last, pos = a.n_layers - 1, 7
    clean_logits, corrupt_logits = a.forward(clean_ids), a.forward(corrupt_ids)
    value = a.capture_residual(clean_ids).post_mlp[last, pos]
    with InterventionContext(a, [ActivationPatch("resid_post", last, pos, value)]):
        patched = a.forward(corrupt_ids)
    torch.testing.assert_close(patched[pos], clean_logits[pos], atol=1e-5, rtol=0)
    others = [t for t in range(len(corrupt_ids)) if t != pos]
    torch.testing.assert_close(patched[others], corrupt_logits[others], atol=0, rtol=0)


def test_patch_inside_capture_changes_only_the_patched_place():
    a = adapter_for("llama_gqa")
    ids = ids_of(a)
    v = random_vector(a.d_model)
    clean = a.capture_residual(ids)
    with InterventionContext(a, [ActivationPatch("resid_pre", 1, 3, v, mode="add")]):
        got = a.capture_residual(ids)
    for name in ("pre_attn", "post_attn", "pre_mlp", "post_mlp"):
        before, after = getattr(clean, name), getattr(got, name)
        assert torch.equal(after[0], before[0]), name  # layers before the patch
        assert torch.equal(after[1:, :3], before[1:, :3]), name  # earlier positions (causal)
        assert (after[1:, 3:] - before[1:, 3:]).abs().max() > 1e-3, name
    torch.testing.assert_close(got.pre_attn[1, 3], clean.pre_attn[1, 3] + v, atol=0, rtol=0)
    assert torch.equal(got.pre_attn[1, 4:], clean.pre_attn[1, 4:])  # same layer, other tokens


@pytest.mark.parametrize("family", ["llama_gqa", "gemma3", "neox_sequential"])
def test_resid_mid_patch_reaches_the_mlp_and_the_carried_residual(family):
    a = adapter_for(family)
    ids = ids_of(a)
    layer, pos = 1, 5
    value = random_vector(a.d_model, seed=1, scale=3.0)
    cfg = ResidualConfig(layers=[layer], capture_mlp_out=True)
    with InterventionContext(a, [ActivationPatch("resid_mid", layer, pos, value)]):
        got = a.capture_residual(ids, cfg)
    torch.testing.assert_close(got.post_attn[0, pos], value, atol=1e-5, rtol=0)
    # the residual carried past the MLP is the patched one: post_mlp = resid_mid + mlp_out
    torch.testing.assert_close(got.post_mlp[0, pos], value + got.mlp_out[0, pos], atol=1e-5, rtol=0)
    norm = oculi.models.anatomy.get_path(a.layer_modules[layer], a.anatomy.mlp_norm)
    torch.testing.assert_close(got.pre_mlp[0, pos], norm(value[None])[0], atol=1e-5, rtol=0)


def test_per_row_patches_equal_separate_runs():
    """The patching sweep's building block: each row of a batch gets its own patch."""
    a = adapter_for("llama_gqa")
    clean_ids, corrupt_ids = ids_of(a), ids_of(a, OTHER)
    layer = 1
    clean = run_with_interventions(a, clean_ids, record={"resid_pre": [layer]})
    acts = clean.recorded["resid_pre"][1][0, 0]  # [T, d]
    positions = [2, 5, 9]
    patches = [
        ActivationPatch("resid_pre", layer, p, acts[p], rows=[i]) for i, p in enumerate(positions)
    ]
    batch = corrupt_ids[None].expand(len(positions), -1)
    out = run_with_interventions(a, batch, patches, logits_at=-1, record={"resid_post": [2]})
    assert out.logits.shape == (3, a.d_vocab)
    for i, p in enumerate(positions):
        with InterventionContext(a, [ActivationPatch("resid_pre", layer, p, acts[p])]):
            single = a.forward(corrupt_ids)
            resid = a.capture_residual(corrupt_ids, ResidualConfig(layers=[2])).post_mlp[0]
        torch.testing.assert_close(out.logits[i], single[-1], atol=1e-5, rtol=0)
        torch.testing.assert_close(out.recorded["resid_post"][1][i, 0], resid, atol=1e-5, rtol=0)
    # logits only where asked, equal to the full forward's
    full = a.forward(corrupt_ids)
    some = run_with_interventions(a, corrupt_ids, logits_at=[0, 6, -1]).logits
    torch.testing.assert_close(some[0], full[[0, 6, 12]], atol=1e-5, rtol=0)


def test_gemma2_logits_at_applies_the_final_softcap():
    a = adapter_for("gemma2")
    ids = ids_of(a)
    full = a.forward(ids)
    got = run_with_interventions(a, ids, logits_at=torch.tensor([4])).logits
    torch.testing.assert_close(got[0], full[4], atol=1e-5, rtol=0)


# -- SteeringVector ------------------------------------------------------------------------
def test_steering_with_coefficient_zero_is_a_noop():
    a = adapter_for("llama_gqa")
    ids = ids_of(a)
    base = a.forward(ids)
    with InterventionContext(
        a, [SteeringVector(random_vector(a.d_model), layer=1, coefficient=0.0)]
    ):
        assert torch.equal(a.forward(ids), base)


@pytest.mark.parametrize("family", ["llama_gqa", "gemma3", "gpt2", "mistral"])
@pytest.mark.parametrize(
    "where", [dict(), dict(positions=[-1], steps=[0, 2, 3]), dict(steps=range(1, 4))]
)
def test_steered_generation_with_cache_equals_without(family, where):
    a = adapter_for(family)
    prompts = [PROMPT, "the dog ran"]  # a left-padded batch
    vec = SteeringVector(random_vector(a.d_model, scale=4.0), layer=1, **where)
    plain = a.generate(prompts, max_new_tokens=8)
    with InterventionContext(a, [vec]):
        cached = a.generate(prompts, max_new_tokens=8)
        uncached = a.generate(prompts, max_new_tokens=8, use_cache=False)
        ids = a.prepare(prompts)
        own = a.model.generate(
            input_ids=ids.input_ids,
            attention_mask=ids.attention_mask,
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=0,
        )
    assert cached == uncached
    assert cached != plain  # the steering did something
    assert a.tokenizer.batch_decode(own[:, ids.shape[1] :], skip_special_tokens=True) == cached


def test_steering_steps_leave_earlier_tokens_alone():
    a = adapter_for("llama_gqa")
    ids = ids_of(a)[None]
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    plain = a.model.generate(ids, **gen)[0, ids.shape[1] :]
    vec = SteeringVector(random_vector(a.d_model, scale=6.0), layer=0, steps=[2, 3, 4, 5])
    with InterventionContext(a, [vec]):
        steered = a.model.generate(ids, **gen)[0, ids.shape[1] :]
        uncached = a.model.generate(ids, use_cache=False, **gen)[0, ids.shape[1] :]
    # step k feeds the k-th generated token, so tokens 1 and 2 come from unsteered passes
    assert torch.equal(steered[:2], plain[:2])
    assert not torch.equal(steered, plain)
    assert torch.equal(steered, uncached)


def test_plain_forwards_resolve_positions_against_their_own_input():
    """Only generate's uncached steps continue a prompt; a longer plain forward is a new one."""
    a = adapter_for("llama_gqa")
    ids = ids_of(a)
    patch = ActivationPatch("resid_pre", 1, -1, random_vector(a.d_model), mode="add")
    with InterventionContext(a, [patch]):
        short = a.forward(ids[:-1])
        longer = a.forward(ids)
    with InterventionContext(a, [patch]):
        fresh = a.forward(ids)
    assert torch.equal(longer, fresh)
    assert not torch.equal(longer[:-1], short)  # the short forward patched its own last token


def test_other_interventions_in_generation_with_and_without_cache():
    a = adapter_for("gemma3")
    ids = ids_of(a)[None]
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    interventions = [
        SpectraScaler(layer=0, head=1, alpha=3.0),
        HeadAblation(layer=1, head=0, method="mean"),
        ActivationPatch("k", 2, [3, 5], 0.5, mode="add", head=0),
        ActivationPatch("resid_pre", 1, -1, random_vector(a.d_model, scale=5.0), mode="add"),
    ]
    plain = a.model.generate(ids, **gen)
    with InterventionContext(a, interventions):
        cached = a.model.generate(ids, **gen)
        uncached = a.model.generate(ids, use_cache=False, **gen)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, plain)


def test_from_contrast_is_the_difference_of_last_real_token_means():
    a = adapter_for("llama_gqa")
    positive = ["the cat sat", "a big red dog ran"]
    negative = ["the king", "a small blue house and a tree"]
    layer = 1
    vec = SteeringVector.from_contrast(a, positive, negative, layer=layer)

    def last_token_mean(prompts):
        rows = [
            a.capture_residual(p, ResidualConfig(layers=[layer])).post_mlp[0, -1] for p in prompts
        ]
        return torch.stack(rows).mean(0)

    torch.testing.assert_close(
        vec.vector, last_token_mean(positive) - last_token_mean(negative), atol=1e-5, rtol=0
    )
    mean_vec = SteeringVector.from_contrast(a, positive, negative, layer=layer, position="mean")

    def token_mean(prompts):
        rows = [
            a.capture_residual(p, ResidualConfig(layers=[layer])).post_mlp[0].mean(0)
            for p in prompts
        ]
        return torch.stack(rows).mean(0)

    torch.testing.assert_close(
        mean_vec.vector, token_mean(positive) - token_mean(negative), atol=1e-5, rtol=0
    )


# -- hygiene -------------------------------------------------------------------------------
def _everything(a):
    ids = ids_of(a)
    return [
        SpectraScaler(1, 0, 2.0),
        HeadAblation(0, 1, "mean"),
        ActivationPatch("resid_mid", 1, 2, random_vector(a.d_model)),
        ActivationPatch("pattern", 2, 3, 1.0 / len(ids), head=0),
        SteeringVector(random_vector(a.d_model), layer=2),
    ]


@pytest.mark.parametrize("family", ["llama_gqa", "gemma2"])
def test_context_leaves_the_model_as_found(family):
    a = adapter_for(family)
    before_hash, before_impl = state_hash(a.model), attn_impls(a)
    base = a.forward(PROMPT)
    with InterventionContext(a, _everything(a)):
        assert oculi_hooks(a.model)
        assert set(attn_impls(a)) == {"oculi"}
        a.forward(PROMPT)
        a.capture_full(PROMPT)
        a.generate(PROMPT, max_new_tokens=3)
    assert oculi_hooks(a.model) == []
    assert attn_impls(a) == before_impl
    assert state_hash(a.model) == before_hash
    assert torch.equal(a.forward(PROMPT), base)


def test_context_restores_after_an_exception():
    a = adapter_for("llama_gqa")
    before_hash, before_impl = state_hash(a.model), attn_impls(a)
    with pytest.raises(RuntimeError, match="boom"), InterventionContext(a, _everything(a)):
        a.forward(PROMPT)
        raise RuntimeError("boom")
    # an error raised from inside the forward (a padding position, found when the prompt arrives)
    with (
        pytest.raises(ValueError, match="padding"),
        InterventionContext(a, [SpectraScaler(1, 0, 2.0), ActivationPatch("z", 1, 0, 0.0)]),
    ):
        a.forward([PROMPT, "the dog"])
    assert oculi_hooks(a.model) == []
    assert attn_impls(a) == before_impl
    assert state_hash(a.model) == before_hash


def test_nested_contexts_compose():
    a = adapter_for("llama_gqa")
    ids = ids_of(a)
    v1, v2 = random_vector(a.d_model, 1), random_vector(a.d_model, 2)
    with InterventionContext(a, [SteeringVector(v1 + v2, layer=1)]):
        together = a.forward(ids)
    with (
        InterventionContext(a, [SteeringVector(v1, layer=1)]),
        InterventionContext(a, [SteeringVector(v2, layer=1)]),
    ):
        nested = a.forward(ids)
    torch.testing.assert_close(nested, together, atol=1e-5, rtol=0)


# -- bad inputs (shared/BAD_INPUTS.md) -----------------------------------------------------
def test_row1_row3_layer_and_site_names():
    a = adapter_for("llama_gqa")
    with pytest.raises(
        IndexError, match=r"layer 7 out of range for a model with 3 layers \(0..2\)"
    ):
        InterventionContext(a, [HeadAblation(layer=7, head=0)])
    with pytest.raises(KeyError, match="unknown site 'resid_mid2'; did you mean 'resid_mid'"):
        ActivationPatch("resid_mid2", 1, 0, 0.0)
    with pytest.raises(ValueError, match="'head_out'.*patch 'z' with head="):
        InterventionContext(a, [ActivationPatch("head_out", 1, 0, 0.0, head=0)])


def test_row2_head_out_of_range_names_the_head_counts():
    a = adapter_for("llama_gqa")  # 4 query heads, 2 KV heads
    with pytest.raises(
        ValueError, match=r"head 4 out of range for site 'z'.*n_heads=4, n_kv_heads=2"
    ):
        InterventionContext(a, [HeadAblation(layer=1, head=4)])
    with pytest.raises(ValueError, match=r"head 2 out of range for site 'k'.*0..1 \(n_kv_heads\)"):
        InterventionContext(a, [ActivationPatch("k", 1, 0, 0.0, head=2)])
    with pytest.raises(ValueError, match=r"head 4 out of range for site 'q'"):
        InterventionContext(a, [SpectraScaler(layer=1, head=4, alpha=2.0)])
    InterventionContext(a, [ActivationPatch("q", 1, 0, 0.0, head=3)])  # a query head is fine


def test_row6_value_shape_dtype_device_checked_before_the_forward():
    a = adapter_for("llama_gqa")
    with pytest.raises(ValueError, match=r"shape \[32\], expected .*\[batch, d_model=64\]"):
        InterventionContext(a, [ActivationPatch("resid_post", 1, 3, torch.zeros(32))])
    with pytest.raises(
        ValueError, match=r"shape \[5, 16\], expected .*\[batch, positions=2, d_head=16\]"
    ):
        InterventionContext(a, [ActivationPatch("z", 1, [1, 2], torch.zeros(5, 16), head=0)])
    with pytest.raises(
        ValueError, match=r"dtype torch.float64, expected the model's torch.float32"
    ):
        InterventionContext(
            a, [ActivationPatch("resid_post", 1, 3, torch.zeros(64, dtype=torch.float64))]
        )
    with pytest.raises(ValueError, match=r"is on meta, expected the model's device cpu"):
        InterventionContext(
            a, [ActivationPatch("resid_post", 1, 3, torch.zeros(64, device="meta"))]
        )
    with pytest.raises(ValueError, match=r"must be a floating tensor"):
        ActivationPatch("resid_post", 1, 3, torch.zeros(64, dtype=torch.long))
    # per-row values: 3 rows for a batch of 2, found when the prompt arrives, before any layer runs
    ran = []
    handle = a.layer_modules[0].register_forward_hook(lambda *_: ran.append(1))
    try:
        with (
            pytest.raises(
                ValueError,
                match=r"shape \[3, 2, 64\], expected .*\[batch=2, positions=2, d_model=64\]",
            ),
            InterventionContext(
                a, [ActivationPatch("resid_pre", 1, [1, 2], torch.zeros(3, 2, 64))]
            ),
        ):
            a.forward([PROMPT, OTHER])
    finally:
        handle.remove()
    assert ran == []


def test_row7_position_past_the_end_or_padding():
    a = adapter_for("llama_gqa")
    with (
        pytest.raises(
            IndexError,
            match=r"position 13 out of range for a sequence of 13 tokens \(valid positions 0..12",
        ),
        InterventionContext(a, [ActivationPatch("resid_pre", 1, 13, 0.0)]),
    ):
        a.forward(PROMPT)
    with (
        pytest.raises(ValueError, match=r"position 2 is padding in row 1"),
        InterventionContext(a, [ActivationPatch("resid_pre", 1, [2, 12], 0.0)]),
    ):
        a.forward([PROMPT, "the dog ran"])  # row 1 is left-padded to 13 columns
    with (
        pytest.raises(ValueError, match=r"position 0 is padding in row 1"),
        InterventionContext(a, [SteeringVector(random_vector(64), 1, positions=0)]),
    ):
        a.capture_residual([PROMPT, "the dog ran"])


def test_row13_bad_steering_vectors():
    a = adapter_for("llama_gqa")
    with pytest.raises(ValueError, match=r"vector has width 32, expected d_model=64"):
        InterventionContext(a, [SteeringVector(random_vector(32), layer=1)])
    with pytest.raises(ValueError, match="NaN or Inf"):
        SteeringVector(torch.full((64,), float("nan")), layer=1)
    with pytest.raises(ValueError, match="NaN or Inf"):
        SteeringVector(torch.tensor([float("inf")] + [0.0] * 63), layer=1)
    with pytest.raises(ValueError, match="zero norm"):
        SteeringVector(torch.zeros(64), layer=1)
    with pytest.raises(ValueError, match=r"must be 1-D \[d_model\], got shape \[2, 64\]"):
        SteeringVector(torch.ones(2, 64), layer=1)
    with pytest.raises(ValueError, match="same mean"):
        SteeringVector.from_contrast(a, ["the cat"], ["the cat"], layer=1)


def test_row14_debug_mode_warns_about_no_ops(monkeypatch):
    a = adapter_for("llama_gqa")
    ids = ids_of(a)
    clean = a.capture_residual(ids).post_mlp[1]
    with (
        pytest.warns(NoEffectWarning, match=r"ActivationPatch\(site='resid_post'.*changed nothing"),
        InterventionContext(a, [ActivationPatch("resid_post", 1, None, clean)], check_effect=True),
    ):
        a.forward(ids)
    monkeypatch.setenv("OCULI_DEBUG", "1")
    with (
        pytest.warns(
            NoEffectWarning, match=r"SpectraScaler\(layer=1, head=0, alpha=1.0\) is a no-op"
        ),
        InterventionContext(a, [SpectraScaler(1, 0, 1.0)]),
    ):
        a.forward(ids)
    with (
        pytest.warns(NoEffectWarning, match="never ran"),
        InterventionContext(a, [HeadAblation(layer=2, head=0)]),
    ):
        a.capture_residual(ids, ResidualConfig(layers=[0]))  # stops before layer 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with InterventionContext(
            a, [HeadAblation(layer=1, head=0), SteeringVector(random_vector(64), 1)]
        ):
            a.forward(ids)
        a.forward(ids)  # outside a context: nothing to check


def test_row16_generation_steps_must_be_explicit():
    v = random_vector(64)
    with pytest.raises(
        ValueError, match=r"ambiguous: write range\(3\) for the first 3 steps or \[3\]"
    ):
        SteeringVector(v, layer=1, steps=3)
    with pytest.raises(ValueError, match="steps count from 0"):
        SteeringVector(v, layer=1, steps=[-1, 2])
    with pytest.raises(ValueError, match="got the string 'prompt'"):
        SteeringVector(v, layer=1, steps="prompt")
    with pytest.raises(ValueError, match="empty selection"):
        SteeringVector(v, layer=1, steps=range(0))
    with pytest.raises(ValueError, match="steps must be 'all', a range or a list"):
        SteeringVector(v, layer=1, steps=2.5)
