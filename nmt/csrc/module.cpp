// The Python module of the C++ kernels (nmt/native.py builds and loads it).

#include <torch/extension.h>

#include <vector>

namespace nmt_native {

std::vector<at::Tensor> ln_lstm_forward(at::Tensor a, at::Tensor hh, at::Tensor c_prev,
                                        at::Tensor gain_h, at::Tensor gain_c, at::Tensor bias_c,
                                        c10::ScalarType out_dtype,
                                        c10::optional<at::Tensor> gain_a,
                                        c10::optional<at::Tensor> bias_a);
std::vector<at::Tensor> ln_lstm_backward(at::Tensor dh, at::Tensor dc, at::Tensor c_prev,
                                         at::Tensor c, at::Tensor act, at::Tensor tc,
                                         at::Tensor stats, at::Tensor hh, at::Tensor gain_h,
                                         at::Tensor gain_c, c10::ScalarType da_dtype,
                                         c10::ScalarType dhh_dtype, c10::optional<at::Tensor> a,
                                         c10::optional<at::Tensor> gain_a);
std::vector<at::Tensor> lstm_forward(at::Tensor gates, at::Tensor c_prev,
                                     c10::ScalarType out_dtype, c10::optional<at::Tensor> h_out);
std::vector<at::Tensor> lstm_backward(at::Tensor dh, at::Tensor dc, at::Tensor c_prev,
                                      at::Tensor act, at::Tensor tc, c10::ScalarType da_dtype,
                                      c10::optional<at::Tensor> dh_more,
                                      c10::optional<at::Tensor> da_out);
std::vector<at::Tensor> smoothed_nll_forward(at::Tensor logits, at::Tensor target,
                                             double smoothing, bool with_grad,
                                             c10::ScalarType grad_dtype,
                                             c10::optional<at::Tensor> grad_out);
at::Tensor row_products(at::Tensor x, at::Tensor stored, c10::optional<at::Tensor> base,
                        bool transposed, c10::ScalarType out_dtype);
at::Tensor keep_mask(std::vector<int64_t> shape, int64_t seed, int64_t threshold, double scale,
                     c10::ScalarType dtype);

}  // namespace nmt_native

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace nmt_native;
  m.def("ln_lstm_forward", &ln_lstm_forward, "layer-normalised LSTM step, forward", py::arg("a"),
        py::arg("hh"), py::arg("c_prev"), py::arg("gain_h"), py::arg("gain_c"), py::arg("bias_c"),
        py::arg("out_dtype"), py::arg("gain_a") = py::none(), py::arg("bias_a") = py::none());
  m.def("ln_lstm_backward", &ln_lstm_backward, "layer-normalised LSTM step, backward",
        py::arg("dh"), py::arg("dc"), py::arg("c_prev"), py::arg("c"), py::arg("act"),
        py::arg("tc"), py::arg("stats"), py::arg("hh"), py::arg("gain_h"), py::arg("gain_c"),
        py::arg("da_dtype"), py::arg("dhh_dtype"), py::arg("a") = py::none(),
        py::arg("gain_a") = py::none());
  m.def("lstm_forward", &lstm_forward, "LSTM step (nn.LSTM's gate math), forward",
        py::arg("gates"), py::arg("c_prev"), py::arg("out_dtype"), py::arg("h_out") = py::none());
  m.def("lstm_backward", &lstm_backward, "LSTM step (nn.LSTM's gate math), backward",
        py::arg("dh"), py::arg("dc"), py::arg("c_prev"), py::arg("act"), py::arg("tc"),
        py::arg("da_dtype"), py::arg("dh_more") = py::none(), py::arg("da_out") = py::none());
  m.def("smoothed_nll_forward", &smoothed_nll_forward,
        "log-sum-exp, target logit and p - (1 - eps) onehot(y) of a block of logits",
        py::arg("logits"), py::arg("target"), py::arg("smoothing"), py::arg("with_grad"),
        py::arg("grad_dtype"), py::arg("grad_out") = py::none());
  m.def("row_products", &row_products,
        "base + x M (or x M^T) with one matrix per batch row, float32 sums", py::arg("x"),
        py::arg("stored"), py::arg("base"), py::arg("transposed"), py::arg("out_dtype"));
  m.def("keep_mask", &keep_mask,
        "dropout's scaled keep-mask from a counter-based generator (SplitMix64) and a seed",
        py::arg("shape"), py::arg("seed"), py::arg("threshold"), py::arg("scale"),
        py::arg("dtype"));
}
