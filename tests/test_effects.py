"""Promoted tokens and the attention range/focus statistics, against hand computations.

References: each head's write rebuilt from the input of the output projection and the final
norm's input, both read by plain torch forward hooks, pushed through the final RMSNorm (Llama)
or LayerNorm (GPT-2) by hand and through the whole unembedding; the identity that a
component's direct effect on one token is its direct logit attribution share; explicit loops
over hand-built attention patterns.
"""

from __future__ import annotations

import copy

import pytest
import torch

import oculi
from models import last_inputs, prompt_ids, tiny_model
from oculi import AttentionCapture, CaptureConfig, InputError
from oculi.analysis import AttributionMethods, EntropyAnalysis

HEADS = CaptureConfig(capture_head_contributions=True)


@pytest.fixture(scope="module")
def tiny():
    return {f: oculi.attach(tiny_model(f)) for f in ("llama_mha", "llama_gqa", "gpt2", "gemma2")}


def head_write(model, o_proj, final_norm, ids, head: int, d: int, conv1d: bool = False):
    """``(the head's write [d_model], the final norm's input x)`` at the last position.

    Both from the inputs of the output projection and the final norm, read by plain forward
    hooks; the write is the head's slice of the projection's input times its columns of the
    weight (the projection's bias belongs to no head). float64.
    """
    seen = last_inputs(model, ids[None], {"o_in": o_proj, "x": final_norm})
    w = o_proj.weight.detach().double()
    w_o = w[head * d : (head + 1) * d] if conv1d else w[:, head * d : (head + 1) * d].T  # [D, d]
    return seen["o_in"][head * d : (head + 1) * d] @ w_o, seen["x"]


def top(delta: torch.Tensor, k: int) -> list[tuple[int, float]]:
    values, ids = delta.topk(k)
    return list(zip(ids.tolist(), values.tolist(), strict=True))


def assert_same(got, want, tol: float = 1e-6) -> None:
    assert [t for t, _ in got] == [t for t, _ in want]
    for (_, g), (_, w) in zip(got, want, strict=True):
        assert g == pytest.approx(w, rel=1e-5, abs=tol)


def test_llama_head_promotes_what_its_write_through_the_frozen_rmsnorm_gives(tiny):
    adapter = tiny["llama_mha"]
    model = adapter.model
    ids = prompt_ids()
    layer, head, norm = 1, 2, model.model.norm
    o_proj = model.model.layers[layer].self_attn.o_proj
    write, x = head_write(model, o_proj, norm, ids, head, adapter.d_head)
    rms = (x.pow(2).mean() + norm.variance_epsilon).sqrt()
    delta = model.lm_head.weight.detach().double() @ (norm.weight.detach().double() / rms * write)
    full = adapter.capture_full(ids, attention=HEADS)
    assert_same(AttributionMethods.promoted_tokens(full, (layer, head), k=5), top(delta, 5))
    got = AttributionMethods.promoted_tokens(full, (layer, head), k=3, by="negative")
    assert_same(got, [(t, -v) for t, v in top(-delta, 3)])


def test_gpt2_head_write_is_centred_by_the_frozen_layernorm(tiny):
    adapter = tiny["gpt2"]
    model = adapter.model
    ids = prompt_ids()
    layer, head, ln = 2, 1, model.transformer.ln_f
    c_proj = model.transformer.h[layer].attn.c_proj  # a Conv1D: weight [in, out]
    write, x = head_write(model, c_proj, ln, ids, head, adapter.d_head, conv1d=True)
    a = ln.weight.detach().double() / (x.var(unbiased=False) + ln.eps).sqrt()
    delta = model.lm_head.weight.detach().double() @ (a * (write - write.mean()))
    full = adapter.capture_full(ids, attention=HEADS)
    assert_same(AttributionMethods.promoted_tokens(full, (layer, head), k=5), top(delta, 5))
    uncentred = model.lm_head.weight.detach().double() @ (a * write)
    assert (uncentred - delta).abs().max() > 1e-3  # the centring matters here


