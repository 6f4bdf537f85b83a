"""Compressed generation over fixed buffers (no host sync per step): one parallel LRSA prefill into a
`StaticLagKVCache`, then decoding over its fixed-size buffers (eager, or compiled with CUDA graphs).

Measured on an H100 (2026-12-07, data/results/bench_h100/bench_inference_b1_kernels.json and
_b16_b64_kernels.json; 16k-token prompts, bf16, SmolLM2-135M shapes, host-scheduled compression, the default
``matmul`` kernel): decoding is **1.47x** faster than transformers' full StaticCache in its fastest form (compiled,
CUDA graphs) at batch 1 and **7.42x** at batch 16 (586 vs 399 and 6,505 vs 877 tokens/s); 14,870 tokens/s at batch
64 (the full cache's 64 x 16k prefill did not fit the H100's 80 GB); zero host syncs, one CUDA-graph replay per step.
Part of the batch-16 gap is the baseline's own: 8.2 of its 18.3 ms of GPU time per step go to repeating K/V for
grouped-query heads (transformers' SDPA path). The LRSA prefill was host-bound at batch 1 (0.48-0.58x dense: 42 ms
of GPU time in 96-115 ms of wall time) until the fast path compiled selection, layout and attention as one region per
layer (the default since 2026-12-08, data/results/bench_h100/bench_inference_prefill_*.json): batch 1 is now
0.92-1.08x dense over four runs on two H100s, batch 16 1.27-1.33x, 32k tokens 1.49-1.50x; decoding in the same
session measured 1.24x at batch 1 and 7.39x at batch 16 (bench_inference_decode_fused.json). Every run before the in-place
write fix decoded SLOWER than the full cache (0.31x-0.75x on an H200 and an H100, data/results/bench_h200_x2,
bench_h100): the compiled step copied every layer's whole K/V slice around its one-slot write
(`StaticLagKVCache.update`), found on a CPU from inductor's generated code and fixed. It keeps 26% of the KV bytes.

`enable_static_lagkv(model, config)` registers the attention implementation ``"lagkv_static"``:

- the prompt (an update of an empty cache: queries == keys) goes through LRSA (`lrsa_viz.attention`, the flex
  backend on CUDA), and the cache stores what it selected: for every layer, LRSA's selection IS one-shot LagKV
  selection of that layer's K/V, which after N tokens is exactly the recursive cache's state (METHOD §3, §4). The
  flex attention selects once per layer, inside its compiled region, and hands the kept positions to the cache
  (`lrsa_viz.attention.attach_prompt_fill`), so nothing is selected twice and a layer's prompt costs one compiled
  call;
- later updates attend over the cache's buffers with `lrsa_viz.fast.decode.buffer_attention` (grouped-query heads
  native, no K/V repeat) and the mask ``slot <= stored + i``, built once per forward from device counters.

``prefill="dense"`` registers ``"static_dense"`` instead: the prompt through plain SDPA (the full model), decoding
through the same buffer attention. With transformers' ``StaticCache`` it is the full cache with the same decode
kernel (the benchmark's like-for-like baseline); with a `StaticLagKVCache` it is kvpress-style one-shot
compression of a dense prefill.

Chunk-by-chunk prefill (`lrsa_viz.prefill.chunked_prefill`) and this one parallel pass keep the same positions and
give the same logits up to near-ties: the two compute K/V with different matrix shapes, so scores drift by float
rounding (~1e-6), and a token at the top-k boundary whose score differs from its neighbour's by less than that can
be chosen differently (METHOD §3, "free"). On CPU in float32 they agree exactly in the tests.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
from tqdm.auto import tqdm
from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from .checks import check_int
from .attention import (LRSA_IMPLEMENTATION, attention_state, check_max_positions, check_supported, disable_lrsa,
                        enable_lrsa, lrsa_attention_forward, lrsa_mask_interface, prompt_fill_of, resolve_backend,
                        restore_attention_state)
from .config import LagConfig
from .fast.decode import DEFAULT_KERNEL, buffer_attention, check_kernel, slot_mask
from .prefill import check_prefill_inputs
from .static_cache import StaticLagKVCache

STATIC_LAGKV = "lagkv_static"
STATIC_DENSE = "static_dense"
PREFILLS = {"lrsa": STATIC_LAGKV, "dense": STATIC_DENSE}
_KERNEL_ATTR = "lagkv_decode_kernel"  # model.config attribute: the buffer-attention kernel
_PREVIOUS_ATTR = "lagkv_static_previous_attn_implementation"


# ----------------------------------------------------------------------------------------- attention implementations
def _buffer_forward(module, query, key, value, attention_mask, scaling):
    """[B, Q, H_q, d] attention of new queries over a static buffer, as transformers' attention functions return."""
    if attention_mask is None or attention_mask.dtype != torch.bool:
        raise ValueError("attention_mask: attention over a static cache needs the bool slot mask of its mask interface "
                         "(call the model with attention_mask=None or a 2D all-ones mask)")
    out = buffer_attention(query, key, value, attention_mask, scaling, getattr(module.config, _KERNEL_ATTR, DEFAULT_KERNEL))
    return out.transpose(1, 2), None


