// Attention forward on Hopper's warpgroup tensor cores (wgmma.mma_async, sm_90a): the same
// meaning and outputs as attention_fwd_mma.cu (out, and lse in natural-log units) for
// bfloat16 / float16, padded head dims DP = 64 or 128, no mask, grouped-query heads, ragged
// query and key lengths. attention_cuda.cpp tries it first on compute capability 9.0
// (L2P_ATTENTION_WGMMA=0 turns it off); tests/ops/test_cuda_ops.py checks it there.
//
// A block of two warpgroups (256 threads) owns 128 query rows of one (batch, head); each
// warpgroup owns 64 of them and runs the whole online softmax for its rows on its own, the
// two only share the K / V tiles. Per tile of kKeys = 128 keys:
//   S = Q K^T   wgmma m64n128k16, A = Q and B = K both from shared memory (K-major),
//               DP / 16 steps accumulating in 64 f32 registers per thread;
//   softmax     on S in registers, exactly as the mma.sync kernel (a row lives in the 4 lanes
//               of a quad), exp2 units with the scale folded into one FFMA;
//   O += P V    wgmma m64nDPk16 with A = P re-packed in registers (the accumulator layout of
//               S, packed to 16 bits, is the register-A layout) and B = V from shared memory
//               read N-major (imm-trans-b = 1), kKeys / 16 steps.
// The products of a warpgroup are software-pipelined by one tile: iteration j issues S_j and
// then O += P_j-1 V_j-1, waits for S_j only (wait_group 1), runs the softmax of S_j while
// P_j-1 V_j-1 is still on the tensor cores, and waits for that only to rescale O and to reuse
// P's registers. K tiles are double-buffered and V tiles triple-buffered (V_j-1 is still read
// while V_j waits and V_j+1 loads), with cp.async issued by all 256 threads once a tile's
// products are on their way; one block barrier per tile. No warp specialization: both
// warpgroups pass that barrier every tile, so one warpgroup's softmax overlaps the other's
// products only within a tile.
//
// Shared-memory layout, descriptors and register layouts: wgmma_sm90.cuh. Q and K are read
// K-major (the head dim is the reduced dim of S), V N-major (keys are the reduced dim of P V).
// bench/gpu/attention_wgmma_emulation.py models all of the above (smem bytes, swizzle,
// descriptors, register layouts, softmax, the order of copies, products, waits and barriers)
// in numpy against a float64 reference; keep it in step.
#include <cmath>
#include <cstdint>

#include "attention/cuda/attention_common.cuh"
#include "attention/cuda/mma_sm80.cuh"
#include "attention/cuda/wgmma_sm90.cuh"

