"""Free runs vs chunked prefill on SmolLM2, as a JSON record (see lrsa_viz.agreement and docs/METHOD.md §3).

    PYTHONPATH=. python3 scripts/agreement_report.py --out data/results/agreement_cpu.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from lrsa_viz import LagConfig, load_model, lrsa
from lrsa_viz.agreement import compare_selections, logit_tolerance
from lrsa_viz.profile import environment_record


def main(argv: list[str] | None = None) -> None:
    """``python3 scripts/agreement_report.py --out FILE.json``: free-run flips and forced-run logit differences of
    SmolLM2 (float32) on the given passages and configs, with the device and torch version; one line per case."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--texts", nargs="+", default=["data/passages/kv_cache_notes.txt", "data/passages/harbour_log.txt"])
    p.add_argument("--tokens", type=int, default=1100)
    p.add_argument("--configs", nargs="+", default=["16,128,0.25", "4,64,0.125", "8,32,0.5"], help="S,L,r each")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    model, tok = load_model(device=a.device, dtype=torch.float32)
    rows = []
    for path in a.texts:
        with open(path) as f:
            ids = tok(f.read(), return_tensors="pt").input_ids[:, : a.tokens]
        for spec in a.configs:
            s, lag, r = spec.split(",")
            cfg = LagConfig(int(s), int(lag), float(r))
            start = time.time()
            agreement = compare_selections(model, ids, cfg)
            with torch.no_grad(), lrsa(model, cfg, keep=agreement.chunked_keep):
                forced = model(ids.to(model.device)).logits.float()
            row = {"text": path, "tokens": ids.shape[1], "config": cfg.to_dict(), "flips": agreement.n_flips,
                   "kept_slots": agreement.kept_slots, "gaps": sorted(f.gap for f in agreement.flips),
                   "all_near_ties": agreement.all_near_ties(), "max_score_drift": agreement.max_drift,
                   "free_max_logit_diff": agreement.max_logit_diff,
                   "forced_max_logit_diff": float((forced - agreement.chunked_logits).abs().max()),
                   "forced_tolerance": logit_tolerance(agreement.chunked_logits), "seconds": round(time.time() - start, 1)}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "gaps"}), flush=True)
    record = {"command": "python3 scripts/agreement_report.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "environment": environment_record(), "device": a.device, "rows": rows}
    with open(a.out, "w") as f:
        json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
