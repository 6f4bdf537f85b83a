"""What autograd keeps for the backward: dense SDPA against fast LRSA, on the CPU, byte for byte.

    PYTHONPATH=. python3 benchmarks/audit_saved_tensors.py --out data/results/saved_tensors_cpu.json

A SmolLM2-135M-shaped model (random weights, bf16; ``--layers`` of its 30 layers), one training forward (loss on
the input ids) per mode. Every tensor autograd saves is recorded once per storage (`torch.autograd.graph.
saved_tensors_hooks`): its shape, dtype, bytes and the operation that made it. The JSON gives the bytes per mode,
the difference per layer, and the difference grouped by shape and maker, largest first.

Why on the CPU: which tensors a forward saves is decided by the model code and the autograd functions, not by the
device, and a GPU's peak memory says how much, not what. The answer was needed for the +1.27 GiB peak memory of
the fast LRSA training step at 8k x 4 (data/results/bench_h100/bench_lrsa_train_flash_fused.json), which
``memory_by_phase`` places entirely in what the forward keeps.

FlexAttention has no backward on the CPU, so the fast path's attention call is replaced by a stand-in with the
same forward (FlexAttention on detached inputs), the same saved set (query, key, value, output and a float32
logsumexp [B, H_q, N_q]) and an output in the query's stride order: what inductor's FlexAttention lowerings (Triton
and FlashAttention-4, torch 2.11) allocate ("output layout with strides matching the query"). The dense mode runs
PyTorch's CPU SDPA, whose output, like cuDNN's and FlashAttention's on a GPU, is laid out [B, N, H, d], so the
model's ``transpose(1, 2).contiguous()`` before the output projection copies nothing. Fast LRSA lays its padded
query out [B, N_q, H, d] too (`lrsa_viz.fast.layout.pad_queries`): for one sequence the real output rows are then
the projection's input (no copy); for several, the padding rows sit between the sequences and a copy remains.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import sys
from pathlib import Path

import torch
from torch.nn.attention.flex_attention import flex_attention

from lrsa_viz import LagConfig, cast_model, environment_record
from lrsa_viz.attention import disable_lrsa, enable_lrsa
from lrsa_viz.fast import kernel as fast_kernel
from lrsa_viz.fast.cost import SMOLLM2_CONFIG


class FlexStandIn(torch.autograd.Function):
    """FlexAttention's forward with the tensors its autograd saves; no backward (the audit never runs one)."""

    @staticmethod
    def forward(ctx, query, key, value, kwargs):
        out = torch.empty_like(query)  # the query's stride order, as inductor lays out FlexAttention's output
        with torch.no_grad():
            out.copy_(flex_attention(query.detach(), key.detach(), value.detach(), **kwargs))
        logsumexp = torch.empty(query.shape[:3], dtype=torch.float32, device=query.device)
        ctx.save_for_backward(query, key, value, out, logsumexp)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        raise RuntimeError("audit_saved_tensors: the stand-in has no backward")


def flex_stand_in(query, key, value, **kwargs):
    return FlexStandIn.apply(query, key, value, kwargs)


@contextlib.contextmanager
def cpu_flex_forward_with_grad():
    """Within: fast LRSA runs a training forward on the CPU through `FlexStandIn` (forward only)."""
    attend, check = fast_kernel._attend, fast_kernel.check_can_train

    def attend_with_stand_in(*args, flex=None, **kwargs):
        return attend(*args, flex=flex_stand_in, **kwargs)

    fast_kernel._attend, fast_kernel.check_can_train = attend_with_stand_in, lambda *a: None
    try:
        yield
    finally:
        fast_kernel._attend, fast_kernel.check_can_train = attend, check


def maker(t: torch.Tensor) -> str:
    """The autograd nodes that made ``t``, newest first (three at most): e.g. 'Clone <- Transpose <- FlexStandIn'."""
    names, fn = [], t.grad_fn
    while fn is not None and len(names) < 3:
        names.append(type(fn).__name__.removesuffix("Backward0").removesuffix("Backward"))
        fn = next((f for f, _ in fn.next_functions if f is not None), None)
    return " <- ".join(names) if names else "leaf or no grad"


def saved_tensors(forward) -> dict[tuple[int, int], dict]:
    """Every storage autograd saves while ``forward()`` runs: {(data_ptr, nbytes): {shape, dtype, bytes, maker}}."""
    saved = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in saved:
            saved[key] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                          "bytes": storage.nbytes(), "maker": maker(t)}
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    del loss
    return saved


