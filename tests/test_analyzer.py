"""``oculi.ModelAnalyzer`` (seed 002) on tiny random models and on Gemma 3 270M.

References: the Hugging Face model's own hidden states, logits and generation, hand-written
hooks, numpy's SVD; never the analyzer's own numbers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import oculi
from models import tiny_model, tiny_tokenizer
from oculi.analysis import AttributionMethods
from oculi.analyzer import (
    ActivationRecord,
    ModelAnalyzer,
    compare_activations,
    get_activation_statistics,
)
from oculi.capture import ResidualConfig
from oculi.errors import CaptureFileError, InputError

PROMPT = "the cat sat on the"
POST = ResidualConfig(capture_pre_attn=False, capture_post_attn=False, capture_pre_mlp=False)


def analyzer_for(family: str = "llama_gqa") -> ModelAnalyzer:
    return ModelAnalyzer(adapter=oculi.attach(tiny_model(family), tiny_tokenizer()))


def ids(text: str) -> torch.Tensor:
    return tiny_tokenizer()(text, return_tensors="pt")["input_ids"]


def n_hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("family", ["llama_gqa", "gemma3", "gpt2"])
def test_generate_records_what_a_capture_of_the_final_sequence_reads(family):
    an = analyzer_for(family)
    hooks = n_hooks(an.model)
    text, rec = an.generate(PROMPT, max_new_tokens=6, return_activations=True)
    assert n_hooks(an.model) == hooks
    assert text == an.generate(PROMPT, max_new_tokens=6)  # recording changes nothing
    with torch.no_grad():
        full = an.model.generate(ids(PROMPT), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(rec.input_ids, full[0, :-1])  # every token fed: all but the last
    # a random model may generate ids past the tokenizer's vocabulary: read without it
    captured = oculi.attach(an.model).capture_residual(full[:, :-1], POST).post_mlp  # [L, T, d]
    torch.testing.assert_close(rec.residual(), captured, atol=2e-5, rtol=1e-4)
    assert list(rec.layer_activations) == an.get_layer_names()
    assert rec.generated_text == text[len(PROMPT) :]


def test_generate_removes_its_hooks_on_errors():
    an = analyzer_for()
    hooks = n_hooks(an.model)
    with pytest.raises(InputError, match="context"):
        an.generate(PROMPT, max_new_tokens=500, return_activations=True)
    assert n_hooks(an.model) == hooks


def test_extract_activations_are_the_models_hidden_states():
    an = analyzer_for()
    rec = an.extract_activations(PROMPT, include_attention=True, return_logits=True)
    with torch.no_grad():
        out = an.model(ids(PROMPT), output_hidden_states=True)
    n = an.get_num_layers()
    for i, name in enumerate(an.get_layer_names()[: n - 1]):  # the last entry is normalised
        torch.testing.assert_close(rec.layer_activations[name], out.hidden_states[i + 1][0])
    torch.testing.assert_close(rec.logits, out.logits[0])
    assert rec.tokens == tiny_tokenizer().convert_ids_to_tokens(ids(PROMPT)[0].tolist())
    pattern = rec.attentions[an.get_layer_names()[0]]
    assert pattern.shape == (4, 6, 6)
    torch.testing.assert_close(pattern.sum(-1), torch.ones(4, 6))


def test_batch_extraction_equals_one_prompt_at_a_time():
    an = analyzer_for()
    prompts = [PROMPT, "a dog", "the king and the queen went to the river"]
    batch = an.extract_batch_activations(prompts, include_attention=True, batch_size=2)
    for prompt, rec in zip(prompts, batch):
        one = an.extract_activations(prompt, include_attention=True)
        assert rec.tokens == one.tokens and rec.prompt == prompt
        for name in an.get_layer_names():
            torch.testing.assert_close(rec.layer_activations[name], one.layer_activations[name],
                                       atol=2e-5, rtol=1e-4)  # fmt: skip
            torch.testing.assert_close(rec.attentions[name], one.attentions[name],
                                       atol=2e-5, rtol=1e-4)  # fmt: skip


@pytest.mark.parametrize("suffix", [".safetensors", ".npz", ".pt"])
def test_save_and_load_round_trip(suffix, tmp_path):
    an = analyzer_for()
    recs = an.extract_batch_activations([PROMPT, "a dog"], return_logits=True)
    path = an.save_activations(recs, tmp_path / f"acts{suffix}")
    back = ModelAnalyzer.load_activations(path)
    assert isinstance(back, list) and len(back) == 2
    for a, b in zip(recs, back):
        assert a.tokens == b.tokens and a.prompt == b.prompt
        assert all(torch.equal(a.layer_activations[k], b.layer_activations[k])
                   for k in a.layer_activations)  # fmt: skip
        assert torch.equal(a.logits, b.logits) and torch.equal(a.input_ids, b.input_ids)
    one = an.save_activations(recs[0], tmp_path / f"one{suffix}")
    assert isinstance(ModelAnalyzer.load_activations(one), ActivationRecord)


def test_pickle_only_when_asked_and_bad_files_named(tmp_path):
    an = analyzer_for()
    rec = an.extract_activations(PROMPT)
    pkl = an.save_activations(rec, tmp_path / "acts.pkl")
    with pytest.raises(CaptureFileError, match=r"acts.pkl: is a pickle.*allow_pickle=True"):
        ModelAnalyzer.load_activations(pkl)
    back = ModelAnalyzer.load_activations(pkl, allow_pickle=True)
    assert torch.equal(back.residual(), rec.residual())
    default = an.save_activations(rec, tmp_path / "acts")  # no suffix: safetensors
    assert default.read_bytes()[8:9] == b"{"  # safetensors: 8-byte length, then JSON header
    meta = an.save_activations(rec, tmp_path / "acts.json")
    assert '"shapes"' in meta.read_text()
    with pytest.raises(CaptureFileError, match="only metadata"):
        ModelAnalyzer.load_activations(meta)
    good = an.save_activations(rec, tmp_path / "t.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:100])
    with pytest.raises(CaptureFileError, match=r"cut.safetensors: not a readable"):
        ModelAnalyzer.load_activations(cut)
    with pytest.raises(InputError, match="format 'xml' is not one of"):
        an.save_activations(rec, tmp_path / "a.x", format="xml")


def test_logit_lens_last_layer_is_the_models_prediction(capsys):
    an = analyzer_for()
    with torch.no_grad():
        probs = torch.softmax(an.model(ids(PROMPT)).logits[0, -1], -1)
    lens = an.logit_lens(PROMPT, top_k=3, layer_step=2)
    assert list(lens) == [0, 2]
    top = probs.topk(3)
    assert [t for t, _ in lens[2]] == [tiny_tokenizer().decode([int(i)]) for i in top.indices]
    assert [p for _, p in lens[2]] == pytest.approx(top.values.tolist(), rel=1e-5)
    an.print_logit_lens(PROMPT, layer_step=1, top_k=2)
    assert len(capsys.readouterr().out.splitlines()) == 1 + an.get_num_layers()


def test_input_preservation_against_the_models_logits():
    an = analyzer_for()
    out = an.input_preservation(PROMPT)
    with torch.no_grad():
        probs = torch.softmax(an.model(ids(PROMPT)).logits[0], -1)  # [T, V]
    own = probs.gather(-1, ids(PROMPT)[0][:, None])[:, 0]
    torch.testing.assert_close(out["probs"][-1], own, atol=1e-6, rtol=1e-5)
    assert out["probs"].shape == out["ranks"].shape == (3, 6)
    # the last layer against itself: zero up to fp32 reduction order (which changes with
    # the thread count), far below any KL the lens reports
    torch.testing.assert_close(out["kl_to_final"][-1], torch.zeros(6), atol=1e-6, rtol=0)


def hf_lens(an: ModelAnalyzer, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The logit lens from the Hugging Face model's own outputs, ``[L, T, V]``: layer ``l`` is
    ``lm_head(norm(hidden_states[l + 1]))`` (soft-capped where the family caps), the last
    layer the model's logits (its ``hidden_states[-1]`` is already normed); and the lens of
    the input embeddings ``hidden_states[0]``, ``[T, V]``."""
    model = an.model
    norm = model.model.norm if hasattr(model, "model") else model.transformer.ln_f
    cap = getattr(model.config, "final_logit_softcapping", None)

    def lens(h):
        logits = model.lm_head(norm(h))[0]
        return logits if cap is None else cap * torch.tanh(logits / cap)

    with torch.no_grad():
        out = model(ids(text), output_hidden_states=True)
        layers = [lens(h) for h in out.hidden_states[1:-1]]
        return torch.stack([*layers, out.logits[0]]).double(), lens(out.hidden_states[0]).double()


