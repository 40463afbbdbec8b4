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
        nan = np.float32(np.nan)

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
        def count_bits(st, rowptr, dst, front, nf, s_code, cand, hits, sbits, erec, ej, ecnt):  # pragma: no cover - compiled
            """Count the infectious contacts of susceptible targets in their stage byte (uint8: 128 = one, 255 = 128).

            Per chunk of sources, a read-only sweep over their edges keeps the targets whose susceptible
            bit is set (a cached bitmask, not the stage bytes), then only those bytes are written; the
            other edges (to infectious or recovered agents) cost no random access to the stage array.
            Returns (candidates, overflow, recorded edges): on overflow a target met more than 128 sources
            and its byte wrapped; the caller then restores every candidate and runs the force pass. With
            ``erec`` the edges into candidates are also listed for the compiled backward, which then need
            not sweep the frontier's edges again: their targets in order into ``ej``, their number per
            source into ``ecnt`` (``ej`` holds every frontier edge at most: the network's edge count)."""
            nc = 0
            over = False
            cap = hits.shape[0]
            k = 0
            r = 0
            if erec:
                for q in range(nf):
                    ecnt[q] = 0
            e = rowptr[front[0]] if nf > 0 else 0
            while k < nf:
                h = 0
                while k < nf:
                    b = rowptr[front[k] + 1]
                    stop = min(b, e + (cap - h))  # each edge keeps at most one entry: never past the buffer
                    if k + 16 < nf:  # the edge block of a source well ahead (both ends: a row may straddle two lines)
                        ahead = front[k + 16]
                        prefetch(dst, rowptr[ahead])
                        prefetch(dst, rowptr[ahead + 1] - 1)
                    h0 = h
                    for x in range(e, stop):
                        j = dst[x]
                        hits[h] = j
                        h += (sbits[j >> 3] >> (j & 7)) & 1
                    if erec:
                        ecnt[k] += h - h0
                    if stop < b:
                        e = stop
                        break
                    k += 1
                    if k < nf:
                        e = rowptr[front[k]]
                if erec:
                    ej[r: r + h] = hits[:h]
                    r += h
                for q in range(h):
                    if q + 64 < h:  # random writes into the stage bytes: ask for them well ahead
                        prefetch(st, hits[q + 64])
                    j = hits[q]
                    s = st[j]
                    # branch-free: a first visit lists the target and marks it, a later one counts (first and
                    # later visits interleave unpredictably, a branch here mispredicts about a third of the time)
                    first = s == s_code
                    cand[nc] = j
                    nc += first
                    over |= s == np.uint8(255)
                    st[j] = umarked if first else s + np.uint8(1)
            return nc, over, r

        @numba.njit(cache=True, error_model="numpy")
        def transmission(stage, timer, entered, carrier, rowptr, dst, weight, uniform_w, w0, layer, iota,
                          cf, use_cf, scale, use_scale, susc, use_susc, bdt, s_code, entry, cdf, k1, k2,
                          force, cand, front, infectious, hits, sbits, record, f_out, hit_out, ej, ecnt):  # pragma: no cover - compiled
            """One transmission step in place on ``stage``/``timer``/``entered``: ``(infections, frontier, candidates,
            listed edges)`` (the last -1 unless the candidates' edges were listed into ``ej``/``ecnt``).

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
            ne = -1  # edges into candidates listed for the backward (-1: none listed)
            if counted:
                # the backward's fast path (one weight, no susceptibility) reads the listed edges; ej holds
                # every edge of the network or nothing (no listing)
                erec = record and not use_susc and ej.shape[0] == dst.shape[0]
                nc, over, ne = count_bits(st, rowptr, dst, front, nf, us, cand, hits, sbits, erec, ej, ecnt)
                if not erec:
                    ne = -1
                if over:
                    for k in range(nc):
                        st[cand[k]] = us
                    counted = False
                    ne = -1
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
            if counted:
                # the same sequential float32 sums as index_add makes, for every count a byte can hold
                sums = np.empty(129, np.float32)
                sums[0] = np.float32(0)
                for c in range(1, 129):
                    sums[c] = sums[c - 1] + c0
            for k in range(nc):
                if k + 16 < nc:
                    prefetch(st, cand[k + 16])
                j = cand[k]
                if counted:
                    f = sums[np.int32(st[j]) - 127]
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
            return events, nf, nc, ne

        @numba.njit(inline="always")
        def _pair_slot(fbits, ubits, x, y, mask):  # pragma: no cover - compiled
            """Direct-mapped memo slot of a pair of float32 values (their bits hashed)."""
            fbits[0] = x
            ub = ubits[0]
            fbits[0] = y
            ub = ub ^ (ubits[0] * np.uint32(0x85EBCA6B))
            return np.int64(((ub ^ (ub >> np.uint32(13))) * np.uint32(0x9E3779B1)) >> np.uint32(22)) & mask

        @numba.njit(inline="always")
        def _infection_credit(eA, hz, L, pL, eL):  # pragma: no cover - compiled
            """Presence credit of an infection step: ``e^A (1 - (1 - e^-(L - h)) / (1 - e^-L)) - h e^-L / (1 - e^-L)``."""
            return eA * (np.float32(1) - (-np.expm1(-max(L - hz, np.float32(0)))) / pL) - hz * eL / pL

        @numba.njit(cache=True, error_model="numpy")
        def transmission_backward(grad, carrier, front, src_stage, src_load, cand, fc, hit, rowptr, dst, weight, layer,
                                  iota, scale, use_scale, susc, use_susc, bdt, presence, w_const, w0, ej, ecnt,
                                  rec, hrec, acc, cbits, hit_j, hit_x, hit_s, memo, gcar):  # pragma: no cover - compiled
            """Gradient of one compiled transmission step: ``gcar`` (onto the input carrier) and d/d(beta dt).

            The same chain rule torch's autograd applies to the torch path (``carrier * q / sg(q)``
            at the candidates, ``lambda = beta dt F susc``, ``F`` summed over the frontier's edges),
            plus the presence coupling's per-edge credit (:func:`substeps.epidemic.dynamics._presence_delta`),
            recomputed from the frontier as the torch path's backward does.

            First each candidate's terms go to a record read by its edges: an infected candidate's
            holds NaN, which the edge sweep tests instead of a bitmask, and its terms go to ``hrec``
            (``g``, its hazard ``L``, ``1 - e^-L``, ``e^-L``, ``dL/dF``). On the *plain* path (one
            weight, no layer scale, no susceptibility, one load column) a survivor's ``dL/dF`` is
            ``-g beta dt``, so its record is ``g`` alone (4 bytes) and a source needs one sum over its
            surviving contacts, times a coefficient memoised per (hazard, load); the general path
            keeps ``(dL/dF, g)`` and the per-edge terms. Then the edges into candidates: the
            forward's own list of them (``ej``, ``ecnt``) when it made one, else a chunked sweep over
            the frontier's edges that keeps those whose target's candidate bit (a cached bitmask) is
            set; each record is prefetched well ahead and each source sums its edges in CSR order,
            so the result does not depend on the chunking. Per-candidate transcendentals are
            memoised by hazard (counted forces repeat a few values)."""
            nc = cand.shape[0]
            nf = front.shape[0]
            gbdt = 0.0
            for k in range(gcar.shape[0]):
                gcar[k] = grad[k]
            wide = src_load.shape[1] > 1
            plain = w_const and not use_scale and not use_susc and not wide
            listed = plain and ecnt.shape[0] == nf and nf > 0
            # memo columns: 0-5 by the candidate's hazard (lam, expm1(-lam), L, exp(-lam), 1 - e^-L, e^-L),
            # 6-8 by a source's (load, hazard) pair (A, h, its survival coefficient)
            mask = memo.shape[0] - 1
            for x in range(memo.shape[0]):
                memo[x, 0] = np.float32(-1)
                memo[x, 6] = np.float32(-1)
            fbits = np.empty(1, np.float32)
            ubits = fbits.view(np.uint32)
            rec_flat = rec.reshape(-1)  # prefetch takes one index; the plain path's records are its first N entries
            stride = 1 if plain else 2
            for k in range(nc):
                if k + 16 < nc:
                    jj = cand[k + 16]
                    prefetch(rec_flat, stride * jj)
                    prefetch(grad, jj)
                    prefetch(carrier, jj)
                j = cand[k]
                if not listed:
                    cbits[j >> 3] |= np.uint8(1) << np.uint8(j & 7)
                f = fc[k]
                lam1 = bdt * f
                s_j = susc[j] if use_susc else np.float32(1)
                lam = lam1 * s_j if use_susc else lam1
                fbits[0] = lam
                ub = ubits[0]
                slot = np.int64(((ub ^ (ub >> np.uint32(13))) * np.uint32(0x9E3779B1)) >> np.uint32(22)) & mask
                if memo[slot, 0] != lam:
                    e = np.expm1(-lam)
                    memo[slot, 0] = lam
                    memo[slot, 1] = e
                    L = -np.log1p(e)  # the hazard as the torch path's presence backward recomputes it
                    memo[slot, 2] = L
                    memo[slot, 3] = np.exp(-lam)
                    memo[slot, 4] = max(-np.expm1(-L), tiny)
                    memo[slot, 5] = np.exp(-L)
                e = memo[slot, 1]
                q_s = memo[slot, 3]
                g = grad[j] * carrier[j]
                if hit[k]:
                    q = -e
                    glam = g / max(q, tiny) * (e + np.float32(1))
                else:
                    glam = -(g / max(q_s, tiny) * q_s)
                glam1 = glam * s_j if use_susc else glam
                gbdt += np.float64(glam1) * np.float64(f)
                if hit[k]:
                    hrec[j, 0] = g
                    hrec[j, 1] = memo[slot, 2]
                    hrec[j, 2] = memo[slot, 4]
                    hrec[j, 3] = memo[slot, 5]
                    hrec[j, 4] = glam1 * bdt
                    g = nan  # the record's mark of an infection
                elif g != g:
                    hrec[j, 1] = np.float32(-1)  # a survivor whose g is NaN: the NaN is the sum's, not a mark
                if plain:
                    rec_flat[j] = g
                else:
                    rec[j, 0] = glam1 * bdt
                    rec[j, 1] = g
            for s in range(nf):
                acc[s, 0] = np.float32(0)
                acc[s, 1] = np.float32(0)
                acc[s, 2] = np.float32(0)
            if listed:
                # the forward's list: each source's edges into candidates, in CSR order; survivors' g summed
                # (acc 0), an infection's dL/dF (acc 1) and presence credit times g (acc 2)
                ne = ej.shape[0]
                r = 0
                hz = np.float32(0)
                for s in range(nf):
                    t1 = np.float32(0)
                    t2 = np.float32(0)
                    t3 = np.float32(0)
                    for x in range(r, r + ecnt[s]):
                        if x + 64 < ne:
                            prefetch(rec_flat, ej[x + 64])
                        j = ej[x]
                        v = rec_flat[j]
                        if v == v:
                            t1 += v
                        elif hrec[j, 1] < 0:
                            t1 += v
                        else:
                            t2 += hrec[j, 4]
                            if presence:
                                hz = bdt * w0 * iota[src_stage[s]]
                                eA = np.exp(bdt * w0 * src_load[s, 0])
                                t3 += _infection_credit(eA, hz, hrec[j, 1], hrec[j, 2], hrec[j, 3]) * hrec[j, 0]
                    r += ecnt[s]
                    acc[s, 0] = t1
                    acc[s, 1] = t2
                    acc[s, 2] = t3
            else:
                cap = hit_j.shape[0]
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
                            hit_j[h] = j
                            hit_x[h] = x
                            hit_s[h] = a
                            h += (cbits[j >> 3] >> (j & 7)) & 1
                        if stop < b:
                            e0 = stop
                            break
                        a += 1
                        if a < nf:
                            e0 = rowptr[front[a]]
                    # pass 2: those edges' records, prefetched ahead; each source's sums in edge order
                    for q in range(h):
                        if q + 32 < h:
                            jj = hit_j[q + 32]
                            prefetch(rec_flat, stride * jj)
                            if use_susc:
                                prefetch(susc, jj)
                        s = hit_s[q]
                        j = hit_j[q]
                        if plain:
                            v = rec_flat[j]
                            if v == v:
                                acc[s, 0] += v
                            elif hrec[j, 1] < 0:
                                acc[s, 0] += v
                            else:
                                acc[s, 1] += hrec[j, 4]
                                if presence:
                                    hz = bdt * w0 * iota[src_stage[s]]
                                    eA = np.exp(bdt * w0 * src_load[s, 0])
                                    acc[s, 2] += _infection_credit(eA, hz, hrec[j, 1], hrec[j, 2], hrec[j, 3]) * hrec[j, 0]
                            continue
                        e_ = hit_x[q]
                        gF = rec[j, 0]
                        if use_scale:
                            acc[s, 0] += gF * scale[layer[e_]] * weight[e_]
                        else:
                            acc[s, 0] += gF * weight[e_]
                        if presence:
                            # hazard = edge part x source part; A = edge part x the source's accumulated load
                            he = bdt * weight[e_]
                            if use_susc:
                                he = he * susc[j]
                            hz = he * iota[src_stage[s]]
                            if use_scale:
                                hz = hz * scale[layer[e_]]
                            A = he * src_load[s, layer[e_] if wide else 0]
                            if hz != last_h or A != last_A:
                                last_h = hz
                                last_A = A
                                eA = np.exp(A)
                                surv = hz - eA * np.expm1(hz)
                            v = rec[j, 1]
                            if v == v or hrec[j, 1] < 0:
                                acc[s, 1] += surv * v
                            else:
                                acc[s, 1] += _infection_credit(eA, hz, hrec[j, 1], hrec[j, 2], hrec[j, 3]) * hrec[j, 0]
                for k in range(nc):
                    cbits[cand[k] >> 3] = 0
            # each source's sums into its carrier's gradient
            for s in range(nf):
                io = iota[src_stage[s]]
                if not plain:
                    gcar[front[s]] += acc[s, 0] * io + acc[s, 1]
                    continue
                hz = bdt * w0 * io
                if presence:
                    # a survivor's linear and presence terms together: -h g + (h - e^A expm1(h)) g = -e^A expm1(h) g
                    A = bdt * w0 * src_load[s, 0]
                    slot = _pair_slot(fbits, ubits, A, hz, mask)
                    if memo[slot, 6] != A or memo[slot, 7] != hz:
                        memo[slot, 6] = A
                        memo[slot, 7] = hz
                        memo[slot, 8] = -np.exp(A) * np.expm1(hz)
                    coef = memo[slot, 8]
                else:
                    coef = -hz
                gcar[front[s]] += acc[s, 0] * coef + acc[s, 1] * (w0 * io) + acc[s, 2]
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

        @numba.njit(cache=True)
        def accumulate_load(load, front, factor, out, src_load):  # pragma: no cover - compiled
            """``out = load`` plus ``factor`` at the frontier's rows (one float32 add each, as ``index_put`` of
            ``load[idx] + factor`` makes), and the frontier's rows before the add into ``src_load``."""
            out[:] = load
            for k in range(front.shape[0]):
                i = front[k]
                for c in range(load.shape[1]):
                    v = load[i, c]
                    src_load[k, c] = v
                    out[i, c] = v + factor[k, c]

        _KERNELS.update(transmission=transmission, transmission_backward=transmission_backward,
                        progression=progression, frontier_bits=frontier_bits, count_bits=count_bits,
                        accumulate_load=accumulate_load)
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
    f_out, hit_out, ej, ecnt = _record_space(n, dst_np.shape[0]) if grad else (empty1, empty_u8, _NO_EDGES, _NO_EDGES)
    scale_np = _np(scale) if scale is not None else empty1
    susc_np = _np(susc) if susc is not None else empty1
    _, nf, nc, ne = _kernels()["transmission"](
        stage.numpy(), timer.numpy(), entered.numpy(), _np(state.carrier), rowptr_np, dst_np,
        weight_np, w_const is not None, np.float32(w_const or 0.0), layer_np, iota_np,
        _np(cf) if cf is not None else empty2, cf is not None, scale_np, scale is not None, susc_np, susc is not None,
        bdt, np.int8(d.code(d.susceptible)), np.int8(d.code(d.entry)), cdf_np, k1, k2, force, cand, front,
        infectious, hits, sbits, grad, f_out, hit_out, ej, ecnt)
    extra: dict[str, Tensor] = {}
    carrier = state.carrier
    if grad:
        saved = _step_record(sub, system, state, iota, front[:nf], cand[:nc], f_out[:nc], hit_out[:nc],
                             ej[:ne] if ne >= 0 else None, ecnt[:nf], extra, w_const, scale_np, scale is not None,
                             susc_np, susc is not None, bdt)
        carrier = _CompiledTransmission.apply(state.carrier, beta, saved)
    return state.replace(**extra, stage=stage, timer=timer, carrier=carrier, entered=entered, entered_step=_step_tensor(t))


