"""Free runs compared: where a parallel LRSA forward and chunk-by-chunk prefill choose different tokens, and why.

GIVEN THE SAME SELECTIONS the two runs agree to float error (docs/METHOD.md §3, "forced": pass the chunked run's
``cache.kept_position_mask()`` as ``keep=`` to `lrsa`). Left free, each run scores partitions with its own K/V, and
those differ by float rounding (N tokens in one matmul vs chunks of L: other shapes, other summation orders). LagKV
scores are nearly flat (a softmax over L channel-stds sits near 1/L per token, so ``a_K + a_V`` sits near 2/L), so a
token at the top-k boundary whose score differs from its neighbour's by less than that rounding may be kept by one
run and not by the other: a *flip*. `compare_selections` runs both, finds every flip and reports its score gap beside
the drift of the same tokens' scores between the runs.

Shapes: layers l, B batch, H KV heads, N tokens, P - 1 scored partitions of L tokens, V vocabulary.
"""
from __future__ import annotations

import dataclasses

import torch
from transformers import DynamicCache, PreTrainedModel

from .attention import lrsa
from .cache import LagKVCache
from .config import LagConfig
from .prefill import check_prefill_inputs, chunked_prefill
from .scoring import keep_mask_from_scores, lagkv_scores, select_top_k

#: A flip counts as a near-tie when the two tokens' scores differ by at most this fraction of the uniform score 2/L.
#: Float drift between the runs on SmolLM2: 6e-9 to 5e-8 absolute on this project's CPU
#: (data/results/agreement_cpu.json), up to ~1e-6 on the CPU of issue 9's flips: far below 1e-2 of 2/L (1.6e-4 at
#: L = 128). A real disagreement (another reference window, another alignment) moves scores by their own spread.
NEAR_TIE_FRACTION = 1e-2


def logit_tolerance(logits: torch.Tensor) -> float:
    """Accepted max |logit difference| between two float32 runs of the same selections: max(1e-4, 1e-5 max|logit|).

    The runs compute the same sums in other orders (N tokens at once vs chunks of L); float32 keeps ~7 digits, and
    30 layers of residual additions lose a few more, so the difference scales with the logits' magnitude. Measured on
    SmolLM2 with forced selections (1,100 tokens, data/results/agreement_cpu.json): 6.3e-5 to 9.3e-5. Notebook 02's
    full profile printed 1.3e-4 at 4,096 tokens, and 1.1e-2 for one flipped token, in one session's GPU run (its
    output is not committed: not a record).
    """
    return max(1e-4, 1e-5 * float(logits.abs().max()))


@dataclasses.dataclass(frozen=True)
class SelectionFlip:
    """One token kept only by the parallel run paired with one kept only by the chunked run (same layer, row, head,
    partition). ``gap``: max over the two runs of |score(parallel_only) - score(chunked_only)|; ``drift``: max over
    the two tokens of |parallel score - chunked score|."""

    layer: int
    batch: int
    kv_head: int
    partition: int
    parallel_only: int  # absolute position
    chunked_only: int  # absolute position
    gap: float
    drift: float


@dataclasses.dataclass
class SelectionAgreement:
    """Both runs' selections, scores and logits, and the flips between them (see the module docstring)."""

    config: LagConfig
    parallel_keep: torch.Tensor  # [layers, B, H, N] bool: one-shot selection of each layer's parallel-run K/V
    chunked_keep: torch.Tensor  # [layers, B, H, N] bool: what the compressing cache kept
    parallel_scores: torch.Tensor  # [layers, B, H, P-1, L] float32
    chunked_scores: torch.Tensor  # [layers, B, H, P-1, L] float32: scores of the K/V as the chunks produced them
    parallel_logits: torch.Tensor  # [B, N, V]
    chunked_logits: torch.Tensor  # [B, N, V]
    flips: list[SelectionFlip]

    @property
    def n_flips(self) -> int:
        return len(self.flips)

    @property
    def kept_slots(self) -> int:
        """Selected slots compared: layers x B x H x scored partitions x top_k."""
        return int(self.parallel_scores[..., 0].numel()) * self.config.top_k

    @property
    def drift_per_layer(self) -> list[float]:
        """Max |parallel score - chunked score| over every scored token of each layer."""
        if self.parallel_scores.shape[3] == 0:
            return [0.0] * self.parallel_scores.shape[0]
        return (self.parallel_scores - self.chunked_scores).abs().flatten(1).amax(1).tolist()

    @property
    def max_drift(self) -> float:
        return max(self.drift_per_layer, default=0.0)

    @property
    def max_logit_diff(self) -> float:
        return float((self.parallel_logits - self.chunked_logits).abs().max())

    @property
    def near_tie_threshold(self) -> float:
        """Largest gap that counts as a near-tie: NEAR_TIE_FRACTION x the uniform score 2/L."""
        return NEAR_TIE_FRACTION * 2 / self.config.lag_size

    def all_near_ties(self) -> bool:
        """True when every flip is explained by drift: its gap is within the drift of its two tokens (twice, one per
        token) and below `near_tie_threshold`."""
        return all(f.gap <= 2 * f.drift and f.gap <= self.near_tie_threshold for f in self.flips)

    def summary(self) -> str:
        gaps = sorted(f.gap for f in self.flips)
        return (f"{self.n_flips} flips in {self.kept_slots} kept slots; gaps {[f'{g:.1e}' for g in gaps[:12]]}"
                f"{' ...' if len(gaps) > 12 else ''}; max score drift {self.max_drift:.1e}; "
                f"max |logit diff| {self.max_logit_diff:.2e}")


