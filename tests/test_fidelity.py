"""Survey fidelity: metrics on known distributions, bootstrap coverage, split hygiene, the link, ANES end to end."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from llm_archetypes import Asker, Link, RuleBackend
from llm_archetypes.fidelity import (
    Attribute, DistributionLink, FidelitySpec, FidelityStudy, SurveyQuestion, bootstrap_metrics,
    empirical_distribution, fit_link, simbench_score, split_respondents, total_variation, wasserstein_ordinal,
)


def test_total_variation_identical_zero_disjoint_one() -> None:
    p = torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(total_variation(p, p), torch.zeros(2, dtype=torch.float64))
    q = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    assert float(total_variation(p[1:], q)) == pytest.approx(1.0)
    assert float(total_variation(torch.tensor([0.5, 0.5, 0.0]), torch.tensor([0.0, 0.0, 1.0]))) == pytest.approx(1.0)


@pytest.mark.parametrize("k", [0, 1, 2, 4])
def test_wasserstein_point_mass_shift_by_k_is_k(k: int) -> None:
    o = 7
    p = torch.zeros(o, dtype=torch.float64)
    p[1] = 1.0
    q = torch.roll(p, k)
    assert float(wasserstein_ordinal(p, q)) == pytest.approx(k)
    # a whole distribution shifted by k (no mass falls off the scale) also moves by exactly k
    d = torch.tensor([0.5, 0.3, 0.2, 0, 0, 0, 0], dtype=torch.float64)
    assert float(wasserstein_ordinal(d, torch.roll(d, k))) == pytest.approx(k)


def test_metrics_reject_mismatched_options() -> None:
    with pytest.raises(ValueError, match="n_options"):
        total_variation(torch.ones(3) / 3, torch.ones(4) / 4)


def test_simbench_score_anchors() -> None:
    tvu = torch.tensor([0.4])
    assert float(simbench_score(torch.tensor([0.0]), tvu)) == pytest.approx(100.0)
    assert float(simbench_score(tvu, tvu)) == pytest.approx(0.0)
    assert float(simbench_score(torch.tensor([0.8]), tvu)) == pytest.approx(-100.0)


def test_empirical_distribution_counts() -> None:
    ans = torch.tensor([0, 1, 1, 2, 0])
    grp = torch.tensor([0, 0, 1, 1, 1])
    emp = empirical_distribution(ans, grp, 3, 3)
    assert torch.allclose(emp[0], torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))
    assert torch.allclose(emp[1], torch.tensor([1 / 3, 1 / 3, 1 / 3], dtype=torch.float64))
    assert torch.all(emp[2] == 0)  # an archetype without respondents has no distribution


def test_bootstrap_interval_covers_the_population_value() -> None:
    """Over 100 simulated surveys the 90% interval of TV(model, population) covers its true value ~90%."""
    rng = np.random.default_rng(1)
    k, o, n = 4, 5, 400
    truth = torch.tensor(rng.dirichlet(np.ones(o), size=k))                # population distribution per archetype
    model = torch.tensor(rng.dirichlet(np.ones(o), size=k))                # a wrong model, fixed
    size = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    true_tv = float((size * total_variation(model, truth)).sum())
    hits = 0
    reps = 100
    for r in range(reps):
        g = torch.multinomial(size, n, replacement=True, generator=torch.Generator().manual_seed(r))
        u = torch.rand(n, generator=torch.Generator().manual_seed(1000 + r), dtype=torch.float64)
        a = (u.unsqueeze(1) > truth[g].cumsum(1)).sum(1).clamp(max=o - 1)
        est = bootstrap_metrics(model.unsqueeze(0), a, g, n_boot=200, level=0.9, seed=r)["tv"][0]
        hits += int(est[1] <= true_tv <= est[2])
    assert 0.8 <= hits / reps <= 0.99, hits / reps


def test_bootstrap_estimate_of_exact_model_is_small_and_ordered() -> None:
    g = torch.arange(600) % 3
    a = ((torch.arange(600) // 3) % 5).clamp(max=3)          # 0.2, 0.2, 0.2, 0.4 in each group
    emp = empirical_distribution(a, g, 3, 4)
    out = bootstrap_metrics(torch.stack([emp, torch.full_like(emp, 0.25)]), a, g, n_boot=200)
    assert float(out["tv"][0, 0]) == pytest.approx(0.0, abs=1e-12)
    assert float(out["score"][0, 0]) == pytest.approx(100.0)
    assert float(out["score"][1, 0]) == pytest.approx(0.0)
    assert torch.all(out["tv"][:, 1] <= out["tv"][:, 2])


# ------------------------------------------------------------------------- splits, link


def test_split_is_disjoint_and_complete() -> None:
    s = split_respondents(101, 0.3, seed=3)
    assert np.intersect1d(s.train, s.test).size == 0
    assert np.array_equal(np.sort(np.concatenate([s.train, s.test])), np.arange(101))
    assert s.test.size == 30
    assert np.array_equal(split_respondents(101, 0.3, seed=3).test, s.test)   # seeded
    with pytest.raises(ValueError, match="test_fraction"):
        split_respondents(10, 1.0)


def _synthetic_frame(n: int = 600, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 3, n)
    # answers on a 5-point scale centred at 1 + x with noise
    y = np.clip(np.round(1 + x + rng.normal(0, 0.8, n)), 0, 4)
    return pd.DataFrame({"x": x.astype(float), "y": y})


SPEC = FidelitySpec((Attribute("x", "group", (0.5, 1.5), ("low", "mid", "high")),),
                    SurveyQuestion("y", "y", tuple("ABCDE"), (0, 1, 2, 3, 4), "Pick one."))


def _overconfident(prompt) -> list[float]:
    c = {"low": 1, "mid": 2, "high": 3}[prompt.attributes["x"]]
    p = [0.02] * 5
    p[c] = 0.92
    return p


def test_link_fits_on_train_only_and_helps_on_test() -> None:
    frame = _synthetic_frame()
    split = split_respondents(len(frame), 0.4, seed=0)
    study = FidelityStudy(SPEC, frame, split)
    pred = study.ask(Asker(RuleBackend(_overconfident), mode="off"), "plain", "score")
    link = study.fit_link(pred)
    assert float(link.temperature) < 0.9            # the rule is overconfident: the link softens it
    # changing every test answer leaves the fitted link unchanged (no leakage from the test split)
    shuffled = frame.copy()
    shuffled.loc[split.test, "y"] = 4.0
    link2 = FidelityStudy(SPEC, shuffled, split).fit_link(pred)
    assert torch.allclose(link.temperature, link2.temperature) and torch.allclose(link.bias, link2.bias)
    table = study.evaluate({"raw": pred, "raw+link": link(pred)}, n_boot=200)
    agg = table[(table.archetype == "all") & (table.metric == "tv")].set_index("method")["value"]
    assert agg["raw+link"] < min(agg["raw"], agg["uniform"], agg["marginal"])
    assert set(table["n"][table.archetype == "all"]) == {split.test.size}   # scored on test respondents only


def test_marginal_baseline_uses_training_respondents() -> None:
    frame = _synthetic_frame()
    split = split_respondents(len(frame), 0.5, seed=1)
    study = FidelityStudy(SPEC, frame, split)
    train_y = frame["y"].to_numpy()[split.train].astype(int)
    expect = np.bincount(train_y, minlength=5) / train_y.size
    assert np.allclose(study.marginal()[0].numpy(), expect)


def test_distribution_link_identity_and_binary_equals_logit_affine() -> None:
    q = torch.tensor([[0.2, 0.8], [0.6, 0.4], [0.9, 0.1]], dtype=torch.float64)
    link = DistributionLink(2)
    assert torch.allclose(link(q), q)
    with torch.no_grad():
        link.temperature.fill_(1.7)
        link.bias.fill_(-0.3)
    ref = Link("logit_affine", slope=1.7, bias=-0.3, eps=1e-9).double()
    assert torch.allclose(link(q)[:, 1], ref(q[:, 1]), atol=1e-9)


def test_fit_link_recovers_a_known_temperature() -> None:
    torch.manual_seed(0)
    logits = torch.randn(40, 4, dtype=torch.float64) * 2
    q = torch.softmax(logits, -1)
    truth = torch.softmax(0.5 * logits + torch.tensor([0.0, 0.3, -0.2, 0.1], dtype=torch.float64), -1)
    g = torch.arange(40).repeat_interleave(250)
    a = torch.multinomial(truth[g], 1, generator=torch.Generator().manual_seed(0)).squeeze(1)
    link = fit_link(q, a, g)
    assert float(link.temperature) == pytest.approx(0.5, abs=0.06)
    assert torch.allclose(link.bias, torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64), atol=0.12)


def test_bad_input_is_named() -> None:
    frame = _synthetic_frame()
    with pytest.raises(ValueError, match="missing columns"):
        FidelityStudy(SPEC, frame.drop(columns=["y"]), split_respondents(len(frame)))
    bad = frame.copy()
    bad.loc[0, "y"] = 9.0
    with pytest.raises(ValueError, match="'y'.*9.0"):
        FidelityStudy(SPEC, bad, split_respondents(len(frame)))
    with pytest.raises(ValueError, match="cannot also be an attribute"):
        FidelitySpec((Attribute("y", "y", (), ("all",)),), SPEC.question)


# ----------------------------------------------------------------------------- ANES


def test_anes_rule_beats_baselines_on_test_and_assigns_new_respondents() -> None:
    from experiments.anes96_fidelity import SPECS, anes_rule, load_anes96

    frame = load_anes96()
    split = split_respondents(len(frame), 0.3, seed=0)
    study = FidelityStudy(SPECS["vote"], frame, split)
    pred = study.ask(Asker(RuleBackend(anes_rule), mode="off"), "persona", "score")
    table = study.evaluate({"rule": pred}, n_boot=200)
    agg = table[(table.archetype == "all") & (table.metric == "tv")].set_index("method")["value"]
    # the vote follows party: a party rule is far closer than "same answer for all" or uniform
    assert agg["rule"] < 0.15 < 0.3 < agg["marginal"] <= agg["uniform"] + 0.02
    ids = study.assign(frame.iloc[split.test])
    assert torch.equal(ids, study.archetypes.archetype_id[torch.as_tensor(split.test)])
    other = pd.DataFrame({"PID": [0.0, 6.0], "educ": [1.0, 7.0], "vote": [0.0, 1.0]})
    assert (study.assign(other) >= 0).all()


def test_prompt_styles_render_the_attributes() -> None:
    from experiments.anes96_fidelity import SPECS

    spec = SPECS["selfLR"]
    labels = {"PID": "a Republican", "age": "55 or older", "educ": "some college"}
    for style in ("plain", "persona", "backstory"):
        q = spec.prompt_question(style, "score")
        text = str(q.render(labels, {}))
        assert all(v in text for v in labels.values()), style
        assert text.endswith(": ")    # digit options are scored right after a space
    assert "I am 55 or older" in str(spec.prompt_question("backstory", "score").render(labels, {}))
    with pytest.raises(ValueError, match="style"):
        spec.template("tweet")


def test_cli_fidelity_anes96_rule(tmp_path) -> None:
    from lpm.cli import main

    out = tmp_path / "fid"
    rc = main(["fidelity", "anes96", "--llm", "rule", "--questions", "vote", "--styles", "plain",
               "--n-boot", "100", "--out", str(out)])
    assert rc == 0
    for f in ("fidelity.csv", "summary.csv", "gains.csv", "predictions.csv", "fidelity_tv.png"):
        assert (out / f).exists(), f
    s = pd.read_csv(out / "summary.csv")
    assert {"uniform", "marginal", "rule:plain/score", "rule:plain/score+link"} <= set(s["method"])
    assert main(["fidelity", "nope"]) == 2


def test_invalid_generations_become_uniform_rows_and_are_counted() -> None:
    frame = _synthetic_frame(90)
    study = FidelityStudy(SPEC, frame, split_respondents(len(frame), 0.3, seed=0))

    def rule(prompt):
        return "C" if prompt.attributes["x"] == "mid" else "no idea"

    asker = Asker(RuleBackend(rule), mode="off", max_attempts=2)
    pred = study.ask(asker, "plain", "generate")
    mid = study.archetypes.labels.index({"x": "mid"})
    assert pred[mid].tolist() == [0, 0, 1, 0, 0]
    others = [k for k in range(study.K) if k != mid]
    assert torch.allclose(pred[others], torch.full((len(others), 5), 0.2, dtype=torch.float64))
    assert study.invalid[("plain", "generate")] == len(others) == asker.stats.fallbacks
