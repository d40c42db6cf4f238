"""TransformerLens hook names on a FullCapture: each alias reads the right tensor, or says why not.

The expected tensor of every name in ``TL_ALIASES`` is written out here by hand (not taken
from oculi's own table), following TransformerLens's ``TransformerBlock``: ``hook_q``/``hook_k``
are pre-rotary, ``hook_rot_q``/``hook_rot_k`` rotated, ``mlp.hook_pre`` the pre-activation
(the gate of a gated MLP), ``hook_mlp_out`` what the MLP adds to the residual.
"""

from __future__ import annotations

import re

import pytest
import torch

import oculi
from models import N_LAYERS, prompt_ids, tiny_model
from oculi import CaptureConfig, LayerIndexError, MLPConfig, ResidualConfig, UnknownSiteError
from oculi.capture.sites import TL_ALIASES

ALL_ATTENTION = CaptureConfig(capture_head_outputs=True, capture_head_contributions=True)
ALL_RESIDUAL = ResidualConfig(capture_attn_out=True, capture_mlp_out=True)


@pytest.fixture(scope="module")
def llama():
    return oculi.attach(tiny_model("llama_gqa"))


@pytest.fixture(scope="module")
def post(llama):
    """Everything, with rotated queries and keys."""
    return llama.capture_full(prompt_ids(), attention=ALL_ATTENTION, residual=ALL_RESIDUAL)


@pytest.fixture(scope="module")
def pre(llama):
    """Queries and keys before rotary."""
    return llama.capture_full(prompt_ids(), attention=CaptureConfig(qk_stage="pre_rope"))


# hook (after "blocks.<l>.") -> (capture fixture, tensor of all layers)
EXPECTED = {
    "hook_resid_pre": ("post", lambda f: f.residual.pre_attn),
    "attn.hook_q": ("pre", lambda f: f.attention.queries),
    "attn.hook_k": ("pre", lambda f: f.attention.keys),
    "attn.hook_rot_q": ("post", lambda f: f.attention.queries),
    "attn.hook_rot_k": ("post", lambda f: f.attention.keys),
    "attn.hook_v": ("post", lambda f: f.attention.values),
    "attn.hook_pattern": ("post", lambda f: f.attention.patterns),
    "attn.hook_z": ("post", lambda f: f.attention.head_outputs),
    "attn.hook_result": ("post", lambda f: f.attention.head_contributions),
    "hook_attn_out": ("post", lambda f: f.residual.attn_out),
    "hook_resid_mid": ("post", lambda f: f.residual.post_attn),
    "ln2.hook_normalized": ("post", lambda f: f.residual.pre_mlp),
    "mlp.hook_pre": ("post", lambda f: f.mlp.gate),
    "mlp.hook_pre_linear": ("post", lambda f: f.mlp.up),
    "mlp.hook_post": ("post", lambda f: f.mlp.post_activation),
    "hook_mlp_out": ("post", lambda f: f.residual.mlp_out),
    "hook_resid_post": ("post", lambda f: f.residual.post_mlp),
}
# TransformerLens's hook_mlp_in is resid_mid copied before ln2 (the un-normalised MLP input),
# resid_pre in parallel-attention blocks; tested below.
NOT_STORED = {"ln1.hook_normalized"}


def test_the_table_covers_every_alias():
    assert set(EXPECTED) | {"hook_mlp_in"} | NOT_STORED == set(TL_ALIASES)


@pytest.mark.parametrize("hook", sorted(EXPECTED))
@pytest.mark.parametrize("layer", range(N_LAYERS))
def test_each_alias_reads_its_tensor(request, hook, layer):
    fixture, tensor = EXPECTED[hook]
    full = request.getfixturevalue(fixture)
    got = full[f"blocks.{layer}.{hook}"]
    assert torch.equal(got, tensor(full)[layer])
    assert got.data_ptr() == tensor(full)[layer].data_ptr()  # a view, not a copy


def test_hook_mlp_in_is_the_residual_entering_the_mlp(post):
    assert torch.equal(post["blocks.1.hook_mlp_in"], post.residual.post_attn[1])
    assert not torch.equal(post["blocks.1.hook_mlp_in"], post.residual.pre_mlp[1])


def test_hook_mlp_in_of_parallel_blocks_is_the_block_input():
    """GPT-NeoX with a parallel residual: the MLP reads the block input (TL: resid_pre)."""
    full = oculi.attach(tiny_model("neox_parallel")).capture_full(prompt_ids())
    assert torch.equal(full["blocks.1.hook_mlp_in"], full.residual.pre_attn[1])
    sequential = oculi.attach(tiny_model("neox_sequential")).capture_full(prompt_ids())
    assert torch.equal(sequential["blocks.1.hook_mlp_in"], sequential.residual.post_attn[1])
    # a capture that does not record which kind of block its GPT-NeoX model has
    del full.metadata["parallel"]
    with pytest.raises(UnknownSiteError, match=r"does not record which its model has"):
        full["blocks.1.hook_mlp_in"]


