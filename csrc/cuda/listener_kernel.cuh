// CUDA kernel and launcher of listener_confidence, free of ATen so that CI compiles it with the
// machine's nvcc for sm_90 (and sm_80) without a GPU and without torch's CUDA headers. The ATen
// side (checks, allocation, current stream, registration) is cuda/listener_cuda.cpp.
//
// Work split: a row of V logits is cut into `chunks` contiguous pieces, one thread block each
// (grid.x = B * chunks, so no 65535 limit on B). Each block streams its piece with 16-byte loads,
// several in flight per thread, into a per-thread running (max, sum), then reduces it with
// warp shuffles. With chunks > 1 the blocks of a row form a thread-block cluster (sm_90+) and
// combine their partial (max, sum) through distributed shared memory: still one launch, no
// global workspace, no counter to zero, no second kernel. Before sm_90 (or when the loaded
// binary lacks the sm_90 code) chunks is 1: one block per row.
#pragma once

#include <cooperative_groups.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <climits>
#include <cstdint>
#include <cstdlib>

#include "../listener.h"
#include "listener_launch.h"

namespace lgrpo {
namespace listener {

constexpr int kThreads = 256;  // 8 warps: 4 resident blocks per SM at <= 64 registers
// Logits per thread per step: 4 bf16/fp16 or 8 fp32 16-byte loads in flight (64 or 128 B). With
// 4-5 resident blocks per SM that is >= 64 KB in flight per SM, ~3x what an H100 needs to cover
// DRAM latency; 64 bf16 per step would need more than the 64 registers 4 blocks per SM allow
// (ptxas spills).
constexpr int kStepElems = 32;

// One tag per logits dtype: how a single element, and element e of an array of 32-bit words
// loaded 16 bytes at a time, become fp32; and the word that holds -inf in every lane (the filler
// of a masked-off load: it moves neither the max nor the sum). Raw bits (uint16_t) rather than
// __half / __nv_bfloat16 keep clear of the conversion-disabling macros torch's build defines
// (__CUDA_NO_HALF_CONVERSIONS__ and friends).
struct F32 {
  using storage = float;
  static constexpr int kVec = 4;  // elements per 16 bytes
  static constexpr uint32_t kNegInfWord = 0xff800000u;
  static __device__ __forceinline__ float one(storage v) { return v; }
  static __device__ __forceinline__ float elem(const uint32_t* w, int e) { return __uint_as_float(w[e]); }
};

struct BF16 {
  using storage = uint16_t;
  static constexpr int kVec = 8;
  static constexpr uint32_t kNegInfWord = 0xff80ff80u;
  // bf16 is the top half of an fp32: a shift is the exact conversion. Lower address = low half.
  static __device__ __forceinline__ float one(storage v) { return __uint_as_float(static_cast<uint32_t>(v) << 16); }
  static __device__ __forceinline__ float elem(const uint32_t* w, int e) {
    return __uint_as_float((e & 1) ? (w[e >> 1] & 0xffff0000u) : (w[e >> 1] << 16));
  }
};

struct F16 {
  using storage = uint16_t;
  static constexpr int kVec = 8;
  static constexpr uint32_t kNegInfWord = 0xfc00fc00u;
  static __device__ __forceinline__ float one(storage v) { return __half2float(__ushort_as_half(v)); }
  static __device__ __forceinline__ float elem(const uint32_t* w, int e) {
    return one(static_cast<storage>((e & 1) ? (w[e >> 1] >> 16) : (w[e >> 1] & 0xffffu)));
  }
};

__device__ __forceinline__ LSE warp_reduce_lse(LSE v, float scale) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    LSE o{__shfl_xor_sync(0xffffffffu, v.max, off), __shfl_xor_sync(0xffffffffu, v.sum, off)};
    v = lse_merge(v, o, scale);
  }
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

__device__ __forceinline__ int warp_min(int v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = min(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// Accumulate elements [begin, end) of a row read with stride `stride` (scalar loads): the head and
// tail around the aligned body, and whole rows whose vocabulary dimension is not contiguous.
template <class Tag>
__device__ __forceinline__ void scan_scalar(LSE& st, const typename Tag::storage* row, int64_t stride, int64_t begin,
                                            int64_t end, float scale) {
  for (int64_t j = begin + threadIdx.x; j < end; j += kThreads) {
    const float x = Tag::one(row[j * stride]);
    lse_update(st, 1, [&](int) { return x; }, scale);
  }
}

template <class Tag>
constexpr int unroll() { return kStepElems / Tag::kVec; }

// Accumulate 16-byte vectors [begin, end) of an aligned run of elements. Each step issues all
// kUnroll loads before using any; the last, partial step masks its missing loads to -inf instead
// of running a one-load-at-a-time remainder loop, so a block's piece costs
// ceil(vectors per thread / kUnroll) memory round trips.
template <class Tag>
__device__ __forceinline__ void scan_vectors(LSE& st, const uint4* vp, int64_t begin, int64_t end, float scale) {
  constexpr int kUnroll = unroll<Tag>();
  for (int64_t i = begin + threadIdx.x; i < end; i += kUnroll * kThreads) {
    uint32_t w[4 * kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = i + static_cast<int64_t>(u) * kThreads;
      uint4 r = make_uint4(Tag::kNegInfWord, Tag::kNegInfWord, Tag::kNegInfWord, Tag::kNegInfWord);
      if (j < end) r = __ldg(vp + j);
      w[4 * u] = r.x;
      w[4 * u + 1] = r.y;
      w[4 * u + 2] = r.z;
      w[4 * u + 3] = r.w;
    }
    lse_update(st, kStepElems, [&](int e) { return Tag::elem(w, e); }, scale);
  }
}

template <class Tag>
__global__ void __launch_bounds__(kThreads, 4) listener_kernel(const Params p, const int chunks) {
  using storage = typename Tag::storage;
  const int64_t row = blockIdx.x / chunks;
  const int rank = static_cast<int>(blockIdx.x % chunks);  // == cluster block rank (cluster dims (chunks,1,1))
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t V = p.vocab;

  // An out-of-range position is never dereferenced: the row is skipped and reported.
  int64_t pos = 0;
  bool pos_ok = true;
  if (p.positions != nullptr) {
    pos = load_index(p.positions, p.pos_int64, row * p.pos_stride);
    pos_ok = pos >= 0 && pos < p.seq_len;
  }
  const storage* rowp = static_cast<const storage*>(p.logits) + row * p.stride_b + (pos_ok ? pos * p.stride_t : 0);

  // Warp 0 of the combining block fetches its first 32 candidate logits now, so their latency
  // hides behind the scan instead of following it.
  const bool finisher = rank == 0 && warp == 0;
  float cand_first = 0.f;
  if (finisher && lane < p.k && pos_ok) {
    const int64_t id = load_index(p.cand, p.cand_int64, row * p.cand_stride_b + lane * p.cand_stride_k);
    if (id >= 0 && id < V) cand_first = Tag::one(__ldg(rowp + id * p.stride_v));
  }

  LSE st = lse_empty();
  if (pos_ok) {
    if (p.stride_v == 1) {
      // Vector body from the first 16-byte boundary of the row (rows of odd length in 2-byte
      // dtypes alternate alignment); `head` and the tail (< kVec elements each) go scalar.
      constexpr int kVec = Tag::kVec;
      const uintptr_t addr = reinterpret_cast<uintptr_t>(rowp);
      int64_t head = static_cast<int64_t>(((16u - (addr & 15u)) & 15u) / sizeof(storage));
      if (head > V) head = V;
      const int64_t nvec = (V - head) / kVec;
      const int64_t per = (nvec + chunks - 1) / chunks;
      const int64_t vbeg = min(nvec, rank * per);
      const int64_t vend = min(nvec, vbeg + per);
      scan_vectors<Tag>(st, reinterpret_cast<const uint4*>(rowp + head), vbeg, vend, p.scale);
      if (rank == chunks - 1) {  // the last piece is never longer than the others: it takes the edges
        scan_scalar<Tag>(st, rowp, 1, 0, head, p.scale);
        scan_scalar<Tag>(st, rowp, 1, head + nvec * kVec, V, p.scale);
      }
    } else {
      const int64_t per = (V + chunks - 1) / chunks;
      const int64_t beg = min(V, rank * per);
      scan_scalar<Tag>(st, rowp, p.stride_v, beg, min(V, beg + per), p.scale);
    }
  }

  // Block reduction: warps, then warp 0 over the warp results.
  __shared__ LSE s_warp[kThreads / 32];
  __shared__ LSE s_block;  // this block's partial, read by rank 0 of the cluster
  st = warp_reduce_lse(st, p.scale);
  if (lane == 0) s_warp[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < kThreads / 32 ? s_warp[lane] : lse_empty();
    st = warp_reduce_lse(st, p.scale);
    if (lane == 0) s_block = st;
  }

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (chunks > 1) {
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();  // every block's s_block is written (release/acquire across the cluster)
    if (finisher) {
      LSE part = lse_empty();
      if (lane < chunks) part = *cluster.map_shared_rank(&s_block, lane);
      st = warp_reduce_lse(part, p.scale);
    }
    cluster.sync();  // no block exits (freeing its shared memory) before rank 0 has read it
  }
#endif
  if (!finisher) return;

  // Warp 0 of rank 0: the row's (max, sum) is in every lane of st. Candidates: check the ids,
  // softmax over the candidate logits, full-vocabulary log-softmax at them.
  const LSE row_st{__shfl_sync(0xffffffffu, st.max, 0), __shfl_sync(0xffffffffu, st.sum, 0)};
  auto cand_id = [&](int64_t k) { return load_index(p.cand, p.cand_int64, row * p.cand_stride_b + k * p.cand_stride_k); };
  auto cand_logit = [&](int64_t k) {  // only called for valid ids of a valid row
    return k == lane ? cand_first : Tag::one(__ldg(rowp + cand_id(k) * p.stride_v));
  };

  int bad = INT_MAX;
  for (int64_t k = lane; k < p.k; k += 32) {
    const int64_t id = cand_id(k);
    if (id < 0 || id >= V) bad = min(bad, static_cast<int>(k));  // K < INT_MAX: checked on the host
  }
  bad = warp_min(bad);
  const int32_t status = !pos_ok ? kBadPosition : (bad != INT_MAX ? bad + 1 : kRowOk);
  float* probs = p.probs + row * p.k;
  float* logp = p.logp + row * p.k;
  if (status != kRowOk) {
    // Never a silent wrong answer: an invalid row is NaN (and an error on the host unless the
    // caller turned the check off).
    for (int64_t k = lane; k < p.k; k += 32) probs[k] = logp[k] = NAN;
  } else {
    float cmax = -INFINITY;
    for (int64_t k = lane; k < p.k; k += 32) cmax = fmaxf(cmax, cand_logit(k));
    cmax = warp_max(cmax);
    float csum = 0.f;
    for (int64_t k = lane; k < p.k; k += 32) csum += cand_weight(cand_logit(k), cmax, p.scale);
    csum = warp_sum(csum);
    for (int64_t k = lane; k < p.k; k += 32) {
      const float c = cand_logit(k);
      probs[k] = cand_weight(c, cmax, p.scale) / csum;
      logp[k] = cand_logp(c, row_st, p.inv_tau);
    }
  }
  if (lane == 0 && p.status != nullptr) p.status[row] = status;
}

// Per-device launch facts, computed once: SM count, resident blocks per SM, and whether the
// cluster path can run (sm_90+ device AND the loaded kernel was compiled for sm_90+; a binary
// JIT-compiled from compute_80 PTX has no cluster code).
struct DeviceFacts {
  int sms;
  int blocks_per_sm;
  bool clusters;
};

constexpr int kMaxDevices = 64;

// 0 = not yet computed; concurrent first calls compute the same value, so races are benign.
template <class Tag>
inline std::atomic<int64_t>* facts_cache() {
  static std::atomic<int64_t> cache[kMaxDevices];
  return cache;
}

template <class Tag>
inline void store_facts(int device, const DeviceFacts& f) {
  if (device >= 0 && device < kMaxDevices)
    facts_cache<Tag>()[device].store(
        (static_cast<int64_t>(f.sms) << 32) | (static_cast<int64_t>(f.blocks_per_sm) << 1) | (f.clusters ? 1 : 0),
        std::memory_order_relaxed);
}

template <class Tag>
inline cudaError_t device_facts(int device, DeviceFacts* out) {
  std::atomic<int64_t>* cache = facts_cache<Tag>();
  if (device >= 0 && device < kMaxDevices) {
    const int64_t c = cache[device].load(std::memory_order_relaxed);
    if (c != 0) {
      *out = {static_cast<int>(c >> 32), static_cast<int>((c >> 1) & 0x7fffffff), (c & 1) != 0};
      return cudaSuccess;
    }
  }
  int sms = 0, major = 0, blocks = 0;
  cudaFuncAttributes attr;
  cudaError_t err;
  if ((err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device)) != cudaSuccess) return err;
  if ((err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device)) != cudaSuccess) return err;
  if ((err = cudaFuncGetAttributes(&attr, listener_kernel<Tag>)) != cudaSuccess) return err;
  if ((err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, listener_kernel<Tag>, kThreads, 0)) != cudaSuccess)
    return err;
  *out = {sms, blocks < 1 ? 1 : blocks, major >= 9 && attr.ptxVersion >= 90};
  store_facts<Tag>(device, *out);
  return cudaSuccess;
}

