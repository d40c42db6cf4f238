"""Patching sweeps on Gemma 3 270M: oculi against the naive batched sweep, in one run.

Run: ``.venv/bin/python bench/bench_patching.py [--repeats 3]``

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
import oculi  # noqa: E402
from common import exec_with_mmap_allocations, header, measure  # noqa: E402
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
    out = torch.zeros(len(layers), t)
    batch = corrupt_ids.repeat(t, 1)
    rows = torch.arange(t)
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
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(samples, len(positions), adapter.d_model, generator=gen) * sigma
    batch = ids.repeat(samples, 1)

    def add_noise(_m, _a, out):
        out = out.clone()
        out[:, positions] += noise.to(out.dtype)
        return out

    n, t = len(layers), ids.shape[1]
    out = torch.zeros(n, t)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--only", choices=["sweep", "tracing", "generate"], default=None)
    parser.add_argument(
        "--exact-rss",
        action="store_true",
        help="serve every allocation over 64 kB by mmap, so peak MB is exact; times then "
        "include page faults of every intermediate tensor, so take times from a plain run",
    )
    args = parser.parse_args()
    if args.exact_rss:
        exec_with_mmap_allocations()
    adapter = oculi.load(args.model)
    print(f"model: {adapter}\ntorch {torch.__version__}, threads {torch.get_num_threads()}")

    if args.only in (None, "sweep"):
        bench_sweep(adapter, args)
    if args.only in (None, "tracing"):
        bench_tracing(adapter, args)
    if args.only in (None, "generate"):
        bench_generate(adapter, args)


def bench_generate(adapter, args) -> None:
    from oculi.intervention import InterventionContext, SteeringVector

    ids = adapter.prepare(FACT)
    vector = SteeringVector.from_contrast(
        adapter,
        positive=["I love this, it is wonderful"],
        negative=["I hate this, it is awful"],
        layer=6,
        coefficient=4.0,
    )
    kwargs = dict(
        input_ids=ids.input_ids,
        attention_mask=ids.attention_mask,
        max_new_tokens=32,
        do_sample=False,
        min_new_tokens=32,
    )
    print(header("greedy generation, 32 new tokens"))

    def plain():
        with torch.no_grad():
            return adapter.model.generate(**kwargs)

    def steered():
        with InterventionContext(adapter, [vector]), torch.no_grad():
            return adapter.model.generate(**kwargs)

    base = measure("model.generate", plain, repeats=args.repeats)
    print(base.row(base))
    ours = measure("generate, SteeringVector on every step", steered, repeats=args.repeats)
    print(ours.row(base))
    changed = int((plain() != steered()).any(0).sum())
    print(
        f"\n{changed} of {plain().shape[1]} positions differ with the vector (coefficient 4, layer 6)"
    )


def bench_sweep(adapter, args) -> None:
    clean_ids = adapter.prepare(CLEAN).input_ids
    corrupt_ids = adapter.prepare(CORRUPT).input_ids
    correct, wrong = adapter.to_single_token(" Mary"), adapter.to_single_token(" John")
    metric = patching.logit_diff(" Mary", " John")
    t = clean_ids.shape[1]
    print(header(f"IOI resid_pre sweep, {adapter.n_layers} layers x {t} positions"))
    naive = measure(
        "naive batched sweep (full logits)",
        lambda: naive_resid_pre_sweep(adapter, clean_ids, corrupt_ids, correct, wrong),
        repeats=args.repeats,
        warmup=0,
    )
    print(naive.row(naive))
    fast = measure(
        "oculi activation_patching",
        lambda: patching.activation_patching(
            adapter, CLEAN, CORRUPT, site="resid_pre", metric=metric, progress=False
        ),
        repeats=args.repeats,
        warmup=1,
    )
    print(fast.row(naive), f"  speed-up {naive.seconds / fast.seconds:.1f}x")
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
            lambda: patching.activation_patching(
                adapter, CLEAN, CORRUPT, site="resid_pre", metric=metric, progress=False
            ),
            repeats=args.repeats,
            warmup=1,
        )
    finally:
        activation._no_op_mask = skip
    print(every.row(naive), f"  speed-up {naive.seconds / every.seconds:.1f}x")
    diff = (
        (
            naive_resid_pre_sweep(adapter, clean_ids, corrupt_ids, correct, wrong)
            - patching.activation_patching(
                adapter, CLEAN, CORRUPT, site="resid_pre", metric=metric, progress=False
            ).values
        )
        .abs()
        .max()
    )
    print(f"\nmax |naive - oculi| = {float(diff):.2e}")
    atp = measure(
        "oculi attribution_patching (approximate)",
        lambda: patching.attribution_patching(
            adapter, CLEAN, CORRUPT, site="resid_pre", metric=metric
        ),
        repeats=args.repeats,
    )
    print(atp.row(naive))


def bench_tracing(adapter, args) -> None:
    ids = adapter.prepare(FACT).input_ids
    positions = patching.subject_positions(adapter, FACT, SUBJECT)
    sigma = 3.0 * patching.tracing.embedding_std(adapter)
    target = adapter.to_single_token(TARGET)
    print(header(f"causal tracing, {ids.shape[1]} tokens, {args.samples} noise samples"))
    t0 = time.perf_counter()
    naive_ct = naive_causal_tracing(adapter, ids, positions, target, args.samples, sigma)
    naive_s = time.perf_counter() - t0
    results: list[patching.TracingResult] = []  # the timed run's result, compared below
    ours = measure(
        "oculi causal_tracing",
        lambda: results.append(
            patching.causal_tracing(
                adapter, FACT, SUBJECT, TARGET, samples=args.samples, progress=False
            )
        ),
        repeats=1,
        warmup=0,
    )
    print(
        f"| {'naive loop (per layer x position)':<44} | {naive_s * 1e3:9.1f} |  1.00x |        - |"
    )
    print(ours.row(type(ours)("", naive_s, 0.0)), f"  speed-up {naive_s / ours.seconds:.1f}x")
    res = results[0]
    print(
        f"\nclean p={res.clean_prob:.3f}, corrupt p={res.corrupt_prob:.3f}; grid {tuple(res.values.shape)}; "
        f"max |naive - oculi| = {float((naive_ct - res.values).abs().max()):.2e}"
    )


if __name__ == "__main__":
    main()
