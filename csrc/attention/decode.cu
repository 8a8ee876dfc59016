// Attention decoding CUDA kernels (TORCH_LIBRARY_IMPL(turbolm, CUDA)): split-K
// ("flash-decoding") attention of a few new queries against a KV cache.
//
// Design
// ------
// Decoding is memory-bound: every step reads the whole cache once, and one (batch, head) pair
// holds far too little work to fill a GPU. So the keys are cut into `splits` chunks of `chunk`
// keys (decode_math.h chunk_keys) and the grid is (batch x kv heads x row chunks, splits):
//   * a block (4 warps) owns one chunk of keys of one kv head and up to R query rows of that
//     head's group (the GQA group of q heads x the Tq new tokens), so each key / value row is
//     read once for all the q heads sharing it;
//   * the block streams its chunk through shared memory in stages of TK keys (k and v, 8 KB a
//     stage for every dtype / head dim) with cp.async, kStages = 4 stages deep: while the warps
//     work on stage t, stages t+1..t+3 (24 KB) are in flight. With 4 blocks per SM that is
//     ~96 KB in flight per SM, what an H200 needs (~4 TB/s x ~1 us latency / 132 SMs ~ 30 KB,
//     more under load). Rows that are not 16-byte aligned (odd head dims, odd strides) take
//     element-wise loads into the same buffers (correct, slower);
//   * compute reads a key row as 16-byte vectors from shared memory: LPK lanes ("lanes per
//     key", head_dim / 8 for 2-byte types) hold one row, so a warp covers KPW = 32 / LPK rows
//     (2 rows of 256 B for head_dim 128 in bf16). Each lane group ("slot") takes its own keys
//     and keeps its own online softmax (running max m, sum l, acc) per query row in registers,
//     in the log2 domain (q is pre-scaled by scale * log2(e), so exp is exp2); q . k is a
//     shuffle reduction over the slot's LPK lanes only. A warp takes U keys per slot per
//     stage (U * KPW * 4 warps = TK);
//   * the slots and warps merge through shared memory; with one split the block writes the
//     normalized output and lse, otherwise the chunk's (o = acc / l, lse) go to fp32 buffers
//     and decode_merge_kernel combines the chunks of each row exactly: one block per row loads
//     all the row's lse values at once (threads over splits), reduces max and sum in a fixed
//     order (deterministic), keeps the weights 2^(lse_s - max) in shared memory, then threads
//     over (split group, 16-byte column unit) accumulate o with 8 independent loads in flight
//     and the split groups are summed in a fixed order.
// Split count (plan_splits): the fewest splits whose blocks fill their waves (resident slots =
// occupancy x SMs, asked from the runtime) to >= 90%, each chunk a whole number of stages and
// at least 4 of them (32 KB of k/v); B1 / Hkv 8 / cache 16384 in bf16 takes ~45 splits, B32
// takes 3 (768 blocks for 2 x 396 slots) rather than 1 (256 blocks: 2 of 3 slots per SM).
// History: the first version (lanes over head_dim, a full-warp shuffle per key and row, 189
// registers) read ~500 GB/s on an H200; the second (k/v loaded into registers 4 keys a warp
// at a time, no prefetch) plus a merge that walked the splits one dependent load after another
// took 44 / 120 us at B1 cache 4096 / 16384 where SDPA takes 18 / 33 us
// (benchmarks/results/h200/, 2026-11-28).
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
constexpr int kStages = 4;             // shared-memory pipeline depth of the partial kernel
constexpr int kMinStagesPerSplit = 4;  // auto splits keep at least this many stages per chunk
constexpr int kMaxSplits = 256;
constexpr int kMergeThreads = 256;
constexpr int kMergeUnroll = 8;  // independent loads in flight per thread in the merge
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

