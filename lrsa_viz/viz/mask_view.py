"""The LRSA mask drawn by region (sink, selected, lagging window, own partition), and dense vs LRSA attention.

Region of a (query q, key t) pair with t <= q, for q in partition k (METHOD §3):
sink (t < S) · selected (partition <= k - 2, kept by LagKV) · evicted (partition <= k - 2, not kept) ·
lagging window (partition k - 1) · own partition (partition k, causal). Keys t > q are "future".
"""
from __future__ import annotations

from typing import Sequence

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from ..config import LagConfig
from ..mask import partition_index
from .cells import MAX_CELLS, check_max_cells, hover_safe, pool_blocks, pool_factor

#: Region codes of `mask_regions`, in order; the visible ones are SINK, SELECTED, LAGGING and OWN.
FUTURE, EVICTED, SINK, SELECTED, LAGGING, OWN = range(6)
REGION_NAMES = ("future", "evicted", "sink", "selected", "lagging window", "own partition (causal)")
REGION_COLOURS = ("#ffffff", "#e6e6e6", "#d62728", "#1f77b4", "#2ca02c", "#ff7f0e")
VISIBLE_REGIONS = (SINK, SELECTED, LAGGING, OWN)


def mask_regions(
    kept: torch.Tensor,
    config: LagConfig,
    query_positions: torch.Tensor | None = None,
    key_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Region code of every (query, key) pair of one KV head.

    Args:
        kept: [N] bool one-shot keep mask of one layer and KV head (`keep_mask(...)[b, h]`).
        query_positions: [Q] (default all N); key_positions: [K] (default all N).
    Returns:
        [Q, K] int8 with codes FUTURE..OWN; ``isin(regions, VISIBLE_REGIONS)`` equals `visibility_from_keep`.
    """
    if not isinstance(kept, torch.Tensor) or kept.ndim != 1 or kept.dtype != torch.bool:
        raise ValueError("kept must be a bool tensor [N] (one layer and KV head)")
    n = kept.numel()
    keys = torch.arange(n) if key_positions is None else key_positions.cpu()
    queries = torch.arange(n) if query_positions is None else query_positions.cpu()
    pk = partition_index(keys, config)[None, :]
    pq = partition_index(queries, config)[:, None]
    regions = torch.full((queries.numel(), keys.numel()), EVICTED, dtype=torch.int8)
    regions[(pk <= pq - 2) & kept.cpu()[keys][None, :]] = SELECTED
    regions[(pk == pq - 1).expand_as(regions)] = LAGGING
    regions[(pk == pq).expand_as(regions)] = OWN
    regions[:, keys < config.sink_size] = SINK
    regions[keys[None, :] > queries[:, None]] = FUTURE
    return regions


def pooled_visibility(kept: torch.Tensor, config: LagConfig, start: int, stop: int, factor: int) -> torch.Tensor:
    """Fraction of visible (query, key) pairs in ``factor`` x ``factor`` blocks of the window [start, stop)^2.

    Counted from prefix sums of ``kept`` (a query in partition k sees, among keys <= q, the kept ones before the
    lagging window and all from partition k - 1 on), in O(W * W / factor) time and memory, never O(W^2).
    Returns:
        [ceil(W / factor), ceil(W / factor)] float32, W = stop - start.
    """
    queries = torch.arange(start, stop)
    lo = torch.arange(start, stop, factor)  # key block starts [B]
    hi_block = (lo + factor).clamp_max(stop)
    prefix = torch.cat([torch.zeros(1, dtype=torch.long), kept.cpu().long().cumsum(0)])  # kept in [0, t)
    part = partition_index(queries, config)
    lag_start = torch.where(part - 1 <= -1, 0, config.sink_size + (part - 1) * config.lag_size)  # [W]
    hi = torch.minimum(hi_block[None, :], queries[:, None] + 1)  # causal end of each block [W, B]
    low = lo[None, :].expand_as(hi)
    split = torch.maximum(torch.minimum(lag_start[:, None], hi), low)  # keys in [low, split) count if kept
    kept_part = prefix[split] - prefix[low]
    all_part = (hi - torch.maximum(low, lag_start[:, None])).clamp_min(0)
    counts = (kept_part + all_part).float()  # [W, B]
    widths = (hi_block - lo).float()
    rows = torch.stack([counts[a:a + factor].sum(0) for a in range(0, stop - start, factor)])  # [B, B]
    heights = torch.tensor([min(factor, stop - start - a) for a in range(0, stop - start, factor)], dtype=torch.float32)
    return rows / (heights[:, None] * widths[None, :])


def _discrete_colourscale(colours: Sequence[str]) -> list:
    n = len(colours)
    scale = []
    for i, c in enumerate(colours):
        scale += [[i / n, c], [(i + 1) / n, c]]
    return scale


def lrsa_mask_figure(
    kept: torch.Tensor,
    config: LagConfig,
    tokens: Sequence[str] | None = None,
    *,
    window: tuple[int, int] | None = None,
    max_cells: int = MAX_CELLS,
    title: str | None = None,
) -> go.Figure:
    """The LRSA mask of one layer and KV head, coloured by region.

    Args:
        kept: [N] bool one-shot keep mask of that layer and head.
        window: draw queries and keys in [start, stop) only (default: all N).
        max_cells: if the window has more cells, the mask is pooled in f x f blocks and each cell shows the
            fraction of visible pairs (regions are then not distinguished; the title says so).
    Returns:
        go.Figure with one heatmap: z = region codes (int) [Q, K], or fractions in [0, 1] when pooled.
    """
    n = kept.numel() if isinstance(kept, torch.Tensor) else 0
    start, stop = window or (0, n)
    if not 0 <= start < stop <= n:
        raise ValueError(f"window must be (start, stop) with 0 <= start < stop <= {n}, got {window}")
    check_max_cells(max_cells)
    size = stop - start
    factor = pool_factor(size, size, max_cells)
    axis = list(range(start, stop))
    if factor == 1:
        regions = mask_regions(kept, config, torch.arange(start, stop), torch.arange(start, stop))
        names = [[REGION_NAMES[c] for c in row] for row in regions.tolist()]
        tok = [hover_safe(tokens[t]) if tokens is not None else "" for t in axis]
        fig = go.Figure(go.Heatmap(
            z=regions.tolist(), x=axis, y=axis, text=names, customdata=[tok] * size, zmin=-0.5, zmax=len(REGION_NAMES) - 0.5,
            colorscale=_discrete_colourscale(REGION_COLOURS),
            colorbar=dict(tickvals=list(range(len(REGION_NAMES))), ticktext=list(REGION_NAMES), title="region"),
            hovertemplate="query %{y} → key %{x} '%{customdata}'<br>%{text}<extra></extra>",
        ))
        note = ""
    else:
        pooled = pooled_visibility(kept, config, start, stop, factor)
        centres = [start + factor * i + (min(factor, size - factor * i) - 1) / 2 for i in range(pooled.shape[0])]
        fig = go.Figure(go.Heatmap(
            z=pooled.tolist(), x=centres, y=centres, zmin=0, zmax=1, colorscale="Blues",
            colorbar=dict(title="fraction visible"),
            hovertemplate="queries ~%{y}, keys ~%{x}<br>visible %{z:.0%}<extra></extra>",
        ))
        note = f" — pooled {factor}x{factor}: fraction visible"
    c = config
    fig.update_layout(
        title=(title or f"LRSA mask (S={c.sink_size}, L={c.lag_size}, r={c.ratio:g})") + note,
        xaxis=dict(title="key position", constrain="domain"),
        yaxis=dict(title="query position", autorange="reversed", scaleanchor="x"), height=600,
    )
    return fig


def attention_probabilities(
    query: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor, scaling: float
) -> torch.Tensor:
    """softmax(q k^T * scaling) over the visible keys, in float32.

    Args:
        query: [Q, d] one query head; keys: [N, d] its KV head (post-RoPE); visible: [Q, N] bool.
    Returns:
        [Q, N] float32, each row sums to 1 over its visible keys, 0 elsewhere.
    """
    if query.ndim != 2 or keys.ndim != 2 or visible.shape != (query.shape[0], keys.shape[0]):
        raise ValueError(f"query [Q, d], keys [N, d], visible [Q, N] expected, got {tuple(query.shape)}, "
                         f"{tuple(keys.shape)}, {tuple(visible.shape)}")
    if not bool(visible.any(dim=-1).all()):
        raise ValueError("visible: every query must see at least one key")
    logits = (query.float() @ keys.float().T) * scaling
    return logits.masked_fill(~visible, float("-inf")).softmax(dim=-1)


def attention_comparison_figure(
    dense: torch.Tensor,
    sparse: torch.Tensor,
    *,
    window: tuple[int, int] | None = None,
    max_cells: int = MAX_CELLS,
    title: str = "Dense vs LRSA attention",
) -> go.Figure:
    """Two attention maps of one head side by side (queries x keys), on one colour scale.

    Args:
        dense, sparse: [N, N] attention probabilities (e.g. `attention_probabilities` with a causal and an LRSA mask).
        window: draw [start, stop) of both axes only; max_cells: cap per panel (block-mean pooling beyond).
    Returns:
        go.Figure with two heatmaps; colour = probability ** 0.5 so that small weights stay visible.
    """
    if dense.shape != sparse.shape or dense.ndim != 2:
        raise ValueError(f"dense and sparse must be [N, N] of one shape, got {tuple(dense.shape)}, {tuple(sparse.shape)}")
    n = dense.shape[-1]
    start, stop = window or (0, n)
    if not 0 <= start < stop <= n:
        raise ValueError(f"window must be (start, stop) with 0 <= start < stop <= {n}, got {window}")
    check_max_cells(max_cells)
    size = stop - start
    factor = pool_factor(size, size, max_cells)
    panels = [pool_blocks(m[start:stop, start:stop], factor).sqrt() for m in (dense, sparse)]
    axis = [start + factor * i + (min(factor, size - factor * i) - 1) / 2 for i in range(panels[0].shape[0])]
    zmax = float(max(p.max() for p in panels))
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, subplot_titles=("dense causal", "LRSA"), horizontal_spacing=0.04)
    for col, z in enumerate(panels, start=1):
        fig.add_trace(go.Heatmap(z=z.tolist(), x=axis, y=axis, zmin=0, zmax=zmax, colorscale="Magma", showscale=col == 2,
                                 colorbar=dict(title="√p"),
                                 hovertemplate="query %{y} → key %{x}<br>√p = %{z:.3f}<extra></extra>"), row=1, col=col)
        fig.update_xaxes(title_text="key position", row=1, col=col)
    fig.update_yaxes(title_text="query position", autorange="reversed", row=1, col=1)
    note = f" — pooled {factor}x{factor} (block mean)" if factor > 1 else ""
    fig.update_layout(title=title + note, height=520)
    return fig
