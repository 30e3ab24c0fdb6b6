#!/usr/bin/env bash
# The paper's ablations on the CPU demo's toy world, Table 5 and Fig. 3 at toy size: round 1 of EvoQuality with
# K = 1, 4 and 16 votes per pair, and beside it EvoEstimate (vote.py --task score: K = 16 scores per image, their
# mean the pseudo-estimate; train_grpo.py --reward regression: Q-Insight's score reward against it). Every other
# setting is demo.sh's round 1; toy/ablation_report.py prints held-out SRCC / PLCC per row.
#
#   bash toy/ablation.sh                                          # ~15 minutes on 2 CPU cores
#   DEMO_SCALE=test ABLATION_OUT=/tmp/a bash toy/ablation.sh      # seconds: every file and the table, figures meaningless
#   WORLD=runs/demo bash toy/ablation.sh                          # the toy world of a finished demo.sh (the default
#                                                                 # when runs/demo has one), else one is prepared here
#   KS="1 8 16 32" bash toy/ablation.sh                           # other K (default: 1 4 16)
#
# The rows share the world (pools, base model, held-out labels), the training pairs (vote.py --seed 0) and the GRPO
# settings, so they differ only in the pseudo-labels and, for EvoEstimate, the reward. A finished step is skipped on
# a rerun (delete its output to redo it); the seconds of each go to <out>/timings.tsv.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${ABLATION_OUT:-runs/ablation}
PROMPTS=toy/prompts.json
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one thread: see demo.sh

if [ "${DEMO_SCALE:-full}" = test ]; then  # the plumbing only, in seconds; a base that answers (most votes valid)
    CROPS=1 WARM=(--steps 40 --clean-steps 20 --groups 2 --pairs 4 --lr 3e-3)
    VOTE_PAIRS=60 STEPS=(--k 2 --max-steps 2) SAMPLES=2
else  # demo.sh's round 1
    CROPS=12 WARM=(--steps 1000 --clean-steps 700 --lr 2e-3)
    VOTE_PAIRS=all STEPS=(--k 8 --max-steps 600) SAMPLES=16
fi
if [ -z "${WORLD:-}" ]; then  # a finished demo world (prepare writes base.json last), else our own
    if [ "${DEMO_SCALE:-full}" != test ] && [ -e runs/demo/base.json ]; then WORLD=runs/demo; else WORLD=$OUT/world; fi
fi
COMMON=(--prompts "$PROMPTS" --no-think)  # the toy prompts, one-token answers, as in demo.sh
mkdir -p "$OUT"

source toy/step.sh  # step NAME DONE_PATH COMMAND...: skipped when DONE_PATH exists, its seconds logged

vote() {  # vote K OUT [flags]: vote.py on the training pool with K queries, the toy's exact one-token path
    local k=$1 out=$2
    shift 2
    $PY vote.py --model "$WORLD/base" --manifest "$WORLD/pool/train/manifest.jsonl" --k "$k" --temperature 1.0 \
        --batch-pairs 64 --out "$out" "${COMMON[@]}" "$@"
}

grpo() {  # grpo LABELS OUT [flags]: demo.sh's round-1 GRPO (600 steps of 4 x 6 images x 8 rollouts on CPU)
    local labels=$1 out=$2
    shift 2
    $PY train_grpo.py --model "$WORLD/base" --labels "$labels" --image-root "$WORLD/pool/train" --out "$out" \
        --max-new-tokens 2 --micro-batch 192 --lr 1e-3 --beta 0.1 --save-every 0 "${STEPS[@]}" "${COMMON[@]}" "$@"
}

evaluate() {  # evaluate NAME MODEL: held-out SRCC / PLCC of the mean of SAMPLES sampled scores
    $PY evaluate.py --model "$2" --data heldout="$WORLD/heldout.jsonl" --samples $SAMPLES --temperature 1.0 \
        --max-new-tokens 2 --batch-images 64 --out "$OUT/eval/$1" "${COMMON[@]}"
}

T0=$EPOCHREALTIME
echo "== the toy world: $WORLD"
step prepare "$WORLD/base.json" $PY toy/prepare.py --out "$WORLD" --crops $CROPS --prompts "$PROMPTS" "${WARM[@]}"
step "eval base" "$OUT/eval/base/report.json" evaluate base "$WORLD/base"
# EvoQuality, K votes per same-(crop, type) pair (Fig. 3): the same pairs for every K; a pair's 4 (crop, type) groups
# of 6 images per GRPO step, as in demo.sh
for K in ${KS:-1 4 16}; do
    step "votes K=$K" "$OUT/k$K/votes.jsonl" vote $K "$OUT/k$K/votes.jsonl" --mode same-ref --group-by ref,distortion \
        --pairs $VOTE_PAIRS
    step "grpo K=$K" "$OUT/k$K/final" grpo "$OUT/k$K/votes.jsonl" "$OUT/k$K" --batch-groups 4 --group-by ref,distortion \
        --epochs 4
    step "eval K=$K" "$OUT/eval/k$K/report.json" evaluate k$K "$OUT/k$K/final"
done
# EvoEstimate (Table 5): K = 16 scores of every training image, the regression reward; 24 random images per step, the
# 24 images of EvoQuality's 4 groups, for as many steps
step "estimates K=16" "$OUT/estimate/estimates.jsonl" vote 16 "$OUT/estimate/estimates.jsonl" --task score --images all
step "grpo estimate" "$OUT/estimate/final" grpo "$OUT/estimate/estimates.jsonl" "$OUT/estimate" --reward regression \
    --batch-images 24 --epochs 5
step "eval estimate" "$OUT/eval/estimate/report.json" evaluate estimate "$OUT/estimate/final"

$PY toy/ablation_report.py --out "$OUT" --world "$WORLD" --prompts "$PROMPTS" \
    --wall "$(awk -v t0="$T0" -v t1="$EPOCHREALTIME" 'BEGIN { printf "%.1f", t1 - t0 }')"
