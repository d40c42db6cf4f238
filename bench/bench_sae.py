"""SAE costs: latents during a capture, top activations over a store, training throughput.

Run: ``.venv/bin/python bench/bench_sae.py [--shape gemma-270m] [--d-sae 16384] [--rows 131072]``

1. **Latents during a capture**: ``capture_latents`` (one forward recording the site, then one
   encoder matmul) against recording the same site alone (``record``), timed round-robin.
   Target ≤ 1.2×.
2. **Top activations**: ``top_activations`` over a zarr array of ``--rows`` rows
   (``d_model`` wide, 2048-row chunks, read through oculi's ``HarvestArray`` as a store serves
   it) against reading that array once in the same batches. Target ≤ 2×.
3. **Training**: tokens/s of ``oculi.sae.train`` (TopK, AuxK on) on in-memory rows (Gaussian,
   or a harvest store's with ``--store``), against sparsify's ``SparseCoder`` stepped as its
   ``Trainer`` steps it (first-batch-mean ``b_dec``, Adam, warm-up and linear decay, AuxK,
   unit-norm decoder; rows scaled to mean norm sqrt(d) as oculi scales them, or raw with
   ``--sparsify-raw``), alternating whole runs; then both SAEs' FVU on held-out rows (the
   same tokens seen). ``--saelens`` adds SAELens' own trainer (``SAETrainer.fit`` on a
   ``TopKTrainingSAE``). Needs the ``sae-compare`` extra. Targets ≥ 1.5× SAELens, ≥ 1.0×
   sparsify, FVU within 5%.
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


def _train_rows(adapter, args) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(train rows, held-out rows, where they came from)``: a harvest store's array
    (``--store``, rows in a seeded random order, the held-out rows drawn apart) or Gaussian
    rows."""
    n, held = args.train_rows, 16384
    if args.store:
        import oculi

        array = oculi.open_harvest(args.store)[args.site, args.layer]
        order = torch.randperm(array.shape[0], generator=torch.Generator().manual_seed(0))
        pick = np.sort(order[: n + held].numpy())
        rows = torch.from_numpy(np.asarray(array[:])[pick]).float()
        rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(1))]
        return rows[:n], rows[n:], f"{args.store} [{args.site}, {args.layer}]"
    x = torch.randn(n + held, adapter.d_model, generator=torch.Generator().manual_seed(0))
    return x[:n], x[n:], "Gaussian rows"


