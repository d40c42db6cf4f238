"""One forward with interventions, recordings and logits only where they are read.

The building block of patching sweeps::

    clean = run_with_interventions(adapter, clean_ids, record={"resid_pre": range(L)})
    layers, acts = clean.recorded["resid_pre"]                   # [1, L, T, d_model]
    patches = [ActivationPatch("resid_pre", layer=3, position=p, value=acts[0, 3, p], rows=[p])
               for p in range(T)]                                  # row p patches position p
    out = run_with_interventions(adapter, corrupt_ids.expand(T, -1), patches, logits_at=-1)
    out.logits                                                     # [T, V]: one row per patch

Logits are computed from the final hidden state at the requested positions only (for a large
vocabulary the unembedding dominates the cost of a forward).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from oculi.capture.engine import record as record_sites
from oculi.capture.inputs import Batch, Inputs
from oculi.capture.interrupts import no_grad
from oculi.capture.sites import check_kind
from oculi.capture.unembed import soft_cap
from oculi.intervention.base import Intervention
from oculi.intervention.context import InterventionContext
from oculi.models.anatomy import get_path

if TYPE_CHECKING:
    from oculi.models.adapter import Adapter

LogitPositions = int | Sequence[int] | torch.Tensor | Literal["all"] | None


@dataclass
class RunOutput:
    """What :func:`run_with_interventions` returns.

    Attributes:
        logits: ``[B, V]`` for one position (an int or a per-row ``[B]`` tensor), ``[B, P, V]``
            for several, ``[B, T, V]`` for ``"all"``; ``None`` if not asked for.
        recorded: ``{kind: (layers, tensor [B, n_layers, ...])}`` as the capture engine
            returns it, recorded in the intervened forward.
        batch: the checked inputs.
    """

    logits: torch.Tensor | None
    recorded: dict[str, tuple[tuple[int, ...], torch.Tensor]] = field(default_factory=dict)
    batch: Batch | None = None


def run_with_interventions(
    adapter: Adapter,
    batch: Batch | Inputs,
    interventions: Iterable[Intervention] = (),
    *,
    record: Mapping[str, Sequence[int] | None] | None = None,
    logits_at: LogitPositions = None,
    storage: Mapping[str, tuple[torch.dtype | None, Any]] | None = None,
    check_effect: bool | None = None,
) -> RunOutput:
    """Run one forward of ``batch`` under ``interventions``; record sites and read logits.

    Args:
        adapter: the model.
        batch: a checked :class:`~oculi.capture.inputs.Batch`, or anything ``adapter.prepare``
            takes.
        interventions: applied for this forward (per-row patches via ``rows=`` or ``[B, ...]``
            values).
        record: ``{site kind: layers}`` to record (``None`` layers: all).
        logits_at: positions whose logits to compute: an int or list (columns, negatives from
            the end), a ``[B]`` or ``[B, P]`` tensor of per-row columns, ``"all"``, or ``None``.
        storage: ``{kind: (dtype, device)}`` for recorded tensors.
        check_effect: warn for interventions that change nothing (default: ``OCULI_DEBUG``).

    Raises:
        ValueError: nothing asked for (no ``record`` and no ``logits_at``).
        IndexError: a ``logits_at`` position outside the sequence.
    """
    if not isinstance(batch, Batch):
        batch = adapter.prepare(batch)
    if not record and logits_at is None:
        raise ValueError("run_with_interventions: ask for record= and/or logits_at=")
    requests = {}
    for kind, layers in (record or {}).items():
        check_kind(kind)
        requests[kind] = adapter.resolve_layers(None if layers is None else list(layers))
    index = _logit_index(logits_at, batch)
    outputs: list[Any] = []
    with InterventionContext(adapter, interventions, check_effect=check_effect), no_grad():
        if requests:
            recorded = record_sites(
                adapter,
                batch,
                requests,
                storage=storage,
                stop_early=index is None,
                on_output=outputs.append,
            )
        else:
            recorded = {}
            outputs.append(adapter.decoder(**batch.model_kwargs(), use_cache=False))
        logits = _unembed(adapter, outputs[0], index) if index is not None else None
    return RunOutput(logits=logits, recorded=recorded, batch=batch)


def _logit_index(at: LogitPositions, batch: Batch) -> Any:
    """``[B, P]`` column indices (or ``slice`` for all) from ``logits_at``; ``None``: none."""
    if at is None:
        return None
    b, t = batch.shape
    if isinstance(at, str):
        if at != "all":
            raise ValueError(f"logits_at must be 'all', positions or None, got {at!r}")
        return slice(None)
    single = isinstance(at, int) or (
        isinstance(at, torch.Tensor) and at.dim() == 1 and at.shape[0] == b
    )
    if isinstance(at, torch.Tensor):
        if at.is_floating_point() or at.dim() not in (1, 2):
            raise ValueError(f"logits_at tensor must hold integer columns [B] or [B, P], got {at}")
        cols = at.long().to(batch.input_ids.device)
        cols = cols[:, None] if cols.dim() == 1 else cols
        if cols.shape[0] != b:
            raise ValueError(
                f"logits_at has shape {list(at.shape)}, expected [B={b}] or [B={b}, P] per row"
            )
    else:
        pos = [at] if isinstance(at, int) else list(at)
        cols = torch.tensor(pos, device=batch.input_ids.device).expand(b, -1)
    if bool(((cols < -t) | (cols >= t)).any()):
        raise IndexError(f"logits_at {at!r} out of range for a sequence of {t} tokens (0..{t - 1})")
    return cols % t, single


def _unembed(adapter: Adapter, output: Any, index: Any) -> torch.Tensor:
    hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
    if isinstance(index, slice):
        h = hidden
        single = False
    else:
        cols, single = index
        h = torch.gather(hidden, 1, cols[..., None].expand(-1, -1, hidden.shape[-1]))
    logits = get_path(adapter.model, adapter.anatomy.unembed)(h)
    logits = soft_cap(logits, adapter.unembedding()[2])  # in the model's dtype, as HF does
    return logits[:, 0] if single else logits
