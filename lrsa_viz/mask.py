"""The LRSA visibility mask (docs/METHOD.md §3), dense reference form.

A query at position q in partition k = (q - S) // L (sink queries: k = -1) sees the sink, the LagKV-selected
tokens of partitions j <= k - 2, all of partition k - 1 and partition k causally. Equivalently:

    visible[q, t] = (t <= q) and (kept_one_shot[t] or partition(t) >= partition(q) - 1)
"""
from __future__ import annotations

import torch

from .config import LagConfig
from .scoring import keep_mask


def partition_index(positions: torch.Tensor, config: LagConfig) -> torch.Tensor:
    """Partition of each position: -1 for the sink, (pos - S) // L after it. Same shape as ``positions``."""
    return torch.div(positions - config.sink_size, config.lag_size, rounding_mode="floor").clamp_min(-1)


def visibility_from_keep(
    kept: torch.Tensor, config: LagConfig, query_positions: torch.Tensor | None = None
) -> torch.Tensor:
    """LRSA mask from a one-shot keep mask.

    Args:
        kept: [B, H_kv, N] bool, from `keep_mask`.
        query_positions: [Q] positions of the queries (default: all N).
    Returns:
        [B, H_kv, Q, N] bool, True = may attend.
    """
    n = kept.shape[-1]
    key_pos = torch.arange(n, device=kept.device)
    q_pos = key_pos if query_positions is None else query_positions.to(kept.device)
    causal = key_pos[None, :] <= q_pos[:, None]
    lagging = partition_index(key_pos, config)[None, :] >= partition_index(q_pos, config)[:, None] - 1
    return causal & (kept[:, :, None, :] | lagging)


def lrsa_visibility(keys: torch.Tensor, values: torch.Tensor, config: LagConfig) -> torch.Tensor:
    """The LRSA attention mask of one layer.

    Args:
        keys, values: [B, H_kv, N, d], post-RoPE.
    Returns:
        [B, H_kv, N, N] bool, True = query (dim 2) may attend to key (dim 3). O(N^2) memory: teaching only.
    """
    return visibility_from_keep(keep_mask(keys, values, config), config)
