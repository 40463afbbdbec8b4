"""Epidemic substeps: SIR/SEIR(M)-family transmission and stage progression."""

from substeps.epidemic.disease import DiseaseModel, Dwell, EpiState, Transition, seir, seirm, sir
from substeps.epidemic.observables import incidence, prevalence, stage_counts
from substeps.epidemic.substeps import Progression, Transmission, compartment_counts, event_carrier, initial_state

__all__ = [
    "DiseaseModel", "Dwell", "EpiState", "Transition", "sir", "seir", "seirm",
    "Transmission", "Progression", "initial_state", "event_carrier", "compartment_counts",
    "incidence", "prevalence", "stage_counts", "epidemic_model",
]


def epidemic_model(disease: DiseaseModel, *, network: bool = True, name: str = "epidemic", **transmission_kwargs):
    """Transmission + progression with stage counts and incidence observables."""
    from lpm import Model

    obs = {"incidence": incidence(disease), **stage_counts(disease)}
    return Model([Progression(disease), Transmission(disease, network=network, **transmission_kwargs)],
                 obs, state_type=EpiState, dt=disease.dt, name=name)
