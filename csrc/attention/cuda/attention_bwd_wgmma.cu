// Attention backward on Hopper's warpgroup tensor cores (wgmma.mma_async, sm_90a): the same
// meaning and outputs as attention_bwd_mma.cu (dK, dV written; dQ added into the fp32
// grad_q_accum) for bfloat16 / float16, padded head dims DP = 64 and 128, no mask, grouped-query
// heads, ragged query and key lengths. attention_cuda.cpp tries it first on compute capability
// 9.0 (L2P_ATTENTION_WGMMA_BACKWARD=0 turns it off, L2P_ATTENTION_WGMMA=0 both wgmma kernels);
// tests/ops/test_cuda_ops.py checks it there.
//
// A block of two warpgroups (256 threads) owns kKeys = 128 keys of one (batch, key/value head),
// 64 per warpgroup, and walks the 64-row query tiles of every query head of its group. Per tile,
// each warpgroup, for its 64 keys (all products m64, f32 accumulators):
//   S^T  = K Q^T     m64n64k16, A = K, B = Q from shared memory, both K-major, DP / 16 steps;
//   dP^T = V dO^T    the same with V and dO;
//   P^T  = exp2(S^T scale log2(e) - lse log2(e)),  dS^T = P^T (dP^T - delta)  in registers
//                    (lse from the forward, delta = rowsum(dO * O) from the delta kernel);
//   dV  += P^T dO    m64nDPk16, A = P^T packed in registers (the accumulator layout of S^T is
//                    the register-A layout), B = dO read N-major, 4 steps over the queries;
//   dK  += dS^T Q    the same with dS^T and Q;
// and dS^T goes to shared memory (keys x queries, 16-bit), where after a block barrier the
// block forms dQ = dS K: A = dS read M-major (imm-trans-a = 1) and B = K read N-major, always
// m64n64k16 (N = 64 is one 128-byte swizzle atom of an MN-major operand). At DP = 128 each
// warpgroup takes 64 of the columns over all 128 keys (8 steps); at DP = 64 each takes all 64
// columns over its own 64 keys (4 steps), and both add their part. Either way dQ is added into
// grad_q_accum with one 16-byte atomic per lane and n8 tile, 2048 per block and query tile.
// dK and dV stay in registers (DP / 2 + DP / 2 floats per thread) until the last tile and are
// written once, so grouped-query heads need no atomics.
// Order within a tile: S^T and dP^T are issued as two groups and the exponentials start when
// S^T is done (wait_group 1) while dP^T is still running; dV, dK and dQ go to the tensor cores
// back to back. The next tile's Q and dO (double-buffered) load with cp.async from the start of
// the tile. Two barriers per tile; no warp specialization.
// Bounds: rows past the end of the queries are zero in shared memory with lse = delta = 0, so
// dP^T = 0 and dS^T = 0 there, and their dV term is P^T x (a zero dO row); keys past the end
// are zero rows of K / V whose P^T is set to 0 (their dK / dV rows are not written).
// Shared-memory layout, descriptors and register layouts: wgmma_sm90.cuh.
// bench/gpu/emulate_attention_bwd_wgmma.py models this kernel in numpy (shared-memory bytes,
// swizzle, descriptors, register layouts, the order of copies, products, waits and barriers)
// against a float64 reference; keep it in step.
#include <cmath>
#include <cstdint>

#include "attention/cuda/attention_common.cuh"
#include "attention/cuda/mma_sm80.cuh"
#include "attention/cuda/wgmma_sm90.cuh"

