"""SAE files: oculi's own round trip, and SAELens / sparsify / Gemma Scope files loaded in oculi.

Interoperability is checked against the libraries themselves (the ``sae-compare`` extra):
small random SAEs are made with SAELens' and sparsify's own classes, saved with their own
save functions, loaded here, and compared on ``encode``/``decode`` with the library's own
methods; oculi's SAELens files are loaded back by SAELens. Without the libraries those tests
skip. Gemma Scope ships ``params.npz`` files (no library to write them); its JumpReLU is
checked against the formula of its release notes computed here.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from oculi.sae import SAE, SAEFormatError, latent_stats, load_sae, load_saes

TOL = 1e-6


def random_sae(kind="topk", d_in=16, d_sae=48, seed=0, **kw) -> SAE:
    k = {"k": 5} if kind in ("topk", "batchtopk") else {}
    sae = SAE(d_in, d_sae, kind, site="resid_post", layer=1, **k, **kw).init_weights(seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in (sae.b_enc, sae.b_dec):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        sae.W_dec.mul_(1 + torch.rand(sae.d_sae, 1, generator=g))  # norms != 1
        if kind in ("jumprelu", "batchtopk"):
            sae.threshold.copy_(0.2 * torch.rand(sae.d_sae, generator=g))
        if sae.W_skip is not None:
            sae.W_skip.copy_(0.1 * torch.randn(sae.W_skip.shape, generator=g))
    return sae


def x_of(d=16, n=64, seed=5):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


# -- the SAE itself ---------------------------------------------------------------------------
def test_encode_decode_match_the_formulas():
    x = x_of()
    for kind in ("relu", "topk", "jumprelu"):
        sae = random_sae(kind)
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        if kind == "relu":
            want = pre.clamp_min(0)
        elif kind == "jumprelu":
            want = torch.where(pre > sae.threshold, pre, 0).clamp_min(0)
        else:  # the 5 largest per row, set by hand
            want = torch.zeros_like(pre)
            for r in range(pre.shape[0]):
                idx = sorted(range(pre.shape[1]), key=lambda i: -float(pre[r, i].detach()))[:5]
                want[r, idx] = pre[r, idx].clamp_min(0)
        a = sae.encode(x)
        torch.testing.assert_close(a, want, rtol=0, atol=1e-6)
        torch.testing.assert_close(sae.decode(a), want @ sae.W_dec + sae.b_dec, rtol=0, atol=1e-5)
        assert sae.l0(x) == pytest.approx(float((want > 0).sum(1).float().mean()))
        err = (x - sae(x)).detach().double()
        assert sae.fvu(x) == pytest.approx(
            float(err.square().sum() / (x.double() - x.double().mean(0)).square().sum())
        )


def test_transcoder_with_skip_and_dtypes():
    tc = random_sae("relu", d_in=16, d_sae=40, d_out=24, write_site="mlp_out", skip=True,
                    center_input=False)  # fmt: skip
    x = x_of()
    want = torch.relu(x @ tc.W_enc + tc.b_enc) @ tc.W_dec + tc.b_dec + x @ tc.W_skip
    torch.testing.assert_close(tc(x), want, rtol=0, atol=1e-5)
    assert tc.is_transcoder and tc(x).shape == (64, 24)
    half = random_sae("topk").to(torch.bfloat16)
    assert half.encode(x).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"x has shape \[64, 16\], expected \[\.\.\., d_in=24\]"):
        random_sae("relu", d_in=24).encode(x)


def test_normalize_decoder_keeps_the_map():
    for kind in ("relu", "jumprelu"):
        sae = random_sae(kind)
        x = x_of()
        before = sae(x)
        sae.normalize_decoder_()
        torch.testing.assert_close(sae.decoder_norms(), torch.ones(sae.d_sae), atol=1e-6, rtol=0)
        torch.testing.assert_close(sae(x), before, atol=1e-5, rtol=0)


def test_latent_stats_count_by_hand():
    sae = random_sae("relu")
    with torch.no_grad():
        sae.b_enc[:4] = -100.0  # four latents that cannot fire
    x = x_of(n=100)
    stats = latent_stats(sae, x, batch_rows=7)  # batches that do not divide the rows
    a = sae.encode(x).detach()
    assert stats.n_tokens == 100
    assert torch.equal(stats.counts, (a > 0).sum(0))
    torch.testing.assert_close(stats.density, (a > 0).double().mean(0))
    assert stats.dead().tolist() == (a > 0).sum(0).eq(0).nonzero().flatten().tolist()
    assert set(range(4)) <= set(stats.dead().tolist())
    assert (
        stats.dense(0.5).tolist() == ((a > 0).double().mean(0) > 0.5).nonzero().flatten().tolist()
    )
    torch.testing.assert_close(stats.max, a.amax(0))
    assert latent_stats(sae, [x[:30], x[30:]]).counts.tolist() == stats.counts.tolist()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kind="topk"), r"kind='topk' needs k"),
        (dict(kind="relu", k=3), r"takes no k"),
        (dict(kind="topk", k=99), r"k=99 exceeds d_sae=48 \(valid 1\.\.48\)"),
        (dict(kind="gated"), r"kind must be one of relu, topk, batchtopk, jumprelu"),
        (dict(site="resid_pots", layer=1), r"unknown site 'resid_pots'.*resid_post"),
        (dict(site="resid_post"), r"give both site and layer or neither"),
        (dict(d_out=8), r"center_input subtracts b_dec"),
    ],
)
def test_bad_constructor_arguments(kwargs, message):
    with pytest.raises((ValueError, KeyError), match=message):
        SAE(16, 48, **kwargs)


# -- oculi's own file -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["relu", "topk", "batchtopk", "jumprelu"])
def test_oculi_round_trip_is_bit_exact(tmp_path, kind):
    sae = random_sae(kind)
    sae.metadata = {"model": {"class": "X"}, "training": {"tokens": 123}}
    sae.save(tmp_path / "s.safetensors")
    back = load_sae(tmp_path / "s.safetensors")
    for name, p in sae.named_parameters():
        assert torch.equal(p, getattr(back, name)), name
    assert (back.kind, back.k, back.site, back.layer) == (kind, sae.k, "resid_post", 1)
    assert back.metadata == sae.metadata
    with pytest.raises(FileExistsError, match="overwrite=False"):
        sae.save(tmp_path / "s.safetensors", overwrite=False)


def test_refused_paths_name_what_they_hold(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "cfg.json").write_text("{}")
    with pytest.raises(
        SAEFormatError, match=r"no SAE layout fits .* holds \['cfg.json', 'notes.txt'\]"
    ):
        load_sae(tmp_path)
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(SAEFormatError, match="without oculi's SAE header"):
        load_sae(tmp_path / "w.safetensors")
    with pytest.raises(SAEFormatError, match="is a .txt file"):
        load_sae(tmp_path / "notes.txt")
    np.savez(tmp_path / "params.npz", W_enc=np.zeros((2, 3)))
    with pytest.raises(SAEFormatError, match=r"holds arrays \['W_enc'\]"):
        load_sae(tmp_path / "params.npz")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_sae(tmp_path / "missing")


def test_gemma_scope_npz(tmp_path):
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_12" / "width_16k" / "average_l0_82"
    folder.mkdir(parents=True)
    g = np.random.default_rng(0)
    p = {
        "W_enc": g.normal(size=(16, 40)).astype(np.float32),
        "W_dec": g.normal(size=(40, 16)).astype(np.float32),
        "b_enc": g.normal(size=40).astype(np.float32),
        "b_dec": g.normal(size=16).astype(np.float32),
        "threshold": g.uniform(0, 1, size=40).astype(np.float32),
    }
    np.savez(folder / "params.npz", **p)
    sae = load_sae(folder).requires_grad_(False)
    assert (sae.kind, sae.site, sae.layer, sae.center_input) == (
        "jumprelu",
        "resid_post",
        12,
        False,
    )
    x = x_of().numpy()
    pre = x @ p["W_enc"] + p["b_enc"]  # Gemma Scope: no b_dec subtracted from the input
    acts = (pre > p["threshold"]) * np.maximum(pre, 0)
    np.testing.assert_allclose(sae.encode(torch.from_numpy(x)).numpy(), acts, atol=TOL)
    np.testing.assert_allclose(
        sae.decode(torch.from_numpy(acts)).numpy(), acts @ p["W_dec"] + p["b_dec"], atol=1e-5
    )
    other = tmp_path / "elsewhere"
    other.mkdir()
    np.savez(other / "params.npz", **p)
    with pytest.raises(SAEFormatError, match="pass site= and layer="):
        load_sae(other)
    assert load_sae(other, site="mlp_out", layer=3).site == "mlp_out"


# -- SAELens, with SAELens itself -------------------------------------------------------------
def _saelens_sae(arch: str, seed: int = 0):
    sl = pytest.importorskip("sae_lens")
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    meta = SAEMetadata(hook_name="blocks.1.hook_resid_post", model_name="tiny")
    if arch == "standard":
        m = sl.StandardSAE(sl.StandardSAEConfig(d_in=16, d_sae=48, metadata=meta))
    elif arch == "topk":
        m = sl.TopKSAE(sl.TopKSAEConfig(d_in=16, d_sae=48, k=5, metadata=meta))
    elif arch == "topk_rescaled":
        cfg = sl.TopKSAEConfig(d_in=16, d_sae=48, k=5, metadata=meta,
                               rescale_acts_by_decoder_norm=True)  # fmt: skip
        m = sl.TopKSAE(cfg)
    elif arch == "jumprelu":
        m = sl.JumpReLUSAE(sl.JumpReLUSAEConfig(d_in=16, d_sae=48, metadata=meta))
    else:
        from sae_lens.saes.transcoder import SkipTranscoder, SkipTranscoderConfig

        meta = SAEMetadata(hook_name="blocks.1.ln2.hook_normalized",
                           hook_name_out="blocks.1.hook_mlp_out")  # fmt: skip
        cfg = SkipTranscoderConfig(d_in=16, d_sae=48, d_out=24, metadata=meta,
                                   apply_b_dec_to_input=False)  # fmt: skip
        m = SkipTranscoder(cfg)
    with torch.no_grad():  # random everything, decoder norms far from 1
        for name, p in m.named_parameters():
            p.copy_(torch.randn(p.shape) * (0.3 if name.startswith("b_") else 1.0))
        if hasattr(m, "threshold"):
            m.threshold.copy_(torch.rand(48) * 2)
    return m


@pytest.mark.parametrize(
    "arch", ["standard", "topk", "topk_rescaled", "jumprelu", "skip_transcoder"]
)
def test_saelens_files_load_with_the_same_maps(tmp_path, arch):
    theirs = _saelens_sae(arch)
    theirs.save_model(tmp_path / "sae")
    ours = load_sae(tmp_path / "sae")
    x = x_of()
    with torch.no_grad():
        a_theirs = theirs.encode(x)
        # folding the decoder norms into the encoder rounds once more: relative 1e-6 there
        rtol = 1e-6 if arch == "topk_rescaled" else 0
        torch.testing.assert_close(ours.encode(x), a_theirs, atol=TOL, rtol=rtol)
        if arch == "skip_transcoder":
            torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=0)
            assert (ours.site, ours.write_site, ours.layer) == ("mlp_in", "mlp_out", 1)
        else:
            torch.testing.assert_close(
                ours.decode(a_theirs), theirs.decode(a_theirs), atol=1e-5, rtol=0
            )
            assert (ours.site, ours.layer) == ("resid_post", 1)


@pytest.mark.parametrize("kind", ["relu", "topk", "jumprelu", "batchtopk"])
def test_oculi_saves_load_back_into_saelens(tmp_path, kind):
    sl = pytest.importorskip("sae_lens")
    ours = random_sae(kind)
    ours.save(tmp_path, format="saelens")
    theirs = sl.SAE.load_from_disk(tmp_path)
    x = x_of()
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), ours.encode(x), atol=TOL, rtol=0)
        a = ours.encode(x)
        torch.testing.assert_close(theirs.decode(a), ours.decode(a), atol=1e-5, rtol=0)
    assert theirs.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    assert load_sae(tmp_path).kind == ("jumprelu" if kind == "batchtopk" else kind)


def test_saelens_options_oculi_does_not_model_are_refused(tmp_path):
    theirs = _saelens_sae("standard")
    theirs.save_model(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "architecture": "gated"}))
    with pytest.raises(SAEFormatError, match="architecture 'gated' is not one oculi models"):
        load_sae(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "normalize_activations": "layer_norm"}))
    with pytest.raises(SAEFormatError, match="normalize_activations='layer_norm'"):
        load_sae(tmp_path)


# -- sparsify, with sparsify itself -----------------------------------------------------------
@pytest.mark.parametrize("transcode", [False, True])
def test_sparsify_files_load_with_the_same_maps(tmp_path, transcode):
    sp = pytest.importorskip("sparsify")
    torch.manual_seed(0)
    cfg = sp.SparseCoderConfig(num_latents=48, k=5, transcode=transcode, skip_connection=transcode)
    theirs = sp.SparseCoder(16, cfg)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn(p.shape) * 0.5)
    for name in ("layers.0", "layers.2.mlp"):
        theirs.save_to_disk(tmp_path / "run" / name)
    ours = load_saes(tmp_path / "run")
    assert list(ours) == ["layers.0", "layers.2.mlp"]
    sae = ours["layers.2.mlp"]
    want_site = ("mlp_in", "mlp_out") if transcode else ("mlp_out", "mlp_out")
    assert (sae.site, sae.write_site, sae.layer) == (*want_site, 2)
    assert (ours["layers.0"].site, ours["layers.0"].layer) == ("resid_post", 0)
    x = x_of()
    with torch.no_grad():
        enc = theirs.encode(x)
        dense = torch.zeros(64, 48).scatter_(-1, enc.top_indices, enc.top_acts)
        torch.testing.assert_close(sae.encode(x), dense, atol=TOL, rtol=0)
        torch.testing.assert_close(sae(x), theirs(x).sae_out, atol=1e-5, rtol=0)
    with pytest.raises(SAEFormatError, match=r"SAE folders \['layers.0', 'layers.2.mlp'\]"):
        load_sae(tmp_path / "run")
