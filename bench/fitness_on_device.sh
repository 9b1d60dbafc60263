#!/usr/bin/env bash
# Runs bench/bench_fitness.py on a GPU machine as parallel detached processes (setsid), one per
# (β, rates), so they outlive the shell that started them and share the GPU the demo model does
# not fill; `collect` packs the run folders and logs.
#
#   bench/fitness_on_device.sh start      # warm the caches, then start every process (returns at once)
#   bench/fitness_on_device.sh status     # runs finished so far
#   bench/fitness_on_device.sh collect D  # D/fitness-runs.tgz and D/fitness-logs.tgz
#
# Variables: MODEL (.carry/SmolLM2-135M-Instruct.Q4_1.gguf), WORK (runs/bench_fitness), LOGS
# (runs/bench_fitness_logs), RATIOS (0.3 0.5), RATES (block separate), STRATEGIES (genetic),
# VARIANTS (ppl,kl,kl-staged,kl-staged20), SEEDS (0). Rerunning `start` resumes finished runs.
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
export PYTHONPATH=pruner_image${PYTHONPATH:+:$PYTHONPATH} OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1

case "${1:-}" in
start)
    mkdir -p "$WORK" "$LOGS"
    # one short run first: it converts the GGUF and computes the calibration statistics into the
    # cache, which the parallel processes then only read
    python3 bench/bench_fitness.py --model "$MODEL" --workdir "$WORK" --warm >"$LOGS/warm.log" 2>&1
    for r in $RATIOS; do
        for k in $RATES; do
            setsid nohup python3 bench/bench_fitness.py --model "$MODEL" --workdir "$WORK" --ratios "$r" \
                --strategies "$STRATEGIES" --variants "$VARIANTS" --rates "$k" --seeds "$SEEDS" \
                --out "$LOGS/fitness-$r-$k.json" >"$LOGS/fitness-$r-$k.log" 2>&1 </dev/null &
        done
    done
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
    tar -czf "$dest/fitness-runs.tgz" --exclude=checkpoint "$WORK"
    tar -czf "$dest/fitness-logs.tgz" "$LOGS"
    ;;
*)
    echo "usage: $0 start|status|collect DEST" >&2
    exit 2
    ;;
esac
