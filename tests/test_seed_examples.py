"""Every code example of the seed documents that oculi supports, run as written.

The seed documents (``$OCULI_SEEDS``, default ``../shared/seeds`` beside the repository; the tests skip where they
are absent, as oculi does not ship them) are read at test time and their Python blocks are
executed in document order in one namespace, as a reader would run them in a notebook. Only
the model name changes (plus the few import lines the seed's own packaging names, the seed
bugs listed in ``FIXES``, each with its reason, and the statements in ``REFUSED`` that no
model can answer as written: oculi's error naming the call to make is asserted, then that
call runs in their place):

- seeds 000 and 001 load ``meta-llama/Meta-Llama-3-8B`` / ``Llama-3.2-3B-Instruct`` with
  ``AutoModelForCausalLM.from_pretrained`` and wrap them in ``LlamaAttentionAdapter``: the name
  becomes a folder holding a tiny random Llama with the seed model's layers, heads, KV heads
  and head size (32/32/8/128, 28/24/8/128; width 4 per head) and Gemma 3's tokenizer, so the seeds'
  layer and head indices exist and their printed shapes are checked as the seeds show them;
- seeds 002 and 004 run on the default model, Gemma 3 270M.

Which blocks run, and why the others do not, is the explicit list below (``SUPPORTED`` and
``EXCLUDED`` per document; a test checks that together they cover every block). Where a seed
shows an output or states a property (a shape, a printed line, a probability), it is asserted
against an independent reference: the Hugging Face model's own outputs or a hand computation.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import oculi.errors
from models import seed_folder

# $OCULI_SEEDS, else shared/seeds beside the repository (as CI lays it)


SEEDS = seed_folder()
DOCS = {
    "000": "000_95106a628e342bfa.txt",
    "001": "001_ff73bb892e5383c6.txt",
    "002": "002_251355f554932d97.txt",
    "003": "003_acd26da894736979.txt",
    "004": "004_0e34175658f173ca.txt",
}
pytestmark = pytest.mark.skipif(
    not all((SEEDS / name).is_file() for name in DOCS.values()),
    reason=f"the seed documents are not at {SEEDS} (set OCULI_SEEDS)",
)


def _text(doc: str) -> str:
    return (SEEDS / DOCS[doc]).read_text()


def fenced_blocks(doc: str) -> list[str]:
    """The ```python blocks of a markdown seed, in order."""
    return re.findall(r"```python\n(.*?)```", _text(doc), re.S)


def anchored_block(doc: str, start: str, stop: str) -> str:
    """Seed 000 is a web page without fences: a block runs from the unique line ``start`` to
    the line before the first line equal to ``stop`` after it (the next heading)."""
    lines = _text(doc).splitlines()
    first = [i for i, line in enumerate(lines) if line == start]
    assert len(first) == 1, f"seed {doc}: {start!r} found {len(first)} times"
    end = next(i for i in range(first[0] + 1, len(lines)) if lines[i] == stop)
    return "\n".join(lines[first[0] : end]) + "\n"


# -- what runs, and why the rest does not ----------------------------------------------------
# seed 000 (oculi's README as a web page): (name, first line, the heading after the block)
SEED_000 = [
    ("quick start", "from transformers import AutoModelForCausalLM, AutoTokenizer",
     "Phase 1 Features (v0.3.0-dev)"),
    ("residual", "from oculi import ResidualConfig", "MLP Internals Capture"),
    ("mlp", "from oculi import MLPConfig", "Logit Lens Analysis"),
    ("logit lens", "from oculi import LogitConfig", "Circuit Detection"),
    ("circuits", "from oculi.analysis import CircuitDetection", "Unified Full Capture"),
    ("full capture", "from oculi import FullCapture", "Phase 2 Features (v0.5.0-dev)"),
    ("attribution", "from oculi.analysis import AttributionMethods, AttributionResult",
     "Head Composition Analysis"),
    ("composition", "from oculi.analysis import CompositionAnalysis, CompositionResult",
     "Analysis Examples"),
    ("entropy", "from oculi.analysis import EntropyAnalysis", "Norm Analysis"),
    ("norms", "from oculi.analysis import NormAnalysis", "Correlation Analysis"),
    ("correlation", "from oculi.analysis import CorrelationAnalysis", "Intervention Examples"),
    ("spectra", "from oculi.intervention import SpectraScaler, InterventionContext",
     "Head Ablation"),
    ("ablation", "from oculi.intervention import HeadAblation", "Advanced Usage"),
    ("selective", "from oculi import CaptureConfig", "Stratified Analysis"),
    ("stratified", "from oculi.analysis import StratifiedView, find_extreme_heads",
     "Supported Models"),
]  # fmt: skip
EXCLUDED_000 = {
    # the seed's own test mock (tests.mocks.MockLlamaAdapter): oculi's tiny models live in
    # tests/models.py and are not a public API
    "testing without GPU": "# Use mock model for CPU testing",
}

# seed 001 (the guide), by block index: its first line, checked
SUPPORTED_001 = {
    0: "import torch",  # ch. 1: first capture
    1: "import matplotlib.pyplot as plt",  # ch. 2: heatmap
    2: "# Which token pairs have strongest attention?",
    3: "from oculi.analysis import EntropyAnalysis",
    4: "from oculi import ResidualConfig",  # ch. 3
    5: "# How much does each layer change the residual stream?",
    6: "from oculi import MLPConfig",  # ch. 4
    7: "# Which neurons fire most strongly?",
    8: "from oculi import LogitConfig",  # ch. 5
    9: '# When does "Paris" become the prediction?',
    10: "from oculi.analysis import CircuitDetection",  # ch. 6
    11: "prev_token = CircuitDetection.detect_previous_token_heads(capture, threshold=0.5)",
    12: "for layer in [0, 10, 20]:",
    13: "from oculi.analysis import AttributionMethods",  # ch. 7, exact since the final norm
    14: "comp = AttributionMethods.component_attribution(",  # is recorded in captures
    15: "from oculi.analysis import CompositionAnalysis",  # ch. 8
    16: "circuits = CompositionAnalysis.detect_induction_circuit(capture, threshold=0.3)",
    17: "from oculi.intervention import SpectraScaler, InterventionContext",  # ch. 9
    18: "from oculi.intervention import HeadAblation",
    19: "# Capture fewer layers",  # appendix B
    20: "from oculi.utils import is_mps_available, get_default_device",
}
EXCLUDED_001: dict[int, str] = {}

# seed 002 (ModelAnalyzer, GPT-2): the ModelAnalyzer blocks; its legacy modules are mapped to
# oculi calls in docs/seed002_names.md (tested there), not importable under the seed's names
SUPPORTED_002 = {
    0: "from model_analyzer import ModelAnalyzer",  # quick start
    1: "analyzer = ModelAnalyzer(",
    2: "# Basic generation",
    3: "# Extract activations",
    4: "# Get predictions at each layer",
    5: "# Generate with steering vector",
    6: "# Get architecture summary",
    13: "from model_analyzer import ModelAnalyzer",  # basic usage
    14: "from model_analyzer import ModelAnalyzer",  # unified approach
    15: "# Generate and record activations simultaneously",
    16: "# Get predictions at each layer",
    17: "# Generate with behavioral steering",
    18: "# Find which layers are causally important",
    19: "# Extract activations for multiple prompts",
    28: "from visualization import reduce_dimensions",  # same call in oculi.visualize
}
_LEGACY = "the seed's legacy module, mapped to oculi calls in docs/seed002_names.md"
EXCLUDED_002 = {
    7: ("from model_loader import ModelInspector", _LEGACY),
    8: ("from logit_lens import LogitLens", _LEGACY),
    9: ("from visualization import plot_embeddings_2d, compare_reduction_methods",
        _LEGACY + "; also uses `model` and `tokens` it never defines"),
    10: ("from activation_extraction import ActivationExtractor, compare_activations", _LEGACY),
    11: ("from intervention import (", _LEGACY + "; `some_activation`, `inputs` undefined"),
    12: ("from transformers import AutoModelForCausalLM, AutoTokenizer",
         "downloads GPT-2 from the hub and saves it: setup, not an oculi example"),
    20: ("from model_loader import ModelInspector", _LEGACY),
    21: ("from logit_lens import LogitLens", _LEGACY),
    22: ("from visualization import plot_embeddings_2d, compare_reduction_methods", _LEGACY),
    23: ("from activation_extraction import ActivationExtractor, get_activation_statistics",
         _LEGACY),
    24: ("from intervention import activation_patch_experiment, path_patching", _LEGACY),
    25: ("from intervention import create_steering_vector, steer_generation", _LEGACY),
    26: ("from model_analyzer import ModelAnalyzer",
         'pseudo-code: "path/to/model", "prompt" and `generate_with_steering(...)`'),
    27: ("from visualization import plot_embeddings_2d, plot_convergence_analysis",
         _LEGACY + "; `embeddings`, `tokens` undefined"),
    29: ("from visualization import plot_layer_embeddings", _LEGACY),
    30: ("from logit_lens import LogitLens", _LEGACY + "; ends in a `# ...` placeholder"),
}  # fmt: skip

