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
