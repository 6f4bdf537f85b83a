"""Evaluate greedy answers on long-context QA under full and compressed KV caches, for several models.

Settings (each a row of the results table, per model):
- ``full``: an exact prefill of the document, then the question, on a plain KV cache (nothing evicted).
- ``<policy>/chunked`` at ratio r: the LRSA pattern. The WHOLE prompt (document, question, assistant header) goes
  chunk by chunk (S + 2L tokens, then L at a time) through a recursive `LagKVCache` that compresses after every
  chunk; decoding continues on that cache. Token for token the same as `lrsa_viz.compressed_generate`
  (tested), but computes logits only where they are used.
  For ``lagkv/chunked`` the same prompt can instead go through ONE parallel LRSA forward
  (`lrsa_viz.static_generate.static_prefill`, FlexAttention on CUDA) into a `StaticLagKVCache` that stores what
  that pass selected, decoding over it (``chunked_prefill="parallel"``, the default on CUDA): by METHOD §3 it equals
  chunk-by-chunk prefill given the same selections, so the greedy tokens agree up to near-ties of the nearly flat
  scores (equal on CPU in float32, tested). The baselines have no parallel form: they always go chunk by chunk.
  On CUDA that pass runs compiled static-shape kernels, so each batch is padded to the evaluation's batch size
  (`parallel_batch_rows`; copies of its last prompt, dropped after): one shape per prompt length compiles once for
  every seed, task and model, instead of again for the data-dependent batch sizes of every test file.
- ``<policy>/one_shot`` at ratio r: an exact prefill of the chat header + document, compressed once
  (``LagKVCache(mode="one_shot")``); the question and the answer are appended uncompressed.
Policies: ``lagkv``; the same-budget baselines ``streaming`` (StreamingLLM: sink + most recent), ``random`` and
``snapkv`` (SnapKV: attention of the newest queries, `lrsa_viz.policies.SnapKVPolicy`).

Full KV and every one-shot setting start from the same exact prefill of the document: `greedy_answers_many`
computes it once per batch and hands a copy of its K/V to each of them (token for token what `greedy_answers`
gives setting by setting, tested); chunked settings each run their own prefill of the whole prompt.

Scores: exact match and token F1 of the normalised answer (SQuAD normalisation), ``contains`` (the gold answer
appears among the answer's words) and ``score``, the mean of each example's own metric (its ``metric`` field:
exact match, or set F1 for answers that are sets; `lrsa_viz.tasks.metrics`). ``kv_fraction``: stored / seen
tokens in the cache once the prompt is read, MEASURED (not the nominal ratio). ``prefill``: how the prompt was
read (`prefill_of`): ``exact``, ``chunks`` or ``parallel``.

    python -m lrsa_viz.evaluate --data data/qa/test.jsonl --base default --run full=runs/full \\
        --run lrsa=runs/lrsa --out data/results --name finetune
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import csv
import hashlib
import json
import math
import shlex
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from .checks import check_int
from .attention import resolve_backend
from .cache import LagKVCache
from .cli import add_debug_flag, run_cli
from .config import LagConfig
from .policies import RandomPolicy, SnapKVPolicy, make_policy
from .prefill import prefill_chunks
from .static_cache import StaticLagKVCache
from .static_generate import static_lagkv, static_prefill
from .budget import warn_if_answers_exceed_budget
from .qa_data import encode_prompts, load_examples
from .tasks.metrics import exact_match, normalize_answer, score as task_score

POLICY_NAMES = ("lagkv", "streaming", "random", "snapkv")
BASELINES = ("streaming", "random", "snapkv")
PATTERNS = ("chunked", "one_shot")
DEFAULT_RATIOS = (0.5, 0.25, 0.125)
ROW_FIELDS = ("model", "setting", "policy", "pattern", "prefill", "ratio", "sink_size", "lag_size", "exact_match",
              "f1", "contains", "score", "n", "kv_fraction", "seconds")
#: How ``lagkv/chunked`` settings read the prompt: chunk by chunk through a `LagKVCache` (the teaching path), one
#: parallel LRSA forward into a `StaticLagKVCache`, or "auto" (parallel when the input is on CUDA).
CHUNKED_PREFILLS = ("auto", "chunks", "parallel")


@dataclass(frozen=True)
class Setting:
    """How the KV cache is handled. ``policy`` None = full KV (then pattern and ratio are None too)."""

    policy: str | None = None
    pattern: str | None = None
    ratio: float | None = None

    def __post_init__(self) -> None:
        if self.policy is None:
            if self.pattern is not None or self.ratio is not None:
                raise ValueError("full KV takes no pattern or ratio")
            return
        if self.policy not in POLICY_NAMES:
            raise ValueError(f"policy must be one of {POLICY_NAMES} (or None for full KV), got {self.policy!r}")
        if self.pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {PATTERNS}, got {self.pattern!r}")
        if not isinstance(self.ratio, (int, float)) or not 0 < self.ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio!r}")

    @property
    def name(self) -> str:
        return "full" if self.policy is None else f"{self.policy}/{self.pattern}"


def default_settings(ratios: Sequence[float] = DEFAULT_RATIOS, one_shot_baselines: bool = False,
                     baselines: Sequence[str] = ("streaming", "random")) -> list[Setting]:
    """Full KV; LagKV chunked and one-shot; each baseline policy chunked (and one-shot if asked), per ratio."""
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ValueError(f"baselines must be among {BASELINES}, got {unknown}")
    out = [Setting()]
    for r in ratios:
        out += [Setting("lagkv", "chunked", r), Setting("lagkv", "one_shot", r)]
        out += [Setting(b, "chunked", r) for b in baselines]
        if one_shot_baselines:
            out += [Setting(b, "one_shot", r) for b in baselines]
    return out


# --------------------------------------------------------------------------------------------------------------
# Scores (normalize_answer and exact_match live in lrsa_viz.tasks.metrics, with the task metrics)


def token_f1(prediction: str, gold: str) -> float:
    """Harmonic mean of word precision and recall after normalisation (0 when either side is empty)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref or common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def contains_answer(prediction: str, gold: str) -> float:
    """1.0 if the normalised gold words appear as a contiguous run of the normalised prediction's words."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not ref:
        return 0.0
    return float(any(pred[i:i + len(ref)] == ref for i in range(len(pred) - len(ref) + 1)))


def example_score(prediction: str, example: dict) -> float:
    """The example's own metric (its ``metric`` field, default exact match) of one prediction."""
    return task_score(example.get("metric", "exact_match"), prediction, example["answer"])


