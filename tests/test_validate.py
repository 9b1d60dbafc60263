"""`selfpruner validate` refuses malformed PruneJobs, one line per problem naming the field."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from selfpruner import spec

GOOD = {
    "apiVersion": "selfpruner.io/v1alpha1", "kind": "PruneJob", "metadata": {"name": "ok"},
    "spec": {"model": {"source": "demo"}, "target": {"ratio": 0.3}},
}


def mutate(path: str, value):
    doc = copy.deepcopy(GOOD)
    *parents, last = path.split(".")
    node = doc
    for p in parents:
        node = node.setdefault(p, {})
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return doc


DELETE = object()
CASES = [
    ("apiVersion", "selfpruner.io/v2", "apiVersion: must be selfpruner.io/v1alpha1"),
    ("kind", "Job", "kind: must be PruneJob"),
    ("metadata.name", "Not_A_Name", "metadata.name"),
    ("spec.model", DELETE, "spec.model: required field is missing"),
    ("spec.model.source", "", "spec.model.source"),
    ("spec.model.dtype", "float64", "spec.model.dtype"),
    ("spec.target.ratio", 1.0, "spec.target.ratio"),
    ("spec.target.ratio", "0.3", "spec.target.ratio: '0.3' is not of type 'number'"),
    ("spec.target.maxRate", 0.2, "spec.target: ratio must lie between minRate and maxRate"),
    ("spec.target.minRate", 0.005, "spec.target.minRate: 0.005 is not a multiple of grid"),
    ("spec.target.grid", 0, "spec.target.grid"),
    ("spec.target.ratoi", 0.3, "spec.target.ratoi: unknown field"),
    ("spec.pruning", {"metric": "sparsegpt"}, "spec.pruning.metric"),
    ("spec.pruning", {"headMode": "random"}, "spec.pruning.headMode"),
    ("spec.calibration", {"windows": 0}, "spec.calibration.windows"),
    ("spec.fitness", {"tokens": 1000, "screenTokens": 1000}, "spec.fitness: screenTokens must be below tokens"),
    ("spec.fitness", {"heldOutText": "demo:fitness"}, "spec.fitness: heldOutText must differ from text"),
    ("spec.fitness", {"heldOutText": "demo:calibration"}, "spec: fitness.heldOutText must differ from calibration.text"),
    ("spec.fitness", {"screenKeep": 0}, "spec.fitness.screenKeep"),
    ("spec.search", {"strategy": "annealing"}, "spec.search.strategy"),
    ("spec.search", {"population": 1}, "spec.search.population"),
    ("spec.search", {"crossovers": 0, "mutations": 0}, "spec.search: crossovers + mutations must be at least 1"),
    ("spec.storage", {"uri": "gs://bucket"}, "spec.storage.uri"),
    ("spec.evaluator", {"gpusPerPod": -1}, "spec.evaluator.gpusPerPod"),
    ("spec.evaluator", {"tolerations": [{"operator": "Maybe"}]}, "spec.evaluator.tolerations[0].operator"),
    ("spec.evaluator", {"nodeSelector": {"gpu": 1}}, "spec.evaluator.nodeSelector.gpu"),
    ("spec.suspend", "no", "spec.suspend"),
    ("spec.search", {"baselines": ["uniform", "magic"]}, "spec.search.baselines[1]"),
    ("spec.llm", {"provider": "anthropic"}, "spec.llm.provider"),
    ("spec.llm", {"provider": "openai"}, "spec: llm.model: name the model"),
    ("spec.llm", {"apiKeySecret": {"name": "s"}}, "spec.llm.apiKeySecret.key: required field is missing"),
    ("spec.llm", {"temperature": 3}, "spec.llm.temperature"),
    ("spec.output", {"export": "yes"}, "spec.output.export"),
    ("spec.extra", {}, "spec.extra: unknown field"),
]


@pytest.mark.parametrize("path, value, message", CASES, ids=[f"{c[0]}={c[1]!r}"[:60] for c in CASES])
def test_malformed_spec_is_refused(path, value, message):
    with pytest.raises(spec.SpecErrors) as err:
        spec.parse(mutate(path, value))
    assert any(message in p for p in err.value.problems), err.value.problems


def test_defaults_come_from_the_crd():
    job = spec.parse(GOOD)
    assert job.spec.search.population == 30 and job.spec.search.generations == 20
    assert job.spec.search.crossovers == 10 and job.spec.search.mutations == 10
    assert spec.budget(job) == 430
    assert job.spec.pruning.metric == "wanda-sp" and job.spec.target.grid == 0.01


def test_cli_prints_one_line_per_problem(tmp_path):
    bad = mutate("spec.target.maxRate", 0.2)
    bad["spec"]["search"] = {"strategy": "annealing"}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    done = subprocess.run([sys.executable, "-m", "selfpruner.cli", "validate", str(path)], capture_output=True,
                          text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2
    assert all(line.startswith(f"selfpruner: error: {path}: spec.") for line in lines)


def test_cli_accepts_the_examples():
    root = Path(__file__).resolve().parents[1]
    for example in ("demo.yaml", "paper.yaml", "cluster/prunejob.yaml"):
        done = subprocess.run([sys.executable, "-m", "selfpruner.cli", "validate", str(root / "examples" / example)],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr


def test_not_yaml(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("spec: [unclosed")
    with pytest.raises(spec.UserError, match="not valid YAML"):
        spec.load(path)
