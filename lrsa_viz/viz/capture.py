"""Capture the per-layer post-RoPE keys, values (and optionally queries) of one real model run over one text.

The K/V of layer 0 depend only on the input, but the K/V of every layer >= 1 depend on the attention of the
layers below, hence on the mask: `capture_kv(..., config=cfg)` runs the model under ``lrsa(model, cfg)`` (what an
LRSA model computes), `capture_kv(..., config=None)` runs it with plain dense causal attention. Both read the
states from a transformers ``DynamicCache`` (``cache.layers[i].keys`` / ``.values``: exactly what a KV cache
stores, after RoPE).

Shapes: n_layers captured layers, H_kv KV heads, H_q query heads, N tokens, d head dim.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Sequence

import torch
from transformers import DynamicCache, PreTrainedModel

from ..attention import attention_state, disable_lrsa, enable_lrsa, lrsa_backend_of, restore_attention_state
from ..config import LagConfig
from ..policies import post_rope_queries
from ..scoring import keep_mask, lagkv_scores


@dataclasses.dataclass
class KVCapture:
    """The states of one model run over one text (batch of one), on CPU in float32.

    Attributes:
        keys, values: [n_layers, H_kv, N, d] post-RoPE, as stored in a KV cache.
        layer_ids: the model layer index of each captured row (``keys[i]`` is model layer ``layer_ids[i]``).
        token_ids: LongTensor [N].
        tokens: the text of each token (``tokenizer.decode([id])``), N strings.
        config: the LagConfig of the LRSA mask the forward ran with, or None for dense causal attention.
        queries: {model layer index: [H_q, N, d] post-RoPE queries} for the layers asked for (often none).
        scaling: the attention scale (head_dim ** -0.5 for the Llama family).
    """

    keys: torch.Tensor
    values: torch.Tensor
    layer_ids: list[int]
    token_ids: torch.Tensor
    tokens: list[str]
    config: LagConfig | None
    queries: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    scaling: float = 1.0

    @property
    def n_tokens(self) -> int:
        return self.keys.shape[2]

    @property
    def n_layers(self) -> int:
        return self.keys.shape[0]

    @property
    def n_kv_heads(self) -> int:
        return self.keys.shape[1]

    @property
    def source(self) -> str:
        """A one-line description of which forward produced the states (for figure titles and UIs)."""
        if self.config is None:
            return "K/V of a dense (causal) forward"
        c = self.config
        return f"K/V of an LRSA forward (S={c.sink_size}, L={c.lag_size}, r={c.ratio:g})"

    def row(self, layer: int) -> int:
        """Row of ``keys``/``values`` that holds model layer ``layer``; ValueError if it was not captured."""
        if layer not in self.layer_ids:
            raise ValueError(f"layer must be one of the captured layers {self.layer_ids}, got {layer!r}")
        return self.layer_ids.index(layer)

    def scores(self, config: LagConfig) -> torch.Tensor:
        """LagKV scores of every captured layer: [n_layers, H_kv, P - 1, L] float32 (`lagkv_scores`)."""
        return lagkv_scores(self.keys, self.values, config)

    def keep_mask(self, config: LagConfig) -> torch.Tensor:
        """One-shot LagKV keep mask of every captured layer: [n_layers, H_kv, N] bool (`keep_mask`)."""
        return keep_mask(self.keys, self.values, config)


@contextlib.contextmanager
def attention_mode(model: PreTrainedModel, config: LagConfig | None) -> Iterator[PreTrainedModel]:
    """Run a block with the LRSA mask of ``config`` (or dense attention if None), selections computed by each layer;
    restore the model's state after (its previous LRSA config, backend and forced selections, or dense attention)."""
    previous = attention_state(model)
    backend = lrsa_backend_of(model)
    if config is None:
        disable_lrsa(model)
    else:
        enable_lrsa(model, config, **({"backend": backend} if backend else {}))
    try:
        yield model
    finally:
        restore_attention_state(model, previous)


