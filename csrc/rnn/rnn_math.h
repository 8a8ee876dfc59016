// Gate math of the fused RNN layers (LSTM, GRU, tanh / ReLU Elman RNN), forward and backward,
// shared by the CPU kernels (csrc/rnn/rnn.cpp) and the CUDA kernels (csrc/rnn/rnn.cu).
// Everything here is __host__ __device__, so the CPU build that CI runs exercises the exact
// formulas the GPU runs; only exp() differs (hardware expf on the GPU, a vectorizable
// polynomial on the CPU, see fast_exp).
//
// Notation (one layer, one direction, one time step, one batch row, unit j of H; G = gates*H):
// the layer leaves in the row's saved slots `ws` the pre-activations x W_ih^T + h_{t-1} W_hh^T
// (GEMMs accumulating in place; the GRU's recurrent part goes to a separate buffer gh) and
// the fused forward kernel adds the biases and replaces them, in place, by what backward needs
// (b = b_ih + b_hh folded, except the GRU's n gate: b = b_in, b_hn kept apart):
//
//   LSTM  ws in  [x W_i + h U_i, .._f, .._g, .._o, -]
//         i = sig(ws_i + b_i)  f = sig(ws_f + b_f)  g = tanh(ws_g + b_g)  o = sig(ws_o + b_o)
//         c = f * c_prev + i * g;   h_raw = o * tanh(c)    (h = h_raw W_hr^T with projections)
//         ws out [i, f, g, o, c_prev]                                        (5H per row)
//   GRU   ws in  [x W_r, x W_z, x W_n, -]   and gh = h U^T = [h U_r, h U_z, h U_n] (one GEMM
//         into a separate (n, 3H) buffer: the reset gate scales h U_n alone)
//         r = sig(ws_r + gh_r + b_r)  z = sig(ws_z + gh_z + b_z)  hn = gh_n + b_hn
//         n = tanh(ws_n + b_n + r hn);  h = (1 - z) * n + z * h_prev (torch.nn.GRU / cuDNN)
//         ws out [r, z, n, hn]                                                (4H per row)
//   RNN   h = tanh(ws + b) or relu(ws + b);   ws out [h]                     (H per row)
//
// Backward of one step takes dh (gradient w.r.t. this step's h_raw, i.e. dh_next + dy, brought
// back through W_hr when projecting) and, for LSTM, dc (gradient w.r.t. c from step t+1), and
// produces the pre-activation gradients dG (G) from which the layer forms
//   dh_prev = dG_h W_hh,  dW_hh += dG_h^T h_prev,  dW_ih += dG_i^T x,  dx = dG_i W_ih
// where dG_i = dG_h = dG except for the GRU n gate (dG_h,n = dG_i,n * r). The dG are stored in
// the GEMM operand type L (T itself for fp32 / fp64 layers; fp16 / bf16 for half-precision
// layers, whose GEMMs take half-precision operands and accumulate in fp32):
//   LSTM  dc_tot = dc + dh * o * (1 - tanh(c)^2);  dc_prev = dc_tot * f
//         d_i = dc_tot * g * i(1-i)  d_f = dc_tot * c_prev * f(1-f)  d_g = dc_tot * i * (1-g^2)
//         d_o = dh * tanh(c) * o(1-o)
//   GRU   d_n = dh * (1-z) * (1-n^2);  d_z = dh * (h_prev - n) * z(1-z);
//         d_r = d_n * (gh_n + b_hn) * r(1-r);  dG_h,n = d_n * r;  dh_prev (direct) = dh * z
//   RNN   d = dh * (1 - h^2) (tanh) or dh * [h > 0] (relu)
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../common/fast_exp.h"

#ifdef __CUDACC__
#define TURBOLM_RNN_HD __host__ __device__ __forceinline__
#else
// always_inline: the per-unit math must melt into the row loops for GCC to vectorize them.
#define TURBOLM_RNN_HD inline __attribute__((always_inline))
#endif

