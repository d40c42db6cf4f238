"""TransformerLens compatibility on tiny models of every family (``oculi.tl``).

References are never oculi: Hugging Face's own ``output_hidden_states``/``output_attentions``
and logits, plain ``register_forward_hook`` hooks written out here, hand computations from the
module weights (``test_parity``'s per-family helpers), and identities (components add up to
the residual, attributions to the logit). Where TransformerLens is installed (the ``compare``
extra), oculi's numbers are compared with its own on GPT-2 and on a grouped-query rotary Llama.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import pytest
import torch

import oculi
from models import FAMILIES, ROTARY, prompt_ids, tiny_model, tiny_tokenizer
from oculi.errors import InputError, UnknownSiteError
from oculi.tl import ActivationCache, get_act_name
from test_parity import (
    attn_input,
    hf_attn,
    hf_final_norm,
    hf_layers,
    linear,
    mlp_input,
    mlp_parts,
    o_proj_bias,
    pattern_by_hand,
    qkv_by_hand,
    with_attn_impl,
)

TOL = 1e-5
PROMPT = "the cat sat on the big red tree"
SANDWICH = {"gemma2", "gemma3", "olmo2"}


def close(actual, expected, what=""):
    torch.testing.assert_close(
        actual.double(), expected.double(), atol=TOL, rtol=TOL, msg=lambda m: f"{what}: {m}"
    )


def o_proj(family, attn):
    return (
        attn.c_proj
        if family == "gpt2"
        else attn.dense
        if family.startswith("neox")
        else attn.o_proj
    )


def down_proj(family, mlp):
    if family == "gpt2":
        return mlp.c_proj
    return mlp.dense_4h_to_h if family.startswith("neox") else mlp.down_proj


def branches(family, block):
    """The modules whose outputs join the residual: (attention branch, MLP branch)."""
    attn, mlp = hf_attn(family, block), block.mlp
    if family in SANDWICH:
        return block.post_attention_layernorm, block.post_feedforward_layernorm
    return attn, mlp


@contextlib.contextmanager
def recording(modules: dict):
    """Plain torch hooks: ``seen[name] = (input, output)`` of each module, removed after."""
    seen: dict = {}

    def keep(name):
        def hook(_m, args, out):
            seen[name] = (
                args[0].detach().clone() if args else None,
                (out[0] if isinstance(out, tuple) else out).detach().clone(),
            )

        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in modules.items()]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


@dataclass
class Ref:
    family: str
    model: torch.nn.Module
    adapter: oculi.Adapter
    ids: torch.Tensor  # [1, T]
    hidden: tuple
    logits: torch.Tensor  # [1, T, V]
    attentions: tuple
    seen: dict


@pytest.fixture(scope="module", params=list(FAMILIES))
def ref(request) -> Ref:
    family = request.param
    model = tiny_model(family)
    ids = prompt_ids()[None]
    modules = {}
    for layer, block in enumerate(hf_layers(family, model)):
        attn_branch, mlp_branch = branches(family, block)
        modules[f"attn{layer}"] = attn_branch
        modules[f"mlp{layer}"] = mlp_branch
        modules[f"o{layer}"] = o_proj(family, hf_attn(family, block))
        modules[f"down{layer}"] = down_proj(family, block.mlp)
    with torch.no_grad(), recording(modules) as seen:
        out = model(ids, output_hidden_states=True)
    with torch.no_grad(), with_attn_impl(model, "eager"):
        eager = model(ids, output_attentions=True)
    return Ref(
        family,
        model,
        oculi.attach(model),
        ids,
        out.hidden_states,
        out.logits,
        eager.attentions,
        seen,
    )


def pre_cap(ref: Ref) -> torch.Tensor:
    """The model's logits before any final soft-cap, float64 ``[1, T, V]``."""
    cap = ref.adapter.unembedding()[2]
    logits = ref.logits.double()
    return logits if cap is None else cap * torch.atanh(logits / cap)


