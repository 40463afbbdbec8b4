"""Archetypes, questions, link, survey and the ArchetypeDecision substep (rule backend, no model)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from lpm import Model, Params, Positive, State, StateError, System, tensor_field
from lpm.errors import ConfigError
from llm_archetypes import (
    Archetypes, ArchetypeDecision, AnswerCache, Asker, Bucket, Choice, Link, Number, ParseError,
    Question, RuleBackend, survey,
)
from llm_archetypes.examples import isolation_question, isolation_rule

from conftest import DEVICE  # one source: the device fixture's value

AGE = ("18-29", "30-49", "50-64", "65+")
SEX = ("male", "female")
BORO = ("Bronx", "Brooklyn", "Manhattan", "Queens", "Staten Island")
EMP = ("essential worker", "remote worker", "unemployed")
BOOKS = {"age_band": AGE, "sex": SEX, "borough": BORO, "employment": EMP}


def population(n: int = 2000, seed: int = 0, missing_borough: int | None = 4) -> dict[str, Tensor]:
    """Random coded attributes; one borough left empty so that some archetypes are empty."""
    g = torch.Generator().manual_seed(seed)
    boro = torch.randint(0, len(BORO), (n,), generator=g)
    if missing_borough is not None:
        boro[boro == missing_borough] = 0
    return {
        "age_band": torch.randint(0, len(AGE), (n,), generator=g).to(torch.int8).to(DEVICE),
        "sex": torch.randint(0, len(SEX), (n,), generator=g).to(torch.int8).to(DEVICE),
        "borough": boro.to(torch.int8).to(DEVICE),
        "employment": torch.randint(0, len(EMP), (n,), generator=g).to(torch.int8).to(DEVICE),
    }


def test_archetypes_match_python_grouping() -> None:
    pop = population(500)
    names = list(BOOKS)
    arch = Archetypes.from_attributes(pop, names, codebooks=BOOKS)
    rows = list(zip(*[pop[a].cpu().tolist() for a in names]))
    distinct = sorted(set(rows))
    assert arch.K == len(distinct) < len(AGE) * len(SEX) * len(BORO) * len(EMP)
    assert int(arch.sizes.sum()) == 500 and bool((arch.sizes > 0).all())
    ids = arch.archetype_id.cpu().tolist()
    for i, row in enumerate(rows):  # reference check on a small population
        k = ids[i]
        assert tuple(arch.codes[k].tolist()) == row
        assert arch.labels[k] == {a: BOOKS[a][c] for a, c in zip(names, row)}
    for k, row in enumerate(distinct):
        assert int(arch.sizes[k]) == rows.count(row)
    assert "Staten Island" not in set(arch.to_pandas()["borough"])


def test_bins_and_errors() -> None:
    ages = torch.tensor([3.0, 17.9, 18.0, 40.0, 64.9, 65.0, 90.0], device=DEVICE)
    arch = Archetypes.from_attributes({"age": ages}, ["age"], bins={"age": [18, 65]})
    assert [arch.labels[int(k)]["age"] for k in arch.archetype_id] == [
        "under 18", "under 18", "18 to under 65", "18 to under 65", "18 to under 65", "65 or more", "65 or more"]
    with pytest.raises(ConfigError, match="age.*bins"):
        Archetypes.from_attributes({"age": ages}, ["age"])
    with pytest.raises(ConfigError, match="sex.*code book"):
        Archetypes.from_attributes({"sex": torch.tensor([0, 2])}, ["sex"], codebooks={"sex": SEX})
    with pytest.raises(StateError, match="dimension N"):
        Archetypes.from_attributes({"a": torch.zeros(3, dtype=torch.long), "b": torch.zeros(4, dtype=torch.long)}, ["a", "b"])


def test_broadcast_and_gradient_through_link() -> None:
    pop = population(300)
    arch = Archetypes.from_attributes(pop, list(BOOKS), codebooks=BOOKS)
    scores = torch.linspace(0.05, 0.95, arch.K, device=DEVICE)
    link = Link("logit_affine", low=0.0, high=1.0).to(DEVICE)
    torch.testing.assert_close(link(scores), scores, atol=1e-5, rtol=0)  # identity at init
    with torch.no_grad():
        link.slope.fill_(1.7)
        link.bias.fill_(-0.4)
    per_agent = arch.broadcast(link(scores))
    assert per_agent.shape == (300,)
    expected = torch.stack([link(scores)[int(k)] for k in arch.archetype_id.cpu()])
    torch.testing.assert_close(per_agent.detach(), expected.detach())
    per_agent.mean().backward()
    z = torch.sigmoid(1.7 * torch.logit(scores) - 0.4)[arch.archetype_id.to(DEVICE)]
    torch.testing.assert_close(link.bias.grad, (z * (1 - z)).mean().reshape(1), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(link.slope.grad,
                               (z * (1 - z) * torch.logit(scores)[arch.archetype_id.to(DEVICE)]).mean().reshape(1),
                               rtol=1e-5, atol=1e-7)
    with pytest.raises(StateError, match="leading dimension K"):
        arch.broadcast(torch.zeros(arch.K + 1))


def test_per_archetype_link_and_affine() -> None:
    s = torch.tensor([0.1, 0.5, 0.9])
    link = Link("affine", num=3, low=0.2, high=0.8, slope=1.0, bias=0.0)
    torch.testing.assert_close(link(s), 0.2 + 0.6 * s)
    with pytest.raises(StateError, match="per-archetype"):
        link(torch.zeros(4))


def test_question_parsing_and_buckets() -> None:
    num = Number(0, 100)
    assert num.parse("I'd say 42%.") == 42.0
    with pytest.raises(ParseError, match="outside"):
        num.parse("150")
    with pytest.raises(ParseError, match="no number"):
        num.parse("banana")
    ch = Choice(("yes", "no"))
    assert ch.parse(" Yes, definitely") == "yes" and ch.parse("I think no.") == "no"
    with pytest.raises(ParseError):
        ch.parse("maybe")
    b = Bucket((10, 50), unit="cases per 100k")
    assert [b(x) for x in (0, 10, 49.9, 50, 1e6)] == [
        "under 10 cases per 100k", "10 to under 50 cases per 100k", "10 to under 50 cases per 100k",
        "50 or more cases per 100k", "50 or more cases per 100k"]
    q = Question("q", "Age {age}. Cases {cases}.", num, buckets={"cases": b})
    assert q.render({"age": "65+"}, {"cases": 12.0}) == q.render({"age": "65+"}, {"cases": 47.0})
    with pytest.raises(ConfigError, match="no Bucket"):
        q.render({"age": "65+"}, {"cases": 12.0, "deaths": 3.0})
    with pytest.raises(ConfigError, match="template needs 'age'"):
        q.render({}, {"cases": 1.0})


def test_survey_table_varies_with_age_and_cases() -> None:
    arch = Archetypes.from_attributes(population(1000), list(BOOKS), codebooks=BOOKS)
    asker = Asker(RuleBackend(isolation_rule))
    low = survey(arch, isolation_question(), asker, {"cases": 5.0}, t=0)
    high = survey(arch, isolation_question(), asker, {"cases": 300.0}, t=7)
    assert len(low) == arch.K and asker.stats.calls == 2 * arch.K
    assert {"age_band", "sex", "borough", "employment", "size", "answer", "score", "p_yes", "p_no",
            "context_cases", "status"} <= set(low.columns)
    assert (low["p_yes"] + low["p_no"]).sub(1).abs().max() < 1e-6
    assert (high["score"].values > low["score"].values).all()
    by_age = low.groupby("age_band")["score"].mean()
    assert by_age["65+"] > by_age["18-29"]


@dataclass(frozen=True)
class TownSystem(System):
    """Toy population for the decision substep (attributes: constant during a run)."""

    age_band: Tensor = tensor_field(("N",), torch.int8, "age band code")
    sex: Tensor = tensor_field(("N",), torch.int8, "sex code")
    borough: Tensor = tensor_field(("N",), torch.int8, "borough code")
    employment: Tensor = tensor_field(("N",), torch.int8, "employment code")


@dataclass(frozen=True)
class TownState(State):
    """What the toy town's run changes."""

    cases: Tensor = tensor_field((), torch.float32, "weekly cases per 100k")
    isolation: Tensor = tensor_field(("N",), torch.float32, "P(isolate | symptoms)")
    isolation_score: Tensor = tensor_field(("K",), torch.float32, "raw archetype answers")


