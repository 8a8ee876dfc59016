// Fused RNN layers and cells on CUDA: TORCH_LIBRARY_IMPL(turbolm, CUDA) of the ops defined
// in rnn.cpp (rnn_layer_fwd / rnn_layer_bwd / rnn_cell_fwd / rnn_cell_bwd).
//
// Design
// ------
// The time loop is the one of rnn_layer.h, shared with the CPU backend and run on the host:
// per step one cuBLAS GEMM (at::mm on the current stream) accumulating the recurrent
// projection into the step's pre-activations (two for the GRU) and one fused gate kernel; backward per step one fused gate-gradient kernel and one
// GEMM; the input projection and the weight gradients are single GEMMs over all steps. The
// gate kernels below compute one (batch row, unit) per thread with the rnn_math.h formulas
// (the exact code the CPU build runs in CI); fp32 math and state (fp64 for fp64), the layer
// converting float16 / bfloat16 inputs once per call.
//
// Per step the host enqueues 2 kernels (plus 1 GEMM for projections), so for small batches
// and hidden sizes the loop is launch-bound (~5-10 us per step). Not done yet: capturing the
// loop in a CUDA graph and the persistent small-hidden kernel that keeps W_hh on chip (the
// issue's stretch goals); GEMMs in bf16 with fp32 accumulation instead of converting to fp32.
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "rnn_layer.h"

namespace turbolm::rnn {
namespace {

constexpr int kThreads = 256;

// One thread per (row b < n, unit j < H); grid-stride over n * H.
template <int MODE, bool PROJ, typename T>
__global__ void fwd_kernel(FwdStep<T> s) {
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
    if (MODE == kLSTM) {
      lstm_fwd_unit(j, H, s.bias, ws, s.c + b * H, out);
      if (!PROJ) h[j] = out[j];
    } else if (MODE == kGRU) {
      const T hn = gru_fwd_unit(j, H, s.bias, s.b_hn, h_prev, ws);
      out[j] = hn;
      h[j] = hn;
    } else {
      const T hn = rnn_fwd_unit(j, s.bias, MODE == kRNNRelu, ws);
      out[j] = hn;
      h[j] = hn;
    }
  }
}

template <int MODE, bool HAS_DY, typename T>
__global__ void bwd_kernel(BwdStep<T> s) {
  const int64_t H = s.H, G = gates_of(MODE) * H, S = saved_of(MODE) * H;
  const int64_t total = s.n * H;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = idx / H, j = idx - b * H;
    T* dh = s.dh_in + b * s.dh_ld;
    const T d = HAS_DY ? dh[j] + s.dy[b * s.dy_ld + j] : dh[j];
    const T* ws = s.ws + b * S;
    T* dgi = s.dgi + b * s.dgi_ld;
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

struct CudaKernels {
  using Guard = c10::cuda::CUDAGuard;

  static void check_device(const char* op, const at::Tensor& x) { CHECK_CUDA(x); }

  // out (M, N) = a (M, K) @ w^T, w (N, K); out may be row-strided (the ws slots).
  static void gemm_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& w) {
    at::mm_out(out, a, w.t());
  }

  static at::Tensor step_weight(const at::Tensor& w, int64_t) { return w; }

  // out (n, N) [+]= a (n, K) @ w^T, w (N, K) (cuBLAS; out may be a row-strided view).
  static void step_gemm(at::Tensor& out, const at::Tensor& a, const at::Tensor& w,
                        bool accumulate) {
    if (accumulate) {
      out.addmm_(a, w.t());
    } else {
      at::mm_out(out, a, w.t());
    }
  }

  static at::Tensor linear(const at::Tensor& a, const at::Tensor& w, const at::Tensor& bias) {
    return bias.defined() ? at::addmm(bias, a, w.t()) : at::mm(a, w.t());
  }

  template <typename T>
  static void fwd(const FwdStep<T>& s) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const int blocks = blocks_for(s.n * s.H);
    switch (s.mode) {
      case kLSTM:
        if (s.proj) {
          fwd_kernel<kLSTM, true, T><<<blocks, kThreads, 0, stream>>>(s);
        } else {
          fwd_kernel<kLSTM, false, T><<<blocks, kThreads, 0, stream>>>(s);
        }
        break;
      case kGRU: fwd_kernel<kGRU, false, T><<<blocks, kThreads, 0, stream>>>(s); break;
      case kRNNTanh: fwd_kernel<kRNNTanh, false, T><<<blocks, kThreads, 0, stream>>>(s); break;
      default: fwd_kernel<kRNNRelu, false, T><<<blocks, kThreads, 0, stream>>>(s); break;
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <int MODE, typename T>
  static void launch_bwd(const BwdStep<T>& s, int blocks, cudaStream_t stream) {
    if (s.dy != nullptr) {
      bwd_kernel<MODE, true, T><<<blocks, kThreads, 0, stream>>>(s);
    } else {
      bwd_kernel<MODE, false, T><<<blocks, kThreads, 0, stream>>>(s);
    }
  }

  template <typename T>
  static void bwd(const BwdStep<T>& s) {
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