# -- every cache entry against plain torch -------------------------------------------------
def test_cache_entries_match_the_model_and_hand_hooks(ref: Ref):
    fam, model, a = ref.family, ref.model, ref.adapter
    L, H = a.n_layers, a.n_heads
    logits, cache = a.run_with_cache(ref.ids)
    close(logits, ref.logits, "logits")
    assert logits.shape == (1, ref.ids.shape[1], a.d_vocab)
    embed = cache["hook_embed"] + cache.get("hook_pos_embed", 0)
    close(embed, ref.hidden[0], "hook_embed (+ hook_pos_embed)")
    if fam == "gpt2":
        close(cache["hook_embed"], model.transformer.wte(ref.ids), "gpt2 hook_embed")
        close(cache["hook_pos_embed"][0], model.transformer.wpe.weight[: ref.ids.shape[1]], "wpe")
    close(cache["ln_final.hook_normalized"], ref.hidden[L], "ln_final.hook_normalized")
    final = hf_final_norm(fam, model)
    x = cache[f"blocks.{L - 1}.hook_resid_post"]
    check_scale(final, x, cache["ln_final.hook_scale"], ref.hidden[L], fam, "ln_final")
    for layer in range(L):
        b = f"blocks.{layer}."
        pre, attn_out = cache[b + "hook_resid_pre"], cache[b + "hook_attn_out"]
        close(pre, ref.hidden[layer], f"resid_pre {layer}")
        if layer < L - 1:
            close(cache[b + "hook_resid_post"], ref.hidden[layer + 1], f"resid_post {layer}")
        close(attn_out, ref.seen[f"attn{layer}"][1], f"attn_out {layer}")
        close(cache[b + "hook_mlp_out"], ref.seen[f"mlp{layer}"][1], f"mlp_out {layer}")
        close(cache[b + "hook_resid_mid"], pre + attn_out, f"resid_mid {layer}")
        close(cache[b + "mlp.hook_post"], ref.seen[f"down{layer}"][0], f"mlp.hook_post {layer}")
        z = cache[b + "attn.hook_z"]  # [B, T, H, D]
        close(z.flatten(-2), ref.seen[f"o{layer}"][0], f"hook_z {layer}")
        pattern = cache[b + "attn.hook_pattern"]
        close(pattern, ref.attentions[layer], f"hook_pattern {layer}")
        v = cache[b + "attn.hook_v"]  # [B, T, H_kv, D]
        v_rep = v.repeat_interleave(H // v.shape[2], dim=2)
        close(torch.einsum("bhqk,bkhd->bqhd", pattern, v_rep), z, f"z = pattern @ v {layer}")
        scores = cache[b + "attn.hook_attn_scores"]
        close(torch.softmax(scores.double(), -1), pattern, f"softmax(hook_attn_scores) {layer}")
        upper = torch.ones_like(scores, dtype=torch.bool).triu(1)
        assert torch.isneginf(scores[upper]).all(), "causally masked scores are -inf"
        with torch.no_grad():
            q, k, v_hand = qkv_by_hand(fam, model, layer, attn_input(fam, model, layer, pre)[0])
        close(cache[b + "attn.hook_q"][0], q.transpose(0, 1), f"hook_q {layer}")
        close(cache[b + "attn.hook_k"][0], k.transpose(0, 1), f"hook_k {layer}")
        close(v[0], v_hand.transpose(0, 1), f"hook_v {layer}")
        assert (f"{b}attn.hook_rot_q" in cache) == (fam in ROTARY)
        if fam in ROTARY:  # the rotated q, k give the model's pattern by hand
            rot_q, rot_k = cache[b + "attn.hook_rot_q"][0], cache[b + "attn.hook_rot_k"][0]
            with torch.no_grad():
                by_hand = pattern_by_hand(
                    fam, model, layer, rot_q.transpose(0, 1), rot_k.transpose(0, 1)
                )
            close(by_hand, pattern[0], f"pattern from hook_rot_q/k {layer}")
        block = hf_layers(fam, model)[layer]
        gate, up, _ = mlp_parts(fam, block.mlp)
        mlp_in = cache[b + "ln2.hook_normalized"] if fam != "olmo2" else cache[b + "hook_resid_mid"]
        with torch.no_grad():
            pre_act = linear(mlp_in, *(gate or up))  # TL's hook_pre: the pre-activation
            close(cache[b + "mlp.hook_pre"], pre_act, f"mlp.hook_pre {layer}")
            if gate is not None:
                close(cache[b + "mlp.hook_pre_linear"], linear(mlp_in, *up), f"pre_linear {layer}")
        mlp_norm_in = pre if fam == "neox_parallel" else cache[b + "hook_resid_mid"]
        for ln, x_in in (("ln1", pre), ("ln2", mlp_norm_in)):
            if fam != "olmo2":  # OLMo 2 has no norm before attention or the MLP
                module = hf_norm(fam, block, ln)
                normed = cache[f"{b}{ln}.hook_normalized"]
                check_scale(
                    module, x_in, cache[f"{b}{ln}.hook_scale"], normed, fam, f"{ln} {layer}"
                )
        if fam != "olmo2":
            with torch.no_grad():
                expected = attn_input(fam, model, layer, pre)
            close(cache[b + "ln1.hook_normalized"], expected, f"ln1.hook_normalized {layer}")
        if fam != "olmo2":
            with torch.no_grad():
                expected = mlp_input(fam, model, layer, pre, pre + attn_out)
            close(cache[b + "ln2.hook_normalized"], expected, f"ln2.hook_normalized {layer}")


def hf_norm(family, block, ln):
    """The block's norm before attention (``ln1``) or the MLP (``ln2``), by hand."""
    if family == "gpt2":
        return block.ln_1 if ln == "ln1" else block.ln_2
    if ln == "ln1":
        return block.input_layernorm
    return block.pre_feedforward_layernorm if family in SANDWICH else block.post_attention_layernorm


def check_scale(norm, x, scale, normed, family, what):
    """``normed`` from ``x`` divided by ``scale`` through the norm's own weights."""
    if isinstance(norm, torch.nn.LayerNorm):
        expected = (x - x.mean(-1, keepdim=True)) / scale * norm.weight + norm.bias
    else:
        offset = 1.0 if family in ("gemma", "gemma2", "gemma3") else 0.0
        expected = x / scale * (offset + norm.weight)
    close(expected, normed, f"{what}.hook_scale")


def test_head_results_add_up_to_attn_out_and_match_the_weights(ref: Ref):
    fam, a = ref.family, ref.adapter
    _, cache = a.run_with_cache(
        ref.ids, names_filter=lambda n: n.endswith(("hook_result", "hook_z", "hook_attn_out"))
    )
    assert set(cache) == {
        f"blocks.{i}.{h}"
        for i in range(a.n_layers)
        for h in ("attn.hook_z", "attn.hook_result", "hook_attn_out")
    }
    for layer in range(a.n_layers):
        block = hf_layers(fam, ref.model)[layer]
        attn = hf_attn(fam, block)
        result = cache["result", layer]  # [B, T, H, d]
        bias = o_proj_bias(fam, attn)
        total = result.sum(2) + (bias if bias is not None and fam not in SANDWICH else 0)
        close(total, cache["attn_out", layer], f"sum of heads {layer}")
        # a head's write is z_h W_O,h by hand; behind a post-attention RMSNorm, times the
        # norm's gain (offset + w) / rms(o) for the whole output o = z W_O
        w = o_proj(fam, attn).weight
        w_o = w if fam == "gpt2" else w.T  # [H*D, d]
        gain = 1.0
        if fam in SANDWICH:
            norm = block.post_attention_layernorm
            o = cache["z", layer].flatten(-2) @ w_o
            offset = 0.0 if fam == "olmo2" else 1.0
            eps = ref.model.config.rms_norm_eps
            gain = (offset + norm.weight) / (o.pow(2).mean(-1, keepdim=True) + eps).sqrt()
        d = a.d_head
        for h in range(a.n_heads):
            z_h = cache["z", layer][:, :, h]
            close(result[:, :, h], (z_h @ w_o[h * d : (h + 1) * d]) * gain, f"head {layer}.{h}")
    fresh = ActivationCache({k: v for k, v in cache.items() if "result" not in k}, a)
    fresh.compute_head_results()  # the same numbers from hook_z alone
    for layer in range(a.n_layers):
        close(fresh["result", layer], cache["result", layer], f"computed result {layer}")


def test_attributions_add_up_to_the_logit(ref: Ref):
    a = ref.adapter
    L, T = a.n_layers, ref.ids.shape[1]
    _, cache = a.run_with_cache(ref.ids)
    want = pre_cap(ref)[0, -1]  # [V]
    good, bad = 7, 11
    resid, labels = cache.decompose_resid(pos_slice=-1, return_labels=True)
    n_embed = 2 if ref.family == "gpt2" else 1
    assert labels[:n_embed] == ["embed", "pos_embed"][:n_embed]
    assert labels[n_embed:] == [f"{i}_{k}_out" for i in range(L) for k in ("attn", "mlp")]
    close(resid.sum(0), cache["resid_post", -1][:, -1], "components sum to the residual")
    attrs = cache.logit_attrs(resid, good, pos_slice=-1)  # [components, batch]
    assert attrs.shape == (len(labels), 1)
    close(attrs.sum(0) + cache.logit_bias(good), want[good : good + 1], "logit")
    diff = cache.logit_attrs(resid, torch.tensor([good]), torch.tensor([bad]), pos_slice=-1)
    close(diff.sum(0) + cache.logit_bias(good, bad), (want[good] - want[bad])[None], "diff")
    heads, head_labels = cache.stack_head_results(
        pos_slice=-1, incl_remainder=True, return_labels=True
    )
    assert head_labels[:2] == ["L0H0", "L0H1"] and head_labels[-1] == "remainder"
    close(
        cache.logit_attrs(heads, good, pos_slice=-1).sum(0) + cache.logit_bias(good),
        want[good : good + 1],
        "heads + remainder",
    )
    # every position at once, tokens [batch, pos]
    targets = torch.randint(0, a.d_vocab, (1, T), generator=torch.Generator().manual_seed(0))
    per_pos = cache.logit_attrs(cache.decompose_resid(), targets).sum(0) + cache.logit_bias(targets)
    close(per_pos, pre_cap(ref).gather(-1, targets[..., None])[..., 0], "per position")
    # the logit lens: the final norm on each accumulated residual, the last one the model's
    acc, acc_labels = cache.accumulated_resid(apply_ln=True, return_labels=True)
    assert acc_labels == [f"{i}_pre" for i in range(L)] + ["final_post"]
    w_u, b_u, _ = a.unembedding()
    lens = acc[-1] @ w_u.T + (b_u if b_u is not None else 0)
    close(lens[0], pre_cap(ref)[0], "accumulated_resid(apply_ln=True)[-1] @ W_U")
    # a block's own norm, frozen: the components through it add up to its normalised input
    if ref.family == "olmo2":  # no norm before attention or the MLP
        return
    block = hf_layers(ref.family, ref.model)[1]
    ln = (block.ln_1, block.ln_2) if ref.family == "gpt2" else None
    if ref.family.startswith("neox"):
        ln = (block.input_layernorm, block.post_attention_layernorm)
    for mlp_in, name in ((False, "ln1"), (True, "ln2")):
        normed = cache.decompose_resid(layer=1, mlp_input=mlp_in, apply_ln=True).sum(0)
        bias = ln[mlp_in].bias if ln is not None else 0
        want_in = cache[f"blocks.1.{name}.hook_normalized"]
        close(normed + bias, want_in, f"{name} frozen")


def hand_forward(model, family, ids, layer, pre_hook):
    """Logits with a plain torch forward-pre hook on layer ``layer``'s output projection."""
    attn = hf_attn(family, hf_layers(family, model)[layer])
    handle = o_proj(family, attn).register_forward_pre_hook(pre_hook)
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        handle.remove()


def test_run_with_hooks_zero_ablation_equals_a_hand_hook(ref: Ref):
    a, fam = ref.adapter, ref.family
    layer, head, d = 1, 2, a.d_head

    def zero_head(z, hook):
        assert hook.name == f"blocks.{layer}.attn.hook_z" and hook.layer() == layer
        z[:, :, head] = 0.0
        return z

    got = a.run_with_hooks(ref.ids, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", zero_head)])

    def hand(_m, args):
        x = args[0].clone()
        x[..., head * d : (head + 1) * d] = 0.0
        return (x,)

    want = hand_forward(ref.model, fam, ref.ids, layer, hand)
    close(got, want, "zero-ablated head")
    assert (got - ref.logits).abs().max() > 1e-4, "ablating the head changes the logits"

    # in place, returning None: the same
    def in_place(z, hook):
        z[:, :, head] = 0.0

    close(
        a.run_with_hooks(ref.ids, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", in_place)]),
        want,
        "in place",
    )
    # a name filter over every layer's z, identity hooks: the model's logits
    names = []
    out = a.run_with_hooks(
        ref.ids,
        fwd_hooks=[(lambda n: n.endswith("hook_z"), lambda z, hook: names.append(hook.name))],
    )
    assert names == [f"blocks.{i}.attn.hook_z" for i in range(a.n_layers)]
    close(out, ref.logits, "identity hooks")
    close(a(ref.ids), ref.logits, "adapter(tokens)")


def test_residual_and_score_hooks_equal_hand_edits(ref: Ref):
    a, model, fam = ref.adapter, ref.model, ref.family
    delta = torch.randn(a.d_model, generator=torch.Generator().manual_seed(1))
    got = a.run_with_hooks(
        ref.ids, fwd_hooks=[("blocks.1.hook_resid_pre", lambda x, hook: x + delta)]
    )
    block = hf_layers(fam, model)[1]

    def add(_m, args, kwargs):
        if args:
            return (args[0] + delta, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + delta}

    handle = block.register_forward_pre_hook(add, with_kwargs=True)
    try:
        with torch.no_grad():
            want = model(ref.ids).logits
    finally:
        handle.remove()
    close(got, want, "resid_pre + delta")

    # masking key 0 in the scores renormalises the pattern over the other keys
    def mask_first(scores, hook):
        scores[..., 1:, 0] = float("-inf")  # row 0 sees only key 0: keep it
        return scores

    _, cache = a.run_with_cache(
        ref.ids,
        names_filter="blocks.0.attn.hook_pattern",
        fwd_hooks=[("blocks.0.attn.hook_attn_scores", mask_first)],
    )
    p = ref.attentions[0][..., 1:, :]  # rows that see more than key 0
    expected = p[..., 1:] / (1 - p[..., :1])
    close(cache["pattern", 0][..., 1:, 1:], expected, "renormalised pattern")


def test_names_filter_forms_and_short_keys(ref: Ref):
    a = ref.adapter
    _, one = a.run_with_cache(ref.ids, names_filter="blocks.0.hook_resid_pre")
    assert list(one) == ["blocks.0.hook_resid_pre"]
    _, some = a.run_with_cache(ref.ids, names_filter=["blocks.2.attn.hook_pattern", "hook_embed"])
    assert list(some) == ["hook_embed", "blocks.2.attn.hook_pattern"]  # forward order
    close(some["pattern", -1], ref.attentions[2], "cache['pattern', -1]")
    close(some["attn", 2], ref.attentions[2], "TL alias 'attn' for the pattern")
    with pytest.raises(KeyError, match=re.escape("'blocks.2.hook_resid_pre' is not in this cache")):
        some["resid_pre", 2]
    _, cache = a.run_with_cache(ref.ids, names_filter=lambda n: n.startswith("blocks.1.mlp"))
    assert all(n.startswith("blocks.1.mlp.hook_") for n in cache) and len(cache) >= 2
    if ref.family in ("llama_gqa", "gpt2"):
        _, nb = a.run_with_cache(
            ref.ids, names_filter="blocks.0.hook_resid_pre", remove_batch_dim=True
        )
        assert nb["resid_pre", 0].shape == (ref.ids.shape[1], a.d_model)


def test_only_the_requested_hooks_run():
    """A cache of residuals leaves attention alone: its implementation is never switched."""
    model = tiny_model("llama_gqa")
    a = oculi.attach(model)
    seen = []
    attn = model.model.layers[0].self_attn
    handle = attn.register_forward_hook(lambda *_: seen.append(model.config._attn_implementation))
    try:
        a.run_with_cache(
            prompt_ids()[None], names_filter=["blocks.0.hook_resid_pre", "blocks.2.hook_mlp_out"]
        )
        a.run_with_cache(prompt_ids()[None], names_filter="blocks.0.attn.hook_pattern")
    finally:
        handle.remove()
    assert seen == ["sdpa", "oculi"]
    assert model.config._attn_implementation == "sdpa"


def test_hooks_are_removed_when_a_hook_function_raises():
    model = tiny_model("gemma3")
    a = oculi.attach(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    counts = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]

    def boom(x, hook):
        raise RuntimeError("boom in " + hook.name)

    for name in (
        "blocks.1.attn.hook_z",
        "blocks.0.hook_resid_pre",
        "blocks.2.attn.hook_attn_scores",
        "ln_final.hook_normalized",
    ):
        with pytest.raises(RuntimeError, match="boom in " + re.escape(name)):
            a.run_with_cache(prompt_ids()[None], fwd_hooks=[(name, boom)])
    assert counts == [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    assert model.config._attn_implementation == "sdpa"
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        close(a(prompt_ids()[None]), model(prompt_ids()[None]).logits, "the model after")


def test_bad_hooks_and_names_say_what_is_wrong():
    a = oculi.attach(tiny_model("gpt2"))
    ids = prompt_ids()[None]
    with pytest.raises(
        UnknownSiteError, match=re.escape("did you mean 'blocks.0.attn.hook_pattern'")
    ):
        a.run_with_cache(ids, names_filter="blocks.0.attn.hook_patern")
    with pytest.raises(
        IndexError, match=re.escape("layer 7 out of range for a model with 3 layers (0..2)")
    ):
        a.run_with_hooks(ids, fwd_hooks=[("blocks.7.hook_resid_pre", lambda x, hook: x)])
    with pytest.raises(UnknownSiteError, match="hook_rot_q"):  # GPT-2 has no rotary
        a.run_with_cache(ids, names_filter="blocks.0.attn.hook_rot_q")
    with pytest.raises(ValueError, match=re.escape("write 'blocks.1.attn.hook_z'")):
        a.run_with_hooks(ids, fwd_hooks=[("blocks.1.attn.hook_result", lambda x, hook: x)])
    with pytest.raises(ValueError, match="cannot be written"):
        a.run_with_hooks(ids, fwd_hooks=[("ln_final.hook_scale", lambda x, hook: x)])
    with pytest.raises(ValueError, match=re.escape("returned shape [1, 11]")):
        a.run_with_hooks(ids, fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: x[..., 0])])
    with pytest.raises(TypeError, match=re.escape("fwd_hooks takes (name, function) pairs")):
        a.run_with_hooks(ids, fwd_hooks=["blocks.0.hook_resid_pre"])
    with pytest.raises(InputError, match="incl_bwd=True is not supported"):
        a.run_with_cache(ids, incl_bwd=True)
    _, plain = a.run_with_cache(ids, "hook_embed", return_cache_object=False, device="cpu")
    assert isinstance(plain, dict) and list(plain) == ["hook_embed"]
    with pytest.raises(InputError, match="bwd_hooks are not supported"):
        a.run_with_hooks(ids, bwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: x)])
    _, cache = a.run_with_cache(ids, names_filter="blocks.0.hook_resid_pre")
    with pytest.raises(IndexError, match=re.escape("layer -4 out of range for a model with 3")):
        cache["resid_pre", -4]
    with pytest.raises(
        KeyError, match=re.escape("needs ['blocks.2.hook_resid_post', 'ln_final.hook_normalized']")
    ):
        cache.logit_attrs(cache["resid_pre", 0][None], 3)