def town(asker: Asker, every: int = 7, link: Link | None = None) -> tuple[Model, TownSystem, TownState, ArchetypeDecision]:
    """A model whose case level rises each day and an isolation decision every ``every`` days."""
    pop = population(800)
    arch = Archetypes.from_attributes(pop, list(BOOKS), codebooks=BOOKS)
    decide = ArchetypeDecision("isolation_decision", archetypes=arch, question=isolation_question(), asker=asker,
                               context=lambda y, s, t: {"cases": float(s.cases)}, context_reads=("cases",),
                               target="isolation", store="isolation_score", every=every, link=link)

    class Rise:
        name, reads, writes, params = "rise", ("cases",), ("cases",), ()

        def __call__(self, params: Params, system: TownSystem, state: TownState, t: int, rng: torch.Generator) -> TownState:
            return state.replace(cases=state.cases + 10.0)

    state = TownState(cases=torch.tensor(0.0, device=DEVICE),
                      isolation=torch.zeros(800, device=DEVICE), isolation_score=decide.initial_scores(device=DEVICE))
    model = Model([Rise(), decide], {"isolation": lambda y, s: s.isolation.mean(), "scores": decide.observable()},
                  state_type=TownState, system_type=TownSystem)
    return model, TownSystem(**pop), state, decide


