"""Figures of LagKV scoring: per-partition lag scores with the kept tokens marked, the steps that make a score,
and how much variants of the score agree with it."""
from __future__ import annotations

from typing import Sequence

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from ..checks import check_int
from ..config import LagConfig
from ..scoring import select_top_k
from .cells import MAX_CELLS, check_max_cells, hover_safe


#: The kept tokens' text is listed beside the rows only up to this many rows (beyond, the rows get too thin).
MAX_TEXT_ROWS = 40


def score_label(config: LagConfig) -> str:
    """The name of the LagKV score of a config: ``a_K + a_V`` (or ``a_K + w·a_V`` with w = score_v_ratio)."""
    w = config.score_v_ratio
    return "a_K + a_V" if w == 1 else f"a_K + {w:g}·a_V"


def _kept_text(tokens: Sequence[str], positions: Sequence[int], width: int, line: int = 64) -> str:
    """The kept tokens of one partition, in order, separated by '│': at most ``width`` characters, broken into
    lines of about ``line`` characters (at token boundaries, ``<br>``)."""
    pieces = [hover_safe(tokens[t]) for t in positions]
    lines, current, used = [], "", 0
    for piece in pieces:
        piece = piece + "│"
        if used + len(piece) > width:
            current += "…"
            break
        if current and len(current) + len(piece) > line:
            lines.append(current)
            current = ""
        current += piece
        used += len(piece)
    lines.append(current.rstrip("│"))
    return "<br>".join(lines)


def _score_colorbar(z: torch.Tensor, label: str, uniform: float, uniform_name: str) -> dict:
    """Colour bar of a score heatmap: title = what the colour is, ticks at a few values and at the uniform score."""
    lo, hi = (float(z.min()), float(z.max())) if z.numel() else (0.0, 1.0)
    ticks = [lo + (hi - lo) * i / 4 for i in range(5)]
    ticks = [t for t in ticks if abs(t - uniform) > (hi - lo) / 6] + ([uniform] if lo <= uniform <= hi else [])
    text = [f"{t:.4f}" if t != uniform else f"{t:.4f} ({uniform_name})" for t in ticks]
    return dict(title=dict(text=f"score<br>{label}"), tickmode="array", tickvals=ticks, ticktext=text, len=0.9)


