"""oculi.analysis against hand computations, constructed captures and a tiny real model.

Hand-built captures have patterns whose answers are known exactly (uniform rows, one-hot
previous-token rows, a perfect induction pattern on a repeated random sequence); the p-values
are checked against closed forms of Student's t distribution and a numerical integral of its
density, computed here independently of the incomplete beta function oculi uses.
"""

from __future__ import annotations

import math

import pytest
import torch
from jaxtyping import Bool, Float
from torch import Tensor

import oculi
from oculi import AttentionCapture, FullCapture, InputError, LayerIndexError, LogitCapture
from oculi.analysis import (
    CircuitDetection,
    CorrelationAnalysis,
    EntropyAnalysis,
    LogitLensAnalysis,
    LogitLensResult,
    NormAnalysis,
    StratifiedView,
    crossover_layer,
    find_extreme_heads,
    pearson_pvalue,
    regularized_incomplete_beta,
)

EXACT = dict(rtol=0, atol=1e-6)  # float32 arithmetic on hand-built tensors
MODEL = dict(rtol=1e-5, atol=1e-5)  # the same quantity reached by two routes through a model


# -- hand-built captures --------------------------------------------------------------------
def uniform(t: int) -> Tensor:
    """Causal uniform pattern ``[t, t]``: row ``i`` spreads evenly over keys ``0..i``."""
    mask = torch.ones(t, t).tril()
    return mask / mask.sum(-1, keepdim=True)


def previous_token(t: int) -> Tensor:
    """Row ``i`` puts all its attention on ``i - 1`` (row 0 on itself)."""
    p = torch.zeros(t, t)
    p[0, 0] = 1.0
    p[torch.arange(1, t), torch.arange(t - 1)] = 1.0
    return p


def bos(t: int) -> Tensor:
    """Every row attends to position 0 only."""
    p = torch.zeros(t, t)
    p[:, 0] = 1.0
    return p


def induction(t: int, period: int) -> Tensor:
    """Perfect induction on ``[bos, s_1..s_n, s_1..s_n]``: row ``q`` of the second copy
    attends to ``q - n + 1``; every other row attends to the first token."""
    p = bos(t)
    for q in range(period + 1, t):
        p[q] = 0.0
        p[q, q - period + 1] = 1.0
    return p


