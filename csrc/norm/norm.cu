// LayerNorm / RMSNorm CUDA kernels (TORCH_LIBRARY_IMPL(turbolm, CUDA)).
//
// Design
// ------
// Forward, one row per warp or per block:
//   * N <= 1024 ("warp per row"): blocks of 32 x 4 threads, each warp owns one row at a time
//     (grid-stride over rows); reductions are warp shuffles only.
//   * N > 1024 ("block per row"): blocks of 128..1024 threads own one row at a time; warp
//     shuffles, then one value per warp through shared memory.
//   Each thread walks its row in vectors of VEC elements: 16-byte loads/stores when N is a
//   multiple of VEC and every pointer is 16-byte aligned (VEC = 16 / sizeof(T)), else VEC = 1.
//   Statistics: the chunked two-pass moments of common/row_math.h (moments_of per vector,
//   moments_merge across vectors, lanes and warps in a fixed order), fp32 accumulation (fp64
//   for fp64). The second pass re-reads the row, which hits L1/L2.
// Backward:
//   * dx: same thread layout; pass 1 reduces sum(g) and sum(g * xhat), pass 2 writes
//     dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) (norm_dx of row_math.h).
//   * dweight / dbias, deterministic without atomics: a partial-sum kernel over a grid of
//     (column tiles of 32 vectors: 16-byte loads, as above) x (row splits); each block sums
//     its rows in a fixed order through shared memory into partial[split, col] (fp32); one
//     more kernel adds the splits in a fixed order (kSumLanes interleaved lanes, then the
//     lanes) for dweight and dbias together and casts to the weight dtype. The split count
//     depends only on (rows, N). This second read of dy and x could be folded into the dx
//     kernel (per-thread column partials over a contiguous range of rows): not done yet.
// Headers: ATen core / c10 only (no torch/extension.h), to keep nvcc builds short.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

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

// ---- launch helpers -----------------------------------------------------------------------

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

int sm_count(int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

struct RowLaunch {
  dim3 grid, block;
};

// Thread layout of the row kernels for rows of n elements read VEC at a time.
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

template <typename T, typename acc_t>
void launch_fwd(const T* x, const T* w, const T* b, T* y, acc_t* mean, acc_t* rstd, int64_t rows,
                int64_t n, acc_t eps, bool rms, int device, cudaStream_t stream) {
  if (rows == 0) return;
  const int vec = pick_vec<T>(n, {x, w, b, y});
  const RowLaunch l = row_launch(rows, n, vec, device);
  if (vec == 16 / static_cast<int>(sizeof(T))) {
    norm_fwd_kernel<T, acc_t, 16 / sizeof(T)>
        <<<l.grid, l.block, 0, stream>>>(x, w, b, y, mean, rstd, rows, n, eps, rms);
  } else {
    norm_fwd_kernel<T, acc_t, 1>
        <<<l.grid, l.block, 0, stream>>>(x, w, b, y, mean, rstd, rows, n, eps, rms);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename acc_t>
void launch_bwd(const T* dy, const T* x, const T* w, const acc_t* mean, const acc_t* rstd, T* dx,
                T* dw, T* db, acc_t* partial_w, acc_t* partial_b, int64_t splits,
                int64_t rows_per_split, int64_t rows, int64_t n, bool rms, int device,
                cudaStream_t stream) {
  // 16-byte vectors when every pointer allows it (the dweight / dbias kernel uses the same).
  const int vec = pick_vec<T>(n, {dy, x, w, dx});
  if (rows > 0) {
    const RowLaunch l = row_launch(rows, n, vec, device);
    if (vec == 16 / static_cast<int>(sizeof(T))) {
      norm_bwd_dx_kernel<T, acc_t, 16 / sizeof(T)>
          <<<l.grid, l.block, 0, stream>>>(dy, x, w, mean, rstd, dx, rows, n, rms);
    } else {
      norm_bwd_dx_kernel<T, acc_t, 1>
          <<<l.grid, l.block, 0, stream>>>(dy, x, w, mean, rstd, dx, rows, n, rms);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (dw == nullptr && db == nullptr) return;
  constexpr int kVec = 16 / sizeof(T);
  const int64_t tile = static_cast<int64_t>(kColTile) * (vec == kVec ? kVec : 1);
  const dim3 grid(static_cast<unsigned>((n + tile - 1) / tile), static_cast<unsigned>(splits));
  if (vec == kVec) {
    norm_bwd_partial_kernel<T, acc_t, kVec><<<grid, dim3(kColTile, kRowLanes), 0, stream>>>(
        dy, x, mean, rstd, partial_w, partial_b, rows, n, rows_per_split);
  } else {
    norm_bwd_partial_kernel<T, acc_t, 1><<<grid, dim3(kColTile, kRowLanes), 0, stream>>>(
        dy, x, mean, rstd, partial_w, partial_b, rows, n, rows_per_split);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const unsigned col_blocks = static_cast<unsigned>((n + kWarp - 1) / kWarp);
  sum_partials_kernel<T, acc_t><<<col_blocks, dim3(kWarp, kSumLanes), 0, stream>>>(
      partial_w, partial_b, dw, db, splits, n);
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
  // Row splits of the dweight / dbias partial sums: a function of rows only (deterministic).
  const int64_t splits =
      std::max<int64_t>(1, std::min(kMaxSplits, (rows + kRowsPerSplit - 1) / kRowsPerSplit));
  const int64_t rows_per_split = std::max<int64_t>(1, (rows + splits - 1) / splits);
  // One (parts, splits, n) buffer holds the dweight and / or dbias partials (one allocation).
  const int64_t parts = (weight ? 1 : 0) + (has_bias ? 1 : 0);
  at::Tensor partial =
      parts > 0 ? at::empty({parts, splits, n}, x.options().dtype(stat_dtype(x))) : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  TURBOLM_DISPATCH_FLOAT(x.scalar_type(), op, [&] {
    acc_t* partial_w = weight ? partial.mutable_data_ptr<acc_t>() : nullptr;
    acc_t* partial_b = has_bias ? partial.mutable_data_ptr<acc_t>() + (weight ? splits * n : 0)
                                : nullptr;
    launch_bwd<scalar_t, acc_t>(
        dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(w),
        mean.defined() ? mean.const_data_ptr<acc_t>() : nullptr, rstd.const_data_ptr<acc_t>(),
        dx.mutable_data_ptr<scalar_t>(), weight ? dw.mutable_data_ptr<scalar_t>() : nullptr,
        has_bias ? db.mutable_data_ptr<scalar_t>() : nullptr, partial_w, partial_b, splits,
        rows_per_split, rows, n, rms, x.get_device(), stream);
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

TORCH_LIBRARY_IMPL(turbolm, CUDA, m) {
  m.impl("layer_norm_fwd", &turbolm::norm::layer_norm_fwd_cuda);
  m.impl("layer_norm_bwd", &turbolm::norm::layer_norm_bwd_cuda);
  m.impl("rms_norm_fwd", &turbolm::norm::rms_norm_fwd_cuda);
  m.impl("rms_norm_bwd", &turbolm::norm::rms_norm_bwd_cuda);
}
