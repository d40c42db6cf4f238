"""A capture's file format comes from its suffix unless ``format=`` says it (BAD_INPUTS row 42).

``capture.save("x.npz")`` must write an ``.npz`` that NumPy reads, ``x.h5`` an HDF5 file h5py
reads, ``x.json`` JSON; a suffix that contradicts ``format=`` or that no format has is refused
with the accepted suffixes named; ``.pkl`` needs ``format="pickle"``. ``oculi.load_capture``
reads each back (it recognises the bytes, not the name). The expected arrays are the capture's
own tensors, read by each format's native library, not by oculi.
"""

from __future__ import annotations

import json
import re

import h5py
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import oculi
from models import prompt_ids, tiny_model
from oculi import ResidualConfig
from oculi.capture.io import save_capture
from oculi.errors import CaptureFileError, InputError

ACCEPTED = ".safetensors, .npz, .h5, .hdf5, .json, .pkl, .pickle"


@pytest.fixture(scope="module")
def residual() -> oculi.ResidualCapture:
    adapter = oculi.attach(tiny_model("llama_gqa"))
    return adapter.capture_residual(prompt_ids(), ResidualConfig(layers=[0, 2]))


def _same(loaded: oculi.ResidualCapture, original: oculi.ResidualCapture) -> None:
    assert type(loaded) is type(original) and loaded.layers == original.layers
    for name in ("pre_attn", "post_attn", "pre_mlp", "post_mlp"):
        assert torch.equal(getattr(loaded, name), getattr(original, name)), name


def _native(path, kind: str) -> dict[str, np.ndarray]:
    """The arrays in ``path`` as the format's own library reads them (no oculi code)."""
    if kind == "npz":
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files if k != "__meta__"}
    if kind == "hdf5":
        with h5py.File(path, "r") as f:
            assert json.loads(f.attrs["oculi_capture"])["structure"] == "ResidualCapture"
            return {k: f[k][()] for k in f}
    return load_file(str(path))


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("r.safetensors", "safetensors"),
        ("r.npz", "npz"),
        ("r.h5", "hdf5"),
        ("r.hdf5", "hdf5"),
        ("R.NPZ", "npz"),  # suffixes are matched without case
        ("r", "safetensors"),  # no suffix: the default format
    ],
)
def test_the_suffix_picks_the_format_and_the_native_library_reads_it(
    residual, tmp_path, name, kind
):
    path = tmp_path / name
    residual.save(path)
    arrays = _native(path, kind)
    assert {"pre_attn", "post_attn", "pre_mlp", "post_mlp"} <= set(arrays)
    for key, array in arrays.items():
        np.testing.assert_array_equal(array, getattr(residual, key).numpy())
    _same(oculi.load_capture(path), residual)
    # format= and a suffix that agree give the same file contents
    other = tmp_path / f"again{path.suffix}"
    save_capture(residual, other, format=kind)
    assert set(_native(other, kind)) == set(arrays)


def test_a_json_suffix_writes_the_metadata_as_json(residual, tmp_path):
    path = tmp_path / "r.json"
    residual.save(path)
    meta = json.loads(path.read_text())
    assert meta["structure"] == "ResidualCapture"
    assert meta["tensors"]["post_mlp"]["shape"] == list(residual.post_mlp.shape)
    with pytest.raises(CaptureFileError, match=r"metadata-only JSON export"):
        oculi.load_capture(path)


def test_a_pickle_suffix_needs_format_pickle(residual, tmp_path):
    for name in ("r.pkl", "r.pickle"):
        with pytest.raises(ValueError) as info:
            residual.save(tmp_path / name)
        assert str(info.value) == (
            f"{str(tmp_path / name)!r} asks for a pickle by its suffix; oculi writes pickles only "
            "when asked by name, as loading one can run code: pass format='pickle', or use "
            ".safetensors"
        )
    assert list(tmp_path.iterdir()) == []
    residual.save(tmp_path / "r.pkl", format="pickle")
    _same(oculi.load_capture(tmp_path / "r.pkl", allow_pickle=True), residual)


