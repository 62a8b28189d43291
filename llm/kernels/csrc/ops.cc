// Paddle custom operators of the llm decode kernels (CPU only):
//
//   llm_linear_kn(X, W)         X float32 [..., K], W float32 | bfloat16 [K, N]    -> float32 [..., N]
//   llm_linear_nk(X, W)         X float32 [..., K], W float32 | bfloat16 [N, K]    -> float32 [..., N]
//   llm_linear_int8(X, Q, S)    Q int8 [N, K], S float32 [N, G]                    -> float32 [..., N]
//   llm_linear_int4(X, Q, S)    Q uint8 [N, K / 2] (packed, see kernels.h), S [N, G] -> float32 [..., N]
//   llm_kernels_config(X, isa, threads, spin_us) -> int32 [6]: selected isa, threads, spin_us, cpu has
//       avx512, cpu has avx2, isa that `auto` picks (isa: -1 keep, 0 auto, 1 scalar, 2 avx2, 3 avx512;
//       threads / spin_us: < 0 keep)
//
// Dispatch: the kernel set (kernels.h) is chosen once from the CPU's features (__builtin_cpu_supports) and can
// be overridden through llm_kernels_config (tests force every path). The output columns are split into
// chunks run on the thread pool (pool.h); inputs must be contiguous and are checked with PD_CHECK.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "dispatch.h"
#include "kernels.h"
#include "paddle/common/ddim.h"
#include "paddle/extension.h"
#include "pool.h"

namespace lk = llm_kernels;
using paddle::DataType;

namespace {

enum Isa { kAuto = 0, kScalar = 1, kAvx2 = 2, kAvx512 = 3 };

bool cpu_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
}
bool cpu_avx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
int best_isa() { return cpu_avx512() ? kAvx512 : cpu_avx2() ? kAvx2 : kScalar; }

std::atomic<int> g_isa{0};  // 0: not chosen yet

int current_isa() {
  int isa = g_isa.load(std::memory_order_relaxed);
  if (isa == 0) {
    isa = best_isa();
    g_isa.store(isa, std::memory_order_relaxed);
  }
  return isa;
}

const lk::KernelSet* kernel_set(int isa) {
  switch (isa) {
    case kAvx512: return lk::avx512_kernels();
    case kAvx2: return lk::avx2_kernels();
    default: return lk::scalar_kernels();
  }
}

// ------------------------------------------------------------------------------------------------ checks
bool contiguous(const paddle::Tensor& t) {
  const auto& st = t.strides();
  const auto sh = t.shape();
  if (st.size() != static_cast<int>(sh.size())) return true;  // no stride information: dense
  int64_t expect = 1;
  for (int i = static_cast<int>(sh.size()) - 1; i >= 0; --i) {
    if (sh[i] != 1 && st[i] != expect) return false;
    expect *= sh[i];
  }
  return true;
}

const char* dtype_name(DataType d) {
  switch (d) {
    case DataType::FLOAT32: return "float32";
    case DataType::BFLOAT16: return "bfloat16";
    case DataType::FLOAT16: return "float16";
    case DataType::FLOAT64: return "float64";
    case DataType::INT8: return "int8";
    case DataType::UINT8: return "uint8";
    case DataType::INT32: return "int32";
    case DataType::INT64: return "int64";
    default: return "another dtype";
  }
}

void check_tensor(const paddle::Tensor& t, const char* op, const char* what) {
  PD_CHECK(t.is_cpu(), op, ": ", what, " must be a CPU tensor (these kernels are CPU only)");
  PD_CHECK(contiguous(t), op, ": ", what, " must be contiguous (call .contiguous() or paddle.assign first)");
}

// x [..., K] float32: returns M (rows) and checks K.
int64_t check_x(const paddle::Tensor& x, int64_t k, const char* op) {
  check_tensor(x, op, "x");
  PD_CHECK(x.dtype() == DataType::FLOAT32, op, ": x must be float32, got ", dtype_name(x.dtype()));
  const auto sh = x.shape();
  PD_CHECK(!sh.empty(), op, ": x must have at least one dimension [..., K]");
  PD_CHECK(sh.back() == k, op, ": x has K=", sh.back(), " input features but the weight has K=", k);
  int64_t m = 1;
  for (size_t i = 0; i + 1 < sh.size(); ++i) m *= sh[i];
  return m;
}

