"""Figures draw exactly the numbers of the results they show (checked against independent
computations from the model's own logits where a figure derives something)."""

from __future__ import annotations

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

import oculi
from models import tiny_model, tiny_tokenizer
from oculi import patching, visualize
from oculi.analysis import CircuitDetection

matplotlib.use("Agg")
PROMPT = "the cat sat on the tree and the dog sat on the"


@pytest.fixture(scope="module")
def tiny():
    return oculi.attach(tiny_model("gemma3"), tiny_tokenizer())


@pytest.fixture(scope="module")
def lc(tiny):
    return tiny.capture_logits(PROMPT)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _image(ax):
    return np.asarray(ax.images[0].get_array(), dtype=np.float64)


def test_attention_heatmap_and_grid_draw_the_captured_patterns(tiny):
    cap = tiny.capture(PROMPT)
    tokens = tiny.to_str_tokens(PROMPT)
    ax = visualize.attention_heatmap(cap, layer=1, head=2, tokens=tokens)
    np.testing.assert_array_equal(_image(ax), cap.patterns[1, 2].double().numpy())
    assert [t.get_text() for t in ax.get_xticklabels()][3] == f"3 {tokens[3]!r}"
    fig = visualize.attention_grid(cap, layer=2, tokens=tokens)
    for h, ax in enumerate(fig.axes[: tiny.n_heads]):
        np.testing.assert_array_equal(_image(ax), cap.patterns[2, h].float().numpy())
    with pytest.raises(ValueError, match=r"head 9 out of range: the capture has heads 0..3"):
        visualize.attention_heatmap(cap, layer=1, head=9)


def test_logit_lens_grid_shows_each_layers_top1(tiny, lc):
    ax = visualize.logit_lens_grid(lc, tiny.tokenizer)
    full = lc.logits()  # [L, T, V], computed from the normalised residual
    np.testing.assert_allclose(
        _image(ax), torch.softmax(full, -1).amax(-1).double().numpy(), atol=1e-6
    )
    texts = [t.get_text() for t in ax.texts]
    n = full.shape[1]
    own = tiny.forward(PROMPT).argmax(-1)  # the model's own prediction per position
    assert texts[-n:] == [tiny.tokenizer.decode([int(i)])[:10] for i in own]


def test_convergence_panels_against_full_logits(lc):
    fig = visualize.convergence(lc)
    logits = lc.logits().double()  # [L, T, V]
    logp = torch.log_softmax(logits, -1)
    final = logits[-1].argmax(-1)  # [T]
    kl = (logp[-1].exp() * (logp[-1] - logp)).sum(-1)
    target = logits.gather(-1, final.expand(logits.shape[0], -1)[..., None])
    ranks = (logits > target).sum(-1)
    kl_img, match_img, rank_img, logit_img = (_image(ax) for ax in fig.axes[:4])
    np.testing.assert_allclose(kl_img, kl.numpy(), atol=1e-4)
    np.testing.assert_array_equal(match_img, (logits.argmax(-1) == final).double().numpy())
    np.testing.assert_array_equal(rank_img, ranks.double().numpy())
    np.testing.assert_allclose(logit_img, logits.amax(-1).numpy(), atol=1e-4)
    assert (rank_img[-1] == 0).all()


def test_input_preservation_ranks_the_input_token(tiny, lc):
    fig = visualize.input_preservation(lc)
    logits = lc.logits().double()
    ids = torch.tensor(lc.metadata["input_ids"][0])
    own = logits.gather(-1, ids.expand(logits.shape[0], -1)[..., None])
    np.testing.assert_array_equal(
        _image(fig.axes[0]), ((logits > own).sum(-1) + 1).double().numpy()
    )
    line = fig.axes[1].lines[0]  # axes: rank panel, line panel, then the colour bar
    mean_p = torch.softmax(logits, -1).gather(-1, ids.expand(logits.shape[0], -1)[..., None])
    np.testing.assert_allclose(line.get_ydata(), mean_p[..., 0].mean(1).numpy(), atol=1e-6)


def test_lens_probability_plots_the_results_probabilities(tiny):
    res = oculi.logit_lens(tiny, PROMPT, "tree")
    ax = visualize.lens_probability(res)
    np.testing.assert_allclose(ax.lines[0].get_ydata(), res.probs.numpy(), atol=0)


