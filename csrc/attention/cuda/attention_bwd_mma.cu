// Attention backward on tensor cores with mma.sync, flash-attention-2 style: a block of
// warps (BwdMmaTile) owns 16 keys per warp of one (batch, key/value head) and walks every
// query tile of every query head of the group. Per tile a warp computes, in registers,
// S^T = K Q^T and dP^T = V dO^T for its keys, P^T = exp(S^T - lse) (from the forward's
// logsumexp) and dS^T = P^T (dP^T - delta), delta = rowsum(dO * O) precomputed; then
// dV += P^T dO and dK += dS^T Q into register accumulators (written once at the end, so GQA
// needs no atomics). dS^T goes through shared memory so that the block can form
// dQ = dS K, which is added into the fp32 dQ buffer with atomics (each warp DP / kWarps
// columns; on sm_90 one 16-byte atomic per lane and n8 tile).
// Every operand comes out of shared memory through ldmatrix (32-bit shared addresses, as in
// attention_fwd_mma.cu). The Q and dO tiles (and their lse / delta rows) are double-buffered:
// the next tile, which may belong to the next query head of the group, loads with cp.async
// while this one computes. Bounds need no per-element checks: rows past the end are zero in
// shared memory and get lse = +inf (so P = 0), and a thread's keys are fixed, so a key past
// the end is one select per element; the mask read is compiled in only when there is one.
// Needs head dims that are multiples of 8 and 16-byte aligned tensors; head dims are
// zero-padded to DP = 64 or 128. Fragment layouts: mma_sm80.cuh.
// At DP = 128, where the device has 173 KB of shared memory per block, the staged kernel
// further down runs instead: 32 keys per warp, P^T and dS^T in shared memory, dK / dV split
// by head dim among warps (fewer shared-memory reads per MMA; see its comment).
#include <cmath>
#include <cstdint>

#include "attention/cuda/attention_common.cuh"
#include "attention/cuda/mma_sm80.cuh"

namespace l2p::cuda {
namespace {

using attn::atomic_add4;
using attn::exp2_ftz;
using attn::kLog2e;
using namespace attn::mma;

// Block shape per padded head dim. Each warp owns 16 keys. At DP = 128 a block has 8 warps
// (128 keys), which share each Q / dO tile and its dQ atomics among twice the keys of 4: on an
// H200 (B=1, H=24, N=4096, bf16) forward+backward took 3.20 ms with 8 warps against 3.37 ms
// with 4, although one block of 8 then fills an SM's registers where two blocks of 4 overlap
// each other's barriers. Query rows per tile (BM): 32 at DP = 128 keeps the register
// accumulators (dK and dV: 128 floats per thread) clear of spills.
template <int DP>
struct BwdMmaTile {
  static constexpr int kWarps = DP == 128 ? 8 : 4;
  static constexpr int kKeys = 16 * kWarps, kThreads = 32 * kWarps;
  static constexpr int kBM = DP == 128 ? 32 : 64;
  static constexpr int kLd = DP + 8;    // +16 bytes per row: conflict-free ldmatrix rows
  static constexpr int kLdS = kBM + 8;  // likewise for dS^T
  // K, V (kKeys rows); Q, dO (kBM rows, two buffers each); dS^T (kKeys x kBM), all 16-bit;
  // lse and delta (kBM floats, two buffers each).
  static constexpr size_t kSmem =
      2 * (size_t(kLd) * (2 * kKeys + 4 * kBM) + size_t(kKeys) * kLdS) + 4 * 4 * size_t(kBM);
};

template <typename T>
struct BwdMmaParams {
  const T *grad_out, *q, *k, *v;
  const float* lse;
  const float* delta;
  float* grad_q_accum;
  T *grad_k, *grad_v;
  attn::MaskView mask;
  int64_t q_heads, kv_heads, group, q_len, kv_len, head_offset;
  int head_dim, value_dim;
  float scale, scale_log2;
};

// Statistics of one query row as stored: lse and delta; a row past the end reads as one that
// attends to nothing (lse = -inf). Loaded into registers early, converted only when stored, so
// that the load's latency passes while the tensor cores work.
struct RowStats {
  float lse, delta;
};
__device__ __forceinline__ RowStats read_row_stats(const float* lse, const float* delta,
                                                   int64_t row, int64_t rows) {
  if (row >= rows) return {-INFINITY, 0.0f};
  return {lse[row], delta[row]};
}
// Shared-memory form for P = exp2(S log2(e) - lse log2(e)): lse in log2 units, and +inf where
// P must be 0 (lse = -inf: the row attends to nothing).
__device__ __forceinline__ void store_row_stats(float* s_lse, float* s_delta, int i,
                                                RowStats r) {
  s_lse[i] = r.lse == -INFINITY ? INFINITY : attn::lse_log2(r.lse);
  s_delta[i] = r.delta;
}

template <typename T, int DP, bool kHasMask>
__global__ void __launch_bounds__(BwdMmaTile<DP>::kThreads)
    attention_bwd_mma_kernel(const BwdMmaParams<T> p) {
  using Tile = BwdMmaTile<DP>;
  constexpr int kWarps = Tile::kWarps, kKeys = Tile::kKeys, kThreads = Tile::kThreads;
  constexpr int BM = Tile::kBM, LD = Tile::kLd, LDS = Tile::kLdS;
  constexpr int kQueryTiles = BM / 8;  // n8 tiles of S^T (queries) per warp
  constexpr int kDimTiles = DP / 8;    // n8 tiles of dK, dV per warp
  constexpr int kDepth = DP / 16;      // k16 steps over the head dim
  constexpr int kQDims = DP / kWarps;  // dQ columns per warp
  static_assert(BM <= kThreads, "one thread reads each row's lse and delta");
  static_assert(kQDims % 16 == 0, "dQ columns per warp come in ldmatrix.x4 pairs of n8 tiles");
  constexpr uint32_t kRowBytes = LD * sizeof(T), kDsRowBytes = LDS * sizeof(T);
  constexpr uint32_t kBufferBytes = BM * kRowBytes;  // one Q or dO buffer
  extern __shared__ __align__(128) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + kKeys * LD;
  T* sQ = sV + kKeys * LD;     // buffer i at sQ + i * BM * LD
  T* sdO = sQ + 2 * BM * LD;   // likewise
  T* sdS = sdO + 2 * BM * LD;  // dS^T: rows are keys, columns queries
  float* sLse = reinterpret_cast<float*>(sdS + kKeys * LDS);  // buffer i at sLse + i * BM
  float* sDelta = sLse + 2 * BM;                              // likewise

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int64_t bkv = p.head_offset + blockIdx.y;
  const int64_t b = bkv / p.kv_heads, hk = bkv - b * p.kv_heads;
  const int64_t n0 = int64_t(blockIdx.x) * kKeys;
  const int64_t head0 = b * p.q_heads + hk * p.group;  // (batch, query head) of the first tile
  const int64_t q_tiles = (p.q_len + BM - 1) / BM;
  const int64_t tiles = p.group * q_tiles;  // query tiles of all heads of the group, in order

  // Tiles run through the group's heads one after another; tile (gi, m0) loads its Q and dO
  // rows [m0, m0 + BM) of query head head0 + gi into buffer buf.
  auto load_query_tile = [&](int64_t gi, int64_t m0, int buf) {
    const int64_t bh = head0 + gi;
    load_tile_async<T, BM, DP, kThreads>(sQ + buf * BM * LD, p.q + bh * p.q_len * p.head_dim,
                                         m0, p.q_len, p.head_dim);
    load_tile_async<T, BM, DP, kThreads>(sdO + buf * BM * LD,
                                         p.grad_out + bh * p.q_len * p.value_dim, m0, p.q_len,
                                         p.value_dim);
  };
  load_tile_async<T, kKeys, DP, kThreads>(sK, p.k + bkv * p.kv_len * p.head_dim, n0, p.kv_len,
                                          p.head_dim);
  load_tile_async<T, kKeys, DP, kThreads>(sV, p.v + bkv * p.kv_len * p.value_dim, n0,
                                          p.kv_len, p.value_dim);
  load_query_tile(0, 0, 0);
  cp_async_commit();
  if (threadIdx.x < BM) {
    store_row_stats(sLse, sDelta, threadIdx.x,
                    read_row_stats(p.lse + head0 * p.q_len, p.delta + head0 * p.q_len,
                                   threadIdx.x, p.q_len));
  }

  // This thread's keys: kr0 + g and kr0 + g + 8 of the tile. A key past the end has a zero
  // K row, so S = 0 there and P would be exp(-lse), not 0: it is dropped by key_ok.
  const int kr0 = warp * 16;
  const int64_t key[2] = {n0 + kr0 + g, n0 + kr0 + g + 8};
  const bool key_ok[2] = {key[0] < p.kv_len, key[1] < p.kv_len};
  float dk[kDimTiles][4], dv[kDimTiles][4];
#pragma unroll
  for (int dj = 0; dj < kDimTiles; ++dj) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[dj][e] = dv[dj][e] = 0.0f;
  }

