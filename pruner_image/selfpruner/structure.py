"""Turn per-block pruning rates into whole heads and channels.

A rate is the fraction of a block's prunable weights to remove. Heads come in coarse
units, so rounding is unavoidable. A block's attention is rounded from its own rate
alone and the block's MLP channels absorb the difference, so the block removes what its
rates say and a search that changes one block's rates changes that block's heads only
(with separate attention and MLP rates too: carrying attention rounding from block to
block made any small change move heads in blocks nobody touched). What the channels
cannot absorb (multiples, a dense MLP) is carried into the next block that is being
pruned (error diffusion), keeping the *overall* ratio on target; the achieved ratio is
reported exactly. A block whose rates are 0 stays dense, and equal rates give equal
blocks (no carry), so a uniform plan exports as the plain architecture.

Two ways to remove attention (GQA-aware):
- ``per-group``: every KV group loses the same number of query heads (a block keeps
  ``heads_per_group`` query heads in each of its KV groups; at 0 the whole attention,
  k and v included, goes);
- ``kv-group``: whole KV groups go, each with its query heads.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Sequence

from .architecture import Geometry
from .errors import UserError

HEAD_MODES = ("per-group", "kv-group")


@dataclass(frozen=True)
class LayerShape:
    """What one pruned block keeps."""

    heads_per_group: int
    kv_groups: int
    channels: int

    @property
    def num_heads(self) -> int:
        return self.heads_per_group * self.kv_groups


@dataclass(frozen=True)
class PrunePlan:
    geometry: Geometry
    layers: tuple[LayerShape, ...]
    head_mode: str

    def layer_params(self, i: int) -> tuple[int, int]:
        s = self.layers[i]
        g = self.geometry
        return g.attention_params(s.heads_per_group, s.kv_groups), g.mlp_params(s.channels)

    @property
    def kept_params(self) -> int:
        return sum(sum(self.layer_params(i)) for i in range(len(self.layers)))

    @property
    def achieved_ratio(self) -> float:
        """Exact fraction of prunable weights removed."""
        return 1.0 - self.kept_params / self.geometry.prunable_params

    def achieved_layer_rates(self) -> list[float]:
        b = self.geometry.block_params
        return [1.0 - sum(self.layer_params(i)) / b for i in range(len(self.layers))]

    @property
    def is_dense(self) -> bool:
        g = self.geometry
        return all(
            s.heads_per_group == g.group_size and s.kv_groups == g.num_kv_heads and s.channels == g.intermediate_size
            for s in self.layers
        )

    @property
    def is_uniform(self) -> bool:
        return len(set(self.layers)) == 1

    def to_dict(self) -> dict:
        return {"head_mode": self.head_mode, "layers": [asdict(s) for s in self.layers]}


@dataclass(frozen=True)
class Rates:
    """Per-block rates: one list (shared by attention and MLP), or two."""

    block: tuple[float, ...] | None = None
    attention: tuple[float, ...] | None = None
    mlp: tuple[float, ...] | None = None

    @property
    def separate(self) -> bool:
        return self.block is None

    def __len__(self) -> int:
        return len(self.block if self.block is not None else self.attention)

    def to_json(self):
        if self.block is not None:
            return list(self.block)
        return {"attention": list(self.attention), "mlp": list(self.mlp)}

    @staticmethod
    def uniform(ratio: float, num_layers: int) -> "Rates":
        return Rates(block=(float(ratio),) * num_layers)

    @staticmethod
    def parse(data, num_layers: int, source: str = "rates") -> "Rates":
        """Accept a list (one rate per block) or {"attention": [...], "mlp": [...]}."""
        if isinstance(data, dict):
            if set(data) != {"attention", "mlp"}:
                raise UserError(f"{source}: an object of rates needs exactly the keys 'attention' and 'mlp'")
            return Rates(
                attention=_check_list(data["attention"], num_layers, f"{source}.attention"),
                mlp=_check_list(data["mlp"], num_layers, f"{source}.mlp"),
            )
        return Rates(block=_check_list(data, num_layers, source))

    @staticmethod
    def load(path: str, num_layers: int) -> "Rates":
        return Rates.parse(read_json(path), num_layers, source=path)


def read_json(path: str):
    """A rates file's content; a missing or malformed file is the user's to fix."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"rates file {path} does not exist") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"rates file {path} is not readable JSON: {e}") from None


def _check_list(values, num_layers: int, source: str) -> tuple[float, ...]:
    if not isinstance(values, list) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
    ):
        raise UserError(f"{source}: expected a JSON list of numbers, one rate per block")
    if len(values) != num_layers:
        raise UserError(f"{source}: has {len(values)} rates but the model has {num_layers} blocks")
    for i, v in enumerate(values):
        if not 0.0 <= v < 1.0:
            raise UserError(f"{source}[{i}] = {v}: a rate must be in [0, 1)")
    return tuple(float(v) for v in values)


def effective_head_mode(g: Geometry, head_mode: str) -> str:
    """With one query head per KV head (MHA) a "group" is a single head: removing the same
    number of heads from every group would remove all of them, so per-group means
    removing whole heads, as kv-group does."""
    return "kv-group" if g.group_size == 1 else head_mode


