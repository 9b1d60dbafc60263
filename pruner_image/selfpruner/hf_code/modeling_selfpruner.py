"""Per-layer-sized LLaMA-family models: a pruned checkpoint from selfpruner.

The checkpoint's config is the original model's config plus ``selfpruner_layers``: one
entry per decoder block with the query heads kept per KV group, the KV groups kept,
the MLP channels kept, and whether ``o_proj`` / ``down_proj`` carry a bias (the bias
compensation of the pruned channels). The model is built as the original architecture
and then each block's projections are resized; Hugging Face's own forward code runs
unchanged, because it sizes attention from the weights (``view(..., -1, head_dim)``)
and ``num_key_value_groups``.

Self-contained on purpose: it is copied next to the weights and imported by
transformers with ``trust_remote_code=True``.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM


class EmptyAttention(nn.Module):
    """A block whose attention heads were all pruned: it adds o_proj's bias, if any."""

    def __init__(self, hidden_size: int, head_dim: int, layer_idx: int, bias: bool, dtype=None, device=None):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = head_dim
        with warnings.catch_warnings():  # a zero-width weight has nothing to initialise
            warnings.simplefilter("ignore", UserWarning)
            self.o_proj = nn.Linear(0, hidden_size, bias=bias, dtype=dtype, device=device)

    def forward(self, hidden_states, *args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:  # keep the cache's sequence length right for generation
            b, t = hidden_states.shape[:2]
            empty = hidden_states.new_zeros(b, 0, t, self.head_dim)
            cache.update(empty, empty, self.layer_idx)
        return self.o_proj(hidden_states[..., :0]), None


def _linear(in_features: int, out_features: int, like: nn.Linear, bias: bool | None = None) -> nn.Linear:
    has_bias = like.bias is not None if bias is None else bias
    w = like.weight
    with warnings.catch_warnings():  # a zero-width weight has nothing to initialise
        warnings.simplefilter("ignore", UserWarning)
        return nn.Linear(in_features, out_features, bias=has_bias, dtype=w.dtype, device=w.device)


def resize_block(layer: nn.Module, shape: dict, hidden_size: int) -> None:
    """Give one decoder block the sizes in `shape` (fresh, uninitialised projections)."""
    attn, mlp = layer.self_attn, layer.mlp
    head_dim = attn.head_dim
    heads = shape["heads_per_group"] * shape["kv_groups"]
    if heads == 0:
        layer.self_attn = EmptyAttention(
            hidden_size, head_dim, attn.layer_idx, shape["o_proj_bias"] or attn.o_proj.bias is not None,
            dtype=attn.o_proj.weight.dtype, device=attn.o_proj.weight.device,
        )
    else:
        kv = shape["kv_groups"]
        attn.q_proj = _linear(hidden_size, heads * head_dim, attn.q_proj)
        attn.k_proj = _linear(hidden_size, kv * head_dim, attn.k_proj)
        attn.v_proj = _linear(hidden_size, kv * head_dim, attn.v_proj)
        attn.o_proj = _linear(heads * head_dim, hidden_size, attn.o_proj,
                              bias=shape["o_proj_bias"] or attn.o_proj.bias is not None)
        attn.num_key_value_groups = shape["heads_per_group"]
    channels = shape["channels"]
    mlp.gate_proj = _linear(hidden_size, channels, mlp.gate_proj)
    mlp.up_proj = _linear(hidden_size, channels, mlp.up_proj)
    mlp.down_proj = _linear(channels, hidden_size, mlp.down_proj,
                            bias=shape["down_proj_bias"] or mlp.down_proj.bias is not None)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = channels


def _resize_all(model) -> None:
    shapes = model.config.selfpruner_layers
    decoder = model.model
    for layer, shape in zip(decoder.layers, shapes):
        resize_block(layer, shape, model.config.hidden_size)


class SelfPrunerLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        _resize_all(self)


class SelfPrunerMistralForCausalLM(MistralForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        _resize_all(self)


class SelfPrunerQwen2ForCausalLM(Qwen2ForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        _resize_all(self)


CLASS_FOR_MODEL_TYPE = {
    "llama": "SelfPrunerLlamaForCausalLM",
    "mistral": "SelfPrunerMistralForCausalLM",
    "qwen2": "SelfPrunerQwen2ForCausalLM",
}
