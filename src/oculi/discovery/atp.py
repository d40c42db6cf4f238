"""AtP* (Kramár et al. 2024): attribution patching of nodes, with the QK fix and GradDrop.

Nodes are each head's query (``a{l}.h{h}.q``), each key/value head's key and value
(``a{l}.kv{g}.k``/``.v``; ``a{l}.h{g}.k`` without GQA) and each MLP's output (``m{l}``), the
receivers of a ``"qkv"`` graph plus the MLPs. Patching a node gives it its value in the corrupt
prompt at every position. Attribution patching (AtP) estimates the effect as ``(corrupt − clean) · ∂metric/∂node``
from one backward pass. AtP* corrects its two known failures:

- **QK fix.** A query or key acts through the softmax, where a linear estimate misses saturated
  patterns. The pattern with the node patched, ``A'``, is computed exactly (one batched forward
  with the family's own attention) and only its effect is linearised:
  ``ΔA · ∂metric/∂A``, summed over the heads that read the key.
- **GradDrop.** A node's direct and indirect effects can cancel in the gradient. The gradient is
  recomputed ``L`` times, each time with one layer's attention and MLP outputs cut from the
  backward pass, and the node's score is ``Σ_l |c_l(n)| / (L − 1)`` (a ranking score: its
  sign is dropped, as in the paper's estimator).

``atp_star(..., qk_fix=False, grad_drop=False)`` is plain AtP. The exact reference for a node is
exact edge patching of every edge into it (q/k/v) or out of it (MLPs):
``scores.exact_nodes()``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from oculi.capture.bridge import LayerTaps, attention_bridge
from oculi.capture.hooks import HookSet, first_tensor, replace_first
from oculi.capture.interrupts import enable_grad, no_grad
from oculi.discovery.graph import Graph
from oculi.discovery.patch import EdgePatcher
from oculi.discovery.scores import CircuitScores
from oculi.errors import InputError
from oculi.patching.metrics import Metric
from oculi.patching.resume import unembed

if TYPE_CHECKING:
    from oculi.models.adapter import Adapter


def atp_star(
    adapter: Adapter,
    graph: Graph,
    clean: Any,
    corrupt: Any,
    *,
    metric: Metric,
    qk_fix: bool = True,
    grad_drop: bool = True,
) -> CircuitScores:
    """AtP* node scores; ``scores.nodes`` maps node names to scores.

    Args:
        graph: a ``"qkv"`` graph (its receivers are the attention nodes).
        qk_fix, grad_drop: the two corrections (both off: plain AtP).

    Returns:
        :class:`CircuitScores` with ``nodes`` set (edge ``values`` are NaN);
        ``scores.circuit(top_n=k)`` keeps the ``k`` best nodes and the edges between them.
    """
    if graph.level != "qkv":
        raise InputError(
            f"atp_star scores q/k/v nodes; build the graph with level='qkv' (got {graph.level!r})"
        )
    patcher = EdgePatcher(adapter, graph, clean, corrupt, metric=metric)
    run = _Nodes(adapter, patcher)
    primed = run.primed_patterns() if qk_fix else None
    layers = range(adapter.n_layers)
    if grad_drop and adapter.n_layers > 1:
        parts = [run.scores(primed, drop=layer) for layer in layers]
        scores = {n: sum(abs(p[n]) for p in parts) / (adapter.n_layers - 1) for n in parts[0]}
    else:
        scores = run.scores(primed, drop=None)
    values = torch.full((len(graph.edges),), float("nan"))
    info = {"qk_fix": qk_fix, "grad_drop": grad_drop}
    return CircuitScores(
        graph,
        values,
        "atp*" if (qk_fix or grad_drop) else "atp",
        patcher.clean_value,
        patcher.corrupt_value,
        patcher,
        info,
        nodes=scores,
    )


class _Nodes:
    """Clean and corrupt q/k/v/pattern/MLP values, and gradients with one layer dropped."""

    def __init__(self, adapter: Adapter, patcher: EdgePatcher) -> None:
        self.adapter, self.patcher = adapter, patcher
        self.graph = patcher.graph
        self.group = adapter.n_heads // adapter.n_kv_heads
        with no_grad():
            self.corrupt = self._record(patcher.corrupt_batch)

    def _record(self, batch: Any) -> dict[str, torch.Tensor]:
        seen: dict[str, torch.Tensor] = {}
        a = self.adapter
        taps = {
            layer: LayerTaps(
                q=[_keep(seen, f"q{layer}")],
                k=[_keep(seen, f"k{layer}")],
                v=[_keep(seen, f"v{layer}")],
            )
            for layer in range(a.n_layers)
        }
        with HookSet() as hooks, attention_bridge(a.attention_configs, a.attention_layer_ids, taps):
            for layer in range(a.n_layers):
                mlp = a.part(layer, a.anatomy.mlp_out_norm or a.anatomy.mlp)
                hooks.forward(mlp, _keep_out(seen, f"m{layer}"))
            a.decoder(**batch.model_kwargs(), use_cache=False)
        return seen

    def primed_patterns(self) -> dict[str, torch.Tensor]:
        """``A'`` for each q and k node: the layer's patterns ``[P, H, T, S]`` with that node
        alone corrupt, from one forward whose copies each patch one node."""
        a, p = self.adapter, self.patcher.n_prompts
        nodes = [(layer, "q", h) for layer in range(a.n_layers) for h in range(a.n_heads)]
        nodes += [(layer, "k", g) for layer in range(a.n_layers) for g in range(a.n_kv_heads)]
        rows = {node: i for i, node in enumerate(nodes)}
        seen: dict[int, torch.Tensor] = {}
        taps: dict[int, LayerTaps] = {}
        for layer in range(a.n_layers):

            def swap(kind: str, layer: int = layer):
                def tap(x: torch.Tensor) -> torch.Tensor:
                    x = x.clone().view(len(nodes), p, *x.shape[1:])
                    src = self.corrupt[f"{kind}{layer}"]
                    n = a.n_heads if kind == "q" else a.n_kv_heads
                    for head in range(n):
                        x[rows[(layer, kind, head)], :, head] = src[:, head]
                    return x.view(-1, *x.shape[2:])

                return tap

            taps[layer] = LayerTaps(
                q=[swap("q")], k=[swap("k")], pattern=[_keep_layer(seen, layer)]
            )
        batch = self.patcher.copies(len(nodes))
        with no_grad(), attention_bridge(a.attention_configs, a.attention_layer_ids, taps):
            a.decoder(**batch.model_kwargs(), use_cache=False)
        out = {}
        for (layer, kind, head), i in rows.items():
            pattern = seen[layer].view(len(nodes), p, *seen[layer].shape[1:])[i]
            out[_node(self.graph, layer, kind, head)] = pattern
        return out

    def scores(self, primed: dict[str, torch.Tensor] | None, drop: int | None) -> dict[str, float]:
        """Node scores from one forward and backward on the clean prompts, with layer ``drop``'s
        attention and MLP outputs cut from the backward pass."""
        a, patcher = self.adapter, self.patcher
        leaves: dict[str, torch.Tensor] = {}
        clean: dict[str, torch.Tensor] = {}

        def leafy(key: str):
            def tap(x: torch.Tensor) -> torch.Tensor:
                clean[key] = x.detach()
                leaves[key] = torch.zeros_like(x, requires_grad=True)
                return x + leaves[key]

            return tap

        taps = {
            layer: LayerTaps(
                q=[leafy(f"q{layer}")],
                k=[leafy(f"k{layer}")],
                v=[leafy(f"v{layer}")],
                pattern=[leafy(f"A{layer}")],
                pattern_edits=True,
            )
            for layer in range(a.n_layers)
        }
        # the set closes the bridge with its hooks (no unprotected ExitStack between them)
        with HookSet() as hooks, enable_grad():
            hooks.enter(attention_bridge(a.attention_configs, a.attention_layer_ids, taps))
            for layer in range(a.n_layers):
                mlp = a.part(layer, a.anatomy.mlp_out_norm or a.anatomy.mlp)
                hooks.forward(mlp, _leaf_out(clean, leaves, f"m{layer}", cut=layer == drop))
                if layer == drop:
                    attn = a.part(layer, a.anatomy.attn_out_norm or a.anatomy.attn)
                    hooks.forward(attn, _cut)
            hidden = a.decoder(**patcher.clean.model_kwargs(), use_cache=False).last_hidden_state
            value = patcher.metric(unembed(a, hidden[:, patcher.read], patcher.metric.columns()))
            names = list(leaves)
            grads = torch.autograd.grad(
                value.float().mean(), [leaves[n] for n in names], allow_unused=True
            )
        g = {n: (torch.zeros_like(leaves[n]) if x is None else x) for n, x in zip(names, grads)}
        return self._combine(clean, g, primed)

    def _combine(self, clean, g, primed) -> dict[str, float]:
        a, out = self.adapter, {}
        with no_grad():
            for layer in range(a.n_layers):
                gp, pattern = g[f"A{layer}"], clean[f"A{layer}"]
                for h in range(a.n_heads):
                    name = _node(self.graph, layer, "q", h)
                    if primed is not None:
                        delta = primed[name][:, h] - pattern[:, h]
                        out[name] = float((delta * gp[:, h]).sum())
                    else:  # plain AtP: Δq · ∂metric/∂q
                        dq = self.corrupt[f"q{layer}"][:, h] - clean[f"q{layer}"][:, h]
                        out[name] = float((dq * g[f"q{layer}"][:, h]).sum())
                for kv in range(a.n_kv_heads):
                    name = _node(self.graph, layer, "k", kv)
                    heads = range(kv * self.group, (kv + 1) * self.group)
                    if primed is not None:
                        delta = primed[name][:, heads] - pattern[:, heads]
                        out[name] = float((delta * gp[:, heads]).sum())
                    else:
                        dk = self.corrupt[f"k{layer}"][:, kv] - clean[f"k{layer}"][:, kv]
                        out[name] = float((dk * g[f"k{layer}"][:, kv]).sum())
                    dv = self.corrupt[f"v{layer}"][:, kv] - clean[f"v{layer}"][:, kv]
                    out[_node(self.graph, layer, "v", kv)] = float(
                        (dv * g[f"v{layer}"][:, kv]).sum()
                    )
                dm = self.corrupt[f"m{layer}"] - clean[f"m{layer}"]
                out[f"m{layer}"] = float((dm * g[f"m{layer}"]).sum())
        return out


def _node(graph: Graph, layer: int, kind: str, head: int) -> str:
    if kind == "q":
        return f"a{layer}.h{head}.q"
    kv = f"a{layer}.kv{head}" if graph.n_kv_heads != graph.n_heads else f"a{layer}.h{head}"
    return f"{kv}.{kind}"


def _keep(store: dict, key: str):
    def tap(x: torch.Tensor) -> None:
        store[key] = x.detach().clone()

    return tap


def _keep_layer(store: dict, layer: int):
    def tap(x: torch.Tensor) -> None:
        store[layer] = x.detach().clone()

    return tap


def _keep_out(store: dict, key: str):
    def hook(_m: Any, _a: Any, out: Any) -> None:
        store[key] = first_tensor(out).detach().clone()

    return hook


def _leaf_out(clean: dict, leaves: dict, key: str, *, cut: bool):
    def hook(_m: Any, _a: Any, out: Any) -> Any:
        x = first_tensor(out)
        clean[key] = x.detach()
        leaves[key] = torch.zeros_like(x, requires_grad=True)
        y = x + leaves[key]
        return replace_first(out, y.detach() if cut else y)

    return hook


def _cut(_m: Any, _a: Any, out: Any) -> Any:
    return replace_first(out, first_tensor(out).detach())
