// One recurrent layer (all directions) over a whole sequence: the time loop shared by the CPU
// (rnn.cpp) and CUDA (rnn.cu) implementations of turbolm::rnn_layer_fwd / rnn_layer_bwd.
//
// Algorithm (per layer; D directions; T steps; B batch; G = gates * H; P = proj_size or H)
// ---------------------------------------------------------------------------------------
// Forward, per direction:
//   1. x W_ih^T for every step at once: ONE GEMM (T*B, I) x (I, G), written straight into the
//      pre-activation slots of the saved buffer `ws` (D, T, B, S*H) (rnn_math.h notation).
//   2. per step (reverse direction: t = T-1 .. 0):
//        ws[t] += h_{t-1} W_hh^T              one GEMM (n_t, P) x (P, G), accumulating in place
//                                             (GRU: gh = h_{t-1} W_hh^T into a (B, 3H) buffer)
//        fused gate kernel (K::fwd)           biases, activations, cell update, in place on
//                                             ws[t]; saves h_{t-1} (`hprev`) and writes h_t
//        [LSTM proj: h = h_raw W_hr^T         one small GEMM (n_t, H) x (H, P); h_raw saved]
// Backward (time reversed), per direction and step: the fused gate-gradient kernel (K::bwd)
// -> dG, then dh_prev = dG_h W_hh (one GEMM; [proj: first dh_raw = dh W_hr]). After the loop,
// single GEMMs over all steps: dx = dG_i W_ih (both directions at once), dW_ih = dG_i^T x,
// dW_hh = dG_h^T h_prev, dW_hr = dh^T h_raw; biases = column sums of dG.
//
// Per step and direction the host issues exactly one GEMM and one kernel, forward and backward
// (projections add a GEMM and a copy or two); the GEMMs are called with raw pointers
// (K::gemm: cuBLAS on CUDA, oneDNN's brgemm on CPU) and write into buffers allocated once per
// call, so the loop allocates nothing and builds no tensor views.
//
// Dtypes: states, cell, gate math and saved activations in fp32 (fp64 for fp64). The GEMMs
// take their operands in the GEMM type L: fp16 / bf16 for half-precision layers (x, the
// weights, a rounded copy of the running h and the dG; the products accumulate and are written
// in fp32), the compute type otherwise. The projection (W_hr) GEMMs stay in the compute type.
//
// K may replace a direction's whole forward loop by one launch (K::fwd_sequence returns true:
// the CUDA persistent kernel) and wraps each direction's step loop in K::run_steps (the CUDA
// backend may record it into a CUDA graph keyed on the sizes and raw pointers listed there:
// the first 12 key entries are sizes and flags, the rest pointers; the CPU runs it as is).
//
// K supplies the device part: check_device, Guard, the fused kernels fwd / bwd, step_weight
// (a weight in the form its gemm takes, once per call: never cached across calls, ZeRO-3 may
// swap the parameters) and the GEMMs gemm (raw row-major matrices, optionally accumulating),
// mm (a @ b) and linear (a @ w^T), the last two on tensors, into a fresh tensor in the compute
// type.
//
// Variable lengths: the batch is permuted once so that lengths decrease (a stable sort; no
// permutation when already sorted); then the rows active at step t are a prefix [0, n_t) and
// every GEMM and kernel of that step runs on n_t rows only, so padded steps cost nothing.
// Padded outputs are zero and padded rows keep their state, which leaves each row's final
// state in the state buffer at the end (PackedSequence semantics). Saved tensors stay in the
// sorted order; backward recomputes the same permutation from `lengths` (lengths go to the
// host once per call: a device sync when they live on the GPU).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <numeric>
#include <string>
#include <tuple>
#include <vector>

#include "../common/alloc.h"
#include "../common/checks.h"
#include "rnn_math.h"

