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
// Shared-memory layout (the same for Q, K and V): a (ROWS x DP) 16-bit tile is stored as DP / 64
// column blocks, each (ROWS x 64) with 128-byte rows, in the 128-byte swizzle: the 16-byte
// chunk c (columns 8c..8c+7 of the block) of row r sits at chunk position c ^ (r % 8) of the
// row. Column block b starts at b * ROWS * 128 bytes; every block starts on a 1024-byte
// boundary (the swizzle is applied by the hardware to address bits [4:6] ^= [7:9] of the
// absolute shared address, so the pattern repeats every 8 rows = 1024 bytes and the tiles
// must be 1024-aligned for the descriptors' base offset 0).
//
// Matrix descriptors (PTX ISA, "Matrix Descriptor Format"; 64 bits):
//   bits  0-13  start address >> 4        bits 16-29  leading-dimension byte offset >> 4
//   bits 32-45  stride-dimension byte offset >> 4
//   bits 49-51  base offset (0: the swizzle pattern starts 1024-aligned)
//   bits 62-63  swizzle mode (1 = 128-byte swizzle)
// K-major (A = Q, B = K: the reduced dim k = head dim is contiguous): a k16 step reads 32 bytes
// of each row, inside one 128-byte swizzled row; its start address is the column block plus
// 32 * (step % 4) bytes (the hardware swizzles the absolute address, so moving the start by 32
// bytes inside the atom reads logical chunks 2j, 2j+1). Stride byte offset = 1024 (from rows
// 0-7 to rows 8-15); leading byte offset unused for swizzled K-major (set to 1, i.e. 16 bytes).
// N-major (B = V, k = key, n = value dim, n contiguous): rows of the stored tile are k, the
// 128-byte swizzle atom covers 8 keys x 64 dims. Leading byte offset = distance between the
// 64-dim column blocks (kKeys * 128 bytes); stride byte offset = 1024 (from keys 0-7 to keys
// 8-15); a k16 step starts at key 16 * step, i.e. 2048 bytes further.
//
// Register layouts (PTX ISA, wgmma .m64nNk16; warp w = warp index within the warpgroup,
// g = lane / 4, t = lane % 4):
//   accumulator D (f32, N / 2 registers): d[4j + e] = D(16w + g + 8 (e / 2), 8j + 2t + (e % 2))
//   A in registers (f16/bf16, 4 registers of 2 halves, the mma.m16n8k16 A layout per warp):
//     a[0] = A(16w + g, 2t..2t+1)  a[1] = A(16w + g + 8, 2t..)  a[2] = A(16w + g, 2t+8..)
//     a[3] = A(16w + g + 8, 2t+8..)   (low half = lower column)
// so the S registers of n8 tiles 2s and 2s + 1 packed pairwise are the A registers of k16 step s.
// bench/gpu/attention_wgmma_emulation.py models all of the above (smem bytes, swizzle,
// descriptors, register layouts, softmax, the order of copies, products, waits and barriers)
// in numpy against a float64 reference; keep it in step.
#include <cmath>
#include <cstdint>

#include "attention/cuda/attention_common.cuh"
#include "attention/cuda/mma_sm80.cuh"

// The wgmma body exists only in the sm_90a pass (wgmma needs the "a" target); the sm_80 pass
// keeps an empty kernel that the launcher never starts (attention_forward_wgmma_supported
// requires compute capability 9.0).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define L2P_WGMMA_DEVICE 1
#endif

