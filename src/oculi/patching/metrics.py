"""Metrics: what a patching experiment measures about the model's next-token prediction.

A metric reads the logits at one position (the last real token by default) and returns one
number per batch row. It declares which vocabulary rows it needs: ``logit_diff`` reads two
tokens, so a sweep computes two unembedding rows instead of all 262,144 of Gemma's vocabulary;
``probability``/``log_prob``/``kl`` need the full distribution at that one position.

Answers are strings (checked to be a single token, leading space and all) or token ids;
:meth:`Metric.bind` resolves them against an adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch


@dataclass(frozen=True)
class Metric:
    """A scalar function of the logits at one position.

    Attributes:
        name: what it measures (used in reports).
        kind: ``"logit_diff"``, ``"logit"``, ``"probability"``, ``"log_prob"`` or ``"kl"``.
        answers: the tokens it reads, as given (strings or ids).
        position: the position read, relative to the real tokens (``-1``: the last one).
        token_ids: resolved ids (set by :meth:`bind`).
        reference: for ``"kl"``, the log-probabilities to compare with (set by the caller).

    Made by :func:`logit_diff`, :func:`logit`, :func:`probability`, :func:`log_prob` or
    :func:`kl_divergence`::

        metric = patching.logit_diff(" Mary", " John").bind(adapter)
        metric(logits)             # logits [B, T, vocab] -> [B]
    """

    name: str
    kind: str
    answers: tuple[Any, ...] = ()
    position: int = -1
    token_ids: tuple[int, ...] | None = None
    reference: torch.Tensor | None = field(default=None, compare=False, repr=False)

    @property
    def full_vocab(self) -> bool:
        """Whether the metric needs the whole distribution (not just a few logits)."""
        return self.kind in ("probability", "log_prob", "kl")

    def bind(self, adapter: Any) -> Metric:
        """Resolve string answers to single token ids (errors name multi-token answers)."""
        ids = tuple(adapter.to_single_token(a) for a in self.answers)
        return replace(self, token_ids=ids)

    def columns(self) -> list[int] | None:
        """Vocabulary rows to compute, or ``None`` for all."""
        return None if self.full_vocab else list(self.token_ids or ())

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits [B, V]`` (or ``[B, n]`` restricted to :meth:`columns`) -> ``[B]``."""
        logits = logits.float()
        if self.kind == "logit_diff":
            return logits[:, 0] - logits[:, 1]
        if self.kind == "logit":
            return logits[:, 0]
        assert self.token_ids is not None or self.kind == "kl"
        logp = torch.log_softmax(logits, dim=-1)
        if self.kind in ("probability", "log_prob"):
            assert self.token_ids is not None  # the check above, for these kinds
            answer = logp[:, self.token_ids[0]]
            return answer.exp() if self.kind == "probability" else answer
        if self.kind == "kl":
            if self.reference is None:
                raise ValueError("kl needs reference log-probabilities (the clean run's)")
            ref = self.reference.to(logp.device).reshape(1, -1)
            return (ref.exp() * (ref - logp)).sum(-1)
        raise ValueError(f"unknown metric kind {self.kind!r}")


def logit_diff(correct: str | int, wrong: str | int, *, position: int = -1) -> Metric:
    """``logit(correct) − logit(wrong)`` at ``position`` (the IOI papers' metric)."""
    return Metric(f"logit_diff({correct!r}, {wrong!r})", "logit_diff", (correct, wrong), position)


def logit(token: str | int, *, position: int = -1) -> Metric:
    """The raw logit of ``token``.

    ::

        patching.activation_patching(adapter, clean, corrupt, metric=patching.logit(" Paris"))
    """
    return Metric(f"logit({token!r})", "logit", (token,), position)


def probability(token: str | int, *, position: int = -1) -> Metric:
    """``p(token)`` at ``position`` (causal tracing's metric)."""
    return Metric(f"p({token!r})", "probability", (token,), position)


def log_prob(token: str | int, *, position: int = -1) -> Metric:
    """``log p(token)`` at ``position``."""
    return Metric(f"log p({token!r})", "log_prob", (token,), position)


def kl_divergence(*, position: int = -1) -> Metric:
    """``KL(p_clean ‖ p_patched)`` at ``position``: 0 where the patch restores the clean run."""
    return Metric("KL(clean || patched)", "kl", (), position)
