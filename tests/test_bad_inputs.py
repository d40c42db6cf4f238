"""Bad inputs oculi must reject clearly: one test per row of ``shared/BAD_INPUTS.md``.

Each test goes through the public API where a user would make the mistake and checks the
error type and that its message names the problem and the valid range.

Row -> test:

====  ===========================================================================
 1    test_row01_layer_out_of_range
 2    test_row02_head_out_of_range
 3    test_row03_unknown_site_or_hook_name
 5    test_row05_clean_and_corrupt_of_different_token_lengths
 6    test_row06_tensor_of_wrong_shape_dtype_or_device
 7    test_row07_position_past_the_end_or_padding
 8    test_row08_padded_batch_without_attention_mask
 9    test_row09_empty_prompts
10    test_row10_prompt_longer_than_the_context
11    test_row11_answer_of_several_tokens
12    test_row12_token_id_past_the_vocabulary
13    test_row13_bad_steering_vectors
14    test_row14_an_intervention_that_changes_nothing_warns_in_debug_mode
15    test_row15_no_hooks_left_after_a_run_or_an_exception
16    test_row16_generation_steps_must_be_explicit
18    test_row18_model_and_tokenizer_mismatch
22    test_row22_contexts_closed_out_of_order
23    test_row23_a_plain_forward_in_another_thread_beside_an_open_context
24    test_row24_attention_mask_values_and_dtype
25    test_row25_padded_batch_wider_than_the_context
26    test_row26_an_intervention_that_overflows
27    test_row27_half_precision_storage_beyond_its_range_warns_once
29    test_row29_inputs_that_are_not_prompts, test_row29_narrow_integer_ids
30    test_row30_attribution_patching_under_inference_mode
====  ===========================================================================

Rows 4, 17, 19-21 and 28 are not covered here (22-27 in depth: test_reliability.py). Also: strings without a pad token
(test_strings_need_no_pad_token).
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch

import oculi
from models import N_LAYERS, VOCAB, prompt_ids, tiny_model, tiny_tokenizer
from oculi import (
    CaptureConfig,
    InputError,
    LayerIndexError,
    LogitConfig,
    MLPConfig,
    ResidualConfig,
    UnknownSiteError,
    patching,
)
from oculi.capture import bridge
from oculi.intervention import (
    ActivationPatch,
    HeadAblation,
    InterventionContext,
    NoEffectWarning,
    SpectraScaler,
    SteeringVector,
)

PROMPT = "the cat sat on the big red tree and the dog ran"  # 13 tokens with <bos>
SHORT = "the dog ran"  # 4 tokens: left-padded by 9 next to PROMPT
CLEAN, CORRUPT = "the cat gave mary a book", "the cat gave john a book"  # 7 tokens each
METRIC = patching.logit_diff("mary", "john")


@pytest.fixture(scope="module")
def a() -> oculi.Adapter:
    return oculi.attach(tiny_model("llama_gqa"), tiny_tokenizer())  # 4 heads, 2 KV heads


def vec(n: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def sweep(adapter, clean=CLEAN, corrupt=CORRUPT, **kwargs):
    kwargs.setdefault("metric", METRIC)
    return patching.activation_patching(adapter, clean, corrupt, progress=False, **kwargs)


def fresh_tokenizer():
    """A private copy of the tiny tokenizer (the shared one must stay as it is)."""
    return tiny_tokenizer.__wrapped__()


# -- 1 --------------------------------------------------------------------------------------
def test_row01_layer_out_of_range(a):
    def msg(layer: int) -> str:
        return re.escape(f"layer {layer} out of range for a model with 3 layers (0..2)")

    assert a.n_layers == N_LAYERS == 3
    with pytest.raises(LayerIndexError, match=msg(40)):
        a.capture(PROMPT, CaptureConfig(layers=[40]))
    with pytest.raises(IndexError, match=msg(-4)):  # negatives go down to -L
        a.capture_residual(PROMPT, ResidualConfig(layers=[0, -4]))
    with pytest.raises(LayerIndexError, match=msg(3)):
        a.capture_mlp(PROMPT, MLPConfig(layers=[3]))
    with pytest.raises(LayerIndexError, match=msg(5)):
        a.capture_logits(PROMPT, LogitConfig(layers=[5]))
    with pytest.raises(LayerIndexError, match=msg(7)):
        InterventionContext(a, [SteeringVector(vec(), layer=7)])
    with pytest.raises(LayerIndexError, match=msg(-7)):
        sweep(a, layers=[-7])
    with pytest.raises(ValueError, match=re.escape("got the int 40; use [40]")):
        CaptureConfig(layers=40)
    # in range, negatives are normalised
    assert a.capture_residual(PROMPT, ResidualConfig(layers=[-3, -1])).layers == (0, 2)


# -- 2 --------------------------------------------------------------------------------------
def test_row02_head_out_of_range(a):
    with pytest.raises(
        InputError,
        match=re.escape(
            "head 4 out of range for site 'z': the model has n_heads=4, n_kv_heads=2, so 'z' "
            "takes heads 0..3 (n_heads)"
        ),
    ):
        InterventionContext(a, [HeadAblation(layer=1, head=4)])
    # a query head that is no key/value head: key/value sites count n_kv_heads
    with pytest.raises(
        ValueError,
        match=re.escape(
            "head 3 out of range for site 'v': the model has n_heads=4, n_kv_heads=2, so 'v' "
            "takes heads 0..1 (n_kv_heads)"
        ),
    ):
        InterventionContext(a, [ActivationPatch("v", 1, 0, 0.0, head=3)])
    InterventionContext(a, [ActivationPatch("q", 1, 0, 0.0, head=3)])  # fine for queries
    with pytest.raises(ValueError, match=r"head -5 out of range for site 'q'.*0\.\.3 \(n_heads\)"):
        InterventionContext(a, [SpectraScaler(layer=1, head=-5, alpha=2.0)])
    with pytest.raises(ValueError, match=r"head 4 out of range for site 'z'.*n_heads=4"):
        patching.path_patching(a, CLEAN, CORRUPT, metric=METRIC, senders=[(0, 4)], progress=False)
    with pytest.raises(ValueError, match="site 'resid_post' has no heads; leave head=None"):
        InterventionContext(a, [ActivationPatch("resid_post", 1, 0, 0.0, head=0)])


# -- 3 --------------------------------------------------------------------------------------
def test_row03_unknown_site_or_hook_name(a):
    with pytest.raises(
        UnknownSiteError,
        match=re.escape(
            "unknown site 'resid_mid2'; did you mean 'resid_mid'? (valid sites: resid_pre, attn_in,"
        ),
    ):
        ActivationPatch("resid_mid2", 1, 0, 0.0)
    with pytest.raises(KeyError, match=re.escape("unknown site 'mlp_ot'; did you mean 'mlp_out'")):
        sweep(a, site="mlp_ot")
    with pytest.raises(KeyError, match=re.escape("did you mean 'resid_post'?")):
        SteeringVector(vec(), layer=1, site="resid_pst")
    # a TransformerLens name where an oculi site is expected
    with pytest.raises(
        UnknownSiteError,
        match=re.escape(
            "unknown site 'blocks.1.hook_resid_pre': that is a TransformerLens hook name; here a "
            "site is an oculi kind with a separate layer, e.g. site='resid_pre', layer=1"
        ),
    ):
        ActivationPatch("blocks.1.hook_resid_pre", 1, 0, 0.0)
    # TransformerLens names on a capture: suggestions compare the hook part only
    full = a.capture_full(PROMPT)
    with pytest.raises(
        UnknownSiteError,
        match=re.escape(
            "unknown site 'blocks.3.hook_resid_mid2'; did you mean 'blocks.3.hook_resid_mid'? "
            "(hooks per block: hook_resid_pre,"
        ),
    ):
        full["blocks.3.hook_resid_mid2"]
    with pytest.raises(KeyError, match=re.escape("did you mean 'blocks.-1.attn.hook_pattern'?")):
        full["blocks.-1.attn.hook_patern"]
    with pytest.raises(
        KeyError,
        match=re.escape(
            "unknown site 'block.1.hook_resid_pre'; did you mean 'blocks.1.hook_resid_pre'?; "
            "names look like 'blocks.<layer>.<hook>'"
        ),
    ):
        full["block.1.hook_resid_pre"]
    with pytest.raises(KeyError, match=re.escape("(hooks per block:")) as info:
        full["blocks.1.nothing"]  # nothing close: no suggestion
    assert "did you mean" not in str(info.value)


# -- 5 --------------------------------------------------------------------------------------
def test_row05_clean_and_corrupt_of_different_token_lengths(a):
    same = "; position-aligned patching needs prompts of the same token length"
    with pytest.raises(InputError, match=re.escape("clean has 8 tokens, corrupt has 7" + same)):
        sweep(a, clean="the cat gave mary a red book")
    ids = a.prepare(CLEAN).input_ids  # [1, 7], starting with <bos>
    with pytest.raises(
        InputError, match=re.escape("clean has 7 tokens, corrupt has 6 (BOS added to one?)" + same)
    ):
        sweep(a, clean=ids, corrupt=ids[:, 1:])
    with pytest.raises(InputError, match=re.escape("clean has 6 tokens, corrupt has 7 (BOS")):
        patching.path_patching(a, ids[:, 1:], ids, metric=METRIC, progress=False)


# -- 6 --------------------------------------------------------------------------------------
def test_row06_tensor_of_wrong_shape_dtype_or_device(a):
    with pytest.raises(
        ValueError,
        match=re.escape(
            "value has shape [32], expected a tensor broadcastable to the selected slice "
            "[batch, d_model=64] of site 'resid_post'"
        ),
    ):
        InterventionContext(a, [ActivationPatch("resid_post", 1, 3, torch.zeros(32))])
    with pytest.raises(
        ValueError,
        match=re.escape("value has shape [3, 16], expected a tensor broadcastable to the selected")
        + r".*"
        + re.escape("[batch, positions=2, d_head=16] of site 'z'"),
    ):
        InterventionContext(a, [ActivationPatch("z", 1, [1, 2], torch.zeros(3, 16), head=0)])
    with pytest.raises(
        ValueError,
        match=re.escape("value has dtype torch.float64, expected the model's torch.float32"),
    ):
        InterventionContext(
            a, [ActivationPatch("resid_post", 1, 3, torch.zeros(64, dtype=torch.float64))]
        )
    with pytest.raises(
        ValueError, match=re.escape("value is on meta, expected the model's device cpu")
    ):
        InterventionContext(
            a, [ActivationPatch("resid_post", 1, 3, torch.zeros(64, device="meta"))]
        )
    with pytest.raises(ValueError, match="value must be a floating tensor, got dtype torch.int64"):
        ActivationPatch("resid_post", 1, 3, torch.zeros(64, dtype=torch.long))
    with pytest.raises(
        ValueError,
        match=re.escape("vector has dtype torch.float64, expected the model's torch.float32"),
    ):
        InterventionContext(a, [SteeringVector(vec().double(), layer=1)])
    # rows of a per-row value against the batch, checked before any layer runs
    with (
        pytest.raises(
            ValueError,
            match=re.escape("value has shape [3, 2, 64], expected")
            + r".*"
            + re.escape("[batch=2, positions=2, d_model=64]"),
        ),
        InterventionContext(a, [ActivationPatch("resid_pre", 1, [11, 12], torch.zeros(3, 2, 64))]),
    ):
        a.forward([PROMPT, SHORT])


# -- 7 --------------------------------------------------------------------------------------
def test_row07_position_past_the_end_or_padding(a):
    for position in (13, -14):
        with (
            pytest.raises(
                IndexError,
                match=re.escape(
                    f"position {position} out of range for a sequence of 13 tokens "
                    "(valid positions 0..12, or -13..-1 from the end)"
                ),
            ),
            InterventionContext(a, [ActivationPatch("resid_pre", 1, position, 0.0)]),
        ):
            a.forward(PROMPT)
    padding = "is padding in row 1 (its attention_mask is 0); patch a real token"
    with (
        pytest.raises(ValueError, match=re.escape("position 2 " + padding)),
        InterventionContext(a, [ActivationPatch("resid_pre", 1, [2, 12], 0.0)]),
    ):
        a.forward([PROMPT, SHORT])  # row 1 is left-padded: columns 0..8 are padding
    with (
        pytest.raises(ValueError, match=re.escape("position 0 " + padding)),
        InterventionContext(a, [HeadAblation(layer=1, head=0, positions=[0])]),
    ):
        a.capture([PROMPT, SHORT])
    with pytest.raises(
        IndexError, match=re.escape("position 7 out of range for a prompt of 7 tokens (0..6)")
    ):
        sweep(a, positions=[0, 7])
    with pytest.raises(
        IndexError,
        match=re.escape(
            "position 7 out of range for the corrupt prompt of 7 tokens (valid positions 0..6"
        ),
    ):
        sweep(a, metric=patching.logit_diff("mary", "john", position=7))
    with pytest.raises(
        IndexError, match=re.escape("position -8 out of range for the clean prompt")
    ):
        patching.attribution_patching(
            a, CLEAN, CORRUPT, metric=patching.logit_diff("mary", "john", position=-8)
        )


# -- 8 --------------------------------------------------------------------------------------
def test_row08_padded_batch_without_attention_mask(a):
    batch = a.prepare([PROMPT, SHORT])
    ids, mask = batch.input_ids, batch.attention_mask
    assert ids[1, :9].tolist() == [0] * 9  # <pad> on the left
    no_mask = re.escape(
        "padded batch without attention_mask: rows start or end with the pad token 0; pass "
        "attention_mask="
    )
    with pytest.raises(InputError, match=no_mask):
        a.capture(ids)
    with pytest.raises(InputError, match=no_mask):
        a.forward({"input_ids": ids})
    with pytest.raises(InputError, match=no_mask):
        sweep(a, clean=ids, corrupt=ids)
    with pytest.raises(
        InputError,
        match=re.escape("attention_mask has shape [13], expected [2, 13] like input_ids"),
    ):
        a.forward(ids, attention_mask=mask[0])
    with pytest.raises(InputError, match=re.escape("attention_mask row 1 has padding between")):
        holes = mask.clone()
        holes[1, 10] = 0
        a.forward(ids, attention_mask=holes)
    # left padding without position ids: derived from the mask, so real tokens keep theirs
    assert batch.position_ids[1].tolist() == [0] * 9 + [0, 1, 2, 3]
    padded = a.forward(ids, attention_mask=mask)
    torch.testing.assert_close(padded[1, 9:], a.forward(SHORT), atol=1e-5, rtol=1e-5)


# -- 9 --------------------------------------------------------------------------------------
def test_row09_empty_prompts(a):
    with pytest.raises(InputError, match="prompt 0 is empty after tokenization"):
        a.capture("")
    with pytest.raises(InputError, match="prompt 1 is empty after tokenization"):
        a.forward([PROMPT, ""])
    with pytest.raises(
        InputError,
        match=re.escape(
            "prompt 2 is empty after tokenization: '   ' gives only the special tokens "
            "['<bos>']; a prompt needs at least one token of content"
        ),
    ):
        a.capture_residual([PROMPT, SHORT, "   "])
    with pytest.raises(InputError, match="prompt 0 is empty after tokenization"):
        a.forward(torch.zeros((1, 0), dtype=torch.long))
    ids = a.prepare([PROMPT, SHORT])
    empty_row = ids.attention_mask.clone()
    empty_row[1] = 0
    with pytest.raises(InputError, match="prompt 1 is empty after tokenization"):
        a.forward(ids.input_ids, attention_mask=empty_row)
    with pytest.raises(InputError, match="no input given: an empty list of prompts"):
        a.forward([])
    # only BOS where a next-token metric needs content
    bos = torch.tensor([[1]])
    with pytest.raises(
        InputError,
        match=re.escape(
            "clean prompt is empty after tokenization: only the BOS token [1]; a next-token "
            "metric needs at least one token of content"
        ),
    ):
        sweep(a, clean=bos, corrupt=bos)
    # unknown words are content (the <unk> token is not "empty")
    assert a.prepare("zebra").input_ids.tolist() == [[1, 3]]


# -- 10 -------------------------------------------------------------------------------------
def test_row10_prompt_longer_than_the_context(a):
    assert a.max_positions == 64
    context = re.escape("65 tokens > context 64 (the model's max_position_embeddings)")
    with pytest.raises(InputError, match=context):
        a.capture(" ".join(["cat"] * 64))  # with <bos>: 65 tokens
    with pytest.raises(InputError, match=context):
        oculi.attach(tiny_model("gpt2")).forward(prompt_ids(65))  # learned positions (n_positions)
    assert a.capture(" ".join(["cat"] * 63), CaptureConfig(layers=[0])).n_tokens == 64
    with pytest.raises(
        InputError,
        match=re.escape(
            "13 prompt tokens + max_new_tokens=60 > context 64 (the model's "
            "max_position_embeddings); lower max_new_tokens to at most 51"
        ),
    ):
        a.generate(PROMPT, max_new_tokens=60)
    # the tokenizer's model_max_length is not the limit
    tok = fresh_tokenizer()
    tok.model_max_length = 8
    assert oculi.attach(tiny_model("llama_gqa"), tok).forward(PROMPT).shape == (13, VOCAB)


# -- 11 -------------------------------------------------------------------------------------
def test_row11_answer_of_several_tokens(a):
    with pytest.raises(
        InputError,
        match=re.escape("'mary john' is 2 tokens ['mary', 'john'], but one token is needed"),
    ):
        sweep(a, metric=patching.logit_diff("mary john", "john"))
    with pytest.raises(InputError, match=re.escape("'the cat' is 2 tokens")):
        patching.path_patching(
            a, CLEAN, CORRUPT, metric=patching.probability("the cat"), progress=False
        )
    # a word outside a word-level vocabulary is one token too, but the unknown one
    with pytest.raises(
        InputError,
        match=re.escape(
            "'rome' is not in the tokenizer's vocabulary: it tokenizes to the unknown token '<unk>' (id 3)"
        ),
    ):
        sweep(a, metric=patching.logit_diff("paris", "rome"))
    assert a.to_single_token("<unk>") == 3  # asking for the unknown token itself is fine
    # a tokenizer that folds a leading space into the token: the message says so
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "wash": 1, "##ington": 2, " washington": 3}
    wordpiece = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    spaced = oculi.attach(
        tiny_model("llama_gqa"),
        PreTrainedTokenizerFast(tokenizer_object=wordpiece, unk_token="[UNK]"),
    )
    with pytest.raises(
        InputError,
        match=re.escape(
            "'washington' is 2 tokens ['wash', '##ington'], but one token is needed; "
            "' washington' (with a leading space) is one token"
        ),
    ):
        patching.logit_diff("washington", 1).bind(spaced)
    assert patching.logit_diff(" washington", 1).bind(spaced).token_ids == (3, 1)


# -- 12 -------------------------------------------------------------------------------------
def test_row12_token_id_past_the_vocabulary(a):
    n = len(tiny_tokenizer())
    assert n < a.d_vocab == VOCAB  # embedding rows n..95 are padding, never trained
    outside = re.escape(f"token id {n} is outside the vocabulary (valid ids 0..{n - 1})")
    with pytest.raises(InputError, match=outside):
        a.capture(torch.tensor([1, 5, n]))
    with pytest.raises(
        InputError, match=re.escape(f"token id -1 is outside the vocabulary (valid ids 0..{n - 1})")
    ):
        a.forward(torch.tensor([1, -1, 5]))
    with pytest.raises(
        InputError, match=re.escape(f"token id {n} is outside the vocabulary (0..{n - 1})")
    ):
        sweep(a, metric=patching.logit_diff(n, 5))
    # without a tokenizer the limit is the embedding
    with pytest.raises(
        InputError, match=re.escape("token id 96 is outside the vocabulary (valid ids 0..95)")
    ):
        oculi.attach(tiny_model("llama_gqa")).forward(torch.tensor([1, 96]))


# -- 13 -------------------------------------------------------------------------------------
def test_row13_bad_steering_vectors(a):
    with pytest.raises(
        ValueError, match=re.escape("vector has width 32, expected d_model=64 (shape [64])")
    ):
        InterventionContext(a, [SteeringVector(vec(32), layer=1)])
    with pytest.raises(
        ValueError, match=re.escape("SteeringVector(layer=1): vector contains NaN or Inf")
    ):
        SteeringVector(torch.full((64,), float("nan")), layer=1)
    with pytest.raises(ValueError, match="vector contains NaN or Inf"):
        SteeringVector(torch.tensor([float("inf")] + [0.0] * 63), layer=1)
    with pytest.raises(ValueError, match="vector has zero norm, so steering would do nothing"):
        SteeringVector(torch.zeros(64), layer=1)
    with pytest.raises(
        ValueError, match=re.escape("vector must be 1-D [d_model], got shape [2, 64]")
    ):
        SteeringVector(torch.ones(2, 64), layer=1)
    with pytest.raises(ValueError, match="coefficient must be a finite number, got inf"):
        SteeringVector(vec(), layer=1, coefficient=float("inf"))
    with pytest.raises(ValueError, match="same mean at layer 1 .*the steering vector is zero"):
        SteeringVector.from_contrast(a, ["the cat"], ["the cat"], layer=1)


# -- 14 -------------------------------------------------------------------------------------
def test_row14_an_intervention_that_changes_nothing_warns_in_debug_mode(a, monkeypatch):
    monkeypatch.delenv("OCULI_DEBUG", raising=False)
    same = a.capture_residual(PROMPT).post_mlp[1]
    noop = ActivationPatch("resid_post", 1, None, same)  # writes what is already there
    with (
        pytest.warns(
            NoEffectWarning,
            match=re.escape(
                "ActivationPatch(site='resid_post', layer=1, position=None, mode='replace') changed nothing in a forward pass"
            ),
        ),
        InterventionContext(a, [noop], check_effect=True),
    ):
        a.forward(PROMPT)
    with warnings.catch_warnings():  # off by default; a real edit never warns
        warnings.simplefilter("error")
        with InterventionContext(a, [noop]):
            a.forward(PROMPT)
        with InterventionContext(a, [HeadAblation(layer=1, head=0)], check_effect=True):
            a.forward(PROMPT)
    monkeypatch.setenv("OCULI_DEBUG", "1")
    with (
        pytest.warns(
            NoEffectWarning, match=r"SteeringVector\(layer=1, coefficient=0.0\) changed nothing"
        ),
        InterventionContext(a, [SteeringVector(vec(), layer=1, coefficient=0.0)]),
    ):
        a.forward(PROMPT)
    with (
        pytest.warns(
            NoEffectWarning, match=r"SpectraScaler\(layer=1, head=0, alpha=1.0\) is a no-op"
        ),
        InterventionContext(a, [SpectraScaler(1, 0, 1.0)]),
    ):
        a.forward(PROMPT)


# -- 15 -------------------------------------------------------------------------------------
def _hooks(model) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


def _impls(adapter) -> list[str]:
    return [c._attn_implementation for c in adapter.attention_configs]


def test_row15_no_hooks_left_after_a_run_or_an_exception(a):
    model = a.model
    hooks, impls = _hooks(model), _impls(a)
    interventions = [
        SpectraScaler(1, 0, 2.0),
        HeadAblation(layer=2, head=1),
        SteeringVector(vec(), layer=0),
    ]

    def clean() -> None:
        assert _hooks(model) == hooks
        assert _impls(a) == impls
        assert not bridge._ACTIVE

    a.capture_full(PROMPT)
    clean()
    with InterventionContext(a, interventions):
        assert _hooks(model) > hooks
        a.capture_full(PROMPT)
        a.generate(PROMPT, max_new_tokens=2)
    clean()
    sweep(a, site="z", per_head=True)
    clean()
    # errors raised inside a forward, with oculi's hooks and the attention bridge in place
    with (
        pytest.raises(ValueError, match="is padding in row 1"),
        InterventionContext(a, [*interventions, ActivationPatch("q", 1, 0, 0.0)]),
    ):
        a.generate([PROMPT, SHORT], max_new_tokens=2)
    clean()

    def boom(*_):
        raise RuntimeError("boom")

    handle = a.part(2, a.anatomy.attn).register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            a.capture(PROMPT)
        with pytest.raises(RuntimeError, match="boom"), InterventionContext(a, interventions):
            a.forward(PROMPT)
        with pytest.raises(RuntimeError, match="boom"):
            sweep(a, site="pattern")
    finally:
        handle.remove()
    clean()


# -- 16 -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("steps", "got"),
    [
        (
            3,
            "got the int 3, which is ambiguous: write range(3) for the first 3 steps or [3] for step 3 alone",
        ),
        (None, "got None"),
        (True, "got True"),
        ("first", "got the string 'first'"),
        (2.5, "got float 2.5"),
        (range(0), "got an empty selection range(0, 0), which would never apply"),
        ([-1, 2], "got step -1, but steps count from 0 (the prompt pass)"),
    ],
)
def test_row16_generation_steps_must_be_explicit(a, steps, got):
    with (
        pytest.raises(
            ValueError,
            match=re.escape(
                "steps must be 'all', a range or a list of generation step indices (0 = the "
                "prompt pass, k = the forward that feeds the k-th generated token); " + got
            ),
        ),
        InterventionContext(a, [SteeringVector(vec(), layer=1, steps=steps)]),
    ):
        a.generate(PROMPT, max_new_tokens=3)


def test_row16_explicit_steps_generate(a):
    plain = a.generate(PROMPT, max_new_tokens=3)
    for steps in ("all", range(1, 3), [0, 2]):
        with InterventionContext(a, [SteeringVector(vec(), 1, coefficient=0.0, steps=steps)]):
            assert a.generate(PROMPT, max_new_tokens=3) == plain


# -- 18 -------------------------------------------------------------------------------------
def test_row18_model_and_tokenizer_mismatch():
    big = fresh_tokenizer()
    big.add_tokens([f"extra{i}" for i in range(40)])
    n = len(big)
    assert n > VOCAB
    with pytest.raises(
        InputError,
        match=re.escape(
            f"tokenizer has {n} tokens but the model's embedding has 96 rows (a tokenizer for it "
            "has at most 96): they do not belong together"
        ),
    ):
        oculi.attach(tiny_model("llama_gqa"), big)
    bare = oculi.attach(tiny_model("llama_gqa"))  # no tokenizer: ids work, strings do not
    assert bare.forward(prompt_ids()).shape == (11, VOCAB)
    needs = re.escape("needs a tokenizer; attach one (oculi.attach(model, tokenizer))")
    with pytest.raises(InputError, match=re.escape("strings need a tokenizer; attach one")):
        bare.capture(PROMPT)
    with pytest.raises(InputError, match="generate decodes its output and " + needs):
        bare.generate(prompt_ids(), max_new_tokens=2)
    with pytest.raises(InputError, match="to_str_tokens " + needs):
        bare.to_str_tokens(prompt_ids())
    with pytest.raises(InputError, match="a string answer needs a tokenizer; pass a token id"):
        sweep(bare, clean=prompt_ids(7, seed=1), corrupt=prompt_ids(7, seed=2))


# -- strings without a pad token ------------------------------------------------------------
def test_strings_need_no_pad_token(a):
    tok = fresh_tokenizer()
    tok.pad_token = None
    assert tok.pad_token_id is None and tok.eos_token_id == 2
    b = oculi.attach(tiny_model("llama_gqa"), tok)
    # one string: no padding, so no pad token needed
    assert torch.equal(b.prepare(SHORT).input_ids, a.prepare(SHORT).input_ids)
    assert torch.equal(b.forward(SHORT), a.forward(SHORT))
    # several: padded with EOS on the tokenizer's side; the mask hides it
    batch, ref = b.prepare([PROMPT, SHORT]), a.prepare([PROMPT, SHORT])
    assert batch.input_ids[1, :9].tolist() == [2] * 9
    assert torch.equal(batch.attention_mask, ref.attention_mask)
    real = ref.attention_mask.bool()
    assert torch.equal(batch.input_ids[real], ref.input_ids[real])
    torch.testing.assert_close(
        b.forward([PROMPT, SHORT])[real], a.forward([PROMPT, SHORT])[real], atol=1e-6, rtol=0
    )
    assert b.generate([PROMPT, SHORT], max_new_tokens=2) == a.generate(
        [PROMPT, SHORT], max_new_tokens=2
    )


# -- 22 -------------------------------------------------------------------------------------
def test_row22_contexts_closed_out_of_order(a):
    """c1 then c2 opened, c1 closed first: c2 still applies alone; the model is restored at
    the last close (before: c2 stopped applying and the model stayed on "oculi")."""
    ids, impls, hooks = a.prepare(PROMPT).input_ids[0], _impls(a), _hooks(a.model)
    steer, scale = SteeringVector(vec(), 0, coefficient=3.0), SpectraScaler(1, 0, 4.0)
    with InterventionContext(a, [steer]):
        want = a.forward(ids)  # steering alone
    c1, c2 = InterventionContext(a, [scale]), InterventionContext(a, [steer])
    c1.__enter__()
    c2.__enter__()
    c1.__exit__(None, None, None)
    try:
        assert torch.equal(a.forward(ids), want)
    finally:
        c2.__exit__(None, None, None)
    assert _impls(a) == impls and not bridge._ACTIVE
    assert _hooks(a.model) == hooks


# -- 23 -------------------------------------------------------------------------------------
def test_row23_a_plain_forward_in_another_thread_beside_an_open_context(a):
    import threading

    ids = a.prepare(PROMPT).input_ids[0]
    plain = a.forward(ids)
    seen: list[torch.Tensor] = []
    with InterventionContext(a, [SpectraScaler(1, 0, 4.0), SteeringVector(vec(), 0)]):
        worker = threading.Thread(target=lambda: seen.append(a.forward(ids)))
        worker.start()
        worker.join()
        assert not torch.allclose(a.forward(ids), plain, atol=1e-3)  # this thread: intervened
    torch.testing.assert_close(seen[0], plain, rtol=1e-5, atol=1e-5)  # the other: untouched


# -- 24 -------------------------------------------------------------------------------------
def test_row24_attention_mask_values_and_dtype(a):
    batch = a.prepare([PROMPT, SHORT])
    ids, mask = batch.input_ids, batch.attention_mask
    form = "it must be an integer or bool tensor of 1 (real token) and 0 (padding)"
    negative = mask.clone()
    negative[1, 0] = -1  # a padding column marked -1
    with pytest.raises(InputError, match=re.escape(f"attention_mask holds values [2]; {form}")):
        a.forward(ids, attention_mask=mask * 2)
    with pytest.raises(InputError, match=re.escape(f"attention_mask holds values [-1]; {form}")):
        a.capture_full(ids, attention_mask=negative)
    with pytest.raises(
        InputError, match=re.escape(f"attention_mask has dtype torch.float32; {form}")
    ):
        a.forward(ids, attention_mask=mask * 0.5)  # was "prompt 0 is empty"
    with pytest.raises(InputError, match=re.escape("convert a 0/1 float mask with .long()")):
        a.forward(ids, attention_mask=mask.float())
    # bool masks and masks in a mapping are read the same as integer ones
    want = a.forward(ids, attention_mask=mask)
    assert torch.equal(a.forward(ids, attention_mask=mask.bool()), want)
    assert torch.equal(a.forward({"input_ids": ids, "attention_mask": mask.tolist()}), want)
    with pytest.raises(InputError, match=re.escape("attention_mask holds values [3]")):
        a.forward({"input_ids": ids, "attention_mask": (mask * 3).tolist()})


# -- 25 -------------------------------------------------------------------------------------
def test_row25_padded_batch_wider_than_the_context(a):
    ids = torch.full((2, 70), 0, dtype=torch.long)
    ids[:, -10:] = a.prepare("the cat sat on the big red tree and the").input_ids[0, :10]
    mask = (torch.arange(70) >= 60).long().expand(2, -1)
    with pytest.raises(
        InputError,
        match=re.escape(
            "the padded batch is 70 columns wide > context 64 (the model's "
            "max_position_embeddings), although its longest prompt has 10 tokens"
        ),
    ):
        a.capture_full(ids, attention_mask=mask)
    # the same rows trimmed to the context run
    assert a.forward(ids[:, -64:], attention_mask=mask[:, -64:]).shape == (2, 64, VOCAB)


# -- 26 -------------------------------------------------------------------------------------
def test_row26_an_intervention_that_overflows(a):
    hooks = _hooks(a.model)
    huge = SpectraScaler(1, 0, 1e38)
    with (
        pytest.raises(
            oculi.NonFiniteError, match=re.escape(f"{huge!r} overflowed q of layer 1: it wrote inf")
        ),
        InterventionContext(a, [huge]),
    ):
        a.forward(PROMPT)
    overflow = r"coefficient 1e\+38 times the vector .* overflows"
    with (
        pytest.raises(ValueError, match=overflow),
        InterventionContext(a, [SteeringVector(vec(), 0, coefficient=1e38)]),
    ):
        pass
    assert _hooks(a.model) == hooks and not bridge._ACTIVE


# -- 27 -------------------------------------------------------------------------------------
def test_row27_half_precision_storage_beyond_its_range_warns_once(a):
    steer = SteeringVector(torch.ones(64), 0, coefficient=1e5)  # residual values ~1e5 > 65504
    half = ResidualConfig(layers=[0, 1], storage_dtype=torch.float16)
    with InterventionContext(a, [steer]), pytest.warns(oculi.StorageRangeWarning) as caught:
        residual = a.capture_residual(PROMPT, half)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "'resid_post' at layers [0, 1]" in message and "float16 max 6.55e+04" in message
    assert "storage_dtype=torch.float32" in message
    assert torch.isinf(residual.post_mlp).any()  # what the warning is about
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # within range: no warning
        a.capture_residual(PROMPT, half)


# -- 29 -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("bad", "says"),
    [
        (None, "no input given (None); pass a string, a list of strings, token ids"),
        ((t for t in [PROMPT]), "got a generator (materialise it with list(...) first)"),
        (iter([1, 2]), "got a list_iterator (materialise it with list(...) first)"),
        (b"the cat", "got bytes, not text: decode it first"),
        ("the \ud800 cat", "holds the lone surrogate '\\ud800' at character 4"),
        ([PROMPT, 3], "a list mixing strings and other values"),
        ([[4, 5, 6], [4, 5]], "rows of different lengths must be padded (or passed as strings)"),
        (torch.tensor([4.0, 5.0]), "token ids must be integers (int64 as tokenizers return"),
        (torch.tensor([True, False]), "token ids must be integers"),
        ({4, 5}, "got a set; inputs are a string"),
    ],
)
def test_row29_inputs_that_are_not_prompts(a, bad, says):
    with pytest.raises(InputError, match=re.escape(says)):
        a.capture_full(bad)


def test_row29_narrow_integer_ids(a):
    # int8 holds every id of a 96-token vocabulary: read as int64
    ids = a.prepare(PROMPT).input_ids[0]
    assert torch.equal(a.forward(ids.to(torch.int8)), a.forward(ids))
    # ... but not of a 262k-token one: ids above 127 would have wrapped
    with pytest.raises(
        InputError,
        match=re.escape("token ids of dtype torch.int8 hold values up to 127, but the vocabulary"),
    ):
        oculi.capture.inputs.prepare_batch(
            ids.to(torch.int8),
            tokenizer=None,
            device=torch.device("cpu"),
            vocab_size=262_144,
            max_positions=None,
        )


# -- 30 -------------------------------------------------------------------------------------
def test_row30_attribution_patching_under_inference_mode(a):
    want = patching.attribution_patching(a, CLEAN, CORRUPT, metric=METRIC)
    with torch.inference_mode():
        got = patching.attribution_patching(a, CLEAN, CORRUPT, metric=METRIC)
        ids = a.prepare(CLEAN).input_ids  # an inference tensor, used outside it below
    assert torch.equal(got.values, want.values)
    with torch.no_grad():
        assert torch.equal(
            patching.attribution_patching(a, CLEAN, CORRUPT, metric=METRIC).values, want.values
        )
    outside = patching.attribution_patching(
        a, ids[0], a.prepare(CORRUPT).input_ids[0], metric=METRIC
    )
    assert torch.equal(outside.values, want.values)
