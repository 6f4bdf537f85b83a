"""Which tokens a compressing cache keeps when it finalises partitions: LagKV and baselines at the same budget.

Every policy keeps the sink, the newest partition and the remainder, and exactly ``int(r * L)`` tokens per
finalised partition, so all of them hold the same number of tokens (METHOD eq. 12) and differ only in WHICH.
Score-based policies (kvpress style) implement one method, `score`; StreamingLLM keeps the most recent ones.
"""
from __future__ import annotations

import torch

from .config import LagConfig
from .scoring import lagkv_scores, select_top_k


def without_sink(config: LagConfig) -> LagConfig:
    """The same config with sink_size=0, for scoring windows that start after the sink."""
    return LagConfig(sink_size=0, lag_size=config.lag_size, ratio=config.ratio, score_v_ratio=config.score_v_ratio)


class Policy:
    """Base class. ``keep`` receives the stored states of one layer and returns what to keep."""

    name = "policy"

    def score(self, keys: torch.Tensor, values: torch.Tensor, config: LagConfig) -> torch.Tensor:
        """Scores of the first P - 1 partitions of a window.

        Args:
            keys, values: [B, H, P * L, d], a window of whole partitions (no sink); the last one is a reference only.
        Returns:
            [B, H, P - 1, L]: higher = keep.
        """
        raise NotImplementedError

    def keep(self, keys: torch.Tensor, values: torch.Tensor, final: int, n_scored: int, config: LagConfig) -> torch.Tensor:
        """Stored indices to keep after finalising ``n_scored`` partitions.

        Args:
            keys, values: [B, H, stored, d]; stored[:final] is already final (sink + earlier selections), then come
                ``n_scored`` partitions to finalise, then at least one more partition (their reference) and the rest.
        Returns:
            LongTensor [B, H, stored - n_scored * (L - k)], ascending.
        """
        lag = config.lag_size
        hi = final + n_scored * lag
        scores = self.score(keys[:, :, final: hi + lag], values[:, :, final: hi + lag], config)
        offsets = select_top_k(scores, config.top_k)  # [B, H, n_scored, k]
        picked = (offsets + final + lag * torch.arange(n_scored, device=offsets.device)[:, None]).flatten(2)
        b, h = picked.shape[:2]
        before = torch.arange(final, device=picked.device).expand(b, h, -1)
        after = torch.arange(hi, keys.shape[-2], device=picked.device).expand(b, h, -1)
        return torch.cat([before, picked, after], dim=-1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LagKVPolicy(Policy):
    """LagKV (METHOD §2): a partition is scored against the min/max of the next one."""

    name = "lagkv"

    def score(self, keys, values, config):
        return lagkv_scores(keys, values, without_sink(config))


class RandomPolicy(Policy):
    """A uniformly random ``int(r * L)`` tokens of each partition (seeded, reproducible)."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def score(self, keys, values, config):
        b, h, n, _ = keys.shape
        shape = (b, h, n // config.lag_size - 1, config.lag_size)
        return torch.rand(shape, generator=self.generator).to(keys.device)

    def __repr__(self) -> str:
        return f"RandomPolicy(seed={self.seed})"


class StreamingPolicy(Policy):
    """StreamingLLM at the same budget: the sink plus the most recent tokens (the oldest are evicted first)."""

    name = "streaming"

    def keep(self, keys, values, final, n_scored, config):
        s, lag = config.sink_size, config.lag_size
        hi = final + n_scored * lag
        budget = (final - min(final, s)) + n_scored * config.top_k  # compressed tokens allowed after the sink
        b, h = keys.shape[:2]
        idx = torch.cat([torch.arange(min(final, s)), torch.arange(hi - budget, keys.shape[-2])]).to(keys.device)
        return idx.expand(b, h, -1)


POLICIES = {"lagkv": LagKVPolicy, "random": RandomPolicy, "streaming": StreamingPolicy}


def make_policy(policy: str | Policy | None) -> Policy:
    """A Policy from a name in POLICIES (or an instance, returned as is). Default: LagKV."""
    if policy is None:
        return LagKVPolicy()
    if isinstance(policy, Policy):
        return policy
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {sorted(POLICIES)} or a Policy instance, got {policy!r}")
    return POLICIES[policy]()
