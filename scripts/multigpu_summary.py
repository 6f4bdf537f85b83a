"""Summarise a 1-GPU and a 2-GPU training run of scripts/gpu_multigpu.sh into RESULTS/multigpu_smollm2.json.

    python3 scripts/multigpu_summary.py RUN_1GPU RUN_2GPU RESULTS_DIR "COMMAND"

Throughput: training tokens (real tokens, as lrsa_viz.train counts them: the attention mask) per second
between step WARM and the step before the last (the first steps compile kernels; the last one evaluates on dev).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from lrsa_viz.train import read_curve

WARM = 5


def throughput(curve: list[dict]) -> float:
    a, b = curve[WARM - 1], curve[-2]
    return (b["tokens"] - a["tokens"]) / (b["elapsed_s"] - a["elapsed_s"])


def main(run1: str, run2: str, results: str, command: str) -> None:
    import torch

    c1, c2 = read_curve(Path(run1) / "loss_curve.csv"), read_curve(Path(run2) / "loss_curve.csv")
    t1, t2 = throughput(c1), throughput(c2)
    info2 = json.loads((Path(run2) / "run_info.json").read_text())
    evaluation = json.loads((Path(results) / "multigpu_smollm2_eval.json").read_text())
    losses1, losses2 = [r["train_loss"] for r in c1], [r["train_loss"] for r in c2]
    record = {
        "command": command,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] or ["cpu"],
        "torch": torch.__version__,
        "tokens_per_s": {"1_gpu": round(t1), "2_gpus": round(t2)},
        "tokens_per_s_per_gpu": {"1_gpu": round(t1), "2_gpus": round(t2 / 2)},
        "scaling_efficiency": round(t2 / (2 * t1), 3),
        "max_abs_loss_difference": max(abs(a - b) for a, b in zip(losses1, losses2)),
        "final_train_loss": {"1_gpu": losses1[-1], "2_gpus": losses2[-1]},
        "final_dev": {"1_gpu": {k: c1[-1].get(k) for k in ("dev_loss", "dev_exact_match")},
                      "2_gpus": {k: c2[-1].get(k) for k in ("dev_loss", "dev_exact_match")}},
        "run_info_2_gpus": info2,
        "curves": {"1_gpu": c1, "2_gpus": c2},
        "evaluation_2_gpus": evaluation["rows"],
    }
    Path(results, "multigpu_smollm2.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: record[k] for k in ("tokens_per_s", "scaling_efficiency", "max_abs_loss_difference",
                                             "final_train_loss", "final_dev")}, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:5])
