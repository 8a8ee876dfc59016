// CUDA facts of this build, for the module's build_info() (csrc/turbolm.cpp).
#include <cuda_runtime_api.h>

#define TURBOLM_STR2(...) #__VA_ARGS__
#define TURBOLM_STR(...) TURBOLM_STR2(__VA_ARGS__)

int turbolm_cudart_version() { return CUDART_VERSION; }

// The real architectures compiled for, e.g. "800,900" (nvcc defines __CUDA_ARCH_LIST__).
const char* turbolm_cuda_archs() {
#ifdef __CUDA_ARCH_LIST__
  return TURBOLM_STR(__CUDA_ARCH_LIST__);
#else
  return "unknown";
#endif
}
