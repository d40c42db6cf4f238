"""Turning what users pass (strings, token ids, ``BatchEncoding``) into one checked batch.

Every capture, patching and generation call goes through :func:`prepare_batch`. It tokenises
strings (padding a list), checks token ids against the vocabulary and the model's context,
and derives ``position_ids`` from the attention mask so that left padding never shifts the
positions (and hence the rotary phases) of real tokens.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeGuard

import torch

from oculi.errors import InputError

Inputs = str | Sequence[str] | torch.Tensor | Sequence[Sequence[int]] | Mapping[str, Any]


@dataclass
class Batch:
    """Token ids with their mask and positions, all ``[B, T]`` on the model's device.

    Attributes:
        input_ids: token ids.
        attention_mask: 1 for real tokens, 0 for padding.
        position_ids: position of each token among the real tokens of its row.
        single: one sequence (``B == 1``), so outputs drop the batch dimension.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    single: bool

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)  # type: ignore[return-value]

    @property
    def padded(self) -> bool:
        return bool((self.attention_mask == 0).any())

    def model_kwargs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for the Hugging Face forward."""
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "position_ids": self.position_ids,
        }


# While generate runs on a batch it re-padded on the left (models/generation.py): per row, the
# column of each prompt token in that batch minus its column in the batch as given ``[B]``.
# Interventions read it (intervention/state.py) so that positions the user counted in the
# batch as given name the same tokens, or are refused where the rows moved differently.
REPADDED_SHIFT: ContextVar[torch.Tensor | None] = ContextVar("oculi_repadded_shift", default=None)


def left_pad_shift(before: Batch, after: Batch) -> torch.Tensor | None:
    """``[B]``: how far :func:`left_pad` moved each row's tokens (``None``: not at all)."""
    if after is before:
        return None
    return after.attention_mask.argmax(dim=1) - before.attention_mask.argmax(dim=1)


def left_pad(batch: Batch, pad_id: int) -> Batch:
    """The same prompts with their padding moved to the left, as generation needs.

    A decoder continues each row after its last column, so a right-padded row would be
    continued after its padding. Each row's real tokens are moved to the end of the row (their
    order kept), columns that no row uses are dropped, and padding gets ``pad_id``::

        ids  [[5, 6, 7], [8, 9, 0]]  mask [[1, 1, 1], [1, 1, 0]]
        ->   [[5, 6, 7], [0, 8, 9]]       [[1, 1, 1], [0, 1, 1]]

    Positions still count real tokens only, so every row sees the positions it has alone.
    A batch that is already left-padded (or not padded) comes back as it is.
    """
    mask = batch.attention_mask
    lengths = mask.sum(dim=1)
    width = int(lengths.max())
    if width == mask.shape[1] and not bool((mask[:, -1] == 0).any()):
        return batch
    start = mask.argmax(dim=1)  # the first real column (real tokens form one block per row)
    cols = torch.arange(width, device=mask.device)
    offset = cols[None, :] - (width - lengths)[:, None]  # index into the row's real tokens
    real = offset >= 0
    source = (start[:, None] + offset).clamp(0, mask.shape[1] - 1)
    ids = torch.where(real, batch.input_ids.gather(1, source), pad_id)
    new_mask = real.long()
    return Batch(
        input_ids=ids,
        attention_mask=new_mask,
        position_ids=(new_mask.cumsum(dim=1) - 1).clamp(min=0),
        single=batch.single,
    )


ACCEPTED = (
    "a string, a list of strings, token ids (a [T] or [B, T] integer tensor or array, or "
    "lists of ints), or a mapping with 'input_ids' such as a tokenizer's BatchEncoding"
)


