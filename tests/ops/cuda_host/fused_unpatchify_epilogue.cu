// Host check of the Hopper fused unpatchify's epilogue (csrc/unpatchify/cuda/
// unpatchify_gemm_sm90.cuh), no GPU needed: for every output tile of a problem and every
// thread of the kernel's TiledMma, the thread's accumulator fragment is filled with the exact
// values the GEMM would give, Y[m, n] = m * N + n + 1 (integers, exact in float), and the
// epilogue itself is called as the kernel calls it. The image must then hold, at pixel
// (b, c, y, x), Y[token, feature] + bias[feature] for token b*T + (y/p)*(W/p) + x/p and feature
// c*p*p + (y%p)*p + x%p (unpatchify's definition), every pixel written exactly once; and the
// fragment layout must put each accumulator pair on neighbouring columns, the case the
// epilogue stores as one word. Run for float (every value exact) and bfloat16 (the image must
// hold the expected values rounded to nearest even, as the epilogue's one rounding gives).
//
// Both mainloop schedules (their TiledMmas differ: two warpgroups over a 128 x 256 tile, or one
// over 128 x 128).
//
//   fused_unpatchify_epilogue float|bf16 cooperative|pingpong B C H W p with_bias
//   (prints "ok" or the first mismatch)
#include <cutlass/bfloat16.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "unpatchify/cuda/unpatchify_gemm_sm90.cuh"

using namespace cute;
namespace fu = l2p::cuda::unpatchify_sm90;

template <class Element, class Config>
int check(int64_t B, int64_t C, int64_t H, int64_t W, int64_t p, bool with_bias) {
  const int64_t T = (H / p) * (W / p), M = B * T, N = C * p * p;
  using Gemm = fu::Gemm<Element, Config>;
  using TiledMma = typename Gemm::Mainloop::TiledMma;
  using TileShape = typename Gemm::TileShape;
  using Epilogue = fu::ImageEpilogue<Element>;
  constexpr int kTileM = size<0>(TileShape{}), kTileN = size<1>(TileShape{});
  const int threads = size(TiledMma{});

  std::vector<Element> bias(N), image(B * C * H * W, Element(-1.0f));
  std::vector<int> writes(image.size(), 0);
  for (int64_t n = 0; n < N; ++n) bias[n] = Element(with_bias ? float(3 * n % 17) : 0.0f);
  typename Epilogue::Params params{with_bias ? bias.data() : nullptr, image.data(),
                                   fu::ImageGeometry::of(C, H, W, p)};
  Epilogue epilogue(params);
  const auto problem = make_shape(int(M), int(N), 64, 1);

  long pairs = 0, singles = 0;
  std::vector<int> covered(kTileM * kTileN);
  for (int t = 0; t < threads; ++t) {  // the fragment layout, once per thread
    auto coords = TiledMma{}.get_thread_slice(t).partition_C(
        make_identity_tensor(take<0, 2>(TileShape{})));
    for (int v = 0; v < size(coords); ++v) covered[get<0>(coords(v)) * kTileN + get<1>(coords(v))]++;
    for (int v = 0; v + 1 < size(coords); v += 2) {
      const bool pair = get<0>(coords(v)) == get<0>(coords(v + 1)) &&
                        get<1>(coords(v + 1)) == get<1>(coords(v)) + 1 && get<1>(coords(v)) % 2 == 0;
      pair ? ++pairs : ++singles;
    }
  }
  for (int i = 0; i < kTileM * kTileN; ++i) {
    if (covered[i] != 1) {
      std::printf("tile element (%d, %d) held by %d threads\n", i / kTileN, i % kTileN, covered[i]);
      return 1;
    }
  }
  if (singles != 0) {
    std::printf("%ld accumulator pairs are not neighbouring columns\n", singles);
    return 1;
  }

  for (int64_t tm = 0; tm * kTileM < M; ++tm) {
    for (int64_t tn = 0; tn * kTileN < N; ++tn) {
      for (int t = 0; t < threads; ++t) {
        auto mma = TiledMma{}.get_thread_slice(t);
        auto coords = mma.partition_C(make_identity_tensor(take<0, 2>(TileShape{})));
        auto accumulators = partition_fragment_C(TiledMma{}, take<0, 2>(TileShape{}));
        for (int v = 0; v < size(accumulators); ++v) {
          const int64_t m = tm * kTileM + get<0>(coords(v)), n = tn * kTileN + get<1>(coords(v));
          accumulators(v) = (m < M && n < N) ? float(m * N + n + 1) : 1e30f;  // never stored
        }
        // Count the pixels this call writes by diffing a snapshot (the epilogue writes in place).
        std::vector<Element> before = image;
        epilogue(problem, TileShape{}, make_coord(int(tm), int(tn), 0, 0), accumulators,
                 TiledMma{}, make_tuple(0, 0, 0), t, nullptr);
        for (size_t i = 0; i < image.size(); ++i) writes[i] += image[i] != before[i];
      }
    }
  }

  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t y = 0; y < H; ++y)
        for (int64_t x = 0; x < W; ++x) {
          const int64_t token = b * T + (y / p) * (W / p) + x / p;
          const int64_t feature = c * p * p + (y % p) * p + x % p;
          const Element want = Element(float(token * N + feature + 1) + float(bias[feature]));
          const int64_t i = ((b * C + c) * H + y) * W + x;
          if (!(image[i] == want) || writes[i] != 1) {
            std::printf("pixel (%lld, %lld, %lld, %lld): %g written %d times, want %g once\n",
                        (long long)b, (long long)c, (long long)y, (long long)x, float(image[i]),
                        writes[i], float(want));
            return 1;
          }
        }
  std::printf("ok: %lld pixels, %ld accumulator pairs per tile\n", (long long)image.size(), pairs);
  return 0;
}

int main(int argc, char** argv) {
  if (argc != 9) {
    std::fprintf(stderr, "usage: %s float|bf16 cooperative|pingpong B C H W p with_bias\n", argv[0]);
    return 2;
  }
  const int64_t B = std::atoll(argv[3]), C = std::atoll(argv[4]), H = std::atoll(argv[5]),
                W = std::atoll(argv[6]), p = std::atoll(argv[7]);
  const bool with_bias = std::atoi(argv[8]) != 0;
  const bool bf16 = std::string(argv[1]) == "bf16";
  if (std::string(argv[2]) == "pingpong") {
    return bf16 ? check<cutlass::bfloat16_t, fu::Pingpong>(B, C, H, W, p, with_bias)
                : check<float, fu::Pingpong>(B, C, H, W, p, with_bias);
  }
  return bf16 ? check<cutlass::bfloat16_t, fu::Cooperative>(B, C, H, W, p, with_bias)
              : check<float, fu::Cooperative>(B, C, H, W, p, with_bias);
}
