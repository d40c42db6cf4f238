"""Seed 000's composition calls on a capture, the per-token OV composition, repeated tokens.

The per-token OV composition is checked against a hand computation in plain torch from the
Hugging Face modules' own weights (no :class:`HeadWeights`) and the captured patterns and
values; the capture forms against the adapter forms; induction on Gemma 3 270M against its
known induction heads.
"""

from __future__ import annotations

import gc
import pickle

import pytest
import torch

import oculi
from models import tiny_model, tiny_tokenizer
from oculi import CaptureConfig, InputError
from oculi.analysis import CircuitDetection, CompositionAnalysis, repeated_random_tokens
from oculi.capture.structures import bound_adapter

SOURCE, TARGET = (0, 1), (2, 3)


def hand_ov_weights(model, family: str, layer: int, head: int):
    """``(W_V [d, D], W_O [D, d])`` of one query head read off the HF modules, float64, the
    pre-attention norm's gain (and LayerNorm centring) and Gemma's post-attention gain folded."""
    cfg = model.config
    n_heads = cfg.num_attention_heads
    d = cfg.hidden_size
    d_head = getattr(cfg, "head_dim", None) or d // n_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    kv = head // (n_heads // n_kv)
    if family == "gpt2":
        block = model.transformer.h[layer]
        w_v = block.attn.c_attn.weight.detach().double()[:, 2 * d :][
            :, kv * d_head : (kv + 1) * d_head
        ]
        w_v = block.ln_1.weight.detach().double()[:, None] * w_v
        w_v = w_v - w_v.mean(0, keepdim=True)  # x - mean(x) before the gain
        w_o = block.attn.c_proj.weight.detach().double()[head * d_head : (head + 1) * d_head]
        return w_v, w_o
    block = model.model.layers[layer]
    offset = 1.0 if family.startswith("gemma") else 0.0
    w_v = (
        block.self_attn.v_proj.weight.detach().double()[kv * d_head : (kv + 1) * d_head].T
    )  # [d, D]
    w_v = (offset + block.input_layernorm.weight.detach().double())[:, None] * w_v
    w_o = block.self_attn.o_proj.weight.detach().double()[:, head * d_head : (head + 1) * d_head].T
    if family in ("gemma2", "gemma3"):  # the norm on the attention output, before the residual
        w_o = w_o * (offset + block.post_attention_layernorm.weight.detach().double())
    return w_v, w_o


def hand_per_token(model, family, capture, source, target):
    (l1, h1), (l2, h2) = source, target
    kv1 = h1 // (capture.n_heads // capture.n_kv_heads)
    z = capture.patterns[l1, h1].double() @ capture.values[l1, kv1].double()  # [T, D]
    _, w_o1 = hand_ov_weights(model, family, l1, h1)
    w_v2, w_o2 = hand_ov_weights(model, family, l2, h2)
    ov2 = w_v2 @ w_o2
    t = z.shape[0]
    per_key = torch.zeros(t, dtype=torch.float64)
    for k in range(t):
        o_k = z[k] @ w_o1
        per_key[k] = torch.linalg.norm(o_k @ ov2) / (
            torch.linalg.norm(o_k) * torch.linalg.norm(ov2)
        )
    a2 = capture.patterns[l2, h2].double()
    values = torch.tensor([sum(a2[q, k] * per_key[k] for k in range(t)) for q in range(t)])
    return values, per_key


@pytest.fixture(scope="module")
def llama():
    return oculi.attach(tiny_model("llama_gqa"), tiny_tokenizer())


