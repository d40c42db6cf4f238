"""Duplicate-token heads, whole-model classification, and causal validation of found heads.

Hand-built patterns with known scores; on Gemma 3 270M the induction heads found from
patterns on repeated random tokens are ablated and compared with random heads (the reference
is the model's own loss with and without the ablation).
"""

from __future__ import annotations

import pytest
import torch

import oculi
from models import prompt_ids, tiny_model
from oculi import AttentionCapture, CaptureConfig, InputError
from oculi.analysis import CircuitDetection, CompositionAnalysis
from oculi.analysis.validation import IOI_TEMPLATES, induction_task, ioi_task


def duplicate_capture() -> AttentionCapture:
    ids = [5, 6, 7, 5, 8, 6, 5]
    t = len(ids)
    dup = torch.zeros(t, t)
    half = torch.zeros(t, t)
    for q, x in enumerate(ids):
        earlier = [s for s in range(q) if ids[s] == x]
        if earlier:
            dup[q, earlier] = 1 / len(earlier)  # all attention on earlier copies
            half[q, earlier[0]] = 0.5
            half[q, q] = 0.5
        else:
            dup[q, q] = half[q, q] = 1
    prev = torch.zeros(t, t)
    prev[0, 0] = 1
    prev[torch.arange(1, t), torch.arange(t - 1)] = 1
    patterns = torch.stack([torch.stack([dup, half]), torch.stack([prev, prev])])
    return AttentionCapture(
        layers=(0, 1), patterns=patterns, n_heads=2, metadata={"input_ids": ids}
    )


def test_duplicate_token_scores_on_hand_built_patterns():
    cap = duplicate_capture()
    scores = CircuitDetection.detect_duplicate_token_heads(cap)
    assert scores.shape == (2, 2)
    assert float(scores[0, 0]) == pytest.approx(1.0)
    assert float(scores[0, 1]) == pytest.approx(0.5)
    # queries with an earlier copy: positions 3 (5), 5 (6), 6 (5); none attends to its copy
    assert float(scores[1, 0]) == pytest.approx(0.0)
    no_repeat = AttentionCapture(layers=(0,), patterns=cap.patterns[:1, :, :3, :3], n_heads=2)
    with pytest.raises(InputError, match="no token repeats"):
        CircuitDetection.detect_duplicate_token_heads(no_repeat, input_ids=[1, 2, 3])


def test_classify_heads_labels_every_head_with_thresholds_as_parameters():
    cap = duplicate_capture()
    found = CircuitDetection.classify_heads(cap)  # head (0, 1) scores exactly 0.5
    assert found["labels"] == [
        ["duplicate_token", "duplicate_token"],
        ["previous_token", "previous_token"],
    ]
    assert found["scores"]["duplicate_token"].shape == (2, 2)
    raised = CircuitDetection.classify_heads(cap, thresholds={"duplicate_token": 0.6})
    assert raised["labels"][0] == ["duplicate_token", "unknown"]
    one = CircuitDetection.classify_attention_head(cap, 0, 1, thresholds={"duplicate_token": 0.6})
    assert one["pattern"] == "unknown"
    assert one["scores"]["duplicate_token"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown pattern"):
        CircuitDetection.classify_heads(cap, thresholds={"name_mover": 0.5})


def test_validate_checks_its_inputs_on_a_tiny_model():
    adapter = oculi.attach(tiny_model("llama_mha"))
    with pytest.raises(InputError, match="task must be"):
        CircuitDetection.validate(adapter, [(1, 0)], "sorting")
    with pytest.raises(InputError, match="distinct"):
        CircuitDetection.validate(adapter, [(1, 0), (1, 0)])
    with pytest.raises(InputError, match="method"):
        CircuitDetection.validate(adapter, [(1, 0)], method="resample")
    task = induction_task(adapter, n_sequences=2, period=5)
    result = CircuitDetection.validate(adapter, [(1, 0)], task, n_random=3)
    assert len(result.random_effects) == 3
    assert all((1, 0) not in s for s in result.random_sets)
    assert result.effect == pytest.approx(result.ablated - result.baseline)
    assert "random sets of 1" in result.statement
    with torch.no_grad():  # the baseline is the model's own loss on the task
        logits = adapter.model(task.inputs).logits[:, task.logits_at]
    assert result.baseline == pytest.approx(task.loss(logits), rel=1e-5)
    _ = prompt_ids  # shared helpers


@pytest.mark.gemma
def test_gemma_induction_heads_matter_far_more_than_random_heads(gemma):
    task = induction_task(gemma, n_sequences=2, period=15)
    capture = gemma.capture(task.inputs)
    scores = CircuitDetection.detect_induction_heads(capture).mean(0)  # [L, H] over the batch
    heads = [tuple(h) for h in (scores >= 0.5).nonzero().tolist()]
    assert 1 <= len(heads) <= 6
    result = CircuitDetection.validate(gemma, heads, task, n_random=8)
    assert result.effect > 1.0  # nats of repeat loss
    assert result.effect > 2 * max(result.random_effects)  # the max hits previous-token heads
    assert result.effect > 10 * abs(sum(result.random_effects) / len(result.random_effects))
    assert result.significant and "matter more than random heads" in result.statement


@pytest.mark.gemma
def test_gemma_ioi_name_movers_by_path_patching_and_the_linear_estimate(gemma):
    clean = "When Mary and John went to the store, John gave a drink to"
    corrupt = "When Mary and John went to the store, Tom gave a drink to"
    found = CircuitDetection.ioi_heads(gemma, clean, corrupt, io=" Mary", s=" John", k=2)
    direct = found["direct"]  # path patching of every head into the logits
    drops = direct.clean_metric - direct.values
    movers, inhibition = found["name_movers"], found["s_inhibition"]
    assert all(float(drops[m]) > 0.5 for m in movers)  # of a clean logit difference of ~5
    assert inhibition and max(i for i, _ in inhibition) < min(i for i, _ in movers)
    # the forward-free estimate of the same sweep, from two captures
    heads = CaptureConfig(capture_head_contributions=True)
    est = CompositionAnalysis.path_patching_score(
        gemma.capture_full(clean, attention=heads),
        gemma.capture_full(corrupt, attention=heads),
        (gemma.to_single_token(" Mary"), gemma.to_single_token(" John")),
    )
    assert est.metadata["clean_metric"] == pytest.approx(direct.clean_metric, rel=1e-4)
    r = torch.corrcoef(torch.stack([est.values.flatten(), direct.values.flatten().float()]))[0, 1]
    assert r > 0.95
    assert int(est.values.argmin()) == int(direct.values.argmin())  # the top name mover
    # ablating the name movers hurts the task more than random heads do on average
    task = ioi_task(gemma, templates=IOI_TEMPLATES[:1])
    result = CircuitDetection.validate(gemma, movers, task, n_random=4)
    assert result.baseline < 0  # -(logit(IO) - logit(S)): the model prefers the IO name
    assert result.effect > 0.5
    assert result.effect > sum(result.random_effects) / len(result.random_effects)
