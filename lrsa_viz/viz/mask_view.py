"""The LRSA mask drawn by region (sink, selected, lagging window, own partition), and dense vs LRSA attention.

Region of a (query q, key t) pair with t <= q, for q in partition k (METHOD §3):
sink (t < S) · selected (partition <= k - 2, kept by LagKV) · evicted (partition <= k - 2, not kept) ·
lagging window (partition k - 1) · own partition (partition k, causal). Keys t > q are "future".

Also here: partition-indexed axes (`partition_ticks`, `add_partition_grid`), the prefill storyboard (what a real
recursive `LagKVCache` holds while each chunk is read, beside the mask rows of that chunk's queries:
`prefill_steps`, `prefill_storyboard_figure`) and the dense attention mass the mask hides (`hidden_attention_mass`,
`attention_by_region`, `attention_by_region_figure`). The LRSA mask is this project's reconstruction of LRSA (arXiv 2506.11498) from LagKV's
chunk-by-chunk prefill (arXiv 2504.04704, §4.3): docs/METHOD.md §3.
"""
from __future__ import annotations

from typing import Sequence

import dataclasses

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from ..cache import LagKVCache
from ..config import LagConfig
from ..mask import partition_index
from ..prefill import prefill_chunks
from .cells import MAX_CELLS, add_shapes, check_max_cells, hover_safe, pool_blocks, pool_factor

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


