"""Integration tests on the real Gemma 3 270M (``-m gemma``).

* Seed 001 (``001_ff73bb892e5383c6.txt``), chapters 1-5: its hands-on examples, run as
  written against oculi's API; where the seed is wrong for this model (a Llama checkpoint,
  layer indices past Gemma 3 270M's 18) or names something oculi spells differently, the
  adaptation carries a comment saying why. Its Appendix A shapes for Gemma 3 270M:
  18 layers, 4 heads, 1 KV head, head_dim 256, d_model 640, d_mlp 2048, vocab 262144.
* Issue #4 (the real-model part): IOI activation patching (residual stream by position,
  attention heads by ``z``) and ROME causal tracing of "The Eiffel Tower ... of" -> " Paris".

References are never oculi: the model's own ``output_hidden_states``, ``output_attentions``
(eager attention) and logits, plus plain PyTorch hooks written here on the Hugging Face
modules. Measured numbers (IOI logit differences, tracing probabilities) are pinned with
tolerances around what the model gives.
"""

from __future__ import annotations

import pytest
import torch

import oculi
from oculi.errors import LayerIndexError, UnsupportedArchitectureError

pytestmark = pytest.mark.gemma

# Gemma 3 270M (seed 001, Appendix A)
N_LAYERS, N_HEADS, N_KV_HEADS, D_HEAD, D_MODEL, D_MLP, D_VOCAB = 18, 4, 1, 256, 640, 2048, 262144

SEED_TEXT = "The capital of France is"  # seed 001, chapter 1
FACT, SUBJECT, ANSWER = "The Eiffel Tower is located in the city of", "The Eiffel Tower", " Paris"
IOI_CLEAN = "When Mary and John went to the store, John gave a drink to"
IOI_CORRUPT = "When Mary and John went to the store, Mary gave a drink to"

TOL = dict(atol=1e-4, rtol=1e-4)  # oculi vs the model's own fp32 tensors


