"""The compression curve: tokens kept and KV bytes against sequence length, METHOD eq. 12 and a real LagKVCache.

Theory: ``LagConfig.retained_length(n)`` tokens per layer and KV head, times the bytes of one token's K and V.
Measured: what a real recursive `LagKVCache` stores (``stored_lengths()``, ``nbytes()``) while a sequence is fed
into it chunk by chunk — either real model K/V already captured (`measure_cache_growth`, no model run) or a real
model run (`measure_model_cache_growth`).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ..checks import check_int
from ..cache import LagKVCache
from ..config import LagConfig
from ..policies import Policy
from ..prefill import prefill_chunks

MIB = 2 ** 20


@dataclasses.dataclass
class CacheGrowth:
    """What a LagKVCache held after each step of feeding a sequence into it.

    Attributes:
        seen: tokens fed so far, after each step.
        stored: tokens stored per layer and KV head after each step (the largest over layers; all are equal).
        nbytes: bytes of all stored keys and values after each step (`LagKVCache.nbytes`).
        bytes_per_token: bytes of one token's K and V over all layers and KV heads.
    """

    config: LagConfig
    policy: str
    seen: list[int]
    stored: list[int]
    nbytes: list[int]
    bytes_per_token: int

    def theory(self) -> list[int]:
        """METHOD eq. 12 at each measured point: ``config.retained_length(seen)``."""
        return [self.config.retained_length(n) for n in self.seen]

    def kept_fraction(self) -> list[float]:
        """Stored / seen after each step: the share of a dense cache this cache really holds."""
        return [s / n for s, n in zip(self.stored, self.seen)]


def kv_bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes that one token's keys and values occupy in a KV cache: 2 * layers * H_kv * d * element size."""
    return 2 * n_layers * n_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()


def _steps(n: int, config: LagConfig, step: int | None) -> list[tuple[int, int]]:
    if step is None:
        return prefill_chunks(n, config)
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be an integer >= 1 or None (the prefill chunks), got {step!r}")
    return [(a, min(a + step, n)) for a in range(0, n, step)]


@torch.no_grad()
def measure_cache_growth(
    keys: torch.Tensor,
    values: torch.Tensor,
    config: LagConfig,
    *,
    policy: str | Policy | None = None,
    step: int | None = None,
    dtype: torch.dtype | None = None,
) -> CacheGrowth:
    """Feed captured K/V [n_layers, H_kv, N, d] into a real recursive `LagKVCache`, step by step, and record it.

    Args:
        step: tokens per step (default: the chunks of `prefill_chunks`: S + 2L, then L at a time).
        dtype: store the states in this dtype (default: as given), to measure the bytes of e.g. a bf16 model.
    Note: with captured K/V each layer's states are what the capturing forward computed; the stored LENGTHS do not
    depend on it, and which tokens are kept is that of recursive LagKV on those states.
    """
    if keys.ndim != 4 or keys.shape != values.shape:
        raise ValueError(f"keys and values must be [n_layers, H_kv, N, d] of one shape, got {tuple(keys.shape)}, "
                         f"{tuple(values.shape)}")
    dtype = dtype or keys.dtype
    n_layers, n_heads, n, d = keys.shape
    cache = LagKVCache(config, mode="recursive", policy=policy)
    seen, stored, nbytes = [], [], []
    for a, b in _steps(n, config, step):
        for layer in range(n_layers):
            cache.update(keys[layer, None, :, a:b].to(dtype), values[layer, None, :, a:b].to(dtype), layer)
        seen.append(b)
        stored.append(max(cache.stored_lengths()))
        nbytes.append(cache.nbytes())
    return CacheGrowth(config, cache.policy.name, seen, stored, nbytes, kv_bytes_per_token(n_layers, n_heads, d, dtype))


