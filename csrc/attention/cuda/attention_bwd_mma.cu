// Attention backward on tensor cores with mma.sync, flash-attention-2 style: a block of 4
// warps owns 64 keys of one (batch, key/value head), each warp 16 of them, and walks every
// query tile of every query head of the group. Per tile a warp computes, in registers,
// S^T = K Q^T and dP^T = V dO^T for its keys, P^T = exp(S^T - lse) (from the forward's
// logsumexp) and dS^T = P^T (dP^T - delta), delta = rowsum(dO * O) precomputed; then
// dV += P^T dO and dK += dS^T Q into register accumulators (written once at the end, so GQA
// needs no atomics). dS^T goes through shared memory so that the block can form
// dQ = dS K, which is added into the fp32 dQ buffer with atomics (each warp a quarter of the
// head dim). Needs head dims that are multiples of 8 and 16-byte aligned tensors; head dims are
// zero-padded to DP = 64 or 128. Fragment layouts: mma_sm80.cuh.
#include <cmath>
#include <cstdint>

#include "attention/cuda/attention_common.cuh"
#include "attention/cuda/mma_sm80.cuh"

namespace l2p::cuda {
namespace {

using attn::kLog2e;
using namespace attn::mma;

constexpr int kKeys = 64, kThreads = 128;

// Query rows per tile: 32 at DP = 128 keeps the register accumulators (dK and dV: 128 floats
// per thread) clear of spills.
template <int DP>
constexpr int query_tile() {
  return DP == 128 ? 32 : 64;
}

template <int DP, int BM>
struct BwdMmaTile {
  static constexpr int kLd = DP + 8;
  static constexpr int kLdS = BM + 8;
  // K, V (kKeys rows), Q, dO (BM rows), dS^T (kKeys x BM) in 16 bits; lse and delta in fp32.
  static constexpr size_t kSmem =
      2 * (size_t(kLd) * (2 * kKeys + 2 * BM) + size_t(kKeys) * kLdS) + 4 * 2 * size_t(BM);
};

template <typename T>
struct BwdMmaParams {
  const T *grad_out, *q, *k, *v;
  const float* lse;
  const float* delta;
  float* grad_q_accum;
  T *grad_k, *grad_v;
  attn::MaskView mask;
  int64_t q_heads, kv_heads, group, q_len, kv_len, bkv_offset;
  int head_dim, value_dim;
  float scale, scale_log2;
};

template <typename T, int DP, int BM>
__global__ void __launch_bounds__(kThreads) attention_bwd_mma_kernel(const BwdMmaParams<T> p) {
  using Tile = BwdMmaTile<DP, BM>;
  constexpr int LD = Tile::kLd, LDS = Tile::kLdS;
  constexpr int kQueryTiles = BM / 8;  // n8 tiles of S^T (queries) per warp
  constexpr int kDimTiles = DP / 8;    // n8 tiles of dK, dV per warp
  constexpr int kDepth = DP / 16;      // k16 steps over the head dim
  constexpr int kQDims = DP / 4;       // dQ columns per warp
  extern __shared__ __align__(128) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + kKeys * LD;
  T* sQ = sV + kKeys * LD;
  T* sdO = sQ + BM * LD;
  T* sdS = sdO + BM * LD;  // dS^T: rows are keys, columns queries
  float* sLse = reinterpret_cast<float*>(sdS + kKeys * LDS);
  float* sDelta = sLse + BM;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int64_t bkv = p.bkv_offset + blockIdx.y;
  const int64_t b = bkv / p.kv_heads, hk = bkv - b * p.kv_heads;
  const int64_t n0 = int64_t(blockIdx.x) * kKeys;
  const T* k = p.k + bkv * p.kv_len * p.head_dim;
  const T* v = p.v + bkv * p.kv_len * p.value_dim;
  load_tile_async<T, kKeys, DP, kThreads>(sK, k, n0, p.kv_len, p.head_dim);
  load_tile_async<T, kKeys, DP, kThreads>(sV, v, n0, p.kv_len, p.value_dim);
  cp_async_commit();

  const int kr0 = warp * 16;  // this warp's keys in the tile; this thread's: kr0 + g (+ 8)
  const int64_t key[2] = {n0 + kr0 + g, n0 + kr0 + g + 8};
  float dk[kDimTiles][4], dv[kDimTiles][4];
#pragma unroll
  for (int dj = 0; dj < kDimTiles; ++dj) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[dj][e] = dv[dj][e] = 0.0f;
  }
  // Row / column of this lane's address for ldmatrix.x4.trans of a 16x16 B operand (two n8
  // tiles) stored k-major: matrices (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), ...
  const int b_row = (lane % 8) + ((lane / 8) % 2) * 8, b_col = (lane / 16) * 8;
  // ... and of a 16x16 A operand stored transposed (rows are its k): matrices a0..a3.
  const int a_row = (lane % 8) + (lane / 16) * 8, a_col = ((lane / 8) % 2) * 8;