  // ldmatrix row addresses (shared state space, in bytes): lane i names row i % 8 of 8x8
  // matrix i / 8. Two lane patterns serve every operand:
  //   rows_first: matrices (rows 0-7 | 8-15) x (columns 0-7), then the same at columns 8-15;
  //   cols_first: matrices (rows 0-7) x (columns 0-7 | 8-15), then the same at rows 8-15.
  // K, V as the A operand of S^T, dP^T (rows = keys = m, columns = dims = k): rows_first gives
  //   a0..a3. Q, dO as the B operand of S^T, dP^T (B(k = dim, n = query) = Q[query][dim]):
  //   cols_first gives b0, b1 of query tile n and then of n + 1.
  // dO, Q as the B operand of dV, dK and K as that of dQ (stored k-major: rows are the k),
  //   read with .trans: rows_first gives b0, b1 of dim tile n and then of n + 1.
  // dS^T as the A operand of dQ (A(m = query, k = key) = dS^T[key][query]), with .trans:
  //   cols_first gives a0..a3.
  const int rows_first = (lane % 8 + ((lane / 8) % 2) * 8) * LD + (lane / 16) * 8;
  const int cols_first = (lane % 8 + (lane / 16) * 8) * LD + ((lane / 8) % 2) * 8;
  const uint32_t k_lane = smem_addr(sK + kr0 * LD + rows_first);
  const uint32_t v_lane = smem_addr(sV + kr0 * LD + rows_first);
  const uint32_t q_lane = smem_addr(sQ + cols_first);   // S^T, dP^T operands
  const uint32_t do_lane = smem_addr(sdO + cols_first);
  const uint32_t qt_lane = smem_addr(sQ + rows_first);  // dK, dV operands (.trans)
  const uint32_t dot_lane = smem_addr(sdO + rows_first);
  const uint32_t kt_lane = smem_addr(sK + rows_first + warp * kQDims);  // dQ operand (.trans)
  const uint32_t ds_lane =
      smem_addr(sdS + (lane % 8 + (lane / 16) * 8) * LDS + ((lane / 8) % 2) * 8);

