"""The triton backend of ``turbolm.ops.attention`` (``turbolm.kernels.attention``).

Without a GPU the kernels run on CPU tensors through Triton's interpreter: this module sets
``TRITON_INTERPRET=1`` before the kernels are imported (they are imported lazily by the op).
Interpreter shapes are tiny (tiles of 16, a few programs per case); the large sweeps are
``slow``, the real-GPU checks ``gpu``. Every case compares the output and dQ/dK/dV with the
fp64 reference through ``tests.harness.check_backend``; outputs are poisoned with NaN before
each launch so unwritten elements fail the finiteness check.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from tests.harness import OpCase, check_backend  # noqa: E402
from turbolm.errors import BackendError, InputError, ShapeError  # noqa: E402
from turbolm.ops import attention, registry  # noqa: E402
from turbolm.ops.attention import visible_mask  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}  # (Hq, Hkv)
# (Tq, Tk): equal, fewer queries than keys (decoding), more queries than keys.
SEQS = [(1, 1), (17, 17), (64, 64), (1, 64), (17, 64), (64, 17)]


@pytest.fixture(autouse=True)
def _kernels(monkeypatch):
    """Skip without any way to run Triton; poison kernel outputs with NaN; on a GPU use the
    first tile config of each kernel (autotuning every shape's candidates would mostly
    measure compile time; test_gpu_every_tile_config and test_gpu_autotuned cover them)."""
    if not INTERPRET and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 or a CUDA GPU")
    monkeypatch.setenv("TURBOLM_AUTOTUNE", "0")
    from turbolm.kernels import attention as kernels

    assert kernels.INTERPRET == INTERPRET, "turbolm.kernels.attention imported in another mode"
    old, kernels.POISON = kernels.POISON, True
    yield kernels
    kernels.POISON = old


def kernel_case(
    tq, tk, hq, hkv, d, causal=False, window=None, layout="bhsd", batch=2, scale=None,
    packed=False, dropout_p=0.0, seed=None,
) -> OpCase:  # fmt: skip
    """Dense case. ``packed``: q/k/v are strided views into one (B, T, Hq + 2 Hkv, D) tensor
    (bshd layout, the usual fused-qkv projection), so no input is contiguous."""

    def make_inputs(gen):
        def randn(h, t):
            shape = (batch, h, t, d) if layout == "bhsd" else (batch, t, h, d)
            return torch.randn(*shape, generator=gen, dtype=torch.float64)

        return {"q": randn(hq, tq), "k": randn(hkv, tk), "v": randn(hkv, tk)}

    def call(backend, q, k, v):
        if packed:
            qkv = torch.cat([q, k, v], dim=2)  # (B, T, Hq + 2 Hkv, D)
            q, k, v = qkv.split([hq, hkv, hkv], dim=2)
        return attention(
            q, k, v, causal=causal, window=window, layout=layout, scale=scale,
            dropout_p=dropout_p, seed=seed, backend=backend,
        )  # fmt: skip

    name = f"attn[{tq}x{tk},h{hq}/{hkv},d{d},causal={causal},window={window},{layout}]"
    return OpCase(name, call, make_inputs, grad=("q", "k", "v"))


def varlen_case(lens_q, lens_k, hq, hkv, d, causal=False, window=None) -> OpCase:
    """Packed variable-length batch: q (sum(lens_q), Hq, D), k/v (sum(lens_k), Hkv, D)."""
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)

    def make_inputs(gen):
        def randn(*shape):
            return torch.randn(*shape, generator=gen, dtype=torch.float64)

        inputs = {"q": randn(sum(lens_q), hq, d), "k": randn(sum(lens_k), hkv, d)}
        inputs["v"] = randn(sum(lens_k), hkv, d)
        inputs["cu_q"], inputs["cu_k"] = cu_q, cu_k
        return inputs

    def call(backend, q, k, v, cu_q, cu_k):
        cu = cu_q if cu_q is cu_k or lens_q == lens_k else (cu_q, cu_k)
        return attention(q, k, v, causal=causal, window=window, cu_seqlens=cu, backend=backend)

    name = f"varlen[{lens_q}x{lens_k},h{hq}/{hkv},d{d},causal={causal},window={window}]"
    return OpCase(name, call, make_inputs, grad=("q", "k", "v"))


# ---------------------------------------------------------------------------------------------
# forward + backward against the fp64 reference


@pytest.mark.parametrize("tq,tk", SEQS)
@pytest.mark.parametrize("causal", [False, True])
def test_seq_lengths(causal, tq, tk):
    check_backend(kernel_case(tq, tk, 4, 2, 32, causal, batch=1), "triton", torch.float32, DEVICE)


@pytest.mark.parametrize("d", [32, 80, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_dtypes_and_head_dims(dtype, d):
    """bf16 dots run on fp32 copies under the interpreter (DOT_FP32), real bf16 on a GPU."""
    check_backend(kernel_case(17, 40, 2, 1, d, causal=True), "triton", dtype, DEVICE)


TMA_CASES = {
    "bhsd-d64-causal-tail": lambda: kernel_case(40, 77, 4, 2, 64, True, batch=2),
    "bshd-packed-window": lambda: kernel_case(
        33, 33, 4, 1, 64, True, window=(9, 0), layout="bshd", packed=True
    ),
    "varlen-d80-gqa": lambda: varlen_case([1, 5, 40], [3, 5, 61], 4, 2, 80, causal=True),
    # sequences without queries or without keys: descriptors with a zero-sized dimension
    "varlen-d80-empty-seqs": lambda: varlen_case([0, 5, 17, 3], [3, 0, 20, 3], 4, 2, 80, True),
}


@pytest.mark.parametrize("name", list(TMA_CASES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_tma_forward_and_backward(name, dtype, _kernels, monkeypatch):
    """Forward and backward reading their streamed tiles through tensor descriptors (zero fill
    past the sequence and HEAD_D) match the reference; the launchers really took that path."""
    monkeypatch.setattr(_kernels, "TMA", True)
    taken = []
    allowed = _kernels._tma_allowed
    monkeypatch.setattr(
        _kernels,
        "_tma_allowed",
        lambda *t, layout: taken.append(allowed(*t, layout=layout)) or taken[-1],
    )
    check_backend(TMA_CASES[name](), "triton", dtype, DEVICE)
    assert taken and all(taken)


def test_tma_refused_for_unaligned_rows(_kernels, monkeypatch):
    """Rows whose stride is not a multiple of 16 bytes (head dim 7, fp16) and head dims above 128
    take the pointer path."""
    monkeypatch.setattr(_kernels, "TMA", True)
    k = torch.zeros(1, 2, 5, 7, dtype=torch.float16, device=DEVICE)
    assert not _kernels._tma_allowed(k, k, layout="bhsd")
    k = torch.zeros(1, 2, 5, 256, dtype=torch.float16, device=DEVICE)
    assert not _kernels._tma_allowed(k, k, layout="bhsd")  # see _tma_allowed
    k = torch.zeros(1, 2, 5, 24, dtype=torch.float16, device=DEVICE)
    assert _kernels._tma_allowed(k, k, layout="bhsd") == (INTERPRET or _sm90())


def test_tma_backward_with_a_zero_token_stride(_kernels, monkeypatch):
    """dO of ``out.sum(dim=2)`` is expanded along the sequence (token stride 0, unit stride on the
    head dim, so the launcher does not copy it): the tensor-descriptor backward reads it as the
    pointer path does."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 20, 128, generator=gen).to(DEVICE, torch.float16) for _ in "qkv")
    w = torch.randn(1, 2, 128, generator=gen).to(DEVICE, torch.float16)

    taken = []
    allowed = _kernels._tma_allowed

    def spy(*tensors, layout):
        taken.append((tensors[-1].stride(2), allowed(*tensors, layout=layout)))
        return taken[-1][1]

    monkeypatch.setattr(_kernels, "_tma_allowed", spy)

    def grads(tma):
        monkeypatch.setattr(_kernels, "TMA", tma)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = attention(*leaves, causal=True, backend="triton")
        (out.sum(dim=2) * w).sum().backward()
        return [t.grad for t in leaves]

    with_tma = grads(True)
    assert taken[-1] == (0, INTERPRET or _sm90())  # the backward's (q, dO) check
    for got, want in zip(with_tma, grads(False)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-3)


