"""Evaluation of ``lagkv/chunked`` through one parallel LRSA prefill (``chunked_prefill="parallel"``): the same greedy
tokens and the same measured kv_fraction as chunk-by-chunk prefill (``"chunks"``), setting by setting, for several
settings at once and for the whole table; the model is left as it was; other policies always go chunk by chunk.

On CPU in float32 the tiny model's prompts below give EXACTLY the same tokens on both paths: compared with ==. The
two paths compute K/V with different matrix shapes, so a near-tie of the LagKV scores (METHOD §3, "free runs")
could flip a selection on other inputs; none occurs on these (fixed) inputs, and
`test_the_prompts_here_have_no_near_ties` checks the margin that makes this hold on other machines too.
"""
from __future__ import annotations

import csv

import pytest
import torch

import lrsa_viz.evaluate as evaluate
from lrsa_viz import LagConfig
from lrsa_viz.fast import fast_options
from lrsa_viz.evaluate import (CHUNKED_PREFILLS, Setting, default_settings, evaluate_model, greedy_answers,
                               greedy_answers_many, prefill_of, resolve_chunked_prefill, results_table, row_prefill)
from lrsa_viz.static_generate import STATIC_LAGKV
from lrsa_viz.train import load_source

from helpers import prompt_batch

LAG = LagConfig(sink_size=8, lag_size=32, ratio=0.25)  # S + 2L = 72
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def batch(tok, examples):
    """Two QA prompts of one length [2, N] (N = 242 here) and their context_end."""
    ids, end = prompt_batch(tok, examples)
    assert ids.shape[1] == 242, "the cases below (S + 2L = 272 > N, ...) are written for N = 242"
    return ids, end


@pytest.fixture
def count_static_prefills(monkeypatch):
    """{"calls": how often evaluate's parallel path ran `static_prefill`} (so an equality cannot hold vacuously)."""
    counter = {"calls": 0}
    real = evaluate.static_prefill

    def counted(*args, **kwargs):
        counter["calls"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate, "static_prefill", counted)
    return counter


@pytest.fixture
def decode_attention(monkeypatch):
    """The model's attention implementation during each `_greedy_decode` call, in order. (The tiny model's peaked
    attention barely notices the empty buffer slots that plain SDPA would also attend to: ~1e-6 on the logits, so
    equal tokens alone would not show that decoding runs the static implementation.)"""
    seen: list[str] = []
    real = evaluate._greedy_decode

    def recorded(model, *args, **kwargs):
        seen.append(model.config._attn_implementation)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(evaluate, "_greedy_decode", recorded)
    return seen


def both(model, ids, context_end, setting, lag, new, eos, **kw):
    """(tokens, kv_fraction) of "chunks" and of "parallel"."""
    return [greedy_answers(model, ids, context_end, setting, lag, new, eos, chunked_prefill=mode, **kw)
            for mode in ("chunks", "parallel")]


# ------------------------------------------------------------------------------------------- one setting
@pytest.mark.parametrize("cfg, prompt_len", [
    (LAG, 30),                          # shorter than S + 2L: nothing compressed by the prompt
    (LAG, 72),                          # exactly S + 2L
    (LAG, 73),
    (LAG, None),                        # the whole QA prompt (242 tokens)
    (LagConfig(8, 32, 0.5), None),
    (LagConfig(8, 32, 0.125), None),
    (LagConfig(4, 8, 0.5), None),       # L = 8: several compressions while decoding 24 tokens
    (LagConfig(3, 5, 0.2), None),
    (LagConfig(16, 128, 0.25), None),   # S + 2L = 272 > 242: nothing compressed at all
])
def test_parallel_prefill_gives_the_tokens_and_kv_fraction_of_chunks(tiny_lm, tok, batch, cfg, prompt_len,
                                                                     count_static_prefills, decode_attention):
    ids, end = batch
    ids = ids[:, :prompt_len] if prompt_len else ids
    n = ids.shape[1]
    setting = Setting("lagkv", "chunked", cfg.ratio)
    (chunks, f_chunks), (parallel, f_parallel) = both(tiny_lm, ids, min(end, n - 1), setting, cfg, 24,
                                                      tok.eos_token_id)
    assert count_static_prefills["calls"] == 1
    assert decode_attention == ["sdpa", STATIC_LAGKV], "decoding over the static cache uses its attention"
    assert parallel.tolist() == chunks.tolist()
    assert f_parallel == f_chunks == cfg.retained_length(n) / n
    assert tiny_lm.config._attn_implementation == "sdpa", "the model is left as it was"