class _RecordingLagKVCache(LagKVCache):
    """A recursive LagKVCache that also keeps every K/V it was given, before compression (per layer, in order)."""

    def __init__(self, config: LagConfig):
        super().__init__(config, mode="recursive")
        self.appended: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.appended.setdefault(layer_idx, []).append((key_states.detach(), value_states.detach()))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def full_kv(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, H, N, d] keys and values of every position, each as its chunk computed it."""
        parts = self.appended[layer_idx]
        return torch.cat([k for k, _ in parts], dim=-2), torch.cat([v for _, v in parts], dim=-2)


@torch.no_grad()
def compare_selections(model: PreTrainedModel, input_ids: torch.Tensor, config: LagConfig,
                       progress: bool = False) -> SelectionAgreement:
    """Run ``input_ids`` [B, N] both ways, free, and compare what each layer selects.

    Parallel: one forward under ``lrsa(model, config, backend="reference")``; its per-layer K/V come from a
    ``DynamicCache`` and its selection is the one-shot LagKV selection of them (what the LRSA mask used).
    Chunked: `chunked_prefill` through a recursive LagKVCache; its K/V are recorded chunk by chunk.
    Returns a `SelectionAgreement` with both runs' selections, scores, logits and the flips.
    """
    check_prefill_inputs(model, input_ids, config)
    input_ids = input_ids.to(model.device)
    n = input_ids.shape[1]
    dense_cache = DynamicCache(config=model.config)
    with lrsa(model, config, backend="reference"):
        parallel_logits = model(input_ids, past_key_values=dense_cache, use_cache=True).logits.float()
    recording = _RecordingLagKVCache(config)
    chunked_logits, _ = chunked_prefill(model, input_ids, config, progress=progress, cache=recording)
    layers = range(len(dense_cache.layers))
    parallel_scores = torch.stack([lagkv_scores(dense_cache.layers[i].keys, dense_cache.layers[i].values, config)
                                   for i in layers])
    chunked_scores = torch.stack([lagkv_scores(*recording.full_kv(i), config) for i in layers])
    chunked_keep = recording.kept_position_mask(n)
    return SelectionAgreement(
        config=config,
        parallel_keep=keep_mask_from_scores(parallel_scores, n, config),
        chunked_keep=chunked_keep,
        parallel_scores=parallel_scores,
        chunked_scores=chunked_scores,
        parallel_logits=parallel_logits,
        chunked_logits=chunked_logits.float(),
        flips=find_flips(parallel_scores, chunked_scores, config),
    )


def find_flips(parallel_scores: torch.Tensor, chunked_scores: torch.Tensor, config: LagConfig) -> list[SelectionFlip]:
    """Tokens selected by one run and not the other, paired within their partition by score rank.

    Args:
        parallel_scores, chunked_scores: [layers, B, H, P-1, L] float32 scores of the two runs.
    Returns:
        one `SelectionFlip` per pair, in (layer, batch, head, partition) order.
    """
    k, lag, sink = config.top_k, config.lag_size, config.sink_size
    chosen = []
    for scores in (parallel_scores, chunked_scores):
        m = torch.zeros_like(scores, dtype=torch.bool)
        chosen.append(m.scatter_(-1, select_top_k(scores, k), True))
    par, chk = chosen
    flips = []
    for layer, b, h, p in (par != chk).any(-1).nonzero().tolist():
        sp, sc = parallel_scores[layer, b, h, p], chunked_scores[layer, b, h, p]
        only_par = (par[layer, b, h, p] & ~chk[layer, b, h, p]).nonzero().flatten()
        only_chk = (chk[layer, b, h, p] & ~par[layer, b, h, p]).nonzero().flatten()
        only_par = only_par[sp[only_par].argsort(descending=True, stable=True)]  # pair the strongest with the strongest
        only_chk = only_chk[sc[only_chk].argsort(descending=True, stable=True)]
        for x, y in zip(only_par.tolist(), only_chk.tolist()):
            gap = max(abs(float(sp[x] - sp[y])), abs(float(sc[x] - sc[y])))
            drift = max(abs(float(sp[x] - sc[x])), abs(float(sp[y] - sc[y])))
            start = sink + p * lag
            flips.append(SelectionFlip(layer, b, h, p, start + x, start + y, gap, drift))
    return flips

