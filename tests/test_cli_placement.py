"""``oculi verify`` and ``oculi info`` name a quantized model's scheme (issue 20, item 4).

The device-map and offload lines are covered by tests/test_device_map.py (a tiny model loaded
by the CLI with ``--device-map``/``--offload-folder``); here the model is a tiny LLaMA
quantized by transformers' torchao int8 weight-only quantizer, handed to the commands in
place of their loader, so what they print is read off a really quantized model.
"""

from __future__ import annotations

import importlib
import json

import pytest
from click.testing import CliRunner

import oculi
from models import tiny_tokenizer
from oculi.cli import cli
from test_quantized import quantized


@pytest.mark.parametrize("command", ["verify", "info"])
def test_the_commands_show_the_quantization(command, monkeypatch, tmp_path_factory):
    model = quantized("llama_mha", "torchao_int8", tmp_path_factory).model
    adapter = oculi.attach(model, tiny_tokenizer())  # verify's prompts are strings
    if command == "verify":
        monkeypatch.setattr(importlib.import_module("oculi.cli.verify"), "load_adapter",
                            lambda **_: adapter)  # fmt: skip
    else:
        monkeypatch.setattr(importlib.import_module("oculi.cli._options"), "load_adapter",
                            lambda **_: adapter)  # fmt: skip
    text = CliRunner().invoke(cli, [command, "tiny"])
    assert text.exit_code == 0, text.output  # verify: oculi reads the quantized model exactly
    assert "torchao Int8WeightOnlyConfig" in text.stdout
    if command == "verify":
        assert "quantization: torchao Int8WeightOnlyConfig" in text.stdout
    got = CliRunner().invoke(cli, [command, "tiny", "--json"])
    facts = json.loads(got.stdout)
    assert facts["quantization"] == "torchao Int8WeightOnlyConfig"
    assert facts["offloaded"] == "none" and facts["device_map"] == "cpu"
