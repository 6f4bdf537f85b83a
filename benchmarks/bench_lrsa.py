"""Benchmark fast LRSA against the fastest dense causal attention on one CUDA GPU; writes one JSON file.

One command (from the repository root; meant to take about 4 minutes on one H200 without the inference sections,
most of it compilation: the JSON's section_wall_s says what each section took):

    PYTHONPATH=. python3 benchmarks/bench_lrsa.py --sections correctness,attention,variants,profile,training \
        --out data/results/bench_lrsa_h200.json

Tiny CPU smoke run of the same code paths (what the tests run, seconds): ``--smoke``.

Sections (``--sections``; each timed side by side in the same process, bf16, SmolLM2-135M shapes: 9 query heads,
3 KV heads, head_dim 64). The fast path runs with its defaults (kernel chosen by
`lrsa_viz.fast.flex_kernel_backend`: FlashAttention-4 tiles where installed, else Triton; query blocks aligned
with partitions); the JSON's "kernel" records what was chosen and why:
  correctness  fast LRSA vs the reference (dense-mask) path, per kernel: selected indices, outputs and gradients;
               a SmolLM2-shaped model's loss and logits, backend flex vs reference;
  attention    forward and forward+backward time: fast LRSA (ratio 0.25, 0.125), SDPA cuDNN, SDPA Flash, and the
               FLOP-count bound (FLOPs / measured bf16 matmul rate), N = 8k .. 128k, batch = tokens // N; at
               ratio 0.25 every available kernel side by side ("lrsa_kernels");
  variants     at 8k (--variant-lens), per kernel: the default against query blocks not aligned with partitions and
               against selection, layout and attention run as separate steps ("unfused"; the default compiles them
               as one region);
  profile      torch.profiler kernel breakdown of one fast-LRSA forward+backward at 8k and 32k;
  profile_training  torch.profiler of one training step at 8k x 4, dense vs fast LRSA (GPU busy, host syncs);
  training     a full SmolLM2-shaped training step (random init, AdamW): tokens/s, peak memory and host syncs per
               step (CUDA sync debug mode), dense SDPA vs fast LRSA with each kernel, at 8k x 4, 16k x 2, 32k x 1;
               ``--train-unaligned`` adds the default kernel without query alignment (the speed/memory trade of
               the output copy that aligned padding rows force when batch > 1, benchmarks/audit_saved_tensors.py);
  inference    benchmarks/bench_inference.py: prefill, decode tokens/s, KV bytes, bandwidth fraction and host
               syncs per step, transformers' StaticCache (compiled, CUDA graphs) vs the static LagKV cache (one LRSA
               prefill, compiled decoding over the compressed buffers), 16k and 32k prompts, batch 1 to 64.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from lrsa_viz import LagConfig, LagKVCache, cast_model, disable_lrsa, enable_lrsa, environment_record
from lrsa_viz.fast import compact_positions, compiled_compact_positions, fast_lrsa_attention
from lrsa_viz.fast.cost import SMOLLM2_CONFIG, attention_flops, dense_causal_pairs, lrsa_tiles, lrsa_visible_pairs
from lrsa_viz.fast.kernel import (ALIGN_ENV, KERNEL_ENV, allow_recompiles, compiled_flex_attention, fast_options,
                                  flash_unavailable_reason, flex_kernel_backend, kernel_report)
from lrsa_viz.fast.layout import LrsaLayout, layout_kv, lrsa_block_mask, pad_queries
from lrsa_viz.fast.timing import count_host_syncs, median_time
from lrsa_viz.mask import visibility_from_keep
from lrsa_viz.scoring import keep_mask, lagkv_keep_indices

HEADS_Q, HEADS_KV, HEAD_DIM = 9, 3, 64
SMOLLM2 = SMOLLM2_CONFIG
#: --smoke: a 2-layer model of the same head layout on the CPU, float32
SMOKE_MODEL = dict(SMOLLM2, vocab_size=256, hidden_size=144, intermediate_size=128, num_hidden_layers=2)
#: Accepted error of bf16 fast LRSA against a float32 reference (relative L2 norm, ||x - ref|| / ||ref||): at most
#: this, and at most ERROR_FACTOR x the error of the bf16 reference (dense-mask) path + ERROR_SLACK.
REL_TOL, ERROR_FACTOR, ERROR_SLACK = 1e-2, 1.5, 1e-3
DENSE = {"sdpa_cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa_flash": SDPBackend.FLASH_ATTENTION}
#: Where and how the run happens: CUDA bf16 forward+backward; --smoke switches to CPU float32, forward only
#: (PyTorch has no FlexAttention backward on the CPU).
RUN = {"device": "cuda", "dtype": torch.bfloat16, "passes": ("fwd", "fwd_bwd"), "smoke": False}
#: Timing of one measurement (`lrsa_viz.fast.timing.median_time`).
REPS = dict(min_reps=3, max_reps=10, target_s=0.3)


def log(*a):
    print(*a, flush=True)


def measured_matmul_rate() -> float:
    """FLOP/s of a square matrix product on random data (8192^3 bf16 on CUDA): the ceiling of the FLOP bound."""
    size = 512 if RUN["smoke"] else 8192
    a, b = (torch.randn(size, size, device=RUN["device"], dtype=RUN["dtype"]) for _ in range(2))
    t = median_time(lambda: a @ b, min_reps=10, max_reps=30, target_s=0.5)["median_s"]
    return 2 * size ** 3 / t


def random_qkv(batch, n, requires_grad=True, seed=0):
    g = torch.Generator(device=RUN["device"]).manual_seed(seed)
    mk = lambda h: torch.randn(batch, h, n, HEAD_DIM, device=RUN["device"], dtype=RUN["dtype"], generator=g)  # noqa: E731
    q, k, v = mk(HEADS_Q), mk(HEADS_KV), mk(HEADS_KV)
    return [t.requires_grad_(requires_grad and "fwd_bwd" in RUN["passes"]) for t in (q, k, v)]


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


def available_kernels() -> list[str]:
    """The fast path's kernels that can run here: the default first (`flex_kernel_backend`), then the others."""
    if RUN["device"] != "cuda":
        return ["triton"]
    default = flex_kernel_backend("cuda", RUN["dtype"], HEAD_DIM)
    others = [k for k in ("flash", "triton") if k != default and (k == "triton" or flash_unavailable_reason() is None)]
    return [default, *others]