def static_lagkv_mask_interface(*args, **kwargs):
    """The prompt (queries == keys): LRSA's mask interface. Later: `slot_mask` from the cache's query offset."""
    q_len, kv_len = kwargs.get("q_length"), kwargs.get("kv_length")
    if q_len == kv_len and not kwargs.get("kv_offset"):
        return lrsa_mask_interface(*args, **kwargs)
    return slot_mask(kwargs.get("q_offset", 0), q_len, kv_len, kwargs.get("device", "cpu"))


def _finish_prompt_fill(key: torch.Tensor) -> None:
    """A `StaticLagKVCache`'s prompt that the attention did not store (reference backend, forced selections, dense
    prefill): the cache stores its own selection now, within the layer (`lrsa_viz.static_cache.PromptFill`)."""
    fill = prompt_fill_of(key)
    if fill is not None:
        fill.finish()


def static_lagkv_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling: float | None = None, **kwargs):
    """query [B, H_q, Q, d]; key/value: the prompt's own [B, H_kv, Q, d] (LRSA) or the cache buffer [B, H_kv, M, d]."""
    if query.shape[2] == key.shape[2]:
        out = lrsa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                     **kwargs)
        _finish_prompt_fill(key)
        return out
    return _buffer_forward(module, query, key, value, attention_mask, scaling)


def static_dense_mask_interface(*args, **kwargs):
    """Several new tokens: transformers' SDPA mask (causal; None for a prompt, so SDPA runs flash). One: `slot_mask`."""
    if kwargs.get("q_length", 1) > 1:
        return sdpa_mask(*args, **kwargs)
    return slot_mask(kwargs.get("q_offset", 0), 1, kwargs.get("kv_length"), kwargs.get("device", "cpu"))


def static_dense_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling: float | None = None, **kwargs):
    if query.shape[2] > 1:
        out = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                     **kwargs)
        _finish_prompt_fill(key)  # with a StaticLagKVCache: one-shot compression of the dense prompt
        return out
    return _buffer_forward(module, query, key, value, attention_mask, scaling)


AttentionInterface.register(STATIC_LAGKV, static_lagkv_attention)
AttentionMaskInterface.register(STATIC_LAGKV, static_lagkv_mask_interface)
AttentionInterface.register(STATIC_DENSE, static_dense_attention)
AttentionMaskInterface.register(STATIC_DENSE, static_dense_mask_interface)


def enable_static_lagkv(model: PreTrainedModel, config: LagConfig | None = None, *, prefill: str = "lrsa",
                        backend: str = "auto", kernel: str = DEFAULT_KERNEL) -> PreTrainedModel:
    """Prepare ``model`` for a static cache (module docstring). Returns the model.

    Args:
        config: the LagConfig of the LRSA prefill (default LagConfig()); unused with ``prefill="dense"``.
        prefill: ``"lrsa"`` (the prompt through LRSA) or ``"dense"`` (plain SDPA).
        backend: LRSA backend of the prefill (`lrsa_viz.attention.enable_lrsa`).
        kernel: buffer-attention kernel of the later updates, one of `lrsa_viz.fast.decode.KERNELS`.
    """
    check_supported(model)
    if prefill not in PREFILLS:
        raise ValueError(f"prefill must be one of {sorted(PREFILLS)}, got {prefill!r}")
    check_kernel(kernel)
    if model.config._attn_implementation in (STATIC_LAGKV, STATIC_DENSE):
        disable_static_lagkv(model)
    if prefill == "lrsa":
        enable_lrsa(model, config, backend)
    else:
        setattr(model.config, _PREVIOUS_ATTR, model.config._attn_implementation or "sdpa")
    setattr(model.config, _KERNEL_ATTR, kernel)
    model.set_attn_implementation(PREFILLS[prefill])
    return model


