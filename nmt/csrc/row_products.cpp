// Row-by-row products of the input-feeding decoder's attention, one per batch row: a row vector
// times that row's own matrix, as `baddbmm(base, x.unsqueeze(1), M)` does, which on the CPU runs
// these (1, K) x (K, N) products several times slower than the memory they read allows. The
// matrix is read once, in its dtype, with float32 sums:
//
//   transposed = false:  y_b = base_b + x_b M_b      M_b = stored_b (K, N): y = sum_k x_k M_k
//   transposed = true:   y_b = base_b + x_b M_b^T    M_b = stored_b (N, K): y_n = x . M_n
//
// so that keys (B, S, H) give the scores h K^T and their gradient g K, and values (B, S, H) the
// context a V and its gradient g V^T, each without a transposed copy.

#include <vector>

#include "rows.h"

namespace nmt_native {

namespace {

template <typename T>
void row_products_typed(const at::Tensor& x, const at::Tensor& stored,
                        const c10::optional<at::Tensor>& base, bool transposed, at::Tensor& out) {
  const int64_t rows = stored.size(0), r = stored.size(1), c = stored.size(2);
  const int64_t k = transposed ? c : r, n = transposed ? r : c;
  const T* m_all = stored.data_ptr<T>();
  at::parallel_for(0, rows, grain(rows), [&](int64_t begin, int64_t end) {
    std::vector<float> xrow(k), yrow(n), mrow(c);
    float* __restrict xv = xrow.data();
    float* __restrict yv = yrow.data();
    float* __restrict mv = mrow.data();
    for (int64_t b = begin; b < end; ++b) {
      load_row(x, b, xv);
      if (base.has_value()) {
        load_row(*base, b, yv);
      } else {
        for (int64_t j = 0; j < n; ++j) yv[j] = 0.f;
      }
      const T* m = m_all + b * r * c;
      for (int64_t i = 0; i < r; ++i) {
        load_n(m + i * c, c, mv);
        if (transposed) {  // y_i += x . M_i
          float dot = 0.f;
          for (int64_t j = 0; j < c; ++j) dot += xv[j] * mv[j];
          yv[i] += dot;
        } else {  // y += x_i M_i
          const float xi = xv[i];
          for (int64_t j = 0; j < c; ++j) yv[j] += xi * mv[j];
        }
      }
      store_row(yv, out, b);
    }
  });
}

}  // namespace

// x (B, K); stored (B, R, C) contiguous; base (B, N) or None. Returns y (B, N) in out_dtype,
// with (K, N) = (R, C), or (C, R) where transposed.
at::Tensor row_products(at::Tensor x, at::Tensor stored, c10::optional<at::Tensor> base,
                        bool transposed, c10::ScalarType out_dtype) {
  x = x.contiguous();
  stored = stored.contiguous();
  TORCH_CHECK(stored.dim() == 3 && x.dim() == 2 && x.size(0) == stored.size(0),
              "row_products: x must be (B, K) and the matrices (B, R, C)");
  const int64_t rows = stored.size(0);
  const int64_t k = transposed ? stored.size(2) : stored.size(1);
  const int64_t n = transposed ? stored.size(1) : stored.size(2);
  TORCH_CHECK(x.size(1) == k, "row_products: x has ", x.size(1), " columns, the matrices ", k);
  c10::optional<at::Tensor> b;
  if (base.has_value()) {
    TORCH_CHECK(base->dim() == 2 && base->size(0) == rows && base->size(1) == n,
                "row_products: base must be (B, N)");
    b = base->contiguous();
  }
  auto out = at::empty({rows, n}, x.options().dtype(out_dtype));
  switch (stored.scalar_type()) {
    case at::kFloat:
      row_products_typed<float>(x, stored, b, transposed, out);
      break;
    case at::kBFloat16:
      row_products_typed<at::BFloat16>(x, stored, b, transposed, out);
      break;
    case at::kHalf:
      row_products_typed<at::Half>(x, stored, b, transposed, out);
      break;
    default:
      TORCH_CHECK(false, "row_products: unsupported dtype ", stored.scalar_type());
  }
  return out;
}

}  // namespace nmt_native
