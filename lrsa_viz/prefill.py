"""Chunk-by-chunk prefill through a compressing LagKV cache: the reference that LRSA's mask reproduces."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from .cache import LagKVCache
from .config import LagConfig
from .policies import Policy


def prefill_chunks(seq_len: int, config: LagConfig) -> list[tuple[int, int]]:
    """[start, end) of each chunk: the first S + 2L tokens, then L at a time (the last one may be shorter)."""
    first = min(seq_len, config.min_compressible_length)
    bounds = [(0, first)] if seq_len else []
    bounds += [(s, min(s + config.lag_size, seq_len)) for s in range(first, seq_len, config.lag_size)]
    return bounds


@torch.no_grad()
def chunked_prefill(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    config: LagConfig,
    attention_mask: torch.Tensor | None = None,
    progress: bool = False,
    policy: str | Policy | None = None,
) -> tuple[torch.Tensor, LagKVCache]:
    """Feed ``input_ids`` [B, N] chunk by chunk through a recursive `LagKVCache` (``policy`` default: LagKV).

    Returns:
        (logits [B, N, V] of every position, the cache after the last chunk).
    Batches must be unpadded: a padded ``attention_mask`` raises ValueError (LagKV partitions would not line up).
    """
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [B, N] with N >= 1, got shape {tuple(input_ids.shape)}")
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        raise ValueError("attention_mask: chunked_prefill does not support padded batches; run rows separately")
    cache = LagKVCache(config, mode="recursive", policy=policy)
    logits = []
    for start, end in tqdm(prefill_chunks(input_ids.shape[1], config), desc="chunked prefill", disable=not progress):
        out = model(input_ids=input_ids[:, start:end], past_key_values=cache, use_cache=True)
        logits.append(out.logits)
    return torch.cat(logits, dim=1), cache


@torch.no_grad()
def compressed_generate(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    config: LagConfig,
    progress: bool = False,
    policy: str | Policy | None = None,
    **generate_kwargs,
) -> torch.Tensor:
    """Greedy/sampled generation with the LRSA pattern end to end, without the LRSA mask.

    The prompt [B, N] (all but its last token) goes through `chunked_prefill`; `model.generate` then continues
    from that compressing `LagKVCache`, feeding the last prompt token and each new token one at a time.
    Returns the [B, N + new] sequences, like ``generate``.
    """
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [B, N] with N >= 1, got shape {tuple(input_ids.shape)}")
    if input_ids.shape[1] > 1:
        _, cache = chunked_prefill(model, input_ids[:, :-1], config, progress=progress, policy=policy)
    else:
        cache = LagKVCache(config, mode="recursive", policy=policy)
    return model.generate(input_ids, past_key_values=cache, **generate_kwargs)
