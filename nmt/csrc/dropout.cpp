// Dropout's scaled keep-mask from a counter-based generator: one 64-bit SplitMix64 output per
// four elements, each element kept when its 16-bit slice, read as int16, clears the threshold.
// The output of word w depends only on (seed, w), so the mask is the same for any number of
// threads, and the seed comes from PyTorch's generator (nmt/model/dropout.py).

#include "rows.h"

#include <cstdint>

namespace nmt_native {

namespace {

constexpr uint64_t kGamma = 0x9e3779b97f4a7c15ULL;  // SplitMix64's increment

inline uint64_t splitmix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

template <typename T>
void fill_mask(T* out, int64_t n, uint64_t seed, int16_t threshold, float scale) {
  const T keep = static_cast<T>(scale);
  const T drop = static_cast<T>(0.f);
  const int64_t words = n / 4;
  at::parallel_for(0, words, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const uint64_t bits = splitmix64(seed + static_cast<uint64_t>(w + 1) * kGamma);
      T* o = out + 4 * w;
      for (int j = 0; j < 4; ++j) {
        const auto v = static_cast<int16_t>(static_cast<uint16_t>(bits >> (16 * j)));
        o[j] = v >= threshold ? keep : drop;
      }
    }
  });
  if (n % 4) {  // the last word, partly used
    const uint64_t bits = splitmix64(seed + static_cast<uint64_t>(words + 1) * kGamma);
    for (int64_t j = 0; j < n % 4; ++j) {
      const auto v = static_cast<int16_t>(static_cast<uint16_t>(bits >> (16 * j)));
      out[4 * words + j] = v >= threshold ? keep : drop;
    }
  }
}

}  // namespace

at::Tensor keep_mask(std::vector<int64_t> shape, int64_t seed, int64_t threshold, double scale,
                     c10::ScalarType dtype) {
  TORCH_CHECK(threshold >= -32768 && threshold <= 32767, "keep_mask: threshold out of int16");
  auto out = at::empty(shape, at::TensorOptions().dtype(dtype));
  const int64_t n = out.numel();
  const auto s = static_cast<uint64_t>(seed);
  const auto thr = static_cast<int16_t>(threshold);
  const auto sc = static_cast<float>(scale);
  switch (dtype) {
    case at::kFloat:
      fill_mask(out.data_ptr<float>(), n, s, thr, sc);
      break;
    case at::kBFloat16:
      fill_mask(out.data_ptr<at::BFloat16>(), n, s, thr, sc);
      break;
    case at::kHalf:
      fill_mask(out.data_ptr<at::Half>(), n, s, thr, sc);
      break;
    default:
      TORCH_CHECK(false, "keep_mask: unsupported dtype ", dtype);
  }
  return out;
}

}  // namespace nmt_native
