"""Experiments: YAML configs validated with key paths, run folders with provenance,
reproducible numbers, refusal to overwrite. Every config in ``configs/`` is validated; each
runs on a tiny random model (prompt keys swapped for the tiny vocabulary) and the fast ones
also as written on Gemma 3 270M."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

import oculi
from models import tiny_model, tiny_tokenizer
from oculi.cli import cli
from oculi.experiments import ConfigError, get_experiment, load_config, run_experiment

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CLEAN, CORRUPT = "the cat sat on the mat", "the dog sat on the mat"
# keys swapped so the example configs run on the tiny word-level vocabulary
TINY = {
    "logit_lens": {"prompt": "the cat sat on the", "target": "house"},
    "causal_tracing": {"prompt": CLEAN, "subject": "the cat", "target": "red", "samples": 2},
    "activation_patching": {"clean": CLEAN, "corrupt": CORRUPT, "answer": "red", "wrong": "blue"},
    "path_patching": {"clean": CLEAN, "corrupt": CORRUPT, "answer": "red", "wrong": "blue"},
    "head_detection": {"prompt": "the cat sat on the mat and the dog ran"},
    "attribution": {"prompt": "the cat sat on the", "target": "red", "wrong": "blue"},
    "steering": {
        "prompt": "the cat",
        "positive": ["good day"],
        "negative": ["bad night"],
        "layer": 1,
        "max_new_tokens": 4,
    },
}
PROVENANCE = {
    "oculi_version", "torch_version", "transformers_version", "python_version", "platform",
    "model", "device", "dtype", "seed", "padding_side", "patching_direction", "git_sha",
    "oculi_git_sha", "command", "started_at", "finished_at", "duration_s", "parity",
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny():
    return oculi.attach(tiny_model("llama_gqa"), tiny_tokenizer())


def tiny_config(name: str) -> dict:
    data = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    return {**data, **TINY[name]}


def experiment_of(path: Path) -> str:
    """The experiment a config names (its ``experiment`` key), else the file's stem."""
    return yaml.safe_load(path.read_text()).get("experiment") or path.stem


def test_every_experiment_has_an_example_config_that_validates():
    from oculi.experiments import EXPERIMENTS

    get_experiment("logit_lens")
    assert {experiment_of(p) for p in CONFIGS.glob("*.yaml")} == set(EXPERIMENTS)
    for path in CONFIGS.glob("*.yaml"):
        cfg = load_config(path, get_experiment(experiment_of(path)).Config)
        assert cfg.model == "gemma-3-270m" and cfg.seed == 0


