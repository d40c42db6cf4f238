"""Cost of the reliability checks: overflow guards on intervention edits, thread-scoped hooks.

Times, round-robin in one process, against the plain Hugging Face forward:

- a forward inside an ``InterventionContext`` steering every layer's residual, with the
  overflow guard (two device-side reductions per edit, one host sync per forward) and with
  the guard's wrap replaced by the identity;
- ``capture_full`` (every hook scoped to its thread) beside the plain forward.

Usage: ``python bench/bench_reliability.py [--tokens 128] [--device cuda]``.
"""

from __future__ import annotations

import argparse
from unittest import mock

import torch

import oculi
from common import header, measure_all
from oculi.intervention import InterventionContext, SteeringVector
from oculi.intervention.finite import FiniteGuard


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    adapter = oculi.load(args.model, device=args.device)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, adapter.d_vocab - 10, (1, args.tokens), generator=gen)
    ids = ids.to(adapter.device)
    vec = torch.randn(adapter.d_model, generator=gen).to(adapter.device, adapter.dtype)
    steer = [SteeringVector(vec, layer=i, coefficient=0.5) for i in range(adapter.n_layers)]

    def hf():
        with torch.no_grad():
            return adapter.model(ids, use_cache=False).logits

    def steered():
        with InterventionContext(adapter, steer):
            return adapter.forward(ids)

    def unguarded():
        with mock.patch.object(FiniteGuard, "wrap", lambda _self, e: e):
            return steered()

    print(f"model: {adapter}\ndevice: {adapter.device}, {args.tokens} tokens")
    print(header(f"overflow guard: steering all {adapter.n_layers} layers"))
    rows = measure_all(
        [
            ("plain HF forward", hf),
            ("InterventionContext, guarded", steered),
            ("InterventionContext, guard off", unguarded),
            ("capture_full (scoped hooks)", lambda: adapter.capture_full(ids)),
        ],
        repeats=args.repeats,
        device=adapter.device,
    )
    for row in rows:
        print(row.row(rows[0]))
    print(f"\nguard overhead: {rows[1].seconds / rows[2].seconds - 1:+.1%} of the guarded forward")


if __name__ == "__main__":
    main()
