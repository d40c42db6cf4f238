"""The ``circuit`` experiment against the Hugging Face model's own numbers.

References: each head's and MLP's direct write, read with plain torch hooks on the tiny LLaMA
(the concatenated head outputs entering ``o_proj``, the MLP outputs, the embedding) and pushed
through the final RMSNorm with its per-token scale frozen (``w / rms(x) ⊙ W_U[t]``); they add up
to the model's own logit. Composition scores are explicit float64 products of ``W_OV`` and
``W_QK`` sliced off ``q_proj``/``k_proj``/``v_proj``/``o_proj`` with the attention norm's gain.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import oculi
from models import tiny_model, tiny_tokenizer
from oculi.experiments import ConfigError, run_experiment

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PROMPT, TARGET = "the cat sat on the", "red"


@torch.no_grad()
def reference_writes(model, ids) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """``(writes, scale, logits)`` at the last position, from hooks on the Hugging Face
    modules: ``writes`` maps ``"L1H2"``/``"MLP1"`` to the component's residual write ``[d]``
    and ``"other"`` to the embedding plus the output projections' biases; ``scale [d]`` is the
    final RMSNorm frozen (``w / rms(x)``); ``logits [V]`` the model's own."""
    cfg = model.config
    n_heads, d_head = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    seen: dict = {}

    def keep(name, use_input):
        def hook(module, args, out):
            seen[name] = (args[0] if use_input else out)[0, -1].double()

        return hook

    hooks = [model.model.embed_tokens.register_forward_hook(keep("other", False))]
    hooks.append(model.model.norm.register_forward_hook(keep("final", True)))
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.self_attn.o_proj.register_forward_hook(keep(f"z{i}", True)))
        hooks.append(layer.mlp.register_forward_hook(keep(f"MLP{i}", False)))
    try:
        logits = model(ids[None]).logits[0, -1].double()
    finally:
        for hook in hooks:
            hook.remove()
    norm = model.model.norm
    scale = norm.weight.double() / (seen["final"].pow(2).mean() + norm.variance_epsilon).sqrt()
    writes = {"other": seen["other"]}
    for i, layer in enumerate(model.model.layers):
        o_proj = layer.self_attn.o_proj
        w_o = o_proj.weight.double().reshape(cfg.hidden_size, n_heads, d_head)
        z = seen[f"z{i}"].reshape(n_heads, d_head)
        for h in range(n_heads):
            writes[f"L{i}H{h}"] = w_o[:, h] @ z[h]
        writes[f"MLP{i}"] = seen[f"MLP{i}"]
        if o_proj.bias is not None:
            writes["other"] = writes["other"] + o_proj.bias.double()
    return writes, scale, logits


