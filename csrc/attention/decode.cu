// Attention decoding CUDA kernels (TORCH_LIBRARY_IMPL(turbolm, CUDA)): split-K
// ("flash-decoding") attention of a few new queries against a KV cache.
//
// Design
// ------
// Decoding is memory-bound: every step reads the whole cache once, and one (batch, head) pair
// holds far too little work to fill a GPU. So the keys are cut into `splits` chunks
// (decode_math.h) and the grid is (batch x kv heads x row chunks, splits):
//   * a block (4 warps) owns one chunk of keys of one kv head and up to R query rows of that
//     head's group (the GQA group of q heads x the Tq new tokens), so each key / value row is
//     read once for all the q heads sharing it;
//   * its warps take the chunk's keys in turn, U at a time (U k and v rows loaded back to back
//     before they are used, so more bytes are in flight). A lane holds E = D / 32
//     (rounded up to 1, 2, 4 or 8) contiguous elements of each query, key and value row, read
//     as one vector when the layout allows; q . k is a warp shuffle reduction; each warp keeps
//     an online softmax (running max m, sum l, acc) per row in registers, in the log2 domain
//     (q is pre-scaled by scale * log2(e), so exp is exp2);
//   * the 4 warps merge through shared memory; with one split the block writes the normalized
//     output and lse, otherwise the chunk's (o = acc / l, lse) go to fp32 buffers and
//     decode_merge_kernel combines the chunks of each row exactly.
// The split count targets two blocks per SM with at least 128 keys per chunk.
// Headers: ATen core / c10 only (no torch/extension.h), to keep nvcc builds short.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "../common/checks.h"
#include "decode.h"
#include "decode_math.h"

