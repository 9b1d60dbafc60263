#!/usr/bin/env bash
# Runs a bench/matrix.py matrix on a GPU machine as one detached process (setsid), from a private copy
# of the source (SRC), so that it outlives the shell that started it and a later refresh of the
# working tree cannot break an import; the matrix runs JOBS PruneJobs at once on the one GPU.
#
#   bench/matrix_on_device.sh start ARGS...   # matrix.py's arguments (--base, --axis, --set, --workdir)
#   bench/matrix_on_device.sh status ARGS...  # the same arguments: the report so far, from the folders
#   bench/matrix_on_device.sh collect D ARGS... # D/matrix.tgz: the report, run folders (no checkpoints), logs
#
# Variables: SRC (/tmp/src-matrix), JOBS (4), PYTHON (python3). Rerunning `start` resumes: finished
# cells are read back, unfinished ones resume from their state.json, and a cell still running in an
# earlier copy refuses the second run (its folder's lock), so `start` may be rerun at any time (with
# another SRC while the earlier copy runs: `start` replaces SRC), e.g. for cells that stopped because
# the shared GPU ran out of memory (each says so in its log).
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${SRC:-/tmp/src-matrix}
JOBS=${JOBS:-4}
PYTHON=${PYTHON:-python3}
export PYTHONPATH=$SRC/pruner_image${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

workdir() {  # the --workdir among the arguments
    while [ $# -gt 0 ]; do [ "$1" = --workdir ] && { echo "$2"; return; }; shift; done
    echo "matrix_on_device.sh: give --workdir" >&2; exit 2
}

cmd=${1:-}; shift || true
case "$cmd" in
start)
    work=$(workdir "$@")
    rm -rf "$SRC" && mkdir -p "$SRC" "$work" && cp -rL bench pruner_image "$SRC"/  # -L: the package's CRD is a link to crds/prunejob.yaml
    setsid nohup "$PYTHON" "$SRC/bench/matrix.py" --jobs "$JOBS" "$@" >"$work/matrix.log" 2>&1 &
    echo "started; log in $work/matrix.log"
    ;;
status)
    work=$(workdir "$@")
    tail -n 3 "$work/matrix.log" 2>/dev/null || true
    "$PYTHON" bench/matrix.py "$@" --report-only | tail -n 40
    ;;
collect)
    dest=${1:?collect needs a destination folder}; shift
    work=$(workdir "$@")
    "$PYTHON" bench/matrix.py "$@" --report-only >/dev/null
    # cells still running change their files under tar (exit status 1); what was read is kept
    tar -czf "$dest/matrix.tgz" --warning=no-file-changed --exclude=checkpoint "$work" || [ $? = 1 ]
    ;;
*)
    sed -n '2,12p' "$0"; exit 2
    ;;
esac
