"""The compiled forward kernels against the torch path they replace, and the counter uniforms.

The torch substeps are the reference: with numba installed, ``Transmission`` and
``Progression`` run compiled kernels for forward steps; with :func:`compiled_kernels`
turned off they run torch code. Same seed, same trajectories, bit for bit.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import Tensor

from lpm import Interval, Model, Network, Params, Positive
from lpm.kernels import _hash_uniform_py, compiled_available, compiled_kernels, counter_uniform, stream_key
from lpm.networks import erdos_renyi, household_cliques
from substeps.epidemic import Dwell, EpiState, Progression, Transmission, epi_system, incidence, initial_state, seir, seirm, sir

DEVICE = os.environ.get("LPM_TEST_DEVICE", "cpu")
needs_numba = pytest.mark.skipif(not compiled_available(), reason="numba not installed (pip install lpm[fast])")


def test_counter_uniform_matches_spec_and_is_uniform() -> None:
    """Bit-exact against the plain-Python hash; flat histogram; independent across keys and steps."""
    key = stream_key(12345, 7)
    idx = torch.arange(200_000, device=DEVICE)
    u = counter_uniform(key, idx)
    assert u.dtype == torch.float32 and float(u.min()) >= 0 and float(u.max()) < 1
    for i in (0, 1, 2, 99_999, 199_999):
        assert float(u[i]) == _hash_uniform_py(key, i)
    counts = torch.histc(u.cpu(), bins=20, min=0, max=1)
    expected = idx.numel() / 20
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 45  # 19 dof: p ~ 1e-3
    v = counter_uniform(stream_key(12345, 8), idx)
    w = counter_uniform(stream_key(12346, 7), idx)
    for other in (v, w):
        assert abs(float(torch.corrcoef(torch.stack([u, other]).cpu())[0, 1])) < 0.01
    # the same agent's number does not depend on who else draws
    sub = torch.tensor([5, 77, 150_000], device=DEVICE)
    assert torch.equal(counter_uniform(key, sub), u[sub])
    g = torch.Generator().manual_seed(12345)
    assert stream_key(g, 7) == key


@needs_numba
def test_numba_uniform_is_the_torch_uniform() -> None:
    """The compiled twin draws the same numbers."""
    from lpm.compiled import uniforms

    key = stream_key(99, 3, 1)
    idx = np.arange(0, 50_000, 7, dtype=np.int64)
    assert np.array_equal(uniforms(idx, *key), counter_uniform(key, torch.from_numpy(idx)).numpy())


def _run(model: Model, params: Params, state: tuple, steps: int, compiled: bool, grad: bool = False):
    with compiled_kernels(compiled):
        return model.simulate(params, *state, steps, seed=4, grad=grad, progress=False)


def _same(a, b) -> None:
    for f in ("stage", "timer", "entered"):
        assert torch.equal(getattr(a.final_state, f), getattr(b.final_state, f)), f
    for k in a.observables:
        assert torch.equal(a.observables[k].detach(), b.observables[k].detach()), k


@needs_numba
@pytest.mark.parametrize("disease", ["sir", "seir"])
def test_compiled_forward_equals_torch_on_er(disease: str) -> None:
    """SIR (geometric recovery) and SEIR (gamma dwell) on an ER graph: identical trajectories."""
    n = 4000
    d = sir(0.1) if disease == "sir" else seir(Dwell.gamma(3.0, 1.5), Dwell.gamma(5.0, 2.0))
    net = Network.from_layers({"community": erdos_renyi(n, 10.0, seed=2)}, n, coalesce=False)
    state = epi_system(d, network=net), initial_state(d, n, 40, seed=1)
    model = Model([Transmission(d), Progression(d)], {"incidence": incidence(d)}, state_type=EpiState)
    params = Params(beta=Positive(0.03 if disease == "sir" else 0.06))
    a, b = _run(model, params, state, 50, True), _run(model, params, state, 50, False)
    assert float(a.observables["incidence"].sum()) > 0.3 * n  # an epidemic happened
    _same(a, b)


@needs_numba
@pytest.mark.parametrize("per_agent_fatality", [False, True])
def test_compiled_forward_equals_torch_layered(per_agent_fatality: bool) -> None:
    """Layers with scales, per-agent contact factors, susceptibility and a branching exit; both plan orders."""
    n = 3000
    hh = torch.randint(0, n // 3, (n,), generator=torch.Generator().manual_seed(0))
    net = Network.from_layers({"household": household_cliques(hh), "community": erdos_renyi(n, 6.0, seed=1)}, n)
    if per_agent_fatality:
        d = seirm(Dwell.gamma(3.0, 1.5), Dwell.gamma(5.0, 2.0), fatality=lambda p, y, s: p.ifr * s.susceptibility,
                  fatality_reads=("susceptibility",), fatality_params=("ifr",))
    else:
        d = seirm(Dwell.gamma(3.0, 1.5), Dwell.gamma(5.0, 2.0), fatality=0.2)
    g = torch.Generator().manual_seed(5)
    state = epi_system(d, network=net), initial_state(d, n, 30, layer_scale=torch.tensor([0.5, 1.5]),
                          susceptibility=torch.rand(n, generator=g) + 0.5, contact_factor=torch.rand(n, 2, generator=g))
    params = Params(beta=Positive(0.08), ifr=Interval(0.3, 0, 1))
    kw = dict(use_layer_scale=True, use_contact_factor=True, use_susceptibility=True)
    obs = {"inc": incidence(d), "deaths": incidence(d, stage="M")}
    for plan in ([Transmission(d, **kw), Progression(d)], [Progression(d), Transmission(d, **kw)]):
        model = Model(plan, obs, state_type=EpiState)
        a, b = _run(model, params, state, 40, True), _run(model, params, state, 40, False)
        assert float(a.observables["deaths"].sum()) > 5
        _same(a, b)


@needs_numba
def test_compiled_progression_under_autograd_keeps_gradients() -> None:
    """With grad on, transmission runs torch and progression may run compiled: same values, same gradients."""
    n = 2000
    d = seirm(Dwell.gamma(3.0, 1.5), Dwell.gamma(5.0, 2.0), fatality=0.1)
    net = Network.from_layers({"community": erdos_renyi(n, 8.0, seed=3)}, n, coalesce=False)
    state = epi_system(d, network=net), initial_state(d, n, 20)
    model = Model([Transmission(d), Progression(d)], {"inc": incidence(d)}, state_type=EpiState)
    grads = []
    for compiled in (True, False):
        params = Params(beta=Positive(0.06))
        r = _run(model, params, state, 30, compiled, grad=True)
        (g,) = torch.autograd.grad(r.observables["inc"].sum(), list(params.parameters()))
        grads.append((r, g))
    _same(grads[0][0], grads[1][0])
    assert torch.allclose(grads[0][1], grads[1][1], rtol=1e-5) and float(grads[0][1].abs()) > 0


def test_torch_fallback_without_compiled_kernels() -> None:
    """With the compiled kernels off (as without numba) the substeps run torch code: the fast entry declines."""
    from substeps.epidemic.fast import fused_progression, fused_transmission

    d = sir(0.1)
    n = 100
    net = Network.from_layers({"community": erdos_renyi(n, 4.0, seed=2)}, n, coalesce=False)
    system, state = epi_system(d, network=net), initial_state(d, n, 5)
    params = Params(beta=Positive(0.03))
    g = torch.Generator().manual_seed(0)
    with compiled_kernels(False), torch.no_grad():
        assert fused_transmission(Transmission(d), params, system, state, 0, g) is None
        assert fused_progression(Progression(d), params, system, state, 0, g) is None
        out = Transmission(d)(params, system, state, 0, g)
    assert out.stage.shape == (n,)


@needs_numba
@pytest.mark.parametrize("graph", ["weighted", "hubs"])
def test_compiled_forward_equals_torch_weights_and_hubs(graph: str) -> None:
    """Unequal edge weights (the force pass), and targets with more than 128 infectious contacts
    (the contact count overflows its byte and the step falls back to the force pass)."""
    g = torch.Generator().manual_seed(8)
    if graph == "weighted":
        n = 3000
        ei = erdos_renyi(n, 10.0, seed=4)
        net = Network.from_layers({"c": (ei, torch.rand(ei.shape[1], generator=g) * 2)}, n, coalesce=False)
        seeded = 30
    else:
        n = 600
        hubs = torch.arange(20)
        others = torch.arange(20, n)
        a = torch.cartesian_prod(hubs, others).T  # every hub meets every other agent
        ei = torch.cat([a, a.flip(0), erdos_renyi(n, 4.0, seed=4)], 1)
        net = Network.from_layers({"c": ei}, n, coalesce=False)
        seeded = 300
    d = sir(0.2)
    state = epi_system(d, network=net), initial_state(d, n, seeded, seed=2)
    model = Model([Transmission(d), Progression(d)], {"incidence": incidence(d)}, state_type=EpiState)
    params = Params(beta=Positive(0.06 if graph == "weighted" else 0.0005))
    a, b = _run(model, params, state, 30, True), _run(model, params, state, 30, False)
    assert float(a.observables["incidence"].sum()) > (0.1 * n if graph == "weighted" else 5)
    _same(a, b)


@needs_numba
@pytest.mark.parametrize("buffer", [1, 7, 100_000])
def test_contact_count_sweep_matches_a_dense_count(buffer: int) -> None:
    """The chunked edge sweep counts each susceptible target's infectious contacts exactly, whatever the
    size of its buffer (1 and 7 break rows in the middle), and flags a byte overflow past 128 contacts."""
    from substeps.epidemic.fast import _kernels

    k = _kernels()
    gen = np.random.default_rng(3)
    n = 503  # not a multiple of 8: the bitmask's tail
    # agent 0 meets 300 random agents; agent 1 is met by 600 (about 200 infectious: past a byte's count)
    src = np.concatenate([gen.integers(0, n, 4000), np.zeros(300, np.int64), gen.integers(2, n, 600)])
    dst = np.concatenate([gen.integers(0, n, 4000), gen.integers(0, n, 300), np.ones(600, np.int64)])
    order = np.argsort(src, kind="stable")
    src, dst = src[order], dst[order].astype(np.int32)
    rowptr = np.zeros(n + 1, np.int64)
    rowptr[1:] = np.cumsum(np.bincount(src, minlength=n))
    for hub_infectious, hub_susceptible in ((False, False), (True, False), (True, True)):
        stage = gen.integers(0, 3, n).astype(np.uint8)  # 0 = S, 1 = I, 2 = R
        stage[0] = 1 if hub_infectious else 2
        stage[1] = 0 if hub_susceptible else 2
        infectious = np.zeros(256, np.uint8)
        infectious[1] = 1
        front = np.empty(n, np.int32)
        sbits = np.empty((n + 7) // 8, np.uint8)
        nf = k["frontier_bits"](stage, infectious, np.uint8(0), front, sbits)
        assert np.array_equal(front[:nf], np.flatnonzero(stage == 1))
        assert np.array_equal(np.unpackbits(sbits, bitorder="little")[:n], (stage == 0).astype(np.uint8))
        expected = np.bincount(dst[(stage[src] == 1) & (stage[dst] == 0)], minlength=n)
        st = stage.copy()
        cand = np.empty(n, np.int32)
        ej, ecnt = np.empty(dst.shape[0], np.int32), np.empty(n, np.int32)
        nc, over, ne = k["count_bits"](st, rowptr, dst, front, nf, np.uint8(0), cand, np.empty(buffer, np.int32), sbits,
                                       True, ej, ecnt)
        assert over == hub_susceptible == bool(expected.max() > 128)
        # the listing for the backward: each frontier source's edges into susceptible targets, in CSR order
        rows = [dst[rowptr[i]: rowptr[i + 1]] for i in front[:nf]]
        listed = [row[stage[row] == 0] for row in rows]
        assert np.array_equal(ecnt[:nf], [len(x) for x in listed])
        assert ne == sum(len(x) for x in listed) and np.array_equal(ej[:ne], np.concatenate(listed))
        if not over:
            assert sorted(cand[:nc]) == list(np.flatnonzero(expected))
            assert np.array_equal(st[cand[:nc]].astype(np.int64) - 127, expected[cand[:nc]])


@needs_numba
@pytest.mark.parametrize("estimator", ["presence", "edge-presence", "linear"])
@pytest.mark.parametrize("case", ["sir", "seir_layered"])
def test_compiled_backward_equals_torch_autograd(estimator: str, case: str) -> None:
    """Under autograd the compiled transmission (kernel forward + compiled backward) gives the torch path's
    trajectories bit for bit and its gradient (torch autograd through the torch path) to float32 rounding."""
    n = 2500
    if case == "sir":
        d = sir(0.1)
        net = Network.from_layers({"community": erdos_renyi(n, 10.0, seed=2)}, n, coalesce=False)
        fields, kw, beta = {}, {}, 0.03
    else:
        d = seir(Dwell.gamma(3.0, 1.5), Dwell.gamma(5.0, 2.0))
        hh = torch.randint(0, n // 3, (n,), generator=torch.Generator().manual_seed(0))
        net = Network.from_layers({"household": household_cliques(hh), "community": erdos_renyi(n, 6.0, seed=1)}, n)
        g = torch.Generator().manual_seed(5)
        fields = dict(layer_scale=torch.tensor([0.5, 1.5]), susceptibility=torch.rand(n, generator=g) + 0.5)
        kw, beta = dict(use_layer_scale=True, use_susceptibility=True), 0.06
    state = epi_system(d, network=net), initial_state(d, n, 25, seed=1, **fields)
    model = Model([Transmission(d, estimator=estimator, **kw), Progression(d)], {"incidence": incidence(d)}, state_type=EpiState)
    out = []
    for compiled in (True, False):
        params = Params(beta=Positive(beta))
        r = _run(model, params, state, 40, compiled, grad=True)
        (g,) = torch.autograd.grad(r.observables["incidence"].sum(), list(params.parameters()))
        out.append((r, g))
    assert float(out[0][0].observables["incidence"].sum()) > 0.3 * n
    _same(out[0][0], out[1][0])
    assert torch.equal(out[0][0].final_state.source_load, out[1][0].final_state.source_load) if estimator != "linear" else True
    assert float(out[1][1].abs()) > 0
    assert torch.allclose(out[0][1], out[1][1], rtol=2e-5), (float(out[0][1]), float(out[1][1]))


@needs_numba
def test_compiled_backward_carrier_gradient_equals_torch() -> None:
    """The gradient onto every agent's initial carrier (not only beta's) matches torch autograd."""
    n = 1500
    d = sir(0.15)
    net = Network.from_layers({"community": erdos_renyi(n, 8.0, seed=6)}, n, coalesce=False)
    system, base = epi_system(d, network=net), initial_state(d, n, 30, seed=3)
    model = Model([Transmission(d), Progression(d)], {"incidence": incidence(d)}, state_type=EpiState)
    grads = []
    for compiled in (True, False):
        carrier = torch.ones(n, requires_grad=True)
        params = Params(beta=Positive(0.05))
        r = _run(model, params, (system, base.replace(carrier=carrier)), 25, compiled, grad=True)
        (g,) = torch.autograd.grad(r.observables["incidence"].sum(), [carrier])
        grads.append(g)
    assert float(grads[1].abs().sum()) > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-5)


@needs_numba
@pytest.mark.parametrize("estimator", ["presence", "linear"])
def test_compiled_backward_edge_chunks_do_not_change_the_gradient(estimator: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the forward's list of edges into candidates the backward sweeps the frontier's edges in
    chunks of its hit buffer; with a buffer of a few edges (sources split across chunks) the carrier and
    beta gradients are the same bits, and those of the listed path to float32 rounding."""
    from substeps.epidemic import fast

    n = 1200
    d = sir(0.15)
    net = Network.from_layers({"community": erdos_renyi(n, 8.0, seed=6)}, n, coalesce=False)
    system, base = epi_system(d, network=net), initial_state(d, n, 30, seed=3)
    model = Model([Transmission(d, estimator=estimator), Progression(d)], {"incidence": incidence(d)}, state_type=EpiState)

    def gradients() -> tuple[Tensor, ...]:
        carrier = torch.ones(n, requires_grad=True)
        params = Params(beta=Positive(0.05))
        r = _run(model, params, (system, base.replace(carrier=carrier)), 25, True, grad=True)
        return torch.autograd.grad(r.observables["incidence"].sum(), [carrier, *params.parameters()])

    listed = gradients()  # the backward reads the forward's list of edges into candidates
    records = fast._record_space
    # from here on the forward lists no edges: the backward sweeps the frontier's edges itself
    monkeypatch.setattr(fast, "_record_space", lambda m, e: records(m, e)[:2] + (fast._NO_EDGES, fast._NO_EDGES))
    space = fast._backward_space

    def small(m: int) -> tuple[np.ndarray, ...]:
        rec, hrec, acc, cbits, hit_j, _, hit_s, memo = space(m)
        return rec, hrec, acc, cbits, hit_j[:3], np.empty(3, np.int64), hit_s[:3], memo

    grads = []
    for tiny_chunks in (False, True):
        if tiny_chunks:
            monkeypatch.setattr(fast, "_backward_space", small)
        grads.append(gradients())
    assert float(grads[0][0].abs().sum()) > 0
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    assert torch.allclose(listed[0], grads[0][0], rtol=1e-5, atol=1e-6)
    assert torch.allclose(listed[1], grads[0][1], rtol=1e-6)


