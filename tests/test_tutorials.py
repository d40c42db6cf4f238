"""The tutorial notebooks run top to bottom and print what the model really does.

The notebooks in ``docs/`` are committed without outputs; the documentation build executes
them (``make docs``) and renders what they print. Here each one is executed once with nbclient
(the quick strict build inside the test suite does not execute them: ``OCULI_DOCS_EXECUTE``),
and the numbers it prints are checked against an independent reference: Gemma 3 270M loaded
straight with transformers (eager attention), with hand-written PyTorch hooks where the
notebook intervenes, and identities (patching a run into itself changes nothing, patching every
edge is the corrupt run).
"""

from __future__ import annotations

import os
import re
import statistics
from pathlib import Path

import nbformat
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TUTORIALS = ["tutorial.ipynb", "tutorials/ioi.ipynb", "tutorials/factual-recall.ipynb"]
CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"
FACT = "The Eiffel Tower is located in the city of"


def _notebooks() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def test_committed_notebooks_have_no_outputs():
    """Outputs come from the build's execution, never from the file: no stored outputs or
    execution counts (a notebook saved after running it fails here; strip it first)."""
    found = {p.relative_to(DOCS).as_posix() for p in _notebooks()}
    assert set(TUTORIALS) <= found
    for path in _notebooks():
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        assert nb.metadata.kernelspec.name == "python3", path
        for i, cell in enumerate(nb.cells):
            if cell.cell_type == "code":
                assert cell.outputs == [], f"{path.name}: code cell {i} has stored outputs"
                assert cell.execution_count is None, f"{path.name}: code cell {i} was run"
            assert "attachments" not in cell, f"{path.name}: cell {i} stores an attachment"


# --- executing the notebooks -------------------------------------------------------------------

_EXECUTED: dict[str, nbformat.NotebookNode] = {}


def _execute(name: str, tmp_path_factory) -> str:
    """Run docs/<name> once per session in a fresh kernel; all its text outputs, joined."""
    from nbclient import NotebookClient

    if name not in _EXECUTED:
        nb = nbformat.read(DOCS / name, as_version=4)
        env = {
            **os.environ,
            # the kernel imports this checkout's oculi, whatever the working directory
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
            "MPLBACKEND": "Agg",
        }
        cwd = tmp_path_factory.mktemp("notebook")
        client = NotebookClient(
            nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
        )
        client.execute(env=env)  # raises CellExecutionError on the first failing cell
        assert list(cwd.iterdir()) == [], "a notebook wrote into its working directory"
        _EXECUTED[name] = nb
    nb = _EXECUTED[name]
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out.get("output_type") != "error"
            if out.get("output_type") == "stream" and out.get("name") == "stdout":
                parts.append(out["text"])
            elif "data" in out:
                parts.append(out["data"].get("text/html", ""))
    return "\n".join(parts)


def _num(pattern: str, text: str, group: int = 1) -> float:
    match = re.search(pattern, text)
    assert match is not None, f"the notebook no longer prints {pattern!r}"
    return float(match.group(group))


# --- the independent reference: transformers' own Gemma 3, eager attention ---------------------


class Reference:
    """Gemma 3 270M loaded with transformers alone from the converted folder."""

    def __init__(self, folder: str) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(
            folder, attn_implementation="eager", dtype=torch.float32
        ).eval()
        self.layers = self.model.model.layers

    def ids(self, text: str) -> torch.Tensor:
        return self.tok(text, return_tensors="pt").input_ids

    def token(self, text: str) -> int:
        ids = self.tok(text, add_special_tokens=False).input_ids
        assert len(ids) == 1, text
        return ids[0]

    @torch.no_grad()
    def run(self, text: str, hooks=()):
        """The model's output for ``text`` with ``(module, forward_hook)`` pairs installed."""
        handles = [m.register_forward_hook(h) for m, h in hooks]
        try:
            return self.model(self.ids(text), output_attentions=True)
        finally:
            for h in handles:
                h.remove()

    def last_logits(self, text: str, hooks=()) -> torch.Tensor:
        return self.run(text, hooks).logits[0, -1].float()

    def logit_diff(self, text: str, a: str, b: str, hooks=()) -> float:
        logits = self.last_logits(text, hooks)
        return float(logits[self.token(a)] - logits[self.token(b)])

    @torch.no_grad()
    def residuals(self, text: str) -> list[torch.Tensor]:
        """Each decoder layer's output ``[T, d_model]``, recorded by forward hooks."""
        out: list[torch.Tensor] = []

        def keep(_m, _a, o):
            out.append((o[0] if isinstance(o, tuple) else o)[0].clone())

        self.run(text, [(layer, keep) for layer in self.layers])
        return out

    def lens_probs(self, text: str, token: int) -> list[float]:
        """p(token) at the last position from every layer's output, read through the final
        norm and the unembedding."""
        with torch.no_grad():
            return [
                float(self.model.lm_head(self.model.model.norm(r[-1])).softmax(-1)[token])
                for r in self.residuals(text)
            ]


