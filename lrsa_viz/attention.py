"""LRSA inside a transformers model, through its attention and mask interfaces (no copied model code).

`enable_lrsa(model, config)` registers the attention implementation ``"lrsa"``: every attention layer computes
LagKV selections from its own post-RoPE K/V (no gradient) and attends with the LRSA mask of docs/METHOD.md §3.
`disable_lrsa` restores the previous implementation; `lrsa(model, config)` does both as a context manager.

Forced selections (``enable_lrsa(model, config, keep=...)``): a [layers, B, H_kv, N] bool tensor (what
`LagKVCache.kept_position_mask()` returns after chunked prefill) replaces the selections the layers would compute.
With the chunked run's selections forced, one parallel forward equals chunk-by-chunk prefill to float error
(docs/METHOD.md §3, "forced"); without them the two runs may differ at near-ties of the scores ("free").

No host sync inside a layer on CUDA: the checks that read data (NaN/inf scan) run on CPU tensors only, and what
the layers must know about the call (is the cache compressed? how many positions?) comes from the mask interface,
which transformers calls once per forward with plain Python integers.

Backends (``enable_lrsa(model, config, backend=...)``): ``"reference"`` builds the dense [Q, N] LRSA mask (teaching,
CPU); ``"flex"`` runs `lrsa_viz.fast.fast_lrsa_attention` (compact K/V + one FlexAttention call, no N x N mask) for
full-sequence calls; ``"auto"`` (default) picks ``"flex"`` for CUDA tensors and ``"reference"`` otherwise.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from .config import LagConfig
from .mask import visibility_from_keep
from .scoring import keep_mask

LRSA_IMPLEMENTATION = "lrsa"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_CONFIG_ATTR = "lrsa"  # model.config.lrsa: the LagConfig as a dict (saved with the model's config)
_PREVIOUS_ATTR = "lrsa_previous_attn_implementation"
_BACKEND_ATTR = "lrsa_backend"  # model.config.lrsa_backend: "auto" | "reference" | "flex"
_ABSENT = object()  # attention_state: "the model had no such attribute"
_FORCED_ATTR = "lrsa_forced_keep"  # attention module attribute: [B, H_kv, N] bool forced selections of its layer
BACKENDS = ("auto", "reference", "flex")
#: id(model config) -> (q_length, kv_length, kv_offset) of the model's current forward, set by the mask interface
#: (kept out of the config itself so that it is never saved with the model)
_CURRENT_CALL: dict[int, tuple] = {}


def resolve_backend(backend: str | None, device: torch.device | str) -> str:
    """The backend that runs on ``device``: ``"auto"`` means ``"flex"`` on CUDA and ``"reference"`` elsewhere."""
    backend = backend or "reference"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "flex" if torch.device(device).type == "cuda" else "reference"
    return backend


def check_right_padding(attention_mask: torch.Tensor | None) -> None:
    """Raise ValueError if a 2D padding mask [B, N] is not right-padded (LRSA partitions count from position 0)."""
    if attention_mask is None or attention_mask.ndim != 2:
        return
    m = attention_mask.to(torch.int8)
    if bool((m[:, 1:] > m[:, :-1]).any()):
        raise ValueError(
            "attention_mask: LRSA partitions are counted from the first position, so padded batches must be "
            "right-padded (tokenizer.padding_side = 'right'); got a mask with padding before real tokens"
        )


def lrsa_mask_interface(*args, attention_mask: torch.Tensor | None = None, **kwargs):
    """The causal + padding mask of transformers' SDPA path, after checking that padding is on the right."""
    if kwargs.get("q_length") == 0 or kwargs.get("batch_size") == 0:
        raise ValueError("input_ids / inputs_embeds: LRSA needs at least one sequence of at least one token, got an empty batch")
    check_right_padding(attention_mask)
    config, q_len, kv_len, kv_offset = kwargs.get("config"), kwargs.get("q_length"), kwargs.get("kv_length"), kwargs.get("kv_offset")
    q_offset = kwargs.get("q_offset")
    if config is not None and isinstance(q_offset, int) and isinstance(q_len, int):
        check_max_positions(config, q_offset + q_len, "position_ids")
    if config is not None:
        # kv_offset = tokens seen - tokens stored: > 0 means a compressing cache already applied the selections, and
        # the layers attend plainly over what it holds (read by `lrsa_attention_forward`, no device sync needed)
        _CURRENT_CALL[id(config)] = (q_len, kv_len, kv_offset)
    # flex backend, full sequence (no cache offset): no mask at all. Fast LRSA builds its own block mask, and right
    # padding needs none (a real token only sees earlier, hence real, tokens; padded positions attend to padding,
    # outputs nobody uses).
    backend = resolve_backend(getattr(config, _BACKEND_ATTR, None), kwargs.get("device", "cpu"))
    if backend == "flex" and q_len == kv_len and not kv_offset:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def lrsa_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention with the LRSA mask.

    Args:
        query: [B, H_q, Q, d]; key, value: [B, H_kv, N, d] post-RoPE, all N tokens so far (Q <= N).
        attention_mask: None or the bool [B, 1, Q, N] causal/padding mask from `lrsa_mask_interface`.
    Returns:
        ([B, Q, H_q, d], None), like transformers' SDPA attention.
    If the keys are fewer than the query positions imply, they come from a compressing `LagKVCache`, which
    has already applied the LRSA selection: plain attention over them is the LRSA result.
    With the flex backend, a full-sequence call (Q == N, no explicit mask) runs `lrsa_viz.fast.fast_lrsa_attention`;
    calls with a cache (Q < N: decoding, chunks) use the mask below, which is only [Q, N].
    """
    config = LagConfig.from_dict(getattr(module.config, _CONFIG_ATTR))
    q_len, kv_len = query.shape[2], key.shape[2]
    if _over_compressed_cache(module.config, q_len, kv_len, kwargs.get("position_ids")):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    forced = forced_keep_of_layer(module, key)  # [B, H_kv, kv_len] bool or None
    backend = resolve_backend(getattr(module.config, _BACKEND_ATTR, None), query.device)
    if backend == "flex" and q_len == kv_len and attention_mask is None:  # full sequence: no N x N mask
        if dropout:
            raise ValueError(f"dropout: backend='flex' has no attention dropout, got {dropout}; use backend='reference'")
        from .fast import fast_lrsa_attention

        compresses = forced is not None and config.num_partitions(kv_len) >= 2  # shorter: plain causal, nothing forced
        fill = None if compresses else prompt_fill_of(key)
        if fill is None:
            positions = forced_compact_positions(forced, config) if compresses else None
            out = fast_lrsa_attention(query, key, value, config, scaling=scaling, positions=positions)
        else:  # a static cache stores the prompt with this layer's selection, made once, in the attention's region
            out, kept = fast_lrsa_attention(query, key, value, config, scaling=scaling, return_kept=True)
            fill.store(kept)
        return out.transpose(1, 2).contiguous(), None
    with torch.no_grad():
        if forced is None:  # the NaN/inf scan reads the data: CPU only (a device sync per layer on CUDA)
            kept = keep_mask(key.detach(), value.detach(), config, check_finite="cpu")  # [B, H_kv, N]
        else:
            kept = forced
        q_pos = torch.arange(kv_len - q_len, kv_len, device=key.device)
        visible = visibility_from_keep(kept, config, q_pos)  # [B, H_kv, Q, N]
        visible = visible.repeat_interleave(query.shape[1] // key.shape[1], dim=1)  # GQA: a group shares its KV head
        if attention_mask is not None:
            visible = visible & attention_mask.bool()
    return sdpa_attention_forward(
        module, query, key, value, visible, dropout=dropout, scaling=scaling, is_causal=False, **kwargs
    )


def _over_compressed_cache(model_config, q_len: int, kv_len: int, position_ids: torch.Tensor | None) -> bool:
    """True when the keys come from a compressing cache that stores fewer tokens than it has seen.

    Read from what the mask interface recorded for this forward (plain integers, no device sync); only when it did
    not run (e.g. the caller passed a ready 4D mask) are the positions compared, which reads the device once.
    """
    call = _CURRENT_CALL.get(id(model_config))
    if call is not None and call[0] == q_len and call[1] == kv_len and isinstance(call[2], int):
        return call[2] > 0
    return position_ids is not None and int(position_ids[..., -1].max()) + 1 > kv_len


def forced_keep_of_layer(module: torch.nn.Module, key: torch.Tensor) -> torch.Tensor | None:
    """The forced selections of this attention layer cut to the keys present: [B, H_kv, kv_len] bool, or None."""
    forced = getattr(module, _FORCED_ATTR, None)
    if forced is None:
        return None
    b, h, kv_len = key.shape[0], key.shape[1], key.shape[2]
    if forced.shape[0] != b or forced.shape[1] != h or forced.shape[2] < kv_len:
        raise ValueError(
            f"keep: layer {getattr(module, 'layer_idx', '?')} was given selections for [B, H_kv, N] = "
            f"{tuple(forced.shape)}, but attends [B={b}, H_kv={h}] over {kv_len} keys (N must be >= the keys)"
        )
    return forced[..., :kv_len].to(key.device)


#: Attribute `attach_prompt_fill` sets on a key tensor.
_FILL_ATTR = "lrsa_prompt_fill"


def attach_prompt_fill(key: torch.Tensor, fill) -> None:
    """Ask the flex path to hand what it keeps of this key tensor [B, H_kv, N, d] to ``fill.store(kept)`` (kept:
    LongTensor [B, H_kv, eq. 12 of N] in cache-slot order, `lrsa_viz.fast.fast_lrsa_attention` with
    ``return_kept=True``). A `StaticLagKVCache` does this with the prompt, whose key tensor it hands back to the
    attention: the layer then selects once, inside the attention's compiled region, and the cache stores exactly
    the tokens the prefill attended to. Bound to that one tensor, so it cannot reach another layer or forward; the
    fill detaches itself (`detach_prompt_fill`) when it stores, and completes itself if no attention stored it.
    Not under torch.compile (an attribute on a traced tensor does not survive tracing)."""
    if torch.compiler.is_compiling():
        raise RuntimeError("attach_prompt_fill: not under torch.compile (the attribute would not survive tracing)")
    setattr(key, _FILL_ATTR, fill)


def prompt_fill_of(key: torch.Tensor):
    """The fill `attach_prompt_fill` recorded on this key tensor, or None."""
    return getattr(key, _FILL_ATTR, None)


def detach_prompt_fill(key: torch.Tensor) -> None:
    """Remove what `attach_prompt_fill` recorded (it refers back to the tensor: a cycle the garbage collector would
    otherwise have to find before the layer's K/V memory is freed)."""
    if hasattr(key, _FILL_ATTR):
        delattr(key, _FILL_ATTR)


def forced_compact_positions(kept: torch.Tensor, config: LagConfig) -> torch.Tensor:
    """Forced selections in the fast path's form: ascending positions of the sink and the selected tokens of the
    scored partitions, LongTensor [B, H_kv, S + (P - 1) k] (no device sync: a stable sort, not ``nonzero``)."""
    n = kept.shape[-1]
    p = config.num_partitions(n)
    scored_end = config.sink_size + (p - 1) * config.lag_size
    count = config.sink_size + (p - 1) * config.top_k
    dropped = (~kept[..., :scored_end]).to(torch.int8)  # 0 = kept: a stable ascending sort puts them first, in order
    return torch.sort(dropped, dim=-1, stable=True).indices[..., :count]


AttentionInterface.register(LRSA_IMPLEMENTATION, lrsa_attention_forward)
AttentionMaskInterface.register(LRSA_IMPLEMENTATION, lrsa_mask_interface)


def check_max_positions(model_config, seq_len: int, what: str = "sequence") -> None:
    """Raise ValueError if ``seq_len`` positions exceed the model's ``max_position_embeddings`` (RoPE was not
    trained there; transformers would only warn, and LRSA results would silently degrade)."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise ValueError(
            f"{what}: {seq_len} positions exceed the model's max_position_embeddings={limit}; "
            f"use at most {limit} tokens (truncate the context)"
        )


def check_supported(model: PreTrainedModel) -> None:
    """Raise ValueError unless ``model`` is a Llama-family causal LM that LRSA supports."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model: LRSA supports the model families {', '.join(SUPPORTED_MODEL_TYPES)} "
            f"(Llama, SmolLM2, Mistral, Qwen2); got model_type={model_type!r}"
        )


