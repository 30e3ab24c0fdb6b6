#!/usr/bin/env bash
# The CPU demo, nanoGPT's Shakespeare-on-a-laptop for EvoQuality: a tiny Qwen2.5-VL-shaped model teaches itself to
# score image quality from its own votes, on photographs that ship with scikit-image. No GPU, no downloads.
#
#   bash demo.sh                                  # the full demo in runs/demo: ~8 minutes on 2 quiet CPU cores
#   DEMO_SCALE=test bash demo.sh                  # ~1 minute, in runs/demo-test: every file and the table, figures
#                                                 # meaningless
#   DEMO_OUT=/tmp/d bash demo.sh                  # another folder
#   PYTHON=/path/to/python bash demo.sh           # another interpreter (default: python)
#
# 1. toy/prepare.py  the toy world (crops x 5 distortion types x 5 levels, split by photograph) and the base
#                    model: the built-in tiny architecture after a short SUPERVISED warm-up that stands in for
#                    pretraining (it compares well; it answers the score prompt with a digit, but one that ranks
#                    nothing). From here on nothing sees a label.
# 2. round 1         vote.py (K votes per same-crop pair -> pseudo-labels) -> train_grpo.py (score GRPO on them)
#    control         the same training on the round-1 votes with their labels shuffled across pairs; it and the
#                    base's evaluation run in the background, beside round 1 and 2 (2 cores, one thread each)
# 3. round 2         the round-1 model votes again, and trains again from itself
# 4. each model      evaluate.py on the held-out photographs (SRCC / PLCC against mos = 5 - level), and vote.py on
#                    held-out pairs (is the voter still a voter after score training?)
# 5. toy/report.py   the table (runs/demo/report.md) and the picture (runs/demo/sheet.png, toy/sheet.py)
#
# A finished step is skipped on a rerun (delete its output to redo it); the seconds of each go to timings.tsv, the
# wall time of each run that did some work to wall.tsv, everything the main line prints to demo.log. A folder keeps
# the scale and flags it was made with (settings.txt), and a run with others refuses to touch it.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
SCALE=${DEMO_SCALE:-full}
PROMPTS=toy/prompts.json
# one thread: the tiny model's ops are too small to split, and on a busy machine OpenMP threads that spin while
# waiting for each other made the vision tower 50x slower (4 s vs 0.08 s for 128 images)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

if [ "$SCALE" = test ]; then  # the plumbing only; a warm-up just long enough for valid answers
    OUT=${DEMO_OUT:-runs/demo-test}
    CROPS=1 WARM=(--steps 40 --clean-steps 20 --groups 2 --pairs 4 --lr 3e-3)
    VOTE_K=4 VOTE_PAIRS=60 HELD_PAIRS=20 GRPO=(--k 2 --max-steps 2) SAMPLES=2
elif [ "$SCALE" = full ]; then
    OUT=${DEMO_OUT:-runs/demo}
    CROPS=12 WARM=(--steps 1000 --clean-steps 700 --lr 2e-3)
    VOTE_K=16 VOTE_PAIRS=all HELD_PAIRS=1000 GRPO=(--k 8 --epochs 4 --max-steps 600) SAMPLES=16
else
    echo "demo.sh: DEMO_SCALE must be full or test, got '$SCALE'" >&2
    exit 2
fi
# every stage: the toy prompts (A / B compare labels, a whole-number score), no reasoning suffix, one-token answers.
# The checkpoints carry them too (prompts.json): here they are spelled out, for a reader to see how the toy asks.
COMMON=(--prompts "$PROMPTS" --no-think)

# one folder, one set of settings: a rerun with others would mix two runs' files and print a table of neither
SETTINGS="scale=$SCALE
prepare: --crops $CROPS ${WARM[*]}
vote: --k $VOTE_K --pairs $VOTE_PAIRS (held-out: $HELD_PAIRS)
grpo: ${GRPO[*]}
evaluate: --samples $SAMPLES
every stage: ${COMMON[*]}"
AGAIN="rm -rf $OUT && ${DEMO_SCALE:+DEMO_SCALE=$DEMO_SCALE }${DEMO_OUT:+DEMO_OUT=$DEMO_OUT }bash demo.sh"
if [ -f "$OUT/settings.txt" ]; then
    if [ "$(cat "$OUT/settings.txt")" != "$SETTINGS" ]; then
        {
            echo "demo.sh: $OUT was made with other settings ($OUT/settings.txt); it has"
            grep -vxF -f <(printf '%s\n' "$SETTINGS") "$OUT/settings.txt" | sed 's/^/    /' || true
            echo "  where this run has"
            grep -vxF -f "$OUT/settings.txt" <(printf '%s\n' "$SETTINGS") | sed 's/^/    /' || true
            echo "To start over: $AGAIN; or keep it and give this run another folder: DEMO_OUT=DIR"
        } >&2
        exit 1
    fi
