"""From a validated spec to the search's parts: the space, the context, the strategy."""

from __future__ import annotations

import numpy as np

from .. import prior as prior_mod
from ..errors import UserError
from ..spec import schema
from .baselines import EvoPress, Owl, RandomSearch, Uniform
from .evolution import Evolution
from .llm_evolution import LLMEvolution, LLMProposer
from .space import SearchSpace
from .strategy import Context, Stage

STRATEGIES = tuple(schema()["properties"]["spec"]["properties"]["search"]["properties"]["strategy"]["enum"])


def make_space(spec, geometry) -> SearchSpace:
    t = spec.spec.target
    space = SearchSpace(num_blocks=geometry.num_layers, ratio=t.ratio, min_rate=t.min_rate, max_rate=t.max_rate,
                        grid=t.grid, separate=t.separate_rates,
                        attention_weight=geometry.dense_attention_params, mlp_weight=geometry.dense_mlp_params)
    units = space.ratio / space.grid * space.dim
    if not (space.lo * space.dim <= units <= space.hi * space.dim):
        raise UserError("spec.target: no candidate can meet ratio within [minRate, maxRate] on this grid")
    return space


def stages(spec) -> list[Stage]:
    """`fitness.stages`, or `screenTokens`/`screenKeep` as the one stage they describe."""
    f = spec.spec.fitness
    if f.get("stages"):
        return [Stage(tokens=st["tokens"], survivors=st["survivors"]) for st in f.stages]
    if f.screen_tokens:
        return [Stage(tokens=f.screen_tokens, keep=f.screen_keep)]
    return []


def make_context(spec, space: SearchSpace, prior: dict, budget: float) -> Context:
    s = spec.spec.search
    return Context(space=space, full_tokens=spec.spec.fitness.tokens, stages=stages(spec), budget=budget,
                   open_ended=bool(s.get("budget")), seed=s.seed, rng=np.random.default_rng(s.seed), prior=prior)


# what the fitness is called in the LLM's prompts, at length and next to a number
FITNESS_NAMES = {"perplexity": "perplexity", "kl": "KL divergence from the unpruned model"}
FITNESS_LABELS = {"perplexity": "perplexity", "kl": "KL"}
FITNESS_FORMATS = {"perplexity": ".3f", "kl": ".5f"}  # KL values are a few hundredths


def model_description(spec, geometry, prior: dict) -> dict:
    g = geometry
    separate = spec.spec.target.separate_rates
    return {
        "model_description": (f"a {g.model_type} decoder-only language model ({spec.spec.model.source}) with "
                              f"{g.num_layers} transformer blocks, hidden size {g.hidden_size}, {g.num_heads} "
                              f"query heads in {g.num_kv_heads} KV groups, MLP width {g.intermediate_size}"),
        "rate_layout": (f" as an object: \"attention\" lists {g.num_layers} rates for the attention of blocks 0.."
                        f"{g.num_layers - 1} and \"mlp\" {g.num_layers} for their MLPs" if separate
                        else f", one per block 0..{g.num_layers - 1}"),
        "mean_kind": "parameter-weighted mean" if separate else "mean",
        "block_stats": prior_mod.describe(prior) if prior else "(no calibration statistics)",
        "fitness_name": FITNESS_NAMES[spec.spec.fitness.metric],
        "fitness_label": FITNESS_LABELS[spec.spec.fitness.metric],
        "fitness_format": FITNESS_FORMATS[spec.spec.fitness.metric],
    }


def make_strategy(name: str, spec, ctx: Context, geometry=None, llm=None):
    s = spec.spec.search
    kw = dict(population=s.population, generations=s.generations, crossovers=s.crossovers, mutations=s.mutations)
    if name == "llm-evolution":
        if llm is None:
            raise ValueError("llm-evolution needs an LLM")
        proposer = LLMProposer(llm, model_description(spec, geometry, ctx.prior),
                               per_call=spec.spec.llm.offspring_per_call, select=spec.spec.llm.selection,
                               edits=spec.spec.llm.operators == "edits", evidence=spec.spec.llm.evidence)
        return LLMEvolution(ctx, proposer=proposer, adaptive=spec.spec.llm.allocation == "adaptive", **kw)
    cls = {"genetic": Evolution, "random": RandomSearch, "uniform": Uniform, "owl": Owl, "evopress": EvoPress}
    if name not in cls:
        raise UserError(f"unknown strategy {name!r}; use one of {', '.join(STRATEGIES)}")
    return cls[name](ctx, **kw)