def test_get_act_name_follows_transformer_lens():
    assert get_act_name("pattern", 3) == "blocks.3.attn.hook_pattern"
    assert get_act_name("resid_pre", 0) == "blocks.0.hook_resid_pre"
    assert get_act_name("normalized", 2, "ln2") == "blocks.2.ln2.hook_normalized"
    assert get_act_name("scale") == "ln_final.hook_scale"
    assert get_act_name("z5") == "blocks.5.attn.hook_z"
    assert get_act_name("scale4ln1") == "blocks.4.ln1.hook_scale"
    assert get_act_name("embed") == "hook_embed"
    assert get_act_name("blocks.1.hook_mlp_out") == "blocks.1.hook_mlp_out"
    assert get_act_name("mlp_post", 1) == "blocks.1.mlp.hook_post"


def test_tokens_the_transformer_lens_way():
    a = oculi.attach(tiny_model("llama_gqa"), tiny_tokenizer())
    tok = tiny_tokenizer()
    plain = tok(PROMPT)["input_ids"]
    assert a.to_tokens(PROMPT).tolist() == [plain]  # as oculi's captures tokenise
    no_bos = tok(PROMPT, add_special_tokens=False)["input_ids"]
    assert a.to_tokens(PROMPT, prepend_bos=False).tolist() == [no_bos]
    assert a.to_tokens(PROMPT, prepend_bos=True).tolist() == [[tok.bos_token_id, *no_bos]]
    both = a.to_tokens([PROMPT, "the cat"], padding_side="left")
    assert both.shape == (2, len(plain)) and both[1, -3:].tolist() == tok("the cat")["input_ids"]
    assert a.to_str_tokens(PROMPT)[1:] == [tok.decode([i]) for i in no_bos]
    assert a.to_str_tokens(a.to_tokens(PROMPT)) == a.to_str_tokens(PROMPT)
    assert a.to_string(torch.tensor(no_bos)) == tok.decode(no_bos)
    assert a.cfg.n_layers == 3 and a.cfg.n_heads == 4 and a.cfg.n_key_value_heads == 2
    assert a.cfg.d_vocab == 96 and a.cfg.normalization_type == "RMS"
    logits, cache = a.run_with_cache(PROMPT, names_filter="blocks.0.hook_resid_pre")
    with torch.no_grad():
        close(logits, a.model(torch.tensor([plain])).logits, "run_with_cache(str)")
    loss = a(PROMPT, return_type="loss")
    with torch.no_grad():
        want = a.model(torch.tensor([plain]), labels=torch.tensor([plain])).loss
    close(loss, want, "loss")