@contextlib.contextmanager
def environment(values: dict[str, str | None]):
    """Run with these environment variables set (a None value leaves its variable as it is), restored after."""
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update({name: value for name, value in values.items() if value is not None})
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def kernel_env(kernel: str | None):
    """Run with LRSA_VIZ_FLEX_BACKEND = ``kernel`` (what `enable_lrsa` models read), restored after."""
    return environment({KERNEL_ENV: kernel})


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


def check_correctness(cfg: LagConfig, kernel: str, n=4096, batch=2) -> dict:
    """Fast LRSA with ``kernel`` against the float32 reference and the bf16 reference, same inputs (forward only
    in --smoke)."""
    q, k, v = random_qkv(batch, n, seed=1)
    grad_out = torch.randn(batch, HEADS_Q, n, HEAD_DIM, device=RUN["device"], dtype=RUN["dtype"])
    backward = "fwd_bwd" in RUN["passes"]
    with torch.no_grad():
        select = compiled_compact_positions() if RUN["device"] == "cuda" else compact_positions
        fast_pos = select(k, v, cfg)
        ref_pos = lagkv_keep_indices(k, v, cfg)[..., : fast_pos.shape[-1]]
    mismatched = int((fast_pos != ref_pos).sum())

    def run(fn):
        out = fn()
        grads = torch.autograd.grad(out, (q, k, v), grad_out) if backward else []
        return [out.detach(), *grads]

    fast = run(lambda: fast_lrsa_attention(q, k, v, cfg, kernel=kernel))
    # float32 reference from the same inputs (scores are float32 either way: same selections)
    q32, k32, v32 = (t.detach().float().requires_grad_(backward) for t in (q, k, v))
    out32 = reference_attention(q32, k32, v32, cfg, torch.float32)
    ref32 = [out32.detach(), *(torch.autograd.grad(out32, (q32, k32, v32), grad_out.float()) if backward else [])]
    ref_low = run(lambda: reference_attention(q, k, v, cfg, RUN["dtype"]))
    names = ["out", "dq", "dk", "dv"]
    result = {"n": n, "batch": batch, "ratio": cfg.ratio, "kernel": kernel, "selected_positions": int(fast_pos.numel()),
              "mismatched_positions": mismatched, "rel_err_fast_vs_fp32": {}, "rel_err_reference_bf16_vs_fp32": {}}
    ok = mismatched == 0
    for name, f, r, b16 in zip(names, fast, ref32, ref_low):
        ef, eb = rel_err(f, r), rel_err(b16, r)
        result["rel_err_fast_vs_fp32"][name] = ef
        result["rel_err_reference_bf16_vs_fp32"][name] = eb
        ok &= bool(math.isfinite(ef) and ef <= REL_TOL and ef <= ERROR_FACTOR * eb + ERROR_SLACK)
    result["max_abs_out_fast_vs_reference_bf16"] = (fast[0].float() - ref_low[0].float()).abs().max().item()
    result["passed"] = ok
    log(f"  correctness r={cfg.ratio} {kernel}: passed={ok} mismatched={mismatched} "
        f"fast {json.dumps({k2: round(v2, 5) for k2, v2 in result['rel_err_fast_vs_fp32'].items()})} "
        f"ref-bf16 {json.dumps({k2: round(v2, 5) for k2, v2 in result['rel_err_reference_bf16_vs_fp32'].items()})}")
    return result


