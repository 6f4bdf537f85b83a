"""The LRSA mask's story figures: partition-indexed axes, the prefill storyboard (a real LagKVCache, chunk by chunk,
beside the mask rows of each chunk), the hidden attention mass, and the marked column of the dense map."""
import plotly.graph_objects as go
import pytest
import torch

from lrsa_viz import LagConfig, keep_mask, visibility_from_keep
from lrsa_viz.viz import attention_comparison_figure, lrsa_mask_figure
from lrsa_viz.viz.mask_view import (EVICTED, FUTURE, LAGGING, OWN, SELECTED, SINK, add_partition_grid,
                                    attention_by_region, attention_by_region_figure, hidden_attention_mass, mask_regions,
                                    partition_ticks,
                                    prefill_steps, prefill_storyboard_figure)

CFG = LagConfig(4, 16, 0.25)


def random_kv(heads=3, n=128, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(heads, n, d, generator=g), torch.randn(heads, n, d, generator=g)


def test_partition_ticks_name_each_partition():
    vals, text, bounds = partition_ticks(CFG, 0, 60)
    assert text == ["sink<br>0", "p0<br>4", "p1<br>20", "p2<br>36", "p3<br>52"]
    assert vals == [1.5, 11.5, 27.5, 43.5, 55.5], "centres of each partition's part inside the window"
    assert bounds == [4, 20, 36, 52]
    vals, text, bounds = partition_ticks(CFG, 10, 40)
    assert text[0] == "p0<br>4" and vals[0] == 14.5 and bounds == [20, 36]
    _, text, _ = partition_ticks(LagConfig(16, 128, 0.25), 0, 8192, max_labels=16)
    assert len(text) <= 16 and text[0].startswith("sink")
    with pytest.raises(ValueError, match="start, stop"):
        partition_ticks(CFG, 5, 5)


def test_mask_figure_has_partition_axes_and_boundaries():
    k, v = random_kv(1, 75)
    kept = keep_mask(k[None], v[None], CFG)[0, 0]
    fig = lrsa_mask_figure(kept, CFG)
    assert list(fig.layout.xaxis.ticktext)[:3] == ["sink<br>0", "p0<br>4", "p1<br>20"]
    assert list(fig.layout.yaxis.ticktext) == list(fig.layout.xaxis.ticktext)
    lines = [s for s in fig.layout.shapes if s.type == "line"]
    assert sorted({s.x0 for s in lines if s.x0 == s.x1}) == [3.5, 19.5, 35.5, 51.5, 67.5]
    plain = lrsa_mask_figure(kept, CFG, partition_axes=False)
    assert not plain.layout.shapes and plain.layout.xaxis.ticktext is None
    assert torch.equal(torch.tensor(fig.data[0].z), torch.tensor(plain.data[0].z))


@pytest.mark.parametrize("cfg, n", [(CFG, 128), (LagConfig(0, 8, 0.5), 50), (LagConfig(5, 7, 0.3), 40)])
def test_prefill_steps_are_the_mask_rows(cfg, n):
    """Each query's LRSA mask row is exactly what the real cache held when its chunk was read, cut causally."""
    k, v = random_kv(2, n)
    kept = keep_mask(k[None], v[None], cfg)[0]
    for head in range(2):
        steps = prefill_steps(k, v, cfg, kv_head=head)
        visible = visibility_from_keep(kept[None], cfg)[0, head]
        assert [(s.start, s.stop) for s in steps][0] == (0, min(n, cfg.min_compressible_length))
        assert steps[-1].stop == n and steps[0].before.sum() == 0
        for s in steps:
            for q in range(s.start, s.stop):
                assert torch.equal(visible[q], s.used & (torch.arange(n) <= q)), (s.chunk, q)
        assert torch.equal(steps[-1].after, kept[head]), "recursive prefill keeps what one-shot LagKV keeps"
        for s in steps[1:]:
            assert s.tail_after == max(s.tail_before, s.tail_after) and s.after.sum() <= s.used.sum()


def test_prefill_steps_validate():
    k, v = random_kv(2, 40)
    with pytest.raises(ValueError, match="H_kv, N, d"):
        prefill_steps(k[None], v[None], CFG)
    with pytest.raises(ValueError, match="kv_head"):
        prefill_steps(k, v, CFG, kv_head=2)


def test_storyboard_figure_codes():
    k, v = random_kv(3, 128)
    kept = keep_mask(k[None], v[None], CFG)[0, 1]
    steps = prefill_steps(k, v, CFG, kv_head=1)
    fig = prefill_storyboard_figure(steps, kept, CFG, chunks=(2, 3, 4), tokens=[f"t{i}" for i in range(128)])
    assert isinstance(fig, go.Figure) and len(fig.data) == 6
    assert [t.meta for t in fig.data[:2]] == [{"chunk": 2, "panel": "cache"}, {"chunk": 2, "panel": "mask"}]
    width = steps[3].stop  # chunk 4 ends the key axis
    for i, c in enumerate((2, 3, 4)):
        s = steps[c - 1]
        strip, rows = torch.tensor(fig.data[2 * i].z), torch.tensor(fig.data[2 * i + 1].z)
        assert strip.shape == (3, width) and rows.shape == (s.stop - s.start, width)
        before, used, after = strip
        # the last mask row of the chunk IS the "attended" strip (same codes, key for key)
        assert torch.equal(rows[-1], used)
        assert set(before[s.start:].tolist()) == {FUTURE} and set(used[s.start:s.stop].tolist()) == {OWN}
        assert set(before[:CFG.sink_size].tolist()) == {SINK}
        lag_start = CFG.sink_size + (c - 1) * CFG.lag_size  # partition c - 1: stored whole while chunk c is read
        assert set(used[lag_start:s.start].tolist()) == {LAGGING}
        evicted_now = (after[lag_start:s.start] == EVICTED).sum().item()
        assert evicted_now == CFG.lag_size - CFG.top_k, "compressing after the chunk thins partition c - 1 to top-k"
        assert set(after[s.start:s.stop].tolist()) == {LAGGING}
        assert (used[CFG.sink_size:lag_start] == SELECTED).sum().item() == (c - 1) * CFG.top_k
    with pytest.raises(ValueError, match="chunks"):
        prefill_storyboard_figure(steps, kept, CFG, chunks=(99,))


def test_hidden_attention_mass_and_figure():
    probs = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0], [0.2, 0.3, 0.5]])
    visible = torch.tensor([[True, False, False], [True, True, False], [True, False, True]])
    torch.testing.assert_close(hidden_attention_mass(probs, visible), torch.tensor([0.0, 0.0, 0.3]))
    with pytest.raises(ValueError, match="one shape"):
        hidden_attention_mass(probs, visible[:2])
    with pytest.raises(ValueError, match="one shape"):
        hidden_attention_mass(probs, visible.float())


