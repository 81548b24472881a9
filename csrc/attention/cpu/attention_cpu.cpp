// Memory-efficient (flash-style) attention on the CPU. The forward pass walks the keys tile
// by tile with an online softmax; the backward pass recomputes each tile's probabilities
// from the saved logsumexp. Nothing of size Nq x Nk is ever allocated: per worker, one
// query-tile x key-tile block of scores, plus (backward) a dQ accumulator for one head group.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <tuple>
#include <vector>

#include "common/cpu_gemm.h"
#include "common/patches.h"

namespace l2p::cpu {
namespace {

// Tile sizes, measured on AVX-512 with MKL (flat between 128 and 256 query rows): a 256 x 512
// float score block is 512 KiB and stays in L2 while it goes from scores to probabilities to
// the P @ V product. The backward keeps five tiles live, hence its smaller ones.
constexpr int64_t kForwardQueryTile = 256;
constexpr int64_t kForwardMinQueryTile = 32;
constexpr int64_t kForwardKeyTile = 512;
constexpr int64_t kBackwardQueryTile = 128;
constexpr int64_t kBackwardKeyTile = 128;

// Below this much work (multiply-adds) per parallel chunk, waking other threads costs more
// than it saves; small problems run on the calling thread.
constexpr int64_t kMinParallelWork = int64_t(1) << 18;

// at::parallel_for grain for tasks of `work_per_task` multiply-adds each.
int64_t grain_for(int64_t work_per_task) {
  return std::max<int64_t>(1, kMinParallelWork / std::max<int64_t>(1, work_per_task));
}

#define L2P_ALWAYS_INLINE inline __attribute__((always_inline))
// The extension is built without -march flags: on x86 the exp-heavy loops are compiled once
// per ISA and picked at load time, so an older CPU runs the baseline clone, never crashes.
#if defined(__x86_64__) || defined(__i386__)
#define L2P_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define L2P_VECTOR_CLONES
#endif

// 16 float lanes in GCC's generic vector extension: each clone lowers a vfloat to one zmm,
// two ymm or four xmm registers. Written out explicitly because the auto-vectoriser turns
// the clamps of exp2_fast into branches. The helpers are always inlined, so no vfloat
// crosses a call and GCC's note on the ABI of 64-byte vector values does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
using vfloat = float __attribute__((vector_size(64)));
using vint = int32_t __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;
constexpr float kInf = std::numeric_limits<float>::infinity();

L2P_ALWAYS_INLINE vfloat splat(float x) { return vfloat{} + x; }

// The first n <= kLanes floats at p; missing lanes hold `fill`.
L2P_ALWAYS_INLINE vfloat load(const float* p, int64_t n = kLanes, float fill = 0.0f) {
  vfloat v = splat(fill);
  std::memcpy(&v, p, n * sizeof(float));
  return v;
}

L2P_ALWAYS_INLINE void store(float* p, const vfloat& v, int64_t n = kLanes) {
  std::memcpy(p, &v, n * sizeof(float));
}

// The kernels work in base 2: scores are scaled by log2(e) in the GEMM (and the mask on
// the way in), so the softmax needs exp2, whose range reduction is one subtraction.
constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

// 2^x to about 1 ulp: 2^x = 2^n 2^r with n = round(x), |r| <= 1/2, and the Cephes
// polynomial for 2^r. Below -126.5 (where 2^x leaves the normal range) and for -inf from a
// mask, 2^n is built as +0, so the result is exactly 0.
L2P_ALWAYS_INLINE vfloat exp2_fast(const vfloat& x) {
  constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const vfloat lowest = splat(-150.0f), highest = splat(127.0f);
  vfloat xc = x < lowest ? lowest : x;
  xc = xc > highest ? highest : xc;
  const vfloat n = (xc + kRoundMagic) - kRoundMagic;
  const vfloat r = xc - n;
  vfloat p = splat(1.535336188319500e-4f);
  p = p * r + 1.339887440266574e-3f;
  p = p * r + 9.618437357674640e-3f;
  p = p * r + 5.550332471162809e-2f;
  p = p * r + 2.402264791363012e-1f;
  p = p * r + 6.931472028550421e-1f;
  p = p * r + 1.0f;
  vint biased = __builtin_convertvector(n, vint) + 127;
  biased = biased < 0 ? vint{} : biased;
  return p * reinterpret_cast<vfloat>(biased << 23);
}

L2P_ALWAYS_INLINE float horizontal_max(const vfloat& v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = std::max(m, v[i]);
  return m;
}

L2P_ALWAYS_INLINE float horizontal_sum(const vfloat& v) {
  float s = v[0];
  for (int i = 1; i < kLanes; ++i) s += v[i];
  return s;
}

// One key tile of the online softmax over `rows` query rows. s (rows x cols, stride ld) holds
// the scaled, masked base-2 scores and becomes 2^(s - m_new) in place; m / l are the running
// row maximum and sum; corr receives 2^(m_old - m_new), the factor for the output rows.
L2P_VECTOR_CLONES void online_softmax_tile(float* s, int64_t rows, int64_t cols, int64_t ld,
                                           float* m, float* l, float* corr) {
  const int64_t full = cols - cols % kLanes, tail = cols - full;
  for (int64_t r = 0; r < rows; ++r) {
    float* row = s + r * ld;
    vfloat maxima = splat(-kInf);
    for (int64_t c = 0; c < full; c += kLanes) {
      const vfloat x = load(row + c);
      maxima = x > maxima ? x : maxima;
    }
    if (tail > 0) {
      const vfloat x = load(row + full, tail, -kInf);
      maxima = x > maxima ? x : maxima;
    }
    const float m_new = std::max(m[r], horizontal_max(maxima));
    if (m_new == -kInf) {  // every key so far is masked: nothing to add yet
      std::fill(row, row + cols, 0.0f);
      corr[r] = 1.0f;
      continue;
    }
    const vfloat shift = splat(m_new);
    vfloat sums = splat(0.0f);
    for (int64_t c = 0; c < full; c += kLanes) {
      const vfloat p = exp2_fast(load(row + c) - shift);
      store(row + c, p);
      sums += p;
    }
    if (tail > 0) {
      const vfloat p = exp2_fast(load(row + full, tail, -kInf) - shift);
      store(row + full, p, tail);
      sums += p;
    }
    corr[r] = std::exp2(m[r] - m_new);
    l[r] = l[r] * corr[r] + horizontal_sum(sums);
    m[r] = m_new;
  }
}

void online_softmax_tile(double* s, int64_t rows, int64_t cols, int64_t ld, double* m,
                         double* l, double* corr) {
  for (int64_t r = 0; r < rows; ++r) {
    double* row = s + r * ld;
    const double m_new = std::max(m[r], *std::max_element(row, row + cols));
    if (m_new == -kInf) {
      std::fill(row, row + cols, 0.0);
      corr[r] = 1.0;
      continue;
    }
    double sum = 0;
    for (int64_t c = 0; c < cols; ++c) {
      row[c] = std::exp2(row[c] - m_new);
      sum += row[c];
    }
    corr[r] = std::exp2(m[r] - m_new);
    l[r] = l[r] * corr[r] + sum;
    m[r] = m_new;
  }
}

// Backward: s (scaled, masked base-2 scores) becomes P = 2^(s - shift) * scale with the row's
// RowScale; a row with shift = -inf attended to nothing and gets P = 0.
template <typename T>
struct RowScale {
  const T* shift;        // base-2 logsumexp, or for a coarse row its base-2 maximum
  const T* inv_sum;      // 1, or for a coarse row 1 / sum of 2^(s - max)
  const uint8_t* coarse; // whether the row is coarse (see attention_backward_kernel)
};

L2P_VECTOR_CLONES void probabilities(float* s, int64_t rows, int64_t cols, int64_t ld,
                                     const RowScale<float>& rs) {
  const int64_t full = cols - cols % kLanes, tail = cols - full;
  for (int64_t r = 0; r < rows; ++r) {
    float* row = s + r * ld;
    if (rs.shift[r] == -kInf) {
      std::fill(row, row + cols, 0.0f);
      continue;
    }
    const vfloat shift = splat(rs.shift[r]);
    if (!rs.coarse[r]) {
      for (int64_t c = 0; c < full; c += kLanes) store(row + c, exp2_fast(load(row + c) - shift));
      if (tail > 0) store(row + full, exp2_fast(load(row + full, tail, -kInf) - shift), tail);
      continue;
    }
    // s - max <= 0 up to the rounding of the scores at this magnitude, where one ulp can be
    // hundreds: clamped, so that 2^(s - max) cannot overflow.
    const vfloat zero = splat(0.0f), scale = splat(rs.inv_sum[r]);
    for (int64_t c = 0; c < full; c += kLanes) {
      vfloat x = load(row + c) - shift;
      x = x > zero ? zero : x;
      store(row + c, exp2_fast(x) * scale);
    }
    if (tail > 0) {
      vfloat x = load(row + full, tail, -kInf) - shift;
      x = x > zero ? zero : x;
      store(row + full, exp2_fast(x) * scale, tail);
    }
  }
}

void probabilities(double* s, int64_t rows, int64_t cols, int64_t ld,
                   const RowScale<double>& rs) {
  for (int64_t r = 0; r < rows; ++r) {
    double* row = s + r * ld;
    const double shift = rs.shift[r], scale = rs.inv_sum[r];
    for (int64_t c = 0; c < cols; ++c) {
      row[c] = shift == -kInf ? 0.0
               : rs.coarse[r] ? std::exp2(std::min(row[c] - shift, 0.0)) * scale
                              : std::exp2(row[c] - shift);
    }
  }
}

// acc[r, :] *= corr[r]: the output accumulator follows its row's new maximum.
template <typename T>
L2P_ALWAYS_INLINE void rescale_rows_impl(T* acc, int64_t rows, int64_t cols, const T* corr) {
  for (int64_t r = 0; r < rows; ++r) {
    if (corr[r] == T(1)) continue;
    T* row = acc + r * cols;
    const T factor = corr[r];
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) row[c] *= factor;
  }
}

L2P_VECTOR_CLONES void rescale_rows(float* acc, int64_t rows, int64_t cols, const float* corr) {
  rescale_rows_impl(acc, rows, cols, corr);
}

void rescale_rows(double* acc, int64_t rows, int64_t cols, const double* corr) {
  rescale_rows_impl(acc, rows, cols, corr);
}

// ds = P * (dP - delta), the softmax backward, in place of dP.
template <typename T>
L2P_ALWAYS_INLINE void softmax_grad_impl(T* ds, const T* p, int64_t rows, int64_t cols,
                                         int64_t ld, const T* delta) {
  for (int64_t r = 0; r < rows; ++r) {
    T* d_row = ds + r * ld;
    const T* p_row = p + r * ld;
    const T d = delta[r];
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) d_row[c] = p_row[c] * (d_row[c] - d);
  }
}

