"""Circuit discovery: exact edge patching against plain-torch references, and the scores.

References are independent of oculi's edge forward: the Hugging Face model's own logits,
plain forward hooks that record each sender's output and rebuild a receiver's input by hand
(with the weights, not the modules' forwards, where a head's slice is involved), and identities
(no edge = the clean run, every edge = the corrupt run, every edge into one receiver = that
receiver reading the corrupt run's input).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import oculi
from models import FAMILIES, oculi_hooks, tiny_model, tiny_tokenizer
from oculi.discovery import (
    EdgePatcher,
    Graph,
    acdc,
    atp_star,
    eap,
    eap_ig,
    integrated_gradients,
    patch_edges,
)
from oculi.errors import InputError
from oculi.patching.metrics import logit_diff

CLEAN = "the cat sat on the red"
CORRUPT = "the dog ran in the blue"
METRIC = logit_diff("house", "tree")


def _adapter(family: str) -> oculi.Adapter:
    return oculi.attach(tiny_model(family), tiny_tokenizer())


def _hf_metric(model, adapter, prompts) -> torch.Tensor:
    ids = adapter.prepare(prompts).input_ids
    with torch.no_grad():
        logits = model(ids).logits[:, -1].double()
    a, b = adapter.to_single_token("house"), adapter.to_single_token("tree")
    return logits[:, a] - logits[:, b]


def _record(model, ids, modules: dict) -> dict:
    """Each module's output (and ``name + ':in'`` its first input) in a plain forward."""
    seen: dict = {}

    def keep(name):
        def hook(_m, args, out):
            seen[name] = (out[0] if isinstance(out, tuple) else out).detach().clone()
            seen[name + ":in"] = args[0].detach().clone() if args else None

        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("level", ["components", "heads", "qkv"])
