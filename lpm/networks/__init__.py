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

__all__ = [
    "Network",
    "EdgeIndex",
    "erdos_renyi",
    "configuration_model",
    "household_cliques",
    "contact_matrix_sbm",
    "symmetrize",
    "make_generator",
]
