"""Plotly figures of LRSA's cost: the cost model (FLOPs, KV bytes, tiles) and measured benchmark curves."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..config import LagConfig
from .cost import SMOLLM2_135M, attention_flops, dense_causal_pairs, kv_cache_bytes, lrsa_tiles, lrsa_visible_pairs

#: SmolLM2-135M attention shapes and depth.
SMOLLM2_SHAPES = {k: SMOLLM2_135M[k] for k in ("heads_q", "heads_kv", "head_dim", "layers")}
#: Targets of the fast path (attention forward+backward speed-up over the fastest dense kernel, ratio 0.25).
TARGETS = {8192: 1.8, 32768: 3.0}


def log_log_panels(fig: go.Figure, x_title: str, y_titles: Sequence[str], title: str) -> go.Figure:
    """Style a 1 x len(y_titles) subplot figure: log axes, one x title, a y title per panel, the common size."""
    for col, y_title in enumerate(y_titles, start=1):
        fig.update_xaxes(type="log", title_text=x_title, row=1, col=col)
        fig.update_yaxes(type="log", title_text=y_title, row=1, col=col)
    return fig.update_layout(height=420, width=1000, title=title)


def cost_model_figure(seq_lens: Sequence[int], ratios: Sequence[float] = (0.25, 0.125), sink: int = 16,
                      lag: int = 128, shapes: dict | None = None) -> go.Figure:
    """Attention FLOPs per layer (forward+backward, batch 1) and KV-cache bytes (all layers, bf16) against N.

    Dense causal attention against LRSA for each ratio; FLOPs count only visible (query, key) pairs, and
    ``kernel tiles`` counts the 128 x 128 tiles the fast kernel computes (its real work, partial tiles included).
    """
    shapes = {**SMOLLM2_SHAPES, **(shapes or {})}
    hq, hkv, d, layers = shapes["heads_q"], shapes["heads_kv"], shapes["head_dim"], shapes["layers"]
    n = list(seq_lens)
    fig = make_subplots(rows=1, cols=2, subplot_titles=("attention FLOPs per layer (fwd+bwd)", "KV-cache bytes"))
    fig.add_trace(go.Scatter(x=n, y=[attention_flops(dense_causal_pairs(x), hq, d, True) for x in n],
                             name="dense causal", line=dict(color="black")), 1, 1)
    fig.add_trace(go.Scatter(x=n, y=[kv_cache_bytes(x, layers, hkv, d) for x in n], name="full cache",
                             line=dict(color="black"), showlegend=False), 1, 2)
    for ratio in ratios:
        cfg = LagConfig(sink, lag, ratio)
        fig.add_trace(go.Scatter(x=n, y=[attention_flops(lrsa_visible_pairs(x, cfg), hq, d, True) for x in n],
                                 name=f"LRSA r={ratio}: visible pairs"), 1, 1)
        tiles = [lrsa_tiles(x, cfg) for x in n]
        fig.add_trace(go.Scatter(x=n, y=[attention_flops((t["partial"] + t["full"]) * 128 * 128, hq, d, True)
                                         for t in tiles], name=f"LRSA r={ratio}: kernel tiles", line=dict(dash="dot")), 1, 1)
        fig.add_trace(go.Scatter(x=n, y=[kv_cache_bytes(x, layers, hkv, d, config=cfg) for x in n],
                                 name=f"LagKV cache r={ratio}"), 1, 2)
    return log_log_panels(fig, "tokens N", ["FLOPs", "bytes"], "Cost model: dense causal attention vs LRSA")


def kept_fraction_figure(seq_lens: Sequence[int], ratios: Sequence[float] = (0.25, 0.125), sink: int = 16,
                         lag: int = 128) -> go.Figure:
    """On LINEAR axes, against N: the fraction of the KV cache one-shot LagKV keeps (eq. 12 / N) and the fraction
    of dense causal (query, key) pairs the LRSA mask shows. Both only approach r as N grows (dashed lines at r):
    the sink, the lagging partition and the tail kept whole are a fixed cost that weighs most at short N.

    Returns:
        go.Figure with two subplots; per ratio the traces "r=…: KV cache kept", "r=…: attention pairs" and
        "limit r=…" (``meta`` of each data trace: {"ratio", "quantity"}).
    """
    n = sorted(int(x) for x in seq_lens)
    if not n or n[0] < 1:
        raise ValueError(f"seq_lens must be positive token counts, got {list(seq_lens)}")
    fig = make_subplots(rows=1, cols=2, subplot_titles=("KV cache kept by LagKV (eq. 12 / N)",
                                                        "attention pairs LRSA shows (of dense causal)"))
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    for i, ratio in enumerate(ratios):
        cfg = LagConfig(sink, lag, ratio)
        colour = palette[i % len(palette)]
        kept = [cfg.retained_length(x) / x for x in n]
        pairs = [lrsa_visible_pairs(x, cfg) / dense_causal_pairs(x) for x in n]
        fig.add_trace(go.Scatter(x=n, y=kept, name=f"r={ratio}: KV cache kept", line=dict(color=colour),
                                 meta={"ratio": ratio, "quantity": "kv_kept"},
                                 hovertemplate="N=%{x}: %{y:.3f} of the cache kept<extra></extra>"), 1, 1)
        fig.add_trace(go.Scatter(x=n, y=pairs, name=f"r={ratio}: attention pairs", line=dict(color=colour, dash="dot"),
                                 meta={"ratio": ratio, "quantity": "pairs"},
                                 hovertemplate="N=%{x}: %{y:.3f} of dense pairs<extra></extra>"), 1, 2)
        for col in (1, 2):
            fig.add_trace(go.Scatter(x=[n[0], n[-1]], y=[ratio, ratio], mode="lines", name=f"limit r={ratio}",
                                     line=dict(color=colour, dash="dash", width=1), showlegend=col == 1,
                                     legendgroup=f"limit{ratio}", hoverinfo="skip"), 1, col)
    for col in (1, 2):
        fig.update_xaxes(title_text="tokens N (linear)", row=1, col=col)
        fig.update_yaxes(range=[0, 1], tickformat=".0%", row=1, col=col)
    fig.update_yaxes(title_text="fraction of the full cache", row=1, col=1)
    fig.update_yaxes(title_text="fraction of the dense causal pairs", row=1, col=2)
    fig.update_layout(height=420, width=1000, title=f"What LRSA / LagKV keep, on linear axes (S={sink}, L={lag})")
    return fig


def bound_rate_tflops(result: dict) -> float:
    """The matmul rate (TFLOP/s) behind a benchmark's FLOP-count bounds: ``matmul_bf16_tflops`` where recorded,
    else FLOPs / ``dense_bound_s`` of its first attention row (same shapes as the run; SmolLM2's by default)."""
    if "matmul_bf16_tflops" in result:
        return float(result["matmul_bf16_tflops"])
    rows = result.get("attention") or []
    if not rows:
        raise ValueError("result has no attention rows to read the bound's matmul rate from")
    shapes = {**SMOLLM2_SHAPES, **result.get("shapes", {})}
    row = rows[0]
    flops = attention_flops(dense_causal_pairs(row["n"]), shapes["heads_q"], shapes["head_dim"]) * row["batch"]
    return flops / row["dense_bound_s"]["fwd"] / 1e12


def load_benchmark(path: str | Path) -> dict:
    """The JSON written by ``benchmarks/bench_lrsa.py``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"path: no benchmark file at {path}; run benchmarks/bench_lrsa.py on a CUDA GPU")
    return json.loads(path.read_text())


def attention_rows(result: dict) -> list[dict]:
    """The attention section of a benchmark as flat rows: n, batch, method, pass (fwd / fwd_bwd), seconds."""
    rows = []
    for row in result.get("attention", []):
        for name, t in row["dense"].items():
            if "error" not in t:
                rows += [{"n": row["n"], "batch": row["batch"], "method": name, "pass": p, "s": t[p]["median_s"]}
                         for p in ("fwd", "fwd_bwd")]
        for ratio, t in row["lrsa"].items():
            rows += [{"n": row["n"], "batch": row["batch"], "method": f"fast LRSA r={ratio}", "pass": p,
                      "s": t[p]["median_s"]} for p in ("fwd", "fwd_bwd")]
            rows += [{"n": row["n"], "batch": row["batch"], "method": f"bound LRSA r={ratio}", "pass": p,
                      "s": t["bound_s"][p]} for p in ("fwd", "fwd_bwd")]
        rows += [{"n": row["n"], "batch": row["batch"], "method": "bound dense", "pass": p, "s": row["dense_bound_s"][p]}
                 for p in ("fwd", "fwd_bwd")]
    return rows


def measured_attention_figure(result: dict, which: str = "fwd_bwd") -> go.Figure:
    """Measured time per token (median time / (batch * N)) against N for every method, and the FLOP-count bounds
    (dashed). ``which``: ``"fwd"`` or ``"fwd_bwd"``.

    A bound is the attention FLOP count (visible pairs x 2 d x matrix products, `attention_flops`) divided by the
    measured bf16 matmul rate (`bound_rate_tflops`): the time the work would take at matmul speed, which no
    attention kernel reaches. Its legend entry says so.
    """
    if which not in ("fwd", "fwd_bwd"):
        raise ValueError(f"which must be 'fwd' or 'fwd_bwd', got {which!r}")
    rows = [r for r in attention_rows(result) if r["pass"] == which]
    rate = bound_rate_tflops(result)
    fig = go.Figure()
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["n"], r["s"] / (r["batch"] * r["n"]) * 1e9) for r in rows if r["method"] == method)
        bound = method.startswith("bound")
        name = f"{method}: FLOPs ÷ {rate:.0f} TFLOP/s" if bound else f"{method} (measured)"
        fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], name=name, mode="lines+markers",
                                 line=dict(dash="dash" if bound else "solid"), meta={"method": method}))
    fig.update_xaxes(type="log", title_text="tokens N")
    fig.update_yaxes(type="log", title_text="ns per token (all heads)")
    fig.update_layout(height=480, width=980, title=dict(
        text=f"Attention {which.replace('_', '+')} on {result.get('gpu', '?')}, torch "
             f"{result.get('environment', {}).get('torch', '?')}<br><sup>dashed 'bound' = attention FLOPs ÷ measured "
             f"bf16 matmul rate ({rate:.0f} TFLOP/s): the time at matmul speed, a floor no kernel reaches</sup>"))
    return fig


def speedup_table(result: dict) -> list[dict]:
    """Speed-up of fast LRSA over the fastest dense kernel, per N, ratio and pass, with the target where one is set."""
    out = []
    for row in result.get("attention", []):
        for ratio, t in row["lrsa"].items():
            for p in ("fwd", "fwd_bwd"):
                target = TARGETS.get(row["n"]) if (p == "fwd_bwd" and float(ratio) == 0.25) else None
                out.append({"n": row["n"], "ratio": float(ratio), "pass": p,
                            "speedup": t["speedup_vs_fastest_dense"][p], "target": target})
    return out


def speedup_figure(result: dict) -> go.Figure:
    """Speed-up over the fastest dense kernel against N (forward and forward+backward), targets as stars."""
    table = speedup_table(result)
    fig = go.Figure()
    for ratio in sorted({r["ratio"] for r in table}, reverse=True):
        for p in ("fwd", "fwd_bwd"):
            pts = sorted((r["n"], r["speedup"]) for r in table if r["ratio"] == ratio and r["pass"] == p)
            fig.add_trace(go.Scatter(x=[a for a, _ in pts], y=[b for _, b in pts], mode="lines+markers",
                                     name=f"r={ratio} {p.replace('_', '+')}"))
    fig.add_trace(go.Scatter(x=list(TARGETS), y=list(TARGETS.values()), mode="markers", name="target (r=0.25, fwd+bwd)",
                             marker=dict(symbol="star", size=14, color="black")))
    fig.add_hline(y=1.0, line=dict(color="grey", dash="dot"))
    fig.update_xaxes(type="log", title_text="tokens N")
    fig.update_yaxes(title_text="fastest dense time / fast LRSA time")
    fig.update_layout(height=420, width=900, title="Fast LRSA speed-up over the fastest dense causal kernel")
    return fig