def check_all(ratios, kernels, n) -> dict:
    """Every kernel at the first ratio, the default kernel at the others; the model-level check per kernel.

    A kernel that raises (e.g. does not compile here) is recorded under "kernel_errors" and removed from
    ``kernels`` (in place) for the later sections, so one broken kernel does not void the run.
    """
    out, errors = {"attention": []}, {}
    for kernel in list(kernels):
        try:
            out["attention"].append(check_correctness(LagConfig(16, 128, ratios[0]), kernel, n=n))
            key = "model" if kernel == kernels[0] else "model_" + kernel
            out[key] = model_level_check(LagConfig(16, 128, ratios[0]), kernel, n=min(n, 2048))
        except Exception as e:
            errors[kernel] = {"error": repr(e)[:1000], "traceback": traceback.format_exc()[-3000:]}
            log(f"  kernel {kernel} failed: {traceback.format_exc()}")
            kernels.remove(kernel)
    if not kernels:
        raise RuntimeError(f"no fast-LRSA kernel runs here: {errors}")
    out["attention"] += [check_correctness(LagConfig(16, 128, r), kernels[0], n=n) for r in ratios[1:]]
    if errors:
        out["kernel_errors"] = errors
        os.environ[KERNEL_ENV] = kernels[0]  # the rest of the run (models included) uses a kernel that works
    return out


# -------------------------------------------------------------------------------------------------------- attention
def dense_fn(backend, q, k, v, gqa_native):
    g = HEADS_Q // HEADS_KV
    if not gqa_native:
        k, v = (t.detach().repeat_interleave(g, 1).requires_grad_(t.requires_grad) for t in (k, v))

    def fwd():
        with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa_native)

    return fwd, (q, k, v)


def time_fwd_bwd(fwd, inputs, grad_out) -> dict:
    """{"fwd": median_time, "fwd_bwd": median_time} (forward only in --smoke)."""
    def fwd_only():
        with torch.no_grad():
            fwd()

    def fwd_bwd():
        out = fwd()
        torch.autograd.grad(out, inputs, grad_out)

    fns = {"fwd": fwd_only, "fwd_bwd": fwd_bwd}
    return {p: median_time(fns[p], **REPS) for p in RUN["passes"]}


def dense_variant(backend, q, k, v):
    """(fwd, inputs, gqa_native) for a dense SDPA backend; GQA natively if the backend accepts it, else expanded."""
    for native in (True, False):
        fwd, inputs = dense_fn(backend, q, k, v, native)
        try:
            out = fwd()
            if "fwd_bwd" in RUN["passes"]:
                torch.autograd.grad(out, inputs, torch.ones_like(out))
            return fwd, inputs, native
        except RuntimeError:
            continue
    raise RuntimeError(f"SDPA backend {backend} unavailable for these shapes")


def dense_backends() -> dict:
    return DENSE if RUN["device"] == "cuda" else {"sdpa_default": None}


def lrsa_timing(q, k, v, grad_out, cfg, fastest, **options) -> dict:
    """Forward / forward+backward time of fast LRSA with ``options`` and its speed-up over the fastest dense."""
    t = time_fwd_bwd(lambda: fast_lrsa_attention(q, k, v, cfg, **options), (q, k, v), grad_out)
    t["speedup_vs_fastest_dense"] = {p: fastest[p] / t[p]["median_s"] for p in RUN["passes"]}
    return t


