"""Saving, loading and exporting captures: bit-exact round trips and every bad file.

Captures come from tiny random models (``tests/models.py``). A round trip must give back the
same dtype and the same bits for every tensor, ``None`` where nothing was captured, and the
same layers, attributes and metadata; a bad file must raise ``CaptureFileError`` naming the
file and the problem, and no file may ever be unpickled without ``allow_pickle=True``.
"""

from __future__ import annotations

import json
import pickle
import re
import sys
import zlib
from dataclasses import fields

import h5py
import numpy as np
import pytest
import safetensors.torch
import torch
from safetensors import safe_open

import oculi
from models import N_HEADS, N_LAYERS, PROMPT_LEN, prompt_ids, tiny_model
from oculi import (
    CaptureConfig,
    FullCapture,
    InputError,
    LogitCapture,
    LogitConfig,
    MLPConfig,
    ResidualConfig,
)
from oculi.capture.io import save_capture
from oculi.errors import CaptureFileError, FileWriteError, OutputExistsError

LOADABLE = ("safetensors", "npz", "hdf5")
PARTS = ("attention", "residual", "mlp", "logits")
EVERYTHING = dict(
    attention=CaptureConfig(capture_head_outputs=True, capture_head_contributions=True),
    residual=ResidualConfig(capture_attn_out=True, capture_mlp_out=True),
    mlp=MLPConfig(),
    logits=LogitConfig(top_k=5),
)


# -- captures --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama():
    return oculi.attach(tiny_model("llama_gqa"))


@pytest.fixture(scope="module")
def full(llama) -> FullCapture:
    return llama.capture_full(prompt_ids(), **EVERYTHING)


@pytest.fixture(scope="module")
def batched(llama) -> FullCapture:
    ids = torch.stack([prompt_ids(seed=3), prompt_ids(seed=4)])
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in the second row
    return llama.capture_full(ids, attention_mask=mask, **EVERYTHING)


