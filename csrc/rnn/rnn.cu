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
// For small batches and hidden sizes that loop is launch-bound (two launches per step; the
// H200 profile showed the GPU busy 11-37% of the wall time). Two alternatives, selected by
// TURBOLM_RNN_CUDA_VARIANT (see "variants"; the default stays the plain loop until the GPU
// benchmarks pick a winner):
//   graph       each direction's step loop (forward and backward) recorded by stream capture
//               into a CUDA graph, cached on the exact launch arguments and replayed with one
//               host call (see "CUDA graphs of the step loop");
//   persistent  the forward loop for H <= 256 as ONE cooperative kernel: W_hh spread over the
//               blocks' shared memory for all T steps, h_t exchanged through global memory
//               with a grid-wide barrier per step, the cell state in registers; it leaves the
//               same saved tensors as the loop, so backward is unchanged (see "persistent
//               forward kernel").
// Whatever a variant does not cover (projections; padding for the persistent kernel; fp64)
// runs the plain loop. torch.ops.turbolm.rnn_cuda_stats() counts what the variants did
// (graph replays vs recaptures, persistent launches vs refusals) for benchmarks and tests.
//
// Resources kept between calls, all bounded and all freed by
// torch.ops.turbolm.rnn_release_cuda_caches() (turbolm.ops.rnn_kernels.release_cuda_caches):
// cuBLAS handles (a process-wide pool: as many as threads running these ops at once; see
// "handles") and the executable graphs of the graph variant (process-wide LRU cache of
// graphs::kMaxEntries). No GPU buffer is kept: workspaces and scratch buffers come from torch's
// caching allocator per call. Nothing is freed during static destruction or thread exit.
#include <ATen/core/Tensor.h>
#include <ATen/Context.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cooperative_groups.h>
#include <cuda_runtime.h>
#include <dlfcn.h>
#include <library_types.h>
#if __has_include(<cublas_v2.h>)
#include <cublas_v2.h>  // only to check the constants below against
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
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
// different threads), bound to the current stream on every call, lent by a process-wide pool
// (see "handles" below: bounded by the threads alive at once). fp32 GEMMs follow
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
  Status (*destroy)(Handle) = nullptr;                   // cublasDestroy_v2
  Status (*set_stream)(Handle, cudaStream_t) = nullptr;  // cublasSetStream_v2
  Status (*set_math_mode)(Handle, int) = nullptr;        // cublasSetMathMode
  Status (*set_workspace)(Handle, void*, size_t) = nullptr;  // cublasSetWorkspace_v2 (optional)
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
    sym(a.destroy, "cublasDestroy_v2");
    sym(a.set_stream, "cublasSetStream_v2");
    sym(a.set_math_mode, "cublasSetMathMode");
    sym(a.sgemm, "cublasSgemm_v2");
    sym(a.dgemm, "cublasDgemm_v2");
    sym(a.gemm_ex, "cublasGemmEx");
    // Optional: only the CUDA-graph path needs it (without it, graphs are not used).
    a.set_workspace =
        reinterpret_cast<decltype(a.set_workspace)>(dlsym(lib, "cublasSetWorkspace_v2"));
    return a;
  }();
  TORCH_CHECK(loaded.error.empty(), "turbolm rnn (cuda): ", loaded.error);
  return loaded;
}

void check(Status status, const char* what) {
  TORCH_CHECK(status == 0, "turbolm rnn (cuda): ", what, " failed with cuBLAS status ", status);
}

struct Workspace {
  void* data = nullptr;
  size_t bytes = 0;
};

// The workspace the GEMMs of this thread use while it runs the step loop of the graph variant
// (warm-up, capture, fallback; see graphs::run), none otherwise (cuBLAS's default pool).
Workspace& graph_workspace() {
  static thread_local Workspace w;  // trivially destructible
  return w;
}

// Sets graph_workspace() for a scope (restored on exit, exceptions included).
class UseWorkspace {
 public:
  explicit UseWorkspace(Workspace w) : old_(graph_workspace()) { graph_workspace() = w; }
  ~UseWorkspace() { graph_workspace() = old_; }
  UseWorkspace(const UseWorkspace&) = delete;
  UseWorkspace& operator=(const UseWorkspace&) = delete;

 private:
  Workspace old_;
};

// ---- handles ----
//
// A thread takes one handle per device on its first GEMM there and keeps it while it lives;
// when the thread exits, its handles go back to a process-wide pool (a pointer push: no CUDA
// call at thread exit), where the next thread finds them. So a process holds as many handles
// (each with cuBLAS's own default workspace) as threads were running these ops at the same
// time, not one per thread ever created (thread pools, servers); torch's cuBLAS handle pool
// works the same way. release_handles() destroys the idle ones and the calling thread's.
//
// A handle whose GEMMs were recorded into a CUDA graph that is not ours (torch.cuda.graph
// around the op: the GEMMs then use the handle's default workspace, which that graph keeps
// using on every replay) is "pinned": it is reused but never destroyed.
constexpr int kMaxDevices = 64;

struct Pooled {
  Handle handle;
  bool pinned;
};

struct HandlePool {
  std::mutex mutex;
  std::vector<Pooled> idle[kMaxDevices];
};

HandlePool& handle_pool() {
  static auto* pool = new HandlePool();  // leaked: never destroyed, so never used after it
  return *pool;
}

