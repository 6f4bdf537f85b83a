"""Why free parallel and chunked LRSA runs can differ: flat LagKV scores, fragile top-k boundaries, and what one
flipped token does downstream (figures over `lrsa_viz.agreement.compare_selections` results).

LagKV's score of a token is ``a_K + v * a_V``, two softmaxes over the L tokens of a partition; each sums to 1, so
the scores average ``(1 + v) / L`` (2/L for v = 1) and, since the channel-stds they exponentiate differ little,
sit close to that level. The top-k boundary of a partition then separates tokens whose scores may differ by less
than the float drift between two runs that compute the same K/V with different matmul shapes (issue 9 found gaps
from 0 to 1.4e-6 at the flipped boundaries, data/results/agreement_cpu.json a drift of 6e-9 to 5e-8).

Shapes: scores [..., L] (any leading dims: layers, B, H, P - 1), gaps [...], logit differences [N].
"""
from __future__ import annotations

import math
from typing import Sequence

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from ..config import LagConfig

#: Gaps below this are drawn at it on the log axis (exact ties have gap 0).
GAP_FLOOR = 1e-10


def boundary_gaps(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """Score of the k-th best token minus that of the (k+1)-th best, per partition: how far the last kept token is
    from the first evicted one.

    Args:
        scores: [..., L] LagKV scores (e.g. ``agreement.chunked_scores``), top_k: tokens kept per partition, 1 <= k < L.
    Returns:
        [...] float32 >= 0 (0 = an exact tie at the boundary).
    """
    if scores.ndim < 1 or not 1 <= top_k < scores.shape[-1]:
        raise ValueError(f"top_k must be in [1, L - 1] = [1, {scores.shape[-1] - 1 if scores.ndim else 0}] "
                         f"(with r = 1 there is no boundary), got {top_k}")
    ranked = scores.float().sort(dim=-1, descending=True).values
    return ranked[..., top_k - 1] - ranked[..., top_k]


def _log_ticks(lo: float, hi: float) -> tuple[list[float], list[str]]:
    exps = list(range(math.floor(lo), math.ceil(hi) + 1))
    return [float(e) for e in exps], [f"1e{e}" for e in exps]


def score_flatness_figure(
    scores: torch.Tensor,
    config: LagConfig,
    *,
    drift: float | None = None,
    flip_gaps: Sequence[float] = (),
    bins: int = 60,
    title: str = "LagKV scores are flat, so top-k boundaries are fragile",
) -> go.Figure:
    """Left: histogram of all scores, with the uniform level (1 + v)/L. Right: histogram of the top-k boundary gaps
    (`boundary_gaps`) on a log axis, with the score drift between two runs and the gaps of observed flips.

    Args:
        scores: [..., L] LagKV scores; drift: max |score difference| of the same tokens between two runs;
        flip_gaps: score gaps of observed flips (drawn as markers).
    Returns:
        go.Figure with trace 0 = score histogram, trace 1 = gap histogram (x = log10 gap), then flips if any;
        vertical lines (shapes) mark the uniform level and the drift.
    """
    if scores.ndim < 1 or scores.shape[-1] != config.lag_size or scores.numel() == 0:
        raise ValueError(f"scores must be [..., L = {config.lag_size}] and non-empty, got {tuple(scores.shape)}")
    uniform = (1 + config.score_v_ratio) / config.lag_size
    gaps = boundary_gaps(scores, config.top_k).flatten()
    log_gaps = gaps.clamp_min(GAP_FLOOR).log10()
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12, subplot_titles=(
        f"{scores.numel():,} token scores", f"{gaps.numel():,} top-k boundaries: score of the last kept − first evicted"))
    fig.add_trace(go.Histogram(x=scores.flatten().tolist(), nbinsx=bins, name="scores", marker_color="#1f77b4",
                               hovertemplate="score %{x}: %{y} tokens<extra></extra>"), row=1, col=1)
    fig.add_vline(x=uniform, line=dict(color="black", dash="dash"), row=1, col=1,
                  annotation_text=f"uniform (1+v)/L = {uniform:.4f}", annotation_position="top right")
    fig.add_trace(go.Histogram(x=log_gaps.tolist(), nbinsx=bins, name="boundary gaps", marker_color="#2ca02c",
                               hovertemplate="gap ~1e%{x:.1f}: %{y} partitions<extra></extra>"), row=1, col=2)
    lo, hi = float(log_gaps.min()), float(log_gaps.max())
    if drift is not None and drift > 0:
        d = math.log10(max(drift, GAP_FLOOR))
        lo = min(lo, d)
        fig.add_vline(x=d, line=dict(color="#d62728", dash="dash"), row=1, col=2,
                      annotation_text=f"score drift between runs {drift:.1e}", annotation_position="top left")
    if flip_gaps:
        lf = [math.log10(max(g, GAP_FLOOR)) for g in flip_gaps]
        lo = min(lo, *lf)
        fig.add_trace(go.Scatter(x=lf, y=[0] * len(lf), mode="markers", name="observed flips",
                                 marker=dict(color="#d62728", symbol="x", size=10),
                                 hovertemplate="flip with gap 1e%{x:.1f}<extra></extra>"), row=1, col=2)
    vals, text = _log_ticks(lo, hi)
    fig.update_xaxes(title_text="LagKV score a_K + v·a_V of a token", row=1, col=1)
    fig.update_xaxes(title_text="boundary gap (log scale; exact ties at 1e-10)", tickvals=vals, ticktext=text, row=1, col=2)
    fig.update_yaxes(title_text="tokens", row=1, col=1)
    fig.update_yaxes(title_text="partitions (layer × head × partition)", row=1, col=2)
    fig.update_layout(title=title, height=430, showlegend=bool(flip_gaps), bargap=0.05)
    return fig


