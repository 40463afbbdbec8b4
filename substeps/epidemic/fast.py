"""Compiled forward kernels for :class:`Transmission` and :class:`Progression` (numba, CPU).

One model definition: the substeps call :func:`fused_transmission` / :func:`fused_progression`
first, and these return ``None`` unless the compiled path applies (numba installed and
enabled, CPU tensors, nothing that needs autograd, a network for transmission), in which
case the substep runs its torch code, the reference these kernels are tested against
(``tests/test_fast_kernels.py``: same seed, same states, bit for bit).

Each kernel does in one pass what the torch path does in a dozen tensor ops: transmission
lists the infectious agents and a one-bit-per-agent susceptible mask in one sweep over the
stage bytes, visits the edges of infectious agents only (testing the cached bitmask, so
edges into infectious or recovered agents cost no random access to the stage array),
counts contacts (or sums the force) on susceptible targets only, and draws a counter
uniform (:func:`lpm.kernels.counter_uniform`) for each candidate; progression counts timers
down and moves agents whose timer runs out. The force sums run in the same edge order and
float32 arithmetic as ``index_add``, so outcomes match. Work buffers are allocated once
per population size (no allocation per step but the new state's own tensors).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from lpm.kernels import compiled_available, is_replicated, stream_key

if TYPE_CHECKING:  # pragma: no cover
    from lpm.params import Params
    from substeps.epidemic.disease import EpiState, EpiSystem
    from substeps.epidemic.dynamics import Progression, Transmission

__all__ = ["fused_transmission", "fused_progression", "applies"]

_KERNELS: dict[str, object] = {}


def _kernels() -> dict[str, object]:
    """Compile (or load from numba's cache) the two kernels once per process."""
    if not _KERNELS:
        import numba

        from lpm.compiled import inverse_cdf, prefetch, uniform

        tiny = np.float32(1e-30)

        marked = np.int8(-128)  # a susceptible target in the candidate list (never a stage code)
        umarked = np.uint8(128)  # the same byte seen as uint8: 128 + (infectious contacts - 1) while counting

        @numba.njit(cache=True, error_model="numpy")
        def force_pass(stage, carrier, rowptr, dst, weight, layer, iota, cf, use_cf, scale, use_scale,
                       s_code, force, cand, front, nf):  # pragma: no cover - compiled
            """Force on susceptible targets, summed in CSR edge order (the order ``index_add`` sums in)."""
            nc = 0
            for k in range(nf):
                i = front[k]
                if k + 8 < nf:
                    prefetch(dst, rowptr[front[k + 8]])
                si = stage[i]
                val = iota[si] * carrier[i]
                for e in range(rowptr[i], rowptr[i + 1]):
                    j = dst[e]
                    sj = stage[j]
                    if sj == s_code:
                        stage[j] = marked
                        cand[nc] = j
                        nc += 1
                    elif sj != marked:
                        continue
                    v = val * cf[i, layer[e]] if use_cf else val
                    v = v * weight[e]
                    if use_scale:
                        v = v * scale[layer[e]]
                    force[j] += v
            return nc

        @numba.njit(cache=True, error_model="numpy")
        def frontier_bits(st, infectious, s_code, front, sbits):  # pragma: no cover - compiled
            """Infectious agents in order into ``front``; one bit per agent, set where susceptible, into ``sbits``.

            The bitmask (N/8 bytes) stays in cache where the stage bytes would not, so the edge sweep
            tests it instead of the codes."""
            n = st.shape[0]
            nw = n >> 3
            words = st[: nw << 3].view(np.uint64)
            ones = np.uint64(0x0101010101010101)
            low7 = np.uint64(0x7F7F7F7F7F7F7F7F)
            pattern = np.uint64(s_code) * ones
            k = 0
            for b in range(nw):
                w = words[b]
                # susceptible bytes -> one bit each: zero-byte test of w ^ pattern, high bits gathered by a multiply
                x = w ^ pattern
                z = ~(((x & low7) + low7) | x | low7)
                sbits[b] = np.uint8(((z >> np.uint64(7)) * np.uint64(0x0102040810204080)) >> np.uint64(56))
                c = w & np.uint64(0xFF)
                if w == c * ones and infectious[c] == 0:
                    continue  # eight agents in one non-infectious stage (most words early and late in an epidemic)
                for q in range(8):
                    i = (b << 3) + q
                    front[k] = i
                    k += infectious[st[i]]
            if n & 7:
                v = np.uint8(0)
                for i in range(n & ~7, n):
                    s = st[i]
                    front[k] = i
                    k += infectious[s]
                    v |= np.uint8(s == s_code) << np.uint8(i & 7)
                sbits[n >> 3] = v
            return k

        @numba.njit(cache=True, error_model="numpy")
        def count_bits(st, rowptr, dst, front, nf, s_code, cand, hits, sbits):  # pragma: no cover - compiled
            """Count the infectious contacts of susceptible targets in their stage byte (uint8: 128 = one, 255 = 128).

            Per chunk of sources, a read-only sweep over their edges keeps the targets whose susceptible
            bit is set (a cached bitmask, not the stage bytes), then only those bytes are written; the
            other edges (to infectious or recovered agents) cost no random access to the stage array.
            Returns (candidates, overflow): on overflow a target met more than 128 sources and its byte
            wrapped; the caller then restores every candidate and runs the force pass."""
            nc = 0
            over = False
            cap = hits.shape[0]
            k = 0
            e = rowptr[front[0]] if nf > 0 else 0
            while k < nf:
                h = 0
                while k < nf:
                    b = rowptr[front[k] + 1]
                    stop = min(b, e + (cap - h))  # each edge keeps at most one entry: never past the buffer
                    if k + 8 < nf:  # the edge block a few sources ahead: one cache miss per source hidden
                        prefetch(dst, rowptr[front[k + 8]])
                    for x in range(e, stop):
                        j = dst[x]
                        hits[h] = j
                        h += (sbits[j >> 3] >> (j & 7)) & 1
                    if stop < b:
                        e = stop
                        break
                    k += 1
                    if k < nf:
                        e = rowptr[front[k]]
                for q in range(h):
                    if q + 32 < h:  # random writes into the stage bytes: ask for them well ahead
                        prefetch(st, hits[q + 32])
                    j = hits[q]
                    s = st[j]
                    if s == s_code:
                        st[j] = umarked
                        cand[nc] = j
                        nc += 1
                    else:
                        over |= s == np.uint8(255)
                        st[j] = s + np.uint8(1)
            return nc, over

        @numba.njit(cache=True, error_model="numpy")
        def transmission(stage, timer, entered, carrier, rowptr, dst, weight, uniform_w, w0, layer, iota,
                          cf, use_cf, scale, use_scale, susc, use_susc, bdt, s_code, entry, cdf, k1, k2,
                          force, cand, front, infectious, hits, sbits, record, f_out, hit_out):  # pragma: no cover - compiled
            """One transmission step in place on ``stage``/``timer``/``entered``; returns the number of infections.

            Uniform pushes (one weight, no layer scale or contact factor, equal ``iota * carrier`` on
            every source) count contacts per target and rebuild the force as the same sequential
            float32 sum ``index_add`` makes; anything else sums the force in CSR edge order. The
            outputs are written only after every edge has been read, and sources are never
            susceptible, so marking targets in ``stage`` leaves every source's code intact."""
            st = stage.view(np.uint8)
            us = np.uint8(s_code)
            nf = frontier_bits(st, infectious, us, front, sbits)
            counted, c0 = False, np.float32(0)
            if uniform_w and not use_cf and not use_scale and nf > 0:
                counted = True
                c0 = iota[st[front[0]]] * carrier[front[0]] * w0
                for k in range(1, nf):
                    i = front[k]
                    if iota[st[i]] * carrier[i] * w0 != c0:
                        counted = False
                        break
            nc = 0
            if counted:
                nc, over = count_bits(st, rowptr, dst, front, nf, us, cand, hits, sbits)
                if over:
                    for k in range(nc):
                        st[cand[k]] = us
                    counted = False
            if not counted:
                nc = force_pass(stage, carrier, rowptr, dst, weight, layer, iota, cf, use_cf, scale, use_scale,
                                s_code, force, cand, front, nf)
            if nc > (st.shape[0] >> 6):
                # many candidates: list them again in agent order (one branch-free sweep over the bytes),
                # so the candidate loop here and the compiled backward visit memory in order
                nc = 0
                n = st.shape[0]
                words = st[: (n >> 3) << 3].view(np.uint64)
                high = np.uint64(0x8080808080808080)
                for b in range(n >> 3):
                    if words[b] & high == 0:
                        continue  # no candidate among these eight agents
                    for q in range(8):
                        i = (b << 3) + q
                        cand[nc] = i
                        nc += st[i] >= umarked
                for i in range(n & ~7, n):
                    cand[nc] = i
                    nc += st[i] >= umarked
            events = 0
            for k in range(nc):
                if k + 16 < nc:
                    prefetch(st, cand[k + 16])
                j = cand[k]
                if counted:
                    f = np.float32(0)
                    for _ in range(np.int32(st[j]) - 127):  # the same sequential float32 sum as index_add
                        f += c0
                else:
                    f = force[j]
                    force[j] = 0
                st[j] = us
                lam = bdt * f
                if use_susc:
                    lam = lam * susc[j]
                u = uniform(j, k1, k2)
                if record:  # what the compiled backward needs: the candidate's force and outcome
                    f_out[k] = f
                    hit_out[k] = 0
                # p = -expm1(-lam) <= lam (also after float32 rounding): u >= lam means no event,
                # without evaluating expm1 for most candidates
                if u >= lam:
                    continue
                p = -np.expm1(-lam)
                if u < p:
                    if record:
                        hit_out[k] = 1
                    stage[j] = entry
                    entered[j] = entry
                    # pending (negative) timer: the dwell starts at the next progression (the torch path's convention)
                    timer[j] = -inverse_cdf(cdf, entry, u / max(p, tiny))
                    events += 1
            return events, nf, nc

        @numba.njit(cache=True, error_model="numpy")
        def transmission_backward(grad, carrier, front, src_stage, src_load, cand, fc, hit, rowptr, dst, weight, layer,
                                  iota, scale, use_scale, susc, use_susc, bdt, presence, rec, hit_L, cbits, hbits,
                                  hit_e, hit_a, memo, gcar):  # pragma: no cover - compiled
            """Gradient of one compiled transmission step: ``gcar`` (onto the input carrier) and d/d(beta dt).

            The same chain rule torch's autograd applies to the torch path (``carrier * q / sg(q)``
            at the candidates, ``lambda = beta dt F susc``, ``F`` summed over the frontier's edges),
            plus the presence coupling's per-edge credit (:func:`substeps.epidemic.dynamics._presence_delta`),
            recomputed from the frontier as the torch path's backward does. Each candidate's terms go
            to one 8-byte record ``rec[j] = (dL/dF, dL/dfactor)`` (infected ones also to a bitmask and
            their hazard to ``hit_L``). The frontier's edges are swept in chunks as in the forward's
            count: a read-only pass keeps the edges whose target's candidate bit (a cached bitmask)
            is set, then only those read their target's record, prefetched well ahead; each source
            sums its edges in CSR order, so the result does not depend on the chunking.
            Per-candidate transcendentals are memoised by hazard (counted forces repeat a few
            values), a source's survival credit across its edges with the same hazard."""
            nc = cand.shape[0]
            nf = front.shape[0]
            gbdt = 0.0
            for k in range(gcar.shape[0]):
                gcar[k] = grad[k]
            # memo rows (lam, expm1(-lam), hazard, exp(-lam)), direct-mapped by the hazard's bits
            mask = memo.shape[0] - 1
            for x in range(memo.shape[0]):
                memo[x, 0] = np.float32(-1)
            fbits = np.empty(1, np.float32)
            ubits = fbits.view(np.uint32)
            rec_flat = rec.reshape(-1)  # prefetch takes one index
            for k in range(nc):
                if k + 16 < nc:
                    jj = cand[k + 16]
                    prefetch(rec_flat, 2 * jj)
                    prefetch(grad, jj)
                    prefetch(carrier, jj)
                j = cand[k]
                cbits[j >> 3] |= np.uint8(1) << np.uint8(j & 7)
                f = fc[k]
                lam1 = bdt * f
                s_j = susc[j] if use_susc else np.float32(1)
                lam = lam1 * s_j if use_susc else lam1
                fbits[0] = lam
                ub = ubits[0]
                slot = ((ub ^ (ub >> np.uint32(13))) * np.uint32(0x9E3779B1)) >> np.uint32(22)
                slot = np.int64(slot) & mask
                if memo[slot, 0] != lam:
                    e = np.expm1(-lam)
                    memo[slot, 0] = lam
                    memo[slot, 1] = e
                    memo[slot, 2] = -np.log1p(e)  # the hazard as the torch path's presence backward recomputes it
                    memo[slot, 3] = np.exp(-lam)
                e = memo[slot, 1]
                L = memo[slot, 2]
                q_s = memo[slot, 3]
                g = grad[j] * carrier[j]
                if hit[k]:
                    q = -e
                    glam = g / max(q, tiny) * (e + np.float32(1))
                else:
                    glam = -(g / max(q_s, tiny) * q_s)
                glam1 = glam * s_j if use_susc else glam
                gbdt += np.float64(glam1) * np.float64(f)
                rec[j, 0] = glam1 * bdt
                rec[j, 1] = g
                if hit[k]:
                    hbits[j >> 3] |= np.uint8(1) << np.uint8(j & 7)
                    hit_L[j] = L
            wide = src_load.shape[1] > 1
            cap = hit_e.shape[0]
            # the current source's sums (carried across chunks: a hub's edges may span several)
            cur = -1
            lin = np.float32(0)  # sum over edges of dL/dF * weight (* scale), times iota at the flush: torch's order
            pres = np.float32(0)
            io = np.float32(0)
            last_h = np.float32(-1)
            last_A = np.float32(-1)
            eA = np.float32(0)
            surv = np.float32(0)
            a = 0
            e0 = rowptr[front[0]] if nf > 0 else 0
            while a < nf:
                # pass 1: edges into candidates (candidate bitmask only), sequential over the chunk's rows
                h = 0
                while a < nf:
                    b = rowptr[front[a] + 1]
                    stop = min(b, e0 + (cap - h))
                    if a + 8 < nf:
                        prefetch(dst, rowptr[front[a + 8]])
                    for x in range(e0, stop):
                        j = dst[x]
                        hit_e[h] = x
                        hit_a[h] = a
                        h += (cbits[j >> 3] >> (j & 7)) & 1
                    if stop < b:
                        e0 = stop
                        break
                    a += 1
                    if a < nf:
                        e0 = rowptr[front[a]]
                # pass 2: those edges' records, prefetched ahead; each source's sums in edge order
                for q in range(h):
                    if q + 16 < h:
                        jj = dst[hit_e[q + 16]]
                        prefetch(rec_flat, 2 * jj)
                        if use_susc:
                            prefetch(susc, jj)
                    s = hit_a[q]
                    if s != cur:
                        if cur >= 0:
                            gcar[front[cur]] += lin * io + pres
                        cur = s
                        io = iota[src_stage[s]]
                        lin = np.float32(0)
                        pres = np.float32(0)
                        last_h = np.float32(-1)
                        last_A = np.float32(-1)
                    e_ = hit_e[q]
                    j = dst[e_]
                    gF = rec[j, 0]
                    if use_scale:
                        lin += gF * scale[layer[e_]] * weight[e_]
                    else:
                        lin += gF * weight[e_]
                    if presence:
                        # hazard = edge part x source part; A = edge part x the source's accumulated load
                        he = bdt * weight[e_]
                        if use_susc:
                            he = he * susc[j]
                        hz = he * io
                        if use_scale:
                            hz = hz * scale[layer[e_]]
                        A = he * src_load[s, layer[e_] if wide else 0]
                        if hz != last_h or A != last_A:
                            last_h = hz
                            last_A = A
                            eA = np.exp(A)
                            surv = hz - eA * np.expm1(hz)
                        if (hbits[j >> 3] >> (j & 7)) & 1:
                            Lj = hit_L[j]
                            pL = max(-np.expm1(-Lj), tiny)
                            d = eA * (np.float32(1) - (-np.expm1(-max(Lj - hz, np.float32(0)))) / pL) - hz * np.exp(-Lj) / pL
                        else:
                            d = surv
                        pres += d * rec[j, 1]
            if cur >= 0:
                gcar[front[cur]] += lin * io + pres
            for k in range(nc):
                cbits[cand[k] >> 3] = 0
                hbits[cand[k] >> 3] = 0
            return gbdt

        @numba.njit(cache=True, error_model="numpy")
        def progression(stage, timer, entered_in, fresh_valid, first, to, cdf, alt_src, alt_dst, q, k1, k2,
                         stage_out, timer_out, entered_out):  # pragma: no cover - compiled
            """One progression step into the ``*_out`` arrays: count-downs without branches, movers drawn."""
            n = stage.shape[0]
            per_agent = q.shape[1] > 1
            # first the count-downs of every agent, branch-free so the loop vectorizes (a full-N pass every
            # step), then the rare movers (timer 1, not fresh) in a second sweep over the timers
            if fresh_valid:
                for i in range(n):
                    e = entered_in[i]
                    tm = timer[i]
                    entered_out[i] = e
                    stage_out[i] = stage[i]
                    fresh = first | (e >= 0) | (tm < 0)
                    timer_out[i] = abs(tm) if fresh else tm - np.int16(tm > 0)
            else:
                for i in range(n):
                    tm = timer[i]
                    entered_out[i] = np.int8(-1)
                    stage_out[i] = stage[i]
                    fresh = first | (tm < 0)
                    timer_out[i] = abs(tm) if fresh else tm - np.int16(tm > 0)
            if first:
                return
            for i in range(n):
                if timer[i] != 1 or (fresh_valid and entered_in[i] >= 0):
                    continue
                s = stage[i]
                new = to[s]
                u = uniform(i, k1, k2)
                ud = u
                for a in range(alt_src.shape[0]):
                    if s == alt_src[a]:
                        qa = q[a, i] if per_agent else q[a, 0]
                        if u < qa:
                            new = alt_dst[a]
                            ud = u / max(qa, tiny)
                        else:
                            ud = (u - qa) / max(np.float32(1) - qa, tiny)
                stage_out[i] = new
                entered_out[i] = new
                timer_out[i] = inverse_cdf(cdf, new, ud)

        _KERNELS.update(transmission=transmission, transmission_backward=transmission_backward,
                        progression=progression, frontier_bits=frontier_bits, count_bits=count_bits)
    return _KERNELS


_WORK: dict[int, tuple[np.ndarray, ...]] = {}


def _infectious_bytes(iota: Tensor) -> np.ndarray:
    """``uint8 [256]``: 1 at the stage codes with positive infectiousness (indexed by the code's byte)."""
    table = np.zeros(256, np.uint8)
    table[: iota.numel()] = (iota > 0).numpy()
    return table


def _workspace(n: int) -> tuple[np.ndarray, ...]:
    """Zeroed force ``[N] float32``, candidate and frontier lists ``[N]``, an edge-sweep buffer, the susceptible bitmask.

    The kernel returns the force to zero on exit (it resets exactly the entries it
    touched) and overwrites the rest before reading it, so the buffers carry nothing
    between calls; they exist to avoid O(N) allocations and clears per step.
    """
    if n not in _WORK:
        if len(_WORK) > 4:
            _WORK.clear()
        index = np.int32 if n < 2**31 else np.int64
        _WORK[n] = (np.zeros(n, np.float32), np.empty(n, index), np.empty(n, index), np.empty(min(n, 1 << 20) + 16, index),
                    np.empty((n + 7) >> 3, np.uint8))
    return _WORK[n]


_CONST_W: dict[int, tuple[weakref.ref, int, float | None]] = {}


def _constant_weight(weight: Tensor) -> float | None:
    """The one value of ``weight`` if all edges share it, else None (checked once per weight tensor and version)."""
    hit = _CONST_W.get(id(weight))
    if hit is not None and hit[0]() is weight and hit[1] == weight._version:
        return hit[2]
    w = weight.detach()
    value = float(w[0]) if w.numel() and bool((w == w[0]).all()) else None
    if len(_CONST_W) > 16:
        _CONST_W.clear()
    _CONST_W[id(weight)] = (weakref.ref(weight), weight._version, value)
    return value


_SYS: dict[tuple[int, ...], tuple] = {}


def _system_arrays(net, iota: Tensor, cdf: Tensor) -> tuple:
    """NumPy views of what a run never changes (the network's arrays, infectiousness, dwell CDFs), made once per system.

    Per step this saves a dozen tensor-to-array conversions and the infectious-code table: at N = 1e5
    a step's Python overhead is as large as its kernels. Tensors modified in place (their version)
    are seen, and the cache holds only weak references to them."""
    parts = (net.rowptr, net.edge_index, net.weight, net.layer, iota, cdf)
    key = tuple(id(x) for x in parts)
    hit = _SYS.get(key)
    if hit is not None and all(r() is x for r, x in zip(hit[0], parts)) and hit[1] == tuple(x._version for x in parts):
        return hit[2]
    arrays = (_np(net.rowptr), _np(net.edge_index[1]), _np(net.weight), _np(net.layer), _np(iota), _np(cdf),
              _infectious_bytes(iota), _constant_weight(net.weight))
    if len(_SYS) > 16:
        _SYS.clear()
    _SYS[key] = (tuple(weakref.ref(x) for x in parts), tuple(x._version for x in parts), arrays)
    return arrays


_STEP: dict[int, Tensor] = {}


def _step_tensor(t: int) -> Tensor:
    """``torch.tensor(t)`` (CPU), one per step number: a state's ``entered_step`` is read, never written in place."""
    x = _STEP.get(t)
    if x is None:
        if len(_STEP) > 100_000:
            _STEP.clear()
        x = _STEP[t] = torch.tensor(t)
    return x


_EMPTY = (np.zeros((1, 1), np.float32), np.zeros(1, np.float32), np.zeros(1, np.uint8))


def _needs_grad(*xs: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in xs)


def applies(state: "EpiState") -> bool:
    """Whether the compiled kernels can run on this state (numba enabled, CPU tensors)."""
    return compiled_available() and state.stage.device.type == "cpu"


def _np(x: Tensor) -> np.ndarray:
    return x.detach().numpy()


_F32 = torch.float32


def fused_transmission(sub: "Transmission", params: "Params", system: "EpiSystem", state: "EpiState", t: int,
                       rng: torch.Generator) -> "EpiState | None":
    """Transmission's step by the compiled kernel, or ``None`` where the torch path must run.

    Under autograd (``beta`` or the carrier needs a gradient) the step runs as
    :class:`_CompiledTransmission`, whose backward is a compiled twin of what torch's autograd
    does on the torch path (same estimator); contact factors, and layer scales or
    susceptibilities that themselves need gradients, leave it to the torch path.
    """
    if not sub.network or system.network is None or not applies(state) or is_replicated(rng):
        return None  # a replicate batch keys draws per replicate: the torch path handles it
    beta = getattr(params, sub.beta)
    if beta.numel() != 1:
        return None  # the torch path reports the error
    scale = state.layer_scale if sub.use_layer_scale else None
    cf = state.contact_factor if sub.use_contact_factor else None
    susc = state.susceptibility if sub.use_susceptibility else None
    net = system.network
    grad = _needs_grad(beta, state.carrier, scale, cf, susc)
    if grad and (cf is not None or _needs_grad(scale, susc)):
        return None
    if any(x is not None and x.dtype != _F32 for x in (state.carrier, net.weight, scale, cf, susc)):
        return None
    d = sub.disease
    iota, cdf = system.infectiousness, system.dwell_cdf
    n = state.stage.numel()
    stage, timer = state.stage.clone(), state.timer.clone()
    # what an earlier substep of this step wrote stays (as in the torch path's _entered_this_step)
    same_step = state.entered_step is not None and int(state.entered_step) == t
    entered = state.entered.clone() if same_step else torch.full_like(state.entered, -1)
    bdt = np.float32((beta.detach().to(_F32) * d.dt).item())
    rowptr_np, dst_np, weight_np, layer_np, iota_np, cdf_np, infectious, w_const = _system_arrays(net, iota, cdf)
    k1, k2 = stream_key(rng, t)
    force, cand, front, hits, sbits = _workspace(n)
    empty2, empty1, empty_u8 = _EMPTY
    f_out, hit_out = _record_space(n) if grad else (empty1, empty_u8)
    scale_np = _np(scale) if scale is not None else empty1
    susc_np = _np(susc) if susc is not None else empty1
    _, nf, nc = _kernels()["transmission"](
        stage.numpy(), timer.numpy(), entered.numpy(), _np(state.carrier), rowptr_np, dst_np,
        weight_np, w_const is not None, np.float32(w_const or 0.0), layer_np, iota_np,
        _np(cf) if cf is not None else empty2, cf is not None, scale_np, scale is not None, susc_np, susc is not None,
        bdt, np.int8(d.code(d.susceptible)), np.int8(d.code(d.entry)), cdf_np, k1, k2, force, cand, front,
        infectious, hits, sbits, grad, f_out, hit_out)
    extra = {}
    carrier = state.carrier
    if grad:
        idx = torch.from_numpy(front[:nf].copy())
        presence = sub.estimator != "linear"
        src_load = np.zeros((nf, 1), np.float32)
        if presence:
            load = state.source_load
            if load is None:
                load = torch.zeros((n, sub._load_width(system)), dtype=torch.float32)
            src_load = load.index_select(0, idx).numpy()
            # the torch path's own accumulation (same operations, so the same bits)
            extra["source_load"] = sub._accumulate_load(system, state, load, iota, idx)
        saved = _StepRecord(
            front=idx.numpy(), src_stage=state.stage.numpy()[idx.numpy()], cand=cand[:nc].copy(), fc=f_out[:nc].copy(),
            hit=hit_out[:nc].copy(), src_load=src_load,
            net=net, iota=_np(iota), scale=scale_np, use_scale=scale is not None, susc=susc_np,
            use_susc=susc is not None, bdt=bdt, dt=float(d.dt), presence=presence)
        carrier = _CompiledTransmission.apply(state.carrier, beta, saved)
    return state.replace(**extra, stage=stage, timer=timer, carrier=carrier, entered=entered, entered_step=_step_tensor(t))


class _StepRecord:
    """What one compiled transmission step keeps for its backward: O(frontier + candidates), no per-edge array."""

    def __init__(self, **fields: object) -> None:
        self.__dict__.update(fields)


_RECORD: dict[int, tuple[np.ndarray, np.ndarray]] = {}
_BACK: dict[int, tuple[np.ndarray, ...]] = {}


def _record_space(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-candidate force ``[N] float32`` and outcome ``[N] uint8`` buffers (copied out after each step)."""
    if n not in _RECORD:
        if len(_RECORD) > 4:
            _RECORD.clear()
        _RECORD[n] = (np.empty(n, np.float32), np.empty(n, np.uint8))
    return _RECORD[n]


def _backward_space(n: int) -> tuple[np.ndarray, ...]:
    """Per-agent candidate records ``[N, 2]`` and hazards ``[N]`` (float32), candidate and infection bitmasks
    all 0 (the backward kernel clears the bits it sets; records are read only where a bit is set), the
    edge-sweep buffers (edge, source) and the transcendental memo ``[1024, 4]``."""
    if n not in _BACK:
        if len(_BACK) > 4:
            _BACK.clear()
        cap = min(n, 1 << 14) + 16
        _BACK[n] = (np.empty((n, 2), np.float32), np.empty(n, np.float32), np.zeros((n + 7) >> 3, np.uint8),
                    np.zeros((n + 7) >> 3, np.uint8), np.empty(cap, np.int64),
                    np.empty(cap, np.int32 if n < 2**31 else np.int64), np.empty((1024, 4), np.float32))
    return _BACK[n]


class _CompiledTransmission(torch.autograd.Function):
    """Carrier after one transmission step (value unchanged); backward by :func:`transmission_backward`.

    The forward ran in the compiled kernel (``fused_transmission``); this node only carries
    the step's record, so autograd keeps one node per step instead of the torch path's dozens.
    """

    @staticmethod
    def forward(ctx, carrier: Tensor, beta: Tensor, rec: _StepRecord) -> Tensor:  # type: ignore[override]
        """The carrier times ``q / sg(q) (+ 0)`` at the candidates: exactly its value."""
        ctx.rec = rec
        ctx.beta_shape = beta.shape
        ctx.save_for_backward(carrier)
        return carrier.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        """Gradient onto the input carrier and ``beta``: the torch path's chain rule, compiled."""
        (carrier,) = ctx.saved_tensors
        r = ctx.rec
        net = r.net
        g = grad.detach().to(_F32).contiguous()
        gcar = torch.empty_like(g)
        gbdt = _kernels()["transmission_backward"](
            g.numpy(), _np(carrier), r.front, r.src_stage, r.src_load, r.cand, r.fc, r.hit, _np(net.rowptr),
            _np(net.edge_index[1]), _np(net.weight), _np(net.layer), r.iota, r.scale, r.use_scale, r.susc, r.use_susc,
            r.bdt, r.presence, *_backward_space(carrier.numel()), gcar.numpy())
        gbeta = torch.full(ctx.beta_shape, gbdt * r.dt, dtype=grad.dtype) if ctx.needs_input_grad[1] else None
        return gcar, gbeta, None


def fused_progression(sub: "Progression", params: "Params", system: "EpiSystem", state: "EpiState", t: int,
                      rng: torch.Generator) -> "EpiState | None":
    """Progression's step by the compiled kernel, or ``None`` where the torch path must run.

    Progression's only differentiable output is the branch factor on the carrier, so the
    kernel also runs under autograd when no branch probability carries a gradient.
    """
    if not applies(state) or is_replicated(rng):
        return None
    n = state.stage.numel()
    qs = []
    for _, _, prob_fn in sub._alts:
        q = torch.as_tensor(prob_fn(params, system, state), device=state.stage.device).to(_F32)
        if _needs_grad(q) or q.numel() not in (1, n):
            return None
        qs.append(q.detach().reshape(-1))
    if any(q.numel() == n for q in qs):
        qarr = torch.stack([q.expand(n) for q in qs]).numpy()
    elif qs:
        qarr = torch.stack(qs).numpy()
    else:
        qarr = _NO_ALT[0]
    alts = _ALTS.get(id(sub))
    if alts is None or alts[0] is not sub._alts:
        if len(_ALTS) > 64:
            _ALTS.clear()
        alts = _ALTS[id(sub)] = (sub._alts, np.array([a[0] for a in sub._alts], dtype=np.int8),
                                 np.array([a[1] for a in sub._alts], dtype=np.int8))
    _, alt_src, alt_dst = alts
    fresh_valid = state.entered_step is not None and int(state.entered_step) == t
    stage, timer, entered = torch.empty_like(state.stage), torch.empty_like(state.timer), torch.empty_like(state.entered)
    k1, k2 = stream_key(rng, t)
    first = state.entered_step is None
    _kernels()["progression"](state.stage.numpy(), state.timer.numpy(), state.entered.numpy(), fresh_valid, first,
                              _np(system.next_stage), _np(system.dwell_cdf), alt_src, alt_dst, qarr, k1, k2, stage.numpy(), timer.numpy(),
                              entered.numpy())
    return state.replace(stage=stage, timer=timer, carrier=state.carrier, entered=entered, entered_step=_step_tensor(t))


_NO_ALT = (np.zeros((0, 1), np.float32),)
_ALTS: dict[int, tuple] = {}