@pytest.fixture(scope="module")
def ref(gemma):
    folder = gemma.model.config._name_or_path
    assert Path(folder).is_dir(), folder
    return Reference(folder)


def _ablate_heads(ref: Reference, heads, source: str):
    """Hooks that replace each head's ``z`` (the o_proj input slice) by the source run's."""
    d = ref.model.config.head_dim
    saved: dict[int, torch.Tensor] = {}

    def record(layer):
        def hook(_m, args):
            saved[layer] = args[0].clone()

        return hook

    layers = sorted({layer for layer, _ in heads})
    handles = [ref.layers[i].self_attn.o_proj.register_forward_pre_hook(record(i)) for i in layers]
    try:
        ref.run(source)
    finally:
        for h in handles:
            h.remove()

    def replace(layer):
        def hook(_m, args):
            z = args[0].clone()
            for ll, h in heads:
                if ll == layer:
                    z[..., h * d : (h + 1) * d] = saved[layer][..., h * d : (h + 1) * d]
            return (z,)

        return hook

    return [(i, replace(i)) for i in layers]


def _with_pre_hooks(ref: Reference, text: str, pre_hooks, a: str, b: str) -> float:
    handles = [ref.layers[i].self_attn.o_proj.register_forward_pre_hook(h) for i, h in pre_hooks]
    try:
        return ref.logit_diff(text, a, b)
    finally:
        for h in handles:
            h.remove()


def _steering_hook(vector: torch.Tensor, position: int):
    """Add ``vector`` to a decoder layer's output at ``position`` (prompt forwards only)."""

    def hook(_m, _a, out):
        hidden = out[0] if isinstance(out, tuple) else out
        if hidden.shape[1] > position:
            hidden = hidden.clone()
            hidden[:, position] += vector
            return (hidden, *out[1:]) if isinstance(out, tuple) else hidden
        return out

    return hook


# --- the notebooks ------------------------------------------------------------------------------


@pytest.mark.gemma
def test_tutorial_notebook(ref, tmp_path_factory):
    text = _execute("tutorial.ipynb", tmp_path_factory)

    # induction heads: the strongest head and its score, by the documented definition computed
    # from transformers' own attention pattern
    prompt = (
        "The cat sat on the mat. The dog ran to the park. "
        "The cat sat on the mat. The dog ran to the park."
    )
    ids = ref.ids(prompt)[0].tolist()
    attn = ref.run(prompt).attentions  # L x [1, H, T, T]
    scores = torch.zeros(len(attn), attn[0].shape[1])
    for layer, a in enumerate(attn):
        rows = []
        for t in range(len(ids)):
            after = [s + 1 for s in range(t - 1) if ids[s] == ids[t]]
            if after:
                rows.append(a[0, :, t, after].sum(-1))
        scores[layer] = torch.stack(rows).mean(0)
    layer, head = divmod(int(scores.argmax()), scores.shape[1])
    shown = re.search(r"induction heads \(layer, head, score\): \[\((\d+), (\d+), (\S+)\)", text)
    assert (int(shown.group(1)), int(shown.group(2))) == (layer, head)
    assert float(shown.group(3)) == pytest.approx(float(scores[layer, head]), abs=1e-3)

    # IOI: the printed logit differences are the model's own
    assert _num(r"logit difference: clean (\S+),", text) == pytest.approx(
        ref.logit_diff(CLEAN, " Mary", " John"), abs=2e-3
    )
    assert _num(r"logit difference: clean \S+, corrupt (\S+)", text) == pytest.approx(
        ref.logit_diff(CORRUPT, " Mary", " John"), abs=2e-3
    )

    # factual recall: the lens's crossover from transformers' hidden states, p and logit
    paris = ref.token(" Paris")
    final = ref.last_logits(FACT)
    assert ref.tok.decode([int(final.argmax())]) == " Paris"
    lens = ref.lens_probs(FACT, paris)
    top1 = [
        int(ref.model.lm_head(ref.model.model.norm(r[-1])).argmax()) == paris
        for r in ref.residuals(FACT)
    ]
    crossover = next(i for i in range(len(top1)) if all(top1[i:]))
    assert int(_num(r"crossover layer: (\d+) of 18", text)) == crossover
    assert lens[-1] == pytest.approx(float(final.softmax(-1)[paris]), abs=1e-4)
    assert _num(r"clean p = (\S+), corrupted", text) == pytest.approx(
        float(final.softmax(-1)[paris]), abs=2e-3
    )
    assert _num(r"logit (\S+) = embedding", text) == pytest.approx(float(final[paris]), abs=2e-3)

    # the interactive views and the report
    assert 'data-oculi="attention"' in text and 'class="oc-tracing"' in text
    report = Path(re.search(r"wrote (\S+report\.html)", text).group(1))
    assert report.exists() and "Paris" in report.read_text(encoding="utf-8")


