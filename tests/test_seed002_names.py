"""Seed 002's names: the table in docs/seed002_names.md and ``ActivationPatch(layer_name=...)``.

The table maps every class and function seed 002 names to oculi's call; each oculi call in it
must resolve (parsed from the page, imported and looked up here). ``ActivationPatch`` takes
seed 002's module path: the patched forward equals a plain PyTorch forward hook that replaces
(or adds to) that module's output (the seed's own semantics), and equals the site/layer form
of the same patch.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import torch

import oculi
from models import D_MODEL, prompt_ids, seed_folder, tiny_model
from oculi.errors import UnknownSiteError
from oculi.intervention import ActivationPatch, InterventionContext
from oculi.intervention.module_paths import module_sites, site_of_module

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "docs" / "seed002_names.md"
# the seed documents: $OCULI_SEEDS, else shared/seeds beside the repository (as CI lays it)


SEED = seed_folder() / "002_251355f554932d97.txt"


# -- the table -----------------------------------------------------------------------------
def _rows() -> list[tuple[str, str]]:
    """``(seed name, oculi call)`` of every table row: the first two backticked cells."""
    rows = []
    for line in TABLE.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        seed = re.findall(r"`([^`]+)`", cells[0])
        call = re.findall(r"`([^`]+)`", cells[1])
        assert seed and call, line
        rows.append((seed[0], call[0]))
    return rows


def _resolve(dotted: str):
    """Import the longest module prefix of ``dotted`` and getattr the rest."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(dotted)


def test_every_oculi_call_in_the_table_exists():
    rows = _rows()
    assert len(rows) >= 30
    for seed_name, call in rows:
        assert call.startswith("oculi."), (seed_name, call)
        obj = _resolve(call.split("(")[0])
        assert callable(obj) or isinstance(obj, property), call


@pytest.mark.skipif(not SEED.is_file(), reason=f"seed 002 is not at {SEED} (set OCULI_SEEDS)")
def test_the_table_names_every_class_function_and_method_seed_002_names():
    """Every class the seed's code calls, every function its text lists or imports, and every
    method its code calls on its objects (``analyzer.generate(``, ``lens.plot_convergence(``)."""
    named = {seed for seed, _ in _rows()}
    text = SEED.read_text()
    transformers = {"AutoModel", "AutoModelForCausalLM", "AutoTokenizer"}
    classes = set(re.findall(r"\b([A-Z][a-z]+(?:[A-Z][a-z]+)+)\(", text))
    imported = re.findall(r"^from (\w+) import \(?([^\n]*)", text, re.M)
    imported += re.findall(r"^from (intervention) import \(\n((?:\s+\w+,?\n)+)\)", text, re.M)
    functions = set(re.findall(r"`([a-z_][a-z0-9_]*)\(\)`", text))  # the seed's `name()` lists
    for module, names in imported:
        if module != "transformers":
            found = {n.strip() for n in re.split(r"[,\s]+", names) if n.strip()}
            functions |= {n for n in found if n[0].islower()}
            classes |= {n for n in found if n[0].isupper()}
    assert {"ModelAnalyzer", "LogitLens", "ActivationExtractor", "InterventionHandler"} <= classes
    assert {"create_steering_vector", "reduce_dimensions", "compute_feature_attribution"} <= (
        functions
    )
    assert (classes - transformers) - named == set()
    assert functions - named - {n.split(".")[-1] for n in named} == set()  # or a method
    owners = {"analyzer": "ModelAnalyzer", "inspector": "ModelInspector", "lens": "LogitLens",
              "extractor": "ActivationExtractor", "handler": "InterventionHandler",
              "ActivationExtractor": "ActivationExtractor"}  # fmt: skip
    methods = {f"{cls}.{m}" for obj, cls in owners.items()
               for m in re.findall(rf"\b{obj}\.([a-z_]+)\(", text)}  # fmt: skip
    assert len(methods) >= 20
    assert methods - named == set()


# -- ActivationPatch(layer_name=...) -------------------------------------------------------
FAMILIES = ["llama_gqa", "gemma3", "gpt2", "olmo2", "neox_parallel"]


def _hooked(model, path: str, pos: int, value: torch.Tensor, mode: str, ids) -> torch.Tensor:
    """Logits ``[T, V]`` with ``path``'s output at ``pos`` replaced or added to: plain PyTorch."""

    def hook(_m, _args, out):
        x = out[0] if isinstance(out, tuple) else out
        x = x.clone()
        x[:, pos] = value if mode == "replace" else x[:, pos] + value
        return (x, *out[1:]) if isinstance(out, tuple) else x

    handle = model.get_submodule(path).register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model(ids[None]).logits[0]
    finally:
        handle.remove()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["replace", "add"])