// The cap on blocks per row: kMaxChunks (the portable cluster size), or LGRPO_LISTENER_MAX_CHUNKS
// when that holds a number in 1..kMaxChunks (listener_launch.h).
inline int max_chunks() {
  const char* env = std::getenv("LGRPO_LISTENER_MAX_CHUNKS");
  const int v = env != nullptr ? std::atoi(env) : 0;
  return v >= 1 && v <= kMaxChunks ? v : kMaxChunks;
}

// Blocks per row: enough to fill one wave of resident blocks (B = 16 rows -> 8 blocks each on a
// 132-SM H100; B = 256 -> 2), never more than the row has full unrolled sweeps of work, never more
// than the cap; 1 without clusters.
inline int choose_chunks(const DeviceFacts& f, int64_t batch, int64_t row_work_vectors, int unroll, int cap) {
  if (!f.clusters || batch <= 0) return 1;
  const int64_t slots = static_cast<int64_t>(f.sms) * f.blocks_per_sm;
  int64_t chunks = slots / batch;
  const int64_t by_work = (row_work_vectors + kThreads * unroll - 1) / (kThreads * unroll);
  if (chunks > by_work) chunks = by_work;
  if (chunks > cap) chunks = cap;
  return chunks < 1 ? 1 : static_cast<int>(chunks);
}

