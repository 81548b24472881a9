// Attention forward on tensor cores with the scores and the output in registers
// (flash-attention-2's layout): a block of 4 warps owns 128 query rows of one (batch, head);
// each warp owns 32 of them as two m16 tiles and runs mma.sync m16n8k16 (bf16 / f16 in, f32
// accumulate). Every K and V fragment a warp reads from shared memory feeds both of its m16
// tiles: with one m16 tile per warp the shared-memory reads, not the tensor cores, set the pace.
// Per key tile S = Q K^T stays in registers, the online softmax works on it there (a row
// lives in the 4 lanes of a quad), and P is re-packed in registers as the A operand of
// O += P V. Q stays in shared memory (in registers it would not leave room for two m16 tiles
// of O) and is read with ldmatrix per k16 step; K and V tiles are double-buffered with
// cp.async, so the next tile loads while this one computes. Key bounds are checked on the last
// tile only, and the mask read is compiled in only when there is one. Needs head dims that are
// multiples of 8 and 16-byte aligned q, k, v (16-byte copies); head dims are zero-padded to
// DP = 64 or 128. Fragment layouts: mma_sm80.cuh.
#include <cmath>
#include <cstdint>

#include "attention/cuda/attention_common.cuh"
#include "attention/cuda/mma_sm80.cuh"

namespace l2p::cuda {
namespace {

using attn::kLn2;
using attn::exp2_ftz;
using attn::kLog2e;
using namespace attn::mma;

constexpr int kWarps = 4, kWarpRows = 32, kKeys = 64;
constexpr int kRows = kWarps * kWarpRows, kThreads = 32 * kWarps;
constexpr int kWarpTiles = kWarpRows / 16;  // m16 tiles per warp

template <int DP>
struct MmaTile {
  static constexpr int kLd = DP + 8;  // +16 bytes per row: conflict-free ldmatrix rows
  // Q, then K and V, each two buffers deep.
  static constexpr size_t kSmem = 2 * size_t(kLd) * (kRows + 4 * kKeys);
};

template <typename T>
struct MmaParams {
  const T *q, *k, *v;
  T* out;
  float* lse;
  attn::MaskView mask;
  int64_t q_heads, kv_heads, group, q_len, kv_len, head_offset;
  int head_dim, value_dim;
  float scale_log2;
};

template <typename T, int DP, bool kHasMask>
__global__ void __launch_bounds__(kThreads) attention_fwd_mma_kernel(const MmaParams<T> p) {
  constexpr int LD = MmaTile<DP>::kLd;
  constexpr int kScoreTiles = kKeys / 8;  // n8 tiles of S per m16 tile
  constexpr int kOutTiles = DP / 8;       // n8 tiles of O per m16 tile
  constexpr int kDepth = DP / 16;         // k16 steps of Q K^T
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + kRows * LD;      // buffer i at sK + i * kKeys * LD
  T* sV = sK + 2 * kKeys * LD;  // likewise

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int64_t bh = p.head_offset + blockIdx.y;
  const int64_t b = bh / p.q_heads, h = bh - b * p.q_heads;
  const int64_t kvh = b * p.kv_heads + h / p.group;
  const int64_t m0 = int64_t(blockIdx.x) * kRows;
  const T* q = p.q + bh * p.q_len * p.head_dim;
  const T* k = p.k + kvh * p.kv_len * p.head_dim;
  const T* v = p.v + kvh * p.kv_len * p.value_dim;
  const int64_t tiles = (p.kv_len + kKeys - 1) / kKeys;

  load_tile_async<T, kRows, DP, kThreads>(sQ, q, m0, p.q_len, p.head_dim);
  load_tile_async<T, kKeys, DP, kThreads>(sK, k, 0, p.kv_len, p.head_dim);
  load_tile_async<T, kKeys, DP, kThreads>(sV, v, 0, p.kv_len, p.value_dim);
  cp_async_commit();

  // This thread's rows: g and g + 8 of each of the warp's m16 tiles, from row0.
  const int64_t row0 = m0 + warp * kWarpRows + g;
  const float* mask_row[kWarpTiles][2];
  if constexpr (kHasMask) {
#pragma unroll
    for (int mi = 0; mi < kWarpTiles; ++mi) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int64_t i = row0 + mi * 16 + 8 * r;
        mask_row[mi][r] = i < p.q_len ? p.mask.row(b, h, i) : nullptr;
      }
    }
  }
  // ldmatrix row addresses (shared state space, in bytes): lane i names row i % 8 of 8x8
  // matrix i / 8. Q (A operand): matrices (rows 0-7 | 8-15) x (dims 0-7 | 8-15), rows first.
  // K (B operand, two n8 tiles): matrices 0/1 = keys 0-7 at dims 0-7 / 8-15, 2/3 = keys 8-15
  // likewise. V (B operand read transposed): (keys 0-7 | 8-15) x (dims 0-7 | 8-15).
  constexpr uint32_t kRowBytes = LD * sizeof(T);
  const uint32_t q_lane = smem_addr(sQ) +
      ((warp * kWarpRows + lane % 8 + ((lane / 8) % 2) * 8) * LD + (lane / 16) * 8) * sizeof(T);
  const uint32_t k_lane = smem_addr(sK) + ((lane % 8 + (lane / 16) * 8) * LD + ((lane / 8) % 2) * 8) * sizeof(T);
  const uint32_t v_lane = smem_addr(sV) + ((lane % 8 + ((lane / 8) % 2) * 8) * LD + (lane / 16) * 8) * sizeof(T);
  constexpr uint32_t kBufferBytes = kKeys * kRowBytes;