@needs_numba
def test_compiled_graph_build_equals_torch_and_is_a_simple_er_graph() -> None:
    """ER edges and the CSR sort: the compiled path gives the torch path's graph bit for bit; G(n, m) contract holds."""
    n, deg = 60_000, 10.0
    nets = {}
    for compiled in (True, False):
        with compiled_kernels(compiled):
            ei = erdos_renyi(n, deg, seed=5)
            hh = torch.randint(0, n // 3, (n,), generator=torch.Generator().manual_seed(1))
            w = torch.rand(ei.shape[1], generator=torch.Generator().manual_seed(2))
            nets[compiled] = (ei, Network.from_layers({"household": household_cliques(hh), "community": (ei, w)}, n,
                                                      coalesce=False))
    (ei, net), (ei_t, net_t) = nets[True], nets[False]
    assert torch.equal(ei, ei_t)
    for f in ("edge_index", "weight", "layer", "rowptr"):
        assert torch.equal(getattr(net, f), getattr(net_t, f)), f
    net.validate()
    src, dst = ei
    assert ei.shape[1] == 2 * int(round(n * deg / 2)) and bool((src != dst).all())
    key = src * n + dst
    assert torch.unique(key).numel() == key.numel()  # no duplicate edges
    assert torch.equal(torch.sort(key).values, torch.sort(dst * n + src).values)  # symmetric
    d = torch.bincount(src, minlength=n).double()
    assert abs(float(d.mean()) - deg) < 1e-9
    assert 0.9 * deg < float(d.var()) < 1.1 * deg  # binomial degrees: variance ~ mean (a ring or a regular graph fails)


@needs_numba
def test_masked_sum_equals_torch_where_sum_and_keeps_gradients() -> None:
    """The compiled observable sum: the exact count on carriers, torch's value on general floats, autograd kept."""
    from lpm.kernels import masked_sum

    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-1, 4, (100_003,), generator=g).to(torch.int8)
    ones = torch.ones(codes.numel())
    for code in (-1, 0, 3, 7):
        expected = torch.where(codes == code, ones, torch.zeros_like(ones)).sum()
        assert torch.equal(masked_sum(codes, code, ones), expected) and float(expected) == int((codes == code).sum())
    vals = torch.rand(codes.numel(), generator=g)
    ref = torch.where(codes == 2, vals, torch.zeros_like(vals)).sum()
    assert abs(float(masked_sum(codes, 2, vals)) - float(ref)) <= 1e-6 * abs(float(ref))
    with compiled_kernels(False):
        assert torch.equal(masked_sum(codes, 2, vals), ref)
    w = vals.clone().requires_grad_(True)
    (3 * masked_sum(codes, 2, w)).backward()
    assert torch.equal(w.grad, 3 * (codes == 2).float())
    y = masked_sum(codes, 2, w)
    codes[0] = 5  # the codes a gradient needs, changed in place: autograd says so instead of a wrong gradient
    with pytest.raises(RuntimeError):
        y.backward()


