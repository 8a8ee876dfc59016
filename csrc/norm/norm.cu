// LayerNorm / RMSNorm CUDA kernels (TORCH_LIBRARY_IMPL(turbolm, CUDA)).
//
// Design
// ------
// Two paths. Both read and write 16-byte vectors (VEC = 16 / sizeof(T) elements) when N is a
// multiple of VEC and every pointer is 16-byte aligned; fp32 accumulation (fp64 for fp64);
// every reduction runs in a fixed order, so results are bitwise reproducible run to run.
//
// 1. Register path (16-byte vectors, N <= 2048 vectors for the forward and <= 1024 for the
//    backward: 16384 / 8192 elements of a 2-byte type, 8192 / 4096 fp32). A row is owned by
//    TPR = blockDim.x threads (a multiple of 32); thread t holds the vectors t, t + TPR, ...
//    of the row (VPT of them, coalesced across the threads) in registers, so each element is
//    read from global memory once. A block holds RPB = blockDim.y rows side by side. Row sums:
//    warp xor-shuffles (every lane ends with the same bits), then, when a row spans several
//    warps, one value per warp through shared memory (double-buffered: one __syncthreads per
//    reduction), added in warp order by every thread. Control flow around the barriers is
//    block-uniform (trip counts depend on the block only; idle lanes work on zeros).
//    * Forward (norm_fwd_reg_kernel): VPT = 4 from 257 vectors up (N = 4096 bf16: 128
//      threads per row, 2 rows per 256-thread block, 64 registers: 4 blocks and 64 KB of loads
//      in flight per SM); grid-stride over groups of RPB rows with a grid of the resident
//      capacity (SMs x blocks per SM); statistics two-pass in registers (sum -> mean, then sum
//      of squared deviations: exact for constant rows), then y = xhat * w + b.
//    * Backward (norm_bwd_reg_kernel), dx and the dweight / dbias partial sums in one pass:
//      VPT = 2 above 64 vectors (N = 4096 bf16: 256 threads per row, 2 rows per 512-thread
//      block, up to 128 registers: one block per SM). Thread t owns the same columns in every
//      row. Block c owns the contiguous row range [c * rows_per_chunk, ...); lane y walks
//      rows begin + y, begin + y + RPB, ... in order, keeping per-column fp32 partials of
//      dy * xhat and dy in registers (the weights in shared memory), with the next two rows'
//      dy, x, mean, rstd loading while one is reduced (one row ahead when both dweight and
//      dbias are needed: twice the partial registers). At the end the RPB lanes' partials are added in lane order through shared
//      memory and written once to partial[c, col]; sum_partials_kernel adds the chunks in a
//      fixed order. chunks = the kernel's resident capacity on this device (one wave): the
//      partial traffic is chunks x N x 4 bytes per gradient, ~2 MB at N = 4096 on 132 SMs,
//      next to 192 MB of rows for 8192 x 4096 bf16. The row split depends on (rows, N, dtype,
//      the SM count and the kernel's occupancy): bitwise reproducible run to run on one GPU,
//      not across GPU models.
//    OPT-IN until verified on a GPU (written without one): TURBOLM_NORM_REG=1 enables it.
//    Benchmark knobs (read once per process): TURBOLM_NORM_REG=1 (register path),
//    TURBOLM_NORM_FWD_VPT=1|2|4, TURBOLM_NORM_BWD_VPT=1|2, TURBOLM_NORM_BWD_AHEAD=1|2 (Tuning).
// 2. Generic path (any N, odd alignments: VEC = 1 when 16-byte vectors are impossible):
//    * forward / dx: one row per warp (N <= 1024: blocks of 32 x 4) or per block (128..1024
//      threads), grid-stride over rows; statistics by the chunked moments of common/row_math.h
//      (moments_of per vector, moments_merge across vectors, lanes and warps in a fixed order);
//      the second pass re-reads the row (L1/L2).
//    * dweight / dbias: a partial-sum kernel over (column tiles of 32 vectors) x (row splits),
//      rows of a split summed in a fixed order through shared memory into partial[split, col];
//      sum_partials_kernel adds the splits. The split count depends only on (rows, N). This
//      path reads dy and x twice (the dx kernel and the partial kernel).
// Host side: the SM count and each kernel instance's occupancy are queried once per device and
// cached; per call there are only the output / partial allocations and the launches.
// Headers: ATen core / c10 only (no torch/extension.h), to keep nvcc builds short.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <tuple>
#include <vector>

#include "../common/dispatch.h"
#include "../common/row_math.h"
#include "norm.h"

namespace turbolm::norm {
namespace {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpRowMaxN = 1024;  // rows up to this length get one warp each
constexpr int kRowsPerWarpBlock = 4;

// ---- vector loads / stores ---------------------------------------------------------------

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

template <typename T, typename acc_t, int VEC>
__device__ __forceinline__ void load_vec(const T* p, acc_t* out) {
  const Vec<T, VEC> tmp = *reinterpret_cast<const Vec<T, VEC>*>(p);
#pragma unroll
  for (int k = 0; k < VEC; ++k) out[k] = static_cast<acc_t>(tmp.v[k]);
}

// Loads VEC values of an optional per-column vector (weight / bias), `fill` when absent.
template <typename T, typename acc_t, int VEC>
__device__ __forceinline__ void load_vec_or(const T* p, acc_t fill, acc_t* out) {
  if (p != nullptr) {
    load_vec<T, acc_t, VEC>(p, out);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[k] = fill;
  }
}

template <typename T, typename acc_t, int VEC>
__device__ __forceinline__ void store_vec(T* p, const acc_t* in) {
  Vec<T, VEC> tmp;
#pragma unroll
  for (int k = 0; k < VEC; ++k) tmp.v[k] = static_cast<T>(in[k]);
  *reinterpret_cast<Vec<T, VEC>*>(p) = tmp;
}

// ---- row reductions -----------------------------------------------------------------------

template <typename acc_t>
__device__ __forceinline__ Moments<acc_t> shfl_down(const Moments<acc_t>& m, int offset) {
  return {__shfl_down_sync(kFullMask, m.n, offset), __shfl_down_sync(kFullMask, m.mean, offset),
          __shfl_down_sync(kFullMask, m.m2, offset)};
}

template <typename acc_t>
__device__ __forceinline__ GradSums<acc_t> shfl_down(const GradSums<acc_t>& s, int offset) {
  return {__shfl_down_sync(kFullMask, s.g, offset), __shfl_down_sync(kFullMask, s.gx, offset)};
}

template <typename acc_t>
__device__ __forceinline__ Moments<acc_t> shfl_first(const Moments<acc_t>& m) {
  return {__shfl_sync(kFullMask, m.n, 0), __shfl_sync(kFullMask, m.mean, 0),
          __shfl_sync(kFullMask, m.m2, 0)};
}

template <typename acc_t>
__device__ __forceinline__ GradSums<acc_t> shfl_first(const GradSums<acc_t>& s) {
  return {__shfl_sync(kFullMask, s.g, 0), __shfl_sync(kFullMask, s.gx, 0)};
}

template <typename acc_t>
__device__ __forceinline__ Moments<acc_t> combine(const Moments<acc_t>& a, const Moments<acc_t>& b) {
  return moments_merge(a, b);
}

template <typename acc_t>
__device__ __forceinline__ GradSums<acc_t> combine(const GradSums<acc_t>& a,
                                                   const GradSums<acc_t>& b) {
  return grad_sums_merge(a, b);
}

// Reduces v over the threads that share a row (threadIdx.x of the block, blockDim.x of them:
// one warp, or the whole block when blockDim.y == 1) and returns the total to all of them.
// Lanes are combined in a fixed order (lane i with lane i + offset), so the result is
// deterministic. `smem` holds at least 32 values; block mode synchronizes the block.
template <typename V>
__device__ __forceinline__ V row_allreduce(V v, V* smem) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v = combine(v, shfl_down(v, offset));
  if (blockDim.x == kWarp) return shfl_first(v);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int warps = blockDim.x / kWarp;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    V w = lane < warps ? smem[lane] : V{};
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset /= 2) w = combine(w, shfl_down(w, offset));
    if (lane == 0) smem[0] = w;
  }
  __syncthreads();
  v = smem[0];
  __syncthreads();  // smem is reused by the next row
  return v;
}