L2P_VECTOR_CLONES void softmax_grad(float* ds, const float* p, int64_t rows, int64_t cols,
                                    int64_t ld, const float* delta) {
  softmax_grad_impl(ds, p, rows, cols, ld, delta);
}

void softmax_grad(double* ds, const double* p, int64_t rows, int64_t cols, int64_t ld,
                  const double* delta) {
  softmax_grad_impl(ds, p, rows, cols, ld, delta);
}

// The additive mask (B, Hq, Nq, Nk) in the compute type T (float32, or float64 for float64
// inputs, whose mask rounded to float32 cost the output its float64 accuracy), read through
// its strides: a broadcast mask (zero strides) is never materialised.
template <typename T>
struct MaskView {
  const T* data = nullptr;
  int64_t stride_b = 0, stride_h = 0, stride_q = 0, stride_k = 0;

  const T* at(int64_t b, int64_t h, int64_t i, int64_t j) const {
    return data + b * stride_b + h * stride_h + i * stride_q + j * stride_k;
  }

  // True when keys [j0, j0 + cols) are masked out (-inf) for every query of head (b, h).
  // Answered only for a mask broadcast over the queries (a key-padding mask), where one
  // row decides; padded key tiles then cost nothing.
  bool keys_masked(int64_t b, int64_t h, int64_t j0, int64_t cols) const {
    if (data == nullptr || stride_q != 0) return false;
    const T* row = at(b, h, 0, j0);
    for (int64_t c = 0; c < cols; ++c) {
      if (row[c * stride_k] != -kInf) return false;
    }
    return true;
  }
};