def _attention_units(g: Geometry, head_mode: str) -> int:
    return g.group_size if head_mode == "per-group" else g.num_kv_heads


def _attention_shape(g: Geometry, head_mode: str, removed_units: int) -> tuple[int, int]:
    """(heads_per_group, kv_groups) after removing `removed_units` attention units."""
    if head_mode == "per-group":
        hpg = g.group_size - removed_units
        return (hpg, g.num_kv_heads) if hpg else (0, 0)
    kv = g.num_kv_heads - removed_units
    return (g.group_size, kv) if kv else (0, 0)


def _round_channels(target_removed: float, g: Geometry, multiple: int) -> int:
    """Channels kept, a multiple of `multiple` (or all of them), nearest to the target."""
    kept = g.intermediate_size - target_removed / g.mlp_params(1)
    kept = min(max(kept, 0.0), g.intermediate_size)
    kept = int(round(kept / multiple)) * multiple
    return min(max(kept, 0), g.intermediate_size)


def _best_units(g: Geometry, head_mode: str, target_removed: float) -> int:
    units = _attention_units(g, head_mode)
    dense = g.dense_attention_params
    return min(
        range(units + 1),
        key=lambda u: (abs(dense - g.attention_params(*_attention_shape(g, head_mode, u)) - target_removed), u),
    )


def _uniform(rates: Rates) -> bool:
    if rates.separate:
        return len(set(rates.attention)) == 1 and len(set(rates.mlp)) == 1
    return len(set(rates.block)) == 1


MLP_TOLERANCE = 0.05  # of the prunable parameters: what an MLP multiple may add to the rounding of heads


def check_mlp_multiple(g: Geometry, rates: Rates, *, head_mode: str, multiple: int, name: str) -> None:
    """Refuse an MLP multiple so coarse that the rates' ratio is out of reach: wider than the MLP
    (every pruned MLP would go whole), or rounding the widths so far that the achieved ratio misses
    by more than `MLP_TOLERANCE` what multiples of 1 achieve. The line names a power of two that
    reaches it. Cheap (a plan is arithmetic on the config), so callers run it before loading."""
    width = g.intermediate_size
    if multiple > width:
        raise UserError(f"{name} {multiple} is wider than the model's MLP ({width} channels): every pruned MLP "
                        f"would go whole; give at most {width} (the default, 8, keeps GPU kernels aligned)")
    ratio = lambda m: plan_from_rates(g, rates, head_mode=head_mode, mlp_multiple=m).achieved_ratio  # noqa: E731
    fine, got = ratio(1), ratio(multiple)
    if abs(got - fine) <= MLP_TOLERANCE:
        return
    powers = [2 ** i for i in range(multiple.bit_length() - 1, -1, -1) if 2 ** i < multiple]
    fits = next(m for m in powers + [1] if abs(ratio(m) - fine) <= MLP_TOLERANCE)
    raise UserError(f"{name} {multiple}: MLP widths in multiples of {multiple} (of {width} channels) reach a "
                    f"pruning ratio of {got:.2f} where the rates ask {fine:.2f}; give {fits} or another multiple "
                    "that reaches it")


def plan_from_rates(
    g: Geometry, rates: Rates, *, head_mode: str = "per-group", mlp_multiple: int = 8
) -> PrunePlan:
    if head_mode not in HEAD_MODES:
        raise UserError(f"head mode {head_mode!r} is unknown; use one of {', '.join(HEAD_MODES)}")
    if mlp_multiple < 1:
        raise UserError(f"mlp multiple must be >= 1, got {mlp_multiple}")
    head_mode = effective_head_mode(g, head_mode)
    if len(rates) != g.num_layers:
        raise UserError(f"{len(rates)} rates given but the model has {g.num_layers} blocks")
    layers: list[LayerShape] = []
    carry = 0.0  # params still owed (+) or removed in excess (-)
    diffuse = not _uniform(rates)
    for i in range(g.num_layers):
        ra, rm = (rates.attention[i], rates.mlp[i]) if rates.separate else (rates.block[i],) * 2
        # attention takes its rate as closely as its units allow, from that rate alone, so a
        # change of one block's rates changes that block's heads only; where the block's MLP
        # is kept dense it cannot absorb the rounding, and the attention takes the carry
        attn_target = ra * g.dense_attention_params + (carry if rm == 0 else 0.0)
        units = _best_units(g, head_mode, attn_target) if ra > 0 else 0
        hpg, kv = _attention_shape(g, head_mode, units)
        attn_removed = g.dense_attention_params - g.attention_params(hpg, kv)
        if rm == 0:
            channels = g.intermediate_size
            if ra > 0 and diffuse:
                carry = attn_target - attn_removed
        else:
            # the fine-grained MLP channels absorb the attention's rounding, so the block
            # removes what its two rates say together
            mlp_target = rm * g.dense_mlp_params + (ra * g.dense_attention_params - attn_removed) + carry
            channels = _round_channels(mlp_target, g, mlp_multiple)
            if diffuse:
                carry = mlp_target - (g.dense_mlp_params - g.mlp_params(channels))
        layers.append(LayerShape(hpg, kv, channels))
    return PrunePlan(geometry=g, layers=tuple(layers), head_mode=head_mode)