def _sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


@pytest.mark.parametrize("heads", list(HEADS), ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_mha_gqa_mqa(causal, heads):
    hq, hkv = HEADS[heads]
    check_backend(
        kernel_case(33, 33, hq, hkv, 32, causal, batch=1), "triton", torch.float32, DEVICE
    )


WINDOWS = [
    # (window, causal, tq, tk)
    ((8, 0), False, 64, 64),  # local causal band
    (5, True, 40, 64),  # int: left window, causal right bound
    ((3, 6), False, 64, 40),  # both sides; the first 18 query rows see no key
    ((0, 0), False, 17, 17),  # only the aligned key
    ((20, -1), False, 64, 64),  # left bound only
]


@pytest.mark.parametrize("window,causal,tq,tk", WINDOWS)
def test_sliding_window(window, causal, tq, tk):
    case = kernel_case(tq, tk, 2, 1, 32, causal, window=window, batch=1)
    check_backend(case, "triton", torch.float32, DEVICE)


@pytest.mark.parametrize("causal", [False, True])
def test_bshd_layout_strided_views(causal):
    """(B, T, H, D) through strides: q/k/v are non-contiguous views of one fused tensor."""
    case = kernel_case(17, 17, 4, 2, 32, causal, layout="bshd", packed=True)
    check_backend(case, "triton", torch.float32, DEVICE)


def test_bshd_layout_fp16_window():
    case = kernel_case(33, 20, 2, 2, 80, True, window=7, layout="bshd", batch=1)
    check_backend(case, "triton", torch.float16, DEVICE)


VARLEN = [
    # (lens_q, lens_k, causal, window)
    ([1, 5, 30], [1, 5, 30], False, None),
    ([1, 5, 30], [1, 5, 30], True, None),
    ([5, 0, 30], [7, 4, 12], True, None),  # Tq != Tk per sequence, an empty query set
    ([1, 5, 30], [1, 5, 30], True, 6),
]


@pytest.mark.parametrize("lens_q,lens_k,causal,window", VARLEN)
def test_varlen(lens_q, lens_k, causal, window):
    case = varlen_case(lens_q, lens_k, 4, 2, 32, causal, window)
    check_backend(case, "triton", torch.float32, DEVICE)


def test_varlen_fp16_mqa_head_dim_80():
    check_backend(varlen_case([5, 30], [5, 30], 2, 1, 80, True), "triton", torch.float16, DEVICE)


def test_custom_scale():
    check_backend(kernel_case(17, 33, 2, 1, 32, True, scale=0.3), "triton", torch.float32, DEVICE)


def test_rows_without_keys_have_zero_output_and_grads():
    q = torch.randn(1, 2, 20, 32, device=DEVICE, requires_grad=True)
    k = torch.randn(1, 1, 6, 32, device=DEVICE, requires_grad=True)
    v = torch.randn(1, 1, 6, 32, device=DEVICE, requires_grad=True)
    out = attention(q, k, v, causal=True, backend="triton")  # rows 0..13 see no key
    out.backward(torch.randn_like(out))
    assert torch.equal(out[:, :, :14], torch.zeros_like(out[:, :, :14]))
    assert torch.equal(q.grad[:, :, :14], torch.zeros_like(q.grad[:, :, :14]))
    assert out[:, :, 14:].abs().sum() > 0 and q.grad[:, :, 14:].abs().sum() > 0


def test_backward_is_deterministic():
    q, k, v = (torch.randn(1, 4, 20, 32, device=DEVICE, requires_grad=True) for _ in range(3))
    k2, v2 = k[:, :1].detach().requires_grad_(), v[:, :1].detach().requires_grad_()
    grads = []
    for _ in range(2):
        out = attention(q, k2, v2, causal=True, backend="triton")
        grads.append(torch.autograd.grad(out, (q, k2, v2), torch.ones_like(out)))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# dropout


def _dropout_inputs(shape_q=(1, 2, 17, 32), shape_kv=(1, 1, 24, 32)):
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(*shape_q, generator=gen).to(DEVICE).requires_grad_()
    k = torch.randn(*shape_kv, generator=gen).to(DEVICE).requires_grad_()
    v = torch.randn(*shape_kv, generator=gen).to(DEVICE).requires_grad_()
    return q, k, v


def _run_with_grads(q, k, v, **kwargs):
    out = attention(q, k, v, backend="triton", **kwargs)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out) * 0.5 + out.detach())
    return (out.detach(), *grads)


