"""The compact key/value layout of fast LRSA and its static block mask.

Fast LRSA never builds the N x N mask. For N tokens and a `LagConfig` (S sink, L lag, k = int(r L) kept per scored
partition, P = (N - S) // L full partitions) every layer attends over ONE key/value buffer per KV head::

    index:  0 ........ S ....................... C ...... C_pad ..................................... kv_len
            [  sink   | selections of partitions | zero    | tokens S .. N-1, in order (the full K/V)  | zero ]
            [ (S)     | 0 .. P-2, k each         | padding |                                           | pad  ]
            <------ compact region, C = S + (P-1) k ----->  <-------------- full region ------------------->

The compact region is gathered per batch element and KV head (each head keeps its own tokens), so the mask over
this buffer is the SAME for every head and batch element: a query at position q in partition
kq = (q - S) // L (kq = -1 for the sink) sees the two index intervals

    [0, a(q))        a(q) = q + 1 if q < S, else S + k * max(kq - 1, 0)   (sink + selections of partitions <= kq - 2)
    [b(q), c(q)]     b(q) = C_pad + L * max(kq - 1, 0),  c(q) = C_pad + q - S   (all of partition kq - 1, kq causally)

which is exactly the key set of `lrsa_viz.mask.visibility_from_keep` (METHOD.md §3), each key appearing once.
Both interval ends grow with q, so the mask is static, cheap to evaluate (a few integer comparisons per element,
`make_mask_mod`) and its block structure can be computed exactly from the intervals (`block_classes`), in
O(N / BLOCK * kv_len / BLOCK) work, without any N x N tensor.

Block size (BLOCK, default 128, FlexAttention's tile):

- C_pad rounds C up to a multiple of BLOCK, so the full region starts on a block boundary and, when L is a
  multiple of BLOCK, each partition occupies whole key blocks. The padding keys are never visible.
- Query blocks start at multiples of BLOCK in position, partitions at S + j L: when S is not a multiple of BLOCK a
  query block straddles two partitions, so it touches three full-region key blocks, each only partly visible.
  ``align_queries=True`` puts D = (-S) mod BLOCK padding rows before query 0 (the query buffer is [D pad rows |
  queries 0 .. N-1]): query blocks then start at positions S + j BLOCK, on partition starts when BLOCK is a
  multiple of L or L of BLOCK, and each query block touches one diagonal (partial) and at most one fully visible
  full-region key block instead of three partial ones (`lrsa_viz.fast.cost.lrsa_tiles` counts both). The pad rows
  see key 0 only (a finite softmax; their outputs are dropped, so they get no gradient); the price is one copy of
  the queries and of the output gradient.
- When r*L (k) is not a multiple of BLOCK, the end a(q) of the visible selections falls inside a key block: that
  block is partial for the query block (at most one or two per query block).
- When L is not a multiple of BLOCK, partitions straddle key blocks: more partial blocks.
- Partial blocks are exact: FlexAttention evaluates `mask_mod` element by element inside them; only the fully
  visible blocks skip it and the invisible ones are skipped. So block alignment never changes the result, only
  the speed: work is counted in whole BLOCK x BLOCK tiles, and with L or k much smaller than BLOCK most tiles are
  partial and mostly empty, so the gain over dense attention shrinks towards what the tile count allows.
- N or kv_len not a multiple of BLOCK: the last query/key block is partial; the key buffer is padded with never
  visible zeros up to a multiple of BLOCK.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch
from torch.nn.attention.flex_attention import BlockMask

from ..config import LagConfig

#: FlexAttention's default sparse block size (tokens per query block and per key block).
DEFAULT_BLOCK_SIZE = 128
#: Whether the fast path aligns query blocks with partitions by default (``align_queries``; module docstring).
#: At S = 16, L = 128, r = 0.25 it halves the partial tiles and computes 8.5 % fewer tiles at 8k, 2.8 % at 32k.
ALIGN_QUERIES = True


@dataclasses.dataclass(frozen=True)
class LrsaLayout:
    """Sizes of the compact key/value buffer of one sequence length (see the module docstring).

    Attributes:
        seq_len: N. sink, lag, top_k: S, L, k of the LagConfig. block_size: BLOCK.
        compact: C = S + (P - 1) k, the sink and the selections. compact_padded: C_pad, C rounded up to BLOCK.
        kv_len: C_pad + (N - S) rounded up to BLOCK: length of the key/value buffer.
        query_pad: D, padding rows before query 0 in the query buffer (0 unless ``align_queries``).
    """

    seq_len: int
    sink: int
    lag: int
    top_k: int
    block_size: int
    compact: int
    compact_padded: int
    kv_len: int
    query_pad: int = 0

    @classmethod
    def of(cls, seq_len: int, config: LagConfig, block_size: int = DEFAULT_BLOCK_SIZE,
           align_queries: bool = False) -> "LrsaLayout":
        """Layout for ``seq_len`` tokens; needs at least two full partitions (N >= S + 2L) to compress anything.

        ``align_queries``: pad the query buffer so that query blocks start at S + j BLOCK (module docstring).
        """
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
        p = config.num_partitions(seq_len)
        if p < 2:
            raise ValueError(
                f"seq_len: the compact layout needs N >= S + 2L = {config.min_compressible_length} tokens "
                f"(shorter sequences are plain causal attention), got {seq_len}"
            )
        s = config.sink_size
        compact = s + (p - 1) * config.top_k
        compact_padded = math.ceil(compact / block_size) * block_size
        kv_len = compact_padded + math.ceil((seq_len - s) / block_size) * block_size
        query_pad = -s % block_size if align_queries else 0
        return cls(seq_len, s, config.lag_size, config.top_k, block_size, compact, compact_padded, kv_len, query_pad)

    @property
    def q_len(self) -> int:
        """Rows of the query buffer: D + N."""
        return self.query_pad + self.seq_len

    def params(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The four numbers of `visible_bounds`, as an int32 tensor [S, L, k, C_pad]."""
        return torch.tensor([self.sink, self.lag, self.top_k, self.compact_padded], dtype=torch.int32, device=device)


