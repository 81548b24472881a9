"""Numpy emulation of csrc/attention/cuda/attention_bwd_wgmma.cu, thread by thread where the
index math lives, checked against a dense float64 attention backward. Runs on a CPU:
    python bench/gpu/emulate_attention_bwd_wgmma.py              # every case, bf16 and f16
    python bench/gpu/emulate_attention_bwd_wgmma.py --mutations  # shows that layout bugs fail
Like attention_wgmma_emulation.py (whose hardware side it reuses: shared memory as bytes, the
128-byte swizzle, descriptor decoding, K-major / MN-major operand reads, the accumulator and
register-A layouts, the ordering of cp.async groups, wgmma groups, fences and barriers), it
checks the kernel's index math against the PTX ISA as read by the kernel's author; a GPU run
(tests/ops/test_cuda_ops.py on an H100 / H200) is what validates that reading.

Kernel side (mirrors the .cu): the swizzled tile loads, the lse / delta copies of warp 0, the
descriptors, P^T and dS^T on accumulator registers, their packing, the swizzled 32-bit stores of
dS^T, the dQ atomics with the lane-pair shuffle, the dK / dV epilogue.
"""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import attention_wgmma_emulation as hw  # noqa: E402  (the hardware side)

kGroups, kGroupKeys, kBM = 2, 64, 64
kKeys, kThreads = kGroups * kGroupKeys, 128 * kGroups
kSwizzleRow, kSwizzleAtom = hw.kSwizzleRow, hw.kSwizzleAtom
LOG2E = hw.LOG2E
MUTATE = {}  # deliberate bugs, set by mutation_checks only


