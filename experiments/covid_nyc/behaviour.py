"""NYC study behaviour: archetypes of residents asked weekly whether they isolate when symptomatic.

Archetypes are coarse age band x sex x borough x employment (at most 120); each is asked, once
a week, with its own borough's reported cases per 100,000 over the last week
(:class:`WeeklyCases`, a per-archetype context of :class:`~llm_archetypes.ArchetypeDecision`).
:func:`isolation_decision` assembles the substep; :func:`survey_table` tidies its answers.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import pandas as pd
import torch

from lpm import Observable, State, System
from lpm.errors import ConfigError
from lpm.population import Population
from llm_archetypes import AnswerCache, ArchetypeDecision, Archetypes, Asker, Backend, Link, Question, make_backend
from llm_archetypes.examples import CASES_BUCKET, isolation_question, isolation_rule
from experiments.covid_nyc.data import AGE_LABELS, NAMES, cache_root

if TYPE_CHECKING:
    from experiments.covid_nyc.model import NYCConfig, NYCSetup

__all__ = ["ARCHETYPE_AGE_BANDS", "EMPLOYMENT_LABELS", "CASE_WINDOW", "DECISION_EVERY", "ISOLATION_QUESTION", "LLM_KINDS",
           "nyc_isolation_question", "nyc_archetypes", "WeeklyCases", "isolation_decision", "make_asker", "survey_table"]

#: coarse age bands of the archetypes as unions of the 5-year codes (AGE_LABELS); labels start with the lower age
ARCHETYPE_AGE_BANDS = {"under 20": (0, 1, 2, 3), "20 to 29": (4, 5), "30 to 44": (6, 7, 8), "45 to 64": (9, 10, 11, 12),
                       "65 to 74": (13, 14), "75 or older": (15, 16, 17)}
EMPLOYMENT_LABELS = ("not employed (unemployed, student, retired or not in the labor force)", "employed")
CASE_WINDOW = 7  # days of reported cases behind the weekly context
DECISION_EVERY = 7  # days between isolation decisions
ISOLATION_QUESTION = "isolate_if_symptomatic"
LLM_KINDS = ("rule", "local", "http", "off")


def nyc_isolation_question(name: str = ISOLATION_QUESTION) -> Question:
    """'Will this person stay home this week if they have symptoms?' with the borough's weekly reported cases."""
    return isolation_question(name, cases_phrase="reported COVID-19 cases in {borough}",
                              resident="A resident of New York City: age {age_band}, {sex}, lives in {borough}, "
                                       "employment: {employment}.")


def nyc_archetypes(pop: Population, areas: Sequence[str]) -> Archetypes:
    """Archetypes by coarse age band x sex x borough x employment (at most 6 x 2 x 5 x 2 = 120)."""
    band_of = torch.zeros(len(AGE_LABELS), dtype=torch.int8)
    for k, codes in enumerate(ARCHETYPE_AGE_BANDS.values()):
        band_of[list(codes)] = k
    attrs = {"age_band": band_of[pop.age.long().cpu()], "sex": pop.sex.cpu(), "borough": pop.area.cpu(),
             "employment": pop.employed.cpu().to(torch.int8)}
    books = {"age_band": tuple(ARCHETYPE_AGE_BANDS), "sex": ("male", "female"),
             "borough": tuple(NAMES[a] for a in areas), "employment": EMPLOYMENT_LABELS}
    return Archetypes.from_attributes(attrs, list(attrs), codebooks=books)


class WeeklyCases:
    """Context of each archetype: reported cases per 100,000 in its borough over the last ``CASE_WINDOW`` days."""

    def __init__(self, archetypes: Archetypes, population: torch.Tensor | None = None) -> None:
        self.borough = archetypes.codes[:, archetypes.attributes.index("borough")].long()  # [K] area codes
        # residents per area [A], fixed: a partitioned run (lpm.distributed) holds only some agents per rank
        self.population = population

    def per_area(self, system: System, state: State) -> torch.Tensor:
        """Reported cases per 100,000 per area over the window ``[A]`` (population: given, else counted from ``area``)."""
        window = state.recent_cases
        if self.population is not None:
            n = self.population.to(window.device, window.dtype)
        else:
            n = torch.bincount(system.area.long(), minlength=window.shape[1]).to(window.dtype)
        return window.sum(0) / n.clamp_min(1.0) * 1e5

    def __call__(self, system: System, state: State, t: int) -> list[dict[str, float]]:
        rate = self.per_area(system, state).detach().cpu()[self.borough]
        return [{"cases": float(r)} for r in rate.tolist()]


