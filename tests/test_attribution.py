"""AttributionMethods against the models' own outputs and hand computations.

References: the Hugging Face model's own logits (pre-cap logits from its base model's last
hidden state and ``lm_head``), explicit loops over hand-built patterns for rollout, the
closed form of max-flow on a two-layer graph, an explicit per-head ``α·v·W_O`` product, and a
finite-difference derivative for gradient × input.
"""

from __future__ import annotations

import copy

import pytest
import torch

import oculi
from models import FAMILIES, last_inputs, prompt_ids, tiny_model
from oculi import AttentionCapture, CaptureConfig, InputError, ResidualConfig
from oculi.analysis import AttributionMethods, HeadWeights
from oculi.models.anatomy import get_path

HEADS = CaptureConfig(capture_head_contributions=True)


def pre_cap_logits(adapter, ids):
    """The model's logits before any final soft-cap: ``lm_head(base_model(ids))`` ``[T, V]``."""
    with torch.no_grad():
        hidden = adapter.decoder(ids[None]).last_hidden_state[0]
        return get_path(adapter.model, adapter.anatomy.unembed)(hidden)


@pytest.fixture(scope="module")
def tiny():
    return {f: oculi.attach(tiny_model(f)) for f in FAMILIES}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_dla_adds_up_to_the_models_logit(tiny, family):
    adapter = tiny[family]
    ids = prompt_ids()
    full = adapter.capture_full(ids, attention=HEADS)
    ref = pre_cap_logits(adapter, ids)
    target = int(ref[-1].argmax())
    for position in (-1, 4):
        # the capture holds all it needs, a LayerNorm's bias (GPT-2, NeoX) included
        dla = AttributionMethods.direct_logit_attribution(full, target, position=position)
        want = float(ref[position, target])
        assert float(dla.total) == pytest.approx(want, rel=1e-4, abs=1e-5)
        assert float(dla.logit) == pytest.approx(want, rel=1e-4, abs=1e-5)
        assert dla.values.shape == (adapter.n_layers,)
        assert dla.heads.shape == (adapter.n_layers, adapter.n_heads)
        torch.testing.assert_close(dla.heads.sum(-1) + dla.attention_bias, dla.attention)
        anat = adapter.anatomy
        if adapter.part(0, f"{anat.attn}.{anat.o_proj}").bias is None:
            assert dla.attention_bias.abs().max() < 1e-4  # no output bias: heads are everything


def test_gemma2_soft_cap_is_stated_and_the_pre_cap_logit_exact(tiny):
    adapter = tiny["gemma2"]
    ids = prompt_ids()
    full = adapter.capture_full(ids)
    with torch.no_grad():
        capped = adapter.model(ids[None]).logits[0, -1]
    pre = pre_cap_logits(adapter, ids)[-1]
    target = int(capped.argmax())
    dla = AttributionMethods.direct_logit_attribution(full, target)
    assert "soft-cap" in dla.note and "pre-cap" in dla.note
    assert float(dla.total) == pytest.approx(float(pre[target]), rel=1e-5)
    assert float(dla.capped_logit) == pytest.approx(float(capped[target]), rel=1e-5)
    assert abs(float(pre[target]) - float(capped[target])) > 1e-3  # the cap does bite here


def padded_pair():
    """Two prompts of 6 and 9 tokens, the short one left-padded: ``(short, long, ids, mask)``."""
    short, long = prompt_ids(6, seed=1), prompt_ids(9, seed=2)
    ids = torch.zeros(2, 9, dtype=torch.long)
    ids[0, 3:], ids[1] = short, long
    return short, long, ids, (torch.arange(9) >= torch.tensor([[3], [0]])).long()


def test_dla_logit_difference_and_padded_batch(tiny):
    adapter = tiny["llama_gqa"]
    short, long, ids, mask = padded_pair()
    batch = adapter.capture_full(ids, attention_mask=mask)
    a, b = 5, 17
    dla = AttributionMethods.direct_logit_attribution(batch, (a, b))
    assert dla.values.shape == (2, adapter.n_layers)
    for row, one in enumerate((short, long)):
        ref = pre_cap_logits(adapter, one)[-1]
        assert float(dla.total[row]) == pytest.approx(float(ref[a] - ref[b]), rel=1e-4, abs=1e-5)