@pytest.mark.parametrize("cfg", [LAG, LagConfig(8, 32, 0.5), LagConfig(8, 32, 0.125), LagConfig(4, 8, 0.5),
                                 LagConfig(3, 5, 0.2)])
def test_the_prompts_here_have_no_near_ties(tiny_lm, batch, cfg):
    """Why the exact token comparisons of this module may use == on any machine: on these prompts the closest top-k
    boundary of any scored partition is far wider than the score drift between the parallel and the chunked pass
    (measured here: gaps >= 3.5e-6 against drifts <= 1.3e-6, and >= 100x the drift of the same configuration), so
    no rounding difference of another CPU can flip a selection of the prompt. If a change of the model or the data
    brought a near-tie, this test says so here instead of a token mismatch on someone else's machine."""
    from lrsa_viz.agreement import compare_selections
    from lrsa_viz.viz import boundary_gaps

    agreement = compare_selections(tiny_lm, batch[0], cfg)
    gaps = boundary_gaps(agreement.chunked_scores, cfg.top_k)
    assert gaps.numel() >= 48 and agreement.n_flips == 0
    assert gaps.min() > 50 * agreement.max_drift > 0, (f"closest boundary {gaps.min():.2e} vs score drift "
                                                       f"{agreement.max_drift:.2e}: a near-tie (METHOD §3)")


def test_end_of_sequence_stops_rows_the_same_way(tiny_lm, batch):
    """With an eos token that row 0 emits at its third step: both paths stop row 0 there (eos after it) and
    return the same [B, T]."""
    ids, end = batch
    first, _ = greedy_answers(tiny_lm, ids, end, Setting("lagkv", "chunked", 0.5), LAG, 10, -1,
                              chunked_prefill="chunks")
    eos = int(first[0, 2])
    assert eos not in first[0, :2].tolist()
    (chunks, _), (parallel, _) = both(tiny_lm, ids, end, Setting("lagkv", "chunked", 0.5), LAG, 10, eos)
    assert parallel.tolist() == chunks.tolist()
    assert (chunks[0, 2:] == eos).all()


# ---------------------------------------------------------------------------------- several settings, the table
def test_many_settings_and_the_table_equal_chunks(tiny_lm, tok, examples, batch, count_static_prefills):
    ids, end = batch
    settings = default_settings((0.5, 0.125), baselines=("streaming", "snapkv"))
    many = {mode: greedy_answers_many(tiny_lm, ids, end, settings, LAG, 6, tok.eos_token_id, seed=1,
                                      chunked_prefill=mode) for mode in ("chunks", "parallel")}
    assert count_static_prefills["calls"] == 2, "lagkv/chunked at each ratio, nothing else"
    for s in settings:
        assert many["parallel"][s][0].tolist() == many["chunks"][s][0].tolist(), s
        assert many["parallel"][s][1] == many["chunks"][s][1], s
    rows = {mode: evaluate_model(tiny_lm, tok, examples, settings, LAG, batch_size=4, max_new_tokens=5,
                                 model_name="tiny", progress=False, chunked_prefill=mode)
            for mode in ("chunks", "parallel")}
    assert len(rows["chunks"]) == len(rows["parallel"]) == len(settings)
    for a, b in zip(rows["chunks"], rows["parallel"]):
        expected = {"full": "exact", "lagkv/one_shot": "exact", "lagkv/chunked": "parallel",
                    "streaming/chunked": "chunks", "snapkv/chunked": "chunks"}[a["setting"]]
        assert b["prefill"] == expected and a["prefill"] == ("chunks" if expected == "parallel" else expected)
        same = lambda row: {k: v for k, v in row.items() if k not in ("seconds", "prefill")}  # noqa: E731
        assert same(a) == same(b)
    assert [r["prefill"] for r in results_table({"rows": rows["parallel"]})] == [r["prefill"] for r in rows["parallel"]]
    assert tiny_lm.config._attn_implementation == "sdpa"


