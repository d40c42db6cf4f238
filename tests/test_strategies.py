"""Device strategies forced on the CPU: every strategy chosen for CUDA gives the numbers of
the CPU strategy and of the plain references in test_patching.py (fp32, tiny models)."""

from __future__ import annotations

import pytest
import torch

import oculi
from models import prompt_ids, tiny_model, tiny_tokenizer
from oculi import patching
from oculi.errors import InputError
from oculi.patching._common import choose_strategy
from oculi.patching.activation import PATCHABLE
from oculi.patching.resume import ResumableRun
from test_patching import (
    CORRECT,
    FAMILIES,
    WRONG,
    _nothing_skipped,
    _pair,
    _reference_noise_tracing,
    _reference_resid_pre_sweep,
    _skip_missing,
)

TOL = 1e-5


def test_auto_strategy_follows_the_device():
    assert choose_strategy("auto", "cuda") == "fused"
    assert choose_strategy("auto", torch.device("cuda:1")) == "fused"
    assert choose_strategy("auto", "cpu") == "layered"
    assert choose_strategy("layered", "cuda") == "layered"
    assert choose_strategy("fused", "cpu") == "fused"
    with pytest.raises(InputError, match="strategy must be 'auto', 'layered' or 'fused'"):
        choose_strategy("gpu", "cpu")  # type: ignore[arg-type]


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_resid_pre_sweep_matches_plain_pytorch_loop(family):
    adapter, clean, corrupt = _pair(family)
    res = patching.activation_patching(
        adapter,
        clean,
        corrupt,
        metric=patching.logit_diff(CORRECT, WRONG),
        strategy="fused",
        progress=False,
    )
    ref = _reference_resid_pre_sweep(adapter.model, adapter.layer_modules, clean, corrupt)
    torch.testing.assert_close(res.values, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("late", [True, False], ids=["late", "from0"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("site", PATCHABLE)
def test_fused_equals_layered_every_site(family, site, late, monkeypatch):
    adapter, clean, corrupt = _pair(family)
    _skip_missing(adapter, site)
    if not late:
        monkeypatch.setattr(ResumableRun, "can_start_late", lambda self: False)
    kwargs = dict(site=site, metric=patching.logit_diff(CORRECT, WRONG), progress=False)
    layered = patching.activation_patching(adapter, clean, corrupt, strategy="layered", **kwargs)
    fused = patching.activation_patching(adapter, clean, corrupt, strategy="fused", **kwargs)
    torch.testing.assert_close(fused.values, layered.values, atol=TOL, rtol=0)
    assert (layered.values - layered.corrupt_metric).abs().max() > 1e-3


@pytest.mark.parametrize(
    "options",
    [
        dict(site="z", per_head=True),
        dict(site="k", per_head=True),
        dict(site="pattern", per_head=True),
        dict(site="attn_out", per_position=False),
        dict(site="resid_pre", per_position=False),
        dict(site="resid_post", layers=[2, 0], positions=[6, 4, -1]),
        dict(site="mlp_out", batch_size=5),
        dict(site="resid_pre", batch_size=3, metric=patching.kl_divergence()),
        dict(site="resid_post", metric=patching.probability(CORRECT)),
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items() if k != "metric"),
)
@pytest.mark.parametrize("family", ["llama_gqa", "gemma3", "gpt2"])
def test_fused_equals_layered_options(family, options, monkeypatch):
    adapter, clean, corrupt = _pair(family)
    options = {"metric": patching.logit_diff(CORRECT, WRONG), **options}
    monkeypatch.setattr(
        "oculi.patching.activation._no_op_mask", _nothing_skipped
    )  # every cell through the writers
    layered = patching.activation_patching(
        adapter, clean, corrupt, strategy="layered", progress=False, **options
    )
    fused = patching.activation_patching(
        adapter, clean, corrupt, strategy="fused", progress=False, **options
    )
    torch.testing.assert_close(fused.values, layered.values, atol=TOL, rtol=0)
    assert torch.isfinite(fused.values).all()


def test_fused_sweep_of_a_long_prompt_uses_several_position_groups():
    """40 tokens, corrupted at 2, 22 and 38: the fused sweep runs one forward per group of
    late starts and still equals the layered sweep."""
    adapter = oculi.attach(tiny_model("llama_gqa"))
    clean = prompt_ids(40).unsqueeze(0)
    corrupt = clean.clone()
    for p in (2, 22, 38):
        corrupt[0, p] = (corrupt[0, p] + 7) % 90 + 3
    kwargs = dict(metric=patching.logit_diff(CORRECT, WRONG), progress=False, batch_size=7)
    layered = patching.activation_patching(adapter, clean, corrupt, strategy="layered", **kwargs)
    fused = patching.activation_patching(adapter, clean, corrupt, strategy="fused", **kwargs)
    torch.testing.assert_close(fused.values, layered.values, atol=TOL, rtol=0)


@pytest.mark.parametrize(
    ("family", "kind"),
    [("llama_gqa", "resid"), ("gpt2", "mlp"), ("neox_parallel", "resid"), ("gemma3", "mlp")],
)
def test_fused_noise_tracing_matches_plain_pytorch_loop(family, kind):
    """All noise samples and layers in one forward: equals the plain reference loop and the
    layered strategy."""
    adapter = oculi.attach(tiny_model(family), tiny_tokenizer())
    prompt, subject = "the eiffel tower is in the city of", "eiffel tower"
    kwargs = dict(kind=kind, window=2, samples=3, progress=False)
    fused = patching.causal_tracing(adapter, prompt, subject, "paris", strategy="fused", **kwargs)
    layered = patching.causal_tracing(
        adapter, prompt, subject, "paris", strategy="layered", **kwargs
    )
    ids = adapter.prepare(prompt).input_ids
    sigma = 3.0 * patching.tracing.embedding_std(adapter)
    positions = patching.subject_positions(adapter, prompt, subject)
    target = adapter.to_single_token("paris")
    ref = _reference_noise_tracing(adapter, ids, positions, target, 3, sigma, kind, 2)
    torch.testing.assert_close(fused.values, ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(fused.values, layered.values, atol=TOL, rtol=0)
    assert fused.corrupt_prob == pytest.approx(layered.corrupt_prob, abs=TOL)
    assert (ref - fused.corrupt_prob).abs().max() > 1e-4


@pytest.mark.parametrize("late", [True, False], ids=["late", "from0"])
@pytest.mark.parametrize("kind", ["resid", "mlp", "attn"])
def test_fused_tracing_in_small_batches_and_interchange(kind, late, monkeypatch):
    adapter = oculi.attach(tiny_model("olmo2"), tiny_tokenizer())
    if not late:
        monkeypatch.setattr(ResumableRun, "can_start_late", lambda self: False)
    prompt = "the eiffel tower is in the city of"
    for extra in (dict(samples=4), dict(corrupt="the big tree is in the city of")):
        kwargs = dict(kind=kind, window=3, progress=False, **extra)
        layered = patching.causal_tracing(
            adapter, prompt, "eiffel tower", "paris", strategy="layered", **kwargs
        )
        fused = patching.causal_tracing(
            adapter, prompt, "eiffel tower", "paris", strategy="fused", batch_size=5, **kwargs
        )
        torch.testing.assert_close(fused.values, layered.values, atol=TOL, rtol=0)


# -- logit lens ------------------------------------------------------------------------------
def test_lens_strategy_and_chunk_follow_the_device(monkeypatch):
    from oculi.capture import lens

    assert lens.choose_lens_strategy("auto", "cuda:0") == "rows"
    assert lens.choose_lens_strategy("auto", "cpu") == "vocab"
    assert lens.choose_lens_strategy("vocab", "cuda") == "vocab"
    with pytest.raises(InputError, match="'auto', 'vocab' or 'rows'"):
        lens.choose_lens_strategy("fast", "cpu")  # type: ignore[arg-type]
    assert lens.default_chunk("cpu") == 16 * 2**20
    # on CUDA the block is half the free memory at 16 bytes per logit (the probe is faked:
    # no GPU here), never below the CPU's 16M logits
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (64 * 2**30, 80 * 2**30))
    assert lens.default_chunk("cuda") == 32 * 2**30 // 16
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**20, 80 * 2**30))
    assert lens.default_chunk("cuda") == 16 * 2**20


@pytest.mark.parametrize("chunk", [None, 300, 10**9])
@pytest.mark.parametrize("family", ["llama_gqa", "gemma2", "gpt2"])
def test_lens_rows_strategy_equals_full_logits(family, chunk):
    """Top-k, logsumexp, probabilities, ranks and KL of the ``rows`` strategy (the GPU one)
    forced on the CPU, against full logits and log-softmax computed here."""
    from oculi.capture.configs import LogitConfig

    adapter = oculi.attach(tiny_model(family))
    ids = torch.stack([prompt_ids(7), prompt_ids(7, seed=3)])
    got = {}
    for strategy in ("rows", "vocab"):
        cfg = LogitConfig(top_k=4, chunk_size=chunk, strategy=strategy)
        got[strategy] = adapter.capture_logits(ids, cfg)
    lens = got["rows"]
    full = lens.logits()  # [B, L, T, V], checked against the HF model in test_parity.py
    logp = torch.log_softmax(full, dim=-1)
    top = full.topk(4, dim=-1)
    torch.testing.assert_close(lens.top_k_values, top.values, atol=TOL, rtol=0)
    assert torch.equal(lens.top_k_indices, top.indices)
    torch.testing.assert_close(lens.logsumexp, full.logsumexp(-1), atol=TOL, rtol=0)
    torch.testing.assert_close(lens.top_k_probs, top.values.sub(full.logsumexp(-1, True)).exp())
    token = int(top.indices[0, 0, -1, 1])
    torch.testing.assert_close(lens.token_probs(token), logp[..., token].exp(), atol=TOL, rtol=0)
    assert torch.equal(lens.ranks(token), (full > full[..., token, None]).sum(-1))
    final = logp[:, -1:]
    kl = (final.exp() * (final - logp)).sum(-1)
    torch.testing.assert_close(lens.kl_to_final(), kl, atol=TOL, rtol=0)
    torch.testing.assert_close(lens.entropy(), -(logp.exp() * logp).sum(-1), atol=TOL, rtol=0)
    vocab = got["vocab"]
    torch.testing.assert_close(vocab.logsumexp, lens.logsumexp, atol=TOL, rtol=0)
    assert torch.equal(vocab.top_k_indices, lens.top_k_indices)
    torch.testing.assert_close(vocab.kl_to_final(), kl, atol=TOL, rtol=0)


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(receivers=[(2, 1)], receiver_input="q"),
        dict(receivers=[(2, 0), (1, 3)], receiver_input="k"),
        dict(receivers=[(2, 2)], receiver_input="v", senders=[(0, 1), (1, 0), (0, 3)]),
    ],
    ids=["logits", "q", "k", "v-some-senders"],
)
@pytest.mark.parametrize("family", ["llama_gqa", "gpt2", "gemma3"])
def test_fused_path_patching_equals_layered(family, options):
    adapter, clean, corrupt = _pair(family)
    kwargs = dict(metric=patching.logit_diff(CORRECT, WRONG), progress=False, **options)
    layered = patching.path_patching(adapter, clean, corrupt, strategy="layered", **kwargs)
    fused = patching.path_patching(adapter, clean, corrupt, strategy="fused", **kwargs)
    torch.testing.assert_close(fused.values, layered.values, atol=TOL, rtol=0, equal_nan=True)
    tested = ~torch.isnan(layered.values)
    assert (layered.values[tested] - layered.clean_metric).abs().max() > 1e-4