def repeated_ids(period: int, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    seq = (torch.randperm(60, generator=gen)[:period] + 3).tolist()  # distinct, no special ids
    return [1, *seq, *seq]


def make_capture(patterns: Tensor, *, layers=None, input_ids=None, **fields) -> AttentionCapture:
    """An ``AttentionCapture`` of one sequence from ``[L, H, T, T]`` patterns."""
    n_layers, n_heads = patterns.shape[:2]
    metadata = {} if input_ids is None else {"input_ids": [list(input_ids)]}
    return AttentionCapture(
        layers=tuple(range(n_layers)) if layers is None else tuple(layers),
        patterns=patterns,
        n_heads=n_heads,
        metadata=metadata,
        **fields,
    )


# -- a tiny real model ------------------------------------------------------------------------
def word_tokenizer():
    """A 64-token word-level tokenizer built in memory: ``<pad> <bos> <unk>`` then ``w3..w63``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, 64)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.3,  # far from uniform attention
        attn_implementation="eager",  # so output_attentions gives the reference patterns
    )
    model = LlamaForCausalLM(config).eval()
    return model, oculi.attach(model, word_tokenizer())


# ============================================================================================
# EntropyAnalysis
# ============================================================================================
def test_uniform_rows_have_entropy_log_t_plus_one():
    t = 6
    capture = make_capture(uniform(t).expand(2, 3, t, t).clone())
    entropy = EntropyAnalysis.token_entropy(capture)
    assert isinstance(entropy, Float[Tensor, "layer head pos"])
    assert entropy.shape == (2, 3, t)
    expected = torch.log(torch.arange(1, t + 1, dtype=torch.float32))
    torch.testing.assert_close(entropy, expected.expand(2, 3, t), **EXACT)
    torch.testing.assert_close(
        EntropyAnalysis.effective_rank(capture),
        torch.arange(1, t + 1, dtype=torch.float32).expand(2, 3, t),
        rtol=1e-6,
        atol=1e-5,
    )


def test_one_hot_rows_have_entropy_zero_and_a_hand_row():
    p = previous_token(5)
    p[4] = torch.tensor([0.5, 0.25, 0.25, 0.0, 0.0])  # H = 1.5 log 2, zeros contribute 0
    entropy = EntropyAnalysis.token_entropy(make_capture(p[None, None]))
    assert entropy[0, 0, :4].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert not torch.signbit(entropy[0, 0, :4]).any()  # +0.0, not -0.0
    assert entropy[0, 0, 4].item() == pytest.approx(1.5 * math.log(2), abs=1e-6)


def test_entropy_accepts_a_full_capture_and_low_precision_storage():
    p = uniform(4).expand(1, 2, 4, 4).half()
    full = FullCapture(attention=make_capture(p))
    entropy = EntropyAnalysis.token_entropy(full)
    assert entropy.dtype == torch.float32
    assert entropy[0, 0, 3].item() == pytest.approx(math.log(4), abs=1e-3)


def test_delta_and_mean_entropy_by_hand():
    t = 4
    flat = make_capture(uniform(t).expand(2, 2, t, t).clone())
    sharp = make_capture(previous_token(t).expand(2, 2, t, t).clone())
    # mean over positions of log(t + 1): log(1·2·3·4) / 4
    delta = EntropyAnalysis.delta_entropy(flat, sharp)
    assert delta.shape == (2, 2)
    torch.testing.assert_close(delta, torch.full((2, 2), math.log(24) / 4), **EXACT)
    delta1 = EntropyAnalysis.delta_entropy(flat, sharp, ignore_first=1)
    torch.testing.assert_close(delta1, torch.full((2, 2), math.log(24) / 3), **EXACT)
    assert EntropyAnalysis.delta_entropy(sharp, flat)[0, 0].item() == pytest.approx(
        -math.log(24) / 4
    )
    torch.testing.assert_close(
        EntropyAnalysis.mean_entropy(flat, ignore_first=2),
        torch.full((2, 2), (math.log(3) + math.log(4)) / 2),
        **EXACT,
    )


def test_delta_entropy_rejects_captures_of_different_layers():
    a = make_capture(uniform(3)[None, None], layers=(0,))
    b = make_capture(uniform(3)[None, None], layers=(1,))
    with pytest.raises(ValueError, match=r"different layers: \[0\] and \[1\]"):
        EntropyAnalysis.delta_entropy(a, b)
    with pytest.raises(ValueError, match="ignore_first=3 leaves no position"):
        EntropyAnalysis.mean_entropy(a, ignore_first=3)


def test_missing_patterns_says_how_to_capture_them():
    capture = AttentionCapture(layers=(0,), queries=torch.ones(1, 1, 3, 2))
    with pytest.raises(
        InputError, match=r"no patterns; capture with CaptureConfig\(capture_patterns=True\)"
    ):
        EntropyAnalysis.token_entropy(capture)
    with pytest.raises(InputError, match="expected an AttentionCapture"):
        EntropyAnalysis.token_entropy(torch.ones(1, 1, 3, 3))


def test_batched_capture_marks_padding_nan_and_matches_each_row():
    # row 0: 4 real tokens; row 1: left-padded, real tokens at 2..3
    p = torch.zeros(2, 1, 1, 4, 4)
    p[0, 0, 0] = uniform(4)
    p[1, 0, 0, :2] = 0.25  # padded query rows: whatever the model left there
    p[1, 0, 0, 2:, 2:] = uniform(2)
    capture = AttentionCapture(
        layers=(0,),
        patterns=p,
        metadata={"single": False, "attention_mask": [[1, 1, 1, 1], [0, 0, 1, 1]]},
    )
    entropy = EntropyAnalysis.token_entropy(capture)
    assert isinstance(entropy, Float[Tensor, "batch layer head pos"])
    assert entropy[1, 0, 0, :2].isnan().all()
    torch.testing.assert_close(entropy[1, 0, 0, 2:], torch.tensor([0.0, math.log(2)]), **EXACT)
    torch.testing.assert_close(entropy[0, 0, 0], torch.log(torch.arange(1.0, 5.0)), **EXACT)
    mean = EntropyAnalysis.mean_entropy(capture)
    assert mean.shape == (2, 1, 1)
    assert mean[1, 0, 0].item() == pytest.approx(math.log(2) / 2)
    # ignore_first counts each row's own real tokens
    assert EntropyAnalysis.mean_entropy(capture, ignore_first=1)[1, 0, 0].item() == pytest.approx(
        math.log(2)
    )


# ============================================================================================
# NormAnalysis
# ============================================================================================
def test_norms_of_three_four_five_vectors():
    q = torch.zeros(1, 2, 3, 2)
    q[..., 0], q[..., 1] = 3.0, 4.0  # |q| = 5
    q[0, 1, 2] = torch.tensor([0.0, -2.0])
    k = torch.tensor([[[[1.0, 2.0, 2.0], [0.0, 0.0, 0.0]]]])  # [1, 1, 2, 3]: norms 3, 0
    capture = AttentionCapture(layers=(0,), queries=q, keys=k, values=2 * k)
    qn = NormAnalysis.q_norms(capture)
    assert isinstance(qn, Float[Tensor, "layer head pos"])
    assert qn.tolist() == [[[5.0, 5.0, 5.0], [5.0, 5.0, 2.0]]]
    assert NormAnalysis.k_norms(capture).tolist() == [[[3.0, 0.0]]]
    assert NormAnalysis.v_norms(capture).tolist() == [[[6.0, 0.0]]]
    with pytest.raises(InputError, match=r"CaptureConfig\(capture_queries=True\)"):
        NormAnalysis.q_norms(AttentionCapture(layers=(0,), keys=k))


# ============================================================================================
# CorrelationAnalysis
# ============================================================================================
def t_density(s: float, dof: int) -> float:
    c = math.exp(math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2)) / math.sqrt(dof * math.pi)
    return c * (1 + s * s / dof) ** (-(dof + 1) / 2)


def two_sided_by_simpson(t: float, dof: int, n: int = 20_000) -> float:
    """``1 - 2 ∫_0^|t| f(s) ds`` with Simpson's rule: an independent route to the p-value."""
    h = abs(t) / n
    total = t_density(0, dof) + t_density(abs(t), dof)
    total += sum((4 if i % 2 else 2) * t_density(i * h, dof) for i in range(1, n))
    return 1 - 2 * total * h / 3


def t_of(r: float, n: int) -> float:
    return r * math.sqrt((n - 2) / (1 - r * r))


def test_pearson_of_a_perfect_line():
    x = torch.arange(10.0)
    r, p = CorrelationAnalysis.pearson_with_pvalue(x, 3 * x - 7)
    assert r == pytest.approx(1.0, abs=1e-12)
    assert p == pytest.approx(0.0, abs=1e-12)
    r, p = CorrelationAnalysis.pearson_with_pvalue(x, -0.5 * x)
    assert (r, p) == (pytest.approx(-1.0, abs=1e-12), pytest.approx(0.0, abs=1e-12))


def test_pearson_worked_example_against_the_closed_form_for_three_dof():
    # x = 1..5, y = 2,4,5,4,5: Sxy = 6, Sxx = 10, Syy = 6, so r = 6/√60 = √0.6
    r, p = CorrelationAnalysis.pearson_with_pvalue([1, 2, 3, 4, 5], [2, 4, 5, 4, 5])
    assert r == pytest.approx(math.sqrt(0.6), abs=1e-12)
    # Student t with 3 dof: P(|T| > t) = 1 - (2/π)(θ + sin θ cos θ), θ = atan(t/√3)
    theta = math.atan(t_of(r, 5) / math.sqrt(3))
    expected = 1 - 2 / math.pi * (theta + math.sin(theta) * math.cos(theta))
    assert p == pytest.approx(expected, abs=1e-12)
    assert p == pytest.approx(0.12402706265755456, abs=1e-9)


def test_pvalue_matches_cauchy_and_two_dof_closed_forms():
    # n = 3: t with 1 dof is Cauchy, P(|T| > t) = 1 - (2/π) atan|t|
    r, p = CorrelationAnalysis.pearson_with_pvalue([0.0, 1.0, 2.0], [0.0, 2.0, 1.0])
    assert r == pytest.approx(0.5)
    assert p == pytest.approx(1 - 2 / math.pi * math.atan(t_of(0.5, 3)), abs=1e-12)
    # n = 4: 2 dof, P(|T| > t) = 1 - |t| / √(2 + t²)
    for r in (-0.9, -0.3, 0.1, 0.7, 0.99):
        t = t_of(r, 4)
        assert pearson_pvalue(r, 4) == pytest.approx(1 - abs(t) / math.sqrt(2 + t * t), abs=1e-12)


@pytest.mark.parametrize(("r", "n"), [(0.5, 10), (0.2, 30), (-0.45, 17), (0.05, 200)])
def test_pvalue_matches_a_numerical_integral_of_the_t_density(r, n):
    assert pearson_pvalue(r, n) == pytest.approx(two_sided_by_simpson(t_of(r, n), n - 2), abs=1e-9)


def test_pvalue_edge_cases_and_incomplete_beta_identities():
    assert pearson_pvalue(0.5, 10) == pytest.approx(0.14111328125, abs=1e-12)
    assert pearson_pvalue(0.0, 12) == 1.0
    assert pearson_pvalue(1.0, 12) == 0.0
    # I_x(1, 1) = x;  I_x(2, 3) = Σ_{j=2}^{4} C(4, j) x^j (1-x)^(4-j);  I_x(½, ½) = (2/π) asin √x
    assert regularized_incomplete_beta(1, 1, 0.3) == pytest.approx(0.3, abs=1e-14)
    binomial = sum(math.comb(4, j) * 0.4**j * 0.6 ** (4 - j) for j in range(2, 5))
    assert regularized_incomplete_beta(2, 3, 0.4) == pytest.approx(binomial, abs=1e-14)
    arcsine = 2 / math.pi * math.asin(math.sqrt(0.2))
    assert regularized_incomplete_beta(0.5, 0.5, 0.2) == pytest.approx(arcsine, abs=1e-13)
    with pytest.raises(ValueError, match="at least 3 pairs"):
        pearson_pvalue(0.3, 2)


def test_pearson_skips_non_finite_pairs_and_flags_constants():
    x = [1.0, 2.0, float("nan"), 3.0, 4.0, 5.0]
    y = [2.0, 4.0, 100.0, 5.0, 4.0, float("inf")]
    r, p = CorrelationAnalysis.pearson_with_pvalue(x, y)
    r4, p4 = CorrelationAnalysis.pearson_with_pvalue([1, 2, 3, 4], [2, 4, 5, 4])
    assert (r, p) == (pytest.approx(r4), pytest.approx(p4))
    r, p = CorrelationAnalysis.pearson_with_pvalue([1, 2, 3], [7, 7, 7])
    assert math.isnan(r) and math.isnan(p)
    with pytest.raises(InputError, match="x has 3 values but y has 2"):
        CorrelationAnalysis.pearson_with_pvalue([1, 2, 3], [1, 2])
    with pytest.raises(InputError, match="at least 3 finite pairs, got 2"):
        CorrelationAnalysis.pearson_with_pvalue([1, 2, float("nan")], [1, 2, 3])


def test_norm_entropy_correlation_of_linear_relations():
    t = 8
    log_t = torch.log(torch.arange(1.0, t + 1))  # entropy of the uniform rows
    q = torch.zeros(1, 2, t, 2)
    q[0, 0, :, 0] = 2 * log_t + 1  # norm rises with entropy: r = +1
    q[0, 1, :, 1] = 10 - log_t  # norm falls as entropy rises: r = -1
    capture = make_capture(uniform(t).expand(1, 2, t, t).clone(), queries=q)
    r = CorrelationAnalysis.norm_entropy_correlation(capture, ignore_first=2)
    assert isinstance(r, Float[Tensor, "layer head"])
    torch.testing.assert_close(r, torch.tensor([[1.0, -1.0]]), **EXACT)
    # ignore_first matters: position 0 breaks the line below
    q[0, 0, 0, 0] = 50.0
    assert CorrelationAnalysis.norm_entropy_correlation(capture, ignore_first=1)[
        0, 0
    ] == pytest.approx(1)
    assert CorrelationAnalysis.norm_entropy_correlation(capture, ignore_first=0)[0, 0] < 0
    with pytest.raises(ValueError, match="leaves 2 position"):
        CorrelationAnalysis.norm_entropy_correlation(capture, ignore_first=6)


# ============================================================================================
# CircuitDetection
# ============================================================================================
def test_previous_token_score_is_one_for_the_exact_pattern():
    t = 7
    patterns = torch.stack([previous_token(t), uniform(t)])[None]  # [1, 2, t, t]
    scores = CircuitDetection.detect_previous_token_heads(make_capture(patterns))
    assert isinstance(scores, Float[Tensor, "layer head"])
    assert scores[0, 0].item() == 1.0
    # uniform: mean over t = 1..6 of 1 / (t + 1)
    assert scores[0, 1].item() == pytest.approx(sum(1 / (i + 1) for i in range(1, t)) / (t - 1))


def test_perfect_induction_pattern_on_a_repeated_random_sequence():
    period = 6
    ids = repeated_ids(period)
    t = len(ids)
    patterns = torch.stack([induction(t, period), previous_token(t), uniform(t)])[None]
    capture = make_capture(patterns, input_ids=ids)
    scores = CircuitDetection.detect_induction_heads(capture)
    assert scores.shape == (1, 3)
    assert scores[0, 0].item() == 1.0
    assert scores[0, 1].item() == 0.0  # t - 1 is never the token after an earlier occurrence
    # uniform: queries n+1 .. 2n each give 1 / (q + 1)
    uniform_score = sum(1 / (q + 1) for q in range(period + 1, t)) / period
    assert scores[0, 2].item() == pytest.approx(uniform_score)
    # explicit ids win over the metadata
    bare = make_capture(patterns)
    torch.testing.assert_close(
        CircuitDetection.detect_induction_heads(bare, input_ids=torch.tensor(ids)), scores
    )
    with pytest.raises(InputError, match="need the token ids"):
        CircuitDetection.detect_induction_heads(bare)


def test_induction_sums_over_every_earlier_occurrence_and_skips_adjacent_repeats():
    a, b, c = 10, 11, 12
    ids = [a, b, a, c, a]  # query 2 -> {1}; query 4 -> {1, 3}
    p = uniform(5)
    p[2] = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0])
    p[4] = torch.tensor([0.0, 0.3, 0.0, 0.2, 0.5])
    score = CircuitDetection.detect_induction_heads(make_capture(p[None, None], input_ids=ids))
    assert score.item() == pytest.approx((1.0 + 0.5) / 2)
    # x_{t-1} == x_t would point at t itself: not an induction target
    with pytest.raises(InputError, match="no token repeats"):
        CircuitDetection.detect_induction_heads(
            make_capture(uniform(3)[None, None], input_ids=[a, a, b])
        )
    with pytest.raises(ValueError, match=r"threshold must be a number in \[0, 1\]"):
        CircuitDetection.detect_induction_heads(
            make_capture(p[None, None], input_ids=ids), threshold=2
        )