def test_attribution_bars(tiny):
    scores = CircuitDetection.detect_previous_token_heads(tiny.capture(PROMPT)) - 0.5  # [L, H]
    ax = visualize.head_attribution_bars(scores, k=5)
    widths = [p.get_width() for p in ax.patches][::-1]  # drawn bottom-up
    flat = scores.flatten().double()
    expected = flat[flat.abs().argsort(descending=True)[:5]]
    np.testing.assert_allclose(widths, expected.numpy(), atol=1e-6)
    attn, mlp = scores[:, 0], scores[:, 1]
    ax = visualize.layer_attribution(attn, mlp)
    heights = [p.get_height() for p in ax.patches]
    np.testing.assert_allclose(heights, torch.cat([attn, mlp]).numpy(), atol=1e-6)


def _hand_entropy(patterns: torch.Tensor) -> torch.Tensor:
    """-sum p log p over keys, with 0 log 0 = 0: [L, H, T]."""
    p = patterns.double()
    return -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)


def test_entropy_heatmap_draws_the_mean_entropy_per_layer_and_head(tiny):
    from oculi.analysis import EntropyAnalysis

    cap = tiny.capture(PROMPT)
    hand = _hand_entropy(cap.patterns)  # [L, H, T]
    ax = visualize.entropy_heatmap(EntropyAnalysis.token_entropy(cap))
    np.testing.assert_allclose(_image(ax), hand.mean(-1).numpy(), atol=1e-6)
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(h) for h in range(tiny.n_heads)]
    # [L, H] is drawn as given (in float32, as every heatmap); NaN positions (padding) are
    # left out of the mean
    grid = hand[..., 2:].mean(-1)
    np.testing.assert_array_equal(_image(visualize.entropy_heatmap(grid)), grid.float().numpy())
    padded = hand.clone()
    padded[..., :2] = float("nan")
    np.testing.assert_allclose(_image(visualize.entropy_heatmap(padded)), grid.numpy(), atol=1e-6)
    with pytest.raises(oculi.InputError, match=r"entropy must be \[L, H\] or \[L, H, T\]"):
        visualize.entropy_heatmap(hand[None])


def test_norm_entropy_scatter_plots_the_pairs_with_their_pearson_r(tiny):
    from scipy import stats

    from oculi.analysis import EntropyAnalysis, NormAnalysis

    cap = tiny.capture(PROMPT)
    norms = NormAnalysis.q_norms(cap)[..., 2:]
    entropy = EntropyAnalysis.token_entropy(cap)[..., 2:]
    hand_x = cap.queries.double().norm(dim=-1)[..., 2:].flatten()
    hand_y = _hand_entropy(cap.patterns)[..., 2:].flatten()
    ax = visualize.norm_entropy_scatter(norms, entropy)
    offsets = np.asarray(ax.collections[0].get_offsets())
    np.testing.assert_allclose(offsets, torch.stack([hand_x, hand_y], 1).numpy(), atol=1e-5)
    r, p = stats.pearsonr(hand_x.numpy(), hand_y.numpy())
    assert f"Pearson r = {r:.3f} (p = {p:.2g}, n = {len(hand_x)})" in ax.get_title()
    # colour = layer of each point
    n_per_layer = len(hand_x) // tiny.n_layers
    np.testing.assert_array_equal(
        ax.collections[0].get_array(), np.repeat(np.arange(tiny.n_layers), n_per_layer)
    )
    # a NaN pair (padding) is neither drawn nor counted
    entropy = entropy.clone()
    entropy[0, 0, 0] = float("nan")
    ax = visualize.norm_entropy_scatter(norms, entropy)
    r, p = stats.pearsonr(hand_x[1:].numpy(), hand_y[1:].numpy())
    assert len(ax.collections[0].get_offsets()) == len(hand_x) - 1
    assert f"Pearson r = {r:.3f} (p = {p:.2g}, n = {len(hand_x) - 1})" in ax.get_title()
    with pytest.raises(oculi.InputError, match=r"must have the same shape"):
        visualize.norm_entropy_scatter(norms, entropy[..., 1:])


