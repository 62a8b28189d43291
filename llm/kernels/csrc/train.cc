// Fused training operators (CPU, float32), each with its backward, for the training forward of llm.model.fused.
// Each replaces a chain of paddle ops whose separate passes over memory (and paddle's slow element-wise kernels:
// a 1024 x 576 pow(2) takes 8 ms) cost more than the arithmetic:
//
//   llm_rms_norm_train(X [..., D], W [D], eps) -> Y [..., D], Inv [rows]
//       y = x * inv * w with inv = rsqrt(mean(x^2) + eps); grads dX, dW
//   llm_swiglu_train(G [..., I], U [..., I]) -> Y = silu(g) * u; grads dG, dU
//   llm_softmax_ce(Logits [N, V], Labels [N] int64, scale) -> Loss [N], DLogits [N, V]
//       loss = logsumexp(x) - x[label]; dlogits = (softmax(x) - onehot(label)) * scale; rows whose label is
//       outside [0, V) (ignore_index) get loss 0 and a zero gradient. No backward op: the caller (a PyLayer
//       fusing the LM head with the loss) scales DLogits by the incoming gradient.
//   llm_rope_train(X [B, S, N, D], Cos, Sin [B, S, D]) -> Y [B, N, S, D]
//       rotary embedding x * cos + rotate_half(x) * sin (rotate_half(x) = [-x2, x1]) and the head transpose
//   llm_softmax_mask_train(X [B, H, S, T], Mask [B or 1, 1, S, T], scale) -> Y = softmax(x * scale + mask)
//       (additive float mask); grad dX = scale * y * (dy - sum(dy * y))
//
// Rows are split over the toolkit's thread pool (pool.h).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "paddle/extension.h"
#include "tensor_checks.h"
#include "pool.h"

using paddle::DataType;

namespace {

// Row kernels are compiled for AVX-512, AVX2 and the baseline, picked at load time (GCC target_clones); the
// reductions are vectorised through `omp simd` (-fopenmp-simd), and exp is a polynomial so that it vectorises too.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define LLM_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LLM_CLONES
#endif

// exp(x) as 2^n * 2^f (n = round(x log2 e), |f| <= 1/2, a degree-6 polynomial for 2^f): relative error ~2e-7 for
// |x| <= 10 (~1e-6 at |x| = 80); 0 below -87 (masked attention scores: a tiny exp there would become a denormal
// probability, and denormals make the next matmul ~100x slower), 88 is the upper clamp.
inline float exp_approx(float in) {
  const float x = in < -87.0f ? -87.0f : (in > 88.0f ? 88.0f : in);
  const float t = x * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23 trick, no libm call)
  const float f = t - n;
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  const float r = p * __builtin_bit_cast(float, (int32_t(n) + 127) << 23);
  return in < -87.0f ? 0.0f : r;  // exactly 0, as exp underflows: tiny values would turn into denormals
}

LLM_CLONES void rms_rows(const float* xp, const float* wp, int64_t d, float eps, int64_t r0, int64_t r1, float* yp,
                         float* ip) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = xp + r * d;
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < d; ++i) ss += xr[i] * xr[i];
    const float iv = 1.0f / std::sqrt(ss / float(d) + eps);
    ip[r] = iv;
    float* yr = yp + r * d;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) yr[i] = iv * xr[i] * wp[i];
  }
}

LLM_CLONES void rms_grad_rows(const float* xp, const float* wp, const float* ip, const float* gp, int64_t d,
                              int64_t r0, int64_t r1, float* dxp, float* pw) {
  for (int64_t r = r0; r < r1; ++r) {
    const float *xr = xp + r * d, *gr = gp + r * d;
    const float iv = ip[r];
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t i = 0; i < d; ++i) dot += wp[i] * gr[i] * xr[i];
    const float c = iv * iv * iv * dot / float(d);
    float* out = dxp + r * d;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) {
      out[i] = iv * wp[i] * gr[i] - xr[i] * c;
      pw[i] += gr[i] * xr[i] * iv;
    }
  }
}

LLM_CLONES void swiglu_range(const float* gp, const float* up, int64_t i0, int64_t i1, float* yp) {
#pragma omp simd
  for (int64_t i = i0; i < i1; ++i) yp[i] = gp[i] / (1.0f + exp_approx(-gp[i])) * up[i];
}

LLM_CLONES void swiglu_grad_range(const float* gp, const float* up, const float* yp, int64_t i0, int64_t i1,
                                  float* dgp, float* dup) {
#pragma omp simd
  for (int64_t i = i0; i < i1; ++i) {
    const float s = 1.0f / (1.0f + exp_approx(-gp[i]));
    dup[i] = yp[i] * gp[i] * s;
    dgp[i] = yp[i] * up[i] * s * (1.0f + gp[i] * (1.0f - s));
  }
}

