"""Tiny, seeded, randomly initialised Hugging Face models, one per supported family variant.

Shared by the test files (``from models import tiny_model, tiny_tokenizer, FAMILIES``). Every
model is built from its transformers config, in fp32, with no network access, and is small
enough (vocab 96, d_model 64, 3 layers, 4 heads) that a forward pass takes milliseconds.

Weights are the family's own initialisation with a larger ``initializer_range`` (so attention
patterns are far from uniform), plus noise on every 1-D parameter (norm weights and biases,
which transformers initialises to constants) so that a wrong norm offset or a forgotten bias
shows up as a numerical mismatch instead of cancelling out.

``tiny_model(family)`` is cached: tests share one instance per family and must leave it as
they found it (attention implementation included).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch

VOCAB = 96
D_MODEL = 64
N_LAYERS = 3
N_HEADS = 4
D_HEAD = 16
D_MLP = 128
SEED = 0
PAD_ID = 0
# A prompt longer than every sliding window below, so windows actually cut.
PROMPT_LEN = 11
SLIDING_WINDOW = 4

# family variant -> what it exercises
FAMILIES: dict[str, str] = {
    "llama_mha": "LLaMA, multi-head attention, biases on every projection",
    "llama_gqa": "LLaMA, grouped-query attention (2 KV heads)",
    "mistral": "Mistral, sliding window smaller than the prompt",
    "qwen2": "Qwen 2, q/k/v biases, sliding window on later layers",
    "qwen3": "Qwen 3, per-head q/k RMSNorm",
    "gemma": "Gemma, scaled embedding, 1 + w norms, gated GELU",
    "gemma2": "Gemma 2, attention and final soft-capping, sliding window, sandwich norms",
    "gemma3": "Gemma 3 text, mixed sliding/full layers, 1 KV head, q/k norms",
    "gpt2": "GPT-2, fused Conv1D qkv, learned positions",
    "neox_parallel": "GPT-NeoX, parallel residual, partial rotary",
    "neox_sequential": "GPT-NeoX, sequential residual, partial rotary",
    "phi3": "Phi-3, fused qkv and gate_up, partial rotary",
    "olmo2": "OLMo 2, post-norms, flat q/k norms",
}

# families whose modules rotate q and k
ROTARY = frozenset(FAMILIES) - {"gpt2"}


def _config(family: str) -> Any:
    import transformers as tf

    common: dict[str, Any] = dict(
        vocab_size=VOCAB,
        hidden_size=D_MODEL,
        intermediate_size=D_MLP,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS,
        max_position_embeddings=64,
        initializer_range=0.15,
        pad_token_id=PAD_ID,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    if family == "llama_mha":
        return tf.LlamaConfig(**common, num_key_value_heads=4, attention_bias=True, mlp_bias=True)
    if family == "llama_gqa":
        return tf.LlamaConfig(**common, num_key_value_heads=2)
    if family == "mistral":
        return tf.MistralConfig(**common, num_key_value_heads=2, sliding_window=SLIDING_WINDOW)
    if family == "qwen2":
        return tf.Qwen2Config(
            **common,
            num_key_value_heads=2,
            use_sliding_window=True,
            sliding_window=SLIDING_WINDOW,
            max_window_layers=1,  # layer 0 full, layers 1-2 sliding
        )
    if family == "qwen3":
        return tf.Qwen3Config(**common, num_key_value_heads=2, head_dim=D_HEAD)
    if family == "gemma":
        return tf.GemmaConfig(
            **{**common, "tie_word_embeddings": True}, num_key_value_heads=2, head_dim=D_HEAD
        )
    if family == "gemma2":
        return tf.Gemma2Config(
            **{**common, "tie_word_embeddings": True},
            num_key_value_heads=2,
            head_dim=D_HEAD,
            query_pre_attn_scalar=D_HEAD,
            sliding_window=SLIDING_WINDOW,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
        )
    if family == "gemma3":
        return tf.Gemma3TextConfig(
            **{**common, "tie_word_embeddings": True},
            num_key_value_heads=1,
            head_dim=D_HEAD,
            query_pre_attn_scalar=D_HEAD,
            sliding_window=SLIDING_WINDOW,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        )
    if family == "gpt2":
        return tf.GPT2Config(
            vocab_size=VOCAB,
            n_embd=D_MODEL,
            n_layer=N_LAYERS,
            n_head=N_HEADS,
            n_inner=D_MLP,
            n_positions=64,
            initializer_range=0.15,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    if family in ("neox_parallel", "neox_sequential"):
        return tf.GPTNeoXConfig(
            **common,
            use_parallel_residual=family == "neox_parallel",
            rotary_pct=0.5,
        )
    if family == "phi3":
        return tf.Phi3Config(**common, num_key_value_heads=2, partial_rotary_factor=0.5)
    if family == "olmo2":
        return tf.Olmo2Config(**common, num_key_value_heads=2)
    raise KeyError(f"unknown tiny family {family!r}; known: {', '.join(FAMILIES)}")


@functools.cache
def tiny_model(family: str) -> torch.nn.Module:
    """The tiny ``*ForCausalLM`` for ``family`` (a key of :data:`FAMILIES`), eval mode, fp32.

    Built once per process and shared. Its attention implementation is transformers' default:
    ``sdpa``, except Gemma 2, whose soft-capping sdpa cannot do (``eager``).
    """
    from transformers import AutoModelForCausalLM

    config = _config(family)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.dim() == 1:  # norm weights, biases: make them non-trivial
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def prompt_ids(length: int = PROMPT_LEN, seed: int = 3) -> torch.Tensor:
    """Seeded token ids ``[length]`` avoiding the special ids 0-2."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (length,), generator=gen)