@pytest.mark.parametrize("name", sorted(TINY))
def test_each_config_runs_into_a_complete_run_folder(name, tiny, tmp_path):
    run = run_experiment(name, tiny_config(name), adapter=tiny, out_dir=tmp_path, tag="a")
    folder = tmp_path / name / "a"
    assert run.folder == folder
    files = sorted(p.name for p in folder.iterdir())
    assert files == sorted(run.result["files"])
    assert {"result.json", "config.yaml"} <= set(files)
    pngs = [f for f in files if f.endswith(".png")]
    assert pngs and all(f[:-4] + ".svg" in files for f in pngs)
    assert all((folder / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in pngs)
    saved = json.loads((folder / "result.json").read_text())
    assert saved == run.result
    prov = saved["provenance"]
    assert set(prov) >= PROVENANCE
    assert prov["parity"]["ok"] is True
    assert prov["torch_version"] == torch.__version__ and prov["dtype"] == "float32"
    assert prov["model"]["weights_sha256"] and prov["padding_side"] == "left"
    assert prov["started_at"] <= prov["finished_at"]
    resolved = yaml.safe_load((folder / "config.yaml").read_text())
    assert resolved == saved["config"] and resolved["experiment"] == name
    # the resolved config reruns to the same numbers
    again = run_experiment(name, folder / "config.yaml", adapter=tiny, out_dir=tmp_path, tag="b")
    assert again.result["result"] == saved["result"]


def test_numbers_against_the_model(tiny, tmp_path):
    run = run_experiment("logit_lens", tiny_config("logit_lens"), adapter=tiny, out_dir=tmp_path)
    with torch.no_grad():
        ids = tiny_tokenizer()("the cat sat on the", return_tensors="pt")["input_ids"]
        probs = torch.softmax(tiny.model(ids).logits[0, -1], -1)
    target = tiny_tokenizer().convert_tokens_to_ids("house")
    assert run.result["result"]["probs"][-1] == pytest.approx(float(probs[target]), rel=1e-5)
    cfg = {**tiny_config("activation_patching"), "site": "resid_pre"}
    res = run_experiment("activation_patching", cfg, adapter=tiny, out_dir=tmp_path)
    with torch.no_grad():
        lg = tiny.model(tiny_tokenizer()(CLEAN, return_tensors="pt")["input_ids"]).logits[0, -1]
    red, blue = (tiny_tokenizer().convert_tokens_to_ids(w) for w in ("red", "blue"))
    assert res.result["result"]["clean_metric"] == pytest.approx(float(lg[red] - lg[blue]), 1e-5)
    assert res.result["provenance"]["patching_direction"].startswith("clean activations")


def test_seed_fixes_the_noise(tiny, tmp_path):
    cfg = tiny_config("causal_tracing")
    a = run_experiment("causal_tracing", {**cfg, "tag": "s0"}, adapter=tiny, out_dir=tmp_path)
    b = run_experiment("causal_tracing", {**cfg, "tag": "s0b"}, adapter=tiny, out_dir=tmp_path)
    c = run_experiment("causal_tracing", {**cfg, "seed": 1}, adapter=tiny, out_dir=tmp_path)
    assert a.result["result"] == b.result["result"]
    assert a.result["result"]["values"] != c.result["result"]["values"]


def test_an_existing_run_is_not_overwritten(tiny, tmp_path):
    cfg = tiny_config("logit_lens")
    first = run_experiment("logit_lens", cfg, adapter=tiny, out_dir=tmp_path, tag="x")
    marker = first.folder / "result.json"
    before = marker.read_bytes()
    with pytest.raises(FileExistsError, match=r"already holds a run.*--overwrite"):
        # refused before any model is loaded: the bogus model is never touched
        run_experiment("logit_lens", {**cfg, "model": "/no/such"}, out_dir=tmp_path, tag="x")
    assert marker.read_bytes() == before
    other = {**cfg, "target": "dog"}
    run_experiment("logit_lens", other, adapter=tiny, out_dir=tmp_path, tag="x", overwrite=True)
    assert json.loads(marker.read_text())["result"]["target"] == "dog"
    assert sorted(p.name for p in (tmp_path / "logit_lens").iterdir()) == ["x"]


BAD_CONFIGS = {
    "unknown key": ({"prompt": "a", "promt": "b"}, r"promt: unknown key; valid keys: .*prompt"),
    "wrong type": ({"prompt": "a", "seed": "abc"}, r"seed: .*integer.*\(got 'abc'\)"),
    "missing": ({"target": "a"}, r"prompt: required key is missing"),
    "bad dtype": ({"prompt": "a", "dtype": "fp8"}, r"dtype: must be one of 'auto', 'float32'"),
    "not a mapping": (["prompt"], r"top level must be a mapping"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_configs_name_the_key(case):
    data, pattern = BAD_CONFIGS[case]
    with pytest.raises(ConfigError, match=pattern):
        run_experiment("logit_lens", data)


def test_bad_configs_of_other_experiments():
    base = tiny_config("causal_tracing")
    with pytest.raises(ConfigError, match=r"kind: must be one of 'resid', 'mlp' or 'attn'"):
        run_experiment("causal_tracing", {**base, "kind": "mpl"})
    with pytest.raises(ConfigError, match=r"samples: .*greater than or equal to 1"):
        run_experiment("causal_tracing", {**base, "samples": 0})
    pp = tiny_config("path_patching")
    with pytest.raises(ConfigError, match=r"receivers\[0\]\[1\]: .*integer"):
        run_experiment("path_patching", {**pp, "receivers": [[1, "x"]]})
    with pytest.raises(ConfigError, match=r"needs the key 'wrong'"):
        run_experiment("activation_patching", {**pp, "wrong": None})
    with pytest.raises(ConfigError, match=r"config is for 'steering', not 'logit_lens'"):
        run_experiment("logit_lens", {**tiny_config("logit_lens"), "experiment": "steering"})
    with pytest.raises(ConfigError, match=r"unknown experiment 'logit_len'; did you mean"):
        run_experiment("logit_len", {})


def test_invalid_yaml_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("prompt: 'a\nseed: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML at line \d+"):
        run_experiment("logit_lens", bad)
    with pytest.raises(ConfigError, match=r"does not exist"):
        run_experiment("logit_lens", tmp_path / "missing.yaml")


def test_git_sha_and_weight_hash_are_the_real_ones(tmp_path, monkeypatch):
    folder = tmp_path / "tiny"
    tiny_model("llama_gqa").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "cfg.yaml").write_text(
        yaml.safe_dump({**tiny_config("logit_lens"), "model": str(folder)})
    )
    subprocess.run([*git, "add", "cfg.yaml"], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    head = subprocess.run(
        [*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    monkeypatch.chdir(repo)
    res = CliRunner().invoke(cli, ["run", "logit_lens", "-c", "cfg.yaml", "--json"])
    assert res.exit_code == 0, res.output
    prov = json.loads(res.stdout)["provenance"]
    assert prov["git_sha"] == head
    file_hash = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    combined = hashlib.sha256(f"model.safetensors:{file_hash}\n".encode()).hexdigest()
    assert prov["model"]["weights_sha256"] == combined
    assert (repo / "outputs" / "logit_lens" / "default" / "result.json").is_file()
    # the same command again is refused in one line, exit 2
    again = CliRunner().invoke(cli, ["run", "logit_lens", "-c", "cfg.yaml"])
    assert again.exit_code == 2
    assert again.stderr.strip().count("\n") == 0 and "already holds a run" in again.stderr
    bad = repo / "bad.yaml"
    bad.write_text(yaml.safe_dump({"prompt": "a", "kind": "x", "model": str(folder)}))
    res = CliRunner().invoke(cli, ["run", "logit_lens", "-c", "bad.yaml", "--tag", "t"])
    assert res.exit_code == 2 and "kind: unknown key" in res.stderr


@pytest.mark.gemma
@pytest.mark.parametrize("name", ["logit_lens", "head_detection", "steering"])
def test_example_configs_as_written_on_gemma(name, gemma, tmp_path):
    run = run_experiment(name, CONFIGS / f"{name}.yaml", adapter=gemma, out_dir=tmp_path)
    assert run.result["provenance"]["parity"]["ok"] is True
    out = run.result["result"]
    if name == "logit_lens":
        probs = torch.softmax(gemma.forward("Water is made of hydrogen and")[-1], -1)
        target = gemma.to_single_token(" oxygen")
        assert out["probs"][-1] == pytest.approx(float(probs[target]), rel=1e-4)
        assert out["crossover_layer"] is not None and out["ranks"][-1] == 0
    elif name == "head_detection":
        assert max(s for _, _, s in out["top"]["induction"]) > 0.5  # Gemma has induction heads
    else:
        runs = out["runs"]
        assert runs[0]["coefficient"] == 0 and runs[0]["kl_from_unsteered"] == pytest.approx(0)
        assert runs[-1]["kl_from_unsteered"] > 0 and runs[-1]["text"] != runs[0]["text"]