  for (int64_t gi = 0; gi < p.group; ++gi) {
    const int64_t h = hk * p.group + gi;
    const int64_t bh = b * p.q_heads + h;
    const T* q = p.q + bh * p.q_len * p.head_dim;
    const T* dO = p.grad_out + bh * p.q_len * p.value_dim;
    const float* lse = p.lse + bh * p.q_len;
    const float* delta = p.delta + bh * p.q_len;
    float* dq = p.grad_q_accum + bh * p.q_len * p.head_dim;
    const float* mask = p.mask.row(b, h, 0);  // mask[b, h, i, j] = mask[i * s2 + j * s3]
    for (int64_t m0 = 0; m0 < p.q_len; m0 += BM) {
      // Nothing reads sQ, sdO, sLse or sDelta after the middle barrier of the previous tile,
      // and sdS is rewritten only after the barrier below.
      load_tile_async<T, BM, DP, kThreads>(sQ, q, m0, p.q_len, p.head_dim);
      load_tile_async<T, BM, DP, kThreads>(sdO, dO, m0, p.q_len, p.value_dim);
      cp_async_commit();
      for (int i = threadIdx.x; i < BM; i += kThreads) {
        const int64_t qi = m0 + i;
        const float l = qi < p.q_len ? lse[qi] : -INFINITY;
        // A row that attends to nothing (lse = -inf) has P = 0: exponentiate against +inf.
        sLse[i] = l == -INFINITY ? INFINITY : l * kLog2e;
        sDelta[i] = qi < p.q_len ? delta[qi] : 0.0f;
      }
      cp_async_wait<0>();
      __syncthreads();

      // S^T = K_w Q^T and dP^T = V_w dO^T: 16 keys x BM queries.
      float st[kQueryTiles][4], dpt[kQueryTiles][4];
#pragma unroll
      for (int j = 0; j < kQueryTiles; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) st[j][e] = dpt[j][e] = 0.0f;
      }
      const T* kw = sK + (kr0 + g) * LD + 2 * t;
      const T* vw = sV + (kr0 + g) * LD + 2 * t;
#pragma unroll
      for (int kk = 0; kk < kDepth; ++kk) {
        const uint32_t ka[4] = {ld_shared32(kw + kk * 16), ld_shared32(kw + 8 * LD + kk * 16),
                                ld_shared32(kw + kk * 16 + 8),
                                ld_shared32(kw + 8 * LD + kk * 16 + 8)};
        const uint32_t va[4] = {ld_shared32(vw + kk * 16), ld_shared32(vw + 8 * LD + kk * 16),
                                ld_shared32(vw + kk * 16 + 8),
                                ld_shared32(vw + 8 * LD + kk * 16 + 8)};
#pragma unroll
        for (int j = 0; j < kQueryTiles; ++j) {
          const T* qr = sQ + (8 * j + g) * LD + kk * 16 + 2 * t;
          mma16816<T>(st[j], ka, ld_shared32(qr), ld_shared32(qr + 8));
          const T* dr = sdO + (8 * j + g) * LD + kk * 16 + 2 * t;
          mma16816<T>(dpt[j], va, ld_shared32(dr), ld_shared32(dr + 8));
        }
      }

      // P^T into st, dS^T into dpt. Element e of tile j: key kr0 + g + 8 (e / 2),
      // query 8 j + 2 t + (e % 2).
#pragma unroll
      for (int j = 0; j < kQueryTiles; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = 8 * j + 2 * t + (e & 1);
          const int64_t qi = m0 + i;
          const int64_t kj = key[e / 2];
          float prob = 0.0f;
          if (qi < p.q_len && kj < p.kv_len) {
            float s = st[j][e] * p.scale_log2;
            if (mask != nullptr) s += mask[qi * p.mask.s2 + kj * p.mask.s3] * kLog2e;
            prob = exp2f(s - sLse[i]);
          }
          st[j][e] = prob;
          dpt[j][e] = prob * (dpt[j][e] - sDelta[i]);
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
        const int row = kq * 16 + b_row;
#pragma unroll
        for (int dj = 0; dj < kDimTiles; dj += 2) {
          uint32_t ob[4], qb[4];
          ldmatrix_x4_trans(ob, sdO + row * LD + b_col + dj * 8);
          mma16816<T>(dv[dj], pa, ob[0], ob[1]);
          mma16816<T>(dv[dj + 1], pa, ob[2], ob[3]);
          ldmatrix_x4_trans(qb, sQ + row * LD + b_col + dj * 8);
          mma16816<T>(dk[dj], da, qb[0], qb[1]);
          mma16816<T>(dk[dj + 1], da, qb[2], qb[3]);
        }
      }

      // dS^T to shared memory for the dQ product.
#pragma unroll
      for (int j = 0; j < kQueryTiles; ++j) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          *reinterpret_cast<uint32_t*>(sdS + (kr0 + g + 8 * r) * LDS + 8 * j + 2 * t) =
              pack2<T>(dpt[j][2 * r], dpt[j][2 * r + 1]);
        }
      }
      __syncthreads();

