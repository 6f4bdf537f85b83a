"""Benchmark fast LRSA against the fastest dense causal attention on one CUDA GPU; writes one JSON file.

One command (from the repository root):

    PYTHONPATH=. python3 benchmarks/bench_lrsa.py --out data/results/bench_lrsa_h200.json

Sections (each timed side by side in the same process, bf16, SmolLM2-135M shapes: 9 query heads, 3 KV heads,
head_dim 64):
  correctness  fast LRSA vs the reference (dense-mask) path: selected indices, outputs and gradients;
  attention    forward and forward+backward time: fast LRSA (ratio 0.25, 0.125), SDPA cuDNN, SDPA Flash, and the
               FLOP-count bound (FLOPs / measured bf16 matmul rate), N = 8k .. 128k, batch = tokens // N;
  profile      torch.profiler kernel breakdown of one fast-LRSA forward+backward at 8k and 32k;
  training     a full SmolLM2-shaped training step (random init, AdamW): tokens/s and peak memory, dense SDPA
               vs fast LRSA, at 8k and 32k;
  inference    prefill time, KV-cache bytes and decode tokens/s at batch 1 and 16: full cache (SDPA) vs the
               compressed LagKVCache (fast-LRSA prefill, decoding over the compressed cache).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from lrsa_viz import LagConfig, LagKVCache, disable_lrsa, enable_lrsa, environment_record
from lrsa_viz.fast import compact_positions, compiled_compact_positions, fast_lrsa_attention
from lrsa_viz.fast.cost import attention_flops, dense_causal_pairs, lrsa_tiles, lrsa_visible_pairs
from lrsa_viz.fast.kernel import compiled_flex_attention
from lrsa_viz.fast.layout import LrsaLayout, layout_kv, lrsa_block_mask
from lrsa_viz.mask import visibility_from_keep
from lrsa_viz.scoring import keep_mask, lagkv_keep_indices

HEADS_Q, HEADS_KV, HEAD_DIM = 9, 3, 64
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
               tie_word_embeddings=True, max_position_embeddings=131072)
#: Accepted error of bf16 fast LRSA against a float32 reference (relative L2 norm, ||x - ref|| / ||ref||): at most
#: this, and at most ERROR_FACTOR x the error of the bf16 reference (dense-mask) path + ERROR_SLACK.
REL_TOL, ERROR_FACTOR, ERROR_SLACK = 1e-2, 1.5, 1e-3
DENSE = {"sdpa_cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa_flash": SDPBackend.FLASH_ATTENTION}


def log(*a):
    print(*a, flush=True)


def cuda_time(fn, min_reps=3, max_reps=10, target_s=0.5, warmup=2) -> dict:
    """Median wall time of ``fn()`` on the GPU (CUDA events), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    t_start = time.perf_counter()
    while True:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
        if len(times) >= max_reps or (len(times) >= min_reps and time.perf_counter() - t_start > target_s):
            break
    return {"median_s": statistics.median(times), "min_s": min(times), "reps": len(times)}