namespace turbolm::rnn {

enum Mode : int { kLSTM = 0, kGRU = 1, kRNNTanh = 2, kRNNRelu = 3 };

// Gate blocks per unit and saved values per (row, unit).
TURBOLM_RNN_HD int gates_of(int mode) { return mode == kLSTM ? 4 : mode == kGRU ? 3 : 1; }
TURBOLM_RNN_HD int saved_of(int mode) { return mode == kLSTM ? 5 : mode == kGRU ? 4 : 1; }

// ---- scalar functions --------------------------------------------------------------------

// fast_exp (vectorizable float exp for the CPU kernels): csrc/common/fast_exp.h

TURBOLM_RNN_HD float acc_exp(float x) {
#ifdef __CUDA_ARCH__
  return ::expf(x);
#else
  return fast_exp(x);
#endif
}

TURBOLM_RNN_HD double acc_exp(double x) { return ::exp(x); }

template <typename T>
TURBOLM_RNN_HD T sigmoid(T x) {
  return T(1) / (T(1) + acc_exp(-x));
}

// tanh(x) = sign(x) (1 - 2 / (e^{2|x|} + 1)): absolute error ~1 ulp of 1 near 0, exact-ish
// saturation for large |x| (e^{2|x|} overflows to the clamp, giving 1).
TURBOLM_RNN_HD float tanh_acc(float x) {
#ifdef __CUDA_ARCH__
  return ::tanhf(x);
#else
  const float a = x < 0.0f ? -x : x;
  const float t = 1.0f - 2.0f / (acc_exp(2.0f * a) + 1.0f);
  return x < 0.0f ? -t : t;
#endif
}

TURBOLM_RNN_HD double tanh_acc(double x) { return ::tanh(x); }

// ---- per-unit forward --------------------------------------------------------------------
//
// Each function computes unit j of one batch row, in place on the row's saved slots `ws`
// (pre-activations in, saved values out; see the notation above). `b` is the folded bias row
// (G values, zeros without biases). In-place use of c is safe: unit j reads before it writes.

template <typename T>
TURBOLM_RNN_HD void lstm_fwd_unit(int64_t j, int64_t H, const T* b, T* ws, T* c, T* h_raw) {
  const T i = sigmoid(ws[j] + b[j]);
  const T f = sigmoid(ws[H + j] + b[H + j]);
  const T g = tanh_acc(ws[2 * H + j] + b[2 * H + j]);
  const T o = sigmoid(ws[3 * H + j] + b[3 * H + j]);
  const T c_prev = c[j];
  const T c_new = f * c_prev + i * g;
  ws[j] = i;
  ws[H + j] = f;
  ws[2 * H + j] = g;
  ws[3 * H + j] = o;
  ws[4 * H + j] = c_prev;
  c[j] = c_new;
  h_raw[j] = o * tanh_acc(c_new);
}

// gh: the row's recurrent projections h_{t-1} U^T (3H); b_hn: the GRU's hidden bias of the n
// gate (zeros without biases). Returns h_t.
template <typename T>
TURBOLM_RNN_HD T gru_fwd_unit(int64_t j, int64_t H, const T* b, const T* b_hn, T h_prev,
                              const T* gh, T* ws) {
  const T r = sigmoid(ws[j] + gh[j] + b[j]);
  const T z = sigmoid(ws[H + j] + gh[H + j] + b[H + j]);
  const T hn = gh[2 * H + j] + b_hn[j];
  const T n = tanh_acc(ws[2 * H + j] + b[2 * H + j] + r * hn);
  ws[j] = r;
  ws[H + j] = z;
  ws[2 * H + j] = n;
  ws[3 * H + j] = hn;
  return (T(1) - z) * n + z * h_prev;
}

template <typename T>
TURBOLM_RNN_HD T rnn_fwd_unit(int64_t j, const T* b, bool relu, T* ws) {
  const T pre = ws[j] + b[j];
  const T h = relu ? (pre > T(0) ? pre : T(0)) : tanh_acc(pre);
  ws[j] = h;
  return h;
}

// ---- per-unit backward -------------------------------------------------------------------

// dh: gradient w.r.t. h_raw (unit j); dc in: dL/dc_t from step t+1, out: dL/dc_{t-1}.
// dg: the row's G pre-activation gradients (input and hidden sides are equal for LSTM).
template <typename T, typename L>
TURBOLM_RNN_HD void lstm_bwd_unit(int64_t j, int64_t H, T dh, const T* ws, T* dc, L* dg) {
  const T i = ws[j], f = ws[H + j], g = ws[2 * H + j], o = ws[3 * H + j], c_prev = ws[4 * H + j];
  const T tc = tanh_acc(f * c_prev + i * g);
  const T dct = dc[j] + dh * o * (T(1) - tc * tc);
  dg[j] = dct * g * i * (T(1) - i);
  dg[H + j] = dct * c_prev * f * (T(1) - f);
  dg[2 * H + j] = dct * i * (T(1) - g * g);
  dg[3 * H + j] = dh * tc * o * (T(1) - o);
  dc[j] = dct * f;
}

// Writes the input-side (dgi) and hidden-side (dgh) pre-activation gradients; returns the
// direct part of dh_prev (dh * z); the rest comes from dgh W_hh.
template <typename T, typename L>
TURBOLM_RNN_HD T gru_bwd_unit(int64_t j, int64_t H, T dh, const T* ws, T h_prev, L* dgi, L* dgh) {
  const T r = ws[j], z = ws[H + j], n = ws[2 * H + j], hn = ws[3 * H + j];
  const T dn = dh * (T(1) - z) * (T(1) - n * n);
  const T dz = dh * (h_prev - n) * z * (T(1) - z);
  const T dr = dn * hn * r * (T(1) - r);
  dgi[j] = dr;
  dgi[H + j] = dz;
  dgi[2 * H + j] = dn;
  dgh[j] = dr;
  dgh[H + j] = dz;
  dgh[2 * H + j] = dn * r;
  return dh * z;
}

template <typename T>
TURBOLM_RNN_HD T rnn_bwd_unit(int64_t j, T dh, const T* ws, bool relu) {
  const T h = ws[j];
  return relu ? (h > T(0) ? dh : T(0)) : dh * (T(1) - h * h);
}

// ---- one time step of one direction: the arguments of the fused gate kernels ------------
//
// T: the state / math type (float, or double for fp64 layers). L: the type of the GEMM
// operands (T itself, or c10::Half / c10::BFloat16 for half-precision layers).

// Forward step over rows [0, n). `ws` holds the rows' pre-activations (see the notation);
// `h` is the (n, P) state h_{t-1} (row stride P), copied to `hprev` (saved for dW_hh) and,
// without projections, overwritten with h_t (and, when L != T, rounded into `h_lp`, the
// operand of the next step's recurrent GEMM). `out` (row stride out_ld) receives h_t (no
// projection: the layer output y) or h_raw (projection: the caller multiplies it by W_hr^T
// into `h` and y).
template <typename T, typename L = T>
struct FwdStep {
  const T* bias;  // (G,) folded biases (zeros without biases)
  const T* b_hn;  // GRU: (H,) (zeros without biases)
  const T* gh;    // GRU: (n, 3H) contiguous recurrent projections h_{t-1} U^T
  T* h;           // (n, P) state, in/out
  L* h_lp;        // (n, P) h_t in the GEMM type (L != T and no projection only)
  T* c;           // LSTM: (n, H) cell state, in/out
  T* hprev;       // (n, P) saved h_{t-1}
  T* ws;          // (n, S * H): pre-activations in, saved gate values out
  T* out;         // (n, H) rows of stride out_ld
  int64_t out_ld;
  int64_t n, H, P;
  int mode;
  bool proj;
};

// Backward step over rows [0, n). dh = dh_in (+ dy when dy != nullptr), both (n, H) with the
// given row strides. Writes dgi (n, G; row stride dgi_ld), for the GRU dgh (n, G contiguous)
// and dh_in := dh * z (the direct part of dh_prev); for the LSTM updates dc in place.
template <typename T, typename L = T>
struct BwdStep {
  T* dh_in;  // (n, H) row stride dh_ld; GRU: overwritten with dh * z
  int64_t dh_ld;
  const T* dy;  // (n, H) row stride dy_ld, or nullptr
  int64_t dy_ld;
  const T* ws;     // (n, S * H)
  const T* hprev;  // (n, P) (GRU: h_prev)
  T* dc;           // LSTM: (n, H) in/out
  L* dgi;          // (n, G) row stride dgi_ld
  int64_t dgi_ld;
  L* dgh;  // GRU: (n, G) contiguous
  int64_t n, H, P;
  int mode;
};

// The whole forward time loop of one direction (no projection, no padding), for a device
// that runs it in one launch (the CUDA persistent kernel): ws (T, B, S*H) holds the input
// projections on entry and the saved values on exit; h / h_lp / c (B, H) hold h_0 / c_0 on
// entry and h_T / c_T on exit; hprev (T, B, H) receives h_{t-1}; y (row stride y_ld, time
// stride B * y_ld) h_t; steps = T. w_hh: (G, H) row-major in the GEMM type. Backward runs step by step.
template <typename T, typename L = T>
struct SeqFwd {
  const T* bias;
  const T* b_hn;
  const L* w_hh;
  T* ws;
  T* h;
  L* h_lp;  // nullptr unless L != T
  T* c;
  T* hprev;
  T* y;
  int64_t y_ld;
  int64_t steps, B, H;
  int mode;
  bool reverse;
};

// ---- rows: serial loops over the units of one batch row ---------------------------------
//
// The CPU kernels call these per row; the CUDA kernels compute the same units one thread
// each. The pointer arguments are __restrict__ (GCC honours restrict on parameters, not on
// local pointers), which lets GCC vectorize the loops without runtime alias checks.

template <typename T>
TURBOLM_RNN_HD void lstm_fwd_row(int64_t H, const T* __restrict__ b, T* __restrict__ ws,
                                 T* __restrict__ c, T* __restrict__ out) {
  for (int64_t j = 0; j < H; ++j) lstm_fwd_unit(j, H, b, ws, c, out);
}

template <typename T>
TURBOLM_RNN_HD void gru_fwd_row(int64_t H, const T* __restrict__ b, const T* __restrict__ b_hn,
                                const T* __restrict__ hp, const T* __restrict__ gh,
                                T* __restrict__ ws, T* __restrict__ out) {
  for (int64_t j = 0; j < H; ++j) out[j] = gru_fwd_unit(j, H, b, b_hn, hp[j], gh, ws);
}

template <bool RELU, typename T>
TURBOLM_RNN_HD void rnn_fwd_row(int64_t H, const T* __restrict__ b, T* __restrict__ ws,
                                T* __restrict__ out) {
  for (int64_t j = 0; j < H; ++j) out[j] = rnn_fwd_unit(j, b, RELU, ws);
}

template <typename S, typename D>
TURBOLM_RNN_HD void copy_row(int64_t n, const S* __restrict__ src, D* __restrict__ dst) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<D>(src[j]);
}

