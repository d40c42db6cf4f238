"""``attribution``: exact direct logit attribution by layer, branch and head.

The logit of the answer (or the difference ``answer − wrong``) at the last position is split
into the embedding's share, each layer's attention and MLP shares, each head's share and a
constant; the parts add up to the model's logit (see :mod:`oculi.analysis.dla`).

Run it from the shell or from Python (``configs/attribution.yaml`` holds an example)::

    oculi run attribution --config configs/attribution.yaml --tag mine
    run_experiment("attribution", {"prompt": "The Eiffel Tower is located in the city of", "target": " Paris"})
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from oculi.experiments.config import ExperimentConfig
from oculi.experiments.figures import new_figure
from oculi.experiments.registry import Experiment, Outcome, register_experiment


class AttributionConfig(ExperimentConfig):
    """Keys of an ``attribution`` config.

    Attributes:
        prompt: the text; target: the answer token (default: the model's top prediction);
        wrong: a competing token, to attribute the logit difference ``target − wrong``;
        top_k: heads listed.
    """

    prompt: str = Field(min_length=1)
    target: str | None = None
    wrong: str | None = None
    top_k: int = Field(default=10, ge=1)


def head_capture(adapter: Any, prompt: str, *, neurons: bool = False) -> Any:
    """A ``FullCapture`` of ``prompt`` with each head's contribution (and the MLP neurons when
    ``neurons``), without the queries, keys, values and patterns DLA does not read."""
    from oculi.analysis.neurons import mlp_config
    from oculi.capture import CaptureConfig

    heads = CaptureConfig(
        capture_queries=False,
        capture_keys=False,
        capture_values=False,
        capture_patterns=False,
        capture_head_contributions=True,
    )
    return adapter.capture_full(
        prompt, attention=heads, mlp=mlp_config(adapter) if neurons else None
    )


def answer_ids(
    adapter: Any, full: Any, target: str | int | None, wrong: str | int | None
) -> tuple[int, int | None]:
    """``(target id, wrong id)``: ``target`` defaults to the model's top prediction at the
    last position of ``full``."""
    if target is None:
        target_id = int(full.logits.logits(adapter.n_layers - 1, [-1])[0].argmax())
    else:
        target_id = adapter.to_single_token(target)
    return target_id, None if wrong is None else adapter.to_single_token(wrong)


def direct_logit_attribution(
    adapter: Any,
    prompt: str,
    target: str | int | None = None,
    wrong: str | int | None = None,
    *,
    neurons: bool = False,
) -> tuple[Any, int, int | None]:
    """``(AttributionResult, target id, wrong id)`` at the last position of ``prompt``, with
    per-head shares (one forward pass); ``neurons=True`` also records the MLP neurons and
    puts their attribution in ``result.metadata["neurons"]``."""
    from oculi.analysis import AttributionMethods

    full = head_capture(adapter, prompt, neurons=neurons)
    target_id, wrong_id = answer_ids(adapter, full, target, wrong)
    what = target_id if wrong_id is None else (target_id, wrong_id)
    dla = AttributionMethods.direct_logit_attribution(full, what, position=-1, adapter=adapter)
    if neurons:
        dla.metadata["neurons"] = AttributionMethods.neuron_attribution(full, what, adapter)
    return dla, target_id, wrong_id


def attribution_numbers(adapter: Any, dla: Any, target_id: int, wrong_id: int | None, k: int):
    """Plain numbers of a DLA result, with the ``k`` heads of largest share."""
    heads = dla.heads
    flat = heads.flatten()
    order = flat.abs().argsort(descending=True)[:k].tolist()
    n_heads = heads.shape[1]
    decode = adapter.tokenizer.decode
    return {
        "target": decode([target_id]),
        "target_id": target_id,
        "wrong": None if wrong_id is None else decode([wrong_id]),
        "wrong_id": wrong_id,
        "layers": list(dla.layers),
        "attention": dla.attention,
        "mlp": dla.mlp,
        "values": dla.values,
        "heads": heads,
        "attention_bias": dla.attention_bias,
        "embedding": float(dla.embedding),
        "bias": float(dla.bias),
        "total": float(dla.total),
        "logit": float(dla.logit),
        "capped_logit": None if dla.capped_logit is None else float(dla.capped_logit),
        "note": dla.note,
        "top_heads": [[i // n_heads, i % n_heads, float(flat[i])] for i in order],
        **_top_neurons(dla, k),
    }


def _top_neurons(dla: Any, k: int) -> dict[str, Any]:
    """``top_neurons`` ``[[layer, neuron, share]]`` and ``mlp_bias`` when neurons were asked."""
    from oculi.analysis import AttributionMethods

    neurons = dla.metadata.get("neurons")
    if neurons is None:
        return {}
    top = AttributionMethods.top_attributions(neurons, k)
    return {
        "top_neurons": [[layer, neuron, value] for (layer, neuron), value in top],
        "mlp_bias": neurons.bias,
    }


@register_experiment("attribution")
class Attribution(Experiment):
    Config = AttributionConfig

    def run(self, adapter: Any, cfg: AttributionConfig) -> Outcome:
        dla, target_id, wrong_id = direct_logit_attribution(
            adapter, cfg.prompt, cfg.target, cfg.wrong
        )
        numbers = {"prompt": cfg.prompt, **attribution_numbers(adapter, dla, target_id,
                                                               wrong_id, cfg.top_k)}  # fmt: skip
        fig, (ax_l, ax_h) = new_figure(11, 4, ncols=2)
        layers = list(dla.layers)
        ax_l.bar([x - 0.2 for x in layers], dla.attention.tolist(), 0.4, label="attention")
        ax_l.bar([x + 0.2 for x in layers], dla.mlp.tolist(), 0.4, label="MLP")
        ax_l.axhline(0, color="black", linewidth=0.5)
        ax_l.set(title=f"direct logit attribution of {numbers['target']!r}", xlabel="layer",
                 ylabel="logit share")  # fmt: skip
        ax_l.legend()
        span = float(dla.heads.abs().max()) or 1.0
        image = ax_h.imshow(dla.heads.float().numpy(), aspect="auto", cmap="RdBu_r",
                            vmin=-span, vmax=span)  # fmt: skip
        ax_h.set(title="per head", xlabel="head", ylabel="layer")
        fig.colorbar(image, ax=ax_h)
        return Outcome(numbers, {"attribution": fig}, cfg.prompt)