// Rotary embedding of one head row (forward) and its transpose (backward: the rotation by -sin).
LLM_CLONES void rope_row(const float* x, const float* c, const float* sn, int64_t d, float* y) {
  const int64_t half = d / 2;
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) y[i] = x[i] * c[i] - x[i + half] * sn[i];
#pragma omp simd
  for (int64_t i = half; i < d; ++i) y[i] = x[i] * c[i] + x[i - half] * sn[i];
}

LLM_CLONES void rope_grad_row(const float* dy, const float* c, const float* sn, int64_t d, float* dx) {
  const int64_t half = d / 2;
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) dx[i] = dy[i] * c[i] + dy[i + half] * sn[i + half];
#pragma omp simd
  for (int64_t i = half; i < d; ++i) dx[i] = dy[i] * c[i] - dy[i - half] * sn[i - half];
}

LLM_CLONES void softmax_mask_row(const float* x, const float* m, int64_t t, float scale, float* y) {
  float mx = x[0] * scale + m[0];  // an element (not a constant): a fully masked row gets the uniform softmax
#pragma omp simd reduction(max : mx)
  for (int64_t i = 0; i < t; ++i) {
    const float z = x[i] * scale + m[i];
    mx = z > mx ? z : mx;
  }
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < t; ++i) {
    const float e = exp_approx(x[i] * scale + m[i] - mx);
    y[i] = e;
    sum += e;
  }
  const float k = 1.0f / sum;
#pragma omp simd
  for (int64_t i = 0; i < t; ++i) y[i] *= k;
}

LLM_CLONES void softmax_grad_row(const float* y, const float* dy, int64_t t, float scale, float* dx) {
  float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
  for (int64_t i = 0; i < t; ++i) dot += y[i] * dy[i];
#pragma omp simd
  for (int64_t i = 0; i < t; ++i) dx[i] = scale * y[i] * (dy[i] - dot);
}

// One row of softmax cross-entropy: returns the loss, writes (softmax - onehot) * scale into g.
LLM_CLONES float ce_row(const float* x, int64_t v, int64_t label, float scale, float* g) {
  float mx = x[0];
#pragma omp simd reduction(max : mx)
  for (int64_t i = 0; i < v; ++i) mx = x[i] > mx ? x[i] : mx;
  double sum = 0.0;
  for (int64_t b = 0; b < v; b += 1024) {  // float sums over blocks of 1024, added in double
    const int64_t e = std::min(v, b + 1024);
    float part = 0.0f;
#pragma omp simd reduction(+ : part)
    for (int64_t i = b; i < e; ++i) part += exp_approx(x[i] - mx);
    sum += part;
  }
  const float k = float(scale / sum);  // the row is still in cache: recomputing exp beats a second pass over g
#pragma omp simd
  for (int64_t i = 0; i < v; ++i) g[i] = exp_approx(x[i] - mx) * k;
  g[label] -= scale;
  return float(std::log(sum)) + mx - x[label];
}

using llm_kernels::check_f32;
using llm_kernels::rows_of;

// Run body(r0, r1) over row ranges on the pool: about 4 chunks per thread, at least `min_rows` rows each.
template <typename Body>
void for_rows(int64_t rows, int64_t min_rows, const Body& body) {
  if (rows <= 0) return;
  const int64_t threads = std::max(1, llm_kernels::pool_threads());
  const int64_t step = std::max(min_rows, (rows + 4 * threads - 1) / (4 * threads));
  const int64_t chunks = (rows + step - 1) / step;
  struct Ctx {
    const Body* body;
    int64_t step, rows;
  } ctx{&body, step, rows};
  llm_kernels::parallel_run(
      chunks,
      [](void* p, int64_t c) {
        auto* x = static_cast<Ctx*>(p);
        const int64_t r0 = c * x->step;
        (*x->body)(r0, std::min(x->rows, r0 + x->step));
      },
      &ctx);
}

