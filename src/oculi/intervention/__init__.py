"""Interventions: change what a model computes, inside a context that always restores it.

::

    from oculi.intervention import InterventionContext, SpectraScaler, HeadAblation

    with InterventionContext(adapter, [SpectraScaler(layer=5, head=2, alpha=1.5),
                                       HeadAblation(layer=3, head=1)]):
        adapter.generate("The capital of France is", max_new_tokens=10)

- :class:`SpectraScaler`: scale one head's attention logits (Q/K scaling, the Spectra method).
- :class:`HeadAblation`: zero, mean or resample one head's output.
- :class:`ActivationPatch`: replace or add to any site's activation at chosen positions.
- :class:`SteeringVector`: add a (contrastive) direction to the residual stream.
- :class:`InterventionContext`: applies them in plain forwards, captures and generation.
- :func:`run_with_interventions`: one forward with interventions, recordings and logits only
  at chosen positions (the building block of patching sweeps).

Module map: ``state`` (positions, prompts, generation steps), ``writers`` (the hook that writes
each site kind, mirroring the capture engine's readers), ``base`` and ``patch`` (the shared
write core), one module per intervention, ``context`` and ``run``.
"""

from oculi.intervention.ablation import HeadAblation
from oculi.intervention.base import Intervention, NoEffectWarning
from oculi.intervention.context import InterventionContext
from oculi.intervention.patch import ActivationPatch
from oculi.intervention.run import RunOutput, run_with_interventions
from oculi.intervention.scalers import SpectraScaler
from oculi.intervention.steering import SteeringVector

__all__ = [
    "ActivationPatch",
    "HeadAblation",
    "Intervention",
    "InterventionContext",
    "NoEffectWarning",
    "RunOutput",
    "SpectraScaler",
    "SteeringVector",
    "run_with_interventions",
]