def test_decision_calls_equal_archetypes_times_decisions() -> None:
    asker = Asker(RuleBackend(isolation_rule), mode="off")
    model, system, state, decide = town(asker, every=7)
    res = model.simulate(Params(), system, state, 21, progress=False)
    K = decide.archetypes.K
    assert asker.stats.calls == K * 3 and asker.stats.decisions == 3
    scores = res["scores"]
    assert scores.shape == (21, K)
    # between decisions the answers are kept; they change at decision steps (cases rise into new buckets)
    assert torch.equal(scores[0], scores[6]) and torch.equal(scores[7], scores[13])
    assert not torch.equal(scores[6], scores[7])
    final = res.final_state
    torch.testing.assert_close(final.isolation, final.isolation_score[decide.archetypes.archetype_id.to(DEVICE)])


def test_decision_gradient_reaches_link_params(tmp_path) -> None:
    link = Link("logit_affine", low=0.0, high=0.95)
    params = Params(beta=Positive(0.1))
    params.add_module("isolation_link", link)
    assert any(p is link.bias for p in params.parameters())
    asker = Asker(RuleBackend(isolation_rule), cache=AnswerCache(tmp_path / "c.sqlite"))
    model, system, state, decide = town(asker, every=7, link=link)
    params = params.to(DEVICE)
    res = model.simulate(params, system, state, 10, grad=True, progress=False)
    res["isolation"].sum().backward()
    assert link.bias.grad is not None and float(link.bias.grad.abs().sum()) > 0
    # analytic: d/d bias of mean_i 0.95 * sigmoid(logit(s_k(i)) + b) summed over steps
    sc = res["scores"].detach()
    ids = decide.archetypes.archetype_id.to(DEVICE)
    z = torch.sigmoid(torch.logit(sc.clamp(1e-4, 1 - 1e-4)))[:, ids]
    torch.testing.assert_close(link.bias.grad, (0.95 * z * (1 - z)).mean(1).sum().reshape(1), rtol=1e-4, atol=1e-6)


@dataclass(frozen=True)
class TownSystemWithIds(TownSystem):
    """The toy town with each agent's archetype id held by the system (moved with it)."""

    archetype: Tensor = tensor_field(("N",), torch.int64, "archetype id", default=None)


def test_per_archetype_context_sees_its_own_borough_and_ids_come_from_the_system() -> None:
    """Context as K dicts (cases in each archetype's borough): the answer follows its own borough's level."""
    pop = population(800)
    arch = Archetypes.from_attributes(pop, list(BOOKS), codebooks=BOOKS)
    boro = arch.codes[:, arch.attributes.index("borough")].long().cpu()
    level = torch.tensor([0.0, 5.0, 50.0, 500.0, 5000.0])  # cases per 100k by borough: distinct buckets
    asker = Asker(RuleBackend(isolation_rule), mode="off")
    decide = ArchetypeDecision("isolation_decision", archetypes=arch, question=isolation_question(), asker=asker,
                               context=lambda y, s, t: [{"cases": float(level[b])} for b in boro.tolist()],
                               target="isolation", store="isolation_score", every=7, ids="archetype")
    assert "archetype" in decide.reads
    system = TownSystemWithIds(**pop, archetype=arch.archetype_id.to(DEVICE))
    state = TownState(cases=torch.tensor(0.0, device=DEVICE), isolation=torch.zeros(800, device=DEVICE),
                      isolation_score=decide.initial_scores(device=DEVICE))
    model = Model([decide], {"scores": decide.observable()}, state_type=TownState, system_type=TownSystemWithIds)
    res = model.simulate(Params(), system, state, 1, progress=False)
    scores = res["scores"][0].cpu()
    assert asker.stats.calls == arch.K and asker.stats.decisions == 1
    # the same archetype attributes in two boroughs: the busier borough answers "isolate" more often
    shared = Archetypes.from_attributes(pop, list(BOOKS), codebooks=BOOKS)
    want = torch.tensor([isolation_rule(isolation_question().render(shared.labels[k], {"cases": float(level[b])}))[0]
                         for k, b in enumerate(boro.tolist())])
    torch.testing.assert_close(scores, want)
    assert len(set(boro.tolist())) > 1 and len(set(want.tolist())) > 1
    # agents get their own archetype's answer through the system's ids
    torch.testing.assert_close(res.final_state.isolation, scores.to(DEVICE)[system.archetype])
    # one context per archetype, or one for all: anything else names the count
    bad = ArchetypeDecision("d", archetypes=arch, question=isolation_question(), asker=asker,
                            context=lambda y, s, t: [{"cases": 1.0}] * 3, target="isolation", store="isolation_score")
    with pytest.raises(ConfigError, match=rf"one per archetype \(K={arch.K}\), got 3"):
        bad(Params(), system, state, 0, torch.Generator())
