"""``logit_lens``: where in depth the model settles on a token (seed 004's first experiment).

Run it from the shell or from Python (``configs/logit_lens.yaml`` holds an example)::

    oculi run logit_lens --config configs/logit_lens.yaml --tag mine
    run_experiment("logit_lens", {"prompt": "Water is made of hydrogen and", "target": " oxygen"})
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from oculi.experiments.config import ExperimentConfig
from oculi.experiments.figures import line
from oculi.experiments.registry import Experiment, Outcome, register_experiment


class LogitLensConfig(ExperimentConfig):
    """Keys of a ``logit_lens`` config.

    Attributes:
        prompt: the text read.
        target: the answer token (mind the leading space); default: the model's top prediction.
        position: the position read (``-1``: the last token).
        layers: the layers read (default all).
    """

    prompt: str = Field(min_length=1)
    target: str | None = None
    position: int = -1
    layers: list[int] | None = None


@register_experiment("logit_lens")
class LogitLens(Experiment):
    Config = LogitLensConfig

    def run(self, adapter: Any, cfg: LogitLensConfig) -> Outcome:
        import oculi
        from oculi.experiments.config import check_position

        check_position("position", cfg.position, len(adapter.to_str_tokens(cfg.prompt)))
        if cfg.target is None:
            target: str | int = int(adapter.forward(cfg.prompt)[cfg.position].argmax())
        else:
            target = cfg.target
        res = oculi.logit_lens(
            adapter, cfg.prompt, target, position=cfg.position, layers=cfg.layers
        )
        numbers = {
            "prompt": cfg.prompt,
            "tokens": adapter.to_str_tokens(cfg.prompt),
            **res.to_dict(),
        }
        fig = line(
            res.layers,
            {"p(target)": res.probs.tolist()},
            title=f"logit lens: p({res.target!r}) by layer (crossover {res.crossover_layer})",
            xlabel="layer",
            ylabel="probability",
            labels=res.top1,
        )
        return Outcome(numbers, {"logit_lens": fig}, cfg.prompt)
