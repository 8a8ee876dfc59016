"""FlashAttention-2 style attention in Triton: forward, backward, and their launchers.

Design
------
Notation: a query row i of one (batch, head) sequence of Tq queries sees key j of Tk keys when

    j < Tk,   j <= i + (Tk - Tq) + right   (if right >= 0),   j >= i + (Tk - Tq) - left   (if left >= 0)

(bottom-right aligned, FlashAttention's ``window_size=(left, right)``; ``causal`` is right = 0,
-1 means unbounded). Scores are computed in the log2 domain: s = (q . k) * scale * log2(e),
so every exponential is an ``exp2``.

* Forward (``_fwd_kernel``): one program per (batch * q-head, BLOCK_M query rows), the last
  query blocks (the longest under a causal mask) launched first. It walks
  the key blocks that can be visible to its rows with an online softmax: running row max m,
  running normalizer l, fp32 accumulator acc; rescales acc by exp2(m_old - m_new) when the max
  grows. The walk is split into at most three ranges: key blocks at the left window edge
  (masked), fully visible blocks (no mask arithmetic at all), and blocks at the causal / right
  window edge or the key tail (masked). It stores out = acc / l in the input dtype and the
  log-sum-exp lse = m + log2(l) (log2 domain, fp32) per row. A row that sees no key stores
  out = 0 and lse = +inf, which makes every recomputed probability of that row 0 in the
  backward, hence zero gradients.
* Backward, recomputing P = exp2(s - lse) instead of storing it:
  - ``_bwd_preprocess``: delta_i = sum_d dO_id * O_id (= rowsum(P * dP), also with dropout);
  - ``_bwd_dkdv_kernel``: one program per (BLOCK_N keys, batch * kv-head) keeps K, V and the
    dK, dV accumulators in registers and walks the visible query blocks of every q head of
    its group (GQA / MQA: the group's dK / dV are summed in registers, no atomics);
  - ``_bwd_dq_kernel``: one program per (BLOCK_M queries, batch * q-head) walks the visible
    key blocks and accumulates dQ.
  dS = P * (dP - delta); dQ = scale * dS K; dK = scale * dS^T Q; dV = P_dropped^T dO.
  Every output element is written by exactly one program: results are deterministic.
* Dropout: keep(i, j) = rand(seed, offset) >= p with Triton's Philox (``tl.rand``) and a 64-bit
  offset that names the element: ``offset = row * RNG_COLS + j`` with
  row = (batch * H + head) * Tq + i (dense) or head * total_q + (cu_seqlens_q[b] + i) (varlen)
  and RNG_COLS = Tk (dense) or max_seqlen_k (varlen). The forward and both backward kernels
  regenerate the same bits; ``dropout_keep_mask`` materializes them for tests. The softmax
  normalizer is computed before dropout; kept probabilities are scaled by 1 / (1 - p).
* Layouts by strides, no copies: (B, H, T, D) "bhsd", (B, T, H, D) "bshd", and packed
  variable-length "varlen" (total_tokens, H, D) with cu_seqlens (B + 1,) int32: sequence b
  owns rows cu_seqlens[b] .. cu_seqlens[b + 1] - 1; programs past a sequence's end exit.
  Only the head dimension must be contiguous (stride 1); else that tensor is copied.
* Head dims up to 256, padded to the next power of two (>= 16) inside the kernel with masks.
* Interpreter (``TRITON_INTERPRET=1``, CPU tensors, the CI path): the interpreter stores bf16
  as raw uint16, so a bf16 ``tl.dot`` multiplies bit patterns. With ``DOT_FP32`` (set whenever
  interpreting) every dot operand is first rounded to its storage dtype, then cast to fp32.
  One tile configuration when interpreting (autotuning several needs a GPU driver); on a GPU
  tiles are autotuned per head-dim class and dtype (the candidate lists are starting points,
  not yet measured). ``TURBOLM_AUTOTUNE=0`` takes each list's first entry, ``FORCE_CONFIG``
  pins one (tests, tuning).
* fp32 inputs use IEEE fp32 dots unless ``torch.backends.cuda.matmul.allow_tf32`` is set.
* Plain pointer arithmetic with masks (no block pointers, no early returns), written for
  Triton 3.6, 3.8 and 3.9; checked here on 3.8 only (interpreter, and compiled to sm_80 /
  sm_90 cubins by the tests without a GPU).

Launchers: ``attention_fwd(q, k, v, ...) -> (out, lse)`` and
``attention_bwd(dout, q, k, v, out, lse, ...) -> (dq, dk, dv)``; lse is (B, Hq, Tq) fp32 for
dense layouts, (Hq, total_q) for varlen, in log2 units.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


# Triton decides interpreted vs compiled when ``@triton.jit`` decorates (module import): this
# records the mode this module's kernels were built in.
INTERPRET = _env_flag("TRITON_INTERPRET")
# Tests: fill outputs with NaN before launching, so an element no program writes is caught
# (this flag, or TURBOLM_POISON_OUTPUTS=1 read at each call, as the other kernel families).
POISON = False
# Tile of the delta preprocessing kernel (rows per program).
PRE_BLOCK_M = 16 if INTERPRET else 64
# The kernels read the tiles they stream (forward: K / V; dK / dV: Q / dO) through
# device-side tensor descriptors (TMA, sm_90+) when the tensors allow it. Off by default
# until the H200 benchmark shows it wins (``TURBOLM_ATTN_TMA=1`` or this flag;
# bench_attention's ``turbolm_triton_tma`` provider).
TMA = _env_flag("TURBOLM_ATTN_TMA")


# ---- jit helpers ----------------------------------------------------------------------------


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """a @ b with fp32 accumulation; DOT_FP32 (interpreter) computes it on fp32 copies."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _visible(rows, cols, Tq, Tk, LEFT, RIGHT, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Bool tile: may query ``rows`` see key ``cols`` (both already broadcast to the tile)."""
    vis = (rows < Tq) & (cols < Tk)
    diag = rows + (Tk - Tq)  # the key aligned with each query (bottom-right alignment)
    if HAS_RIGHT:
        vis = vis & (cols <= diag + RIGHT)
    if HAS_LEFT:
        vis = vis & (cols >= diag - LEFT)
    return vis


@triton.jit
def _keep(seed, rng_rows, cols, RNG_COLS, drop_p):
    """Dropout keep mask from Philox: one uniform per (row, col) element, 64-bit offsets."""
    offsets = rng_rows.to(tl.int64) * RNG_COLS + cols
    return tl.rand(seed, offsets) >= drop_p


