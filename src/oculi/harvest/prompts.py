"""Prompts in, token ids out: reading the prompt source and tokenising it once, up front.

::

    texts = read_prompts("prompts.jsonl")                 # one JSON string or object a line
    texts = read_prompts(dataset["text"])                 # any iterable of strings
    tokens = tokenize(adapter, texts, max_length=128)     # flat ids + offsets

The harvest plan needs every prompt's token count before the first forward pass: the row of
each token in the store is its place in the concatenation of all prompts, so work units can
write their rows independently (see :mod:`oculi.harvest`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from oculi.errors import InputError

_TOKENIZE_BLOCK = 4096  # prompts per tokenizer call: bounded memory on millions of prompts


@dataclass(frozen=True)
class Tokens:
    """All prompts' token ids, concatenated.

    Attributes:
        ids: ``[n_tokens]`` int32, prompt after prompt (row ``i`` of the store is token ``i``).
        offsets: ``[n_prompts + 1]`` int64; prompt ``p`` is ``ids[offsets[p]:offsets[p + 1]]``.
    """

    ids: np.ndarray
    offsets: np.ndarray

    @property
    def n_prompts(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def prompt(self, p: int) -> np.ndarray:
        return self.ids[self.offsets[p] : self.offsets[p + 1]]

    def fingerprint(self) -> str:
        """sha256 of the ids and offsets: a resumed harvest must see the same tokens."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.offsets, dtype="<i8").tobytes())
        h.update(np.ascontiguousarray(self.ids, dtype="<i4").tobytes())
        return h.hexdigest()


def read_prompts(prompts: Any, *, text_field: str = "text") -> list[str]:
    """The prompts as a list of strings.

    Args:
        prompts: a list of strings; a path (``str`` or ``PathLike``) to a JSONL file whose
            lines are JSON strings or objects with ``text_field``; or any iterable of strings
            or mappings (a ``datasets.Dataset`` column such as ``ds["text"]``, or the dataset
            itself, whose rows are mappings).
        text_field: the key holding the text in JSONL objects and mapping rows.

    Raises:
        InputError: no prompts, a missing file, a malformed JSONL line, or an item that is
            not a string (each error names the prompt or line).
    """
    if isinstance(prompts, str) and not os.path.exists(prompts) and "\n" not in prompts:
        if prompts.endswith((".jsonl", ".json")):
            raise InputError(f"prompt file {prompts!r} does not exist")
        raise InputError(
            "prompts must be a list of strings, a JSONL file or a dataset column; got one string "
            f"{prompts[:40]!r} (wrap a single prompt in a list)"
        )
    if isinstance(prompts, (str, os.PathLike)):
        return _read_jsonl(Path(prompts), text_field)
    if not isinstance(prompts, Iterable):
        raise InputError(
            f"prompts must be a list of strings, a JSONL file or a dataset column, got "
            f"{type(prompts).__name__}"
        )
    out = [_text(item, text_field, f"prompt {i}") for i, item in enumerate(prompts)]
    if not out:
        raise InputError("no prompts given: the list is empty")
    return out


def _text(item: Any, field: str, where: str) -> str:
    if isinstance(item, Mapping):
        if field not in item:
            raise InputError(f"{where} has no field {field!r} (fields: {sorted(item)})")
        item = item[field]
    if not isinstance(item, str):
        raise InputError(f"{where} must be a string, got {type(item).__name__}")
    return item


def _read_jsonl(path: Path, field: str) -> list[str]:
    if not path.is_file():
        raise InputError(f"prompt file {str(path)!r} does not exist")
    out = []
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(
                    f"{path}:{n} is not UTF-8 text (byte {raw[exc.start]:#04x} at column "
                    f"{exc.start + 1}); save the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{n} is not valid JSON ({exc.msg})") from None
            out.append(_text(item, field, f"{path}:{n}"))
    if not out:
        raise InputError(f"prompt file {str(path)!r} holds no prompts")
    return out


def tokenize(
    tokenizer: Any, texts: Sequence[str], *, max_length: int | None, max_positions: int | None
) -> Tokens:
    """Tokenise every prompt (special tokens as the capture calls add them), no padding.

    Args:
        tokenizer: the model's tokenizer.
        texts: the prompts.
        max_length: keep at most this many tokens of each prompt (its start).
        max_positions: the model's context; a longer prompt is an error unless truncated.

    Raises:
        InputError: an empty prompt, or one longer than the context without ``max_length``.
    """
    if tokenizer is None:
        raise InputError("harvesting strings needs a tokenizer; attach one to the adapter")
    if max_length is not None and (isinstance(max_length, bool) or max_length < 1):
        raise InputError(f"max_length must be a positive int or None, got {max_length!r}")
    pieces: list[np.ndarray] = []
    lengths = np.empty(len(texts), dtype=np.int64)
    for start in range(0, len(texts), _TOKENIZE_BLOCK):
        block = list(texts[start : start + _TOKENIZE_BLOCK])
        for i, ids in enumerate(tokenizer(block)["input_ids"], start=start):
            if max_length is not None:
                ids = ids[:max_length]
            if not ids or not texts[i]:
                raise InputError(f"prompt {i} is empty after tokenization: {texts[i]!r}")
            if max_positions is not None and len(ids) > max_positions:
                raise InputError(
                    f"prompt {i} has {len(ids)} tokens > context {max_positions}; pass "
                    f"max_length= (at most {max_positions}) to keep the start of long prompts"
                )
            lengths[i] = len(ids)
            pieces.append(np.asarray(ids, dtype=np.int32))
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return Tokens(ids=np.concatenate(pieces), offsets=offsets)


def assign_splits(n_prompts: int, split: float | Sequence[str], seed: int) -> np.ndarray:
    """Per-prompt split labels: a held-out fraction marked ``"test"``, or the user's labels.

    A fraction holds out ``round(fraction * n_prompts)`` prompts chosen by ``seed``, so a
    prompt's tokens are never split between train and test.
    """
    if isinstance(split, (float, int)) and not isinstance(split, bool):
        if not 0.0 <= float(split) < 1.0:
            raise InputError(
                f"split must be a fraction in [0, 1) or per-prompt labels, got {split}"
            )
        labels = np.full(n_prompts, "train", dtype=object)
        n_test = round(float(split) * n_prompts)
        test = np.random.default_rng(seed).permutation(n_prompts)[:n_test]
        labels[test] = "test"
        return labels
    labels = np.asarray(list(cast(Sequence[str], split)), dtype=object)
    if len(labels) != n_prompts:
        raise InputError(f"split has {len(labels)} labels for {n_prompts} prompts (one per prompt)")
    for i, s in enumerate(labels):
        if not isinstance(s, str):
            raise InputError(f"split label {i} must be a string, got {type(s).__name__}")
    return labels