def test_intervention_comparison_bars_are_the_softmax_probabilities(tiny):
    from oculi.intervention import HeadAblation, InterventionContext

    before = tiny.forward(PROMPT)
    with InterventionContext(tiny, [HeadAblation(2, h) for h in range(tiny.n_heads)]):
        after = tiny.forward(PROMPT)
    p_before = torch.softmax(before[-1].double(), -1).numpy()
    p_after = torch.softmax(after[-1].double(), -1).numpy()
    assert np.abs(p_before - p_after).max() > 1e-3  # the ablation moved the distribution
    k = 6
    ids = np.argsort(-np.maximum(p_before, p_after), kind="stable")[:k]
    ax = visualize.intervention_comparison(before, after, tiny.tokenizer, k=k)
    heights = [bar.get_height() for bar in ax.patches]
    np.testing.assert_allclose(heights[:k], p_before[ids], atol=1e-6)
    np.testing.assert_allclose(heights[k:], p_after[ids], atol=1e-6)
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == [repr(tiny.tokenizer.decode([int(i)])) for i in ids]
    # another position, and [V] logits
    ax = visualize.intervention_comparison(before[3], after[3], k=2)
    top = np.argsort(
        -np.maximum(*(torch.softmax(x[3].double(), -1).numpy() for x in (before, after)))
    )
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(i) for i in top[:2]]
    with pytest.raises(oculi.InputError, match=rf"k=0, but it must be an int in 1..{tiny.d_vocab}"):
        visualize.intervention_comparison(before, after, k=0)
    with pytest.raises(oculi.InputError, match=r"must have the same shape"):
        visualize.intervention_comparison(before, after[:-1])
    with pytest.raises(oculi.InputError, match=r"position 40 out of range for \d+ positions"):
        visualize.intervention_comparison(before, after, position=40)


def test_circuit_graph_keeps_the_strongest_components_and_edges():
    importance = torch.zeros(3, 2)
    importance[0, 1], importance[1, 0], importance[2, 1], importance[2, 0] = 2.0, -3.0, 5.0, 0.1
    conn = torch.zeros(3, 2, 3, 2)
    conn[0, 1, 2, 1] = 0.9  # L0H1 -> L2H1
    conn[1, 0, 2, 1] = -0.4  # L1H0 -> L2H1
    conn[2, 1, 1, 0] = 7.0  # a later head cannot feed an earlier one: ignored
    graph = visualize.circuit_graph(importance, conn, mlp=torch.tensor([0.0, 4.0, 0.0]), top_k=4)
    assert set(graph.nodes) == {"L2H1", "MLP1", "L1H0", "L0H1", "logits"}
    head_edges = {(a, b): d["weight"] for a, b, d in graph.edges(data=True) if b != "logits"}
    assert head_edges == pytest.approx({("L0H1", "L2H1"): 0.9, ("L1H0", "L2H1"): -0.4})
    pos = visualize.circuit_layout(graph)
    assert {n: pos[n][0] for n in graph.nodes} == {
        "L2H1": 2, "MLP1": 1, "L1H0": 1, "L0H1": 0, "logits": 3
    }  # fmt: skip
    ax = visualize.draw_circuit(graph)
    assert len(ax.collections) >= 1


def test_pca_projection_matches_an_svd_and_is_what_is_drawn():
    gen = torch.Generator().manual_seed(0)
    points = torch.randn(12, 8, generator=gen, dtype=torch.float64)
    coords = visualize.reduce_dimensions(points, "pca", 2)
    centred = points - points.mean(0)
    u, s, _ = torch.linalg.svd(centred, full_matrices=False)
    ref = (u[:, :2] * s[:2]).numpy()
    np.testing.assert_allclose(np.abs(coords), np.abs(ref), atol=1e-9)
    ax = visualize.plot_embeddings(points, [str(i) for i in range(12)], method="pca")
    np.testing.assert_allclose(ax.collections[0].get_offsets(), coords, atol=1e-12)
    ax3 = visualize.plot_embeddings(points, method="pca", dims=3)
    assert ax3.name == "3d"


@pytest.mark.parametrize("method", ["tsne", "umap"])
def test_nonlinear_projections(method):
    if method == "umap":
        pytest.importorskip("umap", reason="umap-learn is optional (oculi[umap])")
    gen = torch.Generator().manual_seed(0)
    # two well-separated clusters stay separated
    points = torch.cat([torch.randn(10, 6, generator=gen), 20 + torch.randn(10, 6, generator=gen)])
    # UMAP's first call compiles it (numba, tens of seconds): one run of it is enough
    threads = torch.get_num_threads()
    for dims in (2, 3) if method == "tsne" else (3,):
        coords = visualize.reduce_dimensions(points, method, dims)
        assert torch.get_num_threads() == threads  # torch's settings left as they were
        assert coords.shape == (20, dims) and np.isfinite(coords).all()
        dist = np.linalg.norm(coords[:, None] - coords[None], axis=-1)
        np.fill_diagonal(dist, np.inf)
        nearest = dist.argmin(1)  # each point's nearest neighbour is in its own cluster
        assert ((nearest < 10) == (np.arange(20) < 10)).all()