def test_network_validation_is_cached_but_sees_in_place_changes() -> None:
    """A validated network skips its O(E) checks next time, unless a tensor was modified in place."""
    from lpm.state import StateError

    n = 500
    net = Network.from_layers({"r": erdos_renyi(n, 6.0, seed=1)}, n)
    net.validate()
    net.validate({"N": n})
    with pytest.raises(StateError, match="num_nodes"):
        net.validate({"N": n + 1})
    net.edge_index[1, 3] = n + 7  # in place: the version changes, so the range check runs again
    with pytest.raises(StateError, match="edge_index"):
        net.validate()
    net = Network.from_layers({"r": erdos_renyi(n, 6.0, seed=1)}, n)
    net.validate()
    net.weight[5] = float("nan")  # in place: the finiteness check runs again
    with pytest.raises(StateError, match="weight"):
        net.validate()


@needs_numba
@pytest.mark.parametrize("n", [8, 1003, 40_000])
def test_frontier_sweep_equals_numpy(n: int) -> None:
    """The word-at-a-time frontier and susceptible bitmask equal a plain NumPy listing (mixed and uniform runs of codes)."""
    from substeps.epidemic.fast import _kernels

    rng = np.random.default_rng(n)
    st = rng.integers(0, 4, n).astype(np.uint8)
    st[: n // 3] = 0  # long all-susceptible stretch
    st[n // 3: n // 2] = 3  # long all-recovered stretch
    st[n // 2: n // 2 + 9] = 1
    infectious = np.zeros(256, np.uint8)
    infectious[[1, 2]] = 1
    front = np.empty(n, np.int32)
    sbits = np.empty((n + 7) >> 3, np.uint8)
    k = _kernels()["frontier_bits"](st, infectious, np.uint8(0), front, sbits)
    assert np.array_equal(front[:k], np.flatnonzero((st == 1) | (st == 2)))
    assert np.array_equal(np.unpackbits(sbits, bitorder="little")[:n], (st == 0).astype(np.uint8))


def test_params_value_cache_sees_every_change() -> None:
    """A constrained parameter read without a graph is cached, but never stale: an in-place change of the raw
    tensor (an optimizer step) or of a returned value is seen, and under autograd every read is a fresh node."""
    params = Params(beta=Positive(0.03))
    with torch.inference_mode():  # no version counter there: read, never cached
        assert abs(float(params.beta) - 0.03) < 1e-7
    with torch.no_grad():
        a, b = params.beta, params.beta
        assert a is b and abs(float(a) - 0.03) < 1e-7
        a.mul_(2)  # a caller writing into the value it read
        assert abs(float(params.beta) - 0.03) < 1e-7
        params.raw_beta.add_(1.0)  # an optimizer's in-place step
        assert abs(float(params.beta) - float(torch.nn.functional.softplus(params.raw_beta))) < 1e-7
        params.to(torch.float64)  # the parameter's data swapped in place
        assert params.beta.dtype == torch.float64
    x, y = params.beta, params.beta
    assert x is not y and x.grad_fn is not None
    (x * 2).backward()
    (y * 3).backward()  # a second backward through its own node
    assert params.raw_beta.grad is not None
