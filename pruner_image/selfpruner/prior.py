"""Per-block statistics from calibration: OWL's outlier ratio and the activation scale.

They are the LLM's "prior knowledge" in its prompt and the input of the OWL baseline.
The outlier ratio of a block is the share of its o_proj and down_proj weights whose
Wanda score |W_ij|·||x_j|| exceeds M times the block's mean score (OWL, M = 5).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the search loop imports describe() without torch (the cluster's controller)
    from .calibration import CalibrationStats


def block_statistics(model, stats: CalibrationStats, m: float = 5.0) -> dict:
    import torch

    outliers, norms = [], []
    with torch.no_grad():
        for i, layer in enumerate(model.get_decoder().layers):
            scores = []
            for weight, s in ((layer.self_attn.o_proj.weight, stats.attention[i]),
                              (layer.mlp.down_proj.weight, stats.mlp[i])):
                scores.append((weight.detach().double().abs().cpu() * s.norm[None, :]).reshape(-1))
            a = torch.cat(scores)
            outliers.append(float((a > m * a.mean()).double().mean()))
            mlp = stats.mlp[i]
            norms.append(float((mlp.total_sq / mlp.count).mean().sqrt()))
    top = max(norms) or 1.0
    return {"outlier_ratio": outliers, "activation_rms": norms, "relative_activation": [n / top for n in norms]}


def describe(stats: dict) -> str:
    """One line per block, for a prompt."""
    return "\n".join(
        f"block {i}: outlier ratio {o * 100:.2f}%, relative activation size {r:.2f}"
        for i, (o, r) in enumerate(zip(stats["outlier_ratio"], stats["relative_activation"]))
    )
