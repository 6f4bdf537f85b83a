"""The figure functions: their data (shapes, values, which cells are marked kept) and the cap on cells."""
import time

import plotly.graph_objects as go
import pytest
import torch

from lrsa_viz import LagConfig, keep_mask, lagkv_keep_indices, lagkv_scores, visibility_from_keep
from lrsa_viz.viz import (MAX_CELLS, VISIBLE_REGIONS, attention_comparison_figure, channel_values_figure,
                          coloured_text, heatmap_cells, keep_frequency, lag_score_figure, lrsa_mask_figure, mask_regions,
                          retained_token_figure, retention_grid_figure, span_retention, token_std_figure)
from lrsa_viz.scoring import select_top_k
from lrsa_viz.viz.cells import bin_edges
from lrsa_viz.viz.lag_scores import ablation_overlap_figure, partition_score_figure
from lrsa_viz.viz.retention import MAX_GRIDLINES, lagkv_regions
from lrsa_viz.viz.mask_view import EVICTED, FUTURE, LAGGING, OWN, SELECTED, SINK


def random_kv(layers, heads, n, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layers, heads, n, d, generator=g), torch.randn(layers, heads, n, d, generator=g)


CFG = LagConfig(3, 10, 0.3)


@pytest.fixture(scope="module")
def kept():
    k, v = random_kv(4, 2, 75)
    return keep_mask(k, v, CFG)  # [4, 2, 75]


def test_retained_by_layer_head_rows_are_the_keep_mask(kept):
    tokens = [f"t{i}" for i in range(75)]
    fig = retained_token_figure(kept, tokens, layer_ids=[0, 5, 10, 29], by="layer_head")
    z = torch.tensor(fig.data[0].z)
    assert z.shape == (8, 75)
    assert torch.equal(z.bool(), kept.reshape(8, 75))
    assert z.sum(-1).eq(CFG.retained_length(75)).all()
    assert list(fig.layout.yaxis.ticktext)[:3] == ["L0 H0", "L0 H1", "L5 H0"]
    assert fig.data[0].text[0][7] == "token 7: 't7'"


def test_retained_by_layer_is_head_fraction(kept):
    fig = retained_token_figure(kept)
    z = torch.tensor(fig.data[0].z)
    assert z.shape == (4, 75)
    torch.testing.assert_close(z, kept.float().mean(1))
    assert set(z.unique().tolist()) <= {0.0, 0.5, 1.0}


def test_retained_binned_keeps_the_totals(kept):
    fig = retained_token_figure(kept, by="layer_head", max_cells=8 * 10)
    z = torch.tensor(fig.data[0].z)
    assert z.shape == (8, 10) and heatmap_cells(fig) == 80 and "binned" in fig.layout.title.text
    edges = bin_edges(75, 10)
    assert list(fig.data[0].meta["bin_edges"]) == edges
    widths = torch.tensor([b - a for a, b in zip(edges[:-1], edges[1:])], dtype=torch.float32)
    assert widths.sum() == 75 and set(widths.tolist()) == {7.0, 8.0}
    torch.testing.assert_close((z * widths).sum(-1), kept.reshape(8, 75).float().sum(-1))


def test_long_input_stays_under_the_cell_cap():
    """8k tokens x 30 layers x 3 KV heads: binned to at most MAX_CELLS cells, quickly."""
    kept = torch.rand(30, 3, 8192, generator=torch.Generator().manual_seed(0)) < 0.3
    tokens = [f"w{i}" for i in range(8192)]
    start = time.perf_counter()
    for by in ("layer", "layer_head"):
        fig = retained_token_figure(kept, tokens, by=by)
        assert heatmap_cells(fig) <= MAX_CELLS
        assert len(fig.to_json()) < 40e6
    assert heatmap_cells(retention_grid_figure(kept, (100, 200))) == 90
    assert time.perf_counter() - start < 60


