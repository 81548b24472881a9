"""Numpy emulation of csrc/attention/cuda/attention_fwd_wgmma.cu, thread by thread where the
index math lives, checked against a dense float64 attention. Runs on a CPU (a few minutes):
    python bench/gpu/attention_wgmma_emulation.py              # every case, bf16 and f16
    python bench/gpu/attention_wgmma_emulation.py --mutations  # shows that layout bugs fail
It checks the kernel's index math against the PTX ISA's description of the hardware as read
by the kernel's author; a GPU run (tests/ops/test_cuda_ops.py on an H100 / H200) is what
validates that reading. Keep it in step with the kernel when either changes.

"Kernel side" (mirrors the .cu line for line): the swizzled cp.async tile loads, the descriptor
values the kernel builds, the per-thread softmax on accumulator registers (quad shuffles
explicit), the P packing, the O rescale, the epilogue.
"Hardware side" (written from the PTX ISA, independently of the kernel): shared memory as a byte
array, descriptor decoding, what a K-major / N-major 128B-swizzled operand read returns, the
wgmma m64nNk16 accumulator and register-A layouts, fp32 accumulation, bf16/f16 rounding, and
the ordering of cp.async groups, wgmma groups, proxy fences and barriers (Schedule: which tile
each buffer holds, whether it is visible when a wgmma reads it, no copy overlapping a read).
"""

from __future__ import annotations

import itertools
import math
import sys

import numpy as np

# ---------------------------------------------------------------- constants of the kernel
kGroups, kGroupRows, kKeys = 2, 64, 128
kRows, kThreads = kGroups * kGroupRows, 128 * kGroups
kSwizzleRow, kSwizzleAtom = 128, 1024
LOG2E, LN2 = 1.4426950408889634, 0.6931471805599453


def round16(x, dtype):
    """Round float32 values to bf16 / f16 (nearest even), returned as float64."""
    x = np.asarray(x, dtype=np.float32)
    if dtype == "f16":
        return x.astype(np.float16).astype(np.float64)
    bits = x.view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32).astype(np.float64)


