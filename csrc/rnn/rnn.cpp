// Fused RNN layers and cells (LSTM, GRU, tanh / ReLU RNN): op schemas (torch.ops.turbolm.*)
// and the CPU kernels.
//
// Schemas (one layer, all directions, whole sequence; see turbolm/ops/rnn.py for the contract):
//   rnn_layer_fwd(x (T,B,I), h0 (D,B,P), c0? (D,B,H), lengths? (B,) int64, weights[], mode,
//                 proj_size, has_biases, bidirectional)
//       -> (y (T,B,D*P), h_n (D,B,P), c_n (D,B,H) | (0,), ws, hprev, hraw | (0,))
//   rnn_layer_bwd(dy?, dh_n?, dc_n?, x, h0, c0?, lengths?, weights[], ws, hprev, hraw, mode,
//                 proj_size, has_biases, bidirectional)
//       -> (dx, dh0, dc0 | (0,), dweights[])
//   rnn_cell_fwd(x (B,I), h (B,H), c?, w_ih, w_hh, b_ih?, b_hh?, mode) -> (h', c' | (0,), ws, hprev)
//   rnn_cell_bwd(dh?, dc?, x, h, c?, w_ih, w_hh, b_ih?, b_hh?, ws, hprev, mode)
//       -> (dx, dh, dc | (0,), dw_ih, dw_hh, db_ih | (0,), db_hh | (0,))
// ws / hprev / hraw are the saved activations (compute dtype: float32, float64 for float64);
// weights[] is the layer's slice of torch.nn's _flat_weights. The time loop, the GEMMs and
// the variable-length handling live in rnn_layer.h (shared with CUDA); this file holds the
// CPU gate kernels: OpenMP over batch rows, each row a serial loop over units of the
// rnn_math.h formulas, compiled twice (baseline x86-64 and AVX2+FMA, chosen at run time) so
// the exp / tanh polynomials vectorize.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

#include <cstdlib>

#include <algorithm>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "rnn_layer.h"

#ifdef _OPENMP
#include <omp.h>
#endif
#include <ATen/Parallel.h>

namespace turbolm::rnn {
namespace {

// ---- CPU gate kernels ------------------------------------------------------------------------

template <typename T>
using FwdRange = void (*)(const FwdStep<T>&, int64_t, int64_t);
template <typename T>
using BwdRange = void (*)(const BwdStep<T>&, int64_t, int64_t);

template <int MODE, bool PROJ, typename T>
void fwd_range(const FwdStep<T>& s, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) fwd_row<MODE, PROJ>(s, b);
}

template <int MODE, bool HAS_DY, typename T>
void bwd_range(const BwdStep<T>& s, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) bwd_row<MODE, HAS_DY>(s, b);
}

#if defined(__GNUC__) && defined(__x86_64__)
#define TURBOLM_RNN_AVX2 1
template <int MODE, bool PROJ, typename T>
__attribute__((target("avx2,fma"))) void fwd_range_avx2(const FwdStep<T>& s, int64_t b0,
                                                        int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) fwd_row<MODE, PROJ>(s, b);
}

template <int MODE, bool HAS_DY, typename T>
__attribute__((target("avx2,fma"))) void bwd_range_avx2(const BwdStep<T>& s, int64_t b0,
                                                        int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) bwd_row<MODE, HAS_DY>(s, b);
}

bool cpu_has_avx2() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
}
#endif

template <int MODE, bool PROJ, typename T>
FwdRange<T> fwd_kernel() {
#ifdef TURBOLM_RNN_AVX2
  if (cpu_has_avx2()) return &fwd_range_avx2<MODE, PROJ, T>;
#endif
  return &fwd_range<MODE, PROJ, T>;
}

template <int MODE, typename T>
BwdRange<T> bwd_kernel(bool has_dy) {
#ifdef TURBOLM_RNN_AVX2
  if (cpu_has_avx2())
    return has_dy ? &bwd_range_avx2<MODE, true, T> : &bwd_range_avx2<MODE, false, T>;
#endif
  return has_dy ? &bwd_range<MODE, true, T> : &bwd_range<MODE, false, T>;
}

