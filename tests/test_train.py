"""Training: answer-only loss, deterministic data order, both modes, checkpoints and lossless resume (tiny model, CPU)."""
import contextlib
import csv
import json

import pytest
import torch
from safetensors.torch import load_file

from lrsa_viz.config import LagConfig
from lrsa_viz.evaluate import Setting, greedy_answers
from lrsa_viz.qa_data import (IGNORE_INDEX, QAConfig, QAGenerator, collate, encode_example, encode_examples,
                              write_jsonl)
from lrsa_viz.train import (DEV_PAD_MULTIPLE, TrainConfig, answer_loss_sums, answer_positions, bucketed_step_indices,
                            check_attention, divisor_at_most, length_bucket, load_run, load_source, main, step_indices,
                            train)

from helpers import run_cpu

LAG = LagConfig(sink_size=8, lag_size=32, ratio=0.25)


@pytest.fixture(scope="module")
def data(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("qa")
    gen = QAGenerator(tok, QAConfig(context_tokens=192, n_facts=3), seed=0)
    return {split: str(write_jsonl(root / f"{split}.jsonl", gen.split(split, n)))
            for split, n in (("train", 12), ("dev", 4))}


def make_config(data, out, **kw):
    base = dict(mode="lrsa", train_data=data["train"], dev_data=data["dev"], out_dir=str(out), model="tiny:0",
                steps=4, batch_size=4, micro_batch_size=2, lr=3e-3, warmup_steps=1, eval_every=2, eval_examples=4,
                lag=LAG.to_dict(), precision="fp32")
    return TrainConfig(**{**base, **kw})


def test_step_indices_are_seeded_epoch_permutations():
    first = [i for s in range(3) for i in step_indices(9, 3, s, seed=1)]
    assert sorted(first) == list(range(9)), "one epoch visits every example once"
    assert step_indices(9, 3, 4, seed=1) == step_indices(9, 3, 4, seed=1)
    assert [step_indices(9, 3, s, seed=2) for s in range(3)] != [step_indices(9, 3, s, seed=1) for s in range(3)]
    with pytest.raises(ValueError, match="training set is empty"):
        step_indices(0, 3, 0, 0)


def test_bucketed_batches_come_from_one_bucket_and_cover_the_epoch():
    buckets = [4000] * 7 + [8000] * 5
    per_epoch = 2 + 2  # ceil(7 / 4) + ceil(5 / 4)
    epoch = [bucketed_step_indices(buckets, 4, s, seed=3) for s in range(per_epoch)]
    assert all(len(b) == 4 and len({buckets[i] for i in b}) == 1 for b in epoch)
    assert {i for b in epoch for i in b} == set(range(12)), "every example once per epoch (plus top-ups)"
    assert epoch == [bucketed_step_indices(buckets, 4, s, seed=3) for s in range(per_epoch)], "pure function"
    assert epoch != [bucketed_step_indices(buckets, 4, s, seed=4) for s in range(per_epoch)]
    next_epoch = [bucketed_step_indices(buckets, 4, per_epoch + s, seed=3) for s in range(per_epoch)]
    assert next_epoch != epoch and {i for b in next_epoch for i in b} == set(range(12)), "next epoch reshuffles"
    assert length_bucket({"context_tokens": 8000}, 8123) == 8000 and length_bucket({}, 5000) == 4
    assert [divisor_at_most(16, c) for c in (0, 1, 3, 5, 7, 9, 16, 40)] == [1, 1, 2, 4, 4, 8, 16, 16]


def test_grouped_run_with_a_time_limit_resumes_like_an_uninterrupted_one(tok, tmp_path):
    """A 2-length mixture, batches grouped by length, micro-batches by token budget; a run stopped by max_seconds
    resumes to the same losses as a run that was never stopped."""
    gen = {n: QAGenerator(tok, QAConfig(context_tokens=n, n_facts=3), seed=0) for n in (192, 384)}
    mix = gen[192].split("train", 6) + gen[384].split("train", 6)
    train_file = str(write_jsonl(tmp_path / "mix.jsonl", mix))
    data = {"train": train_file, "dev": train_file}
    kw = dict(steps=4, batch_size=4, group_by_length=True, micro_batch_tokens=900, eval_every=0, mode="lrsa")
    widths = []

    def recording_collate(features, pad_token_id, width=None):
        batch = collate(features, pad_token_id, width)
        widths.append(batch["input_ids"].shape[1])
        return batch

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("lrsa_viz.train.collate", recording_collate)
        whole = train(make_config(data, tmp_path / "whole", **kw), progress=False)
    feats = encode_examples(tok, mix)
    bucket_widths = {max(len(f["input_ids"]) for f, ex in zip(feats, mix) if ex["context_tokens"] == n)
                     for n in (192, 384)}
    train_widths = {w for w in widths if w % DEV_PAD_MULTIPLE}  # the dev batches: multiples of DEV_PAD_MULTIPLE
    assert train_widths == bucket_widths, "every training micro-batch is padded to its bucket's width"
    assert len(widths) > len(train_widths) + 4
    steps_tokens = [b["tokens"] - a for a, b in zip([0] + [r["tokens"] for r in whole], whole)]
    assert all(t < 4 * 300 or t > 4 * 400 for t in steps_tokens), "each batch holds one document length"
    part = train(make_config(data, tmp_path / "part", **kw, max_seconds=1e-9), progress=False)
    assert len(part) == 1 and not (tmp_path / "part" / "model.safetensors").exists()
    resumed = train(make_config(data, tmp_path / "part", **kw), resume=True, progress=False)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4] and (tmp_path / "part" / "model.safetensors").exists()
    for a, b in zip(whole, resumed):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6, abs=1e-7) and a["tokens"] == b["tokens"]
    with pytest.raises(ValueError, match="micro_batch_tokens must be"):
        make_config(data, tmp_path, micro_batch_tokens=0).check()
    with pytest.raises(ValueError, match="max_seconds must be"):
        make_config(data, tmp_path, max_seconds=float("inf")).check()


