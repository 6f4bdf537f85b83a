"""LagKV scoring and one-shot selection (docs/METHOD.md §2), in plain PyTorch.

Shapes: B batch, H KV heads, N tokens, d head dim, S sink, L lag size, P = (N - S) // L full partitions,
k = int(r * L) tokens kept per scored partition.
"""
from __future__ import annotations

import torch

from .config import LagConfig

#: Added to (max - min) of the reference window so that a constant channel gives finite scores.
RANGE_EPS = 1e-6


def check_kv(keys: torch.Tensor, values: torch.Tensor, finite: bool | str = True) -> None:
    """Raise ValueError unless keys and values are finite float [B, H_kv, N, d] tensors of one shape with d >= 2.

    ``finite``: the NaN/inf scan, the one check that reads the data (on an accelerator, a wait for the device):
    True (public entry points), False, or ``"cpu"``: only for CPU tensors (hot paths inside a model's forward).
    """
    for name, t in (("keys", keys), ("values", values)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of shape [B, H_kv, N, d], got {type(t).__name__}")
        if t.ndim != 4:
            raise ValueError(f"{name} must have 4 dimensions [B, H_kv, N, d], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if keys.shape != values.shape:
        raise ValueError(f"keys and values must have the same shape, got {tuple(keys.shape)} and {tuple(values.shape)}")
    if keys.shape[-1] < 2:
        raise ValueError(f"head dim d must be >= 2 (the score is a std over channels), got {keys.shape[-1]}")
    if finite is True or (finite == "cpu" and keys.device.type == "cpu"):
        for name, t in (("keys", keys), ("values", values)):
            check_finite(name, t)


def check_finite(name: str, t: torch.Tensor) -> None:
    """Raise ValueError if ``t`` [B, H, N, d] holds NaN or inf: LagKV scores (min/max/std) would be undefined."""
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        b, h, pos, _ = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name} contain NaN or inf (first at batch {b}, head {h}, position {pos}); LagKV needs finite keys and "
            "values (check the model's dtype for overflow, e.g. float16, and its inputs)"
        )


