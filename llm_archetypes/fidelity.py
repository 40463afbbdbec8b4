"""Fidelity: do archetypes answer like the people they stand for?

An archetype's answer stands in for every member, so the behavioural layer is only as good
as the match between an archetype's answer *distribution* and the distribution of answers
its real members gave. This module measures that match on a survey table (one row per
respondent: attribute columns and answer columns)::

    spec = FidelitySpec(attributes=(Attribute("PID", "party", edges=(2.5, 3.5),
                                              labels=("a Democrat", "an independent", "a Republican")),),
                        question=SurveyQuestion("vote", "vote", options=("Clinton", "Dole"), codes=(0, 1),
                                                text="In the 1996 election, who did you vote for?"))
    split = split_respondents(len(frame), test_fraction=0.3, seed=0)      # respondents, not archetypes
    study = FidelityStudy(spec, frame, split)
    pred = study.ask(asker, style="persona", mode="score")          # [K, n_options] per archetype
    link = study.fit_link(pred)                                      # on training respondents only
    table = study.evaluate({"persona": pred, "persona+link": link(pred)})   # test respondents only
    plot_fidelity(table, "fidelity.png")

Metrics, per archetype k with model distribution q_k and the empirical distribution p_k of
its test respondents' answers (options in order, unit spacing):

- total variation ``TV = 1/2 sum_o |q_ko - p_ko|`` in [0, 1] (identical: 0, disjoint: 1);
- Wasserstein-1 for ordinal answers ``W1 = sum_o |Q_ko - P_ko|`` over the cumulative
  distributions, in option steps (a point mass shifted by k options has W1 = k);
- a SimBench-style score ``100 (1 - TV / TV_uniform)``: 100 is a perfect match, 0 is no
  better than answering uniformly at random, negative is worse than uniform.

Aggregates weight archetypes by their number of test respondents (so they measure the
fidelity experienced by an average member); the aggregate score is
``100 (1 - mean TV / mean TV_uniform)`` with both means weighted the same way.
Intervals: a basic (reverse-percentile) bootstrap over test respondents (resampled with
replacement, model answers held fixed), so they show the survey's sampling noise, not the
model's. Distances from a finite sample are biased upward (a perfect model still scores
TV > 0 on a small group), so the interval, which targets the distance to the population
distribution, can lie below the sample estimate; compare methods on the same respondents,
as the table does.

Baselines, computed by the same code: ``uniform`` (every option equally likely) and
``marginal`` (every archetype answers the *training* respondents' overall distribution:
"the same answer for all", which ignores every attribute).

Raising fidelity (each measured on held-out respondents, never on those used to tune):
prompt styles (``plain`` attribute list, second-person ``persona``, first-person
``backstory`` built from the attributes), option scoring from the model's next-token
probabilities versus one greedy generation (a one-hot distribution), and a learnable
:class:`DistributionLink` (temperature and per-option bias on the model's log-probabilities)
fitted by maximum likelihood on the training respondents.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from llm_archetypes.archetypes import Archetypes
from llm_archetypes.asking import Asker
from llm_archetypes.questions import Choice, Distribution, Question

__all__ = [
    "Attribute", "SurveyQuestion", "FidelitySpec", "Split", "split_respondents", "total_variation",
    "wasserstein_ordinal", "simbench_score", "empirical_distribution", "bootstrap_metrics",
    "DistributionLink", "fit_link", "FidelityStudy", "STYLES", "plot_fidelity",
]

#: Prompt styles: an attribute list, a second-person persona, a first-person backstory.
STYLES = ("plain", "persona", "backstory")


@dataclass(frozen=True)
class Attribute:
    """A respondent column cut into archetype labels.

    ``edges`` cut the (numeric) column with right-closed bins (value >= edge goes up), giving
    ``len(edges) + 1`` labels. ``title`` names it in a plain list ("party: a Democrat");
    ``you`` and ``me`` are second- and first-person sentences with ``{}`` for the label
    ("You are {}." / "I am {}.").
    """

    column: str
    title: str
    edges: tuple[float, ...]
    labels: tuple[str, ...]
    you: str = "You are {}."
    me: str = "I am {}."

    def __post_init__(self) -> None:
        object.__setattr__(self, "edges", tuple(float(e) for e in self.edges))
        object.__setattr__(self, "labels", tuple(self.labels))
        if len(self.labels) != len(self.edges) + 1:
            raise ValueError(f"Attribute {self.column!r}: expected {len(self.edges) + 1} labels for "
                             f"{len(self.edges)} edges, got {len(self.labels)}")


@dataclass(frozen=True)
class SurveyQuestion:
    """A survey item: its column, the options shown to the model, the column's code for each option.

    ``text`` is the question as asked (second person; the scale legend belongs in it);
    ``ordinal`` says whether the options are ordered (Wasserstein is reported only then).
    """

    name: str
    column: str
    options: tuple[str, ...]
    codes: tuple[float, ...]
    text: str
    ordinal: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", tuple(str(o) for o in self.options))
        object.__setattr__(self, "codes", tuple(float(c) for c in self.codes))
        if len(self.options) < 2 or len(set(self.options)) != len(self.options):
            raise ValueError(f"SurveyQuestion {self.name!r}: expected >= 2 distinct options, got {self.options}")
        if len(self.codes) != len(self.options) or len(set(self.codes)) != len(self.codes):
            raise ValueError(f"SurveyQuestion {self.name!r}: expected one distinct code per option "
                             f"({len(self.options)}), got {self.codes}")


@dataclass(frozen=True)
class FidelitySpec:
    """Which attributes define the archetypes, which question they answer, and who is asked (``setting``).

    ``setting`` completes "A ..." / "You are a ..." (e.g. "survey respondent in the United
    States in 1996"), so the place and time live in the study, not in this module.
    """

    attributes: tuple[Attribute, ...]
    question: SurveyQuestion
    setting: str = "survey respondent"

    def __post_init__(self) -> None:
        cols = [a.column for a in self.attributes]
        if not cols:
            raise ValueError("FidelitySpec: expected at least one attribute")
        if self.question.column in cols:
            raise ValueError(f"FidelitySpec: the answer column {self.question.column!r} cannot also be an attribute")

    def template(self, style: str) -> str:
        """``str.format`` template of the prompt in ``style`` (attribute columns as placeholders)."""
        q = self.question.text
        if style == "plain":
            lines = "\n".join(f"- {a.title}: {{{a.column}}}" for a in self.attributes)
            return f"A {self.setting}.\n{lines}\nQuestion: {q}"
        if style == "persona":
            you = " ".join(a.you.format("{" + a.column + "}") for a in self.attributes)
            return f"You are a {self.setting}. {you}\nQuestion: {q}"
        if style == "backstory":
            me = " ".join(a.me.format("{" + a.column + "}") for a in self.attributes)
            return f"Interviewer: Please tell me a little about yourself.\nMe: {me}\nInterviewer: {q}"
        raise ValueError(f"style: expected one of {STYLES}, got {style!r}")

    def prompt_question(self, style: str, mode: str) -> Question:
        """The :class:`Question` asked in ``style``: a distribution (``mode='score'``) or a choice (``'generate'``)."""
        if mode not in ("score", "generate"):
            raise ValueError(f"mode: expected 'score' or 'generate', got {mode!r}")
        opts = self.question.options
        answer = Distribution(opts) if mode == "score" else Choice(opts)
        # The backstory ends in the respondent's own voice, with no instruction line. Digit
        # options follow a space, as in running text ("Answer: 3"): sentencepiece vocabularies
        # split " 3" into a space token and the digit, so the digit must be the next token.
        cue = "Me (one option only):" if style == "backstory" else "Answer:"
        if self.digit_options:
            cue += " "
        return Question(f"{self.question.name}:{style}", self.template(style), answer, cue=cue,
                        instruct=style != "backstory")

    @property
    def digit_options(self) -> bool:
        """Whether every option is a digit string (scored right after a space, see :meth:`prompt_question`)."""
        return all(o.isdigit() for o in self.question.options)


@dataclass(frozen=True)
class Split:
    """Disjoint respondent index sets: ``train`` (to tune prompts and fit links) and ``test`` (to score)."""

    train: np.ndarray
    test: np.ndarray

    def __post_init__(self) -> None:
        if np.intersect1d(self.train, self.test).size:
            raise ValueError("Split: train and test respondents overlap")


def split_respondents(n: int, test_fraction: float = 0.3, seed: int = 0) -> Split:
    """A seeded random split of ``n`` respondents into train and test (sorted index arrays)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction: expected a value in (0, 1), got {test_fraction}")
    if n < 2:
        raise ValueError(f"n: expected at least 2 respondents, got {n}")
    perm = np.random.default_rng(seed).permutation(n)
    n_test = min(n - 1, max(1, round(test_fraction * n)))
    return Split(np.sort(perm[n_test:]), np.sort(perm[:n_test]))


# --------------------------------------------------------------------------- metrics


def _check_dists(p: Tensor, q: Tensor) -> None:
    try:
        torch.broadcast_shapes(p.shape, q.shape)
        ok = p.dim() >= 1 and q.dim() >= 1 and p.shape[-1] == q.shape[-1]
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"distributions: expected broadcastable shapes [..., n_options], got {tuple(p.shape)} "
                         f"and {tuple(q.shape)}")


