"""Patching sweeps on Gemma 3 270M: oculi against the naive batched sweep, in one run.

Run: ``.venv/bin/python bench/bench_patching.py [--repeats 3] [--device cpu|cuda]
[--shape gemma-270m|llama-8b|tiny] [--json PATH]`` (shared options: ``bench/common.py``).
The naive references run on the model's device (their noise and indices made there), and
print their agreement with oculi.

* IOI resid_pre sweep (every layer x every position): the naive sweep runs, per layer, one
  forward of a batch of T patched copies with full logits (what TransformerLens and nnsight
  tutorials do); oculi reuses the corrupt run's prefix and computes two logits per copy. The
  numbers must agree to 1e-4.
* Causal tracing (noise on the subject, restore each layer's output at each position): the
  naive loop runs, per (layer, position), one forward of the noise samples with full logits.
* Steered generation: greedy ``generate`` of 32 tokens with a contrastive steering vector
  added at every step, against the same ``model.generate`` without it (KV cache on in both).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import Measurement, Report, add_run_args, build_adapter, measure  # noqa: E402
from oculi import patching  # noqa: E402

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"
# 15 tokens with BOS, the prompt length the tracing target is stated for.
FACT = "The Eiffel Tower is a famous tower that is located in the city of"
SUBJECT, TARGET = "The Eiffel Tower", " Paris"


def naive_resid_pre_sweep(adapter, clean_ids, corrupt_ids, correct, wrong) -> torch.Tensor:
    """Plain hooks: per layer, a batch of T copies each patched at one position; full logits."""
    model, layers = adapter.model, adapter.layer_modules
    with torch.no_grad():
        hidden = model(clean_ids, output_hidden_states=True).hidden_states
    t = clean_ids.shape[1]
    out = torch.zeros(len(layers), t, device=clean_ids.device)
    batch = corrupt_ids.repeat(t, 1)
    rows = torch.arange(t, device=clean_ids.device)
    for li, layer in enumerate(layers):

        def hook(_m, args, kwargs, li=li):
            h = (args[0] if args else kwargs["hidden_states"]).clone()
            h[rows, rows] = hidden[li][0, rows]
            return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

        handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                logits = model(batch).logits[:, -1]
        finally:
            handle.remove()
        out[li] = logits[:, correct] - logits[:, wrong]
    return out


def naive_causal_tracing(adapter, ids, positions, target, samples, sigma, seed=0) -> torch.Tensor:
    """Per (layer, position): one forward of the noisy samples with that state restored."""
    model, layers = adapter.model, adapter.layer_modules
    embed = adapter.model.get_input_embeddings()
    clean_out = {}
    grab = [
        layer.register_forward_hook(
            lambda _m, _a, o, i=i: clean_out.__setitem__(i, o[0] if isinstance(o, tuple) else o)
        )
        for i, layer in enumerate(layers)
    ]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in grab:
            h.remove()
    # drawn on the CPU in oculi's order (the same numbers), then kept on the model's device
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(samples, len(positions), adapter.d_model, generator=gen) * sigma
    noise = noise.to(ids.device)
    batch = ids.repeat(samples, 1)

    def add_noise(_m, _a, out):
        out = out.clone()
        out[:, positions] += noise.to(out.dtype)
        return out

    n, t = len(layers), ids.shape[1]
    out = torch.zeros(n, t, device=ids.device)
    for layer in range(n):
        for pos in range(t):

            def restore(_m, _a, o, layer=layer, pos=pos):
                h = (o[0] if isinstance(o, tuple) else o).clone()
                h[:, pos] = clean_out[layer][0, pos]
                return (h, *o[1:]) if isinstance(o, tuple) else h

            handles = [
                embed.register_forward_hook(add_noise),
                layers[layer].register_forward_hook(restore),
            ]
            try:
                with torch.no_grad():
                    probs = model(batch).logits[:, -1].softmax(-1)[:, target]
            finally:
                for h in handles:
                    h.remove()
            out[layer, pos] = probs.mean()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(parser, repeats=3)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--only", choices=["sweep", "tracing", "generate"], default=None)
    parser.add_argument(
        "--strategy",
        choices=["auto", "layered", "fused"],
        default="auto",
        help="oculi's sweep batching (auto: layered on the CPU, fused on accelerators)",
    )
    args = parser.parse_args(argv)
    adapter = build_adapter(args, [CLEAN, CORRUPT, FACT, TARGET, *CONTRAST])
    report = Report("bench_patching", args, adapter)
    if args.only in (None, "sweep"):
        bench_sweep(adapter, args, report)
    if args.only in (None, "tracing"):
        bench_tracing(adapter, args, report)
    if args.only in (None, "generate"):
        bench_generate(adapter, args, report)
    report.write()


CONTRAST = ("I love this, it is wonderful", "I hate this, it is awful")


def bench_generate(adapter, args, report: Report) -> None:
    from oculi.intervention import InterventionContext, SteeringVector

    ids = adapter.prepare(FACT)
    vector = SteeringVector.from_contrast(
        adapter,
        positive=[CONTRAST[0]],
        negative=[CONTRAST[1]],
        layer=min(6, adapter.n_layers // 2),
        coefficient=0.25,  # a quarter of the residual's typical norm
    )
    kwargs = dict(
        input_ids=ids.input_ids,
        attention_mask=ids.attention_mask,
        max_new_tokens=32,
        do_sample=False,
        min_new_tokens=32,
    )
    report.start("greedy generation, 32 new tokens")

    def plain():
        with torch.no_grad():
            return adapter.model.generate(**kwargs)

    def steered():
        with InterventionContext(adapter, [vector]), torch.no_grad():
            return adapter.model.generate(**kwargs)

    device = adapter.device
    base = measure("model.generate", plain, repeats=args.repeats, device=device)
    report.add(base, base)
    ours = measure(
        "generate, SteeringVector on every step", steered, repeats=args.repeats, device=device
    )
    report.add(ours, base)
    changed = int((plain() != steered()).any(0).sum())
    report.fact(
        "positions changed by the vector",
        changed,
        f"\n{changed} of {plain().shape[1]} positions differ with the vector "
        f"(coefficient 4, layer {vector.layer})",
    )


def bench_sweep(adapter, args, report: Report) -> None:
    clean_ids = adapter.prepare(CLEAN).input_ids
    corrupt_ids = adapter.prepare(CORRUPT).input_ids
    correct, wrong = adapter.to_single_token(" Mary"), adapter.to_single_token(" John")
    metric = patching.logit_diff(" Mary", " John")
    t = clean_ids.shape[1]
    device = adapter.device
    report.start(f"IOI resid_pre sweep, {adapter.n_layers} layers x {t} positions")
    naive = measure(
        "naive batched sweep (full logits)",
        lambda: naive_resid_pre_sweep(adapter, clean_ids, corrupt_ids, correct, wrong),
        repeats=args.repeats,
        warmup=0 if device.type == "cpu" else 1,
        device=device,
    )
    report.add(naive, naive)

    def sweep() -> patching.PatchingResult:
        return patching.activation_patching(
            adapter,
            CLEAN,
            CORRUPT,
            site="resid_pre",
            metric=metric,
            progress=False,
            strategy=args.strategy,
        )

    fast = measure(
        "oculi activation_patching",
        sweep,
        repeats=args.repeats,
        warmup=1,
        device=device,
    )
    report.add(fast, naive, f"  speed-up {naive.seconds / fast.seconds:.1f}x")
    for strategy in ("layered", "fused"):  # each strategy forced (auto picks by device)
        forced = measure(
            f"oculi activation_patching, strategy={strategy}",
            lambda strategy=strategy: patching.activation_patching(
                adapter, CLEAN, CORRUPT, metric=metric, strategy=strategy, progress=False
            ),
            repeats=args.repeats,
            warmup=1,
            device=device,
        )
        report.add(forced, naive, f"  speed-up {naive.seconds / forced.seconds:.1f}x")
    # Without the exact shortcut that skips cells whose patch writes what the corrupt run
    # already has (here: every position before the swapped name), to show what is left.
    from oculi.patching import activation

    skip = activation._no_op_mask
    activation._no_op_mask = lambda kind, c, k, layers, axis, items, r: [  # noqa: ARG005
        [False] * len(items) for _ in layers
    ]
    try:
        every = measure(
            "oculi, every cell computed (no skipping)",
            sweep,
            repeats=args.repeats,
            warmup=1,
            device=device,
        )
    finally:
        activation._no_op_mask = skip
    report.add(every, naive, f"  speed-up {naive.seconds / every.seconds:.1f}x")
    diff = (
        (
            naive_resid_pre_sweep(adapter, clean_ids, corrupt_ids, correct, wrong).cpu()
            - sweep().values.cpu()
        )
        .abs()
        .max()
    )
    report.fact("max |naive - oculi|", float(diff), f"\nmax |naive - oculi| = {float(diff):.2e}")
    atp = measure(
        "oculi attribution_patching (approximate)",
        lambda: patching.attribution_patching(
            adapter, CLEAN, CORRUPT, site="resid_pre", metric=metric
        ),
        repeats=args.repeats,
        device=device,
    )
    report.add(atp, naive)


def bench_tracing(adapter, args, report: Report) -> None:
    ids = adapter.prepare(FACT).input_ids
    positions = patching.subject_positions(adapter, FACT, SUBJECT)
    sigma = 3.0 * patching.tracing.embedding_std(adapter)
    target = adapter.to_single_token(TARGET)
    report.start(f"causal tracing, {ids.shape[1]} tokens, {args.samples} noise samples")
    cuda = adapter.device.type == "cuda"
    if cuda:  # one untimed run of each: kernels compiled and memory pools filled
        naive_causal_tracing(adapter, ids, positions, target, args.samples, sigma)
        patching.causal_tracing(
            adapter, FACT, SUBJECT, TARGET, samples=2, progress=False, strategy=args.strategy
        )
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    naive_ct = naive_causal_tracing(adapter, ids, positions, target, args.samples, sigma)
    if cuda:
        torch.cuda.synchronize()
    naive = Measurement("naive loop (per layer x position)", time.perf_counter() - t0, float("nan"))
    results: list[patching.TracingResult] = []  # the timed run's result, compared below
    ours = measure(
        "oculi causal_tracing",
        lambda: results.append(
            patching.causal_tracing(
                adapter,
                FACT,
                SUBJECT,
                TARGET,
                samples=args.samples,
                progress=False,
                strategy=args.strategy,
            )
        ),
        repeats=1,
        warmup=0,
        device=adapter.device,
    )
    report.add(naive, naive)
    report.add(ours, naive, f"  speed-up {naive.seconds / ours.seconds:.1f}x")
    # the strategy not timed above, for comparison
    chosen = patching.choose_strategy(args.strategy, adapter.device)
    other = "fused" if chosen == "layered" else "layered"
    forced = measure(
        f"oculi causal_tracing, strategy={other}",
        lambda: patching.causal_tracing(
            adapter, FACT, SUBJECT, TARGET, samples=args.samples, strategy=other, progress=False
        ),
        repeats=1,
        warmup=0,
        device=adapter.device,
    )
    report.add(forced, naive, f"  speed-up {naive.seconds / forced.seconds:.1f}x")
    res = results[0]
    diff = float((naive_ct.to(res.values.device) - res.values).abs().max())
    report.fact(
        "max |naive - oculi|",
        diff,
        f"\nclean p={res.clean_prob:.3f}, corrupt p={res.corrupt_prob:.3f}; grid "
        f"{tuple(res.values.shape)}; max |naive - oculi| = {diff:.2e}",
    )


if __name__ == "__main__":
    main()
