"""Steering vectors: add a direction to the residual stream, at chosen positions and steps.

::

    vec = SteeringVector.from_contrast(adapter, positive=["I am happy", "This is great"],
                                       negative=["I am sad", "This is terrible"], layer=6)
    with InterventionContext(adapter, [vec.with_coefficient(2.0)]):
        adapter.generate("Today I feel", max_new_tokens=30)

A contrastive steering vector is the mean activation over prompts with a property minus the
mean over prompts without it, read at one site of one layer (the residual leaving the layer by
default) at the last real token of each prompt, or averaged over its tokens. During a forward
``coefficient * vector`` is added at that site.

Where it is added: ``positions`` selects prompt positions (``None``: all), ``steps`` the
generation steps (``"all"``, a range or a list; step 0 is the prompt pass, step ``k`` the
forward that feeds the ``k``-th generated token). Positions only restrict the prompt pass.
The addition is tied to absolute positions, so generation with the KV cache gives the same
tokens as generation without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch

from oculi.capture.engine import record
from oculi.capture.sites import SITE_KINDS, check_kind
from oculi.intervention.base import (
    Binding,
    Intervention,
    check_number,
    check_placement,
    check_tensor,
)
from oculi.intervention.patch import SiteWrite
from oculi.intervention.state import Position, Steps, check_position, check_steps

if TYPE_CHECKING:
    from oculi.capture.inputs import Inputs
    from oculi.models.adapter import Adapter

# residual-width sites without heads: where a d_model vector can be added
STEERABLE = tuple(k for k, s in SITE_KINDS.items() if s.width == "d_model" and not s.per_head)


def _check_site(site: str, what: str) -> str:
    check_kind(site)
    if site not in STEERABLE:
        raise ValueError(
            f"{what}: a steering vector is added to a d_model-wide site; {site!r} is not one "
            f"(use one of {', '.join(STEERABLE)})"
        )
    return site


class SteeringVector(Intervention):
    """Add ``coefficient * vector`` to ``site`` of ``layer``.

    Args:
        vector: ``[d_model]``, finite, non-zero, on the model's dtype and device.
        layer: layer index (negatives count from the end).
        coefficient: the scale (0 adds nothing).
        positions: prompt positions (int, list, slice) or ``None`` for all.
        steps: ``"all"``, a range or a list of generation steps (0 = the prompt pass).
        site: a d_model-wide site (default ``"resid_post"``, the residual leaving the layer).

    Raises:
        ValueError: a vector that is not 1-D, has NaN/Inf or zero norm, or (on binding) whose
            width is not ``d_model``, whose dtype/device differ from the model's, or that
            overflows the model's dtype once multiplied by ``coefficient``; steps that
            are not ``"all"``, a range or a list of non-negative ints.
        IndexError: a layer out of range (on binding); a position past the prompt.
    """

    def __init__(
        self,
        vector: torch.Tensor,
        layer: int,
        coefficient: float = 1.0,
        positions: Position = None,
        steps: Steps = "all",
        *,
        site: str = "resid_post",
    ) -> None:
        what = f"SteeringVector(layer={layer})"
        self.site = _check_site(site, what)
        if not isinstance(vector, torch.Tensor):
            raise ValueError(f"{what}: vector must be a torch.Tensor, got {type(vector).__name__}")
        if vector.dim() != 1:
            raise ValueError(
                f"{what}: vector must be 1-D [d_model], got shape {list(vector.shape)}"
            )
        vector = check_tensor(vector, "vector", what)
        if vector.device.type != "meta" and float(vector.float().norm()) == 0.0:
            raise ValueError(f"{what}: vector has zero norm, so steering would do nothing")
        self.vector, self.layer = vector, layer
        self.coefficient = check_number(coefficient, "coefficient", what)
        self.positions = check_position(positions, what)
        self.steps = steps
        self._steps = check_steps(steps)

    def _repr_fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"layer": self.layer, "coefficient": self.coefficient}
        if self.site != "resid_post":
            out["site"] = self.site
        if self.positions is not None:
            out["positions"] = self.positions
        if self.steps != "all":
            out["steps"] = self.steps
        return out

    def with_coefficient(self, coefficient: float) -> SteeringVector:
        """The same direction, positions and steps with another coefficient."""
        return SteeringVector(
            self.vector, self.layer, coefficient, self.positions, self.steps, site=self.site
        )

    def bind(self, adapter: Adapter) -> Binding:
        what = repr(self)
        if self.vector.shape[0] != adapter.d_model:
            raise ValueError(
                f"{what}: vector has width {self.vector.shape[0]}, expected d_model="
                f"{adapter.d_model} (shape [{adapter.d_model}])"
            )
        vector = check_placement(self.vector, adapter, "vector", what)
        scaled = vector * self.coefficient
        if not bool(torch.isfinite(scaled.float().square().sum())):
            # the next norm squares the residual in float32
            raise ValueError(
                f"{what}: coefficient {self.coefficient:g} times the vector (|values| up to "
                f"{float(vector.abs().max()):g}) overflows: the steered residual or its squared "
                f"norm (which the next normalisation computes in float32, largest value "
                f"{torch.finfo(torch.float32).max:g}) would be inf; use a smaller coefficient"
            )
        write = SiteWrite(
            adapter,
            self.site,
            self.layer,
            scaled,
            mode="add",
            position=self.positions,
            steps="all" if self._steps is None else self._steps,
            owner=self,
        )
        return Binding(edits=[write.edit()], begins=[write.begin])

    @classmethod
    def from_contrast(
        cls,
        adapter: Adapter,
        positive: Sequence[str] | Inputs,
        negative: Sequence[str] | Inputs,
        layer: int = 6,
        site: str = "resid_post",
        position: int | Literal["mean"] = -1,
        coefficient: float = 1.0,
        **kwargs: Any,
    ) -> SteeringVector:
        """``mean(positive activations) - mean(negative activations)`` at ``site`` of ``layer``.

        Args:
            adapter: the model.
            positive, negative: prompts (or token ids / a ``BatchEncoding``), padded as needed.
            layer: layer index.
            site: a d_model-wide site.
            position: which token of each prompt: an index among its *real* tokens (``-1``,
                the default, is the last real token whatever the padding side), or ``"mean"``
                for the mean over its real tokens. Each prompt then weighs the same.
            coefficient, **kwargs: passed to the constructor (``positions``, ``steps``).

        Raises:
            ValueError: an empty prompt set, a bad ``position``, or sets whose means are
                identical (a zero vector).
        """
        what = "SteeringVector.from_contrast"
        _check_site(site, what)
        layer = adapter.resolve_layer(layer)
        if not (
            position == "mean" or (isinstance(position, int) and not isinstance(position, bool))
        ):
            raise ValueError(f"{what}: position must be an int or 'mean', got {position!r}")
        means = []
        for name, prompts in (("positive", positive), ("negative", negative)):
            if isinstance(prompts, (list, tuple)) and not prompts:
                raise ValueError(f"{what}: {name} is empty; give at least one prompt")
            batch = adapter.prepare(prompts)
            acts = record(adapter, batch, {site: (layer,)})[site][1][:, 0].float()  # [B, T, d]
            means.append(_pool(acts, batch.attention_mask, position, f"{what} ({name})").mean(0))
        vector = (means[0] - means[1]).to(adapter.dtype)
        if float(vector.norm()) == 0.0:
            raise ValueError(
                f"{what}: positive and negative activations have the same mean at layer {layer} "
                f"({site}), so the steering vector is zero; use contrasting prompts"
            )
        return cls(vector, layer, coefficient, site=site, **kwargs)


def _pool(acts: torch.Tensor, mask: torch.Tensor, position: int | str, what: str) -> torch.Tensor:
    """``[B, T, d]`` -> ``[B, d]``: the chosen real token of each row, or their mean."""
    m = mask.to(acts.device).bool()
    if position == "mean":
        w = m.to(acts.dtype)[..., None]
        return (acts * w).sum(1) / w.sum(1)
    rows = []
    for r in range(acts.shape[0]):
        real = m[r].nonzero().flatten()
        n = real.numel()
        if not -n <= int(position) < n:
            raise IndexError(
                f"{what}: position {position} out of range for prompt {r} with {n} real tokens"
            )
        rows.append(acts[r, real[int(position)]])
    return torch.stack(rows)