# -- independent reference: the Hugging Face model itself -------------------------------
class Reference:
    """The Hugging Face model's own forward, with tensors read by plain hooks.

    One forward with the model's attention implementation (hidden states, logits, hooks) and
    one with eager attention for ``output_attentions``.

    Attributes:
        ids: ``[1, T]`` token ids.
        logits: ``[T, V]``.
        hidden: ``L + 1`` of ``[T, d]`` (``output_hidden_states``; the last one is after the
            final norm).
        attentions: ``[L, H, T, T]`` (``output_attentions`` under eager attention, restored
            after).
        eager_logits, eager_hidden: logits and hidden states of the eager forward (what a
            capture of patterns, which runs the family's eager attention, compares with).
        taps: per name, ``[L, T, ...]`` read by forward hooks on the decoder's modules.
    """

    def __init__(self, model, ids: torch.Tensor):
        self.ids = ids
        taps: dict[str, list[torch.Tensor]] = {}

        def output_of(name):
            def hook(_module, _args, output):
                taps.setdefault(name, []).append(output[0].detach().clone())

            return hook

        def input_of(name):
            def hook(_module, args):
                taps.setdefault(name, []).append(args[0][0].detach().clone())

            return hook

        handles = []
        for layer in model.model.layers:
            handles += [
                layer.self_attn.o_proj.register_forward_pre_hook(input_of("o_proj_in")),
                layer.post_attention_layernorm.register_forward_hook(output_of("attn_out")),
                layer.pre_feedforward_layernorm.register_forward_hook(output_of("mlp_in")),
                layer.mlp.gate_proj.register_forward_hook(output_of("gate")),
                layer.mlp.up_proj.register_forward_hook(output_of("up")),
                layer.mlp.down_proj.register_forward_pre_hook(input_of("mlp_post")),
                layer.mlp.register_forward_hook(output_of("mlp_output")),
                layer.post_feedforward_layernorm.register_forward_hook(output_of("mlp_out")),
            ]
        try:
            with torch.no_grad():
                out = model(ids, output_hidden_states=True, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        original = model.config._attn_implementation
        model.set_attn_implementation("eager")
        try:
            with torch.no_grad():
                eager = model(
                    ids, output_attentions=True, output_hidden_states=True, use_cache=False
                )
        finally:
            model.set_attn_implementation(original)
        assert model.config._attn_implementation == original
        self.logits = out.logits[0]
        self.hidden = tuple(h[0] for h in out.hidden_states)
        self.attentions = torch.stack([a[0] for a in eager.attentions])
        self.eager_logits = eager.logits[0]
        self.eager_hidden = tuple(h[0] for h in eager.hidden_states)
        self.taps = {name: torch.stack(values) for name, values in taps.items()}


def _final_logits(model, normed: torch.Tensor) -> torch.Tensor:
    """The model's unembedding (and final soft-cap, if its config has one) of normed rows."""
    with torch.no_grad():
        logits = model.lm_head(normed).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def _lens_reference(model, ref: Reference, position: int) -> torch.Tensor:
    """``[L, V]``: each layer's output put through the final norm and unembedding."""
    with torch.no_grad():
        rows = [model.model.norm(h[position]) for h in ref.hidden[1:-1]]
        rows.append(ref.hidden[-1][position])  # hidden_states[L] is already final-normed
        return _final_logits(model, torch.stack(rows))


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(-1)


@pytest.fixture(scope="module")
def seed(gemma):
    """Seed 001's chapter-1 setup, shared by its chapters 2-5 as in the book."""
    from oculi.models.gemma import GemmaAttentionAdapter
    from oculi.utils import get_default_device

    device = get_default_device()
    # Adapted: the seed loads meta-llama/Llama-3.2-3B-Instruct with from_pretrained; the
    # model under test is the embedded Gemma 3 270M, already loaded by the session fixture.
    model, tokenizer = gemma.model, gemma.tokenizer
    # Adapted: LlamaAttentionAdapter is the Llama family's adapter; Gemma's is
    # GemmaAttentionAdapter (oculi.attach(model, tokenizer) picks it by itself).
    adapter = GemmaAttentionAdapter(model, tokenizer)
    # the seed's .to(device): oculi moves ids to the model's device itself, and the
    # reference runs where the model is
    input_ids = tokenizer.encode(SEED_TEXT, return_tensors="pt").to(device)
    capture = adapter.capture(input_ids)
    ref = Reference(model, input_ids.to(gemma.device))
    return dict(
        model=model,
        tokenizer=tokenizer,
        adapter=adapter,
        input_ids=input_ids,
        capture=capture,
        ref=ref,
        T=input_ids.shape[1],
    )


# -- seed 001, chapter 1: your first capture --------------------------------------------
def test_seed_ch1_first_capture(gemma, seed):
    from oculi.models.llama import LlamaAttentionAdapter
    from oculi.utils import get_default_device, get_device_info

    device = get_default_device()
    info = get_device_info()
    assert info["device"] == device.type and info["torch_version"] == torch.__version__
    # the seed's class, as written, refuses a Gemma model and names the way out
    with pytest.raises(UnsupportedArchitectureError, match="oculi.attach"):
        LlamaAttentionAdapter(seed["model"], seed["tokenizer"])

    capture, ref, T = seed["capture"], seed["ref"], seed["T"]
    assert seed["tokenizer"].convert_ids_to_tokens(seed["input_ids"][0]) == [
        "<bos>", "The", "▁capital", "▁of", "▁France", "▁is",
    ]  # fmt: skip
    assert T == 6
    assert capture.queries.shape == (N_LAYERS, N_HEADS, T, D_HEAD)
    assert capture.keys.shape == (N_LAYERS, N_KV_HEADS, T, D_HEAD)
    assert capture.values.shape == (N_LAYERS, N_KV_HEADS, T, D_HEAD)
    assert capture.patterns.shape == (N_LAYERS, N_HEADS, T, T)

    # patterns are the model's own (eager output_attentions)
    torch.testing.assert_close(capture.patterns, ref.attentions, **TOL)
    # queries and keys are the post-RoPE ones the scores use: softmax(q k^T * scaling + mask)
    # with Gemma 3's scaling query_pre_attn_scalar^-1/2 gives the model's patterns again
    scaling = seed["model"].config.query_pre_attn_scalar ** -0.5
    scores = capture.queries @ capture.keys.transpose(-1, -2) * scaling  # kv head broadcasts
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    recomputed = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    torch.testing.assert_close(recomputed, ref.attentions, **TOL)
    # values: pattern @ v per head is exactly what the model feeds its output projection
    z = (capture.patterns @ capture.values).transpose(1, 2).reshape(N_LAYERS, T, -1)
    torch.testing.assert_close(z, ref.taps["o_proj_in"], **TOL)


# -- seed 001, chapter 2: attention -----------------------------------------------------
def test_seed_ch2_attention_heatmap_pairs_and_entropy(seed):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from oculi.analysis import EntropyAnalysis

    capture, tokenizer, input_ids, ref = (
        seed["capture"],
        seed["tokenizer"],
        seed["input_ids"],
        seed["ref"],
    )

    # Hands-On: Visualizing Attention (as written; Agg backend, so show() draws nothing)
    layer, head = 15, 0
    pattern = capture.patterns[layer, head].cpu().numpy()
    tokens = tokenizer.convert_ids_to_tokens(input_ids[0])
    try:
        plt.figure(figsize=(8, 6))
        image = plt.imshow(pattern, cmap="Blues")
        plt.colorbar(label="Attention Weight")
        plt.xticks(range(len(tokens)), tokens, rotation=45, ha="right")
        plt.yticks(range(len(tokens)), tokens)
        plt.xlabel("Key (attending to)")
        plt.ylabel("Query (attending from)")
        plt.title(f"Attention Pattern: Layer {layer}, Head {head}")
        plt.tight_layout()
        plt.show()
        assert image.get_array().shape == (len(tokens), len(tokens))
    finally:
        plt.close("all")

    # Hands-On: Finding High-Attention Pairs
    pattern = capture.patterns[15, 0]
    max_attn, max_idx = pattern.max(dim=-1)
    pairs = []
    for q_pos in range(len(tokens)):
        k_pos = max_idx[q_pos].item()
        weight = max_attn[q_pos].item()
        pairs.append((tokens[q_pos], tokens[k_pos], weight))
    expected_w, expected_k = ref.attentions[15, 0].max(dim=-1)
    assert [k for _, k, _ in pairs] == [tokens[i] for i in expected_k.tolist()]
    assert [w for _, _, w in pairs] == pytest.approx(expected_w.tolist(), abs=1e-5)
    assert pairs[0] == ("<bos>", "<bos>", pytest.approx(1.0))  # row 0 sees only itself
    assert all(k_pos <= q_pos for q_pos, k_pos in enumerate(max_idx.tolist()))  # causal

    # Hands-On: Attention Entropy
    entropy = EntropyAnalysis.token_entropy(capture)
    assert entropy.shape == (N_LAYERS, N_HEADS, len(tokens))  # [L, H, T]
    expected = _entropy(ref.attentions)
    torch.testing.assert_close(entropy, expected, atol=1e-4, rtol=1e-4)
    bound = torch.log(torch.arange(1, len(tokens) + 1, dtype=torch.float32))
    assert bool((entropy >= 0).all()) and bool((entropy <= bound + 1e-5).all())

    mean_entropy = entropy.mean(dim=-1)  # [L, H]
    flat = mean_entropy.flatten()
    top_k = torch.topk(flat, k=5, largest=False)
    focused = []
    for idx, val in zip(top_k.indices, top_k.values):
        layer = idx // capture.n_heads
        head = idx % capture.n_heads
        focused.append((int(layer), int(head), float(val)))
    expected_mean = expected.mean(-1)
    for layer, head, val in focused:
        assert val == pytest.approx(float(expected_mean[layer, head]), abs=1e-4)
    # the five focused heads are the five smallest of the reference
    ref_top = sorted(expected_mean.flatten().tolist())[:5]
    assert [v for *_, v in focused] == pytest.approx(ref_top, abs=1e-4)


# -- seed 001, chapter 3: the residual stream -------------------------------------------
def test_seed_ch3_residual_stream(seed):
    from oculi import ResidualConfig

    adapter, input_ids, ref, T = seed["adapter"], seed["input_ids"], seed["ref"], seed["T"]

    # as written: layer 20 does not exist in an 18-layer model, and oculi says so
    config = ResidualConfig(
        layers=[10, 15, 20],
        capture_pre_attn=True,
        capture_post_attn=True,
        capture_pre_mlp=True,
        capture_post_mlp=True,
    )
    with pytest.raises(LayerIndexError, match="20"):
        adapter.capture_residual(input_ids, config=config)

    # Adapted: the seed's layers are for Llama-3.2-3B (28 layers); 20 becomes 17, the last
    config = ResidualConfig(
        layers=[10, 15, 17],
        capture_pre_attn=True,
        capture_post_attn=True,
        capture_pre_mlp=True,
        capture_post_mlp=True,
    )
    residual = adapter.capture_residual(input_ids, config=config)
    for name in ("pre_attn", "post_attn", "pre_mlp", "post_mlp"):
        assert getattr(residual, name).shape == (3, T, D_MODEL)  # [3, T, H]
    assert residual.layers == (10, 15, 17)

    for i, layer in enumerate(config.layers):
        pre = ref.hidden[layer]
        mid = pre + ref.taps["attn_out"][layer]  # the Gemma block adds its normed branches
        post = mid + ref.taps["mlp_out"][layer]
        torch.testing.assert_close(residual.pre_attn[i], pre, **TOL)
        torch.testing.assert_close(residual.post_attn[i], mid, **TOL)
        torch.testing.assert_close(residual.pre_mlp[i], ref.taps["mlp_in"][layer], **TOL)
        torch.testing.assert_close(residual.post_mlp[i], post, **TOL)
        if layer + 1 < N_LAYERS:  # hidden_states[L] is after the final norm
            torch.testing.assert_close(residual.post_mlp[i], ref.hidden[layer + 1], **TOL)

    # Hands-On: Measuring Layer Contributions
    layer_deltas = []
    for i in range(len(config.layers)):
        pre = residual.pre_attn[i]
        post = residual.post_mlp[i]
        delta = (post - pre).norm(dim=-1).mean()
        layer_deltas.append(delta.item())
    expected = [
        (ref.hidden[layer] + ref.taps["attn_out"][layer] + ref.taps["mlp_out"][layer])
        .sub(ref.hidden[layer])
        .norm(dim=-1)
        .mean()
        .item()
        for layer in config.layers
    ]
    assert layer_deltas == pytest.approx(expected, rel=1e-4)
    assert all(d > 0 for d in layer_deltas)


# -- seed 001, chapter 4: MLP internals --------------------------------------------------
def test_seed_ch4_mlp_internals(seed):
    from oculi import MLPConfig

    adapter, input_ids, ref, T = seed["adapter"], seed["input_ids"], seed["ref"], seed["T"]

    # as written: layers 20 and 25 do not exist in an 18-layer model
    config = MLPConfig(
        layers=[15, 20, 25],
        capture_gate=True,
        capture_up=True,
        capture_post_activation=True,
        capture_output=True,
    )
    with pytest.raises(LayerIndexError):
        adapter.capture_mlp(input_ids, config=config)

    # Adapted: the seed's layers are for a 28-layer Llama; 20 and 25 become 16 and 17
    config = MLPConfig(
        layers=[15, 16, 17],
        capture_gate=True,
        capture_up=True,
        capture_post_activation=True,
        capture_output=True,
    )
    mlp = adapter.capture_mlp(input_ids, config=config)
    assert mlp.gate.shape == (3, T, D_MLP)
    assert mlp.up.shape == (3, T, D_MLP)
    assert mlp.post_activation.shape == (3, T, D_MLP)
    assert mlp.output.shape == (3, T, D_MODEL)
    for i, layer in enumerate(config.layers):
        torch.testing.assert_close(mlp.gate[i], ref.taps["gate"][layer], **TOL)
        torch.testing.assert_close(mlp.up[i], ref.taps["up"][layer], **TOL)
        torch.testing.assert_close(mlp.post_activation[i], ref.taps["mlp_post"][layer], **TOL)
        torch.testing.assert_close(mlp.output[i], ref.taps["mlp_output"][layer], **TOL)

    # Hands-On: Finding Active Neurons
    layer_idx = 1  # Second captured layer
    token_idx = -1  # Last token
    activations = mlp.post_activation[layer_idx, token_idx]
    top_k = torch.topk(activations.abs(), k=10)
    neurons = [(idx.item(), val.item()) for idx, val in zip(top_k.indices, top_k.values)]
    expected = torch.topk(ref.taps["mlp_post"][16, -1].abs(), k=10)
    assert [n for n, _ in neurons] == expected.indices.tolist()
    assert [v for _, v in neurons] == pytest.approx(expected.values.tolist(), rel=1e-4)


# -- seed 001, chapter 5: logit lens -----------------------------------------------------
def test_seed_ch5_logit_lens(seed):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from oculi import LogitConfig
    from oculi.analysis import LogitLensAnalysis

    adapter, tokenizer, input_ids = seed["adapter"], seed["tokenizer"], seed["input_ids"]
    model, ref, T = seed["model"], seed["ref"], seed["T"]

    config = LogitConfig(layers=None, top_k=10)
    logits = adapter.capture_logits(input_ids, config=config)
    assert logits.top_k_indices.shape == (N_LAYERS, T, 10)  # Appendix A: [L, T, K]

    lens = LogitLensAnalysis(tokenizer)
    predictions = lens.layer_predictions(logits, token_position=-1, top_k=3)
    assert [p["layer"] for p in predictions] == list(range(N_LAYERS))
    shown = [(pred["layer"], pred["predictions"][:3]) for pred in predictions[::4]]
    assert [layer for layer, _ in shown] == [0, 4, 8, 12, 16]

    # every layer's top 3 at the last position against the model's own lens
    expected = torch.softmax(_lens_reference(model, ref, -1), dim=-1)  # [L, V]
    top_p, top_i = expected.topk(3, dim=-1)
    for pred, ids, probs in zip(predictions, top_i, top_p):
        assert [t for t, _ in pred["predictions"]] == [tokenizer.decode([i]) for i in ids]
        assert [p for _, p in pred["predictions"]] == pytest.approx(probs.tolist(), rel=2e-4)
    # the last layer's lens is the model's own next-token distribution
    final = torch.softmax(ref.logits[-1].float(), dim=-1).topk(3)
    assert [t for t, _ in predictions[-1]["predictions"]] == [
        tokenizer.decode([i]) for i in final.indices
    ]
    # measured: " the" 0.191, " a" 0.111, " Paris" 0.084 (the seed's prompt is open-ended)
    assert [t for t, _ in predictions[-1]["predictions"]] == [" the", " a", " Paris"]

    # Hands-On: Token Probability Trajectory. As written it follows "Paris" without the
    # leading space, which in Gemma's vocabulary is another token than " Paris", the one the
    # model predicts after "is"; run as written, and the same for " Paris".
    target = tokenizer.encode("Paris", add_special_tokens=False)[0]
    spaced = tokenizer.encode(" Paris", add_special_tokens=False)[0]
    assert target != spaced
    trajectory = lens.token_probability_trajectory(logits, target)
    assert trajectory.shape == (N_LAYERS, T)  # oculi gives every position: [L, T]
    torch.testing.assert_close(trajectory[:, -1], expected[:, target], atol=1e-6, rtol=1e-4)
    spaced_trajectory = lens.token_probability_trajectory(logits, spaced)
    torch.testing.assert_close(spaced_trajectory[:, -1], expected[:, spaced], atol=1e-6, rtol=1e-4)
    assert float(spaced_trajectory[-1, -1]) > float(trajectory[-1, -1])
    try:
        lines = plt.plot(trajectory.cpu().numpy())  # [L, T]: one line per position
        plt.xlabel("Layer")
        plt.ylabel('P("Paris")')
        plt.title("When Does the Model Know?")
        plt.show()
        assert len(lines) == T
    finally:
        plt.close("all")


# -- seed 001, Appendix A and the README's capture example -------------------------------
def test_appendix_a_shapes_and_readme_example(gemma):
    assert (
        gemma.n_layers,
        gemma.n_heads,
        gemma.n_kv_heads,
        gemma.d_head,
        gemma.d_model,
        gemma.d_mlp,
        gemma.d_vocab,
    ) == (N_LAYERS, N_HEADS, N_KV_HEADS, D_HEAD, D_MODEL, D_MLP, D_VOCAB)

    full = gemma.capture_full(SEED_TEXT, logits=oculi.LogitConfig(top_k=5))
    T = 6
    assert full.attention.queries.shape == (N_LAYERS, N_HEADS, T, D_HEAD)
    assert full.attention.keys.shape == (N_LAYERS, N_KV_HEADS, T, D_HEAD)
    assert full.attention.values.shape == (N_LAYERS, N_KV_HEADS, T, D_HEAD)
    assert full.attention.patterns.shape == (N_LAYERS, N_HEADS, T, T)
    assert full.residual.pre_attn.shape == (N_LAYERS, T, D_MODEL)
    assert full.residual.post_mlp.shape == (N_LAYERS, T, D_MODEL)
    assert full.mlp.post_activation.shape == (N_LAYERS, T, D_MLP)
    assert full.logits.top_k_indices.shape == (N_LAYERS, T, 5)

    ref = Reference(gemma.model, gemma.prepare(SEED_TEXT).input_ids)
    torch.testing.assert_close(full["blocks.3.attn.hook_pattern"], ref.attentions[3], **TOL)
    # a capture of patterns runs eager attention: the eager forward is its reference
    torch.testing.assert_close(full["blocks.-1.hook_resid_pre"], ref.eager_hidden[-2], **TOL)
    # the last layer's top 5 at every position are the model's own
    assert torch.equal(full.logits.top_k_indices[-1], ref.eager_logits.topk(5, dim=-1).indices)
    torch.testing.assert_close(
        full.logits.top_k_values[-1], ref.eager_logits.topk(5, dim=-1).values, **TOL
    )


def test_eiffel_tower_paris_is_the_model_and_the_lens_top1(gemma):
    ids = gemma.prepare(FACT).input_ids
    with torch.no_grad():
        logits = gemma.model(ids).logits[0, -1].float()
    probs = torch.softmax(logits, dim=-1)
    paris = gemma.tokenizer.encode(ANSWER, add_special_tokens=False)
    assert len(paris) == 1 and int(logits.argmax()) == paris[0]
    assert float(probs[paris[0]]) == pytest.approx(0.7594, abs=1e-3)  # measured 0.75942

    result = oculi.logit_lens(gemma, FACT, ANSWER)
    assert result.target_id == paris[0] and result.layers == tuple(range(N_LAYERS))
    assert result.top1[-1] == ANSWER and int(result.top1_ids[-1]) == paris[0]
    assert int(result.ranks[-1]) == 0
    assert float(result.probs[-1]) == pytest.approx(float(probs[paris[0]]), abs=1e-5)
    assert result.crossover_layer is not None and result.crossover_layer <= N_LAYERS - 1


# -- issue #4: IOI activation patching ---------------------------------------------------
@pytest.fixture(scope="module")
def ioi(gemma):
    clean = gemma.prepare(IOI_CLEAN).input_ids
    corrupt = gemma.prepare(IOI_CORRUPT).input_ids
    mary = gemma.tokenizer.encode(" Mary", add_special_tokens=False)
    john = gemma.tokenizer.encode(" John", add_special_tokens=False)
    assert len(mary) == len(john) == 1 and clean.shape == corrupt.shape
    with torch.no_grad():
        clean_out = gemma.model(clean, output_hidden_states=True)
        corrupt_logits = gemma.model(corrupt).logits[0, -1]
    clean_logits = clean_out.logits[0, -1]
    swapped = (clean[0] != corrupt[0]).nonzero().flatten().tolist()
    return dict(
        clean=clean,
        corrupt=corrupt,
        mary=mary[0],
        john=john[0],
        clean_diff=float(clean_logits[mary[0]] - clean_logits[john[0]]),
        corrupt_diff=float(corrupt_logits[mary[0]] - corrupt_logits[john[0]]),
        clean_hidden=clean_out.hidden_states,
        swapped=swapped,
    )


def _patched_logit_diff(gemma, ioi, layer: int, hook) -> float:
    """Plain PyTorch: run the corrupt prompt with ``hook`` on decoder layer ``layer``."""
    module = gemma.model.model.layers[layer]
    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            logits = gemma.model(ioi["corrupt"]).logits[0, -1]
    finally:
        handle.remove()
    return float(logits[ioi["mary"]] - logits[ioi["john"]])


def test_ioi_resid_pre_patching(gemma, ioi):
    res = oculi.patching.activation_patching(
        gemma,
        IOI_CLEAN,
        IOI_CORRUPT,
        site="resid_pre",
        metric=oculi.patching.logit_diff(" Mary", " John"),
        progress=False,
    )
    T = ioi["clean"].shape[1]
    assert T == 15 and ioi["swapped"] == [10]  # the second name
    assert res.values.shape == (N_LAYERS, T)
    assert res.axis == "position" and res.layers == tuple(range(N_LAYERS))
    # the model's own logit differences (measured: clean 5.220, corrupt -3.610)
    assert res.clean_metric == pytest.approx(ioi["clean_diff"], abs=1e-3)
    assert res.corrupt_metric == pytest.approx(ioi["corrupt_diff"], abs=1e-3)
    assert res.clean_metric == pytest.approx(5.22, abs=0.3)
    assert res.corrupt_metric == pytest.approx(-3.61, abs=0.3)

    recovery = res.normalized()
    p = ioi["swapped"][0]
    # layer 0 at the swapped name: the corrupt input becomes the clean one
    assert float(recovery[0, p]) == pytest.approx(1.0, abs=1e-3)
    # the last layer at the last position (measured 1.0096: only its attention still reads
    # corrupt keys)
    assert float(recovery[-1, -1]) == pytest.approx(1.0, abs=0.05)
    # positions before the swap hold the same residual in both runs, and layer 0 differs
    # only at the swapped token: patching there changes nothing
    torch.testing.assert_close(
        res.values[:, :p], torch.full((N_LAYERS, p), res.corrupt_metric), atol=1e-4, rtol=0
    )
    others = [i for i in range(T) if i != p]
    torch.testing.assert_close(
        res.values[0, others], torch.full((T - 1,), res.corrupt_metric), atol=1e-4, rtol=0
    )

    # two cells against a plain PyTorch patch of the decoder layer's input
    for layer, pos in [(8, p), (N_LAYERS - 1, T - 1)]:
        clean_h = ioi["clean_hidden"][layer][0, pos]

        def hook(_m, args, kwargs, pos=pos, clean_h=clean_h):
            h = (args[0] if args else kwargs["hidden_states"]).clone()
            h[0, pos] = clean_h
            if args:
                return (h, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": h}

        expected = _patched_logit_diff(gemma, ioi, layer, hook)
        assert float(res.values[layer, pos]) == pytest.approx(expected, abs=1e-3)


def test_ioi_per_head_z_patching(gemma, ioi):
    res = oculi.patching.activation_patching(
        gemma,
        IOI_CLEAN,
        IOI_CORRUPT,
        site="z",
        per_head=True,
        metric=oculi.patching.logit_diff(" Mary", " John"),
        progress=False,
    )
    assert res.values.shape == (N_LAYERS, N_HEADS) and res.axis == "head"
    assert bool(torch.isfinite(res.values).all())
    effect = res.values - res.corrupt_metric
    # measured: L15H1 moves the logit difference by -4.18, L11H3 by +3.66
    assert float(effect.abs().max()) > 0.5
    layer, head = divmod(int(effect.abs().argmax()), N_HEADS)
    assert (layer, head) == (15, 1)
    assert float(effect[11, 3]) == pytest.approx(3.66, abs=0.3)

    # the strongest head against a plain PyTorch patch of o_proj's input (z, heads concatenated)
    o_proj = gemma.model.model.layers[layer].self_attn.o_proj
    clean_z = {}
    grab = o_proj.register_forward_pre_hook(
        lambda _m, args: clean_z.setdefault("z", args[0].detach().clone())
    )
    try:
        with torch.no_grad():
            gemma.model(ioi["clean"])
    finally:
        grab.remove()
    cols = slice(head * D_HEAD, (head + 1) * D_HEAD)

    def patch(_m, args):
        z = args[0].clone()
        z[..., cols] = clean_z["z"][..., cols]
        return (z, *args[1:])

    handle = o_proj.register_forward_pre_hook(patch)
    try:
        with torch.no_grad():
            logits = gemma.model(ioi["corrupt"]).logits[0, -1]
    finally:
        handle.remove()
    expected = float(logits[ioi["mary"]] - logits[ioi["john"]])
    assert float(res.values[layer, head]) == pytest.approx(expected, abs=1e-3)


# -- issue #4: causal tracing ------------------------------------------------------------
def test_causal_tracing_eiffel_tower(gemma):
    res = oculi.causal_tracing(gemma, FACT, SUBJECT, ANSWER, samples=3, progress=False)
    ids = gemma.prepare(FACT).input_ids
    T = ids.shape[1]
    assert T == 10 and res.values.shape == (N_LAYERS, T)
    assert res.subject_positions == [1, 2, 3]  # "The", "▁Eiffel", "▁Tower" after <bos>
    with torch.no_grad():
        probs = torch.softmax(gemma.model(ids).logits[0, -1].float(), dim=-1)
    paris = gemma.tokenizer.encode(ANSWER, add_special_tokens=False)[0]
    # measured: clean 0.75942, corrupted 0.00299 (3 seeded noise samples)
    assert res.clean_prob == pytest.approx(float(probs[paris]), abs=1e-4)
    assert res.corrupt_prob < res.clean_prob
    assert res.corrupt_prob == pytest.approx(0.003, abs=0.002)
    # restoring the last layer's output at the last position restores the clean run
    assert float(res.values[-1, -1]) == pytest.approx(res.clean_prob, abs=1e-4)
    assert bool(torch.isfinite(res.values).all())
    assert bool((res.values >= 0).all()) and bool((res.values <= 1).all())
    # <bos> comes before the noise: restoring it changes nothing
    torch.testing.assert_close(
        res.values[:, 0], torch.full((N_LAYERS,), res.corrupt_prob), atol=1e-6, rtol=0
    )
    # ROME's picture: early layers at the subject's last tokens and late layers at the
    # last position carry the fact (measured 0.45 at L5 "▁Eiffel", 0.79 at L16 last)
    assert float(res.values[:12, 2].max()) > 0.3
    assert float(res.values[12:, -1].min()) > 0.5