  int64_t gi = 0, m0 = 0;  // this tile: query head head0 + gi, rows [m0, m0 + BM)
  for (int64_t it = 0; it < tiles; ++it) {
    const int buf = static_cast<int>(it & 1);
    // Prefetch the next tile into the other buffer (nothing reads it since the middle
    // barrier of the previous tile); its lse / delta wait in registers until after the
    // products, so their latency hides behind them too.
    int64_t next_gi = gi, next_m0 = m0 + BM;
    if (next_m0 >= p.q_len) next_gi += 1, next_m0 = 0;
    RowStats next_stats{-INFINITY, 0.0f};
    if (it + 1 < tiles) {
      load_query_tile(next_gi, next_m0, buf ^ 1);
      cp_async_commit();
      if (threadIdx.x < BM) {
        next_stats = read_row_stats(p.lse + (head0 + next_gi) * p.q_len,
                                    p.delta + (head0 + next_gi) * p.q_len,
                                    next_m0 + threadIdx.x, p.q_len);
      }
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const uint32_t q_buf = q_lane + buf * kBufferBytes, do_buf = do_lane + buf * kBufferBytes;
    const uint32_t qt_buf = qt_lane + buf * kBufferBytes;
    const uint32_t dot_buf = dot_lane + buf * kBufferBytes;

    // S^T = K_w Q^T and dP^T = V_w dO^T: 16 keys x BM queries.
    float st[kQueryTiles][4], dpt[kQueryTiles][4];
#pragma unroll
    for (int j = 0; j < kQueryTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) st[j][e] = dpt[j][e] = 0.0f;
    }
#pragma unroll
    for (int kk = 0; kk < kDepth; ++kk) {
      uint32_t ka[4], va[4];
      ldmatrix_x4(ka, k_lane + kk * 16 * sizeof(T));
      ldmatrix_x4(va, v_lane + kk * 16 * sizeof(T));
#pragma unroll
      for (int j = 0; j < kQueryTiles; j += 2) {
        uint32_t qb[4], ob[4];
        ldmatrix_x4(qb, q_buf + j * 8 * kRowBytes + kk * 16 * sizeof(T));
        mma16816<T>(st[j], ka, qb[0], qb[1]);
        mma16816<T>(st[j + 1], ka, qb[2], qb[3]);
        ldmatrix_x4(ob, do_buf + j * 8 * kRowBytes + kk * 16 * sizeof(T));
        mma16816<T>(dpt[j], va, ob[0], ob[1]);
        mma16816<T>(dpt[j + 1], va, ob[2], ob[3]);
      }
    }

    // P^T into st, dS^T into dpt. Element e of tile j: key kr0 + g + 8 (e / 2),
    // query m0 + 8 j + 2 t + (e % 2), whose lse and delta sit side by side in shared memory.
    const float* mask = kHasMask ? p.mask.row(b, head0 - b * p.q_heads + gi, 0) : nullptr;
#pragma unroll
    for (int j = 0; j < kQueryTiles; ++j) {
      const int i = 8 * j + 2 * t;
      const float2 lse2 = *reinterpret_cast<const float2*>(sLse + buf * BM + i);
      const float2 delta2 = *reinterpret_cast<const float2*>(sDelta + buf * BM + i);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float s = st[j][e] * p.scale_log2;
        if constexpr (kHasMask) {  // mask[b, h, qi, kj] = mask[qi * s2 + kj * s3]
          const int64_t qi = m0 + i + (e & 1);
          if (key_ok[e / 2] && qi < p.q_len) {
            s += attn::scaled_mask(mask[qi * p.mask.s2 + key[e / 2] * p.mask.s3]);
          }
        }
        const float prob = key_ok[e / 2] ? exp2_ftz(s - ((e & 1) ? lse2.y : lse2.x)) : 0.0f;
        st[j][e] = prob;
        dpt[j][e] = prob * (dpt[j][e] - ((e & 1) ? delta2.y : delta2.x));
      }
    }

    // dV += P^T dO and dK += dS^T Q, k16 steps over the tile's queries.
#pragma unroll
    for (int kq = 0; kq < BM / 16; ++kq) {
      const uint32_t pa[4] = {pack2<T>(st[2 * kq][0], st[2 * kq][1]),
                              pack2<T>(st[2 * kq][2], st[2 * kq][3]),
                              pack2<T>(st[2 * kq + 1][0], st[2 * kq + 1][1]),
                              pack2<T>(st[2 * kq + 1][2], st[2 * kq + 1][3])};
      const uint32_t da[4] = {pack2<T>(dpt[2 * kq][0], dpt[2 * kq][1]),
                              pack2<T>(dpt[2 * kq][2], dpt[2 * kq][3]),
                              pack2<T>(dpt[2 * kq + 1][0], dpt[2 * kq + 1][1]),
                              pack2<T>(dpt[2 * kq + 1][2], dpt[2 * kq + 1][3])};
#pragma unroll
      for (int dj = 0; dj < kDimTiles; dj += 2) {
        uint32_t ob[4], qb[4];
        ldmatrix_x4_trans(ob, dot_buf + kq * 16 * kRowBytes + dj * 8 * sizeof(T));
        mma16816<T>(dv[dj], pa, ob[0], ob[1]);
        mma16816<T>(dv[dj + 1], pa, ob[2], ob[3]);
        ldmatrix_x4_trans(qb, qt_buf + kq * 16 * kRowBytes + dj * 8 * sizeof(T));
        mma16816<T>(dk[dj], da, qb[0], qb[1]);
        mma16816<T>(dk[dj + 1], da, qb[2], qb[3]);
      }
    }