@pytest.mark.parametrize("family", ["llama_gqa", "gemma2", "gemma3", "gpt2"])
def test_layer_predictions_are_the_softmax_of_the_models_normed_hidden_states(family):
    an = analyzer_for(family)
    ref, _ = hf_lens(an, PROMPT)
    out = an.get_layer_predictions(PROMPT, layer_indices=[0, -2, 2], top_k=4)
    assert out["input_tokens"] == tiny_tokenizer().convert_ids_to_tokens(ids(PROMPT)[0].tolist())
    assert torch.equal(out["input_ids"], ids(PROMPT)[0]) and list(out["layers"]) == [0, 1, 2]
    for layer, preds in out["layers"].items():
        top = torch.softmax(ref[layer], -1).topk(4)  # [T, 4] at every position
        assert torch.equal(preds["top_k_indices"], top.indices)
        torch.testing.assert_close(preds["top_k_probs"].double(), top.values, atol=1e-6, rtol=1e-5)
        assert preds["top_k_tokens"][3] == [tiny_tokenizer().decode([int(i)])
                                            for i in top.indices[3]]  # fmt: skip
    lens = an.logit_lens(PROMPT, top_k=2, layers=[1, -3])  # explicit layers, sorted
    assert list(lens) == [0, 1]
    last = torch.softmax(ref[1, -1], -1).topk(2)
    assert [p for _, p in lens[1]] == pytest.approx(last.values.tolist(), rel=1e-5)
    with pytest.raises(InputError, match="layers= or layer_step=, not both"):
        an.logit_lens(PROMPT, layers=[0], layer_step=2)
    with pytest.raises(oculi.errors.LayerIndexError, match=r"layer 3 out of range.*\(0..2\)"):
        an.get_layer_predictions(PROMPT, layer_indices=[3])