def test_positional_heads():
    t = 6
    patterns = torch.stack([bos(t), previous_token(t), uniform(t)])[None]
    positional = CircuitDetection.detect_positional_heads(make_capture(patterns))
    assert isinstance(positional["bos"], Bool[Tensor, "layer head"])
    assert positional["bos"].tolist() == [[True, False, False]]
    assert positional["recent"].tolist() == [[False, True, False]]
    assert int(positional["bos"].sum()) == 1
    torch.testing.assert_close(
        positional["bos_score"],
        torch.tensor([[1.0, 1 / 5, sum(1 / (i + 1) for i in range(1, t)) / 5]]),
        **EXACT,
    )
    # recent, window 3: queries 3..5 of the uniform head keep 3 / (t + 1)
    recent_uniform = sum(3 / (q + 1) for q in range(3, t)) / 3
    torch.testing.assert_close(
        positional["recent_score"], torch.tensor([[0.0, 1.0, recent_uniform]]), **EXACT
    )
    wide = CircuitDetection.detect_positional_heads(make_capture(patterns), window=5)
    assert wide["recent_score"][0, 2].item() == pytest.approx(5 / 6)
    with pytest.raises(InputError, match="at least 7 tokens"):
        CircuitDetection.detect_positional_heads(make_capture(patterns), window=6)