    // dS^T to shared memory for the dQ product (nothing reads sdS since the previous tile's
    // dQ, which every warp finished before the barrier at the top); the next tile's lse and
    // delta into the other buffer (last read by the previous tile).
#pragma unroll
    for (int j = 0; j < kQueryTiles; ++j) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        *reinterpret_cast<uint32_t*>(sdS + (kr0 + g + 8 * r) * LDS + 8 * j + 2 * t) =
            pack2<T>(dpt[j][2 * r], dpt[j][2 * r + 1]);
      }
    }
    if (threadIdx.x < BM) {
      store_row_stats(sLse + (buf ^ 1) * BM, sDelta + (buf ^ 1) * BM, threadIdx.x, next_stats);
    }
    __syncthreads();

    // dQ (BM x DP) = dS K over the block's kKeys keys; this warp: columns
    // [warp * kQDims, (warp + 1) * kQDims).
    float dqa[BM / 16][kQDims / 8][4];
#pragma unroll
    for (int mt = 0; mt < BM / 16; ++mt) {
#pragma unroll
      for (int nt = 0; nt < kQDims / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) dqa[mt][nt][e] = 0.0f;
      }
    }
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) {
      uint32_t kb[kQDims / 16][4];
#pragma unroll
      for (int nt = 0; nt < kQDims / 8; nt += 2) {
        ldmatrix_x4_trans(kb[nt / 2], kt_lane + kk * 16 * kRowBytes + nt * 8 * sizeof(T));
      }
#pragma unroll
      for (int mt = 0; mt < BM / 16; ++mt) {
        uint32_t a[4];
        ldmatrix_x4_trans(a, ds_lane + kk * 16 * kDsRowBytes + mt * 16 * sizeof(T));
#pragma unroll
        for (int nt = 0; nt < kQDims / 8; nt += 2) {
          mma16816<T>(dqa[mt][nt], a, kb[nt / 2][0], kb[nt / 2][1]);
          mma16816<T>(dqa[mt][nt + 1], a, kb[nt / 2][2], kb[nt / 2][3]);
        }
      }
    }
    // One 16-byte atomic per lane and n8 tile: the lanes of a pair (t, t ^ 1) swap halves so
    // that the even one holds row g, columns 4 (t / 2) .. + 3 and the odd one row g + 8, the
    // same columns.
    const bool odd = t & 1;
    const int64_t bh = head0 + gi;
    float* dq = p.grad_q_accum + bh * p.q_len * p.head_dim;
#pragma unroll
    for (int mt = 0; mt < BM / 16; ++mt) {
      const int64_t qi = m0 + mt * 16 + g + (odd ? 8 : 0);
#pragma unroll
      for (int nt = 0; nt < kQDims / 8; ++nt) {
        const float* c = dqa[mt][nt];
        const float send0 = odd ? c[0] : c[2], send1 = odd ? c[1] : c[3];
        const float got0 = __shfl_xor_sync(0xffffffffu, send0, 1);
        const float got1 = __shfl_xor_sync(0xffffffffu, send1, 1);
        const float4 sum = odd ? make_float4(got0, got1, c[2], c[3])
                               : make_float4(c[0], c[1], got0, got1);
        const int d = warp * kQDims + nt * 8 + 4 * (t / 2);
        // head_dim is a multiple of 8: columns d .. d + 3 exist together.
        if (qi < p.q_len && d < p.head_dim) {
          atomic_add4(dq + qi * p.head_dim + d,
                      make_float4(sum.x * p.scale, sum.y * p.scale, sum.z * p.scale,
                                  sum.w * p.scale));
        }
      }
    }
    gi = next_gi;
    m0 = next_m0;
  }

  T* grad_k = p.grad_k + bkv * p.kv_len * p.head_dim;
  T* grad_v = p.grad_v + bkv * p.kv_len * p.value_dim;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (!key_ok[r]) continue;
#pragma unroll
    for (int dj = 0; dj < kDimTiles; ++dj) {
      const int d = dj * 8 + 2 * t;
      if (d < p.head_dim) {
        *reinterpret_cast<uint32_t*>(grad_k + key[r] * p.head_dim + d) =
            pack2<T>(dk[dj][2 * r] * p.scale, dk[dj][2 * r + 1] * p.scale);
      }
      if (d < p.value_dim) {
        *reinterpret_cast<uint32_t*>(grad_v + key[r] * p.value_dim + d) =
            pack2<T>(dv[dj][2 * r], dv[dj][2 * r + 1]);
      }
    }
  }
}

// Backward at DP = 128 with the block's work split three ways, P^T and dS^T staged in shared
// memory (the flash-attention-2 partition, in our own code). A block owns 128 keys of one
// (batch, key/value head) and walks the group's query tiles of 64 rows, as the kernel above;
// its 8 warps w = 0..7 take, per tile:
//   1. S^T = K Q^T and dP^T = V dO^T, then P^T and dS^T: keys 32 (w / 2) .. + 32 x queries
//      32 (w % 2) .. + 32 (two m16 tiles x four n8 tiles), written to shared memory (16-bit);
//   2. dV += P^T dO and dK += dS^T Q over the tile's 64 queries: the same 32 keys x head-dim
//      columns 64 (w % 2) .. + 64, in registers (64 + 64 floats per thread) until the end;
//      the warp's own 32 queries right after step 1, P^T and dS^T still in registers, those
//      of the other warp of its key pair (w ^ 1) from shared memory after the barrier;
//   3. dQ = dS K over the 128 keys: queries 32 (w / 4) .. + 32 x columns 32 (w % 4) .. + 32,
//      added into the fp32 dQ buffer as above.
// Against 16 keys per warp, each K / V / Q / dO / P^T / dS^T fragment read from shared memory
// feeds two to four MMAs instead of one to two: per warp and 64-row tile 320 MMAs and 136
// ldmatrix.x4 (0.425 per MMA; the kernel above: 0.65) plus 32 32-bit stores of P^T / dS^T,
// and two barriers per 64 rows instead of per 32. Needs 173 KB of shared memory (H100 /
// H200: 227 KB); where a device has less, the kernel above runs instead.
template <int DP>
struct BwdStagedTile {
  static constexpr int kWarps = 8, kThreads = 32 * kWarps;
  static constexpr int kKeys = 128, kBM = 64;
  static constexpr int kLd = DP + 8;    // +16 bytes per row: conflict-free ldmatrix rows
  static constexpr int kLdS = kBM + 8;  // likewise for P^T, dS^T (and their 32-bit stores)
  // K, V (kKeys rows); Q, dO (kBM rows, two buffers each); P^T, dS^T (kKeys x kBM), all
  // 16-bit; lse and delta (kBM floats, two buffers each).
  static constexpr size_t kSmem =
      2 * (size_t(kLd) * (2 * kKeys + 4 * kBM) + 2 * size_t(kKeys) * kLdS) +
      4 * 4 * size_t(kBM);
};

