"""Attention entropy: how spread out each query's attention is, and how far it looks.

::

    entropy = EntropyAnalysis.token_entropy(capture)      # [L, H, T], nats
    focused = entropy.mean(-1).argmin()                   # the most focused head overall
    EntropyAnalysis.attention_distance(capture)           # [L, H, T], tokens looked back
    EntropyAnalysis.max_attention(capture)                # [L, H, T], the largest weight

Row ``t`` of a head's pattern is a probability distribution over the keys ``0..t``. Its
entropy ``H = -Σ_j p_j log p_j`` (natural log, with ``0 · log 0 = 0``) is 0 when the query
attends to one token and ``log(t + 1)`` when it spreads evenly over all ``t + 1`` it can see.
``exp(H)``, the *effective rank*, reads as "how many tokens it attends to": 1 for a one-hot
row, ``t + 1`` for a uniform one. Early rows can see few tokens (row 0 always has entropy 0),
so averages over positions can skip the first few (``ignore_first``).

Two more statistics of each row: its *range*, the mean distance ``Σ_j p_j (t - j)`` the query
looks back (0 for a head that attends to itself, ``t`` for one that attends to the first
token, ``t / 2`` for a uniform row), and its *focus*, the largest weight ``max_j p_j`` (1 for a
one-hot row, ``1 / (t + 1)`` for a uniform one).

Batched captures give ``[B, L, H, T]``; positions that are padding hold ``NaN`` so that they
cannot slip into a mean unnoticed (``torch.nanmean`` skips them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from oculi.analysis._common import attention_of, field, is_batched, mark_padding, position_mask


def _per_query(capture: Any, stat: Callable[[Tensor], Tensor]) -> Tensor:
    """``stat`` of each query row of the capture's patterns, ``NaN`` at padded queries."""
    att = attention_of(capture)
    patterns = field(att, "patterns")
    return mark_padding(stat(patterns), att.metadata, is_batched(patterns, "patterns"))


class EntropyAnalysis:
    """Entropy of attention patterns; every method is a pure function of its captures.

    ::

        capture = adapter.capture(prompt)                      # patterns [L, H, T, T]
        EntropyAnalysis.token_entropy(capture)                 # [L, H, T], nats per query position
        EntropyAnalysis.mean_entropy(capture, ignore_first=1)  # [L, H]
    """

    @staticmethod
    def token_entropy(capture: Any) -> Float[Tensor, "*batch layer head pos"]:
        """Entropy (nats) of each query position's attention distribution.

        Example::

            entropy = EntropyAnalysis.token_entropy(adapter.capture(ids))   # [L, H, T]

        Args:
            capture: an ``AttentionCapture`` with patterns (or a ``FullCapture``).

        Returns:
            ``[L, H, T]`` float32 (``[B, L, H, T]`` for batches, ``NaN`` at padding); the
            first dimension follows ``capture.layers``.

        Raises:
            InputError: the capture holds no patterns.
        """
        # xlogy gives 0 where p == 0, the limit of p log p; 0.0 - : no -0.0
        return _per_query(capture, lambda p: 0.0 - torch.special.xlogy(p, p).sum(-1))

    @staticmethod
    def effective_rank(capture: Any) -> Float[Tensor, "*batch layer head pos"]:
        """``exp(entropy)``: about how many tokens each query position attends to.

        Returns:
            ``[L, H, T]`` (``[B, L, H, T]`` for batches), between 1 and ``t + 1`` at row ``t``.
        """
        return EntropyAnalysis.token_entropy(capture).exp()

    @staticmethod
    def mean_entropy(capture: Any, ignore_first: int = 0) -> Float[Tensor, "*batch layer head"]:
        """Entropy averaged over each sequence's real positions, skipping its first few.

        Args:
            capture: an ``AttentionCapture`` with patterns.
            ignore_first: how many leading (real) positions to leave out; their rows see
                so few keys that their entropy says little about the head.

        Returns:
            ``[L, H]`` (``[B, L, H]`` for batches).

        Raises:
            ValueError: ``ignore_first`` leaves no position.
        """
        att = attention_of(capture)
        entropy = EntropyAnalysis.token_entropy(att)
        batched = entropy.dim() == 4
        keep = position_mask(
            att.metadata, entropy.shape[0] if batched else None, entropy.shape[-1], ignore_first
        ).to(entropy.device)
        if batched:
            keep = keep[:, None, None, :]
        return entropy.masked_fill(~keep, float("nan")).nanmean(-1)

    @staticmethod
    def delta_entropy(
        capture_a: Any, capture_b: Any, ignore_first: int = 0
    ) -> Float[Tensor, "*batch layer head"]:
        """How much more diffuse each head is in ``capture_a`` than in ``capture_b``.

        ``mean_t H_a(t) - mean_t H_b(t)`` per head, each mean over its own capture's real
        positions, so the two captures may have different lengths (say, an intervention run
        against its baseline: positive values mean the intervention flattened attention).

        Example::

            delta = EntropyAnalysis.delta_entropy(capture_scaled, capture_baseline)  # [L, H]

        Args:
            capture_a, capture_b: attention captures of the same layers and heads.
            ignore_first: leading positions to leave out of both means.

        Returns:
            ``[L, H]`` (``[B, L, H]`` when either is a batch).

        Raises:
            ValueError: the captures hold different layers or head counts.
        """
        a, b = attention_of(capture_a), attention_of(capture_b)
        if tuple(a.layers) != tuple(b.layers):
            raise ValueError(
                f"the captures hold different layers: {list(a.layers)} and {list(b.layers)}; "
                "capture both with the same CaptureConfig(layers=...)"
            )
        mean_a = EntropyAnalysis.mean_entropy(a, ignore_first)
        mean_b = EntropyAnalysis.mean_entropy(b, ignore_first)
        if mean_a.shape[-1] != mean_b.shape[-1]:
            raise ValueError(
                f"the captures have {mean_a.shape[-1]} and {mean_b.shape[-1]} heads; they must "
                "come from the same model"
            )
        return mean_a - mean_b.to(mean_a.device)

    @staticmethod
    def attention_distance(capture: Any) -> Float[Tensor, "*batch layer head pos"]:
        """How far back each query looks: ``Σ_j p_tj · (t - j)``, in tokens.

        Example::

            distance = EntropyAnalysis.attention_distance(capture)   # [L, H, T]
            distance.nanmean(-1)          # per head: local (small) or long-range (large)

        Padding keys carry no weight, so in a padded batch the distance counts real tokens.

        Returns:
            ``[L, H, T]`` float32 (``[B, L, H, T]`` for batches, ``NaN`` at padding).

        Raises:
            InputError: the capture holds no patterns.
        """

        def distance(p: Tensor) -> Tensor:
            pos = torch.arange(p.shape[-1], dtype=p.dtype, device=p.device)
            return (p * (pos[:, None] - pos[None, :])).sum(-1)  # weights times t - j

        return _per_query(capture, distance)

    @staticmethod
    def max_attention(capture: Any) -> Float[Tensor, "*batch layer head pos"]:
        """The largest weight of each query's attention row: how focused it is.

        Example::

            focus = EntropyAnalysis.max_attention(capture)   # [L, H, T], in [1/(t+1), 1]

        Returns ``[L, H, T]`` float32 (``[B, L, H, T]`` for batches, ``NaN`` at padding);
        raises ``InputError`` when the capture holds no patterns.
        """
        return _per_query(capture, lambda p: p.amax(-1))