@pytest.fixture(scope="module")
def half(llama) -> FullCapture:
    """bf16 and fp16 storage, a layer subset, pre-rotary q/k."""
    return llama.capture_full(
        prompt_ids(),
        attention=CaptureConfig(layers=[2, 0], qk_stage="pre_rope", storage_dtype=torch.bfloat16),
        residual=ResidualConfig(layers=[-1], storage_dtype=torch.float16),
        mlp=MLPConfig(layers=[1], storage_dtype=torch.bfloat16),
        logits=LogitConfig(layers=[0, 1], top_k=3, storage_dtype=torch.bfloat16),
    )


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (``torch.equal`` alone would accept -0.0 for 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
        return False
    as_bytes = [t.contiguous().reshape(-1).view(torch.uint8) for t in (a, b)]
    return torch.equal(*as_bytes)


def assert_same(original, loaded) -> None:
    """Every field of two captures is identical (tensors bit for bit)."""
    assert type(loaded) is type(original)
    if isinstance(original, FullCapture):
        assert loaded.metadata == original.metadata
        for part in PARTS:
            if getattr(original, part) is None:
                assert getattr(loaded, part) is None
            else:
                assert_same(getattr(original, part), getattr(loaded, part))
        return
    if isinstance(original, LogitCapture):
        for name in (
            "normalized",
            "final_normalized",
            "top_k_values",
            "top_k_indices",
            "logsumexp",
        ):
            assert _bits_equal(getattr(original, name), getattr(loaded, name)), name
        for name in ("layers", "softcap", "top_k", "chunk_size", "metadata"):
            assert getattr(loaded, name) == getattr(original, name), name
        assert loaded.unembed is None and loaded.unembed_bias is None
        return
    for f in fields(original):
        want, got = getattr(original, f.name), getattr(loaded, f.name)
        if isinstance(want, torch.Tensor):
            assert isinstance(got, torch.Tensor) and _bits_equal(want, got), f.name
        else:
            assert got == want, f.name
    assert isinstance(loaded.layers, tuple)


# -- round trips -----------------------------------------------------------------------
@pytest.mark.parametrize("format", LOADABLE)
@pytest.mark.parametrize("part", [*PARTS, "full"])
def test_round_trip_is_bit_exact(full, tmp_path, format, part):
    capture = full if part == "full" else getattr(full, part)
    path = tmp_path / f"capture.{format}"
    capture.save(path, format=format)
    assert_same(capture, oculi.load_capture(path))


@pytest.mark.parametrize("format", LOADABLE)
def test_half_precision_storage_round_trips(half, tmp_path, format):
    assert half.attention.queries.dtype == torch.bfloat16
    assert half.residual.pre_attn.dtype == torch.float16
    assert half.logits.normalized.dtype == torch.bfloat16
    path = tmp_path / "half"
    save_capture(half, path, format=format)
    loaded = oculi.load_capture(path)
    assert_same(half, loaded)
    assert loaded.attention.layers == (2, 0)
    assert loaded.residual.layers == (2,)
    assert loaded.attention.qk_stage == "pre_rope"


@pytest.mark.parametrize("format", LOADABLE)
def test_batched_capture_round_trips(batched, tmp_path, format):
    assert batched.attention.patterns.shape == (2, N_LAYERS, N_HEADS, PROMPT_LEN, PROMPT_LEN)
    path = tmp_path / "batch.bin"
    batched.save(path, format=format)
    loaded = oculi.load_capture(path)
    assert_same(batched, loaded)
    assert loaded.metadata["attention_mask"][1][:3] == [0, 0, 0]
    assert torch.equal(loaded["blocks.1.attn.hook_pattern"], batched.attention.patterns[:, 1])


def test_fields_not_captured_load_as_none(tmp_path):
    adapter = oculi.attach(tiny_model("gpt2"))  # plain MLP: no gate
    full = adapter.capture_full(prompt_ids(), attention=CaptureConfig(capture_values=False))
    assert full.mlp.gate is None and full.attention.values is None
    full.save(tmp_path / "gpt2.safetensors")
    loaded = oculi.load_capture(tmp_path / "gpt2.safetensors")
    assert_same(full, loaded)
    assert loaded.mlp.gate is None
    assert loaded.attention.values is None and loaded.attention.head_outputs is None
    assert loaded.residual.attn_out is None


def test_a_full_capture_without_some_parts(llama, tmp_path):
    full = llama.capture_full(prompt_ids(), attention=None, mlp=None, logits=None)
    full.save(tmp_path / "resid.safetensors")
    loaded = oculi.load_capture(tmp_path / "resid.safetensors")
    assert loaded.attention is None and loaded.mlp is None and loaded.logits is None
    assert_same(full, loaded)


def test_tensors_sharing_memory_or_viewing_a_larger_one(tmp_path):
    """Views and shared tensors (which safetensors refuses as they are) save as copies."""
    base = torch.randn(4, 5, 8)
    capture = oculi.ResidualCapture(
        layers=(0, 1),
        pre_attn=base[:2],
        post_attn=base[:2],  # the same tensor twice
        pre_mlp=base[2:],  # a view into the middle of a storage
        post_mlp=torch.randn(2, 8, 5).transpose(1, 2),  # not contiguous
    )
    capture.save(tmp_path / "views.safetensors")
    loaded = oculi.load_capture(tmp_path / "views.safetensors")
    for name in ("pre_attn", "post_attn", "pre_mlp", "post_mlp"):
        assert _bits_equal(getattr(loaded, name), getattr(capture, name)), name
    assert loaded.metadata == {}


def test_a_capture_whose_shapes_contradict_it_is_not_saved(full, tmp_path):
    residual = oculi.ResidualCapture(layers=(0, 1), pre_attn=torch.zeros(4, 5, 8))
    with pytest.raises(
        InputError,
        match=re.escape(
            "cannot save this capture: pre_attn has shape [4, 5, 8], but a ResidualCapture "
            "keeps it as [L, T, d_model] and L is 2 here (layers [0, 1])"
        ),
    ):
        residual.save(tmp_path / "bad.safetensors")
    broken = FullCapture(
        attention=oculi.AttentionCapture(layers=(0,), n_heads=3, queries=torch.zeros(1, 4, 5, 8))
    )
    with pytest.raises(
        InputError, match=re.escape("cannot save this capture: the attention part's queries")
    ):
        broken.save(tmp_path / "bad.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_pickle_round_trips_only_when_allowed(full, tmp_path):
    path = tmp_path / "full.pkl"
    full.save(path, format="pickle")
    with pytest.raises(CaptureFileError, match="unpickling can execute arbitrary code"):
        oculi.load_capture(path)
    assert_same(full, oculi.load_capture(path, allow_pickle=True))


def test_saving_twice_overwrites_and_leaves_no_temporary_files(full, tmp_path):
    path = tmp_path / "x.safetensors"
    full.residual.save(path)
    full.attention.save(path)
    assert isinstance(oculi.load_capture(path), oculi.AttentionCapture)
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


# -- the logit lens ----------------------------------------------------------------------
@pytest.fixture()
def logits(llama) -> LogitCapture:
    """A fresh capture whose top-k were never asked for."""
    return llama.capture_logits(prompt_ids(), LogitConfig(top_k=4))


def test_logits_are_saved_with_top_k_and_without_the_unembedding(logits, tmp_path):
    path = tmp_path / "lens.safetensors"
    logits.save(path)
    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
    assert keys == {"normalized", "final_normalized", "top_k_values", "top_k_indices", "logsumexp"}
    loaded = oculi.load_capture(path)
    assert loaded.unembed is None
    assert torch.equal(loaded.top_k_indices, logits.top_k_indices)
    assert torch.equal(loaded.top_k_values, logits.top_k_values)
    assert torch.equal(loaded.top_k_probs, logits.top_k_probs)
    assert loaded.top_k_indices.shape == (N_LAYERS, PROMPT_LEN, 4)


def test_loaded_logits_need_the_unembedding_for_the_rest(logits, tmp_path):
    logits.save(tmp_path / "lens.safetensors")
    loaded = oculi.load_capture(tmp_path / "lens.safetensors")
    message = re.escape(
        "this LogitCapture has no unembedding (it was loaded from disk); call "
        ".attach_unembedding(adapter) to compute more than the saved top-k"
    )
    for compute in (
        lambda: loaded.token_logits(5),
        lambda: loaded.token_probs(5),
        lambda: loaded.ranks(5),
        loaded.entropy,
        loaded.kl_to_final,
        lambda: loaded.logits(layer=0),
    ):
        with pytest.raises(InputError, match=message):
            compute()


def test_attach_unembedding_restores_the_lazy_methods(llama, logits, tmp_path):
    logits.save(tmp_path / "lens.npz", format="npz")
    loaded = oculi.load_capture(tmp_path / "lens.npz").attach_unembedding(llama)
    assert loaded.unembed is not None
    assert torch.equal(loaded.entropy(), logits.entropy())
    assert torch.equal(loaded.kl_to_final(), logits.kl_to_final())
    assert torch.equal(loaded.token_probs(7), logits.token_probs(7))
    assert torch.equal(loaded.ranks(7), logits.ranks(7))
    assert torch.equal(loaded.logits(layer=1, positions=[0, -1]), logits.logits(1, [0, -1]))
    # the last layer's lens is the model's own prediction
    model_logits = llama.forward(prompt_ids())
    assert torch.equal(loaded.top_k_indices[-1, :, 0], model_logits.argmax(-1))


def test_softcapped_logits_keep_their_softcap(tmp_path):
    adapter = oculi.attach(tiny_model("gemma2"))
    lens = adapter.capture_logits(prompt_ids(), LogitConfig(top_k=3))
    assert lens.softcap == 3.0
    lens.save(tmp_path / "gemma2.h5", format="hdf5")
    loaded = oculi.load_capture(tmp_path / "gemma2.h5")
    assert loaded.softcap == 3.0
    assert torch.equal(loaded.top_k_values, lens.top_k_values)
    assert loaded.top_k_values.max() <= 3.0
    assert torch.equal(loaded.attach_unembedding(adapter).entropy(), lens.entropy())


def test_a_loaded_lens_saves_again_without_its_unembedding(logits, tmp_path):
    logits.save(tmp_path / "a.safetensors")
    loaded = oculi.load_capture(tmp_path / "a.safetensors")
    loaded.save(tmp_path / "b.safetensors")
    assert_same(logits, oculi.load_capture(tmp_path / "b.safetensors"))


def test_a_lens_with_neither_top_k_nor_unembedding_cannot_be_saved(logits, tmp_path):
    bare = LogitCapture(layers=logits.layers, normalized=logits.normalized)
    with pytest.raises(
        InputError, match=r"its top-k were never computed and it has no unembedding"
    ):
        bare.save(tmp_path / "bare.safetensors")


# -- what the files hold -----------------------------------------------------------------
def test_safetensors_header_holds_the_metadata(full, tmp_path):
    path = tmp_path / "full.safetensors"
    full.save(path)
    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()["oculi_capture"])
        queries = f.get_tensor("attention.queries")
    assert meta["format"] == "oculi-capture"
    assert meta["format_version"] == 1
    assert meta["oculi_version"] == oculi.__version__
    assert meta["structure"] == "FullCapture"
    attention = meta["capture"]["parts"]["attention"]
    assert attention["structure"] == "AttentionCapture"
    assert attention["layers"] == [0, 1, 2]
    assert attention["attrs"] == {
        "n_heads": 4,
        "n_kv_heads": 2,
        "head_dim": 16,
        "qk_stage": "post_rope",
    }
    assert meta["capture"]["metadata"]["family"] == "llama"
    assert meta["tensors"]["attention.keys"]["shape"] == [3, 2, PROMPT_LEN, 16]
    assert meta["tensors"]["attention.keys"]["dtype"] == "float32"
    assert torch.equal(queries, full.attention.queries)


def test_npz_export_is_plain_numpy(half, tmp_path):
    path = tmp_path / "half.npz"
    half.save(path, format="npz")
    assert not (tmp_path / "half.npz.npz").exists()
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["__meta__"]))
        queries = z["attention.queries"]
        pre_attn = z["residual.pre_attn"]
    assert queries.dtype == np.float32  # bf16, which NumPy lacks, widened exactly
    assert meta["tensors"]["attention.queries"]["dtype"] == "bfloat16"
    assert np.array_equal(queries, half.attention.queries.float().numpy())
    assert pre_attn.dtype == np.float16
    assert np.array_equal(pre_attn, half.residual.pre_attn.numpy())


