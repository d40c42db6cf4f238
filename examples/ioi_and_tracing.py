"""Seed 003/004's tasks on Gemma 3 270M: IOI activation patching and ROME causal tracing.

Run: ``.venv/bin/python examples/ioi_and_tracing.py [--out figures/]``

Prints the layer x position recovery of the IOI residual stream, the heads whose output
carries the name (per-head ``z`` patching), and the causal-tracing grid of a factual prompt;
with ``--out`` it also saves the heatmaps as PNG files (needs matplotlib, ``oculi[viz]``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import oculi
from oculi import patching

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"
FACT, SUBJECT, TARGET = "The Eiffel Tower is located in the city of", "The Eiffel Tower", " Paris"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="folder for PNG heatmaps")
    parser.add_argument("--samples", type=int, default=10, help="noise samples for tracing")
    args = parser.parse_args()
    adapter = oculi.load()
    metric = patching.logit_diff(" Mary", " John")

    resid = patching.activation_patching(adapter, CLEAN, CORRUPT, site="resid_pre", metric=metric)
    print(
        f"IOI logit difference (Mary - John): clean {resid.clean_metric:.2f}, "
        f"corrupt {resid.corrupt_metric:.2f}\n"
    )
    print("resid_pre patching, recovery (0 = corrupt, 1 = clean):")
    print(resid.table())

    heads = patching.activation_patching(
        adapter, CLEAN, CORRUPT, site="z", per_head=True, metric=metric
    )
    print("\nper-head z patching, recovery:")
    print(heads.table())
    print("\nheads that matter most (layer, head, recovery):")
    for layer, head, value in heads.top(5):
        print(f"  L{layer}H{head}: {value:+.2f}")

    trace = oculi.causal_tracing(adapter, FACT, SUBJECT, TARGET, samples=args.samples)
    print(
        f"\ncausal tracing of {TARGET!r}: clean p = {trace.clean_prob:.3f}, "
        f"corrupted p = {trace.corrupt_prob:.3f}, grid {tuple(trace.values.shape)}"
    )
    print(trace.table())

    if args.out is not None:
        import matplotlib

        matplotlib.use("Agg")
        args.out.mkdir(parents=True, exist_ok=True)
        for name, result in (
            ("ioi_resid_pre", resid),
            ("ioi_heads", heads),
            ("causal_tracing", trace),
        ):
            ax = result.plot()
            ax.figure.tight_layout()
            ax.figure.savefig(args.out / f"{name}.png", dpi=120)
            print(f"saved {args.out / name}.png")


if __name__ == "__main__":
    main()