template <class Tag>
cudaError_t make_plan(const Params& p, int device, LaunchPlan* out) {
  DeviceFacts f;
  const cudaError_t err = device_facts<Tag>(device, &f);
  if (err != cudaSuccess) return err;
  const int64_t work = p.stride_v == 1 ? p.vocab / Tag::kVec : p.vocab;
  *out = {choose_chunks(f, p.batch, work, unroll<Tag>(), max_chunks()), f.sms, f.blocks_per_sm, f.clusters};
  return cudaSuccess;
}

// Launch on `stream` (the caller's current stream). Host-side only; returns the CUDA error.
// Requires p.batch >= 1 and p.batch * kMaxChunks <= INT_MAX (checked by the caller).
template <class Tag>
cudaError_t launch_listener(const Params& p, cudaStream_t stream, int device) {
  LaunchPlan plan;
  cudaError_t err = make_plan<Tag>(p, device, &plan);
  if (err != cudaSuccess) return err;
  const int chunks = plan.chunks;

  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(p.batch * chunks), 1, 1);
  cfg.blockDim = dim3(kThreads, 1, 1);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  if (chunks > 1) {
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = static_cast<unsigned>(chunks);
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
  }
  err = cudaLaunchKernelEx(&cfg, listener_kernel<Tag>, p, chunks);
  if (err != cudaSuccess && chunks > 1) {
    // A cluster launch the device refuses (a configuration error, not a sticky fault): clear it,
    // stop using clusters on this device, and run one block per row instead.
    (void)cudaGetLastError();
    store_facts<Tag>(device, DeviceFacts{plan.sms, plan.blocks_per_sm, false});
    cfg.gridDim = dim3(static_cast<unsigned>(p.batch), 1, 1);
    cfg.attrs = nullptr;
    cfg.numAttrs = 0;
    err = cudaLaunchKernelEx(&cfg, listener_kernel<Tag>, p, 1);
  }
  return err;
}

}  // namespace listener
}  // namespace lgrpo
