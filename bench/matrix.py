"""A matrix of PruneJobs run by the product itself, and one report of their results.

Why: a benchmark should measure what users run, not a second copy of the search loop. This takes
one PruneJob YAML and axes of spec fields to vary (`--axis calibration.text=a.txt,b.txt --axis
pruning.refit=true,false`), writes one PruneJob per cell of their product, runs each with
`selfpruner run` (resumable: a finished cell is read back, an unfinished one resumes; `--jobs N`
runs N at once, e.g. sharing one GPU), and reports every allocation of every cell (dense, the
baselines, the searched one) with its fitness, its perplexity on each held-out text, their
geometric mean and its ratio to dense: `matrix.json` and `matrix.md` in the work folder.

    PYTHONPATH=pruner_image .venv/bin/python bench/matrix.py --base examples/demo.yaml \\
        --axis target.ratio=0.3,0.5 --workdir runs/matrix
    ... --report-only      # the table from the folders, evaluating nothing
    ... --group search.seed  # also mean ± sd over the seeds of every other cell

Axis values are YAML (`0.3`, `true`, `demo:calibration`), split at `;` where there is one, else at
`,` (`--axis 'llm.evidence=[];[calibration, feedback]'`); keys joined by `+` take the same value
(`--axis search.seed+llm.seed=0,1,2`: the LLM samples with the search's seed); `--set KEY=VALUE` changes the base for
every cell (a YAML value: `--set 'fitness.heldOutTexts=[a.txt, b.txt]'`). A searched row of an
llm-evolution run also says how many of the LLM's offspring entered the population against the
classical operators' (result.json's `origins`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml
from selfpruner.cli import EXIT_DEVICE


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="PruneJob YAML every cell starts from")
    p.add_argument("--axis", action="append", default=[], help="spec.KEY=V1,V2,...: one cell per value")
    p.add_argument("--set", action="append", default=[], dest="sets", help="spec.KEY=YAML for every cell")
    p.add_argument("--workdir", required=True, help="one folder per cell, and the report")
    p.add_argument("--jobs", type=int, default=1, help="cells run at once")
    p.add_argument("--report-only", action="store_true", help="evaluate nothing; report what is there")
    p.add_argument("--group", metavar="AXIS", help="also report mean ± sd over this axis (e.g. search.seed)")
    p.add_argument("--device-retries", type=int, default=5, metavar="N",
                   help="rerun a cell whose device failed or was full (exit 3) up to N times")
    p.add_argument("--retry-wait", type=float, default=60.0, metavar="S", help="seconds before such a rerun")
    return p.parse_args(argv)


def _split(text: str, what: str) -> tuple[list[str], str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        sys.exit(f"{what} {text!r}: write KEY=VALUE, e.g. target.ratio=0.3")
    return key.removeprefix("spec.").split("."), value


def _put(spec: dict, path: list[str], value) -> None:
    for part in path[:-1]:
        spec = spec.setdefault(part, {})
    spec[path[-1]] = value


def cell_name(values: dict) -> str:
    """A folder and PruneJob name from the cell's values: plain, bounded, distinct per cell."""
    parts = []
    for key, value in values.items():
        short = Path(str(value)).stem if "/" in str(value) else str(value)
        parts.append(f"{key.split('.')[-1]}-{short}")
    name = re.sub(r"[^a-z0-9-]+", "-", "_".join(parts).lower()).strip("-") or "base"
    return name[:60]


def cells(a) -> list[tuple[str, dict, dict]]:
    """(name, axis values, PruneJob document) of every cell."""
    base = yaml.safe_load(Path(a.base).read_text())
    for text in a.sets:
        path, value = _split(text, "--set")
        _put(base["spec"], path, yaml.safe_load(value))
    axes = []
    for text in a.axis:
        path, values = _split(text, "--axis")
        # values split at ';' where there is one (a list value holds commas), else at ','
        axes.append((".".join(path), [yaml.safe_load(v) for v in values.split(";" if ";" in values else ",")]))
    out, names = [], set()
    for combo in itertools.product(*[values for _, values in axes]):
        values = {key: v for (key, _), v in zip(axes, combo)}
        doc = json.loads(json.dumps(base))
        for key, v in values.items():
            for one in key.split("+"):
                _put(doc["spec"], one.split("."), v)
        name = cell_name(values)
        if name in names:
            sys.exit(f"two cells are both named {name}: make the axis values differ in their first 60 characters")
        names.add(name)
        doc["metadata"] = {**doc.get("metadata", {}), "name": name}
        doc["spec"].setdefault("output", {})["path"] = str(Path(a.workdir) / name)
        out.append((name, values, doc))
    return out