namespace turbolm::attention {
// A named namespace, not an anonymous one: nvcc's host stubs for these templated kernels
// fail to compile in an anonymous namespace under C++17 (torch < 2.14 builds as C++17).
namespace cuda_detail {

constexpr int kWarp = 32;
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarp;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMinKeysPerSplit = 128;
constexpr int kMaxSplits = 256;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <typename T, int E>
struct alignas(sizeof(T) * E) Vec {
  T v[E];
};

// The lane's E elements [lane * E, lane * E + E) of a row of d elements (0 past the end).
template <typename T, int E>
__device__ __forceinline__ void load_lane(const T* row, int lane, int d, bool vec_ok, float* out) {
  const int first = lane * E;
  if (vec_ok && first + E <= d) {
    const Vec<T, E> tmp = *reinterpret_cast<const Vec<T, E>*>(row + first);
#pragma unroll
    for (int e = 0; e < E; ++e) out[e] = static_cast<float>(tmp.v[e]);
    return;
  }
#pragma unroll
  for (int e = 0; e < E; ++e) out[e] = first + e < d ? static_cast<float>(row[first + e]) : 0.0f;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

// Weight 2^(m - max) of a warp's (or chunk's) partial result; 0 for one that saw no key.
__device__ __forceinline__ float weight2(float m, float max_m) {
  return m == -INFINITY ? 0.0f : exp2f(m - max_m);
}

template <typename scalar_t, int E, int R, int U>
__global__ void __launch_bounds__(kThreads)
    decode_partial_kernel(DecodeGeometry g, const scalar_t* __restrict__ q,
                          const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                          scalar_t* __restrict__ out, float* __restrict__ lse,
                          float* __restrict__ part_o, float* __restrict__ part_lse, int splits,
                          int row_chunks, bool vec_ok) {
  __shared__ float sm_m[kWarps][R];
  __shared__ float sm_l[kWarps][R];
  __shared__ float sm_acc[kWarps][R][E * kWarp];

  const int split = blockIdx.y;
  const int64_t pair = blockIdx.x / row_chunks;  // batch * kv_heads + kv head
  const int r0 = (blockIdx.x % row_chunks) * R;
  const int64_t b = pair / g.kv_heads, hkv = pair % g.kv_heads;
  const int group = static_cast<int>(g.q_heads / g.kv_heads);
  const int rows = group * static_cast<int>(g.q_len);
  const int live = min(R, rows - r0);  // rows of this block (the same for all its warps)
  const int d = static_cast<int>(g.head_dim);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const KeyRange chunk = split_keys(split, g.k_len, splits);
  const float q_scale = static_cast<float>(g.scale) * kLog2e;

  float qr[R][E], acc[R][E], m[R], l[R];
  int64_t lo[R], hi[R];
  int64_t keys_lo = chunk.hi, keys_hi = chunk.lo;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
#pragma unroll
    for (int e = 0; e < E; ++e) acc[r][e] = 0.0f;
    const int row = r0 + r;
    lo[r] = hi[r] = 0;
    if (row < rows) {
      const int64_t head = hkv * group + row / g.q_len, token = row % g.q_len;
      load_lane<scalar_t, E>(q + b * g.q_stride[0] + head * g.q_stride[1] + token * g.q_stride[2],
                             lane, d, vec_ok, qr[r]);
#pragma unroll
      for (int e = 0; e < E; ++e) qr[r][e] *= q_scale;
      const KeyRange seen = intersect(
          chunk, visible_keys(token, g.q_len, g.k_len, g.causal, g.window_left, g.window_right));
      lo[r] = seen.lo;
      hi[r] = seen.hi;
      if (seen.hi > seen.lo) {
        keys_lo = min(keys_lo, seen.lo);
        keys_hi = max(keys_hi, seen.hi);
      }
    } else {
#pragma unroll
      for (int e = 0; e < E; ++e) qr[r][e] = 0.0f;
    }
  }

  const scalar_t* kb = k + b * g.k_stride[0] + hkv * g.k_stride[1];
  const scalar_t* vb = v + b * g.v_stride[0] + hkv * g.v_stride[1];
  // Warp w takes keys [j0, j0 + U) for j0 = keys_lo + w * U, + kWarps * U, ...: the 2 * U row
  // loads of a group are issued back to back (more bytes in flight per warp), and the online
  // softmax rescales once per group.
  for (int64_t j0 = keys_lo + warp * U; j0 < keys_hi; j0 += kWarps * U) {
    float kr[U][E], vr[U][E];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (j0 + u < keys_hi) {
        load_lane<scalar_t, E>(kb + (j0 + u) * g.k_stride[2], lane, d, vec_ok, kr[u]);
        load_lane<scalar_t, E>(vb + (j0 + u) * g.v_stride[2], lane, d, vec_ok, vr[u]);
      } else {
#pragma unroll
        for (int e = 0; e < E; ++e) kr[u][e] = vr[u][e] = 0.0f;
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r >= live) break;
      float s[U];
      float m_new = m[r];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        float partial = 0.0f;
#pragma unroll
        for (int e = 0; e < E; ++e) partial += qr[r][e] * kr[u][e];
        s[u] = warp_sum(partial);  // the same value in every lane
        if (j0 + u < lo[r] || j0 + u >= hi[r]) s[u] = -INFINITY;
        m_new = fmaxf(m_new, s[u]);
      }
      if (m_new == -INFINITY) continue;  // no key of the group is visible to this row
      const float corr = exp2f(m[r] - m_new);  // 0 while m was -inf
      float p[U], p_sum = 0.0f;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        p[u] = exp2f(s[u] - m_new);  // 0 for invisible keys
        p_sum += p[u];
      }
      l[r] = l[r] * corr + p_sum;
#pragma unroll
      for (int e = 0; e < E; ++e) {
        float value = acc[r][e] * corr;
#pragma unroll
        for (int u = 0; u < U; ++u) value += p[u] * vr[u][e];
        acc[r][e] = value;
      }
      m[r] = m_new;
    }
  }

  // Merge the warps' partial results through shared memory.
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (lane == 0) {
      sm_m[warp][r] = m[r];
      sm_l[warp][r] = l[r];
    }