template <typename T>
MaskView<T> mask_view(const c10::optional<at::Tensor>& mask) {
  MaskView<T> view;
  if (mask.has_value()) {
    view.data = mask->data_ptr<T>();
    view.stride_b = mask->stride(0);
    view.stride_h = mask->stride(1);
    view.stride_q = mask->stride(2);
    view.stride_k = mask->stride(3);
  }
  return view;
}

// log2(e) * m, the mask value m in the kernels' base-2 units. A finite m below
// lowest / log2(e), such as finfo(float32).min (the masks of transformers and diffusers), would
// overflow to -inf and make a row that the float32 softmax of the reference and of SDPA spreads
// evenly over its keys (the score vanishes beside finfo.min) a dead row of zeros. It becomes
// the lowest finite value instead, beside which the score vanishes in the same way; only -inf
// stays -inf. Likewise a finite m above max / log2(e) becomes the largest finite value: as
// +inf it made the row's maximum +inf and every probability inf - inf = NaN, where the
// reference and SDPA give that key all the weight. Compares and selects per element.
template <typename T>
L2P_ALWAYS_INLINE T scaled_mask(T m) {
  constexpr T inf = std::numeric_limits<T>::infinity();
  const T x = static_cast<T>(kLog2e) * m;
  if (x == -inf && m != -inf) return std::numeric_limits<T>::lowest();
  return (x == inf && m != inf) ? std::numeric_limits<T>::max() : x;
}