@pytest.mark.parametrize(
    ("name", "format", "implied"),
    [
        ("x.npz", "safetensors", "npz"),
        ("x.safetensors", "npz", "safetensors"),
        ("x.h5", "npz", "hdf5"),
        ("x.json", "hdf5", "json"),
        ("x.pkl", "npz", "pickle"),
        ("x.hdf5", "pickle", "hdf5"),
    ],
)
def test_row42_a_suffix_that_contradicts_format_is_refused(
    residual, tmp_path, name, format, implied
):
    path = tmp_path / name
    with pytest.raises(ValueError) as info:
        residual.save(path, format=format)
    assert str(info.value) == (
        f"the suffix {path.suffix!r} of {str(path)!r} means format={implied!r}, but "
        f"format={format!r} was given; make them agree (suffixes: {ACCEPTED})"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["x.npy", "x.pt", "x.bin", "run.v2"])
def test_row42_a_suffix_no_format_has_is_refused_without_format(residual, tmp_path, name):
    path = tmp_path / name
    with pytest.raises(ValueError) as info:
        residual.save(path)
    suffix = path.suffix
    assert str(info.value) == (
        f"cannot tell the capture format of {str(path)!r} from its suffix {suffix!r}; use one of "
        f"{ACCEPTED}, or pass format= (one of safetensors, npz, hdf5, json, pickle)"
    )
    assert list(tmp_path.iterdir()) == []
    # said out loud, the format wins over a suffix that names none
    residual.save(path, format="npz")
    with np.load(path) as z:
        np.testing.assert_array_equal(z["pre_attn"], residual.pre_attn.numpy())


def test_load_capture_reads_the_bytes_whatever_the_name(residual, tmp_path):
    """A file keeps loading when renamed (or written by an oculi that ignored suffixes)."""
    for kind in ("safetensors", "npz", "hdf5"):
        path = tmp_path / f"{kind}.data"
        residual.save(path, format=kind)
        renamed = path.rename(tmp_path / f"{kind}-as.npz")
        _same(oculi.load_capture(renamed), residual)


def test_an_unknown_format_name_is_still_refused_first(residual, tmp_path):
    with pytest.raises(ValueError, match=re.escape("unknown capture format 'numpy'; choose one")):
        residual.save(tmp_path / "x.npz", format="numpy")


# -- ModelAnalyzer.save_activations follows the same rule -------------------------------------
@pytest.fixture(scope="module")
def record():
    from models import tiny_tokenizer
    from oculi import ModelAnalyzer

    analyzer = ModelAnalyzer(adapter=oculi.attach(tiny_model("llama_gqa"), tiny_tokenizer()))
    return analyzer, analyzer.extract_activations("the cat sat")


def test_activation_files_take_the_format_from_the_suffix(record, tmp_path):
    analyzer, rec = record
    path = analyzer.save_activations(rec, tmp_path / "acts.npz")
    with np.load(path, allow_pickle=False) as z:  # NumPy reads it, tensors by name
        want = rec.layer_activations["model.layers.1"].numpy()
        np.testing.assert_array_equal(z["0/layer/model.layers.1"], want)
    assert analyzer.load_activations(path).tokens == rec.tokens


@pytest.mark.parametrize(
    ("name", "format", "implied"),
    [("acts.npz", "safetensors", "npz"), ("acts.json", "pickle", "json"),
     ("acts.pt", "npz", "pt")],
)  # fmt: skip
def test_row42_activation_files_refuse_a_contradicting_suffix(record, tmp_path, name, format,
                                                              implied):  # fmt: skip
    analyzer, rec = record
    path = tmp_path / name
    with pytest.raises(InputError) as info:
        analyzer.save_activations(rec, path, format=format)
    assert str(info.value) == (
        f"the suffix {path.suffix!r} of '{path}' means format={implied!r}, but "
        f"format={format!r} was given; make them agree (suffixes: .safetensors, .npz, .pt, "
        ".json, .pkl, .pickle)"
    )
    with pytest.raises(InputError, match=r"cannot tell the activation file format of .*'\.bin'"):
        analyzer.save_activations(rec, tmp_path / "acts.bin")
    assert list(tmp_path.iterdir()) == []