#pragma unroll
    for (int e = 0; e < E; ++e) sm_acc[warp][r][lane * E + e] = acc[r][e];
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < R * E * kWarp; idx += kThreads) {
    const int r = idx / (E * kWarp), col = idx % (E * kWarp);
    const int row = r0 + r;
    if (row >= rows || col >= d) continue;
    float max_m = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) max_m = fmaxf(max_m, sm_m[w][r]);
    float total = 0.0f, value = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float wt = weight2(sm_m[w][r], max_m);
      total += sm_l[w][r] * wt;
      value += sm_acc[w][r][col] * wt;
    }
    const float o = total > 0.0f ? value / total : 0.0f;
    const float lse2 = total > 0.0f ? max_m + log2f(total) : -INFINITY;
    const int64_t head = hkv * group + row / g.q_len, token = row % g.q_len;
    const int64_t row_index = (b * g.q_heads + head) * g.q_len + token;
    if (splits == 1) {
      out[b * g.out_stride[0] + head * g.out_stride[1] + token * g.out_stride[2] + col] =
          static_cast<scalar_t>(o);
      if (col == 0) lse[row_index] = total > 0.0f ? lse2 * kLn2 : -INFINITY;
    } else {
      part_o[(row_index * splits + split) * d + col] = o;
      if (col == 0) part_lse[row_index * splits + split] = lse2;  // log2 domain
    }
  }
}

// One block per query row: out = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    decode_merge_kernel(DecodeGeometry g, const float* __restrict__ part_o,
                        const float* __restrict__ part_lse, int splits,
                        scalar_t* __restrict__ out, float* __restrict__ lse) {
  const int64_t row = blockIdx.x;
  const int64_t t = row % g.q_len, h = (row / g.q_len) % g.q_heads;
  const int64_t b = row / (g.q_len * g.q_heads);
  const float* row_lse = part_lse + row * splits;
  float max_lse = -INFINITY;
  for (int s = 0; s < splits; ++s) max_lse = fmaxf(max_lse, row_lse[s]);
  float total = 0.0f;
  for (int s = 0; s < splits; ++s) total += weight2(row_lse[s], max_lse);
  const float inv = total > 0.0f ? 1.0f / total : 0.0f;
  scalar_t* o = out + b * g.out_stride[0] + h * g.out_stride[1] + t * g.out_stride[2];
  for (int col = threadIdx.x; col < g.head_dim; col += kThreads) {
    float value = 0.0f;
    for (int s = 0; s < splits; ++s) {
      const float w = weight2(row_lse[s], max_lse);
      if (w != 0.0f) value += w * part_o[(row * splits + s) * g.head_dim + col];
    }
    o[col] = static_cast<scalar_t>(value * inv);
  }
  if (threadIdx.x == 0) lse[row] = total > 0.0f ? (max_lse + log2f(total)) * kLn2 : -INFINITY;
}

int multiprocessors(int device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return std::max(count, 1);
}

int64_t cuda_splits(const DecodeGeometry& g, int64_t blocks, int sms, int64_t requested) {
  if (g.k_len == 0) return 1;
  if (requested > 0) return std::min<int64_t>({requested, g.k_len, kMaxSplits});
  const int64_t want = (2 * sms + blocks - 1) / blocks;
  const int64_t most = std::max<int64_t>(1, g.k_len / kMinKeysPerSplit);
  return std::clamp<int64_t>(std::min(want, most), 1, kMaxSplits);
}

// Whether every row of q, k, v starts on an E-element vector boundary.
bool vector_ok(const DecodeGeometry& g, const at::Tensor& q, const at::Tensor& k,
               const at::Tensor& v, int e, size_t elem) {
  if (g.head_dim % e) return false;
  for (const at::Tensor* t : {&q, &k, &v}) {
    if (reinterpret_cast<uintptr_t>(t->const_data_ptr()) % (e * elem)) return false;
    for (int i = 0; i < 3; ++i)
      if (t->size(i) > 1 && t->stride(i) % e) return false;
  }
  return true;
}