// s[r, c] += log2(e) * mask[i0 + r, j0 + c] for the tile at (i0, j0) of head (b, h).
template <typename T>
void add_mask(T* s, int64_t rows, int64_t cols, int64_t ld, const MaskView<T>& mask, int64_t b,
              int64_t h, int64_t i0, int64_t j0) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* src = mask.at(b, h, i0 + r, j0);
    T* row = s + r * ld;
    if (mask.stride_k == 1) {
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) row[c] += scaled_mask<T>(src[c]);
    } else {
      for (int64_t c = 0; c < cols; ++c) row[c] += scaled_mask<T>(src[c * mask.stride_k]);
    }
  }
}

struct Shape {
  int64_t batch, q_heads, kv_heads, q_len, kv_len, head_dim, value_dim;
  int64_t group() const { return q_heads / kv_heads; }
};

// acc_t: compute type (float or double); q, k, v are contiguous in acc_t; out_t: output dtype.
template <typename acc_t, typename out_t>
void attention_forward_kernel(const acc_t* q, const acc_t* k, const acc_t* v,
                              const MaskView<acc_t>& mask, double scale_d, const Shape& sh,
                              out_t* out, float* lse) {
  const int64_t Dh = sh.head_dim, Dv = sh.value_dim, Nq = sh.q_len, Nk = sh.kv_len;
  // Taller query tiles mean fewer re-packings of each key tile by the GEMM; shorter ones
  // are kept when the problem would otherwise have too few tiles for every thread.
  int64_t BQ = std::min(kForwardQueryTile, Nq);
  while (BQ > kForwardMinQueryTile &&
         sh.batch * sh.q_heads * ((Nq + BQ - 1) / BQ) < 4 * at::get_num_threads()) {
    BQ /= 2;
  }
  const int64_t BK = std::max<int64_t>(1, std::min(kForwardKeyTile, Nk));
  const int64_t q_tiles = (Nq + BQ - 1) / BQ;
  const acc_t scale2 = static_cast<acc_t>(scale_d * kLog2e);

  const int64_t grain = grain_for(BQ * Nk * (Dh + Dv));
  at::parallel_for(0, sh.batch * sh.q_heads * q_tiles, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scores(BQ * BK), acc(BQ * Dv), m(BQ), l(BQ), corr(BQ);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (sh.q_heads * q_tiles);
      const int64_t h = task / q_tiles % sh.q_heads;
      const int64_t i0 = task % q_tiles * BQ;
      const int64_t rows = std::min(BQ, Nq - i0);
      const int64_t kv = b * sh.kv_heads + h / sh.group();
      const int64_t q_row0 = (b * sh.q_heads + h) * Nq + i0;
      const acc_t* q_tile = q + q_row0 * Dh;
      std::fill(m.begin(), m.end(), -kInf);
      std::fill(l.begin(), l.end(), acc_t(0));
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t j0 = 0; j0 < Nk; j0 += BK) {
        const int64_t cols = std::min(BK, Nk - j0);
        if (mask.keys_masked(b, h, j0, cols)) continue;
        gemm(false, true, rows, cols, Dh, scale2, q_tile, Dh, k + (kv * Nk + j0) * Dh, Dh,
             acc_t(0), scores.data(), BK);
        if (mask.data != nullptr) add_mask(scores.data(), rows, cols, BK, mask, b, h, i0, j0);
        online_softmax_tile(scores.data(), rows, cols, BK, m.data(), l.data(), corr.data());
        rescale_rows(acc.data(), rows, Dv, corr.data());
        gemm(false, false, rows, Dv, cols, acc_t(1), scores.data(), BK,
             v + (kv * Nk + j0) * Dv, Dv, acc_t(1), acc.data(), Dv);
      }
      for (int64_t r = 0; r < rows; ++r) {
        out_t* o = out + (q_row0 + r) * Dv;
        const acc_t* a = acc.data() + r * Dv;
        if (m[r] == -kInf) {  // attends to nothing: zeros, as in PyTorch
          std::fill(o, o + Dv, out_t(0));
          lse[q_row0 + r] = -kInf;
          continue;
        }
        const acc_t inv = acc_t(1) / l[r];
        for (int64_t d = 0; d < Dv; ++d) o[d] = static_cast<out_t>(a[d] * inv);
        lse[q_row0 + r] = static_cast<float>((m[r] + std::log2(l[r])) * acc_t(kLn2));
      }
    }
  });
}

// Beyond this base-2 magnitude a float32 logsumexp no longer holds the log of the row sum
// (its ulp passes 2^-13; at finfo.min or -1e9 the sum is lost altogether and 2^(s - lse) comes
// out 1 for every key). Natural scores this large (above 700) come only from masks.
constexpr double kCoarseLse2 = 1024.0;