elif [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then
    echo "demo.sh: $OUT holds files but no settings.txt (made by an older demo.sh?), so its scale is unknown." \
         "To start over: $AGAIN; or give this run another folder: DEMO_OUT=DIR" >&2
    exit 1
fi
mkdir -p "$OUT"
[ -f "$OUT/settings.txt" ] || printf '%s\n' "$SETTINGS" > "$OUT/settings.txt"
touch "$OUT/timings.tsv" "$OUT/wall.tsv"
# the main line to the terminal and to demo.log (the side line has side.log)
exec > >(tee -a "$OUT/demo.log") 2> >(tee -a "$OUT/demo.log" >&2)
echo "== demo.sh, DEMO_SCALE=$SCALE, in $OUT, $(date '+%Y-%m-%d %H:%M:%S')"

source toy/step.sh  # step NAME DONE_PATH COMMAND...: skipped when DONE_PATH exists, its seconds logged

vote() {  # vote MODEL MANIFEST OUT PAIRS [extra flags]: K votes per pair of one (crop, type) group
    local model=$1 manifest=$2 out=$3 pairs=$4
    shift 4
    $PY vote.py --model "$model" --manifest "$manifest" --mode same-ref --group-by ref,distortion --pairs "$pairs" \
        --k $VOTE_K --temperature 1.0 --batch-pairs 64 --out "$out" "${COMMON[@]}" "$@"
}

grpo() {  # grpo MODEL LABELS OUT: one round of score GRPO against the votes; a step draws 4 (crop, type) groups
    # of 6 images, the pairs a reward compares, as the votes were drawn, and runs its 4 x 6 x 8 completions in one
    # micro-batch. lr 1e-3, beta 0.1, 600 steps for the toy,
    # chosen on the TRAINING pool's sampled-score SRCC after round 1 (lr 3e-4 x 400: 0.05, 1e-3 x 400: 0.12,
    # 3e-3 x 400: -0.02, 1e-3 x 600: 0.34): a slower round orders the score's probabilities but not its samples
    $PY train_grpo.py --model "$1" --labels "$2" --image-root "$OUT/pool/train" --out "$3" --batch-groups 4 \
        --group-by ref,distortion \
        --max-new-tokens 2 --micro-batch 192 --lr 1e-3 --beta 0.1 --save-every 0 "${GRPO[@]}" "${COMMON[@]}"
}

evaluate() {  # evaluate NAME MODEL: held-out scores, then held-out compare accuracy
    $PY evaluate.py --model "$2" --data heldout="$OUT/heldout.jsonl" --samples $SAMPLES --temperature 1.0 \
        --max-new-tokens 2 --batch-images 64 --out "$OUT/eval/$1" "${COMMON[@]}"
    vote "$2" "$OUT/pool/heldout/manifest.jsonl" "$OUT/eval/$1/compare.jsonl" $HELD_PAIRS --save-text
}

control_labels() {  # the round-1 votes with their labels shuffled across pairs: same pairs, same label mix
    $PY - "$OUT/round1/votes.jsonl" "$OUT/control/votes.jsonl" <<'PY'
import os, sys, numpy as np
sys.path.insert(0, ".")
import common
rows = common.read_jsonl(sys.argv[1])
p = np.random.default_rng(0).permutation([r["p"] for r in rows])
os.makedirs(os.path.dirname(sys.argv[2]), exist_ok=True)
common.write_jsonl_atomic(sys.argv[2], [dict(r, p=float(x)) for r, x in zip(rows, p)])
PY
}

T0=$EPOCHREALTIME
STEPS0=$(wc -l < "$OUT/timings.tsv")
# base.json is what toy/prepare.py writes last
step prepare "$OUT/base.json" $PY toy/prepare.py --out "$OUT" --crops $CROPS --prompts "$PROMPTS" "${WARM[@]}"
step "round 1 votes" "$OUT/round1/votes.jsonl" vote "$OUT/base" "$OUT/pool/train/manifest.jsonl" \
    "$OUT/round1/votes.jsonl" $VOTE_PAIRS --save-text

# the base's evaluation and the control need nothing from round 1's training: they run beside it, on the second core
side() {
    step "eval base" "$OUT/eval/base/compare.jsonl" evaluate base "$OUT/base"
    step "control labels" "$OUT/control/votes.jsonl" control_labels
    step "control grpo" "$OUT/control/final" grpo "$OUT/base" "$OUT/control/votes.jsonl" "$OUT/control"
    step "eval control" "$OUT/eval/control/compare.jsonl" evaluate control "$OUT/control/final"
}
echo "== eval base, control: in the background (log: $OUT/side.log)"
side > "$OUT/side.log" 2>&1 &
SIDE=$!
trap 'kill $SIDE 2>/dev/null || true' EXIT  # a failed main line stops the side one too

step "round 1 grpo" "$OUT/round1/final" grpo "$OUT/base" "$OUT/round1/votes.jsonl" "$OUT/round1"
step "eval round 1" "$OUT/eval/round1/compare.jsonl" evaluate round1 "$OUT/round1/final"
step "round 2 votes" "$OUT/round2/votes.jsonl" vote "$OUT/round1/final" "$OUT/pool/train/manifest.jsonl" \
    "$OUT/round2/votes.jsonl" $VOTE_PAIRS --save-text
step "round 2 grpo" "$OUT/round2/final" grpo "$OUT/round1/final" "$OUT/round2/votes.jsonl" "$OUT/round2"
step "eval round 2" "$OUT/eval/round2/compare.jsonl" evaluate round2 "$OUT/round2/final"

echo "== waiting for eval base, control"
wait $SIDE || { tail -n 20 "$OUT/side.log"; echo "demo.sh: eval base / control failed, see $OUT/side.log" >&2; exit 1; }
grep '^== ' "$OUT/side.log"
if [ "$(wc -l < "$OUT/timings.tsv")" -gt "$STEPS0" ]; then  # this run did some work: its time counts
    awk -v t0="$T0" -v t1="$EPOCHREALTIME" 'BEGIN { printf "%.1f\n", t1 - t0 }' >> "$OUT/wall.tsv"
fi
$PY toy/report.py --out "$OUT" --wall "$(awk '{ s += $1 } END { printf "%.1f", s }' "$OUT/wall.tsv")"
