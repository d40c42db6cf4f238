"""Automated circuit discovery: which edges of the model's graph carry a behaviour.

A decoder's components (the embedding, attention heads, MLPs) write into the residual stream and
later components read the sum. :class:`Graph` names every such write (sender) and read
(receiver), and an *edge* is one sender's share of one receiver's input. Patching an edge gives
only that receiver the sender's output from another prompt; :class:`EdgePatcher` does it
exactly, for many edge sets in one batched forward, and is the reference the scoring methods
are measured against.
"""

from oculi.discovery.acdc import acdc
from oculi.discovery.atp import atp_star
from oculi.discovery.graph import Edge, Graph, Receiver, Sender
from oculi.discovery.integrated import IntegratedGradients, integrated_gradients
from oculi.discovery.patch import EdgePatcher, patch_edges
from oculi.discovery.scores import Circuit, CircuitScores, eap, eap_ig

__all__ = [
    "Circuit",
    "CircuitScores",
    "Edge",
    "EdgePatcher",
    "Graph",
    "IntegratedGradients",
    "Receiver",
    "Sender",
    "acdc",
    "atp_star",
    "eap",
    "eap_ig",
    "integrated_gradients",
    "patch_edges",
]
