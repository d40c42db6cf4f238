"""Train a TopK SAE on Gemma 3 270M's residual stream and evaluate it (for docs/benchmarks.md).

::

    .venv/bin/python examples/sae_gemma.py --work sae-gemma        # resumable: rerun to continue

Text: the documentation the Python packages installed here ship (their long descriptions in
``*.dist-info/METADATA``, ``*.md``/``*.rst`` files, and the docstrings of their ``*.py``
modules, classes and functions, read with ``ast``), split into paragraphs of at least 200
characters that are mostly letters, deduplicated, in sorted file order, each truncated to 128
tokens: English technical prose. Every step is resumable (the harvest by its unit log,
training by its checkpoints), so a killed run continues where it stopped.

Steps: 1. write ``prompts.jsonl`` (held-out prompts to ``held_out.jsonl``); 2. harvest
``resid_post`` of one layer (``oculi.harvest``); 3. ``oculi.sae.train``; 4. ``oculi.sae.evaluate``
on the held-out prompts; 5. ``summary.json`` with the numbers and the exact configuration.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import site
import sys
import time
from pathlib import Path


def documents() -> list[Path]:
    roots = [Path(p) for p in site.getsitepackages()]
    files: set[Path] = set()
    for root in roots:
        files.update(root.glob("*.dist-info/METADATA"))
        for pattern in ("*.md", "*.rst", "*.py"):
            files.update(root.rglob(pattern))
    return sorted(files)


def docstrings(path: Path) -> str:
    """The module, class and function docstrings of a Python file, blank-line separated."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="ignore"))
    except (SyntaxError, ValueError, OSError, RecursionError):
        return ""
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    found = [ast.get_docstring(n) for n in ast.walk(tree) if isinstance(n, kinds)]
    return "\n\n".join(d for d in found if d)


def paragraphs(path: Path) -> list[str]:
    try:
        text = docstrings(path) if path.suffix == ".py" else path.read_text("utf-8", "ignore")
    except OSError:
        return []
    if path.name == "METADATA":  # headers first, then the long description
        text = text.split("\n\n", 1)[1] if "\n\n" in text else ""
    out = []
    for block in re.split(r"\n\s*\n", text):
        block = block.strip()
        letters = sum(c.isalpha() for c in block)
        if len(block) >= 200 and letters > 0.6 * len(block):  # prose, not tables or code
            out.append(block[:1200])
    return out


def write_prompts(work: Path, n_held_out: int, n_prompts: int) -> tuple[Path, Path]:
    seen: set[str] = set()
    texts: list[str] = []
    for path in documents():
        for p in paragraphs(path):
            if p not in seen:
                seen.add(p)
                texts.append(p)
        if len(texts) >= n_prompts + n_held_out:
            break
    held, train = texts[-n_held_out:], texts[:-n_held_out]
    out, held_out = work / "prompts.jsonl", work / "held_out.jsonl"
    out.write_text("".join(json.dumps(t) + "\n" for t in train), encoding="utf-8")
    held_out.write_text("".join(json.dumps(t) + "\n" for t in held), encoding="utf-8")
    return out, held_out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="sae-gemma", help="folder for prompts, store, SAE")
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--d-sae", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--min-tokens", type=int, default=1_000_000)
    ap.add_argument("--held-out", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=15000, help="training prompts to write")
    ap.add_argument("--epochs", type=int, default=1)
    args = ap.parse_args()

    import torch

    import oculi
    from oculi.sae import evaluate, train

    torch.manual_seed(0)
    work = Path(args.work)
    work.mkdir(exist_ok=True)
    t0 = time.time()
    prompts, held_out = write_prompts(work, args.held_out, args.prompts)
    adapter = oculi.load(device="cpu")
    summary = oculi.harvest(adapter, str(prompts), sites="resid_post", layers=[args.layer],
                            out=work / "store", max_length=args.max_length,
                            storage_dtype=torch.float16, batch_tokens=4096)  # fmt: skip
    print(f"harvest: {summary.tokens:,} tokens of {summary.n_prompts:,} prompts", flush=True)
    if summary.tokens < args.min_tokens:
        sys.exit(f"only {summary.tokens:,} tokens < --min-tokens {args.min_tokens:,}")
    t1 = time.time()
    (work / "sae").mkdir(exist_ok=True)
    sae = train(work / "store", "resid_post", args.layer, d_sae=args.d_sae, kind="topk",
                k=args.k, out=work / "sae", batch_rows=4096,
                n_tokens=args.epochs * summary.tokens)  # fmt: skip
    t2 = time.time()
    texts = [json.loads(line) for line in held_out.read_text().splitlines()]
    result = evaluate(adapter, sae, texts, batch_size=4, max_length=args.max_length)
    t3 = time.time()
    print(result.table(), flush=True)
    info = {
        "command": " ".join(sys.argv), "layer": args.layer, "d_sae": args.d_sae, "k": args.k,
        "harvest_tokens": summary.tokens, "prompts": summary.n_prompts,
        "train_tokens": sae.metadata["training"]["tokens"],
        "evaluation": vars(result), "held_out_prompts": len(texts),
        "seconds": {"harvest": t1 - t0, "train": t2 - t1, "evaluate": t3 - t2},
    }  # fmt: skip
    (work / "summary.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
