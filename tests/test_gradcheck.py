"""``torch.autograd.gradcheck`` (double precision, central differences) on the deterministic
differentiable pieces: parameter transforms, delay convolution, soft histogram, the LLM link,
and the compact transmission kernel."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck

from lpm import Interval, Positive
from lpm.kernels import push_compact
from lpm.networks import Network, erdos_renyi

D = torch.float64


@pytest.mark.parametrize("spec", [Positive(1.0), Interval(0.3, 0.0, 1.0), Interval(2.0, 1.0, 5.0)])
def test_param_transforms(spec) -> None:
    raw = torch.linspace(-3, 3, 7, dtype=D, requires_grad=True)
    assert gradcheck(spec.from_raw, (raw,))
    inside = spec.from_raw(raw).detach().requires_grad_(True)
    assert gradcheck(spec.to_raw, (inside,))
    assert torch.allclose(spec.to_raw(spec.from_raw(raw)), raw)


def test_delay_convolution() -> None:
    from calibration.observation import convolve_delay, gamma_delay

    pmf = gamma_delay(5.0, 2.0).to(D).requires_grad_(True)
    x = torch.rand(30, 3, dtype=D, requires_grad=True)
    assert gradcheck(convolve_delay, (x, pmf))
    assert gradcheck(convolve_delay, (x[:, 0].detach().requires_grad_(True), pmf))


def test_soft_histogram() -> None:
    from substeps.opinion import soft_histogram

    # away from bin centres (where the interpolation has kinks) and from the clamps
    y = (torch.rand(50, dtype=D) * 1.6 - 0.8).requires_grad_(True)
    assert gradcheck(lambda v: soft_histogram(v, 7), (y,))


@pytest.mark.parametrize("kind", ["logit_affine", "affine"])
def test_llm_link(kind: str) -> None:
    from llm_archetypes.link import Link

    link = Link(kind, num=4, low=0.1, high=0.9, slope=0.8, bias=0.1).double()
    score = torch.tensor([0.2, 0.35, 0.5, 0.7], dtype=D, requires_grad=True)

    def f(s, slope, bias):
        return torch.func.functional_call(link, {"slope": slope, "bias": bias}, (s,))

    slope = link.slope.detach().clone().requires_grad_(True)
    bias = link.bias.detach().clone().requires_grad_(True)
    assert gradcheck(f, (score, slope, bias))


@pytest.mark.parametrize("per_layer", [False, True])
def test_push_compact(per_layer: bool) -> None:
    n = 60
    net = Network.from_layers({"a": erdos_renyi(n, 4.0, seed=1), "b": erdos_renyi(n, 3.0, seed=2)}, n)
    idx = torch.tensor([1, 5, 7, 20, 33, 59])
    shape = (idx.numel(), 2) if per_layer else (idx.numel(),)
    vals = torch.rand(*shape, dtype=D, requires_grad=True)
    scale = torch.tensor([0.5, 1.5], dtype=D, requires_grad=True)
    weight = net.weight.to(D)

    def f(v, s):
        return push_compact(net.edge_index[1], weight, net.layer, net.rowptr, n, idx, v, s)[0]

    assert gradcheck(f, (vals, scale))
    # against the dense definition
    src, dst = net.edge_index[0], net.edge_index[1]
    dense_vals = torch.zeros((n, 2) if per_layer else (n,), dtype=D).index_put((idx,), vals.detach())
    v = dense_vals[src, net.layer.long()] if per_layer else dense_vals[src]
    ref = torch.zeros(n, dtype=D).index_add(0, dst, v * weight * scale.detach()[net.layer.long()])
    assert torch.allclose(f(vals.detach(), scale.detach()), ref)
    assert math.isfinite(float(ref.sum()))
