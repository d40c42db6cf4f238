"""NaN and inf from the model itself (issue 16 item 10, BAD_INPUTS row 37).

A model whose weights hold NaN or inf makes NaN activations and NaN logits, whose top-1 reads
as a confident prediction of an arbitrary token. Captures warn ``NonFiniteWarning`` naming the
first layer and site (checked against transformers' own hidden states), the logit lens warns
when its logits are non-finite, a healthy model never warns, and causal tracing refuses NaN
or inf noise (Python, CLI, experiment config).
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from click.testing import CliRunner

import oculi
from models import FAMILIES, tiny_model, tiny_tokenizer
from oculi import CaptureConfig, NonFiniteWarning, ResidualConfig
from oculi.cli import cli
from oculi.errors import InputError
from oculi.experiments import ConfigError, get_experiment, load_config
from oculi.patching import causal_tracing

PROMPT = "the cat sat on the red"


def broken(family: str, path: str, value: float, index=(0, 0)) -> oculi.Adapter:
    """A copy of the tiny ``family`` model with one weight element set to ``value``."""
    model = copy.deepcopy(tiny_model(family))
    with torch.no_grad():
        model.get_parameter(path)[index] = value
    return oculi.attach(model, tiny_tokenizer())


def first_bad_layer(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """The first layer whose output holds NaN/inf, from transformers' own hidden states."""
    with torch.no_grad():
        states = model(ids[None], output_hidden_states=True).hidden_states[1:]
    return next(i for i, h in enumerate(states) if not torch.isfinite(h).all())


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize(
    ("family", "path"),
    [
        ("llama_gqa", "model.layers.1.mlp.down_proj.weight"),
        ("gemma3", "model.layers.2.self_attn.v_proj.weight"),
        ("gpt2", "transformer.h.1.attn.c_proj.weight"),
    ],
)
def test_capture_warns_at_the_first_layer_where_the_model_goes_non_finite(family, path, value):
    a = broken(family, path, value)
    ids = a.tokenize(PROMPT)
    layer = first_bad_layer(a.model, ids)
    assert layer == int(path.split(".")[2])
    with pytest.warns(NonFiniteWarning, match=f"first at layer {layer}, site '") as caught:
        res = a.capture_residual(ids)
    assert len([w for w in caught if w.category is NonFiniteWarning]) == 1  # once per capture
    assert not torch.isfinite(res.post_mlp[layer]).all()  # the values are kept as they are
    assert torch.isfinite(res.post_mlp[:layer]).all()


def test_the_site_named_is_the_first_in_forward_order():
    a = broken("llama_gqa", "model.layers.1.mlp.down_proj.weight", math.nan)
    with pytest.warns(NonFiniteWarning) as caught:
        a.capture_full(PROMPT, logits=None)
    msg = str(caught[0].message)
    # attention of layer 1 is clean; its MLP output is the first NaN
    assert "first at layer 1, site 'mlp_result' (the MLP module's output)" in msg
    assert "'resid_post' at layers [1, 2]" in msg and "'resid_pre' at layers [2]" in msg


def test_patterns_and_batches_warn_too():
    a = broken("llama_gqa", "model.layers.2.self_attn.q_proj.weight", math.nan, (3, 1))
    with pytest.warns(NonFiniteWarning, match="first at layer 2, site 'q'"):
        a.capture(["the cat sat", "a dog ran to the house"], CaptureConfig(layers=[0, 2]))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_healthy_model_never_warns(family):
    """Padded batches, masks, sliding windows and soft-caps are finite: no false alarms."""
    a = oculi.attach(tiny_model(family), tiny_tokenizer())
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonFiniteWarning)
        full = a.capture_full(["the cat sat on the red house and the", "a dog"])
        full.logits.top_k_indices  # noqa: B018 - computes the lens
        a.capture_full(PROMPT)


def test_unembedding_nan_the_lens_warns_instead_of_a_confident_answer():
    a = broken("llama_gqa", "lm_head.weight", math.nan, (7, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonFiniteWarning)
        lens = a.capture_logits(PROMPT)  # the residual itself is finite: no capture warning
    rows = 3 * len(a.tokenize(PROMPT))  # every layer and position
    with pytest.warns(NonFiniteWarning, match=f"NaN or inf logits in {rows} of {rows} rows, first"):
        top1 = lens.top_k_indices[..., 0]
    assert (top1 == 7).all()  # what a user would have read as the answer, at every layer
    last = rows // 3 - 1
    with pytest.warns(
        NonFiniteWarning, match=f"3 of 3 rows, first after layer 0 at position {last}"
    ):
        oculi.logit_lens(a, PROMPT, "house")  # reads the last position's full logits


def test_lens_names_the_first_layer_with_non_finite_logits():
    a = broken("llama_gqa", "model.layers.2.mlp.down_proj.weight", math.inf, (0, 0))
    with pytest.warns(NonFiniteWarning, match="first at layer 2"):
        lens = a.capture_logits(PROMPT)
    with pytest.warns(NonFiniteWarning, match="rows, first after layer 2 at position 0"):
        lens.top_k_values  # noqa: B018


def test_warning_can_be_made_an_error():
    a = broken("llama_gqa", "model.layers.0.self_attn.o_proj.weight", math.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonFiniteWarning)
        with pytest.raises(NonFiniteWarning, match="first at layer 0"):
            a.capture_residual(PROMPT)


def test_half_precision_large_but_finite_values_do_not_warn():
    """A float16 activation sum beyond 65504 is not a NaN: the probe sums in float32."""
    model = copy.deepcopy(tiny_model("llama_gqa")).half()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(2000.0)  # |x| ~ 300, sums of 700 values overflow fp16
    a = oculi.attach(model, tiny_tokenizer())
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonFiniteWarning)
        res = a.capture_residual(PROMPT, ResidualConfig(layers=[0]))
    assert float(res.pre_attn[0].float().abs().sum()) > 65504
    assert bool(torch.isfinite(res.pre_attn).all())


# -- causal tracing refuses NaN/inf noise ------------------------------------------------------
@pytest.mark.parametrize("noise", [math.nan, math.inf, -math.inf, 0.0, -1.0, 1e39])
def test_trace_refuses_non_finite_noise(noise):
    a = oculi.attach(tiny_model("llama_gqa"), tiny_tokenizer())
    with pytest.raises(InputError, match=r"noise must be a finite number > 0 .*got"):
        causal_tracing(a, PROMPT, "cat", "red", noise=noise, samples=1, progress=False)


@pytest.mark.parametrize("noise", ["nan", "inf"])
def test_trace_cli_refuses_non_finite_noise_before_loading(noise):
    res = CliRunner().invoke(
        cli,
        [
            "trace",
            PROMPT,
            "--subject",
            "cat",
            "--target",
            "red",
            "--noise",
            noise,
            "--model",
            "/nonexistent/model",
        ],  # fmt: skip
    )
    assert res.exit_code == 2
    assert "--noise" in res.output and "must be a finite number > 0" in res.output


@pytest.mark.parametrize("noise", [".nan", ".inf"])
def test_trace_config_refuses_non_finite_noise(noise, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"prompt: a b\nsubject: a\ntarget: b\nnoise: {noise}\n")
    with pytest.raises(ConfigError, match="noise"):
        load_config(path, get_experiment("causal_tracing").Config)
