"""Which tokens LagKV keeps: a retained-token heatmap (layers or layer x KV head x tokens) and a layer x KV-head grid.

Given the LagConfig that made them, the heatmap marks the partitions (dotted gridlines) and the three regions of
one-shot compression (sink, scored partitions, tail kept whole). Input everywhere: ``kept`` [n_layers, H_kv, N]
bool, e.g. `KVCapture.keep_mask(config)` or a `LagKVCache`'s ``kept_position_mask()[:, 0]``.
"""
from __future__ import annotations

from typing import Literal, Sequence

import plotly.graph_objects as go
import torch
from plotly.colors import sample_colorscale

from ..config import LagConfig
from .cells import MAX_CELLS, add_shapes, bin_columns, check_max_cells, hover_safe, snippet


def _check_kept(kept: torch.Tensor) -> torch.Tensor:
    if not isinstance(kept, torch.Tensor) or kept.ndim != 3 or kept.dtype != torch.bool:
        shape = tuple(kept.shape) if isinstance(kept, torch.Tensor) else type(kept).__name__
        raise ValueError(f"kept must be a bool tensor [n_layers, H_kv, N], got {shape}")
    return kept


def _layer_ids(layer_ids: Sequence[int] | None, n: int) -> list[int]:
    ids = list(range(n)) if layer_ids is None else list(layer_ids)
    if len(ids) != n:
        raise ValueError(f"layer_ids must name the {n} layers of kept, got {len(ids)}")
    return ids


def keep_frequency(kept: torch.Tensor) -> torch.Tensor:
    """Fraction of (layer, KV head) pairs that keep each token: [N] float32 in [0, 1]."""
    kept = _check_kept(kept)
    return kept.float().mean(dim=(0, 1))


def _discrete_colorscale(levels: int) -> list:
    """A stepped colour scale over [0, 1] with ``levels`` flat bands centred on 0, 1/(levels-1), ..., 1."""
    colours = sample_colorscale("Blues", [0.04 + 0.96 * i / (levels - 1) for i in range(levels)])
    scale = []
    for i, colour in enumerate(colours):
        lo, hi = max(0.0, (i - 0.5) / (levels - 1)), min(1.0, (i + 0.5) / (levels - 1))
        scale += [[lo, colour], [hi, colour]]
    return scale


def lagkv_regions(n: int, config: LagConfig) -> dict[str, tuple[int, int]]:
    """Token ranges [start, stop) of one-shot LagKV compression of ``n`` tokens (METHOD.md §2):
    ``sink`` (always kept), ``scored`` (partitions 0 .. P-2: top-k of each kept) and ``kept_whole`` (the last full
    partition and the remainder). Below S + 2L nothing is scored: everything after the sink is kept whole."""
    s = min(config.sink_size, n)
    p = config.num_partitions(n)
    scored_stop = s + (p - 1) * config.lag_size if p >= 2 else s
    return {"sink": (0, s), "scored": (s, scored_stop), "kept_whole": (scored_stop, n)}


#: Fill colours of the region bands drawn above the retained-token heatmap.
REGION_COLOURS = {"sink": "#7f7f7f", "scored": "#ff7f0e", "kept_whole": "#2ca02c"}
#: At most this many row labels on the y axis (beyond it, layer x head rows are labelled once per layer).
MAX_ROW_LABELS = 45
#: At most this many partition gridlines are drawn (every m-th boundary beyond it; the title says so).
MAX_GRIDLINES = 200


