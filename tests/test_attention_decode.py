"""The decode kernels of ``attention`` (``cpu`` C++ and ``cuda`` CUDA C++, csrc/attention):
harness vs the fp64 reference at cache lengths {1, 33, 4096}, key splits, strided caches,
bad inputs, backend selection, opcheck, and greedy generation with identical tokens.

``gpu`` tests run the ``cuda`` backend and skip without a GPU."""

from __future__ import annotations

import pytest
import torch

from tests.harness import OpCase, check_backend
from turbolm import ext
from turbolm.errors import BackendError, DTypeError, InputError, ShapeError
from turbolm.generate import generate_tokens
from turbolm.models import TransformerConfig, TransformerLM
from turbolm.nn.attention import KVCache
from turbolm.ops import attention, decode_kernels, registry, use_backend

HAS_CUDA = torch.cuda.is_available()
CACHE_LENGTHS = [1, 33, 4096]
HEADS = {"mha": (4, 4), "gqa": (8, 2), "mqa": (4, 1)}  # (Hq, Hkv)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setenv("TURBOLM_POISON_OUTPUTS", "1")


@pytest.fixture(scope="module")
def built():
    if ext.load_extension() is None:
        pytest.skip(f"C++ extension unavailable: {ext.extension_status(build=False)[1]}")
    if not hasattr(torch.ops.turbolm, "attention_decode"):
        pytest.skip("the extension was built without csrc/attention (TURBOLM_EXT_OPS)")
    return ext.load_extension()


def decode_case(
    tq, tk, heads, d, *, causal=True, window=None, layout="bhsd", batch=2, cache_slack=0
) -> OpCase:
    """``cache_slack`` > 0: k/v are the first ``tk`` positions of longer cache buffers (a
    strided view, as ``KVCache`` returns)."""
    hq, hkv = heads

    def make_inputs(gen):
        def randn(h, t):
            shape = (batch, t, h, d) if layout == "bshd" else (batch, h, t, d)
            return torch.randn(shape, generator=gen, dtype=torch.float64)

        k, v = randn(hkv, tk + cache_slack), randn(hkv, tk + cache_slack)
        seq = 1 if layout == "bshd" else 2
        return {"q": randn(hq, tq), "k": k.narrow(seq, 0, tk), "v": v.narrow(seq, 0, tk)}

    def call(backend, q, k, v):
        if backend not in ("reference",):  # the kernels read the cache in place
            k, v = (t.to(q.dtype) for t in (k, v))
        return attention(q, k, v, causal=causal, window=window, layout=layout, backend=backend)

    name = f"decode[{tq}x{tk},h{hq}/{hkv},d{d},causal={causal},window={window},{layout}]"
    return OpCase(name, call, make_inputs)


# ---- cpu backend: the harness -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tk", CACHE_LENGTHS)
@pytest.mark.parametrize("heads", list(HEADS), ids=str)
@pytest.mark.parametrize("tq", [1, 4])
def test_cpu_matches_reference(built, dtype, tk, heads, tq):
    check_backend(decode_case(tq, tk, HEADS[heads], 64), "cpu", dtype)


@pytest.mark.parametrize("d", [8, 32, 80, 128, 256])
@pytest.mark.parametrize("tk", [33, 700])
def test_cpu_head_dims(built, d, tk):
    check_backend(decode_case(2, tk, (4, 2), d), "cpu", torch.float32)


@pytest.mark.parametrize(
    "variant",
    [
        {"causal": False},
        {"window": 16},
        {"window": (8, 3), "causal": False},
        {"layout": "bshd"},
        {"cache_slack": 50},
        {"cache_slack": 7, "layout": "bshd"},
    ],
    ids=str,
)
@pytest.mark.parametrize("tk", [1, 33, 4096])
def test_cpu_variants(built, variant, tk):
    check_backend(decode_case(3, tk, (4, 2), 64, **variant), "cpu", torch.float32)


def test_cpu_float64_is_exact(built):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 3, 40, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 4096, 40, generator=gen, dtype=torch.float64) for _ in range(2))
    ref = attention(q, k, v, causal=True, backend="reference")
    out = attention(q, k, v, causal=True, backend="cpu")
    assert (out - ref).abs().max() < 1e-12