// ---- forward ------------------------------------------------------------------------------

// x, y: (rows, n); w, b: (n,) or null; mean (null for RMSNorm), rstd: (rows,).
template <typename T, typename acc_t, int VEC>
__global__ void norm_fwd_kernel(const T* __restrict__ x, const T* __restrict__ w,
                                const T* __restrict__ b, T* __restrict__ y,
                                acc_t* __restrict__ mean, acc_t* __restrict__ rstd, int64_t rows,
                                int64_t n, acc_t eps, bool rms) {
  __shared__ Moments<acc_t> smem_m[kWarp];
  __shared__ GradSums<acc_t> smem_s[kWarp];
  const int64_t step = static_cast<int64_t>(blockDim.x) * VEC;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; row < rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const T* xr = x + row * n;
    T* yr = y + row * n;
    acc_t mu = 0, rs;
    if (rms) {
      GradSums<acc_t> ss{0, 0};  // .g holds sum(x^2)
      for (int64_t i = threadIdx.x * VEC; i < n; i += step) {
        acc_t v[VEC];
        load_vec<T, acc_t, VEC>(xr + i, v);
#pragma unroll
        for (int k = 0; k < VEC; ++k) ss.g += v[k] * v[k];
      }
      ss = row_allreduce(ss, smem_s);
      rs = rsqrt_acc(ss.g / static_cast<acc_t>(n) + eps);
    } else {
      Moments<acc_t> m{0, 0, 0};
      for (int64_t i = threadIdx.x * VEC; i < n; i += step) {
        acc_t v[VEC];
        load_vec<T, acc_t, VEC>(xr + i, v);
        m = moments_merge(m, moments_of(v, VEC));
      }
      m = row_allreduce(m, smem_m);
      mu = m.mean;
      rs = rsqrt_acc(m.m2 / static_cast<acc_t>(n) + eps);
    }
    if (threadIdx.x == 0) {
      if (mean != nullptr) mean[row] = mu;
      rstd[row] = rs;
    }
    for (int64_t i = threadIdx.x * VEC; i < n; i += step) {
      acc_t v[VEC], wv[VEC], bv[VEC], out[VEC];
      load_vec<T, acc_t, VEC>(xr + i, v);
      load_vec_or<T, acc_t, VEC>(w ? w + i : nullptr, acc_t(1), wv);
      load_vec_or<T, acc_t, VEC>(b ? b + i : nullptr, acc_t(0), bv);
#pragma unroll
      for (int k = 0; k < VEC; ++k) out[k] = norm_apply(v[k], mu, rs, wv[k], bv[k]);
      store_vec<T, acc_t, VEC>(yr + i, out);
    }
  }
}

// ---- backward: dx -------------------------------------------------------------------------

template <typename T, typename acc_t, int VEC>
__global__ void norm_bwd_dx_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                   const T* __restrict__ w, const acc_t* __restrict__ mean,
                                   const acc_t* __restrict__ rstd, T* __restrict__ dx,
                                   int64_t rows, int64_t n, bool rms) {
  __shared__ GradSums<acc_t> smem[kWarp];
  const int64_t step = static_cast<int64_t>(blockDim.x) * VEC;
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(n);
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; row < rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const T* dyr = dy + row * n;
    const T* xr = x + row * n;
    const acc_t mu = mean != nullptr ? mean[row] : acc_t(0);
    const acc_t rs = rstd[row];
    GradSums<acc_t> s{0, 0};
    for (int64_t i = threadIdx.x * VEC; i < n; i += step) {
      acc_t d[VEC], v[VEC], wv[VEC];
      load_vec<T, acc_t, VEC>(dyr + i, d);
      load_vec<T, acc_t, VEC>(xr + i, v);
      load_vec_or<T, acc_t, VEC>(w ? w + i : nullptr, acc_t(1), wv);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const acc_t g = d[k] * wv[k];
        s = grad_sums_merge(s, GradSums<acc_t>{g, g * ((v[k] - mu) * rs)});
      }
    }
    s = row_allreduce(s, smem);
    const acc_t mean_g = rms ? acc_t(0) : s.g * inv_n;
    const acc_t mean_gx = s.gx * inv_n;
    for (int64_t i = threadIdx.x * VEC; i < n; i += step) {
      acc_t d[VEC], v[VEC], wv[VEC], out[VEC];
      load_vec<T, acc_t, VEC>(dyr + i, d);
      load_vec<T, acc_t, VEC>(xr + i, v);
      load_vec_or<T, acc_t, VEC>(w ? w + i : nullptr, acc_t(1), wv);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        out[k] = norm_dx(d[k] * wv[k], (v[k] - mu) * rs, rs, mean_g, mean_gx);
      }
      store_vec<T, acc_t, VEC>(dx + row * n + i, out);
    }
  }
}

// ---- backward: dweight / dbias ------------------------------------------------------------

constexpr int kColTile = 32;   // column vectors per block (threadIdx.x): kColTile * VEC columns
constexpr int kRowLanes = 8;   // rows walked in parallel per block (threadIdx.y)
constexpr int64_t kRowsPerSplit = 128;
constexpr int64_t kMaxSplits = 256;

