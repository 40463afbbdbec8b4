"""Packages: the code (found by name) and ``data/`` installed as ``lpm_data`` (metadata: pyproject.toml)."""

from setuptools import find_packages, setup

CODE = ["lpm*", "substeps*", "calibration*", "llm_archetypes*", "experiments*"]

# data/ ships inside the wheel as the package `lpm_data`, read with lpm.data.data_path, so a
# non-editable install finds the tables; pyproject's find directive cannot rename a folder
setup(packages=[*find_packages(include=CODE), "lpm_data"], package_dir={"lpm_data": "data"})
