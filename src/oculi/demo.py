"""A two-minute tour: what the model predicts, and at which layer it makes up its mind.

::

    python -m oculi.demo "The Eiffel Tower is located in the city of"

Loads the embedded Gemma 3 270M (``oculi.load()``; the first run converts it once), prints
the model's top-5 next tokens, then the logit lens at the last position: each layer's
residual read through the final norm and the unembedding, as if that layer were the last.
The layer where the final prediction becomes the top-1 token, and stays top-1 to the end, is
where the model has settled on its answer.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from oculi.models.adapter import Adapter
from oculi.models.loading import DEFAULT_MODEL, load

DEFAULT_PROMPT = "The Eiffel Tower is located in the city of"


def settling_layer(top1: Sequence[int], final: int) -> int | None:
    """Index of the first entry from which ``top1`` equals ``final`` to the end, or ``None``.

    Example::

        settling_layer([5, 7, 7, 3, 7, 7], final=7)   # 4
    """
    first = None
    for i, token in enumerate(top1):
        if token != final:
            first = None
        elif first is None:
            first = i
    return first


def _show(tokenizer, token_id: int, width: int = 16) -> str:
    text = repr(tokenizer.decode([int(token_id)]))
    return text if len(text) <= width else text[: width - 2] + "…'"


def report(adapter: Adapter, prompt: str, top_k: int = 5) -> str:
    """The demo's text for ``prompt``: next-token table, logit-lens table, settling layer."""
    tok = adapter.tokenizer
    logits = adapter.forward(prompt)[-1].float()  # [V], last position
    probs = torch.softmax(logits, dim=-1)
    top_p, top_i = probs.topk(top_k)
    final = int(top_i[0])
    lens = adapter.capture_logits(prompt)
    top1 = lens.top_k_indices[:, -1, 0].tolist()  # [L]
    top1_p = lens.top_k_probs[:, -1, 0].tolist()
    final_p = lens.token_probs(final)[:, -1].tolist()
    n_tokens = len(adapter.to_str_tokens(prompt))

    lines = [
        f"prompt: {prompt!r} ({n_tokens} tokens)",
        "",
        f"top-{top_k} next tokens",
    ]
    lines += [f"  {_show(tok, i):<18} {p:6.3f}" for p, i in zip(top_p.tolist(), top_i.tolist())]
    lines += [
        "",
        "logit lens, last position (each layer's residual through the final norm and unembedding)",
        f"  layer  {'top-1':<18} {'p(top-1)':>8}  {'p(' + _show(tok, final) + ')':>12}",
    ]
    for layer, i, p, pf in zip(lens.layers, top1, top1_p, final_p):
        mark = " *" if i == final else ""
        lines.append(f"  {layer:>5}  {_show(tok, i):<18} {p:8.3f}  {pf:12.3f}{mark}")
    settled = settling_layer(top1, final)
    lines.append("")
    if settled is None:
        lines.append(f"{_show(tok, final)} is not the top-1 token at the last layer of the lens")
    else:
        lines.append(
            f"{_show(tok, final)} becomes the top-1 prediction at layer {lens.layers[settled]} "
            f"of {adapter.n_layers} and stays there to the last layer"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m oculi.demo", description=__doc__.split("\n\n")[0].strip()
    )
    parser.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="name, folder, .gguf or hub id")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: best)")
    parser.add_argument("--top-k", type=int, default=5, help="next tokens to list (default 5)")
    args = parser.parse_args(argv)
    if not args.prompt.strip():
        parser.error("the prompt is empty; pass some text, e.g. " + repr(DEFAULT_PROMPT))
    if args.top_k < 1:
        parser.error(f"--top-k must be at least 1, got {args.top_k}")

    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    adapter = load(args.model, device=args.device)
    print(
        f"{type(adapter.model).__name__}: {adapter.n_layers} layers, {adapter.n_heads} heads "
        f"({adapter.n_kv_heads} KV), d_model {adapter.d_model}, vocab {adapter.d_vocab:,}, "
        f"on {adapter.device}\n"
    )
    print(report(adapter, args.prompt, top_k=args.top_k))
    return 0


if __name__ == "__main__":
    sys.exit(main())
