// Fused RNN layers and cells on CUDA: TORCH_LIBRARY_IMPL(turbolm, CUDA) of the ops defined
// in rnn.cpp (rnn_layer_fwd / rnn_layer_bwd / rnn_cell_fwd / rnn_cell_bwd).
//
// Design
// ------
// The time loop is the one of rnn_layer.h, shared with the CPU backend and run on the host:
// per step and direction one cuBLAS GEMM (the recurrent projection, accumulated into the
// step's pre-activations; the GRU's into a separate buffer) and one fused gate kernel;
// backward per step one fused gate-gradient kernel and one GEMM; the input projection, dx and
// the weight gradients are single GEMMs over all steps. The GEMMs go straight to cuBLAS (see
// "GEMMs" below: the current stream, the allow_tf32 setting for fp32) with raw pointers into
// buffers allocated once per call, so a step costs the host two launches and no allocation,
// dispatcher call or tensor view.
// fp16 / bf16 layers run every GEMM on half-precision operands with fp32 accumulation and fp32
// results (cuBLAS's mixed-precision GEMM); states, cell and gate math stay fp32.
//
// The gate kernels compute one (batch row, unit) per thread with the rnn_math.h formulas (the
// exact code the CPU build runs in CI).
//
// For small batches and hidden sizes the loop stays launch-bound (two launches per step).
// Not done yet: capturing the loop in a CUDA graph and the persistent small-hidden kernel that
// keeps W_hh on chip.
#include <ATen/core/Tensor.h>
#include <ATen/Context.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>
#include <dlfcn.h>
#include <library_types.h>
#if __has_include(<cublas_v2.h>)
#include <cublas_v2.h>  // only to check the constants below against
#endif

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "rnn_layer.h"

namespace turbolm::rnn {
namespace {

constexpr int kThreads = 256;

// One thread per (row b < n, unit j < H); grid-stride over n * H.
template <int MODE, bool PROJ, typename T, typename L>
__global__ void fwd_kernel(FwdStep<T, L> s) {
  const int64_t H = s.H, P = s.P, S = saved_of(MODE) * H;
  const int64_t total = s.n * H;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = idx / H, j = idx - b * H;
    T* h = s.h + b * P;
    T* ws = s.ws + b * S;
    T* out = s.out + b * s.out_ld;
    T h_prev = T(0);
    if (j < P) {  // P <= H: units j < P own the copy of h_{t-1}
      h_prev = h[j];
      s.hprev[b * P + j] = h_prev;
    }
    T hn;
    if (MODE == kLSTM) {
      lstm_fwd_unit(j, H, s.bias, ws, s.c + b * H, out);
      hn = out[j];
    } else if (MODE == kGRU) {
      hn = gru_fwd_unit(j, H, s.bias, s.b_hn, h_prev, s.gh + b * 3 * H, ws);
      out[j] = hn;
    } else {
      hn = rnn_fwd_unit(j, s.bias, MODE == kRNNRelu, ws);
      out[j] = hn;
    }
    if (!PROJ) {
      h[j] = hn;
      if constexpr (!std::is_same_v<T, L>) s.h_lp[b * P + j] = static_cast<L>(hn);
    }
  }
}

template <int MODE, bool HAS_DY, typename T, typename L>
__global__ void bwd_kernel(BwdStep<T, L> s) {
  const int64_t H = s.H, G = gates_of(MODE) * H, S = saved_of(MODE) * H;
  const int64_t total = s.n * H;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = idx / H, j = idx - b * H;
    T* dh = s.dh_in + b * s.dh_ld;
    const T d = HAS_DY ? dh[j] + s.dy[b * s.dy_ld + j] : dh[j];
    const T* ws = s.ws + b * S;
    L* dgi = s.dgi + b * s.dgi_ld;
    if (MODE == kLSTM) {
      lstm_bwd_unit(j, H, d, ws, s.dc + b * H, dgi);
    } else if (MODE == kGRU) {
      dh[j] = gru_bwd_unit(j, H, d, ws, s.hprev[b * s.P + j], dgi, s.dgh + b * G);
    } else {
      dgi[j] = rnn_bwd_unit(j, d, ws, MODE == kRNNRelu);
    }
  }
}