def attention_modules(model: PreTrainedModel) -> list[torch.nn.Module]:
    """The model's attention modules in layer order (those with a ``layer_idx`` and a ``k_proj``)."""
    found = [m for m in model.modules() if getattr(m, "layer_idx", None) is not None and hasattr(m, "k_proj")]
    return sorted(found, key=lambda m: m.layer_idx)


def check_forced_keep(keep: torch.Tensor, model: PreTrainedModel, config: LagConfig) -> None:
    """Raise ValueError unless ``keep`` is a [layers, B, H_kv, N] bool tensor that LagKV could have produced.

    Every row must keep the whole sink and exactly ``top_k`` tokens of each scored partition (what any same-budget
    policy of `LagKVCache` keeps); tokens after the scored partitions are seen through the lagging window anyway.
    One check per `enable_lrsa` call (it reads the tensor), never inside a layer.
    """
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.ndim != 4:
        got = f"{keep.dtype} tensor of shape {tuple(keep.shape)}" if isinstance(keep, torch.Tensor) else type(keep).__name__
        raise ValueError(f"keep must be a bool tensor [layers, B, H_kv, N] (LagKVCache.kept_position_mask()), got {got}")
    layers, h_kv = model.config.num_hidden_layers, model.config.num_key_value_heads
    if keep.shape[0] != layers or keep.shape[2] != h_kv or keep.shape[1] < 1 or keep.shape[3] < 1:
        raise ValueError(
            f"keep must be [layers={layers}, B >= 1, H_kv={h_kv}, N >= 1] for this model, got {tuple(keep.shape)}"
        )
    n, s, lag = keep.shape[3], config.sink_size, config.lag_size
    p = config.num_partitions(n)
    if not bool(keep[..., : min(s, n)].all()):
        raise ValueError(f"keep must keep the whole sink (positions 0..{s - 1}) in every layer, batch row and head")
    if p >= 2:
        counts = keep[..., s: s + (p - 1) * lag].reshape(*keep.shape[:3], p - 1, lag).sum(-1)
        if not bool((counts == config.top_k).all()):
            bad = (counts != config.top_k).nonzero()[0].tolist()
            raise ValueError(
                f"keep must keep exactly top_k = int(ratio * lag_size) = {config.top_k} tokens of every scored partition; "
                f"layer {bad[0]}, batch {bad[1]}, head {bad[2]}, partition {bad[3]} keeps "
                f"{int(counts[tuple(bad)])} (was it made with the same LagConfig?)"
            )


