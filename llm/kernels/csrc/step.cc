// llm_decode_step: every decoder layer of a rotary pre-norm model (the llama / qwen / chatglm_v2 layout of
// llm.infer.decoders.rotary) for one decode step (one new token per sequence) in one operator. Per layer:
//
//   x_n = rms(x) * ln1;  qkv = x_n @ Wqkv (+ b);  q, k = rope(q) * q_scale, rope(k);  cache[col] = k, v
//   x += attend(q, cache[:span], bias) @ Wo (+ b);  x_n = rms(x) * ln2;  g|u = x_n @ Wgu (+ b)
//   x += (silu(g) * u) @ Wdown (+ b)
//
// with the same kernels and the same arithmetic, in the same order, as the per-op path (llm_rms_norm,
// llm_linear_*, llm_rope_qkv, llm_attend_decode, llm_swiglu and paddle's adds), so its results are bitwise those
// of that path; it only removes the ~11 operator dispatches and the Python between them per layer.
//
// Inputs:
//   X        float32 [B, 1, Hd]            hidden states of the new tokens (embedding rows)
//   Cos, Sin float32 [B, 1, H + KV, D]     rotary factors per rotated head (decoders.base.rope_factors)
//   Bias     float32 [B, KV, H / KV, span] additive attention bias over the cache columns
//   Weights  list of tensors, per layer the slots ln1, qkv, qkv_bias, out, out_bias, ln2, gate_up, gate_up_bias,
//            down, down_bias; attribute `slots` holds each slot's kind: 0 absent (a norm weight folded into the
//            next product, no bias), 1 a float32 vector (norm weight, bias) or a float32 / bfloat16 [K, N]
//            weight, 2 a low-bit weight (two tensors: int8 [N, K] or packed uint8 [N, K / 2], then scales
//            [N, G]), 3 a float32 / bfloat16 [N, K] weight (one tensor)
//   Caches   list [k_0, v_0, k_1, v_1, ...], each float32 [B, KV, T, D]: the step's keys / values are written
//            into column `col` in place, attention reads columns [0, span)
// Out: float32 [B, 1, Hd], the hidden states after the last layer (before the final norm).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "dispatch.h"
#include "elementwise.h"
#include "kernels.h"
#include "paddle/extension.h"

namespace lk = llm_kernels;
using paddle::DataType;