struct ThreadHandles {
  Handle handles[kMaxDevices] = {};
  bool pinned[kMaxDevices] = {};
  ThreadHandles() = default;
  ThreadHandles(const ThreadHandles&) = delete;
  ThreadHandles& operator=(const ThreadHandles&) = delete;
  ~ThreadHandles() {  // thread exit: back to the pool (no CUDA call)
    HandlePool& pool = handle_pool();
    std::lock_guard<std::mutex> lock(pool.mutex);
    for (int d = 0; d < kMaxDevices; ++d) {
      if (handles[d] != nullptr) pool.idle[d].push_back({handles[d], pinned[d]});
    }
  }
};

ThreadHandles& thread_handles() {
  static thread_local ThreadHandles t;
  return t;
}

// Pins this thread's handle for `device` (the one it has or will take) when the current
// stream there is being captured by someone else's graph. Called once per op, before its
// GEMMs (CudaKernels::check_device); a failed query pins too (conservative).
void note_foreign_capture(int device) {
  if (device < 0 || device >= kMaxDevices) return;
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  const cudaError_t err = cudaStreamIsCapturing(
      c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)), &status);
  if (err != cudaSuccess) (void)cudaGetLastError();
  if (err != cudaSuccess || status != cudaStreamCaptureStatusNone) {
    thread_handles().pinned[device] = true;
  }
}

// This thread's handle for the current device, bound to the current stream, in `math` mode.
Handle handle(int math) {
  const Api& a = api();
  const int device = c10::cuda::current_device();
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "turbolm rnn (cuda): device index ", device);
  ThreadHandles& mine = thread_handles();
  Handle& h = mine.handles[device];
  if (h == nullptr) {
    {
      HandlePool& pool = handle_pool();
      std::lock_guard<std::mutex> lock(pool.mutex);
      std::vector<Pooled>& idle = pool.idle[device];
      if (!idle.empty()) {
        h = idle.back().handle;
        mine.pinned[device] = mine.pinned[device] || idle.back().pinned;
        idle.pop_back();
      }
    }
    if (h == nullptr) check(a.create(&h), "cublasCreate");
  }
  check(a.set_stream(h, c10::cuda::getCurrentCUDAStream()), "cublasSetStream");
  // cublasSetStream resets the workspace to cuBLAS's default pool; while the graph variant
  // runs its step loop, point it at that call's workspace instead (no allocation during a
  // capture; the same algorithms in the warm-up, the capture and a fallback).
  const Workspace& gw = graph_workspace();
  if (gw.data != nullptr) check(a.set_workspace(h, gw.data, gw.bytes), "cublasSetWorkspace");
  check(a.set_math_mode(h, math), "cublasSetMathMode");
  return h;
}

// Destroys the idle pooled handles and the calling thread's own (pinned ones excepted);
// returns how many. cublasDestroy synchronizes the device. The caller's thread takes a new
// handle on its next GEMM.
int64_t release_handles() {
  std::vector<std::pair<int, Handle>> doomed;
  ThreadHandles& mine = thread_handles();
  {
    HandlePool& pool = handle_pool();
    std::lock_guard<std::mutex> lock(pool.mutex);
    for (int d = 0; d < kMaxDevices; ++d) {
      std::vector<Pooled>& idle = pool.idle[d];
      std::vector<Pooled> keep;
      for (const Pooled& p : idle) {
        if (p.pinned) {
          keep.push_back(p);
        } else {
          doomed.emplace_back(d, p.handle);
        }
      }
      idle.swap(keep);
      if (mine.handles[d] != nullptr && !mine.pinned[d]) {
        doomed.emplace_back(d, mine.handles[d]);
        mine.handles[d] = nullptr;
      }
    }
  }
  if (doomed.empty()) return 0;
  const Api& a = api();  // loaded: it created these handles
  Status first = 0;
  for (const auto& [device, h] : doomed) {
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    // Unbind from the last stream it ran on (which may no longer exist), then destroy.
    (void)a.set_stream(h, nullptr);
    const Status status = a.destroy(h);
    if (first == 0) first = status;
  }
  check(first, "cublasDestroy");
  return static_cast<int64_t>(doomed.size());
}

// The cuBLAS workspace of the graph variant: allocated per call from torch's caching
// allocator on the launch stream (see graphs::run), never kept between calls.
constexpr size_t kWorkspaceBytes = size_t(32) << 20;  // cuBLAS's recommendation for Hopper

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

// ---- variants -----------------------------------------------------------------------------
//
// TURBOLM_RNN_CUDA_VARIANT selects how the time loop runs (read on every call, so a benchmark
// can switch it between calls; turbolm.ops.rnn_kernels.cuda_variant sets it):
//   loop        (default) host loop, two launches per step
//   graph       the step loop of each layer / direction recorded once into a CUDA graph and
//               replayed (forward and backward; not with projections)
//   persistent  the forward loop as one cooperative kernel where supported (H <= 256, no
//               projection, no padding; fp32 / fp16 / bf16), the rest as `loop`
// Tokens combine with ',' or '+' ("persistent,graph": persistent forward, graph backward).
// "strict" (tests) turns a silent fallback into an error where the variant should have run:
// a failed capture / instantiation, or a persistent launch refused for a supported size.
struct Variant {
  bool graph = false;
  bool persistent = false;
  bool strict = false;
};

