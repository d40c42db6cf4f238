"""Training an SAE (or transcoder) on a harvest store, resumable after any kill.

::

    store = oculi.open_harvest("acts")
    sae = oculi.sae.train(store, "resid_post", 6, d_sae=8192, kind="topk", k=32, out="sae-l6")
    # killed half way (even SIGKILL)? run the same call again: it continues from the last
    # checkpoint in out/ and ends with the weights an uninterrupted run would have

The loop (one concept per step):

1. **Inputs** are scaled so their mean norm is ``sqrt(d_in)`` (``normalize="mean_norm"``), so
   learning rates and penalties mean the same at every layer and model; the scale is folded
   back into the weights at the end, and the saved SAE reads raw activations.
2. **Initialisation**: decoder rows random unit vectors, the encoder their transpose (for a
   transcoder, a random encoder and a zero decoder), ``b_dec`` the geometric median
   (Weiszfeld) or the mean of a sample of the targets.
3. **Each step** takes a batch of ``batch_rows`` rows from the seeded shuffled stream
   (:mod:`oculi.sae.data`), computes the kind's loss (:mod:`oculi.sae.objectives`), removes the
   gradient component parallel to each decoder row, takes an Adam step, and renormalises the
   decoder rows (the unit-norm constraint; off for ``penalty="l1_decoder_norm"``).
4. **Learning rate**: linear warm-up over ``warmup_steps``, constant, then linear decay to 0
   over the last ``decay_fraction`` of the steps.
5. **Dead latents**: tokens since each latent last fired; more than ``dead_tokens`` is dead
   (AuxK revives them for TopK kinds; ReLU SAEs resample them, :mod:`oculi.sae.resample`,
   every ``resample_every`` tokens in the first half of the run). The progress bar shows the
   batch FVU, L0 and dead %.
6. **Checkpoints** (:mod:`oculi.sae.checkpoint`) every ``checkpoint_every`` tokens into
   ``out/checkpoint.safetensors``, atomically; the final SAE goes to ``out/sae.safetensors``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from oculi.capture.interrupts import no_grad
from oculi.capture.io.files import user_path
from oculi.errors import InputError
from oculi.sae.checkpoint import load_checkpoint, save_checkpoint
from oculi.sae.config import TrainConfig
from oculi.sae.data import ArrayRows, Rows, StoreRows
from oculi.sae.io import load_oculi, save_sae
from oculi.sae.model import SAE
from oculi.sae.objectives import Objective
from oculi.sae.resample import resample_dead

CHECKPOINT, FINAL = "checkpoint.safetensors", "sae.safetensors"


@dataclass
class _Run:
    """The state that changes during training (all of it checkpointed)."""

    step: int = 0
    epoch: int = 0
    served: int = 0  # batches of the current epoch already used
    tokens: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    resampled: list[dict[str, int]] = field(default_factory=list)


def _rows_of(source: Any, cfg: TrainConfig, targets: Any) -> Rows:
    if isinstance(source, (str, os.PathLike)):
        from oculi.harvest.store import open_harvest

        source = open_harvest(os.fspath(source))
    if hasattr(source, "shuffled") and hasattr(source, "manifest"):
        if cfg.site is None or cfg.layer is None:
            raise InputError("training from a store needs site= and layer= (the array to read)")
        target = None
        if cfg.target_site is not None:
            layer = cfg.layer if cfg.target_layer is None else cfg.target_layer
            target = (cfg.target_site, layer)
        return StoreRows(source, (cfg.site, cfg.layer), target, seed=cfg.seed,
                         batch_rows=cfg.batch_rows, split=cfg.split)  # fmt: skip
    return ArrayRows(source, targets, seed=cfg.seed, batch_rows=cfg.batch_rows)


def geometric_median(points: Tensor, iterations: int = 100, tol: float = 1e-7) -> Tensor:
    """The point minimising the summed distance to ``points [N, d]`` (Weiszfeld's algorithm)."""
    p = points.double()
    y = p.mean(0)
    for _ in range(iterations):
        w = 1.0 / (p - y).norm(dim=1).clamp_min(1e-12)
        nxt = (w[:, None] * p).sum(0) / w.sum()
        if (nxt - y).norm() <= tol * max(1.0, float(y.norm())):
            return nxt
        y = nxt
    return y


def _lr_at(step: int, total: int, base: float, warmup: int, decay: float) -> float:
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    start = int(total * (1 - decay))
    if decay and step >= start:
        return base * max(0.0, (total - step) / max(total - start, 1))
    return base


def _new_sae(cfg: TrainConfig, rows: Rows, device: torch.device, dtype: torch.dtype) -> SAE:
    transcoder = cfg.target_site is not None and (cfg.target_site, cfg.target_layer) != (
        cfg.site,
        cfg.layer,
    )
    sae = SAE(
        rows.d_in, cfg.d_sae, cfg.kind, k=cfg.k, site=cfg.site, layer=cfg.layer,  # type: ignore[arg-type]
        d_out=rows.d_out, write_site=cfg.target_site if transcoder else None, skip=cfg.skip,
        center_input=not transcoder, dtype=dtype, device=device,
    )  # fmt: skip
    sae.init_weights(cfg.seed)
    if transcoder:
        with no_grad():
            sae.W_dec.mul_(0.1)
    return sae


def train(
    source: Any,
    site: str | None = None,
    layer: int | None = None,
    *,
    d_sae: int,
    kind: str = "topk",
    k: int | None = None,
    out: str | os.PathLike | None = None,
    targets: Any = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    **options: Any,
) -> SAE:
    """Train an SAE on ``store[site, layer]`` (see the module docstring for the loop).

    Args:
        source: a harvest store (or its folder), or an in-memory ``[N, d_in]`` tensor/array.
        site, layer: the store's array to read (and what the SAE is bound to).
        d_sae: number of latents.
        kind: ``"topk"`` (default), ``"batchtopk"``, ``"relu"`` or ``"jumprelu"``.
        k: latents per token for TopK kinds.
        out: a folder for checkpoints and the final ``sae.safetensors`` (must exist); rerunning
            the same call resumes from it. ``None``: no files.
        targets: for an array source, a transcoder's ``[N, d_out]`` targets.
        device: default CUDA when available, else the CPU.
        progress: show a tqdm bar with the batch FVU, L0 and dead %.
        **options: the other :class:`TrainConfig` fields: ``target_site``/``target_layer``
            (a transcoder's written site), ``skip``, ``n_tokens`` (default one pass over the
            rows), ``batch_rows`` (4096), ``lr`` (default ``2e-4 / sqrt(d_sae / 16384)``),
            ``warmup_steps`` (default 5% of steps, at most 1000), ``decay_fraction`` (0.2),
            ``seed``, ``b_dec_init``, ``normalize``, ``penalty``, ``l1_coefficient``,
            ``l0_coefficient``, ``bandwidth``, ``init_threshold`` (JumpReLU, in units of
            the normalised input), ``dead_tokens``, ``aux_coefficient``, ``k_aux`` (default
            ``d_in // 2``), ``checkpoint_every`` (tokens; default a tenth of the run),
            ``split`` (a store split, e.g. ``"train"``), ``dtype``.

    Returns:
        The trained SAE (reads raw activations), its ``metadata["training"]`` holding the
        configuration, the data's identity and the history of FVU / L0 / dead %.

    Raises:
        ValueError: a bad option; a resumed run whose configuration differs (named).
        KeyError: a site/layer the store does not hold.
    """
    unknown = set(options) - set(TrainConfig.__dataclass_fields__)
    if unknown:
        raise TypeError(
            f"train: unknown options {sorted(unknown)}; valid: "
            f"{sorted(set(TrainConfig.__dataclass_fields__) - {'site', 'layer', 'd_sae', 'kind', 'k'})}"
        )
    cfg = TrainConfig(site=site, layer=layer, d_sae=d_sae, kind=kind, k=k, **options)
    rows = _rows_of(source, cfg, targets)
    steps = (cfg.n_tokens or rows.n_rows) // cfg.batch_rows
    if steps < 1:
        raise InputError(
            f"{cfg.n_tokens or rows.n_rows} tokens make no batch of batch_rows={cfg.batch_rows}; "
            "lower batch_rows or give more data"
        )
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    folder = _folder(out)
    if folder is not None and (folder / FINAL).exists():
        done = load_oculi(folder / FINAL, device=dev)
        _check_same(done.metadata.get("training", {}).get("config", {}), cfg, folder / FINAL)
        return done
    return _Trainer(cfg, rows, steps, dev, folder, progress).run()


def _folder(out: Any) -> Path | None:
    if out is None:
        return None
    real, shown = user_path(out)
    if not real.is_dir():
        raise FileNotFoundError(
            f"out={shown} is not an existing folder (oculi does not create folders: make it first)"
        )
    return real


def _check_same(saved: dict[str, Any], cfg: TrainConfig, where: Path) -> None:
    now = cfg.to_json()
    diff = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
    if diff:
        shown = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in sorted(diff.items()))
        raise ValueError(
            f"{str(where)!r} is from a run with another configuration ({shown}); use another "
            "out folder, or the same options to resume"
        )


