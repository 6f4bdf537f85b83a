"""Which tokens a compressing cache keeps when it finalises partitions: LagKV and baselines at the same budget.

Every policy keeps the sink, the newest partition and the remainder, and exactly ``int(r * L)`` tokens per
finalised partition, so all of them hold the same number of tokens (METHOD eq. 12) and differ only in WHICH.
Score-based policies (kvpress style) implement one method, `score`; StreamingLLM keeps the most recent ones;
SnapKV scores with the attention of the newest queries, which it reads from the model (`SnapKVPolicy.observe`).
Every selection goes through `lrsa_viz.scoring.select_top_k` (the one tie rule).
"""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator

import torch

from .checks import check_int
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
        hi = final + n_scored * config.lag_size
        scores = self.score(keys[:, :, final: hi + config.lag_size], values[:, :, final: hi + config.lag_size], config)
        return self.assemble(scores, final, keys.shape[-2], config)

    @staticmethod
    def assemble(scores: torch.Tensor, final: int, stored: int, config: LagConfig) -> torch.Tensor:
        """Stored indices to keep, given the scores of the partitions being finalised.

        Args:
            scores: [B, H, n_scored, L], the partitions that start at stored index ``final``.
            stored: tokens stored now (everything after the scored partitions is kept).
        Returns:
            LongTensor [B, H, stored - n_scored * (L - k)], ascending: ``[:final]``, the top-k of each partition
            (`select_top_k`), then ``[final + n_scored * L:]``.
        """
        lag, n_scored = config.lag_size, scores.shape[2]
        offsets = select_top_k(scores, config.top_k)  # [B, H, n_scored, k]
        picked = (offsets + final + lag * torch.arange(n_scored, device=offsets.device)[:, None]).flatten(2)
        b, h = picked.shape[:2]
        before = torch.arange(final, device=picked.device).expand(b, h, -1)
        after = torch.arange(final + n_scored * lag, stored, device=picked.device).expand(b, h, -1)
        return torch.cat([before, picked, after], dim=-1)

    def observe(self, model) -> contextlib.AbstractContextManager:
        """A context in which the policy may read what it needs from ``model``'s forward passes (nothing here)."""
        return contextlib.nullcontext()

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


def post_rope_queries(module, args: tuple, kwargs: dict, last: int | None = None) -> torch.Tensor:
    """The post-RoPE queries [B, H_q, w, d] of one call of an attention module (its last ``last`` positions; None:
    all), recomputed from the call's hidden states with the model family's own rotary function."""
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    cos, sin = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
    if last is not None:
        w = min(last, hidden.shape[1])
        hidden, cos, sin = hidden[:, -w:], cos[:, -w:], sin[:, -w:]
    q = module.q_proj(hidden).view(*hidden.shape[:-1], -1, module.head_dim).transpose(1, 2)
    apply_rotary = sys.modules[type(module).__module__].apply_rotary_pos_emb
    return apply_rotary(q, q, cos, sin)[0]