def bench_attention(seq_lens, ratios, tokens, peak, kernels, on_row=None) -> list[dict]:
    """One row per N (dense kernels, LRSA per ratio and kernel). ``on_row(rows)`` after each N: the caller saves
    the rows so far, so that a run stopped by a time limit keeps the lengths it finished."""
    rows = []
    for n in seq_lens:
        batch = max(1, tokens // n)
        q, k, v = random_qkv(batch, n)
        grad_out = torch.randn_like(q)
        dense_flops_f = attention_flops(dense_causal_pairs(n), HEADS_Q, HEAD_DIM) * batch
        dense_flops_fb = attention_flops(dense_causal_pairs(n), HEADS_Q, HEAD_DIM, backward=True) * batch
        row = {"n": n, "batch": batch, "dense": {}, "lrsa": {}, "lrsa_kernels": {},
               "dense_bound_s": {"fwd": dense_flops_f / peak, "fwd_bwd": dense_flops_fb / peak}}
        for name, backend in dense_backends().items():
            try:
                fwd, inputs, native = dense_variant(backend, q, k, v)
                t = time_fwd_bwd(fwd, inputs, grad_out)
                t["gqa"] = "native" if native else "expanded K/V"
                t["tflops"] = {p: (dense_flops_f if p == "fwd" else dense_flops_fb) / t[p]["median_s"] / 1e12
                               for p in RUN["passes"]}
                row["dense"][name] = t
            except Exception as e:  # a backend missing on this build is reported, not fatal
                row["dense"][name] = {"error": repr(e)[:300]}
            log(f"  n={n} {name}: {json.dumps({k2: v2 for k2, v2 in row['dense'][name].items() if k2 != 'tflops'})[:200]}")
        fastest = {p: min(d[p]["median_s"] for d in row["dense"].values() if "error" not in d) for p in RUN["passes"]}
        for ratio in ratios:
            cfg = LagConfig(16, 128, ratio)
            pairs = lrsa_visible_pairs(n, cfg)
            ff = attention_flops(pairs, HEADS_Q, HEAD_DIM) * batch
            ffb = attention_flops(pairs, HEADS_Q, HEAD_DIM, backward=True) * batch
            t = lrsa_timing(q, k, v, grad_out, cfg, fastest, kernel=kernels[0])
            entry = {**t, "kernel": kernels[0], "align_queries": fast_options().align_queries,
                     "visible_pairs_per_head": pairs, "tiles": lrsa_tiles(n, cfg),
                     "bound_s": {"fwd": ff / peak, "fwd_bwd": ffb / peak},
                     "tflops_useful": {p: (ff if p == "fwd" else ffb) / t[p]["median_s"] / 1e12 for p in RUN["passes"]}}
            if ratio == ratios[0]:  # components: selection alone; the FlexAttention call alone on prebuilt buffers
                entry.update(attention_components(q, k, v, grad_out, cfg, kernels[0]))
                row["lrsa_kernels"][kernels[0]] = t
                for other in kernels[1:]:
                    row["lrsa_kernels"][other] = lrsa_timing(q, k, v, grad_out, cfg, fastest, kernel=other)
            row["lrsa"][str(ratio)] = entry
            log(f"  n={n} lrsa r={ratio} {kernels[0]}: " + ", ".join(
                f"{p} {t[p]['median_s'] * 1e3:.2f} ms ({t['speedup_vs_fastest_dense'][p]:.2f}x)" for p in RUN["passes"])
                + "".join(f" | {kk}: {p} {v2['speedup_vs_fastest_dense'][p]:.2f}x" for kk, v2 in row["lrsa_kernels"].items()
                          if kk != kernels[0] and ratio == ratios[0] for p in RUN["passes"]))
        rows.append(row)
        if on_row is not None:
            on_row(rows)
        del q, k, v, grad_out
        empty_cache()
    return rows


def attention_components(q, k, v, grad_out, cfg, kernel) -> dict:
    """Selection alone, and the FlexAttention call alone on prebuilt (query, key, value) buffers."""
    n = q.shape[2]
    layout = LrsaLayout.of(n, cfg, align_queries=fast_options().align_queries)
    bm = lrsa_block_mask(layout, q.device)
    select = compiled_compact_positions() if RUN["device"] == "cuda" else None
    if select is None:
        return {}
    sel = median_time(lambda: select(k.detach(), v.detach(), cfg), **REPS)
    with torch.no_grad():
        pos = select(k, v, cfg)
    kb, vb = (x.detach().requires_grad_() for x in layout_kv(k.detach(), v.detach(), pos, layout))
    qb = pad_queries(q.detach(), layout).requires_grad_()
    options = {"BACKEND": "FLASH"} if kernel == "flash" else None
    flex = lambda: compiled_flex_attention()(qb, kb, vb, block_mask=bm, scale=None, enable_gqa=True,  # noqa: E731
                                             kernel_options=options)
    return {"selection_s": sel["median_s"], "flex_only": time_fwd_bwd(flex, (qb, kb, vb), pad_queries(grad_out, layout))}


def bench_variants(seq_lens, tokens, cfg, kernels) -> list[dict]:
    """Forward / forward+backward per kernel: the default options against query blocks not aligned with the
    partitions ("unaligned") and against selection, layout and attention as separate steps ("unfused"; the default
    compiles them as one region)."""
    rows = []
    variants = {"default": {}, "unaligned": {"align_queries": False}, "unfused": {"fused": False}}
    for n in seq_lens:
        batch = max(1, tokens // n)
        q, k, v = random_qkv(batch, n)
        grad_out = torch.randn_like(q)
        row = {"n": n, "batch": batch, "tiles": {"aligned": lrsa_tiles(n, cfg, align_queries=True),
                                                 "unaligned": lrsa_tiles(n, cfg, align_queries=False)}}
        for kernel in kernels:
            row[kernel] = {}
            for name, opts in variants.items():
                try:
                    t = time_fwd_bwd(lambda: fast_lrsa_attention(q, k, v, cfg, kernel=kernel, **opts), (q, k, v),
                                     grad_out)
                    row[kernel][name] = {p: t[p]["median_s"] for p in RUN["passes"]}
                except Exception as e:  # a variant that does not compile here is reported, not fatal
                    row[kernel][name] = {"error": repr(e)[:500]}
            log(f"  variants n={n} {kernel}: {json.dumps(row[kernel])[:300]}")
        rows.append(row)
        del q, k, v, grad_out
        empty_cache()
    return rows


def profile_fast(n, tokens, cfg, kernel) -> dict:
    """Top CUDA kernels of one fast-LRSA forward+backward (after warm-up), with their share of device time."""
    from torch.profiler import ProfilerActivity, profile
    batch = max(1, tokens // n)
    q, k, v = random_qkv(batch, n)
    grad_out = torch.randn_like(q)

    def step():
        torch.autograd.grad(fast_lrsa_attention(q, k, v, cfg, kernel=kernel), (q, k, v), grad_out)

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.device_time_total for e in events)
    top = sorted(events, key=lambda e: -e.device_time_total)[:12]
    return {"n": n, "batch": batch, "ratio": cfg.ratio, "kernel": kernel,
            "total_device_ms": total / 1e3,
            "kernels": [{"name": e.key[:120], "ms": e.device_time_total / 1e3, "share": e.device_time_total / total,
                         "calls": e.count} for e in top]}


def empty_cache():
    if RUN["device"] == "cuda":
        torch.cuda.empty_cache()


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


def profile_training(n, batch, cfg, kernel) -> dict:
    """torch.profiler of one training step, dense SDPA vs fast LRSA (``kernel``): where the step's time goes."""
    model = smollm2_model().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    ids = torch.randint(0, SMOLLM2["vocab_size"], (batch, n), device="cuda")

    def step():
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    out = {"n": n, "batch": batch, "kernel": kernel}
    for mode in ("dense_sdpa", "fast_lrsa"):
        enable_lrsa(model, cfg, backend="flex") if mode == "fast_lrsa" else disable_lrsa(model)
        with kernel_env(kernel):
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
    """SmolLM2-135M shapes, random init, bf16 on CUDA (--smoke: a 2-layer float32 model of the same heads on CPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(**(SMOKE_MODEL if RUN["smoke"] else SMOLLM2), attn_implementation="sdpa")
    return cast_model(LlamaForCausalLM(config), RUN["dtype"], RUN["device"])  # rotary frequencies stay float32


def training_modes(kernels, unaligned: bool = False) -> dict:
    """mode name -> (LRSA backend: None for dense, "reference" or "flex"; the environment it runs in): dense SDPA,
    then fast LRSA with each kernel ("fast_lrsa" = the default kernel, "fast_lrsa_<kernel>" the others), and with
    ``unaligned`` the default kernel without query alignment ("fast_lrsa_unaligned", LRSA_VIZ_ALIGN_QUERIES=0: no
    padding rows, so for N a multiple of the block the attention's output is the output projection's input with no
    copy, at the price of more tiles). --smoke (CPU, no FlexAttention backward): the reference backend."""
    if RUN["device"] != "cuda":
        modes = {"dense_sdpa": (None, {}), "lrsa_reference": ("reference", {})}
    else:
        modes = {"dense_sdpa": (None, {}),
                 **{"fast_lrsa" if i == 0 else f"fast_lrsa_{k}": ("flex", {KERNEL_ENV: k}) for i, k in enumerate(kernels)}}
    if unaligned:
        name, (backend, env) = list(modes.items())[1]  # the default LRSA mode
        modes[name + "_unaligned" if name == "lrsa_reference" else "fast_lrsa_unaligned"] = (backend, {**env, ALIGN_ENV: "0"})
    return modes


def memory_by_phase(forward, update) -> dict | None:
    """Where a training step's peak memory lies (CUDA; None elsewhere), GiB allocated: before the step (weights,
    optimizer state), after ``loss = forward()`` (+ what autograd saved for the backward, + the loss), the peak of the
    forward, and the peak of ``update(loss)`` (backward and optimizer step). A mode that saves more for the backward
    shows it in ``after_forward``; one with larger temporaries in ``peak_forward`` or ``peak_backward``."""
    if RUN["device"] != "cuda":
        return None
    gib = 2 ** 30
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss = forward()
    torch.cuda.synchronize()
    after_forward, peak_forward = torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    update(loss)
    torch.cuda.synchronize()
    return {"before_step": before / gib, "after_forward": after_forward / gib, "peak_forward": peak_forward / gib,
            "peak_backward": torch.cuda.max_memory_allocated() / gib}


def bench_training(cases, cfg, kernels, steps=3, unaligned: bool = False) -> list[dict]:
    """Full training step (forward, loss, backward, fused AdamW) per case and mode (`training_modes`): median step
    time, tokens/s, peak memory (since a reset after warm-up), host syncs of one step (CUDA sync debug mode, after
    warm-up)."""
    model = smollm2_model().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=RUN["device"] == "cuda")
    modes = training_modes(kernels, unaligned)
    rows = []
    for n, batch in cases:
        ids = torch.randint(0, model.config.vocab_size, (batch, n), device=RUN["device"])
        row = {"n": n, "batch": batch, "kernel": kernels[0]}
        for mode, (backend, env) in modes.items():
            if backend is None:
                disable_lrsa(model)
            else:
                enable_lrsa(model, cfg, backend=backend)

            def forward():
                return model(input_ids=ids, labels=ids, use_cache=False).loss

            def update(loss):
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            def step():
                loss = forward()
                update(loss)
                return loss

            try:
                with environment(env):
                    for _ in range(2):
                        loss = step()
                    syncs = count_host_syncs(step)
                    if RUN["device"] == "cuda":
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                    t = median_time(step, min_reps=steps, max_reps=steps, warmup=0)
                    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if RUN["device"] == "cuda" else None
                    phases = memory_by_phase(forward, update)
                row[mode] = {"step_s": t["median_s"], "tokens_per_s": batch * n / t["median_s"],
                             "peak_memory_gib": peak, "memory_by_phase": phases, "host_syncs_per_step": syncs,
                             "loss": float(loss.detach())}
            except torch.OutOfMemoryError as e:
                row[mode] = {"error": "out of memory: " + str(e)[:200]}
            opt.zero_grad(set_to_none=True)
            empty_cache()
            log(f"  train n={n} b={batch} {mode}: {row[mode]}")
        disable_lrsa(model)
        dense = row["dense_sdpa"]
        for mode in list(modes)[1:]:
            suffix = "" if mode in ("fast_lrsa", "lrsa_reference") else "_" + mode.split("_", 2)[-1]
            if "error" not in dense and "error" not in row[mode]:
                row["speedup" + suffix] = dense["step_s"] / row[mode]["step_s"]
                if dense["peak_memory_gib"]:
                    row["peak_memory_ratio" + suffix] = row[mode]["peak_memory_gib"] / dense["peak_memory_gib"]
        rows.append(row)
    return rows


def model_level_check(cfg, kernel, n=2048, batch=2) -> dict:
    """SmolLM2-shaped model, no grad: loss and logits with backend='flex' (``kernel``) vs backend='reference'."""
    model = smollm2_model().eval()
    ids = torch.randint(0, model.config.vocab_size, (batch, n), device=RUN["device"],
                        generator=torch.Generator(RUN["device"]).manual_seed(3))
    out = {}
    with torch.no_grad(), kernel_env(kernel):
        for backend in ("reference", "flex"):
            enable_lrsa(model, cfg, backend=backend)
            out[backend] = model(input_ids=ids, labels=ids, use_cache=False)
        disable_lrsa(model)
        dense = model(input_ids=ids, labels=ids, use_cache=False)
    lf, lr = out["flex"].logits.float(), out["reference"].logits.float()
    return {"n": n, "batch": batch, "kernel": kernel, "loss_reference": float(out["reference"].loss),
            "loss_flex": float(out["flex"].loss), "loss_dense": float(dense.loss),
            "logits_rel_err_flex_vs_reference": rel_err(lf, lr),
            "logits_rel_diff_dense_vs_reference": rel_err(dense.logits.float(), lr)}


# -------------------------------------------------------------------------------------------------------- inference
def bench_inference(cases: str, cfg: LagConfig, new_tokens: int, result: dict) -> list[dict]:
    """The inference section is benchmarks/bench_inference.py (transformers' StaticCache compiled with CUDA graphs vs
    the static LagKV cache; see there): its rows here, its fit / kernels / eager-vs-compiled check beside them in
    result["inference_details"]."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_inference as inference

    out = inference.run_inference(inference.parse_cases(cases), cfg, inference.inference_args(new_tokens=new_tokens),
                                  torch.device("cuda"), torch.bfloat16, inference.SMOLLM2)
    result["inference_details"] = {k: v for k, v in out.items() if k != "rows"}
    return out["rows"]


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
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run of the same code paths (float32, forward-only "
                                                         "attention, reference-backend training); for tests")
    ap.add_argument("--seq-lens", default=None, help="attention N (default 8192,...,131072; --smoke: 512)")
    ap.add_argument("--ratios", default="0.25,0.125")
    ap.add_argument("--tokens", type=int, default=None,
                    help="tokens per attention batch: batch = tokens // N (default 131072; --smoke: 1024)")
    ap.add_argument("--sections", default=None,
                    help="comma-separated (default: correctness,attention,variants,profile,profile_training,training,"
                         "inference,profile_decode; --smoke: correctness,attention,variants,training)")
    ap.add_argument("--train-cases", default=None, help="NxBATCH of the training-step cases "
                                                        "(default 8192x4,16384x2,32768x1; --smoke: 512x1)")
    ap.add_argument("--variant-lens", default=None, help="N of the variants section (default 8192)")
    ap.add_argument("--train-unaligned", action="store_true",
                    help="training section: also the default kernel without query alignment (LRSA_VIZ_ALIGN_QUERIES=0)")
    ap.add_argument("--check-n", type=int, default=None, help="N of the correctness checks (default 4096)")
    ap.add_argument("--prompt-len", type=int, default=16384)
    ap.add_argument("--inference-cases", default="16384x1,16384x16,16384x64,32768x1,32768x16",
                    help="prompt length x batch of the inference section (benchmarks/bench_inference.py --cases)")
    ap.add_argument("--new-tokens", type=int, default=64, help="timed decode steps of the inference section")
    args = ap.parse_args(argv)
    smoke = args.smoke
    defaults = {"seq_lens": ("8192,16384,32768,65536,131072", "512"), "tokens": (131072, 1024),
                "sections": ("correctness,attention,variants,profile,profile_training,training,inference,profile_decode",
                             "correctness,attention,variants,training"),
                "train_cases": ("8192x4,16384x2,32768x1", "512x1"), "variant_lens": ("8192", "512"),
                "check_n": (4096, 512)}
    for name, (gpu, cpu) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, cpu if smoke else gpu)
    if smoke:
        RUN.update(device="cpu", dtype=torch.float32, passes=("fwd",), smoke=True)
        REPS.update(min_reps=1, max_reps=2, target_s=0.0)
    elif not torch.cuda.is_available():
        print("bench_lrsa needs a CUDA GPU (or --smoke for a CPU check of the code paths)", file=sys.stderr)
        return 2
    allow_recompiles()  # new shapes must recompile, never fall back to unfused attention
    t_begin = time.perf_counter()
    ratios = [float(r) for r in args.ratios.split(",")]
    sections = args.sections.split(",")
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        print(f"--sections: unknown {unknown}; accepted: {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    kernels = available_kernels()
    options = fast_options()  # LRSA_VIZ_FUSED_REGION / LRSA_VIZ_ALIGN_QUERIES, as the sections will run them
    result = {"command": "PYTHONPATH=. python3 " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
              "environment": environment_record(), "git_commit": git_commit(),
              "gpu": torch.cuda.get_device_name(0) if RUN["device"] == "cuda" else "cpu (--smoke)",
              "kernel": kernel_report(RUN["device"]), "kernels_compared": kernels,
              "fast_options": {"align_queries": options.align_queries, "fused": options.fused},
              "shapes": {"heads_q": HEADS_Q, "heads_kv": HEADS_KV, "head_dim": HEAD_DIM,
                         "dtype": str(RUN["dtype"]).removeprefix("torch.")},
              "lag_config": {"sink_size": 16, "lag_size": 128, "ratios": ratios},
              "tolerance": {"rule": "relative L2 error vs float32 reference <= rel_tol and <= factor * (bf16 reference "
                                    "path error) + slack", "rel_tol": REL_TOL, "factor": ERROR_FACTOR, "slack": ERROR_SLACK}}
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def save():
        result["wall_s"] = time.perf_counter() - t_begin
        out_path.write_text(json.dumps(result, indent=1))

    def save_section(name: str, rows: list[dict]) -> None:  # a section's rows so far (the section may be cut)
        result[name] = list(rows)
        save()

    peak = measured_matmul_rate()
    result["matmul_bf16_tflops"] = peak / 1e12
    log(f"{result['gpu']}, torch {torch.__version__}, matmul {peak / 1e12:.0f} TFLOP/s, kernels {kernels} "
        f"({result['kernel']})")
    first = LagConfig(16, 128, ratios[0])
    steps = {
        "correctness": lambda: check_all(ratios, kernels, args.check_n),
        "attention": lambda: bench_attention([int(s) for s in args.seq_lens.split(",")], ratios, args.tokens, peak,
                                             kernels, on_row=lambda rows: save_section("attention", rows)),
        "variants": lambda: bench_variants([int(s) for s in args.variant_lens.split(",")], args.tokens, first, kernels),
        "profile": lambda: [profile_fast(n, args.tokens, first, kernels[0]) for n in (8192, 32768)],
        "profile_training": lambda: profile_training(8192, 4, first, kernels[0]),
        "profile_decode": lambda: profile_decode(args.prompt_len, 16, LagConfig(16, 128, ratios[0])),
        "training": lambda: bench_training([tuple(int(x) for x in c.split("x")) for c in args.train_cases.split(",")],
                                           first, kernels, unaligned=args.train_unaligned),
        "inference": lambda: bench_inference(args.inference_cases, LagConfig(16, 128, ratios[0]), args.new_tokens,
                                             result),
    }
    for name in sections:
        t0 = time.perf_counter()
        log(f"== {name}")
        try:
            result[name] = steps[name]()
        except Exception as e:
            error = {"error": repr(e)[:1000], "traceback": traceback.format_exc()[-3000:]}
            if isinstance(result.get(name), list) and result[name]:  # rows saved before the failure are kept
                result.setdefault("section_errors", {})[name] = error
            else:
                result[name] = error
            log(traceback.format_exc())
        result.setdefault("section_wall_s", {})[name] = time.perf_counter() - t0
        save()
        empty_cache()
    summarize(result)
    return 0


SECTIONS = ("correctness", "attention", "variants", "profile", "profile_training", "training", "inference",
            "profile_decode")


def summarize(result: dict) -> None:
    log("\n==== summary")
    correctness = result.get("correctness") if isinstance(result.get("correctness"), dict) else {}
    for c in correctness.get("attention", []):
        log(f"correct r={c['ratio']} {c['kernel']}: passed={c['passed']} mismatched={c['mismatched_positions']} "
            f"fast err {json.dumps({k: round(v, 5) for k, v in c['rel_err_fast_vs_fp32'].items()})} "
            f"ref-bf16 err {json.dumps({k: round(v, 5) for k, v in c['rel_err_reference_bf16_vs_fp32'].items()})}")
    for key in correctness:
        if key.startswith("model"):
            log(f"{key} check: {correctness[key]}")
    ms = lambda t: "/".join(f"{t[p]['median_s'] * 1e3:.2f}" for p in RUN["passes"]) + "ms"  # noqa: E731
    for row in result.get("attention", []) if isinstance(result.get("attention"), list) else []:
        dense = " ".join(f"{k}={ms(v)}" for k, v in row["dense"].items() if "error" not in v)
        lr = " ".join(f"r{r}={ms(v)} (" + "/".join(f"{v['speedup_vs_fastest_dense'][p]:.2f}x" for p in RUN["passes"])
                      + ")" for r, v in row["lrsa"].items())
        kernels = " ".join(f"{k}: " + "/".join(f"{v['speedup_vs_fastest_dense'][p]:.2f}x" for p in RUN["passes"])
                           for k, v in row.get("lrsa_kernels", {}).items())
        log(f"N={row['n']} B={row['batch']}: {dense} | {lr} | r={result['lag_config']['ratios'][0]} by kernel {kernels}")
    for row in result.get("variants", []) if isinstance(result.get("variants"), list) else []:
        log(f"variants {row}")
    for row in result.get("training", []) if isinstance(result.get("training"), list) else []:
        log(f"train {row}")
    for row in [r for r in result["inference"] if "decode_speedup" in r] if isinstance(result.get("inference"), list) else []:
        log(f"infer N={row['prompt_len']} b={row['batch']}: kv ratio {row['kv_bytes_ratio']:.3f} decode speedup {row['decode_speedup']:.2f} "
            f"prefill speedup {row['prefill_speedup']:.2f}")
    log(f"wall {result.get('wall_s', 0):.0f} s; sections {result.get('section_wall_s')}")


if __name__ == "__main__":
    sys.exit(main())
