"""Capture: sites, hooks, the attention bridge, configs and the structures they fill."""

from oculi.capture.configs import CaptureConfig, LogitConfig, MLPConfig, ResidualConfig
from oculi.capture.lens import LogitCapture
from oculi.capture.sites import SITE_KINDS, TL_ALIASES
from oculi.capture.structures import AttentionCapture, FullCapture, MLPCapture, ResidualCapture

__all__ = [
    "SITE_KINDS",
    "TL_ALIASES",
    "AttentionCapture",
    "CaptureConfig",
    "FullCapture",
    "LogitCapture",
    "LogitConfig",
    "MLPCapture",
    "MLPConfig",
    "ResidualCapture",
    "ResidualConfig",
]