// dK and dV of a key tile are owned by the worker that holds the tile, so they need no
// synchronisation. dQ gets contributions from every key tile of its (batch, kv head) group:
// a worker that holds all of a group's tiles adds them to dq directly; one that shares the
// group sums its part in a private buffer, and those parts are added to dq after the parallel
// loop, in the order of their task ranges: the same result on every run (adding them under a
// lock in arrival order made dq differ run to run by an ulp or so).
template <typename acc_t, typename grad_t>
void attention_backward_kernel(const acc_t* grad_out, const acc_t* q, const acc_t* k,
                               const acc_t* v, const acc_t* delta, const float* lse,
                               const MaskView<acc_t>& mask, double scale_d, const Shape& sh,
                               acc_t* dq, grad_t* dk, grad_t* dv) {
  const int64_t Dh = sh.head_dim, Dv = sh.value_dim, Nq = sh.q_len, Nk = sh.kv_len;
  const int64_t G = sh.group();
  const int64_t BQ = std::min(kBackwardQueryTile, Nq);
  const int64_t BK = std::min(kBackwardKeyTile, Nk);
  const int64_t kv_tiles = (Nk + BK - 1) / BK;
  const int64_t num_groups = sh.batch * sh.kv_heads;
  const int64_t group_dq_numel = G * Nq * Dh;
  const acc_t scale = static_cast<acc_t>(scale_d);
  const acc_t scale2 = static_cast<acc_t>(scale_d * kLog2e);

  // P = 2^(s - lse2) for each row, lse2 = lse log2(e) the base-2 logsumexp; a dead row (lse =
  // -inf) gets P = 0. A coarse row (|lse2| >= kCoarseLse2: a row masked with -1e9 or
  // finfo.min everywhere, say) gets its maximum and sum recomputed here instead, exactly as
  // the main loop below computes its scores, and P = 2^(s - max) / sum. The extra pass costs
  // one score GEMM per key tile for the query tiles that hold a coarse row, nothing otherwise.
  const int64_t q_tiles = (Nq + BQ - 1) / BQ;
  const int64_t total_rows = sh.batch * sh.q_heads * Nq;
  std::vector<acc_t> shift(total_rows), inv_sum(total_rows, acc_t(1));
  std::vector<uint8_t> coarse(total_rows, 0), coarse_tile(sh.batch * sh.q_heads * q_tiles, 0);
  // The saved logsumexp is float32: its rounding (a relative 6e-8 of |lse|) passes into every
  // probability, which a float32 backward cannot tell but a float64 one can (its gradients came
  // out float32-accurate). In double, every live row takes the recomputation instead.
  constexpr bool lse_serves = std::is_same_v<acc_t, float>;
  for (int64_t i = 0; i < total_rows; ++i) {
    const double lse2 = static_cast<double>(lse[i]) * kLog2e;  // in double: cannot overflow
    if (lse[i] == -kInf || (lse_serves && std::abs(lse2) < kCoarseLse2)) {
      shift[i] = static_cast<acc_t>(lse2);
    } else {
      coarse[i] = 1;
      coarse_tile[i / Nq * q_tiles + i % Nq / BQ] = 1;
    }
  }
  at::parallel_for(0, sh.batch * sh.q_heads * q_tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scores, m, l, corr;
    for (int64_t tile = begin; tile < end; ++tile) {
      if (!coarse_tile[tile]) continue;
      scores.resize(BQ * BK);
      m.assign(BQ, -kInf);
      l.assign(BQ, acc_t(0));
      corr.resize(BQ);
      const int64_t bh = tile / q_tiles, b = bh / sh.q_heads, h = bh % sh.q_heads;
      const int64_t i0 = tile % q_tiles * BQ, rows = std::min(BQ, Nq - i0);
      const int64_t row0 = bh * Nq + i0;
      const int64_t group = b * sh.kv_heads + h / G;
      for (int64_t j0 = 0; j0 < Nk; j0 += BK) {
        const int64_t cols = std::min(BK, Nk - j0);
        if (mask.keys_masked(b, h, j0, cols)) continue;
        gemm(false, true, rows, cols, Dh, scale2, q + row0 * Dh, Dh, k + (group * Nk + j0) * Dh,
             Dh, acc_t(0), scores.data(), BK);
        if (mask.data != nullptr) add_mask(scores.data(), rows, cols, BK, mask, b, h, i0, j0);
        online_softmax_tile(scores.data(), rows, cols, BK, m.data(), l.data(), corr.data());
      }
      for (int64_t r = 0; r < rows; ++r) {
        if (!coarse[row0 + r]) continue;
        shift[row0 + r] = m[r];
        inv_sum[row0 + r] = l[r] > acc_t(0) ? acc_t(1) / l[r] : acc_t(0);
      }
    }
  });

  // dQ parts of groups that a task range shares with another: (group, begin, values).
  struct DqPart {
    int64_t group, begin;
    std::vector<acc_t> values;
  };
  std::vector<DqPart> dq_parts;
  std::mutex dq_parts_lock;

  const int64_t grain = grain_for(2 * G * Nq * BK * (Dh + Dv));
  at::parallel_for(0, num_groups * kv_tiles, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> probs(BQ * BK), grad_scores(BQ * BK);
    std::vector<acc_t> dk_acc(BK * Dh), dv_acc(BK * Dv), dq_local;
    int64_t held_group = -1;
    acc_t* dq_group = nullptr;  // where this worker sums held_group's dQ
    auto flush_dq = [&] {
      if (held_group < 0 || dq_group != dq_local.data()) return;
      std::lock_guard<std::mutex> guard(dq_parts_lock);
      dq_parts.push_back(DqPart{held_group, begin, std::move(dq_local)});
      dq_local = {};
    };
    for (int64_t task = begin; task < end; ++task) {
      const int64_t group = task / kv_tiles;  // = b * kv_heads + kv head
      const int64_t b = group / sh.kv_heads;
      const int64_t j0 = task % kv_tiles * BK;
      const int64_t cols = std::min(BK, Nk - j0);
      if (group != held_group) {
        flush_dq();
        held_group = group;
        if (group * kv_tiles >= begin && (group + 1) * kv_tiles <= end) {
          dq_group = dq + group * group_dq_numel;
        } else {
          dq_local.assign(group_dq_numel, acc_t(0));
          dq_group = dq_local.data();
        }
      }
      const acc_t* k_tile = k + (group * Nk + j0) * Dh;
      const acc_t* v_tile = v + (group * Nk + j0) * Dv;
      std::fill(dk_acc.begin(), dk_acc.end(), acc_t(0));
      std::fill(dv_acc.begin(), dv_acc.end(), acc_t(0));
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = group % sh.kv_heads * G + g;
        if (mask.keys_masked(b, h, j0, cols)) continue;
        for (int64_t i0 = 0; i0 < Nq; i0 += BQ) {
          const int64_t rows = std::min(BQ, Nq - i0);
          const int64_t row0 = (b * sh.q_heads + h) * Nq + i0;
          const acc_t* q_tile = q + row0 * Dh;
          const acc_t* do_tile = grad_out + row0 * Dv;
          gemm(false, true, rows, cols, Dh, scale2, q_tile, Dh, k_tile, Dh, acc_t(0),
               probs.data(), BK);
          if (mask.data != nullptr) add_mask(probs.data(), rows, cols, BK, mask, b, h, i0, j0);
          probabilities(probs.data(), rows, cols, BK,
                        RowScale<acc_t>{shift.data() + row0, inv_sum.data() + row0,
                                        coarse.data() + row0});
          // dV += P^T dO;  dP = dO V^T;  dS = P * (dP - delta);  dK += dS^T Q;  dQ += dS K.
          gemm(true, false, cols, Dv, rows, acc_t(1), probs.data(), BK, do_tile, Dv, acc_t(1),
               dv_acc.data(), Dv);
          gemm(false, true, rows, cols, Dv, acc_t(1), do_tile, Dv, v_tile, Dv, acc_t(0),
               grad_scores.data(), BK);
          softmax_grad(grad_scores.data(), probs.data(), rows, cols, BK, delta + row0);
          gemm(true, false, cols, Dh, rows, scale, grad_scores.data(), BK, q_tile, Dh,
               acc_t(1), dk_acc.data(), Dh);
          gemm(false, false, rows, Dh, cols, scale, grad_scores.data(), BK, k_tile, Dh,
               acc_t(1), dq_group + (g * Nq + i0) * Dh, Dh);
        }
      }
      grad_t* dk_dst = dk + (group * Nk + j0) * Dh;
      grad_t* dv_dst = dv + (group * Nk + j0) * Dv;
      for (int64_t e = 0; e < cols * Dh; ++e) dk_dst[e] = static_cast<grad_t>(dk_acc[e]);
      for (int64_t e = 0; e < cols * Dv; ++e) dv_dst[e] = static_cast<grad_t>(dv_acc[e]);
    }
    flush_dq();
  });

  // The shared groups' parts, each group's in the order of the task ranges (fixed for a given
  // thread count), groups in parallel.
  std::sort(dq_parts.begin(), dq_parts.end(), [](const DqPart& a, const DqPart& b) {
    return a.group != b.group ? a.group < b.group : a.begin < b.begin;
  });
  std::vector<size_t> firsts;
  for (size_t i = 0; i < dq_parts.size(); ++i) {
    if (i == 0 || dq_parts[i].group != dq_parts[i - 1].group) firsts.push_back(i);
  }
  firsts.push_back(dq_parts.size());
  at::parallel_for(0, static_cast<int64_t>(firsts.size()) - 1, 1, [&](int64_t begin, int64_t end) {
    for (int64_t f = begin; f < end; ++f) {
      acc_t* dst = dq + dq_parts[firsts[f]].group * group_dq_numel;
      for (size_t i = firsts[f]; i < firsts[f + 1]; ++i) {
        const acc_t* src = dq_parts[i].values.data();
        for (int64_t e = 0; e < group_dq_numel; ++e) dst[e] += src[e];
      }
    }
  });
}

