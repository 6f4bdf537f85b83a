#!/usr/bin/env bash
# The same LRSA fine-tune on 1 GPU and on 2 GPUs (accelerate, DDP), same data, global batch, schedule and seed;
# then the 2-GPU model is evaluated on the held-out test set. One command on a machine with 2 GPUs:
#
#   bash scripts/gpu_multigpu.sh [RESULTS_DIR]          # RESULTS_DIR default: data/results
#
# Writes RESULTS_DIR/multigpu_smollm2.json (both loss curves, tokens/s per GPU, scaling efficiency, the 2-GPU
# evaluation table, command, GPU names, torch version) and the evaluation's multigpu_smollm2_eval.{json,csv}.
# Sizes can be overridden from the environment (STEPS, BATCH, MICRO, TRAIN_N, CONTEXT, TEST_LIMIT, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-data/results}
WORK=${LRSA_VIZ_WORK:-/tmp/lrsa_viz_multigpu}
PY=${PYTHON:-python3}
STEPS=${STEPS:-120}; BATCH=${BATCH:-16}; MICRO=${MICRO:-8}; TRAIN_N=${TRAIN_N:-1920}; CONTEXT=${CONTEXT:-2048}
LR=${LR:-1e-4}; WARMUP=${WARMUP:-20}; SEED=${SEED:-0}; SINK=${SINK:-16}; LAG=${LAG:-128}; RATIO=${RATIO:-0.25}
LRSA_BACKEND=${LRSA_BACKEND:-auto}; TEST_LIMIT=${TEST_LIMIT:-200}; EVAL_BATCH=${EVAL_BATCH:-100}
MODEL=${MODEL:-default}; MODEL_ARGS=(); [ "$MODEL" != default ] && MODEL_ARGS=(--model "$MODEL")
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" TQDM_MININTERVAL=${TQDM_MININTERVAL:-15}
mkdir -p "$RESULTS" "$WORK"
t0=$(date +%s); stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
EXPERIMENT="STEPS=$STEPS BATCH=$BATCH MICRO=$MICRO TRAIN_N=$TRAIN_N CONTEXT=$CONTEXT LR=$LR WARMUP=$WARMUP SEED=$SEED \
SINK=$SINK LAG=$LAG RATIO=$RATIO LRSA_BACKEND=$LRSA_BACKEND TEST_LIMIT=$TEST_LIMIT MODEL=$MODEL bash scripts/gpu_multigpu.sh $RESULTS"
[ -f "$WORK/qa/train.jsonl" ] || { stamp "training data: $TRAIN_N examples of $CONTEXT tokens";
  TOKENIZERS_PARALLELISM=false $PY -m lrsa_viz.qa_data --out "$WORK/qa" --train "$TRAIN_N" --dev 0 --test 0 \
    --context-tokens "$CONTEXT" --n-facts 6 --seed "$SEED" --workers "$(nproc)"; }
TRAIN_ARGS=(--modes lrsa "${MODEL_ARGS[@]}" --train-data "$WORK/qa/train.jsonl" --dev-data data/qa/dev.jsonl
  --steps "$STEPS" --batch-size "$BATCH" --micro-batch-size "$MICRO" --lr "$LR" --warmup-steps "$WARMUP"
  --eval-every 0 --eval-examples 50 --seed "$SEED" --precision bf16 --sink-size "$SINK" --lag-size "$LAG"
  --ratio "$RATIO" --lrsa-backend "$LRSA_BACKEND" --no-progress)
stamp "1 GPU: LRSA fine-tune"
CUDA_VISIBLE_DEVICES=0 $PY -m lrsa_viz.train "${TRAIN_ARGS[@]}" --out "$WORK/gpu1"
stamp "2 GPUs: the same fine-tune through accelerate (DDP)"
$PY -m accelerate.commands.launch --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
  -m lrsa_viz.train "${TRAIN_ARGS[@]}" --out "$WORK/gpu2"
stamp "evaluation of the 2-GPU model ($TEST_LIMIT test examples)"
CUDA_VISIBLE_DEVICES=0 $PY -m lrsa_viz.evaluate --data data/qa/test.jsonl --limit "$TEST_LIMIT" --base none \
  --run lrsa_2gpu="$WORK/gpu2/lrsa" --ratios 0.5 0.25 0.125 --sink-size "$SINK" --lag-size "$LAG" \
  --batch-size "$EVAL_BATCH" --max-new-tokens 16 --seed "$SEED" --dtype bf16 --out "$RESULTS" \
  --name multigpu_smollm2_eval --experiment "$EXPERIMENT"
stamp "summary"
$PY scripts/multigpu_summary.py "$WORK/gpu1/lrsa" "$WORK/gpu2/lrsa" "$RESULTS" "$EXPERIMENT"
stamp "done"