# --------------------------------------------------------------------------------------------------------------
# Greedy answers under a cache setting


def setting_config(setting: Setting, lag: LagConfig) -> LagConfig:
    """``lag`` (sink_size, lag_size, score_v_ratio) at the ratio of a compressed ``setting``."""
    return dataclasses.replace(lag, ratio=setting.ratio)


def make_cache(setting: Setting, lag: LagConfig, seed: int = 0):
    """A fresh cache for one batch: DynamicCache for full KV, else a LagKVCache with the setting's policy."""
    if setting.policy is None:
        return DynamicCache()
    policy = RandomPolicy(seed=seed) if setting.policy == "random" else make_policy(setting.policy)
    return LagKVCache(setting_config(setting, lag), mode="recursive" if setting.pattern == "chunked" else "one_shot",
                      policy=policy)


def resolve_chunked_prefill(chunked_prefill: str, device: torch.device | str) -> str:
    """``"chunks"`` or ``"parallel"``: ``chunked_prefill`` (one of CHUNKED_PREFILLS) for inputs on ``device``;
    ``"auto"`` is ``"parallel"`` on CUDA and ``"chunks"`` elsewhere (the CPU keeps the readable teaching path)."""
    if not isinstance(chunked_prefill, str) or chunked_prefill not in CHUNKED_PREFILLS:
        raise ValueError(f"chunked_prefill must be one of {CHUNKED_PREFILLS}, got {chunked_prefill!r}")
    if chunked_prefill == "auto":
        return "parallel" if torch.device(device).type == "cuda" else "chunks"
    return chunked_prefill


