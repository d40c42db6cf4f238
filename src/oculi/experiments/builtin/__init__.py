"""The built-in experiments; importing this package registers them.

========================  =====================================================
``logit_lens``            a target token followed through the layers
``causal_tracing``        restore clean states into a noised/interchanged run
``activation_patching``   patch clean activations into the corrupt run
``path_patching``         sender heads' effect through chosen receivers only
``head_detection``        previous-token, BOS, recent and induction head scores
``steering``              a contrastive steering vector at several strengths
``attribution``           exact direct logit attribution by layer, branch and head
``circuit``               top DLA components, composition edges, promoted tokens; a graph
``circuit_discovery``     EAP, EAP-IG, AtP*, ACDC circuits with exact faithfulness
========================  =====================================================
"""

from oculi.experiments.builtin import (
    attribution,
    causal,
    circuit,
    discovery,
    heads,
    lens,
    steering,
)

__all__ = ["attribution", "causal", "circuit", "discovery", "heads", "lens", "steering"]
