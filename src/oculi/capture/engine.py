"""The capture engine: one forward pass that records the requested sites and nothing else.

:func:`record` takes ``{kind: layers}`` and registers exactly the hooks those sites need (module
hooks for residual and MLP sites, attention-bridge taps for q/k/v/pattern/z). Recorded tensors
are copied straight into preallocated ``[B, n_layers, ...]`` buffers in the storage dtype and
device, so a capture never holds a list of per-layer tensors and a stacked copy at once. The
forward runs through the decoder without the unembedding (for Gemma 3 the ``lm_head`` is ~60%
of the FLOPs) and stops after the last layer anything was asked of.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from oculi.capture.bridge import LayerTaps, attention_bridge
from oculi.capture.hooks import HookSet, StopForward, first_tensor, hidden_arg
from oculi.capture.inputs import Batch
from oculi.capture.sites import SITE_KINDS

if TYPE_CHECKING:
    from oculi.models.adapter import Adapter

BRIDGE_KINDS = frozenset({"q", "k", "v", "pattern", "z"})
# Recorded for capture structures but not sites of their own: the MLP module's output, which
# differs from ``mlp_out`` (what joins the residual) where an output norm follows the MLP.
INTERNAL_KINDS = frozenset({"mlp_result"})


class Recorder:
    """Preallocated per-kind buffers ``[B, n_layers_selected, ...]``."""

    def __init__(
        self,
        requests: Mapping[str, Sequence[int]],
        storage: Mapping[str, tuple[torch.dtype | None, str | torch.device | None]],
    ) -> None:
        self.slots = {
            kind: {layer: i for i, layer in enumerate(ls)} for kind, ls in requests.items()
        }
        self.buffers: dict[str, torch.Tensor] = {}
        self.storage = storage

    def store(self, kind: str, layer: int, tensor: torch.Tensor) -> None:
        buf = self.buffers.get(kind)
        if buf is None:
            n = len(self.slots[kind])
            dtype, device = self.storage.get(kind, (None, None))
            buf = torch.empty(
                (tensor.shape[0], n, *tensor.shape[1:]),
                dtype=dtype or tensor.dtype,
                device=device or tensor.device,
            )
            self.buffers[kind] = buf
        buf[:, self.slots[kind][layer]].copy_(tensor.detach())


def _heads_first(x: torch.Tensor, n_heads: int, layout: str) -> torch.Tensor:
    """A q/k projection or norm output -> ``[B, H, T, D]``."""
    if layout == "bhtd":
        return x
    if layout == "flat":
        x = x.view(*x.shape[:2], n_heads, -1)
    return x.transpose(1, 2)


def _split_fused_qkv(adapter: Adapter, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Fused projection output ``[B, T, ·]`` -> q ``[B, H, T, D]``, k, v ``[B, H_kv, T, D]``."""
    h, h_kv, d = adapter.n_heads, adapter.n_kv_heads, adapter.d_head
    b, t = out.shape[:2]
    if adapter.anatomy.qkv_layout == "per_head":  # GPT-NeoX: [head, (q k v), d]
        qkv = out.view(b, t, h, 3 * d).transpose(1, 2)
        return qkv.chunk(3, dim=-1)
    q, k, v = out.split([h * d, h_kv * d, h_kv * d], dim=-1)
    return (
        q.view(b, t, h, d).transpose(1, 2),
        k.view(b, t, h_kv, d).transpose(1, 2),
        v.view(b, t, h_kv, d).transpose(1, 2),
    )


