"""Reference network-SIR kernels, timed in the same run as the engine for ratios.

All three simulate the same discrete-time SIR on the same CSR contact graph: each step an
infectious agent infects each susceptible contact with probability ``p_edge`` (so an agent
with k infectious contacts is infected with ``1 - (1 - p_edge)^k``, the engine's
``1 - exp(-beta k)`` when ``p_edge = 1 - exp(-beta)``), then recovers with probability
``gamma``. States are 0 = S, 1 = I, 2 = R. Each returns ``(seconds, final R, ever infected)``;
the last, over N, is the attack rate of the equal-work check.

1. :func:`torch_scatter_sir`: the straightforward tensor formulation, every edge every step.
2. :func:`numpy_frontier_sir`: vectorized NumPy that only visits edges of infectious agents.
3. :func:`numba_csr_sir`: a fused compiled loop over CSR (uint8 states, int32 indices);
   needs ``numba`` (``pip install lpm[bench]``), otherwise :func:`numba_available` is False.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import Tensor

__all__ = ["torch_scatter_sir", "numpy_frontier_sir", "numba_csr_sir", "numba_available", "seeds_mask", "CLOCKS"]

#: timers: ``wall`` (elapsed seconds) and ``cpu`` (this process's CPU seconds: on a shared machine a
#: single-threaded kernel's cost without the time it waits for a core; meaningless with more threads)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def seeds_mask(n: int, infected: int, seed: int = 0) -> np.ndarray:
    """``uint8 [N]`` initial states with ``infected`` random agents infectious."""
    rng = np.random.default_rng(seed)
    state = np.zeros(n, dtype=np.uint8)
    state[rng.choice(n, size=infected, replace=False)] = 1
    return state


def torch_scatter_sir(src: Tensor, dst: Tensor, state0: np.ndarray, beta: float, gamma: float, days: int,
                      seed: int = 0, clock: str = "wall") -> tuple[float, int, int]:
    """Every edge, every step: ``index_add`` of infectious sources into targets. Returns (seconds, final R, ever infected)."""
    device = src.device
    g = torch.Generator(device=device).manual_seed(seed)
    state = torch.from_numpy(state0).to(device)
    n = state.numel()
    src, dst = src.long(), dst.long()
    now = CLOCKS[clock]
    t0 = now()
    for _ in range(days):
        inf = (state == 1).float()
        force = torch.zeros(n, device=device).index_add_(0, dst, inf[src])
        p = -torch.expm1(-beta * force)
        new_inf = (state == 0) & (torch.rand(n, generator=g, device=device) < p)
        rec = (state == 1) & (torch.rand(n, generator=g, device=device) < gamma)
        state = torch.where(new_inf, 1, torch.where(rec, 2, state)).to(torch.uint8)
    sec = now() - t0
    return sec, int((state == 2).sum()), int((state != 0).sum())


def numpy_frontier_sir(rowptr: np.ndarray, col: np.ndarray, state0: np.ndarray, beta: float, gamma: float,
                       days: int, seed: int = 0, clock: str = "wall") -> tuple[float, int, int]:
    """Vectorized NumPy visiting only the edges of infectious agents. Returns (seconds, final R, ever infected)."""
    rng = np.random.default_rng(seed)
    state = state0.copy()
    p_edge = -math.expm1(-beta)
    now = CLOCKS[clock]
    t0 = now()
    for _ in range(days):
        inf = np.flatnonzero(state == 1)
        starts = rowptr[inf]
        counts = rowptr[inf + 1] - starts
        total = int(counts.sum())
        if total:
            pos = np.arange(total) + np.repeat(starts - (np.cumsum(counts) - counts), counts)
            tgt = col[pos]
            tgt = tgt[rng.random(total) < p_edge]
            tgt = tgt[state[tgt] == 0]
        else:
            tgt = np.zeros(0, dtype=col.dtype)
        rec = inf[rng.random(inf.size) < gamma]
        state[tgt] = 1
        state[rec] = 2
    sec = now() - t0
    return sec, int((state == 2).sum()), int((state != 0).sum())


_NUMBA_STEP = None


def numba_available() -> bool:
    """Whether numba (the ``bench`` extra) is importable."""
    try:
        import numba  # noqa: F401
    except Exception:
        return False
    return True


def _numba_step() -> tuple:
    global _NUMBA_STEP
    if _NUMBA_STEP is None:
        import numba

        def body(rowptr, col, state, new, p_edge, gamma):  # pragma: no cover - compiled
            n = state.shape[0]
            for i in numba.prange(n):
                new[i] = state[i]
            for i in numba.prange(n):
                if state[i] == 1:
                    for e in range(rowptr[i], rowptr[i + 1]):
                        j = col[e]
                        # benign race: concurrent writers store the same value
                        if state[j] == 0 and np.random.random() < p_edge:
                            new[j] = 1
                    if np.random.random() < gamma:
                        new[i] = 2

        # prange is a plain range in the serial build: one thread avoids the pool's wake-ups
        step = {True: numba.njit(parallel=True)(body), False: numba.njit(body)}

        @numba.njit
        def seed(s):  # pragma: no cover - compiled
            np.random.seed(s)

        _NUMBA_STEP = (step, seed)
    return _NUMBA_STEP


def numba_csr_sir(rowptr: np.ndarray, col: np.ndarray, state0: np.ndarray, beta: float, gamma: float, days: int,
                  seed: int = 0, threads: int | None = None, clock: str = "wall") -> tuple[float, int, int]:
    """Fused compiled CSR loop (uint8 states, int32 indices). Returns (seconds, final R, ever infected); compile not timed."""
    import numba

    steps, seed_fn = _numba_step()
    threads = int(threads or numba.config.NUMBA_NUM_THREADS)
    step = steps[threads > 1]
    if threads > 1:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    rp = rowptr.astype(np.int64)
    cl = col.astype(np.int32)
    p_edge = -math.expm1(-beta)
    warm_a, warm_b = state0[:2].copy(), state0[:2].copy()
    step(np.zeros(3, dtype=np.int64), cl[:0], warm_a, warm_b, p_edge, gamma)  # compile outside the timing
    seed_fn(seed)
    a, b = state0.copy(), np.empty_like(state0)
    now = CLOCKS[clock]
    t0 = now()
    for _ in range(days):
        step(rp, cl, a, b, p_edge, gamma)
        a, b = b, a
    sec = now() - t0
    return sec, int((a == 2).sum()), int((a != 0).sum())
