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
  cancellation for large offsets).
* Forward, N > MAX_FUSED_N: one program per row loops over blocks of LOOP_BLOCK_N columns:
  pass 1 mean, pass 2 variance, pass 3 normalize (passes 2-3 mostly hit L2).
* Backward, N <= MAX_FUSED_N: a fixed number of programs each walk a contiguous range of
  rows, write dx, and keep dweight / dbias partial sums in registers; each program stores
  its partial row to a (programs, N) fp32 buffer, and a second kernel adds those rows in a
  fixed order. No atomics: results are bitwise reproducible.
* Backward, N > MAX_FUSED_N: dx one program per row (two looped passes); dweight / dbias by
  a column-tiled kernel over row splits, then the same fixed-order sum.

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

On a GPU the warp count is autotuned per tile size; under the interpreter (no GPU) there is
one configuration, since autotuning several needs a GPU driver.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Rows up to MAX_FUSED_N columns are handled in registers; longer ones loop over blocks of
# LOOP_BLOCK_N columns. Module attributes, so tests can lower them to exercise the loops.
MAX_FUSED_N = 16384
LOOP_BLOCK_N = 4096
# Elements per program tile when several short rows share a program.
TILE_ELEMS = 4096
MAX_BLOCK_R = 64 if INTERPRET else 256
# Programs of the fused backward (each keeps one dweight / dbias partial row). A constant,
# not the SM count, so the summation order is the same on every GPU.
BWD_PROGRAMS = 4 if INTERPRET else 512
# dweight / dbias column kernel (long rows): tile and rows per split.
DW_BLOCK_N = 128
DW_BLOCK_R = 32
DW_ROWS_PER_SPLIT = 256
DW_MAX_SPLITS = 128


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
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    c_ok = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=c_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_begin = pid * rows_per_prog
    row_end = tl.minimum(row_begin + rows_per_prog, n_rows)
    for r0 in range(row_begin, row_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
        row_ok = rows < row_end
        rows64 = rows.to(tl.int64)
        mask = row_ok[:, None] & c_ok[None, :]
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0)
        dy = dy.to(tl.float32)
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
        if IS_RMS:
            xhat = x * rstd[:, None]
        else:
            mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
            xhat = (x - mean[:, None]) * rstd[:, None]
        xhat = tl.where(mask, xhat, 0.0)
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
            dw_acc += tl.sum(dy * xhat, axis=0)
        if PARTIAL_B:
            db_acc += tl.sum(dy, axis=0)
    part = pid.to(tl.int64) * N + cols
    if PARTIAL_W:
        tl.store(DW_part + part, dw_acc, mask=c_ok)
    if PARTIAL_B:
        tl.store(DB_part + part, db_acc, mask=c_ok)


