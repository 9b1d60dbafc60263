"""Write the applied candidate as a physically smaller checkpoint.

Uniform blocks that the original architecture can describe are saved as that
architecture (plain ``from_pretrained`` loads them); anything else carries
``selfpruner_layers`` in its config and the bundled modeling code
(``trust_remote_code=True``). The folder is written aside and renamed into place, so
a reader never sees half a checkpoint. The weights are written a block at a time from
wherever they live (one GPU, several, or the CPU), so exporting a model split over GPUs needs
host memory for about two blocks, not for the model.
"""

from __future__ import annotations

import datetime
import json
import re
import shutil
import tempfile
from pathlib import Path

import torch

from . import __version__
from .paths import check_output_folder
from .hf_code.modeling_selfpruner import CLASS_FOR_MODEL_TYPE
from .pruned_model import PrunableModel

HF_CODE = Path(__file__).parent / "hf_code" / "modeling_selfpruner.py"
MIN_SHARD = 256 * 2**20  # small models still come out as one file


def _plain_config(pm: PrunableModel, shapes: list[dict]) -> dict | None:
    """The original architecture's config for these shapes, or None if it cannot say them."""
    cfg = pm.model.config
    s = shapes[0]
    if any(x != s for x in shapes) or s["heads_per_group"] * s["kv_groups"] == 0 or s["channels"] == 0:
        return None
    heads = s["heads_per_group"] * s["kv_groups"]
    if cfg.hidden_size % heads:
        return None  # transformers' config validation refuses such a head count
    d = cfg.to_dict()
    d.update(num_attention_heads=heads, num_key_value_heads=s["kv_groups"],
             head_dim=pm.geometry.head_dim, intermediate_size=s["channels"])
    new_o_bias = s["o_proj_bias"] and pm._dense[0].o.bias is None
    new_down_bias = s["down_proj_bias"] and pm._dense[0].down.bias is None
    if new_o_bias or new_down_bias:
        if cfg.model_type != "llama":
            return None  # only LlamaConfig has switches for these biases
        if new_o_bias:
            d["attention_bias"] = True
        if new_down_bias:
            d["mlp_bias"] = True
    return d


def _groups(pm: PrunableModel, plain: dict | None) -> list[list[str]]:
    """The checkpoint's tensor names in the order they are written: whatever comes before the
    blocks (the embedding), each block, then the rest (final norm, LM head)."""
    model = pm.model
    names = [n for n in model.state_dict() if not (n == "lm_head.weight" and _tied(model))]
    blocks: dict[int, list[str]] = {}
    before, after = [], []
    for n in names:
        m = re.match(r"model\.layers\.(\d+)\.", n)
        if m:
            blocks.setdefault(int(m.group(1)), []).append(n)
        else:
            (before if "embed_tokens" in n else after).append(n)
    return [g for g in [before, *(blocks[i] for i in sorted(blocks)), after] if g]


def _tied(model) -> bool:
    return bool(getattr(model.config, "tie_word_embeddings", False))


def _host_tensors(sd: dict[str, torch.Tensor], plain: dict | None, names: list[str]) -> dict[str, torch.Tensor]:
    """Host copies of `names` (from whichever device holds each), plus the zero biases the plain
    class expects where its switches turn them on."""
    out = {n: sd[n].detach().to("cpu", copy=True).contiguous() for n in names}
    if plain is not None:
        wanted = []
        if plain.get("attention_bias"):
            wanted += ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
        if plain.get("mlp_bias"):
            wanted += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
        for n in names:
            for w in wanted:
                if n.endswith(f".{w}.weight") and n[: -len("weight")] + "bias" not in sd:
                    out[n[: -len("weight")] + "bias"] = torch.zeros(out[n].shape[0], dtype=out[n].dtype)
    return out


def _nbytes(sd: dict[str, torch.Tensor], names: list[str]) -> int:
    return sum(sd[n].numel() * sd[n].element_size() for n in names)


def _save_weights(pm: PrunableModel, plain: dict | None, folder: Path) -> None:
    """Write the weights group by group (a block at a time), so host memory holds one shard and
    its serialised bytes: about two blocks of the largest kind (or MIN_SHARD), never the model.
    Consecutive groups share a shard up to the size of the largest group."""
    from safetensors.torch import save_file

    sd = pm.model.state_dict()  # views of the (sliced) weights where they live: no copy yet
    groups = _groups(pm, plain)
    sizes = [_nbytes(sd, g) for g in groups]
    limit = max(max(sizes), MIN_SHARD)
    shards: list[list[str]] = []
    size = 0
    for g, n in zip(groups, sizes):
        if shards and size + n <= limit:
            shards[-1] += g
            size += n
        else:
            shards.append(list(g))
            size = n
    weight_map, total = {}, 0
    for i, names in enumerate(shards):
        filename = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = _host_tensors(sd, plain, names)
        save_file(tensors, str(folder / filename), metadata={"format": "pt"})
        for n, t in tensors.items():
            weight_map[n] = filename
            total += t.numel() * t.element_size()
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def export(pm: PrunableModel, tokenizer, out_dir: str | Path, *, info: dict, force: bool = False) -> Path:
    """Save the applied (sliced) candidate. `info` goes into pruning.json (rates, metric, ...)."""
    if pm.plan is None:
        raise ValueError("apply a plan (mode='slice') before exporting")
    out = check_output_folder(out_dir, force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    shapes = pm.block_shapes()
    plain = _plain_config(pm, shapes)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if plain is not None:
            config = plain
        else:
            config = pm.model.config.to_dict()
            cls = CLASS_FOR_MODEL_TYPE[pm.geometry.model_type]
            config["selfpruner_layers"] = shapes
            config["architectures"] = [cls]
            config["auto_map"] = {"AutoModelForCausalLM": f"modeling_selfpruner.{cls}"}
            shutil.copy(HF_CODE, staging / "modeling_selfpruner.py")
        for key in ("quantization_config", "_name_or_path"):
            config.pop(key, None)
        config["dtype"] = str(next(pm.model.parameters()).dtype).removeprefix("torch.")
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        _save_weights(pm, plain, staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        gen = getattr(pm.model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(staging)
        plan = pm.plan
        g = pm.geometry
        pruning = {
            "achieved_ratio": plan.achieved_ratio,
            "achieved_layer_rates": plan.achieved_layer_rates(),
            "params": {"prunable_dense": g.prunable_params, "prunable_kept": plan.kept_params,
                       "total_kept": sum(t.numel() for t in pm.model.parameters())},
            "head_mode": pm.head_mode,
            "bias_compensation": pm.bias_compensation,
            "refit": pm.refit,
            "layers": shapes,
            "loads_with": "plain" if plain is not None else "trust_remote_code",
            "provenance": {"selfpruner": __version__, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
            **info,
        }
        (staging / "pruning.json").write_text(json.dumps(pruning, indent=2) + "\n")
        staging.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
