"""What the memory-measuring subprocess scripts of test_memory_plan.py and test_longctx.py
share (they put ``tests/`` on ``sys.path``): a ``/proc/self/status`` reader and a spy that
keeps what a planning function returned."""

from __future__ import annotations

from typing import Any


def proc_status(key: str) -> int:
    """A ``/proc/self/status`` field in bytes: ``"VmRSS"`` (resident now) or ``"VmHWM"``
    (this process's own peak; ``ru_maxrss`` survives exec from a big parent)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key)) * 1024


def keep_returns(module: Any, name: str) -> list[Any]:
    """Replace ``module.<name>`` by a wrapper that appends each call's result to the list
    returned here (the memory plan a capture made, say)."""
    returned: list[Any] = []
    original = getattr(module, name)

    def spy(*args: Any, **kwargs: Any) -> Any:
        returned.append(original(*args, **kwargs))
        return returned[-1]

    setattr(module, name, spy)
    return returned
