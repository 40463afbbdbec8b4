"""Information spread: ignorant/spreader/stifler dynamics, roles, belief, interventions, judgement."""

from lpm import Observable
from substeps.information.judgement import ArchetypeProfile, Judgement, JudgeFn, rule_judgement
from substeps.information.spread import ROLES, InfoState, InfoSystem, Spread, initial_information, top_spreaders

__all__ = [
    "InfoState", "InfoSystem", "Spread", "initial_information", "ROLES", "top_spreaders",
    "ArchetypeProfile", "Judgement", "JudgeFn", "rule_judgement",
    "information_observables",
]


def information_observables() -> dict[str, Observable]:
    """Reach (share ever heard), spreaders, stiflers and mean belief among those reached."""
    return {
        "reach": Observable(lambda y, s: s.heard.mean(), reads=("heard",), doc="share of agents who heard the story"),
        "spreaders": Observable(lambda y, s: s.spreading.mean(), reads=("spreading",), doc="share currently spreading"),
        "stiflers": Observable(lambda y, s: (s.heard - s.spreading).mean(), reads=("heard", "spreading"),
                               doc="share who heard and stopped (or never) spreading"),
        "believers": Observable(lambda y, s: s.belief.mean(), reads=("belief",),
                                doc="expected share believing the story (mean belief over all agents)"),
    }
