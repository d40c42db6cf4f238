"""Circuit detection: scoring heads against the attention patterns of known mechanisms.

::

    ids = oculi.analysis.repeated_random_tokens(adapter, 50)   # random tokens, repeated twice
    capture = adapter.capture(ids)
    induction = CircuitDetection.detect_induction_heads(capture)   # [L, H]
    induction > 0.5                                                # the induction heads

Each score is an average amount of attention, so it lies in ``[0, 1]`` and 1 means the head
does exactly what the mechanism predicts at every position it is measured on. Write ``A`` for
one head's pattern of one sequence of ``T`` tokens ``x_0 .. x_{T-1}`` (``A[t, j]``: attention
from query ``t`` to key ``j``):

* **previous-token**: the mean over ``t = 1 .. T-1`` of ``A[t, t-1]``.
* **induction** (``A B ... A → B``): for a query ``t``, let ``S_t`` be the positions right
  after the earlier occurrences of ``x_t``: ``S_t = {s + 1 : s ≤ t - 2, x_s = x_t}`` (the
  occurrence at ``t - 1`` would point at ``t`` itself, so it is left out). The score is the
  mean, over the queries whose ``S_t`` is not empty, of ``Σ_{j ∈ S_t} A[t, j]``. On a random
  sequence repeated twice, ``S_t`` is the one position ``t - n + 1`` (``n`` the period) for
  every query of the second copy. The token ids come from ``capture.metadata["input_ids"]``
  unless given; a sequence without a repeated token cannot measure induction.
* **duplicate-token** (the IOI paper's heads that notice a repeated name): for a query ``t``,
  let ``D_t = {s < t : x_s = x_t}``, the earlier occurrences of the same token. The score is
  the mean, over queries with ``D_t`` not empty, of ``Σ_{s ∈ D_t} A[t, s]``.
* **BOS** (attention sink): the mean over ``t = 1 .. T-1`` of ``A[t, 0]``, attention to the
  first token (row 0 has nowhere else to look, so it is left out).
* **recent**: the mean over ``t = w .. T-1`` of ``Σ_{j = t-w+1}^{t} A[t, j]``, attention to
  the last ``w`` tokens including the current one (``window``, default 3). Queries closer than
  ``w`` to the start are left out, since their window holds every key they can see.

Scores are indexed by the capture's layer list: row ``i`` is model layer
``capture.layers[i]`` (the same thing when every layer was captured). For batches each score
is computed per sequence over its real (unpadded) tokens, giving ``[B, L, H]``.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from oculi.analysis._common import (
    attention_of,
    capture_layer,
    check_fraction,
    check_index,
    field,
    is_batched,
    sequences,
    token_ids,
)
from oculi.analysis.validation import ioi_heads, validate
from oculi.errors import InputError

PATTERNS = ("induction", "duplicate_token", "previous_token", "bos", "recent", "unknown")
DEFAULT_THRESHOLDS = {
    "induction": 0.5,
    "duplicate_token": 0.5,
    "previous_token": 0.8,
    "bos": 0.5,
    "recent": 0.8,
}


# -- one sequence: A [L, H, t, t] -> [L, H] ------------------------------------------------
def _check_length(pattern: Tensor, need: int, what: str) -> None:
    if pattern.shape[-1] < need:
        raise InputError(
            f"{what} needs sequences of at least {need} tokens; got one of {pattern.shape[-1]}"
        )


def _previous_token(pattern: Tensor) -> Tensor:
    _check_length(pattern, 2, "the previous-token score")
    return torch.diagonal(pattern, offset=-1, dim1=-2, dim2=-1).mean(-1)


def _bos(pattern: Tensor) -> Tensor:
    _check_length(pattern, 2, "the BOS score")
    return pattern[..., 1:, 0].mean(-1)


def _recent(pattern: Tensor, window: int) -> Tensor:
    _check_length(pattern, window + 1, f"the recent score with window={window}")
    # diagonal -k holds A[k + i, i], query k + i; keep queries t >= window
    parts = [
        torch.diagonal(pattern, offset=-k, dim1=-2, dim2=-1)[..., window - k :]
        for k in range(window)
    ]
    return torch.stack(parts).sum(0).mean(-1)


def _induction_targets(ids: list[int]) -> Tensor:
    """Bool ``[t, t]``: ``M[q, j]`` when ``j - 1 ≤ q - 2`` and ``x_{j-1} == x_q``."""
    x = torch.tensor(ids)
    same = (x[:, None] == x[None, :]).tril(diagonal=-2)  # same[q, s], s <= q - 2
    targets = torch.zeros_like(same)
    targets[:, 1:] = same[:, :-1]
    return targets


def _targeted(pattern: Tensor, targets: Tensor) -> Tensor | None:
    """Mean over queries with a target of the attention on their targets; None if none has."""
    targets = targets.to(pattern.device)
    queries = targets.any(-1)
    if not bool(queries.any()):
        return None
    return (pattern * targets).sum(-1)[..., queries].mean(-1)


def _induction(pattern: Tensor, ids: list[int]) -> Tensor | None:
    """Induction scores ``[L, H]``, or None when no token repeats."""
    return _targeted(pattern, _induction_targets(ids))


def _duplicate(pattern: Tensor, ids: list[int]) -> Tensor | None:
    """Duplicate-token scores ``[L, H]``: attention to earlier copies (``s < q``, same token)."""
    x = torch.tensor(ids)
    return _targeted(pattern, (x[:, None] == x[None, :]).tril(diagonal=-1))


def _repeated(name: str, score):
    """``score`` for ``_per_sequence``, raising when a sequence has no repeated token."""

    def run(pattern: Tensor, ids: list[int]) -> Tensor:
        out = score(pattern, ids)
        if out is None:
            raise InputError(
                f"no token repeats in this sequence, so there is no {name} to measure: it is "
                "read at tokens that occurred before (A B ... A -> B). Capture a sequence that "
                "repeats, e.g. a random one twice: ids = oculi.analysis.repeated_random_tokens("
                "adapter, n=50); capture = adapter.capture(ids)"
            )
        return out

    return run


def _per_sequence(capture: Any, score, input_ids: Any = None, need_ids: bool = False) -> Tensor:
    """Apply ``score(pattern, ids)`` to each sequence; ``[L, H]`` or ``[B, L, H]``."""
    att = attention_of(capture)
    patterns = field(att, "patterns")
    batched = is_batched(patterns, "patterns")
    n_pos = patterns.shape[-1]
    ids = (
        token_ids(att, input_ids, patterns.shape[0] if batched else None, n_pos)
        if need_ids
        else None
    )
    if need_ids and ids is None:
        raise InputError(
            "induction scores need the token ids: this capture has no "
            'metadata["input_ids"], so pass input_ids= explicitly'
        )
    scores = [score(p, row_ids) for p, row_ids in sequences(patterns, att.metadata, batched, ids)]
    return torch.stack(scores) if batched else scores[0]


class CircuitDetection:
    """Scores of attention heads against canonical mechanisms; pure functions of a capture.

    :meth:`validate` checks found heads causally (see :mod:`oculi.analysis.validation`).

    ::

        capture = adapter.capture(repeated_tokens)                       # [2 * n] ids, seeded
        CircuitDetection.detect_induction_heads(capture)                 # [L, H] in [0, 1]
        CircuitDetection.detect_previous_token_heads(capture)            # [L, H]
    """

    validate = staticmethod(validate)
    ioi_heads = staticmethod(ioi_heads)

    @staticmethod
    def detect_induction_heads(
        capture: Any, threshold: float = 0.5, *, input_ids: Any = None
    ) -> Float[Tensor, "*batch layer head"]:
        """Induction score of every head (see the module docstring for the definition).

        Example::

            scores = CircuitDetection.detect_induction_heads(capture)   # [L, H]
            heads = (scores > 0.5).nonzero()

        Args:
            capture: an ``AttentionCapture`` with patterns, best of a repeated random sequence.
            threshold: the score from which a head counts as an induction head. The scores
                are returned as they are (compare with ``scores > threshold``); it is checked
                to lie in ``[0, 1]``.
            input_ids: the token ids ``[T]`` or ``[B, T]``; by default
                ``capture.metadata["input_ids"]``.

        Returns:
            ``[L, H]`` in ``[0, 1]`` (``[B, L, H]`` for batches); row ``i`` is
            ``capture.layers[i]``.

        Raises:
            InputError: no token ids, or no token that repeats (for a batch: in some row).
        """
        check_fraction(threshold, "threshold")
        return _per_sequence(capture, _repeated("induction", _induction), input_ids, True)

    @staticmethod
    def detect_duplicate_token_heads(
        capture: Any, threshold: float = 0.5, *, input_ids: Any = None
    ) -> Float[Tensor, "*batch layer head"]:
        """Attention from each token to its earlier copies, per head (module docstring).

        Example::

            ids = adapter.prepare("When Mary and John went to the store, John gave").input_ids
            dup = CircuitDetection.detect_duplicate_token_heads(adapter.capture(ids))  # [L, H]

        Returns:
            ``[L, H]`` in ``[0, 1]`` (``[B, L, H]`` for batches).

        Raises:
            InputError: no token ids, or no token that repeats.
        """
        check_fraction(threshold, "threshold")
        return _per_sequence(
            capture, _repeated("duplicate-token attention", _duplicate), input_ids, True
        )

    @staticmethod
    def detect_previous_token_heads(
        capture: Any, threshold: float = 0.8
    ) -> Float[Tensor, "*batch layer head"]:
        """Mean attention from each position to the one before it, per head.

        Args:
            capture: an ``AttentionCapture`` with patterns.
            threshold: the score from which a head counts as a previous-token head; the
                scores are returned unthresholded (checked to lie in ``[0, 1]``).

        Returns:
            ``[L, H]`` in ``[0, 1]`` (``[B, L, H]`` for batches); row ``i`` is
            ``capture.layers[i]``.
        """
        check_fraction(threshold, "threshold")
        return _per_sequence(capture, lambda p, _: _previous_token(p))

    @staticmethod
    def detect_positional_heads(
        capture: Any,
        bos_threshold: float = 0.5,
        recent_threshold: float = 0.8,
        window: int = 3,
    ) -> dict[str, Tensor]:
        """Heads that attend by position: to the first token, or to the last few.

        Example::

            positional = CircuitDetection.detect_positional_heads(capture)
            positional["bos"].sum()           # how many heads are attention sinks

        Args:
            capture: an ``AttentionCapture`` with patterns.
            bos_threshold: BOS score from which a head is a BOS head.
            recent_threshold: recent score from which a head is a recent-token head.
            window: how many of the latest tokens (the current one included) count as recent.

        Returns:
            ``{"bos": Bool[L, H], "recent": Bool[L, H], "bos_score": Float[L, H],
            "recent_score": Float[L, H]}`` (each with a leading ``B`` for batches).
        """
        bos_threshold = check_fraction(bos_threshold, "bos_threshold")
        recent_threshold = check_fraction(recent_threshold, "recent_threshold")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive int, got {window!r}")
        bos = _per_sequence(capture, lambda p, _: _bos(p))
        recent = _per_sequence(capture, lambda p, _: _recent(p, window))
        return {
            "bos": bos >= bos_threshold,
            "recent": recent >= recent_threshold,
            "bos_score": bos,
            "recent_score": recent,
        }

    @staticmethod
    def classify_attention_head(
        capture: Any,
        layer: int,
        head: int,
        *,
        input_ids: Any = None,
        thresholds: dict[str, float] | None = None,
        window: int = 3,
    ) -> dict[str, Any]:
        """Name the mechanism one head follows best.

        Each pattern is scored as in the module docstring; the head gets the first of
        ``induction``, ``duplicate_token``, ``previous_token``, ``bos``, ``recent`` whose score
        reaches its
        threshold (most specific first: a previous-token head also attends to recent tokens),
        or ``unknown``. Induction is only tried when the token ids are known and some token
        repeats, and recent only on sequences longer than ``window``. For batches the scores
        are averaged over the sequences.

        Example::

            CircuitDetection.classify_attention_head(capture, layer=5, head=1)
            # {'pattern': 'previous_token', 'score': 0.93, 'scores': {...}}

        Args:
            capture: an ``AttentionCapture`` with patterns.
            layer: a model layer index, one of ``capture.layers`` (negatives count from the
                model's last layer).
            head: a query-head index ``0 .. n_heads - 1`` (negatives count from the end).
            input_ids: token ids for the induction score (default: the capture's metadata).
            thresholds: overrides of the defaults ``{"induction": 0.5, "duplicate_token": 0.5,
                "previous_token": 0.8, "bos": 0.5, "recent": 0.8}``.
            window: the recent-token window.

        Returns:
            ``{"pattern": str, "score": float, "scores": {pattern: float}}``: the pattern, its
            score (for ``unknown``, the best score of any pattern) and every score computed.

        Raises:
            LayerIndexError: ``layer`` was not captured (the message lists the layers held).
            IndexError: ``head`` out of range.
        """
        att = attention_of(capture)
        patterns = field(att, "patterns")
        batched = is_batched(patterns, "patterns")
        i = capture_layer(att.layers, layer, att.metadata.get("n_layers_model"))
        h = check_index(head, patterns.shape[-3], "head")
        limits = _limits(thresholds, window)
        # score only the one head: slice it out as [(B,) 1, 1, T, T]
        one = patterns[:, i, h, None, None] if batched else patterns[i, h][None, None]
        tensors = _scores(att, one, batched, input_ids, window)
        scores = {name: float(t[0, 0]) for name, t in tensors.items()}
        for name in PATTERNS[:-1]:
            if name in scores and scores[name] >= limits[name]:
                return {"pattern": name, "score": scores[name], "scores": scores}
        return {"pattern": "unknown", "score": max(scores.values()), "scores": scores}

    @staticmethod
    def classify_heads(
        capture: Any,
        *,
        input_ids: Any = None,
        thresholds: dict[str, float] | None = None,
        window: int = 3,
    ) -> dict[str, Any]:
        """:meth:`classify_attention_head` for every head of the capture at once.

        Example::

            found = CircuitDetection.classify_heads(capture, thresholds={"induction": 0.3})
            found["labels"][5][1]          # 'induction'
            found["scores"]["bos"]         # [L, H]

        Returns:
            ``{"labels": [[str] * H] * L, "scores": {pattern: Float[L, H]},
            "layers": capture.layers, "thresholds": {pattern: float}}``.
        """
        att = attention_of(capture)
        patterns = field(att, "patterns")
        batched = is_batched(patterns, "patterns")
        limits = _limits(thresholds, window)
        scores = _scores(att, patterns, batched, input_ids, window)
        n_layers, n_heads = patterns.shape[-4], patterns.shape[-3]
        labels = [["unknown"] * n_heads for _ in range(n_layers)]
        for name in reversed(PATTERNS[:-1]):  # the most specific pattern is written last
            if name in scores:
                for i, h in (scores[name] >= limits[name]).nonzero().tolist():
                    labels[i][h] = name
        return {
            "labels": labels,
            "scores": scores,
            "layers": tuple(att.layers),
            "thresholds": limits,
        }


def _limits(thresholds: dict[str, float] | None, window: int) -> dict[str, float]:
    limits = dict(DEFAULT_THRESHOLDS)
    for name, value in (thresholds or {}).items():
        if name not in limits:
            raise ValueError(f"unknown pattern {name!r} in thresholds; valid: {list(limits)}")
        limits[name] = check_fraction(value, f"thresholds[{name!r}]")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    return limits


def _scores(
    att: Any, patterns: Tensor, batched: bool, input_ids: Any, window: int
) -> dict[str, Tensor]:
    """Every pattern's score ``[L', H']`` of ``patterns [(B,) L', H', T, T]``, rows averaged.

    Induction and duplicate-token need token ids and some repeated token; recent needs
    sequences longer than ``window`` (else a window holds every key).
    """
    ids = token_ids(att, input_ids, patterns.shape[0] if batched else None, patterns.shape[-1])
    seqs = sequences(patterns, att.metadata, batched, ids)
    shortest = min(p.shape[-1] for p, _ in seqs)

    def mean_over_rows(score) -> Tensor:
        return torch.stack([score(p, row_ids) for p, row_ids in seqs]).mean(0)

    scores: dict[str, Tensor] = {}
    if ids is not None:  # then sequences() gives every row its ids
        for name, score in (("induction", _induction), ("duplicate_token", _duplicate)):
            rows = (score(p, row_ids) for p, row_ids in seqs if row_ids is not None)
            found = [s for s in rows if s is not None]
            if found:
                scores[name] = torch.stack(found).mean(0)
    if shortest >= 2:
        scores["previous_token"] = mean_over_rows(lambda p, _: _previous_token(p))
        scores["bos"] = mean_over_rows(lambda p, _: _bos(p))
    if shortest > window:  # shorter sequences have no query whose window excludes token 0
        scores["recent"] = mean_over_rows(lambda p, _: _recent(p, window))
    return scores