@triton.jit
def _key_blocks(
    start_m,
    Tq,
    Tk,
    LEFT,
    RIGHT,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
):
    """Key range [lo, hi) visible to query rows [start_m, start_m + BLOCK_M), and inside it the
    BLOCK_N-aligned range [full_lo, full_hi) of blocks visible to every row and in bounds.
    lo <= full_lo, full_lo <= full_hi <= hi unless hi < full_lo (then nothing is full)."""
    off = Tk - Tq
    zero = start_m * 0
    lo = zero
    hi = zero + Tk
    if HAS_LEFT:
        lo = tl.maximum(start_m + off - LEFT, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
    if HAS_RIGHT:
        hi = tl.maximum(tl.minimum(start_m + BLOCK_M + off + RIGHT, Tk), 0)
    full_lo = lo
    if HAS_LEFT:
        full_lo = tl.maximum(start_m + BLOCK_M - 1 + off - LEFT, lo)
        full_lo = ((full_lo + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    full_hi = zero + Tk
    if HAS_RIGHT:
        full_hi = tl.minimum(start_m + off + RIGHT + 1, Tk)
    full_hi = (tl.maximum(full_hi, 0) // BLOCK_N) * BLOCK_N
    full_hi = tl.maximum(full_hi, full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _query_blocks(
    start_n,
    Tq,
    Tk,
    LEFT,
    RIGHT,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
):
    """Query range [lo, hi) that can see keys [start_n, start_n + BLOCK_N), and the
    BLOCK_M-aligned range [full_lo, full_hi) of query blocks that see all of them."""
    off = Tk - Tq
    zero = start_n * 0
    lo = zero
    hi = zero + Tq
    if HAS_RIGHT:
        lo = tl.maximum(start_n - off - RIGHT, 0)
        lo = (lo // BLOCK_M) * BLOCK_M
    if HAS_LEFT:
        hi = tl.maximum(tl.minimum(start_n + BLOCK_N + LEFT - off, Tq), 0)
    full_lo = lo
    if HAS_RIGHT:
        full_lo = tl.maximum(start_n + BLOCK_N - 1 - off - RIGHT, lo)
        full_lo = ((full_lo + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    full_hi = zero + Tq
    if HAS_LEFT:
        full_hi = tl.minimum(start_n - off + LEFT + 1, Tq)
    full_hi = (tl.maximum(full_hi, 0) // BLOCK_M) * BLOCK_M
    if start_n + BLOCK_N > Tk:  # key tail: mask every block
        full_hi = full_lo
    full_hi = tl.maximum(full_hi, full_lo)
    return lo, full_lo, full_hi, hi


# ---- forward --------------------------------------------------------------------------------


@triton.jit
def _fwd_inner(
    acc,
    l_i,
    m_i,
    q,  # [BLOCK_M, BLOCK_D] queries of this program
    kT_ptrs,  # [BLOCK_D, BLOCK_N] pointers to K^T of key block 0
    v_ptrs,  # [BLOCK_N, BLOCK_D] pointers to V of key block 0
    k_desc,  # USE_TMA: tensor descriptor of this head's K, [Tk, HEAD_D] (else unused)
    v_desc,  # USE_TMA: likewise for V
    stride_kt,
    stride_vt,
    rows,  # [BLOCK_M] query index within the sequence
    offs_n,  # [BLOCK_N] arange
    d_ok,  # [BLOCK_D] head-dim padding mask
    Tq,
    Tk,
    LEFT,
    RIGHT,
    qk_scale,
    drop_p,
    seed,
    rng_rows,  # [BLOCK_M] int64 dropout row ids
    RNG_COLS,
    lo,
    hi,
    MASKED: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    DROPOUT: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN_D: tl.constexpr,  # head_dim == BLOCK_D: no head-dim padding to mask
    USE_TMA: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        # The unmasked blocks lie inside [0, Tk): their loads need no key-bound mask (and none
        # at all without head-dim padding), which keeps the pipelined loads simple. A tensor
        # descriptor's copy engine fills rows >= Tk and columns >= HEAD_D with zeros itself.
        if USE_TMA:
            kT = tl.trans(k_desc.load([start_n, 0]))
        elif MASKED:
            kT = tl.load(
                kT_ptrs + start_n * stride_kt, mask=d_ok[:, None] & (cols[None, :] < Tk), other=0.0
            )
        elif EVEN_D:
            kT = tl.load(kT_ptrs + start_n * stride_kt)
        else:
            kT = tl.load(kT_ptrs + start_n * stride_kt, mask=d_ok[:, None], other=0.0)
        s = _dot(q, kT, DOT_FP32, PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
        if MASKED:
            vis = _visible(rows[:, None], cols[None, :], Tq, Tk, LEFT, RIGHT, HAS_LEFT, HAS_RIGHT)
            s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED:  # a row with no visible key so far: keep exp2 away from (-inf) - (-inf)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        alpha = tl.math.exp2(m_i - m_use)
        p = tl.math.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DROPOUT:
            keep = _keep(seed, rng_rows[:, None], cols[None, :], RNG_COLS, drop_p)
            p = tl.where(keep, p, 0.0)
        if USE_TMA:
            v = v_desc.load([start_n, 0])
        elif MASKED:
            v = tl.load(
                v_ptrs + start_n * stride_vt, mask=(cols[:, None] < Tk) & d_ok[None, :], other=0.0
            )
        elif EVEN_D:
            v = tl.load(v_ptrs + start_n * stride_vt)
        else:
            v = tl.load(v_ptrs + start_n * stride_vt, mask=d_ok[None, :], other=0.0)
        acc += _dot(p.to(v.dtype), v, DOT_FP32, PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q,  # (B, Hq, Tq, D) by strides | varlen (total_q, Hq, D)
    K,  # (B, Hkv, Tk, D) | (total_k, Hkv, D)
    V,  # like K
    O,  # like Q
    LSE,  # (B, Hq, Tq) | (Hq, total_q) fp32, log2 units
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_ob,
    stride_oh,
    stride_ot,
    stride_lb,
    stride_lh,
    CU_Q,  # (B + 1,) int32 (varlen only)
    CU_K,
    SEQ_Q,  # dense: Tq; varlen: total_q (dropout row ids)
    SEQ_K,  # dense: Tk; varlen: max_seqlen_k (dropout offsets)
    H,  # q heads
    GROUP,  # q heads per kv head
    sm_scale,
    LEFT,
    RIGHT,
    drop_p,
    seed,
    TUNE_Q,  # autotune key only (bucketed max seq lengths)
    TUNE_K,
    HEAD_D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DROPOUT: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr = False,
):
    # Grid (batch * heads, query blocks), the last query blocks first: under a causal mask they
    # see the most keys, so the longest programs start first and the short ones fill the tail.
    pid_bh = tl.program_id(0)
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    start_m = pid_m * BLOCK_M
    if IS_VARLEN:
        q0 = tl.load(CU_Q + b)
        Tq = tl.load(CU_Q + b + 1) - q0
        k0 = tl.load(CU_K + b)
        Tk = tl.load(CU_K + b + 1) - k0
        rng_row0 = h.to(tl.int64) * SEQ_Q + q0
    else:
        q0 = pid_bh * 0
        Tq = SEQ_Q
        k0 = pid_bh * 0
        Tk = SEQ_K
        rng_row0 = pid_bh.to(tl.int64) * SEQ_Q
    if start_m < Tq:
        b64 = b.to(tl.int64)
        q_base = Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + q0.to(tl.int64) * stride_qt
        k_base = K + b64 * stride_kb + hk.to(tl.int64) * stride_kh + k0.to(tl.int64) * stride_kt
        v_base = V + b64 * stride_vb + hk.to(tl.int64) * stride_vh + k0.to(tl.int64) * stride_vt
        o_base = O + b64 * stride_ob + h.to(tl.int64) * stride_oh + q0.to(tl.int64) * stride_ot
        lse_base = LSE + b64 * stride_lb + h.to(tl.int64) * stride_lh + q0

        rows = start_m + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_D
        q = tl.load(
            q_base + rows[:, None] * stride_qt + offs_d[None, :],
            mask=(rows[:, None] < Tq) & d_ok[None, :],
            other=0.0,
        )
        kT_ptrs = k_base + offs_n[None, :] * stride_kt + offs_d[:, None]
        v_ptrs = v_base + offs_n[:, None] * stride_vt + offs_d[None, :]
        if USE_TMA:  # the launcher checked the 16-byte alignment of the bases and row strides
            k_desc = tl.make_tensor_descriptor(
                k_base, shape=[Tk, HEAD_D], strides=[stride_kt, 1], block_shape=[BLOCK_N, BLOCK_D]
            )
            v_desc = tl.make_tensor_descriptor(
                v_base, shape=[Tk, HEAD_D], strides=[stride_vt, 1], block_shape=[BLOCK_N, BLOCK_D]
            )
        else:
            k_desc = kT_ptrs
            v_desc = v_ptrs
        rng_rows = rng_row0 + rows
        qk_scale = sm_scale * 1.4426950408889634

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        lo, full_lo, full_hi, hi = _key_blocks(
            start_m, Tq, Tk, LEFT, RIGHT, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT
        )
        # left window edge (masked), fully visible blocks, causal / right edge + tail (masked)
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, kT_ptrs, v_ptrs, k_desc, v_desc, stride_kt, stride_vt, rows, offs_n,
            d_ok,
            Tq, Tk, LEFT, RIGHT, qk_scale, drop_p, seed, rng_rows, SEQ_K,
            lo, tl.minimum(full_lo, hi),
            True, HAS_LEFT, HAS_RIGHT, DROPOUT, DOT_FP32, PRECISION, BLOCK_N,
            HEAD_D == BLOCK_D, USE_TMA,
        )  # fmt: skip
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, kT_ptrs, v_ptrs, k_desc, v_desc, stride_kt, stride_vt, rows, offs_n,
            d_ok,
            Tq, Tk, LEFT, RIGHT, qk_scale, drop_p, seed, rng_rows, SEQ_K,
            full_lo, full_hi,
            False, HAS_LEFT, HAS_RIGHT, DROPOUT, DOT_FP32, PRECISION, BLOCK_N,
            HEAD_D == BLOCK_D, USE_TMA,
        )  # fmt: skip
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, kT_ptrs, v_ptrs, k_desc, v_desc, stride_kt, stride_vt, rows, offs_n,
            d_ok,
            Tq, Tk, LEFT, RIGHT, qk_scale, drop_p, seed, rng_rows, SEQ_K,
            full_hi, hi,
            True, HAS_LEFT, HAS_RIGHT, DROPOUT, DOT_FP32, PRECISION, BLOCK_N,
            HEAD_D == BLOCK_D, USE_TMA,
        )  # fmt: skip

        has_key = l_i > 0.0
        l_safe = tl.where(has_key, l_i, 1.0)
        out = acc / l_safe[:, None]
        if DROPOUT:
            out = out * (1.0 / (1.0 - drop_p))
        lse = tl.where(has_key, m_i + tl.math.log2(l_safe), float("inf"))
        r_ok = rows < Tq
        tl.store(
            o_base + rows[:, None] * stride_ot + offs_d[None, :],
            out.to(O.dtype.element_ty),
            mask=r_ok[:, None] & d_ok[None, :],
        )
        tl.store(lse_base + rows, lse, mask=r_ok)


# ---- backward -------------------------------------------------------------------------------


@triton.jit
def _bwd_preprocess(
    O,
    DO,
    DELTA,  # like LSE
    stride_ob,
    stride_oh,
    stride_ot,
    stride_dob,
    stride_doh,
    stride_dot,
    stride_lb,
    stride_lh,
    CU_Q,
    SEQ_Q,
    H,
    HEAD_D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """delta = rowsum(dO * O) in fp32."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    if IS_VARLEN:
        q0 = tl.load(CU_Q + b)
        Tq = tl.load(CU_Q + b + 1) - q0
    else:
        q0 = pid_bh * 0
        Tq = SEQ_Q
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    r_ok = rows < Tq
    mask = r_ok[:, None] & (offs_d[None, :] < HEAD_D)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    q064 = q0.to(tl.int64)
    o_base = O + b64 * stride_ob + h64 * stride_oh + q064 * stride_ot
    do_base = DO + b64 * stride_dob + h64 * stride_doh + q064 * stride_dot
    o = tl.load(o_base + rows[:, None] * stride_ot + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(do_base + rows[:, None] * stride_dot + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + b64 * stride_lb + h64 * stride_lh + q0 + rows, delta, mask=r_ok)


@triton.jit
def _dkdv_inner(
    dk,
    dv,
    k,  # [BLOCK_N, BLOCK_D]
    v,  # [BLOCK_N, BLOCK_D]
    q_base,
    do_base,
    q_desc,  # USE_TMA: tensor descriptor of this q head, [Tq, HEAD_D] (else unused)
    do_desc,  # USE_TMA: likewise for dO
    lse_base,
    delta_base,
    stride_qt,
    stride_dot,
    cols,  # [BLOCK_N] key index within the sequence
    offs_m,  # [BLOCK_M] arange
    offs_d,
    d_ok,
    Tq,
    Tk,
    LEFT,
    RIGHT,
    qk_scale,
    drop_p,
    seed,
    rng_row0,
    RNG_COLS,
    lo,
    hi,
    MASKED: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    DROPOUT: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    EVEN_D: tl.constexpr,  # head_dim == BLOCK_D: no head-dim padding to mask
    USE_TMA: tl.constexpr,
):
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        r_ok = rows < Tq
        # Unmasked query blocks lie inside [0, Tq): no row mask (and no mask at all without
        # head-dim padding). A tensor descriptor zero-fills rows >= Tq, columns >= HEAD_D.
        if USE_TMA:
            qT = tl.trans(q_desc.load([start_m, 0]))
            do = do_desc.load([start_m, 0])
        elif MASKED or not EVEN_D:
            qT = tl.load(
                q_base + rows[None, :] * stride_qt + offs_d[:, None],
                mask=d_ok[:, None] & r_ok[None, :],
                other=0.0,
            )  # [BLOCK_D, BLOCK_M]
            do = tl.load(
                do_base + rows[:, None] * stride_dot + offs_d[None, :],
                mask=r_ok[:, None] & d_ok[None, :],
                other=0.0,
            )  # [BLOCK_M, BLOCK_D]
        else:
            qT = tl.load(q_base + rows[None, :] * stride_qt + offs_d[:, None])
            do = tl.load(do_base + rows[:, None] * stride_dot + offs_d[None, :])
        # rows past the end get lse = +inf, hence P = 0
        if MASKED:
            lse = tl.load(lse_base + rows, mask=r_ok, other=float("inf"))
            delta = tl.load(delta_base + rows, mask=r_ok, other=0.0)
        else:
            lse = tl.load(lse_base + rows)
            delta = tl.load(delta_base + rows)
        sT = _dot(k, qT, DOT_FP32, PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M]
        pT = tl.math.exp2(sT - lse[None, :])
        if MASKED:
            vis = _visible(rows[None, :], cols[:, None], Tq, Tk, LEFT, RIGHT, HAS_LEFT, HAS_RIGHT)
            pT = tl.where(vis, pT, 0.0)
        dpT = _dot(v, tl.trans(do), DOT_FP32, PRECISION)  # [BLOCK_N, BLOCK_M] = (dO V^T)^T
        if DROPOUT:
            keep = _keep(seed, rng_row0 + rows[None, :], cols[:, None], RNG_COLS, drop_p)
            inv_keep = 1.0 / (1.0 - drop_p)
            p_drop = tl.where(keep, pT, 0.0) * inv_keep
            dpT = tl.where(keep, dpT, 0.0) * inv_keep
        else:
            p_drop = pT
        dv += _dot(p_drop.to(do.dtype), do, DOT_FP32, PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk += _dot(dsT.to(qT.dtype), tl.trans(qT), DOT_FP32, PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    DK,
    DV,
    LSE,
    DELTA,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_dob,
    stride_doh,
    stride_dot,
    stride_dkb,
    stride_dkh,
    stride_dkt,
    stride_dvb,
    stride_dvh,
    stride_dvt,
    stride_lb,
    stride_lh,
    CU_Q,
    CU_K,
    SEQ_Q,
    SEQ_K,
    H_KV,  # kv heads
    GROUP,
    sm_scale,
    LEFT,
    RIGHT,
    drop_p,
    seed,
    TUNE_Q,
    TUNE_K,
    HEAD_D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DROPOUT: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr = False,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H_KV
    hk = pid_bh % H_KV
    start_n = pid_n * BLOCK_N
    if IS_VARLEN:
        q0 = tl.load(CU_Q + b)
        Tq = tl.load(CU_Q + b + 1) - q0
        k0 = tl.load(CU_K + b)
        Tk = tl.load(CU_K + b + 1) - k0
    else:
        q0 = pid_bh * 0
        Tq = SEQ_Q
        k0 = pid_bh * 0
        Tk = SEQ_K
    if start_n < Tk:
        b64 = b.to(tl.int64)
        q064 = q0.to(tl.int64)
        k064 = k0.to(tl.int64)
        hk64 = hk.to(tl.int64)
        cols = start_n + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_D
        c_ok = cols < Tk
        kv_mask = c_ok[:, None] & d_ok[None, :]
        k = tl.load(
            K + b64 * stride_kb + hk64 * stride_kh + k064 * stride_kt
            + cols[:, None] * stride_kt + offs_d[None, :],
            mask=kv_mask, other=0.0,
        )  # fmt: skip
        v = tl.load(
            V + b64 * stride_vb + hk64 * stride_vh + k064 * stride_vt
            + cols[:, None] * stride_vt + offs_d[None, :],
            mask=kv_mask, other=0.0,
        )  # fmt: skip
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        qk_scale = sm_scale * 1.4426950408889634
        lo, full_lo, full_hi, hi = _query_blocks(
            start_n, Tq, Tk, LEFT, RIGHT, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT
        )
        for g in range(0, GROUP):  # the q heads sharing this kv head: summed in registers
            h64 = (hk * GROUP + g).to(tl.int64)
            q_base = Q + b64 * stride_qb + h64 * stride_qh + q064 * stride_qt
            do_base = DO + b64 * stride_dob + h64 * stride_doh + q064 * stride_dot
            if USE_TMA:
                q_desc = tl.make_tensor_descriptor(
                    q_base, shape=[Tq, HEAD_D], strides=[stride_qt, 1],
                    block_shape=[BLOCK_M, BLOCK_D],
                )  # fmt: skip
                do_desc = tl.make_tensor_descriptor(
                    do_base, shape=[Tq, HEAD_D], strides=[stride_dot, 1],
                    block_shape=[BLOCK_M, BLOCK_D],
                )  # fmt: skip
            else:
                q_desc = q_base
                do_desc = do_base
            lse_base = LSE + b64 * stride_lb + h64 * stride_lh + q0
            delta_base = DELTA + b64 * stride_lb + h64 * stride_lh + q0
            if IS_VARLEN:
                rng_row0 = h64 * SEQ_Q + q0
            else:
                rng_row0 = (b64 * H_KV * GROUP + h64) * SEQ_Q
            dk, dv = _dkdv_inner(
                dk, dv, k, v, q_base, do_base, q_desc, do_desc, lse_base, delta_base, stride_qt,
                stride_dot,
                cols, offs_m, offs_d, d_ok, Tq, Tk, LEFT, RIGHT, qk_scale, drop_p, seed,
                rng_row0, SEQ_K, lo, tl.minimum(full_lo, hi),
                True, HAS_LEFT, HAS_RIGHT, DROPOUT, DOT_FP32, PRECISION, BLOCK_M,
                HEAD_D == BLOCK_D, USE_TMA,
            )  # fmt: skip
            dk, dv = _dkdv_inner(
                dk, dv, k, v, q_base, do_base, q_desc, do_desc, lse_base, delta_base, stride_qt,
                stride_dot,
                cols, offs_m, offs_d, d_ok, Tq, Tk, LEFT, RIGHT, qk_scale, drop_p, seed,
                rng_row0, SEQ_K, full_lo, full_hi,
                False, HAS_LEFT, HAS_RIGHT, DROPOUT, DOT_FP32, PRECISION, BLOCK_M,
                HEAD_D == BLOCK_D, USE_TMA,
            )  # fmt: skip
            dk, dv = _dkdv_inner(
                dk, dv, k, v, q_base, do_base, q_desc, do_desc, lse_base, delta_base, stride_qt,
                stride_dot,
                cols, offs_m, offs_d, d_ok, Tq, Tk, LEFT, RIGHT, qk_scale, drop_p, seed,
                rng_row0, SEQ_K, full_hi, hi,
                True, HAS_LEFT, HAS_RIGHT, DROPOUT, DOT_FP32, PRECISION, BLOCK_M,
                HEAD_D == BLOCK_D, USE_TMA,
            )  # fmt: skip
        dk = dk * sm_scale
        tl.store(
            DK + b64 * stride_dkb + hk64 * stride_dkh + k064 * stride_dkt
            + cols[:, None] * stride_dkt + offs_d[None, :],
            dk.to(DK.dtype.element_ty), mask=kv_mask,
        )  # fmt: skip
        tl.store(
            DV + b64 * stride_dvb + hk64 * stride_dvh + k064 * stride_dvt
            + cols[:, None] * stride_dvt + offs_d[None, :],
            dv.to(DV.dtype.element_ty), mask=kv_mask,
        )  # fmt: skip


@triton.jit
def _dq_inner(
    dq,
    q,  # [BLOCK_M, BLOCK_D]
    do,  # [BLOCK_M, BLOCK_D]
    lse,  # [BLOCK_M]
    delta,  # [BLOCK_M]
    kT_ptrs,  # [BLOCK_D, BLOCK_N]
    vT_ptrs,  # [BLOCK_D, BLOCK_N]
    stride_kt,
    stride_vt,
    rows,
    offs_n,
    d_ok,
    Tq,
    Tk,
    LEFT,
    RIGHT,
    qk_scale,
    drop_p,
    seed,
    rng_rows,
    RNG_COLS,
    lo,
    hi,
    MASKED: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    DROPOUT: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN_D: tl.constexpr,  # head_dim == BLOCK_D: no head-dim padding to mask
):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        # As in _dkdv_inner: unmasked key blocks lie inside [0, Tk). (No tensor-descriptor
        # variant: Triton 3.6's ptxas crashes on this kernel with two transposed TMA tiles.)
        if MASKED or not EVEN_D:
            kv_mask = d_ok[:, None] & (cols[None, :] < Tk)
            kT = tl.load(kT_ptrs + start_n * stride_kt, mask=kv_mask, other=0.0)
            vT = tl.load(vT_ptrs + start_n * stride_vt, mask=kv_mask, other=0.0)
        else:
            kT = tl.load(kT_ptrs + start_n * stride_kt)
            vT = tl.load(vT_ptrs + start_n * stride_vt)
        s = _dot(q, kT, DOT_FP32, PRECISION) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        if MASKED:
            vis = _visible(rows[:, None], cols[None, :], Tq, Tk, LEFT, RIGHT, HAS_LEFT, HAS_RIGHT)
            p = tl.where(vis, p, 0.0)
        dp = _dot(do, vT, DOT_FP32, PRECISION)
        if DROPOUT:
            keep = _keep(seed, rng_rows[:, None], cols[None, :], RNG_COLS, drop_p)
            dp = tl.where(keep, dp, 0.0) * (1.0 / (1.0 - drop_p))
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(kT.dtype), tl.trans(kT), DOT_FP32, PRECISION)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    DQ,
    LSE,
    DELTA,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_dob,
    stride_doh,
    stride_dot,
    stride_dqb,
    stride_dqh,
    stride_dqt,
    stride_lb,
    stride_lh,
    CU_Q,
    CU_K,
    SEQ_Q,
    SEQ_K,
    H,
    GROUP,
    sm_scale,
    LEFT,
    RIGHT,
    drop_p,
    seed,
    TUNE_Q,
    TUNE_K,
    HEAD_D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DROPOUT: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # The last query blocks first: under a causal mask they walk the most keys.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    start_m = pid_m * BLOCK_M
    if IS_VARLEN:
        q0 = tl.load(CU_Q + b)
        Tq = tl.load(CU_Q + b + 1) - q0
        k0 = tl.load(CU_K + b)
        Tk = tl.load(CU_K + b + 1) - k0
        rng_row0 = h.to(tl.int64) * SEQ_Q + q0
    else:
        q0 = pid_bh * 0
        Tq = SEQ_Q
        k0 = pid_bh * 0
        Tk = SEQ_K
        rng_row0 = pid_bh.to(tl.int64) * SEQ_Q
    if start_m < Tq:
        b64 = b.to(tl.int64)
        h64 = h.to(tl.int64)
        hk64 = hk.to(tl.int64)
        q064 = q0.to(tl.int64)
        k064 = k0.to(tl.int64)
        rows = start_m + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_D
        r_ok = rows < Tq
        mask = r_ok[:, None] & d_ok[None, :]
        q = tl.load(
            Q + b64 * stride_qb + h64 * stride_qh + q064 * stride_qt
            + rows[:, None] * stride_qt + offs_d[None, :],
            mask=mask, other=0.0,
        )  # fmt: skip
        do = tl.load(
            DO + b64 * stride_dob + h64 * stride_doh + q064 * stride_dot
            + rows[:, None] * stride_dot + offs_d[None, :],
            mask=mask, other=0.0,
        )  # fmt: skip
        lse_off = b64 * stride_lb + h64 * stride_lh + q0 + rows
        lse = tl.load(LSE + lse_off, mask=r_ok, other=float("inf"))
        delta = tl.load(DELTA + lse_off, mask=r_ok, other=0.0)
        kT_ptrs = (
            K + b64 * stride_kb + hk64 * stride_kh + k064 * stride_kt
            + offs_n[None, :] * stride_kt + offs_d[:, None]
        )  # fmt: skip
        vT_ptrs = (
            V + b64 * stride_vb + hk64 * stride_vh + k064 * stride_vt
            + offs_n[None, :] * stride_vt + offs_d[:, None]
        )  # fmt: skip
        rng_rows = rng_row0 + rows
        qk_scale = sm_scale * 1.4426950408889634
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        lo, full_lo, full_hi, hi = _key_blocks(
            start_m, Tq, Tk, LEFT, RIGHT, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT
        )
        dq = _dq_inner(
            dq, q, do, lse, delta, kT_ptrs, vT_ptrs, stride_kt, stride_vt, rows, offs_n, d_ok,
            Tq, Tk, LEFT, RIGHT, qk_scale, drop_p, seed, rng_rows, SEQ_K,
            lo, tl.minimum(full_lo, hi),
            True, HAS_LEFT, HAS_RIGHT, DROPOUT, DOT_FP32, PRECISION, BLOCK_N,
            HEAD_D == BLOCK_D,
        )  # fmt: skip
        dq = _dq_inner(
            dq, q, do, lse, delta, kT_ptrs, vT_ptrs, stride_kt, stride_vt, rows, offs_n, d_ok,
            Tq, Tk, LEFT, RIGHT, qk_scale, drop_p, seed, rng_rows, SEQ_K,
            full_lo, full_hi,
            False, HAS_LEFT, HAS_RIGHT, DROPOUT, DOT_FP32, PRECISION, BLOCK_N,
            HEAD_D == BLOCK_D,
        )  # fmt: skip
        dq = _dq_inner(
            dq, q, do, lse, delta, kT_ptrs, vT_ptrs, stride_kt, stride_vt, rows, offs_n, d_ok,
            Tq, Tk, LEFT, RIGHT, qk_scale, drop_p, seed, rng_rows, SEQ_K,
            full_hi, hi,
            True, HAS_LEFT, HAS_RIGHT, DROPOUT, DOT_FP32, PRECISION, BLOCK_N,
            HEAD_D == BLOCK_D,
        )  # fmt: skip
        dq = dq * sm_scale
        tl.store(
            DQ + b64 * stride_dqb + h64 * stride_dqh + q064 * stride_dqt
            + rows[:, None] * stride_dqt + offs_d[None, :],
            dq.to(DQ.dtype.element_ty), mask=mask,
        )  # fmt: skip


@triton.jit
def _dropout_mask_kernel(
    KEEP,  # (B, H, Tq, Tk) bool as int8, contiguous
    Tq,
    Tk,
    drop_p,
    seed,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The dense-layout keep mask the attention kernels use (tests / debugging)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rng_rows = pid_bh.to(tl.int64) * Tq + rows
    for start_n in range(0, Tk, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        keep = _keep(seed, rng_rows[:, None], cols[None, :], Tk, drop_p)
        ptrs = KEEP + (rng_rows[:, None] * Tk + cols[None, :])
        tl.store(ptrs, keep.to(tl.int8), mask=(rows[:, None] < Tq) & (cols[None, :] < Tk))


# ---- tile configurations --------------------------------------------------------------------

_TUNE_KEY = [
    "TUNE_Q", "TUNE_K", "BLOCK_D", "HAS_LEFT", "HAS_RIGHT", "DROPOUT", "IS_VARLEN", "USE_TMA",
]  # fmt: skip
# The interpreter: one small tile (a few programs per test case; tl.dot needs >= 16).
_INTERP_CONFIG = (16, 16, 1, 1)


# (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates per head-dim class, for 2-byte dtypes.
# Starting points; the benchmark records the configs the autotuner picks. On the H200
# (2026-11-28, bf16, d128, causal, seq 4k-16k) it picked fwd 128x64w8s3, dkdv 32x64w4s3 and
# dq 64x32w4s3 from the first three of each list; the last two of the d128 lists are larger
# Hopper tiles added after that run (too large ones fail to compile and the autotuner skips
# them). fp32 (4-byte tiles, IEEE dots) gets smaller tiles. Few candidates: each one is a
# compile on first use.
_CONFIGS = {
    "fwd": {
        64: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4)],
        128: [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 128, 8, 3), (128, 64, 4, 4)],
        256: [(64, 32, 4, 2), (64, 64, 8, 2), (32, 32, 4, 2)],
    },
    "dkdv": {  # BLOCK_N keys stay resident, BLOCK_M query rows stream
        64: [(32, 128, 4, 3), (64, 128, 8, 3), (32, 64, 4, 4)],
        128: [(32, 128, 8, 2), (32, 64, 4, 3), (64, 64, 8, 2), (64, 128, 8, 3), (32, 128, 4, 3)],
        256: [(16, 64, 4, 2), (32, 64, 8, 2), (32, 32, 4, 2)],
    },
    "dq": {  # BLOCK_M queries stay resident, BLOCK_N keys stream
        64: [(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 4)],
        128: [(128, 32, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3)],
        256: [(64, 16, 4, 2), (32, 32, 4, 2), (32, 16, 4, 1)],
    },
}
_CONFIGS_FP32 = {
    "fwd": {64: [(64, 64, 4, 2), (64, 32, 4, 2)], 128: [(64, 32, 4, 2), (32, 32, 4, 2)],
            256: [(32, 32, 4, 1), (32, 16, 4, 2)]},
    "dkdv": {64: [(32, 64, 4, 2), (16, 64, 4, 2)], 128: [(16, 64, 4, 2), (32, 32, 4, 2)],
             256: [(16, 32, 4, 1), (16, 16, 4, 1)]},
    "dq": {64: [(64, 32, 4, 2), (32, 32, 4, 2)], 128: [(32, 32, 4, 2), (64, 16, 4, 2)],
           256: [(32, 16, 4, 1), (16, 16, 4, 1)]},
}  # fmt: skip
# The interpreter: one small tile (a few programs per test case; tl.dot needs >= 16).
_INTERP_CONFIG = (16, 16, 1, 1)


def tile_configs(kind: str, block_d: int, fp32: bool) -> list[tuple[int, int, int, int]]:
    """Candidate (BLOCK_M, BLOCK_N, num_warps, num_stages) of kernel ``kind`` (fwd/dkdv/dq)."""
    if INTERPRET:
        return [_INTERP_CONFIG]
    table = (_CONFIGS_FP32 if fp32 else _CONFIGS)[kind]
    return table[min(c for c in table if c >= block_d)]


_TUNED: dict = {}
_KERNELS = {"fwd": _fwd_kernel, "dkdv": _bwd_dkdv_kernel, "dq": _bwd_dq_kernel}
# Tests / tuning: kind -> (BLOCK_M, BLOCK_N, num_warps, num_stages) used instead of autotuning.
FORCE_CONFIG: dict[str, tuple[int, int, int, int]] = {}


def _launch(kind: str, block_d: int, dtype: torch.dtype, grid, args: tuple, kwargs: dict):
    """Launch kernel ``kind``: a forced config, the single candidate (interpreter, or
    ``TURBOLM_AUTOTUNE=0``: the first candidate), else the autotuner for this head-dim class and
    dtype. ``grid(block_m, block_n)`` gives the launch grid."""
    fp32 = dtype == torch.float32
    candidates = tile_configs(kind, block_d, fp32)
    config = FORCE_CONFIG.get(kind)
    if config is None and (len(candidates) == 1 or os.environ.get("TURBOLM_AUTOTUNE") == "0"):
        config = candidates[0]
    if config is not None:
        bm, bn, warps, stages = config
        _KERNELS[kind][grid(bm, bn)](
            *args, **kwargs, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages
        )
        return
    key = (kind, block_d, fp32)
    if key not in _TUNED:
        configs = [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in candidates
        ]
        _TUNED[key] = triton.autotune(configs=configs, key=_TUNE_KEY)(_KERNELS[kind])
    _TUNED[key][lambda meta: grid(meta["BLOCK_M"], meta["BLOCK_N"])](*args, **kwargs)


# ---- launchers ------------------------------------------------------------------------------


def _strides(t: torch.Tensor, layout: str) -> tuple[int, int, int]:
    """(batch, head, token) strides of a q/k/v-like tensor in ``layout``."""
    if layout == "varlen":  # (total, H, D)
        return 0, t.stride(1), t.stride(0)
    if layout == "bshd":  # (B, T, H, D)
        return t.stride(0), t.stride(2), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)  # (B, H, T, D)


def _head_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _alloc(shape, dtype, device) -> torch.Tensor:
    if POISON or os.environ.get("TURBOLM_POISON_OUTPUTS") == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _bucket(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _tma_allowed(*tensors: torch.Tensor, layout: str) -> bool:
    """May the kernels read these tensors through tensor descriptors (the copy engine)?
    Needs ``TMA`` on, a Hopper-or-newer GPU (or the interpreter), a head dim of 17..128, and
    16-byte aligned bases and batch / head / token strides (the descriptor of every head starts
    at such a base)."""
    if not TMA:
        return False
    # Head dims padded to 32..128 only: Triton 3.6's ptxas crashes compiling the d256 forward
    # with descriptors (tests/test_attention_kernels.py compiles the allowed ones for sm_90).
    if not 32 <= _block_d(tensors[0].shape[-1]) <= 128:
        return False
    for t in tensors:
        if not INTERPRET and (not t.is_cuda or torch.cuda.get_device_capability(t.device)[0] < 9):
            return False
        size = t.element_size()
        if t.data_ptr() % 16 or any(s * size % 16 for s in _strides(t, layout)):
            return False
    return True


def _torch_workspace(size: int, alignment: int, stream) -> torch.Tensor:
    # Global scratch where the kernels write their tensor descriptors (128 bytes each).
    return torch.empty(size, dtype=torch.int8, device=torch.cuda.current_device())


def _ensure_allocator() -> None:
    """Triton writes device-side tensor descriptors into memory from ``triton.set_allocator``;
    its setting is per thread context (autograd runs the backward in its own threads), so
    set ours wherever none is set, and leave a caller's own allocator alone."""
    if INTERPRET:
        return
    try:
        from triton.runtime import _allocation

        if not isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
            return
    except (ImportError, AttributeError):  # a Triton without this internal: just set ours
        pass
    triton.set_allocator(_torch_workspace)


def _seed_arg(seed: int | None) -> int:
    # A 31-bit value keeps the kernel signature fixed (i32) whatever the user passes.
    return 0 if seed is None else int(seed) & 0x7FFFFFFF


class _Geometry:
    """Sizes and per-tensor strides of one call, for dense or varlen layouts."""

    def __init__(self, q, k, layout, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
        self.layout = layout
        self.varlen = layout == "varlen"
        if self.varlen:
            self.batch = cu_seqlens_q.numel() - 1
            self.hq, self.hkv, self.d = q.shape[1], k.shape[1], q.shape[2]
            self.max_q, self.max_k = int(max_seqlen_q), int(max_seqlen_k)
            # SEQ_Q / SEQ_K kernel arguments: dropout row ids and offsets
            self.seq_q, self.seq_k = q.shape[0], self.max_k
            self.cu_q, self.cu_k = cu_seqlens_q, cu_seqlens_k
        else:
            if layout == "bshd":
                self.batch, tq, self.hq, self.d = q.shape
                tk, self.hkv = k.shape[1], k.shape[2]
            else:
                self.batch, self.hq, tq, self.d = q.shape
                self.hkv, tk = k.shape[1], k.shape[2]
            self.max_q, self.max_k = tq, tk
            self.seq_q, self.seq_k = tq, tk
            self.cu_q = self.cu_k = q  # unused pointer arguments (IS_VARLEN=False)
        self.group = self.hq // self.hkv
        self.block_d = _block_d(self.d)

    def lse_shape(self) -> tuple[int, ...]:
        if self.varlen:
            return (self.hq, self.seq_q)
        return (self.batch, self.hq, self.max_q)

    def lse_strides(self, lse: torch.Tensor) -> tuple[int, int]:
        if self.varlen:
            return 0, lse.stride(0)
        return lse.stride(0), lse.stride(1)

    def common(self, dtype) -> dict:
        return {
            "HEAD_D": self.d,
            "BLOCK_D": self.block_d,
            "IS_VARLEN": self.varlen,
            "DOT_FP32": INTERPRET,
            "PRECISION": _precision(dtype),
        }


def _window_args(causal: bool, window: tuple[int, int] | None) -> tuple[int, int]:
    """(left, right) with -1 = unbounded; causal means right = 0."""
    left, right = (-1, -1) if window is None else (int(window[0]), int(window[1]))
    if causal:
        right = 0
    return left, right


def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    window: tuple[int, int] | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
    layout: str = "bhsd",
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: returns (out like q, lse fp32 in log2 units). ``layout`` is "bhsd", "bshd" or
    "varlen" (q (total_q, Hq, D), k/v (total_k, Hkv, D), cu_seqlens_q/k int32 (B + 1,))."""
    q, k, v = (_head_contiguous(t) for t in (q, k, v))
    geo = _Geometry(q, k, layout, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    scale = 1.0 / math.sqrt(geo.d) if scale is None else float(scale)
    left, right = _window_args(causal, window)
    out = _alloc(q.shape, q.dtype, q.device)
    lse = _alloc(geo.lse_shape(), torch.float32, q.device)
    if q.numel() == 0 or geo.batch == 0:
        return out, lse
    args = (
        q, k, v, out, lse,
        *_strides(q, layout), *_strides(k, layout), *_strides(v, layout), *_strides(out, layout),
        *geo.lse_strides(lse),
        geo.cu_q, geo.cu_k, geo.seq_q, geo.seq_k, geo.hq, geo.group,
        scale, max(left, 0), max(right, 0), float(dropout_p), _seed_arg(seed),
        _bucket(geo.max_q), _bucket(geo.max_k),
    )  # fmt: skip
    flags = {"HAS_LEFT": left >= 0, "HAS_RIGHT": right >= 0, "DROPOUT": dropout_p > 0.0}
    if _tma_allowed(k, v, layout=layout):
        _ensure_allocator()
        flags["USE_TMA"] = True
    grid = lambda bm, bn: (geo.batch * geo.hq, triton.cdiv(geo.max_q, bm))  # noqa: E731
    _launch("fwd", geo.block_d, q.dtype, grid, args, {**flags, **geo.common(q.dtype)})
    return out, lse


def attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    window: tuple[int, int] | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
    layout: str = "bhsd",
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: (dq, dk, dv) in the layouts and dtypes of q, k, v."""
    q, k, v, out, dout = (_head_contiguous(t) for t in (q, k, v, out, dout))
    geo = _Geometry(q, k, layout, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    scale = 1.0 / math.sqrt(geo.d) if scale is None else float(scale)
    left, right = _window_args(causal, window)
    dq = _alloc(q.shape, q.dtype, q.device)
    dk = _alloc(k.shape, k.dtype, k.device)
    dv = _alloc(v.shape, v.dtype, v.device)
    if geo.batch == 0 or (q.numel() == 0 and k.numel() == 0):
        return dq, dk, dv
    if q.numel() == 0:  # no query: nothing flows back to k and v
        return dq, dk.zero_(), dv.zero_()
    delta = _alloc(lse.shape, torch.float32, q.device)
    lse_strides = geo.lse_strides(lse)
    common = geo.common(q.dtype)
    _bwd_preprocess[(triton.cdiv(geo.max_q, PRE_BLOCK_M), geo.batch * geo.hq)](
        out, dout, delta, *_strides(out, layout), *_strides(dout, layout), *lse_strides,
        geo.cu_q, geo.seq_q, geo.hq,
        HEAD_D=geo.d, BLOCK_D=geo.block_d, IS_VARLEN=geo.varlen, BLOCK_M=PRE_BLOCK_M,
    )  # fmt: skip
    flags = {"HAS_LEFT": left >= 0, "HAS_RIGHT": right >= 0, "DROPOUT": dropout_p > 0.0}
    tma = {}  # the dK / dV kernel only (see _dq_inner)
    if _tma_allowed(q, dout, layout=layout):
        _ensure_allocator()
        tma["USE_TMA"] = True
    scalars = (scale, max(left, 0), max(right, 0), float(dropout_p), _seed_arg(seed))
    tune = (_bucket(geo.max_q), _bucket(geo.max_k))
    if k.numel() > 0:
        args = (
            q, k, v, dout, dk, dv, lse, delta,
            *_strides(q, layout), *_strides(k, layout), *_strides(v, layout),
            *_strides(dout, layout), *_strides(dk, layout), *_strides(dv, layout), *lse_strides,
            geo.cu_q, geo.cu_k, geo.seq_q, geo.seq_k, geo.hkv, geo.group, *scalars, *tune,
        )  # fmt: skip
        grid = lambda bm, bn: (triton.cdiv(geo.max_k, bn), geo.batch * geo.hkv)  # noqa: E731
        _launch("dkdv", geo.block_d, q.dtype, grid, args, {**flags, **tma, **common})
    args = (
        q, k, v, dout, dq, lse, delta,
        *_strides(q, layout), *_strides(k, layout), *_strides(v, layout),
        *_strides(dout, layout), *_strides(dq, layout), *lse_strides,
        geo.cu_q, geo.cu_k, geo.seq_q, geo.seq_k, geo.hq, geo.group, *scalars, *tune,
    )  # fmt: skip
    grid = lambda bm, bn: (triton.cdiv(geo.max_q, bm), geo.batch * geo.hq)  # noqa: E731
    _launch("dq", geo.block_d, q.dtype, grid, args, {**flags, **common})
    return dq, dk, dv


def dropout_keep_mask(
    batch: int, heads: int, tq: int, tk: int, dropout_p: float, seed: int, device
) -> torch.Tensor:
    """(batch, heads, Tq, Tk) bool: the elements the dense-layout kernels keep for ``seed``."""
    keep = torch.zeros((batch, heads, tq, tk), dtype=torch.int8, device=device)
    if keep.numel():
        block = 16
        grid = (triton.cdiv(tq, block), batch * heads)
        _dropout_mask_kernel[grid](
            keep, tq, tk, float(dropout_p), _seed_arg(seed), BLOCK_M=block, BLOCK_N=block
        )
    return keep.bool()
