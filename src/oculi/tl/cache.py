"""``ActivationCache``: one forward's activations under TransformerLens names, with its methods.

::

    logits, cache = adapter.run_with_cache(tokens)
    cache["blocks.3.attn.hook_pattern"], cache["pattern", 3], cache["resid_pre", -1]
    resid, labels = cache.decompose_resid(pos_slice=-1, return_labels=True)  # [comp, batch, d]
    attrs = cache.logit_attrs(resid, " John", incorrect_tokens=" Mary", pos_slice=-1)
    attrs.sum(0) + cache.logit_bias(" John", " Mary")   # == the logit difference, exactly

**The residual stream is a sum, the norm after it is frozen.** The residual entering the final
norm is ``embed (+ pos_embed) + sum over layers of (attn_out + mlp_out)``:
:meth:`decompose_resid` stacks those components and :meth:`stack_head_results` splits each
``attn_out`` into its heads. The final norm divides by a statistic of the whole residual, so it
is linear in the components only with that divisor frozen at the value the forward used:
``norm(x) = a ⊙ (x - mean x) + b`` (LayerNorm) or ``a ⊙ x`` (RMSNorm; Gemma's ``1 + w``
included), with ``a`` per position. :meth:`apply_ln_to_stack` applies exactly that ``a``, read
off this forward (the ratio of the norm's output to its input, as
:mod:`oculi.analysis.dla` does), weights included; the constant ``b`` belongs to no component.

TransformerLens folds the norm weights into ``W_U`` and the bias into ``b_U`` (``fold_ln``) and
divides by the cached scale only; oculi keeps the model's weights as they are and applies the
weight in ``apply_ln_to_stack`` instead, so :meth:`logit_attrs` (which applies it, then dots
with ``W_U[token]``) gives TransformerLens's numbers for a ``fold_ln`` model, and::

    cache.logit_attrs(cache.decompose_resid(), t).sum(0) + cache.logit_bias(t) == logit[t]

for every family, to float precision (``logit_bias``: the norm's bias through ``W_U`` plus the
unembedding bias; 0 for Gemma). Where the model soft-caps its logits (Gemma 2) that is the logit
before the cap. With ``layer < n_layers`` the same holds for a block's ``ln1``/``ln2`` input.

**Per-head results are exact where TransformerLens's are not.** Gemma 2/3 and OLMo 2 normalise
the attention output before it joins the residual. TransformerLens's ``hook_result`` is each
head's output-projection share *before* that norm, so for those families its heads do not add
up to ``hook_attn_out`` and their logit attributions are off by the norm's gain. oculi's
``attn.hook_result`` goes through the norm with its divisor frozen, so
``cache["result", l].sum(-2) == cache["attn_out", l]`` (plus the output projection's bias, which
belongs to no head, where the family has one). With a position embedding (GPT-2),
``accumulated_resid(apply_ln=True)`` at the final layer applies the full final norm to each
entry (the logit lens), as TransformerLens 3 does.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from oculi.capture.heads import head_contributions
from oculi.capture.interrupts import no_grad
from oculi.errors import InputError, did_you_mean
from oculi.tl.names import get_act_name, hook_specs
from oculi.tl.readout import FrozenReadout, apply_slice

if TYPE_CHECKING:
    from oculi.models.adapter import Adapter


class ActivationCache(FrozenReadout):
    """A forward's activations keyed by TransformerLens hook names (see the module docstring).

    Args:
        cache_dict: ``{name: tensor}`` in TransformerLens layouts.
        adapter: the model (for weights and norms); also ``cache.model``.
        has_batch_dim: whether tensors start with the batch dimension.
        attention_mask: the forward's ``[batch, pos]`` mask (1 for real tokens).
    """

    def __init__(
        self,
        cache_dict: dict[str, Tensor],
        adapter: Adapter,
        has_batch_dim: bool = True,
        *,
        attention_mask: Tensor | None = None,
    ) -> None:
        self.cache_dict = dict(cache_dict)
        self.model = adapter
        self.has_batch_dim = has_batch_dim
        self.attention_mask = attention_mask

    # -- the mapping -----------------------------------------------------------------------
    def _full_name(self, key: Any) -> str:
        if isinstance(key, str):
            return key if key in self.cache_dict else get_act_name(key)
        if isinstance(key, tuple) and 1 <= len(key) <= 3 and isinstance(key[0], str):
            name, layer = key[0], key[1] if len(key) > 1 else None
            if layer is not None:
                layer = self.model.resolve_layer(layer)  # negatives count from the end
            return get_act_name(name, layer, key[2] if len(key) > 2 else None)
        raise TypeError(
            f"cache keys are hook names ('blocks.3.attn.hook_pattern') or (name, layer[, "
            f"layer_type]) tuples ('pattern', 3), got {key!r}"
        )

    def __getitem__(self, key: Any) -> Tensor:
        name = self._full_name(key)
        if name in self.cache_dict:
            return self.cache_dict[name]
        if name in hook_specs(self.model):
            raise KeyError(
                f"{name!r} is not in this cache: the run_with_cache call's names_filter left it "
                f"out; add it to names_filter (or pass none to cache every hook)"
            )
        raise KeyError(
            f"{key!r} is no hook of this model{did_you_mean(name, self.cache_dict)} (this cache "
            f"holds {len(self.cache_dict)} names, e.g. {list(self.cache_dict)[:3]})"
        )

    def __contains__(self, key: object) -> bool:
        try:
            return self._full_name(key) in self.cache_dict
        except TypeError:
            return False

    def __len__(self) -> int:
        return len(self.cache_dict)

    def __iter__(self) -> Iterator[str]:
        return iter(self.cache_dict)

    def get(self, key: Any, default: Any = None) -> Any:
        """``cache[key]`` if it is there, else ``default``."""
        if key not in self:
            return default
        return self[key]

    def keys(self):
        return self.cache_dict.keys()

    def values(self):
        return self.cache_dict.values()

    def items(self):
        return self.cache_dict.items()

    def __repr__(self) -> str:
        return f"ActivationCache with keys {list(self.cache_dict)}"

    def to(self, device: str | torch.device) -> ActivationCache:
        """Move every tensor to ``device`` (in place; returns the cache)."""
        self.cache_dict = {k: v.to(device) for k, v in self.cache_dict.items()}
        return self

    def remove_batch_dim(self) -> ActivationCache:
        """Drop the batch dimension of a one-row cache (in place; returns the cache)."""
        if not self.has_batch_dim:
            return self
        sizes = {v.shape[0] for v in self.cache_dict.values()}
        if sizes - {1}:
            raise InputError(f"remove_batch_dim needs a batch of 1, this cache has {sizes}")
        self.cache_dict = {k: v[0] for k, v in self.cache_dict.items()}
        if self.attention_mask is not None:
            self.attention_mask = self.attention_mask[0]
        self.has_batch_dim = False
        return self

    def stack_activation(
        self, activation_name: str, layer: int = -1, sublayer_type: str | None = None
    ) -> Tensor:
        """``[layers_covered, ...]``: one activation of every layer before ``layer``."""
        layer = self._end(layer)
        return torch.stack([self[(activation_name, i, sublayer_type)] for i in range(layer)])

    # -- the residual stream ---------------------------------------------------------------
    @property
    def _parallel(self) -> bool:
        return self.model.anatomy.is_parallel(self.model.model.config)

    def accumulated_resid(
        self,
        layer: int | None = None,
        incl_mid: bool = False,
        apply_ln: bool = False,
        pos_slice: Any = None,
        mlp_input: bool = False,
        return_labels: bool = False,
    ) -> Any:
        """The residual stream before each layer up to ``layer``: ``[layers_covered, ..., d]``.

        Labels ``"{l}_pre"`` (``"{l}_mid"`` with ``incl_mid``) and ``"final_post"`` when
        ``layer`` is ``None``/``-1``/``n_layers``. ``apply_ln`` at the end of the model applies
        the final norm to each entry (the logit lens); before a block, that block's norm frozen
        at this forward's scale (``mlp_input``: the MLP's norm, whose input is ``resid_mid``, or
        ``resid_pre`` in parallel-attention models).
        """
        layer = self._end(layer)
        n = self.model.n_layers
        parts, labels = [], []
        for i in range(layer + 1):
            if i == n:
                parts.append(self[("resid_post", n - 1)])
                labels.append("final_post")
                continue
            parts.append(self[("resid_pre", i)])
            labels.append(f"{i}_pre")
            if (incl_mid and i < layer) or (mlp_input and i == layer and not self._parallel):
                parts.append(self[("resid_mid", i)])
                labels.append(f"{i}_mid")
        stack = torch.stack([apply_slice(p, pos_slice, -2) for p in parts])
        if apply_ln:
            stack = self.apply_ln_to_stack(
                stack, layer, mlp_input, pos_slice=pos_slice, recompute_ln=layer == n
            )
        return (stack, labels) if return_labels else stack

    def decompose_resid(
        self,
        layer: int | None = None,
        mlp_input: bool = False,
        mode: Literal["all", "mlp", "attn"] = "all",
        apply_ln: bool = False,
        pos_slice: Any = None,
        incl_embeds: bool = True,
        return_labels: bool = False,
    ) -> Any:
        """The residual before ``layer`` as its components ``[components, ..., d_model]``.

        ``embed`` (and ``pos_embed``), then ``"{l}_attn_out"``, ``"{l}_mlp_out"`` per layer
        (``mode`` keeps only one kind); they sum to ``blocks.{layer}.hook_resid_pre`` (the
        final residual by default). ``mlp_input`` adds ``layer``'s ``attn_out`` (the MLP's
        input; not in parallel-attention models, whose MLP reads the block input).
        ``apply_ln`` puts each through the frozen norm (see the module docstring).
        """
        if mode not in ("all", "mlp", "attn"):
            raise InputError(f"mode must be 'all', 'mlp' or 'attn', got {mode!r}")
        layer = self._end(layer)
        parts, labels = [], []
        if incl_embeds:
            for name, label in (("hook_embed", "embed"), ("hook_pos_embed", "pos_embed")):
                if name in self.cache_dict:
                    parts.append(self[name])
                    labels.append(label)
        for i in range(layer):
            if mode != "mlp":
                parts.append(self[("attn_out", i)])
                labels.append(f"{i}_attn_out")
            if mode != "attn":
                parts.append(self[("mlp_out", i)])
                labels.append(f"{i}_mlp_out")
        if mlp_input and mode != "mlp" and not self._parallel:
            parts.append(self[("attn_out", layer)])
            labels.append(f"{layer}_attn_out")
        stack = torch.stack([apply_slice(p, pos_slice, -2) for p in parts])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def compute_head_results(self) -> None:
        """Fill in ``blocks.{l}.attn.hook_result`` ``[..., pos, head, d_model]`` from
        ``hook_z`` where the cache lacks it (exact through a post-attention norm)."""
        adapter = self.model
        anat = adapter.anatomy
        for layer in range(adapter.n_layers):
            name = f"blocks.{layer}.attn.hook_result"
            if name in self.cache_dict:
                continue
            z = self[("z", layer)]
            zb = z if self.has_batch_dim else z[None]
            o_in = zb.reshape(*zb.shape[:2], -1)[:, None]  # [B, 1, T, H*D]
            o_out = None
            if anat.attn_out_norm is not None:
                with no_grad():
                    o_proj = adapter.part(layer, f"{anat.attn}.{anat.o_proj}")
                    o_out = o_proj(o_in.to(adapter.dtype))
            heads = head_contributions(adapter, o_in, [layer], o_out)[:, 0]  # [B, H, T, d]
            heads = heads.transpose(1, 2).contiguous()
            self.cache_dict[name] = heads if self.has_batch_dim else heads[0]

    def stack_head_results(
        self,
        layer: int = -1,
        return_labels: bool = False,
        incl_remainder: bool = False,
        pos_slice: Any = None,
        apply_ln: bool = False,
    ) -> Any:
        """Every head's write before ``layer``: ``[layer * n_heads, ..., d_model]``, labels
        ``"L{l}H{h}"``; ``incl_remainder`` adds the rest of the residual (embeddings, MLPs,
        output-projection biases) so the stack sums to it."""
        layer = self._end(layer)
        self.compute_head_results()
        parts, labels = [], []
        for i in range(layer):
            result = apply_slice(self[("result", i)], pos_slice, -3)  # [..., head, d]
            parts.append(result.movedim(-2, 0))
            labels += [f"L{i}H{h}" for h in range(self.model.n_heads)]
        if parts:
            stack = torch.cat(parts)
        else:
            like = apply_slice(self[("resid_pre", 0)], pos_slice, -2)
            stack = like.new_zeros((0, *like.shape))
        if incl_remainder:
            total = apply_slice(
                self[("resid_pre", layer)]
                if layer < self.model.n_layers
                else self[("resid_post", layer - 1)],
                pos_slice,
                -2,
            )
            stack = torch.cat([stack, (total - stack.sum(0))[None]])
            labels.append("remainder")
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack
