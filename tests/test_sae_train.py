"""Training SAEs: a planted dictionary is recovered, and a SIGKILLed run resumes bit for bit.

The planted dictionary is the identity-style check of dictionary learning: data made as
sparse non-negative combinations of known random unit atoms (plus an offset); a trained SAE's
decoder rows must find at least 90% of the atoms with cosine ≥ 0.9.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import oculi
from models import WORDS, tiny_model, tiny_tokenizer
from oculi.sae import load_sae, train
from oculi.sae.train import geometric_median

TESTS = Path(__file__).parent


def planted(d=32, n_atoms=64, k=3, n=65536, seed=0):
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n_atoms, d, generator=g)
    atoms = atoms / atoms.norm(dim=1, keepdim=True)
    idx = torch.stack([torch.randperm(n_atoms, generator=g)[:k] for _ in range(n)])
    coef = torch.rand(n, k, generator=g) + 0.5
    x = torch.zeros(n, n_atoms).scatter_(1, idx, coef) @ atoms + 0.3
    return atoms, x


def recovered(atoms, sae) -> float:
    w = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    return float(((atoms @ w.T).max(1).values >= 0.9).float().mean())


@pytest.mark.parametrize(
    "kind, options",
    [
        ("topk", dict(k=3)),
        ("batchtopk", dict(k=3)),  # inference uses the learned threshold, not the batch
        ("jumprelu", dict(l0_coefficient=0.02)),
    ],
)
def test_planted_dictionary_is_recovered(kind, options):
    atoms, x = planted()
    sae = train(x, d_sae=128, kind=kind, batch_rows=512, n_tokens=4 * len(x), lr=5e-3,
                seed=1, progress=False, **options)  # fmt: skip
    assert recovered(atoms, sae) >= 0.9
    assert sae.fvu(x[:4096]) < 0.15
    assert 2 <= sae.l0(x[:4096]) <= 6  # the data has 3 atoms per row
    torch.testing.assert_close(sae.decoder_norms(), torch.ones(128), atol=1e-5, rtol=0)
    hist = sae.metadata["training"]["history"]
    assert hist[-1]["step"] == 4 * len(x) // 512 and hist[-1]["fvu"] < hist[0]["fvu"]


def test_geometric_median_minimises_summed_distance():
    scipy_opt = pytest.importorskip("scipy.optimize")
    g = torch.Generator().manual_seed(0)
    pts = torch.randn(300, 5, generator=g, dtype=torch.float64)
    pts[:30] += 40.0  # outliers pull the mean, not the median
    got = geometric_median(pts)
    ref = scipy_opt.minimize(lambda p: float((pts - torch.from_numpy(p)).norm(dim=1).sum()),
                             pts.mean(0).numpy(), method="Nelder-Mead",
                             options=dict(xatol=1e-10, fatol=1e-12, maxiter=40000)).x  # fmt: skip
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-4)


def test_bad_training_options():
    x = torch.randn(1000, 8)
    with pytest.raises(ValueError, match="kind='topk' needs k"):
        train(x, d_sae=16, kind="topk", progress=False)
    with pytest.raises(TypeError, match=r"unknown options \['learning_rate'\]"):
        train(x, d_sae=16, kind="relu", learning_rate=1e-3, progress=False)
    with pytest.raises(ValueError, match="make no batch of batch_rows=4096"):
        train(x, d_sae=16, kind="relu", progress=False)
    with pytest.raises(FileNotFoundError, match="is not an existing folder"):
        train(x, d_sae=16, kind="relu", batch_rows=100, out="/nonexistent/dir", progress=False)


# -- kill and resume --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    pytest.importorskip("zarr")
    out = tmp_path_factory.mktemp("acts")
    rng = np.random.default_rng(0)
    prompts = [" ".join(rng.choice(WORDS, rng.integers(3, 14))) for _ in range(300)]
    ad = oculi.attach(tiny_model("gemma3"), tiny_tokenizer())
    oculi.harvest(ad, prompts, sites="resid_post", layers=[1], out=out, chunk_rows=64,
                  unit_rows=512, progress=False)  # fmt: skip
    return out


_RUN = """
import sys, time
import oculi.sae.objectives as obj
if {slow}:
    step = obj.Objective.step
    obj.Objective.step = lambda *a: (time.sleep(0.03), step(*a))[1]   # slow enough to kill
from oculi.sae import train
train({store!r}, "resid_post", 1, d_sae=96, kind="topk", k=6, out={out!r}, batch_rows=64,
      n_tokens=3 * 64 * 40, checkpoint_every=64 * 7, dead_tokens=640, lr=3e-3, progress=False)