int blocks_for(int64_t work) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(blocks, 65535)));
}

// ---- GEMMs ------------------------------------------------------------------------------------
//
// cuBLAS, called directly. Not through ATen (at::mm / addmm_ per step cost the host a
// dispatcher round trip and tensor views per GEMM, and cannot accumulate half-precision
// products into an fp32 buffer) and not through torch's C++ wrappers (ATen/cuda/CUDABlas.h
// needs the cuBLAS / cuSPARSE headers, which nvcc-only CUDA installs lack). The few C entry
// points come from the libcublas that libtorch_cuda already loaded (dlopen RTLD_NOLOAD, by
// soname), so nothing extra is linked; the C ABI below is cuBLAS's stable v2 API.
// Handles: one per host thread and device (the forward and backward of autograd run on
// different threads), bound to the current stream on every call. fp32 GEMMs follow
// torch.backends.cuda.matmul.allow_tf32 (as at::mm does); half-precision operands accumulate
// in fp32 with fp32 reductions (CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION).
namespace blas {

using Handle = void*;  // cublasHandle_t
using Status = int;    // cublasStatus_t, CUBLAS_STATUS_SUCCESS = 0
constexpr int kOpN = 0, kOpT = 1;                                       // cublasOperation_t
constexpr int kDefaultMath = 0, kTF32Math = 3, kNoReducedReduction = 16;  // cublasMath_t
constexpr int kCompute32F = 68;                                         // cublasComputeType_t
constexpr int kGemmDefault = -1;                                        // cublasGemmAlgo_t

#if __has_include(<cublas_v2.h>)
static_assert(CUBLAS_OP_N == kOpN && CUBLAS_OP_T == kOpT, "cublasOperation_t");
static_assert(CUBLAS_DEFAULT_MATH == kDefaultMath && CUBLAS_TF32_TENSOR_OP_MATH == kTF32Math &&
                  CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION == kNoReducedReduction,
              "cublasMath_t");
static_assert(CUBLAS_COMPUTE_32F == kCompute32F && CUBLAS_GEMM_DEFAULT == kGemmDefault,
              "cublasComputeType_t / cublasGemmAlgo_t");
#endif

struct Api {
  Status (*create)(Handle*) = nullptr;                   // cublasCreate_v2
  Status (*set_stream)(Handle, cudaStream_t) = nullptr;  // cublasSetStream_v2
  Status (*set_math_mode)(Handle, int) = nullptr;        // cublasSetMathMode
  Status (*sgemm)(Handle, int, int, int, int, int, const float*, const float*, int,
                  const float*, int, const float*, float*, int) = nullptr;  // cublasSgemm_v2
  Status (*dgemm)(Handle, int, int, int, int, int, const double*, const double*, int,
                  const double*, int, const double*, double*, int) = nullptr;  // cublasDgemm_v2
  Status (*gemm_ex)(Handle, int, int, int, int, int, const void*, const void*, int, int,
                    const void*, int, int, const void*, void*, int, int, int,
                    int) = nullptr;  // cublasGemmEx
  std::string error;
};

const Api& api() {
  static const Api loaded = [] {
    Api a;
    void* lib = nullptr;
    const char* names[] = {"libcublas.so.13", "libcublas.so.12", "libcublas.so.11",
                           "libcublas.so"};
    for (const char* name : names) {  // the copy torch uses, already loaded
      if ((lib = dlopen(name, RTLD_NOW | RTLD_NOLOAD)) != nullptr) break;
    }
    for (const char* name : names) {
      if (lib != nullptr) break;
      lib = dlopen(name, RTLD_NOW | RTLD_LOCAL);
    }
    if (lib == nullptr) {
      a.error = "libcublas not found (torch's CUDA build loads it; is torch built with CUDA?)";
      return a;
    }
    auto sym = [&](auto& fn, const char* name) {
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(lib, name));
      if (fn == nullptr && a.error.empty()) a.error = std::string("cuBLAS lacks ") + name;
    };
    sym(a.create, "cublasCreate_v2");
    sym(a.set_stream, "cublasSetStream_v2");
    sym(a.set_math_mode, "cublasSetMathMode");
    sym(a.sgemm, "cublasSgemm_v2");
    sym(a.dgemm, "cublasDgemm_v2");
    sym(a.gemm_ex, "cublasGemmEx");
    return a;
  }();
  TORCH_CHECK(loaded.error.empty(), "turbolm rnn (cuda): ", loaded.error);
  return loaded;
}

