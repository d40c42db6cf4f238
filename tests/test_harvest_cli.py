"""``oculi harvest`` (and ``python -m oculi.harvest``): arguments reach oculi.harvest; output
and exit codes; the store matches the model's own per-prompt captures."""

from __future__ import annotations

import json
import subprocess
import sys

import click
import numpy as np
import pytest
from click.testing import CliRunner

import oculi
from models import tiny_model, tiny_tokenizer
from oculi.cli import cli
from oculi.cli.harvest import parse_layers
from test_harvest import word_prompts

pytest.importorskip("zarr")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    tiny_model("llama_gqa").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"text": p}) + "\n" for p in word_prompts(25)))
    return path


def test_parse_layers():
    assert parse_layers("0-3") == [0, 1, 2, 3]
    assert parse_layers("0-2,7, 9") == [0, 1, 2, 7, 9]
    assert parse_layers("-1") == [-1]
    assert parse_layers("all") is None
    with pytest.raises(click.BadParameter, match=r"bad layer spec '3-1' in '0,3-1'"):
        parse_layers("0,3-1")
    with pytest.raises(click.BadParameter, match="bad layer spec 'x'"):
        parse_layers("x")


def test_cli_harvests_and_resumes(model_dir, prompts_file, tmp_path):
    out = tmp_path / "acts"
    argv = ["harvest", "--prompts", str(prompts_file), "--sites", "resid_post,mlp_out",
            "--layers", "0-2", "--out", str(out), "--model", str(model_dir), "--device", "cpu",
            "--quiet", "--batch-tokens", "64", "--split", "0.2"]  # fmt: skip
    res = CliRunner().invoke(cli, [*argv, "--json"])
    assert res.exit_code == 0, (res.output, res.exception)
    summary = json.loads(res.stdout)
    assert summary["units_computed"] == summary["units"] >= 1
    assert sorted(summary["rows"]) == [
        f"{s}/{i}" for s in ("mlp_out", "resid_post") for i in range(3)
    ]
    store = oculi.open_harvest(out)
    adapter = oculi.load(model_dir, device="cpu")
    ref = adapter.capture_residual(word_prompts(25)[4], oculi.ResidualConfig(layers=[2])).post_mlp[
        0
    ]
    np.testing.assert_allclose(
        store["resid_post", 2][store.rows_of(prompt_ids=[4])], ref.numpy(), atol=1e-5
    )
    assert len(store.rows_of("test")) > 0
    again = CliRunner().invoke(cli, argv)  # the same command again: nothing left to compute
    assert again.exit_code == 0 and f"computed 0 of {summary['units']} units" in again.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--sites", "resid_pst", "--layers", "0"],
            "unknown site 'resid_pst'; did you mean 'resid_post'?",
        ),
        (
            ["--sites", "resid_post", "--layers", "0-9"],
            "layer 3 out of range for a model with 3 layers",
        ),
        (["--sites", "resid_post", "--layers", "a-b"], "bad layer spec 'a-b'"),
        (["--sites", "pattern", "--layers", "0"], "'pattern' is not harvestable"),
    ],
)
def test_cli_errors_are_one_line_exit_2(model_dir, prompts_file, tmp_path, args, message):
    base = ["harvest", "--prompts", str(prompts_file), "--out", str(tmp_path / "x"),
            "--model", str(model_dir), "--device", "cpu", "--quiet"]  # fmt: skip
    res = CliRunner().invoke(cli, [*base, *args])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("oculi: error: ") and message in lines[0]


def test_python_dash_m_oculi_harvest_is_the_same_command():
    run = subprocess.run(
        [sys.executable, "-m", "oculi.harvest", "--help"], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert "--executor [local|ray]" in run.stdout and "oculi harvest --prompts" in run.stdout
