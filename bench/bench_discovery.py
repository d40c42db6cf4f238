"""Circuit discovery on Gemma 3 270M at the IOI task: cost as ratios to plain forward+backward.

Run: ``.venv/bin/python bench/bench_discovery.py [--repeats 3] [--level heads]
[--acdc-level components] [--shape tiny]`` (shared options: ``bench/common.py``).

* Baselines: one forward and one backward of the clean and corrupt prompts together (a [2, T]
  batch, the logit difference summed), plain Hugging Face, no hooks: ``loss.backward()`` as a
  user writes it (every parameter's gradient, all logits), and a lean one (the decoder, the two
  answer logits, ``autograd.grad`` with respect to the embeddings only: no parameter
  gradients), the least a gradient method can cost.
* EAP over every edge of the graph (everything ``eap()`` does: the clean and corrupt runs,
  one forward and backward with a gradient at every receiver, the scores).
* EAP-IG with 5 steps (the five points as copies of one forward and backward).
* ACDC: the batched exact algorithm against one forward per edge test: the plain Hugging Face
  forward times the number of edges, and oculi's sequential reference (``speculate=False``)
  at ``--acdc-level`` (and at ``--level`` with ``--reference``); the two must return the same
  circuit, the script checks it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import Measurement, Report, add_run_args, build_adapter, measure_all  # noqa: E402
from oculi import discovery, patching  # noqa: E402

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(parser, repeats=3)
    parser.add_argument("--level", default="heads", choices=["components", "heads", "qkv"])
    parser.add_argument(
        "--acdc-level", default="components", choices=["components", "heads", "qkv"]
    )
    parser.add_argument("--threshold", type=float, default=0.05)
    parser.add_argument("--only-gradients", action="store_true", help="EAP and EAP-IG only")
    parser.add_argument(
        "--reference",
        action="store_true",
        help="also run the sequential reference at --level (long: one forward per edge)",
    )
    args = parser.parse_args(argv)
    adapter = build_adapter(args, [CLEAN, CORRUPT, " Mary", " John"])
    report = Report("bench_discovery", args, adapter)
    metric = patching.logit_diff(" Mary", " John")
    graph = discovery.Graph.from_adapter(adapter, args.level)
    batch = adapter.prepare([CLEAN, CORRUPT])
    a, b = (adapter.to_single_token(t) for t in (" Mary", " John"))

    def plain() -> None:
        logits = adapter.model(**batch.model_kwargs()).logits[:, -1]
        (logits[:, a] - logits[:, b]).sum().backward()
        adapter.model.zero_grad(set_to_none=True)

    w_u = adapter.unembedding()[0][[a, b]].detach()

    def lean() -> object:
        embeds = adapter.module(adapter.anatomy.embed)(batch.input_ids).detach().requires_grad_()
        kw = {k: v for k, v in batch.model_kwargs().items() if k != "input_ids"}
        hidden = adapter.decoder(inputs_embeds=embeds, **kw).last_hidden_state[:, -1]
        logits = hidden @ w_u.T
        return torch.autograd.grad((logits[:, 0] - logits[:, 1]).sum(), [embeds])

    def run_eap() -> object:
        return discovery.eap(adapter, graph, CLEAN, CORRUPT, metric=metric)

    def run_ig() -> object:
        return discovery.eap_ig(adapter, graph, CLEAN, CORRUPT, metric=metric, steps=5)

    report.start(f"EAP and EAP-IG over all {len(graph.edges)} edges ({args.level})")
    base, lean_m, eap_m, ig_m = measure_all(
        [
            ("HF forward+backward, clean+corrupt", plain),
            ("lean forward+backward (no param grads)", lean),
            ("eap", run_eap),
            ("eap_ig, 5 steps", run_ig),
        ],
        repeats=args.repeats,
        device=adapter.device,
    )
    report.add(base, base)
    report.add(lean_m, base)
    report.add(eap_m, base, note=f"{eap_m.seconds / lean_m.seconds:.2f}x the lean pass")
    report.add(ig_m, base, note=f"{ig_m.seconds / lean_m.seconds:.2f}x the lean pass")
    if args.only_gradients:
        report.write()
        return

    _bench_acdc(args, adapter, report, metric)
    report.write()


def _bench_acdc(args, adapter, report, metric) -> None:
    """ACDC against one forward per edge test, two ways, with the plain forward timed
    round-robin between the runs (the machine's load then weighs on both alike):

    * the plain Hugging Face forward of the prompt (every logit), once per edge of the graph:
      what an implementation that tests each edge with a model call costs;
    * ``speculate=False``: oculi's own sequential reference (one lean forward per edge: the
      decoder and the two answer logits), which must return the same circuit.
    """
    kw = dict(metric=metric, threshold=args.threshold, progress=False)
    batch = adapter.prepare(CLEAN)

    def hf_forward() -> None:
        with torch.no_grad():
            adapter.model(**batch.model_kwargs())

    forward_times: list[float] = []

    def timed(fn):
        forward_times.append(measure_all([("f", hf_forward)], repeats=3)[0].seconds)
        start = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - start
        forward_times.append(measure_all([("f", hf_forward)], repeats=3)[0].seconds)
        return out, seconds

    levels = [args.acdc_level] + ([args.level] if args.level != args.acdc_level else [])
    for level in levels:
        graph = discovery.Graph.from_adapter(adapter, level)
        e = len(graph.edges)
        report.start(f"ACDC, threshold {args.threshold}, {e} edges ({level})")
        fast, fast_s = timed(lambda g=graph: discovery.acdc(adapter, g, CLEAN, CORRUPT, **kw))
        reference = level == args.acdc_level or args.reference
        if reference:
            slow, slow_s = timed(
                lambda g=graph: discovery.acdc(adapter, g, CLEAN, CORRUPT, speculate=False, **kw)
            )
        fwd = min(forward_times)
        naive = Measurement(f"HF forward x {e} edges", fwd * e, float("nan"))
        report.add(naive, naive, note=f"one forward {fwd * 1e3:.0f} ms")
        if reference:
            same = fast.info["kept"] == slow.info["kept"]
            ref = Measurement("oculi one lean forward per edge", slow_s, float("nan"))
            report.add(ref, naive, note=f"{slow.info['forwards']} forwards")
            report.fact(f"acdc_same_circuit_{level}", same)
        note = (
            f"{fast.info['forwards']} batched forwards of {fast.info['rows']} edge sets; "
            f"{len(fast.info['kept'])} edges kept"
        )
        if reference:
            note += f"; {slow_s / fast_s:.1f}x faster than the lean reference, same circuit: {same}"
        report.add(Measurement("batched exact (oculi)", fast_s, float("nan")), naive, note=note)
        report.fact(f"acdc_speedup_vs_hf_forward_per_edge_{level}", round(fwd * e / fast_s, 2))
        report.fact(f"acdc_circuit_edges_{level}", len(fast.info["kept"]))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
