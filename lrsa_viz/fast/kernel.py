"""`fast_lrsa_attention`: LRSA attention as one FlexAttention call over the compact key/value layout.

Kernels (`flex_kernel_backend`, the one place that chooses): ``"flash"`` runs FlexAttention with
``kernel_options={"BACKEND": "FLASH"}``, FlashAttention-4's CuTe tiles (optional extra ``pip install
lrsa-viz[fa4]``; Hopper or Blackwell GPU, bf16/fp16, block 128); ``"triton"`` runs FlexAttention's default
kernels (Triton on CUDA; on the CPU, PyTorch's own implementation, forward only). ``"auto"`` picks flash where it
can run and triton otherwise; ``LRSA_VIZ_FLEX_BACKEND=auto|flash|triton`` or ``kernel=`` overrides it, and an
explicit ``"flash"`` that cannot run is a ValueError, never a silent fallback.

No host synchronisation on the CUDA path: no value is read back from the device (no ``.item()``, ``nonzero``,
data-dependent Python branch), and the block mask is built once per layout and device, then cached.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import importlib.util
import os
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from ..config import LagConfig
from .layout import (ALIGN_QUERIES, DEFAULT_BLOCK_SIZE, LrsaLayout, layout_kv, lrsa_block_mask, pad_queries,
                     pad_rows)
from .selection import compact_positions, one_shot_kept_index

#: Dynamo recompiles the static-shape kernels once per new block count, config, kernel and grad mode; past its
#: recompile limit (8 by default) it would silently fall back to the unfused, O(N^2)-memory implementation, so the
#: limit is raised to at least this (a benchmark run of every length, ratio and kernel needs about 50).
RECOMPILE_LIMIT = 256
#: Environment variables read by `fast_options` (per call, so a process can switch between runs).
KERNEL_ENV, FUSED_ENV, ALIGN_ENV = "LRSA_VIZ_FLEX_BACKEND", "LRSA_VIZ_FUSED_REGION", "LRSA_VIZ_ALIGN_QUERIES"
KERNELS = ("auto", "flash", "triton")
#: What fast LRSA runs with FlashAttention-4 through FlexAttention (flash-attn-4 4.0.0b36): compute capability 9.x
#: (Hopper) or 10.x/11.x (Blackwell), 16-bit floats, sparse blocks of 128 x 128 (its tile; the only size run).
FLASH_CAPABILITIES, FLASH_DTYPES, FLASH_BLOCK_SIZE = (9, 10, 11), (torch.float16, torch.bfloat16), 128
#: Head sizes fast LRSA hands to FlashAttention-4: only those checked on a GPU against the reference (outputs and
#: gradients). Its interface accepts any multiple of 8 up to 256, but on an H100 (2026-12-07,
#: tests/test_fast.py::test_cuda_model_training_step_matches_reference) head_dim 16 ran and gave WRONG gradients
#: (k_proj gradient 74% off a float32 run, against 2.7% for bf16 SDPA) while 64 (SmolLM2's) matched: that model-level
#: step on an H100, the attention's outputs and gradients on an H200 (data/results/bench_lrsa_h200_correctness.json).
#: Other sizes (96 and 128 included, until checked) run the Triton kernel.
FLASH_HEAD_DIMS = (64,)


def allow_recompiles(limit: int = RECOMPILE_LIMIT) -> None:
    """Raise dynamo's recompile limit to at least ``limit`` (a process-wide setting; it is never lowered)."""
    import torch._dynamo as dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo.config, name):
            setattr(dynamo.config, name, max(limit, getattr(dynamo.config, name)))
    if hasattr(dynamo.config, "accumulated_recompile_limit"):  # over all functions together
        dynamo.config.accumulated_recompile_limit = max(4 * limit, dynamo.config.accumulated_recompile_limit)