def operand_mmajor(smem, desc):
    """(64 x 16) A operand stored M-major (imm-trans-a = 1), 128B swizzle: element (m, k) at
    start + (m // 64) * LBO + (k // 8) * SBO + (k % 8) * 128 + 2 (m % 64), then swizzled: the
    N-major rule of the B operand with m in place of n."""
    start, lbo, sbo = hw.decode_descriptor(desc)
    m = np.arange(64)[:, None]
    k = np.arange(16)[None, :]
    addr = start + (m // 64) * lbo + (k // 8) * sbo + (k % 8) * 128 + 2 * (m % 64)
    return smem.read(hw.swizzle128(addr))


class BwdSchedule(hw.Schedule):
    """hw.Schedule with wgmma groups kept per warpgroup (the backward's groups stay open across
    a barrier) and plain thread reads of copied data (lse / delta: no proxy fence needed)."""

    def __init__(self):
        super().__init__()
        self.cur = 0
        self.groups_of = {0: [], 1: []}
        self.open_of = {0: [], 1: []}

    def read(self, slot, tag):
        self.wg_open, self.wg_groups = self.open_of[self.cur], self.groups_of[self.cur]
        super().read(slot, tag)

    def wg_commit(self):
        self.groups_of[self.cur].append(self.open_of[self.cur])
        self.open_of[self.cur] = []

    def wg_wait(self, n):
        self.wg_groups = self.groups_of[self.cur]
        super().wg_wait(n)
        self.groups_of[self.cur] = self.wg_groups

    def thread_read(self, slot, tag):
        have, rec = self.slots[slot]
        assert have == tag, f"threads read {slot} expecting {tag}, holds {have}"
        assert rec["done"] is not None and rec["done"] < self.phase, f"{tag}: copy not complete before a barrier"
        self.reads.append(dict(slot=slot, tag=tag, issue=self.phase, done=self.phase))

    def store(self, slot, tag):
        """st.shared by the threads: complete at once, needs a proxy fence and a barrier before
        a wgmma reads it."""
        rec = dict(slot=slot, tag=tag, issue=self.phase, done=self.phase)
        self.copies.append(rec)
        self.slots[slot] = (tag, rec)


def smem_size(DP):
    kv, qb, ds, stat = kKeys * DP * 2, kBM * DP * 2, kKeys * kBM * 2, 2 * kBM * 4
    return 2 * kv + 4 * qb + ds + 2 * stat + kSwizzleAtom


def run_block(x, out, bx, bkv, P, DP, dtype, raw_base):
    """One block: keys bx * 128 .. of key/value head bkv. x: inputs; out: dq_acc, dk, dv."""
    q, k, v, do, lse, delta = x["q"], x["k"], x["v"], x["do"], x["lse"], x["delta"]
    kv_bytes, q_bytes, ds_bytes = kKeys * DP * 2, kBM * DP * 2, kKeys * kBM * 2
    smem = hw.Smem(raw_base + smem_size(DP) + 64)
    base = (raw_base + kSwizzleAtom - 1) & ~(kSwizzleAtom - 1)
    sK = base
    sV = sK + kv_bytes
    sQ = sV + kv_bytes
    sdO = sQ + 2 * q_bytes
    sdS = sdO + 2 * q_bytes
    assert sdS + ds_bytes + 2 * 2 * kBM * 4 <= raw_base + smem_size(DP)
    stats = np.full((2, 2 * kBM), np.nan)  # the lse / delta buffers (not read by wgmma)
    q_len, kv_len, head_dim, value_dim = P["q_len"], P["kv_len"], P["head_dim"], P["value_dim"]
    b, kvh = divmod(bkv, P["kv_heads"])
    head0 = b * P["q_heads"] + kvh * P["group"]
    n0 = bx * kKeys
    q_tiles = (q_len + kBM - 1) // kBM
    tiles = P["group"] * q_tiles
    ks = np.float32(P["scale_log2"])
    sched = BwdSchedule()

    def load(dst, src, row0, rows_valid, cols, rows, slot, tag):
        hw.load_tile_swizzled(smem, dst, src, row0, rows_valid, cols, rows, DP)
        sched.copy(slot, tag)

    def load_q_tile(i, buf):
        head, m0 = head0 + i // q_tiles, (i % q_tiles) * kBM
        load(sQ + buf * q_bytes, q[head], m0, q_len, head_dim, kBM, f"Q{buf}", f"Q_{i}")
        load(sdO + buf * q_bytes, do[head], m0, q_len, value_dim, kBM, f"dO{buf}", f"dO_{i}")

    def load_stats(i, buf):  # warp 0: lanes copy floats f = it * 32 + lane
        head, m0 = head0 + i // q_tiles, (i % q_tiles) * kBM
        for f in range(2 * kBM):
            r = f % kBM
            valid = m0 + r < q_len
            stats[buf, f] = (lse if f < kBM else delta)[head, m0 + r] if valid else 0.0
        sched.copy(f"stat{buf}", f"stat_{i}")

    load(sK, k[bkv], n0, kv_len, head_dim, kKeys, "K", "K")
    load(sV, v[bkv], n0, kv_len, value_dim, kKeys, "V", "V")
    load_q_tile(0, 0)
    load_stats(0, 0)
    sched.cp_commit()

    kmajor = hw.smem_descriptor(0, 16, kSwizzleAtom)
    nmajor_q = hw.smem_descriptor(0, kBM * kSwizzleRow, kSwizzleAtom)
    nmajor_k = hw.smem_descriptor(0, kKeys * kSwizzleRow, kSwizzleAtom)
    mmajor_ds = hw.smem_descriptor(0, kKeys * kSwizzleRow, kSwizzleAtom)
    k_start, v_start, q_start, do_start, ds_start = (a >> 4 for a in (sK, sV, sQ, sdO, sdS))
    kKVBlock, kQBlock = (kKeys * kSwizzleRow) >> 4, (kBM * kSwizzleRow) >> 4
    kQBuffer, kK16Rows = q_bytes >> 4, (16 * kSwizzleRow) >> 4

    tid = np.arange(128)
    w, lane = tid // 32, tid % 32
    g, t = lane // 4, lane % 4
    reg = np.arange(kBM // 2)
    col_of = 8 * (reg[None, :] // 4) + 2 * t[:, None] + reg[None, :] % 2  # query of S^T register
    dv = [np.zeros((64, DP), np.float32) for _ in range(kGroups)]
    dk = [np.zeros((64, DP), np.float32) for _ in range(kGroups)]

    for i in range(tiles):
        buf = i & 1
        head, m0 = head0 + i // q_tiles, (i % q_tiles) * kBM
        sched.cp_wait(MUTATE.get("cp_wait", 0))
        sched.fence_proxy_async()
        sched.barrier()
        if i + 1 < tiles:
            load_stats(i + 1, buf ^ 1)
        pa_of, dsa_of = {}, {}
        for group in range(kGroups):  # phase 1: both warpgroups, in any order
            sched.cur = group
            my_keys = group * ((kGroupKeys * kSwizzleRow) >> 4)

            def scores(kv_start, kv_slot, q_side_start, q_side_slot):
                """(64 keys x kBM) = (K or V rows) (Q or dO)^T, both K-major, one group."""
                acc = np.zeros((64, kBM), np.float32)
                for kk in range(DP // 16):
                    col = (kk // 4) * kKVBlock + (kk % 4) * 2
                    qcol = (kk // 4) * kQBlock + (kk % 4) * 2 + MUTATE.get("buf", buf) * kQBuffer
                    sched.read(kv_slot, kv_slot)
                    sched.read(f"{q_side_slot}{buf}", f"{q_side_slot}_{i}")
                    A = hw.operand_kmajor(smem, kmajor | (kv_start + my_keys + col), 64)
                    Bt = hw.operand_kmajor(smem, kmajor | (q_side_start + qcol), kBM)
                    acc = hw.wgmma(acc, A, Bt.T, kk > 0)
                sched.wg_commit()
                return acc

            ST = scores(k_start, "K", q_start, "Q")
            DPT = scores(v_start, "V", do_start, "dO")
            if group == 0 and i + 1 < tiles:  # every thread takes part in the copies
                load_q_tile(i + 1, buf ^ 1)
            if group == 0:
                sched.cp_commit()
            sched.wg_wait(1)
            st = hw.acc_to_regs(ST).astype(np.float32)
            sched.thread_read(f"stat{buf}", f"stat_{i}")
            key0 = group * kGroupKeys + w * 16 + g
            key_valid = np.stack([n0 + key0 < kv_len, n0 + key0 + 8 < kv_len], axis=1)
            neg_lse = (-stats[buf, :kBM][col_of] * np.float32(LOG2E)).astype(np.float32)
            pv = hw.exp2_ftz(st * ks + neg_lse)
            pv = np.where(key_valid[:, (reg % 4) // 2], pv, np.float32(0))
            sched.wg_wait(0)
            dpt = hw.acc_to_regs(DPT).astype(np.float32)
            ds = (pv * (dpt - stats[buf, kBM:][col_of].astype(np.float32))).astype(np.float32)
            pr, dr = hw.round16(pv, dtype), hw.round16(ds, dtype)
            pa = [[[(pr[th, 8 * s + 2 * r], pr[th, 8 * s + 2 * r + 1]) for r in range(4)]
                   for s in range(kBM // 16)] for th in range(128)]
            dsa = [[[(dr[th, 8 * s + 2 * r], dr[th, 8 * s + 2 * r + 1]) for r in range(4)]
                    for s in range(kBM // 16)] for th in range(128)]
            # dS^T stores: dsa[s][r] -> key key0 + 8 (r % 2), chunk 2s + r / 2, bytes 4t.
            for th in range(128):
                for s in range(kBM // 16):
                    for r in range(4):
                        key = key0[th] + 8 * (r % 2)
                        chunk = 2 * s + r // 2
                        pos = chunk if MUTATE.get("unswizzled_ds") else chunk ^ g[th]
                        addr = sdS + key * kSwizzleRow + pos * 16 + 4 * t[th]
                        smem.cells[addr // 2: addr // 2 + 2] = dsa[th][s][r]
            sched.store(f"dS{group}", f"dS_{i}")
            pa_of[group], dsa_of[group] = pa, dsa
            for s in range(kBM // 16):
                sched.read(f"dO{buf}", f"dO_{i}")
                B = hw.operand_nmajor(smem, nmajor_q | (do_start + buf * kQBuffer + s * kK16Rows), DP)
                dv[group] = hw.wgmma(dv[group], hw.regA_to_matrix([p[s] for p in pa]), B, True)
            for s in range(kBM // 16):
                sched.read(f"Q{buf}", f"Q_{i}")
                B = hw.operand_nmajor(smem, nmajor_q | (q_start + buf * kQBuffer + s * kK16Rows), DP)
                dk[group] = hw.wgmma(dk[group], hw.regA_to_matrix([p[s] for p in dsa]), B, True)
            sched.wg_commit()
        sched.fence_proxy_async()
        if not MUTATE.get("no_second_barrier"):
            sched.barrier()
        split_keys = DP == 64  # dQ: DP 64 splits the keys between the warpgroups, DP 128 the columns
        dq_steps = kKeys // 16 // (kGroups if split_keys else 1)
        for group in range(kGroups):  # phase 2: dQ
            sched.cur = group
            step0 = group * dq_steps if split_keys else 0
            dq_block = 0 if split_keys else group * kKVBlock
            DQ = np.zeros((kBM, 64), np.float32)
            for s in range(dq_steps):
                sched.read(f"dS{(step0 + s) // 4}", f"dS_{i}")
                sched.read("K", "K")
                A = operand_mmajor(smem, mmajor_ds | (ds_start + (step0 + s) * kK16Rows))
                B = hw.operand_nmajor(smem, nmajor_k | (k_start + dq_block + (step0 + s) * kK16Rows), 64)
                DQ = hw.wgmma(DQ, A, B, s > 0)
            sched.wg_commit()
            sched.wg_wait(0)
            dq = hw.acc_to_regs(DQ).astype(np.float32)
            odd = (t & 1).astype(bool)
            qi = m0 + w * 16 + g + np.where(odd, 8, 0)
            partner = (tid // 32) * 32 + (lane ^ 1)
            for j in range(64 // 8):
                c = dq[:, 4 * j: 4 * j + 4]
                send = np.where(odd[:, None], c[:, 0:2], c[:, 2:4])
                got = send[partner]
                quad = np.where(odd[:, None], np.concatenate([got, c[:, 2:4]], 1),
                                np.concatenate([c[:, 0:2], got], 1))
                d = (0 if split_keys else 64 * group) + 8 * j + 4 * (t // 2)
                for th in range(128):
                    if qi[th] < q_len and d[th] < head_dim:
                        out["dq"][head, qi[th], d[th]: d[th] + 4] += quad[th] * np.float32(P["scale"])
    sched.check_races()

    for group in range(kGroups):
        for key_local in range(64):
            key = n0 + group * kGroupKeys + key_local
            if key >= kv_len:
                continue
            out["dk"][bkv, key, :head_dim] = hw.round16(dk[group][key_local, :head_dim] * np.float32(P["scale"]), dtype)
            out["dv"][bkv, key, :value_dim] = hw.round16(dv[group][key_local, :value_dim], dtype)


def emulate(batch, hq, hk, nq, nk, dh, dv, dtype, raw_base, seed):
    rng = np.random.default_rng(seed)
    DP = hw.padded_head_dim(dh, dv)
    assert DP in (64, 128) and dh % 8 == 0 and dv % 8 == 0
    q = hw.round16(rng.standard_normal((batch * hq, nq, dh)) * 1.5, dtype)
    k = hw.round16(rng.standard_normal((batch * hk, nk, dh)) * 1.5, dtype)
    v = hw.round16(rng.standard_normal((batch * hk, nk, dv)), dtype)
    do = hw.round16(rng.standard_normal((batch * hq, nq, dv)), dtype)
    scale = 1.0 / math.sqrt(dh)
    kv_index = [(bh // hq) * hk + (bh % hq) // (hq // hk) for bh in range(batch * hq)]
    kx, vx = k[kv_index], v[kv_index]
    S = np.einsum("bid,bjd->bij", q, kx) * scale
    lse = np.log(np.exp(S - S.max(-1, keepdims=True)).sum(-1)) + S.max(-1)
    Pm = np.exp(S - lse[..., None])
    o = hw.round16(np.einsum("bij,bjd->bid", Pm, vx), dtype)  # the forward's output, 16-bit
    delta = (do * o).sum(-1).astype(np.float32)  # the delta kernel (f32)
    x = dict(q=q, k=k, v=v, do=do, lse=lse.astype(np.float32), delta=delta)
    P = dict(q_heads=hq, kv_heads=hk, group=hq // hk, q_len=nq, kv_len=nk, head_dim=dh,
             value_dim=dv, scale=np.float32(scale), scale_log2=np.float32(scale) * np.float32(LOG2E))
    out = dict(dq=np.zeros((batch * hq, nq, dh)), dk=np.full((batch * hk, nk, dh), np.nan),
               dv=np.full((batch * hk, nk, dv), np.nan))
    for bkv in range(batch * hk):
        for bx in range((nk + kKeys - 1) // kKeys):
            run_block(x, out, bx, bkv, P, DP, dtype, raw_base)
    assert not np.isnan(out["dk"]).any() and not np.isnan(out["dv"]).any(), "unwritten outputs"
    # dense float64 reference (from the same 16-bit out)
    dP = np.einsum("bid,bjd->bij", do, vx)
    dS = Pm * (dP - (do * o).sum(-1, keepdims=True))
    ref_dq = np.einsum("bij,bjd->bid", dS, kx) * scale
    dk_h = np.einsum("bij,bid->bjd", dS, q) * scale
    dv_h = np.einsum("bij,bid->bjd", Pm, do)
    ref_dk = np.zeros_like(k)
    ref_dv = np.zeros_like(v)
    for bh, kvi in enumerate(kv_index):
        ref_dk[kvi] += dk_h[bh]
        ref_dv[kvi] += dv_h[bh]
    errs = {}
    for name, ref in (("dq", ref_dq), ("dk", ref_dk), ("dv", ref_dv)):
        # relative to the largest reference value (absolute where the gradient is 0: one key)
        errs[name] = np.abs(out[name] - ref).max() / (np.abs(ref).max() or 1.0)
    return errs


CASES = [
    # batch, hq, hk, nq, nk, dh, dv
    (1, 2, 1, 150, 333, 128, 128),   # ragged q and kv, GQA 2:1 (6 tiles per block), 3 key blocks
    (2, 2, 2, 129, 257, 120, 112),   # Dh != Dv padded to 128, ragged
    (1, 4, 1, 70, 128, 96, 128),     # GQA 4:1, Dh < Dv, one whole key block
    (1, 1, 1, 1, 1, 72, 72),         # one query, one key
    (1, 2, 1, 150, 333, 64, 64),     # DP 64: dQ split by keys; GQA, ragged
    (1, 2, 2, 200, 70, 64, 40),      # DP 64, Dv < Dh, a single ragged key block
]


def mutation_checks():
    """Each deliberate bug must make the emulation fail."""
    case = (1, 2, 1, 100, 200, 128, 128)
    caught = True
    bugs = {
        "cp.async.wait_group 1 instead of 0": {"cp_wait": 1},
        "no barrier between the dS^T stores and dQ": {"no_second_barrier": True},
        "dS^T stored unswizzled": {"unswizzled_ds": True},
        "S^T / dP^T read the other Q / dO buffer": {"buf": 0},
    }
    for name, change in bugs.items():
        MUTATE.update(change)
        try:
            errs = emulate(*case, "bf16", 0x400, seed=1)
            failed = max(errs.values()) > 1e-2
            print(f"{name}: errors {errs}: {'caught' if failed else 'NOT caught'}")
        except AssertionError as e:
            failed = True
            print(f"{name}: caught by an assertion ({e})")
        caught &= failed
        MUTATE.clear()
    return caught


if __name__ == "__main__":
    if "--mutations" in sys.argv:
        sys.exit(0 if mutation_checks() else 1)
    worst = {}
    for case, dtype, raw_base in itertools.product(CASES, ["bf16", "f16"], [0x400, 0x410]):
        errs = emulate(*case, dtype, raw_base, seed=sum(case) + len(dtype))
        tol = 1e-2 if dtype == "bf16" else 2e-3
        ok = max(errs.values()) <= tol
        print(f"{case} {dtype} smem base {raw_base:#x}: " +
              " ".join(f"{n} err {e:.2e}" for n, e in errs.items()) + f" {'ok' if ok else 'FAIL'}")
        worst[dtype] = max(worst.get(dtype, 0), max(errs.values()))
        if not ok:
            sys.exit(1)
    print("worst relative error:", worst)
