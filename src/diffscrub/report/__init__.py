"""Self-contained HTML report of an erase run and its evaluation (``diffscrub report``)."""

from .html import build_report, render_report, svg_line_chart

__all__ = ["build_report", "render_report", "svg_line_chart"]