namespace turbolm::rnn {

inline int parse_mode(const char* op, const std::string& mode) {
  if (mode == "lstm") return kLSTM;
  if (mode == "gru") return kGRU;
  if (mode == "rnn_tanh") return kRNNTanh;
  if (mode == "rnn_relu") return kRNNRelu;
  TURBOLM_CHECK(InputError, false, "mode must be one of lstm, gru, rnn_tanh, rnn_relu, got '",
                mode, "'");
  return -1;
}

// Sizes of one layer call, read off (and checked against) the arguments.
struct Layer {
  int mode;
  int64_t T, B, I, H, P, G, S, D, per_dir;
  bool has_biases, proj;
  // weights[index(d, k)]: k = 0 w_ih, 1 w_hh, 2 b_ih, 3 b_hh, 4 w_hr (torch.nn order).
  int64_t w_ih(int64_t d) const { return d * per_dir; }
  int64_t w_hh(int64_t d) const { return d * per_dir + 1; }
  int64_t b_ih(int64_t d) const { return d * per_dir + 2; }
  int64_t b_hh(int64_t d) const { return d * per_dir + 3; }
  int64_t w_hr(int64_t d) const { return d * per_dir + (has_biases ? 4 : 2); }
};

inline void check_weight(const char* op, const at::Tensor& w, const at::Tensor& x, int64_t index,
                         std::vector<int64_t> shape) {
  TURBOLM_CHECK(DTypeError, w.scalar_type() == x.scalar_type(), "weights[", index,
                "] must have x's dtype (", dtype_str(x.scalar_type()), "), got ",
                dtype_str(w.scalar_type()));
  TURBOLM_CHECK(DeviceError, w.device() == x.device(), "weights[", index, "] must be on x's device (",
                x.device(), "), got ", w.device());
  TURBOLM_CHECK(ShapeError, w.sizes() == c10::IntArrayRef(shape), "weights[", index,
                "] must have shape ", shape_str(shape), ", got ", shape_str(w.sizes()));
}

inline Layer check_layer(const char* op, const at::Tensor& x, const at::Tensor& h0,
                         const std::optional<at::Tensor>& c0,
                         const std::optional<at::Tensor>& lengths,
                         const std::vector<at::Tensor>& weights, const std::string& mode_name,
                         int64_t proj_size, bool has_biases, bool bidirectional) {
  Layer L{};
  L.mode = parse_mode(op, mode_name);
  L.D = bidirectional ? 2 : 1;
  L.has_biases = has_biases;
  L.proj = proj_size > 0;
  TURBOLM_CHECK(InputError, proj_size >= 0, "proj_size must be >= 0, got ", proj_size);
  TURBOLM_CHECK(InputError, !L.proj || L.mode == kLSTM, "proj_size > 0 needs mode lstm");
  L.per_dir = 2 + (has_biases ? 2 : 0) + (L.proj ? 1 : 0);
  TURBOLM_CHECK(InputError, static_cast<int64_t>(weights.size()) == L.D * L.per_dir,
                "weights must hold ", L.D * L.per_dir, " tensors (", L.D, " direction(s) of ",
                L.per_dir, "), got ", weights.size());
  CHECK_FLOAT(x);
  CHECK_DIM(x, 3);
  L.T = x.size(0);
  L.B = x.size(1);
  L.I = x.size(2);
  TURBOLM_CHECK(ShapeError, L.T > 0, "x must have at least one time step, got shape ",
                shape_str(x.sizes()));
  const int gates = gates_of(L.mode);
  const at::Tensor& w_hh0 = weights[1];
  TURBOLM_CHECK(ShapeError, w_hh0.dim() == 2 && w_hh0.size(0) > 0 && w_hh0.size(0) % gates == 0,
                "weights[1] (weight_hh) must be (", gates, " * hidden_size, ",
                "hidden_size or proj_size), got ", shape_str(w_hh0.sizes()));
  L.H = w_hh0.size(0) / gates;
  L.G = gates * L.H;
  L.S = saved_of(L.mode);
  L.P = L.proj ? proj_size : L.H;
  for (int64_t d = 0; d < L.D; ++d) {
    check_weight(op, weights[L.w_ih(d)], x, L.w_ih(d), {L.G, L.I});
    check_weight(op, weights[L.w_hh(d)], x, L.w_hh(d), {L.G, L.P});
    if (has_biases) {
      check_weight(op, weights[L.b_ih(d)], x, L.b_ih(d), {L.G});
      check_weight(op, weights[L.b_hh(d)], x, L.b_hh(d), {L.G});
    }
    if (L.proj) check_weight(op, weights[L.w_hr(d)], x, L.w_hr(d), {L.P, L.H});
  }
  CHECK_SAME_DTYPE(h0, x);
  CHECK_SAME_DEVICE(h0, x);
  CHECK_SHAPE(h0, L.D, L.B, L.P);
  if (L.mode == kLSTM) {
    TURBOLM_CHECK(InputError, c0.has_value(), "c0 is required for mode lstm");
    const at::Tensor& c = *c0;
    CHECK_SAME_DTYPE(c, x);
    CHECK_SAME_DEVICE(c, x);
    CHECK_SHAPE(c, L.D, L.B, L.H);
  }
  if (lengths) {
    const at::Tensor& len = *lengths;
    TURBOLM_CHECK(DTypeError, len.scalar_type() == c10::ScalarType::Long,
                  "lengths must be int64, got ", dtype_str(len.scalar_type()));
    CHECK_SHAPE(len, L.B);
  }
  return L;
}

// The batch order of a call with variable lengths: rows sorted by decreasing length, and the
// number of rows still running at each step.
struct Batching {
  std::vector<int64_t> active;  // (T,): rows [0, active[t]) of the sorted batch run step t
  at::Tensor perm;              // sorted row k is original row perm[k]; undefined = identity
  at::Tensor inv;               // original row b is sorted row inv[b]
  bool padded = false;          // some step of some row is padding
};

inline Batching make_batching(const char* op, const std::optional<at::Tensor>& lengths,
                              int64_t T, int64_t B, const c10::Device& device) {
  Batching bt;
  bt.active.assign(T, B);
  if (!lengths || B == 0) return bt;
  const at::Tensor len_cpu = lengths->to(c10::kCPU).contiguous();
  const int64_t* len = len_cpu.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TURBOLM_CHECK(InputError, len[b] >= 1 && len[b] <= T, "lengths must be in [1, ", T,
                  "] (the sequence length), got ", len[b], " at index ", b);
  std::vector<int64_t> order(B);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return len[a] > len[b]; });
  bool identity = true;
  for (int64_t k = 0; k < B; ++k) identity = identity && order[k] == k;
  for (int64_t t = 0; t < T; ++t) {
    int64_t n = 0;
    while (n < B && len[order[n]] > t) ++n;
    bt.active[t] = n;
    bt.padded = bt.padded || n < B;
  }
  if (!identity) {
    at::Tensor perm = at::empty({B}, at::TensorOptions().dtype(c10::kLong));
    at::Tensor inv = at::empty({B}, at::TensorOptions().dtype(c10::kLong));
    int64_t* p = perm.mutable_data_ptr<int64_t>();
    int64_t* q = inv.mutable_data_ptr<int64_t>();
    for (int64_t k = 0; k < B; ++k) {
      p[k] = order[k];
      q[order[k]] = k;
    }
    bt.perm = perm.to(device);
    bt.inv = inv.to(device);
  }
  return bt;
}

