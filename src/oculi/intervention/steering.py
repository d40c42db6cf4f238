"""Steering vectors: add a direction to the residual stream, at chosen positions and steps.

::

    vec = SteeringVector.from_contrast(adapter, positive=["I am so happy"],
                                       negative=["I am so sad"], layer=6)
    vec.scale                                  # the residual's typical norm there (~4400 on Gemma)
    with InterventionContext(adapter, [vec.with_coefficient(0.25)]):
        adapter.generate("Today I feel so", max_new_tokens=30)   # " happy with my order!..."

On Gemma 3 270M that quarter of a residual turns the next token of "Today I feel so" from
" much" (p 0.10; " happy" 0.06) into " happy" (p 0.25); 0.5 already overshoots (p(" happy")
back to 0.05, the text drifts off topic). tests/test_steering_scale.py checks these numbers.

**The scale.** A steering vector made from activations (:meth:`SteeringVector.from_contrast`,
:meth:`oculi.probe.ProbeResult.steering_vector`) records ``scale``: the typical norm of the
activations it was made from (the median L2 norm over the tokens it read) at its site and
layer. Its ``coefficient`` is then a multiple of that norm: the vector added has length
``coefficient * scale`` along the vector's direction, so ``coefficient=0.5`` adds half a
typical residual, on any model and at any layer (median residual norms grow from ~100 to ~31000
across Gemma 3 270M's layers, and differ by orders of magnitude between models). A vector
built by hand, ``SteeringVector(vector, layer, coefficient)``, has no scale and adds
``coefficient * vector`` as given: the explicit way to add a raw vector (also
``from_contrast(..., relative=False)``: ``coefficient`` times the mean difference itself).

A contrastive steering vector is the mean activation over prompts with a property minus the
mean over prompts without it, read at one site of one layer (the residual leaving the layer by
default) at the last real token of each prompt, or averaged over its tokens.

Where it is added: ``positions`` selects prompt positions (``None``: all), ``steps`` the
generation steps (``"all"``, a range or a list; step 0 is the prompt pass, step ``k`` the
forward that feeds the ``k``-th generated token). Positions only restrict the prompt pass.
The addition is tied to absolute positions, so generation with the KV cache gives the same
tokens as generation without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
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
    """Add ``coefficient * vector`` to ``site`` of ``layer`` (raw), or, with ``scale``, a
    vector of length ``coefficient * scale`` along ``vector``.

    Example::

        SteeringVector(v, layer=6, coefficient=2.0)              # adds 2 * v
        SteeringVector(v, layer=6, coefficient=0.5, scale=3750)  # adds 1875 * v / |v|

    Args:
        vector: ``[d_model]``, finite, non-zero, on the model's dtype and device.
        layer: layer index (negatives count from the end).
        coefficient: the strength (0 adds nothing): a plain factor on ``vector`` without
            ``scale``, a multiple of ``scale`` with it.
        positions: prompt positions (int, list, slice) or ``None`` for all.
        steps: ``"all"``, a range or a list of generation steps (0 = the prompt pass).
        site: a d_model-wide site (default ``"resid_post"``, the residual leaving the layer).
        scale: the typical norm of the activations at ``site`` of ``layer`` (positive), as
            :meth:`from_contrast` and probes record it; ``None``: ``vector`` is added raw.

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
        scale: float | None = None,
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
        if scale is not None:
            scale = check_number(scale, "scale", what)
            if scale <= 0:
                raise ValueError(
                    f"{what}: scale is the activations' typical norm, a positive number; got "
                    f"{scale:g} (use scale=None to add the vector raw)"
                )
        self.scale = scale
        self.positions = check_position(positions, what)
        self.steps = steps
        self._steps = check_steps(steps)

    def _repr_fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"layer": self.layer, "coefficient": self.coefficient}
        if self.scale is not None:
            out["scale"] = round(self.scale, 4)
        if self.site != "resid_post":
            out["site"] = self.site
        if self.positions is not None:
            out["positions"] = self.positions
        if self.steps != "all":
            out["steps"] = self.steps
        return out

    def with_coefficient(self, coefficient: float) -> SteeringVector:
        """The same direction, scale, positions and steps with another coefficient."""
        return SteeringVector(
            self.vector,
            self.layer,
            coefficient,
            self.positions,
            self.steps,
            site=self.site,
            scale=self.scale,
        )

    @property
    def added(self) -> torch.Tensor:
        """``[d_model]``: what is added to the site at each selected position."""
        if self.scale is None:
            return self.vector * self.coefficient
        factor = self.coefficient * self.scale / float(self.vector.double().norm())
        return self.vector * factor

    def bind(self, adapter: Adapter) -> Binding:
        what = repr(self)
        if self.vector.shape[0] != adapter.d_model:
            raise ValueError(
                f"{what}: vector has width {self.vector.shape[0]}, expected d_model="
                f"{adapter.d_model} (shape [{adapter.d_model}])"
            )
        check_placement(self.vector, adapter, "vector", what)
        scaled = self.added
        if not bool(torch.isfinite(scaled.float().square().sum())):
            # the next norm squares the residual in float32
            raise ValueError(
                f"{what}: coefficient {self.coefficient:g} times the vector (|values| up to "
                f"{float(self.vector.abs().max()):g}) overflows: the steered residual or its squared "
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
        relative: bool = True,
        **kwargs: Any,
    ) -> SteeringVector:
        """``mean(positive activations) - mean(negative activations)`` at ``site`` of ``layer``.

        Example::

            vec = SteeringVector.from_contrast(adapter, ["I am so happy"], ["I am so sad"],
                                               layer=6, coefficient=0.25)
            vec.vector, vec.scale      # the mean difference [d_model]; the residual's norm

        The returned vector records ``scale``, the median L2 norm of the activations it was
        read from (the pooled tokens of both prompt sets: each prompt's last real token, or
        all its real tokens with ``position="mean"``), and with ``relative=True`` its
        ``coefficient`` is a multiple of it: ``coefficient=0.5`` adds a vector half as long as
        a typical residual there, along the mean difference.

        Args:
            adapter: the model.
            positive, negative: prompts (or token ids / a ``BatchEncoding``), padded as needed.
            layer: layer index.
            site: a d_model-wide site.
            position: which token of each prompt: an index among its *real* tokens (``-1``,
                the default, is the last real token whatever the padding side), or ``"mean"``
                for the mean over its real tokens. Each prompt then weighs the same.
            coefficient: with ``relative`` (the default), the added vector's length as a
                multiple of the activations' typical norm (0.1-0.3 steers Gemma 3 270M's
                middle layers; 1.0 is as long as the residual itself); otherwise a plain
                factor on the mean difference (seed 002's meaning).
            relative: record the typical norm as ``scale`` (default); ``False`` adds
                ``coefficient * (mean(positive) - mean(negative))`` raw.
            **kwargs: passed to the constructor (``positions``, ``steps``).

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
        means, norms = [], []
        for name, prompts in (("positive", positive), ("negative", negative)):
            if isinstance(prompts, (list, tuple)) and not prompts:
                raise ValueError(f"{what}: {name} is empty; give at least one prompt")
            batch = adapter.prepare(prompts)
            acts = record(adapter, batch, {site: (layer,)})[site][1][:, 0].float()  # [B, T, d]
            means.append(_pool(acts, batch.attention_mask, position, f"{what} ({name})").mean(0))
            norms.append(_read_norms(acts, batch.attention_mask, position))
        vector = (means[0] - means[1]).to(adapter.dtype)
        if float(vector.norm()) == 0.0:
            raise ValueError(
                f"{what}: positive and negative activations have the same mean at layer {layer} "
                f"({site}), so the steering vector is zero; use contrasting prompts"
            )
        scale = float(np.median(torch.cat(norms).double().cpu().numpy())) if relative else None
        return cls(vector, layer, coefficient, site=site, scale=scale, **kwargs)


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


def _read_norms(acts: torch.Tensor, mask: torch.Tensor, position: int | str) -> torch.Tensor:
    """The L2 norms of the tokens a contrast read: each row's chosen real token, or all of them
    (``"mean"``); ``[n]``."""
    if position == "mean":
        return acts[mask.to(acts.device).bool()].norm(dim=-1)
    return _pool(acts, mask, position, "").norm(dim=-1)
