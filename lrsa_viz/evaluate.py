"""Evaluate greedy answers on long-context QA under full and compressed KV caches, for several models.

Settings (each a row of the results table, per model):
- ``full``: the whole prompt in one exact prefill, a plain KV cache.
- ``<policy>/chunked`` at ratio r: the LRSA pattern. The WHOLE prompt (document, question, assistant header) goes
  chunk by chunk (S + 2L tokens, then L at a time) through a recursive `LagKVCache` that compresses after every
  chunk; decoding continues on that cache. Token for token the same as `lrsa_viz.compressed_generate`
  (tested), but computes logits only where they are used.
- ``<policy>/one_shot`` at ratio r: an exact prefill of the chat header + document, compressed once
  (``LagKVCache(mode="one_shot")``); the question and the answer are appended uncompressed.
Policies: ``lagkv``; the same-budget baselines ``streaming`` (StreamingLLM: sink + most recent) and ``random``.

Scores: exact match and token F1 of the normalised answer (SQuAD normalisation), and ``contains`` (the gold answer
appears among the answer's words). ``kv_fraction``: stored / seen tokens in the cache once the prompt is read.

    python -m lrsa_viz.evaluate --data data/qa/test.jsonl --base default --run full=runs/full \\
        --run lrsa=runs/lrsa --out data/results --name finetune
"""
from __future__ import annotations

import argparse
import dataclasses
import csv
import hashlib
import json
import re
import shlex
import string
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from .cache import LagKVCache
from .config import LagConfig
from .policies import RandomPolicy, make_policy
from .prefill import prefill_chunks
from .budget import warn_if_answers_exceed_budget
from .qa_data import encode_prompts, load_examples

POLICY_NAMES = ("lagkv", "streaming", "random")
PATTERNS = ("chunked", "one_shot")
DEFAULT_RATIOS = (0.5, 0.25, 0.125)
ROW_FIELDS = ("model", "setting", "policy", "pattern", "ratio", "sink_size", "lag_size", "exact_match", "f1",
              "contains", "n", "kv_fraction", "seconds")


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


def default_settings(ratios: Sequence[float] = DEFAULT_RATIOS, one_shot_baselines: bool = False) -> list[Setting]:
    """Full KV; LagKV chunked and one-shot; StreamingLLM and random chunked (and one-shot if asked), per ratio."""
    out = [Setting()]
    for r in ratios:
        out += [Setting("lagkv", "chunked", r), Setting("lagkv", "one_shot", r), Setting("streaming", "chunked", r),
                Setting("random", "chunked", r)]
        if one_shot_baselines:
            out += [Setting("streaming", "one_shot", r), Setting("random", "one_shot", r)]
    return out


# --------------------------------------------------------------------------------------------------------------
# Scores


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


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


# --------------------------------------------------------------------------------------------------------------
# Greedy answers under a cache setting


def make_cache(setting: Setting, lag: LagConfig, seed: int = 0):
    """A fresh cache for one batch: DynamicCache for full KV, else a LagKVCache with the setting's policy."""
    if setting.policy is None:
        return DynamicCache()
    cfg = LagConfig(sink_size=lag.sink_size, lag_size=lag.lag_size, ratio=setting.ratio,
                    score_v_ratio=lag.score_v_ratio)
    policy = RandomPolicy(seed=seed) if setting.policy == "random" else make_policy(setting.policy)
    return LagKVCache(cfg, mode="recursive" if setting.pattern == "chunked" else "one_shot", policy=policy)


def prompt_spans(n_tokens: int, context_end: int, setting: Setting, lag: LagConfig) -> list[tuple[int, int]]:
    """[start, end) of the forward passes that read a prompt of ``n_tokens`` under ``setting``."""
    if setting.policy is None:
        return [(0, n_tokens)]
    if setting.pattern == "chunked":
        return prefill_chunks(n_tokens, lag)
    if not 0 < context_end < n_tokens:
        raise ValueError(f"context_end must be in (0, {n_tokens}) for one-shot compression, got {context_end}")
    return [(0, context_end), (context_end, n_tokens)]


