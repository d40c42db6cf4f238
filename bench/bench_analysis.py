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
    adapter = build_adapter(args, FLOW_TEXTS)
    report = Report("bench_analysis", args, adapter)
    gen = torch.Generator().manual_seed(0)
    high = min(adapter.vocab_limit, 20_000)
    half = torch.randint(min(1000, high // 4), high, (args.tokens // 2,), generator=gen)
    ids = torch.cat([half, half])[None].to(adapter.device)  # repeated: induction is measurable
    heads = CaptureConfig(capture_head_contributions=True)
    full = adapter.capture_full(ids, attention=heads)
    weights = HeadWeights.from_adapter(adapter)
    target = int(adapter.forward(ids)[-1].argmax())
    every = list(range(ids.shape[1]))
    # a 3-head path through increasing layers: (1, 0), (5, 1), (11, 2) on Gemma 3 270M
    layers = (1, max(2, adapter.n_layers * 5 // 18), max(3, adapter.n_layers * 11 // 18))
    path = [(layer, h % adapter.n_heads) for h, layer in enumerate(layers)]

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
        (
            "neuron DLA, last position, all layers",
            lambda: AttributionMethods.neuron_attribution(full, target, adapter),
        ),
        (
            "promoted tokens of one head (a pass over W_U)",
            lambda: AttributionMethods.promoted_tokens(full, (adapter.n_layers - 1, 0)),
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
            lambda: CompositionAnalysis.virtual_attention(full, path),
        ),
        ("token entropy", lambda: EntropyAnalysis.token_entropy(full.attention)),
    ]
    measured = measure_all(rows, repeats=args.repeats, device=adapter.device)
    base = measured[0]
    for m in measured:
        report.add(m, base, " OK" if m is base or m.seconds <= 0.1 * base.seconds else " over 10%")

    flow_agreement(report, adapter)

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


FLOW_TEXTS = (
    "The quick brown fox jumps over the lazy dog. " * 6,
    "When Mary and John went to the store, John gave a drink to",
    "The Eiffel Tower is located in the city of",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + "
    "fibonacci(n - 2)\n\nprint(fibonacci(10))",
    "In 1969, Neil Armstrong became the first person to walk on the Moon. The mission, Apollo "
    "11, was launched from Kennedy Space Center in Florida. Millions of people watched the "
    "landing on television around the world, and the event remains one of the most famous "
    "moments of the twentieth century.",
    ", ".join(str(i) for i in range(1, 26)),
)


def flow_agreement(report: Report, adapter) -> None:
    """How often the cut bound is the exact flow: 6 texts and 2 random-token prompts, at the
    last and the middle position (the bound is never below the flow; the gap is reported)."""
    report.start("attention flow: the cut bound against the exact flow")
    gen = torch.Generator().manual_seed(1)
    high = min(adapter.vocab_limit, 20_000)
    prompts = [adapter.tokenizer(t, return_tensors="pt").input_ids for t in FLOW_TEXTS]
    prompts += [torch.randint(min(1000, high // 4), high, (1, 96), generator=gen) for _ in "ab"]
    equal = total = 0
    worst = 0.0
    for ids in prompts:
        capture = adapter.capture(ids.to(adapter.device))
        positions = [-1, ids.shape[1] // 2]
        exact = AttributionMethods.attention_flow(capture, positions)
        cut = AttributionMethods.attention_flow(capture, positions, method="cut")
        for row, index in enumerate(exact.metadata["index"]):
            gap = (cut.values[row] - exact.values[row])[: index + 1]
            equal += int((gap.abs() < 1e-8).sum())
            total += index + 1
            worst = max(worst, float(gap.max()))
    report.fact(
        "flow_cut_equal_tokens",
        [equal, total],
        f"cut bound = exact flow for {equal} of {total} tokens",
    )
    report.fact("flow_cut_worst_gap", worst, f"largest gap above the flow: {worst:.4f}")


if __name__ == "__main__":
    main()
