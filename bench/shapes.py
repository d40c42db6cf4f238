"""Models for the benchmarks without downloads: random weights of real shapes, on any device.

``--shape`` picks one of :data:`SHAPES`; :func:`random_model` builds it directly on the device
(``AutoModelForCausalLM.from_config`` under ``torch.device``), and :func:`word_tokenizer` gives
it a tokenizer built in memory from the words of the benchmark's prompts, so a GPU machine with
no network and no cache runs every script. :func:`random_ids` draws token ids for inputs whose
content does not matter (captures, the lens).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

import oculi

_GEMMA3_270M_LAYERS = (["sliding_attention"] * 5 + ["full_attention"]) * 3
# Random-weight shapes (``--shape``). gemma-270m: the numbers of Gemma 3 270M's config.json (the
# converted cache's), embedded so a machine without the cache can build it. llama-8b: the
# Llama-3-8B shape. tiny/tiny-llama: the same families at toy size, for smoke runs on a CPU.
SHAPES: dict[str, dict[str, Any]] = {
    "gemma-270m": dict(
        model_type="gemma3_text",
        vocab_size=262144,
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=18,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        query_pre_attn_scalar=256,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        sliding_window=512,
        layer_types=_GEMMA3_270M_LAYERS,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        attn_logit_softcapping=None,
        final_logit_softcapping=None,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
    ),
    "llama-8b": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500_000.0},
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
}
# The same families at toy size: what changes from the real shapes.
SHAPES["tiny"] = SHAPES["gemma-270m"] | dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    head_dim=16,
    query_pre_attn_scalar=16,
    max_position_embeddings=2048,
    sliding_window=16,
    layer_types=["sliding_attention"] * 5 + ["full_attention"],
)
SHAPES["tiny-llama"] = SHAPES["llama-8b"] | dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=6,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    bos_token_id=2,
    eos_token_id=1,
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def word_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    """A word-level tokenizer of the words in ``texts``, built in memory (nothing downloaded).

    Ids: ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3, then the words in order of first
    appearance; every encoding starts with ``<bos>``. Random weights give no meaning to any
    id, so this only has to split prompts into tokens the way the scripts expect (one token per
    word, offsets for subjects).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words: dict[str, int] = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    splitter = pre_tokenizers.Whitespace()
    for text in texts:
        for word, _ in splitter.pre_tokenize_str(text):
            words.setdefault(word, len(words))
    if len(words) > vocab_size:
        raise ValueError(f"{len(words)} words do not fit a vocabulary of {vocab_size}")
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = splitter
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
    )


def random_model(shape: str, device: str, dtype: torch.dtype, texts: Iterable[str]) -> Any:
    """An oculi adapter over a random-weight model of ``shape``, built on ``device``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    params = dict(SHAPES[shape])
    cfg = AutoConfig.for_model(params.pop("model_type"), **params)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval()
    return oculi.attach(model, word_tokenizer(texts, cfg.vocab_size))


def random_ids(adapter: Any, batch: int, n_tokens: int, seed: int = 0) -> torch.Tensor:
    """``[batch, n_tokens]`` token ids drawn uniformly (for random weights: any ids will do)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, adapter.vocab_limit, (batch, n_tokens), generator=gen)
    return ids.to(adapter.device)