def test_convergence_metrics_and_plot_against_a_hand_kl():
    an = analyzer_for()
    ref, _ = hf_lens(an, PROMPT)
    logp = torch.log_softmax(ref, -1)
    kl = (logp[-1].exp() * (logp[-1] - logp)).sum(-1)  # KL(final || layer), [L, T]
    final = ref[-1].argmax(-1)
    ranks = (ref > ref.gather(-1, final.expand(3, -1)[..., None])).sum(-1)
    m = an.get_convergence_metrics(PROMPT)
    torch.testing.assert_close(m["kl_divergence"].double(), kl, atol=1e-5, rtol=1e-4)
    assert torch.equal(m["top1_match"], ref.argmax(-1) == final)
    assert torch.equal(m["top1_rank"], ranks)
    torch.testing.assert_close(m["top1_logit"].double(), ref.amax(-1), atol=1e-5, rtol=1e-5)
    assert m["layers"] == [0, 1, 2] and m["input_tokens"][0] == "<bos>"
    fig = an.plot_convergence(PROMPT)
    kl_img, match_img, rank_img, logit_img = (
        np.asarray(ax.images[0].get_array(), dtype=np.float64) for ax in fig.axes[:4]
    )
    np.testing.assert_allclose(kl_img, kl.numpy(), atol=1e-5)
    np.testing.assert_array_equal(match_img, (ref.argmax(-1) == final).double().numpy())
    np.testing.assert_array_equal(rank_img, ranks.double().numpy())
    np.testing.assert_allclose(logit_img, ref.amax(-1).numpy(), atol=1e-5)
    assert fig.axes[0].get_xticklabels()[2].get_text() == "2 'cat'"


