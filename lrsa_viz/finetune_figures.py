"""Plotly figures of the fine-tuning experiment: accuracy against KV compression, loss curves, accuracy by depth.

Every function takes what `lrsa_viz.evaluate` writes (the results dict, or its rows / curves) and returns a
``plotly.graph_objects.Figure``. Only this module imports plotly: training and evaluation do not need it.
"""
from __future__ import annotations

from typing import Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .evaluate import contains_answer, exact_match, token_f1

METRICS = {"exact_match": "exact match", "f1": "token F1", "contains": "answer contained"}
MODEL_COLOURS = {"base": "#7f7f7f", "full": "#1f77b4", "lrsa": "#d62728"}
SETTING_ORDER = ("lagkv/chunked", "lagkv/one_shot", "streaming/chunked", "random/chunked",
                 "streaming/one_shot", "random/one_shot")
SETTING_TITLES = {
    "lagkv/chunked": "LagKV, chunk-by-chunk (the LRSA pattern)",
    "lagkv/one_shot": "LagKV, one-shot on the document",
    "streaming/chunked": "StreamingLLM (sink + recent), chunked",
    "random/chunked": "random selection, chunked",
    "streaming/one_shot": "StreamingLLM, one-shot",
    "random/one_shot": "random selection, one-shot",
}


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")


def _colour(model: str, i: int) -> str:
    return MODEL_COLOURS.get(model, ("#2ca02c", "#9467bd", "#8c564b", "#e377c2")[i % 4])


def accuracy_vs_ratio_figure(rows: Sequence[dict], metric: str = "exact_match") -> go.Figure:
    """One panel per compressed setting; x = compression (full KV, then 1/r), y = ``metric``; one line per model.

    Every line starts at the model's full-KV score, so each panel reads as "how much is lost as the cache shrinks".
    Args:
        rows: result rows (`lrsa_viz.evaluate`): model, setting, ratio and the metric.
    """
    check_metric(metric)
    if not rows:
        raise ValueError("rows: no results to plot")
    settings = [s for s in SETTING_ORDER if any(r["setting"] == s for r in rows)]
    models = list(dict.fromkeys(r["model"] for r in rows))
    ratios = sorted({r["ratio"] for r in rows if r["setting"] != "full"}, reverse=True)
    ticks = ["full KV"] + [f"{1 / r:g}x (r={r:g})" for r in ratios]
    cols = 2 if len(settings) > 1 else 1
    n_rows = (len(settings) + cols - 1) // cols
    fig = make_subplots(rows=n_rows, cols=cols, subplot_titles=[SETTING_TITLES.get(s, s) for s in settings],
                        shared_yaxes=True, vertical_spacing=0.16)
    for k, setting in enumerate(settings):
        row, col = k // cols + 1, k % cols + 1
        for i, model in enumerate(models):
            full = [r for r in rows if r["model"] == model and r["setting"] == "full"]
            points = sorted((r for r in rows if r["model"] == model and r["setting"] == setting),
                            key=lambda r: -r["ratio"])
            xs = (["full KV"] if full else []) + [ticks[1 + ratios.index(r["ratio"])] for r in points]
            ys = ([full[0][metric]] if full else []) + [r[metric] for r in points]
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=model, legendgroup=model,
                                     showlegend=k == 0, line=dict(color=_colour(model, i), width=2.5),
                                     hovertemplate=f"{model}<br>%{{x}}<br>{METRICS[metric]} %{{y:.3f}}<extra></extra>"),
                          row=row, col=col)
        fig.update_xaxes(categoryorder="array", categoryarray=ticks, row=row, col=col)
        fig.update_yaxes(range=[-0.03, 1.03], row=row, col=col)
    fig.update_yaxes(title_text=METRICS[metric], col=1)
    fig.update_layout(title=f"{METRICS[metric]} against KV-cache compression (held-out test split)",
                      height=330 * n_rows + 80, legend_title_text="model", template="plotly_white")
    return fig


