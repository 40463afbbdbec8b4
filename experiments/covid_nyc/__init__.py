"""COVID-19 in New York City, March 2020 - March 2021, on a synthetic population from census tables.

Run: ``lpm run covid-nyc [--out out/covid_nyc]`` replays the shipped calibration
(``data/covid_nyc_fit/fit.json``, see :mod:`experiments.covid_nyc.fit`);
``lpm run covid-nyc --params prior [--scale 0.02 --days 396 --device cpu --seed 0 --out out/covid_nyc]``
runs the uncalibrated model described here.

Writes to ``--out``: ``results.h5`` (observables at simulation scale), ``daily.csv`` (tidy ``date,
area, series, value``; values divided by ``scale``, i.e. city-equivalent counts; area = borough
code or NYC), ``cases_by_borough.png`` / ``hospitalizations_by_borough.png`` /
``deaths_by_borough.png`` (simulated vs observed, 7-day means), ``age_profile.png`` (cumulative
reported cases per 100,000 by NYC age band, simulated vs observed), ``validation.json``
(synthesized marginals vs census, household sizes, per-layer age-mixing correlation and mean
degree vs the Mistry matrices), ``summary.json`` (timings, peak memory, totals, LLM calls and cache
hits) and ``survey.csv`` (tidy weekly isolation answers: ``week, date, archetype, age_band, sex,
borough, employment, size, cases_per_100k, cases_level, answer, compliance``).
Behaviour: ``--llm rule|local|http|off`` (default ``rule``) answers weekly, per archetype, whether
its members isolate when symptomatic (see :func:`build` and :class:`NYCConfig`); ``--llm-cache PATH`` (default beside the
population cache), ``--llm-mode replay`` reproduces a recorded run with no model present,
``--llm-url``/``--llm-model`` for ``http``.
The population is cached in ``~/.cache/lpm/covid_nyc`` (or ``--cache-dir`` / ``$LPM_CACHE_DIR``),
keyed by scale, seed, boroughs and a hash of the input tables.

Python API (used by calibration)::

    from experiments.covid_nyc import NYCConfig, build, load_observed
    setup = build(NYCConfig(scale=0.01, seed=0, device="cpu", start="2020-03-01", days=None, boroughs=None),
                  params={"beta": 0.25})
    res = setup.model.simulate(setup.params, setup.system, setup.state, len(setup.dates), seed=0, grad=True)
    res["cases"]                  # [T, A] reported cases per day and borough (labels = setup.areas)
    obs = load_observed("2020-03-01", "2021-03-31")   # tidy: date, area, series, value

Observables ``[T, A]`` (agents at simulation scale; divide by ``setup.scale`` for city counts):
``infections`` (entries into E), ``symptomatic_onsets`` (into Is), ``cases`` (reported: tested at
onset), ``hospitalizations`` (into H), ``deaths`` (into D); ``cases_by_age``, ``infections_by_age``,
``deaths_by_age`` ``[T, G]``. All carry gradients to the parameters via the carrier mechanism.
With archetypes (``llm != 'off'``): ``isolation_answers [T, K]`` (raw answer per archetype, updated
every 7 days; labels = archetype attributes) and ``weekly_cases_per_100k [T, A]`` (reported cases
per 100k per borough over the last 7 days: what the next decision sees). ``setup.asker.stats``
counts calls and cache hits; ``setup.decision.archetypes`` holds the K archetypes.

Parameters (``setup.params``; :data:`substeps.epidemic.covid.PARAM_DOCS`): ``beta`` (per
contact-day), ``ihr_scale``, ``ifr_scale`` (multipliers of the published age tables),
``ascertainment`` (P(report | symptomatic) at full testing capacity), ``isolation`` (share of
non-household contacts dropped by a symptomatic agent who isolates; with archetypes, each agent
isolates with its archetype's weekly compliance ``state.isolation``), and the link
``isolation_link.slope/bias`` (answer -> compliance, identity at the start).

Data (``data/``, each folder with its README and licence): ACS 2023 DP05 (age x sex per
borough), ACS 2019 DP03 (employment, households, household income), ACS 2009-2013 commuting
flows, Mistry et al. 2021 New York contact matrices, MTA ridership and Descartes Labs m50
mobility, NYC DOHMH daily cases / hospitalisations / deaths. Covariates are read only up
to the run's last date.

Contact layers: household (cliques), school (age-structured within schools), work
(workplaces in the commuting-flow work borough), community (age-structured within the home
borough). Per-layer contacts per day follow the Mistry matrices ``C_k = w_k F_k`` with
``w = (4.11, 11.41, 8.07, 2.79)`` (household, school, work, community).

Time-varying contact multipliers (all tensors over the run's dates):

* mobility (``AreaContacts``, per borough and layer): work = MTA subway ridership share of the
  comparable pre-pandemic day (trailing 7-day mean); community = ``0.3 + 0.7 min(1, m50/100)``
  with the borough's Descartes Labs m50 index (trailing 7-day mean); days the source skips (m50:
  18 days, at most 8 in a row) carry the last mean forward; a non-numeric or negative value, or
  more than 10 missing days in a row, is an error naming the file, column and date. Dates
  outside the covariates (2020-03-01..2021-03-31) need ``extrapolate=True`` (``--extrapolate``);
* ``school_closure`` (school layer): NYC DOE schools closed 2020-03-16 (Mayor's announcement of
  2020-03-15); blended learning from 2020-09-29 at ~30% in-person attendance; all buildings
  closed 2020-11-19; elementary reopened 2020-12-07, middle schools 2021-02-25, high schools
  2021-03-22 (NYC DOE announcements);
* ``stay_at_home`` (work and community): New York State on PAUSE, Executive Order 202.8,
  effective 2020-03-22, until Phase 1 reopening 2020-06-08 (multiplier 0.5: distancing and
  closures beyond what ridership shows; an assumption to calibrate);
* ``reopening`` (work and community): NYC Phase 1 2020-06-08 (0.6), Phase 2 2020-06-22 (0.7),
  Phase 3 2020-07-06 (0.75), Phase 4 2020-07-20 (0.8), indoor dining 2020-09-30 (0.85), indoor
  dining closed 2020-12-14 (0.8), reopened 2021-02-12 (0.85) (NYS Forward announcements);
* ``vaccination`` (susceptibility by age band): NYS eligibility 75+ from 2021-01-11, 65-74 from
  2021-01-12, 60-64 from 2021-03-10, 50-59 from 2021-03-23, 30-49 from 2021-03-30; uptake 0.6%
  of the band per day up to 60%, efficacy against infection 0.8 after 14 days (Polack et al.
  NEJM 2020 report 95% against symptomatic disease; 0.8 is a conservative assumption);
* testing capacity (``Testing``): ``0.15 + 0.85 / (1 + exp(-(t - 2020-04-20) / 10 days))``, the
  scale-up of NYC testing from a few thousand to tens of thousands of tests a day by mid-May
  2020 (an assumption; ``ascertainment`` is fitted on top).

The package: :mod:`~experiments.covid_nyc.data` (loaders of the bundled tables),
:mod:`~experiments.covid_nyc.schedules` (mobility, policies, vaccination, test capacity),
:mod:`~experiments.covid_nyc.behaviour` (archetypes and the weekly isolation question),
:mod:`~experiments.covid_nyc.model` (:class:`NYCConfig`, population cache, :func:`build`) and
:mod:`~experiments.covid_nyc.cli` (``lpm run/calibrate covid-nyc``, plots; also
``python -m experiments.covid_nyc``). The names below are re-exported here for reading; to
point the loaders at other copies of the tables, set the file names on
:mod:`experiments.covid_nyc.data` (e.g. ``data.MTA_FILE``), which they read at call time.
"""

