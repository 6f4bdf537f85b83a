"""Compare answers generated with compressed KV caches against the full-cache answer.

Three views, because one number hides what matters: `prefix_agreement` (how much of the full-cache answer is
reproduced before the first different token) says "82%" both for a harmless rewording and for the one changed word
that makes the answer wrong. So `answer_diff_view` shows each answer with the shared start greyed and the first
difference highlighted, and `answer_correctness_figure` asks the plain question per prompt: does the answer still
contain the expected word? `answer_comparison_figure` draws the prefix agreement with the measured share of the
full cache's bytes under each nominal ratio r.
"""
from __future__ import annotations

import dataclasses
import html
from typing import Sequence

import plotly.graph_objects as go

from .cells import hover_safe
from .text import HtmlView

POLICY_COLOURS = {"lagkv": "#1f77b4", "streaming": "#ff7f0e", "random": "#7f7f7f"}


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

    def contains(self, word: str) -> bool:
        """Whether the answer's text contains ``word`` (case-insensitive)."""
        return word.lower() in self.text.lower()


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


def common_prefix(a: str, b: str) -> int:
    """Length of the longest common start of two strings, cut back to a word boundary (so that "cache" vs "car"
    shows the whole differing word, not "che" vs "r")."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    if n < min(len(a), len(b)):  # they differ at n: back up to the start of that word
        while n > 0 and not a[n - 1].isspace():
            n -= 1
    return n


def kept_share(answer: Answer, reference: Answer) -> float | None:
    """The answer's cache after the prompt, as a share of the full cache's bytes after the same prompt (None if
    either was not recorded)."""
    if answer.prompt_kv_bytes is None or not reference.prompt_kv_bytes:
        return None
    return answer.prompt_kv_bytes / reference.prompt_kv_bytes


def _ratio_ticks(answers: Sequence[Answer], reference: Answer, ratios: Sequence[float]) -> list[str]:
    text = []
    for r in ratios:
        shares = {kept_share(a, reference) for a in answers if a.ratio == r}
        share = shares.pop() if len(shares) == 1 else None
        text.append(f"r={r:g}" + (f"<br>cache holds {share:.0%}" if share is not None else ""))
    return text


def answer_comparison_figure(
    answers: Sequence[Answer], reference: Answer, *, expected: str | None = None, title: str | None = None
) -> go.Figure:
    """Grouped bars: prefix agreement with the full-cache answer, by ratio (x) and policy (colour); hover = answer.

    Args:
        expected: a word the right answer contains; each bar is then labelled ✓ or ✗ (is it in the answer?).
    Returns:
        go.Figure with one bar trace per policy; ``x`` = "r=..." categories, ``y`` = `prefix_agreement` with
        ``reference``. The x tick labels add the measured share of the full cache's bytes after the prompt when the
        answers recorded it (nominal r is the kept share of each SCORED partition only; the sink, the last full
        partition and the remainder are kept whole, so short prompts keep much more than r).
    """
    policies = list(dict.fromkeys(a.policy for a in answers))
    ratios = sorted({a.ratio for a in answers if a.ratio is not None}, reverse=True)
    fig = go.Figure()
    for policy in policies:
        mine = {a.ratio: a for a in answers if a.policy == policy}
        rs = [r for r in ratios if r in mine]
        ys = [prefix_agreement(reference.token_ids, mine[r].token_ids) for r in rs]
        text = [hover_safe(mine[r].text) for r in rs]
        marks = [("✓" if mine[r].contains(expected) else "✗") for r in rs] if expected else None
        fig.add_trace(go.Bar(x=[f"r={r:g}" for r in rs], y=ys, name=policy, marker_color=POLICY_COLOURS.get(policy),
                             customdata=text, text=marks, textposition="outside" if marks else "none",
                             hovertemplate="%{x}: %{y:.0%} of the full-cache answer<br>%{customdata}"
                                           f"<extra>{policy}</extra>"))
    xlabel = "nominal kept fraction r of each scored partition"
    if any(kept_share(a, reference) is not None for a in answers):
        xlabel += " (below: measured share of the full cache's bytes)"
    fig.update_xaxes(tickvals=[f"r={r:g}" for r in ratios], ticktext=_ratio_ticks(answers, reference, ratios))
    note = f" — ✓/✗: the answer contains '{expected}'" if expected else ""
    fig.update_layout(
        barmode="group", yaxis=dict(title="prefix agreement with full cache", range=[0, 1.15], tickformat=".0%"),
        xaxis_title=xlabel, height=400, legend_title="policy",
        title=(title or f"Answers with a compressed cache vs the full cache: '{hover_safe(reference.text)[:60]}'") + note,
    )
    return fig


def answer_diff_view(answers: Sequence[Answer], reference: Answer, expected: str | None = None, *, title: str = "") -> HtmlView:
    """A table of answers against the full-cache answer: the shared start in grey, everything from the first
    differing word on highlighted, with the share of the full cache's bytes, the prefix agreement and ✓/✗ for the
    expected word.

    Returns:
        An `HtmlView` (a ``<table>``; answer text escaped).
    """
    def row(a: Answer, is_reference: bool) -> str:
        n = len(a.text) if is_reference else common_prefix(reference.text, a.text)
        same, rest = html.escape(a.text[:n]), html.escape(a.text[n:])
        share = kept_share(a, reference)
        cells = [
            html.escape(a.policy), "—" if a.ratio is None else f"{a.ratio:g}",
            "100%" if is_reference else ("?" if share is None else f"{share:.0%}"),
            "" if expected is None else ("✓" if a.contains(expected) else "✗"),
            "" if is_reference else f"{prefix_agreement(reference.token_ids, a.token_ids):.0%}",
            f"<span style='color:#888'>{same}</span><span style='background:#fde2a7'>{rest}</span>",
        ]
        return "<tr>" + "".join(f"<td style='padding:2px 8px'>{c}</td>" for c in cells) + "</tr>"

    head = ["policy", "r", "cache (of full)", f"contains '{html.escape(expected)}'" if expected else "", "prefix agreement",
            "answer (grey: same as the full cache's; highlighted: from the first different word on)"]
    rows = [row(reference, True)] + [row(a, False) for a in answers]
    caption = f"<div style='font-weight:bold;margin-bottom:4px'>{html.escape(title)}</div>" if title else ""
    table = ("<table style='border-collapse:collapse;font-size:small'><tr>"
             + "".join(f"<th style='text-align:left;padding:2px 8px'>{h}</th>" for h in head) + "</tr>"
             + "".join(rows) + "</table>")
    return HtmlView(html=f"<div>{caption}{table}</div>", title=title)


def answer_correctness_figure(
    results: Sequence[tuple[str, str, Answer, Sequence[Answer]]], *, title: str | None = None
) -> go.Figure:
    """Question x (cache, policy, r): does the answer contain the expected word?

    Args:
        results: (question, expected word, full-cache answer, compressed answers) per question.
    Returns:
        go.Figure with one heatmap: z = 1 (contains the word) or 0, text ✓/✗, hover = the answer; columns "full"
        then "<policy> r=<r>" in the order of the first question's answers.
    """
    if not results:
        raise ValueError("results must hold at least one (question, expected, full answer, answers) tuple")
    columns = ["full cache"] + [f"{a.policy} r={a.ratio:g}" for a in results[0][3]]
    z, text, hover, ylabels = [], [], [], []
    for question, expected, full, answers in results:
        row = [full] + list(answers)
        if [f"{a.policy} r={a.ratio:g}" for a in answers] != columns[1:]:
            raise ValueError("results: every question must have answers for the same (policy, r) in the same order")
        z.append([int(a.contains(expected)) for a in row])
        text.append(["✓" if v else "✗" for v in z[-1]])
        hover.append([hover_safe(a.text) for a in row])
        ylabels.append(f"{hover_safe(question)} ('{hover_safe(expected)}')")
    fig = go.Figure(go.Heatmap(
        z=z, x=columns, y=ylabels, text=text, texttemplate="%{text}", customdata=hover, zmin=-0.5, zmax=1.5,
        colorscale=[[0, "#f4a6a6"], [0.5, "#f4a6a6"], [0.5, "#a6d8a6"], [1, "#a6d8a6"]], xgap=2, ygap=2,
        colorbar=dict(tickvals=[0, 1], ticktext=["expected word missing", "contains the expected word"], title="answer"),
        hovertemplate="%{y}<br>%{x}: %{customdata}<extra></extra>",
    ))
    fig.update_layout(title=title or "Does the answer still contain the expected word?", height=160 + 60 * len(results),
                      xaxis_title="cache (policy, nominal r)", yaxis=dict(title="question (expected word)", autorange="reversed"))
    return fig
