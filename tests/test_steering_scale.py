"""Steering vectors from activations carry a scale: the coefficient is a multiple of the
residual's typical norm, so it means the same on every model (issue 17, item 3).

References are independent of oculi's steering code: residual norms from the Hugging Face
model's own ``hidden_states``, steered logits from a plain forward hook that adds the vector by
hand, probe scales from the store's arrays. On Gemma 3 270M every steering example the docs
and the docstrings show is run as written and its stated effect checked.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import oculi
from models import tiny_model, tiny_tokenizer
from oculi.intervention import InterventionContext, SteeringVector

POSITIVE = ["the cat sat on the mat", "a big red dog ran"]
NEGATIVE = ["the king", "a small blue house and a tree"]
PROMPT = "the dog ran to the"


def _hidden(model, tok, text: str, layer: int) -> torch.Tensor:
    """``[T, d]``: the residual leaving ``layer``, from the model's own hidden_states."""
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(ids, output_hidden_states=True).hidden_states[layer + 1][0]


def _added_by_hand(model, tok, text: str, layer: int, vector: torch.Tensor) -> torch.Tensor:
    """Logits ``[T, V]`` with ``vector`` added to the output of decoder layer ``layer``."""
    layers = oculi.attach(model, tok).layer_modules

    def hook(_m, _a, out):
        return (out[0] + vector, *out[1:]) if isinstance(out, tuple) else out + vector

    handle = layers[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model(tok(text, return_tensors="pt")["input_ids"]).logits[0]
    finally:
        handle.remove()


@pytest.mark.parametrize("family", ["llama_gqa", "gemma3", "gpt2"])
@pytest.mark.parametrize("position", [-1, "mean"])
def test_the_coefficient_is_a_multiple_of_the_median_residual_norm(family, position):
    model, tok = tiny_model(family), tiny_tokenizer()
    adapter, layer, c = oculi.attach(model, tok), 1, 0.3
    vec = SteeringVector.from_contrast(adapter, POSITIVE, NEGATIVE, layer=layer,
                                       position=position, coefficient=c)  # fmt: skip
    rows = {t: _hidden(model, tok, t, layer) for t in POSITIVE + NEGATIVE}
    read = [h[-1:] if position == -1 else h for h in rows.values()]  # the tokens it read
    norms = torch.cat(read).double().norm(dim=-1).numpy()
    assert vec.scale == pytest.approx(float(np.median(norms)), rel=1e-5)

    def mean(texts):
        return torch.stack([rows[t][-1] if position == -1 else rows[t].mean(0) for t in texts])

    diff = mean(POSITIVE).mean(0) - mean(NEGATIVE).mean(0)
    torch.testing.assert_close(vec.vector, diff, atol=1e-5, rtol=1e-5)
    want_added = c * float(np.median(norms)) * diff / diff.norm()
    torch.testing.assert_close(vec.added, want_added, atol=1e-4, rtol=1e-5)
    assert float(vec.added.norm()) == pytest.approx(c * vec.scale, rel=1e-5)
    with InterventionContext(adapter, [vec]):
        steered = adapter.forward(PROMPT)
    want = _added_by_hand(model, tok, PROMPT, layer, want_added)
    torch.testing.assert_close(steered, want, atol=1e-4, rtol=1e-4)


def test_raw_vectors_stay_raw():
    model, tok = tiny_model("llama_gqa"), tiny_tokenizer()
    adapter = oculi.attach(model, tok)
    raw = SteeringVector.from_contrast(adapter, POSITIVE, NEGATIVE, layer=1, coefficient=2.0,
                                       relative=False)  # fmt: skip
    assert raw.scale is None
    diff = _hidden(model, tok, POSITIVE[0], 1)[-1] + _hidden(model, tok, POSITIVE[1], 1)[-1]
    diff = diff / 2 - (_hidden(model, tok, NEGATIVE[0], 1)[-1]
                       + _hidden(model, tok, NEGATIVE[1], 1)[-1]) / 2  # fmt: skip
    torch.testing.assert_close(raw.added, 2.0 * diff, atol=1e-5, rtol=1e-5)
    with InterventionContext(adapter, [raw]):
        steered = adapter.forward(PROMPT)
    torch.testing.assert_close(steered, _added_by_hand(model, tok, PROMPT, 1, 2.0 * diff),
                               atol=1e-4, rtol=1e-4)  # fmt: skip
    hand = SteeringVector(diff, 1, 2.0)  # a vector built by hand is added as given
    assert hand.scale is None and torch.equal(hand.added, 2.0 * diff)


def test_with_coefficient_keeps_the_scale_and_repr_shows_it():
    adapter = oculi.attach(tiny_model("llama_gqa"), tiny_tokenizer())
    vec = SteeringVector.from_contrast(adapter, POSITIVE, NEGATIVE, layer=1, coefficient=0.2)
    half = vec.with_coefficient(0.1)
    assert half.scale == vec.scale and half.coefficient == 0.1
    torch.testing.assert_close(half.added * 2, vec.added)
    assert repr(half) == f"SteeringVector(layer=1, coefficient=0.1, scale={round(vec.scale, 4)})"


@pytest.mark.parametrize("scale", [0.0, -3.0])
def test_a_scale_must_be_positive(scale):
    with pytest.raises(ValueError) as info:
        SteeringVector(torch.ones(64), 1, 0.5, scale=scale)
    assert str(info.value) == (
        f"SteeringVector(layer=1): scale is the activations' typical norm, a positive number; "
        f"got {scale:g} (use scale=None to add the vector raw)"
    )
    with pytest.raises(ValueError, match=r"scale must be a finite number, got nan"):
        SteeringVector(torch.ones(64), 1, 0.5, scale=float("nan"))


# -- probes ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def probe_store(tmp_path_factory):
    pytest.importorskip("sklearn")
    pytest.importorskip("zarr")
    from test_harvest import SMALL, word_prompts

    adapter = oculi.attach(tiny_model("gemma3"), tiny_tokenizer())
    out = tmp_path_factory.mktemp("probe")
    prompts = word_prompts(120, seed=2)
    oculi.harvest(adapter, prompts, sites="resid_post", layers=[1], out=out, split=0.25, **SMALL)
    store = oculi.open_harvest(out)
    labels = ["cat" in p or "the" in p.split()[:1] for p in prompts]
    return adapter, store, labels


@pytest.mark.parametrize("method", ["sklearn", "torch"])
def test_a_probe_records_the_median_norm_of_its_training_rows(probe_store, method):
    adapter, store, labels = probe_store
    result = oculi.probe.fit(store, "resid_post", 1, labels, position="all", method=method)
    train = np.setdiff1d(np.arange(store.n_rows), store.rows_of("test"))
    x = np.asarray(store["resid_post", 1])[train].astype(np.float64)
    assert result.n_train == len(train)
    assert result.scale == pytest.approx(float(np.median(np.linalg.norm(x, axis=1))), rel=1e-5)
    vec = result.steering_vector(coefficient=0.2)
    assert vec.scale == result.scale
    assert float(vec.added.norm()) == pytest.approx(0.2 * result.scale, rel=1e-5)
    torch.testing.assert_close(vec.added / vec.added.norm(), result.direction)
    raw = result.steering_vector(coefficient=0.2, raw=True)
    assert raw.scale is None and torch.equal(raw.added, result.direction * 0.2)
    toward_false = result.steering_vector(coefficient=0.2, label=False)
    torch.testing.assert_close(toward_false.added, -vec.added)


def test_a_probe_without_a_scale_refuses_a_relative_coefficient(probe_store):
    _, store, labels = probe_store
    result = oculi.probe.fit(store, "resid_post", 1, labels, position="all")
    result.scale = None
    with pytest.raises(ValueError, match=r"records no scale .* pass raw=True"):
        result.steering_vector(coefficient=0.2)
    assert result.steering_vector(coefficient=0.2, raw=True).scale is None


# -- the examples on Gemma 3 270M ------------------------------------------------------------
def _next(adapter, prompt: str, interventions=()) -> torch.Tensor:
    with InterventionContext(adapter, list(interventions)):
        return torch.softmax(adapter.forward(prompt)[-1].double(), -1)


@pytest.mark.gemma
def test_readme_and_docstring_contrast_example_on_gemma(gemma):
    """docs/guides/change-behaviour.md and oculi.intervention.steering: a quarter of the residual toward "happy"."""
    happy = SteeringVector.from_contrast(gemma, positive=["I am so happy"],
                                         negative=["I am so sad"], layer=6, coefficient=0.25)  # fmt: skip
    assert 3000 < happy.scale < 6000  # Gemma's residual at layer 6: thousands, not ~1
    h, much = gemma.to_single_token(" happy"), gemma.to_single_token(" much")
    plain = _next(gemma, "Today I feel so")
    steered = _next(gemma, "Today I feel so", [happy])
    assert int(plain.argmax()) == much and 0.05 < plain[h] < 0.07  # " much" 0.10, " happy" 0.06
    assert int(steered.argmax()) == h and steered[h] > 0.2  # " happy" 0.25: the top-1
    overshoot = _next(gemma, "Today I feel so", [happy.with_coefficient(0.5)])
    assert overshoot[h] < 0.1
    with InterventionContext(gemma, [happy]):
        text = gemma.generate("Today I feel so", max_new_tokens=4)
    assert text.startswith(" happy") and not gemma.generate("Today I feel so", 4).startswith(
        " happy"
    )


@pytest.mark.gemma
def test_cli_steering_example_on_gemma(gemma, monkeypatch):
    """docs/guides/cli.md's `oculi generate "Today I feel so" --steer ... --layer 6 --compare` (default
    coefficient 0.25), on the already loaded model."""
    import json

    from click.testing import CliRunner

    import oculi.cli.generate as generate
    from oculi.cli import cli

    monkeypatch.setattr(generate, "load_adapter", lambda **_: gemma)
    args = ["generate", "Today I feel so", "--steer", "I am so happy", "I am so sad",
            "--layer", "6", "--compare", "-n", "4", "--json"]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["text"].startswith(" happy") and not out["baseline"].startswith(" happy")
    assert "coefficient=0.25" in out["interventions"][0]


@pytest.mark.gemma
def test_analyzer_docstring_steering_example_on_gemma(gemma):
    from oculi import ModelAnalyzer

    analyzer = ModelAnalyzer(adapter=gemma)
    text = analyzer.generate_with_steering("Today I feel so", positive_examples=["I am so happy"],
                                           negative_examples=["I am so sad"], coefficient=1.0,
                                           layer=6, max_new_tokens=4)  # fmt: skip
    assert text.startswith("Today I feel so happy")


@pytest.mark.gemma
def test_probe_docstring_steering_example_on_gemma(gemma, tmp_path):
    """oculi.probe and docs/guides/harvesting.md: a sentiment probe at layer 6, steered with coefficient 0.1."""
    pytest.importorskip("sklearn")
    pytest.importorskip("zarr")
    good = ["happy", "glad", "joyful", "delighted", "cheerful", "thrilled", "grateful",
            "content", "excited", "proud", "pleased", "calm"]  # fmt: skip
    bad = ["sad", "unhappy", "miserable", "upset", "gloomy", "depressed", "angry", "lonely",
           "worried", "afraid", "hurt", "tired"]  # fmt: skip
    templates = ["I am so {}", "Today I feel {}", "She was very {}", "We are all {}", "He looks {}"]
    prompts = [t.format(w) for t in templates for w in good + bad]
    labels = [w in good for t in templates for w in good + bad]
    oculi.harvest(gemma, prompts, sites="resid_post", layers=[6], out=tmp_path / "s",
                  progress=False)  # fmt: skip
    result = oculi.probe.fit(oculi.open_harvest(tmp_path / "s"), "resid_post", 6, labels,
                             position="last")  # fmt: skip
    assert result.accuracy == 1.0 and 3000 < result.scale < 6000
    joy = gemma.to_single_token(" joy")
    plain = _next(gemma, "Today I feel so")
    steered = _next(gemma, "Today I feel so", [result.steering_vector(coefficient=0.1)])
    assert int(steered.argmax()) == joy and steered[joy] > 0.1 > 100 * plain[joy]
