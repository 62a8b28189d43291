// Fused element-wise operators of the decode step (CPU, float32): each replaces a chain of paddle ops whose
// per-op dispatch costs more than the arithmetic at decode sizes (a 576-wide RMSNorm is five paddle ops).
//
//   llm_rms_norm(X [..., D], W [D], eps) -> [..., D]   rsqrt(mean(x^2) + eps) * x * w   (paddlenlp's op order)
//   llm_swiglu(X [..., 2I])              -> [..., I]   silu(x[:I]) * x[I:]
//   llm_rope_qkv(QKV [B, S, (H + 2 KV) D], COS, SIN [B, S, H + KV, D], heads, q_scale)
//       -> Q [B, S, H, D] (rotated, times q_scale), K [B, KV, S, D] (rotated), V [B, KV, S, D]
//       rotation x * cos + roll(x, D / 2) * sin per head, the sign of rotate_half folded into SIN (decoders.base)
#include <cmath>
#include <cstring>
#include <vector>

#include "elementwise.h"
#include "paddle/extension.h"
#include "tensor_checks.h"

using paddle::DataType;

namespace {

using llm_kernels::check_f32;
using llm_kernels::rows_of;

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
  for (int64_t r = 0; r < m; ++r) llm_kernels::rms_row(xp + r * d, wp, d, eps, yp + r * d);
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
  for (int64_t r = 0; r < m; ++r) llm_kernels::swiglu_row(xp + r * 2 * n, xp + r * 2 * n + n, n, yp + r * n);
  return {out};
}

std::vector<paddle::Tensor> RopeQKV(const paddle::Tensor& qkv, const paddle::Tensor& cos, const paddle::Tensor& sin,
                                    const int& heads, const float& q_scale) {
  const char* op = "llm_rope_qkv";
  check_f32(qkv, op, "qkv");
  check_f32(cos, op, "cos");
  check_f32(sin, op, "sin");
  const auto xs = qkv.shape(), cs = cos.shape();
  PD_CHECK(xs.size() == 3 && cs.size() == 4 && sin.shape() == cs, op, ": qkv [B, S, C], cos / sin [B, S, R, D]");
  const int64_t B = xs[0], S = xs[1], R = cs[2], D = cs[3], H = heads, KV = R - heads;
  PD_CHECK(cs[0] == B && cs[1] == S && KV > 0 && xs[2] == (H + 2 * KV) * D, op,
           ": qkv must hold (heads + 2 kv_heads) * D columns with cos / sin [B, S, heads + kv_heads, D]");
  auto q = paddle::empty({B, S, H, D}, DataType::FLOAT32, paddle::CPUPlace());
  auto k = paddle::empty({B, KV, S, D}, DataType::FLOAT32, paddle::CPUPlace());
  auto v = paddle::empty({B, KV, S, D}, DataType::FLOAT32, paddle::CPUPlace());
  const float *xp = qkv.data<float>(), *cp = cos.data<float>(), *sp = sin.data<float>();
  float *qp = q.data<float>(), *kp = k.data<float>(), *vp = v.data<float>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t s = 0; s < S; ++s) {
      const float* row = xp + (b * S + s) * xs[2];
      for (int64_t r = 0; r < R; ++r) {  // heads to rotate: H query heads, then KV key heads
        const float* x = row + r * D;
        const float* c = cp + ((b * S + s) * R + r) * D;
        const float* n = sp + ((b * S + s) * R + r) * D;
        float* y = r < H ? qp + ((b * S + s) * H + r) * D : kp + ((b * KV + (r - H)) * S + s) * D;
        llm_kernels::rope_head(x, c, n, D, r < H ? q_scale : 1.0f, y);
      }
      for (int64_t j = 0; j < KV; ++j)
        std::memcpy(vp + ((b * KV + j) * S + s) * D, row + (R + j) * D, size_t(D) * sizeof(float));
    }
  }
  return {q, k, v};
}

std::vector<std::vector<int64_t>> ShapeRope(const std::vector<int64_t>& x, const std::vector<int64_t>& c,
                                            const std::vector<int64_t>&, const int& heads, const float&) {
  const int64_t kv = c.size() == 4 ? c[2] - heads : -1, d = c.size() == 4 ? c[3] : -1;
  return {{x[0], x[1], heads, d}, {x[0], kv, x[1], d}, {x[0], kv, x[1], d}};
}
std::vector<DataType> F32x3(const DataType&, const DataType&, const DataType&) {
  return {DataType::FLOAT32, DataType::FLOAT32, DataType::FLOAT32};
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

PD_BUILD_OP(llm_rope_qkv)
    .Inputs({"QKV", "Cos", "Sin"})
    .Outputs({"Q", "K", "V"})
    .Attrs({"heads: int", "q_scale: float"})
    .SetKernelFn(PD_KERNEL(RopeQKV))
    .SetInferShapeFn(PD_INFER_SHAPE(ShapeRope))
    .SetInferDtypeFn(PD_INFER_DTYPE(F32x3));
