"""LayerNorm / RMSNorm benchmark: every available backend, torch.compile and installed peer
libraries (Liger-Kernel, NVIDIA Apex), over a rows x N sweep.

For each (op, dtype, rows x N, backend): forward, backward and forward+backward time (median),
achieved GB/s (ideal traffic: forward reads x and writes y, backward reads dy and x and writes
dx; weights and statistics are ignored) and its share of the measured copy bandwidth, peak
extra memory of one forward+backward, and the max error of y, dx and dweight against the fp64
reference on the same inputs. Inputs rotate through several copies so caches do not flatter
memory-bound kernels.

    python benchmarks/bench_norm.py                 # GPU if present, else CPU; standard sizes
    python benchmarks/bench_norm.py --device cpu --threads 2 --sizes 4096x768,1024x4096
    python benchmarks/bench_norm.py --dry-run --out /tmp/x   # tiny CPU run of every code path
    python benchmarks/bench_norm.py --host-overhead --device cpu  # per-call cost, tiny tensors

Writes ``norm.csv`` / ``norm.md`` (and ``norm.png`` with matplotlib, the ``bench`` extra)
under ``benchmarks/results/<device>/`` (``--out`` to change). Peer libraries are imported only
when installed and run only on a GPU (Liger-Kernel: ``liger_kernel.ops``' autograd functions;
Apex: ``apex.normalization.fused_layer_norm``'s ``fused_layer_norm_affine`` /
``fused_rms_norm_affine``); otherwise the table gets one row per op saying why not.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` when run as a script

import torch  # noqa: E402
from common import (  # noqa: E402
    Rotator,
    copy_bandwidth_gbs,
    parse_sizes,
    peak_memory_mb,
    set_threads,
    time_ms,
    time_stats_ms,
    write_results,
)

from turbolm.ops import layer_norm, registry, rms_norm  # noqa: E402
from turbolm.ops.norm import layer_norm_reference, rms_norm_reference  # noqa: E402

# The GPU target is fwd+bwd bf16 at 8192x4096 and up: first, so a time-boxed run
# (gpu_check.sh, --budget-s) measures it before anything else.
GPU_SIZES = "8192x4096,16384x4096,8192x1024,512x32768"
CPU_SIZES = "4096x768,1024x4096,64x65536"
EPS = {"layer_norm": 1e-5, "rms_norm": 1e-6}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


PEERS = ("liger", "apex")


def _liger_fn(op: str, eps: float):
    if op == "layer_norm":
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction

        return lambda x, w, b: LigerLayerNormFunction.apply(x, w, b, eps)
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    # Newer Liger takes (X, W, eps, offset, casting_mode, in_place, ...): ask for an
    # out-of-place backward (in place, it would overwrite dy, which the benchmark reuses).
    # Older versions take (X, W, eps[, offset]) and always work in place.
    params = inspect.signature(LigerRMSNormFunction.forward).parameters
    if "in_place" in params:
        return lambda x, w: LigerRMSNormFunction.apply(x, w, eps, 0.0, "llama", False)
    return lambda x, w: LigerRMSNormFunction.apply(x, w, eps)


def _apex_fn(op: str, n: int, eps: float):
    from apex.normalization.fused_layer_norm import fused_layer_norm_affine

    if op == "layer_norm":
        return lambda x, w, b: fused_layer_norm_affine(x, w, b, (n,), eps)
    from apex.normalization.fused_layer_norm import fused_rms_norm_affine

    return lambda x, w: fused_rms_norm_affine(x, w, (n,), eps)


def backend_fn(op: str, backend: str, n: int):
    """fn(x, weight[, bias]) -> y for one backend name."""
    eps = EPS[op]
    if backend == "compile":
        if op == "layer_norm":
            return torch.compile(lambda x, w, b: layer_norm(x, n, w, b, eps, backend="torch"))
        return torch.compile(lambda x, w: rms_norm(x, n, w, eps, backend="torch"))
    if backend == "liger":
        return _liger_fn(op, eps)
    if backend == "apex":
        return _apex_fn(op, n, eps)
    if op == "layer_norm":
        return lambda x, w, b: layer_norm(x, n, w, b, eps, backend=backend)
    return lambda x, w: rms_norm(x, n, w, eps, backend=backend)


def _import_error(*modules: str) -> str | None:
    """None if every module imports, else "not installed (...)"."""
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:  # ImportError, or a broken install failing on import
            return f"not installed ({module}: {type(exc).__name__}: {exc})".strip()
    return None


def why_not(op: str, backend: str, device: str, dtype: torch.dtype) -> str | None:
    """None if ``backend`` can run here (builds the C++ extension for cpu / cuda)."""
    if backend == "compile":
        return None
    if backend == "liger":
        reason = _import_error("liger_kernel.ops.layer_norm", "liger_kernel.ops.rms_norm")
        return reason or ("needs a CUDA GPU (Triton kernels)" if device == "cpu" else None)
    if backend == "apex":
        # apex's Python package alone is not enough: the fused kernels are the compiled
        # fused_layer_norm_cuda extension (PyPI's "apex" is an unrelated package).
        reason = _import_error("apex.normalization.fused_layer_norm", "fused_layer_norm_cuda")
        return reason or ("needs a CUDA GPU" if device == "cpu" else None)
    registered = registry.registered(op)
    if backend not in registered:
        return "not registered"
    x = torch.zeros(2, 8, device=device, dtype=dtype)
    w = torch.ones(8, device=device, dtype=dtype)
    return registered[backend].why_not(x=x, weight=w, bias=None, auto=False)


def make_inputs(op, rows, n, dtype, device):
    def make():
        x = torch.randn(rows, n, device=device, dtype=dtype, requires_grad=True)
        w = (1 + 0.1 * torch.randn(n, device=device)).to(dtype).requires_grad_()
        dy = torch.randn(rows, n, device=device, dtype=dtype)
        if op == "layer_norm":
            b = (0.1 * torch.randn(n, device=device)).to(dtype).requires_grad_()
            return x, w, b, dy
        return x, w, dy

    return make


def errors_vs_fp64(op, fn, inputs):
    """Max |backend - fp64 reference| of y, dx and dweight on the same inputs."""
    *params, dy = inputs
    n = params[0].shape[-1]
    y = fn(*params)
    dy_ref = dy.double()  # before the backward: some peers (old Liger RMSNorm) overwrite dy
    grads = torch.autograd.grad(y, params, dy.clone())
    ref_params = [p.detach().double().requires_grad_() for p in params]
    if op == "layer_norm":
        ref = layer_norm_reference(ref_params[0], (n,), *ref_params[1:], EPS[op])
    else:
        ref = rms_norm_reference(ref_params[0], (n,), ref_params[1], EPS[op])
    ref_grads = torch.autograd.grad(ref, ref_params, dy_ref)

    def err(a, b):
        return (a.double() - b).abs().max().item()

    return err(y, ref), err(grads[0], ref_grads[0]), err(grads[1], ref_grads[1])


ROW_COLUMNS = (
    "op dtype rows N backend fwd_ms bwd_ms fwd_bwd_ms fwd_bwd_min_ms fwd_GBps bwd_GBps "
    "fwd_bwd_GBps pct_of_copy fwd_kernel_ms bwd_kernel_ms fwd_bwd_kernel_ms fwd_bwd_loop_ms "
    "kernel_pct_of_copy peak_MB err_y err_dx err_dw note"
).split()


def kernel_time_ms(fn, device: str, reps: int = 20) -> float:
    """GPU time of one ``fn()`` call: the summed durations of the kernels (and memsets /
    copies) it runs, from torch.profiler, per call. Host overhead and launch gaps do not count,
    so this separates what the kernels cost from what the host path costs (``*_ms`` columns:
    CUDA events around each call, which include host gaps when the host is the bottleneck).
    NaN on CPU or when the profiler gives nothing."""
    if device == "cpu":
        return float("nan")
    try:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                fn()
            torch.cuda.synchronize()
        total_us = sum(
            e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA
        )
    except Exception as exc:  # a profiler that cannot run here: the column stays empty
        print(f"kernel time not measured: {type(exc).__name__}: {exc}", flush=True)
        return float("nan")
    return total_us / reps / 1e3 if total_us > 0 else float("nan")


def loop_time_ms(fn, device: str, reps: int = 50) -> float:
    """Per-call time of ``reps`` back-to-back calls, synchronized only at the end: the GPU time
    when the GPU is the bottleneck, the host time per call when the host is (compare with
    the kernel time). On CPU: wall clock of the loop."""
    for _ in range(3):
        fn()
    if device == "cpu":
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - start) / reps * 1e3
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) / reps


def measure(op, backend, rows, n, dtype, device, reps, ceiling):
    fn = backend_fn(op, backend, n)
    min_bytes = (64 if device == "cpu" else 256) * 2**20
    rot = Rotator(make_inputs(op, rows, n, dtype, device), min_bytes)
    for inputs in rot.sets:  # warm-up (and compile) on every copy
        fn(*inputs[:-1])
    fwd = time_ms(lambda: fn(*rot.next()[:-1]), device, reps)
    outs = [fn(*inputs[:-1]) for inputs in rot.sets]  # graphs kept for the backward timing
    order = list(range(len(rot.sets)))
    state = {"i": 0}

    def backward():
        state["i"] = (state["i"] + 1) % len(order)
        *params, dy = rot.sets[state["i"]]
        torch.autograd.grad(outs[state["i"]], params, dy, retain_graph=True)

    bwd = time_ms(backward, device, reps)
    outs.clear()  # free the kept graphs

    def fwd_bwd():
        *params, dy = rot.next()
        torch.autograd.grad(fn(*params), params, dy)

    both, both_min = time_stats_ms(fwd_bwd, device, reps)
    both_loop = loop_time_ms(fwd_bwd, device)
    peak = peak_memory_mb(fwd_bwd, device)
    err_y, err_dx, err_dw = errors_vs_fp64(op, fn, rot.sets[0])
    elt = torch.empty((), dtype=dtype).element_size()
    fwd_bytes, bwd_bytes = 2 * rows * n * elt, 3 * rows * n * elt
    gbs = [
        b / (t * 1e-3) / 1e9
        for b, t in ((fwd_bytes, fwd), (bwd_bytes, bwd), (fwd_bytes + bwd_bytes, both))
    ]
    return {
        "op": op,
        "dtype": str(dtype).replace("torch.", ""),
        "rows": rows,
        "N": n,
        "backend": backend,
        "fwd_ms": fwd,
        "bwd_ms": bwd,
        "fwd_bwd_ms": both,
        "fwd_bwd_min_ms": both_min,
        "fwd_GBps": gbs[0],
        "bwd_GBps": gbs[1],
        "fwd_bwd_GBps": gbs[2],
        "pct_of_copy": 100 * gbs[2] / ceiling,
        "fwd_kernel_ms": float("nan"),  # filled in by add_kernel_times (a later pass)
        "bwd_kernel_ms": float("nan"),
        "fwd_bwd_kernel_ms": float("nan"),
        "fwd_bwd_loop_ms": both_loop,
        "kernel_pct_of_copy": float("nan"),
        "peak_MB": peak,
        "err_y": err_y,
        "err_dx": err_dx,
        "err_dw": err_dw,
        "note": "",
    }


def add_kernel_times(row, device, ceiling) -> None:
    """Fills ``row``'s *_kernel_ms columns: the GPU time of its case's forward, backward and
    forward+backward (torch.profiler, see kernel_time_ms) on fresh inputs. Run after every
    timed measurement: a profiler session can leave the CUDA tracing hooks slowing launches,
    which would skew event timings taken after it."""
    if device == "cpu":
        return
    op, backend, rows, n = row["op"], row["backend"], row["rows"], row["N"]
    fn = backend_fn(op, backend, n)
    rot = Rotator(make_inputs(op, rows, n, DTYPES[row["dtype"]], device), 256 * 2**20)
    for inputs in rot.sets:
        fn(*inputs[:-1])
    row["fwd_kernel_ms"] = kernel_time_ms(lambda: fn(*rot.next()[:-1]), device)
    outs = [fn(*inputs[:-1]) for inputs in rot.sets]
    state = {"i": 0}

    def backward():
        state["i"] = (state["i"] + 1) % len(outs)
        *params, dy = rot.sets[state["i"]]
        torch.autograd.grad(outs[state["i"]], params, dy, retain_graph=True)

    row["bwd_kernel_ms"] = kernel_time_ms(backward, device)
    outs.clear()

    def fwd_bwd():
        *params, dy = rot.next()
        torch.autograd.grad(fn(*params), params, dy)

    both = kernel_time_ms(fwd_bwd, device)
    elt = torch.empty((), dtype=DTYPES[row["dtype"]]).element_size()
    row["fwd_bwd_kernel_ms"] = both
    row["kernel_pct_of_copy"] = 100 * 5 * rows * n * elt / (both * 1e-3) / 1e9 / ceiling


def not_run_row(op, dtype, backend, reason):
    """A table row for a backend that did not run here (e.g. a peer library not installed)."""
    nan = float("nan")
    row = dict.fromkeys(ROW_COLUMNS, nan)
    row.update(op=op, dtype=str(dtype).replace("torch.", ""), rows=None, N=None)
    row.update(backend=backend, note=f"not run: {reason}")
    return row


def plot(rows, path, ceiling=None):
    """One panel per (op, dtype): fwd+bwd GB/s of every backend over the sizes, with the
    measured copy bandwidth as a dashed line. Needs matplotlib (ImportError otherwise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["rows"] is not None]  # measured rows only
    groups = sorted({(r["op"], r["dtype"]) for r in rows})
    if not groups:
        return
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, (op, dtype) in zip(axes[0], groups):
        sel = [r for r in rows if r["op"] == op and r["dtype"] == dtype]
        sizes = sorted({(r["rows"], r["N"]) for r in sel}, key=lambda s: (s[1], s[0]))
        for backend in sorted({r["backend"] for r in sel}):
            by_size = {
                (r["rows"], r["N"]): r["fwd_bwd_GBps"] for r in sel if r["backend"] == backend
            }
            ys = [by_size.get(size, float("nan")) for size in sizes]
            ax.plot(range(len(sizes)), ys, marker="o", label=backend)
        if ceiling:
            ax.axhline(ceiling, color="gray", linestyle="--", label="copy bandwidth")
        ax.set_xticks(range(len(sizes)), [f"{r}x{n}" for r, n in sizes], rotation=30)
        ax.set_ylabel("GB/s (ideal traffic)")
        ax.set_title(f"{op} {dtype}: fwd+bwd")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ops", default="layer_norm,rms_norm")
    parser.add_argument(
        "--dtypes",
        default=None,
        help="default: bfloat16 on GPU; float32,bfloat16 on CPU",
    )
    parser.add_argument(
        "--sizes", default=None, help=f"rows x N list; default GPU {GPU_SIZES}, CPU {CPU_SIZES}"
    )
    parser.add_argument(
        "--backends",
        default=None,
        help="default: everything (torch, compile, triton, cuda / cpu, liger, apex); "
        "what cannot run here gets a 'not run' row",
    )
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)"
    )
    parser.add_argument(
        "--out", default=None, help="output folder (default benchmarks/results/<device>)"
    )
    parser.add_argument("--name", default="norm")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="stop starting new measurements after this many seconds and write what was "
        "measured (default: 30 on a GPU, so gpu_check.sh's time box still gets the files; "
        "none on CPU; 0 = no limit)",
    )
    parser.add_argument(
        "--no-kernel-time",
        action="store_true",
        help="GPU: skip the torch.profiler pass that fills the *_kernel_ms columns",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="tiny CPU run (torch, reference, peers' 'not run' rows) of every code path, "
        "including the result files and the plot; needs --out",
    )
    parser.add_argument(
        "--host-overhead",
        action="store_true",
        help="only print the per-call host cost of every backend on tiny tensors (4x64 fp32) "
        "and torch.nn.functional's, in microseconds; writes no files",
    )
    args = parser.parse_args(argv)
    if args.host_overhead:
        set_threads(args.threads or 1)
        gpu = args.device != "cpu"
        default = "torch,triton,cuda" if gpu else "torch,cpu"
        host_overhead(args.device, args.ops.split(","), (args.backends or default).split(","))
        return []
    if args.dry_run:
        if not args.out:
            parser.error("--dry-run needs --out (it must not overwrite committed results)")
        args.device, args.reps = "cpu", 3
        args.sizes = args.sizes or "64x96,33x257"
        args.dtypes = args.dtypes or "float32"
        args.backends = args.backends or "torch,reference,liger,apex"

    set_threads(args.threads)
    # The backward timing replays kept graphs (retain_graph), which compiled graphs allow only
    # without donated buffers.
    import torch._functorch.config as functorch_config

    functorch_config.donated_buffer = False
    device = args.device
    gpu = device != "cpu"
    sizes = parse_sizes(args.sizes or (GPU_SIZES if gpu else CPU_SIZES))
    dtypes = [
        DTYPES[d] for d in (args.dtypes or ("bfloat16" if gpu else "float32,bfloat16")).split(",")
    ]
    if args.backends:
        wanted = args.backends.split(",")
    else:
        # torch.compile last: its first call per shape compiles (tens of seconds).
        if gpu:
            wanted = ["torch", "triton", *PEERS, "cuda", "compile"]
        else:
            wanted = ["torch", "cpu", *PEERS, "compile"]
    ceiling = copy_bandwidth_gbs(device, 16 * 2**20 if args.dry_run else 256 * 2**20)
    print(f"copy bandwidth ceiling: {ceiling:.1f} GB/s")
    budget = args.budget_s if args.budget_s is not None else (30.0 if gpu else 0.0)
    start = time.monotonic()
    ops = args.ops.split(",")
    results, skipped, runnable, cut = [], {}, {}, []
    for op in ops:
        runnable[op] = []
        for backend in wanted:
            reason = why_not(op, backend, device, dtypes[0])
            if reason is None:
                runnable[op].append(backend)
            else:
                skipped[backend] = reason
                results += [not_run_row(op, dtype, backend, reason) for dtype in dtypes]
                print(f"{op:10s} {backend:8s} not run: {reason}", flush=True)
    # Sizes outermost, then ops: a time-boxed run covers the first sizes for every op.
    for dtype in dtypes:
        for rows, n in sizes:
            for op in ops:
                for backend in runnable[op]:
                    if budget and time.monotonic() - start > budget:
                        cut.append(f"{op} {str(dtype)[6:]} {rows}x{n} {backend}")
                        continue
                    row = measure(op, backend, rows, n, dtype, device, args.reps, ceiling)
                    results.append(row)
                    print(
                        f"{op:10s} {row['dtype']:8s} {rows:6d}x{n:<6d} {backend:8s} "
                        f"fwd {row['fwd_ms']:8.3f} ms  bwd {row['bwd_ms']:8.3f} ms  "
                        f"fwd+bwd {row['fwd_bwd_ms']:8.3f} ms  {row['fwd_bwd_GBps']:7.1f} GB/s  "
                        f"err y {row['err_y']:.2g} dx {row['err_dx']:.2g} dw {row['err_dw']:.2g}",
                        flush=True,
                    )
    measured = [r for r in results if r["rows"] is not None]
    if gpu and not args.no_kernel_time:  # after all event timings (see add_kernel_times)
        for row in measured:
            add_kernel_times(row, device, ceiling)
            print(
                f"{row['op']:10s} {row['dtype']:8s} {row['rows']:6d}x{row['N']:<6d} "
                f"{row['backend']:8s} GPU kernel time: fwd {row['fwd_kernel_ms']:8.3f} ms  "
                f"bwd {row['bwd_kernel_ms']:8.3f} ms  fwd+bwd {row['fwd_bwd_kernel_ms']:8.3f} ms "
                f"({row['kernel_pct_of_copy']:.1f}% of copy); back-to-back fwd+bwd "
                f"{row['fwd_bwd_loop_ms']:8.3f} ms",
                flush=True,
            )
    notes = [
        f"Measured copy bandwidth (ceiling): {ceiling:.1f} GB/s; pct_of_copy is fwd+bwd GB/s over it.",
        "Times are medians (fwd_bwd_min_ms: the minimum); GB/s counts ideal traffic "
        "(fwd: x + y; bwd: dy + x + dx).",
        "*_kernel_ms: GPU time per call, the summed durations of the kernels it runs "
        "(torch.profiler; host gaps excluded); kernel_pct_of_copy: fwd+bwd GB/s at that time "
        "over the copy bandwidth. fwd_bwd_loop_ms: per call over back-to-back calls synced "
        "at the end (host-bound when it exceeds fwd_bwd_kernel_ms).",
        "err_*: max |result - fp64 reference| on the same inputs (y, dx, dweight).",
        "peak_MB: one fwd+bwd; GPU: peak extra allocation; CPU: total allocated (an upper "
        "bound of the peak: the CPU allocator keeps no peak statistics).",
    ]
    if not gpu:
        notes.append("CPU numbers from a shared machine are noisy: compare fwd_bwd_min_ms as well.")
    notes += ratio_notes(measured)
    notes += [f"Not run: {b} ({r})" for b, r in skipped.items()]
    if cut:
        notes.append(
            f"Time budget ({budget:.0f} s, --budget-s) reached; not measured: " + "; ".join(cut)
        )
    folder = write_results(
        results,
        device,
        args.name,
        "LayerNorm / RMSNorm kernels",
        notes,
        args.out,
        functools.partial(plot, ceiling=ceiling),
        argv=None if argv is None else ["benchmarks/bench_norm.py", *argv],
    )
    png = folder / f"{args.name}.png"
    print(
        f"wrote {folder}/{args.name}.csv and .md"
        + (" and .png" if png.exists() else " (no .png: matplotlib not installed)")
    )
    winners = {}
    for r in measured:
        key = (r["op"], r["dtype"], r["rows"], r["N"])
        if key not in winners or r["fwd_bwd_ms"] < winners[key]["fwd_bwd_ms"]:
            winners[key] = r
    print("fastest fwd+bwd per case:")
    for key, r in winners.items():
        print(
            f"  {key[0]:10s} {key[1]:8s} {key[2]}x{key[3]}: {r['backend']} ({r['fwd_bwd_ms']:.3f} ms)"
        )
    return results


