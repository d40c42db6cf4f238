"""Latents as a capture site: every SAE's ``[B, T, d_sae]`` activations from one forward pass.

::

    acts = oculi.sae.capture_latents(adapter, prompts, [sae6, sae12])
    acts[0].shape                    # [B, T, d_sae] for sae6 (sparse COO with sparse=True)

One forward records the site each SAE reads (only those; the forward stops after the last
layer needed) and encodes it: the cost over a plain capture of the same sites is one encoder
matmul per SAE. Padding positions get all-zero latents. Inside an
:class:`~oculi.intervention.InterventionContext` the latents are those of the intervened
model, as for any capture; during generation use ``SAEPatch(sae, error=True, record=True)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor

from oculi.capture.engine import record
from oculi.capture.interrupts import no_grad
from oculi.sae.model import SAE

if TYPE_CHECKING:
    from oculi.models.adapter import Adapter


def capture_latents(
    adapter: Adapter,
    inputs: Any,
    saes: SAE | Sequence[SAE],
    *,
    sparse: bool = False,
    attention_mask: Tensor | None = None,
) -> list[Tensor]:
    """Each SAE's latent activations on ``inputs``, ``[B, T, d_sae]``, from one forward.

    Args:
        adapter: the model.
        inputs: prompts or token ids (as every capture takes them).
        saes: one SAE or several (each bound to a site and layer of this model).
        sparse: return sparse COO tensors (most entries are zero).
        attention_mask: for token ids with padding.

    Returns:
        One tensor per SAE, in order, in the SAE's dtype on its device.

    Raises:
        ValueError: an SAE bound to no site, or whose width does not fit its site.
    """
    saes, where = bind_saes(adapter, saes, "capture_latents")
    requests: dict[str, list[int]] = {}
    for layer, site, _ in where:
        requests.setdefault(site, [])
        if layer not in requests[site]:
            requests[site].append(layer)
    batch = adapter.prepare(inputs, attention_mask)
    recorded = record(adapter, batch, {k: sorted(v) for k, v in requests.items()})
    return encode_recorded(saes, where, recorded, batch.attention_mask, sparse=sparse)


def bind_saes(
    adapter: Adapter, saes: SAE | Sequence[SAE], what: str
) -> tuple[list[SAE], list[tuple[int, str, str]]]:
    """``(saes, [(layer, site, write_site)])``: the ``saes=`` argument as a list, each SAE
    checked against ``adapter`` (its site, its widths, its layer in range)."""
    if isinstance(saes, SAE):
        saes = [saes]
    saes = list(saes)
    if not saes or not all(isinstance(s, SAE) for s in saes):
        raise TypeError(f"{what} takes an SAE or a non-empty list of SAEs (oculi.sae.SAE)")
    where = [s.check_model(adapter, f"{what} (SAE {i})") for i, s in enumerate(saes)]
    return saes, where


def encode_recorded(
    saes: Sequence[SAE],
    where: Sequence[tuple[int, str, str]],
    recorded: dict[str, tuple[tuple[int, ...], Tensor]],
    attention_mask: Tensor,
    *,
    sparse: bool = False,
) -> list[Tensor]:
    """Each SAE's ``[B, T, d_sae]`` latents from the sites a forward recorded (padding: 0)."""
    mask = attention_mask.bool()
    out = []
    with no_grad():
        for sae, (layer, site, _) in zip(saes, where):
            layers, tensor = recorded[site]
            x = tensor[:, layers.index(layer)]  # [B, T, d_in]
            a = sae.encode(x) * mask[..., None].to(sae.device, sae.dtype)
            out.append(a.to_sparse() if sparse else a)
    return out
