// Portable scalar kernels (one float per "vector"): the same templates as the SIMD paths with W = 1, compiled
// for the baseline target. Used on CPUs without AVX2 and for grouped low-bit shapes whose group size is not a
// multiple of the SIMD chunk.
#include <cstdint>
#include <cstring>

#include "kernels.h"

namespace llm_kernels {
namespace {

struct Scalar {
  using V = float;
  static constexpr int W = 1;
  static constexpr int kn_nv(int mt) { return mt == 1 ? 8 : mt == 4 ? 2 : 4; }
  static constexpr int nk_r(int mt) { return mt == 1 ? 8 : mt == 4 ? 2 : 4; }
  static constexpr int q4_r(int mt) { return mt == 1 ? 4 : mt == 4 ? 1 : 2; }
  static constexpr int q8_r(int mt) { return mt == 1 ? 8 : mt == 4 ? 2 : 4; }

  static inline V zero() { return 0.0f; }
  static inline V set1(float v) { return v; }
  static inline V fma(V a, V b, V c) { return a * b + c; }
  static inline V mul(V a, V b) { return a * b; }
  static inline float hsum(V v) { return v; }
  static inline void prefetch(const void*) {}

  static inline V load(const float* p) { return *p; }
  static inline V load(const uint16_t* p) {
    const uint32_t bits = uint32_t(*p) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
  }
  static inline V load(const int8_t* p) { return float(*p); }
  template <class X>
  static inline V load_n(const X* p, int) {  // never called with W = 1 (no partial vectors)
    return load(p);
  }
  static inline void store(float* p, V v) { *p = v; }
  static inline void store_n(float* p, V v, int) { *p = v; }

  struct Q4 {
    float scale;
  };
  static inline Q4 q4(float scale) { return {scale}; }
  static inline void dq4(const uint8_t* p, int, const Q4& q, V& lo, V& hi) {
    lo = float(int(*p & 15) - 8) * q.scale;
    hi = float(int(*p >> 4) - 8) * q.scale;
  }
};

#include "impl.h"

}  // namespace

const KernelSet* scalar_kernels() {
  static const KernelSet set = {
      "scalar",
      1,
      1,
      2,
      kn_range<Scalar, float>,
      kn_range<Scalar, uint16_t>,
      nk_range<Scalar, float>,
      nk_range<Scalar, uint16_t>,
      int8_range<Scalar>,
      int4_range<Scalar>,
      attn_range<Scalar>,
  };
  return &set;
}

}  // namespace llm_kernels
