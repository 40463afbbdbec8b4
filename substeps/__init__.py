"""Domain library of substeps built on the :mod:`lpm` core."""
