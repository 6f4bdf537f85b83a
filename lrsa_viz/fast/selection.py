"""LagKV selections for the compact layout: the sink and the top-k tokens of every scored partition.

Plain PyTorch; `lrsa_viz.fast.kernel.compiled_compact_positions` is the same function compiled (CUDA).
"""
from __future__ import annotations

import torch

from ..config import LagConfig
from ..scoring import selected_positions, token_std_scores


def compact_positions(keys: torch.Tensor, values: torch.Tensor, config: LagConfig) -> torch.Tensor:
    """Positions gathered into the compact region, per batch element and KV head, ascending.

    The sink ``0 .. S-1`` then the LagKV top-k of partitions ``0 .. P-2``: the first ``S + (P-1) k`` entries of
    `lrsa_viz.scoring.lagkv_keep_indices`, computed by the same scoring code (`token_std_scores`,
    `selected_positions`) without `lagkv_scores`' input checks, which read K/V again and synchronise the device.
    Args:
        keys, values: [B, H_kv, N, d] post-RoPE, N >= S + 2L.
    Returns:
        LongTensor [B, H_kv, S + (P-1) k]. No gradient (call under ``torch.no_grad``; indices are discrete).
    """
    b, h, n, _ = keys.shape
    s, lag = config.sink_size, config.lag_size
    span = slice(s, s + config.num_partitions(n) * lag)
    scores = token_std_scores(keys[:, :, span], lag) + config.score_v_ratio * token_std_scores(values[:, :, span], lag)
    sink = torch.arange(s, device=keys.device).expand(b, h, s)
    return torch.cat([sink, selected_positions(scores, config)], dim=-1)


def one_shot_kept_index(compact: torch.Tensor, seq_len: int | torch.Tensor, config: LagConfig,
                        width: int) -> torch.Tensor:
    """What a one-shot LagKV cache keeps of ``seq_len`` = N tokens (METHOD eq. 12), in its slot order: the sink and
    the selections (the first C = S + (P-1) k entries of ``compact``), then the unscored tail S + (P-1) L .. N-1 whole.

    Args:
        compact: [B, H_kv, >= C] from `compact_positions`, of N tokens or of N zero-padded further (its first C
            entries are the same: partitions 0 .. P-2 and their references are real tokens).
        seq_len: N >= S + 2L: an int, or a 0-dim integer tensor (on the device: no host sync, and a compiled
            caller does not specialise on it).
        width: entries returned, >= `LagConfig.retained_length` (N).
    Returns:
        LongTensor [B, H_kv, width]; entries from `LagConfig.retained_length` (N) on are padding (N - 1).
    """
    s, lag, k = config.sink_size, config.lag_size, config.top_k
    p = (seq_len - s) // lag
    slot = torch.arange(width, device=compact.device)
    from_compact = compact.gather(-1, slot.clamp(max=compact.shape[-1] - 1).expand(*compact.shape[:2], width))
    tail = slot + (p - 1) * (lag - k)  # slot C + j holds position S + (P-1) L + j
    return torch.where(slot < s + (p - 1) * k, from_compact, tail).clamp(max=seq_len - 1)
