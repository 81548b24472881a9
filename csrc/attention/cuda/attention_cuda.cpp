// Attention on the GPU, the torch-facing side: input checks, allocation, and the one place
// that picks a kernel. bfloat16 / float16 run on the register-resident mma.sync kernels
// (attention_fwd_mma.cu, attention_bwd_mma.cu) for padded head dims 64 / 128 with 16-byte
// rows, otherwise (head dim 256, or not a multiple of 8) on the WMMA kernels
// (attention_fwd_tc.cu, attention_bwd_tc.cu); each when the device has the shared memory for
// it. float32 / float64 (and anything the tensor-core paths decline) run on the CUDA-core
// kernels (attention_simple.cu). On Hopper the wgmma kernels go ahead of them: the forward
// (attention_fwd_wgmma.cu; unmasked, padded head dim 64 / 128) and the backward
// (attention_bwd_wgmma.cu; unmasked, padded head dim 64 / 128). L2P_ATTENTION_WGMMA=0 turns both
// off, L2P_ATTENTION_WGMMA_BACKWARD=0 the backward only.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <limits>
#include <tuple>

#include "attention/cuda/attention_kernels.h"
#include "common/cuda/switches.h"

namespace l2p::cuda {
namespace {

// The mma.sync kernels are the fast paths; false routes their cases to the WMMA kernels.
constexpr bool kUseRegisterForward = true;
constexpr bool kUseRegisterBackward = true;

// The Hopper wgmma kernels are tried first on sm_90 (H200, bench/RESULTS.md: the forward about
// 1.3x the mma.sync forward at N = 4096 / 16384; forward+backward 1.36-1.41x with the wgmma
// backward at head dim 128, 1.06x at 64). L2P_ATTENTION_WGMMA=0 turns both off,
// L2P_ATTENTION_WGMMA_BACKWARD=0 the backward only (common/cuda/switches.h).
bool wgmma_forward_enabled() { return !switched_off("L2P_ATTENTION_WGMMA"); }
bool wgmma_backward_enabled() {
  return wgmma_forward_enabled() && !switched_off("L2P_ATTENTION_WGMMA_BACKWARD");
}

AttentionDType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return AttentionDType::kFloat32;
    case at::kDouble: return AttentionDType::kFloat64;
    case at::kBFloat16: return AttentionDType::kBFloat16;
    case at::kHalf: return AttentionDType::kFloat16;
    default:
      TORCH_CHECK_TYPE(false, "l2p: attention supports float32, float64, bfloat16 and float16, ",
                       "got ", t.scalar_type());
  }
}

void check_same(const at::Tensor& t, const at::Tensor& q, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), "l2p: ", name, " has dtype ",
                   t.scalar_type(), " but q has ", q.scalar_type());
  TORCH_CHECK_VALUE(t.device() == q.device(), "l2p: ", name, " is on ", t.device(),
                    " but q is on ", q.device());
}

