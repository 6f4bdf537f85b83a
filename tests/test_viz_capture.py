"""capture_kv: the states it returns are those of the model's KV cache under the requested mask, and the
queries it recomputes reproduce the model's own attention (dense and LRSA)."""
import pytest
import torch
from transformers import DynamicCache

from lrsa_viz import (LagConfig, chunked_prefill, enable_lrsa, disable_lrsa, keep_mask, lrsa, lrsa_config_of,
                      lrsa_visibility)
from lrsa_viz.attention import forced_keep_of
from lrsa_viz.viz import attention_probabilities, capture_kv

CFG = LagConfig(2, 8, 0.25)


def ids_of(n, seed=0):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


def test_dense_capture_is_the_dynamic_cache(tiny):
    ids = ids_of(60)
    cap = capture_kv(tiny, None, ids)
    cache = DynamicCache(config=tiny.config)
    with torch.no_grad():
        tiny(ids[None], past_key_values=cache, use_cache=True)
    assert cap.keys.shape == (2, 2, 60, 16) and cap.config is None and cap.layer_ids == [0, 1]
    for layer in range(2):
        assert torch.equal(cap.keys[layer], cache.layers[layer].keys[0])
        assert torch.equal(cap.values[layer], cache.layers[layer].values[0])
    assert cap.tokens[:2] == [f"<{int(ids[0])}>", f"<{int(ids[1])}>"]
    assert "dense" in cap.source


def test_lrsa_capture_differs_above_layer_zero_and_restores_model(tiny):
    ids = ids_of(60, 1)
    dense = capture_kv(tiny, None, ids)
    sparse = capture_kv(tiny, None, ids, CFG)
    assert torch.allclose(dense.keys[0], sparse.keys[0], atol=1e-6), "layer 0 K/V depend on the input only"
    assert (dense.keys[1] - sparse.keys[1]).abs().max() > 1e-3, "layer 1 K/V depend on the mask of layer 0"
    assert lrsa_config_of(tiny) is None
    with lrsa(tiny, CFG):
        cache = DynamicCache(config=tiny.config)
        with torch.no_grad():
            tiny(ids[None], past_key_values=cache, use_cache=True)
    assert torch.equal(sparse.keys[1], cache.layers[1].keys[0])
    # a model that runs LRSA with another config keeps it after a dense capture
    enable_lrsa(tiny, LagConfig(1, 4, 0.5), backend="reference")
    try:
        again = capture_kv(tiny, None, ids)
        assert torch.equal(again.keys, dense.keys)
        assert lrsa_config_of(tiny) == LagConfig(1, 4, 0.5) and tiny.config.lrsa_backend == "reference"
        other = capture_kv(tiny, None, ids, CFG)
        assert torch.equal(other.keys, sparse.keys)
        assert lrsa_config_of(tiny) == LagConfig(1, 4, 0.5) and tiny.config.lrsa_backend == "reference"
    finally:
        disable_lrsa(tiny)


def test_capture_restores_forced_selections(tiny):
    """A capture inside ``lrsa(model, cfg, keep=...)`` runs with its own selections and gives the forced ones back."""
    ids = ids_of(60, 2)
    _, cache = chunked_prefill(tiny, ids[None], CFG)
    keep = cache.kept_position_mask()
    other = keep.clone()  # another valid selection: swap one kept and one evicted token of a scored partition
    part = slice(CFG.sink_size, CFG.sink_size + CFG.lag_size)
    kept_at = other[0, 0, 0, part].nonzero()[0].item() + CFG.sink_size
    out_at = (~other[0, 0, 0, part]).nonzero()[0].item() + CFG.sink_size
    other[0, 0, 0, kept_at], other[0, 0, 0, out_at] = False, True
    with lrsa(tiny, CFG, backend="reference", keep=other):
        free = capture_kv(tiny, None, ids, CFG)
        assert torch.equal(forced_keep_of(tiny), other), "the forced selections are back after the capture"
        assert tiny.config.lrsa_backend == "reference"
    assert forced_keep_of(tiny) is None and lrsa_config_of(tiny) is None
    assert torch.equal(free.keys, capture_kv(tiny, None, ids, CFG).keys), "the capture computed its own selections"


