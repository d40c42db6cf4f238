"""Logit-lens figures (seed 002): the layer × position grid of predictions, convergence to
the final prediction, and how long each input token survives in the residual stream.

::

    lc = adapter.capture_logits(prompt)
    tokens = adapter.to_str_tokens(prompt)
    logit_lens_grid(lc, adapter.tokenizer, tokens=tokens)   # top-1 token per cell
    convergence(lc, tokens=tokens)                          # KL, top-1 match, rank, logit
    input_preservation(lc, tokens=tokens)                   # rank of the input token
    lens_probability(oculi.logit_lens(adapter, prompt, " Paris"))

Each function returns the matplotlib ``Figure`` (or ``Axes``); the arrays drawn are the
capture's numbers (``ax.images[0].get_array()``), not resampled.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from oculi.visualize._common import new_axes, pyplot, token_labels


def _layer_labels(lc: Any) -> list[str]:
    return [str(layer) for layer in lc.layers]


def _ticks(ax: Any, lc: Any, tokens: Sequence[str] | None, n: int) -> None:
    ax.set_xticks(range(n), token_labels(tokens, n), rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(lc.layers)), _layer_labels(lc), fontsize=8)
    ax.set_xlabel("position")
    ax.set_ylabel("layer")


def logit_lens_grid(
    lc: Any, tokenizer: Any = None, *, tokens: Sequence[str] | None = None, ax: Any = None
) -> Any:
    """Each layer's top-1 next token at each position, coloured by its probability; Axes.

    Args:
        lc: a ``LogitCapture`` of one sequence.
        tokenizer: decodes the top-1 tokens written in the cells (ids without one).
        tokens: the prompt's tokens, for the x axis.
    """
    probs = lc.top_k_probs[..., 0].float()  # [L, T]
    ids = lc.top_k_indices[..., 0]
    n_layers, n = probs.shape
    ax = new_axes(ax, max(6.0, 0.9 * n + 2), max(4.0, 0.32 * n_layers + 1.5))
    image = ax.imshow(probs.numpy(), aspect="auto", cmap="Blues", vmin=0.0, vmax=1.0)
    ax.figure.colorbar(image, ax=ax, label="p(top-1)")
    for (layer, t), i in zip(
        torch.cartesian_prod(torch.arange(n_layers), torch.arange(n)).tolist(),
        ids.flatten().tolist(),
    ):
        text = tokenizer.decode([i]) if tokenizer is not None else str(i)
        colour = "white" if float(probs[layer, t]) > 0.6 else "black"
        ax.text(t, layer, text[:10], ha="center", va="center", fontsize=6, color=colour)
    _ticks(ax, lc, tokens, n)
    ax.set_title("logit lens: top-1 prediction per layer and position")
    return ax


def convergence(lc: Any, *, tokens: Sequence[str] | None = None) -> Any:
    """Seed 002's convergence view: four ``[L, T]`` panels; a Figure.

    Panels: KL from the final distribution (``KL(p_final ‖ p_layer)``, nats), whether the
    layer's top-1 equals the final top-1, the rank of the final top-1 at that layer, and the
    logit of the layer's own top-1.
    """
    plt = pyplot()
    from matplotlib.colors import SymLogNorm

    final = lc.top_k_indices[-1, :, 0]  # [T]
    n = int(final.shape[0])
    match = (lc.top_k_indices[..., 0] == final).float()
    ranks = torch.stack([lc.ranks(int(tok))[:, t] for t, tok in enumerate(final.tolist())], 1)
    panels = [
        ("KL(final ‖ layer), nats", lc.kl_to_final().float(), "magma_r"),
        ("top-1 equals the final top-1", match, "Greens"),
        ("rank of the final top-1", ranks.float(), "viridis_r"),
        ("logit of the layer's top-1", lc.top_k_values[..., 0].float(), "viridis"),
    ]
    fig, axes = plt.subplots(
        2, 2, figsize=(max(10.0, 1.1 * n + 4), max(7.0, 0.5 * lc.n_layers + 3))
    )
    for ax, (title, grid, cmap) in zip(axes.flat, panels):
        # ranks span 0 to the vocabulary size: a log scale (linear near 0) shows both ends
        norm = SymLogNorm(linthresh=1.0, vmin=0) if title.startswith("rank") else None
        image = ax.imshow(grid.numpy(), aspect="auto", cmap=cmap, norm=norm)
        fig.colorbar(image, ax=ax)
        ax.set_title(title)
        _ticks(ax, lc, tokens, n)
    fig.suptitle("logit lens convergence")
    fig.tight_layout()
    return fig


def input_preservation(lc: Any, *, tokens: Sequence[str] | None = None) -> Any:
    """How long each input token stays readable: its rank (1 = top) in each layer's
    prediction at its own position, and the mean probability per layer; a Figure."""
    from matplotlib.colors import LogNorm

    plt = pyplot()
    ids = lc.metadata.get("input_ids")
    if not ids or lc.batched:
        raise ValueError("input_preservation reads one sequence whose input ids the capture holds")
    ids = ids[0]
    n = len(ids)
    ranks = torch.stack([lc.ranks(int(tok))[:, t] for t, tok in enumerate(ids)], 1)
    probs = torch.stack([lc.token_probs(int(tok))[:, t] for t, tok in enumerate(ids)], 1)
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(max(10.0, 0.9 * n + 6), max(4.0, 0.3 * lc.n_layers + 2)),
        gridspec_kw={"width_ratios": [3, 2]},
    )  # fmt: skip
    grid = (ranks + 1).float().numpy()
    image = left.imshow(
        grid, aspect="auto", cmap="viridis_r", norm=LogNorm(vmin=1, vmax=max(2.0, grid.max()))
    )
    fig.colorbar(image, ax=left, label="rank of the input token (1 = top)")
    _ticks(left, lc, tokens, n)
    left.set_title("input token's rank at its own position")
    right.plot(list(lc.layers), probs.float().mean(1).numpy(), marker="o")
    right.set_xlabel("layer")
    right.set_ylabel("mean p(input token)")
    right.set_title("input preservation")
    fig.tight_layout()
    return fig


def lens_probability(result: Any, ax: Any = None) -> Any:
    """A ``LogitLensResult``: the target's probability per layer, its crossover marked; Axes."""
    ax = new_axes(ax, 6.0, 3.5)
    layers = list(result.layers)
    ax.plot(layers, result.probs.float().numpy(), marker="o", label=f"p({result.target!r})")
    if result.crossover_layer is not None:
        ax.axvline(result.crossover_layer, color="grey", ls="--", label="crossover")
    ax.set_ylim(0, 1)
    ax.set_xlabel("layer")
    ax.set_ylabel("probability")
    ax.set_title(f"logit lens: {result.target!r}")
    ax.legend()
    return ax
