// The Python module l2p._C: importing it registers the operators (registration.cpp and the
// kernels' TORCH_LIBRARY_IMPL blocks); it also reports how it was built.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "common/cpu_gemm.h"
#ifdef L2P_WITH_CUDA
#include "unpatchify/cuda/fused_default.h"
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "l2p compiled operators (registered under torch.ops.l2p)";
  m.def("build_info", []() {
    py::dict info;
#ifdef L2P_WITH_CUDA
    info["cuda"] = true;
    info["cuda_archs"] = std::string(L2P_CUDA_ARCHS);
#ifdef L2P_WITH_CUTLASS
    info["cutlass"] = true;
    info["unpatchify_fused_default"] = l2p::cuda::kFusedUnpatchifyByDefault;
#else
    info["cutlass"] = false;
#endif
#else
    info["cuda"] = false;
    info["cuda_archs"] = std::string();
    info["cutlass"] = false;
#endif
    info["cpu_gemm"] = std::string(l2p::cpu::gemm_backend_name());
    info["torch_version"] = std::string(L2P_TORCH_VERSION);
    return info;
  });
}