@pytest.mark.parametrize("num_splits", [1, 2, 5, 64, 5000])
def test_key_splits_merge_exactly(built, num_splits):
    """Cutting the keys into chunks changes nothing beyond rounding, lse included; rows that
    see no key (more queries than keys) give zeros and lse = -inf."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 6, 16, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(1, 1, 4, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    out, lse = decode_kernels.decode(q, k, v, causal=True, num_splits=num_splits)
    ref = attention(q, k, v, causal=True, backend="reference")
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    scores = (q @ k.repeat_interleave(2, dim=1).transpose(-1, -2)) / 4.0  # (1, 2, 6, 4)
    visible = torch.ones(6, 4, dtype=torch.bool).tril(diagonal=4 - 6)
    ref_lse = scores.masked_fill(~visible, float("-inf")).logsumexp(-1)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-12)
    assert torch.isneginf(lse[..., :2]).all() and (out[..., :2, :] == 0).all()


def test_empty_cache_gives_zeros(built):
    q = torch.randn(1, 2, 1, 8)
    k = v = torch.randn(1, 2, 0, 8)
    out, lse = decode_kernels.decode(q, k, v, causal=True)
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_reads_kv_cache_in_place(built):
    """The KVCache hands out strided slices of its buffers; the kernel reads them as they are
    (no copy) and matches the reference."""
    cache = KVCache(batch_size=2, n_kv_head=2, max_len=64, head_dim=16)
    k, v = cache.append(torch.randn(2, 2, 33, 16), torch.randn(2, 2, 33, 16))
    assert not k.is_contiguous()
    q = torch.randn(2, 4, 1, 16)
    with torch.no_grad():
        out = attention(q, k, v, causal=True, backend="cpu")
    ref = attention(q.double(), k.double(), v.double(), causal=True, backend="reference")
    assert (out.double() - ref).abs().max() < 1e-5


# ---- errors and selection ---------------------------------------------------------------------


def test_errors_are_typed(built):
    ops = torch.ops.turbolm
    q, k = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 5, 8)
    with pytest.raises(DTypeError, match=r"k must have the dtype of q \(float32\), got float16"):
        ext.call(ops.attention_decode, q, k.half(), k, 0.5, True, -1, -1, 0)
    with pytest.raises(ShapeError, match=r"q heads \(4\) must be a multiple of k/v heads \(3\)"):
        k3 = torch.randn(1, 3, 5, 8)
        ext.call(ops.attention_decode, q, k3, k3, 0.5, True, -1, -1, 0)
    with pytest.raises(InputError, match="k must have a unit stride on head_dim"):
        kt = torch.randn(1, 2, 8, 5).transpose(-1, -2)
        ext.call(ops.attention_decode, q, kt, kt, 0.5, True, -1, -1, 0)
    with pytest.raises(InputError, match="scale must be a finite number > 0"):
        ext.call(ops.attention_decode, q, k, k, -1.0, True, -1, -1, 0)
    with pytest.raises(ShapeError, match="k and v must have the same shape"):
        ext.call(ops.attention_decode, q, k, k[:, :, :3], 0.5, True, -1, -1, 0)
    with pytest.raises(DTypeError, match="q must have dtype in"):
        ext.call(ops.attention_decode, q.long(), k.long(), k.long(), 0.5, True, -1, -1, 0)


def test_named_backend_says_what_it_cannot_do(built):
    q, k = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 5, 8)
    with pytest.raises(BackendError, match="inference only"):
        attention(q.requires_grad_(), k, k, causal=True, backend="cpu")
    q = q.detach()
    with pytest.raises(BackendError, match="attn_mask is not supported by the decode kernel"):
        attention(q, k, k, attn_mask=torch.ones(1, 5, dtype=torch.bool), backend="cpu")
    with pytest.raises(BackendError, match="dropout"):
        attention(q, k, k, dropout_p=0.1, backend="cpu")
    with pytest.raises(BackendError, match="needs CUDA tensors|no CUDA device"):
        attention(q, k, k, backend="cuda")


def test_auto_picks_the_decode_kernel_only_for_inference_decoding(built):
    q, k = torch.randn(1, 4, 1, 8), torch.randn(1, 2, decode_kernels.CPU_AUTO_MIN_KEYS, 8)

    def chosen(q, k=k, **kw):
        return registry.select("attention", "cpu", None, q=q, k=k, v=k, **kw).name

    with torch.no_grad():
        assert chosen(q) == "cpu"
        assert chosen(torch.randn(1, 4, 17, 8)) == "torch"  # prefill: more than 16 queries
        assert chosen(q, dropout_p=0.1) == "torch"
        assert chosen(q, k=k[:, :, :-1]) == "torch"  # a short cache: SDPA is as fast
    assert chosen(q.requires_grad_()) == "torch"  # training
    assert chosen(q.detach()) == "cpu"  # no input needs a gradient


def test_opcheck(built):
    q, k, v = torch.randn(2, 4, 3, 16), torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16)
    for args in [(q, k, v, 0.25, True, -1, -1, 0), (q, k, v, 0.25, False, 4, 2, 3)]:
        torch.library.opcheck(torch.ops.turbolm.attention_decode, args)


# ---- generation: identical tokens -------------------------------------------------------------


def _model(n_kv_head=None, context=64):
    torch.manual_seed(0)
    config = TransformerConfig(
        vocab_size=50, context=context, n_layer=2, n_head=4, n_kv_head=n_kv_head, d_model=32
    )
    model = TransformerLM(config)
    with torch.no_grad():  # sharper distributions: greedy paths diverge on any real error
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def _greedy(model, backend, prompt, n, device="cpu"):
    with use_backend({"attention": backend}):
        return list(generate_tokens(model.to(device), prompt, n, temperature=0.0))


@pytest.mark.parametrize("n_kv_head", [None, 2, 1])
def test_generate_identical_tokens_cpu_vs_reference(built, n_kv_head):
    """Greedy decoding: the decode kernel (every single-token step) and the reference give the
    same tokens, across the context limit (the window rebuild uses the decode kernel for short
    windows too)."""
    model = _model(n_kv_head, context=24)
    prompt = [3, 1, 4, 1, 5]
    calls = []
    original = decode_kernels._fwd

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    backend = registry.registered("attention")["cpu"]
    patched = registry.Backend(**{**backend.__dict__, "fwd": counting})
    registry._REGISTRY["attention"]["cpu"] = patched
    try:
        ours = _greedy(model, "cpu", prompt, 40)
    finally:
        registry._REGISTRY["attention"]["cpu"] = backend
    ref = _greedy(model, "reference", prompt, 40)
    assert ours == ref
    assert len(set(ours)) > 3  # not a degenerate repetition
    assert len(calls) >= 40 * 2  # every step of both layers ran the kernel


# ---- cuda backend -----------------------------------------------------------------------------

gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tk", CACHE_LENGTHS)
@pytest.mark.parametrize("heads", list(HEADS), ids=str)
@pytest.mark.parametrize("tq", [1, 4])
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_matches_reference(dtype, tk, heads, tq, d):
    check_backend(decode_case(tq, tk, HEADS[heads], d), "cuda", dtype, device="cuda")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("d", [32, 80, 96, 256])
@pytest.mark.parametrize(
    "variant",
    [{}, {"causal": False}, {"window": 16}, {"layout": "bshd"}, {"cache_slack": 50}],
    ids=str,
)
def test_gpu_variants(d, variant):
    check_backend(decode_case(3, 1000, (8, 2), d, **variant), "cuda", torch.bfloat16, "cuda")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("d", [7, 33, 200])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (12, 1)], ids=str)
def test_gpu_odd_head_dims(d, heads):
    """Head dims that fill no whole 16-byte vector take the element-wise loads; 1, 4 and 12
    rows per kv head take the 1-, 4- and 3x4-row blocks."""
    check_backend(decode_case(1, 700, heads, d), "cuda", torch.float16, "cuda")


def _cuda_matches_cpu_fp64(q, k, v, num_splits, **kw):
    """The CUDA kernel in fp32 on ``q, k, v`` (fp64, CPU) with ``num_splits`` key chunks: out
    and lse within 1e-5 of the fp64 CPU kernel's. Returns the CUDA (out, lse)."""
    ref_out, ref_lse = decode_kernels.decode(q, k, v, **kw)  # cpu, fp64
    out, lse = decode_kernels.decode(
        *(t.float().cuda() for t in (q, k, v)), num_splits=num_splits, **kw
    )
    torch.testing.assert_close(out.cpu().double(), ref_out, rtol=0, atol=1e-5)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, rtol=0, atol=1e-5)
    return out, lse


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("d", [64, 33])
@pytest.mark.parametrize("num_splits", [0, 1, 3, 64, 99, 255])
def test_gpu_key_splits(num_splits, d):
    """Requested split counts up to 255 (not powers of two; 99 and 255 of 300 keys leave
    trailing empty chunks, lse = -inf); d 33 takes the merge's element-wise path."""
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 2, 6, d, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(1, 1, 300, d, generator=gen, dtype=torch.float64) for _ in range(2))
    _cuda_matches_cpu_fp64(q, k, v, num_splits, causal=True)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("num_splits", [0, 1, 3])