def test_other_chunked_policies_go_chunk_by_chunk(tiny_lm, tok, batch, monkeypatch):
    """"parallel" applies to lagkv only: the baselines have no parallel form and never reach `static_prefill`;
    "auto" on the CPU is "chunks" for lagkv too."""
    def refuse(*args, **kwargs):
        raise AssertionError("static_prefill must not run here")

    monkeypatch.setattr(evaluate, "static_prefill", refuse)
    ids, end = batch
    for policy in ("streaming", "random", "snapkv"):
        setting = Setting(policy, "chunked", 0.25)
        assert prefill_of(setting, "parallel") == "chunks"
        (chunks, f_chunks), (parallel, f_parallel) = both(tiny_lm, ids, end, setting, LAG, 4, tok.eos_token_id,
                                                          seed=2)
        assert parallel.tolist() == chunks.tolist() and f_parallel == f_chunks
    greedy_answers(tiny_lm, ids, end, Setting("lagkv", "chunked", 0.25), LAG, 2, tok.eos_token_id)  # auto on CPU
    assert prefill_of(Setting("lagkv", "chunked", 0.25), "auto", "cuda") == "parallel"
    assert prefill_of(Setting("lagkv", "one_shot", 0.25), "parallel") == prefill_of(Setting(), "parallel") == "exact"


# ------------------------------------------------------------------------------ compiled kernels: few shapes
@pytest.fixture
def cuda_paths_on_cpu(monkeypatch):
    """The CUDA code path of the parallel prefill, on the CPU: "auto" resolves to the flex LRSA backend (so the
    cache selects with the compiled selection and the batch is padded, `parallel_batch_rows`) and the fast path
    calls its compiled kernels. ``torch.compile`` gets a counting backend (it runs the traced graph as is): returns
    {compiled function name: compilations} (dynamo compiles once per new shape: dynamic=False), and in its
    ``calls`` attribute {compiled function name: calls of the compiled graphs}."""
    import sys
    from collections import Counter
    import functools

    import lrsa_viz.fast
    import lrsa_viz.static_generate  # noqa: F401 - the module (the package exports a function of that name)

    kernel, attention = sys.modules["lrsa_viz.fast.kernel"], sys.modules["lrsa_viz.attention"]
    counts: Counter = Counter()
    real_compile, real_resolve = torch.compile, attention.resolve_backend

    counts.calls = Counter()  # {compiled function name: calls of its compiled graphs}

    def counting_compile(fn, **kwargs):
        def backend(gm, example_inputs):
            counts[fn.__name__] += 1

            def run(*args):
                counts.calls[fn.__name__] += 1
                return gm.forward(*args)

            return run
        kwargs.pop("mode", None)
        return real_compile(fn, **{**kwargs, "backend": backend})

    def resolve(backend, device):
        return "flex" if (backend or "reference") == "auto" else real_resolve(backend, device)

    monkeypatch.setattr(torch, "compile", counting_compile)
    for module in (attention, sys.modules["lrsa_viz.static_generate"], evaluate):
        monkeypatch.setattr(module, "resolve_backend", resolve)
    monkeypatch.setattr(lrsa_viz.fast, "fast_lrsa_attention", functools.partial(kernel.fast_lrsa_attention,
                                                                                compiled=True))
    caches = (kernel.compiled_flex_attention, kernel.compiled_compact_positions, kernel.compiled_region)
    for f in caches:
        f.cache_clear()
    torch._dynamo.reset()
    yield counts
    for f in caches:  # nothing compiled with the counting backend outlives the test
        f.cache_clear()
    torch._dynamo.reset()


