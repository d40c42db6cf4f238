"""Hook ownership: a context manager registers its hooks on enter and removes exactly those.

::

    with HookSet() as hooks:
        hooks.forward(layer, record_output)
        model(**batch)
    # every handle registered above is removed, also if the forward raised

Hooks are scoped to the thread (and ``contextvars`` context) that entered the set, like
``torch.no_grad``: a module hook is global to its module, so each one first checks that its set
is open in the calling context and does nothing otherwise. Another thread's forward, or a
plain ``model(...)`` beside a capture, runs untouched. Sets close in any order: each removes
exactly its own handles.

The attention bridge (``bridge.py``) owns the one other piece of model state oculi touches,
``config._attn_implementation``, with the same rules.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle


class StopForward(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised by a hook to end a forward pass once everything asked for is recorded."""


# Checks that run when a forward ends (interventions' overflow checks), per thread / context.
_FORWARD_END: ContextVar[tuple[Callable[[], None], ...]] = ContextVar(
    "oculi_forward_end", default=()
)


def add_forward_end(fn: Callable[[], None]) -> None:
    """Run ``fn()`` in :func:`forward_ended` of this thread / context until removed."""
    _FORWARD_END.set((*_FORWARD_END.get(), fn))


def remove_forward_end(fn: Callable[[], None]) -> None:
    _FORWARD_END.set(tuple(f for f in _FORWARD_END.get() if f is not fn))


def forward_ended() -> None:
    """Called where a :class:`StopForward` ended a forward early (no forward hook of the
    decoder ran): the open contexts' end-of-forward checks run here instead."""
    for fn in _FORWARD_END.get():
        fn()


# The hook sets open in the current thread / context (keys, never reused).
_OPEN: ContextVar[frozenset[int]] = ContextVar("oculi_open_hooksets", default=frozenset())
_KEYS = itertools.count()


class HookSet:
    """Registers forward hooks and removes exactly the handles it registered, in reverse order.

    Hooks may be added inside the ``with`` block; outside one they are refused so a handle can
    never outlive its context. They fire only in the thread (and ``contextvars`` context) that
    entered the set.
    """

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []
        self._active = False
        self._key = next(_KEYS)

    def __enter__(self) -> HookSet:
        if self._active:
            raise RuntimeError("this HookSet is already open")
        self._active = True
        _OPEN.set(_OPEN.get() | {self._key})
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook this set registered (idempotent)."""
        self._active = False
        open_sets = _OPEN.get()
        if self._key in open_sets:
            _OPEN.set(open_sets - {self._key})
        while self._handles:
            self._handles.pop().remove()

    def _scoped(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        key = self._key

        def hook(*args: Any) -> Any:
            # another thread's (or context's) forward: this set is not open there
            return fn(*args) if key in _OPEN.get() else None

        return hook

    def forward(self, module: nn.Module, fn: Callable[[nn.Module, Any, Any], Any]) -> None:
        """``fn(module, args, output)`` after ``module`` runs; a non-None return replaces the output."""
        self._check()
        self._handles.append(module.register_forward_hook(self._scoped(fn)))

    def forward_pre(self, module: nn.Module, fn: Callable[[nn.Module, tuple], Any]) -> None:
        """``fn(module, args)`` before ``module`` runs; a non-None return replaces the args."""
        self._check()
        self._handles.append(module.register_forward_pre_hook(self._scoped(fn)))

    def forward_pre_kwargs(
        self, module: nn.Module, fn: Callable[[nn.Module, tuple, dict], Any]
    ) -> None:
        """``fn(module, args, kwargs)`` before ``module`` runs; may return ``(args, kwargs)``."""
        self._check()
        self._handles.append(module.register_forward_pre_hook(self._scoped(fn), with_kwargs=True))

    def __len__(self) -> int:
        return len(self._handles)

    def _check(self) -> None:
        if not self._active:
            raise RuntimeError("HookSet hooks can only be added inside its `with` block")


def first_tensor(value: Any) -> Any:
    """A module's main output: the tensor itself, or the first element of a tuple."""
    return value[0] if isinstance(value, (tuple, list)) else value


def replace_first(value: Any, tensor: Any) -> Any:
    """``value`` with its main output replaced by ``tensor`` (same container type)."""
    if isinstance(value, tuple):
        return (tensor, *value[1:])
    if isinstance(value, list):
        return [tensor, *value[1:]]
    return tensor


def hidden_arg(args: tuple, kwargs: dict | None = None) -> Any:
    """The hidden-states argument of a layer call, positional or keyword."""
    if args:
        return args[0]
    if kwargs and "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise RuntimeError("could not find the hidden_states argument of the layer call")
