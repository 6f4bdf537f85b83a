"""Keep figures small: bin long token axes and pool big matrices so that no figure ships millions of cells.

An 8k-token text over 30 layers x 3 KV heads is 737,280 cells per view; a dense 8k x 8k mask is 67 million.
Figures bin or pool down to at most ``max_cells`` cells (default `MAX_CELLS`) and say so in their title.
"""
from __future__ import annotations

import math

import plotly.graph_objects as go
import torch

from ..checks import check_int

#: Default cap on the number of heatmap cells of one figure (a plotly heatmap of this size stays responsive).
MAX_CELLS = 200_000


def check_max_cells(max_cells: int, min_cells: int = 1) -> int:
    """Validate a ``max_cells`` argument (integer >= ``min_cells``)."""
    return check_int("max_cells", max_cells, min_cells)


def bin_edges(n: int, n_bins: int) -> list[int]:
    """Edges of ``n_bins`` contiguous bins of (almost) equal size over ``range(n)``: n_bins + 1 increasing ints."""
    n_bins = max(1, min(n_bins, n))
    return [round(i * n / n_bins) for i in range(n_bins + 1)]


def bin_columns(values: torch.Tensor, max_cols: int) -> tuple[torch.Tensor, list[int]]:
    """Mean of ``values`` [R, N] over contiguous column bins, so that at most ``max_cols`` columns remain.

    Returns:
        (binned [R, B] float32 with B = min(N, max_cols), edges: B + 1 ints; bin b covers columns edges[b]:edges[b+1]).
    """
    n = values.shape[-1]
    if n <= max_cols:
        return values.float(), list(range(n + 1))
    edges = bin_edges(n, max_cols)
    cols = [values[:, a:b].float().mean(dim=-1) for a, b in zip(edges[:-1], edges[1:])]
    return torch.stack(cols, dim=-1), edges


def pool_factor(rows: int, cols: int, max_cells: int) -> int:
    """Smallest integer f such that ceil(rows / f) * ceil(cols / f) <= max_cells."""
    f = max(1, math.ceil(math.sqrt(rows * cols / max_cells)))
    while math.ceil(rows / f) * math.ceil(cols / f) > max_cells:
        f += 1
    return f


def pool_blocks(matrix: torch.Tensor, factor: int) -> torch.Tensor:
    """Mean of ``matrix`` [Q, N] over ``factor`` x ``factor`` blocks (edge blocks averaged over what they hold).

    Returns:
        [ceil(Q / factor), ceil(N / factor)] float32.
    """
    if factor == 1:
        return matrix.float()
    q, n = matrix.shape
    pq, pn = math.ceil(q / factor) * factor, math.ceil(n / factor) * factor
    padded = torch.zeros(pq, pn, dtype=torch.float32)
    weight = torch.zeros(pq, pn, dtype=torch.float32)
    padded[:q, :n] = matrix.float()
    weight[:q, :n] = 1.0
    sums = padded.reshape(pq // factor, factor, pn // factor, factor).sum(dim=(1, 3))
    counts = weight.reshape(pq // factor, factor, pn // factor, factor).sum(dim=(1, 3))
    return sums / counts


def heatmap_cells(fig) -> int:
    """Total number of heatmap cells in a plotly figure (what a browser has to draw)."""
    total = 0
    for trace in fig.data:
        if trace.type == "heatmap" and trace.z is not None:
            z = trace.z
            total += sum(len(row) for row in z) if len(z) and hasattr(z[0], "__len__") else len(z)
    return total


def snippet(tokens: list[str], start: int, stop: int, width: int = 60) -> str:
    """Text of tokens[start:stop], shortened to about ``width`` characters, for hover labels."""
    text = "".join(tokens[start:stop])
    if len(text) > width:
        text = text[: width // 2 - 1] + " … " + text[-(width // 2 - 2):]
    return hover_safe(text)


def hover_safe(text: str) -> str:
    """A token's text made visible in a hover label: newlines as ⏎, tabs as ⇥, spaces kept, HTML escaped."""
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace("\n", "⏎").replace("\t", "⇥"))


def add_shapes(fig: go.Figure, shapes: list[dict]) -> None:
    """Append layout shapes in ONE assignment (``fig.add_shape`` in a loop re-validates every earlier shape each
    time: seconds for a few hundred gridlines)."""
    fig.update_layout(shapes=[*fig.layout.shapes, *shapes])