def test_retention_grid_is_span_fraction(kept):
    fig = retention_grid_figure(kept, (20, 37), layer_ids=[1, 2, 3, 4])
    z = torch.tensor(fig.data[0].z)
    torch.testing.assert_close(z, kept[..., 20:37].float().mean(-1))
    torch.testing.assert_close(z, span_retention(kept, (20, 37)))
    assert fig.data[0].text[0][1] == f"{int(kept[0, 1, 20:37].sum())}/17"
    assert list(fig.data[0].y) == ["L1", "L2", "L3", "L4"]
    with pytest.raises(ValueError, match="span"):
        span_retention(kept, (30, 30))
    with pytest.raises(ValueError, match="layer_ids"):
        retention_grid_figure(kept, layer_ids=[0])


def test_retention_rejects_bad_input(kept):
    with pytest.raises(ValueError, match="bool tensor"):
        retained_token_figure(kept.float())
    with pytest.raises(ValueError, match="by must be"):
        retained_token_figure(kept, by="head")
    with pytest.raises(ValueError, match="tokens"):
        retained_token_figure(kept, ["a"])
    with pytest.raises(ValueError, match="max_cells"):
        retained_token_figure(kept, by="layer_head", max_cells=3)


def test_lag_score_figure_marks_the_kept_tokens():
    k, v = random_kv(1, 2, 75, seed=3)
    scores = lagkv_scores(k, v, CFG)  # [1, 2, P-1, L]; P = 7
    keep = lagkv_keep_indices(k, v, CFG)
    for h in range(2):
        fig = lag_score_figure(scores[0, h], CFG, [f"t{i}" for i in range(75)])
        torch.testing.assert_close(torch.tensor(fig.data[0].z), scores[0, h])
        marks = fig.data[1]
        assert len(marks.x) == 6 * CFG.top_k
        marked = sorted(CFG.sink_size + y * CFG.lag_size + x for x, y in zip(marks.x, marks.y))
        # the marked cells are exactly the scored tokens that one-shot LagKV keeps
        scored_region = range(CFG.sink_size, CFG.sink_size + 6 * CFG.lag_size)
        assert marked == [t for t in keep[0, h].tolist() if t in scored_region]
        assert marks.text[0].startswith(f"token {marked[0]}:")


def test_lag_score_figure_truncates_and_validates():
    scores = torch.rand(50, 10)
    fig = lag_score_figure(scores, CFG, max_cells=200)
    assert heatmap_cells(fig) == 200 and "first 20 of 50" in fig.layout.title.text
    assert max(fig.data[1].y) == 19
    with pytest.raises(ValueError, match="lag_size"):
        lag_score_figure(torch.rand(5, 8), CFG)
    with pytest.raises(ValueError, match=r"\[P - 1, L\]"):
        lag_score_figure(torch.rand(1, 5, 10), CFG)


def test_step_figures():
    cur, ref = torch.randn(10, 8), torch.randn(10, 8)
    norm = (cur - ref.amin(0)) / (ref.amax(0) - ref.amin(0))
    fig = channel_values_figure(cur, ref, norm, title="x")
    assert [len(t.z) for t in fig.data] == [10, 10, 10]
    torch.testing.assert_close(torch.tensor(fig.data[2].z), norm)
    std = norm.std(-1)
    fig = token_std_figure(std, std.softmax(0), [f"t{i}" for i in range(10)], top_k=3)
    evicted, kept_bars, line = fig.data
    assert kept_bars.name == "kept (top 3)" and kept_bars.marker.color == "#d62728"
    assert list(kept_bars.x) == select_top_k(std.softmax(0)[None, None, None], 3).flatten().tolist()
    assert sorted(list(evicted.x) + list(kept_bars.x)) == list(range(10))
    assert "std" in fig.layout.yaxis.title.text and "softmax" in fig.layout.yaxis2.title.text
    with pytest.raises(ValueError, match="top_k"):
        token_std_figure(std, std.softmax(0), top_k=11)