void check(Status status, const char* what) {
  TORCH_CHECK(status == 0, "turbolm rnn (cuda): ", what, " failed with cuBLAS status ", status);
}

// This thread's handle for the current device, bound to the current stream, in `math` mode.
Handle handle(int math) {
  constexpr int kMaxDevices = 64;
  static thread_local Handle handles[kMaxDevices] = {};
  const Api& a = api();
  const int device = c10::cuda::current_device();
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "turbolm rnn (cuda): device index ", device);
  Handle& h = handles[device];
  if (h == nullptr) check(a.create(&h), "cublasCreate");
  check(a.set_stream(h, c10::cuda::getCurrentCUDAStream()), "cublasSetStream");
  check(a.set_math_mode(h, math), "cublasSetMathMode");
  return h;
}

int to_int(int64_t v, const char* what) {
  TORCH_CHECK(v >= 0 && v <= std::numeric_limits<int>::max(), "turbolm rnn (cuda): GEMM ", what,
              " ", v, " exceeds cuBLAS's 32-bit range");
  return static_cast<int>(v);
}

template <typename T>
constexpr int data_type() {  // cudaDataType_t
  if constexpr (std::is_same_v<T, c10::Half>) {
    return CUDA_R_16F;
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return CUDA_R_16BF;
  } else if constexpr (std::is_same_v<T, double>) {
    return CUDA_R_64F;
  } else {
    return CUDA_R_32F;
  }
}

}  // namespace blas

// Row-major C (M, N) [+]= op(A) (M, K) @ op(B) (K, N), as the column-major product
// C^T = op(B)^T op(A)^T. An operand is (data, ld, trans): element (i, k) of op(A) at
// a[i * lda + k], or at a[k * lda + i] when ta (A given as its transpose).
// In = Out (float / double) or In = Half / BFloat16 with Out = float (fp32 accumulation).
template <typename In, typename Out>
void blas_gemm(int64_t M, int64_t N, int64_t K, const In* a, int64_t lda, bool ta, const In* b,
               int64_t ldb, bool tb, Out* c, int64_t ldc, bool accumulate) {
  const int m = blas::to_int(N, "size"), n = blas::to_int(M, "size"), k = blas::to_int(K, "size");
  const int ld_b = blas::to_int(ldb, "stride"), ld_a = blas::to_int(lda, "stride");
  const int ld_c = blas::to_int(ldc, "stride");
  const int op_b = tb ? blas::kOpT : blas::kOpN, op_a = ta ? blas::kOpT : blas::kOpN;
  const blas::Api& api = blas::api();
  if constexpr (std::is_same_v<In, double>) {
    static_assert(std::is_same_v<Out, double>);
    const double one = 1, beta = accumulate ? 1 : 0;
    blas::Handle h = blas::handle(blas::kDefaultMath);
    blas::check(api.dgemm(h, op_b, op_a, m, n, k, &one, b, ld_b, a, ld_a, &beta, c, ld_c),
                "cublasDgemm");
  } else if constexpr (std::is_same_v<In, float>) {
    static_assert(std::is_same_v<Out, float>);
    const float one = 1, beta = accumulate ? 1 : 0;
    const bool tf32 = at::globalContext().allowTF32CuBLAS();
    blas::Handle h = blas::handle(tf32 ? blas::kTF32Math : blas::kDefaultMath);
    blas::check(api.sgemm(h, op_b, op_a, m, n, k, &one, b, ld_b, a, ld_a, &beta, c, ld_c),
                "cublasSgemm");
  } else {
    static_assert(std::is_same_v<Out, float>, "half-precision GEMMs write fp32");
    const float one = 1, beta = accumulate ? 1 : 0;
    blas::Handle h = blas::handle(blas::kDefaultMath | blas::kNoReducedReduction);
    blas::check(api.gemm_ex(h, op_b, op_a, m, n, k, &one, b, blas::data_type<In>(), ld_b, a,
                            blas::data_type<In>(), ld_a, &beta, c, blas::data_type<Out>(), ld_c,
                            blas::kCompute32F, blas::kGemmDefault),
                "cublasGemmEx");
  }
}