// ------------------------------------------------------------------------------------------------ RMSNorm
std::vector<paddle::Tensor> RmsNormTrain(const paddle::Tensor& x, const paddle::Tensor& w, const float& eps) {
  const char* op = "llm_rms_norm_train";
  check_f32(x, op, "x");
  check_f32(w, op, "w");
  const auto shape = x.shape();
  PD_CHECK(!shape.empty(), op, ": x must have at least one dimension");
  const int64_t d = shape.back(), m = rows_of(shape);
  PD_CHECK(w.numel() == d, op, ": w has ", w.numel(), " elements but x has D=", d);
  auto y = paddle::empty(shape, DataType::FLOAT32, paddle::CPUPlace());
  auto inv = paddle::empty({m}, DataType::FLOAT32, paddle::CPUPlace());
  const float *xp = x.data<float>(), *wp = w.data<float>();
  float *yp = y.data<float>(), *ip = inv.data<float>();
  for_rows(m, 16, [&](int64_t r0, int64_t r1) { rms_rows(xp, wp, d, eps, r0, r1, yp, ip); });
  return {y, inv};
}

// dx = inv * w * dy - x * inv^3 * mean(w * dy * x);  dw = sum over rows of dy * x * inv
std::vector<paddle::Tensor> RmsNormTrainGrad(const paddle::Tensor& x, const paddle::Tensor& w,
                                             const paddle::Tensor& inv, const paddle::Tensor& dy) {
  const auto shape = x.shape();
  const int64_t d = shape.back(), m = rows_of(shape);
  auto dx = paddle::empty(shape, DataType::FLOAT32, paddle::CPUPlace());
  const float *xp = x.data<float>(), *wp = w.data<float>(), *ip = inv.data<float>(), *gp = dy.data<float>();
  float* dxp = dx.data<float>();
  const int64_t threads = std::max(1, llm_kernels::pool_threads());
  const int64_t step = std::max<int64_t>(16, (m + 4 * threads - 1) / (4 * threads));
  const int64_t chunks = (m + step - 1) / step;
  std::vector<float> partial(size_t(chunks * d), 0.0f);  // dw per chunk, summed below (deterministic order)
  for_rows(m, step, [&](int64_t r0, int64_t r1) {
    rms_grad_rows(xp, wp, ip, gp, d, r0, r1, dxp, partial.data() + (r0 / step) * d);
  });
  auto dw = paddle::empty({d}, DataType::FLOAT32, paddle::CPUPlace());
  float* dwp = dw.data<float>();
  std::fill(dwp, dwp + d, 0.0f);
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t i = 0; i < d; ++i) dwp[i] += partial[size_t(c * d + i)];
  return {dx, dw};
}

// ------------------------------------------------------------------------------------------------ SwiGLU
std::vector<paddle::Tensor> SwigluTrain(const paddle::Tensor& g, const paddle::Tensor& u) {
  const char* op = "llm_swiglu_train";
  check_f32(g, op, "gate");
  check_f32(u, op, "up");
  PD_CHECK(g.shape() == u.shape(), op, ": gate and up must have the same shape");
  auto y = paddle::empty(g.shape(), DataType::FLOAT32, paddle::CPUPlace());
  const float *gp = g.data<float>(), *up = u.data<float>();
  float* yp = y.data<float>();
  for_rows(g.numel(), 4096, [&](int64_t i0, int64_t i1) { swiglu_range(gp, up, i0, i1, yp); });
  return {y};
}

// d silu(g) / dg = s * (1 + g * (1 - s)) with s = sigmoid(g)
std::vector<paddle::Tensor> SwigluTrainGrad(const paddle::Tensor& g, const paddle::Tensor& u,
                                            const paddle::Tensor& dy) {
  auto dg = paddle::empty(g.shape(), DataType::FLOAT32, paddle::CPUPlace());
  auto du = paddle::empty(g.shape(), DataType::FLOAT32, paddle::CPUPlace());
  const float *gp = g.data<float>(), *up = u.data<float>(), *yp = dy.data<float>();
  float *dgp = dg.data<float>(), *dup = du.data<float>();
  for_rows(g.numel(), 4096, [&](int64_t i0, int64_t i1) { swiglu_grad_range(gp, up, yp, i0, i1, dgp, dup); });
  return {dg, du};
}

// ------------------------------------------------------------------------------------------------ softmax CE
std::vector<paddle::Tensor> SoftmaxCE(const paddle::Tensor& logits, const paddle::Tensor& labels,
                                      const float& scale) {
  const char* op = "llm_softmax_ce";
  check_f32(logits, op, "logits");
  PD_CHECK(labels.is_cpu() && labels.dtype() == DataType::INT64, op, ": labels must be a CPU int64 tensor");
  const auto shape = logits.shape();
  PD_CHECK(shape.size() == 2, op, ": logits must be [N, V]");
  const int64_t n = shape[0], v = shape[1];
  PD_CHECK(labels.numel() == n, op, ": labels has ", labels.numel(), " entries for ", n, " rows");
  auto loss = paddle::empty({n}, DataType::FLOAT32, paddle::CPUPlace());
  auto grad = paddle::empty(shape, DataType::FLOAT32, paddle::CPUPlace());
  const float* xp = logits.data<float>();
  const int64_t* lp = labels.data<int64_t>();
  float *op_ = loss.data<float>(), *gp = grad.data<float>();
  for_rows(n, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* x = xp + r * v;
      float* g = gp + r * v;
      const int64_t label = lp[r];
      if (label < 0 || label >= v) {
        op_[r] = 0.0f;
        std::memset(g, 0, size_t(v) * sizeof(float));
        continue;
      }
      op_[r] = ce_row(x, v, label, scale, g);
    }
  });
  return {loss, grad};
}

