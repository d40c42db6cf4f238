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
* ACDC: the batched exact algorithm against one forward per tested edge at
  ``--acdc-level`` (the two must return the same circuit; the script checks it), and at
  ``--level`` the batched one alone with its forward count.
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

    acdc_graph = discovery.Graph.from_adapter(adapter, args.acdc_level)
    report.start(
        f"ACDC, threshold {args.threshold}, {len(acdc_graph.edges)} edges ({args.acdc_level})"
    )
    kw = dict(metric=metric, threshold=args.threshold, progress=False)
    start = time.perf_counter()
    fast = discovery.acdc(adapter, acdc_graph, CLEAN, CORRUPT, **kw)
    fast_s = time.perf_counter() - start
    start = time.perf_counter()
    slow = discovery.acdc(adapter, acdc_graph, CLEAN, CORRUPT, speculate=False, **kw)
    slow_s = time.perf_counter() - start
    same = fast.info["kept"] == slow.info["kept"]
    ref = Measurement("one forward per tested edge", slow_s, float("nan"))
    report.add(ref, ref, note=f"{slow.info['forwards']} forwards")
    report.add(
        Measurement("batched exact (oculi)", fast_s, float("nan")),
        ref,
        note=f"{fast.info['forwards']} forwards; same circuit: {same}",
    )
    report.fact("acdc_same_circuit", same)
    report.fact("acdc_circuit_edges", len(fast.info["kept"]))
    if args.acdc_level != args.level:
        start = time.perf_counter()
        big = discovery.acdc(adapter, graph, CLEAN, CORRUPT, **kw)
        big_s = time.perf_counter() - start
        report.start(f"ACDC, threshold {args.threshold}, {len(graph.edges)} edges ({args.level})")
        report.add(
            Measurement("batched exact (oculi)", big_s, float("nan")),
            None,
            note=f"{big.info['forwards']} batched forwards for {big.info['tested']} edge tests, "
            f"{len(big.info['kept'])} edges kept",
        )
        report.fact("acdc_forwards", big.info["forwards"])
    report.write()


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
