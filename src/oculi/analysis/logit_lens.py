"""The logit lens: what each layer would predict if it were the last.

::

    result = oculi.logit_lens(adapter, "The Eiffel Tower is in the city of", " Paris")
    result.probs            # [L] P(" Paris") at the last position, layer by layer
    result.crossover_layer  # first layer from which " Paris" stays the top-1 prediction

Each layer's residual stream, put through the model's final norm and unembedding, gives a
next-token distribution (:class:`~oculi.capture.lens.LogitCapture` computes these lazily).
Reading them layer by layer shows when a prediction forms: the probability of the answer
rises, its rank falls to 0, and the KL divergence from the final distribution shrinks to 0 at
the last layer. :class:`LogitLensAnalysis` reads an existing capture (seed 000's API);
:func:`logit_lens` runs one prompt through an adapter and follows one target token (seed
004's task-level helper).

Layers are reported as model layer indices (``logits.layers``). Positions count real tokens:
``-1`` is each sequence's last token, also in left- or right-padded batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from oculi.analysis._common import check_index, mark_padding, real_mask
from oculi.capture.configs import LogitConfig
from oculi.capture.lens import LogitCapture
from oculi.capture.structures import FullCapture
from oculi.errors import InputError


def _logits_of(capture: Any) -> LogitCapture:
    if isinstance(capture, FullCapture):
        if capture.logits is None:
            raise InputError(
                "this FullCapture holds no logits; capture them with "
                "adapter.capture_full(..., logits=LogitConfig())"
            )
        return capture.logits
    if not isinstance(capture, LogitCapture):
        raise InputError(
            f"expected a LogitCapture (from adapter.capture_logits(...)), got {type(capture).__name__}"
        )
    return capture


def _n_pos(logits: LogitCapture) -> int:
    return int(logits.normalized.shape[-2])


def _positions(logits: LogitCapture, token_position: int) -> list[int]:
    """The tensor index of ``token_position`` (counted among real tokens) in each row."""
    n_pos = _n_pos(logits)
    batch = logits.normalized.shape[0] if logits.batched else None
    real = real_mask(logits.metadata, batch, n_pos)
    if real is None:
        real = torch.ones((1 if batch is None else batch, n_pos), dtype=torch.bool)
    elif batch is None:
        real = real[None]
    out = []
    for row in real:
        index = row.nonzero().flatten().tolist()
        out.append(index[check_index(token_position, len(index), "token_position")])
    return out


def _decode(tokenizer: Any, token_id: int) -> str:
    if tokenizer is None:
        return f"<{token_id}>"
    return tokenizer.decode([token_id])


def _single(logits: LogitCapture, what: str) -> None:
    if logits.batched:
        raise InputError(
            f"{what} reads one sequence, but this capture holds a batch of "
            f"{logits.normalized.shape[0]}; capture one prompt (adapter.capture_logits(prompt))"
        )


class LogitLensAnalysis:
    """Reads layer-wise predictions out of a :class:`LogitCapture`.

    Example::

        lens = LogitLensAnalysis(tokenizer)
        for row in lens.layer_predictions(adapter.capture_logits(ids), top_k=3):
            print(row["layer"], row["predictions"])

    Args:
        tokenizer: decodes token ids for :meth:`layer_predictions`; without one, tokens are
            shown as ``"<id>"``.
    """

    def __init__(self, tokenizer: Any = None):
        self.tokenizer = tokenizer

    def layer_predictions(
        self, logits: Any, token_position: int = -1, top_k: int = 5
    ) -> list[dict[str, Any]]:
        """The top predictions of each layer at one position.

        Uses the capture's stored top-k when ``top_k`` fits in it (so it also works on a
        capture loaded from disk), else computes that position's full logits.

        Args:
            logits: a ``LogitCapture`` of one sequence (or a ``FullCapture``).
            token_position: the position whose next-token prediction to read (``-1``: last).
            top_k: predictions per layer.

        Returns:
            One dict per captured layer, in order:
            ``{"layer": model layer index, "predictions": [(token_str, prob), ...]}``.

        Raises:
            InputError: a batched capture.
            IndexError: ``token_position`` out of range.
        """
        lc = _logits_of(logits)
        _single(lc, "layer_predictions")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive int, got {top_k!r}")
        pos = _positions(lc, token_position)[0]
        if top_k <= lc.top_k:
            probs = lc.top_k_probs[:, pos, :top_k]
            ids = lc.top_k_indices[:, pos, :top_k]
        else:
            full = torch.softmax(lc.logits(None, [pos])[:, 0], dim=-1)  # [L, V]
            probs, ids = full.topk(min(top_k, full.shape[-1]), dim=-1)
        return [
            {
                "layer": layer,
                "predictions": [
                    (_decode(self.tokenizer, int(t)), float(p))
                    for t, p in zip(ids[i].tolist(), probs[i].tolist())
                ],
            }
            for i, layer in enumerate(lc.layers)
        ]

    def prediction_convergence(
        self, logits: Any, token_position: int = -1
    ) -> Float[Tensor, "*batch layer"]:
        """``KL(p_final ‖ p_layer)`` at one position, per layer: 0 once a layer agrees.

        Returns:
            ``[L]`` in nats (``[B, L]`` for batches, each row at its own ``token_position``).
        """
        lc = _logits_of(logits)
        kl = lc.kl_to_final()
        positions = _positions(lc, token_position)
        if not lc.batched:
            return kl[:, positions[0]]
        return torch.stack([kl[b, :, p] for b, p in enumerate(positions)])

    def token_probability_trajectory(
        self, logits: Any, token_id: int
    ) -> Float[Tensor, "*batch layer pos"]:
        """Probability of ``token_id`` at every layer and position.

        Returns:
            ``[L, T]`` (``[B, L, T]`` for batches, ``NaN`` at padding).

        Raises:
            InputError: ``token_id`` outside the vocabulary.
        """
        lc = _logits_of(logits)
        if isinstance(token_id, bool) or not isinstance(token_id, int):
            raise TypeError(f"token_id must be an int, got {token_id!r}")
        return mark_padding(lc.token_probs(token_id), lc.metadata, lc.batched)


@dataclass(frozen=True)
class LogitLensResult:
    """One target token followed through the layers at one position.

    Attributes:
        target: the target token as text.
        target_id: its id.
        layers: the model layers read, in order.
        position: the position read (an index into the sequence).
        probs: ``[L]`` probability of the target at each layer.
        ranks: ``[L]`` its rank (0 = top-1: no token has a higher logit).
        top1: each layer's top-1 token as text.
        top1_ids: ``[L]`` their ids.
        crossover_layer: the first layer from which the target stays top-1 through the last
            layer read, or ``None`` if the last layer does not rank it first.
    """

    target: str
    target_id: int
    layers: tuple[int, ...]
    position: int
    probs: Float[Tensor, " layer"]
    ranks: Int[Tensor, " layer"]
    top1: list[str]
    top1_ids: Int[Tensor, " layer"]
    crossover_layer: int | None

    @classmethod
    def from_capture(
        cls, logits: Any, target_id: int, *, tokenizer: Any = None, position: int = -1
    ) -> LogitLensResult:
        """Read the result out of a one-sequence ``LogitCapture``.

        Computes the full logits of one position only (``[L, V]``), never ``[L, T, V]``.
        """
        lc = _logits_of(logits)
        _single(lc, "LogitLensResult.from_capture")
        if isinstance(target_id, bool) or not isinstance(target_id, int):
            raise TypeError(f"target_id must be an int, got {target_id!r}")
        pos = _positions(lc, position)[0]
        rows = lc.logits(None, [pos])[:, 0]  # [L, V]
        if not 0 <= target_id < rows.shape[-1]:
            raise InputError(
                f"target id {target_id} is outside the vocabulary (0..{rows.shape[-1] - 1})"
            )
        target_logit = rows[:, target_id]
        ranks = (rows > target_logit[:, None]).sum(-1)
        top1_ids = rows.argmax(-1)
        return cls(
            target=_decode(tokenizer, target_id),
            target_id=target_id,
            layers=tuple(lc.layers),
            position=pos,
            probs=torch.softmax(rows, dim=-1)[:, target_id],
            ranks=ranks,
            top1=[_decode(tokenizer, int(t)) for t in top1_ids.tolist()],
            top1_ids=top1_ids,
            crossover_layer=crossover_layer(ranks, lc.layers),
        )

    def _repr_html_(self) -> str:
        """Jupyter's view: the target's probability and rank per layer, as in the report."""
        from oculi.visualize.views import lens_result_view, notebook

        return notebook(lens_result_view(self))

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers and strings, ready for ``json.dump``."""
        return {
            "target": self.target,
            "target_id": self.target_id,
            "layers": list(self.layers),
            "position": self.position,
            "probs": self.probs.tolist(),
            "ranks": self.ranks.tolist(),
            "top1": list(self.top1),
            "top1_ids": self.top1_ids.tolist(),
            "crossover_layer": self.crossover_layer,
        }


