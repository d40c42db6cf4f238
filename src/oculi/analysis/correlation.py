"""Correlation with exact p-values, and the norm-entropy relation per head.

::

    r, p = CorrelationAnalysis.pearson_with_pvalue(q_norms.flatten(), entropy.flatten())
    per_head = CorrelationAnalysis.norm_entropy_correlation(capture, ignore_first=2)  # [L, H]

**The p-value.** Under the null hypothesis of no correlation between two normal variables,
``t = r √(n - 2) / √(1 - r²)`` follows Student's t distribution with ``ν = n - 2`` degrees of
freedom. The two-sided p-value ``P(|T| ≥ |t|)`` equals the regularised incomplete beta function
``I_{ν / (ν + t²)}(ν/2, 1/2)``, and since ``ν / (ν + t²) = 1 - r²`` that is simply
``I_{1 - r²}(ν/2, 1/2)``, computed by SciPy (``scipy.special.betainc``, the ``stats`` extra).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from oculi.analysis._common import attention_of, position_mask
from oculi.analysis.entropy import EntropyAnalysis
from oculi.analysis.norms import NormAnalysis
from oculi.errors import InputError, MissingExtraError


def scipy_special() -> Any:
    """``scipy.special``, or an error saying which extra installs it."""
    try:
        from scipy import special
    except ImportError:  # pragma: no cover - the stats extra (and dev) install scipy
        raise MissingExtraError(
            "p-values use SciPy; install with `pip install 'oculi[stats]'`"
        ) from None
    return special


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """``I_x(a, b) = B(x; a, b) / B(a, b)`` for ``a, b > 0`` and ``0 ≤ x ≤ 1`` (SciPy's betainc)."""
    if a <= 0 or b <= 0:
        raise ValueError(f"a and b must be positive, got a={a}, b={b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must lie in [0, 1], got {x}")
    return float(scipy_special().betainc(a, b, x))


def pearson_pvalue(r: float, n: int) -> float:
    """Two-sided p-value of a Pearson correlation ``r`` over ``n`` pairs (t-test, ``n - 2`` dof).

    ::

        pearson_pvalue(0.5, 30)        # ≈ 0.0049
    """
    if n < 3:
        raise ValueError(f"a p-value needs at least 3 pairs, got {n}")
    if math.isnan(r):
        return math.nan
    r2 = min(r * r, 1.0)
    return regularized_incomplete_beta((n - 2) / 2.0, 0.5, 1.0 - r2)


def _masked_pearson(x: Tensor, y: Tensor, keep: Tensor) -> Tensor:
    """Pearson r over the last dimension, counting only positions where ``keep`` is True."""
    x, y = x.double(), y.double()
    w = keep.to(x.dtype).expand_as(x)
    n = w.sum(-1, keepdim=True)
    # zero the skipped entries first: they may be NaN (padding), and NaN * 0 is NaN
    x, y = torch.where(w > 0, x, 0.0), torch.where(w > 0, y, 0.0)
    dx = (x - (x * w).sum(-1, keepdim=True) / n) * w
    dy = (y - (y * w).sum(-1, keepdim=True) / n) * w
    sxy, sxx, syy = (dx * dy).sum(-1), (dx * dx).sum(-1), (dy * dy).sum(-1)
    denom = (sxx * syy).sqrt()
    # a constant series has no correlation to speak of
    r = torch.where(denom > 0, sxy / denom, torch.nan)
    return r.clamp(-1.0, 1.0).float()


class CorrelationAnalysis:
    """Statistical relations between captured quantities; pure functions.

    ::

        r = CorrelationAnalysis.norm_entropy_correlation(capture)        # [L, H] Pearson r
        r, p = CorrelationAnalysis.pearson_with_pvalue(x, y)             # two [N] samples
    """

    @staticmethod
    def pearson_with_pvalue(x: Any, y: Any) -> tuple[float, float]:
        """Pearson correlation of ``x`` and ``y`` and its exact two-sided p-value.

        Example::

            r, p = CorrelationAnalysis.pearson_with_pvalue(q_norms.flatten(), entropy.flatten())

        Args:
            x, y: tensors, arrays or sequences with the same number of elements (flattened).
                Pairs where either value is NaN or infinite (say, padding) are left out.

        Returns:
            ``(r, p)`` as floats; both are NaN when either series is constant.

        Raises:
            InputError: different sizes, or fewer than 3 usable pairs.
        """
        xs = torch.as_tensor(x).detach().reshape(-1).double().cpu()
        ys = torch.as_tensor(y).detach().reshape(-1).double().cpu()
        if xs.numel() != ys.numel():
            raise InputError(f"x has {xs.numel()} values but y has {ys.numel()}; pair them up")
        finite = xs.isfinite() & ys.isfinite()
        n = int(finite.sum())
        if n < 3:
            raise InputError(f"a correlation with a p-value needs at least 3 finite pairs, got {n}")
        xs, ys = xs[finite], ys[finite]
        dx, dy = xs - xs.mean(), ys - ys.mean()
        denom = math.sqrt(float((dx * dx).sum()) * float((dy * dy).sum()))
        # a constant series has no correlation to speak of
        r = math.nan if denom == 0 else max(-1.0, min(1.0, float((dx * dy).sum()) / denom))
        return r, pearson_pvalue(r, n)

    @staticmethod
    def norm_entropy_correlation(
        capture: Any, ignore_first: int = 2
    ) -> Float[Tensor, "*batch layer head"]:
        """Per head, the Pearson r over positions between query norm and attention entropy.

        A negative value means the head attends more sharply where its queries are longer.

        Args:
            capture: an ``AttentionCapture`` with queries and patterns.
            ignore_first: leading (real) positions to leave out; row 0 always has entropy 0
                and the next few see too few keys to be comparable.

        Returns:
            ``[L, H]`` (``[B, L, H]`` for batches); NaN for a head whose norms or entropies are
            constant over the positions used.

        Raises:
            InputError: queries or patterns were not captured.
            ValueError: fewer than 3 positions remain after ``ignore_first``.
        """
        att = attention_of(capture)
        norms = NormAnalysis.q_norms(att)
        entropy = EntropyAnalysis.token_entropy(att)
        batched = entropy.dim() == 4
        n_pos = entropy.shape[-1]
        keep = position_mask(
            att.metadata, entropy.shape[0] if batched else None, n_pos, ignore_first
        )
        fewest = int(keep.sum(-1).min())
        if fewest < 3:
            raise ValueError(
                f"ignore_first={ignore_first} leaves {fewest} position(s); a correlation over "
                "positions needs at least 3"
            )
        keep = keep.to(entropy.device)
        if batched:
            keep = keep[:, None, None, :]
        return _masked_pearson(norms, entropy, keep)
