"""One forward in which every row carries its own set of patched edges.

Each row ``n`` of the batch has a weight ``w[n, e]`` per edge: receiver ``r`` reads

    input_n(r) = actual_n(r) + Σ_{edges e = s -> r} w[n, e] · (source(s) − actual_n(s))

where ``actual_n(s)`` is sender ``s``'s output in this very row's forward (so upstream patches
propagate) and ``source(s)`` its output in the corrupt run (or its mean, or zero). ``w = 1``
patches the edge, ``0`` leaves it, values in between interpolate (EAP-IG). A receiver can also
carry a zero tensor that requires grad, so one backward gives ``∂metric/∂input(r)`` for every
receiver at once (EAP).

Hooks (all in one :class:`~oculi.capture.hooks.HookSet`, removed on any exit):

- senders are read where they join the residual: the first layer's input (``input``), the
  attention or MLP branch output, or the output projection's input and output (heads);
- layer-level receivers (``a{l}``, ``m{l}``, ``logits``) add their delta to the input of the
  norm in front of the component (its module input where there is none);
- head receivers get their own normalised input: the norm in front of attention is recomputed
  on ``resid + delta`` and the head's slice of the q/k/v projection output is replaced by the
  projection of that input (fused projections are sliced with the site map's views).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from oculi.capture.hooks import HookSet, first_tensor, hidden_arg, replace_first
from oculi.capture.inputs import Batch
from oculi.capture.places import fused_qkv_view, heads_view
from oculi.discovery.graph import Graph, Receiver
from oculi.patching.resume import ResumableRun

if TYPE_CHECKING:
    from oculi.models.adapter import Adapter

Outputs = dict[str, torch.Tensor]


class EdgeForward:
    """Runs ``batch`` (``S`` copies of ``P`` prompts, set-major) with per-row edge weights.

    Args:
        adapter: the model's adapter.
        graph: the graph whose edges ``weights`` indexes.
        source: sender outputs of the patch source, ``[P, T, ...]`` per key (see
            :meth:`read`), or ``None`` for a plain run that only records.
    """

    def __init__(self, adapter: Adapter, graph: Graph, source: Outputs | None) -> None:
        self.adapter, self.graph, self.source = adapter, graph, source
        # (layer, first position) -> head_deltas of source − clean, [1, H, T', d] (resumed runs)
        self.frozen_heads: dict[tuple[int, int], torch.Tensor] = {}
        self.frozen_post: dict[tuple[int, int], torch.Tensor] = {}  # post-norm of clean x{l}
        # per receiver: linear senders [(edge, key)] and head senders {layer: [edge per head]}
        self.linear: dict[str, list[tuple[int, str]]] = {r.name: [] for r in graph.receivers}
        self.heads: dict[str, dict[int, list[int]]] = {r.name: {} for r in graph.receivers}
        for i, e in enumerate(graph.edges):
            s, r = e.sender, e.receiver.name
            if s.kind == "head":
                self.heads[r].setdefault(s.layer, [0] * graph.n_heads)[s.head or 0] = i
            else:
                self.linear[r].append((i, s.name))
        # per receiver, its head edges layer by layer, flat ([layers * H] columns of weights)
        self.head_columns = {
            r: [i for row in v.values() for i in row] for r, v in self.heads.items()
        }

    # -- sender keys ---------------------------------------------------------------------
    def keys(self) -> list[str]:
        """The recorded sender outputs: ``input``, ``a{l}``/``m{l}``, ``z{l}`` (heads)."""
        out = ["input"]
        for layer in range(self.graph.n_layers):
            out.append(f"z{layer}" if self.graph.level != "components" else f"a{layer}")
            out.append(f"m{layer}")
        return out

    def run(
        self,
        batch: Batch,
        weights: torch.Tensor | None,
        *,
        read: int,
        grad_receivers: bool = False,
        resume: tuple[ResumableRun, int, Outputs, int] | None = None,
    ) -> tuple[torch.Tensor, Outputs, dict[str, torch.Tensor]]:
        """Forward ``batch`` with ``weights [N, E]`` (``None``: no patch).

        ``resume=(recorded clean run, layer, clean sender outputs, first)`` starts at ``layer``
        from the recorded clean residual and runs positions ``first..T-1`` only: valid when no
        row patches an edge into a receiver before ``layer`` and every sender's source equals
        its clean output before position ``first`` (everything outside that block is then the
        clean run, whose keys and values the layers read; the caller checks).

        Returns:
            ``(hidden [N, d]`` final-normed at position ``read``, the actual sender outputs,
            the zero tensors added to each receiver's input (``requires_grad`` when
            ``grad_receivers``) keyed by receiver name``)``.
        """
        first, frozen = (resume[3], resume[1]) if resume is not None else (0, 0)
        state = _State(self, weights, grad_receivers, first, frozen)
        m = self.adapter
        with HookSet() as hooks:
            self._hook_senders(hooks, state)
            if weights is not None or grad_receivers:
                self._hook_receivers(hooks, state)
            if resume is None:
                hidden = m.decoder(**batch.model_kwargs(), use_cache=False).last_hidden_state
                return hidden[:, read], state.actual, state.extra
            run, start, clean, _ = resume
            n = batch.input_ids.shape[0]
            for key, value in clean.items():  # senders before `start` ran as in the clean run
                if _layer_of(key) < start:
                    value = value[:, first:]
                    state.actual[key] = value.expand(n, *value.shape[1:])
            # every position from `first` on: the logits receiver's change spans them all
            resid = run.resid[start : start + 1, first:].expand(n, -1, -1)
            hidden = run.run_from(start, resid, start=first)
        return hidden[:, read - first], state.actual, state.extra

    # -- hooks -----------------------------------------------------------------------------
    def _hook_senders(self, hooks: HookSet, st: _State) -> None:
        m, anat = self.adapter, self.adapter.anatomy
        hooks.forward_pre_kwargs(m.layer_modules[0], _reader(st.actual, "input", at_input=True))
        for layer in range(self.graph.n_layers):
            if self.graph.level == "components":
                branch = m.part(layer, anat.attn_out_norm or anat.attn)
                hooks.forward(branch, _reader(st.actual, f"a{layer}"))
            else:
                o_proj = m.part(layer, f"{anat.attn}.{anat.o_proj}")
                hooks.forward_pre_kwargs(o_proj, _reader(st.actual, f"z{layer}", at_input=True))
                hooks.forward(o_proj, _reader(st.actual, f"x{layer}"))
            mlp_branch = m.part(layer, anat.mlp_out_norm or anat.mlp)
            hooks.forward(mlp_branch, _reader(st.actual, f"m{layer}"))

    def _hook_receivers(self, hooks: HookSet, st: _State) -> None:
        m, anat = self.adapter, self.adapter.anatomy
        by_layer: dict[int, list[Receiver]] = {}
        for r in self.graph.receivers:
            if r.kind == "logits":
                hooks.forward_pre_kwargs(m.module(anat.final_norm), _adder(st, r))
            elif r.kind == "mlp":
                place = anat.mlp_norm or anat.mlp
                hooks.forward_pre_kwargs(m.part(r.layer, place), _adder(st, r))
            elif r.kind == "attn":
                place = anat.attn_norm or anat.attn
                hooks.forward_pre_kwargs(m.part(r.layer, place), _adder(st, r))
            else:
                by_layer.setdefault(r.layer, []).append(r)
        for layer, recv in by_layer.items():
            self._hook_heads(hooks, st, layer, recv)

    def _hook_heads(self, hooks: HookSet, st: _State, layer: int, recv: list[Receiver]) -> None:
        m, anat = self.adapter, self.adapter.anatomy
        norm = m.part(layer, anat.attn_norm) if anat.attn_norm else None
        normed: dict[str, torch.Tensor] = {}
        projected: dict[tuple[str, int], torch.Tensor] = {}

        def stash(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            resid = hidden_arg(args, kwargs)
            normed.clear()
            projected.clear()
            for r in recv:
                delta = st.delta(r)
                if delta is not None:
                    x = resid + delta
                    normed[r.name] = norm.forward(x) if norm is not None else x

        hooks.forward_pre_kwargs(norm if norm is not None else m.part(layer, anat.attn), stash)
        for proj, which, view in _projections(m, layer):
            users = [r for r in recv if which in r.proj]
            if users:
                hooks.forward(proj, _slicer(proj, view, users, normed, projected))


class _State:
    """What one forward accumulates: actual sender outputs and lazily computed head deltas."""

    def __init__(
        self,
        fwd: EdgeForward,
        weights: torch.Tensor | None,
        grad: bool,
        first: int = 0,
        frozen: int = 0,
    ) -> None:
        self.fwd, self.weights, self.grad = fwd, weights, grad
        self.first = first  # the forward runs positions first..T-1 only
        self.frozen = frozen  # senders before this layer ran as in the clean run (one prompt)
        self.actual: Outputs = {}
        self.extra: dict[str, torch.Tensor] = {}
        self._head_diff: dict[int, torch.Tensor] = {}
        self._diffs: dict[str, torch.Tensor] = {}
        self._post: dict[int, torch.Tensor] = {}

    def _diff(self, key: str) -> torch.Tensor:
        """``source − actual`` for a sender key, ``[N, T, ...]`` (once per forward: the sender's
        actual output is final once recorded)."""
        if key not in self._diffs:
            a, s = self.actual[key], self.fwd.source[key][:, self.first :]  # type: ignore[index]
            p = s.shape[0]
            if _layer_of(key) < self.frozen:  # every row is the clean run's (one prompt)
                self._diffs[key] = (s - a[:1]).expand(a.shape)
            else:
                self._diffs[key] = (s.unsqueeze(0) - a.view(-1, p, *a.shape[1:])).view(a.shape)
        return self._diffs[key]

    def head_diff(self, layer: int) -> torch.Tensor:
        """Each head's change of the output projection's output, ``[N, H, T, d]`` (no bias).

        For a layer before ``frozen`` every row's difference is ``source − clean``: computed for
        one row once per :class:`EdgeForward` (it is the same in every resumed forward) and
        broadcast, where it is most of a resumed forward's cost at the heads level."""
        if layer not in self._head_diff:
            dz = self._diff(f"z{layer}")
            if layer < self.frozen:
                cache = self.fwd.frozen_heads
                if (layer, self.first) not in cache:
                    cache[(layer, self.first)] = head_deltas(self.fwd.adapter, layer, dz[:1])
                one = cache[(layer, self.first)]
                self._head_diff[layer] = one.expand(dz.shape[0], *one.shape[1:])
            else:
                self._head_diff[layer] = head_deltas(self.fwd.adapter, layer, dz)
        return self._head_diff[layer]

    def delta(self, r: Receiver) -> torch.Tensor | None:
        """What receiver ``r``'s input changes by in each row, or ``None`` for nothing."""
        w, fwd = self.weights, self.fwd
        total: torch.Tensor | None = None
        if w is not None:
            linear = fwd.linear[r.name]
            if linear:
                cols = w[:, [edge for edge, _ in linear]]
                active = [i for i, on in enumerate(cols.any(0).tolist()) if on]  # one sync
                if active:
                    diffs = torch.stack([self._diff(linear[i][1]) for i in active])
                    total = torch.einsum("nk,kntd->ntd", cols[:, active].to(diffs.dtype), diffs)
            heads = fwd.heads[r.name]
            if heads:
                layers = list(heads)
                cols = w[:, fwd.head_columns[r.name]].view(w.shape[0], len(layers), -1)
                live = cols.any(2).any(0).tolist()  # one sync for every sender layer
                for k, layer in enumerate(layers):
                    if not live[k]:
                        continue
                    diff = self.head_diff(layer)
                    part = torch.einsum("nh,nhtd->ntd", cols[:, k].to(diff.dtype), diff)
                    x = self.actual[f"x{layer}"]
                    part = through_post_norm(fwd.adapter, layer, x, part, self._post_base(layer))
                    total = part if total is None else total + part
        if self.grad:
            like = self._like(r)
            leaf = torch.zeros_like(like, requires_grad=True)
            self.extra[r.name] = leaf
            total = leaf if total is None else total + leaf
        return total

    def _post_base(self, layer: int) -> torch.Tensor | None:
        """The norm after layer ``layer``'s attention branch applied to its actual output
        (once per forward; for a frozen layer once per :class:`EdgeForward`), or ``None``
        where the family has no such norm."""
        name = self.fwd.adapter.anatomy.attn_out_norm
        if name is None:
            return None
        if layer not in self._post:
            post = self.fwd.adapter.part(layer, name)
            x = self.actual[f"x{layer}"]
            if layer < self.frozen:
                cache = self.fwd.frozen_post
                if (layer, self.first) not in cache:
                    cache[(layer, self.first)] = post.forward(x[:1])
                one = cache[(layer, self.first)]
                self._post[layer] = one.expand(x.shape[0], *one.shape[1:])
            else:
                self._post[layer] = post.forward(x)
        return self._post[layer]

    def _like(self, r: Receiver) -> torch.Tensor:
        return self.actual["input"]


