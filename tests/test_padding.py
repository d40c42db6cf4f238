"""Padding: a prompt inside a left- or right-padded batch gives the numbers it gives alone.

The batch holds the short prompt padded to the length of a longer one (token ids plus
``attention_mask``); at the short prompt's real positions every captured quantity must equal
the single-prompt capture, and padded keys must get no attention. Sliding-window families
(Mistral, Gemma 2/3) use a long prompt past the window, so windows and padding interact.
"""

from __future__ import annotations

import pytest
import torch

import oculi
from models import FAMILIES, PAD_ID, prompt_ids, tiny_model, tiny_tokenizer
from oculi import CaptureConfig, LogitConfig, MLPConfig, ResidualConfig

TOL = 1e-5
SHORT, LONG = 7, 11

ATTENTION = CaptureConfig(capture_head_outputs=True, capture_head_contributions=True)
RESIDUAL = ResidualConfig(capture_attn_out=True, capture_mlp_out=True)
# no pattern asked: the bridge defers to the model's own implementation (sdpa)
PRE_ROPE = CaptureConfig(qk_stage="pre_rope", capture_patterns=False, capture_head_outputs=True)


def assert_close(actual, expected, what=""):
    torch.testing.assert_close(actual, expected, atol=TOL, rtol=TOL, msg=lambda m: f"{what}: {m}")


def padded_batch(short: torch.Tensor, long: torch.Tensor, side: str):
    """``[2, T]`` ids and mask: ``short`` padded to ``len(long)`` on ``side``, then ``long``."""
    t = len(long)
    ids = torch.full((2, t), PAD_ID, dtype=torch.long)
    mask = torch.zeros((2, t), dtype=torch.long)
    real = slice(t - len(short), t) if side == "left" else slice(0, len(short))
    ids[0, real], mask[0, real] = short, 1
    ids[1], mask[1] = long, 1
    return ids, mask, real


def capture_all(adapter, ids, mask=None):
    return (
        adapter.capture_full(
            ids,
            attention=ATTENTION,
            residual=RESIDUAL,
            mlp=MLPConfig(),
            logits=LogitConfig(top_k=3),
            attention_mask=mask,
        ),
        adapter.capture(ids, PRE_ROPE, attention_mask=mask),
    )


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_padded_batch_matches_single_prompts(family: str, side: str):
    adapter = oculi.attach(tiny_model(family))
    short, long = prompt_ids(SHORT, seed=5), prompt_ids(LONG, seed=6)
    ids, mask, real = padded_batch(short, long, side)

    full_s, pre_s = capture_all(adapter, short)
    full_l, pre_l = capture_all(adapter, long)
    full_b, pre_b = capture_all(adapter, ids, mask)

    L, H, Hkv, d = adapter.n_layers, adapter.n_heads, adapter.n_kv_heads, adapter.d_model
    # a batch gains a leading B, a single prompt has none
    assert full_b.residual.pre_attn.shape == (2, L, LONG, d)
    assert full_s.residual.pre_attn.shape == (L, SHORT, d)
    assert full_b.attention.patterns.shape == (2, L, H, LONG, LONG)
    assert full_b.attention.keys.shape == (2, L, Hkv, LONG, adapter.d_head)
    assert full_b.mlp.post_activation.shape == (2, L, LONG, adapter.d_mlp)
    assert full_b.logits.top_k_indices.shape == (2, L, LONG, 3)

    for single, pre_single, row, pos in ((full_s, pre_s, 0, real), (full_l, pre_l, 1, slice(None))):
        res_b, res_1 = full_b.residual, single.residual
        for name in ("pre_attn", "post_attn", "pre_mlp", "post_mlp", "attn_out", "mlp_out"):
            assert_close(getattr(res_b, name)[row, :, pos], getattr(res_1, name), name)
        att_b, att_1 = full_b.attention, single.attention
        for name in ("queries", "keys", "values", "head_outputs"):  # [.., L, H, T, D]
            assert_close(getattr(att_b, name)[row, :, :, pos], getattr(att_1, name), name)
        assert_close(att_b.head_contributions[row, :, :, pos], att_1.head_contributions, "head_out")
        assert_close(att_b.patterns[row, :, :, pos, pos], att_1.patterns, "patterns")
        for name in ("queries", "keys", "head_outputs"):
            assert_close(
                getattr(pre_b, name)[row, :, :, pos], getattr(pre_single, name), f"pre {name}"
            )
        for name in ("gate", "up", "post_activation", "output"):
            if getattr(single.mlp, name) is not None:
                assert_close(
                    getattr(full_b.mlp, name)[row, :, pos], getattr(single.mlp, name), name
                )
        lens_b, lens_1 = full_b.logits, single.logits
        assert torch.equal(lens_b.top_k_indices[row, :, pos], lens_1.top_k_indices)
        assert_close(lens_b.logits(layer=L - 1)[row, pos], lens_1.logits(layer=L - 1), "logits")

    # real queries of the padded row put no weight on padded keys, and their rows sum to 1
    patterns = full_b.attention.patterns[0][:, :, real]  # [L, H, T_real, T]
    pad_keys = mask[0] == 0
    assert float(patterns[..., pad_keys].abs().max()) == 0.0
    assert_close(patterns.sum(-1), torch.ones(patterns.shape[:-1]), "row sums")


def test_logits_of_padded_batch_match_the_model():
    """The lens' last layer in a left-padded batch is the model's own padded forward."""
    model = tiny_model("llama_gqa")
    adapter = oculi.attach(model)
    ids, mask, real = padded_batch(prompt_ids(SHORT, seed=5), prompt_ids(LONG, seed=6), "left")
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, position_ids=position_ids).logits
    lens = adapter.capture_logits(ids, attention_mask=mask)
    last = lens.logits(layer=adapter.n_layers - 1)
    assert_close(last[0, real], logits[0, real], "padded row")
    assert_close(last[1], logits[1], "full row")


@pytest.mark.parametrize("family", ["llama_gqa", "gemma3", "gpt2", "neox_parallel"])
def test_string_batches_are_padded_and_honoured(family: str):
    """Strings go through the tokenizer (left padding) and match each prompt alone."""
    tok = tiny_tokenizer()
    adapter = oculi.attach(tiny_model(family), tok)
    prompts = ["the cat sat", "the big red dog sat on the tree"]
    batch = adapter.capture_residual(prompts)
    n_short = len(tok(prompts[0])["input_ids"])
    assert batch.pre_attn.shape[0] == 2
    for row, prompt in enumerate(prompts):
        alone = adapter.capture_residual(prompt)
        width = alone.pre_attn.shape[1]
        assert_close(batch.post_mlp[row, :, -width:], alone.post_mlp, prompt)
    assert alone.pre_attn.shape[1] == batch.pre_attn.shape[2] > n_short
