"""docs/tutorial.ipynb runs top to bottom (nbclient) and shows what the model really does."""

from __future__ import annotations

import os
import re
from pathlib import Path

import nbformat
import pytest
import torch
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def _text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out["text"])
        elif "data" in out:
            parts.append(out["data"].get("text/html", "") + out["data"].get("text/plain", ""))
    return "".join(parts)


@pytest.mark.gemma
def test_tutorial_notebook_executes(gemma, tmp_path):
    nb = nbformat.read(ROOT / "docs" / "tutorial.ipynb", as_version=4)
    # the kernel imports this checkout's oculi, whatever the working directory
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    env["MPLBACKEND"] = "Agg"
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute(env=env)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert errors == []
    text = "\n".join(_text(c) for c in nb.cells if c.cell_type == "code")

    # attention heads: the API (on a repeated sentence) and the CLI (on a repeated random
    # sequence) find the same strongest induction head
    api = re.search(r"induction heads \(layer, head, score\): \[\((\d+), (\d+)", text)
    cli = re.search(r"induction\s+L(\d+)\.H(\d+)", text)
    assert api.groups() == cli.groups()

    # IOI: the printed logit differences are the model's own (from its logits)
    mary, john = gemma.to_single_token(" Mary"), gemma.to_single_token(" John")
    clean = gemma.forward("When Mary and John went to the store, John gave a drink to")[-1]
    corrupt = gemma.forward("When Mary and John went to the store, Mary gave a drink to")[-1]
    shown = re.search(r"logit difference: clean (\S+), corrupt (\S+)", text)
    assert float(shown.group(1)) == pytest.approx(float(clean[mary] - clean[john]), abs=2e-3)
    assert float(shown.group(2)) == pytest.approx(float(corrupt[mary] - corrupt[john]), abs=2e-3)
    assert float(shown.group(1)) > 0 > float(shown.group(2))

    # factual recall: " Paris" becomes the top-1 within the model, at a layer the lens names
    fact = "The Eiffel Tower is located in the city of"
    final = torch.softmax(gemma.forward(fact)[-1].float(), -1)
    assert gemma.tokenizer.decode([int(final.argmax())]) == " Paris"
    crossover = int(re.search(r"crossover layer: (\d+) of 18", text).group(1))
    assert 0 < crossover < 18
    clean_p = float(re.search(r"clean p = (\S+), corrupted", text).group(1))
    assert clean_p == pytest.approx(float(final[gemma.to_single_token(" Paris")]), abs=2e-3)

    paris = gemma.to_single_token(" Paris")
    logit = float(re.search(r"logit (\S+) = embedding", text).group(1))
    assert logit == pytest.approx(float(gemma.forward(fact)[-1][paris]), abs=2e-3)

    # the interactive views and the report came out
    assert 'data-oculi="attention"' in text and 'class="oc-tracing"' in text
    report = tmp_path / "report.html"
    assert report.exists() and "Paris" in report.read_text(encoding="utf-8")
