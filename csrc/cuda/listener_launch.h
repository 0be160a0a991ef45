// The one entry point from the ATen side (cuda/listener_cuda.cpp, compiled by the host C++
// compiler) into the CUDA translation unit (cuda/listener.cu, compiled by nvcc). Plain types
// only: no ATen, no exceptions cross this line; errors come back as a cudaError_t.
#pragma once

#include <cuda_runtime_api.h>

#include "../listener.h"

namespace lgrpo {
namespace listener {

enum class LogitsDType { F32, F16, BF16 };

// Blocks per row at most: the portable cluster size, which every sm_90 part can schedule.
constexpr int kMaxChunks = 8;

// Launch the listener kernel for `p` on `stream` (device `device`). Requires p.batch >= 1 and
// p.batch * kMaxChunks <= INT_MAX (checked by the caller).
cudaError_t launch(LogitsDType dtype, const Params& p, cudaStream_t stream, int device);

}  // namespace listener
}  // namespace lgrpo
