"""Inference benchmark: the full KV cache in its fastest transformers form against the static LagKV cache.

One command (from the repository root, one CUDA GPU):

    PYTHONPATH=. python3 benchmarks/bench_inference.py --out data/results/bench_inference_h200.json

Tiny CPU smoke run (what the tests run, seconds): ``--smoke``.

With the like-for-like baseline too (one more compilation, about a minute more):

    PYTHONPATH=. python3 benchmarks/bench_inference.py --modes full_cache_sdpa,full_cache_buffer,lagkv_cache_fast_lrsa \
        --out data/results/bench_inference_h200.json

Model: SmolLM2-135M shapes (30 layers, 9 query / 3 KV heads, head_dim 64), random weights, bf16. For every case
(prompt length N x batch B) and mode, in one process:

  full_cache_sdpa         transformers' StaticCache, SDPA (flash prefill; decode: SDPA with K/V repeated and a mask)
  full_cache_buffer       (--modes) the same StaticCache decoded with this library's buffer attention (LagKV's decode
                          kernel: the like-for-like comparison of cache size alone)
  lagkv_cache_fast_lrsa   StaticLagKVCache: one parallel LRSA (flex) prefill, decode over the compressed buffers

Compilation dominates the run time: a mode compiles its decode step twice (batch 1 is specialised by dynamo, the
other batch sizes share one dynamic-shape graph), and the LRSA prefill compiles once per prompt length.

LagKV decoding compresses between steps, only when a partition is due (``--compression host``, the default; the
step holds no compression work), or inside every step with fixed shapes (``--compression step``, the design the
2026-11-29 H200 run measured). Decoding is greedy, the whole step (model + cache) compiled once with ``torch.compile(mode="reduce-overhead",
fullgraph=True, dynamic=True)`` (CUDA graphs; one compilation shared by all cases of a mode) after warm-up steps.
Reported per row (keys as bench_lrsa's former inference rows, plus more):

  prompt_len, batch, decode_tokens_per_s (per mode), decode_speedup (LagKV / fastest full mode),
  prefill_speedup (dense prefill time / LagKV prefill time), kv_bytes_ratio (LagKV / full allocated cache bytes),
  bandwidth_fraction (bytes a step must read: weights + the K/V of the tokens stored, over step time x measured
  copy bandwidth), host_syncs_per_step (torch.profiler: aten::_local_scalar_dense and CUDA synchronize calls),
  and "fit": the largest batch of sequences of the longest prompt whose caches fit in 100 GiB, computed from the
  measured allocated bytes per sequence (cache buffers only). ``--fit-only N`` computes only that, for N-token
  prompts, from both caches allocated on the CPU (no GPU needed: the buffer sizes do not depend on the device;
  at 16,384 tokens with ``--new-tokens 64`` it gives the H200 run's bytes exactly, tested).
  Per mode also: "profile" (the profiled steps' GPU milliseconds per step, its top kernels, CUDA-graph launches
  per step), "prefill_profile" (the same for one prefill into a fresh cache) and "cudagraph_skips" (compiled
  graphs inductor could not capture). ``--also-kernels k1,k2`` decodes
  LagKV once more per kernel in the same process (``row["lagkv_by_kernel"]``, ``decode_speedup_by_kernel``).
  ``prefill_s`` is the median of ``--prefill-repeats`` prefills after the compiling one (``prefill_repeats_s``);
  ``--prefill-only`` times and profiles only the prefills (no decode compilation: a minute per case less).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from lrsa_viz import LagConfig, cast_model, environment_record
from lrsa_viz.fast.cost import SMOLLM2_CONFIG, datasheet_bandwidth
from lrsa_viz.fast import fast_options, kernel_report
from lrsa_viz.fast.decode import DEFAULT_KERNEL, KERNELS, buffer_attention, slot_mask
from lrsa_viz.static_cache import StaticLagKVCache, stored_length
from lrsa_viz.static_generate import (compiled_decode_step, decode_step, disable_static_lagkv, enable_static_lagkv,
                                      greedy_decode)

SMOLLM2 = SMOLLM2_CONFIG
SMOKE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, max_position_embeddings=8192)
MODES = ("full_cache_sdpa", "full_cache_buffer", "lagkv_cache_fast_lrsa")
FULL_MODES = ("full_cache_sdpa", "full_cache_buffer")
LAGKV = "lagkv_cache_fast_lrsa"
FIT_BYTES = 100 * 2 ** 30
SYNC_EVENTS = ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def log(*a):
    print(*a, flush=True)


# ------------------------------------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> tuple[object, float]:
    """(result, seconds) of ``fn()``: CUDA events on a GPU, wall clock on CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        return out, start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def measured_bandwidth(device: torch.device) -> float:
    """Bytes/s of a device-to-device copy of 2 GiB (read + write counted), median of 5."""
    if device.type != "cuda":
        return float("nan")
    src = torch.empty(2 ** 30, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(7):
        _, t = timed(lambda: dst.copy_(src), device)
        if i >= 2:
            times.append(t)
    del src, dst
    return 2 * 2 ** 31 / statistics.median(times)


#: The profiler event torch.compile records each time a compiled function is entered ("Torch-Compiled Region: i/j").
COMPILED_REGION_EVENT = "Torch-Compiled Region"


def profile_steps(fn, steps: int, device: torch.device, top: int = 12) -> dict:
    """torch.profiler over ``steps`` calls of ``fn``: host syncs per call (aten::_local_scalar_dense and CUDA
    synchronize calls, minus those of an empty profiled region) and, on CUDA, where the GPU time goes: device
    milliseconds per call in total and for the ``top`` kernels (kernels replayed from CUDA graphs included), and
    the CUDA-graph launches per call (0 means the step did not replay a graph); the torch.compile regions entered
    per call (a static LRSA prefill: one per layer; a compiled decode step: one); on the host, the ``top`` operators
    by self CPU time and the operator calls per call (a host-bound call shows many calls and CPU milliseconds
    close to its wall time; the profiler's own overhead is included)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])

    def run(n):
        synchronize(device)
        with profile(activities=activities) as prof:
            for _ in range(n):
                fn()
            synchronize(device)
        return prof.key_averages()

    events, empty = run(steps), run(0)
    syncs = sum(e.count for e in events if e.key in SYNC_EVENTS) - sum(e.count for e in empty if e.key in SYNC_EVENTS)
    kernels = sorted((e for e in events if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0),
                     key=lambda e: -e.self_device_time_total)
    host = sorted((e for e in events if e.device_type == DeviceType.CPU and e.self_cpu_time_total > 0),
                  key=lambda e: -e.self_cpu_time_total)
    return {"host_syncs_per_step": syncs / steps,
            "graph_launches_per_step": sum(e.count for e in events if e.key == "cudaGraphLaunch") / steps,
            "compiled_calls_per_step": sum(e.count for e in events if e.key.startswith(COMPILED_REGION_EVENT)) / steps,
            "device_ms_per_step": sum(e.self_device_time_total for e in kernels) / 1e3 / steps,
            "top_kernels": [{"name": e.key[:160], "ms_per_step": e.self_device_time_total / 1e3 / steps,
                             "calls_per_step": e.count / steps} for e in kernels[:top]],
            "host_ops_per_step": sum(e.count for e in host) / steps,
            "host_ms_per_step": sum(e.self_cpu_time_total for e in host) / 1e3 / steps,
            "top_host_ops": [{"name": e.key[:160], "ms_per_step": e.self_cpu_time_total / 1e3 / steps,
                              "calls_per_step": e.count / steps} for e in host[:top]]}


def nominal_bandwidth(device: torch.device) -> float | None:
    """The device's datasheet memory bandwidth, bytes/s (None on a CPU or an unlisted GPU)."""
    return datasheet_bandwidth(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def cudagraph_skips() -> int:
    """Inductor's count of compiled graphs that could not be captured as CUDA graphs (run without them)."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])


# -------------------------------------------------------------------------------------------------------- model
def make_model(shapes: dict, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = cast_model(LlamaForCausalLM(LlamaConfig(**shapes, attn_implementation="sdpa")), dtype, device).eval()
    model.generation_config.eos_token_id = None
    return model


def cache_bytes(cache) -> int:
    """Allocated bytes of a cache's buffers (StaticLagKVCache: K, V and positions; StaticCache: K and V)."""
    if isinstance(cache, StaticLagKVCache):
        return cache.nbytes() + cache.position_buffer.numel() * cache.position_buffer.element_size()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def make_cache(mode: str, model, max_len: int, cfg: LagConfig, compiled_selection: bool):
    from transformers import StaticCache

    if mode == LAGKV:
        return StaticLagKVCache(model.config, max_len, cfg, compiled_selection=compiled_selection)
    return StaticCache(config=model.config, max_cache_len=max_len)


def prepare_model(model, mode: str, cfg: LagConfig, kernel: str, backend: str) -> None:
    disable_static_lagkv(model)
    if mode == LAGKV:
        enable_static_lagkv(model, cfg, prefill="lrsa", backend=backend, kernel=kernel)
    elif mode == "full_cache_buffer":
        enable_static_lagkv(model, prefill="dense", kernel=kernel)


# ---------------------------------------------------------------------------------------------------- one case
def run_mode(model, mode: str, ids: torch.Tensor, cfg: LagConfig, args, step_fn, bandwidth: float,
             kernel: str | None = None) -> dict:
    device = ids.device
    b, n = ids.shape
    max_len = n + args.warmup_steps + args.new_tokens + args.sync_steps + 1  # every token fed, profiled ones too
    prepare_model(model, mode, cfg, kernel or args.kernel, args.backend)
    flex = args.backend == "flex" or (args.backend == "auto" and device.type == "cuda")
    skips_before = cudagraph_skips()
    with torch.no_grad():
        prefill_s = []
        for _ in range(1 + args.prefill_repeats):  # the first prefill compiles what this N needs (flex, selection)
            cache = make_cache(mode, model, max_len, cfg, flex)
            logits, t = timed(lambda: model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits,
                              device)
            prefill_s.append(t)
        tok = logits[:, -1:].argmax(-1)
        prefill_profile = profile_steps(  # where the prefill's GPU time goes (a fresh cache, as timed)
            lambda: model(input_ids=ids, past_key_values=make_cache(mode, model, max_len, cfg, flex), use_cache=True,
                          logits_to_keep=1), 1, device, top=25) if args.sync_steps else {}
        allocated = cache_bytes(cache)
        prefill = {"prefill_s": statistics.median(prefill_s[1:]), "prefill_first_s": prefill_s[0],
                   "prefill_repeats_s": prefill_s[1:], "prefill_profile": prefill_profile,
                   "kv_bytes_allocated": allocated, "kv_bytes_per_sequence": allocated / b}
        if args.prefill_only:
            return prefill
        if mode != LAGKV:  # a new StaticCache re-records CUDA graphs instead of recompiling (same decode work)
            for layer in cache.layers:
                for t in (layer.keys, layer.values, layer.cumulative_length):
                    torch._dynamo.mark_static_address(t, guard=False)
        stored_after_prefill = stored_length(n, cfg) if mode == LAGKV else n
        host = mode == LAGKV and args.compression == "host"  # compress between steps, only when due
        decode = functools.partial(greedy_decode, model, cache, step_fn=step_fn, host_compression=host)
        warm, warmup_s = timed(lambda: decode(tok, args.warmup_steps), device)
        tok = warm[:, -1:]  # the warm-up steps compile (first case of a mode) and record the CUDA graphs
        generated, decode_s = timed(lambda: decode(tok, args.new_tokens), device)
        state = {"tok": torch.empty_like(generated[:, -1:], memory_format=torch.contiguous_format).copy_(generated[:, -1:])}

        def one_step():
            if host:
                cache.before_update(1)
            if device.type == "cuda" and step_fn is not decode_step:
                torch.compiler.cudagraph_mark_step_begin()
            state["tok"] = step_fn(model, state["tok"], cache).clone()

        with cache.host_scheduled_compression() if host else contextlib.nullcontext():  # its one read: before
            profiled = profile_steps(one_step, args.sync_steps, device) if args.sync_steps else {}
    seen_mid = n + args.warmup_steps + args.new_tokens / 2  # tokens in the cache at the middle of the timed steps
    stored_mid = stored_length(int(seen_mid), cfg) if mode == LAGKV else seen_mid
    layers, h_kv, d = model.config.num_hidden_layers, model.config.num_key_value_heads, model.config.head_dim
    elsize = next(model.parameters()).element_size()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_read = 2 * layers * b * h_kv * d * elsize * stored_mid
    step_s = decode_s / args.new_tokens
    nominal = nominal_bandwidth(device)
    row = {**prefill, "warmup_decode_s": warmup_s, "decode_s": decode_s,
           "decode_tokens_per_s": b * args.new_tokens / decode_s, "step_ms": step_s * 1e3,
           "kv_bytes_after_prefill": 2 * layers * b * h_kv * d * elsize * stored_after_prefill,
           "stored_tokens_mid_decode": stored_mid, "bytes_per_step_min": weight_bytes + kv_read,
           "bandwidth_fraction": (weight_bytes + kv_read) / step_s / bandwidth if math.isfinite(bandwidth) else None,
           "bandwidth_fraction_nominal": (weight_bytes + kv_read) / step_s / nominal if nominal else None,
           "host_syncs_per_step": profiled.get("host_syncs_per_step"), "profile": profiled,
           "cudagraph_skips": cudagraph_skips() - skips_before}
    if mode == LAGKV:
        row["buffer_slots"] = cache.capacity
        row["eq12_after_prefill"] = cfg.retained_length(n)
    del cache
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def bench_kernels(b: int, slots: int, shapes: dict, device, dtype, reps: int = 20) -> dict:
    """Seconds of one model step's attention (all layers) over a buffer of ``slots`` slots, Q = 1, per kernel.

    On CUDA each kernel's 30 calls are captured in one CUDA graph (launch overhead removed), like compiled decoding.
    """
    hq, hkv, d, layers = shapes["num_attention_heads"], shapes["num_key_value_heads"], shapes["head_dim"], shapes["num_hidden_layers"]
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(b, hq, 1, d, device=device, dtype=dtype, generator=g)
    k = torch.randn(b, hkv, slots, d, device=device, dtype=dtype, generator=g)
    v = torch.randn(b, hkv, slots, d, device=device, dtype=dtype, generator=g)
    mask = slot_mask(slots - 1, 1, slots, device)
    out = {}
    ref = buffer_attention(q, k, v, mask, kernel="sdpa_repeat").float()
    for kernel in KERNELS:
        def step():
            for _ in range(layers):
                buffer_attention(q, k, v, mask, kernel=kernel)
        try:
            err = (buffer_attention(q, k, v, mask, kernel=kernel).float() - ref).abs().max().item()
            if device.type == "cuda":
                step()
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    step()
                times = [timed(graph.replay, device)[1] for _ in range(reps)]
            else:
                times = [timed(step, device)[1] for _ in range(3)]
            t = statistics.median(times)
            out[kernel] = {"step_attention_s": t, "kv_gb_per_s": 2 * layers * b * hkv * slots * d * k.element_size() / t / 1e9,
                           "max_abs_diff_vs_sdpa_repeat": err}
        except Exception as e:  # a kernel unavailable for these shapes is reported, not fatal
            out[kernel] = {"error": repr(e)[:300]}
    return out


def check_eager_vs_compiled(model, cfg: LagConfig, args, step_fn, device) -> dict:
    """Greedy tokens of the static LagKV cache, eager vs the compiled step (same prefill), and the first decode
    step's logits difference."""
    n, b, steps = args.check_prompt, 2, args.check_steps
    ids = torch.randint(0, model.config.vocab_size, (b, n), device=device, generator=torch.Generator(device).manual_seed(7))
    prepare_model(model, LAGKV, cfg, args.kernel, args.backend)
    flex = args.backend == "flex" or (args.backend == "auto" and device.type == "cuda")
    tokens = {}
    with torch.no_grad():
        for name, fn in (("eager", decode_step), ("compiled", step_fn)):
            cache = StaticLagKVCache(model.config, n + steps + 1, cfg, compiled_selection=flex)
            first = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
            tokens[name] = greedy_decode(model, cache, first, steps, step_fn=fn,
                                         host_compression=args.compression == "host")
    same = tokens["eager"] == tokens["compiled"]
    first_diff = (~same).float().argmax(dim=1)
    return {"prompt_len": n, "batch": b, "steps": steps, "tokens_equal": bool(same.all()),
            "fraction_equal": same.float().mean().item(),
            "first_mismatch_step": [int(i) if not bool(s.all()) else None for i, s in zip(first_diff, same)]}


# -------------------------------------------------------------------------------------------------------- main
def run_inference(cases: list[tuple[int, int]], cfg: LagConfig, args, device: torch.device, dtype: torch.dtype,
                  shapes: dict, on_progress=None) -> dict:
    """All cases and modes; returns ``{"rows": [...], "fit": {...}, "kernels": [...], "check": {...}, ...}``.

    ``on_progress(result)`` is called after each case with the result so far (to save partial results).
    """
    model = make_model(shapes, device, dtype)
    bandwidth = measured_bandwidth(device)
    compile_step = args.compile and device.type == "cuda" or args.compile == "force"
    step_fn = compiled_decode_step(dynamic=True) if compile_step else decode_step
    modes = [m for m in MODES if m in args.modes]
    result = {"device_bandwidth_bytes_per_s": bandwidth, "nominal_bandwidth_bytes_per_s": nominal_bandwidth(device),
              "decode": {"compiled": bool(compile_step), "mode": "reduce-overhead", "fullgraph": True, "dynamic": True,
                         "compression": args.compression,
                         "kernel": args.kernel, "warmup_steps": args.warmup_steps, "new_tokens": args.new_tokens},
              "lag_config": cfg.to_dict(), "model_shapes": shapes, "dtype": str(dtype), "rows": [], "kernels": []}
    for n, b in cases:
        ids = torch.randint(0, shapes["vocab_size"], (b, n), device=device, generator=torch.Generator(device).manual_seed(n + b))
        row = {"prompt_len": n, "batch": b, "new_tokens": args.new_tokens}
        runs = [(mode, None) for mode in modes]
        if not args.prefill_only:  # other decode kernels: the same prefill
            runs += [(LAGKV, k) for k in args.also_kernels]
        for mode, kernel in runs:  # kernel None: args.kernel, stored under row[mode]; else under row["lagkv_by_kernel"]
            t0 = time.perf_counter()
            try:
                measured = run_mode(model, mode, ids, cfg, args, step_fn, bandwidth, kernel)
            except torch.OutOfMemoryError as e:
                measured = {"error": "out of memory: " + str(e)[:200]}
            except Exception as e:
                measured = {"error": repr(e)[:500], "traceback": traceback.format_exc()[-2000:]}
                log(traceback.format_exc())
            measured["wall_s"] = time.perf_counter() - t0
            if kernel is None:
                row[mode] = measured
            else:
                row.setdefault("lagkv_by_kernel", {})[kernel] = measured
            log(f"  N={n} B={b} {mode}{'' if kernel is None else ' kernel=' + kernel}: "
                + json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                              for k, v in measured.items() if k not in ("traceback", "profile", "prefill_profile")})[:400])
        disable_static_lagkv(model)
        summarize_row(row)
        result["rows"].append(row)
        if args.kernel_bench and not args.prefill_only:
            lag_slots = StaticLagKVCache(model.config, n + args.new_tokens, cfg).capacity
            result["kernels"].append({"prompt_len": n, "batch": b, "slots_full": n + args.new_tokens, "slots_lagkv": lag_slots,
                                      "full": bench_kernels(b, n + args.new_tokens, shapes, device, dtype),
                                      "lagkv": bench_kernels(b, lag_slots, shapes, device, dtype)})
        del ids
        if device.type == "cuda":
            torch.cuda.empty_cache()
        result["fit"] = fit_summary(result["rows"])
        if on_progress is not None:
            on_progress(result)
    result["fit"] = fit_summary(result["rows"])
    if args.check_steps and not args.prefill_only:
        try:
            result["check"] = check_eager_vs_compiled(model, cfg, args, step_fn, device)
        except Exception as e:
            result["check"] = {"error": repr(e)[:500], "traceback": traceback.format_exc()[-2000:]}
    disable_static_lagkv(model)
    return result