def test_answer_loss_equals_full_logits_cross_entropy(tok, data):
    model, _ = load_source("tiny:0")
    from lrsa_viz.qa_data import read_jsonl
    feats = [encode_example(tok, ex) for ex in read_jsonl(data["train"])[:3]]
    batch = collate(feats, tok.pad_token_id)
    keep = answer_positions(batch["labels"])
    starts = {len(f["input_ids"]) - 6 for f in feats}  # 4 answer digits + end of turn, predicted from len - 6 on
    assert keep.tolist() == sorted({s + i for s in starts for i in range(5)})
    with torch.no_grad():
        loss_sum, n, correct = answer_loss_sums(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    reference = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:],
                                                  ignore_index=IGNORE_INDEX, reduction="sum")
    assert int(n) == int((batch["labels"] != IGNORE_INDEX).sum()) == 15
    assert abs(float(loss_sum) - float(reference)) < 1e-3 * float(reference)
    assert int(correct) == 0  # a random model gets no answer right


@pytest.mark.parametrize("mode", ["full", "lrsa"])
def test_padding_mask_changes_nothing_the_loss_reads(tok, data, mode):
    """answer_loss_sums leaves the padding mask out: right padding + causal attention hides pads anyway."""
    from lrsa_viz import lrsa
    from lrsa_viz.qa_data import read_jsonl
    model, _ = load_source("tiny:0")
    exs = read_jsonl(data["train"])
    feats = [encode_example(tok, ex) for ex in exs]
    lengths = [len(f["input_ids"]) for f in feats]
    pair = [feats[lengths.index(min(lengths))], feats[lengths.index(max(lengths))]]
    assert min(lengths) < max(lengths), "need a padded batch"
    batch = collate(pair, tok.pad_token_id)
    keep = answer_positions(batch["labels"])
    with torch.no_grad(), (lrsa(model, LAG, backend="reference") if mode == "lrsa" else contextlib.nullcontext()):
        masked = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
        target = batch["labels"][:, keep + 1]
        reference = torch.nn.functional.cross_entropy(masked.transpose(1, 2), target, ignore_index=IGNORE_INDEX,
                                                      reduction="sum")
        loss_sum, _, _ = answer_loss_sums(model, batch)
    assert float(loss_sum) == pytest.approx(float(reference), rel=1e-5)
    left = {k: v.flip(1) for k, v in batch.items()}
    with pytest.raises(ValueError, match="right-padded"):
        answer_loss_sums(model, left)