def test_classify_attention_head_names_each_constructed_pattern():
    period = 5
    ids = repeated_ids(period, seed=1)
    t = len(ids)
    heads = [induction(t, period), previous_token(t), bos(t), uniform(t)]
    # model layers 2 and 5 were captured; layer 5 holds the constructed heads
    patterns = torch.stack([torch.stack([uniform(t)] * 4), torch.stack(heads)])
    capture = make_capture(patterns, layers=(2, 5), input_ids=ids)
    capture.metadata["n_layers_model"] = 6
    names = [CircuitDetection.classify_attention_head(capture, 5, h) for h in range(4)]
    assert [n["pattern"] for n in names] == ["induction", "previous_token", "bos", "unknown"]
    assert names[0]["score"] == 1.0 and names[1]["score"] == 1.0 and names[2]["score"] == 1.0
    assert names[3]["score"] == max(names[3]["scores"].values())
    assert CircuitDetection.classify_attention_head(capture, -1, 1)["pattern"] == "previous_token"
    assert CircuitDetection.classify_attention_head(capture, 2, 0)["pattern"] == "unknown"
    # a lower bar turns the uniform head's recent score into a label
    lenient = CircuitDetection.classify_attention_head(capture, 5, 3, thresholds={"recent": 0.3})
    assert lenient["pattern"] == "recent"
    with pytest.raises(LayerIndexError, match=r"layer 3 was not captured; .* \[2, 5\]"):
        CircuitDetection.classify_attention_head(capture, 3, 0)
    with pytest.raises(IndexError, match=r"head 4 out of range: valid heads are 0..3"):
        CircuitDetection.classify_attention_head(capture, 5, 4)
    # three tokens: no query has a recent window that leaves token 0 out, so no recent score
    short = make_capture(torch.stack([previous_token(3), bos(3)])[None])
    assert CircuitDetection.classify_attention_head(short, 0, 0) == {
        "pattern": "previous_token",
        "score": 1.0,
        "scores": {"previous_token": 1.0, "bos": 0.5},
    }
    assert CircuitDetection.classify_attention_head(short, 0, 1)["pattern"] == "bos"
    with pytest.raises(ValueError, match="unknown pattern 'sink'"):
        CircuitDetection.classify_attention_head(capture, 5, 0, thresholds={"sink": 0.5})


