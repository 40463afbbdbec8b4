"""Opinion dynamics: bounded confidence, anchoring, repulsion, feeds, rewiring, polarization metrics."""

from substeps.opinion.anes import AnesPopulation, anes_population, load_anes96
from substeps.opinion.dynamics import Anchoring, BoundedConfidence, PairwiseBoundedConfidence, st_gate
from substeps.opinion.feed import RANKINGS, Feed, HomophilousRewiring, segment_topk
from substeps.opinion.metrics import (
    bimodality,
    cluster_count,
    esteban_ray,
    neighbour_correlation,
    polarization_observables,
    soft_histogram,
    variance,
)
from substeps.opinion.state import OpinionState, OpinionSystem, as_matrix, initial_opinions

__all__ = [
    "OpinionState", "OpinionSystem", "initial_opinions", "as_matrix",
    "BoundedConfidence", "PairwiseBoundedConfidence", "Anchoring", "st_gate",
    "Feed", "HomophilousRewiring", "segment_topk", "RANKINGS",
    "variance", "bimodality", "esteban_ray", "neighbour_correlation", "cluster_count", "soft_histogram",
    "polarization_observables",
    "AnesPopulation", "anes_population", "load_anes96",
]