def test_capture_layers_and_keep_mask(tiny):
    ids = ids_of(50, 2)
    cap = capture_kv(tiny, None, ids, CFG, layers=[1], max_tokens=45)
    assert cap.keys.shape == (1, 2, 45, 16) and cap.layer_ids == [1] and cap.row(1) == 0
    kept = cap.keep_mask(CFG)
    assert torch.equal(kept, keep_mask(cap.keys, cap.values, CFG))
    assert kept.sum(-1).eq(CFG.retained_length(45)).all()
    with pytest.raises(ValueError, match="captured layers"):
        cap.row(0)


def _o_proj_inputs(model, ids, layer):
    """The attention output of ``layer`` before o_proj: [H_q, N, d]."""
    store = {}
    attn = model.model.layers[layer].self_attn
    handle = attn.o_proj.register_forward_pre_hook(lambda m, args: store.setdefault("x", args[0].detach()))
    try:
        with torch.no_grad():
            model(ids[None])
    finally:
        handle.remove()
    n = ids.numel()
    return store["x"][0].reshape(n, -1, attn.head_dim).transpose(0, 1)


@pytest.mark.parametrize("config", [None, CFG])
def test_captured_queries_reproduce_the_model_attention(tiny, config):
    """softmax(q k^T) @ v over the visible keys, from captured states, equals the model's attention output."""
    ids = ids_of(70, 3)
    cap = capture_kv(tiny, None, ids, config, query_layers=[1])
    q, k, v = cap.queries[1], cap.keys[1], cap.values[1]  # [4, N, d], [2, N, d], [2, N, d]
    assert q.shape == (4, 70, 16)
    if config is None:
        visible = torch.ones(2, 70, 70, dtype=torch.bool).tril()
        expected = _o_proj_inputs(tiny, ids, 1)
    else:
        visible = lrsa_visibility(k[None], v[None], config)[0]
        with lrsa(tiny, config):
            expected = _o_proj_inputs(tiny, ids, 1)
    group = q.shape[0] // k.shape[0]
    for h in range(q.shape[0]):
        probs = attention_probabilities(q[h], k[h // group], visible[h // group], cap.scaling)
        torch.testing.assert_close(probs.sum(-1), torch.ones(70))
        torch.testing.assert_close(probs @ v[h // group], expected[h], atol=1e-5, rtol=1e-4)


def test_capture_smollm2_text(smollm2):
    model, tok = smollm2
    cap = capture_kv(model, tok, "The key-value cache grows with the text.", LagConfig(2, 4, 0.5))
    assert "".join(cap.tokens) == "The key-value cache grows with the text."
    assert cap.keys.shape[:2] == (30, 3) and cap.keys.shape[-1] == 64
    assert cap.keys.dtype == torch.float32 and lrsa_config_of(model) is None


@pytest.mark.parametrize("kwargs, match", [
    (dict(config="fast"), "config must be a LagConfig"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(layers=[5]), "layers must be distinct"),
    (dict(layers=[0, 0]), "layers must be distinct"),
    (dict(layers=[]), "layers must be distinct"),
    (dict(query_layers=[2]), "query_layers"),
])
def test_capture_rejects_bad_arguments(tiny, kwargs, match):
    with pytest.raises(ValueError, match=match):
        capture_kv(tiny, None, ids_of(20), **kwargs)


def test_capture_rejects_bad_text(tiny):
    with pytest.raises(ValueError, match="tokenizer is required"):
        capture_kv(tiny, None, "hello")
    with pytest.raises(ValueError, match="token ids"):
        capture_kv(tiny, None, torch.zeros(2, 5, dtype=torch.long))


def test_attention_probabilities_rejects_rows_without_keys():
    with pytest.raises(ValueError, match="at least one key"):
        attention_probabilities(torch.randn(3, 4), torch.randn(3, 4), torch.zeros(3, 3, dtype=torch.bool), 0.5)