@torch.no_grad()
def reference_composition(model, source, target) -> dict[str, float]:
    """Q-, K- and V-composition of head ``source`` into ``target`` from the modules' weights."""
    cfg = model.config
    d_head = cfg.hidden_size // cfg.num_attention_heads
    rep = cfg.num_attention_heads // cfg.num_key_value_heads

    def matrices(layer: int, head: int):
        attn = model.model.layers[layer].self_attn
        gain = model.model.layers[layer].input_layernorm.weight.double()[:, None]
        rows = slice(head * d_head, (head + 1) * d_head)
        kv = slice(head // rep * d_head, (head // rep + 1) * d_head)
        w_q = gain * attn.q_proj.weight.double()[rows].T
        w_k = gain * attn.k_proj.weight.double()[kv].T
        w_v = gain * attn.v_proj.weight.double()[kv].T
        w_o = attn.o_proj.weight.double()[:, rows].T
        return w_q @ w_k.T, w_v @ w_o

    _, ov1 = matrices(*source)
    qk2, ov2 = matrices(*target)
    readers = {"q": qk2, "k": qk2.T, "v": ov2}
    return {kind: float((ov1 @ m).norm() / (ov1.norm() * m.norm())) for kind, m in readers.items()}


@pytest.fixture(scope="module", params=["llama_mha", "llama_gqa"])
def tiny(request):
    return oculi.attach(tiny_model(request.param), tiny_tokenizer())


def run(tiny, tmp_path, tag: str = "a", **keys):
    cfg = {"prompt": PROMPT, "target": TARGET, "top_k": 6, "threshold": 0.0, **keys}
    return run_experiment("circuit", cfg, adapter=tiny, out_dir=tmp_path, tag=tag)


def test_components_are_the_models_largest_direct_writes(tiny, tmp_path):
    out = run(tiny, tmp_path, promoted=4).result["result"]
    ids = tiny_tokenizer()(PROMPT, return_tensors="pt")["input_ids"][0]
    target = tiny_tokenizer().convert_tokens_to_ids(TARGET)
    writes, scale, logits = reference_writes(tiny.model, ids)
    w_u = tiny.model.lm_head.weight.detach().double()
    shares = {name: float(w @ (scale * w_u[target])) for name, w in writes.items()}
    # the reference itself adds up to the model's logit
    assert sum(shares.values()) == pytest.approx(float(logits[target]), rel=1e-4, abs=1e-5)
    ranked = sorted((n for n in shares if n != "other"), key=lambda n: -abs(shares[n]))
    comps = out["components"]
    assert [c["name"] for c in comps] == ranked[:6]
    for c in comps:
        assert c["share"] == pytest.approx(shares[c["name"]], rel=1e-4, abs=1e-5)
        assert c["kind"] == ("mlp" if c["head"] is None else "head")
        # the tokens its write promotes most: the top of W_U (scale ⊙ write)
        delta = w_u @ (scale * writes[c["name"]])
        top = delta.topk(4)
        assert [t for _, t, _ in c["promoted"]] == top.indices.tolist()
        assert [d for _, _, d in c["promoted"]] == pytest.approx(top.values.tolist(), rel=1e-4)
        assert [w for w, _, _ in c["promoted"]] == [
            tiny.tokenizer.decode([t]) for t in top.indices.tolist()
        ]
    assert sum(c["share"] for c in comps) + out["rest"] == pytest.approx(
        float(logits[target]), rel=1e-4
    )
    assert out["logit"] == pytest.approx(float(logits[target]), rel=1e-4)
    assert out["target_id"] == target and out["target"] == TARGET
    assert all(c["promoted"] == [] for c in run(tiny, tmp_path, "b", promoted=0).result[
        "result"]["components"])  # fmt: skip


def test_edges_are_the_composition_scores_of_the_chosen_heads(tiny, tmp_path):
    out = run(tiny, tmp_path).result["result"]
    heads = [(c["layer"], c["head"]) for c in out["components"] if c["kind"] == "head"]
    pairs = {
        (f"L{a[0]}H{a[1]}", f"L{b[0]}H{b[1]}"): reference_composition(tiny.model, a, b)
        for a in heads
        for b in heads
        if a[0] < b[0]
    }
    assert pairs, "the tiny run should choose heads of different layers"
    edges = out["edges"]
    assert {(e["source"], e["target"]) for e in edges} == set(pairs)  # threshold 0: all
    for e in edges:
        want = pairs[(e["source"], e["target"])]
        for kind in ("q", "k", "v"):
            assert e[kind] == pytest.approx(want[kind], rel=1e-4)
        assert e["score"] == max(e["q"], e["k"], e["v"]) == e[e["kind"]]
    assert [e["score"] for e in edges] == sorted((e["score"] for e in edges), reverse=True)
    # a threshold (halfway between two scores) keeps exactly the edges scoring above it
    strongest = sorted(max(p.values()) for p in pairs.values())
    assert len(strongest) >= 2
    cut = (strongest[len(strongest) // 2 - 1] + strongest[len(strongest) // 2]) / 2
    kept = run(tiny, tmp_path, "b", threshold=cut).result["result"]["edges"]
    want = {pair for pair, p in pairs.items() if max(p.values()) > cut}
    assert {(e["source"], e["target"]) for e in kept} == want and 0 < len(want) < len(pairs)


def test_run_folder_has_the_circuit_figure_and_reruns_to_the_same_numbers(tiny, tmp_path):
    first = run(tiny, tmp_path, "a", wrong="blue")
    files = sorted(p.name for p in first.folder.iterdir())
    assert files == ["circuit.png", "circuit.svg", "config.yaml", "result.json"]
    assert (first.folder / "circuit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in (first.folder / "circuit.svg").read_bytes()[:500]
    out = first.result["result"]
    assert out["wrong"] == "blue" and out["wrong_id"] == tiny_tokenizer().convert_tokens_to_ids(
        "blue"
    )
    again = run_experiment("circuit", first.folder / "config.yaml", adapter=tiny,
                           out_dir=tmp_path, tag="b")  # fmt: skip
    assert again.result["result"] == out


def test_bad_circuit_configs_name_the_key(tiny, tmp_path):
    with pytest.raises(ConfigError, match=r"top_k: .*greater than or equal to 1"):
        run(tiny, tmp_path, top_k=0)
    with pytest.raises(ConfigError, match=r"threshold: .*less than or equal to 1"):
        run(tiny, tmp_path, threshold=2.0)
    with pytest.raises(ConfigError, match=r"thresold: unknown key"):
        run(tiny, tmp_path, thresold=0.1)


@pytest.mark.gemma
def test_induction_config_on_gemma(gemma, tmp_path):
    config = CONFIGS / "circuit_induction.yaml"
    # parity=False: the runner's parity check is tested elsewhere and costs more than the run
    first = run_experiment(
        "circuit", config, adapter=gemma, out_dir=tmp_path, tag="a", parity=False
    )
    out = first.result["result"]
    logits = gemma.forward(out["prompt"])[-1]
    assert out["target"] == " mat"  # Gemma 3 270M ranks it third, after " bed" and " rug"
    assert out["logit"] == pytest.approx(float(logits[out["target_id"]]), rel=1e-4)
    assert sum(c["share"] for c in out["components"]) + out["rest"] == pytest.approx(
        out["logit"], rel=1e-5
    )
    assert len(out["components"]) == 10
    assert any(c["kind"] == "head" for c in out["components"])
    assert all(len(c["promoted"]) == 10 for c in out["components"])
    assert out["edges"] and all(e["score"] > out["threshold"] == 0.01 for e in out["edges"])
    again = run_experiment(
        "circuit", config, adapter=gemma, out_dir=tmp_path, tag="b", parity=False
    )
    assert again.result["result"] == out
