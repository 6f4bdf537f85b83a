"""Fine-tune a causal LM on long-context QA with full attention or with LRSA, under one data order, optimiser,
schedule and seed, so that the two runs differ only in the attention mask.

    python -m lrsa_viz.train --modes full lrsa --train-data data/qa/train.jsonl --dev-data data/qa/dev.jsonl \\
        --out runs/ --steps 200 --batch-size 16

Each run writes into ``OUT/<mode>/``: ``model.safetensors`` (final weights), ``lag_config.json`` (the LagConfig of
an LRSA run), ``train_config.json``, ``loss_curve.csv`` and ``checkpoint/`` (the latest accelerate state: weights as
safetensors, optimiser, scheduler and RNG states, plus ``trainer_state.json``). ``--resume`` continues from it
without losing a step: the data order is a function of (seed, step) and the loss history is restored.

Several GPUs: the same command under ``accelerate launch --num_processes N -m lrsa_viz.train ...`` or
``torchrun --nproc_per_node N -m lrsa_viz.train ...`` (DDP through accelerate; each process takes every N-th
example of a global batch, so the global batch and the loss are those of one process).

The loss is the mean cross-entropy over answer tokens only; logits are computed at those positions alone.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .checks import check_int
from .attention import check_right_padding, enable_lrsa
from .config import LagConfig
from .budget import warn_if_answers_exceed_budget
from .cli import add_debug_flag, run_cli
from .qa_data import IGNORE_INDEX, collate, encode_examples, load_examples, load_tokenizer

MODES = ("full", "lrsa")
TINY_PREFIX = "tiny"  # model source "tiny" or "tiny:SEED": the tiny random Llama with the default tokenizer's vocab
DEV_PAD_MULTIPLE = 512  # dev batches are padded to a multiple of this: few shapes for compiled kernels
CURVE_FIELDS = ("step", "train_loss", "lr", "grad_norm", "tokens", "elapsed_s", "dev_loss", "dev_exact_match")


@dataclass
class TrainConfig:
    """One training run. Ranges are checked by `check`.

    Attributes:
        mode: "full" (plain causal attention) or "lrsa" (the LRSA mask with ``lag``).
        train_data, dev_data: JSONL files or datasets directories (see `lrsa_viz.qa_data.load_examples`).
        out_dir: where this run writes (a directory per run).
        model: model source: None (default SmolLM2), a GGUF / model directory, or "tiny[:seed]".
        steps: optimiser steps (>= 1). batch_size: examples per step, all processes together (>= 1).
        micro_batch_size: examples per forward/backward on one process (gradient accumulation up to batch_size).
        lr, weight_decay, warmup_steps, max_grad_norm: AdamW with linear warm-up then cosine decay to 0.
        seed: model init (tiny), data order and RNG. lag: the LagConfig of LRSA (saved with every LRSA run).
        eval_every: steps between dev evaluations (0: only at the end). eval_examples: dev examples used.
        save_every: steps between checkpoints (0: only at the end). stop_after: stop (with a checkpoint) after this
            step, for time-limited sessions and resume tests; the schedule still spans ``steps``.
        precision: "auto" (bf16 autocast on CUDA, fp32 on CPU), "bf16" or "fp32".
        max_train_examples: read at most this many training examples (None: all).
        group_by_length: draw every global batch from one length bucket (examples' ``context_tokens``, else their
            token count in steps of 1024), so a mixture of 4k and 8k documents is not padded to 8k.
        micro_batch_tokens: if set, a micro-batch holds at most this many tokens (at least one example): the
            largest divisor of the per-process batch whose micro-batches of the widest prompt of the bucket (of the
            batch without grouping) fit, e.g. 40960 = 4 examples of 8k or 8 of 4k for a batch of 16; overrides
            micro_batch_size. A fixed size per bucket keeps compiled kernels (FlexAttention) to few shapes.
        max_seconds: stop (with a checkpoint, resumable) once this run has trained this long in this call, for
            time-limited sessions; the schedule still spans ``steps``.
        train_split, dev_split: split names when the data is a DatasetDict directory (ignored for JSONL).
        lrsa_backend: passed to `enable_lrsa` ("auto", "reference": dense mask, "flex").
    """

    mode: str
    train_data: str
    out_dir: str
    dev_data: str | None = None
    model: str | None = None
    steps: int = 100
    batch_size: int = 8
    micro_batch_size: int | None = None
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    seed: int = 0
    lag: dict = field(default_factory=lambda: LagConfig().to_dict())
    eval_every: int = 0
    eval_examples: int = 64
    save_every: int = 0
    stop_after: int | None = None
    precision: str = "auto"
    max_train_examples: int | None = None
    group_by_length: bool = False
    micro_batch_tokens: int | None = None
    max_seconds: float | None = None
    train_split: str = "train"
    dev_split: str = "validation"
    lrsa_backend: str = "auto"

    def check(self) -> "TrainConfig":
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        for name, lo in (("steps", 1), ("batch_size", 1), ("warmup_steps", 0), ("eval_every", 0),
                         ("eval_examples", 1), ("save_every", 0), ("seed", 0)):
            v = getattr(self, name)
            check_int(name, v, lo)
        if self.micro_batch_size is not None:
            check_int("micro_batch_size", self.micro_batch_size, 1, self.batch_size)  # at most batch_size
        if self.micro_batch_tokens is not None:
            check_int("micro_batch_tokens", self.micro_batch_tokens, 1)
        ms = self.max_seconds
        if ms is not None and (isinstance(ms, bool) or not isinstance(ms, (int, float)) or not math.isfinite(ms) or ms <= 0):
            raise ValueError(f"max_seconds must be a finite number > 0 or None, got {ms!r}")
        if self.stop_after is not None and not 1 <= self.stop_after <= self.steps:
            raise ValueError(f"stop_after must be in [1, steps={self.steps}], got {self.stop_after!r}")
        for name in ("lr", "max_grad_norm"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        if not isinstance(self.weight_decay, (int, float)) or not 0 <= self.weight_decay < 1:
            raise ValueError(f"weight_decay must be in [0, 1), got {self.weight_decay!r}")
        if self.lrsa_backend not in ("auto", "reference", "flex"):
            raise ValueError(f"lrsa_backend must be 'auto', 'reference' or 'flex', got {self.lrsa_backend!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {self.precision!r}")
        LagConfig.from_dict(self.lag)  # validates
        return self

    @property
    def lag_config(self) -> LagConfig:
        return LagConfig.from_dict(self.lag)


# --------------------------------------------------------------------------------------------------------------
# Model and data


def is_tiny_source(source: str | None) -> bool:
    """Whether a model source names the tiny random model (``"tiny"`` or ``"tiny:SEED"``)."""
    return source is not None and (source == TINY_PREFIX or source.startswith(TINY_PREFIX + ":"))


def load_source(source: str | None, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """(model with SDPA attention, tokenizer) for a model source (see `TrainConfig.model`)."""
    from .models import cast_model, load_model, tiny_model

    if is_tiny_source(source):
        seed = int(source.split(":", 1)[1]) if ":" in source else 0
        tokenizer = load_tokenizer()
        model = cast_model(tiny_model(seed=seed, vocab_size=len(tokenizer)), dtype, device)
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        return model, tokenizer
    return load_model(source, device=device, dtype=dtype)


def check_attention(model) -> None:
    """Training must never run with eager attention (about 13x slower than SDPA at 8k tokens on an H200)."""
    impl = model.config._attn_implementation
    if impl not in ("sdpa", "lrsa", "flash_attention_2", "flash_attention_3", "flex_attention"):
        raise ValueError(f"model: attention implementation {impl!r} is not allowed for training; load it with "
                         "attn_implementation='sdpa'")


def step_indices(n_examples: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The examples of global batch ``step`` (0-based): epoch-wise permutations seeded by (seed, epoch).

    A pure function of its arguments, so a resumed run sees exactly the batches the interrupted one would have.
    """
    if n_examples < 1:
        raise ValueError("n_examples: the training set is empty")
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(pos, n_examples)
        perm = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(perm[offset]))
    return out


