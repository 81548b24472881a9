// Host-side checks for kernels that exist only in an sm_90a cubin (wgmma, and the TMA
// warp-specialized CUTLASS mainloop): the build must include 9.0a and the device must be a
// compute capability 9.0 GPU, or the launcher would start the empty sm_80 / sm_90 kernel.
#pragma once

#include <cuda_runtime.h>

namespace l2p::cuda {

// CMake passes the architecture list as L2P_CUDA_ARCHS; a build whose list lacks 9.0a declines.
__host__ constexpr bool built_for_sm90a() {
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

// True on a compute capability 9.0 current device in a build that includes sm_90a.
__host__ inline bool current_device_runs_sm90a() {
  if (!built_for_sm90a()) return false;
  int device = 0, major = 0, minor = 0;
  return cudaGetDevice(&device) == cudaSuccess &&
         cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess &&
         cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) == cudaSuccess &&
         major == 9 && minor == 0;
}

}  // namespace l2p::cuda
