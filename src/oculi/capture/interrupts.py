"""Interrupt safety: a Ctrl-C never lands between changing the model and recording the change.

Python raises ``KeyboardInterrupt`` wherever the main thread is when SIGINT arrives: between
registering a hook and keeping its handle, on the first line of an ``__exit__``, halfway
through restoring the attention implementation. ``try``/``finally`` cannot close those
windows, because the interrupt can land on the ``finally`` line itself. oculi closes them by
*holding* the interrupt while its lifecycle code runs::

    @protected
    def __enter__(self):
        self._opened = opened()      # oculi's SIGINT handler in front of the previous one
        try:
            ...                      # install; a SIGINT arriving here is held
            raise_held()             # delivered here, so the except undoes the install
        except BaseException:
            self._close()
            raise
        return self

- Functions marked :func:`protected` (entering and leaving hook sets, attention bridges and
  intervention contexts) are recognised by their code objects, so protection holds from their
  very first bytecode: ``with`` calls ``__exit__`` directly, and an interrupt on its first
  line is held like one in its middle. Code they call (torch's ``register_forward_hook``,
  ``contextlib``) is covered too: the handler looks up the stack for the nearest marked frame.
- :func:`raise_held` delivers a held interrupt (the previous handler runs: a
  ``KeyboardInterrupt`` by default) at a point the caller chose: inside an enter's ``try``, so
  the enter undoes itself first, or at the end of an exit, after its cleanup is complete.
- Everywhere else, and in functions marked :func:`interruptible` (the captures an intervention
  context runs while it prepares), the previous handler runs at once: a forward inside a
  capture stays interruptible.

oculi's handler is installed while any oculi context is open in the main thread and removed
when the last one closes (unless someone replaced it meanwhile). Only the main thread receives
SIGINT, so other threads need none of this. An interrupt that arrives before ``opened()`` has
installed the handler arrives at once, before anything was installed; one on the very last
line of an enter, after its delivery point, stays held until the next one (the next oculi hook
that runs in a forward, the next registration, or the exit): it is never lost and never lands
between two steps. ``tests/test_interrupts.py`` raises SIGINT at every line of enter/exit code.
"""

from __future__ import annotations

import functools
import signal
import sys
import threading
from collections.abc import Callable
from types import CodeType, FrameType
from typing import Any, TypeVar

import torch

try:  # the C functions: signal.signal's enum conversions cost ~15 us per call
    from _signal import getsignal as _getsignal
    from _signal import signal as _setsignal
except ImportError:  # pragma: no cover - not CPython
    from signal import getsignal as _getsignal
    from signal import signal as _setsignal

F = TypeVar("F", bound=Callable[..., Any])
_SIGINT = int(signal.SIGINT)

# code object -> True (interrupts held inside it) or False (delivered at once inside it)
_MARKS: dict[CodeType, bool] = {}
_HELD: list[int] = []  # signals held in the main thread, oldest first


class _Handler:
    """What oculi replaced (the previous SIGINT handler) and how many contexts need it."""

    previous: Any = signal.default_int_handler
    open = 0  # oculi contexts open in the main thread


def protected(fn: F) -> F:
    """Mark ``fn``: an interrupt arriving while it (or anything it calls) runs is held."""
    _MARKS[fn.__code__] = True
    return fn


def interruptible(fn: F) -> F:
    """Mark ``fn``: interrupts arrive at once inside it, also when a protected function
    called it (long work such as a capture inside an enter)."""
    _MARKS[fn.__code__] = False
    return fn


def _held_at(frame: FrameType | None) -> bool:
    """Whether the nearest marked frame at or above ``frame`` holds interrupts."""
    while frame is not None:
        mark = _MARKS.get(frame.f_code)
        if mark is not None:
            return mark
        frame = frame.f_back
    return False


def _handle(signum: int, frame: FrameType | None) -> None:
    if _held_at(frame):
        _HELD.append(signum)
        return
    _Handler.previous(signum, frame)