def test_attention_input_is_not_stored(post):
    with pytest.raises(
        UnknownSiteError,
        match=re.escape(
            "'blocks.0.ln1.hook_normalized' (attn_in, the normalised input of attention) is not "
            "stored in capture structures; per block a FullCapture holds hook_resid_pre, attn.hook_q,"
        ),
    ):
        post["blocks.0.ln1.hook_normalized"]


def test_mlp_out_falls_back_to_the_mlp_output(llama, post):
    """Without an output norm, the MLP's output is what joins the residual."""
    no_resid_copy = llama.capture_full(prompt_ids(), attention=ALL_ATTENTION, logits=None)
    assert no_resid_copy.residual.mlp_out is None
    assert torch.equal(no_resid_copy["blocks.0.hook_mlp_out"], no_resid_copy.mlp.output[0])
    assert torch.equal(no_resid_copy["blocks.0.hook_mlp_out"], post.residual.mlp_out[0])


# -- layers ------------------------------------------------------------------------------
def test_negative_blocks_count_from_the_last_layer(post):
    for layer in range(-N_LAYERS, 0):
        assert torch.equal(post[f"blocks.{layer}.hook_resid_post"], post.residual.post_mlp[layer])
        assert torch.equal(
            post[f"blocks.{layer}.attn.hook_pattern"], post.attention.patterns[layer]
        )


@pytest.mark.parametrize("block", [3, 40, -4])
def test_blocks_outside_the_model(post, block):
    with pytest.raises(
        LayerIndexError,
        match=re.escape(
            f"'blocks.{block}.hook_resid_pre': layer {block} out of range for a model with 3 layers (0..2)"
        ),
    ):
        post[f"blocks.{block}.hook_resid_pre"]


def test_a_layer_that_was_not_captured(llama):
    full = llama.capture_full(
        prompt_ids(), attention=CaptureConfig(layers=[-1]), mlp=None, logits=None
    )
    assert torch.equal(full["blocks.-1.attn.hook_pattern"], full.attention.patterns[0])
    with pytest.raises(
        LayerIndexError,
        match=re.escape(
            "'blocks.0.attn.hook_pattern': layer 0 was not captured; the attention part holds layers [2]"
        ),
    ):
        full["blocks.0.attn.hook_pattern"]


def test_batched_captures_keep_the_batch_dimension(llama):
    ids = torch.stack([prompt_ids(seed=3), prompt_ids(seed=4)])
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    full = llama.capture_full(
        ids, attention_mask=mask, attention=ALL_ATTENTION, residual=ALL_RESIDUAL
    )
    pattern = full["blocks.-1.attn.hook_pattern"]
    assert pattern.shape == (2, 4, ids.shape[1], ids.shape[1])
    assert torch.equal(pattern, full.attention.patterns[:, 2])
    assert torch.equal(full["blocks.1.hook_resid_mid"], full.residual.post_attn[:, 1])
    assert torch.equal(full["blocks.0.mlp.hook_post"], full.mlp.post_activation[:, 0])
    assert torch.equal(full["blocks.2.attn.hook_result"], full.attention.head_contributions[:, 2])


# -- names that do not work --------------------------------------------------------------
def test_unknown_names_suggest_close_ones(post):
    with pytest.raises(UnknownSiteError) as info:
        post["blocks.3.hook_resid_mid2"]
    assert isinstance(info.value, KeyError)
    assert str(info.value).startswith(
        "unknown site 'blocks.3.hook_resid_mid2'; did you mean 'blocks.3.hook_resid_mid'"
    )
    with pytest.raises(KeyError, match=r"; did you mean 'blocks\.1\.attn\.hook_pattern'"):
        post["blocks.1.attn.hook_patern"]
    with pytest.raises(KeyError, match=r"names look like 'blocks.<layer>.<hook>'"):
        post["hook_resid_pre"]
    with pytest.raises(TypeError, match="FullCapture is indexed by TransformerLens hook names"):
        post[3]


@pytest.mark.parametrize(
    ("name", "how"),
    [
        ("blocks.0.attn.hook_z", "CaptureConfig(capture_head_outputs=True)"),
        ("blocks.0.attn.hook_result", "CaptureConfig(capture_head_contributions=True)"),
        ("blocks.0.hook_attn_out", "ResidualConfig(capture_attn_out=True)"),
        ("blocks.1.attn.hook_v", "CaptureConfig(capture_values=True)"),
        ("blocks.2.mlp.hook_pre", "MLPConfig(capture_gate=True)"),
    ],
)
def test_names_of_fields_not_captured(llama, name, how):
    full = llama.capture_full(
        prompt_ids(),
        attention=CaptureConfig(capture_values=False),
        mlp=MLPConfig(capture_gate=False),
    )
    with pytest.raises(
        UnknownSiteError,
        match=re.escape(f"{name!r} (")
        + r"\w+\) was not captured; capture it with "
        + re.escape(how),
    ):
        full[name]


