"""Performance figures (lrsa_viz.fast.figures): the linear kept-fraction view and the defined bound curves."""
from pathlib import Path

import pytest

from lrsa_viz import LagConfig
from lrsa_viz.fast.cost import attention_flops, dense_causal_pairs, lrsa_visible_pairs
from lrsa_viz.fast.figures import bound_rate_tflops, kept_fraction_figure, load_benchmark, measured_attention_figure

BENCH = Path(__file__).resolve().parents[1] / "data" / "results" / "bench_lrsa_h200.json"


def test_kept_fraction_figure_is_linear_and_approaches_r():
    seq_lens = [1024, 4096, 16384, 65536]
    fig = kept_fraction_figure(seq_lens, ratios=(0.25,), sink=16, lag=128)
    assert fig.layout.xaxis.type in (None, "linear") and fig.layout.yaxis.type in (None, "linear")
    kept = [t for t in fig.data if t.meta and t.meta["quantity"] == "kv_kept"][0]
    pairs = [t for t in fig.data if t.meta and t.meta["quantity"] == "pairs"][0]
    cfg = LagConfig(16, 128, 0.25)
    assert list(kept.y) == [cfg.retained_length(n) / n for n in seq_lens]
    assert list(pairs.y) == [lrsa_visible_pairs(n, cfg) / dense_causal_pairs(n) for n in seq_lens]
    # both stay above r and fall towards it: the fixed S + L + remainder (and the lagging partition) weigh less
    for y in (kept.y, pairs.y):
        assert all(a > b > 0.25 for a, b in zip(y, y[1:]))
    limits = [t for t in fig.data if t.name == "limit r=0.25"]
    assert len(limits) == 2 and all(list(t.y) == [0.25, 0.25] for t in limits)
    with pytest.raises(ValueError, match="seq_lens"):
        kept_fraction_figure([])


def test_bound_curves_are_defined_in_the_legend():
    bench = load_benchmark(BENCH)
    rate = bound_rate_tflops(bench)
    assert rate == bench["matmul_bf16_tflops"]
    # a live result has no recorded rate: it is read back from the bounds themselves
    live = {k: v for k, v in bench.items() if k != "matmul_bf16_tflops"}
    assert bound_rate_tflops(live) == pytest.approx(rate, rel=1e-9)
    fig = measured_attention_figure(bench)
    bounds = [t for t in fig.data if t.meta["method"].startswith("bound")]
    assert bounds and all(f"FLOPs ÷ {rate:.0f} TFLOP/s" in t.name and t.line.dash == "dash" for t in bounds)
    assert all(t.name.endswith("(measured)") for t in fig.data if t not in bounds)
    assert "matmul rate" in fig.layout.title.text
    row = bench["attention"][0]
    dense = [t for t in bounds if t.meta["method"] == "bound dense"][0]
    n, batch = row["n"], row["batch"]
    seconds = attention_flops(dense_causal_pairs(n), 9, 64, backward=True) * batch / (rate * 1e12)
    expected_ns = seconds / (batch * n) * 1e9
    assert dense.x[0] == n and dense.y[0] == pytest.approx(expected_ns, rel=1e-9)
    with pytest.raises(ValueError, match="attention rows"):
        bound_rate_tflops({})
