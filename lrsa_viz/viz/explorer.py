"""`LagKVExplorer`: an ipywidgets dashboard over the figure functions of `lrsa_viz.viz`.

Controls: a text, the K/V source, sliders for lag size L, kept ratio r and sink size S, dropdowns for layer and KV
head, a token range for the retention grid. Views: lag scores of one layer/head, the retained-token heatmap (token
text on hover), the layer x KV-head retention grid, the compression curve. Every callback is a method that can be
driven without a browser (set a widget's ``.value``; pytest does).

Which K/V are shown (also stated in the dashboard):
- ``source="dense"`` (default): LagKV selections computed on the K/V of a DENSE forward, captured once per text.
  Moving S, L or r only re-scores the cached K/V (no model run). This is what LagKV compression of an ordinary
  model's cache sees at one-shot compression.
- ``source="lrsa"``: the K/V of a forward under the LRSA mask of the current config. Layers >= 1 depend on the mask
  of the layers below, so every change of S, L or r re-runs the model (results are cached per config).
"""
from __future__ import annotations

import json
from collections import OrderedDict
from typing import Mapping, Sequence

import ipywidgets as widgets
import plotly.graph_objects as go
import torch
from IPython.display import display

from ..checks import check_int
from ..config import LagConfig
from .capture import KVCapture, capture_kv
from .cells import MAX_CELLS
from .compression import compression_curve_figure, measure_cache_growth
from .lag_scores import lag_score_figure
from .retention import retained_token_figure, retention_grid_figure

SOURCES = {"dense": "dense forward (re-scored on each change, no model run)",
           "lrsa": "LRSA forward with the current config (re-runs the model on each change)"}
VIEWS = ("lag_scores", "retained", "grid", "compression")


def figure_output(fig: go.Figure) -> dict:
    """A plotly figure as one Jupyter ``display_data`` output (plotly's own MIME type, rendered by JupyterLab)."""
    spec = json.loads(fig.to_json())
    spec.setdefault("config", {})
    title = fig.layout.title.text or "plotly figure"
    return {"output_type": "display_data", "metadata": {},
            "data": {"application/vnd.plotly.v1+json": spec, "text/plain": f"<Figure: {title}>"}}


