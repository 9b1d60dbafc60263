#!/usr/bin/env bash
# Runs bench/bench_search.py on a GPU machine as parallel processes that outlive the shell that
# started them, so a machine reached through short calls (a time limit per command) keeps working
# between them, and `collect` packs what is there so far.
#
# Why parallel: the demo model (135M) does not fill an H200. The classical strategies are bound
# by the evaluations' arithmetic, llm-evolution by the launches of SmolLM2's token-by-token
# generation on one CPU thread; run side by side they share the GPU instead of waiting in line.
#
#   bench/search_on_device.sh start     # warm the caches, then start every process (returns at once)
#   bench/search_on_device.sh status    # one line per process log
#   bench/search_on_device.sh collect D # D/runs.tgz (every run folder) and D/logs.tgz
#
# Variables: MODEL (default .carry/SmolLM2-135M-Instruct.Q4_1.gguf), WORK (runs/bench_search),
# LOGS (runs/bench_logs), LLM_GENERATIONS (10: llm-evolution and its matched genetic run).
# Rerunning `start` resumes: finished runs are read back, unfinished ones resume from their
# last generation (see bench_search.py).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-.carry/SmolLM2-135M-Instruct.Q4_1.gguf}
WORK=${WORK:-runs/bench_search}
LOGS=${LOGS:-runs/bench_logs}
LLM_GENERATIONS=${LLM_GENERATIONS:-10}
export PYTHONPATH=pruner_image${PYTHONPATH:+:$PYTHONPATH} OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1

bench() { python3 bench/bench_search.py --model "$MODEL" --workdir "$WORK" "$@"; }

case "${1:-}" in
start)
    mkdir -p "$WORK" "$LOGS"
    # one process first: it converts the GGUF and computes the calibration statistics into the
    # cache, which the parallel processes then only read
    bench --ratios 0.3 --strategies uniform --fidelity full >"$LOGS/warm.log" 2>&1
    for r in 0.2 0.3 0.5; do
        setsid nohup python3 bench/bench_search.py --model "$MODEL" --workdir "$WORK" --ratios "$r" \
            --strategies uniform,owl,genetic,random,evopress --fidelity full,multi \
            --out "$LOGS/classical-$r.json" >"$LOGS/classical-$r.log" 2>&1 </dev/null &
        setsid nohup python3 bench/bench_search.py --model "$MODEL" --workdir "$WORK" --ratios "$r" \
            --strategies genetic,llm-evolution --fidelity full --generations "$LLM_GENERATIONS" \
            --out "$LOGS/llm-$r.json" >"$LOGS/llm-$r.log" 2>&1 </dev/null &
    done
    echo "started; logs in $LOGS"
    ;;
status)
    for f in "$LOGS"/*.log; do printf '%-28s %s\n' "$(basename "$f")" "$(grep -c '^run ' "$f" || true) runs started; last: $(tail -n 1 "$f" | cut -c1-90)"; done
    ls -d "$WORK"/*/ 2>/dev/null | while read -r d; do
        printf '  %-60s %s\n' "$(basename "$d")" "$( [ -f "$d/result.json" ] && echo done || echo "$(wc -l <"$d/history.jsonl" 2>/dev/null || echo 0) evaluations")"
    done
    ;;
collect)
    dest=${2:?collect needs a destination folder}
    tar -czf "$dest/runs.tgz" "$WORK"
    tar -czf "$dest/logs.tgz" "$LOGS"
    ;;
*)
    echo "usage: $0 start|status|collect DEST" >&2
    exit 2
    ;;
esac
