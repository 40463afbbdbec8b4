"""State dataclasses, code books and constrained parameters."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from lpm.errors import ConfigError, ParamError
from lpm import CodeBook, Fixed, Interval, Params, Positive, Real, State, StateError, splice, tensor_field


@dataclass(frozen=True)
class Toy(State):
    stage: torch.Tensor = tensor_field(("N",), torch.int8, "stage code")
    rate: torch.Tensor = tensor_field(("N",), torch.float32, "per-day rate")
    feats: torch.Tensor = tensor_field(("N", 3), torch.float32, "three features")


def toy(n: int = 5) -> Toy:
    return Toy(torch.zeros(n, dtype=torch.int8), torch.ones(n), torch.zeros(n, 3))


def test_replace_is_new_and_frozen() -> None:
    s = toy()
    s2 = s.replace(rate=torch.full((5,), 2.0))
    assert float(s.rate.sum()) == 5.0 and float(s2.rate.sum()) == 10.0
    with pytest.raises(Exception):
        s.rate = torch.zeros(5)  # type: ignore[misc]


def test_replace_unknown_field_names_it() -> None:
    with pytest.raises(StateError, match="unknown field.*'rte'"):
        toy().replace(rte=torch.zeros(5))


def test_validate_catches_shape_dtype_nan(device: str) -> None:
    s = toy().to(device)
    assert s.validate()["N"] == 5
    with pytest.raises(StateError, match="feats: dimension N should be 5"):
        s.replace(feats=torch.zeros(4, 3, device=device)).validate()
    with pytest.raises(StateError, match="stage: expected dtype int8, got int64"):
        s.replace(stage=torch.zeros(5, dtype=torch.long, device=device)).validate()
    bad = torch.ones(5, device=device)
    bad[2] = float("nan")
    with pytest.raises(StateError, match="rate: expected finite values, found 1 NaN"):
        s.replace(rate=bad).validate()
    with pytest.raises(StateError, match=r"feats: expected 2 dimension\(s\)"):
        s.replace(feats=torch.zeros(5, device=device)).validate()


def test_to_device_and_nbytes(device: str) -> None:
    s = toy(10).to(device)
    assert s.stage.device.type == torch.device(device).type
    assert s.nbytes() == 10 * 1 + 10 * 4 + 30 * 4
    assert "stage code" in s.describe()


def test_codebook_roundtrip() -> None:
    cb = CodeBook("borough", ("BX", "BK", "MN", "QN", "SI"))
    codes = cb.encode(["MN", "SI", "BX"])
    assert codes.dtype == torch.int8 and codes.tolist() == [2, 4, 0]
    assert cb.decode(codes) == ["MN", "SI", "BX"]
    with pytest.raises(ConfigError, match="unknown label 'NJ'"):
        cb.code("NJ")
    with pytest.raises(ConfigError, match="unique"):
        CodeBook("x", ("a", "a"))


def test_params_constraints_roundtrip_and_grad() -> None:
    p = Params(beta=Positive(0.3), frac=Interval(0.25, 0.0, 1.0), shift=Real(-2.0), k=Fixed(3.0),
               vec=Positive([0.1, 0.2, 0.4]))
    assert math.isclose(float(p.beta), 0.3, rel_tol=1e-5)
    assert math.isclose(float(p.frac), 0.25, rel_tol=1e-5)
    assert float(p.shift) == -2.0 and float(p.k) == 3.0
    assert torch.allclose(p.vec, torch.tensor([0.1, 0.2, 0.4]), rtol=1e-5)
    assert set(p.fitted()) == {"beta", "frac", "shift", "vec"}
    # any unconstrained step stays inside the domain; seeded and at most 8 raw units, since past ~17 a
    # float32 sigmoid rounds to exactly 1.0 (a limit of the float format, not of the transform)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for prm in p.parameters():
            prm.add_((torch.randn(prm.shape, generator=g) * 4).clamp(-8, 8))
    assert float(p.beta) > 0 and 0 < float(p.frac) < 1 and bool((p.vec > 0).all())
    p.set(beta=0.5)
    assert math.isclose(float(p.beta), 0.5, rel_tol=1e-5)
    (p.beta * 2).backward()
    assert p.raw("beta").grad is not None and torch.isfinite(p.raw("beta").grad).all()
    assert p.to_dict()["k"]["fitted"] is False


def test_params_bad_values_name_the_parameter() -> None:
    with pytest.raises(ParamError, match=r"parameter beta: expected values in \(0.0, inf\)"):
        Params(beta=Positive(-0.1))
    with pytest.raises(ParamError, match="parameter gamma: expected finite"):
        Params(gamma=Positive(float("nan")))
    with pytest.raises(ParamError, match=r"parameter frac: expected values in \(0.0, 1.0\)"):
        Params(frac=Interval(1.5, 0.0, 1.0))
    p = Params(beta=Positive(0.1))
    with pytest.raises(ParamError, match="parameter betta: unknown"):
        p.set(betta=0.2)
    with pytest.raises(ParamError, match="needs parameter 'gamma'"):
        p.require("gamma", owner="substep 'recovery'")


def test_freeze_holds_a_parameter_and_unfreeze_releases_it() -> None:
    from lpm import ParamsLike

    p = Params(beta=Positive(0.3), ifr=Interval(0.01, 0, 1), gamma=Fixed(0.1))
    assert isinstance(p, ParamsLike)
    assert p.freeze("ifr") is p and p.frozen() == ("ifr",)
    opt = torch.optim.SGD(p.parameters(), lr=0.5)
    (p.beta * 2 + p.ifr * 3).backward()
    opt.step()
    assert float(p.ifr) == pytest.approx(0.01) and float(p.beta) != pytest.approx(0.3)
    p.unfreeze("ifr")
    assert p.frozen() == () and p.raw("ifr").requires_grad
    with pytest.raises(ParamError, match="parameter gamma: Fixed"):
        p.freeze("gamma")
    with pytest.raises(ParamError, match="needs parameter 'nope'"):
        p.freeze("nope")


@dataclass(frozen=True)
class Regional(State):
    stage: torch.Tensor = tensor_field(("N",), torch.int8, "stage code")
    load: torch.Tensor = tensor_field(("N", 2), torch.float32, "per-agent, per-layer load")
    recent: torch.Tensor = tensor_field(("W", "A"), torch.float32, "counts per day and region")
    step: torch.Tensor = tensor_field((), torch.int64, "the step")
    note: torch.Tensor | None = tensor_field(("K",), torch.float32, "per-archetype value", optional=True)


def _regional(k: int, n: int = 6, regions: int = 3) -> Regional:
    return Regional(torch.full((n,), k, dtype=torch.int8), torch.full((n, 2), float(k)),
                    torch.full((4, regions), 10.0 * k), torch.tensor(7))


def test_splice_takes_each_region_from_its_chosen_run() -> None:
    group = torch.tensor([0, 1, 2, 0, 1, 2])
    runs = [_regional(k) for k in range(4)]
    out = splice(runs, torch.tensor([3, 0, 2]), group, "A")
    assert out.stage.tolist() == [3, 0, 2, 3, 0, 2]
    assert out.load[:, 1].tolist() == [3.0, 0.0, 2.0, 3.0, 0.0, 2.0]
    assert out.recent[0].tolist() == [30.0, 0.0, 20.0] and int(out.step) == 7 and out.note is None
    same = splice(runs, torch.tensor([1, 1, 1]), group, "A")  # one run for every region: that run, unchanged
    for name, v in runs[1].items():
        assert v is None or torch.equal(getattr(same, name), v)
    assert runs[0].stage.tolist() == [0] * 6  # the inputs are not written


def test_splice_refuses_runs_that_disagree_outside_the_regions() -> None:
    group = torch.tensor([0, 1, 0, 1, 0, 1])
    a, b = _regional(0, regions=2), _regional(1, regions=2).replace(step=torch.tensor(8))
    with pytest.raises(StateError, match="step"):
        splice([a, b], torch.tensor([0, 1]), group, "A")
    with pytest.raises(StateError, match="recent"):  # without the region symbol, a per-region field must agree
        splice([a, b.replace(step=torch.tensor(7))], torch.tensor([0, 1]), group)
    with pytest.raises(StateError, match="choice"):
        splice([a, a], torch.tensor([0, 2]), group, "A")
    with pytest.raises(StateError, match="group"):
        splice([a, a], torch.tensor([0]), group, "A")
    with pytest.raises(StateError, match="one group id per agent"):
        splice([a, a], torch.tensor([0, 1]), group[:4], "A")
