"""`LagKVCache`: a transformers Cache that compresses with LagKV after each update ("use then compress").

Each layer stores, per batch element and KV head, ``[sink | selected tokens | uncompressed tail]``. The tail
starts at absolute position ``tail_start``; whenever it holds two or more full partitions, every partition
that has a complete successor (its reference) is scored and cut to its top-k tokens (docs/METHOD.md §4).
Stored tokens keep their original RoPE positions: ``get_seq_length()`` returns the number of tokens SEEN, so
new tokens get absolute positions, and the attention mask is sized with ``kv_offset = seen - stored``.
"""
from __future__ import annotations

from functools import partial
from typing import Literal

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .config import LagConfig
from .policies import Policy, make_policy
from .scoring import check_kv

Mode = Literal["recursive", "one_shot"]


class LagKVLayer(DynamicLayer):
    """One layer of a `LagKVCache`. ``keys``/``values``: [B, H_kv, stored, d]; ``positions``: [B, H_kv, stored]."""

    is_croppable = False

    def __init__(self, config: LagConfig, mode: Mode = "recursive", policy: str | Policy | None = None):
        super().__init__()
        self.lag_config = config
        self.mode = mode
        self.policy = make_policy(policy)
        self.seen = 0  # tokens appended so far
        self.tail_start = 0  # absolute position of the first uncompressed (not yet final) token
        self.final = 0  # stored tokens before the tail: sink + selections
        self.updates = 0
        self.positions: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append [B, H_kv, q, d] states, return everything to attend to (before compression), then compress."""
        check_kv(key_states, value_states, finite="cpu")  # NaN/inf scan: CPU tensors only
        if self.is_initialized and key_states.shape[:2] + key_states.shape[3:] != self.keys.shape[:2] + self.keys.shape[3:]:
            raise ValueError(
                f"key_states: shape {tuple(key_states.shape)} does not continue the cached [B, H_kv, stored, d] = "
                f"{tuple(self.keys.shape)} (batch, KV heads and head dim must stay the same)"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            b, h = key_states.shape[:2]
            self.positions = torch.empty(b, h, 0, dtype=torch.long, device=key_states.device)
        q = key_states.shape[-2]
        new_pos = torch.arange(self.seen, self.seen + q, device=key_states.device).expand(*key_states.shape[:2], q)
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        self.keys, self.values = keys, values
        self.positions = torch.cat([self.positions, new_pos], dim=-1)
        self.seen += q
        self.updates += 1
        if self.mode == "recursive" or self.updates == 1:
            self._compress()
        return keys, values

    @torch.no_grad()
    def _compress(self) -> None:
        cfg = self.lag_config
        if self.tail_start < cfg.sink_size:
            if self.seen < cfg.sink_size:
                return
            self.tail_start = self.final = cfg.sink_size
        lag = cfg.lag_size
        n_parts = (self.seen - self.tail_start) // lag
        n_scored = n_parts - 1
        if n_scored < 1:
            return
        keep = self.policy.keep(self.keys, self.values, self.final, n_scored, cfg)  # [B, H, kept]
        gather = keep[..., None].expand(-1, -1, -1, self.keys.shape[-1])
        self.keys = self.keys.gather(2, gather)
        self.values = self.values.gather(2, gather)
        self.positions = self.positions.gather(2, keep)
        self.final += n_scored * cfg.top_k
        self.tail_start += n_scored * lag

    def get_seq_length(self) -> int:
        """Tokens seen (not stored): new tokens get this as their first position."""
        return self.seen

    def stored_length(self) -> int:
        return 0 if self.keys is None or not self.is_initialized else self.keys.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = self.stored_length()
        return stored + query_length, self.seen - stored

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.positions is not None and self.positions.numel():
            self.positions = self.positions.index_select(0, beam_idx.to(self.positions.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.positions is not None and self.positions.numel():
            self.positions = self.positions.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.positions is not None and self.positions.numel():
            self.positions = self.positions[indices, ...]

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("LagKVCache cannot be cropped: evicted tokens cannot come back")

    def reset(self) -> None:
        self.__init__(self.lag_config, self.mode, self.policy)


class LagKVCache(Cache):
    """A KV cache compressed by LagKV (docs/METHOD.md §4).

    Args:
        config: the LagConfig.
        mode: ``"recursive"`` compresses after every update (chunked prefill, decode); ``"one_shot"`` compresses
            the first update (the prefill) once and appends later tokens uncompressed (kvpress behaviour).
        policy: which tokens to keep: ``"lagkv"`` (default), or the same-budget baselines ``"streaming"``
            (StreamingLLM: sink + most recent) and ``"random"``; or a `Policy` instance.
    Use it like any transformers cache: ``model(ids, past_key_values=LagKVCache(cfg))`` or
    ``model.generate(ids, past_key_values=LagKVCache(cfg))``.
    """

    def __init__(self, config: LagConfig | None = None, mode: Mode = "recursive", policy: str | Policy | None = None):
        if mode not in ("recursive", "one_shot"):
            raise ValueError(f"mode must be 'recursive' or 'one_shot', got {mode!r}")
        if config is not None and not isinstance(config, LagConfig):
            raise ValueError(f"config must be a LagConfig or None, got {type(config).__name__}")
        self.lag_config = config or LagConfig()
        self.mode = mode
        self.policy = make_policy(policy)  # one instance shared by all layers (a seeded RandomPolicy stays reproducible)
        super().__init__(layer_class_to_replicate=partial(LagKVLayer, self.lag_config, mode, self.policy))

    def stored_lengths(self) -> list[int]:
        """Tokens stored per layer (what occupies memory), as opposed to `get_seq_length` (tokens seen)."""
        return [layer.stored_length() for layer in self.layers]

    def kept_positions(self, layer_idx: int) -> torch.Tensor:
        """Original positions of the stored tokens of one layer: LongTensor [B, H_kv, stored]."""
        return self.layers[layer_idx].positions

    def kept_position_mask(self, seq_len: int | None = None) -> torch.Tensor:
        """[layers, B, H_kv, seen] bool: which original positions each layer/head still stores."""
        seen = seq_len or self.get_seq_length()
        out = []
        for layer in self.layers:
            m = torch.zeros(*layer.positions.shape[:2], seen, dtype=torch.bool, device=layer.positions.device)
            out.append(m.scatter_(-1, layer.positions, True))
        return torch.stack(out)

    def nbytes(self) -> int:
        """Bytes held by the stored keys and values of all layers."""
        return sum(t.numel() * t.element_size() for layer in self.layers if layer.is_initialized
                   for t in (layer.keys, layer.values))


@torch.no_grad()
def compress_once(
    keys: torch.Tensor, values: torch.Tensor, config: LagConfig, policy: str | Policy | None = None
) -> torch.Tensor:
    """Positions a policy keeps when all of [B, H_kv, N, d] keys/values are compressed at once (one-shot).

    For the LagKV policy this equals `lagkv_keep_indices`. Returns LongTensor [B, H_kv, config.retained_length(N)].
    """
    layer = LagKVLayer(config, mode="one_shot", policy=policy)
    layer.update(keys, values)
    return layer.positions