def test_hdf5_export_has_a_dataset_per_tensor(full, tmp_path):
    path = tmp_path / "full.h5"
    full.save(path, format="hdf5")
    with h5py.File(path, "r") as f:
        assert json.loads(f.attrs["oculi_capture"])["structure"] == "FullCapture"
        assert np.array_equal(f["mlp.gate"][()], full.mlp.gate.numpy())
        assert set(f.keys()) == set(full.to_numpy())


def test_json_export_is_metadata_only(full, tmp_path):
    path = tmp_path / "full.json"
    full.save(path, format="json")
    meta = json.loads(path.read_text())
    assert meta["structure"] == "FullCapture"
    assert meta["tensors"]["attention.patterns"]["shape"] == [3, 4, PROMPT_LEN, PROMPT_LEN]
    assert meta["tensors"]["logits.top_k_indices"]["dtype"] == "int64"
    assert path.stat().st_size < 20_000  # shapes, not data
    with pytest.raises(CaptureFileError, match=r"metadata-only JSON export \(format='json'\)"):
        oculi.load_capture(path)


def test_to_numpy(full, half):
    arrays = full.attention.to_numpy()
    assert set(arrays) == {
        "queries",
        "keys",
        "values",
        "patterns",
        "head_outputs",
        "head_contributions",
    }
    assert np.array_equal(arrays["patterns"], full.attention.patterns.numpy())
    widened = half.mlp.to_numpy()["gate"]
    assert widened.dtype == np.float32
    assert np.array_equal(widened, half.mlp.gate.float().numpy())
    everything = full.to_numpy()
    assert np.array_equal(everything["residual.post_mlp"], full.residual.post_mlp.numpy())
    assert np.array_equal(everything["logits.top_k_indices"], full.logits.top_k_indices.numpy())
    assert set(full.logits.to_numpy()) == {
        "normalized",
        "final_normalized",
        "top_k_values",
        "top_k_indices",
        "logsumexp",
    }


