"""Layer-wise logits (the logit lens), computed lazily and in chunks.

The logit lens reads each layer's residual as if it were the last: apply the model's final
norm, then the unembedding (and the final soft-cap, if the family has one). Doing that for
every layer and position at once costs ``L·T·V`` floats — 2.4 GB for Gemma 3 270M's
262,144-token vocabulary over 128 tokens — so :class:`LogitCapture` keeps only the normalised
residual ``[L, T, d_model]`` and computes what is asked, a block of rows at a time:

* ``top_k_indices``/``top_k_values``/``top_k_probs`` ``[L, T, K]`` and ``logsumexp`` ``[L, T]``
  come from one chunked pass, computed on first access and kept;
* ``token_logits``/``token_probs`` of chosen tokens need only those tokens' unembedding rows;
* ``ranks``, ``kl_to_final`` and ``entropy`` stream over the vocabulary in chunks;
* ``logits(layer, positions)`` materialises full logits for a slice you choose.

The unembedding tensor is shared with the model (no copy) and is not saved with the capture;
a loaded capture keeps its top-k and can compute the rest after :meth:`attach_unembedding`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from oculi.capture.interrupts import no_grad
from oculi.capture.structures import LayerIndexed, Storable
from oculi.capture.unembed import project_logits
from oculi.errors import InputError, NonFiniteWarning
from oculi.utils import caller_stacklevel

_CHUNK_BYTES = 64 * 2**20
# exp() of float32 values below about -87 gives subnormals, which run an order of magnitude
# slower on CPUs; terms that small add nothing a float32 sum can hold (V·e^-80 ≪ eps).
_EXP_FLOOR = -80.0


_MAX_ROWS = 8192


_SUB = 64

# Share of the free accelerator memory one lens block may take, and the bytes it needs per
# logit: the float32 logits and up to three float32 temporaries of the same shape (KL).
_FREE_SHARE = 0.5
_BYTES_PER_LOGIT = 16

LensStrategy = Literal["auto", "vocab", "rows"]


def choose_lens_strategy(strategy: LensStrategy, device: torch.device | str) -> str:
    """How the lens's top-k pass blocks its work: ``strategy``, or by device for ``"auto"``.

    ``"vocab"`` keeps all rows against one block of the vocabulary at a time, so the
    ``[V, d]`` unembedding is read once and the top-k is merged block by block: a CPU's
    caches make that about one bare matmul. ``"rows"`` takes a block of rows against the
    whole vocabulary, one matmul and one ``torch.topk`` per block: on a GPU the cost is the
    number of launches, and with the default ``chunk_size`` (sized from free memory) all rows
    usually fit in one block.

    Example:
        >>> choose_lens_strategy("auto", "cuda"), choose_lens_strategy("auto", "cpu")
        ('rows', 'vocab')
    """
    if strategy not in ("auto", "vocab", "rows"):
        raise InputError(f"strategy must be 'auto', 'vocab' or 'rows', got {strategy!r}")
    if strategy != "auto":
        return strategy
    return "vocab" if torch.device(device).type == "cpu" else "rows"


def default_chunk(device: torch.device | str) -> int:
    """Logits one lens block computes at once when ``chunk_size`` is not given: 16M (64 MB)
    on the CPU; on CUDA, half the free device memory (``torch.cuda.mem_get_info``) at 16
    bytes per logit, and never less than the CPU's."""
    device = torch.device(device)
    floor = _CHUNK_BYTES // 4
    if device.type != "cuda":
        return floor
    free, _total = torch.cuda.mem_get_info(device)
    return max(floor, int(free * _FREE_SHARE) // _BYTES_PER_LOGIT)


def _block_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(logits, k)`` over the last dim, reading most of the block only once.

    Each row is cut into runs of ``_SUB`` logits; the top-k elements lie in the ``k`` runs with
    the largest maxima (a run holding one of them has a maximum at least the k-th value, and
    at most ``k`` runs can), so a cheap max pass and a top-k over ``k·_SUB`` candidates
    replace a selection over the whole row. Ties may come out in another order.
    """
    n, width = logits.shape
    runs = width // _SUB
    if runs <= 4 * k:
        return torch.topk(logits, min(k, width), dim=-1)
    body = runs * _SUB
    maxima = logits[:, :body].reshape(n, runs, _SUB).amax(-1)
    top_runs = maxima.topk(k, dim=-1).indices
    offsets = torch.arange(_SUB, device=logits.device)
    cand = (top_runs[..., None] * _SUB + offsets).reshape(n, k * _SUB)
    if body < width:
        tail = torch.arange(body, width, device=logits.device).expand(n, -1)
        cand = torch.cat([cand, tail], 1)
    values, pick = logits.gather(1, cand).topk(k, dim=-1)
    return values, cand.gather(1, pick)


def _sum_exp_(logits: torch.Tensor, shift: torch.Tensor, floor: bool = True) -> torch.Tensor:
    """``Σ exp(logits - shift)`` over the last dim, ``[N, 1]``, overwriting ``logits``.

    ``shift [N, 1]`` is at least the row maximum. Clamping at ``_EXP_FLOOR`` keeps exp() off
    subnormals (several times faster on real logits, where most of the vocabulary sits far
    below the maximum) and changes the sum by less than float32 can represent.
    """
    logits = logits.sub_(shift)
    if floor:
        logits = logits.clamp_(min=_EXP_FLOOR)
    return logits.exp_().sum(-1, keepdim=True)


@dataclass
class LogitCapture(LayerIndexed, Storable):
    """Lazy layer-wise logits.

    Rows whose logits hold NaN or inf (a broken model) warn ``NonFiniteWarning`` naming the
    first layer and position when the top-k is computed; the capture that recorded them has
    already warned where the non-finite values first appeared.

    Attributes:
        layers: model layers held, in order.
        normalized: the final-normed residual after each layer, ``[L, T, d]`` (``[B, L, T, d]``
            for batches).
        unembed: the unembedding matrix ``[V, d]`` (shared with the model), or ``None``.
        unembed_bias: its bias ``[V]``, if any.
        softcap: the final logit soft-cap, if the family has one.
        top_k: ``K`` for the top-k fields.
        chunk_size: logits computed at once (the memory cap), default :func:`default_chunk`.
        strategy: how the top-k pass blocks its work (:func:`choose_lens_strategy`).
        final_normalized: the last layer's normalised residual ``[T, d]``, the reference of
            :meth:`kl_to_final` (kept even when the last layer is not in ``layers``).
        final_norm_bias: the final norm's additive bias ``[d]`` (zeros when it has none),
            shared with the model like ``unembed``; direct logit attribution reads it.
    """

    layers: tuple[int, ...]
    normalized: torch.Tensor
    unembed: torch.Tensor | None = None
    unembed_bias: torch.Tensor | None = None
    softcap: float | None = None
    top_k: int = 10
    chunk_size: int | None = None
    strategy: LensStrategy = "auto"
    final_normalized: torch.Tensor | None = None
    final_norm_bias: torch.Tensor | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    _topk: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    # -- shape helpers -------------------------------------------------------------------
    @property
    def batched(self) -> bool:
        return self.normalized.dim() == 4

    @property
    def d_vocab(self) -> int:
        return int(self._w().shape[0])

    def attach_unembedding(self, adapter: Any) -> LogitCapture:
        """Reconnect a loaded capture to its model's unembedding so lazy methods work again."""
        self.unembed, self.unembed_bias, self.softcap = adapter.unembedding()
        self.final_norm_bias = adapter.final_norm_bias()
        return self

    def _w(self) -> torch.Tensor:
        if self.unembed is None:
            raise InputError(
                "this LogitCapture has no unembedding (it was loaded from disk); call "
                ".attach_unembedding(adapter) to compute more than the saved top-k"
            )
        return self.unembed

    def _elements(self) -> int:
        return self.chunk_size or default_chunk(self._w().device)

    def _rows(self, normalized: torch.Tensor) -> int:
        return max(1, self._elements() // self.d_vocab)

    def _project(self, h: torch.Tensor) -> torch.Tensor:
        """Logits in float32 for rows ``h [N, d]``, exactly as the model computes them."""
        return project_logits(h, self._w(), self.unembed_bias, self.softcap)

    def _flat(self) -> torch.Tensor:
        return self.normalized.reshape(-1, self.normalized.shape[-1])

    def _unflat(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(*self.normalized.shape[:-1], *x.shape[1:])

    # -- top-k -------------------------------------------------------------------------
    def _compute_topk(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._topk is None:
            flat = self._flat()
            whole = choose_lens_strategy(self.strategy, self._w().device) == "rows"
            step, rows = (
                (self._rows(flat), self._topk_whole) if whole else (_MAX_ROWS, self._topk_rows)
            )
            vals, idx, lse = [], [], []
            with no_grad():
                for start in range(0, flat.shape[0], step):
                    v, i, z = rows(flat[start : start + step])
                    vals.append(v)
                    idx.append(i)
                    lse.append(z)
            values, indices, logz = torch.cat(vals), torch.cat(idx), torch.cat(lse)
            self._check_finite(logz.reshape(self.normalized.shape[:-1]))
            self._topk = (
                self._unflat(values),
                self._unflat(indices),
                self._unflat(logz[:, None])[..., 0],
            )
        return self._topk

    def _check_finite(
        self,
        row_values: torch.Tensor,
        layers: Sequence[int] | None = None,
        positions: Sequence[int] | None = None,
    ) -> None:
        """Warn (``NonFiniteWarning``) when some lens logits are NaN or inf.

        ``row_values`` holds one number per ``(layer, position)`` row that is non-finite exactly
        when one of the row's logits is: the logsumexp (which covers the whole vocabulary) or
        a sum over the row, shaped ``[L, T]`` or ``[B, L, T]`` (``layers``, ``positions``: the
        model layers and positions those are; default all held). An ``[L·T]`` check, nothing
        next to the matmul; without it a NaN row's top-1 reads as a confident prediction.
        """
        bad = ~torch.isfinite(row_values)
        if not bool(bad.any()):
            return
        layers = list(self.layers) if layers is None else list(layers)
        grid = bad.reshape(-1, len(layers), bad.shape[-1]).any(dim=0)  # [L, T]
        first = int(grid.any(dim=1).nonzero()[0, 0])
        pos = int(grid[first].nonzero()[0, 0])
        pos = positions[pos] if positions is not None else pos
        warnings.warn(
            f"the logit lens found NaN or inf logits in {int(bad.sum())} of {bad.numel()} "
            f"rows, first after layer {layers[first]} at position {pos}: their top-k, "
            "probabilities and ranks are meaningless (check the model's weights and "
            "activations for NaN/inf)",
            NonFiniteWarning,
            stacklevel=caller_stacklevel(),
        )

    def _topk_whole(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-k and logsumexp of ``h [N, d]``'s logits against the whole vocabulary at once:
        one matmul, one ``torch.topk``, one in-place exp-sum (the ``"rows"`` strategy)."""
        logits = self._project(h)
        values, indices = torch.topk(logits, min(self.top_k, logits.shape[1]), dim=-1)
        top = values[:, :1]
        # subnormals cost nothing on GPUs: no clamping pass there
        floor = logits.device.type == "cpu"
        return values, indices, (_sum_exp_(logits, top, floor).log() + top)[:, 0]

    def _topk_rows(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-k and logsumexp of ``h [N, d]``'s logits, a block of the vocabulary at a time.

        Blocking the vocabulary rather than the rows keeps all rows against one slice of the
        unembedding: the ``[V, d]`` matrix is read once instead of once per row chunk, which is
        what makes the lens cost about one bare matmul. The top-k is merged block by block and
        the logsumexp accumulated online (running maximum, rescaled sum).
        """
        w = self._w()
        h = h.to(w.device, w.dtype)
        n, k = h.shape[0], self.top_k
        block = max(k, self._elements() // n) // _SUB * _SUB or _SUB
        best_v = best_i = run_max = run_sum = None
        for v0 in range(0, w.shape[0], block):
            bias = self.unembed_bias[v0 : v0 + block] if self.unembed_bias is not None else None
            logits = project_logits(h, w[v0 : v0 + block], bias, self.softcap)
            v, i = _block_topk(logits, k)
            i += v0
            block_max = v[:, :1]
            if best_v is None:
                best_v, best_i, run_max = v, i, block_max
                run_sum = _sum_exp_(logits, block_max)
                continue
            # all four are set together on the first block
            assert best_i is not None and run_max is not None and run_sum is not None
            both_v, both_i = torch.cat([best_v, v], 1), torch.cat([best_i, i], 1)
            best_v, order = torch.topk(both_v, min(k, both_v.shape[1]), dim=-1)
            best_i = both_i.gather(1, order)
            new_max = torch.maximum(run_max, block_max)
            run_sum = run_sum * torch.exp(run_max - new_max) + _sum_exp_(logits, new_max)
            run_max = new_max
        # the vocabulary is not empty, so the first block set all four
        assert best_v is not None and best_i is not None
        assert run_max is not None and run_sum is not None
        return best_v, best_i, (run_sum.log() + run_max)[:, 0]

    @property
    def top_k_values(self) -> torch.Tensor:
        """Top-k logits per layer and position, ``[L, T, K]``."""
        return self._compute_topk()[0]

    @property
    def top_k_indices(self) -> torch.Tensor:
        """Top-k token ids per layer and position, ``[L, T, K]``."""
        return self._compute_topk()[1]

    @property
    def logsumexp(self) -> torch.Tensor:
        """``log Σ_v exp(logit_v)`` per layer and position, ``[L, T]``."""
        return self._compute_topk()[2]

    @property
    def top_k_probs(self) -> torch.Tensor:
        """Probabilities of the top-k tokens, ``[L, T, K]``."""
        values, _, lse = self._compute_topk()
        return torch.exp(values - lse[..., None])

    # -- chosen tokens -----------------------------------------------------------------
    def token_logits(self, token_ids: int | Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Logits of the given tokens at every layer and position, ``[L, T, n]``.

        Reads only those tokens' unembedding rows: no ``V``-sized work.
        """
        ids = torch.as_tensor(token_ids).reshape(-1)
        w = self._w()
        if int(ids.max()) >= w.shape[0] or int(ids.min()) < 0:
            raise InputError(f"token id out of range for a vocabulary of {w.shape[0]}")
        rows = w[ids.to(w.device)]
        bias = self.unembed_bias[ids.to(w.device)] if self.unembed_bias is not None else None
        return project_logits(self.normalized, rows, bias, self.softcap)

    def token_probs(self, token_id: int) -> torch.Tensor:
        """Probability of ``token_id`` at every layer and position, ``[L, T]``."""
        return torch.exp(self.token_logits(token_id)[..., 0] - self.logsumexp.to(self._w().device))

    def token_log_probs(self, token_id: int) -> torch.Tensor:
        """Log-probability of ``token_id`` at every layer and position, ``[L, T]``."""
        return self.token_logits(token_id)[..., 0] - self.logsumexp.to(self._w().device)

    def ranks(self, token_id: int) -> torch.Tensor:
        """Rank of ``token_id`` (0 = top-1) at every layer and position, ``[L, T]``."""
        n_vocab = self.d_vocab
        if not 0 <= int(token_id) < n_vocab:
            raise InputError(f"token id out of range for a vocabulary of {n_vocab}")
        flat = self._flat()
        step = self._rows(flat)
        counts = []
        with no_grad():
            for start in range(0, flat.shape[0], step):
                logits = self._project(flat[start : start + step])
                # compare against the token's logit from the same matmul: one computed from its
                # unembedding row alone can differ in the last ulp and miscount ties with itself
                target = logits[:, int(token_id), None]
                counts.append((logits > target).sum(-1))
        return self._unflat(torch.cat(counts)[:, None])[..., 0]

    # -- whole distributions -----------------------------------------------------------
    def entropy(self) -> torch.Tensor:
        """Entropy (nats) of each layer's next-token distribution, ``[L, T]``."""
        flat = self._flat()
        step = self._rows(flat)
        out = []
        with no_grad():
            for start in range(0, flat.shape[0], step):
                logp = torch.log_softmax(self._project(flat[start : start + step]), dim=-1)
                out.append(-(logp.exp() * logp).sum(-1))
        return self._unflat(torch.cat(out)[:, None])[..., 0]

    def kl_to_final(self) -> torch.Tensor:
        """``KL(p_final ‖ p_layer)`` per layer and position, ``[L, T]`` (0 at the last layer).

        Blocks of positions, all layers at once: the final layer's distribution is computed
        once per block and compared with every layer's.
        """
        if self.final_normalized is None:
            raise InputError("this capture has no final-layer residual to compare with")
        h = self.normalized if self.batched else self.normalized[None]  # [B, L, T, d]
        ref = self.final_normalized if self.batched else self.final_normalized[None]
        b, n_layers, t, d = h.shape
        step = max(1, self._rows(h) // (n_layers + 1))
        out = torch.empty(b, n_layers, t, device=self._w().device)
        with no_grad():
            for i in range(b):
                for t0 in range(0, t, step):
                    logp = torch.log_softmax(self._project(ref[i, t0 : t0 + step]), dim=-1)
                    rows = h[i, :, t0 : t0 + step].reshape(-1, d)
                    logq = torch.log_softmax(self._project(rows), dim=-1)
                    logq = logq.view(n_layers, -1, logq.shape[-1])
                    out[i, :, t0 : t0 + step] = (logp.exp() * (logp - logq)).sum(-1)
        return out if self.batched else out[0]

    def logits(
        self, layer: int | None = None, positions: Sequence[int] | slice | None = None
    ) -> torch.Tensor:
        """Full logits for a slice: one layer (model index) and some positions.

        Returns ``[T', V]`` for one layer, ``[L, T', V]`` for all (``B`` leading for batches).
        Mind the size: ``L·T'·V`` floats.
        """
        h = self.normalized
        if layer is not None:
            i = self.layer_index(layer)
            h = h[:, i] if self.batched else h[i]
        if positions is not None:
            h = h[..., positions, :]
        flat = h.reshape(-1, h.shape[-1])
        step = self._rows(flat)
        with no_grad():
            parts = [self._project(flat[s : s + step]) for s in range(0, flat.shape[0], step)]
        out = torch.cat(parts).reshape(*h.shape[:-1], -1)
        n_pos = self.normalized.shape[-2]
        cols = list(range(n_pos))[positions] if isinstance(positions, slice) else positions
        if cols is not None:
            cols = [int(c) % n_pos for c in cols]
        rows = out.sum(-1)  # non-finite exactly when a logit of the row is (or on overflow)
        if layer is not None:  # one layer: [T'] or [B, T'] -> a layer axis of one
            rows = rows.unsqueeze(-2)
        held = None if layer is None else [self.layers[self.layer_index(layer)]]
        self._check_finite(rows, held, cols)
        return out