@pytest.mark.parametrize("family", ["llama_gqa", "gemma3", "gpt2"])
def test_input_preservation_kl_from_the_embeddings_lens_by_hand(family, tmp_path):
    an = analyzer_for(family)
    ref, embedded = hf_lens(an, PROMPT)  # gemma scales its embeddings, gpt2 adds positions
    logp, log_in = torch.log_softmax(ref, -1), torch.log_softmax(embedded, -1)
    kl = (logp.exp() * (logp - log_in)).sum(-1)  # KL(layer || input), [L, T]
    own = ids(PROMPT)[0].expand(3, -1)[..., None]
    ranks = (ref > ref.gather(-1, own)).sum(-1)
    out = an.input_preservation(PROMPT)
    torch.testing.assert_close(out["kl_from_input"].double(), kl, atol=1e-5, rtol=1e-4)
    assert torch.equal(out["ranks"], ranks)
    fig = an.plot_input_preservation(PROMPT, save_path=tmp_path / "keep.png")
    image = np.asarray(fig.axes[2].images[0].get_array(), dtype=np.float64)
    np.testing.assert_allclose(image, kl.numpy(), atol=1e-5)
    rank_img = np.asarray(fig.axes[0].images[0].get_array(), dtype=np.float64)
    np.testing.assert_array_equal(rank_img, (ranks + 1).double().numpy())
    assert (tmp_path / "keep.png").read_bytes()[:4] == b"\x89PNG"


def test_prediction_refinement_follows_the_models_top_tokens():
    an = analyzer_for()
    ref, _ = hf_lens(an, PROMPT)
    probs = torch.softmax(ref[:, -1], -1)  # [L, V] at the last position
    fig = an.plot_prediction_refinement(PROMPT, layers=[0], top_k=3)
    lines = fig.axes[0].lines
    top = probs[-1].topk(3).indices
    assert len(lines) == 3
    for line, tok in zip(lines, top.tolist()):
        assert list(line.get_xdata()) == [0, 2]  # the last layer is always drawn
        np.testing.assert_allclose(line.get_ydata(), probs[[0, 2], tok].numpy(), atol=1e-6)
        assert line.get_label() == f"p({tiny_tokenizer().decode([tok])!r})"


def test_layer_embeddings_project_all_layers_together():
    an = analyzer_for()
    with torch.no_grad():
        hs = an.model(ids(PROMPT), output_hidden_states=True).hidden_states
    stacked = torch.cat([hs[1][0], hs[2][0]]).double()  # layers 0 and 1, [2T, d]
    u, s, _ = torch.linalg.svd(stacked - stacked.mean(0), full_matrices=False)
    ref = (u[:, :2] * s[:2]).numpy().reshape(2, 6, 2)
    ax = an.plot_layer_embeddings(PROMPT, layer_indices=[0, 1]).axes[0]
    for layer in range(2):
        offsets = np.asarray(ax.collections[layer].get_offsets())
        np.testing.assert_allclose(np.abs(offsets), np.abs(ref[layer]), atol=1e-4)
    # each token's path through the layers: token 2 ('cat') at layers 0 and 1
    np.testing.assert_allclose(np.abs(ax.lines[2].get_xydata()), np.abs(ref[:, 2]), atol=1e-4)
    assert len(ax.lines) == 6 and [t.get_text() for t in ax.texts][2] == " cat"
    default = an.plot_layer_embeddings(PROMPT).axes[0]  # 3 layers: 0, 0, 1, 2, 2 -> 0, 1, 2
    assert [t.get_text() for t in default.get_legend().get_texts()] == [
        "layer 0", "layer 1", "layer 2"
    ]  # fmt: skip