Shape check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
                    "l2p: attention q, k, v must be (B, H, N, D), got shapes ", q.sizes(), ", ",
                    k.sizes(), ", ", v.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(q.scalar_type()),
                   "l2p: attention q must be floating point, got ", q.scalar_type());
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                   "l2p: attention q, k, v dtypes differ: ", q.scalar_type(), ", ",
                   k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK_VALUE(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
                    "l2p: the CPU attention kernel got tensors on ", q.device(), ", ",
                    k.device(), ", ", v.device());
  const Shape sh{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), v.size(3)};
  TORCH_CHECK_VALUE(k.size(0) == sh.batch && v.size(0) == sh.batch,
                    "l2p: attention batch sizes differ: q ", q.sizes(), ", k ", k.sizes(),
                    ", v ", v.sizes());
  TORCH_CHECK_VALUE(v.size(1) == sh.kv_heads && v.size(2) == sh.kv_len,
                    "l2p: attention k ", k.sizes(), " and v ", v.sizes(),
                    " must have the same heads and length");
  TORCH_CHECK_VALUE(sh.kv_heads > 0 && sh.q_heads % sh.kv_heads == 0, "l2p: attention q has ",
                    sh.q_heads, " heads, not a multiple of the ", sh.kv_heads, " kv heads");
  TORCH_CHECK_VALUE(k.size(3) == sh.head_dim, "l2p: attention q head dim ", sh.head_dim,
                    " differs from k head dim ", k.size(3));
  TORCH_CHECK_VALUE(sh.head_dim > 0 && sh.value_dim > 0,
                    "l2p: attention head dims must be positive, got ", sh.head_dim, " and ",
                    sh.value_dim);
  return sh;
}

