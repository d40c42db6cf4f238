"""The memory plan: will a capture or a sweep fit, and in how many micro-batches?

Before a capture allocates, :func:`plan_capture` estimates its peak: the result buffers on
the storage device, plus, on the compute device, one micro-batch's buffers and the forward's
working set (one layer's activations at a time under ``no_grad``; the attention scores
wherever attention runs eagerly, which is every layer of an ``eager`` model whether or not
patterns are captured, and the layers that compute patterns otherwise; the masks of the
implementation in use, see :func:`forward_bytes`). It compares them with the free memory of each device
(:func:`free_bytes`: ``torch.cuda.mem_get_info`` on CUDA, the kernel's available memory on
the CPU) and returns the largest micro-batch that fits; :func:`record_planned` then runs the
batch in micro-batches whose rows land in one preallocated result (rows of a batch do not
interact, so the numbers are those of one forward). When not even the result or one row fits,
:class:`~oculi.errors.MemoryPlanError` names the estimate, the free memory and the knob to turn.

::

    plan = plan_capture(adapter, batch, requests, storage)
    plan.rows          # rows per forward
    plan.need, plan.free
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from oculi.capture.engine import (
    IN_FLIGHT_BYTES,
    INTERNAL_KINDS,
    expand_requests,
    record,
    streams_to_host,
)
from oculi.capture.inputs import Batch
from oculi.capture.places import ModelParts, locate
from oculi.capture.sites import SITE_KINDS
from oculi.errors import MemoryPlanError


class Adapter(ModelParts, Protocol):
    """The model sizes a plan reads (an :class:`~oculi.Adapter`)."""

    d_model: int
    d_mlp: int


# Share of the free memory a plan may use: allocators fragment, and other tensors come and go.
SHARE = 0.8
Storage = Mapping[str, tuple[torch.dtype | None, "str | torch.device | None"]]


def free_bytes(device: torch.device | str) -> int | None:
    """Free memory on ``device`` in bytes, or ``None`` where it cannot be known.

    CUDA: ``torch.cuda.mem_get_info``; CPU: the kernel's available memory (psutil when
    installed, else ``MemAvailable`` of ``/proc/meminfo``).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        import psutil
    except ImportError:
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None
    return int(psutil.virtual_memory().available)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def site_elements(adapter: Adapter, kind: str, t: int) -> int:
    """Elements one row of one layer of ``kind`` holds for a ``t``-token input."""
    if kind == "o_in":
        return t * adapter.n_heads * adapter.d_head
    if kind in INTERNAL_KINDS or kind == "o_out":
        return t * adapter.d_model
    site = SITE_KINDS[kind]
    last = {"d_model": adapter.d_model, "d_head": adapter.d_head, "d_mlp": adapter.d_mlp}
    width = t if site.width == "pos" else last[site.width]
    heads = (adapter.n_kv_heads if site.kv else adapter.n_heads) if site.per_head else 1
    return heads * t * width


def attention_implementation(adapter: Adapter) -> str:
    """The attention implementation the model's layers run when oculi does not tap them:
    ``config._attn_implementation``, or, while an oculi context holds the switch to
    ``"oculi"``, the model's own one that untapped layers defer to (``"eager"`` when it
    cannot be told, the larger estimate)."""
    from oculi.capture import bridge

    name = getattr(adapter.attention_configs[0], "_attn_implementation", None) or "eager"
    if name != bridge.IMPL_NAME:
        return str(name)
    module = adapter.part(0, adapter.anatomy.attn)
    return str(getattr(bridge, "_FALLBACK_OF", {}).get(id(module), "eager"))


def _n_masks(adapter: Adapter) -> int:
    """Masks one forward builds: one per attention type (Gemma 2/3 mix sliding and full)."""
    for cfg in adapter.attention_configs:
        types = getattr(cfg, "layer_types", None)
        if types:
            return len(set(types))
    return 1


def score_bytes(size: int) -> int:
    """Bytes alive per attention-score element at the peak of an eager softmax, for a compute
    dtype of ``size`` bytes.

    Eager attention computes ``softmax(scores, dtype=float32).to(dtype)``. In float32 the
    scores and the probabilities are alive (``4 + 4``). In another dtype the softmax first
    copies the scores to float32 (4) and writes float32 probabilities (4) while the scores
    live, then casts those back (``size``) while they live: ``size + max(8, 4 + size)``
    (bfloat16: 10 bytes, measured on a tiny eager LLaMA; float16 on CUDA fuses the copy,
    8 bytes, so this overestimates it).
    """
    return 8 if size == 4 else size + max(8, 4 + size)