def run_cell(name: str, doc: dict, workdir: Path, retries: int = 0, wait: float = 60.0) -> str:
    """Run one cell; where its device failed or was full (cells sharing one GPU), wait and resume it,
    up to `retries` times."""
    folder = workdir / name
    if (folder / "result.json").is_file():
        return f"{name}: done before"
    folder.mkdir(parents=True, exist_ok=True)
    job = workdir / f"{name}.yaml"
    job.write_text(yaml.safe_dump(doc, sort_keys=False))
    for attempt in range(retries + 1):
        with open(workdir / f"{name}.log", "a") as log:
            if attempt:
                print(f"matrix: device failed or full; rerun {attempt} of {retries}", file=log, flush=True)
            done = subprocess.run([sys.executable, "-m", "selfpruner.cli", "run", str(job), "--quiet"],
                                  stdout=log, stderr=subprocess.STDOUT)
        if done.returncode != EXIT_DEVICE or attempt == retries:  # 3: device failed or full; a rerun resumes
            break
        time.sleep(wait)
    reruns = f" after {attempt} rerun(s)" if attempt else ""
    return f"{name}: {'finished' if done.returncode == 0 else f'failed ({done.returncode}), see {name}.log'}{reruns}"


def rows_of(name: str, values: dict, result: dict) -> list[dict]:
    dense = result["dense"].get("held_out_geometric_mean") or result["dense"].get("held_out_perplexity")
    named = [("dense", "dense", result["dense"])] + [(b, b, r) for b, r in result["baselines"].items()]
    named += [("searched", "best", result["best"])]
    zero_shot = ((result.get("zero_shot") or {}).get("table") or {}).get("rows") or {}
    out = []
    for allocation, key, r in named:
        held = r.get("held_out_perplexities") or [r.get("held_out_perplexity")]
        geo = r.get("held_out_geometric_mean") or held[0]
        zs = zero_shot.get(key) or {}
        out.append({"cell": name, **values, "allocation": allocation, "fitness": r.get("fitness"),
                    "held_out": held, "geometric_mean": geo,
                    "vs_dense": geo / dense if geo and dense else None,
                    "zero_shot_mean": zs.get("mean"), "zero_shot_stderr": zs.get("mean_stderr"),
                    "zero_shot_drop": zs.get("mean_drop")})
    out[-1].update(offspring(result.get("origins") or {}))
    out[-1].update(search_figures(result))
    return out


def search_figures(result: dict) -> dict:
    """What the searched row's search cost and how it went: the best of the initial population, the
    seconds a generation spent in the LLM and in evaluations, and the LLM's share of each
    generation's crossovers and mutations (llm-evolution)."""
    gens = result.get("generations") or []
    later = [g for g in gens if g.get("generation", 0) >= 1]
    out = {"evaluations": (result.get("cost") or {}).get("evaluations"),
           "wall_seconds": (result.get("cost") or {}).get("wall_seconds"),
           "initial_best": (result.get("best_per_generation") or [None])[0],
           "evaluation_seconds_per_generation": _mean([g.get("evaluation_seconds") for g in later])}
    llm = (result.get("cost") or {}).get("llm")
    if llm:
        out.update({"llm_seconds_per_generation": _mean([g.get("llm_seconds") for g in later]),
                    "llm_duplicates": llm.get("offspring_duplicates"),
                    "llm_share_per_generation": llm_shares(gens)})
    return out


def llm_shares(generations: list[dict]) -> list[float]:
    """The LLM's share of each generation's crossovers and mutations (allocation.py's slots)."""
    arms = ("llm-crossover", "llm-mutation", "crossover", "mutation")
    return [round((g["shares"].get(arms[0], 0) + g["shares"].get(arms[1], 0))
                  / max(1, sum(g["shares"].get(k, 0) for k in arms)), 3) for g in generations if g.get("shares")]


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(statistics.mean(xs), 2) if xs else None


def groups(rows: list[dict], keys: list[str], over: str) -> list[dict]:
    """Mean and standard deviation over the axis `over` (the seeds) of every other axis' cell and
    allocation: what a comparison between strategies should read, not one seed's luck."""
    out: dict[tuple, list] = {}
    for r in rows:
        out.setdefault(tuple(str(r.get(k)) for k in keys if k != over) + (r["allocation"],), []).append(r)
    table = []
    for key, rs in out.items():
        g = {**{k: rs[0].get(k) for k in keys if k != over}, "allocation": rs[0]["allocation"], "n": len(rs)}
        for field in ("fitness", "geometric_mean", "vs_dense", "initial_best"):
            xs = [r.get(field) for r in rs if r.get(field) is not None]
            if xs:
                g[field] = statistics.mean(xs)
                g[f"{field}_sd"] = statistics.stdev(xs) if len(xs) > 1 else 0.0
        for i in range(len(rs[0]["held_out"])):
            g.setdefault("held_out", []).append(statistics.mean(r["held_out"][i] for r in rs))
        table.append(g)
    return table