def bucketed_step_indices(buckets: Sequence[int], batch_size: int, step: int, seed: int) -> list[int]:
    """The examples of global batch ``step`` when every batch comes from ONE bucket (e.g. one document length).

    Each epoch shuffles every bucket (seeded by seed, epoch, bucket), cuts it into batches of ``batch_size`` (the
    last one topped up from the start of the same shuffled bucket), and shuffles the order of all batches. A pure
    function of its arguments, like `step_indices`, so resumed runs see the same batches.
    Args:
        buckets: the bucket of each example (any integers).
    """
    if not buckets:
        raise ValueError("buckets: the training set is empty")
    members: dict[int, list[int]] = {}
    for i, b in enumerate(buckets):
        members.setdefault(b, []).append(i)
    per_epoch = sum(-(-len(m) // batch_size) for m in members.values())
    epoch, index = divmod(step, per_epoch)
    batches = []
    for b in sorted(members):
        m = members[b]
        perm = torch.randperm(len(m), generator=torch.Generator().manual_seed(seed * 100_003 + epoch * 1009 + b % 1009))
        order = [m[int(j)] for j in perm]
        for start in range(0, len(order), batch_size):
            batches.append([order[(start + k) % len(order)] for k in range(batch_size)])
    shuffle = torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed * 100_003 + epoch + 7))
    return batches[int(shuffle[index])]