def token_strings(tokenizer, token_ids: Sequence[int] | torch.Tensor) -> list[str]:
    """The decoded text of each token id (so that joining them gives back the text, for byte-level BPE)."""
    ids = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else list(token_ids)
    return [tokenizer.decode([i]) for i in ids]


def _query_hook(store: dict[int, torch.Tensor], layer: int):
    """A forward hook on an attention module that recomputes and stores its post-RoPE queries [H_q, N, d]."""

    def hook(module, args, kwargs, output):
        store[layer] = post_rope_queries(module, args, kwargs)[0].detach().float().cpu()

    return hook


def _check_layers(layers: Sequence[int] | None, n_model_layers: int, name: str) -> list[int]:
    """Validate a list of distinct layer indices (None = all layers)."""
    if layers is None:
        return list(range(n_model_layers))
    out = [int(x) for x in layers]
    if not out or len(set(out)) != len(out) or any(not 0 <= x < n_model_layers for x in out):
        raise ValueError(f"{name} must be distinct layer indices in [0, {n_model_layers - 1}], got {list(layers)}")
    return out


@torch.no_grad()
def capture_kv(
    model: PreTrainedModel,
    tokenizer,
    text: str | torch.Tensor,
    config: LagConfig | None = None,
    *,
    layers: Sequence[int] | None = None,
    max_tokens: int | None = None,
    query_layers: Sequence[int] = (),
) -> KVCapture:
    """Run ``model`` once over ``text`` and capture what its KV cache stores.

    Args:
        tokenizer: the model's tokenizer (may be None when ``text`` is token ids: tokens are then shown as ``<id>``).
        text: a string (tokenised without special tokens) or token ids [N] / [1, N].
        config: run under the LRSA mask of this config (the K/V an LRSA model computes), or None for dense attention.
        layers: model layers to keep (default all); all layers run either way.
        max_tokens: cut the input to its first ``max_tokens`` tokens (>= 1).
        query_layers: layers whose post-RoPE queries to keep too (for attention maps; [H_q, N, d] each).
    Returns:
        A `KVCapture` with keys/values [n_layers, H_kv, N, d] float32 on CPU.
    """
    if config is not None and not isinstance(config, LagConfig):
        raise ValueError(f"config must be a LagConfig or None (dense attention), got {type(config).__name__}")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"max_tokens must be an integer >= 1 or None, got {max_tokens!r}")
    if isinstance(text, str):
        if tokenizer is None:
            raise ValueError("tokenizer is required when text is a string (pass token ids to go without one)")
        if not text:
            raise ValueError("text must be a non-empty string")
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    elif isinstance(text, torch.Tensor) and text.dtype == torch.long and (text.ndim == 1 or text.shape[0] == 1):
        ids = text.reshape(-1)
    else:
        raise ValueError("text must be a string or a LongTensor of token ids of shape [N] or [1, N]")
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.numel() == 0:
        raise ValueError("text must give at least one token")
    n_model_layers = model.config.num_hidden_layers
    layer_ids = _check_layers(layers, n_model_layers, "layers")
    query_ids = _check_layers(query_layers, n_model_layers, "query_layers") if query_layers else []

    attn_modules = [layer.self_attn for layer in model.model.layers]
    queries: dict[int, torch.Tensor] = {}
    handles = [attn_modules[i].register_forward_hook(_query_hook(queries, i), with_kwargs=True) for i in query_ids]
    cache = DynamicCache(config=model.config)
    device = next(model.parameters()).device
    try:
        with attention_mode(model, config):
            model(ids[None].to(device), past_key_values=cache, use_cache=True)
    finally:
        for h in handles:
            h.remove()
    keys = torch.stack([cache.layers[i].keys[0].float().cpu() for i in layer_ids])
    values = torch.stack([cache.layers[i].values[0].float().cpu() for i in layer_ids])
    return KVCapture(
        keys=keys, values=values, layer_ids=layer_ids, token_ids=ids.cpu(), tokens=token_strings(tokenizer, ids) if tokenizer is not None else [f"<{i}>" for i in ids.tolist()],
        config=config, queries=queries, scaling=float(attn_modules[0].scaling),
    )
