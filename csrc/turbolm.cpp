// The extension's Python module (pybind11): build information. The ops themselves are
// registered with the dispatcher (TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL in each op
// family's files) when the library is loaded, and are called as torch.ops.turbolm.<op>.
#include <pybind11/pybind11.h>
#include <torch/version.h>

#include <string>

#ifdef TURBOLM_WITH_CUDA
// Defined in common/cuda_info.cu, compiled by nvcc.
int turbolm_cudart_version();
const char* turbolm_cuda_archs();
#endif

#define TURBOLM_STR2(...) #__VA_ARGS__
#define TURBOLM_STR(...) TURBOLM_STR2(__VA_ARGS__)

namespace py = pybind11;

namespace {

py::dict build_info() {
  py::dict info;
  info["cpu"] = true;
#ifdef TURBOLM_WITH_CUDA
  info["cuda"] = true;
  const int v = turbolm_cudart_version();
  info["cuda_version"] = std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
  info["cuda_archs"] = std::string(turbolm_cuda_archs());
#else
  info["cuda"] = false;
  info["cuda_version"] = py::none();
  info["cuda_archs"] = py::none();
#endif
  info["torch_version"] = std::to_string(TORCH_VERSION_MAJOR) + "." +
                          std::to_string(TORCH_VERSION_MINOR) + "." +
                          std::to_string(TORCH_VERSION_PATCH);
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#else
  info["compiler"] = std::string("unknown");
#endif
#ifdef TURBOLM_SOURCE_HASH
  // -DTURBOLM_SOURCE_HASH=h<hex> (setup.py): the csrc/ hash this build was made from.
  info["source_hash"] = std::string(TURBOLM_STR(TURBOLM_SOURCE_HASH)).substr(1);
#else
  info["source_hash"] = py::none();
#endif
#ifdef TURBOLM_OP_FAMILIES
  // -DTURBOLM_OP_FAMILIES=norm,rnn (turbolm/ext.py): the csrc/ op folders compiled in.
  info["op_families"] = std::string(TURBOLM_STR(TURBOLM_OP_FAMILIES));
#else
  info["op_families"] = py::none();
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "turbolm C++/CUDA kernels (ops are registered as torch.ops.turbolm.*)";
  m.def("build_info", &build_info,
        "What this build contains: cpu / cuda parts, CUDA version and archs, torch version.");
}
