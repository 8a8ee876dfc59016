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
//   * a key row is read as 16-byte vectors: LPK lanes ("lanes per key", head_dim / 8 for 2-byte
//     types) hold one row, so a warp reads KPW = 32 / LPK whole rows per load instruction
//     (2 rows of 256 B for head_dim 128 in bf16). Each lane group ("slot") takes its own keys
//     and keeps its own online softmax (running max m, sum l, acc) per query row in registers,
//     in the log2 domain (q is pre-scaled by scale * log2(e), so exp is exp2); q . k is a
//     shuffle reduction over the slot's LPK lanes only;
//   * a warp takes U key rows per slot at a time, their k and v rows loaded back to back
//     (2 * U independent 16-byte loads per lane in flight) and kept packed (the raw 16 bytes)
//     until used, so registers stay low enough for 3-4 blocks per SM;
//   * the slots and warps merge through shared memory; with one split the block writes the
//     normalized output and lse, otherwise the chunk's (o = acc / l, lse) go to fp32 buffers
//     and decode_merge_kernel combines the chunks of each row exactly.
// The split count aims at whole waves of blocks with at least 128 keys per chunk.
// The first version (lanes over head_dim with 4-8 byte loads, a full-warp shuffle reduction
// per key and query row, 189 registers) read only ~500 GB/s on an H200 (benchmarks/results/
// h200/decode.md, 2026-11-28), an eighth of SDPA's kernel.
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

// 16 bytes of a row: VEC elements of T.
template <typename T>
struct alignas(16) Vec16 {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

// Elements [first, first + VEC) of a row of d elements as one 16-byte load when the layout
// allows, else element by element (0 past the end of the row, and for invalid keys).
template <typename T>
__device__ __forceinline__ Vec16<T> load16(const T* row, int first, int d, bool vec_ok,
                                           bool valid) {
  constexpr int kVec = Vec16<T>::kSize;
  Vec16<T> out;
  if (valid && vec_ok && first + kVec <= d) return *reinterpret_cast<const Vec16<T>*>(row + first);
#pragma unroll
  for (int e = 0; e < kVec; ++e) out.v[e] = valid && first + e < d ? row[first + e] : T(0);
  return out;
}

template <int LANES>
__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
  for (int offset = LANES / 2; offset > 0; offset /= 2)
    x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

// Weight 2^(m - max) of a partial result; 0 for one that saw no key.
__device__ __forceinline__ float weight2(float m, float max_m) {
  return m == -INFINITY ? 0.0f : exp2f(m - max_m);
}

// Launch shape of decode_partial_kernel for a head-dim class DC (32, 64, 128 or 256), an
// element type T and R query rows per block.
template <typename T, int DC, int R>
struct Tile {
  static constexpr int kVec = Vec16<T>::kSize;                   // elements per 16 bytes
  static constexpr int kRowVecs = DC / kVec;                     // 16-byte vectors per row
  static constexpr int kLanes = kRowVecs < kWarp ? kRowVecs : kWarp;  // lanes per key (LPK)
  static constexpr int kNV = kRowVecs / kLanes;                  // vectors per lane (1 or 2)
  static constexpr int kSlots = kWarp / kLanes;                  // keys per warp load (KPW)
  static constexpr int kElems = kNV * kVec;                      // elements per lane
  // Keys per slot per step: the k / v rows live as floats (2 * kU * kElems registers) beside
  // q and acc (2 * R * kElems): at most ~128 registers, so 4 blocks (16 warps) fit an SM.
  static constexpr int kU = R * kElems >= 32 ? 2 : 4;
  static constexpr int kMinBlocks = R * kElems >= 16 ? 3 : 4;
};

template <typename scalar_t, int DC, int R>
__global__ void __launch_bounds__(kThreads, (Tile<scalar_t, DC, R>::kMinBlocks))
    decode_partial_kernel(DecodeGeometry g, const scalar_t* __restrict__ q,
                          const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                          scalar_t* __restrict__ out, float* __restrict__ lse,
                          float* __restrict__ part_o, float* __restrict__ part_lse, int splits,
                          int row_chunks, bool vec_ok) {
  using Sh = Tile<scalar_t, DC, R>;
  constexpr int kVec = Sh::kVec, kLanes = Sh::kLanes, kNV = Sh::kNV, kSlots = Sh::kSlots;
  constexpr int kElems = Sh::kElems, U = Sh::kU;
  constexpr int kStates = kWarps * kSlots;  // partial softmax states merged at the end
  __shared__ float sm_m[kStates][R];
  __shared__ float sm_l[kStates][R];
  __shared__ float sm_acc[kStates][R][DC];

  const int split = blockIdx.y;
  const int64_t pair = blockIdx.x / row_chunks;  // batch * kv_heads + kv head
  const int r0 = (blockIdx.x % row_chunks) * R;
  const int64_t b = pair / g.kv_heads, hkv = pair % g.kv_heads;
  const int group = static_cast<int>(g.q_heads / g.kv_heads);
  const int rows = group * static_cast<int>(g.q_len);
  const int live = min(R, rows - r0);  // rows of this block (the same for all its warps)
  const int d = static_cast<int>(g.head_dim);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int slot = lane / kLanes, sl = lane % kLanes;  // key slot, lane within the slot
  const KeyRange chunk = split_keys(split, g.k_len, splits);
  const float q_scale = static_cast<float>(g.scale) * kLog2e;

  // Per row: the lane's slice of q, the visible keys as offsets from chunk.lo, the state.
  float qr[R][kElems], acc[R][kElems], m[R], l[R];
  int lo[R], hi[R];
  int keys_lo = static_cast<int>(chunk.hi - chunk.lo), keys_hi = 0;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
    lo[r] = hi[r] = 0;
#pragma unroll
    for (int e = 0; e < kElems; ++e) acc[r][e] = qr[r][e] = 0.0f;
    const int row = r0 + r;
    if (row < rows) {
      const int64_t head = hkv * group + row / g.q_len, token = row % g.q_len;
      const scalar_t* q_row =
          q + b * g.q_stride[0] + head * g.q_stride[1] + token * g.q_stride[2];
#pragma unroll
      for (int n = 0; n < kNV; ++n) {
        const Vec16<scalar_t> x = load16(q_row, (n * kLanes + sl) * kVec, d, vec_ok, true);
#pragma unroll
        for (int e = 0; e < kVec; ++e) qr[r][n * kVec + e] = static_cast<float>(x.v[e]) * q_scale;
      }
      const KeyRange seen = intersect(
          chunk, visible_keys(token, g.q_len, g.k_len, g.causal, g.window_left, g.window_right));
      if (seen.hi > seen.lo) {
        lo[r] = static_cast<int>(seen.lo - chunk.lo);
        hi[r] = static_cast<int>(seen.hi - chunk.lo);
        keys_lo = min(keys_lo, lo[r]);
        keys_hi = max(keys_hi, hi[r]);
      }
    }
  }

