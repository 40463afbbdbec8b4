"""``python -m experiments.covid_nyc [args]``: the same as ``lpm run covid-nyc [args]``."""

import sys

from experiments.covid_nyc.cli import run

if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
