"""Captures of a model with half its layers offloaded to disk, against its plain forward.

Run: ``.venv/bin/python bench/bench_offload.py [--repeats 5] [--tokens 128] [--disk-from 9]``

Gemma 3 270M is loaded with ``device_map`` putting layers ``--disk-from``.. on ``"disk"``
(accelerate memory-maps their weights from an offload folder and loads each layer for its
forward) and the rest on the CPU. In one process, round-robin, it times the plain offloaded
forward (the full Hugging Face forward, and the decoder body alone, which is what a capture
runs) and oculi's captures of the same input. The ratio column is against the body; the
issue's bar is a capture at <= 1.1x the plain offloaded forward.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import oculi  # noqa: E402
from common import header, measure_all  # noqa: E402
from oculi import CaptureConfig, ResidualConfig  # noqa: E402

TEXT = (
    "The Eiffel Tower is located in the city of Paris, which is the capital of France. "
    "Many tourists visit it every year, climbing its stairs or taking the lift to the top. "
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--disk-from", type=int, default=9, help="first layer put on disk")
    args = parser.parse_args()
    plain = oculi.load(device="cpu", dtype="float32")  # the same weights on one device
    n = plain.n_layers
    ids = plain.tokenizer(TEXT * 4, return_tensors="pt")["input_ids"][:, : args.tokens]
    dmap = {f"model.layers.{i}": "disk" if i >= args.disk_from else "cpu" for i in range(n)}
    dmap |= {p: "cpu" for p in ("model.embed_tokens", "model.norm", "model.rotary_emb")}
    dmap["lm_head"] = "cpu"
    with tempfile.TemporaryDirectory() as folder:
        adapter = oculi.load(device_map=dmap, offload_folder=folder, dtype="float32")
        model = adapter.model
        on_disk = sum(p.numel() * p.element_size() for p in model.parameters() if p.is_meta)
        print(
            f"Gemma 3 270M, layers {args.disk_from}-{n - 1} on disk ({on_disk / 2**20:.0f} MiB),"
            f" 1 x {ids.shape[1]} tokens, {torch.get_num_threads()} threads"
        )

        def hf_forward() -> object:
            with torch.no_grad():
                return model(ids, use_cache=False)

        def body() -> object:
            with torch.no_grad():
                return model.model(ids, use_cache=False)

        attention = CaptureConfig(capture_patterns=False)

        def full(a: oculi.Adapter) -> object:
            return a.capture_full(ids, attention=attention, residual=ResidualConfig(), logits=None)

        def plain_body() -> object:
            with torch.no_grad():
                return plain.model.model(ids, use_cache=False)

        named = [
            ("plain offloaded forward (HF, with lm_head)", hf_forward),
            ("plain offloaded body (model.model)", body),
            ("capture_residual (4 points, all layers)", lambda: adapter.capture_residual(ids)),
            ("capture_full, no patterns (q/k/v, residual, MLP)", lambda: full(adapter)),
            ("one device: plain body", plain_body),
            ("one device: capture_residual", lambda: plain.capture_residual(ids)),
            ("one device: capture_full, no patterns", lambda: full(plain)),
        ]
        results = measure_all(named, repeats=args.repeats)
        print(header("offloaded: capture / plain offloaded body"))
        for m in results[:4]:
            print(m.row(results[1]))
        print(header("the same on one device: capture / plain body (for scale)"))
        for m in results[4:]:
            print(m.row(results[4]))


if __name__ == "__main__":
    main()
