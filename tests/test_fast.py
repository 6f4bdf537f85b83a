"""Fast LRSA (compact K/V layout + FlexAttention) against the reference dense-mask path.

On CPU: the selections, the layout, the block mask (aligned and not), the kernel mask_mod against the readable
interval form, the forward pass of the real FlexAttention call (PyTorch's uncompiled implementation), forced
selections, the kernel choice, the model integration, and the gradient routing of the layout (through an
attention over the same layout and mask that can run backward on CPU). Needs CUDA (skipped here with the reason):
the compiled kernels' (Triton and, where installed, FlashAttention-4) forward and backward in bf16, exact ties,
no host synchronisation, a model training step; the benchmark script checks them too on every GPU run.
"""
import copy
import itertools
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_mask

from lrsa_viz import LagConfig, LagKVCache, cast_model, chunked_prefill, disable_lrsa, enable_lrsa, lrsa
from lrsa_viz.attention import lrsa_backend_of, resolve_backend
from lrsa_viz.fast import LrsaLayout, block_classes, buffer_positions, compact_positions, fast_lrsa_attention, layout_kv
from lrsa_viz.fast.cost import dense_causal_pairs, kv_cache_bytes, lrsa_tiles, lrsa_visible_pairs
from lrsa_viz.fast.kernel import (FastOptions, fast_options, flash_unavailable_reason, flex_kernel_backend,
                                  kernel_report)
from lrsa_viz.fast.layout import lrsa_block_mask, make_mask_mod, visible_bounds
from lrsa_viz.mask import lrsa_visibility, visibility_from_keep
from lrsa_viz.scoring import lagkv_keep_indices

# (config, N, block size): N not a multiple of L or of the block, no sink, odd sizes, k and L not multiples of the
# block, L smaller than the block, the default config with the default block
CASES = [
    (LagConfig(4, 16, 0.25), 150, 16),
    (LagConfig(0, 8, 0.5), 61, 16),
    (LagConfig(3, 5, 0.4), 77, 16),
    (LagConfig(1, 6, 1 / 6), 100, 32),
    (LagConfig(16, 32, 0.25), 300, 64),
    (LagConfig(16, 128, 0.25), 700, 128),
]
ids = [f"S{c.sink_size}-L{c.lag_size}-r{c.ratio:.3g}-N{n}-B{b}" for c, n, b in CASES]
ALIGN = [False, True]  # query blocks at multiples of BLOCK, or aligned with the partitions (D pad rows)


def random_qkv(n, b=2, hq=4, hkv=2, d=16, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, dtype=dtype).to(device) for h in (hq, hkv, hkv)]


def reference(q, k, v, cfg):
    """The reference path: dense LRSA mask, SDPA with repeated K/V heads."""
    g = q.shape[1] // k.shape[1]
    visible = lrsa_visibility(k.detach(), v.detach(), cfg).repeat_interleave(g, 1)
    return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=visible)


@pytest.mark.parametrize("cfg, n, bs", CASES, ids=ids)
def test_selected_positions_are_lagkv(cfg, n, bs):
    q, k, v = random_qkv(n, seed=n)
    pos = compact_positions(k, v, cfg)
    layout = LrsaLayout.of(n, cfg, bs)
    assert pos.shape[-1] == layout.compact == cfg.sink_size + (cfg.num_partitions(n) - 1) * cfg.top_k
    assert torch.equal(pos, lagkv_keep_indices(k, v, cfg)[..., : layout.compact])


def layout_mask(layout):
    """[q_len, kv_len] bool: the kernel's mask_mod materialised over the query and key buffers."""
    return create_mask(make_mask_mod(layout), None, None, layout.q_len, layout.kv_len, device="cpu")[0, 0]


def interval_mask(layout):
    """[q_len, kv_len] bool from the readable interval form `visible_bounds` (row i is position i - D)."""
    a, b, c = visible_bounds(torch.arange(layout.q_len)[:, None] - layout.query_pad, layout.params().long())
    kv = torch.arange(layout.kv_len)[None, :]
    return (kv < a) | ((kv >= b) & (kv <= c))


def test_kernel_mask_mod_equals_the_interval_form():
    """The mask_mod written for the kernels (no clamp/where, non-negative floor division) equals the interval
    form for many (N, S, L, r, block), S and N multiples of the block or not, queries aligned or not."""
    checked = 0
    for s, lag, ratio, n, bs, align in itertools.product(
            [0, 1, 3, 16, 130], [5, 16, 32, 128], [0.25, 0.5, 1 / 8], [61, 150, 300, 700], [16, 32, 128], ALIGN):
        cfg = LagConfig(s, lag, ratio) if int(ratio * lag) >= 1 else None
        if cfg is None or cfg.num_partitions(n) < 2:
            continue
        layout = LrsaLayout.of(n, cfg, bs, align_queries=align)
        assert layout.query_pad == (-s % bs if align else 0)
        assert torch.equal(layout_mask(layout), interval_mask(layout)), layout
        checked += 1
    assert checked > 300


@pytest.mark.parametrize("align", ALIGN)
@pytest.mark.parametrize("cfg, n, bs", CASES, ids=ids)
def test_layout_mask_is_the_lrsa_mask(cfg, n, bs, align):
    """Mapped back to token positions, the static layout mask shows each query exactly its LRSA keys, once;
    padding rows of an aligned query buffer see key 0 only."""
    _, k, v = random_qkv(n, seed=n + 1)
    layout = LrsaLayout.of(n, cfg, bs, align_queries=align)
    full = layout_mask(layout)
    pad = layout.query_pad
    assert full[:pad].sum() == pad and full[:pad, 0].all()
    dense = full[pad:]
    positions = buffer_positions(compact_positions(k, v, cfg), layout)
    visible = lrsa_visibility(k, v, cfg)
    rows, cols = dense.nonzero(as_tuple=True)
    for b in range(k.shape[0]):
        for h in range(k.shape[1]):
            tokens = positions[b, h, cols]
            assert (tokens >= 0).all(), "a padding slot is visible"
            seen = torch.zeros(n, n, dtype=torch.long).index_put_((rows, tokens), torch.ones_like(rows), accumulate=True)
            assert seen.max() == 1, "a key is visible twice"
            assert torch.equal(seen.bool(), visible[b, h])


