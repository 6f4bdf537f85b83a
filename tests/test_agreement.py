"""Free-run comparison (lrsa_viz.agreement) and the forced-selection plumbing, on synthetic scores and the tiny model."""
import pytest
import torch

from lrsa_viz import LagConfig, chunked_prefill
from lrsa_viz.agreement import NEAR_TIE_FRACTION, compare_selections, find_flips, logit_tolerance
from lrsa_viz.attention import forced_compact_positions
from lrsa_viz.fast import compact_positions
from lrsa_viz.scoring import keep_mask, keep_mask_from_scores

CFG = LagConfig(sink_size=2, lag_size=8, ratio=0.25)  # top_k = 2


def flat_scores(seed: int = 0) -> torch.Tensor:
    """[layers=2, B=1, H=2, P-1=3, L=8] scores near 2/L with distinct values 1e-3 apart (no ties)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.stack([torch.randperm(8, generator=g) for _ in range(12)]).reshape(2, 1, 2, 3, 8)
    return 2 / 8 + 1e-3 * order.float()


def test_no_flips_when_scores_agree():
    s = flat_scores()
    drifted = s + 1e-6 * torch.randn(s.shape, generator=torch.Generator().manual_seed(1))  # float drift ~1e-6
    assert not torch.equal(drifted, s) and find_flips(s, drifted, CFG) == []


def test_a_near_tie_is_a_flip_with_a_small_gap():
    par = flat_scores()
    chk = par.clone()
    row = par[1, 0, 1, 2]
    second, third = row.argsort(descending=True)[1:3].tolist()  # boundary pair at top_k = 2
    chk[1, 0, 1, 2, third] = row[second] + 1e-7  # the chunked run sees the third token 1e-7 above the second
    chk[1, 0, 1, 2, second] = row[second] - 1e-8
    flips = find_flips(par, chk, CFG)
    assert len(flips) == 1
    f = flips[0]
    assert (f.layer, f.batch, f.kv_head, f.partition) == (1, 0, 1, 2)
    assert (f.parallel_only, f.chunked_only) == (2 + 2 * 8 + second, 2 + 2 * 8 + third)
    assert f.gap <= 2 * f.drift and f.gap < NEAR_TIE_FRACTION * 2 / 8


def test_a_real_disagreement_is_not_a_near_tie():
    """Scores of another window (what a bug in the reference window would give) disagree by far more than drift."""
    from lrsa_viz.agreement import SelectionAgreement

    par, other = flat_scores(0), flat_scores(1)
    flips = find_flips(par, other, CFG)
    assert len(flips) > 3
    agreement = SelectionAgreement(CFG, keep_mask_from_scores(par, 28, CFG), keep_mask_from_scores(other, 28, CFG),
                                   par, other,
                                   torch.zeros(1, 28, 4), torch.zeros(1, 28, 4), flips)
    assert not agreement.all_near_ties()
    assert agreement.n_flips == len(flips) and agreement.kept_slots == 2 * 1 * 2 * 3 * 2


def test_forced_compact_positions_equal_the_computed_ones():
    g = torch.Generator().manual_seed(4)
    k, v = torch.randn(2, 3, 61, 8, generator=g), torch.randn(2, 3, 61, 8, generator=g)
    assert torch.equal(forced_compact_positions(keep_mask(k, v, CFG), CFG), compact_positions(k, v, CFG))


def test_compare_selections_tiny(tiny):
    ids = torch.randint(0, 256, (2, 70), generator=torch.Generator().manual_seed(8))
    agreement = compare_selections(tiny, ids, CFG)
    _, cache = chunked_prefill(tiny, ids, CFG)
    assert torch.equal(agreement.chunked_keep, cache.kept_position_mask())
    assert agreement.all_near_ties()
    assert agreement.max_drift < 1e-5  # float32 rounding of two matmul shapes, scores ~ 2/L = 0.25
    assert agreement.max_logit_diff <= logit_tolerance(agreement.chunked_logits)


def test_forced_selections_flex_equals_reference_cpu(tiny):
    """The fast path honours forced selections like the reference path (flex's CPU forward is PyTorch's reference
    implementation of FlexAttention; on CUDA, tests/test_fast.py compares the compiled kernels)."""
    from lrsa_viz import lrsa

    cfg = LagConfig(2, 16, 0.25)
    ids = torch.randint(0, 256, (2, 90), generator=torch.Generator().manual_seed(9))
    _, cache = chunked_prefill(tiny, ids, cfg)
    keep = cache.kept_position_mask()
    other = keep.clone()
    other[..., 2:18] = keep[..., 2:18].flip(-1)  # another valid selection of partition 0: mirrored offsets
    with torch.no_grad():
        outs = {}
        for backend in ("reference", "flex"):
            for name, k in (("chunked", keep), ("mirrored", other)):
                with lrsa(tiny, cfg, backend=backend, keep=k):
                    outs[backend, name] = tiny(ids).logits
    for name in ("chunked", "mirrored"):
        assert (outs["flex", name] - outs["reference", name]).abs().max().item() <= 1e-4
    assert (outs["reference", "mirrored"] - outs["reference", "chunked"]).abs().max().item() > 1e-3


def test_lrsa_backend_of_resolves_on_cpu(tiny):
    from lrsa_viz import lrsa, lrsa_backend_of

    with lrsa(tiny, CFG):
        assert lrsa_backend_of(tiny) == "auto" and lrsa_backend_of(tiny, resolved=True) == "reference"
    with lrsa(tiny, CFG, backend="flex"):
        assert lrsa_backend_of(tiny, resolved=True) == "flex/triton"  # FlashAttention-4 needs a CUDA GPU
    assert lrsa_backend_of(tiny, resolved=True) is None


def test_forced_selections_on_a_sequence_too_short_to_compress(tiny):
    """Below S + 2L nothing is selected: forced selections change nothing, on both backends."""
    from lrsa_viz import lrsa

    cfg = LagConfig(2, 16, 0.25)
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(10))
    _, cache = chunked_prefill(tiny, ids, cfg)
    with torch.no_grad():
        dense = tiny(ids).logits
        for backend in ("reference", "flex"):
            with lrsa(tiny, cfg, backend=backend, keep=cache.kept_position_mask()):
                assert (tiny(ids).logits - dense).abs().max().item() <= 1e-4


def test_chunked_prefill_rejects_a_cache_it_cannot_fill(tiny):
    import pytest

    from lrsa_viz import LagKVCache

    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(12))
    with pytest.raises(ValueError, match="mode='recursive'"):
        chunked_prefill(tiny, ids, CFG, cache=LagKVCache(CFG, mode="one_shot"))
    with pytest.raises(ValueError, match="not both"):
        chunked_prefill(tiny, ids, CFG, policy="random", cache=LagKVCache(CFG))


def test_free_run_guard_of_the_exact_tests(monkeypatch):
    """tests/helpers.skip_unless_free_runs_agree: no flip, nothing happens (the exact comparison runs); flips that
    are all near-ties skip it; a flip that is not a near-tie fails."""
    import types

    import lrsa_viz.agreement as agreement_module
    from helpers import skip_unless_free_runs_agree

    def fake(n_flips, near):
        return lambda *a: types.SimpleNamespace(n_flips=n_flips, all_near_ties=lambda: near, summary=lambda: "s")

    monkeypatch.setattr(agreement_module, "compare_selections", fake(0, True))
    assert skip_unless_free_runs_agree(None, None, None) is None
    monkeypatch.setattr(agreement_module, "compare_selections", fake(2, True))
    with pytest.raises(pytest.skip.Exception, match="near-ties on this machine"):
        skip_unless_free_runs_agree(None, None, None)
    monkeypatch.setattr(agreement_module, "compare_selections", fake(1, False))
    with pytest.raises(AssertionError):
        skip_unless_free_runs_agree(None, None, None)
