"""The frozen norms and the unembedding behind :class:`~oculi.tl.cache.ActivationCache`.

::

    cache.apply_ln_to_stack(stack, layer=None)     # each component through the final norm
    cache.logit_attrs(stack, " Paris")             # ... then onto W_U[" Paris"]
    cache.logit_bias(" Paris")                     # the constant no component writes

A norm divides by a statistic of the whole residual; with that divisor frozen at this forward's
value it is the linear map ``a ⊙ (x - mean x)`` (LayerNorm; its bias is a constant) or ``a ⊙ x``
(RMSNorm), ``a`` per position and dimension. ``a`` is read off the cache as the ratio of the
norm's output to its input (:func:`oculi.analysis.readout._frozen_map`, shared with direct logit
attribution), so it is what the model computed, Gemma's ``1 + w`` and every epsilon included.
See :mod:`oculi.tl.cache` for how this compares with TransformerLens's ``fold_ln``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from oculi.analysis.readout import _frozen_map
from oculi.capture.interrupts import no_grad
from oculi.errors import InputError
from oculi.models.weights import norm_centers, read_bias

if TYPE_CHECKING:
    from oculi.models.adapter import Adapter


def apply_slice(x: Tensor, sl: Any, dim: int) -> Tensor:
    """TransformerLens's ``Slice``: ``None`` keeps all, an int picks one (dropping the axis), a
    tuple is ``slice(*t)``, a ``slice`` slices, a list/array/tensor indexes (keeping it)."""
    if sl is None:
        return x
    index: list[Any] = [slice(None)] * x.dim()
    if isinstance(sl, tuple):
        sl = slice(*sl)
    elif not isinstance(sl, (int, slice)):
        sl = torch.as_tensor(sl, dtype=torch.long, device=x.device)
    index[dim] = sl
    return x[tuple(index)]


class FrozenReadout:
    """The norm and logit methods of an activation cache (``cache_dict`` and ``model``)."""

    cache_dict: dict[str, Tensor]
    model: Adapter
    has_batch_dim: bool

    def _end(self, layer: int | None) -> int:
        n = self.model.n_layers
        if layer is None or layer == -1:
            return n
        if not 0 <= layer <= n:
            raise InputError(f"layer {layer} out of range 0..{n} (n_layers means the unembed)")
        return layer

    # -- the frozen norm and the logits ----------------------------------------------------
    def _norm_at(self, layer: int, mlp_input: bool) -> tuple[nn.Module | None, str, str]:
        """``(norm module, its input's name, its output's name)`` before ``layer``."""
        adapter = self.model
        anat = adapter.anatomy
        n = adapter.n_layers
        if layer == n:
            if mlp_input:
                raise InputError("mlp_input goes with a block (layer < n_layers), not the unembed")
            return (
                adapter.module(anat.final_norm),
                f"blocks.{n - 1}.hook_resid_post",
                "ln_final.hook_normalized",
            )
        path = anat.mlp_norm if mlp_input else anat.attn_norm
        if path is None:  # OLMo 2: nothing between the residual and the block
            return None, "", ""
        parallel = anat.is_parallel(adapter.model.config)
        source = "resid_mid" if mlp_input and not parallel else "resid_pre"
        ln = "ln2" if mlp_input else "ln1"
        return (
            adapter.part(layer, path),
            f"blocks.{layer}.hook_{source}",
            f"blocks.{layer}.{ln}.hook_normalized",
        )

    def _frozen(self, layer: int, mlp_input: bool) -> tuple[Tensor | None, bool, Tensor | None]:
        """``(a [..., pos, d] float64, centre, bias)`` of the norm before ``layer``."""
        norm, x_name, y_name = self._norm_at(layer, mlp_input)
        if norm is None:
            return None, False, None
        missing = [n for n in (x_name, y_name) if n not in self.cache_dict]
        if missing:
            raise KeyError(
                f"applying the norm before layer {layer} needs {missing} in the cache; add "
                "them to run_with_cache's names_filter (the default caches them)"
            )
        center = norm_centers(norm, self.model.d_model)
        bias = read_bias(norm) if center else None  # offloaded or quantized: read as floats
        bias = bias.detach() if bias is not None else None
        x, y = self.cache_dict[x_name].double(), self.cache_dict[y_name].double()
        a, _ = _frozen_map(x, y, bias, center)
        return a, center, bias

    def apply_ln_to_stack(
        self,
        residual_stack: Tensor,
        layer: int | None = None,
        mlp_input: bool = False,
        pos_slice: Any = None,
        batch_slice: Any = None,
        has_batch_dim: bool = True,
        recompute_ln: bool = False,
    ) -> Tensor:
        """Each entry of ``[components, ..., pos, d]`` through the norm before ``layer`` frozen
        at this forward's scale, without the norm's constant bias (see the module docstring).

        ``pos_slice``/``batch_slice`` are those already applied to the stack. ``recompute_ln``
        at the unembed (``layer`` ``None``/``-1``/``n_layers``) applies the real final norm to
        each entry with its own statistics, bias included (the logit lens).
        """
        layer = self._end(layer)
        if has_batch_dim and batch_slice is not None:
            residual_stack = apply_slice(residual_stack, batch_slice, 1)
        if recompute_ln and layer == self.model.n_layers:
            norm = self.model.module(self.model.anatomy.final_norm)
            with no_grad():
                return norm(residual_stack.to(self.model.dtype)).to(residual_stack.dtype)
        a, center, _ = self._frozen(layer, mlp_input)
        if a is None:
            return residual_stack
        a = apply_slice(a, pos_slice, -2)
        if self.has_batch_dim and batch_slice is not None:
            a = apply_slice(a, batch_slice, 0)
        if self.has_batch_dim and not has_batch_dim:
            a = a[0]
        stack = residual_stack.double()
        if center:
            stack = stack - stack.mean(-1, keepdim=True)
        return (stack * a.to(stack.device)).to(residual_stack.dtype)

    def _token_ids(self, tokens: Any) -> Tensor:
        if isinstance(tokens, str):
            return torch.tensor(self.model.to_single_token(tokens))
        ids = torch.as_tensor(tokens)
        if ids.is_floating_point():
            raise InputError(f"tokens must be token ids or a one-token string, got {tokens!r}")
        if bool(((ids < 0) | (ids >= self.model.d_vocab)).any()):
            raise InputError(f"token ids must lie in 0..{self.model.d_vocab - 1}, got {tokens!r}")
        return ids.long()

    def _pair(self, tokens: Any, incorrect_tokens: Any) -> tuple[Tensor, Tensor | None]:
        ids = self._token_ids(tokens)
        if incorrect_tokens is None:
            return ids, None
        wrong = self._token_ids(incorrect_tokens)
        if wrong.shape != ids.shape:
            raise InputError(
                f"tokens {list(ids.shape)} and incorrect_tokens {list(wrong.shape)} must have "
                "the same shape"
            )
        return ids, wrong

    def tokens_to_residual_directions(self, tokens: Any) -> Tensor:
        """``W_U[:, tokens]`` as ``[*tokens.shape, d_model]`` (float64)."""
        w_u = self.model.unembedding()[0]
        ids = self._token_ids(tokens)
        return w_u[ids.to(w_u.device)].double()

    def logit_attrs(
        self,
        residual_stack: Tensor,
        tokens: Any,
        incorrect_tokens: Any = None,
        pos_slice: Any = None,
        batch_slice: Any = None,
        has_batch_dim: bool = True,
    ) -> Tensor:
        """Each component's share of the logit of ``tokens`` (minus ``incorrect_tokens``').

        ``residual_stack [components, ..., d_model]`` as :meth:`decompose_resid` (or
        :meth:`stack_head_results`, :meth:`accumulated_resid`) returns it, *without* ``apply_ln``:
        the frozen final norm is applied here. ``tokens``: a one-token string, an id, or ids
        ``[batch]`` / ``[batch, pos]`` broadcasting against the stack. Returns
        ``[components, ...]``; plus :meth:`logit_bias` the components of a whole residual sum to
        the model's (pre-soft-cap) logit.
        """
        ids, wrong = self._pair(tokens, incorrect_tokens)
        scaled = self.apply_ln_to_stack(
            residual_stack,
            -1,
            pos_slice=pos_slice,
            batch_slice=batch_slice,
            has_batch_dim=has_batch_dim,
        )
        directions = self.tokens_to_residual_directions(ids)
        if wrong is not None:
            directions = directions - self.tokens_to_residual_directions(wrong)
        out = (scaled.double() * directions.to(scaled.device)).sum(-1)
        return out.to(residual_stack.dtype)

    def logit_bias(self, tokens: Any, incorrect_tokens: Any = None) -> Tensor:
        """The part of the logit no residual component writes: the final norm's bias through
        ``W_U`` plus the unembedding's bias (0 for RMSNorm families without one). Shape of
        ``tokens``; float64."""
        ids, wrong = self._pair(tokens, incorrect_tokens)
        w_u, b_u, _ = self.model.unembedding()
        norm = self.model.module(self.model.anatomy.final_norm)
        bias = read_bias(norm)  # a LayerNorm's (offloaded: read from the hook); RMSNorm: None

        def const(t: Tensor) -> Tensor:
            t = t.to(w_u.device)
            out = torch.zeros(t.shape, dtype=torch.float64, device=w_u.device)
            if bias is not None:
                out = out + w_u[t].double() @ bias.detach().double()
            if b_u is not None:
                out = out + b_u[t].double()
            return out

        return const(ids) if wrong is None else const(ids) - const(wrong)