namespace l2p::cuda {
namespace {

using attn::atomic_add4;
using attn::exp2_ftz;
using attn::kLog2e;
using namespace attn::mma;
namespace wgmma = attn::wgmma;
using wgmma::kSwizzleAtom;
using wgmma::kSwizzleRow;

constexpr int kGroups = 2, kGroupKeys = 64, kKeys = kGroups * kGroupKeys;
constexpr int kBM = 64;  // query rows per tile
constexpr int kThreads = 128 * kGroups;

template <int DP>
struct BwdWgmmaTile {
  static constexpr uint32_t kKVBytes = kKeys * DP * 2;  // K or V
  static constexpr uint32_t kQBytes = kBM * DP * 2;     // one Q or dO buffer
  static constexpr uint32_t kDsBytes = kKeys * kBM * 2;  // dS^T
  static constexpr uint32_t kStatBytes = 2 * kBM * 4;    // one buffer of lse and delta rows
  // K, V; Q and dO in two buffers each; dS^T; lse / delta in two buffers; slack to round the
  // base up to 1024 bytes (DP 128: 146 KiB, DP 64: 82 KiB).
  static constexpr size_t kSmem =
      2 * size_t(kKVBytes) + 4 * size_t(kQBytes) + kDsBytes + 2 * kStatBytes + kSwizzleAtom;
};

template <typename T>
struct BwdWgmmaParams {
  const T *grad_out, *q, *k, *v;
  const float* lse;
  const float* delta;
  float* grad_q_accum;
  T *grad_k, *grad_v;
  int64_t q_heads, kv_heads, group, q_len, kv_len, head_offset;
  int head_dim, value_dim;
  float scale, scale_log2;
};

template <typename T, int DP>
__global__ void __launch_bounds__(kThreads, 1)
    attention_bwd_wgmma_kernel(const BwdWgmmaParams<T> p) {
#ifdef L2P_WGMMA_DEVICE
  static_assert(DP == 64 || DP == 128, "DP is 64 or 128");
  using Tile = BwdWgmmaTile<DP>;
  constexpr int kDepth = DP / 16;       // k16 steps over the head dim (S^T, dP^T)
  constexpr int kQSteps = kBM / 16;     // k16 steps over a tile's queries (dV, dK)
  constexpr int kScoreRegs = kBM / 2;   // S^T, dP^T: 64 keys x kBM queries
  constexpr int kKVRegs = DP / 2;       // dK, dV: 64 keys x DP
  // dQ: kBM queries x 64 columns per warpgroup, over kDqSteps k16 steps of keys from key step
  // dq_step0, columns from DP-column block dq_block.
  constexpr bool kDqSplitsKeys = DP == 64;
  constexpr int kQRegs = 64 / 2;
  constexpr int kDqSteps = kDqSplitsKeys ? kKeys / 16 / kGroups : kKeys / 16;
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw = smem_addr(smem_raw);
  unsigned char* smem = smem_raw + (((raw + kSwizzleAtom - 1) & ~(kSwizzleAtom - 1)) - raw);
  unsigned char* sK = smem;
  unsigned char* sV = sK + Tile::kKVBytes;
  unsigned char* sQ = sV + Tile::kKVBytes;      // buffer i at sQ + i * kQBytes
  unsigned char* sdO = sQ + 2 * Tile::kQBytes;  // likewise
  unsigned char* sdS = sdO + 2 * Tile::kQBytes;
  float* sStat = reinterpret_cast<float*>(sdS + Tile::kDsBytes);  // buffer i: lse[kBM], delta[kBM]

  const int group = threadIdx.x / 128;  // warpgroup: keys 64 * group .. + 63 of the block
  const int warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int64_t bkv = p.head_offset + blockIdx.y;
  const int64_t b = bkv / p.kv_heads, kvh = bkv - b * p.kv_heads;
  const int64_t head0 = b * p.q_heads + kvh * p.group;  // first query head of the group
  const int64_t n0 = int64_t(blockIdx.x) * kKeys;
  const int64_t q_tiles = (p.q_len + kBM - 1) / kBM;
  const int64_t tiles = p.group * q_tiles;

  // Tile i: query head head0 + i / q_tiles, rows (i % q_tiles) * kBM ..; its Q and dO into
  // buffer buf (all threads, a uniform trip count: this runs while products are in flight).
  auto load_q_tile = [&](int64_t i, int buf) {
    const int64_t head = head0 + i / q_tiles, m0 = (i % q_tiles) * kBM;
    wgmma::load_tile_swizzled<T, kBM, DP, kThreads>(sQ + buf * Tile::kQBytes,
                                                    p.q + head * p.q_len * p.head_dim, m0,
                                                    p.q_len, p.head_dim);
    wgmma::load_tile_swizzled<T, kBM, DP, kThreads>(sdO + buf * Tile::kQBytes,
                                                    p.grad_out + head * p.q_len * p.value_dim,
                                                    m0, p.q_len, p.value_dim);
  };
  // Tile i's lse and delta rows into stat buffer buf, zeros past the end: warp 0 only, so
  // issued where no product is in flight.
  auto load_stats = [&](int64_t i, int buf) {
    if (threadIdx.x >= 32) return;
    const int64_t head = head0 + i / q_tiles, m0 = (i % q_tiles) * kBM;
#pragma unroll
    for (int it = 0; it < 2 * kBM / 32; ++it) {
      const int f = it * 32 + lane;  // 0 .. kBM - 1: lse, kBM .. 2 kBM - 1: delta
      const int r = f % kBM;
      const bool valid = m0 + r < p.q_len;
      const float* src = (f < kBM ? p.lse : p.delta) + head * p.q_len + (valid ? m0 + r : 0);
      cp_async4(sStat + buf * 2 * kBM + f, src, valid ? 4 : 0);
    }
  };

  // cp.async groups: {K, V, Q_0, dO_0, stats_0}, then one per tile i: {stats_i+1, Q_i+1, dO_i+1}.
  wgmma::load_tile_swizzled<T, kKeys, DP, kThreads>(sK, p.k + bkv * p.kv_len * p.head_dim, n0,
                                                    p.kv_len, p.head_dim);
  wgmma::load_tile_swizzled<T, kKeys, DP, kThreads>(sV, p.v + bkv * p.kv_len * p.value_dim, n0,
                                                    p.kv_len, p.value_dim);
  load_q_tile(0, 0);
  load_stats(0, 0);
  cp_async_commit();

  // Descriptors without their start address. K-major (leading byte offset unused): stride 1024.
  // MN-major: leading = the next 64-wide column block of the stored tile, stride 1024.
  const uint64_t kmajor = wgmma::smem_descriptor(0, 16, kSwizzleAtom);
  const uint64_t nmajor_q = wgmma::smem_descriptor(0, kBM * kSwizzleRow, kSwizzleAtom);
  const uint64_t nmajor_k = wgmma::smem_descriptor(0, kKeys * kSwizzleRow, kSwizzleAtom);
  // dS^T read M-major: its 64 queries are one column block, so the leading offset is unused.
  const uint64_t mmajor_ds = wgmma::smem_descriptor(0, kKeys * kSwizzleRow, kSwizzleAtom);
  // Start addresses >> 4 (bits 0-13 of a descriptor).
  const uint32_t k_start = smem_addr(sK) >> 4, v_start = smem_addr(sV) >> 4;
  const uint32_t q_start = smem_addr(sQ) >> 4, do_start = smem_addr(sdO) >> 4;
  const uint32_t ds_start = smem_addr(sdS) >> 4;
  constexpr uint32_t kKVBlock = kKeys * kSwizzleRow >> 4;  // a 64-dim column block of K / V
  constexpr uint32_t kQBlock = kBM * kSwizzleRow >> 4;     // ... of a Q / dO buffer
  constexpr uint32_t kQBuffer = Tile::kQBytes >> 4;
  constexpr uint32_t kK16Rows = 16 * kSwizzleRow >> 4;     // 16 stored rows
  const uint32_t my_keys = group * (kGroupKeys * kSwizzleRow >> 4);  // this warpgroup's K / V rows

  // This thread's keys (block-relative, in S^T's accumulator rows): key0 and key0 + 8.
  const int key0 = group * kGroupKeys + warp * 16 + g;
  const bool key_valid[2] = {n0 + key0 < p.kv_len, n0 + key0 + 8 < p.kv_len};

  float dv[kKVRegs], dk[kKVRegs];
#pragma unroll
  for (int i = 0; i < kKVRegs; ++i) dv[i] = dk[i] = 0.0f;
  const float ks = p.scale_log2;

  for (int64_t i = 0; i < tiles; ++i) {
    const int buf = static_cast<int>(i & 1);
    const float* s_lse = sStat + buf * 2 * kBM;
    const float* s_delta = s_lse + kBM;
    cp_async_wait<0>();  // Q_i, dO_i and stats_i have landed
    wgmma::fence_proxy_async();
    __syncthreads();  // ... for every thread; and tile i - 1 is finished everywhere
    if (i + 1 < tiles) load_stats(i + 1, buf ^ 1);

    // S^T = K Q^T and dP^T = V dO^T for this warpgroup's 64 keys, as two groups.
    float st[kScoreRegs], dpt[kScoreRegs];
    wgmma::fence();
#pragma unroll
    for (int kk = 0; kk < kDepth; ++kk) {
      const uint32_t col = (kk / 4) * kKVBlock + (kk % 4) * 2;  // 32 bytes per k16 step
      const uint32_t qcol = (kk / 4) * kQBlock + (kk % 4) * 2 + buf * kQBuffer;
      wgmma::mma_ss<T, kBM, 0, 0>(st, kmajor | (k_start + my_keys + col),
                                  kmajor | (q_start + qcol), kk > 0);
    }
    wgmma::commit();
#pragma unroll
    for (int kk = 0; kk < kDepth; ++kk) {
      const uint32_t col = (kk / 4) * kKVBlock + (kk % 4) * 2;
      const uint32_t qcol = (kk / 4) * kQBlock + (kk % 4) * 2 + buf * kQBuffer;
      wgmma::mma_ss<T, kBM, 0, 0>(dpt, kmajor | (v_start + my_keys + col),
                                  kmajor | (do_start + qcol), kk > 0);
    }
    wgmma::commit();
    // The next tile's Q and dO: buffer buf ^ 1 was last read by tile i - 1's products, all
    // waited for before the barrier above.
    if (i + 1 < tiles) load_q_tile(i + 1, buf ^ 1);
    cp_async_commit();

    // P^T (register d[4j + e]: key key0 + 8 (e / 2), query 8j + 2t + e % 2).
    wgmma::wait<1>();
    wgmma::pin(st);
#pragma unroll
    for (int j = 0; j < kScoreRegs / 4; ++j) {
      const float2 lse = *reinterpret_cast<const float2*>(s_lse + 8 * j + 2 * t);
      const float neg_lse[2] = {-attn::lse_log2(lse.x), -attn::lse_log2(lse.y)};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float pv = exp2_ftz(fmaf(st[4 * j + e], ks, neg_lse[e % 2]));
        st[4 * j + e] = key_valid[e / 2] ? pv : 0.0f;
      }
    }
    // dS^T = P^T (dP^T - delta), from P^T in f32; both are packed to 16 bits after it (fewer
    // live registers than packing P^T first).
    wgmma::wait<0>();
    wgmma::pin(dpt);
#pragma unroll
    for (int j = 0; j < kScoreRegs / 4; ++j) {
      const float2 delta = *reinterpret_cast<const float2*>(s_delta + 8 * j + 2 * t);
      const float d2[2] = {delta.x, delta.y};
#pragma unroll
      for (int e = 0; e < 4; ++e) dpt[4 * j + e] = st[4 * j + e] * (dpt[4 * j + e] - d2[e % 2]);
    }
    uint32_t pa[kQSteps][4], dsa[kQSteps][4];
    wgmma::pack_a<T, kQSteps>(pa, st);
    wgmma::pack_a<T, kQSteps>(dsa, dpt);
    // dS^T into shared memory, row = key, the 64 queries of a row in the 128-byte swizzle:
    // dsa[s][r] holds keys key0 + 8 (r % 2), queries 16 s + 8 (r / 2) + 2t, + 1 (chunk
    // 2s + r / 2; key0 % 8 = g).
#pragma unroll
    for (int s = 0; s < kQSteps; ++s) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int key = key0 + 8 * (r % 2), chunk = 2 * s + r / 2;
        *reinterpret_cast<uint32_t*>(sdS + key * kSwizzleRow + ((chunk ^ g) * 16) + 4 * t) =
            dsa[s][r];
      }
    }

