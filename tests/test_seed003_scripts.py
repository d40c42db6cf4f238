"""Seed 003's three scripts, written against TransformerLens's API, run on Gemma 3 270M.

Seed 003 describes a TransformerLens example suite: an attention notebook (patterns, induction
and previous-token heads, attention statistics) and ``activation_patching.py``, which runs
``run_patching_experiment(model, clean_prompt, corrupted_prompt, correct_answer,
incorrect_answer)`` on IOI and on factual recall (every head's ``hook_z`` and every layer's
``hook_mlp_out`` patched from the clean run into the corrupted one, scored as recovery of the
logit difference), plus direct effects of components. The code below is that suite in
TransformerLens's idiom; the only line that differs from a TransformerLens script is the
model line (``model = gemma`` for ``HookedTransformer.from_pretrained("gpt2-small")``).

The numbers it produces are checked against references that do not go through oculi: the
Hugging Face model's own logits and ``output_attentions``, and patching done with plain
``register_forward_hook`` hooks on the Hugging Face modules.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

from test_tl_compat import recording

pytestmark = pytest.mark.gemma

ATOL = 2e-3  # fp32 logits of a 262k-vocabulary model, eager vs sdpa attention


# ======================= the seed's scripts (TransformerLens API) ===========================
def attention_notebook(model):
    """``attention_visualization.ipynb``: patterns, induction heads, statistics."""
    text = "The cat sat on the mat. The dog sat on the rug. The cat sat on the"
    tokens = model.to_tokens(text)
    str_tokens = model.to_str_tokens(text)
    logits, cache = model.run_with_cache(tokens, remove_batch_dim=True)
    layer = 2
    attention_pattern = cache["pattern", layer]  # [head, query_pos, key_pos]

    # Induction heads: on a repeated random sequence, attend to the token after the
    # previous occurrence of the current token
    seq_len = 40
    torch.manual_seed(0)
    random_tokens = torch.randint(1000, 10000, (1, seq_len))
    bos = torch.tensor([[model.tokenizer.bos_token_id]])
    repeated_tokens = torch.cat([bos, random_tokens, random_tokens], dim=1)
    _, rep_cache = model.run_with_cache(
        repeated_tokens, names_filter=lambda name: name.endswith("hook_pattern")
    )
    induction_scores = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)
    prev_token_scores = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)
    for layer in range(model.cfg.n_layers):
        pattern = rep_cache["pattern", layer]  # [batch, head, query_pos, key_pos]
        stripe = pattern.diagonal(offset=1 - seq_len, dim1=-2, dim2=-1)
        induction_scores[layer] = stripe.mean(dim=(0, -1))
        prev_token_scores[layer] = pattern.diagonal(offset=-1, dim1=-2, dim2=-1).mean(dim=(0, -1))
    top = torch.topk(induction_scores.flatten(), 5)
    top_induction = [(int(i) // model.cfg.n_heads, int(i) % model.cfg.n_heads) for i in top.indices]

    # Statistics of one layer's heads on the text
    entropy = -(attention_pattern * torch.log(attention_pattern + 1e-10)).sum(-1).mean(-1)
    max_attention = attention_pattern.max(dim=-1).values.mean(-1)
    positions = torch.arange(attention_pattern.shape[-1])
    distance = (positions[:, None] - positions[None, :]).clamp(min=0).float()
    mean_distance = (attention_pattern * distance).sum(-1).mean(-1)
    return dict(
        str_tokens=str_tokens,
        logits=logits,
        attention_pattern=attention_pattern,
        repeated_tokens=repeated_tokens,
        induction_scores=induction_scores,
        prev_token_scores=prev_token_scores,
        top_induction=top_induction,
        entropy=entropy,
        max_attention=max_attention,
        mean_distance=mean_distance,
    )


def run_patching_experiment(
    model, clean_prompt, corrupted_prompt, correct_answer, incorrect_answer
):
    """``activation_patching.py``: recovery of the logit difference per head and per MLP."""
    clean_tokens = model.to_tokens(clean_prompt)
    corrupted_tokens = model.to_tokens(corrupted_prompt)
    assert clean_tokens.shape == corrupted_tokens.shape, "prompts must have the same length"
    correct_token = model.to_single_token(correct_answer)
    incorrect_token = model.to_single_token(incorrect_answer)

    def logit_diff(logits):
        return (logits[0, -1, correct_token] - logits[0, -1, incorrect_token]).item()

    clean_logits, clean_cache = model.run_with_cache(clean_tokens)
    corrupted_logits = model(corrupted_tokens)
    clean_diff, corrupted_diff = logit_diff(clean_logits), logit_diff(corrupted_logits)

    def patch_head(z, hook, head):
        z[:, :, head, :] = clean_cache[hook.name][:, :, head, :]
        return z

    def patch_mlp(mlp_out, hook):
        return clean_cache[hook.name]

    head_results = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)
    mlp_results = torch.zeros(model.cfg.n_layers)
    for layer in range(model.cfg.n_layers):
        for head in range(model.cfg.n_heads):
            patched = model.run_with_hooks(
                corrupted_tokens,
                fwd_hooks=[(f"blocks.{layer}.attn.hook_z", partial(patch_head, head=head))],
            )
            head_results[layer, head] = (logit_diff(patched) - corrupted_diff) / (
                clean_diff - corrupted_diff
            )
        patched = model.run_with_hooks(
            corrupted_tokens, fwd_hooks=[(f"blocks.{layer}.hook_mlp_out", patch_mlp)]
        )
        mlp_results[layer] = (logit_diff(patched) - corrupted_diff) / (clean_diff - corrupted_diff)

    top = torch.topk(head_results.flatten(), 5)
    top_heads = [(int(i) // model.cfg.n_heads, int(i) % model.cfg.n_heads) for i in top.indices]

    # Direct effects: each component's share of the clean logit difference
    resid, labels = clean_cache.decompose_resid(pos_slice=-1, return_labels=True)
    direct = clean_cache.logit_attrs(resid, correct_token, incorrect_token, pos_slice=-1)
    heads = clean_cache.stack_head_results(pos_slice=-1)
    head_direct = clean_cache.logit_attrs(heads, correct_token, incorrect_token, pos_slice=-1)
    return dict(
        clean_tokens=clean_tokens,
        corrupted_tokens=corrupted_tokens,
        tokens=(correct_token, incorrect_token),
        clean_diff=clean_diff,
        corrupted_diff=corrupted_diff,
        head_results=head_results,
        mlp_results=mlp_results,
        top_heads=top_heads,
        direct=direct[:, 0],
        labels=labels,
        head_direct=head_direct[:, 0].reshape(model.cfg.n_layers, model.cfg.n_heads),
        clean_cache=clean_cache,
    )


IOI = (
    "When Mary and John went to the store, Mary gave a drink to",
    "When John and Mary went to the store, John gave a drink to",
    " John",
    " Mary",
)
FACTUAL = (
    "The Eiffel Tower is located in the city of",
    "The Colosseum is located in the city of",
    " Paris",
    " Rome",
)


# ======================= independent references (plain torch) ==============================
def hf_last_logits(model, ids, hooks=()):
    """Logits at the last position from a plain forward, with ``(module, kind, fn)`` hooks."""
    handles = []
    try:
        for module, kind, fn in hooks:
            register = (
                module.register_forward_pre_hook if kind == "pre" else module.register_forward_hook
            )
            handles.append(register(fn))
        with torch.no_grad():
            hidden = model.model(ids).last_hidden_state[:, -1]
            return model.lm_head(hidden)[0].double()
    finally:
        for h in handles:
            h.remove()


def recorded(model, ids, modules):
    """``{name: (input, output)}`` of ``modules`` in one plain forward."""
    with torch.no_grad(), recording(modules) as seen:
        model(ids)
    return seen


def check_patching(gemma, out, layers_heads):
    """Recompute recoveries with plain hooks on Gemma's modules and compare."""
    model = gemma.model
    clean, corrupt = out["clean_tokens"], out["corrupted_tokens"]
    good, bad = out["tokens"]
    blocks = model.model.layers
    modules = {f"o{i}": b.self_attn.o_proj for i, b in enumerate(blocks)}
    modules |= {f"mlp{i}": b.post_feedforward_layernorm for i, b in enumerate(blocks)}
    seen = recorded(model, clean, modules)

    def diff(logits):
        return float(logits[good] - logits[bad])

    clean_diff = diff(hf_last_logits(model, clean))
    corrupt_diff = diff(hf_last_logits(model, corrupt))
    assert out["clean_diff"] == pytest.approx(clean_diff, abs=ATOL)
    assert out["corrupted_diff"] == pytest.approx(corrupt_diff, abs=ATOL)
    d = gemma.d_head

    def recovery(logits):
        return (diff(logits) - corrupt_diff) / (clean_diff - corrupt_diff)

    for layer, head in layers_heads:
        clean_z = seen[f"o{layer}"][0]

        def patch(_m, args, layer=layer, head=head, clean_z=clean_z):
            x = args[0].clone()
            x[..., head * d : (head + 1) * d] = clean_z[..., head * d : (head + 1) * d]
            return (x,)

        want = recovery(
            hf_last_logits(model, corrupt, [(blocks[layer].self_attn.o_proj, "pre", patch)])
        )
        assert float(out["head_results"][layer, head]) == pytest.approx(want, abs=1e-3), (
            layer,
            head,
        )
    for layer in range(gemma.n_layers):
        clean_mlp = seen[f"mlp{layer}"][1]
        hook = (blocks[layer].post_feedforward_layernorm, "post", lambda *_a, v=clean_mlp: v)
        want = recovery(hf_last_logits(model, corrupt, [hook]))
        assert float(out["mlp_results"][layer]) == pytest.approx(want, abs=1e-3), layer
    return clean_diff, seen


