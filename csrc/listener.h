// Listener confidence: the math shared by the CPU kernel (ops.cpp) and the CUDA kernel
// (cuda/listener_kernel.cuh). No ATen here, so nvcc compiles it alone in CI (see
// tests/test_listener_op.py::test_cuda_kernel_compiles_for_sm90).
//
// For one row z of V logits, temperature tau and candidate ids c_1..c_K:
//   logp_k  = z[c_k]/tau - logsumexp(z/tau)            (full-vocabulary log-softmax)
//   probs_k = softmax_k(z[c_1..c_K]/tau)                (softmax over the K candidates only)
// logsumexp is accumulated in one pass as a running (max, sum) pair in fp32 whatever the input
// dtype. The max is kept on the raw, unscaled logits and every exponent is formed as
// (x - max) * log2(e)/tau: the difference of two nearby logits is exact, so |z| ~ 1e4 costs no
// absolute accuracy (dividing first would round z/tau to ~1e-3 at that magnitude).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define LGRPO_HD __host__ __device__ __forceinline__
#else
#define LGRPO_HD inline
#endif

namespace lgrpo {
namespace listener {

constexpr float kLog2e = 1.4426950408889634f;

// Row status written by both kernels, one int32 per row; the host turns the first non-zero one
// into an IndexError naming the argument (ops.cpp: raise_on_bad_rows).
constexpr int32_t kRowOk = 0;
constexpr int32_t kBadPosition = -1;  // positions[b] outside [0, T)
// k + 1 (> 0): candidate_ids[b, k] (or [k]) outside [0, V); k is the first bad candidate.

// Everything a kernel needs, as raw pointers and element strides (logits may be a strided view:
// only the vocabulary stride is expected to be 1 for the fast path, any other value works).
struct Params {
  const void* logits;
  int64_t stride_b, stride_t, stride_v;  // element strides of logits; stride_t unused for [B, V]
  int64_t batch, seq_len, vocab;         // B, T (0 for [B, V]), V
  const void* positions;                 // [B] int32/int64, or nullptr for [B, V] logits
  int64_t pos_stride;
  bool pos_int64;
  const void* cand;                      // [K] or [B, K] int32/int64
  int64_t cand_stride_b;                 // 0 when the K ids are shared by every row
  int64_t cand_stride_k;
  bool cand_int64;
  int64_t k;                             // K >= 1
  float inv_tau;                         // 1 / temperature
  float scale;                           // log2(e) / temperature: exponents go through exp2
  float* probs;                          // [B, K] fp32, contiguous
  float* logp;                           // [B, K] fp32, contiguous
  int32_t* status;                       // [B] row status, or nullptr (not wanted)
};

LGRPO_HD int64_t load_index(const void* p, bool is_int64, int64_t i) {
  return is_int64 ? static_cast<const int64_t*>(p)[i] : static_cast<int64_t>(static_cast<const int32_t*>(p)[i]);
}

LGRPO_HD float exp2_(float x) {
#if defined(__CUDA_ARCH__)
  // MUFU.EX2 directly (2 ulp), flushing denormal results to 0: a term below 2^-126 cannot move a
  // sum that holds exp2(0) = 1 for its max. exp2(-inf) = 0.
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return std::exp2(x);
#endif
}

LGRPO_HD float log_(float x) {
#if defined(__CUDA_ARCH__)
  return logf(x);
#else
  return std::log(x);
#endif
}

// Running log-sum-exp of raw logits: sum = sum_i exp((x_i - max) / tau).
struct LSE {
  float max;
  float sum;
};

LGRPO_HD LSE lse_empty() { return {-INFINITY, 0.f}; }

// Reference point for the exponents: the running max, or 0 while everything seen is -inf. With
// max = -inf, (x - max) would be -inf - -inf = NaN; with 0 every -inf term is exp2(-inf) = 0.
LGRPO_HD float lse_ref(float m) { return m == -INFINITY ? 0.f : m; }

// Fold n values, x(0) .. x(n-1), into the running state: one rescale per call, one exp2 per value.
// x is any callable returning float: CUDA passes one unpacking registers loaded 16 bytes at a time
// (n a compile-time constant, fully unrolled), the CPU one converting a block of the row. The n
// terms are summed on their own before joining the running sum: adding 150k small terms one by
// one to a large sum drifts by ~1e-4 relative in fp32; two levels keep it near 1e-6. A NaN value
// is skipped by fmaxf but makes its exp2 term NaN, so NaN reaches the sum and every output.
template <class X>
LGRPO_HD void lse_update(LSE& st, int n, const X& x, float scale) {
  float m = st.max;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int i = 0; i < n; ++i) m = fmaxf(m, x(i));
  const float ref = lse_ref(m);
  float t = 0.f;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int i = 0; i < n; ++i) t += exp2_((x(i) - ref) * scale);
  st.sum = st.sum * exp2_((st.max - ref) * scale) + t;
  st.max = m;
}

// Combine the states of two disjoint parts of a row (threads, warps, blocks).
LGRPO_HD LSE lse_merge(LSE a, LSE b, float scale) {
  const float m = fmaxf(a.max, b.max);
  const float ref = lse_ref(m);
  return {m, a.sum * exp2_((a.max - ref) * scale) + b.sum * exp2_((b.max - ref) * scale)};
}

// Full-vocabulary log-softmax of a raw candidate logit c, given the whole row's state.
// A row whose logits are all -inf has max = -inf: (c - max) is NaN, and so is the answer
// (the distribution is undefined; the fp64 reference says NaN too).
LGRPO_HD float cand_logp(float c, LSE row, float inv_tau) { return (c - row.max) * inv_tau - log_(row.sum); }

// exp((c - cmax) / tau): the unnormalised softmax-over-candidates weight, cmax = max candidate.
// All K candidates at -inf give (-inf - -inf) = NaN: probs are NaN, as in the reference.
LGRPO_HD float cand_weight(float c, float cmax, float scale) { return exp2_((c - cmax) * scale); }

}  // namespace listener
}  // namespace lgrpo