def test_attention_by_region_sums_to_the_rows():
    k, v = random_kv(1, 68)
    kept = keep_mask(k[None], v[None], CFG)[0, 0]
    regions = mask_regions(kept, CFG)
    probs = torch.rand(68, 68).tril()
    probs = probs / probs.sum(-1, keepdim=True)
    by = attention_by_region(probs, regions)
    torch.testing.assert_close(by.sum(-1), torch.ones(68))
    assert by[:, FUTURE].eq(0).all(), "a causal head puts nothing on the future"
    visible = visibility_from_keep(kept[None, None], CFG)[0, 0]
    torch.testing.assert_close(by[:, EVICTED], hidden_attention_mass(probs, visible | ~torch.ones(68, 68).tril().bool()))
    hidden_keys = (regions == EVICTED).sum(-1).float() / torch.arange(1, 69)
    fig = attention_by_region_figure(by, CFG, hidden_keys)
    assert [t.meta["region"] for t in fig.data] == ["evicted (hidden by LRSA)", "sink", "selected", "lagging window",
                                                    "own partition (causal)", None]
    assert list(fig.data[0].y) == pytest.approx((100 * by[:, EVICTED]).tolist())
    assert fig.data[-1].line.dash == "dash" and fig.layout.yaxis.title.text.startswith("%")
    with pytest.raises(ValueError, match="by_region"):
        attention_by_region_figure(by[:, :3], CFG)
    with pytest.raises(ValueError, match="hidden_key_fraction"):
        attention_by_region_figure(by, CFG, hidden_keys[:5])
    with pytest.raises(ValueError, match="one shape"):
        attention_by_region(probs, regions[:5])