def make_asker(config: "NYCConfig") -> Asker:
    """The asker of ``config.llm`` (a backend name or a Backend) with the answer cache and fallback the config names."""
    llm = config.llm
    backend = llm if isinstance(llm, Backend) else make_backend(llm, rule=isolation_rule, url=config.llm_url,
                                                                model=config.llm_model, device=config.device)
    # no fallback unless asked for: a run must not finish on invented behaviour
    p_yes = config.llm_fallback
    fallback = None if p_yes is None else {ISOLATION_QUESTION: [float(p_yes), 1.0 - float(p_yes)]}
    share = None if p_yes is None else (0.05 if config.llm_max_fallback_share is None else config.llm_max_fallback_share)
    if config.llm_cache is False:
        return Asker(backend, mode="off", fallback=fallback, max_fallback_share=share)
    path = (cache_root(config.cache_dir) / "llm_answers.sqlite" if config.llm_cache in (None, True)
            else Path(config.llm_cache))
    return Asker(backend, cache=AnswerCache(path), mode=config.llm_mode, fallback=fallback, max_fallback_share=share)


def isolation_decision(archetypes: Archetypes, areas: Sequence[str], residents: torch.Tensor, asker: Asker,
                       link: Link) -> tuple[ArchetypeDecision, dict[str, Observable]]:
    """The weekly isolation decision (archetype ids read from the system's ``archetype``) and its two observables."""
    cases = WeeklyCases(archetypes, residents)
    decide = ArchetypeDecision("isolation_decision", archetypes=archetypes, question=nyc_isolation_question(),
                               asker=asker, context=cases, context_reads=("recent_cases", "area"), target="isolation",
                               store="isolation_score", every=DECISION_EVERY, link=link, ids="archetype")
    observables = {"isolation_answers": decide.observable(),
                   "weekly_cases_per_100k": Observable(lambda y, s: cases.per_area(y, s).detach().clone(),
                                                       labels=tuple(areas), reads=("recent_cases",),
                                                       doc="reported cases per 100k per borough over the last 7 days")}
    return decide, observables


def survey_table(setup: "NYCSetup", answers: torch.Tensor, cases_per_100k: torch.Tensor) -> pd.DataFrame:
    """Tidy weekly survey: week, date, archetype attributes, size, borough's cases per 100k and bucket, answer, compliance.

    ``answers [T, K]`` is the ``isolation_answers`` observable, ``cases_per_100k [T, A]`` the
    ``weekly_cases_per_100k`` observable (the decision at step t saw the value after step t-1).
    """
    decide = setup.decision
    if decide is None:
        raise ConfigError("survey_table: this setup has no archetype decision (built with llm='off')")
    arch = decide.archetypes
    base = arch.to_pandas()
    boro = arch.codes[:, arch.attributes.index("borough")].long().cpu()
    ans = answers.detach().cpu().double()
    cases = cases_per_100k.detach().cpu().double()
    frames = []
    with torch.no_grad():
        for week, t in enumerate(t for t in range(ans.shape[0]) if decide.is_decision_step(t)):
            seen = cases[t - 1, boro] if t > 0 else torch.zeros(arch.K, dtype=torch.float64)
            df = base.copy()
            df.insert(0, "date", setup.dates[t].date())
            df.insert(0, "week", week)
            df["cases_per_100k"] = seen.numpy()
            df["cases_level"] = [CASES_BUCKET(float(v)) for v in seen.tolist()]
            df["answer"] = ans[t].numpy()
            df["compliance"] = decide.link(ans[t].float().to(decide.link.slope.device)).double().cpu().numpy() if decide.link is not None else ans[t].numpy()
            frames.append(df)
    return pd.concat(frames, ignore_index=True)
