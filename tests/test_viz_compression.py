"""Compression curve: a real LagKVCache's stored tokens and bytes against METHOD eq. 12, and the figure's data."""
import pytest
import torch

from lrsa_viz import LagConfig, chunked_prefill
from lrsa_viz.viz import compression_curve_figure, kv_bytes_per_token, measure_cache_growth, measure_model_cache_growth
from lrsa_viz.viz.compression import MIB

CFG = LagConfig(3, 8, 0.25)


def random_kv(layers=3, heads=2, n=100, d=8):
    g = torch.Generator().manual_seed(0)
    return torch.randn(layers, heads, n, d, generator=g), torch.randn(layers, heads, n, d, generator=g)


@pytest.mark.parametrize("policy", ["lagkv", "streaming", "random"])
@pytest.mark.parametrize("step", [None, 1, 7])
def test_measured_cache_follows_eq12(policy, step):
    k, v = random_kv()
    g = measure_cache_growth(k, v, CFG, policy=policy, step=step)
    assert g.policy == policy and g.seen[-1] == 100
    assert g.stored == g.theory() == [CFG.retained_length(n) for n in g.seen]
    assert g.bytes_per_token == kv_bytes_per_token(3, 2, 8, torch.float32) == 2 * 3 * 2 * 8 * 4
    assert g.nbytes == [s * g.bytes_per_token for s in g.stored]
    assert g.stored[-1] < 100, "the cache really compressed"


def test_measure_in_bf16_halves_the_bytes():
    k, v = random_kv()
    full, half = measure_cache_growth(k, v, CFG), measure_cache_growth(k, v, CFG, dtype=torch.bfloat16)
    assert half.stored == full.stored and [2 * b for b in half.nbytes] == full.nbytes


def test_model_growth_matches_chunked_prefill(tiny):
    ids = torch.randint(0, 256, (1, 90), generator=torch.Generator().manual_seed(1))
    g = measure_model_cache_growth(tiny, ids, CFG)
    _, cache = chunked_prefill(tiny, ids, CFG)
    assert g.seen == [19, 27, 35, 43, 51, 59, 67, 75, 83, 90]
    assert g.stored == g.theory() and g.stored[-1] == max(cache.stored_lengths())
    assert g.nbytes[-1] == cache.nbytes()
    assert g.bytes_per_token == 2 * 2 * 2 * 16 * 4  # tiny: 2 layers, 2 KV heads, d = 16, float32


def test_curve_figure_data():
    k, v = random_kv()
    configs = [CFG, LagConfig(3, 8, 0.5)]
    measured = [measure_cache_growth(k, v, c) for c in configs]
    per_token = measured[0].bytes_per_token
    fig = compression_curve_figure(configs, 100, per_token, measured)
    kinds = [t.meta["kind"] for t in fig.data]
    assert kinds == ["theory"] * 4 + ["dense"] * 2 + ["measured"] * 4
    theory_tokens = fig.data[0]
    assert list(theory_tokens.x) == list(range(101))
    assert list(theory_tokens.y) == [CFG.retained_length(n) for n in range(101)]
    assert list(fig.data[2].y) == [LagConfig(3, 8, 0.5).retained_length(n) for n in range(101)]
    assert fig.data[1].y[100] == pytest.approx(CFG.retained_length(100) * per_token / MIB)
    assert list(fig.data[4].y) == list(range(101))
    assert list(fig.data[6].y) == measured[0].stored and list(fig.data[7].y) == [b / MIB for b in measured[0].nbytes]
    # measured points lie on the theory curve
    assert all(theory_tokens.y[x] == y for x, y in zip(fig.data[6].x, fig.data[6].y))


def test_curve_figure_samples_long_axes():
    fig = compression_curve_figure([LagConfig()], 100_000, 46_080, max_points=1000)
    assert len(fig.data[0].x) <= 1001 and fig.data[0].x[-1] == 100_000


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_length=0), "max_length"), (dict(max_length=10, bytes_per_token=0), "bytes_per_token"),
])
def test_curve_figure_validates(kwargs, match):
    args = dict(configs=[CFG], max_length=10, bytes_per_token=8) | kwargs
    with pytest.raises(ValueError, match=match):
        compression_curve_figure(**args)


def test_measure_validates():
    k, v = random_kv()
    with pytest.raises(ValueError, match="step"):
        measure_cache_growth(k, v, CFG, step=0)
    with pytest.raises(ValueError, match="n_layers, H_kv, N, d"):
        measure_cache_growth(k[0], v[0], CFG)
    with pytest.raises(ValueError, match="input_ids"):
        measure_model_cache_growth(None, torch.zeros(2, 5, dtype=torch.long), CFG)