# ---------------------------------------------------------------- hardware: shared memory
class Smem:
    """Shared memory of one block as 16-bit cells at even byte addresses; NaN = never written."""

    def __init__(self, window_bytes):
        self.cells = np.full(window_bytes // 2, np.nan)

    def write16(self, addr, values):  # one 16-byte cp.async
        assert addr % 16 == 0, hex(addr)
        self.cells[addr // 2: addr // 2 + 8] = values

    def read(self, addrs):
        addrs = np.asarray(addrs)
        assert (addrs % 2 == 0).all()
        vals = self.cells[addrs // 2]
        assert not np.isnan(vals).any(), "operand read of never-written shared memory"
        return vals


def swizzle128(addr):
    """128B swizzle on the absolute shared address: bits [4:6] ^= bits [7:9]."""
    return addr ^ (((addr >> 7) & 7) << 4)


def decode_descriptor(desc):
    start = (desc & 0x3FFF) << 4
    lbo = ((desc >> 16) & 0x3FFF) << 4
    sbo = ((desc >> 32) & 0x3FFF) << 4
    base_offset = (desc >> 49) & 7
    mode = desc >> 62
    assert mode == 1 and base_offset == 0, (mode, base_offset)
    assert desc & ~((0x3FFF) | (0x3FFF << 16) | (0x3FFF << 32) | (7 << 49) | (3 << 62)) == 0
    return start, lbo, sbo


def operand_kmajor(smem, desc, rows):
    """(rows x 16) operand, K-major, 128B swizzle: element (r, k) at
    start + (r // 8) * SBO + (r % 8) * 128 + 2 k (k < 16 stays inside one 128-byte row, so the
    leading byte offset is not used), then swizzled."""
    start, _lbo, sbo = decode_descriptor(desc)
    r = np.arange(rows)[:, None]
    k = np.arange(16)[None, :]
    addr = start + (r // 8) * sbo + (r % 8) * 128 + 2 * k
    return smem.read(swizzle128(addr))


def operand_nmajor(smem, desc, n_extent):
    """(16 x N) B operand, N-major, 128B swizzle: element (k, n) at
    start + (n // 64) * LBO + (k // 8) * SBO + (k % 8) * 128 + 2 (n % 64), then swizzled."""
    start, lbo, sbo = decode_descriptor(desc)
    k = np.arange(16)[:, None]
    n = np.arange(n_extent)[None, :]
    addr = start + (n // 64) * lbo + (k // 8) * sbo + (k % 8) * 128 + 2 * (n % 64)
    return smem.read(swizzle128(addr))


def acc_coords(n_extent):
    """wgmma m64nNk16 f32 accumulator: thread tid (0..127 of the warpgroup), register i ->
    (row, col) = (16 w + g + 8 ((i % 4) // 2), 8 (i // 4) + 2 t + i % 2)."""
    tid = np.arange(128)[:, None]
    i = np.arange(n_extent // 2)[None, :]
    w, lane = tid // 32, tid % 32
    g, t = lane // 4, lane % 4
    return 16 * w + g + 8 * ((i % 4) // 2), 8 * (i // 4) + 2 * t + i % 2


def acc_to_regs(D):
    rows, cols = acc_coords(D.shape[1])
    return D[rows, cols]


def regs_to_acc(regs, n_extent):
    rows, cols = acc_coords(n_extent)
    D = np.full((64, n_extent), np.nan)
    seen = np.zeros((64, n_extent), dtype=int)
    np.add.at(seen, (rows, cols), 1)
    assert (seen == 1).all(), "accumulator layout is not a bijection"
    D[rows, cols] = regs
    return D


def regA_to_matrix(pa):
    """Register-A fragment (4 x 32-bit = 8 halves per thread) -> the 64 x 16 A matrix:
    a0,a1 (16w+g, 2t..) a2,a3 (16w+g+8, 2t..) a4,a5 (16w+g, 2t+8..) a6,a7 (16w+g+8, 2t+8..);
    pa[tid][reg] = (low half, high half) = (lower column, higher column)."""
    A = np.full((64, 16), np.nan)
    for tid in range(128):
        w, lane = tid // 32, tid % 32
        g, t = lane // 4, lane % 4
        for reg, (dr, dc) in enumerate([(0, 0), (8, 0), (0, 8), (8, 8)]):
            lo, hi = pa[tid][reg]
            A[16 * w + g + dr, 2 * t + dc] = lo
            A[16 * w + g + dr, 2 * t + dc + 1] = hi
    assert not np.isnan(A).any()
    return A


def wgmma(D, A, B, accumulate):
    """D (64 x N, f32) = A B (+ D): products of 16-bit values are exact in f32; the sum is f32."""
    prod = (A.astype(np.float32) @ B.astype(np.float32)).astype(np.float32)
    return (D.astype(np.float32) + prod) if accumulate else prod


def shfl_xor(x, mask):
    """x: (128 threads,) of a warpgroup; __shfl_xor_sync within each warp."""
    tid = np.arange(128)
    return x[(tid // 32) * 32 + ((tid % 32) ^ mask)]


def exp2_ftz(x):
    y = np.exp2(np.asarray(x, dtype=np.float32)).astype(np.float32)
    return np.where(np.abs(y) < np.float32(2.0 ** -126), np.float32(0), y)



# ---------------------------------------------------------------- hardware: async ordering
class Schedule:
    """cp.async groups, wgmma groups, waits and block barriers of one block, both warpgroups
    running the same program (so one program order stands for all threads). Phases are the
    stretches between barriers; a thread may be anywhere within the current phase. A copy
    occupies its slot from its issue phase to the phase of the cp.async.wait_group that
    completes it; a wgmma read from its issue phase to the phase of its wgmma.wait_group.
    Checks: a wgmma reads the tile it expects, written by copies that every thread completed
    and fenced before an earlier barrier; no copy overlaps (in phases) a read of its slot."""

    def __init__(self):
        self.phase = 0
        self.cp_groups, self.cp_open = [], []
        self.wg_groups, self.wg_open = [], []
        self.slots = {}  # slot -> (tag, copy record)
        self.copies, self.reads = [], []
        self.fenced_phase = -1  # last phase in which every thread fenced its completed copies

    def copy(self, slot, tag):
        rec = dict(slot=slot, tag=tag, issue=self.phase, done=None)
        self.cp_open.append(rec)
        self.copies.append(rec)
        self.slots[slot] = (tag, rec)

    def cp_commit(self):
        self.cp_groups.append(self.cp_open)
        self.cp_open = []

    def cp_wait(self, n):
        for grp in self.cp_groups[:len(self.cp_groups) - n]:
            for rec in grp:
                if rec["done"] is None:
                    rec["done"] = self.phase
        self.cp_groups = self.cp_groups[len(self.cp_groups) - n:] if n else []

    def fence_proxy_async(self):
        self.fenced_phase = self.phase

    def barrier(self):
        self.phase += 1

    def read(self, slot, tag):
        have, rec = self.slots[slot]
        assert have == tag, f"wgmma reads {slot} expecting {tag}, holds {have}"
        assert rec["done"] is not None and rec["done"] < self.phase, f"{tag}: copy not complete before a barrier"
        assert self.fenced_phase >= rec["done"], f"{tag}: no proxy fence after its copy completed"
        r = dict(slot=slot, tag=tag, issue=self.phase, done=None)
        self.wg_open.append(r)
        self.reads.append(r)

    def wg_commit(self):
        self.wg_groups.append(self.wg_open)
        self.wg_open = []

    def wg_wait(self, n):
        for grp in self.wg_groups[:len(self.wg_groups) - n]:
            for r in grp:
                r["done"] = self.phase
        self.wg_groups = self.wg_groups[len(self.wg_groups) - n:] if n else []

    def check_races(self):
        assert all(r["done"] is not None for r in self.reads), "wgmma never waited for"
        for c in self.copies:
            for r in self.reads:
                if c["slot"] == r["slot"] and c["tag"] != r["tag"]:
                    overlap = max(c["issue"], r["issue"]) <= min(c["done"], r["done"])
                    assert not overlap, f"copy of {c['tag']} overlaps the read of {r['tag']} in {c['slot']}"

# ---------------------------------------------------------------- kernel side
MUTATE = {}  # deliberate schedule bugs, set by mutation_checks only
def tile_bytes(DP):
    return kRows * DP * 2, kKeys * DP * 2


def smem_size(DP):
    q_bytes, kv_bytes = tile_bytes(DP)
    return q_bytes + 5 * kv_bytes + kSwizzleAtom  # Q, K x 2, V x 3, alignment slack


def load_tile_swizzled(smem, dst, src, row0, rows_valid, cols, ROWS, DP):
    """Mirrors load_tile_swizzled: every (row, 16-byte chunk) a thread copies."""
    kChunks = DP // 8
    for idx in range(ROWS * kChunks):  # the threads' strided loop, all iterations
        r, c = divmod(idx, kChunks)
        valid = row0 + r < rows_valid and 8 * c < cols
        offset = (c // 8) * (ROWS * kSwizzleRow) + r * kSwizzleRow + (((c % 8) ^ (r % 8)) * 16)
        values = src[row0 + r, 8 * c: 8 * c + 8] if valid else np.zeros(8)
        smem.write16(dst + offset, values)


def smem_descriptor(address, leading_bytes, stride_bytes):
    return ((address & 0x3FFFF) >> 4) | ((leading_bytes >> 4) << 16) | ((stride_bytes >> 4) << 32) | (1 << 62)


def run_block(q, k, v, out, lse, bx, bh, P, DP, dtype, raw_base):
    q_bytes, kv_bytes = tile_bytes(DP)
    window = raw_base + smem_size(DP)
    smem = Smem(window + 64)
    base = (raw_base + kSwizzleAtom - 1) & ~(kSwizzleAtom - 1)
    assert base + q_bytes + 5 * kv_bytes <= raw_base + smem_size(DP)
    sQ, sK = base, base + q_bytes
    sV = sK + 2 * kv_bytes
    b, h = divmod(bh, P["q_heads"])
    kvh = b * P["kv_heads"] + h // P["group"]
    m0 = bx * kRows
    qm, km, vm = q[bh], k[kvh], v[kvh]  # (len, dim) row-major matrices
    q_len, kv_len, head_dim, value_dim = P["q_len"], P["kv_len"], P["head_dim"], P["value_dim"]
    tiles = (kv_len + kKeys - 1) // kKeys

    sched = Schedule()

    def load(dst, src, row0, rows_valid, cols, rows, slot, tag):
        load_tile_swizzled(smem, dst, src, row0, rows_valid, cols, rows, DP)
        sched.copy(slot, tag)

    load(sQ, qm, m0, q_len, head_dim, kRows, "Q", "Q")
    load(sK, km, 0, kv_len, head_dim, kKeys, "K0", "K_0")
    load(sV, vm, 0, kv_len, value_dim, kKeys, "V0", "V_0")
    sched.cp_commit()

    kmajor = smem_descriptor(0, 16, kSwizzleAtom)
    nmajor = smem_descriptor(0, kKeys * kSwizzleRow, kSwizzleAtom)
    k_start, v_start = sK >> 4, sV >> 4
    kQBlock, kKVBlock = (kRows * kSwizzleRow) >> 4, (kKeys * kSwizzleRow) >> 4
    kBuffer = kv_bytes >> 4
    ks = np.float32(P["scale_log2"])
    kDepth, kSteps, kOutRegs, kScoreRegs = DP // 16, kKeys // 16, DP // 2, kKeys // 2

    state = []  # per warpgroup: each thread's O registers, P registers, row maxima, sum shares
    for group in range(kGroups):
        state.append(dict(o=np.zeros((128, kOutRegs), np.float32), pa=None,
                          m=np.full((128, 2), -np.inf, np.float32),
                          l=np.zeros((128, 2), np.float32)))

    def issue_pv(st, j):
        """O += P_j V_j: P from the thread's pa registers, V_j from buffer j % 3."""
        O = regs_to_acc(st["o"], DP)
        for kk in range(kSteps):
            A = regA_to_matrix([[st["pa"][tid][kk][r] for r in range(4)] for tid in range(128)])
            v_buf = j % MUTATE.get("v_buffers", 3)
            vd = nmajor | (v_start + v_buf * kBuffer + kk * ((16 * kSwizzleRow) >> 4))
            sched.read(f"V{v_buf}", f"V_{j}")
            O = wgmma(O, A, operand_nmajor(smem, vd, DP), True)
        st["o"] = acc_to_regs(O).astype(np.float32)

    # The kernel peels j = 0 out of its loop (so that ptxas sees the same waits on every path);
    # the order of copies, products, waits and barriers is the one written here with `if j > 0`.
    for j in range(tiles):
        buf = j & 1
        sched.cp_wait(MUTATE.get("cp_wait", 0))
        sched.fence_proxy_async()
        sched.barrier()
        for group in range(kGroups):  # the warpgroups until the next barrier, in any order
            st = state[group]
            q_start = (sQ + group * kGroupRows * kSwizzleRow) >> 4
            S = np.zeros((64, kKeys), np.float32)
            for kk in range(kDepth):
                within = (kk % 4) * 2
                qd = kmajor | (q_start + (kk // 4) * kQBlock + within)
                kd = kmajor | (k_start + buf * kBuffer + (kk // 4) * kKVBlock + within)
                sched.read("Q", "Q")
                sched.read(f"K{buf}", f"K_{j}")
                A = operand_kmajor(smem, qd, 64)
                Bt = operand_kmajor(smem, kd, kKeys)  # (N x 16): B(k, n) = Bt[n, k]
                S = wgmma(S, A, Bt.T, kk > 0)
            sched.wg_commit()
            s = acc_to_regs(S).astype(np.float32)  # (128 threads, 64 registers)
            if j > 0:
                issue_pv(st, j - 1)
                sched.wg_commit()
            if group == 0 and j + 1 < tiles:  # the next tile's copies (every thread takes part)
                load(sK + (buf ^ 1) * kv_bytes, km, (j + 1) * kKeys, kv_len, head_dim, kKeys,
                     f"K{buf ^ 1}", f"K_{j + 1}")
                v_next = (j + 1) % MUTATE.get("v_buffers", 3)
                load(sV + v_next * kv_bytes, vm, (j + 1) * kKeys, kv_len, value_dim, kKeys,
                     f"V{v_next}", f"V_{j + 1}")
                sched.cp_commit()
            if j > 0:
                sched.wg_wait(1)
            else:
                sched.wg_wait(0)

            n0 = j * kKeys
            valid = min(kv_len - n0, kKeys)
            t = (np.arange(128) % 32) % 4
            i = np.arange(kScoreRegs)
            col = 8 * (i[None, :] // 4) + 2 * t[:, None] + (i[None, :] % 2)
            if valid < kKeys:
                s = np.where(col >= valid, np.float32(-np.inf), s)
            row_of = (i // 2) % 2
            tile_max = np.stack([s[:, row_of == r].max(axis=1) for r in range(2)], axis=1)
            alpha = np.zeros((128, 2), np.float32)
            neg_m = np.zeros((128, 2), np.float32)
            for r in range(2):
                tm = tile_max[:, r]
                tm = np.maximum(tm, shfl_xor(tm, 1))
                tm = np.maximum(tm, shfl_xor(tm, 2))
                m_new = np.maximum(st["m"][:, r], tm)
                m_use = np.where(m_new == -np.inf, np.float32(0), m_new)
                with np.errstate(invalid="ignore"):
                    alpha[:, r] = exp2_ftz((st["m"][:, r] - m_use) * ks)
                neg_m[:, r] = -m_use * ks
                st["m"][:, r] = m_new
                st["l"][:, r] *= alpha[:, r]
            s = exp2_ftz(np.float32(s) * ks + neg_m[:, row_of])  # fmaf: one rounding, close enough
            for r in range(2):
                st["l"][:, r] += s[:, row_of == r].sum(axis=1, dtype=np.float32)

            sched.wg_wait(0)  # P_j-1 V_j-1 done: rescale O, then P_j replaces pa
            st["o"] *= alpha[:, (np.arange(kOutRegs) // 2) % 2]
            sr = round16(s, dtype)
            st["pa"] = [[[(sr[tid, 8 * kk + 2 * r], sr[tid, 8 * kk + 2 * r + 1]) for r in range(4)]
                         for kk in range(kSteps)] for tid in range(128)]

    for group in range(kGroups):  # the last tile's P V
        issue_pv(state[group], tiles - 1)
        sched.wg_commit()
        sched.wg_wait(0)
    sched.check_races()

    for group in range(kGroups):
        st = state[group]
        for tid in range(128):
            w, lane = tid // 32, tid % 32
            g, t = lane // 4, lane % 4
            row0 = m0 + group * kGroupRows + w * 16 + g
            for r in range(2):
                quad = (tid // 4) * 4 + np.arange(4)
                s_sum = np.float32(st["l"][quad, r].sum(dtype=np.float32))
                i = row0 + 8 * r
                if i >= q_len:
                    continue
                inv = 1.0 / s_sum if s_sum > 0 else 0.0
                for j in range(kOutRegs // 4):
                    col = 8 * j + 2 * t
                    if col < value_dim:
                        out[bh, i, col] = round16(st["o"][tid, 4 * j + 2 * r] * inv, dtype)
                        out[bh, i, col + 1] = round16(st["o"][tid, 4 * j + 2 * r + 1] * inv, dtype)
                if t == 0:
                    lse[bh, i] = (st["m"][tid, r] * ks + math.log2(s_sum)) * LN2 if s_sum > 0 else -np.inf


def padded_head_dim(dh, dv):
    d = max(dh, dv)
    return 64 if d <= 64 else 128 if d <= 128 else 256 if d <= 256 else 0


def emulate(batch, hq, hk, nq, nk, dh, dv, dtype, raw_base, seed):
    rng = np.random.default_rng(seed)
    DP = padded_head_dim(dh, dv)
    assert DP in (64, 128) and dh % 8 == 0 and dv % 8 == 0
    q = round16(rng.standard_normal((batch * hq, nq, dh)) * 1.5, dtype)
    k = round16(rng.standard_normal((batch * hk, nk, dh)) * 1.5, dtype)
    v = round16(rng.standard_normal((batch * hk, nk, dv)), dtype)
    scale = 1.0 / math.sqrt(dh)
    P = dict(q_heads=hq, kv_heads=hk, group=hq // hk, q_len=nq, kv_len=nk, head_dim=dh,
             value_dim=dv, scale_log2=np.float32(scale) * np.float32(LOG2E))
    out = np.full((batch * hq, nq, dv), np.nan)
    lse = np.full((batch * hq, nq), np.nan)
    for bh in range(batch * hq):
        for bx in range((nq + kRows - 1) // kRows):
            run_block(q, k, v, out, lse, bx, bh, P, DP, dtype, raw_base)
    # dense float64 reference
    kv_index = [(bh // hq) * hk + (bh % hq) // (hq // hk) for bh in range(batch * hq)]
    scores = np.einsum("bid,bjd->bij", q, k[kv_index]) * scale
    ref_lse = np.log(np.exp(scores - scores.max(-1, keepdims=True)).sum(-1)) + scores.max(-1)
    ref = np.einsum("bij,bjd->bid", np.exp(scores - ref_lse[..., None]), v[kv_index])
    assert not np.isnan(out).any() and not np.isnan(lse).any(), "unwritten outputs"
    err = np.abs(out - ref).max() / np.abs(ref).max()
    lse_err = np.abs(lse - ref_lse).max() / np.abs(ref_lse).max()
    return err, lse_err


CASES = [
    # batch, hq, hk, nq, nk, dh, dv
    (1, 2, 1, 300, 333, 128, 128),   # ragged q and kv, GQA 2:1, 3 key tiles
    (2, 4, 2, 129, 257, 120, 112),   # Dh != Dv padded to 128, 2 q blocks, 3 key tiles
    (1, 3, 3, 64, 128, 64, 64),      # DP 64, one whole key tile, a half-empty q block
    (1, 2, 2, 200, 70, 64, 40),      # DP 64, Dv < Dh, a single ragged key tile
    (1, 1, 1, 1, 1, 8, 8),           # one query, one key
    (1, 4, 1, 130, 640, 96, 128),    # GQA 4:1, 5 whole key tiles, Dh < Dv
]

def mutation_checks():
    """Each deliberate layout bug must make the emulated forward fail."""
    global smem_descriptor, load_tile_swizzled, regA_to_matrix, swizzle128
    case = (1, 2, 1, 150, 333, 128, 128)  # 3 key tiles: every buffer is reused
    good = (smem_descriptor, load_tile_swizzled, regA_to_matrix, swizzle128)

    def swapped_v_offsets(address, leading, stride):
        if leading == kKeys * kSwizzleRow:
            leading, stride = stride, leading
        return good[0](address, leading, stride)

    def unswizzled_loads(smem, dst, src, row0, rows_valid, cols, ROWS, DP):
        for idx in range(ROWS * (DP // 8)):
            r, c = divmod(idx, DP // 8)
            valid = row0 + r < rows_valid and 8 * c < cols
            offset = (c // 8) * (ROWS * kSwizzleRow) + r * kSwizzleRow + (c % 8) * 16
            smem.write16(dst + offset, src[row0 + r, 8 * c: 8 * c + 8] if valid else np.zeros(8))

    mutations = {
        "V leading / stride byte offsets swapped": ("smem_descriptor", swapped_v_offsets),
        "tiles stored unswizzled": ("load_tile_swizzled", unswizzled_loads),
        "P registers 1 and 2 swapped": (
            "regA_to_matrix", lambda pa: good[2]([[p[0], p[2], p[1], p[3]] for p in pa])),
        "hardware reads without the swizzle": ("swizzle128", lambda addr: addr),
    }
    caught = True
    for name, change in {"cp.async.wait_group 1 instead of 0": {"cp_wait": 1},
                         "two V buffers instead of three": {"v_buffers": 2}}.items():
        MUTATE.update(change)
        try:
            emulate(*case, "bf16", 0x400, seed=1)
            print(f"{name}: NOT caught")
            caught = False
        except AssertionError as e:
            print(f"{name}: caught by an assertion ({e})")
        MUTATE.clear()
    for name, (attr, bad) in mutations.items():
        globals()[attr] = bad
        try:
            err, lse_err = emulate(*case, "bf16", 0x400, seed=1)
            failed = err > 1e-2 or lse_err > 1e-5
            print(f"{name}: out err {err:.2e}, lse err {lse_err:.2e}: {'caught' if failed else 'NOT caught'}")
        except AssertionError as e:
            failed = True
            print(f"{name}: caught by an assertion ({e})")
        caught &= failed
        smem_descriptor, load_tile_swizzled, regA_to_matrix, swizzle128 = good
    return caught


if __name__ == "__main__":
    if "--mutations" in sys.argv:
        sys.exit(0 if mutation_checks() else 1)
    worst = {}
    for (case, dtype, raw_base) in itertools.product(CASES, ["bf16", "f16"], [0x400, 0x410]):
        err, lse_err = emulate(*case, dtype, raw_base, seed=sum(case) + len(dtype))
        tol = 1e-2 if dtype == "bf16" else 2e-3
        ok = err <= tol and lse_err <= 1e-5
        print(f"{case} {dtype} smem base {raw_base:#x}: out err {err:.2e} lse err {lse_err:.2e}"
              f" {'ok' if ok else 'FAIL'}")
        worst[dtype] = max(worst.get(dtype, 0), err)
        if not ok:
            sys.exit(1)
    print("worst relative out error:", worst)