def test_seed_002_tsne_call_with_n_iter_is_sklearns_max_iter():
    from sklearn.manifold import TSNE

    from oculi.analyzer import project

    embeddings = np.random.default_rng(0).standard_normal((100, 768))
    reduced = visualize.reduce_dimensions(
        embeddings, method="tsne", n_components=2, perplexity=50, n_iter=2000
    )  # seed 002's call, word for word
    assert reduced.shape == (100, 2) and np.isfinite(reduced).all()
    # scikit-learn itself, with oculi's defaults spelled out (learning rate max(N / 48, 10));
    # 250 iterations end before t-SNE could stop early, so a dropped count would show
    short = visualize.reduce_dimensions(embeddings, method="tsne", perplexity=50, n_iter=250)
    ref = TSNE(n_components=2, perplexity=50, max_iter=250, init="pca", learning_rate=10.0,
               random_state=0).fit_transform(embeddings)  # fmt: skip
    np.testing.assert_allclose(short, ref, atol=1e-6)
    # ModelAnalyzer.project_embeddings's reducer (scikit-learn's defaults, perplexity (N-1)/3)
    proj = project(embeddings[:20], [""] * 20, "tsne", n_iter=250)
    ref = TSNE(n_components=2, perplexity=19 / 3, max_iter=250, random_state=0)
    np.testing.assert_allclose(proj.coords, ref.fit_transform(embeddings[:20]), atol=1e-6)
    with pytest.raises(ValueError, match="pass max_iter or n_iter"):
        visualize.reduce_dimensions(embeddings, method="tsne", n_iter=300, max_iter=300)


def test_layer_embeddings_draws_the_coordinates_it_is_given():
    coords = np.arange(24, dtype=float).reshape(3, 4, 2)  # 3 layers, 4 tokens
    ax = visualize.layer_embeddings(coords, list("abcd"), [0, 4, 8])
    for i in range(3):
        np.testing.assert_array_equal(ax.collections[i].get_offsets(), coords[i])
    np.testing.assert_array_equal(ax.lines[1].get_xydata(), coords[:, 1])
    assert [t.get_text() for t in ax.texts] == [" a", " b", " c", " d"]
    with pytest.raises(ValueError, match=r"coords must be \[n_layers=2, T=4, 2\]"):
        visualize.layer_embeddings(coords, list("abcd"), [0, 4])


def test_projection_bad_inputs():
    with pytest.raises(ValueError, match=r"unknown method 'lda'; choose one of pca, tsne, umap"):
        visualize.reduce_dimensions(np.zeros((5, 3)), "lda")
    with pytest.raises(ValueError, match="needs more than 2 points, got 2"):
        visualize.reduce_dimensions(np.zeros((2, 3)), "pca")


def test_patching_and_tracing_plots_through_the_old_viz_alias(tiny):
    from oculi import viz

    assert viz.heatmap is visualize.heatmap
    res = patching.activation_patching(
        tiny, "the cat sat on the tree", "the dog sat on the tree", site="resid_pre",
        metric=patching.logit_diff("tree", "dog"), progress=False,
    )  # fmt: skip
    np.testing.assert_allclose(_image(res.plot()), res.normalized().double().numpy(), atol=1e-6)
    tr = oculi.causal_tracing(tiny, PROMPT, "cat", "tree", samples=2, progress=False)
    np.testing.assert_allclose(_image(tr.plot()), tr.values.double().numpy(), atol=1e-6)


def _data_v(html: str) -> list[float]:
    import re

    return [float(v) for v in re.findall(r'<td[^>]* data-v="([^"]+)"', html)]


