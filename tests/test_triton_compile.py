"""The LayerNorm / RMSNorm, RNN gate and attention Triton kernels compile for real GPUs (no GPU
needed).

The interpreter (``TRITON_INTERPRET=1``, how the other tests run these kernels on CPU) accepts
code the real compiler rejects, so here every kernel is compiled to a cubin for sm_90 (H100 /
H200) and sm_80 (A100) with Triton's own compiler and ptxas, as the JIT would on that GPU.

What is compiled is what the launchers launch: this file runs as a script in a subprocess
(``TRITON_INTERPRET=0``, so the modules pick their GPU tile sizes) that calls the public
launchers of ``kernels/norm.py``, ``kernels/rnn.py`` and ``kernels/attention.py`` (each tile
candidate of its autotuner forced in turn) on ``meta`` tensors (shapes and
dtypes, no memory), with each ``@triton.jit`` kernel replaced by a recorder, and the SM count
of the target GPU. Every recorded launch is then bound with Triton's own argument binder (the
one ``JITFunction.run`` uses: the same constexprs, the same integer / alignment
specializations, ``num_warps`` / ``num_stages`` as passed) and compiled once per distinct
specialization. A kernel that fails to compile, uses more shared memory per block than the GPU
has, or is launched with a grid the GPU cannot run fails the test with its configuration.

Data pointers: the norm kernels see the storage dtype (fp16 / bf16 / fp32); the RNN gate
kernels always see fp32 (the RNN launchers convert every input dtype once, see
``kernels/rnn.py``), so for them the dtypes vary the launchers' inputs only.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Shared memory per block: sm_80 (A100) 163 KiB, sm_90 (H100 / H200) 227 KiB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# Streaming multiprocessors (the launchers size their grids by it): A100 108, H100 / H200 132.
SM_COUNT = {80: 108, 90: 132}
MAX_GRID = (2**31 - 1, 65535, 65535)

NORM_N = [1, 7, 64, 769, 4096, 8193, 65536]
RNN_HIDDEN = [1, 33, 256, 1024]
DTYPES = ["float16", "bfloat16", "float32"]

NORM_KERNELS = {
    "_norm_fwd_kernel",
    "_norm_bwd_fused_kernel",
    "_norm_bwd_row_sums_kernel",
    "_norm_bwd_cols_kernel",
    "_sum_partials_kernel",
}
RNN_KERNELS = {"_fwd_step_kernel", "_bwd_step_kernel"}
ATTN_KERNELS = {"_fwd_kernel", "_bwd_preprocess", "_bwd_dkdv_kernel", "_bwd_dq_kernel"}


# ---- the subprocess: record the launches, compile them ------------------------------------------


def _norm_calls(case, sm_count):
    """Run the norm launchers (forward and backward) of one case on meta tensors."""
    import torch
    from turbolm.kernels import norm as K

    K._sm_count = lambda device: sm_count
    dt = getattr(torch, case["dtype"])
    rows, n, rms = case["rows"], case["n"], case["rms"]

    def t(*shape, dtype=dt):
        return torch.empty(*shape, dtype=dtype, device="meta")

    x, w, b = t(rows, n), t(n) if case["w"] else None, t(n) if case["b"] else None
    res = t(rows, n) if case["res"] else None
    if rms:
        out = K.rms_norm_fwd(x, w, 1e-6, residual=res)
        y, rstd, mean = out[0], out[1], None
    else:
        out = K.layer_norm_fwd(x, w, b, 1e-5, residual=res)
        y, mean, rstd = out[:3]
    s = out[-1] if res is not None else x
    dsum = t(rows, n) if res is not None else None
    if rms:
        K.rms_norm_bwd(y, s, w, rstd, dsum=dsum)
    else:
        K.layer_norm_bwd(y, s, w, mean, rstd, b is not None, dsum=dsum)


def _rnn_calls(case):
    """Run the RNN layer launchers (forward and backward) of one case on meta tensors."""
    import torch
    from turbolm.kernels import rnn as K

    dt = getattr(torch, case["dtype"])
    mode, hidden, proj, batch = case["mode"], case["hidden"], case["proj"], case["batch"]
    steps, inp, bidir, biases = 2, 8, case["bidir"], case["biases"]
    D, G, P = 2 if bidir else 1, K.GATES[mode] * hidden, proj or hidden

    def t(*shape):
        return torch.empty(*shape, dtype=dt, device="meta")

    weights = []
    for _ in range(D):
        weights += [t(G, inp), t(G, P)] + ([t(G), t(G)] if biases else [])
        weights += [t(P, hidden)] if proj else []
    x, h0 = t(steps, batch, inp), t(D, batch, P)
    c0 = t(D, batch, hidden) if mode == "lstm" else None
    lengths = None
    if case["lengths"] and batch > 1:  # unsorted, padded: steps run on prefixes of the batch
        lengths = torch.tensor([1 + (i % steps) for i in range(batch)])
    y, h_n, c_n, ws, hprev, hraw = K.layer_fwd(
        x, h0, c0, lengths, weights, mode, proj, biases, bidir
    )
    K.layer_bwd(
        torch.empty_like(y), torch.empty_like(h_n), None if c_n is None else torch.empty_like(c_n),
        x, lengths, weights, ws, hprev, hraw, mode, proj, biases, bidir,
    )  # fmt: skip


def _attn_calls(case):
    """Run the attention launchers (forward and backward) of one case on meta tensors, with
    tile candidate ``case["tile"]`` of every kernel's autotuning list forced."""
    import torch
    from turbolm.kernels import attention as K

    dt, d, group = getattr(torch, case["dtype"]), case["d"], case["group"]
    block_d = K.triton.next_power_of_2(d)
    K.FORCE_CONFIG.clear()
    for kind in ("fwd", "dkdv", "dq"):
        tiles = K.tile_configs(kind, block_d, dt == torch.float32)
        K.FORCE_CONFIG[kind] = tiles[min(case["tile"], len(tiles) - 1)]
    hkv, seq = 2, 1000

    def t(heads):
        return torch.empty(2, heads, seq, d, dtype=dt, device="meta")

    q, k, v = t(hkv * group), t(hkv), t(hkv)
    opts = {"causal": case["causal"], "window": case["window"], "dropout_p": case["dropout"]}
    out, lse = K.attention_fwd(q, k, v, **opts)
    K.attention_bwd(torch.empty_like(out), q, k, v, out, lse, **opts)
    K.FORCE_CONFIG.clear()