def test_comparison_figure_marks_keys_and_partitions():
    n = 60
    probs = torch.rand(n, n).tril()
    probs = probs / probs.sum(-1, keepdim=True)
    fig = attention_comparison_figure(probs, probs, config=CFG, mark_keys=[7])
    assert len(fig.data) == 2, "marks are shapes, not traces"
    marks = [s for s in fig.layout.shapes if s.name == "marked key 7"]
    assert len(marks) == 2 and marks[0].x0 == 6.5 and marks[0].x1 == 7.5
    assert fig.layout.xaxis.ticktext[1] == "p0<br>4" and fig.layout.xaxis2.ticktext[1] == "p0<br>4"
    pooled = attention_comparison_figure(torch.rand(1000, 1000), torch.rand(1000, 1000), max_cells=10_000,
                                         mark_keys=[123])
    mark = next(s for s in pooled.layout.shapes if s.name == "marked key 123")
    assert mark.x0 < 123 < mark.x1 and mark.x1 - mark.x0 == 10, "the pooled block that holds the key"
    with pytest.raises(ValueError, match="mark_keys"):
        attention_comparison_figure(probs, probs, mark_keys=[n])


def test_boundary_gaps_and_flatness_figure():
    from lrsa_viz.viz.agreement_view import GAP_FLOOR, boundary_gaps, flip_effect_figure, score_flatness_figure
    cfg = LagConfig(0, 4, 0.5)  # top_k = 2
    scores = torch.tensor([[0.4, 0.1, 0.3, 0.2], [0.25, 0.25, 0.25, 0.25]])
    torch.testing.assert_close(boundary_gaps(scores, 2), torch.tensor([0.1, 0.0]))
    with pytest.raises(ValueError, match="top_k"):
        boundary_gaps(scores, 4)
    fig = score_flatness_figure(scores, cfg, drift=1e-6, flip_gaps=[1e-7, 0.0])
    assert len(fig.data[0].x) == 8 and len(fig.data[1].x) == 2
    assert list(fig.data[1].x) == pytest.approx([-1.0, torch.tensor(GAP_FLOOR).log10().item()])
    assert list(fig.data[2].x) == pytest.approx([-7.0, -10.0]) and fig.data[2].name == "observed flips"
    vlines = sorted(s.x0 for s in fig.layout.shapes)
    assert vlines == pytest.approx([-6.0, 0.5]), "drift (log10) and the uniform level (1 + v) / L = 2/4"
    assert "log scale" in fig.layout.xaxis2.title.text
    with pytest.raises(ValueError, match="L = 4"):
        score_flatness_figure(torch.rand(3, 5), cfg)
    diff = torch.zeros(40)
    diff[20:] = 1e-2
    eff = flip_effect_figure(diff, LagConfig(4, 8, 0.25), partition=0, tolerance=1e-4)
    assert min(eff.data[0].y) == pytest.approx(1e-9) and max(eff.data[0].y) == pytest.approx(1e-2)
    assert [s.x0 for s in eff.layout.shapes if s.x0 == s.x1] == [19.5], "S + 2L = 20 is the first query that sees it"
    assert [s.y0 for s in eff.layout.shapes if s.y0 == s.y1] == [1e-4]
    assert eff.layout.yaxis.type == "log"
    with pytest.raises(ValueError, match="logit_diff"):
        flip_effect_figure(torch.zeros(0), cfg, 0)
