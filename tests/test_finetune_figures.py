"""Figures of the fine-tuning experiment: traces carry the table's numbers."""
from pathlib import Path

import plotly.graph_objects as go
import pytest

from lrsa_viz.evaluate import read_results
from lrsa_viz.finetune_figures import (ERROR_KINDS, accuracy_by_depth_figure, accuracy_vs_ratio_figure,
                                      compression_label, error_breakdown, error_breakdown_figure, error_kind,
                                      loss_curves_figure, prose_loss_figure, score_kept, score_kept_figure,
                                      suite_task_figure)
from lrsa_viz.qa_data import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "data" / "results" / "finetune_smollm2.json"


def fake_rows():
    rows = []
    for model, base in (("base", 0.2), ("lrsa", 0.9)):
        rows.append({"model": model, "setting": "full", "ratio": 1.0, "exact_match": base, "f1": base,
                     "contains": base, "kv_fraction": 1.0, "predictions": ["1", "2", "9", "9"]})
        for r in (0.5, 0.25):
            for setting in ("lagkv/chunked", "streaming/chunked"):
                rows.append({"model": model, "setting": setting, "ratio": r, "exact_match": base * r, "f1": base,
                             "contains": base, "kv_fraction": r + 0.05, "predictions": ["1", "0", "0", "4"]})
    return rows


def test_accuracy_vs_ratio_traces_hold_the_table():
    fig = accuracy_vs_ratio_figure(fake_rows())
    assert isinstance(fig, go.Figure)
    assert len(fig.data) == 4  # 2 settings x 2 models
    lrsa_lagkv = [t for t in fig.data if t.name == "LRSA fine-tune"][0]
    assert list(lrsa_lagkv.x) == pytest.approx([1.0, 0.55, 0.30]), "x = measured kv_fraction, not r"
    assert list(lrsa_lagkv.y) == pytest.approx([0.9, 0.45, 0.225])
    assert [c[1] for c in lrsa_lagkv.customdata] == ["100% kept (1.0x)", "55% kept (1.8x)", "30% kept (3.3x)"]
    assert [t.showlegend for t in fig.data] == [True, True, False, False]
    with pytest.raises(ValueError, match="metric must be one of"):
        accuracy_vs_ratio_figure(fake_rows(), metric="bleu")
    with pytest.raises(ValueError, match="no results"):
        accuracy_vs_ratio_figure([])


def test_loss_curves():
    curves = [{"run": "full", "step": s, "train_loss": 1 / s, "dev_loss": (0.5 if s == 2 else None)} for s in (1, 2)]
    curves += [{"run": "lrsa", "step": s, "train_loss": 0.0, "dev_loss": None} for s in (1, 2)]
    fig = loss_curves_figure(curves)
    assert [t.name for t in fig.data] == ["full: train", "full: dev", "lrsa: train"]
    seeded = loss_curves_figure([{**c, "seed": s} for s in (0, 1) for c in curves])
    assert [t.name for t in seeded.data][:3] == ["full seed 0: train", "full seed 0: dev", "full seed 1: train"]
    assert list(fig.data[1].y) == [0.5] and min(fig.data[2].y) > 0, "zero loss is clipped for the log axis"
    with pytest.raises(ValueError, match="no training curves"):
        loss_curves_figure([])


def test_accuracy_by_depth_recomputes_from_predictions():
    examples = [{"answer": a, "depth": d} for a, d in (("1", 0.05), ("2", 0.3), ("3", 0.55), ("4", 0.95))]
    fig = accuracy_by_depth_figure(fake_rows(), examples, "lagkv/chunked", 0.5, bins=2)
    assert [t.name for t in fig.data] == ["base model", "LRSA fine-tune"]
    assert list(fig.data[0].y) == [0.5, 0.5]  # "1" right in bin 0, "4" right in bin 1
    full = accuracy_by_depth_figure(fake_rows(), examples, "full", 1.0, bins=4)
    assert list(full.data[0].y) == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="no rows"):
        accuracy_by_depth_figure(fake_rows(), examples, "lagkv/one_shot", 0.5)
    with pytest.raises(ValueError, match="depth"):
        accuracy_by_depth_figure(fake_rows(), [{"answer": "1"}] * 4, "full", 1.0)
    with pytest.raises(ValueError, match="bins must be"):
        accuracy_by_depth_figure(fake_rows(), examples, "full", 1.0, bins=0)