@pytest.mark.parametrize("cfg, n", [(LagConfig(3, 10, 0.3), 75), (LagConfig(0, 4, 0.5), 33), (LagConfig(5, 6, 1 / 6), 40)])
def test_mask_regions_match_lrsa_visibility(cfg, n):
    k, v = random_kv(1, 1, n, seed=n)
    kept = keep_mask(k, v, cfg)[0, 0]
    regions = mask_regions(kept, cfg)
    visible = visibility_from_keep(kept[None, None], cfg)[0, 0]
    assert torch.equal(torch.isin(regions, torch.tensor(VISIBLE_REGIONS, dtype=torch.int8)), visible)
    assert torch.isin(regions[:, : cfg.sink_size], torch.tensor([SINK, FUTURE], dtype=torch.int8)).all()
    q = n - 1  # last query: partition k; check each region against its definition
    part = lambda t: -1 if t < cfg.sink_size else (t - cfg.sink_size) // cfg.lag_size
    for t in range(n):
        expect = (SINK if t < cfg.sink_size else OWN if part(t) == part(q) else LAGGING if part(t) == part(q) - 1
                  else SELECTED if kept[t] else EVICTED)
        assert regions[q, t] == expect, t
    future = torch.ones(n, n, dtype=torch.bool).triu(1)
    assert torch.equal(regions.eq(FUTURE), future)


def test_mask_figure_windows_and_pools():
    k, v = random_kv(1, 1, 75, seed=1)
    kept = keep_mask(k, v, CFG)[0, 0]
    fig = lrsa_mask_figure(kept, CFG, [f"t{i}" for i in range(75)], window=(10, 60))
    z = torch.tensor(fig.data[0].z)
    assert z.shape == (50, 50)
    assert torch.equal(z.to(torch.int8), mask_regions(kept, CFG)[10:60, 10:60])
    pooled = lrsa_mask_figure(kept, CFG, max_cells=400)
    zp = torch.tensor(pooled.data[0].z)
    assert zp.shape == (19, 19) and "pooled 4x4" in pooled.layout.title.text
    visible = visibility_from_keep(kept[None, None], CFG)[0, 0].float()
    torch.testing.assert_close(zp[0, 0], visible[:4, :4].mean())
    torch.testing.assert_close(zp[-1, -1], visible[72:, 72:].mean())
    with pytest.raises(ValueError, match="window"):
        lrsa_mask_figure(kept, CFG, window=(50, 80))