void check_2d(const paddle::Tensor& w, const char* op, const char* what, const char* layout) {
  check_tensor(w, op, what);
  PD_CHECK(w.shape().size() == 2, op, ": ", what, " must be 2-D ", layout, ", got ", w.shape().size(), "-D");
}

int64_t check_scales(const paddle::Tensor& s, int64_t n, int64_t k, const char* op) {
  check_2d(s, op, "scales", "[N, G]");
  PD_CHECK(s.dtype() == DataType::FLOAT32, op, ": scales must be float32, got ", dtype_name(s.dtype()));
  PD_CHECK(s.shape()[0] == n, op, ": scales have ", s.shape()[0], " rows but the weight has N=", n);
  const int64_t g = s.shape()[1];
  PD_CHECK(g >= 1 && k % g == 0, op, ": K=", k, " is not divisible into G=", g, " scale groups");
  return g;
}

std::vector<int64_t> out_shape(const std::vector<int64_t>& x, int64_t n) {
  std::vector<int64_t> s = x.empty() ? std::vector<int64_t>{1} : x;
  s.back() = n;
  return s;
}

paddle::Tensor empty_out(const paddle::Tensor& x, int64_t n) {
  return paddle::empty(out_shape(x.shape(), n), DataType::FLOAT32, paddle::CPUPlace());
}

// ------------------------------------------------------------------------------------------------ ops
std::vector<paddle::Tensor> LinearKN(const paddle::Tensor& x, const paddle::Tensor& w) {
  const char* op = "llm_linear_kn";
  check_2d(w, op, "w", "[K, N]");
  const bool bf16 = w.dtype() == DataType::BFLOAT16;
  PD_CHECK(bf16 || w.dtype() == DataType::FLOAT32, op, ": w must be float32 or bfloat16, got ",
           dtype_name(w.dtype()));
  const int64_t k = w.shape()[0], n = w.shape()[1];
  lk::MatArgs a;
  a.M = check_x(x, k, op);
  a.K = k;
  a.N = n;
  auto out = empty_out(x, n);
  a.x = x.data<float>();
  a.w = w.data();
  a.y = out.data<float>();
  if (k == 0) {
    std::fill(a.y, a.y + a.M * n, 0.0f);
    return {out};
  }
  const lk::KernelSet* ks = kernel_set(current_isa());
  lk::run_matmul(bf16 ? ks->kn_bf16 : ks->kn_f32, a, ks->width, k * n * (bf16 ? 2 : 4));
  return {out};
}

std::vector<paddle::Tensor> LinearNK(const paddle::Tensor& x, const paddle::Tensor& w) {
  const char* op = "llm_linear_nk";
  check_2d(w, op, "w", "[N, K]");
  const bool bf16 = w.dtype() == DataType::BFLOAT16;
  PD_CHECK(bf16 || w.dtype() == DataType::FLOAT32, op, ": w must be float32 or bfloat16, got ",
           dtype_name(w.dtype()));
  const int64_t n = w.shape()[0], k = w.shape()[1];
  lk::MatArgs a;
  a.M = check_x(x, k, op);
  a.K = k;
  a.N = n;
  auto out = empty_out(x, n);
  a.x = x.data<float>();
  a.w = w.data();
  a.y = out.data<float>();
  if (k == 0) {
    std::fill(a.y, a.y + a.M * n, 0.0f);
    return {out};
  }
  const lk::KernelSet* ks = kernel_set(current_isa());
  lk::run_matmul(bf16 ? ks->nk_bf16 : ks->nk_f32, a, 8, k * n * (bf16 ? 2 : 4));
  return {out};
}

std::vector<paddle::Tensor> LinearInt8(const paddle::Tensor& x, const paddle::Tensor& q,
                                       const paddle::Tensor& s) {
  const char* op = "llm_linear_int8";
  check_2d(q, op, "qweight", "[N, K]");
  PD_CHECK(q.dtype() == DataType::INT8, op, ": qweight must be int8 [N, K], got ", dtype_name(q.dtype()));
  const int64_t n = q.shape()[0], k = q.shape()[1];
  lk::MatArgs a;
  a.M = check_x(x, k, op);
  a.G = check_scales(s, n, k, op);
  a.K = k;
  a.N = n;
  auto out = empty_out(x, n);
  a.x = x.data<float>();
  a.w = q.data();
  a.scales = s.data<float>();
  a.y = out.data<float>();
  if (k == 0) {
    std::fill(a.y, a.y + a.M * n, 0.0f);
    return {out};
  }
  const lk::KernelSet* ks = kernel_set(current_isa());
  if (a.G > 1 && (k / a.G) % ks->int8_group) ks = lk::scalar_kernels();
  lk::run_matmul(ks->int8, a, 8, k * n);
  return {out};
}

