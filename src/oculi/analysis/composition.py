"""Head composition (Elhage et al. 2021): how much a later head reads what an earlier one wrote.

::

    weights = HeadWeights.from_adapter(adapter)
    scores = CompositionAnalysis.all_composition_scores(weights)   # {"q", "k", "v"}: [L, H, L, H]
    scores["k"][0, 3, 2, 1]            # K-composition of head (0, 3) into head (2, 1)
    circuits = CompositionAnalysis.detect_induction_circuit(capture, weights)
    circuits.metadata["circuits"][0]   # {'previous_token_head': (l, h), 'induction_head': ...}

A head ``h1`` writes ``x W_OV^{h1}`` into the residual; a later head ``h2`` reads it through its
query (Q-composition), key (K-composition) or value (V-composition). The scores are the
Frobenius norm of the composed matrix relative to the norms of its factors::

    Q: ‖W_OV^{h1} W_QK^{h2}‖ / (‖W_OV^{h1}‖ ‖W_QK^{h2}‖)
    K: ‖W_OV^{h1} W_QK^{h2 T}‖ / (‖W_OV^{h1}‖ ‖W_QK^{h2}‖)
    V: ‖W_OV^{h1} W_OV^{h2}‖ / (‖W_OV^{h1}‖ ‖W_OV^{h2}‖)

(row-vector convention: ``W_QK = W_Q W_K^T``, ``W_OV = W_V W_O``). Each lies in ``[0, 1]``:
0 when ``h1`` writes only into directions ``h2`` ignores; the scale of either matrix cancels.
The norms between heads are folded where they are linear (see :mod:`oculi.analysis.weights`:
gains of the pre-attention, q/k and attention-output norms; a LayerNorm's centring); their
per-token scale is a positive number per token, which a normalised score does not see. Rotary
embeddings are left out (the content path). Random matrices score well above 0 in high
dimensions' small subspaces, so compare scores with each other, not with 0.

The full tensors are ``[L, H, L, H]``, entry ``[l1, h1, l2, h2]``; pairs with ``l1 >= l2`` cannot
compose and are 0. They are computed from Gram matrices: ``‖A B‖² = ⟨AᵀA, BBᵀ⟩``, so one
``d_model × d_model`` Gram per head and one matrix product for all pairs.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from oculi.analysis._common import attention_of, is_batched
from oculi.analysis._common import field as capture_field
from oculi.analysis.paths import path_patching_score
from oculi.analysis.result import CompositionResult
from oculi.analysis.token_composition import ov_composition_per_token
from oculi.analysis.weights import HeadWeights, weights_of
from oculi.capture.structures import AttentionCapture, FullCapture
from oculi.errors import InputError

__all__ = ["CompositionAnalysis", "CompositionResult"]

KINDS = ("q", "k", "v")
Head = tuple[int, int]


def _grams(w: HeadWeights, dtype: torch.dtype, kinds: tuple[str, ...] = KINDS) -> dict[str, Tensor]:
    """Per head ``[L*H, d, d]``: ``OVᵀOV`` (writer side) and ``BBᵀ`` for each reader kind.

    Each is a sandwich ``outer · middle · outerᵀ`` with a ``D × D`` middle; the middles of
    ``K`` and ``V`` are computed once per key/value head (grouped-query attention shares them).
    """
    n, rep = w.n_layers * w.n_heads, w.n_heads // w.n_kv_heads

    def flat(t: Tensor) -> Tensor:
        return t.reshape(n, *t.shape[2:]).to(dtype)

    def shared_gram(t: Tensor) -> Tensor:
        """``tᵀ t`` per key/value head, expanded to the query heads: ``[n, D, D]``."""
        u = t[:, ::rep].to(dtype)
        return (u.transpose(-1, -2) @ u).repeat_interleave(rep, 1).reshape(n, *u.shape[-1:] * 2)

    q, k, v = flat(w.w_q), flat(w.w_k), flat(w.w_v)  # [n, d, D]
    o_t = flat(w.w_o).transpose(1, 2)  # [n, d, D]
    middles = {
        "writer": (o_t, lambda: shared_gram(w.w_v)),  # (V O)ᵀ (V O) = Oᵀ (VᵀV) O
        "q": (q, lambda: shared_gram(w.w_k)),  # (Q Kᵀ)(Q Kᵀ)ᵀ = Q (KᵀK) Qᵀ
        "k": (k, lambda: q.transpose(1, 2) @ q),  # (K Qᵀ)(K Qᵀ)ᵀ = K (QᵀQ) Kᵀ
        "v": (v, lambda: flat(w.o_gram)),  # (V O)(V O)ᵀ = V (O Oᵀ) Vᵀ
    }
    out = {}
    for name in ("writer", *kinds):
        outer, middle = middles[name]
        out[name] = outer @ middle() @ outer.transpose(1, 2)
    return out


def _normalised(writer: Tensor, reader: Tensor, n_layers: int, n_heads: int) -> Tensor:
    n = writer.shape[0]
    w_flat, r_flat = writer.reshape(n, -1), reader.reshape(n, -1)
    squared = (w_flat @ r_flat.T).clamp(min=0)  # ‖A B‖² for every (writer, reader)
    w_norm = torch.diagonal(writer, dim1=1, dim2=2).sum(-1).clamp(min=0).sqrt()
    r_norm = torch.diagonal(reader, dim1=1, dim2=2).sum(-1).clamp(min=0).sqrt()
    denom = w_norm[:, None] * r_norm[None, :]
    score = torch.where(denom > 0, squared.sqrt() / denom, torch.zeros_like(denom))
    score = score.reshape(n_layers, n_heads, n_layers, n_heads).float()
    layer = torch.arange(n_layers)
    later = (layer[:, None] < layer[None, :]).to(score.device)  # l1 < l2
    return score * later[:, None, :, None]


def _check_head(head: Any, w: HeadWeights, what: str) -> Head:
    if not (isinstance(head, tuple) and len(head) == 2 and all(isinstance(i, int) for i in head)):
        raise InputError(f"{what} must be a (layer, head) pair of ints, got {head!r}")
    layer, h = head
    if not -w.n_layers <= layer < w.n_layers:
        raise InputError(f"{what} layer {layer} out of range 0..{w.n_layers - 1}")
    if not -w.n_heads <= h < w.n_heads:
        raise InputError(f"{what} head {h} out of range 0..{w.n_heads - 1}")
    return layer % w.n_layers, h % w.n_heads


def _pair_score(w: HeadWeights, source: Head, target: Head, kind: str) -> float:
    (l1, h1), (l2, h2) = source, target
    if l1 >= l2:
        raise InputError(
            f"a head composes only with heads of later layers: source layer {l1} is not "
            f"before target layer {l2}"
        )
    ov1 = w.ov(l1, h1).double()
    reader = {"q": w.qk(l2, h2), "k": w.qk(l2, h2).T, "v": w.ov(l2, h2)}[kind].double()
    return float((ov1 @ reader).norm() / (ov1.norm() * reader.norm()))


class CompositionAnalysis:
    """Weight-based head composition, virtual attention and induction circuits.

    ::

        scores = CompositionAnalysis.all_composition_scores(adapter)     # {"q", "k", "v"}: [L, H, L, H]
        CompositionAnalysis.virtual_attention(capture, [(0, 3), (2, 1)]).values   # [T, T]
    """

    @staticmethod
    def all_composition_scores(
        weights: Any, *, dtype: torch.dtype = torch.float32
    ) -> dict[str, Float[Tensor, "layer head layer2 head2"]]:
        """Q-, K- and V-composition of every pair of heads: ``{"q", "k", "v"}`` -> ``[L, H, L, H]``.

        Example::

            scores = CompositionAnalysis.all_composition_scores(adapter)
            scores["k"].flatten().topk(5)

        Args:
            weights: the adapter or :class:`HeadWeights`.
            dtype: precision of the Gram matrices (float32: a few seconds for Gemma 3 270M).
        """
        w = weights_of(weights)
        grams = _grams(w, dtype)
        return {
            kind: _normalised(grams["writer"], grams[kind], w.n_layers, w.n_heads) for kind in KINDS
        }

    @staticmethod
    def composition_scores(
        weights: Any, kind: str = "k", *, dtype: torch.dtype = torch.float32
    ) -> Float[Tensor, "layer head layer2 head2"]:
        """One kind (``"q"``, ``"k"`` or ``"v"``) of composition score, ``[L, H, L, H]``."""
        if kind not in KINDS:
            raise InputError(f"kind must be one of {KINDS}, got {kind!r}")
        w = weights_of(weights)
        grams = _grams(w, dtype, (kind,))
        return _normalised(grams["writer"], grams[kind], w.n_layers, w.n_heads)

    @staticmethod
    def qk_composition(
        weights: Any, source: Head, target: Head, *, adapter: Any = None
    ) -> CompositionResult:
        """Q- and K-composition of ``source`` into ``target``: ``.values = [q, k]``.

        Example::

            CompositionAnalysis.qk_composition(adapter, source=(1, 0), target=(4, 2)).values
            CompositionAnalysis.qk_composition(capture, (1, 0), (4, 2)).values.mean()  # seed 000

        ``weights`` is the adapter, :class:`HeadWeights`, or a capture the adapter made (its
        weights are read while that adapter lives; else pass ``adapter=``).
        """
        w = weights_of(weights, adapter, call="CompositionAnalysis.qk_composition")
        s, t = _check_head(source, w, "source"), _check_head(target, w, "target")
        q, k = _pair_score(w, s, t, "q"), _pair_score(w, s, t, "k")
        return CompositionResult(
            torch.tensor([q, k], dtype=torch.float64), {"q": q, "k": k, "source": s, "target": t}
        )

    @staticmethod
    def ov_composition(
        weights: Any, source: Head, target: Head, *, adapter: Any = None
    ) -> CompositionResult:
        """V-composition of ``source`` into ``target``.

        Example::

            CompositionAnalysis.ov_composition(adapter, (1, 0), (4, 2)).values    # a scalar
            CompositionAnalysis.ov_composition(capture, (1, 0), (4, 2)).values    # [T], seed 000

        From the adapter (or :class:`HeadWeights`), ``.values`` is the weight-level scalar.
        From a capture, it is seed 000's per-token OV composition ``[T]`` (``[B, T]`` for
        batches; see :mod:`oculi.analysis.token_composition`), with the weight-level scalar in
        ``.metadata["v"]`` and the per-key shares in ``.metadata["per_key"]``.
        """
        w = weights_of(weights, adapter, call="CompositionAnalysis.ov_composition")
        s, t = _check_head(source, w, "source"), _check_head(target, w, "target")
        if isinstance(weights, (AttentionCapture, FullCapture)):
            if s[0] >= t[0]:
                _pair_score(w, s, t, "v")  # raises: the source must be earlier
            return ov_composition_per_token(weights, w, s, t)
        v = _pair_score(w, s, t, "v")
        return CompositionResult(
            torch.tensor(v, dtype=torch.float64), {"v": v, "source": s, "target": t}
        )

    @staticmethod
    def composition_matrix(
        weights: Any, method: str = "k", *, adapter: Any = None
    ) -> CompositionResult:
        """Head-to-head scores flattened to ``[L*H, L*H]`` (row: writer, column: reader).

        ``method``: ``"q"``, ``"k"``, ``"v"``, or ``"qk"`` (the larger of Q and K per pair).
        ``weights`` is the adapter, :class:`HeadWeights`, or a capture its adapter made.
        """
        if method not in (*KINDS, "qk"):
            raise InputError(f"method must be 'q', 'k', 'v' or 'qk', got {method!r}")
        w = weights_of(weights, adapter, call="CompositionAnalysis.composition_matrix")
        scores = CompositionAnalysis.all_composition_scores(w)
        tensor = torch.maximum(scores["q"], scores["k"]) if method == "qk" else scores[method]
        n = tensor.shape[0] * tensor.shape[1]
        return CompositionResult(tensor.reshape(n, n), {"method": method, "shape": tensor.shape})

    path_patching_score = staticmethod(path_patching_score)

    @staticmethod
    def virtual_attention(capture: Any, path: list[Head]) -> CompositionResult:
        """Attention along a path of heads: ``A_{path[-1]} @ ... @ A_{path[0]}``, ``[T, T]``.

        Entry ``[i, j]`` is how much position ``i`` at the last head reads token ``j`` if every
        head on the path moved information only by attention. Batches give ``[B, T, T]``.

        Example::

            CompositionAnalysis.virtual_attention(capture, [(0, 3), (2, 1)]).values
        """
        att = attention_of(capture)
        patterns = capture_field(att, "patterns")
        batched = is_batched(patterns, "patterns")
        if not path:
            raise InputError("path must list at least one (layer, head)")
        layers = [layer for layer, _ in path]
        if layers != sorted(layers) or len(set(layers)) != len(layers):
            raise InputError(f"path must go through strictly increasing layers, got {path}")
        result = None
        for layer, head in path:
            i = att.layer_index(layer)
            if not 0 <= head < patterns.shape[-3]:
                raise InputError(f"head {head} out of range 0..{patterns.shape[-3] - 1}")
            a = (patterns[:, i, head] if batched else patterns[i, head]).double()
            result = a if result is None else a @ result
        assert result is not None
        path_str = " -> ".join(f"L{layer}H{head}" for layer, head in path)
        return CompositionResult(result, {"path": list(path), "path_str": path_str})

    @staticmethod
    def detect_induction_circuit(
        capture: Any,
        weights: Any = None,
        threshold: float = 0.3,
        *,
        previous_threshold: float | None = None,
        input_ids: Any = None,
        k_scores: Tensor | None = None,
        adapter: Any = None,
    ) -> CompositionResult:
        """Previous-token head → induction head pairs, ranked by K-composition.

        An induction head finds the token after an earlier copy of the current one by
        matching its query against keys that carry "the previous token was X", which a
        previous-token head writes; so the pair is linked by K-composition. Heads are picked
        by their patterns on ``capture`` (a repeated random sequence: see
        :class:`~oculi.analysis.circuits.CircuitDetection`), pairs ranked by the K-composition
        of their weights.

        Example::

            ids = oculi.analysis.repeated_random_tokens(adapter, 50)
            circuits = CompositionAnalysis.detect_induction_circuit(adapter.capture(ids))
            for c in circuits.metadata["circuits"][:3]:
                print(c["previous_token_head"], "->", c["induction_head"], c["composition_score"])

        Args:
            capture: an ``AttentionCapture`` of one repeated random sequence, all layers
                (:func:`~oculi.analysis.repeats.repeated_random_tokens` makes one).
            weights: the adapter or :class:`HeadWeights`; by default the adapter that made
                the capture (while it lives), else pass it here or as ``adapter=``.
            threshold: induction score from which a head is an induction head.
            previous_threshold: previous-token score for the earlier head (default: threshold).
            input_ids: token ids if the capture's metadata lacks them.
            k_scores: precomputed K-composition ``[L, H, L, H]`` (else computed).

        Returns:
            ``.values``: the K-composition tensor ``[L, H, L, H]``; ``.metadata["circuits"]``:
            one dict per pair, highest composition first, with ``previous_token_head``,
            ``induction_head`` (model ``(layer, head)``), ``composition_score``,
            ``previous_token_score``, ``induction_score`` and ``composition_rank`` (the
            pair's rank among all earlier heads composing into that induction head, 0 best).
        """
        from oculi.analysis.circuits import CircuitDetection

        if isinstance(weights, (int, float)) and not isinstance(weights, bool):
            threshold, weights = weights, None  # the seed's detect_induction_circuit(capture, 0.3)
        w = None
        if k_scores is None:
            w = weights_of(
                capture if weights is None else weights,
                adapter,
                call="CompositionAnalysis.detect_induction_circuit",
            )
        prev_limit = threshold if previous_threshold is None else previous_threshold
        induction = CircuitDetection.detect_induction_heads(capture, input_ids=input_ids)
        previous = CircuitDetection.detect_previous_token_heads(capture)
        if induction.dim() != 2:
            raise InputError("detect_induction_circuit reads one sequence, not a batch")
        layers = list(attention_of(capture).layers)
        k = k_scores if k_scores is not None else CompositionAnalysis.composition_scores(w)
        circuits = []
        for i2, h2 in (induction >= threshold).nonzero().tolist():
            l2 = layers[i2]
            column = k[:, :, l2, h2]  # every writer into this head
            order = column.flatten().argsort(descending=True).tolist()
            for i1, h1 in (previous >= prev_limit).nonzero().tolist():
                l1 = layers[i1]
                if l1 >= l2:
                    continue
                circuits.append(
                    {
                        "previous_token_head": (l1, h1),
                        "induction_head": (l2, h2),
                        "composition_score": float(column[l1, h1]),
                        "composition_rank": order.index(l1 * column.shape[1] + h1),
                        "previous_token_score": float(previous[i1, h1]),
                        "induction_score": float(induction[i2, h2]),
                    }
                )
        circuits.sort(key=lambda c: -float(c["composition_score"]))  # type: ignore[arg-type]
        return CompositionResult(k, {"circuits": circuits, "threshold": threshold})
