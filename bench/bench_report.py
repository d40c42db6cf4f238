"""The report page on Gemma 3 270M against what it cannot avoid: one forward pass plus the
causal-tracing sweep it includes (target: at most 3x).

Run: ``.venv/bin/python bench/bench_report.py [--repeats 2] [--samples 5]``

The report runs one capture (patterns, per-head outputs, residual, layer-wise logits), reads
the logit lens and the attributions from it, traces, and writes the HTML page. The baseline
is a plain Hugging Face forward of the prompt plus ``oculi.causal_tracing`` with the same
subject and noise samples, timed round-robin in the same process.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import oculi  # noqa: E402
from common import header, measure_all  # noqa: E402
from oculi.visualize.report import default_subject, write_report  # noqa: E402

# 12 tokens of text (13 with BOS)
PROMPT = "The Eiffel Tower is located in the heart of the city of"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--samples", type=int, default=5, help="noise samples (report default)")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    adapter = oculi.load(device=args.device)
    ids = adapter.prepare(PROMPT).input_ids
    n = ids.shape[1]
    subject = default_subject(adapter, PROMPT)
    target = int(adapter.forward(PROMPT)[-1].argmax())
    out = Path(tempfile.mkdtemp()) / "report.html"

    def forward_and_trace():
        with torch.no_grad():
            adapter.model(ids)
        return oculi.causal_tracing(
            adapter, PROMPT, subject, target, samples=args.samples, progress=False
        )

    def report():
        return write_report(adapter, PROMPT, out, samples=args.samples)

    base, page = measure_all(
        [
            ("forward + causal tracing (baseline)", forward_and_trace),
            ("report (write_report)", report),
        ],
        repeats=args.repeats,
        warmup=0,
        device=adapter.device,
    )
    print(f"{PROMPT!r}: {n} tokens, {args.samples} noise samples, on {adapter.device}")
    print(header("report page against forward + causal tracing"))
    print(base.row())
    print(page.row(base))
    print(
        f"\nreport / baseline = {page.seconds / base.seconds:.2f}x (target <= 3x); "
        f"page {out.stat().st_size / 1e3:.0f} kB"
    )


if __name__ == "__main__":
    main()