def disable_static_lagkv(model: PreTrainedModel) -> PreTrainedModel:
    """Undo `enable_static_lagkv`: restore the attention implementation the model had before."""
    impl = model.config._attn_implementation
    if impl == STATIC_LAGKV:
        model.set_attn_implementation(LRSA_IMPLEMENTATION)
        disable_lrsa(model)
    elif impl == STATIC_DENSE:
        model.set_attn_implementation(getattr(model.config, _PREVIOUS_ATTR, "sdpa"))
    for attr in (_KERNEL_ATTR, _PREVIOUS_ATTR):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    return model


@contextlib.contextmanager
def static_lagkv(model: PreTrainedModel, config: LagConfig | None = None, **kwargs) -> Iterator[PreTrainedModel]:
    """``with static_lagkv(model, cfg): ...``: `enable_static_lagkv` for the block, the previous state after
    (`lrsa_viz.attention.attention_state`: whatever was enabled before, a static state with its kernel included)."""
    previous = attention_state(model, (_KERNEL_ATTR, _PREVIOUS_ATTR))
    enable_static_lagkv(model, config, **kwargs)
    try:
        yield model
    finally:
        restore_attention_state(model, previous)


# ------------------------------------------------------------------------------------------------------- decoding
def decode_step(model: PreTrainedModel, tokens: torch.Tensor, cache) -> torch.Tensor:
    """One greedy step: ``tokens`` [B, 1] through the model and the cache, next tokens [B, 1] (on the device)."""
    logits = model(input_ids=tokens, past_key_values=cache, use_cache=True).logits
    return logits[:, -1:].argmax(dim=-1)


@functools.cache
def compiled_decode_step(mode: str = "reduce-overhead", dynamic: bool | None = False, backend: str = "inductor"):
    """`decode_step` compiled whole (``fullgraph``: a graph break would fail loudly, not slow down silently).

    ``mode="reduce-overhead"`` replays CUDA graphs; ``dynamic=True`` shares one compilation across batch sizes and
    buffer lengths (the benchmark), ``False`` specialises to one shape.
    """
    from .fast.kernel import allow_recompiles

    allow_recompiles()
    options = {} if backend != "inductor" else {"mode": mode}
    compiled = torch.compile(decode_step, fullgraph=True, dynamic=dynamic, backend=backend, **options)
    if not dynamic:
        return compiled

    def step(model, tokens, cache):
        # dynamic=True would also make the model's float constants (eps, scaling) graph inputs: fresh CPU scalar
        # tensors every call, copied to the GPU each step and re-recording the CUDA graphs (measured: ~0.7 s a step)
        with torch._dynamo.config.patch(specialize_float=True):
            return compiled(model, tokens, cache)

    return step


