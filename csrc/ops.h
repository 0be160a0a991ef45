// ATen-side pieces shared by the CPU kernel (ops.cpp) and the CUDA kernel (cuda/listener.cu):
// one place for the argument checks and one for the index errors.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "listener.h"

namespace lgrpo {

// Checks every argument that needs no tensor data (ranks, dtypes, shapes, devices, temperature)
// and returns the kernel parameters, output pointers left null. Throws ValueError naming the
// argument. Index ranges are checked by the kernels themselves (see raise_on_bad_rows).
listener::Params listener_params(const at::Tensor& logits, const std::optional<at::Tensor>& positions,
                                 const at::Tensor& candidate_ids, double temperature);

// The two fp32 [B, K] outputs on the logits' device, pointers stored into p.
std::tuple<at::Tensor, at::Tensor> listener_outputs(const at::Tensor& logits, listener::Params& p);

// Given the kernels' per-row status (host memory, B entries), throw IndexError naming the
// argument, the index and the offending value for the first invalid row; return if all are valid.
void raise_on_bad_rows(const int32_t* status, const listener::Params& p, const std::optional<at::Tensor>& positions,
                       const at::Tensor& candidate_ids);

}  // namespace lgrpo
