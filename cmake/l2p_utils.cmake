# Helpers for the l2p build: finding torch and turning on CUDA.

# find_package(Torch) and keep only what a torch operator library needs.
macro(l2p_find_torch)
  find_package(Torch REQUIRED)
  # TORCH_CXX_FLAGS carries -D_GLIBCXX_USE_CXX11_ABI=..., which must match libtorch.
  set(CMAKE_CXX_FLAGS "${CMAKE_CXX_FLAGS} ${TORCH_CXX_FLAGS}")
endmacro()

# Turn "8.0;9.0a" (TORCH_CUDA_ARCH_LIST syntax, also "8.0 9.0a" or "8.0+PTX") into
# CMAKE_CUDA_ARCHITECTURES ("80-real;90a-real") and enable the CUDA language.
# A macro, not a function: enable_language() must run at file scope.
macro(l2p_enable_cuda arch_list)
  string(REPLACE " " ";" _archs "${arch_list}")
  set(_cmake_archs "")
  foreach(_arch IN LISTS _archs)
    if(_arch STREQUAL "")
      continue()
    endif()
    set(_ptx OFF)
    if(_arch MATCHES "\\+PTX$")
      set(_ptx ON)
      string(REPLACE "+PTX" "" _arch "${_arch}")
    endif()
    string(REPLACE "." "" _arch "${_arch}")
    if(_ptx)
      list(APPEND _cmake_archs "${_arch}")
    else()
      list(APPEND _cmake_archs "${_arch}-real")
    endif()
  endforeach()
  set(CMAKE_CUDA_ARCHITECTURES "${_cmake_archs}")
  set(CMAKE_CUDA_STANDARD 17)
  enable_language(CUDA)
  find_package(CUDAToolkit REQUIRED)
  message(STATUS "l2p: CUDA architectures ${_cmake_archs}")
endmacro()

# Does libtorch_cpu export the Fortran BLAS (sgemm_/dgemm_) of the BLAS torch was built
# with? If so the CPU kernels call it directly; otherwise they go through at::mm.
function(l2p_check_fortran_blas out_var)
  find_library(_l2p_torch_cpu torch_cpu PATHS "${TORCH_INSTALL_PREFIX}/lib" NO_DEFAULT_PATH)
  if(NOT _l2p_torch_cpu)
    set(${out_var} OFF PARENT_SCOPE)
    return()
  endif()
  include(CheckCXXSourceCompiles)
  set(CMAKE_REQUIRED_LIBRARIES "${_l2p_torch_cpu}")
  check_cxx_source_compiles("
    extern \"C\" void sgemm_(const char*, const char*, const int*, const int*, const int*,
        const float*, const float*, const int*, const float*, const int*, const float*,
        float*, const int*);
    extern \"C\" void dgemm_(const char*, const char*, const int*, const int*, const int*,
        const double*, const double*, const int*, const double*, const int*, const double*,
        double*, const int*);
    int main() { return (sgemm_ != nullptr) + (dgemm_ != nullptr); }" _l2p_has_blas)
  set(${out_var} ${_l2p_has_blas} PARENT_SCOPE)
endfunction()