Variant variant() {
  Variant v;
  const char* env = std::getenv("TURBOLM_RNN_CUDA_VARIANT");
  if (env == nullptr || *env == '\0') return v;
  const std::string text(env);
  size_t start = 0;
  while (start <= text.size()) {
    size_t end = text.find_first_of(",+", start);
    if (end == std::string::npos) end = text.size();
    const std::string token = text.substr(start, end - start);
    if (token == "graph") {
      v.graph = true;
    } else if (token == "persistent") {
      v.persistent = true;
    } else if (token == "strict") {
      v.strict = true;
    } else {
      TORCH_CHECK(token == "loop" || token.empty(),
                  "TURBOLM_RNN_CUDA_VARIANT: unknown variant '", token,
                  "' (expected loop, graph, persistent, strict, or a ','-separated combination)");
    }
    start = end + 1;
  }
  return v;
}

// What the variants did, process-wide (torch.ops.turbolm.rnn_cuda_stats(), in this order;
// rnn_kernels.cuda_stats() names them): how a benchmark tells replays from recaptures.
enum Stat : int {
  kGraphReplays,         // loop replayed from a cached graph (one host call)
  kGraphWarmups,         // first call of given sizes, run plainly
  kGraphCaptures,        // loop captured (then instantiated or updated)
  kGraphUpdates,         // ... and applied to a cached graph by cudaGraphExecUpdate
  kGraphInstantiations,  // ... or instantiated anew
  kGraphFallbacks,       // capture / instantiation failed: plain loop
  kPersistentLaunches,   // forward loops run by the persistent kernel
  kPersistentRefusals,   // supported sizes, but no co-resident grid: plain loop
  kGraphEvictions,       // cached graphs destroyed to make room (graphs::kMaxEntries)
  kNumStats
};

std::atomic<int64_t>* stats() {
  static std::atomic<int64_t> counters[kNumStats] = {};
  return counters;
}

void count(Stat s) { stats()[s].fetch_add(1, std::memory_order_relaxed); }

std::vector<int64_t> cuda_stats() {
  std::vector<int64_t> out(kNumStats);
  for (int i = 0; i < kNumStats; ++i) out[i] = stats()[i].load(std::memory_order_relaxed);
  return out;
}

// ---- CUDA graphs of the step loop ---------------------------------------------------------
//
// run_steps records the launches of one direction's step loop (cuBLAS GEMMs, gate kernels)
// into a graph by stream capture and replays it. The capture runs on a private non-blocking
// stream created for it (the legacy default stream cannot be captured; a stream of torch's
// pool could carry other threads' work into the capture) and destroyed right after, in
// thread-local mode, with the current stream switched to it, so every launch of the loop
// lands in the graph; the graph is then launched on the caller's stream, which orders it
// after prior work there. The loop allocates nothing (run_steps leaves projections, whose
// loop uses ATen ops, to the plain loop), so nothing is allocated on the capture stream.
//
// Executable graphs are cached process-wide (one mutex; lookups, launches, updates and
// destruction of cached graphs all happen under it), keyed on everything the launches depend
// on: the layer's sizes, dtypes, direction and raw buffer pointers (from rnn_layer.h), the
// recurrent weight's pointer / layout, the TF32 setting, device, launch stream and the cuBLAS
// workspace's pointer. A call whose key matches replays the graph (one host call); otherwise
// the loop is captured again (about the host cost of the plain loop) and either updates the
// least recently used graph of the same sizes in place (cudaGraphExecUpdate: same topology,
// new pointers) or is instantiated anew. With the caching allocator, buffers usually come
// back at the same addresses from one training step to the next, so steady state replays.
// The first call of given sizes on a device runs plainly (warm-up: cuBLAS handle, lazy kernel
// loading); if a capture fails for any reason, the loop runs plainly (the captured launches
// never ran).
//
// Memory safety. A cached graph holds raw addresses. It is replayed only by a call whose key
// holds the same addresses, i.e. only while those addresses belong to that call's live
// buffers (the key covers every address the captured launches touch: the buffers of
// rnn_layer.h's key, the weight, and the workspace); a graph whose buffers were freed just
// sits in the cache, unreplayable, until evicted. No GPU memory is held by the cache: the
// cuBLAS workspace (kWorkspaceBytes) is allocated per call from torch's caching allocator on
// the launch stream, set on the handle for the warm-up, the capture and a fallback, part of
// the key, and freed when the call returns (stream-ordered, like every tensor the call frees
// after its launches). Steady state gets the same block back, so its address does not spoil
// replays; torch.cuda.empty_cache() can return it to the driver between calls.
//
// Bounds: kMaxEntries graphs per process (least recently used evicted: cudaGraphExecDestroy,
// which lets in-flight launches complete), kPerShape per size key (beyond that, recaptures
// update the least recently used one in place). release_all() (torch.ops.turbolm.
// rnn_release_cuda_caches) destroys them all. The cache is leaked at exit (no CUDA calls
// during static destruction).
namespace graphs {

struct Entry {
  std::vector<int64_t> key;
  int device = 0;
  cudaGraphExec_t exec = nullptr;
  uint64_t used = 0;
};

struct Cache {
  std::mutex mutex;
  std::vector<Entry> entries;
  std::vector<std::vector<int64_t>> warmed;  // (device, size key) already run once plainly
  uint64_t clock = 0;
};

Cache& cache() {  // process-wide; leaked on purpose (no CUDA calls during static destruction)
  static auto* c = new Cache();
  return *c;
}

constexpr size_t kMaxEntries = 64;  // per process: e.g. 16 layers x 2 directions x fwd / bwd
constexpr int kPerShape = 8;        // graphs kept per size key (e.g. several layers)
constexpr size_t kShapeLen = 12;    // key[0, kShapeLen): sizes and flags (rnn_layer.h)
constexpr size_t kMaxWarmed = 256;  // size keys remembered as warmed up

bool same_shape(const Entry& e, int device, const std::vector<int64_t>& key) {
  return e.device == device && e.key.size() == key.size() &&
         std::equal(key.begin(), key.begin() + kShapeLen, e.key.begin());
}

// Empties an entry (under the cache mutex); in-flight launches of its graph still complete.
void destroy_exec(Entry& e) {
  e.key.clear();  // an entry without a graph matches no call
  if (e.exec == nullptr) return;
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(e.device));
  const cudaError_t err = cudaGraphExecDestroy(e.exec);
  e.exec = nullptr;
  C10_CUDA_CHECK(err);
}