def _register(
    adapter: Adapter,
    hooks: HookSet,
    requests: Mapping[str, Sequence[int]],
    rec: Recorder,
    taps: dict[int, LayerTaps],
) -> None:
    """Register the hooks that feed ``rec`` for every requested ``(kind, layer)``."""
    anat = adapter.anatomy
    by_layer: dict[int, set[str]] = {}
    for kind, layers in requests.items():
        for layer in layers:
            by_layer.setdefault(layer, set()).add(kind)

    def out_hook(kind: str, layer: int, fn: Callable[[torch.Tensor], torch.Tensor] | None = None):
        def hook(_m: nn.Module, _args: Any, output: Any) -> None:
            x = first_tensor(output)
            rec.store(kind, layer, fn(x) if fn else x)

        return hook

    def in_hook(kind: str, layer: int):
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            rec.store(kind, layer, hidden_arg(args, kwargs))

        return hook

    parallel = anat.is_parallel(adapter.model.config)
    for layer, kinds in sorted(by_layer.items()):
        block = adapter.layer_modules[layer]
        attn = adapter.part(layer, anat.attn)
        mlp = adapter.part(layer, anat.mlp)
        if "resid_pre" in kinds or ("attn_in" in kinds and anat.attn_norm is None):
            if "resid_pre" in kinds:
                hooks.forward_pre_kwargs(block, in_hook("resid_pre", layer))
            if "attn_in" in kinds and anat.attn_norm is None:
                hooks.forward_pre_kwargs(block, in_hook("attn_in", layer))
        if "attn_in" in kinds and anat.attn_norm is not None:
            hooks.forward(adapter.part(layer, anat.attn_norm), out_hook("attn_in", layer))
        if "attn_out" in kinds:
            src = adapter.part(layer, anat.attn_out_norm) if anat.attn_out_norm else attn
            hooks.forward(src, out_hook("attn_out", layer))
        if "resid_mid" in kinds and not parallel:
            src = adapter.part(layer, anat.mlp_norm) if anat.mlp_norm else mlp
            hooks.forward_pre_kwargs(src, in_hook("resid_mid", layer))
        if "mlp_in" in kinds:
            hooks.forward_pre_kwargs(mlp, in_hook("mlp_in", layer))
        if "mlp_out" in kinds:
            src = adapter.part(layer, anat.mlp_out_norm) if anat.mlp_out_norm else mlp
            hooks.forward(src, out_hook("mlp_out", layer))
        if "mlp_result" in kinds:
            hooks.forward(mlp, out_hook("mlp_result", layer))
        if "resid_post" in kinds:
            hooks.forward(block, out_hook("resid_post", layer))
        if "o_in" in kinds:  # z as the output projection sees it, for head contributions
            o_proj = adapter.part(layer, f"{anat.attn}.{anat.o_proj}")
            hooks.forward_pre_kwargs(o_proj, in_hook("o_in", layer))
        if "o_out" in kinds:
            o_proj = adapter.part(layer, f"{anat.attn}.{anat.o_proj}")
            hooks.forward(o_proj, out_hook("o_out", layer))
        _register_qk_pre(adapter, hooks, layer, kinds, rec)
        _register_mlp(adapter, hooks, layer, kinds, rec, out_hook)
        bridge_kinds = kinds & BRIDGE_KINDS
        if bridge_kinds:
            lt = taps.setdefault(layer, LayerTaps())
            for kind in sorted(bridge_kinds):
                store = _bridge_store(rec, kind, layer)
                getattr(lt, kind).append(store)


def _bridge_store(rec: Recorder, kind: str, layer: int):
    def tap(x: torch.Tensor) -> None:
        rec.store(kind, layer, x.transpose(1, 2) if kind == "z" else x)

    return tap


def _register_qk_pre(adapter: Adapter, hooks: HookSet, layer: int, kinds: set[str], rec: Recorder):
    anat = adapter.anatomy
    wanted = kinds & {"q_pre", "k_pre"}
    if not wanted:
        return
    if anat.qkv_proj is not None:
        fused = adapter.part(layer, f"{anat.attn}.{anat.qkv_proj}")

        def fused_hook(_m, _a, output):
            q, k, _v = _split_fused_qkv(adapter, first_tensor(output))
            if "q_pre" in wanted:
                rec.store("q_pre", layer, q)
            if "k_pre" in wanted:
                rec.store("k_pre", layer, k)

        hooks.forward(fused, fused_hook)
        return
    for kind, norm, proj, n in (
        ("q_pre", anat.q_norm, anat.q_proj, adapter.n_heads),
        ("k_pre", anat.k_norm, anat.k_proj, adapter.n_kv_heads),
    ):
        if kind not in wanted:
            continue
        layout = anat.qk_norm_layout if norm else "flat"
        src = adapter.part(layer, f"{anat.attn}.{norm or proj}")

        def hook(_m, _a, output, kind=kind, layout=layout, n=n):
            rec.store(kind, layer, _heads_first(first_tensor(output), n, layout))

        hooks.forward(src, hook)


