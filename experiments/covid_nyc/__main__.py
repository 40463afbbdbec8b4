"""``python -m experiments.covid_nyc [args]``: the same as ``lpm run covid-nyc [args]`` (errors printed the same way)."""

import sys

from lpm.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", "covid-nyc", *sys.argv[1:]]))
