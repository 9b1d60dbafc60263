"""Per-block statistics from calibration: OWL's outlier ratio and the activation scale.

They are the LLM's "prior knowledge" in its prompt and the input of the OWL baseline.
The outlier ratio of a block is the share of its o_proj and down_proj weights whose
Wanda score |W_ij|·||x_j|| exceeds M times the block's mean score (OWL, M = 5).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the search loop imports describe() without torch (the cluster's controller)
    from .calibration import CalibrationStats


def block_statistics(model, stats: CalibrationStats, m: float = 5.0, rows: int = 1024) -> dict:
    """Scores are taken where each block's weights live, `rows` rows at a time (a 70B block's
    down_proj in float64 would be 1.9 GB at once); only counts come back to the host."""
    import torch

    outliers, norms = [], []
    with torch.no_grad():
        for i, layer in enumerate(model.get_decoder().layers):
            pairs = [(layer.self_attn.o_proj.weight, stats.attention[i]), (layer.mlp.down_proj.weight, stats.mlp[i])]

            def chunks():
                for weight, s in pairs:
                    norm = s.norm.to(weight.device)[None, :]
                    for part in weight.detach().split(rows):
                        yield part.double().abs() * norm

            total = sum(c.sum() for c in chunks())
            count = sum(w.numel() for w, _ in pairs)
            threshold = m * total / count
            outliers.append(float(sum((c > threshold.to(c.device)).sum() for c in chunks()).item() / count))
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
