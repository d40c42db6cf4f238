"""What a latent means: its top-activating contexts, activation histogram, density, and the
tokens its decoder direction promotes, from one streaming pass over a harvest.

::

    feats = oculi.sae.top_activations(store, sae, k=16)      # one pass, every latent
    feats.density[12], feats.values[:, 12]                   # how often, how strongly
    feats.contexts(12, window=8)                             # [Context]: tokens around each top
    logit_effects(adapter, sae, 12, context=feats.contexts(12)[0])   # promoted / suppressed

**Top activations.** The store is read once, in row order, ``batch_rows`` rows at a time; each
batch is encoded and merged into a running top-``k`` per latent (``[k, d_sae]`` values and
row numbers), so every latent's best examples over the whole harvest come from one pass. The
same pass counts how many tokens each latent fires on (density) and bins its non-zero
activations on a log scale (``bins``: ten per decade from 1e-3 to 1e4; values outside fall in
the end bins).

**Contexts** come from the store's index: the row's prompt and position, and the tokens of that
prompt around it (rows of one prompt are consecutive), with the latent's activation at each.

**Logit effects.** A latent writes ``a · W_dec[i]`` into the residual stream. Through the final
norm frozen at the scale the forward used at one position (as :func:`oculi.analysis.readout.
frozen_norm` freezes it for direct logit attribution and ``promoted_tokens`` for heads), that
changes token ``v``'s logit by ``a · W_U[v] · (s ⊙ W_dec[i])``: the tokens with the largest
and smallest values are those it promotes and suppresses. It is the *direct* effect only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from oculi.capture.interrupts import no_grad, without_grad
from oculi.capture.sites import SITE_KINDS
from oculi.errors import InputError
from oculi.sae.model import SAE

if TYPE_CHECKING:
    from oculi.models.adapter import Adapter

#: histogram bin edges of non-zero activations: ten per decade, 1e-3 .. 1e4
BINS = torch.logspace(-3, 4, 71, dtype=torch.float64)


@dataclass
class Context:
    """One top-activating example of a latent.

    Attributes:
        latent, activation: the latent and its activation at the token.
        row, prompt_id, position: where in the store (``position`` among the prompt's tokens).
        token_ids: the tokens of the window around it; ``activations``: the latent at each.
        center: the index in ``token_ids`` of the token itself.

    Example::

        top = top_activations(store, sae, k=20)
        ctx = top.contexts(latent=123, window=8)[0]
        ctx.token_ids[ctx.center], ctx.activation     # the token it fired on, and how much
    """

    latent: int
    activation: float
    row: int
    prompt_id: int
    position: int
    token_ids: list[int]
    activations: list[float]
    center: int


@dataclass
class TopActivations:
    """The result of :func:`top_activations` (see the module docstring).

    Attributes:
        values: ``[k, d_sae]`` each latent's largest activations, best first (0: fewer).
        rows: ``[k, d_sae]`` the store rows they are at (-1: none).
        counts: ``[d_sae]`` tokens each latent fired on; ``n_tokens`` tokens read.
        hist: ``[d_sae, 70]`` counts of non-zero activations per :data:`BINS` bin.
    """

    sae: SAE
    store: Any
    values: Tensor
    rows: Tensor
    counts: Tensor
    n_tokens: int
    hist: Tensor

    @property
    def density(self) -> Tensor:
        """``[d_sae]`` the fraction of tokens each latent fired on."""
        return self.counts.double() / max(self.n_tokens, 1)

    def page(self, adapter: Any, latents: Any = None, **options: Any) -> str:
        """The offline HTML page of ``latents`` (:func:`oculi.visualize.feature_page`)."""
        from oculi.visualize.features import feature_page

        return feature_page(self, adapter, latents, **options)

    def contexts(self, latent: int, window: int = 8, n: int | None = None) -> list[Context]:
        """The top examples of ``latent`` with ``window`` tokens either side (same prompt)."""
        if not 0 <= latent < self.sae.d_sae:
            raise IndexError(f"latent {latent} out of range (0..{self.sae.d_sae - 1})")
        index = self.store.index
        pid = index.column("prompt_id").to_numpy()
        pos = index.column("position").to_numpy()
        tok = index.column("token_id").to_numpy()
        out: list[Context] = []
        for value, row in zip(self.values[:, latent].tolist(), self.rows[:, latent].tolist()):
            if row < 0 or value <= 0 or (n is not None and len(out) >= n):
                continue
            lo, hi = max(row - window, 0), min(row + window + 1, len(pid))
            span = np.arange(lo, hi)
            span = span[pid[span] == pid[row]]
            x = torch.from_numpy(self.store[self.sae.site, self.sae.layer].take(span))
            with no_grad():
                acts = self.sae.encode(x)[:, latent].double().tolist()
            out.append(Context(latent, float(value), int(row), int(pid[row]), int(pos[row]),
                               tok[span].tolist(), acts, int(row - span[0])))  # fmt: skip
        return out


@without_grad
def top_activations(
    store: Any,
    sae: SAE,
    *,
    k: int = 16,
    batch_rows: int = 4096,
    rows: Any = None,
) -> TopActivations:
    """Stream ``store[sae.site, sae.layer]`` once and keep each latent's top ``k`` (module).

    Args:
        store: a harvest store holding the SAE's site and layer.
        sae: the SAE.
        k: examples kept per latent.
        batch_rows: rows encoded at once.
        rows: ``(start, stop)`` to read only some rows (default all).

    Example::

        top = top_activations(oculi.open_harvest("acts"), sae, k=20)
        top.values.shape           # [k, d_sae], best first
    """
    if sae.site is None or sae.layer is None:
        raise ValueError("top_activations: the SAE is bound to no site; load it with site=, layer=")
    array = store[sae.site, sae.layer]
    if array.shape[1] != sae.d_in:
        raise ValueError(
            f"top_activations: store[{sae.site!r}, {sae.layer}] is {array.shape[1]} wide, "
            f"the SAE reads d_in={sae.d_in}"
        )
    start, stop = rows if rows is not None else (0, array.shape[0])
    d = sae.d_sae
    values = torch.zeros(k, d, dtype=sae.dtype, device=sae.device)
    where = torch.full((k, d), -1, dtype=torch.int64, device=sae.device)
    counts = torch.zeros(d, dtype=torch.int64, device=sae.device)
    hist = torch.zeros(d * (len(BINS) - 1), dtype=torch.int64, device=sae.device)
    edges = BINS.to(sae.device)
    for lo in range(start, stop, batch_rows):
        hi = min(lo + batch_rows, stop)
        a = sae.encode(torch.from_numpy(np.asarray(array[lo:hi])))  # [n, d_sae]
        nz = a.nonzero()
        counts += torch.bincount(nz[:, 1], minlength=d)
        vals = a[nz[:, 0], nz[:, 1]].double()
        b = (torch.bucketize(vals, edges) - 1).clamp(0, len(edges) - 2)
        hist.index_add_(0, nz[:, 1] * (len(edges) - 1) + b, torch.ones_like(b))
        # this batch's top (latents as rows: a contiguous top-k), then merged with the run's
        best = a.T.contiguous().topk(min(k, hi - lo), dim=1)
        top = torch.cat([values, best.values.T]).topk(k, dim=0)
        rows_new = lo + best.indices.T
        from_run = top.indices < k
        where = torch.where(
            from_run,
            where.gather(0, top.indices.clamp(max=k - 1)),
            rows_new.gather(0, (top.indices - k).clamp(min=0, max=rows_new.shape[0] - 1)),
        )
        values = top.values
    where = torch.where(values > 0, where, torch.full_like(where, -1))
    return TopActivations(sae, store, values.cpu(), where.cpu(), counts.cpu(), stop - start,
                          hist.view(d, -1).cpu())  # fmt: skip


@without_grad
def logit_effects(
    adapter: Adapter,
    sae: SAE,
    latent: int,
    *,
    context: Context | Any = None,
    position: int = -1,
    k: int = 10,
) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """The tokens whose logits latent ``latent``'s decoder direction raises and lowers most.

    Args:
        adapter: the model.
        sae: an SAE writing a ``d_model``-wide site.
        latent: the latent.
        context: where to freeze the final norm: a :class:`Context` (its prompt up to the
            token) or token ids / a prompt (with ``position``).
        position: the position in ``context`` when it is not a :class:`Context`.
        k: tokens per list.

    Returns:
        ``(promoted, suppressed)``: ``[(token_id, Δlogit per unit activation), ...]``, ``k``
        each, strongest first.

    Example::

        promoted, suppressed = logit_effects(adapter, sae, 123, context="The Eiffel Tower is in", k=5)
    """
    from oculi.analysis.readout import frozen_norm

    if SITE_KINDS[sae.write_site or "resid_post"].width != "d_model":
        raise InputError(
            f"logit effects need an SAE writing the residual (d_model); it writes {sae.write_site!r}"
        )
    if not 0 <= latent < sae.d_sae:
        raise IndexError(f"latent {latent} out of range (0..{sae.d_sae - 1})")
    if context is None:
        raise InputError(
            "logit_effects needs a context to freeze the final norm at (a Context or a prompt)"
        )
    if isinstance(context, Context):
        ids = torch.tensor(context.token_ids[: context.center + 1])
        position = -1
    else:
        ids = context
    f = frozen_norm(adapter.capture_residual(ids), position, adapter)
    write = sae.W_dec[latent].detach().to(f.a.device, torch.float64)
    if f.center:
        write = write - write.mean()
    vec = f.a.reshape(-1, f.a.shape[-1])[0] * write  # what reaches the unembedding
    w_u = f.unembed.detach()
    effect = (w_u.to(torch.float32) @ vec.to(w_u.device, torch.float32)).double()
    up, down = effect.topk(k), (-effect).topk(k)
    return (
        list(zip(up.indices.tolist(), up.values.tolist(), strict=True)),
        list(zip(down.indices.tolist(), (-down.values).tolist(), strict=True)),
    )