// dh (+ dy when HAS_DY) -> dg and dc (in place).
template <bool HAS_DY, typename T, typename L>
TURBOLM_RNN_HD void lstm_bwd_row(int64_t H, const T* __restrict__ dh, const T* __restrict__ dy,
                                 const T* __restrict__ ws, T* __restrict__ dc,
                                 L* __restrict__ dg) {
  for (int64_t j = 0; j < H; ++j) lstm_bwd_unit(j, H, HAS_DY ? dh[j] + dy[j] : dh[j], ws, dc, dg);
}

// dh (+ dy) -> dgi, dgh, and dh_direct = dh * z (may alias dh: separate parameters, no
// restrict on them).
template <bool HAS_DY, typename T, typename L>
TURBOLM_RNN_HD void gru_bwd_row(int64_t H, const T* dh, const T* __restrict__ dy,
                                const T* __restrict__ ws, const T* __restrict__ hp,
                                L* __restrict__ dgi, L* __restrict__ dgh, T* dh_direct) {
  for (int64_t j = 0; j < H; ++j)
    dh_direct[j] = gru_bwd_unit(j, H, HAS_DY ? dh[j] + dy[j] : dh[j], ws, hp[j], dgi, dgh);
}

template <bool HAS_DY, bool RELU, typename T, typename L>
TURBOLM_RNN_HD void rnn_bwd_row(int64_t H, const T* __restrict__ dh, const T* __restrict__ dy,
                                const T* __restrict__ ws, L* __restrict__ dg) {
  for (int64_t j = 0; j < H; ++j) dg[j] = rnn_bwd_unit(j, HAS_DY ? dh[j] + dy[j] : dh[j], ws, RELU);
}

