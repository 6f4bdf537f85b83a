"""Compare answers generated with compressed KV caches against the full-cache answer."""
from __future__ import annotations

import dataclasses
from typing import Sequence

import plotly.graph_objects as go

from .cells import hover_safe


@dataclasses.dataclass
class Answer:
    """One generated answer.

    Attributes:
        policy: "full" (uncompressed cache) or a LagKVCache policy name ("lagkv", "streaming", "random").
        ratio: the LagConfig ratio r (None for the full cache).
        token_ids: the generated tokens (prompt excluded).
        text: their decoded text.
        kv_bytes: bytes of K/V the cache held at the end of generation.
        prompt_kv_bytes: bytes of K/V it held after reading the prompt (before generating), if recorded.
    """

    policy: str
    ratio: float | None
    token_ids: list[int]
    text: str
    kv_bytes: int
    prompt_kv_bytes: int | None = None


def prefix_agreement(reference: Sequence[int], other: Sequence[int]) -> float:
    """Fraction of ``reference``'s tokens that ``other`` reproduces before their first difference (1.0 = identical
    start over the whole reference; greedy decoding never re-converges in a meaningful way after a difference)."""
    if len(reference) == 0:
        raise ValueError("reference must hold at least one token")
    n = 0
    for a, b in zip(reference, other):
        if a != b:
            break
        n += 1
    return n / len(reference)


def answer_comparison_figure(answers: Sequence[Answer], reference: Answer, *, title: str | None = None) -> go.Figure:
    """Grouped bars: prefix agreement with the full-cache answer, by ratio (x) and policy (colour); hover = answer.

    Returns:
        go.Figure with one bar trace per policy; ``y`` = `prefix_agreement` of each answer with ``reference``.
    """
    policies = list(dict.fromkeys(a.policy for a in answers))
    ratios = sorted({a.ratio for a in answers if a.ratio is not None}, reverse=True)
    colours = {"lagkv": "#1f77b4", "streaming": "#ff7f0e", "random": "#7f7f7f"}
    fig = go.Figure()
    for policy in policies:
        mine = {a.ratio: a for a in answers if a.policy == policy}
        xs = [f"r={r:g}" for r in ratios if r in mine]
        ys = [prefix_agreement(reference.token_ids, mine[r].token_ids) for r in ratios if r in mine]
        text = [hover_safe(mine[r].text) for r in ratios if r in mine]
        fig.add_trace(go.Bar(x=xs, y=ys, name=policy, marker_color=colours.get(policy), text=text,
                             textposition="none", hovertemplate="%{x}: %{y:.0%} of the full-cache answer<br>%{text}"
                                                                 f"<extra>{policy}</extra>"))
    fig.update_layout(
        barmode="group", yaxis=dict(title="prefix agreement with full cache", range=[0, 1.05], tickformat=".0%"),
        xaxis_title="kept fraction r", height=380,
        title=title or f"Answers with a compressed cache vs the full cache: '{hover_safe(reference.text)[:60]}'",
    )
    return fig