// partial_w / partial_b: (splits, n) fp32 (fp64); block (kColTile, kRowLanes), grid
// (ceil(n / (kColTile * VEC)), splits). Each thread owns VEC adjacent columns and reads them
// with one 16-byte load per row and tensor when VEC > 1 (as the dx kernel: n % VEC == 0 and
// 16-byte aligned pointers, so a vector is wholly inside the row); lane y sums rows
// begin + y, begin + y + kRowLanes, ... in order, then the lanes are added 0..kRowLanes-1.
template <typename T, typename acc_t, int VEC>
__global__ void norm_bwd_partial_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                        const acc_t* __restrict__ mean,
                                        const acc_t* __restrict__ rstd, acc_t* __restrict__ partial_w,
                                        acc_t* __restrict__ partial_b, int64_t rows, int64_t n,
                                        int64_t rows_per_split) {
  // [lane][element of the vector][column vector]: bank-conflict-free stores and loads.
  __shared__ acc_t sw[kRowLanes][VEC][kColTile + 1];
  __shared__ acc_t sb[kRowLanes][VEC][kColTile + 1];
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * kColTile + threadIdx.x) * VEC;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t end = begin + rows_per_split < rows ? begin + rows_per_split : rows;
  acc_t aw[VEC], ab[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) aw[k] = ab[k] = acc_t(0);
  if (col < n) {
    for (int64_t r = begin + threadIdx.y; r < end; r += kRowLanes) {
      acc_t d[VEC], v[VEC];
      load_vec<T, acc_t, VEC>(dy + r * n + col, d);
      load_vec<T, acc_t, VEC>(x + r * n + col, v);
      const acc_t mu = mean != nullptr ? mean[r] : acc_t(0);
      const acc_t rs = rstd[r];
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        aw[k] += d[k] * ((v[k] - mu) * rs);
        ab[k] += d[k];
      }
    }
  }
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    sw[threadIdx.y][k][threadIdx.x] = aw[k];
    sb[threadIdx.y][k][threadIdx.x] = ab[k];
  }
  __syncthreads();
  // Thread (x, y) finishes element k = y (y + kRowLanes, ...) of column vector x.
  if (col < n) {
    for (int k = threadIdx.y; k < VEC; k += kRowLanes) {
      acc_t tw = 0, tb = 0;
#pragma unroll
      for (int j = 0; j < kRowLanes; ++j) {
        tw += sw[j][k][threadIdx.x];
        tb += sb[j][k][threadIdx.x];
      }
      const int64_t at = static_cast<int64_t>(blockIdx.y) * n + col + k;
      if (partial_w != nullptr) partial_w[at] = tw;
      if (partial_b != nullptr) partial_b[at] = tb;
    }
  }
}

constexpr int kSumLanes = 8;  // split rows summed in parallel per column (threadIdx.y)

// dw[col] / db[col] = sum over splits of partial_w / partial_b[split, col], cast to T; either
// pair may be null (one launch serves both). Block (kWarp columns, kSumLanes lanes): lane j
// adds splits j, j + kSumLanes, ... in order, then lane 0 adds the lanes 0..kSumLanes-1 in
// order: a fixed order, so deterministic. (Before: one thread per column walked all splits,
// up to 256 loads feeding one chain of adds, on only n / 256 blocks: latency-bound.)
template <typename T, typename acc_t>
__global__ void sum_partials_kernel(const acc_t* __restrict__ partial_w,
                                    const acc_t* __restrict__ partial_b, T* __restrict__ dw,
                                    T* __restrict__ db, int64_t splits, int64_t n) {
  __shared__ acc_t sw[kSumLanes][kWarp + 1];
  __shared__ acc_t sb[kSumLanes][kWarp + 1];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kWarp + threadIdx.x;
  acc_t tw = 0, tb = 0;
  if (col < n) {
    for (int64_t k = threadIdx.y; k < splits; k += kSumLanes) {
      if (partial_w != nullptr) tw += partial_w[k * n + col];
      if (partial_b != nullptr) tb += partial_b[k * n + col];
    }
  }
  sw[threadIdx.y][threadIdx.x] = tw;
  sb[threadIdx.y][threadIdx.x] = tb;
  __syncthreads();
  if (threadIdx.y == 0 && col < n) {
    acc_t w = 0, b = 0;
#pragma unroll
    for (int j = 0; j < kSumLanes; ++j) {
      w += sw[j][threadIdx.x];
      b += sb[j][threadIdx.x];
    }
    if (dw != nullptr) dw[col] = static_cast<T>(w);
    if (db != nullptr) db[col] = static_cast<T>(b);
  }
}

// ---- register path ------------------------------------------------------------------------

constexpr int kMaxThreads = 1024;
constexpr int kRegFwdMaxVec = 2048;  // forward: up to 2048 vectors per row (VPT 4 x 512 threads)
constexpr int kFwdBlockThreads = 256;  // forward blocks: RPB rows of TPR threads, ~256 threads

// VEC values at p, or zeros when !ok (the address is not touched then).
template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> load_or_zero(const T* p, bool ok) {
  Vec<T, VEC> r;
  if (ok) {
    r = *reinterpret_cast<const Vec<T, VEC>*>(p);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) r.v[k] = static_cast<T>(0.0f);
  }
  return r;
}

// Sums v[0..NV) over the blockDim.x threads of this thread's row (row lane threadIdx.y) and
// returns the totals to all of them, bitwise equal in every thread. Every thread of the block
// must call it (uniform control flow): with more than one warp per row it synchronizes the
// block. `red` is one of two alternating [32][NV] shared buffers (the caller flips between
// them on each call, so one __syncthreads per call suffices: a buffer is rewritten only after
// the barrier of the next call, which every thread reaches after reading it).
template <int NV, typename acc_t>
__device__ __forceinline__ void lane_allreduce(acc_t (&v)[NV], acc_t (*red)[NV]) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
#pragma unroll
    for (int k = 0; k < NV; ++k) v[k] += __shfl_xor_sync(kFullMask, v[k], offset);
  }
  const int warps = blockDim.x / kWarp;
  if (warps == 1) return;
  const int base = threadIdx.y * warps;  // rpb * warps <= 32
  if (threadIdx.x % kWarp == 0) {
#pragma unroll
    for (int k = 0; k < NV; ++k) red[base + threadIdx.x / kWarp][k] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < NV; ++k) v[k] = red[base][k];
  for (int j = 1; j < warps; ++j) {
#pragma unroll
    for (int k = 0; k < NV; ++k) v[k] += red[base + j][k];
  }
}