def test_save_rejects_an_unknown_format_and_unserialisable_metadata(full, tmp_path):
    with pytest.raises(
        ValueError, match="unknown capture format 'parquet'; choose one of safetensors, npz"
    ):
        full.save(tmp_path / "x", format="parquet")
    residual = oculi.load_capture(_saved(full.residual, tmp_path))
    residual.metadata["prompt_tensor"] = torch.zeros(2)
    with pytest.raises(InputError, match=r"not: 'prompt_tensor' \(Tensor\)"):
        residual.save(tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()
    with pytest.raises(TypeError, match="save_capture takes an oculi capture structure"):
        save_capture({"queries": torch.zeros(1)}, tmp_path / "dict.safetensors")


# -- bad files (BAD_INPUTS row 21: corrupt, truncated, foreign, pickled) ------------------
def _saved(capture, tmp_path, name="good.safetensors", format="safetensors"):
    path = tmp_path / name
    capture.save(path, format=format)
    return path


def _rewrite(src, dst, edit_meta=None, edit_tensors=None):
    """Copy a saved safetensors capture with its metadata and/or tensors edited."""
    tensors = safetensors.torch.load_file(src)
    with safe_open(src, framework="pt") as f:
        meta = json.loads(f.metadata()["oculi_capture"])
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    safetensors.torch.save_file(tensors, dst, metadata={"oculi_capture": json.dumps(meta)})
    return dst


def _crc(t: torch.Tensor) -> int:
    return zlib.crc32(t.contiguous().numpy().tobytes())


def _fails(path, match, **kwargs):
    with pytest.raises(CaptureFileError, match=match) as info:
        oculi.load_capture(path, **kwargs)
    assert str(path) in str(info.value)
    return str(info.value)


def test_missing_file_directory_and_empty_file(tmp_path):
    missing = tmp_path / "nope.safetensors"
    message = _fails(missing, "no such file")
    assert message == f"cannot load capture file '{missing}': no such file"
    _fails(tmp_path, "it is a directory, not a capture file")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    _fails(tmp_path / "empty.safetensors", r"the file is empty \(0 bytes\)")


def test_a_json_file_that_is_not_an_export(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"model_type": "llama"}')
    _fails(path, r"a JSON file, not an oculi capture \(oculi reads safetensors, .npz and HDF5")


def test_unrecognised_bytes(tmp_path):
    path = tmp_path / "noise.safetensors"
    path.write_bytes(b"GIF89a" + bytes(range(50)))
    _fails(path, r"not an oculi capture: unrecognised format \(56 bytes, starting b'GIF89a")


def test_truncated_safetensors(full, tmp_path):
    data = _saved(full, tmp_path).read_bytes()
    (tmp_path / "head.safetensors").write_bytes(data[:200])
    _fails(tmp_path / "head.safetensors", "truncated: its safetensors header claims")
    (tmp_path / "body.safetensors").write_bytes(data[:-100])
    _fails(tmp_path / "body.safetensors", "corrupt or truncated safetensors data")


def test_a_flipped_byte_is_caught_by_the_checksum(full, tmp_path):
    data = bytearray(_saved(full.attention, tmp_path).read_bytes())
    data[-3] ^= 0x10  # inside the last tensor's data
    (tmp_path / "flipped.safetensors").write_bytes(bytes(data))
    _fails(
        tmp_path / "flipped.safetensors", r"tensor '\w+' is corrupt: its checksum does not match"
    )


def test_a_safetensors_file_that_is_not_a_capture(tmp_path):
    path = tmp_path / "weights.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(3)}, path)
    _fails(path, "a safetensors file, but not an oculi capture \\(no 'oculi_capture' entry")


def test_corrupt_metadata_json(full, tmp_path):
    path = tmp_path / "json.safetensors"
    tensors = safetensors.torch.load_file(_saved(full.mlp, tmp_path))
    safetensors.torch.save_file(tensors, path, metadata={"oculi_capture": '{"format": "oculi-'})
    _fails(path, r"corrupt metadata \(not JSON")


def test_unknown_structure(full, tmp_path):
    def rename(meta):
        meta["capture"]["structure"] = "BananaCapture"

    path = _rewrite(_saved(full.residual, tmp_path), tmp_path / "banana.safetensors", rename)
    _fails(
        path, "the capture has an unknown structure 'BananaCapture' \\(oculi reads AttentionCapture"
    )


def test_a_part_holding_the_wrong_structure(full, tmp_path):
    def swap(meta):
        meta["capture"]["parts"]["attention"]["structure"] = "ResidualCapture"

    path = _rewrite(_saved(full, tmp_path), tmp_path / "swap.safetensors", swap)
    _fails(path, "FullCapture part 'attention' holds 'ResidualCapture', expected AttentionCapture")


def test_tensors_and_metadata_disagree(full, tmp_path):
    good = _saved(full.mlp, tmp_path)

    def drop(tensors):
        del tensors["gate"]

    _fails(
        _rewrite(good, tmp_path / "a.safetensors", edit_tensors=drop),
        "tensors listed in its metadata are missing: gate",
    )

    def add(tensors):
        tensors["surprise"] = torch.zeros(2)

    _fails(
        _rewrite(good, tmp_path / "b.safetensors", edit_tensors=add),
        "it holds tensors its metadata does not list: surprise",
    )

    def retype(tensors):
        tensors["up"] = tensors["up"].double()

    _fails(
        _rewrite(good, tmp_path / "c.safetensors", edit_tensors=retype),
        "tensor 'up' is float64 but the metadata says float32",
    )


def test_a_field_the_structure_does_not_have(full, tmp_path):
    def add_field(meta):
        meta["capture"]["tensors"].append("bogus")
        meta["tensors"]["bogus"] = meta["tensors"]["gate"]

    def add_tensor(tensors):
        tensors["bogus"] = tensors["gate"].clone()

    path = _rewrite(
        _saved(full.mlp, tmp_path), tmp_path / "bogus.safetensors", add_field, add_tensor
    )
    _fails(
        path,
        r"the capture: a MLPCapture holds tensors among gate, up, post_activation, output, got \[",
    )


def test_shapes_must_fit_the_structure(full, tmp_path):
    """A file whose own listing is consistent, but whose queries have 3 heads, not 4."""

    def three_heads(tensors):
        tensors["queries"] = tensors["queries"][:, :3].contiguous()

    def relist(meta):
        q = meta["tensors"]["queries"]
        q["shape"][1] = 3
        q["crc32"] = _crc(full.attention.queries[:, :3])

    path = _rewrite(
        _saved(full.attention, tmp_path), tmp_path / "heads.safetensors", relist, three_heads
    )
    _fails(
        path,
        re.escape(
            "queries has shape [3, 3, 11, 16], but a AttentionCapture keeps it as [L, H, T, D] "
            "and H is 4 here (layers [0, 1, 2])"
        ),
    )

    def drop_layer(tensors):
        tensors["post_mlp"] = tensors["post_mlp"][:2].contiguous()

    def relist_layer(meta):
        meta["tensors"]["post_mlp"]["shape"][0] = 2
        meta["tensors"]["post_mlp"]["crc32"] = _crc(full.residual.post_mlp[:2])

    path = _rewrite(
        _saved(full.residual, tmp_path, "r.safetensors"),
        tmp_path / "l.safetensors",
        relist_layer,
        drop_layer,
    )
    _fails(
        path,
        re.escape(
            "post_mlp has shape [2, 11, 64], but a ResidualCapture keeps it as [L, T, d_model] and L is 3"
        ),
    )


def test_top_k_must_fit_the_lens(full, tmp_path):
    def claim_k(meta):
        meta["capture"]["attrs"]["top_k"] = 6

    path = _rewrite(_saved(full.logits, tmp_path), tmp_path / "k.safetensors", claim_k)
    _fails(
        path,
        re.escape(
            "top_k_values has shape [3, 11, 5], but a LogitCapture keeps it as [L, T, K] and K is 6"
        ),
    )


def test_a_newer_format_version(full, tmp_path):
    def bump(meta):
        meta["format_version"] = 2
        meta["oculi_version"] = "9.0.0"

    path = _rewrite(_saved(full.residual, tmp_path), tmp_path / "new.safetensors", bump)
    _fails(
        path,
        re.escape(
            "written by a newer oculi (9.0.0, capture format version 2); this oculi reads "
            "version 1: upgrade oculi"
        ),
    )


def test_truncated_npz_and_hdf5(full, tmp_path):
    data = _saved(full, tmp_path, "full.npz", "npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    _fails(tmp_path / "cut.npz", r"corrupt or truncated zip/.npz archive")
    data = _saved(full, tmp_path, "full.h5", "hdf5").read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[: len(data) // 2])
    _fails(tmp_path / "cut.h5", r"corrupt or truncated HDF5 file")


def test_npz_and_hdf5_that_are_not_captures(tmp_path):
    np.savez(tmp_path / "plain.npz", a=np.zeros(3))
    _fails(
        tmp_path / "plain.npz",
        r"an .npz archive, but not an oculi capture \(no '__meta__' string entry\)",
    )
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f.create_dataset("a", data=np.zeros(3))
    _fails(
        tmp_path / "plain.h5",
        r"an HDF5 file, but not an oculi capture \(no 'oculi_capture' attribute\)",
    )


# -- nothing is unpickled silently -------------------------------------------------------
RAN: list[str] = []


def _payload_ran(tag: str) -> list[str]:
    RAN.append(tag)
    return RAN


class Booby:
    """Unpickling this calls ``_payload_ran``: a stand-in for arbitrary code."""

    def __init__(self, tag: str):
        self.tag = tag

    def __reduce__(self):
        return (_payload_ran, (self.tag,))


@pytest.fixture()
def ran():
    RAN.clear()
    yield RAN
    RAN.clear()


def test_a_pickle_is_refused_and_never_run(tmp_path, ran):
    path = tmp_path / "innocent.safetensors"  # the name does not matter, the bytes do
    path.write_bytes(pickle.dumps(Booby("pickle")))
    message = _fails(path, "it is a pickle file, and unpickling can execute arbitrary code")
    assert message.endswith("If you trust this file, call load_capture(path, allow_pickle=True)")
    assert ran == []
    # opting in runs it (that is what pickle does), and the result is still not a capture
    _fails(path, "the pickle holds a list, not an oculi capture", allow_pickle=True)
    assert ran == ["pickle"]


def test_a_torch_save_zip_is_refused_and_never_run(tmp_path, ran):
    path = tmp_path / "capture.pt"
    torch.save({"x": Booby("torch")}, path)
    _fails(path, "it is a pickle file, and unpickling can execute arbitrary code")
    assert ran == []


def test_an_npz_with_object_arrays_is_refused_even_when_pickles_are_allowed(tmp_path, ran):
    path = tmp_path / "objects.npz"
    np.savez(path, __meta__=np.array("{}"), evil=np.array([Booby("npz")], dtype=object))
    _fails(path, r"the .npz holds pickled Python objects \(an object array\)", allow_pickle=True)
    assert ran == []


# -- every safetensors header length -----------------------------------------------------
def _header_length(path) -> int:
    return int.from_bytes(path.read_bytes()[:8], "little")


def _small(pad: int) -> oculi.ResidualCapture:
    values = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    return oculi.ResidualCapture(layers=(0, 1), pre_attn=values, metadata={"pad": "x" * pad})


def test_every_header_length_oculi_writes_loads_back(tmp_path):
    """safetensors pads its header to a multiple of 8: 32 low bytes, 0x80 (pickle's PROTO) among
    them. Captures of growing metadata reach each of them and must all load."""
    path = tmp_path / "c.safetensors"
    reached = set()
    for pad in range(0, 8 * 40, 7):
        capture = _small(pad)
        capture.save(path)
        reached.add(_header_length(path) % 256)
        assert_same(capture, oculi.load_capture(path))
    assert reached == set(range(0, 256, 8))


def test_all_256_header_length_residues_load(tmp_path):
    """Other writers need not pad (the format allows any length): an oculi header padded with
    spaces to each of 256 consecutive lengths loads, 0x80 and 0x80 + 0x200 (PROTO 2) included."""
    capture = _small(0)
    data = _saved(capture, tmp_path).read_bytes()
    n = int.from_bytes(data[:8], "little")
    header, body = data[8 : 8 + n].rstrip(b" "), data[8 + n :]
    start = 0x280 - 0x80  # lengths 0x200..0x2ff: 0x280 starts b"\x80\x02", a protocol-2 pickle's
    assert len(header) < start
    path = tmp_path / "unpadded.safetensors"
    for length in range(start, start + 256):
        path.write_bytes(length.to_bytes(8, "little") + header.ljust(length) + body)
        assert _header_length(path) == length
        assert_same(capture, oculi.load_capture(path))
    assert path.read_bytes()[:2] != b"\x80\x02"  # the loop ended past it...
    path.write_bytes((0x280).to_bytes(8, "little") + header.ljust(0x280) + body)
    assert path.read_bytes()[:2] == b"\x80\x02"  # ...and passed through it
    assert_same(capture, oculi.load_capture(path))


def test_a_truncated_file_that_looks_like_a_pickle_is_not_unpickled(tmp_path, ran):
    """A damaged header that begins like a pickle is refused as one: never run silently."""
    capture = _small(0)
    data = _saved(capture, tmp_path).read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + n].rstrip(b" ").ljust(0x280)
    path = tmp_path / "cut.safetensors"
    path.write_bytes((0x280).to_bytes(8, "little") + header[:100])
    _fails(path, "it is a pickle file")
    assert ran == []


# -- paths and files (BAD_INPUTS row 28) ------------------------------------------------------
ALL_FORMATS = (*LOADABLE, "json", "pickle")


def test_row28_a_path_with_a_tilde_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    capture = _small(3)
    capture.save("~/tilde.safetensors")
    assert (tmp_path / "tilde.safetensors").is_file()
    assert_same(capture, oculi.load_capture("~/tilde.safetensors"))
    with pytest.raises(CaptureFileError) as info:
        oculi.load_capture("~/nope.safetensors")
    assert str(info.value) == (
        f"cannot load capture file '~/nope.safetensors' ({tmp_path / 'nope.safetensors'}): "
        "no such file"
    )


@pytest.mark.parametrize("format", ALL_FORMATS)
def test_row28_a_missing_folder_is_named_not_created(tmp_path, format):
    target = tmp_path / "runs" / "eiffel.bin"
    with pytest.raises(FileWriteError) as info:
        save_capture(_small(0), target, format=format)
    assert str(info.value) == (
        f"cannot save capture to '{target}': the folder '{tmp_path / 'runs'}' does not exist "
        "(oculi does not create folders; make it first, e.g. os.makedirs(folder, exist_ok=True))"
    )
    assert isinstance(info.value, OSError)
    assert list(tmp_path.iterdir()) == []


def test_row28_a_file_or_folder_in_the_way(tmp_path):
    (tmp_path / "plain").write_text("not a folder")
    with pytest.raises(FileWriteError, match=re.escape(f"'{tmp_path / 'plain'}' is a file, not")):
        _small(0).save(tmp_path / "plain" / "x.safetensors")
    with pytest.raises(FileWriteError, match="it is a folder; give a file name inside it"):
        _small(0).save(tmp_path)


_WITHOUT_ROOTS_PASS = """
import ctypes, os, sys
if os.geteuid() == 0:  # root ignores permissions: drop the capabilities that let it
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
    class Data(ctypes.Structure):
        _fields_ = [(n, ctypes.c_uint32) for n in ("effective", "permitted", "inheritable")]
    libc = ctypes.CDLL(None, use_errno=True)
    header, data = Header(0x20080522, 0), (Data * 2)()
    assert libc.capget(ctypes.byref(header), data) == 0
    data[0].effective &= ~0b1110  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
    assert libc.capset(ctypes.byref(header), data) == 0
import torch, oculi
from oculi.errors import OculiError
try:
    if sys.argv[1] == "save":
        oculi.ResidualCapture(layers=(0,), pre_attn=torch.zeros(1, 2, 3)).save(sys.argv[2])
    else:
        oculi.load_capture(sys.argv[2])
except OculiError as exc:
    print(type(exc).__name__, exc)
"""


def _without_permission(action: str, path) -> str:
    """What ``save`` or ``load`` of ``path`` says in a process the file permissions bind
    (one that, run as root, first drops the capabilities that let root read and write
    anywhere)."""
    import os
    import subprocess

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    return subprocess.run(
        [sys.executable, "-c", _WITHOUT_ROOTS_PASS, action, str(path)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout.strip()


def test_row28_a_read_only_folder(tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    target = folder / "x.safetensors"
    try:
        out = _without_permission("save", target)
    finally:
        folder.chmod(0o755)
    assert out == (
        f"FileWriteError cannot save capture to '{target}': the folder '{folder}' is not writable"
    )
    assert list(folder.iterdir()) == []


def test_an_unreadable_file(tmp_path):
    path = _saved(_small(0), tmp_path)
    path.chmod(0o200)
    try:
        out = _without_permission("load", path)
    finally:
        path.chmod(0o644)
    assert out == (
        f"CaptureFileError cannot load capture file '{path}': cannot read it (Permission denied)"
    )


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_row28_files_follow_the_umask_in_every_format(tmp_path, umask):
    import os
    import stat

    old = os.umask(umask)
    try:
        for format in ALL_FORMATS:
            path = tmp_path / f"c.{format}"
            save_capture(_small(0), path, format=format)
            assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, format
    finally:
        os.umask(old)


def test_overwrite_false_refuses_an_existing_file(tmp_path):
    path = tmp_path / "x.safetensors"
    first, second = _small(1), _small(2)
    first.save(path, overwrite=False)  # a new file: fine
    with pytest.raises(FileExistsError) as info:
        second.save(path, overwrite=False)
    assert isinstance(info.value, OutputExistsError)
    assert str(info.value) == (
        f"cannot save capture to '{path}': the file exists and overwrite=False; pass "
        "overwrite=True to replace it"
    )
    assert_same(first, oculi.load_capture(path))  # untouched
    second.save(path)  # the default replaces it
    assert_same(second, oculi.load_capture(path))
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path, monkeypatch):
    """The writer fails after the temporary file exists (HDF5 without h5py): the previous file
    is untouched and nothing else is left in the folder."""
    from oculi.errors import MissingExtraError

    path = tmp_path / "x.h5"
    first = _small(1)
    first.save(path, format="hdf5")
    before = path.read_bytes()
    monkeypatch.setitem(sys.modules, "h5py", None)  # `import h5py` now fails
    with pytest.raises(MissingExtraError, match=r"pip install 'oculi\[export\]'"):
        _small(2).save(path, format="hdf5")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.h5"]
