"""The capture engine: one forward pass that records the requested sites and nothing else.

:func:`record` takes ``{kind: layers}`` and registers exactly the hooks those sites need (module
hooks for residual and MLP sites, attention-bridge taps for q/k/v/pattern/z). Recorded tensors
are copied straight into preallocated ``[B, n_layers, ...]`` buffers in the storage dtype and
device, so a capture never holds a list of per-layer tensors and a stacked copy at once. The
forward runs through the decoder without the unembedding (for Gemma 3 the ``lm_head`` is ~60%
of the FLOPs) and stops after the last layer anything was asked of.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import torch

from oculi.capture.bridge import LayerTaps, attention_bridge
from oculi.capture.heads import head_contributions, rms_gain  # noqa: F401 - importable here
from oculi.capture.hooks import HookSet, StopForward, forward_ended
from oculi.capture.inputs import Batch
from oculi.capture.interrupts import no_grad
from oculi.capture.places import ModelParts, add_reader, locate
from oculi.capture.sites import SITE_KINDS
from oculi.errors import NonFiniteWarning, StorageRangeWarning
from oculi.utils import caller_stacklevel

# Recorded for capture structures but not sites of their own: the MLP module's output, which
# differs from ``mlp_out`` (what joins the residual) where an output norm follows the MLP; and
# ``resid_final``, the last layer's output kept in the model's dtype whatever the residual's
# storage dtype, for the final norm's output (``final_normalized``).
INTERNAL_KINDS = frozenset({"mlp_result", "resid_final"})


def streams_to_host(compute: torch.device, storage: torch.device) -> bool:
    """Whether a recorded tensor on ``compute`` is streamed into pinned ``storage`` buffers
    (a CUDA forward storing on the CPU) rather than copied where it is produced."""
    return compute.type == "cuda" and storage.type == "cpu"


# Device bytes of recorded tensors waiting for their copy to the host before the forward
# waits for the oldest (so streaming never holds more than this on the device).
IN_FLIGHT_BYTES = 2 * 2**30


class Recorder:
    """Preallocated per-kind buffers ``[B, n_layers_selected, ...]``.

    With a CUDA forward and host storage, buffers are pinned and each recorded tensor is
    copied on a side stream without blocking (a device-side snapshot first, so later work on
    the tensor cannot race the copy), overlapping the rest of the forward; :meth:`wait` joins
    the copies once at the end. Anywhere else a tensor is copied where it is recorded.
    """

    #: copy CUDA tensors to host buffers on a side stream (a streaming recorder copies in line)
    host_streams = True

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
        self._stream: Any = None
        self._pending: list[tuple[Any, int, torch.Tensor]] = []  # (event, bytes, snapshot)
        self._peaks: list[tuple[str, int, torch.Tensor]] = []  # narrowing stores, checked once
        self._sums: list[tuple[str, int, torch.Tensor]] = []  # every store, in forward order

    def allocate(self, kind: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """The buffer ``[B, n_layers, *shape[1:]]`` of ``kind`` for per-layer tensors of
        ``shape`` computed like ``like`` (a streaming recorder maps a file instead)."""
        n = len(self.slots[kind])
        dtype, device = self.storage.get(kind, (None, None))
        where = torch.device(device) if device is not None else like.device
        return torch.empty(
            (shape[0], n, *shape[1:]),
            dtype=dtype or like.dtype,
            device=where,
            pin_memory=streams_to_host(like.device, where),
        )

    def stored(self, kind: str, layer: int, dst: torch.Tensor) -> None:
        """Called after ``dst`` (part of ``kind``'s buffer) was written (a streaming recorder
        moves it to the disk)."""

    def derived(self, kind: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """The buffer of a kind computed after the forward from others (``head_out``,
        ``resid_mid``), ``shape`` in its storage dtype and device, else ``like``'s (a
        streaming recorder maps a file)."""
        dtype, device = self.storage.get(kind, (None, None))
        return torch.empty(shape, dtype=dtype or like.dtype, device=device or like.device)

    def _buffer(self, kind: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        buf = self.buffers.get(kind)
        if buf is None:
            buf = self.buffers[kind] = self.allocate(kind, shape, like)
        return buf

    def store(self, kind: str, layer: int, tensor: torch.Tensor) -> None:
        buf = self._buffer(kind, tuple(tensor.shape), tensor)
        self._copy(kind, layer, buf, buf[:, self.slots[kind][layer]], tensor.detach())

    def store_rows(self, kind: str, layer: int, r0: int, block: torch.Tensor, t: int) -> None:
        """Store rows ``r0:r0 + r`` of a per-layer ``[B, H, t, S]`` tensor (a pattern computed
        a block of query positions at a time) from ``block [B, H, r, S]``."""
        b, h, r, s = block.shape
        buf = self._buffer(kind, (b, h, t, s), block)
        dst = buf[:, self.slots[kind][layer], :, r0 : r0 + r]
        self._copy(kind, layer, buf, dst, block.detach())

    def _copy(
        self, kind: str, layer: int, buf: torch.Tensor, dst: torch.Tensor, src: torch.Tensor
    ) -> None:
        if self.host_streams and streams_to_host(src.device, buf.device):
            self._stream_copy(dst, src)
        else:
            dst.copy_(src)
            self.stored(kind, layer, dst)
        if buf.dtype in NARROW and torch.finfo(src.dtype).max > torch.finfo(buf.dtype).max:
            self._peaks.append((kind, layer, finite_peak(src)))
        self._sums.append((kind, layer, finite_probe(src)))

    def _stream_copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        device = src.device
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=device)
        # a snapshot on the forward's stream: later in-place work cannot race the copy
        snap = torch.empty_like(src, dtype=dst.dtype, memory_format=torch.contiguous_format)
        snap.copy_(src)
        self._stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(self._stream):
            for b in range(dst.shape[0]):  # rows are contiguous in the [B, n, ...] buffer
                dst[b].copy_(snap[b], non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        self._pending.append((event, snap.nbytes, snap))
        while sum(n for _, n, _ in self._pending) > IN_FLIGHT_BYTES and len(self._pending) > 1:
            self._pending.pop(0)[0].synchronize()

    def wait(self) -> None:
        """Join the host copies still in flight (one synchronisation per capture)."""
        if self._stream is not None:
            self._stream.synchronize()
        self._pending.clear()

    def check_range(self) -> set[tuple[str, int]]:
        """Warn (once per capture) where fp16/bf16 storage turned values into inf; returns
        those ``(kind, layer)``.

        One reduction per stored tensor during the forward, one host sync here.
        """
        peaks, self._peaks = self._peaks, []
        if not peaks:
            return set()
        values = torch.stack([p.to(peaks[0][2].device, torch.float32) for *_, p in peaks])
        over: dict[tuple[str, torch.dtype], list[tuple[int, float]]] = {}
        for (kind, layer, _), peak in zip(peaks, values.tolist(), strict=True):
            dtype = self.buffers[kind].dtype
            if peak > torch.finfo(dtype).max:
                over.setdefault((kind, dtype), []).append((layer, peak))
        if over:
            sites = "; ".join(
                f"{kind!r} at layers {sorted({layer for layer, _ in hits})} (|values| up to "
                f"{max(p for _, p in hits):.4g}, {str(dtype).removeprefix('torch.')} max "
                f"{torch.finfo(dtype).max:.4g})"
                for (kind, dtype), hits in over.items()
            )
            warnings.warn(
                f"values beyond the storage dtype's range were stored as inf: {sites}; "
                "store these sites in float32 (storage_dtype=torch.float32)",
                StorageRangeWarning,
                stacklevel=4,
            )
        return {(kind, layer) for (kind, _), hits in over.items() for layer, _ in hits}

    def check_finite(self, ranged: Collection[tuple[str, int]] = ()) -> None:
        """Warn (``NonFiniteWarning``, once per capture) where the model produced NaN or inf,
        naming the first layer and site in forward order.

        One sum per stored tensor during the forward (:func:`finite_probe`), one host sync
        here; a sum that is not finite is confirmed on the stored copy, so only a true NaN or
        inf warns. ``ranged``: ``(kind, layer)`` whose narrow storage already overflowed to
        inf (:meth:`check_range` warned); there only NaN counts.
        """
        sums, self._sums = self._sums, []
        if not sums:
            return
        flags = torch.stack([s.to(sums[0][2].device, torch.float32) for *_, s in sums])
        suspect = (~torch.isfinite(flags)).nonzero()[:, 0].tolist()
        bad: list[tuple[str, int]] = []
        for i in suspect:
            kind, layer, _ = sums[i]
            stored = self.buffers[kind][:, self.slots[kind][layer]]
            hit = torch.isnan(stored) if (kind, layer) in ranged else ~torch.isfinite(stored)
            if bool(hit.any()) and (kind, layer) not in bad:
                bad.append((kind, layer))
        if not bad:
            return
        kind, layer = bad[0]
        where: dict[str, list[int]] = {}
        for k, lay in bad:
            where.setdefault(k, []).append(lay)
        listed = "; ".join(f"{k!r} at layers {layers}" for k, layers in where.items())
        note = " (the MLP module's output)" if kind == "mlp_result" else ""
        warnings.warn(
            f"the model produced NaN or inf: first at layer {layer}, site {kind!r}{note} (in "
            f"{listed}). Everything computed from these values (patterns, lens predictions, "
            "attributions) is meaningless; check the weights for NaN/inf "
            "(torch.isfinite(p).all() for each parameter) or run in float32",
            NonFiniteWarning,
            stacklevel=caller_stacklevel(),
        )


NARROW = (torch.float16, torch.bfloat16)


def finite_probe(x: torch.Tensor) -> torch.Tensor:
    """A 0-dim tensor that is finite when ``x`` is (no host sync).

    The sum of ``x`` (float32 at least, so a half-precision sum does not overflow): NaN or inf
    anywhere makes it non-finite, and a sum several times cheaper than ``isfinite().all()``
    on CPUs. A finite ``x`` whose float32 sum overflows is rare and is ruled out by the exact
    check :meth:`Recorder.check_finite` runs on the stored copy.
    """
    return x.sum(dtype=torch.float32) if x.dtype in NARROW else x.sum()


def finite_peak(x: torch.Tensor) -> torch.Tensor:
    """The largest finite ``|x|`` (a 0-dim tensor on x's device; no host sync)."""
    a = x.abs()
    return a.masked_fill(~torch.isfinite(a), 0).amax()


def _register(
    m: ModelParts,
    hooks: HookSet,
    requests: Mapping[str, Sequence[int]],
    rec: Recorder,
    taps: dict[int, LayerTaps],
    t: int | None = None,
) -> None:
    """Register the hooks that feed ``rec`` for every requested ``(kind, layer)``.

    Each kind is read where its locator (:mod:`oculi.capture.places`) says; derived kinds
    have no place of their own (:func:`expand_requests` asked for what they are built from).
    With ``t`` (a blocked forward over ``t`` tokens), patterns are read a block of query rows
    at a time.
    """
    for kind, layers in requests.items():
        place = locate(kind, m).read
        if place is None:
            continue
        for layer in layers:
            if t is not None and place.tap == "pattern" and place.view is None:
                rows = taps.setdefault(layer, LayerTaps()).pattern_rows
                rows.append(_store_rows(rec, kind, layer, t))
                continue
            add_reader(hooks, taps, m, layer, place, _store(rec, kind, layer))


def _store_rows(
    rec: Recorder, kind: str, layer: int, t: int
) -> Callable[[int, torch.Tensor], None]:
    return lambda r0, x: rec.store_rows(kind, layer, r0, x, t)


def _store(rec: Recorder, kind: str, layer: int) -> Callable[[torch.Tensor], None]:
    return lambda x: rec.store(kind, layer, x)


def expand_requests(
    m: ModelParts, requests: Mapping[str, Sequence[int]]
) -> dict[str, tuple[int, ...]]:
    """Add the internal sites that derived kinds are computed from; drop absent kinds."""
    out = {k: tuple(v) for k, v in requests.items() if v}

    def need(kind: str, layers: Sequence[int]) -> None:
        out[kind] = tuple(sorted(set(out.get(kind, ())) | set(layers)))

    for kind, layers in list(out.items()):
        loc = locate(kind, m)
        if loc.absent:  # mlp_gate of a plain MLP: nothing to record
            del out[kind]
        elif loc.read is None:
            for source in loc.derived:
                need(source, layers)
    return out


def record(
    adapter: ModelParts,
    batch: Batch,
    requests: Mapping[str, Sequence[int]],
    *,
    storage: Mapping[str, tuple[torch.dtype | None, str | torch.device | None]] | None = None,
    stop_early: bool = True,
    on_output: Callable[[Any], None] | None = None,
    rows: int | None = None,
    recorder: Recorder | None = None,
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
        rows: run attention a block of this many query positions at a time in every layer
            (long contexts: no layer holds ``[B, H, T, T]`` scores; patterns are stored block
            by block), see :mod:`oculi.capture.blocked`.
        recorder: the :class:`Recorder` to fill (a streaming one writes to disk); default a
            new one over ``storage``.
    """
    for kind in requests:
        if kind not in SITE_KINDS and kind not in INTERNAL_KINDS:
            raise KeyError(kind)
    plan = expand_requests(adapter, requests)
    rec = recorder if recorder is not None else Recorder(plan, storage or {})
    taps: dict[int, LayerTaps] = {}
    last = max((max(ls) for ls in plan.values()), default=-1)
    t = batch.input_ids.shape[-1] if rows else None
    with no_grad(), HookSet() as hooks:
        _register(adapter, hooks, plan, rec, taps, t)
        if stop_early and last < adapter.n_layers - 1:

            def stop(_m, _a, _o):
                raise StopForward

            hooks.forward(adapter.layer_modules[last], stop)
        try:
            if taps or rows:
                with attention_bridge(
                    adapter.attention_configs, adapter.attention_layer_ids, taps, rows=rows
                ) as routed:
                    routed.check_switched()
                    try:
                        out = adapter.decoder(**batch.model_kwargs(), use_cache=False)
                    except StopForward:
                        routed.check_routed(taps)  # every tapped layer ran before the stop
                        raise
                    routed.check_routed(taps)
            else:
                out = adapter.decoder(**batch.model_kwargs(), use_cache=False)
            if on_output is not None:
                on_output(out)
        except StopForward:
            forward_ended()  # the open interventions' overflow checks
    ranged = rec.check_range()
    rec.wait()  # the stored copies are read to confirm a non-finite sum
    rec.check_finite(ranged)
    return _finish(adapter, rec, requests)


def _finish(adapter: ModelParts, rec: Recorder, requests: Mapping[str, Sequence[int]]):
    rec.wait()
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
        if not wanted or locate(kind, adapter).absent:
            continue
        with no_grad():  # no autograd graph (and no model weights) kept in a capture
            if kind == "resid_mid" and kind not in bufs:
                pre, attn = pick("resid_pre", wanted), pick("attn_out", wanted)
                mid = rec.derived(kind, tuple(pre.shape), pre)
                for i in range(len(wanted)):  # a layer at a time (a long context's stays small)
                    mid[:, i] = pre[:, i] + attn[:, i].to(pre.device)
                    rec.stored(kind, wanted[i], mid[:, i])
                out[kind] = (wanted, mid)
            elif kind == "head_out":
                o_out = pick("o_out", wanted) if "o_out" in bufs else None

                def alloc(shape: tuple[int, ...], like: torch.Tensor, kind: str = kind):
                    return rec.derived(kind, shape, like)

                def done(i: int, view: torch.Tensor, kind: str = kind, wanted=wanted) -> None:
                    rec.stored(kind, wanted[i], view)

                heads = head_contributions(
                    adapter, pick("o_in", wanted), wanted, o_out, alloc=alloc, done=done
                )
                out[kind] = (wanted, stored(kind, heads))
            else:
                out[kind] = (wanted, pick(kind, wanted))
    return out
