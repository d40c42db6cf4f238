"""Logit-lens figures (seed 002): the layer × position grid of predictions, convergence to
the final prediction, and how long each input token survives in the residual stream.

::

    lc = adapter.capture_logits(prompt)
    tokens = adapter.to_str_tokens(prompt)
    logit_lens_grid(lc, adapter.tokenizer, tokens=tokens)   # top-1 token per cell
    convergence(lc, tokens=tokens)                          # KL, top-1 match, rank, logit
    input_preservation(lc, tokens=tokens)                   # rank of the input token
    prediction_refinement(lc, adapter.tokenizer)            # p(final top-k) per layer
    lens_probability(oculi.logit_lens(adapter, prompt, " Paris"))

Each function returns the matplotlib ``Figure`` (or ``Axes``); the arrays drawn are the
capture's numbers (``ax.images[0].get_array()``), not resampled.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from oculi.capture.interrupts import no_grad
from oculi.visualize._common import array, new_axes, pyplot, token_labels


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

    Example::

        logit_lens_grid(adapter.capture_logits(prompt), adapter.tokenizer,
                        tokens=adapter.to_str_tokens(prompt))     # a grid [L, T] of top-1 tokens
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


def _position_blocks(lc: Any) -> Iterator[tuple[slice, torch.Tensor]]:
    """Full logits ``[L, T', V]`` for blocks of positions of about one lens chunk each: the
    unembedding (the large read) is read once per block, not once per layer or token."""
    from oculi.capture.lens import default_chunk

    n_vocab = lc.d_vocab  # raises the capture's own error when it has no unembedding
    n_layers, n = lc.normalized.shape[0], lc.normalized.shape[1]
    budget = lc.chunk_size or default_chunk(lc.unembed.device)
    step = max(1, budget // (n_vocab * n_layers))
    for t0 in range(0, n, step):
        yield slice(t0, t0 + step), lc.logits(None, slice(t0, t0 + step))


def _ranks_and_log_probs(lc: Any, ids: torch.Tensor, log_input: Any = None) -> dict[str, Any]:
    """Rank (0 = top) and log-probability of ``ids[t]`` at position ``t`` in every layer,
    ``[L, T]``; with ``log_input [T, V]`` also ``KL(p_layer ‖ p_input)``."""
    if lc.batched:
        raise ValueError("the lens metrics read one sequence, not a batch")
    n_layers, n = lc.normalized.shape[0], lc.normalized.shape[1]
    out = {k: torch.empty(n_layers, n) for k in ("log_probs", "kl")}
    ranks = torch.empty(n_layers, n, dtype=torch.long)
    with no_grad():
        for sl, logits in _position_blocks(lc):
            here = ids[sl].to(logits.device).expand(n_layers, -1)[..., None]
            own = logits.gather(-1, here)  # from the same matmul: no last-ulp ties
            ranks[:, sl] = (logits > own).sum(-1).cpu()
            logp = torch.log_softmax(logits, -1)
            out["log_probs"][:, sl] = logp.gather(-1, here)[..., 0].cpu()
            if log_input is not None:
                ref = log_input[sl].to(logp.device)
                out["kl"][:, sl] = (logp.exp() * (logp - ref)).sum(-1).cpu()
    return {"ranks": ranks, "log_probs": out["log_probs"],
            "kl_from_input": out["kl"] if log_input is not None else None}  # fmt: skip


def final_top(lc: Any, k: int = 1) -> torch.Tensor:
    """The model's own top-``k`` next tokens at every position, ``[T, k]``: its last layer's
    (``lc.final_normalized``), whatever layers the capture holds."""
    if lc.batched or lc.final_normalized is None:
        raise ValueError("reads one sequence with its final-layer residual (a LogitCapture)")
    h = lc.final_normalized
    step = max(1, lc._rows(h))  # positions per block within the capture's memory cap
    with no_grad():
        blocks = [lc._project(h[t : t + step]).topk(k, -1).indices for t in range(0, len(h), step)]
    return torch.cat(blocks).cpu()


def convergence_metrics(lc: Any) -> dict[str, torch.Tensor]:
    """Seed 002's convergence numbers, each ``[L, T]`` over the capture's layers, against the
    model's own prediction (its last layer, held by every capture).

    Returns:
        ``kl_divergence``: ``KL(p_final ‖ p_layer)`` in nats (0 at the model's last layer);
        ``top1_match``: whether the layer's top-1 token is the model's top-1 (bool);
        ``top1_rank``: the rank of the model's top-1 in the layer's distribution (0 = top);
        ``top1_logit``: the logit of the layer's own top-1.
    """
    final = final_top(lc)[:, 0].to(lc.top_k_indices.device)  # [T]
    return {
        "kl_divergence": lc.kl_to_final().float().cpu(),
        "top1_match": (lc.top_k_indices[..., 0] == final).cpu(),
        "top1_rank": _ranks_and_log_probs(lc, final)["ranks"],
        "top1_logit": lc.top_k_values[..., 0].float().cpu(),
    }


def preservation_metrics(lc: Any, log_input: Any = None) -> dict[str, Any]:
    """Seed 002's input-preservation numbers, each ``[L, T]``: ``ranks`` (0 = top) and
    ``probs`` of position ``t``'s own input token at position ``t``; with ``log_input [T, V]``
    (the input embeddings' lens, log-probabilities) also ``kl_from_input``, ``KL(p_layer ‖
    p_input)`` in nats (else ``None``)."""
    ids = lc.metadata.get("input_ids")
    if not ids or lc.batched:
        raise ValueError("input preservation reads one sequence whose input ids the capture holds")
    out = _ranks_and_log_probs(lc, torch.tensor(ids[0]), log_input)
    return {"ranks": out["ranks"], "probs": out.pop("log_probs").exp(),
            "kl_from_input": out["kl_from_input"]}  # fmt: skip


def convergence(lc: Any, *, tokens: Sequence[str] | None = None) -> Any:
    """Seed 002's convergence view: the four ``[L, T]`` panels of :func:`convergence_metrics`
    (KL from the final distribution, whether the layer's top-1 equals the final top-1, the
    rank of the final top-1 at that layer, the logit of the layer's own top-1); a Figure.
    """
    plt = pyplot()
    from matplotlib.colors import SymLogNorm

    metrics = convergence_metrics(lc)
    n = int(metrics["top1_rank"].shape[1])
    panels = [
        ("KL(final ‖ layer), nats", metrics["kl_divergence"], "magma_r"),
        ("top-1 equals the final top-1", metrics["top1_match"].float(), "Greens"),
        ("rank of the final top-1", metrics["top1_rank"].float(), "viridis_r"),
        ("logit of the layer's top-1", metrics["top1_logit"], "viridis"),
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


def input_preservation(
    lc: Any,
    *,
    tokens: Sequence[str] | None = None,
    kl_from_input: Any = None,
    metrics: dict[str, Any] | None = None,
) -> Any:
    """How long each input token stays readable: its rank (1 = top) in each layer's
    prediction at its own position, and the mean probability per layer; a Figure.

    Args:
        lc: a ``LogitCapture`` of one sequence.
        tokens: the prompt's tokens, for the x axis.
        kl_from_input: ``[L, T]`` divergences of each layer's distribution from the lens of
            the input embeddings (``ModelAnalyzer.input_preservation``'s ``kl_from_input``),
            drawn as a third panel (seed 002's "KL from input").
        metrics: :func:`preservation_metrics` of ``lc`` when already computed (its
            ``ranks`` and ``probs``), so the unembedding is not read again.
    """
    from matplotlib.colors import LogNorm

    plt = pyplot()
    metrics = preservation_metrics(lc) if metrics is None else metrics
    ranks, probs = metrics["ranks"], metrics["probs"]
    n = int(ranks.shape[1])
    widths = [3, 2] if kl_from_input is None else [3, 2, 3]
    fig, axes = plt.subplots(
        1, len(widths), figsize=(max(10.0, 0.9 * n + 6) * sum(widths) / 5,
                                 max(4.0, 0.3 * lc.n_layers + 2)),
        gridspec_kw={"width_ratios": widths},
    )  # fmt: skip
    left, right = axes[0], axes[1]
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
    if kl_from_input is not None:
        image = axes[2].imshow(array(kl_from_input), aspect="auto", cmap="plasma")
        fig.colorbar(image, ax=axes[2], label="nats")
        _ticks(axes[2], lc, tokens, n)
        axes[2].set_title("KL(layer ‖ input embedding's lens)")
    fig.tight_layout()
    return fig


def prediction_refinement(
    lc: Any, tokenizer: Any = None, *, position: int = -1, top_k: int = 3, ax: Any = None
) -> Any:
    """How the model's top-``k`` predictions at ``position`` form: each one's probability at
    every layer of the capture, one line per token (seed 002's prediction refinement); Axes.

    The tokens are the model's own top-``k`` (its last layer's), whatever layers the capture
    holds.

    Example::

        prediction_refinement(adapter.capture_logits(prompt), adapter.tokenizer, top_k=5)
    """
    if lc.batched:
        raise ValueError("prediction_refinement reads one sequence, not a batch")
    ax = new_axes(ax, 6.5, 4.0)
    layers = list(lc.layers)
    for tok in final_top(lc, top_k)[position].tolist():
        text = tokenizer.decode([tok]) if tokenizer is not None else str(tok)
        probs = lc.token_probs(tok)[:, position].float().cpu().numpy()
        ax.plot(layers, probs, marker="o", label=f"p({text!r})")
    ax.set_ylim(0, 1)
    ax.set_xlabel("layer")
    ax.set_ylabel("probability")
    ax.set_title(f"prediction refinement at position {position}")
    ax.legend(fontsize=8)
    return ax


def lens_probability(result: Any, ax: Any = None) -> Any:
    """A ``LogitLensResult``: the target's probability per layer, its crossover marked; Axes.

    ::

        lens_probability(oculi.logit_lens(adapter, prompt, target=" Paris"))
    """
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
