"""Plotly figures of the fine-tuning experiments: accuracy against the MEASURED kept fraction of the KV cache,
loss curves, accuracy by depth, kinds of wrong answers, and the task suite's per-task figures with error bars.

Every function takes what `lrsa_viz.evaluate` / `lrsa_viz.tasks.suite` write (rows, summaries, curves,
predictions) and returns a ``plotly.graph_objects.Figure`` (or plain numbers for the error analysis). Only this
module imports plotly: training and evaluation do not need it.

The x axis of every accuracy figure is ``kv_fraction``, the share of the prompt's tokens the cache actually holds
once the prompt is read (sink, the last partition and the remainder are kept whole, so it is above the nominal
ratio r: at 2k tokens, r = 0.5 / 0.25 / 0.125 keep 54% / 31% / 20%, i.e. 1.8x / 3.2x / 5x compression).
"""
from __future__ import annotations

import re
import statistics
from collections import Counter
from typing import Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .checks import check_int
from .evaluate import contains_answer, exact_match, token_f1

METRICS = {"exact_match": "exact match", "f1": "token F1", "contains": "answer contained", "score": "task score"}
MODEL_COLOURS = {"base": "#7f7f7f", "full": "#1f77b4", "lrsa": "#d62728"}
MODEL_NAMES = {"base": "base model", "full": "full-attention fine-tune", "lrsa": "LRSA fine-tune"}
SETTING_ORDER = ("lagkv/chunked", "lagkv/one_shot", "streaming/chunked", "random/chunked", "snapkv/chunked",
                 "streaming/one_shot", "random/one_shot", "snapkv/one_shot")
SETTING_TITLES = {
    "lagkv/chunked": "LagKV, chunk-by-chunk (the LRSA pattern)",
    "lagkv/one_shot": "LagKV, one-shot on the document",
    "streaming/chunked": "StreamingLLM (sink + recent), chunked",
    "random/chunked": "random selection, chunked",
    "snapkv/chunked": "SnapKV (newest queries' attention), chunked",
    "streaming/one_shot": "StreamingLLM, one-shot",
    "random/one_shot": "random selection, one-shot",
    "snapkv/one_shot": "SnapKV, one-shot",
}
SETTING_DASH = {"lagkv/chunked": "solid", "lagkv/one_shot": "dash", "streaming/chunked": "dot",
                "random/chunked": "dot", "snapkv/chunked": "dashdot", "streaming/one_shot": "dot",
                "random/one_shot": "dot", "snapkv/one_shot": "dashdot"}
SETTING_SYMBOL = {"lagkv/chunked": "circle", "lagkv/one_shot": "diamond", "streaming/chunked": "triangle-right",
                  "random/chunked": "x", "snapkv/chunked": "star", "streaming/one_shot": "triangle-right-open",
                  "random/one_shot": "x-open", "snapkv/one_shot": "star-open"}
KV_AXIS = "KV cache kept (measured share of the prompt's tokens)"


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")


def _colour(model: str, i: int) -> str:
    return MODEL_COLOURS.get(model, ("#2ca02c", "#9467bd", "#8c564b", "#e377c2")[i % 4])


def compression_label(kv_fraction: float) -> str:
    """'54% kept (1.8x)': the measured kept share and the compression factor it means."""
    if not 0 < kv_fraction <= 1:
        raise ValueError(f"kv_fraction must be in (0, 1], got {kv_fraction!r}")
    return f"{100 * kv_fraction:.0f}% kept ({1 / kv_fraction:.1f}x)"