# -- TransformerLens itself (the `compare` extra) --------------------------------------------
def _tl_twin(family: str, model, fold_ln: bool):
    """A TransformerLens model with ``model``'s weights, built offline from its config."""
    tl = pytest.importorskip("transformer_lens")
    from transformer_lens.pretrained import weight_conversions as conv

    c = model.config
    if family == "gpt2":
        cfg = tl.HookedTransformerConfig(
            n_layers=c.n_layer, d_model=c.n_embd, n_ctx=c.n_positions,
            d_head=c.n_embd // c.n_head, n_heads=c.n_head, d_mlp=c.n_inner,
            d_vocab=c.vocab_size, act_fn=c.activation_function, normalization_type="LN",
            positional_embedding_type="standard", eps=c.layer_norm_epsilon,
            default_prepend_bos=False,
        )  # fmt: skip
        state = conv.convert_gpt2_weights(model, cfg)
    else:  # llama_gqa
        d_head = c.hidden_size // c.num_attention_heads
        cfg = tl.HookedTransformerConfig(
            n_layers=c.num_hidden_layers, d_model=c.hidden_size, n_ctx=64, d_head=d_head,
            n_heads=c.num_attention_heads, n_key_value_heads=c.num_key_value_heads,
            d_mlp=c.intermediate_size, d_vocab=c.vocab_size, act_fn="silu",
            normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=d_head,
            rotary_base=c.rope_parameters["rope_theta"], gated_mlp=True, final_rms=True,
            eps=c.rms_norm_eps, default_prepend_bos=False, rotary_adjacent_pairs=False,
        )  # fmt: skip
        state = conv.convert_llama_weights(model, cfg)
    ht = tl.HookedTransformer(cfg)
    ht.load_and_process_state_dict(
        state, fold_ln=fold_ln, center_writing_weights=False, center_unembed=False,
        fold_value_biases=False,
    )  # fmt: skip
    ht.set_use_attn_result(True)
    return ht.eval()


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa"])
def test_numbers_equal_transformer_lens(family):
    """GPT-2 (LayerNorm, learned positions) and Llama with GQA (RMSNorm, rotary)."""
    model = tiny_model(family)
    ht = _tl_twin(family, model, fold_ln=False)
    a = oculi.attach(model)
    ids = prompt_ids()[None]
    with torch.no_grad():
        tl_logits, tl_cache = ht.run_with_cache(ids)
    logits, cache = a.run_with_cache(ids, names_filter=lambda n: True)
    close(logits, tl_logits, "logits vs TransformerLens")
    compared = 0
    for name, value in cache.items():
        # TransformerLens's hook_normalized is before the norm's weight and bias (it folds
        # them into the next weights); oculi's is the norm's output, what the next layer reads
        if name in tl_cache.cache_dict and not name.endswith("hook_normalized"):
            close(value, tl_cache[name], name)
            compared += 1
    assert compared >= 50
    close(cache.decompose_resid(pos_slice=-1), tl_cache.decompose_resid(pos_slice=-1), "decompose")
    close(cache.accumulated_resid(apply_ln=True), tl_cache.accumulated_resid(apply_ln=True), "lens")
    close(cache.stack_head_results(), tl_cache.stack_head_results(), "heads")
    # TransformerLens's attributions assume fold_ln: compare with a folded twin
    folded = _tl_twin(family, model, fold_ln=True)
    with torch.no_grad():
        _, fold_cache = folded.run_with_cache(ids)
    resid = cache.decompose_resid(pos_slice=-1)
    tl_attrs = fold_cache.logit_attrs(fold_cache.decompose_resid(pos_slice=-1), 5, pos_slice=-1)
    close(cache.logit_attrs(resid, 5, pos_slice=-1), tl_attrs, "logit_attrs vs folded TL")
    close(cache.logit_bias(5), folded.b_U[5], "logit_bias == folded b_U")


