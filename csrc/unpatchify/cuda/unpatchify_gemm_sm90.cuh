// The types of the Hopper fused unpatchify GEMM (unpatchify_gemm_sm90.cu): the image-writing
// epilogue and the CUTLASS kernel built around it. A header of its own so that a host program
// can drive the epilogue over every tile and thread of a problem without a GPU
// (tests/ops/cuda_host/fused_unpatchify_epilogue.cu).
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/detail.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/numeric_conversion.h>

#include <cstdint>

namespace l2p::cuda::unpatchify_sm90 {

using namespace cute;

// Where token m and feature n land in the image; every quantity is an element offset.
// Token and feature indices fit 32 bits (checked by the launcher), so the divisions are 32-bit:
// a 64-bit one is a called subroutine, and a call anywhere in the kernel makes ptxas serialize
// the mainloop's wgmmas (warning C7510).
struct ImageGeometry {
  uint32_t tokens_per_image;  // (H / p) * (W / p)
  uint32_t patch_cols;        // W / p
  int64_t image_stride;       // C * H * W
  int64_t plane;              // H * W
  int64_t width;              // W
  int32_t log2_patch;         // p is a power of two

  static ImageGeometry of(int64_t channels, int64_t height, int64_t width, int64_t patch) {
    int32_t log2_patch = 0;
    while ((int64_t{1} << log2_patch) < patch) ++log2_patch;
    return {static_cast<uint32_t>((height / patch) * (width / patch)),
            static_cast<uint32_t>(width / patch), channels * height * width, height * width,
            width, log2_patch};
  }
};

// A collective epilogue in the shape CUTLASS's DefaultEpilogue has (operator() over the
// accumulators of one output tile), wrapped below in Sm90TmaWarpSpecializedAdapter so the
// warp-specialized kernels take it. It needs no shared memory.
template <class Element>
class ImageEpilogue {
 public:
  using EpilogueSchedule = cutlass::gemm::EpilogueDefault;
  using DispatchPolicy = EpilogueSchedule;
  using ElementOutput = Element;
  using ElementAccumulator = float;
  using ElementCompute = float;
  // The kernel names C and D types and strides; no C is read and D is the image, addressed
  // through ImageGeometry rather than a stride.
  using ElementC = Element;
  using ElementD = Element;
  using StrideC = Stride<int64_t, _1, int64_t>;
  using StrideD = Stride<int64_t, _1, int64_t>;
  using GmemTiledCopyC = void;
  using GmemTiledCopyD = void;
  using ThreadEpilogueOp = void;  // the adapter names one; the work is in operator() below

  struct SharedStorage {};
  using TensorStorage = SharedStorage;