def partition_ticks(config: LagConfig, start: int, stop: int, max_labels: int = 16) -> tuple[list[float], list[str], list[int]]:
    """Axis ticks that name the partitions of the positions [start, stop).

    Returns:
        (tick positions: the centre of each partition's part inside the window, tick labels ``"sink<br>0"``,
        ``"p0<br>4"``, ``"p1<br>20"``, ... (partition name, then its first position), boundaries: every position in
        (start, stop) where a partition starts). With more than ``max_labels`` partitions only every m-th is labelled.
    """
    if not 0 <= start < stop:
        raise ValueError(f"start, stop must satisfy 0 <= start < stop, got {start}, {stop}")
    s, lag = config.sink_size, config.lag_size
    spans = [("sink", 0, s)] if s > 0 else []
    j = 0
    while s + j * lag < stop:
        spans.append((f"p{j}", s + j * lag, s + (j + 1) * lag))
        j += 1
    spans = [(name, a, b) for name, a, b in spans if b > start]
    step = max(1, -(-len(spans) // max_labels))
    vals, text = [], []
    for i, (name, a, b) in enumerate(spans):
        if i % step == 0:
            lo, hi = max(a, start), min(b, stop)
            vals.append((lo + hi - 1) / 2)
            text.append(f"{name}<br>{a}")
    bounds = [a for _, a, _ in spans if start < a < stop]
    return vals, text, bounds


def add_partition_grid(
    fig: go.Figure, config: LagConfig, start: int, stop: int, *, row: int | None = None, col: int | None = None,
    x: bool = True, y: bool = True, max_lines: int = 64,
) -> go.Figure:
    """Label the x (keys) and/or y (queries) axis of a heatmap over positions [start, stop) by partition, and draw
    a thin line at every partition boundary (up to ``max_lines`` per axis). Returns ``fig`` (changed in place)."""
    vals, text, bounds = partition_ticks(config, start, stop)
    where = {} if row is None else dict(row=row, col=col)
    sub = fig.get_subplot(row, col) if row is not None else None
    xref, yref = ("x", "y") if sub is None else (a.plotly_name.replace("axis", "") for a in (sub.xaxis, sub.yaxis))
    line = dict(color="rgba(0,0,0,0.35)", width=1)
    lines = []
    if x:
        fig.update_xaxes(tickvals=vals, ticktext=text, tickangle=0, **where)
        if len(bounds) <= max_lines:
            lines += [dict(type="line", x0=b - 0.5, x1=b - 0.5, xref=xref, y0=0, y1=1, yref=f"{yref} domain",
                           line=line) for b in bounds]
    if y:
        fig.update_yaxes(tickvals=vals, ticktext=text, **where)
        if len(bounds) <= max_lines:
            lines += [dict(type="line", y0=b - 0.5, y1=b - 0.5, yref=yref, x0=0, x1=1, xref=f"{xref} domain",
                           line=line) for b in bounds]
    add_shapes(fig, lines)  # in one assignment (fig.add_vline in a loop re-validates every earlier line)
    return fig


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
    partition_axes: bool = True,
) -> go.Figure:
    """The LRSA mask of one layer and KV head, coloured by region.

    Args:
        kept: [N] bool one-shot keep mask of that layer and head.
        window: draw queries and keys in [start, stop) only (default: all N).
        max_cells: if the window has more cells, the mask is pooled in f x f blocks and each cell shows the
            fraction of visible pairs (regions are then not distinguished; the title says so).
        partition_axes: label both axes by partition (index and positions) and draw the partition boundaries.
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
        xaxis=dict(title="key position (partition, its first position)" if partition_axes else "key position",
                   constrain="domain"),
        yaxis=dict(title="query position", autorange="reversed", scaleanchor="x"), height=700,
    )
    if partition_axes:
        add_partition_grid(fig, config, start, stop)
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
    config: LagConfig | None = None,
    mark_keys: Sequence[int] = (),
) -> go.Figure:
    """Two attention maps of one head side by side (queries x keys), on one colour scale.

    Args:
        dense, sparse: [N, N] attention probabilities (e.g. `attention_probabilities` with a causal and an LRSA mask).
        window: draw [start, stop) of both axes only; max_cells: cap per panel (block-mean pooling beyond).
        config: if given, the axes are labelled by partition and the partition boundaries drawn.
        mark_keys: key positions to outline in both panels (e.g. the dense map's bright column that LRSA hides).
    Returns:
        go.Figure with two heatmaps; colour = probability ** 0.5 so that small weights stay visible. Marked keys are
        layout shapes (``name = "marked key <t>"``) with an annotation, not traces.
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
    if config is not None:
        for col in (1, 2):
            add_partition_grid(fig, config, start, stop, row=1, col=col, y=col == 1)
        fig.update_xaxes(title_text="key position (partition)")
    for t in mark_keys:
        t = int(t)
        if not start <= t < stop:
            raise ValueError(f"mark_keys must be positions in the window [{start}, {stop}), got {t}")
        lo, hi = start + (t - start) // factor * factor - 0.5, start + ((t - start) // factor + 1) * factor - 0.5
        for col in (1, 2):
            fig.add_shape(type="rect", x0=lo, x1=hi, y0=max(t, start) - 0.5, y1=stop - 0.5, row=1, col=col,
                          line=dict(color="#17becf", width=2), name=f"marked key {t}")
        fig.add_annotation(x=(lo + hi) / 2, y=max(t, start) - 0.5, text=f"key {t}", showarrow=True, arrowhead=2,
                           ax=-30, ay=-25, font=dict(color="#17becf"), row=1, col=1)
    return fig


# ------------------------------------------------------------------------------------------- hidden attention mass
def hidden_attention_mass(probs: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Attention mass of each query on the keys a mask hides.

    Args:
        probs: [Q, N] attention probabilities of a dense (causal) head, rows summing to 1.
        visible: [Q, N] bool, the mask (e.g. LRSA) whose hidden keys we weigh.
    Returns:
        [Q] float32 in [0, 1]: ``sum_t probs[q, t] * (not visible[q, t])``.
    """
    if probs.ndim != 2 or visible.shape != probs.shape or visible.dtype != torch.bool:
        raise ValueError(f"probs [Q, N] float and visible [Q, N] bool of one shape expected, got "
                         f"{tuple(probs.shape)} {probs.dtype}, {tuple(visible.shape)} {visible.dtype}")
    return (probs.float() * (~visible).float()).sum(-1)


def attention_by_region(probs: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """Where each query's attention goes, by LRSA region.

    Args:
        probs: [Q, N] attention probabilities (e.g. of a dense head); regions: [Q, N] codes from `mask_regions`.
    Returns:
        [Q, 6] float32: column c = the mass on keys of region code c (FUTURE..OWN); rows sum to the rows of probs.
    """
    if probs.ndim != 2 or regions.shape != probs.shape:
        raise ValueError(f"probs and regions must be [Q, N] of one shape, got {tuple(probs.shape)}, {tuple(regions.shape)}")
    onehot = torch.nn.functional.one_hot(regions.long(), len(REGION_NAMES)).float()  # [Q, N, 6]
    return torch.einsum("qn,qnc->qc", probs.float(), onehot)


def attention_by_region_figure(
    by_region: torch.Tensor,
    config: LagConfig,
    hidden_key_fraction: torch.Tensor | None = None,
    *,
    title: str = "Where a dense head's attention goes, by LRSA region (per query)",
) -> go.Figure:
    """Stacked areas: for each query position, the share of its dense attention on each LRSA region — the bottom band
    (evicted) is the attention LRSA hides; a dashed line (optional) is the share of its causal keys LRSA hides.

    Args:
        by_region: [N, 6] from `attention_by_region` (queries 0..N-1); hidden_key_fraction: [N].
    Returns:
        go.Figure: one area trace per region in the order evicted, sink, selected, lagging window, own partition
        (``meta = {"region": name}``), then the dashed line; x = query position labelled by partition, y in %.
    """
    if by_region.ndim != 2 or by_region.shape[1] != len(REGION_NAMES) or by_region.shape[0] == 0:
        raise ValueError(f"by_region must be [N, {len(REGION_NAMES)}] with N >= 1, got {tuple(by_region.shape)}")
    n = by_region.shape[0]
    if hidden_key_fraction is not None and hidden_key_fraction.shape != (n,):
        raise ValueError(f"hidden_key_fraction must be [N] = [{n}], got {tuple(hidden_key_fraction.shape)}")
    x = list(range(n))
    fig = go.Figure()
    colours = {**dict(enumerate(REGION_COLOURS)), EVICTED: "#9e9e9e"}
    for code in (EVICTED, SINK, SELECTED, LAGGING, OWN):
        name = "evicted (hidden by LRSA)" if code == EVICTED else REGION_NAMES[code]
        fig.add_trace(go.Scatter(x=x, y=(100 * by_region[:, code]).tolist(), stackgroup="mass", name=name, mode="lines",
                                 line=dict(width=0.5, color=colours[code]), fillcolor=colours[code], meta={"region": name},
                                 hovertemplate=f"query %{{x}}: %{{y:.1f}}% on {name}<extra></extra>"))
    if hidden_key_fraction is not None:
        fig.add_trace(go.Scatter(x=x, y=(100 * hidden_key_fraction.float()).tolist(), mode="lines",
                                 line=dict(dash="dash", color="black"), name="share of its causal keys that LRSA hides",
                                 meta={"region": None}, hovertemplate="query %{x}: %{y:.0f}% of its keys hidden<extra></extra>"))
    fig.update_layout(title=title, height=450, legend=dict(orientation="h", y=-0.3),
                      xaxis_title="query position (partition, its first position)",
                      yaxis=dict(title="% of the query's dense attention (stacked)", range=[0, 100]))
    add_partition_grid(fig, config, 0, n, y=False)
    return fig


# ------------------------------------------------------------------------------------------ the prefill storyboard
@dataclasses.dataclass
class PrefillStep:
    """One chunk of chunk-by-chunk prefill, as one layer and KV head of a real recursive `LagKVCache` saw it.

    Attributes:
        chunk: 1-based chunk number: chunk 1 = the first S + 2L tokens, chunk c >= 2 = partition c (L tokens).
        start, stop: the chunk's positions [start, stop).
        before: [N] bool, positions stored when the chunk arrived.
        after: [N] bool, positions stored after the chunk was used and the cache compressed.
        tail_before, tail_after: first position of the uncompressed tail (not yet scored) before / after.
    """

    chunk: int
    start: int
    stop: int
    before: torch.Tensor
    after: torch.Tensor
    tail_before: int
    tail_after: int

    @property
    def used(self) -> torch.Tensor:
        """[N] bool: the keys this chunk's queries attend to (stored before, plus the chunk itself; causally)."""
        used = self.before.clone()
        used[self.start:self.stop] = True
        return used


@torch.no_grad()
def prefill_steps(keys: torch.Tensor, values: torch.Tensor, config: LagConfig, kv_head: int = 0) -> list[PrefillStep]:
    """Feed one layer's K/V chunk by chunk (`prefill_chunks`) into a real recursive `LagKVCache` and record what it
    holds before and after each chunk ("use, then compress").

    Args:
        keys, values: [H_kv, N, d] post-RoPE states of one layer (e.g. ``capture.keys[i]``).
        kv_head: which KV head to record.
    Returns:
        One `PrefillStep` per chunk.
    """
    if keys.ndim != 3 or keys.shape != values.shape:
        raise ValueError(f"keys and values must be [H_kv, N, d] of one shape, got {tuple(keys.shape)}, {tuple(values.shape)}")
    if not 0 <= kv_head < keys.shape[0]:
        raise ValueError(f"kv_head must be in [0, {keys.shape[0] - 1}], got {kv_head}")
    n = keys.shape[1]
    cache = LagKVCache(config, mode="recursive")
    stored = torch.zeros(n, dtype=torch.bool)
    tail = 0
    steps = []
    for c, (a, b) in enumerate(prefill_chunks(n, config), start=1):
        cache.update(keys[None, :, a:b], values[None, :, a:b], 0)
        after = torch.zeros(n, dtype=torch.bool)
        after[cache.kept_positions(0)[0, kv_head].cpu()] = True
        layer = cache.layers[0]
        steps.append(PrefillStep(c, a, b, stored, after, tail, layer.tail_start))
        stored, tail = after, steps[-1].tail_after
    return steps


def _cache_codes(stored: torch.Tensor, tail: int, seen: int, new: tuple[int, int] | None, sink: int, width: int) -> list[int]:
    """Region codes of a cache strip: sink / selected (compressed, kept) / evicted / lagging (uncompressed tail) /
    own (the chunk being read) / future (not fed yet)."""
    out = []
    for t in range(width):
        if new is not None and new[0] <= t < new[1]:
            out.append(OWN)
        elif t >= seen:
            out.append(FUTURE)
        elif t < sink:
            out.append(SINK)
        elif not bool(stored[t]):
            out.append(EVICTED)
        else:
            out.append(LAGGING if t >= tail else SELECTED)
    return out


def prefill_storyboard_figure(
    steps: Sequence[PrefillStep],
    kept: torch.Tensor,
    config: LagConfig,
    chunks: Sequence[int] = (2, 3, 4),
    tokens: Sequence[str] | None = None,
    *,
    title: str = "Chunk-by-chunk prefill: the cache while each chunk is read, and the LRSA mask rows of that chunk",
) -> go.Figure:
    """For each chosen chunk: a cache strip (stored when the chunk arrives / attended by its queries / stored after
    compressing) directly above the LRSA mask rows of the chunk's queries, on one key axis.

    The point of the figure: the last mask row of a chunk is the "attended" strip, key for key, and every earlier
    row is that strip cut causally — the mask is the cache, written down.
    Args:
        steps: from `prefill_steps`; kept: [N] one-shot keep mask of the same layer and KV head (`keep_mask`).
        chunks: 1-based chunk numbers to draw.
    Returns:
        go.Figure with 2 heatmaps per chunk (strip: 3 x K, mask rows: chunk length x K), region codes as in
        `mask_regions`; K = end of the last drawn chunk. Trace ``meta`` = {"chunk": c, "panel": "cache" | "mask"}.
    """
    by_chunk = {s.chunk: s for s in steps}
    if not chunks or any(c not in by_chunk for c in chunks):
        raise ValueError(f"chunks must be chunk numbers in {sorted(by_chunk)}, got {list(chunks)}")
    width = max(by_chunk[c].stop for c in chunks)
    keys = torch.arange(width)
    rows = 2 * len(chunks)
    heights = [w for _ in chunks for w in (0.07, 0.26)]
    fig = make_subplots(rows=rows, cols=1, shared_xaxes=True, row_heights=heights, vertical_spacing=0.025,
                        subplot_titles=[t for c in chunks for t in (f"chunk {c} (positions {by_chunk[c].start}–"
                                                                    f"{by_chunk[c].stop - 1}): the cache", "")])
    common = dict(zmin=-0.5, zmax=len(REGION_NAMES) - 0.5, colorscale=_discrete_colourscale(REGION_COLOURS))
    tok = [hover_safe(tokens[t]) if tokens is not None else "" for t in range(width)]
    for i, c in enumerate(chunks):
        s = by_chunk[c]
        strip = [
            _cache_codes(s.before, s.tail_before, s.start, None, config.sink_size, width),
            _cache_codes(s.before, s.tail_before, s.start, (s.start, s.stop), config.sink_size, width),
            _cache_codes(s.after, s.tail_after, s.stop, None, config.sink_size, width),
        ]
        labels = ["stored when it arrives", "attended by its queries", "stored after compressing"]
        names = [[REGION_NAMES[x] for x in row] for row in strip]
        fig.add_trace(go.Heatmap(z=strip, x=keys.tolist(), y=labels, text=names, customdata=[tok] * 3, showscale=i == 0,
                                 colorbar=dict(tickvals=list(range(len(REGION_NAMES))), ticktext=list(REGION_NAMES),
                                               title="region"),
                                 hovertemplate="%{y}: key %{x} '%{customdata}'<br>%{text}<extra></extra>",
                                 meta={"chunk": c, "panel": "cache"}, **common), row=2 * i + 1, col=1)
        regions = mask_regions(kept, config, torch.arange(s.start, s.stop), keys)
        fig.add_trace(go.Heatmap(z=regions.tolist(), x=keys.tolist(), y=list(range(s.start, s.stop)), showscale=False,
                                 text=[[REGION_NAMES[x] for x in row] for row in regions.tolist()], customdata=[tok] * (s.stop - s.start),
                                 hovertemplate="query %{y} → key %{x} '%{customdata}'<br>%{text}<extra></extra>",
                                 meta={"chunk": c, "panel": "mask"}, **common), row=2 * i + 2, col=1)
        fig.update_yaxes(autorange="reversed", title_text="query", row=2 * i + 2, col=1)
        fig.update_yaxes(autorange="reversed", row=2 * i + 1, col=1)
        add_partition_grid(fig, config, 0, width, row=2 * i + 2, col=1, y=False)
        add_partition_grid(fig, config, 0, width, row=2 * i + 1, col=1, y=False)
    fig.update_xaxes(title_text="key position (partition, its first position)", row=rows, col=1)
    fig.update_layout(title=title, height=300 * len(chunks) + 120)
    return fig