  const scalar_t* kb = k + b * g.k_stride[0] + hkv * g.k_stride[1] + chunk.lo * g.k_stride[2];
  const scalar_t* vb = v + b * g.v_stride[0] + hkv * g.v_stride[1] + chunk.lo * g.v_stride[2];
  // Step j0 of warp w covers keys [j0, j0 + U * kSlots): slot s takes j0 + u * kSlots + s, so
  // a warp load reads kSlots adjacent rows.
  constexpr int kStepKeys = U * kSlots;
  for (int j0 = keys_lo + warp * kStepKeys; j0 < keys_hi; j0 += kWarps * kStepKeys) {
    Vec16<scalar_t> kr[U][kNV], vr[U][kNV];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = j0 + u * kSlots + slot;
      const bool valid = j < keys_hi;
#pragma unroll
      for (int n = 0; n < kNV; ++n) {
        const int first = (n * kLanes + sl) * kVec;
        kr[u][n] = load16(kb + static_cast<int64_t>(j) * g.k_stride[2], first, d, vec_ok, valid);
        vr[u][n] = load16(vb + static_cast<int64_t>(j) * g.v_stride[2], first, d, vec_ok, valid);
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r >= live) break;  // uniform over the block
      float s[U];
      float m_new = m[r];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        float partial = 0.0f;
#pragma unroll
        for (int n = 0; n < kNV; ++n)
#pragma unroll
          for (int e = 0; e < kVec; ++e)
            partial += qr[r][n * kVec + e] * static_cast<float>(kr[u][n].v[e]);
        s[u] = group_sum<kLanes>(partial);  // the same value in the slot's lanes
        const int j = j0 + u * kSlots + slot;
        if (j < lo[r] || j >= hi[r]) s[u] = -INFINITY;
        m_new = fmaxf(m_new, s[u]);
      }
      // Past the shuffles, slots may diverge: a slot none of whose keys in this step is
      // visible to the row (m_new = -inf) leaves its state alone.
      if (m_new != -INFINITY) {
        const float corr = exp2f(m[r] - m_new);  // 0 while m was -inf
        float p[U], p_sum = 0.0f;
#pragma unroll
        for (int u = 0; u < U; ++u) {
          p[u] = exp2f(s[u] - m_new);  // 0 for invisible keys
          p_sum += p[u];
        }
        l[r] = l[r] * corr + p_sum;
#pragma unroll
        for (int n = 0; n < kNV; ++n)
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            float value = acc[r][n * kVec + e] * corr;
#pragma unroll
            for (int u = 0; u < U; ++u) value += p[u] * static_cast<float>(vr[u][n].v[e]);
            acc[r][n * kVec + e] = value;
          }
        m[r] = m_new;
      }
    }
  }

  // Merge the slots' and warps' partial results through shared memory.
  const int state = warp * kSlots + slot;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (sl == 0) {
      sm_m[state][r] = m[r];
      sm_l[state][r] = l[r];
    }
