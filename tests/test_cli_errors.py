"""One pass over every ``oculi`` command's bad inputs (BAD_INPUTS rows 40 and 44).

A device this torch cannot use, a number beyond its range, an output that cannot be written:
one line on stderr naming the option and the valid range or devices, exit status 2, and where
the check does not need the model, before the model is loaded (proved by naming a model folder
that does not exist: its error would come first otherwise). With ``--json`` every command
prints one JSON error object on stdout.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import oculi
from oculi.cli import COMMANDS, cli
from oculi.errors import InputError
from oculi.utils import available_devices, resolve_device
from test_cli import tiny_dir  # noqa: F401 - the fixture: a tiny Llama saved to a folder

PROMPT = "the cat sat on the"  # 6 tokens with <bos>
NOWHERE = "./no-such-model-folder"  # loading it fails: an error about it means the model loaded

# the required arguments of each command (a model option is added by the tests)
ARGS = {
    "info": [],
    "lens": [PROMPT],
    "heads": [PROMPT],
    "attribute": [PROMPT],
    "patch": ["--clean", PROMPT, "--corrupt", PROMPT, "--answer", "mat", "--wrong", "hat"],
    "trace": [PROMPT, "--subject", "cat", "--target", "mat"],
    "generate": [PROMPT],
    "report": [PROMPT],
    "verify": [],
    "harvest": ["--prompts", "p.jsonl", "--sites", "resid_post", "--layers", "0", "--out", "s"],
    "discover": ["--clean", PROMPT, "--corrupt", PROMPT, "--answer", "mat", "--wrong", "hat"],
    "sae evaluate": ["x.safetensors", "--prompts", "p.jsonl"],
    "sae features": ["x.safetensors", "--store", "no-store", "-o", "features.html"],
}
# commands without --model: their own arguments, and a failing input
OWN = {
    "sae train": ["--store", "no-store", "--site", "resid_post", "--layer", "0", "--out", ".",
                  "--d-sae", "8"],
}  # fmt: skip
JSON_COMMANDS = [c for c in [*ARGS, *OWN, "run"] if c != "report"]


def argv(command: str, config: Path) -> list[str]:
    """The command's words, its required arguments and, where it has one, the missing model."""
    if command == "run":
        return ["run", "logit_lens", "-c", str(config), "-m", NOWHERE]
    if command in OWN:
        return [*command.split(), *OWN[command]]
    return [*command.split(), *ARGS[command], "-m", NOWHERE]


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert len(lines) == 1 and lines[0].startswith("oculi: error: "), result.stderr
    return lines[0]


def test_every_command_is_covered():
    groups = {c.split()[0] for c in [*ARGS, *OWN]}
    assert groups | {"run"} == set(COMMANDS)
    from oculi.cli.sae import sae

    assert {f"sae {c}" for c in sae.commands} == {c for c in [*ARGS, *OWN] if c.startswith("sae")}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch has CUDA")
@pytest.mark.parametrize("command", [*ARGS, *OWN, "run"])
@pytest.mark.parametrize("device", ["cuda", "cuda:1", "mps", "tpu"])
def test_a_device_this_torch_cannot_use_is_one_line_naming_the_usable_ones(
    command, device, tmp_path
):
    if device == "mps" and "mps" in available_devices():
        pytest.skip("this machine has MPS")
    config = tmp_path / "c.yaml"
    config.write_text("prompt: the cat\n")
    line = one_error_line(run(*argv(command, config), "--device", device))
    assert f"'{device}'" in line and "can use: cpu" in line, line
    assert NOWHERE not in line  # refused before the model is looked for


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch has CUDA")
def test_python_load_refuses_the_device_before_loading():
    with pytest.raises(InputError, match=r"device 'cuda' is not available.*can use: cpu"):
        oculi.load(NOWHERE, device="cuda")
    with pytest.raises(InputError, match=r"'cuda:7' is not available"):
        resolve_device("cuda:7")
    with pytest.raises(InputError, match=r"'potato' is not a device name; .*can use: cpu"):
        resolve_device("potato")
    assert resolve_device("cpu") == torch.device("cpu")
    from oculi.capture.configs import ResidualConfig

    with pytest.raises(InputError, match=r"'mps' is not available.*can use: cpu"):
        ResidualConfig(storage_device="mps")  # refused when configured, not at the first store


