"""Where a forward pass is: absolute positions, the prompt it belongs to, and generation steps.

Interventions name positions of the *prompt* and steps of a *generation*; a forward pass only
sees its own new tokens. With the KV cache each generation step feeds one new token (``T = 1``)
while keys and values span past and new tokens; without the cache every step feeds the whole
sequence again. :class:`Tracker` hooks the decoder and turns both into absolute columns, so an
intervention acts on the same columns either way and steered generation with the cache equals
steered generation without it.

Vocabulary:

- **column**: index along the full sequence (prompt then generated tokens), padding included,
  as in the ``[B, T]`` token ids a capture returns.
- **session**: one prompt and the generation that continues it. A forward with an empty or no
  cache starts a session, except a step of ``generate`` without the cache, which re-feeds the
  growing sequence: a forward called the way ``generate`` calls the model (with
  ``logits_to_keep``) whose ids are the previous forward's plus one token continues the
  session. Plain forwards (``adapter.forward``, ``model(ids)``, captures) always start one, so
  their positions refer to their own input. ``prompt_len`` is the prompt's column count.
- **step**: step 0 is the prompt pass (columns ``0 .. prompt_len-1``); step ``k ≥ 1`` is the
  forward that feeds the token generated ``k``-th, at column ``prompt_len + k - 1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from oculi.capture.hooks import hidden_arg
from oculi.capture.inputs import REPADDED_SHIFT

# What users may pass as a position: an index, several, a slice, or None for every column.
Position = int | Sequence[int] | slice | None


@dataclass
class Session:
    """One prompt and the generation that continues it.

    Attributes:
        prompt_len: columns of the prompt pass.
        batch: rows.
        mask: the prompt pass's ``[B, prompt_len]`` attention mask (``None``: no padding).
        ids: the prompt's token ids, to recognise generation without the cache.
        store: per-intervention data resolved for this session (positions, means).
    """

    prompt_len: int
    batch: int
    mask: torch.Tensor | None
    ids: torch.Tensor | None
    store: dict[Any, Any] = field(default_factory=dict)
    last_len: int = 0  # columns fed so far (to recognise the next uncached generation step)
    # [B]: generate re-padded the batch as given on the left, moving row r's tokens by
    # shift[r] columns (oculi.capture.inputs.REPADDED_SHIFT); None: the batch as given
    shift: torch.Tensor | None = None


@dataclass
class Frame:
    """One forward pass: its new tokens are columns ``offset .. offset + length - 1``."""

    offset: int
    length: int
    session: Session


def _cache_length(cache: Any) -> int:
    if cache is None or not hasattr(cache, "get_seq_length"):
        return 0
    return int(cache.get_seq_length())


class Tracker:
    """Follows the decoder's forward calls and keeps the current :class:`Frame`.

    ``on_session(session)`` runs when a prompt pass starts a session, before any layer runs:
    interventions resolve and validate their positions there, so a bad position raises
    before the forward computes anything.
    """

    def __init__(self, on_session) -> None:
        self.on_session = on_session
        self.frame: Frame | None = None
        self.session: Session | None = None
        self._generate_call = False
        self._last_generate = False  # the previous forward was a generate step

    def model_pre_hook(self, _module: Any, _args: tuple, kwargs: dict) -> None:
        """On the ``*ForCausalLM`` module: note whether ``generate`` is calling."""
        self._generate_call = "logits_to_keep" in kwargs

    def pre_hook(self, _module: Any, args: tuple, kwargs: dict) -> None:
        """On the decoder: place this forward's tokens, starting a session for a new prompt."""
        generating, self._generate_call = self._generate_call, False
        after_generate, self._last_generate = self._last_generate, generating
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        tokens = ids if ids is not None else embeds
        if tokens is None:
            tokens = hidden_arg(args, kwargs)
        batch, length = int(tokens.shape[0]), int(tokens.shape[1])
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = _cache_length(cache)
        mask = kwargs.get("attention_mask")
        mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        session = self.session
        if past > 0 and session is not None and (session.batch, session.last_len) == (batch, past):
            self.frame = Frame(offset=past, length=length, session=session)
            session.last_len = past + length
            return
        if past == 0 and generating and after_generate and self._continues(ids, batch, length):
            assert session is not None  # _continues is False without a session
            self.frame = Frame(offset=0, length=length, session=session)
            session.last_len = length
            return
        # A new prompt. A cache filled outside this context counts as part of the prompt.
        prompt_mask = None
        if mask is not None and bool((mask == 0).any()):
            prompt_mask = mask[:, : past + length]
        shift = REPADDED_SHIFT.get()
        session = Session(
            prompt_len=past + length,
            batch=batch,
            mask=prompt_mask,
            ids=ids.detach().clone() if ids is not None and past == 0 else None,
            last_len=past + length,
            shift=shift if shift is not None and shift.shape[0] == batch else None,
        )
        self.session = session
        self.frame = Frame(offset=past, length=length, session=session)
        self.on_session(session)

    def _continues(self, ids: torch.Tensor | None, batch: int, length: int) -> bool:
        """A step of generation without the cache: the previous ids plus one token."""
        s = self.session
        if s is None or ids is None or s.ids is None or s.batch != batch:
            return False
        n = s.prompt_len
        return length == s.last_len + 1 and bool(torch.equal(ids[:, :n], s.ids.to(ids.device)))

    def current(self) -> Frame:
        if self.frame is None:
            raise RuntimeError(
                "an intervention hook ran outside a decoder forward; call the model (or the "
                "adapter's decoder) rather than its layers directly"
            )
        return self.frame


# -- steps --------------------------------------------------------------------------------
Steps = str | range | Sequence[int]


