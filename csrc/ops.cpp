// lgrpo._C: the schema of every native op, their CPU kernels, and an empty Python module whose
// import loads this library (running the TORCH_LIBRARY registrations). No pybind11: the ops are
// reached through the dispatcher as torch.ops.lgrpo.*, so the library builds against the limited
// Python API (one abi3 binary for every CPython >= 3.10).
#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <vector>

#include "listener.h"
#include "ops.h"

extern "C" {
// `import lgrpo._C` needs a module init; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",   // name
      nullptr,  // doc
      -1,     // no per-interpreter state
      nullptr,  // no methods: the ops live in torch.ops.lgrpo
  };
  return PyModule_Create(&module_def);
}
}

namespace lgrpo {

namespace {

bool is_index_dtype(const at::Tensor& t) { return t.scalar_type() == at::kLong || t.scalar_type() == at::kInt; }

void check_same_device(const char* name, const at::Tensor& t, const at::Tensor& logits) {
  TORCH_CHECK_VALUE(t.device() == logits.device(), name, " is on ", txt(t.device()), " but logits are on ",
                    txt(logits.device()));
}

}  // namespace

listener::Params listener_params(const at::Tensor& logits, const std::optional<at::Tensor>& positions,
                                 const at::Tensor& candidate_ids, double temperature) {
  const auto dtype = logits.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
                    "logits must be fp32, fp16 or bf16, got ", dtype);
  TORCH_CHECK_VALUE(temperature > 0 && std::isfinite(temperature), "temperature must be a finite number > 0, got ",
                    txt(temperature));
  const int64_t rank = logits.dim();
  TORCH_CHECK_VALUE(rank == 2 || rank == 3, "logits must be [B, T, V] or [B, V], got rank ", txt(rank));
  const int64_t batch = logits.size(0);
  const int64_t vocab = logits.size(-1);
  TORCH_CHECK_VALUE(vocab >= 1, "logits has an empty vocabulary dimension (V = 0)");

  listener::Params p{};
  p.logits = logits.data_ptr();
  p.batch = batch;
  p.vocab = vocab;
  p.stride_b = logits.stride(0);
  p.stride_v = logits.stride(-1);
  if (rank == 3) {
    TORCH_CHECK_VALUE(positions.has_value(), "positions [B] is required for logits of shape [B, T, V]");
    const at::Tensor& pos = *positions;
    TORCH_CHECK_VALUE(pos.dim() == 1 && pos.size(0) == batch && is_index_dtype(pos),
                      "positions must be an int32 or int64 tensor of shape [", txt(batch), "], got ", txt(pos.sizes()), " ",
                      pos.scalar_type());
    check_same_device("positions", pos, logits);
    p.seq_len = logits.size(1);
    p.stride_t = logits.stride(1);
    p.positions = pos.data_ptr();
    p.pos_stride = pos.stride(0);
    p.pos_int64 = pos.scalar_type() == at::kLong;
  } else {
    TORCH_CHECK_VALUE(!positions.has_value(), "positions must be None for logits of shape [B, V]");
  }

  const at::Tensor& cand = candidate_ids;
  TORCH_CHECK_VALUE((cand.dim() == 1 || cand.dim() == 2) && is_index_dtype(cand),
                    "candidate_ids must be an int32 or int64 tensor [K] or [B, K], got ", txt(cand.sizes()), " ",
                    cand.scalar_type());
  TORCH_CHECK_VALUE(cand.dim() == 1 || cand.size(0) == batch, "candidate_ids [B, K] must have B = ", txt(batch),
                    " rows, got ", txt(cand.size(0)));
  const int64_t k = cand.size(-1);
  TORCH_CHECK_VALUE(k >= 1, "candidate_ids must hold at least one candidate (K >= 1)");
  TORCH_CHECK_VALUE(k < INT_MAX, "candidate_ids holds too many candidates (K = ", txt(k), ")");
  check_same_device("candidate_ids", cand, logits);
  p.cand = cand.data_ptr();
  p.cand_int64 = cand.scalar_type() == at::kLong;
  p.cand_stride_b = cand.dim() == 2 ? cand.stride(0) : 0;
  p.cand_stride_k = cand.stride(-1);
  p.k = k;
  p.inv_tau = static_cast<float>(1.0 / temperature);
  p.scale = static_cast<float>(static_cast<double>(listener::kLog2e) / temperature);
  return p;
}

std::tuple<at::Tensor, at::Tensor> listener_outputs(const at::Tensor& logits, listener::Params& p) {
  const auto opts = logits.options().dtype(at::kFloat);
  at::Tensor probs = at::empty({p.batch, p.k}, opts);
  at::Tensor logp = at::empty({p.batch, p.k}, opts);
  p.probs = probs.data_ptr<float>();
  p.logp = logp.data_ptr<float>();
  return {probs, logp};
}

void raise_on_bad_rows(const int32_t* status, const listener::Params& p, const std::optional<at::Tensor>& positions,
                       const at::Tensor& candidate_ids) {
  for (int64_t b = 0; b < p.batch; ++b) {
    const int32_t s = status[b];
    if (s == listener::kRowOk) continue;
    // Error path only: reading the offending value may sync a device, which no longer matters.
    if (s == listener::kBadPosition) {
      const int64_t v = positions->select(0, b).item<int64_t>();
      TORCH_CHECK_INDEX(false, "positions[", txt(b), "] = ", txt(v), " is outside [0, ", txt(p.seq_len), "), the range of logits' T");
    }
    const int64_t k = s - 1;
    const bool shared = candidate_ids.dim() == 1;
    const int64_t v = (shared ? candidate_ids.select(0, k) : candidate_ids.select(0, b).select(0, k)).item<int64_t>();
    if (shared) {
      TORCH_CHECK_INDEX(false, "candidate_ids[", txt(k), "] = ", txt(v), " is outside the vocabulary [0, ", txt(p.vocab), ")");
    }
    TORCH_CHECK_INDEX(false, "candidate_ids[", txt(b), ", ", txt(k), "] = ", txt(v), " is outside the vocabulary [0, ",
                      txt(p.vocab), ")");
  }
}

