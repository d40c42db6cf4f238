"""Fixtures shared by the test files."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def gemma():
    """The embedded Gemma 3 270M as an :class:`oculi.Adapter`, loaded once per test session.

    On CPU in fp32, so numbers are the same on every machine. The first session on a machine
    converts the packaged GGUF into ``$OCULI_CACHE`` (1-2 min); later ones load the cached
    folder in seconds. Mark tests that use it ``@pytest.mark.gemma``.
    """
    import oculi

    return oculi.load(device="cpu")


@pytest.fixture(autouse=True)
def _grad_mode_kept():
    """Every test leaves autograd as it found it (enabled): grad mode is global to the thread,
    so a test or an oculi call that leaves it off makes later training tests fail far away."""
    import torch

    yield
    if not torch.is_grad_enabled():
        torch.set_grad_enabled(True)
        pytest.fail("the test left autograd disabled (torch.is_grad_enabled() is False)")
