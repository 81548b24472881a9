// Whether unpatchify takes the Hopper fused GEMM (unpatchify_gemm_sm90.cu) when
// L2P_UNPATCHIFY_FUSED is unset. Off: on an H200 it passes its tests but runs at 0.79-0.92x
// torch's Linear + permute, where the cuBLAS + fold path runs at 1.08-1.10x (bench/RESULTS.md);
// turn it on here once it beats that path. Read by the launcher and by build_info, so that
// `l2p info` reports what the build does.
#pragma once

namespace l2p::cuda {

constexpr bool kFusedUnpatchifyByDefault = false;

}  // namespace l2p::cuda