def test_dropout_seed_reproducible():
    q, k, v = _dropout_inputs()
    a = _run_with_grads(q, k, v, causal=True, dropout_p=0.3, seed=11)
    b = _run_with_grads(q, k, v, causal=True, dropout_p=0.3, seed=11)
    c = _run_with_grads(q, k, v, causal=True, dropout_p=0.3, seed=12)
    for x, y, z in zip(a, b, c):
        assert torch.equal(x, y)
        assert not torch.equal(x, z)
    # seed=None draws from torch's generator: torch.manual_seed makes it reproducible
    torch.manual_seed(5)
    d = _run_with_grads(q, k, v, causal=True, dropout_p=0.3)
    torch.manual_seed(5)
    e = _run_with_grads(q, k, v, causal=True, dropout_p=0.3)
    assert all(torch.equal(x, y) for x, y in zip(d, e))
    assert not torch.equal(d[0], a[0])


def _masked_dropout_reference(q, k, v, keep, p, causal, window=None):
    """fp64 attention with an explicit keep mask (B, Hq, Tq, Tk): probs * keep / (1 - p)."""
    q, k, v = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    kk, vv = (t.repeat_interleave(groups, dim=1) for t in (k, v))
    scores = q @ kk.transpose(-2, -1) / q.shape[-1] ** 0.5
    allowed = visible_mask(q.shape[2], k.shape[2], causal, window, "cpu")
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = (probs * keep.cpu().double() / (1 - p)) @ vv
    return q, k, v, out


