"""Linear probes on a harvest store: a direction planted in real activations is found, the
held-out split is by prompt, and the direction steers through SteeringVector."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import oculi
from models import tiny_model, tiny_tokenizer
from oculi.intervention import InterventionContext, SteeringVector
from test_harvest import SMALL, word_prompts

pytest.importorskip("sklearn")
pytest.importorskip("zarr")


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A store of tiny Gemma 3 activations and labels set by a planted direction.

    Labels are drawn from a logistic model along a random unit direction ``w`` of the
    (centred) layer-1 residual, so the probe's population optimum points along ``w``.
    """
    adapter = oculi.attach(tiny_model("gemma3"), tiny_tokenizer())
    out = tmp_path_factory.mktemp("probe")
    oculi.harvest(adapter, word_prompts(400, seed=5), sites="resid_post", layers=[1], out=out,
                  split=0.25, **SMALL)  # fmt: skip
    store = oculi.open_harvest(out)
    x = np.asarray(store["resid_post", 1]).astype(np.float64)
    rng = np.random.default_rng(0)
    w = rng.standard_normal(x.shape[1])
    w /= np.linalg.norm(w)
    score = (x - x.mean(0)) @ w
    p = 1 / (1 + np.exp(-4 * score / score.std()))
    labels = rng.random(len(p)) < p
    return adapter, store, w, labels


def cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("method", ["sklearn", "torch"])
def test_probe_finds_planted_direction(planted, method):
    _, store, w, labels = planted
    result = oculi.probe.fit(store, "resid_post", 1, labels, method=method, C=10.0)
    assert result.classes == [False, True]
    assert cosine(result.direction, w) >= 0.9
    # the held-out rows are the index's "test" prompts
    assert result.n_test == len(store.rows_of("test"))
    assert result.n_train + result.n_test == store.n_rows
    # Bayes accuracy of the planted model, computed from the labels' probabilities
    assert result.accuracy > 0.75 and result.train_accuracy > 0.75


def test_probe_per_prompt_labels_and_steering(planted):
    adapter, store, w, _ = planted
    pid = store.index.column("prompt_id").to_numpy()
    last = np.flatnonzero(np.r_[pid[1:] != pid[:-1], True])
    x_last = np.asarray(store["resid_post", 1])[last]
    per_prompt = ((x_last - x_last.mean(0)) @ w > 0).tolist()
    result = oculi.probe.fit(store, "resid_post", 1, per_prompt, position="last", C=100.0)
    assert result.n_train + result.n_test == len(per_prompt)
    assert result.accuracy >= 0.9
    assert cosine(result.direction, w) >= 0.8
    vec = result.steering_vector(coefficient=3.0)
    assert isinstance(vec, SteeringVector) and vec.layer == 1 and vec.site == "resid_post"
    assert torch.allclose(vec.vector.norm(), torch.tensor(1.0))
    plain = adapter.forward("the cat sat")
    with InterventionContext(adapter, [SteeringVector(result.direction, 1, 3.0, scale=vec.scale)]):
        steered = adapter.forward("the cat sat")
    with InterventionContext(adapter, [vec]):
        again = adapter.forward("the cat sat")
    assert not torch.allclose(plain, steered) and torch.equal(steered, again)


def test_probe_errors(planted):
    _, store, _, labels = planted
    with pytest.raises(oculi.InputError, match=r"one per row \(\d+\) or per prompt \(400\)"):
        oculi.probe.fit(store, "resid_post", 1, labels[:10])
    with pytest.raises(oculi.InputError, match="needs two or more"):
        oculi.probe.fit(store, "resid_post", 1, [True] * store.n_rows)
    with pytest.raises(KeyError, match="not in this store"):
        oculi.probe.fit(store, "resid_post", 0, labels)
    with pytest.raises(oculi.InputError, match="method must be"):
        oculi.probe.fit(store, "resid_post", 1, labels, method="svm")
