"""LayerNorm / RMSNorm benchmark: every available backend, torch.compile and installed peer
libraries (Liger-Kernel), over a rows x N sweep.

For each (op, dtype, rows x N, backend): forward, backward and forward+backward time (median),
achieved GB/s (ideal traffic: forward reads x and writes y, backward reads dy and x and writes
dx; weights and statistics are ignored) and its share of the measured copy bandwidth, peak
extra memory of one forward+backward, and the max error of y, dx and dweight against the fp64
reference on the same inputs. Inputs rotate through several copies so caches do not flatter
memory-bound kernels.

    python benchmarks/bench_norm.py                 # GPU if present, else CPU; standard sizes
    python benchmarks/bench_norm.py --device cpu --threads 2 --sizes 4096x768,1024x4096

Writes ``norm.csv`` / ``norm.md`` (and ``norm.png`` with matplotlib) under
``benchmarks/results/<device>/`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
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

GPU_SIZES = "8192x1024,4096x4096,512x32768"  # fits gpu_check.sh's 150 s; --sizes for more
CPU_SIZES = "4096x768,1024x4096,64x65536"
EPS = {"layer_norm": 1e-5, "rms_norm": 1e-6}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def backend_fn(op: str, backend: str, n: int):
    """fn(x, weight[, bias]) -> y for one backend name."""
    eps = EPS[op]
    if backend == "compile":
        if op == "layer_norm":
            return torch.compile(lambda x, w, b: layer_norm(x, n, w, b, eps, backend="torch"))
        return torch.compile(lambda x, w: rms_norm(x, n, w, eps, backend="torch"))
    if backend == "liger":
        if op == "layer_norm":
            from liger_kernel.ops.layer_norm import LigerLayerNormFunction

            return lambda x, w, b: LigerLayerNormFunction.apply(x, w, b, eps)
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        return lambda x, w: LigerRMSNormFunction.apply(x, w, eps)
    if op == "layer_norm":
        return lambda x, w, b: layer_norm(x, n, w, b, eps, backend=backend)
    return lambda x, w: rms_norm(x, n, w, eps, backend=backend)


def why_not(op: str, backend: str, device: str, dtype: torch.dtype) -> str | None:
    """None if ``backend`` can run here (builds the C++ extension for cpu / cuda)."""
    if backend == "compile":
        return None
    if backend == "liger":
        return None if device != "cpu" and _has("liger_kernel") else "liger_kernel not usable"
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
    grads = torch.autograd.grad(y, params, dy)
    ref_params = [p.detach().double().requires_grad_() for p in params]
    if op == "layer_norm":
        ref = layer_norm_reference(ref_params[0], (n,), *ref_params[1:], EPS[op])
    else:
        ref = rms_norm_reference(ref_params[0], (n,), ref_params[1], EPS[op])
    ref_grads = torch.autograd.grad(ref, ref_params, dy.double())

    def err(a, b):
        return (a.double() - b).abs().max().item()

    return err(y, ref), err(grads[0], ref_grads[0]), err(grads[1], ref_grads[1])


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
        "peak_MB": peak,
        "err_y": err_y,
        "err_dx": err_dx,
        "err_dw": err_dw,
    }


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["op"], r["dtype"]) for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, (op, dtype) in zip(axes[0], groups):
        sel = [r for r in rows if r["op"] == op and r["dtype"] == dtype]
        sizes = sorted({(r["rows"], r["N"]) for r in sel}, key=lambda s: s[1])
        for backend in sorted({r["backend"] for r in sel}):
            ys = [
                next(
                    (
                        r["fwd_bwd_GBps"]
                        for r in sel
                        if r["backend"] == backend and (r["rows"], r["N"]) == s
                    ),
                    float("nan"),
                )
                for s in sizes
            ]
            ax.plot(range(len(sizes)), ys, marker="o", label=backend)
        ax.set_xticks(range(len(sizes)), [f"{r}x{n}" for r, n in sizes], rotation=30)
        ax.set_title(f"{op} {dtype}: fwd+bwd GB/s")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
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
        help="default: everything available (torch, compile, triton, cuda, cpu, liger)",
    )
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)"
    )
    parser.add_argument(
        "--out", default=None, help="output folder (default benchmarks/results/<device>)"
    )
    parser.add_argument("--name", default="norm")
    args = parser.parse_args(argv)

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
    wanted = (
        args.backends.split(",")
        if args.backends
        else (
            ["torch", "compile", "triton", "cuda", "liger"] if gpu else ["torch", "compile", "cpu"]
        )
    )
    ceiling = copy_bandwidth_gbs(device)
    print(f"copy bandwidth ceiling: {ceiling:.1f} GB/s")
    results, skipped = [], {}
    for op in args.ops.split(","):
        backends = []
        for backend in wanted:
            reason = why_not(op, backend, device, dtypes[0])
            if reason is None:
                backends.append(backend)
            else:
                skipped[backend] = reason
        for dtype in dtypes:
            for rows, n in sizes:
                for backend in backends:
                    row = measure(op, backend, rows, n, dtype, device, args.reps, ceiling)
                    results.append(row)
                    print(
                        f"{op:10s} {row['dtype']:8s} {rows:6d}x{n:<6d} {backend:8s} "
                        f"fwd {row['fwd_ms']:8.3f} ms  bwd {row['bwd_ms']:8.3f} ms  "
                        f"fwd+bwd {row['fwd_bwd_ms']:8.3f} ms  {row['fwd_bwd_GBps']:7.1f} GB/s  "
                        f"err y {row['err_y']:.2g} dx {row['err_dx']:.2g} dw {row['err_dw']:.2g}",
                        flush=True,
                    )
    notes = [
        f"Measured copy bandwidth (ceiling): {ceiling:.1f} GB/s; pct_of_copy is fwd+bwd GB/s over it.",
        "Times are medians (fwd_bwd_min_ms: the minimum); GB/s counts ideal traffic "
        "(fwd: x + y; bwd: dy + x + dx).",
        "err_*: max |result - fp64 reference| on the same inputs (y, dx, dweight).",
        "peak_MB: one fwd+bwd; GPU: peak extra allocation; CPU: total allocated (an upper "
        "bound of the peak: the CPU allocator keeps no peak statistics).",
    ]
    if not gpu:
        notes.append("CPU numbers from a shared machine are noisy: compare fwd_bwd_min_ms as well.")
    notes += [f"Not run: {b} ({r})" for b, r in skipped.items()]
    folder = write_results(
        results, device, args.name, "LayerNorm / RMSNorm kernels", notes, args.out, plot
    )
    print(f"wrote {folder}/{args.name}.csv and .md")
    winners = {}
    for r in results:
        key = (r["op"], r["dtype"], r["rows"], r["N"])
        if key not in winners or r["fwd_bwd_ms"] < winners[key]["fwd_bwd_ms"]:
            winners[key] = r
    print("fastest fwd+bwd per case:")
    for key, r in winners.items():
        print(
            f"  {key[0]:10s} {key[1]:8s} {key[2]}x{key[3]}: {r['backend']} ({r['fwd_bwd_ms']:.3f} ms)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