namespace l2p::cuda {
namespace {

using attn::exp2_ftz;
using attn::kLn2;
using attn::kLog2e;
using namespace attn::mma;

constexpr int kGroups = 2, kGroupRows = 64, kKeys = 128;
constexpr int kRows = kGroups * kGroupRows, kThreads = 128 * kGroups;
constexpr uint32_t kSwizzleRow = 128, kSwizzleAtom = 8 * kSwizzleRow;  // bytes

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
  int64_t q_heads, kv_heads, group, q_len, kv_len, bh_offset;
  int head_dim, value_dim;
  float scale_log2;
};

// Rows [row0, row0 + ROWS) x columns [0, DP) of a row-major (rows_valid, cols) matrix into the
// swizzled layout above at dst (1024-aligned); zeros outside the source. cols is a multiple of
// 8 and src 16-byte aligned. Consecutive threads copy consecutive chunks of a row.
template <typename T, int ROWS, int DP>
__device__ __forceinline__ void load_tile_swizzled(unsigned char* dst, const T* src, int64_t row0,
                                                   int64_t rows_valid, int cols) {
  constexpr int kChunks = DP / 8;
  static_assert(ROWS * kChunks % kThreads == 0, "every thread copies the same number of chunks");
  // A trip count the same for every thread (not idx < ROWS * kChunks from threadIdx.x): these
  // copies are issued while wgmmas are in flight, and a loop ptxas cannot prove warpgroup-
  // uniform makes it serialize them (warning C7520). Fully unrolled: on an H200 the kernel ran
  // at 344-358 / 395-399 TFLOP/s (N = 4096 / 16384) this way and at 262-281 / 306-309 with the
  // loop kept rolled (`unroll 1`), although unrolling costs 16 bytes of spill at DP = 128.
#pragma unroll
  for (int it = 0; it < ROWS * kChunks / kThreads; ++it) {
    const int idx = it * kThreads + static_cast<int>(threadIdx.x);
    const int r = idx / kChunks;
    const int c = idx - r * kChunks;
    const bool valid = row0 + r < rows_valid && 8 * c < cols;
    const T* from = valid ? src + (row0 + r) * cols + 8 * c : src;
    const uint32_t offset = (c / 8) * (ROWS * kSwizzleRow) + r * kSwizzleRow +
                            (((c % 8) ^ (r % 8)) * 16);
    cp_async16(dst + offset, from, valid ? 16 : 0);
  }
}

#ifdef L2P_WGMMA_DEVICE

// A 128-byte-swizzle matrix descriptor (layout in the header comment).
__device__ __forceinline__ uint64_t smem_descriptor(uint32_t address, uint32_t leading_bytes,
                                                    uint32_t stride_bytes) {
  return uint64_t((address & 0x3FFFF) >> 4) | (uint64_t(leading_bytes >> 4) << 16) |
         (uint64_t(stride_bytes >> 4) << 32) | (uint64_t(1) << 62);
}

// Keeps the compiler from moving reads or writes of an accumulator across the wgmma fence /
// wait instructions (the asm statements below are ordered among themselves, plain arithmetic
// on their registers is not).
template <int N>
__device__ __forceinline__ void pin(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
template <int N>
__device__ __forceinline__ void pin(uint32_t (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(d[i])::"memory");
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Makes this thread's generic-proxy shared-memory writes (cp.async) visible to the async proxy
// (wgmma operand reads); precedes the barrier after the copies land.
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

#define L2P_ACC8(d, i)                                                                      \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
      "+f"(d[i + 6]), "+f"(d[i + 7])
#define L2P_ACC32(d) L2P_ACC8(d, 0), L2P_ACC8(d, 8), L2P_ACC8(d, 16), L2P_ACC8(d, 24)
#define L2P_ACC64(d) L2P_ACC32(d), L2P_ACC8(d, 32), L2P_ACC8(d, 40), L2P_ACC8(d, 48), L2P_ACC8(d, 56)
#define L2P_REGS32                                                                          \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define L2P_REGS64                                                                          \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "  \
  "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "  \
  "%56, %57, %58, %59, %60, %61, %62, %63}"

template <typename T>
struct WgmmaType;
template <>
struct WgmmaType<__nv_bfloat16> {
  static constexpr bool kBf16 = true;
};
template <>
struct WgmmaType<__half> {
  static constexpr bool kBf16 = false;
};

// S (64 x 128, f32) = A (64 x 16, smem, K-major) B (16 x 128, smem, K-major) + (accumulate ? S : 0).
template <typename T>
__device__ __forceinline__ void wgmma_ss_n128(float (&d)[64], uint64_t a, uint64_t b,
                                              int accumulate) {
#define L2P_WGMMA_SS(TYPE)                                                                     \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                    \
               "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " " L2P_REGS64    \
               ", %64, %65, p, 1, 1, 0, 0;\n}\n"                                              \
               : L2P_ACC64(d)                                                                  \
               : "l"(a), "l"(b), "r"(accumulate))
  if constexpr (WgmmaType<T>::kBf16) {
    L2P_WGMMA_SS("bf16");
  } else {
    L2P_WGMMA_SS("f16");
  }
#undef L2P_WGMMA_SS
}

// O (64 x DP, f32) += A (64 x 16, registers) B (16 x DP, smem, N-major: imm-trans-b = 1).
template <typename T, int DP>
__device__ __forceinline__ void wgmma_rs_nmajor(float (&d)[DP / 2], const uint32_t (&a)[4],
                                                uint64_t b) {
  if constexpr (DP == 128) {
#define L2P_WGMMA_RS(TYPE)                                                                     \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                    \
               "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " " L2P_REGS64    \
               ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"                                \
               : L2P_ACC64(d)                                                                  \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1))
    if constexpr (WgmmaType<T>::kBf16) {
      L2P_WGMMA_RS("bf16");
    } else {
      L2P_WGMMA_RS("f16");
    }
#undef L2P_WGMMA_RS
  } else {
    static_assert(DP == 64, "DP is 64 or 128");
#define L2P_WGMMA_RS(TYPE)                                                                     \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                    \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " " L2P_REGS32     \
               ", {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"                                \
               : L2P_ACC32(d)                                                                  \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1))
    if constexpr (WgmmaType<T>::kBf16) {
      L2P_WGMMA_RS("bf16");
    } else {
      L2P_WGMMA_RS("f16");
    }