std::vector<paddle::Tensor> LinearInt4(const paddle::Tensor& x, const paddle::Tensor& q,
                                       const paddle::Tensor& s) {
  const char* op = "llm_linear_int4";
  check_2d(q, op, "qweight", "[N, K / 2]");
  PD_CHECK(q.dtype() == DataType::UINT8, op, ": qweight must be uint8 [N, K / 2] (two int4 values per byte), got ",
           dtype_name(q.dtype()));
  const int64_t n = q.shape()[0], k = 2 * q.shape()[1];
  const auto xs = x.shape();
  PD_CHECK(xs.empty() || xs.back() == k, op, ": x has K=", xs.empty() ? 0 : xs.back(),
           " input features but the packed weight holds K=", k, " (int4 needs an even K: two values per byte)");
  lk::MatArgs a;
  a.M = check_x(x, k, op);
  a.G = check_scales(s, n, k, op);
  PD_CHECK((k / a.G) % 2 == 0, op, ": the group size K / G = ", k / a.G,
           " is odd: a packed byte would straddle two scale groups");
  a.K = k;
  a.N = n;
  auto out = empty_out(x, n);
  a.w = q.data();
  a.scales = s.data<float>();
  a.y = out.data<float>();
  if (k == 0) {
    std::fill(a.y, a.y + a.M * n, 0.0f);
    return {out};
  }
  thread_local std::vector<float> scratch;
  lk::split_int4_input(a, x.data<float>(), scratch);
  const lk::KernelSet* ks = kernel_set(current_isa());
  if (a.G > 1 && (k / a.G) % ks->int4_group) ks = lk::scalar_kernels();
  lk::run_matmul(ks->int4, a, 8, k / 2 * n);
  return {out};
}

// In-place decode attention: writes K, V [B, KV, 1, D] into the caches PK, PV [B, KV, T, D] at column `col`
// (the caches are the engine's preallocated buffers, written through their data like a slice assignment), then
// attends Q [B, 1, H, D] over their first `span` columns with BIAS [B, KV, G, span] -> [B, 1, H * D].
std::vector<paddle::Tensor> AttendDecode(const paddle::Tensor& q, const paddle::Tensor& k, const paddle::Tensor& v,
                                         const paddle::Tensor& pk, const paddle::Tensor& pv,
                                         const paddle::Tensor& bias, const int& col, const int& span) {
  const char* op = "llm_attend_decode";
  for (const auto* t : {&q, &k, &v, &pk, &pv, &bias}) {
    check_tensor(*t, op, "inputs");
    PD_CHECK(t->dtype() == DataType::FLOAT32, op, ": every input must be float32, got ", dtype_name(t->dtype()));
    PD_CHECK(t->shape().size() == 4, op, ": every input must be 4-D");
  }
  const auto qs = q.shape(), cs = pk.shape(), ks = k.shape(), bs = bias.shape();
  const int64_t B = qs[0], H = qs[2], D = qs[3], KV = cs[1], T = cs[2];
  PD_CHECK(qs[1] == 1, op, ": one query row per sequence (decode), got ", qs[1]);
  PD_CHECK(cs[0] == B && cs[3] == D && pv.shape() == cs, op, ": caches must be [B, KV, T, D] like q");
  PD_CHECK(ks == std::vector<int64_t>({B, KV, 1, D}) && v.shape() == ks, op, ": k / v must be [B, KV, 1, D]");
  PD_CHECK(KV > 0 && H % KV == 0, op, ": query heads H=", H, " must be a multiple of KV=", KV);
  PD_CHECK(col >= 0 && col < span && span <= T, op, ": need 0 <= col < span <= T, got col=", col, " span=", span,
           " T=", T);
  PD_CHECK(bs == std::vector<int64_t>({B, KV, H / KV, span}), op, ": bias must be [B, KV, G, span]");
  float* kc = const_cast<float*>(pk.data<float>());
  float* vc = const_cast<float*>(pv.data<float>());
  for (int64_t u = 0; u < B * KV; ++u) {
    std::memcpy(kc + (u * T + col) * D, k.data<float>() + u * D, size_t(D) * sizeof(float));
    std::memcpy(vc + (u * T + col) * D, v.data<float>() + u * D, size_t(D) * sizeof(float));
  }
  auto out = paddle::empty({B, 1, H * D}, DataType::FLOAT32, paddle::CPUPlace());
  lk::AttnArgs a;
  a.q = q.data<float>();
  a.k = kc;
  a.v = vc;
  a.bias = bias.data<float>();
  a.out = out.data<float>();
  a.B = B, a.H = H, a.KV = KV, a.T = T, a.S = span, a.D = D;
  lk::run_attention(kernel_set(current_isa()), a);
  return {out};
}

