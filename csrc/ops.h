// ATen-side pieces shared by the CPU kernel (ops.cpp) and the CUDA kernel (cuda/listener.cu):
// one place for the argument checks and one for the index errors.
#pragma once

#include <ATen/core/Tensor.h>

#include <c10/core/Device.h>

#include <cstdio>
#include <optional>
#include <string>
#include <tuple>

#include "listener.h"

namespace lgrpo {

// Error-message text for numbers, shapes and devices, built without a std::ostream numeric insert.
// Why: on the H100 test machine (torch 2.11 venv, g++ 13) formatting an integer through an ostream
// inside this library crashed the process (SIGSEGV in num_put: the library's libstdc++ locale
// facets were not the process's), while streaming strings worked. std::to_string / snprintf and
// the formatting done inside libc10 (Device::str) need no locale facet.
inline std::string txt(int64_t v) { return std::to_string(v); }
inline std::string txt(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  return buf;
}
inline std::string txt(const c10::Device& d) { return d.str(); }
inline std::string txt(c10::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + "]";
}

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