@pytest.mark.parametrize("align", ALIGN)
@pytest.mark.parametrize("cfg, n, bs", CASES, ids=ids)
def test_block_classes_are_exact(cfg, n, bs, align):
    """Empty / partial / full tiles computed from the intervals equal those of the materialised mask."""
    layout = LrsaLayout.of(n, cfg, bs, align_queries=align)
    dense = layout_mask(layout)
    n_q = -(-layout.q_len // bs)
    tiles = dense[torch.arange(n_q * bs).clamp(max=layout.q_len - 1)].view(n_q, bs, -1, bs)
    partial, full = block_classes(layout)
    assert torch.equal(full, tiles.all(3).all(1))
    assert torch.equal(partial, tiles.any(3).any(1) & ~tiles.all(3).all(1))
    bm = lrsa_block_mask(layout, "cpu")
    assert bm.shape == (1, 1, layout.q_len, layout.kv_len)
    assert torch.equal(bm.kv_num_blocks[0, 0], partial.sum(-1).int())
    assert torch.equal(bm.full_kv_num_blocks[0, 0], full.sum(-1).int())


@pytest.mark.parametrize("align", ALIGN)
@pytest.mark.parametrize("cfg, n, bs", CASES, ids=ids)
def test_fast_forward_matches_reference(cfg, n, bs, align):
    q, k, v = random_qkv(n, seed=n + 2)
    out = fast_lrsa_attention(q, k, v, cfg, block_size=bs, align_queries=align)
    ref = reference(q, k, v, cfg)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= 1e-5
    # the mask matters: dense causal attention gives another result
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert (out - dense).abs().max().item() > 1e-2


def test_short_sequences_and_ratio_one_are_causal():
    q, k, v = random_qkv(40)
    causal = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.allclose(fast_lrsa_attention(q, k, v, LagConfig(16, 32, 0.25)), causal, atol=1e-6)  # N < S + 2L
    assert torch.allclose(fast_lrsa_attention(q, k, v, LagConfig(2, 4, 1.0)), causal, atol=1e-6)


def layout_attention_dense(q, k, v, cfg, bs, align=False):
    """Same layout, query padding and mask as the fast path, attended with SDPA (so backward runs on CPU)."""
    from lrsa_viz.fast.layout import pad_queries
    layout = LrsaLayout.of(q.shape[2], cfg, bs, align_queries=align)
    with torch.no_grad():
        pos = compact_positions(k, v, cfg)
    kb, vb = layout_kv(k, v, pos, layout)
    out = F.scaled_dot_product_attention(pad_queries(q, layout), kb, vb, attn_mask=layout_mask(layout), enable_gqa=True)
    return out[:, :, layout.query_pad:]


@pytest.mark.parametrize("align", ALIGN)
@pytest.mark.parametrize("cfg, n, bs", CASES[:3], ids=ids[:3])
def test_layout_gradients_match_reference(cfg, n, bs, align):
    """d(loss)/dK of a kept token sums its two copies (compact and full region): it equals the reference's.
    With aligned queries the padding rows give no gradient to anything."""
    q, k, v = (t.requires_grad_() for t in random_qkv(n, seed=n + 3))
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(9))
    got = torch.autograd.grad(layout_attention_dense(q, k, v, cfg, bs, align), (q, k, v), grad_out)
    want = torch.autograd.grad(reference(q, k, v, cfg), (q, k, v), grad_out)
    for g, w in zip(got, want):
        assert (g - w).abs().max().item() <= 1e-5
    kept = lagkv_keep_indices(k, v, cfg)[0, 0, cfg.sink_size]  # a selected (compact-region) token
    assert want[1][0, 0, kept].abs().sum() > 0


def test_layout_keeps_no_copy_of_the_keys_for_backward():
    """Building the buffers saves only integer indices for backward: the post-RoPE K/V are not kept alive."""
    cfg = LagConfig(4, 16, 0.25)
    _, k, v = (t.requires_grad_() for t in random_qkv(150))
    layout = LrsaLayout.of(150, cfg)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        kb, vb = layout_kv(k, v, compact_positions(k.detach(), v.detach(), cfg), layout)
    assert saved and all(not t.is_floating_point() for t in saved)
    (kb.sum() + 2 * vb.sum()).backward()
    copies = torch.ones(150)
    copies[lagkv_keep_indices(k, v, cfg)[0, 0, : layout.compact]] += 1  # kept tokens appear twice (S excluded below)
    copies[: cfg.sink_size] = 1  # the sink is only in the compact region
    assert torch.equal(k.grad[0, 0, :, 0], copies) and torch.equal(v.grad[0, 0, :, 0], 2 * copies)


def test_flex_backward_on_cpu_is_a_clear_error():
    q, k, v = (t.requires_grad_() for t in random_qkv(150))
    with pytest.raises(ValueError, match="backend='reference'"):
        fast_lrsa_attention(q, k, v, LagConfig(4, 16, 0.25), block_size=16)


def test_bad_shapes_are_clear_errors():
    q, k, v = random_qkv(150)
    with pytest.raises(ValueError, match="key must be"):
        fast_lrsa_attention(q, k[:, :, :100], v[:, :, :100], LagConfig(4, 16, 0.25))
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        fast_lrsa_attention(q[:, :3], k, v, LagConfig(4, 16, 0.25))
    with pytest.raises(ValueError, match="block_size"):
        LrsaLayout.of(150, LagConfig(4, 16, 0.25), block_size=48)
    with pytest.raises(ValueError, match="seq_len"):
        LrsaLayout.of(30, LagConfig(4, 16, 0.25))


def keep_from_positions(positions, cfg, n):
    """[B, H_kv, N] keep mask of one-shot compression with the given compact positions (sink + selections), the
    last full partition and the remainder kept whole, like `lagkv_keep_indices`."""
    kept = torch.zeros(*positions.shape[:2], n, dtype=torch.bool, device=positions.device)
    kept[..., cfg.sink_size + (cfg.num_partitions(n) - 1) * cfg.lag_size:] = True
    return kept.scatter_(-1, positions, True)


def reference_with_positions(q, k, v, cfg, positions):
    g = q.shape[1] // k.shape[1]
    visible = visibility_from_keep(keep_from_positions(positions, cfg, q.shape[2]), cfg).repeat_interleave(g, 1)
    return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=visible)


def random_positions(cfg, n, b, h, seed):
    """Valid compact positions, other than LagKV's: a random k-subset of every scored partition, ascending."""
    g = torch.Generator().manual_seed(seed)
    p, s, lag, k = cfg.num_partitions(n), cfg.sink_size, cfg.lag_size, cfg.top_k
    chosen = torch.rand(b, h, p - 1, lag, generator=g).argsort(-1)[..., :k].sort(-1).values
    chosen = chosen + s + lag * torch.arange(p - 1)[:, None]
    return torch.cat([torch.arange(s).expand(b, h, s), chosen.flatten(2)], -1)