// One batch row of a forward step.
template <int MODE, bool PROJ, typename T, typename L>
TURBOLM_RNN_HD void fwd_row(const FwdStep<T, L>& s, int64_t b) {
  const int64_t H = s.H, P = s.P, S = saved_of(MODE) * H;
  T* h = s.h + b * P;
  T* hp = s.hprev + b * P;
  T* ws = s.ws + b * S;
  T* out = s.out + b * s.out_ld;
  copy_row(P, static_cast<const T*>(h), hp);  // save h_{t-1}; the GRU reads it from hp
  if (MODE == kLSTM) {
    lstm_fwd_row(H, s.bias, ws, s.c + b * H, out);
  } else if (MODE == kGRU) {
    gru_fwd_row(H, s.bias, s.b_hn, static_cast<const T*>(hp), s.gh + b * 3 * H, ws, out);
  } else {
    rnn_fwd_row<MODE == kRNNRelu>(H, s.bias, ws, out);
  }
  if (!PROJ) {
    copy_row(H, static_cast<const T*>(out), h);
    if constexpr (!std::is_same_v<T, L>) copy_row(H, static_cast<const T*>(out), s.h_lp + b * P);
  }
}

// One batch row of a backward step.
template <int MODE, bool HAS_DY, typename T, typename L>
TURBOLM_RNN_HD void bwd_row(const BwdStep<T, L>& s, int64_t b) {
  const int64_t H = s.H, S = saved_of(MODE) * H, G = gates_of(MODE) * H;
  T* dh = s.dh_in + b * s.dh_ld;
  const T* dy = HAS_DY ? s.dy + b * s.dy_ld : nullptr;
  const T* ws = s.ws + b * S;
  L* dgi = s.dgi + b * s.dgi_ld;
  if (MODE == kLSTM) {
    lstm_bwd_row<HAS_DY>(H, dh, dy, ws, s.dc + b * H, dgi);
  } else if (MODE == kGRU) {
    gru_bwd_row<HAS_DY>(H, dh, dy, ws, s.hprev + b * s.P, dgi, s.dgh + b * G, dh);
  } else {
    rnn_bwd_row<HAS_DY, MODE == kRNNRelu>(H, dh, dy, ws, dgi);
  }
}

}  // namespace turbolm::rnn
