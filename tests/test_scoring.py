import math

import pytest
import torch

from lrsa_viz import LagConfig, keep_mask, lagkv_keep_indices, lagkv_scores
from lrsa_viz.scoring import select_top_k


def loop_reference_scores(keys, values, cfg):
    """Token-by-token transcription of METHOD §2, for checking the vectorised code."""
    b, h, n, d = keys.shape
    s, lag = cfg.sink_size, cfg.lag_size
    p = (n - s) // lag
    out = torch.zeros(b, h, max(p - 1, 0), lag)
    for bi in range(b):
        for hi in range(h):
            for part in range(p - 1):
                total = torch.zeros(lag)
                for z, w in ((keys, 1.0), (values, cfg.score_v_ratio)):
                    cur = z[bi, hi, s + part * lag: s + (part + 1) * lag].double()
                    ref = z[bi, hi, s + (part + 1) * lag: s + (part + 2) * lag].double()
                    lo, hi_ = ref.min(0).values, ref.max(0).values
                    stds = torch.stack([((cur[t] - lo) / (hi_ - lo + 1e-6)).std() for t in range(lag)])
                    total += w * torch.softmax(stds, 0).float()
                out[bi, hi, part] = total
    return out


def test_hand_worked_example():
    # S=1, L=2, r=0.5: one scored partition (tokens 1, 2) against its reference (tokens 3, 4)
    k = torch.tensor([[9.0, 9.0], [0.0, 0.0], [1.0, 3.0], [0.0, 0.0], [2.0, 4.0]])[None, None]
    cfg = LagConfig(sink_size=1, lag_size=2, ratio=0.5)
    # reference min = (0, 0), max = (2, 4): token 1 -> (0, 0), std 0; token 2 -> (0.5, 0.75), std 0.25 / sqrt(2)
    std2 = 0.25 / math.sqrt(2)
    a = torch.tensor([1.0, math.exp(std2)]) / (1 + math.exp(std2))
    scores = lagkv_scores(k, k.clone(), cfg)
    assert scores.shape == (1, 1, 1, 2)
    torch.testing.assert_close(scores[0, 0, 0], 2 * a, atol=1e-5, rtol=0)
    assert lagkv_keep_indices(k, k, cfg).tolist() == [[[0, 2, 3, 4]]]


