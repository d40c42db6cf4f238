"""Cost of opening and closing oculi contexts, and whether it grows with their number.

Opens and closes ``--contexts`` intervention contexts (a ``SpectraScaler``, so hooks and an
attention bridge are installed and removed each time) and as many hook sets, with no forward
inside, and prints the mean time per context over the first and the last tenth. Each context
used to leave its forward-end check registered, so the time per context grew with the number
already closed (issue 16); now both tenths cost the same, and the forward-end table is empty.

Usage: ``python bench/bench_lifecycle.py [--contexts 20000] [--model gemma-3-270m]``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import oculi
from oculi.capture import bridge, hooks
from oculi.intervention import InterventionContext, SpectraScaler


def per_context(fn: Callable[[], None], n: int) -> tuple[float, float]:
    """Mean seconds of ``fn()`` over the first and over the last tenth of ``n`` calls."""
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    k = max(1, n // 10)
    return sum(times[:k]) / k, sum(times[-k:]) / k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--contexts", type=int, default=20_000)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    adapter = oculi.load(args.model, device=args.device)
    scaler = [SpectraScaler(layer=1, head=0, alpha=1.5)]

    def context() -> None:
        with InterventionContext(adapter, scaler):
            pass

    def hook_set() -> None:
        with hooks.HookSet() as hs:
            hs.forward(adapter.layer_modules[0], lambda *_: None)

    print(f"model: {adapter}\n{args.contexts} contexts of each kind")
    print(f"| {'what':<40} | first tenth (us) | last tenth (us) |")
    print(f"|{'-' * 42}|------------------|-----------------|")
    for name, fn in [
        ("InterventionContext(SpectraScaler)", context),
        ("HookSet, one hook", hook_set),
    ]:
        first, last = per_context(fn, args.contexts)
        print(f"| {name:<40} | {first * 1e6:16.0f} | {last * 1e6:15.0f} |")
    left = {
        "forward-end checks": len(hooks._FORWARD_END.get()),
        "open bridges": len(bridge._ACTIVE),
        "bridge owners": len(bridge._OWNERS),
    }
    print(f"\nleft registered afterwards: {left}")


if __name__ == "__main__":
    main()
