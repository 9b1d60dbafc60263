"""Projection onto the constraint (property-based): anything lands feasible; feasible stays."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from selfpruner.search.space import SearchSpace

SPACES = {
    "smollm2": SearchSpace(30, 0.3, 0.0, 0.6),
    "tight": SearchSpace(8, 0.5, 0.45, 0.55),
    "grid-0.05": SearchSpace(12, 0.25, 0.0, 0.8, grid=0.05),
    "separate": SearchSpace(30, 0.3, 0.0, 0.8, separate=True, attention_weight=884736, mlp_weight=2654208),
}
ANY = st.floats(allow_nan=True, allow_infinity=True, width=32)


def assert_feasible(space, units):
    units = np.asarray(units)
    assert units.dtype.kind == "i" and units.shape == (space.dim,)
    assert units.min() >= space.lo and units.max() <= space.hi
    # the (weighted) mean is β within one grid step spread over the blocks
    assert abs(space.mean(units) - space.ratio) <= space.grid * space.weights.max() / space.weights.sum() + 1e-12


@pytest.mark.parametrize("name", SPACES)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_proposal_lands_feasible(name, data):
    space = SPACES[name]
    proposal = data.draw(st.lists(ANY, min_size=space.dim, max_size=space.dim))
    units = space.project(proposal)
    assert_feasible(space, units)
    assert np.array_equal(space.project(proposal), units)  # deterministic


@pytest.mark.parametrize("name", SPACES)
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_feasible_points_stay(name, seed):
    space = SPACES[name]
    units = space.random(np.random.default_rng(seed))
    assert_feasible(space, units)
    assert np.array_equal(space.project(space.rates(units)), units)
    assert space.is_feasible(units)


def test_projection_is_the_nearest_point_for_a_simple_case():
    space = SearchSpace(4, 0.3, 0.0, 0.8)
    # shifting every rate down by 0.1 is the Euclidean projection of this proposal
    assert space.rates(space.project([0.5, 0.4, 0.3, 0.4])).round(2).tolist() == [0.4, 0.3, 0.2, 0.3]
    # a rate above the bound is clipped and the rest absorb the difference equally
    # (ties for the last grid step go to the lowest index)
    assert space.rates(space.project([0.9, 0.1, 0.1, 0.1])).round(2).tolist() == [0.8, 0.14, 0.13, 0.13]


def test_duplicates_are_recognised():
    space = SPACES["smollm2"]
    a = space.project(np.linspace(0, 0.6, 30))
    b = space.project(np.linspace(0, 0.6, 30) + 1e-7)
    assert space.key(a) == space.key(b)


def test_wrong_length_is_an_error():
    with pytest.raises(ValueError):
        SPACES["tight"].project([0.5] * 7)