def test_prefix_agreement_and_answer_figure():
    from lrsa_viz.viz import Answer, answer_comparison_figure, prefix_agreement
    assert prefix_agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 0.5
    assert prefix_agreement([1, 2], [1, 2, 3]) == 1.0 and prefix_agreement([1, 2], [5]) == 0.0
    with pytest.raises(ValueError, match="reference"):
        prefix_agreement([], [1])
    full = Answer("full", None, [1, 2, 3, 4], "Bingley", 100)
    answers = [Answer("lagkv", 0.5, [1, 2, 3, 4], "Bingley", 60), Answer("lagkv", 0.25, [1, 2, 0, 0], "Bi", 40),
               Answer("streaming", 0.5, [7], "no", 60), Answer("streaming", 0.25, [1, 0], "B", 40)]
    fig = answer_comparison_figure(answers, full)
    assert [t.name for t in fig.data] == ["lagkv", "streaming"]
    assert list(fig.data[0].x) == ["r=0.5", "r=0.25"] and list(fig.data[0].y) == [1.0, 0.5]
    assert list(fig.data[1].y) == [0.0, 0.25]


def test_kept_fraction_figure_is_eq12_over_n():
    from lrsa_viz.viz.compression import CacheGrowth, kept_fraction_figure
    configs = [LagConfig(3, 8, 0.5), LagConfig(3, 8, 0.25)]
    k, v = random_kv(n=100)
    measured = [measure_cache_growth(k, v, c) for c in configs]
    point = CacheGrowth(configs[1], "lagkv, after a prompt", [57], [configs[1].retained_length(57)], [0], 1)
    fig = kept_fraction_figure(configs, 300, measured + [point, point], mark_lengths=[57, 57, 90])
    theory = [t for t in fig.data if t.meta["kind"] == "theory"]
    limits = [t for t in fig.data if t.meta["kind"] == "limit"]
    dots = [t for t in fig.data if t.meta["kind"] == "measured"]
    assert len(theory) == 2 and len(limits) == 2 and len(dots) == 4
    for t, c in zip(theory, configs):
        for n, y in zip(t.x, t.y):
            assert y == pytest.approx(100 * c.retained_length(n) / n)
        assert t.y[-1] > 100 * c.top_k / c.lag_size, "eq. 12 / n stays above its limit"
    assert list(limits[1].y) == [25.0, 25.0]
    for t, g in zip(dots, measured):
        assert list(t.y) == pytest.approx([100 * s / n for s, n in zip(g.stored, g.seen)])
    assert [t.showlegend for t in dots[2:]] == [True, False], "one legend entry per kind of measurement"
    assert len([s for s in fig.layout.shapes if s.type == "line"]) == 2, "each marked length once"
    assert fig.layout.yaxis.title.text.startswith("kept fraction")
    with pytest.raises(ValueError, match="max_length"):
        kept_fraction_figure(configs, 0)


def test_answer_views_show_the_changed_word():
    from lrsa_viz.viz.generation import (Answer, answer_comparison_figure, answer_correctness_figure, answer_diff_view,
                                         common_prefix, kept_share)
    assert common_prefix("is called a cache.", "is called a memory.") == len("is called a ")
    assert common_prefix("a cache", "a car") == 2, "cut back to the start of the differing word"
    assert common_prefix("same", "same") == 4 and common_prefix("abc", "xyz") == 0
    full = Answer("full", None, [1, 2, 3, 4], "called a cache.", 1000, 100)
    answers = [Answer("lagkv", 0.5, [1, 2, 3, 4], "called a cache.", 700, 67),
               Answer("lagkv", 0.25, [1, 2, 3, 9], "called a <memory>.", 500, 50),
               Answer("streaming", 0.5, [1, 2, 3, 9], "called a memory.", 700, 67),
               Answer("streaming", 0.25, [5], "Cache it", 500, 50)]
    assert kept_share(answers[0], full) == 0.67 and kept_share(Answer("x", 1, [], "", 0), full) is None
    assert answers[3].contains("cache") and not answers[2].contains("cache")
    fig = answer_comparison_figure(answers, full, expected="cache")
    assert list(fig.data[0].text) == ["✓", "✗"] and list(fig.data[1].text) == ["✗", "✓"]
    assert list(fig.layout.xaxis.ticktext) == ["r=0.5<br>cache holds 67%", "r=0.25<br>cache holds 50%"]
    assert "measured share" in fig.layout.xaxis.title.text
    view = answer_diff_view(answers, full, "cache", title="Q")
    assert "&lt;memory&gt;." in view.html and "<memory>" not in view.html, "answers are escaped"
    assert "<span style='background:#fde2a7'>&lt;memory&gt;.</span>" in view.html
    assert view.html.count("<tr>") == 1 + 1 + len(answers) and "67%" in view.html and "75%" in view.html
    rows = [("Q1", "cache", full, answers), ("Q2", "called", full, answers)]
    grid = answer_correctness_figure(rows)
    assert list(grid.data[0].x) == ["full cache", "lagkv r=0.5", "lagkv r=0.25", "streaming r=0.5", "streaming r=0.25"]
    assert list(grid.data[0].z[0]) == [1, 1, 0, 0, 1]
    assert list(grid.data[0].z[1]) == [1, 1, 1, 1, 0]
    with pytest.raises(ValueError, match="same"):
        answer_correctness_figure([("Q1", "x", full, answers), ("Q2", "x", full, answers[:2])])
    with pytest.raises(ValueError, match="at least one"):
        answer_correctness_figure([])