def prefill_of(setting: Setting, chunked_prefill: str = "auto", device: torch.device | str = "cpu") -> str:
    """How a prompt on ``device`` is read under ``setting``: ``"exact"`` (full KV and one-shot: an exact prefill of the
    document, then the rest), ``"parallel"`` (``lagkv/chunked`` through one parallel LRSA forward, when
    ``chunked_prefill`` resolves to it) or ``"chunks"`` (every other chunked setting: the baselines have no parallel
    form, so they go chunk by chunk whatever ``chunked_prefill`` says)."""
    mode = resolve_chunked_prefill(chunked_prefill, device)
    if setting.policy is None or setting.pattern == "one_shot":
        return "exact"
    return "parallel" if setting.policy == "lagkv" and mode == "parallel" else "chunks"


def row_prefill(row: dict) -> str:
    """A result row's ``prefill``; rows written before the field existed were all read chunk by chunk (chunked)
    or exactly (full KV, one-shot)."""
    return row.get("prefill") or ("chunks" if row.get("pattern") == "chunked" else "exact")


def prompt_spans(n_tokens: int, context_end: int, setting: Setting, lag: LagConfig) -> list[tuple[int, int]]:
    """[start, end) of the forward passes that read a prompt of ``n_tokens`` under ``setting``.

    Full KV and one-shot: the document (``[0, context_end)``) then the rest; chunked: `prefill_chunks`.
    """
    if setting.policy is not None and setting.pattern == "chunked":
        return prefill_chunks(n_tokens, lag)
    if not 0 < context_end < n_tokens:
        if setting.policy is None:
            return [(0, n_tokens)]
        raise ValueError(f"context_end must be in (0, {n_tokens}) for one-shot compression, got {context_end}")
    return [(0, context_end), (context_end, n_tokens)]


def _check_greedy_inputs(input_ids: torch.Tensor, max_new_tokens: int) -> None:
    if input_ids.ndim != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be [B, N] with N >= 2, got shape {tuple(input_ids.shape)}")
    check_int("max_new_tokens", max_new_tokens, 1)


def _policy_context(model, cache):
    """The policy's `observe` context (SnapKV reads the model's queries), a no-op for the others."""
    return cache.policy.observe(model) if isinstance(cache, LagKVCache) else contextlib.nullcontext()


def _kv_fraction(cache, n_tokens: int) -> float:
    """Stored / seen tokens averaged over layers (a `StaticLagKVCache` stores eq. 12 of the seen tokens in every
    layer, what `LagKVCache.stored_lengths` gives per layer after the same tokens)."""
    if isinstance(cache, LagKVCache):
        stored = cache.stored_lengths()
    elif isinstance(cache, StaticLagKVCache):
        stored = [cache.stored_length()] * len(cache.layers)
    else:
        stored = [n_tokens] * len(cache.layers)
    return sum(stored) / (len(stored) * n_tokens)


def _greedy_decode(model, logits: torch.Tensor, cache, max_new_tokens: int, eos_token_id: int,
                   before_step=None) -> torch.Tensor:
    """Greedy tokens [B, T] from the last prompt logits [B, V], continuing on ``cache``; ``before_step()`` (if
    given) runs before each model call (a static cache's host-scheduled compression)."""
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    out = []
    for step in range(max_new_tokens):
        token = torch.where(done, torch.full_like(done, eos_token_id, dtype=torch.long), logits.argmax(-1))
        out.append(token)
        done |= token == eos_token_id
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        if before_step is not None:
            before_step()
        logits = model(input_ids=token[:, None], past_key_values=cache, use_cache=True).logits[:, -1]
    return torch.stack(out, dim=1)


def parallel_batch_rows(rows: int, device: torch.device | str, max_rows: int | None = None) -> int:
    """Rows the parallel prefill of a batch of ``rows`` prompts on ``device`` runs with.

    Where it runs compiled static-shape kernels (the flex LRSA backend: CUDA), every kernel compiles once per (rows,
    block count, LagConfig), so batch sizes that depend on the data (how many prompts share a length, the last batch
    of a group) would compile again for every new test file. With ``max_rows`` (the evaluation's batch size, its
    memory budget) every batch runs with exactly that many rows (or ``rows`` if more): ONE shape per prompt length
    bucket for all seeds, tasks and models (power-of-two rows, the former rule, still made four shapes per length in
    the task suite: 16, 32, 64 and 128 rows at 4,000 tokens). Without ``max_rows``: the next power of two. Elsewhere
    (the reference backend, nothing compiled): ``rows``.
    """
    check_int("rows", rows, 1)
    if resolve_backend("auto", device) != "flex":
        return rows
    if max_rows is not None:
        return max(rows, check_int("max_rows", max_rows, 1))
    return 1 << (rows - 1).bit_length()


