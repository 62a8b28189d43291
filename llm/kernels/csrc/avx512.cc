// AVX-512 kernels (16 floats per vector; needs AVX512F + BW + VL, checked by ops.cc before any call).
//
// Dispatch note: this translation unit alone is compiled for AVX-512, through the `#pragma GCC target` below
// (the per-function form of `__attribute__((target(...)))` applied to the whole file, so that the templates
// of impl.h inherit it), while the shipped build passes no -march flag. Everything here except the
// `avx512_kernels()` accessor has internal linkage and no standard-library template is used, so no
// AVX-512 instruction can leak into code that runs on other CPUs.
#include <immintrin.h>

#include <cstdint>

#include "kernels.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma")
// GCC 12 false positives on the _mm512_undefined_*() placeholders inside the intrinsics headers
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace llm_kernels {
namespace {

struct Avx512 {
  using V = __m512;
  static constexpr int W = 16;
  static constexpr int kn_nv(int mt) { return mt <= 3 ? 8 : 4; }  // MT x NV accumulators (<= 24)
  static constexpr int nk_r(int mt) { return mt == 1 ? 16 : mt <= 3 ? 8 : 4; }
  static constexpr int q4_r(int mt) { return mt <= 2 ? 8 : 4; }
  static constexpr int q8_r(int mt) { return mt <= 3 ? 8 : 4; }

  static inline V zero() { return _mm512_setzero_ps(); }
  static inline V set1(float v) { return _mm512_set1_ps(v); }
  static inline V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static inline V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static inline float hsum(V v) { return _mm512_reduce_add_ps(v); }
  static inline __mmask16 mask(int n) { return __mmask16((1u << n) - 1u); }
  static inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }

  static inline V load(const float* p) { return _mm512_loadu_ps(p); }
  static inline V load_n(const float* p, int n) { return _mm512_maskz_loadu_ps(mask(n), p); }
  // bfloat16 is the top half of a float32: zero-extend to 32 bits, shift left by 16
  static inline V widen_bf16(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static inline V load(const uint16_t* p) { return widen_bf16(_mm256_loadu_si256((const __m256i*)p)); }
  static inline V load_n(const uint16_t* p, int n) { return widen_bf16(_mm256_maskz_loadu_epi16(mask(n), p)); }
  static inline V load(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
  }
  static inline V load_n(const int8_t* p, int n) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask(n), p)));
  }
  static inline void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static inline void store_n(float* p, V v, int n) { _mm512_mask_storeu_ps(p, mask(n), v); }

  // int4: a 16-entry table of (nibble - 8) * scale; vpermps looks each nibble up directly (it reads only the
  // low 4 bits of each 32-bit index, so the low nibble needs no mask; the high one is shifted down).
  struct Q4 {
    V table;
  };
  static inline Q4 q4(float scale) {
    const V base = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    return {_mm512_mul_ps(base, _mm512_set1_ps(scale))};
  }
  static inline void dq4(const uint8_t* p, int n, const Q4& q, V& lo, V& hi) {
    const __m128i b = n == W ? _mm_loadu_si128((const __m128i*)p) : _mm_maskz_loadu_epi8(mask(n), p);
    const __m512i v = _mm512_cvtepu8_epi32(b);  // byte j -> 32-bit lane j
    lo = _mm512_permutexvar_ps(v, q.table);
    hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), q.table);
  }
};

#include "impl.h"

}  // namespace

const KernelSet* avx512_kernels() {
  static const KernelSet set = {
      "avx512",
      Avx512::W,
      Avx512::W,      // int8 groups: whole vectors
      2 * Avx512::W,  // int4 groups: whole 16-byte chunks (32 k)
      kn_range<Avx512, float>,
      kn_range<Avx512, uint16_t>,
      nk_range<Avx512, float>,
      nk_range<Avx512, uint16_t>,
      int8_range<Avx512>,
      int4_range<Avx512>,
      attn_range<Avx512>,
  };
  return &set;
}

}  // namespace llm_kernels

#pragma GCC pop_options
