"""The configuration of a training run: every option that decides its result.

A resumed run (and a rerun of a finished one) must have the same configuration; the
checkpoint and the final SAE keep it (``metadata["training"]["config"]``) to compare.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from oculi.sae.model import KINDS


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the result (a resumed run must have the same).

    See :func:`train` for the meaning of each field; ``None`` means "the default for the
    kind and size", resolved by :meth:`resolved`.

    ::

        config = TrainConfig(site="resid_post", layer=6, d_sae=4096, kind="topk", k=32)
    """

    site: str | None
    layer: int | None
    d_sae: int
    kind: str = "topk"
    k: int | None = None
    target_site: str | None = None
    target_layer: int | None = None
    skip: bool = False
    n_tokens: int | None = None
    batch_rows: int = 4096
    lr: float | None = None
    warmup_steps: int | None = None
    decay_fraction: float = 0.2
    seed: int = 0
    b_dec_init: str = "geometric_median"
    normalize: str = "mean_norm"
    penalty: str = "l1"
    l1_coefficient: float = 0.1
    l0_coefficient: float = 0.02
    bandwidth: float = 0.5
    init_threshold: float = 1.0
    dead_tokens: int = 10_000_000
    aux_coefficient: float = 1 / 32
    k_aux: int | None = None
    resample_every: int | None = None
    resample_rows: int = 16384
    checkpoint_every: int | None = None
    split: str | None = None
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {self.kind!r}")
        if self.kind in ("topk", "batchtopk") and self.k is None:
            raise ValueError(f"kind={self.kind!r} needs k (latents per token)")
        if self.resample_every is not None and (
            isinstance(self.resample_every, bool)
            or not isinstance(self.resample_every, int)
            or self.resample_every < 0
        ):
            raise ValueError(
                f"resample_every must be a number of tokens >= 0 (0: never), got "
                f"{self.resample_every!r}"
            )
        for name in ("d_sae", "batch_rows", "dead_tokens", "resample_rows"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.b_dec_init not in ("geometric_median", "mean", "zeros"):
            raise ValueError(
                f"b_dec_init must be 'geometric_median', 'mean' or 'zeros', got {self.b_dec_init!r}"
            )
        if self.normalize not in ("mean_norm", "none"):
            raise ValueError(f"normalize must be 'mean_norm' or 'none', got {self.normalize!r}")
        if self.penalty not in ("l1", "l1_decoder_norm"):
            raise ValueError(f"penalty must be 'l1' or 'l1_decoder_norm', got {self.penalty!r}")
        if not 0 <= self.decay_fraction <= 1:
            raise ValueError(f"decay_fraction must be in [0, 1], got {self.decay_fraction}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
