"""Chunk-by-chunk prefill through a compressing LagKV cache: the reference that LRSA's mask reproduces."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from .attention import check_max_positions, check_supported
from .cache import LagKVCache
from .config import LagConfig
from .policies import Policy


def prefill_chunks(seq_len: int, config: LagConfig) -> list[tuple[int, int]]:
    """[start, end) of each chunk: the first S + 2L tokens, then L at a time (the last one may be shorter)."""
    first = min(seq_len, config.min_compressible_length)
    bounds = [(0, first)] if seq_len else []
    bounds += [(s, min(s + config.lag_size, seq_len)) for s in range(first, seq_len, config.lag_size)]
    return bounds


def check_prefill_inputs(model: PreTrainedModel, input_ids: torch.Tensor, config: LagConfig) -> None:
    """Raise ValueError unless the model family is supported, ``config`` is a LagConfig and ``input_ids`` is a
    non-empty [B, N] integer tensor of token ids in [0, vocab_size) that fits the model's positions."""
    check_supported(model)
    if not isinstance(config, LagConfig):
        raise ValueError(f"config must be a LagConfig, got {type(config).__name__}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or 0 in input_ids.shape:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a [B, N] tensor with B >= 1 and N >= 1, got {shape}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    vocab = getattr(model.config, "vocab_size", None)
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or (vocab is not None and hi >= vocab):
        raise ValueError(f"input_ids must be token ids in [0, vocab_size={vocab}), got values from {lo} to {hi}")
    check_max_positions(model.config, input_ids.shape[1], "input_ids")


@torch.no_grad()
def chunked_prefill(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    config: LagConfig,
    attention_mask: torch.Tensor | None = None,
    progress: bool = False,
    policy: str | Policy | None = None,
    cache: LagKVCache | None = None,
) -> tuple[torch.Tensor, LagKVCache]:
    """Feed ``input_ids`` [B, N] chunk by chunk through a recursive `LagKVCache` (``policy`` default: LagKV).

    ``cache``: an empty recursive LagKVCache to fill (default: a new one with ``config`` and ``policy``).
    Returns:
        (logits [B, N, V] of every position, the cache after the last chunk).
    Batches must be unpadded: a padded ``attention_mask`` raises ValueError (LagKV partitions would not line up).
    ``input_ids`` are moved to the model's device.
    """
    check_prefill_inputs(model, input_ids, config)
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        raise ValueError("attention_mask: chunked_prefill does not support padded batches; run rows separately")
    if cache is None:
        cache = LagKVCache(config, mode="recursive", policy=policy)
    elif not isinstance(cache, LagKVCache) or cache.mode != "recursive" or cache.get_seq_length() != 0:
        raise ValueError("cache must be an empty LagKVCache with mode='recursive'")
    elif policy is not None:
        raise ValueError("policy: give the policy to the LagKVCache passed as cache, not both")
    input_ids = input_ids.to(model.device)
    logits = []
    with cache.policy.observe(model):  # policies that read the model's queries (SnapKV) see every chunk
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
    check_prefill_inputs(model, input_ids, config)
    input_ids = input_ids.to(model.device)
    new_tokens = generate_kwargs.get("max_new_tokens")
    if new_tokens is not None:
        check_max_positions(model.config, input_ids.shape[1] + new_tokens, "input_ids + max_new_tokens")
    if input_ids.shape[1] > 1:
        _, cache = chunked_prefill(model, input_ids[:, :-1], config, progress=progress, policy=policy)
    else:
        cache = LagKVCache(config, mode="recursive", policy=policy)
    return model.generate(input_ids, past_key_values=cache, **generate_kwargs)
