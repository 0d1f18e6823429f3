// One step of the layer-normalised LSTM (Ba et al. 2016, sec. 6), forward and backward, each
// one pass over the batch's rows on the CPU:
//
//   gates = a + LN(hh; gain_h)          a = LN(x W_ih^T) + b, hh = h_{t-1} W_hh^T
//                                       (or a = x W_ih^T, normalised here with gain_a, bias_a)
//   i, f, o = sigmoid(gates), g = tanh(gates)
//   c_t = f * c_{t-1} + i * g
//   h_t = o * tanh(LN(c_t; gain_c, bias_c))
//
// The same math as nmt/model/cells.py's `_ln_fwd` / `_ln_bwd` (which the tests hold it to),
// with the casts, both layer norms, the gate math and the gains' gradients in one loop per row
// instead of some thirty kernels per step. Rows run in parallel; inputs and outputs may be
// float32, bfloat16 or float16, the math is float32.

#include <cmath>
#include <vector>

#include "rows.h"

namespace {

constexpr float kEps = 1e-5f;

// Mean and 1 / sqrt(variance + eps) of n floats (two passes, as PyTorch's layer norm).
void row_stats(const float* x, int64_t n, float* mean, float* rstd) {
  float sum = 0.f;
  for (int64_t j = 0; j < n; ++j) sum += x[j];
  const float m = sum / static_cast<float>(n);
  float sq = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    const float d = x[j] - m;
    sq += d * d;
  }
  *mean = m;
  *rstd = 1.f / std::sqrt(sq / static_cast<float>(n) + kEps);
}

// The layer norm's input gradient from the gradient `dy` of y = xhat * gain (gain folded into
// dy by the caller): rstd * (dy - mean(dy) - xhat * mean(dy * xhat)), written to dx.
void ln_input_grad(const float* dy, const float* xhat, float rstd, int64_t n, float* dx) {
  float s1 = 0.f, s2 = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    s1 += dy[j];
    s2 += dy[j] * xhat[j];
  }
  const float m1 = s1 / static_cast<float>(n), m2 = s2 / static_cast<float>(n);
  for (int64_t j = 0; j < n; ++j) dx[j] = rstd * (dy[j] - m1 - xhat[j] * m2);
}

}  // namespace

