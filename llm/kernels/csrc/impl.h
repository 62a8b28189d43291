// Kernel templates shared by every instruction set. Included by avx512.cc, avx2.cc and scalar.cc inside an
// anonymous namespace, after each file defines its vector traits `T`:
//
//   using V = <vector of W floats>;           static constexpr int W;
//   V zero(); V set1(float); V fma(a, b, c) = a * b + c; V mul(a, b); float hsum(V);
//   V load(const float*) / load(const uint16_t* bf16) / load(const int8_t*)   W values, widened to float
//   V load_n(p, n)                            the first n < W values, the rest zero (tails)
//   void store(float*, V); void store_n(float*, V, n); void prefetch(const void*)
//   struct Q4; Q4 q4(float scale);            int4 dequantization state for one output row (and group)
//   void dq4(const uint8_t* p, int n, const Q4&, V& lo, V& hi)
//       W packed bytes (n <= W valid) -> lo = (low nibbles - 8) * scale, hi = (high nibbles - 8) * scale
//   static constexpr int kn_nv(int mt), nk_r(int mt), q8_r(int mt), q4_r(int mt)   register tile sizes
//       (powers of two; nk_r: float [N, K] rows per tile, q8_r / q4_r: int8 / int4 rows)
//
// Row tiles: the M rows of x are processed MT <= 4 at a time (MT accumulators per output vector).
// x is never quantized: low-bit weights are widened to float in registers and FMA'd with float x.
#pragma once

#include "kernels.h"

