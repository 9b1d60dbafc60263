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


class _Delete:
    def __repr__(self) -> str:  # a stable test id, the same in every pytest process
        return "<deleted>"


DELETE = _Delete()
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
    # what the API server would refuse in the evaluation Jobs' pods, or drop from them
    ("spec.evaluator", {"cpu": "-4"}, "spec.evaluator.cpu: '-4' is negative"),
    ("spec.evaluator", {"memory": -1}, "spec.evaluator.memory: '-1' is negative"),
    ("spec.evaluator", {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "value": "x"}]},
     "spec.evaluator.tolerations[0].value: must be empty with operator Exists"),
    ("spec.evaluator", {"tolerations": [{"key": "nvidia.com/gpu", "effect": "NoSchedule", "tolerationSeconds": 60}]},
     "spec.evaluator.tolerations[0].tolerationSeconds: only with effect NoExecute"),
    ("spec.evaluator", {"tolerations": [{"value": "x"}]}, "tolerations[0]: a toleration without a key must have"),
    ("spec.evaluator", {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": []}}}},
     "affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms: needs at least one"),
    ("spec.evaluator", {"affinity": {"nodeAffinity": {"requiredDuringScheduling": {}}}},
     "spec.evaluator.affinity.nodeAffinity.requiredDuringScheduling: not a field of NodeAffinity"),
    ("spec.evaluator", {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [{"key": "gpu", "operator": "In"}]}]}}}},
     "matchExpressions[0].values: operator In needs at least one value"),
    ("spec.evaluator", {"affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 0, "preference": {"matchExpressions": [{"key": "gpu", "operator": "Gt", "values": ["a"]}]}}]}}},
     "preferredDuringSchedulingIgnoredDuringExecution[0].weight: 0 must be an integer from 1 to 100"),
    ("spec.evaluator", {"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": {"matchExpressions": [{"key": "app", "operator": "Exists", "values": ["x"]}]}}]}}},
     "requiredDuringSchedulingIgnoredDuringExecution[0].topologyKey: '' must be a label key"),
    ("spec.suspend", "no", "spec.suspend"),
    ("spec.search", {"baselines": ["uniform", "magic"]}, "spec.search.baselines[1]"),
    ("spec.llm", {"provider": "anthropic"}, "spec.llm.provider"),
    ("spec.llm", {"provider": "openai"}, "spec: llm.model: name the model"),
    ("spec.llm", {"apiKeySecret": {"name": "s"}}, "spec.llm.apiKeySecret.key: required field is missing"),
    ("spec.llm", {"temperature": 3}, "spec.llm.temperature"),
    # a controller Job with an empty variable name or a key Kubernetes refuses is refused for ever
    ("spec.llm", {"apiKeyEnv": ""}, "spec.llm.apiKeyEnv"),
    ("spec.llm", {"apiKeySecret": {"name": "s", "key": "a/b"}}, "spec.llm.apiKeySecret.key"),
    ("spec.storage", {"uri": "s3://b", "credentialsSecret": {"name": "Not_A_Secret"}}, "spec.storage.credentialsSecret.name"),
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
    for example in ("demo.yaml", "paper.yaml", "kl-screen.yaml", "cluster/prunejob.yaml"):
        done = subprocess.run([sys.executable, "-m", "selfpruner.cli", "validate", str(root / "examples" / example)],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr


def test_not_yaml(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("spec: [unclosed")
    with pytest.raises(spec.UserError, match="not valid YAML"):
        spec.load(path)


HEAD = "apiVersion: selfpruner.io/v1alpha1\nkind: PruneJob\n"
BOMB = HEAD + "metadata: {name: bomb}\nx0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
    f"x{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]\n"
    for i in range(1, 10)) + "spec: {model: {source: demo}, target: {ratio: 0.3}}\n"
GOOD_SPEC = "spec:\n  model: {source: demo}\n  target: {ratio: 0.3}\n"
BAD_INPUT = {
    "alias bomb": (BOMB, "expands to more than"),
    "20000 levels": (HEAD + "metadata: {name: deep}\nspec: " + "[" * 20000 + "]" * 20000 + "\n", "nested"),
    "metadata a list": (HEAD + "metadata: [a, b]\n" + GOOD_SPEC, "metadata: must be a mapping with a name, got list"),
    "metadata null": (HEAD + "metadata:\n" + GOOD_SPEC, "metadata: must be a mapping with a name, got nothing"),
    "grid nan": (HEAD + "metadata: {name: n}\nspec:\n  model: {source: demo}\n  target: {ratio: 0.3, grid: .nan}\n",
                 "spec.target.grid: nan is not a number Kubernetes accepts"),
    "past int64": (HEAD + "metadata: {name: n}\nspec:\n  model: {source: demo}\n  target: {ratio: 0.3}\n"
                   "  search: {seed: 99999999999999999999}\n", "spec.search.seed: 99999999999999999999 is past the 64-bit"),
    "duplicate key": (HEAD + "metadata: {name: n}\n" + GOOD_SPEC + "  target: {ratio: 0.5}\n", "duplicate key 'target'"),
    "inf temperature": (HEAD + "metadata: {name: n}\n" + GOOD_SPEC + "  llm: {temperature: .inf}\n",
                        "spec.llm.temperature: inf is not a number"),
    "nan timeout": (HEAD + "metadata: {name: n}\n" + GOOD_SPEC + "  llm: {timeoutSeconds: .nan}\n",
                    "spec.llm.timeoutSeconds: nan"),
    "population 1e30": (HEAD + "metadata: {name: n}\n" + GOOD_SPEC + "  search: {population: 1e30}\n",
                        "spec.search.population"),
    "population huge": (HEAD + "metadata: {name: n}\n" + GOOD_SPEC + "  search: {population: 100000000}\n",
                        "spec.search.population: 100000000 is greater than the maximum"),
    "output a file": (HEAD + "metadata: {name: n}\n" + GOOD_SPEC + "  output: {path: OUTFILE}\n", "is a file; give a folder"),
    "bucket only": (HEAD + "metadata: {name: n}\nspec:\n  model: {source: 's3://bucket'}\n  target: {ratio: 0.3}\n",
                    "names a bucket, not a model folder"),
    "bad quantity": (HEAD + "metadata: {name: n}\n" + GOOD_SPEC + "  evaluator: {memory: 32 GB}\n",
                     "spec.evaluator.memory: '32 GB' is not a Kubernetes quantity"),
    "bad queue": (HEAD + "metadata: {name: n}\n" + GOOD_SPEC + "  queueName: 'team queue!'\n",
                  "spec.queueName: 'team queue!' is not a label value"),
    "bad node selector": (HEAD + "metadata: {name: n}\n" + GOOD_SPEC + "  evaluator: {nodeSelector: {gpu: 'a b'}}\n",
                          "spec.evaluator.nodeSelector.gpu: 'a b' is not a label value"),
}


def test_bad_input_gets_one_line_each_and_never_hangs(tmp_path):
    """Each case is a real `selfpruner validate` process: no traceback, no hang, one line."""
    (tmp_path / "a-file").write_text("x")
    procs = {}
    for i, (name, (text, _)) in enumerate(BAD_INPUT.items()):
        path = tmp_path / f"case{i}.yaml"
        path.write_text(text.replace("OUTFILE", str(tmp_path / "a-file")))
        procs[name] = subprocess.Popen([sys.executable, "-m", "selfpruner.cli", "validate", str(path)],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        lines = err.strip().splitlines()
        assert proc.returncode == 2 and "Traceback" not in err, (name, err[-2000:])
        # one line per problem (1e30 is both not an integer and above the maximum: two)
        assert 1 <= len(lines) <= 2 and all(line.startswith("selfpruner: error: ") for line in lines), (name, lines)
        assert BAD_INPUT[name][1] in lines[0], (name, lines)


def test_a_yaml_12_exponent_is_a_number(tmp_path):
    """kubectl reads `5e-3` as a number; PyYAML alone reads it as a string (and the schema would
    refuse a valid PruneJob)."""
    from selfpruner.yaml_input import load_all

    (doc,) = load_all("a: 5e-3\nb: 10\nc: '5e-3'\nd: 1.5\n", "x")
    assert doc == {"a": 0.005, "b": 10, "c": "5e-3", "d": 1.5}
    path = tmp_path / "grid.yaml"
    path.write_text(HEAD + "metadata: {name: n}\nspec:\n  model: {source: demo}\n  target: {ratio: 0.3, grid: 5e-3}\n")
    assert spec.load(path).spec.target.grid == 0.005


def test_valid_scheduling_fields_pass_through():
    """What the refusals above must not catch: the affinity and tolerations a GPU cluster uses."""
    ev = {"cpu": "3500m", "memory": "0", "tolerations": [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 60},
        {"operator": "Exists"}],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "nvidia.com/gpu.product", "operator": "In", "values": ["H100"]},
                                          {"key": "nvidia.com/gpu.memory", "operator": "Gt", "values": ["70000"]}]},
                    {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["gpu-node-1"]}]}]},
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {"weight": 50, "preference": {"matchExpressions": [{"key": "zone", "operator": "Exists"}]}}]},
            "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                                    "labelSelector": {"matchLabels": {"app": "x"}}}}]}}}
    doc = copy.deepcopy(GOOD)
    doc["spec"]["evaluator"] = ev
    job = spec.parse(doc)
    assert job.spec.evaluator.affinity["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["weight"] == 50