# ============================================================================================
# StratifiedView and find_extreme_heads
# ============================================================================================
def test_stratified_views():
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    assert StratifiedView.by_layer(x, 1).tolist() == x[1].tolist()
    assert StratifiedView.by_head(x, 1, 2).tolist() == [20.0, 21.0, 22.0, 23.0]
    assert StratifiedView.by_token(x, -1).tolist() == [[3.0, 7.0, 11.0], [15.0, 19.0, 23.0]]
    # with the capture's layer list, layers are model indices
    assert StratifiedView.by_head(x, 10, 0, layers=(4, 10)).tolist() == [12.0, 13.0, 14.0, 15.0]
    with pytest.raises(IndexError, match=r"layer 2 out of range: valid layers are 0..1"):
        StratifiedView.by_layer(x, 2)
    with pytest.raises(IndexError, match=r"head 3 out of range: valid heads are 0..2"):
        StratifiedView.by_head(x, 0, 3)
    with pytest.raises(LayerIndexError, match=r"holds model layers \[4, 10\]"):
        StratifiedView.by_layer(x, 5, layers=(4, 10))
    with pytest.raises(ValueError, match=r"by_token takes a \[L, H, T\] tensor"):
        StratifiedView.by_token(x[0], 0)


def test_find_extreme_heads():
    scores = torch.tensor([[0.1, 0.9, 0.5], [0.7, float("nan"), 0.2], [0.3, 0.8, 0.0]])
    assert find_extreme_heads(scores, k=3) == [
        (0, 1, pytest.approx(0.9)),
        (2, 1, pytest.approx(0.8)),
        (1, 0, pytest.approx(0.7)),
    ]
    assert find_extreme_heads(scores, k=2, mode="min") == [(2, 2, 0.0), (0, 0, pytest.approx(0.1))]
    assert len(find_extreme_heads(scores, k=100)) == 8  # the NaN head is skipped
    # half-open layer range, in model indices when layers are given
    assert find_extreme_heads(scores, k=1, layer_range=(1, 3)) == [(2, 1, pytest.approx(0.8))]
    assert find_extreme_heads(scores, k=1, layer_range=(20, 21), layers=(19, 20, 21)) == [
        (20, 0, pytest.approx(0.7))
    ]
    # [L, H, T] is averaged over positions first
    per_pos = torch.stack([scores.nan_to_num(0.0), scores.nan_to_num(0.0) + 1], dim=-1)
    assert find_extreme_heads(per_pos, k=1) == [(0, 1, pytest.approx(1.4))]
    with pytest.raises(ValueError, match="mode must be 'max' or 'min'"):
        find_extreme_heads(scores, mode="top")
    with pytest.raises(ValueError, match=r"layer_range=\(5, 9\) selects no layer"):
        find_extreme_heads(scores, layer_range=(5, 9))


