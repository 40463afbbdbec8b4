"""Benchmark suite smoke tests: tiny N, no timed assertions.

The reference kernels are checked on a case with an exact answer (a ring where infection
surely crosses every edge and everybody recovers after one day); the engine's compact
kernels against a dense evaluation; the suite's record and report on a tiny run; and
``gpu_check.sh --device cpu --quick`` end to end in a temporary folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import reference as ref
from benchmarks.cases import SavedBytes, main as case_main
from benchmarks.run import markdown, summarize
from lpm import Network
from lpm.kernels import frontier_edges, mark_indices, push_compact, stage_mask

from conftest import DEVICE  # one source: the device fixture's value
REPO = Path(__file__).resolve().parent.parent


def ring(n: int) -> tuple[np.ndarray, np.ndarray, torch.Tensor, torch.Tensor]:
    """CSR (rowptr, col) and edge list of an undirected ring."""
    i = torch.arange(n)
    ei = torch.cat([torch.stack([i, (i + 1) % n]), torch.stack([i, (i - 1) % n])], 1)
    net = Network.from_layers({"ring": ei}, n, coalesce=False)
    return net.rowptr.numpy(), net.edge_index[1].numpy(), net.edge_index[0], net.edge_index[1]


@pytest.mark.parametrize("kernel", ["torch", "numpy", "numba"])
def test_reference_kernels_exact_on_ring(kernel: str) -> None:
    """Certain transmission (p_edge = 1) and recovery after one day: the front moves one hop a day."""
    n, days = 50, 7
    rowptr, col, src, dst = ring(n)
    state0 = np.zeros(n, dtype=np.uint8)
    state0[0] = 1
    beta = 80.0  # 1 - exp(-80) == 1.0 in float32 and float64
    if kernel == "torch":
        _, r, ever = ref.torch_scatter_sir(src.to(DEVICE), dst.to(DEVICE), state0, beta, 1.0, days)
    elif kernel == "numpy":
        _, r, ever = ref.numpy_frontier_sir(rowptr, col, state0, beta, 1.0, days)
    else:
        if not ref.numba_available():
            pytest.skip("numba not installed (bench extra)")
        _, r, ever = ref.numba_csr_sir(rowptr, col, state0, beta, 1.0, days, threads=1)
    # day d infects the two agents at distance d and recovers those at distance d - 1
    assert r == 2 * days - 1 and ever == 2 * days + 1


def test_compact_push_matches_dense() -> None:
    """Frontier push (layer scales, per-layer values) equals a dense edge-by-edge sum."""
    g = torch.Generator().manual_seed(0)
    n = 200
    a = torch.randint(0, n, (2, 900), generator=g)
    b = torch.randint(0, n, (2, 500), generator=g)
    net = Network.from_layers({"a": (a, torch.rand(900, generator=g)), "b": b}, n, coalesce=False).to(DEVICE)
    active = (torch.rand(n, generator=g) < 0.3).to(DEVICE)
    value = torch.rand(n, 2, generator=g).to(DEVICE)
    scale = torch.tensor([0.5, 3.0], device=DEVICE)
    src, tgt, lay = net.edge_index[0].long(), net.edge_index[1].long(), net.layer.long()
    contrib = net.weight * scale[lay] * value[src, lay] * active[src]
    dense = torch.zeros(n, device=DEVICE).index_add(0, tgt, contrib)
    assert torch.allclose(net.push(value, active=active, layer_scale=scale), dense, atol=1e-5)
    idx = active.nonzero().squeeze(1)
    force, targets = push_compact(net.edge_index[1], net.weight, net.layer, net.rowptr, n, idx, value[idx], scale)
    assert torch.allclose(force, dense, atol=1e-5)
    expected_targets = torch.zeros(n, dtype=torch.bool, device=DEVICE)
    expected_targets[tgt[active[src]]] = True
    assert torch.equal(mark_indices(targets, n), expected_targets)
    pos, local = frontier_edges(net.rowptr, idx)
    assert torch.equal(net.edge_index[0, pos].long(), idx[local.long()])


def test_stage_mask() -> None:
    """Membership in a set of stage codes, including the empty set."""
    stage = torch.tensor([0, 1, 2, 3, 1], dtype=torch.int8, device=DEVICE)
    assert stage_mask(stage, [1, 3]).tolist() == [False, True, False, True, True]
    assert not stage_mask(stage, []).any()


def test_saved_bytes_counts_distinct_storages() -> None:
    """The retained-bytes probe sees what autograd saves, each storage once."""
    x = torch.rand(1000, requires_grad=True)
    probe = SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(probe.pack, probe.unpack):
        y = (x * x).sum()  # saves x twice: one storage
    y.backward()
    assert probe.total == 1000 * 4


def test_seir_case_record(capsys: pytest.CaptureFixture[str]) -> None:
    """One tiny case in-process: speeds, retained bytes, sizes and reference kernels are recorded."""
    case_main(["seir", "--n", "2000", "--days", "4", "--repeats", "1", "--device", DEVICE, "--threads", "1"])
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "error" not in rec, rec.get("traceback")
    s = rec["seir"]
    assert s["forward_agent_days_per_s"] > 0 and s["grad_agent_days_per_s"] > 0 and s["grad_finite"]
    assert 0 < s["retained_bytes_per_agent_day"] < 1000
    assert s["state_bytes_per_agent"] == 8.0  # int8 stage + int16 timer + float32 carrier + int8 entered
    assert s["bytes_per_edge"] == 13.0  # two int32 ids + float32 weight + int8 layer
    assert {"torch_scatter", "numpy_frontier", "numba_csr"} <= set(rec["reference"])
    rows = summarize([rec])["rows"]
    assert rows[0]["ratio_torch_scatter"] == pytest.approx(rec["sir"]["forward_agent_days_per_s"] / rec["reference"]["torch_scatter"]["agent_days_per_s"])
    assert "| seir | 2e+03 |" in markdown({"cpu_count": 1}, summarize([rec]), [rec])


def test_sir_case_record_and_table(capsys: pytest.CaptureFixture[str]) -> None:
    """The shared-workload case in-process: engine paths, references, attack rates, ratios and the table."""
    case_main(["sir", "--n", "3000", "--days", "30", "--repeats", "1", "--device", DEVICE, "--threads", "1"])
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "error" not in rec, rec.get("traceback")
    eng, refs = rec["engine"], rec["reference"]
    assert {"lpm_forward", "lpm_differentiable"} <= set(eng) and eng["lpm_differentiable"]["grad_finite"]
    assert {"numba_csr", "numpy_frontier", "torch_scatter"} <= set(refs)
    # every path of the engine simulates the same trajectory (same seed, same counter-based draws)
    rates = {k: v["attack_rate"] for k, v in eng.items()}
    assert len(set(rates.values())) == 1 and 0.3 < rates["lpm_forward"] <= 1
    assert set(rec["equal_work"]["attack_rates"]) == set(eng) | {k for k, v in refs.items() if "attack_rate" in v}
    rows = summarize([rec])["sir_rows"]
    fwd = next(r for r in rows if r["engine"] == "lpm_forward")
    assert fwd["x_numba_csr"] == pytest.approx(eng["lpm_forward"]["agent_days_per_s"] / refs["numba_csr"]["agent_days_per_s"])
    assert "| lpm_forward | 3e+03 |" in markdown({"cpu_count": 1}, summarize([rec]), [rec])


def test_target_checks() -> None:
    """Targets are judged from the shared-workload rows: met and missed both reported."""
    rec = {"case": "sir", "n": 10**6, "days": 50, "equal_work": {"ok": True},
           "engine": {"lpm_forward": {"agent_days_per_s": 6e7, "attack_rate": 0.84},
                      "lpm_differentiable": {"agent_days_per_s": 5e6, "attack_rate": 0.84}},
           "reference": {"numba_csr": {"agent_days_per_s": 5e7, "attack_rate": 0.84}}}
    seir = {"case": "seir", "n": 10**6, "days": 10, "seir": {"forward_agent_days_per_s": 6e7, "retained_bytes_per_agent_day": 12.0}}
    checks = summarize([rec, seir])["checks"]
    assert checks["forward_1e6"]["met"] and not checks["grad_1e6"]["met"] and checks["bytes_per_agent_day_1e6"]["met"]
    assert checks["forward_vs_numba_1e+06"]["value"] == pytest.approx(1.2) and checks["equal_work_1e+06"]["met"]


@pytest.mark.skipif(os.environ.get("LPM_GPU_CHECK") == "1", reason="already inside gpu_check.sh")
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_cpu_quick(tmp_path: Path) -> None:
    """``gpu_check.sh --device cpu --quick`` writes its summary and a scaling record into the folder given."""
    env = dict(os.environ, GPU_CHECK_SKIP="tests nyc", PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(tmp_path), "--device", "cpu", "--quick"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = (tmp_path / "gpu_check_summary.txt").read_text()
    assert "benchmark: exit 0" in summary
    doc = json.loads((tmp_path / "scaling.json").read_text())
    assert doc["machine"]["torch"] == torch.__version__
    seir = [r for r in doc["records"] if r.get("case") == "seir"]
    assert seir and "error" not in seir[0] and seir[0]["seir"]["forward_agent_days_per_s"] > 0


def _dense_transmission_cls():
    """Transmission evaluated densely over all N agents and all edges: the specification the compact path must match."""
    from substeps.epidemic import Transmission
    from lpm.kernels import counter_uniform, stream_key
    from substeps.epidemic.dynamics import _TINY, _draw_dwell, event_carrier

    class DenseTransmission(Transmission):
        """Every agent, every edge, every step (no frontier, no candidates)."""

        def __call__(self, params, system, state, t, rng):  # type: ignore[override]
            d = self.disease
            iota, cdf = system.infectiousness, system.dwell_cdf
            beta = getattr(params, self.beta)
            inf = iota[state.stage.long()]
            value = inf * state.carrier
            if self.use_contact_factor:
                value = value.unsqueeze(1) * state.contact_factor
            net = system.network
            src, dst, lay = net.edge_index[0].long(), net.edge_index[1].long(), net.layer.long()
            v = (value[src, lay] if value.dim() == 2 else value[src]) * net.weight * (inf[src] > 0)
            if self.use_layer_scale:
                v = v * state.layer_scale[lay]
            F = torch.zeros(state.stage.numel(), device=v.device).index_add(0, dst, v)
            lam = beta * d.dt * F
            if self.use_susceptibility:
                lam = lam * state.susceptibility
            p = -torch.expm1(-lam)
            u = counter_uniform(stream_key(rng, t), torch.arange(state.stage.numel(), device=state.stage.device))
            at_risk = state.stage == d.code(d.susceptible)
            event = at_risk & (u < p)
            entry = torch.tensor(d.code(d.entry), dtype=torch.int8, device=state.stage.device)
            timer = _draw_dwell(cdf, torch.full_like(state.stage, d.code(d.entry)), u / p.detach().clamp_min(_TINY))
            same_step = state.entered_step is not None and int(state.entered_step) == t
            earlier = state.entered if same_step else torch.full_like(state.entered, -1)
            return state.replace(stage=torch.where(event, entry, state.stage), timer=torch.where(event, timer, state.timer),
                                 carrier=state.carrier * event_carrier(torch.where(event, p, torch.exp(-lam)), at_risk),
                                 entered=torch.where(event, entry, earlier), entered_step=torch.tensor(t, device=state.stage.device))

    return DenseTransmission


@pytest.mark.parametrize("contact_factor", [False, True])
def test_compact_transmission_matches_dense(contact_factor: bool) -> None:
    """The frontier/candidate Transmission gives the dense evaluation's states exactly and its gradients,
    including the gradient with respect to a closed (zero) layer."""
    from lpm import Interval, Model, Params, Positive
    from lpm.networks import erdos_renyi, household_cliques
    from substeps.epidemic import Dwell, EpiState, Progression, Transmission, epi_system, incidence, initial_state, seirm

    n = 1500
    hh = torch.randint(0, n // 3, (n,), generator=torch.Generator().manual_seed(0))
    net = Network.from_layers({"household": household_cliques(hh), "community": erdos_renyi(n, 6.0, seed=1)}, n)
    d = seirm(Dwell.gamma(3.0, 1.5), Dwell.gamma(5.0, 2.0), fatality=lambda p, y, s: p.ifr * s.susceptibility,
              fatality_reads=("susceptibility",), fatality_params=("ifr",))
    # the dense reference implements the linear carrier coupling
    kw = dict(use_layer_scale=True, use_contact_factor=contact_factor, use_susceptibility=True, estimator="linear")
    outs = []
    for cls in (Transmission, _dense_transmission_cls()):
        scale = torch.tensor([0.0, 1.0], device=DEVICE, requires_grad=True)  # households closed
        sy = epi_system(d, network=net, device=DEVICE, layer_scale_base=torch.ones(2))
        st = initial_state(d, n, 20, device=DEVICE,
                           susceptibility=torch.rand(n, generator=torch.Generator().manual_seed(5)) + 0.5,
                           contact_factor=torch.rand(n, 2, generator=torch.Generator().manual_seed(6)),
                           layer_scale=torch.ones(2)).replace(layer_scale=scale)
        params = Params(beta=Positive(0.1), ifr=Interval(0.1, 0, 1)).to(DEVICE)
        m = Model([cls(d, **kw), Progression(d)], {"inc": incidence(d), "deaths": incidence(d, stage="M")}, state_type=EpiState)
        r = m.simulate(params, sy, st, 25, seed=3, grad=True, progress=False)
        loss = r.observables["inc"].sum() + 3 * r.observables["deaths"].sum()
        grads = torch.autograd.grad(loss, [*params.parameters(), scale])
        fs = r.final_state
        outs.append((fs.stage, fs.timer, fs.entered, r.observables["inc"].detach(), grads))
    (a, b) = outs
    assert float(a[3].sum()) > 50  # an epidemic actually happened
    for x, y in zip(a[:4], b[:4]):
        assert torch.equal(x, y)
    for x, y in zip(a[4], b[4]):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-5)
    assert float(a[4][-1][0].abs()) > 0  # the closed layer still carries a gradient
