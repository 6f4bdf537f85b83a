"""Plotly figures of compressed inference: what a decode step must read, how many sequences fit, and what the
inference benchmark (benchmarks/bench_inference.py) measured.

A decode step is memory-bound: it reads every weight once and every stored key/value of every sequence once.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..config import LagConfig
from .cost import H200_BANDWIDTH, SMOLLM2_135M, kv_cache_bytes
from .figures import log_log_panels
GIB = 2 ** 30


def llama_weight_bytes(shapes: dict = SMOLLM2_135M, bytes_per_value: int = 2) -> int:
    """Bytes of a Llama-family model's weights (tied embedding): what every decode step reads once."""
    h, d = shapes["hidden"], shapes["head_dim"]
    attention = h * shapes["heads_q"] * d * 2 + h * shapes["heads_kv"] * d * 2  # q, o; k, v
    per_layer = attention + 3 * h * shapes["intermediate"] + 2 * h
    return (shapes["vocab"] * h + shapes["layers"] * per_layer + h) * bytes_per_value


def decode_cost_figure(context_lens: Sequence[int], config: LagConfig | None = None, batch: int = 16,
                       bandwidth: float = H200_BANDWIDTH, budget_bytes: int = 100 * GIB, shapes: dict = SMOLLM2_135M) -> go.Figure:
    """Left: bytes one decode step reads (weights + the K/V of ``batch`` sequences, bf16) against context length,
    full cache vs LagKV (METHOD eq. 12), and the tokens/s that reading them at ``bandwidth`` allows. Right: how many
    sequences' caches fit in ``budget_bytes``."""
    cfg = config or LagConfig()
    n = list(context_lens)
    weights = llama_weight_bytes(shapes)
    kv = dict(layers=shapes["layers"], kv_heads=shapes["heads_kv"], head_dim=shapes["head_dim"])
    fig = make_subplots(rows=1, cols=2, subplot_titles=(f"bytes read per decode step (batch {batch})",
                                                        f"sequences whose KV cache fits in {budget_bytes / GIB:.0f} GiB"))
    for name, c, color in (("full cache", None, "black"), (f"LagKV r={cfg.ratio}", cfg, "crimson")):
        step = [weights + batch * kv_cache_bytes(x, config=c, **kv) for x in n]
        fig.add_trace(go.Scatter(x=n, y=step, name=name, line=dict(color=color),
                                 customdata=[batch * bandwidth / s for s in step],
                                 hovertemplate="%{y:.3s} B per step; bound %{customdata:.0f} tokens/s"), 1, 1)
        fig.add_trace(go.Scatter(x=n, y=[budget_bytes // kv_cache_bytes(x, config=c, **kv) for x in n], name=name,
                                 line=dict(color=color), showlegend=False), 1, 2)
    fig.add_trace(go.Scatter(x=n, y=[weights] * len(n), name="weights alone", line=dict(color="grey", dash="dot")), 1, 1)
    return log_log_panels(fig, "context length (tokens)", ["bytes per step", "sequences"],
                          "Why a smaller cache decodes faster and fits more sequences (model)")


def merge_inference_results(paths: Sequence) -> dict:
    """Several benchmarks/bench_inference.py JSON files of one GPU, torch version and decode setting (e.g. one case
    per run) as one result: their rows in file order, the first file's "fit", every file's command under
    "commands". Files that differ in GPU, torch version or decode setting (kernel, compression, steps) are refused:
    their numbers do not compare."""
    results = [json.loads(Path(p).read_text()) for p in paths]
    if not results:
        raise ValueError("paths: no benchmark files given")

    def setting(r: dict) -> tuple:
        return r["gpu"], r["environment"]["torch"], json.dumps(r["inference"]["decode"], sort_keys=True)

    for path, r in zip(paths, results):
        if setting(r) != setting(results[0]):
            raise ValueError(f"paths: {path} was measured with {setting(r)}, not {setting(results[0])} like {paths[0]}")
    inference = {**results[0]["inference"], "rows": [row for r in results for row in r["inference"]["rows"]]}
    return {**results[0], "inference": inference, "commands": [r["command"] for r in results]}


def inference_rows(result: dict) -> list[dict]:
    """The benchmark's measured rows, flat: prompt_len, batch, mode, tokens_per_s, bytes_per_sequence,
    bandwidth_fraction, host_syncs_per_step (modes that failed are left out)."""
    rows = result.get("inference", {})
    rows = rows.get("rows", []) if isinstance(rows, dict) else rows
    out = []
    for row in rows:
        for mode, m in row.items():
            if isinstance(m, dict) and "decode_tokens_per_s" in m and "error" not in m:
                out.append({"prompt_len": row["prompt_len"], "batch": row["batch"], "mode": mode,
                            "tokens_per_s": m["decode_tokens_per_s"], "bytes_per_sequence": m.get("kv_bytes_per_sequence"),
                            "bandwidth_fraction": m.get("bandwidth_fraction"),
                            "host_syncs_per_step": m.get("host_syncs_per_step")})
    return out


def measured_decode_figure(result: dict) -> go.Figure:
    """Measured decode tokens/s (left) and allocated KV bytes per sequence (right) against prompt length, one line
    per cache and batch size, from a benchmarks/bench_inference.py JSON."""
    rows = inference_rows(result)
    if not rows:
        raise ValueError("result: no measured inference rows (a benchmarks/bench_inference.py JSON is expected)")
    fig = make_subplots(rows=1, cols=2, subplot_titles=("decode throughput", "KV cache per sequence (allocated)"))
    for mode in dict.fromkeys(r["mode"] for r in rows):
        for batch in sorted({r["batch"] for r in rows if r["mode"] == mode}):
            pts = sorted((r["prompt_len"], r["tokens_per_s"], r["bytes_per_sequence"]) for r in rows
                         if r["mode"] == mode and r["batch"] == batch)
            fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers",
                                     name=f"{mode}, batch {batch}"), 1, 1)
        pts = sorted({(r["prompt_len"], r["bytes_per_sequence"]) for r in rows if r["mode"] == mode})
        fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers", name=mode,
                                 line=dict(dash="dot"), showlegend=False), 1, 2)
    return log_log_panels(fig, "prompt length (tokens)", ["generated tokens/s (all sequences)", "bytes per sequence"],
                          f"Decoding measured on {result.get('gpu', '?')}, torch "
                          f"{result.get('environment', {}).get('torch', '?')}")
