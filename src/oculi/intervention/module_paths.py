"""Hugging Face module paths as oculi sites: seed 002's ``layer_name="model.layers.3.mlp"``.

Seed 002 names the tensor it patches by the module that outputs it; oculi by a site kind and a
layer. Read through the model's anatomy, a path of one decoder layer maps to the site that *is*
that module's output, in that layer::

    module_sites(adapter)["model.layers.3"]            # ("resid_post", 3)
    module_sites(adapter)["model.layers.3.mlp"]        # ("mlp_out", 3) in Llama

=======================================  ==============================================
module (relative to one decoder layer)   site
=======================================  ==============================================
the layer itself                         ``resid_post``
the pre-attention norm                   ``attn_in``
the attention module                     ``attn_out``; behind an output norm (Gemma 2/3,
                                         OLMo 2) the attention's own output (``o_out``)
the post-attention norm (if any)         ``attn_out``
the pre-MLP norm                         ``mlp_in``
the MLP module                           ``mlp_out``; behind an output norm the MLP's own
                                         output (``mlp_result``)
the post-MLP norm (if any)               ``mlp_out``
=======================================  ==============================================

``o_out`` and ``mlp_result`` are what the attention and MLP modules return in families that
normalise a branch before adding it (Gemma's ``post_feedforward_layernorm``): writing them
changes the branch before its norm, exactly as a hook on the module would. Any other path is
refused with the valid ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from oculi.errors import UnknownSiteError, did_you_mean

if TYPE_CHECKING:
    from oculi.models.adapter import Adapter


def module_sites(adapter: Adapter) -> dict[str, tuple[str, int]]:
    """Every module path :func:`site_of_module` accepts -> ``(site kind, layer)``."""
    anat = adapter.anatomy
    out: dict[str, tuple[str, int]] = {}
    for layer in range(adapter.n_layers):
        base = f"{anat.layers}.{layer}"
        places = [
            (None, "resid_post"),
            (anat.attn_norm, "attn_in"),
            (anat.attn, "o_out" if anat.attn_out_norm else "attn_out"),
            (anat.attn_out_norm, "attn_out"),
            (anat.mlp_norm, "mlp_in"),
            (anat.mlp, "mlp_result" if anat.mlp_out_norm else "mlp_out"),
            (anat.mlp_out_norm, "mlp_out"),
        ]
        for module, kind in places:
            if module is None and kind != "resid_post":
                continue
            out[base if module is None else f"{base}.{module}"] = (kind, layer)
    return out


def site_of_module(adapter: Adapter, path: str, what: str = "layer_name") -> tuple[str, int]:
    """``(site kind, layer)`` whose tensor is the output of the module at ``path``.

    Example::

        site_of_module(gemma, "model.layers.3.mlp")   # ("mlp_result", 3): before the norm

    Raises:
        UnknownSiteError: (a ``KeyError``) a path that is not one of the model's decoder-layer modules listed above;
            the message names the valid forms for layer 0 and the layer range.
    """
    sites = module_sites(adapter)
    if isinstance(path, str) and path in sites:
        return sites[path]
    base = f"{adapter.anatomy.layers}.0"
    forms = ", ".join(repr(p) for p in sites if p == base or p.startswith(base + "."))
    hint = did_you_mean(path, list(sites), n=1) if isinstance(path, str) else ""
    raise UnknownSiteError(
        f"{what}={path!r} is not a module oculi can patch in this "
        f"{adapter.anatomy.family!r} model; valid paths are {forms} with any layer "
        f"0..{adapter.n_layers - 1} in place of 0 (or pass site= and layer=){hint}"
    )