def _step_record(sub: "Transmission", system: "EpiSystem", state: "EpiState", iota: Tensor, front: np.ndarray,
                 cand: np.ndarray, fc: np.ndarray, hit: np.ndarray, ej: np.ndarray | None, ecnt: np.ndarray,
                 extra: dict[str, Tensor], w_const: float | None, scale: np.ndarray, use_scale: bool, susc: np.ndarray,
                 use_susc: bool, bdt: np.float32) -> "_StepRecord":
    """What the step's backward needs, copied out of the kernel's buffers; the presence estimator's source load into ``extra``."""
    n = state.stage.numel()
    front = front.copy()
    presence = sub.estimator != "linear"
    src_load = np.zeros((front.shape[0], 1), np.float32)
    if presence:
        load = state.source_load
        if load is None:
            load = torch.zeros((n, sub._load_width(system)), dtype=torch.float32)
        # the torch path's accumulation (load[idx] + the source factor: the same float32 adds, so the same bits),
        # in one compiled pass instead of gathers and an index_put on an [N, K] tensor
        factor = sub._source_factor(state, iota, torch.from_numpy(front)).contiguous().numpy()
        out = torch.empty((n, load.shape[1]), dtype=torch.float32)
        src_load = np.empty((front.shape[0], load.shape[1]), np.float32)
        _kernels()["accumulate_load"](load.detach().to(_F32).contiguous().numpy(), front, factor, out.numpy(), src_load)
        extra["source_load"] = out
    listed = ej is not None
    return _StepRecord(
        front=front, src_stage=state.stage.numpy()[front], cand=cand.copy(), fc=fc.copy(),
        hit=hit.copy(), src_load=src_load, ej=ej.copy() if listed else _NO_EDGES,
        ecnt=ecnt.copy() if listed else _NO_EDGES, w_const=w_const,
        net=system.network, iota=_np(iota), scale=scale, use_scale=use_scale, susc=susc,
        use_susc=use_susc, bdt=bdt, dt=float(sub.disease.dt), presence=presence)