// Threads for n rows of `per_row` units: about one per 16K units, at most torch's intra-op
// thread count (torch.set_num_threads) and n.
int threads_for(int64_t n, int64_t per_row) {
  const int64_t want = std::max<int64_t>(1, n * per_row / 16384);
  const int64_t t = std::min<int64_t>({static_cast<int64_t>(at::get_num_threads()), want, n});
  return static_cast<int>(std::max<int64_t>(1, t));
}

// Rows [0, n) split into nt contiguous chunks, one per OpenMP thread.
template <typename Step, typename Fn>
void run_rows(const Step& s, Fn fn, int nt) {
  if (nt <= 1) {
    fn(s, 0, s.n);
    return;
  }
#pragma omp parallel num_threads(nt)
  {
#ifdef _OPENMP
    const int64_t tid = omp_get_thread_num(), parts = omp_get_num_threads();
#else
    const int64_t tid = 0, parts = 1;
#endif
    const int64_t chunk = (s.n + parts - 1) / parts;
    const int64_t b0 = std::min(s.n, tid * chunk), b1 = std::min(s.n, b0 + chunk);
    if (b0 < b1) fn(s, b0, b1);
  }
}

// ---- GEMMs -------------------------------------------------------------------------------
//
// ATen's at::mm goes to MKL, which on non-Intel CPUs (the AMD EPYC dev / CI machines) runs
// its slower generic paths; oneDNN's kernels use AVX-512 there too. So, for float32:
// * the per-step GEMMs (M = rows still running, N = G or P, K = P or G) call oneDNN's brgemm
//   micro-kernel through at::native::cpublas::brgemm, tiled over N in blocks of 64 columns
//   (OpenMP over the tiles), writing straight into the layer's buffers: no allocation, no
//   dispatcher, and accumulation (GRU) in place. Measured here, B32 H256 single thread:
//   167 us per step vs 228 us with at::mm;
// * the input projections use the same micro-kernel, tiled over rows, written straight into
//   the ws slots; dx goes through ATen's `mkldnn::_linear_pointwise` op (oneDNN): both ~21 ms
//   vs 25-30 ms with at::mm for (4096 x 256) x (256 x 1024). The weight gradients stay on
//   at::mm: feeding oneDNN would need transposed copies of dG that cost what they save.
// float64 and builds without these entry points use at::mm. TURBOLM_RNN_GEMM=aten forces
// at::mm everywhere (benchmarks compare both).

bool gemm_forced_aten() {
  static const bool forced = [] {
    const char* env = std::getenv("TURBOLM_RNN_GEMM");
    return env != nullptr && std::string(env) == "aten";
  }();
  return forced;
}

const std::optional<c10::OperatorHandle>& onednn_linear() {
  static const std::optional<c10::OperatorHandle> op =
      gemm_forced_aten() ? std::nullopt
                         : c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  return op;
}

bool is_float(const at::Tensor& t) { return t.scalar_type() == c10::ScalarType::Float; }

#ifdef CPUBLAS_BRGEMM_F32F32F32
constexpr bool kHasBrgemm = true;
#else
constexpr bool kHasBrgemm = false;
#endif

bool use_brgemm(const at::Tensor& t) { return kHasBrgemm && is_float(t) && !gemm_forced_aten(); }

// C (M, N) [+]= A (M, K) @ B (K, N), row-major with leading dimensions, through the brgemm
// micro-kernel: tiles of kTileM x kTileN, OpenMP over the N tiles.
void brgemm_tiled(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                  int64_t ldb, float* C, int64_t ldc, bool accumulate) {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  constexpr int64_t kTileN = 64, kTileM = 64;
  const int64_t tiles = (N + kTileN - 1) / kTileN;
  const int64_t want = std::max<int64_t>(1, M * N * K / (int64_t(1) << 20));
  const int nt = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>({at::get_num_threads(), tiles, want})));
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t n0 = tile * kTileN, nn = std::min(kTileN, N - n0);
    for (int64_t m0 = 0; m0 < M; m0 += kTileM) {
      at::native::cpublas::brgemm(std::min(kTileM, M - m0), nn, K, lda, ldb, ldc, accumulate,
                                  A + m0 * lda, B + n0, C + m0 * ldc + n0, /*is_vnni=*/false);
    }
  }
#else
  TORCH_CHECK(false, "brgemm is not available in this torch build");
#endif
}