@pytest.mark.parametrize("family", ["llama_gqa", "gemma3", "gpt2", "qwen2"])
def test_per_token_ov_composition_is_the_hand_computation(family):
    adapter = oculi.attach(tiny_model(family))
    ids = repeated_random_tokens(adapter, 6, seed=1)
    capture = adapter.capture(ids)
    ov = CompositionAnalysis.ov_composition(capture, source=SOURCE, target=TARGET)
    values, per_key = hand_per_token(adapter.model, family, capture, SOURCE, TARGET)
    assert ov.values.shape == (ids.shape[0],)
    torch.testing.assert_close(ov.values, values, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ov.metadata["per_key"], per_key, rtol=1e-5, atol=1e-7)
    assert bool(((ov.values >= 0) & (ov.values <= 1)).all())
    # the weight-level scalar beside it is the adapter form's
    weight_level = CompositionAnalysis.ov_composition(adapter, SOURCE, TARGET)
    assert ov.metadata["v"] == pytest.approx(float(weight_level.values), rel=1e-6)
    # z read from captured head outputs instead of A @ V: the same numbers
    with_z = adapter.capture(ids, CaptureConfig(capture_head_outputs=True, capture_values=False))
    again = CompositionAnalysis.ov_composition(with_z, SOURCE, TARGET)
    torch.testing.assert_close(again.values, ov.values, rtol=1e-5, atol=1e-7)


def test_per_token_ov_composition_in_a_padded_batch(llama):
    a = repeated_random_tokens(llama, 5, seed=2)
    b = repeated_random_tokens(llama, 4, seed=3)
    padded = torch.zeros(2, a.shape[0], dtype=torch.long)
    padded[0], padded[1, 2:] = a, b
    mask = (torch.arange(a.shape[0]) >= torch.tensor([[0], [2]])).long()
    batch = llama.capture(padded, attention_mask=mask)
    ov = CompositionAnalysis.ov_composition(batch, SOURCE, TARGET)
    assert ov.values.shape == (2, a.shape[0]) and bool(ov.values[1, :2].isnan().all())
    alone = CompositionAnalysis.ov_composition(llama.capture(b), SOURCE, TARGET)
    torch.testing.assert_close(ov.values[1, 2:], alone.values, rtol=1e-5, atol=1e-6)


def test_seed_calls_on_a_capture_equal_the_adapter_forms(llama):
    capture = llama.capture(repeated_random_tokens(llama, 12))
    assert bound_adapter(capture) is llama
    qk = CompositionAnalysis.qk_composition(capture, source=SOURCE, target=TARGET)
    ref = CompositionAnalysis.qk_composition(llama, source=SOURCE, target=TARGET)
    torch.testing.assert_close(qk.values, ref.values)
    assert 0 < float(qk.values.mean()) < 1
    matrix = CompositionAnalysis.composition_matrix(capture, method="qk")
    scores = CompositionAnalysis.all_composition_scores(llama)
    n = llama.n_layers * llama.n_heads
    assert matrix.values.shape == (n, n)
    want = torch.maximum(scores["q"], scores["k"]).reshape(n, n)
    torch.testing.assert_close(matrix.values, want)
    circuits = CompositionAnalysis.detect_induction_circuit(capture, threshold=0.05)
    explicit = CompositionAnalysis.detect_induction_circuit(capture, llama, threshold=0.05)
    assert circuits.metadata["circuits"] == explicit.metadata["circuits"]
    positional = CompositionAnalysis.detect_induction_circuit(capture, 0.05)  # seed-like
    assert positional.metadata["circuits"] == explicit.metadata["circuits"]
    full = llama.capture_full(repeated_random_tokens(llama, 12))
    assert bound_adapter(full.attention) is llama
    CompositionAnalysis.qk_composition(full, SOURCE, TARGET)