def accuracy_vs_ratio_figure(rows: Sequence[dict], metric: str = "exact_match") -> go.Figure:
    """One panel per compressed setting; x = MEASURED kept fraction of the cache (full KV at 1), y = ``metric``.

    Every line starts at the model's full-KV score, so each panel reads as "how much is lost as the cache
    shrinks". The hover gives the nominal ratio r and the real compression factor 1 / kv_fraction.
    Args:
        rows: result rows (`lrsa_viz.evaluate`): model, setting, ratio, kv_fraction and the metric.
    """
    check_metric(metric)
    if not rows:
        raise ValueError("rows: no results to plot")
    settings = [s for s in SETTING_ORDER if any(r["setting"] == s for r in rows)]
    models = list(dict.fromkeys(r["model"] for r in rows))
    cols = 2 if len(settings) > 1 else 1
    n_rows = (len(settings) + cols - 1) // cols
    fig = make_subplots(rows=n_rows, cols=cols, subplot_titles=[SETTING_TITLES.get(s, s) for s in settings],
                        shared_yaxes=True, vertical_spacing=0.16)
    for k, setting in enumerate(settings):
        row, col = k // cols + 1, k % cols + 1
        for i, model in enumerate(models):
            full = [r for r in rows if r["model"] == model and r["setting"] == "full"]
            points = full + sorted((r for r in rows if r["model"] == model and r["setting"] == setting),
                                   key=lambda r: -r["ratio"])
            fig.add_trace(go.Scatter(
                x=[r["kv_fraction"] for r in points], y=[r[metric] for r in points], mode="lines+markers",
                name=MODEL_NAMES.get(model, model), legendgroup=model, showlegend=k == 0,
                line=dict(color=_colour(model, i), width=2.5),
                customdata=[("full KV" if r["setting"] == "full" else f"r={r['ratio']:g}", compression_label(r["kv_fraction"]))
                            for r in points],
                hovertemplate=f"{model}<br>%{{customdata[0]}}, %{{customdata[1]}}<br>{METRICS[metric]} %{{y:.3f}}<extra></extra>"),
                row=row, col=col)
        fig.update_xaxes(range=[1.05, 0], row=row, col=col, title_text=KV_AXIS if row == n_rows else None)
        fig.update_yaxes(range=[-0.03, 1.03], row=row, col=col)
    fig.update_yaxes(title_text=METRICS[metric], col=1)
    fig.update_layout(title=f"{METRICS[metric]} against the KV cache actually kept (held-out test split)",
                      height=340 * n_rows + 90, legend_title_text="model", template="plotly_white")
    return fig


def loss_curves_figure(curves: Sequence[dict]) -> go.Figure:
    """Training loss (answer tokens, log scale) per run against step, with the dev loss where it was measured.

    Args:
        curves: rows with run, step, train_loss and optionally dev_loss and seed (suite curves: one line per run
            and seed).
    """
    if not curves:
        raise ValueError("curves: no training curves to plot")
    fig = go.Figure()
    names = list(dict.fromkeys(c["run"] for c in curves))
    runs = sorted(dict.fromkeys((c["run"], c.get("seed")) for c in curves),
                  key=lambda rs: (names.index(rs[0]), -1 if rs[1] is None else rs[1]))
    for i, (run, seed) in enumerate(runs):
        mine = [c for c in curves if c["run"] == run and c.get("seed") == seed]
        colour = _colour(run, i)
        label = run if seed is None else f"{run} seed {seed}"
        first = seed is None or seed == min(s for r, s in runs if r == run)
        fig.add_trace(go.Scatter(x=[c["step"] for c in mine], y=[max(c["train_loss"], 1e-6) for c in mine],
                                 mode="lines", name=f"{label}: train", legendgroup=run,
                                 line=dict(color=colour, width=1.5), opacity=1.0 if first else 0.55))
        dev = [c for c in mine if c.get("dev_loss") is not None]
        if dev:
            fig.add_trace(go.Scatter(x=[c["step"] for c in dev], y=[max(c["dev_loss"], 1e-6) for c in dev],
                                     mode="markers+lines", name=f"{label}: dev", legendgroup=run,
                                     line=dict(color=colour, dash="dot"), marker=dict(size=8, symbol="diamond")))
    fig.update_yaxes(type="log", title_text="cross-entropy per answer token (nats, log scale)")
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
    if metric == "score":
        raise ValueError("metric must be exact_match, f1 or contains for the depth figure")
    check_int("bins", bins, 1, 50)
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
        fig.add_trace(go.Bar(x=labels, y=ys, name=MODEL_NAMES.get(r["model"], r["model"]),
                             marker_color=_colour(r["model"], i), customdata=counts,
                             hovertemplate="%{x}: %{y:.2f} (%{customdata} examples)<extra></extra>"))
    title = setting if setting == "full" else f"{setting}, r={ratio:g}"
    fig.update_layout(title=f"{METRICS[metric]} by depth of the asked fact ({title})", barmode="group",
                      template="plotly_white", height=400,
                      xaxis_title="depth of the asked fact in the document (0 = first token, 1 = last)",
                      yaxis=dict(title=METRICS[metric], range=[0, 1.05]), legend_title_text="model")
    return fig


# --------------------------------------------------------------------------------------------------------------
# What the wrong answers look like

ERROR_KINDS = ("correct", "near miss", "another planted value", "unplanted value", "repeated digits", "wrong length",
               "other")
