"""Property-based tests (hypothesis) of the LRSA mask, the LagKV kept counts and the compressing cache.

Random (B, H_kv, N, d, S, L, r). The references here are written from the text of METHOD.md, not from the
library: the visible set of each query (§3) is built as a Python set, and the retained length (eq. 12) is
recomputed by hand. Example counts are bounded (see ``settings`` below) so the file runs in well under 60 s on
2 cores; ``database=None`` keeps hypothesis from writing a .hypothesis/ folder into the checkout.
"""
from __future__ import annotations

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lrsa_viz import LagConfig, LagKVCache, chunked_prefill, keep_mask, lagkv_scores, lrsa, lrsa_visibility
from lrsa_viz.cache import LagKVLayer
from lrsa_viz.scoring import lagkv_keep_indices

# 10 s per example is ~100x the typical time of the tensor-only examples (a loaded 2-core machine stays far below)
COMMON = dict(database=None, deadline=10_000, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------------------------
# Strategies


@st.composite
def lag_configs(draw, max_sink: int = 6, max_lag: int = 8) -> LagConfig:
    """A valid LagConfig: S in [0, max_sink], L in [1, max_lag], r in (0, 1] with int(r * L) >= 1."""
    sink = draw(st.integers(0, max_sink))
    lag = draw(st.integers(1, max_lag))
    ratio = draw(st.one_of(st.sampled_from([1.0, 0.5, 0.25, 0.125]), st.floats(0.01, 1.0)))
    assume(int(ratio * lag) >= 1)
    score_v_ratio = draw(st.sampled_from([0.0, 0.5, 1.0, 2.0]))
    return LagConfig(sink, lag, ratio, score_v_ratio)


@st.composite
def kv_problems(draw, min_n: int = 0):
    """(config, keys, values) with keys/values [B, H_kv, N, d] float32, N up to S + 7L + 5."""
    cfg = draw(lag_configs())
    b, h, d = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(2, 8))
    n = draw(st.integers(min_n, cfg.sink_size + 7 * cfg.lag_size + 5))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(b, h, n, d, generator=g), torch.randn(b, h, n, d, generator=g)
    return cfg, keys, values


# ---------------------------------------------------------------------------------------------------------------
# References written from METHOD.md


def eq12_retained(n: int, sink: int, lag: int, ratio: float) -> int:
    """METHOD eq. 12: S + int(r L) (P - 1) + L + ((n - S) mod L) for n >= S + 2L, else n (nothing compressed)."""
    if n < sink + 2 * lag:
        return n
    parts = (n - sink) // lag
    return sink + int(ratio * lag) * (parts - 1) + lag + (n - sink) % lag


def partition_of(pos: int, sink: int, lag: int) -> int:
    """-1 for sink positions, else (pos - S) // L (the trailing remainder is partition P)."""
    return -1 if pos < sink else (pos - sink) // lag


def selected_offsets(scores_row: list[float], top_k: int) -> set[int] | None:
    """The top_k offsets of one scored partition, or None when a tie at the cut makes the choice ambiguous."""
    order = sorted(range(len(scores_row)), key=lambda t: -scores_row[t])
    if top_k < len(order) and scores_row[order[top_k - 1]] == scores_row[order[top_k]]:
        return None
    return set(order[:top_k])