def forward_bytes(
    adapter: Adapter,
    t: int,
    eager_layers: bool,
    *,
    implementation: str | None = None,
    bridged: bool = True,
) -> int:
    """Peak working set of one row's forward over ``t`` tokens (no grad).

    * one layer's activations at a time: residual, norms, q/k/v and attention output, the
      MLP's gate, up and activation;
    * the attention scores where attention runs eagerly, either because the model's
      implementation is ``"eager"`` or because the capture reads patterns
      (``eager_layers``): at the softmax, ``H·T²`` elements of :func:`score_bytes` each
      (one layer at a time); ``sdpa`` (and flash kernels) never materialise them;
    * the masks, ``[T, T]`` per attention type: additive float masks in the compute dtype
      for eager attention and whenever oculi's attention bridge is active (``bridged``: a
      capture of q/k/v/patterns/z; it registers the eager mask builder), else sdpa's
      boolean mask (1 byte; often skipped for plain causal attention, counted anyway).

    ``implementation``: default :func:`attention_implementation`. Measured on a tiny eager
    LLaMA at 4,096 tokens (tests/test_memory_plan.py), the estimate is within 20% of the
    process's peak resident memory growth.
    """
    size = torch.finfo(adapter.dtype).bits // 8
    impl = implementation or attention_implementation(adapter)
    if bridged and impl not in ("eager", "sdpa"):
        impl = "sdpa"  # the bridge defers untapped layers to eager or sdpa only
    hidden = t * (8 * adapter.d_model + 3 * adapter.d_mlp)
    hidden += 3 * t * (adapter.n_heads + 2 * adapter.n_kv_heads) * adapter.d_head
    eager = eager_layers or impl == "eager"
    scores = adapter.n_heads * t * t * score_bytes(size) if eager else 0
    mask = t * t * (size if bridged or impl == "eager" else 1) * _n_masks(adapter)
    return hidden * size + scores + mask


@dataclass(frozen=True)
class MemoryPlan:
    """A capture's estimated memory and the micro-batch that fits.

    Attributes:
        rows: batch rows per forward (the whole batch when it fits).
        need: ``{device: bytes}`` estimated at ``rows`` rows per forward.
        free: ``{device: bytes}`` free when planned (``None``: unknown, not checked).
        block: query positions per attention block where not even one row's scores fit
            (every layer then runs blocked, :mod:`oculi.capture.blocked`), else ``None``.
    """

    rows: int
    need: dict[str, int]
    free: dict[str, int | None]
    block: int | None = None


def plan_capture(
    adapter: Adapter,
    batch: Batch,
    requests: Mapping[str, Sequence[int]],
    storage: Storage | None = None,
    *,
    free: Mapping[str, int | None] | None = None,
) -> MemoryPlan:
    """How many rows of ``batch`` one forward of the capture ``requests`` may take.

    Args:
        adapter, batch, requests, storage: as for :func:`~oculi.capture.engine.record`.
        free: free bytes per device (default: measured by :func:`free_bytes`).

    Raises:
        MemoryPlanError: the result alone, or one row's forward, does not fit.
    """
    storage = storage or {}
    b, t = batch.input_ids.shape
    compute = str(adapter.device)
    runs_on, transfer = _compute_devices(adapter)
    result: dict[str, int] = {}  # bytes per row of the result, per storage device
    for kind, layers in expand_requests(adapter, requests).items():
        dtype, device = storage.get(kind, (None, None))
        size = torch.finfo(dtype or adapter.dtype).bits // 8
        # without a storage device, a kind's buffer is where its first layer computes
        first = runs_on[min(layers)] if layers and 0 <= min(layers) < len(runs_on) else compute
        where = str(torch.device(device)) if device is not None else first
        result[where] = result.get(where, 0) + len(layers) * site_elements(adapter, kind, t) * size
    expanded = expand_requests(adapter, requests)
    bridged = any(getattr(locate(kind, adapter).read, "tap", None) for kind in expanded)
    impl = attention_implementation(adapter)
    per_row_forward = forward_bytes(
        adapter, t, "pattern" in expanded, implementation=impl, bridged=bridged
    )
    note = _scores_note(adapter, t, impl, "pattern" in expanded)
    computing = sorted(set(runs_on) | {compute})
    devices = sorted(set(result) | set(computing))
    free = dict(free) if free is not None else {d: free_bytes(d) for d in devices}

    def need(rows: int) -> dict[str, int]:
        # the whole result, plus one micro-batch of buffers when there is more than one
        out = {
            d: b * result.get(d, 0) + (rows * result.get(d, 0) if rows < b else 0) for d in devices
        }
        for c in computing:  # each device runs its layers one at a time, offloaded ones loaded
            out[c] += rows * per_row_forward + transfer.get(c, 0)
            for d in devices:  # snapshots waiting for their copy to pinned host buffers
                if streams_to_host(torch.device(c), torch.device(d)):
                    out[c] += min(IN_FLIGHT_BYTES, rows * result.get(d, 0))
        return out

    def fits(rows: int) -> bool:
        for d, n in need(rows).items():
            available = free.get(d)
            if available is not None and n > SHARE * available:
                return False
        return True

    if fits(b):
        return MemoryPlan(b, need(b), free)
    lo = 0
    hi = b
    while lo < hi:  # the largest micro-batch that fits
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    if lo == 0:
        # the whole batch with attention a block of query positions at a time
        from oculi.capture.stream import attention_rows, blocked_forward_bytes

        block = attention_rows(adapter, b, t)
        blocked = {d: b * result.get(d, 0) for d in devices}
        for c in computing:
            blocked[c] += blocked_forward_bytes(adapter, b, t, block) + transfer.get(c, 0)
        if all(free.get(d) is None or n <= SHARE * free[d] for d, n in blocked.items()):  # type: ignore[operator]
            return MemoryPlan(b, blocked, free, block=block)
        placed = _placement_note(adapter, runs_on, transfer)
        sites = _sites_note(adapter, requests, storage, b, t)
        raise MemoryPlanError(
            _message(
                need(1),
                need(b),
                free,
                result,
                compute,
                b,
                attention=note,
                placed=placed,
                blocked=blocked,
                sites=sites,
            )
        )
    return MemoryPlan(lo, need(lo), free)