struct OwnedGraph {  // a captured graph, destroyed on every way out of run()
  cudaGraph_t graph = nullptr;
  explicit OwnedGraph(cudaGraph_t g) : graph(g) {}
  ~OwnedGraph() {
    if (graph != nullptr) (void)cudaGraphDestroy(graph);
  }
  OwnedGraph(const OwnedGraph&) = delete;
  OwnedGraph& operator=(const OwnedGraph&) = delete;
};

struct SideStream {  // a stream that lives for one capture
  cudaStream_t stream = nullptr;
  SideStream() { C10_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking)); }
  ~SideStream() { (void)cudaStreamDestroy(stream); }  // nothing ran on it: it only recorded
  SideStream(const SideStream&) = delete;
  SideStream& operator=(const SideStream&) = delete;
};

// Captures steps() on a private stream (GEMMs in workspace ws); nullptr if capture failed.
template <typename F>
cudaGraph_t capture(int device, const blas::Workspace& ws, F& steps) {
  const SideStream owner;
  const cudaStream_t side = owner.stream;
  cudaGraph_t graph = nullptr;
  bool ok = false;
  {
    c10::cuda::CUDAStreamGuard guard(
        c10::cuda::getStreamFromExternal(side, static_cast<c10::DeviceIndex>(device)));
    blas::UseWorkspace use(ws);
    if (cudaStreamBeginCapture(side, cudaStreamCaptureModeThreadLocal) == cudaSuccess) {
      bool threw = false;
      try {
        steps();
      } catch (...) {
        threw = true;
      }
      const cudaError_t end = cudaStreamEndCapture(side, &graph);
      ok = !threw && end == cudaSuccess && graph != nullptr;
    }
  }
  if (!ok) {
    (void)cudaGetLastError();  // clear the capture error; the plain loop runs instead
    if (graph != nullptr) cudaGraphDestroy(graph);
    graph = nullptr;
  }
  // The handle is still bound to `side`: bind it back to the caller's stream before `side`
  // goes.
  try {
    (void)blas::handle(blas::kDefaultMath);
  } catch (...) {
    if (graph != nullptr) cudaGraphDestroy(graph);
    throw;
  }
  return graph;
}