std::vector<paddle::Tensor> KernelsConfig(const paddle::Tensor& x, const int& isa, const int& threads,
                                          const int& spin_us) {
  if (isa == kAuto) {
    g_isa.store(best_isa());
  } else if (isa > 0) {
    PD_CHECK(isa <= kAvx512, "llm_kernels_config: isa must be 0 (auto), 1 (scalar), 2 (avx2) or 3 (avx512)");
    PD_CHECK(isa != kAvx512 || cpu_avx512(), "llm_kernels_config: this CPU has no AVX-512 (F, BW, VL)");
    PD_CHECK(isa != kAvx2 || cpu_avx2(), "llm_kernels_config: this CPU has no AVX2 + FMA");
    g_isa.store(isa);
  }
  if (threads > 0) lk::set_pool_threads(threads);
  if (spin_us >= 0) lk::set_pool_spin_us(spin_us);
  auto out = paddle::empty({6}, DataType::INT32, paddle::CPUPlace());
  int32_t* o = out.data<int32_t>();
  o[0] = current_isa();
  o[1] = lk::pool_threads();
  o[2] = lk::pool_spin_us();
  o[3] = cpu_avx512();
  o[4] = cpu_avx2();
  o[5] = best_isa();
  (void)x;
  return {out};
}

// ------------------------------------------------------------------------------------------------ shapes
std::vector<std::vector<int64_t>> ShapeKN(const std::vector<int64_t>& x, const std::vector<int64_t>& w) {
  return {out_shape(x, w.size() == 2 ? w[1] : -1)};
}
std::vector<std::vector<int64_t>> ShapeNK(const std::vector<int64_t>& x, const std::vector<int64_t>& w) {
  return {out_shape(x, w.empty() ? -1 : w[0])};
}
std::vector<std::vector<int64_t>> ShapeQ(const std::vector<int64_t>& x, const std::vector<int64_t>& q,
                                         const std::vector<int64_t>&) {
  return {out_shape(x, q.empty() ? -1 : q[0])};
}
std::vector<std::vector<int64_t>> ShapeAttend(const std::vector<int64_t>& q, const std::vector<int64_t>&,
                                              const std::vector<int64_t>&, const std::vector<int64_t>&,
                                              const std::vector<int64_t>&, const std::vector<int64_t>&) {
  return {{q[0], 1, q.size() == 4 ? q[2] * q[3] : -1}};
}
std::vector<DataType> F32Of6(const DataType&, const DataType&, const DataType&, const DataType&, const DataType&,
                             const DataType&) {
  return {DataType::FLOAT32};
}
std::vector<std::vector<int64_t>> ShapeConfig(const std::vector<int64_t>&) { return {{6}}; }
std::vector<DataType> F32Of2(const DataType&, const DataType&) { return {DataType::FLOAT32}; }
std::vector<DataType> F32Of3(const DataType&, const DataType&, const DataType&) { return {DataType::FLOAT32}; }
std::vector<DataType> I32Of1(const DataType&) { return {DataType::INT32}; }

}  // namespace