def enable_lrsa(model: PreTrainedModel, config: LagConfig | None = None, backend: str = "auto",
                keep: torch.Tensor | None = None) -> PreTrainedModel:
    """Make every attention layer of ``model`` use LRSA with ``config`` (default LagConfig()). Returns the model.

    ``backend``: ``"auto"`` (flex on CUDA, reference elsewhere), ``"reference"`` or ``"flex"`` (module docstring).
    ``keep``: optional forced selections, [layers, B, H_kv, N] bool (e.g. `LagKVCache.kept_position_mask()`), used
    instead of the selections each layer would compute, for inputs of B rows and at most N tokens; None computes them.
    """
    check_supported(model)
    config = config or LagConfig()
    if not isinstance(config, LagConfig):
        raise ValueError(f"config must be a LagConfig, got {type(config).__name__}")
    resolve_backend(backend, "cpu")  # validates the name
    if keep is not None:
        check_forced_keep(keep, model, config)
        keep = keep.to(next(model.parameters()).device)  # once here, not per layer and call
    if model.config._attn_implementation != LRSA_IMPLEMENTATION:
        setattr(model.config, _PREVIOUS_ATTR, model.config._attn_implementation or "sdpa")
    setattr(model.config, _CONFIG_ATTR, config.to_dict())
    setattr(model.config, _BACKEND_ATTR, backend)
    for module in attention_modules(model):
        setattr(module, _FORCED_ATTR, None if keep is None else keep[module.layer_idx])
    model.set_attn_implementation(LRSA_IMPLEMENTATION)
    return model


