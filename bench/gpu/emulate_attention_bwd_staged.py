"""Emulation of attention_bwd_mma_staged_kernel (csrc/attention/cuda/attention_bwd_mma.cu) on
the CPU, to check its index math where no GPU is at hand: the kernel's statements run warp by
warp, lane-vectorised, in float64 (pack2 does not round), with ldmatrix (.trans) and the
mma.m16n8k16 operand / accumulator layouts as the PTX ISA defines them, shared memory as
2-byte slots with a race check across barrier epochs (cp.async copies are in flight until the
wait and barrier that follow them), 16-byte ldmatrix / 4-byte store alignment and bank-conflict
checks, and every dK / dV element written exactly once. The results are compared with a dense
float64 backward over ragged lengths, GQA, additive masks (with -inf and a fully masked row),
Dh != Dv and head dims 8..128. Keep it in step with the kernel when either changes.

    python bench/gpu/emulate_attention_bwd_staged.py   # about 30 s; exit 1 on a mismatch
"""
import itertools
import numpy as np

LANES = np.arange(32)
G, TT = LANES // 4, LANES % 4
LOG2E = 1.4426950408889634

class Smem:
    """Dynamic shared memory as 2-byte slots: 16-bit values in `h`, floats in `f` (by byte
    address / 4); hazards tracked per slot and barrier epoch."""
    def __init__(self, nbytes):
        self.n = nbytes // 2
        self.h = np.full(self.n, np.nan)            # uninitialised reads show as NaN
        self.f = np.full(nbytes // 4, np.nan)
        self.epoch = 0
        self.rd_epoch = np.full(self.n, -1); self.rd_mask = np.zeros(self.n, np.int64)
        self.wr_epoch = np.full(self.n, -1); self.wr_mask = np.zeros(self.n, np.int64)
        self.async_lo = np.full(self.n, -1); self.async_hi = np.full(self.n, -1)
        self.pending = []  # (slots, values) of cp.async copies not yet waited for
        self.races = 0
    def barrier(self):
        self.epoch += 1
    def _access(self, slots, warp, write):
        slots = np.asarray(slots).ravel()
        assert slots.min() >= 0 and slots.max() < self.n, "shared access out of range"
        e, bit = self.epoch, 1 << warp
        # another warp wrote / read these slots in this epoch
        other_w = (self.wr_epoch[slots] == e) & ((self.wr_mask[slots] & ~bit) != 0)
        other_r = (self.rd_epoch[slots] == e) & ((self.rd_mask[slots] & ~bit) != 0)
        in_flight = (self.async_lo[slots] <= e) & (e < self.async_hi[slots])
        bad = other_w | in_flight | (other_r if write else False)
        self.races += int(np.count_nonzero(bad))
        ep, mk = (self.wr_epoch, self.wr_mask) if write else (self.rd_epoch, self.rd_mask)
        fresh = ep[slots] != e
        mk[slots[fresh]] = 0
        ep[slots] = e
        np.bitwise_or.at(mk, slots, bit)
    def read16(self, slots, warp):
        self._access(slots, warp, False); return self.h[slots]
    def write16(self, slots, vals, warp):
        self._access(slots, warp, True); self.h[slots] = vals
    def read_f(self, byte_addr, warp):
        byte_addr = np.asarray(byte_addr)
        assert np.all(byte_addr % 4 == 0)
        self._access(np.stack([byte_addr // 2, byte_addr // 2 + 1]), warp, False)
        return self.f[byte_addr // 4]
    def write_f(self, byte_addr, vals, warp):
        byte_addr = np.asarray(byte_addr)
        self._access(np.stack([byte_addr // 2, byte_addr // 2 + 1]), warp, True)
        self.f[byte_addr // 4] = vals
    def cp_async(self, slots, vals, warp):
        # in flight from now until the wait + barrier that follows; any access before is a race
        self._access(slots, warp, True)
        self.pending.append((np.asarray(slots).ravel(), np.asarray(vals).ravel()))
        self.async_lo[slots] = self.epoch
        self.async_hi[slots] = 10**9
    def wait_all(self):
        # cp.async.wait_group 0 by every thread, then a barrier: the copies become visible in
        # the epoch after that barrier (the caller calls barrier() next).
        for slots, vals in self.pending:
            self.h[slots] = vals
            self.async_hi[slots] = self.epoch + 1
        self.pending = []

def check_banks_rows(addrs):
    """ldmatrix: per 8-lane phase (one 8x8 matrix), 8 rows of 16 bytes; conflict-free when
    their 16-byte bank groups differ."""
    assert np.all(addrs % 16 == 0), "ldmatrix row address not 16-byte aligned"
    for m in range(4):
        grp = (addrs[8 * m:8 * m + 8] // 16) % 8
        assert len(set(grp.tolist())) == 8, f"ldmatrix bank conflict: {addrs[8*m:8*m+8]}"

def ldmatrix_x4(smem, addrs, warp, trans=False):
    """addrs: 32 byte addresses (lane i: row i % 8 of matrix i / 8). Returns 4 registers,
    each (32, 2): (low, high) 16-bit halves."""
    addrs = np.asarray(addrs, dtype=np.int64)
    check_banks_rows(addrs)
    regs = []
    for m in range(4):
        rows = addrs[8 * m:8 * m + 8] // 2                      # slot of each row's first element
        mat = smem.read16(rows[:, None] + np.arange(8)[None, :], warp)  # mat[row][col]
        if trans:
            lo, hi = mat[2 * TT, G], mat[2 * TT + 1, G]
        else:
            lo, hi = mat[G, 2 * TT], mat[G, 2 * TT + 1]
        regs.append(np.stack([lo, hi], axis=1))
    return regs

def mma16816(c, a, b0, b1):
    """c: (32, 4) float; a: 4 regs (32, 2); b0, b1 (32, 2). PTX m16n8k16 row.col layouts."""
    A = np.zeros((16, 16)); B = np.zeros((16, 8))
    for h in range(2):
        A[G, 2 * TT + h] = a[0][:, h]; A[G + 8, 2 * TT + h] = a[1][:, h]
        A[G, 2 * TT + 8 + h] = a[2][:, h]; A[G + 8, 2 * TT + 8 + h] = a[3][:, h]
        B[2 * TT + h, G] = b0[:, h]; B[2 * TT + 8 + h, G] = b1[:, h]
    C = np.zeros((16, 8))
    C[G, 2 * TT] = c[:, 0]; C[G, 2 * TT + 1] = c[:, 1]
    C[G + 8, 2 * TT] = c[:, 2]; C[G + 8, 2 * TT + 1] = c[:, 3]
    C = C + A @ B
    return np.stack([C[G, 2 * TT], C[G, 2 * TT + 1], C[G + 8, 2 * TT], C[G + 8, 2 * TT + 1]], 1)

def exp2_ftz(x):
    with np.errstate(invalid="ignore", over="ignore"):
        y = np.exp2(x)
    return np.where(y < 2.0 ** -126, 0.0, y)

def check_store_banks(byte_addrs):
    assert np.all(byte_addrs % 4 == 0)
    words = byte_addrs // 4
    assert len(set((words % 32).tolist())) == 32, "32-bit store bank conflict"

def run_kernel(P, DP=128):
    """P: dict with q, k, v, do (flat float64), lse, delta, shapes, mask (or None), strides."""
    kWarps, kThreads, kKeys, BM = 8, 256, 128, 64
    LD, LDS = DP + 8, BM + 8
    kDepth, kKvDims, kQDims = DP // 16, DP // 2, DP // 4
    S2 = 2  # sizeof(T)
    kRowBytes, kSRowBytes = LD * S2, LDS * S2
    kBufferBytes = BM * kRowBytes
    kSmem = 2 * (LD * (2 * kKeys + 4 * BM) + 2 * kKeys * LDS) + 4 * 4 * BM
    # byte offsets of the regions, as the kernel's pointer arithmetic
    oK = 0; oV = oK + kKeys * LD * S2; oQ = oV + kKeys * LD * S2; odO = oQ + 2 * BM * LD * S2
    oP = odO + 2 * BM * LD * S2; odS = oP + kKeys * LDS * S2; oLse = odS + kKeys * LDS * S2
    oDelta = oLse + 2 * BM * 4
    assert oDelta + 2 * BM * 4 == kSmem
    assert all(o % 16 == 0 for o in (oK, oV, oQ, odO, oP, odS, oLse))
    B, Hq, Hk, Nq, Nk, Dh, Dv = (P[x] for x in ("B", "Hq", "Hk", "Nq", "Nk", "Dh", "Dv"))
    group = Hq // Hk
    scale = P["scale"]; scale_log2 = scale * LOG2E
    gq = np.zeros(B * Hq * Nq * Dh); gk = np.full(B * Hk * Nk * Dh, np.nan)
    gv = np.full(B * Hk * Nk * Dv, np.nan)
    gk_writes = np.zeros(gk.size, int); gv_writes = np.zeros(gv.size, int)
    mask = P["mask"]; ms = P["mask_strides"]
    races = 0
    k_tiles = (Nk + kKeys - 1) // kKeys
    for bkv, bx in itertools.product(range(B * Hk), range(k_tiles)):
        sm = Smem(kSmem)
        b, hk = bkv // Hk, bkv % Hk
        n0 = bx * kKeys
        head0 = b * Hq + hk * group
        q_tiles = (Nq + BM - 1) // BM
        tiles = group * q_tiles
        keys_here = min(Nk - n0, kKeys)

        def load_tile_async(dst_byte, src, src_off, rows, row0, rows_valid, cols):
            # load_tile_async<T, ROWS, DP, THREADS>: thread idx copies chunk idx
            for idx in range(rows * (DP // 8)):
                r, c = idx // (DP // 8), (idx % (DP // 8)) * 8
                valid = row0 + r < rows_valid and c < cols
                warp = (idx % kThreads) // 32
                slot = (dst_byte // 2) + r * LD + c
                assert (slot * 2) % 16 == 0
                if valid:
                    start = src_off + (row0 + r) * cols + c
                    assert start % 8 == 0   # 16-byte aligned source (tensor base aligned)
                    vals = src[start:start + 8]
                else:
                    vals = np.zeros(8)
                sm.cp_async(slot + np.arange(8), vals, warp)

        def load_query_tile(gi, m0, buf):
            bh = head0 + gi
            load_tile_async(oQ + buf * BM * LD * S2, P["q"], bh * Nq * Dh, BM, m0, Nq, Dh)
            load_tile_async(odO + buf * BM * LD * S2, P["do"], bh * Nq * Dv, BM, m0, Nq, Dv)

        def read_row_stats(off, row):
            if row >= Nq: return (-np.inf, 0.0)
            return (P["lse"][off + row], P["delta"][off + row])

        def store_row_stats(lse_byte, delta_byte, i, r, warp):
            sm.write_f(lse_byte + 4 * i, np.inf if r[0] == -np.inf else r[0] * LOG2E, warp)
            sm.write_f(delta_byte + 4 * i, r[1], warp)

        load_tile_async(oK, P["k"], bkv * Nk * Dh, kKeys, n0, Nk, Dh)
        load_tile_async(oV, P["v"], bkv * Nk * Dv, kKeys, n0, Nk, Dv)
        load_query_tile(0, 0, 0)
        for tid in range(BM):
            store_row_stats(oLse, oDelta, tid, read_row_stats(head0 * Nq, tid), tid // 32)

        rows_first = LANES % 8 + ((LANES // 8) % 2) * 8; rows_first_col = (LANES // 16) * 8
        cols_first = LANES % 8 + (LANES // 16) * 8; cols_first_col = ((LANES // 8) % 2) * 8
        W = {}
        for warp in range(kWarps):
            w = dict(kw0=32 * (warp // 2), qw0=32 * (warp % 2), qo0=32 - 32 * (warp % 2),
                     dw0=kKvDims * (warp % 2),
                     q30=32 * (warp // 4), d30=kQDims * (warp % 4))
            w["dk"] = np.zeros((2, kKvDims // 8, 32, 4)); w["dv"] = np.zeros((2, kKvDims // 8, 32, 4))
            kw0, qw0, qo0, dw0, q30, d30 = (w[x] for x in ("kw0", "qw0", "qo0", "dw0", "q30", "d30"))
            w["k_lane"] = oK + S2 * ((kw0 + rows_first) * LD + rows_first_col)
            w["v_lane"] = oV + S2 * ((kw0 + rows_first) * LD + rows_first_col)
            w["q_lane"] = oQ + S2 * ((qw0 + cols_first) * LD + cols_first_col)
            w["do_lane"] = odO + S2 * ((qw0 + cols_first) * LD + cols_first_col)
            w["pa_lane"] = oP + S2 * ((kw0 + rows_first) * LDS + rows_first_col + qo0)
            w["dsa_lane"] = odS + S2 * ((kw0 + rows_first) * LDS + rows_first_col + qo0)
            w["qt_lane"] = oQ + S2 * (rows_first * LD + rows_first_col + dw0)
            w["dot_lane"] = odO + S2 * (rows_first * LD + rows_first_col + dw0)
            w["dsq_lane"] = odS + S2 * (cols_first * LDS + cols_first_col + q30)
            w["kt_lane"] = oK + S2 * (rows_first * LD + rows_first_col + d30)
            W[warp] = w

        def kv_step(w, warp, pa, da, qt_rows, dot_rows):
            for dj in range(0, kKvDims // 8, 2):
                ob = ldmatrix_x4(sm, dot_rows + dj * 8 * S2, warp, True)
                qb = ldmatrix_x4(sm, qt_rows + dj * 8 * S2, warp, True)
                for mi in range(2):
                    w["dv"][mi, dj] = mma16816(w["dv"][mi, dj], pa[mi], ob[0], ob[1])
                    w["dv"][mi, dj + 1] = mma16816(w["dv"][mi, dj + 1], pa[mi], ob[2], ob[3])
                    w["dk"][mi, dj] = mma16816(w["dk"][mi, dj], da[mi], qb[0], qb[1])
                    w["dk"][mi, dj + 1] = mma16816(w["dk"][mi, dj + 1], da[mi], qb[2], qb[3])

        gi, m0 = 0, 0
        for it in range(tiles):
            buf = it & 1
            sm.wait_all(); sm.barrier()                       # barrier A
            next_gi, next_m0 = gi, m0 + BM
            if next_m0 >= Nq: next_gi, next_m0 = next_gi + 1, 0
            next_stats = [(-np.inf, 0.0)] * BM
            if it + 1 < tiles:
                load_query_tile(next_gi, next_m0, buf ^ 1)
                for tid in range(BM):
                    next_stats[tid] = read_row_stats((head0 + next_gi) * Nq, next_m0 + tid)
            # phase 1
            for warp in range(kWarps):
                w = W[warp]; kw0, qw0 = w["kw0"], w["qw0"]
                st = np.zeros((2, 4, 32, 4)); dpt = np.zeros((2, 4, 32, 4))
                q_buf = w["q_lane"] + buf * kBufferBytes; do_buf = w["do_lane"] + buf * kBufferBytes
                for kk in range(kDepth):
                    ka = [ldmatrix_x4(sm, w["k_lane"] + mi * 16 * kRowBytes + kk * 16 * S2, warp) for mi in range(2)]
                    va = [ldmatrix_x4(sm, w["v_lane"] + mi * 16 * kRowBytes + kk * 16 * S2, warp) for mi in range(2)]
                    for j in (0, 2):
                        qb = ldmatrix_x4(sm, q_buf + j * 8 * kRowBytes + kk * 16 * S2, warp)
                        ob = ldmatrix_x4(sm, do_buf + j * 8 * kRowBytes + kk * 16 * S2, warp)
                        for mi in range(2):
                            st[mi, j] = mma16816(st[mi, j], ka[mi], qb[0], qb[1])
                            st[mi, j + 1] = mma16816(st[mi, j + 1], ka[mi], qb[2], qb[3])
                            dpt[mi, j] = mma16816(dpt[mi, j], va[mi], ob[0], ob[1])
                            dpt[mi, j + 1] = mma16816(dpt[mi, j + 1], va[mi], ob[2], ob[3])
                h = head0 - b * Hq + gi
                for j in range(4):
                    i = qw0 + 8 * j + 2 * TT
                    lse2 = np.stack([sm.read_f(oLse + 4 * (buf * BM + i + x), warp) for x in (0, 1)], 1)
                    assert np.all((oLse + 4 * (buf * BM + i)) % 8 == 0)   # float2 alignment
                    delta2 = np.stack([sm.read_f(oDelta + 4 * (buf * BM + i + x), warp) for x in (0, 1)], 1)
                    for mi in range(2):
                        for e in range(4):
                            key = kw0 + 16 * mi + G + 8 * (e // 2)
                            key_ok = key < keys_here
                            s = st[mi, j, :, e] * scale_log2
                            if mask is not None:
                                qi = m0 + i + (e & 1)
                                ok = key_ok & (qi < Nq)
                                mv = np.zeros(32)
                                idx = (b * ms[0] + h * ms[1] + qi * ms[2] + (n0 + key) * ms[3])
                                mv[ok] = mask[idx[ok]]
                                s = s + np.where(ok, mv * LOG2E, 0.0)
                            with np.errstate(invalid="ignore"):
                                prob = np.where(key_ok, exp2_ftz(s - lse2[:, e & 1]), 0.0)
                            st[mi, j, :, e] = prob
                            dpt[mi, j, :, e] = prob * (dpt[mi, j, :, e] - delta2[:, e & 1])
                # A fragments of the warp's own two k16 steps: register i of (kq, mi) is tile
                # j = 2 kq + i // 2, elements 2 (i % 2), 2 (i % 2) + 1
                pa = [[[None] * 4 for _ in range(2)] for _ in range(2)]
                da = [[[None] * 4 for _ in range(2)] for _ in range(2)]
                for kq in range(2):
                    for mi in range(2):
                        for i in range(4):
                            j, r = 2 * kq + i // 2, i % 2
                            pa[kq][mi][i] = st[mi, j][:, [2 * r, 2 * r + 1]]
                            da[kq][mi][i] = dpt[mi, j][:, [2 * r, 2 * r + 1]]
                for mi in range(2):
                    for j in range(4):
                        for r in range(2):
                            at = (kw0 + 16 * mi + G + 8 * r) * LDS + qw0 + 8 * j + 2 * TT
                            check_store_banks(oP + S2 * at)
                            slots = np.stack([oP // 2 + at, oP // 2 + at + 1], 1)
                            sm.write16(slots, pa[j // 2][mi][2 * (j % 2) + r], warp)
                            slots = np.stack([odS // 2 + at, odS // 2 + at + 1], 1)
                            sm.write16(slots, da[j // 2][mi][2 * (j % 2) + r], warp)
                qt_buf = w["qt_lane"] + buf * kBufferBytes; dot_buf = w["dot_lane"] + buf * kBufferBytes
                for kq in range(2):   # own queries, A from registers, before barrier B
                    kv_step(w, warp, pa[kq], da[kq], qt_buf + (qw0 + 16 * kq) * kRowBytes,
                            dot_buf + (qw0 + 16 * kq) * kRowBytes)
            for tid in range(BM):
                store_row_stats(oLse + 4 * (buf ^ 1) * BM, oDelta + 4 * (buf ^ 1) * BM, tid,
                                next_stats[tid], tid // 32)
            sm.barrier()                                      # barrier B
            # phase 3
            for warp in range(kWarps):
                w = W[warp]; q30, d30 = w["q30"], w["d30"]
                dqa = np.zeros((2, kQDims // 8, 32, 4))
                for kk in range(kKeys // 16):
                    kb = [ldmatrix_x4(sm, w["kt_lane"] + kk * 16 * kRowBytes + nt * 8 * S2, warp, True)
                          for nt in range(0, kQDims // 8, 2)]
                    for mt in range(2):
                        a = ldmatrix_x4(sm, w["dsq_lane"] + kk * 16 * kSRowBytes + mt * 16 * S2, warp, True)
                        for nt in range(0, kQDims // 8, 2):
                            dqa[mt, nt] = mma16816(dqa[mt, nt], a, kb[nt // 2][0], kb[nt // 2][1])
                            dqa[mt, nt + 1] = mma16816(dqa[mt, nt + 1], a, kb[nt // 2][2], kb[nt // 2][3])
                odd = (TT & 1).astype(bool)
                dq_off = (head0 + gi) * Nq * Dh
                for mt in range(2):
                    qi = m0 + q30 + mt * 16 + G + np.where(odd, 8, 0)
                    for nt in range(kQDims // 8):
                        c = dqa[mt, nt]
                        send0 = np.where(odd, c[:, 0], c[:, 2]); send1 = np.where(odd, c[:, 1], c[:, 3])
                        got0, got1 = send0[LANES ^ 1], send1[LANES ^ 1]
                        s4 = np.where(odd[:, None], np.stack([got0, got1, c[:, 2], c[:, 3]], 1),
                                      np.stack([c[:, 0], c[:, 1], got0, got1], 1))
                        d = d30 + nt * 8 + 4 * (TT // 2)
                        for l in range(32):
                            if qi[l] < Nq and d[l] < Dh:
                                addr = dq_off + qi[l] * Dh + d[l]
                                assert addr % 4 == 0 and d[l] + 3 < Dh
                                gq[addr:addr + 4] += s4[l] * scale
            # phase 2 over the other warp's queries, P^T and dS^T from shared memory
            for warp in range(kWarps):
                w = W[warp]; qo0 = w["qo0"]
                qt_buf = w["qt_lane"] + buf * kBufferBytes; dot_buf = w["dot_lane"] + buf * kBufferBytes
                for kq in range(2):
                    pa = [ldmatrix_x4(sm, w["pa_lane"] + mi * 16 * kSRowBytes + kq * 16 * S2, warp) for mi in range(2)]
                    da = [ldmatrix_x4(sm, w["dsa_lane"] + mi * 16 * kSRowBytes + kq * 16 * S2, warp) for mi in range(2)]
                    kv_step(w, warp, pa, da, qt_buf + (qo0 + 16 * kq) * kRowBytes,
                            dot_buf + (qo0 + 16 * kq) * kRowBytes)
            gi, m0 = next_gi, next_m0
        # final stores
        for warp in range(kWarps):
            w = W[warp]
            for mi in range(2):
                for r in range(2):
                    key = w["kw0"] + 16 * mi + G + 8 * r
                    for dj in range(kKvDims // 8):
                        d = w["dw0"] + dj * 8 + 2 * TT
                        for l in range(32):
                            if key[l] >= keys_here: continue
                            if d[l] < Dh:
                                a = bkv * Nk * Dh + (n0 + key[l]) * Dh + d[l]
                                gk[a:a + 2] = w["dk"][mi, dj, l, 2 * r:2 * r + 2] * scale
                                gk_writes[a:a + 2] += 1
                            if d[l] < Dv:
                                a = bkv * Nk * Dv + (n0 + key[l]) * Dv + d[l]
                                gv[a:a + 2] = w["dv"][mi, dj, l, 2 * r:2 * r + 2]
                                gv_writes[a:a + 2] += 1
        races += sm.races
    assert np.all(gk_writes == 1) and np.all(gv_writes == 1), "dK / dV element not written once"
    return gq, gk, gv, races


def dense_reference(q, k, v, do, mask, scale):
    """float64 forward (lse, out) and backward; q (B,Hq,Nq,Dh), k (B,Hk,Nk,Dh), v (B,Hk,Nk,Dv),
    mask broadcast to (B,Hq,Nq,Nk) or None. A fully masked row: out 0, lse -inf, no gradient."""
    Bn, Hq = q.shape[:2]; Hk = k.shape[1]; grp = Hq // Hk
    kk = np.repeat(k, grp, axis=1); vv = np.repeat(v, grp, axis=1)
    s = np.einsum("bhid,bhjd->bhij", q, kk) * scale
    if mask is not None: s = s + mask
    m = s.max(-1, keepdims=True)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(s - m_safe)
    l = e.sum(-1, keepdims=True)
    p = np.where(l > 0, e / np.where(l > 0, l, 1), 0.0)
    lse = np.where(l[..., 0] > 0, (m_safe + np.log(np.where(l > 0, l, 1)))[..., 0], -np.inf)
    out = p @ vv
    dp = do @ vv.transpose(0, 1, 3, 2)
    delta = (do * out).sum(-1)
    ds = p * (dp - delta[..., None])
    dq = ds @ kk * scale
    dk = (ds.transpose(0, 1, 3, 2) @ q * scale).reshape(Bn, Hk, grp, *k.shape[2:]).sum(2)
    dv = (p.transpose(0, 1, 3, 2) @ do).reshape(Bn, Hk, grp, *v.shape[2:]).sum(2)
    return lse, delta, dq, dk, dv


def case(B, Hq, Hk, Nq, Nk, Dh, Dv, mask_kind, seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, Hq, Nq, Dh)); k = rng.standard_normal((B, Hk, Nk, Dh))
    v = rng.standard_normal((B, Hk, Nk, Dv)); do = rng.standard_normal((B, Hq, Nq, Dv))
    scale = 1 / np.sqrt(Dh)
    mask = None; strides = (0, 0, 0, 0)
    if mask_kind == "full":      # (B, Hq, Nq, Nk) with -inf entries and a fully masked row
        mfull = rng.standard_normal((B, Hq, Nq, Nk))
        mfull[rng.random(mfull.shape) < 0.2] = -np.inf
        mfull[0, -1, min(3, Nq - 1), :] = -np.inf
        mask, mask_b = mfull.ravel(), mfull
        strides = (Hq * Nq * Nk, Nq * Nk, Nk, 1)
    elif mask_kind == "bcast":   # (1, 1, Nq, Nk) broadcast over batch and heads
        m2 = rng.standard_normal((Nq, Nk)); m2[:, Nk // 3] = -np.inf
        m2[Nq - 1, :] = -np.inf                               # fully masked row
        mask, mask_b = m2.ravel(), np.broadcast_to(m2, (B, Hq, Nq, Nk))
        strides = (0, 0, Nk, 1)
    elif mask_kind == "keypad":  # (B, 1, 1, Nk): key padding, strides 0 over heads and rows
        m1 = np.where(rng.random((B, Nk)) < 0.3, -np.inf, 0.0)
        mask, mask_b = m1.ravel(), np.broadcast_to(m1[:, None, None, :], (B, Hq, Nq, Nk))
        strides = (Nk, 0, 0, 1)
    lse, delta, dq, dk, dv = dense_reference(q, k, v, do, None if mask is None else mask_b, scale)
    P = dict(B=B, Hq=Hq, Hk=Hk, Nq=Nq, Nk=Nk, Dh=Dh, Dv=Dv, scale=scale,
             q=q.ravel(), k=k.ravel(), v=v.ravel(), do=do.ravel(), lse=lse.ravel(),
             delta=delta.ravel(), mask=mask, mask_strides=strides)
    gq, gk, gv, races = run_kernel(P)
    err = lambda a, r: np.abs(a - r.ravel()).max() / max(np.abs(r).max(), 1e-30)
    return err(gq, dq), err(gk, dk), err(gv, dv), races


if __name__ == "__main__":
    import sys
    cases = [
        # B, Hq, Hk, Nq, Nk, Dh, Dv, mask
        (1, 1, 1, 64, 128, 128, 128, None),
        (1, 2, 1, 100, 150, 128, 128, None),      # GQA, ragged q and kv, two key blocks
        (2, 2, 2, 70, 131, 96, 72, "full"),       # Dh != Dv, full mask with -inf, masked row
        (1, 4, 2, 65, 129, 8, 128, "bcast"),      # Dh = 8, Dv = 128, broadcast mask
        (2, 3, 1, 33, 40, 128, 64, "keypad"),     # group 3, key padding mask, short tiles
        (1, 2, 2, 130, 257, 120, 112, None),      # three query tiles, three key blocks
    ]
    worst = 0.0
    for seed, c in enumerate(cases):
        e = case(*c, seed=seed)
        print(c, "rel err dQ %.2e dK %.2e dV %.2e races %d" % e, flush=True)
        assert np.isfinite(e[:3]).all() and e[3] == 0, "non-finite gradient or a race"
        worst = max(worst, *e[:3])
    print("worst", worst)
    sys.exit(0 if worst < 1e-10 else 1)