@pytest.mark.parametrize("align", ALIGN)
@pytest.mark.parametrize("cfg, n, bs", [(LagConfig(4, 16, 0.25), 150, 16), (LagConfig(1, 6, 1 / 6), 100, 32)],
                         ids=["L16-B16", "L6-B32"])  # the second pads N = 100 to 128: 4 more scored partitions
def test_forced_positions_replace_the_selection(cfg, n, bs, align):
    """``positions=`` (e.g. another run's selections) is attended exactly like the reference mask built from it."""
    q, k, v = random_qkv(n, seed=11)
    forced = random_positions(cfg, n, 2, 2, seed=3)
    assert not torch.equal(forced, compact_positions(k, v, cfg))  # a different selection than LagKV's
    out = fast_lrsa_attention(q, k, v, cfg, block_size=bs, positions=forced, align_queries=align)
    assert (out - reference_with_positions(q, k, v, cfg, forced)).abs().max().item() <= 1e-5
    assert (out - reference(q, k, v, cfg)).abs().max().item() > 1e-3  # the forced selection is what was used
    own = fast_lrsa_attention(q, k, v, cfg, block_size=bs, positions=compact_positions(k, v, cfg))
    assert torch.equal(own, fast_lrsa_attention(q, k, v, cfg, block_size=bs))


def test_bad_forced_positions_are_clear_errors():
    cfg, n = LagConfig(4, 16, 0.25), 150
    q, k, v = random_qkv(n)
    good = random_positions(cfg, n, 2, 2, seed=1)
    bad = {
        "shape": good[..., :-1], "dtype": good.int(), "sink": good.clone().index_fill_(-1, torch.tensor([0]), 3),
        "outside its partition": good.clone().index_fill_(-1, torch.tensor([cfg.sink_size]), 0),
        "not ascending": good.flip(-1),
    }
    for what, positions in bad.items():
        with pytest.raises(ValueError, match="positions must"):
            fast_lrsa_attention(q, k, v, cfg, block_size=16, positions=positions)


def test_kernel_choice_is_one_function(monkeypatch):
    """Without a CUDA GPU with FlashAttention-4 the kernel is triton; an explicit 'flash' there is an error that
    says why; the environment variable overrides 'auto'; unknown names are errors."""
    monkeypatch.delenv("LRSA_VIZ_FLEX_BACKEND", raising=False)
    assert flex_kernel_backend("cpu") == "triton" and flex_kernel_backend("cpu", kernel="triton") == "triton"
    with pytest.raises(ValueError, match="kernel='flash' cannot run here: the device is not a CUDA GPU"):
        flex_kernel_backend("cpu", kernel="flash")
    with pytest.raises(ValueError, match="kernel must be one of"):
        flex_kernel_backend("cpu", kernel="fastest")
    monkeypatch.setenv("LRSA_VIZ_FLEX_BACKEND", "flash")
    with pytest.raises(ValueError, match="LRSA_VIZ_FLEX_BACKEND='flash' cannot run here"):
        flex_kernel_backend("cpu")
    assert flex_kernel_backend("cpu", kernel="auto") == "triton"  # the argument wins over the environment
    monkeypatch.setenv("LRSA_VIZ_FLEX_BACKEND", "cudnn")
    with pytest.raises(ValueError, match="LRSA_VIZ_FLEX_BACKEND must be one of"):
        fast_lrsa_attention(*random_qkv(150), LagConfig(4, 16, 0.25), block_size=16)
    monkeypatch.setenv("LRSA_VIZ_FLEX_BACKEND", "triton")
    assert kernel_report("cpu")["kernel"] == "triton" and kernel_report("cpu")["requested"] == "triton"


def test_flash_only_for_the_head_sizes_it_was_checked_at(monkeypatch):
    """On a GPU where FlashAttention-4 runs (pretended here), 'auto' takes it for head_dim 64 (the size checked on a
    GPU) and Triton for other sizes; an explicit 'flash' at head_dim 16 (wrong gradients on an H100) is an error
    naming head_dim."""
    import lrsa_viz.fast.kernel as kernel_module
    monkeypatch.delenv("LRSA_VIZ_FLEX_BACKEND", raising=False)
    monkeypatch.setattr(kernel_module, "flash_unavailable_reason", lambda index=None: None)
    assert [flex_kernel_backend("cuda", torch.bfloat16, d) for d in (16, 32, 64, 96, 128, 256)] == \
        ["triton", "triton", "flash", "triton", "triton", "triton"]
    with pytest.raises(ValueError, match=r"kernel='flash' cannot run here: head_dim 16: .* \(64,\)"):
        flex_kernel_backend("cuda", torch.bfloat16, 16, kernel="flash")
    assert flex_kernel_backend("cuda", torch.float32, 64) == "triton"
    if not torch.cuda.is_available():
        assert flash_unavailable_reason() == "no CUDA device"
        assert kernel_report()["flash_unavailable_reason"] == "the device is not a CUDA GPU"


def test_options_from_arguments_and_environment(monkeypatch):
    for name in ("LRSA_VIZ_FLEX_BACKEND", "LRSA_VIZ_FUSED_REGION", "LRSA_VIZ_ALIGN_QUERIES"):
        monkeypatch.delenv(name, raising=False)
    assert fast_options() == FastOptions()
    monkeypatch.setenv("LRSA_VIZ_FUSED_REGION", "1")
    monkeypatch.setenv("LRSA_VIZ_ALIGN_QUERIES", "0")
    assert fast_options() == FastOptions(fused=True, align_queries=False)
    assert fast_options(fused=False, align_queries=True, kernel="TRITON") == FastOptions("triton", False, True)
    monkeypatch.setenv("LRSA_VIZ_FUSED_REGION", "0")
    assert fast_options() == FastOptions(fused=False, align_queries=False) and FastOptions().fused
    monkeypatch.setenv("LRSA_VIZ_ALIGN_QUERIES", "maybe")
    with pytest.raises(ValueError, match="LRSA_VIZ_ALIGN_QUERIES must be 0 or 1"):
        fast_options()


