// Row access shared by the kernels: a row of a contiguous 2-D tensor in float32, bfloat16 or
// float16 read into / written from a float buffer, and the threads' grain.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

namespace nmt_native {

// Copies n values starting at `src` (of the tensor's dtype) into `dst` as floats.
template <typename T>
inline void load_n(const T* src, int64_t n, float* dst) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}

template <typename T>
inline void store_n(const float* src, int64_t n, T* dst) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<T>(src[j]);
}

// Copies row `row` of a contiguous 2-D tensor into `dst` as floats.
inline void load_row(const at::Tensor& t, int64_t row, float* dst) {
  const int64_t n = t.size(1);
  switch (t.scalar_type()) {
    case at::kFloat:
      load_n(t.data_ptr<float>() + row * n, n, dst);
      break;
    case at::kBFloat16:
      load_n(t.data_ptr<at::BFloat16>() + row * n, n, dst);
      break;
    case at::kHalf:
      load_n(t.data_ptr<at::Half>() + row * n, n, dst);
      break;
    default:
      TORCH_CHECK(false, "nmt kernels: unsupported dtype ", t.scalar_type());
  }
}

// Writes `src` (n floats) to row `row` of a contiguous 2-D tensor, rounding to its dtype.
inline void store_row(const float* src, at::Tensor& t, int64_t row) {
  const int64_t n = t.size(1);
  switch (t.scalar_type()) {
    case at::kFloat:
      store_n(src, n, t.data_ptr<float>() + row * n);
      break;
    case at::kBFloat16:
      store_n(src, n, t.data_ptr<at::BFloat16>() + row * n);
      break;
    case at::kHalf:
      store_n(src, n, t.data_ptr<at::Half>() + row * n);
      break;
    default:
      TORCH_CHECK(false, "nmt kernels: unsupported dtype ", t.scalar_type());
  }
}

// The (rows, n) tensor a kernel writes its result into: the caller's `out` where given (checked
// to be contiguous, of that shape and of options' dtype), else a new one.
inline at::Tensor output_rows(const c10::optional<at::Tensor>& out, int64_t rows, int64_t n,
                              const at::TensorOptions& options, const char* what) {
  if (!out.has_value()) return at::empty({rows, n}, options);
  const at::Tensor& t = *out;
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == n && t.is_contiguous() &&
                  t.scalar_type() == options.dtype(),
              what, " must be a contiguous (", rows, ", ", n, ") tensor of ",
              options.dtype().name());
  return t;
}

inline float sigmoid(float x) { return 1.f / (1.f + std::exp(-x)); }

// Enough rows per task that a task is worth starting, all threads busy on large batches.
inline int64_t grain(int64_t rows) {
  return std::max<int64_t>(1, rows / std::max(1, at::get_num_threads()));
}

}  // namespace nmt_native
