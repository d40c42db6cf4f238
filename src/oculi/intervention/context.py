"""The intervention context: interventions active for the duration of a ``with`` block.

::

    with InterventionContext(adapter, [SpectraScaler(layer=5, head=2, alpha=1.5),
                                       HeadAblation(layer=3, head=1)]):
        logits = adapter.forward("The capital of France is")          # a plain forward
        capture = adapter.capture_full("The capital of France is")   # records the changed model
        text = adapter.generate("The capital of France is", max_new_tokens=10)  # KV cache too
        out = adapter.model.generate(ids, max_new_tokens=10)         # the model's own generate

Everything that can be checked is checked when the context is built (layers, heads, site
names, tensor shapes, dtypes and devices); positions are checked against each prompt (range,
padding) when its forward starts, before any layer runs. On entering, the context registers
its module hooks and attention-bridge taps; on leaving, also after an exception, it removes
exactly those. Weights are never touched. Entering is all-or-nothing and leaving finishes
every step whatever one raises, also against Ctrl-C (:mod:`oculi.capture.interrupts`): an
interrupt during either is held until the model is consistent, then raised.

Contexts compose in any order: each one's interventions apply exactly while it is open,
whichever closes first, and the attention implementation (owned by the model's bridge owner,
:mod:`oculi.capture.bridge`) is restored when the last oculi context on the model closes. A
context applies only in the thread (and ``contextvars`` context) that entered it, like
``torch.no_grad``: other threads' forwards, plain or capturing, run as if it were not there.

Debug mode (``check_effect=True``, or the environment variable ``OCULI_DEBUG=1``) compares
each written activation before and after and warns (:class:`NoEffectWarning`) when an
intervention changed nothing in a forward pass, or never ran at all.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from oculi.capture.bridge import BridgeState, LayerTaps, attention_bridge
from oculi.capture.hooks import HookSet, add_forward_end, remove_forward_end, restore_grad_mode
from oculi.capture.interrupts import interruptible, protected, raise_held
from oculi.intervention.base import Binding, Intervention, NoEffectWarning
from oculi.intervention.finite import FiniteGuard
from oculi.intervention.state import Session, Tracker
from oculi.intervention.writers import install

if TYPE_CHECKING:
    from oculi.models.adapter import Adapter


def debug_enabled() -> bool:
    """Whether ``OCULI_DEBUG`` asks for effect checks."""
    return os.environ.get("OCULI_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


class InterventionContext:
    """Apply ``interventions`` to ``adapter``'s model inside a ``with`` block.

    Args:
        adapter: the model's adapter.
        interventions: :class:`~oculi.intervention.base.Intervention` objects, applied in
            order (two on the same site compose: the second sees the first's result).
        check_effect: warn when an intervention changes nothing (default: ``OCULI_DEBUG``).

    Raises:
        TypeError: an element that is not an intervention.
        ValueError, IndexError, KeyError: from checking each intervention against the model.

    Example::

        with InterventionContext(adapter, [SpectraScaler(layer=5, head=2, alpha=1.5),
                                           HeadAblation(layer=3, head=1, method="mean")]):
            adapter.generate("The capital of France is", max_new_tokens=10)
    """

    def __init__(
        self,
        adapter: Adapter,
        interventions: Iterable[Intervention] | Intervention,
        *,
        check_effect: bool | None = None,
    ) -> None:
        if isinstance(interventions, Intervention):
            interventions = [interventions]
        self.adapter = adapter
        self.interventions = list(interventions)
        for iv in self.interventions:
            if not isinstance(iv, Intervention):
                raise TypeError(
                    f"InterventionContext takes interventions (SpectraScaler, HeadAblation, "
                    f"ActivationPatch, SteeringVector, ...), got {type(iv).__name__}"
                )
        self.check_effect = debug_enabled() if check_effect is None else bool(check_effect)
        self.bindings: list[Binding] = [iv.bind(adapter) for iv in self.interventions]
        self._hooks: HookSet | None = None  # everything this context installed, while open
        self._forward_effects: dict[int, bool] = {}  # owner id -> changed, this forward
        self._applied: set[int] = set()
        self._warned: set[int] = set()
        self._guard = FiniteGuard()
        self._routed: BridgeState | None = None  # this context's bridge while open
        self._tapped: list[int] = []

    # -- lifecycle ------------------------------------------------------------------------
    @protected
    def __enter__(self) -> InterventionContext:
        if self._hooks is not None:
            raise RuntimeError(
                "this InterventionContext is already active; contexts do not re-enter"
            )
        self._prepare()
        if self.check_effect:  # before anything is installed: raised as errors, nothing to undo
            for iv, b in zip(self.interventions, self.bindings):
                if b.noop:
                    self._warn(iv, f"{iv!r} is a no-op: {b.noop}")
        hooks = HookSet()
        try:
            self._hooks = hooks.__enter__()
            self._install(hooks)
            raise_held()
        except BaseException:
            self._close(hooks)
            raise
        return self

    @interruptible
    def _prepare(self) -> None:
        """The interventions' own preparation (captures of reference data): interruptible,
        each capture restores the model itself."""
        for b in self.bindings:
            if b.prepare is not None:
                b.prepare()

    def _install(self, hooks: HookSet) -> None:
        adapter = self.adapter
        tracker = Tracker(on_session=self._begin_session)
        hooks.forward_pre_kwargs(adapter.model, tracker.model_pre_hook)
        hooks.forward_pre_kwargs(adapter.decoder, self._before_forward(tracker))
        hooks.forward(adapter.decoder, self._after_forward)
        taps: dict[int, LayerTaps] = {}
        report = self._report if self.check_effect else None
        edits = [e for b in self.bindings for e in b.edits]
        install(adapter, hooks, taps, [self._guard.wrap(e) for e in edits], tracker, report)
        self._guard.watch_attention(taps, edits)
        check = self._guard.check  # one object: a bound method is a new one at each access
        add_forward_end(check)
        hooks.callback(lambda: remove_forward_end(check))
        if taps:
            self._routed = hooks.enter(
                attention_bridge(adapter.attention_configs, adapter.attention_layer_ids, taps)
            )
            self._tapped = list(taps)

    @protected
    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None and self._hooks is not None:
            restore_grad_mode(self._hooks.grad_at_enter)
        self._close(self._hooks)
        try:
            self._final_checks(exc_type)
        finally:
            raise_held()

    @interruptible
    def _final_checks(self, exc_type: Any) -> None:
        """After the model is restored: the overflow and effect checks of the last forward."""
        if exc_type is None:
            self._guard.check()  # a forward that a capture ended early
        if self.check_effect and exc_type is None:
            self._flush()
            for iv, b in zip(self.interventions, self.bindings):
                if b.edits and id(iv) not in self._applied:
                    self._warn(
                        iv,
                        f"{iv!r} never ran: no forward pass inside the context reached it "
                        "(a capture that stops before its layer, or positions/steps that no "
                        "forward covered?)",
                        stacklevel=4,
                    )

    @protected
    def _close(self, hooks: HookSet | None) -> None:
        """Remove everything installed (hooks, the bridge, the forward-end check); every step
        runs whatever another raises, then the first error (or a held interrupt) is raised."""
        self._hooks = None
        self._routed = None
        if hooks is not None:
            hooks.remove()

    @property
    def active(self) -> bool:
        return self._hooks is not None

    # -- per forward ----------------------------------------------------------------------
    def _before_forward(self, tracker: Tracker):
        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            # a forward ended early (a capture's StopForward) is reported here
            self._guard.check()
            if self._routed is not None:
                self._routed.seen.clear()
                self._routed.check_switched()
            self._flush()
            tracker.pre_hook(module, args, kwargs)

        return hook

    def _begin_session(self, session: Session) -> None:
        for b in self.bindings:
            b.begin(session)

    def _after_forward(self, *_: Any) -> None:
        self._guard.check()
        if self._routed is not None:  # every layer ran: each tapped one came through the bridge
            self._routed.check_routed(self._tapped)
        self._flush()

    # -- effect checks --------------------------------------------------------------------
    def _report(self, owner: Any, changed: bool) -> None:
        key = id(owner)
        self._applied.add(key)
        self._forward_effects[key] = self._forward_effects.get(key, False) or changed

    def _flush(self) -> None:
        effects, self._forward_effects = self._forward_effects, {}
        for iv in self.interventions:
            if effects.get(id(iv)) is False:
                self._warn(
                    iv,
                    f"{iv!r} changed nothing in a forward pass: the activations it wrote were "
                    "identical before and after (a silent no-op? check its layer, head, "
                    "positions and value)",
                )

    def _warn(self, owner: Any, message: str, stacklevel: int = 3) -> None:
        if id(owner) in self._warned:
            return
        self._warned.add(id(owner))
        warnings.warn(message, NoEffectWarning, stacklevel=stacklevel)