def forced_keep_of(model: PreTrainedModel) -> torch.Tensor | None:
    """The forced selections the model runs with ([layers, B, H_kv, N] bool), or None."""
    kept = [getattr(m, _FORCED_ATTR, None) for m in attention_modules(model)]
    return None if not kept or kept[0] is None else torch.stack(kept)


def disable_lrsa(model: PreTrainedModel) -> PreTrainedModel:
    """Undo `enable_lrsa`: restore the attention implementation the model had before."""
    if model.config._attn_implementation == LRSA_IMPLEMENTATION:
        model.set_attn_implementation(getattr(model.config, _PREVIOUS_ATTR, "sdpa"))
    for attr in (_CONFIG_ATTR, _PREVIOUS_ATTR, _BACKEND_ATTR):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    for module in attention_modules(model):
        if hasattr(module, _FORCED_ATTR):
            delattr(module, _FORCED_ATTR)
    _CURRENT_CALL.pop(id(model.config), None)
    return model


def attention_state(model: PreTrainedModel, extra_attrs: Sequence[str] = ()) -> dict:
    """A snapshot of what `enable_lrsa` (and modes built on it, named by ``extra_attrs``: their model.config
    attributes) change on ``model``: the attention implementation, those config attributes, the forced selections.
    `restore_attention_state` puts it back, whatever was enabled in between."""
    attrs = (_CONFIG_ATTR, _PREVIOUS_ATTR, _BACKEND_ATTR, *extra_attrs)
    return {"implementation": model.config._attn_implementation,
            "attrs": {a: getattr(model.config, a, _ABSENT) for a in attrs},
            "forced": [getattr(m, _FORCED_ATTR, None) for m in attention_modules(model)]}


