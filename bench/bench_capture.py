"""Capture overhead on Gemma 3 270M, as ratios to the plain Hugging Face forward.

Run: ``.venv/bin/python bench/bench_capture.py [--repeats 5] [--device cpu|cuda]
[--shape gemma-270m|llama-8b|tiny] [--inputs 1x15,1x128,8x128] [--lens-tokens 128]
[--json PATH]`` (options shared by every script: ``bench/common.py``).

For each input (by default 15 tokens, 128 tokens, a batch of 8 x 128) it times, in one process:
the model's own forward with its default attention (sdpa) and with eager attention (the
reference for pattern captures, which need the probabilities), then oculi's captures. The
logit-lens rows compare an all-layer top-10 lens over 128 tokens with one bare
``[L*T, d] x [d, V]`` matmul (+ ``topk``) of the same size. On CUDA a capture that streams to
the host (``storage_device="cpu"``) is timed too, against the forward plus its bytes at
50 GB/s. Prints a Markdown table and writes it as JSON lines.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    Report,
    add_run_args,
    build_adapter,
    measure,
    measure_all,
)
from oculi import CaptureConfig, LogitConfig, MLPConfig, ResidualConfig  # noqa: E402
from shapes import random_ids  # noqa: E402

TEXT = (
    "The Eiffel Tower is located in the city of Paris, which is the capital of France. "
    "Many tourists visit it every year, climbing its stairs or taking the lift to the top, "
    "where the view over the river and the old streets is wide and clear on a sunny day. "
)


def token_batch(adapter, n_tokens: int, batch: int, random: bool) -> torch.Tensor:
    """``[batch, n_tokens]`` ids: the text's tokens repeated, or random ids (random weights)."""
    if random:
        return random_ids(adapter, batch, n_tokens)
    text = TEXT * (1 + n_tokens // 40)
    ids = adapter.tokenizer(text, return_tensors="pt")["input_ids"][0, :n_tokens]
    assert ids.shape[0] == n_tokens, "prompt text too short"
    return ids.unsqueeze(0).repeat(batch, 1).to(adapter.device)


def bench_input(adapter, ids: torch.Tensor, repeats: int, report: Report) -> None:
    """Captures against the model's own forward.

    Two references: the full forward (what a user runs without oculi: decoder + lm_head over
    the whole vocabulary) and the decoder body alone (``model.model``, no lm_head), which is
    what a capture has to run. Captures that record patterns need the probabilities, so they
    run eager attention in the layers asked for; they are compared with the eager body.
    """
    model = adapter.model
    body = model.get_decoder()
    b, t = ids.shape
    mask = torch.ones_like(ids)
    report.start(f"{b} x {t} tokens")

    def hf_forward():
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    def hf_body():
        with torch.no_grad():
            return body(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state

    original = model.config._attn_implementation

    def eager(fn):
        def run():
            model.set_attn_implementation("eager")
            try:
                return fn()
            finally:
                model.set_attn_implementation(original)

        return run

    rows = [
        (
            "capture_full (attn+resid+mlp, lazy logits)",
            "eager",
            lambda: adapter.capture_full(ids, attention_mask=mask),
        ),
        (
            "capture_residual (4 points)",
            "sdpa",
            lambda: adapter.capture_residual(ids, ResidualConfig(), attention_mask=mask),
        ),
        (
            "capture (q/k/v + patterns)",
            "eager",
            lambda: adapter.capture(ids, CaptureConfig(), attention_mask=mask),
        ),
        (
            "capture (q/k/v, no patterns)",
            "sdpa",
            lambda: adapter.capture(
                ids, CaptureConfig(capture_patterns=False), attention_mask=mask
            ),
        ),
        ("capture_mlp", "sdpa", lambda: adapter.capture_mlp(ids, MLPConfig(), attention_mask=mask)),
        (
            "capture_residual(layers=[3])",
            "sdpa",
            lambda: adapter.capture_residual(ids, ResidualConfig(layers=[3]), attention_mask=mask),
        ),
    ]
    rows += [
        (
            "capture_full(logits=None)",
            "eager",
            lambda: adapter.capture_full(ids, logits=None, attention_mask=mask),
        ),
        # on CUDA: streamed to the host; on the CPU the same as capture_full
        ("capture_full(storage_device='cpu')", "eager", lambda: _to_host(adapter, ids, mask)),
    ]
    measured = measure_all(
        [
            ("HF forward (sdpa, default)", hf_forward),
            ("HF forward (eager)", eager(hf_forward)),
            ("HF body, no lm_head (sdpa)", hf_body),
            ("HF body, no lm_head (eager)", eager(hf_body)),
            *[(name, fn) for name, _, fn in rows],
        ],
        repeats=repeats,
        device=adapter.device,
    )
    base = measured[0]
    refs = {"sdpa": measured[2], "eager": measured[3]}
    for m in measured[:4]:
        report.add(m, base)
    for (_, ref, _), m in zip(rows, measured[4:]):
        body = m.seconds / refs[ref].seconds
        report.add(m, base, f" {body:.2f}x the {ref} body", vs_body=round(body, 4))
    # What holding the result costs by itself: fresh pages for every byte a capture returns
    # (the kernel zero-fills them on first touch), with no model work at all.
    full = adapter.capture_full(ids, attention_mask=mask)
    held = [
        t for part in (full.attention, full.residual, full.mlp) for t in part.tensors().values()
    ]
    held += [full.logits.normalized, full.logits.final_normalized]  # the unembedding is the model's
    nbytes = sum(t.numel() * t.element_size() for t in held if t is not None)
    del full
    floor = measure(
        f"touch {nbytes / 2**20:.0f} MB of fresh memory (capture_full's size)",
        lambda: torch.empty(nbytes, dtype=torch.uint8, device=adapter.device).fill_(1),
        repeats=repeats,
        device=adapter.device,
    )
    body = floor.seconds / refs["eager"].seconds
    report.add(floor, base, f" {body:.2f}x the eager body", vs_body=round(body, 4))
    if adapter.device.type != "cpu":
        # the host-copy target: forward + the result's bytes at 50 GB/s (pinned copies)
        target = base.seconds + nbytes / 50e9
        report.fact(
            "storage_device='cpu' target (fwd + bytes / 50 GB/s), ms",
            round(target * 1e3, 3),
            f"\nstorage_device='cpu': {nbytes / 2**20:.0f} MB; target fwd + bytes/50 GB/s = "
            f"{target * 1e3:.1f} ms",
        )


def _to_host(adapter, ids: torch.Tensor, mask: torch.Tensor):
    """``capture_full`` keeping every part on the host (the issue's bf16 offload case)."""
    host = dict(storage_device="cpu")
    return adapter.capture_full(
        ids,
        attention=CaptureConfig(**host),
        residual=ResidualConfig(**host),
        mlp=MLPConfig(**host),
        logits=LogitConfig(**host),
        attention_mask=mask,
    )


def bench_lens(adapter, ids: torch.Tensor, repeats: int, report: Report, strategy: str) -> None:
    t = ids.shape[1]
    w_u, _, _ = adapter.unembedding()
    rows = torch.randn(adapter.n_layers * t, adapter.d_model, dtype=w_u.dtype, device=w_u.device)
    report.start(f"logit lens, all {adapter.n_layers} layers x {t} tokens, top-10")
    bare = measure(
        f"bare matmul [{rows.shape[0]}, {adapter.d_model}] x [{adapter.d_model}, {adapter.d_vocab}]",
        lambda: rows @ w_u.T,
        repeats=repeats,
        device=adapter.device,
    )
    report.add(bare, bare)
    bare_topk = measure(
        "bare matmul + topk(10)",
        lambda: (rows @ w_u.T).topk(10, dim=-1),
        repeats=repeats,
        device=adapter.device,
    )
    report.add(bare_topk, bare)
    lens_input = adapter.capture_logits(ids, LogitConfig(top_k=10, strategy=strategy))

    def lens_topk():
        lens_input._topk = None  # recompute: time the lens, not the cache
        return lens_input.top_k_indices

    topk = measure(
        "lens top-10 (chunked, on a capture)", lens_topk, repeats=repeats, device=adapter.device
    )
    report.add(topk, bare, f" {topk.seconds / bare_topk.seconds:.2f}x matmul + topk")
    for forced_strategy in ("vocab", "rows"):  # each strategy forced (auto picks by device)
        config = LogitConfig(top_k=10, strategy=forced_strategy)
        forced_lens = adapter.capture_logits(ids, config)

        def forced_topk(lens=forced_lens):
            lens._topk = None
            return lens.top_k_indices

        forced = measure(
            f"lens top-10, strategy={forced_strategy}",
            forced_topk,
            repeats=repeats,
            device=adapter.device,
        )
        report.add(forced, bare, f" {forced.seconds / bare_topk.seconds:.2f}x matmul + topk")
    kl = measure(
        "lens kl_to_final", lambda: lens_input.kl_to_final(), repeats=repeats, device=adapter.device
    )
    report.add(kl, bare, f" {kl.seconds / bare_topk.seconds:.2f}x matmul + topk")
    full = measure(
        "capture_logits + top-10 (forward included)",
        lambda: adapter.capture_logits(ids, LogitConfig(top_k=10, strategy=strategy)).top_k_indices,
        repeats=repeats,
        device=adapter.device,
    )
    report.add(full, bare)
    naive_mb = adapter.n_layers * t * adapter.d_vocab * rows.element_size() / 2**20
    report.fact(
        "all-layer logits, MB",
        round(naive_mb, 1),
        f"\n(materialising all layer logits would take {naive_mb:.0f} MB)",
    )


def _sizes(text: str) -> list[tuple[int, int]]:
    """``"1x15,8x128"`` -> ``[(1, 15), (8, 128)]`` (batch x tokens)."""
    return [(int(b), int(t)) for b, t in (item.split("x") for item in text.split(","))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(parser, repeats=5)
    parser.add_argument("--only", choices=["capture", "lens"], default=None, help="run one part")
    parser.add_argument("--inputs", type=_sizes, default=_sizes("1x15,1x128,8x128"))
    parser.add_argument("--lens-tokens", type=int, default=128)
    parser.add_argument(
        "--lens-strategy",
        choices=["auto", "vocab", "rows"],
        default="auto",
        help="the lens's top-k blocking (auto: vocab on the CPU, rows on accelerators)",
    )
    args = parser.parse_args(argv)
    adapter = build_adapter(args, [TEXT])
    report = Report("bench_capture", args, adapter)
    random = bool(args.shape)
    if args.only != "lens":
        for b, t in args.inputs:
            bench_input(adapter, token_batch(adapter, t, b, random), args.repeats, report)
    if args.only != "capture":
        bench_lens(
            adapter,
            token_batch(adapter, args.lens_tokens, 1, random),
            args.repeats,
            report,
            args.lens_strategy,
        )
    report.write()


if __name__ == "__main__":
    main()