def check_direct_effects(gemma, out, clean_diff, seen):
    """Direct effects add up to the clean logit difference; heads add up to attention."""
    cache = out["clean_cache"]
    assert out["labels"][0] == "embed" and out["labels"][-1] == f"{gemma.n_layers - 1}_mlp_out"
    assert float(out["direct"].sum()) == pytest.approx(clean_diff, abs=ATOL)
    attn_direct = out["direct"][1::2]  # embed, then (attn_out, mlp_out) per layer
    torch.testing.assert_close(out["head_direct"].sum(-1), attn_direct, atol=1e-3, rtol=1e-4)
    # Gemma 3 normalises attention's output before it joins the residual: the heads' writes
    # oculi reports add up to it (the hand hook's post-norm output); TransformerLens's
    # pre-norm z_h W_O,h do not
    for layer in (0, gemma.n_layers - 1):
        attn_out = recorded_attn_out(gemma, out["clean_tokens"], layer)
        torch.testing.assert_close(cache["result", layer].sum(2), attn_out, atol=1e-3, rtol=1e-4)
        w_o = gemma.model.model.layers[layer].self_attn.o_proj.weight.T  # [H*D, d]
        pre_norm = seen[f"o{layer}"][0] @ w_o  # what TL's heads would sum to
        assert (pre_norm - attn_out).abs().max() > 1.0


