"""Reading a module's weights wherever they live: on a device, offloaded, or quantized.

::

    from oculi.models.weights import read_weight, read_bias
    w = read_weight(adapter.part(3, "self_attn.o_proj"))   # [d_model, H*D], a float tensor
    b = read_bias(adapter.module("model.norm"))            # None: an RMSNorm has no bias

Every analysis that reads weights (direct logit attribution, the lens, composition, neurons,
the per-head attention outputs) goes through these two functions, so each works on a model
loaded the ways big models are loaded:

* **on one or several devices** (``device_map={"model.layers.0": "cuda:0", ...}``): the
  tensor is returned where it lives; callers move what they read to where they compute.
* **offloaded by accelerate** (``device_map`` entries ``"cpu"`` on a GPU machine, ``"disk"``
  with ``offload_folder=``, or ``accelerate.cpu_offload``): the parameter is a ``meta``
  placeholder and the module's ``AlignDevicesHook`` holds the real tensor in its
  ``weights_map`` (a dict in memory, or memory-mapped files on disk). The tensor is read from
  there, on the CPU, without touching the hook.
* **quantized** by a transformers quantizer that runs on the CPU: torchao (int8 weight-only
  and its other tensor subclasses), optimum-quanto (``QLinear``, int8/int4/int2) and
  bitsandbytes (``Linear4bit`` nf4/fp4, ``Linear8bitLt``). The weight is **dequantized** into
  the float the quantized layer multiplies by: the quantized model's *effective* weights, so
  attributions of the quantized model add up to the quantized model's own logits (and differ
  from the float model's by the quantization error). bitsandbytes' CPU kernels are not a
  float matmul by a fixed matrix: ``Linear8bitLt`` also rounds its *inputs* to int8
  (LLM.int8) and ``Linear4bit`` computes in bfloat16, so their dequantized weights are the
  layer's map to that precision (0.4% of the output for nf4 on a tiny model), not exactly.

Anything else is refused with :class:`~oculi.errors.WeightReadError` naming the scheme:
packed integer layouts (GPTQ, AWQ, HQQ, EETQ, ... ``QuantLinear`` modules with ``qweight``
and ``scales``) are GPU kernels' formats that oculi does not unpack.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from oculi.capture.interrupts import no_grad
from oculi.errors import WeightReadError

__all__ = ["execution_device", "norm_centers", "read_bias", "read_weight", "weight_shape"]


def read_weight(module: nn.Module, name: str = "weight") -> Tensor:
    """The effective float weight of ``module``, detached, wherever it lives.

    Args:
        module: a layer (``nn.Linear``, a norm, an embedding, a ``Conv1D``, a quantized
            linear) of a Hugging Face model.
        name: the parameter to read (``"weight"``; ``"bias"`` through :func:`read_bias`).

    Returns:
        The tensor in the layer's shape (``[out, in]`` for a linear), a floating dtype: the
        parameter itself where it is a plain tensor on a device (shared, not copied), the
        offloaded copy (on the CPU) where accelerate keeps it, or its dequantization.

    Raises:
        WeightReadError: the module has no such parameter, its weights are on the ``meta``
            device with no offload hook holding them, or they are quantized in a form oculi
            cannot read (named in the message).

    Example::

        W_O = read_weight(adapter.part(3, "self_attn.o_proj"))   # [d_model, H * d_head]: [640, 1024]
    """
    value = _read(module, name)
    if value is None:
        raise WeightReadError(
            f"{_describe(module)} has no {name!r}; {_packed_hint(module)}"
            if _looks_packed(module)
            else f"{_describe(module)} has no parameter {name!r}"
        )
    return value


def read_bias(module: nn.Module, name: str = "bias") -> Tensor | None:
    """The module's bias (or another optional parameter) as :func:`read_weight` reads it, or
    ``None`` where it has none (``nn.Linear(bias=False)``, an RMSNorm)."""
    return _read(module, name)


def weight_shape(module: nn.Module, name: str = "weight") -> torch.Size:
    """The logical shape of a weight without reading it (a meta placeholder has the shape;
    a bitsandbytes 4-bit weight is packed, its ``quant_state`` keeps the shape).

    ::

        weight_shape(adapter.part(0, "mlp.down_proj"))   # torch.Size([d_model, d_mlp])
    """
    value = getattr(module, name, None)
    if not isinstance(value, Tensor):
        raise WeightReadError(f"{_describe(module)} has no tensor {name!r}")
    state = getattr(value, "quant_state", None)
    if state is not None and getattr(state, "shape", None) is not None:
        return torch.Size(state.shape)
    return value.shape


def execution_device(module: nn.Module) -> torch.device:
    """The device ``module`` computes on: its accelerate hook's ``execution_device`` where it
    has one (offloaded layers run there; else its first submodule's that has one, as
    ``accelerate.cpu_offload`` hooks only the modules holding parameters), else the device of
    its first parameter or buffer that is not a ``meta`` placeholder, else the CPU.

    ::

        execution_device(adapter.layer_modules[9])   # device(type="cpu") for a disk-offloaded layer
    """
    for part in module.modules():
        for hook in _hooks(part):
            dev = getattr(hook, "execution_device", None)
            if dev is not None:
                return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")


def norm_centers(norm: nn.Module, d_model: int) -> bool:
    """Whether ``norm`` subtracts the mean of its input (a LayerNorm) or not (an RMSNorm).

    Read off the module itself, whatever its class (``nn.LayerNorm``, a family's own
    LayerNorm without parameters, any RMSNorm): a centring norm gives the same output for
    ``x`` and ``x + 3`` (a shift along the all-ones direction); an RMSNorm does not.

    ::

        norm_centers(adapter.part(0, "ln_1"), adapter.d_model)   # True for GPT-2's LayerNorm
    """
    param = next((p for p in norm.parameters() if p.is_floating_point()), None)
    dtype = param.dtype if param is not None and param.device.type != "meta" else torch.float32
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, d_model, generator=gen)
    x[1] = x[0] + 3.0
    with no_grad():  # where the norm runs (its offloaded weights are loaded there)
        y = norm(x.to(execution_device(norm), dtype)).float().cpu()
    # equal up to the dtype's rounding of x + 3 (bf16: ~1%), or as far apart as the outputs
    return float((y[0] - y[1]).norm()) <= 0.05 * float(y[0].norm())


# -- how each form is read ------------------------------------------------------------------
def _read(module: nn.Module, name: str) -> Tensor | None:
    value = getattr(module, name, None)
    if value is None:
        return None
    if not isinstance(value, Tensor):
        raise WeightReadError(
            f"{_describe(module)}.{name} is a {type(value).__name__}, not a tensor"
        )
    if value.device.type == "meta":
        value = _offloaded(module, name)
    value = _dequantized(module, name, value)
    if not value.is_floating_point():
        raise WeightReadError(
            f"{_describe(module)}.{name} is stored as {value.dtype} ({type(value).__name__}) in "
            f"a form oculi cannot read; {_packed_hint(module)}"
        )
    return value.detach()


def _hooks(module: nn.Module) -> list[Any]:
    """accelerate's hooks on ``module`` (a ``SequentialHook`` holds several)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])