@pytest.mark.parametrize("n", [150, 128])
def test_a_static_prefill_enters_one_compiled_region_per_layer(tiny_lm, cuda_paths_on_cpu, n):
    """On a GPU the batch-1 LRSA prefill runs at host speed (H100, 2026-12-08: 52-55 ms of host work for 36-39 ms of
    GPU work per 16k-token prefill, data/results/bench_h100/bench_inference_prefill_*_fused.json), and each compiled
    call costs ~0.15 ms of host time there (dynamo's lookup, the region, the graph's call). Per layer the prefill
    enters ONE compiled graph: selection, layout, FlexAttention and what the cache keeps (`fast_lrsa_attention`
    with ``return_kept``); the cache compiles and calls nothing of its own (it selected in a second compiled call
    before). That the kept positions equal the cache's own selection: tests/test_static_cache.py."""
    from lrsa_viz.static_generate import static_prefill

    counts = cuda_paths_on_cpu
    cfg = LagConfig(4, 16, 0.25)
    layers = tiny_lm.config.num_hidden_layers
    ids = torch.randint(0, 256, (2, n), generator=torch.Generator().manual_seed(n))
    _, cache = static_prefill(tiny_lm, ids, cfg, backend="auto")
    one_region = {"_attend": layers} if fast_options().fused else {"compact_positions": layers, "flex_attention": layers}
    assert dict(counts.calls) == one_region
    assert not cache._unfilled
    for layer in range(layers):
        assert cache.kept_positions(layer).shape == (2, tiny_lm.config.num_key_value_heads, cfg.retained_length(n))


def test_compiled_one_shot_selection_on_padded_blocks_equals_the_reference():
    """The cache's compiled one-shot selection pads K/V to whole blocks (the fast path's own selection input): the
    same kept positions as the reference selection, for lengths that are not a multiple of the block."""
    from lrsa_viz.scoring import lagkv_keep_indices
    from lrsa_viz.static_cache import one_shot_keep

    cfg = LagConfig(4, 16, 0.25)
    gen = torch.Generator().manual_seed(1)
    k, v = torch.randn(2, 2, 151, 8, generator=gen), torch.randn(2, 2, 151, 8, generator=gen)
    for n in (151, 140, 128, 37, 30):  # 37: two partitions (one scored); 30: one (the reference path)
        kk, vv = k[:, :, :n], v[:, :, :n]
        assert torch.equal(one_shot_keep(kk, vv, cfg, compiled=True), lagkv_keep_indices(kk, vv, cfg)), n


def test_parallel_batch_rows():
    """On CUDA: exactly the batch size when one is given (one compiled shape whatever the data), never fewer than
    the rows; a power of two without one; unchanged elsewhere."""
    from lrsa_viz.evaluate import parallel_batch_rows

    assert {parallel_batch_rows(b, "cuda", 64) for b in (1, 2, 3, 11, 17, 49, 50, 56, 64)} == {64}
    assert parallel_batch_rows(65, "cuda", 64) == 65
    assert [parallel_batch_rows(b, "cuda") for b in (1, 3, 5, 64, 65)] == [1, 4, 8, 64, 128]
    assert parallel_batch_rows(50, "cpu", 201) == 50 and parallel_batch_rows(50, "cpu") == 50
    with pytest.raises(ValueError, match="rows"):
        parallel_batch_rows(0, "cuda")
    with pytest.raises(ValueError, match="max_rows"):
        parallel_batch_rows(3, "cuda", 0)