// t (along dim `dim`) permuted into the sorted batch order / back to the original order.
inline at::Tensor to_sorted(const Batching& bt, const at::Tensor& t, int64_t dim) {
  return bt.perm.defined() ? t.index_select(dim, bt.perm) : t;
}
inline at::Tensor to_original(const Batching& bt, const at::Tensor& t, int64_t dim) {
  return bt.inv.defined() ? t.index_select(dim, bt.inv) : t;
}

inline c10::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == c10::ScalarType::Double ? c10::ScalarType::Double
                                                     : c10::ScalarType::Float;
}

// The GEMM operand type of a layer: x's own for float16 / bfloat16 (half-precision operands,
// fp32 accumulation and results), the compute type otherwise.
inline c10::ScalarType gemm_type(const at::Tensor& x) {
  const c10::ScalarType t = x.scalar_type();
  return t == c10::ScalarType::Half || t == c10::ScalarType::BFloat16 ? t : acc_type(x);
}

// A row-major matrix: rows x cols, element (i, j) at data[i * ld + j] (ld >= cols). The
// per-step GEMMs take these (no tensor views built per step).
template <typename T>
struct Mat {
  T* data;
  int64_t rows, cols, ld;
};

// A fresh contiguous tensor in dtype `acc` holding t's values (never aliases t).
inline at::Tensor fresh_copy(const at::Tensor& t, c10::ScalarType acc) {
  at::Tensor out = at::empty(t.sizes(), t.options().dtype(acc));
  out.copy_(t);
  return out;
}

inline at::Tensor acc_contig(const at::Tensor& t, c10::ScalarType acc) {
  return t.to(acc).contiguous();
}

// Weights of one layer per direction: W_ih, W_hh in the GEMM type; W_hr, the folded bias (G,)
// (b_ih + b_hh, except the GRU's n gate: b_in only; zeros without biases) and the GRU's b_hn
// (H,) (zeros without biases) in the compute type.
struct LayerWeights {
  std::vector<at::Tensor> w_ih;  // (G, I) each
  std::vector<at::Tensor> w_hh;  // (G, P) each
  std::vector<at::Tensor> w_hr;  // (P, H) each (projections only)
  std::vector<at::Tensor> bias;  // (G,) each
  std::vector<at::Tensor> b_hn;  // (H,) each (GRU only)
  at::Tensor w_ih_cat() const { return w_ih.size() == 1 ? w_ih[0] : at::cat(w_ih, 0); }
};

inline LayerWeights prepare_weights(const Layer& L, const std::vector<at::Tensor>& weights,
                                    c10::ScalarType acc, c10::ScalarType gt) {
  LayerWeights lw;
  const auto opts = weights[0].options().dtype(acc);
  for (int64_t d = 0; d < L.D; ++d) {
    lw.w_ih.push_back(acc_contig(weights[L.w_ih(d)], gt));
    lw.w_hh.push_back(acc_contig(weights[L.w_hh(d)], gt));
    if (L.proj) lw.w_hr.push_back(acc_contig(weights[L.w_hr(d)], acc));
    if (L.has_biases) {
      const at::Tensor b_ih = weights[L.b_ih(d)].to(acc);
      const at::Tensor b_hh = weights[L.b_hh(d)].to(acc);
      at::Tensor b = at::add(b_ih, b_hh);
      if (L.mode == kGRU) {
        b.narrow(0, 2 * L.H, L.H).copy_(b_ih.narrow(0, 2 * L.H, L.H));
        lw.b_hn.push_back(b_hh.narrow(0, 2 * L.H, L.H).contiguous());
      }
      lw.bias.push_back(b);
    } else {
      lw.bias.push_back(at::zeros({L.G}, opts));
      if (L.mode == kGRU) lw.b_hn.push_back(at::zeros({L.H}, opts));
    }
  }
  return lw;
}

