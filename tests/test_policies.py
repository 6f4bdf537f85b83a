import pytest
import torch

from lrsa_viz import (LagConfig, LagKVCache, RandomPolicy, StreamingPolicy, chunked_prefill, compress_once,
                      lagkv_keep_indices, make_policy)


@pytest.mark.parametrize("n", [10, 36, 37, 64, 101])
def test_compress_once_lagkv_equals_keep_indices(n):
    cfg = LagConfig(4, 8, 0.25)
    g = torch.Generator().manual_seed(n)
    k, v = torch.randn(2, 3, n, 8, generator=g), torch.randn(2, 3, n, 8, generator=g)
    assert torch.equal(compress_once(k, v, cfg), lagkv_keep_indices(k, v, cfg))


@pytest.mark.parametrize("policy", ["lagkv", "random", "streaming"])
def test_all_policies_hold_the_same_budget(tiny, policy):
    cfg = LagConfig(3, 8, 0.25)
    ids = torch.randint(0, 256, (2, 90), generator=torch.Generator().manual_seed(1))
    _, cache = chunked_prefill(tiny, ids, cfg, policy=policy)
    assert cache.stored_lengths() == [cfg.retained_length(90)] * 2
    pos = cache.kept_positions(0)
    assert pos[..., :3].eq(torch.arange(3)).all(), "sink kept"
    assert (pos[..., 1:] > pos[..., :-1]).all(), "original order kept"


def test_streaming_keeps_sink_and_most_recent(tiny):
    cfg = LagConfig(3, 8, 0.25)
    ids = torch.randint(0, 256, (1, 90), generator=torch.Generator().manual_seed(1))
    _, cache = chunked_prefill(tiny, ids, cfg, policy="streaming")
    budget = cfg.retained_length(90)
    expected = list(range(3)) + list(range(90 - (budget - 3), 90))
    assert cache.kept_positions(1)[0, 0].tolist() == expected


def test_random_is_seeded_and_differs_from_lagkv():
    cfg = LagConfig(2, 8, 0.25)
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, 2, 66, 8, generator=g), torch.randn(1, 2, 66, 8, generator=g)
    a, b = compress_once(k, v, cfg, RandomPolicy(seed=5)), compress_once(k, v, cfg, RandomPolicy(seed=5))
    assert torch.equal(a, b)
    assert not torch.equal(a, compress_once(k, v, cfg, RandomPolicy(seed=6)))
    assert not torch.equal(a, compress_once(k, v, cfg))
    assert not torch.equal(compress_once(k, v, cfg, StreamingPolicy()), compress_once(k, v, cfg))


def test_unknown_policy():
    with pytest.raises(ValueError, match="policy must be one of"):
        make_policy("h2o")
    with pytest.raises(ValueError, match="policy must be one of"):
        LagKVCache(LagConfig(), policy="snap")


# --- SnapKV: the attention of the newest queries ------------------------------------------------------------------

def test_snapkv_holds_the_same_budget_and_needs_the_model(tiny):
    from lrsa_viz.policies import SnapKVPolicy

    cfg = LagConfig(3, 8, 0.25)
    ids = torch.randint(0, 256, (2, 90), generator=torch.Generator().manual_seed(1))
    policy = SnapKVPolicy(window=4)
    with policy.observe(tiny):
        _, cache = chunked_prefill(tiny, ids, cfg, policy=policy)
    assert cache.stored_lengths() == [cfg.retained_length(90)] * 2
    _, lagkv = chunked_prefill(tiny, ids, cfg)
    assert not torch.equal(cache.kept_positions(0), lagkv.kept_positions(0))
    assert not tiny.model.layers[0].self_attn._forward_pre_hooks, "hooks removed after the context"
    # chunked_prefill opens the policy's observe context itself: the same selections without the caller's context
    _, own = chunked_prefill(tiny, ids, cfg, policy=SnapKVPolicy(window=4))
    assert all(torch.equal(own.kept_positions(i), cache.kept_positions(i)) for i in range(2))
    assert not tiny.model.layers[0].self_attn._forward_pre_hooks
    with pytest.raises(ValueError, match="run the model inside `with policy.observe"):  # a bare cache still needs it
        with torch.no_grad():
            tiny(ids, past_key_values=LagKVCache(cfg, policy=SnapKVPolicy()))


def test_snapkv_scores_are_the_window_attention(tiny):
    """The scores SnapKV ranks by equal the model's own attention probabilities (eager attention, returned by
    transformers), summed over the window and averaged over each KV head's query heads."""
    from lrsa_viz.policies import SnapKVPolicy

    n, w = 70, 6
    ids = torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(2))
    policy = SnapKVPolicy(window=w, kernel_size=1)
    record = {}
    with torch.no_grad(), policy.observe(tiny, record=record):
        out = tiny(ids, use_cache=True)
    keys = out.past_key_values.layers[1].keys  # [1, H_kv, n, d] post-RoPE
    scores = policy.window_scores(record[1][0], keys, record[1][1])
    tiny.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attn = tiny(ids, output_attentions=True).attentions[1]  # [1, Hq, n, n]
    finally:
        tiny.set_attn_implementation("sdpa")
    groups = attn.shape[1] // keys.shape[1]
    expected = attn[:, :, -w:].sum(2).view(1, keys.shape[1], groups, n).mean(2)
    # fp32 softmax of the same logits by two code paths: equal to rounding (|p| <= 1, sums of 6 terms)
    assert torch.allclose(scores, expected, atol=1e-5)


def test_snapkv_keeps_what_the_window_attends_to():
    """Constructed keys: the window's query points at 2 tokens of each partition; they are the ones kept."""
    from lrsa_viz.policies import SnapKVPolicy

    cfg = LagConfig(2, 8, 0.25)  # 2 of 8 kept per scored partition
    n, d = 2 + 4 * 8, 4
    keys = torch.zeros(1, 1, n, d)
    target = [2 + 3, 2 + 6, 2 + 8 + 1, 2 + 8 + 2, 2 + 16 + 0, 2 + 16 + 7]  # partitions 0-2 are scored
    keys[0, 0, target, 0] = 5.0
    query = torch.zeros(1, 1, 1, d)
    query[..., 0] = 1.0
    policy = SnapKVPolicy(window=1, kernel_size=1)
    policy.set_queries(query, 1.0)
    kept = compress_once(keys, keys.clone(), cfg, policy)[0, 0].tolist()
    assert kept == [0, 1] + target + list(range(2 + 24, n))


@pytest.mark.parametrize("kwargs, match", [({"window": 0}, "window must be an integer >= 1"),
                                           ({"kernel_size": 4}, "kernel_size must be odd")])
def test_snapkv_bad_arguments(kwargs, match):
    from lrsa_viz.policies import SnapKVPolicy

    with pytest.raises(ValueError, match=match):
        SnapKVPolicy(**kwargs)
