// Shape and dtype helpers shared by the operator files that take paddle tensors (fused.cc, train.cc).
#pragma once

#include <cstdint>
#include <vector>

#include "paddle/extension.h"

namespace llm_kernels {

// Product of every dimension but the last (the rows of a [..., D] tensor).
inline int64_t rows_of(const std::vector<int64_t>& shape) {
  int64_t m = 1;
  for (size_t i = 0; i + 1 < shape.size(); ++i) m *= shape[i];
  return m;
}

inline void check_f32(const paddle::Tensor& t, const char* op, const char* what) {
  PD_CHECK(t.is_cpu(), op, ": ", what, " must be a CPU tensor");
  PD_CHECK(t.dtype() == paddle::DataType::FLOAT32, op, ": ", what, " must be float32");
}

}  // namespace llm_kernels
