"""Capture overhead on Gemma 3 270M, as ratios to the plain Hugging Face forward.

Run: ``.venv/bin/python bench/bench_capture.py [--repeats 5] [--model gemma-3-270m]``

For each input (15 tokens, 128 tokens, a batch of 8 x 128) it times, in one process:
the model's own forward with its default attention (sdpa) and with eager attention (the
reference for pattern captures, which need the probabilities), then oculi's captures. The
logit-lens rows compare an all-layer top-10 lens over 128 tokens with one bare
``[L*T, d] x [d, V]`` matmul of the same size. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import oculi  # noqa: E402
from common import exec_with_mmap_allocations, header, measure, measure_all  # noqa: E402
from oculi import CaptureConfig, LogitConfig, MLPConfig, ResidualConfig  # noqa: E402

TEXT = (
    "The Eiffel Tower is located in the city of Paris, which is the capital of France. "
    "Many tourists visit it every year, climbing its stairs or taking the lift to the top, "
    "where the view over the river and the old streets is wide and clear on a sunny day. "
)


def token_batch(adapter, n_tokens: int, batch: int) -> torch.Tensor:
    ids = adapter.tokenizer(TEXT * 8, return_tensors="pt")["input_ids"][0, :n_tokens]
    assert ids.shape[0] == n_tokens, "prompt text too short"
    return ids.unsqueeze(0).repeat(batch, 1).to(adapter.device)


def bench_input(adapter, ids: torch.Tensor, repeats: int) -> None:
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
    print(header(f"{b} x {t} tokens"))

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
        print(m.row(base))
    for (_, ref, _), m in zip(rows, measured[4:]):
        print(m.row(base), f" {m.seconds / refs[ref].seconds:.2f}x the {ref} body")
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
    print(floor.row(base), f" {floor.seconds / refs['eager'].seconds:.2f}x the eager body")


def bench_lens(adapter, ids: torch.Tensor, repeats: int) -> None:
    t = ids.shape[1]
    w_u, _, _ = adapter.unembedding()
    rows = torch.randn(adapter.n_layers * t, adapter.d_model, dtype=w_u.dtype, device=w_u.device)
    print(header(f"logit lens, all {adapter.n_layers} layers x {t} tokens, top-10"))
    bare = measure(
        f"bare matmul [{rows.shape[0]}, {adapter.d_model}] x [{adapter.d_model}, {adapter.d_vocab}]",
        lambda: rows @ w_u.T,
        repeats=repeats,
        device=adapter.device,
    )
    print(bare.row(bare))
    lens_input = adapter.capture_logits(ids, LogitConfig(top_k=10))

    def lens_topk():
        lens_input._topk = None  # recompute: time the lens, not the cache
        return lens_input.top_k_indices

    topk = measure(
        "lens top-10 (chunked, on a capture)", lens_topk, repeats=repeats, device=adapter.device
    )
    print(topk.row(bare))
    full = measure(
        "capture_logits + top-10 (forward included)",
        lambda: adapter.capture_logits(ids, LogitConfig(top_k=10)).top_k_indices,
        repeats=repeats,
        device=adapter.device,
    )
    print(full.row(bare))
    naive_mb = adapter.n_layers * t * adapter.d_vocab * 4 / 2**20
    print(f"\n(materialising all layer logits would take {naive_mb:.0f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default=None)
    parser.add_argument("--only", choices=["capture", "lens"], default=None, help="run one part")
    parser.add_argument(
        "--exact-rss",
        action="store_true",
        help="serve every allocation over 64 kB by mmap, so peak MB is exact; times then "
        "include page faults of every intermediate tensor, so take times from a plain run",
    )
    args = parser.parse_args()
    if args.exact_rss:
        exec_with_mmap_allocations()
    adapter = oculi.load(args.model, device=args.device)
    print(
        f"model: {adapter}\ndevice: {adapter.device}, torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    if args.only != "lens":
        for t, b in ((15, 1), (128, 1), (128, 8)):
            bench_input(adapter, token_batch(adapter, t, b), args.repeats)
    if args.only != "capture":
        bench_lens(adapter, token_batch(adapter, 128, 1), args.repeats)


if __name__ == "__main__":
    main()
