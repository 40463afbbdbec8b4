"""A substep that asks archetypes a question every few steps and broadcasts the answer to agents.

Example: weekly isolation compliance ("will this person stay home if they have symptoms
this week?") with age band x sex x borough x employment archetypes::

    from dataclasses import dataclass
    import torch
    from torch import Tensor
    from lpm import Model, Params, Positive, tensor_field
    from substeps.epidemic import EpiState
    from llm_archetypes import (Archetypes, ArchetypeDecision, Asker, AnswerCache, Link,
                                RuleBackend, TransformersBackend)
    from llm_archetypes.examples import isolation_question, isolation_rule

    @dataclass(frozen=True)
    class NYCState(EpiState):
        age_band: Tensor = tensor_field(("N",), torch.int8, "age band code", optional=True)
        sex: Tensor = tensor_field(("N",), torch.int8, "sex code", optional=True)
        borough: Tensor = tensor_field(("N",), torch.int8, "borough code", optional=True)
        employment: Tensor = tensor_field(("N",), torch.int8, "employment code", optional=True)
        weekly_cases_per_100k: Tensor = tensor_field((), torch.float32, "last week's cases / 100k", optional=True)
        isolation: Tensor = tensor_field(("N",), torch.float32, "P(stay home if symptomatic)", optional=True)
        isolation_score: Tensor = tensor_field(("K",), torch.float32, "archetype answers", optional=True)

    arch = Archetypes.from_attributes(state, ["age_band", "sex", "borough", "employment"],
                                      codebooks={"age_band": AGE, "sex": SEX, "borough": BOROUGH,
                                                 "employment": EMPLOYMENT})
    backend = RuleBackend(isolation_rule)                 # --llm rule (fast default)
    # backend = TransformersBackend.gemma()               # --llm local (offline Gemma 3 270M)
    # backend = OpenAIHTTPBackend("http://127.0.0.1:8000", "my-model")   # --llm http
    asker = Asker(backend, cache=AnswerCache("out/llm_cache.sqlite"), mode="record",
                  max_attempts=3, fallback={"isolate_if_symptomatic": [0.5, 0.5]})
    link = Link("logit_affine", low=0.0, high=0.95)
    params = Params(beta=Positive(0.05)); params.add_module("isolation_link", link)
    decide = ArchetypeDecision(
        "isolation_decision", archetypes=arch, question=isolation_question(resident="A resident of {borough}: age {age_band}, {sex}, employment: {employment}."), asker=asker,
        context=lambda system, s, t: {"cases": float(s.weekly_cases_per_100k)},
        context_reads=("weekly_cases_per_100k",),
        target="isolation", store="isolation_score", every=7, link=link)
    state = state.replace(isolation_score=decide.initial_scores(),
                          isolation=torch.zeros(state.stage.shape[0]))
    model = Model([decide, ...transmission using state.isolation...], ...)
    # asker.stats.calls == arch.K * number of decision steps (with the cache off)

Between decision steps the substep keeps the last answers (the ``store`` field, ``[K]``)
and re-applies the link, so gradients reach the link's parameters at every step.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from lpm import Observable, Params, State, Substep, System, check_tensor
from lpm.errors import ConfigError
from lpm.state import lookup

from llm_archetypes.archetypes import Archetypes
from llm_archetypes.asking import Asker
from llm_archetypes.link import Link
from llm_archetypes.questions import Question

__all__ = ["ArchetypeDecision"]


class ArchetypeDecision(Substep):
    """Every ``every`` steps ask the K archetypes ``question``; write ``link(scores)[archetype_id]`` to ``target``.

    ``context(system, state, t)`` computes the prompt's context from the system and state
    (numeric values are bucketed by the question): one ``{name: value}`` for all archetypes,
    or a sequence of K of them, one per archetype (e.g. the cases in each archetype's own
    area); ``context_reads`` names the fields it reads. ``store`` is a ``[K]`` float field
    holding the last raw scores, so the substep stays a pure function of the state. Decisions
    happen at ``t = offset, offset + every, ...``. ``ids`` names a system field ``[N]`` with each
    agent's archetype id (it then moves with the system); without it the archetypes' own ids
    are moved to the scores' device on first use.
    """

    def __init__(self, name: str, *, archetypes: Archetypes, question: Question, asker: Asker,
                 context: Callable[[System, State, int], Mapping[str, Any] | Sequence[Mapping[str, Any]]],
                 target: str, store: str, every: int = 7, offset: int = 0, link: Link | None = None,
                 context_reads: Sequence[str] = (), ids: str | None = None) -> None:
        if every < 1:
            raise ConfigError(f"every: expected >= 1 steps between decisions, got {every}")
        self.name = name
        self.archetypes = archetypes
        self.question = question
        self.asker = asker
        self.context = context
        self.target = target
        self.store = store
        self.every = int(every)
        self.offset = int(offset)
        self.link = link
        self.ids = ids
        self.reads = tuple(dict.fromkeys((store, *context_reads, *((ids,) if ids else ()))))
        self.optional_reads = (target,)  # its dtype, when the initial state sets it, is kept
        self.writes = (target, store)

    def is_decision_step(self, t: int) -> bool:
        """Whether step ``t`` asks the archetypes."""
        return t >= self.offset and (t - self.offset) % self.every == 0

    def initial_scores(self, value: float = 0.5, device: torch.device | str | None = None) -> Tensor:
        """A ``[K]`` store to put in the initial state (replaced at the first decision step)."""
        return torch.full((self.archetypes.K,), float(value), dtype=torch.float32, device=device)

    def __call__(self, params: Params, system: System, state: State, t: int, rng: torch.Generator) -> State:
        scores = getattr(state, self.store)
        check_tensor(f"{self.name}: {self.store}", scores, (self.archetypes.K,))
        if self.is_decision_step(t):
            ctx = self.context(system, state, t)
            ans = self.asker.ask_archetypes(self.archetypes, self.question, ctx)
            scores = ans.scores.to(device=scores.device, dtype=scores.dtype)
        value = self.link(scores) if self.link is not None else scores
        if self.ids is not None:
            per_agent = value[lookup(system, state, self.ids).long()]
        else:
            if self.archetypes.archetype_id.device != value.device:  # move the [N] ids once, not every step
                self.archetypes = self.archetypes.to(value.device)
            per_agent = self.archetypes.broadcast(value)
        old = getattr(state, self.target)
        if old is not None:
            per_agent = per_agent.to(old.dtype)
        return state.replace(**{self.target: per_agent, self.store: scores})

    def observable(self) -> Observable:
        """Observable of the stored archetype scores ``[K]`` per step, labelled by archetype."""
        labels = [" / ".join(d.values()) for d in self.archetypes.labels]
        store = self.store
        return Observable(lambda y, s: getattr(s, store).detach().clone(), labels=labels, reads=(store,),
                          doc=f"raw answer scores of {self.question.name!r} per archetype")
