// AVX2 + FMA kernels (8 floats per vector), compiled for AVX2 by the `#pragma GCC target` below (see the
// dispatch note in avx512.cc). AVX2 has no byte / 16-bit masked loads, so the partial loads of a tail copy
// the valid elements into a zeroed buffer first.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "kernels.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace llm_kernels {
namespace {

struct Avx2 {
  using V = __m256;
  static constexpr int W = 8;
  static constexpr int kn_nv(int mt) { return mt == 1 ? 8 : mt == 4 ? 2 : 4; }  // 16 ymm registers
  static constexpr int nk_r(int mt) { return mt == 1 ? 8 : mt == 4 ? 2 : 4; }
  static constexpr int q4_r(int mt) { return mt == 1 ? 4 : mt == 4 ? 1 : 2; }
  static constexpr int q8_r(int mt) { return mt == 1 ? 8 : mt == 4 ? 2 : 4; }

  static inline V zero() { return _mm256_setzero_ps(); }
  static inline V set1(float v) { return _mm256_set1_ps(v); }
  static inline V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static inline V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static inline float hsum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }

  static inline V load(const float* p) { return _mm256_loadu_ps(p); }
  static inline V widen_bf16(__m128i h) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static inline V load(const uint16_t* p) { return widen_bf16(_mm_loadu_si128((const __m128i*)p)); }
  static inline V load(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
  }
  template <class X>
  static inline V load_n(const X* p, int n) {  // tail: copy n < W elements into a zeroed buffer
    alignas(32) X buf[W * 4 / sizeof(X)] = {};
    std::memcpy(buf, p, size_t(n) * sizeof(X));
    return load(buf);
  }
  static inline void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static inline void store_n(float* p, V v, int n) {
    alignas(32) float buf[W];
    _mm256_store_ps(buf, v);
    std::memcpy(p, buf, size_t(n) * sizeof(float));
  }

  // int4: nibble | 0x4B000000 is the float 2^23 + nibble exactly; subtracting 2^23 + 8 gives nibble - 8.
  struct Q4 {
    V scale;
  };
  static inline Q4 q4(float scale) { return {_mm256_set1_ps(scale)}; }
  static inline void dq4(const uint8_t* p, int n, const Q4& q, V& lo, V& hi) {
    __m128i b;
    if (n == W) {
      b = _mm_loadl_epi64((const __m128i*)p);
    } else {
      alignas(16) uint8_t buf[16] = {};
      std::memcpy(buf, p, size_t(n));
      b = _mm_load_si128((const __m128i*)buf);
    }
    const __m256i v = _mm256_cvtepu8_epi32(b);
    const __m256i magic = _mm256_set1_epi32(0x4B000000);
    const V bias = _mm256_set1_ps(8388616.0f);  // 2^23 + 8
    const __m256i l = _mm256_or_si256(_mm256_and_si256(v, _mm256_set1_epi32(15)), magic);
    const __m256i h = _mm256_or_si256(_mm256_srli_epi32(v, 4), magic);
    lo = _mm256_mul_ps(_mm256_sub_ps(_mm256_castsi256_ps(l), bias), q.scale);
    hi = _mm256_mul_ps(_mm256_sub_ps(_mm256_castsi256_ps(h), bias), q.scale);
  }
};

#include "impl.h"

}  // namespace

const KernelSet* avx2_kernels() {
  static const KernelSet set = {
      "avx2",
      Avx2::W,
      Avx2::W,
      2 * Avx2::W,
      kn_range<Avx2, float>,
      kn_range<Avx2, uint16_t>,
      nk_range<Avx2, float>,
      nk_range<Avx2, uint16_t>,
      int8_range<Avx2>,
      int4_range<Avx2>,
      attn_range<Avx2>,
  };
  return &set;
}

}  // namespace llm_kernels

#pragma GCC pop_options