// Asynchronous 16-byte copy global -> shared (cp.async, sm_80+; L2 only, the cache is read
// once). Older architectures copy synchronously.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem) : "memory");
#else
  *reinterpret_cast<uint4*>(smem) = *reinterpret_cast<const uint4*>(gmem);
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most N of this thread's committed copy groups are still pending.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// Elements [first, first + VEC) of key row `row` into shared memory: cp.async when the row
// allows 16-byte loads, else a synchronous element-wise load (zeros past the row's end and for
// invalid keys, so masked keys multiply finite values).
template <typename T>
__device__ __forceinline__ void copy16(T* dst, const T* row, int first, int d, bool vec_ok,
                                       bool valid) {
  if (valid && vec_ok && first < d) {  // vec_ok: d % VEC == 0, so the whole vector is in the row
    cp_async16(dst, row + first);
  } else {
    *reinterpret_cast<Vec16<T>*>(dst) = load16(row, first, d, vec_ok, valid);
  }
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
  // Keys per slot per stage: every lane reads U * kNV = 2 vectors of k and 2 of v a stage.
  static constexpr int kU = 2 / kNV;
  static constexpr int kStepKeys = kU * kSlots;              // keys per warp per stage
  static constexpr int kStageKeys = kWarps * kStepKeys;      // TK: keys per stage
  static constexpr int kStageElems = kStageKeys * DC;        // elements of k (or v) per stage
  // 16-byte copies per thread per stage, for k and for v (each 4 KB a stage).
  static constexpr int kCopies = kStageKeys * kRowVecs / kThreads;
  static constexpr int kStates = kWarps * kSlots;  // partial softmax states merged at the end
  static constexpr int kPipeBytes = kStages * 2 * kStageElems * static_cast<int>(sizeof(T));
  static constexpr int kMergeBytes = kStates * R * DC * static_cast<int>(sizeof(float));
  static constexpr int kSmemBytes = kPipeBytes > kMergeBytes ? kPipeBytes : kMergeBytes;
  // q and acc (2 * R * kElems floats) stay in registers; k / v rows only pass through them.
  // 4 blocks per SM (<= 128 registers) spill from 16 floats per row set up (R=4 x 8 elements
  // spills ~150 bytes): those take 3 (<= 168 registers; 72 KB still in flight per SM).
  static constexpr int kMinBlocks = R * kElems >= 16 ? 3 : 4;
  static_assert(kStageKeys * kRowVecs % kThreads == 0, "a stage must split evenly over threads");
  static_assert(kSmemBytes <= 48 * 1024, "static shared memory is limited to 48 KB");
};

