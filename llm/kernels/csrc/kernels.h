// Shared declarations of the llm decode kernels: y[M, N] = x[M, K] @ W for small M.
//
// Weight layouts (all row-major, contiguous):
//   kn    float32 / bfloat16 [K, N]  (paddle nn.Linear): row k holds the N outputs' weights of input k
//   nk    float32 / bfloat16 [N, K]  (e.g. a tied embedding used as the LM head): row n is output n's weights
//   int8  int8 [N, K] with float32 scales [N, G]                 w[n, k] = q[n, k] * s[n, k / (K / G)]
//   int4  uint8 [N, K / 2], byte j of row n = (q[n, 2j] + 8) | (q[n, 2j + 1] + 8) << 4, scales as int8
//
// Every kernel is a "range function" computing the output columns [n0, n1) for all M rows; the caller
// (ops.cc) splits N into chunks and runs them on the thread pool. One set of range functions exists per
// instruction set (avx512.cc, avx2.cc, scalar.cc), all generated from the templates in impl.h; ops.cc picks
// one at run time from the CPU's features.
//
// This header must stay free of inline functions: it is included by translation units compiled for
// different instruction sets (see the note in avx512.cc).
#pragma once

#include <cstdint>

namespace llm_kernels {

struct MatArgs {
  const float* x = nullptr;   // [M, K]
  const float* xe = nullptr;  // int4 only: x at even k, [M, ldh] (zero padded past K / 2)
  const float* xo = nullptr;  // int4 only: x at odd k, [M, ldh]
  int64_t ldh = 0;            // int4 only: row stride of xe / xo (K / 2 rounded up to 64)
  const void* w = nullptr;    // weights, layout per kernel (see above)
  const float* scales = nullptr;  // [N, G] (low-bit kernels)
  float* y = nullptr;             // [M, N]
  int64_t M = 0, K = 0, N = 0, G = 1;
};

using RangeFn = void (*)(const MatArgs& a, int64_t n0, int64_t n1);

// Decode attention (one query row per sequence) over the first S columns of the KV caches, GQA without repeating
// K/V: query head h belongs to KV head h / G (G = H / KV).
struct AttnArgs {
  const float* q = nullptr;     // [B, H, D], pre-scaled
  const float* k = nullptr;     // [B, KV, T, D] key cache
  const float* v = nullptr;     // [B, KV, T, D] value cache
  const float* bias = nullptr;  // [B, KV, G, S] additive (0 / -1e9)
  float* out = nullptr;         // [B, H, D]
  int64_t B = 0, H = 0, KV = 0, T = 0, S = 0, D = 0;
};

// Units [u0, u1) of B * KV (sequence, KV head) pairs.
using AttnFn = void (*)(const AttnArgs& a, int64_t u0, int64_t u1);

// One instruction set's kernels. `width` is the float vector width (16 / 8 / 1); kn ranges should start at
// a multiple of it. Grouped low-bit scales need group sizes that are multiples of int8_group / int4_group
// (ops.cc uses the scalar kernels otherwise).
struct KernelSet {
  const char* name;
  int width;
  int int8_group;
  int int4_group;
  RangeFn kn_f32, kn_bf16, nk_f32, nk_bf16, int8, int4;
  AttnFn attn;
};

const KernelSet* avx512_kernels();
const KernelSet* avx2_kernels();
const KernelSet* scalar_kernels();

}  // namespace llm_kernels