// Runs fn(T_{}, L_{}) with T_ the compute type and L_ the GEMM type of a layer.
template <typename Fn>
void dispatch_types(c10::ScalarType acc, c10::ScalarType gt, Fn&& fn) {
  if (acc == c10::ScalarType::Double) {
    fn(double(0), double(0));
  } else if (gt == c10::ScalarType::BFloat16) {
    fn(float(0), c10::BFloat16(0.0f));
  } else if (gt == c10::ScalarType::Half) {
    fn(float(0), c10::Half(0.0f));
  } else {
    fn(float(0), float(0));
  }
}

// ---- forward ------------------------------------------------------------------------------

// Returns (y, h_n, c_n, ws, hprev, hraw); c_n / hraw are (0,) when absent. ws (D, T, B, S*H),
// hprev (D, T, B, P), hraw (D, T, B, H) are in the compute dtype and the sorted batch order.
//
// ws doubles as the pre-activation buffer: the input projections of all steps land in its
// first G slots of every row, each step's recurrent GEMM accumulates into them (GRU: into the
// separate buffer gh, whose n part the reset gate scales), and the fused kernel turns them
// into the saved values in place. No separate (T, B, G) buffer is allocated, written or read.
template <class K>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_forward(
    const char* op, const at::Tensor& x_in, const at::Tensor& h0_in,
    const std::optional<at::Tensor>& c0_in, const std::optional<at::Tensor>& lengths,
    const std::vector<at::Tensor>& weights, const std::string& mode_name, int64_t proj_size,
    bool has_biases, bool bidirectional) {
  const Layer L = check_layer(op, x_in, h0_in, c0_in, lengths, weights, mode_name, proj_size,
                              has_biases, bidirectional);
  K::check_device(op, x_in);
  typename K::Guard guard(x_in.device());
  const int64_t T = L.T, B = L.B, I = L.I, H = L.H, P = L.P, G = L.G, D = L.D, SH = L.S * H;
  const c10::ScalarType acc = acc_type(x_in), gt = gemm_type(x_in);
  const bool lp = gt != acc;  // half-precision GEMM operands
  const auto opts = x_in.options().dtype(acc);
  const Batching bt = make_batching(op, lengths, T, B, x_in.device());

  const at::Tensor x = to_sorted(bt, x_in.to(gt), 1).contiguous();  // (T, B, I)
  const LayerWeights lw = prepare_weights(L, weights, acc, gt);

  at::Tensor h_n = fresh_copy(to_sorted(bt, h0_in, 1), acc);  // (D, B, P): the running state
  // Half precision: the running state rounded to the GEMM type, the recurrent GEMMs' operand
  // (the gate kernel writes it next to h; with projections a copy after the W_hr GEMM).
  at::Tensor h_lp = lp ? fresh_copy(to_sorted(bt, h0_in, 1), gt) : h_n;
  at::Tensor c_n = L.mode == kLSTM ? fresh_copy(to_sorted(bt, *c0_in, 1), acc)
                                   : at::empty({0}, opts);
  auto buffer = [&](std::vector<int64_t> sizes, bool zero) {
    return zero ? at::zeros(sizes, opts) : new_output(sizes, opts);
  };
  // Padded rows of y are zero; those of hprev / hraw enter the weight-gradient GEMMs (times a
  // zero gradient), so they must be finite; the unused slot of padded ws rows (LSTM c_prev)
  // is zeroed only so that every output is deterministic.
  at::Tensor y = buffer({T, B, D * P}, bt.padded);
  at::Tensor ws = buffer({D, T, B, SH}, bt.padded);
  at::Tensor hprev = buffer({D, T, B, P}, bt.padded);
  at::Tensor hraw = L.proj ? buffer({D, T, B, H}, bt.padded) : at::empty({0}, opts);
  at::Tensor gh = L.mode == kGRU ? at::empty({B, G}, opts) : at::Tensor();  // GRU: h W_hh^T

  dispatch_types(acc, gt, [&](auto zero, auto lp_zero) {
    using T_ = decltype(zero);
    using L_ = decltype(lp_zero);
    T_* y_p = y.mutable_data_ptr<T_>();
    T_* ws_p = ws.mutable_data_ptr<T_>();
    T_* hprev_p = hprev.mutable_data_ptr<T_>();
    T_* hraw_p = L.proj ? hraw.mutable_data_ptr<T_>() : nullptr;
    T_* gh_p = L.mode == kGRU ? gh.mutable_data_ptr<T_>() : nullptr;
    const L_* x_p = x.const_data_ptr<L_>();
    for (int64_t d = 0; d < D; ++d) {
      T_* ws_d = ws_p + d * T * B * SH;
      // 1. input projections of every step: ws[d][..., :G] = x W_ih^T (one GEMM)
      K::gemm(Mat<T_>{ws_d, T * B, G, SH}, Mat<const L_>{x_p, T * B, I, I},
              K::step_weight(lw.w_ih[d].t()), false);
      // Weights in the form K::gemm takes, once per call.
      const auto w_hh = K::step_weight(lw.w_hh[d].t());  // (P, G)
      const auto w_hr = L.proj ? K::step_weight(lw.w_hr[d].t()) : K::step_weight(at::Tensor());
      T_* h_d = h_n.mutable_data_ptr<T_>() + d * B * P;
      L_* hl_d = h_lp.mutable_data_ptr<L_>() + d * B * P;  // == h_d unless lp
      FwdStep<T_, L_> s{};
      s.bias = lw.bias[d].const_data_ptr<T_>();
      s.b_hn = L.mode == kGRU ? lw.b_hn[d].const_data_ptr<T_>() : nullptr;
      s.gh = gh_p;
      s.h = h_d;
      s.h_lp = lp ? hl_d : nullptr;
      s.c = L.mode == kLSTM ? c_n.mutable_data_ptr<T_>() + d * B * H : nullptr;
      s.H = H;
      s.P = P;
      s.mode = L.mode;
      s.proj = L.proj;
      s.out_ld = L.proj ? H : D * P;
      // The whole loop in one persistent kernel where K has one for these sizes (CUDA, small
      // H, no projection, no padding); it leaves exactly what the loop below leaves.
      if (!L.proj && !bt.padded) {
        SeqFwd<T_, L_> q{};
        q.bias = s.bias;
        q.b_hn = s.b_hn;
        q.w_hh = lw.w_hh[d].template const_data_ptr<L_>();
        q.ws = ws_d;
        q.h = h_d;
        q.h_lp = s.h_lp;
        q.c = s.c;
        q.hprev = hprev_p + d * T * B * P;
        q.y = y_p + d * P;
        q.y_ld = D * P;
        q.steps = T;
        q.B = B;
        q.H = H;
        q.mode = L.mode;
        q.reverse = d == 1;
        if (K::fwd_sequence(q)) continue;
      }
      // What the loop's launches depend on, for K::run_steps (CUDA graphs: the key of a
      // recorded loop; the GEMM weight's layout and the GEMM/TF32 settings K adds itself).
      std::vector<int64_t> key{0,
                               L.mode,
                               T,
                               B,
                               H,
                               P,
                               D,
                               d,
                               static_cast<int64_t>(acc),
                               static_cast<int64_t>(gt),
                               L.proj,
                               bt.padded,
                               reinterpret_cast<int64_t>(hl_d),
                               reinterpret_cast<int64_t>(gh_p),
                               reinterpret_cast<int64_t>(ws_p),
                               reinterpret_cast<int64_t>(hprev_p),
                               reinterpret_cast<int64_t>(y_p),
                               reinterpret_cast<int64_t>(s.bias),
                               reinterpret_cast<int64_t>(s.b_hn),
                               reinterpret_cast<int64_t>(s.h),
                               reinterpret_cast<int64_t>(s.h_lp),
                               reinterpret_cast<int64_t>(s.c)};
      if (bt.padded) key.insert(key.end(), bt.active.begin(), bt.active.end());
      K::run_steps(key, w_hh, L.proj, [&] {
        for (int64_t step = 0; step < T; ++step) {
          const int64_t t = d == 0 ? step : T - 1 - step;
          const int64_t n = bt.active[t];
          if (n == 0) continue;
          const int64_t dt = (d * T + t) * B;
          // 2. recurrent projections of the running rows: accumulated into their ws rows
          // (GRU: into gh)
          const Mat<const L_> h_rows{hl_d, n, P, P};
          if (L.mode == kGRU) {
            K::gemm(Mat<T_>{gh_p, n, G, G}, h_rows, w_hh, false);
          } else {
            K::gemm(Mat<T_>{ws_p + dt * SH, n, G, SH}, h_rows, w_hh, true);
          }
          // 3. the fused gate kernel
          s.n = n;
          s.hprev = hprev_p + dt * P;
          s.ws = ws_p + dt * SH;
          s.out = L.proj ? hraw_p + dt * H : y_p + t * B * D * P + d * P;
          K::fwd(s);
          if (L.proj) {
            K::gemm(Mat<T_>{h_d, n, P, P}, Mat<const T_>{hraw_p + dt * H, n, H, H}, w_hr, false);
            const at::Tensor h_rows_t = h_n[d].narrow(0, 0, n);
            y[t].narrow(0, 0, n).narrow(1, d * P, P).copy_(h_rows_t);
            if (lp) h_lp[d].narrow(0, 0, n).copy_(h_rows_t);
          }
        }
      });
    }
  });
  const c10::ScalarType dt = x_in.scalar_type();
  at::Tensor y_out = to_original(bt, y, 1).to(dt);
  at::Tensor h_out = to_original(bt, h_n, 1).to(dt);
  at::Tensor c_out = L.mode == kLSTM ? to_original(bt, c_n, 1).to(dt) : c_n.to(dt);
  return {y_out, h_out, c_out, ws, hprev, hraw};
}