@pytest.mark.parametrize("family", ["llama_gqa", "gpt2", "gemma2"])
def test_direct_effect_on_a_token_is_its_dla_share(tiny, family):
    adapter = tiny[family]
    full = adapter.capture_full(prompt_ids(), attention=HEADS)
    for position in (-1, 4):
        for component in [(1, 3), (0, 0), ("mlp", 2), ("attn", 1), ("mlp", -1)]:
            for by in ("value", "negative"):
                got = AttributionMethods.promoted_tokens(full, component, position, k=3, by=by)
                values = [v for _, v in got]
                assert values == sorted(values, reverse=by == "value")
                for token, delta in got:
                    dla = AttributionMethods.direct_logit_attribution(full, token, position)
                    kind, where = component
                    share = {"mlp": dla.mlp, "attn": dla.attention}.get(kind, dla.heads)
                    want = share[where] if isinstance(kind, str) else share[kind, where]
                    assert delta == pytest.approx(float(want), rel=1e-9, abs=1e-12)


def test_bfloat16_unembedding_ranked_a_block_of_rows_at_a_time(monkeypatch):
    # a bfloat16 model: the ranking widens W_U block by block (here 7 rows at a time, so
    # the 512-row unembedding takes 74 blocks); the top tokens are the float64 product's
    import oculi.analysis.effects as effects

    # a copy: the shared tiny model stays fp32 for the other tests
    adapter = oculi.attach(copy.deepcopy(tiny_model("gemma3")).to(torch.bfloat16))
    full = adapter.capture_full(prompt_ids(), attention=HEADS)
    monkeypatch.setattr(effects, "_BLOCK_FLOATS", 7 * adapter.d_model)
    got = AttributionMethods.promoted_tokens(full, (1, 2), k=5)
    for token, delta in got:
        dla = AttributionMethods.direct_logit_attribution(full, token)
        assert delta == pytest.approx(float(dla.heads[1, 2]), rel=1e-9, abs=1e-12)
    every = [
        float(AttributionMethods.direct_logit_attribution(full, t).heads[1, 2])
        for t in range(adapter.d_vocab)
    ]
    best = sorted(range(adapter.d_vocab), key=lambda t: -every[t])[:5]
    assert [t for t, _ in got] == best


def test_padded_batch_rows_are_each_sequence_alone(tiny):
    adapter = tiny["llama_gqa"]
    short, long = prompt_ids(6, seed=1), prompt_ids(9, seed=2)
    ids = torch.zeros(2, 9, dtype=torch.long)
    ids[0, 3:], ids[1] = short, long
    mask = (torch.arange(9) >= torch.tensor([[3], [0]])).long()
    batch = adapter.capture_full(ids, attention_mask=mask, attention=HEADS)
    for component in [(2, 1), ("mlp", 0)]:
        rows = AttributionMethods.promoted_tokens(batch, component, position=2, k=4)
        assert len(rows) == 2
        for row, one in zip(rows, (short, long), strict=True):
            alone = adapter.capture_full(one, attention=HEADS)
            want = AttributionMethods.promoted_tokens(alone, component, position=2, k=4)
            assert_same(row, want, tol=1e-5)


def test_promoted_tokens_refuses_bad_components(tiny):
    adapter = tiny["llama_mha"]
    ids = prompt_ids()
    full = adapter.capture_full(ids, attention=HEADS)
    with pytest.raises(InputError, match="unknown component kind 'mlps'"):
        AttributionMethods.promoted_tokens(full, ("mlps", 1))
    with pytest.raises(InputError, match=r"\(layer, head\)"):
        AttributionMethods.promoted_tokens(full, 3)
    with pytest.raises(oculi.LayerIndexError, match="valid layers are 0..2"):
        AttributionMethods.promoted_tokens(full, ("attn", 3))
    with pytest.raises(oculi.LayerIndexError, match="layer 7 was not captured"):
        AttributionMethods.promoted_tokens(full, (7, 0))
    with pytest.raises(IndexError, match="valid heads are 0..3"):
        AttributionMethods.promoted_tokens(full, (1, 4))
    with pytest.raises(ValueError, match="positive int"):
        AttributionMethods.promoted_tokens(full, (1, 0), k=0)
    with pytest.raises(ValueError, match="'value' or 'negative'"):
        AttributionMethods.promoted_tokens(full, (1, 0), by="abs")
    with pytest.raises(IndexError, match="position 20 out of range"):
        AttributionMethods.promoted_tokens(full, (1, 0), position=20)
    with pytest.raises(InputError, match="capture_head_contributions=True"):
        AttributionMethods.promoted_tokens(adapter.capture_full(ids), (1, 0))
    with pytest.raises(InputError, match="takes a FullCapture"):
        AttributionMethods.promoted_tokens(adapter.capture(ids), (1, 0))
    assert len(AttributionMethods.promoted_tokens(full, ("mlp", 0), k=500)) == 96  # V tokens


