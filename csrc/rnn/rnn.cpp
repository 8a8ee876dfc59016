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
#include <ATen/core/stack.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/from_blob.h>
#include <torch/library.h>

#include <cstdlib>

#include <algorithm>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "rnn_layer.h"

#ifdef _OPENMP
#include <omp.h>
#endif
#include <ATen/Parallel.h>

namespace turbolm::rnn {
namespace {

// ---- CPU gate kernels ------------------------------------------------------------------------
//
// T: the compute type (float / double), L: the GEMM operand type (T, or c10::Half / BFloat16
// for half-precision layers; rnn_math.h).

template <typename T, typename L>
using FwdRange = void (*)(const FwdStep<T, L>&, int64_t, int64_t);
template <typename T, typename L>
using BwdRange = void (*)(const BwdStep<T, L>&, int64_t, int64_t);

template <int MODE, bool PROJ, typename T, typename L>
void fwd_range(const FwdStep<T, L>& s, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) fwd_row<MODE, PROJ>(s, b);
}

template <int MODE, bool HAS_DY, typename T, typename L>
void bwd_range(const BwdStep<T, L>& s, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) bwd_row<MODE, HAS_DY>(s, b);
}

#if defined(__GNUC__) && defined(__x86_64__)
#define TURBOLM_RNN_AVX2 1
template <int MODE, bool PROJ, typename T, typename L>
__attribute__((target("avx2,fma"))) void fwd_range_avx2(const FwdStep<T, L>& s, int64_t b0,
                                                        int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) fwd_row<MODE, PROJ>(s, b);
}

