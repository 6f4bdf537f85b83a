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
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

KERNELS = ("sdpa_repeat", "sdpa_folded", "matmul")
#: The kernel used when none is named: the fastest of the three in a whole compiled decode step (CUDA graph,
#: host-scheduled compression, 16k prompt, bf16, one H100, side by side in one process:
#: data/results/bench_h100/bench_inference_b1_kernels.json and _b16_b64_kernels.json): matmul decodes 586 / 6,505 /
#: 14,870 tokens/s at batch 1 / 16 / 64, sdpa_folded 267 / 4,198 / 11,320 (SDPA with a mask and a few query rows
#: per head runs on few thread blocks). Before the cache's in-place write fix the order inside the step was the
#: reverse (bench_inference_matmul.json, _sdpa_folded.json): those runs timed a per-layer copy of the whole K/V
#: slice. (A FlexAttention kernel was tried, 2026-12-07: inside the compiled step its Triton template failed to
#: compile, and alone it took 200 ms for the 30 layers at batch 16; it is not offered.)
DEFAULT_KERNEL = "matmul"


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