def _main_thread() -> bool:
    return threading.get_ident() == threading.main_thread().ident


@protected
def opened() -> bool:
    """Count an oculi context opening; the first one in the main thread puts oculi's handler
    in front of the previous one. Returns whether it counted (pass that to :func:`closed`)."""
    if not _main_thread():
        return False
    if _Handler.open == 0:
        current = _getsignal(_SIGINT)
        if callable(current) and current is not _handle:  # SIG_DFL / SIG_IGN: nothing to hold
            _Handler.previous = current
            _setsignal(_SIGINT, _handle)
    _Handler.open += 1
    return True


@protected
def closed(counted: bool) -> None:
    """Undo one :func:`opened`; the last one puts the previous handler back."""
    if not counted:
        return
    _Handler.open -= 1
    if _Handler.open == 0 and _getsignal(_SIGINT) is _handle:
        _setsignal(_SIGINT, _Handler.previous)


@protected
def raise_held() -> None:
    """Deliver a held interrupt now (the previous handler runs: ``KeyboardInterrupt``).

    Call it where the protected caller is consistent: inside an enter's ``try`` (the
    ``except`` undoes the enter) or at the end of an exit. A protected function that calls
    another treats the exception like any other (undoes, or collects it and goes on).
    """
    if not _HELD or not _main_thread():
        return
    signum = _HELD[0]
    _HELD.clear()
    _Handler.previous(signum, sys._getframe(1))


class Errors:
    """Collects the errors of cleanup steps so every step runs; :meth:`raise_first` afterwards.

    ::

        errors = Errors()
        for handle in handles:
            errors.run(handle.remove)
        errors.raise_first()  # the first error, the others added to it as notes
    """

    def __init__(self) -> None:
        self.errors: list[BaseException] = []

    def run(self, step: Callable[[], Any]) -> None:
        try:
            step()
        except BaseException as exc:  # noqa: BLE001 - every step runs; the first is re-raised
            self.errors.append(exc)

    def raise_first(self) -> None:
        if not self.errors:
            return
        first, *rest = self.errors
        add_note = getattr(first, "add_note", None)  # Python 3.11+
        for exc in rest:
            if add_note is not None:
                add_note(f"also raised while closing: {exc!r}")
        raise first


class grad_mode:  # noqa: N801 - used like torch.no_grad
    """``torch.set_grad_enabled(enabled)`` for a ``with`` block, safe against Ctrl-C.

    ``torch.no_grad().__enter__`` switches autograd off and then returns; a Ctrl-C between
    the two never reaches its ``__exit__``, and the thread goes on without gradients (every
    later ``backward`` fails). Here the switch and its undo run with interrupts held, so the
    block either never started or is undone::

        with no_grad():
            adapter.model(ids)
    """

    __slots__ = ("enabled", "_prev", "_opened")

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._prev = True
        self._opened = False

    @protected
    def __enter__(self) -> grad_mode:
        self._opened = opened()
        self._prev = torch.is_grad_enabled()
        try:
            torch._C._set_grad_enabled(self.enabled)
            raise_held()
        except BaseException:
            torch._C._set_grad_enabled(self._prev)
            closed(self._opened)
            raise
        return self

    @protected
    def __exit__(self, *exc: object) -> None:
        try:
            torch._C._set_grad_enabled(self._prev)
        finally:
            counted, self._opened = self._opened, False
            closed(counted)
        raise_held()


def no_grad() -> grad_mode:
    """:class:`grad_mode` ``(False)``: ``torch.no_grad()`` that a Ctrl-C cannot leave on."""
    return grad_mode(False)


def enable_grad() -> grad_mode:
    """:class:`grad_mode` ``(True)``: ``torch.enable_grad()`` that a Ctrl-C cannot leave on."""
    return grad_mode(True)


def without_grad(fn: F) -> F:
    """Decorator: ``fn`` runs inside :func:`no_grad` (a fresh one per call).

    ::

        @without_grad
        def encode(x): ...
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with grad_mode(False):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