def summarize_row(row: dict) -> None:
    """decode/prefill speed-ups and byte ratios against the fastest full-cache mode that ran."""
    lag = row.get(LAGKV, {})
    fulls = {m: row[m] for m in FULL_MODES if m in row and "error" not in row[m]}
    if not fulls:
        return
    if all("decode_tokens_per_s" not in r for r in (lag, *fulls.values())):  # --prefill-only
        if lag and "error" not in lag and "full_cache_sdpa" in fulls:
            row["prefill_speedup"] = fulls["full_cache_sdpa"]["prefill_s"] / lag["prefill_s"]
        return
    fastest = max(fulls, key=lambda m: fulls[m]["decode_tokens_per_s"])
    if row.get("lagkv_by_kernel"):  # --also-kernels: the same LagKV decode with other kernels (even if --kernel failed)
        row["decode_speedup_by_kernel"] = {k: r["decode_tokens_per_s"] / fulls[fastest]["decode_tokens_per_s"]
                                           for k, r in row["lagkv_by_kernel"].items() if "error" not in r}
    if "error" in lag or not lag:
        return
    sdpa = fulls.get("full_cache_sdpa", fulls[fastest])
    row["fastest_full_mode"] = fastest
    row["decode_tokens_per_s"] = lag["decode_tokens_per_s"]
    row["decode_speedup"] = lag["decode_tokens_per_s"] / fulls[fastest]["decode_tokens_per_s"]
    row["decode_speedup_by_mode"] = {m: lag["decode_tokens_per_s"] / f["decode_tokens_per_s"] for m, f in fulls.items()}
    row["prefill_speedup"] = sdpa["prefill_s"] / lag["prefill_s"]
    row["kv_bytes_ratio"] = lag["kv_bytes_allocated"] / sdpa["kv_bytes_allocated"]
    row["kv_bytes_ratio_stored"] = lag["kv_bytes_after_prefill"] / sdpa["kv_bytes_after_prefill"]
    row["bandwidth_fraction"] = lag["bandwidth_fraction"]
    row["host_syncs_per_step"] = lag["host_syncs_per_step"]