// ---- backward -----------------------------------------------------------------------------

// Returns (dx, dh0, dc0, dweights); dc0 is (0,) unless LSTM; dweights follow `weights`.
// dy / dh_n / dc_n may be absent (zero gradient).
template <class K>
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> layer_backward(
    const char* op, const std::optional<at::Tensor>& dy_in,
    const std::optional<at::Tensor>& dh_n_in, const std::optional<at::Tensor>& dc_n_in,
    const at::Tensor& x_in, const at::Tensor& h0_in, const std::optional<at::Tensor>& c0_in,
    const std::optional<at::Tensor>& lengths, const std::vector<at::Tensor>& weights,
    const at::Tensor& ws, const at::Tensor& hprev, const at::Tensor& hraw,
    const std::string& mode_name, int64_t proj_size, bool has_biases, bool bidirectional) {
  const Layer L = check_layer(op, x_in, h0_in, c0_in, lengths, weights, mode_name, proj_size,
                              has_biases, bidirectional);
  K::check_device(op, x_in);
  typename K::Guard guard(x_in.device());
  const int64_t T = L.T, B = L.B, I = L.I, H = L.H, P = L.P, G = L.G, D = L.D, SH = L.S * H;
  const c10::ScalarType acc = acc_type(x_in), gt = gemm_type(x_in);
  const auto opts = x_in.options().dtype(acc);
  TURBOLM_CHECK(DTypeError, ws.scalar_type() == acc && hprev.scalar_type() == acc,
                "saved tensors must have dtype ", dtype_str(acc));
  CHECK_SHAPE(ws, D, T, B, SH);
  CHECK_SHAPE(hprev, D, T, B, P);
  if (L.proj) CHECK_SHAPE(hraw, D, T, B, H);
  if (dy_in) {
    const at::Tensor& dy = *dy_in;
    CHECK_SAME_DEVICE(dy, x_in);
    CHECK_SHAPE(dy, T, B, D * P);
  }
  if (dh_n_in) {
    const at::Tensor& dh_n = *dh_n_in;
    CHECK_SAME_DEVICE(dh_n, x_in);
    CHECK_SHAPE(dh_n, D, B, P);
  }
  if (dc_n_in && L.mode == kLSTM) {
    const at::Tensor& dc_n = *dc_n_in;
    CHECK_SAME_DEVICE(dc_n, x_in);
    CHECK_SHAPE(dc_n, D, B, H);
  }
  const Batching bt = make_batching(op, lengths, T, B, x_in.device());
  const LayerWeights lw = prepare_weights(L, weights, acc, gt);
  const at::Tensor ws_c = ws.contiguous(), hprev_c = hprev.contiguous();
  const at::Tensor hraw_c = L.proj ? hraw.contiguous() : hraw;

  const at::Tensor dy = dy_in ? to_sorted(bt, dy_in->to(acc), 1).contiguous() : at::Tensor();
  at::Tensor dh = dh_n_in ? fresh_copy(to_sorted(bt, *dh_n_in, 1), acc)
                          : at::zeros({D, B, P}, opts);  // running dL/dh, (D, B, P)
  at::Tensor dc;
  if (L.mode == kLSTM)
    dc = dc_n_in ? fresh_copy(to_sorted(bt, *dc_n_in, 1), acc) : at::zeros({D, B, H}, opts);
  // The pre-activation gradients dG in the GEMM type (the operands of every GEMM below).
  // dG of padded rows must be zero (they enter the weight-gradient GEMMs).
  const auto gopts = opts.dtype(gt);
  auto buffer = [&](std::vector<int64_t> sizes, bool zero, const at::TensorOptions& o) {
    return zero ? at::zeros(sizes, o) : new_output(sizes, o);
  };
  at::Tensor dgi = buffer({T, B, D * G}, bt.padded, gopts);  // input side, both directions
  at::Tensor dgh = L.mode == kGRU ? buffer({D, T, B, G}, bt.padded, gopts) : at::Tensor();
  at::Tensor dhp = L.proj ? buffer({D, T, B, P}, bt.padded, opts) : at::Tensor();  // dL/dh_t
  at::Tensor dh_raw = L.proj ? at::empty({B, H}, opts) : at::Tensor();

  dispatch_types(acc, gt, [&](auto zero, auto lp_zero) {
    using T_ = decltype(zero);
    using L_ = decltype(lp_zero);
    L_* dgi_p = dgi.mutable_data_ptr<L_>();
    L_* dgh_p = L.mode == kGRU ? dgh.mutable_data_ptr<L_>() : nullptr;
    const T_* ws_p = ws_c.const_data_ptr<T_>();
    const T_* hprev_p = hprev_c.const_data_ptr<T_>();
    const T_* dy_p = dy.defined() ? dy.const_data_ptr<T_>() : nullptr;
    T_* dhp_p = L.proj ? dhp.mutable_data_ptr<T_>() : nullptr;
    T_* dh_raw_p = L.proj ? dh_raw.mutable_data_ptr<T_>() : nullptr;
    for (int64_t d = 0; d < D; ++d) {
      // dh_prev = dG_h W_hh; dh_raw = dh W_hr
      const auto w_hh = K::step_weight(lw.w_hh[d]);  // (G, P)
      const auto w_hr = L.proj ? K::step_weight(lw.w_hr[d]) : K::step_weight(at::Tensor());
      T_* dh_d = dh.mutable_data_ptr<T_>() + d * B * P;
      BwdStep<T_, L_> s{};
      s.dgi_ld = D * G;
      s.dc = L.mode == kLSTM ? dc.mutable_data_ptr<T_>() + d * B * H : nullptr;
      s.H = H;
      s.P = P;
      s.mode = L.mode;
      std::vector<int64_t> key{1,
                               L.mode,
                               T,
                               B,
                               H,
                               P,
                               D,
                               d,
                               static_cast<int64_t>(acc),
                               static_cast<int64_t>(gt),
                               L.proj,
                               bt.padded,
                               reinterpret_cast<int64_t>(dgi_p),
                               reinterpret_cast<int64_t>(dgh_p),
                               reinterpret_cast<int64_t>(ws_p),
                               reinterpret_cast<int64_t>(hprev_p),
                               reinterpret_cast<int64_t>(dy_p),
                               reinterpret_cast<int64_t>(dh_d),
                               reinterpret_cast<int64_t>(s.dc)};
      if (bt.padded) key.insert(key.end(), bt.active.begin(), bt.active.end());
      K::run_steps(key, w_hh, L.proj, [&] {
        for (int64_t step = 0; step < T; ++step) {
          const int64_t t = d == 0 ? T - 1 - step : step;
          const int64_t n = bt.active[t];
          if (n == 0) continue;
          const int64_t dt = (d * T + t) * B;
          L_* dgi_t = dgi_p + t * B * D * G + d * G;
          s.n = n;
          s.ws = ws_p + dt * SH;
          s.hprev = hprev_p + dt * P;
          s.dgi = dgi_t;
          s.dgh = L.mode == kGRU ? dgh_p + dt * G : nullptr;
          if (L.proj) {
            // dL/dh_t = dh + dy, saved for dW_hr; then back through the projection.
            at::Tensor dhp_rows = dhp[d][t].narrow(0, 0, n);
            const at::Tensor dh_rows = dh[d].narrow(0, 0, n);
            if (dy.defined()) {
              at::add_out(dhp_rows, dh_rows, dy[t].narrow(0, 0, n).narrow(1, d * P, P));
            } else {
              dhp_rows.copy_(dh_rows);
            }
            K::gemm(Mat<T_>{dh_raw_p, n, H, H}, Mat<const T_>{dhp_p + dt * P, n, P, P}, w_hr,
                    false);
            s.dh_in = dh_raw_p;
            s.dh_ld = H;
            s.dy = nullptr;
          } else {
            s.dh_in = dh_d;
            s.dh_ld = P;
            s.dy = dy_p != nullptr ? dy_p + t * B * D * P + d * P : nullptr;
            s.dy_ld = D * P;
          }
          K::bwd(s);
          // dh_{t-1} = dG_h W_hh (+ dh * z, already in dh, for the GRU)
          const Mat<T_> dh_rows{dh_d, n, P, P};
          if (L.mode == kGRU) {
            K::gemm(dh_rows, Mat<const L_>{dgh_p + dt * G, n, G, G}, w_hh, true);
          } else {
            K::gemm(dh_rows, Mat<const L_>{dgi_t, n, G, D * G}, w_hh, false);
          }
        }
      });
    }
  });

  // Single GEMMs over all steps (GEMM-type operands, results in the compute type).
  const at::Tensor x = to_sorted(bt, x_in.to(gt), 1).contiguous().view({T * B, I});
  const at::Tensor dgi2 = dgi.view({T * B, D * G});
  // dx = dG_i W_ih = linear(dG_i, W_ih^T), both directions summed
  const at::Tensor dx = K::linear(dgi2, lw.w_ih_cat().t()).view({T, B, I});
  const at::Tensor dw_ih = K::mm(dgi2.t(), x);                        // (D*G, I)
  const at::Tensor db = L.has_biases ? at::sum(dgi2, {0}, false, acc) : at::Tensor();
  const at::Tensor hprev_g = hprev_c.to(gt);  // dW_hh's operand
  // Each gradient gets its own storage in the weight's dtype (narrow() views of dw_ih / db
  // are copied; results of mm() are already fresh).
  auto own = [](const at::Tensor& g, c10::ScalarType wt, bool view) {
    return view ? g.to(wt, /*non_blocking=*/false, /*copy=*/true) : g.to(wt);
  };
  std::vector<at::Tensor> dweights(weights.size());
  for (int64_t d = 0; d < D; ++d) {
    const at::Tensor dgh_d = L.mode == kGRU ? dgh[d].view({T * B, G}) : dgi2.narrow(1, d * G, G);
    const c10::ScalarType wt = weights[L.w_ih(d)].scalar_type();
    dweights[L.w_ih(d)] = own(dw_ih.narrow(0, d * G, G), wt, true);
    dweights[L.w_hh(d)] = own(K::mm(dgh_d.t(), hprev_g[d].view({T * B, P})), wt, false);
    if (L.has_biases) {
      dweights[L.b_ih(d)] = own(db.narrow(0, d * G, G), wt, true);
      dweights[L.b_hh(d)] = L.mode == kGRU ? own(at::sum(dgh_d, {0}, false, acc), wt, false)
                                           : own(db.narrow(0, d * G, G), wt, true);
    }
    if (L.proj)
      dweights[L.w_hr(d)] =
          own(K::mm(dhp[d].view({T * B, P}).t(), hraw_c[d].view({T * B, H})), wt, false);
  }
  const c10::ScalarType dt = x_in.scalar_type();
  at::Tensor dx_out = to_original(bt, dx, 1).to(dt);
  at::Tensor dh0 = to_original(bt, dh, 1).to(dt);
  at::Tensor dc0 = L.mode == kLSTM ? to_original(bt, dc, 1).to(dt) : at::empty({0}, x_in.options());
  return {dx_out, dh0, dc0, dweights};
}

