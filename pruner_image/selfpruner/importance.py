"""Importance of every attention head and MLP channel, from one calibration pass.

Each score looks at the weights that *consume* a channel (the columns of ``o_proj`` for
head outputs, of ``down_proj`` for MLP channels) and, for the data-aware metrics, at the
channel's calibration activations x_j:

- ``magnitude``: sum_i |W_ij|
- ``wanda-sp``:  sum_i |W_ij| * ||x_j||_2                     (Wanda-sp, An et al. 2024)
- ``flap``:      Var(x_j) * sum_i W_ij^2                        (FLAP's fluctuation metric)

A head's score is the sum over its ``head_dim`` channels; a KV group's the sum over its
query heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .calibration import CalibrationStats, ChannelStats
from .errors import UserError

METRICS = ("wanda-sp", "flap", "magnitude")


@dataclass
class LayerScores:
    heads: torch.Tensor  # [num_heads] float64
    channels: torch.Tensor  # [intermediate_size] float64


def column_scores(weight: torch.Tensor, stats: ChannelStats | None, metric: str) -> torch.Tensor:
    """Score of each input column j of `weight` ([out, in]). Column sums run where the
    weight lives, in float32 (a 7B model's weights never travel to the CPU); the
    products with the float64 statistics are taken in float64."""
    w = weight.detach()
    if metric not in METRICS:
        raise UserError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    if metric == "flap":
        col = w.float().square().sum(0).double().cpu()
    else:
        col = w.float().abs().sum(0).double().cpu()
    if metric == "magnitude":
        return col
    if stats is None:
        raise UserError(f"metric {metric!r} needs calibration statistics")
    return col * stats.norm if metric == "wanda-sp" else stats.variance * col


def score_model(model, stats: CalibrationStats | None, metric: str) -> list[LayerScores]:
    if metric not in METRICS:
        raise UserError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    out = []
    for i, layer in enumerate(model.get_decoder().layers):
        attn = layer.self_attn
        head_dim = attn.head_dim
        cols = column_scores(attn.o_proj.weight, stats.attention[i] if stats else None, metric)
        heads = cols.view(-1, head_dim).sum(1)
        channels = column_scores(layer.mlp.down_proj.weight, stats.mlp[i] if stats else None, metric)
        out.append(LayerScores(heads=heads, channels=channels))
    return out