def test_autocast_selects_from_the_given_tensors():
    """Under autocast (training with bf16 autocast: post-RoPE q/k in float32, v in bf16) the selection reads K/V as
    given, like the reference path, and the attention runs in the autocast dtype."""
    cfg, n = LagConfig(4, 16, 0.25), 150
    q, k, v = random_qkv(n, seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fast_lrsa_attention(q, k, v.bfloat16(), cfg, block_size=16)
    assert out.dtype == torch.bfloat16
    ref = reference(q, k, v.bfloat16().float(), cfg)
    # bf16 rounding of q, k, v and of the output: relative L2 error of a few 2^-8
    assert ((out.float() - ref).norm() / ref.norm()).item() <= 2e-2
    with pytest.raises(ValueError, match="one dtype"):
        fast_lrsa_attention(q, k, v.bfloat16(), cfg, block_size=16)


def test_datasheet_bandwidth_by_device_name():
    """Bandwidth fractions are taken against the GPU the run had (an H100 run is not measured against an H200)."""
    from lrsa_viz.fast.cost import datasheet_bandwidth
    assert datasheet_bandwidth("NVIDIA H200") == 4.8e12
    assert datasheet_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12 and datasheet_bandwidth("NVIDIA H100 PCIe") == 2.0e12
    assert datasheet_bandwidth("NVIDIA GeForce RTX 4090") is None


def test_cost_model_counts_the_mask():
    for cfg, n, _ in CASES:
        _, k, v = random_qkv(n, b=1, hkv=1)
        assert lrsa_visible_pairs(n, cfg) == int(lrsa_visibility(k, v, cfg).sum())
    assert lrsa_visible_pairs(40, LagConfig(16, 32, 0.25)) == dense_causal_pairs(40)
    tiles = lrsa_tiles(8192, LagConfig())
    assert tiles["dense_causal"] == 64 * 65 // 2 and tiles["partial"] + tiles["full"] < tiles["dense_causal"] / 2.5
    # query blocks aligned with the partitions (S = 16 is not a multiple of 128): fewer tiles, half as many partial
    for n in (8192, 32768):
        aligned, plain = lrsa_tiles(n, LagConfig(), align_queries=True), lrsa_tiles(n, LagConfig(), align_queries=False)
        assert aligned["partial"] + aligned["full"] < plain["partial"] + plain["full"]
        assert aligned["partial"] < 0.5 * plain["partial"]
    assert lrsa_tiles(8192, LagConfig(128, 128, 0.25), align_queries=True) == lrsa_tiles(
        8192, LagConfig(128, 128, 0.25), align_queries=False)  # S a multiple of the block: nothing to align
    assert kv_cache_bytes(1000, 30, 3, 64) == 2 * 30 * 3 * 64 * 1000 * 2
    assert kv_cache_bytes(1000, 30, 3, 64, config=LagConfig()) == 2 * 30 * 3 * 64 * LagConfig().retained_length(1000) * 2


# ---------------------------------------------------------------------------------------------- model integration
def logits(model, ids, cfg, backend, **kw):
    with torch.no_grad(), lrsa(model, cfg, backend=backend):
        return model(ids, **kw).logits


def test_backend_selection(tiny):
    assert resolve_backend("auto", "cpu") == "reference" and resolve_backend("auto", "cuda") == "flex"
    with pytest.raises(ValueError, match="backend must be one of"):
        enable_lrsa(tiny, LagConfig(), backend="fastest")
    enable_lrsa(tiny, LagConfig(), backend="flex")
    assert lrsa_backend_of(tiny) == "flex"
    with lrsa(tiny, LagConfig(1, 2, 0.5), backend="reference"):
        assert lrsa_backend_of(tiny) == "reference"
    assert lrsa_backend_of(tiny) == "flex"
    disable_lrsa(tiny)
    assert lrsa_backend_of(tiny) is None and not hasattr(tiny.config, "lrsa_backend")


@pytest.mark.parametrize("cfg, n", [(LagConfig(4, 16, 0.25), 150), (LagConfig(3, 5, 0.4), 77), (LagConfig(16, 32, 0.125), 40)])
def test_model_flex_equals_reference(tiny, cfg, n, monkeypatch):
    import lrsa_viz.fast
    calls = []
    fast = lrsa_viz.fast.fast_lrsa_attention
    monkeypatch.setattr(lrsa_viz.fast, "fast_lrsa_attention", lambda *a, **k: calls.append(1) or fast(*a, **k))
    ids = torch.randint(0, 256, (2, n), generator=torch.Generator().manual_seed(n))
    flex = logits(tiny, ids, cfg, "flex")
    assert len(calls) == tiny.config.num_hidden_layers, "backend='flex' must run the fast path in every layer"
    ref = logits(tiny, ids, cfg, "reference")
    assert (flex - ref).abs().max().item() <= 1e-4
    chunked, _ = chunked_prefill(tiny, ids, cfg)  # the central equivalence holds for the fast path too
    assert (flex - chunked).abs().max().item() <= 1e-4


def test_model_flex_right_padding_and_left_padding(tiny):
    cfg = LagConfig(2, 6, 0.5)
    g = torch.Generator().manual_seed(7)
    long, short = torch.randint(0, 256, (1, 60), generator=g), torch.randint(0, 256, (1, 41), generator=g)
    batch = torch.cat([long, torch.cat([short, torch.zeros(1, 19, dtype=torch.long)], 1)])
    mask = torch.ones_like(batch)
    mask[1, 41:] = 0
    import lrsa_viz.attention
    assert lrsa_viz.attention.lrsa_mask_interface(
        batch_size=2, q_length=60, kv_length=60, attention_mask=mask, config=tiny.config) is not None  # LRSA off: mask
    with lrsa(tiny, cfg, backend="flex"):  # the fast path needs (and builds) no [B, 1, N, N] mask
        assert lrsa_viz.attention.lrsa_mask_interface(
            batch_size=2, q_length=60, kv_length=60, attention_mask=mask, config=tiny.config) is None
    padded = logits(tiny, batch, cfg, "flex", attention_mask=mask)
    assert (padded[1, :41] - logits(tiny, short, cfg, "reference")[0]).abs().max() <= 1e-4
    assert (padded[0] - logits(tiny, long, cfg, "reference")[0]).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="right-padded"):
        logits(tiny, batch, cfg, "flex", attention_mask=mask.flip(1))


def test_model_flex_with_caches(tiny):
    """Prefill into a LagKVCache runs the fast path, decoding delegates; generation equals the reference."""
    cfg = LagConfig(4, 8, 0.25)
    ids = torch.randint(0, 256, (2, 45), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    out = {}
    for backend in ("flex", "reference"):
        with torch.no_grad(), lrsa(tiny, cfg, backend=backend):
            out[backend, "lagkv"] = tiny.generate(ids, past_key_values=LagKVCache(cfg), **kw)
            out[backend, "full"] = tiny.generate(ids, **kw)
    assert torch.equal(out["flex", "lagkv"], out["reference", "lagkv"])
    assert torch.equal(out["flex", "full"], out["reference", "full"])
    assert torch.equal(out["flex", "lagkv"], out["flex", "full"])


# ---------------------------------------------------------------------------------------------------- CUDA only
cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs CUDA: PyTorch has no FlexAttention backward on CPU, and the compiled kernels are CUDA code",
)
KERNELS = ["triton", "flash"]