// ---- cells -------------------------------------------------------------------------------

// Cells are layers of one step, one direction (shared by the CPU and CUDA registrations).
inline std::vector<at::Tensor> cell_weights(const char* op, const at::Tensor& w_ih, const at::Tensor& w_hh,
                                     const std::optional<at::Tensor>& b_ih,
                                     const std::optional<at::Tensor>& b_hh) {
  TURBOLM_CHECK(InputError, b_ih.has_value() == b_hh.has_value(),
                "b_ih and b_hh must be given together or not at all");
  std::vector<at::Tensor> w{w_ih, w_hh};
  if (b_ih) {
    w.push_back(*b_ih);
    w.push_back(*b_hh);
  }
  return w;
}

template <class K>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cell_forward(
    const at::Tensor& x, const at::Tensor& h, const std::optional<at::Tensor>& c,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, const std::string& mode) {
  TURBOLM_OP("turbolm::rnn_cell_fwd");
  CHECK_DIM(x, 2);
  CHECK_DIM(h, 2);
  const std::vector<at::Tensor> w = cell_weights(op, w_ih, w_hh, b_ih, b_hh);
  std::optional<at::Tensor> c3;
  if (c) c3 = c->unsqueeze(0);
  auto [y, h_n, c_n, ws, hprev, hraw] =
      layer_forward<K>(op, x.unsqueeze(0), h.unsqueeze(0), c3, std::nullopt, w, mode,
                       0, b_ih.has_value(), false);
  // (1, B, H) for the LSTM, even with B = 0; the other cells return an empty (0,) c_n
  at::Tensor c_new = c_n.dim() == 3 ? c_n.squeeze(0).clone() : c_n;
  return {h_n.squeeze(0).clone(), c_new, ws, hprev};
}