def crossover_layer(ranks: Any, layers: Any = None) -> int | None:
    """The first layer from which ``ranks`` stays 0 through the end, or ``None``.

    Args:
        ranks: ``[L]`` ranks of a token (0 = top-1), one per layer.
        layers: the model layer index of each entry (default ``0 .. L-1``).
    """
    values = torch.as_tensor(ranks).reshape(-1).tolist()
    names = list(layers) if layers is not None else list(range(len(values)))
    if len(names) != len(values):
        raise ValueError(f"{len(values)} ranks but {len(names)} layers")
    first = None
    for name, rank in zip(reversed(names), reversed(values)):
        if rank != 0:
            break
        first = name
    return first


def logit_lens(
    adapter: Any, prompt: Any, target: str | int, *, position: int = -1, layers: Any = None
) -> LogitLensResult:
    """Follow ``target`` through the layers of ``adapter``'s model on one prompt.

    Example::

        result = oculi.logit_lens(adapter, "Water is made of hydrogen and", " oxygen")
        result.crossover_layer        # where " oxygen" becomes, and stays, the top-1

    Args:
        adapter: an oculi adapter (``oculi.load(...)`` or ``oculi.attach(...)``).
        prompt: one prompt: a string or token ids ``[T]``/``[1, T]``.
        target: a one-token answer (a string, mind the leading space) or a token id.
        position: the position read (``-1``: the last token).
        layers: the layers to read (default all; the crossover is judged over these).

    Returns:
        A :class:`LogitLensResult`.

    Raises:
        InputError: a target of several tokens, or several prompts.
    """
    target_id = adapter.to_single_token(target)
    logits = adapter.capture_logits(prompt, config=LogitConfig(layers=layers, top_k=1))
    if logits.batched:
        raise InputError(f"logit_lens reads one prompt, got {logits.normalized.shape[0]}")
    return LogitLensResult.from_capture(
        logits, target_id, tokenizer=adapter.tokenizer, position=position
    )
