"""``ModelAnalyzer``'s logit lens: each layer's next-token guesses, how they converge to the
model's prediction, and how long the input tokens stay readable (seed 002's ``logit_lens``,
``get_layer_predictions``, ``get_convergence_metrics`` and ``compare_to_input``).

Layer ``l`` is the residual leaving decoder layer ``l`` (Hugging Face's ``hidden_states[l +
1]``), put through the model's final norm and unembedding: the model's own prediction at the
last layer. Every number comes from oculi's lazy :class:`~oculi.capture.lens.LogitCapture`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from oculi.capture.interrupts import no_grad
from oculi.errors import InputError


class LensAnalyses:
    """Mixed into :class:`~oculi.analyzer.ModelAnalyzer` (which sets ``adapter``, ``model``
    and ``tokenizer``)."""

    adapter: Any
    model: Any
    tokenizer: Any

    def _lens(self, prompt: str, top_k: int = 10, layers: Sequence[int] | None = None) -> Any:
        from oculi.capture import LogitConfig

        return self.adapter.capture_logits(prompt, config=LogitConfig(layers, top_k=top_k))

    def _lens_layers(
        self, layers: Sequence[int] | None, layer_step: int = 1, *, keep_last: bool = True
    ) -> list[int]:
        """``layers`` resolved (negatives count from the end) and sorted, or every
        ``layer_step``-th layer; the last layer added when ``keep_last``."""
        if layer_step < 1:
            raise InputError(f"layer_step must be at least 1, got {layer_step}")
        if layers is not None and layer_step != 1:
            raise InputError("pass layers= or layer_step=, not both")
        last = self.adapter.n_layers - 1
        if layers is None:
            chosen = {*range(0, self.adapter.n_layers, layer_step)}
        else:
            if isinstance(layers, int) or not layers:
                raise InputError(f"layers must be a non-empty list of ints, got {layers!r}")
            chosen = set(self.adapter.resolve_layers(list(layers)))
        return sorted(chosen | {last} if keep_last else chosen)

    def logit_lens(
        self,
        prompt: str,
        top_k: int = 5,
        layer_step: int = 1,
        position: int = -1,
        layers: Sequence[int] | None = None,
    ) -> dict[int, list[tuple[str, float]]]:
        """Each layer's top-``k`` next-token guesses at ``position``: ``{layer: [(token,
        probability), ...]}`` for the given ``layers``, or every ``layer_step``-th layer (the
        last layer always included)."""
        chosen = self._lens_layers(layers, layer_step, keep_last=layers is None)
        lc = self._lens(prompt, top_k, chosen)
        ids, probs = lc.top_k_indices[:, position], lc.top_k_probs[:, position]  # [L', K]
        decode = self.tokenizer.decode
        return {
            layer: [(decode([int(i)]), float(p)) for i, p in zip(ids[row], probs[row])]
            for row, layer in enumerate(chosen)
        }

    def print_logit_lens(
        self,
        prompt: str,
        layer_step: int = 1,
        top_k: int = 5,
        position: int = -1,
        layers: Sequence[int] | None = None,
    ) -> None:
        """Print :meth:`logit_lens` as one line per layer."""
        print(f"logit lens: {prompt!r} (position {position})")
        for layer, preds in self.logit_lens(prompt, top_k, layer_step, position, layers).items():
            cells = "  ".join(f"{tok!r} {p:.3f}" for tok, p in preds)
            print(f"  layer {layer:>3}: {cells}")

    def get_layer_predictions(
        self, text: str, layer_indices: Sequence[int] | None = None, top_k: int = 5
    ) -> dict[str, Any]:
        """Every position's top-``k`` next tokens at each of ``layer_indices`` (default all).

        Returns:
            ``input_text``, ``input_tokens``, ``input_ids [T]`` and ``layers``: ``{layer:
            {"top_k_indices": [T, K], "top_k_probs": [T, K], "top_k_tokens": [[str] * K] *
            T}}``. (Seed 002 also kept each layer's full ``[T, V]`` logits; read those from
            ``adapter.capture_logits(text).logits(layer)`` when needed.)
        """
        chosen = self._lens_layers(layer_indices, keep_last=False)
        lc = self._lens(text, top_k, chosen)
        ids = torch.tensor(lc.metadata["input_ids"][0])
        out: dict[str, Any] = {
            "input_text": text,
            "input_tokens": self.tokenizer.convert_ids_to_tokens(ids.tolist()),
            "input_ids": ids,
            "layers": {},
        }
        for row, layer in enumerate(chosen):
            top = lc.top_k_indices[row].cpu()
            out["layers"][layer] = {
                "top_k_indices": top,
                "top_k_probs": lc.top_k_probs[row].cpu(),
                "top_k_tokens": [[self.tokenizer.decode([i]) for i in r] for r in top.tolist()],
            }
        return out

    def get_convergence_metrics(self, text: str) -> dict[str, Any]:
        """How each layer's predictions converge to the model's, per layer and position.

        Returns:
            ``kl_divergence`` (``KL(p_final ‖ p_layer)``, nats), ``top1_match`` (the layer's
            top-1 is the final top-1), ``top1_rank`` (rank of the final top-1 in the layer,
            0 = top) and ``top1_logit`` (logit of the layer's own top-1), each ``[L, T]``;
            ``input_tokens`` and ``layers``.
        """
        from oculi.visualize.lens import convergence_metrics

        lc = self._lens(text, top_k=1)
        ids = lc.metadata["input_ids"][0]
        return {
            **convergence_metrics(lc),
            "input_tokens": self.tokenizer.convert_ids_to_tokens(ids),
            "layers": list(lc.layers),
        }

    def input_preservation(self, prompt: str) -> dict[str, Any]:
        """How much each layer still "predicts" the token it is at (seed 002's
        ``compare_to_input``), each ``[L, T]``:

        * ``probs``, ``ranks``: the logit-lens probability and rank (0 = top) of position
          ``t``'s own input token at position ``t``;
        * ``kl_from_input``: ``KL(p_layer ‖ p_input)``, where ``p_input`` is the lens of the
          input embeddings (the residual entering layer 0, through the final norm and
          unembedding): how far the layer has moved from the input's distribution;
        * ``kl_to_final``: ``KL(p_final ‖ p_layer)`` (prediction convergence).
        """
        return self._preservation(prompt)[1]

    def _preservation(self, prompt: str) -> tuple[Any, dict[str, Any]]:
        from oculi.capture import LogitConfig, ResidualConfig
        from oculi.capture.unembed import project_logits
        from oculi.visualize.lens import preservation_metrics

        embed_only = ResidualConfig(
            [0], capture_post_attn=False, capture_pre_mlp=False, capture_post_mlp=False
        )
        full = self.adapter.capture_full(
            prompt, attention=None, residual=embed_only, mlp=None, logits=LogitConfig(top_k=1)
        )
        lc = full.logits
        norm = self.adapter.module(self.adapter.anatomy.final_norm)
        with no_grad():
            embedded = norm(full.residual.pre_attn[0].to(self.adapter.device, self.adapter.dtype))
            log_input = torch.log_softmax(
                project_logits(embedded, *self.adapter.unembedding()), -1
            )  # [T, V]
        numbers = preservation_metrics(lc, log_input)
        return lc, {
            "tokens": self.tokenizer.convert_ids_to_tokens(lc.metadata["input_ids"][0]),
            "probs": numbers["probs"],
            "ranks": numbers["ranks"],
            "kl_from_input": numbers["kl_from_input"],
            "kl_to_final": lc.kl_to_final().cpu(),
        }