@pytest.mark.parametrize("heads,tq", [((3, 1), 1), ((6, 2), 1), ((2, 1), 3), ((5, 1), 2)], ids=str)
def test_gpu_row_chunk_tails(heads, tq, num_splits):
    """3, 3, 6 and 10 rows per kv head: the last 4-row block holds fewer live rows (out and
    lse of every row, direct write and merge) against the fp64 CPU kernel."""
    gen = torch.Generator().manual_seed(7)
    (hq, hkv), d = heads, 40
    q = torch.randn(2, hq, tq, d, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, hkv, 150, d, generator=gen, dtype=torch.float64) for _ in range(2))
    _cuda_matches_cpu_fp64(q, k, v, num_splits, causal=True)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("num_splits", [0, 2, 5, 64])
def test_gpu_rows_without_keys(num_splits):
    """More queries than keys (causal): the first rows see no key in any chunk (zeros, lse =
    -inf) through the split path and the merge, as on CPU."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 6, 16, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(1, 1, 4, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    out, lse = _cuda_matches_cpu_fp64(q, k, v, num_splits, causal=True)
    assert torch.isneginf(lse[..., :2]).all() and (out[..., :2, :] == 0).all()


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("num_splits", [0, 7, 128, 256])
@pytest.mark.parametrize("window", [(5, 0), (40, 2)], ids=str)
def test_gpu_window_many_empty_chunks(window, num_splits):
    """A sliding window over a long cache: most chunks hold no key a row sees (their lse is
    -inf) and a row's keys straddle chunk and stage boundaries."""
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 8, 3, 128, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 5000, 128, generator=gen, dtype=torch.float64) for _ in range(2))
    _cuda_matches_cpu_fp64(q, k, v, num_splits, causal=False, window=window)


