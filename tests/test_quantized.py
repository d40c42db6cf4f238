"""Quantized models on the CPU: torchao int8 weight-only, optimum-quanto int8/int4 and
bitsandbytes 4-bit (nf4) and 8-bit, each loaded through transformers' quantization config.

What is checked, against the quantized model itself (not the float one it came from):

* captures equal the quantized model's own ``output_hidden_states`` / ``output_attentions``;
* DLA of the quantized model adds up to its own logit, and per-head outputs computed from the
  dequantized ``W_O`` (:func:`oculi.models.read_weight`) add up to the attention output the
  quantized layer computed: the dequantized weights are the ones the layer multiplies by;
* neurons' shares, read through the dequantized ``W_out``, add up to the MLP's share;
* a layer whose weights are packed in a layout oculi does not unpack is refused by name.

A library that is not installed skips its cases (``pip install 'oculi[quantized]'``).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
import torch
from torch import nn

import oculi
from models import prompt_ids, tiny_model
from oculi.analysis import AttributionMethods, HeadWeights
from oculi.analysis.neurons import neuron_attribution
from oculi.capture.configs import CaptureConfig, ResidualConfig
from oculi.errors import WeightReadError
from oculi.models.weights import read_bias, read_weight

TARGET = 7
FAMILIES = ["llama_mha", "gemma3", "qwen3", "neox_parallel", "phi3"]


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _config(scheme: str) -> Any:
    import transformers as tf

    if scheme == "torchao_int8":
        from torchao.quantization import Int8WeightOnlyConfig

        return tf.TorchAoConfig(Int8WeightOnlyConfig())
    if scheme.startswith("quanto_"):
        return tf.QuantoConfig(weights=scheme.removeprefix("quanto_"))
    if scheme == "bnb_nf4":
        return tf.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
    return tf.BitsAndBytesConfig(load_in_8bit=True)


SCHEMES = {
    "torchao_int8": "torchao",
    "quanto_int8": "optimum.quanto",
    "quanto_int4": "optimum.quanto",
    "bnb_nf4": "bitsandbytes",
    "bnb_int8": "bitsandbytes",
}
# bitsandbytes' CPU kernels are not a float matmul by a fixed weight: LLM.int8 also rounds each
# layer's input to int8, and the 4-bit kernel computes in bfloat16; the exact weight identities
# below leave them out (test_bnb_4bit_dequantization_matches_its_kernel checks nf4 to bf16)
EXACT = ["torchao_int8", "quanto_int8", "quanto_int4"]

_CACHE: dict[tuple[str, str], nn.Module] = {}


def quantized(family: str, scheme: str, tmp_path_factory) -> oculi.Adapter:
    if not _has(SCHEMES[scheme]):
        pytest.skip(f"{SCHEMES[scheme]} is not installed (pip install 'oculi[quantized]')")
    if scheme == "bnb_nf4" and family == "gemma3":
        pytest.skip(
            "bitsandbytes' CPU 4-bit kernel needs a layer's output rows to be a multiple of its "
            "block; tiny Gemma 3's one-head k_proj has 16 (the quantized model cannot run)"
        )
    key = (family, scheme)
    if key not in _CACHE:
        from transformers import AutoModelForCausalLM

        folder = tmp_path_factory.mktemp(f"{family}-{scheme}")
        tiny_model(family).save_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=_config(scheme), dtype=torch.float32,
            attn_implementation="eager",
        )  # fmt: skip
        _CACHE[key] = model.eval()
    return oculi.attach(_CACHE[key])


def _quantized_layers(model: nn.Module) -> list[str]:
    return [
        name
        for name, m in model.named_modules()
        if isinstance(getattr(m, "weight", None), torch.Tensor)
        and (type(m.weight) not in (torch.Tensor, nn.Parameter) or "quanto" in type(m).__module__)
    ]


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("family", FAMILIES)
def test_captures_equal_the_quantized_models_own_outputs(family, scheme, tmp_path_factory):
    adapter = quantized(family, scheme, tmp_path_factory)
    model = adapter.model
    assert _quantized_layers(model), "nothing was quantized"
    ids = prompt_ids()
    with torch.no_grad():
        out = model(ids[None], output_hidden_states=True, output_attentions=True)
    full = adapter.capture_full(ids)
    for layer in range(adapter.n_layers):
        torch.testing.assert_close(full.residual.pre_attn[layer], out.hidden_states[layer][0])
        torch.testing.assert_close(full.attention.patterns[layer], out.attentions[layer][0])
    logit = float(out.logits[0, -1, TARGET])
    dla = AttributionMethods.direct_logit_attribution(full, TARGET)
    assert float(dla.total) == pytest.approx(logit, rel=1e-4, abs=1e-6)
    assert float(dla.logit) == pytest.approx(logit, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("scheme", EXACT)
@pytest.mark.parametrize("family", FAMILIES)
def test_dequantized_weights_are_what_the_layers_multiply_by(family, scheme, tmp_path_factory):
    adapter = quantized(family, scheme, tmp_path_factory)
    ids = prompt_ids()
    full = adapter.capture_full(
        ids,
        attention=CaptureConfig(capture_head_contributions=True),
        residual=ResidualConfig(capture_attn_out=True, capture_mlp_out=True),
    )
    anat = adapter.anatomy
    heads = full.attention.head_contributions.sum(1)  # [L, T, d]: the heads' writes summed
    for layer in range(adapter.n_layers):
        # the projection's bias is no head's (a post-norm, Gemma 3's, has none after it)
        bias = read_bias(adapter.part(layer, f"{anat.attn}.{anat.o_proj}"))
        want = full.residual.attn_out[layer]
        if bias is not None and anat.attn_out_norm is None:
            want = want - bias
        torch.testing.assert_close(heads[layer], want, atol=2e-5, rtol=1e-4)
    dla = AttributionMethods.direct_logit_attribution(full, TARGET)
    bias_share = 0 if dla.attention_bias is None else dla.attention_bias
    torch.testing.assert_close(dla.heads.sum(-1) + bias_share, dla.attention, atol=1e-5, rtol=1e-4)
    neurons = neuron_attribution(full, TARGET, adapter)
    torch.testing.assert_close(
        neurons.values.sum(-1) + neurons.bias, neurons.mlp, atol=1e-5, rtol=1e-4
    )
    weights = HeadWeights.from_adapter(adapter)  # read and dequantized once per layer
    assert weights.w_o.dtype == torch.float32 and torch.isfinite(weights.w_o).all()


def test_effective_weight_is_the_dequantization_not_the_float_original(tmp_path_factory):
    adapter = quantized("llama_mha", "quanto_int4", tmp_path_factory)
    q = adapter.part(0, "self_attn.q_proj")
    x = torch.randn(5, adapter.d_model, generator=torch.Generator().manual_seed(0))
    w = read_weight(q)
    with torch.no_grad():
        torch.testing.assert_close(q(x), x @ w.T + q.bias, atol=1e-5, rtol=1e-5)
    original = tiny_model("llama_mha").model.layers[0].self_attn.q_proj.weight
    assert (w - original).abs().max() > 1e-3  # int4 rounding: a different matrix


def test_bnb_4bit_dequantization_matches_its_kernel(tmp_path_factory):
    """bitsandbytes repacks 4-bit weights into its CPU kernel's tiled layout at the first CPU
    forward; read before and after, the dequantized weight reproduces the layer's output to
    the kernel's bfloat16 precision (a wrong unpacking is off by the weights' whole size)."""
    adapter = quantized("llama_mha", "bnb_nf4", tmp_path_factory)
    lin = adapter.part(2, "mlp.down_proj")
    x = torch.randn(5, adapter.d_mlp, generator=torch.Generator().manual_seed(0))
    before = read_weight(lin)
    with torch.no_grad():
        y = lin(x)
    assert getattr(lin.weight.quant_state, "packing_format_for_cpu", False)
    after = read_weight(lin)
    assert getattr(lin.weight.quant_state, "packing_format_for_cpu", False)  # left as it was
    with torch.no_grad():
        assert torch.equal(lin(x), y)
    scale = float(y.abs().max())
    for w in (before, after):
        torch.testing.assert_close(x @ w.T + lin.bias, y, atol=1e-2 * scale, rtol=0)


class PackedLinear(nn.Module):
    """A linear layer stored as GPTQ/AWQ kernels store theirs: packed int32 nibbles
    (``qweight``) and per-row ``scales``, no ``weight``; its forward unpacks them itself."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach()
        scales = w.abs().amax(1, keepdim=True) / 7
        q = (w / scales).round().clamp(-8, 7).to(torch.int32) + 8  # [out, in] in 0..15
        packed = torch.zeros(w.shape[0], w.shape[1] // 8, dtype=torch.int32)
        for i in range(8):
            packed |= q[:, i::8] << (4 * i)
        self.register_buffer("qweight", packed)
        self.register_buffer("scales", scales)
        self.bias = linear.bias
        self.in_features = w.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.stack([(self.qweight >> (4 * i)) & 15 for i in range(8)], -1)
        w = (q.reshape(q.shape[0], -1).float() - 8) * self.scales
        cols = torch.arange(self.in_features).reshape(-1, 8).T.reshape(-1)
        w = w[:, cols.argsort()]
        return nn.functional.linear(x, w, self.bias)


def test_a_packed_layout_is_refused_naming_it():
    import copy

    model = copy.deepcopy(tiny_model("llama_gqa"))
    layer = model.model.layers[1].self_attn
    layer.o_proj = PackedLinear(layer.o_proj)
    adapter = oculi.attach(model)
    full = adapter.capture_full(prompt_ids())  # hooks on modules: captures still run
    assert full.residual is not None
    with pytest.raises(WeightReadError, match=r"PackedLinear .*packed quantized layout.*GPTQ"):
        HeadWeights.from_adapter(adapter)
    with pytest.raises(WeightReadError, match="PackedLinear has no 'weight'"):
        adapter.capture_full(prompt_ids(), attention=CaptureConfig(capture_head_contributions=True))


def test_integer_weights_without_a_dequantization_are_refused():
    lin = nn.Linear(8, 4)
    lin.weight = nn.Parameter(torch.zeros(4, 8, dtype=torch.int8), requires_grad=False)
    with pytest.raises(WeightReadError, match=r"Linear.weight is stored as torch.int8"):
        read_weight(lin)


@pytest.mark.parametrize(
    ("scheme", "words"),
    [
        ("torchao_int8", "torchao Int8WeightOnlyConfig"),
        ("quanto_int4", "quanto weights=int4"),
        ("bnb_nf4", "bitsandbytes 4-bit nf4"),
        ("bnb_int8", "bitsandbytes 8-bit (LLM.int8)"),
    ],
)
def test_info_names_the_quantization(scheme, words, tmp_path_factory):
    from oculi.analyzer.core import model_info

    facts = model_info(quantized("llama_mha", scheme, tmp_path_factory))
    assert facts["quantization"] == words
    assert facts["offloaded"] == "none" and facts["dtype"] == "float32"