def test_dla_several_positions_at_once(tiny):
    adapter = tiny["qwen3"]
    ids = prompt_ids()
    full = adapter.capture_full(ids)
    ref = pre_cap_logits(adapter, ids)
    dla = AttributionMethods.direct_logit_attribution(full, 7, position=[0, 3, -1])
    assert dla.values.shape == (3, adapter.n_layers)
    torch.testing.assert_close(dla.total.float(), ref[[0, 3, -1], 7], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_neurons_add_up_to_each_layers_mlp_share(tiny, family):
    adapter = tiny[family]
    ids = prompt_ids()
    full = adapter.capture_full(ids)
    target = int(pre_cap_logits(adapter, ids)[-1].argmax())
    dla = AttributionMethods.direct_logit_attribution(full, target, position=[-1, 2])
    neurons = AttributionMethods.neuron_attribution(full, target, adapter, position=[-1, 2])
    assert neurons.values.shape == (2, adapter.n_layers, adapter.d_mlp)
    torch.testing.assert_close(neurons.mlp, dla.mlp, rtol=0, atol=0)  # the same readout
    summed = neurons.values.sum(-1) + neurons.bias
    torch.testing.assert_close(summed, dla.mlp, rtol=1e-4, atol=1e-5)


def test_neurons_against_a_hand_computation_on_llama(tiny):
    # act_n · (W_down[:, n] · u), u = (w / rms(x)) ⊙ W_U[t] for the final RMSNorm, with the
    # activations and the final residual read by plain torch hooks
    adapter = tiny["llama_mha"]
    model = adapter.model
    ids = prompt_ids()
    layer, target = 1, 11
    norm, down = model.model.norm, model.model.layers[layer].mlp.down_proj
    seen = last_inputs(model, ids[None], {"act": down, "x": norm})
    rms = (seen["x"].pow(2).mean() + norm.variance_epsilon).sqrt()
    u = norm.weight.detach().double() / rms * model.lm_head.weight[target].detach().double()
    want = seen["act"] * (down.weight.detach().double().T @ u)
    got = AttributionMethods.neuron_attribution(
        adapter.capture_full(ids), target, adapter, layers=[layer]
    )
    assert got.layers == (layer,) and got.values.shape == (1, adapter.d_mlp)
    torch.testing.assert_close(got.values[0], want, rtol=1e-4, atol=1e-6)
    top = AttributionMethods.top_attributions(got, k=1)[0]
    assert top[0][0] == layer and abs(top[1]) == pytest.approx(float(want.abs().max()), rel=1e-4)


def test_neurons_through_gemmas_post_mlp_norm_by_hand_in_bfloat16():
    # act_n · (W_down[:, n] · (g ⊙ u)) with g = (1 + w) / rms(mlp output) of the norm after
    # the MLP and u = (1 + w_f) / rms(x) ⊙ W_U[t] of the final norm, all from the bfloat16
    # tensors plain hooks read. The embedding is scaled so the residual's norm is Gemma's
    # (~860): reading the norm's scale as a ratio of residual differences was 27% off here
    model = copy.deepcopy(tiny_model("gemma3"))  # the shared one stays fp32 and unscaled
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(100)
    model = model.to(torch.bfloat16)
    adapter = oculi.attach(model)
    ids, layer, target = prompt_ids(), 1, 11
    block = model.model.layers[layer]
    seen = last_inputs(
        model,
        ids[None],
        {
            "act": block.mlp.down_proj,
            "out": block.post_feedforward_layernorm,
            "x": model.model.norm,
        },
    )

    def gain(norm, x):
        return (1 + norm.weight.detach().double()) / (x.pow(2).mean() + norm.eps).sqrt()

    u = gain(model.model.norm, seen["x"]) * model.lm_head.weight[target].detach().double()
    v = gain(block.post_feedforward_layernorm, seen["out"]) * u
    want = seen["act"] * (block.mlp.down_proj.weight.detach().double().T @ v)
    got = AttributionMethods.neuron_attribution(
        adapter.capture_full(ids), target, adapter, layers=[layer]
    ).values[0]
    # within bfloat16's rounding of the final normed residual, which DLA's readout reads
    torch.testing.assert_close(got, want, rtol=0, atol=1e-2 * float(want.abs().max()))


def test_neurons_refuse_what_they_cannot_attribute(tiny):
    adapter = tiny["gemma3"]
    ids = prompt_ids()
    no_output = adapter.capture_full(ids, mlp=oculi.MLPConfig(capture_output=False))
    with pytest.raises(InputError, match="capture_output=True"):
        AttributionMethods.neuron_attribution(no_output, 3, adapter)
    with pytest.raises(InputError, match="post_activation"):
        AttributionMethods.neuron_attribution(adapter.capture_full(ids, mlp=None), 3, adapter)
    with pytest.raises(oculi.LayerIndexError, match="no MLP capture"):
        AttributionMethods.neuron_attribution(adapter.capture_full(ids), 3, adapter, layers=[40])


def test_dla_of_a_saved_gpt2_capture_after_reattaching(tiny, tmp_path):
    adapter = tiny["gpt2"]
    ids = prompt_ids()
    adapter.capture_full(ids).save(tmp_path / "full.safetensors")
    loaded = oculi.load_capture(tmp_path / "full.safetensors")
    loaded.logits.attach_unembedding(adapter)  # the unembedding and the final norm's bias
    dla = AttributionMethods.direct_logit_attribution(loaded, 3)
    want = float(pre_cap_logits(adapter, ids)[-1, 3])
    assert float(dla.total) == pytest.approx(want, rel=1e-4, abs=1e-5)
    assert float(adapter.final_norm_bias().abs().sum()) > 0  # the bias is really there


def test_seed_form_residual_and_unembed(tiny):
    adapter = tiny["llama_mha"]
    ids = prompt_ids()
    residual = adapter.capture_residual(ids)
    unembed = adapter.model.lm_head.weight
    ref = pre_cap_logits(adapter, ids)[-1]
    exact = AttributionMethods.direct_logit_attribution(
        residual, unembed, 9, -1, final_norm=adapter.model.model.norm
    )
    assert float(exact.total) == pytest.approx(float(ref[9]), rel=1e-4, abs=1e-5)
    raw = AttributionMethods.direct_logit_attribution(residual, unembed, 9, -1, raw=True)
    assert "not the model's logit" in raw.note
    comp = AttributionMethods.component_attribution(residual, None, unembed, 9)
    assert comp.values.shape == (adapter.n_layers, 2)


def test_dla_refuses_partial_captures_and_bad_targets(tiny):
    adapter = tiny["llama_mha"]
    ids = prompt_ids()
    part = adapter.capture_full(ids, residual=ResidualConfig(layers=[0]))
    with pytest.raises(InputError, match="every layer"):
        AttributionMethods.direct_logit_attribution(part, 3)
    full = adapter.capture_full(ids)
    with pytest.raises(InputError, match="outside the vocabulary"):
        AttributionMethods.direct_logit_attribution(full, 10**7)
    gpt2 = tiny["gpt2"].capture_full(ids)
    gpt2.logits.final_norm_bias = None  # as a hand-made capture would lack it
    gpt2.residual.final_norm_bias = None
    with pytest.raises(InputError, match="LayerNorm whose bias"):
        AttributionMethods.direct_logit_attribution(gpt2, 3)
    with_adapter = AttributionMethods.direct_logit_attribution(gpt2, 3, adapter=tiny["gpt2"])
    want = float(pre_cap_logits(tiny["gpt2"], ids)[-1, 3])
    assert float(with_adapter.total) == pytest.approx(want, rel=1e-4, abs=1e-5)
    with pytest.raises(InputError, match="head_contributions"):
        AttributionMethods.head_attribution(full, 3)
    with pytest.raises(InputError, match="not output_weights=, target_token_id=, unembed"):
        AttributionMethods.head_attribution(  # seed 000's form
            full.attention,
            output_weights=adapter.model.model.layers[0].self_attn.o_proj.weight,
            unembed_matrix=adapter.model.lm_head.weight,
            target_token_id=3,
        )


def test_top_attributions_orders_by_magnitude():
    values = torch.tensor([[0.1, -3.0], [2.0, 0.5]])
    top = AttributionMethods.top_attributions(values, k=2)
    assert top == [((0, 1), -3.0), ((1, 0), 2.0)]
    assert AttributionMethods.top_attributions(values, k=1, by="value") == [((1, 0), 2.0)]


# -- rollout and flow against hand computations -----------------------------------------------
def two_layer_capture(t: int = 4, heads: int = 2) -> AttentionCapture:
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(2, heads, t, t, generator=gen)
    scores = scores.masked_fill(torch.ones(t, t).triu(1).bool(), float("-inf"))
    return AttentionCapture(layers=(0, 1), patterns=scores.softmax(-1), n_heads=heads)


def mixed(pattern, layer: int, t: int):
    """``0.5·mean_h A + 0.5·I`` element by element."""
    heads = pattern.shape[1]
    return [
        [
            0.5 * sum(float(pattern[layer, h, i, j]) for h in range(heads)) / heads
            + (0.5 if i == j else 0.0)
            for j in range(t)
        ]
        for i in range(t)
    ]


def test_rollout_is_the_product_of_residual_mixed_layers():
    cap = two_layer_capture()
    t = 4
    a0, a1 = mixed(cap.patterns, 0, t), mixed(cap.patterns, 1, t)
    product = [[sum(a1[i][k] * a0[k][j] for k in range(t)) for j in range(t)] for i in range(t)]
    rollout = AttributionMethods.attention_rollout(cap).values
    torch.testing.assert_close(rollout[0], torch.tensor(a0, dtype=torch.float64))
    torch.testing.assert_close(rollout[1], torch.tensor(product, dtype=torch.float64))
    torch.testing.assert_close(rollout[1].sum(-1), torch.ones(t, dtype=torch.float64))


def test_flow_on_two_layers_is_the_sum_of_path_bottlenecks():
    # every path source (0, j) -> (1, k) -> (2, p) is edge-disjoint from the others, so the
    # max flow is the sum over k of each path's smallest capacity
    cap = two_layer_capture()
    t, p = 4, 3
    a0, a1 = mixed(cap.patterns, 0, t), mixed(cap.patterns, 1, t)
    flow = AttributionMethods.attention_flow(cap, position=p).values  # scipy, integer capacities
    exact = AttributionMethods.attention_flow(cap, position=p, backend="networkx").values
    for j in range(t):
        want = sum(min(a0[k][j], a1[p][k]) for k in range(t))
        assert float(exact[j]) == pytest.approx(want, abs=1e-12)
        assert float(flow[j]) == pytest.approx(want, abs=1e-8)  # capacities scaled by 2^30
    early = AttributionMethods.attention_flow(cap, position=1).values
    assert early[2:].abs().max() == 0  # later tokens cannot reach position 1


def layered_capture(layers: int, t: int, seed: int, spread: float = 1.0) -> AttentionCapture:
    """Causal patterns of ``layers`` layers; small ``spread`` makes every weight small."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(layers, 2, t, t, generator=gen) * spread
    scores = scores.masked_fill(torch.ones(t, t).triu(1).bool(), float("-inf"))
    return AttentionCapture(layers=tuple(range(layers)), patterns=scores.softmax(-1), n_heads=2)


@pytest.mark.parametrize(
    ("layers", "t", "spread"), [(1, 5, 1.0), (2, 7, 2.0), (4, 9, 3.0), (6, 12, 1.0)]
)
def test_flow_is_the_networkx_max_flow_and_the_cut_bounds_it(layers, t, spread):
    for seed in range(4):
        cap = layered_capture(layers, t, seed, spread)
        for position in (t - 1, t // 2):
            exact = AttributionMethods.attention_flow(cap, position, backend="networkx").values
            flow = AttributionMethods.attention_flow(cap, position)
            torch.testing.assert_close(flow.values, exact, rtol=0, atol=1e-8)
            assert sum(flow.metadata["proven"].values()) == position + 1
            cut = AttributionMethods.attention_flow(cap, position, method="cut")
            assert "upper bound" in cut.note
            assert bool((cut.values >= exact - 1e-12).all())  # a cut never undercuts the flow
            assert not cut.values[position + 1 :].any()  # later tokens cannot reach it


def test_flow_cut_bound_and_exact_flow_on_random_sparse_graphs():
    # capacities with many zero edges, 1-5 layers, 1-7 tokens: every bound is at least the
    # networkx max flow, and the pruned-and-proven SciPy flow is that max flow
    from oculi.analysis.flow import _flows_networkx, _flows_scipy, cut_bounds

    gen = torch.Generator().manual_seed(0)
    tight = total = 0
    for _ in range(150):
        layers, t = (
            int(torch.randint(1, 6, (1,), generator=gen)),
            int(torch.randint(1, 8, (1,), generator=gen)),
        )
        a = torch.rand(layers, t, t, generator=gen, dtype=torch.float64)
        a = (a * (torch.rand(layers, t, t, generator=gen) < 0.6)).tril()
        a = 0.5 * a / a.sum(-1, keepdim=True).clamp(min=1e-9) + 0.5 * torch.eye(t)
        exact = _flows_networkx(a, t - 1)
        cut = cut_bounds(a)
        assert bool((cut >= exact - 1e-12).all())
        torch.testing.assert_close(_flows_scipy(a, t - 1)[0], exact, rtol=0, atol=1e-8)
        tight += int(((cut - exact).abs() < 1e-9).sum())
        total += t
    assert tight < total  # some minimum cuts are outside the family: the fallback is exercised


def test_flow_falls_back_to_the_whole_graph_when_small_edges_carry_it():
    # 60 tokens with near-uniform attention: every edge off the diagonal is below 1e-2, so the
    # pruned graph cannot reach the bound and the denser graphs must prove or solve each token
    cap = layered_capture(3, 60, seed=0, spread=0.05)
    flow = AttributionMethods.attention_flow(cap)
    proven = flow.metadata["proven"]
    assert proven["edges >= 0.01"] < 60 and sum(proven.values()) == 60
    exact = AttributionMethods.attention_flow(cap, backend="networkx").values
    torch.testing.assert_close(flow.values, exact, rtol=0, atol=1e-7)


def test_flow_cut_families_on_a_hand_built_graph():
    # two layers, three tokens, a[l, i, j] the edge (l, j) -> (l + 1, i); sink (2, 2)
    a = torch.tensor(
        [
            [[1.0, 0.0, 0.0], [0.1, 0.9, 0.0], [0.2, 0.3, 0.5]],
            [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.1, 0.3, 0.6]],
        ],
        dtype=torch.float64,
    )
    from oculi.analysis.flow import cut_bounds

    # s=0: S = {(0,0), (1,0)} cuts (0,0)->(1,1) 0.1, (0,0)->(1,2) 0.2, (1,0)->sink 0.1: 0.4,
    #      less than the source's edges (1.3) or the sink's (1.0)
    # s=1: S = {(0,1), (1,1)} cuts (0,1)->(1,2) 0.3 and (1,1)->sink 0.3: 0.6
    # s=2: the one path, min(0.5, 0.6)
    want = torch.tensor([0.4, 0.6, 0.5], dtype=torch.float64)
    torch.testing.assert_close(cut_bounds(a), want)
    # each equals the sum of the path bottlenecks, the max flow of a two-layer graph
    paths = [sum(min(a[0, k, j], a[1, 2, k]) for k in range(j, 3)) for j in range(3)]
    torch.testing.assert_close(torch.stack(paths), want)


def test_flow_at_several_positions_is_each_position_alone():
    cap = layered_capture(3, 8, seed=3, spread=2.0)
    for method in ("exact", "cut"):
        many = AttributionMethods.attention_flow(cap, [7, 2, -3], method=method)
        assert many.values.shape == (3, 8) and many.metadata["index"] == [7, 2, 5]
        for row, q in enumerate((7, 2, 5)):
            one = AttributionMethods.attention_flow(cap, q, method=method).values
            torch.testing.assert_close(many.values[row], one, rtol=0, atol=0)
    with pytest.raises(InputError, match="non-empty"):
        AttributionMethods.attention_flow(cap, [])


def test_flow_of_a_padded_batch_is_each_row_alone(tiny):
    adapter = tiny["llama_gqa"]
    short, long, ids, mask = padded_pair()
    batch = adapter.capture(ids, attention_mask=mask)
    for method in ("exact", "cut"):
        flow = AttributionMethods.attention_flow(batch, [-1, 1], method=method)
        assert flow.values.shape == (2, 2, 9) and flow.metadata["index"] == [[8, 4], [8, 1]]
        assert flow.values[0, :, :3].isnan().all()  # padding
        for row, (one, cols) in enumerate(((short, slice(3, 9)), (long, slice(0, 9)))):
            alone = AttributionMethods.attention_flow(adapter.capture(one), [-1, 1], method=method)
            torch.testing.assert_close(flow.values[row, :, cols], alone.values, atol=1e-6, rtol=0)


def test_positions_may_be_numpy_ints_and_bad_ones_are_named():
    import numpy as np

    cap = layered_capture(3, 6, seed=1)
    one = AttributionMethods.attention_flow(cap, np.int64(-1)).values
    torch.testing.assert_close(one, AttributionMethods.attention_flow(cap, -1).values)
    many = AttributionMethods.attention_flow(cap, np.array([5, 2])).values
    torch.testing.assert_close(many[1], AttributionMethods.attention_flow(cap, 2).values)
    for bad in ("last", 2.0, True, [1, 2.5]):
        with pytest.raises(TypeError, match="position must be an int or a list of ints"):
            AttributionMethods.attention_flow(cap, bad)


def test_flow_rejects_an_unknown_method():
    with pytest.raises(ValueError, match="'exact' or 'cut'"):
        AttributionMethods.attention_flow(two_layer_capture(), method="approx")


def test_value_weighted_attention_is_the_per_head_product(tiny):
    adapter = tiny["llama_gqa"]
    cap = adapter.capture(prompt_ids())
    got = AttributionMethods.value_weighted_attention(cap, adapter).values
    rep = adapter.n_heads // adapter.n_kv_heads
    o_proj = [adapter.part(i, "self_attn.o_proj").weight for i in range(adapter.n_layers)]
    for layer in (0, adapter.n_layers - 1):
        for h in range(adapter.n_heads):
            w_o = o_proj[layer][:, h * adapter.d_head : (h + 1) * adapter.d_head]  # [d, D]
            v = cap.values[layer, h // rep]  # [T, D]
            want = cap.patterns[layer, h] * (v @ w_o.T).norm(dim=-1)[None, :]
            torch.testing.assert_close(got[layer, h], want, rtol=1e-5, atol=1e-6)
    plain = AttributionMethods.value_weighted_attention(cap)
    assert "‖α·v‖" in plain.note
    w = HeadWeights.from_adapter(adapter)
    assert w.w_k.shape == (adapter.n_layers, adapter.n_heads, adapter.d_model, adapter.d_head)


def test_gradient_x_input_matches_a_finite_difference(tiny):
    adapter = tiny["llama_mha"]
    model = adapter.model
    ids = prompt_ids()
    gxi = AttributionMethods.gradient_x_input(adapter, ids, 11).values
    # The reference runs in float64 (a copy of the model): fp32 central differences carry
    # ~1e-4 of rounding noise that changes with the thread count.
    model64 = copy.deepcopy(model).double()
    emb = model64.model.embed_tokens(ids[None]).detach()

    def logit(scale: float, j: int) -> float:
        bumped = emb.clone()
        bumped[0, j] *= scale
        with torch.no_grad():
            return float(model64(inputs_embeds=bumped).logits[0, -1, 11])

    def central(h: float, j: int) -> float:
        return (logit(1 + h, j) - logit(1 - h, j)) / (2 * h)

    for j in (0, 5, ids.numel() - 1):
        # Richardson extrapolation of central differences: error O(h^4)
        want = (4 * central(5e-3, j) - central(1e-2, j)) / 3
        assert float(gxi[j]) == pytest.approx(want, rel=1e-3, abs=1e-5)


# -- Gemma 3 270M ------------------------------------------------------------------------------
FACT = "The Eiffel Tower is in the city of"


@pytest.mark.gemma
def test_gemma_dla_is_the_models_logit_at_several_positions_and_in_a_padded_batch(gemma):
    full = gemma.capture_full(FACT, attention=HEADS)
    logits = gemma.forward(FACT)
    paris = gemma.to_single_token(" Paris")
    for position in (-1, 2, 5):
        dla = AttributionMethods.direct_logit_attribution(full, paris, position=position)
        want = float(logits[position, paris])
        assert abs(float(dla.total) - want) <= 1e-4 * abs(want)
        torch.testing.assert_close(
            dla.heads.sum(-1), dla.attention, rtol=0, atol=1e-5 * float(dla.attention.abs().max())
        )
    prompts = [FACT, "Rome is the capital of"]
    batch = gemma.capture_full(prompts)
    dla = AttributionMethods.direct_logit_attribution(batch, paris)
    for row, prompt in enumerate(prompts):
        want = float(gemma.forward(prompt)[-1, paris])
        assert abs(float(dla.total[row]) - want) <= 1e-4 * abs(want)
    assert dla.note == ""  # Gemma 3 does not soft-cap its final logits
