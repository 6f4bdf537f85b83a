"""Which tokens LagKV keeps: a retained-token heatmap (layers or layer x KV head x tokens) and a layer x KV-head grid.

Input everywhere: ``kept`` [n_layers, H_kv, N] bool, e.g. `KVCapture.keep_mask(config)` or a `LagKVCache`'s
``kept_position_mask()[:, 0]``.
"""
from __future__ import annotations

from typing import Literal, Sequence

import plotly.graph_objects as go
import torch

from .cells import MAX_CELLS, bin_columns, check_max_cells, hover_safe, snippet


def _check_kept(kept: torch.Tensor) -> torch.Tensor:
    if not isinstance(kept, torch.Tensor) or kept.ndim != 3 or kept.dtype != torch.bool:
        shape = tuple(kept.shape) if isinstance(kept, torch.Tensor) else type(kept).__name__
        raise ValueError(f"kept must be a bool tensor [n_layers, H_kv, N], got {shape}")
    return kept


def _layer_ids(layer_ids: Sequence[int] | None, n: int) -> list[int]:
    ids = list(range(n)) if layer_ids is None else list(layer_ids)
    if len(ids) != n:
        raise ValueError(f"layer_ids must name the {n} layers of kept, got {len(ids)}")
    return ids


def keep_frequency(kept: torch.Tensor) -> torch.Tensor:
    """Fraction of (layer, KV head) pairs that keep each token: [N] float32 in [0, 1]."""
    kept = _check_kept(kept)
    return kept.float().mean(dim=(0, 1))


def retained_token_figure(
    kept: torch.Tensor,
    tokens: Sequence[str] | None = None,
    *,
    layer_ids: Sequence[int] | None = None,
    by: Literal["layer", "layer_head"] = "layer",
    max_cells: int = MAX_CELLS,
    title: str | None = None,
) -> go.Figure:
    """Heatmap of the retained tokens: rows = layers (or layer x KV head), columns = token positions.

    Args:
        kept: [n_layers, H_kv, N] bool.
        tokens: N token strings, shown on hover.
        by: ``"layer"``: a cell is the fraction of the layer's KV heads that keep the token;
            ``"layer_head"``: one row per (layer, KV head), a cell is 1 (kept) or 0 (evicted).
        max_cells: at most this many cells; longer texts are binned into windows of consecutive tokens and a cell
            is then the fraction of kept (token, head) pairs in its window (the title says so).
    Returns:
        go.Figure with one heatmap; ``z`` has rows x min(N, max_cells // rows) cells; the trace's
        ``meta["bin_edges"]`` gives the token range of each column (column b covers edges[b]:edges[b+1]).
    """
    kept = _check_kept(kept)
    n_layers, n_heads, n = kept.shape
    ids = _layer_ids(layer_ids, n_layers)
    if tokens is not None and len(tokens) != n:
        raise ValueError(f"tokens must have one string per position ({n}), got {len(tokens)}")
    if by == "layer":
        rows, labels = kept.float().mean(dim=1), [f"L{i}" for i in ids]
    elif by == "layer_head":
        rows = kept.float().reshape(n_layers * n_heads, n)
        labels = [f"L{i} H{h}" for i in ids for h in range(n_heads)]
    else:
        raise ValueError(f"by must be 'layer' or 'layer_head', got {by!r}")
    check_max_cells(max_cells, min_cells=rows.shape[0])
    z, edges = bin_columns(rows, max_cells // rows.shape[0])
    binned = z.shape[1] < n
    starts, stops = edges[:-1], edges[1:]
    if binned:
        x = [(a + b - 1) / 2 for a, b in zip(starts, stops)]
        col_text = [f"tokens {a}–{b - 1}: {snippet(tokens, a, b) if tokens else ''}" for a, b in zip(starts, stops)]
    else:
        x = list(range(n))
        col_text = [f"token {t}: '{hover_safe(tokens[t])}'" if tokens else f"token {t}" for t in range(n)]
    what = "fraction kept" if binned or by == "layer" else "kept (1) / evicted (0)"
    fig = go.Figure(go.Heatmap(
        z=z.tolist(), x=x, y=list(range(len(labels))), text=[col_text] * len(labels), zmin=0, zmax=1,
        colorscale=[[0, "#f2f2f2"], [1, "#1f77b4"]], colorbar=dict(title=what),
        customdata=[[lab] * len(x) for lab in labels], meta={"by": by, "bin_edges": edges},
        hovertemplate="%{customdata}<br>%{text}<br>" + what + ": %{z:.2f}<extra></extra>",
    ))
    note = f" — binned: {len(x)} windows of ~{n / len(x):.1f} tokens" if binned else ""
    fig.update_layout(
        title=(title or f"Retained tokens ({'per layer: fraction of KV heads' if by == 'layer' else 'per layer and KV head'})") + note,
        xaxis_title="token position", yaxis=dict(title="layer" if by == "layer" else "layer, KV head", autorange="reversed",
                                                   tickmode="array", tickvals=list(range(len(labels))), ticktext=labels),
        height=max(300, min(900, 40 + 14 * len(labels))),
    )
    return fig


def span_retention(kept: torch.Tensor, span: tuple[int, int]) -> torch.Tensor:
    """Fraction of the tokens in ``span`` = [start, stop) that each layer / KV head keeps: [n_layers, H_kv] float32."""
    kept = _check_kept(kept)
    n = kept.shape[-1]
    start, stop = span
    if not 0 <= start < stop <= n:
        raise ValueError(f"span must be (start, stop) with 0 <= start < stop <= {n}, got {span}")
    return kept[..., start:stop].float().mean(dim=-1)


def retention_grid_figure(
    kept: torch.Tensor,
    span: tuple[int, int] | None = None,
    tokens: Sequence[str] | None = None,
    *,
    layer_ids: Sequence[int] | None = None,
    title: str | None = None,
) -> go.Figure:
    """Layer x KV-head grid: the fraction of the tokens of ``span`` (default: all) that each head keeps.

    Over the whole text every head keeps the same number of tokens (METHOD eq. 12), so the grid is informative
    for a span: e.g. the sentence that holds a fact, whose tokens some heads keep and others drop.
    Returns:
        go.Figure with one heatmap, z [n_layers, H_kv].
    """
    kept = _check_kept(kept)
    n_layers, n_heads, n = kept.shape
    ids = _layer_ids(layer_ids, n_layers)
    span = span or (0, n)
    frac = span_retention(kept, span)
    count = kept[..., span[0]:span[1]].sum(dim=-1)
    size = span[1] - span[0]
    text = [[f"{int(count[i, h])}/{size}" for h in range(n_heads)] for i in range(n_layers)]
    fig = go.Figure(go.Heatmap(
        z=frac.tolist(), x=[f"H{h}" for h in range(n_heads)], y=[f"L{i}" for i in ids], text=text,
        texttemplate="%{text}" if n_layers * n_heads <= 400 else None, zmin=0, zmax=1, colorscale="Blues",
        colorbar=dict(title="fraction kept"),
        hovertemplate="layer %{y}, KV head %{x}<br>kept %{text} tokens of the span (%{z:.0%})<extra></extra>",
    ))
    what = f"tokens {span[0]}–{span[1] - 1}" + (f": '{snippet(list(tokens), *span, width=50)}'" if tokens else "")
    fig.update_layout(title=title or f"Retention of {what}", xaxis_title="KV head",
                      yaxis=dict(title="layer", autorange="reversed"), height=max(300, min(900, 60 + 18 * n_layers)))
    return fig