def test_teacher_forced_exact_match_is_greedy_exact_match(tok, data):
    """A model trained to answer one example: its teacher-forced count equals what greedy decoding produces."""
    from lrsa_viz.qa_data import encode_prompt, read_jsonl
    model, _ = load_source("tiny:0")
    exs = read_jsonl(data["train"])[:2]
    feats = [encode_example(tok, ex) for ex in exs]
    batch = collate(feats[:1], tok.pad_token_id)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):  # memorise example 0
        loss_sum, n, _ = answer_loss_sums(model, batch)
        (loss_sum / n).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    for ex, f in zip(exs, feats):
        with torch.no_grad():
            _, _, correct = answer_loss_sums(model, collate([f], tok.pad_token_id))
        ids = torch.tensor([encode_prompt(tok, ex)[0]])
        tokens, _ = greedy_answers(model, ids, 0, Setting(), LAG, 6, tok.eos_token_id)
        target = f["labels"][-5:]
        assert bool(int(correct)) == (tokens[0, :5].tolist() == target)
    assert int(answer_loss_sums(model, batch)[2]) == 1, "example 0 was memorised"


def test_config_is_validated(data, tmp_path):
    with pytest.raises(ValueError, match="mode must be one of"):
        make_config(data, tmp_path, mode="sparse").check()
    with pytest.raises(ValueError, match="micro_batch_size must be an integer in"):
        make_config(data, tmp_path, micro_batch_size=8).check()
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        make_config(data, tmp_path, lr=float("nan")).check()
    with pytest.raises(ValueError, match="stop_after must be in"):
        make_config(data, tmp_path, stop_after=9).check()
    with pytest.raises(ValueError, match="ratio"):
        make_config(data, tmp_path, lag={**LAG.to_dict(), "ratio": 0.0}).check()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(make_config(data, tmp_path / "none"), resume=True, progress=False)


def test_eager_attention_is_refused():
    model, _ = load_source("tiny:0")
    model.set_attn_implementation("eager")
    with pytest.raises(ValueError, match="not allowed for training"):
        check_attention(model)


def test_modes_differ_only_in_attention(data, tmp_path):
    """Same data, init, optimiser: step-1 losses differ because LRSA hides tokens; a rerun is identical."""
    full = train(make_config(data, tmp_path / "full", mode="full", steps=2, eval_every=0), progress=False)
    lrsa = train(make_config(data, tmp_path / "lrsa", steps=2, eval_every=0), progress=False)
    again = train(make_config(data, tmp_path / "lrsa2", steps=2, eval_every=0), progress=False)
    assert [r["train_loss"] for r in lrsa] == [r["train_loss"] for r in again]
    assert abs(full[0]["train_loss"] - lrsa[0]["train_loss"]) > 1e-3
    assert full[0]["tokens"] == lrsa[0]["tokens"]


def test_resume_loses_no_step(data, tmp_path):
    whole = train(make_config(data, tmp_path / "whole"), progress=False)
    part = train(make_config(data, tmp_path / "part", stop_after=2), progress=False)
    assert len(part) == 2 and not (tmp_path / "part" / "model.safetensors").exists()
    state = json.loads((tmp_path / "part" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 2
    resumed = train(make_config(data, tmp_path / "part"), resume=True, progress=False)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(whole, resumed):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6, abs=1e-7)
        assert a["lr"] == b["lr"] and a["tokens"] == b["tokens"]
        assert (a.get("dev_loss") is None) == (b.get("dev_loss") is None)
    w1, w2 = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "part" / "model.safetensors")
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 1e-5
    with pytest.raises(ValueError, match="another configuration"):
        train(make_config(data, tmp_path / "part", lr=1e-3), resume=True, progress=False)