# seed 003: TransformerLens fragments (HookedTransformer.from_pretrained, torch.cuda, Jupyter
# magics, comment-only "see the docs" blocks). Its three scripts are engineer `tl`'s
# (oculi.tl, tests/test_tl_compat.py); none of these fragments is an oculi example.
EXCLUDED_003 = {
    0: "import os",
    1: "# 1. Use smaller sequences",
    2: "# Add at top of notebook",
    3: "# Explicitly show plots",
    4: "# 1. Use GPU if available",
    5: "# In activation_patching.py",
    6: "# Note: TransformerLens primarily supports HuggingFace models",
    7: "# Patch specific paths through the model",
    8: "# Use gradients to measure component importance",
}
# seed 004: one Python example (its library call), anchored like seed 000
SEED_004 = ("from interp import load_model, logit_lens", "Architecture")

# seed bugs, fixed so the block runs; (block, text as written, text run, why)
FIXES = {
    ("000", "full capture"): (
        "# Use individual captures\n",
        "# Use individual captures\nfrom oculi.analysis import EntropyAnalysis\n",
        "the block uses EntropyAnalysis before any block of the page imports it",
    ),
    ("001", "appendix B memory"): (
        "# Capture fewer layers\n",
        "from oculi import CaptureConfig\n# Capture fewer layers\n",
        "the guide never imports CaptureConfig",
    ),
}


