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
from models import FAMILIES, tiny_model, tiny_tokenizer
from oculi.discovery import Graph, patch_edges
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
        return sum(
            len(m._forward_hooks) + len(m._forward_pre_hooks) for m in adapter.model.modules()
        )

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