def needs_kernel(kernel):
    """Skip (with the reason) a FlashAttention-4 case where FlexAttention's FLASH backend cannot run."""
    if kernel == "flash" and flash_unavailable_reason() is not None:
        pytest.skip(f"FlashAttention-4 FLASH backend unavailable: {flash_unavailable_reason()}")


def rel(x, ref):
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


@cuda
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("ratio, align, fused", [(0.25, True, False), (0.125, True, False), (0.25, False, False),
                                                 (0.25, True, True)])
def test_cuda_bf16_outputs_and_gradients(kernel, ratio, align, fused):
    """bf16 fast path vs the float32 reference: relative L2 error at most 1e-2, and at most 1.5x the bf16
    reference path's own error (+1e-3): the fast path may round differently, not worse than bf16 allows.
    N = 1100: neither N nor the sink a multiple of the block."""
    needs_kernel(kernel)
    cfg = LagConfig(16, 128, ratio)
    q, k, v = random_qkv(1100, b=2, hq=9, hkv=3, d=64, seed=4, dtype=torch.bfloat16, device="cuda")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    grad_out = torch.randn_like(q)
    fast = [fast_lrsa_attention(q, k, v, cfg, kernel=kernel, align_queries=align, fused=fused)]
    fast += torch.autograd.grad(fast[0], (q, k, v), grad_out)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = [reference(q32, k32, v32, cfg)]
    ref += torch.autograd.grad(ref[0], (q32, k32, v32), grad_out.float())
    ref16 = [reference(q, k, v, cfg)]
    ref16 += torch.autograd.grad(ref16[0], (q, k, v), grad_out)
    for name, f, r, r16 in zip(["out", "dq", "dk", "dv"], fast, ref, ref16):
        err, err16 = rel(f, r), rel(r16, r)
        assert err <= 1e-2 and err <= 1.5 * err16 + 1e-3, (name, err, err16)
    with torch.no_grad():
        from lrsa_viz.fast import compiled_compact_positions
        pos = compiled_compact_positions()(k, v, cfg)
        assert torch.equal(pos, lagkv_keep_indices(k, v, cfg)[..., : pos.shape[-1]])