class _Recorder:
    """Stands in for a @triton.jit kernel in its module: ``kernel[grid](*args, **kwargs)``
    records the launch instead of running it."""

    def __init__(self, fn, calls):
        self.fn, self.calls = fn, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.fn, grid, args, kwargs))


def _install_recorders(module, names, calls):
    for name in names:
        fn = getattr(module, name)
        fn = fn.fn if isinstance(fn, _Recorder) else fn
        assert hasattr(fn, "arg_names"), f"{module.__name__}.{name} is not a @triton.jit kernel"
        setattr(module, name, _Recorder(fn, calls))


def _main(cases):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    from turbolm.kernels import attention, norm, rnn

    assert not norm.INTERPRET and not rnn.INTERPRET, "TRITON_INTERPRET must be 0"
    assert not attention.INTERPRET, "TRITON_INTERPRET must be 0"
    calls = []
    _install_recorders(norm, NORM_KERNELS, calls)
    _install_recorders(rnn, RNN_KERNELS, calls)
    _install_recorders(attention, ATTN_KERNELS, calls)
    # The attention launcher looks its kernels up in this table.
    attention._KERNELS.update(
        fwd=attention._fwd_kernel, dkdv=attention._bwd_dkdv_kernel, dq=attention._bwd_dq_kernel
    )
    results, failures, seen, binders = [], [], set(), {}
    for case in cases:
        arch = case["arch"]
        target = GPUTarget("cuda", arch, 32)
        backend = make_backend(target)
        del calls[:]
        if case["family"] == "norm":
            _norm_calls(case, SM_COUNT[arch])
        elif case["family"] == "attention":
            _attn_calls(case)
        else:
            _rnn_calls(case)
        for fn, grid, args, kwargs in calls:
            # What JITFunction.run does before compiling, with this target's backend.
            if (fn, arch) not in binders:
                binders[fn, arch] = create_function_from_signature(fn.signature, fn.params, backend)
            bound, specialization, opts = binders[fn, arch](*args, **kwargs)
            options, signature, constexprs, attrs = fn._pack_args(
                backend, kwargs, bound, specialization, opts
            )
            key = (fn.__name__, arch, repr(specialization), repr(sorted(opts.items())))
            if key in seen:
                continue
            seen.add(key)
            grid = tuple(grid) + (1,) * (3 - len(grid))
            consts = {fn.arg_names[p[0]]: v for p, v in constexprs.items()}
            ptrs = sorted({v for v in signature.values() if v.startswith("*")})
            row = {
                "kernel": fn.__name__,
                "arch": arch,
                "case": case,
                "constexprs": {
                    k: v if isinstance(v, (int, float, bool)) else str(v) for k, v in consts.items()
                },  # fmt: skip
                "pointers": ptrs,
                "num_warps": options.num_warps,
                "num_stages": options.num_stages,
                "grid": grid,
            }
            try:
                src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
                compiled = triton.compile(src, target=target, options=options.__dict__)
            except Exception as e:  # report every failing configuration, not only the first
                failures.append({**row, "error": f"{type(e).__name__}: {e}"[-3000:]})
                continue
            assert "cubin" in compiled.asm, "no cubin: ptxas did not run"
            results.append({**row, "shared": compiled.metadata.shared})
    return {"results": results, "failures": failures}


