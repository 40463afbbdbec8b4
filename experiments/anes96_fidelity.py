"""ANES 1996 fidelity benchmark: do archetypes place themselves, pick a party and vote like their respondents?

Run: ``lpm fidelity anes96 --llm rule|local|http --out DIR`` (``--url``/``--model`` or
``$LPM_LLM_URL``/``$LPM_LLM_MODEL`` for ``http``). Data: the bundled 80% split of the
ANES 1996 cross-section (``data/opinion/anes96_train.csv``, 756 respondents).

Three questions, each with archetypes built from the other attributes:

- ``selfLR`` (1 extremely liberal .. 7 extremely conservative) by party (Democrat incl.
  leaners / independent / Republican incl. leaners) x age band x education;
- ``PID`` (strong Democrat .. strong Republican, 7 options) by ideology (liberal /
  moderate / conservative) x age band x education;
- ``vote`` (Clinton / Dole) by the 7-level party identification x education.

The respondents are split once (seeded) into train and test; every number in the table
is computed on the test respondents only; prompt styles, scoring mode and the
:class:`~llm_archetypes.fidelity.DistributionLink` are chosen and fitted on the training
respondents. Writes ``fidelity.csv`` (tidy), ``summary.csv`` (aggregates), ``gains.csv``
(what tuning on train buys on test), ``predictions.csv`` (each archetype's predicted
distribution with its attribute bins: score them on any other ANES respondents with
:meth:`FidelityStudy.assign`), ``fidelity_tv.png`` and ``fidelity_score.png``.

The ``rule`` backend is a transparent hand-set prior (not fitted to these data): ideology
centred by party, party centred by ideology, the vote by party identification.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd
import torch

from llm_archetypes.asking import Asker
from llm_archetypes.backends import Backend, make_backend
from llm_archetypes.cache import AnswerCache
from llm_archetypes.fidelity import (
    STYLES, Attribute, FidelitySpec, FidelityStudy, SurveyQuestion, plot_fidelity, split_respondents,
)
from llm_archetypes.questions import Prompt

DATA = Path(__file__).resolve().parents[1] / "data" / "opinion" / "anes96_train.csv"

AGE = Attribute("age", "age", (35.0, 55.0), ("18 to 34 years old", "35 to 54 years old", "55 or older"),
                you="You are {}.", me="I am {}.")
EDUC = Attribute("educ", "education", (3.5, 4.5), ("high school or less", "some college", "a college degree"),
                 you="Your education: {}.", me="My education: {}.")
PARTY3 = Attribute("PID", "party", (2.5, 3.5), ("a Democrat", "an independent", "a Republican"),
                   you="In politics you are {}.", me="In politics I am {}.")
PARTY7 = Attribute("PID", "party", (0.5, 1.5, 2.5, 3.5, 4.5, 5.5),
                   ("a strong Democrat", "a weak Democrat", "an independent who leans Democrat", "an independent",
                    "an independent who leans Republican", "a weak Republican", "a strong Republican"),
                   you="In politics you are {}.", me="In politics I am {}.")
IDEOLOGY = Attribute("selfLR", "ideology", (3.5, 4.5), ("liberal", "moderate", "conservative"),
                     you="Your political views are {}.", me="My political views are {}.")

SELF_LR = SurveyQuestion(
    "selfLR", "selfLR", tuple("1234567"), tuple(range(1, 8)),
    "Where would you place yourself on a scale from 1 to 7, where 1 is extremely liberal, 4 is moderate "
    "(middle of the road) and 7 is extremely conservative?")
PID = SurveyQuestion(
    "PID", "PID", tuple("1234567"), tuple(range(0, 7)),
    "Generally speaking, do you think of yourself as a Democrat, a Republican or an independent? Answer on a "
    "scale from 1 to 7: 1 strong Democrat, 2 weak Democrat, 3 independent leaning Democrat, 4 independent, "
    "5 independent leaning Republican, 6 weak Republican, 7 strong Republican.")
VOTE = SurveyQuestion(
    "vote", "vote", ("Clinton", "Dole"), (0, 1),
    "In the 1996 presidential election, did you vote for Bill Clinton or Bob Dole?", ordinal=False)

SETTING = "survey respondent in the United States in 1996"
SPECS: dict[str, FidelitySpec] = {
    "selfLR": FidelitySpec((PARTY3, AGE, EDUC), SELF_LR, SETTING),
    "PID": FidelitySpec((IDEOLOGY, AGE, EDUC), PID, SETTING),
    "vote": FidelitySpec((PARTY7, EDUC), VOTE, SETTING),
}


def load_anes96(path: str | Path = DATA) -> pd.DataFrame:
    """The bundled ANES 1996 respondents (one row each)."""
    return pd.read_csv(path)


def _discrete_normal(mean: float, sd: float, n: int) -> list[float]:
    w = [math.exp(-0.5 * ((i - mean) / sd) ** 2) for i in range(n)]
    s = sum(w)
    return [x / s for x in w]


def anes_rule(prompt: Prompt) -> list[float] | str:
    """Hand-set prior by attribute label (ideology by party, party by ideology, vote by party); not fitted."""
    a = prompt.attributes
    q = prompt.question
    name = q.name.split(":")[0] if q is not None else ""
    if name == "selfLR":
        mean = {"a Democrat": 2.2, "an independent": 3.0, "a Republican": 4.3}[a["PID"]]   # option index 0..6
        p = _discrete_normal(mean, 1.2, 7)
    elif name == "PID":
        mean = {"liberal": 1.0, "moderate": 3.0, "conservative": 5.0}[a["selfLR"]]
        p = _discrete_normal(mean, 1.6, 7)
    elif name == "vote":
        dole = [0.03, 0.12, 0.1, 0.5, 0.85, 0.85, 0.97][PARTY7.labels.index(a["PID"])]
        p = [1.0 - dole, dole]
    else:
        raise ValueError(f"anes_rule: unknown question {name!r}")
    if q is not None and q.answer.kind == "choice":
        return q.answer.options[max(range(len(p)), key=p.__getitem__)]
    return p


@dataclass
class Variant:
    """One way of asking: prompt style, scoring mode, with or without the fitted link."""

    style: str
    mode: str
    link: bool

    @property
    def name(self) -> str:
        """Method name in the table."""
        return f"{self.style}/{self.mode}" + ("+link" if self.link else "")


def run_question(spec: FidelitySpec, frame: pd.DataFrame, asker: Asker, *, styles: Sequence[str],
                 modes: Sequence[str], test_fraction: float, seed: int, n_boot: int, tag: str
                 ) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Ask every style x mode, fit links on train, pick the best on train, score all on test."""
    study = FidelityStudy(spec, frame, split_respondents(len(frame), test_fraction, seed))
    preds: dict[str, torch.Tensor] = {}
    train_nll: dict[str, float] = {}
    timing: dict[str, float] = {}
    for style in styles:
        for mode in modes:
            t0 = time.perf_counter()
            raw = study.ask(asker, style, mode)
            timing[f"{style}/{mode}"] = time.perf_counter() - t0
            linked = study.fit_link(raw)(raw)
            for v, p in ((Variant(style, mode, False), raw), (Variant(style, mode, True), linked)):
                preds[f"{tag}:{v.name}"] = p
                train_nll[f"{tag}:{v.name}"] = study.nll(p, "train")
    best = min(train_nll, key=train_nll.get)
    best_raw = min((k for k in train_nll if not k.endswith("+link")), key=train_nll.get)
    table = study.evaluate(preds, n_boot=n_boot, seed=seed)
    out_preds = study.predictions_frame({"uniform": study.uniform(), "marginal": study.marginal(), **preds})
    info = {"question": spec.question.name, "K": study.K, "n_train": int(study.split.train.size),
            "n_test": int(study.split.test.size), "chosen_on_train": best, "best_raw_on_train": best_raw,
            "default": f"{tag}:plain/score" if "plain" in styles and "score" in modes else next(iter(preds)),
            "train_nll": train_nll, "ask_seconds": timing,
            "invalid_generations": {f"{st}/{m}": n for (st, m), n in study.invalid.items()}}
    return table, out_preds, info


