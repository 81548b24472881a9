// Attention forward on tensor cores with the scores and the output in registers
// (flash-attention-2's layout): a block of 4 warps owns 64 query rows of one (batch, head);
// each warp owns 16 rows and runs mma.sync m16n8k16 (bf16 / f16 in, f32 accumulate) on them.
// Per key tile S = Q K^T stays in registers, the online softmax works on it there (a row
// lives in the 4 lanes of a quad), and P is re-packed in registers as the A operand of
// O += P V. K and V tiles are double-buffered in shared memory with cp.async, so the next
// tile loads while this one computes. Needs head dims that are multiples of 8 and 16-byte
// aligned q, k, v (16-byte copies); head dims are zero-padded to DP = 64 or 128. Fragment
// layouts: mma_sm80.cuh.
#include <cmath>
#include <cstdint>

#include "attention/cuda/attention_common.cuh"
#include "attention/cuda/mma_sm80.cuh"

namespace l2p::cuda {
namespace {

using attn::kLn2;
using attn::kLog2e;
using namespace attn::mma;

constexpr int kRows = 64, kKeys = 64, kThreads = 128;

template <int DP>
struct MmaTile {
  static constexpr int kLd = DP + 8;  // +16 bytes per row: conflict-free fragment loads
  // Q, then K and V, each two buffers deep.
  static constexpr size_t kSmem = 2 * size_t(kLd) * (kRows + 4 * kKeys);
};

template <typename T>
struct MmaParams {
  const T *q, *k, *v;
  T* out;
  float* lse;
  attn::MaskView mask;
  int64_t q_heads, kv_heads, group, q_len, kv_len, bh_offset;
  int head_dim, value_dim;
  float scale_log2;
};

template <typename T, int DP>
__global__ void __launch_bounds__(kThreads) attention_fwd_mma_kernel(const MmaParams<T> p) {
  constexpr int LD = MmaTile<DP>::kLd;
  constexpr int kScoreTiles = kKeys / 8;  // n8 tiles of S per warp
  constexpr int kOutTiles = DP / 8;       // n8 tiles of O per warp
  constexpr int kDepth = DP / 16;         // k16 steps of Q K^T
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + kRows * LD;      // buffer i at sK + i * kKeys * LD
  T* sV = sK + 2 * kKeys * LD;  // likewise

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int64_t bh = p.bh_offset + blockIdx.y;
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

  // This thread's two rows: g and g + 8 of the warp's 16.
  int64_t row[2];
  const float* mask_row[2];
  for (int r = 0; r < 2; ++r) {
    row[r] = m0 + warp * 16 + g + 8 * r;
    mask_row[r] = row[r] < p.q_len ? p.mask.row(b, h, row[r]) : nullptr;
  }
  uint32_t qa[kDepth][4];
  float o[kOutTiles][4];
#pragma unroll
  for (int dj = 0; dj < kOutTiles; ++dj) o[dj][0] = o[dj][1] = o[dj][2] = o[dj][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY};  // running row max, log2 units
  float l[2] = {0.0f, 0.0f};            // this thread's share of the row sums

  for (int64_t it = 0; it < tiles; ++it) {
    const int buf = static_cast<int>(it & 1);
    if (it + 1 < tiles) {  // prefetch the next tile into the other buffer
      const int64_t next = (it + 1) * kKeys;
      T* k_next = sK + (buf ^ 1) * kKeys * LD;
      T* v_next = sV + (buf ^ 1) * kKeys * LD;
      load_tile_async<T, kKeys, DP, kThreads>(k_next, k, next, p.kv_len, p.head_dim);
      load_tile_async<T, kKeys, DP, kThreads>(v_next, v, next, p.kv_len, p.value_dim);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if (it == 0) {
      const T* qw = sQ + (warp * 16 + g) * LD + 2 * t;
#pragma unroll
      for (int kk = 0; kk < kDepth; ++kk) {
        qa[kk][0] = ld_shared32(qw + kk * 16);
        qa[kk][1] = ld_shared32(qw + 8 * LD + kk * 16);
        qa[kk][2] = ld_shared32(qw + kk * 16 + 8);
        qa[kk][3] = ld_shared32(qw + 8 * LD + kk * 16 + 8);
      }
    }
    const T* kt = sK + buf * kKeys * LD;
    const T* vt = sV + buf * kKeys * LD;

    // S = Q K^T: B(k = dim, n = key) = K[key][dim], a row of K per n.
    float s[kScoreTiles][4];
#pragma unroll
    for (int j = 0; j < kScoreTiles; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < kDepth; ++kk) {
#pragma unroll
      for (int j = 0; j < kScoreTiles; ++j) {
        const T* kr = kt + (8 * j + g) * LD + kk * 16 + 2 * t;
        mma16816<T>(s[j], qa[kk], ld_shared32(kr), ld_shared32(kr + 8));
      }
    }

    // Scale to log2 units, add the mask, drop keys past the end; then the online softmax.
    const int64_t n0 = it * kKeys;
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < kScoreTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e / 2;
        const int64_t col = n0 + 8 * j + 2 * t + (e & 1);
        float x = -INFINITY;
        if (col < p.kv_len) {
          x = s[j][e] * p.scale_log2;
          if (mask_row[r] != nullptr) x += mask_row[r][col * p.mask.s3] * kLog2e;
        }
        s[j][e] = x;
        tile_max[r] = fmaxf(tile_max[r], x);
      }
    }
    float alpha[2], m_use[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
      const float m_new = fmaxf(m[r], tile_max[r]);
      // Nothing to attend to so far: exponentiate against 0, so every term is exp2(-inf) = 0.
      m_use[r] = m_new == -INFINITY ? 0.0f : m_new;
      alpha[r] = exp2f(m[r] - m_use[r]);
      m[r] = m_new;
      l[r] *= alpha[r];
    }
#pragma unroll
    for (int j = 0; j < kScoreTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[j][e] = exp2f(s[j][e] - m_use[e / 2]);
        l[e / 2] += s[j][e];
      }
    }
#pragma unroll
    for (int dj = 0; dj < kOutTiles; ++dj) {
      o[dj][0] *= alpha[0];
      o[dj][1] *= alpha[0];
      o[dj][2] *= alpha[1];
      o[dj][3] *= alpha[1];
    }