class _StepRecord:
    """What one compiled transmission step keeps for its backward: O(frontier + candidates + the edges into candidates)."""

    def __init__(self, **fields: object) -> None:
        self.__dict__.update(fields)


_RECORD: dict[tuple[int, int], tuple[np.ndarray, ...]] = {}
_BACK: dict[int, tuple[np.ndarray, ...]] = {}
_NO_EDGES = np.zeros(0, np.int32)


def _record_space(n: int, edges: int) -> tuple[np.ndarray, ...]:
    """Per-candidate force ``[N] float32`` and outcome ``[N] uint8``, the listed edges' targets ``[E]`` and
    their count per frontier source ``[N] int32`` (copied out after each step)."""
    key = (n, edges)
    if key not in _RECORD:
        if len(_RECORD) > 4:
            _RECORD.clear()
        index = np.int32 if n < 2**31 else np.int64
        _RECORD[key] = (np.empty(n, np.float32), np.empty(n, np.uint8), np.empty(edges, index), np.empty(n, np.int32))
    return _RECORD[key]


def _backward_space(n: int) -> tuple[np.ndarray, ...]:
    """The backward kernel's buffers: candidate records ``[N, 2]``, infected candidates' records ``[N, 5]``,
    per-source sums ``[N, 3]`` (float32), the candidate bitmask all 0 (the kernel clears the bits it sets;
    records are read only where one is set or listed), the edge-sweep buffers (target, edge, source) and
    the transcendental memo ``[1024, 9]``."""
    if n not in _BACK:
        if len(_BACK) > 4:
            _BACK.clear()
        cap = min(n, 1 << 14) + 16
        index = np.int32 if n < 2**31 else np.int64
        _BACK[n] = (np.empty((n, 2), np.float32), np.empty((n, 5), np.float32), np.empty((n, 3), np.float32),
                    np.zeros((n + 7) >> 3, np.uint8), np.empty(cap, index), np.empty(cap, np.int64), np.empty(cap, index),
                    np.empty((1024, 9), np.float32))
    return _BACK[n]


class _CompiledTransmission(torch.autograd.Function):
    """Carrier after one transmission step (value unchanged); backward by :func:`transmission_backward`.

    The forward ran in the compiled kernel (``fused_transmission``); this node only carries
    the step's record, so autograd keeps one node per step instead of the torch path's dozens.
    """

    @staticmethod
    def forward(ctx, carrier: Tensor, beta: Tensor, rec: _StepRecord) -> Tensor:  # type: ignore[override]
        """The carrier times ``q / sg(q) (+ 0)`` at the candidates: exactly its value (a view, not a copy)."""
        ctx.rec = rec
        ctx.beta_shape = beta.shape
        ctx.save_for_backward(carrier)
        return carrier.view_as(carrier)

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
            r.bdt, r.presence, r.w_const is not None, np.float32(r.w_const or 0.0), r.ej, r.ecnt,
            *_backward_space(carrier.numel()), gcar.numpy())
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
