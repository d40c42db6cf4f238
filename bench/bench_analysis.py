"""Analysis cost on an all-layer capture of a 128-token prompt, as ratios to that capture.

Run: ``.venv/bin/python bench/bench_analysis.py [--repeats 3] [--tokens 128]`` (options shared
by every script: ``bench/common.py``).

The baseline is the forward that made the capture (``capture_full`` with per-head
contributions, all layers); each analysis of that capture is timed against it (target: at most
10% each). Composition is timed on its own (all Q/K/V tensors ``[L, H, L, H]`` from the
weights, target 5 s for Gemma 3 270M on a CPU), and so is gradient × input (a forward and a
backward, compared with the plain HF forward).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import Report, add_run_args, build_adapter, measure, measure_all  # noqa: E402
from oculi import CaptureConfig  # noqa: E402
from oculi.analysis import (  # noqa: E402
    AttributionMethods,
    CircuitDetection,
    CompositionAnalysis,
    EntropyAnalysis,
    HeadWeights,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_run_args(parser, repeats=3)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    adapter = build_adapter(args)
    report = Report("bench_analysis", args, adapter)
    gen = torch.Generator().manual_seed(0)
    half = torch.randint(1000, min(adapter.vocab_limit, 20_000), (args.tokens // 2,), generator=gen)
    ids = torch.cat([half, half])[None].to(adapter.device)  # repeated: induction is measurable
    heads = CaptureConfig(capture_head_contributions=True)
    full = adapter.capture_full(ids, attention=heads)
    weights = HeadWeights.from_adapter(adapter)
    target = int(adapter.forward(ids)[-1].argmax())
    every = list(range(ids.shape[1]))

    report.start(f"analyses of one all-layer capture, 1 x {ids.shape[1]} tokens")
    rows = [
        (
            "capture_full (+ head contributions) [baseline]",
            lambda: adapter.capture_full(ids, attention=heads),
        ),
        (
            "DLA, last position (layers, heads)",
            lambda: AttributionMethods.direct_logit_attribution(full, target),
        ),
        (
            f"DLA per head, all {len(every)} positions",
            lambda: AttributionMethods.direct_logit_attribution(full, target, position=every),
        ),
        ("attention rollout", lambda: AttributionMethods.attention_rollout(full)),
        (
            "attention flow, exact (max flow per token, last position)",
            lambda: AttributionMethods.attention_flow(full),
        ),
        (
            "attention flow, cut bound (method='cut')",
            lambda: AttributionMethods.attention_flow(full, method="cut"),
        ),
        (
            "value-weighted attention (|a v W_O|)",
            lambda: AttributionMethods.value_weighted_attention(full, weights),
        ),
        ("induction scores", lambda: CircuitDetection.detect_induction_heads(full.attention)),
        (
            "duplicate-token scores",
            lambda: CircuitDetection.detect_duplicate_token_heads(full.attention),
        ),
        (
            "classify_heads (all patterns, all heads)",
            lambda: CircuitDetection.classify_heads(full.attention),
        ),
        (
            "virtual attention, 3-head path",
            lambda: CompositionAnalysis.virtual_attention(full, [(1, 0), (5, 1), (11, 2)]),
        ),
        ("token entropy", lambda: EntropyAnalysis.token_entropy(full.attention)),
    ]
    measured = measure_all(rows, repeats=args.repeats, device=adapter.device)
    base = measured[0]
    for m in measured:
        report.add(m, base, " OK" if m is base or m.seconds <= 0.1 * base.seconds else " over 10%")

    report.start("from the weights")
    read = measure(
        "HeadWeights.from_adapter (norms folded)",
        lambda: HeadWeights.from_adapter(adapter),
        repeats=args.repeats,
    )
    scores = measure(
        "all composition scores, Q/K/V [L, H, L, H]",
        lambda: CompositionAnalysis.all_composition_scores(weights),
        repeats=args.repeats,
    )
    report.add(read)
    report.add(scores, None, " OK" if scores.seconds + read.seconds <= 5 else " over 5 s")

    report.start(f"gradient x input, 1 x {ids.shape[1]} tokens")
    forward = measure("HF forward", lambda: adapter.forward(ids), repeats=args.repeats)
    gxi = measure(
        "gradient x input (forward + backward)",
        lambda: AttributionMethods.gradient_x_input(adapter, ids, target),
        repeats=args.repeats,
    )
    report.add(forward, forward)
    report.add(gxi, forward)
    report.write()


if __name__ == "__main__":
    main()
