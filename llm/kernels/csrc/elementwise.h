// Element-wise pieces of the decode step shared by the per-operator kernels (fused.cc) and the whole-step
// operator (step.cc), so both compute the same arithmetic in the same order (their results are bitwise equal).
// Only included by translation units compiled with the default flags (not the instruction-set files).
#pragma once

#include <cmath>
#include <cstdint>

namespace llm_kernels {

// rsqrt(mean(x^2) + eps) * x * w over one row of d values (w nullptr: weightless, i.e. w = 1).
inline void rms_row(const float* x, const float* w, int64_t d, float eps, float* y) {
  float ss = 0.0f;
  for (int64_t i = 0; i < d; ++i) ss += x[i] * x[i];
  const float inv = 1.0f / std::sqrt(ss / float(d) + eps);
  for (int64_t i = 0; i < d; ++i) y[i] = inv * x[i] * (w ? w[i] : 1.0f);
}

// One head of D values rotated: x * cos + roll(x, D / 2) * sin (rotate_half's sign folded into sin), times scale.
inline void rope_head(const float* x, const float* c, const float* s, int64_t d, float scale, float* y) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < d; ++i) {
    const float rot = x[i] * c[i] + x[(i + d - half) % d] * s[i];
    y[i] = scale == 1.0f ? rot : rot * scale;
  }
}

// silu(g) * u over n values.
inline void swiglu_row(const float* g, const float* u, int64_t n, float* y) {
  for (int64_t i = 0; i < n; ++i) y[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

}  // namespace llm_kernels