  struct Arguments {
    const Element* bias = nullptr;  // (N,) or nullptr
    Element* image = nullptr;
    ImageGeometry geometry{};
  };
  using Params = Arguments;

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args,
                                                  void*) {
    return args;
  }
  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&) {
    return 0;
  }
  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*,
                                              cudaStream_t,
                                              cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }
  template <class ProblemShape>
  static bool can_implement(ProblemShape const&, Arguments const& args) {
    return args.image != nullptr;
  }

  CUTLASS_HOST_DEVICE
  ImageEpilogue(Params const& params, SharedStorage const& = SharedStorage()) : params_(params) {}

  CUTLASS_HOST_DEVICE bool is_source_needed() { return false; }

  // One thread's share of one output tile. Host-callable too, for the host check of every tile
  // and thread (header comment).
  template <class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL, class FrgEngine,
            class FrgLayout, class TiledMma, class ResidueMNK>
  CUTLASS_HOST_DEVICE void operator()(ProblemShapeMNKL problem_shape_mnkl,
                                      BlockShapeMNK blk_shape_mnk, BlockCoordMNKL blk_coord_mnkl,
                                      cute::Tensor<FrgEngine, FrgLayout> const& accumulators,
                                      TiledMma tiled_mma, ResidueMNK, int thread_idx, char*) {
    static_assert(is_static<BlockShapeMNK>::value, "the tile shape must be static");
    const int64_t M = get<0>(problem_shape_mnkl);
    const int64_t N = get<1>(problem_shape_mnkl);
    const int64_t m0 = int64_t(get<0>(blk_coord_mnkl)) * size<0>(blk_shape_mnk);
    const int64_t n0 = int64_t(get<1>(blk_coord_mnkl)) * size<1>(blk_shape_mnk);

    // The (row, column) inside the tile of every accumulator this thread holds.
    Tensor tile_coords = make_identity_tensor(take<0, 2>(blk_shape_mnk));
    Tensor thread_coords = tiled_mma.get_thread_slice(thread_idx).partition_C(tile_coords);
    CUTE_STATIC_ASSERT_V(size(thread_coords) == size(accumulators));
    static_assert(decltype(size(accumulators))::value % 2 == 0, "accumulators come in pairs");

    const ImageGeometry& g = params_.geometry;
    cutlass::NumericArrayConverter<Element, float, 2> to_output;

    // The bias is read a block of pairs at a time, all of a block's loads before its stores: as far
    // as the compiler knows the image may alias the bias, so a load placed between two stores stays
    // there and waits out its own latency. A block, not the whole tile, so the loaded values fit in
    // registers beside the accumulators (all 64 pairs of a cooperative tile spilled). On the H200
    // this took 4% off the kernel (bench/RESULTS.md).
    constexpr int kPairs = decltype(size(accumulators))::value / 2;
    constexpr int kBlock = kPairs < 16 ? kPairs : 16;
    static_assert(kPairs % kBlock == 0, "pairs come in whole blocks");
    using Pair = cutlass::AlignedArray<Element, 2>;

    int64_t cached_m = -1, token_offset = 0;
    CUTLASS_PRAGMA_UNROLL
    for (int block = 0; block < kPairs; block += kBlock) {
      Pair bias_pairs[kBlock];
      CUTLASS_PRAGMA_UNROLL
      for (int k = 0; k < kBlock; ++k) {
        const int64_t n = n0 + get<1>(thread_coords(2 * (block + k)));
        bias_pairs[k].fill(Element(0.0f));
        if (params_.bias != nullptr && (n & 1) == 0 && n < N) {  // pairs start on even n (below)
          bias_pairs[k] = *reinterpret_cast<const Pair*>(params_.bias + n);
        }
      }
      CUTLASS_PRAGMA_UNROLL
      for (int k = 0; k < kBlock; ++k) {
        const int v = 2 * (block + k);
        const auto first = thread_coords(v);
        const auto second = thread_coords(v + 1);
        const int64_t m = m0 + get<0>(first);
        const int64_t n = n0 + get<1>(first);
        // An even n and the next column of the same row: one 4-byte-aligned word (p is even, so
        // n and n + 1 are neighbours in one patch row, and every pixel offset of n is even).
        const bool pair = (n & 1) == 0 && get<0>(second) == get<0>(first) &&
                          get<1>(second) == get<1>(first) + 1;
        if (!pair) {  // not produced by the sm_90 MMA layouts; kept so another layout stays correct
          store_one(m, n, M, N, accumulators(v));
          store_one(m0 + get<0>(second), n0 + get<1>(second), M, N, accumulators(v + 1));
          continue;
        }
        if (m >= M || n >= N) continue;  // N is even, so n + 1 < N as well
        // The divisions run when the token changes. In the sm_90 MMA layouts a thread's pairs
        // alternate between its two rows (r, r + 8), so that is every pair; keeping the last two
        // tokens' offsets instead cut the kernel's instructions by 27% but timed slower on the
        // H200 (bench/RESULTS.md), so the simple form stays.
        if (m != cached_m) {
          cached_m = m;
          token_offset = token_to_pixel(static_cast<uint32_t>(m), g);
        }
        cutlass::Array<float, 2> values;
        values[0] = accumulators(v) + float(bias_pairs[k][0]);
        values[1] = accumulators(v + 1) + float(bias_pairs[k][1]);
        Pair packed;
        static_cast<cutlass::Array<Element, 2>&>(packed) = to_output(values);
        *reinterpret_cast<Pair*>(params_.image + token_offset + feature_to_pixel(n, g)) = packed;
      }
    }
  }

 private:
  // Offset of the first pixel of token m's patch: (b, 0, row * p, col * p).
  CUTLASS_HOST_DEVICE static int64_t token_to_pixel(uint32_t m, const ImageGeometry& g) {
    const uint32_t b = m / g.tokens_per_image;
    const uint32_t r = m - b * g.tokens_per_image;
    const uint32_t row = r / g.patch_cols;
    const uint32_t col = r - row * g.patch_cols;
    return b * g.image_stride + ((int64_t{row} * g.width + col) << g.log2_patch);
  }

  // Offset of feature n = c*p*p + i*p + j inside its token's patch: (0, c, i, j).
  CUTLASS_HOST_DEVICE static int64_t feature_to_pixel(int64_t n, const ImageGeometry& g) {
    const int64_t patch_mask = (int64_t{1} << g.log2_patch) - 1;
    return (n >> (2 * g.log2_patch)) * g.plane + ((n >> g.log2_patch) & patch_mask) * g.width +
           (n & patch_mask);
  }

  CUTLASS_HOST_DEVICE void store_one(int64_t m, int64_t n, int64_t M, int64_t N, float value) const {
    if (m >= M || n >= N) return;
    if (params_.bias != nullptr) value += float(params_.bias[n]);
    params_.image[token_to_pixel(static_cast<uint32_t>(m), params_.geometry) +
                  feature_to_pixel(n, params_.geometry)] = Element(value);
  }

  Params params_;
};

// Two mainloop schedules (L2P_UNPATCHIFY_FUSED_SCHEDULE); on the H200 at 4096^2, p = 16, neither
// reaches the cuBLAS + fold path, and cooperative was the faster of the two in two of three runs:
// - cooperative: 128 x 256 tiles shared by two consumer warpgroups (64 rows each); a tile's
//   epilogue runs after its mainloop, while the producer warp already loads the next tile.
// - pingpong: 128 x 128 tiles, one per consumer warpgroup, the two taking turns, so one
//   warpgroup's epilogue overlaps the other's mainloop.
// Both: 64-wide K steps, clusters of two tiles along M sharing each weight tile by TMA
// multicast; the stage count fills the shared memory the (empty) epilogue leaves.
struct Cooperative {
  using TileShape = Shape<_128, _256, _64>;
  using ClusterShape = Shape<_2, _1, _1>;
  using Schedule = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
};
struct Pingpong {
  using TileShape = Shape<_128, _128, _64>;
  using ClusterShape = Shape<_2, _1, _1>;
  using Schedule = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
};

template <class Element, class Config>
struct Gemm {
  using TileShape = typename Config::TileShape;
  using Epilogue =
      cutlass::epilogue::collective::detail::Sm90TmaWarpSpecializedAdapter<ImageEpilogue<Element>>;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      Element, cutlass::layout::RowMajor, 8,     // tokens (M, K), K contiguous
      Element, cutlass::layout::ColumnMajor, 8,  // weight as (K, N), K contiguous
      float, TileShape, typename Config::ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      typename Config::Schedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Device = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

}  // namespace l2p::cuda::unpatchify_sm90