    // dV += P^T dO and dK += dS^T Q (dO, Q read N-major: k16 step s = queries 16 s ..).
    wgmma::fence();
#pragma unroll
    for (int s = 0; s < kQSteps; ++s) {
      wgmma::mma_rs_nmajor<T, DP>(dv, pa[s], nmajor_q | (do_start + buf * kQBuffer + s * kK16Rows));
    }
#pragma unroll
    for (int s = 0; s < kQSteps; ++s) {
      wgmma::mma_rs_nmajor<T, DP>(dk, dsa[s], nmajor_q | (q_start + buf * kQBuffer + s * kK16Rows));
    }
    wgmma::commit();
    wgmma::fence_proxy_async();
    __syncthreads();  // dS^T of all 128 keys is in shared memory

    // dQ (kBM x 64) = dS K: A = dS read M-major from dS^T (k16 step s = keys 16 s ..), B = K
    // read N-major. DP = 128: columns 64 group .. (K's column block `group`) over all keys;
    // DP = 64: all columns over this warpgroup's keys.
    const int dq_step0 = kDqSplitsKeys ? group * kDqSteps : 0;
    const uint32_t dq_block = kDqSplitsKeys ? 0 : group * kKVBlock;
    float dq[kQRegs];
    wgmma::fence();
#pragma unroll
    for (int s = 0; s < kDqSteps; ++s) {
      wgmma::mma_ss<T, 64, 1, 1>(dq, mmajor_ds | (ds_start + (dq_step0 + s) * kK16Rows),
                                 nmajor_k | (k_start + dq_block + (dq_step0 + s) * kK16Rows),
                                 s > 0);
    }
    wgmma::commit();
    wgmma::wait<0>();
    wgmma::pin(dq);
    wgmma::pin(dv);
    wgmma::pin(dk);
#pragma unroll
    for (int s = 0; s < kQSteps; ++s) {
      wgmma::pin(pa[s]);
      wgmma::pin(dsa[s]);
    }