def grouped(saved: dict) -> collections.Counter:
    totals = collections.Counter()
    for entry in saved.values():
        totals[f"{tuple(entry['shape'])} {entry['dtype']} | {entry['maker']}"] += entry["bytes"]
    return totals


def audit(tokens: int, batch: int, layers: int, cfg: LagConfig, seed: int = 0) -> dict:
    shapes = {**SMOLLM2_CONFIG, "num_hidden_layers": layers}
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = cast_model(LlamaForCausalLM(LlamaConfig(**shapes, attn_implementation="sdpa")), torch.bfloat16, "cpu").train()
    ids = torch.randint(0, shapes["vocab_size"], (batch, tokens), generator=torch.Generator().manual_seed(seed))

    def forward():
        return model(input_ids=ids, labels=ids, use_cache=False).loss

    disable_lrsa(model)
    dense = saved_tensors(forward)
    enable_lrsa(model, cfg, backend="flex")
    with cpu_flex_forward_with_grad():
        lrsa = saved_tensors(forward)
    disable_lrsa(model)
    by_dense, by_lrsa = grouped(dense), grouped(lrsa)
    difference = {k: by_lrsa[k] - by_dense[k] for k in set(by_dense) | set(by_lrsa) if by_lrsa[k] != by_dense[k]}
    total = {name: sum(e["bytes"] for e in saved.values()) for name, saved in (("dense", dense), ("lrsa", lrsa))}
    attention_output = batch * tokens * shapes["num_attention_heads"] * shapes["head_dim"] * 2  # bf16 [B, N, H_q d]
    return {"tokens": tokens, "batch": batch, "layers": layers, "lag_config": cfg.to_dict(), "dtype": "bfloat16",
            "bytes_saved": total, "storages": {"dense": len(dense), "lrsa": len(lrsa)},
            "extra_bytes_per_layer": (total["lrsa"] - total["dense"]) / layers,
            "attention_output_bytes": attention_output,
            "difference_by_tensor": dict(sorted(difference.items(), key=lambda kv: -kv[1]))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="data/results/saved_tensors_cpu.json")
    ap.add_argument("--tokens", type=int, default=1024, help="sequence length N (>= S + 2L = 272)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--layers", type=int, default=2, help="decoder layers of the SmolLM2-shaped model (1-30)")
    ap.add_argument("--scale-to", default="4x30", metavar="BATCHxLAYERS",
                    help="also give the extra bytes for this batch and layer count (saved tensors are linear in both, for batches "
                         "> 1; one sequence keeps no copy of the attention output)")
    args = ap.parse_args(argv)
    try:
        scale_batch, scale_layers = (int(x) for x in args.scale_to.split("x"))
    except ValueError:
        raise ValueError(f"--scale-to must be BATCHxLAYERS with integers, e.g. 4x30, got {args.scale_to!r}") from None
    if (scale_batch == 1) != (args.batch == 1):  # one sequence keeps no output copy (`pad_queries`), several do
        raise ValueError(f"--scale-to: from --batch {args.batch} only to a batch that is also "
                         f"{'1' if args.batch == 1 else '> 1'}, got {args.scale_to!r}")
    cfg = LagConfig(16, 128, 0.25)
    for name, value, low, high in (("--tokens", args.tokens, cfg.sink_size + 2 * cfg.lag_size, 8192),
                                   ("--batch", args.batch, 1, 64), ("--layers", args.layers, 1, 30)):
        if not low <= value <= high:
            raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    result = audit(args.tokens, args.batch, args.layers, cfg)
    result["scaled"] = {"batch": scale_batch, "layers": scale_layers,
                        "extra_gib": result["extra_bytes_per_layer"] * scale_batch / args.batch * scale_layers / 2 ** 30}
    result = {"command": "PYTHONPATH=. python3 benchmarks/audit_saved_tensors.py "
                         + " ".join(sys.argv[1:] if argv is None else argv),
              "environment": environment_record(), **result}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    per_layer, out_bytes = result["extra_bytes_per_layer"], result["attention_output_bytes"]
    print(f"saved for the backward: dense {result['bytes_saved']['dense'] / 2**20:.2f} MiB, LRSA "
          f"{result['bytes_saved']['lrsa'] / 2**20:.2f} MiB; LRSA - dense per layer {per_layer / 2**20:.3f} MiB "
          f"({per_layer / out_bytes:.2f} attention outputs of {out_bytes / 2**20:.3f} MiB)")
    print(f"at batch {scale_batch}, {scale_layers} layers: LRSA saves {result['scaled']['extra_gib']:.3f} GiB more")
    for key, nbytes in result["difference_by_tensor"].items():
        print(f"  {nbytes / 2**20:+9.3f} MiB  {key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
