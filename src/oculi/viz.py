"""Old home of the heatmap helpers; they live in :mod:`oculi.visualize` now."""

from oculi.visualize.heatmaps import heatmap, text_grid

__all__ = ["heatmap", "text_grid"]
