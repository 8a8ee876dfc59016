"""LayerNorm / RMSNorm in Triton: forward and backward kernels and their launchers.

Design
------
Every kernel reads rows of a (rows, N) matrix whose last dimension is contiguous, computes
statistics in fp32 whatever the storage dtype (fp32 / fp16 / bf16), and stores in the
storage dtype. Plain pointer arithmetic with masks only (no block pointers), so the same code
runs on Triton 3.6, 3.8 and 3.9 and under ``TRITON_INTERPRET=1``.

* Forward, N <= MAX_FUSED_N: one program normalizes a tile of BLOCK_R rows x BLOCK_N columns
  held in registers (several rows per program when N is small), two-pass statistics in
  registers: mean, then mean of squared deviations (exact for constant rows, no
  cancellation for large offsets). mean / rstd are saved for the backward (never recomputed).
* Forward, N > MAX_FUSED_N: one program per row loops over blocks of LOOP_BLOCK_N columns:
  pass 1 mean, pass 2 variance, pass 3 normalize (passes 2-3 mostly hit L2).
* Backward, N <= BWD_MAX_FUSED_N (one read of dy and x): a grid of about
  BWD_PROGRAMS_PER_SM x (number of SMs) programs, each walking a contiguous range of rows a
  tile at a time (the next tile's loads issued before the current one is computed); it
  writes dx and keeps dweight / dbias partial sums in fp32 registers, stored once as its row
  of a small (programs, N) fp32 buffer. A second kernel sums those rows in a fixed order,
  BLOCK_P rows per step over column tiles, and casts to the parameters' dtype (dweight and
  dbias in one launch). No atomics: for a given GPU model and shape, bitwise reproducible.
* Backward, N > BWD_MAX_FUSED_N: pass 1 computes the two per-row means dx needs (one
  program per row); pass 2, a (column tile, row split) grid, writes dx and the dweight /
  dbias partials in one more read of dy and x; then the same fixed-order sum.

Launch configuration is a fixed function of the shape (rows per tile, warps: about 16
elements per thread); ``TURBOLM_NORM_AUTOTUNE=1`` autotunes the warp count on a GPU instead
(results may then differ in the last bit between processes, as the reduction tree changes).

Why it is shaped this way (the first version measured 0.66 ms vs torch's 0.10 ms for
LayerNorm bf16 8192x1024 fwd+bwd on an H200; the causes below are read from the code, not
yet profiled): its dweight / dbias sum ran one program per 1024 columns looping over 512
partial rows one at a time (hundreds of serial global loads: latency-bound), from a 512-row
partial buffer, in two launches; the fused backward reduced its partials across warps on
every tile; long rows re-read dy and x in a separate dweight / dbias kernel; and every launch
went through ``triton.autotune``'s Python wrapper.

Formulas (xhat = (x - mean) * rstd, g = dy * w; RMSNorm has mean = 0 and no mean(g) term):
    y = xhat * w + b
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
    dw = sum_rows(dy * xhat),  db = sum_rows(dy)

Fused residual add (pre-norm Transformers): with ``residual`` the forward normalizes
s = x + residual (rounded to x's dtype, as the unfused add) and also stores s; the backward
adds the gradient of s to dx (the gradient of both x and residual).

Launchers: ``layer_norm_fwd(x, weight, bias, eps[, residual]) -> (y, mean, rstd[, s])``,
``layer_norm_bwd(dy, x, weight, mean, rstd, has_bias) -> (dx, dweight, dbias)``,
``rms_norm_fwd(x, weight, eps) -> (y, rstd)``, ``rms_norm_bwd(dy, x, weight, rstd) ->
(dx, dweight)``; gradients of absent parameters are None. mean / rstd are (rows,) fp32.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Forward: rows up to MAX_FUSED_N columns are held in registers; longer ones loop over blocks
# of LOOP_BLOCK_N columns. Backward: up to BWD_MAX_FUSED_N columns one fused kernel (one read
# of dy and x); longer rows take two passes (row means, then dx + dweight/dbias by column
# tiles). Module attributes, so tests can lower them to exercise the long-row paths.
MAX_FUSED_N = 16384
BWD_MAX_FUSED_N = 8192
LOOP_BLOCK_N = 4096
# Elements per program tile when several short rows share a program (forward / backward).
TILE_ELEMS = 4096
BWD_TILE_ELEMS = 4096
MAX_BLOCK_R = 64 if INTERPRET else 256
# Fused backward: programs per SM (each keeps one dweight / dbias partial row, so the partial
# buffer is about SMs x N fp32), and the largest tile whose next tile is prefetched.
BWD_PROGRAMS_PER_SM = 2
PREFETCH_MAX_TILE = 8192
# Long-row backward: (column tile, row split) programs of DW_BLOCK_R x DW_BLOCK_N, about
# COLS_PROGRAMS_PER_SM per SM.
DW_BLOCK_N = 512
DW_BLOCK_R = 8
COLS_PROGRAMS_PER_SM = 4
# Sum of the partial rows: column tile and tile size.
SUM_BLOCK_N = 256
SUM_TILE_ELEMS = 8192


# ---- kernels ------------------------------------------------------------------------------


@triton.jit
def _load_input(x_rows, r_rows, s_rows, c, mask, HAS_RES: tl.constexpr, STORE_SUM: tl.constexpr):
    """The normalized input at columns ``c`` as fp32: x, or with a residual s = x + r rounded
    to x's dtype (what the unfused ``norm(x + r)`` sees), stored to S when STORE_SUM."""
    x = tl.load(x_rows + c[None, :], mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(r_rows + c[None, :], mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        if STORE_SUM:
            tl.store(s_rows + c[None, :], x, mask=mask)
    return x.to(tl.float32)


@triton.jit
def _norm_fwd_kernel(
    X,  # (n_rows, N), row stride stride_x
    R,  # (n_rows, N) residual, row stride stride_r (unused unless HAS_RES)
    S,  # (n_rows, N) out: x + residual, row stride stride_s (unused unless HAS_RES)
    Y,  # (n_rows, N), row stride stride_y
    W,  # (N,) weight (unused unless HAS_W)
    B,  # (N,) bias (unused unless HAS_B)
    Mean,  # (n_rows,) fp32 (unused if IS_RMS)
    Rstd,  # (n_rows,) fp32
    stride_x,
    stride_r,
    stride_s,
    stride_y,
    n_rows,
    N,
    eps,
    IS_RMS: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_RES: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    LOOP: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    x_rows = X + rows64[:, None] * stride_x  # (BLOCK_R, 1) pointers
    r_rows = R + rows64[:, None] * stride_r
    s_rows = S + rows64[:, None] * stride_s
    y_rows = Y + rows64[:, None] * stride_y
    mean = tl.zeros([BLOCK_R], dtype=tl.float32)
    if LOOP:
        acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
        if not IS_RMS:
            for start in range(0, N, BLOCK_N):  # pass 1: mean
                c = start + cols
                mask = row_ok[:, None] & (c < N)[None, :]
                acc += _load_input(x_rows, r_rows, s_rows, c, mask, HAS_RES, False)
            mean = tl.sum(acc, axis=1) / N
            acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):  # pass 2: mean of squared deviations
            c = start + cols
            mask = row_ok[:, None] & (c < N)[None, :]
            x = _load_input(x_rows, r_rows, s_rows, c, mask, HAS_RES, False)
            xc = tl.where(mask, x - mean[:, None], 0.0)
            acc += xc * xc
        rstd = tl.rsqrt(tl.sum(acc, axis=1) / N + eps)
        for start in range(0, N, BLOCK_N):  # pass 3: normalize (and store x + residual)
            c = start + cols
            c_ok = c < N
            mask = row_ok[:, None] & c_ok[None, :]
            x = _load_input(x_rows, r_rows, s_rows, c, mask, HAS_RES, True)
            y = (x - mean[:, None]) * rstd[:, None]
            if HAS_W:
                y = y * tl.load(W + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
            if HAS_B:
                y = y + tl.load(B + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(y_rows + c[None, :], y.to(Y.dtype.element_ty), mask=mask)
    else:
        c_ok = cols < N
        mask = row_ok[:, None] & c_ok[None, :]
        x = _load_input(x_rows, r_rows, s_rows, cols, mask, HAS_RES, True)
        if IS_RMS:
            xc = x
        else:
            mean = tl.sum(x, axis=1) / N
            xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / N + eps)
        y = xc * rstd[:, None]
        if HAS_W:
            y = y * tl.load(W + cols, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            y = y + tl.load(B + cols, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_rows + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    if not IS_RMS:
        tl.store(Mean + rows, mean, mask=row_ok)
    tl.store(Rstd + rows, rstd, mask=row_ok)


@triton.jit
def _bwd_load(
    DY, X, Mean, Rstd, rows, row_ok, cols, c_ok, stride_dy, stride_x, IS_RMS: tl.constexpr
):
    """dy and x of a (BLOCK_R, BLOCK_N) tile in their storage dtype, and the rows' mean / rstd."""
    rows64 = rows.to(tl.int64)
    mask = row_ok[:, None] & c_ok[None, :]
    dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0)
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
    mean = tl.zeros_like(rstd)
    if not IS_RMS:
        mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
    return dy, x, mean, rstd


@triton.jit
def _norm_bwd_fused_kernel(
    DY,  # (n_rows, N), row stride stride_dy
    X,  # (n_rows, N), row stride stride_x
    W,  # (N,) (unused unless HAS_W)
    Mean,  # (n_rows,) fp32 (unused if IS_RMS)
    Rstd,  # (n_rows,) fp32
    DX,  # (n_rows, N), row stride stride_dx
    DS,  # (n_rows, N) gradient of the x + residual output, added to dx (unused unless HAS_DS)
    DW_part,  # (programs, N) fp32 partial sums of dy * xhat (unused unless PARTIAL_W)
    DB_part,  # (programs, N) fp32 partial sums of dy (unused unless PARTIAL_B)
    stride_dy,
    stride_x,
    stride_dx,
    stride_ds,
    n_rows,
    N,
    rows_per_prog,
    IS_RMS: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_DS: tl.constexpr,
    PARTIAL_W: tl.constexpr,
    PARTIAL_B: tl.constexpr,
    PREFETCH: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program per contiguous range of rows (a grid of about the number of SMs): dx of
    each tile, and dweight / dbias accumulated in registers over the whole range, stored once
    as this program's partial row. With PREFETCH the next tile's loads are issued before the
    current tile is computed (software pipelining by hand: more bytes in flight per SM)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    c_ok = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=c_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    row_begin = pid * rows_per_prog
    row_end = tl.minimum(row_begin + rows_per_prog, n_rows)
    r_idx = tl.arange(0, BLOCK_R)
    rows = row_begin + r_idx
    row_ok = rows < row_end
    if PREFETCH:
        dy_n, x_n, mean_n, rstd_n = _bwd_load(
            DY, X, Mean, Rstd, rows, row_ok, cols, c_ok, stride_dy, stride_x, IS_RMS
        )
    for r0 in range(row_begin, row_end, BLOCK_R):
        rows = r0 + r_idx  # (BLOCK_R,)
        row_ok = rows < row_end
        if PREFETCH:
            dy, x, mean, rstd = dy_n, x_n, mean_n, rstd_n
            nxt = rows + BLOCK_R
            dy_n, x_n, mean_n, rstd_n = _bwd_load(
                DY, X, Mean, Rstd, nxt, nxt < row_end, cols, c_ok, stride_dy, stride_x, IS_RMS
            )
        else:
            dy, x, mean, rstd = _bwd_load(
                DY, X, Mean, Rstd, rows, row_ok, cols, c_ok, stride_dy, stride_x, IS_RMS
            )
        rows64 = rows.to(tl.int64)
        mask = row_ok[:, None] & c_ok[None, :]
        dy = dy.to(tl.float32)
        xhat = tl.where(mask, (x.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_W:
            g = dy * w[None, :]
        else:
            g = dy
        mean_gx = tl.sum(g * xhat, axis=1) / N
        if IS_RMS:
            dx = (g - xhat * mean_gx[:, None]) * rstd[:, None]
        else:
            mean_g = tl.sum(g, axis=1) / N
            dx = (g - (mean_g[:, None] + xhat * mean_gx[:, None])) * rstd[:, None]
        if HAS_DS:
            ds = tl.load(DS + rows64[:, None] * stride_ds + cols[None, :], mask=mask, other=0.0)
            dx += ds.to(tl.float32)
        tl.store(
            DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask
        )
        if PARTIAL_W:
            dw_acc += dy * xhat  # masked: xhat is 0 outside the tile
        if PARTIAL_B:
            db_acc += dy  # masked loads give 0 outside the tile
    part = pid.to(tl.int64) * N + cols
    if PARTIAL_W:
        tl.store(DW_part + part, tl.sum(dw_acc, axis=0), mask=c_ok)
    if PARTIAL_B:
        tl.store(DB_part + part, tl.sum(db_acc, axis=0), mask=c_ok)


@triton.jit
def _norm_bwd_row_sums_kernel(
    DY,  # (n_rows, N), row stride stride_dy
    X,  # (n_rows, N), row stride stride_x
    W,  # (N,) (unused unless HAS_W)
    Mean,  # (n_rows,) fp32 (unused if IS_RMS)
    Rstd,  # (n_rows,) fp32
    C_gx,  # (n_rows,) fp32 out: mean(g * xhat)
    C_g,  # (n_rows,) fp32 out: mean(g) (unused if IS_RMS)
    stride_dy,
    stride_x,
    n_rows,
    N,
    IS_RMS: tl.constexpr,
    HAS_W: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Long rows, pass 1: the two per-row means dx needs (g = dy * w)."""
    row = tl.program_id(0)
    row64 = row.to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    rstd = tl.load(Rstd + row)
    mean = 0.0
    if not IS_RMS:
        mean = tl.load(Mean + row)
    acc_g = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_gx = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        c = start + cols
        c_ok = c < N
        dy = tl.load(DY + row64 * stride_dy + c, mask=c_ok, other=0.0).to(tl.float32)
        x = tl.load(X + row64 * stride_x + c, mask=c_ok, other=0.0).to(tl.float32)
        xhat = tl.where(c_ok, (x - mean) * rstd, 0.0)
        g = dy
        if HAS_W:
            g = g * tl.load(W + c, mask=c_ok, other=0.0).to(tl.float32)
        acc_g += g
        acc_gx += g * xhat
    tl.store(C_gx + row, tl.sum(acc_gx, axis=0) / N)
    if not IS_RMS:
        tl.store(C_g + row, tl.sum(acc_g, axis=0) / N)


@triton.jit
def _norm_bwd_cols_kernel(
    DY,  # (n_rows, N), row stride stride_dy
    X,  # (n_rows, N), row stride stride_x
    W,  # (N,) (unused unless HAS_W)
    Mean,  # (n_rows,) fp32 (unused if IS_RMS)
    Rstd,  # (n_rows,) fp32
    C_gx,  # (n_rows,) fp32: mean(g * xhat) from pass 1
    C_g,  # (n_rows,) fp32: mean(g) from pass 1 (unused if IS_RMS)
    DX,  # (n_rows, N), row stride stride_dx
    DS,  # (n_rows, N) gradient of the x + residual output (unused unless HAS_DS)
    DW_part,  # (splits, N) fp32 (unused unless PARTIAL_W)
    DB_part,  # (splits, N) fp32 (unused unless PARTIAL_B)
    stride_dy,
    stride_x,
    stride_dx,
    stride_ds,
    n_rows,
    N,
    rows_per_split,
    IS_RMS: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_DS: tl.constexpr,
    PARTIAL_W: tl.constexpr,
    PARTIAL_B: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Long rows, pass 2: a (column tile, row split) grid; each program writes dx of its
    tile column over its rows and its partial dweight / dbias (one read of dy and x)."""
    pid_n = tl.program_id(0)  # column tile
    pid_s = tl.program_id(1)  # row split
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    c_ok = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=c_ok, other=0.0).to(tl.float32)
    row_begin = pid_s * rows_per_split
    row_end = tl.minimum(row_begin + rows_per_split, n_rows)
    acc_w = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    for r0 in range(row_begin, row_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < row_end
        dy, x, mean, rstd = _bwd_load(
            DY, X, Mean, Rstd, rows, row_ok, cols, c_ok, stride_dy, stride_x, IS_RMS
        )
        rows64 = rows.to(tl.int64)
        mask = row_ok[:, None] & c_ok[None, :]
        dy = dy.to(tl.float32)
        xhat = tl.where(mask, (x.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_W:
            g = dy * w[None, :]
        else:
            g = dy
        c_gx = tl.load(C_gx + rows, mask=row_ok, other=0.0)
        if IS_RMS:
            dx = (g - xhat * c_gx[:, None]) * rstd[:, None]
        else:
            c_g = tl.load(C_g + rows, mask=row_ok, other=0.0)
            dx = (g - (c_g[:, None] + xhat * c_gx[:, None])) * rstd[:, None]
        if HAS_DS:
            ds = tl.load(DS + rows64[:, None] * stride_ds + cols[None, :], mask=mask, other=0.0)
            dx += ds.to(tl.float32)
        tl.store(
            DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask
        )
        if PARTIAL_W:
            acc_w += dy * xhat
        if PARTIAL_B:
            acc_b += dy
    part = pid_s.to(tl.int64) * N + cols
    if PARTIAL_W:
        tl.store(DW_part + part, tl.sum(acc_w, axis=0), mask=c_ok)
    if PARTIAL_B:
        tl.store(DB_part + part, tl.sum(acc_b, axis=0), mask=c_ok)


@triton.jit
def _sum_partials_kernel(
    PW,  # (n_parts, N) fp32 (unused unless HAS_W)
    PB,  # (n_parts, N) fp32 (unused unless HAS_B)
    OUT_W,  # (N,) weight dtype
    OUT_B,  # (N,) bias dtype
    n_parts,
    N,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Column sums of the partial rows, BLOCK_P rows at a time, in a fixed order (no atomics:
    deterministic); dweight and dbias in one launch, cast to the parameters' dtype."""
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = cols < N
    acc_w = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for p0 in range(0, n_parts, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        offs = p.to(tl.int64)[:, None] * N + cols[None, :]
        mask = (p < n_parts)[:, None] & c_ok[None, :]
        if HAS_W:
            acc_w += tl.load(PW + offs, mask=mask, other=0.0)
        if HAS_B:
            acc_b += tl.load(PB + offs, mask=mask, other=0.0)
    if HAS_W:
        tl.store(OUT_W + cols, tl.sum(acc_w, axis=0).to(OUT_W.dtype.element_ty), mask=c_ok)
    if HAS_B:
        tl.store(OUT_B + cols, tl.sum(acc_b, axis=0).to(OUT_B.dtype.element_ty), mask=c_ok)


# ---- launch helpers --------------------------------------------------------------------------

_TUNED: dict = {}
_SM_COUNT: dict = {}


def _num_warps(tile_elems: int) -> int:
    """Warps for a tile: about 16 elements per thread (the tile's loads in flight, few
    registers), 1..16 warps."""
    return max(1, min(16, triton.next_power_of_2(max(tile_elems, 1)) // 512))


def _autotune() -> bool:
    return not INTERPRET and os.environ.get("TURBOLM_NORM_AUTOTUNE") == "1"


def _launch(fn, grid, tile_elems: int, *args, **meta):
    """Launch ``fn`` with the warp count for its tile. With TURBOLM_NORM_AUTOTUNE=1 (GPU
    only) the warp count is autotuned instead (once per kernel, N and tile shape): this may
    change the reduction order, so results may then differ in the last bit between processes.
    Without it the configuration is a fixed function of the shape (bitwise reproducible)."""
    warps = _num_warps(tile_elems)
    if not _autotune():
        return fn[grid](*args, **meta, num_warps=warps)
    options = tuple(sorted({max(1, warps // 2), warps, min(32, warps * 2)}))
    key = (fn, options)
    if key not in _TUNED:
        configs = [triton.Config({}, num_warps=w) for w in options]
        _TUNED[key] = triton.autotune(configs=configs, key=["N", "BLOCK_R", "BLOCK_N"])(fn)
    return _TUNED[key][grid](*args, **meta)


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (cached); 4 under the interpreter."""
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def _poison() -> bool:
    return os.environ.get("TURBOLM_POISON_OUTPUTS") == "1"


def _new(
    shape, like: torch.Tensor, dtype: torch.dtype | None = None, poison: bool | None = None
) -> torch.Tensor:
    """A new output; NaN-filled under TURBOLM_POISON_OUTPUTS=1 (catches unwritten elements).
    ``poison``: that setting, when the caller already read it (one environment read per op)."""
    dtype = dtype or like.dtype
    if poison if poison is not None else _poison():
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


def _rows_major(t: torch.Tensor) -> torch.Tensor:
    """``t`` with a contiguous last dimension (row stride may be anything)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _rows_per_tile(rows: int, block_n: int, tile_elems: int) -> int:
    return max(1, min(tile_elems // block_n, triton.next_power_of_2(rows), MAX_BLOCK_R))


def _sum_partials(dw_part, db_part, w_dtype, b_dtype):
    """(dweight, dbias): column sums of the (parts, N) fp32 partials (None where absent)."""
    part = dw_part if dw_part is not None else db_part
    n_parts, n = part.shape
    poison = _poison()
    dw = _new((n,), part, w_dtype, poison) if dw_part is not None else None
    db = _new((n,), part, b_dtype, poison) if db_part is not None else None
    block_n = min(SUM_BLOCK_N, triton.next_power_of_2(n))
    block_p = max(1, min(SUM_TILE_ELEMS // block_n, triton.next_power_of_2(n_parts)))
    _launch(
        _sum_partials_kernel,
        (triton.cdiv(n, block_n),),
        block_p * block_n,
        dw_part if dw_part is not None else part,
        db_part if db_part is not None else part,
        dw if dw is not None else part,
        db if db is not None else part,
        n_parts,
        n,
        HAS_W=dw_part is not None,
        HAS_B=db_part is not None,
        BLOCK_P=block_p,
        BLOCK_N=block_n,
    )
    return dw, db


# ---- launchers --------------------------------------------------------------------------------


def _norm_fwd(x, weight, bias, eps: float, rms: bool, residual=None):
    rows, n = x.shape
    x = _rows_major(x)
    res = _rows_major(residual) if residual is not None else None
    poison = _poison()
    y = _new((rows, n), x, poison=poison)
    s = _new((rows, n), x, poison=poison) if res is not None else None
    mean = None if rms else _new((rows,), x, torch.float32, poison)
    rstd = _new((rows,), x, torch.float32, poison)
    if rows == 0:
        return y, mean, rstd, s
    loop = n > MAX_FUSED_N
    block_n = LOOP_BLOCK_N if loop else triton.next_power_of_2(n)
    block_r = 1 if loop else _rows_per_tile(rows, block_n, TILE_ELEMS)
    _launch(
        _norm_fwd_kernel,
        (triton.cdiv(rows, block_r),),
        block_r * block_n,
        x,
        res if res is not None else x,
        s if s is not None else y,
        y,
        weight if weight is not None else x,
        bias if bias is not None else x,
        mean if mean is not None else rstd,
        rstd,
        x.stride(0),
        res.stride(0) if res is not None else 0,
        s.stride(0) if s is not None else 0,
        y.stride(0),
        rows,
        n,
        float(eps),
        IS_RMS=rms,
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        HAS_RES=res is not None,
        BLOCK_R=block_r,
        BLOCK_N=block_n,
        LOOP=loop,
    )
    return y, mean, rstd, s


def _norm_bwd(dy, x, weight, mean, rstd, has_bias: bool, rms: bool, dsum=None):
    rows, n = x.shape
    x, dy = _rows_major(x), _rows_major(dy)
    ds = _rows_major(dsum) if dsum is not None else None
    ds_arg, ds_stride = (ds, ds.stride(0)) if ds is not None else (dy, 0)
    dx = _new((rows, n), x)
    need_w, need_b = weight is not None, has_bias
    w_arg = weight if weight is not None else x
    mean_arg = mean if mean is not None else rstd
    f32, dev = torch.float32, x.device
    if rows == 0:  # no rows: zero parameter gradients, nothing to launch
        dw = torch.zeros(n, dtype=weight.dtype, device=dev) if need_w else None
        return dx, dw, torch.zeros(n, dtype=x.dtype, device=dev) if need_b else None
    flags = dict(
        IS_RMS=rms, HAS_W=need_w, HAS_DS=ds is not None, PARTIAL_W=need_w, PARTIAL_B=need_b
    )
    if n <= BWD_MAX_FUSED_N:
        block_n = triton.next_power_of_2(n)
        block_r = _rows_per_tile(rows, block_n, BWD_TILE_ELEMS)
        # About BWD_PROGRAMS_PER_SM programs per SM, each over a contiguous range of rows:
        # few (programs, N) partial rows to write and sum, enough bytes in flight per SM.
        programs = min(_sm_count(dev) * BWD_PROGRAMS_PER_SM, triton.cdiv(rows, block_r))
        rows_per_prog = triton.cdiv(rows, programs)
        programs = triton.cdiv(rows, rows_per_prog)
        dw_part = torch.empty((programs, n), dtype=f32, device=dev) if need_w else None
        db_part = torch.empty((programs, n), dtype=f32, device=dev) if need_b else None
        _launch(
            _norm_bwd_fused_kernel,
            (programs,),
            block_r * block_n,
            dy,
            x,
            w_arg,
            mean_arg,
            rstd,
            dx,
            ds_arg,
            dw_part if need_w else rstd,
            db_part if need_b else rstd,
            dy.stride(0),
            x.stride(0),
            dx.stride(0),
            ds_stride,
            rows,
            n,
            rows_per_prog,
            **flags,
            PREFETCH=block_r * block_n <= PREFETCH_MAX_TILE and rows_per_prog > block_r,
            BLOCK_R=block_r,
            BLOCK_N=block_n,
        )
    else:
        # Long rows: pass 1 the per-row means (reads dy, x), pass 2 dx and the dweight /
        # dbias partials over a (column tile, row split) grid (reads dy, x once more).
        c_gx = torch.empty((rows,), dtype=f32, device=dev)
        c_g = torch.empty((rows,), dtype=f32, device=dev) if not rms else c_gx
        _launch(
            _norm_bwd_row_sums_kernel,
            (rows,),
            LOOP_BLOCK_N,
            dy,
            x,
            w_arg,
            mean_arg,
            rstd,
            c_gx,
            c_g,
            dy.stride(0),
            x.stride(0),
            rows,
            n,
            IS_RMS=rms,
            HAS_W=need_w,
            BLOCK_N=LOOP_BLOCK_N,
        )
        col_tiles = triton.cdiv(n, DW_BLOCK_N)
        splits = max(
            1,
            min(
                triton.cdiv(rows, DW_BLOCK_R),
                triton.cdiv(_sm_count(dev) * COLS_PROGRAMS_PER_SM, col_tiles),
            ),
        )
        rows_per_split = triton.cdiv(rows, splits)
        splits = triton.cdiv(rows, rows_per_split)
        dw_part = torch.empty((splits, n), dtype=f32, device=dev) if need_w else None
        db_part = torch.empty((splits, n), dtype=f32, device=dev) if need_b else None
        _launch(
            _norm_bwd_cols_kernel,
            (col_tiles, splits),
            DW_BLOCK_R * DW_BLOCK_N,
            dy,
            x,
            w_arg,
            mean_arg,
            rstd,
            c_gx,
            c_g,
            dx,
            ds_arg,
            dw_part if need_w else rstd,
            db_part if need_b else rstd,
            dy.stride(0),
            x.stride(0),
            dx.stride(0),
            ds_stride,
            rows,
            n,
            rows_per_split,
            **flags,
            BLOCK_R=DW_BLOCK_R,
            BLOCK_N=DW_BLOCK_N,
        )
    dw = db = None
    if need_w or need_b:
        dw, db = _sum_partials(dw_part, db_part, weight.dtype if need_w else None, x.dtype)
    return dx, dw, db


def layer_norm_fwd(x: torch.Tensor, weight, bias, eps: float, residual=None):
    """x (rows, N) -> (y (rows, N), mean (rows,) fp32, rstd (rows,) fp32); with ``residual``
    (rows, N) it normalizes s = x + residual and returns (y, mean, rstd, s)."""
    y, mean, rstd, s = _norm_fwd(x, weight, bias, eps, rms=False, residual=residual)
    return (y, mean, rstd) if residual is None else (y, mean, rstd, s)


def layer_norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight, mean, rstd, has_bias: bool, dsum=None
):
    """-> (dx (rows, N), dweight (N,) or None, dbias (N,) or None). ``x`` is the normalized
    input (s with a residual); ``dsum``, the gradient of s, is added to dx."""
    return _norm_bwd(dy, x, weight, mean, rstd, has_bias, rms=False, dsum=dsum)


def rms_norm_fwd(x: torch.Tensor, weight, eps: float, residual=None):
    """x (rows, N) -> (y (rows, N), rstd (rows,) fp32); with ``residual``: (y, rstd, s)."""
    y, _, rstd, s = _norm_fwd(x, weight, None, eps, rms=True, residual=residual)
    return (y, rstd) if residual is None else (y, rstd, s)


def rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight, rstd, dsum=None):
    """-> (dx (rows, N), dweight (N,) or None); ``dsum`` as in :func:`layer_norm_bwd`."""
    dx, dw, _ = _norm_bwd(dy, x, weight, None, rstd, False, rms=True, dsum=dsum)
    return dx, dw