void check_mask(const c10::optional<at::Tensor>& mask, const Shape& sh, at::ScalarType dtype) {
  if (!mask.has_value()) return;
  const bool in_double = dtype == at::kDouble;
  TORCH_CHECK_TYPE(mask->scalar_type() == (in_double ? at::kDouble : at::kFloat),
                   "l2p: attention attn_mask must be an additive ",
                   in_double ? "float64" : "float32", " tensor for ", dtype, " inputs, got ",
                   mask->scalar_type());
  TORCH_CHECK_VALUE(mask->device().is_cpu(), "l2p: attention attn_mask is on ",
                    mask->device());
  TORCH_CHECK_VALUE(mask->dim() == 4 && mask->size(0) == sh.batch &&
                        mask->size(1) == sh.q_heads && mask->size(2) == sh.q_len &&
                        mask->size(3) == sh.kv_len,
                    "l2p: attention attn_mask must be expanded to (B, Hq, Nq, Nk) = (",
                    sh.batch, ", ", sh.q_heads, ", ", sh.q_len, ", ", sh.kv_len, "), got ",
                    mask->sizes());
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const c10::optional<at::Tensor>& attn_mask, double scale) {
  const Shape sh = check_qkv(q_in, k_in, v_in);
  check_mask(attn_mask, sh, q_in.scalar_type());
  at::Tensor out = at::empty({sh.batch, sh.q_heads, sh.q_len, sh.value_dim}, q_in.options());
  at::Tensor lse = at::empty({sh.batch, sh.q_heads, sh.q_len}, q_in.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, q_in.scalar_type(), "attention_forward_cpu", [&] {
        using acc_t = acc_type_t<scalar_t>;
        // Reduced-precision inputs are converted once, up front (O(N) memory), not per tile.
        const at::Tensor q = as_acc<acc_t>(q_in), k = as_acc<acc_t>(k_in),
                         v = as_acc<acc_t>(v_in);
        attention_forward_kernel<acc_t, scalar_t>(
            q.data_ptr<acc_t>(), k.data_ptr<acc_t>(), v.data_ptr<acc_t>(),
            mask_view<acc_t>(attn_mask), scale, sh,
            out.data_ptr<scalar_t>(), lse.data_ptr<float>());
      });
  return {out, lse};
}