template <typename scalar_t, int DC, int R>
__global__ void __launch_bounds__(kThreads, (Tile<scalar_t, DC, R>::kMinBlocks))
    decode_partial_kernel(DecodeGeometry g, const scalar_t* __restrict__ q,
                          const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                          scalar_t* __restrict__ out, float* __restrict__ lse,
                          float* __restrict__ part_o, float* __restrict__ part_lse, int splits,
                          int64_t chunk_len, int row_chunks, bool vec_ok) {
  using Sh = Tile<scalar_t, DC, R>;
  constexpr int kVec = Sh::kVec, kLanes = Sh::kLanes, kNV = Sh::kNV, kSlots = Sh::kSlots;
  constexpr int kRowVecs = Sh::kRowVecs, kElems = Sh::kElems, U = Sh::kU;
  constexpr int kStepKeys = Sh::kStepKeys, TK = Sh::kStageKeys, kStates = Sh::kStates;
  // The pipeline's stages ([kStages][TK][DC] of k, then of v); after the loop the same bytes
  // hold the slots' partial outputs for the final merge ([kStates][R][DC] floats).
  __shared__ __align__(16) unsigned char smem[Sh::kSmemBytes];
  __shared__ float sm_m[kStates][R];
  __shared__ float sm_l[kStates][R];
  scalar_t* const sk = reinterpret_cast<scalar_t*>(smem);
  scalar_t* const sv = sk + kStages * Sh::kStageElems;

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
  const KeyRange chunk = chunk_keys(split, g.k_len, chunk_len);
  const float q_scale = static_cast<float>(g.scale) * kLog2e;

  // Per row: the visible keys as offsets from chunk.lo (no memory access: the copies start
  // before q is loaded). keys_lo / keys_hi: their union, the same in every thread.
  int lo[R], hi[R];
  int keys_lo = static_cast<int>(chunk.hi - chunk.lo), keys_hi = 0;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    lo[r] = hi[r] = 0;
    const int row = r0 + r;
    if (row < rows) {
      const int64_t token = row % g.q_len;
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
  const int stages = keys_hi > keys_lo ? (keys_hi - keys_lo + TK - 1) / TK : 0;

  const scalar_t* kb = k + b * g.k_stride[0] + hkv * g.k_stride[1] + chunk.lo * g.k_stride[2];
  const scalar_t* vb = v + b * g.v_stride[0] + hkv * g.v_stride[1] + chunk.lo * g.v_stride[2];
  // Stage `stage` holds keys keys_lo + stage * TK + [0, TK) in buffer stage % kStages; thread
  // copy c takes vector i % kRowVecs of key i / kRowVecs (i = c * kThreads + tid), so a warp
  // copies whole consecutive rows.
  auto issue = [&](int stage) {
    const int buf = stage % kStages;
    const int base = keys_lo + stage * TK;
#pragma unroll
    for (int c = 0; c < Sh::kCopies; ++c) {
      const int i = c * kThreads + static_cast<int>(threadIdx.x);
      const int key = i / kRowVecs, first = (i % kRowVecs) * kVec;
      const int j = base + key;
      const bool valid = j < keys_hi;
      const int offset = (buf * TK + key) * DC + first;
      copy16(sk + offset, kb + static_cast<int64_t>(j) * g.k_stride[2], first, d, vec_ok, valid);
      copy16(sv + offset, vb + static_cast<int64_t>(j) * g.v_stride[2], first, d, vec_ok, valid);
    }
  };
  // Prologue: stages 0 .. kStages-2 in flight (one commit group per stage, empty past the end,
  // so the group count stays stage-aligned).
#pragma unroll
  for (int stage = 0; stage < kStages - 1; ++stage) {
    if (stage < stages) issue(stage);
    cp_async_commit();
  }

  // Per row: the lane's slice of q and the online-softmax state.
  float qr[R][kElems], acc[R][kElems], m[R], l[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
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
    }
  }

  for (int t = 0; t < stages; ++t) {
    // Groups committed so far: kStages - 1 + t; at most kStages - 2 pending means stage t is
    // complete for this thread; the barrier makes every thread's copies visible, and tells
    // that everyone is done with the buffer of stage t - 1, which stage t + kStages - 1 reuses.
    cp_async_wait<kStages - 2>();
    __syncthreads();
    if (t + kStages - 1 < stages) issue(t + kStages - 1);
    cp_async_commit();

    const int first_key = warp * kStepKeys;  // the warp's keys in the stage
    const int j0 = keys_lo + t * TK + first_key;  // ... as offsets from chunk.lo
    if (j0 >= keys_hi) continue;  // uniform over the warp; no barrier until the next stage
    const scalar_t* ks = sk + (t % kStages) * Sh::kStageElems + first_key * DC;
    const scalar_t* vs = sv + (t % kStages) * Sh::kStageElems + first_key * DC;
    Vec16<scalar_t> kr[U][kNV], vr[U][kNV];
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int n = 0; n < kNV; ++n) {
        const int at = (u * kSlots + slot) * DC + (n * kLanes + sl) * kVec;
        kr[u][n] = *reinterpret_cast<const Vec16<scalar_t>*>(ks + at);
        vr[u][n] = *reinterpret_cast<const Vec16<scalar_t>*>(vs + at);
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
      // Past the shuffles, slots may diverge: a slot none of whose keys in this stage is
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
  cp_async_wait<0>();  // only empty groups can remain; the barrier below frees the buffers
  __syncthreads();

  // Merge the slots' and warps' partial results through shared memory.
  float (*sm_acc)[R][DC] = reinterpret_cast<float (*)[R][DC]>(smem);
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

// Block-wide max / sum of one value per thread; every thread gets the same result (a fixed
// shuffle tree, then the warps in order: deterministic). `scratch` holds one float per warp
// and must not be reused by another reduction before a barrier.
template <bool MAX>
__device__ __forceinline__ float block_reduce(float x, float* scratch) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const float y = __shfl_xor_sync(kFullMask, x, offset);
    x = MAX ? fmaxf(x, y) : x + y;
  }
  if (threadIdx.x % kWarp == 0) scratch[threadIdx.x / kWarp] = x;
  __syncthreads();
  float result = scratch[0];
#pragma unroll
  for (int w = 1; w < kMergeThreads / kWarp; ++w)
    result = MAX ? fmaxf(result, scratch[w]) : result + scratch[w];
  return result;
}

template <int VEC>
struct FloatVec {
  float v[VEC];
};

