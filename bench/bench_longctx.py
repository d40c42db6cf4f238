"""Long contexts: attention patterns streamed to disk, against the forward and the disk's speed.

Run: ``.venv/bin/python bench/bench_longctx.py [--tokens 4096] [--layers 0,5] [--folder DIR]``

In one process, on Gemma 3 270M (CPU, float32):

1. the disk's sequential write speed, measured on the capture folder's file system (1 GiB
   written and ``fsync``-ed);
2. the plain decoder forward at ``--tokens`` tokens (the model's own sdpa attention, no
   capture), and the streamed capture of the patterns of ``--layers`` to a capture folder
   (attention a block of query positions at a time, each block written as it is computed).
   The issue's bar: the streamed capture costs at most 1.3x (the forward + the bytes written
   at the measured disk speed). The forward runs through the last layer captured (a capture
   stops there), the peak resident memory of the capture (sampled) is compared with the
   memory plan's estimate, which is what the limits below are computed from;
3. the largest context each site can be captured at on this machine: for every site, all
   layers, the largest ``T`` (up to the model's context, 32,768 tokens) the memory plan
   accepts with the machine's whole memory free, in memory and streamed to the folder's
   disk (its free space now). No forward runs for these.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import oculi  # noqa: E402
from common import _RssSampler  # noqa: E402
from oculi import CaptureConfig  # noqa: E402
from oculi.capture import memory, stream  # noqa: E402
from oculi.capture.inputs import Batch  # noqa: E402
from oculi.errors import MemoryPlanError  # noqa: E402

GIB = 2**30
SITES = ("pattern", "q", "k", "v", "z", "head_out", "resid_pre", "attn_out", "mlp_post")


def disk_write_speed(folder: Path, nbytes: int = GIB) -> float:
    """Bytes per second of a sequential write of ``nbytes`` (64 MiB chunks) and ``fsync``."""
    chunk = os.urandom(64 * 2**20)
    path = folder / ".bench-disk-speed"
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(nbytes // len(chunk)):
            os.write(fd, chunk)
        os.fsync(fd)
    finally:
        os.close(fd)
        path.unlink()
    return nbytes / (time.perf_counter() - t0)


def batch_of(t: int) -> Batch:
    ids = torch.zeros(1, t, dtype=torch.long)
    return Batch(ids, torch.ones_like(ids), torch.arange(t)[None], single=True)


def largest(fits, cap: int) -> int:
    """The largest ``t <= cap`` with ``fits(t)`` (0 if none), by bisection."""
    if fits(cap):
        return cap
    lo, hi = 0, cap
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def limits(adapter, folder: Path, ram: int, disk: int) -> list[dict]:
    cap = int(adapter.model.config.max_position_embeddings)
    every = tuple(range(adapter.n_layers))
    rows = []
    for site, layers in [*((s, every) for s in SITES), ("pattern", (5,))]:
        req = {site: layers}

        def in_memory(t: int, req=req) -> bool:
            try:
                memory.plan_capture(adapter, batch_of(t), req, free={"cpu": ram})
            except MemoryPlanError:
                return False
            return True

        def streamed(t: int, req=req) -> bool:
            try:
                stream.plan_stream(
                    adapter, batch_of(t), req, None, folder, free={"cpu": ram}, disk_free=disk
                )
            except MemoryPlanError:
                return False
            return True

        name = site if len(layers) > 1 else f"{site} (layer {layers[0]} only)"
        rows.append(
            {"site": name, "in_memory": largest(in_memory, cap), "streamed": largest(streamed, cap)}
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--layers", default="0,5", help="layers whose patterns are captured")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--folder", default=None, help="where the capture folder goes")
    parser.add_argument("--json", default="bench/results/bench_longctx-cpu-gemma-270m.jsonl")
    parser.add_argument("--limits-only", action="store_true", help="only the limits table")
    args = parser.parse_args()
    if args.limits_only:
        import psutil

        folder = Path(args.folder or tempfile.gettempdir())
        ram, disk = psutil.virtual_memory().total, shutil.disk_usage(folder).free
        print(f"{ram / GIB:.1f} GiB memory, {disk / GIB:.0f} GiB free disk")
        print("| site | in memory | streamed to disk |\n|---|---|---|")
        for row in limits(oculi.load(device="cpu", dtype="float32"), folder, ram, disk):
            print(f"| {row['site']} | {row['in_memory']} | {row['streamed']} |")
        return
    adapter = oculi.load(device="cpu", dtype="float32")
    layers = [int(x) for x in args.layers.split(",")]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 20000, (1, args.tokens), generator=gen)
    parent = Path(args.folder or tempfile.mkdtemp(prefix="oculi-longctx-"))
    target = parent / "capture"
    speed = disk_write_speed(parent)
    config = CaptureConfig(
        layers=layers, capture_queries=False, capture_keys=False, capture_values=False
    )
    body = adapter.model.model
    stop = adapter.layer_modules[max(layers)]

    def forward() -> None:  # the decoder through the last layer captured, as the capture runs
        class Stop(Exception):
            pass

        def halt(*_):
            raise Stop

        handle = stop.register_forward_hook(halt)
        try:
            with torch.no_grad():
                body(ids, use_cache=False)
        except Stop:
            pass
        finally:
            handle.remove()

    def capture() -> None:
        adapter.capture(ids, config, stream_to=target)

    plan = stream.plan_stream(
        adapter, adapter.prepare(ids, None), {"pattern": tuple(layers)}, None, parent
    )
    forward()  # warm up
    times: dict[str, list[float]] = {"forward": [], "capture": []}
    peak = 0
    for _ in range(args.repeats):
        for name, fn in (("forward", forward), ("capture", capture)):
            if name == "capture":
                shutil.rmtree(target, ignore_errors=True)
            t0 = time.perf_counter()
            with _RssSampler() as rss:
                fn()
            times[name].append(time.perf_counter() - t0)
            if name == "capture":
                peak = max(peak, rss.peak - rss.start)
    written = sum(f.stat().st_size for f in target.iterdir())
    fwd, cap = min(times["forward"]), min(times["capture"])
    bar = fwd + written / speed
    print(
        f"Gemma 3 270M, 1 x {args.tokens} tokens, patterns of layers {layers}, "
        f"{torch.get_num_threads()} threads; folder on {parent}"
    )
    print(f"disk write speed           {speed / 2**20:8.0f} MiB/s (1 GiB, fsync)")
    print(f"forward (through layer {max(layers)})  {fwd:8.2f} s")
    print(
        f"patterns written           {written / GIB:8.2f} GiB ({written / speed:.2f} s at that speed)"
    )
    print(
        f"streamed capture           {cap:8.2f} s = {cap / bar:.2f}x (forward + bytes at disk speed)"
    )
    print(
        f"peak memory of the capture {peak / 2**20:8.0f} MiB (plan's estimate "
        f"{plan.need['cpu'] / 2**20:.0f} MiB; the patterns alone {plan.disk / 2**20:.0f} MiB)"
    )
    import psutil

    ram = psutil.virtual_memory().total
    disk = shutil.disk_usage(parent).free
    table = limits(adapter, parent, ram, disk)
    print(
        f"\nlargest context per site, every layer, Gemma 3 270M float32 (model context 32768), "
        f"{ram / GIB:.1f} GiB memory, {disk / GIB:.0f} GiB free disk:"
    )
    print("| site | in memory | streamed to disk |\n|---|---|---|")
    for row in table:
        print(f"| {row['site']} | {row['in_memory']} | {row['streamed']} |")
    shutil.rmtree(parent if args.folder is None else target, ignore_errors=True)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as fh:
        record = {
            "tokens": args.tokens,
            "layers": layers,
            "disk_mib_s": speed / 2**20,
            "forward_s": fwd,
            "capture_s": cap,
            "written_bytes": written,
            "ratio": cap / bar,
            "peak_mib": peak / 2**20,
            "plan_mib": plan.need["cpu"] / 2**20,
        }
        fh.write(json.dumps(record) + "\n")
        for row in table:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
