"""Harvest throughput, shuffled-read throughput and Ray scaling, on Gemma 3 270M.

Run: ``.venv/bin/python bench/bench_harvest.py [--prompts 120] [--layers 0,5] [--ray]``

1. Harvest tokens/s against two bare loops over the same prompts, timed round-robin in one
   process: ``capture_residual`` over the very batches the harvest forms (same packing, same
   padding: what is left is the cost of storing) and ``capture_residual`` one prompt at a time.
2. Read throughput of ``store.shuffled`` over one epoch of a 1.3 GB store written just before
   (MB of array data served per second; the store is in the page cache after being written).
3. With ``--ray``: the same harvest on a local Ray instance with 1 and then 2 actors
   (``num_cpus=1`` each), the per-unit times from the unit log, and the scaling model of
   :mod:`oculi.harvest.distributed` fitted on the 1-actor run and checked on the 2-actor run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import oculi
from oculi.harvest.compute import pack_batches, unit_segments
from oculi.harvest.plan import HarvestConfig, make_plan
from oculi.harvest.prompts import tokenize

TEXT = (
    "the eiffel tower is located in the city of paris which is the capital of france many "
    "tourists visit it every year climbing its stairs or taking the lift to the top where "
    "the view over the river and the old streets is wide and clear on a sunny day while "
    "in winter the fog hides the roofs and the lights of the boats drift under the bridges"
)
WORDS = TEXT.split()


def make_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` prompts of 20-90 words drawn from a fixed text (about 25-110 tokens each)."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(20, 90))).capitalize() + "." for _ in range(n)]


def fastest(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Fastest wall time of each function, timed round-robin."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: min(v) for k, v in times.items()}


def bench_harvest(adapter, prompts, layers, batch_tokens, repeats, out: Path, units) -> None:
    config = oculi.ResidualConfig(
        layers=layers, capture_pre_attn=False, capture_post_attn=False, capture_pre_mlp=False
    )
    tokens = tokenize(adapter.tokenizer, prompts, max_length=None, max_positions=None)
    cfg = HarvestConfig(
        ("resid_post",), tuple(layers), batch_tokens, chunk_rows=units[0], unit_rows=units[1]
    )
    plan = make_plan(adapter, cfg, tokens)
    batches = []  # the harvest's own forward passes: per unit, its prompts packed the same way
    for unit in plan.units():
        segs = unit_segments(tokens, unit)
        lengths = {p: len(tokens.prompt(p)) for p, _, _ in segs}
        for group in pack_batches(lengths, batch_tokens):
            width = lengths[group[0]]
            ids = torch.zeros((len(group), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for b, p in enumerate(group):
                ids[b, : lengths[p]] = torch.from_numpy(tokens.prompt(p).astype(np.int64))
                mask[b, : lengths[p]] = 1
            batches.append((ids, mask))

    def harvest():
        return oculi.harvest(adapter, prompts, sites="resid_post", layers=layers, out=out,
                             batch_tokens=batch_tokens, chunk_rows=units[0], unit_rows=units[1],
                             resume=False, progress=False)  # fmt: skip

    def same_batches():
        for ids, mask in batches:
            adapter.capture_residual(ids, config, attention_mask=mask)

    def per_prompt():
        for p in prompts:
            adapter.capture_residual(p, config)

    t = fastest(
        {"harvest": harvest, "same_batches": same_batches, "per_prompt": per_prompt}, repeats
    )
    n = tokens.n_tokens
    store = oculi.open_harvest(out)
    print(f"\n### Harvest: {len(prompts)} prompts, {n} tokens, resid_post at layers {layers}, "
          f"batch_tokens={batch_tokens}, units of {plan.unit_rows} rows, {store.nbytes / 2**20:.0f} MB\n")  # fmt: skip
    print("| what | seconds | tokens/s | harvest / this |\n| --- | ---: | ---: | ---: |")
    for name, label in (("harvest", "`oculi.harvest` (tokenise, forward, gather, write, commit)"),
                        ("same_batches", "bare `capture_residual` loop, the harvest's batches"),
                        ("per_prompt", "bare `capture_residual` loop, one prompt at a time")):  # fmt: skip
        print(f"| {label} | {t[name]:.2f} | {n / t[name]:,.0f} | {t[name] / t['harvest']:.2f}× |")


def bench_read(out: Path, rows: int, width: int = 640) -> None:
    """One shuffled epoch over a store of ``rows`` x ``width`` fp32 rows (written here with
    arbitrary numbers through the harvest writer: reading does not care where rows came from)."""
    from oculi.harvest.plan import ArraySpec, HarvestPlan
    from oculi.harvest.prompts import Tokens
    from oculi.harvest.run import write_index
    from oculi.harvest.writer import FORMAT, StoreWriter, write_unit

    lengths = np.full(rows // 128, 128)
    tokens = Tokens(np.zeros(rows, dtype=np.int32), np.concatenate([[0], np.cumsum(lengths)]))
    config = HarvestConfig(("resid_post",), (0,), 8192)
    plan = HarvestPlan(config, (ArraySpec("resid_post", 0, width),), rows, 1024, 16384, 4)
    manifest = {"format": FORMAT, "config": {**config.to_json(), "chunk_rows": 1024,
                "unit_rows": 16384, "arrays": [{"site": "resid_post", "layer": 0, "width": width,
                "heads": None, "name": "resid_post/0"}]}, "model": {},
                "tokens": {"n_tokens": rows, "n_prompts": len(lengths)}}  # fmt: skip
    labels = np.full(len(lengths), "train", dtype=object)
    block = np.random.default_rng(0).standard_normal((16384, width)).astype(np.float32)
    with StoreWriter.create_or_resume(
        out, plan, manifest, lambda p: write_index(p, tokens, labels), resume=False
    ) as writer:
        for unit in plan.units():
            writer.commit(write_unit(out, plan, unit, {"resid_post/0": block[: unit.rows]}))
    store = oculi.open_harvest(out)
    print(f"\n### Shuffled reads: {rows} rows x {width} fp32 = {store.nbytes / 2**20:.0f} MB, "
          "1024-row (2.5 MB) chunks, from the page cache\n")  # fmt: skip
    print("| window | batch_rows | seconds per epoch | MB/s |\n| ---: | ---: | ---: | ---: |")
    for window, batch in ((256 << 20, 4096), (128 << 20, 4096), (64 << 20, 4096), (128 << 20, 512)):
        t0 = time.perf_counter()
        served = sum(
            b.arrays[("resid_post", 0)].nbytes
            for b in store.shuffled(0, batch, window_bytes=window)
        )
        dt = time.perf_counter() - t0
        print(f"| {window >> 20} MB | {batch} | {dt:.2f} | **{served / 2**20 / dt:,.0f}** |")


def bench_ray(adapter, prompts, layers, batch_tokens, out: Path, units, free_cores: int) -> None:
    import ray

    from oculi.harvest import RayExecutor

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    source = adapter.model.name_or_path
    kw = dict(
        sites="resid_post",
        layers=layers,
        batch_tokens=batch_tokens,
        progress=False,
        chunk_rows=units[0],
        unit_rows=units[1],
    )
    oculi.harvest(adapter, prompts, out=out / "local", **kw)
    d = time.perf_counter()
    oculi.harvest(adapter, prompts, out=out / "local", **kw)  # all committed: driver work only
    driver = time.perf_counter() - d
    runs = {}
    for n in (1, 2):
        t0 = time.perf_counter()
        s = oculi.harvest(adapter, prompts, out=out / f"ray{n}", resume=False,
                          executor=RayExecutor(model=source, concurrency=n), **kw)  # fmt: skip
        wall = time.perf_counter() - t0
        recs = [json.loads(x) for x in (out / f"ray{n}" / "units.jsonl").read_text().splitlines()]
        runs[n] = (wall, recs, s)
    ray.shutdown()
    wall1, recs1, s1 = runs[1]
    unit1 = [r["seconds"] for r in recs1]
    startup = wall1 - sum(unit1) - driver
    c = float(np.mean(unit1))
    print(f"\n### Ray: {s1.tokens} tokens in {s1.units} units, local Ray, 1 CPU per actor\n")
    print("| actors | wall s | per unit s (mean) | busiest actor s | start-up s (wall - busiest - d) "
          "| predicted, P = N | predicted, P = free cores | tokens/s |\n"
          "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")  # fmt: skip
    for n, (wall, recs, s) in runs.items():
        per_worker: dict[str, float] = {}
        for r in recs:
            per_worker[r["worker"]] = per_worker.get(r["worker"], 0.0) + r["seconds"]
        busiest = max(per_worker.values())
        waves = -(-len(recs) // n)
        ideal = startup + waves * c + driver  # every actor has its own core or GPU
        slow = n / min(n, free_cores)  # actors sharing cores: loads and units slow down alike
        shared = startup * slow + waves * c * slow + driver
        print(f"| {n} | {wall:.1f} | {np.mean([r['seconds'] for r in recs]):.2f} | {busiest:.1f} "
              f"| {wall - busiest - driver:.1f} | {ideal:.1f} | {shared:.1f} | {s.tokens / wall:,.0f} |")  # fmt: skip
    print(f"\nFitted on 1 actor: start-up S = {startup:.1f} s, c_U + w_U = {c:.2f} s per unit, "
          f"driver d = {driver:.2f} s.")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--prompts", type=int, default=120)
    parser.add_argument("--layers", default="0,5")
    parser.add_argument("--batch-tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-rows", type=int, default=256)
    parser.add_argument("--unit-rows", type=int, default=512)
    parser.add_argument("--read-rows", type=int, default=1 << 19, help="rows of the read bench")
    parser.add_argument("--skip-harvest", action="store_true")
    parser.add_argument("--free-cores", type=int, default=1,
                        help="cores Ray actors really get (P in the scaling model)")  # fmt: skip
    parser.add_argument("--ray", action="store_true", help="also run the Ray 1- vs 2-actor runs")
    args = parser.parse_args()
    adapter = oculi.load(args.model, device="cpu")
    prompts = make_prompts(args.prompts)
    layers = [int(x) for x in args.layers.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="bench_harvest_"))
    try:
        units = (args.chunk_rows, args.unit_rows)
        if not args.skip_harvest:
            bench_harvest(
                adapter, prompts, layers, args.batch_tokens, args.repeats, tmp / "store", units
            )
        if args.read_rows:
            bench_read(tmp / "read", args.read_rows)
        if args.ray:
            bench_ray(adapter, prompts, layers, args.batch_tokens, tmp, units, args.free_cores)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