def test_names_of_parts_not_captured(llama):
    full = llama.capture_full(prompt_ids(), attention=None, residual=None, mlp=None)
    with pytest.raises(
        UnknownSiteError,
        match=re.escape(
            "'blocks.0.attn.hook_pattern' (pattern) was not captured; capture it with "
            "CaptureConfig(capture_patterns=True)"
        ),
    ):
        full["blocks.0.attn.hook_pattern"]
    with pytest.raises(
        UnknownSiteError,
        match=re.escape(
            "'blocks.0.hook_mlp_out' (mlp_out) was not captured; capture it with "
            "ResidualConfig(capture_mlp_out=True) or MLPConfig(capture_output=True)"
        ),
    ):
        full["blocks.0.hook_mlp_out"]


def test_the_other_rotary_stage(post, pre):
    with pytest.raises(
        UnknownSiteError,
        match=re.escape(
            "'blocks.0.attn.hook_q' is the pre-rope q, but this capture holds post-rope "
            "queries/keys; capture with CaptureConfig(qk_stage='pre_rope')"
        ),
    ):
        post["blocks.0.attn.hook_q"]
    with pytest.raises(
        UnknownSiteError, match=r"is the post-rope k, but this capture holds pre-rope"
    ):
        pre["blocks.0.attn.hook_rot_k"]


# -- families ----------------------------------------------------------------------------
def test_without_rotary_both_query_names_read_the_queries():
    full = oculi.attach(tiny_model("gpt2")).capture_full(prompt_ids())
    for name in ("attn.hook_q", "attn.hook_rot_q"):
        assert torch.equal(full[f"blocks.1.{name}"], full.attention.queries[1])
    assert torch.equal(full["blocks.1.attn.hook_k"], full["blocks.1.attn.hook_rot_k"])


def test_a_plain_mlp_pre_activation_is_its_input_projection():
    full = oculi.attach(tiny_model("gpt2")).capture_full(prompt_ids())
    assert full.mlp.gate is None
    assert torch.equal(full["blocks.0.mlp.hook_pre"], full.mlp.up[0])


def test_with_an_output_norm_hook_mlp_out_is_what_joins_the_residual():
    """Gemma 2 normalises the MLP's output: MLPCapture.output is not hook_mlp_out."""
    adapter = oculi.attach(tiny_model("gemma2"))
    full = adapter.capture_full(prompt_ids(), residual=ALL_RESIDUAL)
    assert not torch.equal(full.mlp.output[1], full.residual.mlp_out[1])
    assert torch.equal(full["blocks.1.hook_mlp_out"], full.residual.mlp_out[1])
    assert torch.equal(
        full["blocks.1.hook_resid_post"],
        full["blocks.1.hook_resid_mid"] + full["blocks.1.hook_mlp_out"],
    )
    without = adapter.capture_full(prompt_ids(), attention=None, logits=None)
    with pytest.raises(
        UnknownSiteError,
        match=re.escape(
            "'blocks.1.hook_mlp_out' (mlp_out) was not captured; capture it with "
            "ResidualConfig(capture_mlp_out=True)"
        )
        + "$",
    ):
        without["blocks.1.hook_mlp_out"]


def test_aliases_work_on_a_loaded_capture(post, tmp_path):
    post.save(tmp_path / "full.safetensors")
    loaded = oculi.load_capture(tmp_path / "full.safetensors")
    for hook in EXPECTED:
        if EXPECTED[hook][0] == "post":
            assert torch.equal(loaded[f"blocks.-1.{hook}"], post[f"blocks.2.{hook}"])


# -- AttentionCapture.n_tokens -------------------------------------------------------------
def test_n_tokens(llama, post):
    assert post.attention.n_tokens == 11
    only_contributions = llama.capture(
        prompt_ids(7),
        CaptureConfig(
            capture_queries=False,
            capture_keys=False,
            capture_values=False,
            capture_patterns=False,
            capture_head_contributions=True,
        ),
    )
    assert only_contributions.head_contributions.shape[-1] == 64
    assert only_contributions.n_tokens == 7
    batch = llama.capture(torch.stack([prompt_ids(5), prompt_ids(5, seed=9)]))
    assert batch.n_tokens == 5
    assert oculi.AttentionCapture(layers=()).n_tokens == 0