@torch.no_grad()
def measure_model_cache_growth(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    config: LagConfig,
    *,
    policy: str | Policy | None = None,
    progress: bool = False,
) -> CacheGrowth:
    """Run ``model`` over ``input_ids`` [1, N] chunk by chunk (as `chunked_prefill`) through a `LagKVCache`, recording
    the stored length and bytes after each chunk."""
    if input_ids.ndim != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [1, N] with N >= 1, got shape {tuple(input_ids.shape)}")
    cache = LagKVCache(config, mode="recursive", policy=policy)
    seen, stored, nbytes = [], [], []
    for a, b in tqdm(prefill_chunks(input_ids.shape[1], config), desc="chunked prefill", disable=not progress):
        model(input_ids=input_ids[:, a:b], past_key_values=cache, use_cache=True)
        seen.append(b)
        stored.append(max(cache.stored_lengths()))
        nbytes.append(cache.nbytes())
    mc = model.config
    head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
    per_token = kv_bytes_per_token(mc.num_hidden_layers, mc.num_key_value_heads, head_dim, next(model.parameters()).dtype)
    return CacheGrowth(config, cache.policy.name, seen, stored, nbytes, per_token)


def _label(config: LagConfig) -> str:
    return f"S={config.sink_size}, L={config.lag_size}, r={config.ratio:g}"