// Checks q, k, v and the mask (float32, expanded to (B, Hq, Nq, Nk); the kernels read it
// through its strides, so broadcast dimensions stay zero-stride views); returns the shape the
// kernels see.
AttentionShape check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const c10::optional<at::Tensor>& attn_mask, double scale) {
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
                    "l2p: q, k, v must be (B, H, N, D), got ", q.sizes(), ", ", k.sizes(), ", ",
                    v.sizes());
  TORCH_CHECK_VALUE(q.is_cuda(), "l2p: the CUDA attention kernel got q on ", q.device());
  check_same(k, q, "k");
  check_same(v, q, "v");
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), Dh = q.size(3);
  const int64_t Hk = k.size(1), Nk = k.size(2), Dv = v.size(3);
  TORCH_CHECK_VALUE(k.size(0) == B && v.size(0) == B, "l2p: q, k, v batch sizes differ");
  TORCH_CHECK_VALUE(Hk > 0 && v.size(1) == Hk && Hq % Hk == 0, "l2p: q has ", Hq,
                    " heads and k, v have ", Hk, ", ", v.size(1),
                    "; they must be equal and divide Hq");
  TORCH_CHECK_VALUE(v.size(2) == Nk, "l2p: k has ", Nk, " keys but v has ", v.size(2));
  TORCH_CHECK_VALUE(k.size(3) == Dh, "l2p: q head dim ", Dh, " differs from k head dim ",
                    k.size(3));
  TORCH_CHECK_VALUE(Dh > 0 && Dv > 0 && Dh <= kMaxSimpleHeadDim && Dv <= kMaxSimpleHeadDim,
                    "l2p: head dims must be in 1..", kMaxSimpleHeadDim, ", got ", Dh, " and ",
                    Dv);
  AttentionShape s{};
  s.dtype = dtype_of(q);
  s.batch = B;
  s.q_heads = Hq;
  s.kv_heads = Hk;
  s.q_len = Nq;
  s.kv_len = Nk;
  s.head_dim = Dh;
  s.value_dim = Dv;
  s.scale = scale;
  s.mask = nullptr;
  for (int i = 0; i < 4; ++i) s.mask_stride[i] = 0;
  if (attn_mask.has_value()) {
    const at::Tensor& m = *attn_mask;
    TORCH_CHECK_TYPE(m.scalar_type() == at::kFloat,
                     "l2p: attn_mask must be a float32 additive mask, got ", m.scalar_type());
    TORCH_CHECK_VALUE(m.device() == q.device(), "l2p: attn_mask is on ", m.device(),
                      " but q is on ", q.device());
    const std::array<int64_t, 4> dims{B, Hq, Nq, Nk};
    TORCH_CHECK_VALUE(m.sizes() == at::IntArrayRef(dims), "l2p: attn_mask must be expanded to ",
                      "(B, Hq, Nq, Nk) = ", at::IntArrayRef(dims),
                      " (zero strides are fine), got ", m.sizes());
    s.mask = m.const_data_ptr<float>();
    for (int i = 0; i < 4; ++i) s.mask_stride[i] = m.stride(i);
  }
  return s;
}