def gains(table: pd.DataFrame, infos: Sequence[dict]) -> pd.DataFrame:
    """Test TV and score of the default way of asking, the best raw prompt and the full choice (both picked on train)."""
    agg = table[table["archetype"] == "all"].set_index(["question", "method", "metric"])["value"]
    rows = []
    for info in infos:
        q = info["question"]
        row = {"question": q, "default": info["default"], "best_raw_on_train": info["best_raw_on_train"],
               "chosen_on_train": info["chosen_on_train"]}
        for met in ("tv", "score"):
            for key in ("default", "best_raw_on_train", "chosen_on_train"):
                row[f"{met}_{key}"] = float(agg[(q, info[key], met)])
            for base in ("uniform", "marginal"):
                row[f"{met}_{base}"] = float(agg[(q, base, met)])
        row["tv_gain_chosen_vs_default"] = row["tv_default"] - row["tv_chosen_on_train"]
        row["tv_gain_prompt_only"] = row["tv_default"] - row["tv_best_raw_on_train"]
        rows.append(row)
    return pd.DataFrame(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """``lpm fidelity anes96``: the table, predictions, gains and plots under ``--out``."""
    ap = argparse.ArgumentParser(prog="lpm fidelity anes96", description=__doc__.split("\n")[0])
    ap.add_argument("--llm", choices=("rule", "local", "http"), default="rule")
    ap.add_argument("--out", default="out/fidelity_anes96")
    ap.add_argument("--questions", default="selfLR,PID,vote", help="comma-separated subset of selfLR,PID,vote")
    ap.add_argument("--styles", default=",".join(STYLES))
    ap.add_argument("--modes", default="score,generate")
    ap.add_argument("--test-fraction", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--url", default=None, help="OpenAI-compatible server (http), e.g. http://127.0.0.1:8080")
    ap.add_argument("--model", default=None, help="model name on the server (http)")
    ap.add_argument("--chat", action="store_true", help="use /v1/chat/completions (http)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per HTTP request (http)")
    ap.add_argument("--concurrency", type=int, default=4, help="HTTP requests in flight (http)")
    ap.add_argument("--cache", default=None, help="answer cache file (default: OUT/llm_cache.sqlite)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data", default=str(DATA))
    a = ap.parse_args(argv)
    questions = [q for q in a.questions.split(",") if q]
    unknown = [q for q in questions if q not in SPECS]
    if unknown:
        ap.error(f"--questions: unknown {unknown}; expected a subset of {list(SPECS)}")
    styles = [s for s in a.styles.split(",") if s]
    if any(s not in STYLES for s in styles):
        ap.error(f"--styles: expected a subset of {list(STYLES)}, got {styles}")
    modes = [m for m in a.modes.split(",") if m]
    if any(m not in ("score", "generate") for m in modes):
        ap.error(f"--modes: expected a subset of ['score', 'generate'], got {modes}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    backend = _backend(a)
    asker = Asker(backend, cache=AnswerCache(a.cache or out / "llm_cache.sqlite"), max_attempts=3)
    frame = load_anes96(a.data)
    tables, preds, infos = [], [], []
    for q in questions:
        t, p, info = run_question(SPECS[q], frame, asker, styles=styles, modes=modes, test_fraction=a.test_fraction,
                                  seed=a.seed, n_boot=a.n_boot, tag=a.llm)
        tables.append(t)
        preds.append(p)
        infos.append(info)
    table = pd.concat(tables, ignore_index=True)
    table.insert(0, "backend", f"{backend.name}:{backend.model}")
    table.to_csv(out / "fidelity.csv", index=False)
    summary = table[table["archetype"] == "all"].drop(columns=["archetype"])
    summary.to_csv(out / "summary.csv", index=False)
    pd.concat(preds, ignore_index=True).to_csv(out / "predictions.csv", index=False)
    g = gains(table, infos)
    g.to_csv(out / "gains.csv", index=False)
    plot_fidelity(table, out / "fidelity_tv.png", "tv")
    plot_fidelity(table, out / "fidelity_score.png", "score")
    run = {"backend": backend.name, "model": backend.model, "questions": infos, "stats": asker.stats.as_dict()}
    (out / "run.json").write_text(json.dumps(run, indent=2, default=float))
    wide = summary.pivot_table(index=["question", "method"], columns="metric", values="value", sort=False)
    print(wide.round(3).to_string())
    print(g[["question", "chosen_on_train", "tv_default", "tv_chosen_on_train", "tv_marginal", "tv_uniform"]]
          .round(3).to_string(index=False))
    print(f"wrote {out}/fidelity.csv, summary.csv, gains.csv, predictions.csv, fidelity_tv.png "
          f"({asker.stats.calls} backend prompts, {asker.stats.cache_hits} cache hits, "
          f"{asker.stats.seconds:.1f} s in the backend)")
    return 0


def _backend(a: argparse.Namespace) -> Backend:
    if a.llm == "rule":
        return make_backend("rule", rule=anes_rule, version="anes96-1")
    if a.llm == "local":
        return make_backend("local", device=a.device, max_new_tokens=4)
    return make_backend("http", url=a.url, model=a.model, chat=a.chat, max_tokens=4, timeout=a.timeout,
                        concurrency=a.concurrency)


BENCHMARK: Callable[[Sequence[str]], int] = main

if __name__ == "__main__":
    raise SystemExit(main())