  float o[kWarpTiles][kOutTiles][4];
#pragma unroll
  for (int mi = 0; mi < kWarpTiles; ++mi) {
#pragma unroll
    for (int dj = 0; dj < kOutTiles; ++dj) o[mi][dj][0] = o[mi][dj][1] = o[mi][dj][2] = o[mi][dj][3] = 0.0f;
  }
  const float ks = kHasMask ? 1.0f : p.scale_log2;  // scores' units -> log2 units
  float m[kWarpTiles][2], l[kWarpTiles][2];  // running row max (log2 units), this thread's row-sum share
#pragma unroll
  for (int mi = 0; mi < kWarpTiles; ++mi) m[mi][0] = m[mi][1] = -INFINITY, l[mi][0] = l[mi][1] = 0.0f;

  for (int64_t it = 0; it < tiles; ++it) {
    const int buf = static_cast<int>(it & 1);
    if (it + 1 < tiles) {  // prefetch the next tile into the other buffer
      const int64_t next = (it + 1) * kKeys;
      load_tile_async<T, kKeys, DP, kThreads>(sK + (buf ^ 1) * kKeys * LD, k, next, p.kv_len, p.head_dim);
      load_tile_async<T, kKeys, DP, kThreads>(sV + (buf ^ 1) * kKeys * LD, v, next, p.kv_len, p.value_dim);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const uint32_t kt = k_lane + buf * kBufferBytes;
    const uint32_t vt = v_lane + buf * kBufferBytes;

    // S = Q K^T: B(k = dim, n = key) = K[key][dim], a row of K per n.
    float s[kWarpTiles][kScoreTiles][4];
#pragma unroll
    for (int mi = 0; mi < kWarpTiles; ++mi) {
#pragma unroll
      for (int j = 0; j < kScoreTiles; ++j) s[mi][j][0] = s[mi][j][1] = s[mi][j][2] = s[mi][j][3] = 0.0f;
    }
#pragma unroll
    for (int kk = 0; kk < kDepth; ++kk) {
      uint32_t qa[kWarpTiles][4];
#pragma unroll
      for (int mi = 0; mi < kWarpTiles; ++mi) ldmatrix_x4(qa[mi], q_lane + mi * 16 * kRowBytes + kk * 16 * sizeof(T));
#pragma unroll
      for (int jj = 0; jj < kScoreTiles; jj += 2) {
        uint32_t kb[4];
        ldmatrix_x4(kb, kt + jj * 8 * kRowBytes + kk * 16 * sizeof(T));
#pragma unroll
        for (int mi = 0; mi < kWarpTiles; ++mi) {
          mma16816<T>(s[mi][jj], qa[mi], kb[0], kb[1]);
          mma16816<T>(s[mi][jj + 1], qa[mi], kb[2], kb[3]);
        }
      }
    }

    // Scale to log2 units, add the mask, drop keys past the end; then the online softmax.
    // Keys of this tile that exist: all but on the last tile of a ragged sequence.
    // Without a mask the row maximum is taken on the raw scores (scale > 0, checked by the
    // launcher) and the scale enters each exponent through one FFMA, exp2(s k - m k); with a
    // mask the scores are scaled first (k = 1) so that the mask can be added.
    const int64_t n0 = it * kKeys;
    const int valid = p.kv_len - n0 < kKeys ? static_cast<int>(p.kv_len - n0) : kKeys;
#pragma unroll
    for (int mi = 0; mi < kWarpTiles; ++mi) {
      float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int j = 0; j < kScoreTiles; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e / 2;
          const int col = 8 * j + 2 * t + (e & 1);
          float x = s[mi][j][e];
          if constexpr (kHasMask) {
            x *= p.scale_log2;
            if (mask_row[mi][r] != nullptr && col < valid) {
              x += attn::scaled_mask(mask_row[mi][r][(n0 + col) * p.mask.s3]);
            }
          }
          if (valid < kKeys && col >= valid) x = -INFINITY;
          s[mi][j][e] = x;
          tile_max[r] = fmaxf(tile_max[r], x);
        }
      }
      float alpha[2], neg_m[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
        tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
        const float m_new = fmaxf(m[mi][r], tile_max[r]);
        // Nothing to attend to so far: exponentiate against 0, so every term is exp2(-inf) = 0.
        const float m_use = m_new == -INFINITY ? 0.0f : m_new;
        alpha[r] = exp2_ftz((m[mi][r] - m_use) * ks);
        neg_m[r] = -m_use * ks;
        m[mi][r] = m_new;
        l[mi][r] *= alpha[r];
      }
#pragma unroll
      for (int j = 0; j < kScoreTiles; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[mi][j][e] = exp2_ftz(fmaf(s[mi][j][e], ks, neg_m[e / 2]));
          l[mi][e / 2] += s[mi][j][e];
        }
      }
#pragma unroll
      for (int dj = 0; dj < kOutTiles; ++dj) {
        o[mi][dj][0] *= alpha[0];
        o[mi][dj][1] *= alpha[0];
        o[mi][dj][2] *= alpha[1];
        o[mi][dj][3] *= alpha[1];
      }
    }

    // O += P V: P's C fragments of key tiles 2kk, 2kk+1 are the A fragment of step kk;
    // B(k = key, n = dim) = V[key][dim], loaded transposed by ldmatrix.
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) {
      uint32_t pa[kWarpTiles][4];
#pragma unroll
      for (int mi = 0; mi < kWarpTiles; ++mi) {
        pa[mi][0] = pack2<T>(s[mi][2 * kk][0], s[mi][2 * kk][1]);
        pa[mi][1] = pack2<T>(s[mi][2 * kk][2], s[mi][2 * kk][3]);
        pa[mi][2] = pack2<T>(s[mi][2 * kk + 1][0], s[mi][2 * kk + 1][1]);
        pa[mi][3] = pack2<T>(s[mi][2 * kk + 1][2], s[mi][2 * kk + 1][3]);
      }
#pragma unroll
      for (int dj = 0; dj < kOutTiles; dj += 2) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, vt + kk * 16 * kRowBytes + dj * 8 * sizeof(T));