// A 2-D tensor as a GEMM operand: (storage holder, ld, trans). Views with a unit stride in
// either dimension are taken as they are; others are copied.
struct Operand {
  at::Tensor t;
  int64_t ld;
  bool trans;
};

Operand operand(const at::Tensor& t) {
  if (t.stride(1) == 1 && t.stride(0) >= std::max<int64_t>(1, t.size(1))) {
    return {t, t.stride(0), false};
  }
  if (t.stride(0) == 1 && t.stride(1) >= std::max<int64_t>(1, t.size(0))) {
    return {t, t.stride(1), true};
  }
  at::Tensor c = t.contiguous();
  return {c, std::max<int64_t>(1, c.size(1)), false};
}

struct CudaKernels {
  using Guard = c10::cuda::CUDAGuard;

  static void check_device(const char* op, const at::Tensor& x) { CHECK_CUDA(x); }

  // The B (K, N) operand of gemm (a weight or its transposed view), once per call.
  using Weight = Operand;
  static Weight step_weight(const at::Tensor& b) {
    if (!b.defined()) return {b, 0, false};
    return operand(b);
  }

  // C [+]= A @ B on row-major matrices (the layer loop: no allocation, no tensor).
  template <typename In, typename Out>
  static void gemm(const Mat<Out>& c, const Mat<const In>& a, const Weight& w, bool accumulate) {
    if (c.rows == 0 || c.cols == 0) return;
    if (a.cols == 0) {  // empty sum
      if (!accumulate) {
        C10_CUDA_CHECK(cudaMemset2DAsync(c.data, c.ld * sizeof(Out), 0, c.cols * sizeof(Out),
                                         c.rows, c10::cuda::getCurrentCUDAStream()));
      }
      return;
    }
    blas_gemm<In, Out>(c.rows, c.cols, a.cols, a.data, a.ld, false, w.t.const_data_ptr<In>(),
                       w.ld, w.trans, c.data, c.ld, accumulate);
  }

  // a (M, K) @ b (K, N) as a fresh contiguous tensor in the compute type (fp32 for half
  // operands): the weight gradients.
  static at::Tensor mm(const at::Tensor& a_in, const at::Tensor& b_in) {
    const c10::ScalarType in = a_in.scalar_type();
    const c10::ScalarType acc =
        in == c10::ScalarType::Double ? c10::ScalarType::Double : c10::ScalarType::Float;
    TORCH_CHECK(b_in.scalar_type() == in, "rnn mm: operand dtypes differ");
    const int64_t M = a_in.size(0), K = a_in.size(1), N = b_in.size(1);
    if (M == 0 || N == 0 || K == 0) return at::zeros({M, N}, a_in.options().dtype(acc));
    at::Tensor out = at::empty({M, N}, a_in.options().dtype(acc));
    const Operand a = operand(a_in), b = operand(b_in);
    auto run = [&](auto in_zero, auto out_zero) {
      using In = decltype(in_zero);
      using Out = decltype(out_zero);
      blas_gemm<In, Out>(M, N, K, a.t.const_data_ptr<In>(), a.ld, a.trans,
                         b.t.const_data_ptr<In>(), b.ld, b.trans, out.mutable_data_ptr<Out>(), N,
                         false);
    };
    switch (in) {
      case c10::ScalarType::Double: run(double(0), double(0)); break;
      case c10::ScalarType::Half: run(c10::Half(0.0f), float(0)); break;
      case c10::ScalarType::BFloat16: run(c10::BFloat16(0.0f), float(0)); break;
      default: run(float(0), float(0)); break;
    }
    return out;
  }

  // a @ w^T (dx = dG W_ih).
  static at::Tensor linear(const at::Tensor& a, const at::Tensor& w) { return mm(a, w.t()); }