# Statements a seed gets wrong for any model, which oculi refuses with an error naming the
# call to make: (doc, block) -> [(first line of the statement, lines it spans with what
# depends on it, error, message, what runs instead: the call the error names, or nothing)]
REFUSED = {
    ("000", "attribution"): [(
        "head_attr = AttributionMethods.head_attribution(", 6, "InputError",
        r"head_attribution takes \(full, target\), not output_weights=",
        "from oculi import CaptureConfig\n"
        "full_heads = adapter.capture_full(input_ids, "
        "attention=CaptureConfig(capture_head_contributions=True))\n"
        "head_attr = AttributionMethods.head_attribution(full_heads, target_token_id)\n",
    )],
    ("000", "composition"): [
        ("path_score = CompositionAnalysis.path_patching_score(", 4, "InputError",
         r"path_patching_score estimates path patching from a clean and a corrupt capture", ""),
        # the sentence repeats no token: the error offers repeated_random_tokens
        ("circuits = CompositionAnalysis.detect_induction_circuit(capture, threshold=0.3)", 1,
         "InputError", r"no token repeats .*repeated_random_tokens\(adapter, n=50\)",
         "import oculi.analysis\n"
         "circuits = CompositionAnalysis.detect_induction_circuit(\n"
         "    adapter.capture(oculi.analysis.repeated_random_tokens(adapter, n=50)), threshold=0.3)\n"),
    ],
}  # fmt: skip


def test_the_lists_cover_every_fenced_block():
    for doc, supported, excluded in [
        ("001", SUPPORTED_001, {i: first for i, first in EXCLUDED_001.items()}),
        ("002", SUPPORTED_002, {i: first for i, (first, _) in EXCLUDED_002.items()}),
        ("003", {}, EXCLUDED_003),
    ]:
        blocks = fenced_blocks(doc)
        assert set(supported) | set(excluded) == set(range(len(blocks))), doc
        assert not set(supported) & set(excluded), doc
        for i, first in {**supported, **excluded}.items():
            assert blocks[i].splitlines()[0] == first, (doc, i)
    for _name, start, stop in SEED_000:
        anchored_block("000", start, stop)
    for start in EXCLUDED_000.values():
        assert start in _text("000").splitlines()


