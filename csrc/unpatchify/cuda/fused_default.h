// Whether unpatchify takes the Hopper fused GEMM (unpatchify_gemm_sm90.cu) when
// L2P_UNPATCHIFY_FUSED is unset. Off until a GPU pass has run its tests and timed it against
// the cuBLAS + fold path: it is compiled (and checked by CI's nvcc pass and a host check of its
// epilogue) but has not yet run on a GPU. Read by the launcher and by build_info, so that
// `l2p info` reports what the build does.
#pragma once

namespace l2p::cuda {

constexpr bool kFusedUnpatchifyByDefault = false;

}  // namespace l2p::cuda