def test_steering_equals_adding_the_mean_difference_by_hand():
    an = analyzer_for()
    pos, neg, layer, c = ["good day", "good night"], ["bad day"], 1, 3.0
    steered = an.generate_with_steering(PROMPT, pos, neg, coefficient=c, layer=layer,
                                        max_new_tokens=5)  # fmt: skip
    with torch.no_grad():

        def last(texts):  # the residual leaving `layer` at each prompt's last token
            return torch.stack([an.model(ids(t), output_hidden_states=True)
                                .hidden_states[layer + 1][0, -1] for t in texts]).mean(0)  # fmt: skip

        vector = last(pos) - last(neg)
        handle = an.model.model.layers[layer].register_forward_hook(
            lambda _m, _a, out: (
                (out[0] + c * vector, *out[1:]) if isinstance(out, tuple) else out + c * vector
            )  # fmt: skip
        )
        try:
            out = an.model.generate(ids(PROMPT), max_new_tokens=5, do_sample=False,
                                    pad_token_id=0)  # fmt: skip
        finally:
            handle.remove()
    expected = tiny_tokenizer().decode(out[0, 6:], skip_special_tokens=True)
    assert steered == PROMPT + expected
    assert steered != PROMPT + an.generate(PROMPT, max_new_tokens=5)[len(PROMPT) :]


def test_path_patching_last_layer_heads_by_hand():
    an = analyzer_for()
    clean, corrupt = "the cat sat on the tree", "the dog sat on the tree"
    effects = an.path_patching(clean, corrupt, answer="red", wrong="blue")
    assert list(effects) == [0, 1, 2]
    # a last-layer head has only the direct path: patching its o_proj input slice is the path
    o_proj = an.model.model.layers[2].self_attn.o_proj
    red, blue = (tiny_tokenizer().convert_tokens_to_ids(w) for w in ("red", "blue"))
    keep = {}
    with torch.no_grad():
        h = o_proj.register_forward_pre_hook(lambda _m, a: keep.__setitem__("z", a[0].clone()))
        an.model(ids(corrupt))
        h.remove()
        base = an.model(ids(clean)).logits[0, -1]
        total = 0.0
        for head in range(4):
            sl = slice(16 * head, 16 * head + 16)

            def swap(_m, a, sl=sl):
                z = a[0].clone()
                z[..., sl] = keep["z"][..., sl]
                return (z,)

            h = o_proj.register_forward_pre_hook(swap)
            lg = an.model(ids(clean)).logits[0, -1]
            h.remove()
            total += float((base[red] - base[blue]) - (lg[red] - lg[blue]))
    assert effects[2] == pytest.approx(total, abs=1e-4)
    kl = an.path_patching(clean, corrupt)  # seed 002's call: KL from the clean run
    assert all(v >= -1e-6 for v in kl.values())
    result = an.path_patching(clean, corrupt, return_result=True)
    assert result.clean_metric == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        p = torch.log_softmax(an.model(ids(clean)).logits[0, -1], -1)
        q = torch.log_softmax(an.model(ids(corrupt)).logits[0, -1], -1)
    assert result.corrupt_metric == pytest.approx(float((p.exp() * (p - q)).sum()), rel=1e-4)
    with pytest.raises(InputError, match="both answer= and wrong="):
        an.path_patching(clean, corrupt, answer="red")


@pytest.mark.parametrize("family", ["llama_gqa", "gemma3", "gpt2"])
def test_feature_attribution_lists_the_neurons_of_largest_exact_share(family):
    an = analyzer_for(family)
    with torch.no_grad():
        logits = an.model(ids(PROMPT)).logits[0, -1]
    result = an.feature_attribution(PROMPT, return_result=True)  # the model's top token
    assert result.metadata["target"] == int(logits.argmax())
    assert result.values.shape == (an.adapter.n_layers, an.adapter.d_mlp)
    # each layer's neurons and W_out's bias add up to its MLP share of the logit (whose sum
    # with the other shares is the model's logit: tests/test_attribution.py)
    full = an.adapter.capture_full(PROMPT)
    dla = AttributionMethods.direct_logit_attribution(full, int(logits.argmax()))
    torch.testing.assert_close(result.values.sum(-1) + result.bias, dla.mlp, rtol=1e-4, atol=1e-5)
    top = an.feature_attribution(PROMPT, k=3)
    flat = result.values.abs().flatten()
    best = flat.argsort(descending=True)[:3].tolist()
    assert [where for where, _ in top] == [divmod(i, an.adapter.d_mlp) for i in best]
    with pytest.raises(InputError):
        an.feature_attribution(PROMPT, target="zebra crossing")