def _parallel_answers(model, input_ids: torch.Tensor, config: LagConfig, max_new_tokens: int,
                      eos_token_id: int, max_rows: int | None = None) -> tuple[torch.Tensor, float]:
    """``lagkv/chunked`` through one parallel LRSA forward: the prompt [B, N] into a `StaticLagKVCache` sized for
    N + max_new_tokens (`static_prefill`), then `_greedy_decode` over it with the static attention implementation
    (`static_lagkv`, which compresses every L tokens in place). Returns (tokens [B, T], kv_fraction) like
    `greedy_answers`; the model's attention implementation is left as it was.

    On CUDA the batch is padded to `parallel_batch_rows` rows with copies of its last prompt (each row is read and
    decoded on its own; the copies' tokens are dropped), so the compiled kernels see few batch shapes."""
    b, n = input_ids.shape
    rows = parallel_batch_rows(b, input_ids.device, max_rows)
    if rows > b:
        input_ids = torch.cat([input_ids, input_ids[-1:].expand(rows - b, -1)])
    logits, cache = static_prefill(model, input_ids, config, max_cache_len=n + max_new_tokens)  # logits [rows, 1, V]
    kv_fraction = _kv_fraction(cache, n)
    with static_lagkv(model, config), cache.host_scheduled_compression():  # compress only when a partition is due
        tokens = _greedy_decode(model, logits[:, -1], cache, max_new_tokens, eos_token_id,
                                before_step=lambda: cache.before_update(1))
    cache.check_overflow()
    return tokens[:b], kv_fraction


@torch.no_grad()
def greedy_answers(model, input_ids: torch.Tensor, context_end: int, setting: Setting, lag: LagConfig,
                   max_new_tokens: int, eos_token_id: int, seed: int = 0,
                   chunked_prefill: str = "auto", max_rows: int | None = None) -> tuple[torch.Tensor, float]:
    """Greedy decoding of an unpadded batch of prompts under one cache setting.

    Args:
        input_ids: [B, N] prompts of one length (no padding: LagKV partitions must line up).
        context_end: prompt tokens before the question (one-shot compresses ``input_ids[:, :context_end]``).
        lag: sink_size, lag_size and score_v_ratio of the LagKV caches (the ratio comes from ``setting``).
        chunked_prefill: how ``lagkv/chunked`` reads the prompt, one of CHUNKED_PREFILLS: ``"chunks"`` (chunk by
            chunk through a `LagKVCache`), ``"parallel"`` (one parallel LRSA forward into a `StaticLagKVCache`;
            needs a model family LRSA supports) or ``"auto"`` (parallel when ``input_ids`` is on CUDA). Other
            policies' chunked settings always go chunk by chunk (`prefill_of`).
        max_rows: the most rows a batch of this evaluation has; a parallel prefill on CUDA pads the batch to
            this many rows (`parallel_batch_rows`). None: to a power of two.
    Returns:
        (new tokens [B, T] with T <= max_new_tokens, eos_token_id after a row's end; kv_fraction = stored / seen
        tokens averaged over layers once the prompt is read).
    """
    _check_greedy_inputs(input_ids, max_new_tokens)
    if prefill_of(setting, chunked_prefill, input_ids.device) == "parallel":
        return _parallel_answers(model, input_ids, setting_config(setting, lag), max_new_tokens, eos_token_id,
                                 max_rows)
    cache = make_cache(setting, lag, seed)
    n = input_ids.shape[1]
    with _policy_context(model, cache):
        for start, end in prompt_spans(n, context_end, setting, lag):
            logits = model(input_ids=input_ids[:, start:end], past_key_values=cache, use_cache=True,
                           logits_to_keep=1).logits[:, -1]
        kv_fraction = _kv_fraction(cache, n)
        return _greedy_decode(model, logits, cache, max_new_tokens, eos_token_id), kv_fraction


