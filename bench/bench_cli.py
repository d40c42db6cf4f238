"""The researcher interface: ``oculi --help`` start-up, and recording activations during
``generate`` against plain ``generate`` on Gemma 3 270M, in one run.

Run: ``.venv/bin/python bench/bench_cli.py [--repeats 5] [--tokens 32]``

* ``oculi --help``: wall time of a fresh ``python -m oculi --help`` process (and of the
  ``oculi`` console script when it is on PATH), fastest of the repeats; the target is 0.5 s.
  The bare interpreter start-up is shown for reference.
* ``ModelAnalyzer.generate(..., return_activations=True)`` (hooks on every decoder layer read
  each step's new position, KV cache on) against ``ModelAnalyzer.generate(...)`` without
  recording, same greedy tokens; the target is 1.2x.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import header, measure_all  # noqa: E402

SRC = str(Path(__file__).resolve().parents[1] / "src")


def wall(cmd: list[str], repeats: int) -> float:
    """Fastest wall time of ``cmd`` over ``repeats`` fresh processes (seconds)."""
    env = {"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"}
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, env=env)
        best = min(best, time.perf_counter() - t0)
    return best


def bench_help(repeats: int) -> None:
    print("\n### oculi --help (fresh process, fastest of the repeats)\n")
    print("| command                          | seconds | target |")
    print("|----------------------------------|---------|--------|")
    rows = [("python -c pass", [sys.executable, "-c", "pass"]),
            ("python -m oculi --help", [sys.executable, "-m", "oculi", "--help"])]  # fmt: skip
    script = shutil.which("oculi")
    if script:
        rows.append(("oculi --help (console script)", [script, "--help"]))
    for name, cmd in rows:
        target = "" if name.startswith("python -c") else "0.5"
        print(f"| {name:<32} | {wall(cmd, repeats):7.3f} | {target:>6} |")


def bench_generate(repeats: int, tokens: int) -> None:
    import torch

    from oculi import ModelAnalyzer

    torch.set_grad_enabled(False)
    analyzer = ModelAnalyzer(device="cpu")
    prompt = "The Eiffel Tower is located in the city of"
    plain = analyzer.generate(prompt, max_new_tokens=tokens)
    text, record = analyzer.generate(prompt, max_new_tokens=tokens, return_activations=True)
    assert text == plain, "recording changed the generated text"
    shape = tuple(record.residual().shape)
    print(header(f"generate {tokens} tokens on Gemma 3 270M (CPU), activations {shape}"))
    rows = measure_all(
        [
            ("generate (plain)", lambda: analyzer.generate(prompt, max_new_tokens=tokens)),
            ("generate, recording every layer", lambda: analyzer.generate(
                prompt, max_new_tokens=tokens, return_activations=True)),
        ],
        repeats=repeats,
    )  # fmt: skip
    for row in rows:
        print(row.row(rows[0]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--only", choices=["help", "generate"], default=None)
    args = parser.parse_args()
    if args.only in (None, "help"):
        bench_help(args.repeats)
    if args.only in (None, "generate"):
        bench_generate(args.repeats, args.tokens)


if __name__ == "__main__":
    main()