template <typename F>
void run(std::vector<int64_t> key, const Operand& w, bool strict, F& steps) {
  const blas::Api& api = blas::api();
  const cudaStream_t launch = c10::cuda::getCurrentCUDAStream();
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(launch, &status));
  const int device = c10::cuda::current_device();
  if (status != cudaStreamCaptureStatusNone || api.set_workspace == nullptr ||
      device >= blas::kMaxDevices) {
    steps();  // inside someone else's capture, or no cublasSetWorkspace: plain loop
    return;
  }
  // This call's cuBLAS workspace (see "Memory safety"), allocated on the launch stream.
  at::Tensor workspace;
  try {
    workspace = at::empty({static_cast<int64_t>(blas::kWorkspaceBytes)},
                          at::TensorOptions().dtype(at::kByte).device(at::kCUDA, device));
  } catch (const c10::OutOfMemoryError&) {
    TORCH_CHECK(!strict, "turbolm rnn (cuda): no memory for the step-loop graph's workspace");
    count(kGraphFallbacks);
    steps();  // the plain loop, on cuBLAS's default workspace
    return;
  }
  const blas::Workspace ws{workspace.mutable_data_ptr(), blas::kWorkspaceBytes};
  key.push_back(device);
  key.push_back(reinterpret_cast<int64_t>(launch));
  key.push_back(reinterpret_cast<int64_t>(w.t.defined() ? w.t.const_data_ptr() : nullptr));
  key.push_back(w.ld);
  key.push_back(w.trans);
  key.push_back(at::globalContext().allowTF32CuBLAS());
  key.push_back(reinterpret_cast<int64_t>(ws.data));
  Cache& c = cache();
  bool warm_up = false;
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    for (Entry& e : c.entries) {
      if (e.key == key) {
        e.used = ++c.clock;
        count(kGraphReplays);
        C10_CUDA_CHECK(cudaGraphLaunch(e.exec, launch));
        return;
      }
    }
    // The first call of given sizes runs plainly (below): it creates the cuBLAS handle and
    // loads the kernels (lazy module loading) outside of any capture, as CUDA-graph users
    // warm up.
    std::vector<int64_t> sizes(key.begin(), key.begin() + kShapeLen);
    sizes.push_back(device);
    if (std::find(c.warmed.begin(), c.warmed.end(), sizes) == c.warmed.end()) {
      if (c.warmed.size() >= kMaxWarmed) c.warmed.clear();
      c.warmed.push_back(std::move(sizes));
      count(kGraphWarmups);
      warm_up = true;
    }
  }
  if (warm_up) {
    blas::UseWorkspace use(ws);  // the algorithms the capture will pick
    steps();
    return;
  }
  (void)blas::handle(blas::kDefaultMath);  // exists already; never created inside a capture
  const OwnedGraph owned(capture(device, ws, steps));
  const cudaGraph_t graph = owned.graph;
  if (graph == nullptr) {
    TORCH_CHECK(!strict, "turbolm rnn (cuda): capturing the step loop into a CUDA graph failed");
    count(kGraphFallbacks);
    blas::UseWorkspace use(ws);
    steps();
    return;
  }
  count(kGraphCaptures);
  std::unique_lock<std::mutex> lock(c.mutex);
  // Another thread may have cached the same key meanwhile: replay that one.
  for (Entry& e : c.entries) {
    if (e.key == key) {
      e.used = ++c.clock;
      count(kGraphReplays);
      C10_CUDA_CHECK(cudaGraphLaunch(e.exec, launch));
      return;
    }
  }
  // The slot: the least recently used graph of these sizes once kPerShape exist (updated in
  // place), else a new one (evicting the least recently used of all at kMaxEntries).
  int same = 0;
  Entry* lru_same = nullptr;
  Entry* lru_all = nullptr;
  for (Entry& e : c.entries) {
    if (same_shape(e, device, key)) {
      ++same;
      if (lru_same == nullptr || e.used < lru_same->used) lru_same = &e;
    }
    if (lru_all == nullptr || e.used < lru_all->used) lru_all = &e;
  }
  Entry* slot = nullptr;
  if (same >= kPerShape) {
    slot = lru_same;
    cudaGraphExecUpdateResultInfo info;
    if (slot->exec != nullptr && cudaGraphExecUpdate(slot->exec, graph, &info) == cudaSuccess) {
      count(kGraphUpdates);
    } else {
      (void)cudaGetLastError();
      destroy_exec(*slot);
    }
  } else if (c.entries.size() >= kMaxEntries) {
    slot = lru_all;
    count(kGraphEvictions);
    destroy_exec(*slot);
  } else {
    c.entries.emplace_back();
    slot = &c.entries.back();
  }
  slot->key.clear();  // matches no call until the graph below is in it
  slot->device = device;  // where the graph below runs
  if (slot->exec == nullptr) {
    count(kGraphInstantiations);
    const cudaError_t err = cudaGraphInstantiate(&slot->exec, graph, 0);
    if (err != cudaSuccess) {
      (void)cudaGetLastError();
      slot->exec = nullptr;
      c.entries.erase(c.entries.begin() + (slot - c.entries.data()));
      lock.unlock();
      TORCH_CHECK(!strict, "turbolm rnn (cuda): instantiating the step-loop graph failed: ",
                  cudaGetErrorString(err));
      count(kGraphFallbacks);
      blas::UseWorkspace use(ws);
      steps();
      return;
    }
  }
  slot->key = std::move(key);
  slot->used = ++c.clock;
  C10_CUDA_CHECK(cudaGraphLaunch(slot->exec, launch));
}

// Destroys every cached graph (all threads'; in-flight launches still complete) and forgets
// the warm-ups; returns how many graphs there were.
int64_t release_all() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  int64_t n = 0;
  cudaError_t first = cudaSuccess;
  for (Entry& e : c.entries) {
    if (e.exec == nullptr) continue;
    ++n;
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(e.device));
    const cudaError_t err = cudaGraphExecDestroy(e.exec);
    if (first == cudaSuccess) first = err;
  }
  c.entries.clear();
  c.warmed.clear();
  if (first != cudaSuccess) C10_CUDA_CHECK(first);  // (no CUDA call at all with nothing cached)
  return n;
}

}  // namespace graphs

