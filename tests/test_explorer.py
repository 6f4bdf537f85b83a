"""Drive the explorer's callbacks by setting widget values; check the figures' data and when the model runs."""
import pytest
import torch

from lrsa_viz import LagConfig
from lrsa_viz.viz import capture_kv, read_passage, span_retention
from lrsa_viz.viz.explorer import LagKVExplorer

LAYERS = [0, 7, 29]


@pytest.fixture(scope="module")
def texts():
    return {"gettysburg": read_passage("gettysburg_address"), "dickens": read_passage("tale_of_two_cities_opening")}


@pytest.fixture()
def explorer(smollm2, texts):
    model, tok = smollm2
    return LagKVExplorer(model, tok, texts, config=LagConfig(4, 32, 0.25), layers=LAYERS, max_tokens=200)


def kept_markers(ex):
    return len(ex.figures["lag_scores"].data[1].x)


def retained_rows(ex):
    """Tokens kept per (layer, KV head) row of the retained heatmap, in 'layer x head' mode."""
    return torch.tensor(ex.figures["retained"].data[0].z).sum(-1)


def test_initial_views(explorer):
    ex = explorer
    assert set(ex.figures) == {"lag_scores", "retained", "grid", "compression"}
    assert ex.model_runs == 1 and ex.error == ""
    n = ex.capture().n_tokens
    assert n == 200
    cfg = ex.config
    assert kept_markers(ex) == (cfg.num_partitions(n) - 1) * cfg.top_k
    z = torch.tensor(ex.figures["retained"].data[0].z)  # per layer: fraction of KV heads keeping each token
    assert z.shape == (3, 200)
    torch.testing.assert_close(z.sum(-1), torch.full((3,), float(cfg.retained_length(n))))
    assert "dense forward" in ex.status.value and "token 0:" in ex.figures["retained"].data[0].text[0][0]
    # each Output widget shows its figure as plotly's MIME bundle
    for name, out in ex.outputs.items():
        (shown,) = out.outputs
        spec = shown["data"]["application/vnd.plotly.v1+json"]
        assert spec["data"][0].get("z") == ex.figures[name].to_plotly_json()["data"][0].get("z") or name == "compression"
    spec = ex.outputs["retained"].outputs[0]["data"]["application/vnd.plotly.v1+json"]
    assert torch.equal(torch.tensor(spec["data"][0]["z"]), z)


def test_sliders_rescore_without_running_the_model(explorer):
    ex = explorer
    n = 200
    ex.rows.value = "layer_head"
    assert retained_rows(ex).eq(LagConfig(4, 32, 0.25).retained_length(n)).all()
    before = ex.figures["lag_scores"]
    ex.lag.value = 16
    cfg = LagConfig(4, 16, 0.25)
    assert ex.config == cfg and ex.figures["lag_scores"] is not before
    shown = ex.outputs["lag_scores"].outputs[0]["data"]["application/vnd.plotly.v1+json"]
    assert len(shown["data"][1]["x"]) == 44, "the Output widget shows the new figure"
    assert kept_markers(ex) == (cfg.num_partitions(n) - 1) * cfg.top_k == 44
    assert retained_rows(ex).eq(cfg.retained_length(n)).all()
    ex.ratio.value = 0.5
    cfg = LagConfig(4, 16, 0.5)
    assert kept_markers(ex) == 11 * 8 and retained_rows(ex).eq(cfg.retained_length(n)).all()
    ex.sink.value = 20
    cfg = LagConfig(20, 16, 0.5)
    assert retained_rows(ex).eq(cfg.retained_length(n)).all()
    z = torch.tensor(ex.figures["retained"].data[0].z)
    assert z[:, :20].eq(1).all(), "the sink is kept by every layer and head"
    theory = ex.figures["compression"].data[0]
    assert list(theory.y) == [cfg.retained_length(x) for x in theory.x]
    measured = [t for t in ex.figures["compression"].data if t.meta["kind"] == "measured" and t.meta["axis"] == "tokens"][0]
    assert list(measured.y) == [cfg.retained_length(x) for x in measured.x]
    assert ex.model_runs == 1, "dense K/V are captured once per text"


def test_layer_and_head_select_the_lag_scores(explorer, smollm2, texts):
    ex = explorer
    model, tok = smollm2
    ex.layer.value = 29
    ex.head.value = 2
    cap = capture_kv(model, tok, texts["gettysburg"], None, layers=LAYERS, max_tokens=200)
    expected = cap.scores(ex.config)[2, 2]
    torch.testing.assert_close(torch.tensor(ex.figures["lag_scores"].data[0].z), expected)
    assert "layer 29, KV head 2" in ex.figures["lag_scores"].layout.title.text
    assert ex.model_runs == 1


def test_focus_range_sets_the_grid(explorer):
    ex = explorer
    ex.focus.value = (40, 59)
    kept = ex.kept(ex.capture(), ex.config)
    z = torch.tensor(ex.figures["grid"].data[0].z)
    assert z.shape == (3, 3)
    torch.testing.assert_close(z, span_retention(kept, (40, 60)))
    assert list(ex.figures["grid"].data[0].y) == ["L0", "L7", "L29"]


