// Dispatch helpers shared by the operator files (ops.cc defines them; step.cc uses them too).
#pragma once

#include <cstdint>
#include <vector>

#include "kernels.h"

namespace llm_kernels {

// The kernel set of the instruction set in use (chosen from the CPU, or forced by llm_kernels_config).
const KernelSet* active_kernels();

// Run a range function over the N outputs of `a` on the thread pool, in chunks of whole `unit`s (serial under
// 32 KB of weights). `weight_bytes` sizes the chunking.
void run_matmul(RangeFn fn, const MatArgs& a, int64_t unit, int64_t weight_bytes);

// De-interleave x [M, K] into x_even / x_odd (the int4 kernels' inputs, zero padded) in `scratch`; sets
// a.x, a.xe, a.xo and a.ldh.
void split_int4_input(MatArgs& a, const float* x, std::vector<float>& scratch);

// Decode attention over the thread pool (units: (sequence, KV head) pairs).
void run_attention(const KernelSet* ks, const AttnArgs& a);

}  // namespace llm_kernels