    // One 16-byte atomic per lane and n8 tile: lanes t and t ^ 1 swap halves so that even t
    // adds row g, odd t row g + 8, four consecutive columns each.
    const int64_t head = head0 + i / q_tiles, m0 = (i % q_tiles) * kBM;
    float* dq_rows = p.grad_q_accum + head * p.q_len * p.head_dim;
    const bool odd = t & 1;
    const int64_t qi = m0 + warp * 16 + g + (odd ? 8 : 0);
#pragma unroll
    for (int j = 0; j < kQRegs / 4; ++j) {
      const float* c = dq + 4 * j;
      const float send0 = odd ? c[0] : c[2], send1 = odd ? c[1] : c[3];
      const float got0 = __shfl_xor_sync(0xffffffffu, send0, 1);
      const float got1 = __shfl_xor_sync(0xffffffffu, send1, 1);
      const float4 sum =
          odd ? make_float4(got0, got1, c[2], c[3]) : make_float4(c[0], c[1], got0, got1);
      const int d = (kDqSplitsKeys ? 0 : 64 * group) + 8 * j + 4 * (t / 2);
      if (qi < p.q_len && d < p.head_dim) {
        atomic_add4(dq_rows + qi * p.head_dim + d, make_float4(sum.x * p.scale, sum.y * p.scale,
                                                               sum.z * p.scale, sum.w * p.scale));
      }
    }
  }

  // dK (scaled) and dV: register d[4j + e] = key key0 + 8 (e / 2), column 8j + 2t + e % 2.
  T* grad_k = p.grad_k + bkv * p.kv_len * p.head_dim;
  T* grad_v = p.grad_v + bkv * p.kv_len * p.value_dim;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (!key_valid[r]) continue;
    const int64_t key = n0 + key0 + 8 * r;