class _Trainer:
    def __init__(self, cfg: TrainConfig, rows: Rows, steps: int, device: torch.device,
                 folder: Path | None, progress: bool) -> None:  # fmt: skip
        self.cfg, self.rows, self.steps, self.device = cfg, rows, steps, device
        self.folder, self.progress = folder, progress
        self.dtype = getattr(torch, cfg.dtype)
        self.sae = _new_sae(cfg, rows, device, self.dtype)
        self.constrain = cfg.penalty != "l1_decoder_norm" or cfg.kind != "relu"
        self.obj = Objective(
            cfg.kind, cfg.k, l1_coefficient=cfg.l1_coefficient, l0_coefficient=cfg.l0_coefficient,
            bandwidth=cfg.bandwidth, aux_coefficient=cfg.aux_coefficient,
            k_aux=cfg.k_aux or max(1, rows.d_in // 2),
        )  # fmt: skip
        params = dict(self.sae.named_parameters())
        params.pop("threshold")
        if cfg.kind == "jumprelu":
            self.log_threshold = torch.nn.Parameter(
                torch.full(
                    (cfg.d_sae,), math.log(cfg.init_threshold), dtype=self.dtype, device=device
                )
            )
            self.obj.log_threshold = self.log_threshold
            params["log_threshold"] = self.log_threshold
        self.names = list(params)
        self.lr = cfg.lr or 2e-4 / math.sqrt(cfg.d_sae / 2**14)
        self.opt = torch.optim.Adam(list(params.values()), lr=self.lr, betas=(0.9, 0.999))
        self.warmup = cfg.warmup_steps if cfg.warmup_steps is not None else min(1000, steps // 20)
        self.since = torch.zeros(cfg.d_sae, dtype=torch.int64, device=device)
        self.scale = torch.ones(2, dtype=torch.float64)  # input, target
        self.state = _Run()
        every = cfg.checkpoint_every or max(cfg.batch_rows, steps * cfg.batch_rows // 10)
        self.checkpoint_steps = max(1, every // cfg.batch_rows)
        total = steps * cfg.batch_rows
        default = max(cfg.batch_rows, total // 8) if cfg.kind == "relu" else 0
        self.resample_every = default if cfg.resample_every is None else cfg.resample_every
        self.resample_until = total // 2

    # -- start ----------------------------------------------------------------------------
    def _initialise(self) -> None:
        cfg = self.cfg
        x, y = self.rows.sample(16384, cfg.seed)
        x, y = x.double(), y.double()
        if cfg.normalize == "mean_norm":
            self.scale[0] = math.sqrt(x.shape[1]) / float(x.norm(dim=1).mean().clamp_min(1e-12))
            self.scale[1] = math.sqrt(y.shape[1]) / float(y.norm(dim=1).mean().clamp_min(1e-12))
        if not self.sae.is_transcoder:
            self.scale[1] = self.scale[0]
        y = y * self.scale[1]
        if cfg.b_dec_init == "geometric_median":
            b = geometric_median(y)
        elif cfg.b_dec_init == "mean":
            b = y.mean(0)
        else:
            b = torch.zeros(y.shape[1], dtype=torch.float64)
        with no_grad():
            self.sae.b_dec.copy_(b.to(self.dtype))

    def _tensors(self) -> dict[str, Tensor]:
        out = {f"param.{n}": p for n, p in self._params().items()}
        out["threshold"] = self.sae.threshold
        out["since"], out["scale"] = self.since, self.scale
        return out

    def _params(self) -> dict[str, Tensor]:
        params: dict[str, Tensor] = {
            n: p for n, p in self.sae.named_parameters() if n != "threshold"
        }
        if self.cfg.kind == "jumprelu":
            params["log_threshold"] = self.log_threshold
        return params

    def _resume(self) -> bool:
        if self.folder is None or not (self.folder / CHECKPOINT).exists():
            return False
        tensors, state = load_checkpoint(
            self.folder / CHECKPOINT, self.opt, self.names, self.device
        )
        _check_same(state["config"], self.cfg, self.folder / CHECKPOINT)
        with no_grad():
            for n, p in self._params().items():
                p.copy_(tensors[f"param.{n}"])
            self.sae.threshold.copy_(tensors["threshold"])
        self.since.copy_(tensors["since"])
        self.scale.copy_(tensors["scale"].cpu())
        run = state["run"]
        self.state = _Run(run["step"], run["epoch"], run["served"], run["tokens"], run["history"],
                          run.get("resampled", []))  # fmt: skip
        return True

    def _checkpoint(self) -> None:
        if self.folder is None:
            return
        state = {"config": self.cfg.to_json(), "run": vars(self.state)}
        save_checkpoint(self.folder / CHECKPOINT, self._tensors(), self.opt, self.names, state)

    # -- the loop -------------------------------------------------------------------------
    def run(self) -> SAE:
        from tqdm.auto import tqdm

        if not self._resume():
            self._initialise()
        cfg, st = self.cfg, self.state
        bar = tqdm(total=self.steps, initial=st.step, disable=not self.progress, unit="step",
                   desc=f"SAE {cfg.kind} {cfg.site}/{cfg.layer}")  # fmt: skip
        try:
            while st.step < self.steps:
                for i, (x, y) in enumerate(self.rows.epoch(st.epoch)):
                    if i < st.served:
                        continue  # batches this epoch served before the checkpoint
                    if st.step >= self.steps:
                        break
                    self._step(x, y, bar)
                else:
                    st.epoch, st.served = st.epoch + 1, 0
        finally:
            bar.close()
        return self._finish()

    def _step(self, x: Tensor, y: Tensor, bar: Any) -> None:
        cfg, st, sae = self.cfg, self.state, self.sae
        x = (x.to(self.device, torch.float64) * float(self.scale[0])).to(self.dtype)
        y = (y.to(self.device, torch.float64) * float(self.scale[1])).to(self.dtype)
        dead = self.since >= cfg.dead_tokens
        out = self.obj.step(sae, x, y, dead)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        if self.constrain and sae.W_dec.grad is not None:
            with no_grad():  # no gradient along each unit decoder row
                w = sae.W_dec
                sae.W_dec.grad -= (sae.W_dec.grad * w).sum(-1, keepdim=True) * w
        lr = _lr_at(st.step, self.steps, self.lr, self.warmup, cfg.decay_fraction)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        if self.constrain:
            with no_grad():
                sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        self.since += x.shape[0]
        self.since[out.fired] = 0
        st.step, st.served, st.tokens = st.step + 1, st.served + 1, st.tokens + x.shape[0]
        every = self.resample_every
        crossed = every and st.tokens // every > (st.tokens - x.shape[0]) // every
        if crossed and st.tokens <= self.resample_until:
            self._resample()
        dead_pct = 100.0 * float((self.since >= min(cfg.dead_tokens, st.tokens)).double().mean())
        if st.step % max(1, self.steps // 100) == 0 or st.step == self.steps:
            st.history.append({"step": st.step, "tokens": st.tokens, "fvu": out.fvu, "l0": out.l0,
                               "dead_pct": dead_pct, "lr": lr})  # fmt: skip
        bar.update(1)
        bar.set_postfix(
            fvu=f"{out.fvu:.3f}", l0=f"{out.l0:.1f}", dead=f"{dead_pct:.1f}%", refresh=False
        )
        if st.step % self.checkpoint_steps == 0 and st.step < self.steps:
            self._checkpoint()

    def _resample(self) -> None:
        """Resample the latents that did not fire since the last resampling."""
        cfg, st = self.cfg, self.state
        dead = self.since >= self.resample_every
        x, y = self.rows.sample(cfg.resample_rows, cfg.seed * 1_000_003 + st.step)
        x = (x.to(self.device, torch.float64) * float(self.scale[0])).to(self.dtype)
        y = (y.to(self.device, torch.float64) * float(self.scale[1])).to(self.dtype)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + st.step)
        n = resample_dead(self.sae, x, y, dead, self.opt, g)
        self.since[dead] = 0
        st.resampled.append({"step": st.step, "tokens": st.tokens, "latents": n})

    def _finish(self) -> SAE:
        sae, cfg = self.sae, self.cfg
        s_in, s_out = float(self.scale[0]), float(self.scale[1])
        with no_grad():
            if cfg.kind == "jumprelu":
                sae.threshold.copy_(self.log_threshold.exp())
            # the SAE was trained on (s_in·x, s_out·y): fold the scales into the weights
            sae.W_enc.mul_(s_in)
            sae.W_dec.div_(s_out)
            sae.b_dec.div_(s_out)
            if sae.W_skip is not None:
                sae.W_skip.mul_(s_in / s_out)
        if self.constrain:
            sae.normalize_decoder_()
        sae.requires_grad_(False)
        last = self.state.history[-1] if self.state.history else {}
        sae.metadata = {
            "model": self.rows.identity.get("model"),
            "training": {
                "config": cfg.to_json(), "data": self.rows.identity, "steps": self.state.step,
                "tokens": self.state.tokens, "epochs_started": self.state.epoch + 1,
                "final": last, "history": self.state.history,
                "resampled": self.state.resampled,
                "input_scale": s_in, "target_scale": s_out,
            },
        }  # fmt: skip
        if self.folder is not None:
            save_sae(sae, self.folder / FINAL)
        return sae
