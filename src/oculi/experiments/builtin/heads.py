"""``head_detection``: which heads attend to the previous token, to BOS, to recent tokens, and
which do induction (on a repeated random sequence, seeded).

Run it from the shell or from Python (``configs/head_detection.yaml`` holds an example)::

    oculi run head_detection --config configs/head_detection.yaml --tag mine
    run_experiment("head_detection", {"prompt": "The quick brown fox jumps over the lazy dog."})
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from oculi.experiments.config import ExperimentConfig
from oculi.experiments.figures import new_figure
from oculi.experiments.registry import Experiment, Outcome, register_experiment


class HeadDetectionConfig(ExperimentConfig):
    """Keys of a ``head_detection`` config.

    Attributes:
        prompt: natural text for the previous-token, BOS and recent scores.
        induction_length: length of the random token sequence that is repeated once for the
            induction score (drawn with ``seed``; 0 skips induction).
        top_k: heads listed per score.
        window: the recent-token window.
    """

    prompt: str = Field(min_length=1)
    induction_length: int = Field(default=20, ge=0)
    top_k: int = Field(default=5, ge=1)
    window: int = Field(default=3, ge=1)


def head_scores(adapter: Any, prompt: str, *, induction_length: int, seed: int, window: int):
    """``{score name: [L, H] tensor}`` from one capture of ``prompt`` (and one of a repeated
    random sequence for ``induction``)."""

    from oculi.analysis import CircuitDetection, repeated_random_tokens
    from oculi.capture import CaptureConfig

    patterns_only = CaptureConfig(capture_queries=False, capture_keys=False, capture_values=False)
    cap = adapter.capture(prompt, patterns_only)
    positional = CircuitDetection.detect_positional_heads(cap, window=window)
    scores = {
        "previous_token": CircuitDetection.detect_previous_token_heads(cap),
        "bos": positional["bos_score"],
        "recent": positional["recent_score"],
    }
    if induction_length:
        seq = repeated_random_tokens(adapter, max(induction_length, 2), seed=seed)
        rep = adapter.capture(seq, patterns_only)
        scores["induction"] = CircuitDetection.detect_induction_heads(rep, input_ids=seq)
    return scores


def top_heads(scores: Any, k: int) -> list[list[Any]]:
    """``[[layer, head, score], ...]`` of the ``k`` highest scores of an ``[L, H]`` grid."""
    flat = scores.flatten()
    order = flat.argsort(descending=True)[:k].tolist()
    h = scores.shape[1]
    return [[i // h, i % h, float(flat[i])] for i in order]


@register_experiment("head_detection")
class HeadDetection(Experiment):
    Config = HeadDetectionConfig

    def run(self, adapter: Any, cfg: HeadDetectionConfig) -> Outcome:
        scores = head_scores(
            adapter,
            cfg.prompt,
            induction_length=cfg.induction_length,
            seed=cfg.seed,
            window=cfg.window,
        )
        numbers = {
            "prompt": cfg.prompt,
            "scores": scores,
            "top": {name: top_heads(s, cfg.top_k) for name, s in scores.items()},
        }
        n_layers, n_heads = next(iter(scores.values())).shape
        fig, axes = new_figure(
            3.2 * len(scores) + 1, max(3.0, 0.3 * n_layers + 1.5), ncols=len(scores)
        )
        for ax, (name, grid) in zip(axes, scores.items()):
            image = ax.imshow(grid.float().numpy(), aspect="auto", vmin=0, vmax=1, cmap="Blues")
            ax.set_title(name)
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
        fig.colorbar(image, ax=axes)
        return Outcome(numbers, {"head_scores": fig}, cfg.prompt)