def _layer_of(key: str) -> int:
    """The layer of a sender key (``input``: -1; ``a3``, ``z3``, ``x3``, ``m3``: 3)."""
    return -1 if key == "input" else int(key[1:])


def head_deltas(adapter: Adapter, layer: int, dz: torch.Tensor) -> torch.Tensor:
    """What each head's share of ``dz [N, T, H*D]`` (a change of the output projection's input)
    changes its output by, ``[N, H, T, d]``: the projection of each head's block alone, bias
    removed. Uses the module's own forward (fused, Conv1D or quantized projections alike)."""
    o_proj = adapter.part(layer, f"{adapter.anatomy.attn}.{adapter.anatomy.o_proj}")
    n, t, hd = dz.shape
    h = adapter.n_heads
    blocks = torch.zeros(n, h, t, h, hd // h, dtype=dz.dtype, device=dz.device)
    idx = torch.arange(h, device=dz.device)
    blocks[:, idx, :, idx, :] = dz.view(n, t, h, hd // h).permute(2, 0, 1, 3)
    out = o_proj.forward(blocks.view(n, h, t, hd))
    return out - o_proj.forward(torch.zeros(1, hd, dtype=dz.dtype, device=dz.device))


def through_post_norm(
    adapter: Adapter,
    layer: int,
    x: torch.Tensor,
    part: torch.Tensor,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """``part`` (a change of the output projection's output ``x``) as the change of the attention
    branch's output: exact through a norm after the branch (Gemma 2/3, OLMo 2), else itself.
    ``part`` may carry extra leading axes before ``x``'s; ``base``: the norm of ``x`` where the
    caller has it already."""
    name = adapter.anatomy.attn_out_norm
    if name is None:
        return part
    post = adapter.part(layer, name)
    return post.forward(x + part) - (post.forward(x) if base is None else base)


def _reader(store: Outputs, key: str, *, at_input: bool = False) -> Callable[..., None]:
    if at_input:

        def read_in(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            store[key] = hidden_arg(args, kwargs)

        return read_in

    def read_out(_m: nn.Module, _args: Any, output: Any) -> None:
        store[key] = first_tensor(output)

    return read_out


def _adder(st: _State, r: Receiver) -> Callable[..., Any]:
    def add(_m: nn.Module, args: tuple, kwargs: dict) -> Any:
        delta = st.delta(r)
        if delta is None:
            return None
        new = hidden_arg(args, kwargs) + delta
        if args:
            return (new, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": new}

    return add


def _projections(m: Adapter, layer: int) -> list[tuple[nn.Module, str, Callable]]:
    """``(module, "q"|"k"|"v", view to [B, H, T, D])`` for the layer's q/k/v projections."""
    anat = m.anatomy
    if anat.qkv_proj is not None:
        fused = m.part(layer, f"{anat.attn}.{anat.qkv_proj}")
        return [(fused, "qkv"[i], fused_qkv_view(m, i)) for i in range(3)]
    out = []
    for which, name, n in (
        ("q", anat.q_proj, m.n_heads),
        ("k", anat.k_proj, m.n_kv_heads),
        ("v", anat.v_proj, m.n_kv_heads),
    ):
        out.append((m.part(layer, f"{anat.attn}.{name}"), which, heads_view(n, "flat")))
    return out


def _slicer(
    proj: nn.Module,
    view: Callable,
    users: list[Receiver],
    normed: dict[str, torch.Tensor],
    projected: dict[tuple[str, int], torch.Tensor],
) -> Callable[..., Any]:
    """Replace each receiver's head slice of ``proj``'s output by the projection of its own
    input. A fused projection gets one hook per part (q, k, v), each replacing its own slice of
    one projection per receiver (``projected``, shared by the three)."""

    def hook(_m: nn.Module, _args: Any, output: Any) -> Any:
        live = [r for r in users if r.name in normed]
        if not live:
            return None
        out = first_tensor(output).clone()
        for r in live:
            key = (r.name, id(proj))
            if key not in projected:
                projected[key] = proj.forward(normed[r.name])
            mine = projected[key]
            view(out)[:, r.head] = view(mine)[:, r.head]
        return replace_first(output, out)

    return hook