def test_a_padded_batch_gives_each_row_its_own_numbers():
    a = oculi.attach(tiny_model("gemma3"), tiny_tokenizer())
    short = "the cat sat"
    logits, cache = a.run_with_cache([short, PROMPT])  # left-padded, as the tokenizer pads
    _, alone = a.run_with_cache(short)
    n = alone["resid_pre", 1].shape[1]
    close(cache["resid_pre", 1][0, -n:], alone["resid_pre", 1][0], "padded row")
    close(cache["pattern", 2][0, :, -n:, -n:], alone["pattern", 2][0], "padded row's pattern")
    targets = torch.tensor([5, 9])  # one token per row, at each row's last position
    attrs = cache.logit_attrs(cache.decompose_resid(pos_slice=-1), targets, pos_slice=-1)
    want = logits[:, -1].gather(-1, targets[:, None])[:, 0]
    close(attrs.sum(0) + cache.logit_bias(targets), want, "per-row attributions")


def test_hooks_block_applies_to_every_forward_and_generation():
    model, tok = tiny_model("llama_gqa"), tiny_tokenizer()
    a = oculi.attach(model, tok)
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    head, d = 1, a.d_head

    def zero_head(z, hook):
        z[:, :, head] = 0.0

    def hand(_m, args):
        x = args[0].clone()
        x[..., head * d : (head + 1) * d] = 0.0
        return (x,)

    handle = model.model.layers[2].self_attn.o_proj.register_forward_pre_hook(hand)
    try:
        with torch.no_grad():
            want_logits = model(ids).logits
            want_ids = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    finally:
        handle.remove()
    with a.hooks(fwd_hooks=[("blocks.2.attn.hook_z", zero_head)]):
        close(a(ids), want_logits, "adapter(tokens) inside hooks()")
        _, cache = a.run_with_cache(ids, names_filter="blocks.2.attn.hook_z")
        assert not cache["z", 2][:, :, head].any()  # the cache records the hooked model
        text = a.generate(PROMPT, max_new_tokens=4)
    assert text == tok.decode(want_ids[0, ids.shape[1] :], skip_special_tokens=True)
    with torch.no_grad():
        close(a(ids), model(ids).logits, "after the block")
