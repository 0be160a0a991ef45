// CUDA registration of lgrpo::listener_confidence: checks, outputs, launch on the current stream,
// and the index check. Compiled by the host C++ compiler; the kernels live in listener.cu (nvcc),
// reached through the plain launcher of listener_launch.h.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <vector>

#include "../ops.h"
#include "listener_launch.h"

namespace lgrpo {
namespace {

bool is_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

listener::LogitsDType logits_dtype(const at::Tensor& logits) {  // the dtype is checked by listener_params
  return logits.scalar_type() == at::kFloat  ? listener::LogitsDType::F32
         : logits.scalar_type() == at::kHalf ? listener::LogitsDType::F16
                                             : listener::LogitsDType::BF16;
}

std::tuple<at::Tensor, at::Tensor> listener_confidence_cuda(const at::Tensor& logits,
                                                            const std::optional<at::Tensor>& positions,
                                                            const at::Tensor& candidate_ids, double temperature,
                                                            bool check_indices) {
  // Also catches CPU logits with CUDA indices (the dispatcher picks this kernel for either).
  listener::Params p = listener_params(logits, positions, candidate_ids, temperature);
  TORCH_CHECK_VALUE(logits.is_cuda(), "logits must be on a CUDA device here, got ", txt(logits.device()));
  TORCH_CHECK_VALUE(p.batch <= INT_MAX / listener::kMaxChunks, "logits has too many rows for one launch (B = ",
                    txt(p.batch), ")");
  const c10::cuda::CUDAGuard guard(logits.device());
  auto out = listener_outputs(logits, p);
  if (p.batch == 0) return out;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(logits.device().index());
  // A graph being captured cannot sync: there, bad indices give NaN rows and no error.
  const bool check = check_indices && !is_capturing(stream);
  at::Tensor status;
  if (check) {
    status = at::empty({p.batch}, logits.options().dtype(at::kInt));
    p.status = status.data_ptr<int32_t>();  // every row's entry is written by the kernel: no memset
  }

  C10_CUDA_CHECK(listener::launch(logits_dtype(logits), p, stream, logits.device().index()));

  if (check) {
    // One copy of B int32 to the host; it waits for the kernel on this stream.
    const at::Tensor host = status.cpu();
    raise_on_bad_rows(host.data_ptr<int32_t>(), p, positions, candidate_ids);
  }
  return out;
}

std::vector<int64_t> listener_launch_plan_cuda(const at::Tensor& logits, const std::optional<at::Tensor>& positions,
                                               const at::Tensor& candidate_ids) {
  const listener::Params p = listener_params(logits, positions, candidate_ids, 1.0);
  TORCH_CHECK_VALUE(logits.is_cuda(), "logits must be on a CUDA device here, got ", txt(logits.device()));
  if (p.batch == 0) return {0, 0, 0, 0};
  const c10::cuda::CUDAGuard guard(logits.device());
  listener::LaunchPlan plan{};
  C10_CUDA_CHECK(listener::plan(logits_dtype(logits), p, logits.device().index(), &plan));
  return {plan.chunks, plan.sms, plan.blocks_per_sm, plan.clusters ? 1 : 0};
}

}  // namespace

TORCH_LIBRARY_IMPL(lgrpo, CUDA, m) {
  m.impl("listener_confidence", &listener_confidence_cuda);
  m.impl("listener_launch_plan", &listener_launch_plan_cuda);
}

}  // namespace lgrpo