def test_mask_figure_8k_tokens_stays_small():
    cfg = LagConfig(16, 128, 0.25)
    kept = torch.zeros(8192, dtype=torch.bool)
    kept[torch.randperm(8192, generator=torch.Generator().manual_seed(0))[:2000]] = True
    start = time.perf_counter()
    fig = lrsa_mask_figure(kept, cfg)
    assert heatmap_cells(fig) <= MAX_CELLS
    assert time.perf_counter() - start < 60
    z = torch.tensor(fig.data[0].z)
    b = z.shape[0]
    assert z.triu(1).eq(0).all(), "blocks above the diagonal are all future"
    assert z[-1, 0] > 0, "the sink stays visible to the last queries"
    # far from the diagonal a block is visible only where LagKV kept keys: about 2000/8192 of them
    assert 0.1 < z[-1, 1: b // 2].mean() < 0.45
    assert z.diagonal().min() > 0.4, "diagonal blocks are (about half) causal"


def test_attention_comparison_figure():
    n = 30
    probs = torch.rand(n, n).tril()
    probs = probs / probs.sum(-1, keepdim=True)
    sparse = probs.clone()
    sparse[20:, 5:10] = 0
    fig = attention_comparison_figure(probs, sparse)
    assert len(fig.data) == 2
    torch.testing.assert_close(torch.tensor(fig.data[0].z), probs.sqrt())
    assert torch.tensor(fig.data[1].z)[20:, 5:10].eq(0).all()
    big = attention_comparison_figure(torch.rand(1000, 1000), torch.rand(1000, 1000), max_cells=10_000)
    assert heatmap_cells(big) <= 20_000
    with pytest.raises(ValueError, match="one shape"):
        attention_comparison_figure(probs, probs[:5])


def test_coloured_text_escapes_and_colours():
    tokens = ["<b>", " and", "\n", " &"]
    view = coloured_text(tokens, torch.tensor([0.0, 0.5, 1.0, 0.25]), title="t")
    assert "&lt;b&gt;" in view.html and "<b>" not in view.html, "token text is escaped, never markup"
    assert "⏎<br>" in view.html and "&amp;" in view.html
    assert view.html.count("token ") == 4
    assert "rgba(31,119,180,0.500)" in view.html and "kept by 25%" in view.html
    assert view._repr_html_() == view.html
    with pytest.raises(ValueError, match="one value per token"):
        coloured_text(tokens, [0.1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        coloured_text(tokens, [0.1, 2.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="max_tokens"):
        coloured_text(["a"] * 5, [0.0] * 5, max_tokens=4)


def test_keep_frequency(kept):
    freq = keep_frequency(kept)
    assert freq.shape == (75,) and freq[: CFG.sink_size].eq(1).all()
    assert abs(freq.sum().item() - CFG.retained_length(75)) < 1e-4


def test_every_figure_is_a_plotly_figure(kept):
    figs = [retained_token_figure(kept), retention_grid_figure(kept), lag_score_figure(torch.rand(3, 10), CFG),
            lrsa_mask_figure(kept[0, 0], CFG)]
    assert all(isinstance(f, go.Figure) for f in figs)


# ------------------------------------------------------------------------------ annotations that make figures readable
def _shapes(fig, kind):
    return [sh for sh in fig.layout.shapes if sh.type == kind]


def test_retained_heatmap_marks_partitions_and_regions(kept):
    """Gridlines at every partition boundary S + p*L, one band per region, a key that names them."""
    n, s, lag = 75, CFG.sink_size, CFG.lag_size  # P = 7 full partitions, remainder 2
    fig = retained_token_figure(kept, config=CFG)
    lines = [sh for sh in _shapes(fig, "line") if sh.yref == "paper"]
    assert [sh.x0 + 0.5 for sh in lines] == [s + p * lag for p in range(CFG.num_partitions(n) + 1)]
    bands = {sh.name: (sh.x0 + 0.5, sh.x1 + 0.5) for sh in _shapes(fig, "rect")}
    assert bands == {"sink": (0, 3), "scored": (3, 63), "kept_whole": (63, 75)}
    assert lagkv_regions(n, CFG) == {"sink": (0, 3), "scored": (3, 63), "kept_whole": (63, 75)}
    assert CFG.retained_length(n) == s + CFG.top_k * 6 + (75 - 63), "scored: top-k of 6 partitions; the rest whole"
    key = [a.text for a in fig.layout.annotations if a.name == "region key"][0]
    assert "sink 0–2" in key and "top 3 of every 10" in key and "kept whole 63–74" in key
    assert fig.data[0].meta["regions"]["scored"] == [3, 63]
    assert torch.tensor(fig.data[0].z)[:, 63:].eq(1).all() and torch.tensor(fig.data[0].z)[:, :3].eq(1).all()
    # without a config nothing is drawn
    assert not retained_token_figure(kept).layout.shapes


def test_retained_heatmap_regions_below_s_plus_2l():
    kept = torch.ones(2, 2, 20, dtype=torch.bool)  # 20 < S + 2L = 23: nothing is scored
    fig = retained_token_figure(kept, config=CFG)
    assert {sh.name for sh in _shapes(fig, "rect")} == {"sink", "kept_whole"}
    assert lagkv_regions(20, CFG)["scored"] == (3, 3)


def test_retained_heatmap_thins_gridlines():
    cfg = LagConfig(0, 1, 1.0)
    fig = retained_token_figure(torch.ones(1, 1, 1000, dtype=torch.bool), config=cfg)
    lines = [sh for sh in _shapes(fig, "line") if sh.yref == "paper"]
    assert len(lines) <= MAX_GRIDLINES and fig.data[0].meta["gridline_stride"] == 6
    assert "gridline every 6 partitions" in fig.layout.title.text


def _distinct_bands(colorscale):
    """(start, stop, colour) of each flat band of a stepped colour scale."""
    stops = [(float(pos), colour) for pos, colour in colorscale]
    return [(a[0], b[0], a[1]) for a, b in zip(stops[::2], stops[1::2]) if a[1] == b[1]]


@pytest.mark.parametrize("by, levels", [("layer", 3), ("layer_head", 2)])
def test_retained_heatmap_has_a_discrete_colour_scale(kept, by, levels):
    """Each possible value (k of H KV heads; kept / evicted) gets one flat colour band, labelled on the colour bar."""
    fig = retained_token_figure(kept, by=by)
    trace = fig.data[0]
    bands = _distinct_bands(trace.colorscale)
    assert len(bands) == levels == len({c for _, _, c in bands}), "one distinct colour per level"
    values = [i / (levels - 1) for i in range(levels)]
    assert list(trace.meta["levels"]) == values == list(trace.colorbar.tickvals)
    for v, (a, b, _) in zip(values, bands):
        assert a <= v <= b, "each level falls inside its own band"
    assert set(torch.tensor(trace.z).unique().tolist()) <= set(values)
    assert list(trace.colorbar.ticktext) == (["0 of 2", "1 of 2", "2 of 2"] if by == "layer" else ["evicted", "kept"])
    # the hover says the value in words
    z = torch.tensor(trace.z)
    i, j = (z == values[1]).nonzero()[0].tolist()
    assert trace.customdata[i][j].endswith("kept by 1 of 2 KV heads" if by == "layer" else "kept")


def test_binned_heatmap_keeps_a_continuous_scale(kept):
    fig = retained_token_figure(kept, max_cells=4 * 10)
    assert fig.data[0].meta["levels"] is None and len(fig.data[0].colorscale) == 2


def test_layer_head_mode_axes(kept):
    """One row per (layer, KV head), labelled, with a line between layers; the z rows are the keep mask."""
    fig = retained_token_figure(kept, [f"t{i}" for i in range(75)], layer_ids=[2, 4, 6, 8], by="layer_head",
                                config=CFG)
    assert fig.layout.yaxis.title.text == "layer, KV head" and fig.layout.xaxis.title.text.startswith("token position")
    assert list(fig.layout.yaxis.ticktext) == [f"L{i} H{h}" for i in (2, 4, 6, 8) for h in range(2)]
    assert list(fig.layout.yaxis.tickvals) == list(range(8))
    separators = [sh for sh in _shapes(fig, "line") if sh.xref == "paper"]
    assert [sh.y0 for sh in separators] == [1.5, 3.5, 5.5]
    assert torch.equal(torch.tensor(fig.data[0].z).bool(), kept.reshape(8, 75))


def test_lag_score_figure_labels_rows_colour_bar_and_kept_text():
    k, v = random_kv(1, 1, 75, seed=3)
    scores = lagkv_scores(k, v, CFG)[0, 0]  # [6, 10]
    tokens = [f"w{i}" for i in range(75)]
    fig = lag_score_figure(scores, CFG, tokens)
    assert list(fig.layout.yaxis.ticktext) == [f"p{p}: {3 + 10 * p}–{12 + 10 * p}" for p in range(6)]
    bar = fig.data[0].colorbar
    assert bar.title.text == "score<br>a_K + a_V" and "w·" not in bar.title.text
    assert "0.2000 (2/L)" in bar.ticktext, "the uniform score 2/L is marked on the colour bar"
    assert 2 / 10 in list(bar.tickvals)
    offsets = select_top_k(scores[None, None], CFG.top_k)[0, 0]
    texts = [a.text for a in fig.layout.annotations if a.name == "kept text"]
    assert texts == ["│".join(f"w{3 + 10 * p + o}" for o in offsets[p].tolist()) for p in range(6)]
    assert not [a for a in lag_score_figure(scores, CFG).layout.annotations if a.name == "kept text"]
    weighted = lag_score_figure(scores, LagConfig(3, 10, 0.3, score_v_ratio=0.5))
    assert weighted.data[0].colorbar.title.text == "score<br>a_K + 0.5·a_V"
    with pytest.raises(ValueError, match="kept_text_width"):
        lag_score_figure(scores, CFG, tokens, kept_text_width=-1)


def test_lag_score_kept_text_only_for_few_rows():
    scores = torch.rand(41, 10, generator=torch.Generator().manual_seed(0))
    fig = lag_score_figure(scores, CFG, [f"w{i}" for i in range(3 + 41 * 10 + 20)])
    assert not [a for a in fig.layout.annotations if a.name == "kept text"] and "up to 40 rows" in fig.layout.title.text
    assert len(fig.data[1].x) == 41 * CFG.top_k, "the crosses stay"


def test_lag_score_kept_text_is_shortened():
    scores = torch.rand(2, 10, generator=torch.Generator().manual_seed(0))
    fig = lag_score_figure(scores, CFG, ["a-long-token"] * 75, kept_text_width=30)
    for a in [a for a in fig.layout.annotations if a.name == "kept text"]:
        assert a.text.endswith("…") and len(a.text.replace("<br>", "")) <= 31


def test_partition_score_figure():
    g = torch.Generator().manual_seed(1)
    a_k, a_v = torch.rand(10, generator=g).softmax(0), torch.rand(10, generator=g).softmax(0)
    fig = partition_score_figure(a_k, a_v, CFG, [f"t{i}" for i in range(10)])
    score = a_k + a_v
    kept_offsets = select_top_k(score[None, None, None], 3).flatten().tolist()
    assert list(fig.layout.meta["kept"]) == kept_offsets
    bars = {t.name: t for t in fig.data if t.type == "bar"}
    assert list(bars["kept (top 3)"].x) == kept_offsets
    torch.testing.assert_close(torch.tensor(bars["kept (top 3)"].y), score[kept_offsets])
    lines = [t for t in fig.data if t.type == "scatter"]
    assert lines[0].y[0] == pytest.approx(0.2) and lines[0].name.startswith("uniform score")
    assert lines[1].y[0] == pytest.approx(float(score[kept_offsets].min()))
    lo, hi = fig.layout.yaxis.range
    assert 0 < lo < float(score.min()) and hi > float(score.max()), "the axis is zoomed to the scores, not from 0"
    assert "a_K + a_V" in fig.layout.yaxis.title.text
    with pytest.raises(ValueError, match="lag_size"):
        partition_score_figure(a_k[:5], a_v[:5], CFG)


def test_ablation_overlap_figure():
    fig = ablation_overlap_figure({"plain std": 0.99, "keys only": 0.7}, 0.25)
    assert list(fig.data[0].x) == [0.99, 0.7] and list(fig.data[0].y) == ["plain std", "keys only"]
    assert fig.layout.shapes[0].x0 == 0.25 and "chance" in fig.layout.shapes[0].name
    with pytest.raises(ValueError, match="fractions"):
        ablation_overlap_figure({"x": 1.5}, 0.25)
    with pytest.raises(ValueError, match="at least one"):
        ablation_overlap_figure({}, 0.25)


def test_many_rows_are_labelled_once_per_layer():
    kept = torch.ones(30, 3, 40, dtype=torch.bool)
    fig = retained_token_figure(kept, by="layer_head")
    assert list(fig.layout.yaxis.tickvals) == list(range(0, 90, 3))
    assert list(fig.layout.yaxis.ticktext) == [f"L{i} H0" for i in range(30)]
    assert list(retained_token_figure(kept).layout.yaxis.ticktext) == [f"L{i}" for i in range(30)]