# -- attention range and focus ----------------------------------------------------------------
def two_layer_capture(t: int = 5, heads: int = 2) -> AttentionCapture:
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(2, heads, t, t, generator=gen)
    scores = scores.masked_fill(torch.ones(t, t).triu(1).bool(), float("-inf"))
    return AttentionCapture(layers=(0, 1), patterns=scores.softmax(-1), n_heads=heads)


def test_attention_distance_and_focus_by_hand():
    cap = two_layer_capture()
    p = cap.patterns.double()
    distance = EntropyAnalysis.attention_distance(cap)
    focus = EntropyAnalysis.max_attention(cap)
    assert distance.shape == focus.shape == (2, 2, 5)
    for layer in range(2):
        for h in range(2):
            for i in range(5):
                row = [float(p[layer, h, i, j]) for j in range(i + 1)]
                want = sum(w * (i - j) for j, w in enumerate(row))
                assert float(distance[layer, h, i]) == pytest.approx(want, rel=1e-6, abs=1e-6)
                assert float(focus[layer, h, i]) == pytest.approx(max(row), rel=1e-6)
    t = 6  # uniform causal rows: row i looks back i / 2 on average, its largest weight 1/(i+1)
    uniform = torch.ones(t, t).tril()
    uniform = (uniform / uniform.sum(-1, keepdim=True)).expand(1, 1, t, t)
    flat = AttentionCapture(layers=(0,), patterns=uniform, n_heads=1)
    rows = torch.arange(t, dtype=torch.float32)
    torch.testing.assert_close(EntropyAnalysis.attention_distance(flat)[0, 0], rows / 2)
    torch.testing.assert_close(EntropyAnalysis.max_attention(flat)[0, 0], 1 / (rows + 1))
    with pytest.raises(InputError, match="capture_patterns=True"):
        EntropyAnalysis.max_attention(AttentionCapture(layers=(0,), n_heads=1))


def test_attention_distance_and_focus_of_a_padded_batch_are_each_row_alone(tiny):
    adapter = tiny["llama_gqa"]
    short, long = prompt_ids(6, seed=1), prompt_ids(9, seed=2)
    for pad_left in (True, False):
        ids = torch.zeros(2, 9, dtype=torch.long)
        cols = slice(3, 9) if pad_left else slice(0, 6)
        ids[0, cols], ids[1] = short, long
        mask = torch.zeros(2, 9, dtype=torch.long)
        mask[0, cols], mask[1] = 1, 1
        batch = adapter.capture(ids, attention_mask=mask)
        for stat in (EntropyAnalysis.attention_distance, EntropyAnalysis.max_attention):
            got = stat(batch)
            assert got.shape == (2, adapter.n_layers, adapter.n_heads, 9)
            padding = torch.ones(9, dtype=torch.bool)
            padding[cols] = False
            assert got[0, ..., padding].isnan().all() and not got[0, ..., cols].isnan().any()
            torch.testing.assert_close(got[0, ..., cols], stat(adapter.capture(short)))
            torch.testing.assert_close(got[1], stat(adapter.capture(long)))


# -- Gemma 3 270M ------------------------------------------------------------------------------
@pytest.mark.gemma
def test_gemma_head_top_token_delta_is_its_dla_share(gemma):
    full = gemma.capture_full("The Eiffel Tower is in the city of", attention=HEADS)
    layer, head = gemma.n_layers - 1, 1
    got = AttributionMethods.promoted_tokens(full, (layer, head), k=10)
    assert len(got) == 10 and got[0][1] >= got[-1][1]
    for token, delta in (got[0], got[-1]):
        dla = AttributionMethods.direct_logit_attribution(full, token)
        assert delta == pytest.approx(float(dla.heads[layer, head]), rel=1e-9, abs=1e-12)