def lag_score_figure(
    scores: torch.Tensor,
    config: LagConfig,
    tokens: Sequence[str] | None = None,
    *,
    title: str | None = None,
    max_cells: int = MAX_CELLS,
    kept_text_width: int = 128,
) -> go.Figure:
    """Heatmap of the lag scores of one layer and KV head: scored partitions x position in the partition.

    Args:
        scores: [P - 1, L], one row of `lagkv_scores` (``scores[b, h]``); row p scores tokens S + p*L ... S + (p+1)*L - 1.
        config: the LagConfig that produced them (its top-k is marked).
        tokens: the N token strings of the text, for hover and for the kept tokens' text beside each row.
        max_cells: when (P - 1) * L is larger, only the first partitions that fit are drawn (the title says so).
        kept_text_width: characters of kept-token text shown beside each row (0: none); listed only when at most
            `MAX_TEXT_ROWS` rows are drawn.
    Returns:
        go.Figure: trace 0 the heatmap (z [P' , L]; rows labelled "p: tokens a–b"), trace 1 a scatter with one marker
        per kept token (x = offset in the partition, y = partition index) — the top ``int(r * L)`` of each row by
        `select_top_k`. With ``tokens``, one annotation per row (name "kept text") lists the kept tokens in order
        (tokens separated by '│'). The colour bar is the score ``a_K + v a_V`` (v = ``score_v_ratio``): two
        softmaxes over the L tokens, so a row sums to 1 + v and the uniform value is (1 + v)/L (2/L for v = 1).
    """
    if not isinstance(scores, torch.Tensor) or scores.ndim != 2:
        raise ValueError(f"scores must be a [P - 1, L] tensor (one layer and head), got {getattr(scores, 'shape', scores)}")
    n_rows, lag = scores.shape
    if lag != config.lag_size:
        raise ValueError(f"scores has {lag} columns but config.lag_size is {config.lag_size}")
    check_max_cells(max_cells, min_cells=lag)
    check_int("kept_text_width", kept_text_width, 0)
    shown = min(n_rows, max_cells // lag)
    scores = scores[:shown].float()
    s = config.sink_size
    positions = [[s + p * lag + o for o in range(lag)] for p in range(shown)]
    if tokens is not None:
        text = [[f"token {t}: '{hover_safe(tokens[t])}'" for t in row] for row in positions]
    else:
        text = [[f"token {t}" for t in row] for row in positions]
    row_labels = [f"p{p}: {s + p * lag}–{s + (p + 1) * lag - 1}" for p in range(shown)]
    uniform = (1 + config.score_v_ratio) / lag
    label = score_label(config)
    fig = go.Figure(go.Heatmap(
        z=scores.tolist(), x=list(range(lag)), y=list(range(shown)), text=text, colorscale="Viridis",
        colorbar=_score_colorbar(scores, label, uniform, f"{1 + config.score_v_ratio:g}/L"),
        hovertemplate="partition %{y}, offset %{x}<br>%{text}<br>score " + label + " = %{z:.4f}<extra></extra>",
    ))
    show_text = tokens is not None and kept_text_width > 0 and 0 < shown <= MAX_TEXT_ROWS
    if shown:
        offsets = select_top_k(scores[None, None], config.top_k)[0, 0]  # [P', k], the library's own selection
        xs = offsets.flatten().tolist()
        ys = [p for p in range(shown) for _ in range(config.top_k)]
        kept_text = [text[y][x] for x, y in zip(xs, ys)]
        fig.add_trace(go.Scatter(
            x=xs, y=ys, mode="markers", name=f"kept (top {config.top_k} of each row)", text=kept_text,
            marker=dict(symbol="x", size=max(5, min(10, 400 // max(lag, 1))), color="white",
                        line=dict(width=1, color="black")),
            hovertemplate="kept: %{text}<extra></extra>",
        ))
        if show_text:
            for p in range(shown):
                kept_positions = [positions[p][o] for o in offsets[p].tolist()]
                fig.add_annotation(x=0.68, xref="paper", xanchor="left", y=p, yref="y", showarrow=False,
                                   text=_kept_text(tokens, kept_positions, kept_text_width), name="kept text",
                                   font=dict(family="monospace", size=10), align="left")
            fig.add_annotation(x=0.68, xref="paper", xanchor="left", y=1.0, yref="paper", yanchor="bottom",
                               showarrow=False, text="<b>kept tokens of the row, in order</b> (separated by │)",
                               font=dict(size=11), name="kept text header")
    note = f" — first {shown} of {n_rows} partitions" if shown < n_rows else ""
    if tokens is not None and kept_text_width > 0 and shown > MAX_TEXT_ROWS:
        note += f" (kept tokens' text listed for up to {MAX_TEXT_ROWS} rows; hover the crosses)"
    row_px = 34 if show_text else 22
    fig.update_layout(
        title=title or f"Lag scores per partition (S={s}, L={lag}, keep top {config.top_k}){note}",
        xaxis=dict(title="position in partition (token offset)", domain=[0, 0.55 if show_text else 1]),
        yaxis=dict(title="scored partition: token span", autorange="reversed", tickmode="array",
                   tickvals=list(range(shown)), ticktext=row_labels),
        showlegend=True, legend=dict(orientation="h", x=0, y=1.0, yanchor="bottom"),
        height=max(420, min(1600, 170 + row_px * shown)),
        width=1250 if show_text else None, margin=dict(r=20) if show_text else None,
    )
    if show_text:
        fig.update_traces(colorbar=dict(x=0.565), selector=dict(type="heatmap"))
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


def _kept_offsets(score: torch.Tensor, top_k: int | None) -> list[int]:
    """Offsets of the top_k scores of one partition [L] by the project's selection rule (`select_top_k`)."""
    if not top_k:
        return []
    check_int("top_k", top_k, 1, score.numel())
    return select_top_k(score.float()[None, None, None], top_k)[0, 0, 0].tolist()


def _split_bars(fig: go.Figure, y: torch.Tensor, labels: list[str], kept: list[int], what: str, fmt: str,
                **kw) -> None:
    """Bars of ``y`` [L]: the kept offsets in red, the others in blue, as two legend entries (overlaid, no offset)."""
    groups = (("evicted", "#1f77b4", [i for i in range(y.numel()) if i not in set(kept)]),
              (f"kept (top {len(kept)})", "#d62728", kept)) if kept else ((what, "#1f77b4", list(range(y.numel()))),)
    for name, colour, idx in groups:
        fig.add_trace(go.Bar(x=idx, y=[float(y[i]) for i in idx], marker_color=colour, name=name,
                             text=[labels[i] for i in idx], textposition="none",
                             hovertemplate="offset %{x} '%{text}'<br>" + what + " %{y:" + fmt + "}<extra></extra>"),
                      **kw)


def token_std_figure(
    std: torch.Tensor, attention: torch.Tensor, tokens: Sequence[str] | None = None, *, top_k: int | None = None,
    title: str = "",
) -> go.Figure:
    """Per-token channel-std of one normalised partition (bars, left axis) and its softmax over the L tokens
    (line, right axis).

    Args:
        std: [L] std over channels of each normalised token; attention: [L] softmax(std).
        tokens: the L token strings of the partition; top_k: colour the top_k tokens of ``attention`` (by
            `select_top_k`) red, as their own legend entry.
    """
    if std.ndim != 1 or attention.shape != std.shape:
        raise ValueError(f"std and attention must be [L] tensors of one shape, got {tuple(std.shape)}, "
                         f"{tuple(attention.shape)}")
    lag = std.numel()
    labels = [hover_safe(t) for t in tokens] if tokens is not None else [""] * lag
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    _split_bars(fig, std, labels, _kept_offsets(attention, top_k), "std of the normalised channels", ".4f",
                secondary_y=False)
    fig.add_trace(go.Scatter(x=list(range(lag)), y=attention.tolist(), mode="lines",
                             name="softmax of the std over the L tokens (right axis)", line=dict(color="#ff7f0e")),
                  secondary_y=True)
    fig.update_layout(title=title, xaxis_title="position in partition (token offset)", barmode="overlay",
                      height=400, legend=dict(orientation="h", y=-0.25))
    fig.update_yaxes(title_text="std over channels (normalised units)", secondary_y=False)
    fig.update_yaxes(title_text="softmax weight (sums to 1)", secondary_y=True)
    return fig


def partition_score_figure(
    a_k: torch.Tensor, a_v: torch.Tensor, config: LagConfig, tokens: Sequence[str] | None = None, *,
    title: str = "",
) -> go.Figure:
    """The LagKV score of one partition, ``a_K + w·a_V`` (w = score_v_ratio), with the kept tokens in red.

    The y axis is zoomed to the scores (they sit close to the uniform value (1 + w)/L, which a dashed line marks),
    not started at 0; a dotted line marks the lowest kept score.
    Args:
        a_k, a_v: [L] softmax weights of the key and value stds of one partition.
        config: gives L, top-k and w.
        tokens: the L token strings of the partition (hover).
    Returns:
        go.Figure: bar traces "evicted" and "kept (top k)", then the lines "uniform" and "lowest kept score";
        ``layout.meta["kept"]`` holds the kept offsets (`select_top_k`).
    """
    if a_k.ndim != 1 or a_v.shape != a_k.shape or a_k.numel() != config.lag_size:
        raise ValueError(f"a_k and a_v must be [L] tensors with L = config.lag_size = {config.lag_size}, got "
                         f"{tuple(a_k.shape)}, {tuple(a_v.shape)}")
    lag, w = config.lag_size, config.score_v_ratio
    score = a_k.float() + w * a_v.float()
    labels = [hover_safe(t) for t in tokens] if tokens is not None else [""] * lag
    kept = _kept_offsets(score, config.top_k)
    label = score_label(config)
    fig = go.Figure()
    _split_bars(fig, score, labels, kept, f"score {label}", ".5f")
    uniform = (1 + w) / lag
    threshold = float(score[kept].min())
    for y, name, dash, colour in ((uniform, f"uniform score (1 + {w:g})/L = {uniform:.4f}", "dash", "black"),
                                  (threshold, f"lowest kept score = {threshold:.4f}", "dot", "#d62728")):
        fig.add_trace(go.Scatter(x=[-0.5, lag - 0.5], y=[y, y], mode="lines", name=name,
                                 line=dict(color=colour, dash=dash, width=1.5), hoverinfo="skip"))
    lo, hi = float(score.min()), float(score.max())
    pad = 0.08 * (hi - lo) if hi > lo else 0.01 * max(abs(hi), 1e-6)
    fig.update_layout(title=title, xaxis_title="position in partition (token offset)", barmode="overlay",
                      yaxis=dict(title=f"score {label} (axis does not start at 0)", range=[lo - pad, hi + pad]),
                      height=420, legend=dict(orientation="h", y=-0.22), meta={"kept": kept})
    return fig


def ablation_overlap_figure(overlaps: dict[str, float], chance: float, *, title: str = "") -> go.Figure:
    """Bars: for each variant of the score, the fraction of the real LagKV selection it selects too.

    Args:
        overlaps: {variant name: overlap in [0, 1]} (|variant's top-k ∩ LagKV's top-k| / k, averaged).
        chance: the overlap of a random selection of the same size (k / L).
    """
    if not overlaps:
        raise ValueError("overlaps must name at least one variant")
    bad = {k: v for k, v in overlaps.items() if not 0 <= float(v) <= 1}
    if bad or not 0 <= chance <= 1:
        raise ValueError(f"overlaps and chance must be fractions in [0, 1], got {bad or chance}")
    names = list(overlaps)
    fig = go.Figure(go.Bar(x=[float(overlaps[n]) for n in names], y=names, orientation="h", name="overlap",
                           text=[f"{float(overlaps[n]):.1%}" for n in names], textposition="outside",
                           marker_color="#1f77b4",
                           hovertemplate="%{y}: selects %{x:.1%} of LagKV's tokens<extra></extra>"))
    fig.add_vline(x=chance, line=dict(color="black", dash="dash"), name=f"chance: a random top-k (k/L = {chance:.0%})",
                  showlegend=True)
    fig.update_layout(title=title, xaxis=dict(title="overlap with LagKV's selection (fraction of its kept tokens)",
                                              range=[0, 1.1], tickformat=".0%"),
                      yaxis=dict(autorange="reversed"), height=200 + 36 * len(names),
                      legend=dict(orientation="h", x=0, y=1.02, yanchor="bottom"), margin=dict(l=300, t=100))
    return fig
