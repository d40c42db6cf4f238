"""Positions counted in a right-padded batch still name the same tokens when generate re-pads it.

``generate`` re-pads a right-padded batch on the left (each row then ends at the last column).
An intervention's non-negative position counts columns of the batch as the user gave it, so
after the move it named another token in the shorter rows, silently: the row continued
differently from its prompt generated alone with the same intervention. Now the position is
moved with the tokens where every patched row moved alike, and refused (naming what to do)
where they moved differently. The reference is each prompt generated alone, unpadded, with the
same intervention (the position is the same token there).
"""

from __future__ import annotations

import pytest
import torch

import oculi
from models import PAD_ID, prompt_ids, tiny_model
from oculi.intervention import ActivationPatch, InterventionContext

N = 6
LONG, SHORT = prompt_ids(9, seed=3), prompt_ids(6, seed=5)


@pytest.fixture(scope="module")
def adapter():
    return oculi.attach(tiny_model("llama_gqa"))


def _padded(rows, left=0):
    """Right-padded ids and mask, with ``left`` extra padding columns before every row."""
    width = left + max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, left : left + len(r)], mask[i, left : left + len(r)] = r, 1
    return ids, mask


def _patch(position, rows=None):
    return ActivationPatch("resid_post", 0, position=position, value=20.0, mode="add", rows=rows)


def _alone(adapter, ids, interventions):
    with InterventionContext(adapter, interventions):
        return adapter.generate_ids(ids, N).tolist()


def test_rows_moved_differently_refuse_a_counted_position(adapter):
    ids, mask = _padded([LONG, SHORT])  # the short row moves 3 columns right
    before = adapter.generate_ids(LONG, N)
    with (
        pytest.raises(
            ValueError,
            match=r"position 4 counts columns of the batch as given.*\[0, 3\].*-1 is its last",
        ),
        InterventionContext(adapter, [_patch(4)]),
    ):
        adapter.generate_ids(ids, N, attention_mask=mask)
    assert torch.equal(adapter.generate_ids(LONG, N), before)  # the model is left as it was
    # positions from the end name each row's own tokens: allowed, equal to the prompts alone
    with InterventionContext(adapter, [_patch(-2)]):
        got = adapter.generate_ids(ids, N, attention_mask=mask)
    assert got[0].tolist() == _alone(adapter, LONG, [_patch(-2)])
    assert got[1].tolist() == _alone(adapter, SHORT, [_patch(-2)])


def test_a_counted_position_on_rows_that_did_not_move(adapter):
    ids, mask = _padded([LONG, SHORT])
    with InterventionContext(adapter, [_patch(4, rows=[0])]):
        got = adapter.generate_ids(ids, N, attention_mask=mask)
    patched = _alone(adapter, LONG, [_patch(4)])
    assert patched != adapter.generate_ids(LONG, N).tolist()  # the patch matters
    assert got[0].tolist() == patched
    assert got[1].tolist() == adapter.generate_ids(SHORT, N).tolist()


def test_a_counted_position_moves_with_rows_that_moved_alike(adapter):
    # one all-padding column before both rows of equal length: both move one column left
    ids, mask = _padded([LONG, prompt_ids(9, seed=6)], left=1)
    with InterventionContext(adapter, [_patch(5)]):  # column 5 holds token 4 of each row
        got = adapter.generate_ids(ids, N, attention_mask=mask)
    patched = _alone(adapter, LONG, [_patch(4)])
    assert patched != adapter.generate_ids(LONG, N).tolist()
    assert got[0].tolist() == patched
    assert got[1].tolist() == _alone(adapter, prompt_ids(9, seed=6), [_patch(4)])


def test_a_value_per_position_of_rows_moved_differently_is_refused(adapter):
    ids, mask = _padded([LONG, SHORT])
    value = torch.zeros(2, ids.shape[1], adapter.d_model)
    patch = ActivationPatch("resid_post", 0, value=value, mode="add")
    with (
        pytest.raises(ValueError, match="a value per position counts columns"),
        InterventionContext(adapter, [patch]),
    ):
        adapter.generate_ids(ids, N, attention_mask=mask)