// x, y: (rows, n) with n % VEC == 0 and 16-byte aligned rows; w, b: (n,) or null; mean (null
// for RMSNorm), rstd: (rows,). Block (TPR, RPB); thread (t, l) normalizes rows
// blockIdx.x * RPB + l, + gridDim.x * RPB, ...; it holds vectors t + v * TPR (v < VPT).
template <typename T, typename acc_t, int VPT>
__global__ void __launch_bounds__(kMaxThreads)
    norm_fwd_reg_kernel(const T* __restrict__ x, const T* __restrict__ w,
                        const T* __restrict__ b, T* __restrict__ y, acc_t* __restrict__ mean,
                        acc_t* __restrict__ rstd, int64_t rows, int64_t n, acc_t eps, bool rms) {
  constexpr int VEC = 16 / sizeof(T);
  __shared__ acc_t red[2][kWarp][1];
  const int64_t nvec = n / VEC;
  const int64_t tpr = blockDim.x;
  const acc_t count = static_cast<acc_t>(n);
  int phase = 0;
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.y; first < rows;
       first += static_cast<int64_t>(gridDim.x) * blockDim.y) {  // block-uniform trip count
    const int64_t row = first + threadIdx.y;
    const bool row_ok = row < rows;
    const T* xr = x + (row_ok ? row : 0) * n;
    Vec<T, VEC> xv[VPT];
#pragma unroll
    for (int v = 0; v < VPT; ++v) {
      const int64_t j = threadIdx.x + v * tpr;
      xv[v] = load_or_zero<T, VEC>(xr + j * VEC, row_ok && j < nvec);
    }
    acc_t mu = 0;
    if (!rms) {
      acc_t s[1] = {0};
#pragma unroll
      for (int v = 0; v < VPT; ++v) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) s[0] += static_cast<acc_t>(xv[v].v[k]);  // zeros if masked
      }
      lane_allreduce<1>(s, red[phase]);
      phase ^= 1;
      mu = s[0] / count;
    }
    acc_t q[1] = {0};  // sum of squared deviations (RMSNorm: of squares)
#pragma unroll
    for (int v = 0; v < VPT; ++v) {
      if (threadIdx.x + v * tpr < nvec) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const acc_t d = static_cast<acc_t>(xv[v].v[k]) - mu;
          q[0] += d * d;
        }
      }
    }
    lane_allreduce<1>(q, red[phase]);
    phase ^= 1;
    const acc_t rs = rsqrt_acc(q[0] / count + eps);
    if (!row_ok) continue;  // (after the last reduction: no barrier follows in this iteration)
    if (threadIdx.x == 0) {
      if (mean != nullptr) mean[row] = mu;
      rstd[row] = rs;
    }
    T* yr = y + row * n;
#pragma unroll
    for (int v = 0; v < VPT; ++v) {
      const int64_t j = threadIdx.x + v * tpr;
      if (j < nvec) {
        acc_t wv[VEC], bv[VEC], out[VEC];
        load_vec_or<T, acc_t, VEC>(w ? w + j * VEC : nullptr, acc_t(1), wv);
        load_vec_or<T, acc_t, VEC>(b ? b + j * VEC : nullptr, acc_t(0), bv);
#pragma unroll
        for (int k = 0; k < VEC; ++k)
          out[k] = norm_apply(static_cast<acc_t>(xv[v].v[k]), mu, rs, wv[k], bv[k]);
        store_vec<T, acc_t, VEC>(yr + j * VEC, out);
      }
    }
  }
}

constexpr int kBwdThreads = 512;  // backward blocks: RPB rows of TPR threads

// One row's inputs of the backward for one thread: its VPT dy and x vectors, the statistics.
template <typename T, typename acc_t, int VPT>
struct BwdRow {
  Vec<T, 16 / sizeof(T)> d[VPT], x[VPT];
  acc_t mu, rs;
};

// Vector v of this thread is at element offset at + v * vstride of the row (vstride = TPR *
// VEC); vector v exists when v < live (the row's vectors this thread owns).
template <typename T, typename acc_t, int VPT>
__device__ __forceinline__ BwdRow<T, acc_t, VPT> load_bwd_row(const T* dy, const T* x,
                                                              const acc_t* mean,
                                                              const acc_t* rstd, int64_t row,
                                                              bool row_ok, int64_t at,
                                                              int64_t vstride, int live) {
  constexpr int VEC = 16 / sizeof(T);
  BwdRow<T, acc_t, VPT> r;
#pragma unroll
  for (int v = 0; v < VPT; ++v) {
    const bool ok = row_ok && v < live;
    const int64_t o = ok ? at + v * vstride : 0;
    r.d[v] = load_or_zero<T, VEC>(dy + o, ok);
    r.x[v] = load_or_zero<T, VEC>(x + o, ok);
  }
  r.mu = row_ok && mean != nullptr ? mean[row] : acc_t(0);
  r.rs = row_ok ? rstd[row] : acc_t(0);
  return r;
}