@triton.jit
def _norm_bwd_dx_loop_kernel(
    DY,  # (n_rows, N), row stride stride_dy
    X,  # (n_rows, N), row stride stride_x
    W,  # (N,) (unused unless HAS_W)
    Mean,  # (n_rows,) fp32 (unused if IS_RMS)
    Rstd,  # (n_rows,) fp32
    DX,  # (n_rows, N), row stride stride_dx
    DS,  # (n_rows, N) gradient of the x + residual output (unused unless HAS_DS)
    stride_dy,
    stride_x,
    stride_dx,
    stride_ds,
    n_rows,
    N,
    IS_RMS: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_DS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
    mean = tl.zeros([BLOCK_R], dtype=tl.float32)
    if not IS_RMS:
        mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
    acc_g = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    acc_gx = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):  # pass 1: sum(g) and sum(g * xhat)
        c = start + cols
        c_ok = c < N
        mask = row_ok[:, None] & c_ok[None, :]
        dy = tl.load(DY + rows64[:, None] * stride_dy + c[None, :], mask=mask, other=0.0)
        x = tl.load(X + rows64[:, None] * stride_x + c[None, :], mask=mask, other=0.0)
        xhat = tl.where(mask, (x.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
        g = dy.to(tl.float32)
        if HAS_W:
            g = g * tl.load(W + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        acc_g += g
        acc_gx += g * xhat
    mean_gx = tl.sum(acc_gx, axis=1) / N
    mean_g = tl.zeros([BLOCK_R], dtype=tl.float32)
    if not IS_RMS:
        mean_g = tl.sum(acc_g, axis=1) / N
    for start in range(0, N, BLOCK_N):  # pass 2: dx
        c = start + cols
        c_ok = c < N
        mask = row_ok[:, None] & c_ok[None, :]
        dy = tl.load(DY + rows64[:, None] * stride_dy + c[None, :], mask=mask, other=0.0)
        x = tl.load(X + rows64[:, None] * stride_x + c[None, :], mask=mask, other=0.0)
        xhat = (x.to(tl.float32) - mean[:, None]) * rstd[:, None]
        g = dy.to(tl.float32)
        if HAS_W:
            g = g * tl.load(W + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        dx = (g - (mean_g[:, None] + xhat * mean_gx[:, None])) * rstd[:, None]
        if HAS_DS:
            ds = tl.load(DS + rows64[:, None] * stride_ds + c[None, :], mask=mask, other=0.0)
            dx += ds.to(tl.float32)
        tl.store(
            DX + rows64[:, None] * stride_dx + c[None, :], dx.to(DX.dtype.element_ty), mask=mask
        )


@triton.jit
def _norm_dwdb_kernel(
    DY,  # (n_rows, N), row stride stride_dy
    X,  # (n_rows, N), row stride stride_x
    Mean,  # (n_rows,) fp32 (unused if IS_RMS)
    Rstd,  # (n_rows,) fp32
    DW_part,  # (splits, N) fp32 (unused unless PARTIAL_W)
    DB_part,  # (splits, N) fp32 (unused unless PARTIAL_B)
    stride_dy,
    stride_x,
    n_rows,
    N,
    rows_per_split,
    IS_RMS: tl.constexpr,
    PARTIAL_W: tl.constexpr,
    PARTIAL_B: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)  # column tile
    pid_s = tl.program_id(1)  # row split
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    c_ok = cols < N
    row_begin = pid_s * rows_per_split
    row_end = tl.minimum(row_begin + rows_per_split, n_rows)
    acc_w = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    for r0 in range(row_begin, row_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < row_end
        rows64 = rows.to(tl.int64)
        mask = row_ok[:, None] & c_ok[None, :]
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0)
        dy = dy.to(tl.float32)
        if PARTIAL_W:
            x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
            rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
            if IS_RMS:
                xhat = x.to(tl.float32) * rstd[:, None]
            else:
                mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
                xhat = (x.to(tl.float32) - mean[:, None]) * rstd[:, None]
            acc_w += tl.where(mask, dy * xhat, 0.0)
        if PARTIAL_B:
            acc_b += dy
    part = pid_s.to(tl.int64) * N + cols
    if PARTIAL_W:
        tl.store(DW_part + part, tl.sum(acc_w, axis=0), mask=c_ok)
    if PARTIAL_B:
        tl.store(DB_part + part, tl.sum(acc_b, axis=0), mask=c_ok)


@triton.jit
def _sum_partials_kernel(
    P,  # (n_parts, N) fp32
    OUT,  # (N,) output dtype
    n_parts,
    N,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = cols < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for i in range(0, n_parts):  # fixed order: deterministic
        acc += tl.load(P + i * N + cols, mask=c_ok, other=0.0)
    tl.store(OUT + cols, acc.to(OUT.dtype.element_ty), mask=c_ok)


# ---- launch helpers --------------------------------------------------------------------------

_TUNED: dict = {}


def _warp_options(tile_elems: int) -> tuple[int, ...]:
    """Warp counts giving each thread 2..64 elements of a tile."""
    opts = tuple(w for w in (1, 2, 4, 8, 16) if 2 <= tile_elems // (32 * w) <= 64)
    return opts or ((1,) if tile_elems < 64 else (16,))


def _kernel(fn, tile_elems: int):
    """``fn`` itself under the interpreter; on a GPU, ``fn`` autotuned over warp counts that
    suit the tile size (one autotuner per kernel and option set)."""
    if INTERPRET:
        return fn
    warps = _warp_options(tile_elems)
    key = (fn, warps)
    if key not in _TUNED:
        configs = [triton.Config({}, num_warps=w) for w in warps]
        _TUNED[key] = triton.autotune(configs=configs, key=["N", "BLOCK_R", "BLOCK_N"])(fn)
    return _TUNED[key]


def _poison() -> bool:
    return os.environ.get("TURBOLM_POISON_OUTPUTS") == "1"


def _new(shape, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A new output; NaN-filled under TURBOLM_POISON_OUTPUTS=1 (catches unwritten elements)."""
    dtype = dtype or like.dtype
    if _poison():
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


def _rows_major(t: torch.Tensor) -> torch.Tensor:
    """``t`` with a contiguous last dimension (row stride may be anything)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _rows_per_tile(rows: int, block_n: int) -> int:
    return max(1, min(TILE_ELEMS // block_n, triton.next_power_of_2(rows), MAX_BLOCK_R))


def _sum_partials(part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n_parts, n = part.shape
    out = _new((n,), part, dtype)
    block = min(1024, triton.next_power_of_2(n))
    kernel = _kernel(_sum_partials_kernel, block)
    kernel[(triton.cdiv(n, block),)](part, out, n_parts, n, BLOCK_N=block)
    return out


# ---- launchers --------------------------------------------------------------------------------


def _norm_fwd(x, weight, bias, eps: float, rms: bool, residual=None):
    rows, n = x.shape
    x = _rows_major(x)
    res = _rows_major(residual) if residual is not None else None
    y = _new((rows, n), x)
    s = _new((rows, n), x) if res is not None else None
    mean = None if rms else _new((rows,), x, torch.float32)
    rstd = _new((rows,), x, torch.float32)
    if rows == 0:
        return y, mean, rstd, s
    loop = n > MAX_FUSED_N
    block_n = LOOP_BLOCK_N if loop else triton.next_power_of_2(n)
    block_r = 1 if loop else _rows_per_tile(rows, block_n)
    kernel = _kernel(_norm_fwd_kernel, block_r * block_n)
    kernel[(triton.cdiv(rows, block_r),)](
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
    f32 = torch.float32
    if n <= MAX_FUSED_N:
        block_n = triton.next_power_of_2(n)
        block_r = _rows_per_tile(rows, block_n)
        programs = max(1, min(triton.cdiv(rows, block_r), BWD_PROGRAMS))
        rows_per_prog = triton.cdiv(triton.cdiv(rows, programs), block_r) * block_r
        programs = max(1, triton.cdiv(rows, rows_per_prog)) if rows else 1
        dw_part = torch.empty((programs, n), dtype=f32, device=x.device) if need_w else None
        db_part = torch.empty((programs, n), dtype=f32, device=x.device) if need_b else None
        kernel = _kernel(_norm_bwd_fused_kernel, block_r * block_n)
        kernel[(programs,)](
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
            max(rows_per_prog, 1),
            IS_RMS=rms,
            HAS_W=need_w,
            HAS_DS=ds is not None,
            PARTIAL_W=need_w,
            PARTIAL_B=need_b,
            BLOCK_R=block_r,
            BLOCK_N=block_n,
        )
    else:
        if rows:
            kernel = _kernel(_norm_bwd_dx_loop_kernel, LOOP_BLOCK_N)
            kernel[(rows,)](
                dy,
                x,
                w_arg,
                mean_arg,
                rstd,
                dx,
                ds_arg,
                dy.stride(0),
                x.stride(0),
                dx.stride(0),
                ds_stride,
                rows,
                n,
                IS_RMS=rms,
                HAS_W=need_w,
                HAS_DS=ds is not None,
                BLOCK_R=1,
                BLOCK_N=LOOP_BLOCK_N,
            )
        dw_part = db_part = None
        if need_w or need_b:
            splits = max(1, min(DW_MAX_SPLITS, triton.cdiv(rows, DW_ROWS_PER_SPLIT)))
            rows_per_split = triton.cdiv(triton.cdiv(rows, splits), DW_BLOCK_R) * DW_BLOCK_R
            rows_per_split = max(rows_per_split, DW_BLOCK_R)
            dw_part = torch.empty((splits, n), dtype=f32, device=x.device) if need_w else None
            db_part = torch.empty((splits, n), dtype=f32, device=x.device) if need_b else None
            kernel = _kernel(_norm_dwdb_kernel, DW_BLOCK_R * DW_BLOCK_N)
            kernel[(triton.cdiv(n, DW_BLOCK_N), splits)](
                dy,
                x,
                mean_arg,
                rstd,
                dw_part if need_w else rstd,
                db_part if need_b else rstd,
                dy.stride(0),
                x.stride(0),
                rows,
                n,
                rows_per_split,
                IS_RMS=rms,
                PARTIAL_W=need_w,
                PARTIAL_B=need_b,
                BLOCK_R=DW_BLOCK_R,
                BLOCK_N=DW_BLOCK_N,
            )
    dw = _sum_partials(dw_part, weight.dtype) if need_w else None
    db = _sum_partials(db_part, x.dtype) if need_b else None
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