# -- running blocks ------------------------------------------------------------------------
class Walker:
    """Runs blocks in one namespace, with the model name (and seed imports) substituted."""

    def __init__(self, doc: str, capsys, substitutions: dict[str, str]) -> None:
        self.doc, self.capsys, self.ns = doc, capsys, {"__name__": f"seed_{doc}"}
        self.substitutions, self.used = substitutions, set()

    def run(self, name: str, code: str) -> str:
        """Run one block; its printed output."""
        for old, new in self.substitutions.items():
            if old in code:
                code = code.replace(old, new)
                self.used.add(old)
        if (self.doc, name) in FIXES:
            old, new, _why = FIXES[self.doc, name]
            assert old in code, (self.doc, name)
            code = code.replace(old, new)
        self.capsys.readouterr()
        for first, n_lines, error, message, instead in REFUSED.get((self.doc, name), []):
            lines = code.splitlines(keepends=True)
            at = [i for i, line in enumerate(lines) if line.rstrip("\n") == first]
            assert len(at) == 1, (self.doc, name, first)
            before, refused = "".join(lines[: at[0]]), lines[at[0] : at[0] + n_lines]
            self._exec(before, name)
            with pytest.raises(getattr(oculi.errors, error), match=message):
                self._exec(_statement(refused), f"{name}, refused")
            code = instead + "".join(lines[at[0] + n_lines :])
        self._exec(code, name)
        return self.capsys.readouterr().out

    def _exec(self, code: str, name: str) -> None:
        exec(compile(code, f"<seed {self.doc}: {name}>", "exec"), self.ns)  # noqa: S102

    def all_substitutions_used(self) -> None:
        assert self.used == set(self.substitutions), set(self.substitutions) - self.used


def _statement(lines: list[str]) -> str:
    """The first statement of ``lines``: up to where its brackets close."""
    depth, out = 0, []
    for line in lines:
        out.append(line)
        depth += sum(line.count(c) for c in "([{") - sum(line.count(c) for c in ")]}")
        if depth == 0:
            break
    return "".join(out)


@pytest.fixture(autouse=True)
def _agg_backend():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


def _tiny_llama(folder: Path, layers: int, heads: int, kv_heads: int) -> Path:
    """A random Llama with the seed model's layer/head counts and head size 128, width 4 per
    head (transformers wants a multiple of the head count), and
    the embedded Gemma 3 tokenizer (so the seeds' prompts tokenise as real text)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from oculi.models.loading import default_model_path

    source = default_model_path()  # the tokenizer files of the embedded Gemma 3 270M
    config = LlamaConfig(
        vocab_size=262144, hidden_size=4 * heads, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=128,
        tie_word_embeddings=True, max_position_embeddings=256, bos_token_id=2, eos_token_id=1,
        pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, folder / name)
    return folder


def _hf(ns) -> dict:
    """The model's own outputs on the namespace's ``input_ids``: hidden states and logits."""
    with torch.no_grad():
        out = ns["model"](ns["input_ids"], output_hidden_states=True)
    return {"hidden": out.hidden_states, "logits": out.logits[0]}


# -- seed 000: oculi's README ----------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_8b_shape(tmp_path_factory) -> Path:
    """Meta-Llama-3-8B's layout: 32 layers, 32 query heads, 8 KV heads, head size 128."""
    return _tiny_llama(tmp_path_factory.mktemp("llama8b"), 32, 32, 8)


