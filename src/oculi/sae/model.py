"""The SAE: one type for ReLU, TopK, BatchTopK and JumpReLU dictionaries, and transcoders.

::

    sae = SAE(d_in=640, d_sae=16384, kind="topk", k=32, site="resid_post", layer=6)
    a = sae.encode(x)            # [..., d_in] -> [..., d_sae] latent activations
    x_hat = sae.decode(a)        # [..., d_sae] -> [..., d_out]
    sae.fvu(x), sae.l0(x)        # reconstruction quality and sparsity on a batch

A sparse autoencoder writes an activation ``x`` as a sparse, non-negative combination of
learned directions (the rows of ``W_dec``), the *latents* or *features*::

    pre   = (x - b_dec·[center_input]) @ W_enc + b_enc            [..., d_sae]
    a     = σ(pre)                                                [..., d_sae]
    x_hat = a @ W_dec + b_dec  (+ x @ W_skip for a transcoder)    [..., d_out]

The kinds differ only in ``σ``:

- ``"relu"``: ``max(pre, 0)``; sparsity comes from a penalty in training (L1, or L1 weighted
  by each decoder row's norm).
- ``"topk"``: keep the ``k`` largest of ``max(pre, 0)`` per token, zero the rest.
- ``"batchtopk"``: in training keep the ``k · batch`` largest over the whole batch; at
  inference a single learned ``threshold`` replaces the batch (``pre`` above it is kept).
- ``"jumprelu"``: ``pre · [pre > threshold]`` with a threshold per latent.

A *transcoder* reads one site and writes another (``site="mlp_in"``, ``write_site="mlp_out"``,
``d_out`` the written site's width), optionally with a linear skip ``W_skip [d_in, d_out]``; it
predicts the MLP's output from its input instead of reconstructing its input. An SAE is bound
to the place it was trained on, ``(site, layer)`` in oculi's site map
(:mod:`oculi.capture.sites`), which is what splicing (:class:`oculi.sae.SAEPatch`), latent
captures and training read.

Parameters are ``nn.Parameter`` s of one dtype and device (``sae.to(...)`` moves them); inputs
of any dtype are cast to the SAE's dtype and outputs come back in it.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from oculi.capture.interrupts import no_grad, without_grad
from oculi.capture.sites import SITE_KINDS, check_kind

Kind = Literal["relu", "topk", "batchtopk", "jumprelu"]
KINDS: tuple[str, ...] = ("relu", "topk", "batchtopk", "jumprelu")
"""The SAE activation kinds oculi reads and trains.

::

    TrainConfig(site="resid_post", layer=6, d_sae=4096, kind="topk", k=32)   # one of KINDS
