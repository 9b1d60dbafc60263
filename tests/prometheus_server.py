"""A real Prometheus server for tests: the Debian package's `prometheus` binary, run as a
subprocess on a free port, scraping static targets; queries go through its HTTP API.

Only a real server shows that what our processes serve is scrapeable, and that the dashboard's
PromQL (rate, increase, histogram_quantile over what was scraped) returns data. `make test`
installs the package (the Makefile's `prometheus` target).

    with PrometheusServer(tmp_path, {"operator": 8000, "controller": 8001}) as prom:
        prom.query('up{job="operator"}')
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from ports import PortTaken, address_in_use, free_port, start_listening


def find_prometheus() -> str | None:
    return shutil.which("prometheus") or ("/usr/bin/prometheus" if os.access("/usr/bin/prometheus", os.X_OK) else None)


# Skip where a developer has not installed it; in CI (`make test` installs it) a missing binary fails.
needs_prometheus = pytest.mark.skipif(find_prometheus() is None and not os.environ.get("CI"),
                                      reason="no prometheus binary: `make prometheus` (apt-get install prometheus)")


class PromQLError(Exception):
    pass


class PrometheusServer:
    """`targets`: {job name: port on 127.0.0.1}; every job is scraped at `scrape_interval`.
    `labels` (optional): {job name: {label: value}}, target labels as service discovery would add them
    (a PodMonitor adds the pod's `namespace`); `honor_labels` (optional): the jobs whose own labels win
    over those target labels (a monitor's `honorLabels: true`)."""

    def __init__(self, workdir: Path, targets: dict[str, int], scrape_interval: str = "1s",
                 labels: dict[str, dict[str, str]] | None = None, honor_labels: tuple[str, ...] = ()):
        binary = find_prometheus()
        if binary is None:
            raise RuntimeError("no prometheus binary on PATH or at /usr/bin/prometheus: "
                               "`make prometheus` installs the Debian package")
        self.binary, self.workdir = binary, Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log = self.workdir / "prometheus.log"
        config = {"global": {"scrape_interval": scrape_interval, "scrape_timeout": scrape_interval,
                             "evaluation_interval": scrape_interval},
                  "scrape_configs": [{"job_name": job, "honor_labels": job in honor_labels,
                                      "static_configs": [{"targets": [f"127.0.0.1:{port}"],
                                                          "labels": (labels or {}).get(job, {})}]}
                                     for job, port in targets.items()]}
        self.config = self.workdir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "PrometheusServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 30) -> "PrometheusServer":
        return start_listening(lambda: self._start_once(timeout))

    def _start_once(self, timeout: float) -> "PrometheusServer":
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        start = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, f"--config.file={self.config}", f"--storage.tsdb.path={self.workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                if address_in_use(self.log.read_text(errors="replace")[start:]):
                    raise PortTaken(self.url)
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"prometheus was not ready in {timeout}s:\n{self.logs()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.is_file() else ""

    def _api(self, path: str, **params) -> dict:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:  # a bad expression: 400 with Prometheus' reason
            body = json.loads(e.read() or b"{}")
        if body.get("status") != "success":
            raise PromQLError(f"{params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """An instant query (at `at`, Unix seconds, else now): the result's series (vector) or
        its samples (a range-vector selector gives each series' raw `values`)."""
        params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
        data = self._api("query", **params)
        return data["result"] if data["resultType"] in ("vector", "matrix") else [{"value": data["result"]}]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict]:
        """A range query, as a dashboard's time-series panel makes it: each series' `values`, one
        [t, value] per step from `start` to `end` (Unix seconds)."""
        return self._api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{step:g}")["result"]

    def targets(self) -> list[dict]:
        return self._api("targets")["activeTargets"]
