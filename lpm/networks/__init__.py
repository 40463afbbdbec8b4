"""Contact networks: the layered :class:`Network` and vectorized generators."""

from lpm.networks.generators import (
    configuration_model,
    contact_matrix_sbm,
    erdos_renyi,
    household_cliques,
    make_generator,
    symmetrize,
)
from lpm.networks.network import EdgeIndex, Network
from lpm.networks.social import (
    assortativity,
    clustering,
    degree_distribution,
    follow_graph,
    friendship_paradox,
    homophilous_sbm,
    preferential_attachment,
    small_world,
)

__all__ = [
    "Network",
    "EdgeIndex",
    "erdos_renyi",
    "configuration_model",
    "household_cliques",
    "contact_matrix_sbm",
    "symmetrize",
    "make_generator",
    "preferential_attachment",
    "small_world",
    "homophilous_sbm",
    "follow_graph",
    "degree_distribution",
    "clustering",
    "assortativity",
    "friendship_paradox",
]