def test_no_edge_is_clean_and_every_edge_is_corrupt(family, level):
    adapter = _adapter(family)
    graph = Graph.from_adapter(adapter, level)
    ref = _hf_metric(adapter.model, adapter, [CLEAN, CORRUPT])
    e = len(graph.edges)
    values = patch_edges(
        adapter, graph, CLEAN, CORRUPT, torch.stack([torch.zeros(e), torch.ones(e)]), METRIC
    )
    assert values[0] == pytest.approx(float(ref[0]), abs=1e-4)
    assert values[1] == pytest.approx(float(ref[1]), abs=1e-4)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_edge_into_a_receiver_is_its_input_patched(family):
    """All edges into m1 (or the logits) = the MLP's (final norm's) input from the corrupt run."""
    adapter = _adapter(family)
    model, anat = adapter.model, adapter.anatomy
    graph = Graph.from_adapter(adapter, "heads")
    mlp_in = adapter.part(1, anat.mlp_norm or anat.mlp)
    final = adapter.module(anat.final_norm)
    ids = adapter.prepare([CLEAN, CORRUPT]).input_ids
    seen = _record(model, ids[1:], {"mlp": mlp_in, "final": final})
    for name, module in (("mlp", mlp_in), ("final", final)):
        corrupt_input = seen[name + ":in"]

        def swap(_m, args, kwargs, x=corrupt_input):
            if args:
                return (x, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": x}

        handle = module.register_forward_pre_hook(swap, with_kwargs=True)
        try:
            ref = float(_hf_metric(model, adapter, [CLEAN])[0])
        finally:
            handle.remove()
        receiver = "m1" if name == "mlp" else "logits"
        edges = [e.name for e in graph.edges if e.receiver.name == receiver]
        got = patch_edges(adapter, graph, CLEAN, CORRUPT, edges, METRIC)
        assert got == pytest.approx(ref, abs=1e-4), receiver


def _head_rows(h: int, d: int) -> slice:
    return slice(h * d, (h + 1) * d)


def test_edges_match_hand_hooks_llama():
    """a0.h1 -> m1, m0 -> a2.h3 (its q, k and v), input -> logits, a1.h0 -> logits, rebuilt
    by hand from recorded sender outputs and the projection weights."""
    adapter = _adapter("llama_mha")
    model, d = adapter.model, adapter.d_head
    layers = model.model.layers
    ids = adapter.prepare([CLEAN, CORRUPT]).input_ids
    mods = {
        "emb": layers[0],
        "o0": layers[0].self_attn.o_proj,
        "o1": layers[1].self_attn.o_proj,
        "m0": layers[0].mlp,
    }
    src = _record(model, ids[1:], mods)
    live: dict = {}

    def head_write(layer, head, z):  # the head's z through W_O, without the bias
        w = layers[layer].self_attn.o_proj.weight[:, _head_rows(head, d)]
        return z[..., _head_rows(head, d)] @ w.T

    hooks = [
        layers[0].register_forward_pre_hook(lambda _m, a: live.__setitem__("emb", a[0])),
        layers[0].self_attn.o_proj.register_forward_pre_hook(
            lambda _m, a: live.__setitem__("z0", a[0])
        ),
        layers[1].self_attn.o_proj.register_forward_pre_hook(
            lambda _m, a: live.__setitem__("z1", a[0])
        ),
        layers[0].mlp.register_forward_hook(lambda _m, a, o: live.__setitem__("m0", o)),
    ]

    def m1_input(_m, args, kwargs):  # a0.h1 -> m1
        x = args[0] + head_write(0, 1, src["o0:in"]) - head_write(0, 1, live["z0"])
        return (x, *args[1:]), kwargs

    def a2_input(_m, args, kwargs):  # stash layer 2's residual for head 3's projections
        live["resid2"] = args[0] if args else kwargs["hidden_states"]

    def head3(which):
        proj = getattr(layers[2].self_attn, f"{which}_proj")

        def hook(_m, _a, out):
            x = live["resid2"] + src["m0"] - live["m0"]
            norm = layers[2].input_layernorm  # RMSNorm by hand (calling it would rerun a2_input)
            normed = (
                norm.weight
                * x
                * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
            )
            rows = _head_rows(3, d)
            out = out.clone()
            out[..., rows] = F.linear(normed, proj.weight[rows], proj.bias[rows])
            return out

        return hook

    def final_input(_m, args, kwargs):  # input -> logits, a1.h0 -> logits
        x = args[0] + (src["emb:in"] - live["emb"])
        x = x + head_write(1, 0, src["o1:in"]) - head_write(1, 0, live["z1"])
        return (x, *args[1:]), kwargs

    hooks += [
        layers[1].post_attention_layernorm.register_forward_pre_hook(m1_input, with_kwargs=True),
        layers[2].input_layernorm.register_forward_pre_hook(a2_input, with_kwargs=True),
        model.model.norm.register_forward_pre_hook(final_input, with_kwargs=True),
    ]
    hooks += [
        getattr(layers[2].self_attn, f"{w}_proj").register_forward_hook(head3(w)) for w in "qkv"
    ]
    try:
        ref = float(_hf_metric(model, adapter, [CLEAN])[0])
    finally:
        for h in hooks:
            h.remove()
    graph = Graph.from_adapter(adapter, "heads")
    edges = ["a0.h1->m1", "m0->a2.h3", "input->logits", "a1.h0->logits"]
    got = patch_edges(adapter, graph, CLEAN, CORRUPT, edges, METRIC)
    clean = float(_hf_metric(model, adapter, [CLEAN])[0])
    assert abs(ref - clean) > 1e-2  # the edges matter, so the comparison can fail
    assert got == pytest.approx(ref, abs=1e-4)


def test_head_edge_through_post_norm_gemma3():
    """Gemma 3 normalises the attention branch after the heads: a0.h1 -> logits changes the
    branch output by norm(o_proj(z with head 1 corrupt)) − norm(o_proj(z))."""
    adapter = _adapter("gemma3")
    model = adapter.model
    layer0 = model.model.layers[0]
    d = adapter.d_head
    ids = adapter.prepare([CLEAN, CORRUPT]).input_ids
    src = _record(model, ids[1:], {"o": layer0.self_attn.o_proj})
    live: dict = {}
    h1 = layer0.self_attn.o_proj.register_forward_pre_hook(
        lambda _m, a: live.__setitem__("z", a[0])
    )

    def final_input(_m, args, kwargs):
        z = live["z"]
        mixed = z.clone()
        mixed[..., _head_rows(1, d)] = src["o:in"][..., _head_rows(1, d)]
        post = layer0.post_attention_layernorm
        w_o = layer0.self_attn.o_proj.weight
        delta = post(mixed @ w_o.T) - post(z @ w_o.T)
        return (args[0] + delta, *args[1:]), kwargs

    h2 = model.model.norm.register_forward_pre_hook(final_input, with_kwargs=True)
    try:
        ref = float(_hf_metric(model, adapter, [CLEAN])[0])
    finally:
        h1.remove()
        h2.remove()
    graph = Graph.from_adapter(adapter, "heads")
    got = patch_edges(adapter, graph, CLEAN, CORRUPT, ["a0.h1->logits"], METRIC)
    assert abs(ref - float(_hf_metric(model, adapter, [CLEAN])[0])) > 1e-3
    assert got == pytest.approx(ref, abs=1e-4)


def test_fused_qkv_receiver_gpt2():
    """GPT-2's fused c_attn: m0 -> a2.h3.k replaces only head 3's key columns."""
    adapter = _adapter("gpt2")
    model, d, h = adapter.model, adapter.d_head, adapter.n_heads
    blocks = model.transformer.h
    ids = adapter.prepare([CLEAN, CORRUPT]).input_ids
    src = _record(model, ids[1:], {"m0": blocks[0].mlp})
    live: dict = {}
    hooks = [
        blocks[0].mlp.register_forward_hook(lambda _m, a, o: live.__setitem__("m0", o)),
        blocks[2].ln_1.register_forward_pre_hook(lambda _m, a: live.__setitem__("r", a[0])),
    ]

    def c_attn(_m, args, out):
        ln = blocks[2].ln_1  # by hand: calling ln_1 would rerun the stash hook
        x = F.layer_norm(
            live["r"] + src["m0"] - live["m0"], ln.normalized_shape, ln.weight, ln.bias, ln.eps
        )
        cols = slice(h * d + 3 * d, h * d + 4 * d)  # [q | k | v], head 3 of k
        w, b = blocks[2].attn.c_attn.weight, blocks[2].attn.c_attn.bias
        out = out.clone()
        out[..., cols] = x @ w[:, cols] + b[cols]
        return out

    hooks.append(blocks[2].attn.c_attn.register_forward_hook(c_attn))
    try:
        ref = float(_hf_metric(model, adapter, [CLEAN])[0])
    finally:
        for hk in hooks:
            hk.remove()
    graph = Graph.from_adapter(adapter, "qkv")
    got = patch_edges(adapter, graph, CLEAN, CORRUPT, ["m0->a2.h3.k"], METRIC)
    assert abs(ref - float(_hf_metric(model, adapter, [CLEAN])[0])) > 1e-4
    assert got == pytest.approx(ref, abs=1e-5)


def test_batched_edge_sets_equal_one_at_a_time():
    adapter = _adapter("qwen3")
    graph = Graph.from_adapter(adapter, "qkv")
    gen = torch.Generator().manual_seed(0)
    masks = (torch.rand(7, len(graph.edges), generator=gen) < 0.3).float()
    together = patch_edges(adapter, graph, CLEAN, CORRUPT, masks, METRIC, batch_size=4)
    alone = torch.stack(
        [patch_edges(adapter, graph, CLEAN, CORRUPT, m[None], METRIC)[0] for m in masks]
    )
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


def test_graph_shapes_and_parallel_attention():
    neox = Graph.from_adapter(_adapter("neox_parallel"), "components")
    names = {e.name for e in neox.edges}
    assert "a0->m1" in names and "a0->m0" not in names  # the MLP reads the layer input
    seq = Graph.from_adapter(_adapter("neox_sequential"), "components")
    assert "a0->m0" in {e.name for e in seq.edges}
    gqa = Graph.from_adapter(_adapter("llama_gqa"), "heads")
    receivers = {r.name for r in gqa.receivers}
    assert {"a1.h0", "a1.kv0", "a1.kv1"} <= receivers
    # edges: every earlier sender into every later receiver
    n, h = 3, 4
    senders_before = lambda layer, mlp: 1 + layer * (h + 1) + (h if mlp else 0)  # noqa: E731
    expected = sum(
        senders_before(layer, False) * (h + 2) + senders_before(layer, True) for layer in range(n)
    )
    expected += 1 + n * (h + 1)  # into the logits
    assert len(gqa.edges) == expected


def test_bad_inputs():
    adapter = _adapter("llama_mha")
    graph = Graph.from_adapter(adapter, "heads")
    with pytest.raises(InputError, match="unknown edge 'a9.h0->m1'"):
        patch_edges(adapter, graph, CLEAN, CORRUPT, ["a9.h0->m1"], METRIC)
    with pytest.raises(InputError, match="same token length"):
        patch_edges(adapter, graph, CLEAN, "the dog ran", ["m0->logits"], METRIC)
    with pytest.raises(InputError, match="level must be one of"):
        Graph.from_adapter(adapter, "neurons")
    with pytest.raises(InputError, match=r"\[n_sets, 118\]"):
        patch_edges(adapter, graph, CLEAN, CORRUPT, torch.zeros(2, 5), METRIC)
    with pytest.raises(InputError, match="mode must be"):
        patch_edges(adapter, graph, CLEAN, CORRUPT, ["m0->logits"], METRIC, mode="noise")


def test_hooks_removed_after_an_error():
    adapter = _adapter("llama_mha")
    graph = Graph.from_adapter(adapter, "heads")

    def count():
        return len(oculi_hooks(adapter.model))

    before = count()
    with pytest.raises(IndexError):
        patch_edges(
            adapter, graph, CLEAN, CORRUPT, ["m0->logits"], logit_diff("house", "tree", position=40)
        )
    assert count() == before
    patch_edges(adapter, graph, CLEAN, CORRUPT, torch.ones(1, len(graph.edges)), METRIC)
    assert count() == before


def test_mean_and_zero_sources():
    """mode='zero' on every edge into the logits = the final norm reading zeros; 'mean' over
    two corrupt prompts = their mean input."""
    adapter = _adapter("llama_mha")
    model = adapter.model
    graph = Graph.from_adapter(adapter, "components")
    edges = [e.name for e in graph.edges if e.receiver.name == "logits"]
    prompts = [CLEAN, CLEAN]
    corrupts = [CORRUPT, "the man went at the green"]
    ids = adapter.prepare(corrupts).input_ids
    seen = _record(model, ids, {"final": model.model.norm})
    for mode, x in (
        ("zero", torch.zeros_like(seen["final:in"][:1])),
        ("mean", seen["final:in"].mean(0, keepdim=True)),
    ):
        handle = model.model.norm.register_forward_pre_hook(lambda _m, a, x=x: (x.expand_as(a[0]),))
        try:
            ref = float(_hf_metric(model, adapter, [CLEAN])[0])
        finally:
            handle.remove()
        got = patch_edges(adapter, graph, prompts, corrupts, edges, METRIC, mode=mode)
        assert got == pytest.approx(ref, abs=1e-4), mode


def _double(family: str) -> oculi.Adapter:
    model = copy.deepcopy(tiny_model(family)).double()
    return oculi.attach(model, tiny_tokenizer())


# -- scores ---------------------------------------------------------------------------------

NO_POST_NORM = [f for f in FAMILIES if f not in ("gemma2", "gemma3", "olmo2")]


@pytest.mark.parametrize("family", NO_POST_NORM)
def test_eap_is_the_derivative_of_edge_patching(family):
    """EAP's score is d/dw metric(edge weight w) at w = 0: checked by a central difference on
    a float64 model on every level's edges (a sample of 40; metrics read logits in float32,
    hence the step and tolerance)."""
    adapter = _double(family)
    for level in ("components", "heads", "qkv"):
        graph = Graph.from_adapter(adapter, level)
        scores = eap(adapter, graph, CLEAN, CORRUPT, metric=METRIC)
        idx = torch.randperm(len(graph.edges), generator=torch.Generator().manual_seed(1))[:40]
        eps = 1e-3
        w = torch.zeros(2 * len(idx), len(graph.edges), dtype=torch.float64)
        w[torch.arange(len(idx)), idx] = eps
        w[len(idx) + torch.arange(len(idx)), idx] = -eps
        values = scores.patcher.run(w)
        numeric = (values[: len(idx)] - values[len(idx) :]) / (2 * eps)
        torch.testing.assert_close(
            scores.values[idx].double(), numeric.double(), atol=1e-3, rtol=1e-3
        )


def _linear_gpt2() -> oculi.Adapter:
    """GPT-2 whose last block's MLP is linear (identity activation, no ln_2) and whose final
    norm is the identity: the metric is then linear in the inputs of m2 and the logits."""
    model = copy.deepcopy(tiny_model("gpt2")).double()
    last = model.transformer.h[-1]
    last.ln_2 = torch.nn.Identity()
    last.mlp.act = torch.nn.Identity()
    model.transformer.ln_f = torch.nn.Identity()
    return oculi.attach(model, tiny_tokenizer())


def test_eap_equals_exact_patching_where_the_model_is_linear():
    adapter = _linear_gpt2()
    graph = Graph.from_adapter(adapter, "heads")
    scores = eap(adapter, graph, CLEAN, CORRUPT, metric=METRIC)
    exact = scores.exact()
    linear = [i for i, e in enumerate(graph.edges) if e.receiver.name in ("m2", "logits")]
    # float64 model; the metric reads the logits in float32
    torch.testing.assert_close(
        scores.values[linear].double(), exact[linear].double(), atol=1e-6, rtol=1e-5
    )
    others = [i for i in range(len(graph.edges)) if i not in linear]
    assert (scores.values[others].double() - exact[others].double()).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama_gqa", "gpt2", "gemma3"])
def test_eap_ig_completeness_gap_shrinks_with_steps(family):
    adapter = _double(family)
    graph = Graph.from_adapter(adapter, "components")
    gaps = []
    for steps in (4, 16, 64):
        ig = eap_ig(
            adapter, graph, CLEAN, CORRUPT, metric=METRIC, steps=steps, variant="activations"
        )
        c = ig.info["completeness"]
        assert c["target"] == pytest.approx(ig.corrupt_value - ig.clean_value)
        gaps.append(abs(c["gap"]))
    # the midpoint rule's error falls as 1/steps²: 16x per 4x steps
    assert gaps[1] < gaps[0] / 8 and gaps[2] < gaps[1] / 8, gaps
    assert gaps[2] < 1e-3 * abs(ig.info["completeness"]["target"])
    inputs = eap_ig(adapter, graph, CLEAN, CORRUPT, metric=METRIC, steps=16, variant="inputs")
    assert abs(inputs.info["completeness"]["gap"]) < 5e-3 * abs(
        inputs.info["completeness"]["target"]
    )


def test_eap_ig_equals_exact_where_the_model_is_linear():
    """Where the metric is linear in a receiver's input (m2 and the logits of the linear toy),
    every point of the path has the same gradient there, so EAP-IG equals exact patching."""
    adapter = _linear_gpt2()
    graph = Graph.from_adapter(adapter, "heads")
    ig = eap_ig(adapter, graph, CLEAN, CORRUPT, metric=METRIC, steps=3, variant="inputs")
    exact = ig.exact()
    linear = [i for i, e in enumerate(graph.edges) if e.receiver.name in ("m2", "logits")]
    torch.testing.assert_close(
        ig.values[linear].double(), exact[linear].double(), atol=1e-6, rtol=1e-5
    )


def test_circuit_selection_and_faithfulness():
    adapter = _adapter("llama_gqa")
    graph = Graph.from_adapter(adapter, "heads")
    scores = eap(adapter, graph, CLEAN, CORRUPT, metric=METRIC)
    everything = scores.circuit(top_n=len(graph.edges), prune=False)
    assert everything.faithfulness == pytest.approx(1.0, abs=1e-5)
    assert everything.value == pytest.approx(scores.clean_value, abs=1e-5)
    nothing = scores.circuit(top_n=0)
    assert nothing.faithfulness == pytest.approx(0.0, abs=1e-5) and nothing.n_edges == 0
    found = scores.circuit(recover=0.8)
    assert found.faithfulness >= 0.8
    assert 0 < found.n_edges < len(graph.edges)
    # the circuit's value is exact edge patching of everything outside it
    outside = [i for i in range(len(graph.edges)) if i not in set(found.edges)]
    direct = patch_edges(adapter, graph, CLEAN, CORRUPT, outside, METRIC)
    assert found.value == pytest.approx(direct, abs=1e-5)
    # pruning leaves only edges on a path from the input to the logits
    import networkx as nx

    g = found.to_networkx()
    for name in found.names:
        sender, receiver = name.split("->")
        node = graph.edges[graph.index(name)[0]].receiver.node
        assert sender == "input" or nx.has_path(g, "input", sender)
        assert node == "logits" or nx.has_path(g, node, "logits")
    curve = scores.faithfulness_curve([5, 20, 80])
    for n, c in zip([5, 20, 80], curve):
        assert c.faithfulness == pytest.approx(scores.circuit(top_n=n).faithfulness, abs=1e-6)
    with pytest.raises(InputError, match="exactly one of"):
        scores.circuit(top_n=3, recover=0.5)


@pytest.mark.parametrize("level", ["components", "heads"])
@pytest.mark.parametrize("family", ["llama_gqa", "gemma3", "neox_parallel"])
def test_acdc_batched_equals_one_edge_per_forward(family, level):
    adapter = _adapter(family)
    graph = Graph.from_adapter(adapter, level)
    fast = acdc(adapter, graph, CLEAN, CORRUPT, threshold=0.02, progress=False)
    slow = acdc(adapter, graph, CLEAN, CORRUPT, threshold=0.02, speculate=False, progress=False)
    assert fast.info["kept"] == slow.info["kept"]
    assert slow.info["forwards"] == len(graph.edges) + 1
    # every batched forward decides at least one edge, and dead receivers need none
    assert fast.info["forwards"] <= slow.info["forwards"]
    kept = fast.circuit(prune=False)
    assert kept.edges == fast.info["kept"]


def test_acdc_finds_a_planted_circuit():
    """A Llama whose heads write nothing (o_proj zero) and whose later MLPs write nothing
    (down_proj zero): only input -> m0, input -> logits and m0 -> logits carry the task."""
    model = copy.deepcopy(tiny_model("llama_gqa"))
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.o_proj.weight.zero_()
            if i > 0:
                layer.mlp.down_proj.weight.zero_()
    adapter = oculi.attach(model, tiny_tokenizer())
    graph = Graph.from_adapter(adapter, "components")
    found = acdc(adapter, graph, CLEAN, CORRUPT, threshold=1e-4, progress=False)
    names = sorted(graph.edges[i].name for i in found.info["kept"])
    assert names == ["input->logits", "input->m0", "m0->logits"]
    assert found.circuit().faithfulness == pytest.approx(1.0, abs=1e-4)


# -- AtP* and integrated gradients ---------------------------------------------------------


def test_atp_mlp_nodes_are_the_sum_of_their_eap_edges():
    """∂metric/∂out(m) is the sum of the gradients at every later receiver's input, so plain
    AtP of an MLP equals the sum of EAP over the edges out of it."""
    for family in ("llama_gqa", "gemma3", "neox_parallel"):
        adapter = _adapter(family)
        graph = Graph.from_adapter(adapter, "qkv")
        plain = atp_star(
            adapter, graph, CLEAN, CORRUPT, metric=METRIC, qk_fix=False, grad_drop=False
        )
        edges = eap(adapter, graph, CLEAN, CORRUPT, metric=METRIC)
        for layer in range(adapter.n_layers):
            out = [i for i, e in enumerate(graph.edges) if e.sender.name == f"m{layer}"]
            assert plain.nodes[f"m{layer}"] == pytest.approx(
                float(edges.values[out].sum()), abs=1e-4
            )


def test_qk_fix_is_exact_where_the_metric_is_linear_in_the_pattern():
    """In the linear GPT-2 toy the metric is linear in the last layer's pattern and values, so
    the QK-fixed score of its q, k and v nodes is exact node patching; plain AtP is not."""
    adapter = _linear_gpt2()
    graph = Graph.from_adapter(adapter, "qkv")
    fixed = atp_star(adapter, graph, CLEAN, CORRUPT, metric=METRIC, grad_drop=False)
    plain = atp_star(adapter, graph, CLEAN, CORRUPT, metric=METRIC, qk_fix=False, grad_drop=False)
    last = [n for n in fixed.nodes if n.startswith("a2.")]
    exact = fixed.exact_nodes(last)
    for name in last:
        assert fixed.nodes[name] == pytest.approx(exact[name], abs=1e-6), name
    qk = [n for n in last if n.endswith((".q", ".k"))]
    assert max(abs(plain.nodes[n] - exact[n]) for n in qk) > 1e-3


def test_grad_drop_leaves_last_layer_nodes_at_their_magnitude():
    """Dropping an earlier layer cuts no path from the last layer to the logits, and dropping
    the last cuts them all: its nodes' GradDrop score is |c| · (L − 1) / (L − 1) = |c|."""
    adapter = _adapter("llama_gqa")
    graph = Graph.from_adapter(adapter, "qkv")
    star = atp_star(adapter, graph, CLEAN, CORRUPT, metric=METRIC)
    fixed = atp_star(adapter, graph, CLEAN, CORRUPT, metric=METRIC, grad_drop=False)
    for name, value in fixed.nodes.items():
        if name.startswith(("a2.", "m2")):
            assert star.nodes[name] == pytest.approx(abs(value), rel=1e-5, abs=1e-7), name
    assert all(v >= 0 for v in star.nodes.values())
    circuit = star.circuit(top_n=6)
    assert 0 < circuit.n_edges < len(graph.edges)
    with pytest.raises(InputError, match="level='qkv'"):
        atp_star(adapter, Graph.from_adapter(adapter, "heads"), CLEAN, CORRUPT, metric=METRIC)


def test_integrated_gradients_match_a_hand_riemann_sum():
    """Llama's first layer reads the embedding itself, so HF's inputs_embeds path is an
    independent reference: the midpoint rule over a zero baseline, by plain autograd."""
    adapter = _adapter("llama_gqa")
    model = adapter.model
    ids = adapter.prepare(CLEAN).input_ids
    x = model.model.embed_tokens(ids)[0].detach()
    a, b = adapter.to_single_token("house"), adapter.to_single_token("tree")
    steps = 8
    total = torch.zeros_like(x)
    for k in range(steps):
        point = ((k + 0.5) / steps * x).requires_grad_(True)
        logits = model(inputs_embeds=point[None]).logits[0, -1]
        (grad,) = torch.autograd.grad(logits[a] - logits[b], [point])
        total += grad
    expected = (x * total / steps).sum(-1)
    ig = integrated_gradients(adapter, CLEAN, metric=METRIC, steps=steps)
    torch.testing.assert_close(ig.values, expected, atol=1e-5, rtol=1e-4)
    assert ig.tokens[0] == "<bos>" and len(ig.values) == ids.shape[1]


@pytest.mark.parametrize("layer", [0, 1])
def test_integrated_gradients_completeness(layer):
    adapter = _adapter("gemma3")
    gaps = []
    for steps in (8, 32, 128):
        ig = integrated_gradients(
            adapter, CLEAN, metric=METRIC, baseline=CORRUPT, layer=layer, steps=steps
        )
        ref = _hf_metric(adapter.model, adapter, [CLEAN, CORRUPT])
        assert ig.completeness["target"] == pytest.approx(float(ref[0] - ref[1]), abs=1e-4)
        gaps.append(abs(ig.completeness["gap"]))
    assert gaps[2] < gaps[0] and gaps[2] < 1e-3 * abs(ig.completeness["target"])
    with pytest.raises(InputError, match="steps"):
        integrated_gradients(adapter, CLEAN, metric=METRIC, steps=0)


@pytest.mark.parametrize("family", ["llama_gqa", "gemma3", "gpt2", "neox_parallel", "olmo2"])
def test_resuming_from_a_layer_equals_the_full_forward(family):
    """Edge sets that patch nothing before layer k give the same metric when the forward
    resumes at k from the recorded clean run (what ACDC does)."""
    adapter = _adapter(family)
    graph = Graph.from_adapter(adapter, "heads")
    patcher = EdgePatcher(adapter, graph, CLEAN, CORRUPT, metric=METRIC)
    gen = torch.Generator().manual_seed(2)
    for start in (1, 2, 3):
        late = torch.tensor([e.receiver.layer >= start for e in graph.edges])
        masks = (torch.rand(4, len(graph.edges), generator=gen) < 0.4).float() * late
        torch.testing.assert_close(
            patcher.run(masks, start_layer=start), patcher.run(masks), atol=1e-5, rtol=0
        )
    with pytest.raises(InputError, match="start_layer=2"):
        patcher.run(torch.ones(1, len(graph.edges)), start_layer=2)


@pytest.mark.parametrize("family", ["llama_gqa", "gemma3", "gpt2", "neox_parallel", "olmo2"])
@pytest.mark.parametrize("level", ["heads", "qkv"])
def test_resumed_forwards_skip_the_shared_prefix(family, level):
    """Prompts that differ only from their fourth token on: the resumed forwards run the
    positions from there only, and give the full forward's metric for any edge set."""
    adapter = _adapter(family)
    graph = Graph.from_adapter(adapter, level)
    clean, corrupt = "the cat sat on the red", "the cat sat in the blue"
    patcher = EdgePatcher(adapter, graph, clean, corrupt, metric=METRIC)
    ids = [adapter.prepare(p).input_ids[0] for p in (clean, corrupt)]
    assert patcher.first_change == int((ids[0] != ids[1]).nonzero()[0, 0]) > 0
    gen = torch.Generator().manual_seed(3)
    for start in (0, 2):
        late = torch.tensor([e.receiver.layer >= start for e in graph.edges])
        masks = (torch.rand(4, len(graph.edges), generator=gen) < 0.4).float() * late
        masks[0] = late.float()  # every edge it may patch
        torch.testing.assert_close(
            patcher.run(masks, start_layer=start), patcher.run(masks), atol=1e-5, rtol=0
        )
    zero = EdgePatcher(adapter, graph, clean, corrupt, metric=METRIC, mode="zero")
    assert zero.first_change == 0  # zero differs from the clean outputs everywhere