// The fake kernels answer empty_like(q) (and k, v) for the gradients; match their strides
// when an input is a non-contiguous view (e.g. (B, N, H, D) transposed).
at::Tensor like(const at::Tensor& result, const at::Tensor& reference) {
  if (result.strides() == reference.strides()) return result;
  at::Tensor r = at::empty_like(reference);
  r.copy_(result);
  return r;
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const c10::optional<at::Tensor>& attn_mask, double scale) {
  const AttentionShape shape = check_inputs(q_in, k_in, v_in, attn_mask, scale);
  const c10::cuda::OptionalCUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  at::Tensor out = at::empty({shape.batch, shape.q_heads, shape.q_len, shape.value_dim},
                             q.options());
  at::Tensor lse = at::empty({shape.batch, shape.q_heads, shape.q_len},
                             q.options().dtype(at::kFloat));
  if (lse.numel() == 0) return {out, lse};
  if (shape.kv_len == 0) {  // nothing to attend to: zeros, as PyTorch gives
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  AttentionForwardArgs args{shape, q.const_data_ptr(), k.const_data_ptr(), v.const_data_ptr(),
                            out.data_ptr(), lse.data_ptr<float>()};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  if (wgmma_forward_enabled() && attention_forward_wgmma_supported(args)) {
    C10_CUDA_CHECK(attention_forward_wgmma(args, stream));
  } else if (kUseRegisterForward && attention_forward_mma_supported(args)) {
    C10_CUDA_CHECK(attention_forward_mma(args, stream));
  } else if (attention_forward_tc_supported(shape)) {
    C10_CUDA_CHECK(attention_forward_tc(args, stream));
  } else {
    C10_CUDA_CHECK(attention_forward_simple(args, stream));
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in,
    const c10::optional<at::Tensor>& attn_mask, double scale) {
  const AttentionShape shape = check_inputs(q_in, k_in, v_in, attn_mask, scale);
  const std::array<int64_t, 4> out_dims{shape.batch, shape.q_heads, shape.q_len,
                                        shape.value_dim};
  const at::IntArrayRef out_shape(out_dims);
  TORCH_CHECK_VALUE(grad_out_in.sizes() == out_shape, "l2p: grad_out must be ", out_shape,
                    ", got ", grad_out_in.sizes());
  TORCH_CHECK_VALUE(out_in.sizes() == out_shape, "l2p: out must be ", out_shape, ", got ",
                    out_in.sizes());
  check_same(grad_out_in, q_in, "grad_out");
  check_same(out_in, q_in, "out");
  const std::array<int64_t, 3> lse_dims{shape.batch, shape.q_heads, shape.q_len};
  TORCH_CHECK_VALUE(lse_in.sizes() == at::IntArrayRef(lse_dims),
                    "l2p: lse must be (B, Hq, Nq) = ", at::IntArrayRef(lse_dims), ", got ",
                    lse_in.sizes());
  TORCH_CHECK_TYPE(lse_in.scalar_type() == at::kFloat, "l2p: lse must be float32");
  TORCH_CHECK_VALUE(lse_in.device() == q_in.device(), "l2p: lse is on ", lse_in.device(),
                    " but q is on ", q_in.device());
  const c10::cuda::OptionalCUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor grad_out = grad_out_in.contiguous(), out = out_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor grad_q = at::empty(q.sizes(), q.options());
  at::Tensor grad_k = at::empty(k.sizes(), k.options());
  at::Tensor grad_v = at::empty(v.sizes(), v.options());
  if (shape.q_len == 0 || shape.kv_len == 0 || shape.batch * shape.q_heads == 0) {
    grad_q.zero_();
    grad_k.zero_();
    grad_v.zero_();
    return {like(grad_q, q_in), like(grad_k, k_in), like(grad_v, v_in)};
  }
  const bool is_double = q.scalar_type() == at::kDouble;
  at::Tensor delta = at::empty({shape.batch, shape.q_heads, shape.q_len},
                               q.options().dtype(is_double ? at::kDouble : at::kFloat));
  AttentionBackwardArgs args{};
  args.shape = shape;
  args.grad_out = grad_out.const_data_ptr();
  args.q = q.const_data_ptr();
  args.k = k.const_data_ptr();
  args.v = v.const_data_ptr();
  args.out = out.const_data_ptr();
  args.lse = lse.const_data_ptr<float>();
  args.delta = delta.data_ptr();
  args.grad_q = grad_q.data_ptr();
  args.grad_k = grad_k.data_ptr();
  args.grad_v = grad_v.data_ptr();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  C10_CUDA_CHECK(attention_backward_delta(args, stream));
  const bool hopper = wgmma_backward_enabled() && attention_backward_wgmma_supported(args);
  const bool mma = !hopper && kUseRegisterBackward && attention_backward_mma_supported(args);
  if (hopper || mma || attention_backward_tc_supported(shape)) {
    // The tensor-core kernels add dQ into an fp32 buffer with atomics.
    at::Tensor grad_q_accum = at::zeros(q.sizes(), q.options().dtype(at::kFloat));
    args.grad_q_accum = grad_q_accum.data_ptr<float>();
    const cudaError_t err = hopper ? attention_backward_wgmma(args, stream)
                            : mma  ? attention_backward_mma(args, stream)
                                   : attention_backward_tc(args, stream);
    C10_CUDA_CHECK(err);
    grad_q.copy_(grad_q_accum);
  } else {
    C10_CUDA_CHECK(attention_backward_simple(args, stream));
  }
  return {like(grad_q, q_in), like(grad_k, k_in), like(grad_v, v_in)};
}

}  // namespace

TORCH_LIBRARY_IMPL(l2p, CUDA, m) {
  m.impl("attention_forward", &attention_forward_cuda);
  m.impl("attention_backward", &attention_backward_cuda);
}

}  // namespace l2p::cuda