def _sites_note(
    adapter: Adapter, requests: Mapping[str, Sequence[int]], storage: Storage, b: int, t: int
) -> str:
    from oculi.capture.stream import describe_sites, site_bytes

    return describe_sites(
        site_bytes(adapter, requests, storage, b, t), expand_requests(adapter, requests)
    )


def _compute_devices(adapter: Adapter) -> tuple[list[str], dict[str, int]]:
    """``(the device each layer computes on, {device: bytes of the largest offloaded layer
    loaded there per forward})`` (one device and no transfers for a model on one device)."""
    from oculi.models.placement import layer_devices, offload_bytes  # oculi.models imports us

    layers = getattr(adapter, "layer_modules", None)
    if layers is None:
        return [str(adapter.device)] * adapter.n_layers, {}
    runs_on = [str(d) for d in layer_devices(adapter)]
    transfer: dict[str, int] = {}
    for device, n in zip(runs_on, offload_bytes(adapter), strict=True):
        transfer[device] = max(transfer.get(device, 0), n)
    return runs_on, {d: n for d, n in transfer.items() if n}


def _placement_note(adapter: Adapter, runs_on: list[str], transfer: dict[str, int]) -> dict:
    """``{device: "layers 9-17 run there, loading up to X of offloaded weights each"}``."""
    out: dict[str, str] = {}
    for device in sorted(set(runs_on)):
        ids = [i for i, d in enumerate(runs_on) if d == device]
        span = f"layers {ids[0]}-{ids[-1]}" if len(ids) > 1 else f"layer {ids[0]}"
        if len(ids) != ids[-1] - ids[0] + 1:
            span = "layers " + ", ".join(map(str, ids))
        text = f"{span} run there"
        if transfer.get(device):
            text += f", loading up to {_size(transfer[device])} of offloaded weights per layer"
        out[device] = text
    return out if len(out) > 1 or transfer else {}


def _scores_note(adapter: Adapter, t: int, impl: str, patterns: bool) -> str:
    """What the eager attention scores of one row cost, and how to avoid them, or ``""``."""
    if not patterns and impl != "eager":
        return ""
    size = torch.finfo(adapter.dtype).bits // 8
    scores = _size(adapter.n_heads * t * t * score_bytes(size))
    if patterns:
        return f"patterns need eager attention, whose scores take {scores} per row at {t} tokens"
    return (
        f"the model runs eager attention, whose scores take {scores} per row at {t} tokens "
        "(whether or not patterns are captured); model.set_attn_implementation('sdpa') "
        "avoids them"
    )


