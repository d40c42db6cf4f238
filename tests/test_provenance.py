"""Provenance names the weights that produced a result (issue 16, item 11).

``weights_sha256`` hashes the files a model was loaded from; ``params_sha256`` hashes the
parameters in memory. A parameter changed in memory after loading changes the second, keeps
the first, and ``weights_match_files`` turns ``False`` naming the tensor — in the provenance
of an experiment run too.
"""

from __future__ import annotations

import json

import pytest
import torch

import oculi
from models import tiny_model, tiny_tokenizer
from oculi.experiments import run_experiment
from oculi.experiments.provenance import model_identity, params_sha256


@pytest.fixture()
def saved(tmp_path):
    """A tiny LLaMA saved with save_pretrained and loaded back (a fresh copy per test)."""
    folder = tmp_path / "tiny"
    tiny_model("llama_gqa").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return oculi.load(str(folder), device="cpu")


def test_loaded_weights_match_their_files_and_hash_as_the_original(saved):
    ident = model_identity(saved)
    assert ident["weights_hashed"] == "files: model.safetensors"
    assert ident["weights_match_files"] is True and ident["weights_differ_from_files"] == []
    # the same values in another object hash the same; the scheme sees values, not objects
    assert ident["params_sha256"] == params_sha256(tiny_model("llama_gqa"))


def test_a_parameter_changed_in_memory_changes_the_provenance(saved):
    before = model_identity(saved)
    weight = saved.model.model.layers[1].mlp.down_proj.weight
    with torch.no_grad():
        old = float(weight[3, 5])
        weight[3, 5] += 1.0
    after = model_identity(saved)
    assert after["weights_sha256"] == before["weights_sha256"]  # the files did not change
    assert after["params_sha256"] != before["params_sha256"]
    assert after["weights_match_files"] is False
    assert after["weights_differ_from_files"] == ["model.layers.1.mlp.down_proj.weight"]
    assert "differ from the weight files in 1 tensor" in after["weights_note"]
    with torch.no_grad():
        weight[3, 5] = old  # back to the file's value: back to the loaded hash
    assert model_identity(saved)["params_sha256"] == before["params_sha256"]
    assert model_identity(saved)["weights_match_files"] is True


def test_a_buffer_and_the_dtype_count(saved):
    base = params_sha256(saved.model)
    assert params_sha256(saved.model.to(torch.bfloat16)) != base
    saved.model.to(torch.float32)  # bf16 -> fp32 loses the low bits: no longer the files
    ident = model_identity(saved)
    assert ident["weights_match_files"] is False and ident["params_sha256"] != base


def test_tied_unembedding_counts_once_and_is_compared(tmp_path):
    folder = tmp_path / "gemma3"
    tiny_model("gemma3").save_pretrained(folder)
    a = oculi.load(str(folder), device="cpu")
    assert a.model.lm_head.weight is a.model.model.embed_tokens.weight
    assert model_identity(a)["weights_match_files"] is True
    with torch.no_grad():
        a.model.lm_head.weight[7, 0] -= 0.5  # the tied tensor: the embedding changes too
    assert model_identity(a)["weights_differ_from_files"] == ["model.embed_tokens.weight"]


def test_a_model_without_files_is_hashed_in_memory_and_not_compared():
    a = oculi.attach(tiny_model("gpt2"))
    ident = model_identity(a)
    assert ident["weights_sha256"] == ident["params_sha256"]
    assert ident["weights_hashed"] == "loaded parameters (state_dict)"
    assert ident["weights_match_files"] is None
    assert ident["weights_note"] == "not compared: no local weight files"


def test_run_provenance_records_the_modified_weights(saved, tmp_path):
    cfg = {
        "experiment": "logit_lens",
        "prompt": "the cat sat on the",
        "target": "red",
    }
    first = run_experiment("logit_lens", cfg, adapter=saved, out_dir=tmp_path, tag="a")
    with torch.no_grad():
        saved.model.model.norm.weight.mul_(3.0)
    second = run_experiment("logit_lens", cfg, adapter=saved, out_dir=tmp_path, tag="b")
    p1, p2 = first.result["provenance"]["model"], second.result["provenance"]["model"]
    assert first.result["result"] != second.result["result"]  # the results changed...
    assert p1["weights_sha256"] == p2["weights_sha256"]  # ...the files did not
    assert p1["params_sha256"] != p2["params_sha256"]
    assert (p1["weights_match_files"], p2["weights_match_files"]) == (True, False)
    saved_json = json.loads((tmp_path / "logit_lens" / "b" / "result.json").read_text())
    assert saved_json["provenance"]["model"]["weights_differ_from_files"] == ["model.norm.weight"]


@pytest.mark.gemma
def test_gemma_in_memory_hash_and_comparison(gemma):
    ident = model_identity(gemma)
    assert ident["weights_match_files"] is True, ident["weights_note"]
    w = gemma.model.model.layers[5].self_attn.o_proj.weight
    with torch.no_grad():
        old = w[0, 0].clone()
        try:
            w[0, 0] = old + 1
            changed = model_identity(gemma)
        finally:
            w[0, 0] = old
    assert changed["params_sha256"] != ident["params_sha256"]
    assert changed["weights_differ_from_files"] == ["model.layers.5.self_attn.o_proj.weight"]
    assert model_identity(gemma)["params_sha256"] == ident["params_sha256"]
