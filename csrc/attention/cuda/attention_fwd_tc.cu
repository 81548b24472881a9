// Attention forward on tensor cores (bfloat16 / float16), flash-attention-2 style: a block of
// 4 warps owns 64 query rows of one (batch, head) and streams the keys in tiles of BN with an
// online softmax. Each warp owns 16 query rows end to end (its rows of S, P and the fp32
// output accumulator in shared memory), so within a key tile warps only meet at the K / V
// loads. Products use WMMA 16x16x16 with fp32 accumulation; exponentials are base 2 with the
// scale folded in. Head dims are zero-padded to DP (64, 128, 256) in shared memory.
#include <mma.h>

#include <cmath>

#include "attention/cuda/attention_common.cuh"

namespace l2p::cuda {
namespace {

using namespace nvcuda;
using attn::kLn2;
using attn::kLog2e;

template <int DP, int BN>
struct FwdTile {
  static constexpr int kRows = 64, kThreads = 128;
  static constexpr int kLdH = DP + 8;  // 16-bit tiles: +16 bytes per row against bank conflicts
  static constexpr int kLdS = BN + 4;
  static constexpr int kLdP = BN + 8;
  static constexpr int kLdO = DP + 4;
  static constexpr size_t kSmem = 2 * (size_t(kRows) * kLdH + 2 * size_t(BN) * kLdH +
                                       size_t(kRows) * kLdP) +
                                  4 * (size_t(kRows) * kLdS + size_t(kRows) * kLdO);
};

template <typename T>
struct FwdParams {
  const T *q, *k, *v;
  T* out;
  float* lse;
  attn::MaskView mask;
  int64_t q_heads, kv_heads, group, q_len, kv_len, head_offset;
  int head_dim, value_dim;
  float scale_log2;
  bool vec_qk, vec_v;  // 16-byte loads of Q and K rows / of V rows
};

template <typename T, int DP, int BN>
__global__ void __launch_bounds__(128) attention_fwd_tc_kernel(const FwdParams<T> p) {
  using Tile = FwdTile<DP, BN>;
  constexpr int BM = Tile::kRows, LDH = Tile::kLdH, LDS = Tile::kLdS, LDP = Tile::kLdP,
                LDO = Tile::kLdO;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + BM * LDH;
  T* sV = sK + BN * LDH;
  T* sP = sV + BN * LDH;
  float* sS = reinterpret_cast<float*>(sP + BM * LDP);
  float* sO = sS + BM * LDS;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bh = p.head_offset + blockIdx.y;
  const int64_t b = bh / p.q_heads, h = bh - b * p.q_heads;
  const int64_t kvh = b * p.kv_heads + h / p.group;
  const int64_t m0 = int64_t(blockIdx.x) * BM;
  const T* q = p.q + bh * p.q_len * p.head_dim;
  const T* k = p.k + kvh * p.kv_len * p.head_dim;
  const T* v = p.v + kvh * p.kv_len * p.value_dim;

  attn::load_tile<T, BM, DP, LDH, 128>(sQ, q, m0, p.q_len, p.head_dim, p.vec_qk);
  for (int idx = threadIdx.x; idx < BM * LDO; idx += 128) sO[idx] = 0.0f;
  __syncthreads();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> qf[DP / 16];
#pragma unroll
  for (int kk = 0; kk < DP / 16; ++kk) {
    wmma::load_matrix_sync(qf[kk], sQ + warp * 16 * LDH + kk * 16, LDH);
  }

  // Lanes 2r and 2r+1 of a warp share its row r: each takes half the columns of S and O.
  const int r = warp * 16 + lane / 2;
  const int half = lane & 1;
  const int64_t qi = m0 + r;
  const float* mask_row = qi < p.q_len ? p.mask.row(b, h, qi) : nullptr;
  float m_i = -INFINITY, l_i = 0.0f;  // running max (log2 units) and sum of exponentials
  float* s_row = sS + r * LDS;
  T* p_row = sP + r * LDP;
  float* o_row = sO + r * LDO;

  for (int64_t n0 = 0; n0 < p.kv_len; n0 += BN) {
    __syncthreads();  // every warp is done with the previous K, V
    attn::load_tile<T, BN, DP, LDH, 128>(sK, k, n0, p.kv_len, p.head_dim, p.vec_qk);
    attn::load_tile<T, BN, DP, LDH, 128>(sV, v, n0, p.kv_len, p.value_dim, p.vec_v);
    __syncthreads();

    // S = Q K^T for this warp's 16 rows.
#pragma unroll
    for (int j = 0; j < BN / 16; ++j) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.0f);
#pragma unroll
      for (int kk = 0; kk < DP / 16; ++kk) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> kf;
        wmma::load_matrix_sync(kf, sK + j * 16 * LDH + kk * 16, LDH);
        wmma::mma_sync(acc, qf[kk], kf, acc);
      }
      wmma::store_matrix_sync(sS + warp * 16 * LDS + j * 16, acc, LDS, wmma::mem_row_major);
    }
    __syncwarp();