template <class K>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
cell_backward(const std::optional<at::Tensor>& dh, const std::optional<at::Tensor>& dc,
              const at::Tensor& x, const at::Tensor& h, const std::optional<at::Tensor>& c,
              const at::Tensor& w_ih, const at::Tensor& w_hh,
              const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
              const at::Tensor& ws, const at::Tensor& hprev, const std::string& mode) {
  TURBOLM_OP("turbolm::rnn_cell_bwd");
  CHECK_DIM(x, 2);
  CHECK_DIM(h, 2);
  const std::vector<at::Tensor> w = cell_weights(op, w_ih, w_hh, b_ih, b_hh);
  auto lift = [](const std::optional<at::Tensor>& t) {
    return t ? std::optional<at::Tensor>(t->unsqueeze(0)) : std::nullopt;
  };
  const at::Tensor none = at::empty({0}, x.options().dtype(acc_type(x)));
  auto [dx, dh0, dc0, dw] =
      layer_backward<K>(op, std::nullopt, lift(dh), lift(dc), x.unsqueeze(0), h.unsqueeze(0),
                        lift(c), std::nullopt, w, ws, hprev, none, mode, 0,
                        b_ih.has_value(), false);
  const at::Tensor empty = at::empty({0}, x.options());
  return {dx.squeeze(0).clone(),
          dh0.squeeze(0).clone(),
          dc0.dim() == 3 ? dc0.squeeze(0).clone() : dc0,
          dw[0],
          dw[1],
          b_ih ? dw[2] : empty,
          b_ih ? dw[3] : empty.clone()};
}

}  // namespace turbolm::rnn