def offspring(origins: dict) -> dict:
    """The searched row's offspring, LLM-written (llm-crossover, llm-mutation) against classical
    (crossover, mutation, and `classical`: a reply the LLM got wrong): how many entered the population."""
    out = {}
    for side, names in (("llm", ("llm-crossover", "llm-mutation")), ("classical", ("crossover", "mutation", "classical"))):
        made = sum(origins.get(n, {}).get("made", 0) for n in names)
        entered = sum(origins.get(n, {}).get("entered", 0) for n in names)
        if made:
            out[f"{side}_offspring"] = made
            out[f"{side}_entered_share"] = entered / made
    return out


def report(a, all_cells) -> list[dict]:
    workdir = Path(a.workdir)
    rows, texts, missing = [], None, []
    for name, values, _ in all_cells:
        path = workdir / name / "result.json"
        if not path.is_file():
            missing.append(name)
            continue
        result = json.loads(path.read_text())
        texts = texts or [t["text"] for t in result.get("held_out_texts") or [result["held_out_text"]]]
        rows += rows_of(name, values, result)
    keys = list(all_cells[0][1]) if all_cells else []  # the axes, in the order given
    zero_shot = any(r["zero_shot_mean"] is not None for r in rows)
    llm = any("llm_offspring" in r for r in rows)
    head = keys + ["allocation", "fitness"] + [f"held-out {i + 1}" for i in range(len(texts or []))] + \
        ["geo-mean", "× dense"] + (["0-shot mean %", "drop"] if zero_shot else []) + \
        (["LLM offspring entered", "classical entered"] if llm else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells_ = [str(r.get(k)) for k in keys] + [r["allocation"], _num(r["fitness"])]
        cells_ += [_num(x) for x in r["held_out"]] + [_num(r["geometric_mean"]), _num(r["vs_dense"])]
        if zero_shot:
            mean, se = r["zero_shot_mean"], r.get("zero_shot_stderr")
            cells_ += [_num(None if mean is None else 100 * mean, ".1f") + ("" if se is None else f" ± {100 * se:.1f}"),
                       _num(None if r["zero_shot_drop"] is None else 100 * r["zero_shot_drop"], ".1f")]
        if llm:
            cells_ += [_share(r, "llm"), _share(r, "classical")]
        lines.append("| " + " | ".join(cells_) + " |")
    lines += [""] + [f"held-out {i + 1}: {t}" for i, t in enumerate(texts or [])]
    if missing:
        lines.append(f"not finished: {', '.join(missing)}")
    summary = None
    if a.group:
        if a.group not in keys:
            sys.exit(f"--group {a.group}: not one of the axes ({', '.join(keys) or 'none'})")
        summary = groups(rows, keys, a.group)
        rest = [k for k in keys if k != a.group]
        head = rest + ["allocation", "n", "fitness", "initial best"] + \
            [f"held-out {i + 1}" for i in range(len(texts or []))] + ["geo-mean", "× dense"]
        lines += ["", f"mean ± sd over {a.group}:", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for g in summary:
            sd = lambda f: f"{_num(g.get(f))} ± {_num(g.get(f + '_sd'))}" if g.get(f) is not None else "-"  # noqa: E731
            lines.append("| " + " | ".join([str(g.get(k)) for k in rest] + [g["allocation"], str(g["n"]), sd("fitness"),
                         sd("initial_best")] + [_num(x) for x in g["held_out"]] + [sd("geometric_mean"),
                                                                                      _num(g.get("vs_dense"))]) + " |")
    (workdir / "matrix.md").write_text("\n".join(lines) + "\n")
    (workdir / "matrix.json").write_text(json.dumps({"held_out_texts": texts, "rows": rows, "unfinished": missing,
                                                     **({"groups": summary} if summary is not None else {})},
                                                    indent=2) + "\n")
    print("\n".join(lines))
    return rows


def _share(row: dict, side: str) -> str:
    made = row.get(f"{side}_offspring")
    return f"{100 * row[f'{side}_entered_share']:.0f} % of {made}" if made else "-"


def _num(x, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:{spec}}"


def main(argv=None) -> int:
    a = parse_args(argv)
    all_cells = cells(a)
    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if not a.report_only:
        with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:
            for line in pool.map(lambda c: run_cell(c[0], c[2], workdir, a.device_retries, a.retry_wait), all_cells):
                print(line, flush=True)
    report(a, all_cells)
    return 0


if __name__ == "__main__":
    sys.exit(main())
