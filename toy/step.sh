# step NAME DONE_PATH COMMAND...: run COMMAND unless DONE_PATH exists, and append its seconds to $OUT/timings.tsv.
# Sourced by demo.sh and toy/ablation.sh, whose steps a rerun skips the same way.
step() {
    local name=$1 done=$2 t0
    shift 2
    if [ -e "$done" ]; then echo "== $name: done already ($done)"; return; fi
    echo "== $name: $*"
    t0=$EPOCHREALTIME
    "$@"
    awk -v n="$name" -v t0="$t0" -v t1="$EPOCHREALTIME" 'BEGIN { printf "%s\t%.1f\n", n, t1 - t0 }' >> "$OUT/timings.tsv"
}
