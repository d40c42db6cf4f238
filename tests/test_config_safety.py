"""Experiment configs that would eat the machine or hide a mistake (BAD_INPUTS rows 39, 40).

A "billion laughs" file of nested YAML aliases (558 bytes standing for 10^9 strings) is refused
while it is composed, before anything is built: checked in a fresh process whose peak memory
(``VmHWM``) must stay near that of merely importing oculi. Duplicate keys, non-UTF-8 bytes
and integers beyond 64 bits are one short error naming the file, key and line. No message
quotes an unbounded ``repr`` of what the user wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import oculi
from oculi.errors import brief
from oculi.experiments import ConfigError, get_experiment, load_config, run_experiment

LENS = get_experiment("logit_lens").Config


def billion_laughs() -> str:
    """Nine levels of nine aliases each: 9^9 (387 million) copies of the first list's strings."""
    lines = ['a: &lol1 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i, key in enumerate("bcdefghi", start=2):
        lines.append(f"{key}: &lol{i} [" + ",".join(f"*lol{i - 1}" for _ in range(9)) + "]")
    lines.append("prompt: *lol9")
    return "\n".join(lines) + "\n"


def test_the_bomb_is_the_558_byte_class():
    assert 500 <= len(billion_laughs().encode()) <= 600


_PEAK = """
import json, sys, time
import oculi.experiments as ex
def high_water():  # VmHWM, KiB: this process's own peak (ru_maxrss survives exec from a big parent)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM"))
base = high_water()
t0 = time.perf_counter()
try:
    ex.load_config(sys.argv[1], ex.get_experiment("logit_lens").Config)
    out = {"raised": None}
except Exception as exc:
    out = {"raised": type(exc).__name__, "message": str(exc)}
out["growth_kib"] = high_water() - base
out["seconds"] = time.perf_counter() - t0
print(json.dumps(out))
"""


def test_alias_bomb_is_refused_before_it_expands(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(billion_laughs())
    import oculi

    env = {**os.environ, "PYTHONPATH": str(Path(oculi.__file__).parents[1])}
    done = subprocess.run(
        [sys.executable, "-c", _PEAK, str(path)], capture_output=True, text=True, env=env,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["raised"] == "ConfigError"
    assert str(path) in out["message"] and "line 1" in out["message"]
    assert "anchors" in out["message"] and len(out["message"]) < 300
    # the expanded document would be gigabytes; loading the config grew the process by < 20 MiB
    assert out["growth_kib"] < 20 * 1024, out


def test_aliases_are_refused_even_when_small(tmp_path):
    path = tmp_path / "alias.yaml"
    path.write_text("prompt: &p the cat sat\ntarget: *p\n")
    with pytest.raises(ConfigError, match=r"alias.yaml: not valid YAML at line 1.*anchors"):
        load_config(path, LENS)
    path.write_text("base: {seed: 1}\n<<: *base\n")
    with pytest.raises(ConfigError, match=r"line 2.*aliases \(\*base\)"):
        load_config(path, LENS)


def test_a_mapping_that_references_itself_gets_a_short_message():
    bomb: list = ["lol"] * 9
    for _ in range(8):
        bomb = [bomb] * 9  # 9^9 strings when printed in full
    with pytest.raises(ConfigError) as info:
        load_config({"prompt": bomb}, LENS)
    assert len(str(info.value)) < 400 and "prompt" in str(info.value)


def test_duplicate_keys_name_the_key_and_both_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("prompt: the cat\nseed: 1\nprompt: the dog\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: .*'prompt' appears twice \(lines 1 and 3\)"):
        load_config(path, LENS)
    path.write_text("prompt: x\nlayers: [1]\nnested: {a: 1, a: 2}\n")
    with pytest.raises(ConfigError, match=r"'a' appears twice \(lines 3 and 3\)"):
        load_config(path, LENS)


def test_a_config_that_is_not_utf8_names_the_file_and_byte(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("prompt: café\n".encode("latin-1"))
    with pytest.raises(
        ConfigError, match=r"latin1.yaml: not UTF-8 text \(byte 11 on line 1 is 0xe9\)"
    ):
        load_config(path, LENS)


@pytest.mark.parametrize(
    ("line", "key", "valid"),
    [
        ("seed: 1e29", "seed", "from 0 to 18446744073709551615"),  # YAML 1.1: a string
        ("seed: 1.0e+29", "seed", "from 0 to 18446744073709551615"),
        ("seed: -1", "seed", "greater than or equal to 0"),
        ("position: 1.0e+20", "position", "from -9223372036854775808 to 9223372036854775807"),
        ("layers: [0, 100000000000000000000000]", "layers[1]", "from -9223372036854775808"),
    ],
)
def test_huge_numbers_name_the_key_and_range(tmp_path, line, key, valid):
    path = tmp_path / "big.yaml"
    path.write_text(f"prompt: the cat\n{line}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, LENS)
    message = str(info.value)
    assert message.startswith(f"{path}: {key}: ") and valid in message, message
    assert len(message) < 200


def test_validation_messages_quote_user_values_briefly():
    with pytest.raises(ConfigError) as info:
        load_config({"prompt": "x", "position": "y" * 100_000}, LENS)
    assert len(str(info.value)) < 300 and "yyy..." in str(info.value)
    assert len(brief("z" * 10_000, 50)) <= 50 and len(brief(list(range(10**6)))) < 80


def test_huge_seed_is_refused_before_the_model_loads(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("prompt: the cat\nseed: 1.0e+29\nmodel: ./no-such-model\n")
    with pytest.raises(ConfigError, match="seed: must be an integer from 0"):
        run_experiment("logit_lens", config, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_run_folder_problems_are_refused_before_the_model_loads(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("prompt: the cat\nmodel: ./no-such-model\n")  # loading it would fail
    with pytest.raises(ConfigError, match=r"tag 'tttt.*' is 300 bytes long; .* 1 to 200 bytes"):
        run_experiment("logit_lens", config, tag="t" * 300, out_dir=tmp_path / "out")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("a user's file")
    (tmp_path / "out" / "logit_lens").mkdir(parents=True)
    (tmp_path / "out" / "logit_lens" / "linked").symlink_to(elsewhere)
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match=r"linked is a symbolic link"):
            run_experiment(
                "logit_lens", config, tag="linked", out_dir=tmp_path / "out", overwrite=overwrite
            )
    (tmp_path / "out" / "logit_lens" / "mine").mkdir()  # a folder oculi did not write
    with pytest.raises(FileExistsError, match=r"mine is not an oculi run folder"):
        run_experiment("logit_lens", config, tag="mine", out_dir=tmp_path / "out", overwrite=True)
    assert (elsewhere / "keep.txt").read_text() == "a user's file"


def test_the_configs_shipped_still_load():
    import yaml

    for path in sorted(Path(__file__).parents[1].glob("configs/*.yaml")):
        name = yaml.safe_load(path.read_text()).get("experiment") or path.stem
        load_config(path, get_experiment(name).Config)


def test_error_messages_stay_on_one_line_for_multiline_yaml_errors(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text(
        textwrap.dedent("""\
        prompt: "unterminated
        seed: 3
    """)
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, LENS)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_a_position_beyond_the_prompt_names_the_key_and_range(tmp_path):
    from models import tiny_model, tiny_tokenizer

    tiny = oculi.attach(tiny_model("gemma3"), tiny_tokenizer())
    for position in (99, 10**18, -5):
        with pytest.raises(
            ConfigError, match=r"position: .* outside the prompt's 4 tokens; use -4 .. 3"
        ):
            run_experiment(
                "logit_lens", {"prompt": "the cat sat", "position": position}, adapter=tiny,
                out_dir=tmp_path, parity=False,
            )  # fmt: skip
    assert not (tmp_path / "logit_lens").exists()