def fit_summary(rows: list[dict]) -> dict:
    """Largest batch of the longest prompt's sequences whose cache buffers fit in 100 GiB (from measured bytes)."""
    done = [r for r in rows if LAGKV in r and "full_cache_sdpa" in r
            and "error" not in r[LAGKV] and "error" not in r["full_cache_sdpa"]]
    if not done:
        return {}
    row = max(done, key=lambda r: (r["prompt_len"], r["batch"]))
    per_full = row["full_cache_sdpa"]["kv_bytes_per_sequence"]
    per_lag = row[LAGKV]["kv_bytes_per_sequence"]
    full, lag = int(FIT_BYTES // per_full), int(FIT_BYTES // per_lag)
    return {"prompt_len": row["prompt_len"], "new_tokens": row["new_tokens"], "budget_bytes": FIT_BYTES,
            "how": "floor(100 GiB / allocated cache bytes per sequence measured in this run; buffers only: K, V "
                   "(and int32 positions for LagKV), no weights or activations)",
            "bytes_per_sequence_full": per_full, "bytes_per_sequence_lagkv": per_lag,
            "max_batch_full": full, "max_batch_lagkv": lag, "ratio": lag / max(full, 1)}


def allocated_fit(prompt_len: int, cfg: LagConfig, args, shapes: dict, dtype: torch.dtype) -> dict:
    """`fit_summary` for one prompt length without timing anything: both caches (sized as `run_mode` sizes them)
    receive one zero prompt per layer on the CPU and their allocated buffers are counted. Buffer sizes depend on the
    shapes, the dtype and the LagConfig only, not on the device or the values, so this is the number a GPU run
    measures (the 16,384-token case is checked against the committed H200 run in tests)."""
    from transformers import LlamaConfig, StaticCache

    config = LlamaConfig(**shapes)
    max_len = prompt_len + args.warmup_steps + args.new_tokens + args.sync_steps + 1
    h_kv, d = config.num_key_value_heads, config.head_dim
    zeros = torch.zeros(1, h_kv, prompt_len, d, dtype=dtype)
    per_sequence = {}
    for mode in ("full_cache_sdpa", LAGKV):
        cache = (StaticLagKVCache(config, max_len, cfg, compiled_selection=False) if mode == LAGKV
                 else StaticCache(config=config, max_cache_len=max_len))
        with torch.no_grad():
            for layer in range(config.num_hidden_layers):
                cache.update(zeros, zeros, layer, {"cache_position": torch.arange(prompt_len)})
        per_sequence[mode] = cache_bytes(cache)
        del cache
    row = {"prompt_len": prompt_len, "batch": 1, "new_tokens": args.new_tokens,
           **{m: {"kv_bytes_per_sequence": b} for m, b in per_sequence.items()}}
    return {**fit_summary([row]), "how": "floor(100 GiB / allocated cache bytes per sequence; buffers allocated on "
                                          "the CPU for this length (--fit-only), sized as the timed run sizes them: "
                                          "K, V (and int32 positions for LagKV), no weights or activations)"}


def parse_cases(text: str) -> list[tuple[int, int]]:
    try:
        cases = [tuple(int(x) for x in c.split("x")) for c in text.split(",")]
    except ValueError:
        raise ValueError(f"--cases must be NxB[,NxB...] with integers, got {text!r}") from None
    if any(len(c) != 2 or c[0] < 1 or c[1] < 1 for c in cases):
        raise ValueError(f"--cases must be NxB[,NxB...] with N, B >= 1, got {text!r}")
    return cases


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="data/results/bench_inference.json")
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU, seconds (for tests)")
    ap.add_argument("--cases", default="16384x1,16384x16,16384x64,32768x1,32768x16",
                    help="prompt lengths x batch sizes, NxB[,NxB...]")
    ap.add_argument("--new-tokens", type=int, default=128,
                    help="timed decode steps (default: the lag size L, so the window holds exactly one compression "
                         "per L tokens: the steady-state rate)")
    ap.add_argument("--warmup-steps", type=int, default=8, help="decode steps before timing (compile, CUDA graphs)")
    ap.add_argument("--sync-steps", type=int, default=8,
                    help="decode steps profiled for host syncs, and the prefill profiled once (0: skip both)")
    ap.add_argument("--prefill-repeats", type=int, default=3,
                    help="timed prefills after the first (compiling) one; prefill_s is their median")
    ap.add_argument("--prefill-only", action="store_true",
                    help="time and profile the prefills only (no decode, no compiled step): prefill_speedup per row")
    ap.add_argument("--modes", default="full_cache_sdpa," + LAGKV,
                    help=f"of {','.join(MODES)} (full_cache_buffer: the full cache with LagKV's decode kernel, the "
                         "like-for-like comparison; off by default to keep the run short (an estimate: each mode compiles)")
    ap.add_argument("--kernel", default=DEFAULT_KERNEL, choices=KERNELS, help="buffer-attention kernel")
    ap.add_argument("--also-kernels", default="",
                    help="comma-separated kernels: each case also decodes LagKV with each of them (row['lagkv_by_kernel'])")
    ap.add_argument("--compression", default="host", choices=("host", "step"),
                    help="LagKV decode: compress between steps when a partition is due (host) or inside every step")
    ap.add_argument("--kernel-bench", type=int, default=1, help="also time each kernel alone (1/0)")
    ap.add_argument("--backend", default="auto", choices=("auto", "flex", "reference"), help="LRSA prefill backend")
    ap.add_argument("--compile", default="auto", choices=("auto", "force", "off"),
                    help="compile the decode step (auto: on CUDA)")
    ap.add_argument("--check-prompt", type=int, default=2048)
    ap.add_argument("--check-steps", type=int, default=32, help="eager vs compiled token check (0: skip)")
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--fit-only", type=int, default=0, metavar="N",
                    help="only the 100 GiB fit for N-token prompts, from buffers allocated on the CPU (no GPU needed)")
    return ap