namespace l2p::cuda {
namespace {

using attn::exp2_ftz;
using attn::kLn2;
using namespace attn::mma;
namespace wgmma = attn::wgmma;
using wgmma::kSwizzleAtom;
using wgmma::kSwizzleRow;

constexpr int kGroups = 2, kGroupRows = 64, kKeys = 128;
constexpr int kRows = kGroups * kGroupRows, kThreads = 128 * kGroups;

template <int DP>
struct WgmmaTile {
  static constexpr uint32_t kQBytes = kRows * DP * 2;
  static constexpr uint32_t kKVBytes = kKeys * DP * 2;
  // Q, K in two buffers, V in three, plus slack to round the base up to 1024 bytes
  // (DP 128: 193 KiB of the 227 KiB a block may have).
  static constexpr size_t kSmem = kQBytes + 5 * size_t(kKVBytes) + kSwizzleAtom;
};

template <typename T>
struct WgmmaParams {
  const T *q, *k, *v;
  T* out;
  float* lse;
  int64_t q_heads, kv_heads, group, q_len, kv_len, head_offset;
  int head_dim, value_dim;
  float scale_log2;
};

template <typename T, int DP>
__global__ void __launch_bounds__(kThreads, 1) attention_fwd_wgmma_kernel(const WgmmaParams<T> p) {
#ifdef L2P_WGMMA_DEVICE
  using Tile = WgmmaTile<DP>;
  constexpr int kScoreRegs = kKeys / 2;  // S accumulator: 64 x kKeys over 128 threads
  constexpr int kOutRegs = DP / 2;       // O accumulator: 64 x DP
  constexpr int kDepth = DP / 16;        // k16 steps of Q K^T
  constexpr int kSteps = kKeys / 16;     // k16 steps of P V
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw = smem_addr(smem_raw);
  unsigned char* smem = smem_raw + (((raw + kSwizzleAtom - 1) & ~(kSwizzleAtom - 1)) - raw);
  unsigned char* sQ = smem;
  unsigned char* sK = sQ + Tile::kQBytes;      // buffer i (0, 1) at sK + i * kKVBytes
  unsigned char* sV = sK + 2 * Tile::kKVBytes;  // buffer i (0, 1, 2) at sV + i * kKVBytes

  const int group = threadIdx.x / 128;  // warpgroup: query rows 64 * group .. + 63 of the block
  const int warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int64_t bh = p.head_offset + blockIdx.y;
  const int64_t b = bh / p.q_heads, h = bh - b * p.q_heads;
  const int64_t kvh = b * p.kv_heads + h / p.group;
  const int64_t m0 = int64_t(blockIdx.x) * kRows;
  const T* q = p.q + bh * p.q_len * p.head_dim;
  const T* k = p.k + kvh * p.kv_len * p.head_dim;
  const T* v = p.v + kvh * p.kv_len * p.value_dim;
  const int64_t tiles = (p.kv_len + kKeys - 1) / kKeys;

  // cp.async groups: {Q, K_0, V_0}, then one per iteration j: {K_j+1, V_j+1}.
  wgmma::load_tile_swizzled<T, kRows, DP, kThreads>(sQ, q, m0, p.q_len, p.head_dim);
  wgmma::load_tile_swizzled<T, kKeys, DP, kThreads>(sK, k, 0, p.kv_len, p.head_dim);
  wgmma::load_tile_swizzled<T, kKeys, DP, kThreads>(sV, v, 0, p.kv_len, p.value_dim);
  cp_async_commit();

  // Descriptors without their start address; K-major: leading byte offset 16 (unused),
  // stride 1024; N-major V: leading = the next 64-dim column block, stride 1024.
  const uint64_t kmajor = wgmma::smem_descriptor(0, 16, kSwizzleAtom);
  const uint64_t nmajor = wgmma::smem_descriptor(0, kKeys * kSwizzleRow, kSwizzleAtom);
  // Start addresses >> 4 (they go into bits 0-13): this warpgroup's 64 rows of Q.
  const uint32_t q_start = (smem_addr(sQ) + group * kGroupRows * kSwizzleRow) >> 4;
  const uint32_t k_start = smem_addr(sK) >> 4, v_start = smem_addr(sV) >> 4;
  constexpr uint32_t kQBlock = kRows * kSwizzleRow >> 4, kKVBlock = kKeys * kSwizzleRow >> 4;
  constexpr uint32_t kBuffer = Tile::kKVBytes >> 4;

  // This thread's rows (block-relative): row0 and row0 + 8.
  const int64_t row0 = m0 + group * kGroupRows + warp * 16 + g;
  float o[kOutRegs];
#pragma unroll
  for (int i = 0; i < kOutRegs; ++i) o[i] = 0.0f;
  float s[kScoreRegs];
#pragma unroll
  for (int i = 0; i < kScoreRegs; ++i) s[i] = 0.0f;
  uint32_t pa[kSteps][4];  // P of the previous tile as the A registers of its kSteps k16 steps
  const float ks = p.scale_log2;  // raw scores -> log2 units
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};  // row max (raw units), sum share