@torch.no_grad()
def greedy_answers(model, input_ids: torch.Tensor, context_end: int, setting: Setting, lag: LagConfig,
                   max_new_tokens: int, eos_token_id: int, seed: int = 0) -> tuple[torch.Tensor, float]:
    """Greedy decoding of an unpadded batch of prompts under one cache setting.

    Args:
        input_ids: [B, N] prompts of one length (no padding: LagKV partitions must line up).
        context_end: prompt tokens before the question (one-shot compresses ``input_ids[:, :context_end]``).
        lag: sink_size, lag_size and score_v_ratio of the LagKV caches (the ratio comes from ``setting``).
    Returns:
        (new tokens [B, T] with T <= max_new_tokens, eos_token_id after a row's end; kv_fraction = stored / seen
        tokens averaged over layers once the prompt is read).
    """
    if input_ids.ndim != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be [B, N] with N >= 2, got shape {tuple(input_ids.shape)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    cache = make_cache(setting, lag, seed)
    n = input_ids.shape[1]
    logits = None
    for start, end in prompt_spans(n, context_end, setting, lag):
        logits = model(input_ids=input_ids[:, start:end], past_key_values=cache, use_cache=True,
                       logits_to_keep=1).logits[:, -1]
    stored = cache.stored_lengths() if isinstance(cache, LagKVCache) else [n] * len(cache.layers)
    kv_fraction = sum(stored) / (len(stored) * n)
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    out = []
    for step in range(max_new_tokens):
        token = torch.where(done, torch.full_like(done, eos_token_id, dtype=torch.long), logits.argmax(-1))
        out.append(token)
        done |= token == eos_token_id
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits = model(input_ids=token[:, None], past_key_values=cache, use_cache=True).logits[:, -1]
    return torch.stack(out, dim=1), kv_fraction


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


def evaluate_model(model, tokenizer, examples: Sequence[dict], settings: Sequence[Setting], lag: LagConfig,
                   batch_size: int = 16, max_new_tokens: int = 16, seed: int = 0, model_name: str = "model",
                   progress: bool = True) -> list[dict]:
    """One result row per setting (see ROW_FIELDS) with the answers in ``row["predictions"]``.

    Prompts of equal length (and equal context_end) are batched together, ``batch_size`` at a time.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not examples:
        raise ValueError("examples: nothing to evaluate")
    for ratio in sorted({s.ratio for s in settings if s.policy is not None}):  # answers that cannot be kept whole
        warn_if_answers_exceed_budget(tokenizer, examples, dataclasses.replace(lag, ratio=ratio),
                                      f"evaluate {model_name} at ratio {ratio}")
    device = next(model.parameters()).device
    groups = group_prompts(tokenizer, examples)
    batches = [(key[1], members[i:i + batch_size]) for key, members in sorted(groups.items())
               for i in range(0, len(members), batch_size)]
    rows = []
    bar = tqdm(total=len(settings) * len(batches), desc=f"evaluate {model_name}", disable=not progress)
    for setting in settings:
        predictions: list[str | None] = [None] * len(examples)
        fractions: list[tuple[float, int]] = []
        t0 = time.perf_counter()
        for context_end, members in batches:
            ids = torch.tensor([m[1] for m in members], device=device)
            tokens, fraction = greedy_answers(model, ids, context_end, setting, lag, max_new_tokens,
                                              tokenizer.eos_token_id, seed=seed)
            for (index, _), row_tokens in zip(members, tokens.tolist()):
                predictions[index] = decode_answer(tokenizer, row_tokens)
            fractions.append((fraction, len(members)))
            bar.update(1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        golds = [ex["answer"] for ex in examples]
        n = len(examples)
        rows.append({
            "model": model_name, "setting": setting.name, "policy": setting.policy or "none",
            "pattern": setting.pattern or "none", "ratio": setting.ratio if setting.ratio is not None else 1.0,
            "sink_size": lag.sink_size, "lag_size": lag.lag_size,
            "exact_match": sum(map(exact_match, predictions, golds)) / n,
            "f1": sum(map(token_f1, predictions, golds)) / n,
            "contains": sum(map(contains_answer, predictions, golds)) / n,
            "n": n, "kv_fraction": sum(f * k for f, k in fractions) / n,
            "seconds": round(time.perf_counter() - t0, 3), "predictions": predictions,
        })
    bar.close()
    return rows


# --------------------------------------------------------------------------------------------------------------
# The experiment: several models, one table


def file_sha256(path: str | Path) -> str:
    p = Path(path)
    if p.is_dir():
        return ""
    return hashlib.sha256(p.read_bytes()).hexdigest()


def run_evaluation(models: dict[str, Callable[[], tuple]], examples: Sequence[dict], settings: Sequence[Setting],
                   lag: LagConfig, batch_size: int, max_new_tokens: int, seed: int = 0,
                   progress: bool = True) -> list[dict]:
    """Rows of every model under every setting. ``models``: name -> loader returning (model, tokenizer)."""
    rows = []
    for name, loader in models.items():
        model, tokenizer = loader()
        rows += evaluate_model(model, tokenizer, examples, settings, lag, batch_size, max_new_tokens, seed, name,
                               progress)
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
        for row in results["rows"]:
            w.writerow({**{k: row[k] for k in ROW_FIELDS}, **meta})
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
    """The rows without their predictions (for display)."""
    return [{k: row[k] for k in ROW_FIELDS} for row in results["rows"]]


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
    p.add_argument("--one-shot-baselines", action="store_true", help="also streaming/random one-shot rows")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="seed of the random-selection baseline")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto", help="auto: bf16 on CUDA")
    p.add_argument("--out", default="data/results")
    p.add_argument("--name", default="finetune")
    p.add_argument("--experiment", default=None, help="the command that ran the whole experiment, to record")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(a.dtype) or (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    lag = LagConfig(sink_size=a.sink_size, lag_size=a.lag_size, ratio=min(a.ratios))
    settings = default_settings(a.ratios, a.one_shot_baselines)
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
                          progress=not a.no_progress)
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
    print(f"{'model':<8} {'setting':<20} {'ratio':>6} {'EM':>6} {'F1':>6} {'contains':>8} {'kv':>6} {'s':>7}",
          file=file)
    for r in results["rows"]:
        print(f"{r['model']:<8} {r['setting']:<20} {r['ratio']:>6.3f} {r['exact_match']:>6.3f} {r['f1']:>6.3f} "
              f"{r['contains']:>8.3f} {r['kv_fraction']:>6.3f} {r['seconds']:>7.1f}", file=file)


if __name__ == "__main__":
    main()
