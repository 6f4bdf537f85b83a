"""StaticLagKVCache and the static decode path keep exactly what the teaching LagKVCache keeps and generate the same
greedy tokens; the decode step compiles whole and reads nothing back from the device."""
from __future__ import annotations

import contextlib
import functools
import json
import sys
import types

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import ROOT, import_script, skip_unless_free_runs_agree
from lrsa_viz import LagConfig, LagKVCache, chunked_prefill, compressed_generate, tiny_model
from lrsa_viz.fast.decode import DEFAULT_KERNEL, KERNELS, buffer_attention, slot_mask
from lrsa_viz.static_cache import StaticLagKVCache, cache_capacity, compressed_partitions, stored_length
from lrsa_viz.static_generate import (STATIC_LAGKV, compiled_decode_step, decode_step, disable_static_lagkv,
                                      enable_static_lagkv, greedy_decode, static_generate, static_lagkv,
                                      static_prefill)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CONFIGS = [LagConfig(4, 16, 0.25), LagConfig(0, 8, 0.5), LagConfig(3, 5, 0.2), LagConfig(2, 4, 1.0)]


@pytest.fixture(scope="module")
def model():
    """The tiny random Llama without an end-of-sequence token, so generate() runs every step like the greedy loop."""
    m = tiny_model(seed=0)
    m.generation_config.eos_token_id = None
    return m


def fake_model_config(layers: int = 2):
    return types.SimpleNamespace(num_hidden_layers=layers)


# ------------------------------------------------------------------------------------------------- sizes
@pytest.mark.parametrize("cfg", CONFIGS)
def test_stored_length_is_eq12_on_ints_and_tensors(cfg):
    seen = torch.arange(0, 400)
    assert [stored_length(n, cfg) for n in range(400)] == [cfg.retained_length(n) for n in range(400)]
    assert torch.equal(stored_length(seen, cfg), torch.tensor([cfg.retained_length(n) for n in range(400)]))
    assert torch.equal(compressed_partitions(seen, cfg), torch.tensor([compressed_partitions(n, cfg) for n in range(400)]))


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("chunk", [1, 7])
def test_capacity_holds_every_update(cfg, chunk):
    """Eq. 12 of the tokens seen before an update plus what it appends never exceeds the buffer."""
    for max_len in (1, 30, 123):
        m = cache_capacity(max_len, cfg, max_chunk=chunk, pad_to=1)
        need = max([stored_length(n, cfg) + min(chunk, max_len - n) for n in range(max_len)] + [stored_length(max_len, cfg)])
        assert m == need
        assert cache_capacity(max_len, cfg, max_chunk=chunk) % 16 == 0 and cache_capacity(max_len, cfg, chunk) >= m


# ----------------------------------------------------------------------------------- same state as LagKVCache
def feed_both(cfg: LagConfig, updates: list[int], layers: int = 3, b: int = 2, h: int = 2, d: int = 8, seed: int = 0):
    """Feed the same random K/V stream to a StaticLagKVCache and a LagKVCache; assert equal state after each update."""
    g = torch.Generator().manual_seed(seed)
    static = StaticLagKVCache(fake_model_config(layers), sum(updates), cfg, max_chunk=max([1, *updates[1:]]))
    teaching = LagKVCache(cfg)
    for q in updates:
        for layer in range(layers):
            k, v = torch.randn(b, h, q, d, generator=g), torch.randn(b, h, q, d, generator=g)
            teaching.update(k, v, layer)
            static.update(k, v, layer)
        assert static.stored_length() == teaching.stored_lengths()[0]
        for layer in range(layers):
            positions = static.kept_positions(layer)
            assert torch.equal(positions, teaching.kept_positions(layer))
            n = positions.shape[-1]
            assert torch.equal(static.key_buffer[layer, :, :, :n], teaching.layers[layer].keys)
            assert torch.equal(static.value_buffer[layer, :, :, :n], teaching.layers[layer].values)
    return static, teaching


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("prompt", [1, 3, 40])
def test_decode_keeps_the_teaching_positions(cfg, prompt):
    static, teaching = feed_both(cfg, [prompt] + [1] * 70)
    assert torch.equal(static.kept_position_mask(), teaching.kept_position_mask())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sink=st.integers(0, 4), lag=st.integers(2, 9), ratio=st.sampled_from([0.2, 0.34, 0.5, 1.0]),
       updates=st.lists(st.integers(1, 20), min_size=1, max_size=12), seed=st.integers(0, 10))
def test_any_chunking_keeps_the_teaching_positions(sink, lag, ratio, updates, seed):
    """Chunks of any size after any prompt (several partitions due at once): the same state as LagKVCache."""
    cfg = LagConfig(sink, lag, ratio) if int(ratio * lag) >= 1 else LagConfig(sink, lag, 1.0)
    feed_both(cfg, updates, layers=2, seed=seed)


def test_exact_ties_go_to_the_lower_position():
    """Constant keys and values score every token of a partition the same: the first k of each are kept."""
    cfg = LagConfig(2, 8, 0.25)
    static = StaticLagKVCache(fake_model_config(1), 60, cfg)
    ones = torch.ones(1, 1, 1, 4)
    for _ in range(60):
        static.update(ones, ones, 0)
    kept = static.kept_positions(0)[0, 0].tolist()
    n_scored = compressed_partitions(60, cfg)
    assert kept[:2 + 2 * n_scored] == [0, 1] + [p for j in range(n_scored) for p in (2 + 8 * j, 3 + 8 * j)]