def _message(
    one: dict,
    whole: dict,
    free: dict,
    result: dict,
    compute: str,
    b: int,
    attention: str = "",
    placed: dict | None = None,
    blocked: dict | None = None,
    sites: str = "",
) -> str:
    short = [d for d, n in one.items() if free.get(d) is not None and n > SHARE * free[d]]
    placed = placed or {}
    parts = [
        f"about {_size(whole[d])} on {d} for the batch of {b} ({_size(one[d])} even in "
        f"micro-batches of one row), {_size(free[d])} free"
        + (f" ({placed[d]})" if d in placed else "")
        for d in short
    ]
    knobs = []
    if any(result.get(d) for d in short):
        knobs.append("fewer `layers` or sites, or a smaller `storage_dtype`")
        if any(d != "cpu" and result.get(d) for d in short):
            knobs.append('`storage_device="cpu"` to keep the result off the accelerator')
    knobs.append("fewer or shorter inputs per call")
    if any(result.get(d) for d in short):
        knobs.append("stream_to=<a new folder> to write the capture to disk layer by layer")
    if blocked:
        over = [d for d, n in blocked.items() if free.get(d) is not None and n > SHARE * free[d]]
        attention += ("; " if attention else "") + (
            "even with attention a block of query positions at a time: "
            + "; ".join(f"{_size(blocked[d])} on {d}" for d in over)
        )
    return (
        "this capture does not fit in memory: it needs "
        + "; ".join(parts)
        + " (the plan uses at most "
        + f"{SHARE:.0%} of it"
        + (f"; {attention}" if attention else "")
        + (f"; the sites: {sites}" if sites else "")
        + "). Try "
        + ", or ".join(knobs)
        + "."
    )


def record_planned(
    adapter: Adapter,
    batch: Batch,
    requests: Mapping[str, Sequence[int]],
    *,
    storage: Storage | None = None,
    free: Mapping[str, int | None] | None = None,
) -> dict[str, tuple[tuple[int, ...], torch.Tensor]]:
    """:func:`~oculi.capture.engine.record` in the micro-batches :func:`plan_capture` allows.

    The rows of each micro-batch are copied into one result allocated at the first, so the
    peak is the result plus one micro-batch, not two results.
    """
    plan = plan_capture(adapter, batch, requests, storage, free=free)
    b = batch.input_ids.shape[0]
    if plan.rows >= b:
        return record(adapter, batch, requests, storage=storage, rows=plan.block)
    out: dict[str, tuple[tuple[int, ...], torch.Tensor]] = {}
    for r0 in range(0, b, plan.rows):
        part = _rows(batch, r0, r0 + plan.rows)
        for kind, (layers, tensor) in record(adapter, part, requests, storage=storage).items():
            if kind not in out:
                full = torch.empty((b, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
                out[kind] = (layers, full)
            out[kind][1][r0 : r0 + tensor.shape[0]].copy_(tensor)
    return out


def _rows(batch: Batch, r0: int, r1: int) -> Batch:
    return Batch(
        input_ids=batch.input_ids[r0:r1],
        attention_mask=batch.attention_mask[r0:r1],
        position_ids=batch.position_ids[r0:r1],
        single=batch.single,
    )


def plan_sweep(
    adapter: Adapter,
    t: int,
    wanted: int | None,
    copies: int,
    *,
    free: int | None = None,
) -> int:
    """Patched copies per forward for a sweep over a ``t``-token prompt: ``wanted`` (``None``:
    all ``copies``), lowered to what fits in the compute device's free memory.

    A copy holds its ``[t, d]`` residual through every layer, one layer's activations at a
    time and, in patched layers, eager attention scores.

    Raises:
        MemoryPlanError: not even one copy fits.
    """
    want = max(1, min(wanted or copies, copies))
    per_copy = forward_bytes(adapter, t, eager_layers=True)
    runs_on, transfer = _compute_devices(adapter)
    for device in sorted(set(runs_on) or {str(adapter.device)}):  # each device of a map
        room = free_bytes(device) if free is None else free
        if room is None:
            continue
        fit = (int(SHARE * room) - transfer.get(device, 0)) // per_copy
        if fit < 1:
            loads = (
                f" plus {_size(transfer[device])} of offloaded weights loaded per layer"
                if transfer.get(device)
                else ""
            )
            raise MemoryPlanError(
                f"one patched copy of this {t}-token prompt needs about {_size(per_copy)} on "
                f"{device}{loads}, {_size(room)} free (the plan uses at most {SHARE:.0%} of "
                "it); use a shorter prompt or free memory on the device (`batch_size` is "
                "already 1)"
            )
        want = min(want, fit)
    return want
