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

// How `launch` splits the work on a device: `chunks` blocks per row (a thread-block cluster when
// > 1), from the device's SM count and resident blocks per SM, and whether clusters can run there.
// The environment variable LGRPO_LISTENER_MAX_CHUNKS (1..kMaxChunks), read at every launch, caps
// chunks: a tuning knob for benchmarks (1 = one block per row, no clusters).
struct LaunchPlan {
  int chunks;
  int sms;
  int blocks_per_sm;
  bool clusters;
};

// The plan `launch` would use for `p` on `device` now (p.batch >= 1).
cudaError_t plan(LogitsDType dtype, const Params& p, int device, LaunchPlan* out);

// Launch the listener kernel for `p` on `stream` (device `device`). Requires p.batch >= 1 and
// p.batch * kMaxChunks <= INT_MAX (checked by the caller).
cudaError_t launch(LogitsDType dtype, const Params& p, cudaStream_t stream, int device);

}  // namespace listener
}  // namespace lgrpo