namespace {

constexpr int64_t kCpuBlock = 512;  // logits converted to fp32 per lse_update call

// One row, one pass: status of the row; the outputs are written (NaN for an invalid row).
template <typename scalar_t>
int32_t listener_row_cpu(const listener::Params& p, int64_t b, float* buf) {
  using namespace listener;
  float* probs = p.probs + b * p.k;
  float* logp = p.logp + b * p.k;
  int32_t status = kRowOk;
  int64_t pos = 0;
  if (p.positions != nullptr) {
    pos = load_index(p.positions, p.pos_int64, b * p.pos_stride);
    if (pos < 0 || pos >= p.seq_len) status = kBadPosition;
  }
  auto cand_id = [&](int64_t k) { return load_index(p.cand, p.cand_int64, b * p.cand_stride_b + k * p.cand_stride_k); };
  for (int64_t k = 0; k < p.k && status == kRowOk; ++k) {
    const int64_t id = cand_id(k);
    if (id < 0 || id >= p.vocab) status = static_cast<int32_t>(k + 1);
  }
  if (status != kRowOk) {
    std::fill(probs, probs + p.k, NAN);
    std::fill(logp, logp + p.k, NAN);
    return status;
  }

  const scalar_t* row = static_cast<const scalar_t*>(p.logits) + b * p.stride_b + pos * p.stride_t;
  LSE st = lse_empty();
  for (int64_t j0 = 0; j0 < p.vocab; j0 += kCpuBlock) {
    const int64_t n = std::min(kCpuBlock, p.vocab - j0);
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(row[(j0 + i) * p.stride_v]);
    lse_update(st, static_cast<int>(n), [buf](int i) { return buf[i]; }, p.scale);
  }
  auto cand_logit = [&](int64_t k) { return static_cast<float>(row[cand_id(k) * p.stride_v]); };
  float cmax = -INFINITY;
  for (int64_t k = 0; k < p.k; ++k) cmax = std::fmax(cmax, cand_logit(k));
  float csum = 0.f;
  for (int64_t k = 0; k < p.k; ++k) csum += cand_weight(cand_logit(k), cmax, p.scale);
  for (int64_t k = 0; k < p.k; ++k) {
    const float c = cand_logit(k);
    probs[k] = cand_weight(c, cmax, p.scale) / csum;
    logp[k] = cand_logp(c, st, p.inv_tau);
  }
  return kRowOk;
}

template <typename scalar_t>
void listener_rows_cpu(const listener::Params& p, int32_t* status) {
  // Rows in parallel; a grain of ~32k logits per task (ATen's own GRAIN_SIZE) keeps tiny rows from
  // spawning tiny tasks.
  constexpr int64_t kGrainLogits = 32768;
  const int64_t grain = std::max<int64_t>(1, kGrainLogits / p.vocab);
  at::parallel_for(0, p.batch, grain, [&](int64_t b0, int64_t b1) {
    std::vector<float> buf(kCpuBlock);
    for (int64_t b = b0; b < b1; ++b) status[b] = listener_row_cpu<scalar_t>(p, b, buf.data());
  });
}

std::tuple<at::Tensor, at::Tensor> listener_confidence_cpu(const at::Tensor& logits,
                                                           const std::optional<at::Tensor>& positions,
                                                           const at::Tensor& candidate_ids, double temperature,
                                                           bool check_indices) {
  listener::Params p = listener_params(logits, positions, candidate_ids, temperature);
  auto out = listener_outputs(logits, p);
  if (p.batch == 0) return out;
  std::vector<int32_t> status(p.batch);
  switch (logits.scalar_type()) {
    case at::kFloat: listener_rows_cpu<float>(p, status.data()); break;
    case at::kHalf: listener_rows_cpu<c10::Half>(p, status.data()); break;
    default: listener_rows_cpu<c10::BFloat16>(p, status.data()); break;  // dtype checked in listener_params
  }
  // The check is free on the CPU; check_indices=False still gives the documented NaN rows, as on CUDA.
  if (check_indices) raise_on_bad_rows(status.data(), p, positions, candidate_ids);
  return out;
}

}  // namespace

TORCH_LIBRARY(lgrpo, m) {
  // check_indices: raise IndexError for an out-of-range position or candidate id. On CUDA that
  // costs one device-to-host copy of B int32 and a stream sync after the kernel; with False the
  // op is a single asynchronous launch and invalid rows come back as NaN instead.
  m.def(
      "listener_confidence(Tensor logits, Tensor? positions, Tensor candidate_ids, float temperature=1.0, *, "
      "bool check_indices=True) -> (Tensor probs, Tensor logp)");
  // How the CUDA kernel would split these arguments' work on their device: [blocks per row,
  // SMs, resident blocks per SM, clusters usable (0/1)]. CUDA only; for benchmarks and tests.
  m.def("listener_launch_plan(Tensor logits, Tensor? positions, Tensor candidate_ids) -> int[]");
}

TORCH_LIBRARY_IMPL(lgrpo, CPU, m) { m.impl("listener_confidence", &listener_confidence_cpu); }

// Not differentiable (the listener is frozen), like argmax: the outputs never require grad, so a
// backward through them fails loudly instead of silently giving zero gradients.
TORCH_LIBRARY_IMPL(lgrpo, Autograd, m) { m.impl("listener_confidence", torch::CppFunction::makeFallthrough()); }

}  // namespace lgrpo