def _grouped_reference(q, k, v):
    """fp64 decode attention on the inputs' device (causal, bottom-right; GQA grouped)."""
    q, k, v = (t.double() for t in (q, k, v))
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    scores = q.reshape(b, hkv, hq // hkv * tq, d) @ k.transpose(-1, -2) / d**0.5
    visible = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(diagonal=tk - tq)
    scores = scores.masked_fill(~visible.repeat(hq // hkv, 1), float("-inf"))
    lse = scores.logsumexp(-1).reshape(b, hq, tq)
    return (scores.softmax(-1) @ v).reshape(b, hq, tq, d), lse


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize(
    "batch,tk,dtype",
    [
        (1, 4096, torch.bfloat16),
        (1, 16384, torch.bfloat16),  # ~45 auto splits: the merge's many-split path
        (32, 4096, torch.bfloat16),
        (3, 16384, torch.float16),
        (1, 40000, torch.float32),
    ],
    ids=str,
)
def test_gpu_benchmark_shapes(batch, tk, dtype):
    """The benchmark's shapes (Hq 32, Hkv 8, D 128, one new token) with the automatic split
    count, against fp64: within twice SDPA's own error plus a small atol; lse too; and two
    calls give bitwise identical results (the merge sums in a fixed order)."""
    torch.manual_seed(5)
    q = torch.randn(batch, 32, 1, 128, device="cuda", dtype=dtype)
    k, v = (torch.randn(batch, 8, tk, 128, device="cuda", dtype=dtype) for _ in range(2))
    ref, ref_lse = _grouped_reference(q, k, v)
    with torch.no_grad():
        out, lse = decode_kernels.decode(q, k, v, causal=True)
        out2, lse2 = decode_kernels.decode(q, k, v, causal=True)
        sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    base = (sdpa.double() - ref).abs().max().item()
    err = (out.double() - ref).abs().max().item()
    assert err <= 2 * base + 1e-3, (err, base)
    assert (lse.double() - ref_lse).abs().max().item() < 1e-3
    assert torch.equal(out, out2) and torch.equal(lse, lse2)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("tk", [100, 3000])
def test_gpu_unaligned_rows(tk):
    """k / v rows 2 elements apart from 16-byte boundaries (a head_dim slice of a wider buffer):
    the element-wise loads into the shared-memory stages, with several splits."""
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(2, 4, 1, 64, generator=gen, dtype=torch.float64).half()
    kb, vb = (torch.randn(2, 2, tk, 66, generator=gen, dtype=torch.float64).half() for _ in "kv")
    k, v = kb[..., 1:65], vb[..., 1:65]
    ref_out, ref_lse = decode_kernels.decode(q.double(), k.double(), v.double(), causal=True)
    kc, vc = (t.cuda()[..., 1:65] for t in (kb, vb))
    out, lse = decode_kernels.decode(q.cuda(), kc, vc, causal=True)
    assert (out.cpu().double() - ref_out).abs().max() < 2e-3
    torch.testing.assert_close(lse.cpu().double(), ref_lse, rtol=0, atol=1e-4)


@pytest.mark.gpu
@gpu
def test_gpu_generate_identical_tokens():
    model = _model(2, context=24)
    prompt = [3, 1, 4, 1, 5]
    ref = _greedy(model, "reference", prompt, 40, "cuda")
    assert _greedy(model, "cuda", prompt, 40, "cuda") == ref


def test_benchmark_dry_run(built, tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_decode.py"
    spec = importlib.util.spec_from_file_location("bench_decode", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--dry-run", "--out", str(tmp_path)])
    assert {r["provider"] for r in rows} == {"turbolm_cpu", "sdpa", "sdpa_math"}
    assert all(r["status"] == "ok" and r["max_err"] < 1e-5 and r["gb_s"] > 0 for r in rows), rows
    assert (tmp_path / "decode.csv").exists() and (tmp_path / "decode.md").exists()