def flip_effect_figure(
    logit_diff: torch.Tensor,
    config: LagConfig,
    partition: int,
    *,
    tolerance: float | None = None,
    title: str = "What one flipped token does: max |logit difference| per position",
) -> go.Figure:
    """Max |logit difference| between two runs that differ in one selected token, per position (log axis).

    Args:
        logit_diff: [N] max over the vocabulary of |logits_a - logits_b| at each position.
        partition: the scored partition the flipped token belongs to; queries from partition + 2 on can see it.
        tolerance: the float-error tolerance of the forced comparison (drawn as a horizontal line).
    Returns:
        go.Figure: trace 0 = the differences (exact zeros drawn at 1e-9); shapes mark the first position that sees
        the flip (``S + (partition + 2) L``) and the tolerance.
    """
    if logit_diff.ndim != 1 or logit_diff.numel() == 0:
        raise ValueError(f"logit_diff must be a non-empty [N] tensor, got shape {tuple(logit_diff.shape)}")
    first = config.sink_size + (partition + 2) * config.lag_size
    fig = go.Figure(go.Scatter(x=list(range(logit_diff.numel())), y=logit_diff.float().clamp_min(1e-9).tolist(),
                               mode="lines", name="max |Δ logit|",
                               hovertemplate="position %{x}: max |Δ logit| = %{y:.2e}<extra></extra>"))
    fig.add_vline(x=first - 0.5, line=dict(color="#d62728", dash="dash"),
                  annotation_text=f"first query that can see the flip ({first})", annotation_position="top left")
    if tolerance is not None:
        fig.add_hline(y=tolerance, line=dict(color="grey", dash="dot"))
        fig.add_annotation(x=1, xref="paper", xanchor="right", y=math.log10(tolerance), yref="y", yanchor="bottom",
                           text=f"forced-run tolerance {tolerance:.0e}", showarrow=False, font=dict(color="grey"))
    fig.update_layout(title=title, height=400, xaxis_title="position (token)",
                      yaxis=dict(title="max |Δ logit| over the vocabulary<br>(log scale; exact 0 drawn at 1e-9)",
                                 type="log", exponentformat="power"))
    return fig