      // dQ (BM x DP) = dS K over the block's 64 keys; this warp: columns
      // [warp * kQDims, (warp + 1) * kQDims). A = dS read transposed out of dS^T.
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
          ldmatrix_x4_trans(kb[nt / 2],
                            sK + (kk * 16 + b_row) * LD + b_col + warp * kQDims + nt * 8);
        }
#pragma unroll
        for (int mt = 0; mt < BM / 16; ++mt) {
          uint32_t a[4];
          ldmatrix_x4_trans(a, sdS + (kk * 16 + a_row) * LDS + mt * 16 + a_col);
#pragma unroll
          for (int nt = 0; nt < kQDims / 8; nt += 2) {
            mma16816<T>(dqa[mt][nt], a, kb[nt / 2][0], kb[nt / 2][1]);
            mma16816<T>(dqa[mt][nt + 1], a, kb[nt / 2][2], kb[nt / 2][3]);
          }
        }
      }
#pragma unroll
      for (int mt = 0; mt < BM / 16; ++mt) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int64_t qi = m0 + mt * 16 + g + 8 * r;
          if (qi >= p.q_len) continue;
#pragma unroll
          for (int nt = 0; nt < kQDims / 8; ++nt) {
            const int d = warp * kQDims + nt * 8 + 2 * t;
            if (d < p.head_dim) {  // head_dim is a multiple of 8: d + 1 exists too
              atomicAdd(dq + qi * p.head_dim + d, dqa[mt][nt][2 * r] * p.scale);
              atomicAdd(dq + qi * p.head_dim + d + 1, dqa[mt][nt][2 * r + 1] * p.scale);
            }
          }
        }
      }
    }
  }

  T* grad_k = p.grad_k + bkv * p.kv_len * p.head_dim;
  T* grad_v = p.grad_v + bkv * p.kv_len * p.value_dim;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (key[r] >= p.kv_len) continue;
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