// ---- persistent forward kernel (small hidden sizes) --------------------------------------
//
// The whole forward loop of one direction in one cooperative launch. Block (unit tile u,
// batch tile bt) owns kPU = 8 consecutive units j (all their gates: NG * kPU columns of W_hh)
// and BT = 32 * R batch rows; its 256 threads are (unit ju = tid % 8, row group rg = tid / 8),
// each computing R rows of one unit, all gates. The block's W_hh slice stays in shared memory
// for all T steps as fp32 (the values of the GEMM-type weights), laid out [k][ju][gate] so a
// warp's weight loads are 8 distinct (vector) addresses; h_{t-1} of the block's rows is
// staged per step into shared memory [k][row] (row stride BT + 1: conflict-free transposed
// stores, k-contiguous global reads), rounded to the GEMM type first (what the cuBLAS path
// multiplies). Products accumulate in fp32, added to the input projections already in ws
// (the same sum the loop's accumulating GEMM forms, in another order), and the gate math is
// the rnn_math.h per-unit functions, called on registers. The cell state and the thread's
// own h_{t-1} stay in registers across steps.
//
// h_t is exchanged through a global ping-pong buffer hbuf (2, B, H) in the GEMM type: step s
// writes buffer s & 1 and reads buffer (s - 1) & 1 (step 0 reads h_0), then grid.sync();
// the sync orders every block's writes of step s before any read in step s + 1 (it fences at
// device scope), and the buffer a step writes was last read a step earlier, before the
// previous sync. The reads bypass L1 (__ldcg), so no stale line can be seen.
// Deadlock freedom: cudaLaunchCooperativeKernel refuses a grid that cannot be co-resident;
// it is also checked beforehand against cudaOccupancyMaxActiveBlocksPerMultiprocessor, and
// any refusal falls back to the step loop (nothing ran).
namespace persistent {

constexpr int kPU = 8;                      // units per block
constexpr int kThreads = 256;               // kPU units x kGroups row groups
constexpr int kGroups = kThreads / kPU;     // 32
constexpr int64_t kMaxH = 256;
constexpr int kStage = 8;                   // h loads in flight per thread when staging

template <int MODE>
constexpr int n_gates() {
  return MODE == kLSTM ? 4 : MODE == kGRU ? 3 : 1;
}

template <typename L>
__device__ __forceinline__ float load_cg(const L* p) {
  if constexpr (std::is_same_v<L, float>) {
    return __ldcg(p);
  } else {
    const unsigned short bits = __ldcg(reinterpret_cast<const unsigned short*>(p));
    return static_cast<float>(L(bits, L::from_bits()));
  }
}

template <typename L>
__device__ __forceinline__ float round_to(float v) {
  return static_cast<float>(static_cast<L>(v));
}

template <int MODE, int R, typename L>
__global__ void __launch_bounds__(kThreads) fwd_kernel(SeqFwd<float, L> q, L* hbuf) {
  constexpr int NG = n_gates<MODE>();
  constexpr int BT = kGroups * R;  // rows per block
  constexpr int BTP = BT + 1;      // row stride of h_s
  extern __shared__ float4 smem4[];
  const int H = static_cast<int>(q.H), B = static_cast<int>(q.B);
  const int64_t S = static_cast<int64_t>(saved_of(MODE)) * H;
  float* w_s = reinterpret_cast<float*>(smem4);  // [H][kPU][NG]
  float* h_s = w_s + H * kPU * NG;               // [H][BTP]
  const int unit_tiles = (H + kPU - 1) / kPU;
  const int tile_u = blockIdx.x % unit_tiles, tile_b = blockIdx.x / unit_tiles;
  const int ju = threadIdx.x % kPU, rg = threadIdx.x / kPU;
  const int j = tile_u * kPU + ju;
  const bool unit_ok = j < H;
  const int row0 = tile_b * BT;   // first row of the block
  const int b0 = row0 + rg * R;   // first row of the thread

  for (int idx = threadIdx.x; idx < H * kPU * NG; idx += kThreads) {
    const int g = idx % NG, u = (idx / NG) % kPU, k = idx / (NG * kPU);
    const int jj = tile_u * kPU + u;
    w_s[idx] = jj < H ? static_cast<float>(q.w_hh[static_cast<int64_t>(g * H + jj) * H + k]) : 0.f;
  }
  float bl[NG > 1 ? NG : 1];
  float bhn[1] = {0.f};
  float c[R], hown[R];
#pragma unroll
  for (int g = 0; g < NG; ++g) bl[g] = unit_ok ? q.bias[g * H + j] : 0.f;
  if (MODE == kGRU && unit_ok) bhn[0] = q.b_hn[j];
#pragma unroll
  for (int i = 0; i < R; ++i) {
    const int b = b0 + i;
    const bool ok = unit_ok && b < B;
    hown[i] = ok ? q.h[static_cast<int64_t>(b) * H + j] : 0.f;
    c[i] = (MODE == kLSTM && ok) ? q.c[static_cast<int64_t>(b) * H + j] : 0.f;
  }
  const int r_first = threadIdx.x / H, k_first = threadIdx.x % H;  // h tile staging
  const int r_step = kThreads / H, k_step = kThreads % H;
  cooperative_groups::grid_group grid = cooperative_groups::this_grid();

  for (int64_t step = 0; step < q.steps; ++step) {
    const int64_t t = q.reverse ? q.steps - 1 - step : step;
    // h_{t-1} of the block's rows, in the GEMM type, into h_s (transposed)
    // Element idx = r * H + k of the (BT, H) tile, idx = tid, tid + 256, ...: (r, k) advanced
    // without divisions, kStage loads in flight per thread before their stores.
    const L* hsrc = hbuf + ((step - 1) & 1) * static_cast<int64_t>(B) * H;
    for (int r = r_first, k = k_first; r < BT;) {
      float v[kStage];
      int at[kStage];
#pragma unroll
      for (int u = 0; u < kStage; ++u) {
        v[u] = 0.f;
        at[u] = r < BT ? k * BTP + r : -1;
        if (r < BT && row0 + r < B) {
          const int64_t off = static_cast<int64_t>(row0 + r) * H + k;
          v[u] = step == 0 ? round_to<L>(q.h[off]) : load_cg(hsrc + off);
        }
        r += r_step;
        k += k_step;
        if (k >= H) {
          k -= H;
          ++r;
        }
      }
#pragma unroll
      for (int u = 0; u < kStage; ++u) {
        if (at[u] >= 0) h_s[at[u]] = v[u];
      }
    }
    // this step's input projections (x W_ih^T, in ws), loaded now to overlap the dot products
    float pre[R][NG];
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const int b = b0 + i;
      const bool ok = unit_ok && b < B;
      const float* wsr = q.ws + (t * B + b) * S;
#pragma unroll
      for (int g = 0; g < NG; ++g) pre[i][g] = ok ? wsr[g * H + j] : 0.f;
    }
    __syncthreads();
    float acc[R][NG];
#pragma unroll
    for (int i = 0; i < R; ++i)
#pragma unroll
      for (int g = 0; g < NG; ++g) acc[i][g] = 0.f;
    if (unit_ok) {
      const float* wp = w_s + ju * NG;
      const float* hp = h_s + rg * R;
#pragma unroll 4
      for (int k = 0; k < H; ++k) {
        float w[NG];
        if constexpr (NG == 4) {
          const float4 w4 = *reinterpret_cast<const float4*>(wp + k * kPU * NG);
          w[0] = w4.x;
          w[1] = w4.y;
          w[2] = w4.z;
          w[3] = w4.w;
        } else {
#pragma unroll
          for (int g = 0; g < NG; ++g) w[g] = wp[k * kPU * NG + g];
        }
#pragma unroll
        for (int i = 0; i < R; ++i) {
          const float hv = hp[k * BTP + i];
#pragma unroll
          for (int g = 0; g < NG; ++g) acc[i][g] = fmaf(w[g], hv, acc[i][g]);
        }
      }
    }
    // gate math, outputs, h_t into hbuf[step & 1]
    L* hdst = hbuf + (step & 1) * static_cast<int64_t>(B) * H;
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const int b = b0 + i;
      if (!unit_ok || b >= B) continue;
      const int64_t tb = t * B + b;
      float* wsr = q.ws + tb * S;
      float hn;
      if constexpr (MODE == kLSTM) {
        float wl[5] = {pre[i][0] + acc[i][0], pre[i][1] + acc[i][1], pre[i][2] + acc[i][2],
                       pre[i][3] + acc[i][3], 0.f};
        float cl = c[i];
        lstm_fwd_unit<float>(0, 1, bl, wl, &cl, &hn);
#pragma unroll
        for (int g = 0; g < 5; ++g) wsr[g * H + j] = wl[g];
        c[i] = cl;
      } else if constexpr (MODE == kGRU) {
        float wl[4] = {pre[i][0], pre[i][1], pre[i][2], 0.f};
        const float gh[3] = {acc[i][0], acc[i][1], acc[i][2]};
        hn = gru_fwd_unit<float>(0, 1, bl, bhn, hown[i], gh, wl);
#pragma unroll
        for (int g = 0; g < 4; ++g) wsr[g * H + j] = wl[g];
      } else {
        float wl[1] = {pre[i][0] + acc[i][0]};
        hn = rnn_fwd_unit<float>(0, bl, MODE == kRNNRelu, wl);
        wsr[j] = wl[0];
      }
      q.hprev[tb * H + j] = hown[i];
      q.y[tb * q.y_ld + j] = hn;
      hdst[static_cast<int64_t>(b) * H + j] = static_cast<L>(hn);
      hown[i] = hn;
    }
    grid.sync();  // also a block barrier: h_s is free to be refilled
  }
  // final states (q.h was last read in step 0, before at least one grid.sync)