@pytest.mark.skipif(not COMMITTED.exists(), reason="no committed fine-tuning results yet")
def test_committed_results_plot():
    results = read_results(COMMITTED)
    fig = accuracy_vs_ratio_figure(results["rows"])
    assert len(fig.data) == 3 * 4
    assert len(loss_curves_figure(results["curves"]).data) >= 2
    test = read_jsonl(ROOT / results["data"]["path"]) if (ROOT / results["data"]["path"]).exists() else None
    if test is not None and len(test) == results["data"]["n"]:
        accuracy_by_depth_figure(results["rows"], test, "lagkv/chunked", 0.125)


def test_compression_label():
    assert compression_label(0.542) == "54% kept (1.8x)" and compression_label(0.199) == "20% kept (5.0x)"
    with pytest.raises(ValueError, match="kv_fraction must be in"):
        compression_label(0.0)


@pytest.mark.parametrize("prediction, kind", [
    ("4821", "correct"), ("4827", "near miss"), ("3390", "another planted value"), ("8888888888888888", "repeated digits"),
    ("41111111", "repeated digits"), ("40900000", "repeated digits"), ("29000", "wrong length"),
    ("48211", "wrong length"), ("5157", "unplanted value"), ("9999", "repeated digits"), ("Kevin", "other"),
    ("4", "wrong length"), ("", "other")])
def test_error_kinds(prediction, kind):
    assert error_kind(prediction, "4821", others=["3390", "7712"]) == kind


def test_error_breakdown_and_figure():
    counts = error_breakdown(["4821", "4822", "9999999"], ["4821", "4821", "4821"])
    assert list(counts) == list(ERROR_KINDS) and counts["correct"] == counts["near miss"] == counts["repeated digits"] == 1
    assert sum(counts.values()) == 3
    fig = error_breakdown_figure({"a": counts, "b": counts})
    assert [t.name for t in fig.data] == list(ERROR_KINDS) and list(fig.data[0].x) == [1, 1]
    with pytest.raises(ValueError, match="one entry per example"):
        error_breakdown(["1"], ["1", "2"])


def fake_summary():
    out = []
    for ctx in (4000, 8000):
        for model, base in (("full", 0.8), ("lrsa", 0.9)):
            out.append(dict(task="multi_key", context_tokens=ctx, model=model, setting="full", ratio=1.0,
                            metric="exact_match", mean=base, std=0.02, kv_fraction=1.0, n_seeds=3, n_per_seed=100))
            for r, kv in ((0.5, 0.55), (0.25, 0.31)):
                for setting in ("lagkv/chunked", "snapkv/chunked"):
                    out.append(dict(task="multi_key", context_tokens=ctx, model=model, setting=setting, ratio=r,
                                    metric="exact_match", mean=base * r, std=0.05, kv_fraction=kv, n_seeds=3,
                                    n_per_seed=100))
    return out


def fake_suite_rows():
    """Two tasks, one length, two seeds: full-cache scores 0.8/0.4 (full) and 0.5/0.0 (LRSA, seed 1 scores 0)."""
    full_scores = {("full", 0): 0.8, ("full", 1): 0.4, ("lrsa", 0): 0.5, ("lrsa", 1): 0.0}
    rows = []
    for task in ("multi_key", "variable_tracking"):
        for (model, seed), f in full_scores.items():
            common = dict(task=task, context_tokens=4000, seed=seed, model=model)
            rows.append(dict(common, setting="full", ratio=1.0, score=f, kv_fraction=1.0))
            for r, kv in ((0.5, 0.54), (0.25, 0.30 + 0.01 * seed)):
                rows.append(dict(common, setting="lagkv/chunked", ratio=r, score=f * r + 0.1 * seed, kv_fraction=kv))
    return rows