def _overhead_fn(op: str, backend: str, n: int, eps: float = 1e-5):
    """fn(x, weight[, bias]) for the host-overhead table; ``F``: torch.nn.functional."""
    if backend == "F":
        if op == "layer_norm":
            return lambda x, w, b: torch.nn.functional.layer_norm(x, (n,), w, b, eps)
        return lambda x, w: torch.nn.functional.rms_norm(x, (n,), w, eps)
    if op == "layer_norm":
        return lambda x, w, b: layer_norm(x, n, w, b, eps, backend=backend)
    return lambda x, w: rms_norm(x, n, w, eps, backend=backend)


def host_overhead(device: str, ops, backends, rows: int = 4, n: int = 64) -> list[dict]:
    """Per-call cost in microseconds of each backend on tiny fp32 tensors (rows x n), where the
    kernels take no time: what the op layer, the autograd.Function and the launches cost on
    the host. ``F`` is torch.nn.functional called directly (the floor to compare with).
    CPU: thread CPU time (robust on a busy machine); GPU: wall time, synchronized per loop.
    Cases: forward without autograd, forward recording the graph, forward + autograd.grad."""
    gpu = device != "cpu"
    clock = time.perf_counter if gpu else time.thread_time

    def per_call_us(fn, calls=2000, rounds=7):
        for _ in range(200):
            fn()
        best = float("inf")
        for _ in range(rounds):
            if gpu:
                torch.cuda.synchronize()
            start = clock()
            for _ in range(calls):
                fn()
            if gpu:
                torch.cuda.synchronize()
            best = min(best, (clock() - start) / calls * 1e6)
        return best

    x = torch.randn(rows, n, device=device, requires_grad=True)
    w = torch.randn(n, device=device, requires_grad=True)
    b = torch.randn(n, device=device, requires_grad=True)
    dy = torch.randn(rows, n, device=device)
    results = []
    for op in ops:
        params = (x, w, b) if op == "layer_norm" else (x, w)
        plain = tuple(p.detach() for p in params)
        for backend in ["F", *backends]:
            if backend != "F":
                reason = why_not(op, backend, device, torch.float32)
                if reason is not None:
                    print(f"{op:10s} {backend:8s} not run: {reason}", flush=True)
                    continue
            fn = _overhead_fn(op, backend, n)
            row = {
                "op": op,
                "backend": backend,
                "fwd_nograd_us": per_call_us(functools.partial(fn, *plain)),
                "fwd_us": per_call_us(functools.partial(fn, *params)),
                "fwd_bwd_us": per_call_us(
                    lambda fn=fn, params=params: torch.autograd.grad(fn(*params), params, dy)
                ),
            }
            results.append(row)
            print(
                f"{op:10s} {backend:8s} {rows}x{n} fp32: fwd (no grad) {row['fwd_nograd_us']:7.1f} us"
                f"  fwd {row['fwd_us']:7.1f} us  fwd+bwd {row['fwd_bwd_us']:7.1f} us",
                flush=True,
            )
    return results


def ratio_notes(rows) -> list[str]:
    """The issue's targets as ratios: each kernel backend's fwd+bwd speed over torch eager
    (median and min times) and, where Liger ran, over Liger."""
    by_key = {(r["op"], r["dtype"], r["rows"], r["N"], r["backend"]): r for r in rows}
    notes = []
    for (op, dtype, rows_, n, backend), r in by_key.items():
        if backend not in ("cpu", "cuda", "triton"):
            continue
        parts = []
        for base in ("torch", "liger", "apex"):
            other = by_key.get((op, dtype, rows_, n, base))
            if other is not None:
                parts.append(
                    f"x{other['fwd_bwd_ms'] / r['fwd_bwd_ms']:.2f} vs {base} "
                    f"(min times: x{other['fwd_bwd_min_ms'] / r['fwd_bwd_min_ms']:.2f})"
                )
        if parts:
            notes.append(
                f"fwd+bwd speed-up of {backend}, {op} {dtype} {rows_}x{n}: " + ", ".join(parts)
            )
    return notes


if __name__ == "__main__":
    main()
    sys.exit(0)