template <typename T, int DP, bool kHasMask>
__global__ void __launch_bounds__(BwdStagedTile<DP>::kThreads)
    attention_bwd_mma_staged_kernel(const BwdMmaParams<T> p) {
  using Tile = BwdStagedTile<DP>;
  constexpr int kThreads = Tile::kThreads, kKeys = Tile::kKeys;
  constexpr int BM = Tile::kBM, LD = Tile::kLd, LDS = Tile::kLdS;
  constexpr int kDepth = DP / 16;      // k16 steps over the head dim (S^T, dP^T)
  constexpr int kKvDims = DP / 2;      // dK, dV columns per warp
  constexpr int kQDims = DP / 4;       // dQ columns per warp
  static_assert(DP == 128 && kKeys == 128 && BM == 64,
                "the warp partition below is written for 8 warps, 128 keys, 64 rows, DP = 128");
  static_assert(BM <= kThreads, "one thread reads each row's lse and delta");
  constexpr uint32_t kRowBytes = LD * sizeof(T), kSRowBytes = LDS * sizeof(T);
  constexpr uint32_t kBufferBytes = BM * kRowBytes;  // one Q or dO buffer
  extern __shared__ __align__(128) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + kKeys * LD;
  T* sQ = sV + kKeys * LD;     // buffer i at sQ + i * BM * LD
  T* sdO = sQ + 2 * BM * LD;   // likewise
  T* sP = sdO + 2 * BM * LD;   // P^T: rows are keys, columns queries
  T* sdS = sP + kKeys * LDS;   // dS^T, likewise
  float* sLse = reinterpret_cast<float*>(sdS + kKeys * LDS);  // buffer i at sLse + i * BM
  float* sDelta = sLse + 2 * BM;                              // likewise

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int64_t bkv = p.head_offset + blockIdx.y;
  const int64_t b = bkv / p.kv_heads, hk = bkv - b * p.kv_heads;
  const int64_t n0 = int64_t(blockIdx.x) * kKeys;
  const int64_t head0 = b * p.q_heads + hk * p.group;
  const int64_t q_tiles = (p.q_len + BM - 1) / BM;
  const int64_t tiles = p.group * q_tiles;
  const int keys_here = static_cast<int>(p.kv_len - n0 < kKeys ? p.kv_len - n0 : kKeys);

  auto load_query_tile = [&](int64_t gi, int64_t m0, int buf) {
    const int64_t bh = head0 + gi;
    load_tile_async<T, BM, DP, kThreads>(sQ + buf * BM * LD, p.q + bh * p.q_len * p.head_dim,
                                         m0, p.q_len, p.head_dim);
    load_tile_async<T, BM, DP, kThreads>(sdO + buf * BM * LD,
                                         p.grad_out + bh * p.q_len * p.value_dim, m0, p.q_len,
                                         p.value_dim);
  };
  load_tile_async<T, kKeys, DP, kThreads>(sK, p.k + bkv * p.kv_len * p.head_dim, n0, p.kv_len,
                                          p.head_dim);
  load_tile_async<T, kKeys, DP, kThreads>(sV, p.v + bkv * p.kv_len * p.value_dim, n0,
                                          p.kv_len, p.value_dim);
  load_query_tile(0, 0, 0);
  cp_async_commit();
  if (threadIdx.x < BM) {
    store_row_stats(sLse, sDelta, threadIdx.x,
                    read_row_stats(p.lse + head0 * p.q_len, p.delta + head0 * p.q_len,
                                   threadIdx.x, p.q_len));
  }

  // Phase 1 and 2 keys of this warp: kw0 .. kw0 + 31 of the block; this thread's are
  // kw0 + 16 mi + g + 8 r (mi, r = 0, 1), the rows of its accumulator elements. A key past
  // the end has a zero K row, so S = 0 there and P would be exp(-lse), not 0: it is dropped
  // by the key test.
  const int kw0 = 32 * (warp / 2);
  const int qw0 = 32 * (warp % 2);       // phase 1 queries (tile rows)
  const int qo0 = 32 - qw0;              // the other warp of the key pair: its queries
  const int dw0 = kKvDims * (warp % 2);  // phase 2 dK / dV columns
  const int q30 = 32 * (warp / 4);       // phase 3 queries (tile rows)
  const int d30 = kQDims * (warp % 4);   // phase 3 dQ columns
  float dk[2][kKvDims / 8][4], dv[2][kKvDims / 8][4];  // [key m16 tile][dim n8 tile]
#pragma unroll
  for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
    for (int dj = 0; dj < kKvDims / 8; ++dj) {
#pragma unroll
      for (int e = 0; e < 4; ++e) dk[mi][dj][e] = dv[mi][dj][e] = 0.0f;
    }
  }

  // ldmatrix row addresses, the two lane patterns of the kernel above (rows_first,
  // cols_first), for leading dimensions LD (K, V, Q, dO) and LDS (P^T, dS^T):
  //   phase 1: K, V as A (m = key, k = dim): rows_first; Q, dO as B (k = dim, n = query,
  //     B = Q[query][dim]): cols_first gives b0, b1 of query n8 tile n, then of n + 1;
  //   phase 2: P^T, dS^T as A (m = key, k = query): rows_first, only for the queries qo0 ..
  //     of the other warp of the key pair (this warp's own are still in registers); dO, Q as
  //     B (k = query, n = dim, stored k-major), .trans: rows_first gives b0, b1 of dim tile
  //     n, then of n + 1;
  //   phase 3: dS^T as A (m = query, k = key, A = dS^T[key][query]), .trans: cols_first;
  //     K as B (k = key, n = dim), .trans: rows_first.
  const int rows_first = lane % 8 + ((lane / 8) % 2) * 8, rows_first_col = (lane / 16) * 8;
  const int cols_first = lane % 8 + (lane / 16) * 8, cols_first_col = ((lane / 8) % 2) * 8;
  const uint32_t k_lane = smem_addr(sK + (kw0 + rows_first) * LD + rows_first_col);
  const uint32_t v_lane = smem_addr(sV + (kw0 + rows_first) * LD + rows_first_col);
  const uint32_t q_lane = smem_addr(sQ + (qw0 + cols_first) * LD + cols_first_col);
  const uint32_t do_lane = smem_addr(sdO + (qw0 + cols_first) * LD + cols_first_col);
  const uint32_t pa_lane = smem_addr(sP + (kw0 + rows_first) * LDS + rows_first_col + qo0);
  const uint32_t dsa_lane = smem_addr(sdS + (kw0 + rows_first) * LDS + rows_first_col + qo0);
  const uint32_t qt_lane = smem_addr(sQ + rows_first * LD + rows_first_col + dw0);
  const uint32_t dot_lane = smem_addr(sdO + rows_first * LD + rows_first_col + dw0);
  const uint32_t dsq_lane = smem_addr(sdS + cols_first * LDS + cols_first_col + q30);
  const uint32_t kt_lane = smem_addr(sK + rows_first * LD + rows_first_col + d30);

  // One k16 step of phase 2: dV += P^T dO and dK += dS^T Q for this warp's 32 keys x kKvDims
  // columns over 16 query rows; pa, da: the A fragments of P^T and dS^T (two key m16 tiles),
  // qt_rows, dot_rows: the lane's ldmatrix address of those rows in the Q / dO buffer.
  auto kv_step = [&](const uint32_t (&pa)[2][4], const uint32_t (&da)[2][4], uint32_t qt_rows,
                     uint32_t dot_rows) {
#pragma unroll
    for (int dj = 0; dj < kKvDims / 8; dj += 2) {
      uint32_t ob[4], qb[4];
      ldmatrix_x4_trans(ob, dot_rows + dj * 8 * sizeof(T));
      ldmatrix_x4_trans(qb, qt_rows + dj * 8 * sizeof(T));
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
        mma16816<T>(dv[mi][dj], pa[mi], ob[0], ob[1]);
        mma16816<T>(dv[mi][dj + 1], pa[mi], ob[2], ob[3]);
        mma16816<T>(dk[mi][dj], da[mi], qb[0], qb[1]);
        mma16816<T>(dk[mi][dj + 1], da[mi], qb[2], qb[3]);
      }
    }
  };

  int64_t gi = 0, m0 = 0;  // this tile: query head head0 + gi, rows [m0, m0 + BM)
  for (int64_t it = 0; it < tiles; ++it) {
    const int buf = static_cast<int>(it & 1);
    const uint32_t qt_buf = qt_lane + buf * kBufferBytes;
    const uint32_t dot_buf = dot_lane + buf * kBufferBytes;
    // Barrier A: this tile's Q / dO are in, and every warp is done with the previous tile
    // (its phase 2 read the other Q / dO buffer, phases 2 and 3 read P^T and dS^T).
    cp_async_wait<0>();
    __syncthreads();
    int64_t next_gi = gi, next_m0 = m0 + BM;
    if (next_m0 >= p.q_len) next_gi += 1, next_m0 = 0;
    RowStats next_stats{-INFINITY, 0.0f};
    if (it + 1 < tiles) {
      load_query_tile(next_gi, next_m0, buf ^ 1);
      cp_async_commit();
      if (threadIdx.x < BM) {
        next_stats = read_row_stats(p.lse + (head0 + next_gi) * p.q_len,
                                    p.delta + (head0 + next_gi) * p.q_len,
                                    next_m0 + threadIdx.x, p.q_len);
      }
    }

    // Phase 1: S^T and dP^T, 32 keys x 32 queries; [key m16 tile][query n8 tile].
    {
      float st[2][4][4], dpt[2][4][4];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) st[mi][j][e] = dpt[mi][j][e] = 0.0f;
        }
      }
      const uint32_t q_buf = q_lane + buf * kBufferBytes;
      const uint32_t do_buf = do_lane + buf * kBufferBytes;
