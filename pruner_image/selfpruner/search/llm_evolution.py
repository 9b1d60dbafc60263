"""Self-Pruner: the LLM writes the initial population, picks the parents, and writes every
generation's crossovers and mutations.

With `llm.operators: edits` a crossover is written as a choice of parent per block
(`{"take":"ABBA..."}`) and a mutation as moves of pruning between blocks
(`{"moves":[[from,to,percent],...]}`, the mean kept exactly), in the manner of diff-based
LLM evolution; the paper's whole candidates (`whole`) stay the default.

Prompts are templates in `prompts/`; candidates travel as integer percents (`encoding.py`)
and every request carries its reply's JSON schema, so a constrained local model or a
structured-outputs endpoint can only write valid candidates. A generation costs two LLM
rounds: the selection (one call), then all crossover and mutation prompts as one batch.
What still goes wrong with an endpoint that ignores the schema is handled and counted,
never fatal: a reply with the right shape but values off bounds or grid is projected
(`repaired`); a missing or unusable item is replaced by the classical operator on the same
parents (`classical`); a candidate already seen is mutated until new (`repaired`);
an invalid parent index is replaced by a tournament pick (`llm_selection_repaired`).
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from importlib import resources
from string import Template

import numpy as np

from . import operators
from .encoding import Codec, moves_schema, projection_distance, selection_schema, take_schema
from .evolution import ClassicalProposer, Evolution, Offspring

PROMPTS = resources.files("selfpruner.search") / "prompts"


@lru_cache(maxsize=None)
def template(name: str) -> Template:
    """A prompt template, read once (a generation fills one per offspring)."""
    return Template((PROMPTS / f"{name}.txt").read_text())


NUMBER_LIST = re.compile(r"\[\s*-?\d+(?:\.\d*)?(?:\s*,\s*-?\d+(?:\.\d*)?)*\s*\]")


def parse_candidates(text: str) -> list | None:
    """The list of candidates in a reply, or None if there is nothing usable.

    Proper JSON first; failing that (an endpoint that ignored the schema), every complete
    list of numbers in the text is salvaged."""
    found = _parse_json(text)
    if found is not None:
        return found
    salvaged = [json.loads(m) for m in NUMBER_LIST.findall(text)]
    return salvaged or None


def _parse_json(text: str) -> list | None:
    text = text.strip()
    text = re.sub(r"^```(?:json)?|```$", "", text, flags=re.MULTILINE).strip()
    for opener, closer in (("{", "}"), ("[", "]")):
        start, end = text.find(opener), text.rfind(closer)
        if start == -1 or end <= start:
            continue
        try:
            data = json.loads(text[start:end + 1])
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict) and not {"attention", "mlp"} <= data.keys():
            data = data.get("candidates", data.get("children", data.get("mutants")))
        elif isinstance(data, dict):
            return [data]  # a single bare candidate with separate rates
        if isinstance(data, list) and data and all(isinstance(c, (list, dict)) for c in data):
            return data
        if isinstance(data, list) and data and all(isinstance(v, (int, float)) for v in data):
            return [data]  # a single bare candidate
    return None


def parse_selection(text: str) -> dict | None:
    data = _first_object(text)
    return data if isinstance(data, dict) else None


def _first_object(text: str):
    start, end = text.find("{"), text.rfind("}")
    if start == -1 or end <= start:
        return None
    try:
        return json.loads(text[start:end + 1])
    except json.JSONDecodeError:
        return None


class LLMProposer(ClassicalProposer):
    def __init__(self, llm, description: dict, per_call: int = 1, select: bool = True, edits: bool = False):
        self.llm = llm  # a Transcript
        self.description = description
        self.label = description.get("fitness_label", "perplexity")  # next to each candidate's fitness
        self.digits = description.get("fitness_format", ".3f")
        self.per_call = per_call
        self.select = select
        self.edits = edits  # crossovers as a choice of parent per block, mutations as moves

    # -- prompts ---------------------------------------------------------------------
    def _messages(self, name: str, strategy: Evolution, **extra) -> list[dict]:
        space = strategy.ctx.space
        codec = Codec(space)
        values = dict(self.description)
        n = space.num_blocks
        shape = f'{{"attention":[{n} rates],"mlp":[{n} rates]}}' if space.separate else f"[{space.dim} rates]"
        values.update(dim=space.dim, last=space.dim - 1, ratio=codec.target_text, units=codec.unit_text, shape=shape,
                      **extra)
        return [{"role": "system", "content": template("system").template.strip()},
                {"role": "user", "content": template(name).substitute(values).strip()}]

    def _population_text(self, strategy: Evolution, top: int | None = None) -> str:
        codec = Codec(strategy.ctx.space)
        pop = strategy.population if top is None else strategy.population[:top]
        return "\n".join(f"{i + 1}. {self.label} {m.fitness:{self.digits}}: {codec.fmt(m.units)}" for i, m in enumerate(pop))

    # -- turning replies into candidates ---------------------------------------------
    def _accept(self, strategy: Evolution, proposal, clean: bool, fallback, kind: str) -> tuple[np.ndarray, str]:
        """`proposal`: the rates a reply item asks for (None: unusable); `clean`: it was valid as
        written (shape, bounds, grid). Projection then fixes the mean."""
        space = strategy.ctx.space
        strategy.count("llm_offspring_asked")
        if proposal is None:
            strategy.count("llm_replaced")
            return strategy.fresh(fallback()), "classical"
        units = space.project(proposal)
        strategy.note_projection(projection_distance(space, proposal, units))
        origin = f"llm-{kind}"
        if clean:
            strategy.count("llm_as_written")
        else:
            strategy.count("llm_repaired")
            origin = "repaired"
        if space.key(units) in strategy.seen:
            origin = "repaired"  # mutated until new by fresh()
            if clean:
                strategy.count("llm_duplicates")
        elif clean:
            strategy.count("llm_used")
        return strategy.fresh(units), origin

    def _whole(self, strategy: Evolution, n: int):
        """Job parts for prompts whose reply is `n` whole candidates."""
        codec = Codec(strategy.ctx.space)

        def read(text: str) -> list:
            items = parse_candidates(text) or []
            return [codec.decode(raw) for raw in items] if items else []

        return codec.reply_schema(n), read

    def _ask_all(self, strategy: Evolution, jobs: list[dict]) -> list[tuple[np.ndarray, str]]:
        """One batch for all `jobs`, each a dict of: template, kind, fallbacks (one per offspring
        the prompt asks for; a missing or bad item i becomes fallbacks[i]()), extra (template
        values), schema and read (reply text -> [(rates or None, clean)])."""
        from .llm_clients import Prompt

        prompts = [Prompt(self._messages(j["template"], strategy, count=len(j["fallbacks"]), **j["extra"]),
                          j["schema"], j["kind"]) for j in jobs]
        replies, seconds = self.llm.chat_many(prompts)
        strategy.note_llm_seconds(seconds)
        out = []
        for j, reply in zip(jobs, replies):
            n = len(j["fallbacks"])
            if reply is None:
                strategy.count("llm_failed_calls")
                items = []
            else:
                items = j["read"](reply.text)
                if not items:
                    strategy.count("llm_unparseable_replies")
            items = (items + [(None, False)] * n)[:n]
            out += [self._accept(strategy, rates, clean, fb, j["kind"]) for (rates, clean), fb in zip(items, j["fallbacks"])]
        return out

    # -- selection -------------------------------------------------------------------
    def _select(self, strategy: Evolution) -> tuple[list[tuple], list]:
        """Crossover pairs and mutation parents: chosen by the LLM (the paper) or by
        tournament (`llm.selection: false`, the ablation)."""
        ctx, pop = strategy.ctx, strategy.population
        fitness = [m.fitness for m in pop]

        def pick(avoid: int | None = None) -> int:
            for _ in range(20):
                i = operators.tournament(fitness, ctx.rng)
                if i != avoid or len(pop) == 1:
                    return i
            return next(i for i in range(len(pop)) if i != avoid)

        if not self.select:
            strategy.count("tournament_selections", strategy.crossovers + strategy.mutations)
            return ([(pop[pick()], pop[pick()]) for _ in range(strategy.crossovers)],
                    [pop[pick()] for _ in range(strategy.mutations)])
        from .llm_clients import Prompt

        messages = self._messages("selection", strategy, population=self._population_text(strategy),
                                  size=len(pop), pairs=strategy.crossovers, singles=strategy.mutations)
        schema = selection_schema(strategy.crossovers, strategy.mutations, len(pop))
        replies, seconds = self.llm.chat_many([Prompt(messages, schema, "selection")])
        strategy.note_llm_seconds(seconds)
        data = parse_selection(replies[0].text) if replies[0] is not None else None
        if replies[0] is None:
            strategy.count("llm_failed_calls")
        elif data is None:
            strategy.count("llm_unparseable_replies")
        data = data or {}

        def index(v, avoid=None) -> int:
            ok = isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= len(pop) and v - 1 != avoid
            strategy.count("llm_selections" if ok else "llm_selection_repaired")
            return v - 1 if ok else pick(avoid)

        raw_pairs = data.get("crossover") if isinstance(data.get("crossover"), list) else []
        raw_singles = data.get("mutation") if isinstance(data.get("mutation"), list) else []
        pairs = []
        for k in range(strategy.crossovers):
            p = raw_pairs[k] if k < len(raw_pairs) and isinstance(raw_pairs[k], list) else [None, None]
            p = (list(p) + [None, None])[:2]
            a = index(p[0])
            b = index(p[1], avoid=a)  # a repeated index would cross a parent with itself
            pairs.append((pop[a], pop[b]))
        singles = [pop[index(raw_singles[k] if k < len(raw_singles) else None)] for k in range(strategy.mutations)]
        return pairs, singles

    # -- the proposer interface ------------------------------------------------------
    def initial(self, strategy: Evolution, n: int) -> list[Offspring]:
        ctx = strategy.ctx
        jobs = []
        for start in range(0, n, self.per_call):
            k = min(self.per_call, n - start)
            schema, read = self._whole(strategy, k)
            jobs.append({"template": "initial", "kind": "initial", "fallbacks": [lambda: ctx.space.random(ctx.rng)] * k,
                         "extra": {}, "schema": schema, "read": read})
        return [Offspring(u, o) for u, o in self._ask_all(strategy, jobs)]

    def offspring(self, strategy: Evolution) -> list[Offspring]:
        ctx = strategy.ctx
        codec = Codec(ctx.space)
        pairs, singles = self._select(strategy)
        population = self._population_text(strategy, top=5)
        jobs, parents_of = [], []
        per_call = 1 if self.edits else self.per_call  # an edit is about one parent (pair)
        for start in range(0, len(pairs), per_call):
            chunk = pairs[start:start + per_call]
            text = "\n".join(f"{i + 1}. A = {codec.fmt(a.units)} ({self.label} {a.fitness:{self.digits}}); "
                             f"B = {codec.fmt(b.units)} ({self.label} {b.fitness:{self.digits}})"
                             for i, (a, b) in enumerate(chunk))
            fallbacks = [lambda a=a, b=b: operators.crossover(ctx.space, np.array(a.units), np.array(b.units), ctx.rng)
                         for a, b in chunk]
            job = {"template": "crossover", "kind": "crossover", "fallbacks": fallbacks,
                   "extra": {"population": population, "parents": text}}
            if self.edits:
                job.update(template="crossover_edit", schema=take_schema(ctx.space), read=self._read_take(ctx, *chunk[0]))
            else:
                job["schema"], job["read"] = self._whole(strategy, len(chunk))
            jobs.append(job)
            parents_of += [min(a.fitness, b.fitness) for a, b in chunk]
        for start in range(0, len(singles), per_call):
            chunk = singles[start:start + per_call]
            text = "\n".join(f"{i + 1}. {codec.fmt(p.units)} ({self.label} {p.fitness:{self.digits}})" for i, p in enumerate(chunk))
            fallbacks = [lambda p=p: operators.mutate(ctx.space, np.array(p.units), ctx.rng) for p in chunk]
            job = {"template": "mutation", "kind": "mutation", "fallbacks": fallbacks,
                   "extra": {"population": population, "parents": text}}
            if self.edits:
                job.update(template="mutation_edit", schema=moves_schema(codec),
                           read=self._read_moves(ctx, chunk[0]))
            else:
                job["schema"], job["read"] = self._whole(strategy, len(chunk))
            jobs.append(job)
            parents_of += [p.fitness for p in chunk]
        return [Offspring(u, o, parent) for (u, o), parent in zip(self._ask_all(strategy, jobs), parents_of)]

    # -- edits (`llm.operators: edits`) ------------------------------------------------
    @staticmethod
    def _read_take(ctx, a, b):
        def read(text: str) -> list:
            data = _first_object(text)
            pattern = data.get("take") if isinstance(data, dict) else None
            if not isinstance(pattern, str) or not pattern or set(pattern) - {"A", "B"}:
                return []
            clean = len(pattern) == ctx.space.dim
            child = operators.take(ctx.space, np.array(a.units), np.array(b.units), pattern)
            return [(ctx.space.rates(child), clean)]
        return read

    @staticmethod
    def _read_moves(ctx, parent):
        step = Codec(ctx.space).step or 1

        def read(text: str) -> list:
            data = _first_object(text)
            moves = data.get("moves") if isinstance(data, dict) else None
            ok = isinstance(moves, list) and moves and all(
                isinstance(m, list) and len(m) == 3 and all(isinstance(x, int) and not isinstance(x, bool) for x in m)
                and 0 <= m[0] < ctx.space.dim and 0 <= m[1] < ctx.space.dim and m[2] > 0 for m in moves)
            if not ok:
                return []
            child = operators.apply_moves(ctx.space, np.array(parent.units), [(i, j, p // step) for i, j, p in moves])
            if child is None:  # every move was clipped away: nothing new was written
                return [(None, False)]
            return [(ctx.space.rates(child), all(p % step == 0 for _, _, p in moves))]
        return read


class LLMEvolution(Evolution):
    name = "llm-evolution"

    def extra_state(self) -> dict:
        state = super().extra_state()
        state["llm_calls"] = self.proposer.llm.calls
        return state

    def load_extra_state(self, extra: dict) -> None:
        super().load_extra_state(extra)
        self.proposer.llm.rewind(extra.get("llm_calls", 0))