namespace nmt_native {

// Returns h (B, H) in out_dtype, c (B, H) float32, and for the backward: act (B, 4H) the gate
// activations (sigmoid for i, f, o; tanh for g), tc (B, H) = tanh(LN(c)), stats (B, 6) = mean
// and rstd of hh, of c and of a (where a is normalised here: gain_a and bias_a given).
std::vector<at::Tensor> ln_lstm_forward(at::Tensor a, at::Tensor hh, at::Tensor c_prev,
                                           at::Tensor gain_h, at::Tensor gain_c,
                                           at::Tensor bias_c, c10::ScalarType out_dtype,
                                           c10::optional<at::Tensor> gain_a,
                                           c10::optional<at::Tensor> bias_a) {
  a = a.contiguous();
  hh = hh.contiguous();
  c_prev = c_prev.to(at::kFloat).contiguous();
  gain_h = gain_h.to(at::kFloat).contiguous();
  gain_c = gain_c.to(at::kFloat).contiguous();
  bias_c = bias_c.to(at::kFloat).contiguous();
  const int64_t rows = c_prev.size(0), width = c_prev.size(1), gates = 4 * width;
  TORCH_CHECK(a.size(0) == rows && a.size(1) == gates && hh.sizes() == a.sizes(),
              "ln_lstm: a and hh must be (B, 4H) for c_prev (B, H)");
  auto f32 = c_prev.options();
  auto h = at::empty({rows, width}, f32.dtype(out_dtype));
  auto c = at::empty({rows, width}, f32);
  auto act = at::empty({rows, gates}, f32);
  auto tc = at::empty({rows, width}, f32);
  auto stats = at::zeros({rows, 6}, f32);
  const bool norm_a = gain_a.has_value();
  TORCH_CHECK(norm_a == bias_a.has_value(), "ln_lstm: gain_a and bias_a go together");
  at::Tensor ga = norm_a ? gain_a->to(at::kFloat).contiguous() : gain_h;
  at::Tensor ba = norm_a ? bias_a->to(at::kFloat).contiguous() : gain_h;
  const float* gh = gain_h.data_ptr<float>();
  const float* gc = gain_c.data_ptr<float>();
  const float* bc = bias_c.data_ptr<float>();
  at::parallel_for(0, rows, grain(rows), [&](int64_t begin, int64_t end) {
    std::vector<float> x(gates), pre(gates), hrow(width);
    for (int64_t b = begin; b < end; ++b) {
      float* st = stats.data_ptr<float>() + 6 * b;
      load_row(hh, b, x.data());
      row_stats(x.data(), gates, &st[0], &st[1]);
      load_row(a, b, pre.data());
      if (norm_a) {  // a = LN(x W_ih^T) * gain_a + bias_a
        row_stats(pre.data(), gates, &st[4], &st[5]);
        const float ma = st[4], ra = st[5];
        const float *g = ga.data_ptr<float>(), *bias = ba.data_ptr<float>();
        for (int64_t j = 0; j < gates; ++j) pre[j] = (pre[j] - ma) * ra * g[j] + bias[j];
      }
      const float mh = st[0], rh = st[1];
      float* s = act.data_ptr<float>() + b * gates;
      for (int64_t j = 0; j < gates; ++j) s[j] = pre[j] + (x[j] - mh) * rh * gh[j];
      for (int64_t j = 0; j < 2 * width; ++j) s[j] = sigmoid(s[j]);
      for (int64_t j = 2 * width; j < 3 * width; ++j) s[j] = std::tanh(s[j]);
      for (int64_t j = 3 * width; j < gates; ++j) s[j] = sigmoid(s[j]);
      const float* cp = c_prev.data_ptr<float>() + b * width;
      float* cb = c.data_ptr<float>() + b * width;
      for (int64_t j = 0; j < width; ++j)
        cb[j] = s[width + j] * cp[j] + s[j] * s[2 * width + j];
      row_stats(cb, width, &st[2], &st[3]);
      const float mc = st[2], rc = st[3];
      float* t = tc.data_ptr<float>() + b * width;
      for (int64_t j = 0; j < width; ++j) {
        t[j] = std::tanh((cb[j] - mc) * rc * gc[j] + bc[j]);
        hrow[j] = s[3 * width + j] * t[j];
      }
      store_row(hrow.data(), h, b);
    }
  });
  return {h, c, act, tc, stats};
}

// The backward of `ln_lstm_forward` given dh (B, H) and dc = dL/dc_t from later steps (B, H).
// Returns dA (B, 4H) in da_dtype (the gradient of a: of the input product itself where a was
// normalised in the forward, given here with gain_a), dc_{t-1} (B, H) float32, d(hh) (B, 4H) in
// dhh_dtype, and the step's gradients of gain_h (4H), gain_c (H) and bias_c (H), float32, then
// of gain_a and bias_a (4H each) where a was normalised.
std::vector<at::Tensor> ln_lstm_backward(at::Tensor dh, at::Tensor dc,
                                            at::Tensor c_prev, at::Tensor c,
                                            at::Tensor act, at::Tensor tc,
                                            at::Tensor stats, at::Tensor hh,
                                            at::Tensor gain_h, at::Tensor gain_c,
                                            c10::ScalarType da_dtype, c10::ScalarType dhh_dtype,
                                            c10::optional<at::Tensor> a,
                                            c10::optional<at::Tensor> gain_a) {
  dh = dh.contiguous();
  dc = dc.to(at::kFloat).contiguous();
  hh = hh.contiguous();
  gain_h = gain_h.to(at::kFloat).contiguous();
  gain_c = gain_c.to(at::kFloat).contiguous();
  const int64_t rows = c.size(0), width = c.size(1), gates = 4 * width;
  auto f32 = c.options();
  auto da = at::empty({rows, gates}, f32.dtype(da_dtype));
  auto dhh = at::empty({rows, gates}, f32.dtype(dhh_dtype));
  auto dc_prev = at::empty({rows, width}, f32);
  const bool norm_a = gain_a.has_value();
  TORCH_CHECK(norm_a == a.has_value(), "ln_lstm: a and gain_a go together");
  at::Tensor a_in = norm_a ? a->contiguous() : hh;
  at::Tensor ga = norm_a ? gain_a->to(at::kFloat).contiguous() : gain_h;
  // the gains' gradients are sums over rows: one partial sum per thread, added up below
  const int64_t threads = at::get_num_threads();
  const int64_t sums_width = gates + 2 * width + (norm_a ? 2 * gates : 0);
  auto partial = at::zeros({threads, sums_width}, f32);
  const float* gh = gain_h.data_ptr<float>();
  const float* gc = gain_c.data_ptr<float>();
  at::parallel_for(0, rows, grain(rows), [&](int64_t begin, int64_t end) {
    std::vector<float> d_out(width), chat(width), dy(width), dct(width);
    std::vector<float> dgate(gates), xhat(gates), dyh(gates), dx(gates);
    float* acc = partial.data_ptr<float>() + at::get_thread_num() * sums_width;
    float *acc_gh = acc, *acc_gc = acc + gates, *acc_bc = acc + gates + width;
    float *acc_ga = acc_bc + width, *acc_ba = acc_ga + gates;
    for (int64_t b = begin; b < end; ++b) {
      const float* st = stats.data_ptr<float>() + 6 * b;
      const float* s = act.data_ptr<float>() + b * gates;
      const float* t = tc.data_ptr<float>() + b * width;
      const float* cb = c.data_ptr<float>() + b * width;
      const float* cp = c_prev.data_ptr<float>() + b * width;
      const float* dcb = dc.data_ptr<float>() + b * width;
      load_row(dh, b, d_out.data());
      // h = o * tanh(LN(c)): through o, and through LN(c) to c
      const float mc = st[2], rc = st[3];
      for (int64_t j = 0; j < width; ++j) {
        const float o = s[3 * width + j];
        dgate[3 * width + j] = d_out[j] * t[j] * o * (1.f - o);
        const float d_norm = d_out[j] * o * (1.f - t[j] * t[j]);  // d(LN(c) gain + bias)
        chat[j] = (cb[j] - mc) * rc;
        acc_gc[j] += d_norm * chat[j];
        acc_bc[j] += d_norm;
        dy[j] = d_norm * gc[j];
      }
      ln_input_grad(dy.data(), chat.data(), rc, width, dct.data());
      float* dcp = dc_prev.data_ptr<float>() + b * width;
      for (int64_t j = 0; j < width; ++j) {
        const float d = dcb[j] + dct[j];  // dL/dc_t in full
        const float i = s[j], f = s[width + j], g = s[2 * width + j];
        dgate[j] = d * g * i * (1.f - i);
        dgate[width + j] = d * cp[j] * f * (1.f - f);
        dgate[2 * width + j] = d * i * (1.f - g * g);
        dcp[j] = d * f;
      }
      if (norm_a) {  // through a = LN(x W_ih^T) * gain_a + bias_a to the input product
        load_row(a_in, b, xhat.data());
        const float ma = st[4], ra = st[5];
        const float* g = ga.data_ptr<float>();
        for (int64_t j = 0; j < gates; ++j) {
          xhat[j] = (xhat[j] - ma) * ra;
          acc_ga[j] += dgate[j] * xhat[j];
          acc_ba[j] += dgate[j];
          dyh[j] = dgate[j] * g[j];
        }
        ln_input_grad(dyh.data(), xhat.data(), ra, gates, dx.data());
        store_row(dx.data(), da, b);
      } else {
        store_row(dgate.data(), da, b);
      }
      // gates = a + LN(hh) gain_h: dA is also the gradient of LN(hh)'s output
      load_row(hh, b, xhat.data());
      const float mh = st[0], rh = st[1];
      for (int64_t j = 0; j < gates; ++j) {
        xhat[j] = (xhat[j] - mh) * rh;
        acc_gh[j] += dgate[j] * xhat[j];
        dyh[j] = dgate[j] * gh[j];
      }
      ln_input_grad(dyh.data(), xhat.data(), rh, gates, dx.data());
      store_row(dx.data(), dhh, b);
    }
  });
  auto sums = partial.sum(0);
  std::vector<at::Tensor> grads = {da, dc_prev, dhh, sums.slice(0, 0, gates),
                                      sums.slice(0, gates, gates + width),
                                      sums.slice(0, gates + width, gates + 2 * width)};
  if (norm_a) {
    const int64_t start = gates + 2 * width;
    grads.push_back(sums.slice(0, start, start + gates));
    grads.push_back(sums.slice(0, start + gates, start + 2 * gates));
  }
  return grads;
}

}  // namespace nmt_native