# ------------------------------------------------------------------------------------------ attention kernels
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("groups, q_len", [(1, 1), (3, 1), (3, 4), (2, 2)])
def test_buffer_attention_kernels_agree(kernel, groups, q_len):
    g = torch.Generator().manual_seed(1)
    b, h_kv, m, d = 2, 2, 37, 16
    q = torch.randn(b, h_kv * groups, q_len, d, generator=g)
    k, v = torch.randn(b, h_kv, m, d, generator=g), torch.randn(b, h_kv, m, d, generator=g)
    offset = 20
    mask = slot_mask(torch.tensor(offset), q_len, m, "cpu")
    assert mask.shape == (1, 1, q_len, m) and int(mask[0, 0, -1].sum()) == offset + q_len
    # reference: per query head, softmax over the visible slots of its KV head
    ref = torch.empty_like(q)
    for head in range(h_kv * groups):
        kv = head // groups
        for i in range(q_len):
            scores = torch.einsum("bd,bmd->bm", q[:, head, i], k[:, kv, : offset + i + 1]) * d ** -0.5
            ref[:, head, i] = torch.einsum("bm,bmd->bd", scores.softmax(-1), v[:, kv, : offset + i + 1])
    out = buffer_attention(q, k, v, mask, kernel=kernel)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)  # float32 sums of 37 terms: ~1e-6 rounding


def test_unknown_kernel_is_rejected(model):
    with pytest.raises(ValueError, match="kernel must be one of"):
        enable_static_lagkv(model, LagConfig(4, 16, 0.25), kernel="fastest")
    with pytest.raises(ValueError, match="prefill must be one of"):
        enable_static_lagkv(model, LagConfig(4, 16, 0.25), prefill="chunked")
    assert model.config._attn_implementation == "sdpa"


