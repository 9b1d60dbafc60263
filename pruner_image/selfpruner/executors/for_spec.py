"""The in-process executor a PruneJob spec describes: its pruning settings, model and texts.
Shared by a local run and the cluster's GPU workers, which must not need the search loop. The
engine (torch, transformers) is imported only when an executor is made: the cluster's controller
imports the search loop, and this module with it, without ever running a model itself."""

from __future__ import annotations

import os

from ..spec import Section


def engine_settings(spec: Section):
    """The engine's PruneSettings for the spec's pruning and calibration sections."""
    from .. import engine

    p, c = spec.spec.pruning, spec.spec.calibration
    return engine.PruneSettings(metric=p.metric, bias_compensation=p.bias_compensation, refit=p.refit,
                                head_mode=p.head_mode,
                                mlp_multiple=p.mlp_multiple, calibration_text=c.text,
                                calibration_windows=c.windows, calibration_seq_len=c.seq_len)


def workload(spec: Section):
    """What the memory plan sizes the working sets by."""
    from ..memory_plan import Workload

    s = spec.spec
    return Workload(dtype=s.model.dtype, batch_size=s.fitness.batch_size, seq_len=s.fitness.seq_len,
                    calibration_seq_len=s.calibration.seq_len, head_mode=s.pruning.head_mode,
                    refit=s.pruning.refit)


def make_executor(spec: Section, progress: bool = True, model: str | None = None, texts: dict | None = None):
    """The in-process executor; `model` and `texts` override where the model and the
    texts are read from (a worker pod passes the node-cache copy of an s3:// model)."""
    from .. import corpus
    from .local import LocalExecutor

    f = spec.spec.fitness
    if texts is None:
        texts = {"fitness": corpus.load_text(f.text), "heldout": corpus.load_text(f.held_out_text)}
    devices = os.environ.get("SELFPRUNER_DEVICES")
    return LocalExecutor(model or spec.spec.model.source, engine_settings(spec), texts, dtype=spec.spec.model.dtype,
                         seq_len=f.seq_len, batch_size=f.batch_size, devices=devices.split(",") if devices else None,
                         progress=progress, gpus_per_replica=spec.spec.evaluator.gpus_per_replica,
                         metric=f.metric, top_k=f.top_k)