def measured_matmul_rate() -> float:
    """bf16 FLOP/s of an 8192^3 matrix product on random data (the ceiling for the FLOP-count bound)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = cuda_time(lambda: a @ b, min_reps=10, max_reps=30, target_s=0.5)["median_s"]
    return 2 * 8192 ** 3 / t


def random_qkv(batch, n, requires_grad=True, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda h: torch.randn(batch, h, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)  # noqa: E731
    q, k, v = mk(HEADS_Q), mk(HEADS_KV), mk(HEADS_KV)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


# ----------------------------------------------------------------------------------------------------- correctness
def reference_attention(q, k, v, cfg, dtype):
    """The reference path: dense LRSA mask from the one-shot keep mask, SDPA (math) in ``dtype``."""
    with torch.no_grad():
        visible = visibility_from_keep(keep_mask(k.detach(), v.detach(), cfg), cfg)  # [B, H_kv, N, N]
        visible = visible.repeat_interleave(HEADS_Q // HEADS_KV, dim=1)
    qq, kk, vv = (t.to(dtype) for t in (q, k, v))
    g = HEADS_Q // HEADS_KV
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(qq, kk.repeat_interleave(g, 1), vv.repeat_interleave(g, 1), attn_mask=visible)


def check_correctness(cfg: LagConfig, n=4096, batch=2) -> dict:
    q, k, v = random_qkv(batch, n, seed=1)
    grad_out = torch.randn(batch, HEADS_Q, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        fast_pos = compiled_compact_positions()(k, v, cfg)
        ref_pos = lagkv_keep_indices(k, v, cfg)[..., : fast_pos.shape[-1]]
    mismatched = int((fast_pos != ref_pos).sum())

    def run(fn):
        out = fn()
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        return [out.detach(), *grads]

    fast = run(lambda: fast_lrsa_attention(q, k, v, cfg))
    # float32 reference from the same bf16 inputs (scores are float32 either way: same selections)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    out32 = reference_attention(q32, k32, v32, cfg, torch.float32)
    ref32 = [out32.detach(), *torch.autograd.grad(out32, (q32, k32, v32), grad_out.float())]
    ref_bf16 = run(lambda: reference_attention(q, k, v, cfg, torch.bfloat16))
    names = ["out", "dq", "dk", "dv"]
    result = {"n": n, "batch": batch, "ratio": cfg.ratio, "selected_positions": int(fast_pos.numel()),
              "mismatched_positions": mismatched, "rel_err_fast_vs_fp32": {}, "rel_err_reference_bf16_vs_fp32": {}}
    ok = mismatched == 0
    for name, f, r, b16 in zip(names, fast, ref32, ref_bf16):
        ef, eb = rel_err(f, r), rel_err(b16, r)
        result["rel_err_fast_vs_fp32"][name] = ef
        result["rel_err_reference_bf16_vs_fp32"][name] = eb
        ok &= bool(math.isfinite(ef) and ef <= REL_TOL and ef <= ERROR_FACTOR * eb + ERROR_SLACK)
    result["max_abs_out_fast_vs_reference_bf16"] = (fast[0].float() - ref_bf16[0].float()).abs().max().item()
    result["passed"] = ok
    return result


# -------------------------------------------------------------------------------------------------------- attention
def dense_fn(backend, q, k, v, gqa_native):
    g = HEADS_Q // HEADS_KV
    if not gqa_native:
        k, v = (t.detach().repeat_interleave(g, 1).requires_grad_() for t in (k, v))

    def fwd():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa_native)

    return fwd, (q, k, v)


def time_fwd_bwd(fwd, inputs, grad_out) -> dict:
    def fwd_only():
        with torch.no_grad():
            fwd()

    def fwd_bwd():
        out = fwd()
        torch.autograd.grad(out, inputs, grad_out)

    return {"fwd": cuda_time(fwd_only), "fwd_bwd": cuda_time(fwd_bwd)}


def dense_variant(backend, q, k, v):
    """(fwd, inputs, gqa_native) for a dense SDPA backend; GQA natively if the backend accepts it, else expanded."""
    for native in (True, False):
        fwd, inputs = dense_fn(backend, q, k, v, native)
        try:
            out = fwd()
            torch.autograd.grad(out, inputs, torch.ones_like(out))
            return fwd, inputs, native
        except RuntimeError:
            continue
    raise RuntimeError(f"SDPA backend {backend} unavailable for these shapes")


def bench_attention(seq_lens, ratios, tokens, peak) -> list[dict]:
    rows = []
    for n in seq_lens:
        batch = max(1, tokens // n)
        q, k, v = random_qkv(batch, n)
        grad_out = torch.randn_like(q)
        dense_flops_f = attention_flops(dense_causal_pairs(n), HEADS_Q, HEAD_DIM) * batch
        dense_flops_fb = attention_flops(dense_causal_pairs(n), HEADS_Q, HEAD_DIM, backward=True) * batch
        row = {"n": n, "batch": batch, "dense": {}, "lrsa": {},
               "dense_bound_s": {"fwd": dense_flops_f / peak, "fwd_bwd": dense_flops_fb / peak}}
        for name, backend in DENSE.items():
            try:
                fwd, inputs, native = dense_variant(backend, q, k, v)
                t = time_fwd_bwd(fwd, inputs, grad_out)
                t["gqa"] = "native" if native else "expanded K/V"
                t["tflops"] = {"fwd": dense_flops_f / t["fwd"]["median_s"] / 1e12,
                               "fwd_bwd": dense_flops_fb / t["fwd_bwd"]["median_s"] / 1e12}
                row["dense"][name] = t
            except Exception as e:  # a backend missing on this build is reported, not fatal
                row["dense"][name] = {"error": repr(e)[:300]}
            log(f"  n={n} {name}: {json.dumps({k2: v2 for k2, v2 in row['dense'][name].items() if k2 != 'tflops'})[:200]}")
        for ratio in ratios:
            cfg = LagConfig(16, 128, ratio)
            pairs = lrsa_visible_pairs(n, cfg)
            ff = attention_flops(pairs, HEADS_Q, HEAD_DIM) * batch
            ffb = attention_flops(pairs, HEADS_Q, HEAD_DIM, backward=True) * batch
            t = time_fwd_bwd(lambda: fast_lrsa_attention(q, k, v, cfg), (q, k, v), grad_out)
            # components: selection alone; the FlexAttention call alone on prebuilt buffers
            sel = cuda_time(lambda: compiled_compact_positions()(k.detach(), v.detach(), cfg))
            layout = LrsaLayout.of(n, cfg)
            bm = lrsa_block_mask(layout, q.device)
            with torch.no_grad():
                pos = compiled_compact_positions()(k, v, cfg)
            kb, vb = (x.detach().requires_grad_() for x in layout_kv(k.detach(), v.detach(), pos, layout))
            flex = lambda: compiled_flex_attention()(q, kb, vb, block_mask=bm, enable_gqa=True)  # noqa: E731
            t_flex = time_fwd_bwd(flex, (q, kb, vb), grad_out)
            fastest = {p: min(d[p]["median_s"] for d in row["dense"].values() if "error" not in d)
                       for p in ("fwd", "fwd_bwd")}
            row["lrsa"][str(ratio)] = {
                **t, "selection_s": sel["median_s"], "flex_only": t_flex, "visible_pairs_per_head": pairs,
                "tiles": lrsa_tiles(n, cfg), "bound_s": {"fwd": ff / peak, "fwd_bwd": ffb / peak},
                "tflops_useful": {"fwd": ff / t["fwd"]["median_s"] / 1e12, "fwd_bwd": ffb / t["fwd_bwd"]["median_s"] / 1e12},
                "speedup_vs_fastest_dense": {p: fastest[p] / t[p]["median_s"] for p in ("fwd", "fwd_bwd")},
            }
            log(f"  n={n} lrsa r={ratio}: fwd {t['fwd']['median_s'] * 1e3:.2f} ms, fwd+bwd {t['fwd_bwd']['median_s'] * 1e3:.2f} ms, "
                f"speedup fwd+bwd {row['lrsa'][str(ratio)]['speedup_vs_fastest_dense']['fwd_bwd']:.2f}x "
                f"(flex only {t_flex['fwd_bwd']['median_s'] * 1e3:.2f} ms, selection {sel['median_s'] * 1e3:.2f} ms)")
        rows.append(row)
        del q, k, v, grad_out
        torch.cuda.empty_cache()
    return rows


def profile_fast(n, tokens, cfg) -> dict:
    """Top CUDA kernels of one fast-LRSA forward+backward (after warm-up), with their share of device time."""
    from torch.profiler import ProfilerActivity, profile
    batch = max(1, tokens // n)
    q, k, v = random_qkv(batch, n)
    grad_out = torch.randn_like(q)

    def step():
        torch.autograd.grad(fast_lrsa_attention(q, k, v, cfg), (q, k, v), grad_out)

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.device_time_total for e in events)
    top = sorted(events, key=lambda e: -e.device_time_total)[:12]
    return {"n": n, "batch": batch, "ratio": cfg.ratio, "total_device_ms": total / 1e3,
            "kernels": [{"name": e.key[:120], "ms": e.device_time_total / 1e3, "share": e.device_time_total / total,
                         "calls": e.count} for e in top]}


def bench_variants(seq_lens, tokens, cfg) -> list[dict]:
    """FlexAttention call alone (prebuilt buffers), forward+backward: compiled with dynamic shapes (one kernel for
    every N) against static shapes (the library's choice: one compilation per N)."""
    from torch.nn.attention.flex_attention import flex_attention
    dynamic = torch.compile(flex_attention, dynamic=True)
    rows = []
    for n in seq_lens:
        batch = max(1, tokens // n)
        q, k, v = random_qkv(batch, n)
        grad_out = torch.randn_like(q)
        layout = LrsaLayout.of(n, cfg)
        bm = lrsa_block_mask(layout, q.device)
        with torch.no_grad():
            pos = compiled_compact_positions()(k, v, cfg)
        kb, vb = (x.detach().requires_grad_() for x in layout_kv(k.detach(), v.detach(), pos, layout))
        row = {"n": n, "batch": batch}
        for name, fn in (("dynamic", dynamic), ("static", compiled_flex_attention())):
            t = time_fwd_bwd(lambda: fn(q, kb, vb, block_mask=bm, enable_gqa=True), (q, kb, vb), grad_out)
            row[name] = {p: t[p]["median_s"] for p in ("fwd", "fwd_bwd")}
        log(f"  variants n={n}: {row}")
        rows.append(row)
    return rows


def profile_summary(prof, wall_s: float, steps: int) -> dict:
    """Per step: wall time, summed kernel time (GPU busy fraction), host syncs, top ops by device and by CPU time."""
    from torch.autograd import DeviceType
    device_total = sum(e.device_time_total for e in prof.events() if e.device_type == DeviceType.CUDA) / 1e6
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    cpu_ops = [e for e in events if e.device_type == DeviceType.CPU]
    syncs = sum(e.count for e in cpu_ops if e.key in ("aten::_local_scalar_dense", "cudaStreamSynchronize",
                                                       "cudaDeviceSynchronize"))
    top = lambda evs, attr: [{"name": e.key[:100], "ms_per_step": getattr(e, attr) / 1e3 / steps,  # noqa: E731
                              "calls_per_step": e.count / steps} for e in sorted(evs, key=lambda e: -getattr(e, attr))[:10]]
    return {"wall_s_per_step": wall_s / steps, "kernel_s_per_step": device_total / steps,
            "gpu_busy_fraction": device_total / wall_s, "host_syncs_per_step": syncs / steps,
            "top_kernels": top(kernels, "device_time_total"), "top_cpu_ops": top(cpu_ops, "self_cpu_time_total")}


def profiled(fn, steps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    return profile_summary(prof, wall, steps)


def profile_training(n, batch, cfg) -> dict:
    """torch.profiler of one training step, dense SDPA vs fast LRSA: where the step's time goes."""
    model = smollm2_model().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    ids = torch.randint(0, SMOLLM2["vocab_size"], (batch, n), device="cuda")

    def step():
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    out = {"n": n, "batch": batch}
    for mode in ("dense_sdpa", "fast_lrsa"):
        enable_lrsa(model, cfg, backend="flex") if mode == "fast_lrsa" else disable_lrsa(model)
        for _ in range(2):
            step()
        out[mode] = profiled(step, 1)
        log(f"  profile train n={n} {mode}: wall {out[mode]['wall_s_per_step']:.3f} s, busy {out[mode]['gpu_busy_fraction']:.2f}, syncs {out[mode]['host_syncs_per_step']}")
    disable_lrsa(model)
    return out


def profile_decode(prompt_len, batch, cfg, steps=16) -> dict:
    """torch.profiler of decode steps, full DynamicCache (SDPA) vs compressed LagKVCache (LRSA model)."""
    from transformers import DynamicCache
    model = smollm2_model().eval()
    ids = torch.randint(0, SMOLLM2["vocab_size"], (batch, prompt_len), device="cuda")
    out = {"prompt_len": prompt_len, "batch": batch}
    for mode in ("full_cache_sdpa", "lagkv_cache_fast_lrsa"):
        if mode == "full_cache_sdpa":
            disable_lrsa(model)
            cache = DynamicCache(config=model.config)
        else:
            enable_lrsa(model, cfg, backend="flex")
            cache = LagKVCache(cfg)
        with torch.no_grad():
            tok = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
            state = {"tok": tok}

            def step():
                state["tok"] = model(input_ids=state["tok"], past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)

            for _ in range(4):
                step()
            out[mode] = profiled(step, steps)
        log(f"  profile decode b={batch} {mode}: wall/step {out[mode]['wall_s_per_step'] * 1e3:.1f} ms, busy {out[mode]['gpu_busy_fraction']:.2f}, syncs {out[mode]['host_syncs_per_step']}")
    disable_lrsa(model)
    return out


# --------------------------------------------------------------------------------------------------------- training
def smollm2_model():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(**SMOLLM2, attn_implementation="sdpa")
    return LlamaForCausalLM(config).to(device="cuda", dtype=torch.bfloat16)


def bench_training(cases, cfg, steps=5) -> list[dict]:
    model = smollm2_model().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    rows = []
    for n, batch in cases:
        ids = torch.randint(0, SMOLLM2["vocab_size"], (batch, n), device="cuda")
        row = {"n": n, "batch": batch}
        for mode in ("dense_sdpa", "fast_lrsa"):
            if mode == "fast_lrsa":
                enable_lrsa(model, cfg, backend="flex")
            else:
                disable_lrsa(model)

            def step():
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss

            try:
                for _ in range(2):
                    loss = step()
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                t = cuda_time(step, min_reps=steps, max_reps=steps, warmup=0)
                peak = torch.cuda.max_memory_allocated()
                row[mode] = {"step_s": t["median_s"], "tokens_per_s": batch * n / t["median_s"],
                             "peak_memory_gib": peak / 2 ** 30, "loss": float(loss)}
            except torch.OutOfMemoryError as e:
                row[mode] = {"error": "out of memory: " + str(e)[:200]}
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            log(f"  train n={n} b={batch} {mode}: {row[mode]}")
        disable_lrsa(model)
        if "error" not in row["dense_sdpa"] and "error" not in row["fast_lrsa"]:
            row["speedup"] = row["dense_sdpa"]["step_s"] / row["fast_lrsa"]["step_s"]
            row["peak_memory_ratio"] = row["fast_lrsa"]["peak_memory_gib"] / row["dense_sdpa"]["peak_memory_gib"]
        rows.append(row)
    return rows


def model_level_check(cfg, n=2048, batch=2) -> dict:
    """SmolLM2-shaped model, bf16, no grad: loss with backend='flex' vs backend='reference'."""
    model = smollm2_model().eval()
    ids = torch.randint(0, SMOLLM2["vocab_size"], (batch, n), device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    out = {}
    with torch.no_grad():
        for backend in ("reference", "flex"):
            enable_lrsa(model, cfg, backend=backend)
            out[backend] = model(input_ids=ids, labels=ids, use_cache=False)
        disable_lrsa(model)
        dense = model(input_ids=ids, labels=ids, use_cache=False)
    lf, lr = out["flex"].logits.float(), out["reference"].logits.float()
    return {"n": n, "batch": batch, "loss_reference": float(out["reference"].loss), "loss_flex": float(out["flex"].loss),
            "loss_dense": float(dense.loss), "logits_rel_err_flex_vs_reference": rel_err(lf, lr),
            "logits_rel_diff_dense_vs_reference": rel_err(dense.logits.float(), lr)}


# -------------------------------------------------------------------------------------------------------- inference
def kv_bytes(cache) -> int:
    if isinstance(cache, LagKVCache):
        return cache.nbytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def bench_inference(prompt_len, batches, cfg, new_tokens) -> list[dict]:
    from transformers import DynamicCache
    model = smollm2_model().eval()
    rows = []
    for batch in batches:
        ids = torch.randint(0, SMOLLM2["vocab_size"], (batch, prompt_len), device="cuda")
        row = {"prompt_len": prompt_len, "batch": batch, "new_tokens": new_tokens}
        for mode in ("full_cache_sdpa", "lagkv_cache_fast_lrsa"):
            if mode == "full_cache_sdpa":
                disable_lrsa(model)
                make_cache = lambda: DynamicCache(config=model.config)  # noqa: E731
            else:
                enable_lrsa(model, cfg, backend="flex")
                make_cache = lambda: LagKVCache(cfg)  # noqa: E731
            with torch.no_grad():
                for warm in (True, False):
                    cache = make_cache()
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
                    torch.cuda.synchronize()
                    prefill = time.perf_counter() - t0
                    prefill_bytes = kv_bytes(cache)
                    tok = logits[:, -1].argmax(-1, keepdim=True)
                    steps = 8 if warm else new_tokens
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    for _ in range(steps):
                        tok = model(input_ids=tok, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
                    torch.cuda.synchronize()
                    decode = time.perf_counter() - t0
            row[mode] = {"prefill_s": prefill, "kv_bytes_after_prefill": prefill_bytes, "kv_bytes_after_decode": kv_bytes(cache),
                         "decode_s": decode, "decode_tokens_per_s": batch * new_tokens / decode,
                         "stored_tokens_layer0": int(cache.layers[0].keys.shape[-2])}
            log(f"  infer b={batch} {mode}: {row[mode]}")
            del cache
            torch.cuda.empty_cache()
        disable_lrsa(model)
        full, comp = row["full_cache_sdpa"], row["lagkv_cache_fast_lrsa"]
        row["kv_bytes_ratio"] = comp["kv_bytes_after_prefill"] / full["kv_bytes_after_prefill"]
        row["decode_speedup"] = comp["decode_tokens_per_s"] / full["decode_tokens_per_s"]
        row["prefill_speedup"] = full["prefill_s"] / comp["prefill_s"]
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------------------- main
def git_commit() -> str | None:
    """The repository's HEAD commit (and '+dirty' with uncommitted changes), or None outside a git checkout."""
    import subprocess
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout
        return head + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="data/results/bench_lrsa.json")
    ap.add_argument("--seq-lens", default="8192,16384,32768,65536,131072")
    ap.add_argument("--ratios", default="0.25,0.125")
    ap.add_argument("--tokens", type=int, default=262144, help="tokens per attention batch: batch = tokens // N")
    ap.add_argument("--sections", default="correctness,attention,profile,training,inference,profile_training,"
                                          "profile_decode")
    ap.add_argument("--train-cases", default="8192x4,32768x1", help="NxBATCH of the training-step cases")
    ap.add_argument("--prompt-len", type=int, default=16384)
    ap.add_argument("--decode-batches", default="1,16")
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_lrsa needs a CUDA GPU", file=sys.stderr)
        return 2
    import torch._dynamo as dynamo
    for name, value in (("recompile_limit", 64), ("cache_size_limit", 64), ("accumulated_recompile_limit", 512)):
        if hasattr(dynamo.config, name):  # new shapes must recompile, never fall back to unfused attention
            setattr(dynamo.config, name, value)
    t_begin = time.perf_counter()
    ratios = [float(r) for r in args.ratios.split(",")]
    sections = args.sections.split(",")
    result = {"command": "PYTHONPATH=. python3 " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
              "environment": environment_record(), "gpu": torch.cuda.get_device_name(0), "git_commit": git_commit(),
              "shapes": {"heads_q": HEADS_Q, "heads_kv": HEADS_KV, "head_dim": HEAD_DIM, "dtype": "bfloat16"},
              "lag_config": {"sink_size": 16, "lag_size": 128, "ratios": ratios},
              "tolerance": {"rule": "relative L2 error vs float32 reference <= rel_tol and <= factor * (bf16 reference "
                                    "path error) + slack", "rel_tol": REL_TOL, "factor": ERROR_FACTOR, "slack": ERROR_SLACK}}
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def save():
        result["wall_s"] = time.perf_counter() - t_begin
        out_path.write_text(json.dumps(result, indent=1))

    peak = measured_matmul_rate()
    result["matmul_bf16_tflops"] = peak / 1e12
    log(f"GPU {result['gpu']}, torch {torch.__version__}, bf16 matmul {peak / 1e12:.0f} TFLOP/s")
    steps = {
        "correctness": lambda: {"attention": [check_correctness(LagConfig(16, 128, r)) for r in ratios],
                                "model": model_level_check(LagConfig(16, 128, ratios[0]))},
        "attention": lambda: bench_attention([int(s) for s in args.seq_lens.split(",")], ratios, args.tokens, peak),
        "variants": lambda: bench_variants([8192, 32768], args.tokens, LagConfig(16, 128, ratios[0])),
        "profile": lambda: [profile_fast(n, args.tokens, LagConfig(16, 128, ratios[0])) for n in (8192, 32768)],
        "profile_training": lambda: profile_training(8192, 4, LagConfig(16, 128, ratios[0])),
        "profile_decode": lambda: profile_decode(args.prompt_len, 16, LagConfig(16, 128, ratios[0])),
        "training": lambda: bench_training([tuple(int(x) for x in c.split("x")) for c in args.train_cases.split(",")],
                                           LagConfig(16, 128, ratios[0])),
        "inference": lambda: bench_inference(args.prompt_len, [int(b) for b in args.decode_batches.split(",")],
                                             LagConfig(16, 128, ratios[0]), args.new_tokens),
    }
    for name in sections:
        t0 = time.perf_counter()
        log(f"== {name}")
        try:
            result[name] = steps[name]()
        except Exception as e:
            result[name] = {"error": repr(e)[:1000], "traceback": traceback.format_exc()[-3000:]}
            log(traceback.format_exc())
        result.setdefault("section_wall_s", {})[name] = time.perf_counter() - t0
        save()
        torch.cuda.empty_cache()
    summarize(result)
    return 0


def summarize(result: dict) -> None:
    log("\n==== summary")
    for c in result.get("correctness", {}).get("attention", []) if isinstance(result.get("correctness"), dict) else []:
        log(f"correct r={c['ratio']}: passed={c['passed']} mismatched={c['mismatched_positions']} "
            f"fast err {json.dumps({k: round(v, 5) for k, v in c['rel_err_fast_vs_fp32'].items()})} "
            f"ref-bf16 err {json.dumps({k: round(v, 5) for k, v in c['rel_err_reference_bf16_vs_fp32'].items()})}")
    if isinstance(result.get("correctness"), dict) and "model" in result["correctness"]:
        log(f"model check: {result['correctness']['model']}")
    for row in result.get("attention", []) if isinstance(result.get("attention"), list) else []:
        dense = " ".join(f"{k}={v['fwd']['median_s'] * 1e3:.2f}/{v['fwd_bwd']['median_s'] * 1e3:.2f}ms"
                         for k, v in row["dense"].items() if "error" not in v)
        lr = " ".join(f"r{r}={v['fwd']['median_s'] * 1e3:.2f}/{v['fwd_bwd']['median_s'] * 1e3:.2f}ms "
                      f"({v['speedup_vs_fastest_dense']['fwd']:.2f}x/{v['speedup_vs_fastest_dense']['fwd_bwd']:.2f}x)"
                      for r, v in row["lrsa"].items())
        log(f"N={row['n']} B={row['batch']}: {dense} | {lr}")
    for row in result.get("training", []) if isinstance(result.get("training"), list) else []:
        log(f"train {row}")
    for row in result.get("inference", []) if isinstance(result.get("inference"), list) else []:
        log(f"infer b={row['batch']}: kv ratio {row['kv_bytes_ratio']:.3f} decode speedup {row['decode_speedup']:.2f} "
            f"prefill speedup {row['prefill_speedup']:.2f}")
    log(f"wall {result.get('wall_s', 0):.0f} s; sections {result.get('section_wall_s')}")


if __name__ == "__main__":
    sys.exit(main())
