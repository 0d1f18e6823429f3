// One step of nn.LSTM's gate math, forward and backward, each one pass over the batch's rows on
// the CPU (gate order i, f, g, o as nn.LSTM's):
//
//   i, f, o = sigmoid(gates), g = tanh(gates)    gates = x W_ih^T + h_{t-1} W_hh^T + b
//   c_t = f * c_{t-1} + i * g
//   h_t = o * tanh(c_t)
//
// The same math as nmt/model/cells.py's `_lstm_fwd` / `_lstm_bwd` (which the tests hold it to):
// the casts and the gate math of a step in one loop per row instead of some fifteen kernels
// forward and as many backward. Rows run in parallel; gates, h and their gradients may be
// float32, bfloat16 or float16, the math and the cell state are float32.

#include <vector>

#include "rows.h"

namespace nmt_native {

// Returns h (B, H) in out_dtype (written into h_out where given), c (B, H) float32, and for the
// backward act (B, 4H) float32, the gate activations (sigmoid for i, f, o; tanh for g), and
// tc (B, H) = tanh(c).
std::vector<at::Tensor> lstm_forward(at::Tensor gates, at::Tensor c_prev,
                                     c10::ScalarType out_dtype,
                                     c10::optional<at::Tensor> h_out) {
  gates = gates.contiguous();
  c_prev = c_prev.to(at::kFloat).contiguous();
  const int64_t rows = c_prev.size(0), width = c_prev.size(1), n_gates = 4 * width;
  TORCH_CHECK(gates.dim() == 2 && gates.size(0) == rows && gates.size(1) == n_gates,
              "lstm: gates must be (B, 4H) for c_prev (B, H)");
  auto f32 = c_prev.options();
  auto h = output_rows(h_out, rows, width, f32.dtype(out_dtype), "lstm: h_out");
  auto c = at::empty({rows, width}, f32);
  auto act = at::empty({rows, n_gates}, f32);
  auto tc = at::empty({rows, width}, f32);
  const float* cp_all = c_prev.data_ptr<float>();
  float* c_all = c.data_ptr<float>();
  float* act_all = act.data_ptr<float>();
  float* tc_all = tc.data_ptr<float>();
  at::parallel_for(0, rows, grain(rows), [&](int64_t begin, int64_t end) {
    const int64_t width = c_prev.size(1), n_gates = 4 * width;  // locals: not re-read per store
    std::vector<float> hrow(width);
    float* __restrict hr = hrow.data();
    for (int64_t b = begin; b < end; ++b) {
      float* __restrict s = act_all + b * n_gates;
      const float* __restrict cp = cp_all + b * width;
      float* __restrict cb = c_all + b * width;
      float* __restrict t = tc_all + b * width;
      load_row(gates, b, s);
      for (int64_t j = 0; j < 2 * width; ++j) s[j] = sigmoid(s[j]);
      for (int64_t j = 2 * width; j < 3 * width; ++j) s[j] = std::tanh(s[j]);
      for (int64_t j = 3 * width; j < n_gates; ++j) s[j] = sigmoid(s[j]);
      for (int64_t j = 0; j < width; ++j) cb[j] = s[width + j] * cp[j] + s[j] * s[2 * width + j];
      for (int64_t j = 0; j < width; ++j) t[j] = std::tanh(cb[j]);
      for (int64_t j = 0; j < width; ++j) hr[j] = s[3 * width + j] * t[j];
      store_row(hr, h, b);
    }
  });
  return {h, c, act, tc};
}

// The backward of `lstm_forward` given dh (B, H), plus dh_more (B, H) where given, and dc =
// dL/dc_t from later steps (B, H). Returns dA (B, 4H), the gradient of the gates, in da_dtype
// (written into da_out where given) and dc_{t-1} (B, H) float32.
std::vector<at::Tensor> lstm_backward(at::Tensor dh, at::Tensor dc, at::Tensor c_prev,
                                      at::Tensor act, at::Tensor tc, c10::ScalarType da_dtype,
                                      c10::optional<at::Tensor> dh_more,
                                      c10::optional<at::Tensor> da_out) {
  dh = dh.contiguous();
  at::Tensor more = dh_more.has_value() ? dh_more->contiguous() : at::Tensor();
  TORCH_CHECK(!more.defined() || more.sizes() == dh.sizes(), "lstm: dh_more must be shaped as dh");
  dc = dc.to(at::kFloat).contiguous();
  c_prev = c_prev.to(at::kFloat).contiguous();
  act = act.contiguous();
  tc = tc.contiguous();
  const int64_t rows = c_prev.size(0), width = c_prev.size(1), n_gates = 4 * width;
  auto f32 = c_prev.options();
  auto da = output_rows(da_out, rows, n_gates, f32.dtype(da_dtype), "lstm: da_out");
  auto dc_prev = at::empty({rows, width}, f32);
  const float* act_all = act.data_ptr<float>();
  const float* tc_all = tc.data_ptr<float>();
  const float* cp_all = c_prev.data_ptr<float>();
  const float* dc_all = dc.data_ptr<float>();
  float* dcp_all = dc_prev.data_ptr<float>();
  at::parallel_for(0, rows, grain(rows), [&](int64_t begin, int64_t end) {
    const int64_t width = c_prev.size(1), n_gates = 4 * width;  // locals: not re-read per store
    std::vector<float> d_out(width), d_more(more.defined() ? width : 0), dgate(n_gates);
    float* __restrict dout = d_out.data();
    float* __restrict dm = d_more.data();
    float* __restrict dg = dgate.data();
    for (int64_t b = begin; b < end; ++b) {
      const float* __restrict s = act_all + b * n_gates;
      const float* __restrict t = tc_all + b * width;
      const float* __restrict cp = cp_all + b * width;
      const float* __restrict dcb = dc_all + b * width;
      float* __restrict dcp = dcp_all + b * width;
      load_row(dh, b, dout);
      if (more.defined()) {
        load_row(more, b, dm);
        for (int64_t j = 0; j < width; ++j) dout[j] += dm[j];
      }
      // one pointer per gate: the vectoriser does not split s[j], s[width + j], ... itself
      const float *__restrict si = s, *__restrict sf = s + width;
      const float *__restrict sg = s + 2 * width, *__restrict so = s + 3 * width;
      float *__restrict di = dg, *__restrict df = dg + width;
      float *__restrict dgg = dg + 2 * width, *__restrict d_o = dg + 3 * width;
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) {
        const float i = si[j], f = sf[j], g = sg[j], o = so[j];
        const float d = dcb[j] + dout[j] * o * (1.f - t[j] * t[j]);  // dL/dc_t in full
        di[j] = d * g * i * (1.f - i);
        df[j] = d * cp[j] * f * (1.f - f);
        dgg[j] = d * i * (1.f - g * g);
        d_o[j] = dout[j] * t[j] * o * (1.f - o);
        dcp[j] = d * f;
      }
      store_row(dg, da, b);
    }
  });
  return {da, dc_prev};
}

}  // namespace nmt_native
