"""Standalone HTML export: one file, plotly.js embedded, nothing loaded from the network; passages."""
import re

import plotly.graph_objects as go
import pytest
import torch

from lrsa_viz.viz import HtmlView, coloured_text, export_html, long_text, passage_names, read_passage
from lrsa_viz.viz.passages import PASSAGES_DIR


def test_export_is_offline(tmp_path):
    figs = [go.Figure(go.Heatmap(z=[[1, 2], [3, 4]])), go.Figure(go.Scatter(x=[1, 2], y=[3, 4]))]
    view = coloured_text(["a", " b"], torch.tensor([0.2, 0.9]), title="coloured")
    path = export_html(figs + [view], tmp_path / "sub" / "views.html", title="My <views>")
    page = path.read_text(encoding="utf-8")
    scripts = re.findall(r"<script[^>]*>", page)
    assert scripts and not any("src=" in s for s in scripts), "no script is loaded from elsewhere"
    outside_scripts = re.sub(r"<script[^>]*>.*?</script>", "", page, flags=re.S)
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", outside_scripts), "no network resource"
    assert "<link" not in outside_scripts
    assert "Plotly.newPlot" in page and len(page) > 3_000_000, "plotly.js itself is embedded"
    assert page.count("lrsa-view-0") >= 1 and page.count("lrsa-view-1") >= 1
    assert "lrsa-coloured-text" in page and "My &lt;views&gt;" in page
    one = export_html(figs[0], tmp_path / "one.html").read_text(encoding="utf-8")
    assert len(page) - len(one) < 100_000, "plotly.js is embedded once, not once per figure"


def test_export_single_figure_and_errors(tmp_path):
    path = export_html(go.Figure(), tmp_path / "one.html")
    assert path.exists()
    with pytest.raises(ValueError, match="at least one"):
        export_html([], tmp_path / "none.html")
    with pytest.raises(ValueError, match=r"views\[1\]"):
        export_html([go.Figure(), "text"], tmp_path / "bad.html")
    path = export_html(HtmlView("<p>only text</p>"), tmp_path / "text.html")
    assert "<p>only text</p>" in path.read_text()


def test_passages_are_listed_and_read():
    names = passage_names()
    for expected in ("kv_cache_notes", "gettysburg_address", "declaration_of_independence",
                     "pride_and_prejudice_chapter1", "tale_of_two_cities_opening"):
        assert expected in names
    assert read_passage("gettysburg_address").startswith("Four score and seven years ago")
    assert (PASSAGES_DIR / "README.md").exists()
    with pytest.raises(ValueError, match="kv_cache_notes"):
        read_passage("moby_dick")


def test_long_text_reaches_the_length(smollm2):
    _, tok = smollm2
    text = long_text(tok, 6000)
    n = len(tok(text, add_special_tokens=False).input_ids)
    assert n >= 6000
    short = long_text(tok, 10, names=["tale_of_two_cities_opening"])
    assert short == read_passage("tale_of_two_cities_opening").strip()
    with pytest.raises(ValueError, match="n_tokens"):
        long_text(tok, 0)