def test_seed_000_examples(llama_8b_shape, capsys):
    walker = Walker("000", capsys, {"meta-llama/Meta-Llama-3-8B": str(llama_8b_shape)})
    ns = walker.ns
    blocks = {name: anchored_block("000", start, stop) for name, start, stop in SEED_000}

    out = walker.run("quick start", blocks["quick start"])
    # the seed's comments: [32, 32, 10, 128], [32, 8, 10, 128] (GQA), [32, 32, 10, 10]
    assert "Queries: torch.Size([32, 32, 10, 128])" in out
    assert "Keys: torch.Size([32, 8, 10, 128])" in out
    assert "Patterns: torch.Size([32, 32, 10, 10])" in out
    assert type(ns["adapter"]).__name__ == "LlamaAttentionAdapter"
    hf = _hf(ns)
    torch.testing.assert_close(ns["capture"].patterns.sum(-1), torch.ones(32, 32, 10))

    out = walker.run("residual", blocks["residual"])
    assert "Pre-attention: torch.Size([3, 10, 128])" in out  # [L, T, H]; H is 4096 in the 8B
    for i, layer in enumerate([20, 21, 22]):  # leaving layer l = hidden_states[l + 1]
        torch.testing.assert_close(ns["residual"].post_mlp[i], hf["hidden"][layer + 1][0],
                                   atol=1e-5, rtol=1e-5)  # fmt: skip
        torch.testing.assert_close(ns["residual"].pre_attn[i], hf["hidden"][layer][0],
                                   atol=1e-5, rtol=1e-5)  # fmt: skip

    out = walker.run("mlp", blocks["mlp"])
    assert "Gate projection: torch.Size([3, 10, 128])" in out  # [L, T, intermediate_dim]
    assert "Output: torch.Size([3, 10, 128])" in out  # [L, T, hidden_dim]
    mlp = ns["mlp"]
    down = ns["model"].model.layers[20].mlp.down_proj
    torch.testing.assert_close(down(mlp.post_activation[0]), mlp.output[0], atol=1e-5, rtol=1e-5)

    out = walker.run("logit lens", blocks["logit lens"])
    assert "Convergence (KL divergence): torch.Size([32])" in out  # [L]
    assert "Token trajectory: torch.Size([32, 10])" in out  # [L, T]
    final = torch.softmax(hf["logits"].double(), -1)[:, ns["token_id"]]
    torch.testing.assert_close(ns["trajectory"][-1].double(), final, atol=1e-6, rtol=1e-4)

    # The seed runs induction detection on "The quick brown fox jumps over the lazy dog",
    # which repeats no token: there is no induction to measure, and oculi says so (issue 17,
    # item 8). The block then runs as written on the sentence said twice.
    from oculi.errors import InputError

    with pytest.raises(InputError, match="no token repeats in this sequence"):
        walker.run("circuits", blocks["circuits"])
    sentence = ns["capture"]
    twice = torch.cat([ns["input_ids"], ns["input_ids"][:, 1:]], dim=1)
    ns["capture"] = ns["adapter"].capture(twice)
    out = walker.run("circuits", blocks["circuits"])
    assert "Induction heads: torch.Size([32, 32])" in out  # [L, H]
    assert set(ns["positional"]) >= {"bos", "recent"}
    ns["capture"] = sentence

    out = walker.run("full capture", blocks["full capture"])
    assert out.count(": True") == 4  # attention, residual, MLP, logits all captured
    assert ns["entropy"].shape == (32, 32, 10)

    out = walker.run("attribution", blocks["attribution"])
    logit = float(hf["logits"][-1, ns["target_token_id"]])  # the model's own logit
    dla = ns["dla"]
    # the seed's comment says [L, H, T, T]; oculi's flow is the exact max flow from each
    # token to the last position, [T] (docs/guides/analysis.md)
    assert "Attention flow: torch.Size([10])" in out
    assert "Value-weighted patterns: torch.Size([32, 32, 10, 10])" in out  # [L, H, T, T]
    assert "Layer contributions: torch.Size([32])" in out  # [L]
    assert float(dla.total) == pytest.approx(logit, rel=1e-4, abs=1e-6)
    comp = ns["component_attr"].values
    assert "Component attribution: torch.Size([32, 2])" in out  # [L, 2]
    torch.testing.assert_close(comp.sum(-1), dla.values, atol=1e-6, rtol=1e-5)
    heads = ns["head_attr"].values
    assert heads.shape == (32, 32)  # [L, H]
    torch.testing.assert_close(heads.sum(-1), comp[:, 0], atol=1e-6, rtol=1e-5)
    assert len(ns["top_heads"]) == 10

    out = walker.run("composition", blocks["composition"])
    assert "OV composition: torch.Size([10])" in out  # [T]
    assert "Virtual attention: torch.Size([10, 10])" in out  # [T, T]
    assert "Composition matrix: torch.Size([1024, 1024])" in out  # [L*H, L*H]
    assert "Path: L5H2" in out and out.count("Circuit: L") == min(
        5, len(ns["circuits"].metadata["circuits"])
    )

    # the seed compares "two conditions" it never defines: a baseline and a sharpened head
    from oculi.intervention import InterventionContext, SpectraScaler

    ns["capture_baseline"] = ns["capture"]
    with InterventionContext(ns["adapter"], [SpectraScaler(layer=23, head=5, alpha=1.5)]):
        ns["capture_intervention"] = ns["adapter"].capture(ns["input_ids"])
    out = walker.run("entropy", blocks["entropy"])
    assert "Entropy shape: torch.Size([32, 32, 10])" in out  # [L, H, T]
    assert "Effective rank: torch.Size([32, 32, 10])" in out
    assert "Entropy change: torch.Size([32, 32])" in out  # [L, H]
    delta = ns["delta"]
    assert bool((delta[:23] == 0).all()) and float(delta[23, 5]) != 0  # the scaled head only
    assert bool((delta[23, :5] == 0).all()) and bool((delta[23, 6:] == 0).all())

    out = walker.run("norms", blocks["norms"])
    assert "Q norms: torch.Size([32, 32, 10])" in out and "K norms: torch.Size([32, 8, 10])" in out
    torch.testing.assert_close(ns["q_norms"], ns["capture"].queries.norm(dim=-1))

    out = walker.run("correlation", blocks["correlation"])
    assert "Norm-entropy correlation: torch.Size([32, 32])" in out  # [L, H]
    from scipy import stats

    r, p = stats.pearsonr(ns["x"].double().numpy(), ns["y"].double().numpy())
    assert float(ns["corr"]) == pytest.approx(r, abs=1e-6)
    assert float(ns["pval"]) == pytest.approx(p, rel=1e-4, abs=1e-12)

    out = walker.run("spectra", blocks["spectra"])
    assert isinstance(ns["output"], str) and ns["output"]
    out = walker.run("ablation", blocks["ablation"])
    assert isinstance(ns["output"], str) and ns["output"]

    out = walker.run("selective", blocks["selective"])
    selective = ns["capture"]
    assert selective.queries.shape == (3, 32, 10, 128) and selective.patterns.shape[0] == 3
    assert selective.keys is None and selective.values is None

    out = walker.run("stratified", blocks["stratified"])
    heads = ns["high_entropy_heads"]
    assert len(heads) == 10 and all(20 <= layer < 32 for layer, _h, _s in heads)
    assert "Layer 25 entropy: torch.Size([32, 10])" in out  # [H, T]
    assert "Layer 25, Head 10 entropy: torch.Size([10])" in out  # [T]
    walker.all_substitutions_used()


