"""Hostile input across the public API: every bad input gets a clear error naming the parameter (or a documented
warning), never NaN, a silent fallback or a hang. The data loader and CLIs have their own section below."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lrsa_viz import (LagConfig, LagKVCache, chunked_prefill, compress_once, compressed_generate, enable_lrsa,
                      keep_mask, lagkv_keep_indices, lagkv_scores, load_model, lrsa, lrsa_visibility, tiny_model)
from lrsa_viz.cache import LagKVLayer

CFG = LagConfig(2, 4, 0.5)


def kv(n=30, b=1, h=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, n, d, generator=g), torch.randn(b, h, n, d, generator=g)


@pytest.fixture
def small_positions_model():
    """A tiny Llama whose RoPE is only trained for 64 positions."""
    model = tiny_model(seed=1)
    model.config.max_position_embeddings = 64
    return model


# --- NaN / inf in keys and values: a ValueError that says where, for every entry point that scores -------------

NON_FINITE = [float("nan"), float("inf"), float("-inf")]


@pytest.mark.parametrize("bad", NON_FINITE)
@pytest.mark.parametrize("which", ["keys", "values"])
@pytest.mark.parametrize(
    "entry",
    [lagkv_scores, lagkv_keep_indices, keep_mask, lrsa_visibility, compress_once],
    ids=lambda f: f.__name__,
)
def test_non_finite_keys_values_raise(entry, which, bad):
    keys, values = kv()
    target = keys if which == "keys" else values
    target[0, 1, 13, 3] = bad
    with pytest.raises(ValueError, match=rf"{which} contain NaN or inf \(first at batch 0, head 1, position 13\)"):
        entry(keys, values, CFG)


def test_non_finite_in_cache_update_raises():
    keys, values = kv()
    layer = LagKVLayer(CFG)
    layer.update(keys[:, :, :20], values[:, :, :20])
    values[0, 0, 25, 0] = float("nan")
    with pytest.raises(ValueError, match="values contain NaN or inf"):
        layer.update(keys[:, :, 20:], values[:, :, 20:])


def test_non_finite_model_input_under_lrsa_raises_not_nan(tiny):
    """Dense attention turns a NaN embedding into NaN logits silently; LRSA names the problem instead."""
    embeds = tiny.model.embed_tokens(torch.zeros(1, 30, dtype=torch.long)).detach().clone()
    embeds[0, 5, 0] = float("nan")
    with torch.no_grad():
        assert not torch.isfinite(tiny(inputs_embeds=embeds).logits).all()  # the dense behaviour we improve on
        with lrsa(tiny, CFG), pytest.raises(ValueError, match="keys contain NaN or inf .* position 5"):
            tiny(inputs_embeds=embeds)


def test_finite_extremes_are_fine():
    """Huge but finite values and constant channels give finite scores and a full-size selection."""
    keys, values = kv()
    keys[..., 0] = 1e30
    values[..., 1] = -3.0
    assert torch.isfinite(lagkv_scores(keys, values, CFG)).all()
    assert lagkv_keep_indices(keys, values, CFG).shape[-1] == CFG.retained_length(30)


# --- wrong ranks, shapes and dtypes ----------------------------------------------------------------------------

BAD_TENSORS = [
    (torch.randn(2, 10, 4), torch.randn(2, 10, 4), "keys must have 4 dimensions"),
    (torch.randn(1, 1, 2, 10, 4), torch.randn(1, 1, 2, 10, 4), "keys must have 4 dimensions"),
    (torch.randn(1, 2, 10, 4), torch.randn(1, 2, 11, 4), "same shape"),
    (torch.randn(1, 2, 10, 4), torch.randn(1, 3, 10, 4), "same shape"),
    (torch.randint(0, 3, (1, 1, 10, 4)), torch.randn(1, 1, 10, 4), "keys must be a floating-point tensor"),
    (torch.randn(1, 1, 10, 4), torch.ones(1, 1, 10, 4, dtype=torch.bool), "values must be a floating-point tensor"),
    (torch.randn(1, 1, 10, 1), torch.randn(1, 1, 10, 1), "head dim d must be >= 2"),
    (np.zeros((1, 1, 10, 4)), torch.randn(1, 1, 10, 4), "keys must be a torch.Tensor"),
]


@pytest.mark.parametrize("keys, values, match", BAD_TENSORS)
@pytest.mark.parametrize("entry", [lagkv_scores, lrsa_visibility, compress_once], ids=lambda f: f.__name__)
def test_bad_tensors_everywhere(entry, keys, values, match):
    with pytest.raises(ValueError, match=match):
        entry(keys, values, CFG)


def test_cache_update_rejects_inconsistent_states():
    keys, values = kv()
    layer = LagKVLayer(CFG)
    layer.update(keys, values)
    with pytest.raises(ValueError, match="key_states: shape .* does not continue the cached"):
        layer.update(torch.randn(1, 3, 5, 8), torch.randn(1, 3, 5, 8))  # another number of KV heads
    with pytest.raises(ValueError, match="does not continue"):
        layer.update(torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16))  # another head dim
    with pytest.raises(ValueError, match="same shape"):
        layer.update(torch.randn(1, 2, 5, 8), torch.randn(1, 2, 6, 8))  # keys and values disagree
    assert layer.stored_length() == CFG.retained_length(30) and layer.get_seq_length() == 30, "state untouched"


@pytest.mark.parametrize("config", ["lagkv", {"sink_size": 2}, 0.25])
def test_cache_rejects_non_config(config):
    with pytest.raises(ValueError, match="config must be a LagConfig or None"):
        LagKVCache(config)


# --- LagConfig: the accepted ranges --------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sink_size=-1), "sink_size must be >= 0"),
        (dict(lag_size=0), "lag_size must be >= 1"),
        (dict(sink_size=4.0), "sink_size must be an integer"),
        (dict(lag_size=True), "lag_size must be an integer"),
        (dict(ratio=0.0), r"ratio must be in \(0, 1\]"),
        (dict(ratio=1.5), r"ratio must be in \(0, 1\]"),
        (dict(ratio=float("nan")), "ratio must be a finite number"),
        (dict(ratio="0.25"), "ratio must be a finite number"),
        (dict(lag_size=8, ratio=0.1), r"use ratio >= 0.125 for lag_size=8"),
        (dict(score_v_ratio=-1.0), "score_v_ratio must be a finite number >= 0"),
        (dict(score_v_ratio=float("inf")), "score_v_ratio must be a finite number >= 0"),
    ],
)
def test_lag_config_ranges(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LagConfig(**kwargs)


def test_lag_config_accepts_numpy_numbers_as_plain_python():
    cfg = LagConfig(np.int64(4), np.int32(8), np.float32(0.25), np.float64(1.0))
    assert cfg == LagConfig(4, 8, 0.25, 1.0)
    assert type(cfg.sink_size) is int and type(cfg.ratio) is float  # JSON-serialisable, hashable like the plain one
    with pytest.raises(ValueError, match="unknown LagConfig field"):
        LagConfig.from_dict({"sink": 4})
    with pytest.raises(ValueError, match="seq_len must be >= 0"):
        cfg.retained_length(-1)


# --- model inputs: empty, wrong dtype, out of vocabulary, beyond the model's positions ---------------------------

@pytest.mark.parametrize(
    "ids, match",
    [
        (torch.zeros(1, 0, dtype=torch.long), r"input_ids must be a \[B, N\] tensor with B >= 1 and N >= 1, got \(1, 0\)"),
        (torch.zeros(0, 10, dtype=torch.long), r"B >= 1 and N >= 1, got \(0, 10\)"),
        (torch.zeros(10, dtype=torch.long), r"\[B, N\] tensor"),
        ([[1, 2, 3]], r"\[B, N\] tensor .* got list"),
        (torch.zeros(1, 10), "input_ids must hold integer token ids, got dtype torch.float32"),
        (torch.full((1, 10), 256), r"token ids in \[0, vocab_size=256\), got values from 256 to 256"),
        (torch.full((1, 10), -1), r"token ids in \[0, vocab_size=256\)"),
    ],
)
@pytest.mark.parametrize("entry", [chunked_prefill, compressed_generate], ids=lambda f: f.__name__)
def test_bad_input_ids(tiny, entry, ids, match):
    with pytest.raises(ValueError, match=match):
        entry(tiny, ids, CFG)


@pytest.mark.parametrize("entry", [chunked_prefill, compressed_generate], ids=lambda f: f.__name__)
@pytest.mark.parametrize("config", [None, {"sink_size": 2}])
def test_prefill_needs_a_lag_config(tiny, entry, config):
    with pytest.raises(ValueError, match="config must be a LagConfig"):
        entry(tiny, torch.zeros(1, 10, dtype=torch.long), config)


def test_empty_input_under_lrsa(tiny):
    with torch.no_grad(), lrsa(tiny, CFG), pytest.raises(ValueError, match="LRSA needs at least one sequence"):
        tiny(torch.zeros(1, 0, dtype=torch.long))


def test_beyond_max_positions_is_an_error(small_positions_model):
    model = small_positions_model
    ok = torch.zeros(1, 64, dtype=torch.long)
    too_long = torch.zeros(1, 65, dtype=torch.long)
    with pytest.raises(ValueError, match="input_ids: 65 positions exceed the model's max_position_embeddings=64"):
        chunked_prefill(model, too_long, CFG)
    assert chunked_prefill(model, ok, CFG)[0].shape == (1, 64, 256), "exactly the limit is fine"
    with torch.no_grad(), lrsa(model, CFG):
        assert torch.isfinite(model(ok).logits).all()
        with pytest.raises(ValueError, match="position_ids: 65 positions exceed .*max_position_embeddings=64"):
            model(too_long)
    kw = dict(do_sample=False, pad_token_id=0)
    with pytest.raises(ValueError, match="input_ids \\+ max_new_tokens: 70 positions exceed"):
        compressed_generate(model, torch.zeros(1, 60, dtype=torch.long), CFG, max_new_tokens=10, **kw)
    assert compressed_generate(model, torch.zeros(1, 60, dtype=torch.long), CFG, max_new_tokens=4, **kw).shape == (1, 64)


def test_decode_past_max_positions_under_lrsa(small_positions_model):
    """Token-by-token decoding through the LRSA attention crosses the limit: the step that crosses it fails."""
    model = small_positions_model
    with torch.no_grad(), lrsa(model, CFG):
        out = model(torch.zeros(1, 63, dtype=torch.long), use_cache=True)
        out = model(torch.zeros(1, 1, dtype=torch.long), past_key_values=out.past_key_values, use_cache=True)
        with pytest.raises(ValueError, match="position_ids: 65 positions exceed"):
            model(torch.zeros(1, 1, dtype=torch.long), past_key_values=out.past_key_values, use_cache=True)


# --- unsupported model families and missing models ----------------------------------------------------------

def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, bos_token_id=0, eos_token_id=0))


@pytest.mark.parametrize(
    "call",
    [
        lambda m: enable_lrsa(m, CFG),
        lambda m: lrsa(m, CFG).__enter__(),
        lambda m: chunked_prefill(m, torch.zeros(1, 30, dtype=torch.long), CFG),
        lambda m: compressed_generate(m, torch.zeros(1, 30, dtype=torch.long), CFG, max_new_tokens=2),
    ],
    ids=["enable_lrsa", "lrsa", "chunked_prefill", "compressed_generate"],
)
@pytest.mark.parametrize("model_factory", [gpt2, lambda: None, lambda: object()], ids=["gpt2", "None", "object"])
def test_unsupported_model_names_the_supported_ones(model_factory, call):
    with pytest.raises(ValueError, match=r"LRSA supports the model families llama, mistral, qwen2 .* got model_type="):
        call(model_factory())


@pytest.mark.parametrize("path, match", [
    ("/nonexistent/model.gguf", "GGUF file /nonexistent/model.gguf does not exist"),
    ("/nonexistent/model_dir", "model directory /nonexistent/model_dir does not exist"),
    ("./no_such_model", "model directory ./no_such_model does not exist"),
])
def test_missing_model_paths(path, match):
    with pytest.raises(FileNotFoundError, match=match):
        load_model(path, device="cpu")