def test_run_files(data, tmp_path):
    history = train(make_config(data, tmp_path / "run"), progress=False)
    run = tmp_path / "run"
    assert json.loads((run / "lag_config.json").read_text()) == LAG.to_dict()
    assert json.loads((run / "checkpoint" / "lag_config.json").read_text()) == LAG.to_dict()
    assert {p.name for p in (run / "checkpoint").iterdir()} >= {"model.safetensors", "optimizer.bin",
                                                               "scheduler.bin", "trainer_state.json"}
    rows = list(csv.DictReader((run / "loss_curve.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert [r["dev_loss"] != "" for r in rows] == [False, True, False, True]
    assert history[-1]["train_loss"] < history[0]["train_loss"], "a few steps at lr 3e-3 lower the loss"
    info = json.loads((run / "run_info.json").read_text())
    assert info["environment"]["torch"] == torch.__version__
    model, _, cfg = load_run(run)
    trained = load_file(run / "model.safetensors")
    assert torch.equal(model.state_dict()["model.embed_tokens.weight"], trained["model.embed_tokens.weight"])
    assert cfg.mode == "lrsa" and model.config._attn_implementation == "sdpa"
    bf16, _, _ = load_run(run, dtype=torch.bfloat16)  # rotary frequencies as trained (float32), weights bf16
    freqs = {n: b for n, b in bf16.named_buffers() if n.endswith("inv_freq")}
    assert freqs and all(b.dtype == torch.float32 and torch.equal(b, dict(model.named_buffers())[n])
                         for n, b in freqs.items())
    assert bf16.model.embed_tokens.weight.dtype == torch.bfloat16


def test_cli_trains_both_modes(data, tmp_path):
    main(["--modes", "full", "lrsa", "--model", "tiny:0", "--train-data", data["train"], "--out", str(tmp_path),
          "--steps", "2", "--batch-size", "2", "--sink-size", "8", "--lag-size", "32", "--ratio", "0.25",
          "--precision", "fp32", "--no-progress"])
    for mode in ("full", "lrsa"):
        info = json.loads((tmp_path / mode / "run_info.json").read_text())
        assert info["command"].startswith("python -m lrsa_viz.train --modes full lrsa")
        assert json.loads((tmp_path / mode / "train_config.json").read_text())["mode"] == mode
    assert (tmp_path / "lrsa" / "lag_config.json").exists() and not (tmp_path / "full" / "lag_config.json").exists()


def test_runs_of_other_precisions_in_one_process(data, tmp_path):
    """accelerate keeps one AcceleratorState per process; train() must not inherit an earlier run's precision
    (an fp32 run then an "auto" one, bf16 on CUDA, failed with "AcceleratorState has already been initialized").
    And nothing of a bf16 run leaks into the next fp32 run: it repeats the first one."""
    kw = dict(mode="full", steps=1, batch_size=2, micro_batch_size=2, eval_every=0, dev_data=None)
    first = train(make_config(data, tmp_path / "fp32", **kw), progress=False)
    bf16 = train(make_config(data, tmp_path / "bf16", **kw, precision="bf16"), progress=False)
    again = train(make_config(data, tmp_path / "fp32_again", **kw), progress=False)
    for name, precision in (("fp32", "fp32"), ("bf16", "bf16"), ("fp32_again", "fp32")):
        assert json.loads((tmp_path / name / "run_info.json").read_text())["precision"] == precision
    # equal on CPU; approx because on CUDA (this test runs in-process there) some backward kernels add atomically.
    # bf16 autocast changes the loss of such a step by ~3e-4 relative (measured on CPU): a leak would show.
    assert [(r["train_loss"], r["grad_norm"]) for r in again] == \
        [(pytest.approx(r["train_loss"], rel=1e-5), pytest.approx(r["grad_norm"], rel=1e-5)) for r in first]
    assert bf16[0]["train_loss"] != pytest.approx(first[0]["train_loss"], rel=1e-5), "the bf16 run really ran in bf16"


def test_two_processes_ddp_equal_one_process(data, tmp_path):
    """torchrun with 2 CPU processes (DDP over gloo, through accelerate): each takes half of every global batch,
    and the losses, learning rates and gradient norms equal those of one process.

    Both runs are children with CUDA hidden (helpers.run_cpu): with a GPU visible, accelerate would pick NCCL and
    put both processes on cuda:0 (NCCL refuses: duplicate GPU), and an in-process one-process run would train on
    the GPU with another LRSA backend, not the CPU run this test compares with."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--modes", "lrsa", "--model", "tiny:0", "--train-data", data["train"], "--dev-data", data["dev"],
            "--steps", "3", "--batch-size", "4", "--micro-batch-size", "1", "--lr", "3e-3", "--warmup-steps", "1",
            "--eval-every", "2", "--sink-size", "8", "--lag-size", "32", "--ratio", "0.25", "--precision", "fp32",
            "--no-progress"]
    run_cpu(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), "-m",
             "lrsa_viz.train", "--out", str(tmp_path / "two")] + args)
    run_cpu(["-m", "lrsa_viz.train", "--out", str(tmp_path / "one")] + args)
    two = list(csv.DictReader((tmp_path / "two" / "lrsa" / "loss_curve.csv").open()))
    one = list(csv.DictReader((tmp_path / "one" / "lrsa" / "loss_curve.csv").open()))
    assert json.loads((tmp_path / "two" / "lrsa" / "run_info.json").read_text())["processes"] == 2
    assert json.loads((tmp_path / "one" / "lrsa" / "run_info.json").read_text())["processes"] == 1
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        for key in ("train_loss", "grad_norm"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-4)
        assert a["lr"] == b["lr"] and a["tokens"] == b["tokens"]
        assert (a["dev_loss"] == "") == (b["dev_loss"] == "")
