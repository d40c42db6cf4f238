"""Figures and views: matplotlib figures (the ``[viz]`` extra), HTML views for Jupyter, and
the self-contained report page.

::

    from oculi import visualize
    visualize.attention_heatmap(adapter.capture(prompt), layer=3, head=1)
    visualize.logit_lens_grid(adapter.capture_logits(prompt), adapter.tokenizer)
    visualize.entropy_heatmap(EntropyAnalysis.token_entropy(capture))   # layer x head
    visualize.write_report(adapter, "The Eiffel Tower is located in the city of", "report.html")

Importing this package imports neither matplotlib nor the report's model-running code; each
function imports what it needs when called.
"""

from typing import TYPE_CHECKING

from oculi.visualize.attribution import head_attribution_bars, layer_attribution, top_heads
from oculi.visualize.circuit import circuit_graph, circuit_layout, draw_circuit
from oculi.visualize.correlation import norm_entropy_scatter
from oculi.visualize.embeddings import (
    compare_methods,
    layer_embeddings,
    plot_embeddings,
    reduce_dimensions,
)
from oculi.visualize.entropy import entropy_heatmap
from oculi.visualize.features import feature_page, write_feature_page
from oculi.visualize.heatmaps import attention_grid, attention_heatmap, heatmap, text_grid
from oculi.visualize.intervention import intervention_comparison
from oculi.visualize.lens import (
    convergence,
    convergence_metrics,
    input_preservation,
    lens_probability,
    logit_lens_grid,
    prediction_refinement,
)

if TYPE_CHECKING:  # loaded on first use (see __getattr__); static readers see the real import
    from oculi.visualize.report import write_report

__all__ = [
    "attention_grid",
    "attention_heatmap",
    "circuit_graph",
    "circuit_layout",
    "compare_methods",
    "convergence",
    "convergence_metrics",
    "draw_circuit",
    "entropy_heatmap",
    "feature_page",
    "head_attribution_bars",
    "heatmap",
    "input_preservation",
    "intervention_comparison",
    "layer_attribution",
    "layer_embeddings",
    "lens_probability",
    "logit_lens_grid",
    "norm_entropy_scatter",
    "plot_embeddings",
    "prediction_refinement",
    "reduce_dimensions",
    "text_grid",
    "top_heads",
    "write_feature_page",
    "write_report",
]


def __getattr__(name: str):
    # the report pulls in the model-running code; load it on first use only
    if name == "write_report":
        from oculi.visualize.report import write_report

        return write_report
    raise AttributeError(f"module 'oculi.visualize' has no attribute {name!r}")
