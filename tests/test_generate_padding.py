"""Generation of padded batches (BAD_INPUTS row 38): each row is its prompt generated alone.

The reference is transformers' own ``model.generate`` on one unpadded prompt, greedy, token
for token: a right-padded batch (ids and mask, or strings from a right-padding tokenizer) is
re-padded on the left before generating, with and without the KV cache and with
interventions open around the call.
"""

from __future__ import annotations

import pytest
import torch

import oculi
from models import PAD_ID, prompt_ids, tiny_model, tiny_tokenizer
from oculi.capture.inputs import Batch, left_pad
from oculi.intervention import ActivationPatch, HeadAblation, InterventionContext, SteeringVector

FAMILIES = ["llama_gqa", "mistral", "qwen2", "gemma2", "gemma3", "gpt2", "neox_parallel", "phi3"]
N = 8
ROWS = [prompt_ids(9, seed=3), prompt_ids(4, seed=4), prompt_ids(6, seed=5)]


def right_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    return ids, mask


def alone(model: torch.nn.Module, ids: torch.Tensor, **kwargs) -> list[int]:
    """transformers' greedy continuation of one unpadded prompt."""
    with torch.no_grad():
        out = model.generate(
            ids[None],
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=N,
            do_sample=False,
            pad_token_id=PAD_ID,
            **kwargs,
        )
    return out[0, len(ids) :].tolist()


def assert_rows_alone(got: torch.Tensor, refs: list[list[int]]) -> None:
    assert got.shape[0] == len(refs)
    for r, ref in enumerate(refs):
        assert got[r, : len(ref)].tolist() == ref, f"row {r}"
        assert (got[r, len(ref) :] == PAD_ID).all(), f"row {r} continues after its EOS"


def test_left_pad_moves_real_tokens_right_and_drops_unused_columns():
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0], [0, 4, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 1, 0, 0]])
    b = left_pad(Batch(ids, mask, (mask.cumsum(1) - 1).clamp(min=0), single=False), pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7], [0, 8, 9], [0, 0, 4]]
    assert b.attention_mask.tolist() == [[1, 1, 1], [0, 1, 1], [0, 0, 1]]
    assert b.position_ids.tolist() == [[0, 1, 2], [0, 0, 1], [0, 0, 0]]
    already = left_pad(b, pad_id=0)
    assert already is b  # a left-padded batch is kept as it is


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no_cache"])
@pytest.mark.parametrize("family", FAMILIES)
def test_right_padded_ids_generate_each_row_as_alone(family, use_cache):
    model = tiny_model(family)
    a = oculi.attach(model)  # ids over the whole vocabulary: no tokenizer
    ids, mask = right_padded(ROWS)
    got = a.generate_ids(ids, N, attention_mask=mask, use_cache=use_cache)
    assert_rows_alone(got, [alone(model, r, use_cache=use_cache) for r in ROWS])
    # the same through a mapping (a BatchEncoding), and one row as [T]
    again = a.generate_ids({"input_ids": ids, "attention_mask": mask}, N, use_cache=use_cache)
    assert torch.equal(again, got)
    assert (
        a.generate_ids(ROWS[1], N, use_cache=use_cache).tolist()
        == got[1].tolist()[: len(alone(model, ROWS[1], use_cache=use_cache))]
    )


def test_the_case_is_real_transformers_continues_right_padding_wrongly():
    """Without re-padding, the short rows of the same batch differ from their prompt alone
    (so the test above can fail)."""
    model = tiny_model("llama_gqa")
    ids, mask = right_padded(ROWS)
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=N, do_sample=False, pad_token_id=PAD_ID
        )[:, ids.shape[1] :]
    assert out[1].tolist() != alone(model, ROWS[1])


@pytest.mark.parametrize("family", ["llama_gqa", "gemma3", "gpt2"])
def test_strings_from_a_right_padding_tokenizer(family, monkeypatch):
    tok = tiny_tokenizer()  # shared (cached): restored after the test
    monkeypatch.setattr(tok, "padding_side", "right")
    a = oculi.attach(tiny_model(family), tok)
    prompts = ["the cat sat on the red house and the", "a dog", "john gave mary the"]
    assert a.prepare(prompts).attention_mask[1, -1] == 0  # really right-padded
    got = a.generate_ids(prompts, N)
    assert_rows_alone(got, [alone(a.model, a.tokenize(p)) for p in prompts])
    assert a.generate(prompts, N) == [a.generate(p, N) for p in prompts]


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no_cache"])
@pytest.mark.parametrize("family", ["llama_gqa", "gemma2", "neox_parallel"])
def test_interventions_act_on_each_row_as_on_the_prompt_alone(family, use_cache):
    a = oculi.attach(tiny_model(family))
    vector = torch.randn(a.d_model, generator=torch.Generator().manual_seed(0))
    interventions = [
        SteeringVector(vector, layer=1, coefficient=2.0),
        HeadAblation(layer=0, head=1),
        ActivationPatch("resid_post", 2, position=-1, value=0.5, mode="add"),
    ]
    ids, mask = right_padded(ROWS)
    with InterventionContext(a, interventions):
        got = a.generate_ids(ids, N, attention_mask=mask, use_cache=use_cache)
        refs = [a.generate_ids(r, N, use_cache=use_cache).tolist() for r in ROWS]
    plain = [alone(a.model, r, use_cache=use_cache) for r in ROWS]
    assert refs != plain  # the interventions change the continuations
    for r, ref in enumerate(refs):  # unpadded reference: stop at its EOS, like alone()
        ref = ref[: ref.index(2) + 1] if 2 in ref else ref
        refs[r] = ref
    assert_rows_alone(got, refs)


@pytest.mark.gemma
def test_gemma_right_padded_prompts_generate_as_alone(gemma):
    prompts = ["The capital of France is", "Hi", "The Eiffel Tower is located in the city of"]
    with torch.no_grad():
        ids = [gemma.tokenize(p) for p in prompts]
    padded, mask = right_padded(ids)
    got = gemma.generate_ids(padded, N, attention_mask=mask)
    assert_rows_alone(got, [alone(gemma.model, r) for r in ids])
    tok_side = gemma.tokenizer.padding_side
    try:
        gemma.tokenizer.padding_side = "right"
        assert gemma.generate(prompts, N) == [gemma.generate(p, N) for p in prompts]
    finally:
        gemma.tokenizer.padding_side = tok_side