def token_std_scores(z: torch.Tensor, lag_size: int) -> torch.Tensor:
    """Lag-relative score of each token of every partition that has a successor, for one of K or V.

    Args:
        z: [B, H, P * L, d] the full partitions (sink removed), any float dtype.
        lag_size: L.
    Returns:
        [B, H, P - 1, L] float32: softmax over the L tokens of the channel-std of the tokens normalised by the
        min/max of the next partition (the reference).
    """
    b, h, n, d = z.shape
    parts = z.float().reshape(b, h, n // lag_size, lag_size, d)
    current, reference = parts[:, :, :-1], parts[:, :, 1:]
    lo = reference.amin(dim=-2, keepdim=True)  # [B, H, P-1, 1, d] per channel, over the reference's tokens
    hi = reference.amax(dim=-2, keepdim=True)
    normalised = (current - lo) / (hi - lo + RANGE_EPS)
    return normalised.std(dim=-1).softmax(dim=-1)


def lagkv_scores(keys: torch.Tensor, values: torch.Tensor, config: LagConfig,
                 check_finite: bool | str = True) -> torch.Tensor:
    """LagKV scores ``a_K + score_v_ratio * a_V`` of every scored partition.

    Args:
        keys, values: [B, H_kv, N, d], post-RoPE (as stored in the KV cache).
    Returns:
        [B, H_kv, max(P - 1, 0), L] float32. Row p scores partition p (tokens S + p*L ... S + (p+1)*L - 1)
        against partition p + 1. Empty when N < S + 2L.
    ``check_finite``: the NaN/inf scan, True, False or "cpu" (see `check_kv`).
    """
    check_kv(keys, values, finite=check_finite)
    s, lag = config.sink_size, config.lag_size
    p = config.num_partitions(keys.shape[-2])
    b, h, _, _ = keys.shape
    if p < 2:
        return keys.new_zeros((b, h, 0, lag), dtype=torch.float32)
    span = slice(s, s + p * lag)
    a_k = token_std_scores(keys[:, :, span], lag)
    a_v = token_std_scores(values[:, :, span], lag)
    return a_k + config.score_v_ratio * a_v


def select_top_k(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """Offsets (within their partition) of the top_k tokens of each scored partition, ascending.

    THE selection rule of the project (docs/METHOD.md §2): the ``top_k`` highest scores; EXACT ties go to the lower
    position. A stable descending sort keeps equal scores in position order, so the rule holds on every device
    (``torch.topk`` promises no order among ties, on CUDA in particular).
    Args:
        scores: [B, H, P', L].
    Returns:
        LongTensor [B, H, P', top_k].
    """
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return order[..., :top_k].sort(dim=-1).values


def selected_positions(scores: torch.Tensor, config: LagConfig) -> torch.Tensor:
    """Absolute positions of the tokens kept in the scored partitions.

    Args:
        scores: [..., P-1, L] from `lagkv_scores` (any leading dims, e.g. [B, H] or [layers, B, H]).
    Returns:
        LongTensor [..., (P-1) * k], ascending.
    """
    offsets = select_top_k(scores, config.top_k)
    starts = config.sink_size + config.lag_size * torch.arange(scores.shape[-2], device=scores.device)
    return (offsets + starts[:, None]).flatten(-2)


def keep_indices_from_scores(scores: torch.Tensor, seq_len: int, config: LagConfig) -> torch.Tensor:
    """One-shot compression of ``seq_len`` tokens from their scores: the sink, the top-k of every scored partition,
    the last full partition and the remainder, ascending.

    Args:
        scores: [..., P-1, L] from `lagkv_scores` of ``seq_len`` tokens (no scored partition: nothing compressed).
    Returns:
        LongTensor [..., config.retained_length(seq_len)] (docs/METHOD.md eq. 12).
    """
    lead, device = scores.shape[:-2], scores.device
    if scores.shape[-2] == 0:
        return torch.arange(seq_len, device=device).expand(*lead, seq_len).clone()
    p = config.num_partitions(seq_len)
    sink = torch.arange(config.sink_size, device=device).expand(*lead, -1)
    tail = torch.arange(config.sink_size + (p - 1) * config.lag_size, seq_len, device=device).expand(*lead, -1)
    return torch.cat([sink, selected_positions(scores, config), tail], dim=-1)


def keep_mask_from_scores(scores: torch.Tensor, seq_len: int, config: LagConfig) -> torch.Tensor:
    """Boolean form of `keep_indices_from_scores`: [..., seq_len], True where one-shot compression keeps the token."""
    idx = keep_indices_from_scores(scores, seq_len, config)
    mask = torch.zeros(*idx.shape[:-1], seq_len, dtype=torch.bool, device=scores.device)
    return mask.scatter_(-1, idx, True)


def lagkv_keep_indices(keys: torch.Tensor, values: torch.Tensor, config: LagConfig,
                       check_finite: bool | str = True) -> torch.Tensor:
    """Positions kept by one-shot LagKV compression, ascending.

    Sink + top-k of each scored partition + the last full partition + the remainder.
    Args:
        keys, values: [B, H_kv, N, d], post-RoPE.
    Returns:
        LongTensor [B, H_kv, n_kept] with n_kept == config.retained_length(N) (docs/METHOD.md eq. 12).
    """
    return keep_indices_from_scores(lagkv_scores(keys, values, config, check_finite), keys.shape[-2], config)


def keep_mask(keys: torch.Tensor, values: torch.Tensor, config: LagConfig,
              check_finite: bool | str = True) -> torch.Tensor:
    """Boolean form of `lagkv_keep_indices`: [B, H_kv, N], True where one-shot compression keeps the token."""
    return keep_mask_from_scores(lagkv_scores(keys, values, config, check_finite), keys.shape[-2], config)
