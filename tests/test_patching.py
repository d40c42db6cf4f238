"""Activation patching and causal tracing on tiny models, against independent references.

The reference sweeps are plain PyTorch: a forward pre-hook written here (no oculi code)
overwrites one position of one layer's input and the full model runs again.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

import oculi
from models import prompt_ids, tiny_model, tiny_tokenizer
from oculi import patching
from oculi.errors import InputError, UnknownSiteError
from oculi.patching import _common, activation
from oculi.patching.activation import PATCHABLE
from oculi.patching.resume import ResumableRun

TOL = 1e-5  # oculi vs its own identities (fp32)
REF_TOL = 1e-4  # oculi vs an independent reference loop
FAMILIES = ["llama_gqa", "gemma3", "gpt2", "neox_parallel", "olmo2", "phi3"]
CORRECT, WRONG = 5, 6


def _pair(family: str) -> tuple[oculi.Adapter, torch.Tensor, torch.Tensor]:
    adapter = oculi.attach(tiny_model(family))
    clean = prompt_ids(9).unsqueeze(0)
    corrupt = clean.clone()
    corrupt[0, 4] = (corrupt[0, 4] + 7) % 90 + 3
    return adapter, clean, corrupt


def _reference_resid_pre_sweep(model, layers, clean, corrupt) -> torch.Tensor:
    with torch.no_grad():
        hidden = model(clean, output_hidden_states=True).hidden_states
    t = clean.shape[1]
    ref = torch.zeros(len(layers), t)
    for li, layer in enumerate(layers):
        for p in range(t):

            def hook(_m, args, kwargs, li=li, p=p):
                h = (args[0] if args else kwargs["hidden_states"]).clone()
                h[0, p] = hidden[li][0, p]
                if args:
                    return (h, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": h}

            handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
            try:
                with torch.no_grad():
                    logits = model(corrupt).logits[0, -1]
            finally:
                handle.remove()
            ref[li, p] = logits[CORRECT] - logits[WRONG]
    return ref


@pytest.mark.parametrize("family", FAMILIES)
def test_resid_pre_sweep_matches_plain_pytorch_loop(family):
    adapter, clean, corrupt = _pair(family)
    res = patching.activation_patching(
        adapter,
        clean,
        corrupt,
        site="resid_pre",
        metric=patching.logit_diff(CORRECT, WRONG),
        progress=False,
    )
    ref = _reference_resid_pre_sweep(adapter.model, adapter.layer_modules, clean, corrupt)
    assert res.values.shape == (adapter.n_layers, clean.shape[1])
    torch.testing.assert_close(res.values, ref, atol=REF_TOL, rtol=0)
    with torch.no_grad():
        logits_clean = adapter.model(clean).logits[0, -1]
        logits_corrupt = adapter.model(corrupt).logits[0, -1]
    assert res.clean_metric == pytest.approx(
        float(logits_clean[CORRECT] - logits_clean[WRONG]), abs=REF_TOL
    )
    assert res.corrupt_metric == pytest.approx(
        float(logits_corrupt[CORRECT] - logits_corrupt[WRONG]), abs=REF_TOL
    )
    # positions before the corrupted token carry no difference: patching them does nothing
    torch.testing.assert_close(
        res.values[:, :4], torch.full((adapter.n_layers, 4), res.corrupt_metric), atol=TOL, rtol=0
    )


def _skip_missing(adapter, site):
    if site == "resid_mid" and adapter.anatomy.is_parallel(adapter.model.config):
        pytest.skip("parallel attention has no resid_mid state")
    if site == "mlp_gate" and not adapter.anatomy.gated:
        pytest.skip("plain MLP has no gate")


def _nothing_skipped(kind, clean, corrupt, layers, axis, items, read_pos):
    """Stand-in for activation._no_op_mask: every cell is run."""
    return [[False] * len(items) for _ in layers]


@pytest.fixture
def every_cell(monkeypatch):
    """Run every cell through the writers: no cell is skipped as a no-op."""
    monkeypatch.setattr(activation, "_no_op_mask", _nothing_skipped)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("site", PATCHABLE)
def test_patching_clean_into_clean_changes_nothing(family, site, every_cell):
    adapter, clean, _ = _pair(family)
    _skip_missing(adapter, site)
    res = patching.activation_patching(
        adapter, clean, clean, site=site, metric=patching.logit_diff(CORRECT, WRONG), progress=False
    )
    torch.testing.assert_close(
        res.values, torch.full_like(res.values, res.clean_metric), atol=TOL, rtol=0
    )


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("site", PATCHABLE)
def test_shortcuts_do_not_change_numbers(family, site, monkeypatch):
    """Skipped no-op cells and runs that start at the patched position give the numbers of
    the plain sweep (every cell, every position recomputed)."""
    adapter, clean, corrupt = _pair(family)
    _skip_missing(adapter, site)
    kwargs = dict(site=site, metric=patching.logit_diff(CORRECT, WRONG), progress=False)
    assert ResumableRun(adapter, adapter.prepare(clean)).can_start_late()
    fast = patching.activation_patching(adapter, clean, corrupt, **kwargs)
    monkeypatch.setattr(activation, "_no_op_mask", _nothing_skipped)
    monkeypatch.setattr(ResumableRun, "can_start_late", lambda self: False)
    plain = patching.activation_patching(adapter, clean, corrupt, **kwargs)
    torch.testing.assert_close(fast.values, plain.values, atol=TOL, rtol=0)
    # the corrupted token is at position 4: something there must matter, or this tests nothing
    assert (plain.values - plain.corrupt_metric).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama_gqa", "gemma3", "gpt2"])
def test_whole_residual_patch_restores_clean_metric(family):
    adapter, clean, corrupt = _pair(family)
    metric = patching.logit_diff(CORRECT, WRONG)
    first = patching.activation_patching(
        adapter,
        clean,
        corrupt,
        site="resid_pre",
        metric=metric,
        layers=[0],
        per_position=False,
        progress=False,
    )
    assert float(first.values[0]) == pytest.approx(first.clean_metric, abs=TOL)
    last = patching.activation_patching(
        adapter,
        clean,
        corrupt,
        site="resid_post",
        metric=metric,
        layers=[-1],
        positions=[-1],
        progress=False,
    )
    assert float(last.values[0, 0]) == pytest.approx(last.clean_metric, abs=TOL)
    torch.testing.assert_close(last.normalized(), torch.ones(1, 1), atol=TOL, rtol=0)


@pytest.mark.parametrize("family", ["llama_gqa", "gemma3", "gpt2"])
def test_per_head_z_sweep_matches_o_proj_input_edit(family):
    adapter, clean, corrupt = _pair(family)
    metric = patching.logit_diff(CORRECT, WRONG)
    res = patching.activation_patching(
        adapter, clean, corrupt, site="z", per_head=True, metric=metric, progress=False
    )
    assert res.values.shape == (adapter.n_layers, adapter.n_heads)
    anat, d = adapter.anatomy, adapter.d_head
    model = adapter.model
    o_projs = [adapter.part(i, f"{anat.attn}.{anat.o_proj}") for i in range(adapter.n_layers)]
    clean_in = {}
    handles = [
        o.register_forward_pre_hook(
            lambda _m, a, i=i: clean_in.__setitem__(i, a[0].detach().clone())
        )
        for i, o in enumerate(o_projs)
    ]
    with torch.no_grad():
        model(clean)
    for h in handles:
        h.remove()
    for layer in range(adapter.n_layers):
        for head in range(adapter.n_heads):

            def hook(_m, args, layer=layer, head=head):
                x = args[0].clone()
                x[..., head * d : (head + 1) * d] = clean_in[layer][..., head * d : (head + 1) * d]
                return (x,)

            handle = o_projs[layer].register_forward_pre_hook(hook)
            try:
                with torch.no_grad():
                    logits = model(corrupt).logits[0, -1]
            finally:
                handle.remove()
            assert float(res.values[layer, head]) == pytest.approx(
                float(logits[CORRECT] - logits[WRONG]), abs=REF_TOL
            )


def test_metrics_agree_with_model_distribution():
    adapter, clean, corrupt = _pair("llama_gqa")
    with torch.no_grad():
        logp_clean = torch.log_softmax(adapter.model(clean).logits[0, -1], -1)
        logp_corrupt = torch.log_softmax(adapter.model(corrupt).logits[0, -1], -1)
    for metric, clean_v, corrupt_v in [
        (patching.probability(CORRECT), logp_clean[CORRECT].exp(), logp_corrupt[CORRECT].exp()),
        (patching.log_prob(CORRECT), logp_clean[CORRECT], logp_corrupt[CORRECT]),
        (patching.kl_divergence(), 0.0, (logp_clean.exp() * (logp_clean - logp_corrupt)).sum()),
    ]:
        res = patching.activation_patching(
            adapter,
            clean,
            corrupt,
            site="resid_pre",
            metric=metric,
            layers=[0],
            positions=[0],
            progress=False,
        )
        assert res.clean_metric == pytest.approx(float(clean_v), abs=1e-5)
        assert res.corrupt_metric == pytest.approx(float(corrupt_v), abs=1e-5)


def test_batch_size_does_not_change_numbers():
    adapter, clean, corrupt = _pair("gemma3")
    metric = patching.logit_diff(CORRECT, WRONG)
    a = patching.activation_patching(
        adapter, clean, corrupt, site="attn_out", metric=metric, progress=False
    )
    b = patching.activation_patching(
        adapter, clean, corrupt, site="attn_out", metric=metric, batch_size=2, progress=False
    )
    torch.testing.assert_close(a.values, b.values, atol=TOL, rtol=0)


def test_prompts_of_different_lengths_are_refused():
    adapter = oculi.attach(tiny_model("llama_gqa"), tiny_tokenizer())
    with pytest.raises(InputError, match=r"clean has 6 tokens, corrupt has 5"):
        patching.activation_patching(
            adapter,
            "when mary and john went",
            "when mary john went",
            metric=patching.logit_diff(" mary", " john"),
            progress=False,
        )


def test_bad_site_and_head_requests_are_refused():
    adapter, clean, corrupt = _pair("llama_gqa")
    metric = patching.logit_diff(CORRECT, WRONG)
    with pytest.raises(
        UnknownSiteError, match=r"unknown site 'resid_pr'; did you mean 'resid_pre'"
    ):
        patching.activation_patching(adapter, clean, corrupt, site="resid_pr", metric=metric)
    with pytest.raises(InputError, match=r"per_head=True needs a per-head site"):
        patching.activation_patching(
            adapter, clean, corrupt, site="attn_out", per_head=True, metric=metric
        )
    with pytest.raises(
        IndexError, match=r"layer 7 out of range for a model with 3 layers \(0..2\)"
    ):
        patching.activation_patching(adapter, clean, corrupt, layers=[7], metric=metric)
    with pytest.raises(IndexError, match=r"position 12 out of range for a prompt of 9 tokens"):
        patching.activation_patching(adapter, clean, corrupt, positions=[12], metric=metric)


def test_multi_token_answer_is_refused():
    adapter = oculi.attach(tiny_model("llama_gqa"), tiny_tokenizer())
    with pytest.raises(InputError, match=r"'mary john' is 2 tokens"):
        patching.activation_patching(
            adapter,
            "when mary and john went",
            "when john and mary went",
            metric=patching.logit_diff("mary john", "john"),
            progress=False,
        )


def _oculi_hooks(model) -> int:
    return sum(
        1
        for m in model.modules()
        for d in (m._forward_hooks, m._forward_pre_hooks)
        for fn in d.values()
        if getattr(fn, "__module__", "").startswith("oculi")
    )


def _state_hash(model) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def test_sweeps_leave_model_untouched_also_after_an_error():
    adapter, clean, corrupt = _pair("gemma3")
    before, impl = _state_hash(adapter.model), adapter.model.config._attn_implementation
    for site in ("resid_pre", "z", "pattern", "mlp_out"):
        patching.activation_patching(
            adapter,
            clean,
            corrupt,
            site=site,
            metric=patching.logit_diff(CORRECT, WRONG),
            progress=False,
        )

    class Boom(Exception):
        pass

    def explode(_m, _a, _o):
        raise Boom

    handle = adapter.layer_modules[2].register_forward_hook(explode)
    try:
        with pytest.raises(Boom):
            patching.activation_patching(
                adapter,
                clean,
                corrupt,
                site="q",
                metric=patching.logit_diff(CORRECT, WRONG),
                progress=False,
            )
    finally:
        handle.remove()
    assert _oculi_hooks(adapter.model) == 0
    assert adapter.model.config._attn_implementation == impl
    assert _state_hash(adapter.model) == before


def test_causal_tracing_interchange_equals_resid_post_patching():
    adapter = oculi.attach(tiny_model("llama_gqa"), tiny_tokenizer())
    prompt, corrupt = "the eiffel tower is in the city of", "the big tree is in the city of"
    res = patching.causal_tracing(
        adapter, prompt, "the eiffel tower", "paris", corrupt=corrupt, progress=False
    )
    ref = patching.activation_patching(
        adapter,
        prompt,
        corrupt,
        site="resid_post",
        metric=patching.probability("paris"),
        progress=False,
    )
    torch.testing.assert_close(res.values, ref.values, atol=TOL, rtol=0)
    assert res.clean_prob == pytest.approx(ref.clean_metric, abs=TOL)
    assert res.corrupt_prob == pytest.approx(ref.corrupt_metric, abs=TOL)


def test_causal_tracing_noise_is_seeded_and_restoring_everything_recovers():
    adapter = oculi.attach(tiny_model("gemma3"), tiny_tokenizer())
    prompt = "the eiffel tower is in the city of"
    assert patching.subject_positions(adapter, prompt, "eiffel tower") == [2, 3]
    a = patching.causal_tracing(
        adapter, prompt, "eiffel tower", "paris", samples=3, seed=1, progress=False
    )
    b = patching.causal_tracing(
        adapter, prompt, "eiffel tower", "paris", samples=3, seed=1, progress=False
    )
    torch.testing.assert_close(a.values, b.values, atol=0, rtol=0)
    assert a.values.shape == (adapter.n_layers, 9)
    # restoring the last layer's output at the last position restores the clean prediction
    assert float(a.values[-1, -1]) == pytest.approx(a.clean_prob, abs=TOL)
    # before the subject nothing is corrupted, so restoring there changes nothing
    torch.testing.assert_close(
        a.values[:, :2], torch.full((adapter.n_layers, 2), a.corrupt_prob), atol=TOL, rtol=0
    )
    mlp = patching.causal_tracing(
        adapter, prompt, "eiffel tower", "paris", kind="mlp", samples=2, progress=False
    )
    assert mlp.window == 10 and mlp.values.shape == (adapter.n_layers, 9)
    with pytest.raises(InputError, match=r"subject 'louvre' does not occur"):
        patching.causal_tracing(adapter, prompt, "louvre", "paris", progress=False)


def test_path_patching_last_layer_senders_equal_noising_their_head():
    adapter, clean, corrupt = _pair("llama_gqa")
    metric = patching.logit_diff(CORRECT, WRONG)
    path = patching.path_patching(adapter, clean, corrupt, metric=metric, progress=False)
    noising = patching.activation_patching(
        adapter, corrupt, clean, site="z", per_head=True, metric=metric, progress=False
    )
    assert path.values.shape == (adapter.n_layers, adapter.n_heads)
    torch.testing.assert_close(path.values[-1], noising.values[-1], atol=TOL, rtol=0)
    assert path.clean_metric == pytest.approx(noising.corrupt_metric, abs=TOL)


def test_path_patching_to_logits_matches_hand_hooks():
    """Sender z from corrupt, later attention outputs frozen to clean, MLPs recomputed."""
    adapter, clean, corrupt = _pair("llama_gqa")
    model, d = adapter.model, adapter.d_head
    metric = patching.logit_diff(CORRECT, WRONG)
    path = patching.path_patching(
        adapter, clean, corrupt, metric=metric, senders=[(0, 1), (1, 3)], progress=False
    )
    o_projs = [layer.self_attn.o_proj for layer in adapter.layer_modules]
    attns = [layer.self_attn for layer in adapter.layer_modules]
    corrupt_z, clean_attn = {}, {}
    hs = [
        o.register_forward_pre_hook(lambda _m, a, i=i: corrupt_z.__setitem__(i, a[0].clone()))
        for i, o in enumerate(o_projs)
    ]
    with torch.no_grad():
        model(corrupt)
    for h in hs:
        h.remove()
    hs = [
        m.register_forward_hook(lambda _m, _a, o, i=i: clean_attn.__setitem__(i, o[0].clone()))
        for i, m in enumerate(attns)
    ]
    with torch.no_grad():
        model(clean)
    for h in hs:
        h.remove()
    for layer, head in [(0, 1), (1, 3)]:

        def sender(_m, a, head=head, layer=layer):
            x = a[0].clone()
            x[..., head * d : (head + 1) * d] = corrupt_z[layer][..., head * d : (head + 1) * d]
            return (x,)

        handles = [o_projs[layer].register_forward_pre_hook(sender)]
        for later in range(layer + 1, adapter.n_layers):
            handles.append(
                attns[later].register_forward_hook(
                    lambda _m, _a, o, i=later: (clean_attn[i], *o[1:])
                )
            )
        try:
            with torch.no_grad():
                logits = model(clean).logits[0, -1]
        finally:
            for h in handles:
                h.remove()
        assert float(path.values[layer, head]) == pytest.approx(
            float(logits[CORRECT] - logits[WRONG]), abs=REF_TOL
        )
    assert torch.isnan(path.values[2]).all()  # senders not asked for


def test_path_patching_into_receivers_has_no_effect_from_later_heads():
    adapter, clean, corrupt = _pair("gpt2")
    res = patching.path_patching(
        adapter,
        clean,
        corrupt,
        metric=patching.logit_diff(CORRECT, WRONG),
        receivers=[(1, 2)],
        receiver_input="k",
        progress=False,
    )
    torch.testing.assert_close(
        res.values[1:], torch.full((2, adapter.n_heads), res.clean_metric), atol=TOL, rtol=0
    )
    assert not torch.allclose(
        res.values[0], torch.full((adapter.n_heads,), res.clean_metric), atol=1e-4
    )


@pytest.mark.parametrize("family", ["llama_gqa", "gpt2", "gemma3"])
def test_attribution_patching_is_the_first_order_term_of_the_exact_patch(family):
    """AtP(l, p) − corrupt = (clean − corrupt) · grad; check it against finite differences."""
    from oculi.patching._common import single_prompt as _single
    from oculi.patching.resume import ResumableRun, unembed

    adapter, clean, corrupt = _pair(family)
    metric = patching.logit_diff(CORRECT, WRONG)
    atp = patching.attribution_patching(adapter, clean, corrupt, site="resid_pre", metric=metric)
    assert atp.values.shape == (adapter.n_layers, clean.shape[1])
    c_run = ResumableRun(adapter, _single(adapter, clean, "clean"))
    k_run = ResumableRun(adapter, _single(adapter, corrupt, "corrupt"))
    bound = metric.bind(adapter)
    eps = 1e-3
    for layer, pos in [(0, 4), (1, 6), (2, 8)]:
        delta = c_run.resid[layer][pos] - k_run.resid[layer][pos]
        hidden = k_run.resid[layer].unsqueeze(0).repeat(2, 1, 1).double().float()
        hidden[0, pos] += eps * delta
        hidden[1, pos] -= eps * delta
        normed = k_run.run_from(layer, hidden, positions=[8])[:, 0]
        m = bound(unembed(adapter, normed, bound.columns()))
        slope = float(m[0] - m[1]) / (2 * eps)
        assert float(atp.values[layer, pos]) - atp.corrupt_metric == pytest.approx(
            slope, rel=2e-2, abs=2e-3
        )


def test_attribution_patching_tracks_the_exact_sweep():
    adapter, clean, corrupt = _pair("gpt2")
    metric = patching.logit_diff(CORRECT, WRONG)
    for site in ("resid_pre", "attn_out", "mlp_out"):
        exact = patching.activation_patching(
            adapter, clean, corrupt, site=site, metric=metric, progress=False
        )
        approx = patching.attribution_patching(adapter, clean, corrupt, site=site, metric=metric)
        corr = torch.corrcoef(torch.stack([exact.values.flatten(), approx.values.flatten()]))[0, 1]
        assert corr > 0.95, (site, float(corr))
        assert approx.clean_metric == pytest.approx(exact.clean_metric, abs=TOL)
    same = patching.attribution_patching(
        adapter, clean, clean, site="z", per_head=True, metric=metric
    )
    torch.testing.assert_close(
        same.values, torch.full_like(same.values, same.clean_metric), atol=TOL, rtol=0
    )
    assert all(p.grad is None for p in adapter.model.parameters())


def _reference_noise_tracing(adapter, ids, positions, target, samples, sigma, kind, window):
    """Plain hooks, one full forward per (layer, position) of the noisy samples."""
    model, layers = adapter.model, adapter.layer_modules
    n, t = len(layers), ids.shape[1]
    embed = model.get_input_embeddings()
    if kind == "resid":
        modules = layers
    else:
        modules = [adapter.part(i, adapter.anatomy.mlp) for i in range(n)]
    clean_out = {}
    grabs = [
        m.register_forward_hook(
            lambda _m, _a, o, i=i: clean_out.__setitem__(i, o[0] if isinstance(o, tuple) else o)
        )
        for i, m in enumerate(modules)
    ]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in grabs:
            h.remove()
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(samples, len(positions), adapter.d_model, generator=gen) * sigma

    def add_noise(_m, _a, out):
        out = out.clone()
        out[:, positions] += noise
        return out

    out = torch.zeros(n, t)
    for layer in range(n):
        lo, hi = (
            (layer, layer + 1)
            if kind == "resid"
            else (max(0, layer - window // 2), min(n, layer - window // 2 + window))
        )
        for pos in range(t):

            def restore(_m, _a, o, i=None, pos=pos):
                h = (o[0] if isinstance(o, tuple) else o).clone()
                h[:, pos] = clean_out[i][0, pos]
                return (h, *o[1:]) if isinstance(o, tuple) else h

            handles = [embed.register_forward_hook(add_noise)]
            handles += [
                modules[i].register_forward_hook(lambda m, a, o, i=i, f=restore: f(m, a, o, i=i))
                for i in range(lo, hi)
            ]
            try:
                with torch.no_grad():
                    probs = model(ids.repeat(samples, 1)).logits[:, -1].softmax(-1)[:, target]
            finally:
                for h in handles:
                    h.remove()
            out[layer, pos] = probs.mean()
    return out


@pytest.mark.parametrize(
    ("family", "kind"), [("llama_gqa", "resid"), ("gpt2", "mlp"), ("neox_parallel", "resid")]
)
def test_noise_causal_tracing_matches_plain_pytorch_loop(family, kind):
    adapter = oculi.attach(tiny_model(family), tiny_tokenizer())
    prompt, subject = "the eiffel tower is in the city of", "eiffel tower"
    res = patching.causal_tracing(
        adapter, prompt, subject, "paris", kind=kind, window=2, samples=3, progress=False
    )
    ids = adapter.prepare(prompt).input_ids
    sigma = 3.0 * patching.tracing.embedding_std(adapter)
    positions = patching.subject_positions(adapter, prompt, subject)
    target = adapter.to_single_token("paris")
    ref = _reference_noise_tracing(adapter, ids, positions, target, 3, sigma, kind, 2)
    torch.testing.assert_close(res.values, ref, atol=REF_TOL, rtol=0)
    assert (ref - res.corrupt_prob).abs().max() > 1e-4  # restoring matters somewhere


def test_results_render_as_text_and_heatmaps():
    import matplotlib

    matplotlib.use("Agg")
    adapter = oculi.attach(tiny_model("llama_gqa"), tiny_tokenizer())
    clean, corrupt = "the eiffel tower is in the city of", "the big tree is in the city of"
    res = patching.activation_patching(
        adapter, clean, corrupt, metric=patching.logit_diff("paris", "france"), progress=False
    )
    lines = res.table().splitlines()
    assert len(lines) == 1 + adapter.n_layers and lines[1].startswith("L0")
    assert "'tree'" in lines[0]  # the corrupt prompt's tokens label the columns
    recovery = res.normalized()
    # the text shows the recovery, rounded to two decimals
    assert [float(x) for x in lines[1].split()[1:]] == pytest.approx(
        recovery[0].tolist(), abs=0.006
    )
    top = res.top(3)
    effects = (res.values - res.corrupt_metric).abs()
    assert [abs(float(res.values[layer, pos] - res.corrupt_metric)) for layer, pos, _ in top] == (
        sorted(effects.reshape(-1).tolist(), reverse=True)[:3]
    )
    ax = res.plot()
    assert ax.get_images()[0].get_array().shape == tuple(res.values.shape)
    tr = patching.causal_tracing(adapter, clean, "eiffel tower", "paris", samples=2, progress=False)
    assert "*" in tr.table().splitlines()[0] and tr.plot().get_images()[0].get_array().shape == (
        adapter.n_layers,
        len(tr.tokens),
    )


@pytest.mark.parametrize("family", ["gemma3", "gpt2", "neox_parallel"])
@pytest.mark.parametrize("site", ["resid_pre", "attn_out", "z", "k", "pattern", "mlp_post"])
def test_long_prompt_sweeps_in_several_suffix_batches_match_the_plain_sweep(
    family, site, monkeypatch
):
    """A 40-token prompt corrupted at position 2: the sweep runs copies in batches starting at
    positions 2, 22 and 38 (_common.position_groups); numbers equal the plain sweep."""
    adapter = oculi.attach(tiny_model(family))
    clean = prompt_ids(40, seed=5).unsqueeze(0)
    corrupt = clean.clone()
    corrupt[0, 2] = (corrupt[0, 2] + 7) % 90 + 3
    live = [(p, p) for p in range(2, 40)]
    assert [s for s, _ in _common.position_groups(live, 40, None)] == [2, 22, 38]
    kwargs = dict(site=site, metric=patching.logit_diff(CORRECT, WRONG), progress=False)
    fast = patching.activation_patching(adapter, clean, corrupt, **kwargs)
    monkeypatch.setattr(activation, "_no_op_mask", _nothing_skipped)
    monkeypatch.setattr(ResumableRun, "can_start_late", lambda self: False)
    plain = patching.activation_patching(adapter, clean, corrupt, **kwargs)
    torch.testing.assert_close(fast.values, plain.values, atol=TOL, rtol=0)
    assert (plain.values[:, 2:] - plain.corrupt_metric).abs().max() > 1e-3