#undef L2P_WGMMA_RS
  }
}

#endif  // L2P_WGMMA_DEVICE

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
  const int64_t bh = p.bh_offset + blockIdx.y;
  const int64_t b = bh / p.q_heads, h = bh - b * p.q_heads;
  const int64_t kvh = b * p.kv_heads + h / p.group;
  const int64_t m0 = int64_t(blockIdx.x) * kRows;
  const T* q = p.q + bh * p.q_len * p.head_dim;
  const T* k = p.k + kvh * p.kv_len * p.head_dim;
  const T* v = p.v + kvh * p.kv_len * p.value_dim;
  const int64_t tiles = (p.kv_len + kKeys - 1) / kKeys;

  // cp.async groups: {Q, K_0, V_0}, then one per iteration j: {K_j+1, V_j+1}.
  load_tile_swizzled<T, kRows, DP>(sQ, q, m0, p.q_len, p.head_dim);
  load_tile_swizzled<T, kKeys, DP>(sK, k, 0, p.kv_len, p.head_dim);
  load_tile_swizzled<T, kKeys, DP>(sV, v, 0, p.kv_len, p.value_dim);
  cp_async_commit();

  // Descriptors without their start address; K-major: leading byte offset 16 (unused),
  // stride 1024; N-major V: leading = the next 64-dim column block, stride 1024.
  const uint64_t kmajor = smem_descriptor(0, 16, kSwizzleAtom);
  const uint64_t nmajor = smem_descriptor(0, kKeys * kSwizzleRow, kSwizzleAtom);
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
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kSteps; ++kk) {
      const uint64_t vd = nmajor | (v_start + v_buf * kBuffer + kk * (16 * kSwizzleRow >> 4));
      wgmma_rs_nmajor<T, DP>(o, pa[kk], vd);
    }
    wgmma_commit();
  };
  // S = Q K^T from K buffer buf over DP / 16 steps; step kk reads column block kk / 4 at byte
  // 32 (kk % 4).
  auto issue_s = [&](int buf) {
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kDepth; ++kk) {
      const uint32_t within = (kk % 4) * 2;  // 32 bytes, in 16-byte units
      const uint64_t qd = kmajor | (q_start + (kk / 4) * kQBlock + within);
      const uint64_t kd = kmajor | (k_start + buf * kBuffer + (kk / 4) * kKVBlock + within);
      wgmma_ss_n128<T>(s, qd, kd, kk > 0);
    }
    wgmma_commit();
  };
  // Tile j's K and V into buffers buf and v_next (their own cp.async group).
  auto load_kv = [&](int64_t j, int buf, int v_next) {
    load_tile_swizzled<T, kKeys, DP>(sK + buf * Tile::kKVBytes, k, j * kKeys, p.kv_len, p.head_dim);
    load_tile_swizzled<T, kKeys, DP>(sV + v_next * Tile::kKVBytes, v, j * kKeys, p.kv_len,
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
  auto pack_p = [&]() {
#pragma unroll
    for (int kk = 0; kk < kSteps; ++kk) {
      pa[kk][0] = pack2<T>(s[8 * kk + 0], s[8 * kk + 1]);
      pa[kk][1] = pack2<T>(s[8 * kk + 2], s[8 * kk + 3]);
      pa[kk][2] = pack2<T>(s[8 * kk + 4], s[8 * kk + 5]);
      pa[kk][3] = pack2<T>(s[8 * kk + 6], s[8 * kk + 7]);
    }
  };

  // Tile 0, peeled from the loop so that inside it every iteration issues both products and
  // the same waits: with `if (j > 0)` around O += P V and the wait count, ptxas cannot tell
  // that S_j is finished after wait_group 1 on every path and serializes every wgmma
  // (warning C7514). Tile 0 has no P V to overlap, and O is still zero (no rescale).
  float alpha[2];
  cp_async_wait<0>();
  fence_proxy_async();
  __syncthreads();
  issue_s(0);
  if (tiles > 1) load_kv(1, 1, 1);
  wgmma_wait<0>();
  pin(s);
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
    fence_proxy_async();
    __syncthreads();
    issue_s(buf);
    issue_pv(v_prev);
    if (j + 1 < tiles) load_kv(j + 1, buf ^ 1, v_next);
    wgmma_wait<1>();  // S_j done; P_j-1 V_j-1 may still run
    pin(s);
    softmax(j, alpha);
    // P_j-1 V_j-1 done: O moves to this tile's maximum, and P_j takes over pa.
    wgmma_wait<0>();
    pin(o);
#pragma unroll
    for (int kk = 0; kk < kSteps; ++kk) pin(pa[kk]);
#pragma unroll
    for (int i = 0; i < kOutRegs; ++i) o[i] *= alpha[(i / 2) % 2];
    pack_p();
    v_buf = v_next;
  }
  // The last tile's O += P V (its V landed and was fenced before the last barrier).
  issue_pv(v_buf == 0 ? 2 : v_buf - 1);
  wgmma_wait<0>();
  pin(o);

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
  using Tile = WgmmaTile<DP>;
  const AttentionShape& s = args.shape;
  auto kernel = attention_fwd_wgmma_kernel<T, DP>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(Tile::kSmem));
  if (err != cudaSuccess) return err;
  WgmmaParams<T> p;
  p.q = static_cast<const T*>(args.q);
  p.k = static_cast<const T*>(args.k);
  p.v = static_cast<const T*>(args.v);
  p.out = static_cast<T*>(args.out);
  p.lse = args.lse;
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
  return attn::launch_head_slices(heads, [&](int64_t first, unsigned count) {
    p.bh_offset = first;
    kernel<<<dim3(static_cast<unsigned>(q_tiles), count), kThreads, Tile::kSmem, stream>>>(p);
  });
}