@torch.no_grad()
def greedy_answers_many(model, input_ids: torch.Tensor, context_end: int, settings: Sequence[Setting],
                        lag: LagConfig, max_new_tokens: int, eos_token_id: int, seed: int = 0,
                        seconds: dict | None = None, chunked_prefill: str = "auto",
                        max_rows: int | None = None) -> dict[Setting, tuple[torch.Tensor, float]]:
    """`greedy_answers` for several settings, with ONE exact prefill of the document shared by full KV and every
    one-shot setting (each gets a copy of its K/V, compressed once by its own policy); chunked settings run on their
    own, ``lagkv/chunked`` as ``chunked_prefill`` says (`greedy_answers`).

    Returns:
        {setting: (tokens [B, T], kv_fraction)}, token for token what `greedy_answers` returns (tested).
    ``seconds``: if given, the wall time of each setting is added to ``seconds[setting]`` (the shared prefill is
    counted in the full-KV setting, or in the first one-shot setting without it). ``max_rows``: see `greedy_answers`.
    """
    _check_greedy_inputs(input_ids, max_new_tokens)
    resolve_chunked_prefill(chunked_prefill, input_ids.device)  # bad values fail before any work
    n = input_ids.shape[1]
    device = input_ids.device
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def timed(setting, t0):
        sync()
        if seconds is not None:
            seconds[setting] = seconds.get(setting, 0.0) + time.perf_counter() - t0

    shared = [s for s in settings if s.policy is None or s.pattern == "one_shot"] if 0 < context_end < n else []
    out: dict[Setting, tuple[torch.Tensor, float]] = {}
    if shared:
        t0 = time.perf_counter()
        records: dict[int, tuple[torch.Tensor, float]] = {}
        snap = any(s.policy == "snapkv" for s in shared)
        prefix = DynamicCache()
        with SnapKVPolicy().observe(model, record=records) if snap else contextlib.nullcontext():
            model(input_ids=input_ids[:, :context_end], past_key_values=prefix, use_cache=True, logits_to_keep=1)
        kv = [(layer.keys, layer.values) for layer in prefix.layers]
        del prefix
        prefill_s = time.perf_counter() - t0
        first = next((s for s in shared if s.policy is None), shared[0])
        for s in shared:
            t0 = time.perf_counter() - (prefill_s if s == first else 0.0)
            cache = make_cache(s, lag, seed)
            for i, (k, v) in enumerate(kv):
                if s.policy == "snapkv":
                    cache.policy.set_queries(*records[i])
                cache.update(k, v, i)
            with _policy_context(model, cache):
                logits = model(input_ids=input_ids[:, context_end:], past_key_values=cache, use_cache=True,
                               logits_to_keep=1).logits[:, -1]
                fraction = _kv_fraction(cache, n)
                out[s] = (_greedy_decode(model, logits, cache, max_new_tokens, eos_token_id), fraction)
            del cache
            timed(s, t0)
    for s in settings:
        if s not in out:
            t0 = time.perf_counter()
            out[s] = greedy_answers(model, input_ids, context_end, s, lag, max_new_tokens, eos_token_id, seed,
                                    chunked_prefill, max_rows)
            timed(s, t0)
    return out


def decode_answer(tokenizer, tokens: Sequence[int]) -> str:
    """Text of generated tokens up to the first eos, special tokens dropped, first line only, stripped."""
    tokens = list(tokens)
    if tokenizer.eos_token_id in tokens:
        tokens = tokens[:tokens.index(tokenizer.eos_token_id)]
    text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
    return text.split("\n")[0].strip()


def group_prompts(tokenizer, examples: Sequence[dict]) -> dict[tuple[int, int], list[tuple[int, list[int]]]]:
    """Examples grouped by (prompt length, context_end): {key: [(example index, prompt ids), ...]}."""
    groups: dict[tuple[int, int], list[tuple[int, list[int]]]] = defaultdict(list)
    for i, (ids, context_end) in enumerate(encode_prompts(tokenizer, examples)):
        groups[(len(ids), context_end)].append((i, ids))
    return dict(groups)