#pragma unroll
      for (int kk = 0; kk < kDepth; ++kk) {
        uint32_t ka[2][4], va[2][4];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          ldmatrix_x4(ka[mi], k_lane + mi * 16 * kRowBytes + kk * 16 * sizeof(T));
          ldmatrix_x4(va[mi], v_lane + mi * 16 * kRowBytes + kk * 16 * sizeof(T));
        }
#pragma unroll
        for (int j = 0; j < 4; j += 2) {
          uint32_t qb[4], ob[4];
          ldmatrix_x4(qb, q_buf + j * 8 * kRowBytes + kk * 16 * sizeof(T));
          ldmatrix_x4(ob, do_buf + j * 8 * kRowBytes + kk * 16 * sizeof(T));
#pragma unroll
          for (int mi = 0; mi < 2; ++mi) {
            mma16816<T>(st[mi][j], ka[mi], qb[0], qb[1]);
            mma16816<T>(st[mi][j + 1], ka[mi], qb[2], qb[3]);
            mma16816<T>(dpt[mi][j], va[mi], ob[0], ob[1]);
            mma16816<T>(dpt[mi][j + 1], va[mi], ob[2], ob[3]);
          }
        }
      }

      // P^T and dS^T. Element e of tile (mi, j): key kw0 + 16 mi + g + 8 (e / 2), query
      // qw0 + 8 j + 2 t + (e % 2) of the tile, whose lse and delta sit side by side.
      const float* mask = kHasMask ? p.mask.row(b, head0 - b * p.q_heads + gi, 0) : nullptr;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int i = qw0 + 8 * j + 2 * t;
        const float2 lse2 = *reinterpret_cast<const float2*>(sLse + buf * BM + i);
        const float2 delta2 = *reinterpret_cast<const float2*>(sDelta + buf * BM + i);
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int key = kw0 + 16 * mi + g + 8 * (e / 2);
            const bool key_ok = key < keys_here;
            float s = st[mi][j][e] * p.scale_log2;
            if constexpr (kHasMask) {  // mask[b, h, qi, kj] = mask[qi * s2 + kj * s3]
              const int64_t qi = m0 + i + (e & 1);
              if (key_ok && qi < p.q_len) {
                s += attn::scaled_mask(mask[qi * p.mask.s2 + (n0 + key) * p.mask.s3]);
              }
            }
            const float prob = key_ok ? exp2_ftz(s - ((e & 1) ? lse2.y : lse2.x)) : 0.0f;
            st[mi][j][e] = prob;
            dpt[mi][j][e] = prob * (dpt[mi][j][e] - ((e & 1) ? delta2.y : delta2.x));
          }
        }
      }
      // P^T and dS^T in 16 bits, as the A fragments of phase 2's two k16 steps over this
      // warp's queries: register i of (step kq, key tile mi) holds tile j = 2 kq + i / 2,
      // elements 2 (i % 2) and 2 (i % 2) + 1 (keys g + 8 (i % 2), queries 2t, 2t + 1 of that
      // n8 tile), the layout a0..a3 of mma_sm80.cuh.
      uint32_t pa[2][2][4], da[2][2][4];  // [k16 step][key m16 tile][register]
