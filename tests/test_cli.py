"""The ``oculi`` command, through Click's CliRunner, on a tiny random Llama saved to a folder.

References are the Hugging Face model's own outputs, loaded independently from the same folder
(``AutoModelForCausalLM``), never oculi's Python API answering for itself.
"""

from __future__ import annotations

import html
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from models import last_inputs, tiny_model, tiny_tokenizer
from oculi.cli import COMMANDS, cli

PROMPT = "the cat sat on the"
CLEAN = "the cat sat on the mat"
CORRUPT = "the dog sat on the mat"
PATCH = ["patch", "--clean", CLEAN, "--corrupt", CORRUPT, "--answer", "red", "--wrong", "blue"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_llama")
    tiny_model("llama_gqa").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf(tiny_dir):
    """The same checkpoint loaded by transformers alone: the reference."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


def ids(text: str) -> torch.Tensor:
    return tiny_tokenizer()(text, return_tensors="pt")["input_ids"]


def tok(word: str) -> int:
    return tiny_tokenizer().convert_tokens_to_ids(word)


def invoke(*args: str, code: int = 0):
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == code, (result.output, result.exception)
    return result


def as_json(*args: str) -> dict:
    return json.loads(invoke(*args, "--json").stdout)


# -- help and structure --------------------------------------------------------------------
@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_has_help_with_an_example(command):
    out = invoke(command, "--help").stdout
    assert "Example" in out and f"oculi {command}" in out
    if command not in ("run",):
        assert "--model" in out and "--device" in out and "--dtype" in out


def test_help_lists_every_registered_command_and_imports_no_torch():
    code = (
        "import sys; from click.testing import CliRunner; from oculi.cli import cli, COMMANDS;"
        "out = CliRunner().invoke(cli, ['--help']).output;"
        "assert all(c in out for c in COMMANDS), out;"
        "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))"
    )
    src = str(Path(__file__).resolve().parents[1] / "src")
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin"},
    ).stdout
    assert out.strip() == "[]"


def test_python_dash_m_runs_the_same_command():
    src = str(Path(__file__).resolve().parents[1] / "src")
    done = subprocess.run(
        [sys.executable, "-m", "oculi", "--version"],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0 and "oculi" in done.stdout


def test_run_help_names_every_registered_experiment():
    from oculi.cli.run import EXPERIMENT_NAMES
    from oculi.experiments.registry import get_experiment

    get_experiment("logit_lens")  # registers the built-ins
    from oculi.experiments import EXPERIMENTS

    assert set(EXPERIMENT_NAMES) == set(EXPERIMENTS)


# -- commands against the model's own outputs ------------------------------------------------
def test_info_reports_the_architecture(tiny_dir, hf):
    facts = as_json("info", str(tiny_dir))
    cfg = hf.config
    assert facts["n_layers"] == cfg.num_hidden_layers
    assert facts["n_heads"] == cfg.num_attention_heads
    assert facts["n_kv_heads"] == cfg.num_key_value_heads
    assert facts["d_model"] == cfg.hidden_size
    assert facts["d_mlp"] == cfg.intermediate_size
    assert facts["n_params"] == sum(p.numel() for p in hf.parameters())
    assert facts["family"] == "llama" and facts["dtype"] == "float32"
    text = invoke("info", "--model", str(tiny_dir)).stdout
    assert "n_layers" in text and f"{facts['n_params']:,}" in text


def test_lens_last_layer_is_the_models_probability(tiny_dir, hf):
    with torch.no_grad():
        probs = torch.softmax(hf(ids(PROMPT)).logits[0, -1], -1)
    out = as_json("lens", PROMPT, "--model", str(tiny_dir), "--target", "red")
    assert out["target_id"] == tok("red")
    assert out["probs"][-1] == pytest.approx(float(probs[tok("red")]), rel=1e-5)
    assert out["ranks"][-1] == int((probs > probs[tok("red")]).sum())
    default = as_json("lens", PROMPT, "--model", str(tiny_dir))
    assert default["target_id"] == int(probs.argmax()) and default["ranks"][-1] == 0
    table = invoke("lens", PROMPT, "-m", str(tiny_dir), "-t", "red").stdout
    assert "crossover layer" in table and len(table.splitlines()) == 4 + 3


def test_heads_scores_match_the_models_attentions(tiny_dir, hf):
    out = as_json("heads", PROMPT, "--model", str(tiny_dir), "--top", "2")
    hf.set_attn_implementation("eager")
    with torch.no_grad():
        att = torch.stack(hf(ids(PROMPT), output_attentions=True).attentions)[:, 0]
    hf.set_attn_implementation("sdpa")
    t = att.shape[-1]
    prev = att[..., torch.arange(1, t), torch.arange(0, t - 1)].mean(-1)  # [L, H]
    bos = att[..., 1:, 0].mean(-1)  # query 0 can only see BOS: left out
    assert torch.allclose(torch.tensor(out["scores"]["previous_token"]), prev, atol=1e-5)
    assert torch.allclose(torch.tensor(out["scores"]["bos"]), bos, atol=1e-5)
    assert set(out["top"]) == {"previous_token", "bos", "recent", "induction"}
    best = out["top"]["previous_token"][0]
    assert best[2] == pytest.approx(float(prev.max()), abs=1e-5)
    assert (best[0], best[1]) == divmod(int(prev.argmax()), prev.shape[1])


def test_attribute_shares_add_up_to_the_models_logit(tiny_dir, hf):
    with torch.no_grad():
        logits = hf(ids(PROMPT)).logits[0, -1]
    out = as_json("attribute", PROMPT, "--model", str(tiny_dir), "--target", "red")
    assert out["total"] == pytest.approx(float(logits[tok("red")]), abs=1e-4)
    assert out["logit"] == pytest.approx(float(logits[tok("red")]), abs=1e-4)
    heads, attn = torch.tensor(out["heads"]), torch.tensor(out["attention"])
    torch.testing.assert_close(heads.sum(-1) + torch.tensor(out["attention_bias"]), attn,
                               atol=1e-5, rtol=1e-4)  # fmt: skip
    diff = as_json("attribute", PROMPT, "-m", str(tiny_dir), "-t", "red", "--wrong", "blue")
    assert diff["total"] == pytest.approx(float(logits[tok("red")] - logits[tok("blue")]),
                                          abs=1e-4)  # fmt: skip
    default = as_json("attribute", PROMPT, "-m", str(tiny_dir), "--top", "3")
    assert default["target_id"] == int(logits.argmax()) and len(default["top_heads"]) == 3
    text = invoke("attribute", PROMPT, "-m", str(tiny_dir), "-t", "red").stdout
    assert "sum of the shares" in text and "top heads: L" in text
    assert "top neurons" not in text


def test_attribute_neurons_are_the_largest_and_add_up(tiny_dir, hf):
    out = as_json("attribute", PROMPT, "-m", str(tiny_dir), "-t", "red", "--neurons", "--top", "4")
    top = out["top_neurons"]
    assert len(top) == 4 and all(abs(a[2]) >= abs(b[2]) for a, b in zip(top, top[1:]))
    # against the hand product act_n · (W_down[:, n] · u) of the largest one, u from the
    # final RMSNorm of a plain forward
    layer, neuron, value = top[0]
    down = hf.model.layers[layer].mlp.down_proj
    seen = last_inputs(hf, ids(PROMPT), {"act": down, "x": hf.model.norm})
    x, norm = seen["x"], hf.model.norm
    u = norm.weight.detach().double() / (x.pow(2).mean() + norm.variance_epsilon).sqrt()
    u = u * hf.lm_head.weight[tok("red")].detach().double()
    want = float(seen["act"][neuron].double() * (down.weight[:, neuron].detach().double() @ u))
    assert value == pytest.approx(want, rel=1e-4, abs=1e-6)
    text = invoke("attribute", PROMPT, "-m", str(tiny_dir), "-t", "red", "--neurons").stdout
    assert "top neurons: L" in text


def test_patch_endpoints_are_the_models_logit_differences(tiny_dir, hf):
    out = as_json(
        *PATCH,
        "--model",
        str(tiny_dir),
    )
    with torch.no_grad():
        lc, lk = hf(ids(CLEAN)).logits[0, -1], hf(ids(CORRUPT)).logits[0, -1]
    diff = lambda lg: float(lg[tok("red")] - lg[tok("blue")])  # noqa: E731
    assert out["clean_metric"] == pytest.approx(diff(lc), abs=1e-5)
    assert out["corrupt_metric"] == pytest.approx(diff(lk), abs=1e-5)
    values = torch.tensor(out["values"])
    assert values.shape == (3, ids(CLEAN).shape[1])
    # patching every position of layer 0's input with the clean one is the clean run; the
    # prompts differ only at position 2, so patching that cell alone restores the clean metric
    assert values[0, 2] == pytest.approx(diff(lc), abs=1e-4)
    assert values[0, 3] == pytest.approx(diff(lk), abs=1e-4)
    heads = as_json(
        *PATCH,
        "--site",
        "z",
        "--per-head",
        "-m",
        str(tiny_dir),
    )
    assert torch.tensor(heads["values"]).shape == (3, 4) and heads["axis"] == "head"


def test_trace_clean_probability_is_the_models(tiny_dir, hf):
    out = as_json(
        "trace",
        CLEAN,
        "--subject",
        "cat",
        "--target",
        "red",
        "--samples",
        "2",
        "--model",
        str(tiny_dir),
    )
    with torch.no_grad():
        p = torch.softmax(hf(ids(CLEAN)).logits[0, -1], -1)[tok("red")]
    assert out["clean_prob"] == pytest.approx(float(p), rel=1e-5)
    assert out["subject_positions"] == [2]
    assert torch.tensor(out["values"]).shape == (3, ids(CLEAN).shape[1])


def _greedy(model, prompt: str, n: int) -> str:
    with torch.no_grad():
        out = model.generate(ids(prompt), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return tiny_tokenizer().decode(out[0, ids(prompt).shape[1] :], skip_special_tokens=True)


def test_generate_plain_and_ablated_match_hand_edited_weights(tiny_dir, hf):
    out = as_json("generate", PROMPT, "-n", "6", "--model", str(tiny_dir), "--compare")
    assert out["baseline"] == out["text"] == _greedy(hf, PROMPT, 6)
    ablated = as_json("generate", PROMPT, "-n", "6", "-m", str(tiny_dir), "--ablate", "1.2")
    from transformers import AutoModelForCausalLM

    edited = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    d_head = edited.config.hidden_size // edited.config.num_attention_heads
    with torch.no_grad():  # head 2 of layer 1 writes nothing: zero its o_proj columns
        edited.model.layers[1].self_attn.o_proj.weight[:, 2 * d_head : 3 * d_head] = 0
    assert ablated["text"] == _greedy(edited, PROMPT, 6)
    assert ablated["interventions"] == ["HeadAblation(layer=1, head=2, method='zero')"]


def test_generate_steering_and_scaling_change_the_output(tiny_dir):
    steered = as_json(
        "generate",
        PROMPT,
        "-n",
        "6",
        "-m",
        str(tiny_dir),
        "--steer",
        "good day",
        "bad night",
        "--layer",
        "1",
        "--coefficient",
        "50",
        "--compare",
    )
    assert steered["text"] != steered["baseline"]
    assert steered["interventions"][0].startswith("SteeringVector(layer=1")
    same = as_json("generate", PROMPT, "-n", "4", "-m", str(tiny_dir), "--scale", "0.1=1.0")
    plain = as_json("generate", PROMPT, "-n", "4", "-m", str(tiny_dir))
    assert same["text"] == plain["text"]  # alpha 1 is the identity


def test_report_writes_an_offline_page_naming_the_prediction(tiny_dir, hf, tmp_path):
    out = tmp_path / "sub" / "r.html"
    res = invoke("report", PROMPT, "-m", str(tiny_dir), "-o", str(out), "-s", "cat",
                 "--samples", "2")  # fmt: skip
    assert res.stdout.strip() == f"wrote {out}"
    page = out.read_text()
    with torch.no_grad():
        top = tiny_tokenizer().decode([int(hf(ids(PROMPT)).logits[0, -1].argmax())])
    assert page.startswith("<!DOCTYPE html>") and html.escape(top) in page  # as HTML text
    assert "http://" not in page and "https://" not in page  # nothing fetched from a network
    bad = CliRunner().invoke(cli, ["report", PROMPT, "-m", str(tiny_dir), "-s", "tower",
                                   "-o", str(tmp_path / "x.html")])  # fmt: skip
    assert bad.exit_code == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_verify_passes_and_reports_every_check(tiny_dir):
    out = as_json("verify", str(tiny_dir), "--prompt", CLEAN, "--prompt", "a dog")
    assert out["ok"] is True
    names = {c["check"] for c in out["checks"]}
    assert names == {"hidden_states", "attentions", "logits", "padded_batch"}
    assert all(c["rel_diff"] <= c["tolerance"] for c in out["checks"])
    text = invoke("verify", "--model", str(tiny_dir)).stdout
    assert "all ok" in text and "padded_batch" in text


def test_verify_exits_1_on_a_mismatch(tiny_dir):
    # a tolerance below what a padded batch can reach in fp32 (sdpa reorders the sums)
    res = invoke("verify", str(tiny_dir), "--tolerance", "1e-30", "--json", code=1)
    report = json.loads(res.stdout)
    assert report["ok"] is False and any(not c["ok"] for c in report["checks"])


# -- bad inputs: one line on stderr, exit 2 -------------------------------------------------
BAD = {
    "multi-token target": ["lens", PROMPT, "--target", "red blue"],
    "unknown answer": ["attribute", PROMPT, "--target", "zebra"],
    "layer out of range": ["generate", PROMPT, "--ablate", "7.0"],
    "not L.H": ["generate", PROMPT, "--ablate", "3"],
    "bad alpha": ["generate", PROMPT, "--scale", "0.1=x"],
    "unequal lengths": [
        "patch",
        "--clean",
        CLEAN,
        "--corrupt",
        "the dog sat",
        "--answer",
        "red",
        "--wrong",
        "blue",
    ],
    "unknown site": [
        *PATCH,
        "--site",
        "resid_mid2",
    ],
    "subject not in prompt": ["trace", CLEAN, "--subject", "tower", "--target", "red"],
    "missing option": ["trace", CLEAN, "--target", "red"],
    "bad dtype": ["lens", PROMPT, "--dtype", "float8"],
    "unknown command": ["lense", PROMPT],
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_exit_2(case, tiny_dir):
    args = BAD[case]
    if args[0] != "lense" and "--dtype" not in args:
        args = [*args, "--model", str(tiny_dir)]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("oculi: error: "), res.stderr
    assert "Traceback" not in res.output and res.stdout == ""


def test_messages_name_the_problem(tiny_dir):
    m = ["--model", str(tiny_dir)]
    err = lambda *a: CliRunner().invoke(cli, [*a, *m]).stderr  # noqa: E731
    assert "'red blue' is 2 tokens" in err("lens", PROMPT, "--target", "red blue")
    assert "did you mean 'lens'" in CliRunner().invoke(cli, ["lense"]).stderr
    assert "layer 7" in err("generate", PROMPT, "--ablate", "7.0")
    assert "LAYER.HEAD" in err("generate", PROMPT, "--ablate", "3")
    assert "no such folder" in CliRunner().invoke(cli, ["info", "/no/such/model"]).stderr


def test_debug_lets_the_exception_through(tiny_dir):
    from oculi.errors import InputError

    res = CliRunner().invoke(
        cli, ["--debug", "lens", PROMPT, "--target", "red blue", "--model", str(tiny_dir)]
    )
    assert isinstance(res.exception, InputError)
    res = CliRunner().invoke(
        cli, ["lens", PROMPT, "--target", "red blue", "--model", str(tiny_dir), "--debug"]
    )
    assert isinstance(res.exception, InputError)


def test_oculi_exports_resolve_lazily():
    import oculi

    assert set(oculi.__all__) == set(oculi._EXPORTS)
    for name in oculi.__all__:
        assert getattr(oculi, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        oculi.nope  # noqa: B018
    # importing a submodule named like an export keeps the export (oculi.harvest, a function)
    code = "import oculi.harvest.store, oculi; assert callable(oculi.harvest), oculi.harvest"
    src = str(Path(__file__).resolve().parents[1] / "src")
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": src})


def test_task_level_patching_helpers_at_the_top_level_stay_lazy():
    """DESIGN §5: oculi.activation_patching(...) etc. are oculi.patching's own functions."""
    import oculi
    from oculi import patching

    for name in ("activation_patching", "attribution_patching", "causal_tracing", "path_patching"):
        assert name in oculi.__all__
        assert getattr(oculi, name) is getattr(patching, name)
    # `import oculi` loads no torch; the first use of a helper does
    code = (
        "import sys, oculi; assert 'torch' not in sys.modules, 'import oculi loaded torch';"
        "f = oculi.activation_patching; assert 'torch' in sys.modules;"
        "assert f.__module__ == 'oculi.patching.activation', f.__module__"
    )
    src = str(Path(__file__).resolve().parents[1] / "src")
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": src})


# -- the default model ---------------------------------------------------------------------
EIFFEL = "The Eiffel Tower is located in the city of"


@pytest.mark.gemma
def test_default_model_commands_on_gemma(gemma):
    """No --model: the embedded Gemma 3 270M, loaded from the cache (seconds)."""
    facts = as_json("info", "--device", "cpu")
    assert (facts["family"], facts["n_layers"], facts["n_heads"], facts["d_model"]) == (
        "gemma3", 18, 4, 640,
    )  # fmt: skip
    logits = gemma.forward(EIFFEL)[-1]
    paris = gemma.to_single_token(" Paris")
    lens = as_json("lens", EIFFEL, "--target", " Paris", "--device", "cpu")
    assert lens["probs"][-1] == pytest.approx(float(torch.softmax(logits, -1)[paris]), rel=1e-4)
    assert lens["crossover_layer"] is not None and lens["ranks"][-1] == 0
    dla = as_json("attribute", EIFFEL, "--target", " Paris", "--device", "cpu")
    assert dla["total"] == pytest.approx(dla["logit"], abs=1e-3)
    # Gemma 3 soft-caps nothing at the end, so the shares add up to the model's own logit
    assert dla["total"] == pytest.approx(float(logits[paris]), abs=1e-3)
    bad = CliRunner().invoke(cli, ["lens", EIFFEL, "--target", " Washington DC", "--device", "cpu"])
    assert bad.exit_code == 2 and len(bad.stderr.strip().splitlines()) == 1
