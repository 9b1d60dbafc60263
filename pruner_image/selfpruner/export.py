"""Write the applied candidate as a physically smaller checkpoint.

Uniform blocks that the original architecture can describe are saved as that
architecture (plain ``from_pretrained`` loads them); anything else carries
``selfpruner_layers`` in its config and the bundled modeling code
(``trust_remote_code=True``). The folder is written aside and renamed into place, so
a reader never sees half a checkpoint.
"""

from __future__ import annotations

import datetime
import json
import shutil
import tempfile
from pathlib import Path

import torch

from . import __version__
from .errors import UserError
from .hf_code.modeling_selfpruner import CLASS_FOR_MODEL_TYPE
from .pruned_model import PrunableModel

HF_CODE = Path(__file__).parent / "hf_code" / "modeling_selfpruner.py"
MAX_SHARD = "5GB"


def check_output_dir(out_dir: str | Path, force: bool = False) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"output folder {out} is not empty; choose another or pass --force to replace it")
    return out


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


def _state_dict(pm: PrunableModel, plain: dict | None) -> dict[str, torch.Tensor]:
    model = pm.model
    sd = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    if plain is not None:  # the plain class expects every bias its switches turn on
        prefix = "model.layers"
        for i, layer in enumerate(pm.layers):
            names = []
            if plain.get("attention_bias"):
                names += ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
            if plain.get("mlp_bias"):
                names += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
            for name in names:
                key = f"{prefix}.{i}.{name}.bias"
                if key not in sd:
                    w = sd[f"{prefix}.{i}.{name}.weight"]
                    sd[key] = torch.zeros(w.shape[0], dtype=w.dtype)
    return sd


def _save_weights(sd: dict[str, torch.Tensor], folder: Path) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(sd, filename_pattern="model{suffix}.safetensors", max_shard_size=MAX_SHARD)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: sd[n] for n in names}, str(folder / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def export(pm: PrunableModel, tokenizer, out_dir: str | Path, *, info: dict, force: bool = False) -> Path:
    """Save the applied (sliced) candidate. `info` goes into pruning.json (rates, metric, ...)."""
    if pm.plan is None:
        raise ValueError("apply a plan (mode='slice') before exporting")
    out = check_output_dir(out_dir, force)
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
        _save_weights(_state_dict(pm, plain), staging)
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
