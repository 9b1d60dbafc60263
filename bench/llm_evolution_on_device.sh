#!/usr/bin/env bash
# Runs bench/bench_llm_evolution.py on a GPU machine as parallel processes that outlive the
# shell that started them (a machine reached through short calls keeps working between them),
# and packs what is there so far.
#
#   bench/llm_evolution_on_device.sh start     # genetic and the demo LLM's runs at once (both allocations:
#                                              # adaptive, the default, and the paper's fixed); the runs of
#                                              # the second LLM start when its GGUF appears
#   bench/llm_evolution_on_device.sh status    # one line per process log
#   bench/llm_evolution_on_device.sh collect D # D/llm_evolution.tgz: logs, JSON, the runs' result files
#
# Variables: MODEL (the demo GGUF: the model pruned, and the first LLM), QWEN (the second LLM's GGUF,
# Qwen2.5-Coder-0.5B-Instruct; its sha256 is checked), WORK, LOGS, SEEDS (0,1,2), RATIOS (0.3 0.5),
# ALLOCATIONS (the demo LLM's: "adaptive fixed"), QWEN_ALLOCATIONS ("adaptive"), EVIDENCE (llm.evidence
# variants of every LLM run, e.g. none,calibration,calibration+correlations,calibration+correlations+feedback;
# default none).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-/tmp/gguf/SmolLM2-135M-Instruct.Q4_1.gguf}
QWEN=${QWEN:-/tmp/gguf/qwen2.5-coder-0.5b-instruct.gguf}
QWEN_SHA=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
WORK=${WORK:-runs/bench_llm_evolution}
LOGS=${LOGS:-runs/bench_llm_logs}
SEEDS=${SEEDS:-0,1,2}
RATIOS=${RATIOS:-0.3 0.5}
QWEN_SEEDS=${QWEN_SEEDS:-$SEEDS}            # the second LLM's seeds (it arrives last: fewer fit a lease)
QWEN_EXTRAS=${QWEN_EXTRAS:-}               # ablations of the second LLM (tournament, edits), at the first ratio and seed
ALLOCATIONS=${ALLOCATIONS:-adaptive fixed}
QWEN_ALLOCATIONS=${QWEN_ALLOCATIONS:-adaptive}
EVIDENCE=${EVIDENCE:-none}
export PYTHONPATH=pruner_image${PYTHONPATH:+:$PYTHONPATH} OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

launch() {  # launch NAME ARGS...: one detached process, its log and JSON under $LOGS
    local name=$1; shift
    setsid nohup python3 bench/bench_llm_evolution.py --model "$MODEL" --workdir "$WORK" --seeds "$SEEDS" \
        --out "$LOGS/$name.json" "$@" >"$LOGS/$name.log" 2>&1 </dev/null &
}

case "${1:-}" in
start)
    mkdir -p "$WORK" "$LOGS"
    # convert the GGUF and compute the calibration statistics once, before the parallel processes read them
    python3 bench/bench_llm_evolution.py --model "$MODEL" --workdir "$WORK" --seeds 0 --ratios 0.3 \
        --strategies genetic --generations 0 --out "$LOGS/warm.json" >"$LOGS/warm.log" 2>&1
    # one process per LLM run and seed: generation is bound by kernel launches, so many processes
    # share the GPU well; the classical strategies are cheap and run their seeds in one process
    for r in $RATIOS; do
        launch "classical-$r" --ratios "$r" --strategies genetic
        for s in ${SEEDS//,/ }; do
            for alloc in $ALLOCATIONS; do
                launch "smollm2-$r-s$s-$alloc" --ratios "$r" --seeds "$s" --strategies llm-evolution \
                    --llm "smollm2=$MODEL" --allocation "$alloc" --evidence "$EVIDENCE"
            done
        done
    done
    # the second LLM arrives in pieces over several calls: its runs start when it is whole
    setsid nohup "$0" wait-qwen >"$LOGS/waiter.log" 2>&1 </dev/null &
    echo "started; logs in $LOGS"
    ;;
wait-qwen)
    until [ -f "$QWEN" ] && [ "$(sha256sum "$QWEN" | cut -d' ' -f1)" = "$QWEN_SHA" ]; do sleep 10; done
    python3 -c "import sys; from selfpruner.model_source import load; load(sys.argv[1])" "$QWEN"  # convert once
    for r in $RATIOS; do
        for s in ${QWEN_SEEDS//,/ }; do
            for alloc in $QWEN_ALLOCATIONS; do
                launch "qwen05-$r-s$s-$alloc" --ratios "$r" --seeds "$s" --strategies llm-evolution \
                    --llm "qwen05=$QWEN" --sha256 "qwen05=$QWEN_SHA" --allocation "$alloc" --evidence "$EVIDENCE"
            done
        done
    done
    set -- $RATIOS
    for extra in $QWEN_EXTRAS; do  # the ablations, at the first ratio and seed
        case $extra in
        tournament) launch "qwen05-tournament-$1" --ratios "$1" --seeds "${QWEN_SEEDS%%,*}" --strategies llm-evolution \
                        --llm "qwen05=$QWEN" --selection tournament ;;
        edits) launch "qwen05-edits-$1" --ratios "$1" --seeds "${QWEN_SEEDS%%,*}" --strategies llm-evolution \
                   --llm "qwen05=$QWEN" --operators edits ;;
        esac
    done
    echo "qwen runs started"
    ;;
status)
    for f in "$LOGS"/*.log; do
        printf '%-30s %s\n' "$(basename "$f")" "$(grep -c '^run ' "$f" || true) runs started; last: $(tail -n 1 "$f" | cut -c1-100)"
    done
    echo "finished runs: $(ls "$WORK"/*/result.json 2>/dev/null | wc -l)"
    ;;
collect)
    dest=${2:?collect needs a destination folder}
    # result, state, transcript and history of every run (small), not the calibration caches
    find "$WORK" -maxdepth 2 \( -name result.json -o -name state.json -o -name llm_transcript.jsonl \
        -o -name history.jsonl -o -name fitness.png \) -print0 | tar -czf "$dest/llm_evolution.tgz" --null -T - "$LOGS"
    ;;
*)
    echo "usage: $0 start|status|collect DEST" >&2
    exit 2
    ;;
esac
