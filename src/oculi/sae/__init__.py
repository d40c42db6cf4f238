"""Sparse autoencoders and transcoders: load any common layout, splice, train, explain.

::

    import oculi
    from oculi.sae import SAE, SAEPatch, load_sae

    sae = load_sae("path/to/sae")                         # SAELens, Gemma Scope, sparsify, oculi
    a = sae.encode(x)                                     # [..., d_sae] latent activations
    with oculi.InterventionContext(adapter, [SAEPatch(sae, error=False)]):
        adapter.forward(prompt)                           # the site replaced by decode(encode(x))

An SAE writes an activation as a sparse non-negative combination of learned directions (the
*latents*); it is bound to the ``(site, layer)`` of oculi's site map it was trained on, so
splicing it is an intervention like any other and its latents are a site that captures read.

Module map: ``model`` (the :class:`SAE` type), ``stats`` (density, dead and dense latents), ``io`` (oculi's own file), ``formats`` (SAELens,
Gemma Scope, sparsify), ``load`` (recognising a layout by its files), ``splice``
(:class:`SAEPatch`, an intervention), ``latents`` (latents as a capture site), ``train``
(with ``data``, ``objectives``, ``checkpoint``), ``evaluate``, ``features`` (top
activations, contexts, logit effects; the page is :mod:`oculi.visualize.features`),
``attribution`` (DLA and AtP per latent, patching latents from a clean run), ``patching``
(latents as a site of :func:`oculi.patching.activation_patching` and
:func:`~oculi.patching.attribution_patching`).
"""

from oculi.sae.attribution import (
    FeatureAttribution,
    LatentPatching,
    feature_attribution,
    latent_patching,
)
from oculi.sae.config import TrainConfig
from oculi.sae.evaluate import SAEEvaluation, evaluate
from oculi.sae.features import Context, TopActivations, logit_effects, top_activations
from oculi.sae.io import SAEFormatError, save_sae
from oculi.sae.latents import capture_latents
from oculi.sae.load import load_sae, load_saes
from oculi.sae.model import KINDS, SAE, fvu
from oculi.sae.patching import (
    LatentPatchingResult,
    sae_activation_patching,
    sae_attribution_patching,
)
from oculi.sae.splice import SAEPatch
from oculi.sae.stats import LatentStats, latent_stats
from oculi.sae.train import train

__all__ = [
    "Context",
    "FeatureAttribution",
    "KINDS",
    "SAE",
    "LatentPatching",
    "LatentPatchingResult",
    "LatentStats",
    "SAEEvaluation",
    "SAEFormatError",
    "SAEPatch",
    "TopActivations",
    "TrainConfig",
    "capture_latents",
    "evaluate",
    "feature_attribution",
    "fvu",
    "latent_patching",
    "latent_stats",
    "load_sae",
    "load_saes",
    "logit_effects",
    "sae_activation_patching",
    "sae_attribution_patching",
    "save_sae",
    "top_activations",
    "train",
]