  template <typename T, typename L>
  static void fwd(const FwdStep<T, L>& s) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const int blocks = blocks_for(s.n * s.H);
    switch (s.mode) {
      case kLSTM:
        if (s.proj) {
          fwd_kernel<kLSTM, true, T, L><<<blocks, kThreads, 0, stream>>>(s);
        } else {
          fwd_kernel<kLSTM, false, T, L><<<blocks, kThreads, 0, stream>>>(s);
        }
        break;
      case kGRU: fwd_kernel<kGRU, false, T, L><<<blocks, kThreads, 0, stream>>>(s); break;
      case kRNNTanh: fwd_kernel<kRNNTanh, false, T, L><<<blocks, kThreads, 0, stream>>>(s); break;
      default: fwd_kernel<kRNNRelu, false, T, L><<<blocks, kThreads, 0, stream>>>(s); break;
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <int MODE, typename T, typename L>
  static void launch_bwd(const BwdStep<T, L>& s, int blocks, cudaStream_t stream) {
    if (s.dy != nullptr) {
      bwd_kernel<MODE, true, T, L><<<blocks, kThreads, 0, stream>>>(s);
    } else {
      bwd_kernel<MODE, false, T, L><<<blocks, kThreads, 0, stream>>>(s);
    }
  }

  template <typename T, typename L>
  static void bwd(const BwdStep<T, L>& s) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const int blocks = blocks_for(s.n * s.H);
    switch (s.mode) {
      case kLSTM: launch_bwd<kLSTM>(s, blocks, stream); break;
      case kGRU: launch_bwd<kGRU>(s, blocks, stream); break;
      case kRNNTanh: launch_bwd<kRNNTanh>(s, blocks, stream); break;
      default: launch_bwd<kRNNRelu>(s, blocks, stream); break;
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// ---- ops --------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_fwd_cuda(
    const at::Tensor& x, const at::Tensor& h0, const std::optional<at::Tensor>& c0,
    const std::optional<at::Tensor>& lengths, at::TensorList weights, c10::string_view mode,
    int64_t proj_size, bool has_biases, bool bidirectional) {
  return layer_forward<CudaKernels>("turbolm::rnn_layer_fwd", x, h0, c0, lengths, weights.vec(),
                                    std::string(mode), proj_size, has_biases, bidirectional);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> layer_bwd_cuda(
    const std::optional<at::Tensor>& dy, const std::optional<at::Tensor>& dh_n,
    const std::optional<at::Tensor>& dc_n, const at::Tensor& x, const at::Tensor& h0,
    const std::optional<at::Tensor>& c0, const std::optional<at::Tensor>& lengths,
    at::TensorList weights, const at::Tensor& ws, const at::Tensor& hprev, const at::Tensor& hraw,
    c10::string_view mode, int64_t proj_size, bool has_biases, bool bidirectional) {
  return layer_backward<CudaKernels>("turbolm::rnn_layer_bwd", dy, dh_n, dc_n, x, h0, c0,
                                     lengths, weights.vec(), ws, hprev, hraw, std::string(mode),
                                     proj_size, has_biases, bidirectional);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cell_fwd_cuda(
    const at::Tensor& x, const at::Tensor& h, const std::optional<at::Tensor>& c,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, c10::string_view mode) {
  return cell_forward<CudaKernels>(x, h, c, w_ih, w_hh, b_ih, b_hh, std::string(mode));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
cell_bwd_cuda(const std::optional<at::Tensor>& dh, const std::optional<at::Tensor>& dc,
              const at::Tensor& x, const at::Tensor& h, const std::optional<at::Tensor>& c,
              const at::Tensor& w_ih, const at::Tensor& w_hh,
              const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
              const at::Tensor& ws, const at::Tensor& hprev, c10::string_view mode) {
  return cell_backward<CudaKernels>(dh, dc, x, h, c, w_ih, w_hh, b_ih, b_hh, ws, hprev,
                                    std::string(mode));
}

}  // namespace
}  // namespace turbolm::rnn

TORCH_LIBRARY_IMPL(turbolm, CUDA, m) {
  m.impl("rnn_layer_fwd", &turbolm::rnn::layer_fwd_cuda);
  m.impl("rnn_layer_bwd", &turbolm::rnn::layer_bwd_cuda);
  m.impl("rnn_cell_fwd", &turbolm::rnn::cell_fwd_cuda);
  m.impl("rnn_cell_bwd", &turbolm::rnn::cell_bwd_cuda);
}
