"""vLLM model classes for selfpruner's non-uniform checkpoints, built from vLLM's Llama classes.

Each decoder block is vLLM's own `LlamaDecoderLayer` given that block's sizes from the config's
``selfpruner_layers``: query heads (``heads_per_group * kv_groups``), KV heads and MLP width.
vLLM sizes the KV cache from each layer's attention, so blocks may differ (as in vLLM's
nemotron_nas models); a block without heads has no attention layer and no KV cache. The
reference is the transformers side, `selfpruner.hf_code.modeling_selfpruner`:

- o_proj / down_proj may carry a bias the original architecture lacks (bias compensation);
- a block whose heads (channels) were all pruned adds o_proj's (down_proj's) bias, if any;
- Qwen2 keeps its q/k/v biases. It goes through the Llama classes too: vLLM's own Qwen2
  attention takes head_dim as hidden_size / num_heads, which pruned heads break.

Only vLLM imports this module (through `selfpruner.serve.register`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralAttention, MistralForCausalLM, MistralMLP
from vllm.model_executor.models.utils import extract_layer_index

# checkpoint projections that vLLM stacks into one parameter
_STACKED = {".q_proj.": ".qkv_proj.", ".k_proj.": ".qkv_proj.", ".v_proj.": ".qkv_proj.",
            ".gate_proj.": ".gate_up_proj.", ".up_proj.": ".gate_up_proj."}


def _arch_biases(config) -> tuple[bool, bool, bool, bool]:
    """The original architecture's biases: (q/k/v, o_proj, gate/up, down_proj)."""
    if config.model_type == "qwen2":
        return True, False, False, False
    if config.model_type == "llama":
        attn, mlp = bool(getattr(config, "attention_bias", False)), bool(getattr(config, "mlp_bias", False))
        return attn, attn, mlp, mlp
    return False, False, False, False  # mistral


class OutputBias(nn.Module):
    """What is left of an attention or MLP whose every head or channel was pruned: the bias of
    its output projection (`proj`), or nothing at all."""

    def __init__(self, proj: str, hidden_size: int, bias: bool):
        super().__init__()
        holder = nn.Module()  # so the checkpoint's name (…self_attn.o_proj.bias) finds it
        holder.bias = nn.Parameter(torch.empty(hidden_size), requires_grad=False) if bias else None
        setattr(self, proj, holder)
        self._bias = holder

    def forward(self, x: torch.Tensor | None = None, *, positions=None, hidden_states=None) -> torch.Tensor:
        x = hidden_states if x is None else x
        out = torch.zeros_like(x)  # a fresh tensor: the residual add that follows writes in place
        return out if self._bias.bias is None else out + self._bias.bias


class SelfPrunerDecoderLayer(LlamaDecoderLayer):
    attention_cls = LlamaAttention

    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config=None, **_):
        nn.Module.__init__(self)
        config = config or vllm_config.model_config.hf_config
        shape = config.selfpruner_layers[extract_layer_index(prefix)]
        quant_config = self.get_quant_config(vllm_config)
        self.hidden_size = hidden = config.hidden_size
        qkv_bias, o_bias, gate_up_bias, down_bias = _arch_biases(config)
        o_bias, down_bias = o_bias or shape["o_proj_bias"], down_bias or shape["down_proj_bias"]
        heads, kv, channels = shape["heads_per_group"] * shape["kv_groups"], shape["kv_groups"], shape["channels"]
        if heads:
            self.self_attn = self.attention_cls(
                config=config, hidden_size=hidden, num_heads=heads, num_kv_heads=kv,
                max_position_embeddings=getattr(config, "max_position_embeddings", 8192),
                quant_config=quant_config, bias=qkv_bias, bias_o_proj=o_bias,
                cache_config=vllm_config.cache_config, prefix=f"{prefix}.self_attn",
            )
        else:
            self.self_attn = OutputBias("o_proj", hidden, o_bias)
        if channels:
            self.mlp = MistralMLP(hidden, channels, config.hidden_act, quant_config, bias=down_bias,
                                  gate_up_proj_bias=gate_up_bias, prefix=f"{prefix}.mlp")
        else:
            self.mlp = OutputBias("down_proj", hidden, down_bias)
        self.input_layernorm = RMSNorm(hidden, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps=config.rms_norm_eps)

    def forward(self, positions, hidden_states, residual, **_):  # Mistral's model also passes t_cond
        return super().forward(positions, hidden_states, residual)


class _MistralDecoderLayer(SelfPrunerDecoderLayer):
    attention_cls = MistralAttention


class _PerLayerSizes:
    """The model-level part: the layer type, and loading our checkpoint's names."""

    layer_cls: type[nn.Module] = SelfPrunerDecoderLayer

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        config = vllm_config.model_config.hf_config
        if getattr(config, "selfpruner_layers", None) is None:
            raise ValueError(f"{type(self).__name__} needs a config with selfpruner_layers (a selfpruner export)")
        if len(config.selfpruner_layers) != config.num_hidden_layers:
            raise ValueError(f"selfpruner_layers has {len(config.selfpruner_layers)} entries for "
                             f"{config.num_hidden_layers} layers")
        if not getattr(config, "head_dim", None):  # the unpruned head size; pruning keeps it
            config.head_dim = config.hidden_size // config.num_attention_heads
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=self.layer_cls)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        biases: set[str] = set()

        def nonempty():
            for name, w in weights:
                if w.numel() == 0:
                    continue  # a projection pruned to nothing (a block without heads or channels)
                if name.endswith(".bias"):
                    biases.add(_param_name(name))
                yield name, w

        loaded = super().load_weights(nonempty())
        # vLLM's loader skips a checkpoint bias the model has no parameter for (GPTQ checkpoints
        # carry such); here it would be a lost bias compensation
        if missing := biases - loaded:
            raise ValueError(f"biases in the checkpoint that the model has no place for: {sorted(missing)}")
        return loaded


def _param_name(name: str) -> str:
    """The model's parameter that loads checkpoint tensor `name`."""
    for old, new in _STACKED.items():
        if old in name:
            return name.replace(old, new)
    return name


class SelfPrunerLlamaForCausalLM(_PerLayerSizes, LlamaForCausalLM):
    pass


class SelfPrunerQwen2ForCausalLM(_PerLayerSizes, LlamaForCausalLM):
    pass


class SelfPrunerMistralForCausalLM(_PerLayerSizes, MistralForCausalLM):
    layer_cls = _MistralDecoderLayer