def budget_examples(examples: Sequence[dict]) -> list[dict]:
    """What the answer-budget check must see: every string an answer is read back from (an example's
    ``retrieve`` list, e.g. each value of a set answer), else its whole answer."""
    return [{"answer": part} for ex in examples for part in (ex.get("retrieve") or [ex["answer"]])]


def evaluate_model(model, tokenizer, examples: Sequence[dict], settings: Sequence[Setting], lag: LagConfig,
                   batch_size: int = 16, max_new_tokens: int = 16, seed: int = 0, model_name: str = "model",
                   progress: bool = True, chunked_prefill: str = "auto") -> list[dict]:
    """One result row per setting (see ROW_FIELDS) with the answers in ``row["predictions"]``.

    Prompts of equal length (and equal context_end) are batched together, ``batch_size`` at a time; within a
    batch every setting is run (`greedy_answers_many`; ``chunked_prefill``: how ``lagkv/chunked`` reads the
    prompt, see `greedy_answers`). Each row's ``prefill`` says how its prompts were read (`prefill_of`).
    """
    check_int("batch_size", batch_size, 1)
    if not examples:
        raise ValueError("examples: nothing to evaluate")
    if not settings or len(set(settings)) != len(settings):
        raise ValueError(f"settings: need at least one setting and no repeats, got {list(settings)}")
    device = next(model.parameters()).device
    resolve_chunked_prefill(chunked_prefill, device)
    parts = budget_examples(examples)
    for ratio in sorted({s.ratio for s in settings if s.policy is not None}):  # answers that cannot be kept whole
        warn_if_answers_exceed_budget(tokenizer, parts, dataclasses.replace(lag, ratio=ratio),
                                      f"evaluate {model_name} at ratio {ratio}")
    groups = group_prompts(tokenizer, examples)
    batches = [(key[1], members[i:i + batch_size]) for key, members in sorted(groups.items())
               for i in range(0, len(members), batch_size)]
    predictions: dict[Setting, list[str | None]] = {s: [None] * len(examples) for s in settings}
    fractions: dict[Setting, list[tuple[float, int]]] = {s: [] for s in settings}
    seconds: dict[Setting, float] = {}
    for context_end, members in tqdm(batches, desc=f"evaluate {model_name}", disable=not progress):
        ids = torch.tensor([m[1] for m in members], device=device)
        answers = greedy_answers_many(model, ids, context_end, settings, lag, max_new_tokens,
                                      tokenizer.eos_token_id, seed=seed, seconds=seconds,
                                      chunked_prefill=chunked_prefill, max_rows=batch_size)
        for setting, (tokens, fraction) in answers.items():
            for (index, _), row_tokens in zip(members, tokens.tolist()):
                predictions[setting][index] = decode_answer(tokenizer, row_tokens)
            fractions[setting].append((fraction, len(members)))
    golds = [ex["answer"] for ex in examples]
    n = len(examples)
    rows = []
    for setting in settings:
        preds = predictions[setting]
        rows.append({
            "model": model_name, "setting": setting.name, "policy": setting.policy or "none",
            "pattern": setting.pattern or "none", "prefill": prefill_of(setting, chunked_prefill, device),
            "ratio": setting.ratio if setting.ratio is not None else 1.0,
            "sink_size": lag.sink_size, "lag_size": lag.lag_size,
            "exact_match": sum(map(exact_match, preds, golds)) / n,
            "f1": sum(map(token_f1, preds, golds)) / n,
            "contains": sum(map(contains_answer, preds, golds)) / n,
            "score": sum(map(example_score, preds, examples)) / n,
            "n": n, "kv_fraction": sum(f * k for f, k in fractions[setting]) / n,
            "seconds": round(seconds.get(setting, 0.0), 3), "predictions": preds,
        })
    return rows


@torch.no_grad()
def prose_loss(model, tokenizer, texts: Sequence[str], max_tokens: int = 8192) -> dict[str, float]:
    """Language-model loss of ``model`` on plain texts with the full cache (one exact forward per text).

    Returns:
        {"loss": mean next-token cross-entropy over all predicted tokens (nats), "tokens": how many,
        "perplexity": exp(loss)}. Each text is cut to ``max_tokens`` tokens.
    """
    if not texts:
        raise ValueError("texts: need at least one text")
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
        if len(ids) < 2:
            raise ValueError(f"texts: every text needs at least 2 tokens, got {len(ids)}")
        x = torch.tensor([ids], device=device)
        logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum"))
        count += len(ids) - 1
    return {"loss": total / count, "tokens": count, "perplexity": math.exp(total / count)}


