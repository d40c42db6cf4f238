"""Resampling dead latents (Bricken et al. 2023, "Towards Monosemanticity"): the standard fix
for latents an L1-penalised ReLU SAE stops using early in training.

::

    sae = oculi.sae.train(store, "resid_post", 6, d_sae=8192, kind="relu",
                          resample_every=2_000_000)       # tokens between resamplings

At each resampling (every ``resample_every`` tokens, in the first half of the run):

1. **Dead** latents are those that did not fire since the last resampling (or the start).
2. The current SAE reconstructs a sample of ``resample_rows`` inputs; each input is drawn with
   probability proportional to its *squared* reconstruction loss, so the dead latents are
   pointed at what the SAE explains worst.
3. For each dead latent and its drawn input ``x`` (centred by ``b_dec``): the decoder row
   becomes ``x / ‖x‖`` (for a transcoder, the drawn target's residual ``y - ŷ``, normalised),
   the encoder column ``x / ‖x‖`` scaled to 0.2 × the mean encoder norm of the live latents
   (so a revived latent starts weak, not dominating), and its encoder bias 0.
4. Adam's moments of those rows and columns are zeroed (stale moments would undo the reset).

The draw is seeded by the run's seed and step, so a resumed run resamples exactly as an
uninterrupted one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from oculi.capture.interrupts import no_grad
from oculi.sae.model import SAE


def resample_dead(
    sae: SAE,
    x: Tensor,
    y: Tensor,
    dead: Tensor,
    opt: torch.optim.Optimizer,
    generator: torch.Generator,
) -> int:
    """Re-initialise the ``dead [d_sae]`` (bool) latents of ``sae`` from inputs ``x [N, d_in]``
    (targets ``y [N, d_out]``, normalised as in training) drawn by squared loss; returns how
    many were resampled. Edits ``sae`` and ``opt``'s state in place."""
    idx = dead.nonzero()[:, 0]
    n = int(idx.numel())
    if n == 0:
        return 0
    with no_grad():
        losses = (y - sae(x)).square().sum(-1).double()  # [N]
        weights = losses.square()
        if not bool(weights.sum() > 0):  # a perfect reconstruction: draw uniformly
            weights = torch.ones_like(weights)
        draw = torch.multinomial(
            weights.cpu(), n, replacement=n > len(weights), generator=generator
        )
        draw = draw.to(x.device)
        if sae.is_transcoder:
            enc_dir = x[draw]
            dec_dir = (y - sae(x))[draw]
        else:
            enc_dir = dec_dir = x[draw] - sae.b_dec
        enc_dir = enc_dir / enc_dir.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        dec_dir = dec_dir / dec_dir.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        alive = ~dead
        norms = sae.W_enc.norm(dim=0)  # [d_sae]: W_enc is [d_in, d_sae]
        scale = 0.2 * (float(norms[alive].mean()) if bool(alive.any()) else 1.0)
        sae.W_dec[idx] = dec_dir.to(sae.W_dec.dtype)
        sae.W_enc[:, idx] = (enc_dir * scale).T.to(sae.W_enc.dtype)
        sae.b_enc[idx] = 0
        _reset_moments(opt, sae, idx)
    return n


def _reset_moments(opt: torch.optim.Optimizer, sae: SAE, idx: Tensor) -> None:
    """Zero Adam's first and second moments of the resampled latents' rows and columns."""
    where = {id(sae.W_dec): (0, idx), id(sae.W_enc): (1, idx), id(sae.b_enc): (0, idx)}
    for group in opt.param_groups:
        for p in group["params"]:
            if id(p) not in where or p not in opt.state:
                continue
            dim, rows = where[id(p)]
            for key in ("exp_avg", "exp_avg_sq"):
                moment = opt.state[p].get(key)
                if moment is not None:
                    moment.index_fill_(dim, rows, 0.0)
