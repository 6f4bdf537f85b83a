"""CPU benchmark of one compiled greedy decode step: the static LagKV cache vs transformers' full StaticCache.

    PYTHONPATH=. OMP_NUM_THREADS=2 python3 benchmarks/bench_decode_cpu.py --out data/results/decode_step_cpu.json

A GPU-free check of what a decode step costs beyond attention: the step (model + cache) compiled by inductor
(``fullgraph=True``, static shapes; no CUDA graphs on a CPU), greedy, compression scheduled on the host between
steps. Model: SmolLM2-135M's layer shapes (hidden 576, 9 query / 3 KV heads, head_dim 64, MLP 1536) with fewer
layers and a small vocabulary, random weights, float32. The LagKV prompt goes through the flex LRSA prefill. Reported
per mode: milliseconds per decode step (mean of ``--steps`` after 4 compiling steps). CPU numbers only: the GPU
comparison is `bench_inference.py`.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench_inference import LAGKV, make_cache, make_model, prepare_model
from lrsa_viz import LagConfig, environment_record
from lrsa_viz.fast.cost import SMOLLM2_CONFIG
from lrsa_viz.fast.decode import DEFAULT_KERNEL
from lrsa_viz.static_generate import decode_step, disable_static_lagkv, greedy_decode

#: This script's modes and `bench_inference.py`'s: the full cache decodes with the LagKV cache's buffer attention.
MODES = {"lagkv": LAGKV, "full": "full_cache_buffer"}


def step_ms(model, mode: str, batch: int, prompt: int, steps: int, cfg: LagConfig) -> float:
    """Mean wall milliseconds of one compiled decode step of ``mode`` after a ``prompt``-token prefill."""
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(0))
    cache = make_cache(MODES[mode], model, prompt + steps + 8, cfg, compiled_selection=True)
    prepare_model(model, MODES[mode], cfg, kernel=DEFAULT_KERNEL, backend="flex")
    torch._dynamo.reset()
    step = torch.compile(decode_step, fullgraph=True, dynamic=False)
    try:
        with torch.no_grad():
            first = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
            greedy_decode(model, cache, first, 4, step_fn=step, host_compression=True)  # compiles
            start = time.perf_counter()
            greedy_decode(model, cache, first, steps, step_fn=step, host_compression=True)
            return (time.perf_counter() - start) / steps * 1e3
    finally:
        disable_static_lagkv(model)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not modes:
        ap.error(f"--modes: got {args.modes!r}; accepted: a comma-separated subset of {', '.join(MODES)}")
    cfg = LagConfig(16, 128, 0.25)
    model = make_model({**SMOLLM2_CONFIG, "num_hidden_layers": args.layers, "vocab_size": 512},
                       torch.device("cpu"), torch.float32)
    result = {"command": "PYTHONPATH=. python3 benchmarks/bench_decode_cpu.py " + " ".join(argv or []),
              "environment": environment_record(), "threads": torch.get_num_threads(),
              "batch": args.batch, "prompt": args.prompt, "layers": args.layers, "steps": args.steps,
              "lag_config": cfg.to_dict(),
              "step_ms": {m: step_ms(model, m, args.batch, args.prompt, args.steps, cfg) for m in modes}}
    print(json.dumps(result["step_ms"]))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