@pytest.mark.parametrize("causal,window", [(True, None), (False, (5, 3))])
def test_dropout_matches_reference_with_the_same_mask(_kernels, causal, window):
    """Forward and all gradients equal fp64 attention using the mask the kernels generate:
    the backward regenerates exactly the forward's dropout bits."""
    p, seed = 0.25, 1234
    q, k, v = _dropout_inputs()
    out = attention(q, k, v, causal=causal, window=window, dropout_p=p, seed=seed, backend="triton")
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    keep = _kernels.dropout_keep_mask(1, 2, 17, 24, p, seed, DEVICE)
    assert 0.6 < keep.float().mean().item() < 0.9  # about 1 - p kept
    rq, rk, rv, ref = _masked_dropout_reference(q, k, v, keep, p, causal, window)
    ref.backward(grad.double().cpu())
    torch.testing.assert_close(out.double().cpu(), ref, atol=2e-5, rtol=1e-4)
    for g, r in zip(got, (rq.grad, rk.grad, rv.grad)):
        torch.testing.assert_close(g.double().cpu(), r, atol=2e-5, rtol=1e-4)


def test_dropout_varlen_matches_reference_with_the_same_mask(_kernels):
    """Varlen dropout offsets: row = head * total_q + token, stride max_seqlen_k, i.e. the
    dense mask of one (1, H, total_q, max_seqlen_k) batch."""
    p, seed, lens = 0.2, 99, [3, 17]
    cu = torch.tensor([0, 3, 20], dtype=torch.int32, device=DEVICE)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(20, 2, 32, generator=gen).to(DEVICE).requires_grad_() for _ in range(3))
    out = attention(q, k, v, causal=True, cu_seqlens=cu, dropout_p=p, seed=seed, backend="triton")
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    keep = _kernels.dropout_keep_mask(1, 2, 20, max(lens), p, seed, DEVICE)
    start = 0
    for n in lens:
        sl = slice(start, start + n)
        qs, ks, vs = (t[sl].transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, H, n, D)
        rq, rk, rv, ref = _masked_dropout_reference(qs, ks, vs, keep[:, :, sl, :n], p, True)
        ref.backward(grad[sl].transpose(0, 1).unsqueeze(0).double().cpu())
        torch.testing.assert_close(
            out[sl].transpose(0, 1).double().cpu(), ref[0], atol=2e-5, rtol=1e-4
        )
        for g, r in zip(got, (rq.grad, rk.grad, rv.grad)):
            torch.testing.assert_close(
                g[sl].transpose(0, 1).double().cpu(), r[0], atol=2e-5, rtol=1e-4
            )
        start += n