def _annotate_partitions(fig: go.Figure, n: int, config: LagConfig, plot_height: int) -> dict:
    """Partition gridlines, and sink / scored / kept-whole bands with a colour key above a token-position x axis.

    ``plot_height``: height of the plotting area in pixels (the bands are drawn about 14 px high).
    Returns the meta to attach to the heatmap trace.
    """
    regions = lagkv_regions(n, config)
    s, lag, top_k = config.sink_size, config.lag_size, config.top_k
    p = config.num_partitions(n)
    boundaries = [s + i * lag for i in range(p + 1)] if p >= 1 else []
    stride = max(1, -(-len(boundaries) // MAX_GRIDLINES))
    shapes = [dict(type="line", x0=b - 0.5, x1=b - 0.5, y0=0, y1=1, xref="x", yref="paper",
                   line=dict(color="rgba(214,39,40,0.9)", width=1.5, dash="dot")) for b in boundaries[::stride]]
    band = 14 / max(plot_height, 50)
    spans = {name: f"{a}–{b - 1}" for name, (a, b) in regions.items() if b > a}
    labels = {"sink": f"sink {spans.get('sink', '')}: always kept",
              "scored": f"scored partitions {spans.get('scored', '')}: top {top_k} of every {lag} kept",
              "kept_whole": f"kept whole {spans.get('kept_whole', '')}: last full partition + remainder"}
    key = []
    for name, (a, b) in regions.items():
        if b <= a:
            continue
        shapes.append(dict(type="rect", x0=a - 0.5, x1=b - 0.5, y0=1 + band / 3, y1=1 + band / 3 + band, xref="x",
                           yref="paper", fillcolor=REGION_COLOURS[name], line_width=0, name=name))
        key.append(f"<span style='color:{REGION_COLOURS[name]}'>■</span> {labels[name]}")
    add_shapes(fig, shapes)
    fig.add_annotation(text="   ".join(key), x=0, xref="paper", xanchor="left", y=1 + 1.6 * band, yref="paper",
                       yanchor="bottom", showarrow=False, font=dict(size=11), name="region key")
    return {"regions": {k: list(v) for k, v in regions.items()}, "partition_boundaries": boundaries,
            "gridline_stride": stride}


def _cell_labels(labels: list[str], z: torch.Tensor, binned: bool, by: str, n_heads: int) -> list[list[str]]:
    """Hover label of every heatmap cell: the row, and (unbinned) the cell's value in words."""
    if binned:
        return [[lab] * z.shape[1] for lab in labels]
    if by == "layer":
        words = [f"kept by {i} of {n_heads} KV heads" for i in range(n_heads + 1)]
        counts = (z * n_heads).round().long().tolist()
        return [[f"{lab}: {words[c]}" for c in row] for lab, row in zip(labels, counts)]
    words = ["evicted", "kept"]
    return [[f"{lab}: {words[c]}" for c in row] for lab, row in zip(labels, z.round().long().tolist())]


def retained_token_figure(
    kept: torch.Tensor,
    tokens: Sequence[str] | None = None,
    *,
    layer_ids: Sequence[int] | None = None,
    by: Literal["layer", "layer_head"] = "layer",
    config: LagConfig | None = None,
    max_cells: int = MAX_CELLS,
    title: str | None = None,
) -> go.Figure:
    """Heatmap of the retained tokens: rows = layers (or layer x KV head), columns = token positions.

    Args:
        kept: [n_layers, H_kv, N] bool.
        tokens: N token strings, shown on hover.
        by: ``"layer"``: a cell is the fraction of the layer's KV heads that keep the token (H_kv + 1 possible
            values, drawn with a DISCRETE colour scale of H_kv + 1 steps); ``"layer_head"``: one row per
            (layer, KV head), a cell is 1 (kept) or 0 (evicted), two colours, with lines between layers.
        config: the LagConfig that produced ``kept``: draws partition gridlines (dotted, at S + p*L) and bands
            above the plot for the sink, the scored partitions and the tail kept whole (last full partition +
            remainder).
        max_cells: at most this many cells; longer texts are binned into windows of consecutive tokens and a cell
            is then the fraction of kept (token, head) pairs in its window (continuous colour scale; the title
            says so).
    Returns:
        go.Figure with one heatmap; ``z`` has rows x min(N, max_cells // rows) cells; the trace's
        ``meta["bin_edges"]`` gives the token range of each column (column b covers edges[b]:edges[b+1]),
        ``meta["levels"]`` the values of the discrete colour scale (None when binned) and, with ``config``,
        ``meta["regions"]`` / ``meta["partition_boundaries"]`` the annotated token ranges.
    """
    kept = _check_kept(kept)
    n_layers, n_heads, n = kept.shape
    ids = _layer_ids(layer_ids, n_layers)
    if tokens is not None and len(tokens) != n:
        raise ValueError(f"tokens must have one string per position ({n}), got {len(tokens)}")
    if config is not None and not isinstance(config, LagConfig):
        raise ValueError(f"config must be a LagConfig or None, got {type(config).__name__}")
    if by == "layer":
        rows, labels = kept.float().mean(dim=1), [f"L{i}" for i in ids]
    elif by == "layer_head":
        rows = kept.float().reshape(n_layers * n_heads, n)
        labels = [f"L{i} H{h}" for i in ids for h in range(n_heads)]
    else:
        raise ValueError(f"by must be 'layer' or 'layer_head', got {by!r}")
    check_max_cells(max_cells, min_cells=rows.shape[0])
    z, edges = bin_columns(rows, max_cells // rows.shape[0])
    binned = z.shape[1] < n
    starts, stops = edges[:-1], edges[1:]
    if binned:
        x = [(a + b - 1) / 2 for a, b in zip(starts, stops)]
        col_text = [f"tokens {a}–{b - 1}: {snippet(tokens, a, b) if tokens else ''}" for a, b in zip(starts, stops)]
    else:
        x = list(range(n))
        col_text = [f"token {t}: '{hover_safe(tokens[t])}'" if tokens else f"token {t}" for t in range(n)]
    if binned:  # a cell is the kept fraction of (token, head) pairs in its window: any value in [0, 1]
        levels = None
        what = "fraction kept in the window"
        colour = dict(colorscale=[[0, "#f7fbff"], [1, "#08306b"]], colorbar=dict(title=what))
    elif by == "layer":  # a cell is (heads keeping the token) / H_kv: H_kv + 1 possible values
        levels = [i / n_heads for i in range(n_heads + 1)]
        colour = dict(colorscale=_discrete_colorscale(n_heads + 1),
                      colorbar=dict(title=f"KV heads<br>keeping it (of {n_heads})", tickmode="array",
                                    tickvals=levels, ticktext=[f"{i} of {n_heads}" for i in range(n_heads + 1)]))
    else:
        levels = [0.0, 1.0]
        colour = dict(colorscale=_discrete_colorscale(2),
                      colorbar=dict(title="this KV head", tickmode="array", tickvals=levels,
                                    ticktext=["evicted", "kept"]))
    meta = {"by": by, "bin_edges": edges, "levels": levels}
    fig = go.Figure(go.Heatmap(
        z=z.tolist(), x=x, y=list(range(len(labels))), text=[col_text] * len(labels), zmin=0, zmax=1,
        customdata=_cell_labels(labels, z, binned, by, n_heads), meta=meta,
        hovertemplate="%{customdata}<br>%{text}" + ("<br>fraction kept: %{z:.2f}" if binned else "")
                      + "<extra></extra>", **colour,
    ))
    if by == "layer_head" and n_heads > 1:
        add_shapes(fig, [dict(type="line", x0=0, x1=1, y0=i * n_heads - 0.5, y1=i * n_heads - 0.5, xref="paper",
                              yref="y", line=dict(color="rgba(40,40,40,0.5)", width=1)) for i in range(1, n_layers)])
    height = max(320, min(900, 90 + 14 * len(labels))) + (60 if config is not None else 0)
    # too many rows for one label each: label the first KV head of every layer ("L7 H0"), or every m-th layer
    step = 1 if len(labels) <= MAX_ROW_LABELS else n_heads if by == "layer_head" else -(-len(labels) // MAX_ROW_LABELS)
    tickvals = list(range(0, len(labels), step))
    margin = dict(t=120 if config is not None else 70, b=60)
    notes = []
    if config is not None:
        extra = _annotate_partitions(fig, n, config, height - margin["t"] - margin["b"])
        meta.update(extra)
        fig.data[0].meta = meta
        if extra["gridline_stride"] > 1:
            notes.append(f"gridline every {extra['gridline_stride']} partitions")
    if binned:
        notes.append(f"binned: {len(x)} windows of ~{n / len(x):.1f} tokens")
    note = (" — " + "; ".join(notes)) if notes else ""
    default = "per layer: how many KV heads keep each token" if by == "layer" else "per layer and KV head"
    fig.update_layout(
        title=(title or f"Retained tokens ({default})") + note,
        xaxis_title="token position" + (" (dotted lines: partition boundaries)" if config is not None else ""),
        yaxis=dict(title="layer" if by == "layer" else "layer, KV head", autorange="reversed",
                   tickmode="array", tickvals=tickvals, ticktext=[labels[i] for i in tickvals]),
        height=height, margin=margin,
    )
    return fig


def span_retention(kept: torch.Tensor, span: tuple[int, int]) -> torch.Tensor:
    """Fraction of the tokens in ``span`` = [start, stop) that each layer / KV head keeps: [n_layers, H_kv] float32."""
    kept = _check_kept(kept)
    n = kept.shape[-1]
    start, stop = span
    if not 0 <= start < stop <= n:
        raise ValueError(f"span must be (start, stop) with 0 <= start < stop <= {n}, got {span}")
    return kept[..., start:stop].float().mean(dim=-1)


def retention_grid_figure(
    kept: torch.Tensor,
    span: tuple[int, int] | None = None,
    tokens: Sequence[str] | None = None,
    *,
    layer_ids: Sequence[int] | None = None,
    title: str | None = None,
) -> go.Figure:
    """Layer x KV-head grid: the fraction of the tokens of ``span`` (default: all) that each head keeps.

    Over the whole text every head keeps the same number of tokens (METHOD eq. 12), so the grid is informative
    for a span: e.g. the sentence that holds a fact, whose tokens some heads keep and others drop.
    Returns:
        go.Figure with one heatmap, z [n_layers, H_kv].
    """
    kept = _check_kept(kept)
    n_layers, n_heads, n = kept.shape
    ids = _layer_ids(layer_ids, n_layers)
    span = span or (0, n)
    frac = span_retention(kept, span)
    count = kept[..., span[0]:span[1]].sum(dim=-1)
    size = span[1] - span[0]
    text = [[f"{int(count[i, h])}/{size}" for h in range(n_heads)] for i in range(n_layers)]
    fig = go.Figure(go.Heatmap(
        z=frac.tolist(), x=[f"H{h}" for h in range(n_heads)], y=[f"L{i}" for i in ids], text=text,
        texttemplate="%{text}" if n_layers * n_heads <= 400 else None, zmin=0, zmax=1, colorscale="Blues",
        colorbar=dict(title="fraction kept"),
        hovertemplate="layer %{y}, KV head %{x}<br>kept %{text} tokens of the span (%{z:.0%})<extra></extra>",
    ))
    what = f"tokens {span[0]}–{span[1] - 1}" + (f": '{snippet(list(tokens), *span, width=50)}'" if tokens else "")
    fig.update_layout(title=title or f"Retention of {what}", xaxis_title="KV head",
                      yaxis=dict(title="layer", autorange="reversed"), height=max(300, min(900, 60 + 18 * n_layers)))
    return fig