def command_line(argv) -> str:
    return "PYTHONPATH=. python3 " + " ".join([sys.argv[0] if argv is None else "benchmarks/bench_inference.py",
                                               *(sys.argv[1:] if argv is None else argv)])


def normalize_args(args: argparse.Namespace) -> argparse.Namespace:
    """Parsed flags in the form `run_inference` reads (modes as a list, compile as True / False / "force")."""
    if isinstance(args.modes, str):
        args.modes = args.modes.split(",")
    if isinstance(args.also_kernels, str):
        args.also_kernels = [k for k in args.also_kernels.split(",") if k]
    if set(args.also_kernels) - set(KERNELS):
        raise ValueError(f"--also-kernels: accepted a comma-separated subset of {KERNELS}, got {args.also_kernels}")
    if args.kernel in args.also_kernels:
        raise ValueError(f"--also-kernels: kernels other than --kernel ({args.kernel}, timed anyway), got {args.also_kernels}")
    unknown = set(args.modes) - set(MODES)
    if unknown or LAGKV not in args.modes:
        raise ValueError(f"--modes: accepted {MODES} (with {LAGKV}), got {args.modes}")
    if getattr(args, "prefill_repeats", 1) < 1:
        raise ValueError(f"--prefill-repeats must be >= 1, got {args.prefill_repeats}")
    if getattr(args, "fit_only", 0) < 0:
        raise ValueError(f"--fit-only must be a prompt length >= 1 (0: off), got {args.fit_only}")
    if isinstance(args.compile, str) and args.compile in ("auto", "off"):
        args.compile = args.compile == "auto"
    return args


