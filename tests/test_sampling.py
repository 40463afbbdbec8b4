"""Differentiable discrete samplers: exact forward samples, documented gradients."""

from __future__ import annotations

import torch

from lpm.sampling import bernoulli_st, categorical_sample, categorical_st, gumbel_noise, gumbel_softmax


def test_bernoulli_st_exact_forward_and_identity_gradient(device: str) -> None:
    g = torch.Generator(device=device).manual_seed(0)
    p = torch.full((200_000,), 0.3, device=device, requires_grad=True)
    u = torch.rand(p.shape, generator=g, device=device)
    x = bernoulli_st(p, u)
    assert set(x.detach().unique().tolist()) <= {0.0, 1.0}
    assert abs(float(x.mean()) - 0.3) < 0.005  # ~4.6 standard errors
    x.sum().backward()
    assert torch.allclose(p.grad, torch.ones_like(p))  # d E[sum x]/dp = 1 per agent: unbiased for sums


def test_categorical_frequencies_and_st_gradient(device: str) -> None:
    g = torch.Generator(device=device).manual_seed(1)
    probs = torch.tensor([0.1, 0.6, 0.3], device=device).expand(100_000, 3).clone().requires_grad_(True)
    u = torch.rand(100_000, generator=g, device=device)
    y = categorical_st(probs, u)
    freq = y.detach().mean(0)
    assert torch.allclose(freq, torch.tensor([0.1, 0.6, 0.3], device=device), atol=0.006)
    assert torch.equal(y.detach().sum(1), torch.ones(100_000, device=device))
    (y[:, 1]).sum().backward()
    assert torch.allclose(probs.grad[:, 1], torch.ones(100_000, device=device))
    assert categorical_sample(probs.detach(), torch.tensor([0.0, 0.0999, 0.1001, 0.99999], device=device).repeat(25_000)).view(-1, 4)[0].tolist() == [0, 0, 1, 2]


def test_gumbel_softmax_hard_samples_match_softmax(device: str) -> None:
    g = torch.Generator(device=device).manual_seed(2)
    logits = torch.log(torch.tensor([0.2, 0.5, 0.3], device=device)).expand(100_000, 3).clone().requires_grad_(True)
    y = gumbel_softmax(logits, gumbel_noise(logits.shape, g, device), tau=0.5, hard=True)
    assert torch.equal(y.detach().sum(1), torch.ones(100_000, device=device))
    assert torch.allclose(y.detach().mean(0), torch.tensor([0.2, 0.5, 0.3], device=device), atol=0.006)
    y[:, 0].sum().backward()
    assert torch.isfinite(logits.grad).all() and float(logits.grad[:, 0].mean()) > 0
