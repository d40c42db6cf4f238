"""Tokens the TransformerLens way: ``to_tokens``, ``to_str_tokens``, ``to_string``, ``cfg``.

::

    tokens = adapter.to_tokens("When Mary and John")      # [1, pos], BOS first
    adapter.to_str_tokens(tokens)                          # ['<bos>', 'When', ' Mary', ...]
    adapter.to_string(tokens[0, 1:])                       # 'When Mary and John'
    adapter.cfg.n_layers, adapter.cfg.n_heads              # the sizes TransformerLens code reads

``prepend_bos=None`` (the default here) tokenises as every oculi capture does: with the BOS
token exactly when the tokenizer adds one (Gemma, Llama: yes; GPT-2: no), so positions agree
with ``adapter.capture(text)``. ``True`` always puts the tokenizer's BOS first (what
TransformerLens does by default, also for GPT-2, whose BOS is ``<|endoftext|>``); ``False``
never does. String tokens are decoded one token at a time (``' Mary'``, with its space), as
TransformerLens shows them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from oculi.errors import InputError

if TYPE_CHECKING:
    from oculi.models.adapter import Adapter


def _tokenizer(adapter: Adapter, what: str) -> Any:
    if adapter.tokenizer is None:
        raise InputError(f"{what} needs a tokenizer; attach one (oculi.attach(model, tokenizer))")
    return adapter.tokenizer


def _encode(tok: Any, text: str, prepend_bos: bool | None) -> list[int]:
    if prepend_bos is None:
        return list(tok(text)["input_ids"])
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    if not prepend_bos:
        return ids
    if tok.bos_token_id is None:
        raise InputError(
            "prepend_bos=True, but this tokenizer has no BOS token; pass prepend_bos=False"
        )
    return [int(tok.bos_token_id), *ids]


def to_tokens(
    adapter: Adapter,
    input: str | list[str],
    prepend_bos: bool | None = None,
    padding_side: str | None = None,
    move_to_device: bool = True,
    *,
    return_mask: bool = False,
) -> Any:
    """Token ids ``[batch, pos]`` of one string or a list (padded, right by default).

    Args:
        adapter: the model.
        input: a string or a list of strings.
        prepend_bos: see the module docstring.
        padding_side: ``"right"`` (default) or ``"left"`` for lists of unequal length.
        move_to_device: put the ids on the model's device (else the CPU).
        return_mask: also return the ``[batch, pos]`` attention mask (1 for real tokens).

    Raises:
        InputError: no tokenizer, an empty or non-string input, a bad ``padding_side``.
    """
    tok = _tokenizer(adapter, "to_tokens")
    texts = [input] if isinstance(input, str) else input
    if (
        not isinstance(texts, (list, tuple))
        or not texts
        or not all(isinstance(t, str) for t in texts)
    ):
        raise InputError(f"to_tokens takes a string or a list of strings, got {input!r}")
    if padding_side not in (None, "right", "left"):
        raise InputError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    rows = [_encode(tok, t, prepend_bos) for t in texts]
    if not all(rows):
        raise InputError("to_tokens: an empty string with no BOS token gives no tokens")
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    ids = torch.full((len(rows), width), int(pad), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if padding_side == "left" else slice(0, len(r))
        ids[i, span] = torch.tensor(r)
        mask[i, span] = 1
    if move_to_device:
        ids, mask = ids.to(adapter.device), mask.to(adapter.device)
    return (ids, mask) if return_mask else ids


def _as_ids(tokens: Any) -> torch.Tensor:
    if isinstance(tokens, int):
        return torch.tensor([tokens])
    t = torch.as_tensor(tokens)
    if t.is_floating_point() or t.dim() > 2:
        raise InputError(f"token ids must be integers [pos] or [batch, pos], got {tokens!r}")
    return t.reshape(1) if t.dim() == 0 else t


def to_str_tokens(
    adapter: Adapter, input: Any, prepend_bos: bool | None = None
) -> list[str] | list[list[str]]:
    """Each token as its own decoded string (``' Mary'``).

    A string, ``[pos]`` ids or one-row ``[1, pos]`` ids give a list; a list of strings or
    ``[batch, pos]`` ids a list per row. Strings are tokenised as :func:`to_tokens` does
    (padding is not shown).
    """
    tok = _tokenizer(adapter, "to_str_tokens")
    if isinstance(input, str):
        rows = [_encode(tok, input, prepend_bos)]
        single = True
    elif isinstance(input, (list, tuple)) and input and all(isinstance(t, str) for t in input):
        rows = [_encode(tok, t, prepend_bos) for t in input]
        single = False
    else:
        if hasattr(input, "input_ids"):  # a BatchEncoding or oculi Batch
            input = input["input_ids"] if isinstance(input, dict) else input.input_ids
        ids = _as_ids(input)
        single = ids.dim() == 1 or ids.shape[0] == 1
        rows = [r.tolist() for r in ids.reshape(-1, ids.shape[-1])]
    decoded = [tok.batch_decode([[i] for i in r], clean_up_tokenization_spaces=False) for r in rows]
    return decoded[0] if single else decoded


def to_string(adapter: Adapter, tokens: Any) -> str | list[str]:
    """Decode ``[pos]`` ids to one string, ``[batch, pos]`` to one per row (special tokens
    kept, as TransformerLens does)."""
    tok = _tokenizer(adapter, "to_string")
    ids = _as_ids(tokens)
    if ids.dim() == 1:
        return tok.decode(ids.tolist(), clean_up_tokenization_spaces=False)
    return [tok.decode(r.tolist(), clean_up_tokenization_spaces=False) for r in ids]


@dataclass(frozen=True)
class TLConfig:
    """The model sizes under TransformerLens's ``cfg`` names (read-only).

    ::

        adapter.cfg.n_layers, adapter.cfg.d_head     # (18, 256) on Gemma 3 270M
    """

    model_name: str
    original_architecture: str
    n_layers: int
    n_heads: int
    n_key_value_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int | None
    normalization_type: str
    positional_embedding_type: str
    gated_mlp: bool
    parallel_attn_mlp: bool
    output_logits_soft_cap: float | None
    device: torch.device
    dtype: torch.dtype
    default_prepend_bos: bool


def tl_config(adapter: Adapter) -> TLConfig:
    """``adapter.cfg``: the sizes and architecture facts TransformerLens code reads."""
    anat = adapter.anatomy
    model_cfg = adapter.model.config
    final = adapter.module(anat.final_norm)
    tok = adapter.tokenizer
    adds_bos = False
    if tok is not None and tok.bos_token_id is not None:
        adds_bos = tok("a")["input_ids"][:1] == [tok.bos_token_id]
    return TLConfig(
        model_name=str(getattr(model_cfg, "_name_or_path", "") or type(adapter.model).__name__),
        original_architecture=type(adapter.model).__name__,
        n_layers=adapter.n_layers,
        n_heads=adapter.n_heads,
        n_key_value_heads=adapter.n_kv_heads,
        d_model=adapter.d_model,
        d_head=adapter.d_head,
        d_mlp=adapter.d_mlp,
        d_vocab=adapter.d_vocab,
        n_ctx=adapter.max_positions,
        normalization_type="LN" if isinstance(final, nn.LayerNorm) else "RMS",
        positional_embedding_type="rotary" if anat.rotary else "standard",
        gated_mlp=anat.gated,
        parallel_attn_mlp=anat.is_parallel(model_cfg),
        output_logits_soft_cap=adapter.unembedding()[2],
        device=adapter.device,
        dtype=adapter.dtype,
        default_prepend_bos=adds_bos,
    )