#pragma unroll
      for (int kq = 0; kq < 2; ++kq) {
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int j = 2 * kq + i / 2, r = i % 2;
            pa[kq][mi][i] = pack2<T>(st[mi][j][2 * r], st[mi][j][2 * r + 1]);
            da[kq][mi][i] = pack2<T>(dpt[mi][j][2 * r], dpt[mi][j][2 * r + 1]);
          }
        }
      }
      // To shared memory for the other warp of the pair and for dQ (their readers of the
      // previous tile passed barrier A): tile j, rows r of key tile mi is register
      // 2 (j % 2) + r of step j / 2.
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int at = (kw0 + 16 * mi + g + 8 * r) * LDS + qw0 + 8 * j + 2 * t;
            *reinterpret_cast<uint32_t*>(sP + at) = pa[j / 2][mi][2 * (j % 2) + r];
            *reinterpret_cast<uint32_t*>(sdS + at) = da[j / 2][mi][2 * (j % 2) + r];
          }
        }
      }
      // Phase 2 over this warp's own queries, from registers, before the barrier.
#pragma unroll
      for (int kq = 0; kq < 2; ++kq) {
        kv_step(pa[kq], da[kq], qt_buf + (qw0 + 16 * kq) * kRowBytes,
                dot_buf + (qw0 + 16 * kq) * kRowBytes);
      }
    }
    // The next tile's lse and delta into the other buffer (last read by the previous tile's
    // phase 1).
    if (threadIdx.x < BM) {
      store_row_stats(sLse + (buf ^ 1) * BM, sDelta + (buf ^ 1) * BM, threadIdx.x, next_stats);
    }
    __syncthreads();  // barrier B: P^T and dS^T of the whole tile are in shared memory

    // Phase 3 first, so that its atomics drain while phase 2 computes: dQ (BM x DP) = dS K,
    // this warp rows q30 .. + 31, columns d30 .. + kQDims - 1.
    {
      float dqa[2][kQDims / 8][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
        for (int nt = 0; nt < kQDims / 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) dqa[mt][nt][e] = 0.0f;
        }
      }
