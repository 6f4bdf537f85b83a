"""Visualisations of LagKV and LRSA: plotly figures, coloured-text views, offline HTML export, an ipywidgets explorer.

Every figure function returns a plotly ``go.Figure`` (renders headless, saves as standalone HTML with `export_html`).
The explorer lives in `lrsa_viz.viz.explorer` (imported on demand: it needs ipywidgets).
"""
from .agreement_view import boundary_gaps, flip_effect_figure, score_flatness_figure
from .capture import KVCapture, attention_mode, capture_kv, token_strings
from .cells import MAX_CELLS, heatmap_cells
from .compression import (CacheGrowth, compression_curve_figure, kept_fraction_figure, kv_bytes_per_token,
                          measure_cache_growth, measure_model_cache_growth)
from .export import export_html
from .generation import Answer, answer_comparison_figure, answer_correctness_figure, answer_diff_view, prefix_agreement
from .lag_scores import (ablation_overlap_figure, channel_values_figure, lag_score_figure, partition_score_figure,
                         token_std_figure)
from .mask_view import (REGION_NAMES, VISIBLE_REGIONS, attention_by_region, attention_by_region_figure,
                        attention_comparison_figure, attention_probabilities, hidden_attention_mass, lrsa_mask_figure,
                        mask_regions, prefill_storyboard_figure)
from .passages import long_text, passage_names, read_passage
from .retention import keep_frequency, retained_token_figure, retention_grid_figure, span_retention
from .text import HtmlView, coloured_text

__all__ = [
    "KVCapture", "capture_kv", "attention_mode", "token_strings", "MAX_CELLS", "heatmap_cells", "CacheGrowth",
    "compression_curve_figure", "kv_bytes_per_token", "measure_cache_growth", "measure_model_cache_growth",
    "export_html", "lag_score_figure", "channel_values_figure", "token_std_figure", "REGION_NAMES", "VISIBLE_REGIONS",
    "attention_comparison_figure", "attention_probabilities", "lrsa_mask_figure", "mask_regions", "long_text",
    "passage_names", "read_passage", "keep_frequency", "retained_token_figure", "retention_grid_figure",
    "span_retention", "HtmlView", "coloured_text", "Answer", "answer_comparison_figure", "prefix_agreement",
    "boundary_gaps", "score_flatness_figure", "flip_effect_figure", "kept_fraction_figure", "answer_diff_view",
    "answer_correctness_figure", "partition_score_figure", "ablation_overlap_figure", "attention_by_region",
    "attention_by_region_figure", "hidden_attention_mass", "prefill_storyboard_figure",
]
