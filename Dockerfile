# syntax=docker/dockerfile:1
# Two images from one wheel:  docker build --target operator|pruner -t IMAGE .
# Both run as USER 10001 (numeric, so the kubelet can check runAsNonRoot; cluster/manifests.py RUN_AS_USER).
# The pod specs fix no uid unless the chart's podSecurityContext does: OpenShift's restricted-v2 SCC runs them
# as a uid of the namespace's range (gid 0) instead, which works since they write only to their /tmp emptyDir.

# --- builder: the one pure-Python wheel both images install ---
FROM python:3.11.14-slim-bookworm AS builder
WORKDIR /src
# Only what the wheel is made of; crds/ because pruner_image/selfpruner/crds/prunejob.yaml links to it.
COPY pyproject.toml README.md ./
COPY crds/ crds/
COPY pruner_image/ pruner_image/
COPY operator/ operator/
RUN pip install --no-cache-dir pip==25.3 \
 && pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# --- operator: kopf and the thin handler layer; no torch, no engine extra ---
FROM python:3.11.14-slim-bookworm AS operator
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# The wheel comes in through a bind mount, so it never lands in a layer.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir pip==25.3 \
 && pip install --no-cache-dir "$(echo /wheels/selfpruner-*.whl)[operator]" \
 && groupadd --gid 10001 selfpruner \
 && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin selfpruner
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["kopf", "run", "--standalone", "-m", "selfpruner_operator.handlers"]
# Default args, replaced by the Deployment's `args` (e.g. `--namespace NS` to watch one namespace).
CMD ["--all-namespaces", "--liveness", "http://0.0.0.0:8080/healthz"]

# --- pruner: controller, workers and finalize; CUDA PyTorch from the base image ---
FROM pytorch/pytorch:2.10.0-cuda12.8-cudnn9-runtime AS pruner
# Pods run with a read-only root filesystem and an emptyDir on /tmp: every cache goes there
# (HF hub, matplotlib and triton follow HOME).
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp SELFPRUNER_CACHE=/tmp/selfpruner-cache SELFPRUNER_TASK_DATA=/opt/selfpruner/tasks
# torch stays the base image's CUDA build: a constraint pins it to the installed version, so pip
# keeps it (it already satisfies torch>=2.4), and fails rather than swaps in a PyPI wheel if some
# dependency ever wants another torch. --no-deps would instead leave the other deps to a hand-kept list.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir pip==25.3 \
 && python -c 'import importlib.metadata as m; print("torch==" + m.version("torch"))' > /tmp/torch.txt \
 && pip install --no-cache-dir -c /tmp/torch.txt "$(echo /wheels/selfpruner-*.whl)[engine,cluster,eval]" \
 && rm /tmp/torch.txt \
 && python -c 'from selfpruner import zero_shot; zero_shot.data_dir()' \
 && groupadd --gid 10001 selfpruner \
 && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin selfpruner
USER 10001:10001
WORKDIR /tmp
ENTRYPOINT ["selfpruner"]
CMD ["--help"]
