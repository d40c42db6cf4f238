"""``ModelAnalyzer``'s causal questions: which heads carry a difference (path patching) and
which MLP neurons write a prediction (exact neuron attribution), seed 002's ``path_patching``
and ``compute_feature_attribution``."""

from __future__ import annotations

from typing import Any

import torch

from oculi.errors import InputError


class CausalAnalyses:
    """Mixed into :class:`~oculi.analyzer.ModelAnalyzer` (which sets ``self.adapter``)."""

    adapter: Any

    def path_patching(
        self,
        clean_prompt: str,
        corrupted_prompt: str,
        *,
        answer: str | int | None = None,
        wrong: str | int | None = None,
        receivers: list[tuple[int, int]] | None = None,
        receiver_input: str = "q",
        return_result: bool = False,
    ) -> Any:
        """Which layers' heads carry the clean/corrupt difference directly to the logits
        (or to ``receivers``), by path patching (:func:`oculi.patching.path_patching`).

        Each head's output is taken from the corrupted run and sent along the path only. With
        ``answer`` and ``wrong`` the metric is the logit difference ``answer − wrong`` and a
        head's effect is how much it drops; without them (seed 002's call) the metric is the
        KL divergence of the next-token distribution from the clean run's, and a head's effect
        is how much it rises. A layer's effect is the sum of its heads'.

        Returns:
            ``{layer: effect}``, or the full ``PatchingResult`` (``[L, H]``) with
            ``return_result=True``.
        """
        from dataclasses import replace

        from oculi import patching

        if (answer is None) != (wrong is None):
            raise InputError("pass both answer= and wrong= (or neither, for the KL metric)")
        if answer is not None and wrong is not None:
            metric, sign = patching.logit_diff(answer, wrong), -1.0
        else:
            clean_logits = self.adapter.forward(clean_prompt)[-1].float()
            reference = torch.log_softmax(clean_logits, dim=-1)
            metric, sign = replace(patching.kl_divergence(), reference=reference), 1.0
        result = patching.path_patching(
            self.adapter, clean_prompt, corrupted_prompt, metric=metric, receivers=receivers,
            receiver_input=receiver_input, progress=False,
        )  # fmt: skip
        if return_result:
            return result
        effects = sign * (result.values - result.clean_metric).nansum(-1)
        return {layer: float(e) for layer, e in zip(result.layers, effects)}

    def feature_attribution(
        self,
        prompt: str,
        target: str | int | None = None,
        k: int = 10,
        *,
        return_result: bool = False,
    ) -> Any:
        """The ``k`` MLP neurons that write the most of ``target``'s logit at the last position
        (seed 002's ``compute_feature_attribution``).

        Each neuron's share is exact: its activation times its column of the MLP's output
        projection, through the final norm frozen at the forward's scale
        (:mod:`oculi.analysis.neurons`); a layer's neurons plus the projection's bias add up to
        its MLP share of the logit.

        Args:
            prompt: the text.
            target: the answer token (default: the model's top prediction).
            k: how many neurons.
            return_result: return the whole ``AttributionResult`` (``.values [L, d_mlp]``).

        Returns:
            ``[((layer, neuron), share), ...]``, largest magnitude first.
        """
        from oculi.analysis import AttributionMethods
        from oculi.analysis.neurons import mlp_config
        from oculi.experiments.builtin.attribution import answer_ids

        full = self.adapter.capture_full(prompt, attention=None, mlp=mlp_config(self.adapter))
        target_id, _ = answer_ids(self.adapter, full, target, None)
        result = AttributionMethods.neuron_attribution(full, target_id, self.adapter)
        return result if return_result else AttributionMethods.top_attributions(result, k)
