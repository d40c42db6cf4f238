"""ReLU SAEs: the planted dictionary is recovered, and dead-latent resampling does what
"Towards Monosemanticity" describes, checked entry by entry against a hand computation."""

from __future__ import annotations

import pytest
import torch

from oculi.sae import SAE, train
from oculi.sae.resample import resample_dead
from test_sae_train import planted, store_path  # noqa: F401 - a fixture used below


def test_relu_recovers_the_planted_dictionary():
    atoms, x = planted()
    sae = train(x, d_sae=128, kind="relu", batch_rows=512, n_tokens=12 * len(x), lr=5e-3,
                l1_coefficient=0.1, seed=1, progress=False)  # fmt: skip
    w = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    best = (atoms @ w.T).max(1).values  # each atom's closest decoder row
    assert float((best >= 0.9).float().mean()) >= 0.9
    assert sae.fvu(x[:4096]) < 0.25  # L1 shrinks activations: a ReLU SAE pays some FVU
    assert 2 <= sae.l0(x[:4096]) <= 8  # the data has 3 atoms per row
    # resampling ran (an eighth of the run apart, in its first half) and is recorded
    done = sae.metadata["training"]["resampled"]
    assert [r["tokens"] for r in done] == [98304 * i for i in range(1, 5)]


def test_resample_dead_by_hand():
    torch.manual_seed(0)
    sae = SAE(8, 16, "relu").init_weights(3)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(8) * 0.1)
        sae.b_enc.copy_(torch.randn(16) * 0.1)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    x = torch.randn(50, 8)
    ((x - sae(x)) ** 2).sum().backward()
    opt.step()  # Adam now has moments for every parameter
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    moments = {
        n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in sae.named_parameters()
    }
    worst = [7, 20, 33]
    x[worst] *= 1000  # by far the worst reconstructed: drawn (p ∝ loss², no row twice)
    dead = torch.zeros(16, dtype=torch.bool)
    dead[[2, 5, 11]] = True
    g = torch.Generator().manual_seed(0)
    assert resample_dead(sae, x, x, dead, opt, g) == 3
    centred = x[worst] - before["b_dec"]
    directions = centred / centred.norm(dim=1, keepdim=True)  # [3, d]
    alive_norm = before["W_enc"][:, ~dead].norm(dim=0).mean()
    used = []
    for i in range(16):
        if dead[i]:
            row = int((directions @ sae.W_dec[i].detach()).argmax())
            used.append(row)
            torch.testing.assert_close(sae.W_dec[i], directions[row])
            torch.testing.assert_close(sae.W_enc[:, i], 0.2 * alive_norm * directions[row])
            assert float(sae.b_enc[i].detach()) == 0.0
        else:
            assert torch.equal(sae.W_dec[i], before["W_dec"][i])
            assert torch.equal(sae.W_enc[:, i], before["W_enc"][:, i])
            assert torch.equal(sae.b_enc[i], before["b_enc"][i])
    assert sorted(used) == [0, 1, 2]  # each worst row went to one dead latent
    assert torch.equal(sae.b_dec, before["b_dec"])
    for name, rows_dim in (("W_dec", 0), ("W_enc", 1), ("b_enc", 0)):
        p = dict(sae.named_parameters())[name]
        for key in ("exp_avg", "exp_avg_sq"):
            m, m0 = opt.state[p][key], moments[name][key]
            dead_part = m.index_select(rows_dim, dead.nonzero()[:, 0])
            assert bool((dead_part == 0).all())
            live = (~dead).nonzero()[:, 0]
            assert torch.equal(m.index_select(rows_dim, live), m0.index_select(rows_dim, live))
    # nothing dead: nothing changes
    assert resample_dead(sae, x, x, torch.zeros(16, dtype=torch.bool), opt, g) == 0


def test_resample_options_are_checked():
    x = torch.randn(64, 4)
    with pytest.raises(ValueError, match="resample_every"):
        train(x, d_sae=8, kind="relu", batch_rows=16, resample_every=-1, progress=False)
    with pytest.raises(ValueError, match="resample_rows"):
        train(x, d_sae=8, kind="relu", batch_rows=16, resample_rows=0, progress=False)


def test_cli_resample_every(store_path, tmp_path):  # noqa: F811 - the imported fixture
    from click.testing import CliRunner

    from oculi.cli import cli
    from oculi.sae import load_sae

    out = tmp_path / "relu"
    out.mkdir()
    args = ["sae", "train", "--store", str(store_path), "--site", "resid_post", "--layer", "1",
            "--d-sae", "32", "--kind", "relu", "--out", str(out), "--batch-rows", "128",
            "--resample-every", "512", "--quiet"]  # fmt: skip
    done = CliRunner().invoke(cli, args)
    assert done.exit_code == 0, done.output
    training = load_sae(out / "sae.safetensors").metadata["training"]
    assert training["config"]["resample_every"] == 512
    half = training["tokens"] // 2
    assert [r["tokens"] for r in training["resampled"]] == list(range(512, half + 1, 512))
