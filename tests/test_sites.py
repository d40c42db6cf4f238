"""Every site kind through every API, from one table: recording, ActivationPatch, activation
patching and attribution patching, on tiny random models of families that place sites
differently (fused QKV split or per head, q/k norms in three layouts, post-branch norms, no
pre-attention norm, parallel attention, gated, plain and fused gate/up MLPs).

The references are independent of the code under test: plain PyTorch hooks on the module a
site's locator names (with its view), Hugging Face's ``hidden_states``, attention recomputed
here from the recorded queries and keys, identities (a patch of a site with its own clean value
is the identity; adding zeros changes nothing; a written value reads back), the intervention
writers against the batched patching writers, and a central finite difference of the metric
against attribution patching. Where a site makes no sense for an API (``head_out`` has no
tensor of its own, a plain MLP has no ``mlp_gate``, a parallel block has no ``resid_mid``
state), the table expects a refusal that names it.
"""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch

import oculi
from models import prompt_ids, tiny_model
from oculi import patching
from oculi.capture.engine import record
from oculi.capture.places import Place
from oculi.capture.sites import SITE_KINDS
from oculi.errors import InputError
from oculi.intervention import ActivationPatch, run_with_interventions
from oculi.patching import activation

FAMILIES = [
    "llama_gqa",  # separate q/k/v, grouped-query attention, gated MLP
    "qwen3",  # q/k norms on [B, T, H, D]
    "gemma3",  # q/k norms on [B, H, T, D], post-attention and post-MLP norms, sliding window
    "gpt2",  # fused Conv1D [q | k | v], plain MLP
    "neox_parallel",  # fused qkv per head, parallel attention, plain MLP
    "neox_sequential",  # fused qkv per head, sequential blocks
    "olmo2",  # no pre-attention norm, flat q/k norms, post-norms
    "phi3",  # fused qkv and fused [gate | up]
]
KINDS = list(SITE_KINDS)
# written out here, not read from oculi: which families lack what
PLAIN_MLP = {"gpt2", "neox_parallel", "neox_sequential"}
PARALLEL = {"neox_parallel"}
LAYER = 1
CORRECT, WRONG = 5, 6
TAP_TOL = dict(atol=2e-5, rtol=0)  # the attention bridge runs sdpa with an explicit mask


def _refusal(family: str, kind: str, *, patching_api: bool) -> str | None:
    """The word the error must name, or None where the API must work."""
    if kind == "head_out":
        return "head_out"
    if kind == "mlp_gate" and family in PLAIN_MLP:
        return "mlp_gate"
    if patching_api and kind == "resid_mid" and family in PARALLEL:
        return "resid_mid"
    return None


def _setup(family: str):
    adapter = oculi.attach(tiny_model(family))
    clean = prompt_ids(9).unsqueeze(0)
    corrupt = clean.clone()
    corrupt[0, 4] = (corrupt[0, 4] + 7) % 90 + 3
    return adapter, clean, corrupt


def _hand_read(adapter, place, layer: int, ids: torch.Tensor) -> torch.Tensor:
    """The tensor at ``place`` of ``layer``, read by a plain torch hook (view applied)."""
    module = adapter.layer_modules[layer]
    for name in place.module.split(".") if place.module else ():
        module = getattr(module, name)
    got = []
    if place.at == "output":
        handle = module.register_forward_hook(
            lambda _m, _a, o: got.append(o[0] if isinstance(o, tuple) else o)
        )
    else:
        handle = module.register_forward_pre_hook(
            lambda _m, a, kw: got.append(a[0] if a else kw["hidden_states"]), with_kwargs=True
        )
    try:
        with torch.no_grad():
            adapter.model(ids)
    finally:
        handle.remove()
    return place.view(got[0]) if place.view else got[0]


def _recorded(adapter, ids, kind: str) -> torch.Tensor:
    (layers, tensor) = record(adapter, adapter.prepare(ids), {kind: (LAYER,)})[kind]
    assert layers == (LAYER,)
    return tensor[:, 0]


