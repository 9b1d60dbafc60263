"""Self-Pruner: the LLM writes the initial population, picks the parents, and writes the
generation's crossovers and mutations: all of them with `llm.allocation: fixed` (the paper), or
the share its measured success earns beside the classical operators and tournament selection
with `adaptive` (allocation.py; the initial population then also holds the uniform and OWL
allocations and, for half of the LLM's proposals, random draws as `genetic` starts from).

With `llm.operators: edits` a crossover is written as a choice of parent per block
(`{"take":"ABBA..."}`) and a mutation as moves of pruning between blocks
(`{"moves":[[from,to,percent],...]}`, the mean kept exactly), in the manner of diff-based
LLM evolution; the paper's whole candidates (`whole`) stay the default.

Prompts are templates in `prompts/`, showing the population sorted by fitness and, with
`llm.evidence`, the calibration statistics, what the history says of each position and how the LLM's
own last offspring did (evidence.py); candidates travel as integer percents (`encoding.py`)
and every request carries its reply's JSON schema, so a constrained local model or a
structured-outputs endpoint can only write valid candidates. A generation costs two LLM
rounds: the selection (one call), then all crossover and mutation prompts as one batch.
What still goes wrong with an endpoint that ignores the schema is handled and counted,
never fatal: a reply with the right shape but values off bounds or grid is projected
(`repaired`); a missing or unusable item is replaced by the classical operator on the same
parents (`classical`); a candidate already evaluated (a parent included) is refused before it
costs an evaluation and asked for once more, saying so, and replaced by the classical operator if
it is still not new (`llm_duplicates`, `llm_new_when_asked_again`, `llm_duplicates_kept`);
an invalid parent index is replaced by a tournament pick (`llm_selection_repaired`).
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from string import Template

import numpy as np

from . import evidence as evidence_mod
from . import operators
from .allocation import CROSSOVER, LLM_CROSSOVER, LLM_MUTATION, LLM_SELECTION, MUTATION, TOURNAMENT, Allocation, split
from .encoding import Codec, moves_schema, projection_distance, selection_schema, take_schema
from .evolution import ClassicalProposer, Evolution, Offspring
from .replies import first_object, parse_candidates, parse_selection
from .strategy import Request

PROMPTS = resources.files("selfpruner.search") / "prompts"


@lru_cache(maxsize=None)
def template(name: str) -> Template:
    """A prompt template, read once (a generation fills one per offspring)."""
    return Template((PROMPTS / f"{name}.txt").read_text())


class LLMProposer(ClassicalProposer):
    def __init__(self, llm, description: dict, per_call: int = 1, select: bool = True, edits: bool = False,
                 evidence: tuple[str, ...] = ()):
        self.llm = llm  # a Transcript
        self.description = description
        self.label = description.get("fitness_label", "perplexity")  # next to each candidate's fitness
        self.digits = description.get("fitness_format", ".3f")
        self.per_call = per_call
        self.select = select
        self.edits = edits  # crossovers as a choice of parent per block, mutations as moves
        self.evidence = tuple(evidence)  # what the prompts show besides the population (evidence.py)

    # -- prompts ---------------------------------------------------------------------
    def _messages(self, name: str, strategy: Evolution, **extra) -> list[dict]:
        space = strategy.ctx.space
        codec = Codec(space)
        values = dict(self.description)
        n = space.num_blocks
        shape = f'{{"attention":[{n} rates],"mlp":[{n} rates]}}' if space.separate else f"[{space.dim} rates]"
        values.update(dim=space.dim, last=space.dim - 1, ratio=codec.target_text, units=codec.unit_text, shape=shape,
                      **evidence_mod.texts(self.evidence, strategy, self.label, self.digits), **extra)
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
            origin = "repaired"  # projected onto a candidate already seen (repeats were asked again): mutated by fresh()
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
        values), schema and read (reply text -> [(rates or None, clean)]). A candidate equal to one
        already evaluated (a parent included) is refused before it costs an evaluation, and its
        prompt asked once more, saying so (`_ask_again`); one still not new is replaced."""
        from .llm_clients import Prompt

        prompts = [Prompt(self._messages(j["template"], strategy, count=len(j["fallbacks"]), **j["extra"]),
                          j["schema"], j["kind"]) for j in jobs]
        replies, seconds = self.llm.chat_many(prompts)
        strategy.note_llm_seconds(seconds)
        all_items = []
        for j, reply in zip(jobs, replies):
            n = len(j["fallbacks"])
            if reply is None:
                strategy.count("llm_failed_calls")
                items = []
            else:
                items = j["read"](reply.text)
                if not items:
                    strategy.count("llm_unparseable_replies")
            all_items.append((items + [(None, False)] * n)[:n])
        all_items = self._ask_again(strategy, jobs, prompts, replies, all_items)
        flat = [(j["kind"], rates, clean, fb) for j, items in zip(jobs, all_items)
                for (rates, clean), fb in zip(items, j["fallbacks"])]
        out: list = [None] * len(flat)
        # the LLM's own candidates first, the fallbacks after: a classical fallback that happens to
        # equal one of them is the one mutated until new
        for second in (False, True):
            for i, (kind, rates, clean, fb) in enumerate(flat):
                if (rates is None) == second:
                    out[i] = self._accept(strategy, rates, clean, fb, kind)
        return out

    def _ask_again(self, strategy: Evolution, jobs, prompts, replies, all_items):
        """Novelty: the items that repeat a candidate already evaluated (or one earlier in this
        batch) are asked for once more, in one batch, with that fact in the prompt; an item still
        not new becomes unusable (its classical fallback takes its place)."""
        from .llm_clients import Prompt

        space = strategy.ctx.space
        batch_keys: set = set()
        repeats: dict[int, list[int]] = {}
        for jn, items in enumerate(all_items):
            for i, (rates, clean) in enumerate(items):
                if rates is None:
                    continue
                key = space.key(space.project(rates))
                if key in strategy.seen or key in batch_keys:
                    repeats.setdefault(jn, []).append(i)
                    strategy.count("llm_duplicates")
                batch_keys.add(key)
        if not repeats:
            return all_items
        again = []
        for jn, idx in repeats.items():
            which = ", ".join(str(i + 1) for i in idx)
            note = (f"Candidate {which} of your reply repeats a candidate already evaluated (a parent or an earlier "
                    f"one): each must be new. Reply again in the same form, with a different candidate in its place.")
            messages = prompts[jn].messages + [{"role": "assistant", "content": replies[jn].text},
                                               {"role": "user", "content": note}]
            again.append(Prompt(messages, prompts[jn].schema, f"{jobs[jn]['kind']}-again"))
        strategy.count("llm_asked_again", sum(len(v) for v in repeats.values()))
        answers, seconds = self.llm.chat_many(again)
        strategy.note_llm_seconds(seconds)
        out = [list(items) for items in all_items]
        for (jn, idx), reply in zip(repeats.items(), answers):
            fresh = jobs[jn]["read"](reply.text) if reply is not None else []
            for i in idx:
                rates, clean = fresh[i] if i < len(fresh) else (None, False)
                key = space.key(space.project(rates)) if rates is not None else None
                if key is None or key in strategy.seen or key in batch_keys:
                    out[jn][i] = (None, False)
                    strategy.count("llm_duplicates_kept")
                else:
                    out[jn][i] = (rates, clean)
                    batch_keys.add(key)
                    strategy.count("llm_new_when_asked_again")
        return out

    # -- selection -------------------------------------------------------------------
    @staticmethod
    def _tournament(strategy: Evolution, avoid: int | None = None) -> int:
        pop, rng = strategy.population, strategy.ctx.rng
        fitness = [m.fitness for m in pop]
        for _ in range(20):
            i = operators.tournament(fitness, rng)
            if i != avoid or len(pop) == 1:
                return i
        return next(i for i in range(len(pop)) if i != avoid)

    def _select(self, strategy: Evolution, n_pairs: int, n_singles: int) -> tuple[list[tuple], list]:
        """Crossover pairs and mutation parents chosen by the LLM in one call (the paper); an
        invalid index is replaced by a tournament pick."""
        from .llm_clients import Prompt

        pop = strategy.population
        if n_pairs + n_singles == 0:
            return [], []
        messages = self._messages("selection", strategy, population=self._population_text(strategy),
                                  size=len(pop), pairs=n_pairs, singles=n_singles)
        schema = selection_schema(n_pairs, n_singles, len(pop))
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
            return v - 1 if ok else self._tournament(strategy, avoid)

        raw_pairs = data.get("crossover") if isinstance(data.get("crossover"), list) else []
        raw_singles = data.get("mutation") if isinstance(data.get("mutation"), list) else []
        pairs = []
        for k in range(n_pairs):
            p = raw_pairs[k] if k < len(raw_pairs) and isinstance(raw_pairs[k], list) else [None, None]
            p = (list(p) + [None, None])[:2]
            a = index(p[0])
            b = index(p[1], avoid=a)  # a repeated index would cross a parent with itself
            pairs.append((pop[a], pop[b]))
        singles = [pop[index(raw_singles[k] if k < len(raw_singles) else None)] for k in range(n_singles)]
        return pairs, singles

    def _parents(self, strategy: Evolution, n_pairs: int, n_singles: int):
        """Parents of the LLM's offspring, each with the selection arm that chose them: the LLM's
        selection and tournament share them (allocation.py); without `llm.selection` all are
        tournament's (the ablation)."""
        alloc = strategy.allocation
        if self.select:
            sx, sm = alloc.shares("selection", n_pairs), alloc.shares("selection", n_singles)
        else:
            sx, sm = {LLM_SELECTION: 0, TOURNAMENT: n_pairs}, {LLM_SELECTION: 0, TOURNAMENT: n_singles}
            strategy.count("tournament_selections", n_pairs + n_singles)
        llm_pairs, llm_singles = self._select(strategy, sx[LLM_SELECTION], sm[LLM_SELECTION])
        pop = strategy.population
        pairs = [(a, b, LLM_SELECTION) for a, b in llm_pairs]
        for _ in range(sx[TOURNAMENT]):
            a = self._tournament(strategy)
            pairs.append((pop[a], pop[self._tournament(strategy, avoid=a)], TOURNAMENT))
        singles = [(p, LLM_SELECTION) for p in llm_singles] + \
            [(pop[self._tournament(strategy)], TOURNAMENT) for _ in range(sm[TOURNAMENT])]
        strategy.shares.update({LLM_SELECTION: sx[LLM_SELECTION] + sm[LLM_SELECTION],
                                TOURNAMENT: sx[TOURNAMENT] + sm[TOURNAMENT]})
        return pairs, singles

    # -- the proposer interface ------------------------------------------------------
    def initial(self, strategy: Evolution, n: int) -> list[Offspring]:
        """The LLM's proposals; with adaptive allocation, half of them beside as many random draws
        (what `genetic` starts from) and the heuristic seeds (uniform, OWL from the calibration
        statistics). Measured on the H200 (docs/benchmarks.md §16), the LLMs here write initial
        candidates that are worse and more alike than random ones (best of the initial population
        95-107 against 90 perplexity), and a search that starts from them ends behind `genetic`."""
        ctx = strategy.ctx
        seeds = self._seeds(strategy, n) if strategy.allocation.adaptive else []
        asked, drawn = split(n - len(seeds), [1.0, 1.0], floor=0) if seeds else (n, 0)
        jobs = []
        for start in range(0, asked, self.per_call):
            k = min(self.per_call, asked - start)
            schema, read = self._whole(strategy, k)
            jobs.append({"template": "initial", "kind": "initial", "fallbacks": [lambda: ctx.space.random(ctx.rng)] * k,
                         "extra": {}, "schema": schema, "read": read})
        asked_for = [Offspring(u, o) for u, o in self._ask_all(strategy, jobs)]
        return seeds + asked_for + super().initial(strategy, drawn)

    @staticmethod
    def _seeds(strategy: Evolution, n: int) -> list[Offspring]:
        from .baselines import Owl, Uniform

        if n < 4:
            return []
        makers = [Uniform] + ([Owl] if (strategy.ctx.prior or {}).get("outlier_ratio") is not None else [])
        return [Offspring(strategy.fresh(cls(strategy.ctx).allocation()), cls.name) for cls in makers]

    def offspring(self, strategy: Evolution) -> list[Offspring]:
        """A generation's crossovers and mutations, shared between the LLM's operators and the
        classical ones by their measured success (allocation.py; all the LLM's with `fixed`)."""
        alloc = strategy.allocation
        xs, ms = alloc.shares("crossover", strategy.crossovers), alloc.shares("mutation", strategy.mutations)
        strategy.shares = {**xs, **ms}
        pairs, singles = self._parents(strategy, xs[LLM_CROSSOVER], ms[LLM_MUTATION])
        return self._llm_offspring(strategy, pairs, singles) + self.classical(strategy, xs[CROSSOVER], ms[MUTATION])

    def _llm_offspring(self, strategy: Evolution, pairs: list[tuple], singles: list[tuple]) -> list[Offspring]:
        ctx = strategy.ctx
        codec = Codec(ctx.space)
        population = self._population_text(strategy, top=5)
        jobs, parents_of, arms = [], [], []
        per_call = 1 if self.edits else self.per_call  # an edit is about one parent (pair)
        for start in range(0, len(pairs), per_call):
            chunk = pairs[start:start + per_call]
            text = "\n".join(f"{i + 1}. A = {codec.fmt(a.units)} ({self.label} {a.fitness:{self.digits}}); "
                             f"B = {codec.fmt(b.units)} ({self.label} {b.fitness:{self.digits}})"
                             for i, (a, b, _) in enumerate(chunk))
            fallbacks = [lambda a=a, b=b: operators.crossover(ctx.space, np.array(a.units), np.array(b.units), ctx.rng)
                         for a, b, _ in chunk]
            job = {"template": "crossover", "kind": "crossover", "fallbacks": fallbacks,
                   "extra": {"population": population, "parents": text}}
            if self.edits:
                a, b, _ = chunk[0]
                job.update(template="crossover_edit", schema=take_schema(ctx.space), read=self._read_take(ctx, a, b))
            else:
                job["schema"], job["read"] = self._whole(strategy, len(chunk))
            jobs.append(job)
            parents_of += [min(a.fitness, b.fitness) for a, b, _ in chunk]
            arms += [(LLM_CROSSOVER, sel) for _, _, sel in chunk]
        for start in range(0, len(singles), per_call):
            chunk = singles[start:start + per_call]
            text = "\n".join(f"{i + 1}. {codec.fmt(p.units)} ({self.label} {p.fitness:{self.digits}})"
                             for i, (p, _) in enumerate(chunk))
            fallbacks = [lambda p=p: operators.mutate(ctx.space, np.array(p.units), ctx.rng) for p, _ in chunk]
            job = {"template": "mutation", "kind": "mutation", "fallbacks": fallbacks,
                   "extra": {"population": population, "parents": text}}
            if self.edits:
                job.update(template="mutation_edit", schema=moves_schema(codec), read=self._read_moves(ctx, chunk[0][0]))
            else:
                job["schema"], job["read"] = self._whole(strategy, len(chunk))
            jobs.append(job)
            parents_of += [p.fitness for p, _ in chunk]
            arms += [(LLM_MUTATION, sel) for _, sel in chunk]
        out = []
        for (units, origin), parent, arm in zip(self._ask_all(strategy, jobs), parents_of, arms):
            if origin == "classical":  # the LLM wrote nothing usable here: its arms failed, whatever the fallback does
                strategy.allocation.credit(arm, False)
                arm = ()
            out.append(Offspring(units, origin, parent, arm))
        return out

    # -- edits (`llm.operators: edits`) ------------------------------------------------
    @staticmethod
    def _read_take(ctx, a, b):
        def read(text: str) -> list:
            data = first_object(text)
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
            data = first_object(text)
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

    def __init__(self, ctx, proposer=None, adaptive: bool = True, **kw):
        super().__init__(ctx, proposer=proposer, **kw)
        self.allocation = Allocation(adaptive=adaptive)
        self.record = evidence_mod.Record(self.proposer.evidence)  # what the prompts' evidence is made of

    def _settle(self, req: Request, entered: bool, fitness: float | None) -> None:
        super()._settle(req, entered, fitness)
        self.record.note(req, entered, fitness, self.generation)

    def extra_state(self) -> dict:
        state = super().extra_state()
        state["llm_calls"] = self.proposer.llm.calls
        state.update(self.record.state())
        return state

    def load_extra_state(self, extra: dict) -> None:
        super().load_extra_state(extra)
        self.proposer.llm.rewind(extra.get("llm_calls", 0))
        self.record.load(extra)