# ---- the tests -------------------------------------------------------------------------------


def _compile(cases, jobs=2):
    """Compile the launches of ``cases`` in ``jobs`` subprocesses; assert that every one
    compiled, fits the shared memory of its GPU and has a valid grid; return the results."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource, make_backend  # noqa: F401
        from triton.runtime.jit import create_function_from_signature  # noqa: F401
    except ImportError as e:
        pytest.skip(f"this Triton cannot compile for a GPU target without one: {e}")
    import triton.backends

    if "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("this Triton has no NVIDIA backend")
    env = {
        **os.environ,
        "TRITON_INTERPRET": "0",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("TURBOLM_NORM_AUTOTUNE", None)
    chunks = [cases[i::jobs] for i in range(jobs) if cases[i::jobs]]
    results, failures = [], []
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        try:
            for i, chunk in enumerate(chunks):
                path = Path(tmp) / f"chunk{i}"
                path.with_suffix(".in").write_text(json.dumps(chunk))
                with open(path.with_suffix(".log"), "w") as log:
                    procs.append(
                        subprocess.Popen(
                            [sys.executable, __file__, str(path)],
                            env=env,
                            cwd=REPO,
                            stdout=log,
                            stderr=subprocess.STDOUT,
                        )
                    )
            for i, proc in enumerate(procs):
                path = Path(tmp) / f"chunk{i}"
                proc.wait(timeout=3600)
                log = path.with_suffix(".log").read_text()
                if proc.returncode != 0 and "AttributeError" in log and "_pack_args" in log:
                    pytest.skip("this Triton's JIT binder API differs")
                assert proc.returncode == 0, log[-4000:]
                got = json.loads(path.with_suffix(".out").read_text())
                results += got["results"]
                failures += got["failures"]
        finally:
            for proc in procs:  # the other chunks, when one failed
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    assert not failures, f"{len(failures)} kernel configurations failed to compile:\n" + "\n".join(
        json.dumps(f) for f in failures[:5]
    )
    for r in results:
        assert r["shared"] <= SMEM_LIMIT[r["arch"]], ("shared memory", r)
        assert all(0 < g <= m for g, m in zip(r["grid"], MAX_GRID)), ("grid", r)
    return results


def _norm_cases(arch, dtypes, ns, rows, full_flags=True):
    flags = [  # (rms, weight, bias, residual)
        (rms, w, b, res)
        for rms in (False, True)
        for w in (True, False)
        for b in ((False,) if rms else (True, False))
        for res in (False, True)
    ]
    if not full_flags:
        flags = [(False, True, True, False), (False, True, True, True), (True, True, False, True)]
    return [
        {"family": "norm", "arch": arch, "dtype": dt, "n": n, "rows": r,
         "rms": rms, "w": w, "b": b, "res": res}
        for dt, n, r, (rms, w, b, res) in itertools.product(dtypes, ns, rows, flags)
    ]  # fmt: skip


def _rnn_cases(arch, dtypes, hiddens, wide=True):
    cases = []
    for dt, mode, hidden in itertools.product(
        dtypes, ["lstm", "gru", "rnn_tanh", "rnn_relu"], hiddens
    ):
        projs = [0, max(1, hidden // 2)] if mode == "lstm" else [0]
        variants = itertools.product(projs, [False, True], [True, False], [1, 5], [False, True])
        for proj, bidir, biases, batch, lengths in (
            variants if wide else [(projs[-1], True, True, 5, True)]
        ):
            cases.append(
                {"family": "rnn", "arch": arch, "dtype": dt, "mode": mode, "hidden": hidden,
                 "proj": proj, "bidir": bidir, "biases": biases, "batch": batch, "lengths": lengths}
            )  # fmt: skip
    return cases


def _attn_cases(arch, dtype, d, tiles, variants=((True, None, 1, 0.0),)):
    """Attention cases: (causal, window, GQA group, dropout) variants x forced tile candidates."""
    return [
        {"family": "attention", "arch": arch, "dtype": dtype, "d": d, "tile": tile,
         "causal": causal, "window": window, "group": group, "dropout": dropout}
        for tile in tiles
        for causal, window, group, dropout in variants
    ]  # fmt: skip


def _covered(results, kernel, name):
    return {r["constexprs"].get(name) for r in results if r["kernel"] == kernel}


def _check_coverage(results, archs):
    """Every kernel and both values of every feature flag were compiled (the cases above
    reach them through the launchers: this catches a launcher change that stops doing so)."""
    assert {r["kernel"] for r in results} == NORM_KERNELS | RNN_KERNELS
    fwd, fused, cols = "_norm_fwd_kernel", "_norm_bwd_fused_kernel", "_norm_bwd_cols_kernel"
    for name in ("IS_RMS", "HAS_W", "HAS_B", "HAS_RES", "LOOP"):
        assert _covered(results, fwd, name) == {False, True}, name
    for name in ("IS_RMS", "HAS_W", "HAS_DS", "PARTIAL_W", "PARTIAL_B", "PREFETCH"):
        assert _covered(results, fused, name) == {False, True}, name
    for name in ("IS_RMS", "HAS_W", "HAS_DS", "PARTIAL_W", "PARTIAL_B"):
        assert _covered(results, cols, name) == {False, True}, name
    for name in ("HAS_W", "HAS_B"):
        assert _covered(results, "_sum_partials_kernel", name) == {False, True}, name
    assert _covered(results, "_fwd_step_kernel", "MODE") == {0, 1, 2, 3}
    assert _covered(results, "_fwd_step_kernel", "PROJ") == {False, True}
    assert _covered(results, "_bwd_step_kernel", "MODE") == {0, 1, 2, 3}
    assert _covered(results, "_bwd_step_kernel", "HAS_DY") == {False, True}
    # Norm kernels see the storage dtype; the RNN gate kernels always fp32 (saved activations).
    assert {p for r in results for p in r["pointers"]} == {"*bf16", "*fp16", "*fp32"}
    assert {r["arch"] for r in results} == set(archs)


def test_kernels_compile_for_sm90_and_sm80():
    """Every norm kernel with every feature flag (RMS / LayerNorm, weight, bias, residual sum
    and its gradient, partial dweight / dbias, prefetch, long-row paths) and every RNN gate
    kernel mode for sm_90 (all flag combinations in bf16, a few in fp16 / fp32), and a smaller
    set for sm_80. About 30 s on 2 cores with an empty Triton cache."""
    cases = _norm_cases(90, ["bfloat16"], [769, 8193, 65536], [65536])  # all flags, 3 paths
    cases += _norm_cases(90, ["bfloat16"], [1, 7, 4096], [1, 37], full_flags=False)
    cases += _norm_cases(90, ["float32", "float16"], [64, 8193], [37], full_flags=False)
    cases += _norm_cases(80, ["bfloat16", "float32"], [769, 65536], [65536], full_flags=False)
    cases += _rnn_cases(90, ["float32"], [1, 33], wide=False)
    cases += _rnn_cases(80, ["float32"], [256], wide=False)
    _check_coverage(_compile(cases), [80, 90])


def test_attention_kernels_compile_for_sm90():
    """The attention forward and backward kernels with every tile candidate of the head-dim
    128 bf16 lists (the ones the H200 benchmark autotunes over), the first candidate of the
    other head dims and of fp32, and the causal / window / GQA / dropout variants."""
    cases = _attn_cases(90, "bfloat16", 128, range(5))
    cases += _attn_cases(
        90, "bfloat16", 128, [0], [(False, None, 4, 0.0), (False, (64, 0), 1, 0.1)]
    )
    for d in (64, 80, 256):
        cases += _attn_cases(90, "bfloat16", d, [0])
    cases += _attn_cases(90, "float32", 128, [0])
    results = _compile(cases)
    assert {r["kernel"] for r in results} == ATTN_KERNELS
    fwd = [r for r in results if r["kernel"] == "_fwd_kernel"]
    tiles = {(r["constexprs"]["BLOCK_M"], r["constexprs"]["BLOCK_N"], r["num_warps"]) for r in fwd}
    assert len(tiles) >= 5, tiles  # every d128 candidate compiled, not one of them five times
    for name in ("HAS_LEFT", "DROPOUT"):
        assert _covered(results, "_fwd_kernel", name) == {False, True}, name


@pytest.mark.slow
@pytest.mark.parametrize("arch", [90, 80])
def test_all_launch_configurations_compile(arch):
    """Every dtype x N x row count x feature flag combination of the norm launchers, and every
    RNN mode x hidden size x projection / direction / bias / batch / lengths variant (about
    2,800 distinct compilations, 4 min on 2 cores)."""
    cases = _norm_cases(arch, DTYPES, NORM_N, [1, 3, 37, 4099, 65536])
    cases += _rnn_cases(arch, DTYPES, RNN_HIDDEN)
    _check_coverage(_compile(cases), [arch])


if __name__ == "__main__":  # the subprocess: cases from PATH.in, results to PATH.out
    _path = Path(sys.argv[1])
    _path.with_suffix(".out").write_text(
        json.dumps(_main(json.loads(_path.with_suffix(".in").read_text())))
    )