# ------------------------------------------------------------------------------------------------ the model
@pytest.mark.parametrize("cfg", CONFIGS[:3])
@pytest.mark.parametrize("prompt_len", [5, 61, 150])
def test_static_generate_equals_the_teaching_path(model, cfg, prompt_len):
    """Greedy tokens equal compressed_generate (chunked prefill + LagKVCache) for every kernel, and the cache
    keeps the positions the teaching cache keeps after the same sequence."""
    ids = torch.randint(0, 256, (2, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    new = 3 * cfg.lag_size + 5  # several compressions during decoding
    expected = compressed_generate(model, ids, cfg, max_new_tokens=new, do_sample=False)
    for kernel, host in [(k, True) for k in KERNELS] + [(DEFAULT_KERNEL, False)]:  # compression between / in steps
        out, cache = static_generate(model, ids, cfg, new, kernel=kernel, host_compression=host, return_cache=True)
        assert torch.equal(out, expected), (kernel, host)
    assert model.config._attn_implementation == "sdpa"
    _, teaching = chunked_prefill(model, out[:, :-1], cfg)
    for layer in range(model.config.num_hidden_layers):
        assert torch.equal(cache.kept_positions(layer), teaching.kept_positions(layer))


def test_generate_runs_on_the_static_cache(model):
    """transformers' generate with a StaticLagKVCache (prompt through LRSA, then decoding) gives the same tokens."""
    cfg = LagConfig(4, 16, 0.25)
    ids = torch.randint(0, 256, (2, 70), generator=torch.Generator().manual_seed(2))
    expected = static_generate(model, ids, cfg, 40)
    with static_lagkv(model, cfg):
        assert model.config._attn_implementation == STATIC_LAGKV
        out = model.generate(ids, past_key_values=StaticLagKVCache(model.config, 110, cfg), max_new_tokens=40,
                             do_sample=False)
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(out, expected)


@pytest.mark.parametrize("cfg", CONFIGS[:3])
def test_one_pass_prefill_equals_chunked_prefill(model, cfg):
    """The parallel LRSA prompt pass fills the cache with chunk-by-chunk prefill's positions; logits agree to float
    error (different matmul shapes: ~1e-6 here; near-ties could flip a selection on other inputs, METHOD §3)."""
    ids = torch.randint(0, 256, (2, 150), generator=torch.Generator().manual_seed(9))
    logits, cache = static_prefill(model, ids, cfg, logits_to_keep=0)
    chunked_logits, teaching = chunked_prefill(model, ids, cfg)
    for layer in range(model.config.num_hidden_layers):
        assert torch.equal(cache.kept_positions(layer), teaching.kept_positions(layer))
    torch.testing.assert_close(logits, chunked_logits, rtol=0, atol=1e-4)


def test_flex_prefill_selects_once_and_the_cache_stores_it(model, monkeypatch):
    """With the flex backend each layer selects once: the cache hands the prompt's key tensor a fill, the attention
    returns what it kept (``return_kept``) and the fill stores it; the cache never selects. With the hand-over cut
    (nothing attached) the cache completes every fill itself, before the next layer's update or the next read, and
    keeps the same positions and K/V, with the same logits: the hand-over saves a selection and changes nothing.
    The fills release the layers' K/V: nothing survives the prefill, even with the garbage collector off (a
    reference cycle key -> fill -> key would keep every layer's K/V until a collection)."""
    import gc
    import weakref

    import lrsa_viz.fast as fast
    import lrsa_viz.static_cache as static_cache

    cfg = LagConfig(4, 16, 0.25)
    layers = model.config.num_hidden_layers
    ids = torch.randint(0, 256, (2, 90), generator=torch.Generator().manual_seed(3))
    calls, own, keys = [], [], []
    real, real_select, real_init = fast.fast_lrsa_attention, StaticLagKVCache._select_prompt, static_cache.PromptFill.__init__
    monkeypatch.setattr(fast, "fast_lrsa_attention", lambda *a, return_kept=False, **k: calls.append(return_kept)
                        or real(*a, return_kept=return_kept, **k))
    monkeypatch.setattr(StaticLagKVCache, "_select_prompt", lambda self, k, v: own.append(1) or real_select(self, k, v))
    monkeypatch.setattr(static_cache.PromptFill, "__init__",
                        lambda self, c, i, k, v: keys.append(weakref.ref(k)) or real_init(self, c, i, k, v))
    gc.disable()
    try:
        logits, cache = static_prefill(model, ids, cfg, backend="flex", logits_to_keep=0)
        assert len(keys) == layers and all(ref() is None for ref in keys)
    finally:
        gc.enable()
    assert calls == [True] * layers and not own and not cache._unfilled
    monkeypatch.setattr(static_cache, "attach_prompt_fill", lambda key, fill: None)  # the attention never sees a fill
    calls.clear()
    again, cache_again = static_prefill(model, ids, cfg, backend="flex", logits_to_keep=0)
    assert cache_again._unfilled  # the last layer's: completed by the next read
    for layer in range(layers):
        assert torch.equal(cache_again.kept_positions(layer), cache.kept_positions(layer))
    assert calls == [False] * layers and len(own) == layers and not cache_again._unfilled
    assert torch.equal(cache_again.key_buffer, cache.key_buffer) and torch.equal(cache_again.value_buffer, cache.value_buffer)
    torch.testing.assert_close(again, logits, rtol=0, atol=1e-6)  # same positions, same kernels, same process


def test_dense_prefill_into_the_static_cache_stores_one_shot_lagkv_within_each_layer(model, monkeypatch):
    """``prefill="dense"`` with a `StaticLagKVCache` (kvpress-style one-shot compression of a dense prompt): the
    dense attention stores nothing, so each layer's prompt is stored with the cache's own selection before the layer
    returns (no fill waits for a later update), and the cache keeps exactly `one_shot_keep` of every layer's K/V."""
    import lrsa_viz.static_cache as static_cache
    from lrsa_viz.static_cache import one_shot_keep

    cfg = LagConfig(4, 16, 0.25)
    ids = torch.randint(0, 256, (2, 90), generator=torch.Generator().manual_seed(4))
    layers = model.config.num_hidden_layers
    pending_at_update, states = [], {}
    real_update = StaticLagKVCache.update

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        pending_at_update.append(len(self._unfilled))
        states[layer_idx] = (key_states, value_states)
        return real_update(self, key_states, value_states, layer_idx, *args, **kwargs)

    monkeypatch.setattr(StaticLagKVCache, "update", update)
    cache = StaticLagKVCache(model.config, 91, cfg)
    with static_lagkv(model, cfg, prefill="dense"), torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    assert pending_at_update == [0] * layers and not cache._unfilled
    for layer, (k, v) in states.items():
        assert torch.equal(cache.kept_positions(layer), one_shot_keep(k, v, cfg))


def test_smollm2_static_generate_equals_the_teaching_path(smollm2):
    """SmolLM2-135M on a real text: the same greedy tokens and kept positions as chunked prefill + LagKVCache.

    Free runs (METHOD §3): SmolLM2's scores are flat, and on this text the closest top-k boundary is only ~7x the
    score drift between the two passes measured on the project's CPU (gap 1.0e-7, drift 1.5e-8; 13 of 720 boundaries
    under 1e-6). Another CPU's rounding can flip such a near-tie, and then tokens and positions may legitimately
    differ: the test first compares the prompt's selections and, if any flipped, asserts that every flip is a
    near-tie (`SelectionAgreement.all_near_ties`) instead of equality. No compression happens while decoding
    (600 + 20 tokens complete no new partition of L = 64), so the prompt's selections are all there is to compare."""
    model, tok = smollm2
    cfg = LagConfig(16, 64, 0.25)
    ids = tok((ROOT / "data" / "passages" / "kv_cache_notes.txt").read_text(), return_tensors="pt").input_ids[:, :600]
    assert cfg.num_partitions(600) == cfg.num_partitions(620), "no compression while decoding (see above)"
    skip_unless_free_runs_agree(model, ids, cfg)
    out, cache = static_generate(model, ids, cfg, 20, return_cache=True)
    model.generation_config.eos_token_id, eos = None, model.generation_config.eos_token_id
    try:
        expected = compressed_generate(model, ids, cfg, max_new_tokens=20, do_sample=False)
    finally:
        model.generation_config.eos_token_id = eos
    assert torch.equal(out, expected), tok.decode(out[0, 600:])
    _, teaching = chunked_prefill(model, out[:, :-1], cfg)
    for layer in (0, 15, 29):
        assert torch.equal(cache.kept_positions(layer), teaching.kept_positions(layer))


def test_decode_step_compiles_to_one_graph_without_host_reads(model):
    """torch.compile(fullgraph=True) traces the whole step (model + cache + compression): a host read of device
    data (.item(), bool(tensor)) would break the graph and fail; one graph serves every step, compressing or not."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    cfg = LagConfig(4, 16, 0.25)
    ids = torch.randint(0, 256, (2, 60), generator=torch.Generator().manual_seed(1))
    tokens = {}
    for name in ("eager", "compiled"):
        logits, cache = static_prefill(model, ids, cfg, 60 + 60)
        with static_lagkv(model, cfg):
            torch._dynamo.reset()
            counters.clear()
            step = decode_step if name == "eager" else compiled_decode_step(backend="eager")
            tokens[name] = greedy_decode(model, cache, logits[:, -1:].argmax(-1), 59, step_fn=step,
                                         host_compression=False)  # the compression inside the compiled step
            if name == "compiled":
                assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
                assert not counters["graph_break"], dict(counters["graph_break"])
    assert torch.equal(tokens["eager"], tokens["compiled"])


@pytest.mark.parametrize("host_compression, dynamic", [(True, False), (False, False), (True, True)])
def test_compiled_decode_step_writes_the_cache_in_place(model, host_compression, dynamic):
    """The inductor code of a decode step allocates no [B, H_kv, M, (d)] layer slice and no [layers, ...] buffer: new
    tokens are written into the cache's buffers in place, O(B) bytes per token. (Writing through a view taken
    inside the step made inductor copy every layer's whole slice around the write: 2.7-3.7x slower steps on a CPU,
    `benchmarks/bench_decode_cpu.py`.) Static shapes and dynamic ones (the benchmark's compilation: the buffer
    length M is then a symbol such as ``s61``). Same tokens as eager decoding."""
    import re

    from torch._inductor.utils import run_and_get_code

    cfg = LagConfig(4, 16, 0.25)
    ids = torch.randint(0, 256, (2, 61), generator=torch.Generator().manual_seed(5))
    tokens = {}
    for name in ("eager", "inductor"):
        logits, cache = static_prefill(model, ids, cfg, 61 + 100)  # M = 80 slots
        first = logits[:, -1:].argmax(-1)
        with static_lagkv(model, cfg):
            if name == "eager":
                tokens[name] = greedy_decode(model, cache, first, 20, host_compression=host_compression)
                continue
            torch._dynamo.reset()
            step = torch.compile(decode_step, fullgraph=True, dynamic=dynamic)
            with torch._dynamo.config.patch(specialize_float=True):  # as `compiled_decode_step` compiles
                decode = functools.partial(greedy_decode, model, cache, first, 20, step_fn=step,
                                           host_compression=host_compression)
                tokens[name], code = run_and_get_code(decode)
        layers, b, h, m, d = cache.key_buffer.shape
        sizes = (b, h, d, layers, 61, model.config.hidden_size, model.config.intermediate_size, model.config.vocab_size)
        assert m not in sizes, "the buffer length must not be mistaken for another size"
        shapes = [[dim.strip() for dim in shape.split(",") if dim.strip()]
                  for shape in re.findall(r"empty_strided_\w+\(\(([^)]*)\)", "\n".join(code))]
        assert shapes, "no allocation found in the generated code: the check below would pass vacuously"
        # a copy of a layer's K/V slice, [B, H_kv, M, d] (M, or any symbol when dynamic), or of the [layers, B, H_kv,
        # M, d] buffers; attention scores [B, H_kv, G Q, M] (the matmul kernel's) and the in-step compression's
        # [layers, B, H_kv, L + span, d] window are not copies of the cache
        def buffer_length(dim: str) -> bool:
            return dim == str(m) or re.fullmatch(r"s\d+", dim) is not None

        long_dims = [dims for dims in shapes
                     if (len(dims) == 4 and dims[:2] == [str(b), str(h)] and buffer_length(dims[2]) and dims[3] == str(d))
                     or (len(dims) == 5 and dims[0] == str(layers) and buffer_length(dims[3]))]
        assert not long_dims, long_dims
    assert torch.equal(tokens["eager"], tokens["inductor"])


@pytest.mark.parametrize("host_compression", [True, False])
def test_decode_reads_nothing_back(model, host_compression):
    """No aten::_local_scalar_dense (what .item(), int(t), bool(t) run) in eager decode steps."""
    from torch.profiler import ProfilerActivity, profile

    cfg = LagConfig(4, 16, 0.25)
    logits, cache = static_prefill(model, torch.randint(0, 256, (1, 40)), cfg, 40 + 40)
    with static_lagkv(model, cfg), profile(activities=[ProfilerActivity.CPU]) as prof:
        greedy_decode(model, cache, logits[:, -1:].argmax(-1), 35, host_compression=host_compression)  # compresses
    names = {e.key for e in prof.key_averages()}
    assert "aten::_local_scalar_dense" not in names and "aten::item" not in names
    assert "aten::index_copy_" in names  # the profile did see the decode steps


def test_reset_reuses_the_buffers(model):
    cfg = LagConfig(4, 16, 0.25)
    ids = torch.randint(0, 256, (1, 50), generator=torch.Generator().manual_seed(4))
    expected = static_generate(model, ids, cfg, 30)
    cache = StaticLagKVCache(model.config, 80, cfg)
    runs = []
    for _ in range(2):
        cache.reset()
        with static_lagkv(model, cfg):
            first = model(input_ids=ids, past_key_values=cache).logits[:, -1:].argmax(-1)
            runs.append((torch.cat([ids, first, greedy_decode(model, cache, first, 29)], 1), cache.key_buffer.data_ptr()))
    assert torch.equal(runs[0][0], expected) and torch.equal(runs[1][0], expected)
    assert runs[0][1] == runs[1][1]


def test_enable_disable_restores(model):
    from lrsa_viz import disable_lrsa, enable_lrsa, lrsa_config_of
    from lrsa_viz.attention import forced_keep_of

    cfg = LagConfig(4, 16, 0.25)
    enable_static_lagkv(model, cfg, kernel="matmul")
    enable_static_lagkv(model, cfg, prefill="dense")  # re-enabling replaces, never stacks
    disable_static_lagkv(model)
    assert model.config._attn_implementation == "sdpa" and lrsa_config_of(model) is None
    enable_lrsa(model, LagConfig(2, 8, 0.5))
    with static_lagkv(model, cfg):
        assert model.config._attn_implementation == STATIC_LAGKV
    assert lrsa_config_of(model) == LagConfig(2, 8, 0.5)
    disable_lrsa(model)
    assert model.config._attn_implementation == "sdpa"
    enable_static_lagkv(model, cfg, kernel="sdpa_repeat")
    with static_lagkv(model, cfg):  # what static_prefill does inside: the user's static state comes back whole
        assert model.config.lagkv_decode_kernel == DEFAULT_KERNEL != "sdpa_repeat"
    assert model.config._attn_implementation == STATIC_LAGKV and model.config.lagkv_decode_kernel == "sdpa_repeat"
    assert LagConfig.from_dict(model.config.lrsa) == cfg, "the prefill's LRSA config (model.config.lrsa) too"
    disable_static_lagkv(model)
    assert model.config._attn_implementation == "sdpa" and not hasattr(model.config, "lagkv_decode_kernel")
    _, cache = chunked_prefill(model, torch.randint(0, 256, (1, 60), generator=torch.Generator().manual_seed(0)), cfg)
    keep = cache.kept_position_mask()
    enable_lrsa(model, cfg, keep=keep)
    with static_lagkv(model, cfg):
        pass
    assert lrsa_config_of(model) == cfg and torch.equal(forced_keep_of(model), keep), "forced selections survive"
    disable_lrsa(model)


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_arguments_are_rejected(model):
    cfg = LagConfig(4, 16, 0.25)
    with pytest.raises(ValueError, match="max_cache_len must be an integer >= 1"):
        StaticLagKVCache(model.config, 0, cfg)
    with pytest.raises(ValueError, match="config must be a LagConfig"):
        StaticLagKVCache(model.config, 10, {"lag_size": 16})
    with pytest.raises(ValueError, match="num_hidden_layers"):
        StaticLagKVCache(object(), 10, cfg)
    with pytest.raises(ValueError, match="max_chunk must be an integer"):
        StaticLagKVCache(model.config, 10, cfg, max_chunk=0)
    ids = torch.randint(0, 256, (1, 20))
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        static_generate(model, ids, cfg, 0)
    with pytest.raises(ValueError, match="max_cache_len must be an integer >= the prompt length"):
        static_prefill(model, ids, cfg, 10)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        static_generate(model, ids, cfg, 9000)


def test_too_many_tokens_and_too_large_chunks_are_reported(model):
    cfg = LagConfig(4, 16, 0.25)
    ids = torch.randint(0, 256, (1, 20))
    logits, cache = static_prefill(model, ids, cfg, 22)
    with static_lagkv(model, cfg):
        greedy_decode(model, cache, logits[:, -1:].argmax(-1), 2)
        cache.check_overflow()  # 22 tokens: fine
        greedy_decode(model, cache, logits[:, -1:].argmax(-1), 1)  # the 23rd: flagged on the device, not a crash
        with pytest.raises(ValueError, match="more than 22 tokens"):
            cache.check_overflow()
        with pytest.raises(ValueError, match="at most max_chunk=1"):
            model(input_ids=ids[:, :3], past_key_values=cache)
    small = StaticLagKVCache(model.config, 5, cfg)
    with pytest.raises(ValueError, match="first update has 20 tokens"):
        with static_lagkv(model, cfg):
            model(input_ids=ids, past_key_values=small)


# ------------------------------------------------------------------------------------------------ benchmark
def test_benchmark_profile_counts_host_reads():
    """bench_inference's profiler count of host syncs per step (its JSON's ``host_syncs_per_step``) sees each read
    of a tensor's value by the host, also on a CPU, and nothing in a step that reads none; its count of compiled
    regions entered per step (``compiled_calls_per_step``) sees each call of a torch.compile'd function."""
    bench_inference = import_script("benchmarks", "bench_inference")
    x = torch.arange(6.0)
    cpu = torch.device("cpu")
    assert bench_inference.profile_steps(lambda: x * 2, 4, cpu)["host_syncs_per_step"] == 0
    reads = bench_inference.profile_steps(lambda: [x.sum().item(), x.max().item()], 4, cpu)
    assert reads["host_syncs_per_step"] == 2
    assert {op["name"] for op in reads["top_host_ops"]} >= {"aten::sum", "aten::max"}  # host operators, per step
    assert reads["host_ops_per_step"] >= 4 and reads["host_ms_per_step"] > 0
    twice = torch.compile(lambda t: t * 2 + 1, backend="eager")  # entered twice per step: a compiled region each
    twice(x)
    assert bench_inference.profile_steps(lambda: [twice(x), twice(x)], 3, cpu)["compiled_calls_per_step"] == 2
    assert reads["compiled_calls_per_step"] == 0


