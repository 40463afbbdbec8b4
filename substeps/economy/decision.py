"""The spending decision, asked once per archetype (income band x age x industry x area).

"What share of this week's take-home income will this household spend?" is asked of the
K archetypes every ``every`` weeks through :mod:`llm_archetypes` and broadcast to members
as ``mpc [N]``. The context is policy only (closures, UBI, UI top-up), never an outcome of
the run, so replicates stay independent and repeated contexts are answered from memory.

:func:`spending_rule` is the deterministic default backend: a transparent stand-in, not an
estimate. It encodes the direction of effects reported for 2020 (higher marginal
propensity to consume at low income; more saving when the economy is shut and among older
and closed-industry households; transfers raise spending of low-income households).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from lpm import System  # noqa: F401  (the context signature)
from llm_archetypes import ArchetypeDecision, Archetypes, Asker, Bucket, Number, Prompt, Question, RuleBackend
from llm_archetypes.asking import Answers
from substeps.economy.state import AGE_BANDS, INCOME_BANDS, INDUSTRY_LABELS, EconState, EconSystem

__all__ = ["spending_question", "spending_rule", "economy_archetypes", "spending_decision", "MemoAsker",
           "NOT_IN_LF"]

NOT_IN_LF = "not in the labour force"

CLOSURE_BUCKET = Bucket((0.02, 0.1, 0.25), ("open", "a few businesses closed", "many businesses closed",
                                            "most non-essential businesses closed"))
UBI_BUCKET = Bucket((1.0, 500.0, 1500.0), ("none", "under $500 a month", "$500 to $1,500 a month", "over $1,500 a month"))
UI_BUCKET = Bucket((1.0, 400.0), ("none", "$300 a week", "$600 a week"))


def spending_question(name: str = "spend_share") -> Question:
    """Share of take-home income spent this week, a number in [0, 1]."""
    template = (
        "A household in New York City: the earner is aged {age_band}, lives in {area}, works in {industry}, "
        "and earns {income_band} a year.\n"
        "This week in the city: {closures}. Universal basic income paid to every adult: {ubi}. "
        "Federal top-up of unemployment benefits: {ui}.\n"
        "Question: what share of this week's take-home income (after taxes, including any benefits) will this "
        "household spend rather than save?"
    )
    return Question(name, template, Number(0.0, 1.0),
                    buckets={"closures": CLOSURE_BUCKET, "ubi": UBI_BUCKET, "ui": UI_BUCKET})


def spending_rule(prompt: Prompt) -> float:
    """Deterministic share spent from income band, age, industry and the policy context."""
    a = prompt.attributes
    band = INCOME_BANDS.index(a["income_band"]) if a.get("income_band") in INCOME_BANDS else 4
    p = 0.97 - 0.05 * band
    if a.get("age_band") == AGE_BANDS[-1]:
        p -= 0.04
    closures = prompt.levels.get("closures", 0)
    p -= 0.04 * closures
    if a.get("industry") in (INDUSTRY_LABELS[10], INDUSTRY_LABELS[11], INDUSTRY_LABELS[4]):
        p -= 0.02 * closures
    if prompt.levels.get("ubi", 0) > 0 and band <= 3:
        p += 0.02
    return float(min(0.99, max(0.3, p)))


class MemoAsker:
    """Asks through an :class:`Asker` once per distinct rendered context; repeats come from memory."""

    def __init__(self, asker: Asker) -> None:
        self.asker = asker
        self.memo: dict[tuple, Answers] = {}

    @property
    def stats(self):
        """The wrapped asker's statistics (backend calls, cache hits, ...)."""
        return self.asker.stats

    def ask_archetypes(self, archetypes: Archetypes, question: Question, context: Mapping[str, Any]) -> Answers:
        """Answers ``[K]`` for ``context``, asking only the first time it is seen (after bucketing)."""
        labels, _ = question.render_context(context)
        key = (question.name, id(archetypes), tuple(sorted(labels.items())))
        if key not in self.memo:
            self.memo[key] = self.asker.ask_archetypes(archetypes, question, context)
        return self.memo[key]


def economy_archetypes(system: EconSystem) -> Archetypes:
    """Archetypes by income band x age band x industry (or out of the labour force) x area."""
    J = system.J
    ind = torch.where(system.in_lf, system.industry.long(), torch.full_like(system.industry.long(), J))
    attrs = {"income_band": system.income_band, "age_band": system.age_band, "industry": ind, "area": system.area}
    books = {"income_band": INCOME_BANDS, "age_band": AGE_BANDS,
             "industry": tuple(INDUSTRY_LABELS[:J]) + (NOT_IN_LF,),
             "area": tuple(system.codebooks["area_names"].labels) if system.codebooks and "area_names" in system.codebooks
             else tuple(system.areas)}
    return Archetypes.from_attributes(attrs, list(attrs), codebooks=books)


def _context(system: EconSystem, state: EconState, t: int) -> dict[str, float]:
    i = min(t, system.ubi.shape[0] - 1)
    closures = float((state.closed * system.spend_share).sum())
    return {"closures": closures, "ubi": float(system.ubi[i]) * 52.0 / 12.0, "ui": float(system.ui_supplement[i])}


def spending_decision(system: EconSystem, asker: Asker | MemoAsker | None = None, *, every: int = 4,
                      archetypes: Archetypes | None = None) -> ArchetypeDecision:
    """The ``spending_decision`` substep: writes ``mpc`` from the archetypes' answers (rule backend by default)."""
    if asker is None:
        asker = Asker(RuleBackend(spending_rule, version="1"), cache=None, mode="off")
    if isinstance(asker, Asker):
        asker = MemoAsker(asker)
    arch = archetypes if archetypes is not None else economy_archetypes(system)
    return ArchetypeDecision("spending_decision", archetypes=arch, question=spending_question(), asker=asker,
                             context=_context, context_reads=("closed", "spend_share", "ubi", "ui_supplement"),
                             target="mpc", store="mpc_score", every=every)
