// The CUDA translation unit: the kernels of listener_kernel.cuh, instantiated per logits dtype
// behind one plain launcher. ATen-free on purpose: nvcc compiles it alone (CI does, without a GPU
// and without torch's CUDA headers), and no C++ exception ever unwinds through nvcc-generated
// host code; the checks, allocation and errors live in listener_cuda.cpp (host compiler).
#include "listener_kernel.cuh"
#include "listener_launch.h"

namespace lgrpo {
namespace listener {

cudaError_t launch(LogitsDType dtype, const Params& p, cudaStream_t stream, int device) {
  switch (dtype) {
    case LogitsDType::F32: return launch_listener<F32>(p, stream, device);
    case LogitsDType::F16: return launch_listener<F16>(p, stream, device);
    case LogitsDType::BF16: return launch_listener<BF16>(p, stream, device);
  }
  return cudaErrorInvalidValue;
}

cudaError_t plan(LogitsDType dtype, const Params& p, int device, LaunchPlan* out) {
  switch (dtype) {
    case LogitsDType::F32: return make_plan<F32>(p, device, out);
    case LogitsDType::F16: return make_plan<F16>(p, device, out);
    case LogitsDType::BF16: return make_plan<BF16>(p, device, out);
  }
  return cudaErrorInvalidValue;
}

}  // namespace listener
}  // namespace lgrpo