#pragma unroll
  for (int i = 0; i < R; ++i) {
    const int b = b0 + i;
    if (!unit_ok || b >= B) continue;
    const int64_t off = static_cast<int64_t>(b) * H + j;
    q.h[off] = hown[i];
    if (q.h_lp != nullptr) q.h_lp[off] = static_cast<L>(hown[i]);
    if (MODE == kLSTM) q.c[off] = c[i];
  }
}

template <int MODE, int R, typename L>
size_t smem_bytes(int64_t H) {
  return static_cast<size_t>(H) * (kPU * n_gates<MODE>() + kGroups * R + 1) * sizeof(float);
}

// Launches the kernel for q if some R fits co-resident: the smallest R whose grid fits one
// block per SM, else the smallest whose grid fits at all. Returns false (nothing launched)
// otherwise.
template <int MODE, typename L>
bool launch_mode(const SeqFwd<float, L>& q) {
  using Fn = void (*)(SeqFwd<float, L>, L*);
  const Fn fns[3] = {fwd_kernel<MODE, 1, L>, fwd_kernel<MODE, 2, L>, fwd_kernel<MODE, 4, L>};
  const size_t smem[3] = {smem_bytes<MODE, 1, L>(q.H), smem_bytes<MODE, 2, L>(q.H),
                          smem_bytes<MODE, 4, L>(q.H)};
  const int rows[3] = {kGroups, 2 * kGroups, 4 * kGroups};
  const int device = c10::cuda::current_device();
  int sms = 0, coop = 0, smem_optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device));
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (coop == 0) return false;
  const int64_t unit_tiles = (q.H + kPU - 1) / kPU;
  int pick = -1;
  int64_t pick_grid = 0;
  for (int pass = 0; pass < 2 && pick < 0; ++pass) {
    for (int r = 0; r < 3 && pick < 0; ++r) {
      if (smem[r] > static_cast<size_t>(smem_optin)) continue;
      const int64_t grid = unit_tiles * ((q.B + rows[r] - 1) / rows[r]);
      if (pass == 0 && grid > sms) continue;
      // The device's opt-in maximum, not this call's size: the attribute is per kernel and
      // process-wide, so another thread launching with a larger H must not be cut short.
      if (cudaFuncSetAttribute(fns[r], cudaFuncAttributeMaxDynamicSharedMemorySize,
                               smem_optin) != cudaSuccess) {
        (void)cudaGetLastError();
        continue;
      }
      int per_sm = 0;
      if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, fns[r], kThreads, smem[r]) !=
          cudaSuccess) {
        (void)cudaGetLastError();
        continue;
      }
      if (grid <= static_cast<int64_t>(per_sm) * sms) {
        pick = r;
        pick_grid = grid;
      }
    }
  }
  if (pick < 0) return false;
  at::Tensor hbuf = at::empty({2, q.B, q.H}, at::TensorOptions()
                                                 .dtype(c10::CppTypeToScalarType<L>::value)
                                                 .device(at::kCUDA, device));
  SeqFwd<float, L> arg = q;
  L* hbuf_p = hbuf.mutable_data_ptr<L>();
  void* args[] = {&arg, &hbuf_p};
  const cudaError_t err = cudaLaunchCooperativeKernel(
      reinterpret_cast<const void*>(fns[pick]), dim3(static_cast<unsigned>(pick_grid)),
      dim3(kThreads), args, smem[pick], c10::cuda::getCurrentCUDAStream());
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // not launched: the step loop runs instead
    return false;
  }
  return true;
}

