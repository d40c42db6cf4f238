"""``steering``: a contrastive steering vector added at several strengths.

For each coefficient: the greedy continuation, the next-token distribution's KL divergence
from the unsteered one, and the top next tokens.

Run it from the shell (``configs/steering.yaml`` holds an example)::

    oculi run steering --config configs/steering.yaml --tag happy
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from oculi.experiments.config import ExperimentConfig
from oculi.experiments.figures import line
from oculi.experiments.registry import Experiment, Outcome, register_experiment


class SteeringConfig(ExperimentConfig):
    """Keys of a ``steering`` config.

    Attributes:
        prompt: the text continued.
        positive, negative: the contrasting prompts (the vector is their mean difference).
        layer: where the vector is read and added; site: a d_model-wide site.
        position: which token of each contrast prompt (``-1``: the last real one; ``mean``).
        coefficients: the strengths tried, as multiples of the residual's typical norm at
            ``layer`` (0 is the unsteered baseline; see :mod:`oculi.intervention.steering`).
        max_new_tokens: greedy tokens generated per coefficient; top_k: next tokens listed.
    """

    prompt: str = Field(min_length=1)
    positive: list[str] = Field(min_length=1)
    negative: list[str] = Field(min_length=1)
    layer: int
    site: Literal["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"] = "resid_post"
    position: int | Literal["mean"] = -1
    coefficients: list[float] = Field(default=[0.0, 0.1, 0.25], min_length=1)
    max_new_tokens: int = Field(default=20, ge=1)
    top_k: int = Field(default=5, ge=1)


@register_experiment("steering")
class Steering(Experiment):
    Config = SteeringConfig

    def run(self, adapter: Any, cfg: SteeringConfig) -> Outcome:
        import torch

        from oculi.intervention import InterventionContext, SteeringVector

        vec = SteeringVector.from_contrast(
            adapter,
            cfg.positive,
            cfg.negative,
            layer=cfg.layer,
            site=cfg.site,
            position=cfg.position,
        )
        base = torch.log_softmax(adapter.forward(cfg.prompt)[-1].float(), -1)
        rows = []
        for c in cfg.coefficients:
            with InterventionContext(adapter, [vec.with_coefficient(c)]):
                logp = torch.log_softmax(adapter.forward(cfg.prompt)[-1].float(), -1)
                text = adapter.generate(cfg.prompt, max_new_tokens=cfg.max_new_tokens)
            top = logp.topk(cfg.top_k)
            rows.append(
                {
                    "coefficient": c,
                    "text": text,
                    "kl_from_unsteered": float((base.exp() * (base - logp)).sum()),
                    "top_next": [
                        [adapter.tokenizer.decode([int(i)]), float(p)]
                        for i, p in zip(top.indices, top.values.exp())
                    ],
                }
            )
        numbers = {
            "prompt": cfg.prompt,
            "layer": cfg.layer,
            "site": cfg.site,
            "vector_norm": float(vec.vector.float().norm()),
            "scale": vec.scale,  # the residual's typical norm: coefficients are multiples of it
            "runs": rows,
        }
        fig = line(
            cfg.coefficients,
            {"KL": [r["kl_from_unsteered"] for r in rows]},
            title=f"steering at layer {cfg.layer} ({cfg.site})",
            xlabel="coefficient (x the residual's typical norm)",
            ylabel="KL(unsteered || steered), next token",
        )
        return Outcome(numbers, {"steering": fig}, cfg.prompt)