"""


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"SAE: {name} must be a positive int, got {value!r}")
    return value


class SAE(nn.Module):
    """A sparse autoencoder (or transcoder) bound to ``(site, layer)``.

    Args:
        d_in: width of the activation read (``d_model`` for residual sites).
        d_sae: number of latents.
        kind: ``"relu"``, ``"topk"``, ``"batchtopk"`` or ``"jumprelu"``.
        k: latents kept per token (``topk``, ``batchtopk``).
        site, layer: where it reads (an oculi site kind and a layer index), or ``None`` for an
            SAE not yet bound to a model (it then cannot be spliced).
        d_out: width written (default ``d_in``); differs only for transcoders.
        write_site: the site a transcoder writes (default: ``site``, a plain SAE).
        skip: a transcoder's linear skip connection ``W_skip [d_in, d_out]``.
        center_input: subtract ``b_dec`` from the input before encoding (SAELens' and
            sparsify's convention; Gemma Scope does not). Only when ``d_in == d_out``.
        dtype, device: of the parameters.
        metadata: free-form JSON-able facts kept with the SAE (model identity, training
            provenance, the format it was loaded from).

    Raises:
        ValueError: a bad kind, a non-positive width or ``k``, ``k > d_sae``, ``k`` given for
            a kind without one, ``center_input`` with ``d_in != d_out``.
        UnknownSiteError: an unknown site name.
    """

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        kind: Kind = "relu",
        *,
        k: int | None = None,
        site: str | None = None,
        layer: int | None = None,
        d_out: int | None = None,
        write_site: str | None = None,
        skip: bool = False,
        center_input: bool = True,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"SAE: kind must be one of {', '.join(KINDS)}; got {kind!r}")
        self.d_in, self.d_sae = _positive_int(d_in, "d_in"), _positive_int(d_sae, "d_sae")
        self.d_out = self.d_in if d_out is None else _positive_int(d_out, "d_out")
        self.kind: str = kind
        if kind in ("topk", "batchtopk"):
            if k is None:
                raise ValueError(f"SAE: kind={kind!r} needs k (latents kept per token)")
            if _positive_int(k, "k") > self.d_sae:
                raise ValueError(f"SAE: k={k} exceeds d_sae={self.d_sae} (valid 1..{self.d_sae})")
        elif k is not None:
            raise ValueError(f"SAE: k is for topk/batchtopk SAEs; kind={kind!r} takes no k")
        self.k = k
        if site is not None:
            check_kind(site)
        if write_site is not None:
            check_kind(write_site)
        if (site is None) != (layer is None):
            raise ValueError(
                f"SAE: give both site and layer or neither (got site={site!r}, layer={layer!r})"
            )
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)):
            raise ValueError(f"SAE: layer must be an int, got {layer!r}")
        self.site, self.layer = site, layer
        self.write_site = write_site if write_site is not None else site
        if center_input and self.d_in != self.d_out:
            raise ValueError(
                f"SAE: center_input subtracts b_dec [d_out={self.d_out}] from the input "
                f"[d_in={self.d_in}]; a transcoder with d_in != d_out takes center_input=False"
            )
        self.center_input = bool(center_input)
        self.metadata: dict[str, Any] = dict(metadata or {})
        f: dict[str, Any] = {"dtype": dtype, "device": device}
        self.W_enc = nn.Parameter(torch.zeros(self.d_in, self.d_sae, **f))
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae, **f))
        self.W_dec = nn.Parameter(torch.zeros(self.d_sae, self.d_out, **f))
        self.b_dec = nn.Parameter(torch.zeros(self.d_out, **f))
        self.threshold = nn.Parameter(
            torch.zeros(self.d_sae, **f), requires_grad=kind in ("jumprelu", "batchtopk")
        )
        self.W_skip = nn.Parameter(torch.zeros(self.d_in, self.d_out, **f)) if skip else None

    # -- facts -----------------------------------------------------------------------------
    @property
    def is_transcoder(self) -> bool:
        return self.write_site != self.site or self.d_in != self.d_out or self.W_skip is not None

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    def init_weights(self, seed: int = 0, *, scale: float = 1.0) -> SAE:
        """Random unit-norm decoder rows, the encoder its transpose, biases zero (in place).

        The tied start is the usual one (sparsify, SAELens): each latent first reads the
        direction it writes. Returns ``self``.
        """
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(self.d_sae, self.d_out, generator=g, dtype=torch.float64)
        w = w / w.norm(dim=1, keepdim=True) * scale
        with no_grad():
            self.W_dec.copy_(w.to(self.dtype))
            enc = (
                w.T
                if self.d_in == self.d_out
                else torch.randn(self.d_in, self.d_sae, generator=g, dtype=torch.float64)
                / self.d_in**0.5
            )
            self.W_enc.copy_(enc.to(self.dtype))
            self.b_enc.zero_()
            self.b_dec.zero_()
            self.threshold.zero_()
        return self

    # -- the map ---------------------------------------------------------------------------
    def _input(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"SAE: x must be a torch.Tensor, got {type(x).__name__}")
        if x.shape[-1:] != (self.d_in,):
            raise ValueError(
                f"SAE: x has shape {list(x.shape)}, expected [..., d_in={self.d_in}]"
                + (f" (the width of {self.site!r})" if self.site else "")
            )
        return x.to(device=self.device, dtype=self.dtype)

    def pre_acts(self, x: Tensor) -> Tensor:
        """``[..., d_in] -> [..., d_sae]``: the encoder's affine map, before ``σ``."""
        x = self._input(x)
        if self.center_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: Tensor) -> Tensor:
        """``σ(pre)`` of this kind (the inference form; training uses :mod:`.train`)."""
        if self.kind == "relu":
            return torch.relu(pre)
        if self.kind == "topk":
            assert self.k is not None
            top = torch.relu(pre).topk(self.k, dim=-1)
            return torch.zeros_like(pre).scatter_(-1, top.indices, top.values)
        # jumprelu and batchtopk at inference: a threshold (per latent, or one shared)
        return pre * (pre > self.threshold).to(pre.dtype) * (pre > 0).to(pre.dtype)

    def encode(self, x: Tensor, *, sparse: bool = False) -> Tensor:
        """``[..., d_in] -> [..., d_sae]`` latent activations (a sparse COO tensor if asked)."""
        a = self.activate(self.pre_acts(x))
        return a.to_sparse() if sparse else a

    def decode(self, a: Tensor, x: Tensor | None = None) -> Tensor:
        """``[..., d_sae] -> [..., d_out]``; a transcoder with a skip also needs its input ``x``."""
        if a.is_sparse:
            a = a.to_dense()
        if a.shape[-1:] != (self.d_sae,):
            raise ValueError(
                f"SAE.decode: a has shape {list(a.shape)}, expected [..., {self.d_sae}]"
            )
        out = a.to(self.dtype) @ self.W_dec + self.b_dec
        if self.W_skip is not None:
            if x is None:
                raise ValueError("SAE.decode: this transcoder has a skip connection; pass x too")
            out = out + self._input(x) @ self.W_skip
        return out

    def forward(self, x: Tensor) -> Tensor:
        """``decode(encode(x))``, ``[..., d_in] -> [..., d_out]``."""
        return self.decode(self.encode(x), x)

    # -- quality ---------------------------------------------------------------------------
    def fvu(self, x: Tensor, target: Tensor | None = None) -> float:
        """Fraction of variance unexplained on a batch ``[N, d]``: ``Σ‖y - ŷ‖² / Σ‖y - ȳ‖²``.

        ``target`` is what should come out (a transcoder's written site); default ``x``.
        """
        y = self._input(x) if target is None else target.to(self.device, self.dtype)
        return fvu(y, self.forward(x))

    def l0(self, x: Tensor) -> float:
        """Mean number of active latents per token on a batch."""
        return float((self.encode(x) != 0).sum(-1).double().mean())

    def decoder_norms(self) -> Tensor:
        """``[d_sae]``: each latent's decoder row norm."""
        return self.W_dec.detach().norm(dim=-1)

    @without_grad
    def normalize_decoder_(self) -> SAE:
        """Scale each decoder row to unit norm, compensating the encoder so ``forward`` is kept.

        ``pre`` of latent ``i`` is multiplied by ``‖W_dec[i]‖`` (and its threshold with it), so
        ``a_i · W_dec[i]`` is unchanged for ReLU and JumpReLU (TopK ranks change only when the
        norms differ). Returns ``self``.
        """
        n = self.W_dec.norm(dim=-1).clamp_min(torch.finfo(self.dtype).tiny)
        self.W_dec.div_(n[:, None])
        self.W_enc.mul_(n)
        self.b_enc.mul_(n)
        self.threshold.mul_(n)
        return self

    def save(
        self,
        path: Any,
        *,
        format: str = "oculi",
        overwrite: bool = True,
        model_name: str | None = None,
    ) -> None:
        """Write the SAE: ``format="oculi"`` (one ``.safetensors`` file, :mod:`oculi.sae.io`) or
        ``"saelens"`` (``path`` an existing folder; ``cfg.json`` + ``sae_weights.safetensors``
        that ``sae_lens.SAE.load_from_disk`` reads). Writes are atomic."""
        if format == "oculi":
            from oculi.sae.io import save_sae

            save_sae(self, path, overwrite=overwrite)
        elif format == "saelens":
            from oculi.capture.io.files import user_path
            from oculi.sae.formats import write_saelens

            folder, shown = user_path(path)
            if not folder.is_dir():
                raise FileNotFoundError(
                    f"a SAELens SAE is a folder; {shown} is not an existing folder (oculi does "
                    "not create folders: make it first)"
                )
            write_saelens(self, folder, model_name)
        else:
            raise ValueError(f"SAE.save: format must be 'oculi' or 'saelens', got {format!r}")

    def extra_repr(self) -> str:
        where = f", site={self.site!r}, layer={self.layer}" if self.site else ""
        if self.is_transcoder and self.write_site != self.site:
            where += f", write_site={self.write_site!r}"
        k = f", k={self.k}" if self.k is not None else ""
        skip = ", skip=True" if self.W_skip is not None else ""
        return f"kind={self.kind!r}, d_in={self.d_in}, d_sae={self.d_sae}{k}{where}{skip}"

    # -- binding ---------------------------------------------------------------------------
    def check_model(self, adapter: Any, what: str = "SAE") -> tuple[int, str, str]:
        """``(layer, site, write_site)`` resolved against ``adapter``; widths checked."""
        if self.site is None or self.layer is None or self.write_site is None:
            raise ValueError(
                f"{what}: this SAE is bound to no site; give it one "
                "(SAE(..., site='resid_post', layer=6), or load_sae(path, site=..., layer=...))"
            )
        layer = adapter.resolve_layer(self.layer)
        for name, site, width in (
            ("d_in", self.site, self.d_in),
            ("d_out", self.write_site, self.d_out),
        ):
            spec = SITE_KINDS[site]
            if spec.per_head:
                raise ValueError(
                    f"{what}: site {site!r} is per-head; SAEs here read [B, T, ·] sites "
                    "(resid_*, attn_in/out, mlp_*)"
                )
            want = {"d_model": adapter.d_model, "d_mlp": adapter.d_mlp}[spec.width]
            if width != want:
                raise ValueError(
                    f"{what}: {name}={width} but site {site!r} of this model is "
                    f"{spec.width}={want} wide; this SAE was made for another model or site"
                )
        return layer, self.site, self.write_site


def fvu(target: Tensor, estimate: Tensor) -> float:
    """Fraction of variance unexplained, ``Σ‖y - ŷ‖² / Σ‖y - mean(y)‖²`` over rows ``[N, d]``."""
    y = target.detach().double().reshape(-1, target.shape[-1])
    e = estimate.detach().double().reshape(-1, estimate.shape[-1])
    total = (y - y.mean(0)).square().sum()
    return float((y - e).square().sum() / total)