template <typename scalar_t, int E>
void launch(const DecodeGeometry& g, const at::Tensor& q, const at::Tensor& k,
            const at::Tensor& v, at::Tensor& out, at::Tensor& lse, int64_t requested) {
  constexpr int R = E >= 8 ? 4 : 8;  // registers: R * E * 2 floats per lane for q and acc
  constexpr int U = E >= 8 ? 2 : 4;  // keys per warp step: U * E * 2 floats for k and v rows
  const int64_t rows = g.q_heads / g.kv_heads * g.q_len;
  const int64_t row_chunks = (rows + R - 1) / R;
  const int64_t blocks = g.batch * g.kv_heads * row_chunks;
  const int64_t splits = cuda_splits(g, blocks, multiprocessors(q.get_device()), requested);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool vec_ok = vector_ok(g, q, k, v, E, sizeof(scalar_t));
  at::Tensor part_o, part_lse;
  if (splits > 1) {
    const int64_t all_rows = g.batch * g.q_heads * g.q_len;
    part_o = at::empty({all_rows * splits * g.head_dim}, q.options().dtype(at::kFloat));
    part_lse = at::empty({all_rows * splits}, q.options().dtype(at::kFloat));
  }
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(splits));
  decode_partial_kernel<scalar_t, E, R, U><<<grid, kThreads, 0, stream>>>(
      g, q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
      v.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
      lse.mutable_data_ptr<float>(), splits > 1 ? part_o.mutable_data_ptr<float>() : nullptr,
      splits > 1 ? part_lse.mutable_data_ptr<float>() : nullptr, static_cast<int>(splits),
      static_cast<int>(row_chunks), vec_ok);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1) {
    const int64_t all_rows = g.batch * g.q_heads * g.q_len;
    decode_merge_kernel<scalar_t><<<static_cast<unsigned>(all_rows), kThreads, 0, stream>>>(
        g, part_o.const_data_ptr<float>(), part_lse.const_data_ptr<float>(),
        static_cast<int>(splits), out.mutable_data_ptr<scalar_t>(),
        lse.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename scalar_t>
void launch_for_head_dim(const DecodeGeometry& g, const at::Tensor& q, const at::Tensor& k,
                         const at::Tensor& v, at::Tensor& out, at::Tensor& lse,
                         int64_t requested) {
  if (g.head_dim <= 32) return launch<scalar_t, 1>(g, q, k, v, out, lse, requested);
  if (g.head_dim <= 64) return launch<scalar_t, 2>(g, q, k, v, out, lse, requested);
  if (g.head_dim <= 128) return launch<scalar_t, 4>(g, q, k, v, out, lse, requested);
  return launch<scalar_t, 8>(g, q, k, v, out, lse, requested);
}

}  // namespace cuda_detail

std::tuple<at::Tensor, at::Tensor> attention_decode_cuda(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, double scale,
                                                         bool causal, int64_t window_left,
                                                         int64_t window_right,
                                                         int64_t num_splits) {
  TURBOLM_OP("turbolm::attention_decode");
  DecodeGeometry g =
      check_decode(op, q, k, v, scale, causal, window_left, window_right, num_splits);
  CHECK_CUDA(q);
  const auto t = q.scalar_type();
  TURBOLM_CHECK(DTypeError,
                t == at::kFloat || t == at::kHalf || t == at::kBFloat16,
                "q must have dtype in (float16, bfloat16, float32) on CUDA, got ", dtype_str(t));
  TURBOLM_CHECK(ShapeError, g.head_dim <= 256, "head_dim must be <= 256 on CUDA, got ",
                g.head_dim);
  const c10::cuda::CUDAGuard guard(q.device());
  auto [out, lse] = new_decode_outputs(q, g);
  if (q.numel() == 0) return {out, lse};
  if (t == at::kFloat) {
    cuda_detail::launch_for_head_dim<float>(g, q, k, v, out, lse, num_splits);
  } else if (t == at::kHalf) {
    cuda_detail::launch_for_head_dim<c10::Half>(g, q, k, v, out, lse, num_splits);
  } else {
    cuda_detail::launch_for_head_dim<c10::BFloat16>(g, q, k, v, out, lse, num_splits);
  }
  return {out, lse};
}

}  // namespace turbolm::attention

TORCH_LIBRARY_IMPL(turbolm, CUDA, m) {
  m.impl("attention_decode", &turbolm::attention::attention_decode_cuda);
}