  // O += P V with P from pa and V from buffer v_buf: step kk reads keys 16kk..16kk+15, 2048
  // bytes further each. Its own fence: pa and o were last written by plain instructions.
  auto issue_pv = [&](int v_buf) {
    wgmma::fence();
#pragma unroll
    for (int kk = 0; kk < kSteps; ++kk) {
      const uint64_t vd = nmajor | (v_start + v_buf * kBuffer + kk * (16 * kSwizzleRow >> 4));
      wgmma::mma_rs_nmajor<T, DP>(o, pa[kk], vd);
    }
    wgmma::commit();
  };
  // S = Q K^T from K buffer buf over DP / 16 steps; step kk reads column block kk / 4 at byte
  // 32 (kk % 4).
  auto issue_s = [&](int buf) {
    wgmma::fence();
#pragma unroll
    for (int kk = 0; kk < kDepth; ++kk) {
      const uint32_t within = (kk % 4) * 2;  // 32 bytes, in 16-byte units
      const uint64_t qd = kmajor | (q_start + (kk / 4) * kQBlock + within);
      const uint64_t kd = kmajor | (k_start + buf * kBuffer + (kk / 4) * kKVBlock + within);
      wgmma::mma_ss<T, kKeys, 0, 0>(s, qd, kd, kk > 0);
    }
    wgmma::commit();
  };
  // Tile j's K and V into buffers buf and v_next (their own cp.async group).
  auto load_kv = [&](int64_t j, int buf, int v_next) {
    wgmma::load_tile_swizzled<T, kKeys, DP, kThreads>(sK + buf * Tile::kKVBytes, k, j * kKeys, p.kv_len, p.head_dim);
    wgmma::load_tile_swizzled<T, kKeys, DP, kThreads>(sV + v_next * Tile::kKVBytes, v, j * kKeys, p.kv_len,
                                     p.value_dim);
    cp_async_commit();
  };
  // The online softmax of tile j's scores s (finished): keys past the end (last tile of a
  // ragged sequence) drop out, then exp2(s k - m k) on raw scores (scale > 0, checked by the
  // launcher). Returns in alpha the factor that moves O and l to the new row maximum.
  auto softmax = [&](int64_t j, float (&alpha)[2]) {
    const int64_t n0 = j * kKeys;
    const int valid = p.kv_len - n0 < kKeys ? static_cast<int>(p.kv_len - n0) : kKeys;
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int i = 0; i < kScoreRegs; ++i) {
      const int col = 8 * (i / 4) + 2 * t + (i % 2);
      if (valid < kKeys && col >= valid) s[i] = -INFINITY;
      tile_max[(i / 2) % 2] = fmaxf(tile_max[(i / 2) % 2], s[i]);
    }
    float neg_m[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
      const float m_new = fmaxf(m[r], tile_max[r]);
      // Nothing to attend to so far: exponentiate against 0, so every term is exp2(-inf) = 0.
      const float m_use = m_new == -INFINITY ? 0.0f : m_new;
      alpha[r] = exp2_ftz((m[r] - m_use) * ks);
      neg_m[r] = -m_use * ks;
      m[r] = m_new;
      l[r] *= alpha[r];
    }
#pragma unroll
    for (int i = 0; i < kScoreRegs; ++i) {
      s[i] = exp2_ftz(fmaf(s[i], ks, neg_m[(i / 2) % 2]));
      l[(i / 2) % 2] += s[i];
    }
  };
  // P_j takes over pa (n8 tiles 2kk, keys 16kk + 2t.., and 2kk + 1, keys 16kk + 8 + 2t..;
  // rows g and g + 8).
  auto pack_p = [&]() { wgmma::pack_a<T, kSteps>(pa, s); };

  // Tile 0, peeled from the loop so that inside it every iteration issues both products and
  // the same waits: with `if (j > 0)` around O += P V and the wait count, ptxas cannot tell
  // that S_j is finished after wait_group 1 on every path and serializes every wgmma
  // (warning C7514). Tile 0 has no P V to overlap, and O is still zero (no rescale).
  float alpha[2];
  cp_async_wait<0>();
  wgmma::fence_proxy_async();
  __syncthreads();
  issue_s(0);
  if (tiles > 1) load_kv(1, 1, 1);
  wgmma::wait<0>();
  wgmma::pin(s);
  softmax(0, alpha);
  pack_p();

