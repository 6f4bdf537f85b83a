"""Cost model of dense causal attention and LRSA: visible (query, key) pairs, FLOPs, tiles and KV-cache bytes."""
from __future__ import annotations

import torch

from ..config import LagConfig
from .layout import ALIGN_QUERIES, DEFAULT_BLOCK_SIZE, LrsaLayout, block_classes, visible_bounds

#: SmolLM2-135M's shapes as LlamaConfig arguments (the benchmarks build random models of them; positions raised to
#: 131072 for long benchmark inputs).
SMOLLM2_CONFIG = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
                      rope_theta=100000.0, tie_word_embeddings=True, max_position_embeddings=131072)
#: The same shapes under the short names of the cost model and the figures.
SMOLLM2_135M = {short: SMOLLM2_CONFIG[name] for short, name in (
    ("vocab", "vocab_size"), ("hidden", "hidden_size"), ("intermediate", "intermediate_size"),
    ("layers", "num_hidden_layers"), ("heads_q", "num_attention_heads"), ("heads_kv", "num_key_value_heads"),
    ("head_dim", "head_dim"))}
#: The H200's datasheet memory bandwidth, bytes/s.
H200_BANDWIDTH = 4.8e12
#: Datasheet memory bandwidth (bytes/s) by a part of the CUDA device name, most specific first.
DATASHEET_BANDWIDTH = (("H200", H200_BANDWIDTH), ("H100 PCIe", 2.0e12), ("H100", 3.35e12))


def datasheet_bandwidth(device_name: str) -> float | None:
    """The datasheet memory bandwidth (bytes/s) of a GPU named like ``torch.cuda.get_device_name()``, e.g.
    "NVIDIA H100 80GB HBM3" -> 3.35e12 (H100 SXM); None for a device not in `DATASHEET_BANDWIDTH`."""
    return next((bw for part, bw in DATASHEET_BANDWIDTH if part in device_name), None)


#: Matrix products per attention call: forward QK^T and PV; backward recomputes QK^T, then dV, dP, dQ, dK.
FORWARD_MATMULS, BACKWARD_MATMULS = 2, 5


def dense_causal_pairs(seq_len: int) -> int:
    """(query, key) pairs of causal attention over ``seq_len`` tokens: N (N + 1) / 2."""
    return seq_len * (seq_len + 1) // 2


def lrsa_visible_pairs(seq_len: int, config: LagConfig) -> int:
    """Exact number of (query, key) pairs the LRSA mask shows (per head), in O(N) work without any mask.

    Equals ``lrsa_visibility(...)[b, h].sum()`` for any keys (the count does not depend on which tokens are kept).
    """
    if config.num_partitions(seq_len) < 2 or config.top_k == config.lag_size:
        return dense_causal_pairs(seq_len)
    layout = LrsaLayout.of(seq_len, config)
    q = torch.arange(seq_len, dtype=torch.int64)
    a, lo, hi = visible_bounds(q, layout.params().long())
    return int(a.sum() + (hi - lo + 1).clamp(min=0).sum())


def attention_flops(pairs: int, heads: int, head_dim: int, backward: bool = False) -> float:
    """FLOPs of attention over ``pairs`` visible pairs per head: 2 d per pair per matrix product (multiply + add).

    Forward: 2 products; forward + backward: 2 + 5 (``backward=True``).
    """
    products = FORWARD_MATMULS + (BACKWARD_MATMULS if backward else 0)
    return 2.0 * head_dim * pairs * heads * products


def lrsa_tiles(seq_len: int, config: LagConfig, block_size: int = DEFAULT_BLOCK_SIZE,
               align_queries: bool = ALIGN_QUERIES) -> dict:
    """Tiles of the fast kernel: {"partial", "full", "dense_causal"} counts of BLOCK x BLOCK tiles computed.

    ``align_queries``: query blocks aligned with the partitions (the fast path's default, `lrsa_viz.fast.layout`).
    Partial tiles evaluate the mask per element and cost more than full ones.
    """
    n_q = -(-seq_len // block_size)
    dense = n_q * (n_q + 1) // 2
    if config.num_partitions(seq_len) < 2 or config.top_k == config.lag_size:
        return {"partial": n_q, "full": dense - n_q, "dense_causal": dense}
    partial, full = block_classes(LrsaLayout.of(seq_len, config, block_size, align_queries=align_queries))
    return {"partial": int(partial.sum()), "full": int(full.sum()), "dense_causal": dense}


def kv_cache_bytes(seq_len: int, layers: int, kv_heads: int, head_dim: int, bytes_per_value: int = 2,
                   config: LagConfig | None = None) -> int:
    """Bytes of K and V stored after ``seq_len`` tokens: all of them (``config`` None) or LagKV's retained length."""
    stored = seq_len if config is None else config.retained_length(seq_len)
    return 2 * layers * kv_heads * head_dim * stored * bytes_per_value