def _offloaded(module: nn.Module, name: str) -> Tensor:
    """The real tensor behind a ``meta`` placeholder, from the offload hook's ``weights_map``."""
    for hook in _hooks(module):
        weights = getattr(hook, "weights_map", None)
        if weights is None or not getattr(hook, "offload", False):
            continue
        try:
            value = weights[name]
        except KeyError:
            continue
        if isinstance(value, Tensor) and value.device.type != "meta":
            return value
    raise WeightReadError(
        f"{_describe(module)}.{name} is on the meta device (not loaded) and no accelerate "
        "offload hook holds its values; load the model with from_pretrained(..., device_map=, "
        "offload_folder=) or accelerate's dispatch_model/cpu_offload, which keep them"
    )


def _dequantized(module: nn.Module, name: str, value: Tensor) -> Tensor:
    """``value`` as the float its layer multiplies by (itself when it is a plain tensor)."""
    if name == "weight" and _is_quanto(module):
        # quanto's QLinear multiplies by ``qweight`` (the frozen weight, or quantized on the fly)
        value = module.qweight  # type: ignore[assignment]
    kind = type(value).__name__
    if type(value) in (Tensor, nn.Parameter):
        return value
    if kind == "Params4bit":
        import bitsandbytes.functional as bnb

        state = value.quant_state  # type: ignore[attr-defined]
        if getattr(state, "packing_format_for_cpu", False):
            original = getattr(state, "original_dtype", None) or state.dtype
            return _probed(module, state.dtype).to(original)
        return bnb.dequantize_4bit(value.data, state).to(state.dtype)
    if kind == "Int8Params":
        scale = getattr(value, "SCB", None)
        if scale is None:
            scale = getattr(getattr(module, "state", None), "SCB", None)
        if scale is None:
            raise WeightReadError(
                f"{_describe(module)}.{name} is a bitsandbytes int8 weight without its scales "
                "(SCB): it was not quantized yet (move the model to its device first)"
            )
        return value.data.float() * (scale.float()[:, None] / 127.0)
    dequantize = getattr(value, "dequantize", None)
    if callable(dequantize):
        out = dequantize()
        if isinstance(out, Tensor) and out.is_floating_point():
            return out
    if value.is_floating_point() and isinstance(value, nn.Parameter):
        return value.data
    raise WeightReadError(
        f"{_describe(module)}.{name} is a {type(value).__module__}.{kind} oculi cannot "
        f"dequantize; {_packed_hint(module)}"
    )


def _probed(module: nn.Module, dtype: torch.dtype) -> Tensor:
    """``W [out, in]`` of a linear layer read off its own forward on the identity (the layer's
    class forward: no hook fires). For bitsandbytes' 4-bit weights once repacked into its CPU
    kernel's tiled layout (at the first CPU forward): the kernel dequantizes each weight to
    ``dtype`` and multiplies it by 1, so this is exactly the matrix it applies (bitsandbytes'
    own inverse of that layout is best-effort and wrong for some shapes)."""
    n_in: int = getattr(module, "in_features")  # noqa: B009 - typed Tensor | Module otherwise
    eye = torch.eye(n_in, dtype=dtype)
    with no_grad():
        out = type(module).forward(module, eye)  # [in, out] = W^T + bias
    bias = getattr(module, "bias", None)
    if isinstance(bias, Tensor):
        out = out - bias.to(out.dtype)
    return out.T.contiguous()


def _is_quanto(module: nn.Module) -> bool:
    return type(module).__module__.startswith("optimum.quanto") and hasattr(module, "qweight")


def _looks_packed(module: nn.Module) -> bool:
    return any(hasattr(module, a) for a in ("qweight", "qzeros", "scales", "W_q"))


def _packed_hint(module: nn.Module) -> str:
    where = type(module).__module__.split(".")[0]
    return (
        f"its layer is a {type(module).__name__} from {where!r}, a packed quantized layout "
        "(GPTQ/AWQ/HQQ-style kernels) whose weights oculi does not unpack. Weight-based "
        "analyses read torchao, optimum-quanto and bitsandbytes weights; load the model "
        "with one of those (or unquantized) for them"
    )


def _describe(module: nn.Module) -> str:
    return f"{type(module).__name__}"