def _pattern_from(q: torch.Tensor, k: torch.Tensor, attn: torch.nn.Module) -> torch.Tensor:
    """Causal attention probabilities from post-RoPE ``q [B, H, T, D]``, ``k [B, H_kv, T, D]``."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = q @ k.transpose(-1, -2) * attn.scaling
    t = q.shape[-2]
    i, j = torch.arange(t)[:, None], torch.arange(t)[None]
    allowed = j <= i
    window = getattr(attn, "sliding_window", None)
    if window:
        allowed &= i - j < window
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)


# -- recording ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_recording_reads_what_a_hand_hook_reads(family, kind):
    adapter, ids, _ = _setup(family)
    if kind == "mlp_gate" and family in PLAIN_MLP:
        assert kind not in record(adapter, adapter.prepare(ids), {kind: (LAYER,)})
        return
    got = _recorded(adapter, ids, kind)
    anat = adapter.anatomy
    loc = SITE_KINDS[kind].locate(adapter)
    hand = lambda k: _hand_read(adapter, SITE_KINDS[k].locate(adapter).read, LAYER, ids)  # noqa: E731
    if loc.read is not None and loc.read.tap is None:
        torch.testing.assert_close(got, _hand_read(adapter, loc.read, LAYER, ids), atol=0, rtol=0)
    with torch.no_grad():
        hidden = adapter.model(ids, output_hidden_states=True).hidden_states
    attn = adapter.part(LAYER, anat.attn)
    o_proj = adapter.part(LAYER, f"{anat.attn}.{anat.o_proj}")
    z_hand = _hand_read(adapter, Place(f"{anat.attn}.{anat.o_proj}", "input"), LAYER, ids)
    z_hand = z_hand.view(*z_hand.shape[:2], adapter.n_heads, -1).transpose(1, 2)
    if kind == "resid_pre":
        torch.testing.assert_close(got, hidden[LAYER], atol=0, rtol=0)
    elif kind == "resid_post":
        torch.testing.assert_close(got, hidden[LAYER + 1], atol=0, rtol=0)
    elif kind in ("attn_out", "resid_mid", "mlp_out"):
        # the residual sums: resid_mid = resid_pre + attn_out; resid_post adds mlp_out to
        # resid_mid, or (parallel blocks) to resid_pre + attn_out
        attn_out, mlp_out = _recorded(adapter, ids, "attn_out"), _recorded(adapter, ids, "mlp_out")
        mid = _recorded(adapter, ids, "resid_mid")
        torch.testing.assert_close(mid, hidden[LAYER] + attn_out, atol=1e-5, rtol=0)
        torch.testing.assert_close(hidden[LAYER + 1], mid + mlp_out, atol=1e-5, rtol=0)
    elif kind in ("q_pre", "k_pre"):
        # rotary embeddings rotate pairs of dimensions: each head vector keeps its length
        post = _recorded(adapter, ids, kind[0])
        torch.testing.assert_close(got.norm(dim=-1), post.norm(dim=-1), atol=1e-5, rtol=1e-5)
        assert got.shape == post.shape
    elif kind in ("mlp_gate", "mlp_up", "mlp_post"):
        mlp = adapter.part(LAYER, anat.mlp)
        act = next(getattr(mlp, n) for n in ("act_fn", "act", "activation_fn") if hasattr(mlp, n))
        up = _recorded(adapter, ids, "mlp_up")
        expected = act(up) if family in PLAIN_MLP else act(_recorded(adapter, ids, "mlp_gate")) * up
        torch.testing.assert_close(_recorded(adapter, ids, "mlp_post"), expected)
    elif kind in ("q", "k"):
        q = _recorded(adapter, ids, "q")
        k = _recorded(adapter, ids, "k")
        torch.testing.assert_close(_pattern_from(q, k, attn), _recorded(adapter, ids, "pattern"))
    elif kind in ("pattern", "v"):
        v = _recorded(adapter, ids, "v")
        v = v.repeat_interleave(adapter.n_heads // adapter.n_kv_heads, dim=1)
        torch.testing.assert_close(_recorded(adapter, ids, "pattern") @ v, z_hand, **TAP_TOL)
    elif kind == "z":
        torch.testing.assert_close(got, z_hand, **TAP_TOL)
    elif kind == "head_out":
        bias = getattr(o_proj, "bias", None)
        expected = hand("attn_out")
        if bias is not None:
            assert anat.attn_out_norm is None
            expected = expected - bias
        torch.testing.assert_close(got.sum(1), expected, atol=1e-5, rtol=0)
    assert got.shape[0] == 1


# -- ActivationPatch ------------------------------------------------------------------------
def _width(adapter, kind: str, t: int) -> int:
    return {"d_model": adapter.d_model, "d_head": adapter.d_head, "d_mlp": adapter.d_mlp}.get(
        SITE_KINDS[kind].width, t
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_activation_patch_adds_nothing_and_reads_back(family, kind):
    adapter, ids, _ = _setup(family)
    t = ids.shape[1]
    value = torch.randn(_width(adapter, kind, t), generator=torch.Generator().manual_seed(1))
    word = _refusal(family, kind, patching_api=False)
    if word is not None:
        with pytest.raises(ValueError, match=word):
            run_with_interventions(
                adapter, ids, [ActivationPatch(kind, LAYER, -1, value)], logits_at=-1
            )
        return
    with torch.no_grad():
        plain = adapter.model(ids).logits[0, -1]
    zero = ActivationPatch(kind, LAYER, None, torch.zeros_like(value), mode="add")
    added = run_with_interventions(adapter, ids, [zero], logits_at=-1).logits[0]
    torch.testing.assert_close(added, plain, **TAP_TOL)
    patch = ActivationPatch(kind, LAYER, -1, value)
    out = run_with_interventions(adapter, ids, [patch], record={kind: [LAYER]}, logits_at=-1)
    assert (out.logits[0] - plain).abs().max() > 1e-4  # the write reached the model
    if family == "olmo2" and kind == "attn_in":
        # no pre-attention norm: attn_in is read at the block input, written at attention's
        back = _hand_write_place(adapter, Place(adapter.anatomy.attn, "input"), ids, patch)
    else:
        back = out.recorded[kind][1][0, 0]
    torch.testing.assert_close(back[..., -1, :], value.expand_as(back[..., -1, :]), **TAP_TOL)


def _hand_write_place(adapter, place, ids, patch) -> torch.Tensor:
    from oculi.intervention import InterventionContext

    with InterventionContext(adapter, [patch]):
        return _hand_read(adapter, place, LAYER, ids)[0]


# -- activation patching --------------------------------------------------------------------
def _nothing_skipped(kind, clean, corrupt, layers, axis, items, read_pos):
    return [[False] * len(items) for _ in layers]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_activation_patching_agrees_with_activation_patch(family, kind, monkeypatch):
    adapter, clean, corrupt = _setup(family)
    metric = patching.logit_diff(CORRECT, WRONG)
    kw = dict(site=kind, metric=metric, layers=[LAYER], progress=False)
    word = _refusal(family, kind, patching_api=True)
    if word is not None:
        with pytest.raises(InputError, match=word):
            patching.activation_patching(adapter, clean, corrupt, **kw)
        return
    # every cell really runs (no cell is skipped as a no-op)
    monkeypatch.setattr(activation, "_no_op_mask", _nothing_skipped)
    same = patching.activation_patching(adapter, clean, clean, **kw)
    torch.testing.assert_close(same.values, torch.full_like(same.values, same.clean_metric))
    sweeps = [
        patching.activation_patching(adapter, clean, corrupt, positions=[4, 8], strategy=s, **kw)
        for s in ("layered", "fused")
    ]
    whole = patching.activation_patching(adapter, clean, corrupt, per_position=False, **kw)
    site = _recorded(adapter, clean, kind)[0]  # [T, W] or [H, T, W]

    def by_intervention(position, value):
        patch = ActivationPatch(kind, LAYER, position, value)
        logits = run_with_interventions(adapter, corrupt, [patch], logits_at=-1).logits[0]
        return float(logits[CORRECT] - logits[WRONG])

    for col, p in enumerate([4, 8]):
        ref = by_intervention(p, site[..., p, :])
        for sweep in sweeps:
            assert float(sweep.values[0, col]) == pytest.approx(ref, abs=1e-4)
    assert float(whole.values[0]) == pytest.approx(by_intervention(None, site), abs=1e-4)


# -- attribution patching -------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_attribution_patching_is_the_directional_derivative(family, kind):
    """Σ_p (AtP[l, p] − corrupt) = (clean − corrupt) · ∂metric/∂site: a central difference of
    the metric along that direction, written with ActivationPatch, gives the same number."""
    adapter, clean, corrupt = _setup(family)
    metric = patching.logit_diff(CORRECT, WRONG)
    word = _refusal(family, kind, patching_api=True)
    if word is not None:
        with pytest.raises(InputError, match=word):
            patching.attribution_patching(adapter, clean, corrupt, site=kind, metric=metric)
        return
    atp = patching.attribution_patching(
        adapter, clean, corrupt, site=kind, metric=metric, layers=[LAYER]
    )
    assert atp.values.shape == (1, clean.shape[1])
    delta = _recorded(adapter, clean, kind)[0] - _recorded(adapter, corrupt, kind)[0]
    eps = 1e-2

    def metric_at(step: float) -> float:
        patch = ActivationPatch(kind, LAYER, None, step * delta, mode="add")
        logits = run_with_interventions(adapter, corrupt, [patch], logits_at=-1).logits[0]
        return float(logits[CORRECT] - logits[WRONG])

    slope = (metric_at(eps) - metric_at(-eps)) / (2 * eps)
    first_order = float((atp.values - atp.corrupt_metric).sum())
    assert first_order == pytest.approx(slope, rel=2e-2, abs=5e-3)
    if SITE_KINDS[kind].per_head:
        heads = patching.attribution_patching(
            adapter, clean, corrupt, site=kind, metric=metric, layers=[LAYER], per_head=True
        )
        n = adapter.n_kv_heads if SITE_KINDS[kind].kv else adapter.n_heads
        assert heads.values.shape == (1, n)
        assert float((heads.values - heads.corrupt_metric).sum()) == pytest.approx(
            first_order, abs=1e-5
        )


# -- the table is complete, and the arrows point one way ------------------------------------
def test_every_site_kind_has_a_locator_that_answers_for_every_family():
    for family in FAMILIES:
        adapter = oculi.attach(tiny_model(family))
        for kind in SITE_KINDS.values():
            loc = kind.locate(adapter)
            if _refusal(family, kind.name, patching_api=False) is not None:
                assert loc.write is None and (loc.readonly or loc.absent)
            else:
                assert loc.write is not None, (family, kind.name)
            assert (loc.read is not None) or loc.derived or loc.absent, (family, kind.name)


def test_capture_does_not_import_the_adapter():
    """``models/adapter.py`` is a facade above ``capture/``; nothing in capture imports it."""
    root = pathlib.Path(oculi.__file__).parent / "capture"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            assert not any(n.startswith("oculi.models.adapter") for n in names), path.name