def reference_visible_sets(scores: torch.Tensor, n: int, cfg: LagConfig) -> list[list[list[set[int]]]]:
    """visible[b][h][q]: the set of keys query q may see, per METHOD §3.

    A query at position q in partition k (sink queries: -1) sees the sink [0, S), the selected tokens of every
    partition j <= k - 2, all of partition k - 1 and partition k causally (keys <= q). Keys never lie after q.
    """
    s, lag = cfg.sink_size, cfg.lag_size
    b_size, h_size = scores.shape[:2]
    out = []
    for b in range(b_size):
        per_head = []
        for h in range(h_size):
            selected: dict[int, set[int]] = {}
            for j in range(scores.shape[2]):
                offsets = selected_offsets(scores[b, h, j].tolist(), cfg.top_k)
                assume(offsets is not None)  # exact float ties: the spec does not say which one wins
                selected[j] = {s + j * lag + o for o in offsets}
            queries = []
            for q in range(n):
                k = partition_of(q, s, lag)
                seen = {t for t in range(min(s, q + 1))}  # the sink (causally, for sink queries)
                for j in range(0, k - 1):  # j <= k - 2
                    seen |= selected[j]
                if k - 1 >= 0:
                    seen |= set(range(s + (k - 1) * lag, s + k * lag))  # all of partition k - 1
                if k >= 0:
                    seen |= set(range(s + k * lag, q + 1))  # partition k, causally
                queries.append(seen)
            per_head.append(queries)
        out.append(per_head)
    return out


# ---------------------------------------------------------------------------------------------------------------
# The mask (METHOD §3)


@settings(max_examples=60, **COMMON)
@given(kv_problems(min_n=1))
def test_mask_is_causal_and_sees_itself(problem):
    cfg, keys, values = problem
    n = keys.shape[2]
    visible = lrsa_visibility(keys, values, cfg)
    assert visible.shape == (*keys.shape[:2], n, n) and visible.dtype == torch.bool
    future = torch.ones(n, n, dtype=torch.bool).triu(1)
    assert not visible[..., future].any(), "a query sees a later key"
    assert visible.diagonal(dim1=-2, dim2=-1).all(), "a query must see itself"
    assert visible[..., :, : min(cfg.sink_size, n)].tril().eq(torch.ones(n, min(cfg.sink_size, n)).tril().bool()).all()


@settings(max_examples=60, **COMMON)
@given(kv_problems(min_n=1))
def test_each_query_sees_exactly_the_method_set(problem):
    cfg, keys, values = problem
    n = keys.shape[2]
    visible = lrsa_visibility(keys, values, cfg)
    expected = reference_visible_sets(lagkv_scores(keys, values, cfg), n, cfg)
    for b in range(keys.shape[0]):
        for h in range(keys.shape[1]):
            for q in range(n):
                got = set(visible[b, h, q].nonzero().flatten().tolist())
                assert got == expected[b][h][q], (b, h, q, sorted(got ^ expected[b][h][q]))


@settings(max_examples=60, **COMMON)
@given(kv_problems(min_n=1))
def test_visible_count_per_query(problem):
    """|visible(q)| for q in partition k >= 2: S + int(rL) (k - 1) + L + (q - start of k + 1); else q + 1."""
    cfg, keys, values = problem
    s, lag = cfg.sink_size, cfg.lag_size
    counts = lrsa_visibility(keys, values, cfg).sum(-1)  # [B, H, N]
    for q in range(keys.shape[2]):
        k = partition_of(q, s, lag)
        want = q + 1 if k < 2 else s + cfg.top_k * (k - 1) + lag + (q - (s + k * lag) + 1)
        assert counts[..., q].eq(want).all(), (q, k, counts[..., q].tolist(), want)


# ---------------------------------------------------------------------------------------------------------------
# Kept counts (eq. 12)


@settings(max_examples=100, **COMMON)
@given(kv_problems(min_n=0))
def test_kept_counts_match_eq12(problem):
    cfg, keys, values = problem
    n = keys.shape[2]
    want = eq12_retained(n, cfg.sink_size, cfg.lag_size, cfg.ratio)
    assert cfg.retained_length(n) == want
    kept = keep_mask(keys, values, cfg)
    assert kept.sum(-1).eq(want).all()
    idx = lagkv_keep_indices(keys, values, cfg)
    assert idx.shape[-1] == want
    assert bool((idx[..., 1:] > idx[..., :-1]).all()), "kept positions ascending and unique"
    assert kept[..., : min(cfg.sink_size, n)].all(), "the sink is always kept"


# ---------------------------------------------------------------------------------------------------------------
# The compressing cache after any sequence of appends


