"""``python -m oculi.harvest``: harvest activations from the command line.

Example::

    python -m oculi.harvest --prompts prompts.jsonl --sites resid_post --layers 0-17 --out acts
    python -m oculi.harvest --prompts prompts.jsonl --sites resid_post,mlp_out --layers 0-5,9 \\
        --out /shared/acts --executor ray --address auto --concurrency 8 --num-gpus 1

A thin layer over :func:`oculi.harvest`: arguments are parsed and passed on, the summary is
printed (``--json`` for one JSON object). Re-running the same command resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict

EXAMPLE = (
    "example: python -m oculi.harvest --prompts prompts.jsonl --sites resid_post "
    "--layers 0-17 --out acts [--executor ray --address auto]"
)


def parse_layers(spec: str) -> list[int] | None:
    """``"0-17"``, ``"0,3,5"``, ``"0-5,9"``, ``"-1"`` or ``"all"`` -> layer indices (None: all).

    Raises:
        ValueError: a part that is not an int or a ``a-b`` range with ``a <= b``.
    """
    if spec.strip() == "all":
        return None
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-") if not part.startswith("-") else (part, "", "")
        try:
            if sep:
                a, b = int(lo), int(hi)
                if a > b:
                    raise ValueError
                out.extend(range(a, b + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise ValueError(
                f"bad layer spec {part!r} in --layers {spec!r}: use ints and ranges like "
                "'0-17', '0,3,5', '0-5,9', or 'all'"
            ) from None
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m oculi.harvest",
        description="Record activations of every token of a prompt set into a resumable "
        "zarr + Parquet store (see oculi.harvest).",
        epilog=EXAMPLE,
    )
    p.add_argument("--prompts", required=True, help="JSONL file: one JSON string or object a line")
    p.add_argument("--text-field", default="text", help="the text's key in JSONL objects")
    p.add_argument("--sites", required=True, help="comma-separated sites, e.g. resid_post,mlp_out")
    p.add_argument("--layers", required=True, help="'0-17', '0,3,5', '0-5,9' or 'all'")
    p.add_argument("--out", required=True, help="the store folder (resumed if it exists)")
    p.add_argument("--model", default="gemma-3-270m", help="what oculi.load loads")
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best here)")
    p.add_argument("--dtype", default=None, help="the model's dtype (float32, bfloat16...)")
    p.add_argument("--batch-tokens", type=int, default=8192, help="token budget per forward")
    p.add_argument("--max-length", type=int, default=None, help="keep the first N tokens")
    p.add_argument("--storage-dtype", choices=["float32", "float16"], default=None)
    p.add_argument("--compression", choices=["zstd"], default=None)
    p.add_argument("--split", type=float, default=0.0, help="held-out fraction of prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-resume", action="store_true", help="delete the store at --out first")
    p.add_argument("--verify", action="store_true", help="re-read committed units on resume")
    p.add_argument("--executor", choices=["local", "ray"], default="local")
    p.add_argument("--address", default=None, help="Ray cluster address (e.g. auto)")
    p.add_argument("--concurrency", type=int, default=1, help="Ray actors")
    p.add_argument("--num-gpus", type=float, default=0, help="GPUs per Ray actor")
    p.add_argument("--num-cpus", type=float, default=1, help="CPUs per Ray actor")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status (0 done, 2 bad arguments or inputs)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    import torch

    import oculi
    from oculi.errors import OculiError
    from oculi.harvest.distributed import RayExecutor

    try:
        layers = parse_layers(args.layers)
    except ValueError as exc:
        parser.error(str(exc))
    executor: object = "local"
    if args.executor == "ray":
        executor = RayExecutor(model=args.model, address=args.address,
                               concurrency=args.concurrency, num_gpus=args.num_gpus,
                               num_cpus=args.num_cpus, device=args.device, dtype=args.dtype)  # fmt: skip
    storage = {"float32": torch.float32, "float16": torch.float16}.get(args.storage_dtype or "")
    try:
        adapter = oculi.load(args.model, device=args.device, dtype=args.dtype)
        summary = oculi.harvest(
            adapter, args.prompts, sites=args.sites.split(","), layers=layers, out=args.out,
            executor=executor, batch_tokens=args.batch_tokens, storage_dtype=storage,
            max_length=args.max_length, resume=not args.no_resume, verify=args.verify,
            split=args.split, seed=args.seed, compression=args.compression,
            text_field=args.text_field, progress=not args.quiet,
        )  # fmt: skip
    except (OculiError, KeyError, IndexError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(asdict(summary)))
    else:
        print(
            f"{summary.path}: {summary.tokens} tokens of {summary.n_prompts} prompts, "
            f"{len(summary.rows)} arrays, {summary.bytes / 2**20:.1f} MB; computed "
            f"{summary.units_computed} of {summary.units} units in {summary.seconds:.1f} s "
            f"({summary.tokens_per_s:,.0f} tokens/s)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
