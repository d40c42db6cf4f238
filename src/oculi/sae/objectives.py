"""Training objectives: each kind's differentiable forward and loss.

All losses start from the reconstruction error as a fraction of the batch's variance,
``FVU = Σ‖y - ŷ‖² / Σ‖y - ȳ‖²`` (sparsify's objective: scale-free, 1.0 for predicting the
mean), plus the kind's sparsity term:

- ``topk`` / ``batchtopk``: none (``k`` fixes sparsity), plus the **AuxK** loss of Gao et al.
  (2024): the latents dead for a while (see ``dead_tokens``) reconstruct the residual error
  ``e = y - ŷ`` (detached) with their own top-``k_aux``; its FVU, weighted by
  ``aux_coefficient`` (1/32) and by ``min(1, n_dead / k_aux)``, gives dead latents a gradient.
  BatchTopK keeps the ``k · B`` largest activations of the whole batch, and tracks the
  threshold it will use at inference: an exponential moving average (rate 0.01) of the
  smallest activation kept.
- ``relu``: ``l1_coefficient · mean_tokens Σ_i a_i ‖W_dec[i]‖`` (``penalty="l1"`` keeps the
  decoder rows at unit norm so this is the plain L1; ``"l1_decoder_norm"`` lets the norms
  float, Anthropic's April 2024 variant).
- ``jumprelu``: ``l0_coefficient · mean_tokens L0`` with the straight-through estimators of
  Rajamanoharan et al. (2024): the step ``H(pre - θ)`` passes a gradient to the threshold
  ``θ = exp(log θ)`` through a rectangle kernel of width ``bandwidth``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from oculi.capture.interrupts import no_grad
from oculi.sae.model import SAE


def _rectangle(z: Tensor) -> Tensor:
    return ((z > -0.5) & (z < 0.5)).to(z.dtype)


class _JumpReLU(torch.autograd.Function):
    """``pre · H(pre - θ)``; ∂/∂θ through the rectangle kernel, ∂/∂pre the usual mask."""

    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, bandwidth: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return pre * (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        g_pre = (pre > theta).to(pre.dtype) * grad
        g_theta = -(theta / eps) * _rectangle((pre - theta) / eps) * grad
        return g_pre, g_theta.reshape(-1, theta.shape[-1]).sum(0), None


class _Step(torch.autograd.Function):
    """``H(pre - θ)``; gradient to θ only, through the rectangle kernel."""

    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, bandwidth: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        g_theta = -(1.0 / eps) * _rectangle((pre - theta) / eps) * grad
        return torch.zeros_like(pre), g_theta.reshape(-1, theta.shape[-1]).sum(0), None


class _SparseTopK(torch.autograd.Function):
    """``relu(x @ W + b)``'s ``k`` largest per row, whose backward touches only those entries.

    The gradient equals autograd's through the dense map (top-k scatters the incoming gradient
    into the kept columns, ReLU masks the zeros) but costs ``B·k·d_in`` instead of
    ``B·d_sae·d_in``: ``W[:, i]`` gets ``Σ_b g_bi x_b`` over the rows that kept latent ``i``.
    ``pre`` is returned without a gradient (the AuxK term computes its own).
    """

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor, k: int):  # type: ignore[override]
        pre = torch.addmm(b, x, w)
        top = torch.relu(pre).topk(k, dim=-1, sorted=False)
        ctx.save_for_backward(x, w, top.indices, top.values)
        ctx.mark_non_differentiable(top.indices, pre)
        return top.values, top.indices, pre

    @staticmethod
    def backward(ctx, g_values: Tensor, _g_indices: Tensor, _g_pre: Tensor):  # type: ignore[override]
        x, w, idx, values = ctx.saved_tensors
        g = g_values * (values > 0).to(g_values.dtype)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(idx, w.T.contiguous(), per_sample_weights=g, mode="sum")
        if ctx.needs_input_grad[1]:
            grad_wt = torch.zeros(w.shape[1], w.shape[0], dtype=w.dtype, device=w.device)
            step = max(1, (1 << 22) // max(1, idx.shape[1] * x.shape[1]))  # ~16 MB at a time
            for i in range(0, x.shape[0], step):
                rows = (g[i : i + step, :, None] * x[i : i + step, None, :]).reshape(-1, x.shape[1])
                grad_wt.index_add_(0, idx[i : i + step].reshape(-1), rows)
            grad_w = grad_wt.T
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(w.shape[1], dtype=g.dtype, device=g.device)
            grad_b.index_add_(0, idx.reshape(-1), g.reshape(-1))
        return grad_x, grad_w, grad_b, None


@dataclass
class StepOutput:
    """One training forward: the loss and what the progress bar shows."""

    loss: Tensor
    fvu: float
    l0: float
    fired: Tensor  # [d_sae] bool: latents active on this batch


@dataclass
class Objective:
    """The loss of one kind (see the module docstring); ``log_threshold`` for JumpReLU."""

    kind: str
    k: int | None
    l1_coefficient: float = 0.0
    l0_coefficient: float = 0.0
    bandwidth: float = 0.5
    aux_coefficient: float = 1 / 32
    k_aux: int = 256
    threshold_rate: float = 0.01
    log_threshold: Tensor | None = None

    def step(self, sae: SAE, x: Tensor, y: Tensor, dead: Tensor | None) -> StepOutput:
        kind = self.kind
        a: Tensor | None = None  # dense activations (TopK keeps only its k per row)
        xc = sae._input(x)
        if sae.center_input:
            xc = xc - sae.b_dec
        if kind == "topk":
            assert self.k is not None
            # encode and decode through the k kept latents only, as sparse TopK trainers do
            values, indices, pre = _SparseTopK.apply(xc, sae.W_enc, sae.b_enc, self.k)
            y_hat = F.embedding_bag(indices, sae.W_dec, per_sample_weights=values,
                                    mode="sum") + sae.b_dec  # fmt: skip
        else:
            pre = xc @ sae.W_enc + sae.b_enc
        if kind == "relu":
            a = torch.relu(pre)
        elif kind == "topk":
            pass  # encoded and decoded above
        elif kind == "batchtopk":
            assert self.k is not None
            flat = torch.relu(pre).flatten()
            top = flat.topk(min(self.k * pre.shape[0], flat.numel()))
            a = torch.zeros_like(flat).scatter(-1, top.indices, top.values).view_as(pre)
            chosen = top.values[top.values > 0]
            if chosen.numel():
                with no_grad():
                    low = chosen.min().to(sae.threshold.dtype)
                    sae.threshold.mul_(1 - self.threshold_rate).add_(self.threshold_rate * low)
        else:
            assert self.log_threshold is not None
            theta = self.log_threshold.exp()
            a = _JumpReLU.apply(pre, theta, self.bandwidth)
        if a is not None:
            y_hat = a @ sae.W_dec + sae.b_dec
        if sae.W_skip is not None:
            y_hat = y_hat + x @ sae.W_skip
        total = (y - y.mean(0)).square().sum().clamp_min(1e-12)
        err = y - y_hat
        fvu = err.square().sum() / total
        loss = fvu
        if kind == "relu" and self.l1_coefficient and a is not None:
            norms = sae.W_dec.norm(dim=-1)
            loss = loss + self.l1_coefficient * (a * norms).sum(-1).mean()
        if kind == "jumprelu" and self.l0_coefficient:
            assert self.log_threshold is not None
            l0 = _Step.apply(pre, self.log_threshold.exp(), self.bandwidth).sum(-1).mean()
            loss = loss + self.l0_coefficient * l0
        if kind in ("topk", "batchtopk") and dead is not None and self.aux_coefficient:
            n_dead = int(dead.sum())
            if n_dead:
                k_aux = min(self.k_aux, n_dead)
                if kind == "topk":  # the dead latents' pre-activations, with their gradient
                    cols = dead.nonzero().flatten()
                    pre_dead = xc @ sae.W_enc[:, cols] + sae.b_enc[cols]
                    top = pre_dead.topk(k_aux, dim=-1, sorted=False)
                    which = cols[top.indices]
                else:
                    top = pre.masked_fill(~dead, -torch.inf).topk(k_aux, dim=-1, sorted=False)
                    which = top.indices
                acts = torch.relu(top.values)
                e_hat = F.embedding_bag(which, sae.W_dec, per_sample_weights=acts, mode="sum")
                e = err.detach()
                aux = (e_hat - e).square().sum() / (e - e.mean(0)).square().sum().clamp_min(1e-12)
                loss = loss + self.aux_coefficient * min(1.0, n_dead / k_aux) * aux
        if a is None:  # TopK: the kept latents say which fired
            kept = values.detach() > 0
            fired = torch.bincount(indices[kept], minlength=sae.d_sae) > 0
            return StepOutput(loss, float(fvu.detach()), float(kept.sum(-1).double().mean()), fired)
        active = a.detach() > 0
        l0 = float(active.sum(-1).double().mean())
        return StepOutput(loss, float(fvu.detach()), l0, active.any(0))