#pragma unroll
      for (int kk = 0; kk < kKeys / 16; ++kk) {
        uint32_t kb[kQDims / 16][4];
#pragma unroll
        for (int nt = 0; nt < kQDims / 8; nt += 2) {
          ldmatrix_x4_trans(kb[nt / 2], kt_lane + kk * 16 * kRowBytes + nt * 8 * sizeof(T));
        }
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          uint32_t a[4];
          ldmatrix_x4_trans(a, dsq_lane + kk * 16 * kSRowBytes + mt * 16 * sizeof(T));
#pragma unroll
          for (int nt = 0; nt < kQDims / 8; nt += 2) {
            mma16816<T>(dqa[mt][nt], a, kb[nt / 2][0], kb[nt / 2][1]);
            mma16816<T>(dqa[mt][nt + 1], a, kb[nt / 2][2], kb[nt / 2][3]);
          }
        }
      }
      // One 16-byte atomic per lane and n8 tile, as in the kernel above.
      const bool odd = t & 1;
      float* dq = p.grad_q_accum + (head0 + gi) * p.q_len * p.head_dim;
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        const int64_t qi = m0 + q30 + mt * 16 + g + (odd ? 8 : 0);
#pragma unroll
        for (int nt = 0; nt < kQDims / 8; ++nt) {
          const float* c = dqa[mt][nt];
          const float send0 = odd ? c[0] : c[2], send1 = odd ? c[1] : c[3];
          const float got0 = __shfl_xor_sync(0xffffffffu, send0, 1);
          const float got1 = __shfl_xor_sync(0xffffffffu, send1, 1);
          const float4 sum = odd ? make_float4(got0, got1, c[2], c[3])
                                 : make_float4(c[0], c[1], got0, got1);
          const int d = d30 + nt * 8 + 4 * (t / 2);
          if (qi < p.q_len && d < p.head_dim) {
            atomic_add4(dq + qi * p.head_dim + d,
                        make_float4(sum.x * p.scale, sum.y * p.scale, sum.z * p.scale,
                                    sum.w * p.scale));
          }
        }
      }
    }

    // Phase 2 over the other warp's queries qo0 .. qo0 + 31, P^T and dS^T from shared memory.
#pragma unroll
    for (int kq = 0; kq < 2; ++kq) {
      uint32_t pa[2][4], da[2][4];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
        ldmatrix_x4(pa[mi], pa_lane + mi * 16 * kSRowBytes + kq * 16 * sizeof(T));
        ldmatrix_x4(da[mi], dsa_lane + mi * 16 * kSRowBytes + kq * 16 * sizeof(T));
      }
      kv_step(pa, da, qt_buf + (qo0 + 16 * kq) * kRowBytes, dot_buf + (qo0 + 16 * kq) * kRowBytes);
    }
    gi = next_gi;
    m0 = next_m0;
  }

  T* grad_k = p.grad_k + bkv * p.kv_len * p.head_dim;
  T* grad_v = p.grad_v + bkv * p.kv_len * p.value_dim;
#pragma unroll
  for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int key = kw0 + 16 * mi + g + 8 * r;
      if (key >= keys_here) continue;
#pragma unroll
      for (int dj = 0; dj < kKvDims / 8; ++dj) {
        const int d = dw0 + dj * 8 + 2 * t;
        if (d < p.head_dim) {
          *reinterpret_cast<uint32_t*>(grad_k + (n0 + key) * p.head_dim + d) =
              pack2<T>(dk[mi][dj][2 * r] * p.scale, dk[mi][dj][2 * r + 1] * p.scale);
        }
        if (d < p.value_dim) {
          *reinterpret_cast<uint32_t*>(grad_v + (n0 + key) * p.value_dim + d) =
              pack2<T>(dv[mi][dj][2 * r], dv[mi][dj][2 * r + 1]);
        }
      }
    }
  }
}

// Launches kernel, an instantiation for the block shape Tile, over (key tiles, batch x
// key/value heads), the second grid dimension in chunks of at most 65535.
template <typename Tile, typename T>
cudaError_t launch(void (*kernel)(BwdMmaParams<T>), const AttentionBackwardArgs& args,
                   cudaStream_t stream) {
  const AttentionShape& s = args.shape;
  BwdMmaParams<T> p;
  attn::set_backward(p, args);
  p.mask = attn::MaskView::of(s);
  return attn::launch_over_heads(kernel, p, (s.kv_len + Tile::kKeys - 1) / Tile::kKeys,
                                 s.batch * s.kv_heads, Tile::kThreads, Tile::kSmem, stream);
}

// DP = 128 runs the staged kernel where the device has its shared memory, else (and at
// DP = 64, where splitting dK / dV by head dim saves little: 0.55 ldmatrix per MMA against
// 0.58) the kernel with 16 keys per warp.
template <typename T>
cudaError_t launch_for_dim(const AttentionBackwardArgs& args, cudaStream_t stream) {
  const bool masked = args.shape.mask != nullptr;
  switch (attn::padded_head_dim(args.shape.head_dim, args.shape.value_dim)) {
    case 64:
      return launch<BwdMmaTile<64>, T>(masked ? attention_bwd_mma_kernel<T, 64, true>
                                              : attention_bwd_mma_kernel<T, 64, false>,
                                       args, stream);
    case 128:
      if (BwdStagedTile<128>::kSmem <= static_cast<size_t>(attn::max_shared_per_block())) {
        return launch<BwdStagedTile<128>, T>(masked
                                                 ? attention_bwd_mma_staged_kernel<T, 128, true>
                                                 : attention_bwd_mma_staged_kernel<T, 128, false>,
                                             args, stream);
      }
      return launch<BwdMmaTile<128>, T>(masked ? attention_bwd_mma_kernel<T, 128, true>
                                               : attention_bwd_mma_kernel<T, 128, false>,
                                        args, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

bool attention_backward_mma_supported(const AttentionBackwardArgs& args) {
  const AttentionShape& s = args.shape;
  const int dp = attn::register_tile_head_dim(s);
  if (dp == 0) return false;
  if (!attn::aligned16({args.q, args.k, args.v, args.grad_out, args.grad_k, args.grad_v})) {
    return false;
  }
  if (attn::compute_capability_major() < 8) return false;
  const size_t smem = dp == 64 ? BwdMmaTile<64>::kSmem : BwdMmaTile<128>::kSmem;
  return smem <= static_cast<size_t>(attn::max_shared_per_block());
}

cudaError_t attention_backward_mma(const AttentionBackwardArgs& args, cudaStream_t stream) {
  return attn::dispatch_16bit(args.shape.dtype, [&](auto type) {
    return launch_for_dim<typename decltype(type)::type>(args, stream);
  });
}

}  // namespace l2p::cuda
