"""Causal experiments: ``causal_tracing``, ``activation_patching``, ``path_patching``.

Run it from the shell or from Python (``configs/causal_tracing.yaml`` holds an example)::

    oculi run causal_tracing --config configs/causal_tracing.yaml --tag mine
    run_experiment("causal_tracing", {"prompt": "The Eiffel Tower is located in the city of",
                                     "subject": "The Eiffel Tower", "target": " Paris"})
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from oculi.experiments.config import ExperimentConfig
from oculi.experiments.figures import grid_size, plotted
from oculi.experiments.registry import Experiment, Outcome, register_experiment

Site = Literal[
    "resid_pre", "attn_in", "q", "k", "v", "pattern", "z", "attn_out", "resid_mid", "mlp_in",
    "mlp_gate", "mlp_up", "mlp_post", "mlp_out", "resid_post",
]  # fmt: skip
MetricName = Literal["logit_diff", "probability", "log_prob", "logit"]


class CausalTracingConfig(ExperimentConfig):
    """Keys of a ``causal_tracing`` config.

    Attributes:
        prompt: the clean prompt; subject: the substring corrupted; target: the answer token.
        kind: which state is restored: ``resid``, ``mlp`` or ``attn``.
        window: layers restored at once (default 1 for resid, 10 otherwise).
        corrupt: interchange with this prompt (same token length) instead of noise.
        noise: noise scale in embedding standard deviations; samples: noise draws averaged.
    """

    prompt: str = Field(min_length=1)
    subject: str = Field(min_length=1)
    target: str = Field(min_length=1)
    kind: Literal["resid", "mlp", "attn"] = "resid"
    window: int | None = Field(default=None, ge=1)
    corrupt: str | None = None
    noise: float = Field(default=3.0, gt=0, allow_inf_nan=False)
    samples: int = Field(default=10, ge=1)


@register_experiment("causal_tracing")
class CausalTracing(Experiment):
    Config = CausalTracingConfig
    direction = "clean states restored into the corrupted run"

    def run(self, adapter: Any, cfg: CausalTracingConfig) -> Outcome:
        from oculi.patching import causal_tracing

        res = causal_tracing(
            adapter,
            cfg.prompt,
            cfg.subject,
            cfg.target,
            kind=cfg.kind,
            window=cfg.window,
            corrupt=cfg.corrupt,
            noise=cfg.noise,
            samples=cfg.samples,
            seed=cfg.seed,
        )
        numbers = {
            "values": res.values,
            "clean_prob": res.clean_prob,
            "corrupt_prob": res.corrupt_prob,
            "indirect_effect": res.indirect_effect,
            "kind": res.kind,
            "window": res.window,
            "tokens": res.tokens,
            "subject_positions": res.subject_positions,
        }
        fig = plotted(res.plot, *grid_size(*res.values.shape))
        return Outcome(numbers, {"causal_tracing": fig}, cfg.prompt)


class _ContrastConfig(ExperimentConfig):
    clean: str = Field(min_length=1)
    corrupt: str = Field(min_length=1)
    answer: str = Field(min_length=1)
    wrong: str | None = None
    metric: MetricName = "logit_diff"

    @model_validator(mode="after")
    def _wrong_for_diff(self) -> _ContrastConfig:
        if self.metric == "logit_diff" and self.wrong is None:
            raise ValueError("metric logit_diff needs the key 'wrong' (the competing answer)")
        return self

    def make_metric(self) -> Any:
        from oculi import patching

        if self.metric == "logit_diff":
            assert self.wrong is not None  # the validator above requires it
            return patching.logit_diff(self.answer, self.wrong)
        return getattr(patching, self.metric)(self.answer)


class ActivationPatchingConfig(_ContrastConfig):
    """Keys of an ``activation_patching`` config.

    Attributes:
        clean, corrupt: prompts of equal token length; answer, wrong: the two answers.
        metric: ``logit_diff`` (answer − wrong), ``probability``, ``log_prob`` or ``logit``.
        site: the site patched; per_head: sweep heads (z, q, k, v, pattern) instead of positions;
        per_position: sweep positions (false: the whole site per layer); layers: default all.
    """

    site: Site = "resid_pre"
    per_head: bool = False
    per_position: bool = True
    layers: list[int] | None = None


def _patching_numbers(res: Any) -> dict[str, Any]:
    try:
        normalized = res.normalized()
    except ValueError:
        normalized = None
    return {
        "values": res.values,
        "normalized": normalized,
        "clean_metric": res.clean_metric,
        "corrupt_metric": res.corrupt_metric,
        "layers": res.layers,
        "axis": res.axis,
        "site": res.site,
        "metric": res.metric,
        "tokens": res.tokens,
        "top": [list(t) for t in res.top(5, normalized=normalized is not None)],
    }


@register_experiment("activation_patching")
class ActivationPatching(Experiment):
    Config = ActivationPatchingConfig
    direction = "clean activations patched into the corrupt run"

    def run(self, adapter: Any, cfg: ActivationPatchingConfig) -> Outcome:
        from oculi.patching import activation_patching

        res = activation_patching(
            adapter,
            cfg.clean,
            cfg.corrupt,
            site=cfg.site,
            metric=cfg.make_metric(),
            layers=cfg.layers,
            per_head=cfg.per_head,
            per_position=cfg.per_position,
        )
        numbers = _patching_numbers(res)
        norm = numbers["normalized"] is not None
        grid = res.values if res.values.dim() == 2 else res.values[:, None]
        fig = plotted(lambda ax: res.plot(normalized=norm, ax=ax), *grid_size(*grid.shape))
        return Outcome(numbers, {"activation_patching": fig}, cfg.clean)


class PathPatchingConfig(_ContrastConfig):
    """Keys of a ``path_patching`` config.

    Attributes:
        clean, corrupt, answer, wrong, metric: as for activation patching.
        receivers: ``[[layer, head], ...]`` whose input is patched (default: the logits).
        receiver_input: ``q``, ``k`` or ``v``; senders: heads swept (default all).
    """

    receivers: list[tuple[int, int]] | None = None
    receiver_input: Literal["q", "k", "v"] = "q"
    senders: list[tuple[int, int]] | None = None


@register_experiment("path_patching")
class PathPatching(Experiment):
    Config = PathPatchingConfig
    direction = "corrupt sender outputs into the clean run, along the path to the receivers"

    def run(self, adapter: Any, cfg: PathPatchingConfig) -> Outcome:
        from oculi.patching import path_patching

        res = path_patching(
            adapter,
            cfg.clean,
            cfg.corrupt,
            metric=cfg.make_metric(),
            receivers=cfg.receivers,
            receiver_input=cfg.receiver_input,
            senders=cfg.senders,
        )
        numbers = _patching_numbers(res)
        norm = numbers["normalized"] is not None
        fig = plotted(lambda ax: res.plot(normalized=norm, ax=ax), *grid_size(*res.values.shape))
        return Outcome(numbers, {"path_patching": fig}, cfg.clean)