# ============================================================================================
# Logit lens on a hand-built LogitCapture
# ============================================================================================
def hand_logits(top_k: int = 2) -> LogitCapture:
    """Identity unembedding, so each layer's logits are its residual rows (V = d = 4)."""
    normalized = torch.tensor(
        [
            [[1.0, 0.0, 0.0, 0.0], [3.0, 0.0, 1.0, 0.0]],  # token 2 ranked 1
            [[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 5.0, 0.0]],  # ranked 0
            [[0.0, 0.0, 0.0, 2.0], [5.0, 0.0, 1.0, 0.0]],  # ranked 1
            [[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 2.0, 1.0]],  # ranked 0
        ]
    )
    return LogitCapture(
        layers=(0, 1, 2, 3),
        normalized=normalized,
        unembed=torch.eye(4),
        top_k=top_k,
        final_normalized=normalized[-1],
    )


def test_layer_predictions_read_the_stored_or_the_full_top_k():
    logits = hand_logits(top_k=2)
    probs = torch.softmax(logits.normalized[:, -1], dim=-1)
    rows = LogitLensAnalysis().layer_predictions(logits, token_position=-1, top_k=2)
    assert [row["layer"] for row in rows] == [0, 1, 2, 3]
    assert rows[1]["predictions"][0] == ("<2>", pytest.approx(probs[1, 2].item()))
    assert rows[0]["predictions"][0] == (
        "<0>",
        pytest.approx(math.exp(3) / (math.exp(3) + math.e + 2)),
    )
    # more than the capture stored: computed from the full logits, same leading entries
    wide = LogitLensAnalysis().layer_predictions(logits, top_k=4)
    assert [tok for tok, _ in wide[3]["predictions"][:2]] == [
        tok for tok, _ in rows[3]["predictions"]
    ]
    assert sum(p for _, p in wide[3]["predictions"]) == pytest.approx(1.0)
    named = LogitLensAnalysis(word_tokenizer()).layer_predictions(logits, token_position=0, top_k=1)
    assert named[0]["predictions"][0][0] == "<pad>"  # id 0
    with pytest.raises(
        IndexError, match=r"token_position 2 out of range: valid token_positions are 0..1"
    ):
        LogitLensAnalysis().layer_predictions(logits, token_position=2)