def _register_mlp(adapter, hooks: HookSet, layer: int, kinds: set[str], rec: Recorder, out_hook):
    anat = adapter.anatomy
    mlp_path = anat.mlp
    if anat.gate_up_proj is not None and kinds & {"mlp_gate", "mlp_up"}:
        fused = adapter.part(layer, f"{mlp_path}.{anat.gate_up_proj}")

        def fused_hook(_m, _a, output):
            gate, up = first_tensor(output).chunk(2, dim=-1)
            if "mlp_gate" in kinds:
                rec.store("mlp_gate", layer, gate)
            if "mlp_up" in kinds:
                rec.store("mlp_up", layer, up)

        hooks.forward(fused, fused_hook)
    else:
        if "mlp_gate" in kinds and anat.gate_proj is not None:
            hooks.forward(
                adapter.part(layer, f"{mlp_path}.{anat.gate_proj}"), out_hook("mlp_gate", layer)
            )
        if "mlp_up" in kinds and anat.up_proj is not None:
            hooks.forward(
                adapter.part(layer, f"{mlp_path}.{anat.up_proj}"), out_hook("mlp_up", layer)
            )
    if "mlp_post" in kinds:
        down = adapter.part(layer, f"{mlp_path}.{anat.down_proj}")

        def down_hook(_m, args, kwargs):
            rec.store("mlp_post", layer, hidden_arg(args, kwargs))

        hooks.forward_pre_kwargs(down, down_hook)


def expand_requests(
    adapter: Adapter, requests: Mapping[str, Sequence[int]]
) -> dict[str, tuple[int, ...]]:
    """Add the internal sites that derived kinds are computed from."""
    out = {k: tuple(v) for k, v in requests.items() if v}
    parallel = adapter.anatomy.is_parallel(adapter.model.config)

    def need(kind: str, layers: Sequence[int]) -> None:
        out[kind] = tuple(sorted(set(out.get(kind, ())) | set(layers)))

    if "resid_mid" in out and parallel:
        need("resid_pre", out["resid_mid"])
        need("attn_out", out["resid_mid"])
    if "head_out" in out:
        need("o_in", out["head_out"])
        if adapter.anatomy.attn_out_norm:
            need("o_out", out["head_out"])
    if "mlp_gate" in out and not adapter.anatomy.gated:
        del out["mlp_gate"]
    return out


def record(
    adapter: Adapter,
    batch: Batch,
    requests: Mapping[str, Sequence[int]],
    *,
    storage: Mapping[str, tuple[torch.dtype | None, str | torch.device | None]] | None = None,
    stop_early: bool = True,
    on_output: Callable[[Any], None] | None = None,
) -> dict[str, tuple[tuple[int, ...], torch.Tensor]]:
    """Run one forward pass and return ``{kind: (layers, tensor [B, n_layers, ...])}``.

    Args:
        adapter: the model's adapter.
        batch: checked inputs.
        requests: ``{kind: layer indices}`` (non-negative, validated by the caller).
        storage: ``{kind: (dtype, device)}`` for the buffers (default: as computed).
        stop_early: end the forward after the last requested layer.
        on_output: called with the decoder's output when the forward runs to the end
            (intervention runs use it to read logits from the same pass).
    """
    for kind in requests:
        if kind not in SITE_KINDS and kind not in INTERNAL_KINDS:
            raise KeyError(kind)
    plan = expand_requests(adapter, requests)
    rec = Recorder(plan, storage or {})
    taps: dict[int, LayerTaps] = {}
    last = max((max(ls) for ls in plan.values()), default=-1)
    with torch.no_grad(), HookSet() as hooks:
        _register(adapter, hooks, plan, rec, taps)
        if stop_early and last < adapter.n_layers - 1:

            def stop(_m, _a, _o):
                raise StopForward

            hooks.forward(adapter.layer_modules[last], stop)
        try:
            if taps:
                with attention_bridge(adapter.attention_configs, adapter.attention_layer_ids, taps):
                    out = adapter.decoder(**batch.model_kwargs(), use_cache=False)
            else:
                out = adapter.decoder(**batch.model_kwargs(), use_cache=False)
            if on_output is not None:
                on_output(out)
        except StopForward:
            pass
    return _finish(adapter, rec, requests)