def compression_curve_figure(
    configs: Sequence[LagConfig],
    max_length: int,
    bytes_per_token: int,
    measured: Sequence[CacheGrowth] = (),
    *,
    max_points: int = 4096,
    title: str = "KV cache size against sequence length",
) -> go.Figure:
    """Tokens stored (left) and KV MiB (right) against tokens seen: dense, eq. 12 for each config, and measurements.

    Args:
        configs: the (S, L, r) to draw the theory of (lines).
        max_length: longest sequence on the x axis (>= 1).
        bytes_per_token: `kv_bytes_per_token` of the model.
        measured: `CacheGrowth` records, drawn as markers on the same axes.
        max_points: the theory is evaluated at every length up to this many points (sampled evenly beyond).
    Returns:
        go.Figure: traces are, per config, (tokens theory, MiB theory); then dense (tokens, MiB); then, per
        measurement, (tokens measured, MiB measured). Trace ``meta`` says which: {"kind", "config", "axis"}.
    """
    check_int("max_length", max_length, 1)
    if bytes_per_token < 1:
        raise ValueError(f"bytes_per_token must be >= 1, got {bytes_per_token}")
    stride = max(1, -(-max_length // max_points))
    lengths = list(range(0, max_length + 1, stride))
    if lengths[-1] != max_length:
        lengths.append(max_length)
    fig = make_subplots(rows=1, cols=2, subplot_titles=("tokens stored per layer and KV head", "KV cache (MiB)"),
                        horizontal_spacing=0.1)
    palette = ["#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
    for i, cfg in enumerate(configs):
        kept = [cfg.retained_length(n) for n in lengths]
        colour = palette[i % len(palette)]
        for col, ys in ((1, kept), (2, [k * bytes_per_token / MIB for k in kept])):
            fig.add_trace(go.Scatter(x=lengths, y=ys, mode="lines", name=f"eq. 12: {_label(cfg)}", legendgroup=_label(cfg),
                                     showlegend=col == 1, line=dict(color=colour),
                                     meta={"kind": "theory", "config": cfg.to_dict(), "axis": "tokens" if col == 1 else "MiB"}),
                          row=1, col=col)
    for col, ys in ((1, lengths), (2, [n * bytes_per_token / MIB for n in lengths])):
        fig.add_trace(go.Scatter(x=lengths, y=ys, mode="lines", name="dense (no compression)", legendgroup="dense",
                                 showlegend=col == 1, line=dict(color="grey", dash="dash"),
                                 meta={"kind": "dense", "config": None, "axis": "tokens" if col == 1 else "MiB"}), row=1, col=col)
    for i, g in enumerate(measured):
        colour = palette[[c for c in configs].index(g.config) % len(palette)] if g.config in configs else "black"
        name = f"measured LagKVCache ({g.policy}): {_label(g.config)}"
        for col, ys in ((1, g.stored), (2, [b / MIB for b in g.nbytes])):
            fig.add_trace(go.Scatter(x=g.seen, y=ys, mode="markers", name=name, legendgroup=name, showlegend=col == 1,
                                     marker=dict(color=colour, symbol="circle-open", size=7),
                                     meta={"kind": "measured", "config": g.config.to_dict(), "axis": "tokens" if col == 1 else "MiB"}),
                          row=1, col=col)
    fig.update_xaxes(title_text="tokens seen")
    fig.update_yaxes(title_text="tokens", row=1, col=1)
    fig.update_yaxes(title_text="MiB", row=1, col=2)
    fig.update_layout(title=title, height=450, legend=dict(orientation="h", y=-0.25))
    return fig


def kept_fraction_figure(
    configs: Sequence[LagConfig],
    max_length: int,
    measured: Sequence[CacheGrowth] = (),
    *,
    mark_lengths: Sequence[int] = (),
    title: str = "The share of a dense cache that LagKV really keeps approaches r only for long inputs",
) -> go.Figure:
    """Kept fraction (tokens stored / tokens seen, = bytes against a dense cache) against tokens seen.

    Eq. 12 over n: ``(S + int(r L)(P - 1) + L + rem) / n``. The sink, the last full partition (no reference yet)
    and the remainder are kept whole, so below a few thousand tokens the fraction sits far above r; it tends to
    ``int(r L) / L`` as n grows.
    Args:
        configs: the (S, L, r) to draw (one line each, with a dotted line at ``int(r L) / L``).
        max_length: longest n on the x axis (>= 1).
        measured: `CacheGrowth` records drawn as markers (``stored / seen``).
        mark_lengths: prompt lengths to mark with vertical lines (e.g. the prompts of a notebook).
    Returns:
        go.Figure: per config a theory line (``meta = {"kind": "theory", ...}``) and its limit (``"limit"``), then the
        measurements (``"measured"``); y in % of the dense cache.
    """
    check_int("max_length", max_length, 1)
    stride = max(1, max_length // 2000)
    lengths = list(range(1, max_length + 1, stride))
    if lengths[-1] != max_length:
        lengths.append(max_length)
    palette = ["#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
    fig = go.Figure()
    for i, cfg in enumerate(configs):
        colour = palette[i % len(palette)]
        frac = [100 * cfg.retained_length(n) / n for n in lengths]
        fig.add_trace(go.Scatter(x=lengths, y=frac, mode="lines", name=f"eq. 12 / n: {_label(cfg)}", legendgroup=_label(cfg),
                                 line=dict(color=colour), meta={"kind": "theory", "config": cfg.to_dict()},
                                 hovertemplate="n=%{x}: keeps %{y:.1f}%<extra></extra>"))
        limit = 100 * cfg.top_k / cfg.lag_size
        fig.add_trace(go.Scatter(x=[lengths[0], lengths[-1]], y=[limit, limit], mode="lines", legendgroup=_label(cfg),
                                 name=f"limit int(rL)/L = {limit:.1f}%", line=dict(color=colour, dash="dot"),
                                 meta={"kind": "limit", "config": cfg.to_dict()}, hoverinfo="skip"))
    named = set()
    for g in measured:
        colour = palette[list(configs).index(g.config) % len(palette)] if g.config in configs else "black"
        name = f"measured ({g.policy}): {_label(g.config)}"
        fig.add_trace(go.Scatter(x=g.seen, y=[100 * f for f in g.kept_fraction()], mode="markers",
                                 name=name, legendgroup=_label(g.config), showlegend=name not in named,
                                 marker=dict(color=colour, symbol="circle-open", size=8),
                                 meta={"kind": "measured", "config": g.config.to_dict()},
                                 hovertemplate="n=%{x}: the cache holds %{y:.1f}%<extra>measured</extra>"))
        named.add(name)
    for i, n in enumerate(sorted(set(mark_lengths))):
        fig.add_vline(x=n, line=dict(color="grey", dash="dash", width=1))
        fig.add_annotation(x=n, y=100, yref="y", text=f"{n} tokens", showarrow=False, yshift=10 + 14 * (i % 3),
                           font=dict(size=10, color="grey"))
    fig.update_layout(title=title, height=450, xaxis_title="tokens seen n",
                      yaxis=dict(title="kept fraction: % of a dense cache's tokens (= bytes)", range=[0, 105]),
                      legend=dict(orientation="h", y=-0.25))
    return fig
