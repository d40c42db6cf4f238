"""Other libraries' SAE layouts: SAELens, Gemma Scope and sparsify, read (and SAELens written).

Each reader turns a folder (or file) into an :class:`~oculi.sae.model.SAE` with the same
``encode``/``decode`` as the library's own class, and binds it to oculi's ``(site, layer)``:

- **SAELens** (``cfg.json`` + ``sae_weights.safetensors``): architectures ``standard`` (ReLU),
  ``topk``, ``batchtopk`` (saved as JumpReLU with one threshold), ``jumprelu``,
  ``transcoder``, ``skip_transcoder``, ``jumprelu_transcoder``; configs before 6.0 (top-level
  ``hook_point``, ``activation_fn_kwargs.k``) too. The hook name it was trained on is a
  TransformerLens name (``blocks.6.hook_resid_post``) and maps through oculi's aliases
  (:func:`oculi.capture.sites.parse_name`); ``hook_name_out`` gives a transcoder's written site.
  A TopK SAE with ``rescale_acts_by_decoder_norm`` has its decoder norms folded into the
  encoder (the same map). Activation normalisation other than ``"none"`` is refused (it needs
  a scale that lives outside the SAE).
- **Gemma Scope** (``params.npz``: ``W_enc``, ``W_dec``, ``b_enc``, ``b_dec``, ``threshold``):
  JumpReLU, the input not centred. The site and layer come from the release's path
  (``gemma-scope-2b-pt-res/layer_12/...``: ``res`` → ``resid_post``, ``mlp`` → ``mlp_out``),
  or from ``site=``/``layer=``.
- **sparsify** (``cfg.json`` + ``sae.safetensors``, one folder per hook point): TopK SAEs and
  transcoders. The folder name is the module it hooked (``layers.6`` → ``resid_post`` of
  layer 6, ``layers.6.mlp`` → ``mlp_out``, read at ``mlp_in`` for a transcoder).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oculi.capture.sites import parse_name
from oculi.errors import UnknownSiteError
from oculi.sae.io import SAEFormatError, build
from oculi.sae.model import SAE

SAELENS_WEIGHTS, SAELENS_CFG = "sae_weights.safetensors", "cfg.json"
SPARSIFY_WEIGHTS = "sae.safetensors"
GEMMA_SCOPE = "params.npz"

_SAELENS_KINDS = {
    "standard": ("relu", False),
    "topk": ("topk", False),
    "batchtopk": ("jumprelu", False),
    "jumprelu": ("jumprelu", False),
    "transcoder": ("relu", True),
    "skip_transcoder": ("relu", True),
    "jumprelu_transcoder": ("jumprelu", True),
}


def _site(name: str, where: str) -> tuple[str, int]:
    try:
        return parse_name(name)
    except UnknownSiteError as exc:
        raise SAEFormatError(
            f"{where}: its hook name {name!r} is not a site oculi knows ({exc}); pass "
            "site= and layer= to load_sae"
        ) from None


def _dtype(name: str | None, default: torch.dtype) -> torch.dtype:
    if not name:
        return default
    value = getattr(torch, str(name).removeprefix("torch."), None)
    return value if isinstance(value, torch.dtype) else default


# -- SAELens ---------------------------------------------------------------------------------
def read_saelens(
    folder: Path, *, site: str | None, layer: int | None, dtype: torch.dtype | None, device: Any
) -> SAE:
    """An SAE from a SAELens folder (see the module docstring)."""
    from safetensors.torch import load_file

    where = f"SAELens SAE {str(folder)!r}"
    cfg = json.loads((folder / SAELENS_CFG).read_text(encoding="utf-8"))
    meta = cfg.get("metadata") or {}
    arch = cfg.get("architecture", "standard")
    k = cfg.get("k")
    if arch == "standard" and (cfg.get("activation_fn_str", cfg.get("activation_fn")) == "topk"):
        arch, k = "topk", (cfg.get("activation_fn_kwargs") or {}).get("k")
    if arch not in _SAELENS_KINDS:
        raise SAEFormatError(
            f"{where}: architecture {arch!r} is not one oculi models (it reads "
            f"{', '.join(_SAELENS_KINDS)})"
        )
    norm = cfg.get("normalize_activations", "none")
    if norm not in ("none", None, False):
        raise SAEFormatError(
            f"{where}: normalize_activations={norm!r} rescales inputs by a factor kept outside "
            "the SAE; fold it into the weights with SAELens first (normalize_activations='none')"
        )
    kind, transcoder = _SAELENS_KINDS[arch]
    hook = meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
    hook_out = meta.get("hook_name_out") or cfg.get("hook_name_out")
    if site is None and hook:
        site, layer_from = _site(hook, where)
        layer = layer_from if layer is None else layer
    write_site = _site(hook_out, where)[0] if hook_out else None
    w = load_file(str(folder / SAELENS_WEIGHTS), device="cpu")
    if "topk_threshold" in w:  # a training BatchTopK saved without conversion
        w["threshold"] = torch.ones_like(w["b_enc"]) * w.pop("topk_threshold")
    if kind == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        n = w["W_dec"].norm(dim=-1)
        w["W_dec"], w["W_enc"], w["b_enc"] = w["W_dec"] / n[:, None], w["W_enc"] * n, w["b_enc"] * n
    if "W_skip" in w:
        w["W_skip"] = w["W_skip"].T  # SAELens: [d_out, d_in]
    if "log_threshold" in w:
        w["threshold"] = w.pop("log_threshold").exp()
    d_out = cfg.get("d_out", cfg["d_in"])
    center = bool(cfg.get("apply_b_dec_to_input", True)) and not transcoder
    config = {
        "d_in": int(cfg["d_in"]), "d_sae": int(cfg["d_sae"]), "d_out": int(d_out), "kind": kind,
        "k": int(k) if kind == "topk" else None, "site": site, "layer": layer,
        "write_site": write_site if write_site else ("mlp_out" if transcoder else None),
        "skip": "W_skip" in w, "center_input": center,
        "metadata": {"source": {"format": "saelens", "path": str(folder), "architecture": arch,
                                "hook_name": hook, "model_name": meta.get("model_name")}},
    }  # fmt: skip
    if transcoder and config["site"] == config["write_site"]:
        config["write_site"] = None
    stored = _dtype(cfg.get("dtype"), next(iter(w.values())).dtype)
    return build(config, w, dtype=dtype or stored, device=device, where=where)


def write_saelens(sae: SAE, folder: Path, model_name: str | None = None) -> None:
    """Write ``sae`` as a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``).

    ReLU → ``standard``, TopK → ``topk``, JumpReLU and BatchTopK → ``jumprelu``; transcoders →
    ``transcoder``/``skip_transcoder``/``jumprelu_transcoder``. Files are written atomically.
    """
    from safetensors.torch import save_file

    from oculi.capture.io.files import write_atomically

    kind = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}
    arch = kind[sae.kind]
    if sae.is_transcoder:
        if sae.kind == "topk":
            raise SAEFormatError("SAELens has no TopK transcoder; save it in oculi's format")
        arch = {"standard": "transcoder", "jumprelu": "jumprelu_transcoder"}[arch]
        if sae.W_skip is not None:
            if arch != "transcoder":
                raise SAEFormatError("SAELens' skip transcoder is ReLU only")
            arch = "skip_transcoder"
    tensors = {
        n: getattr(sae, n).detach().cpu().contiguous() for n in ("W_enc", "b_enc", "W_dec", "b_dec")
    }
    if sae.kind in ("jumprelu", "batchtopk"):
        tensors["threshold"] = sae.threshold.detach().cpu().contiguous()
    if sae.W_skip is not None:
        tensors["W_skip"] = sae.W_skip.detach().T.cpu().contiguous()
    hook = f"blocks.{sae.layer}.hook_{sae.site}" if sae.site else None
    cfg: dict[str, Any] = {
        "architecture": arch, "d_in": sae.d_in, "d_sae": sae.d_sae,
        "dtype": str(sae.dtype).removeprefix("torch."), "device": "cpu",
        "apply_b_dec_to_input": sae.center_input, "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"hook_name": _tl_name(sae.site, sae.layer), "model_name": model_name,
                     "sae_lens_version": "6.0.0", "oculi_hook": hook},
    }  # fmt: skip
    if sae.kind == "topk":
        cfg["k"], cfg["rescale_acts_by_decoder_norm"] = sae.k, False
    if sae.is_transcoder:
        cfg["d_out"] = sae.d_out
        cfg["metadata"]["hook_name_out"] = _tl_name(sae.write_site, sae.layer)
    text = json.dumps(cfg)
    write_atomically(folder / SAELENS_WEIGHTS, lambda t: save_file(tensors, str(t)),
                     overwrite=True, what="the SAE weights")  # fmt: skip

    def write_cfg(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    write_atomically(folder / SAELENS_CFG, write_cfg, overwrite=True, what="the SAE config")


_TL_NAMES = {
    "resid_pre": "hook_resid_pre", "resid_mid": "hook_resid_mid", "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out", "mlp_in": "ln2.hook_normalized",
    "attn_in": "ln1.hook_normalized", "mlp_post": "mlp.hook_post", "z": "attn.hook_z",
}  # fmt: skip


def _tl_name(site: str | None, layer: int | None) -> str | None:
    if site is None or site not in _TL_NAMES:
        return None
    return f"blocks.{layer}.{_TL_NAMES[site]}"


# -- Gemma Scope -----------------------------------------------------------------------------
_SCOPE_SITES = {"res": "resid_post", "mlp": "mlp_out", "transcoders": "mlp_in"}


def read_gemma_scope(
    file: Path, *, site: str | None, layer: int | None, dtype: torch.dtype | None, device: Any
) -> SAE:
    """A JumpReLU SAE from a Gemma Scope ``params.npz`` (no pickle: ``allow_pickle=False``)."""
    where = f"Gemma Scope SAE {str(file)!r}"
    with np.load(file, allow_pickle=False) as z:
        arrays = {name: torch.from_numpy(np.array(z[name])) for name in z.files}
    need = {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"}
    if set(arrays) != need:
        raise SAEFormatError(
            f"{where}: holds arrays {sorted(arrays)}; a Gemma Scope SAE has exactly {sorted(need)}"
        )
    text = str(file.resolve())
    if layer is None:
        m = re.search(r"layer_(\d+)", text)
        layer = int(m.group(1)) if m else None
    if site is None:
        m = re.search(r"gemma-scope-[^/]*?-(res|mlp|att|transcoders)\b", text)
        if m and m.group(1) == "att":
            raise SAEFormatError(
                f"{where}: attention-output SAEs read the per-head z; not modelled"
            )
        site = _SCOPE_SITES.get(m.group(1)) if m else None
    if site is None or layer is None:
        raise SAEFormatError(
            f"{where}: its path does not say where it reads (found site={site!r}, "
            f"layer={layer!r}; releases are laid out gemma-scope-<model>-<res|mlp>/layer_<n>/..."
            "); pass site= and layer= to load_sae"
        )
    d_in, d_sae = arrays["W_enc"].shape
    d_out = arrays["W_dec"].shape[1]
    write_site = "mlp_out" if site == "mlp_in" else None
    config = {
        "d_in": int(d_in), "d_sae": int(d_sae), "d_out": int(d_out), "kind": "jumprelu",
        "site": site, "layer": layer, "write_site": write_site, "center_input": False,
        "metadata": {"source": {"format": "gemma_scope", "path": str(file)}},
    }  # fmt: skip
    stored = arrays["W_enc"].dtype
    return build(config, arrays, dtype=dtype or stored, device=device, where=where)


# -- sparsify --------------------------------------------------------------------------------
_HOOKPOINT = re.compile(
    r"^(?:.*\.)?(?:layers|h|blocks)\.(\d+)(?:\.(mlp|self_attn|attn|attention))?$"
)


def read_sparsify(
    folder: Path, *, site: str | None, layer: int | None, dtype: torch.dtype | None, device: Any
) -> SAE:
    """A TopK SAE or transcoder from one sparsify hook-point folder."""
    from safetensors.torch import load_file

    where = f"sparsify SAE {str(folder)!r}"
    cfg = json.loads((folder / SAELENS_CFG).read_text(encoding="utf-8"))
    if cfg.get("activation", "topk") != "topk":
        raise SAEFormatError(f"{where}: activation {cfg.get('activation')!r}; oculi reads topk")
    w = load_file(str(folder / SPARSIFY_WEIGHTS), device="cpu")
    if "W_dec" not in w:
        raise SAEFormatError(f"{where}: saved without a decoder (W_dec); nothing to splice")
    transcode = bool(cfg.get("transcode", False))
    write_site = None
    if site is None or layer is None:
        m = _HOOKPOINT.match(folder.name)
        if m is None:
            raise SAEFormatError(
                f"{where}: the folder name {folder.name!r} is the module it hooked, and it is "
                "not one oculi maps (layers.<n>, layers.<n>.mlp, layers.<n>.self_attn); pass "
                "site= and layer= to load_sae"
            )
        found = {None: "resid_post", "mlp": "mlp_out"}.get(m.group(2), "attn_out")
        if transcode and m.group(2) == "mlp":
            found, write_site = "mlp_in", "mlp_out"
        site = site or found
        layer = int(m.group(1)) if layer is None else layer
    tensors = {
        "W_enc": w["encoder.weight"].T, "b_enc": w["encoder.bias"], "W_dec": w["W_dec"],
        "b_dec": w["b_dec"],
    }  # fmt: skip
    if "W_skip" in w:
        tensors["W_skip"] = w["W_skip"].T  # sparsify adds x @ W_skip.mT
    d_in, d_sae = tensors["W_enc"].shape
    config = {
        "d_in": int(d_in), "d_sae": int(d_sae), "d_out": int(tensors["W_dec"].shape[1]),
        "kind": "topk", "k": int(cfg["k"]), "site": site, "layer": layer,
        "write_site": write_site, "skip": "W_skip" in w, "center_input": not transcode,
        "metadata": {"source": {"format": "sparsify", "path": str(folder),
                                "hookpoint": folder.name}},
    }  # fmt: skip
    stored = tensors["W_enc"].dtype
    return build(config, tensors, dtype=dtype or stored, device=device, where=where)