def test_convergence_and_trajectory_by_hand():
    logits = hand_logits()
    lens = LogitLensAnalysis()
    logp = torch.log_softmax(logits.normalized[:, -1].double(), dim=-1)
    final = logp[-1]
    expected = (final.exp() * (final - logp)).sum(-1)
    convergence = lens.prediction_convergence(logits)
    assert isinstance(convergence, Float[Tensor, " layer"])
    torch.testing.assert_close(convergence, expected.float(), **EXACT)
    assert convergence[-1].item() == pytest.approx(0.0, abs=1e-7)
    trajectory = lens.token_probability_trajectory(logits, 2)
    assert trajectory.shape == (4, 2)
    torch.testing.assert_close(trajectory, torch.softmax(logits.normalized, -1)[..., 2], **EXACT)


def test_logit_lens_result_and_crossover_by_hand():
    result = LogitLensResult.from_capture(hand_logits(), 2)
    assert result.ranks.tolist() == [1, 0, 1, 0]
    assert result.crossover_layer == 3
    assert result.top1 == ["<0>", "<2>", "<0>", "<2>"]
    assert result.position == 1
    probs = torch.softmax(hand_logits().normalized[:, -1], -1)[:, 2]
    torch.testing.assert_close(result.probs, probs, **EXACT)
    assert result.to_dict()["crossover_layer"] == 3
    # at position 0 token 3 leads at layers 1 and 2 but not 3
    assert LogitLensResult.from_capture(hand_logits(), 3, position=0).crossover_layer is None
    assert crossover_layer([0, 0, 0]) == 0
    assert crossover_layer([3, 0, 0], layers=(4, 7, 9)) == 7
    assert crossover_layer([0, 1]) is None


# ============================================================================================
# A tiny real model, end to end
# ============================================================================================
def test_real_model_shapes_and_entropy_match_the_models_own_attentions(tiny):
    model, adapter = tiny
    ids = torch.tensor([[1, 5, 9, 33, 17, 5, 9, 40, 12]])
    capture = adapter.capture(ids)
    t = ids.shape[1]
    entropy = EntropyAnalysis.token_entropy(capture)
    assert entropy.shape == (2, 4, t)
    assert EntropyAnalysis.effective_rank(capture).shape == (2, 4, t)
    assert NormAnalysis.q_norms(capture).shape == (2, 4, t)
    assert NormAnalysis.k_norms(capture).shape == (2, 2, t)  # grouped-query: 2 KV heads
    assert NormAnalysis.v_norms(capture).shape == (2, 2, t)
    assert CircuitDetection.detect_previous_token_heads(capture).shape == (2, 4)
    assert CircuitDetection.detect_induction_heads(capture).shape == (2, 4)
    assert CorrelationAnalysis.norm_entropy_correlation(capture).shape == (2, 4)
    # direct: -Σ p log p over the model's own (eager) attention probabilities, in float64
    with torch.no_grad():
        attentions = model(ids, output_attentions=True).attentions
    for layer, probs in enumerate(attentions):
        p = probs[0].double()
        direct = -(p * torch.where(p > 0, p.log(), 0.0)).sum(-1)
        torch.testing.assert_close(entropy[layer].double(), direct, **MODEL)
    torch.testing.assert_close(
        NormAnalysis.q_norms(capture), capture.queries.double().norm(dim=-1).float(), **MODEL
    )
    # the per-head correlation agrees with pearson_with_pvalue on the same positions
    r = CorrelationAnalysis.norm_entropy_correlation(capture, ignore_first=2)
    q = NormAnalysis.q_norms(capture)
    r13, _ = CorrelationAnalysis.pearson_with_pvalue(q[1, 3, 2:], entropy[1, 3, 2:])
    assert r[1, 3].item() == pytest.approx(r13, abs=1e-5)
    top = find_extreme_heads(entropy, k=3, mode="min")
    means = entropy.mean(-1)
    assert [s for *_, s in top] == pytest.approx(sorted(means.flatten().tolist())[:3])