def total_variation(p: Tensor, q: Tensor) -> Tensor:
    """Total variation ``1/2 sum |p - q|`` over the last dimension (0 identical, 1 disjoint)."""
    _check_dists(p, q)
    return 0.5 * (p - q).abs().sum(-1)


def wasserstein_ordinal(p: Tensor, q: Tensor) -> Tensor:
    """Wasserstein-1 between distributions over ordered options with unit spacing (in option steps)."""
    _check_dists(p, q)
    return (p.cumsum(-1) - q.cumsum(-1)).abs().sum(-1)


def simbench_score(tv_model: Tensor, tv_uniform: Tensor) -> Tensor:
    """``100 (1 - TV_model / TV_uniform)``: 100 perfect, 0 as good as uniform, negative worse."""
    return 100.0 * (1.0 - tv_model / tv_uniform.clamp_min(1e-12))


def empirical_distribution(answers: Tensor, group: Tensor, n_groups: int, n_options: int) -> Tensor:
    """Per-group answer distribution ``[G, O]`` (float64) and counts from answer codes ``[n]`` in [0, O)."""
    counts = torch.zeros(n_groups * n_options, dtype=torch.float64, device=answers.device)
    counts.index_add_(0, group.long() * n_options + answers.long(),
                      torch.ones_like(answers, dtype=torch.float64))
    counts = counts.view(n_groups, n_options)
    return counts / counts.sum(-1, keepdim=True).clamp_min(1.0)


