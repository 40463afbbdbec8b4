"""Epidemic substeps: SIR/SEIR(M)-family transmission and stage progression.

Within-day convention (one step = one day of ``dt``): a day is *transmission, then
progression*. Transmission uses the stages held at the start of the day, so an agent
infected on day t does not transmit on day t; progression then closes the day: agents that
spent it in their stage count down, and those whose dwell is used up move on. A stated dwell
of k steps is therefore the number of days an agent spends in the stage and acts in it: an
agent entering the infectious stage at the end of day t transmits on days t + 1 .. t + k
(initial seeds on days 0 .. k - 1), and is counted in the stage by the k observations that
follow its entry (observables are taken at the end of a step, i.e. they show the state at
the start of the next day). :func:`epidemic_model` uses this order. The dynamics do not
depend on it: placed before transmission, :class:`Progression` closes the previous day
(agents infected since the last progression hold a pending, negative, timer and only start
counting), so who transmits on which day is the same in distribution; only the end-of-step
stage counts then show each day's exits one step later.
"""

from substeps.epidemic.disease import DiseaseModel, Dwell, EpiState, EpiSystem, Transition, epi_system, seir, seirm, sir
from substeps.epidemic.observables import incidence, prevalence, stage_counts
from substeps.epidemic.dynamics import Progression, Transmission, compartment_counts, event_carrier, initial_state

__all__ = [
    "DiseaseModel", "Dwell", "EpiState", "EpiSystem", "epi_system", "Transition", "sir", "seir", "seirm",
    "Transmission", "Progression", "initial_state", "event_carrier", "compartment_counts",
    "incidence", "prevalence", "stage_counts", "epidemic_model",
]


def epidemic_model(disease: DiseaseModel, *, network: bool = True, name: str = "epidemic", **transmission_kwargs):
    """Transmission then progression (the within-day convention above), with stage counts and incidence."""
    from lpm import Model

    obs = {"incidence": incidence(disease), **stage_counts(disease)}
    return Model([Transmission(disease, network=network, **transmission_kwargs), Progression(disease)],
                 obs, state_type=EpiState, system_type=EpiSystem, dt=disease.dt, name=name)