// C (M, N) = A (M, K) @ B (K, N) for large M (the input projections): OpenMP over blocks of
// kTileM rows; each block walks the kTileN-column tiles, so its A rows stay in L1/L2.
void brgemm_rows(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                 int64_t ldb, float* C, int64_t ldc) {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  constexpr int64_t kTileN = 64, kTileM = 64;
  const int64_t blocks = (M + kTileM - 1) / kTileM;
  const int nt = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>({at::get_num_threads(), blocks,
                            std::max<int64_t>(1, M * N * K / (int64_t(1) << 20))})));
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int64_t block = 0; block < blocks; ++block) {
    const int64_t m0 = block * kTileM, mm = std::min(kTileM, M - m0);
    for (int64_t n0 = 0; n0 < N; n0 += kTileN) {
      at::native::cpublas::brgemm(mm, std::min(kTileN, N - n0), K, lda, ldb, ldc, false,
                                  A + m0 * lda, B + n0, C + m0 * ldc + n0, /*is_vnni=*/false);
    }
  }
#else
  TORCH_CHECK(false, "brgemm is not available in this torch build");
#endif
}

struct CpuKernels {
  struct Guard {
    explicit Guard(const c10::Device&) {}
  };

  static void check_device(const char* op, const at::Tensor& x) { CHECK_CPU(x); }

  // a (M, K) @ w^T (+ bias) -> fresh contiguous (M, N), w (N, K): the large GEMMs.
  static at::Tensor linear(const at::Tensor& a, const at::Tensor& w, const at::Tensor& bias) {
    if (!is_float(a) || !onednn_linear() || a.size(0) == 0 || w.numel() == 0) {
      return bias.defined() ? at::addmm(bias, a, w.t()) : at::mm(a, w.t());
    }
    torch::jit::Stack stack{c10::IValue(a.contiguous()),
                            c10::IValue(w.contiguous()),
                            bias.defined() ? c10::IValue(bias) : c10::IValue(),
                            c10::IValue(std::string("none")),
                            c10::IValue(c10::List<std::optional<at::Scalar>>()),
                            c10::IValue()};
    onednn_linear()->callBoxed(&stack);
    return stack[0].toTensor();
  }

  // out (M, N) = a (M, K) @ w^T, w (N, K); out may be row-strided (the ws slots).
  static void gemm_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& w) {
    if (use_brgemm(a) && a.is_contiguous() && out.stride(1) == 1 && a.size(0) > 0) {
      const at::Tensor b = w.t().contiguous();  // (K, N)
      brgemm_rows(a.size(0), b.size(1), a.size(1), a.const_data_ptr<float>(), a.size(1),
                  b.const_data_ptr<float>(), b.size(1), out.mutable_data_ptr<float>(),
                  out.stride(0));
    } else {
      at::mm_out(out, a, w.t());
    }
  }

  // The weight w (N, K) of the per-step GEMMs out = a @ w^T in the form step_gemm takes:
  // w^T as a contiguous (K, N) matrix (no copy when w is itself a transposed view).
  static at::Tensor step_weight(const at::Tensor& w, int64_t) { return w.t().contiguous(); }

  // out (n, N) [+]= a (n, K) @ b (K, N); out and a may be row-strided views.
  static void step_gemm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                        bool accumulate) {
    if (use_brgemm(a) && a.stride(1) == 1 && out.stride(1) == 1 && a.size(0) > 0) {
      brgemm_tiled(a.size(0), b.size(1), a.size(1), a.const_data_ptr<float>(), a.stride(0),
                   b.const_data_ptr<float>(), b.size(1), out.mutable_data_ptr<float>(),
                   out.stride(0), accumulate);
    } else if (accumulate) {
      out.addmm_(a, b);
    } else {
      at::mm_out(out, a, b);
    }
  }

  template <typename T>
  static void fwd(const FwdStep<T>& s) {
    FwdRange<T> fn = nullptr;
    switch (s.mode) {
      case kLSTM:
        fn = s.proj ? fwd_kernel<kLSTM, true, T>() : fwd_kernel<kLSTM, false, T>();
        break;
      case kGRU: fn = fwd_kernel<kGRU, false, T>(); break;
      case kRNNTanh: fn = fwd_kernel<kRNNTanh, false, T>(); break;
      default: fn = fwd_kernel<kRNNRelu, false, T>(); break;
    }
    run_rows(s, fn, threads_for(s.n, s.H * gates_of(s.mode)));
  }

  template <typename T>
  static void bwd(const BwdStep<T>& s) {
    BwdRange<T> fn = nullptr;
    switch (s.mode) {
      case kLSTM: fn = bwd_kernel<kLSTM, T>(s.dy != nullptr); break;
      case kGRU: fn = bwd_kernel<kGRU, T>(s.dy != nullptr); break;
      case kRNNTanh: fn = bwd_kernel<kRNNTanh, T>(s.dy != nullptr); break;
      default: fn = bwd_kernel<kRNNRelu, T>(s.dy != nullptr); break;
    }
    run_rows(s, fn, threads_for(s.n, s.H * gates_of(s.mode)));
  }
};

