#!/usr/bin/env bash
# Runs bench/bench_fitness.py on a GPU machine as detached processes (setsid), so they outlive the
# shell that started them: one process per cell (β, rates, strategy, seed) running its variants, at
# most PROCS at once, cells taken seed by seed (seed 0 of every cell first), so a session that ends
# early holds whole seeds; `collect` packs the run folders and logs.
#
#   bench/fitness_on_device.sh start      # warm the caches, then start every process (returns at once)
#   bench/fitness_on_device.sh status     # runs finished so far
#   bench/fitness_on_device.sh collect D  # D/fitness-runs.tgz and D/fitness-logs.tgz
#
# Variables: MODEL (.carry/SmolLM2-135M-Instruct.Q4_1.gguf), WORK (runs/bench_fitness), LOGS
# (runs/bench_fitness_logs), RATIOS (0.3 0.5), RATES (block separate), STRATEGIES (genetic),
# VARIANTS (ppl,kl,kl-staged,kl-staged20), SEEDS (0), PROCS (16), TF32 (1: --tf32; 0: plain float32).
# Rerunning `start` resumes finished runs. Merge the per-cell results with
#   python3 bench/bench_fitness.py --merge LOGS/fitness-*.json --out all.json
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-.carry/SmolLM2-135M-Instruct.Q4_1.gguf}
WORK=${WORK:-runs/bench_fitness}
LOGS=${LOGS:-runs/bench_fitness_logs}
RATIOS=${RATIOS:-0.3 0.5}
RATES=${RATES:-block separate}
STRATEGIES=${STRATEGIES:-genetic}
VARIANTS=${VARIANTS:-ppl,kl,kl-staged,kl-staged20}
SEEDS=${SEEDS:-0}
PROCS=${PROCS:-16}
TF32=${TF32:-1}
export PYTHONPATH=pruner_image${PYTHONPATH:+:$PYTHONPATH} OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
TF32_FLAG=
[ "$TF32" = 1 ] && TF32_FLAG=--tf32

case "${1:-}" in
start)
    mkdir -p "$WORK" "$LOGS"
    # one short run first: it converts the GGUF and computes the calibration statistics into the
    # cache, which the parallel processes then only read
    python3 bench/bench_fitness.py --model "$MODEL" --workdir "$WORK" $TF32_FLAG --warm >"$LOGS/warm.log" 2>&1
    for seed in $SEEDS; do for st in ${STRATEGIES//,/ }; do for r in $RATIOS; do for k in $RATES; do
        echo "$r $k $st $seed"
    done; done; done; done >"$LOGS/cells"
    # xargs keeps PROCS cells running and starts the next as one ends; each line is β rates strategy seed
    export MODEL WORK LOGS VARIANTS TF32_FLAG
    setsid nohup xargs -P "$PROCS" -L 1 sh -c 'name="fitness-$1-$2-$3-$4"
        exec python3 bench/bench_fitness.py --model "$MODEL" --workdir "$WORK" $TF32_FLAG --variants "$VARIANTS" \
            --ratios "$1" --rates "$2" --strategies "$3" --seeds "$4" --out "$LOGS/$name.json" >"$LOGS/$name.log" 2>&1' \
        cell <"$LOGS/cells" >"$LOGS/xargs.log" 2>&1 &
    echo "started; logs in $LOGS"
    ;;
status)
    for f in "$LOGS"/fitness-*.log; do
        printf '%-32s %s runs started; last: %s\n' "$(basename "$f")" "$(grep -c '^run ' "$f" || true)" "$(tail -n 1 "$f" | cut -c1-80)"
    done
    ls "$WORK"/*/result.json 2>/dev/null | wc -l
    ;;
collect)
    dest=${2:?collect needs a destination folder}
    # runs still going change their files under tar (exit status 1); what was read is kept
    tar -czf "$dest/fitness-runs.tgz" --warning=no-file-changed --exclude=checkpoint "$WORK" || [ $? = 1 ]
    tar -czf "$dest/fitness-logs.tgz" --warning=no-file-changed "$LOGS" || [ $? = 1 ]
    ;;
*)
    echo "usage: $0 start|status|collect DEST" >&2
    exit 2
    ;;
esac