def test_a_module_path_patch_equals_a_hook_on_that_module(family, mode):
    model = tiny_model(family)
    adapter = oculi.attach(model)
    ids = prompt_ids()
    value = torch.randn(D_MODEL, generator=torch.Generator().manual_seed(5))
    paths = [p for p, (_k, layer) in module_sites(adapter).items() if layer == 1]
    assert len(paths) >= 4  # the layer, its attention and MLP, and at least one norm
    plain = adapter.forward(ids)
    for path in paths:
        want = _hooked(model, path, -2, value, mode, ids)
        patch = ActivationPatch(layer_name=path, position=-2, value=value, mode=mode)
        with InterventionContext(adapter, [patch]):
            got = adapter.forward(ids)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=path)
        assert not torch.allclose(got, plain), path
        kind, layer = site_of_module(adapter, path)
        if kind in oculi.capture.sites.SITE_KINDS:  # the same patch in oculi's own terms
            same = ActivationPatch(kind, layer, position=-2, value=value, mode=mode)
            with InterventionContext(adapter, [same]):
                assert torch.equal(adapter.forward(ids), got), path


def test_module_paths_follow_the_anatomy():
    gemma3 = oculi.attach(tiny_model("gemma3"))
    assert site_of_module(gemma3, "model.layers.2") == ("resid_post", 2)
    assert site_of_module(gemma3, "model.layers.2.mlp") == ("mlp_result", 2)
    assert site_of_module(gemma3, "model.layers.2.post_feedforward_layernorm") == ("mlp_out", 2)
    assert site_of_module(gemma3, "model.layers.0.self_attn") == ("o_out", 0)
    assert site_of_module(gemma3, "model.layers.0.input_layernorm") == ("attn_in", 0)
    assert site_of_module(gemma3, "model.layers.1.pre_feedforward_layernorm") == ("mlp_in", 1)
    gpt2 = oculi.attach(tiny_model("gpt2"))
    assert site_of_module(gpt2, "transformer.h.1.mlp") == ("mlp_out", 1)
    assert site_of_module(gpt2, "transformer.h.1.attn") == ("attn_out", 1)
    assert site_of_module(gpt2, "transformer.h.2.ln_1") == ("attn_in", 2)


def test_an_unknown_module_path_is_refused_naming_the_valid_ones():
    adapter = oculi.attach(tiny_model("llama_gqa"))
    value = torch.zeros(D_MODEL)
    patch = ActivationPatch(layer_name="transformer.h.1", position=-1, value=value)
    with pytest.raises(UnknownSiteError) as info, InterventionContext(adapter, [patch]):
        pass
    assert str(info.value) == (
        "layer_name='transformer.h.1' is not a module oculi can patch in this 'llama' model; "
        "valid paths are 'model.layers.0', 'model.layers.0.input_layernorm', "
        "'model.layers.0.self_attn', 'model.layers.0.post_attention_layernorm', "
        "'model.layers.0.mlp' with any layer 0..2 in place of 0 (or pass site= and layer=)"
    )
    typo = ActivationPatch(layer_name="model.layers.1.mpl", position=-1, value=value)
    with (
        pytest.raises(UnknownSiteError, match=r"did you mean 'model\.layers\.1\.mlp'\?"),
        InterventionContext(adapter, [typo]),
    ):
        pass
    with pytest.raises(UnknownSiteError, match=r"any layer 0\.\.2"):
        site_of_module(adapter, "model.layers.3")
    with pytest.raises(ValueError, match="give either layer_name= .* or site= and layer=, not"):
        ActivationPatch("resid_post", 1, layer_name="model.layers.1", position=-1, value=value)
    with pytest.raises(ValueError, match="say where to patch: site= and layer="):
        ActivationPatch(position=-1, value=value)
    with pytest.raises(ValueError, match="value is required"):
        ActivationPatch(layer_name="model.layers.1", position=-1)
    # the hooks of a refused context are all gone: a plain forward is the model's own
    with torch.no_grad():
        want = adapter.model(prompt_ids()[None]).logits[0]
    torch.testing.assert_close(adapter.forward(prompt_ids()), want)


def test_repr_names_the_module_path():
    value = torch.zeros(D_MODEL)
    patch = ActivationPatch(layer_name="model.layers.3.mlp", position=-1, value=value)
    assert repr(patch) == (
        "ActivationPatch(layer_name='model.layers.3.mlp', position=-1, mode='replace')"
    )


@pytest.mark.gemma
def test_seed_002_module_path_on_gemma(gemma):
    """The issue's own call, on the default model: the MLP's output before Gemma's post-MLP norm."""
    ids = gemma.tokenize("The Eiffel Tower is located in the city of")
    clean = {}
    handle = gemma.model.get_submodule("model.layers.3.mlp").register_forward_hook(
        lambda _m, _a, out: clean.__setitem__("mlp", out[0, -1].clone())
    )
    try:
        with torch.no_grad():
            gemma.model(gemma.tokenize("The Colosseum is located in the city of")[None])
    finally:
        handle.remove()
    patch = ActivationPatch(layer_name="model.layers.3.mlp", position=-1, value=clean["mlp"])
    with InterventionContext(gemma, [patch]):
        got = gemma.forward(ids)
    want = _hooked(gemma.model, "model.layers.3.mlp", -1, clean["mlp"], "replace", ids)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    assert not torch.allclose(got, gemma.forward(ids))
