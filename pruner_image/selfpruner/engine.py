"""The pruning pipeline as one call: load, calibrate, score, sort — ready for candidates.

The CLI, the demo and (later) the search and the workers all start here, so there is
one way to get from a model name to a `PrunableModel`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import calibration, corpus, importance, memory_plan, model_source

if TYPE_CHECKING:  # its modeling code costs seconds to import: the CLI's checks run first
    from .pruned_model import PrunableModel


@dataclass
class PruneSettings:
    metric: str = "wanda-sp"
    bias_compensation: bool | None = None  # None: on for flap, off otherwise (as the papers do)
    head_mode: str = "per-group"
    refit: bool = False  # least-squares refit of o_proj/down_proj on the kept channels (supersedes compensation)
    mlp_multiple: int = 8  # unaligned GEMM widths make pruned models slower than dense on GPUs
    calibration_text: str = "demo:calibration"
    calibration_windows: int = 32
    calibration_seq_len: int = 512
    calibration_batch_size: int = 1

    @property
    def compensate(self) -> bool:
        return self.metric == "flap" if self.bias_compensation is None else self.bias_compensation

    @property
    def needs_calibration(self) -> bool:
        """Whether anything reads the calibration text: every metric but magnitude, compensation, refit."""
        return self.metric != "magnitude" or self.compensate or self.refit

    def describe(self) -> dict:
        return {
            "metric": self.metric,
            "bias_compensation": self.compensate,
            "refit": self.refit,
            "head_mode": self.head_mode,
            "mlp_multiple": self.mlp_multiple,
            "calibration": {"text": self.calibration_text, "windows": self.calibration_windows,
                            "seq_len": self.calibration_seq_len},
        }


@dataclass
class Engine:
    loaded: model_source.Loaded
    pm: PrunableModel
    settings: PruneSettings
    stats: calibration.CalibrationStats | None = field(default=None)


def prepare(model: str, settings: PruneSettings, *, dtype: str = "float32", device: str | None = None,
            progress: bool = True, devices: list[str] | None = None,
            workload: memory_plan.Workload | None = None) -> Engine:
    return build(load(model, dtype=dtype, device=device, devices=devices, workload=workload), settings,
                 progress=progress)


def load(model: str, *, dtype: str = "float32", device: str | None = None, devices: list[str] | None = None,
         workload: memory_plan.Workload | None = None) -> model_source.Loaded:
    """Load and check the architecture, before any expensive work. `devices`: one replica's
    devices; with more than one, the blocks are split over them as `memory_plan` says
    (`workload` sizes the working sets it balances against)."""
    from .architecture import check_supported

    if devices and len(devices) > 1:
        config = model_source.load_config(model)
        check_supported(config)
        work = workload or memory_plan.Workload(dtype=dtype)
        split = memory_plan.plan(config, work, gpus=len(devices), gpus_per_replica=len(devices))
        return model_source.load(model, dtype=dtype, check=check_supported, device_map=split.device_map(devices))
    device = (devices[0] if devices else None) or device or model_source.default_device()
    return model_source.load(model, dtype=dtype, device=device, check=check_supported)


def build(loaded: model_source.Loaded, settings: PruneSettings, *, progress: bool = True) -> Engine:
    """Calibrate (or reuse the cached statistics), score, and sort the model once."""
    from .errors import UserError
    from .pruned_model import PrunableModel

    if settings.metric not in importance.METRICS:
        raise UserError(f"unknown metric {settings.metric!r}; use one of {', '.join(importance.METRICS)}")
    stats = None
    if settings.needs_calibration:
        ids = corpus.tokenize(loaded.tokenizer, corpus.load_text(settings.calibration_text))
        stats = calibration.calibrate(loaded.model, ids, num_windows=settings.calibration_windows,
                                      seq_len=settings.calibration_seq_len,
                                      batch_size=settings.calibration_batch_size, progress=progress,
                                      gram=settings.refit)
    scores = importance.score_model(loaded.model, stats, settings.metric)
    pm = PrunableModel(loaded.model, scores, stats, head_mode=settings.head_mode,
                       bias_compensation=settings.compensate, refit=settings.refit)
    return Engine(loaded=loaded, pm=pm, settings=settings, stats=stats)