#pragma unroll
    for (int j = 0; j < kKVRegs / 4; ++j) {
      const int d = 8 * j + 2 * t;
      if (d < p.head_dim) {
        *reinterpret_cast<uint32_t*>(grad_k + key * p.head_dim + d) =
            pack2<T>(dk[4 * j + 2 * r] * p.scale, dk[4 * j + 2 * r + 1] * p.scale);
      }
      if (d < p.value_dim) {
        *reinterpret_cast<uint32_t*>(grad_v + key * p.value_dim + d) =
            pack2<T>(dv[4 * j + 2 * r], dv[4 * j + 2 * r + 1]);
      }
    }
  }
#endif  // L2P_WGMMA_DEVICE
}

template <typename T, int DP>
cudaError_t launch(const AttentionBackwardArgs& args, cudaStream_t stream) {
  const AttentionShape& s = args.shape;
  BwdWgmmaParams<T> p;
  attn::set_backward(p, args);
  return attn::launch_over_heads(attention_bwd_wgmma_kernel<T, DP>, p,
                                 (s.kv_len + kKeys - 1) / kKeys, s.batch * s.kv_heads, kThreads,
                                 BwdWgmmaTile<DP>::kSmem, stream);
}

}  // namespace

bool attention_backward_wgmma_supported(const AttentionBackwardArgs& args) {
  const AttentionShape& s = args.shape;
  const int dp = attn::register_tile_head_dim(s);
  if (dp == 0) return false;
  if (s.mask != nullptr) return false;  // masked attention stays on the mma.sync kernel
  if (s.q_len == 0 || s.kv_len == 0) return false;
  if (!attn::aligned16({args.q, args.k, args.v, args.grad_out, args.grad_k, args.grad_v})) {
    return false;
  }
  const size_t smem = dp == 64 ? BwdWgmmaTile<64>::kSmem : BwdWgmmaTile<128>::kSmem;
  return (s.kv_len + kKeys - 1) / kKeys < (int64_t{1} << 31) && wgmma::device_runs_wgmma(smem);
}

cudaError_t attention_backward_wgmma(const AttentionBackwardArgs& args, cudaStream_t stream) {
  return attn::dispatch_16bit(args.shape.dtype, [&](auto type) {
    return attn::dispatch_64_128(attn::register_tile_head_dim(args.shape), [&](auto dp) {
      return launch<typename decltype(type)::type, decltype(dp)::value>(args, stream);
    });
  });
}

}  // namespace l2p::cuda
