"""CompositionAnalysis on constructed weights (invariances, planted circuits) and tiny models.

References: explicit matrix products ``‖W_OV W_QK‖ / (‖W_OV‖ ‖W_QK‖)`` in float64 from weights
read straight off the Hugging Face modules, and constructions whose scores are known exactly
(a head writing where another never reads scores 0; scaling a matrix changes no score).
"""

from __future__ import annotations

import pytest
import torch

import oculi
from models import prompt_ids, tiny_model
from oculi import AttentionCapture, InputError
from oculi.analysis import CompositionAnalysis, HeadWeights


def random_weights(layers=3, heads=2, d=16, dh=4, seed=0) -> HeadWeights:
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    return HeadWeights(
        w_q=r(layers, heads, d, dh),
        w_k=r(layers, heads, d, dh),
        w_v=r(layers, heads, d, dh),
        w_o=r(layers, heads, dh, d),
        n_kv_heads=heads,
    )


def explicit(w: HeadWeights, source, target, kind: str) -> float:
    ov1 = w.w_v[source] @ w.w_o[source]
    qk2 = w.w_q[target] @ w.w_k[target].T
    reader = {"q": qk2, "k": qk2.T, "v": w.w_v[target] @ w.w_o[target]}[kind]
    return float((ov1 @ reader).norm() / (ov1.norm() * reader.norm()))


def test_tensor_matches_explicit_products_and_is_zero_where_heads_cannot_compose():
    w = random_weights()
    scores = CompositionAnalysis.all_composition_scores(w, dtype=torch.float64)
    for kind in ("q", "k", "v"):
        assert scores[kind].shape == (3, 2, 3, 2)
        for source, target in (((0, 1), (1, 0)), ((0, 0), (2, 1)), ((1, 1), (2, 0))):
            want = explicit(w, source, target, kind)
            assert float(scores[kind][(*source, *target)]) == pytest.approx(want, rel=1e-6)
        assert scores[kind][1, :, 0, :].abs().max() == 0  # later -> earlier
        assert scores[kind][1, :, 1, :].abs().max() == 0  # same layer
    pair = CompositionAnalysis.qk_composition(w, source=(0, 1), target=(2, 0))
    assert pair.metadata["k"] == pytest.approx(explicit(w, (0, 1), (2, 0), "k"), rel=1e-9)
    ov = CompositionAnalysis.ov_composition(w, source=(0, 1), target=(2, 0))
    assert float(ov.values) == pytest.approx(explicit(w, (0, 1), (2, 0), "v"), rel=1e-9)
    matrix = CompositionAnalysis.composition_matrix(w, method="k").values
    assert matrix.shape == (6, 6)
    with pytest.raises(InputError, match="later layers"):
        CompositionAnalysis.qk_composition(w, source=(2, 0), target=(1, 0))


def test_scaling_a_matrix_changes_no_normalised_score():
    w = random_weights()
    scaled = HeadWeights(w.w_q * 0.2, w.w_k, w.w_v, w.w_o * 7.0, w.n_kv_heads)
    a = CompositionAnalysis.all_composition_scores(w, dtype=torch.float64)
    b = CompositionAnalysis.all_composition_scores(scaled, dtype=torch.float64)
    for kind in ("q", "k", "v"):
        torch.testing.assert_close(a[kind], b[kind], rtol=1e-6, atol=1e-9)


def test_a_head_writing_where_another_never_reads_scores_zero():
    w = random_weights(d=16)
    w_o, w_q, w_k, w_v = w.w_o.clone(), w.w_q.clone(), w.w_k.clone(), w.w_v.clone()
    w_o[0, 0, :, 8:] = 0  # head (0, 0) writes only into dims 0..7
    for t in (w_q, w_k, w_v):
        t[1, 1, :8] = 0  # head (1, 1) reads only dims 8..15
    orth = HeadWeights(w_q, w_k, w_v, w_o, w.n_kv_heads)
    scores = CompositionAnalysis.all_composition_scores(orth)
    for kind in ("q", "k", "v"):
        assert float(scores[kind][0, 0, 1, 1]) < 1e-3
        assert float(scores[kind][0, 1, 1, 1]) > 0.05  # the other head does reach it


def planted() -> tuple[HeadWeights, AttentionCapture]:
    """Head (0, 0) writes into dims 0..7, which only head (1, 1)'s keys read."""
    w = random_weights(layers=2, heads=2, d=16, seed=1)
    w_o, w_k = w.w_o.clone(), w.w_k.clone()
    w_o[0, 0, :, 8:] = 0
    w_o[0, 1, :, :8] = 0  # the distractor writes elsewhere
    w_k[1, :, :, :] = 0
    w_k[1, 1, :8] = torch.randn(8, 4, dtype=torch.float64)
    weights = HeadWeights(w.w_q, w_k, w.w_v, w_o, w.n_kv_heads)
    period = 6
    t = 2 * period
    prev = torch.zeros(t, t)
    prev[0, 0] = 1
    prev[torch.arange(1, t), torch.arange(t - 1)] = 1
    ind = torch.eye(t)  # first copy: attend to itself
    for q in range(period, t):
        ind[q] = 0
        ind[q, q - period + 1] = 1
    uniform = torch.ones(t, t).tril()
    uniform = uniform / uniform.sum(-1, keepdim=True)
    patterns = torch.stack([torch.stack([prev, prev]), torch.stack([uniform, ind])])
    ids = torch.arange(10, 10 + period).repeat(2)
    cap = AttentionCapture(
        layers=(0, 1), patterns=patterns, n_heads=2, metadata={"input_ids": ids.tolist()}
    )
    return weights, cap