def test_compiled_kernels_compile_once_per_shape_bucket_whatever_the_model_object(tiny_lm, cuda_paths_on_cpu):
    """What made the suite's base model slow on the H200 (lagkv/chunked rows 108-162 s per job vs 2.4-2.8 s for
    the fine-tuned models on the same data): the compiled static-shape kernels of the parallel prefill (selection,
    FlexAttention) compiled for every new (batch rows, prompt length, LagConfig), and the base model always ran
    first on each seed's test file, whose groups of equal-length prompts have their own sizes (single_needle at
    4000 tokens: 50 + 17 rows for seed 0, 56 + 11 for seed 1, 49 + 18 for seed 2). Nothing is cached per model
    object. Now each layer selects once, in the attention's compiled graph (K/V padded to whole blocks; the cache
    stores what it kept), and every batch is padded to the evaluation's batch size (``max_rows``): one shape per
    block count, and a second "seed" with other group sizes and lengths compiles nothing."""
    counts = cuda_paths_on_cpu
    cfg = LagConfig(4, 16, 0.25)
    setting = Setting("lagkv", "chunked", cfg.ratio)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 256, (8, 150), generator=gen)

    def run(model, rows, n):
        ids = prompts[:rows, :n]
        tokens, fraction = greedy_answers(model, ids, n - 5, setting, cfg, 4, -1, chunked_prefill="parallel",
                                          max_rows=8)
        assert tokens.shape == (rows, 4) and fraction == cfg.retained_length(n) / n
        return tokens

    # the attention's compiled graph: selection + layout + FlexAttention as one region (`_attend`, the default), or
    # the selection and FlexAttention compiled apart (LRSA_VIZ_FUSED_REGION=0); the cache compiles nothing of its own
    once = {"_attend": 1} if fast_options().fused else {"compact_positions": 1, "flex_attention": 1}
    first = {(rows, n): run(tiny_lm, rows, n) for rows, n in ((3, 150), (2, 149))}  # "seed 0": 3 + 2 rows
    assert dict(counts) == once, "3 and 2 rows both run as 8, one block count"
    for (rows, n), tokens in first.items():  # the padding rows change nothing: the tokens of chunk by chunk
        chunks, _ = greedy_answers(tiny_lm, prompts[:rows, :n], n - 5, setting, cfg, 4, -1, chunked_prefill="chunks")
        assert tokens.tolist() == chunks.tolist()
    other = load_source("tiny:0")[0]  # another model object (what load_run gives): nothing compiles again
    assert other is not tiny_lm
    assert all(run(other, rows, n).tolist() == tokens.tolist() for (rows, n), tokens in first.items())
    for rows, n in ((4, 147), (2, 150), (3, 135)):  # "seed 1": other group sizes and lengths (135: one partition
        run(tiny_lm, rows, n)                         # fewer), the same rows (8) and block count
    assert dict(counts) == once, "nothing compiled again"
    assert tiny_lm.config._attn_implementation == "sdpa"


# ------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad", ["Parallel", "chunk", "", None, 1])
def test_bad_chunked_prefill_is_rejected(tiny_lm, tok, examples, batch, bad):
    ids, end = batch
    lagkv = Setting("lagkv", "chunked", 0.25)
    message = r"chunked_prefill must be one of \('auto', 'chunks', 'parallel'\)"
    with pytest.raises(ValueError, match=message):
        greedy_answers(tiny_lm, ids, end, lagkv, LAG, 2, tok.eos_token_id, chunked_prefill=bad)
    with pytest.raises(ValueError, match=message):
        greedy_answers(tiny_lm, ids, end, Setting(), LAG, 2, tok.eos_token_id, chunked_prefill=bad)
    with pytest.raises(ValueError, match=message):
        greedy_answers_many(tiny_lm, ids, end, [Setting(), lagkv], LAG, 2, tok.eos_token_id, chunked_prefill=bad)
    with pytest.raises(ValueError, match=message):
        evaluate_model(tiny_lm, tok, examples, [lagkv], LAG, progress=False, chunked_prefill=bad)
    assert resolve_chunked_prefill("auto", "cpu") == "chunks" and CHUNKED_PREFILLS == ("auto", "chunks", "parallel")


