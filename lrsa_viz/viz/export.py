"""Save views (plotly figures, coloured-text views) as ONE standalone HTML file that works offline.

plotly.js is embedded in the file once (``include_plotlyjs=True``); no script or style is loaded from a CDN.
"""
from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Sequence, Union

import plotly.graph_objects as go

from .text import HtmlView

View = Union[go.Figure, HtmlView]


def export_html(views: View | Sequence[View], path: str | os.PathLike, *, title: str = "lrsa-viz") -> Path:
    """Write ``views`` (one or several figures / `HtmlView`s, in order) to ``path`` as a self-contained HTML page.

    Returns:
        The path written. The file embeds plotly.js (about 4.7 MB) and opens without network access.
    """
    items = [views] if isinstance(views, (go.Figure, HtmlView)) else list(views)
    if not items:
        raise ValueError("views must hold at least one figure or HtmlView")
    parts, embedded = [], False
    for i, view in enumerate(items):
        if isinstance(view, go.Figure):
            parts.append(view.to_html(full_html=False, include_plotlyjs=not embedded, div_id=f"lrsa-view-{i}"))
            embedded = True
        elif isinstance(view, HtmlView):
            parts.append(view.html)
        else:
            raise ValueError(f"views[{i}] must be a plotly go.Figure or an HtmlView, got {type(view).__name__}")
    page = (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title></head>\n<body style=\"font-family:sans-serif\">\n"
        f"<h2>{html.escape(title)}</h2>\n" + "\n<hr>\n".join(parts) + "\n</body></html>\n"
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