def _message_figure(message: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_layout(xaxis_visible=False, yaxis_visible=False, height=250)
    return fig


class LagKVExplorer:
    """Interactive LagKV / LRSA explorer for one model and a few texts.

    Args:
        model, tokenizer: a supported causal LM (e.g. from `lrsa_viz.load_model`) and its tokenizer.
        texts: {name: text}; each is cut to its first ``max_tokens`` tokens.
        config: the initial LagConfig (sliders start there).
        source: "dense" or "lrsa" (module docstring).
        layers: model layers to offer (default all).
        max_cells: cap on the cells of each heatmap.
        max_captures: model runs kept in memory (least recently used are dropped).
    Attributes:
        figures: {"lag_scores" | "retained" | "grid" | "compression": go.Figure}, the views as last drawn.
        model_runs: how many forward passes the explorer has run (tests use it to check caching).
        error: the message of the last rejected control setting ("" when the settings are valid).
        widget: the dashboard (``display(explorer.widget)``, or just put the explorer last in a cell); `show`
            displays the current figures as plain outputs (visible in static renders too).
    """

    def __init__(
        self,
        model,
        tokenizer,
        texts: Mapping[str, str],
        *,
        config: LagConfig | None = None,
        source: str = "dense",
        max_tokens: int = 1024,
        layers: Sequence[int] | None = None,
        max_cells: int = MAX_CELLS,
        max_captures: int = 8,
    ):
        if not texts:
            raise ValueError("texts must hold at least one {name: text} entry")
        if source not in SOURCES:
            raise ValueError(f"source must be one of {list(SOURCES)}, got {source!r}")
        check_int("max_tokens", max_tokens, 2)
        config = config or LagConfig(sink_size=16, lag_size=64, ratio=0.25)
        self.model, self.tokenizer, self.texts = model, tokenizer, dict(texts)
        self.max_tokens, self.layers, self.max_cells, self.max_captures = max_tokens, layers, max_cells, max_captures
        self.model_runs = 0
        self.error = ""
        self.figures: dict[str, go.Figure] = {}
        self._captures: OrderedDict[tuple, KVCapture] = OrderedDict()
        self._kept: tuple | None = None  # (capture id, config, kept mask)
        self._updating = False

        style = dict(style={"description_width": "90px"}, layout=widgets.Layout(width="330px"))
        self.text = widgets.Dropdown(options=list(self.texts), description="text", **style)
        self.source = widgets.ToggleButtons(options=[("dense K/V", "dense"), ("LRSA K/V", "lrsa")], value=source,
                                            description="K/V from", style={"description_width": "90px"})
        self.lag = widgets.IntSlider(value=config.lag_size, min=1, max=256, description="lag size L",
                                     continuous_update=False, **style)
        self.ratio = widgets.FloatSlider(value=config.ratio, min=1 / 64, max=1.0, step=1 / 64, readout_format=".3f",
                                         description="ratio r", continuous_update=False, **style)
        self.sink = widgets.IntSlider(value=config.sink_size, min=0, max=128, description="sink S",
                                      continuous_update=False, **style)
        self.layer = widgets.Dropdown(description="layer", **style)
        self.head = widgets.Dropdown(description="KV head", **style)
        self.rows = widgets.ToggleButtons(options=[("per layer", "layer"), ("layer x head", "layer_head")],
                                          value="layer", description="heatmap rows", style={"description_width": "90px"})
        self.focus = widgets.IntRangeSlider(value=(0, 1), min=0, max=1, description="grid tokens",
                                            continuous_update=False, **style)
        self.status = widgets.HTML()
        self.outputs = {name: widgets.Output() for name in VIEWS}

        self._set_text_controls(first=True)
        for control, views in ((self.text, None), (self.source, None), (self.lag, None), (self.ratio, None),
                               (self.sink, None), (self.layer, ("lag_scores",)), (self.head, ("lag_scores",)),
                               (self.rows, ("retained",)), (self.focus, ("grid",))):
            control.observe(lambda change, views=views: self._on_change(change, views), names="value")
        self.widget = self._layout()
        self.update()

    # ----------------------------------------------------------------------------------------------------------
    @property
    def config(self) -> LagConfig:
        """The LagConfig of the sliders (ValueError, with the accepted range, if they form an invalid one)."""
        return LagConfig(sink_size=int(self.sink.value), lag_size=int(self.lag.value), ratio=float(self.ratio.value))

    def capture(self) -> KVCapture:
        """The K/V of the selected text and source, from the cache or from a model run (counted in model_runs)."""
        lrsa = self.source.value == "lrsa"
        key = (self.text.value, self.source.value, self.config if lrsa else None)
        if key in self._captures:
            self._captures.move_to_end(key)
            return self._captures[key]
        self.status.value = "<i>running the model…</i>"
        cap = capture_kv(self.model, self.tokenizer, self.texts[self.text.value], self.config if lrsa else None,
                         layers=self.layers, max_tokens=self.max_tokens)
        self.model_runs += 1
        self._captures[key] = cap
        while len(self._captures) > self.max_captures:
            self._captures.popitem(last=False)
        return cap

    def kept(self, capture: KVCapture, config: LagConfig) -> torch.Tensor:
        """One-shot LagKV keep mask [n_layers, H_kv, N] of a capture, recomputed only when capture or config change."""
        if self._kept is None or self._kept[0] is not capture or self._kept[1] != config:
            self._kept = (capture, config, capture.keep_mask(config))
        return self._kept[2]

    # ----------------------------------------------------------------------------------------------------------
    def _set_text_controls(self, first: bool = False) -> None:
        """Layer/head options and the focus range for the current text (after a text change)."""
        n_tokens = len(self.tokenizer(self.texts[self.text.value], add_special_tokens=False).input_ids)
        n = min(n_tokens, self.max_tokens)
        if n < 2:
            raise ValueError(f"texts[{self.text.value!r}] must have at least 2 tokens, got {n}")
        self._updating = True
        try:
            n_layers = self.model.config.num_hidden_layers
            layer_ids = list(self.layers) if self.layers is not None else list(range(n_layers))
            if first:
                self.layer.options = [(f"layer {i}", i) for i in layer_ids]
                self.layer.value = layer_ids[len(layer_ids) // 2]
                self.head.options = [(f"KV head {h}", h) for h in range(self.model.config.num_key_value_heads)]
                self.head.value = 0
            self.focus.max = n - 1
            self.focus.min = 0
            start = n // 2
            self.focus.value = (start, min(n - 1, start + 31))
        finally:
            self._updating = False

    def _on_change(self, change, views: tuple[str, ...] | None) -> None:
        if self._updating:
            return
        if change["owner"] is self.text:
            self._set_text_controls()
        self.update(views)

    def update(self, views: Sequence[str] | None = None) -> None:
        """Recompute and redraw ``views`` (default: all). Invalid slider settings leave every figure as it was and
        show the error in the status line (also in ``self.error``)."""
        try:
            config = self.config
        except ValueError as exc:
            self.error = str(exc)
            self.status.value = f"<span style='color:#c00'>Invalid settings: {exc}</span>"
            return
        self.error = ""
        capture = self.capture()
        kept = self.kept(capture, config)
        tokens, n = capture.tokens, capture.n_tokens
        targets = VIEWS if views is None else views
        if "lag_scores" in targets:
            row = capture.row(self.layer.value)
            scores = capture.scores(config)[row, self.head.value]
            if scores.shape[0] == 0:
                fig = _message_figure(f"{n} tokens: nothing is scored below S + 2L = {config.min_compressible_length} tokens")
            else:
                fig = lag_score_figure(scores, config, tokens, max_cells=self.max_cells,
                                       title=f"Lag scores, layer {self.layer.value}, KV head {self.head.value} "
                                             f"(x = kept; {capture.source})")
            self.figures["lag_scores"] = fig
        if "retained" in targets:
            self.figures["retained"] = retained_token_figure(
                kept, tokens, layer_ids=capture.layer_ids, by=self.rows.value, config=config, max_cells=self.max_cells,
                title=f"Retained tokens ({'fraction of KV heads' if self.rows.value == 'layer' else 'layer x KV head'}; "
                      f"{capture.source})")
        if "grid" in targets:
            start, stop = self.focus.value[0], self.focus.value[1] + 1
            self.figures["grid"] = retention_grid_figure(kept, (start, stop), tokens, layer_ids=capture.layer_ids)
        if "compression" in targets:
            dtype = next(self.model.parameters()).dtype
            growth = measure_cache_growth(capture.keys, capture.values, config, step=max(config.lag_size, n // 64),
                                          dtype=dtype)
            self.figures["compression"] = compression_curve_figure(
                [config], n, growth.bytes_per_token, [growth],
                title=f"KV cache of this text ({capture.n_layers} layers, {str(dtype).replace('torch.', '')}): "
                      f"eq. 12 (line) and a real LagKVCache fed the captured K/V (markers)")
        kept_per_head = config.retained_length(n)
        self.status.value = (
            f"<b>{self.text.value}</b>: {n} tokens · {config} · each layer and KV head keeps {kept_per_head} "
            f"({kept_per_head / n:.0%}) · showing LagKV selections on the <b>{SOURCES[self.source.value]}</b> · "
            f"model runs so far: {self.model_runs}")
        for name in targets:  # replace the Output widget's content directly (no output capture: works headless)
            self.outputs[name].outputs = (figure_output(self.figures[name]),)

    def show(self, views: Sequence[str] | None = None) -> None:
        """Display the current figures of ``views`` (default: all, in dashboard order) as ordinary plotly outputs.

        The dashboard's figures live in widgets, which a static render (GitHub, nbviewer, an executed notebook
        without widget state) does not show; these outputs stay visible there.
        """
        names = list(VIEWS if views is None else views)
        unknown = [v for v in names if v not in VIEWS]
        if unknown:
            raise ValueError(f"views must be among {list(VIEWS)}, got {unknown}")
        for name in names:
            display(self.figures[name])

    # ----------------------------------------------------------------------------------------------------------
    def _layout(self) -> widgets.Widget:
        note = widgets.HTML(
            "<small>K/V source — <b>dense K/V</b>: LagKV selections on the keys/values of an ordinary dense forward "
            "(captured once per text; S, L, r re-score them). <b>LRSA K/V</b>: the keys/values a model computes "
            "under the LRSA mask of the current settings (layers ≥ 1 depend on it; re-runs the model).</small>")
        controls = widgets.VBox([
            widgets.HBox([self.text, self.source]),
            widgets.HBox([self.lag, self.ratio, self.sink]),
            widgets.HBox([self.layer, self.head, self.rows]),
            note, self.status,
        ])
        views = widgets.VBox([
            self.outputs["lag_scores"], self.outputs["retained"],
            widgets.HBox([self.outputs["grid"]]), self.focus, self.outputs["compression"],
        ])
        return widgets.VBox([controls, views])

    def _ipython_display_(self) -> None:
        display(self.widget)