@pytest.mark.gemma
def test_ioi_notebook(ref, tmp_path_factory):
    text = _execute("tutorials/ioi.ipynb", tmp_path_factory)
    clean = ref.logit_diff(CLEAN, " Mary", " John")
    corrupt = ref.logit_diff(CORRUPT, " Mary", " John")
    assert clean > 3 and corrupt < -1

    # the task: top tokens and logit differences, the model's own
    probs = ref.last_logits(CLEAN).softmax(-1)
    assert _num(r"clean:\s+\[\(' Mary', (\S+)\)", text) == pytest.approx(
        float(probs[ref.token(" Mary")]), abs=2e-3
    )
    assert _num(r"clean: logit\(' Mary'\) - logit\(' John'\) = (\S+)", text) == pytest.approx(
        clean, abs=2e-3
    )
    assert _num(r"corrupt: logit\(' Mary'\) - logit\(' John'\) = (\S+)", text) == pytest.approx(
        corrupt, abs=2e-3
    )
    for io, s in [("Alice", "Bob"), ("Tom", "Anna"), ("Sarah", "David")]:
        prompt = f"When {io} and {s} went to the store, {s} gave a drink to"
        shown = _num(rf"{io} and {s}\s*: logit difference (\S+)", text)
        assert shown == pytest.approx(ref.logit_diff(prompt, " " + io, " " + s), abs=2e-3)

    # activation patching: the sweep's ends are the two runs; patching clean into clean is a
    # no-op; at layer 0 the one differing token carries everything (recovery exactly 1)
    assert _num(r"clean (\S+), corrupt \S+, values \[18, 15\]", text) == pytest.approx(
        clean, abs=2e-3
    )
    assert _num(r"largest change patching clean into clean: (\S+)", text) == 0.0
    assert _num(r"layer  0: best position 10 ' John'\s+recovery (\S+)", text) == 1.0

    # DLA of the logit difference adds up to the model's
    assert _num(r"logit difference (\S+) = embedding", text) == pytest.approx(clean, abs=2e-3)
    parts = re.search(r"= embedding (\S+) \+ layers (\S+) \+ bias (\S+)", text).groups()
    assert sum(float(p) for p in parts) == pytest.approx(clean, abs=3e-3)

    # attention of the heads found: transformers' own pattern, last position to each name
    attn = {name: ref.run(p).attentions for name, p in [("clean", CLEAN), ("corrupt", CORRUPT)]}
    rows = re.findall(r"^L(\d+)H(\d+) +(clean|corrupt) +(\S+) +(\S+) +(\S+)$", text, re.M)
    assert len(rows) == 12
    for layer, head, run, *shown in rows:
        pattern = attn[run][int(layer)][0, int(head), -1]
        for pos, value in zip((2, 4, 10), shown):
            assert float(value) == pytest.approx(float(pattern[pos]), abs=6e-3)

    # circuit discovery: exact edge patching's identities, and the circuit's faithfulness
    assert _num(r"nothing patched\s+(\S+)", text) == pytest.approx(clean, abs=2e-3)
    assert _num(r"everything patched\s+(\S+)", text) == pytest.approx(corrupt, abs=2e-3)
    outside = _num(r"outside the circuit\s+(\S+)", text)
    assert outside == pytest.approx(_num(r"\(circuit\s+(\S+)\)", text), abs=2e-4)
    faith = _num(r"faithfulness (\S+) \(metric", text)
    assert faith >= 0.8
    assert _num(r"faithfulness by hand (\S+)", text) == pytest.approx(faith, abs=1e-3)
    assert faith == pytest.approx((outside - corrupt) / (clean - corrupt), abs=2e-3)

    # ablating the circuit's heads: hand-written hooks on transformers' model
    heads = [
        (int(a), int(b))
        for a, b in re.findall(r"L(\d+)H(\d+)", re.search(r"\d+ heads: ([L\dH ]+)", text).group(1))
    ]
    assert heads
    hooks = _ablate_heads(ref, heads, CORRUPT)
    expected = _with_pre_hooks(ref, CLEAN, hooks, " Mary", " John")
    ablated = _num(r"circuit heads ablated\s+(\S+)", text)
    assert ablated == pytest.approx(expected, abs=3e-3)
    # what the text says of it: past the corrupt run, while as many other heads keep most of it
    others = [
        float(v) for v in re.search(r"other heads ablated\s+(.*) \(", text).group(1).split(",")
    ]
    assert len(others) == 5 and ablated < corrupt and min(others) > clean / 2


