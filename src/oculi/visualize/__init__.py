"""Figures and views: matplotlib figures (the ``[viz]`` extra), HTML views for Jupyter, and
the self-contained report page.

::

    from oculi.visualize import attention_heatmap, write_report
    attention_heatmap(adapter.capture(prompt), layer=3, head=1)
    write_report(adapter, "The Eiffel Tower is located in the city of", "report.html")

Importing this package imports neither matplotlib nor the report's model code; each figure
function imports what it needs when called.
"""

from oculi.visualize.heatmaps import attention_grid, attention_heatmap, heatmap, text_grid

__all__ = [
    "attention_grid",
    "attention_heatmap",
    "heatmap",
    "text_grid",
    "write_report",
]


def __getattr__(name: str):
    # the report pulls in the model-running code; load it on first use only
    if name == "write_report":
        from oculi.visualize.report import write_report

        return write_report
    raise AttributeError(f"module 'oculi.visualize' has no attribute {name!r}")
