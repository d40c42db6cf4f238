"""Parity: every capture equals the model's own numbers or a hand computation, per layer.

One tiny random model per family variant (``models.FAMILIES``). The references are independent
of oculi's anatomies: Hugging Face's own ``output_hidden_states`` / ``output_attentions`` /
logits, and hand computations from the module weights written out here per family (norms,
projections, soft-capping, sliding windows, GQA head mapping).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

import oculi
from models import FAMILIES, N_LAYERS, ROTARY, prompt_ids, tiny_model
from oculi import CaptureConfig, LogitConfig, MLPConfig, ResidualConfig
from oculi.capture import bridge

# fp32 on CPU: everything below agrees to a few ulps of the values involved
TOL = 1e-5

GEMMA_LIKE = {"gemma", "gemma2", "gemma3"}
SANDWICH = {"gemma2", "gemma3", "olmo2"}  # norm on each branch's output


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    torch.testing.assert_close(actual, expected, atol=TOL, rtol=TOL, msg=lambda m: f"{what}: {m}")


# -- independent per-family references (the Hugging Face module tree, written out) ----------
def hf_layers(family: str, model):
    if family == "gpt2":
        return model.transformer.h
    if family.startswith("neox"):
        return model.gpt_neox.layers
    return model.model.layers


def hf_attn(family: str, block):
    if family == "gpt2":
        return block.attn
    if family.startswith("neox"):
        return block.attention
    return block.self_attn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (offset + weight)


def layer_norm(x: torch.Tensor, module) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), module.weight, module.bias, module.eps)


def norm_by_hand(family: str, model, module, x: torch.Tensor) -> torch.Tensor:
    if family == "gpt2" or family.startswith("neox"):
        return layer_norm(x, module)
    offset = 1.0 if family in GEMMA_LIKE else 0.0
    return rms_norm(x, module.weight, model.config.rms_norm_eps, offset)


def attn_input(family: str, model, layer: int, resid_pre: torch.Tensor) -> torch.Tensor:
    """The normalised input of attention, from the residual entering the block."""
    block = hf_layers(family, model)[layer]
    if family == "olmo2":  # post-norm: attention reads the raw residual
        return resid_pre
    norm = block.ln_1 if family == "gpt2" else block.input_layernorm
    return norm_by_hand(family, model, norm, resid_pre)


def mlp_input(family: str, model, layer: int, resid_pre, resid_mid) -> torch.Tensor:
    block = hf_layers(family, model)[layer]
    if family == "olmo2":
        return resid_mid
    if family == "gpt2":
        return layer_norm(resid_mid, block.ln_2)
    if family == "neox_parallel":
        return layer_norm(resid_pre, block.post_attention_layernorm)
    if family == "neox_sequential":
        return layer_norm(resid_mid, block.post_attention_layernorm)
    norm = block.pre_feedforward_layernorm if family in SANDWICH else block.post_attention_layernorm
    return norm_by_hand(family, model, norm, resid_mid)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = x @ weight.T
    return out if bias is None else out + bias


def qkv_by_hand(family: str, model, layer: int, x: torch.Tensor):
    """Pre-RoPE q ``[H, T, D]`` and k, v ``[H_kv, T, D]`` (after q/k norms) from weights."""
    cfg = model.config
    attn = hf_attn(family, hf_layers(family, model)[layer])
    h = cfg.num_attention_heads
    h_kv = getattr(cfg, "num_key_value_heads", None) or h
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // h
    t = x.shape[0]

    def heads(y, n):
        return y.reshape(t, n, d).transpose(0, 1)

    if family == "gpt2":  # Conv1D: weight [in, out], output [q | k | v]
        q, k, v = (x @ attn.c_attn.weight + attn.c_attn.bias).split(h * d, dim=-1)
        return heads(q, h), heads(k, h), heads(v, h)
    if family.startswith("neox"):  # per head: [head, (q k v), d]
        qkv = linear(x, attn.query_key_value.weight, attn.query_key_value.bias).reshape(t, h, 3 * d)
        q, k, v = qkv.transpose(0, 1).split(d, dim=-1)
        return q, k, v
    if family == "phi3":
        fused = linear(x, attn.qkv_proj.weight, attn.qkv_proj.bias)
        q, k, v = fused.split([h * d, h_kv * d, h_kv * d], dim=-1)
        return heads(q, h), heads(k, h_kv), heads(v, h_kv)
    q = linear(x, attn.q_proj.weight, attn.q_proj.bias)
    k = linear(x, attn.k_proj.weight, attn.k_proj.bias)
    v = linear(x, attn.v_proj.weight, attn.v_proj.bias)
    eps = getattr(cfg, "rms_norm_eps", None)
    if family == "olmo2":  # RMSNorm over the whole H*D projection, then split heads
        q = rms_norm(q, attn.q_norm.weight, eps, 0.0)
        k = rms_norm(k, attn.k_norm.weight, eps, 0.0)
    q, k, v = heads(q, h), heads(k, h_kv), heads(v, h_kv)
    if family in ("qwen3", "gemma3"):  # per-head RMSNorm over D
        offset = 1.0 if family == "gemma3" else 0.0
        q = rms_norm(q, attn.q_norm.weight, eps, offset)
        k = rms_norm(k, attn.k_norm.weight, eps, offset)
    return q, k, v


def sliding_window(family: str, model, layer: int) -> int | None:
    cfg = model.config
    if family == "mistral":
        return cfg.sliding_window
    if family in ("gemma2", "gemma3", "qwen2"):
        return cfg.sliding_window if cfg.layer_types[layer] == "sliding_attention" else None
    return None


def attn_softcap(family: str, model) -> float | None:
    return model.config.attn_logit_softcapping if family == "gemma2" else None


def pattern_by_hand(family, model, layer, q, k) -> torch.Tensor:
    """``softmax(cap(q k^T * scaling) + mask)`` with GQA, causal and sliding masks."""
    attn = hf_attn(family, hf_layers(family, model)[layer])
    h, t = q.shape[0], q.shape[1]
    k = k.repeat_interleave(h // k.shape[0], dim=0)  # query head i reads KV head i // group
    scores = q @ k.transpose(-1, -2) * attn.scaling
    cap = attn_softcap(family, model)
    if cap is not None:
        scores = cap * torch.tanh(scores / cap)
    i = torch.arange(t)[:, None]
    j = torch.arange(t)[None, :]
    visible = j <= i
    window = sliding_window(family, model, layer)
    if window is not None:
        visible &= i - j < window
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)


def hf_final_norm(family: str, model):
    if family == "gpt2":
        return model.transformer.ln_f
    if family.startswith("neox"):
        return model.gpt_neox.final_layer_norm
    return model.model.norm


def o_proj_bias(family: str, attn) -> torch.Tensor | None:
    if family == "gpt2":
        return attn.c_proj.bias
    if family.startswith("neox"):
        return attn.dense.bias
    return attn.o_proj.bias


def mlp_parts(family: str, mlp):
    """``(gate, up, down)`` as ``(weight [out, in], bias)`` pairs; gate ``None`` if plain."""
    if family == "gpt2":  # Conv1D weights are [in, out]
        return None, (mlp.c_fc.weight.T, mlp.c_fc.bias), (mlp.c_proj.weight.T, mlp.c_proj.bias)
    if family.startswith("neox"):
        return (
            None,
            (mlp.dense_h_to_4h.weight, mlp.dense_h_to_4h.bias),
            (mlp.dense_4h_to_h.weight, mlp.dense_4h_to_h.bias),
        )
    if family == "phi3":  # fused [gate | up]
        w_gate, w_up = mlp.gate_up_proj.weight.chunk(2, dim=0)
        return (w_gate, None), (w_up, None), (mlp.down_proj.weight, mlp.down_proj.bias)
    return (
        (mlp.gate_proj.weight, mlp.gate_proj.bias),
        (mlp.up_proj.weight, mlp.up_proj.bias),
        (mlp.down_proj.weight, mlp.down_proj.bias),
    )


def activation(family: str, model):
    cfg = model.config
    if family == "gpt2":
        return ACT2FN[cfg.activation_function]
    if family in ("gemma2", "gemma3"):
        return ACT2FN[cfg.hidden_activation]
    return ACT2FN[cfg.hidden_act]


# -- the reference run ------------------------------------------------------------------
@dataclass
class Ref:
    family: str
    model: torch.nn.Module
    adapter: oculi.Adapter
    ids: torch.Tensor  # [T]
    hidden: tuple[torch.Tensor, ...]  # L + 1 of [T, d]
    logits: torch.Tensor  # [T, V]
    attentions: tuple[torch.Tensor, ...]  # L of [H, T, T], eager


@contextlib.contextmanager
def with_attn_impl(model, impl: str):
    """Run the block with attention implementation ``impl``; restore the original after."""
    original = model.config._attn_implementation
    model.set_attn_implementation(impl)
    try:
        yield
    finally:
        model.set_attn_implementation(original)


@pytest.fixture(scope="module", params=list(FAMILIES))
def ref(request) -> Ref:
    family = request.param
    model = tiny_model(family)
    ids = prompt_ids()
    with torch.no_grad():
        out = model(ids[None], output_hidden_states=True)
        with with_attn_impl(model, "eager"):
            eager = model(ids[None], output_attentions=True)
    return Ref(
        family=family,
        model=model,
        adapter=oculi.attach(model),
        ids=ids,
        hidden=tuple(h[0] for h in out.hidden_states),
        logits=out.logits[0],
        attentions=tuple(a[0] for a in eager.attentions),
    )


# -- residual stream ----------------------------------------------------------------------
def test_residual_matches_hidden_states(ref: Ref):
    res = ref.adapter.capture_residual(ref.ids)
    L = ref.adapter.n_layers
    assert L == N_LAYERS and len(ref.hidden) == L + 1
    assert res.pre_attn.shape == (L, len(ref.ids), ref.adapter.d_model)
    for layer in range(L):
        assert_close(res.pre_attn[layer], ref.hidden[layer], f"pre_attn[{layer}]")
        if layer < L - 1:
            assert_close(res.post_mlp[layer], ref.hidden[layer + 1], f"post_mlp[{layer}]")
    final_norm = hf_final_norm(ref.family, ref.model)
    with torch.no_grad():
        assert_close(final_norm(res.post_mlp[L - 1]), ref.hidden[L], "final_norm(post_mlp[L-1])")


def test_residual_decomposes(ref: Ref):
    res = ref.adapter.capture_residual(
        ref.ids, ResidualConfig(capture_attn_out=True, capture_mlp_out=True)
    )
    fam, model = ref.family, ref.model
    for layer in range(ref.adapter.n_layers):
        pre, mid, post = res.pre_attn[layer], res.post_attn[layer], res.post_mlp[layer]
        attn_out, mlp_out = res.attn_out[layer], res.mlp_out[layer]
        assert_close(mid, pre + attn_out, f"post_attn[{layer}] = pre_attn + attn_out")
        if fam == "neox_parallel":
            assert_close(post, pre + attn_out + mlp_out, f"post_mlp[{layer}] (parallel)")
        else:
            assert_close(post, mid + mlp_out, f"post_mlp[{layer}] = post_attn + mlp_out")
        with torch.no_grad():
            expected_in = mlp_input(fam, model, layer, pre, mid)
        assert_close(res.pre_mlp[layer], expected_in, f"pre_mlp[{layer}] (MLP's input)")


# -- attention patterns -------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["default", "eager"])
def test_patterns_match_eager_output_attentions(ref: Ref, impl: str):
    model = ref.model
    before = model.config._attn_implementation
    if impl == "default":
        cap = ref.adapter.capture(ref.ids)
    else:
        with with_attn_impl(model, "eager"):
            cap = ref.adapter.capture(ref.ids)
    assert model.config._attn_implementation == before
    L, H, T = ref.adapter.n_layers, ref.adapter.n_heads, len(ref.ids)
    assert cap.patterns.shape == (L, H, T, T)
    for layer in range(L):
        assert_close(cap.patterns[layer], ref.attentions[layer], f"pattern[{layer}]")
    assert_close(cap.patterns.sum(-1), torch.ones(L, H, T), "row sums")
    # causal: nothing above the diagonal
    assert float(cap.patterns.triu(diagonal=1).abs().max()) == 0.0


def test_pattern_recomputed_from_captured_qk(ref: Ref):
    cap = ref.adapter.capture(ref.ids, CaptureConfig(capture_head_outputs=True))
    for layer in range(ref.adapter.n_layers):
        with torch.no_grad():
            expected = pattern_by_hand(
                ref.family, ref.model, layer, cap.queries[layer], cap.keys[layer]
            )
        assert_close(cap.patterns[layer], expected, f"hand pattern[{layer}]")
        # z = pattern @ v, each query head reading its KV head
        v = cap.values[layer].repeat_interleave(ref.adapter.n_heads // ref.adapter.n_kv_heads, 0)
        assert_close(cap.head_outputs[layer], cap.patterns[layer] @ v, f"z[{layer}]")
    # without patterns the bridge defers to the model's own kernel (sdpa): same q, k, v and z
    fast = ref.adapter.capture(
        ref.ids, CaptureConfig(capture_patterns=False, capture_head_outputs=True)
    )
    for name in ("queries", "keys", "values", "head_outputs"):
        assert_close(getattr(fast, name), getattr(cap, name), f"{name} without patterns")
    window = [sliding_window(ref.family, ref.model, layer) for layer in range(N_LAYERS)]
    for layer, w in enumerate(window):
        if w is not None:  # the window really cuts: the last query sees only w keys
            assert int((cap.patterns[layer, :, -1] > 0).sum(-1).max()) == w


# -- queries and keys ---------------------------------------------------------------------
def test_pre_rope_qkv_by_hand(ref: Ref):
    pre = ref.adapter.capture(ref.ids, CaptureConfig(qk_stage="pre_rope"))
    res = ref.adapter.capture_residual(ref.ids)
    assert pre.qk_stage == "pre_rope"
    for layer in range(ref.adapter.n_layers):
        with torch.no_grad():
            x = attn_input(ref.family, ref.model, layer, res.pre_attn[layer])
            q, k, v = qkv_by_hand(ref.family, ref.model, layer, x)
        assert_close(pre.queries[layer], q, f"pre-RoPE q[{layer}]")
        assert_close(pre.keys[layer], k, f"pre-RoPE k[{layer}]")
        assert_close(pre.values[layer], v, f"v[{layer}]")


def test_post_rope_is_a_rotation_of_pre_rope(ref: Ref):
    pre = ref.adapter.capture(ref.ids, CaptureConfig(qk_stage="pre_rope"))
    post = ref.adapter.capture(ref.ids)
    if ref.family not in ROTARY:  # GPT-2: no rotation at all
        assert_close(post.queries, pre.queries, "q")
        assert_close(post.keys, pre.keys, "k")
        return
    # position 0 is rotated by angle 0
    assert_close(post.queries[:, :, 0], pre.queries[:, :, 0], "q at position 0")
    assert_close(post.keys[:, :, 0], pre.keys[:, :, 0], "k at position 0")
    # rotations keep each head vector's norm, and later positions really are rotated
    assert_close(post.queries.norm(dim=-1), pre.queries.norm(dim=-1), "|q| per position")
    assert_close(post.keys.norm(dim=-1), pre.keys.norm(dim=-1), "|k| per position")
    assert float((post.queries[:, :, 1:] - pre.queries[:, :, 1:]).abs().max()) > 1e-3
    if ref.family.startswith("neox") or ref.family == "phi3":  # rotary on half of each head
        d = ref.adapter.d_head
        assert_close(post.queries[..., d // 2 :], pre.queries[..., d // 2 :], "unrotated dims")


# -- per-head contributions ---------------------------------------------------------------
def test_head_contributions_sum_to_attn_out(ref: Ref):
    full = ref.adapter.capture_full(
        ref.ids,
        attention=CaptureConfig(capture_head_contributions=True),
        residual=ResidualConfig(capture_attn_out=True),
        mlp=None,
        logits=None,
    )
    contrib, attn_out = full.attention.head_contributions, full.residual.attn_out
    L, H, T, d = ref.adapter.n_layers, ref.adapter.n_heads, len(ref.ids), ref.adapter.d_model
    assert contrib.shape == (L, H, T, d)
    for layer in range(L):
        attn = hf_attn(ref.family, hf_layers(ref.family, ref.model)[layer])
        bias = o_proj_bias(ref.family, attn)
        total = contrib[layer].sum(0)
        if bias is not None:
            assert ref.family not in SANDWICH  # a bias inside the output norm is not per head
            total = total + bias
        assert_close(total, attn_out[layer], f"sum of head contributions[{layer}]")
    # separate capture calls agree with the combined one
    alone = ref.adapter.capture(ref.ids, CaptureConfig(capture_head_contributions=True))
    assert_close(alone.head_contributions, contrib, "head contributions alone")


# -- MLP ------------------------------------------------------------------------------------
def test_mlp_internals(ref: Ref):
    full = ref.adapter.capture_full(
        ref.ids,
        attention=None,
        residual=ResidualConfig(capture_mlp_out=True),
        mlp=MLPConfig(),
        logits=None,
    )
    mlp, res = full.mlp, full.residual
    act = activation(ref.family, ref.model)
    for layer in range(ref.adapter.n_layers):
        block = hf_layers(ref.family, ref.model)[layer]
        gate_p, up_p, down_p = mlp_parts(ref.family, block.mlp)
        x = res.pre_mlp[layer]
        with torch.no_grad():
            up = linear(x, *up_p)
            assert_close(mlp.up[layer], up, f"up[{layer}]")
            if gate_p is None:
                assert mlp.gate is None
                assert_close(mlp.post_activation[layer], act(up), f"act(up)[{layer}]")
            else:
                gate = linear(x, *gate_p)
                assert_close(mlp.gate[layer], gate, f"gate[{layer}]")
                assert_close(mlp.post_activation[layer], act(gate) * up, f"act(gate)*up[{layer}]")
            down = linear(mlp.post_activation[layer], *down_p)
        assert_close(mlp.output[layer], down, f"down(post_activation)[{layer}]")
        if ref.family in SANDWICH:  # what joins the residual is the normed MLP output
            norm = block.post_feedforward_layernorm
            with torch.no_grad():
                normed = norm_by_hand(ref.family, ref.model, norm, down)
            assert_close(res.mlp_out[layer], normed, f"mlp_out[{layer}] (post-norm)")
        else:
            assert_close(res.mlp_out[layer], down, f"mlp_out[{layer}]")


# -- logit lens -----------------------------------------------------------------------------
def test_logit_lens_last_layer_is_the_model(ref: Ref):
    lens = ref.adapter.capture_logits(ref.ids, LogitConfig(top_k=5))
    L = ref.adapter.n_layers
    logits = ref.logits
    assert_close(lens.logits(layer=L - 1), logits, "lens logits at the last layer")
    assert torch.equal(lens.top_k_indices[-1], logits.topk(5, dim=-1).indices)
    assert_close(lens.top_k_values[-1], logits.topk(5, dim=-1).values, "top-k values")
    probs = torch.softmax(logits, dim=-1)
    for t in (int(ref.ids[0]), int(logits[-1].argmax())):
        assert_close(lens.token_probs(t)[-1], probs[:, t], f"p(token {t})")
    assert float(lens.kl_to_final()[-1].abs().max()) < TOL
    # ranks agree with top-k at every layer: the k-th best token has rank k
    top = lens.top_k_indices
    for k in range(3):
        for layer in range(L):
            for pos in (0, len(ref.ids) - 1):
                token = int(top[layer, pos, k])
                assert int(lens.ranks(token)[layer, pos]) == k, (layer, pos, k)


def test_logit_lens_earlier_layers_by_hand(ref: Ref):
    res = ref.adapter.capture_residual(ref.ids)
    lens = ref.adapter.capture_logits(ref.ids)
    # the lens at layer l is the model's own final norm and head applied to post_mlp[l]
    with torch.no_grad():
        unembed = ref.model.get_output_embeddings()
        expected = unembed(hf_final_norm(ref.family, ref.model)(res.post_mlp))
    if ref.family == "gemma2":
        cap = ref.model.config.final_logit_softcapping
        expected = cap * torch.tanh(expected / cap)
    for layer in range(ref.adapter.n_layers):
        assert_close(lens.logits(layer=layer), expected[layer], f"lens logits[{layer}]")


# -- selected layers ------------------------------------------------------------------------
def test_selected_layer_equals_slice_and_hooks_only_it(ref: Ref):
    adapter = ref.adapter
    everything = adapter.capture_full(ref.ids, mlp=MLPConfig(), logits=None)
    layers_run: list[int] = []
    oculi_hooks_seen: dict[int, int] = {}
    bridged_layers: set[int] = set()
    handles = []

    def count_oculi(module) -> int:
        return sum(
            1
            for m in module.modules()
            for d in (m._forward_hooks, m._forward_pre_hooks)
            for fn in d.values()
            if getattr(fn, "__module__", "").startswith("oculi")
        )

    for i, block in enumerate(hf_layers(ref.family, ref.model)):

        def seen(_m, _a, i=i, block=block):
            layers_run.append(i)
            oculi_hooks_seen[i] = count_oculi(block)
            for state in bridge._ACTIVE:  # layers whose attention call oculi taps
                bridged_layers.update(state.taps)

        handles.append(block.register_forward_pre_hook(seen))
    try:
        one = adapter.capture_full(
            ref.ids,
            attention=CaptureConfig(layers=[1]),
            residual=ResidualConfig(layers=[1]),
            mlp=MLPConfig(layers=[1]),
            logits=None,
        )
    finally:
        for h in handles:
            h.remove()
    assert one.attention.layers == (1,) and one.residual.layers == (1,)
    assert one.attention.patterns.shape[0] == 1
    for part, fields in (
        ("attention", ("queries", "keys", "values", "patterns")),
        ("residual", ("pre_attn", "post_attn", "pre_mlp", "post_mlp")),
        ("mlp", ("up", "post_activation", "output")),
    ):
        for name in fields:
            got = getattr(getattr(one, part), name)
            want = getattr(getattr(everything, part), name)[1:2]
            assert_close(got, want, f"{part}.{name} of layer 1")
    # only layer 1 carried oculi hooks, and the forward stopped after it
    assert oculi_hooks_seen[0] == 0 and oculi_hooks_seen[1] > 0
    assert layers_run == [0, 1]
    assert bridged_layers == {1}
    # negative indices count from the end
    assert adapter.capture(ref.ids, CaptureConfig(layers=[-2])).layers == (1,)


# -- storage ----------------------------------------------------------------------------------
def test_storage_dtype_is_a_cast_of_the_fp32_capture(ref: Ref):
    half = dict(storage_dtype=torch.float16)
    small = ref.adapter.capture_full(
        ref.ids,
        attention=CaptureConfig(capture_head_contributions=True, **half),
        residual=ResidualConfig(**half),
        mlp=MLPConfig(**half),
        logits=None,
    )
    full = ref.adapter.capture_full(
        ref.ids,
        attention=CaptureConfig(capture_head_contributions=True),
        residual=ResidualConfig(),
        mlp=MLPConfig(),
        logits=None,
    )
    for part in ("attention", "residual", "mlp"):
        for name, tensor in getattr(full, part).tensors().items():
            stored = getattr(getattr(small, part), name)
            assert stored.dtype == torch.float16 and stored.grad_fn is None, (part, name)
            if ref.family == "neox_parallel" and name == "post_attn":
                # derived as pre_attn + attn_out from the fp16-stored pre_attn: one more rounding
                torch.testing.assert_close(stored.float(), tensor, rtol=2e-3, atol=2e-3)
            else:
                assert torch.equal(stored, tensor.half()), (part, name)