    // O += P V: P's C fragments of key tiles 2kk, 2kk+1 are the A fragment of step kk;
    // B(k = key, n = dim) = V[key][dim], loaded transposed by ldmatrix.
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) {
      const uint32_t pa[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]),
                              pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                              pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
      const T* vr = vt + (kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * LD + (lane / 16) * 8;
#pragma unroll
      for (int dj = 0; dj < kOutTiles; dj += 2) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, vr + dj * 8);
        mma16816<T>(o[dj], pa, vb[0], vb[1]);
        mma16816<T>(o[dj + 1], pa, vb[2], vb[3]);
      }
    }
    __syncthreads();  // this buffer is refilled by the prefetch of the next iteration
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    if (row[r] >= p.q_len) continue;
    const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
    T* out_row = p.out + (bh * p.q_len + row[r]) * p.value_dim;
#pragma unroll
    for (int dj = 0; dj < kOutTiles; ++dj) {
      const int col = dj * 8 + 2 * t;
      if (col < p.value_dim) {  // value_dim is a multiple of 8: both columns exist
        *reinterpret_cast<uint32_t*>(out_row + col) =
            pack2<T>(o[dj][2 * r] * inv, o[dj][2 * r + 1] * inv);
      }
    }
    if (t == 0) {
      p.lse[bh * p.q_len + row[r]] = l[r] > 0.0f ? (m[r] + log2f(l[r])) * kLn2 : -INFINITY;
    }
  }
}

template <typename T, int DP>
cudaError_t launch(const AttentionForwardArgs& args, cudaStream_t stream) {
  using Tile = MmaTile<DP>;
  const AttentionShape& s = args.shape;
  auto kernel = attention_fwd_mma_kernel<T, DP>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(Tile::kSmem));
  if (err != cudaSuccess) return err;
  MmaParams<T> p;
  p.q = static_cast<const T*>(args.q);
  p.k = static_cast<const T*>(args.k);
  p.v = static_cast<const T*>(args.v);
  p.out = static_cast<T*>(args.out);
  p.lse = args.lse;
  p.mask = attn::MaskView::of(s);
  p.q_heads = s.q_heads;
  p.kv_heads = s.kv_heads;
  p.group = s.q_heads / s.kv_heads;
  p.q_len = s.q_len;
  p.kv_len = s.kv_len;
  p.head_dim = static_cast<int>(s.head_dim);
  p.value_dim = static_cast<int>(s.value_dim);
  p.scale_log2 = static_cast<float>(s.scale) * kLog2e;
  const int64_t q_tiles = (s.q_len + kRows - 1) / kRows;
  const int64_t heads = s.batch * s.q_heads;
  for (int64_t first = 0; first < heads; first += 65535) {
    p.bh_offset = first;
    const dim3 grid(static_cast<unsigned>(q_tiles),
                    static_cast<unsigned>(heads - first < 65535 ? heads - first : 65535));
    kernel<<<grid, kThreads, Tile::kSmem, stream>>>(p);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t launch_for_dim(const AttentionForwardArgs& args, cudaStream_t stream) {
  switch (attn::padded_head_dim(args.shape.head_dim, args.shape.value_dim)) {
    case 64: return launch<T, 64>(args, stream);
    case 128: return launch<T, 128>(args, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

bool attention_forward_mma_supported(const AttentionForwardArgs& args) {
  const AttentionShape& s = args.shape;
  if (s.dtype != AttentionDType::kBFloat16 && s.dtype != AttentionDType::kFloat16) return false;
  const int dp = attn::padded_head_dim(s.head_dim, s.value_dim);
  if (dp != 64 && dp != 128) return false;
  if (s.head_dim % 8 != 0 || s.value_dim % 8 != 0) return false;
  if (!attn::aligned16(args.q) || !attn::aligned16(args.k) || !attn::aligned16(args.v) ||
      !attn::aligned16(args.out)) {
    return false;
  }
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      major < 8) {
    return false;
  }
  const size_t smem = dp == 64 ? MmaTile<64>::kSmem : MmaTile<128>::kSmem;
  return smem <= static_cast<size_t>(attn::max_shared_per_block()) &&
         (s.q_len + kRows - 1) / kRows < (int64_t{1} << 31);
}

cudaError_t attention_forward_mma(const AttentionForwardArgs& args, cudaStream_t stream) {
  if (args.shape.dtype == AttentionDType::kBFloat16) {
    return launch_for_dim<__nv_bfloat16>(args, stream);
  }
  if (args.shape.dtype == AttentionDType::kFloat16) return launch_for_dim<__half>(args, stream);
  return cudaErrorInvalidValue;
}

}  // namespace l2p::cuda
