"""LRSA inside a transformers model, through its attention and mask interfaces (no copied model code).

`enable_lrsa(model, config)` registers the attention implementation ``"lrsa"``: every attention layer computes
LagKV selections from its own post-RoPE K/V (no gradient) and attends with the LRSA mask of METHOD.md §3.
`disable_lrsa` restores the previous implementation; `lrsa(model, config)` does both as a context manager.

Backends (``enable_lrsa(model, config, backend=...)``): ``"reference"`` builds the dense [Q, N] LRSA mask (teaching,
CPU); ``"flex"`` runs `lrsa_viz.fast.fast_lrsa_attention` (compact K/V + one FlexAttention call, no N x N mask) for
full-sequence calls; ``"auto"`` (default) picks ``"flex"`` for CUDA tensors and ``"reference"`` otherwise.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

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
BACKENDS = ("auto", "reference", "flex")


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
    # flex backend, full sequence (no cache offset): no mask at all. Fast LRSA builds its own block mask, and right
    # padding needs none (a real token only sees earlier, hence real, tokens; padded positions attend to padding,
    # outputs nobody uses).
    backend = resolve_backend(getattr(kwargs.get("config"), _BACKEND_ATTR, None), kwargs.get("device", "cpu"))
    if backend == "flex" and kwargs.get("q_length") == kwargs.get("kv_length") and not kwargs.get("kv_offset"):
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
    position_ids = kwargs.get("position_ids")
    check_max_positions(module.config, int(position_ids.max()) + 1 if position_ids is not None else kv_len, "position_ids")
    if position_ids is not None and int(position_ids[..., -1].max()) + 1 > kv_len:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    backend = resolve_backend(getattr(module.config, _BACKEND_ATTR, None), query.device)
    if backend == "flex" and q_len == kv_len and attention_mask is None:  # full sequence: no N x N mask
        if dropout:
            raise ValueError(f"dropout: backend='flex' has no attention dropout, got {dropout}; use backend='reference'")
        from .fast import fast_lrsa_attention

        return fast_lrsa_attention(query, key, value, config, scaling=scaling).transpose(1, 2).contiguous(), None
    with torch.no_grad():
        kept = keep_mask(key.detach(), value.detach(), config)  # [B, H_kv, N]
        q_pos = torch.arange(kv_len - q_len, kv_len, device=key.device)
        visible = visibility_from_keep(kept, config, q_pos)  # [B, H_kv, Q, N]
        visible = visible.repeat_interleave(query.shape[1] // key.shape[1], dim=1)  # GQA: a group shares its KV head
        if attention_mask is not None:
            visible = visible & attention_mask.bool()
    return sdpa_attention_forward(
        module, query, key, value, visible, dropout=dropout, scaling=scaling, is_causal=False, **kwargs
    )


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


def enable_lrsa(model: PreTrainedModel, config: LagConfig | None = None, backend: str = "auto") -> PreTrainedModel:
    """Make every attention layer of ``model`` use LRSA with ``config`` (default LagConfig()). Returns the model.

    ``backend``: ``"auto"`` (flex on CUDA, reference elsewhere), ``"reference"`` or ``"flex"`` (module docstring).
    """
    check_supported(model)
    config = config or LagConfig()
    if not isinstance(config, LagConfig):
        raise ValueError(f"config must be a LagConfig, got {type(config).__name__}")
    resolve_backend(backend, "cpu")  # validates the name
    if model.config._attn_implementation != LRSA_IMPLEMENTATION:
        setattr(model.config, _PREVIOUS_ATTR, model.config._attn_implementation or "sdpa")
    setattr(model.config, _CONFIG_ATTR, config.to_dict())
    setattr(model.config, _BACKEND_ATTR, backend)
    model.set_attn_implementation(LRSA_IMPLEMENTATION)
    return model


def disable_lrsa(model: PreTrainedModel) -> PreTrainedModel:
    """Undo `enable_lrsa`: restore the attention implementation the model had before."""
    if model.config._attn_implementation == LRSA_IMPLEMENTATION:
        model.set_attn_implementation(getattr(model.config, _PREVIOUS_ATTR, "sdpa"))
    for attr in (_CONFIG_ATTR, _PREVIOUS_ATTR, _BACKEND_ATTR):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    return model


def lrsa_config_of(model: PreTrainedModel) -> LagConfig | None:
    """The LagConfig the model runs with, or None when LRSA is off."""
    if model.config._attn_implementation != LRSA_IMPLEMENTATION:
        return None
    return LagConfig.from_dict(getattr(model.config, _CONFIG_ATTR))


def lrsa_backend_of(model: PreTrainedModel) -> str | None:
    """The backend name the model runs LRSA with (``"auto"``, ``"reference"``, ``"flex"``), or None when LRSA is off."""
    if model.config._attn_implementation != LRSA_IMPLEMENTATION:
        return None
    return getattr(model.config, _BACKEND_ATTR, "reference")


@contextlib.contextmanager
def lrsa(model: PreTrainedModel, config: LagConfig | None = None, backend: str = "auto") -> Iterator[PreTrainedModel]:
    """``with lrsa(model, cfg): ...`` runs the block with LRSA on and restores the previous state after."""
    check_supported(model)
    previous, previous_backend = lrsa_config_of(model), lrsa_backend_of(model)
    enable_lrsa(model, config, backend)
    try:
        yield model
    finally:
        if previous is None:
            disable_lrsa(model)
        else:
            enable_lrsa(model, previous, previous_backend)