// dx of the rows, and partial_w / partial_b[chunk, col] = sum over the chunk's rows of
// dy * xhat / dy (HAS_W / HAS_B; partial_* (chunks, n) fp32, fp64 for fp64). Block (TPR, RPB)
// with TPR * VPT * VEC >= n: thread t owns the vectors t + v * TPR (v < VPT) of every row.
// Block c handles chunks c, c + gridDim.x, ...; chunk c is rows [c * rows_per_chunk,
// min(rows, (c + 1) * rows_per_chunk)). Dynamic shared memory: VPT * TPR weight vectors when
// HAS_W, then RPB * VEC * TPR acc_t when RPB > 1 (the lanes' partials of one vector slot at a
// time, added in lane order).
template <typename T, typename acc_t, int VPT, int AHEAD, bool HAS_W, bool HAS_B>
__global__ void __launch_bounds__(kBwdThreads)
    norm_bwd_reg_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                        const T* __restrict__ w, const acc_t* __restrict__ mean,
                        const acc_t* __restrict__ rstd, T* __restrict__ dx,
                        acc_t* __restrict__ partial_w, acc_t* __restrict__ partial_b,
                        int64_t rows, int64_t n, int64_t rows_per_chunk, int64_t chunks,
                        bool rms) {
  constexpr int VEC = 16 / sizeof(T);
  // AHEAD: rows loaded ahead of the one being reduced. Two keep 2 x 512 threads x 64 bytes =
  // 64 KB of dy / x loads in flight per SM (bf16, N = 4096: one block of 512 threads per SM).
  // With both dweight and dbias partials (twice the partial registers) two spill 24 bytes per
  // thread for bf16 (ptxas 13.0): the host takes one there unless TURBOLM_NORM_BWD_AHEAD=2.
  constexpr int kAhead = AHEAD;
  static_assert(AHEAD == 1 || AHEAD == 2, "rows loaded ahead: 1 or 2");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ acc_t red[2][kWarp][2];
  const int tpr = blockDim.x, rpb = blockDim.y;
  // Dynamic shared memory: the weights, [v][t] vectors (read once per row: in registers they
  // would cost VPT * 16 bytes per thread for the whole kernel), then the partial stage.
  Vec<T, VEC>* wsm = reinterpret_cast<Vec<T, VEC>*>(smem_raw);
  acc_t* stage = reinterpret_cast<acc_t*>(smem_raw + (HAS_W ? sizeof(Vec<T, VEC>) * VPT * tpr : 0));
  const int64_t nvec = n / VEC;
  const int64_t col = static_cast<int64_t>(threadIdx.x) * VEC;  // of vector 0
  const int64_t vstride = static_cast<int64_t>(tpr) * VEC;
  // Vectors of the row this thread owns: t, t + TPR, ... below nvec.
  const int64_t owned = threadIdx.x < nvec ? (nvec - threadIdx.x + tpr - 1) / tpr : 0;
  const int live = owned < VPT ? static_cast<int>(owned) : VPT;
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(n);
  if (HAS_W) {
    if (threadIdx.y == 0) {
#pragma unroll
      for (int v = 0; v < VPT; ++v)
        wsm[v * tpr + threadIdx.x] =
            load_or_zero<T, VEC>(v < live ? w + col + v * vstride : nullptr, v < live);
    }
    __syncthreads();
  }
  int phase = 0;
  for (int64_t chunk = blockIdx.x; chunk < chunks; chunk += gridDim.x) {  // block-uniform
    const int64_t begin = chunk * rows_per_chunk;
    const int64_t end = begin + rows_per_chunk < rows ? begin + rows_per_chunk : rows;
    const int64_t iters = (end - begin + rpb - 1) / rpb;
    acc_t pw[VPT][VEC], pb[VPT][VEC];
#pragma unroll
    for (int v = 0; v < VPT; ++v) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) pw[v][k] = pb[v][k] = acc_t(0);
    }
    int64_t row = begin + threadIdx.y;
    int64_t at = row * n + col;  // this thread's first element of `row`
    const int64_t step = static_cast<int64_t>(rpb) * n;
    BwdRow<T, acc_t, VPT> cur =
        load_bwd_row<T, acc_t, VPT>(dy, x, mean, rstd, row, row < end, at, vstride, live);
    BwdRow<T, acc_t, VPT> ahead1;
    if constexpr (kAhead == 2)
      ahead1 = load_bwd_row<T, acc_t, VPT>(dy, x, mean, rstd, row + rpb, row + rpb < end,
                                           at + step, vstride, live);
    for (int64_t it = 0; it < iters; ++it, row += rpb, at += step) {
      const int64_t next = row + kAhead * rpb;
      const BwdRow<T, acc_t, VPT> ahead = load_bwd_row<T, acc_t, VPT>(
          dy, x, mean, rstd, next, next < end, at + kAhead * step, vstride, live);
      // d, xhat and g are recomputed from the raw vectors after the reduction rather than
      // kept live across it (registers).
      Vec<T, VEC> wr[VPT];
      if (HAS_W) {
#pragma unroll
        for (int v = 0; v < VPT; ++v) wr[v] = wsm[v * tpr + threadIdx.x];
      }
      acc_t s[2] = {0, 0};  // sum(g), sum(g * xhat) over the row
#pragma unroll
      for (int v = 0; v < VPT; ++v) {
        if (v < live) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            const acc_t d = static_cast<acc_t>(cur.d[v].v[k]);
            const acc_t xh = (static_cast<acc_t>(cur.x[v].v[k]) - cur.mu) * cur.rs;
            const acc_t g = HAS_W ? d * static_cast<acc_t>(wr[v].v[k]) : d;
            s[0] += g;
            s[1] += g * xh;
          }
        }
      }
      lane_allreduce<2>(s, red[phase]);
      phase ^= 1;
      if (row < end) {
        const acc_t mean_g = rms ? acc_t(0) : s[0] * inv_n;
        const acc_t mean_gx = s[1] * inv_n;
#pragma unroll
        for (int v = 0; v < VPT; ++v) {
          if (v < live) {
            acc_t out[VEC];
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
              const acc_t d = static_cast<acc_t>(cur.d[v].v[k]);
              const acc_t xh = (static_cast<acc_t>(cur.x[v].v[k]) - cur.mu) * cur.rs;
              const acc_t g = HAS_W ? d * static_cast<acc_t>(wr[v].v[k]) : d;
              out[k] = norm_dx(g, xh, cur.rs, mean_g, mean_gx);
              if (HAS_W) pw[v][k] += d * xh;
              if (HAS_B) pb[v][k] += d;
            }
            store_vec<T, acc_t, VEC>(dx + at + v * vstride, out);
          }
        }
      }
      if constexpr (kAhead == 2) {
        cur = ahead1;
        ahead1 = ahead;
      } else {
        cur = ahead;
      }
    }
    // This chunk's partials: lane 0 + lane 1 + ... (in order), one row of partial per chunk.
#pragma unroll
    for (int part = 0; part < 2; ++part) {
      if (part == 0 ? !HAS_W : !HAS_B) continue;
      acc_t(*p)[VEC] = part == 0 ? pw : pb;
      acc_t* out = (part == 0 ? partial_w : partial_b) + chunk * n + col;
      if (rpb == 1) {
#pragma unroll
        for (int v = 0; v < VPT; ++v) {
          if (v < live) {
#pragma unroll
            for (int k = 0; k < VEC; ++k) out[v * vstride + k] = p[v][k];
          }
        }
        continue;
      }
      // One vector slot at a time: stage[lane][k][t] (consecutive threads, consecutive words).
#pragma unroll
      for (int v = 0; v < VPT; ++v) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) stage[(threadIdx.y * VEC + k) * tpr + threadIdx.x] = p[v][k];
        __syncthreads();
        // Thread (t, l) finishes elements k = l, l + RPB, ... of its vector v.
        if (v < live) {
          for (int k = threadIdx.y; k < VEC; k += rpb) {
            acc_t total = 0;
            for (int l = 0; l < rpb; ++l) total += stage[(l * VEC + k) * tpr + threadIdx.x];
            out[v * vstride + k] = total;
          }
        }
        __syncthreads();  // stage is rewritten next
      }
    }
  }
}

// ---- launch helpers -----------------------------------------------------------------------

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

constexpr int kMaxDevices = 64;

// Number of SMs of `device`, queried once per device.
int sm_count(int device) {
  static std::atomic<int> cache[kMaxDevices];  // static storage: zero-initialized
  const bool cached = device >= 0 && device < kMaxDevices;
  if (cached) {
    const int v = cache[device].load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  sms = std::max(sms, 1);
  if (cached) cache[device].store(sms, std::memory_order_relaxed);
  return sms;
}

// Blocks of `kernel` resident per SM with `threads` threads and `smem` bytes of dynamic shared
// memory on the current device (`device`), queried once per (device, kernel, threads, smem).
int blocks_per_sm(const void* kernel, int threads, size_t smem, int device) {
  struct Entry {
    const void* kernel;
    int threads;
    size_t smem;
    int device;
    int blocks;
  };
  static std::mutex mutex;
  static std::vector<Entry> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  for (const Entry& e : cache)
    if (e.kernel == kernel && e.threads == threads && e.smem == smem && e.device == device)
      return e.blocks;
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem));
  blocks = std::max(blocks, 1);
  cache.push_back({kernel, threads, smem, device, blocks});
  return blocks;
}