def test_a_planted_previous_token_to_induction_pair_is_found():
    weights, cap = planted()
    found = CompositionAnalysis.detect_induction_circuit(cap, weights, threshold=0.5)
    circuits = found.metadata["circuits"]
    assert [(c["previous_token_head"], c["induction_head"]) for c in circuits] == [
        ((0, 0), (1, 1)),
        ((0, 1), (1, 1)),
    ]
    assert circuits[0]["composition_rank"] == 0
    assert circuits[0]["composition_score"] > 0.1
    assert circuits[1]["composition_score"] < 1e-3
    assert circuits[0]["induction_score"] == pytest.approx(1.0)
    with pytest.raises(InputError, match="pass the adapter"):  # seed 000's call: no weights
        CompositionAnalysis.detect_induction_circuit(cap, threshold=0.3)


def test_virtual_attention_is_the_product_of_the_path_patterns():
    _, cap = planted()
    got = CompositionAnalysis.virtual_attention(cap, [(0, 0), (1, 1)])
    want = cap.patterns[1, 1].double() @ cap.patterns[0, 0].double()
    torch.testing.assert_close(got.values, want)
    assert got.metadata["path_str"] == "L0H0 -> L1H1"
    with pytest.raises(InputError, match="increasing"):
        CompositionAnalysis.virtual_attention(cap, [(1, 1), (0, 0)])
    with pytest.raises(InputError, match="virtual_attention"):  # seed 000's path score call
        CompositionAnalysis.path_patching_score(cap, None, path=[(0, 0), (1, 1)])


@pytest.mark.parametrize("family", ["llama_gqa", "gemma3", "qwen3", "gpt2"])
def test_weights_read_off_the_modules_with_gqa_and_norm_gains(family):
    adapter = oculi.attach(tiny_model(family))
    anat = adapter.anatomy
    w = HeadWeights.from_adapter(adapter, dtype=torch.float64)
    h, kv, dh = adapter.n_heads, adapter.n_kv_heads, adapter.d_head
    rep = h // kv
    layer = 1
    if anat.q_proj is not None:
        k_proj = adapter.part(layer, f"{anat.attn}.{anat.k_proj}").weight.double()
        gain = adapter.part(layer, anat.attn_norm).weight.double() + anat.norm_offset
        for head in range(h):
            g = head // rep  # the key/value head this query head shares (repeat_kv)
            want = gain[:, None] * k_proj[g * dh : (g + 1) * dh].T
            if anat.k_norm:
                want = want * (
                    adapter.part(layer, f"{anat.attn}.k_norm").weight.double() + anat.norm_offset
                )
            torch.testing.assert_close(w.w_k[layer, head], want)
    # a composition score from these matrices equals the explicit product
    scores = CompositionAnalysis.all_composition_scores(w, dtype=torch.float64)
    want = explicit(w, (0, h - 1), (layer, 0), "k")
    assert float(scores["k"][0, h - 1, layer, 0]) == pytest.approx(want, rel=1e-6)
    # it runs on a real capture's pattern too
    cap = adapter.capture(prompt_ids())
    assert CompositionAnalysis.virtual_attention(cap, [(0, 0), (1, 0)]).values.shape[-1] == 11


@pytest.mark.parametrize("family", ["gpt2", "neox_sequential", "phi3", "llama_gqa", "qwen2"])
def test_fused_and_split_projections_reproduce_the_models_queries_and_values(family):
    # q_t - q_s = (n_t - n_s) @ W_raw with n the attention norm's output; the norm's gain
    # (and a LayerNorm's bias, which cancels in the difference) is folded, so
    # q_t - q_s = ((n_t - n_s) / gain) @ W_folded for every query head, and likewise for v
    adapter = oculi.attach(tiny_model(family))
    anat = adapter.anatomy
    w = HeadWeights.from_adapter(adapter, dtype=torch.float64)
    ids = prompt_ids()
    cap = adapter.capture(
        ids,
        oculi.CaptureConfig(
            qk_stage="pre_rope", capture_head_outputs=True, capture_head_contributions=True
        ),
    )
    resid = adapter.capture_residual(ids).pre_attn
    layer = 1
    norm = adapter.part(layer, anat.attn_norm)
    with torch.no_grad():
        normed = norm(resid[layer]).double()
    gain = norm.weight.double() + anat.norm_offset
    diff = (normed[5] - normed[2]) / gain
    rep = adapter.n_heads // adapter.n_kv_heads
    for head in range(adapter.n_heads):
        q = cap.queries[layer, head].double()
        torch.testing.assert_close(q[5] - q[2], diff @ w.w_q[layer, head], rtol=1e-4, atol=1e-5)
        v = cap.values[layer, head // rep].double()
        torch.testing.assert_close(v[5] - v[2], diff @ w.w_v[layer, head], rtol=1e-4, atol=1e-5)
        # and each head's residual contribution is its z through W_O
        z = cap.head_outputs[layer, head].double()
        out = cap.head_contributions[layer, head].double()
        torch.testing.assert_close(out, z @ w.w_o[layer, head], rtol=1e-4, atol=1e-5)