@pytest.mark.gemma
def test_factual_recall_notebook(ref, tmp_path_factory):
    text = _execute("tutorials/factual-recall.ipynb", tmp_path_factory)
    paris, rome = ref.token(" Paris"), ref.token(" Rome")
    logits = ref.last_logits(FACT)
    probs = logits.softmax(-1)
    assert _num(r"Eiffel Tower: \[\(' Paris', (\S+)\)", text) == pytest.approx(
        float(probs[paris]), abs=2e-3
    )
    other = ref.last_logits("The Colosseum is located in the city of").softmax(-1)
    assert _num(r"Colosseum:\s+\[\(' Rome', (\S+)\)", text) == pytest.approx(
        float(other[rome]), abs=2e-3
    )

    # the logit lens, layer by layer, from transformers' hidden states
    lens = ref.lens_probs(FACT, paris)
    shown = [float(v) for v in re.findall(r"layer\s+\d+: p\(' Paris'\) = (\S+),", text)]
    assert shown == pytest.approx(lens, abs=2e-4)
    crossover = int(_num(r"crossover layer: (\d+)", text))
    assert 0 < crossover < 18 and re.search(rf"layer\s+{crossover}: .* rank\s+0,", text)

    # causal tracing: the clean probability; restoring the last layer's last state restores
    # the output exactly
    trace_clean = _num(r"clean (\S+), subject corrupted", text)
    trace_corrupt = _num(r"subject corrupted (\S+)", text)
    assert trace_clean == pytest.approx(float(probs[paris]), abs=2e-3)
    last_row = re.search(r"^layer 17:((?: +\d\.\d{3})+)$", text, re.M).group(1).split()
    assert len(last_row) == 4  # the subject's three tokens, then the last position
    assert float(last_row[-1]) == pytest.approx(float(probs[paris]), abs=2e-3)
    handover = int(_num(r"from layer (\d+) on", text))
    key = int(_num(r"the fact sits on '[^']+' \(position (\d+)\)", text))
    assert 0 < handover < 18 and key in (1, 2, 3)
    # what the text says of the branches: the MLPs restore part of it at the subject, the
    # hand-over layer's attention alone most of it at the last position
    branches = re.findall(r"^\s*(\d+)\s+(\d\.\d{3})\s+(\d\.\d{3})$", text, re.M)
    assert [int(b[0]) for b in branches] == list(range(18))
    mlp = [float(b[1]) for b in branches]
    attn = [float(b[2]) for b in branches]
    assert 10 * trace_corrupt < max(mlp) < trace_clean
    assert max(range(18), key=attn.__getitem__) == handover and attn[handover] > trace_clean / 2

    # DLA: the model's logit, the shares add up to it, and the Paris - Rome difference
    assert _num(r"logit\(' Paris'\) from the model: (\S+)", text) == pytest.approx(
        float(logits[paris]), abs=2e-3
    )
    shares = re.search(
        r"sum of the shares:\s+(\S+) = embedding (\S+) \+ attention (\S+) \+ MLPs (\S+) "
        r"\+ bias (\S+)",
        text,
    ).groups()
    assert float(shares[0]) == pytest.approx(float(logits[paris]), abs=2e-3)
    assert sum(float(s) for s in shares[1:]) == pytest.approx(float(shares[0]), abs=3e-3)
    assert _num(r"logit\(' Paris'\) - logit\(' Rome'\) = (\S+)", text) == pytest.approx(
        float(logits[paris] - logits[rome]), abs=2e-3
    )

    # steering: the documented vector (mean difference of the two last-token residuals,
    # a quarter of their median norm long) added by a hand-written hook at ' Tower'
    steered = {
        int(layer): (float(p), float(r), top)
        for layer, p, r, top in re.findall(
            r"steered at layer\s+(\d+): p\(' Paris'\) (\S+), p\(' Rome'\) (\S+), top-1 '([^']*)'",
            text,
        )
    }
    assert sorted(steered) == list(range(18))
    best = int(_num(r"random direction at layer (\d+)", text))
    for layer in (best, 17):
        col = ref.residuals("The Colosseum")[layer][-1]
        eif = ref.residuals("The Eiffel Tower")[layer][-1]
        diff = col - eif
        scale = statistics.median([float(col.norm()), float(eif.norm())])
        vector = diff / diff.norm() * 0.25 * scale
        hook = (ref.layers[layer], _steering_hook(vector, 3))
        p = ref.last_logits(FACT, [hook]).softmax(-1)
        assert steered[layer][0] == pytest.approx(float(p[paris]), abs=2e-3)
        assert steered[layer][1] == pytest.approx(float(p[rome]), abs=2e-3)
    assert steered[best][2] == " Rome" and steered[17][2] == " Paris"
    assert all(steered[layer][2] == " Paris" for layer in range(handover, 18))
    assert re.search(r"random direction at layer \d+: .* top-1 ' Paris'", text)

    # greedy generation, plain and steered, as transformers generates it
    ids = ref.ids(FACT)
    with torch.no_grad():
        plain = ref.model.generate(ids, max_new_tokens=12, do_sample=False)
    shown = re.search(r"plain:\s+'(.*)'\n", text).group(1)
    assert shown == ref.tok.decode(plain[0, ids.shape[1] :])
    col = ref.residuals("The Colosseum")[best][-1]
    eif = ref.residuals("The Eiffel Tower")[best][-1]
    scale = statistics.median([float(col.norm()), float(eif.norm())])
    vector = (col - eif) / (col - eif).norm() * 0.25 * scale
    handle = ref.layers[best].register_forward_hook(_steering_hook(vector, 3))
    try:
        with torch.no_grad():
            out = ref.model.generate(ids, max_new_tokens=12, do_sample=False)
    finally:
        handle.remove()
    shown = re.search(r"steered:\s+'(.*)'\n", text).group(1)
    assert shown == ref.tok.decode(out[0, ids.shape[1] :])