def restore_attention_state(model: PreTrainedModel, state: dict) -> PreTrainedModel:
    """Put back an `attention_state` snapshot. Returns the model."""
    for attr, value in state["attrs"].items():
        if value is _ABSENT:
            if hasattr(model.config, attr):
                delattr(model.config, attr)
        else:
            setattr(model.config, attr, value)
    for module, forced in zip(attention_modules(model), state["forced"]):
        if forced is not None:
            setattr(module, _FORCED_ATTR, forced)
        elif hasattr(module, _FORCED_ATTR):
            delattr(module, _FORCED_ATTR)
    if model.config._attn_implementation != state["implementation"]:
        model.set_attn_implementation(state["implementation"])
    _CURRENT_CALL.pop(id(model.config), None)
    return model


def lrsa_config_of(model: PreTrainedModel) -> LagConfig | None:
    """The LagConfig the model runs with, or None when LRSA is off."""
    if model.config._attn_implementation != LRSA_IMPLEMENTATION:
        return None
    return LagConfig.from_dict(getattr(model.config, _CONFIG_ATTR))


def lrsa_backend_of(model: PreTrainedModel, resolved: bool = False) -> str | None:
    """The backend the model runs LRSA with, or None when LRSA is off.

    ``resolved=False``: the name it was enabled with (``"auto"``, ``"reference"``, ``"flex"``). ``resolved=True``: what
    runs on the model's device and dtype: ``"reference"``, ``"flex/flash"`` (FlashAttention-4 tiles) or
    ``"flex/triton"`` (`lrsa_viz.fast.kernel.flex_kernel_backend`).
    """
    if model.config._attn_implementation != LRSA_IMPLEMENTATION:
        return None
    name = getattr(model.config, _BACKEND_ATTR, "reference")
    if not resolved:
        return name
    param = next(model.parameters())
    name = resolve_backend(name, param.device)
    if name == "reference":
        return name
    from .fast.kernel import flex_kernel_backend

    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    return "flex/" + flex_kernel_backend(param.device, param.dtype, head_dim)


@contextlib.contextmanager
def lrsa(model: PreTrainedModel, config: LagConfig | None = None, backend: str = "auto",
         keep: torch.Tensor | None = None) -> Iterator[PreTrainedModel]:
    """``with lrsa(model, cfg): ...`` runs the block with LRSA on and restores the previous state after.

    ``keep``: forced selections (see `enable_lrsa`), e.g. ``with lrsa(model, cfg, keep=cache.kept_position_mask())``.
    """
    check_supported(model)
    previous = attention_state(model)
    enable_lrsa(model, config, backend, keep)
    try:
        yield model
    finally:
        restore_attention_state(model, previous)
