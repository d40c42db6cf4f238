"""How often each latent fires: density, dead and dense latents, over any stream of activations.

::

    stats = oculi.sae.latent_stats(sae, store["resid_post", 6])    # or a tensor, or batches
    stats.density          # [d_sae] fraction of tokens on which each latent is active
    stats.dead()           # latents that never fired
    stats.dense(0.1)       # latents active on more than 10% of tokens

A *dead* latent never fires on the data (it wastes capacity; training revives them with an
auxiliary loss); a *dense* one fires on a large share of tokens (often a sign it learned a
bias-like direction rather than a feature). Both are judged on the data passed, so pass
enough tokens (a harvest of ~1M rows is the usual scale).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from oculi.capture.interrupts import without_grad
from oculi.sae.model import SAE


@dataclass
class LatentStats:
    """Counts over ``n_tokens`` tokens.

    Attributes:
        n_tokens: tokens seen.
        counts: ``[d_sae]`` tokens on which each latent was active (int64).
        sums: ``[d_sae]`` the sum of its activations (float64).
        max: ``[d_sae]`` its largest activation.
    """

    n_tokens: int
    counts: Tensor
    sums: Tensor
    max: Tensor

    @property
    def density(self) -> Tensor:
        """``[d_sae]`` the fraction of tokens on which each latent is active."""
        return self.counts.double() / max(self.n_tokens, 1)

    @property
    def mean_active(self) -> Tensor:
        """``[d_sae]`` mean activation over the tokens where it is active (0 if never)."""
        return self.sums / self.counts.clamp_min(1)

    def dead(self) -> Tensor:
        """Indices of latents that never fired."""
        return (self.counts == 0).nonzero().flatten()

    def dense(self, threshold: float = 0.1) -> Tensor:
        """Indices of latents active on more than ``threshold`` of tokens."""
        if not 0 <= threshold <= 1:
            raise ValueError(f"threshold is a fraction of tokens in [0, 1], got {threshold}")
        return (self.density > threshold).nonzero().flatten()

    @property
    def dead_fraction(self) -> float:
        return float((self.counts == 0).double().mean())


def _batches(data: Any, batch_rows: int) -> Iterable[Tensor]:
    if isinstance(data, Tensor) or hasattr(data, "shape") and hasattr(data, "__getitem__"):
        n = int(data.shape[0])
        for i in range(0, n, batch_rows):
            chunk = data[i : i + batch_rows]
            yield chunk if isinstance(chunk, Tensor) else torch.from_numpy(np.asarray(chunk))
        return
    for chunk in data:
        yield chunk if isinstance(chunk, Tensor) else torch.from_numpy(np.asarray(chunk))


@without_grad
def latent_stats(sae: SAE, data: Any, *, batch_rows: int = 8192) -> LatentStats:
    """Count each latent's activity over ``data``.

    Args:
        sae: the SAE.
        data: ``[N, d_in]`` rows: a tensor, a numpy or harvest array (``store[site, layer]``,
            read ``batch_rows`` at a time), or an iterable of ``[n, d_in]`` batches.
        batch_rows: rows encoded at once for arrays.
    """
    counts = torch.zeros(sae.d_sae, dtype=torch.int64, device=sae.device)
    sums = torch.zeros(sae.d_sae, dtype=torch.float64, device=sae.device)
    peak = torch.zeros(sae.d_sae, dtype=sae.dtype, device=sae.device)
    n = 0
    for x in _batches(data, batch_rows):
        a = sae.encode(x)
        a = a.reshape(-1, sae.d_sae)
        counts += (a != 0).sum(0)
        sums += a.double().sum(0)
        peak = torch.maximum(peak, a.amax(0))
        n += a.shape[0]
    return LatentStats(n, counts.cpu(), sums.cpu(), peak.cpu())