// ------------------------------------------------------------------------------------------------ RoPE
std::vector<paddle::Tensor> RopeTrain(const paddle::Tensor& x, const paddle::Tensor& cos, const paddle::Tensor& sin) {
  const char* op = "llm_rope_train";
  check_f32(x, op, "x");
  check_f32(cos, op, "cos");
  check_f32(sin, op, "sin");
  const auto xs = x.shape();
  PD_CHECK(xs.size() == 4 && xs[3] % 2 == 0, op, ": x must be [B, S, N, D] with an even D");
  const int64_t B = xs[0], S = xs[1], N = xs[2], D = xs[3];
  PD_CHECK(cos.numel() == B * S * D && sin.numel() == B * S * D, op, ": cos / sin must hold [B, S, D] values");
  auto y = paddle::empty({B, N, S, D}, DataType::FLOAT32, paddle::CPUPlace());
  const float *xp = x.data<float>(), *cp = cos.data<float>(), *sp = sin.data<float>();
  float* yp = y.data<float>();
  for_rows(B * S, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {  // r = b * S + s
      const int64_t b = r / S, s = r % S;
      for (int64_t n = 0; n < N; ++n)
        rope_row(xp + (r * N + n) * D, cp + r * D, sp + r * D, D, yp + ((b * N + n) * S + s) * D);
    }
  });
  return {y};
}

std::vector<paddle::Tensor> RopeTrainGrad(const paddle::Tensor& cos, const paddle::Tensor& sin,
                                          const paddle::Tensor& dy) {
  const auto ys = dy.shape();  // [B, N, S, D]
  const int64_t B = ys[0], N = ys[1], S = ys[2], D = ys[3];
  auto dx = paddle::empty({B, S, N, D}, DataType::FLOAT32, paddle::CPUPlace());
  const float *cp = cos.data<float>(), *sp = sin.data<float>(), *gp = dy.data<float>();
  float* dxp = dx.data<float>();
  for_rows(B * S, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / S, s = r % S;
      for (int64_t n = 0; n < N; ++n)
        rope_grad_row(gp + ((b * N + n) * S + s) * D, cp + r * D, sp + r * D, D, dxp + (r * N + n) * D);
    }
  });
  return {dx};
}

// ------------------------------------------------------------------------------------------------ masked softmax
std::vector<paddle::Tensor> SoftmaxMaskTrain(const paddle::Tensor& x, const paddle::Tensor& mask,
                                             const float& scale) {
  const char* op = "llm_softmax_mask_train";
  check_f32(x, op, "x");
  check_f32(mask, op, "mask");
  const auto xs = x.shape(), ms = mask.shape();
  PD_CHECK(xs.size() == 4 && ms.size() == 4, op, ": x [B, H, S, T] and mask [B or 1, 1, S, T]");
  const int64_t B = xs[0], H = xs[1], S = xs[2], T = xs[3];
  PD_CHECK((ms[0] == B || ms[0] == 1) && ms[1] == 1 && ms[2] == S && ms[3] == T, op,
           ": mask must be [B or 1, 1, S, T] for x [B, H, S, T]");
  auto y = paddle::empty(xs, DataType::FLOAT32, paddle::CPUPlace());
  const float *xp = x.data<float>(), *mp = mask.data<float>();
  float* yp = y.data<float>();
  const bool per_batch = ms[0] == B && B > 1;
  for_rows(B * H * S, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {  // r = (b * H + h) * S + s
      const int64_t s = r % S, b = r / (H * S);
      softmax_mask_row(xp + r * T, mp + ((per_batch ? b : 0) * S + s) * T, T, scale, yp + r * T);
    }
  });
  return {y};
}

std::vector<paddle::Tensor> SoftmaxMaskTrainGrad(const paddle::Tensor& y, const paddle::Tensor& dy,
                                                 const float& scale) {
  const auto ys = y.shape();
  const int64_t T = ys.back(), rows = y.numel() / T;
  auto dx = paddle::empty(ys, DataType::FLOAT32, paddle::CPUPlace());
  const float *yp = y.data<float>(), *gp = dy.data<float>();
  float* dxp = dx.data<float>();
  for_rows(rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) softmax_grad_row(yp + r * T, gp + r * T, T, scale, dxp + r * T);
  });
  return {dx};
}

