"""``python -m oculi.harvest``: arguments reach oculi.harvest, output and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import oculi
from models import tiny_model, tiny_tokenizer
from oculi.harvest.__main__ import main, parse_layers
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
    with pytest.raises(ValueError, match=r"bad layer spec '3-1' in --layers '0,3-1'"):
        parse_layers("0,3-1")
    with pytest.raises(ValueError, match="bad layer spec 'x'"):
        parse_layers("x")


def test_cli_harvests_and_resumes(model_dir, prompts_file, tmp_path, capsys):
    out = tmp_path / "acts"
    argv = ["--prompts", str(prompts_file), "--sites", "resid_post,mlp_out", "--layers", "0-2",
            "--out", str(out), "--model", str(model_dir), "--device", "cpu", "--quiet",
            "--batch-tokens", "64", "--split", "0.2", "--json"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
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
    assert main(argv[:-1]) == 0  # the same command again: nothing left to compute
    assert "computed 0 of" in capsys.readouterr().out


def test_cli_errors(model_dir, prompts_file, tmp_path, capsys):
    base = ["--prompts", str(prompts_file), "--out", str(tmp_path / "x"), "--model", str(model_dir),
            "--device", "cpu", "--quiet"]  # fmt: skip
    assert main([*base, "--sites", "resid_pst", "--layers", "0"]) == 2
    assert "unknown site 'resid_pst'; did you mean 'resid_post'?" in capsys.readouterr().err
    assert main([*base, "--sites", "resid_post", "--layers", "0-9"]) == 2
    assert "layer 3 out of range for a model with 3 layers" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main([*base, "--sites", "resid_post", "--layers", "a-b"])
    assert exc.value.code == 2 and "bad layer spec 'a-b'" in capsys.readouterr().err


def test_module_entry_point_help():
    run = subprocess.run(
        [sys.executable, "-m", "oculi.harvest", "--help"], capture_output=True, text=True
    )
    assert run.returncode == 0
    assert (
        "--executor {local,ray}" in run.stdout and "example: python -m oculi.harvest" in run.stdout
    )