template <typename T>
cudaError_t launch_for_dim(const AttentionForwardArgs& args, cudaStream_t stream) {
  switch (attn::padded_head_dim(args.shape.head_dim, args.shape.value_dim)) {
    case 64: return launch<T, 64>(args, stream);
    case 128: return launch<T, 128>(args, stream);
    default: return cudaErrorInvalidValue;
  }
}

// The wgmma kernels exist only in an sm_90a cubin. A build whose architecture list lacks
// 9.0a (CMake passes it as L2P_CUDA_ARCHS) would run the empty sm_80 / sm_90 kernel on a
// Hopper GPU, so such a build declines every shape.
constexpr bool built_for_sm90a() {
#ifdef L2P_CUDA_ARCHS
  constexpr const char* archs = L2P_CUDA_ARCHS;
  for (int i = 0; archs[i] != '\0' && archs[i + 1] != '\0' && archs[i + 2] != '\0'; ++i) {
    if (archs[i] == '9' && archs[i + 1] == '.' && archs[i + 2] == '0' && archs[i + 3] == 'a') {
      return true;
    }
  }
  return false;
#else
  return true;  // compiled by hand with -gencode arch=compute_90a,code=sm_90a
#endif
}

}  // namespace

bool attention_forward_wgmma_supported(const AttentionForwardArgs& args) {
  const AttentionShape& s = args.shape;
  if (!built_for_sm90a()) return false;
  if (s.dtype != AttentionDType::kBFloat16 && s.dtype != AttentionDType::kFloat16) return false;
  if (s.mask != nullptr) return false;  // masked attention stays on the mma.sync kernel
  const int dp = attn::padded_head_dim(s.head_dim, s.value_dim);
  if (dp != 64 && dp != 128) return false;
  if (!(s.scale > 0.0)) return false;  // the row maximum is taken before scaling
  if (s.head_dim % 8 != 0 || s.value_dim % 8 != 0) return false;
  if (!attn::aligned16(args.q) || !attn::aligned16(args.k) || !attn::aligned16(args.v) ||
      !attn::aligned16(args.out)) {
    return false;
  }
  int device = 0, major = 0, minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess ||
      major != 9 || minor != 0) {
    return false;
  }
  const size_t smem = dp == 64 ? WgmmaTile<64>::kSmem : WgmmaTile<128>::kSmem;
  return smem <= static_cast<size_t>(attn::max_shared_per_block()) &&
         (s.q_len + kRows - 1) / kRows < (int64_t{1} << 31);
}

cudaError_t attention_forward_wgmma(const AttentionForwardArgs& args, cudaStream_t stream) {
  if (args.shape.dtype == AttentionDType::kBFloat16) {
    return launch_for_dim<__nv_bfloat16>(args, stream);
  }
  if (args.shape.dtype == AttentionDType::kFloat16) return launch_for_dim<__half>(args, stream);
  return cudaErrorInvalidValue;
}

}  // namespace l2p::cuda