def test_inference_benchmark_smoke(tmp_path):
    """benchmarks/bench_inference.py --smoke runs on CPU and writes the JSON the GPU run writes."""
    bench_inference = import_script("benchmarks", "bench_inference")
    out = tmp_path / "smoke.json"
    modes = "full_cache_sdpa,full_cache_buffer,lagkv_cache_fast_lrsa"
    assert bench_inference.main(["--smoke", "--out", str(out), "--modes", modes, "--also-kernels", "sdpa_folded"]) == 0
    result = json.loads(out.read_text())
    assert result["command"].startswith("PYTHONPATH=. python3 benchmarks/bench_inference.py --smoke")
    assert result["environment"]["torch"] == torch.__version__ and result["gpu"] == "cpu"
    rows = result["inference"]["rows"]
    assert [(r["prompt_len"], r["batch"]) for r in rows] == [(150, 1), (150, 2)]
    for row in rows:
        for key in ("decode_tokens_per_s", "decode_speedup", "prefill_speedup", "kv_bytes_ratio", "bandwidth_fraction",
                    "host_syncs_per_step"):
            assert key in row, key
        assert row["host_syncs_per_step"] == 0
        assert 0 < row["kv_bytes_ratio"] < 1
        lagkv = row["lagkv_cache_fast_lrsa"]  # the profile and the CUDA-graph skips are recorded (kernels: CUDA only)
        assert set(lagkv["profile"]) == {"host_syncs_per_step", "graph_launches_per_step", "device_ms_per_step",
                                         "top_kernels", "host_ops_per_step", "host_ms_per_step", "top_host_ops",
                                         "compiled_calls_per_step"}
        assert lagkv["profile"]["compiled_calls_per_step"] == int(result["inference"]["decode"]["compiled"])
        assert lagkv["profile"]["host_ops_per_step"] > 0 and lagkv["profile"]["top_host_ops"][0]["ms_per_step"] > 0
        assert lagkv["profile"]["host_syncs_per_step"] == 0 and isinstance(lagkv["cudagraph_skips"], int)
        assert set(lagkv["prefill_profile"]) == set(lagkv["profile"])
        by_kernel = row["lagkv_by_kernel"]["sdpa_folded"]  # --also-kernels: the same decode with another kernel
        assert by_kernel["decode_tokens_per_s"] > 0 and set(row["decode_speedup_by_kernel"]) == {"sdpa_folded"}
        assert row["lagkv_cache_fast_lrsa"]["eq12_after_prefill"] == LagConfig(4, 16, 0.25).retained_length(150)
    assert result["inference"]["fit"]["max_batch_lagkv"] > result["inference"]["fit"]["max_batch_full"]
    assert result["inference"]["check"]["tokens_equal"]
    assert set(rows[0]["decode_speedup_by_mode"]) == {"full_cache_sdpa", "full_cache_buffer"}
    with pytest.raises(ValueError, match="--modes"):
        bench_inference.main(["--smoke", "--out", str(out), "--modes", "full_cache_sdpa"])
    with pytest.raises(ValueError, match="--also-kernels: kernels other than --kernel"):
        bench_inference.main(["--smoke", "--out", str(out), "--kernel", "matmul", "--also-kernels", "matmul"])
    for kernels in result["inference"]["kernels"]:
        for side in ("full", "lagkv"):
            assert set(kernels[side]) == set(KERNELS)
            assert all(k["max_abs_diff_vs_sdpa_repeat"] < 1e-5 for k in kernels[side].values())


