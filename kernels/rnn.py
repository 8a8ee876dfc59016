"""Fused RNN gate kernels in Triton (LSTM, GRU, tanh / ReLU RNN) and the layer loop around them.

Design
------
The gate math of one time step (bias add, sigmoid / tanh, cell update; the GRU's reset gate
applied to ``W_hn h + b_hn`` as torch.nn.GRU) is one fused kernel forward and one backward,
exactly the formulas of ``csrc/rnn/rnn_math.h`` (its header comment derives them). One program
covers a tile of BLOCK_B batch rows x BLOCK_H units; pointer arithmetic with masks only (no
block pointers), so the kernels run on Triton 3.6 / 3.8 / 3.9 and under ``TRITON_INTERPRET=1``.

The layer algorithm is the one of ``csrc/rnn/rnn_layer.h``: one GEMM for the input projections
of all steps and both directions (``torch.addmm``), then per step a recurrent GEMM (``torch.mm``)
and the fused gate kernel; backward per step the fused gate-gradient kernel and one GEMM, and
the weight gradients as single GEMMs over all steps. Variable lengths sort the batch once so
that each step runs on the prefix of rows still active (padded steps cost nothing). Math and
saved activations are fp32 (inputs of other dtypes are converted once per call); for
float16 / bfloat16 inputs the once-per-call GEMMs (input projections, dx, weight gradients) take
half-precision operands with fp32 accumulation, the per-step GEMMs stay fp32 (a per-step
conversion would cost a launch). Per-step GEMMs write into preallocated buffers (``out=``,
``addmm_``): one GEMM and one kernel launch per step and direction, forward and backward.

Trade-off: the time loop runs in Python here, not in the C++ loop of the ``cuda`` backend. The
C++ loop cannot launch Triton kernels without a Python round trip per step, so sharing it would
not remove the per-step host cost; a Python loop keeps this backend self-contained, runs under
the interpreter in CI, and costs ~20-40 us of host time per step (two launches and a GEMM), so
it is launch-bound for small batches / hidden sizes where the ``cuda`` backend (same kernels in
C++, no interpreter) is the better choice. Capturing the loop in a CUDA graph would remove it.

Launchers: ``layer_fwd(x, h0, c0, lengths, weights, mode, proj_size, has_biases,
bidirectional) -> (y, h_n, c_n | None, ws, hprev, hraw | None)`` and ``layer_bwd(dy, dh_n,
dc_n, x, lengths, weights, ws, hprev, hraw, mode, proj_size, has_biases, bidirectional) ->
(dx, dh0, dc0 | None, dweights)``, with the shapes of ``turbolm::rnn_layer_fwd / bwd``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
SAVED = {"lstm": 5, "gru": 4, "rnn_tanh": 1, "rnn_relu": 1}
MODE_ID = {"lstm": 0, "gru": 1, "rnn_tanh": 2, "rnn_relu": 3}

BLOCK_B = 4 if INTERPRET else 16
BLOCK_H = 32 if INTERPRET else 64


# ---- kernels ------------------------------------------------------------------------------


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # sign(x) * (1 - 2 / (e^{2|x|} + 1)): saturates to +-1, absolute error ~1 ulp near 0.
    a = tl.abs(x)
    t = 1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0)
    return tl.where(x < 0, -t, t)


@triton.jit
def _fwd_step_kernel(
    GI,
    gi_off,
    gi_ld,  # input projections (n, G) at GI + gi_off, row stride gi_ld
    GH,  # recurrent projections (n, G) contiguous
    BHN,  # GRU: b_hn (H,)
    HS,
    h_off,  # state h_{t-1} (n, P) at HS + h_off: in; h_t out (no projection)
    CS,
    c_off,  # LSTM cell state (n, H): in/out
    HPREV,
    hp_off,  # saved h_{t-1} (n, P)
    WS,
    ws_off,  # saved gate values (n, S * H)
    OUT,
    out_off,
    out_ld,  # h_t (y rows) or h_raw (projection), (n, H) row stride out_ld
    n,
    H,
    P,
    MODE: tl.constexpr,  # 0 lstm, 1 gru, 2 rnn_tanh, 3 rnn_relu
    PROJ: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)  # (BLOCK_B,)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # (BLOCK_H,)
    r2 = rows[:, None].to(tl.int64)
    c2 = cols[None, :]
    row_ok = r2 < n
    mask = row_ok & (c2 < H)
    mask_p = row_ok & (c2 < P)
    # save h_{t-1} (units < P)
    h_prev = tl.load(HS + h_off + r2 * P + c2, mask=mask_p, other=0.0)
    tl.store(HPREV + hp_off + r2 * P + c2, h_prev, mask=mask_p)
    gi = GI + gi_off + r2 * gi_ld + c2
    if MODE == 0:
        G = 4 * H
        gh = GH + r2 * G + c2
        i = _sigmoid(tl.load(gi, mask=mask, other=0.0) + tl.load(gh, mask=mask, other=0.0))
        f = _sigmoid(tl.load(gi + H, mask=mask, other=0.0) + tl.load(gh + H, mask=mask, other=0.0))
        g = _tanh(
            tl.load(gi + 2 * H, mask=mask, other=0.0) + tl.load(gh + 2 * H, mask=mask, other=0.0)
        )
        o = _sigmoid(
            tl.load(gi + 3 * H, mask=mask, other=0.0) + tl.load(gh + 3 * H, mask=mask, other=0.0)
        )
        c_ptr = CS + c_off + r2 * H + c2
        c_prev = tl.load(c_ptr, mask=mask, other=0.0)
        c_new = f * c_prev + i * g
        h_new = o * _tanh(c_new)
        ws = WS + ws_off + r2 * (5 * H) + c2
        tl.store(ws, i, mask=mask)
        tl.store(ws + H, f, mask=mask)
        tl.store(ws + 2 * H, g, mask=mask)
        tl.store(ws + 3 * H, o, mask=mask)
        tl.store(ws + 4 * H, c_prev, mask=mask)
        tl.store(c_ptr, c_new, mask=mask)
    elif MODE == 1:
        G = 3 * H
        gh = GH + r2 * G + c2
        r = _sigmoid(tl.load(gi, mask=mask, other=0.0) + tl.load(gh, mask=mask, other=0.0))
        z = _sigmoid(tl.load(gi + H, mask=mask, other=0.0) + tl.load(gh + H, mask=mask, other=0.0))
        hn = tl.load(gh + 2 * H, mask=mask, other=0.0) + tl.load(BHN + c2, mask=c2 < H, other=0.0)
        nn = _tanh(tl.load(gi + 2 * H, mask=mask, other=0.0) + r * hn)
        h_new = (1.0 - z) * nn + z * h_prev
        ws = WS + ws_off + r2 * (4 * H) + c2
        tl.store(ws, r, mask=mask)
        tl.store(ws + H, z, mask=mask)
        tl.store(ws + 2 * H, nn, mask=mask)
        tl.store(ws + 3 * H, hn, mask=mask)
    else:
        pre = tl.load(gi, mask=mask, other=0.0) + tl.load(GH + r2 * H + c2, mask=mask, other=0.0)
        if MODE == 3:
            h_new = tl.where(pre > 0, pre, 0.0)
        else:
            h_new = _tanh(pre)
        tl.store(WS + ws_off + r2 * H + c2, h_new, mask=mask)
    tl.store(OUT + out_off + r2 * out_ld + c2, h_new, mask=mask)
    if not PROJ:
        tl.store(HS + h_off + r2 * P + c2, h_new, mask=mask)


@triton.jit
def _bwd_step_kernel(
    DH,
    dh_off,
    dh_ld,  # dL/dh_raw (n, H); GRU: overwritten with dh * z
    DY,
    dy_off,
    dy_ld,  # dL/dy rows added to dh (HAS_DY)
    WS,
    ws_off,  # saved gate values (n, S * H)
    HPREV,
    hp_off,  # saved h_{t-1} (n, P) (GRU)
    DC,
    dc_off,  # LSTM dL/dc (n, H): in dc_t, out dc_{t-1}
    DGI,
    dgi_off,
    dgi_ld,  # pre-activation gradients, input side (n, G)
    DGH,
    dgh_off,  # GRU: hidden side (n, G) contiguous
    n,
    H,
    P,
    MODE: tl.constexpr,
    HAS_DY: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    r2 = rows[:, None].to(tl.int64)
    c2 = cols[None, :]
    mask = (r2 < n) & (c2 < H)
    dh_ptr = DH + dh_off + r2 * dh_ld + c2
    dh = tl.load(dh_ptr, mask=mask, other=0.0)
    if HAS_DY:
        dh += tl.load(DY + dy_off + r2 * dy_ld + c2, mask=mask, other=0.0)
    dgi = DGI + dgi_off + r2 * dgi_ld + c2
    if MODE == 0:
        ws = WS + ws_off + r2 * (5 * H) + c2
        i = tl.load(ws, mask=mask, other=0.0)
        f = tl.load(ws + H, mask=mask, other=0.0)
        g = tl.load(ws + 2 * H, mask=mask, other=0.0)
        o = tl.load(ws + 3 * H, mask=mask, other=0.0)
        c_prev = tl.load(ws + 4 * H, mask=mask, other=0.0)
        tc = _tanh(f * c_prev + i * g)
        dc_ptr = DC + dc_off + r2 * H + c2
        dct = tl.load(dc_ptr, mask=mask, other=0.0) + dh * o * (1.0 - tc * tc)
        tl.store(dgi, dct * g * i * (1.0 - i), mask=mask)
        tl.store(dgi + H, dct * c_prev * f * (1.0 - f), mask=mask)
        tl.store(dgi + 2 * H, dct * i * (1.0 - g * g), mask=mask)
        tl.store(dgi + 3 * H, dh * tc * o * (1.0 - o), mask=mask)
        tl.store(dc_ptr, dct * f, mask=mask)
    elif MODE == 1:
        ws = WS + ws_off + r2 * (4 * H) + c2
        r = tl.load(ws, mask=mask, other=0.0)
        z = tl.load(ws + H, mask=mask, other=0.0)
        nn = tl.load(ws + 2 * H, mask=mask, other=0.0)
        hn = tl.load(ws + 3 * H, mask=mask, other=0.0)
        h_prev = tl.load(HPREV + hp_off + r2 * P + c2, mask=mask, other=0.0)
        dn = dh * (1.0 - z) * (1.0 - nn * nn)
        dz = dh * (h_prev - nn) * z * (1.0 - z)
        dr = dn * hn * r * (1.0 - r)
        tl.store(dgi, dr, mask=mask)
        tl.store(dgi + H, dz, mask=mask)
        tl.store(dgi + 2 * H, dn, mask=mask)
        dgh = DGH + dgh_off + r2 * (3 * H) + c2
        tl.store(dgh, dr, mask=mask)
        tl.store(dgh + H, dz, mask=mask)
        tl.store(dgh + 2 * H, dn * r, mask=mask)
        tl.store(dh_ptr, dh * z, mask=mask)
    else:
        h = tl.load(WS + ws_off + r2 * H + c2, mask=mask, other=0.0)
        if MODE == 3:
            d = tl.where(h > 0, dh, 0.0)
        else:
            d = dh * (1.0 - h * h)
        tl.store(dgi, d, mask=mask)


# ---- launchers ----------------------------------------------------------------------------


def _grid(n: int, H: int):
    return (triton.cdiv(n, BLOCK_B), triton.cdiv(H, BLOCK_H))


def _poison() -> bool:
    return os.environ.get("TURBOLM_POISON_OUTPUTS") == "1"


def _new(shape, like: torch.Tensor, zero: bool = False) -> torch.Tensor:
    if zero:
        return like.new_zeros(shape)
    return like.new_full(shape, float("nan")) if _poison() else like.new_empty(shape)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _batching(lengths, steps: int, batch: int, device):
    """(active rows per step, permutation to sorted order or None, inverse, padded?)."""
    if lengths is None or batch == 0:
        return [batch] * steps, None, None, False
    lens = lengths.to("cpu", torch.int64)
    if lens.min().item() < 1 or lens.max().item() > steps:
        raise ValueError(f"lengths must be in [1, {steps}]")
    order = sorted(range(batch), key=lambda b: -int(lens[b]))  # stable
    sorted_lens = [int(lens[b]) for b in order]
    active = [sum(1 for n in sorted_lens if n > t) for t in range(steps)]
    padded = any(a < batch for a in active)
    if order == list(range(batch)):
        return active, None, None, padded
    perm = torch.tensor(order, device=device)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(batch, device=device)
    return active, perm, inv, padded


def _split(weights, mode, has_biases, proj_size, bidirectional):
    per_dir = 2 + (2 if has_biases else 0) + (1 if proj_size else 0)
    dirs = []
    for d in range(2 if bidirectional else 1):
        w = list(weights[d * per_dir : (d + 1) * per_dir])
        w_ih, w_hh = w[0], w[1]
        b_ih, b_hh = (w[2], w[3]) if has_biases else (None, None)
        w_hr = w[-1] if proj_size else None
        dirs.append((w_ih, w_hh, b_ih, b_hh, w_hr))
    return dirs, per_dir


def _gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    """Operand dtype of the once-per-call GEMMs (input projections, dx, weight gradients):
    the input's for float16 / bfloat16 (fp32 accumulation and results), else the compute type."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else _acc(dtype)


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with fp32 (fp64 for fp64) results. Half-precision operands on CUDA: cuBLAS's
    mixed-precision GEMM (``out_dtype``, torch >= 2.8); elsewhere the operands are converted
    first, which computes the same products exactly."""
    if a.dtype in (torch.float16, torch.bfloat16):
        if a.is_cuda:
            try:
                return torch.mm(a, b, out_dtype=torch.float32)
            except (TypeError, RuntimeError, NotImplementedError):
                pass  # older torch: convert below
        return a.float() @ b.float()
    return a @ b


def layer_fwd(x, h0, c0, lengths, weights, mode, proj_size, has_biases, bidirectional):
    """One layer, all directions: see the module docstring and ``turbolm::rnn_layer_fwd``."""
    steps, batch, inp = x.shape
    acc, gdt = _acc(x.dtype), _gemm_dtype(x.dtype)
    dirs, _ = _split(weights, mode, has_biases, proj_size, bidirectional)
    D = len(dirs)
    hidden = dirs[0][1].shape[0] // GATES[mode]
    G, P = GATES[mode] * hidden, proj_size or hidden
    S = SAVED[mode] * hidden
    active, perm, inv, padded = _batching(lengths, steps, batch, x.device)

    xs = x.to(gdt)
    if perm is not None:
        xs = xs.index_select(1, perm)
    xs = xs.contiguous()
    w_ih = torch.cat([d[0] for d in dirs]).to(gdt)  # (D*G, I)
    xs2 = xs.view(steps * batch, inp)
    bias = None
    if has_biases:
        biases = []
        for _, _, b_ih, b_hh, _ in dirs:
            b = (b_ih.to(acc) + b_hh.to(acc)).clone()
            if mode == "gru":
                b[2 * hidden :] = b_ih[2 * hidden :].to(acc)
            biases.append(b)
        bias = torch.cat(biases)
    if gdt == acc:  # (T*B, D*G)
        gi = torch.addmm(bias, xs2, w_ih.t()) if bias is not None else xs2 @ w_ih.t()
    else:  # half-precision operands, fp32 results
        gi = _mm_f32(xs2, w_ih.t())
        if bias is not None:
            gi += bias

    def to_sorted(t):
        t = t.to(acc)
        return (t.index_select(1, perm) if perm is not None else t).contiguous().clone()

    h_n = to_sorted(h0)  # (D, B, P): the running state
    c_n = to_sorted(c0) if mode == "lstm" else None
    y = _new((steps, batch, D * P), gi, zero=padded)
    ws = _new((D, steps, batch, S), gi, zero=padded)
    hprev = _new((D, steps, batch, P), gi, zero=padded)
    hraw = _new((D, steps, batch, hidden), gi, zero=padded) if proj_size else None
    bhn_zero = gi.new_zeros(hidden) if mode == "gru" else None
    gh_buf = gi.new_empty(batch, G)  # each step's recurrent projections (rows [0, n))
    for d, (_, w_hh, _, b_hh, w_hr) in enumerate(dirs):
        w_hh_t = w_hh.to(acc).t()  # (P, G)
        w_hr_t = w_hr.to(acc).t() if w_hr is not None else None
        b_hn = bhn_zero
        if mode == "gru" and b_hh is not None:
            b_hn = b_hh[2 * hidden :].to(acc).contiguous()
        h_d = h_n[d]
        for s in range(steps):
            t = s if d == 0 else steps - 1 - s
            n = active[t]
            if n == 0:
                continue
            gh = torch.mm(h_d[:n], w_hh_t, out=gh_buf[:n])  # (n, G), no allocation
            dt = (d * steps + t) * batch
            out, out_off, out_ld = (
                (hraw, dt * hidden, hidden) if proj_size else (y, t * batch * D * P + d * P, D * P)
            )
            _fwd_step_kernel[_grid(n, hidden)](
                gi,
                t * batch * D * G + d * G,
                D * G,
                gh,
                b_hn if b_hn is not None else gh,
                h_n,
                d * batch * P,
                c_n if c_n is not None else gh,
                d * batch * hidden,
                hprev,
                dt * P,
                ws,
                dt * S,
                out,
                out_off,
                out_ld,
                n,
                hidden,
                P,
                MODE=MODE_ID[mode],
                PROJ=bool(proj_size),
                BLOCK_B=BLOCK_B,
                BLOCK_H=BLOCK_H,
            )
            if proj_size:
                torch.mm(hraw[d, t, :n], w_hr_t, out=h_d[:n])
                y[t, :n, d * P : (d + 1) * P] = h_d[:n]

    def to_original(t):
        return t.index_select(1, inv) if inv is not None else t

    y_out = to_original(y).to(x.dtype)
    h_out = to_original(h_n).to(x.dtype)
    c_out = to_original(c_n).to(x.dtype) if c_n is not None else None
    return y_out, h_out, c_out, ws, hprev, hraw


def layer_bwd(
    dy, dh_n, dc_n, x, lengths, weights, ws, hprev, hraw, mode, proj_size, has_biases, bidirectional
):
    """Gradients of :func:`layer_fwd`: ``(dx, dh0, dc0 | None, dweights)`` (weights' order)."""
    steps, batch, inp = x.shape
    acc, gdt = _acc(x.dtype), _gemm_dtype(x.dtype)
    dirs, per_dir = _split(weights, mode, has_biases, proj_size, bidirectional)
    D = len(dirs)
    hidden = dirs[0][1].shape[0] // GATES[mode]
    G, P = GATES[mode] * hidden, proj_size or hidden
    S = SAVED[mode] * hidden
    active, perm, inv, padded = _batching(lengths, steps, batch, x.device)

    def to_sorted(t):
        t = t.to(acc)
        return (t.index_select(1, perm) if perm is not None else t).contiguous()

    dy_s = to_sorted(dy) if dy is not None else None
    dh = to_sorted(dh_n).clone() if dh_n is not None else ws.new_zeros(D, batch, P)
    dc = None
    if mode == "lstm":
        dc = to_sorted(dc_n).clone() if dc_n is not None else ws.new_zeros(D, batch, hidden)
    dgi = _new((steps, batch, D * G), ws, zero=padded)
    dgh = _new((D, steps, batch, G), ws, zero=padded) if mode == "gru" else None
    dhp = _new((D, steps, batch, P), ws, zero=padded) if proj_size else None
    dh_raw = ws.new_empty(batch, hidden) if proj_size else None
    for d, (_, w_hh, _, _, w_hr) in enumerate(dirs):
        w_hh = w_hh.to(acc)
        w_hr = w_hr.to(acc) if w_hr is not None else None
        dh_d = dh[d]
        for s in range(steps):
            t = steps - 1 - s if d == 0 else s
            n = active[t]
            if n == 0:
                continue
            dt = (d * steps + t) * batch
            if proj_size:
                if dy_s is not None:
                    torch.add(dh_d[:n], dy_s[t, :n, d * P : (d + 1) * P], out=dhp[d, t, :n])
                else:
                    dhp[d, t, :n] = dh_d[:n]
                torch.mm(dhp[d, t, :n], w_hr, out=dh_raw[:n])
                dh_args = (dh_raw, 0, hidden)
                dy_args, has_dy = (dh_raw, 0, 0), False
            else:
                dh_args = (dh, d * batch * P, P)
                has_dy = dy_s is not None
                dy_args = (dy_s, t * batch * D * P + d * P, D * P) if has_dy else (dh, 0, 0)
            _bwd_step_kernel[_grid(n, hidden)](
                *dh_args,
                *dy_args,
                ws,
                dt * S,
                hprev,
                dt * P,
                dc if dc is not None else ws,
                d * batch * hidden,
                dgi,
                t * batch * D * G + d * G,
                D * G,
                dgh if dgh is not None else ws,
                dt * G,
                n,
                hidden,
                P,
                MODE=MODE_ID[mode],
                HAS_DY=has_dy,
                BLOCK_B=BLOCK_B,
                BLOCK_H=BLOCK_H,
            )
            if mode == "gru":
                dh_d[:n].addmm_(dgh[d, t, :n], w_hh)  # in place, no temporary
            else:
                torch.mm(dgi[t, :n, d * G : (d + 1) * G], w_hh, out=dh_d[:n])

    # Single GEMMs over all steps; half-precision layers run them on half-precision operands
    # (dG rounded once) with fp32 accumulation, as the cuda backend.
    xs = x.to(gdt)
    if perm is not None:
        xs = xs.index_select(1, perm)
    xs = xs.reshape(steps * batch, inp)
    dgi2 = dgi.view(steps * batch, D * G)
    dgi2_g = dgi2.to(gdt)
    hprev_g = hprev.to(gdt)
    w_ih = torch.cat([d[0] for d in dirs]).to(gdt)
    dx = _mm_f32(dgi2_g, w_ih).view(steps, batch, inp)
    dw_ih = _mm_f32(dgi2_g.t(), xs)
    db = dgi2.sum(0) if has_biases else None
    dweights = [None] * len(weights)
    for d in range(D):
        dgh_d = dgh[d].view(-1, G) if mode == "gru" else dgi2[:, d * G : (d + 1) * G]
        dgh_g = dgh_d.to(gdt) if mode == "gru" else dgi2_g[:, d * G : (d + 1) * G]
        base, wt = d * per_dir, weights[d * per_dir].dtype
        dweights[base] = dw_ih[d * G : (d + 1) * G].to(wt)
        dweights[base + 1] = _mm_f32(dgh_g.t(), hprev_g[d].view(-1, P)).to(wt)
        if has_biases:
            dweights[base + 2] = db[d * G : (d + 1) * G].to(wt)
            dweights[base + 3] = (dgh_d.sum(0) if mode == "gru" else db[d * G : (d + 1) * G]).to(wt)
        if proj_size:
            dweights[base + per_dir - 1] = (dhp[d].view(-1, P).t() @ hraw[d].view(-1, hidden)).to(
                wt
            )

    def to_original(t):
        return t.index_select(1, inv) if inv is not None else t

    dx = to_original(dx).to(x.dtype)
    dh0 = to_original(dh).to(x.dtype)
    dc0 = to_original(dc).to(x.dtype) if dc is not None else None
    return dx, dh0, dc0, dweights
