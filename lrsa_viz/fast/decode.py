"""Attention of a few new queries over a fixed-size KV buffer (a static cache), grouped-query heads native.

Shapes: query [B, H_q, Q, d]; key, value [B, H_kv, M, d] (the whole buffer, M slots); H_q = G * H_kv. Slot ``j`` is
visible to new query ``i`` when ``j <= offset + i`` (`slot_mask`): the stored tokens fill slots ``0 .. offset - 1``
and the new ones follow. ``offset`` may be a device tensor (no host sync); the mask is built once per forward,
[1, 1, Q, M], and shared by every layer, batch row and head.

Kernels (``KERNELS``; all compute the same attention, tested equal):

- ``"sdpa_repeat"``: what transformers' SDPA path does with a mask: K/V repeated G times, SDPA with the mask.
- ``"sdpa_folded"``: the G query heads of a KV head become G x Q query rows of that head
  ([B, H_kv, G Q, d]), so SDPA reads each KV head once, without repeating K/V (any backend that takes a mask).
- ``"matmul"``: the same folding with explicit matrix products and a float32 softmax (cuBLAS + fused pointwise
  under torch.compile).
- ``"flex"``: FlexAttention with native GQA (``enable_gqa``) and the slot mask as a ``score_mod``. Compiled on CUDA
  (a compiled decode step), a few queries take FlexAttention's decoding kernel, which splits the M slots over many
  thread blocks (split-KV, "flash decoding") instead of one block per (batch row, head) sweeping all of them. Eager,
  it is PyTorch's reference implementation of FlexAttention (correct, not fast); compiled on a CPU it is refused
  (inductor's CPU template cannot read a mask computed inside the graph).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

KERNELS = ("sdpa_repeat", "sdpa_folded", "matmul", "flex")
#: The kernel used when none is named: the fastest of the three in a whole compiled decode step (CUDA graph,
#: host-scheduled compression, 16k prompt, bf16; data/results/bench_h100/bench_inference_*.json, one H100):
#: sdpa_folded 234 tok/s at batch 1 and 542 at batch 16, matmul 220 and 318. Timed alone, kernel by kernel (30 layers'
#: attention of one step, eager), matmul is the fastest (LagKV buffer, batch 1/16/64: 0.81/1.58/4.05 ms, sdpa_folded
#: 2.28/2.35/4.42): inside the compiled step it is not, so the default follows the whole-step measurement.
DEFAULT_KERNEL = "sdpa_folded"


def slot_mask(offset: int | torch.Tensor, q_length: int, kv_length: int, device: torch.device | str) -> torch.Tensor:
    """[1, 1, Q, M] bool: new query ``i`` sees slots ``0 .. offset + i`` of the buffer."""
    slots = torch.arange(kv_length, device=device)
    last = offset + torch.arange(q_length, device=device)
    return (slots[None, :] <= last[:, None])[None, None]


def check_kernel(kernel: str) -> str:
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    return kernel


def fold_queries(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, H_q, Q, d] -> [B, H_kv, G * Q, d]: query head ``h = kv * G + g`` becomes rows ``g * Q .. g * Q + Q - 1``
    of KV head ``kv`` (the grouping of transformers' ``repeat_kv``)."""
    b, hq, q, d = query.shape
    return query.reshape(b, kv_heads, (hq // kv_heads) * q, d)


def fold_mask(mask: torch.Tensor, groups: int) -> torch.Tensor:
    """[b, 1, Q, M] -> [b, 1, G * Q, M], the rows of `fold_queries` (a broadcast view when Q == 1)."""
    if mask.shape[2] == 1:
        return mask.expand(-1, -1, groups, -1)
    return mask.repeat(1, 1, groups, 1)


def buffer_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                     scaling: float | None = None, kernel: str = DEFAULT_KERNEL) -> torch.Tensor:
    """Attention of ``query`` [B, H_q, Q, d] over the buffer ``key``/``value`` [B, H_kv, M, d] with the bool
    ``mask`` [1 or B, 1, Q, M] (`slot_mask`). Returns [B, H_q, Q, d]."""
    b, hq, q, d = query.shape
    h_kv = key.shape[1]
    groups = hq // h_kv
    scale = d ** -0.5 if scaling is None else scaling
    if kernel == "flex":
        return _flex_buffer_attention(query, key, value, mask, scale)
    if kernel == "sdpa_repeat":
        k, v = (t.repeat_interleave(groups, dim=1) if groups > 1 else t for t in (key, value))
        return F.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scale)
    folded, fmask = fold_queries(query, h_kv), fold_mask(mask, groups)
    if kernel == "sdpa_folded":
        out = F.scaled_dot_product_attention(folded, key, value, attn_mask=fmask, scale=scale)
    elif kernel == "matmul":
        scores = torch.matmul(folded, key.transpose(-1, -2)).float() * scale  # [B, H_kv, G Q, M]
        probs = scores.masked_fill(~fmask, float("-inf")).softmax(dim=-1)
        out = torch.matmul(probs.to(value.dtype), value)
    else:
        check_kernel(kernel)
    return out.reshape(b, hq, q, d)


def _flex_buffer_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """The ``"flex"`` kernel: [B, H_q, Q, d] over [B, H_kv, M, d], hidden slots scored -inf (``mask`` [1|B, 1, Q, M])."""
    batched = mask.shape[0] > 1

    def hide_unwritten_slots(score, b, h, q_idx, kv_idx):
        return torch.where(mask[b if batched else 0, 0, q_idx, kv_idx], score, -float("inf"))

    def attend():
        return flex_attention(query, key, value, score_mod=hide_unwritten_slots, enable_gqa=True, scale=scale)

    if torch.compiler.is_compiling():  # a compiled step: FlexAttention's fused (decoding) kernels
        if not query.is_cuda:  # inductor's CPU FlexAttention template rejects a mask computed inside the graph
            raise ValueError("kernel='flex' compiles on CUDA only (inductor's CPU FlexAttention template cannot read "
                             "the slot mask); decode eagerly or choose kernel='sdpa_folded' on a CPU")
        return attend()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention.*")  # eager: the reference implementation, intended
        return attend()