def loss_curves_figure(curves: Sequence[dict]) -> go.Figure:
    """Training loss (answer tokens, log scale) per run against step, with the dev loss where it was measured.

    Args:
        curves: rows with run, step, train_loss and optionally dev_loss (`results["curves"]`).
    """
    if not curves:
        raise ValueError("curves: no training curves to plot")
    fig = go.Figure()
    runs = list(dict.fromkeys(c["run"] for c in curves))
    for i, run in enumerate(runs):
        mine = [c for c in curves if c["run"] == run]
        colour = _colour(run, i)
        fig.add_trace(go.Scatter(x=[c["step"] for c in mine], y=[max(c["train_loss"], 1e-6) for c in mine],
                                 mode="lines", name=f"{run}: train", line=dict(color=colour, width=1.5)))
        dev = [c for c in mine if c.get("dev_loss") is not None]
        if dev:
            fig.add_trace(go.Scatter(x=[c["step"] for c in dev], y=[max(c["dev_loss"], 1e-6) for c in dev],
                                     mode="markers+lines", name=f"{run}: dev",
                                     line=dict(color=colour, dash="dot"), marker=dict(size=8, symbol="diamond")))
    fig.update_yaxes(type="log", title_text="cross-entropy per answer token")
    fig.update_xaxes(title_text="optimiser step")
    fig.update_layout(title="Fine-tuning loss (answer tokens only)", template="plotly_white", height=420)
    return fig


def accuracy_by_depth_figure(rows: Sequence[dict], examples: Sequence[dict], setting: str, ratio: float,
                             metric: str = "exact_match", bins: int = 5) -> go.Figure:
    """Score against where the asked fact sits in the document (its ``depth``), for one setting and ratio.

    Args:
        rows: result rows WITH ``predictions`` (aligned with ``examples``).
        examples: the evaluated examples, each with ``answer`` and ``depth`` (the generator's field).
        setting, ratio: which cache setting to show (``"full"`` takes ratio 1.0).
        bins: equal-width depth bins over [0, 1).
    """
    check_metric(metric)
    if isinstance(bins, bool) or not isinstance(bins, int) or not 1 <= bins <= 50:
        raise ValueError(f"bins must be an integer in [1, 50], got {bins!r}")
    if any("depth" not in ex for ex in examples):
        raise ValueError("examples: every example needs a 'depth' field (made by lrsa_viz.qa_data)")
    score = {"exact_match": exact_match, "f1": token_f1, "contains": contains_answer}[metric]
    chosen = [r for r in rows if r["setting"] == setting and abs(r["ratio"] - ratio) < 1e-9]
    if not chosen:
        raise ValueError(f"setting/ratio: no rows for {setting!r} at ratio {ratio}")
    labels = [f"{b / bins:.1f}-{(b + 1) / bins:.1f}" for b in range(bins)]
    fig = go.Figure()
    for i, r in enumerate(chosen):
        if len(r["predictions"]) != len(examples):
            raise ValueError(f"rows: {len(r['predictions'])} predictions for {len(examples)} examples")
        sums, counts = [0.0] * bins, [0] * bins
        for pred, ex in zip(r["predictions"], examples):
            b = min(int(ex["depth"] * bins), bins - 1)
            sums[b] += score(pred, ex["answer"])
            counts[b] += 1
        ys = [s / c if c else None for s, c in zip(sums, counts)]
        fig.add_trace(go.Bar(x=labels, y=ys, name=r["model"], marker_color=_colour(r["model"], i),
                             customdata=counts, hovertemplate="%{x}: %{y:.2f} (%{customdata} examples)<extra></extra>"))
    title = setting if setting == "full" else f"{setting}, r={ratio:g}"
    fig.update_layout(title=f"{METRICS[metric]} by depth of the asked fact ({title})", barmode="group",
                      template="plotly_white", height=400, xaxis_title="depth in the document (0 = start)",
                      yaxis=dict(title=METRICS[metric], range=[0, 1.05]))
    return fig