def last_inputs(model: torch.nn.Module, ids: torch.Tensor, modules: dict[str, Any]) -> dict:
    """The first input of each module at the last position of one plain forward of ``ids``
    ``[1, T]``, float64, read by forward hooks that are removed whatever happens."""
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Any:
        return lambda _m, args, _out: seen.__setitem__(name, args[0][0, -1].double())

    hooks = [module.register_forward_hook(keep(name)) for name, module in modules.items()]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


WORDS = [
    "the",
    "a",
    "an",
    "of",
    "to",
    "in",
    "on",
    "at",
    "is",
    "was",
    "and",
    "or",
    "but",
    "it",
    "he",
    "she",
    "they",
    "we",
    "you",
    "i",
    "this",
    "that",
    "cat",
    "dog",
    "house",
    "city",
    "paris",
    "france",
    "tower",
    "eiffel",
    "capital",
    "red",
    "blue",
    "green",
    "big",
    "small",
    "one",
    "two",
    "three",
    "four",
    "five",
    "runs",
    "ran",
    "sat",
    "sits",
    "sees",
    "saw",
    "went",
    "goes",
    "mary",
    "john",
    "gave",
    "book",
    "ball",
    "tree",
    "river",
    "sky",
    "sun",
    "moon",
    "day",
    "night",
    "good",
    "bad",
    "old",
    "new",
    "first",
    "last",
    "man",
    "woman",
    "child",
    "king",
    "queen",
]


@functools.cache
def tiny_tokenizer() -> Any:
    """A word-level ``PreTrainedTokenizerFast`` built in memory (no files, no network).

    Ids: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3, then lowercase words; at most
    :data:`VOCAB` tokens, so it fits every tiny model. Each encoding starts with ``<bos>``;
    padding is on the left.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + list(dict.fromkeys(WORDS)))}
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
    )


def seed_folder() -> Path:
    """$OCULI_SEEDS, else shared/seeds beside the repository (as CI lays it out), else
    /work/shared/seeds (a git worktree elsewhere)."""
    here = Path(__file__).resolve().parents[1].parent / "shared" / "seeds"
    env = os.environ.get("OCULI_SEEDS")
    return Path(env) if env else (here if here.is_dir() else Path("/work/shared/seeds"))


def oculi_hooks(model: torch.nn.Module) -> list:
    """oculi's hook functions left on ``model`` (and torch's global hooks), told apart from
    transformers' own output-capturing hooks by the function's module (DESIGN.md §3)."""
    found = []
    for module in model.modules():
        for hooks in (
            module._forward_hooks,
            module._forward_pre_hooks,
            module._backward_hooks,
            module._backward_pre_hooks,
        ):
            found += list(hooks.values())
    found += list(torch.nn.modules.module._global_forward_hooks.values())
    found += list(torch.nn.modules.module._global_forward_pre_hooks.values())
    return [f for f in found if getattr(f, "__module__", "").startswith("oculi")]
