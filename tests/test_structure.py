"""Rates -> heads and channels: the achieved ratio stays on target (property-based)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from selfpruner.architecture import Geometry
from selfpruner.errors import UserError
from selfpruner.structure import Rates, plan_from_rates

GEOMETRIES = {
    "smollm2": Geometry("llama", 30, 576, 9, 3, 64, 1536),
    "llama2-7b": Geometry("llama", 32, 4096, 32, 32, 128, 11008),
    "llama3-8b": Geometry("llama", 32, 4096, 32, 8, 128, 14336),
    "tiny": Geometry("llama", 4, 48, 6, 2, 8, 80),
}
GRID = 0.01


def rates_for(n):
    return st.lists(st.integers(0, 80).map(lambda k: k / 100), min_size=n, max_size=n)


@pytest.mark.parametrize("name", ["smollm2", "llama2-7b", "llama3-8b"])
@pytest.mark.parametrize("head_mode", ["per-group", "kv-group"])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_achieved_ratio_within_one_grid_step(name, head_mode, data):
    g = GEOMETRIES[name]
    block = data.draw(rates_for(g.num_layers))
    plan = plan_from_rates(g, Rates(block=tuple(block)), head_mode=head_mode)
    target = sum(block) / len(block)
    assert abs(plan.achieved_ratio - target) <= GRID
    for r, shape, achieved in zip(block, plan.layers, plan.achieved_layer_rates()):
        assert 0 <= shape.channels <= g.intermediate_size
        if r == 0:
            assert achieved == 0  # a rate-0 block stays dense


@pytest.mark.parametrize("name", ["smollm2", "llama3-8b"])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_separate_rates_keep_the_overall_ratio(name, data):
    g = GEOMETRIES[name]
    attn = tuple(data.draw(rates_for(g.num_layers)))
    mlp = tuple(data.draw(rates_for(g.num_layers)))
    plan = plan_from_rates(g, Rates(attention=attn, mlp=mlp))
    a, m = g.dense_attention_params, g.dense_mlp_params
    target = sum(ra * a + rm * m for ra, rm in zip(attn, mlp)) / (g.num_layers * (a + m))
    assert abs(plan.achieved_ratio - target) <= GRID


@pytest.mark.parametrize("name", ["smollm2", "llama3-8b"])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_changing_one_blocks_rates_changes_that_blocks_heads_only(name, data):
    """A search moves a block's rate by a few grid steps; the heads of the blocks it did not
    touch must stay as they were (with attention rounding carried between blocks, one step
    changed the heads of a fifth of the blocks, and the search could not leave its start)."""
    g = GEOMETRIES[name]
    attn = data.draw(rates_for(g.num_layers))
    mlp = data.draw(st.lists(st.integers(1, 80).map(lambda k: k / 100), min_size=g.num_layers,
                             max_size=g.num_layers))
    i = data.draw(st.integers(0, g.num_layers - 1))
    moved = list(attn)
    moved[i] = min(0.8, max(0.0, attn[i] + data.draw(st.sampled_from([-0.05, -0.01, 0.01, 0.05]))))
    heads = [[(s.heads_per_group, s.kv_groups) for s in plan_from_rates(g, Rates(attention=tuple(a), mlp=tuple(mlp))).layers]
             for a in (attn, moved)]
    assert [k for k in range(g.num_layers) if heads[0][k] != heads[1][k]] in ([], [i])


def test_separate_rates_that_agree_plan_like_one_rate_per_block():
    g = GEOMETRIES["smollm2"]
    for block in ((0.3,) * 30, tuple((k % 7) / 10 for k in range(30))):
        assert plan_from_rates(g, Rates(attention=block, mlp=block)).layers == plan_from_rates(g, Rates(block=block)).layers


def test_achieved_ratio_is_exact_arithmetic():
    g = GEOMETRIES["tiny"]
    plan = plan_from_rates(g, Rates(block=(0.0, 0.5, 0.25, 0.7)))
    kept = sum(g.attention_params(s.heads_per_group, s.kv_groups) + g.mlp_params(s.channels) for s in plan.layers)
    assert plan.achieved_ratio == 1 - kept / (4 * g.block_params)


def test_uniform_rates_give_identical_blocks():
    for g in GEOMETRIES.values():
        for r in (0.2, 0.3, 0.5):
            assert plan_from_rates(g, Rates.uniform(r, g.num_layers)).is_uniform


def test_head_modes_remove_the_right_units():
    g = GEOMETRIES["smollm2"]  # 9 query heads in 3 KV groups
    per_group = plan_from_rates(g, Rates(attention=(1 / 3,) * 30, mlp=(0.0,) * 30), head_mode="per-group")
    assert {(s.heads_per_group, s.kv_groups) for s in per_group.layers} == {(2, 3)}
    kv_group = plan_from_rates(g, Rates(attention=(1 / 3,) * 30, mlp=(0.0,) * 30), head_mode="kv-group")
    assert {(s.heads_per_group, s.kv_groups) for s in kv_group.layers} == {(3, 2)}


def test_mlp_multiple_rounds_kept_channels():
    g = GEOMETRIES["llama2-7b"]
    plan = plan_from_rates(g, Rates.uniform(0.3, g.num_layers), mlp_multiple=128)
    assert all(s.channels % 128 == 0 for s in plan.layers)


@pytest.mark.parametrize(
    "data, message",
    [
        ([0.1] * 3, "has 3 rates but the model has 4 blocks"),
        ([0.1, 0.2, 1.0, 0.1], "a rate must be in [0, 1)"),
        ([0.1, -0.2, 0.1, 0.1], "a rate must be in [0, 1)"),
        ([0.1, "x", 0.1, 0.1], "expected a JSON list of numbers"),
        ({"attention": [0.1] * 4}, "exactly the keys 'attention' and 'mlp'"),
        ({"attention": [0.1] * 4, "mlp": [0.1] * 5}, "mlp: has 5 rates"),
        ("0.3", "expected a JSON list of numbers"),
    ],
)
def test_bad_rates_are_refused_with_a_clear_message(data, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        Rates.parse(data, 4)


def test_per_group_on_mha_removes_single_heads():
    """With one query head per KV head, per-group cannot mean 'the same heads from every
    group' (that is all of them); it removes whole heads like kv-group."""
    g = GEOMETRIES["llama2-7b"]
    plan = plan_from_rates(g, Rates(attention=(0.25,) * 32, mlp=(0.0,) * 32), head_mode="per-group")
    assert {(s.heads_per_group, s.kv_groups) for s in plan.layers} == {(1, 24)}