def divisor_at_most(n: int, cap: int) -> int:
    """The largest divisor of ``n`` that is <= max(cap, 1): micro-batches of one size."""
    return max(d for d in range(1, n + 1) if n % d == 0 and d <= max(cap, 1))


def length_bucket(example: dict, n_tokens: int) -> int:
    """The bucket of a training example: its ``context_tokens`` if given, else its token count // 1024."""
    ct = example.get("context_tokens")
    return int(ct) if isinstance(ct, int) and not isinstance(ct, bool) else n_tokens // 1024


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions t whose logits predict a supervised token (labels[:, t + 1] != -100 in some row). LongTensor [K]."""
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().flatten()


def answer_loss_sums(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over answer tokens, their count, and how many rows got every answer token right.

    Args:
        batch: from `collate` (on the model's device): input_ids, attention_mask, labels, each [B, T]; right-padded
            (ValueError otherwise).
    Returns:
        (loss_sum [] float32, n_tokens [] long, n_rows_all_correct [] long). The last is greedy exact match under
        teacher forcing: greedy decoding reproduces the target iff every answer token is the argmax.
    """
    labels = batch["labels"]
    keep = answer_positions(labels)
    check_right_padding(batch["attention_mask"])
    # Right padding + causal attention: no real token ever sees a pad, and the LRSA selections a real token sees
    # come from partitions (and references) made of real tokens only. So the padding mask changes nothing the loss
    # reads (tested); leaving it out lets SDPA use its causal kernels and LRSA its fast (flex) path.
    out = model(input_ids=batch["input_ids"], logits_to_keep=keep, use_cache=False)
    logits = out.logits.float()  # [B, K, V]
    target = labels[:, keep + 1]  # [B, K]
    loss_sum = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE_INDEX,
                                                 reduction="sum")
    supervised = target != IGNORE_INDEX
    wrong = (logits.argmax(-1) != target) & supervised
    rows_correct = (~wrong.any(dim=1)) & supervised.any(dim=1)
    return loss_sum, supervised.sum(), rows_correct.sum()