def recorded_attn_out(gemma, ids, layer):
    norm = gemma.model.model.layers[layer].post_attention_layernorm
    return recorded(gemma.model, ids, {"n": norm})["n"][1]


# ======================= the tests =========================================================
def test_attention_notebook(gemma):
    model = gemma  # seed: HookedTransformer.from_pretrained("gpt2-small")
    out = attention_notebook(model)
    hf = gemma.model
    text_ids = gemma.to_tokens("The cat sat on the mat. The dog sat on the rug. The cat sat on the")
    with torch.no_grad():
        logits = hf(text_ids).logits
        original = hf.config._attn_implementation
        hf.set_attn_implementation("eager")
        try:
            text_att = hf(text_ids, output_attentions=True).attentions
            rep_att = hf(out["repeated_tokens"], output_attentions=True).attentions
        finally:
            hf.set_attn_implementation(original)
    assert out["str_tokens"][:3] == ["<bos>", "The", " cat"]
    torch.testing.assert_close(out["logits"], logits, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(out["attention_pattern"], text_att[2][0], atol=1e-5, rtol=1e-4)
    seq_len = 40
    for layer in range(gemma.n_layers):
        p = rep_att[layer][0]  # [H, T, T]
        want = p.diagonal(offset=1 - seq_len, dim1=-2, dim2=-1).mean(-1)
        torch.testing.assert_close(out["induction_scores"][layer], want, atol=1e-5, rtol=1e-4)
        want = p.diagonal(offset=-1, dim1=-2, dim2=-1).mean(-1)
        torch.testing.assert_close(out["prev_token_scores"][layer], want, atol=1e-5, rtol=1e-4)
    # Gemma 3 270M has induction heads: the best one puts most of its attention on the stripe
    assert float(out["induction_scores"].max()) > 0.3
    p = text_att[2][0]
    want_entropy = -(p * torch.log(p + 1e-10)).sum(-1).mean(-1)
    torch.testing.assert_close(out["entropy"], want_entropy, atol=1e-4, rtol=1e-4)


def test_ioi_patching(gemma):
    model = gemma  # seed: HookedTransformer.from_pretrained("gpt2-small")
    out = run_patching_experiment(model, *IOI)
    # the model prefers the indirect object in the clean prompt, the other name when swapped
    assert out["clean_diff"] > 1.0 and out["corrupted_diff"] < -1.0
    gen = torch.Generator().manual_seed(0)
    some = [
        tuple(map(int, divmod(int(i), gemma.n_heads)))
        for i in torch.randperm(72, generator=gen)[:4]
    ]
    clean_diff, seen = check_patching(gemma, out, out["top_heads"][:4] + some)
    check_direct_effects(gemma, out, clean_diff, seen)


def test_factual_recall_patching(gemma):
    model = gemma  # seed: HookedTransformer.from_pretrained("gpt2-small")
    out = run_patching_experiment(model, *FACTUAL)
    assert out["clean_diff"] > 1.0 and out["corrupted_diff"] < -1.0  # Paris, then Rome
    clean_diff, seen = check_patching(gemma, out, out["top_heads"][:4])
    check_direct_effects(gemma, out, clean_diff, seen)


def test_migrating_tl_script_runs_and_adds_up(gemma):
    """The TransformerLens script of docs/migrating.md, with the model line as in the tests."""
    import pathlib

    page = (pathlib.Path(__file__).parents[1] / "docs" / "migrating.md").read_text()
    block = page.split("## A TransformerLens script, unchanged", 1)[1].split("```python\n", 1)[1]
    code = block.split("```", 1)[0].replace("model = oculi.load()", "model = gemma")
    scope = {"gemma": gemma}
    exec(compile(code, "docs/migrating.md", "exec"), scope)
    tokens, cache = scope["tokens"], scope["cache"]
    with torch.no_grad():
        logits = gemma.model(tokens).logits[0, -1].double()
    john, mary = gemma.to_single_token(" John"), gemma.to_single_token(" Mary")
    attrs = cache.logit_attrs(scope["resid"], " John", " Mary", pos_slice=-1)
    assert float(attrs.sum()) == pytest.approx(float(logits[john] - logits[mary]), abs=ATOL)
