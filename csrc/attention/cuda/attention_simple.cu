// Attention on CUDA cores, for every dtype (float64 and float32 above all) and head dims up to
// 256: one warp per row, each lane holding head-dim elements lane, lane+32, ..., and the keys
// streamed one at a time with an online softmax (forward) or against the saved logsumexp
// (backward). Accumulation is in double for float64 and in float otherwise. Simple and exact
// rather than fast; the tensor-core kernels carry the half-precision work.
#include <cmath>
#include <type_traits>

#include "attention/cuda/attention_common.cuh"

namespace l2p::cuda {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kSlots = static_cast<int>(kMaxSimpleHeadDim) / 32;

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

template <typename A>
__device__ __forceinline__ A load_as(double x) { return static_cast<A>(x); }
template <typename A>
__device__ __forceinline__ A load_as(float x) { return static_cast<A>(x); }
template <typename A>
__device__ __forceinline__ A load_as(__half x) { return static_cast<A>(__half2float(x)); }
template <typename A>
__device__ __forceinline__ A load_as(__nv_bfloat16 x) {
  return static_cast<A>(__bfloat162float(x));
}

template <typename T, typename A>
__device__ __forceinline__ T store_as(A x) {
  if constexpr (std::is_same_v<T, double> || std::is_same_v<T, float>) {
    return static_cast<T>(x);
  } else {
    return attn::from_float<T>(static_cast<float>(x));
  }
}

__device__ __forceinline__ float exp_of(float x) { return expf(x); }
__device__ __forceinline__ double exp_of(double x) { return exp(x); }
__device__ __forceinline__ float log_of(float x) { return logf(x); }
__device__ __forceinline__ double log_of(double x) { return log(x); }

// Sum over the warp; a butterfly, so every lane ends with the same (bitwise) value.
template <typename A>
__device__ __forceinline__ A warp_sum(A x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Row `row` of a (rows, dim) matrix into the lane's slots (zero past dim).
template <typename A, typename T>
__device__ __forceinline__ void load_row(A (&dst)[kSlots], const T* row, int dim, int lane) {
#pragma unroll
  for (int t = 0; t < kSlots; ++t) {
    const int d = lane + 32 * t;
    dst[t] = d < dim ? load_as<A>(row[d]) : A(0);
  }
}

template <typename A, typename T>
__device__ __forceinline__ A dot_row(const A (&x)[kSlots], const T* row, int dim, int lane) {
  A s = 0;
#pragma unroll
  for (int t = 0; t < kSlots; ++t) {
    const int d = lane + 32 * t;
    if (d < dim) s += x[t] * load_as<A>(row[d]);
  }
  return warp_sum(s);
}

template <typename T, typename A>
__device__ __forceinline__ void store_row(T* row, const A (&x)[kSlots], A factor, int dim,
                                          int lane) {
#pragma unroll
  for (int t = 0; t < kSlots; ++t) {
    const int d = lane + 32 * t;
    if (d < dim) row[d] = store_as<T>(x[t] * factor);
  }
}

template <typename T>
struct SimpleParams {
  const T *q, *k, *v, *out, *grad_out;
  T* dst0;  // forward: out; backward: grad_q (dq kernel) or grad_k (dk/dv kernel)
  T* dst1;  // backward dk/dv kernel: grad_v
  float* lse_out;
  const float* lse;
  void* delta;
  attn::MaskView mask;
  int64_t q_heads, kv_heads, group, q_len, kv_len, head_offset;
  int head_dim, value_dim;
  double scale;
};

template <typename T>
__global__ void __launch_bounds__(128) attention_fwd_simple_kernel(const SimpleParams<T> p) {
  using A = typename AccOf<T>::type;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bh = p.head_offset + blockIdx.y;
  const int64_t qi = int64_t(blockIdx.x) * kWarpsPerBlock + warp;
  if (qi >= p.q_len) return;
  const int64_t b = bh / p.q_heads, h = bh - b * p.q_heads;
  const int64_t kvh = b * p.kv_heads + h / p.group;
  const T* k = p.k + kvh * p.kv_len * p.head_dim;
  const T* v = p.v + kvh * p.kv_len * p.value_dim;
  const float* mask_row = p.mask.row(b, h, qi);
  const A scale = static_cast<A>(p.scale);
  A q[kSlots], o[kSlots];
  load_row(q, p.q + (bh * p.q_len + qi) * p.head_dim, p.head_dim, lane);
#pragma unroll
  for (int t = 0; t < kSlots; ++t) o[t] = 0;
  A m = -INFINITY, l = 0;
  for (int64_t j = 0; j < p.kv_len; ++j) {
    A s = dot_row(q, k + j * p.head_dim, p.head_dim, lane) * scale;
    if (mask_row != nullptr) s += static_cast<A>(mask_row[j * p.mask.s3]);
    if (s == A(-INFINITY)) continue;  // the same on every lane
    const A m_new = s > m ? s : m;
    const A alpha = exp_of(m - m_new);
    const A e = exp_of(s - m_new);
    l = l * alpha + e;
    const T* v_row = v + j * p.value_dim;
#pragma unroll
    for (int t = 0; t < kSlots; ++t) {
      const int d = lane + 32 * t;
      if (d < p.value_dim) o[t] = o[t] * alpha + e * load_as<A>(v_row[d]);
    }
    m = m_new;
  }
  store_row(p.dst0 + (bh * p.q_len + qi) * p.value_dim, o, l > 0 ? A(1) / l : A(0),
            p.value_dim, lane);
  if (lane == 0) {
    p.lse_out[bh * p.q_len + qi] = l > 0 ? static_cast<float>(m + log_of(l)) : -INFINITY;
  }
}

// delta[row] = sum_d grad_out[row, d] * out[row, d], one warp per row.
template <typename T>
__global__ void __launch_bounds__(128) attention_delta_kernel(const SimpleParams<T> p) {
  using A = typename AccOf<T>::type;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bh = p.head_offset + blockIdx.y;
  const int64_t qi = int64_t(blockIdx.x) * kWarpsPerBlock + warp;
  if (qi >= p.q_len) return;
  const int64_t row = bh * p.q_len + qi;
  A go[kSlots];
  load_row(go, p.grad_out + row * p.value_dim, p.value_dim, lane);
  const A d = dot_row(go, p.out + row * p.value_dim, p.value_dim, lane);
  if (lane == 0) static_cast<A*>(p.delta)[row] = d;
}

// dQ for one query row: sum_j dS_ij k_j * scale with dS_ij = P_ij (dO_i . v_j - delta_i).
template <typename T>
__global__ void __launch_bounds__(128) attention_dq_simple_kernel(const SimpleParams<T> p) {
  using A = typename AccOf<T>::type;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bh = p.head_offset + blockIdx.y;
  const int64_t qi = int64_t(blockIdx.x) * kWarpsPerBlock + warp;
  if (qi >= p.q_len) return;
  const int64_t b = bh / p.q_heads, h = bh - b * p.q_heads;
  const int64_t kvh = b * p.kv_heads + h / p.group;
  const int64_t row = bh * p.q_len + qi;
  const T* k = p.k + kvh * p.kv_len * p.head_dim;
  const T* v = p.v + kvh * p.kv_len * p.value_dim;
  const float* mask_row = p.mask.row(b, h, qi);
  const A scale = static_cast<A>(p.scale);
  const A lse = static_cast<A>(p.lse[row]);
  const A delta = static_cast<const A*>(p.delta)[row];
  A q[kSlots], go[kSlots], dq[kSlots];
  load_row(q, p.q + row * p.head_dim, p.head_dim, lane);
  load_row(go, p.grad_out + row * p.value_dim, p.value_dim, lane);
#pragma unroll
  for (int t = 0; t < kSlots; ++t) dq[t] = 0;
  if (lse != A(-INFINITY)) {  // a row that attends to nothing has no gradient
    for (int64_t j = 0; j < p.kv_len; ++j) {
      const T* k_row = k + j * p.head_dim;
      A s = dot_row(q, k_row, p.head_dim, lane) * scale;
      if (mask_row != nullptr) s += static_cast<A>(mask_row[j * p.mask.s3]);
      if (s == A(-INFINITY)) continue;
      const A prob = exp_of(s - lse);
      const A ds = prob * (dot_row(go, v + j * p.value_dim, p.value_dim, lane) - delta);
#pragma unroll
      for (int t = 0; t < kSlots; ++t) {
        const int d = lane + 32 * t;
        if (d < p.head_dim) dq[t] += ds * load_as<A>(k_row[d]);
      }
    }
  }
  store_row(p.dst0 + row * p.head_dim, dq, scale, p.head_dim, lane);
}

// dK and dV for one key row, summed over every query row of every query head of its group.
template <typename T>
__global__ void __launch_bounds__(128) attention_dkdv_simple_kernel(const SimpleParams<T> p) {
  using A = typename AccOf<T>::type;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bkv = p.head_offset + blockIdx.y;
  const int64_t j = int64_t(blockIdx.x) * kWarpsPerBlock + warp;
  if (j >= p.kv_len) return;
  const int64_t b = bkv / p.kv_heads, hk = bkv - b * p.kv_heads;
  const A scale = static_cast<A>(p.scale);
  A k[kSlots], v[kSlots], dk[kSlots], dv[kSlots];
  load_row(k, p.k + (bkv * p.kv_len + j) * p.head_dim, p.head_dim, lane);
  load_row(v, p.v + (bkv * p.kv_len + j) * p.value_dim, p.value_dim, lane);
#pragma unroll
  for (int t = 0; t < kSlots; ++t) dk[t] = dv[t] = 0;
  for (int64_t g = 0; g < p.group; ++g) {
    const int64_t h = hk * p.group + g;
    const int64_t bh = b * p.q_heads + h;
    for (int64_t i = 0; i < p.q_len; ++i) {
      const int64_t row = bh * p.q_len + i;
      const A lse = static_cast<A>(p.lse[row]);
      if (lse == A(-INFINITY)) continue;
      const T* q_row = p.q + row * p.head_dim;
      const T* go_row = p.grad_out + row * p.value_dim;
      A s = dot_row(k, q_row, p.head_dim, lane) * scale;
      const float* mask_row = p.mask.row(b, h, i);
      if (mask_row != nullptr) s += static_cast<A>(mask_row[j * p.mask.s3]);
      if (s == A(-INFINITY)) continue;
      const A prob = exp_of(s - lse);
      const A ds = prob * (dot_row(v, go_row, p.value_dim, lane) -
                           static_cast<const A*>(p.delta)[row]);
#pragma unroll
      for (int t = 0; t < kSlots; ++t) {
        const int d = lane + 32 * t;
        if (d < p.value_dim) dv[t] += prob * load_as<A>(go_row[d]);
        if (d < p.head_dim) dk[t] += ds * load_as<A>(q_row[d]);
      }
    }
  }
  store_row(p.dst0 + (bkv * p.kv_len + j) * p.head_dim, dk, scale, p.head_dim, lane);
  store_row(p.dst1 + (bkv * p.kv_len + j) * p.value_dim, dv, A(1), p.value_dim, lane);
}

template <typename T>
SimpleParams<T> make_params(const AttentionShape& s) {
  SimpleParams<T> p{};
  attn::set_sizes(p, s);
  p.mask = attn::MaskView::of(s);
  p.scale = s.scale;
  return p;
}

// One warp per row: `rows` rows for each of `heads` heads; gridDim.y is at most 65535, so
// heads go in slices.
template <typename T>
cudaError_t launch_rows(void (*kernel)(const SimpleParams<T>), SimpleParams<T> p, int64_t rows,
                        int64_t heads, cudaStream_t stream) {
  if (rows <= 0 || heads <= 0) return cudaSuccess;
  const int64_t row_blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (row_blocks >= (int64_t{1} << 31)) return cudaErrorInvalidConfiguration;
  return attn::launch_over_heads(kernel, p, row_blocks, heads, kWarpsPerBlock * 32, 0, stream);
}

template <typename T>
cudaError_t forward(const AttentionForwardArgs& args, cudaStream_t stream) {
  const AttentionShape& s = args.shape;
  SimpleParams<T> p = make_params<T>(s);
  p.q = static_cast<const T*>(args.q);
  p.k = static_cast<const T*>(args.k);
  p.v = static_cast<const T*>(args.v);
  p.dst0 = static_cast<T*>(args.out);
  p.lse_out = args.lse;
  return launch_rows<T>(attention_fwd_simple_kernel<T>, p, s.q_len, s.batch * s.q_heads, stream);
}

template <typename T>
SimpleParams<T> backward_params(const AttentionBackwardArgs& args) {
  SimpleParams<T> p = make_params<T>(args.shape);
  p.q = static_cast<const T*>(args.q);
  p.k = static_cast<const T*>(args.k);
  p.v = static_cast<const T*>(args.v);
  p.out = static_cast<const T*>(args.out);
  p.grad_out = static_cast<const T*>(args.grad_out);
  p.lse = args.lse;
  p.delta = args.delta;
  return p;
}

template <typename T>
cudaError_t delta(const AttentionBackwardArgs& args, cudaStream_t stream) {
  const AttentionShape& s = args.shape;
  return launch_rows<T>(attention_delta_kernel<T>, backward_params<T>(args), s.q_len,
                        s.batch * s.q_heads, stream);
}

template <typename T>
cudaError_t backward(const AttentionBackwardArgs& args, cudaStream_t stream) {
  const AttentionShape& s = args.shape;
  SimpleParams<T> p = backward_params<T>(args);
  p.dst0 = static_cast<T*>(args.grad_q);
  cudaError_t err =
      launch_rows<T>(attention_dq_simple_kernel<T>, p, s.q_len, s.batch * s.q_heads, stream);
  if (err != cudaSuccess) return err;
  p.dst0 = static_cast<T*>(args.grad_k);
  p.dst1 = static_cast<T*>(args.grad_v);
  return launch_rows<T>(attention_dkdv_simple_kernel<T>, p, s.kv_len, s.batch * s.kv_heads,
                        stream);
}

// f(attn::Type<T>{}) for the element type T of `dtype`.
template <typename F>
cudaError_t dispatch_dtype(AttentionDType dtype, F&& f) {
  switch (dtype) {
    case AttentionDType::kFloat32: return f(attn::Type<float>{});
    case AttentionDType::kFloat64: return f(attn::Type<double>{});
    case AttentionDType::kBFloat16: return f(attn::Type<__nv_bfloat16>{});
    case AttentionDType::kFloat16: return f(attn::Type<__half>{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t attention_forward_simple(const AttentionForwardArgs& args, cudaStream_t stream) {
  if (args.shape.head_dim > kMaxSimpleHeadDim || args.shape.value_dim > kMaxSimpleHeadDim) {
    return cudaErrorInvalidValue;
  }
  return dispatch_dtype(args.shape.dtype, [&](auto type) {
    return forward<typename decltype(type)::type>(args, stream);
  });
}

cudaError_t attention_backward_simple(const AttentionBackwardArgs& args, cudaStream_t stream) {
  if (args.shape.head_dim > kMaxSimpleHeadDim || args.shape.value_dim > kMaxSimpleHeadDim) {
    return cudaErrorInvalidValue;
  }
  return dispatch_dtype(args.shape.dtype, [&](auto type) {
    return backward<typename decltype(type)::type>(args, stream);
  });
}

cudaError_t attention_backward_delta(const AttentionBackwardArgs& args, cudaStream_t stream) {
  return dispatch_dtype(args.shape.dtype, [&](auto type) {
    return delta<typename decltype(type)::type>(args, stream);
  });
}

}  // namespace l2p::cuda