#pragma unroll
        for (int mi = 0; mi < kWarpTiles; ++mi) {
          mma16816<T>(o[mi][dj], pa[mi], vb[0], vb[1]);
          mma16816<T>(o[mi][dj + 1], pa[mi], vb[2], vb[3]);
        }
      }
    }
    __syncthreads();  // this buffer is refilled by the prefetch of the next iteration
  }

#pragma unroll
  for (int mi = 0; mi < kWarpTiles; ++mi) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float sum = l[mi][r];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      const int64_t i = row0 + mi * 16 + 8 * r;
      if (i >= p.q_len) continue;
      const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
      T* out_row = p.out + (bh * p.q_len + i) * p.value_dim;
#pragma unroll
      for (int dj = 0; dj < kOutTiles; ++dj) {
        const int col = dj * 8 + 2 * t;
        if (col < p.value_dim) {  // value_dim is a multiple of 8: both columns exist
          *reinterpret_cast<uint32_t*>(out_row + col) =
              pack2<T>(o[mi][dj][2 * r] * inv, o[mi][dj][2 * r + 1] * inv);
        }
      }
      if (t == 0) {
        p.lse[bh * p.q_len + i] = sum > 0.0f ? (m[mi][r] * ks + log2f(sum)) * kLn2 : -INFINITY;
      }
    }
  }
}

template <typename T, int DP>
cudaError_t launch(const AttentionForwardArgs& args, cudaStream_t stream) {
  const AttentionShape& s = args.shape;
  auto kernel = s.mask != nullptr ? attention_fwd_mma_kernel<T, DP, true>
                                  : attention_fwd_mma_kernel<T, DP, false>;
  MmaParams<T> p;
  attn::set_forward(p, args);
  p.mask = attn::MaskView::of(s);
  return attn::launch_over_heads(kernel, p, (s.q_len + kRows - 1) / kRows, s.batch * s.q_heads,
                                 kThreads, MmaTile<DP>::kSmem, stream);
}

}  // namespace

bool attention_forward_mma_supported(const AttentionForwardArgs& args) {
  const AttentionShape& s = args.shape;
  const int dp = attn::register_tile_head_dim(s);
  if (dp == 0) return false;
  if (!(s.scale > 0.0)) return false;  // the unmasked kernel takes the row maximum before scaling
  if (!attn::aligned16({args.q, args.k, args.v, args.out})) return false;
  if (attn::compute_capability_major() < 8) return false;
  const size_t smem = dp == 64 ? MmaTile<64>::kSmem : MmaTile<128>::kSmem;
  return smem <= static_cast<size_t>(attn::max_shared_per_block()) &&
         (s.q_len + kRows - 1) / kRows < (int64_t{1} << 31);
}

cudaError_t attention_forward_mma(const AttentionForwardArgs& args, cudaStream_t stream) {
  return attn::dispatch_16bit(args.shape.dtype, [&](auto type) {
    return attn::dispatch_64_128(attn::register_tile_head_dim(args.shape), [&](auto dp) {
      return launch<typename decltype(type)::type, decltype(dp)::value>(args, stream);
    });
  });
}

}  // namespace l2p::cuda