"""


def _run(store, out, slow=False):
    script = _RUN.format(store=str(store), out=str(out), slow=slow)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", script], env=env)


def test_sigkill_mid_training_then_rerun_equals_uninterrupted(store_path, tmp_path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    killed.mkdir()
    clean.mkdir()
    proc = _run(store_path, killed, slow=True)
    ckpt = killed / "checkpoint.safetensors"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None and not ckpt.exists():
            time.sleep(0.01)
        time.sleep(0.5)  # a little past the first checkpoint, before the end
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert ckpt.exists() and not (killed / "sae.safetensors").exists(), "kill must land mid-run"
    from oculi.sae.checkpoint import FORMAT  # noqa: F401 - the file is a checkpoint

    assert _run(store_path, killed).wait() == 0  # the same call again: resumes
    assert _run(store_path, clean).wait() == 0  # never interrupted
    a, b = load_sae(killed / "sae.safetensors"), load_sae(clean / "sae.safetensors")
    for name, p in b.named_parameters():
        assert torch.equal(getattr(a, name), p), name  # bit for bit
    ta, tb = a.metadata["training"], b.metadata["training"]
    assert ta["history"] == tb["history"] and ta["steps"] == tb["steps"] == 120
    assert ta["data"]["store"] == str(store_path) and ta["data"]["model"]["family"] == "gemma3"
    # the same call once more returns the finished SAE; other options are refused
    again = train(store_path, "resid_post", 1, d_sae=96, kind="topk", k=6, out=clean,
                  batch_rows=64, n_tokens=3 * 64 * 40, checkpoint_every=64 * 7, dead_tokens=640,
                  lr=3e-3, progress=False)  # fmt: skip
    assert torch.equal(again.W_dec, b.W_dec)
    with pytest.raises(ValueError, match=r"another configuration \(d_sae: 96 there, 48 now"):
        train(store_path, "resid_post", 1, d_sae=48, kind="topk", k=6, out=clean,
              batch_rows=64, n_tokens=3 * 64 * 40, checkpoint_every=64 * 7, dead_tokens=640,
              lr=3e-3, progress=False)  # fmt: skip


def test_auxk_term_by_hand():
    """AuxK: the dead latents' own top-k_aux reconstruct the detached residual error; live
    latents get no gradient from it."""
    from oculi.sae import SAE
    from oculi.sae.objectives import Objective

    sae = SAE(16, 40, "topk", k=4).init_weights(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 16, generator=g)
    dead = torch.zeros(40, dtype=torch.bool)
    dead[::3] = True  # 14 dead latents
    on = Objective("topk", 4, aux_coefficient=0.5, k_aux=5)
    off = Objective("topk", 4, aux_coefficient=0.0)
    out_on, out_off = on.step(sae, x, x, dead), off.step(sae, x, x, dead)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    top = pre.relu().topk(4, dim=-1)
    x_hat = torch.zeros_like(pre).scatter(-1, top.indices, top.values) @ sae.W_dec + sae.b_dec
    e = (x - x_hat).detach()
    d_pre = pre.masked_fill(~dead, -float("inf")).topk(5, dim=-1)
    e_hat = torch.zeros_like(pre).scatter(-1, d_pre.indices, d_pre.values.relu()) @ sae.W_dec
    aux = (e_hat - e).square().sum() / (e - e.mean(0)).square().sum()
    torch.testing.assert_close(out_on.loss - out_off.loss, 0.5 * aux, atol=1e-6, rtol=1e-5)
    (g_on,) = torch.autograd.grad(out_on.loss, sae.W_enc)
    (g_off,) = torch.autograd.grad(out_off.loss, sae.W_enc)
    diff = (g_on - g_off).abs().sum(0)  # per latent
    assert (diff[~dead] == 0).all() and (diff[dead] > 0).any()


def test_store_training_reads_raw_activations(store_path):
    store = oculi.open_harvest(store_path)
    x = torch.from_numpy(np.asarray(store["resid_post", 1]))
    sae = train(store, "resid_post", 1, d_sae=128, kind="topk", k=8, batch_rows=128,
                n_tokens=6 * store.n_rows, lr=3e-3, progress=False)  # fmt: skip
    # trained on scaled rows, saved for raw ones: the FVU on the raw store is what it reached
    assert sae.fvu(x) < 0.45
    assert abs(sae.fvu(x) - sae.metadata["training"]["final"]["fvu"]) < 0.05
    assert (sae.site, sae.layer, sae.l0(x)) == ("resid_post", 1, 8.0)
    scaled = train(store, "resid_post", 1, d_sae=128, kind="topk", k=8, batch_rows=128,
                   n_tokens=6 * store.n_rows, lr=3e-3, progress=False, normalize="none")  # fmt: skip
    assert scaled.fvu(x) < 0.45


def test_cli_train_then_evaluate(store_path, tmp_path):
    from click.testing import CliRunner

    from oculi.cli import cli

    out = tmp_path / "sae"
    out.mkdir()
    args = ["sae", "train", "--store", str(store_path), "--site", "resid_post", "--layer", "1",
            "--d-sae", "64", "--k", "4", "--out", str(out), "--batch-rows", "128", "--quiet"]  # fmt: skip
    done = CliRunner().invoke(cli, args)
    assert done.exit_code == 0, done.output
    assert "topk SAE, 64 latents on resid_post of layer 1" in done.output
    sae = load_sae(out / "sae.safetensors")
    store = oculi.open_harvest(store_path)
    assert sae.metadata["training"]["tokens"] == store.n_rows // 128 * 128
    bad = CliRunner().invoke(cli, [*args[:6], "--layer", "7", *args[8:]])
    assert bad.exit_code == 2 and "not in this store" in bad.output


@pytest.mark.parametrize("skip", [False, True])
def test_transcoder_training_folds_both_scales(skip):
    """A transcoder reads x and predicts y (here both made from the same sparse codes, at
    different scales and offsets): the saved one maps raw x to raw y as well as in training."""
    g = torch.Generator().manual_seed(0)
    n, atoms = 32768, 48
    d_in, d_out = torch.randn(atoms, 24, generator=g), 5 * torch.randn(atoms, 16, generator=g)
    idx = torch.stack([torch.randperm(atoms, generator=g)[:3] for _ in range(n)])
    codes = torch.zeros(n, atoms).scatter_(1, idx, torch.rand(n, 3, generator=g) + 0.5)
    x, y = codes @ d_in + 1.0, codes @ d_out - 2.0
    tc = train(x, "mlp_in", 1, d_sae=96, kind="topk", k=3, targets=y, target_site="mlp_out",
               skip=skip, batch_rows=512, n_tokens=4 * n, lr=5e-3, progress=False)  # fmt: skip
    assert (tc.site, tc.write_site, tc.layer, tc.is_transcoder) == ("mlp_in", "mlp_out", 1, True)
    assert (tc.W_skip is not None) == skip and not tc.center_input
    raw = tc.fvu(x[:8192], y[:8192])
    assert raw < 0.5
    assert raw == pytest.approx(tc.metadata["training"]["final"]["fvu"], abs=0.06)


def test_sparse_topk_encoder_gradients_equal_dense_autograd():
    from oculi.sae.objectives import _SparseTopK

    g = torch.Generator().manual_seed(0)
    x, w, b = (
        torch.randn(*s, generator=g, requires_grad=True) for s in ((64, 16), (16, 40), (40,))
    )
    b.data -= 9.0  # some rows have fewer than k positive latents, so ReLU masks kept ones
    weights = torch.randn(64, 5, generator=g)
    values, idx, _ = _SparseTopK.apply(x, w, b, 5)
    grads = torch.autograd.grad((values * weights).sum(), (x, w, b))
    dense = torch.relu(x @ w + b).gather(-1, idx)  # the same entries through plain autograd
    torch.testing.assert_close(values, dense, atol=1e-6, rtol=0)
    want = torch.autograd.grad((dense * weights).sum(), (x, w, b))
    for got, ref in zip(grads, want):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert (values == 0).any()  # the ReLU mask was exercised


def test_topk_training_steps_equal_sparsifys_from_the_same_start():
    """oculi's TopK step (sparse encoder and decoder, decoder-gradient projection, unit-norm
    decoder, Adam) against EleutherAI sparsify's SparseCoder stepped by hand from the same
    weights on the same batches: the same SAE after every step."""
    sparsify = pytest.importorskip("sparsify")
    n, d, d_sae, k, steps, lr = 512, 16, 64, 4, 6, 1e-3
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g) * torch.linspace(0.5, 3.0, d) + 1.0
    ours = train(x, d_sae=d_sae, kind="topk", k=k, batch_rows=n, n_tokens=n * steps, lr=lr,
                 warmup_steps=0, decay_fraction=0.0, b_dec_init="mean", normalize="none",
                 progress=False)  # fmt: skip
    start = oculi.sae.SAE(d, d_sae, "topk", k=k).init_weights(0)  # train's start (seed 0)
    coder = sparsify.SparseCoder(d, sparsify.SparseCoderConfig(num_latents=d_sae, k=k))
    with torch.no_grad():
        coder.encoder.weight.copy_(start.W_enc.T)
        coder.encoder.bias.zero_()
        coder.W_dec.copy_(start.W_dec)
        coder.b_dec.copy_(x.double().mean(0).float())
    opt = torch.optim.Adam(coder.parameters(), lr=lr)
    for _ in range(steps):
        coder(x).fvu.backward()
        coder.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        coder.set_decoder_norm_to_unit_norm()
    for mine, theirs in (
        (ours.W_enc, coder.encoder.weight.T),
        (ours.b_enc, coder.encoder.bias),
        (ours.W_dec, coder.W_dec),
        (ours.b_dec, coder.b_dec),
    ):
        torch.testing.assert_close(mine, theirs.detach(), atol=2e-5, rtol=0)
    moved = (ours.W_dec - start.W_dec).abs().max()
    assert moved > 1e-3  # six steps of 1e-3 moved the weights: the comparison is not vacuous