def _weighted_metrics(pred: Tensor, counts: Tensor) -> dict[str, Tensor]:
    """Weighted mean TV, W1, TV of uniform, score; ``pred [M, K, O]``, ``counts [..., K, O]`` -> ``[..., M]``."""
    n_k = counts.sum(-1)                                           # [..., K]
    emp = counts / n_k.unsqueeze(-1).clamp_min(1.0)
    w = n_k / n_k.sum(-1, keepdim=True).clamp_min(1.0)             # [..., K]
    e = emp.unsqueeze(-3)                                          # [..., 1, K, O]
    tv = 0.5 * (pred - e).abs().sum(-1)                            # [..., M, K]
    w1 = (pred.cumsum(-1) - e.cumsum(-1)).abs().sum(-1)
    uni = torch.full_like(emp, 1.0 / emp.shape[-1])
    tv_u = 0.5 * (uni - emp).abs().sum(-1)                         # [..., K]
    wm = w.unsqueeze(-2)
    tv_bar = (wm * tv).sum(-1)
    tvu_bar = (w * tv_u).sum(-1).unsqueeze(-1)
    return {"tv": tv_bar, "wasserstein": (wm * w1).sum(-1), "score": simbench_score(tv_bar, tvu_bar)}


def bootstrap_metrics(pred: Tensor, answers: Tensor, group: Tensor, *, n_boot: int = 1000, level: float = 0.9,
                      seed: int = 0) -> dict[str, Tensor]:
    """Weighted TV, W1 and score of each model ``pred [M, K, O]`` against respondents, with bootstrap intervals.

    ``answers [n]`` are option indices and ``group [n]`` archetype ids of the scored
    respondents; respondents are resampled ``n_boot`` times with replacement (one batched
    ``bincount``), model answers held fixed. Returns ``{metric: [M, 3]}`` (estimate, lower, upper).
    """
    if pred.dim() != 3:
        raise ValueError(f"pred: expected [M, K, O], got shape {tuple(pred.shape)}")
    m, k, o = pred.shape
    n = int(answers.shape[0])
    if n == 0 or group.shape != answers.shape:
        raise ValueError(f"answers/group: expected equal non-empty shapes [n], got {tuple(answers.shape)} "
                         f"and {tuple(group.shape)}")
    if int(answers.min()) < 0 or int(answers.max()) >= o or int(group.min()) < 0 or int(group.max()) >= k:
        raise ValueError(f"answers must lie in [0, {o}) and group in [0, {k})")
    pred = pred.to(torch.float64)
    cell = group.long() * o + answers.long()                       # [n]
    full = torch.bincount(cell, minlength=k * o).view(k, o).to(torch.float64)
    est = _weighted_metrics(pred, full)
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randint(0, n, (n_boot, n), generator=g)
    flat = (torch.arange(n_boot).unsqueeze(1) * (k * o) + cell.cpu()[idx]).reshape(-1)
    boot = torch.bincount(flat, minlength=n_boot * k * o).view(n_boot, k, o).to(torch.float64)
    bm = _weighted_metrics(pred.cpu(), boot)                       # {metric: [B, M]}
    a = (1.0 - level) / 2.0
    out = {}
    for name, v in est.items():
        qs = torch.quantile(bm[name], torch.tensor([a, 1.0 - a], dtype=torch.float64), dim=0)  # [2, M]
        v = v.cpu()
        # Basic (reverse-percentile) interval: resampled TV is biased upward like the estimate itself,
        # so reflecting the bootstrap quantiles about the estimate cancels that shift.
        lo, hi = 2 * v - qs[1], 2 * v - qs[0]
        if name != "score":  # distances are non-negative (a perfect model's interval is [0, 0])
            lo, hi = lo.clamp_min(0.0), hi.clamp_min(0.0)
        else:
            lo, hi = lo.clamp_max(100.0), hi.clamp_max(100.0)
        out[name] = torch.stack([v, lo, hi], dim=-1)
    return out