std::vector<std::vector<int64_t>> ShapeRope(const std::vector<int64_t>& x, const std::vector<int64_t>&,
                                            const std::vector<int64_t>&) {
  return {{x[0], x[2], x[1], x[3]}};
}
std::vector<DataType> F32Of3(const DataType&, const DataType&, const DataType&) { return {DataType::FLOAT32}; }

std::vector<std::vector<int64_t>> ShapeRms(const std::vector<int64_t>& x, const std::vector<int64_t>&) {
  return {x, {rows_of(x)}};
}
std::vector<DataType> F32x2Of2(const DataType&, const DataType&) { return {DataType::FLOAT32, DataType::FLOAT32}; }
std::vector<std::vector<int64_t>> ShapeSwiglu(const std::vector<int64_t>& g, const std::vector<int64_t>&) {
  return {g};
}
std::vector<DataType> F32Of2(const DataType&, const DataType&) { return {DataType::FLOAT32}; }
std::vector<std::vector<int64_t>> ShapeCE(const std::vector<int64_t>& x, const std::vector<int64_t>&) {
  return {{x.empty() ? -1 : x[0]}, x};
}

}  // namespace

PD_BUILD_OP(llm_rms_norm_train)
    .Inputs({"X", "W"})
    .Outputs({"Y", "Inv"})
    .Attrs({"eps: float"})
    .SetKernelFn(PD_KERNEL(RmsNormTrain))
    .SetInferShapeFn(PD_INFER_SHAPE(ShapeRms))
    .SetInferDtypeFn(PD_INFER_DTYPE(F32x2Of2));

PD_BUILD_GRAD_OP(llm_rms_norm_train)
    .Inputs({"X", "W", "Inv", paddle::Grad("Y")})
    .Outputs({paddle::Grad("X"), paddle::Grad("W")})
    .SetKernelFn(PD_KERNEL(RmsNormTrainGrad));

PD_BUILD_OP(llm_swiglu_train)
    .Inputs({"G", "U"})
    .Outputs({"Y"})
    .SetKernelFn(PD_KERNEL(SwigluTrain))
    .SetInferShapeFn(PD_INFER_SHAPE(ShapeSwiglu))
    .SetInferDtypeFn(PD_INFER_DTYPE(F32Of2));

PD_BUILD_GRAD_OP(llm_swiglu_train)
    .Inputs({"G", "U", paddle::Grad("Y")})
    .Outputs({paddle::Grad("G"), paddle::Grad("U")})
    .SetKernelFn(PD_KERNEL(SwigluTrainGrad));

PD_BUILD_OP(llm_softmax_ce)
    .Inputs({"Logits", "Labels"})
    .Outputs({"Loss", "DLogits"})
    .Attrs({"scale: float"})
    .SetKernelFn(PD_KERNEL(SoftmaxCE))
    .SetInferShapeFn(PD_INFER_SHAPE(ShapeCE))
    .SetInferDtypeFn(PD_INFER_DTYPE(F32x2Of2));

PD_BUILD_OP(llm_rope_train)
    .Inputs({"X", "Cos", "Sin"})
    .Outputs({"Y"})
    .SetKernelFn(PD_KERNEL(RopeTrain))
    .SetInferShapeFn(PD_INFER_SHAPE(ShapeRope))
    .SetInferDtypeFn(PD_INFER_DTYPE(F32Of3));

PD_BUILD_GRAD_OP(llm_rope_train)
    .Inputs({"Cos", "Sin", paddle::Grad("Y")})
    .Outputs({paddle::Grad("X")})
    .SetKernelFn(PD_KERNEL(RopeTrainGrad));

PD_BUILD_OP(llm_softmax_mask_train)
    .Inputs({"X", "Mask"})
    .Outputs({"Y"})
    .Attrs({"scale: float"})
    .SetKernelFn(PD_KERNEL(SoftmaxMaskTrain))
    .SetInferShapeFn(PD_INFER_SHAPE(ShapeSwiglu))
    .SetInferDtypeFn(PD_INFER_DTYPE(F32Of2));

PD_BUILD_GRAD_OP(llm_softmax_mask_train)
    .Inputs({"Y", paddle::Grad("Y")})
    .Outputs({paddle::Grad("X")})
    .Attrs({"scale: float"})
    .SetKernelFn(PD_KERNEL(SoftmaxMaskTrainGrad));