@pytest.mark.parametrize("cfg, n", [(LagConfig(2, 4, 0.5), 23), (LagConfig(0, 3, 0.34, 0.5), 16), (LagConfig(5, 6, 1.0), 30)])
def test_matches_loop_reference(cfg, n):
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 3, n, 8, generator=g), torch.randn(2, 3, n, 8, generator=g)
    torch.testing.assert_close(lagkv_scores(keys, values, cfg), loop_reference_scores(keys, values, cfg), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n", [0, 5, 16, 47, 48, 49, 64, 100, 257])
@pytest.mark.parametrize("cfg", [LagConfig(4, 16, 0.25), LagConfig(0, 8, 0.5), LagConfig(7, 5, 0.2)])
def test_kept_counts_sink_and_tail(cfg, n):
    g = torch.Generator().manual_seed(n)
    keys, values = torch.randn(2, 2, n, 4, generator=g), torch.randn(2, 2, n, 4, generator=g)
    idx = lagkv_keep_indices(keys, values, cfg)
    assert idx.shape == (2, 2, cfg.retained_length(n))
    assert bool((idx[..., 1:] > idx[..., :-1]).all()), "indices ascending and unique"
    kept = keep_mask(keys, values, cfg)
    assert kept.sum(-1).eq(cfg.retained_length(n)).all()
    assert kept[..., : cfg.sink_size].all(), "sink always kept"
    p = cfg.num_partitions(n)
    if n < cfg.min_compressible_length:
        assert kept.all(), "below S + 2L nothing is compressed"
    else:
        assert kept[..., cfg.sink_size + (p - 1) * cfg.lag_size:].all(), "last full partition and remainder kept"
        per_partition = kept[..., cfg.sink_size: cfg.sink_size + (p - 1) * cfg.lag_size].reshape(2, 2, p - 1, cfg.lag_size)
        assert per_partition.sum(-1).eq(cfg.top_k).all()


def test_keeps_the_top_scores():
    cfg = LagConfig(2, 8, 0.25)
    g = torch.Generator().manual_seed(3)
    keys, values = torch.randn(1, 2, 42, 6, generator=g), torch.randn(1, 2, 42, 6, generator=g)
    scores = lagkv_scores(keys, values, cfg)
    kept = keep_mask(keys, values, cfg)[..., 2: 2 + scores.shape[2] * 8].reshape(scores.shape)
    assert (scores[kept].reshape(1, 2, -1, 2).min(-1).values >= scores[~kept].reshape(1, 2, -1, 6).max(-1).values).all()


def test_constant_channel_is_finite():
    cfg = LagConfig(1, 4, 0.5)
    keys = torch.randn(1, 1, 13, 4)
    keys[..., 2] = 3.0  # constant channel: reference max == min
    values = torch.randn(1, 1, 13, 4)
    values[..., 9:, 0] = 1.0  # constant only inside the reference window, different before
    scores = lagkv_scores(keys, values, cfg)
    assert torch.isfinite(scores).all()
    assert lagkv_keep_indices(keys, values, cfg).shape[-1] == cfg.retained_length(13)


def test_bf16_inputs_score_in_float32():
    cfg = LagConfig(2, 8, 0.25)
    g = torch.Generator().manual_seed(1)
    keys, values = torch.randn(1, 3, 40, 16, generator=g), torch.randn(1, 3, 40, 16, generator=g)
    s32 = lagkv_scores(keys, values, cfg)
    s16 = lagkv_scores(keys.bfloat16(), values.bfloat16(), cfg)
    assert s16.dtype == torch.float32
    torch.testing.assert_close(s16, lagkv_scores(keys.bfloat16().float(), values.bfloat16().float(), cfg))
    assert (s16 - s32).abs().max() < 5e-3


def test_gqa_shapes_and_independent_heads():
    cfg = LagConfig(2, 4, 0.5)
    keys, values = torch.randn(3, 5, 30, 8), torch.randn(3, 5, 30, 8)
    assert lagkv_scores(keys, values, cfg).shape == (3, 5, (30 - 2) // 4 - 1, 4)
    idx = lagkv_keep_indices(keys, values, cfg)
    assert idx.shape == (3, 5, cfg.retained_length(30))
    # each head is scored on its own data: permuting heads permutes the selections
    perm = torch.tensor([4, 3, 2, 1, 0])
    assert torch.equal(lagkv_keep_indices(keys[:, perm], values[:, perm], cfg), idx[:, perm])


@pytest.mark.parametrize(
    "keys, values, match",
    [
        (torch.randn(2, 10, 4), torch.randn(2, 10, 4), "4 dimensions"),
        (torch.randn(1, 2, 10, 4), torch.randn(1, 2, 11, 4), "same shape"),
        (torch.randint(0, 3, (1, 1, 10, 4)), torch.randint(0, 3, (1, 1, 10, 4)), "floating-point"),
        (torch.randn(1, 1, 10, 1), torch.randn(1, 1, 10, 1), "head dim"),
        ([1.0], torch.randn(1, 1, 10, 4), "torch.Tensor"),
    ],
)
def test_bad_tensors(keys, values, match):
    with pytest.raises(ValueError, match=match):
        lagkv_scores(keys, values, LagConfig(1, 2, 0.5))


# --- the tie rule: exact ties go to the lower position, everywhere a selection is made ----------------------------

def tied_kv(device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, LagConfig]:
    """K/V whose partition 0 holds copies of 3 distinct tokens (every copy of a token has the same score, exactly)
    and partition 1 random (a reference with a real range). Returns (keys, values, config); tokens [1, 2, 4+2L+5, 8]."""
    cfg = LagConfig(sink_size=4, lag_size=12, ratio=0.25)  # top_k = 3
    g = torch.Generator().manual_seed(11)
    n = cfg.sink_size + 2 * cfg.lag_size + 5
    k, v = torch.randn(1, 2, n, 8, generator=g), torch.randn(1, 2, n, 8, generator=g)
    pattern = torch.tensor([0, 1, 2] * 4)  # partition 0 = tokens a b c a b c ...: each score appears 4 times
    for z in (k, v):
        base = z[:, :, cfg.sink_size: cfg.sink_size + 3].clone()
        z[:, :, cfg.sink_size: cfg.sink_size + cfg.lag_size] = base[:, :, pattern]
    return k.to(device), v.to(device), cfg


def expected_tied_selection(k, v, cfg) -> list[int]:
    """The rule by hand: rank the 3 distinct tokens by score; take the k best slots, lower positions first."""
    scores = lagkv_scores(k, v, cfg)[0, 0, 0]
    order = sorted(range(cfg.lag_size), key=lambda i: (-float(scores[i]), i))
    return sorted(cfg.sink_size + i for i in order[: cfg.top_k])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_exact_ties_go_to_the_lower_position(device):
    from lrsa_viz.cache import compress_once
    from lrsa_viz.fast import compact_positions

    k, v, cfg = tied_kv(device)
    scores = lagkv_scores(k, v, cfg)[0, 0, 0]
    assert len(set(scores.tolist())) == 3  # three distinct values, each tied 4 times: the rule decides
    want = expected_tied_selection(k, v, cfg)
    assert len(want) == 3 and max(want) - min(want) == 6  # 3 copies of the best token, 3 apart: 4 exist
    picked = lagkv_keep_indices(k, v, cfg)[0, 0, cfg.sink_size: cfg.sink_size + cfg.top_k].tolist()
    assert picked == want
    assert compress_once(k, v, cfg)[0, 0, cfg.sink_size: cfg.sink_size + cfg.top_k].tolist() == want
    assert compact_positions(k, v, cfg)[0, 0, cfg.sink_size:].tolist() == want
    if device == "cuda":
        from lrsa_viz.fast import compiled_compact_positions
        assert compiled_compact_positions()(k, v, cfg)[0, 0, cfg.sink_size:].tolist() == want


def test_select_top_k_breaks_ties_by_position_on_a_large_flat_row():
    scores = torch.zeros(2, 3, 4, 128)
    scores[..., 77] = 1.0  # one clear winner, then 127 exact ties
    got = select_top_k(scores, 5)
    assert got.tolist() == [[[[0, 1, 2, 3, 77]] * 4] * 3] * 2
