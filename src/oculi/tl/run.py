"""``run_with_cache`` and ``run_with_hooks``: TransformerLens's two entry points on oculi's hooks.

::

    logits, cache = adapter.run_with_cache("When Mary and John went to the store, John gave")
    cache["blocks.3.attn.hook_pattern"]          # [batch, head, query_pos, key_pos]

    def zero_head(z, hook):                      # TransformerLens's hook-function signature
        z[:, :, 2] = 0.0                         # z: [batch, pos, head, d_head]
        return z
    logits = adapter.run_with_hooks(tokens, fwd_hooks=[("blocks.3.attn.hook_z", zero_head)])

A hook function gets the activation in TransformerLens's layout and a :class:`HookPoint`
(``hook.name``, ``hook.layer()``, ``hook.ctx``); a returned tensor replaces the activation, and
``None`` keeps it (with any in-place change made to it). Nothing new is hooked here: names are
oculi sites (:mod:`oculi.tl.names`), written through an
:class:`~oculi.intervention.context.InterventionContext` and read by the capture engine in the
same forward, so the cache records the model as the hooks changed it. Every hook is removed when
the call returns, also when a hook function raises. Runs are without gradients, like captures.

Inputs are what TransformerLens takes (a string, a list of strings, ``[batch, pos]`` or
``[pos]`` token ids) and what oculi takes (``attention_mask=``, a ``BatchEncoding``). Strings are
tokenised as oculi's captures tokenise them (the tokenizer's own BOS convention) unless
``prepend_bos`` says otherwise; see :func:`oculi.tl.tokens.to_tokens`. Outputs always keep the
batch dimension, as TransformerLens's do: logits ``[batch, pos, d_vocab]``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from oculi.capture.bridge import LayerTaps, attention_bridge
from oculi.capture.engine import record
from oculi.capture.hooks import HookSet, first_tensor, hidden_arg, replace_first
from oculi.capture.inputs import Batch
from oculi.capture.interrupts import no_grad
from oculi.capture.unembed import soft_cap
from oculi.errors import InputError
from oculi.intervention.base import Binding, Intervention
from oculi.intervention.context import InterventionContext
from oculi.intervention.writers import Edit, check_writable
from oculi.models.anatomy import get_path
from oculi.tl.cache import ActivationCache
from oculi.tl.names import HookSpec, NamesFilter, hook_specs, resolve, select
from oculi.tl.tokens import to_tokens

if TYPE_CHECKING:
    from oculi.models.adapter import Adapter

ReturnType = Literal["logits", "loss", "both"] | None
HookFn = Callable[..., "torch.Tensor | None"]
_LAYER = re.compile(r"^blocks\.(\d+)\.")


class HookPoint:
    """The ``hook`` argument of a hook function: which activation it is looking at.

    Attributes:
        name: the TransformerLens hook name (``"blocks.3.attn.hook_z"``).
        ctx: a dict the function may keep things in for the rest of the call.

    Example::

        def patch_head(z, hook):                   # z: [batch, pos, head, d_head]
            print(hook.name, hook.layer())         # blocks.9.attn.hook_z 9
            return z

        adapter.run_with_hooks(tokens, fwd_hooks=[("blocks.9.attn.hook_z", patch_head)])
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.ctx: dict[str, Any] = {}

    def layer(self) -> int:
        """The block index in the name; a ``ValueError`` for ``hook_embed`` and ``ln_final``."""
        match = _LAYER.match(self.name)
        if match is None:
            raise ValueError(f"{self.name!r} belongs to no block, so it has no layer")
        return int(match.group(1))

    def __repr__(self) -> str:
        return f"HookPoint({self.name!r})"


def _call(fn: HookFn, hook: HookPoint, act: torch.Tensor) -> torch.Tensor:
    """``fn(act, hook=hook)``: its tensor if it returns one (same shape), else ``act``."""
    out = fn(act, hook=hook)
    if out is None:
        return act
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"the hook function on {hook.name!r} returned {type(out).__name__}; return a tensor "
            "of the activation's shape, or None to keep the (possibly edited in place) input"
        )
    if out.shape != act.shape:
        raise ValueError(
            f"the hook function on {hook.name!r} returned shape {list(out.shape)}, but the "
            f"activation is {list(act.shape)}; return a tensor of the same shape"
        )
    return out


def tl_scores(scores: torch.Tensor) -> torch.Tensor:
    """Masked scores as TransformerLens shows them: masked entries ``-inf``, not the dtype's
    minimum that Hugging Face's additive mask leaves there."""
    return scores.masked_fill(scores <= torch.finfo(scores.dtype).min, float("-inf"))