def tied_keys_values(cfg, n, b=2, h=3, d=64, seed=0):
    """K/V [B, H, N, d] bf16 on CUDA where every partition holds only three distinct token vectors, repeated
    (counts 20/40/68 of L = 128, in random order): equal tokens get bit-identical scores, and the top-k cut
    (k = 32) always falls inside a group of exact ties."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.tensor([20, 40, 68])
    assert counts.sum() == cfg.lag_size
    k, v = torch.randn(2, b, h, n, d, generator=g)
    for p in range(cfg.num_partitions(n)):
        start = cfg.sink_size + p * cfg.lag_size
        group = torch.repeat_interleave(torch.arange(3), counts)[torch.randperm(cfg.lag_size, generator=g)]
        for z in (k, v):  # the same grouping for K and V: a token's score depends on its group only
            z[:, :, start:start + cfg.lag_size] = torch.randn(b, h, 3, d, generator=g)[:, :, group]
    return [z.to("cuda", torch.bfloat16) for z in (k, v)]


@cuda
def test_cuda_exact_ties_go_to_the_lower_position():
    """Constructed exact ties: the compiled selection of the fast path equals the reference (eager) selection,
    and both follow the rule: exact ties to the lower position (checked here from the scores, in Python)."""
    from lrsa_viz.fast import compiled_compact_positions
    from lrsa_viz.scoring import lagkv_scores
    cfg, n = LagConfig(16, 128, 0.25), 16 + 6 * 128 + 40
    k, v = tied_keys_values(cfg, n)
    with torch.no_grad():
        fast = compiled_compact_positions()(k, v, cfg)
        ref = lagkv_keep_indices(k, v, cfg)[..., : fast.shape[-1]]
        scores = lagkv_scores(k, v, cfg).cpu()  # [B, H, P-1, L]
    assert torch.equal(fast, ref)
    ties_at_the_cut = 0
    for b, h, p in itertools.product(*(range(x) for x in scores.shape[:3])):
        row = scores[b, h, p].tolist()
        order = sorted(range(cfg.lag_size), key=lambda t: (-row[t], t))  # highest first, ties: lower position first
        want = sorted(order[: cfg.top_k])
        ties_at_the_cut += row[order[cfg.top_k - 1]] == row[order[cfg.top_k]]
        start = cfg.sink_size + p * cfg.lag_size
        got = (fast[b, h, cfg.sink_size + p * cfg.top_k: cfg.sink_size + (p + 1) * cfg.top_k].cpu() - start).tolist()
        assert got == want, (b, h, p)
    assert ties_at_the_cut == scores.shape[0] * scores.shape[1] * scores.shape[2]  # every cut is an exact tie


@cuda
@pytest.mark.parametrize("kernel", KERNELS)
def test_cuda_fast_path_makes_no_host_sync(kernel):
    """After warm-up (compilation, block mask), forward + backward of the fast path, with and without forced
    selections, never synchronises the host with the device (torch.cuda sync debug mode 'error' raises if so)."""
    needs_kernel(kernel)
    cfg = LagConfig(16, 128, 0.25)
    q, k, v = (t.requires_grad_() for t in random_qkv(2048, b=2, hq=9, hkv=3, d=64, dtype=torch.bfloat16,
                                                        device="cuda"))
    grad_out = torch.randn_like(q)
    with torch.no_grad():
        forced = compact_positions(k, v, cfg)

    def step(**kw):
        torch.autograd.grad(fast_lrsa_attention(q, k, v, cfg, kernel=kernel, **kw), (q, k, v), grad_out)

    for kw in ({}, {"positions": forced}):
        step(**kw)  # warm-up: compiles, builds and caches the block mask
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step(**kw)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()


@cuda
@pytest.mark.parametrize("kernel", KERNELS)
def test_cuda_return_kept_in_the_region_without_host_sync(kernel):
    """The prefill form (no grad, ``return_kept``, the default fused region): the kept positions are exactly eq. 12
    of LagKV's selection (`lagkv_keep_indices`, the eager scoring module on the same bf16 K/V) for N = 1100 and 1150
    (one block count: the length enters the region as a device scalar), the output that of the call without it
    (another graph of the same region: rounding only), and after warm-up no host sync."""
    needs_kernel(kernel)
    cfg = LagConfig(16, 128, 0.25)
    with torch.no_grad():
        for n in (1100, 1150):
            q, k, v = random_qkv(n, b=2, hq=9, hkv=3, d=64, seed=n, dtype=torch.bfloat16, device="cuda")
            out, kept = fast_lrsa_attention(q, k, v, cfg, kernel=kernel, return_kept=True)
            assert torch.equal(kept, lagkv_keep_indices(k, v, cfg)), n
            assert rel(out, fast_lrsa_attention(q, k, v, cfg, kernel=kernel)) < 1e-3, n
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fast_lrsa_attention(q, k, v, cfg, kernel=kernel, return_kept=True)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()


@cuda
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_cuda_model_training_step_matches_reference(tiny, kernel, head_dim, monkeypatch):
    """One bf16 training step (loss + backward) of the tiny model: fast path vs reference path, same selections.
    ``head_dim`` 16 (the tiny model's), 64 (SmolLM2's) and 128. On an H100 (2026-12-07) FlashAttention-4 at head_dim
    16 gave a k_proj gradient 74% off the float32 run (bf16 SDPA: 2.7%) while 64 matched: fast LRSA now refuses
    flash outside `FLASH_HEAD_DIMS` (a clear error; ``auto`` takes Triton there), checked first. To admit another
    size, add it there: this test then runs the flash kernel at it.

    Both runs go through the model's LRSA attention with backend='flex' (which hands full sequences to
    `lrsa_viz.fast.fast_lrsa_attention`); for the reference run that function is replaced by the reference math
    (dense LRSA mask from the one-shot keep mask, SDPA), and every layer's selections are recorded.
    1. Selections: the free runs' positions are compared first. They may differ at bf16 near-ties (a layer's K/V
       depend on the previous layers' outputs, which the two paths round differently), which is not an error of
       the kernel; then the fast run is repeated with the reference run's selections forced (``positions=``).
    2. Gradients, under identical selections: error against a float32 run of the same weights and selections.
       The fast path is another bf16 implementation of the same math, so its error must be of the order of the
       bf16 reference path's own error: at most 2x it, + 1e-3 (norms near bf16 resolution, 2^-8 ~ 4e-3).
    """
    needs_kernel(kernel)
    import lrsa_viz.fast
    from lrsa_viz.fast import compiled_compact_positions
    from lrsa_viz.fast.kernel import FLASH_HEAD_DIMS
    real = lrsa_viz.fast.fast_lrsa_attention
    if kernel == "flash" and head_dim not in FLASH_HEAD_DIMS:
        q, k, v = random_qkv(256, b=1, hq=4, hkv=2, d=head_dim, dtype=torch.bfloat16, device="cuda")
        with pytest.raises(ValueError, match=f"head_dim {head_dim}"):
            real(q, k, v, LagConfig(4, 16, 0.25), kernel="flash")
        assert flex_kernel_backend("cuda", torch.bfloat16, head_dim, kernel="auto") == "triton"
        return
    cfg = LagConfig(4, 16, 0.25)
    ids = torch.randint(0, 256, (2, 300), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    config = copy.deepcopy(tiny.config)
    config.head_dim = head_dim
    torch.manual_seed(0)
    model32 = type(tiny)(config).to("cuda", torch.float32)  # random weights (head_dim 16: the tiny model's own)
    if head_dim == tiny.config.head_dim:
        model32.load_state_dict(tiny.state_dict())
    model16 = cast_model(copy.deepcopy(model32), torch.bfloat16)
    model32.load_state_dict(model16.state_dict())  # the same (bf16-rounded) weights in float32

    def reference_attention(record, forced=None):
        def attend(q, k, v, config, scaling=None, **_):
            n, g = q.shape[2], q.shape[1] // k.shape[1]
            with torch.no_grad():
                c = config.sink_size + (config.num_partitions(n) - 1) * config.top_k
                pos = forced[len(record)] if forced else lagkv_keep_indices(k.detach(), v.detach(), config)[..., :c]
                record.append(pos)
                visible = visibility_from_keep(keep_from_positions(pos, config, n), config).repeat_interleave(g, 1)
            return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                                  attn_mask=visible, scale=scaling)
        return attend

    def fast_attention(record, forced=None):
        def attend(q, k, v, config, scaling=None, **_):
            if forced:
                pos = forced[len(record)]
            else:  # what the fast path computes inside (the same compiled function), recorded
                with torch.no_grad():
                    pos = compiled_compact_positions()(k.detach(), v.detach(), config)
            record.append(pos)
            return real(q, k, v, config, scaling, kernel=kernel, positions=pos if forced else None)
        return attend

    def step(model, attention):
        model.zero_grad(set_to_none=True)
        monkeypatch.setattr(lrsa_viz.fast, "fast_lrsa_attention", attention)
        with lrsa(model, cfg, backend="flex"):
            model(ids, labels=ids).loss.backward()
        monkeypatch.setattr(lrsa_viz.fast, "fast_lrsa_attention", real)
        return {name: p.grad.float().clone() for name, p in model.named_parameters()}

    ref_pos, fast_pos = [], []
    ref16 = step(model16, reference_attention(ref_pos))
    fast16 = step(model16, fast_attention(fast_pos))
    assert len(ref_pos) == len(fast_pos) == tiny.config.num_hidden_layers
    differing = [int((a != b).sum()) for a, b in zip(ref_pos, fast_pos)]
    if any(differing):  # near-ties decided differently: compare under the reference run's selections
        fast16 = step(model16, fast_attention([], forced=ref_pos))
    fp32 = step(model32, reference_attention([], forced=ref_pos))
    k_proj = "model.layers.0.self_attn.k_proj.weight"
    everything = lambda g: torch.cat([x.flatten() for x in g.values()])  # noqa: E731
    for what, pick in ((k_proj, lambda g: g[k_proj]), ("all parameters", everything)):
        err, err16 = rel(pick(fast16), pick(fp32)), rel(pick(ref16), pick(fp32))
        assert err <= 2 * err16 + 1e-3, (what, err, err16, f"positions differing per layer (free runs): {differing}")


# ------------------------------------------------------------------------------------------- figures and results
def test_figures_from_the_committed_benchmark():
    from pathlib import Path

    import plotly.graph_objects as go

    from lrsa_viz.fast.figures import (cost_model_figure, load_benchmark, measured_attention_figure, speedup_figure,
                                       speedup_table)
    bench = load_benchmark(Path(__file__).resolve().parents[1] / "data" / "results" / "bench_lrsa_h200.json")
    assert "H200" in bench["gpu"] and bench["environment"]["torch"] and bench["command"].startswith("PYTHONPATH=.")
    assert all(c["passed"] and c["mismatched_positions"] == 0 for c in bench["correctness"]["attention"])
    table = speedup_table(bench)
    assert {8192, 32768} <= {r["n"] for r in table}  # the lengths with targets
    assert [r["target"] for r in table if r["target"]] == [1.8, 3.0]
    for fig in (cost_model_figure([1024, 4096]), measured_attention_figure(bench), speedup_figure(bench)):
        assert isinstance(fig, go.Figure) and len(fig.data) >= 3
    with pytest.raises(ValueError, match="which"):
        measured_attention_figure(bench, "backward")
    with pytest.raises(FileNotFoundError, match="bench_lrsa"):
        load_benchmark("no/such/file.json")


def test_one_timer_and_sync_counter_on_cpu():
    from lrsa_viz.fast.timing import count_host_syncs, median_time
    calls = []
    t = median_time(lambda: calls.append(1), min_reps=3, max_reps=4, target_s=0.0, warmup=2, device="cpu")
    assert t["reps"] == 3 and len(calls) == 5 and 0 <= t["min_s"] <= t["median_s"]
    with pytest.raises(ValueError, match="min_reps"):
        median_time(lambda: None, min_reps=3, max_reps=2)
    if not torch.cuda.is_available():
        assert count_host_syncs(lambda: None) is None


def test_sync_counter_primes_once_per_process(monkeypatch):
    """The first count runs one throwaway cycle first (its extra count measured on an H100), later counts do not."""
    from lrsa_viz.fast import timing

    cycles = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    timing._prime_sync_counter.cache_clear()
    monkeypatch.setattr(timing, "_sync_warnings", lambda fn: cycles.append(fn) or len(cycles))
    work = lambda: None  # noqa: E731
    assert timing.count_host_syncs(work) == 2 and len(cycles) == 2 and cycles[0] is not work and cycles[1] is work
    assert timing.count_host_syncs(work) == 3 and cycles[2] is work
    timing._prime_sync_counter.cache_clear()  # the pretended priming must not count as this process's real one


@cuda
def test_cuda_sync_counter_counts():
    from lrsa_viz.fast.timing import count_host_syncs
    x = torch.ones(8, device="cuda")
    x.sum().item()  # warm up (see the docstring)
    assert count_host_syncs(lambda: x.sum()) == 0
    assert count_host_syncs(lambda: [x.sum().item() for _ in range(3)]) == 3


def test_benchmark_smoke_run(tmp_path, monkeypatch):
    """benchmarks/bench_lrsa.py --smoke: the correctness, attention, variants and training code paths on the CPU
    (tiny shapes, forward-only attention, reference-backend training), JSON written with the expected keys."""
    import importlib.util
    import json
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_lrsa.py"
    spec = importlib.util.spec_from_file_location("bench_lrsa_smoke", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    assert bench.main(["--smoke", "--out", str(out), "--ratios", "0.25"]) == 0
    result = json.loads(out.read_text())
    assert result["command"].startswith("PYTHONPATH=.") and result["kernel"]["kernel"] == "triton"
    assert set(result["section_wall_s"]) == {"correctness", "attention", "variants", "training"}
    assert all(c["passed"] and c["mismatched_positions"] == 0 for c in result["correctness"]["attention"])
    assert result["correctness"]["model"]["logits_rel_err_flex_vs_reference"] < 1e-4
    (row,) = result["attention"]
    lrsa_row = row["lrsa"]["0.25"]
    assert row["n"] == 512 and lrsa_row["fwd"]["median_s"] > 0 and lrsa_row["speedup_vs_fastest_dense"]["fwd"] > 0
    assert lrsa_row["tiles"]["partial"] > 0 and row["lrsa_kernels"]["triton"]["fwd"]["median_s"] > 0
    assert set(result["variants"][0]["triton"]) == {"default", "unaligned", "unfused"}
    (train,) = result["training"]
    assert train["dense_sdpa"]["tokens_per_s"] > 0 and train["lrsa_reference"]["tokens_per_s"] > 0
    assert result["fast_options"] == {"align_queries": FastOptions().align_queries, "fused": True}
    assert bench.main(["--smoke", "--out", str(out), "--sections", "attention,nonsense"]) == 2

    # the record says how the sections really ran (options from the environment)
    monkeypatch.setenv("LRSA_VIZ_ALIGN_QUERIES", "0")
    assert bench.main(["--smoke", "--out", str(out), "--sections", "attention"]) == 0
    result = json.loads(out.read_text())
    assert result["fast_options"]["align_queries"] is False and result["attention"][0]["lrsa"]["0.25"]["align_queries"] is False
    monkeypatch.delenv("LRSA_VIZ_ALIGN_QUERIES")

    # --train-unaligned: one more training mode, the default LRSA path with LRSA_VIZ_ALIGN_QUERIES=0 for its duration
    seen, before = [], os.environ.get("LRSA_VIZ_ALIGN_QUERIES")
    real_environment = bench.environment

    def recording_environment(values):
        seen.append(dict(values))
        return real_environment(values)

    monkeypatch.setattr(bench, "environment", recording_environment)
    assert bench.main(["--smoke", "--out", str(out), "--sections", "training", "--train-unaligned"]) == 0
    (train,) = json.loads(out.read_text())["training"]
    assert train["lrsa_reference_unaligned"]["tokens_per_s"] > 0 and train["speedup_unaligned"] > 0
    assert {"LRSA_VIZ_ALIGN_QUERIES": "0"} in seen and os.environ.get("LRSA_VIZ_ALIGN_QUERIES") == before
    with real_environment({"LRSA_VIZ_ALIGN_QUERIES": "0", "LRSA_VIZ_FLEX_BACKEND": None}):
        assert not fast_options().align_queries
    assert os.environ.get("LRSA_VIZ_ALIGN_QUERIES") == before

    # a section that breaks (or is killed) after its first length keeps that length's row on disk
    real_timing = bench.lrsa_timing

    def timing_failing_at_640(q, *args, **kwargs):
        if q.shape[2] == 640:
            raise RuntimeError("stopped at n=640")
        return real_timing(q, *args, **kwargs)

    bench.lrsa_timing = timing_failing_at_640
    assert bench.main(["--smoke", "--out", str(out), "--sections", "attention", "--seq-lens", "512,640"]) == 0
    result = json.loads(out.read_text())
    assert [r["n"] for r in result["attention"]] == [512]
    assert "stopped at n=640" in result["section_errors"]["attention"]["error"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error message")
def test_live_benchmark_needs_cuda():
    from lrsa_viz.fast.timing import live_attention_benchmark
    with pytest.raises(RuntimeError, match="CUDA"):
        live_attention_benchmark([8192])


def test_saved_tensor_audit_accounts_for_every_extra_byte(tmp_path):
    """benchmarks/audit_saved_tensors.py: what a training forward of fast LRSA keeps beyond dense SDPA, per layer: the
    padded query and output rows, the longer K/V buffers, the padded rows' logsumexp, the gather index and, with
    several sequences, one copy of the attention output (the output projection's input: the padding rows between
    the sequences make ``transpose(1, 2).contiguous()`` copy; dense kernels return [B, N, H, d] and share it). One
    sequence keeps no copy (`pad_queries` lays the query out [B, N_q, H, d]). Byte counts are data (shapes only),
    compared exactly; the committed 8k run, scaled to 8k x 4, is the excess the H100 measured after the forward."""
    import json
    from pathlib import Path

    from helpers import import_script
    from lrsa_viz.fast.cost import SMOLLM2_CONFIG
    from lrsa_viz.fast.layout import ALIGN_QUERIES
    root = Path(__file__).resolve().parents[1]
    audit = import_script("benchmarks", "audit_saved_tensors")
    cfg, e, n = LagConfig(16, 128, 0.25), 2, 300  # bf16; N not a multiple of the block
    h_q, h_kv, d = SMOLLM2_CONFIG["num_attention_heads"], SMOLLM2_CONFIG["num_key_value_heads"], SMOLLM2_CONFIG["head_dim"]
    layout = LrsaLayout.of(-(-n // 128) * 128, cfg, 128, align_queries=ALIGN_QUERIES)  # as the fast path lays it out
    for b in (1, 2):
        out = tmp_path / f"audit_{b}.json"
        assert audit.main(["--tokens", str(n), "--batch", str(b), "--layers", "1", "--scale-to", f"{b}x30",
                           "--out", str(out)]) == 0
        result = json.loads(out.read_text())
        expected = {"output copy": 0 if b == 1 else b * n * h_q * d * e,
                    "padded query and output": 2 * b * h_q * (layout.q_len - n) * d * e,
                    "K/V buffers": 2 * b * h_kv * (layout.kv_len - n) * d * e,
                    "logsumexp rows": b * h_q * (layout.q_len - n) * 4,
                    "gather index": b * h_kv * layout.compact * 8}
        assert result["extra_bytes_per_layer"] == sum(expected.values()), (b, expected)
        copies = [k for k in result["difference_by_tensor"] if "Clone" in k]
        assert copies == ([] if b == 1 else [f"({b * n}, {h_q * d}) bfloat16 | View <- View <- Clone"])
    committed = json.loads((root / "data" / "results" / "saved_tensors_cpu_8k.json").read_text())
    assert committed["command"].endswith("--tokens 8192 --batch 2 --layers 1 --out data/results/saved_tensors_cpu_8k.json")
    measured_gpu = json.loads((root / "data" / "results" / "bench_h100" / "bench_lrsa_train_flash_fused.json").read_text())
    (train,) = measured_gpu["training"]
    gpu_extra = train["fast_lrsa"]["memory_by_phase"]["after_forward"] - train["dense_sdpa"]["memory_by_phase"]["after_forward"]
    assert committed["scaled"] == {"batch": 4, "layers": 30, "extra_gib": pytest.approx(gpu_extra, rel=0.01)}
    with pytest.raises(ValueError, match="--tokens must be in"):
        audit.main(["--tokens", "100", "--out", str(out)])
    with pytest.raises(ValueError, match="--scale-to: from --batch 1"):
        audit.main(["--tokens", "300", "--batch", "1", "--scale-to", "4x30", "--out", str(out)])


@pytest.mark.skipif(not shutil.which("g++"), reason="inductor's CPU backend needs a C++ compiler")
def test_compiled_fused_region_on_cpu_matches_eager_in_the_query_order():
    """The default fast path (one compiled region: whole-block padding, layout, FlexAttention) compiled by inductor
    on the CPU: equal to the uncompiled path (float32, 150 tokens, N not a multiple of the block: tolerance 1e-5 for
    a different summation order over at most 150 keys), and its output in the query's [B, N, H, d] memory order
    (inductor lays FlexAttention's output out like its query), so for one sequence the model's
    ``transpose(1, 2).contiguous()`` copies nothing."""
    cfg = LagConfig(4, 16, 0.25)
    for b in (1, 2):
        gen = torch.Generator().manual_seed(b)
        q = torch.randn(b, 150, 4, 16, generator=gen).transpose(1, 2)  # [B, H, N, d] views of [B, N, H, d], as in
        k, v = (torch.randn(b, 150, 2, 16, generator=gen).transpose(1, 2) for _ in range(2))  # the model
        with torch.no_grad():
            out = fast_lrsa_attention(q, k, v, cfg, compiled=True, block_size=16, fused=True)
            ref = fast_lrsa_attention(q, k, v, cfg, compiled=False, block_size=16)
        assert (out - ref).abs().max() < 1e-5
        assert out.stride()[1:] == (16, 4 * 16, 1) and out.transpose(1, 2).is_contiguous() == (b == 1)
    # what a static cache stores, from the same region: the length enters as a device scalar, so 150 and 155 tokens
    # (same block count) share one compilation and still keep exactly eq. 12 of their own length
    from torch._dynamo.utils import counters

    inputs = {n: random_qkv(n, b=2, hq=4, hkv=2, d=16, seed=n) for n in (150, 155)}
    with torch.no_grad():
        refs = {n: fast_lrsa_attention(*qkv, cfg, compiled=False, block_size=16) for n, qkv in inputs.items()}
        torch._dynamo.reset()  # whatever an earlier test compiled, this count starts from nothing
        counters.clear()
        results = {n: fast_lrsa_attention(*qkv, cfg, compiled=True, block_size=16, fused=True, return_kept=True)
                   for n, qkv in inputs.items()}
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    for n, (out, kept) in results.items():
        assert torch.equal(kept, lagkv_keep_indices(*inputs[n][1:], cfg))
        assert (out - refs[n]).abs().max() < 1e-5


@pytest.mark.parametrize("cfg", [LagConfig(4, 16, 0.25), LagConfig(3, 8, 0.5), LagConfig(0, 16, 1.0)])
@pytest.mark.parametrize("n", [20, 36, 37, 100, 131])
def test_return_kept_is_what_one_shot_lagkv_keeps(cfg, n):
    """``return_kept=True``: besides the unchanged output, the positions a one-shot LagKV cache keeps of these K/V
    (eq. 12, slot order), from the attention's own selection: exactly `lagkv_keep_indices` (the scoring module), for
    sequences shorter than S + 2L (everything), ratio 1 (everything), N on and off partition and block boundaries."""
    q, k, v = random_qkv(n, seed=n)
    with torch.no_grad():
        out, kept = fast_lrsa_attention(q, k, v, cfg, block_size=16, return_kept=True)
        plain = fast_lrsa_attention(q, k, v, cfg, block_size=16)
    assert torch.equal(out, plain)
    assert kept.shape == (2, 2, cfg.retained_length(n)) and kept.dtype == torch.long
    assert torch.equal(kept, lagkv_keep_indices(k, v, cfg))
