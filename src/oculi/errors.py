"""oculi's errors: each says what was wrong, what was expected, and what to do.

They subclass the built-in exception a user would naturally catch (``IndexError`` for a layer
out of range, ``KeyError`` for an unknown site, ``ValueError`` for bad values), so
``except ValueError`` keeps working, while ``except OculiError`` catches all of oculi's own.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class OculiError(Exception):
    """Base class of every error oculi raises on purpose.

    Catch it to handle every deliberate oculi error at once::

        try:
            adapter.capture_residual(prompt, ResidualConfig(layers=[99]))
        except oculi.OculiError as error:      # here a LayerIndexError, also an IndexError
            print(error)                       # names the valid range
    """


class UnsupportedArchitectureError(OculiError, NotImplementedError):
    """The model's architecture, or a feature of its config, is not modelled by any anatomy.

    Raised on loading, naming the supported types and how to register a family::

        oculi.load("path/to/a-mamba-model")   # UnsupportedArchitectureError: ... supported: gemma, ...
    """


class LayerIndexError(OculiError, IndexError):
    """A layer index outside ``-n_layers .. n_layers - 1``.

    It is an ``IndexError``, and says the valid range::

        adapter.capture_residual(prompt, ResidualConfig(layers=[18]))
        # LayerIndexError: layer 18 out of range for a model with 18 layers (0..17)
    """


class UnknownSiteError(OculiError, KeyError):
    """A site or hook name that does not exist. ``str()`` shows the message, not its repr."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class InputError(OculiError, ValueError):
    """Inputs (prompts, token ids, masks, tensors) that cannot be used as given.

    It is a ``ValueError`` whose message names the accepted forms::

        adapter.capture(None)     # InputError: no input given (None); pass a string, a list ...
    """


class CaptureFileError(OculiError, ValueError):
    """A capture file that is missing, corrupt, truncated, or of a format not loaded silently."""


class FileWriteError(OculiError, OSError):
    """A file that cannot be written where asked: a missing or read-only folder, a folder in
    the way, or a refused write. The message names the path as the user gave it; ``reason``
    is the cause alone ("File too large"), for a caller that names another path."""

    reason: str | None = None


class OutputExistsError(FileWriteError, FileExistsError):
    """The target file exists and the caller passed ``overwrite=False``."""


class ModelLoadError(OculiError, OSError):
    """A model that could not be loaded: unreachable hub, missing folder or file, no tokenizer."""


class MissingExtraError(OculiError, ImportError):
    """An optional dependency is not installed."""


class WeightReadError(OculiError, NotImplementedError):
    """A layer's weights that cannot be read as floats: on the ``meta`` device with no offload
    hook holding them, or quantized in a layout oculi does not unpack (named in the message)."""


class NonFiniteError(OculiError, FloatingPointError):
    """An intervention wrote inf or NaN into the model's activations (an overflow).

    Checked on the device once per forward, naming the intervention::

        with InterventionContext(adapter, [SpectraScaler(layer=3, head=0, alpha=1e30)]):
            adapter.forward(prompt)   # NonFiniteError: SpectraScaler(...) overflowed q of layer 3
    """


class StorageRangeWarning(UserWarning):
    """Captured values exceed the range of the storage dtype (stored as inf).

    Warned once per capture, naming the sites and layers; make it an error with::

        warnings.simplefilter("error", oculi.StorageRangeWarning)
        adapter.capture_residual(prompt, ResidualConfig(storage_dtype=torch.float16))
    """


class NonFiniteWarning(UserWarning):
    """The model itself produced NaN or inf (broken weights, an overflow in its dtype): a
    capture recorded non-finite values, or the logit lens found non-finite logits. The message
    names the first layer and site in forward order. Make it an error with
    ``warnings.simplefilter("error", NonFiniteWarning)``."""


def did_you_mean(name: str, valid: Iterable[str], n: int = 3, *, prefix: str = "") -> str:
    """``"; did you mean 'x'?"`` for the closest valid names, or ``""`` if none is close.

    ``prefix`` is prepended to each suggestion: compare only the part of a name that can be
    misspelt (a hook ``"hook_resid_mid2"``) and suggest it in full (``prefix="blocks.3."``),
    so that a shared ``"blocks.3."`` does not make unrelated hooks look close. Names clearly
    less close than the best one are left out (``resid_mid2``: ``resid_mid``, not also
    ``resid_pre``).
    """
    matches = difflib.get_close_matches(name, list(valid), n=n, cutoff=0.6)
    if not matches:
        return ""
    score = [difflib.SequenceMatcher(None, name, m).ratio() for m in matches]
    matches = [prefix + m for m, r in zip(matches, score) if r >= max(score) - 0.1]
    if len(matches) == 1:
        return f"; did you mean {matches[0]!r}?"
    return "; did you mean " + " or ".join(repr(m) for m in matches) + "?"


def require_extra(module: str, extra: str):
    """Import ``module`` or raise ``MissingExtraError`` naming the extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"{module} is not installed; install it with `pip install 'oculi[{extra}]'`"
        ) from exc


class MemoryPlanError(OculiError, MemoryError):
    """A capture or sweep whose estimated peak memory exceeds what the device has free."""


def brief(value: object, limit: int = 80) -> str:
    """``repr(value)``, cut to about ``limit`` characters: user input in an error message is
    shown this way, so a huge (or self-referencing, or alias-expanded) value cannot make the
    message huge. Containers are cut by :mod:`reprlib` before their repr is built."""
    import reprlib

    r = reprlib.Repr()
    r.maxstring = r.maxother = r.maxlong = limit
    r.maxlist = r.maxtuple = r.maxdict = r.maxset = 6
    r.maxlevel = 3
    text = r.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
