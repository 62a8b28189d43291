// Fused element-wise operators of the decode step (CPU, float32): each replaces a chain of paddle ops whose
// per-op dispatch costs more than the arithmetic at decode sizes (a 576-wide RMSNorm is five paddle ops).
//
//   llm_rms_norm(X [..., D], W [D], eps) -> [..., D]   rsqrt(mean(x^2) + eps) * x * w   (paddlenlp's op order)
//   llm_swiglu(X [..., 2I])              -> [..., I]   silu(x[:I]) * x[I:]
#include <cmath>
#include <vector>

#include "paddle/extension.h"

using paddle::DataType;

namespace {

int64_t rows_of(const std::vector<int64_t>& shape) {
  int64_t m = 1;
  for (size_t i = 0; i + 1 < shape.size(); ++i) m *= shape[i];
  return m;
}

void check_f32(const paddle::Tensor& t, const char* op, const char* what) {
  PD_CHECK(t.is_cpu(), op, ": ", what, " must be a CPU tensor");
  PD_CHECK(t.dtype() == DataType::FLOAT32, op, ": ", what, " must be float32");
}

std::vector<paddle::Tensor> RmsNorm(const paddle::Tensor& x, const paddle::Tensor& w, const float& eps) {
  const char* op = "llm_rms_norm";
  check_f32(x, op, "x");
  check_f32(w, op, "w");
  const auto shape = x.shape();
  PD_CHECK(!shape.empty(), op, ": x must have at least one dimension");
  const int64_t d = shape.back(), m = rows_of(shape);
  PD_CHECK(w.numel() == d, op, ": w has ", w.numel(), " elements but x has D=", d);
  auto out = paddle::empty(shape, DataType::FLOAT32, paddle::CPUPlace());
  const float* xp = x.data<float>();
  const float* wp = w.data<float>();
  float* yp = out.data<float>();
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = xp + r * d;
    float* yr = yp + r * d;
    float ss = 0.0f;
    for (int64_t i = 0; i < d; ++i) ss += xr[i] * xr[i];
    const float inv = 1.0f / std::sqrt(ss / float(d) + eps);
    for (int64_t i = 0; i < d; ++i) yr[i] = inv * xr[i] * wp[i];
  }
  return {out};
}

std::vector<paddle::Tensor> Swiglu(const paddle::Tensor& x) {
  const char* op = "llm_swiglu";
  check_f32(x, op, "x");
  auto shape = x.shape();
  PD_CHECK(!shape.empty() && shape.back() % 2 == 0, op, ": the last dimension of x must be even ([gate | up])");
  const int64_t n = shape.back() / 2, m = rows_of(shape);
  shape.back() = n;
  auto out = paddle::empty(shape, DataType::FLOAT32, paddle::CPUPlace());
  const float* xp = x.data<float>();
  float* yp = out.data<float>();
  for (int64_t r = 0; r < m; ++r) {
    const float* g = xp + r * 2 * n;
    const float* u = g + n;
    float* y = yp + r * n;
    for (int64_t i = 0; i < n; ++i) y[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
  }
  return {out};
}

std::vector<std::vector<int64_t>> SameShape(const std::vector<int64_t>& x, const std::vector<int64_t>&) {
  return {x};
}
std::vector<std::vector<int64_t>> HalfLast(const std::vector<int64_t>& x) {
  std::vector<int64_t> s = x;
  if (!s.empty() && s.back() > 0) s.back() /= 2;
  return {s};
}
std::vector<DataType> F32Of2(const DataType&, const DataType&) { return {DataType::FLOAT32}; }
std::vector<DataType> F32Of1(const DataType&) { return {DataType::FLOAT32}; }

}  // namespace

PD_BUILD_OP(llm_rms_norm)
    .Inputs({"X", "W"})
    .Outputs({"Out"})
    .Attrs({"eps: float"})
    .SetKernelFn(PD_KERNEL(RmsNorm))
    .SetInferShapeFn(PD_INFER_SHAPE(SameShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(F32Of2));

PD_BUILD_OP(llm_swiglu)
    .Inputs({"X"})
    .Outputs({"Out"})
    .SetKernelFn(PD_KERNEL(Swiglu))
    .SetInferShapeFn(PD_INFER_SHAPE(HalfLast))
    .SetInferDtypeFn(PD_INFER_DTYPE(F32Of1));
