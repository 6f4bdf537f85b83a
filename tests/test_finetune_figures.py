"""Figures of the fine-tuning experiment: traces carry the table's numbers."""
from pathlib import Path

import plotly.graph_objects as go
import pytest

from lrsa_viz.evaluate import read_results
from lrsa_viz.finetune_figures import accuracy_by_depth_figure, accuracy_vs_ratio_figure, loss_curves_figure
from lrsa_viz.qa_data import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "data" / "results" / "finetune_smollm2.json"


def fake_rows():
    rows = []
    for model, base in (("base", 0.2), ("lrsa", 0.9)):
        rows.append({"model": model, "setting": "full", "ratio": 1.0, "exact_match": base, "f1": base,
                     "contains": base, "predictions": ["1", "2", "9", "9"]})
        for r in (0.5, 0.25):
            for setting in ("lagkv/chunked", "streaming/chunked"):
                rows.append({"model": model, "setting": setting, "ratio": r, "exact_match": base * r, "f1": base,
                             "contains": base, "predictions": ["1", "0", "0", "4"]})
    return rows


def test_accuracy_vs_ratio_traces_hold_the_table():
    fig = accuracy_vs_ratio_figure(fake_rows())
    assert isinstance(fig, go.Figure)
    assert len(fig.data) == 4  # 2 settings x 2 models
    lrsa_lagkv = [t for t in fig.data if t.name == "lrsa"][0]
    assert list(lrsa_lagkv.x) == ["full KV", "2x (r=0.5)", "4x (r=0.25)"]
    assert list(lrsa_lagkv.y) == pytest.approx([0.9, 0.45, 0.225])
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
    assert list(fig.data[1].y) == [0.5] and min(fig.data[2].y) > 0, "zero loss is clipped for the log axis"
    with pytest.raises(ValueError, match="no training curves"):
        loss_curves_figure([])


def test_accuracy_by_depth_recomputes_from_predictions():
    examples = [{"answer": a, "depth": d} for a, d in (("1", 0.05), ("2", 0.3), ("3", 0.55), ("4", 0.95))]
    fig = accuracy_by_depth_figure(fake_rows(), examples, "lagkv/chunked", 0.5, bins=2)
    assert [t.name for t in fig.data] == ["base", "lrsa"]
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
