"""A linear estimate of each head's direct path into the logits, for path patching.

::

    clean = adapter.capture_full(clean_prompt, attention=CaptureConfig(capture_head_contributions=True))
    corrupt = adapter.capture_full(corrupt_prompt, attention=CaptureConfig(capture_head_contributions=True))
    est = CompositionAnalysis.path_patching_score(clean, corrupt, (io_id, s_id))
    est.values      # [L, H]: estimated metric with each head's output taken from the corrupt run

Path patching a sender head into the logits (:func:`oculi.patching.path_patching` with
``receivers=None``) reruns the clean prompt with that head's output from the corrupt prompt and
every later attention layer frozen. Its first-order estimate needs no forward at all: the head's
output changes by ``c_corrupt - c_clean`` (each head's residual contribution, captured), and
that change reaches the logit through the final norm, frozen at the clean run's scale, exactly
as in direct logit attribution. What the estimate leaves out is what the patched run recomputes:
later MLPs reading the changed residual, and the final norm's scale moving with it.
"""

from __future__ import annotations

from typing import Any

from oculi.analysis.dla import dla_full
from oculi.analysis.result import CompositionResult
from oculi.capture.structures import FullCapture
from oculi.errors import InputError


def path_patching_score(
    clean: FullCapture,
    corrupt: Any = None,
    target: Any = None,
    position: int = -1,
    *,
    adapter: Any = None,
    path: Any = None,
) -> CompositionResult:
    """Estimated metric (logit, or logit difference for a pair) per sender head ``[L, H]``.

    Args:
        clean, corrupt: FullCaptures of one prompt each, equal length, with head
            contributions (``CaptureConfig(capture_head_contributions=True)``).
        target: a token id or a pair ``(a, b)`` (the metric ``logit(a) - logit(b)``).
        position: where the metric is read.
        adapter: needed only for LayerNorm families (see direct logit attribution).

    Returns:
        ``.values [L, H]`` (the estimated metric with each head path-patched),
        ``.metadata["clean_metric"]`` and ``["effect"]`` (``values - clean_metric``).

    Seed 000's form, a capture, its residual and ``path=[(layer, head), ...]`` with no
    corrupt run and no metric, is refused with the calls that answer it: there is no sound
    single number for a path without a behaviour to measure.
    """
    if path is not None:
        raise InputError(
            "path_patching_score estimates path patching from a clean and a corrupt capture "
            "and a target: path_patching_score(clean, corrupt, target). For a path of heads, "
            "CompositionAnalysis.virtual_attention(capture, path) gives the pattern along it, "
            "composition_scores(adapter) the weights' composition between its heads, and "
            "oculi.path_patching(adapter, clean, corrupt, senders=[path[0]], "
            "receivers=path[1:2]) its causal effect"
        )
    if target is None:
        raise InputError("path_patching_score needs a target token id (or a pair of ids)")
    for name, cap in (("clean", clean), ("corrupt", corrupt)):
        if not isinstance(cap, FullCapture) or cap.attention is None:
            raise InputError(f"{name} must be a FullCapture with head contributions")
        if cap.metadata.get("single") is False:
            raise InputError(f"{name} must hold one prompt, not a batch")
    assert clean.attention is not None and corrupt.attention is not None
    if clean.attention.head_contributions is None or corrupt.attention.head_contributions is None:
        raise InputError(
            "path_patching_score needs each head's contribution: capture both with "
            "CaptureConfig(capture_head_contributions=True)"
        )
    if clean.attention.head_contributions.shape != corrupt.attention.head_contributions.shape:
        raise InputError("clean and corrupt prompts must have the same token length")
    base = dla_full(clean, target, position, adapter=adapter)
    # the corrupt heads through the clean run's frozen final norm
    mixed = FullCapture(
        attention=corrupt.attention,
        residual=clean.residual,
        logits=clean.logits,
        metadata=clean.metadata,
    )
    swapped = dla_full(mixed, target, position, adapter=adapter)
    assert base.heads is not None and swapped.heads is not None and base.logit is not None
    effect = (swapped.heads - base.heads).float()
    clean_metric = float(base.logit)
    return CompositionResult(
        effect + clean_metric,
        {"clean_metric": clean_metric, "effect": effect, "target": target, "position": position},
    )