template <int MODE, bool HAS_DY, typename T, typename L>
__attribute__((target("avx2,fma"))) void bwd_range_avx2(const BwdStep<T, L>& s, int64_t b0,
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

template <int MODE, bool PROJ, typename T, typename L>
FwdRange<T, L> fwd_kernel() {
#ifdef TURBOLM_RNN_AVX2
  if (cpu_has_avx2()) return &fwd_range_avx2<MODE, PROJ, T, L>;
#endif
  return &fwd_range<MODE, PROJ, T, L>;
}

template <int MODE, typename T, typename L>
BwdRange<T, L> bwd_kernel(bool has_dy) {
#ifdef TURBOLM_RNN_AVX2
  if (cpu_has_avx2())
    return has_dy ? &bwd_range_avx2<MODE, true, T, L> : &bwd_range_avx2<MODE, false, T, L>;
#endif
  return has_dy ? &bwd_range<MODE, true, T, L> : &bwd_range<MODE, false, T, L>;
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
// its slower generic paths; oneDNN's kernels use AVX-512 there too. So, for float32, the
// GEMMs of the layer loop (K::gemm: per-step recurrent GEMMs, M = rows still running, N = G
// or P, K = P or G; the input projections, M = T*B) call oneDNN's brgemm micro-kernel
// through at::native::cpublas::brgemm, writing straight into the layer's buffers: no
// allocation, no dispatcher, and accumulation in place. Small M: tiled over N in blocks of 64
// columns (OpenMP over the tiles); measured here, B32 H256 single thread: 167 us per step vs
// 228 us with at::mm. Large M: tiled over rows (~21 ms vs 25-30 ms with at::mm for
// (4096 x 256) x (256 x 1024)). dx goes through ATen's `mkldnn::_linear_pointwise` op
// (oneDNN). The weight gradients (K::mm) stay on at::mm: feeding oneDNN would need transposed
// copies of dG that cost what they save. float64 and builds without these entry points use
// at::mm; TURBOLM_RNN_GEMM=aten forces at::mm everywhere (benchmarks compare both).
// Half-precision operands are converted to float32 first (exact), so the CPU computes what
// the GPU's half-precision GEMMs with fp32 accumulation compute.

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

#ifdef CPUBLAS_BRGEMM_F32F32F32
constexpr bool kHasBrgemm = true;
#else
constexpr bool kHasBrgemm = false;
#endif

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

c10::ScalarType compute_type(c10::ScalarType t) {
  return t == c10::ScalarType::Double ? c10::ScalarType::Double : c10::ScalarType::Float;
}

struct CpuKernels {
  struct Guard {
    explicit Guard(const c10::Device&) {}
  };

  static void check_device(const char* op, const at::Tensor& x) { CHECK_CPU(x); }

  // The B (K, N) operand of gemm: a contiguous copy in the compute type (no copy when it is
  // one already, e.g. the transposed view of a transposed weight); undefined stays undefined.
  struct Weight {
    at::Tensor b;
  };
  static Weight step_weight(const at::Tensor& b) {
    if (!b.defined()) return {b};
    return {b.to(compute_type(b.scalar_type())).contiguous()};
  }

  // C [+]= A @ B (row-major matrices; A in the GEMM type In, converted to Out first when
  // they differ).
  template <typename In, typename Out>
  static void gemm(const Mat<Out>& c, const Mat<const In>& a, const Weight& w, bool accumulate) {
    if (c.rows == 0 || c.cols == 0) return;
    const auto out_t = c10::CppTypeToScalarType<Out>::value;
    const auto opts = at::TensorOptions().dtype(out_t);
    const Out* a_p = nullptr;
    int64_t lda = a.ld;
    at::Tensor a_conv;
    if constexpr (std::is_same_v<In, Out>) {
      a_p = a.data;
    } else {
      a_conv = at::from_blob(const_cast<In*>(a.data), {a.rows, a.cols}, {a.ld, 1},
                             at::TensorOptions().dtype(c10::CppTypeToScalarType<In>::value))
                   .to(out_t);
      a_p = a_conv.const_data_ptr<Out>();
      lda = a.cols;
    }
    if constexpr (std::is_same_v<Out, float>) {
      if (kHasBrgemm && !gemm_forced_aten() && a.cols > 0) {
        const float* b = w.b.const_data_ptr<float>();
        if (!accumulate && c.rows > 256) {
          brgemm_rows(c.rows, c.cols, a.cols, a_p, lda, b, c.cols, c.data, c.ld);
        } else {
          brgemm_tiled(c.rows, c.cols, a.cols, a_p, lda, b, c.cols, c.data, c.ld, accumulate);
        }
        return;
      }
    }
    const at::Tensor A = at::from_blob(const_cast<Out*>(a_p), {a.rows, a.cols}, {lda, 1}, opts);
    at::Tensor C = at::from_blob(c.data, {c.rows, c.cols}, {c.ld, 1}, opts);
    if (accumulate) {
      C.addmm_(A, w.b);
    } else {
      at::mm_out(C, A, w.b);
    }
  }

  // a @ b as a fresh tensor in the compute type (the weight gradients).
  static at::Tensor mm(const at::Tensor& a, const at::Tensor& b) {
    const c10::ScalarType acc = compute_type(a.scalar_type());
    return at::mm(a.to(acc), b.to(acc));
  }

  // a (M, K) @ w^T, w (N, K), as a fresh contiguous tensor in the compute type: dx, through
  // oneDNN's linear for float32 (its K blocking beats brgemm_rows at K = gates * H).
  static at::Tensor linear(const at::Tensor& a_in, const at::Tensor& w_in) {
    const c10::ScalarType acc = compute_type(a_in.scalar_type());
    const at::Tensor a = a_in.to(acc), w = w_in.to(acc);
    if (acc != c10::ScalarType::Float || !onednn_linear() || a.size(0) == 0 || w.numel() == 0) {
      return at::mm(a, w.t());
    }
    torch::jit::Stack stack{c10::IValue(a.contiguous()),
                            c10::IValue(w.contiguous()),
                            c10::IValue(),
                            c10::IValue(std::string("none")),
                            c10::IValue(c10::List<std::optional<at::Scalar>>()),
                            c10::IValue()};
    onednn_linear()->callBoxed(&stack);
    return stack[0].toTensor();
  }

  template <typename T, typename L>
  static void fwd(const FwdStep<T, L>& s) {
    FwdRange<T, L> fn = nullptr;
    switch (s.mode) {
      case kLSTM:
        fn = s.proj ? fwd_kernel<kLSTM, true, T, L>() : fwd_kernel<kLSTM, false, T, L>();
        break;
      case kGRU: fn = fwd_kernel<kGRU, false, T, L>(); break;
      case kRNNTanh: fn = fwd_kernel<kRNNTanh, false, T, L>(); break;
      default: fn = fwd_kernel<kRNNRelu, false, T, L>(); break;
    }
    run_rows(s, fn, threads_for(s.n, s.H * gates_of(s.mode)));
  }

  // No persistent kernel and no graphs on CPU: the step loop runs as it is.
  template <typename T, typename L>
  static bool fwd_sequence(const SeqFwd<T, L>&) {
    return false;
  }
  template <typename F>
  static void run_steps(const std::vector<int64_t>&, const Weight&, bool, F&& steps) {
    steps();
  }

  template <typename T, typename L>
  static void bwd(const BwdStep<T, L>& s) {
    BwdRange<T, L> fn = nullptr;
    switch (s.mode) {
      case kLSTM: fn = bwd_kernel<kLSTM, T, L>(s.dy != nullptr); break;
      case kGRU: fn = bwd_kernel<kGRU, T, L>(s.dy != nullptr); break;
      case kRNNTanh: fn = bwd_kernel<kRNNTanh, T, L>(s.dy != nullptr); break;
      default: fn = bwd_kernel<kRNNRelu, T, L>(s.dy != nullptr); break;
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