struct RowLaunch {
  dim3 grid, block;
};

// Thread layout of the generic row kernels for rows of n elements read VEC at a time.
RowLaunch row_launch(int64_t rows, int64_t n, int vec, int device) {
  const int64_t max_blocks = static_cast<int64_t>(sm_count(device)) * 32;
  if (n <= kWarpRowMaxN) {
    const int64_t blocks = (rows + kRowsPerWarpBlock - 1) / kRowsPerWarpBlock;
    return {dim3(static_cast<unsigned>(std::max<int64_t>(1, std::min(blocks, max_blocks)))),
            dim3(kWarp, kRowsPerWarpBlock)};
  }
  const int64_t vectors = (n + vec - 1) / vec;
  int threads = 128;
  while (threads < 1024 && vectors >= static_cast<int64_t>(threads) * 8) threads *= 2;
  return {dim3(static_cast<unsigned>(std::max<int64_t>(1, std::min(rows, max_blocks)))),
          dim3(threads, 1)};
}

// VEC for 16-byte accesses when every pointer allows it, else 1.
template <typename T>
int pick_vec(int64_t n, std::initializer_list<const void*> ptrs) {
  constexpr int vec = 16 / sizeof(T);
  if (n % vec != 0) return 1;
  for (const void* p : ptrs)
    if (p != nullptr && !aligned16(p)) return 1;
  return vec;
}

int round_up_warp(int64_t v) { return static_cast<int>((v + kWarp - 1) / kWarp * kWarp); }

// Benchmark knobs, read once per process (results do not depend on them beyond rounding):
//   TURBOLM_NORM_REG=1          the register path where it applies (default 0 = the generic
//                               path only, until an H200 run has passed the gpu tests with the
//                               register path: it was written in a session without a GPU);
//   TURBOLM_NORM_FWD_VPT=1|2|4  forward vectors per thread, where the row then fits in 512
//                               threads (default: by N, see fwd_plan);
//   TURBOLM_NORM_BWD_VPT=1|2    the same for the backward (where it fits in kBwdThreads);
//   TURBOLM_NORM_BWD_AHEAD=1|2  rows the backward loads ahead when it computes both dweight
//                               and dbias (default 1, see norm_bwd_reg_kernel; otherwise 2).
struct Tuning {
  bool reg = false;
  int fwd_vpt = 0, bwd_vpt = 0, ln_ahead = 1;
};

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::atoi(v) : fallback;
}

const Tuning& tuning() {
  static const Tuning t = [] {
    Tuning r;
    r.reg = env_int("TURBOLM_NORM_REG", 0) != 0;
    const int f = env_int("TURBOLM_NORM_FWD_VPT", 0), b = env_int("TURBOLM_NORM_BWD_VPT", 0);
    r.fwd_vpt = f == 1 || f == 2 || f == 4 ? f : 0;
    r.bwd_vpt = b == 1 || b == 2 ? b : 0;
    r.ln_ahead = env_int("TURBOLM_NORM_BWD_AHEAD", 1) == 2 ? 2 : 1;
    return r;
  }();
  return t;
}

// Which path each launch took, process-wide (torch.ops.turbolm.norm_cuda_stats(), in this
// order; norm_kernels.cuda_stats() names them): lets the GPU tests check that the register
// path really ran where it should (and only when TURBOLM_NORM_REG=1).
enum PathStat : int { kFwdRegister, kFwdGeneric, kBwdRegister, kBwdGeneric, kNumPathStats };

std::atomic<int64_t>* path_stats() {
  static std::atomic<int64_t> counters[kNumPathStats] = {};
  return counters;
}

void count(PathStat s) { path_stats()[s].fetch_add(1, std::memory_order_relaxed); }

std::vector<int64_t> cuda_stats() {
  std::vector<int64_t> out(kNumPathStats);
  for (int i = 0; i < kNumPathStats; ++i) out[i] = path_stats()[i].load(std::memory_order_relaxed);
  return out;
}

// Register path layouts (vpt == 0: the row is too long, use the generic path).
struct RegPlan {
  int vpt = 0, tpr = 0, rpb = 0;
};

// Forward: VPT vectors per thread (1 up to 64 vectors, 2 up to 256, 4 up to kRegFwdMaxVec:
// N = 16384 bf16), TPR <= 512 threads per row, about kFwdBlockThreads threads per block. Four
// vectors per thread keep 64 bytes of loads in flight per thread (N = 4096 bf16: 128 threads
// per row, 2 rows per block, 4 blocks of 64 registers per SM: 64 KB in flight per SM).
RegPlan fwd_plan(int64_t nvec) {
  int vpt = nvec <= 64 ? 1 : nvec <= 256 ? 2 : nvec <= kRegFwdMaxVec ? 4 : 0;
  const Tuning& tune = tuning();
  if (!tune.reg) return {};
  if (tune.fwd_vpt != 0 && vpt != 0 && (nvec + tune.fwd_vpt - 1) / tune.fwd_vpt <= 512)
    vpt = tune.fwd_vpt;
  if (vpt == 0) return {};
  const int tpr = round_up_warp((nvec + vpt - 1) / vpt);
  return {vpt, tpr, std::max(1, kFwdBlockThreads / tpr)};
}

// Backward: VPT = 1 (up to 64 vectors) or 2 vectors per thread, whose columns are the same
// for all rows (the weight-gradient partials stay in registers), TPR <= kBwdThreads threads per
// row: up to 2 * kBwdThreads vectors (N = 8192 bf16, 4096 fp32); kBwdThreads-thread blocks.
RegPlan bwd_plan(int64_t nvec) {
  const Tuning& tune = tuning();
  if (!tune.reg || nvec > 2 * kBwdThreads) return {};
  int vpt = nvec <= 64 ? 1 : 2;
  if (tune.bwd_vpt != 0 && (nvec + tune.bwd_vpt - 1) / tune.bwd_vpt <= kBwdThreads)
    vpt = tune.bwd_vpt;
  const int tpr = round_up_warp((nvec + vpt - 1) / vpt);
  return {vpt, tpr, std::max(1, kBwdThreads / tpr)};
}