// The gradient in the memory layout of its input, as autograd would allocate it.
at::Tensor like_input(const at::Tensor& grad, const at::Tensor& input) {
  if (grad.strides() == input.strides()) return grad;
  return at::empty_like(input).copy_(grad);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in,
    const c10::optional<at::Tensor>& attn_mask, double scale) {
  const Shape sh = check_qkv(q_in, k_in, v_in);
  check_mask(attn_mask, sh, q_in.scalar_type());
  const std::vector<int64_t> out_shape{sh.batch, sh.q_heads, sh.q_len, sh.value_dim};
  auto check_like_out = [&](const char* name, const at::Tensor& t) {
    TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(out_shape), "l2p: attention_backward ",
                      name, " must be ", at::IntArrayRef(out_shape), ", got ", t.sizes());
    TORCH_CHECK_TYPE(t.scalar_type() == q_in.scalar_type(), "l2p: attention_backward ", name,
                     " dtype ", t.scalar_type(), " differs from q dtype ", q_in.scalar_type());
    TORCH_CHECK_VALUE(t.device().is_cpu(), "l2p: attention_backward ", name, " is on ",
                      t.device());
  };
  check_like_out("grad_out", grad_out_in);
  check_like_out("out", out_in);
  TORCH_CHECK_VALUE(lse_in.dim() == 3 && lse_in.size(0) == sh.batch &&
                        lse_in.size(1) == sh.q_heads && lse_in.size(2) == sh.q_len,
                    "l2p: attention_backward lse must be (B, Hq, Nq), got ", lse_in.sizes());
  TORCH_CHECK_TYPE(lse_in.scalar_type() == at::kFloat,
                   "l2p: attention_backward lse must be float32, got ", lse_in.scalar_type());
  TORCH_CHECK_VALUE(lse_in.device().is_cpu(), "l2p: attention_backward lse is on ",
                    lse_in.device());

  at::Tensor dq, dk, dv;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, q_in.scalar_type(), "attention_backward_cpu", [&] {
        using acc_t = acc_type_t<scalar_t>;
        constexpr bool same = std::is_same_v<acc_t, scalar_t>;
        const auto acc_options = q_in.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
        at::Tensor dq_acc = at::zeros(q_in.sizes(), acc_options);
        dk = at::empty(k_in.sizes(), k_in.options().memory_format(at::MemoryFormat::Contiguous));
        dv = at::empty(v_in.sizes(), v_in.options().memory_format(at::MemoryFormat::Contiguous));
        if (dq_acc.numel() > 0 && sh.kv_len > 0) {
          const at::Tensor q = as_acc<acc_t>(q_in), k = as_acc<acc_t>(k_in),
                           v = as_acc<acc_t>(v_in), grad_out = as_acc<acc_t>(grad_out_in),
                           out = as_acc<acc_t>(out_in), lse = lse_in.contiguous();
          // delta_i = rowsum(dO_i * O_i), the softmax-backward term of each query row.
          at::Tensor delta = at::empty({sh.batch * sh.q_heads * sh.q_len}, acc_options);
          const acc_t* do_ptr = grad_out.data_ptr<acc_t>();
          const acc_t* o_ptr = out.data_ptr<acc_t>();
          acc_t* delta_ptr = delta.data_ptr<acc_t>();
          const int64_t Dv = sh.value_dim;
          at::parallel_for(0, delta.numel(), grain_for(Dv), [&](int64_t begin, int64_t end) {
            for (int64_t i = begin; i < end; ++i) {
              acc_t sum = 0;
              for (int64_t d = 0; d < Dv; ++d) sum += do_ptr[i * Dv + d] * o_ptr[i * Dv + d];
              delta_ptr[i] = sum;
            }
          });
          attention_backward_kernel<acc_t, scalar_t>(
              do_ptr, q.data_ptr<acc_t>(), k.data_ptr<acc_t>(), v.data_ptr<acc_t>(), delta_ptr,
              lse.data_ptr<float>(), mask_view<acc_t>(attn_mask), scale, sh, dq_acc.data_ptr<acc_t>(),
              dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>());
        } else {
          dk.zero_();
          dv.zero_();
        }
        dq = same ? dq_acc : dq_acc.to(q_in.scalar_type());
      });
  return {like_input(dq, q_in), like_input(dk, k_in), like_input(dv, v_in)};
}

}  // namespace

TORCH_LIBRARY_IMPL(l2p, CPU, m) {
  m.impl("attention_forward", &attention_forward_cpu);
  m.impl("attention_backward", &attention_backward_cpu);
}

}  // namespace l2p::cpu