def test_dropout_is_unbiased():
    """Averaged over many dropout masks (one query row repeated 1024 times: every row draws
    its own mask), the output approaches the output without dropout."""
    gen = torch.Generator().manual_seed(0)
    q1 = torch.randn(1, 1, 1, 16, generator=gen)
    k, v = (torch.randn(1, 1, 8, 16, generator=gen).to(DEVICE) for _ in range(2))
    q = q1.expand(1, 1, 1024, 16).to(DEVICE)
    expected = attention(q[:, :, :1], k, v, backend="triton")[0, 0, 0]
    dropped = attention(q, k, v, dropout_p=0.25, seed=3, backend="triton")[0, 0]
    assert (dropped.mean(0) - expected).abs().max() < 0.06
    assert not torch.allclose(dropped[0], expected)


# ---------------------------------------------------------------------------------------------
# the new op arguments on the autograd-native backends (no interpreter)


@pytest.mark.parametrize(
    "case",
    [
        kernel_case(17, 33, 4, 2, 16, True, window=(4, 2)),
        kernel_case(33, 17, 2, 1, 16, False, window=3),
        kernel_case(17, 17, 4, 2, 16, True, layout="bshd", packed=True),
        varlen_case([1, 5, 30], [1, 5, 30], 4, 2, 16, True),
        varlen_case([5, 1, 30], [7, 4, 12], 2, 2, 16, False, (3, 3)),
    ],
    ids=lambda c: c.name,
)
def test_torch_backend_new_arguments(case):
    check_backend(case, "torch", torch.float32)


def test_window_reference_semantics():
    """window=(left, right): query i sees keys i + (Tk - Tq) - left .. i + (Tk - Tq) + right."""
    allowed = visible_mask(3, 6, False, (1, 1), "cpu")
    expected = torch.tensor(
        [[0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1]], dtype=torch.bool
    )
    assert torch.equal(allowed, expected)
    assert torch.equal(
        visible_mask(3, 6, True, 1, "cpu"),
        torch.tensor([[0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 1, 1]]).bool(),
    )
    assert visible_mask(3, 6, False, None, "cpu") is None


# ---------------------------------------------------------------------------------------------
# what the triton backend refuses, and why


def test_unsupported_inputs_name_the_reason(monkeypatch):
    q = torch.randn(1, 2, 8, 32, device=DEVICE)
    mask = torch.ones(8, 8, dtype=torch.bool, device=DEVICE)
    with pytest.raises(BackendError, match="attn_mask .* not supported by the triton backend"):
        attention(q, q, q, attn_mask=mask, backend="triton")
    big = torch.randn(1, 2, 8, 512, device=DEVICE)
    with pytest.raises(BackendError, match="head_dim 512 > 256"):
        attention(big, big, big, backend="triton")
    with pytest.raises(BackendError, match="dtype float64"):
        attention(q.double(), q.double(), q.double(), backend="triton")
    with registry.use_backend("attention=triton"):
        with pytest.raises(BackendError, match="use_backend"):
            attention(q, q, q, attn_mask=mask)
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(BackendError, match="TRITON_INTERPRET=1"):
            attention(q, q, q, backend="triton")
        # auto never picks triton on CPU: it falls back to torch with an attn_mask or without
        assert registry.select("attention", "cpu", None, q=q, k=q, v=q, attn_mask=mask).name in (
            "cpu",
            "torch",
        )


def test_argument_errors():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(InputError, match="layout"):
        attention(q, q, q, layout="sbhd")
    with pytest.raises(InputError, match="window"):
        attention(q, q, q, window=(-3, 2))
    with pytest.raises(InputError, match="window"):
        attention(q, q, q, window="big")
    packed = torch.randn(10, 2, 16)
    with pytest.raises(ShapeError, match="int32"):
        attention(packed, packed, packed, cu_seqlens=torch.tensor([0, 4, 10]))
    with pytest.raises(ShapeError, match="rise from 0"):
        attention(packed, packed, packed, cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32))
    with pytest.raises(InputError, match="attn_mask cannot be combined"):
        cu = torch.tensor([0, 10], dtype=torch.int32)
        attention(packed, packed, packed, cu_seqlens=cu, attn_mask=torch.ones(10, 10).bool())
    with pytest.raises(ShapeError, match="total_tokens"):
        attention(q, q, q, cu_seqlens=torch.tensor([0, 8], dtype=torch.int32))


