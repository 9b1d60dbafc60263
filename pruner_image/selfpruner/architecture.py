"""Which models we can prune, and how many prunable parameters each piece holds.

Prunable = the q/k/v/o and gate/up/down weights of the decoder blocks (biases are not
counted); embeddings, norms and the LM head are not prunable.
"""

from dataclasses import dataclass

from .errors import UserError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class Geometry:
    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int  # query heads per block
    num_kv_heads: int
    head_dim: int
    intermediate_size: int

    @property
    def group_size(self) -> int:
        """Query heads that share one KV head."""
        return self.num_heads // self.num_kv_heads

    def attention_params(self, heads_per_group: int, kv_groups: int) -> int:
        """Weights of q/k/v/o when `kv_groups` groups each keep `heads_per_group` query heads."""
        if heads_per_group == 0 or kv_groups == 0:
            return 0
        q_heads = heads_per_group * kv_groups
        return self.hidden_size * self.head_dim * (2 * q_heads + 2 * kv_groups)

    def mlp_params(self, channels: int) -> int:
        return 3 * self.hidden_size * channels

    @property
    def dense_attention_params(self) -> int:
        return self.attention_params(self.group_size, self.num_kv_heads)

    @property
    def dense_mlp_params(self) -> int:
        return self.mlp_params(self.intermediate_size)

    @property
    def block_params(self) -> int:
        return self.dense_attention_params + self.dense_mlp_params

    @property
    def prunable_params(self) -> int:
        return self.num_layers * self.block_params


def check_supported(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(
            f"unsupported architecture {model_type!r}; selfpruner prunes "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} models (SmolLM2 is llama)"
        )


def geometry_of(config) -> Geometry:
    check_supported(config)
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if heads % kv:
        raise UserError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
    return Geometry(
        model_type=config.model_type,
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        intermediate_size=config.intermediate_size,
    )