template <int VEC>
__device__ __forceinline__ FloatVec<VEC> load_floats(const float* p) {
  FloatVec<VEC> x;
  if constexpr (VEC == 4) {
    const float4 y = *reinterpret_cast<const float4*>(p);
    x.v[0] = y.x;
    x.v[1] = y.y;
    x.v[2] = y.z;
    x.v[3] = y.w;
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) x.v[e] = p[e];
  }
  return x;
}

// One block per query row: out = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M), M = max lse_s
// (part_lse in the log2 domain). VEC = 4: the row's o vectors are read as float4 (head_dim % 4
// == 0), else element by element. Threads (split group g, column unit c) sum splits g,
// g + groups, ... of unit c; the groups are then added in order.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kMergeThreads)
    decode_merge_kernel(DecodeGeometry g, const float* __restrict__ part_o,
                        const float* __restrict__ part_lse, int splits,
                        scalar_t* __restrict__ out, float* __restrict__ lse) {
  __shared__ float sm_w[kMaxSplits];
  __shared__ float sm_max[kMergeThreads / kWarp];
  __shared__ float sm_total[kMergeThreads / kWarp];
  __shared__ float sm_sum[kMergeThreads * VEC];
  const int64_t row = blockIdx.x;
  const int tid = threadIdx.x;
  const float* row_lse = part_lse + row * splits;
  const int d = static_cast<int>(g.head_dim);
  const int units = d / VEC;                 // column units of a split's row (<= 256)
  const int groups = kMergeThreads / units;  // split groups (>= 1)
  const int unit = tid % units, grp = tid / units;
  const float* base = part_o + row * splits * d + unit * VEC;

  // Splits s0, s0 + groups, ... (kMergeUnroll of them) of the thread's column unit: loads all
  // issued (predicated) before any is used.
  FloatVec<VEC> x[kMergeUnroll];
  auto load_batch = [&](int s0) {
#pragma unroll
    for (int i = 0; i < kMergeUnroll; ++i) {
      const int s = s0 + i * groups;
      if (s < splits) {
        x[i] = load_floats<VEC>(base + static_cast<int64_t>(s) * d);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) x[i].v[e] = 0.0f;
      }
    }
  };
  // The first batch goes out with the lse loads (it does not need the weights): with up to
  // kMergeUnroll * groups splits (64 for head_dim 128) the row costs one memory round trip.
  if (grp < groups) load_batch(grp);

  // 1. All the row's lse values at once, and their max.
  float local = -INFINITY;
  for (int s = tid; s < splits; s += kMergeThreads) {
    sm_w[s] = row_lse[s];
    local = fmaxf(local, sm_w[s]);
  }
  const float max_lse = block_reduce<true>(local, sm_max);
  // 2. Weights 2^(lse_s - max) (each thread rewrites the entries it loaded) and their sum.
  local = 0.0f;
  for (int s = tid; s < splits; s += kMergeThreads) {
    const float w = weight2(sm_w[s], max_lse);
    sm_w[s] = w;
    local += w;
  }
  const float total = block_reduce<false>(local, sm_total);  // its barrier publishes sm_w
  // 3. Weighted sum of the splits' outputs, each thread in increasing split order.
  float acc[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) acc[e] = 0.0f;
  if (grp < groups) {
    for (int s0 = grp;;) {
#pragma unroll
      for (int i = 0; i < kMergeUnroll; ++i) {
        const int s = s0 + i * groups;
        if (s >= splits) break;
        const float w = sm_w[s];
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[e] += w != 0.0f ? w * x[i].v[e] : 0.0f;
      }
      s0 += kMergeUnroll * groups;
      if (s0 >= splits) break;
      load_batch(s0);
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e) sm_sum[grp * d + unit * VEC + e] = acc[e];
  }
  __syncthreads();
  const float inv = total > 0.0f ? 1.0f / total : 0.0f;
  const int64_t t = row % g.q_len, h = (row / g.q_len) % g.q_heads;
  const int64_t b = row / (g.q_len * g.q_heads);
  scalar_t* o = out + b * g.out_stride[0] + h * g.out_stride[1] + t * g.out_stride[2];
  for (int col = tid; col < d; col += kMergeThreads) {
    float value = 0.0f;
    for (int grp_i = 0; grp_i < groups; ++grp_i) value += sm_sum[grp_i * d + col];
    o[col] = static_cast<scalar_t>(value * inv);
  }
  if (tid == 0) lse[row] = total > 0.0f ? (max_lse + log2f(total)) * kLn2 : -INFINITY;
}