# --- the build executes notebooks, and a failing one fails it -----------------------------------


def _mini_site(tmp_path: Path, source: str) -> Path:
    """A one-notebook site with mkdocs.yml's own mkdocs-jupyter settings and hook."""
    import yaml

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    plugin = next(p["mkdocs-jupyter"] for p in config["plugins"] if "mkdocs-jupyter" in p)
    assert plugin["execute"] is True and plugin["allow_errors"] is False
    assert ROOT / "tools" / "docs" / "notebooks.py" in [ROOT / h for h in config["hooks"]]
    (tmp_path / "docs").mkdir(parents=True)
    (tmp_path / "docs" / "index.md").write_text("# home\n", encoding="utf-8")
    nb = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_markdown_cell("# a tutorial"), nbformat.v4.new_code_cell(source)],
        metadata={"kernelspec": {"name": "python3", "language": "python", "display_name": "P"}},
    )
    nbformat.write(nb, tmp_path / "docs" / "nb.ipynb")
    site = {
        "site_name": "mini",
        "docs_dir": "docs",
        "use_directory_urls": False,
        "hooks": [str(ROOT / "tools" / "docs" / "notebooks.py")],
        "plugins": [{"mkdocs-jupyter": plugin}],
        "nav": [{"Home": "index.md"}, {"Tutorial": "nb.ipynb"}],
    }
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(site), encoding="utf-8")
    return tmp_path


def _build(folder: Path, execute: str | None):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OCULI_DOCS_EXECUTE"}
    if execute is not None:
        env["OCULI_DOCS_EXECUTE"] = execute
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", "mkdocs.yml", "-d", "site"]
    return subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=600)


def test_build_executes_notebooks_and_fails_on_an_error(tmp_path):
    pytest.importorskip("mkdocs_jupyter")
    ok = _mini_site(tmp_path / "ok", "print(6 * 7, 'from the build')")
    run = _build(ok, None)
    assert run.returncode == 0, run.stderr
    assert "42 from the build" in (ok / "site" / "nb.html").read_text(encoding="utf-8")

    bad = _mini_site(tmp_path / "bad", "raise RuntimeError('a tutorial cell failed')")
    run = _build(bad, "1")
    assert run.returncode != 0 and "a tutorial cell failed" in run.stdout + run.stderr
    # OCULI_DOCS_EXECUTE=0 (the quick build inside the test suite) renders without running
    run = _build(bad, "0")
    assert run.returncode == 0, run.stderr
    page = (bad / "site" / "nb.html").read_text(encoding="utf-8")
    assert "raise RuntimeError" in page and "Traceback" not in page
    run = _build(bad, "maybe")
    assert run.returncode != 0 and "OCULI_DOCS_EXECUTE must be" in run.stdout + run.stderr