def test_inference_benchmark_prefill_only(tmp_path, monkeypatch):
    """``--prefill-only``: each mode's prefill timed ``--prefill-repeats`` times (median) and profiled; no decode,
    no kernel bench, no eager-vs-compiled check; ``prefill_speedup`` per row. Bad repeat counts are refused."""
    bench_inference = import_script("benchmarks", "bench_inference")
    out = tmp_path / "prefill.json"
    monkeypatch.delenv("LRSA_VIZ_FUSED_REGION", raising=False)
    assert bench_inference.main(["--smoke", "--out", str(out), "--prefill-only", "--prefill-repeats", "3"]) == 0
    result = json.loads(out.read_text())
    assert result["fast_options"]["fused"] and result["flex_kernel"] == "triton"  # how the LRSA prefill ran
    inference = result["inference"]
    assert inference["kernels"] == [] and "check" not in inference
    for row in inference["rows"]:
        for mode in ("full_cache_sdpa", "lagkv_cache_fast_lrsa"):
            measured = row[mode]
            assert "decode_tokens_per_s" not in measured and len(measured["prefill_repeats_s"]) == 3
            assert measured["prefill_s"] == sorted(measured["prefill_repeats_s"])[1]
            assert measured["prefill_profile"]["host_ops_per_step"] > 0
        assert row["prefill_speedup"] == pytest.approx(
            row["full_cache_sdpa"]["prefill_s"] / row["lagkv_cache_fast_lrsa"]["prefill_s"])
    assert inference["fit"]["max_batch_lagkv"] > inference["fit"]["max_batch_full"]
    with pytest.raises(ValueError, match="--prefill-repeats must be >= 1"):
        bench_inference.main(["--smoke", "--out", str(out), "--prefill-only", "--prefill-repeats", "0"])


