"""What every intervention is: a spec that binds to an adapter and yields edits.

An intervention object is a plain, reusable description (``HeadAblation(layer=3, head=1)``).
:meth:`Intervention.bind` checks it against one model (layer and head ranges, site names,
tensor widths, dtypes and devices, all before any forward) and returns a :class:`Binding`:
the :class:`~oculi.intervention.writers.Edit` s to install, plus two callbacks that
:class:`~oculi.intervention.context.InterventionContext` runs for it:

- ``prepare()`` on entering the context, before any hook is registered (e.g. the capture of a
  reference dataset for mean ablation);
- ``begin(session)`` when a prompt pass starts, before any layer runs: positions are resolved
  against the prompt and checked against its padding here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from oculi.intervention.state import Session
from oculi.intervention.writers import Edit

if TYPE_CHECKING:
    from oculi.models.adapter import Adapter


class NoEffectWarning(UserWarning):
    """An intervention changed nothing in a forward pass (likely a silent no-op).

    Warned with ``check_effect=True`` (or ``OCULI_DEBUG=1``)::

        with InterventionContext(adapter, [ablation], check_effect=True):
            adapter.forward(prompt)        # NoEffectWarning if the ablation changed nothing
    """


@dataclass
class Binding:
    """An intervention checked against one adapter: its edits and per-context callbacks."""

    edits: list[Edit]
    prepare: Callable[[], None] | None = None
    begins: list[Callable[[Session], None]] = field(default_factory=list)
    noop: str | None = None  # why it installs nothing, for the debug-mode warning

    def begin(self, session: Session) -> None:
        for fn in self.begins:
            fn(session)


class Intervention:
    """Base class: a description of a change to the model, bound per context.

    Concrete interventions: :class:`~oculi.intervention.ActivationPatch`,
    :class:`~oculi.intervention.HeadAblation`, :class:`~oculi.intervention.SpectraScaler`,
    :class:`~oculi.intervention.SteeringVector`, ... They are applied inside a context::

        with InterventionContext(adapter, [HeadAblation(layer=3, head=1, method="zero")]):
            adapter.generate("The capital of France is")
    """

    def bind(self, adapter: Adapter) -> Binding:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self._repr_fields().items())
        return f"{type(self).__name__}({fields})"

    def _repr_fields(self) -> dict[str, Any]:
        return {}


def check_number(x: Any, name: str, what: str) -> float:
    """A finite real number, else ``ValueError``."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(float(x)):
        if isinstance(x, torch.Tensor) and x.numel() == 1 and torch.isfinite(x).item():
            return float(x)
        raise ValueError(f"{what}: {name} must be a finite number, got {x!r}")
    return float(x)


def check_tensor(value: Any, name: str, what: str) -> torch.Tensor:
    """A finite floating tensor (numbers become 0-dim tensors), else ``ValueError``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = torch.tensor(float(value))
    if not isinstance(value, torch.Tensor):
        raise ValueError(
            f"{what}: {name} must be a torch.Tensor or a number, got {type(value).__name__}"
        )
    if not value.is_floating_point():
        raise ValueError(f"{what}: {name} must be a floating tensor, got dtype {value.dtype}")
    if value.device.type != "meta" and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{what}: {name} contains NaN or Inf")
    return value.detach()


def check_placement(value: torch.Tensor, adapter: Adapter, name: str, what: str) -> torch.Tensor:
    """``value`` on the model's dtype and device; 0-dim numbers are moved, tensors must match."""
    if value.dim() == 0:
        return value.to(device=adapter.device, dtype=adapter.dtype)
    if value.dtype != adapter.dtype:
        raise ValueError(
            f"{what}: {name} has dtype {value.dtype}, expected the model's {adapter.dtype} "
            f"(shape {list(value.shape)}); convert it with .to({adapter.dtype})"
        )
    if value.device != adapter.device:
        raise ValueError(
            f"{what}: {name} is on {value.device}, expected the model's device {adapter.device} "
            f"(shape {list(value.shape)}); move it with .to({str(adapter.device)!r})"
        )
    return value