from experiments.covid_nyc import data
from experiments.covid_nyc.data import (AGE_LABELS, AGE_LOWER, AGE_RATE_FILE, AGE_UPPER, BOROUGHS, CASES_FILE, CENSUS_FILE,
                                        DATA, DP03_FILE, FIPS, FLOWS_FILE, LAYERS, M50_FILE, M50_NAMES, MATRIX_DIR,
                                        MTA_FILE, NAMES, NYC_AGE_BANDS, SETTING_WEIGHTS, DataWarning, _check_boroughs,
                                        covariate_span, load_contact_matrices, load_flows, load_marginals, load_observed,
                                        load_observed_age)
from experiments.covid_nyc.schedules import (POLICIES, _steps, area_schedule, check_dates, policies, test_capacity,
                                             vaccination)
from experiments.covid_nyc.behaviour import (ARCHETYPE_AGE_BANDS, CASE_WINDOW, DECISION_EVERY, EMPLOYMENT_LABELS,
                                             ISOLATION_QUESTION, LLM_KINDS, WeeklyCases, isolation_decision, make_asker,
                                             nyc_archetypes, nyc_isolation_question, survey_table)
from experiments.covid_nyc.model import (DEFAULT_PREVALENCE, DEFAULT_SCALE, NYC_DEFAULTS, NYCConfig, NYCSetup, NYCState,
                                         NYCSystem, _cache_path, build, build_population, validate_setup)
from experiments.covid_nyc.cli import CHECKPOINT_FILE, EXPERIMENT, OUTPUT_FILES, calibrate, run, run_prior, run_ranks
from lpm.population import check_table

__all__ = ["build", "NYCConfig", "NYCSetup", "NYCState", "NYCSystem", "load_observed", "load_observed_age", "BOROUGHS",
           "DEFAULT_SCALE", "load_marginals", "load_flows", "load_contact_matrices", "validate_setup", "nyc_archetypes",
           "nyc_isolation_question", "isolation_decision", "survey_table", "area_schedule", "policies", "vaccination",
           "test_capacity", "build_population", "run", "calibrate", "EXPERIMENT"]