def _sparsify_run(x: torch.Tensor, args):
    """sparsify's training step as its ``Trainer`` runs it: ``b_dec`` at the first batch's
    mean, Adam at its default rate, linear warm-up and decay to 0, AuxK (1/32) on latents
    dead for ``dead_tokens``, the decoder kept at unit norm. Returns ``(coder, seconds)``."""
    from sparsify import SparseCoder, SparseCoderConfig

    d, batch = x.shape[1], 4096
    steps = len(x) // batch
    torch.manual_seed(0)
    coder = SparseCoder(d, SparseCoderConfig(num_latents=args.d_sae, k=32))
    lr = 2e-4 / (args.d_sae / 2**14) ** 0.5
    opt = torch.optim.Adam(coder.parameters(), lr=lr)
    warmup = min(1000, steps // 20)
    since = torch.zeros(args.d_sae, dtype=torch.long)
    t0 = time.perf_counter()
    with torch.no_grad():
        coder.b_dec.copy_(x[:batch].mean(0))
    for step in range(steps):
        for group in opt.param_groups:  # transformers' get_linear_schedule_with_warmup
            group["lr"] = lr * (
                (step + 1) / max(1, warmup) if step < warmup else (steps - step) / (steps - warmup)
            )
        rows = x[step * batch : (step + 1) * batch]
        out = coder(rows, dead_mask=since > args.dead_tokens)
        (out.fvu + out.auxk_loss / 32).backward()
        coder.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        coder.set_decoder_norm_to_unit_norm()
        since += rows.shape[0]
        since[out.latent_indices.flatten()] = 0
    return coder, time.perf_counter() - t0


def _held_out_fvu(encode_decode, held: torch.Tensor) -> float:
    with torch.no_grad():
        y = held.double()
        err = (y - encode_decode(held).double()).square().sum()
        return float(err / (y - y.mean(0)).square().sum())


def bench_train(adapter, args, report: Report) -> None:
    x, held, source = _train_rows(adapter, args)
    n = len(x)
    report.start(
        f"training (TopK k=32, d_sae={args.d_sae}, batch 4096, {n:,} rows of {source}, "
        f"{args.repeats} alternating runs each, fastest kept)"
    )

    def ours_run():
        t0 = time.perf_counter()
        sae = train(x, d_sae=args.d_sae, kind="topk", k=32, batch_rows=4096, progress=False,
                    dead_tokens=args.dead_tokens)  # fmt: skip
        return sae, time.perf_counter() - t0

    try:
        import sparsify  # noqa: F401
    except ImportError:
        print("sparsify not installed (pip install 'oculi[sae-compare]'): no comparison")
        sae, seconds = ours_run()
        report.fact("oculi.sae.train tokens/s", round(n / seconds))
        return
    # sparsify's Trainer feeds raw activations; scaled to mean norm sqrt(d) as oculi scales
    # them (FVU does not change with the scale), the comparison is of the training steps alone
    scale = x.shape[1] ** 0.5 / float(x.norm(dim=1).mean())
    scaled = x * scale if args.sparsify_scaled else x
    ours_s, theirs_s = [], []
    for _ in range(args.repeats):  # alternating, so both see the same load
        sae, seconds = ours_run()
        ours_s.append(seconds)
        coder, seconds = _sparsify_run(scaled, args)
        theirs_s.append(seconds)
    ours, theirs = n / min(ours_s), n / min(theirs_s)
    report.fact("oculi.sae.train tokens/s", round(ours), f"oculi.sae.train: {ours:,.0f} tokens/s "
                f"(runs: {', '.join(f'{t:.1f}' for t in ours_s)} s)")  # fmt: skip
    report.fact("sparsify step tokens/s", round(theirs), f"sparsify SparseCoder: {theirs:,.0f} "
                f"tokens/s (runs: {', '.join(f'{t:.1f}' for t in theirs_s)} s)")  # fmt: skip
    report.fact(
        "oculi / sparsify", round(ours / theirs, 3), f"oculi / sparsify = {ours / theirs:.2f}x"
    )
    ours_fvu = _held_out_fvu(sae.forward, held)
    theirs_fvu = _held_out_fvu(
        lambda h: coder(h * scale).sae_out / scale if args.sparsify_scaled else coder(h).sae_out,
        held,
    )
    report.fact("held-out FVU oculi", round(ours_fvu, 5), f"held-out FVU after {n:,} tokens: "
                f"oculi {ours_fvu:.4f}, sparsify {theirs_fvu:.4f} "
                f"(oculi / sparsify = {ours_fvu / theirs_fvu:.3f})")  # fmt: skip
    report.fact("held-out FVU sparsify", round(theirs_fvu, 5), "")
    if args.saelens:
        _saelens_train(x, args, ours, report)


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
    ap.add_argument("--store", default=None, help="train on this harvest store's rows")
    ap.add_argument("--site", default="resid_post")
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--dead-tokens", type=int, default=4096 * 16)
    ap.add_argument("--saelens", action="store_true", help="also time SAELens' trainer")
    ap.add_argument(
        "--sparsify-raw",
        dest="sparsify_scaled",
        action="store_false",
        help="feed sparsify raw rows (as its Trainer does) instead of rows at oculi's scale",
    )
    args = ap.parse_args()
    adapter = build_adapter(args, [TEXT])
    report = Report("bench_sae", args, adapter)
    parts = {"capture": bench_capture, "top": bench_top, "train": bench_train}
    for name in args.parts.split(","):
        parts[name.strip()](adapter, args, report)
    report.write()


if __name__ == "__main__":
    main()