ERROR_COLOURS = dict(zip(ERROR_KINDS, ("#2ca02c", "#ff7f0e", "#9467bd", "#e377c2", "#8c564b", "#1f77b4", "#7f7f7f")))


def error_kind(prediction: str, gold: str, others: Sequence[str] = ()) -> str:
    """What kind of answer ``prediction`` is, for a gold value like "4821" (one of ERROR_KINDS).

    In this order: "correct" (exact match); "near miss" (same length as the gold, one character different);
    "another planted value" (equals another value of the document, ``others``: the wrong fact was read);
    "repeated digits" (a run of one digit at least 4 long making up half the answer or more: "8888888888888888",
    "41111111", "40900000"); "unplanted value" (digits of the gold's length, found nowhere: a well-formed guess);
    "wrong length" (digits only, not the gold's length: "29000"); "other" (words, empty, anything else).
    """
    p, g = prediction.strip(), gold.strip()
    if exact_match(p, g):
        return "correct"
    if len(p) == len(g) and sum(a != b for a, b in zip(p, g)) == 1:
        return "near miss"
    if p in {o.strip() for o in others}:
        return "another planted value"
    runs = [len(m.group()) for m in re.finditer(r"(\d)\1*", p)]
    if runs and max(runs) >= 4 and max(runs) >= len(p) / 2:
        return "repeated digits"
    if p.isdigit() and g.isdigit():
        return "unplanted value" if len(p) == len(g) else "wrong length"
    return "other"


def error_breakdown(predictions: Sequence[str], golds: Sequence[str],
                    others: Sequence[Sequence[str]] | None = None) -> dict[str, int]:
    """{kind: count} over ERROR_KINDS (every kind present, zeros included)."""
    if len(predictions) != len(golds) or (others is not None and len(others) != len(golds)):
        raise ValueError(f"predictions, golds (and others) must have one entry per example, got {len(predictions)}, "
                         f"{len(golds)}" + (f", {len(others)}" if others is not None else ""))
    counts = Counter(error_kind(p, g, others[i] if others is not None else ())
                     for i, (p, g) in enumerate(zip(predictions, golds)))
    return {k: counts.get(k, 0) for k in ERROR_KINDS}


def error_breakdown_figure(breakdowns: dict[str, dict[str, int]], title: str = "What the answers are") -> go.Figure:
    """Stacked bars: one bar per label (e.g. "full FT, LagKV chunked r=0.125"), its answers by ERROR_KINDS."""
    if not breakdowns:
        raise ValueError("breakdowns: nothing to plot")
    labels = list(breakdowns)
    fig = go.Figure()
    for kind in ERROR_KINDS:
        fig.add_trace(go.Bar(y=labels, x=[breakdowns[l].get(kind, 0) for l in labels], name=kind, orientation="h",
                             marker_color=ERROR_COLOURS[kind],
                             hovertemplate=f"%{{y}}<br>{kind}: %{{x}}<extra></extra>"))
    fig.update_layout(barmode="stack", title=title, template="plotly_white", height=max(380, 140 + 38 * len(labels)),
                      xaxis_title="test examples", yaxis=dict(autorange="reversed"), legend_title_text="answer",
                      legend=dict(traceorder="normal"))
    return fig


# --------------------------------------------------------------------------------------------------------------
# The task suite