def test_cli_takes_chunked_prefill(tmp_path, examples):
    """``--chunked-prefill parallel`` reaches the rows (and the results record it); argparse rejects other values."""
    from lrsa_viz.qa_data import write_jsonl

    data = str(write_jsonl(tmp_path / "test.jsonl", examples[:2]))
    args = ["--data", data, "--base", "tiny:0", "--sink-size", "8", "--lag-size", "32", "--ratios", "0.25",
            "--baselines", "--max-new-tokens", "2", "--out", str(tmp_path), "--no-progress"]
    results = evaluate.main(args + ["--chunked-prefill", "parallel"])
    assert results["chunked_prefill"] == "parallel"
    assert {r["setting"]: r["prefill"] for r in results["rows"]} == {
        "full": "exact", "lagkv/chunked": "parallel", "lagkv/one_shot": "exact"}
    assert {r["setting"]: r["prefill"] for r in csv.DictReader((tmp_path / "finetune.csv").open())} == {
        "full": "exact", "lagkv/chunked": "parallel", "lagkv/one_shot": "exact"}
    with pytest.raises(SystemExit) as refused:
        evaluate.main(args + ["--chunked-prefill", "fast"])
    assert refused.value.code == 2, "argparse's refusal, not another exit"


# ------------------------------------------------------------------------------------ results of earlier runs
def test_rows_without_prefill_get_the_prefill_they_had(tmp_path):
    """Rows written before ``prefill`` existed were all read chunk by chunk or exactly: the tables (evaluate's and
    the suite's CSV, e.g. of a resumed suite whose first calls predate the field) fill that in."""
    from lrsa_viz.tasks.suite import ROW_KEYS, SuiteConfig, Work, collect, init_work

    assert row_prefill({"pattern": "chunked"}) == "chunks" and row_prefill({"pattern": "none"}) == "exact"
    assert row_prefill({"pattern": "chunked", "prefill": "parallel"}) == "parallel"
    assert "prefill" in ROW_KEYS and "prefill" in evaluate.ROW_FIELDS
    work = Work(tmp_path / "work")
    init_work(work, SuiteConfig(model="tiny:0", seeds=(0,), tasks=("multi_key",), contexts=(400,), ratios=(0.25,),
                                baselines=()))
    common = {"task": "multi_key", "context_tokens": 400, "seed": 0, "model": "base", "ratio": 0.25,
              "metric": "exact_match", "score": 0.5, "exact_match": 0.5, "f1": 0.5, "contains": 0.5, "n": 2,
              "kv_fraction": 0.5, "seconds": 1.0, "predictions": ["1", "2"], "sink_size": 16, "lag_size": 128}
    old = [{**common, "setting": "lagkv/chunked", "policy": "lagkv", "pattern": "chunked"},
           {**common, "setting": "lagkv/one_shot", "policy": "lagkv", "pattern": "one_shot"}]
    new = [{**common, "setting": "lagkv/chunked", "policy": "lagkv", "pattern": "chunked", "prefill": "parallel",
            "model": "full"}]
    for job, rows in (("eval/0/base/core/multi_key/400", old), ("eval/0/full/core/multi_key/400", new)):
        work.mark_done(job, {"rows": rows, "answers": ["1", "3"], "depths": [0.1, 0.2]})
    paths = collect(work, tmp_path / "out", "suite")
    table = {(r["model"], r["setting"]): r["prefill"] for r in csv.DictReader(paths["csv"].open())}
    assert table == {("base", "lagkv/chunked"): "chunks", ("base", "lagkv/one_shot"): "exact",
                     ("full", "lagkv/chunked"): "parallel"}
    assert [r["prefill"] for r in results_table({"rows": old})] == ["chunks", "exact"]


# ------------------------------------------------------------------------------------------------------ CUDA
@CUDA
def test_cuda_parallel_prefill_gives_the_tokens_of_chunks(tok, batch):
    """On the GPU (flex LRSA prefill, float32 tiny model): the same greedy tokens and kv_fraction as chunk by chunk,
    and "auto" takes the parallel path there."""
    model = load_source("tiny:0", device="cuda", dtype=torch.float32)[0]
    ids, end = batch
    ids = ids.cuda()
    for cfg in (LAG, LagConfig(4, 8, 0.5)):
        setting = Setting("lagkv", "chunked", cfg.ratio)
        assert prefill_of(setting, "auto", ids.device) == "parallel"
        (chunks, f_chunks), (parallel, f_parallel) = both(model, ids, end, setting, cfg, 24, tok.eos_token_id)
        assert parallel.tolist() == chunks.tolist() and f_parallel == f_chunks
    assert model.config._attn_implementation == "sdpa"