def prepare_batch(
    inputs: Inputs,
    *,
    tokenizer: Any,
    device: torch.device,
    vocab_size: int,
    max_positions: int | None,
    attention_mask: torch.Tensor | None = None,
) -> Batch:
    """Check and normalise ``inputs`` into a :class:`Batch`.

    Raises:
        InputError: something that is not a prompt (``None``, a generator, bytes, a lone
            surrogate in a string); an empty prompt; token ids that are not integers or whose
            dtype cannot hold the vocabulary; a token id outside the vocabulary; a prompt, or a
            padded batch, wider than the model's context; a padded batch without a mask; a
            mask that is not integer/bool, holds values other than 0 and 1, or has the wrong
            shape.
    """
    _check_prompt_type(inputs)
    mask_given = attention_mask is not None
    mask: Any
    if _is_text(inputs):
        ids, mask = _tokenize(inputs, tokenizer)
        mask_given = True
    elif isinstance(inputs, Mapping):
        if "input_ids" not in inputs:
            raise InputError(f"a mapping input needs 'input_ids'; got keys {sorted(inputs)}")
        ids = _as_ids(inputs["input_ids"])
        mask = inputs.get("attention_mask") if attention_mask is None else attention_mask
        mask_given = mask is not None
    else:
        if isinstance(inputs, Sequence) and len(inputs) == 0:
            raise InputError("no input given: an empty list of prompts")
        ids = _as_ids(inputs)
        mask = attention_mask

    _check_id_dtype(ids, vocab_size)
    if ids.dim() not in (1, 2):
        raise InputError(f"token ids must be [T] or [B, T], got shape {list(ids.shape)}")
    one_row = ids.dim() == 1
    if one_row:
        ids = ids.unsqueeze(0)
    mask = None if mask is None else _as_mask(mask, ids, one_row)
    ids = ids.long()
    if not mask_given:
        _check_unmasked_padding(ids, tokenizer)
        mask = torch.ones_like(ids)
    assert mask is not None
    mask = mask.long()

    lengths = mask.sum(dim=1)
    for row, n in enumerate(lengths.tolist()):
        if n == 0:
            raise InputError(f"prompt {row} is empty after tokenization")
    if ids.shape[1] == 0:
        raise InputError("prompt 0 is empty after tokenization")
    real = ids[mask.bool()]
    if real.numel() and (int(real.max()) >= vocab_size or int(real.min()) < 0):
        bad = int(real.max()) if int(real.max()) >= vocab_size else int(real.min())
        raise InputError(
            f"token id {bad} is outside the vocabulary (valid ids 0..{vocab_size - 1})"
        )
    _check_width(lengths, ids.shape[1], max_positions)
    _check_contiguous(mask)

    # Positions count real tokens only, so a left-padded row sees the same positions as the
    # same prompt alone. Padding gets position 0 (it is masked out anyway).
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
    if not torch.is_inference_mode_enabled():  # ids made under inference_mode, used outside
        ids, mask = _normal(ids), _normal(mask)
    return Batch(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=position_ids.to(device),
        single=ids.shape[0] == 1,
    )


def _normal(x: torch.Tensor) -> torch.Tensor:
    """An inference tensor cannot be saved for autograd (the embedding saves its ids)."""
    return x.clone() if x.is_inference() else x


def _check_prompt_type(inputs: Any) -> None:
    """Refuse what is not a prompt at all before anything tries to read it."""
    if inputs is None:
        raise InputError(f"no input given (None); pass {ACCEPTED}")
    if isinstance(inputs, (bytes, bytearray, memoryview)):
        raise InputError(
            f"got {type(inputs).__name__}, not text: decode it first (data.decode('utf-8')); "
            f"inputs are {ACCEPTED}"
        )
    readable = (str, Sequence, Mapping, torch.Tensor)
    if not isinstance(inputs, readable) and not hasattr(inputs, "__array__"):
        kind = type(inputs).__name__
        hint = " (materialise it with list(...) first)" if isinstance(inputs, Iterator) else ""
        raise InputError(f"got a {kind}{hint}; inputs are {ACCEPTED}")
    texts = [inputs] if isinstance(inputs, str) else None
    if isinstance(inputs, Sequence) and not isinstance(inputs, str):
        texts = [t for t in inputs if isinstance(t, str)]
        if texts and len(texts) != len(inputs):
            raise InputError(f"a list mixing strings and other values; inputs are {ACCEPTED}")
    for i, text in enumerate(texts or []):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InputError(
                f"prompt {i} is not valid Unicode text: it holds the lone surrogate "
                f"{text[exc.start]!r} at character {exc.start}, which no tokenizer can encode "
                "(was it decoded with errors='surrogateescape', or cut inside a UTF-16 pair?)"
            ) from None