def test_compare_and_summarise_records_by_hand():
    an = analyzer_for()
    cat, dog = an.extract_activations("the cat sat"), an.extract_activations("the dog sat")
    longer = an.extract_activations("the dog sat on the mat")
    name = an.get_layer_names()[1]
    x, y = (r.layer_activations[name].double().numpy() for r in (cat, dog))
    cosines = (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))
    assert compare_activations(cat, dog, name) == pytest.approx(float(cosines.mean()), rel=1e-9)
    assert compare_activations(cat, dog, 1, metric="l2") == pytest.approx(
        float(np.linalg.norm(x - y, axis=-1).mean()), rel=1e-9
    )
    assert compare_activations(cat, cat, -2) == pytest.approx(1.0, abs=1e-12)
    z = longer.layer_activations[name].double().numpy()[-1]
    last = float((x[-1] * z).sum() / (np.linalg.norm(x[-1]) * np.linalg.norm(z)))
    assert compare_activations(cat, longer, name, position=-1) == pytest.approx(last, rel=1e-9)
    with pytest.raises(InputError, match="4 and 7 tokens"):
        compare_activations(cat, longer, name)
    with pytest.raises(InputError, match="no layer 'transformer.h.5'"):
        compare_activations(cat, dog, "transformer.h.5")
    with pytest.raises(InputError, match="layer 9 out of range"):
        compare_activations(cat, dog, 9)
    with pytest.raises(InputError, match="metric must be one of cosine, l2"):
        compare_activations(cat, dog, name, metric="dot")
    stats = get_activation_statistics(cat, name)
    assert stats["mean"] == pytest.approx(float(x.mean()), rel=1e-9)
    assert stats["std"] == pytest.approx(float(x.std(ddof=1)), rel=1e-9)
    assert stats["norm"] == pytest.approx(float(np.linalg.norm(x)), rel=1e-9)
    assert stats["token_norm_max"] == pytest.approx(float(np.linalg.norm(x, axis=-1).max()))
    assert (stats["min"], stats["max"], stats["shape"]) == (x.min(), x.max(), list(x.shape))


