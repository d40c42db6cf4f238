"""Circuit discovery from YAML (``oculi run circuit_discovery``) and the CLI
(``oculi discover``), on a tiny Llama; numbers checked against the Python API's exact patching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import oculi
from models import tiny_model, tiny_tokenizer
from oculi.cli import cli
from oculi.discovery import Graph, eap, patch_edges
from oculi.experiments import run_experiment
from oculi.experiments.config import ConfigError
from oculi.patching.metrics import logit_diff

CLEAN = "the cat sat on the red"
CORRUPT = "the dog ran in the blue"
KEYS = {"clean": CLEAN, "corrupt": CORRUPT, "answer": "house", "wrong": "tree"}


@pytest.fixture(scope="module")
def tiny():
    return oculi.attach(tiny_model("llama_gqa"), tiny_tokenizer())


def test_experiment_runs_every_method_and_measures_faithfulness_exactly(tiny, tmp_path):
    cfg = {**KEYS, "level": "heads", "curve": [3, 10], "exact_top": 20, "acdc_threshold": 0.02}
    run = run_experiment("circuit_discovery", cfg, adapter=tiny, out_dir=tmp_path, tag="a")
    files = sorted(p.name for p in run.folder.iterdir())
    assert files == [
        "circuit.png", "circuit.svg", "config.yaml", "faithfulness.png", "faithfulness.svg",
        "result.json",
    ]  # fmt: skip
    out = run.result["result"]
    assert set(out["methods"]) == {"eap", "eap_ig", "atp_star", "acdc"}
    graph = Graph.from_adapter(tiny, "heads")
    metric = logit_diff("house", "tree")
    for method in ("eap", "eap_ig", "acdc"):
        circuit = out["methods"][method]["circuit"]
        outside = [e.name for e in graph.edges if e.name not in set(circuit["edges"])]
        value = patch_edges(tiny, graph, CLEAN, CORRUPT, outside, metric)
        span = out["clean_metric"] - out["corrupt_metric"]
        assert circuit["faithfulness"] == pytest.approx(
            (value - out["corrupt_metric"]) / span, abs=1e-4
        )
        if method != "acdc":
            assert circuit["faithfulness"] >= 0.8
    reference = eap(tiny, graph, CLEAN, CORRUPT, metric=metric)
    assert out["methods"]["eap"]["top"][0][0] == reference.top(1)[0][0]
    assert -1 <= out["agreement"]["eap"]["spearman"] <= 1
    assert out["agreement"]["atp_star"]["nodes"] == 3 * (4 + 2 + 2 + 1)
    assert [p["n"] for p in out["methods"]["eap"]["curve"]] == [3, 10]


def test_bad_discovery_configs_name_the_key(tiny, tmp_path):
    with pytest.raises(ConfigError, match=r"methods"):
        run_experiment(
            "circuit_discovery", {**KEYS, "methods": ["magic"]}, adapter=tiny, out_dir=tmp_path
        )
    with pytest.raises(ConfigError, match=r"recover"):
        run_experiment(
            "circuit_discovery", {**KEYS, "recover": 1.5}, adapter=tiny, out_dir=tmp_path
        )


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_llama")
    tiny_model("llama_gqa").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_cli_discover(tiny_dir, tmp_path, tiny):
    args = ["discover", "--clean", CLEAN, "--corrupt", CORRUPT, "--answer", "house", "--wrong",
            "tree", "--model", str(tiny_dir), "--device", "cpu"]  # fmt: skip
    result = CliRunner().invoke(cli, [*args, "--json", "--method", "eap-ig"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["circuit"]["faithfulness"] >= 0.8 and data["level"] == "heads"
    assert data["info"]["completeness"]["target"] == pytest.approx(
        data["corrupt_metric"] - data["clean_metric"], abs=1e-5
    )
    figure = tmp_path / "c.png"
    text = CliRunner().invoke(cli, [*args, "--method", "acdc", "--figure", str(figure)])
    assert text.exit_code == 0, text.output
    assert "faithfulness" in text.output and figure.read_bytes()[:4] == b"\x89PNG"
    bad = CliRunner().invoke(cli, [*args[:2], "the dog", *args[3:]])
    assert bad.exit_code == 2 and "same token length" in bad.output


def test_report_circuit_section(tiny, tmp_path):
    """With a contrasting prompt the report gains the circuit: the same circuit and
    faithfulness as EAP-IG's recover=0.8 through the Python API."""
    from oculi.discovery import eap_ig
    from oculi.visualize.report import build_report, render

    data = build_report(tiny, CLEAN, corrupt=CORRUPT, samples=1)
    scores, circuit = data.circuit
    rival = int(tiny.forward(CORRUPT)[-1].argmax())
    metric = logit_diff(data.target_id, rival)
    again = eap_ig(tiny, Graph.from_adapter(tiny, "heads"), CLEAN, CORRUPT, metric=metric, steps=5)
    assert circuit.names == again.circuit(recover=0.8).names
    page = render(data)
    assert '<section id="circuit">' in page and "<svg" in page
    assert f"{circuit.faithfulness:.0%}" in page
    assert build_report(tiny, CLEAN, samples=1).circuit is None