def inference_args(argv: list[str] | None = None, **overrides) -> argparse.Namespace:
    """The flags of this script (defaults unless given), for callers such as benchmarks/bench_lrsa.py."""
    args = build_parser().parse_args(argv or [])
    for name, value in overrides.items():
        setattr(args, name, value)
    return normalize_args(args)


def main(argv=None) -> int:
    args = normalize_args(build_parser().parse_args(argv))
    cases = parse_cases(args.cases)
    if args.fit_only:
        shapes, dtype = (SMOKE, torch.float32) if args.smoke else (SMOLLM2, torch.bfloat16)
        cfg = LagConfig(4, 16, args.ratio) if args.smoke else LagConfig(16, 128, args.ratio)
        fit = allocated_fit(args.fit_only, cfg, args, shapes, dtype)
        result = {"command": command_line(argv), "environment": environment_record(), "device": "cpu",
                  "model_shapes": shapes, "dtype": str(dtype), "lag_config": cfg.to_dict(), "inference": {"fit": fit}}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        log(f"fit {fit['prompt_len']}-token sequences in 100 GiB: full {fit['max_batch_full']}, LagKV "
            f"{fit['max_batch_lagkv']} ({fit['ratio']:.2f}x)")
        return 0
    if args.smoke:
        device, dtype, shapes = torch.device("cpu"), torch.float32, SMOKE
        cfg = LagConfig(4, 16, args.ratio)
        if args.cases == build_parser().get_default("cases"):
            cases = [(150, 1), (150, 2)]
        args.new_tokens, args.warmup_steps = min(args.new_tokens, 6), min(args.warmup_steps, 2)
        args.sync_steps, args.check_prompt, args.check_steps = min(args.sync_steps, 2), 100, min(args.check_steps, 4)
    else:
        if not torch.cuda.is_available():
            print("bench_inference needs a CUDA GPU (or --smoke for the CPU smoke run)", file=sys.stderr)
            return 2
        device, dtype, shapes = torch.device("cuda"), torch.bfloat16, SMOLLM2
        cfg = LagConfig(16, 128, args.ratio)
    t0 = time.perf_counter()
    options = fast_options()  # the LRSA prefill's options (LRSA_VIZ_FUSED_REGION etc.), as this run uses them
    result = {"command": command_line(argv), "environment": environment_record(),
              "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "smoke": args.smoke,
              "fast_options": dataclasses.asdict(options), "flex_kernel": kernel_report(device)["kernel"]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(inference: dict) -> None:
        result["inference"] = inference
        result["wall_s"] = time.perf_counter() - t0
        out.write_text(json.dumps(result, indent=1))

    save(run_inference(cases, cfg, args, device, dtype, shapes, on_progress=save))
    print_summary(result)
    return 0


def print_summary(result: dict) -> None:
    inf = result["inference"]
    log("\n==== inference summary")
    for row in inf["rows"]:
        if "decode_speedup" not in row and "prefill_speedup" in row:  # --prefill-only
            times = " ".join(f"{m}={row[m]['prefill_s'] * 1e3:.1f} ms" for m in MODES if m in row and "error" not in row[m])
            log(f"N={row['prompt_len']} B={row['batch']}: prefill {times} | prefill x{row['prefill_speedup']:.2f}")
            continue
        if "decode_speedup" not in row:
            log(f"N={row['prompt_len']} B={row['batch']}: incomplete ({[m for m in MODES if 'error' in row.get(m, {})]} failed)")
            continue
        tps = " ".join(f"{m}={row[m]['decode_tokens_per_s']:.0f}" for m in MODES if m in row and "error" not in row[m])
        log(f"N={row['prompt_len']} B={row['batch']}: tok/s {tps} | decode x{row['decode_speedup']:.2f} (vs "
            f"{row['fastest_full_mode']}) prefill x{row['prefill_speedup']:.2f} kv bytes x{row['kv_bytes_ratio']:.3f} "
            f"bw {row['bandwidth_fraction'] if row['bandwidth_fraction'] is None else round(row['bandwidth_fraction'], 3)} "
            f"syncs/step {row['host_syncs_per_step']}")
        for k, speedup in row.get("decode_speedup_by_kernel", {}).items():
            log(f"    kernel={k}: decode x{speedup:.2f} ({row['lagkv_by_kernel'][k]['decode_tokens_per_s']:.0f} tok/s)")
    if inf.get("fit"):
        f = inf["fit"]
        log(f"fit {f['prompt_len']}-token sequences in 100 GiB: full {f['max_batch_full']}, LagKV {f['max_batch_lagkv']} "
            f"({f['ratio']:.2f}x)")
    if inf.get("check"):
        log(f"eager vs compiled: {inf['check']}")
    log(f"wall {result['wall_s']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