class SnapKVPolicy(Policy):
    """SnapKV (Li et al. 2024, arXiv 2404.14469) at the same budget: keep the tokens that the newest queries attend to.

    SnapKV scores every cached token by the attention it receives from an *observation window*, the last ``window``
    queries of the prompt, summed over the window, averaged over the query heads of a KV head (GQA, as kvpress
    does) and smoothed with a 1-D average pool of width ``kernel_size``. Here it runs wherever the cache finalises
    partitions: the window is the last ``min(window, new tokens, tokens after the scored partitions)`` queries of
    the forward call that triggers the compression (one-shot: the end of the document; chunked prefill: the end
    of the newest chunk; decoding: the one new token). Each scored partition keeps its top ``int(r * L)`` tokens
    (`select_top_k`), so the budget is LagKV's.

    The queries are not in the cache: `observe` registers forward pre-hooks on the model's attention modules
    that compute the window's post-RoPE queries from the layer input (as kvpress does). Use it as
    ``with policy.observe(model): model(ids, past_key_values=LagKVCache(cfg, policy=policy))``; without it the
    compression raises ValueError. `set_queries` feeds queries by hand (tests, replayed prefills).
    """

    name = "snapkv"

    def __init__(self, window: int = 32, kernel_size: int = 5):
        for name, value in (("window", window), ("kernel_size", kernel_size)):
            check_int(name, value, 1)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (a centred pool), got {kernel_size}")
        self.window = window
        self.kernel_size = kernel_size
        self._pending: tuple[torch.Tensor, float] | None = None  # (queries [B, Hq, w, d], softmax scale)

    def set_queries(self, queries: torch.Tensor, scaling: float) -> None:
        """The post-RoPE queries [B, Hq, w, d] of the newest tokens of the next `keep` call's layer, and its scale."""
        if not isinstance(queries, torch.Tensor) or queries.ndim != 4:
            raise ValueError(f"queries must be a [B, H_q, w, d] tensor, got {getattr(queries, 'shape', queries)!r}")
        self._pending = (queries[:, :, -self.window:].detach(), float(scaling))

    @contextlib.contextmanager
    def observe(self, model, record: dict | None = None) -> Iterator["SnapKVPolicy"]:
        """Within the context, every attention module of ``model`` hands its window's queries to this policy.

        ``record``: if given, also ``record[layer_idx] = (queries [B, Hq, w, d], scaling)`` of the latest call of
        each layer (to replay a prefill's compression later, as `lrsa_viz.evaluate.greedy_answers_many` does).
        """
        modules = [m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "layer_idx")]
        if not modules:
            raise ValueError(f"model: SnapKVPolicy needs attention modules with q_proj (Llama-style); "
                             f"found none in {type(model).__name__}")

        def hook(module, args, kwargs):
            self.set_queries(post_rope_queries(module, args, kwargs, last=self.window), module.scaling)
            if record is not None:
                record[module.layer_idx] = self._pending

        handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in modules]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self._pending = None

    def window_scores(self, queries: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attention received by every stored key from the window queries, pooled.

        Args:
            queries: [B, Hq, w, d], the LAST w stored tokens' queries (Hq a multiple of H_kv).
            keys: [B, H_kv, stored, d].
        Returns:
            [B, H_kv, stored] float32: softmax(q k^T * scaling) (causal inside the window), summed over the window,
            averaged over the query heads of each KV head, then average-pooled over positions (width kernel_size).
        """
        b, h_kv, n, d = keys.shape
        hq, w = queries.shape[1], queries.shape[2]
        if hq % h_kv or queries.shape[0] != b or queries.shape[-1] != d or w > n:
            raise ValueError(f"queries {tuple(queries.shape)} do not fit keys {tuple(keys.shape)} (need [B, H_kv*G, w<=N, d])")
        q = queries.float().view(b, h_kv, hq // h_kv, w, d)
        logits = torch.einsum("bhgwd,bhnd->bhgwn", q, keys.float()) * scaling
        future = torch.arange(n, device=keys.device)[None, :] > torch.arange(n - w, n, device=keys.device)[:, None]
        probs = logits.masked_fill(future, float("-inf")).softmax(dim=-1)  # [B, H_kv, G, w, N]
        scores = probs.sum(dim=3).mean(dim=2)  # [B, H_kv, N]
        pooled = torch.nn.functional.avg_pool1d(scores.reshape(b * h_kv, 1, n), self.kernel_size, stride=1,
                                                padding=self.kernel_size // 2)
        return pooled.view(b, h_kv, n)

    def keep(self, keys, values, final, n_scored, config):
        if self._pending is None:
            raise ValueError("SnapKVPolicy needs the queries of the newest tokens: run the model inside "
                             "`with policy.observe(model):` (or call policy.set_queries before the cache update)")
        queries, scaling = self._pending
        self._pending = None  # one layer's queries serve that layer's compression only
        stored, lag = keys.shape[-2], config.lag_size
        hi = final + n_scored * lag
        w = min(queries.shape[2], stored - hi)  # the window lies after the scored partitions
        scores = self.window_scores(queries[:, :, queries.shape[2] - w:], keys, scaling)
        b, h = scores.shape[:2]
        return self.assemble(scores[:, :, final:hi].reshape(b, h, n_scored, lag), final, stored, config)

    def __repr__(self) -> str:
        return f"SnapKVPolicy(window={self.window}, kernel_size={self.kernel_size})"


POLICIES = {"lagkv": LagKVPolicy, "random": RandomPolicy, "streaming": StreamingPolicy, "snapkv": SnapKVPolicy}


def make_policy(policy: str | Policy | None) -> Policy:
    """A Policy from a name in POLICIES (or an instance, returned as is). Default: LagKV."""
    if policy is None:
        return LagKVPolicy()
    if isinstance(policy, Policy):
        return policy
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {sorted(POLICIES)} or a Policy instance, got {policy!r}")
    return POLICIES[policy]()