def test_text_change_runs_the_model_once(explorer):
    ex = explorer
    ex.text.value = "dickens"
    assert ex.model_runs == 2
    n = ex.capture().n_tokens
    assert n < 200 and ex.focus.max == n - 1
    assert torch.tensor(ex.figures["retained"].data[0].z).shape[1] == n
    ex.text.value = "gettysburg"
    assert ex.model_runs == 2, "a text seen before comes from the cache"


def test_lrsa_source_reruns_on_config_change(explorer, smollm2, texts):
    ex = explorer
    model, tok = smollm2
    ex.source.value = "lrsa"
    assert ex.model_runs == 2 and "LRSA forward" in ex.status.value
    ex.lag.value = 16
    assert ex.model_runs == 3, "LRSA K/V depend on the config"
    cfg = ex.config
    cap = capture_kv(model, tok, texts["gettysburg"], cfg, layers=LAYERS, max_tokens=200)
    ex.rows.value = "layer_head"
    z = torch.tensor(ex.figures["retained"].data[0].z)
    assert torch.equal(z.bool(), cap.keep_mask(cfg).reshape(9, 200))
    dense = capture_kv(model, tok, texts["gettysburg"], None, layers=LAYERS, max_tokens=200)
    assert not torch.equal(z.bool(), dense.keep_mask(cfg).reshape(9, 200)), "LRSA and dense K/V select differently"
    ex.source.value = "dense"
    assert ex.model_runs == 3, "the dense K/V of this text are still cached"
    assert torch.equal(torch.tensor(ex.figures["retained"].data[0].z).bool(), dense.keep_mask(cfg).reshape(9, 200))


def test_invalid_settings_show_an_error_and_keep_the_figures(explorer):
    ex = explorer
    figures = dict(ex.figures)
    ex.lag.value = 2  # int(0.25 * 2) = 0 tokens kept per partition: invalid
    assert "ratio * lag_size" in ex.error and "Invalid settings" in ex.status.value
    assert all(ex.figures[k] is figures[k] for k in figures), "nothing is redrawn from invalid settings"
    ex.head.value = 1  # still invalid: still nothing redrawn
    assert all(ex.figures[k] is figures[k] for k in figures)
    ex.ratio.value = 0.5
    assert ex.error == "" and ex.config == LagConfig(4, 2, 0.5)
    assert ex.figures["lag_scores"] is not figures["lag_scores"]
    assert kept_markers(ex) == (ex.config.num_partitions(200) - 1) * 1


def test_short_text_shows_a_message(smollm2):
    model, tok = smollm2
    ex = LagKVExplorer(model, tok, {"short": "It was the best of times, it was the worst of times."},
                       config=LagConfig(4, 32, 0.25), layers=[0])
    assert "nothing is scored" in ex.figures["lag_scores"].layout.annotations[0].text
    assert torch.tensor(ex.figures["retained"].data[0].z).eq(1).all(), "short texts are kept whole"


def test_explorer_rejects_bad_arguments(smollm2):
    model, tok = smollm2
    with pytest.raises(ValueError, match="texts"):
        LagKVExplorer(model, tok, {})
    with pytest.raises(ValueError, match="source"):
        LagKVExplorer(model, tok, {"a": "text"}, source="sparse")
    with pytest.raises(ValueError, match="max_tokens"):
        LagKVExplorer(model, tok, {"a": "text"}, max_tokens=1)


def test_show_displays_the_current_figures(explorer, monkeypatch):
    """`show` puts the figures themselves in the output (a static render shows them; widgets it does not)."""
    import lrsa_viz.viz.explorer as module
    shown = []
    monkeypatch.setattr(module, "display", shown.append)
    explorer.show()
    assert shown == [explorer.figures[name] for name in ("lag_scores", "retained", "grid", "compression")]
    shown.clear()
    explorer.ratio.value = 0.5
    explorer.show(["retained"])
    assert shown == [explorer.figures["retained"]] and "top 16 of every 32" in shown[0].layout.annotations[0].text
    with pytest.raises(ValueError, match="views"):
        explorer.show(["mask"])


def test_retained_view_marks_the_partitions_of_the_current_config(explorer):
    ex = explorer
    meta = ex.figures["retained"].data[0].meta
    n, cfg = ex.capture().n_tokens, ex.config
    expected = [cfg.sink_size + p * cfg.lag_size for p in range(cfg.num_partitions(n) + 1)]
    assert list(meta["partition_boundaries"]) == expected
    ex.lag.value = 16
    meta = ex.figures["retained"].data[0].meta
    p16 = LagConfig(4, 16, 0.25).num_partitions(n)  # 12 partitions of 16 after the sink of 4
    assert list(meta["regions"]["kept_whole"]) == [4 + 16 * (p16 - 1), n]