@st.composite
def append_sequences(draw):
    """(config, keys, values, chunk sizes) with the chunks summing to N."""
    cfg, keys, values = draw(kv_problems(min_n=1))
    n, chunks = keys.shape[2], []
    while sum(chunks) < n:
        chunks.append(min(draw(st.integers(1, 2 * cfg.lag_size + 3)), n - sum(chunks)))
    return cfg, keys, values, chunks


@settings(max_examples=60, **COMMON)
@given(append_sequences())
def test_recursive_layer_stores_eq12_after_every_append(problem):
    """Recursive LagKVLayer: stored == eq. 12 of the tokens seen, and it keeps exactly one-shot LagKV's tokens."""
    cfg, keys, values, chunks = problem
    layer = LagKVLayer(cfg, mode="recursive")
    seen = 0
    for size in chunks:
        before = layer.stored_length()
        k_all, _ = layer.update(keys[:, :, seen: seen + size], values[:, :, seen: seen + size])
        assert k_all.shape[2] == before + size, "update returns the stored tokens plus the new ones"
        seen += size
        assert layer.get_seq_length() == seen
        assert layer.stored_length() == eq12_retained(seen, cfg.sink_size, cfg.lag_size, cfg.ratio)
        one_shot = lagkv_keep_indices(keys[:, :, :seen], values[:, :, :seen], cfg)
        assert torch.equal(layer.positions, one_shot), "chunking must not change which tokens are kept"
        torch.testing.assert_close(layer.keys, keys[:, :, :seen].gather(2, one_shot[..., None].expand(-1, -1, -1, keys.shape[-1])))


@settings(max_examples=40, **COMMON)
@given(append_sequences(), st.sampled_from(["recursive", "one_shot"]), st.sampled_from(["lagkv", "streaming", "random"]))
def test_cache_stored_lengths_after_appends(problem, mode, policy):
    """LagKVCache.update on two layers: recursive follows eq. 12 for every policy; one-shot compresses the first
    update only and appends the rest."""
    cfg, keys, values, chunks = problem
    cache = LagKVCache(cfg, mode=mode, policy=policy)
    seen = 0
    for size in chunks:
        for layer_idx in range(2):
            cache.update(keys[:, :, seen: seen + size], values[:, :, seen: seen + size], layer_idx)
        seen += size
        if mode == "recursive":
            want = eq12_retained(seen, cfg.sink_size, cfg.lag_size, cfg.ratio)
        else:
            want = eq12_retained(chunks[0], cfg.sink_size, cfg.lag_size, cfg.ratio) + seen - chunks[0]
        assert cache.stored_lengths() == [want, want]
        assert cache.get_seq_length() == seen
        mask = cache.kept_position_mask()
        assert mask.shape == (2, *keys.shape[:2], seen) and mask.sum(-1).eq(want).all()
        assert cache.nbytes() == 2 * 2 * keys[:, :, :want].numel() * 4


# ---------------------------------------------------------------------------------------------------------------
# The central equivalence on the tiny model (few examples: each runs the model)


@settings(max_examples=8, **{**COMMON, "deadline": None})  # model runs: bounded by the example count, not a clock
@given(
    cfg=lag_configs(max_sink=5, max_lag=10),
    batch=st.integers(1, 2),
    extra=st.integers(0, 40),
    seed=st.integers(0, 2**31 - 1),
)
def test_parallel_equals_chunked_tiny(tiny, cfg, batch, extra, seed):
    n = cfg.min_compressible_length + extra
    ids = torch.randint(0, tiny.config.vocab_size, (batch, n), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad(), lrsa(tiny, cfg):
        parallel = tiny(ids).logits
    chunked, cache = chunked_prefill(tiny, ids, cfg)
    assert (parallel - chunked).abs().max().item() <= 1e-4
    assert cache.stored_lengths() == [eq12_retained(n, cfg.sink_size, cfg.lag_size, cfg.ratio)] * tiny.config.num_hidden_layers