def test_score_kept_is_the_share_of_the_models_own_full_cache_score():
    kept = score_kept(fake_suite_rows())
    assert len(kept) == 2 * 2 * 2  # tasks x models x ratios
    full_025 = next(d for d in kept if d["task"] == "multi_key" and d["model"] == "full" and d["ratio"] == 0.25)
    # by hand: scores 0.8 * 0.25 = 0.2 and 0.4 * 0.25 + 0.1 = 0.2 over full-cache scores 0.8 and 0.4
    assert full_025["kept"] == pytest.approx(0.2 / 0.6) and full_025["per_seed"] == pytest.approx([0.25, 0.5])
    assert full_025["seeds"] == [0, 1] and full_025["kv_fraction"] == pytest.approx(0.305)
    lrsa_05 = next(d for d in kept if d["task"] == "multi_key" and d["model"] == "lrsa" and d["ratio"] == 0.5)
    assert lrsa_05["kept"] == pytest.approx((0.25 + 0.1) / 2 / 0.25) and lrsa_05["per_seed"][1] is None  # seed 1: 0
    with pytest.raises(ValueError, match="setting: no rows"):
        score_kept(fake_suite_rows(), setting="snapkv/chunked")
    with pytest.raises(ValueError, match="no full-cache row"):
        score_kept([r for r in fake_suite_rows() if not (r["setting"] == "full" and r["model"] == "lrsa")])


def test_score_kept_figure_anchors_at_the_full_cache():
    fig = score_kept_figure(fake_suite_rows())
    assert isinstance(fig, go.Figure)
    assert len(fig.data) == 2 * 2 * 2  # tasks x models x (line, seed dots)
    line = next(t for t in fig.data if t.name == "full-attention fine-tune, 4000 tokens" and t.mode == "lines+markers")
    assert list(line.x) == pytest.approx([1.0, 0.54, 0.305]) and line.y[0] == 1.0
    assert list(line.y[1:]) == pytest.approx([(0.4 + 0.3) / 2 / 0.6, 0.2 / 0.6])
    dots = next(t for t in fig.data if t.name == "LRSA fine-tune, 4000 tokens, per seed")
    assert len(dots.x) == 2, "the seed whose full-cache score is 0 has no ratio"
    assert sum(t.showlegend for t in fig.data) == 2, "one legend entry per model and length"


def test_suite_task_figure_has_error_bars_at_the_measured_fraction():
    fig = suite_task_figure(fake_summary(), "multi_key")
    assert len(fig.data) == 2 * 2 * 2  # contexts x models x (lagkv chunked, snapkv chunked)
    lrsa = [t for t in fig.data if t.name.startswith("LRSA fine-tune, LagKV, chunk")][0]
    assert list(lrsa.x) == [1.0, 0.55, 0.31] and list(lrsa.y) == pytest.approx([0.9, 0.45, 0.225])
    assert list(lrsa.error_y.array) == [0.02, 0.05, 0.05]
    assert {t.visible for t in fig.data if "SnapKV" in t.name} == {"legendonly"}
    assert sum(t.showlegend for t in fig.data) == 4, "one legend entry per model and setting"
    with pytest.raises(ValueError, match="no summary rows"):
        suite_task_figure(fake_summary(), "frequent_word")


def test_prose_loss_figure():
    prose = [{"model": m, "seed": s, "loss": 2.0 + 0.1 * s + (m == "lrsa")} for m in ("base", "lrsa") for s in (0, 1, 2)]
    fig = prose_loss_figure(prose)
    bars = [t for t in fig.data if t.type == "bar"]
    assert [b.y[0] for b in bars] == pytest.approx([2.1, 3.1]) and bars[0].error_y.array[0] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="no prose"):
        prose_loss_figure([])
