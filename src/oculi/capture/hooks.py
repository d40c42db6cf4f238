"""Hook ownership: a context manager registers its hooks on enter and removes exactly those.

::

    with HookSet() as hooks:
        hooks.forward(layer, record_output)
        model(**batch)
    # every handle registered above is removed, also if the forward raised

The attention bridge (``bridge.py``) follows the same rule for the one piece of model state
oculi touches: ``config._attn_implementation`` is switched on enter and restored in
``finally``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle


class StopForward(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised by a hook to end a forward pass once everything asked for is recorded."""


class HookSet:
    """Registers forward hooks and removes exactly the handles it registered, in reverse order.

    Hooks may be added before or inside the ``with`` block; outside one they are refused so a
    handle can never outlive its context.
    """

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []
        self._active = False

    def __enter__(self) -> HookSet:
        self._active = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook this set registered (idempotent)."""
        self._active = False
        while self._handles:
            self._handles.pop().remove()

    def forward(self, module: nn.Module, fn: Callable[[nn.Module, Any, Any], Any]) -> None:
        """``fn(module, args, output)`` after ``module`` runs; a non-None return replaces the output."""
        self._check()
        self._handles.append(module.register_forward_hook(fn))

    def forward_pre(self, module: nn.Module, fn: Callable[[nn.Module, tuple], Any]) -> None:
        """``fn(module, args)`` before ``module`` runs; a non-None return replaces the args."""
        self._check()
        self._handles.append(module.register_forward_pre_hook(fn))

    def forward_pre_kwargs(
        self, module: nn.Module, fn: Callable[[nn.Module, tuple, dict], Any]
    ) -> None:
        """``fn(module, args, kwargs)`` before ``module`` runs; may return ``(args, kwargs)``."""
        self._check()
        self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))

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