def visible_bounds(q: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The visible key-index intervals [0, a) and [b, c] of queries at positions ``q`` (any shape, integer).

    ``params`` is `LrsaLayout.params`. Returns (a, b, c), each shaped like ``q``. The readable form of the mask
    (the cost model and the block classification use it); `make_mask_mod` is the same rule written for the
    kernels. A negative ``q`` is a padding row of an aligned query buffer: it sees key 0 only (a = 1, b > c).
    """
    sink, lag, top_k, compact_padded = params[0], params[1], params[2], params[3]
    behind = torch.clamp(torch.div(q - sink, lag, rounding_mode="floor") - 1, min=0)  # max(kq - 1, 0)
    a = torch.where(q < sink, torch.clamp(q + 1, min=1), sink + top_k * behind)
    b = compact_padded + lag * behind
    c = compact_padded + q - sink
    return a, b, c


def make_mask_mod(layout: LrsaLayout):
    """FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` of the layout: True where query row ``q_idx`` of the query
    buffer (position q = q_idx - D) may see key index ``kv_idx``; equal to `visible_bounds`' intervals.

    Written for every FlexAttention backend, FlashAttention-4's CuTe tiles included: comparisons, ``&``, ``|``,
    products and a floor division of a non-negative number only (no ``clamp``/``where``, which the FLASH
    backend of torch 2.11 does not compile; no negative dividend, whose rounding a code generator may treat as
    truncation). The sizes are Python integers, constants of the compiled kernel. With
    behind = floor((q - S) / L) - 1:

        sink and pad rows (q < S):  kv <= q, or kv == 0                      (= [0, a), a = max(q + 1, 1))
        scored rows (q >= S):       kv < S or kv < S + k behind             (= [0, a), a = S + k max(behind, 0))
        full region:                kv >= C_pad, kv >= C_pad + L behind, kv <= C_pad + q - S    (= [b, c])
    """
    s, lag, k, cp, d = layout.sink, layout.lag, layout.top_k, layout.compact_padded, layout.query_pad
    m = -(-(d + s) // lag)  # ceil((D + S) / L): q_idx - D - S + m L >= 0, so the division below floors exactly
    offset, first_scored, diagonal = m * lag - d - s, d + s, cp - d - s

    def lrsa_compact_mask(b, h, q_idx, kv_idx):
        behind = (q_idx + offset) // lag - (m + 1)
        early = (q_idx < first_scored) & ((kv_idx + d <= q_idx) | (kv_idx < 1))
        scored = (q_idx >= first_scored) & ((kv_idx < s) | (kv_idx < s + k * behind))
        full = (kv_idx >= cp) & (kv_idx >= cp + lag * behind) & (kv_idx <= q_idx + diagonal)
        return early | scored | full

    return lrsa_compact_mask


def block_classes(layout: LrsaLayout, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Classify every (query block, key block) tile as empty, partial or full, exactly, from the intervals.

    Every key block lies wholly in the compact region or wholly in the full region (C_pad is a multiple of BLOCK),
    so only one interval matters per tile, and because the interval ends never decrease with q, the first and last
    query row of a block decide: O(n_q_blocks * n_kv_blocks) work, no per-element mask.
    Returns:
        (partial, full): bool [n_q_blocks, n_kv_blocks] over the query buffer (D + N rows) and the key buffer.
        A tile is full when every query row of it sees every key of it, partial when some but not all
        (query, key) pairs are visible, empty otherwise.
    """
    bs, n = layout.block_size, layout.seq_len
    n_q, n_kv = math.ceil(layout.q_len / bs), math.ceil(layout.kv_len / bs)
    params = layout.params(device).long()
    first = torch.arange(n_q, device=device)[:, None] * bs - layout.query_pad  # position of each block's first row
    last = torch.clamp(first + bs - 1, max=n - 1)  # last real row
    s = torch.arange(n_kv, device=device)[None, :] * bs  # key block [s, e]
    e = torch.clamp(s + bs, max=layout.kv_len) - 1
    a_first, b_first, c_first = visible_bounds(first, params)
    a_last, b_last, _ = visible_bounds(last, params)
    in_full_region = s >= layout.compact_padded
    # compact region, interval [0, a): a grows with q
    full_compact = a_first > e
    any_compact = a_last > s
    # full region, interval [b, c]: b and c grow with q; the first row reaching key s (c(q) >= s) has the smallest b
    full_full = (b_last <= s) & (c_first >= e)
    q_star = torch.maximum(first, s - layout.compact_padded + layout.sink)  # c(q*) = s
    b_star = visible_bounds(q_star, params)[1]
    any_full = (q_star <= last) & (b_star <= e)
    full = torch.where(in_full_region, full_full, full_compact)
    visible = torch.where(in_full_region, any_full, any_compact)
    return visible & ~full, full


def _to_indices(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[n_q, n_kv] bool -> (num_blocks [1, 1, n_q] int32, indices [1, 1, n_q, n_kv] int32, selected blocks first)."""
    n_kv = selected.shape[-1]
    idx = torch.arange(n_kv, device=selected.device)
    order = torch.argsort(torch.where(selected, idx, idx + n_kv), dim=-1)
    return selected.sum(-1, dtype=torch.int32)[None, None], order.to(torch.int32)[None, None]


@functools.lru_cache(maxsize=64)
def _cached_block_mask(layout: LrsaLayout, device: str) -> BlockMask:
    partial, full = block_classes(layout, "cpu")  # built on the CPU, copied once: no device reads
    kv_num, kv_idx = _to_indices(partial)
    full_num, full_idx = _to_indices(full)
    kv_num, kv_idx, full_num, full_idx = (t.to(device) for t in (kv_num, kv_idx, full_num, full_idx))
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=layout.block_size, mask_mod=make_mask_mod(layout),
        seq_lengths=(layout.q_len, layout.kv_len),
    )


def lrsa_block_mask(layout: LrsaLayout, device: torch.device | str) -> BlockMask:
    """The static FlexAttention `BlockMask` of a layout, shared by every batch element and head (B = H = 1).

    Built once per (layout, device) and cached; its tensors are O(q_len / BLOCK * kv_len / BLOCK) integers.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _cached_block_mask(layout, str(device))


def pad_queries(query: torch.Tensor, layout: LrsaLayout) -> torch.Tensor:
    """The query buffer [B, H_q, D + layout N, d]: D zero rows, ``query`` (n <= layout N rows), zero rows up to the
    layout's length (`fast_lrsa_attention` rounds N up to whole blocks). Returned as is when nothing is added.

    Laid out [B, D + N, H_q, d] in memory (a transposed view), the order the model's projections use: FlexAttention
    returns its output in the query's memory order, so for one sequence the real rows of the output are already the
    [N, H_q d] input of the output projection, which saves it for the backward without a second copy
    (benchmarks/audit_saved_tensors.py). With several sequences the padding rows sit between them and a copy stays."""
    n = query.shape[2]
    if n > layout.seq_len:
        raise ValueError(f"query has {n} positions, more than the layout's {layout.seq_len}")
    return pad_rows(query, layout.query_pad, layout.seq_len - n)


def pad_rows(x: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """[B, H, n, d] -> [B, H, before + n + after, d] with zero rows, laid out [B, rows, H, d] in memory (a transposed
    view; `pad_queries` says why). ``x`` itself when nothing is added."""
    if not before and not after:
        return x
    b, h, _, d = x.shape
    return torch.cat([x.new_zeros(b, before, h, d), x.transpose(1, 2), x.new_zeros(b, after, h, d)], dim=1).transpose(1, 2)


class GatherTokens(torch.autograd.Function):
    """``x.gather(2, index)`` whose backward keeps only the index (torch's gather saves all of ``x`` for its
    backward, which would keep every layer's post-RoPE K and V alive until the backward pass: +N tokens of K/V
    per layer in training, measured +0.89 GiB at 8k x 4 on SmolLM2 shapes). Backward: scatter-add into zeros."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.x_shape = x.shape
        return x.gather(2, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return grad.new_zeros(ctx.x_shape).scatter_add_(2, index, grad), None


def layout_kv(key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor, layout: LrsaLayout):
    """Build the key and value buffers of the layout (differentiable: gradients flow back to ``key``/``value``).

    Args:
        key, value: [B, H_kv, n, d] post-RoPE, n <= the layout's N (the full region is zero-padded after them).
        positions: LongTensor [B, H_kv, C] of the compact region (from `compact_positions`), each < n.
    Returns:
        (key_buffer, value_buffer), each [B, H_kv, kv_len, d]. A key kept by LagKV appears twice (compact and
        full region); the mask shows each query exactly one of the two copies, and the gradient of the key is the
        sum over both copies, which is the gradient of the single key of the reference path.
    """
    b, h, n, d = key.shape
    if n > layout.seq_len:
        raise ValueError(f"key has {n} positions, more than the layout's {layout.seq_len}")
    if positions.shape != (b, h, layout.compact):
        raise ValueError(f"positions must be [B, H_kv, C] = {(b, h, layout.compact)}, got {tuple(positions.shape)}")
    index = positions[..., None].expand(-1, -1, -1, d)
    gap = layout.compact_padded - layout.compact
    tail = layout.kv_len - layout.compact_padded - (n - layout.sink)

    def build(x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [GatherTokens.apply(x, index), x.new_zeros(b, h, gap, d), x[:, :, layout.sink:], x.new_zeros(b, h, tail, d)],
            dim=2,
        )

    return build(key), build(value)


def buffer_positions(positions: torch.Tensor, layout: LrsaLayout) -> torch.Tensor:
    """Original token position held at each index of the buffer, -1 for padding: LongTensor [B, H_kv, kv_len].

    For teaching and tests: maps a buffer-index mask back to token positions.
    """
    b, h, _ = positions.shape
    out = torch.full((b, h, layout.kv_len), -1, dtype=torch.long, device=positions.device)
    out[..., : layout.compact] = positions
    full = torch.arange(layout.sink, layout.seq_len, device=positions.device)
    out[..., layout.compact_padded: layout.compact_padded + full.numel()] = full
    return out