# ------------------------------------------------------------------------------------------------- kernel choice
def _find_spec(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package that fails to import, or a broken install
        return False


def _torch_has_flash_backend() -> bool:
    import typing

    from torch.nn.attention import flex_attention as fa

    backends = typing.get_args(getattr(fa, "_Backend", None)) or ()
    return "FLASH" in backends or _find_spec("torch._inductor.kernel.flex.flex_flash_attention")


@functools.cache
def flash_unavailable_reason(device_index: int | None = None) -> str | None:
    """None when FlexAttention's FLASH backend can run on CUDA device ``device_index`` (default: current), else
    why not (one sentence). Checks: CUDA, compute capability, torch's FLASH lowering, the flash-attn-4 package."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    major, minor = _capability(device_index)
    if major not in FLASH_CAPABILITIES:
        return f"compute capability {major}.{minor}: FlashAttention-4 tiles need 9.x (Hopper) or 10.x/11.x (Blackwell)"
    if not _torch_has_flash_backend():
        return f"torch {torch.__version__} has no FlexAttention FLASH backend (torch >= 2.11 has it)"
    if not _find_spec("flash_attn.cute"):
        return "the flash-attn-4 package is not installed (pip install 'lrsa-viz[fa4]')"
    return None


def _flash_shape_reason(dtype: torch.dtype | None, head_dim: int | None, block_size: int) -> str | None:
    if dtype is not None and dtype not in FLASH_DTYPES:
        return f"dtype {dtype}: FlashAttention-4 runs float16/bfloat16 only"
    if block_size != FLASH_BLOCK_SIZE:
        return f"block_size {block_size}: the FLASH backend runs {FLASH_BLOCK_SIZE} x {FLASH_BLOCK_SIZE} blocks"
    if head_dim is not None and head_dim not in FLASH_HEAD_DIMS:
        return (f"head_dim {head_dim}: fast LRSA runs FlashAttention-4 only at the head sizes checked on a GPU, "
                f"{FLASH_HEAD_DIMS} (head_dim 16 gave wrong gradients on an H100)")
    return None


def requested_kernel(kernel: str | None = None) -> tuple[str, str]:
    """(name, where it came from): ``kernel`` if given, else LRSA_VIZ_FLEX_BACKEND, else "auto"; validated."""
    source = "kernel" if kernel is not None else KERNEL_ENV
    name = kernel if kernel is not None else os.environ.get(KERNEL_ENV) or "auto"
    if not isinstance(name, str) or name.lower() not in KERNELS:
        raise ValueError(f"{source} must be one of {KERNELS}, got {name!r}")
    return name.lower(), source


@functools.cache
def _capability(device_index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def flex_kernel_backend(device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                        head_dim: int | None = None, block_size: int = DEFAULT_BLOCK_SIZE,
                        kernel: str | None = None) -> str:
    """The FlexAttention kernel fast LRSA runs: ``"flash"`` (FlashAttention-4 tiles) or ``"triton"``.

    Args:
        device: where it runs (default: the current CUDA device, else the CPU). dtype, head_dim, block_size: of
            the call, when known (FlashAttention-4 runs 16-bit floats, some head sizes, 128-token blocks).
        kernel: ``"auto"`` (default; the environment variable LRSA_VIZ_FLEX_BACKEND when None), ``"flash"`` or
            ``"triton"``. ``"auto"`` picks flash wherever it can run.
    Raises:
        ValueError: an unknown name, or ``"flash"`` requested where it cannot run (the message says why).
    """
    kernel, source = requested_kernel(kernel)
    if kernel == "triton":
        return "triton"
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    reason = "the device is not a CUDA GPU" if device.type != "cuda" else flash_unavailable_reason(device.index)
    if reason is None:
        reason = _flash_shape_reason(dtype, head_dim, block_size)
    if reason is None:
        return "flash"
    if kernel == "flash":
        raise ValueError(f"{source}='flash' cannot run here: {reason}; use 'auto' or 'triton'")
    return "triton"


def kernel_report(device: torch.device | str | None = None) -> dict:
    """What fast LRSA runs here, for logs and benchmark JSON: the kernel chosen for bf16, head_dim 64, block 128
    (``kernel``), the request (``requested``: LRSA_VIZ_FLEX_BACKEND or "auto"), why flash is off (None if on),
    and the versions of the packages involved."""
    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    reason = "the device is not a CUDA GPU" if dev.type != "cuda" else flash_unavailable_reason(dev.index)
    try:
        requested = requested_kernel()[0]
        chosen = flex_kernel_backend(dev, torch.bfloat16, 64)
    except ValueError as e:
        requested, chosen = os.environ.get(KERNEL_ENV), f"error: {e}"
    return {"kernel": chosen, "requested": requested, "flash_unavailable_reason": reason,
            "flash_attn_4": version("flash-attn-4"), "nvidia_cutlass_dsl": version("nvidia-cutlass-dsl"),
            "torch": torch.__version__}


# -------------------------------------------------------------------------------------------------------- options
@dataclasses.dataclass(frozen=True)
class FastOptions:
    """How the fast path runs (never what it computes: every combination gives the same result up to rounding).

    Attributes:
        kernel: "auto" | "flash" | "triton" (`flex_kernel_backend`).
        fused: compile selection + layout + attention of a call as ONE region (one graph, fused copies; the
            default), instead of a compiled selection, an eager layout and a compiled FlexAttention call. Measured
            on an H100 (2026-12-08, bf16, SmolLM2-135M shapes, Triton tiles; data/results/bench_h100/
            bench_inference_prefill_*.json): the static LagKV prefill of a 16k-token prompt took 54.7 ms fused and
            104.1 ms unfused (dense SDPA: 56.6 ms; the unfused prefill is host-bound: 101 ms of host time for 42 ms
            of GPU time), at batch 16 547 vs 585 ms; the 8k x 4 training step (2026-12-07, FlashAttention-4 tiles)
            ran 1.13x dense tokens/s fused and 1.09x unfused.
        align_queries: query blocks start on partition starts (`lrsa_viz.fast.layout`, D padding rows).
    """

    kernel: str = "auto"
    fused: bool = True
    align_queries: bool = ALIGN_QUERIES


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be 0 or 1, got {value!r}")


def fast_options(kernel: str | None = None, fused: bool | None = None, align_queries: bool | None = None) -> FastOptions:
    """`FastOptions` from the arguments, else the environment (LRSA_VIZ_FLEX_BACKEND, LRSA_VIZ_FUSED_REGION=0|1,
    LRSA_VIZ_ALIGN_QUERIES=0|1), else the defaults."""
    return FastOptions(
        kernel=requested_kernel(kernel)[0],
        fused=fused if fused is not None else _env_flag(FUSED_ENV, FastOptions.fused),
        align_queries=align_queries if align_queries is not None else _env_flag(ALIGN_ENV, ALIGN_QUERIES),
    )


# ------------------------------------------------------------------------------------------------------ compiling
@functools.cache
def compiled_flex_attention():
    """``torch.compile(flex_attention, dynamic=False)``: fused kernels (forward and backward), Triton or FLASH by
    the ``kernel_options`` of the call.

    Static shapes: one compilation per sequence length (a few seconds). Measured on an H200 with the Triton kernels
    (commit 2c8fa0d, not in a committed JSON): forward+backward 1.4-1.5x faster than one dynamic-shape compilation
    for all lengths.
    """
    allow_recompiles()
    return torch.compile(flex_attention, dynamic=False)


@functools.cache
def compiled_compact_positions():
    """`lrsa_viz.fast.selection.compact_positions` compiled (static shapes, one compilation per N and config).

    Fusing the float32 statistics (min/max over the reference, normalisation, channel std, softmax) reads K and V
    once or twice instead of once per operation. Same selection rule (`lrsa_viz.scoring.select_top_k`: a stable
    sort, exact ties to the lower position; inductor's sort keeps stability by tie-breaking on the index).
    """
    allow_recompiles()
    return torch.compile(compact_positions, dynamic=False)


def _attend(query, key, value, select_key, select_value, positions, block_mask, layout: LrsaLayout,
            config: LagConfig, scaling, gqa: bool, kernel_options, kept_of=None, flex=flex_attention,
            select=compact_positions):
    """Selection (unless ``positions``), layout, one FlexAttention call, padding rows dropped: [B, H_q, n, d].

    ``select_key``/``select_value``: detached K/V zero-padded to the layout's N (>= n), None with ``positions``;
    selections they give past
    the real tokens (partitions whose reference is padding) are seen by padding queries only, so they are
    replaced by a valid index (n - 1) for the gather.
    ``kept_of``: the real sequence length (int or 0-dim tensor) when the caller also wants what a one-shot LagKV
    cache keeps; then returns (output, `one_shot_kept_index` [B, H_kv, C + 2L], valid up to eq. 12 of it).
    """
    n = query.shape[2]
    if positions is None:
        with torch.no_grad():
            positions = select(select_key, select_value, config)
            if n != layout.seq_len:
                positions = positions.clamp(max=n - 1)
    key_buffer, value_buffer = layout_kv(key, value, positions, layout)
    out = flex(pad_queries(query, layout), key_buffer, value_buffer, block_mask=block_mask, scale=scaling,
               enable_gqa=gqa, kernel_options=kernel_options)
    out = out[:, :, layout.query_pad:layout.query_pad + n]
    if kept_of is None:
        return out
    return out, one_shot_kept_index(positions, kept_of, config, layout.compact + 2 * layout.lag)


@functools.cache
def compiled_region():
    """`_attend` (selection + layout + FlexAttention) compiled as one region, static shapes (``fused=True``): one
    compilation per block count (`fast_lrsa_attention` pads its inputs to whole blocks before the call)."""
    allow_recompiles()
    return torch.compile(_attend, dynamic=False)


# ---------------------------------------------------------------------------------------------------- the function
@functools.lru_cache(maxsize=256)
def _plan(n: int, config: LagConfig, block_size: int, options: FastOptions, device: torch.device, dtype: torch.dtype,
          head_dim: int, compiled: bool) -> tuple[LrsaLayout, object, dict | None]:
    """(layout, block mask, kernel_options) of a call, cached: what does not depend on the data is decided once.

    The layout is that of N rounded up to whole blocks: one compiled kernel and block mask per block count, not
    per N. Exact: the padding (zero keys after the last token, zero queries) is seen by padding queries only, and
    the selections real queries see (partitions <= P - 2, references <= P - 1) are made of real tokens only.
    Uncompiled FlexAttention (tests, CPU) has one implementation, whatever the kernel request.
    """
    layout = LrsaLayout.of(-(-n // block_size) * block_size, config, block_size, align_queries=options.align_queries)
    name = flex_kernel_backend(device, dtype, head_dim, block_size, options.kernel) if compiled else "triton"
    return layout, lrsa_block_mask(layout, device), {"BACKEND": "FLASH"} if name == "flash" else None


def check_qkv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    """Raise ValueError unless query is [B, H_q, N, d] and key/value are [B, H_kv, N, d] with H_q % H_kv == 0."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            raise ValueError(f"{name} must be a 4D tensor [B, H, N, d], got {getattr(t, 'shape', type(t).__name__)}")
    if key.shape != value.shape:
        raise ValueError(f"key and value must have the same shape, got {tuple(key.shape)} and {tuple(value.shape)}")
    b, hq, n, d = query.shape
    if (key.shape[0], key.shape[2], key.shape[3]) != (b, n, d):
        raise ValueError(
            f"key must be [B={b}, H_kv, N={n}, d={d}] like the query (fast LRSA attends a full sequence to itself), "
            f"got {tuple(key.shape)}"
        )
    if hq % key.shape[1]:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({key.shape[1]})")


def check_positions(positions: torch.Tensor, key: torch.Tensor, layout: LrsaLayout) -> None:
    """Raise ValueError unless ``positions`` is an integer [B, H_kv, C] tensor on the keys' device; on the CPU
    also that each row is the sink 0 .. S-1, then k positions inside each scored partition, ascending. (On CUDA
    the values are not read: that would synchronise the device; an index outside [0, N) fails in the gather.)"""
    b, h = key.shape[:2]
    if not isinstance(positions, torch.Tensor) or positions.shape != (b, h, layout.compact):
        raise ValueError(f"positions must be a tensor [B, H_kv, C] = {(b, h, layout.compact)} (C = S + (P-1) k), "
                         f"got {tuple(getattr(positions, 'shape', ())) or type(positions).__name__}")
    if positions.dtype != torch.long or positions.device != key.device:
        raise ValueError(f"positions must be int64 on {key.device}, got {positions.dtype} on {positions.device}")
    if positions.device.type == "cpu":
        s, lag, k = layout.sink, layout.lag, layout.top_k
        sink_ok = torch.equal(positions[..., :s], torch.arange(s).expand(b, h, s))
        chosen = positions[..., s:].reshape(b, h, -1, k)
        starts = s + lag * torch.arange(chosen.shape[2])[:, None]
        inside = bool(((chosen >= starts) & (chosen < starts + lag)).all())
        ascending = bool((chosen[..., 1:] > chosen[..., :-1]).all())
        if not (sink_ok and inside and ascending):
            raise ValueError("positions must hold, per row, the sink 0 .. S-1 then k ascending positions inside each "
                             "scored partition p (S + p L .. S + (p+1) L - 1), as `compact_positions` returns them")


def check_can_train(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    """Raise ValueError for a call that needs gradients on the CPU (PyTorch has no FlexAttention backward there)."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if needs_grad and query.device.type == "cpu":
        raise ValueError(
            "backend='flex' cannot train on CPU: PyTorch has no FlexAttention backward on CPU; "
            "use backend='reference' (enable_lrsa(model, config, backend='reference')) or a CUDA device"
        )


def fast_lrsa_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    config: LagConfig,
    scaling: float | None = None,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    compiled: bool | None = None,
    positions: torch.Tensor | None = None,
    kernel: str | None = None,
    fused: bool | None = None,
    align_queries: bool | None = None,
    return_kept: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LRSA attention of a full sequence (queries 0..N-1 over keys 0..N-1) without an N x N mask.

    1. LagKV selections from the post-RoPE key/value (no gradient; compiled on CUDA), unless ``positions`` gives
       them;
    2. the sink and the selected keys/values of each partition gathered into a compact region placed before the
       full keys/values (`lrsa_viz.fast.layout`; the gather is differentiable);
    3. one FlexAttention call with a static block mask (same for every head and batch element, cached per
       shape); grouped-query attention without repeating K/V (``enable_gqa``).

    Args:
        query: [B, H_q, N, d]; key, value: [B, H_kv, N, d] post-RoPE; H_q a multiple of H_kv.
        config: the LagConfig. scaling: softmax scale (default d ** -0.5).
        block_size: FlexAttention tile (power of two >= 16). compiled: use the compiled kernels (default: on CUDA).
            Uncompiled FlexAttention is PyTorch's reference implementation: forward only on CPU (PyTorch has no
            FlexAttention backward on CPU), meant for tests.
        positions: forced selections, LongTensor [B, H_kv, S + (P-1) k] as `compact_positions` returns them (the
            sink, then the kept positions of partitions 0 .. P-2, ascending); None computes them.
        kernel, fused, align_queries: how it runs (`FastOptions`; None: environment, else default).
        return_kept: also return what a one-shot LagKV cache keeps of these K/V, from the same selection (a
            `StaticLagKVCache` stores the prompt with it: one selection per layer, inside the same compiled region).
    Returns:
        [B, H_q, N, d], equal (up to rounding) to `sdpa` with `lrsa_viz.mask.visibility_from_keep` as mask; with
        ``return_kept`` also the kept positions in cache-slot order, LongTensor [B, H_kv, eq. 12 of N]
        (`lrsa_viz.fast.selection.one_shot_kept_index`; all N positions when nothing is compressed).
    Sequences shorter than S + 2L, and ratio 1, are plain causal attention and go to SDPA. Under autocast the
    selection reads the tensors as given (like the reference path) and the attention runs in the autocast dtype.
    N is rounded up to whole blocks inside (zero padding, exact), so batches of slightly different lengths share
    one compiled kernel.
    """
    check_qkv(query, key, value)
    n, d = query.shape[2], query.shape[3]
    gqa = query.shape[1] != key.shape[1]
    if config.num_partitions(n) < 2 or config.top_k == config.lag_size:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=gqa)
        return (out, torch.arange(n, device=key.device).expand(*key.shape[:2], n)) if return_kept else out
    compiled = query.is_cuda if compiled is None else compiled
    check_can_train(query, key, value)
    options = fast_options(kernel, fused, align_queries)
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):  # FlexAttention has no autocast rule in every torch: cast here
        dtype = torch.get_autocast_dtype(device_type)
    elif not query.dtype == key.dtype == value.dtype:
        raise ValueError(f"query, key and value must have one dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    else:
        dtype = query.dtype
    layout, block_mask, kernel_options = _plan(n, config, block_size, options, query.device, dtype, d, compiled)
    pad = layout.seq_len - n
    select_key = select_value = None  # forced positions: no selection reads K/V
    if positions is None:
        select_key, select_value = key.detach(), value.detach()  # the selection reads K/V as given (before any cast)
    else:
        check_positions(positions, key, LrsaLayout.of(n, config, block_size))
        if layout.compact != positions.shape[-1]:  # entries for the padded partitions: seen by padding queries only
            positions = F.pad(positions, (0, layout.compact - positions.shape[-1]))
    cast = dtype != query.dtype or dtype != key.dtype or dtype != value.dtype
    if cast:
        query, key, value = (t.to(dtype) for t in (query, key, value))
    fused = compiled and options.fused
    if fused and pad:  # whole blocks before the region: one compilation per block count, not per N
        query = pad_rows(query, 0, pad)  # in the query's [B, N, H, d] order (`pad_queries`)
        key, value = (F.pad(t, (0, 0, 0, pad)) for t in (key, value))
    if select_key is not None and pad:
        if fused and not cast:  # the same padded K/V: one copy each, not two
            select_key, select_value = key.detach(), value.detach()
        else:
            select_key, select_value = (F.pad(t, (0, 0, 0, pad)) for t in (select_key, select_value))
    kept_of = None
    if return_kept:  # a device scalar in the region: it compiles once per block count, not once per N
        kept_of = torch.full((), n, dtype=torch.long, device=key.device) if fused else n
    args = (query, key, value, select_key, select_value, positions, block_mask, layout, config, scaling, gqa,
            kernel_options, kept_of)
    with torch.autocast(device_type, enabled=False):
        if fused:
            result = compiled_region()(*args)
        elif compiled:
            result = _attend(*args, flex=compiled_flex_attention(), select=compiled_compact_positions())
        else:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*flex_attention.*")  # "called without torch.compile"
                result = _attend(*args)
    out, kept = result if return_kept else (result, None)
    if fused:  # the region ran on whole blocks
        out = out[:, :, :n]
    return (out, kept[..., :config.retained_length(n)]) if return_kept else out
