"""SAE latents as a patching site: exact activation patching and attribution patching over
every latent (and position) of an SAE, with oculi's metrics.

::

    from oculi import patching
    metric = patching.logit_diff(" Mary", " John")
    res = patching.activation_patching(adapter, clean, corrupt, site=("sae", sae), metric=metric)
    res.values            # [T, d_sae]: the metric with latent i at position p set to its clean value
    res.top(5)            # [(position, latent, value), ...]
    est = patching.attribution_patching(adapter, clean, corrupt, site=("sae", sae), metric=metric)

Patching latent ``i`` at position ``p`` runs the corrupt prompt with the SAE spliced *with its
error term* (so unpatched the model is its own) and the latent set to its clean value: the
SAE's write site changes by exactly ``(a_clean[p, i] - a_corrupt[p, i]) · W_dec[i]`` at ``p``.
A latent whose clean and corrupt values are equal (both zero: most of a sparse code) cannot
change anything and is not run (its cell is the corrupt metric, exactly), nor is a position
after the one the metric reads; so a sweep over all ``d_sae`` latents costs one batched forward
per ``batch_size`` *active* cells, from the SAE's layer on.

Attribution patching estimates every cell from one forward and one backward of the corrupt
run: ``corrupt + ∂m/∂a[p, i] · (a_clean[p, i] - a_corrupt[p, i])``, the gradient taken at the
latents of the error-term splice (Nanda 2023; Syed et al. 2023). It is exact where the metric
is linear in the latent and a guide elsewhere: confirm with the exact sweep.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from oculi.capture.interrupts import enable_grad, no_grad
from oculi.capture.places import add_replacer
from oculi.capture.sites import SITE_KINDS
from oculi.errors import InputError
from oculi.intervention import InterventionContext
from oculi.patching._common import (
    check_aligned,
    check_read_position,
    chunks,
    evaluate,
    progress_bar,
    prompt_tokens,
    recorded_pair,
    single_prompt,
    with_reference,
)
from oculi.patching.activation import PatchingResult
from oculi.patching.metrics import Metric
from oculi.patching.resume import ResumableRun, unembed
from oculi.sae.attribution import _Leaf
from oculi.sae.latents import capture_latents
from oculi.sae.model import SAE
from oculi.viz import heatmap

if TYPE_CHECKING:
    from oculi.capture.hooks import HookSet
    from oculi.capture.inputs import Batch
    from oculi.models.adapter import Adapter


def sae_of_site(site: Any, *, layers: Any = None, per_head: bool = False) -> SAE:
    """The SAE of a latent site ``("sae", sae)`` given to a patching sweep.

    Raises:
        InputError: anything but ``("sae", SAE)``, or ``layers``/``per_head`` given with it.
    """
    if not (
        isinstance(site, tuple) and len(site) == 2 and site[0] == "sae" and isinstance(site[1], SAE)
    ):
        raise InputError(
            f"site must be a site name (e.g. 'resid_pre') or ('sae', sae) with an "
            f"oculi.sae.SAE for its latents, got {site!r}"
        )
    if layers is not None or per_head:
        raise InputError(
            "site=('sae', sae) sweeps the SAE's latents at its own layer "
            f"(layer {site[1].layer}); layers= and per_head= do not apply"
        )
    return site[1]


def latent_sweep(adapter, clean, corrupt, site, metric, layers, positions, per_head,
                 per_position, batch_size, progress) -> LatentPatchingResult:  # fmt: skip
    """:func:`oculi.patching.activation_patching` with ``site=("sae", sae)``."""
    sae = sae_of_site(site, layers=layers, per_head=per_head)
    size = 64 if batch_size in ("auto", None) else batch_size
    return sae_activation_patching(adapter, clean, corrupt, sae, metric=metric,
                                   positions=positions, per_position=per_position,
                                   batch_size=size, progress=progress)  # fmt: skip


@dataclass(repr=False)
class LatentPatchingResult(PatchingResult):
    """A patching sweep over an SAE's latents (a :class:`~oculi.patching.PatchingResult`).

    Attributes:
        values: the metric with each latent patched: ``[T, d_sae]`` (``axis="position"``: row
            ``p`` patches position ``p``) or ``[d_sae]`` (``axis=None``: each latent at every
            position at once).
        clean_metric, corrupt_metric: the metric on the unpatched clean and corrupt runs.
        layers: ``(layer,)``, the SAE's layer; ``site``: ``"sae:<its site>"``.
        method: ``"exact"`` (activation patching) or ``"attribution"`` (the estimate).
        tokens: the corrupt prompt's tokens, if a tokenizer is known.
    """

    method: str = "exact"

    def top(self, k: int = 10, normalized: bool = True) -> list[tuple[int, int | None, float]]:
        """The ``k`` cells that move the metric most, as ``(latent, position, value)``
        (position ``None`` for a sweep over whole latents); cells without effect are left out."""
        values = self.normalized() if normalized else self.values
        effect = (self.values - self.corrupt_metric).abs().reshape(-1)
        order = effect.argsort(descending=True)[:k].tolist()
        d_sae = self.values.shape[-1]
        flat = values.reshape(-1)
        return [
            (i % d_sae, (i // d_sae) if self.axis else None, float(flat[i]))
            for i in order
            if effect[i] > 0
        ]

    def table(self, normalized: bool = True, k: int = 10) -> str:
        """The ``k`` cells with most effect as text: latent, position (and token), metric,
        recovery."""
        denom = self.clean_metric - self.corrupt_metric
        lines = [
            f"{self.method} patching of {self.site} L{self.layers[0]} latents: {self.metric} "
            f"(clean {self.clean_metric:.4g}, corrupt {self.corrupt_metric:.4g})",
            f"{'latent':>7} {'position':<16} {'metric':>10} {'recovery':>9}",
        ]
        for latent, pos, value in self.top(k, normalized=False):
            where = "all" if pos is None else f"{pos}"
            if pos is not None and pos < len(self.tokens):
                where += f" {self.tokens[pos]!r}"
            rec = (value - self.corrupt_metric) / denom if denom else float("nan")
            lines.append(f"{latent:>7} {where:<16} {value:>10.4g} {rec:>9.3f}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        return f"<pre>{html.escape(self.table())}</pre>"

    def plot(self, normalized: bool = True, ax: Any = None, k: int = 20) -> Any:
        """Heatmap of the ``k`` latents with most effect (columns) by position (rows)."""
        values = self.normalized() if normalized else self.values
        if values.dim() == 1:
            values = values[None]
        effect = (self.values - self.corrupt_metric).abs().reshape(-1, self.values.shape[-1])
        cols = effect.amax(0).argsort(descending=True)[: min(k, effect.shape[1])]
        rows = [f"{i} {t!r}" for i, t in enumerate(self.tokens)] if self.axis else ["all"]
        return heatmap(values[:, cols], row_labels=rows[: values.shape[0]],
                       col_labels=[str(int(c)) for c in cols], center=0.0, ax=ax,
                       title=f"{self.method} patching of {self.site} latents",
                       xlabel="latent")  # fmt: skip

    def __repr__(self) -> str:
        return (
            f"LatentPatchingResult({self.method}, {self.site} L{self.layers[0]}, "
            f"values={list(self.values.shape)}, metric={self.metric!r})"
        )


def _result(values, clean, corrupt, layer, sae, metric, per_position, tokens, method):
    return LatentPatchingResult(
        values=values, clean_metric=clean, corrupt_metric=corrupt, layers=(layer,),
        axis="position" if per_position else None, site=f"sae:{sae.site}", metric=metric.name,
        tokens=tokens, method=method,
    )  # fmt: skip


def _prepare(adapter: Adapter, sae: SAE, clean: Any, corrupt: Any, metric: Metric):
    layer, _read, write = sae.check_model(adapter, "patching over SAE latents")
    cb, kb = single_prompt(adapter, clean, "clean"), single_prompt(adapter, corrupt, "corrupt")
    check_aligned(adapter, cb, kb)
    metric = metric.bind(adapter)
    check_read_position(metric, kb, "corrupt")
    return layer, write, cb, kb, metric


def _latents(adapter: Adapter, sae: SAE, batch: Batch) -> Tensor:
    """``[T, d_sae]`` latents of a one-prompt batch (the forward stops after the SAE's layer)."""
    return capture_latents(adapter, batch.input_ids, sae, attention_mask=batch.attention_mask)[0][0]


def _columns(sae: SAE, latents: Sequence[int] | None) -> Tensor:
    if latents is None:
        return torch.arange(sae.d_sae)
    idx = torch.as_tensor(list(latents), dtype=torch.long).flatten()
    bad = idx[(idx < 0) | (idx >= sae.d_sae)]
    if bad.numel():
        raise IndexError(
            f"latent {int(bad[0])} out of range for d_sae={sae.d_sae} (valid 0..{sae.d_sae - 1})"
        )
    return idx


def _rows(positions: Sequence[int] | None, t: int) -> Tensor:
    if positions is None:
        return torch.arange(t)
    out = []
    for p in positions:
        if isinstance(p, bool) or not isinstance(p, int) or not -t <= p < t:
            raise IndexError(f"position {p!r} out of range for a prompt of {t} tokens (0..{t - 1})")
        out.append(p % t)
    return torch.tensor(out, dtype=torch.long)


def sae_activation_patching(
    adapter: Adapter,
    clean: Any,
    corrupt: Any,
    sae: SAE,
    *,
    metric: Metric,
    latents: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    per_position: bool = True,
    batch_size: int = 64,
    progress: bool = True,
) -> LatentPatchingResult:
    """Patch each latent of ``sae`` (at each position) from the clean run into the corrupt one.

    Args:
        adapter: the model.
        clean, corrupt: one prompt each, of equal token length.
        sae: an SAE bound to a site and layer of this model (a transcoder too).
        metric: e.g. ``patching.logit_diff(" Mary", " John")``.
        latents: the latents to sweep (default all); the others keep the corrupt metric.
        positions: the positions to sweep (default all) when ``per_position``.
        per_position: one cell per (position, latent); ``False``: each latent patched at
            every position at once, ``values [d_sae]``.
        batch_size: patched copies per forward.
        progress: show a progress bar.

    Returns:
        A :class:`LatentPatchingResult` (``method="exact"``).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
    layer, write_site, cb, kb, metric = _prepare(adapter, sae, clean, corrupt, metric)
    t = kb.input_ids.shape[1]
    clean_run, corrupt_run, metric, clean_value, corrupt_value = recorded_pair(
        adapter, cb, kb, metric
    )
    read_pos = corrupt_run.position(metric.position)
    with no_grad():
        delta = (_latents(adapter, sae, cb) - _latents(adapter, sae, kb)).cpu()  # [T, d_sae]
        cols, rows = _columns(sae, latents), _rows(positions if per_position else None, t)
        mask = torch.zeros_like(delta, dtype=torch.bool)
        mask[rows[:, None], cols[None, :]] = True
        mask[read_pos + 1 :] = False  # a write after the read position changes nothing
        mask &= delta != 0
        if per_position:
            cells = [(int(p), int(i)) for p, i in mask.nonzero().tolist()]
        else:
            cells = [(-1, int(i)) for i in mask.any(0).nonzero()[:, 0].tolist()]
        out = torch.full((t, sae.d_sae) if per_position else (sae.d_sae,), corrupt_value)
        w_dec = sae.W_dec.detach().cpu()
        finals: list[Tensor] = []
        bar = progress_bar(-(-len(cells) // batch_size), progress, "patching SAE latents")
        for chunk in chunks(cells, batch_size):
            add = torch.zeros(len(chunk), t, sae.d_out, dtype=sae.dtype)
            for r, (p, i) in enumerate(chunk):
                if p >= 0:
                    add[r, p] = delta[p, i] * w_dec[i]
                else:
                    add[r] = (delta[:, i] * mask[:, i])[:, None] * w_dec[i]
            finals.append(_run_added(adapter, corrupt_run, write_site, layer, add, read_pos))
            bar.update(1)
        bar.close()
        if cells:
            values = evaluate(adapter, metric, torch.cat(finals))
            if per_position:
                p_idx, i_idx = (torch.tensor(ix) for ix in zip(*cells))
                out[p_idx, i_idx] = values
            else:
                out[torch.tensor([i for _, i in cells])] = values
    return _result(out, clean_value, corrupt_value, layer, sae, metric, per_position,
                   prompt_tokens(adapter, kb), "exact")  # fmt: skip


def _run_added(
    adapter: Adapter, run: ResumableRun, site: str, layer: int, add: Tensor, read_pos: int
) -> Tensor:
    """Final-normed rows ``[n, d]`` at ``read_pos`` of copies of the recorded run whose
    ``site`` of ``layer`` has ``add [n, T, d_site]`` added (one copy per row)."""
    n = add.shape[0]
    if site == "resid_pre" or (site == "resid_post" and layer + 1 < adapter.n_layers):
        first = layer + (site == "resid_post")
        hidden = run.resid[first].unsqueeze(0) + add.to(run.resid.device, run.resid.dtype)
        return run.run_from(first, hidden, positions=[read_pos])[:, 0]
    place = SITE_KINDS[site].locate(adapter).write
    assert place is not None  # SAE sites are [B, T, ·] writable sites (SAE.check_model)

    def write(x: Tensor) -> Tensor:
        out = x.clone()
        view = place.view(out) if place.view else out
        view += add.to(view.device, view.dtype)
        return out

    def register(hooks: HookSet) -> None:
        taps: dict = {}
        add_replacer(hooks, taps, adapter, layer, place, write)
        if taps:
            from oculi.capture.bridge import attention_bridge

            hooks.enter(
                attention_bridge(adapter.attention_configs, adapter.attention_layer_ids, taps)
            )

    begin = run.resid[layer].unsqueeze(0).expand(n, -1, -1)
    return run.run_from(layer, begin, patchers={layer: register}, positions=[read_pos])[:, 0]


def sae_attribution_patching(
    adapter: Adapter,
    clean: Any,
    corrupt: Any,
    sae: SAE,
    *,
    metric: Metric,
    per_position: bool = True,
) -> LatentPatchingResult:
    """Estimate :func:`sae_activation_patching` for every latent and position from one forward
    and one backward of the corrupt run (and one forward of the clean run).

    Returns:
        A :class:`LatentPatchingResult` (``method="attribution"``), ``values [T, d_sae]`` or,
        without ``per_position``, ``[d_sae]`` (summed over positions).
    """
    if torch.is_inference_mode_enabled():  # gradients need tensors made outside it
        with torch.inference_mode(False):
            return sae_attribution_patching(adapter, clean, corrupt, sae, metric=metric,
                                            per_position=per_position)  # fmt: skip
    layer, _write, cb, kb, metric = _prepare(adapter, sae, clean, corrupt, metric)
    if metric.kind == "kl":
        pos = int(cb.attention_mask[0].nonzero()[:, 0][metric.position])
        metric = with_reference(metric, adapter.forward(cb.input_ids)[pos])
    values = {}
    for name, batch in (("clean", cb), ("corrupt", kb)):
        leaf = _Leaf(sae)
        with enable_grad(), InterventionContext(adapter, [leaf]):
            hidden = adapter.decoder(**batch.model_kwargs(), use_cache=False).last_hidden_state
            pos = int(batch.attention_mask[0].nonzero()[:, 0][metric.position])
            m = metric(unembed(adapter, hidden[:, pos], metric.columns()))[0]
            grad = None
            if name == "corrupt":
                (grad,) = torch.autograd.grad(m, leaf.leaves[0], allow_unused=True)
        values[name] = (float(m.detach()), leaf.recorded[0][0].detach(), grad)
    (clean_value, a_clean, _), (corrupt_value, a_corrupt, g) = values["clean"], values["corrupt"]
    g = torch.zeros_like(a_corrupt) if g is None else g[0]
    contrib = (g.double() * (a_clean.double() - a_corrupt.double())).cpu()  # [T, d_sae]
    est = corrupt_value + (contrib if per_position else contrib.sum(0))
    return _result(est.float(), clean_value, corrupt_value, layer, sae, metric, per_position,
                   prompt_tokens(adapter, kb), "attribution")  # fmt: skip