# ------------------------------------------------------------------------------ link


class DistributionLink(nn.Module):
    """Learnable map of a model's answer distribution: ``softmax(temperature * log q + bias)``.

    One temperature and one bias per option (the first bias fixed at 0), shared by all
    archetypes of a question, so it corrects the model's systematic over- or under-confidence
    and its leaning towards some options without memorising archetypes. With two options it
    is the ``logit_affine`` :class:`~llm_archetypes.link.Link` on P(second option). With
    temperature 0 it returns the same distribution for every archetype (the marginal baseline
    is one point of its family), with temperature 1 and bias 0 the identity.
    """

    def __init__(self, n_options: int, eps: float = 1e-6) -> None:
        super().__init__()
        if n_options < 2:
            raise ValueError(f"n_options: expected >= 2, got {n_options}")
        self.eps = float(eps)
        self.temperature = nn.Parameter(torch.ones((), dtype=torch.float64))
        self.bias = nn.Parameter(torch.zeros(n_options - 1, dtype=torch.float64))

    def forward(self, q: Tensor) -> Tensor:
        """Corrected distributions ``[K, O]`` from model distributions ``[K, O]``."""
        if q.dim() != 2 or q.shape[1] != self.bias.shape[0] + 1:
            raise ValueError(f"DistributionLink: expected [K, {self.bias.shape[0] + 1}] distributions, "
                             f"got shape {tuple(q.shape)}")
        logq = torch.log(q.to(torch.float64).clamp_min(self.eps))
        b = torch.cat([self.bias.new_zeros(1), self.bias])
        return torch.softmax(self.temperature * logq + b, dim=-1)


