// Attention backward on tensor cores (bfloat16 / float16), flash-attention-2 style: a block
// of 8 warps owns BN keys of one (batch, key/value head) and walks every query tile of every
// query head of its group. Per tile it recomputes P = exp(S - lse) from the forward's
// logsumexp, forms dS = P * (dP - delta) with delta = rowsum(dO * O) (precomputed), adds
// P^T dO into dV and dS^T Q into dK (fp32, shared memory, written once at the end, so GQA
// needs no atomics), and adds dS K into the fp32 dQ buffer with atomics. Head dims are
// zero-padded to DP in shared memory.
#include <mma.h>

#include <cmath>
#include <type_traits>

#include "attention/cuda/attention_common.cuh"

namespace l2p::cuda {
namespace {

using namespace nvcuda;
using attn::kLog2e;

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;

template <int DP, int BM, int BN>
struct BwdTile {
  static constexpr int kLdH = DP + 8;
  static constexpr int kLdS = BN + 4;
  static constexpr int kLdP = BN + 8;
  static constexpr int kLdO = DP + 4;
  // K, V, Q, dO, P, dS in 16 bits; S, dP, dK, dV, lse, delta in fp32.
  static constexpr size_t kSmem =
      2 * (2 * size_t(BN) * kLdH + 2 * size_t(BM) * kLdH + 2 * size_t(BM) * kLdP) +
      4 * (2 * size_t(BM) * kLdS + 2 * size_t(BN) * kLdO + 2 * size_t(BM));
};

template <typename T>
struct BwdParams {
  const T *grad_out, *q, *k, *v;
  const float* lse;
  const float* delta;
  float* grad_q_accum;
  T *grad_k, *grad_v;
  attn::MaskView mask;
  int64_t q_heads, kv_heads, group, q_len, kv_len, head_offset;
  int head_dim, value_dim;
  float scale, scale_log2;
  bool vec_qk, vec_v;  // 16-byte loads of Q and K rows / of V and dO rows
};

// C (M x N, fp32, shared) = or += A (M x K) B (K x N), 16-bit operands in shared memory;
// output tiles are dealt round-robin to the block's warps. A col_major operand is the
// transpose of a row-major tile: element (r, c) at A[c * lda + r].
template <typename T, int M, int N, int K, typename LayoutA, typename LayoutB, bool kAccumulate>
__device__ __forceinline__ void block_gemm(const T* A, int lda, const T* B, int ldb, float* C,
                                           int ldc, int warp) {
  constexpr int kTilesN = N / 16;
  constexpr int kTiles = (M / 16) * kTilesN;
  for (int f = warp; f < kTiles; f += kWarps) {
    const int i = f / kTilesN, j = f - (f / kTilesN) * kTilesN;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    if constexpr (kAccumulate) {
      wmma::load_matrix_sync(acc, C + i * 16 * ldc + j * 16, ldc, wmma::mem_row_major);
    } else {
      wmma::fill_fragment(acc, 0.0f);
    }
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LayoutA> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LayoutB> b;
      if constexpr (std::is_same_v<LayoutA, wmma::row_major>) {
        wmma::load_matrix_sync(a, A + i * 16 * lda + kk * 16, lda);
      } else {
        wmma::load_matrix_sync(a, A + kk * 16 * lda + i * 16, lda);
      }
      if constexpr (std::is_same_v<LayoutB, wmma::row_major>) {
        wmma::load_matrix_sync(b, B + kk * 16 * ldb + j * 16, ldb);
      } else {
        wmma::load_matrix_sync(b, B + j * 16 * ldb + kk * 16, ldb);
      }
      wmma::mma_sync(acc, a, b, acc);
    }
    wmma::store_matrix_sync(C + i * 16 * ldc + j * 16, acc, ldc, wmma::mem_row_major);
  }
}

template <typename T, int DP, int BM, int BN>
__global__ void __launch_bounds__(kThreads) attention_bwd_tc_kernel(const BwdParams<T> p) {
  using Tile = BwdTile<DP, BM, BN>;
  constexpr int LDH = Tile::kLdH, LDS = Tile::kLdS, LDP = Tile::kLdP, LDO = Tile::kLdO;
  using wmma::col_major;
  using wmma::row_major;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + BN * LDH;
  T* sQ = sV + BN * LDH;
  T* sdO = sQ + BM * LDH;  // must follow sQ: together they hold the fp32 dQ tile
  T* sP = sdO + BM * LDH;
  T* sdS = sP + BM * LDP;
  float* sS = reinterpret_cast<float*>(sdS + BM * LDP);
  float* sdP = sS + BM * LDS;
  float* sdK = sdP + BM * LDS;
  float* sdV = sdK + BN * LDO;
  float* sLse = sdV + BN * LDO;
  float* sDelta = sLse + BM;
  // dQ tile (BM x DP fp32, leading dimension LDH) over sQ and sdO once they are consumed.
  float* sdQ = reinterpret_cast<float*>(sQ);

  const int warp = threadIdx.x / 32;
  const int64_t bkv = p.head_offset + blockIdx.y;
  const int64_t b = bkv / p.kv_heads, hk = bkv - b * p.kv_heads;
  const int64_t n0 = int64_t(blockIdx.x) * BN;
  const T* k = p.k + bkv * p.kv_len * p.head_dim;
  const T* v = p.v + bkv * p.kv_len * p.value_dim;

  attn::load_tile<T, BN, DP, LDH, kThreads>(sK, k, n0, p.kv_len, p.head_dim, p.vec_qk);
  attn::load_tile<T, BN, DP, LDH, kThreads>(sV, v, n0, p.kv_len, p.value_dim, p.vec_v);
  for (int idx = threadIdx.x; idx < BN * LDO; idx += kThreads) {
    sdK[idx] = 0.0f;
    sdV[idx] = 0.0f;
  }

  for (int64_t g = 0; g < p.group; ++g) {
    const int64_t h = hk * p.group + g;
    const int64_t bh = b * p.q_heads + h;
    const T* q = p.q + bh * p.q_len * p.head_dim;
    const T* dO = p.grad_out + bh * p.q_len * p.value_dim;
    const float* lse = p.lse + bh * p.q_len;
    const float* delta = p.delta + bh * p.q_len;
    float* dq = p.grad_q_accum + bh * p.q_len * p.head_dim;
    for (int64_t m0 = 0; m0 < p.q_len; m0 += BM) {
      __syncthreads();  // the previous tile's dQ has been read out of sQ / sdO
      attn::load_tile<T, BM, DP, LDH, kThreads>(sQ, q, m0, p.q_len, p.head_dim, p.vec_qk);
      attn::load_tile<T, BM, DP, LDH, kThreads>(sdO, dO, m0, p.q_len, p.value_dim, p.vec_v);
      for (int i = threadIdx.x; i < BM; i += kThreads) {
        const int64_t qi = m0 + i;
        const float l = qi < p.q_len ? lse[qi] : -INFINITY;
        // A row that attends to nothing (lse = -inf) has P = 0: exponentiate against +inf.
        sLse[i] = l == -INFINITY ? INFINITY : attn::lse_log2(l);
        sDelta[i] = qi < p.q_len ? delta[qi] : 0.0f;
      }
      __syncthreads();

      block_gemm<T, BM, BN, DP, row_major, col_major, false>(sQ, LDH, sK, LDH, sS, LDS, warp);
      block_gemm<T, BM, BN, DP, row_major, col_major, false>(sdO, LDH, sV, LDH, sdP, LDS, warp);
      __syncthreads();

      for (int e = threadIdx.x; e < BM * BN; e += kThreads) {
        const int i = e / BN, c = e - (e / BN) * BN;
        const int64_t qi = m0 + i, j = n0 + c;
        float prob = 0.0f, ds = 0.0f;
        if (qi < p.q_len && j < p.kv_len) {
          float s = sS[i * LDS + c] * p.scale_log2;
          const float* mask_row = p.mask.row(b, h, qi);
          if (mask_row != nullptr) s += attn::scaled_mask(mask_row[j * p.mask.s3]);
          prob = exp2f(s - sLse[i]);
          ds = prob * (sdP[i * LDS + c] - sDelta[i]);
        }
        sP[i * LDP + c] = attn::from_float<T>(prob);
        sdS[i * LDP + c] = attn::from_float<T>(ds);
      }
      __syncthreads();

      // dV += P^T dO, dK += dS^T Q (dK's scale is applied once at the end).
      block_gemm<T, BN, DP, BM, col_major, row_major, true>(sP, LDP, sdO, LDH, sdV, LDO, warp);
      block_gemm<T, BN, DP, BM, col_major, row_major, true>(sdS, LDP, sQ, LDH, sdK, LDO, warp);
      __syncthreads();

      // dQ tile = dS K, then added into the fp32 dQ buffer.
      block_gemm<T, BM, DP, BN, row_major, row_major, false>(sdS, LDP, sK, LDH, sdQ, LDH, warp);
      __syncthreads();
      for (int e = threadIdx.x; e < BM * p.head_dim; e += kThreads) {
        const int i = e / p.head_dim, d = e - (e / p.head_dim) * p.head_dim;
        const int64_t qi = m0 + i;
        if (qi < p.q_len) atomicAdd(dq + qi * p.head_dim + d, sdQ[i * LDH + d] * p.scale);
      }
    }
  }
  __syncthreads();

  T* dk = p.grad_k + bkv * p.kv_len * p.head_dim;
  T* dv = p.grad_v + bkv * p.kv_len * p.value_dim;
  for (int e = threadIdx.x; e < BN * p.head_dim; e += kThreads) {
    const int r = e / p.head_dim, d = e - (e / p.head_dim) * p.head_dim;
    if (n0 + r < p.kv_len) {
      dk[(n0 + r) * p.head_dim + d] = attn::from_float<T>(sdK[r * LDO + d] * p.scale);
    }
  }
  for (int e = threadIdx.x; e < BN * p.value_dim; e += kThreads) {
    const int r = e / p.value_dim, d = e - (e / p.value_dim) * p.value_dim;
    if (n0 + r < p.kv_len) dv[(n0 + r) * p.value_dim + d] = attn::from_float<T>(sdV[r * LDO + d]);
  }
}

// Tile shapes per padded head dim. DP = 128 takes 64 x 64 tiles (190 KB of shared memory)
// where the device allows it (sm_90) and 32 x 64 (146 KB) otherwise (sm_80).
template <typename T, int DP, int BM, int BN>
cudaError_t launch_bwd(const AttentionBackwardArgs& args, cudaStream_t stream) {
  using Tile = BwdTile<DP, BM, BN>;
  const AttentionShape& s = args.shape;
  BwdParams<T> p;
  attn::set_backward(p, args);
  p.mask = attn::MaskView::of(s);
  p.vec_qk = s.head_dim % 8 == 0 && attn::aligned16({args.q, args.k});
  p.vec_v = s.value_dim % 8 == 0 && attn::aligned16({args.v, args.grad_out});
  return attn::launch_over_heads(attention_bwd_tc_kernel<T, DP, BM, BN>, p,
                                 (s.kv_len + BN - 1) / BN, s.batch * s.kv_heads, kThreads,
                                 Tile::kSmem, stream);
}

using Big128 = BwdTile<128, 64, 64>;
using Small128 = BwdTile<128, 32, 64>;
using Tile64 = BwdTile<64, 64, 64>;
using Tile256 = BwdTile<256, 32, 32>;

template <typename T>
cudaError_t launch_bwd_for_dtype(const AttentionBackwardArgs& args, cudaStream_t stream) {
  switch (attn::padded_head_dim(args.shape.head_dim, args.shape.value_dim)) {
    case 64: return launch_bwd<T, 64, 64, 64>(args, stream);
    case 128:
      if (Big128::kSmem <= static_cast<size_t>(attn::max_shared_per_block())) {
        return launch_bwd<T, 128, 64, 64>(args, stream);
      }
      return launch_bwd<T, 128, 32, 64>(args, stream);
    case 256: return launch_bwd<T, 256, 32, 32>(args, stream);
    default: return cudaErrorInvalidValue;
  }
}

size_t bwd_min_smem_bytes(int dp) {
  switch (dp) {
    case 64: return Tile64::kSmem;
    case 128: return Small128::kSmem;
    case 256: return Tile256::kSmem;
    default: return 0;
  }
}

}  // namespace

bool attention_backward_tc_supported(const AttentionShape& shape) {
  if (shape.dtype != AttentionDType::kBFloat16 && shape.dtype != AttentionDType::kFloat16) {
    return false;
  }
  const int dp = attn::padded_head_dim(shape.head_dim, shape.value_dim);
  return dp != 0 && bwd_min_smem_bytes(dp) <= static_cast<size_t>(attn::max_shared_per_block());
}

cudaError_t attention_backward_tc(const AttentionBackwardArgs& args, cudaStream_t stream) {
  return attn::dispatch_16bit(args.shape.dtype, [&](auto type) {
    return launch_bwd_for_dtype<typename decltype(type)::type>(args, stream);
  });
}

}  // namespace l2p::cuda