# -- seed 001: the guide ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_3b_shape(tmp_path_factory) -> Path:
    """Llama-3.2-3B-Instruct's layout: 28 layers, 24 query heads, 8 KV heads, head size 128."""
    return _tiny_llama(tmp_path_factory.mktemp("llama3b"), 28, 24, 8)


def test_seed_001_examples(llama_3b_shape, capsys):
    walker = Walker("001", capsys, {"meta-llama/Llama-3.2-3B-Instruct": str(llama_3b_shape)})
    ns, blocks = walker.ns, fenced_blocks("001")

    out = walker.run("ch1 first capture", blocks[0])
    # the seed's "Expected Output", line by line
    for line in ["Queries: torch.Size([28, 24, 6, 128])", "Keys: torch.Size([28, 8, 6, 128])",
                 "Values: torch.Size([28, 8, 6, 128])", "Patterns: torch.Size([28, 24, 6, 6])"]:  # fmt: skip
        assert line in out
    hf = _hf(ns)

    walker.run("ch2 heatmap", blocks[1])
    out = walker.run("ch2 pairs", blocks[2])
    assert len(out.strip().splitlines()) == 6  # one line per query token
    out = walker.run("ch2 entropy", blocks[3])
    assert "Entropy shape: torch.Size([28, 24, 6])" in out
    assert len(out.split("Most Focused Heads:")[1].strip().splitlines()) == 5

    out = walker.run("ch3 residual", blocks[4])
    assert "Pre-attention: torch.Size([3, 6, 96])" in out  # [3, T, H]
    out = walker.run("ch3 contributions", blocks[5])
    for i, layer in enumerate([10, 15, 20]):  # |post_mlp - pre_attn| from hidden_states
        delta = (hf["hidden"][layer + 1][0] - hf["hidden"][layer][0]).norm(dim=-1).mean()
        assert ns["layer_deltas"][i] == pytest.approx(float(delta), rel=1e-4)

    out = walker.run("ch4 mlp", blocks[6])
    assert "Post-activation: torch.Size([3, 6, 128])" in out
    out = walker.run("ch4 active neurons", blocks[7])
    assert len(out.strip().splitlines()) == 11  # the title and 10 neurons

    out = walker.run("ch5 lens", blocks[8])
    rows = [line for line in out.splitlines() if line.startswith("Layer")]
    assert [int(row.split()[1].rstrip(":")) for row in rows] == list(range(0, 28, 4))
    walker.run("ch5 trajectory", blocks[9])
    assert ns["trajectory"].shape == (28, 6)
    final = torch.softmax(hf["logits"].double(), -1)[:, ns["target"]]
    torch.testing.assert_close(ns["trajectory"][-1].double(), final, atol=1e-6, rtol=1e-4)

    # ch. 6 on "The capital of France is": no repeated token, so no induction (oculi says
    # so, issue 17 item 8); the chapter's blocks then run on the prompt said twice
    from oculi.errors import InputError

    with pytest.raises(InputError, match="no token repeats in this sequence"):
        walker.run("ch6 induction", blocks[10])
    ns["capture"] = ns["adapter"].capture(torch.cat([ns["input_ids"], ns["input_ids"][:, 1:]], 1))
    out = walker.run("ch6 induction", blocks[10])
    assert out.startswith("Found ") and ns["mask"].shape == (28, 24)
    out = walker.run("ch6 previous token", blocks[11])
    assert out.startswith("Previous token heads: ")
    walker.run("ch6 classify", blocks[12])

    out = walker.run("ch7 dla", blocks[13])  # exact: the shares add up to the model's logit
    assert float(ns["dla"].total) == pytest.approx(float(hf["logits"][-1, ns["target_id"]]),
                                                   rel=1e-4, abs=1e-6)  # fmt: skip
    assert len(re.findall(r"^L ?\d+: ", out, re.M)) == 28  # one row per layer
    out = walker.run("ch7 components", blocks[14])
    torch.testing.assert_close(ns["comp"].values.sum(-1), ns["dla"].values, atol=1e-6, rtol=1e-5)
    assert len(re.findall(r"^L ?\d+: Attn=", out, re.M)) == 10
    out = walker.run("ch8 qk composition", blocks[15])
    assert out.startswith("QK composition: ")
    out = walker.run("ch8 induction circuits", blocks[16])  # on the repeated prompt of ch. 6
    assert out.startswith("Found ")

    for name, i in [("ch9 sharpen", 17), ("ch9 ablation", 18)]:
        out = walker.run(name, blocks[i])
        assert out.strip()  # the decoded generation
    assert ns["output"].shape[1] == ns["input_ids"].shape[1] + 10  # max_new_tokens=10
    walker.run("appendix B memory", blocks[19])
    assert ns["config"].top_k == 10
    walker.run("appendix B mps", blocks[20])
    assert ns["device"].type in ("cpu", "cuda", "mps")
    walker.all_substitutions_used()