template <typename T, int DP>
cudaError_t launch(const AttentionBackwardArgs& args, cudaStream_t stream) {
  constexpr int BM = query_tile<DP>();
  using Tile = BwdMmaTile<DP, BM>;
  const AttentionShape& s = args.shape;
  auto kernel = attention_bwd_mma_kernel<T, DP, BM>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(Tile::kSmem));
  if (err != cudaSuccess) return err;
  BwdMmaParams<T> p;
  p.grad_out = static_cast<const T*>(args.grad_out);
  p.q = static_cast<const T*>(args.q);
  p.k = static_cast<const T*>(args.k);
  p.v = static_cast<const T*>(args.v);
  p.lse = args.lse;
  p.delta = static_cast<const float*>(args.delta);
  p.grad_q_accum = args.grad_q_accum;
  p.grad_k = static_cast<T*>(args.grad_k);
  p.grad_v = static_cast<T*>(args.grad_v);
  p.mask = attn::MaskView::of(s);
  p.q_heads = s.q_heads;
  p.kv_heads = s.kv_heads;
  p.group = s.q_heads / s.kv_heads;
  p.q_len = s.q_len;
  p.kv_len = s.kv_len;
  p.head_dim = static_cast<int>(s.head_dim);
  p.value_dim = static_cast<int>(s.value_dim);
  p.scale = static_cast<float>(s.scale);
  p.scale_log2 = static_cast<float>(s.scale) * kLog2e;
  const int64_t k_tiles = (s.kv_len + kKeys - 1) / kKeys;
  const int64_t heads = s.batch * s.kv_heads;
  for (int64_t first = 0; first < heads; first += 65535) {
    p.bkv_offset = first;
    const dim3 grid(static_cast<unsigned>(k_tiles),
                    static_cast<unsigned>(heads - first < 65535 ? heads - first : 65535));
    kernel<<<grid, kThreads, Tile::kSmem, stream>>>(p);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t launch_for_dim(const AttentionBackwardArgs& args, cudaStream_t stream) {
  switch (attn::padded_head_dim(args.shape.head_dim, args.shape.value_dim)) {
    case 64: return launch<T, 64>(args, stream);
    case 128: return launch<T, 128>(args, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

bool attention_backward_mma_supported(const AttentionBackwardArgs& args) {
  const AttentionShape& s = args.shape;
  if (s.dtype != AttentionDType::kBFloat16 && s.dtype != AttentionDType::kFloat16) return false;
  const int dp = attn::padded_head_dim(s.head_dim, s.value_dim);
  if (dp != 64 && dp != 128) return false;
  if (s.head_dim % 8 != 0 || s.value_dim % 8 != 0) return false;
  const void* tensors[] = {args.q, args.k, args.v, args.grad_out, args.grad_k, args.grad_v};
  for (const void* ptr : tensors) {
    if (!attn::aligned16(ptr)) return false;
  }
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      major < 8) {
    return false;
  }
  const size_t smem = dp == 64 ? BwdMmaTile<64, query_tile<64>()>::kSmem
                               : BwdMmaTile<128, query_tile<128>()>::kSmem;
  return smem <= static_cast<size_t>(attn::max_shared_per_block());
}

cudaError_t attention_backward_mma(const AttentionBackwardArgs& args, cudaStream_t stream) {
  if (args.shape.dtype == AttentionDType::kBFloat16) {
    return launch_for_dim<__nv_bfloat16>(args, stream);
  }
  if (args.shape.dtype == AttentionDType::kFloat16) return launch_for_dim<__half>(args, stream);
  return cudaErrorInvalidValue;
}

}  // namespace l2p::cuda
