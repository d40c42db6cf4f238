"""Parity report: oculi's captures against the model's own outputs, on the model you have.

::

    from oculi.experiments.parity import verify
    report = verify(adapter, ["The Eiffel Tower is located in the city of"])
    print(report.table())        # one row per check: max |diff|, relative diff, tolerance, ok
    report.ok                    # every check within tolerance

Checks, each on every prompt alone (no padding):

- ``hidden_states``: oculi's residual entering each layer (``resid_pre``) and leaving each
  layer but the last (``resid_post``) against ``output_hidden_states`` (whose last entry is
  already normalised, so the last layer is judged through the logits instead);
- ``attentions``: oculi's attention patterns against ``output_attentions`` with the model's
  ``eager`` attention (the implementation that returns probabilities), restored afterwards;
- ``logits``: the last layer of oculi's logit lens against the model's logits;

and, with two or more prompts, ``padded_batch``: the prompts captured as one padded batch (the
tokenizer's padding side) against each prompt alone, at real positions only (residual,
patterns, logits). A relative difference is ``max |oculi - reference| / max |reference|``;
tolerances are 1e-5 in fp32/fp64 and 2e-2 in half precision.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from oculi.capture.interrupts import no_grad

DEFAULT_PROMPTS = (
    "The Eiffel Tower is located in the city of",
    "When Mary and John went to the store, John gave a drink to",
)


@dataclass(frozen=True)
class Check:
    """One comparison: the largest absolute and relative difference, and its tolerance."""

    name: str
    what: str
    max_abs_diff: float
    rel_diff: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.rel_diff <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {
            "check": self.name,
            "what": self.what,
            "max_abs_diff": self.max_abs_diff,
            "rel_diff": self.rel_diff,
            "tolerance": self.tolerance,
            "ok": self.ok,
        }


@dataclass(frozen=True)
class ParityReport:
    """The checks of :func:`verify`, printable as a table and as JSON.

    ::

        report = verify(adapter, ["The Eiffel Tower is located in the city of"])
        print(report.table())
        report.to_dict()["ok"]
    """

    model: str
    dtype: str
    device: str
    prompts: tuple[str, ...]
    checks: tuple[Check, ...] = field(default_factory=tuple)
    #: device map, offloaded weights and quantization (:func:`oculi.models.placement.describe_placement`)
    placement: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "dtype": self.dtype,
            "device": self.device,
            "prompts": list(self.prompts),
            **self.placement,
            "ok": self.ok,
            "checks": [c.to_dict() for c in self.checks],
        }

    def table(self) -> str:
        head = f"{'check':<14} {'what':<40} {'max |diff|':>11} {'rel diff':>10} {'tol':>8}  ok"
        lines = [head, "-" * len(head)]
        for c in self.checks:
            lines.append(
                f"{c.name:<14} {c.what:<40} {c.max_abs_diff:>11.3e} {c.rel_diff:>10.2e} "
                f"{c.tolerance:>8.0e}  {'yes' if c.ok else 'NO'}"
            )
        lines.append(f"{'all ok' if self.ok else 'MISMATCH'}: {len(self.checks)} checks")
        return "\n".join(lines)


def _tolerance(dtype: Any) -> float:
    import torch

    return 1e-5 if dtype in (torch.float32, torch.float64) else 2e-2


def _compare(name: str, what: str, got: Any, ref: Any, tol: float) -> Check:
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    if got.shape != ref.shape:
        raise ValueError(
            f"{name} ({what}): shapes differ, oculi {tuple(got.shape)} vs "
            f"reference {tuple(ref.shape)}"
        )
    diff = float((got - ref).abs().max()) if got.numel() else 0.0
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    return Check(name, what, diff, diff / scale if scale > 0 else diff, tol)


@contextmanager
def _eager(model: Any):
    """Switch the model to eager attention (which returns probabilities), then restore it."""
    before = model.config._attn_implementation
    if before == "eager":
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def _single_checks(adapter: Any, prompt: str, tol: float, label: str) -> list[Check]:
    import torch

    from oculi.capture import CaptureConfig, LogitConfig, ResidualConfig

    batch = adapter.prepare(prompt)
    n = adapter.n_layers
    with _eager(adapter.model), no_grad():
        ref = adapter.model(
            **batch.model_kwargs(),
            output_hidden_states=True,
            output_attentions=True,
            use_cache=False,
        )
        full = adapter.capture_full(
            prompt,
            attention=CaptureConfig(
                capture_queries=False, capture_keys=False, capture_values=False
            ),
            residual=ResidualConfig(capture_post_attn=False, capture_pre_mlp=False),
            mlp=None,
            logits=LogitConfig(layers=[n - 1], top_k=1),
        )
    hs = torch.stack(ref.hidden_states[:n])[:, 0]  # [L, T, d] entering each layer
    checks = [
        _compare(
            "hidden_states", f"{label} resid_pre, {n} layers", full.residual.pre_attn, hs, tol
        ),
    ]
    if n > 1:
        after = torch.stack(ref.hidden_states[1:n])[:, 0]
        checks.append(
            _compare(
                "hidden_states",
                f"{label} resid_post, layers 0..{n - 2}",
                full.residual.post_mlp[: n - 1],
                after,
                tol,
            )
        )
    pattern_ref = torch.stack(ref.attentions)[:, 0]  # [L, H, T, T]
    checks.append(
        _compare(
            "attentions", f"{label} patterns (eager)", full.attention.patterns, pattern_ref, tol
        )
    )
    checks.append(
        _compare(
            "logits",
            f"{label} last-layer lens vs logits",
            full.logits.logits(n - 1),
            ref.logits[0],
            tol,
        )
    )
    return checks


def _batch_checks(adapter: Any, prompts: Sequence[str], tol: float) -> list[Check]:
    import torch

    from oculi.capture import CaptureConfig, LogitConfig, ResidualConfig

    n = adapter.n_layers
    configs = dict(
        attention=CaptureConfig(capture_queries=False, capture_keys=False, capture_values=False),
        residual=ResidualConfig(
            capture_pre_attn=False, capture_post_attn=False, capture_pre_mlp=False
        ),
        mlp=None,
        logits=LogitConfig(layers=[n - 1], top_k=1),
    )
    batch = adapter.prepare(list(prompts))
    side = getattr(adapter.tokenizer, "padding_side", "right")
    with no_grad():
        together = adapter.capture_full(list(prompts), **configs)
        alone = [adapter.capture_full(p, **configs) for p in prompts]
    got_r, ref_r, got_p, ref_p, got_l, ref_l = [], [], [], [], [], []
    for row, single in enumerate(alone):
        real = batch.attention_mask[row].bool().cpu()
        idx = real.nonzero()[:, 0]
        got_r.append(together.residual.post_mlp[row][:, idx])
        ref_r.append(single.residual.post_mlp)
        pat = together.attention.patterns[row][:, :, idx][..., idx]
        got_p.append(pat.flatten())
        ref_p.append(single.attention.patterns.flatten())
        got_l.append(together.logits.logits(n - 1)[row][idx])
        ref_l.append(single.logits.logits(n - 1))
    what = f"{len(prompts)} prompts, {side} padding"
    cat = lambda xs: torch.cat([x.flatten() for x in xs])  # noqa: E731
    return [
        _compare("padded_batch", f"{what}: resid_post", cat(got_r), cat(ref_r), tol),
        _compare("padded_batch", f"{what}: patterns", cat(got_p), cat(ref_p), tol),
        _compare("padded_batch", f"{what}: logits", cat(got_l), cat(ref_l), tol),
    ]


def verify(
    adapter: Any, prompts: str | Sequence[str] | None = None, *, tolerance: float | None = None
) -> ParityReport:
    """Compare oculi's captures with the model's own outputs (see the module docstring).

    Args:
        adapter: an oculi adapter.
        prompts: one prompt or several (default: two of different lengths). With one prompt
            the padded-batch check pairs it with its own first half.
        tolerance: the largest relative difference accepted (default by dtype).

    Returns:
        A :class:`ParityReport`; ``report.ok`` says whether every check passed.

    Example::

        verify(oculi.load()).ok        # True: every check within tolerance
    """
    from oculi.errors import InputError

    if prompts is None:
        prompts = list(DEFAULT_PROMPTS)
    elif isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise InputError(f"verify needs one or more non-empty prompt strings, got {prompts!r}")
    tol = tolerance if tolerance is not None else _tolerance(adapter.dtype)
    checks: list[Check] = []
    for i, prompt in enumerate(prompts):
        checks += _single_checks(adapter, prompt, tol, f"prompt {i}:")
    pair = prompts if len(prompts) > 1 else [prompts[0], _first_half(adapter, prompts[0])]
    if pair[1]:
        checks += _batch_checks(adapter, pair, tol)
    from oculi.models.placement import describe_placement

    cfg = adapter.model.config
    return ParityReport(
        placement=describe_placement(adapter),
        model=str(getattr(cfg, "name_or_path", "") or type(adapter.model).__name__),
        dtype=str(adapter.dtype).removeprefix("torch."),
        device=str(adapter.device),
        prompts=tuple(pair if len(prompts) == 1 and pair[1] else prompts),
        checks=tuple(checks),
    )


def _first_half(adapter: Any, prompt: str) -> str:
    """The prompt cut at about half its characters on a word boundary ('' if too short)."""
    words = prompt.split()
    return " ".join(words[: len(words) // 2]) if len(words) >= 2 else ""
