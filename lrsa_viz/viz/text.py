"""A passage as coloured text: each token's background shows a number in [0, 1], e.g. how often LagKV keeps it."""
from __future__ import annotations

import dataclasses
import html
from typing import Sequence

import torch


@dataclasses.dataclass(frozen=True)
class HtmlView:
    """A self-contained HTML fragment (no scripts, no external resources): shown inline by Jupyter, exportable."""

    html: str
    title: str = ""

    def _repr_html_(self) -> str:
        return self.html


def _background(weight: float, rgb: tuple[int, int, int]) -> str:
    return f"rgba({rgb[0]},{rgb[1]},{rgb[2]},{weight:.3f})"


def coloured_text(
    tokens: Sequence[str],
    weights: torch.Tensor | Sequence[float],
    *,
    title: str = "",
    label: str = "kept by",
    rgb: tuple[int, int, int] = (31, 119, 180),
    max_tokens: int = 20_000,
) -> HtmlView:
    """Colour each token by its weight: transparent at 0, full colour at 1; hovering a token shows its weight.

    Args:
        tokens: N token strings (joined, they give the text back).
        weights: [N] numbers in [0, 1], e.g. `keep_frequency(kept)`.
        label: hover text before the percentage ("kept by 75%").
        max_tokens: refuse longer texts (an HTML page of more spans gets slow); show a window instead.
    Returns:
        An `HtmlView` (a ``<div>`` of ``<span>`` elements with inline styles and a colour legend).
    """
    w = torch.as_tensor(weights, dtype=torch.float32).flatten()
    if len(tokens) != w.numel():
        raise ValueError(f"weights must have one value per token ({len(tokens)}), got {w.numel()}")
    if len(tokens) > max_tokens:
        raise ValueError(f"tokens: at most max_tokens={max_tokens} tokens per view, got {len(tokens)}; show a window")
    if w.numel() and (not torch.isfinite(w).all() or w.min() < 0 or w.max() > 1):
        raise ValueError("weights must be finite numbers in [0, 1]")
    spans = []
    for i, (tok, x) in enumerate(zip(tokens, w.tolist())):
        text = html.escape(tok).replace("\n", "⏎<br>")
        spans.append(
            f'<span title="token {i}: {label} {x:.0%}" style="background:{_background(x, rgb)};'
            f'border-radius:2px">{text}</span>'
        )
    legend = "".join(
        f'<span style="background:{_background(x, rgb)};padding:0 6px;margin-right:2px">{x:.0%}</span>'
        for x in (0.0, 0.25, 0.5, 0.75, 1.0)
    )
    head = f"<div style='font-weight:bold;margin-bottom:4px'>{html.escape(title)}</div>" if title else ""
    body = (
        f"<div class='lrsa-coloured-text' style='font-family:Georgia,serif;line-height:1.7;white-space:pre-wrap;"
        f"max-height:500px;overflow-y:auto;border:1px solid #ddd;padding:8px'>{''.join(spans)}</div>"
    )
    foot = f"<div style='font-size:small;margin-top:4px'>{html.escape(label)}: {legend}</div>"
    return HtmlView(html=f"<div>{head}{body}{foot}</div>", title=title)