constexpr int kMaxRows = 4;  // MT: rows of x per register tile
constexpr int kPrefetchRows = 8;  // kn: software prefetch of the weight row this many k ahead

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// ------------------------------------------------------------------------------------------------ [K, N]
// A tile of MT rows x NV vectors of output columns starting at column n; the weight rows W[k, n : n + NV*W]
// are streamed for k = 0 .. K-1 (one strided segment per k, prefetched kPrefetchRows ahead) and each is
// FMA'd with the broadcast x[m, k] into MT x NV register accumulators. PART: the last vector holds only
// `nlast` columns (end of the matrix).
template <class T, class WT, int MT, int NV, bool PART>
inline void kn_tile(const MatArgs& a, const WT* w, int64_t m0, int64_t n, int nlast) {
  using V = typename T::V;
  constexpr int W = T::W;
  const int64_t K = a.K, N = a.N;
  const float* x = a.x + m0 * K;
  V acc[MT][NV];
  for (int m = 0; m < MT; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = T::zero();
  const WT* wp = w + n;
  for (int64_t k = 0; k < K; ++k, wp += N) {
    if (W > 1 && k + kPrefetchRows < K) {
      const char* pf = reinterpret_cast<const char*>(wp + kPrefetchRows * N);
      for (int b = 0; b < int(NV * W * sizeof(WT)); b += 64) T::prefetch(pf + b);
    }
    V xb[MT];
    for (int m = 0; m < MT; ++m) xb[m] = T::set1(x[m * K + k]);
    for (int v = 0; v < NV; ++v) {
      const V wv = (PART && v == NV - 1) ? T::load_n(wp + v * W, nlast) : T::load(wp + v * W);
      for (int m = 0; m < MT; ++m) acc[m][v] = T::fma(xb[m], wv, acc[m][v]);
    }
  }
  for (int m = 0; m < MT; ++m) {
    float* yr = a.y + (m0 + m) * N + n;
    for (int v = 0; v < NV; ++v) {
      if (PART && v == NV - 1)
        T::store_n(yr + v * W, acc[m][v], nlast);
      else
        T::store(yr + v * W, acc[m][v]);
    }
  }
}

// Whole vectors [n, end): tiles of NV vectors, the remainder with NV/2, NV/4, ... 1.
template <class T, class WT, int MT, int NV>
inline void kn_cols(const MatArgs& a, const WT* w, int64_t m0, int64_t& n, int64_t end) {
  for (; n + NV * T::W <= end; n += NV * T::W) kn_tile<T, WT, MT, NV, false>(a, w, m0, n, 0);
  if constexpr (NV > 1) kn_cols<T, WT, MT, NV / 2>(a, w, m0, n, end);
}

template <class T, class WT, int MT>
inline void kn_rows(const MatArgs& a, const WT* w, int64_t m0, int64_t n0, int64_t n1) {
  int64_t n = n0;
  kn_cols<T, WT, MT, T::kn_nv(MT)>(a, w, m0, n, n0 + (n1 - n0) / T::W * T::W);
  if (n < n1) kn_tile<T, WT, MT, 1, true>(a, w, m0, n, int(n1 - n));
}

// Columns [n0, n1) in blocks of 128 (every row tile re-reads the block's weights from cache).
template <class T, class WT>
void kn_range(const MatArgs& a, int64_t n0, int64_t n1) {
  const WT* w = static_cast<const WT*>(a.w);
  constexpr int64_t kBlock = 128;
  for (int64_t b0 = n0; b0 < n1; b0 += kBlock) {
    const int64_t b1 = min64(n1, b0 + kBlock);
    for (int64_t m0 = 0; m0 < a.M; m0 += kMaxRows) {
      switch (min64(kMaxRows, a.M - m0)) {
        case 1: kn_rows<T, WT, 1>(a, w, m0, b0, b1); break;
        case 2: kn_rows<T, WT, 2>(a, w, m0, b0, b1); break;
        case 3: kn_rows<T, WT, 3>(a, w, m0, b0, b1); break;
        default: kn_rows<T, WT, 4>(a, w, m0, b0, b1); break;
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------ [N, K]
// Dot products of MT rows of x with R contiguous weight rows (R independent streams), accumulated along K in
// MT x R vector registers and reduced horizontally at the end. SC: 0 float weights, 1 per-channel scale
// (applied to the sums), 2 grouped scales (applied to the widened weights, group by group).
template <class T, class WT, int MT, int R, int SC>
inline void nk_tile(const MatArgs& a, const WT* w, int64_t m0, int64_t n) {
  using V = typename T::V;
  constexpr int W = T::W;
  const int64_t K = a.K, G = a.G;
  const int64_t gs = SC == 2 ? K / G : K;
  const float* x = a.x + m0 * K;
  const WT* wr = w + n * K;
  V acc[MT][R];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = T::zero();
  for (int64_t g = 0; g < (SC == 2 ? G : 1); ++g) {
    const int64_t kb = g * gs, ke = kb + gs;
    int64_t k = kb;
    for (; k + W <= ke; k += W) {
      V xv[MT];
      for (int m = 0; m < MT; ++m) xv[m] = T::load(x + m * K + k);
      for (int r = 0; r < R; ++r) {
        V wv = T::load(wr + r * K + k);
        if constexpr (SC == 2) wv = T::mul(wv, T::set1(a.scales[(n + r) * G + g]));
        for (int m = 0; m < MT; ++m) acc[m][r] = T::fma(xv[m], wv, acc[m][r]);
      }
    }
    if (k < ke) {  // K tail (groups are whole vectors, see KernelSet::int8_group)
      const int t = int(ke - k);
      V xv[MT];
      for (int m = 0; m < MT; ++m) xv[m] = T::load_n(x + m * K + k, t);
      for (int r = 0; r < R; ++r) {
        const V wv = T::load_n(wr + r * K + k, t);
        for (int m = 0; m < MT; ++m) acc[m][r] = T::fma(xv[m], wv, acc[m][r]);
      }
    }
  }
  for (int m = 0; m < MT; ++m) {
    float* yr = a.y + (m0 + m) * a.N + n;
    for (int r = 0; r < R; ++r) {
      const float s = T::hsum(acc[m][r]);
      yr[r] = SC == 1 ? s * a.scales[n + r] : s;
    }
  }
}

// ------------------------------------------------------------------------------------------------ int4
// As nk_tile for packed int4 rows: each chunk of W bytes holds W even-k values (low nibbles, FMA'd with
// x_even) and W odd-k values (high nibbles, with x_odd); x_even / x_odd are de-interleaved and zero padded
// by the caller, so only the weight bytes need a partial load at the K tail. GR: grouped scales (folded
// into the dequantization), else the per-channel scale multiplies the sums.
template <class T, int MT, int R, bool GR>
inline void q4_tile(const MatArgs& a, const uint8_t* w, int64_t m0, int64_t n) {
  using V = typename T::V;
  constexpr int W = T::W;
  const int64_t kh = a.K / 2, G = a.G, ldh = a.ldh;
  const int64_t gsh = GR ? kh / G : kh;  // bytes per group
  const float* xe = a.xe + m0 * ldh;
  const float* xo = a.xo + m0 * ldh;
  const uint8_t* wr = w + n * kh;
  V acc[MT][R];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = T::zero();
  const typename T::Q4 unit = T::q4(1.0f);
  for (int64_t g = 0; g < (GR ? G : 1); ++g) {
    const int64_t jb = g * gsh, je = jb + gsh;
    for (int64_t j = jb; j < je; j += W) {
      const int nb = int(min64(W, je - j));
      V xev[MT], xov[MT];
      for (int m = 0; m < MT; ++m) {
        xev[m] = T::load(xe + m * ldh + j);
        xov[m] = T::load(xo + m * ldh + j);
      }
      for (int r = 0; r < R; ++r) {
        V lo, hi;
        if constexpr (GR)
          T::dq4(wr + r * kh + j, nb, T::q4(a.scales[(n + r) * G + g]), lo, hi);
        else
          T::dq4(wr + r * kh + j, nb, unit, lo, hi);
        for (int m = 0; m < MT; ++m) {
          acc[m][r] = T::fma(xev[m], lo, acc[m][r]);
          acc[m][r] = T::fma(xov[m], hi, acc[m][r]);
        }
      }
    }
  }
  for (int m = 0; m < MT; ++m) {
    float* yr = a.y + (m0 + m) * a.N + n;
    for (int r = 0; r < R; ++r) {
      const float s = T::hsum(acc[m][r]);
      yr[r] = GR ? s : s * a.scales[n + r];
    }
  }
}

// Rows [n, end): tiles of R rows, the remainder with R/2, ... 1. KIND: 0 float/bf16, 1 int8, 2 int4.
template <class T, class WT, int MT, int R, int KIND, int SC>
inline void nk_rows(const MatArgs& a, int64_t m0, int64_t& n, int64_t end) {
  for (; n + R <= end; n += R) {
    if constexpr (KIND == 2)
      q4_tile<T, MT, R, SC == 2>(a, static_cast<const uint8_t*>(a.w), m0, n);
    else
      nk_tile<T, WT, MT, R, SC>(a, static_cast<const WT*>(a.w), m0, n);
  }
  if constexpr (R > 1) nk_rows<T, WT, MT, R / 2, KIND, SC>(a, m0, n, end);
}

template <class T, class WT, int MT, int KIND, int SC>
inline void nk_block(const MatArgs& a, int64_t m0, int64_t n0, int64_t n1) {
  int64_t n = n0;
  constexpr int R = KIND == 2 ? T::q4_r(MT) : KIND == 1 ? T::q8_r(MT) : T::nk_r(MT);
  nk_rows<T, WT, MT, R, KIND, SC>(a, m0, n, n1);
}

// Output rows [n0, n1) in blocks of 16 (the block's weights stay in L1 across the row tiles of x).
template <class T, class WT, int KIND, int SC>
void nk_range_sc(const MatArgs& a, int64_t n0, int64_t n1) {
  constexpr int64_t kBlock = 16;
  for (int64_t b0 = n0; b0 < n1; b0 += kBlock) {
    const int64_t b1 = min64(n1, b0 + kBlock);
    for (int64_t m0 = 0; m0 < a.M; m0 += kMaxRows) {
      switch (min64(kMaxRows, a.M - m0)) {
        case 1: nk_block<T, WT, 1, KIND, SC>(a, m0, b0, b1); break;
        case 2: nk_block<T, WT, 2, KIND, SC>(a, m0, b0, b1); break;
        case 3: nk_block<T, WT, 3, KIND, SC>(a, m0, b0, b1); break;
        default: nk_block<T, WT, 4, KIND, SC>(a, m0, b0, b1); break;
      }
    }
  }
}

template <class T, class WT>
void nk_range(const MatArgs& a, int64_t n0, int64_t n1) {
  nk_range_sc<T, WT, 0, 0>(a, n0, n1);
}

template <class T>
void int8_range(const MatArgs& a, int64_t n0, int64_t n1) {
  if (a.G == 1)
    nk_range_sc<T, int8_t, 1, 1>(a, n0, n1);
  else
    nk_range_sc<T, int8_t, 1, 2>(a, n0, n1);
}

template <class T>
void int4_range(const MatArgs& a, int64_t n0, int64_t n1) {
  if (a.G == 1)
    nk_range_sc<T, uint8_t, 2, 1>(a, n0, n1);
  else
    nk_range_sc<T, uint8_t, 2, 2>(a, n0, n1);
}

// ------------------------------------------------------------------------------------------------ attention
// Per (sequence, KV head): for each of its G query heads, scores = q . k_t + bias_t over t < S, softmax (max
// subtracted, as paddle's), out = sum_t p_t v_t. The probabilities live on the stack (S floats); libm's expf via
// the builtin (no inline standard-library code in instruction-set translation units, see avx512.cc).
template <class T>
inline float dot_d(const float* a, const float* b, int64_t d) {
  using V = typename T::V;
  constexpr int W = T::W;
  V acc0 = T::zero(), acc1 = T::zero();
  int64_t i = 0;
  for (; i + 2 * W <= d; i += 2 * W) {
    acc0 = T::fma(T::load(a + i), T::load(b + i), acc0);
    acc1 = T::fma(T::load(a + i + W), T::load(b + i + W), acc1);
  }
  for (; i + W <= d; i += W) acc0 = T::fma(T::load(a + i), T::load(b + i), acc0);
  if (i < d) acc1 = T::fma(T::load_n(a + i, int(d - i)), T::load_n(b + i, int(d - i)), acc1);
  return T::hsum(T::fma(acc0, T::set1(1.0f), acc1));
}

template <class T>
void attn_range(const AttnArgs& a, int64_t u0, int64_t u1) {
  using V = typename T::V;
  constexpr int W = T::W;
  constexpr int kAcc = 4;  // output vectors per pass over the values
  const int64_t G = a.H / a.KV, D = a.D, S = a.S;
  float* p = static_cast<float*>(__builtin_alloca(size_t(S) * sizeof(float)));
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t b = u / a.KV, kv = u % a.KV;
    const float* keys = a.k + (b * a.KV + kv) * a.T * D;
    const float* values = a.v + (b * a.KV + kv) * a.T * D;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t h = kv * G + g;
      const float* q = a.q + (b * a.H + h) * D;
      const float* bias = a.bias + ((b * a.KV + kv) * G + g) * S;
      float mx = -3.0e38f;
      for (int64_t t = 0; t < S; ++t) {
        p[t] = dot_d<T>(q, keys + t * D, D) + bias[t];
        mx = p[t] > mx ? p[t] : mx;
      }
      float sum = 0.0f;
      for (int64_t t = 0; t < S; ++t) {
        p[t] = __builtin_expf(p[t] - mx);
        sum += p[t];
      }
      const float inv = 1.0f / sum;
      float* out = a.out + (b * a.H + h) * D;
      for (int64_t d0 = 0; d0 < D; d0 += kAcc * W) {
        const int nv = int(min64(kAcc, (D - d0 + W - 1) / W));
        const int last = int(D - d0 - (nv - 1) * W);  // valid lanes of the last vector
        V acc[kAcc];
        for (int j = 0; j < kAcc; ++j) acc[j] = T::zero();
        for (int64_t t = 0; t < S; ++t) {
          const V pt = T::set1(p[t]);
          const float* vr = values + t * D + d0;
          for (int j = 0; j < nv; ++j) {
            const V x = (j == nv - 1 && last < W) ? T::load_n(vr + j * W, last) : T::load(vr + j * W);
            acc[j] = T::fma(pt, x, acc[j]);
          }
        }
        const V scale = T::set1(inv);
        for (int j = 0; j < nv; ++j) {
          if (j == nv - 1 && last < W)
            T::store_n(out + d0 + j * W, T::mul(acc[j], scale), last);
          else
            T::store(out + d0 + j * W, T::mul(acc[j], scale));
        }
      }
    }
  }
}