template <typename T, typename acc_t>
void launch_fwd(const T* x, const T* w, const T* b, T* y, acc_t* mean, acc_t* rstd, int64_t rows,
                int64_t n, acc_t eps, bool rms, int device, cudaStream_t stream) {
  if (rows == 0) return;
  constexpr int kVec = 16 / sizeof(T);
  const int vec = pick_vec<T>(n, {x, w, b, y});
  const RegPlan plan = vec == kVec ? fwd_plan(n / kVec) : RegPlan{};
  if (plan.vpt != 0) {
    using Kernel = void (*)(const T*, const T*, const T*, T*, acc_t*, acc_t*, int64_t, int64_t,
                            acc_t, bool);
    const Kernel kernel = plan.vpt == 1   ? Kernel(&norm_fwd_reg_kernel<T, acc_t, 1>)
                          : plan.vpt == 2 ? Kernel(&norm_fwd_reg_kernel<T, acc_t, 2>)
                                          : Kernel(&norm_fwd_reg_kernel<T, acc_t, 4>);
    const int threads = plan.tpr * plan.rpb;
    const int64_t capacity = static_cast<int64_t>(sm_count(device)) *
                             blocks_per_sm(reinterpret_cast<const void*>(kernel), threads, 0, device);
    const int64_t groups = (rows + plan.rpb - 1) / plan.rpb;
    const dim3 grid(static_cast<unsigned>(std::min(groups, capacity)));
    kernel<<<grid, dim3(plan.tpr, plan.rpb), 0, stream>>>(x, w, b, y, mean, rstd, rows, n, eps,
                                                          rms);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    count(kFwdRegister);
    return;
  }
  count(kFwdGeneric);
  const RowLaunch l = row_launch(rows, n, vec, device);
  if (vec == kVec) {
    norm_fwd_kernel<T, acc_t, kVec>
        <<<l.grid, l.block, 0, stream>>>(x, w, b, y, mean, rstd, rows, n, eps, rms);
  } else {
    norm_fwd_kernel<T, acc_t, 1>
        <<<l.grid, l.block, 0, stream>>>(x, w, b, y, mean, rstd, rows, n, eps, rms);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The backward's two shapes: the register path (dx and the partials in one kernel) or the
// generic path (a dx kernel and a partial-sum kernel). `chunks` rows of partials either way.
struct BwdPlan {
  int vec = 1;
  RegPlan reg;             // reg.vpt != 0: register path
  const void* kernel = nullptr;
  size_t smem = 0;
  int64_t chunks = 1, rows_per_chunk = 1;
};

template <typename T, typename acc_t>
using BwdRegKernel = void (*)(const T*, const T*, const T*, const acc_t*, const acc_t*, T*,
                              acc_t*, acc_t*, int64_t, int64_t, int64_t, int64_t, bool);

template <typename T, typename acc_t, int VPT>
BwdRegKernel<T, acc_t> bwd_reg_kernel(bool has_w, bool has_b) {
  using K = BwdRegKernel<T, acc_t>;
  if (has_w && has_b)
    return tuning().ln_ahead == 2 ? K(&norm_bwd_reg_kernel<T, acc_t, VPT, 2, true, true>)
                                  : K(&norm_bwd_reg_kernel<T, acc_t, VPT, 1, true, true>);
  return has_w ? K(&norm_bwd_reg_kernel<T, acc_t, VPT, 2, true, false>)
               : (has_b ? K(&norm_bwd_reg_kernel<T, acc_t, VPT, 2, false, true>)
                        : K(&norm_bwd_reg_kernel<T, acc_t, VPT, 2, false, false>));
}

template <typename T, typename acc_t>
BwdPlan plan_bwd(const T* dy, const T* x, const T* w, const T* dx, bool has_b, int64_t rows,
                 int64_t n, int device) {
  constexpr int kVec = 16 / sizeof(T);
  BwdPlan p;
  p.vec = pick_vec<T>(n, {dy, x, w, dx});
  if (rows > 0 && p.vec == kVec) p.reg = bwd_plan(n / kVec);
  if (p.reg.vpt != 0) {
    p.kernel = reinterpret_cast<const void*>(
        p.reg.vpt == 1 ? bwd_reg_kernel<T, acc_t, 1>(w != nullptr, has_b)
                       : bwd_reg_kernel<T, acc_t, 2>(w != nullptr, has_b));
    const bool partials = w != nullptr || has_b;
    // The weights (16 bytes per vector), then the partial stage (RPB x VEC x TPR acc_t).
    p.smem = (w != nullptr ? size_t(16) * p.reg.vpt * p.reg.tpr : 0) +
             (partials && p.reg.rpb > 1 ? sizeof(acc_t) * p.reg.rpb * kVec * p.reg.tpr : 0);
    const int64_t capacity = static_cast<int64_t>(sm_count(device)) *
                             blocks_per_sm(p.kernel, p.reg.tpr * p.reg.rpb, p.smem, device);
    const int64_t most = std::max<int64_t>(
        1, std::min<int64_t>(capacity, (rows + p.reg.rpb - 1) / p.reg.rpb));
    p.rows_per_chunk = (rows + most - 1) / most;
    p.chunks = (rows + p.rows_per_chunk - 1) / p.rows_per_chunk;
    return p;
  }
  // Generic path: row splits of the partial-sum kernel, a function of rows only.
  p.chunks =
      std::max<int64_t>(1, std::min(kMaxSplits, (rows + kRowsPerSplit - 1) / kRowsPerSplit));
  p.rows_per_chunk = std::max<int64_t>(1, (rows + p.chunks - 1) / p.chunks);
  return p;
}

template <typename T, typename acc_t>
void launch_bwd(const BwdPlan& plan, const T* dy, const T* x, const T* w, const acc_t* mean,
                const acc_t* rstd, T* dx, T* dw, T* db, acc_t* partial_w, acc_t* partial_b,
                int64_t rows, int64_t n, bool rms, int device, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const int vec = plan.vec;
  if (plan.reg.vpt != 0) {
    const auto kernel = reinterpret_cast<BwdRegKernel<T, acc_t>>(plan.kernel);
    kernel<<<static_cast<unsigned>(plan.chunks), dim3(plan.reg.tpr, plan.reg.rpb), plan.smem,
             stream>>>(dy, x, w, mean, rstd, dx, dw ? partial_w : nullptr,
                       db ? partial_b : nullptr, rows, n, plan.rows_per_chunk, plan.chunks, rms);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    count(kBwdRegister);
  } else {
    count(kBwdGeneric);
    if (rows > 0) {
      const RowLaunch l = row_launch(rows, n, vec, device);
      if (vec == kVec) {
        norm_bwd_dx_kernel<T, acc_t, kVec>
            <<<l.grid, l.block, 0, stream>>>(dy, x, w, mean, rstd, dx, rows, n, rms);
      } else {
        norm_bwd_dx_kernel<T, acc_t, 1>
            <<<l.grid, l.block, 0, stream>>>(dy, x, w, mean, rstd, dx, rows, n, rms);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (dw == nullptr && db == nullptr) return;
    const int64_t tile = static_cast<int64_t>(kColTile) * (vec == kVec ? kVec : 1);
    const dim3 grid(static_cast<unsigned>((n + tile - 1) / tile),
                    static_cast<unsigned>(plan.chunks));
    if (vec == kVec) {
      norm_bwd_partial_kernel<T, acc_t, kVec><<<grid, dim3(kColTile, kRowLanes), 0, stream>>>(
          dy, x, mean, rstd, partial_w, partial_b, rows, n, plan.rows_per_chunk);
    } else {
      norm_bwd_partial_kernel<T, acc_t, 1><<<grid, dim3(kColTile, kRowLanes), 0, stream>>>(
          dy, x, mean, rstd, partial_w, partial_b, rows, n, plan.rows_per_chunk);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (dw == nullptr && db == nullptr) return;
  const unsigned col_blocks = static_cast<unsigned>((n + kWarp - 1) / kWarp);
  sum_partials_kernel<T, acc_t><<<col_blocks, dim3(kWarp, kSumLanes), 0, stream>>>(
      partial_w, partial_b, dw, db, plan.chunks, n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- ops ------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_fwd_cuda(
    const char* op, const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, bool rms) {
  check_fwd(op, x_in, weight, bias, eps);
  check_on_cuda(op, x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor w = contiguous_or_undefined(weight), b = contiguous_or_undefined(bias);
  const int64_t rows = x.size(0), n = x.size(1);
  at::Tensor y = new_output(x.sizes(), x.options());
  at::Tensor mean = rms ? at::Tensor() : new_output({rows}, x.options().dtype(stat_dtype(x)));
  at::Tensor rstd = new_output({rows}, x.options().dtype(stat_dtype(x)));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  TURBOLM_DISPATCH_FLOAT(x.scalar_type(), op, [&] {
    launch_fwd<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(w),
                                ptr_or_null<scalar_t>(b), y.mutable_data_ptr<scalar_t>(),
                                rms ? nullptr : mean.mutable_data_ptr<acc_t>(),
                                rstd.mutable_data_ptr<acc_t>(), rows, n, static_cast<acc_t>(eps),
                                rms, x.get_device(), stream);
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_bwd_cuda(
    const char* op, const at::Tensor& dy_in, const at::Tensor& x_in,
    const std::optional<at::Tensor>& weight, const at::Tensor* mean_in, const at::Tensor& rstd_in,
    bool has_bias, bool rms) {
  check_bwd(op, dy_in, x_in, weight, mean_in, rstd_in);
  check_on_cuda(op, x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor dy = dy_in.contiguous(), x = x_in.contiguous(), rstd = rstd_in.contiguous();
  const at::Tensor mean = mean_in ? mean_in->contiguous() : at::Tensor();
  const at::Tensor w = contiguous_or_undefined(weight);
  const int64_t rows = x.size(0), n = x.size(1);
  at::Tensor dx = new_output(x.sizes(), x.options());
  at::Tensor dw = new_output({weight ? n : 0}, x.options());
  at::Tensor db = new_output({has_bias ? n : 0}, x.options());
  const int device = x.get_device();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  TURBOLM_DISPATCH_FLOAT(x.scalar_type(), op, [&] {
    const scalar_t* dy_p = dy.const_data_ptr<scalar_t>();
    const scalar_t* x_p = x.const_data_ptr<scalar_t>();
    const scalar_t* w_p = ptr_or_null<scalar_t>(w);
    scalar_t* dx_p = dx.mutable_data_ptr<scalar_t>();
    const BwdPlan plan = plan_bwd<scalar_t, acc_t>(dy_p, x_p, w_p, dx_p, has_bias, rows, n, device);
    // One (parts, chunks, n) buffer holds the dweight and / or dbias partials (one allocation).
    const int64_t parts = (weight ? 1 : 0) + (has_bias ? 1 : 0);
    at::Tensor partial = parts > 0
                             ? at::empty({parts, plan.chunks, n}, x.options().dtype(stat_dtype(x)))
                             : at::Tensor();
    acc_t* partial_w = weight ? partial.mutable_data_ptr<acc_t>() : nullptr;
    acc_t* partial_b =
        has_bias ? partial.mutable_data_ptr<acc_t>() + (weight ? plan.chunks * n : 0) : nullptr;
    launch_bwd<scalar_t, acc_t>(plan, dy_p, x_p, w_p,
                                mean.defined() ? mean.const_data_ptr<acc_t>() : nullptr,
                                rstd.const_data_ptr<acc_t>(), dx_p,
                                weight ? dw.mutable_data_ptr<scalar_t>() : nullptr,
                                has_bias ? db.mutable_data_ptr<scalar_t>() : nullptr, partial_w,
                                partial_b, rows, n, rms, device, stream);
  });
  return {dx, dw, db};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps) {
  return norm_fwd_cuda("turbolm::layer_norm_fwd", x, weight, bias, eps, /*rms=*/false);
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cuda(const at::Tensor& x,
                                                     const std::optional<at::Tensor>& weight,
                                                     double eps) {
  auto [y, mean, rstd] = norm_fwd_cuda("turbolm::rms_norm_fwd", x, weight, std::nullopt, eps,
                                       /*rms=*/true);
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cuda(
    const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& rstd, bool has_bias) {
  return norm_bwd_cuda("turbolm::layer_norm_bwd", dy, x, weight, &mean, rstd, has_bias,
                       /*rms=*/false);
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cuda(const at::Tensor& dy, const at::Tensor& x,
                                                     const std::optional<at::Tensor>& weight,
                                                     const at::Tensor& rstd) {
  auto [dx, dw, db] = norm_bwd_cuda("turbolm::rms_norm_bwd", dy, x, weight, nullptr, rstd,
                                    /*has_bias=*/false, /*rms=*/true);
  return {dx, dw};
}

}  // namespace
}  // namespace turbolm::norm

// Defined here (CUDA builds only): no tensor arguments, so one catch-all kernel.
TORCH_LIBRARY_FRAGMENT(turbolm, m) {
  m.def("norm_cuda_stats() -> int[]", &turbolm::norm::cuda_stats);
}

TORCH_LIBRARY_IMPL(turbolm, CUDA, m) {
  m.impl("layer_norm_fwd", &turbolm::norm::layer_norm_fwd_cuda);
  m.impl("layer_norm_bwd", &turbolm::norm::layer_norm_bwd_cuda);
  m.impl("rms_norm_fwd", &turbolm::norm::rms_norm_fwd_cuda);
  m.impl("rms_norm_bwd", &turbolm::norm::rms_norm_bwd_cuda);
}