def test_results_render_in_jupyter_with_their_numbers(tiny):
    import json
    import re

    tr = oculi.causal_tracing(tiny, PROMPT, "cat", "tree", samples=2, progress=False)
    assert _data_v(tr._repr_html_()) == tr.values.flatten().double().tolist()
    res = patching.activation_patching(
        tiny, "the cat sat on the tree", "the dog sat on the tree", site="z", per_head=True,
        metric=patching.logit_diff("tree", "dog"), progress=False,
    )  # fmt: skip
    np.testing.assert_allclose(_data_v(res._repr_html_()), res.normalized().flatten(), atol=1e-6)
    lens = oculi.logit_lens(tiny, PROMPT, "tree")
    assert _data_v(lens._repr_html_()) == lens.probs.double().tolist()
    cap = tiny.capture(PROMPT)
    html = cap._repr_html_()
    payload = json.loads(re.search(r'class="oc-data">(.*?)</script>', html).group(1))
    assert [h["key"] for h in payload["heads"]][:5] == ["0.0", "0.1", "0.2", "0.3", "1.0"]
    pattern = cap.patterns[1, 2]
    rows = payload["heads"][6]["pattern"]  # L1 H2, lower triangle rounded to 3 decimals
    for i, row in enumerate(rows):
        np.testing.assert_allclose(row, pattern[i, : i + 1].numpy(), atol=5e-4)
    assert "<script>" in html  # the picker and hover come with the output
    n = cap.patterns.shape[-1]
    small = visualize.views.capture_attention_view(cap, max_values=3 * n * (n + 1) // 2)
    assert "3 of 12 heads shown" in small


def test_attribution_renders_in_jupyter(tiny):
    import re

    from oculi.analysis import AttributionMethods
    from oculi.capture import CaptureConfig

    full = tiny.capture_full(PROMPT, attention=CaptureConfig(capture_head_contributions=True))
    target = int(tiny.forward(PROMPT)[-1].argmax())
    dla = AttributionMethods.direct_logit_attribution(full, target)
    html = dla._repr_html_()
    values = [float(v) for v in re.findall(r'<td data-v="([^"]+)"', html)]  # the two grids
    total = [float(v) for v in re.findall(r'class="oc-sum" data-v="([^"]+)"', html)]
    assert total[-1] == pytest.approx(float(tiny.forward(PROMPT)[-1].max()), abs=1e-4)
    n, h = tiny.n_layers, tiny.n_heads
    expected = torch.cat([torch.stack([dla.attention, dla.mlp], 1).flatten(), dla.heads.flatten()])
    np.testing.assert_allclose(values, expected.double().numpy(), atol=1e-6)
    assert len(values) == 2 * n + n * h


def test_figures_import_matplotlib_lazily_and_name_the_extra():
    import subprocess
    import sys

    code = (
        "import sys; import oculi.visualize as v\n"
        "assert not any(m.split('.')[0] in ('matplotlib', 'sklearn', 'networkx', 'umap') "
        "for m in sys.modules), 'imported eagerly'\n"
        "sys.modules['matplotlib'] = None  # as if the extra were missing\n"
        "try:\n    v.heatmap(__import__('torch').zeros(2, 2))\n"
        "except ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "install it with `pip install 'oculi[viz]'`" in out.stdout


def test_circuit_graph_from_composition_scores_and_dla(tiny):
    from oculi.analysis import AttributionMethods, CompositionAnalysis
    from oculi.capture import CaptureConfig

    full = tiny.capture_full(PROMPT, attention=CaptureConfig(capture_head_contributions=True))
    dla = AttributionMethods.direct_logit_attribution(full, int(tiny.forward(PROMPT)[-1].argmax()))
    scores = CompositionAnalysis.composition_scores(tiny, "k")  # [L, H, L, H]
    graph = visualize.circuit_graph(dla.heads, scores, top_k=6, edges_per_node=2)
    heads = [n for n, d in graph.nodes(data=True) if d["kind"] == "head"]
    ranked = visualize.top_heads(dla.heads, 6)
    assert heads == [name for name, _ in ranked]  # the six heads with the largest |DLA|
    for a, b, data in graph.edges(data=True):
        if b == "logits":
            assert data["weight"] == pytest.approx(graph.nodes[a]["importance"])
            continue
        s, r = graph.nodes[a], graph.nodes[b]
        assert s["layer"] < r["layer"]
        assert data["weight"] == pytest.approx(
            float(scores[s["layer"], s["head"], r["layer"], r["head"]])
        )


def test_convergence_compares_with_the_models_prediction_whatever_layers_are_held():
    # a lens of layers [1, 0] only (not the last, not sorted): "final" is still the model's
    # own next token, the argmax of the HF logits
    from oculi.capture import LogitConfig
    from oculi.visualize.lens import convergence_metrics

    model = tiny_model("llama_gqa")
    adapter = oculi.attach(model, tiny_tokenizer())
    ids = tiny_tokenizer()("the cat sat on the mat", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    top1 = out.logits[0].argmax(-1)
    lc = adapter.capture_logits(ids, config=LogitConfig([1, 0]))
    got = convergence_metrics(lc)
    for row, layer in enumerate((1, 0)):
        lens = model.lm_head(model.model.norm(out.hidden_states[layer + 1][0]))
        torch.testing.assert_close(got["top1_match"][row], lens.argmax(-1) == top1)
        ranks = (lens > lens.gather(-1, top1[:, None])).sum(-1)
        torch.testing.assert_close(got["top1_rank"][row], ranks)
    refinement = visualize.prediction_refinement(lc, top_k=2)
    want = out.logits[0, -1].topk(2).indices.tolist()
    drawn = [line.get_label() for line in refinement.get_lines()]
    assert drawn == [f"p({str(t)!r})" for t in want]
    plt.close("all")