def _finish(adapter: Adapter, rec: Recorder, requests: Mapping[str, Sequence[int]]):
    bufs = rec.buffers

    def pick(kind: str, wanted: Sequence[int]) -> torch.Tensor:
        idx = [rec.slots[kind][layer] for layer in wanted]
        buf = bufs[kind]
        return buf if idx == list(range(buf.shape[1])) else buf[:, idx]

    def stored(kind: str, tensor: torch.Tensor) -> torch.Tensor:
        # derived kinds are computed from internal buffers, then kept as their kind asks
        dtype, device = rec.storage.get(kind, (None, None))
        return tensor.to(device=device or tensor.device, dtype=dtype or tensor.dtype)

    out: dict[str, tuple[tuple[int, ...], torch.Tensor]] = {}
    for kind, wanted in requests.items():
        wanted = tuple(wanted)
        if not wanted or (kind == "mlp_gate" and not adapter.anatomy.gated):
            continue
        with torch.no_grad():  # no autograd graph (and no model weights) kept in a capture
            if kind == "resid_mid" and kind not in bufs:
                pre = pick("resid_pre", wanted)
                out[kind] = (wanted, stored(kind, pre + pick("attn_out", wanted).to(pre.device)))
            elif kind == "head_out":
                o_out = pick("o_out", wanted) if "o_out" in bufs else None
                heads = head_contributions(adapter, pick("o_in", wanted), wanted, o_out)
                out[kind] = (wanted, stored(kind, heads))
            else:
                out[kind] = (wanted, pick(kind, wanted))
    return out


def head_contributions(
    adapter: Adapter,
    z: torch.Tensor,
    layers: Sequence[int],
    o_out: torch.Tensor | None,
) -> torch.Tensor:
    """Each head's contribution to the residual, ``[B, n, H, T, d_model]``.

    ``z`` is the output projection's input ``[B, n, T, H*D]``. Head ``h`` contributes
    ``z_h @ W_O[:, h]^T``; the projection bias belongs to no head. For families that normalise
    the attention output before adding it (Gemma 2/3, OLMo 2), the RMSNorm is linear once its
    per-token scale is fixed, so each head's share is ``z_h W_O,h^T * (offset + w) / rms(o)``
    with ``rms`` taken from the full output ``o`` — the shares then sum to ``attn_out`` exactly.
    """
    anat = adapter.anatomy
    b, n, t, _ = z.shape
    h, d = adapter.n_heads, adapter.d_head
    outs = []
    for i, layer in enumerate(layers):
        o_proj = adapter.part(layer, f"{anat.attn}.{anat.o_proj}")
        w = cast(torch.Tensor, o_proj.weight)  # nn.Module.__getattr__ is typed Tensor | Module
        w_o = w.T if anat.conv1d else w  # [d_model, H*D]
        w_o = w_o.to(z.device, z.dtype).view(w_o.shape[0], h, d)
        zi = z[:, i].reshape(b, t, h, d)
        contrib = torch.einsum("bthd,mhd->bhtm", zi, w_o)
        if anat.attn_out_norm is not None and o_out is not None:
            norm = adapter.part(layer, anat.attn_out_norm)
            contrib = contrib * rms_gain(norm, o_out[:, i], anat.norm_offset).unsqueeze(1)
        outs.append(contrib)
    return torch.stack(outs, dim=1)


def rms_gain(norm: nn.Module, x: torch.Tensor, offset: float) -> torch.Tensor:
    """``(offset + weight) / rms(x)`` of an RMSNorm for input ``x [B, T, d]`` -> ``[B, T, d]``."""
    eps: float | None = getattr(norm, "eps", None)
    if eps is None:
        eps = getattr(norm, "variance_epsilon", 1e-6)
    xf = x.float()
    inv = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    weight = cast(torch.Tensor, norm.weight)  # nn.Module.__getattr__ is typed Tensor | Module
    return (inv * (offset + weight.float())).to(x.dtype)
