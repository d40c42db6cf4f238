"""Computing one work unit: the prompts that overlap its rows, batched by a token budget.

::

    buffers = compute_unit(adapter, plan, tokens, plan.unit(3))   # {"resid_post/3": [rows, w]}

A unit's rows are a contiguous range of the concatenated prompts, so its first and last
prompts may be cut by the unit's edges: such a prompt is run in full (a token's activations
depend on everything before it) and only the rows inside the unit are kept; the neighbouring
unit runs it again for its own rows. Prompts are sorted by length and packed greedily into
batches of at most ``batch_tokens`` (batch size x longest prompt in the batch), right padded;
the capture engine records every requested ``(site, layer)`` in one forward pass per batch, and
only real tokens' rows are gathered (on the model's device) before the copy to the host, so
padding is never copied or stored. An SAE's latents are its encoder applied to the gathered
rows of its site (recorded in the same forward).

GPU note: the gather and the device-to-host copy are where the engine's memory plan and
pinned asynchronous copies plug in; here the copy is a plain ``.cpu()`` per batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from oculi.capture.engine import record
from oculi.capture.interrupts import no_grad
from oculi.harvest.plan import LATENT_PREFIX, STORAGE_DTYPES, HarvestPlan, Unit

if TYPE_CHECKING:
    from oculi.harvest.prompts import Tokens
    from oculi.models.adapter import Adapter

_TORCH_DTYPES = {v: k for k, v in STORAGE_DTYPES.items()}


def unit_segments(tokens: Tokens, unit: Unit) -> list[tuple[int, int, int]]:
    """``(prompt, first row, last row + 1)`` of each prompt overlapping ``unit``, in row order.

    Rows are absolute (row ``r`` is token ``r - offsets[p]`` of prompt ``p``).
    """
    offsets = tokens.offsets
    first = int(np.searchsorted(offsets, unit.start, side="right")) - 1
    last = int(np.searchsorted(offsets, unit.stop, side="left"))  # prompts first..last-1
    return [
        (p, max(int(offsets[p]), unit.start), min(int(offsets[p + 1]), unit.stop))
        for p in range(first, last)
    ]


def pack_batches(lengths: dict[int, int], batch_tokens: int) -> list[list[int]]:
    """Prompts grouped so that ``len(group) * longest <= batch_tokens`` (a longer prompt alone).

    Longest first, so each batch holds prompts of similar length and padding stays small.
    """
    order = sorted(lengths, key=lambda p: (-lengths[p], p))
    batches: list[list[int]] = []
    current: list[int] = []
    for p in order:
        longest = lengths[current[0]] if current else lengths[p]
        if current and (len(current) + 1) * longest > batch_tokens:
            batches.append(current)
            current = []
        current.append(p)
    if current:
        batches.append(current)
    return batches


def compute_unit(
    adapter: Adapter,
    plan: HarvestPlan,
    tokens: Tokens,
    unit: Unit,
    overflow: dict[str, float] | None = None,
) -> dict[str, np.ndarray]:
    """The unit's rows of every array, ``{name: [unit.rows, width]}`` in the storage dtype.

    Args:
        overflow: if given, filled with the arrays whose finite values exceed the storage
            dtype's range (they are stored as inf), and the largest ``|value|`` of each. Checked
            only when the storage dtype's range is narrower than the model's: one reduction
            per batch on the device, one host sync per unit.
    """
    dtype = _TORCH_DTYPES[plan.config.storage_dtype]
    peaks: dict[str, tuple[tuple[int, ...], list[torch.Tensor]]] = {}
    out = {
        a.name: np.empty((unit.rows, a.width), dtype=plan.config.storage_dtype) for a in plan.arrays
    }
    segments = {p: (lo, hi) for p, lo, hi in unit_segments(tokens, unit)}
    lengths = {p: len(tokens.prompt(p)) for p in segments}
    for group in pack_batches(lengths, plan.config.batch_tokens):
        width = lengths[group[0]]
        ids = torch.zeros((len(group), width), dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        src, dest = [], []  # flat [B*T] positions to keep, and their rows in the unit
        for b, p in enumerate(group):
            n = lengths[p]
            ids[b, :n] = torch.from_numpy(tokens.prompt(p).astype(np.int64))
            mask[b, :n] = 1
            lo, hi = segments[p]
            start = int(tokens.offsets[p])
            src.append(b * width + np.arange(lo - start, hi - start))
            dest.append(np.arange(lo - unit.start, hi - unit.start))
        batch = adapter.prepare(ids, attention_mask=mask)
        recorded = record(adapter, batch, plan.requests)
        keep = torch.from_numpy(np.concatenate(src)).to(batch.input_ids.device)
        rows = np.concatenate(dest)
        for (name, _), sae in zip(plan.config.saes, plan.sae_modules):
            layers, tensor = recorded[sae.site]
            x = _rows_first(tensor)[layers.index(sae.layer), keep]  # [rows, d_in]
            with no_grad():
                a = sae.encode(x.to(sae.device, sae.dtype))
            out[f"{LATENT_PREFIX}{name}/{sae.layer}"][rows] = a.to(dtype).cpu().numpy()
        for site, (layers, tensor) in recorded.items():
            if site not in plan.config.sites:
                continue  # recorded for an SAE only
            flat = _rows_first(tensor)  # [n_layers, B*T, width]
            gathered = flat[:, keep]
            if overflow is not None and torch.finfo(gathered.dtype).max > torch.finfo(dtype).max:
                peaks.setdefault(site, (layers, []))[1].append(_finite_peaks(gathered))
            picked = gathered.to(dtype).cpu().numpy()
            for i, layer in enumerate(layers):
                if f"{site}/{layer}" in out:  # not a layer recorded for an SAE only
                    out[f"{site}/{layer}"][rows] = picked[i]
    if overflow is not None and peaks:
        limit = torch.finfo(dtype).max
        for site, (layers, per_batch) in peaks.items():
            for layer, peak in zip(layers, torch.stack(per_batch).amax(0).tolist()):
                if peak > limit:
                    overflow[f"{site}/{layer}"] = peak
    return out


def _finite_peaks(x: torch.Tensor) -> torch.Tensor:
    """``[n_layers, rows, width]`` -> the largest finite ``|value|`` per layer, fp32 ``[n_layers]``."""
    a = x.abs().float()
    return a.masked_fill(~torch.isfinite(a), 0).amax(dim=(1, 2))


def _rows_first(tensor: torch.Tensor) -> torch.Tensor:
    """``[B, n, T, w]`` or per-head ``[B, n, H, T, d]`` -> ``[n, B*T, width]``."""
    if tensor.dim() == 5:
        b, n, h, t, d = tensor.shape
        return tensor.permute(1, 0, 3, 2, 4).reshape(n, b * t, h * d)
    b, n, t, w = tensor.shape
    return tensor.transpose(0, 1).reshape(n, b * t, w)
