"""`fast_lrsa_attention`: LRSA attention as one FlexAttention call over the compact key/value layout."""
from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from ..config import LagConfig
from .layout import DEFAULT_BLOCK_SIZE, LrsaLayout, layout_kv, lrsa_block_mask
from .selection import compact_positions, compiled_compact_positions


#: Dynamo recompiles the static-shape kernels once per new sequence length; past its recompile limit (8 by default)
#: it would silently fall back to the unfused, O(N^2)-memory implementation, so the limit is raised to at least this.
RECOMPILE_LIMIT = 64


def allow_recompiles(limit: int = RECOMPILE_LIMIT) -> None:
    """Raise dynamo's recompile limit to at least ``limit`` (a process-wide setting; it is never lowered)."""
    import torch._dynamo as dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo.config, name):
            setattr(dynamo.config, name, max(limit, getattr(dynamo.config, name)))


@functools.cache
def compiled_flex_attention():
    """``torch.compile(flex_attention, dynamic=False)``: fused Triton kernels (forward and backward).

    Static shapes: one compilation per sequence length (a few seconds), measured on an H200 to run forward+backward
    1.4-1.5x faster than one dynamic-shape compilation for all lengths (bench_lrsa "variants"). The mask parameters
    travel as a tensor (`LrsaLayout.params`), so configs of the same shapes share the kernels.
    """
    allow_recompiles()
    return torch.compile(flex_attention, dynamic=False)


def check_qkv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    """Raise ValueError unless query is [B, H_q, N, d] and key/value are [B, H_kv, N, d] with H_q % H_kv == 0."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            raise ValueError(f"{name} must be a 4D tensor [B, H, N, d], got {getattr(t, 'shape', type(t).__name__)}")
    if key.shape != value.shape:
        raise ValueError(f"key and value must have the same shape, got {tuple(key.shape)} and {tuple(value.shape)}")
    b, hq, n, d = query.shape
    if (key.shape[0], key.shape[2], key.shape[3]) != (b, n, d):
        raise ValueError(
            f"key must be [B={b}, H_kv, N={n}, d={d}] like the query (fast LRSA attends a full sequence to itself), "
            f"got {tuple(key.shape)}"
        )
    if hq % key.shape[1]:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({key.shape[1]})")


def fast_lrsa_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    config: LagConfig,
    scaling: float | None = None,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    compiled: bool | None = None,
) -> torch.Tensor:
    """LRSA attention of a full sequence (queries 0..N-1 over keys 0..N-1) without an N x N mask.

    1. LagKV selections from the post-RoPE key/value (no gradient; compiled on CUDA);
    2. the sink and the selected keys/values of each partition gathered into a compact region placed before the
       full keys/values (`lrsa_viz.fast.layout`; the gather is differentiable);
    3. one FlexAttention call with a static block mask (same for every head and batch element, cached per
       shape); grouped-query attention without repeating K/V (``enable_gqa``).

    Args:
        query: [B, H_q, N, d]; key, value: [B, H_kv, N, d] post-RoPE; H_q a multiple of H_kv.
        config: the LagConfig. scaling: softmax scale (default d ** -0.5).
        block_size: FlexAttention tile (power of two >= 16). compiled: use the compiled kernels (default: on CUDA).
            Uncompiled FlexAttention is PyTorch's reference implementation: forward only on CPU (PyTorch has no
            FlexAttention backward on CPU), meant for tests.
    Returns:
        [B, H_q, N, d], equal (up to rounding) to `sdpa` with `lrsa_viz.mask.visibility_from_keep` as mask.
    Sequences shorter than S + 2L, and ratio 1, are plain causal attention and go to SDPA.
    """
    check_qkv(query, key, value)
    n = query.shape[2]
    gqa = query.shape[1] != key.shape[1]
    if config.num_partitions(n) < 2 or config.top_k == config.lag_size:
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=gqa)
    compiled = query.is_cuda if compiled is None else compiled
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if needs_grad and query.device.type == "cpu":
        raise ValueError(
            "backend='flex' cannot train on CPU: PyTorch has no FlexAttention backward on CPU; "
            "use backend='reference' (enable_lrsa(model, config, backend='reference')) or a CUDA device"
        )
    with torch.no_grad():
        select = compiled_compact_positions() if compiled else compact_positions
        positions = select(key.detach(), value.detach(), config)
    layout = LrsaLayout.of(n, config, block_size)
    block_mask = lrsa_block_mask(layout, query.device)
    key_buffer, value_buffer = layout_kv(key, value, positions, layout)
    if compiled:
        return compiled_flex_attention()(query, key_buffer, value_buffer, block_mask=block_mask, scale=scaling,
                                         enable_gqa=gqa)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention.*")  # "called without torch.compile": intended
        return flex_attention(query, key_buffer, value_buffer, block_mask=block_mask, scale=scaling, enable_gqa=gqa)