def check_steps(steps: Any) -> frozenset[int] | None:
    """``"all"`` -> ``None``; a range or list of step indices -> that set.

    Raises:
        ValueError: anything else, an empty selection or a negative step. An int is refused
            because it is ambiguous: ``range(3)`` means the first three steps, ``[3]`` step 3.
    """
    hint = (
        "steps must be 'all', a range or a list of generation step indices (0 = the prompt "
        "pass, k = the forward that feeds the k-th generated token)"
    )
    if isinstance(steps, str):
        if steps == "all":
            return None
        raise ValueError(f"{hint}; got the string {steps!r}")
    if isinstance(steps, bool) or steps is None:
        raise ValueError(f"{hint}; got {steps!r}")
    if isinstance(steps, int):
        raise ValueError(
            f"{hint}; got the int {steps}, which is ambiguous: write range({steps}) for the "
            f"first {steps} steps or [{steps}] for step {steps} alone"
        )
    if not isinstance(steps, (range, list, tuple)):
        raise ValueError(f"{hint}; got {type(steps).__name__} {steps!r}")
    out = list(steps)
    if not out:
        raise ValueError(f"{hint}; got an empty selection {steps!r}, which would never apply")
    for s in out:
        if isinstance(s, bool) or not isinstance(s, int):
            raise ValueError(f"{hint}; got the element {s!r}")
        if s < 0:
            raise ValueError(f"{hint}; got step {s}, but steps count from 0 (the prompt pass)")
    return frozenset(out)


# -- positions ----------------------------------------------------------------------------
def check_position(position: Any, what: str) -> Position:
    """Type check only; ranges are checked against the prompt by :func:`resolve_positions`."""
    if position is None or isinstance(position, slice):
        return position
    if (
        isinstance(position, torch.Tensor)
        and position.dim() <= 1
        and not position.is_floating_point()
    ):
        position = position.tolist()
    if isinstance(position, bool):
        raise ValueError(
            f"{what}: position must be an int, a list, a slice or None, got {position!r}"
        )
    if isinstance(position, int):
        return position
    if isinstance(position, (list, tuple, range)):
        out = list(position)
        if not out:
            raise ValueError(f"{what}: an empty position list selects nothing")
        for p in out:
            if isinstance(p, bool) or not isinstance(p, int):
                raise ValueError(f"{what}: positions must be ints, got {p!r}")
        return out
    raise ValueError(f"{what}: position must be an int, a list, a slice or None, got {position!r}")


def resolve_positions(
    position: Position, session: Session, rows: Sequence[int], what: str
) -> list[int] | None:
    """Prompt columns of ``position`` (negatives count from the prompt's end); ``None``: all.

    Ints and lists must name real tokens of every patched row. A slice is a range of columns
    and may cover padding (harmless: padding never reaches real tokens).

    Raises:
        IndexError: a position outside the prompt.
        ValueError: a position that is padding in one of ``rows``; a slice selecting nothing.
    """
    n = session.prompt_len
    if position is None:
        return None
    if isinstance(position, slice):
        cols = list(range(n))[position]
        if not cols:
            raise ValueError(f"{what}: position {position} selects no column of a {n}-token prompt")
    else:
        ps = [position] if isinstance(position, int) else list(position)
        counted = [p for p in ps if p >= 0]
        moved = uniform_shift(session, rows, what, f"position {position!r}") if counted else 0
        cols = []
        for p in ps:
            if not -n <= p < n:
                raise IndexError(
                    f"{what}: position {p} out of range for a sequence of {n} tokens "
                    f"(valid positions 0..{n - 1}, or -{n}..-1 from the end)"
                )
            if p >= 0 and moved:
                c = p + moved  # the same token in the batch generate re-padded
                if c < 0:
                    raise ValueError(f"{what}: position {p} is padding in every row")
                if c >= n:
                    raise IndexError(
                        f"{what}: position {p} out of range (columns 0..{n - 1 - moved})"
                    )
                p = c
            cols.append(p % n)
        if len(set(cols)) != len(cols):
            raise ValueError(f"{what}: positions {position} name the same column twice")
    if session.mask is not None and not isinstance(position, slice):
        for c in cols:
            for r in rows:
                if int(session.mask[r, c]) == 0:
                    raise ValueError(
                        f"{what}: position {c} is padding in row {r} (its attention_mask is 0); "
                        "patch a real token, or pad on the other side"
                    )
    return cols


def uniform_shift(session: Session, rows: Sequence[int], what: str, thing: str) -> int:
    """How far generate's left re-padding moved the tokens of ``rows`` (0 if it did not).

    Columns counted in the batch as given (non-negative positions, a per-position value)
    name the same tokens after the move only if every row moved by the same amount.

    Raises:
        ValueError: the rows moved by different amounts, naming what to do instead.
    """
    if session.shift is None:
        return 0
    shifts = sorted({int(session.shift[r]) for r in (rows or range(session.batch))})
    if len(shifts) > 1:
        raise ValueError(
            f"{what}: {thing} counts columns of the batch as given, but generate re-pads it on "
            f"the left (so each row ends at the last column), which moves the rows' tokens by "
            f"different numbers of columns ({shifts}): a column no longer names the same token "
            "in every row. Count positions from each prompt's end (-1 is its last token), pad "
            "the batch on the left yourself, or generate one prompt at a time"
        )
    return shifts[0]


def resolve_rows(rows: Sequence[int] | None, batch: int, what: str) -> list[int]:
    if rows is None:
        return list(range(batch))
    out = []
    for r in rows:
        if not -batch <= r < batch:
            raise IndexError(
                f"{what}: row {r} out of range for a batch of {batch} (0..{batch - 1})"
            )
        out.append(r % batch)
    if len(set(out)) != len(out):
        raise ValueError(f"{what}: rows {list(rows)} name the same row twice")
    return out