def test_pca_matches_an_svd_and_other_projections_run():
    an = analyzer_for()
    words = ["cat", "dog", "king", "queen", "man", "woman", "red", "blue"]
    proj = an.project_embeddings(words, method="pca")
    emb = an.model.get_input_embeddings().weight[
        [tiny_tokenizer().convert_tokens_to_ids(w) for w in words]
    ].detach().numpy()  # fmt: skip
    centred = emb - emb.mean(0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    ref = u[:, :2] * s[:2]
    assert np.allclose(np.abs(proj.coords), np.abs(ref), atol=1e-4)
    assert proj.labels == words and proj.explained_variance_ratio.shape == (2,)
    tsne = an.project_embeddings(words, method="tsne", n_components=3)
    again = an.project_embeddings(words, method="tsne", n_components=3)
    assert tsne.coords.shape == (8, 3) and np.allclose(tsne.coords, again.coords)
    pytest.importorskip("umap")
    threads = torch.get_num_threads()
    umap = an.project_embeddings(PROMPT, method="umap", layer=1)
    assert torch.get_num_threads() == threads  # numba's pool must not change torch's
    assert umap.coords.shape == (6, 2) and umap.labels[0] == "<bos>"
    with pytest.raises(InputError, match="method must be"):
        an.project_embeddings(words, method="lda")


def test_inspection_and_construction(tmp_path, capsys):
    folder = tmp_path / "tiny"
    tiny_model("llama_gqa").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    an = ModelAnalyzer(str(folder), device="cpu", load_for_generation=False)
    assert an.get_num_layers() == 3
    names = an.get_layer_names()
    assert names == ["model.layers.0", "model.layers.1", "model.layers.2"]
    assert [an.model.get_submodule(n) for n in names] == an.adapter.layer_modules
    an.print_architecture_summary()
    out = capsys.readouterr().out
    assert "n_layers" in out and "model.layers.0 ... model.layers.2" in out
    with pytest.raises(InputError, match="load_for_generation=False"):
        an.generate(PROMPT)


@pytest.mark.parametrize(
    ("family", "pattern"),
    [("llama_gqa", "model.layers.{}.self_attn"), ("gpt2", "transformer.h.{}.attn"),
     ("neox_parallel", "gpt_neox.layers.{}.attention")],
)  # fmt: skip
def test_attention_layer_names_are_the_models_attention_modules(family, pattern):
    an = analyzer_for(family)
    names = an.get_attention_layer_names()
    assert names == [pattern.format(i) for i in range(3)]
    assert all(an.model.get_submodule(n) is an.adapter.part(i, an.adapter.anatomy.attn)
               for i, n in enumerate(names))  # fmt: skip


@pytest.mark.gemma
def test_seed_002_quick_start_on_gemma(gemma, capsys):
    # as written in seed 002, with the model path replaced by the embedded default
    analyzer = ModelAnalyzer(adapter=gemma)
    text = analyzer.generate("The capital of France is")
    activations = analyzer.extract_activations("Hello world")
    analyzer.print_logit_lens("The quick brown fox")
    steered = analyzer.generate_with_steering(
        prompt="Today I feel", positive_examples=["I am happy"], negative_examples=["I am sad"]
    )
    batch = gemma.tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = gemma.model.generate(**batch, max_new_tokens=20, do_sample=False)
    continuation = gemma.tokenizer.decode(out[0, batch["input_ids"].shape[1] :],
                                          skip_special_tokens=True)  # fmt: skip
    assert text == "The capital of France is" + continuation
    assert len(activations.layer_activations) == 18
    assert "layer  17" in capsys.readouterr().out
    assert steered.startswith("Today I feel") and steered != analyzer.generate("Today I feel", 30)
    effects = analyzer.path_patching(
        clean_prompt="The Eiffel Tower is in Paris", corrupted_prompt="The Colosseum is in Rome"
    )
    assert sorted(effects) == list(range(18))
    neurons = analyzer.feature_attribution("The capital of France is", k=5)
    assert len(neurons) == 5 and all(0 <= layer < 18 for (layer, _), _v in neurons)
    text2, acts = analyzer.generate("The cat", max_new_tokens=8, return_activations=True)
    full = gemma.capture_residual(acts.input_ids[None], POST).post_mlp
    # the KV-cached steps sum in another order than one full forward: compare per layer,
    # relative to the residual's size (Gemma's residual norms reach the thousands)
    err = (acts.residual() - full).flatten(1).norm(dim=1) / full.flatten(1).norm(dim=1)
    assert float(err.max()) < 1e-5, err


@pytest.mark.gemma
def test_seed_002_lens_calls_on_gemma(gemma):
    analyzer = ModelAnalyzer(adapter=gemma)
    text = "Artificial intelligence is transforming"
    results = analyzer.get_layer_predictions(text, layer_indices=[0, 6, 11])  # as in seed 002
    batch = gemma.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        out = gemma.model(**batch, output_hidden_states=True)
        normed = gemma.model.model.norm(out.hidden_states[7])  # after layer 6
        probs = torch.softmax(gemma.model.lm_head(normed)[0].double(), -1)  # [T, V]
    layer6 = results["layers"][6]
    assert torch.equal(layer6["top_k_indices"][:, 0], probs.argmax(-1))
    torch.testing.assert_close(layer6["top_k_probs"].double(), probs.topk(5).values,
                               atol=1e-5, rtol=1e-4)  # fmt: skip
    metrics = analyzer.get_convergence_metrics(text)
    final = out.logits[0].argmax(-1)
    assert torch.equal(metrics["top1_match"][-1], torch.ones_like(final, dtype=torch.bool))
    assert torch.equal(metrics["top1_match"][6], probs.argmax(-1) == final)
    assert float(metrics["kl_divergence"][-1].abs().max()) < 1e-4