namespace {

constexpr int kSlots = 10;
enum Slot { kLn1, kQkv, kQkvB, kOut, kOutB, kLn2, kGu, kGuB, kDown, kDownB };
const char* const kSlotNames[kSlots] = {"ln1",     "qkv", "qkv_bias",     "out",  "out_bias",
                                        "ln2",     "gate_up", "gate_up_bias", "down", "down_bias"};
const char* const kOp = "llm_decode_step";

bool cpu_f32(const paddle::Tensor& t) { return t.is_cpu() && t.dtype() == DataType::FLOAT32; }

// One projection y[M, N] = x[M, K] @ W with its kernel chosen.
struct Proj {
  lk::RangeFn fn = nullptr;
  const void* w = nullptr;
  const float* s = nullptr;
  const float* bias = nullptr;
  int64_t K = 0, N = 0, G = 1, unit = 8, bytes = 0;
  bool int4 = false;
};

// Tensors a slot of kind `kind` holds (see the header).
int tensors_of(int kind) { return kind == 3 ? 1 : kind; }

Proj make_proj(const paddle::Tensor* t, int kind, int64_t k, const lk::KernelSet* ks, int layer, int slot) {
  const char* what = kSlotNames[slot];
  PD_CHECK(kind >= 1 && kind <= 3, kOp, ": layer ", layer, " has no ", what, " weight");
  const paddle::Tensor& w = t[0];
  PD_CHECK(w.is_cpu() && w.shape().size() == 2, kOp, ": layer ", layer, " ", what, " must be a 2-D CPU tensor");
  Proj p;
  p.w = w.data();
  if (kind != 2) {
    const bool bf16 = w.dtype() == DataType::BFLOAT16, kn = kind == 1;
    PD_CHECK(bf16 || w.dtype() == DataType::FLOAT32, kOp, ": layer ", layer, " ", what,
             " must be float32 / bfloat16 (or low-bit with scales)");
    p.K = w.shape()[kn ? 0 : 1];
    p.N = w.shape()[kn ? 1 : 0];
    p.fn = kn ? (bf16 ? ks->kn_bf16 : ks->kn_f32) : (bf16 ? ks->nk_bf16 : ks->nk_f32);
    p.unit = kn ? ks->width : 8;
    p.bytes = p.K * p.N * (bf16 ? 2 : 4);
  } else {
    const paddle::Tensor& s = t[1];
    const bool i8 = w.dtype() == DataType::INT8;
    PD_CHECK(i8 || w.dtype() == DataType::UINT8, kOp, ": layer ", layer, " ", what,
             " low-bit storage must be int8 [N, K] or uint8 [N, K / 2]");
    p.N = w.shape()[0];
    p.K = w.shape()[1] * (i8 ? 1 : 2);
    PD_CHECK(cpu_f32(s) && s.shape().size() == 2 && s.shape()[0] == p.N, kOp, ": layer ", layer, " ", what,
             " scales must be float32 [N, G]");
    p.G = s.shape()[1];
    PD_CHECK(p.G >= 1 && p.K % p.G == 0 && (i8 || (p.K / p.G) % 2 == 0), kOp, ": layer ", layer, " ", what,
             " has K=", p.K, " not divisible into G=", p.G, " scale groups (of even size for int4)");
    p.s = s.data<float>();
    const lk::KernelSet* use = ks;
    if (p.G > 1 && (p.K / p.G) % (i8 ? ks->int8_group : ks->int4_group)) use = lk::scalar_kernels();
    p.fn = i8 ? use->int8 : use->int4;
    p.int4 = !i8;
    p.bytes = i8 ? p.K * p.N : p.K / 2 * p.N;
  }
  PD_CHECK(p.K == k, kOp, ": layer ", layer, " ", what, " takes K=", p.K, " inputs, expected ", k);
  return p;
}

const float* vector_of(const paddle::Tensor* t, int count, int64_t n, int layer, int slot) {
  if (count == 0) return nullptr;
  PD_CHECK(count == 1 && cpu_f32(*t) && t->numel() == n, kOp, ": layer ", layer, " ", kSlotNames[slot],
           " must be a float32 vector of ", n, " values");
  return t->data<float>();
}

void apply(const Proj& p, const float* x, int64_t m, float* y, std::vector<float>& scratch) {
  lk::MatArgs a;
  a.M = m;
  a.K = p.K;
  a.N = p.N;
  a.G = p.G;
  a.w = p.w;
  a.scales = p.s;
  a.x = x;
  a.y = y;
  if (p.K == 0) {
    std::fill(y, y + m * p.N, 0.0f);
  } else {
    if (p.int4) lk::split_int4_input(a, x, scratch);
    lk::run_matmul(p.fn, a, p.unit, p.bytes);
  }
  if (p.bias)
    for (int64_t r = 0; r < m; ++r)
      for (int64_t n = 0; n < p.N; ++n) y[r * p.N + n] += p.bias[n];
}

// llm_rms_norm's arithmetic (weight nullptr: weightless, the weight folded into the next product).
void rms_rows(const float* x, const float* w, int64_t m, int64_t d, float eps, float* y) {
  for (int64_t r = 0; r < m; ++r) lk::rms_row(x + r * d, w, d, eps, y + r * d);
}

std::vector<paddle::Tensor> DecodeStep(const paddle::Tensor& x, const paddle::Tensor& cos, const paddle::Tensor& sin,
                                       const paddle::Tensor& bias, const std::vector<paddle::Tensor>& weights,
                                       const std::vector<paddle::Tensor>& caches, const std::vector<int>& slots,
                                       const int& heads, const int& col, const int& span, const float& eps,
                                       const float& q_scale) {
  for (const auto* t : {&x, &cos, &sin, &bias})
    PD_CHECK(cpu_f32(*t), kOp, ": X, Cos, Sin and Bias must be float32 CPU tensors");
  const auto xs = x.shape(), cs = cos.shape(), bs = bias.shape();
  PD_CHECK(xs.size() == 3 && xs[1] == 1, kOp, ": X must be [B, 1, hidden] (one new token per sequence)");
  const int64_t B = xs[0], Hd = xs[2], H = heads;
  PD_CHECK(cs.size() == 4 && cs[0] == B && cs[1] == 1 && cs[2] > H && sin.shape() == cs, kOp,
           ": Cos / Sin must be [B, 1, heads + kv_heads, D]");
  const int64_t R = cs[2], KV = R - H, D = cs[3], C = (H + 2 * KV) * D;
  PD_CHECK(H % KV == 0, kOp, ": heads=", H, " must be a multiple of kv_heads=", KV);
  const int64_t L = static_cast<int64_t>(caches.size()) / 2;
  PD_CHECK(caches.size() % 2 == 0 && static_cast<int64_t>(slots.size()) == L * kSlots, kOp, ": ", slots.size(),
           " slots for ", caches.size(), " caches (need ", kSlots, " slots per layer and a key and value cache)");
  int64_t total = 0;
  for (int c : slots) {
    PD_CHECK(c >= 0 && c <= 3, kOp, ": a slot kind is 0, 1, 2 or 3");
    total += tensors_of(c);
  }
  PD_CHECK(total == static_cast<int64_t>(weights.size()), kOp, ": slots count ", total, " tensors, got ",
           weights.size());
  const int64_t T = L ? caches[0].shape()[2] : 0;
  for (const auto& c : caches)
    PD_CHECK(cpu_f32(c) && c.shape() == std::vector<int64_t>({B, KV, T, D}), kOp,
             ": every cache must be float32 [B, kv_heads, T, D]");
  PD_CHECK(col >= 0 && col < span && span <= T, kOp, ": need 0 <= col < span <= T, got col=", col,
           " span=", span, " T=", T);
  PD_CHECK(bs == std::vector<int64_t>({B, KV, H / KV, span}), kOp, ": Bias must be [B, kv_heads, heads / kv_heads, span]");

  auto out = paddle::empty({B, 1, Hd}, DataType::FLOAT32, paddle::CPUPlace());
  float* h = out.data<float>();
  std::memcpy(h, x.data<float>(), size_t(B * Hd) * sizeof(float));
  const lk::KernelSet* ks = lk::active_kernels();
  thread_local std::vector<float> xn, qkv, q, ctx, tmp, gu, act, scratch;
  xn.resize(size_t(B * Hd));
  tmp.resize(size_t(B * Hd));
  qkv.resize(size_t(B * C));
  q.resize(size_t(B * H * D));
  ctx.resize(size_t(B * H * D));
  const float *cp = cos.data<float>(), *sp = sin.data<float>();

  const paddle::Tensor* t = weights.data();
  for (int64_t l = 0; l < L; ++l) {
    const int* n = slots.data() + l * kSlots;
    const paddle::Tensor* at[kSlots];
    for (int s = 0; s < kSlots; ++s) {
      at[s] = t;
      t += tensors_of(n[s]);
    }
    const int li = static_cast<int>(l);
    const float* ln1 = vector_of(at[kLn1], n[kLn1], Hd, li, kLn1);
    Proj pqkv = make_proj(at[kQkv], n[kQkv], Hd, ks, li, kQkv);
    PD_CHECK(pqkv.N == C, kOp, ": layer ", l, " qkv has ", pqkv.N, " outputs, expected (heads + 2 kv) * D = ", C);
    pqkv.bias = vector_of(at[kQkvB], n[kQkvB], C, li, kQkvB);
    Proj pout = make_proj(at[kOut], n[kOut], H * D, ks, li, kOut);
    PD_CHECK(pout.N == Hd, kOp, ": layer ", l, " out has ", pout.N, " outputs, expected hidden = ", Hd);
    pout.bias = vector_of(at[kOutB], n[kOutB], Hd, li, kOutB);
    const float* ln2 = vector_of(at[kLn2], n[kLn2], Hd, li, kLn2);
    Proj pgu = make_proj(at[kGu], n[kGu], Hd, ks, li, kGu);
    PD_CHECK(pgu.N % 2 == 0, kOp, ": layer ", l, " gate_up must have an even number of outputs ([gate | up])");
    pgu.bias = vector_of(at[kGuB], n[kGuB], pgu.N, li, kGuB);
    const int64_t I = pgu.N / 2;
    Proj pdown = make_proj(at[kDown], n[kDown], I, ks, li, kDown);
    PD_CHECK(pdown.N == Hd, kOp, ": layer ", l, " down has ", pdown.N, " outputs, expected hidden = ", Hd);
    pdown.bias = vector_of(at[kDownB], n[kDownB], Hd, li, kDownB);
    float* kc = const_cast<float*>(caches[2 * l].data<float>());
    float* vc = const_cast<float*>(caches[2 * l + 1].data<float>());

    // attention block
    rms_rows(h, ln1, B, Hd, eps, xn.data());
    apply(pqkv, xn.data(), B, qkv.data(), scratch);
    for (int64_t b = 0; b < B; ++b) {
      const float* row = qkv.data() + b * C;
      for (int64_t r = 0; r < R; ++r) {  // H query heads, then KV key heads (llm_rope_qkv's arithmetic)
        const float* xr = row + r * D;
        const float* c = cp + (b * R + r) * D;
        const float* sn = sp + (b * R + r) * D;
        float* y = r < H ? q.data() + (b * H + r) * D : kc + ((b * KV + (r - H)) * T + col) * D;
        lk::rope_head(xr, c, sn, D, r < H ? q_scale : 1.0f, y);
      }
      for (int64_t j = 0; j < KV; ++j)
        std::memcpy(vc + ((b * KV + j) * T + col) * D, row + (R + j) * D, size_t(D) * sizeof(float));
    }
    lk::AttnArgs aa;
    aa.q = q.data();
    aa.k = kc;
    aa.v = vc;
    aa.bias = bias.data<float>();
    aa.out = ctx.data();
    aa.B = B, aa.H = H, aa.KV = KV, aa.T = T, aa.S = span, aa.D = D;
    lk::run_attention(ks, aa);
    apply(pout, ctx.data(), B, tmp.data(), scratch);
    for (int64_t i = 0; i < B * Hd; ++i) h[i] = h[i] + tmp[i];

    // MLP block
    rms_rows(h, ln2, B, Hd, eps, xn.data());
    gu.resize(size_t(B * 2 * I));
    act.resize(size_t(B * I));
    apply(pgu, xn.data(), B, gu.data(), scratch);
    for (int64_t b = 0; b < B; ++b)  // llm_swiglu's arithmetic
      lk::swiglu_row(gu.data() + b * 2 * I, gu.data() + b * 2 * I + I, I, act.data() + b * I);
    apply(pdown, act.data(), B, tmp.data(), scratch);
    for (int64_t i = 0; i < B * Hd; ++i) h[i] = h[i] + tmp[i];
  }
  return {out};
}

std::vector<std::vector<int64_t>> ShapeStep(const std::vector<int64_t>& x, const std::vector<int64_t>&,
                                            const std::vector<int64_t>&, const std::vector<int64_t>&,
                                            const std::vector<std::vector<int64_t>>&,
                                            const std::vector<std::vector<int64_t>>&, const std::vector<int>&,
                                            const int&, const int&, const int&, const float&, const float&) {
  return {x};
}
std::vector<DataType> DtypeStep(const DataType&, const DataType&, const DataType&, const DataType&,
                                const std::vector<DataType>&, const std::vector<DataType>&) {
  return {DataType::FLOAT32};
}

}  // namespace

PD_BUILD_OP(llm_decode_step)
    .Inputs({"X", "Cos", "Sin", "Bias", paddle::Vec("Weights"), paddle::Vec("Caches")})
    .Outputs({"Out"})
    .Attrs({"slots: std::vector<int>", "heads: int", "col: int", "span: int", "eps: float", "q_scale: float"})
    .SetKernelFn(PD_KERNEL(DecodeStep))
    .SetInferShapeFn(PD_INFER_SHAPE(ShapeStep))
    .SetInferDtypeFn(PD_INFER_DTYPE(DtypeStep));