#pragma unroll
    for (int n = 0; n < kNV; ++n)
#pragma unroll
      for (int e = 0; e < kVec; ++e)
        sm_acc[state][r][(n * kLanes + sl) * kVec + e] = acc[r][n * kVec + e];
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < R * DC; idx += kThreads) {
    const int r = idx / DC, col = idx % DC;
    const int row = r0 + r;
    if (row >= rows || col >= d) continue;
    float max_m = -INFINITY;
#pragma unroll
    for (int w = 0; w < kStates; ++w) max_m = fmaxf(max_m, sm_m[w][r]);
    float total = 0.0f, value = 0.0f;
#pragma unroll
    for (int w = 0; w < kStates; ++w) {
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

// Auto split count: whole waves of blocks (`slots` = blocks resident on the GPU at once), the
// most waves up to 4 that keep at least kMinKeysPerSplit keys per chunk.
int64_t cuda_splits(const DecodeGeometry& g, int64_t blocks, int64_t slots, int64_t requested) {
  if (g.k_len == 0) return 1;
  if (requested > 0) return std::min<int64_t>({requested, g.k_len, kMaxSplits});
  const int64_t most = std::clamp<int64_t>(g.k_len / kMinKeysPerSplit, 1, kMaxSplits);
  for (int64_t waves = 4; waves >= 1; --waves) {
    const int64_t splits = waves * slots / blocks;
    if (splits >= 1 && splits <= most) return splits;
  }
  // None fits: a batch that fills the GPU without splitting, or a short cache.
  return blocks >= slots ? 1 : most;
}

// Whether every row of q, k, v starts on a 16-byte boundary (and head_dim fills whole
// vectors), so rows can be read as 16-byte vectors.
bool vector_ok(const DecodeGeometry& g, const at::Tensor& q, const at::Tensor& k,
               const at::Tensor& v, size_t elem) {
  const int64_t vec = static_cast<int64_t>(16 / elem);
  if (g.head_dim % vec) return false;
  for (const at::Tensor* t : {&q, &k, &v}) {
    if (reinterpret_cast<uintptr_t>(t->const_data_ptr()) % 16) return false;
    for (int i = 0; i < 3; ++i)
      if (t->size(i) > 1 && t->stride(i) % vec) return false;
  }
  return true;
}

template <typename scalar_t, int DC, int R>
void launch(const DecodeGeometry& g, const at::Tensor& q, const at::Tensor& k,
            const at::Tensor& v, at::Tensor& out, at::Tensor& lse, int64_t requested) {
  const int64_t rows = g.q_heads / g.kv_heads * g.q_len;
  const int64_t row_chunks = (rows + R - 1) / R;
  const int64_t blocks = g.batch * g.kv_heads * row_chunks;
  const int64_t slots =
      static_cast<int64_t>(multiprocessors(q.get_device())) * Tile<scalar_t, DC, R>::kMinBlocks;
  const int64_t splits = cuda_splits(g, blocks, slots, requested);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool vec_ok = vector_ok(g, q, k, v, sizeof(scalar_t));
  at::Tensor part_o, part_lse;
  if (splits > 1) {
    const int64_t all_rows = g.batch * g.q_heads * g.q_len;
    part_o = at::empty({all_rows * splits * g.head_dim}, q.options().dtype(at::kFloat));
    part_lse = at::empty({all_rows * splits}, q.options().dtype(at::kFloat));
  }
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(splits));
  decode_partial_kernel<scalar_t, DC, R><<<grid, kThreads, 0, stream>>>(
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

// Rows per block: the smallest of 1, 2, 4 holding the GQA group's rows (at most 4, for
// registers; larger groups take several row chunks, whose blocks read the same keys at about the
// same time, so mostly from L2).
template <typename scalar_t, int DC>
void launch_for_rows(const DecodeGeometry& g, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, at::Tensor& out, at::Tensor& lse, int64_t requested) {
  const int64_t rows = g.q_heads / g.kv_heads * g.q_len;
  if (rows <= 1) return launch<scalar_t, DC, 1>(g, q, k, v, out, lse, requested);
  if (rows <= 2) return launch<scalar_t, DC, 2>(g, q, k, v, out, lse, requested);
  return launch<scalar_t, DC, 4>(g, q, k, v, out, lse, requested);
}

template <typename scalar_t>
void launch_for_head_dim(const DecodeGeometry& g, const at::Tensor& q, const at::Tensor& k,
                         const at::Tensor& v, at::Tensor& out, at::Tensor& lse,
                         int64_t requested) {
  if (g.head_dim <= 32) return launch_for_rows<scalar_t, 32>(g, q, k, v, out, lse, requested);
  if (g.head_dim <= 64) return launch_for_rows<scalar_t, 64>(g, q, k, v, out, lse, requested);
  if (g.head_dim <= 128) return launch_for_rows<scalar_t, 128>(g, q, k, v, out, lse, requested);
  return launch_for_rows<scalar_t, 256>(g, q, k, v, out, lse, requested);
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