// ---- ops --------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_fwd_cpu(
    const at::Tensor& x, const at::Tensor& h0, const std::optional<at::Tensor>& c0,
    const std::optional<at::Tensor>& lengths, at::TensorList weights, c10::string_view mode,
    int64_t proj_size, bool has_biases, bool bidirectional) {
  return layer_forward<CpuKernels>("turbolm::rnn_layer_fwd", x, h0, c0, lengths, weights.vec(),
                                   std::string(mode), proj_size, has_biases, bidirectional);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> layer_bwd_cpu(
    const std::optional<at::Tensor>& dy, const std::optional<at::Tensor>& dh_n,
    const std::optional<at::Tensor>& dc_n, const at::Tensor& x, const at::Tensor& h0,
    const std::optional<at::Tensor>& c0, const std::optional<at::Tensor>& lengths,
    at::TensorList weights, const at::Tensor& ws, const at::Tensor& hprev, const at::Tensor& hraw,
    c10::string_view mode, int64_t proj_size, bool has_biases, bool bidirectional) {
  return layer_backward<CpuKernels>("turbolm::rnn_layer_bwd", dy, dh_n, dc_n, x, h0, c0, lengths,
                                    weights.vec(), ws, hprev, hraw, std::string(mode), proj_size,
                                    has_biases, bidirectional);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cell_fwd_cpu(
    const at::Tensor& x, const at::Tensor& h, const std::optional<at::Tensor>& c,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, c10::string_view mode) {
  return cell_forward<CpuKernels>(x, h, c, w_ih, w_hh, b_ih, b_hh, std::string(mode));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
cell_bwd_cpu(const std::optional<at::Tensor>& dh, const std::optional<at::Tensor>& dc,
             const at::Tensor& x, const at::Tensor& h, const std::optional<at::Tensor>& c,
             const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
             const std::optional<at::Tensor>& b_hh, const at::Tensor& ws, const at::Tensor& hprev,
             c10::string_view mode) {
  return cell_backward<CpuKernels>(dh, dc, x, h, c, w_ih, w_hh, b_ih, b_hh, ws, hprev,
                                   std::string(mode));
}

}  // namespace
}  // namespace turbolm::rnn

TORCH_LIBRARY_FRAGMENT(turbolm, m) {
  m.def(
      "rnn_layer_fwd(Tensor x, Tensor h0, Tensor? c0, Tensor? lengths, Tensor[] weights, "
      "str mode, int proj_size, bool has_biases, bool bidirectional)"
      " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "rnn_layer_bwd(Tensor? dy, Tensor? dh_n, Tensor? dc_n, Tensor x, Tensor h0, Tensor? c0, "
      "Tensor? lengths, Tensor[] weights, Tensor ws, Tensor hprev, Tensor hraw, str mode, "
      "int proj_size, bool has_biases, bool bidirectional) -> (Tensor, Tensor, Tensor, Tensor[])");
  m.def(
      "rnn_cell_fwd(Tensor x, Tensor h, Tensor? c, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh, str mode) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "rnn_cell_bwd(Tensor? dh, Tensor? dc, Tensor x, Tensor h, Tensor? c, Tensor w_ih, "
      "Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor ws, Tensor hprev, str mode)"
      " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(turbolm, CPU, m) {
  m.impl("rnn_layer_fwd", &turbolm::rnn::layer_fwd_cpu);
  m.impl("rnn_layer_bwd", &turbolm::rnn::layer_bwd_cpu);
  m.impl("rnn_cell_fwd", &turbolm::rnn::cell_fwd_cpu);
  m.impl("rnn_cell_bwd", &turbolm::rnn::cell_bwd_cpu);
}