# --------------------------------------------------------------------------------------------------------------
# The experiment: several models, one table


def file_sha256(path: str | Path) -> str:
    p = Path(path)
    if p.is_dir():
        return ""
    return hashlib.sha256(p.read_bytes()).hexdigest()


def run_evaluation(models: dict[str, Callable[[], tuple]], examples: Sequence[dict], settings: Sequence[Setting],
                   lag: LagConfig, batch_size: int, max_new_tokens: int, seed: int = 0,
                   progress: bool = True, chunked_prefill: str = "auto") -> list[dict]:
    """Rows of every model under every setting. ``models``: name -> loader returning (model, tokenizer)."""
    resolve_chunked_prefill(chunked_prefill, "cpu")
    rows = []
    for name, loader in models.items():
        model, tokenizer = loader()
        rows += evaluate_model(model, tokenizer, examples, settings, lag, batch_size, max_new_tokens, seed, name,
                               progress, chunked_prefill)
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def collect_curves(runs: dict[str, str | Path]) -> list[dict]:
    """Loss curves of training runs as one list of rows, each with its run name."""
    from .train import read_curve

    out = []
    for name, run_dir in runs.items():
        path = Path(run_dir) / "loss_curve.csv"
        if path.exists():
            out += [{"run": name, **row} for row in read_curve(path)]
    return out