class _SiteHooks(Intervention):
    """Hook functions on oculi sites, as interventions (written where the site map says)."""

    def __init__(self, hooks: list[tuple[HookSpec, HookFn, HookPoint]]) -> None:
        self.hooks = hooks

    def bind(self, adapter: Adapter) -> Binding:
        edits = []
        for spec, fn, point in self.hooks:
            assert spec.kind is not None and spec.layer is not None  # a site spec
            check_writable(adapter, spec.kind, f"hook {spec.name!r}")
            edits.append(Edit(spec.kind, spec.layer, _editor(spec, fn, point), owner=self))
        return Binding(edits)


def _editor(spec: HookSpec, fn: HookFn, point: HookPoint) -> Callable[[torch.Tensor, Any], None]:
    def apply(x: torch.Tensor, _span: Any) -> None:
        act = x.transpose(1, 2) if spec.heads else x  # a view: writes reach x
        out = _call(fn, point, act)
        if out is not act:
            act.copy_(out)

    return apply


def _module(adapter: Adapter, spec: HookSpec) -> nn.Module:
    assert spec.path is not None
    return adapter.module(spec.path) if spec.layer is None else adapter.part(spec.layer, spec.path)


def norm_scale(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The divisor of ``norm`` for input ``x [..., d]``: ``[..., 1]`` (:mod:`oculi.tl.names`)."""
    eps = getattr(norm, "eps", None)
    if eps is None:
        eps = getattr(norm, "variance_epsilon", None)
    if eps is None:
        raise InputError(f"{type(norm).__name__} names no epsilon (eps, variance_epsilon)")
    xf = x.float()
    if isinstance(norm, nn.LayerNorm):
        xf = xf - xf.mean(-1, keepdim=True)
    return (xf.pow(2).mean(-1, keepdim=True) + eps).sqrt().to(x.dtype)


def _add_write(adapter, hooks: HookSet, taps, spec: HookSpec, fn: HookFn, point) -> None:
    if spec.source == "scores":
        assert spec.layer is not None
        taps.setdefault(spec.layer, LayerTaps()).masked_scores.append(
            lambda s: _call(fn, point, tl_scores(s))
        )
    else:  # module_out: hook_embed/hook_pos_embed with position embeddings, ln_final
        hooks.forward(
            _module(adapter, spec),
            lambda _m, _a, out: replace_first(out, _call(fn, point, first_tensor(out).clone())),
        )


def _add_read(adapter, hooks: HookSet, taps, spec: HookSpec, store: dict) -> None:
    def keep(x: torch.Tensor) -> None:
        store[spec.name] = x.detach().clone()

    if spec.source == "scores":
        assert spec.layer is not None
        taps.setdefault(spec.layer, LayerTaps()).masked_scores.append(lambda s: keep(tl_scores(s)))
    elif spec.source == "scale":
        norm = _module(adapter, spec)
        hooks.forward_pre_kwargs(
            norm, lambda _m, args, kwargs: keep(norm_scale(norm, hidden_arg(args, kwargs)))
        )
    else:
        hooks.forward(_module(adapter, spec), lambda _m, _a, out: keep(first_tensor(out)))


@contextmanager
def installed(
    adapter: Adapter, writes: Sequence[tuple[HookSpec, HookFn, HookPoint]]
) -> Iterator[None]:
    """Hook functions ``writes`` applied to every forward of the model inside the block."""
    for spec, _fn, _point in writes:
        if spec.readonly:
            raise ValueError(spec.readonly)
    site_writes = [w for w in writes if w[0].source == "site"]
    context: Any = nullcontext()
    if site_writes:
        context = InterventionContext(adapter, [_SiteHooks(list(site_writes))])
    with context, HookSet() as hooks:
        taps: dict[int, LayerTaps] = {}
        for spec, fn, point in writes:
            if spec.source != "site":
                _add_write(adapter, hooks, taps, spec, fn, point)
        if taps:
            hooks.enter(
                attention_bridge(adapter.attention_configs, adapter.attention_layer_ids, taps)
            )
        yield


def forward(
    adapter: Adapter,
    batch: Batch,
    writes: Sequence[tuple[HookSpec, HookFn, HookPoint]] = (),
    reads: Sequence[HookSpec] = (),
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward with hook functions ``writes`` applied and ``reads`` recorded.

    Returns the final normalised residual ``[B, T, d]`` and ``{name: activation}`` in
    TransformerLens layout, in ``reads`` order.
    """
    requests: dict[str, set[int]] = {}
    for spec in reads:
        if spec.source == "site":
            assert spec.kind is not None and spec.layer is not None
            requests.setdefault(spec.kind, set()).add(spec.layer)
    stored: dict[str, torch.Tensor] = {}
    outputs: list[Any] = []
    # the reads are registered after the writes, so they see what the writes did; each set
    # closes its bridge with its hooks (no unprotected ExitStack between them)
    with installed(adapter, writes), no_grad(), HookSet() as hooks:
        taps: dict[int, LayerTaps] = {}
        for spec in reads:
            if spec.source != "site":
                _add_read(adapter, hooks, taps, spec, stored)
        routed = None
        if taps:
            routed = hooks.enter(
                attention_bridge(adapter.attention_configs, adapter.attention_layer_ids, taps)
            )
        kinds = {kind: sorted(layers) for kind, layers in requests.items()}
        recorded = record(adapter, batch, kinds, stop_early=False, on_output=outputs.append)
        if routed is not None:
            routed.check_routed(taps)
    out = outputs[0]
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    acts: dict[str, torch.Tensor] = {}
    for spec in reads:
        if spec.source == "site":
            assert spec.kind is not None
            layers, tensor = recorded[spec.kind]
            act = tensor[:, layers.index(spec.layer)]
            acts[spec.name] = act.transpose(1, 2).contiguous() if spec.heads else act
        else:
            acts[spec.name] = stored[spec.name]
    return hidden, acts


def _batch(adapter: Adapter, input: Any, prepend_bos: bool | None, attention_mask: Any) -> Batch:
    is_text = isinstance(input, str) or (
        isinstance(input, (list, tuple)) and bool(input) and isinstance(input[0], str)
    )
    if is_text and prepend_bos is not None:
        if attention_mask is not None:
            raise InputError("attention_mask= goes with token ids; strings are padded by oculi")
        tokens, mask = to_tokens(adapter, input, prepend_bos=prepend_bos, return_mask=True)
        return adapter.prepare(tokens, attention_mask=mask)
    return adapter.prepare(input, attention_mask)


def _outputs(adapter: Adapter, hidden: torch.Tensor, batch: Batch, return_type: ReturnType):
    if return_type not in ("logits", "loss", "both", None):
        raise InputError(
            f"return_type must be 'logits', 'loss', 'both' or None, got {return_type!r}"
        )
    if return_type is None:
        return None
    with no_grad():
        logits = get_path(adapter.model, adapter.anatomy.unembed)(hidden)
        logits = soft_cap(logits, adapter.unembedding()[2])
    if return_type == "logits":
        return logits
    loss = lm_loss(logits, batch)
    return loss if return_type == "loss" else (logits, loss)


def lm_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy over the real (unpadded) token pairs."""
    logp = logits[:, :-1].float().log_softmax(-1)
    target = batch.input_ids[:, 1:]
    nll = -logp.gather(-1, target[..., None].to(logp.device))[..., 0]
    mask = (batch.attention_mask[:, 1:] * batch.attention_mask[:, :-1]).to(nll.device, nll.dtype)
    if float(mask.sum()) == 0:
        raise InputError("the loss needs at least two real tokens in some row")
    return (nll * mask).sum() / mask.sum()


def _expand(adapter: Adapter, fwd_hooks: Iterable[Any]) -> list[tuple[HookSpec, HookFn, HookPoint]]:
    """``[(name or name filter, fn)]`` -> one entry per hook name matched."""
    specs = hook_specs(adapter)
    out = []
    points: dict[str, HookPoint] = {}
    for item in fwd_hooks:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and callable(item[1])):
            raise TypeError(
                f"fwd_hooks takes (name, function) pairs, e.g. [('blocks.0.hook_resid_pre', fn)], "
                f"got {item!r}"
            )
        where, fn = item
        if callable(where):
            matched = [s for n, s in specs.items() if where(n) and not s.readonly]
        else:
            matched = [resolve(adapter, where, specs)]
        for spec in matched:
            out.append((spec, fn, points.setdefault(spec.name, HookPoint(spec.name))))
    return out


def run_with_hooks(
    adapter: Adapter,
    input: Any,
    fwd_hooks: Iterable[Any] = (),
    bwd_hooks: Iterable[Any] = (),
    *,
    return_type: ReturnType = "logits",
    prepend_bos: bool | None = None,
    attention_mask: Any = None,
    reset_hooks_end: bool = True,
    clear_contexts: bool = False,
) -> Any:
    """One forward with TransformerLens-style hook functions (see the module docstring).

    Args:
        adapter: the model.
        input: a string, strings, or token ids ``[batch, pos]`` / ``[pos]``.
        fwd_hooks: ``[(name, fn)]``; ``name`` may also be a predicate on hook names.
            ``fn(activation, hook)`` returns the replacement or ``None``.
        bwd_hooks: not supported (runs are without gradients); a non-empty list raises.
        return_type: ``"logits"`` ``[batch, pos, d_vocab]``, ``"loss"`` (mean next-token
            cross-entropy), ``"both"`` or ``None``.
        prepend_bos: for strings: ``None`` tokenises as oculi's captures do, ``True``/``False``
            forces a BOS token or none (TransformerLens's ``prepend_bos``).
        attention_mask: ``[batch, pos]`` for padded token ids.
        reset_hooks_end, clear_contexts: accepted for TransformerLens code; hooks never outlive
            the call here, and ``hook.ctx`` starts empty on every call.

    Raises:
        UnknownSiteError: a name this model does not have (with the closest ones).
        ValueError: a name that cannot be written (``attn.hook_result``, ``*.hook_scale``), or a
            hook function returning a tensor of another shape.
    """
    del reset_hooks_end, clear_contexts
    if list(bwd_hooks):
        raise InputError(
            "bwd_hooks are not supported: oculi runs hooks without gradients; for gradient "
            "attributions use oculi.patching.attribution_patching"
        )
    writes = _expand(adapter, fwd_hooks)
    batch = _batch(adapter, input, prepend_bos, attention_mask)
    hidden, _ = forward(adapter, batch, writes)
    return _outputs(adapter, hidden, batch, return_type)


def run_with_cache(
    adapter: Adapter,
    input: Any,
    names_filter: NamesFilter = None,
    *,
    return_type: ReturnType = "logits",
    remove_batch_dim: bool = False,
    prepend_bos: bool | None = None,
    attention_mask: Any = None,
    fwd_hooks: Iterable[Any] = (),
    device: str | torch.device | None = None,
    return_cache_object: bool = True,
    incl_bwd: bool = False,
) -> tuple[Any, Any]:
    """One forward returning ``(logits, cache)``, the cache keyed by TransformerLens names.

    Example::

        logits, cache = adapter.run_with_cache(tokens, names_filter=lambda n: "pattern" in n)
        cache["pattern", 3]                        # [batch, head, query_pos, key_pos]
        resid, labels = cache.decompose_resid(pos_slice=-1, return_labels=True)
        cache.logit_attrs(resid, " Paris")         # each component's share of the logit

    Args:
        adapter: the model.
        input: as :func:`run_with_hooks`.
        names_filter: ``None`` (every hook TransformerLens caches by default: all but
            ``attn.hook_result`` and ``hook_mlp_in``), a name, a list of names, or a predicate.
            Only the hooks it picks are hooked.
        return_type: as :func:`run_with_hooks`.
        remove_batch_dim: drop the batch dimension of a one-row cache (not of the logits).
        prepend_bos, attention_mask: as :func:`run_with_hooks`.
        fwd_hooks: hook functions applied in the same forward (the cache records their effect).
        device: where to put the cached tensors (default: where they were computed).
        return_cache_object: ``False`` returns the plain ``{name: tensor}`` dict instead.
        incl_bwd: gradients are not cached (runs are without gradients); ``True`` raises.

    Returns:
        ``(output, cache)``: ``output`` as ``return_type`` says, ``cache`` an
        :class:`~oculi.tl.cache.ActivationCache`.
    """
    if incl_bwd:
        raise InputError(
            "incl_bwd=True is not supported: oculi caches forward activations without "
            "gradients; for gradient attributions use oculi.patching.attribution_patching"
        )
    reads = select(adapter, names_filter)
    order = {n: i for i, n in enumerate(hook_specs(adapter))}
    reads = sorted(reads, key=lambda s: order[s.name])
    writes = _expand(adapter, fwd_hooks)
    batch = _batch(adapter, input, prepend_bos, attention_mask)
    hidden, acts = forward(adapter, batch, writes, reads)
    cache = ActivationCache(acts, adapter, attention_mask=batch.attention_mask)
    if device is not None:
        cache.to(device)
    if remove_batch_dim:
        cache.remove_batch_dim()
    out = _outputs(adapter, hidden, batch, return_type)
    return out, (cache if return_cache_object else cache.cache_dict)


@contextmanager
def hooks(
    adapter: Adapter,
    fwd_hooks: Iterable[Any] = (),
    bwd_hooks: Iterable[Any] = (),
    reset_hooks_end: bool = True,
    clear_contexts: bool = False,
) -> Iterator[Adapter]:
    """TransformerLens's ``with model.hooks(fwd_hooks=[(name, fn)]):`` block.

    Every forward of the model inside the block runs the hook functions: ``adapter(tokens)``,
    ``run_with_cache`` (which then records their effect), oculi's captures and patching, and
    ``adapter.generate`` (with a KV cache each step's forward sees only its new positions, as
    in TransformerLens). The hooks are removed when the block ends, also on an exception.
    """
    del reset_hooks_end, clear_contexts
    if list(bwd_hooks):
        raise InputError("bwd_hooks are not supported: oculi runs hooks without gradients")
    with installed(adapter, _expand(adapter, fwd_hooks)):
        yield adapter
