"""SAE costs: latents during a capture, top activations over a store, training throughput.

Run: ``.venv/bin/python bench/bench_sae.py [--shape gemma-270m] [--d-sae 16384] [--rows 131072]``

1. **Latents during a capture**: ``capture_latents`` (one forward recording the site, then one
   encoder matmul) against recording the same site alone (``record``), timed round-robin.
   Target ≤ 1.2×.
2. **Top activations**: ``top_activations`` over a zarr array of ``--rows`` rows
   (``d_model`` wide, 2048-row chunks, read through oculi's ``HarvestArray`` as a store serves
   it) against reading that array once in the same batches. Target ≤ 2×.
3. **Training throughput**: tokens/s of ``oculi.sae.train`` (TopK, AuxK on) on in-memory rows,
   against SAELens' own trainer (``SAETrainer.fit`` on a ``TopKTrainingSAE``, the rows fed as
   its data provider) and the same step written with sparsify's own ``SparseCoder`` (its
   fused encoder, forward with the dead mask, its decoder-norm methods, Adam), when the
   ``sae-compare`` extra is installed. Targets ≥ 1.5× SAELens, ≥ 1.0× sparsify.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import Report, add_run_args, build_adapter, measure_all  # noqa: E402
from oculi.capture.engine import record  # noqa: E402
from oculi.sae import SAE, capture_latents, top_activations, train  # noqa: E402

TEXT = "the cat sat on the mat and the dog ran to the park while the sun was warm " * 20


def bench_capture(adapter, args, report: Report) -> None:
    layer = adapter.n_layers // 2
    sae = SAE(adapter.d_model, args.d_sae, "topk", k=32, site="resid_post", layer=layer)
    sae = sae.init_weights(0).to(adapter.device).requires_grad_(False)
    ids = adapter.prepare([TEXT] * args.batch).input_ids[:, : args.tokens]
    batch = adapter.prepare(ids)
    rows = measure_all(
        [
            (
                "record resid_post (the site alone)",
                lambda: record(adapter, batch, {"resid_post": [layer]}),
            ),
            (f"capture_latents, d_sae={args.d_sae}", lambda: capture_latents(adapter, ids, sae)),
        ],
        repeats=args.repeats,
        device=adapter.device,
    )
    report.start(f"latents during a capture ({args.batch} x {ids.shape[1]} tokens)")
    report.add(rows[0])
    report.add(rows[1], rows[0], "target <= 1.2x")


class _Store(dict):
    """A store of one array: ``store["resid_post", layer]`` (what top_activations reads)."""


def bench_top(adapter, args, report: Report) -> None:
    import zarr

    from oculi.harvest.store import HarvestArray

    d = adapter.d_model
    with tempfile.TemporaryDirectory() as tmp:
        z = zarr.create_array(f"{tmp}/a", shape=(args.rows, d), chunks=(2048, d), dtype="float32")
        g = np.random.default_rng(0)
        for i in range(0, args.rows, 16384):
            z[i : i + 16384] = g.standard_normal((min(16384, args.rows - i), d), dtype=np.float32)
        store = _Store({("resid_post", 0): HarvestArray(z, "resid_post", 0, None)})
        sae = SAE(d, args.d_sae, "topk", k=32, site="resid_post", layer=0).init_weights(0)
        sae.requires_grad_(False)

        def read_once():
            for i in range(0, args.rows, 4096):
                np.asarray(store["resid_post", 0][i : i + 4096])

        rows = measure_all(
            [
                ("read the array once (4096-row batches)", read_once),
                (
                    f"top_activations, k=16, d_sae={args.d_sae}",
                    lambda: top_activations(store, sae, k=16),
                ),
            ],
            repeats=max(1, args.repeats // 2),
            warmup=0,
        )
    report.start(f"top activations over {args.rows:,} rows x {d}")
    report.add(rows[0])
    report.add(rows[1], rows[0], "target <= 2x")


def bench_train(adapter, args, report: Report) -> None:
    d = adapter.d_model
    n = args.train_rows
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    train(x, d_sae=args.d_sae, kind="topk", k=32, batch_rows=4096, lr=1e-3, progress=False,
          dead_tokens=4096)  # fmt: skip
    ours = n / (time.perf_counter() - t0)
    report.start(f"training throughput (TopK k=32, d_sae={args.d_sae}, batch 4096, {n:,} rows)")
    report.fact("oculi.sae.train tokens/s", round(ours), f"oculi.sae.train: {ours:,.0f} tokens/s")
    _saelens_train(x, args, ours, report)
    try:
        from sparsify import SparseCoder, SparseCoderConfig
    except ImportError:
        print("sparsify not installed (pip install 'oculi[sae-compare]'): no comparison")
        return
    coder = SparseCoder(d, SparseCoderConfig(num_latents=args.d_sae, k=32))
    opt = torch.optim.Adam(coder.parameters(), lr=1e-3)
    since = torch.zeros(args.d_sae, dtype=torch.long)
    t0 = time.perf_counter()
    for i in range(0, n - 4095, 4096):
        batch = x[i : i + 4096]
        out = coder(batch, dead_mask=since > 4096)
        (out.fvu + out.auxk_loss / 32).backward()
        coder.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        coder.set_decoder_norm_to_unit_norm()
        since += batch.shape[0]
        since[out.latent_indices.flatten()] = 0
    theirs = n / (time.perf_counter() - t0)
    report.fact(
        "sparsify step tokens/s",
        round(theirs),
        f"sparsify SparseCoder step: {theirs:,.0f} tokens/s",
    )
    report.fact(
        "oculi / sparsify", round(ours / theirs, 3), f"oculi / sparsify = {ours / theirs:.2f}x"
    )


def _saelens_train(x: torch.Tensor, args, ours: float, report: Report) -> None:
    """SAELens' own trainer (``SAETrainer.fit``, TopK, AuxK on) on the same rows and batch."""
    try:
        from sae_lens.config import SAETrainerConfig
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.training.sae_trainer import SAETrainer
    except ImportError:
        print("sae-lens not installed (pip install 'oculi[sae-compare]'): no comparison")
        return
    n, d = x.shape
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=args.d_sae, k=32))
    cfg = SAETrainerConfig(total_training_samples=n, train_batch_size_samples=4096, lr=1e-3,
                           lr_end=1e-3, n_batches_for_norm_estimate=1)  # fmt: skip
    batches = (x[i : i + 4096] for i in range(0, n - 4095, 4096))
    t0 = time.perf_counter()
    SAETrainer(cfg, sae, batches).fit()
    theirs = n / (time.perf_counter() - t0)
    report.fact("SAELens SAETrainer tokens/s", round(theirs),
                f"SAELens SAETrainer.fit: {theirs:,.0f} tokens/s")  # fmt: skip
    report.fact(
        "oculi / SAELens", round(ours / theirs, 3), f"oculi / SAELens = {ours / theirs:.2f}x"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(ap, repeats=5)
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rows", type=int, default=131072)
    ap.add_argument("--train-rows", type=int, default=65536)
    ap.add_argument("--parts", default="capture,top,train", help="which measurements to run")
    args = ap.parse_args()
    adapter = build_adapter(args, [TEXT])
    report = Report("bench_sae", args, adapter)
    parts = {"capture": bench_capture, "top": bench_top, "train": bench_train}
    for name in args.parts.split(","):
        parts[name.strip()](adapter, args, report)
    report.write()


if __name__ == "__main__":
    main()