// ------------------------------------------------------------------------------------------------ dispatch
namespace llm_kernels {

const KernelSet* active_kernels() { return kernel_set(current_isa()); }

namespace {
struct Job {
  RangeFn fn;
  const MatArgs* args;
  int64_t units, unit, nchunks;
};

void run_chunk(void* ctx, int64_t c) {
  const Job& j = *static_cast<const Job*>(ctx);
  const int64_t u0 = j.units * c / j.nchunks, u1 = j.units * (c + 1) / j.nchunks;
  const int64_t n1 = std::min(j.args->N, u1 * j.unit);
  if (u0 * j.unit < n1) j.fn(*j.args, u0 * j.unit, n1);
}

struct AttnJob {
  AttnFn fn;
  const AttnArgs* args;
  int64_t units, nchunks;
};

void run_attn_chunk(void* ctx, int64_t c) {
  const auto& j = *static_cast<const AttnJob*>(ctx);
  j.fn(*j.args, j.units * c / j.nchunks, j.units * (c + 1) / j.nchunks);
}
}  // namespace

// One chunk per thread for small weights, four per thread for large ones (balance on a shared machine), none
// (serial) under 32 KB of weights where waking a worker costs more than it saves.
void run_matmul(RangeFn fn, const MatArgs& a, int64_t unit, int64_t weight_bytes) {
  if (a.M == 0 || a.N == 0) return;
  Job job{fn, &a, (a.N + unit - 1) / unit, unit, 1};
  const int64_t threads = pool_threads();
  if (weight_bytes * std::max<int64_t>(a.M, 1) >= (32 << 10) && threads > 1)
    job.nchunks = std::min<int64_t>(job.units, threads * (weight_bytes >= (4 << 20) ? 4 : 1));
  parallel_run(job.nchunks, run_chunk, &job);
}

void split_int4_input(MatArgs& a, const float* x, std::vector<float>& scratch) {
  const int64_t k = a.K, kh = k / 2, ldh = (kh + 63) / 64 * 64;
  scratch.assign(size_t(2 * a.M * ldh), 0.0f);
  for (int64_t m = 0; m < a.M; ++m) {
    float* xe = scratch.data() + m * ldh;
    float* xo = scratch.data() + (a.M + m) * ldh;
    for (int64_t j = 0; j < kh; ++j) {
      xe[j] = x[m * k + 2 * j];
      xo[j] = x[m * k + 2 * j + 1];
    }
  }
  a.x = x;
  a.xe = scratch.data();
  a.xo = scratch.data() + a.M * ldh;
  a.ldh = ldh;
}

void run_attention(const KernelSet* ks, const AttnArgs& a) {
  AttnJob job{ks->attn, &a, a.B * a.KV, 1};
  const int64_t threads = pool_threads();
  if (threads > 1 && a.B * a.H * a.S * a.D >= (64 << 10)) job.nchunks = std::min<int64_t>(job.units, threads);
  parallel_run(job.nchunks, run_attn_chunk, &job);
}

}  // namespace llm_kernels

PD_BUILD_OP(llm_linear_kn)
    .Inputs({"X", "W"})
    .Outputs({"Out"})
    .SetKernelFn(PD_KERNEL(LinearKN))
    .SetInferShapeFn(PD_INFER_SHAPE(ShapeKN))
    .SetInferDtypeFn(PD_INFER_DTYPE(F32Of2));

PD_BUILD_OP(llm_linear_nk)
    .Inputs({"X", "W"})
    .Outputs({"Out"})
    .SetKernelFn(PD_KERNEL(LinearNK))
    .SetInferShapeFn(PD_INFER_SHAPE(ShapeNK))
    .SetInferDtypeFn(PD_INFER_DTYPE(F32Of2));

PD_BUILD_OP(llm_linear_int8)
    .Inputs({"X", "Q", "S"})
    .Outputs({"Out"})
    .SetKernelFn(PD_KERNEL(LinearInt8))
    .SetInferShapeFn(PD_INFER_SHAPE(ShapeQ))
    .SetInferDtypeFn(PD_INFER_DTYPE(F32Of3));

PD_BUILD_OP(llm_linear_int4)
    .Inputs({"X", "Q", "S"})
    .Outputs({"Out"})
    .SetKernelFn(PD_KERNEL(LinearInt4))
    .SetInferShapeFn(PD_INFER_SHAPE(ShapeQ))
    .SetInferDtypeFn(PD_INFER_DTYPE(F32Of3));

PD_BUILD_OP(llm_kernels_config)
    .Inputs({"X"})
    .Outputs({"Out"})
    .Attrs({"isa: int", "threads: int", "spin_us: int"})
    .SetKernelFn(PD_KERNEL(KernelsConfig))
    .SetInferShapeFn(PD_INFER_SHAPE(ShapeConfig))
    .SetInferDtypeFn(PD_INFER_DTYPE(I32Of1));

PD_BUILD_OP(llm_attend_decode)
    .Inputs({"Q", "K", "V", "PK", "PV", "Bias"})
    .Outputs({"Out"})
    .Attrs({"col: int", "span: int"})
    .SetKernelFn(PD_KERNEL(AttendDecode))
    .SetInferShapeFn(PD_INFER_SHAPE(ShapeAttend))
    .SetInferDtypeFn(PD_INFER_DTYPE(F32Of6));