# -- seed 002: ModelAnalyzer, on Gemma 3 270M --------------------------------------------------
@pytest.fixture()
def default_model(gemma, monkeypatch):
    """``oculi.load("gemma-3-270m")`` hands out the session's already loaded Gemma (the same
    model and tokenizer a fresh load gives, without loading it again)."""
    import oculi

    real = oculi.load

    def load(name="gemma-3-270m", **kwargs):
        if str(name) == "gemma-3-270m" and kwargs.get("device") in (None, "cpu"):
            return gemma
        return real(name, **kwargs)

    monkeypatch.setattr(oculi, "load", load)
    return gemma


@pytest.mark.gemma
def test_seed_002_examples(default_model, capsys, tmp_path, monkeypatch):
    from oculi import ModelAnalyzer

    monkeypatch.chdir(tmp_path)  # the seed saves "output.pkl" and others where it runs
    walker = Walker("002", capsys, {
        "../models/gpt2_model": "gemma-3-270m",
        "from model_analyzer import ModelAnalyzer": "from oculi import ModelAnalyzer",
        "from visualization import reduce_dimensions": "from oculi.visualize import reduce_dimensions",
    })  # fmt: skip
    ns, blocks = walker.ns, fenced_blocks("002")
    gemma = default_model

    def greedy(prompt: str, n: int) -> str:
        ids = gemma.tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = gemma.model.generate(ids, max_new_tokens=n, do_sample=False)
        return prompt + gemma.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    out = walker.run("quick start", blocks[0])
    assert ns["text"] == greedy("The capital of France is", 20)  # the model's own generate
    assert len(ns["activations"].layer_activations) == 18
    plain_next = gemma.tokenizer.decode([int(gemma.forward("Today I feel")[-1].argmax())])
    assert ns["steered"].startswith("Today I feel")  # steering changes the continuation:
    assert not ns["steered"].startswith("Today I feel" + plain_next)  # " like" unsteered
    walker.run("initialization", blocks[1])
    assert ns["analyzer"].load_for_generation is True
    walker.run("generation", blocks[2])
    assert ns["text"] == "Hello" + ns["text"][len("Hello") :] and len(ns["activations"].tokens) > 1
    walker.run("extraction", blocks[3])
    again = ModelAnalyzer.load_activations("output.pkl", allow_pickle=True)
    assert again.tokens == ns["record"].tokens
    assert [r.prompt for r in ns["records"]] == ["Prompt 1", "Prompt 2"]
    walker.run("logit lens", blocks[4])
    assert sorted(ns["predictions"]) == list(range(18))
    walker.run("interventions", blocks[5])
    assert sorted(ns["effects"]) == list(range(18))
    out = walker.run("inspection", blocks[6])
    assert ns["num_layers"] == 18 and ns["layer_names"][0] == "model.layers.0"

    out = walker.run("basic usage", blocks[13])
    assert "Captured 18 layers" in out
    out = walker.run("unified", blocks[14])
    assert ns["output"].startswith("Once upon a time") and ns["output"] in out
    out = walker.run("recording", blocks[15])
    assert "Recorded 18 layers" in out and Path("generation_acts.pkl").is_file()
    out = walker.run("lens analysis", blocks[16])
    assert sum(line.startswith("Layer ") for line in out.splitlines()) >= 18
    out = walker.run("steering", blocks[17])
    assert ns["happy_text"].startswith("Today is") and ns["happy_text"] in out
    out = walker.run("path patching", blocks[18])
    shown = [line for line in out.splitlines() if line.startswith("Layer ")]
    top = sorted(ns["effects"].items(), key=lambda x: abs(x[1]), reverse=True)[:5]
    assert shown == [f"Layer {layer}: {effect:.4f}" for layer, effect in top]
    walker.run("batch", blocks[19])
    assert len(ModelAnalyzer.load_activations("batch_activations.pkl", allow_pickle=True)) == 3

    walker.run("reduce dimensions", blocks[28])
    assert ns["reduced_pca"].shape == (100, 2) and ns["reduced_tsne"].shape == (100, 2)
    assert ns["reduced_umap"].shape == (100, 3)
    # PCA keeps (almost: scikit-learn's randomized solver) the variance of the top two
    # singular directions, computed by hand
    centred = ns["embeddings"] - ns["embeddings"].mean(0)
    top2 = float((np.linalg.svd(centred, compute_uv=False)[:2] ** 2).sum())
    kept = float((ns["reduced_pca"] ** 2).sum())
    assert 0.95 * top2 <= kept <= top2 * (1 + 1e-9)
    walker.all_substitutions_used()


# -- seed 004: interp's library call, on Gemma 3 270M ------------------------------------------
@pytest.mark.gemma
def test_seed_004_example(default_model, capsys):
    walker = Walker("004", capsys, {
        "from interp import load_model, logit_lens": "from oculi import load as load_model, logit_lens",
        '"qwen3-0.6b"': '"gemma-3-270m"',
    })  # fmt: skip
    out = walker.run("library call", anchored_block("004", *SEED_004))
    result, gemma = walker.ns["result"], default_model
    crossover = result.crossover_layer
    assert out.strip() == str(crossover)
    # "the layer where ' oxygen' becomes top-1": from there on its rank is 0, not before,
    # and the model's own last layer predicts it
    oxygen = gemma.to_single_token(" oxygen")
    assert int(gemma.forward("Water is made of hydrogen and")[-1].argmax()) == oxygen
    ranks = list(result.ranks)
    assert all(r == 0 for r in ranks[crossover:]) and ranks[crossover - 1] != 0
    walker.all_substitutions_used()
