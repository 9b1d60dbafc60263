#!/usr/bin/env bash
# Speed on the GPU (issue 30, items 3 and 4) with bench/bench_export_throughput.py, detached (setsid) so it
# outlives the call that started it, run from a copy of bench/ and pruner_image/ outside the working tree (a
# later call replaces the working tree under a running process). Each step's JSON is rewritten after every
# model it measures, so a session that ends early keeps what was done.
#
#   bench/speed_on_device.sh start       # copy to $SRC, start the steps in the background; returns at once
#   bench/speed_on_device.sh status      # the log's last lines and the JSON written so far
#   bench/speed_on_device.sh collect D   # D/speed.tgz: every JSON, the log, nvidia-smi's line
#   bench/speed_on_device.sh steps       # what `start` runs, in the foreground
#
# Steps ($STEPS, in this order; default "smoke 70b checkpoints"), with estimates for one H200:
#   smoke        --shape llama2-70b --tiny on the GPU: graph decode at batch 4, the in-place prune and its
#                checks against PrunableModel, in ~30 s (imports included).
#   70b          item 4: LLaMA-2-70B shape, random bf16 (128.5 GiB), built on the GPU, measured dense, pruned in
#                place to 30 % and then 50 % of the block params (uniform kv-group: 6 then 4 of 8 KV groups,
#                19 712 then 14 336 MLP channels), each measured: prefill 8 x 2048 (batch halved only if it
#                does not fit, recorded), eager and graph decode at batch 1 and 16 (128-token prompt, 128 new),
#                the prefill split, peak memory. Estimate per model: prefill 4 x 3-5 s, split ~4 s, eager decode
#                ~45 s per batch size (launch-bound, ~75 ms a token over 80 blocks), graph decode ~20 s per batch
#                size: ~150 s dense, ~130 s and ~115 s pruned, + build and imports ~20 s: ~7 min (under 10).
#                EAGER_BATCHES=1 saves ~45 s per model (eager batch 16 skipped; graph keeps both).
#   checkpoints  item 3: $DENSE against $CHECKPOINTS (and the ones PRUNE_RATIOS makes), the same measurements.
#                Qwen2.5-Coder-1.5B: ~5 s load and ~50 s of measurements per model: ~3 min for three; each
#                `selfpruner prune` adds ~30-60 s (calibration on the GPU, export to $CKPT_DIR).
# Whole run about 11 minutes of the GPU; the session has 30.
#
# Variables: RESULTS (runs/bench_speed), SRC (/tmp/selfpruner_speed_src), STEPS, PYTHON (python3),
#   EAGER_BATCHES (unset: eager decode at every decode batch), EXTRA_70B / EXTRA_CKPT (more arguments),
#   DENSE (the dense model of step checkpoints: a Hugging Face folder, e.g. the product's conversion of the
#   Qwen2.5-Coder-1.5B-Instruct GGUF under $SELFPRUNER_CACHE/models/, or the .gguf itself, converted once),
#   CHECKPOINTS ("NAME=DIR ...": exported pruned folders of DENSE), PRUNE_RATIOS (e.g. "0.3 0.5": make
#   NAME=prune-R checkpoints of DENSE first with `selfpruner prune --ratio R`, product defaults; the
#   calibration text, demo:calibration unless PRUNE_ARGS says otherwise, must be in $SELFPRUNER_CACHE: the
#   machine has no network), PRUNE_ARGS (e.g. "--head-mode kv-group --mlp-multiple 128"), CKPT_DIR
#   (/dev/shm/selfpruner_speed: those checkpoints; the disk holds 64 GiB).
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=$(mkdir -p "${RESULTS:-runs/bench_speed}" && cd "${RESULTS:-runs/bench_speed}" && pwd)
SRC=${SRC:-/tmp/selfpruner_speed_src}
STEPS=${STEPS:-smoke 70b checkpoints}
PYTHON=${PYTHON:-python3}
CKPT_DIR=${CKPT_DIR:-/dev/shm/selfpruner_speed}
export RESULTS SRC STEPS PYTHON CKPT_DIR
export PYTHONPATH=pruner_image${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

bench() {  # bench NAME ARGS...: one bench_export_throughput.py run, its JSON at $RESULTS/NAME.json
    local name=$1 t=$SECONDS rc=0; shift
    echo "=== $name: started $(date +%T)"
    "$PYTHON" bench/bench_export_throughput.py --out "$RESULTS/$name.json" \
        ${EAGER_BATCHES:+--eager-batches "$EAGER_BATCHES"} "$@" || rc=$?
    echo "=== $name: finished rc=$rc in $((SECONDS - t)) s"
}

case "${1:-}" in
start)
    rm -rf "$SRC" && mkdir -p "$SRC"
    cp -rL bench pruner_image "$SRC/"  # -L: the package's CRD is a link to crds/prunejob.yaml
    nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.max.sm,temperature.gpu --format=csv \
        >"$RESULTS/nvidia-smi.csv" 2>&1 || true
    setsid nohup bash "$SRC/bench/speed_on_device.sh" steps >"$RESULTS/speed.log" 2>&1 </dev/null &
    echo "started from $SRC; log $RESULTS/speed.log"
    ;;
steps)
    for step in $STEPS; do
        case $step in
        smoke) bench smoke-70b-tiny --shape llama2-70b --tiny --device cuda ;;
        70b) bench speed_70b --shape llama2-70b ${EXTRA_70B:-} ;;
        checkpoints)
            if [ -z "${DENSE:-}" ]; then echo "=== checkpoints: skipped (no DENSE)"; continue; fi
            made=()
            for r in ${PRUNE_RATIOS:-}; do
                echo "=== prune $r: started $(date +%T)"
                if "$PYTHON" -c "import sys; from selfpruner.cli import main; sys.exit(main())" prune --model "$DENSE" \
                    --ratio "$r" --dtype bfloat16 --device cuda --force --output "$CKPT_DIR/prune-$r" ${PRUNE_ARGS:-}; then
                    made+=("prune-$r=$CKPT_DIR/prune-$r")
                fi
            done
            # shellcheck disable=SC2086
            bench speed_checkpoints --checkpoints "$DENSE" ${CHECKPOINTS:-} ${made[@]+"${made[@]}"} ${EXTRA_CKPT:-}
            ;;
        *) echo "=== unknown step $step" ;;
        esac
    done
    echo "=== all steps done $(date +%T)"
    ;;
status)
    tr '\r' '\n' <"$RESULTS/speed.log" | grep -v '^\s*$' | tail -n "${LINES_SHOWN:-15}" | cut -c1-200
    for f in "$RESULTS"/*.json; do
        [ -f "$f" ] && "$PYTHON" -c "import json, sys; r = json.load(open(sys.argv[1])); print(sys.argv[1], [x['name'] for x in r['rows']], f\"{r.get('total_s', 0):.0f} s\")" "$f" || true
    done
    ;;
collect)
    dest=${2:?collect needs a destination folder}
    mkdir -p "$dest"
    tar -czf "$dest/speed.tgz" -C "$RESULTS" .
    ;;
*)
    echo "usage: $0 start|status|collect DEST|steps" >&2
    exit 2
    ;;
esac