  // Iteration j: S_j = Q K_j^T and O += P_j-1 V_j-1 go to the tensor cores back to back; the
  // softmax of S_j runs while P_j-1 V_j-1 is still in flight, and only the rescale of O waits
  // for it. One barrier per tile: after it, K_j+1 overwrites K_j-1 (last read by S_j-1) and
  // V_j+1 overwrites V_j-2 (last read by P_j-2 V_j-2), both waited for in iteration j-1,
  // while P_j-1 V_j-1 may still read V_j-1 from the third buffer. The copies are issued after
  // the products, which need nothing from them.
  int v_buf = 1;  // j % 3
  for (int64_t j = 1; j < tiles; ++j) {
    const int buf = static_cast<int>(j & 1);
    const int v_prev = v_buf == 0 ? 2 : v_buf - 1, v_next = v_buf == 2 ? 0 : v_buf + 1;
    cp_async_wait<0>();  // K_j and V_j have landed
    wgmma::fence_proxy_async();
    __syncthreads();
    issue_s(buf);
    issue_pv(v_prev);
    if (j + 1 < tiles) load_kv(j + 1, buf ^ 1, v_next);
    wgmma::wait<1>();  // S_j done; P_j-1 V_j-1 may still run
    wgmma::pin(s);
    softmax(j, alpha);
    // P_j-1 V_j-1 done: O moves to this tile's maximum, and P_j takes over pa.
    wgmma::wait<0>();
    wgmma::pin(o);
#pragma unroll
    for (int kk = 0; kk < kSteps; ++kk) wgmma::pin(pa[kk]);
#pragma unroll
    for (int i = 0; i < kOutRegs; ++i) o[i] *= alpha[(i / 2) % 2];
    pack_p();
    v_buf = v_next;
  }
  // The last tile's O += P V (its V landed and was fenced before the last barrier).
  issue_pv(v_buf == 0 ? 2 : v_buf - 1);
  wgmma::wait<0>();
  wgmma::pin(o);

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float sum = l[r];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const int64_t i = row0 + 8 * r;
    if (i >= p.q_len) continue;
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    T* out_row = p.out + (bh * p.q_len + i) * p.value_dim;
#pragma unroll
    for (int j = 0; j < kOutRegs / 4; ++j) {
      const int col = 8 * j + 2 * t;
      if (col < p.value_dim) {  // value_dim is a multiple of 8: both columns exist
        *reinterpret_cast<uint32_t*>(out_row + col) =
            pack2<T>(o[4 * j + 2 * r] * inv, o[4 * j + 2 * r + 1] * inv);
      }
    }
    if (t == 0) {
      p.lse[bh * p.q_len + i] = sum > 0.0f ? (m[r] * ks + log2f(sum)) * kLn2 : -INFINITY;
    }
  }
#endif  // L2P_WGMMA_DEVICE
}

template <typename T, int DP>
cudaError_t launch(const AttentionForwardArgs& args, cudaStream_t stream) {
  const AttentionShape& s = args.shape;
  WgmmaParams<T> p;
  attn::set_forward(p, args);
  return attn::launch_over_heads(attention_fwd_wgmma_kernel<T, DP>, p,
                                 (s.q_len + kRows - 1) / kRows, s.batch * s.q_heads, kThreads,
                                 WgmmaTile<DP>::kSmem, stream);
}

}  // namespace

bool attention_forward_wgmma_supported(const AttentionForwardArgs& args) {
  const AttentionShape& s = args.shape;
  const int dp = attn::register_tile_head_dim(s);
  if (dp == 0) return false;
  if (s.mask != nullptr) return false;  // masked attention stays on the mma.sync kernel
  if (!(s.scale > 0.0)) return false;  // the row maximum is taken before scaling
  if (!attn::aligned16({args.q, args.k, args.v, args.out})) return false;
  const size_t smem = dp == 64 ? WgmmaTile<64>::kSmem : WgmmaTile<128>::kSmem;
  return (s.q_len + kRows - 1) / kRows < (int64_t{1} << 31) && wgmma::device_runs_wgmma(smem);
}

cudaError_t attention_forward_wgmma(const AttentionForwardArgs& args, cudaStream_t stream) {
  return attn::dispatch_16bit(args.shape.dtype, [&](auto type) {
    return attn::dispatch_64_128(attn::register_tile_head_dim(args.shape), [&](auto dp) {
      return launch<typename decltype(type)::type, decltype(dp)::value>(args, stream);
    });
  });
}

}  // namespace l2p::cuda