# ----------------------------------------------------------------------------------------------------- CUDA
@CUDA
@pytest.mark.parametrize("kernel, host_compression", [(k, False) for k in KERNELS] + [(DEFAULT_KERNEL, True)])
def test_cuda_compiled_graphs_equal_eager_and_teaching(kernel, host_compression):
    """On a GPU, float32, each decode kernel: CUDA-graph decoding (inductor, reduce-overhead) = eager = the teaching
    path."""
    m = tiny_model(seed=0).cuda()
    m.generation_config.eos_token_id = None
    cfg = LagConfig(4, 16, 0.25)
    ids = torch.randint(0, 256, (2, 90), generator=torch.Generator().manual_seed(3)).cuda()
    eager = static_generate(m, ids, cfg, 70, compile=False, kernel=kernel, host_compression=host_compression)
    compiled = static_generate(m, ids, cfg, 70, compile=True, kernel=kernel, host_compression=host_compression)
    teaching = compressed_generate(m, ids, cfg, max_new_tokens=70, do_sample=False)
    assert torch.equal(eager, compiled)
    assert torch.equal(eager, teaching)


@CUDA
@pytest.mark.parametrize("host_compression", [False, True])
def test_cuda_eager_decode_never_syncs(host_compression):
    """torch.cuda.set_sync_debug_mode('error') raises on any synchronising call: none in eager decode steps, with
    the compression inside the steps or scheduled on the host (its one read is taken on entry, before)."""
    m = tiny_model(seed=0).cuda()
    cfg = LagConfig(4, 16, 0.25)
    logits, cache = static_prefill(m, torch.randint(0, 256, (2, 60)).cuda(), cfg, 60 + 40)
    first = logits[:, -1:].argmax(-1)
    with static_lagkv(m, cfg), (cache.host_scheduled_compression() if host_compression else contextlib.nullcontext()):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            greedy_decode(m, cache, first, 39, host_compression=host_compression)
        finally:
            torch.cuda.set_sync_debug_mode("default")


