"""The unembedding as the model applies it: ``W_U h + b``, then the final soft-cap, if any.

::

    w_u, bias, cap = adapter.unembedding()
    logits = project_logits(normed, w_u, bias, cap)     # float32 [..., V]

Gemma 2 and 3 squash their final logits as ``cap * tanh(logits / cap)``
(``final_logit_softcapping``); every place oculi turns a residual into logits (the lens,
patching metrics, intervention runs) goes through these two functions.
"""

from __future__ import annotations

import torch


def soft_cap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``cap * tanh(logits / cap)``, or ``logits`` unchanged when ``cap`` is ``None``."""
    if cap is None:
        return logits
    return torch.tanh(logits / cap) * cap


def project_logits(
    h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, cap: float | None
) -> torch.Tensor:
    """Float32 logits ``[..., V]`` of final-normed residuals ``h [..., d]``.

    ``w`` is the unembedding ``[V, d]`` (or some of its rows, with the matching ``bias``
    entries); ``h`` is moved to its device and dtype, the product is taken there and cast to
    float32 before the soft-cap.
    """
    out = torch.nn.functional.linear(h.to(w.device, w.dtype), w, bias).float()
    return soft_cap(out, cap)
