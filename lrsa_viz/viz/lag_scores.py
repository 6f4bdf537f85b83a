"""Figures of LagKV scoring: per-chunk lag scores with the kept tokens marked, and the steps that make a score."""
from __future__ import annotations

from typing import Sequence

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from ..config import LagConfig
from ..scoring import select_top_k
from .cells import MAX_CELLS, check_max_cells, hover_safe


def lag_score_figure(
    scores: torch.Tensor,
    config: LagConfig,
    tokens: Sequence[str] | None = None,
    *,
    title: str | None = None,
    max_cells: int = MAX_CELLS,
) -> go.Figure:
    """Heatmap of the lag scores of one layer and KV head: scored partitions x position in the partition.

    Args:
        scores: [P - 1, L], one row of `lagkv_scores` (``scores[b, h]``); row p scores tokens S + p*L ... S + (p+1)*L - 1.
        config: the LagConfig that produced them (its top-k is marked).
        tokens: the N token strings of the text, for hover.
        max_cells: when (P - 1) * L is larger, only the first partitions that fit are drawn (the title says so).
    Returns:
        go.Figure: trace 0 the heatmap (z [P' , L]), trace 1 a scatter with one marker per kept token
        (x = offset in the partition, y = partition index) — the top ``int(r * L)`` of each row.
    """
    if not isinstance(scores, torch.Tensor) or scores.ndim != 2:
        raise ValueError(f"scores must be a [P - 1, L] tensor (one layer and head), got {getattr(scores, 'shape', scores)}")
    n_rows, lag = scores.shape
    if lag != config.lag_size:
        raise ValueError(f"scores has {lag} columns but config.lag_size is {config.lag_size}")
    check_max_cells(max_cells, min_cells=lag)
    shown = min(n_rows, max_cells // lag)
    scores = scores[:shown].float()
    s = config.sink_size
    positions = [[s + p * lag + o for o in range(lag)] for p in range(shown)]
    if tokens is not None:
        text = [[f"token {t}: '{hover_safe(tokens[t])}'" for t in row] for row in positions]
    else:
        text = [[f"token {t}" for t in row] for row in positions]
    fig = go.Figure(go.Heatmap(
        z=scores.tolist(), x=list(range(lag)), y=list(range(shown)), text=text, colorscale="Viridis",
        colorbar=dict(title="a_K + w·a_V"),
        hovertemplate="partition %{y}, offset %{x}<br>%{text}<br>score %{z:.4f}<extra></extra>",
    ))
    if shown:
        offsets = select_top_k(scores[None, None], config.top_k)[0, 0]  # [P', k], the library's own selection
        xs = offsets.flatten().tolist()
        ys = [p for p in range(shown) for _ in range(config.top_k)]
        kept_text = [text[y][x] for x, y in zip(xs, ys)]
        fig.add_trace(go.Scatter(
            x=xs, y=ys, mode="markers", name=f"kept (top {config.top_k})", text=kept_text,
            marker=dict(symbol="x-thin", size=max(4, min(10, 400 // max(lag, 1))), line=dict(width=2, color="white")),
            hovertemplate="kept: %{text}<extra></extra>",
        ))
    note = f" — first {shown} of {n_rows} partitions" if shown < n_rows else ""
    fig.update_layout(
        title=title or f"Lag scores per partition (S={s}, L={lag}, keep top {config.top_k}){note}",
        xaxis_title="position in partition", yaxis=dict(title="scored partition p", autorange="reversed"),
        showlegend=True, legend=dict(orientation="h", y=-0.15), height=max(300, min(800, 120 + 22 * shown)),
    )
    return fig


def channel_values_figure(
    current: torch.Tensor, reference: torch.Tensor, normalised: torch.Tensor, *, title: str = ""
) -> go.Figure:
    """Three heatmaps (tokens x channels) side by side: a partition, its reference, the partition normalised
    by the reference's per-channel min/max.

    Args:
        current, reference, normalised: [L, d].
    """
    for name, t in (("current", current), ("reference", reference), ("normalised", normalised)):
        if not isinstance(t, torch.Tensor) or t.ndim != 2:
            raise ValueError(f"{name} must be a [L, d] tensor")
    fig = make_subplots(rows=1, cols=3, shared_yaxes=True, horizontal_spacing=0.06, subplot_titles=(
        "partition p (raw)", "reference p+1 (raw)", "p normalised by min/max of p+1"))
    raw_lim = float(torch.cat([current, reference]).abs().max())
    for col, (z, kw) in enumerate(((current, dict(zmid=0, zmin=-raw_lim, zmax=raw_lim, colorscale="RdBu_r", showscale=False)),
                                   (reference, dict(zmid=0, zmin=-raw_lim, zmax=raw_lim, colorscale="RdBu_r",
                                                    colorbar=dict(title="raw", x=0.64))),
                                   (normalised, dict(colorscale="Viridis", colorbar=dict(title="normalised", x=1.0)))), start=1):
        fig.add_trace(go.Heatmap(z=z.float().tolist(), hovertemplate="token %{y}, channel %{x}: %{z:.3f}<extra></extra>",
                                 **kw), row=1, col=col)
        fig.update_xaxes(title_text="channel", row=1, col=col)
    fig.update_yaxes(title_text="token in partition", autorange="reversed", row=1, col=1)
    fig.update_layout(title=title, height=420)
    return fig


def token_std_figure(
    std: torch.Tensor, attention: torch.Tensor, tokens: Sequence[str] | None = None, *, top_k: int | None = None,
    title: str = "",
) -> go.Figure:
    """Per-token channel-std of a normalised partition (bars) and its softmax over the partition (line).

    Args:
        std: [L] std over channels of each normalised token; attention: [L] softmax(std).
        tokens: the L token strings of the partition; top_k: mark the top_k tokens of ``attention``.
    """
    if std.ndim != 1 or attention.shape != std.shape:
        raise ValueError(f"std and attention must be [L] tensors of one shape, got {tuple(std.shape)}, {tuple(attention.shape)}")
    lag = std.numel()
    labels = [hover_safe(t) for t in tokens] if tokens is not None else [""] * lag
    colors = ["#1f77b4"] * lag
    if top_k:
        for i in attention.topk(top_k).indices.tolist():
            colors[i] = "#d62728"
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Bar(x=list(range(lag)), y=std.tolist(), marker_color=colors, name="std over channels",
                         text=labels, hovertemplate="offset %{x} '%{text}'<br>std %{y:.4f}<extra></extra>"))
    fig.add_trace(go.Scatter(x=list(range(lag)), y=attention.tolist(), mode="lines", name="softmax over tokens",
                             line=dict(color="#ff7f0e")), secondary_y=True)
    fig.update_layout(title=title + (f" (red: top {top_k})" if top_k else ""), xaxis_title="position in partition",
                      height=380, legend=dict(orientation="h", y=-0.2))
    fig.update_yaxes(title_text="std", secondary_y=False)
    fig.update_yaxes(title_text="softmax", secondary_y=True)
    return fig