@torch.no_grad()
def dev_metrics(model, features: Sequence[dict], pad_token_id: int, batch_size: int, device) -> dict[str, float]:
    """Mean answer-token loss and teacher-forced exact match on dev features, with the model's current attention."""
    was_training = model.training
    model.eval()
    loss, tokens, correct = 0.0, 0, 0
    for i in range(0, len(features), batch_size):
        chunk = features[i:i + batch_size]
        width = -(-max(len(f["input_ids"]) for f in chunk) // DEV_PAD_MULTIPLE) * DEV_PAD_MULTIPLE
        batch = {k: v.to(device) for k, v in collate(chunk, pad_token_id, width).items()}
        l, n, c = answer_loss_sums(model, batch)
        loss, tokens, correct = loss + float(l), tokens + int(n), correct + int(c)
    model.train(was_training)
    return {"dev_loss": loss / max(tokens, 1), "dev_exact_match": correct / max(len(features), 1)}


# --------------------------------------------------------------------------------------------------------------
# Files


def write_curve(path: Path, history: list[dict]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CURVE_FIELDS)
        w.writeheader()
        for row in history:
            w.writerow({k: row.get(k, "") for k in CURVE_FIELDS})


def read_curve(path: str | Path) -> list[dict]:
    """Rows of a ``loss_curve.csv`` with numbers parsed (empty cells become None)."""
    rows = []
    with Path(path).open() as f:
        for row in csv.DictReader(f):
            rows.append({k: (None if v == "" else (int(v) if k in ("step", "tokens") else float(v)))
                         for k, v in row.items()})
    return rows


def load_run(run_dir: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """(model with SDPA attention, tokenizer, TrainConfig) of a finished run: its base model + its final weights."""
    from safetensors.torch import load_model as load_weights

    from .models import cast_model

    run_dir = Path(run_dir)
    cfg_file, weights = run_dir / "train_config.json", run_dir / "model.safetensors"
    for f in (cfg_file, weights):
        if not f.exists():
            raise FileNotFoundError(f"run_dir: {f} is missing; is {run_dir} a finished lrsa_viz.train run?")
    config = TrainConfig(**json.loads(cfg_file.read_text()))
    model, tokenizer = load_source(config.model, device=device, dtype=torch.float32)
    load_weights(model, str(weights))
    return cast_model(model, dtype).eval(), tokenizer, config  # rotary frequencies stay float32


# --------------------------------------------------------------------------------------------------------------
# Training


def train(config: TrainConfig, resume: bool = False, progress: bool = True, command: str | None = None) -> list[dict]:
    """Run (or resume) one training run. Returns the loss history (one dict per step, see CURVE_FIELDS).

    ``command`` (the CLI line, if any) is recorded in ``run_info.json`` with the environment."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed
    from safetensors.torch import save_model
    from transformers import get_cosine_schedule_with_warmup

    config.check()
    out = Path(config.out_dir)
    ckpt = out / "checkpoint"
    if resume and not (ckpt / "trainer_state.json").exists():
        raise FileNotFoundError(f"resume: no checkpoint in {ckpt}")
    precision = config.precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "fp32"
    # accelerate keeps ONE AcceleratorState per process and refuses an Accelerator with another mixed precision
    # ("AcceleratorState has already been initialized and cannot be changed"), so a second train() in the same
    # process (a notebook, a test session) with another precision would fail, e.g. an fp32 run then an "auto" (bf16
    # on CUDA) one. Each run configures its own: reset it. The process group and the device live in PartialState,
    # which stays (torchrun/DDP runs keep working).
    AcceleratorState._reset_state(reset_partial_state=False)
    # cpu=True without CUDA: accelerate then runs several CPU processes (torchrun) as DDP over gloo
    # step_scheduler_with_optimizer=False: one schedule step per optimiser step, whatever the number of processes
    accelerator = Accelerator(mixed_precision="bf16" if precision == "bf16" else "no", cpu=not torch.cuda.is_available(),
                              step_scheduler_with_optimizer=False)
    world, rank = accelerator.num_processes, accelerator.process_index
    if config.batch_size % world:
        raise ValueError(f"batch_size ({config.batch_size}) must be a multiple of the number of processes ({world})")
    local_batch = config.batch_size // world
    micro = min(config.micro_batch_size or local_batch, local_batch)
    set_seed(config.seed)

    model, tokenizer = load_source(config.model, device=accelerator.device, dtype=torch.float32)
    if config.mode == "lrsa":
        enable_lrsa(model, config.lag_config, backend=config.lrsa_backend)
    check_attention(model)
    model.train()
    train_examples = load_examples(config.train_data, split=config.train_split, limit=config.max_train_examples)
    if config.mode == "lrsa" and accelerator.is_main_process:
        warn_if_answers_exceed_budget(tokenizer, train_examples, config.lag_config, "train (LRSA)")
    features = encode_examples(tokenizer, train_examples)
    buckets = [length_bucket(ex, len(f["input_ids"])) for ex, f in zip(train_examples, features)]
    bucket_width: dict[int, int] = {}
    for f, b in zip(features, buckets):
        bucket_width[b] = max(bucket_width.get(b, 0), len(f["input_ids"]))
    del train_examples
    dev_features = []
    if config.dev_data:
        dev_features = encode_examples(
            tokenizer, load_examples(config.dev_data, split=config.dev_split, limit=config.eval_examples))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    history: list[dict] = []
    start_step = 0
    if resume:
        accelerator.load_state(str(ckpt))
        state = json.loads((ckpt / "trainer_state.json").read_text())
        if state["config"] != _resumable(config):
            raise ValueError(f"resume: {ckpt} was written by a run with another configuration; "
                             f"start a fresh run in another out_dir")
        start_step, history = state["step"], state["history"]

    def save_checkpoint(step: int) -> None:
        accelerator.wait_for_everyone()
        tmp = out / "checkpoint.partial"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            state = {"step": step, "config": _resumable(config), "history": history}
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
            if config.mode == "lrsa":
                (tmp / "lag_config.json").write_text(json.dumps(config.lag, indent=1))
            shutil.rmtree(ckpt, ignore_errors=True)
            tmp.rename(ckpt)
            write_curve(out / "loss_curve.csv", history)
        accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        from .profile import environment_record

        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=1))
        info = {"command": command or "lrsa_viz.train.train(...) from Python", "environment": environment_record(),
                "processes": world, "precision": precision, "resumed_at_step": start_step if resume else None}
        (out / "run_info.json").write_text(json.dumps(info, indent=1))
        if config.mode == "lrsa":
            (out / "lag_config.json").write_text(json.dumps(config.lag, indent=1))
    last = config.stop_after or config.steps
    bar = tqdm(range(start_step, last), desc=f"train {config.mode}", initial=start_step, total=last,
               disable=not (progress and accelerator.is_main_process))
    t0 = time.perf_counter() - (history[-1]["elapsed_s"] if history else 0.0)
    tokens_seen = history[-1]["tokens"] if history else 0
    t_call = time.perf_counter()
    for step in bar:
        if config.group_by_length:
            global_idx = bucketed_step_indices(buckets, config.batch_size, step, config.seed)
        else:
            global_idx = step_indices(len(features), config.batch_size, step, config.seed)
        local_idx = global_idx[rank::world]
        # grouped by length: every micro-batch of a bucket is padded to the bucket's width (one kernel shape)
        width = bucket_width[buckets[local_idx[0]]] if config.group_by_length else None
        if config.micro_batch_tokens:
            widest = width or max(len(features[i]["input_ids"]) for i in local_idx)
            micro = divisor_at_most(len(local_idx), config.micro_batch_tokens // widest)
        batches = [collate([features[i] for i in local_idx[j:j + micro]], tokenizer.pad_token_id, width)
                   for j in range(0, len(local_idx), micro)]
        local_tokens = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
        global_tokens = int(accelerator.reduce(torch.tensor(local_tokens, device=accelerator.device), "sum"))
        loss_total = torch.zeros((), device=accelerator.device)
        for j, batch in enumerate(batches):
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            sync = j == len(batches) - 1
            ctx = accelerator.no_sync(model) if not sync else _nullcontext()
            with ctx, accelerator.autocast():
                loss_sum, _, _ = answer_loss_sums(model, batch)
                # DDP averages gradients over processes: scale so the result is the global token mean
                loss = loss_sum * world / global_tokens
                accelerator.backward(loss)
            loss_total += loss_sum.detach()
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        train_loss = float(accelerator.reduce(loss_total, "sum")) / global_tokens
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"step {step + 1}: training loss is {train_loss}; lower lr (now {config.lr})")
        tokens_seen += int(accelerator.reduce(
            torch.tensor(sum(int(b["attention_mask"].sum()) for b in batches), device=accelerator.device), "sum"))
        row = {"step": step + 1, "train_loss": train_loss, "lr": lr, "grad_norm": float(grad_norm),
               "tokens": tokens_seen, "elapsed_s": round(time.perf_counter() - t0, 3)}
        out_of_time = config.max_seconds is not None and time.perf_counter() - t_call >= config.max_seconds
        done = step + 1 == last or out_of_time
        if dev_features and ((config.eval_every and (step + 1) % config.eval_every == 0) or step + 1 == config.steps):
            if accelerator.is_main_process:
                with accelerator.autocast():
                    row.update(dev_metrics(accelerator.unwrap_model(model), dev_features, tokenizer.pad_token_id,
                                           micro, accelerator.device))
            accelerator.wait_for_everyone()
        history.append(row)
        bar.set_postfix(loss=f"{train_loss:.4f}", **({"dev_em": f"{row['dev_exact_match']:.2f}"}
                                                      if "dev_exact_match" in row else {}))
        if done or (config.save_every and (step + 1) % config.save_every == 0):
            save_checkpoint(step + 1)
        if out_of_time:
            break
    if accelerator.is_main_process:
        if torch.cuda.is_available():
            info["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        info["train_seconds"] = history[-1]["elapsed_s"] if history else 0.0
        (out / "run_info.json").write_text(json.dumps(info, indent=1))
    if history and history[-1]["step"] == config.steps and accelerator.is_main_process:
        save_model(accelerator.unwrap_model(model), str(out / "model.safetensors"))
        write_curve(out / "loss_curve.csv", history)
    accelerator.wait_for_everyone()
    return history


def _resumable(config: TrainConfig) -> dict:
    """The configuration a checkpoint must match to be resumed (session limits excluded)."""
    return dataclasses.asdict(dataclasses.replace(config, stop_after=None, max_seconds=None))


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lrsa_viz.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="runs to make, one after another")
    p.add_argument("--train-data", required=True)
    p.add_argument("--dev-data", default=None)
    p.add_argument("--out", required=True, help="each mode writes into OUT/<mode>/")
    p.add_argument("--model", default=None, help="GGUF file, model directory, or tiny[:seed]; default SmolLM2")
    d = TrainConfig(mode="full", train_data="", out_dir="")
    for name in ("steps", "batch_size", "micro_batch_size", "lr", "weight_decay", "warmup_steps", "max_grad_norm",
                 "seed", "eval_every", "eval_examples", "save_every", "stop_after", "max_train_examples"):
        default = getattr(d, name)
        kind = float if isinstance(default, float) else int
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=default)
    p.add_argument("--micro-batch-tokens", type=int, default=None,
                   help="at most this many tokens per micro-batch (overrides --micro-batch-size)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="stop with a checkpoint after this many seconds of training in this call (--resume goes on)")
    p.add_argument("--group-by-length", action="store_true", help="every batch from one document length")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    p.add_argument("--train-split", default="train", help="split name for a DatasetDict directory")
    p.add_argument("--dev-split", default="validation", help="split name for a DatasetDict directory")
    p.add_argument("--lrsa-backend", default="auto", help="LRSA attention backend: auto, reference (dense mask), flex")
    lag = LagConfig()
    p.add_argument("--sink-size", type=int, default=lag.sink_size)
    p.add_argument("--lag-size", type=int, default=lag.lag_size)
    p.add_argument("--ratio", type=float, default=lag.ratio)
    p.add_argument("--resume", action="store_true", help="continue each run from OUT/<mode>/checkpoint")
    p.add_argument("--no-progress", action="store_true")
    add_debug_flag(p)
    return p


def configs_from_args(a: argparse.Namespace) -> list[TrainConfig]:
    lag = LagConfig(sink_size=a.sink_size, lag_size=a.lag_size, ratio=a.ratio).to_dict()
    shared = {k: getattr(a, k) for k in ("steps", "batch_size", "micro_batch_size", "lr", "weight_decay",
                                          "warmup_steps", "max_grad_norm", "seed", "eval_every", "eval_examples",
                                          "save_every", "stop_after", "precision", "max_train_examples",
                                          "train_split", "dev_split", "lrsa_backend", "micro_batch_tokens",
                                          "max_seconds", "group_by_length")}
    return [TrainConfig(mode=m, train_data=a.train_data, dev_data=a.dev_data, model=a.model,
                        out_dir=str(Path(a.out) / m), lag=lag, **shared).check() for m in a.modes]


def main(argv: Sequence[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    command = "python -m lrsa_viz.train " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    for config in configs_from_args(a):
        history = train(config, resume=a.resume, progress=not a.no_progress, command=command)
        last = history[-1]
        print(f"{config.mode}: step {last['step']} train_loss {last['train_loss']:.4f} "
              f"{last['elapsed_s']:.1f}s -> {config.out_dir}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(run_cli(main))
