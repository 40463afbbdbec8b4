"""Ready-made questions and rules: isolation compliance when symptomatic.

The rule is a transparent, deterministic stand-in for a language model (tests and fast
default runs), not an estimate: it encodes the direction of effects reported in surveys
of COVID-19 self-isolation (older people, women and people facing higher case counts
more willing; people whose work cannot be done from home less able).
"""

from __future__ import annotations

import re

from llm_archetypes.questions import Bucket, Distribution, Prompt, Question

__all__ = ["CASES_BUCKET", "RESIDENT", "isolation_question", "isolation_rule"]

#: Weekly confirmed cases per 100,000 residents, in the bands public dashboards used.
CASES_BUCKET = Bucket((10.0, 50.0, 100.0, 200.0),
                      ("very low (under 10)", "low (10 to 50)", "moderate (50 to 100)",
                       "high (100 to 200)", "very high (over 200)"))


#: Who the person is, from the archetype attributes the rule and the prompts use.
RESIDENT = "A person: age {age_band}, {sex}, employment: {employment}."


def isolation_question(name: str = "isolate_if_symptomatic", cases_phrase: str = "COVID-19 cases where this person lives",
                       resident: str = RESIDENT) -> Question:
    """'Will this person stay home this week if they have symptoms?' as a yes/no distribution.

    The wording names no place: a study says who and where with ``resident`` (attribute
    placeholders allowed, e.g. ``"A resident of {city}: age {age_band}, ..."``) and which case
    series the context reports with ``cases_phrase`` (e.g. ``"reported COVID-19 cases in {borough}"``).
    """
    template = (
        resident + "\n"
        "This week " + cases_phrase + " are {cases} per 100,000 people per week.\n"
        "Question: if this person develops a fever and cough this week, will they stay home "
        "and isolate for the whole week?"
    )
    return Question(name, template, Distribution(("yes", "no"), (1.0, 0.0)), buckets={"cases": CASES_BUCKET})


def _first_int(label: str) -> int | None:
    m = re.search(r"\d+", label)
    return int(m.group(0)) if m else None


def isolation_rule(prompt: Prompt) -> list[float]:
    """Deterministic ``[P(yes), P(no)]`` from age, sex, employment labels and the case level."""
    a = prompt.attributes
    p = 0.55 + 0.08 * prompt.levels.get("cases", 0)
    age = _first_int(a.get("age_band", ""))
    if age is not None:
        p += 0.12 if age >= 65 else (-0.08 if age < 30 else 0.0)
    if a.get("sex", "").lower() in ("female", "f", "woman"):
        p += 0.04
    emp = a.get("employment", "").lower()
    if "essential" in emp or "cannot work from home" in emp:
        p -= 0.2
    elif "unemployed" in emp or "not in labor force" in emp or "retired" in emp:
        p += 0.05
    p = min(0.95, max(0.05, p))
    return [p, 1.0 - p]