int multiprocessors(int device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return std::max(count, 1);
}

// How the keys are cut: `splits` chunks of `chunk` keys (the last may be shorter or empty).
struct SplitPlan {
  int64_t splits;
  int64_t chunk;
};

// `blocks`: blocks per split; `slots`: blocks resident on the GPU at once; `stage_keys`: keys
// per pipeline stage. A requested count is honoured (capped at k_len and kMaxSplits). Auto:
// the chunk is a whole number of stages, at least kMinStagesPerSplit, and the split count the
// smallest whose blocks fill their waves to >= 90% (blocks * splits over whole waves of
// `slots`), else the one that fills them best: a batch that leaves SMs idle or runs a short
// last wave is split further, one whose waves are already full is not split.
SplitPlan plan_splits(const DecodeGeometry& g, int64_t blocks, int64_t slots, int64_t requested,
                      int64_t stage_keys) {
  const int64_t tk = g.k_len;
  if (tk == 0) return {1, 1};
  if (requested > 0) {
    const int64_t splits = std::min<int64_t>({requested, tk, kMaxSplits});
    return {splits, split_chunk(tk, splits)};
  }
  const int64_t most =
      std::clamp<int64_t>(tk / (kMinStagesPerSplit * stage_keys), 1, kMaxSplits);
  SplitPlan best{1, tk};
  double best_fill = 0.0;
  for (int64_t want = 1; want <= most; ++want) {
    const int64_t chunk = (split_chunk(tk, want) + stage_keys - 1) / stage_keys * stage_keys;
    const int64_t splits = split_chunk(tk, chunk);  // ceil(tk / chunk) <= want
    const int64_t total = blocks * splits;
    const double fill =
        static_cast<double>(total) / static_cast<double>((total + slots - 1) / slots * slots);
    if (fill > best_fill + 1e-9) {
      best = {splits, chunk};
      best_fill = fill;
    }
    if (fill >= 0.9) break;
  }
  return best;
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

// Resident blocks per SM of a kernel (registers and shared memory), asked once per kernel.
template <typename Kernel>
int blocks_per_sm(Kernel kernel, int threads) {
  int count = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&count, kernel, threads, 0));
  return std::max(count, 1);
}

template <typename scalar_t, int DC, int R>
void launch(const DecodeGeometry& g, const at::Tensor& q, const at::Tensor& k,
            const at::Tensor& v, at::Tensor& out, at::Tensor& lse, int64_t requested) {
  using Sh = Tile<scalar_t, DC, R>;
  const auto kernel = decode_partial_kernel<scalar_t, DC, R>;
  static const int per_sm = blocks_per_sm(kernel, kThreads);
  const int64_t rows = g.q_heads / g.kv_heads * g.q_len;
  const int64_t row_chunks = (rows + R - 1) / R;
  const int64_t blocks = g.batch * g.kv_heads * row_chunks;
  const int64_t slots = static_cast<int64_t>(multiprocessors(q.get_device())) * per_sm;
  const SplitPlan plan = plan_splits(g, blocks, slots, requested, Sh::kStageKeys);
  const int64_t splits = plan.splits;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool vec_ok = vector_ok(g, q, k, v, sizeof(scalar_t));
  at::Tensor part_o, part_lse;
  const int64_t all_rows = g.batch * g.q_heads * g.q_len;
  if (splits > 1) {
    part_o = at::empty({all_rows * splits * g.head_dim}, q.options().dtype(at::kFloat));
    part_lse = at::empty({all_rows * splits}, q.options().dtype(at::kFloat));
  }
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(splits));
  kernel<<<grid, kThreads, 0, stream>>>(
      g, q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
      v.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
      lse.mutable_data_ptr<float>(), splits > 1 ? part_o.mutable_data_ptr<float>() : nullptr,
      splits > 1 ? part_lse.mutable_data_ptr<float>() : nullptr, static_cast<int>(splits),
      plan.chunk, static_cast<int>(row_chunks), vec_ok);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1) {
    const auto merge = g.head_dim % 4 == 0 ? decode_merge_kernel<scalar_t, 4>
                                           : decode_merge_kernel<scalar_t, 1>;
    merge<<<static_cast<unsigned>(all_rows), kMergeThreads, 0, stream>>>(
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