template <typename L>
bool launch(const SeqFwd<float, L>& q) {
  switch (q.mode) {
    case kLSTM: return launch_mode<kLSTM, L>(q);
    case kGRU: return launch_mode<kGRU, L>(q);
    case kRNNTanh: return launch_mode<kRNNTanh, L>(q);
    default: return launch_mode<kRNNRelu, L>(q);
  }
}

}  // namespace persistent

struct CudaKernels {
  using Guard = c10::cuda::CUDAGuard;

  // Once per op, before its GEMMs (and before its device guard: x's device).
  static void check_device(const char* op, const at::Tensor& x) {
    CHECK_CUDA(x);
    blas::note_foreign_capture(x.device().index());
  }

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

  // The forward loop of one direction as one persistent kernel (variant "persistent").
  template <typename T, typename L>
  static bool fwd_sequence(const SeqFwd<T, L>& q) {
    if constexpr (!std::is_same_v<T, float>) {
      return false;
    } else {
      const Variant v = variant();
      if (!v.persistent || q.H > persistent::kMaxH || q.B == 0) return false;
      if (q.B > std::numeric_limits<int>::max() / q.H) return false;
      const bool launched = persistent::launch(q);
      count(launched ? kPersistentLaunches : kPersistentRefusals);
      TORCH_CHECK(launched || !v.strict, "turbolm rnn (cuda): the persistent kernel could not ",
                  "be launched for B=", q.B, " H=", q.H, " (not co-resident / no cooperative ",
                  "launch)");
      return launched;
    }
  }

  // The step loop of one direction, recorded into a CUDA graph (variant "graph"; not with
  // projections, whose loop uses ATen ops) or run as it is.
  template <typename F>
  static void run_steps(const std::vector<int64_t>& key, const Weight& w_hh, bool proj,
                        F&& steps) {
    const Variant v = variant();
    if (proj || !v.graph) {
      steps();
      return;
    }
    graphs::run(key, w_hh, v.strict, steps);
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

// torch.ops.turbolm.rnn_release_cuda_caches(): frees what this backend keeps between calls:
// every cached step-loop graph (process-wide), then the cuBLAS handles idle in the pool and
// the calling thread's own (see blas "handles"; pinned ones stay). Returns [graphs, handles]
// destroyed. Safe while other threads run these ops (they keep their handles; a graph being
// launched holds the cache's mutex). Nothing else is kept: the graph variant's workspace and
// the persistent kernel's buffers are per call (torch's caching allocator), so
// torch.cuda.empty_cache() returns them to the driver.
std::vector<int64_t> release_cuda_caches() {
  const int64_t graphs = graphs::release_all();
  const int64_t handles = blas::release_handles();
  return {graphs, handles};
}

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

// Defined here (CUDA builds only): no tensor arguments, so one catch-all kernel.
TORCH_LIBRARY_FRAGMENT(turbolm, m) {
  m.def("rnn_cuda_stats() -> int[]", &turbolm::rnn::cuda_stats);
  m.def("rnn_release_cuda_caches() -> int[]", &turbolm::rnn::release_cuda_caches);
}

TORCH_LIBRARY_IMPL(turbolm, CUDA, m) {
  m.impl("rnn_layer_fwd", &turbolm::rnn::layer_fwd_cuda);
  m.impl("rnn_layer_bwd", &turbolm::rnn::layer_bwd_cuda);
  m.impl("rnn_cell_fwd", &turbolm::rnn::cell_fwd_cuda);
  m.impl("rnn_cell_bwd", &turbolm::rnn::cell_bwd_cuda);
}