# -------------------------------------------------------------------------------------------------------- figures
def test_inference_figures(tmp_path):
    import plotly.graph_objects as go
    from lrsa_viz.fast.inference_figures import (decode_cost_figure, inference_rows, llama_weight_bytes,
                                                 measured_decode_figure)

    assert llama_weight_bytes() == 269_030_016  # SmolLM2-135M in bf16: 134.5M parameters (tied embedding)
    fig = decode_cost_figure([4096, 16384, 32768], LagConfig(), batch=16)
    assert isinstance(fig, go.Figure) and len(fig.data) == 5
    assert fig.layout.xaxis.title.text == "context length (tokens)" and fig.layout.yaxis.title.text == "bytes per step"
    full, lag = fig.data[0].y, fig.data[2].y
    assert all(f > x for f, x in zip(full, lag))  # LagKV reads fewer bytes at every length
    bench_inference = import_script("benchmarks", "bench_inference")
    out = tmp_path / "smoke.json"
    bench_inference.main(["--smoke", "--out", str(out), "--kernel-bench", "0", "--check-steps", "0"])
    result = json.loads(out.read_text())
    rows = inference_rows(result)
    assert {r["mode"] for r in rows} == {"full_cache_sdpa", "lagkv_cache_fast_lrsa"} and len(rows) == 4
    fig = measured_decode_figure(result)
    assert len(fig.data) == 4 + 2 and fig.layout.yaxis.title.text == "generated tokens/s (all sequences)"
    with pytest.raises(ValueError, match="no measured inference rows"):
        measured_decode_figure({"inference": {"rows": []}})


def test_committed_inference_runs_merge_into_one_result(tmp_path):
    """The committed H200 runs (one batch size each, same GPU and torch) read as one result, rows in file order;
    a file from another GPU is refused."""
    from lrsa_viz.fast.inference_figures import inference_rows, measured_decode_figure, merge_inference_results

    paths = [ROOT / "data" / "results" / "bench_h200_x2" / f"bench_inference_b{b}.json" for b in (1, 16, 64)]
    merged = merge_inference_results(paths)
    assert [(r["prompt_len"], r["batch"]) for r in merged["inference"]["rows"]] == [(16384, 1), (16384, 16), (16384, 64)]
    assert len(merged["commands"]) == 3 and "H200" in merged["gpu"]
    assert {r["mode"] for r in inference_rows(merged)} == {"full_cache_sdpa", "lagkv_cache_fast_lrsa"}
    assert len(measured_decode_figure(merged).data) == 2 * 3 + 2
    other = json.loads(paths[0].read_text())
    other["gpu"] = "another GPU"
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="another GPU"):
        merge_inference_results([paths[0], tmp_path / "other.json"])
    other = json.loads(paths[0].read_text())
    other["inference"]["decode"]["compression"] = "host"  # another decode setting: not comparable either
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="compression"):
        merge_inference_results([paths[0], tmp_path / "other.json"])