def _as_ids(value: Any) -> torch.Tensor:
    """Token ids as a tensor, or an ``InputError`` saying what form they must take."""
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InputError(
            f"could not read the input as token ids ({exc}); rows of different lengths must "
            f"be padded (or passed as strings); inputs are {ACCEPTED}"
        ) from None


def _check_id_dtype(ids: torch.Tensor, vocab_size: int) -> None:
    """Integer ids of a dtype wide enough for the vocabulary (narrower ones may have wrapped)."""
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise InputError(
            f"token ids must be integers (int64 as tokenizers return them), got dtype "
            f"{ids.dtype}; inputs are {ACCEPTED}"
        )
    top = torch.iinfo(ids.dtype).max
    if top < vocab_size - 1:
        raise InputError(
            f"token ids of dtype {ids.dtype} hold values up to {top}, but the vocabulary has "
            f"ids up to {vocab_size - 1}: larger ids were lost when they were stored in this "
            "dtype; pass int64 ids"
        )


def _as_mask(mask: Any, ids: torch.Tensor, one_row: bool) -> torch.Tensor:
    """A ``{0, 1}`` integer or bool mask shaped like ``ids``, else ``InputError``.

    ``one_row``: the ids were given as ``[T]`` (and made ``[1, T]``); a ``[T]`` mask follows.
    """
    form = "an integer or bool tensor of 1 (real token) and 0 (padding), shaped like input_ids"
    try:
        mask = torch.as_tensor(mask)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InputError(f"attention_mask could not be read ({exc}); it must be {form}") from None
    if one_row and mask.dim() == 1:
        mask = mask.unsqueeze(0)
    if tuple(mask.shape) != tuple(ids.shape):
        raise InputError(
            f"attention_mask has shape {list(mask.shape)}, expected {list(ids.shape)} like input_ids"
        )
    if mask.is_floating_point() or mask.is_complex():
        raise InputError(
            f"attention_mask has dtype {mask.dtype}; it must be {form} (a float mask is "
            "ambiguous: additive masks use 0 and -inf); convert a 0/1 float mask with .long()"
        )
    if mask.dtype != torch.bool:
        bad = mask[(mask != 0) & (mask != 1)]
        if bad.numel():
            values = sorted(set(bad.unique().tolist()))
            raise InputError(f"attention_mask holds values {values[:5]}; it must be {form}")
    return mask


def _check_unmasked_padding(ids: torch.Tensor, tokenizer: Any) -> None:
    """A batch without a mask whose rows start or end with the pad token is refused."""
    pad_id = getattr(tokenizer, "pad_token_id", None)
    special = (getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None))
    if ids.shape[0] < 2 or pad_id is None or pad_id in special:
        return
    edges = torch.cat([ids[:, :1], ids[:, -1:]], dim=1)
    if bool((edges == pad_id).any()):
        raise InputError(
            f"padded batch without attention_mask: rows start or end with the pad token "
            f"{pad_id}; pass attention_mask= (or strings, which oculi pads itself)"
        )