def write_results(results: dict, out_dir: str | Path, name: str) -> dict[str, Path]:
    """``{name}.json`` (everything), ``{name}.csv`` (the table, with command/seed/torch/device in every row) and
    ``{name}_curves.csv`` (training curves, if any). Returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{name}.json", "csv": out_dir / f"{name}.csv"}
    paths["json"].write_text(json.dumps(results, indent=1) + "\n")
    meta = {"command": results["command"], "seed": results["seed"], "torch": results["environment"]["torch"],
            "device": results["environment"]["device"]}
    with paths["csv"].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(ROW_FIELDS) + list(meta))
        w.writeheader()
        for row in results_table(results):
            w.writerow({**row, **meta})
    if results.get("curves"):
        paths["curves"] = out_dir / f"{name}_curves.csv"
        fields = ["run"] + [k for k in results["curves"][0] if k != "run"]
        with paths["curves"].open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(results["curves"])
    return paths


def read_results(path: str | Path) -> dict:
    """A results JSON written by `write_results`."""
    return json.loads(Path(path).read_text())


def results_table(results: dict) -> list[dict]:
    """The rows without their predictions (for display); rows of older files without ``score`` get their exact
    match (the metric of the single-answer task), without ``prefill`` the prefill they had (`row_prefill`)."""
    old = {"score": lambda row: row.get("score", row["exact_match"]), "prefill": row_prefill}
    return [{k: old[k](row) if k in old else row[k] for k in ROW_FIELDS} for row in results["rows"]]


# --------------------------------------------------------------------------------------------------------------
# CLI


def parse_runs(items: Sequence[str]) -> dict[str, str]:
    runs = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--run must be NAME=RUN_DIR, got {item!r}")
        runs[name] = path
    return runs


def main(argv: Sequence[str] | None = None) -> dict:
    from .profile import environment_record
    from .train import load_run, load_source

    p = argparse.ArgumentParser(prog="python -m lrsa_viz.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="test JSONL file or datasets directory")
    p.add_argument("--split", default="test", help="split name for a DatasetDict directory")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first LIMIT examples only")
    p.add_argument("--base", default="default",
                   help="base model source (GGUF, directory, tiny[:seed]; 'default' = SmolLM2), or 'none' to skip")
    p.add_argument("--run", action="append", default=[], help="NAME=RUN_DIR of a finished lrsa_viz.train run")
    p.add_argument("--ratios", type=float, nargs="+", default=list(DEFAULT_RATIOS))
    p.add_argument("--sink-size", type=int, default=16)
    p.add_argument("--lag-size", type=int, default=128)
    p.add_argument("--baselines", nargs="*", choices=BASELINES, default=["streaming", "random"],
                   help="same-budget baseline policies (chunked rows; one-shot too with --one-shot-baselines)")
    p.add_argument("--one-shot-baselines", action="store_true", help="also one-shot rows of the baselines")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="seed of the random-selection baseline")
    p.add_argument("--chunked-prefill", choices=CHUNKED_PREFILLS, default="auto",
                   help="lagkv/chunked rows: chunk by chunk through a LagKVCache, or one parallel LRSA forward into a "
                        "StaticLagKVCache (equal up to near-ties of the scores); auto = parallel on CUDA. The "
                        "baselines' chunked rows always go chunk by chunk")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto", help="auto: bf16 on CUDA")
    p.add_argument("--out", default="data/results")
    p.add_argument("--name", default="finetune")
    p.add_argument("--experiment", default=None, help="the command that ran the whole experiment, to record")
    p.add_argument("--no-progress", action="store_true")
    add_debug_flag(p)
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(a.dtype) or (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    lag = LagConfig(sink_size=a.sink_size, lag_size=a.lag_size, ratio=min(a.ratios))
    settings = default_settings(a.ratios, a.one_shot_baselines, a.baselines)
    examples = load_examples(a.data, split=a.split, limit=a.limit)
    runs = parse_runs(a.run)
    models: dict[str, Callable[[], tuple]] = {}
    if a.base != "none":
        source = None if a.base == "default" else a.base
        models["base"] = lambda: load_source(source, device=device, dtype=dtype)
    run_info = {}
    for name, run_dir in runs.items():
        models[name] = (lambda d=run_dir: load_run(d, device=device, dtype=dtype)[:2])
        info_file = Path(run_dir) / "run_info.json"
        run_info[name] = {
            "run_dir": str(run_dir),
            "train_config": json.loads((Path(run_dir) / "train_config.json").read_text()),
            **(json.loads(info_file.read_text()) if info_file.exists() else {}),
        }
    if not models:
        raise ValueError("nothing to evaluate: give --base and/or --run NAME=RUN_DIR")
    rows = run_evaluation(models, examples, settings, lag, a.batch_size, a.max_new_tokens, a.seed,
                          progress=not a.no_progress, chunked_prefill=a.chunked_prefill)
    results = {
        "command": "python -m lrsa_viz.evaluate " + shlex.join(sys.argv[1:] if argv is None else list(argv)),
        "experiment": a.experiment,
        "seed": a.seed,
        "environment": environment_record(),
        "dtype": str(dtype).replace("torch.", ""),
        "data": {"path": str(a.data), "sha256": file_sha256(a.data), "n": len(examples)},
        "lag": {"sink_size": a.sink_size, "lag_size": a.lag_size, "ratios": a.ratios,
                "top_k": {str(r): int(r * a.lag_size) for r in a.ratios}},
        "max_new_tokens": a.max_new_tokens,
        "chunked_prefill": a.chunked_prefill,
        "base": a.base,
        "runs": run_info,
        "rows": rows,
        "curves": collect_curves(runs),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    paths = write_results(results, a.out, a.name)
    print_table(results, file=sys.stderr)
    for kind, path in paths.items():
        print(f"{kind}: {path}", file=sys.stderr)
    return results


def print_table(results: dict, file=sys.stdout) -> None:
    """A plain-text view of the table: one line per (model, setting, ratio)."""
    print(f"{'model':<8} {'setting':<20} {'ratio':>6} {'EM':>6} {'F1':>6} {'contains':>8} {'score':>6} {'kv':>6} "
          f"{'s':>7}", file=file)
    for r in results_table(results):
        print(f"{r['model']:<8} {r['setting']:<20} {r['ratio']:>6.3f} {r['exact_match']:>6.3f} {r['f1']:>6.3f} "
              f"{r['contains']:>8.3f} {r['score']:>6.3f} {r['kv_fraction']:>6.3f} "
              f"{r['seconds']:>7.1f}", file=file)


if __name__ == "__main__":
    sys.exit(run_cli(main))