    // Online softmax of row r over this key tile.
    constexpr int kHalf = BN / 2;
    float tile_max = -INFINITY;
    for (int c = half * kHalf; c < (half + 1) * kHalf; ++c) {
      const int64_t j = n0 + c;
      float s = -INFINITY;
      if (j < p.kv_len) {
        s = s_row[c] * p.scale_log2;
        if (mask_row != nullptr) s += attn::scaled_mask(mask_row[j * p.mask.s3]);
      }
      s_row[c] = s;
      tile_max = fmaxf(tile_max, s);
    }
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    const float m_new = fmaxf(m_i, tile_max);
    // A row with nothing to attend to so far keeps m = -inf; exponentiate against 0 so that
    // every term is exp2(-inf) = 0 instead of NaN.
    const float m_use = m_new == -INFINITY ? 0.0f : m_new;
    const float alpha = exp2f(m_i - m_use);
    float tile_sum = 0.0f;
    for (int c = half * kHalf; c < (half + 1) * kHalf; ++c) {
      const float e = exp2f(s_row[c] - m_use);
      tile_sum += e;
      p_row[c] = attn::from_float<T>(e);
    }
    tile_sum += __shfl_xor_sync(0xffffffffu, tile_sum, 1);
    l_i = l_i * alpha + tile_sum;
    m_i = m_new;
    for (int d = half * (DP / 2); d < (half + 1) * (DP / 2); ++d) o_row[d] *= alpha;
    __syncwarp();

    // O += P V for this warp's 16 rows.
#pragma unroll
    for (int dj = 0; dj < DP / 16; ++dj) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::load_matrix_sync(acc, sO + warp * 16 * LDO + dj * 16, LDO, wmma::mem_row_major);
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> pf;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> vf;
        wmma::load_matrix_sync(pf, sP + warp * 16 * LDP + kk * 16, LDP);
        wmma::load_matrix_sync(vf, sV + kk * 16 * LDH + dj * 16, LDH);
        wmma::mma_sync(acc, pf, vf, acc);
      }
      wmma::store_matrix_sync(sO + warp * 16 * LDO + dj * 16, acc, LDO, wmma::mem_row_major);
    }
    __syncwarp();
  }

  if (qi < p.q_len) {
    const float inv = l_i > 0.0f ? 1.0f / l_i : 0.0f;
    T* out_row = p.out + (bh * p.q_len + qi) * p.value_dim;
    for (int d = half; d < p.value_dim; d += 2) out_row[d] = attn::from_float<T>(o_row[d] * inv);
    if (half == 0) {
      p.lse[bh * p.q_len + qi] = l_i > 0.0f ? (m_i + log2f(l_i)) * kLn2 : -INFINITY;
    }
  }
}

// Key tile width: 64, or 32 at DP = 256 so that the shared memory (148 KB) fits sm_80 too.
template <int DP>
constexpr int fwd_key_tile() {
  return DP == 256 ? 32 : 64;
}

size_t fwd_smem_bytes(int dp) {
  switch (dp) {
    case 64: return FwdTile<64, fwd_key_tile<64>()>::kSmem;
    case 128: return FwdTile<128, fwd_key_tile<128>()>::kSmem;
    case 256: return FwdTile<256, fwd_key_tile<256>()>::kSmem;
    default: return 0;
  }
}

template <typename T, int DP>
cudaError_t launch_fwd(const AttentionForwardArgs& args, cudaStream_t stream) {
  constexpr int BN = fwd_key_tile<DP>();
  using Tile = FwdTile<DP, BN>;
  const AttentionShape& s = args.shape;
  FwdParams<T> p;
  attn::set_forward(p, args);
  p.mask = attn::MaskView::of(s);
  p.vec_qk = s.head_dim % 8 == 0 && attn::aligned16({args.q, args.k});
  p.vec_v = s.value_dim % 8 == 0 && attn::aligned16(args.v);
  return attn::launch_over_heads(attention_fwd_tc_kernel<T, DP, BN>, p,
                                 (s.q_len + Tile::kRows - 1) / Tile::kRows, s.batch * s.q_heads,
                                 Tile::kThreads, Tile::kSmem, stream);
}

template <typename T>
cudaError_t launch_fwd_for_dtype(const AttentionForwardArgs& args, cudaStream_t stream) {
  switch (attn::padded_head_dim(args.shape.head_dim, args.shape.value_dim)) {
    case 64: return launch_fwd<T, 64>(args, stream);
    case 128: return launch_fwd<T, 128>(args, stream);
    case 256: return launch_fwd<T, 256>(args, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

bool attention_forward_tc_supported(const AttentionShape& shape) {
  if (shape.dtype != AttentionDType::kBFloat16 && shape.dtype != AttentionDType::kFloat16) {
    return false;
  }
  const int dp = attn::padded_head_dim(shape.head_dim, shape.value_dim);
  if (dp == 0) return false;
  const int64_t q_tiles = (shape.q_len + 63) / 64;
  return q_tiles < (int64_t{1} << 31) &&
         fwd_smem_bytes(dp) <= static_cast<size_t>(attn::max_shared_per_block());
}

cudaError_t attention_forward_tc(const AttentionForwardArgs& args, cudaStream_t stream) {
  return attn::dispatch_16bit(args.shape.dtype, [&](auto type) {
    return launch_fwd_for_dtype<typename decltype(type)::type>(args, stream);
  });
}

}  // namespace l2p::cuda
