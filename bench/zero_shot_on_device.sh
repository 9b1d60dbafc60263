#!/usr/bin/env bash
# Runs bench/bench_zero_shot.py on a GPU machine, one detached process per ratio (lm-eval's
# Python overhead is per document, so three processes share the GPU better than one), and
# merges their tables.
#
#   bench/zero_shot_on_device.sh start      # returns at once; logs in $LOGS
#   bench/zero_shot_on_device.sh status     # the last line of each log
#   bench/zero_shot_on_device.sh collect D  # D/zero_shot.tgz (logs and JSON) and the merged table
#
# Variables: MODEL (the demo GGUF), LOGS (runs/bench_zero_shot_logs), RATIOS (0.2 0.3 0.5).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-.carry/SmolLM2-135M-Instruct.Q4_1.gguf}
LOGS=${LOGS:-runs/bench_zero_shot_logs}
RATIOS=${RATIOS:-0.2 0.3 0.5}
export PYTHONPATH=pruner_image${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

case "${1:-}" in
start)
    mkdir -p "$LOGS"
    # convert the GGUF and compute the calibration statistics once, before the processes read them
    python3 -c "import sys; from selfpruner.model_source import load; load(sys.argv[1])" "$MODEL"
    for r in $RATIOS; do
        setsid nohup python3 bench/bench_zero_shot.py --model "$MODEL" --ratios "$r" --out "$LOGS/zs-$r.json" \
            >"$LOGS/zs-$r.log" 2>&1 </dev/null &
    done
    echo "started; logs in $LOGS"
    ;;
status)
    for f in "$LOGS"/*.log; do echo "$f: $(tr '\r' '\n' <"$f" | grep -v '^\s*$' | tail -1 | cut -c1-160)"; done
    ;;
collect)
    mkdir -p "$2"
    python3 bench/bench_zero_shot.py --merge "$LOGS"/zs-*.json --out "$LOGS/merged.json" || true
    tar czf "$2/zero_shot.tgz" -C "$LOGS" .
    ;;
*)
    echo "usage: $0 start|status|collect DIR" >&2; exit 2
    ;;
esac
