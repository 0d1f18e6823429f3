// The label-smoothed cross-entropy of a block of logits and its gradient, one pass per row on
// the CPU. With p = softmax(x) and the reference token y of a row it gives
//
//   lse = log sum_v exp(x_v)        (so log p_y = x_y - lse)
//   P = p - (1 - eps) onehot(y)     (the gradient wrt x, but for the uniform part -eps / V)
//
// which is what nmt/loss.py's fused projection and loss make of a block with log_softmax,
// gather, exp and scatter, in four passes over the (rows, V) block and two casts.

#include <limits>
#include <vector>

#include "rows.h"

namespace nmt_native {

// logits (N, V) float32, bfloat16 or float16; target (N,) long, columns of the logits.
// Returns lse (N,) float32, x_y (N,) float32 (the target's logit, as the logits hold it) and,
// where with_grad, P (N, V) in grad_dtype (else an empty tensor), written into grad_out where
// that is given (contiguous, (N, V), of grad_dtype).
std::vector<at::Tensor> smoothed_nll_forward(at::Tensor logits, at::Tensor target,
                                             double smoothing, bool with_grad,
                                             c10::ScalarType grad_dtype,
                                             c10::optional<at::Tensor> grad_out) {
  logits = logits.contiguous();
  target = target.to(at::kLong).contiguous();
  TORCH_CHECK(logits.dim() == 2 && target.dim() == 1 && target.size(0) == logits.size(0),
              "smoothed_nll: logits must be (N, V) and target (N,)");
  const int64_t rows = logits.size(0), width = logits.size(1);
  auto f32 = logits.options().dtype(at::kFloat);
  auto lse = at::empty({rows}, f32);
  auto logit_y = at::empty({rows}, f32);
  at::Tensor grad = with_grad
                        ? output_rows(grad_out, rows, width, f32.dtype(grad_dtype),
                                      "smoothed_nll: grad_out")
                        : at::empty({0}, f32);
  const int64_t* tgt = target.data_ptr<int64_t>();
  const float on_target = static_cast<float>(1.0 - smoothing);
  at::parallel_for(0, rows, grain(rows), [&](int64_t begin, int64_t end) {
    std::vector<float> x(width);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t y = tgt[b];
      TORCH_CHECK(y >= 0 && y < width, "smoothed_nll: target ", y, " out of range for ",
                  width, " columns");
      load_row(logits, b, x.data());
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < width; ++j) top = std::max(top, x[j]);
      logit_y.data_ptr<float>()[b] = x[y];
      float sum = 0.f;
      for (int64_t j = 0; j < width; ++j) {
        x[j] = std::exp(x[j] - top);
        sum += x[j];
      }
      lse.data_ptr<float>()[b] = top + std::log(sum);
      if (!with_grad) continue;
      const float scale = 1.f / sum;
      for (int64_t j = 0; j < width; ++j) x[j] *= scale;
      x[y] -= on_target;
      store_row(x.data(), grad, b);
    }
  });
  return {lse, logit_y, grad};
}

}  // namespace nmt_native