def test_real_model_padded_batch_matches_single_rows(tiny):
    _, adapter = tiny
    rows = [[1, 7, 8, 9, 7, 8, 9], [1, 20, 21, 20]]
    ids = torch.tensor([rows[0], [0, 0, 0, *rows[1]]])
    mask = (ids != 0).long()
    batch = adapter.capture(ids, attention_mask=mask)
    singles = [adapter.capture(torch.tensor([row])) for row in rows]
    entropy = EntropyAnalysis.token_entropy(batch)
    assert entropy.shape == (2, 2, 4, 7)
    assert entropy[1, ..., :3].isnan().all()
    torch.testing.assert_close(
        entropy[1, ..., 3:], EntropyAnalysis.token_entropy(singles[1]), **MODEL
    )
    for detect in (
        CircuitDetection.detect_previous_token_heads,
        CircuitDetection.detect_induction_heads,
    ):
        batched = detect(batch)
        assert batched.shape == (2, 2, 4)
        for b in range(2):
            torch.testing.assert_close(batched[b], detect(singles[b]), **MODEL)
    positional = CircuitDetection.detect_positional_heads(batch)
    torch.testing.assert_close(
        positional["bos_score"][1],
        CircuitDetection.detect_positional_heads(singles[1])["bos_score"],
        **MODEL,
    )
    result = CircuitDetection.classify_attention_head(batch, 1, 0)
    assert result["pattern"] in ("induction", "previous_token", "bos", "recent", "unknown")


def test_logit_lens_end_to_end(tiny):
    model, adapter = tiny
    prompt = "w5 w6 w7 w8 w5 w6"
    ids = adapter.tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        final = model(ids).logits[0, -1]
    target = int(final.argmax())
    result = oculi.logit_lens(adapter, prompt, f"w{target}")
    assert result.target_id == target and result.target == f"w{target}"
    assert result.layers == (0, 1)
    torch.testing.assert_close(result.probs[-1], torch.softmax(final, -1)[target], **MODEL)
    assert result.ranks[-1].item() == 0
    assert result.top1[-1] == f"w{target}"
    assert result.crossover_layer in (0, 1)
    other = int(final.argsort()[-5])  # fifth most likely at the last layer
    miss = oculi.logit_lens(adapter, prompt, other)
    assert miss.ranks[-1].item() == 4 and miss.crossover_layer is None
    with pytest.raises(InputError, match="2 tokens"):
        oculi.logit_lens(adapter, prompt, "w5 w6")
    # LogitLensAnalysis on the same prompt agrees
    logits = adapter.capture_logits(ids)
    lens = LogitLensAnalysis(adapter.tokenizer)
    rows = lens.layer_predictions(logits, top_k=3)
    assert rows[-1]["predictions"][0] == (
        f"w{target}",
        pytest.approx(result.probs[-1].item(), abs=1e-5),
    )
    torch.testing.assert_close(
        lens.token_probability_trajectory(logits, target)[:, -1], result.probs, **MODEL
    )
    convergence = lens.prediction_convergence(logits)
    assert convergence.shape == (2,) and convergence[-1].item() == pytest.approx(0.0, abs=1e-6)
    batch = adapter.capture_logits(["w5 w6 w7", "w9 w10"])
    with pytest.raises(InputError, match="reads one sequence, but this capture holds a batch of 2"):
        lens.layer_predictions(batch)
    assert lens.prediction_convergence(batch).shape == (2, 2)


def test_analysis_surface():
    import inspect

    import oculi.analysis as analysis
    from oculi.analysis.logit_lens import logit_lens

    assert oculi.logit_lens is logit_lens
    assert "logit_lens" in oculi.__all__
    public = {
        name
        for name, obj in vars(analysis).items()
        if not name.startswith("_") and not inspect.ismodule(obj)
    }
    assert public == set(analysis.__all__)
