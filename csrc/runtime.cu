// The CUDA runtime linked into fastlm._C and the machine's driver, for fastlm/ops/_cuda.py's
// load-time check: the runtime is linked statically from the nvcc that built the module, and a
// runtime of a newer major version than the driver supports fails at the first launch with a
// misleading error (e.g. about shared memory), so the check refuses the module up front.
#include <cuda_runtime.h>

#include "kernels.h"

namespace fastlm {

int cuda_runtime_version() {
  int version = 0;
  if (cudaRuntimeGetVersion(&version) != cudaSuccess) return 0;
  return version;
}

int cuda_driver_version() {
  int version = 0;  // stays 0 where no driver is installed
  if (cudaDriverGetVersion(&version) != cudaSuccess) return -1;  // the query itself failed
  return version;
}

}  // namespace fastlm