def suite_task_figure(summary: Sequence[dict], task: str,
                      settings: Sequence[str] = ("lagkv/chunked", "lagkv/one_shot"),
                      hidden: Sequence[str] = ("streaming/chunked", "random/chunked", "snapkv/chunked")) -> go.Figure:
    """One task of the suite: mean score over seeds against the measured kept fraction, with the standard
    deviation over seeds as error bars; one panel per context length, one colour per model, one line style per
    setting. Settings in ``hidden`` are drawn but start hidden (click their legend entries).

    Args:
        summary: `lrsa_viz.tasks.suite.summarise` rows (task, context_tokens, model, setting, ratio, mean, std,
            kv_fraction, n_seeds, n_per_seed, metric).
    """
    mine = [s for s in summary if s["task"] == task]
    if not mine:
        raise ValueError(f"task: no summary rows for {task!r}")
    contexts = sorted({s["context_tokens"] for s in mine})
    models = [m for m in ("base", "full", "lrsa") if any(s["model"] == m for s in mine)] + sorted(
        {s["model"] for s in mine} - {"base", "full", "lrsa"})
    metric = "exact match" if mine[0]["metric"] == "exact_match" else "set F1"
    seeds = max(s["n_seeds"] for s in mine)
    fig = make_subplots(rows=1, cols=len(contexts), shared_yaxes=True,
                        subplot_titles=[f"{c}-token documents" for c in contexts], horizontal_spacing=0.08)
    shown = set()
    for col, ctx in enumerate(contexts, start=1):
        for i, model in enumerate(models):
            full = [s for s in mine if s["context_tokens"] == ctx and s["model"] == model and s["setting"] == "full"]
            for setting in [*settings, *hidden]:
                pts = full + sorted((s for s in mine if s["context_tokens"] == ctx and s["model"] == model
                                     and s["setting"] == setting), key=lambda s: -s["ratio"])
                if len(pts) <= len(full):
                    continue
                name = f"{MODEL_NAMES.get(model, model)}, {SETTING_TITLES.get(setting, setting)}"
                fig.add_trace(go.Scatter(
                    x=[p["kv_fraction"] for p in pts], y=[p["mean"] for p in pts], mode="lines+markers", name=name,
                    legendgroup=name, showlegend=name not in shown, visible="legendonly" if setting in hidden else True,
                    error_y=dict(type="data", array=[p["std"] or 0.0 for p in pts], visible=True, thickness=1.2),
                    line=dict(color=_colour(model, i), dash=SETTING_DASH.get(setting, "solid"), width=2),
                    marker=dict(symbol=SETTING_SYMBOL.get(setting, "circle"), size=8),
                    customdata=[("full KV" if p["setting"] == "full" else f"r={p['ratio']:g}",
                                 compression_label(p["kv_fraction"]), p["std"] or 0.0, p["n_seeds"], p["n_per_seed"])
                                for p in pts],
                    hovertemplate=(f"{name}<br>%{{customdata[0]}}, %{{customdata[1]}}<br>{metric} %{{y:.3f}} "
                                   "± %{customdata[2]:.3f} (%{customdata[3]} seeds x %{customdata[4]} items)"
                                   "<extra></extra>")), row=1, col=col)
                shown.add(name)
        fig.update_xaxes(range=[1.05, 0], title_text="KV cache kept (measured share)", row=1, col=col)
    fig.update_yaxes(range=[-0.03, 1.05], title_text=f"{metric} (mean of {seeds} seeds, bars ± 1 std)", col=1)
    fig.update_layout(title=f"{task}: {metric} against the KV cache kept", template="plotly_white", height=620,
                      legend=dict(font=dict(size=10), orientation="h", yanchor="top", y=-0.18, x=0),
                      legend_title_text="model, cache setting (click to show or hide)")
    return fig


def score_kept(rows: Sequence[dict], setting: str = "lagkv/chunked",
               models: Sequence[str] = ("full", "lrsa")) -> list[dict]:
    """How much of each model's OWN full-cache score a compressed ``setting`` keeps (robustness, separated from how
    well the model learnt the task), per (task, context length, model, ratio).

    Args:
        rows: suite result rows (task, context_tokens, seed, model, setting, ratio, score, kv_fraction).
    Returns:
        dicts with task, context_tokens, model, ratio, ``kept`` = mean score under ``setting`` / mean full-cache score
        (means over the seeds present in both; None if that full-cache mean is 0), ``per_seed``: the same ratio
        seed by seed (None where a seed's full-cache score is 0), ``seeds`` and ``kv_fraction`` (mean measured share).
    """
    full = {(r["task"], r["context_tokens"], r["model"], r["seed"]): r["score"] for r in rows if r["setting"] == "full"}
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["setting"] == setting and r["model"] in models:
            groups.setdefault((r["task"], r["context_tokens"], r["model"], r["ratio"]), []).append(r)
    if not groups:
        raise ValueError(f"setting: no rows of {setting!r} for models {list(models)}")
    out = []
    for (task, ctx, model, ratio), mine in groups.items():
        pairs = sorted((r["seed"], r["score"], full[task, ctx, model, r["seed"]]) for r in mine
                       if (task, ctx, model, r["seed"]) in full)
        if not pairs:
            raise ValueError(f"rows: no full-cache row for {task} at {ctx} tokens, model {model}")
        full_mean = statistics.fmean(f for _, _, f in pairs)
        out.append(dict(task=task, context_tokens=ctx, model=model, ratio=ratio, seeds=[s for s, _, _ in pairs],
                        kept=statistics.fmean(x for _, x, _ in pairs) / full_mean if full_mean else None,
                        per_seed=[x / f if f else None for _, x, f in pairs],
                        kv_fraction=statistics.fmean(r["kv_fraction"] for r in mine)))
    return sorted(out, key=lambda d: (d["task"], d["context_tokens"], d["model"], -d["ratio"]))