def fit_link(pred: Tensor, answers: Tensor, group: Tensor, *, steps: int = 200) -> DistributionLink:
    """Fit a :class:`DistributionLink` by maximum likelihood of the given (training) respondents' answers."""
    if answers.numel() == 0:
        raise ValueError("fit_link: expected at least one training respondent")
    link = DistributionLink(pred.shape[1])
    opt = torch.optim.LBFGS(link.parameters(), lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")
    q = pred.detach().to(torch.float64)
    a, g = answers.long(), group.long()

    def closure() -> Tensor:
        opt.zero_grad()
        nll = -torch.log(link(q)[g, a].clamp_min(1e-12)).mean()
        nll.backward()
        return nll

    opt.step(closure)
    return link.requires_grad_(False)


# ----------------------------------------------------------------------------- study


@dataclass
class FidelityStudy:
    """Archetypes of a survey table under a :class:`FidelitySpec`, a respondent split, asking and scoring."""

    spec: FidelitySpec
    frame: pd.DataFrame
    split: Split
    archetypes: Archetypes = field(init=False)
    answers: Tensor = field(init=False)
    invalid: dict[tuple[str, str], int] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        q = self.spec.question
        need = [a.column for a in self.spec.attributes] + [q.column]
        missing = [c for c in need if c not in self.frame.columns]
        if missing:
            raise ValueError(f"survey table: missing columns {missing}; has {list(self.frame.columns)}")
        n = len(self.frame)
        for name, idx in (("train", self.split.train), ("test", self.split.test)):
            if idx.size and (idx.min() < 0 or idx.max() >= n):
                raise ValueError(f"split.{name}: indices must lie in [0, {n})")
        self.answers = self.encode_answers(self.frame)
        self.archetypes = self._archetypes(self.frame)

    def encode_answers(self, frame: pd.DataFrame) -> Tensor:
        """Option index ``[n]`` of each respondent's answer (an unknown code is an error naming it)."""
        q = self.spec.question
        col = frame[q.column].to_numpy(dtype=float)
        codes = np.asarray(q.codes)
        hit = col[:, None] == codes[None, :]
        bad = ~hit.any(1)
        if bad.any():
            raise ValueError(f"column {q.column!r}: values {sorted(set(col[bad].tolist()))[:5]} are not among "
                             f"the option codes {list(q.codes)}")
        return torch.from_numpy(hit.argmax(1)).long()

    def _archetypes(self, frame: pd.DataFrame) -> Archetypes:
        cols = {a.column: torch.tensor(frame[a.column].to_numpy(dtype=float)) for a in self.spec.attributes}
        return Archetypes.from_attributes(cols, list(cols), codebooks={a.column: a.labels for a in self.spec.attributes},
                                          bins={a.column: a.edges for a in self.spec.attributes})

    def assign(self, frame: pd.DataFrame) -> Tensor:
        """Archetype id ``[n]`` of each respondent of any table with the attribute columns (-1: no such archetype)."""
        codes = []
        for a in self.spec.attributes:
            if a.column not in frame.columns:
                raise ValueError(f"table: missing attribute column {a.column!r}")
            v = torch.tensor(frame[a.column].to_numpy(dtype=float))
            codes.append(torch.bucketize(v, torch.tensor(a.edges, dtype=torch.float64), right=True))
        stacked = torch.stack(codes, 1)                                  # [n, A]
        match = (stacked[:, None, :] == self.archetypes.codes.cpu()[None, :, :]).all(-1)   # [n, K]
        return torch.where(match.any(1), match.long().argmax(1), torch.full((len(frame),), -1))

    @property
    def K(self) -> int:
        """Number of archetypes (non-empty among all respondents)."""
        return self.archetypes.K

    def ask(self, asker: Asker, style: str = "plain", mode: str = "score") -> Tensor:
        """Model answer distribution ``[K, O]`` per archetype (generation gives one-hot rows).

        A generated answer that stays invalid after the asker's corrective retries gives a
        uniform row (the model expressed no choice); how many did is counted in
        ``self.invalid[(style, mode)]`` and in ``asker.stats.fallbacks``, never hidden.
        """
        question = self.spec.prompt_question(style, mode)
        opts = self.spec.question.options
        backend = asker.backend
        old = getattr(backend, "option_prefix", None)
        if old is not None:  # local models score the option's first token: no leading space after "Answer: "
            backend.option_prefix = "" if self.spec.digit_options else " "
        # Generation may never produce a valid option: ask through a twin asker whose explicit,
        # counted fallback marks those archetypes, then give them a uniform row below.
        use = asker
        if mode == "generate" and asker.fallback is None:
            use = Asker(backend, cache=asker.cache, mode=asker.mode, max_attempts=asker.max_attempts,
                        fallback=opts[0], max_calls=asker.max_calls, max_tokens=asker.max_tokens)
            use.stats = asker.stats
        try:
            ans = use.ask_archetypes(self.archetypes, question, {})
        finally:
            if old is not None:
                backend.option_prefix = old
        if mode == "score":
            self.invalid[(style, mode)] = 0
            return ans.probs.to(torch.float64)
        idx = torch.tensor([opts.index(v) for v in ans.values])
        rows = nn.functional.one_hot(idx, len(opts)).to(torch.float64)
        bad = torch.tensor([st == "fallback" for st in ans.status])
        self.invalid[(style, mode)] = int(bad.sum())
        rows[bad] = 1.0 / len(opts)
        return rows

    def _part(self, which: str) -> tuple[Tensor, Tensor]:
        idx = torch.as_tensor(getattr(self.split, which)).long()
        return self.answers[idx], self.archetypes.archetype_id[idx]

    def marginal(self) -> Tensor:
        """The training respondents' overall answer distribution, for every archetype ``[K, O]``."""
        a, _ = self._part("train")
        m = torch.bincount(a, minlength=len(self.spec.question.options)).to(torch.float64)
        return (m / m.sum()).expand(self.K, -1).clone()

    def uniform(self) -> Tensor:
        """Every option equally likely ``[K, O]``."""
        o = len(self.spec.question.options)
        return torch.full((self.K, o), 1.0 / o, dtype=torch.float64)

    def fit_link(self, pred: Tensor) -> DistributionLink:
        """A :class:`DistributionLink` for ``pred`` fitted on the training respondents only."""
        a, g = self._part("train")
        return fit_link(pred, a, g)

    def nll(self, pred: Tensor, which: str = "train") -> float:
        """Mean negative log-likelihood of the ``which`` respondents' answers under ``pred`` (for tuning)."""
        a, g = self._part(which)
        return float(-torch.log(pred.to(torch.float64)[g, a].clamp_min(1e-6)).mean())

    def evaluate(self, predictions: Mapping[str, Tensor], *, which: str = "test", n_boot: int = 1000,
                 level: float = 0.9, seed: int = 0, baselines: bool = True) -> pd.DataFrame:
        """Tidy table of fidelity on the ``which`` respondents (default: the held-out test split).

        One row per (method, archetype or ``all``, metric): ``value`` and, for ``all``, the
        bootstrap ``lower``/``upper``. Adds the ``uniform`` and ``marginal`` baselines.
        """
        preds = dict(predictions)
        if baselines:
            preds = {"uniform": self.uniform(), "marginal": self.marginal(), **preds}
        for name, p in preds.items():
            if tuple(p.shape) != (self.K, len(self.spec.question.options)):
                raise ValueError(f"prediction {name!r}: expected shape ({self.K}, "
                                 f"{len(self.spec.question.options)}), got {tuple(p.shape)}")
        names = list(preds)
        stack = torch.stack([preds[n].detach().to(torch.float64).cpu() for n in names])   # [M, K, O]
        a, g = self._part(which)
        agg = bootstrap_metrics(stack, a, g, n_boot=n_boot, level=level, seed=seed)
        metrics = ["tv", "wasserstein", "score"] if self.spec.question.ordinal else ["tv", "score"]
        rows: list[dict[str, Any]] = []
        q = self.spec.question
        for i, name in enumerate(names):
            for met in metrics:
                est, lo, hi = (float(x) for x in agg[met][i])
                rows.append(dict(question=q.name, method=name, archetype="all", n=int(a.numel()), metric=met,
                                 value=est, lower=lo, upper=hi))
        emp = empirical_distribution(a, g, self.K, len(q.options))
        n_k = torch.bincount(g, minlength=self.K)
        tv = total_variation(stack, emp.unsqueeze(0))                 # [M, K]
        tvu = total_variation(self.uniform(), emp)
        per = {"tv": tv, "wasserstein": wasserstein_ordinal(stack, emp.unsqueeze(0)),
               "score": simbench_score(tv, tvu.unsqueeze(0))}
        labels = [" / ".join(d.values()) for d in self.archetypes.labels]
        for i, name in enumerate(names):
            for k in range(self.K):
                if int(n_k[k]) == 0:
                    continue
                for met in metrics:
                    rows.append(dict(question=q.name, method=name, archetype=labels[k], n=int(n_k[k]), metric=met,
                                     value=float(per[met][i, k]), lower=np.nan, upper=np.nan))
        return pd.DataFrame(rows)

    def predictions_frame(self, predictions: Mapping[str, Tensor]) -> pd.DataFrame:
        """Each archetype's attribute bins and predicted distribution per method (to score any other respondents)."""
        base = self.archetypes.to_pandas().rename(columns={"size": "n_respondents"})
        rows = []
        for name, p in predictions.items():
            df = base.copy()
            df.insert(0, "method", name)
            df.insert(0, "question", self.spec.question.name)
            for j, o in enumerate(self.spec.question.options):
                df[f"p_{o}"] = p[:, j].detach().cpu().numpy()
            rows.append(df)
        return pd.concat(rows, ignore_index=True)


def plot_fidelity(table: pd.DataFrame, path: str | Path, metric: str = "tv") -> Path:
    """Bar chart of the aggregate ``metric`` per method with its bootstrap interval, one panel per question."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = table[(table["archetype"] == "all") & (table["metric"] == metric)]
    if agg.empty:
        raise ValueError(f"plot_fidelity: no aggregate rows for metric {metric!r}")
    questions = list(dict.fromkeys(agg["question"]))
    fig, axes = plt.subplots(1, len(questions), figsize=(4.2 * len(questions), 0.35 * agg["method"].nunique() + 1.8),
                             squeeze=False)
    for ax, qn in zip(axes[0], questions):
        d = agg[agg["question"] == qn]
        y = np.arange(len(d))
        colors = ["0.6" if m in ("uniform", "marginal") else "C0" for m in d["method"]]
        err = np.stack([(d["value"] - d["lower"]).clip(lower=0), (d["upper"] - d["value"]).clip(lower=0)])
        ax.barh(y, d["value"], xerr=err, color=colors, capsize=2)
        ax.set_yticks(y, d["method"], fontsize=7)
        ax.invert_yaxis()
        ax.set_title(qn, fontsize=9)
        ax.set_xlabel({"tv": "total variation (lower is better)", "wasserstein": "Wasserstein-1 (option steps)",
                       "score": "SimBench-style score (higher is better)"}.get(metric, metric), fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