@pytest.mark.parametrize("command", JSON_COMMANDS)
def test_json_commands_print_one_json_error_object(command, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("prompt: the cat\n")
    result = run(*argv(command, config), "--json")
    assert result.exit_code == 2, result.output
    error = json.loads(result.stdout)  # the whole of stdout is one JSON object
    assert set(error) == {"error", "type", "exit_code"} and error["exit_code"] == 2
    assert error["error"] and error["type"].endswith("Error")
    assert error["error"] in result.stderr  # the same line as on stderr


def test_usage_errors_are_json_too():
    result = run("lens", "--json")  # PROMPT missing
    assert result.exit_code == 2
    assert json.loads(result.stdout)["type"] == "MissingParameter"


def test_position_beyond_the_prompt_names_the_range(tiny_dir):  # noqa: F811 - fixture
    line = one_error_line(run("lens", PROMPT, "-m", str(tiny_dir), "--position", "99"))
    assert "--position 99 is outside the prompt's 6 tokens: use -6 .. 5" in line
    line = one_error_line(run("lens", PROMPT, "-m", str(tiny_dir), "--position", "-7"))
    assert "use -6 .. 5" in line
    assert run("lens", PROMPT, "-m", str(tiny_dir), "--position", "-6", "--json").exit_code == 0


HARVEST = ["harvest", *ARGS["harvest"]]
TRAIN = ["sae", "train", *OWN["sae train"]]


@pytest.mark.parametrize(
    ("args", "named"),
    [
        ([*HARVEST, "--batch-tokens", "0"], "0 is not in the range x>=1"),
        ([*HARVEST, "--max-length", "-3"], "-3 is not in the range x>=1"),
        ([*HARVEST, "--split", "1"], "'1' is out of range: it must be >= 0 and < 1"),
        ([*HARVEST, "--split", "nan"], "'nan' is not a finite number"),
        ([*HARVEST, "--concurrency", "0"], "0 is not in the range x>=1"),
        ([*HARVEST, "--num-cpus", "0"], "must be > 0"),
        ([*HARVEST, "--seed", str(2**64)], "0<=x<=18446744073709551615"),
        ([*TRAIN, "--d-sae", "0"], "0 is not in the range x>=1"),
        ([*TRAIN, "--lr", "-0.1"], "must be > 0"),
        ([*TRAIN, "--l1-coefficient", "inf"], "'inf' is not a finite number"),
        ([*TRAIN, "--seed", "-1"], "0<=x<=18446744073709551615"),
        (["discover", *ARGS["discover"], "--threshold", "nan"], "'nan' is not a finite number"),
    ],
)
def test_counts_and_rates_out_of_range_are_refused(args, named):
    line = one_error_line(run(*args))
    assert named in line, line


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (
            ["lens", PROMPT, "--position", str(10**20)],
            "-9223372036854775808<=x<=9223372036854775807",
        ),
        (["lens", PROMPT, "--position", "1e20"], "'1e20' is not a valid integer"),
        (["trace", *ARGS["trace"], "--seed", str(10**29)], "0<=x<=18446744073709551615"),
        (["heads", PROMPT, "--seed", "-1"], "0<=x<=18446744073709551615"),
        (["verify", "--tolerance", "-1"], "'-1' is out of range: it must be > 0"),
        (["verify", "--tolerance", "0"], "must be > 0"),
        (["verify", "--tolerance", "nan"], "'nan' is not a finite number"),
        (["generate", PROMPT, "--coefficient", "inf"], "'inf' is not a finite number"),
    ],
)
def test_numbers_out_of_range_are_refused_before_loading(args, named):
    line = one_error_line(run(*args, "-m", NOWHERE))
    assert named in line, line
    assert NOWHERE not in line


def test_an_output_that_is_a_folder_is_refused_before_loading(tmp_path):
    line = one_error_line(run("report", PROMPT, "-m", NOWHERE, "-o", str(tmp_path)))
    assert f"--output '{tmp_path}' is a folder" in line
    line = one_error_line(
        run("sae", "features", "x.safetensors", "--store", "s", "-o", str(tmp_path), "-m", NOWHERE)
    )
    assert f"--out '{tmp_path}' is a folder" in line


def test_run_folder_problems_are_refused_before_loading(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"prompt: the cat\nmodel: {NOWHERE}\n")
    out = tmp_path / "out"
    base = ["run", "logit_lens", "-c", str(config), "--out", str(out)]
    line = one_error_line(run(*base, "--tag", "t" * 300))
    assert "is 300 bytes long" in line and "1 to 200 bytes" in line
    (out / "logit_lens").mkdir(parents=True)
    (out / "logit_lens" / "link").symlink_to(tmp_path)
    assert "is a symbolic link" in one_error_line(run(*base, "--tag", "link", "--overwrite"))
    config.write_text("prompt: the cat\nseed: 1.0e+29\n")
    assert "seed: must be an integer from 0 to" in one_error_line(run(*base))