def score_kept_figure(rows: Sequence[dict], setting: str = "lagkv/chunked",
                      models: Sequence[str] = ("full", "lrsa")) -> go.Figure:
    """`score_kept` drawn: one panel per task, the share of the model's own full-cache score (1 at the full cache)
    against the measured KV share; a colour per model, a line style per context length, each seed as a faint dot."""
    kept = score_kept(rows, setting, models)
    tasks = list(dict.fromkeys(d["task"] for d in kept))
    contexts = sorted({d["context_tokens"] for d in kept})
    dashes = dict(zip(contexts, ("solid", "dash", "dot", "dashdot")))
    fig = make_subplots(rows=1, cols=len(tasks), shared_yaxes=True, subplot_titles=tasks, horizontal_spacing=0.05)
    for col, task in enumerate(tasks, start=1):
        for i, model in enumerate(models):
            for ctx in contexts:
                pts = [d for d in kept if d["task"] == task and d["model"] == model and d["context_tokens"] == ctx
                       and d["kept"] is not None]
                if not pts:
                    continue
                name = f"{MODEL_NAMES.get(model, model)}, {ctx} tokens"
                colour = _colour(model, i)
                fig.add_trace(go.Scatter(
                    x=[1.0] + [d["kv_fraction"] for d in pts], y=[1.0] + [d["kept"] for d in pts],
                    mode="lines+markers", name=name, legendgroup=name, showlegend=col == 1,
                    line=dict(color=colour, dash=dashes[ctx], width=2),
                    customdata=[("full KV", 1.0)] + [(f"r={d['ratio']:g}", d["kv_fraction"]) for d in pts],
                    hovertemplate=f"{name}<br>%{{customdata[0]}}, %{{x:.2f}} of the cache kept<br>"
                                  "%{y:.2f} of its own full-cache score<extra></extra>"), row=1, col=col)
                seeds = [(d["kv_fraction"], v) for d in pts for v in d["per_seed"] if v is not None]
                fig.add_trace(go.Scatter(
                    x=[x for x, _ in seeds], y=[v for _, v in seeds], mode="markers", name=f"{name}, per seed",
                    legendgroup=name, showlegend=False, opacity=0.35, marker=dict(color=colour, size=6),
                    hovertemplate=f"{name}, one seed: %{{y:.2f}}<extra></extra>"), row=1, col=col)
        fig.update_xaxes(range=[1.05, 0], title_text="KV cache kept (measured)", row=1, col=col)
    fig.update_yaxes(rangemode="tozero", title_text="share of the model's own full-cache score", col=1)
    fig.update_layout(title=f"{SETTING_TITLES.get(setting, setting)}: how much of its own full-cache score each "
                            "fine-tune keeps (line: ratio of seed means; dots: each seed)",
                      template="plotly_white", height=480,
                      legend=dict(orientation="h", yanchor="top", y=-0.2, x=0))
    return fig


def prose_loss_figure(prose: Sequence[dict]) -> go.Figure:
    """Language-model loss on held-out prose (full cache) per model: mean over seeds, bars ± 1 std, seeds as dots."""
    if not prose:
        raise ValueError("prose: no prose losses to plot")
    models = [m for m in ("base", "full", "lrsa") if any(p["model"] == m for p in prose)]
    fig = go.Figure()
    for i, model in enumerate(models):
        losses = [p["loss"] for p in prose if p["model"] == model]
        std = statistics.stdev(losses) if len(losses) > 1 else 0.0
        fig.add_trace(go.Bar(x=[MODEL_NAMES.get(model, model)], y=[statistics.fmean(losses)], name=model,
                             marker_color=_colour(model, i), error_y=dict(type="data", array=[std]),
                             hovertemplate=f"{model}: %{{y:.4f}} nats/token ± {std:.4f}<extra></extra>"))
        fig.add_trace(go.Scatter(x=[MODEL_NAMES.get(model, model)] * len(losses), y=losses, mode="markers",
                                 marker=dict(color="black", size=6), showlegend=False,
                                 hovertemplate="one seed: %{y:.4f}<extra></extra>"))
    fig.update_layout(title="Loss on held-out prose with the full cache (Gettysburg, Declaration, Dickens)",
                      yaxis_title="cross-entropy per token (nats)", template="plotly_white", height=400,
                      showlegend=False)
    return fig
