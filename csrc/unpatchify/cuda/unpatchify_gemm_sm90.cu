// Un-patchify on Hopper as one GEMM whose epilogue writes the image.
//
// The general CUDA path (unpatchify_cuda.cpp) projects tokens with cuBLAS into a scratch
// (tokens, C*p*p) matrix and folds it into the image with a copy kernel: at 4096^2, p = 16,
// D = 3072 on an H200 the fold is 0.08 ms of 0.51, one more read and write of the whole image.
// Here the product tokens (M = B*N, K = D) x weight^T (K, N = C*p*p) runs on CUTLASS's sm_90
// TMA warp-specialized mainloop, and the epilogue (ours) adds the bias and stores accumulator
// (token m, feature n) straight to its pixel: feature n = c*p*p + i*p + j of token
// m = (b, row, col) is pixel (b, c, row*p + i, col*p + j). Features n and n + 1 of a
// thread's accumulator pair are neighbouring pixels of one patch row (p even), stored as one
// 32-bit word; a warp's stores cover whole 32-byte sectors of an image row once both halves of
// a patch row are written, so the image goes to memory once, as the scratch matrix did.
#include "unpatchify/cuda/unpatchify_gemm_sm90.h"

#include <cutlass/bfloat16.h>
#include <cutlass/half.h>
#include <cutlass/kernel_hardware_info.h>

#include "common/cuda/sm90.h"
#include "unpatchify/cuda/unpatchify_gemm_sm90.cuh"

namespace l2p::cuda {
namespace {

using unpatchify_sm90::ImageEpilogue;
using unpatchify_sm90::ImageGeometry;
template <class Element, class Config>
using FusedGemm = typename unpatchify_sm90::Gemm<Element, Config>::Device;

template <class Element, class Config>
typename FusedGemm<Element, Config>::Arguments make_arguments(const FusedUnpatchify& p) {
  using Gemm = FusedGemm<Element, Config>;
  using StrideA = typename Gemm::GemmKernel::StrideA;
  using StrideB = typename Gemm::GemmKernel::StrideB;
  const int64_t tokens_per_image = (p.height / p.patch) * (p.width / p.patch);
  const int M = static_cast<int>(p.batch * tokens_per_image);
  const int N = static_cast<int>(p.channels * p.patch * p.patch);
  const int K = static_cast<int>(p.dim);

  static int sm_count[64] = {};  // per device, queried once
  int device = 0;
  cudaGetDevice(&device);
  cutlass::KernelHardwareInfo hw_info;
  hw_info.device_id = device;
  if (device < 64) {
    if (sm_count[device] == 0) {
      sm_count[device] = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
    }
    hw_info.sm_count = sm_count[device];
  } else {
    hw_info.sm_count = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
  }

  typename ImageEpilogue<Element>::Arguments epilogue;
  epilogue.bias = static_cast<const Element*>(p.bias);
  epilogue.image = static_cast<Element*>(p.image);
  epilogue.geometry = ImageGeometry::of(p.channels, p.height, p.width, p.patch);
  return typename Gemm::Arguments{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {M, N, K, 1},
      {static_cast<const Element*>(p.tokens), StrideA{int64_t{K}, cute::_1{}, int64_t{M} * K},
       static_cast<const Element*>(p.weight), StrideB{int64_t{K}, cute::_1{}, int64_t{N} * K}},
      epilogue,
      hw_info};
}

bool shape_supported(const FusedUnpatchify& p) {
  const bool power_of_two = p.patch >= 2 && (p.patch & (p.patch - 1)) == 0;
  const int64_t tokens = p.patch > 0 ? p.batch * (p.height / p.patch) * (p.width / p.patch) : 0;
  const int64_t features = p.channels * p.patch * p.patch;
  return power_of_two && p.height % p.patch == 0 && p.width % p.patch == 0 && tokens > 0 &&
         p.channels > 0 && p.dim > 0 && p.dim % 8 == 0 && tokens < (int64_t(1) << 31) &&
         features < (int64_t(1) << 31) && p.dim < (int64_t(1) << 31) &&
         reinterpret_cast<uintptr_t>(p.tokens) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(p.weight) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(p.image) % 4 == 0 &&
         (p.bias == nullptr || reinterpret_cast<uintptr_t>(p.bias) % 4 == 0);  // read in pairs
}

// The three host calls for one dtype and schedule.
template <class Element, class Config>
struct Launch {
  static bool implementable(const FusedUnpatchify& p) {
    return FusedGemm<Element, Config>::can_implement(make_arguments<Element, Config>(p)) ==
           cutlass::Status::kSuccess;
  }

  static size_t workspace_bytes(const FusedUnpatchify& p) {
    return FusedGemm<Element, Config>::get_workspace_size(make_arguments<Element, Config>(p));
  }

  static cudaError_t run(const FusedUnpatchify& p, void* workspace, cudaStream_t stream) {
    FusedGemm<Element, Config> gemm;
    const auto args = make_arguments<Element, Config>(p);
    if (gemm.initialize(args, workspace, stream) != cutlass::Status::kSuccess) {
      return cudaErrorNotSupported;
    }
    if (gemm.run(stream) != cutlass::Status::kSuccess) {
      const cudaError_t error = cudaGetLastError();
      return error != cudaSuccess ? error : cudaErrorLaunchFailure;
    }
    return cudaGetLastError();
  }
};

// fn(Launch<Element, Config>{}) for the problem's dtype and schedule.
template <class Fn>
auto dispatch(const FusedUnpatchify& p, Fn&& fn) {
  using unpatchify_sm90::Cooperative;
  using unpatchify_sm90::Pingpong;
  const bool pingpong = p.schedule == FusedUnpatchifySchedule::kPingpong;
  if (p.half) {
    return pingpong ? fn(Launch<cutlass::half_t, Pingpong>{})
                    : fn(Launch<cutlass::half_t, Cooperative>{});
  }
  return pingpong ? fn(Launch<cutlass::bfloat16_t, Pingpong>{})
                  : fn(Launch<cutlass::bfloat16_t, Cooperative>{});
}

}  // namespace

bool fused_unpatchify_supported(const FusedUnpatchify& problem) {
  if (!shape_supported(problem) || !current_device_runs_sm90a()) return false;
  return dispatch(problem, [&](auto launch) { return decltype(launch)::implementable(problem); });
}

size_t fused_unpatchify_workspace_bytes(const FusedUnpatchify& problem) {
  if (!shape_supported(problem)) return 0;
  return dispatch(problem, [&](auto launch) { return decltype(launch)::workspace_bytes(problem); });
}

cudaError_t fused_unpatchify(const FusedUnpatchify& problem, void* workspace,
                             cudaStream_t stream) {
  if (!fused_unpatchify_supported(problem)) return cudaErrorNotSupported;
  return dispatch(problem, [&](auto launch) {
    return decltype(launch)::run(problem, workspace, stream);
  });
}

}  // namespace l2p::cuda
