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
``config._attn_implementation``, with the same rules; a set can hold bridges (:meth:`HookSet.enter`)
and cleanup callbacks too, and closes everything it holds together.

Entering, registering and removing are all-or-nothing, also against Ctrl-C
(:mod:`oculi.capture.interrupts`): a handle is kept the moment its hook exists, and removal
finishes every step whatever one of them raises, then raises the first error.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

from oculi.capture.interrupts import Errors, closed, opened, protected, raise_held


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
    """Remove the last ``fn`` added (compared with ``==``: a bound method is a new object at
    each attribute access, so ``is`` would never find it)."""
    fns = _FORWARD_END.get()
    for i in range(len(fns) - 1, -1, -1):
        if fns[i] == fn:
            _FORWARD_END.set(fns[:i] + fns[i + 1 :])
            return


def forward_ended() -> None:
    """Called where a :class:`StopForward` ended a forward early (no forward hook of the
    decoder ran): the open contexts' end-of-forward checks run here instead."""
    for fn in _FORWARD_END.get():
        fn()


# The hook sets open in the current thread / context (keys, never reused).
_OPEN: ContextVar[frozenset[int]] = ContextVar("oculi_open_hooksets", default=frozenset())
_KEYS = itertools.count()


def restore_grad_mode(enabled: bool) -> None:
    """Put autograd's mode back after an error or a Ctrl-C inside a context.

    ``torch.no_grad().__enter__`` switches autograd off and then returns: a Ctrl-C that
    lands between the two (in a decorated rotary embedding's forward, say) never reaches its
    ``__exit__``, and the thread would go on without gradients. Contexts leaving with an
    exception put back the mode they found; on a normal exit the body's own choice stands.
    """
    if torch.is_grad_enabled() != enabled:
        torch.set_grad_enabled(enabled)


class HookSet:
    """Registers forward hooks and removes exactly the handles it registered, in reverse order.

    Hooks may be added inside the ``with`` block; outside one they are refused so a handle can
    never outlive its context. They fire only in the thread (and ``contextvars`` context) that
    entered the set. Context managers entered with :meth:`enter` (attention bridges) and
    functions given to :meth:`callback` are closed with the hooks, in reverse order of adding.
    """

    def __init__(self) -> None:
        self._undo: list[Callable[[], Any]] = []  # handle.remove, exits, callbacks; in order
        self._n_hooks = 0
        self._active = False
        self._opened = False
        self._key = next(_KEYS)
        self._grad = True  # autograd's mode at enter

    @property
    def grad_at_enter(self) -> bool:
        """Whether autograd was enabled when the set was entered (restored on an error)."""
        return self._grad

    @protected
    def __enter__(self) -> HookSet:
        if self._active:
            raise RuntimeError("this HookSet is already open")
        self._opened = opened()
        self._grad = torch.is_grad_enabled()
        try:
            self._active = True
            _OPEN.set(_OPEN.get() | {self._key})
            raise_held()
        except BaseException:
            self.remove()
            raise
        return self

    @protected
    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is not None:
            restore_grad_mode(self._grad)
        self.remove()  # delivers an interrupt held meanwhile, once everything is removed

    @protected
    def remove(self) -> None:
        """Remove every hook this set registered and close what it entered (idempotent).

        Every step runs whatever another one raises; the first error is raised at the end.
        """
        self._active = False
        errors = Errors()
        errors.run(self._forget_key)
        while self._undo:
            errors.run(self._undo[-1])
            self._undo.pop()
        self._n_hooks = 0
        counted, self._opened = self._opened, False
        errors.run(lambda: closed(counted))
        try:
            errors.raise_first()
        finally:
            raise_held()

    def _forget_key(self) -> None:
        open_sets = _OPEN.get()
        if self._key in open_sets:
            _OPEN.set(open_sets - {self._key})

    def _scoped(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        key = self._key

        def hook(*args: Any) -> Any:
            raise_held()  # an interrupt held since an enter's last line: the forward stops here
            # another thread's (or context's) forward: this set is not open there
            return fn(*args) if key in _OPEN.get() else None

        return hook

    @protected
    def _keep(self, handle: Any) -> None:
        self._undo.append(handle.remove)
        self._n_hooks += 1
        raise_held()

    @protected
    def forward(self, module: nn.Module, fn: Callable[[nn.Module, Any, Any], Any]) -> None:
        """``fn(module, args, output)`` after ``module`` runs; a non-None return replaces the output."""
        self._check()
        self._keep(module.register_forward_hook(self._scoped(fn)))

    @protected
    def forward_pre(self, module: nn.Module, fn: Callable[[nn.Module, tuple], Any]) -> None:
        """``fn(module, args)`` before ``module`` runs; a non-None return replaces the args."""
        self._check()
        self._keep(module.register_forward_pre_hook(self._scoped(fn)))

    @protected
    def forward_pre_kwargs(
        self, module: nn.Module, fn: Callable[[nn.Module, tuple, dict], Any]
    ) -> None:
        """``fn(module, args, kwargs)`` before ``module`` runs; may return ``(args, kwargs)``."""
        self._check()
        self._keep(module.register_forward_pre_hook(self._scoped(fn), with_kwargs=True))

    @protected
    def enter(self, manager: Any) -> Any:
        """Enter ``manager`` (e.g. an attention bridge) now and exit it when this set closes.

        Returns what its ``__enter__`` returns.
        """
        self._check()
        kind = type(manager)
        value = kind.__enter__(manager)
        self._undo.append(lambda: kind.__exit__(manager, None, None, None))
        raise_held()
        return value

    @protected
    def callback(self, fn: Callable[[], Any]) -> None:
        """Call ``fn()`` when this set closes (in reverse order with its hooks)."""
        self._check()
        self._undo.append(fn)
        raise_held()

    def __len__(self) -> int:
        """The number of module hooks registered."""
        return self._n_hooks

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