def test_fit_from_buffers_allocated_on_the_cpu_equals_the_h200_measurement(tmp_path):
    """`bench_inference.py --fit-only N`: both caches allocated on the CPU for SmolLM2's shapes give exactly the
    bytes per sequence the committed H200 run measured at 16,384 tokens (buffer sizes do not depend on the device),
    and the committed 32k fit file is what the script writes for 32,768 tokens."""
    bench_inference = import_script("benchmarks", "bench_inference")
    committed = json.loads((ROOT / "data" / "results" / "bench_h200_x2" / "bench_inference_b1.json").read_text())
    measured = committed["inference"]["fit"]
    out = tmp_path / "fit.json"
    new_tokens = str(committed["inference"]["decode"]["new_tokens"])  # sizes the caches: the run's own setting
    assert bench_inference.main(["--fit-only", "16384", "--new-tokens", new_tokens, "--out", str(out)]) == 0
    fit = json.loads(out.read_text())["inference"]["fit"]
    for key in ("bytes_per_sequence_full", "bytes_per_sequence_lagkv", "max_batch_full", "max_batch_lagkv"):
        assert fit[key] == measured[key], key
    at_32k = json.loads((ROOT / "data" / "results" / "bench_inference_fit_32k.json").read_text())
    assert at_32k["command"] == "PYTHONPATH=. python3 benchmarks/bench_inference.py --fit-only 32768 --out " \
                                "data/results/bench_inference_fit_32k.json"
    assert at_32k["inference"]["fit"]["prompt_len"] == 32768
    assert at_32k["inference"]["fit"]["ratio"] == at_32k["inference"]["fit"]["max_batch_lagkv"] / \
        at_32k["inference"]["fit"]["max_batch_full"]
    with pytest.raises(SystemExit):  # argparse: not an integer
        bench_inference.main(["--fit-only", "many", "--out", str(out)])
    with pytest.raises(ValueError, match="--fit-only must be a prompt length >= 1"):
        bench_inference.main(["--fit-only", "-5", "--out", str(out)])


# --------------------------------------------------------------------------------- compression scheduled on the host
@pytest.mark.parametrize("compiled", [False, True])
def test_host_scheduled_compression_keeps_the_same_tokens_and_positions_with_fewer_compressions(model, compiled):
    """Compressing between steps, only when a partition is due, decodes the same tokens and keeps the same
    positions in every layer as compressing inside every step, with one compression per L tokens instead of one
    per step; the compiled step (one graph, no break) too."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    cfg = LagConfig(4, 16, 0.25)
    ids = torch.randint(0, 256, (2, 70), generator=torch.Generator().manual_seed(5))
    steps, runs = 75, {}
    for host in (False, True):
        logits, cache = static_prefill(model, ids, cfg, 70 + steps + 1)
        calls = []
        if not compiled:  # count the compressions (a Python side effect would recompile a compiled step)
            real = cache._compress_one
            cache._compress_one = lambda span, real=real, calls=calls: (calls.append(span), real(span))[1]
        torch._dynamo.reset()
        counters.clear()
        step = compiled_decode_step(backend="eager") if compiled else decode_step
        with static_lagkv(model, cfg):
            tokens = greedy_decode(model, cache, logits[:, -1:].argmax(-1), steps, step_fn=step, host_compression=host)
        assert not cache.defer_compression and cache._host_counts is None, "the cache is back to in-step compression"
        if compiled:
            assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters["stats"])
        calls = len(calls)  # the decode loop's compressions (kept_positions below applies pending ones too)
        runs[host] = tokens, [cache.kept_positions(layer) for layer in range(len(cache.layers))], calls
    (tok_step, kept_step, calls_step), (tok_host, kept_host, calls_host) = runs[False], runs[True]
    assert torch.equal(tok_step, tok_host)
    assert all(torch.equal(a, b) for a, b in zip(kept_step, kept_host))
    completed = compressed_partitions(70 + steps, cfg) - compressed_partitions(70, cfg)
    assert completed >= 4
    if not compiled:
        assert calls_step == steps and calls_host == completed, "in-step: the window is compressed at every update"


@pytest.mark.parametrize("prompt", [5, 20, 36, 37, 52])
def test_host_scheduled_compression_from_short_prompts(model, prompt):
    """Prompts shorter than, equal to and just past S + 2L (nothing, or one partition, compressed by the prefill):
    host-scheduled and in-step compression decode the same tokens and keep the same positions."""
    cfg = LagConfig(4, 16, 0.25)
    ids = torch.randint(0, 256, (1, prompt), generator=torch.Generator().manual_seed(prompt))
    runs = []
    for host in (False, True):
        logits, cache = static_prefill(model, ids, cfg, prompt + 61)
        with static_lagkv(model, cfg):
            tokens = greedy_decode(model, cache, logits[:, -1:].argmax(-1), 60, host_compression=host)
        runs.append((tokens, [cache.kept_positions(layer) for layer in range(len(cache.layers))]))
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def test_before_update_outside_its_context_is_refused(model):
    cfg = LagConfig(4, 16, 0.25)
    _, cache = static_prefill(model, torch.randint(0, 256, (1, 40)), cfg, 60)
    with pytest.raises(RuntimeError, match="host_scheduled_compression"):
        cache.before_update(1)
    empty = StaticLagKVCache(model.config, 60, cfg)
    with pytest.raises(ValueError, match="empty"):
        with empty.host_scheduled_compression():
            pass


def test_cpu_decode_benchmark_smoke(tmp_path):
    """benchmarks/bench_decode_cpu.py: both modes time a compiled step; the JSON says how it was made."""
    bench = import_script("benchmarks", "bench_decode_cpu")
    out = tmp_path / "decode.json"
    result = bench.main(["--batch", "2", "--prompt", "300", "--layers", "1", "--steps", "2", "--out", str(out)])
    assert set(result["step_ms"]) == {"lagkv", "full"} and all(v > 0 for v in result["step_ms"].values())
    assert json.loads(out.read_text())["environment"]["device"] == "cpu"
    with pytest.raises(SystemExit):
        bench.main(["--modes", "lagkv,fast"])