def greedy_decode(model: PreTrainedModel, cache, tokens: torch.Tensor, steps: int, *, compile: bool = False,
                  progress: bool = False, step_fn=None, host_compression: bool = True) -> torch.Tensor:
    """Feed ``tokens`` [B, 1], then each greedy token, ``steps`` times; returns the ``steps`` new tokens [B, steps].

    The loop reads nothing back from the device (tokens stay there). ``compile``: run `compiled_decode_step`
    (CUDA graphs on CUDA). ``step_fn`` overrides the step function (same signature as `decode_step`; anything but
    `decode_step` is treated as compiled: CUDA-graph steps are marked and their outputs copied).
    ``host_compression`` (a `StaticLagKVCache` only; default on, the configuration the benchmarks measure): compress
    between steps, only when a partition is due (`StaticLagKVCache.host_scheduled_compression`: one read of the
    cache's two counters before the first step, none per step); off: inside every step, with fixed shapes and no read
    at all. Same tokens either way (tested).
    """
    check_int("steps", steps, 0)
    step = step_fn or (compiled_decode_step() if compile else decode_step)
    out = torch.empty(tokens.shape[0], steps, dtype=tokens.dtype, device=tokens.device)
    graphs = tokens.is_cuda and step is not decode_step
    host = host_compression and isinstance(cache, StaticLagKVCache)
    # fresh [B, 1] strides (a slice like out[:, -1:] keeps its parent's): a compiled step would recompile for them
    tokens = torch.empty(tokens.shape, dtype=tokens.dtype, device=tokens.device).copy_(tokens)
    with torch.no_grad(), (cache.host_scheduled_compression() if host else contextlib.nullcontext()):
        for i in tqdm(range(steps), desc="decode", disable=not progress):
            if host:
                cache.before_update(tokens.shape[1])
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            tokens = step(model, tokens, cache)
            if graphs:
                tokens = tokens.clone()  # the next replay overwrites the graph's output buffer
            out[:, i: i + 1] = tokens
    return out


@torch.no_grad()
def static_prefill(model: PreTrainedModel, input_ids: torch.Tensor, config: LagConfig | None = None,
                   max_cache_len: int | None = None, *, backend: str = "auto", kernel: str = DEFAULT_KERNEL,
                   logits_to_keep: int = 1) -> tuple[torch.Tensor, StaticLagKVCache]:
    """The prompt [B, N] in one parallel LRSA forward into a new `StaticLagKVCache` (sized ``max_cache_len``,
    default N + 1). Returns (logits [B, logits_to_keep, V] of the last positions (0 = all N), the cache).

    The model is left as it was (the static implementation is enabled for the call only).
    """
    config = config or LagConfig()
    check_prefill_inputs(model, input_ids, config)
    n = input_ids.shape[1]
    max_cache_len = n + 1 if max_cache_len is None else max_cache_len
    if isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int) or max_cache_len < n:
        raise ValueError(f"max_cache_len must be an integer >= the prompt length {n}, got {max_cache_len!r}")
    flex = resolve_backend(backend, input_ids.device) == "flex"
    cache = StaticLagKVCache(model.config, max_cache_len, config, compiled_selection=flex)
    with static_lagkv(model, config, backend=backend, kernel=kernel):
        logits = model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=logits_to_keep).logits
    return logits, cache


@torch.no_grad()
def static_generate(model: PreTrainedModel, input_ids: torch.Tensor, config: LagConfig | None = None,
                    max_new_tokens: int = 32, *, compile: bool | None = None, backend: str = "auto",
                    kernel: str = DEFAULT_KERNEL, progress: bool = False, host_compression: bool = True,
                    return_cache: bool = False) -> torch.Tensor | tuple[torch.Tensor, StaticLagKVCache]:
    """Greedy generation with LagKV compression end to end, over fixed buffers (no host sync per decode step).

    The prompt [B, N] goes through one parallel LRSA forward (`static_prefill`) into a `StaticLagKVCache` sized for
    N + max_new_tokens; each new token is then decoded over the compressed buffers, compiled with CUDA graphs when
    ``compile`` (default: on CUDA); ``host_compression``: see `greedy_decode`. Same tokens as
    `lrsa_viz.prefill.compressed_generate` (the teaching path) up to near-ties of the scores. Returns the
    [B, N + max_new_tokens] sequences (and the cache if ``return_cache``).
    """
    config = config or LagConfig()
    check_prefill_inputs(model, input_ids, config)
    new = check_int("max_new_tokens", max_new_tokens, 1)
    n = input_ids.shape[1]
    check_max_positions(model.config, n + new, "input_ids + max_new_tokens")
    compile = input_ids.is_cuda if compile is None else compile
    logits, cache = static_prefill(model, input_ids, config, n + new, backend=backend, kernel=kernel)
    first = logits[:, -1:].argmax(dim=-1)
    with static_lagkv(model, config, backend=backend, kernel=kernel):
        rest = greedy_decode(model, cache, first, new - 1, compile=compile, progress=progress,
                             host_compression=host_compression)
    cache.check_overflow()
    out = torch.cat([input_ids, first, rest], dim=1)
    return (out, cache) if return_cache else out