def test_a_capture_without_its_model_says_to_pass_the_adapter(llama, tmp_path):
    capture = llama.capture(repeated_random_tokens(llama, 8))
    capture.save(tmp_path / "c.safetensors")
    loaded = oculi.load_capture(tmp_path / "c.safetensors")
    copied = pickle.loads(pickle.dumps(capture))
    assert bound_adapter(loaded) is None and bound_adapter(copied) is None
    calls = {
        "qk_composition": lambda c, **kw: CompositionAnalysis.qk_composition(
            c, SOURCE, TARGET, **kw
        ),
        "composition_matrix": lambda c, **kw: CompositionAnalysis.composition_matrix(c, "qk", **kw),
        "detect_induction_circuit": lambda c, **kw: CompositionAnalysis.detect_induction_circuit(
            c, threshold=0.3, **kw
        ),
        "ov_composition": lambda c, **kw: CompositionAnalysis.ov_composition(
            c, SOURCE, TARGET, **kw
        ),
    }
    for name, call in calls.items():
        for c in (loaded, copied):
            with pytest.raises(
                InputError, match=rf"{name}\(capture, \.\.\., adapter=adapter\)"
            ) as err:
                call(c)
            assert "\n" not in str(err.value)
        fixed = call(loaded, adapter=llama)
        ref = call(capture)
        if name == "detect_induction_circuit":
            assert fixed.metadata["circuits"] == ref.metadata["circuits"]
        else:
            torch.testing.assert_close(fixed.values, ref.values)
    # the reference is weak: a capture never keeps its adapter alive
    adapter = oculi.attach(tiny_model("llama_gqa"))
    orphan = adapter.capture(repeated_random_tokens(adapter, 4))
    del adapter
    gc.collect()
    with pytest.raises(InputError, match="adapter=adapter"):
        CompositionAnalysis.qk_composition(orphan, SOURCE, TARGET)


# -- repeated random tokens ----------------------------------------------------------------
def test_repeated_random_tokens(llama):
    ids = repeated_random_tokens(llama, 20, seed=5)
    tok = llama.tokenizer
    assert ids.shape == (41,) and ids.dtype == torch.long and int(ids[0]) == tok.bos_token_id
    first, second = ids[1:21], ids[21:]
    assert torch.equal(first, second) and len(set(first.tolist())) == 20
    assert not set(first.tolist()) & set(tok.all_special_ids)
    assert int(first.max()) < len(tok)
    assert torch.equal(ids, repeated_random_tokens(llama, 20, seed=5))
    assert not torch.equal(ids, repeated_random_tokens(llama, 20, seed=6))
    rows = repeated_random_tokens(llama, 10, seed=5, batch=3)
    assert rows.shape == (3, 21) and not torch.equal(rows[0], rows[1])
    bare = oculi.attach(tiny_model("gpt2"))  # no tokenizer: no BOS, config specials excluded
    plain = repeated_random_tokens(bare, 10)
    assert plain.shape == (20,) and not {0, 1, 2} & set(plain.tolist())
    with pytest.raises(InputError, match="n must be an int >= 2"):
        repeated_random_tokens(llama, 1)
    with pytest.raises(InputError, match=r"n <= 72"):
        repeated_random_tokens(llama, 500)


def test_induction_on_text_without_repeats_names_the_input_to_make(llama):
    capture = llama.capture("the cat sat on a tree")
    with pytest.raises(InputError, match=r"oculi\.analysis\.repeated_random_tokens\(adapter"):
        CircuitDetection.detect_induction_heads(capture)
    with pytest.raises(InputError, match=r"A B \.\.\. A -> B"):
        CompositionAnalysis.detect_induction_circuit(capture, threshold=0.3)


@pytest.mark.gemma
def test_gemma_induction_heads_on_repeated_random_tokens(gemma):
    ids = repeated_random_tokens(gemma, 50)
    assert int(ids[0]) == gemma.tokenizer.bos_token_id and ids.shape == (101,)
    assert not set(ids[1:].tolist()) & set(gemma.tokenizer.all_special_ids)
    capture = gemma.capture(ids)
    scores = CircuitDetection.detect_induction_heads(capture)
    found = {tuple(h) for h in (scores > 0.5).nonzero().tolist()}
    # Gemma 3 270M's induction heads (seed 0): 5.1 (0.88), 11.2 (0.69), 5.2 (0.54)
    assert {(5, 1), (11, 2)} <= found
    assert float(scores[5, 1]) > 0.8
    circuits = CompositionAnalysis.detect_induction_circuit(capture, threshold=0.3)
    assert circuits.metadata["circuits"]
    assert all(
        c["induction_head"] in {(5, 1), (5, 2), (11, 2), (13, 3)}
        for c in circuits.metadata["circuits"]
    )
    with pytest.raises(InputError, match=r"repeated_random_tokens\(adapter, n=50\)"):
        CircuitDetection.detect_induction_heads(
            gemma.capture("The quick brown fox jumps over the lazy dog")
        )
