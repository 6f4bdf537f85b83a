"""Timing: the project's one timer (`median_time`, used by benchmarks/bench_lrsa.py too), a host-sync counter, and
a small live attention benchmark (CUDA): fast LRSA against dense SDPA, in the format of bench_lrsa's JSON."""
from __future__ import annotations

import functools
import statistics
import time
import warnings
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..config import LagConfig
from .cost import attention_flops, dense_causal_pairs, lrsa_visible_pairs
from .kernel import fast_lrsa_attention, kernel_report


def median_time(fn: Callable[[], object], *, min_reps: int = 3, max_reps: int = 10, target_s: float = 0.5,
                warmup: int = 2, device: torch.device | str | None = None) -> dict:
    """The project's one timer: median seconds of ``fn()`` after ``warmup`` calls.

    Repeats at least ``min_reps`` and at most ``max_reps`` times, stopping after ``min_reps`` once ``target_s``
    seconds have passed. On CUDA (default when available) each call is timed with CUDA events on the current
    stream; on the CPU with ``time.perf_counter``.
    Returns:
        {"median_s", "min_s", "reps"}.
    """
    if min_reps < 1 or max_reps < min_reps:
        raise ValueError(f"need 1 <= min_reps <= max_reps, got min_reps={min_reps}, max_reps={max_reps}")
    on_cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    if on_cuda:
        torch.cuda.synchronize()
    times: list[float] = []
    t_start = time.perf_counter()
    while True:
        if on_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        if len(times) >= max_reps or (len(times) >= min_reps and time.perf_counter() - t_start > target_s):
            break
    return {"median_s": statistics.median(times), "min_s": min(times), "reps": len(times)}


def count_host_syncs(fn: Callable[[], object]) -> int | None:
    """How many times ``fn()`` synchronises the host with the CUDA device (``.item()``, ``nonzero``, blocking
    copies...), counted by PyTorch's sync debug mode ('warn': one warning per synchronising call, warnings of the
    backward pass included). None without CUDA. Explicit ``torch.cuda.synchronize()`` calls are not counted.

    Count warmed-up code (as the benchmarks do, after their timing runs). The first counting cycle of a process
    reported one synchronisation more than the later ones on an H100 (the same ``x.sum()`` counted 1, 0, 0, 0; also
    after a warm-up ``x.sum()``), so the first call runs one throwaway cycle around a tiny kernel first.
    """
    if not torch.cuda.is_available():
        return None
    _prime_sync_counter()
    return _sync_warnings(fn)


@functools.cache
def _prime_sync_counter() -> None:
    """Once per process: the throwaway first counting cycle (see `count_host_syncs`)."""
    _sync_warnings(lambda: torch.ones(1, device="cuda").add_(1))


def _sync_warnings(fn: Callable[[], object]) -> int:
    """The number of sync-debug-mode warnings ``fn()`` raises (CUDA only)."""
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
    return sum("synchroniz" in str(w.message).lower() for w in caught)  # "called a synchronizing CUDA operation"


def live_attention_benchmark(seq_lens: Sequence[int], ratios: Sequence[float] = (0.25,), tokens: int = 65536,
                             heads_q: int = 9, heads_kv: int = 3, head_dim: int = 64, peak_flops: float = 7.7e14,
                             progress: bool = True) -> dict:
    """Forward and forward+backward time of dense causal SDPA (PyTorch's default backend) and fast LRSA, bf16.

    Args:
        seq_lens: the N to time; batch = max(1, tokens // N). ratios: LRSA ratios (sink 16, lag 128).
        peak_flops: the matmul rate used for the FLOP-count bound (default: 770 TFLOP/s, measured on an H200).
    Returns:
        ``{"gpu", "attention": [rows]}`` shaped like ``benchmarks/bench_lrsa.py``'s output, for the same figures.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("live_attention_benchmark needs a CUDA GPU (see the committed JSON otherwise)")
    rows = []
    for n in tqdm(list(seq_lens), desc="live benchmark", disable=not progress):
        batch = max(1, tokens // n)
        q, k, v = (torch.randn(batch, h, n, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for h in (heads_q, heads_kv, heads_kv))
        grad = torch.randn_like(q)

        def passes(attend):
            def fwd():
                with torch.no_grad():
                    attend()

            def fwd_bwd():
                torch.autograd.grad(attend(), (q, k, v), grad)

            return {p: median_time(f, min_reps=5, max_reps=5) for p, f in (("fwd", fwd), ("fwd_bwd", fwd_bwd))}

        dense = passes(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
        row = {"n": n, "batch": batch, "dense": {"sdpa_default": dense}, "lrsa": {},
               "dense_bound_s": {p: attention_flops(dense_causal_pairs(n), heads_q, head_dim, p == "fwd_bwd")
                                 * batch / peak_flops for p in ("fwd", "fwd_bwd")}}
        for ratio in ratios:
            cfg = LagConfig(16, 128, ratio)
            t = passes(lambda: fast_lrsa_attention(q, k, v, cfg))
            pairs = lrsa_visible_pairs(n, cfg)
            t["bound_s"] = {p: attention_flops(pairs, heads_q, head_dim, p == "fwd_bwd") * batch / peak_flops
                            for p in ("fwd", "fwd_bwd")}
            t["speedup_vs_fastest_dense"] = {p: dense[p]["median_s"] / t[p]["median_s"] for p in ("fwd", "fwd_bwd")}
            row["lrsa"][str(ratio)] = t
        rows.append(row)
    return {"gpu": torch.cuda.get_device_name(0), "environment": {"torch": torch.__version__},
            "kernel": kernel_report(), "attention": rows}