def _check_width(lengths: torch.Tensor, width: int, max_positions: int | None) -> None:
    """Real tokens, and the padded width every forward computes over, fit the context."""
    if max_positions is None:
        return
    if int(lengths.max()) > max_positions:
        raise InputError(
            f"{int(lengths.max())} tokens > context {max_positions} "
            "(the model's max_position_embeddings)"
        )
    if width > max_positions:
        raise InputError(
            f"the padded batch is {width} columns wide > context {max_positions} (the model's "
            f"max_position_embeddings), although its longest prompt has {int(lengths.max())} "
            "tokens: attention runs over every column, padding included; trim the padding "
            "columns that no row uses"
        )


def _is_text(inputs: Inputs) -> TypeGuard[str | Sequence[str]]:
    """One string, or a non-empty sequence of strings."""
    return isinstance(inputs, str) or (
        isinstance(inputs, Sequence) and len(inputs) > 0 and all(isinstance(s, str) for s in inputs)
    )


def _tokenize(prompts: str | Sequence[str], tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask ``[B, T]`` of one string or a list of them.

    One string is tokenised as it is: no padding, so no pad token is needed. Several are
    padded on the tokenizer's ``padding_side``. Decoder tokenizers often have no pad token;
    oculi then pads with the EOS token (or id 0 where there is none either): padding is
    masked out and gets position 0, so its id never reaches a real token.

    Raises:
        InputError: no tokenizer; a prompt that is empty, or only special tokens (a BOS),
            after tokenization.
    """
    if tokenizer is None:
        raise InputError("strings need a tokenizer; attach one (oculi.attach(model, tokenizer))")
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    for i, text in enumerate(texts):
        if not text:
            raise InputError(f"prompt {i} is empty after tokenization")
    if len(texts) == 1:
        enc = tokenizer(texts, return_tensors="pt")
        ids, mask = enc["input_ids"], enc.get("attention_mask")
        mask = mask if mask is not None else torch.ones_like(ids)
    elif tokenizer.pad_token_id is None:
        # Any id works as padding since the mask hides it: EOS, as generate() uses.
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        encoded = [tokenizer(t)["input_ids"] for t in texts]
        width = max(len(e) for e in encoded)
        left = getattr(tokenizer, "padding_side", "right") == "left"
        ids = torch.full((len(texts), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(texts), width), dtype=torch.long)
        for row, e in enumerate(encoded):
            span = slice(width - len(e), width) if left else slice(0, len(e))
            ids[row, span] = torch.tensor(e, dtype=torch.long)
            mask[row, span] = 1
    else:
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        ids, mask = enc["input_ids"], enc["attention_mask"]
    _check_content(texts, ids, mask, tokenizer)
    return ids, mask


def _check_content(texts: list[str], ids: torch.Tensor, mask: torch.Tensor, tokenizer: Any) -> None:
    """Every prompt has a token that is not special ("   " -> only a BOS is empty).

    The unknown token counts as content: it stands for text the vocabulary lacks.
    """
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    special.discard(getattr(tokenizer, "unk_token_id", None))
    special_ids = torch.tensor(sorted(special), dtype=torch.long)
    if special_ids.numel() == 0:
        return  # rows with no tokens at all are found by prepare_batch
    content = mask.bool() & ~torch.isin(ids, special_ids)
    for row in (~content.any(dim=1)).nonzero()[:, 0].tolist():
        pieces = tokenizer.convert_ids_to_tokens(ids[row][mask[row].bool()].tolist())
        got = f"only the special tokens {pieces}" if pieces else "no tokens"
        raise InputError(
            f"prompt {row} is empty after tokenization: {texts[row]!r} gives {got}; a prompt "
            "needs at least one token of content"
        )


def _check_contiguous(mask: torch.Tensor) -> None:
    """Real tokens must form one block per row (left or right padding, not holes)."""
    diffs = (mask[:, 1:] != mask[:, :-1]).sum(dim=1)
    for row, n in enumerate(diffs.tolist()):
        if n > 2 or (n == 2 and bool(mask[row, 0])):
            raise InputError(
                f"attention_mask row {row} has padding between real tokens; only left or "
                "right padding is supported"
            )