# ---------------------------------------------------------------------------------------------
# the benchmark's CPU smoke mode


def test_benchmark_dry_run(tmp_path):
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_attention.py"
    spec = importlib.util.spec_from_file_location("bench_attention", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_attention", bench)  # dataclasses look their module up
    spec.loader.exec_module(bench)
    assert bench.visible_pairs(4, 4, True) == 10 and bench.visible_pairs(2, 5, True) == 9
    rows = bench.main(
        ["--dry-run", "--out", str(tmp_path), "--providers", "turbolm_torch,sdpa_math"]
    )
    assert rows and all(r["status"] == "ok" for r in rows), rows
    assert all(r["err_out"] < 1e-4 and r["tflops"] > 0 for r in rows)
    assert (tmp_path / "attention.csv").exists() and (tmp_path / "attention.md").exists()


# ---------------------------------------------------------------------------------------------
# convergence: a small TransformerLM trained with the Triton kernels vs the reference


def _train_losses(attention_backend: str, steps: int = 50) -> list[float]:
    from turbolm.models import TransformerConfig, TransformerLM

    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=64, context=16, n_layer=2, n_head=2, d_model=32)
    model = TransformerLM(config).to(DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    losses = []
    with registry.use_backend({"attention": attention_backend}):
        for _ in range(steps):
            _, loss = model(data[:, :-1], data[:, 1:])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses


def test_convergence_matches_reference():
    """50 fp32 training steps (forward and backward through the kernels every step) give the
    reference's losses within 1e-4."""
    ref = _train_losses("reference")
    got = _train_losses("triton")
    assert ref[-1] < ref[0] - 0.5, "the reference run did not learn"
    for step, (a, b) in enumerate(zip(got, ref)):
        assert abs(a - b) <= 1e-4, f"step {step}: triton loss {a:.6f} vs reference {b:.6f}"


# ---------------------------------------------------------------------------------------------
# large sweeps (make test-all) and the real GPU


@pytest.mark.slow
@pytest.mark.parametrize("d", [32, 64, 80, 96, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("tq,tk", [(1, 1), (31, 47), (70, 33), (100, 100)])
def test_sweep(tq, tk, causal, dtype, d):
    check_backend(kernel_case(tq, tk, 4, 2, d, causal, batch=1), "triton", dtype, DEVICE)


@pytest.mark.slow
@pytest.mark.parametrize("window", [(0, 0), (1, 2), (16, 0), (40, 7), 9])
@pytest.mark.parametrize("tq,tk", [(50, 50), (30, 77), (77, 30)])
@pytest.mark.parametrize("causal", [False, True])
def test_sweep_windows(causal, tq, tk, window):
    case = kernel_case(tq, tk, 2, 1, 32, causal, window=window, batch=1)
    check_backend(case, "triton", torch.float32, DEVICE)


GPU_CASES = [
    # (tq, tk, hq, hkv, d, causal, window, layout, dtypes)
    (1024, 1024, 8, 2, 128, True, None, "bhsd", "bf16 fp16 fp32"),
    (777, 1500, 8, 8, 64, True, None, "bshd", "bf16 fp16"),
    (1500, 777, 4, 1, 80, False, None, "bhsd", "bf16"),
    (1024, 1024, 4, 4, 256, True, (128, 0), "bhsd", "bf16 fp32"),
    (513, 513, 4, 2, 96, False, (64, 64), "bshd", "bf16 fp16"),
    (1, 2048, 8, 1, 128, True, None, "bhsd", "bf16"),
    (300, 300, 4, 2, 32, False, None, "bhsd", "bf16"),
]
_GPU_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GPU_PARAMS = [
    pytest.param(*case[:-1], _GPU_DTYPES[name], id=f"{case[0]}x{case[1]}-d{case[4]}-{name}")
    for case in GPU_CASES
    for name in case[-1].split()
]


@pytest.fixture
def gpu():
    if DEVICE != "cuda":
        pytest.skip("needs a CUDA GPU (and TRITON_INTERPRET unset)")


@pytest.mark.gpu
@pytest.mark.parametrize("tq,tk,hq,hkv,d,causal,window,layout,dtype", GPU_PARAMS)
def test_gpu(gpu, tq, tk, hq, hkv, d, causal, window, layout, dtype):
    case = kernel_case(tq, tk, hq, hkv, d, causal, window=window, layout=layout, batch=2)
    check_backend(case, "triton", dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_varlen_and_dropout(gpu, dtype):
    lens = [1, 5, 300, 1000, 77]
    check_backend(varlen_case(lens, lens, 8, 2, 128, True), "triton", dtype, "cuda")
    q, k, v = (
        torch.randn(2, 8, 600, 64, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3)
    )
    a = _run_with_grads(q, k, v, causal=True, dropout_p=0.1, seed=3)
    b = _run_with_grads(q, k, v, causal=True, dropout_p=0.1, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # deterministic, no atomics


def _force_config(kernels, monkeypatch, d: int, index: int) -> None:
    """Pin the ``index``-th tile candidate of each kernel (bf16, head dim ``d``); skip when the
    lists are shorter (one test per candidate, so parallel test workers share the compiles)."""
    lists = [kernels.tile_configs(kind, d, False) for kind in ("fwd", "dkdv", "dq")]
    if index >= max(len(c) for c in lists):
        pytest.skip(f"head dim {d} has fewer than {index + 1} tile candidates")
    forced = {kind: c[min(index, len(c) - 1)] for kind, c in zip(("fwd", "dkdv", "dq"), lists)}
    monkeypatch.setattr(kernels, "FORCE_CONFIG", forced)


@pytest.mark.gpu
@pytest.mark.parametrize("index", range(5))
@pytest.mark.parametrize("d", [64, 128, 256])
def test_gpu_every_tile_config(gpu, _kernels, monkeypatch, d, index):
    """Each candidate the autotuner may pick computes the right thing (bf16, causal)."""
    _force_config(_kernels, monkeypatch, d, index)
    check_backend(kernel_case(300, 300, 2, 1, d, True, batch=1), "triton", torch.bfloat16, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("index", range(5))
def test_gpu_tma_every_d128_tile_config(gpu, _kernels, monkeypatch, index):
    """The tensor-descriptor kernels on the GPU, each d128 bf16 tile candidate."""
    monkeypatch.setattr(_kernels, "TMA", True)
    _force_config(_kernels, monkeypatch, 128, index)
    case = kernel_case(1000, 1000, 4, 2, 128, True, batch=2)
    check_backend(case, "triton", torch.bfloat16, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["varlen-d80-gqa", "bshd-packed-window", "varlen-d80-empty-seqs"])
def test_gpu_tma(gpu, _kernels, monkeypatch, name):
    """The tensor-descriptor kernels on the GPU: padded head dim (varlen), strided bshd views."""
    monkeypatch.setattr(_kernels, "TMA", True)
    check_backend(TMA_CASES[name](), "triton", torch.bfloat16, "cuda")


@pytest.mark.gpu
def test_gpu_autotuned(gpu, monkeypatch):
    """The autotuner path (several candidates benchmarked on the GPU), then a cached pick."""
    monkeypatch.delenv("TURBOLM_AUTOTUNE")
    for _ in range(2):
        case = kernel_case(1000, 1000, 4, 2, 128, True, window=(200, 0), batch=2)
        check_backend(case, "triton", torch.bfloat16, "cuda")


# ---------------------------------------------------------------------------------------------
# the kernels compile for real GPUs (no GPU needed: Triton compiles to a cubin with its ptxas)

_COMPILE_SCRIPT = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from turbolm.kernels import attention as K

assert not K.INTERPRET
DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
POINTERS = {"CU_Q": "*i32", "CU_K": "*i32", "LSE": "*fp32", "DELTA": "*fp32"}
DATA = ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")

def compile_one(kernel, dtype, consts, arch, warps, stages):
    sig = {}
    for name in kernel.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in POINTERS:
            sig[name] = POINTERS[name]
        elif name in DATA:
            sig[name] = "*" + dtype
        elif name in ("sm_scale", "drop_p"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    src = ASTSource(fn=kernel, signature=sig, constexprs=consts)
    target = GPUTarget("cuda", arch, 32)
    return triton.compile(src, target=target, options={"num_warps": warps, "num_stages": stages})

results = []
for case in json.loads(sys.argv[1]):
    dtype, d, arch, all_configs = case["dtype"], case["d"], case["arch"], case["all_configs"]
    block_d = K._block_d(d)
    flags = {"HEAD_D": d, "BLOCK_D": block_d, "HAS_LEFT": case["left"], "HAS_RIGHT": True,
             "DROPOUT": case["dropout"], "IS_VARLEN": case["varlen"], "DOT_FP32": False,
             "PRECISION": "ieee" if dtype == "fp32" else "tf32"}
    for kind in ("fwd", "dkdv", "dq"):
        configs = K.tile_configs(kind, block_d, dtype == "fp32")
        for bm, bn, w, s in configs if all_configs else configs[:1]:
            consts = {**flags, "BLOCK_M": bm, "BLOCK_N": bn}
            if "USE_TMA" in K._KERNELS[kind].arg_names:
                consts["USE_TMA"] = case.get("tma", False)
            c = compile_one(K._KERNELS[kind], dtype, consts, arch, w, s)
            results.append([kind, dtype, d, arch, [bm, bn, w, s], c.metadata.shared])
    pre = {"HEAD_D": d, "BLOCK_D": block_d, "IS_VARLEN": case["varlen"], "BLOCK_M": K.PRE_BLOCK_M}
    c = compile_one(K._bwd_preprocess, dtype, pre, arch, 4, 1)
    results.append(["preprocess", dtype, d, arch, [K.PRE_BLOCK_M, 0, 4, 1], c.metadata.shared])
print("RESULTS" + json.dumps(results))
"""

# Shared memory per block: sm_80 (A100) 163 KiB, sm_90 (H100 / H200) 227 KiB.
_SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def _compile_for_gpu(cases):
    import json
    import subprocess
    import sys

    pytest.importorskip("triton.backends.compiler")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT, json.dumps(cases)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode != 0 and "ASTSource" in proc.stderr and "TypeError" in proc.stderr:
        pytest.skip("this Triton's ASTSource API differs")
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.split("RESULTS", 1)[1])
    for kind, dtype, d, arch, config, shared in results:
        assert shared <= _SMEM_LIMIT[arch], (kind, dtype, d, arch, config, shared)
    return results


def test_kernels_compile_for_sm90():
    """The interpreter accepts code the compiler rejects: compile every kernel for sm_90, with
    every feature on (left + right window, dropout, varlen, padded head dim)."""
    case = {"dtype": "bf16", "d": 80, "arch": 90, "left": True, "dropout": True, "varlen": True}
    results = _compile_for_gpu([{**case, "all_configs": False}])
    assert {r[0] for r in results} == {"fwd", "dkdv", "dq", "preprocess"}


def test_tma_kernels_compile_for_sm90():
    """The kernels reading their streamed tiles through tensor descriptors (``TMA``), the first
    d128 bf16 tile candidate, and the padded / windowed / dropout / varlen variant."""
    plain = {"dtype": "bf16", "d": 128, "arch": 90, "left": False, "dropout": False}
    cases = [
        {**plain, "varlen": False, "all_configs": False, "tma": True},
        {**plain, "d": 80, "left": True, "dropout": True, "varlen": True, "all_configs": False,
         "tma": True},
    ]  # fmt: skip
    results = _compile_for_gpu(cases)
    assert {r[0] for r in results} == {"fwd", "dkdv", "dq", "preprocess"}


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_all_tile_configs_compile_and_fit_shared_memory(arch):
    cases = [
        {"dtype": dt, "d": d, "arch": arch, "left": False, "dropout": False, "varlen": False,
         "all_configs": True}
        for dt in ("bf16", "fp32") for d in (64, 128, 256)
    ]  # fmt: skip
    _compile_for_gpu(cases)
