"""Attention benchmark: turbolm's Triton kernels against PyTorch SDPA (per backend), flash-attn
(if installed) and torch.compile.

For every (provider, mode, head dim, causal, sequence length) it measures in one run: the
median time, TFLOP/s, peak memory, and the max error against an fp64 reference (the output on
one (batch, head) slice; dQ/dK/dV too up to ``--grad-check-max-seq``). Results go to
``<out>/attention.csv`` and ``attention.md`` (plus ``attention.png`` if matplotlib exists),
``<out>`` defaulting to ``benchmarks/results/<device>/``.

FLOPs count only the work on visible (unmasked) query-key pairs: 4 * B * H * D * pairs for the
forward (two matmuls), 2.5x that for the backward (five matmuls), so causal FLOPs are about
half of the full ones. Shapes follow the FlashAttention benchmarks: batch * seqlen = 16k
tokens, heads * head_dim = 2048.

    python benchmarks/bench_attention.py                      # GPU: the standard sizes
    python benchmarks/bench_attention.py --seqlens 1024,4096 --head-dims 128 --causal 1
    python benchmarks/bench_attention.py --dry-run            # tiny CPU run of every code path

``--dry-run`` runs tiny shapes on CPU through the op's torch and reference backends, SDPA's
math backend (and turbolm's Triton kernels when TRITON_INTERPRET=1) so CI can smoke-test this
script; its numbers mean nothing. ``--budget-s`` (default 100, 0 = no limit) stops starting
new measurements once the budget is spent (so the run fits ``benchmarks/gpu_check.sh``'s step;
rows are written to the CSV as they finish); use ``--budget-s 0`` for the full sweep.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from turbolm.ops import attention  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")
GPU_PROVIDERS = (
    "turbolm_triton",
    *(f"sdpa_{b}" for b in SDPA_BACKENDS),
    "flash_attn",
    "torch_compile",
)
FIELDS = [
    "provider", "mode", "dtype", "batch", "heads", "seqlen", "head_dim", "causal",
    "time_ms", "tflops", "peak_mem_mib", "err_out", "err_dq", "err_dk", "err_dv",
    "status", "config",
]  # fmt: skip


# ---- FLOPs ----------------------------------------------------------------------------------


def visible_pairs(tq: int, tk: int, causal: bool) -> int:
    """Query-key pairs that are not masked (causal bottom-right aligned, as turbolm)."""
    if not causal:
        return tq * tk
    # query i sees min(max(i + tk - tq + 1, 0), tk) keys
    return sum(min(max(i + tk - tq + 1, 0), tk) for i in range(tq))


def attention_flops(batch, heads, tq, tk, d, causal, mode) -> float:
    fwd = 4.0 * batch * heads * d * visible_pairs(tq, tk, causal)
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd_bwd": 3.5 * fwd}[mode]


# ---- timing / memory ------------------------------------------------------------------------


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, rep: int, grads=()):
    """Median milliseconds of ``fn``; ``grads``: tensors whose .grad is reset between runs."""

    def run():
        for t in grads:
            t.grad = None
        fn()

    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            return do_bench(run, warmup=warmup, rep=rep, return_mode="median")
        except ImportError:
            pass
        for _ in range(3):
            run()
        times = []
        for _ in range(max(rep // 5, 5)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    for _ in range(warmup):
        run()
    times = []
    for _ in range(rep):
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@contextlib.contextmanager
def peak_memory(device: torch.device, result: dict):
    """result["mib"] = peak memory allocated above what was live on entry (CUDA only)."""
    if device.type != "cuda":
        result["mib"] = float("nan")
        yield
        return
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    yield
    torch.cuda.synchronize(device)
    result["mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20


# ---- fp64 reference on one (batch, head) slice ----------------------------------------------


def reference_head(q, k, v, causal, chunk=1024):
    """fp64 attention of one head: q (Tq, D), k/v (Tk, D); queries in chunks (bounded memory)."""
    tq, tk = q.shape[0], k.shape[0]
    scale = 1.0 / math.sqrt(q.shape[-1])
    outs = []
    for s in range(0, tq, chunk):
        scores = (q[s : s + chunk] @ k.T) * scale
        if causal:
            rows = torch.arange(s, min(s + chunk, tq), device=q.device)[:, None] + (tk - tq)
            cols = torch.arange(tk, device=q.device)[None, :]
            scores = scores.masked_fill(cols > rows, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        outs.append(probs @ v)
    return torch.cat(outs)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


# ---- providers ------------------------------------------------------------------------------


@dataclass
class Provider:
    """``make(q, k, v, causal)`` (bhsd inputs) -> (inputs, fn(*inputs) -> out, to_bhsd)."""

    name: str
    why_not: Callable[[torch.device, torch.dtype, int], str | None]
    make: Callable


def _sdpa_provider(backend_name: str) -> Provider:
    def why_not(device, dtype, d):
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: F401
        except ImportError:
            return "torch.nn.attention.sdpa_kernel is not available"
        if device.type != "cuda" and backend_name != "math":
            return f"SDPA {backend_name} needs CUDA"
        return None

    def make(q, k, v, causal):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kind = {
            "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION,
            "math": SDPBackend.MATH,
        }[backend_name]

        def fn(q, k, v):
            with sdpa_kernel(kind):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        return (q, k, v), fn, lambda out: out

    return Provider(f"sdpa_{backend_name}", why_not, make)


def _turbolm_provider(backend: str) -> Provider:
    def why_not(device, dtype, d):
        if backend == "triton":
            if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
                return "needs CUDA (or TRITON_INTERPRET=1 on CPU)"
            try:
                import triton  # noqa: F401
            except ImportError:
                return "triton is not installed"
        return None

    def make(q, k, v, causal):
        def fn(q, k, v):
            return attention(q, k, v, causal=causal, backend=backend)

        return (q, k, v), fn, lambda out: out

    return Provider(f"turbolm_{backend}", why_not, make)


def _triton_tma_provider() -> Provider:
    """turbolm's Triton kernels reading their streamed tiles through tensor descriptors."""
    plain = _turbolm_provider("triton")

    def why_not(device, dtype, d):
        reason = plain.why_not(device, dtype, d)
        if reason is None and device.type == "cuda" and torch.cuda.get_device_capability()[0] < 9:
            return "tensor descriptors need sm_90 or newer"
        return reason

    def make(q, k, v, causal):
        from turbolm.kernels import attention as kernels

        def fn(q, k, v):
            old, kernels.TMA = kernels.TMA, True
            try:
                return attention(q, k, v, causal=causal, backend="triton")
            finally:
                kernels.TMA = old

        return (q, k, v), fn, lambda out: out

    return Provider("turbolm_triton_tma", why_not, make)


def _flash_attn_provider() -> Provider:
    def why_not(device, dtype, d):
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            return "flash-attn is not installed"
        if device.type != "cuda" or dtype == torch.float32:
            return "flash-attn needs CUDA and fp16/bf16"
        return None

    def make(q, k, v, causal):
        from flash_attn import flash_attn_func

        inputs = tuple(t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))

        def fn(q, k, v):  # (B, T, H, D)
            return flash_attn_func(q, k, v, causal=causal)

        return inputs, fn, lambda out: out.transpose(1, 2)

    return Provider("flash_attn", why_not, make)


def _naive_attention(q, k, v, causal: bool):
    """Plain softmax(QK^T)V in the input dtype: what torch.compile gets to optimize."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = (q @ k.transpose(-2, -1)) * scale
    if causal:
        tq, tk = q.shape[-2], k.shape[-2]
        keep = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
        scores = scores.masked_fill(~keep, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


_COMPILED: dict = {}


def _compile_provider() -> Provider:
    def why_not(device, dtype, d):
        return None if hasattr(torch, "compile") else "torch.compile is not available"

    def make(q, k, v, causal):
        if causal not in _COMPILED:
            # The "bwd" timing replays one graph's backward (retain_graph=True), which a
            # compiled backward refuses while it donates its saved buffers.
            import torch._functorch.config as functorch_config

            if hasattr(functorch_config, "donated_buffer"):
                functorch_config.donated_buffer = False
            _COMPILED[causal] = torch.compile(lambda q, k, v: _naive_attention(q, k, v, causal))
        return (q, k, v), _COMPILED[causal], lambda out: out

    return Provider("torch_compile", why_not, make)


def all_providers() -> dict[str, Provider]:
    providers = [
        _turbolm_provider("triton"),
        _triton_tma_provider(),
        _turbolm_provider("torch"),
        _turbolm_provider("reference"),
        *(_sdpa_provider(b) for b in SDPA_BACKENDS),
        _flash_attn_provider(),
        _compile_provider(),
    ]
    return {p.name: p for p in providers}


def _triton_configs() -> str:
    """Tile configs the autotuner picked (for the most recent turbolm_triton call)."""
    module = sys.modules.get("turbolm.kernels.attention")
    if module is None:
        return ""
    picked = []
    for (kind, block_d, fp32), tuner in getattr(module, "_TUNED", {}).items():
        best = getattr(tuner, "best_config", None)
        if best is not None:
            kw = best.kwargs
            picked.append(
                f"{kind}/d{block_d}{'/fp32' if fp32 else ''}:"
                f"{kw.get('BLOCK_M')}x{kw.get('BLOCK_N')}w{best.num_warps}s{best.num_stages}"
            )
    return " ".join(picked)


# ---- one measurement ------------------------------------------------------------------------


def measure(provider, mode, batch, heads, seqlen, d, causal, dtype, device, args) -> dict:
    row = {
        "provider": provider.name, "mode": mode, "dtype": str(dtype).replace("torch.", ""),
        "batch": batch, "heads": heads, "seqlen": seqlen, "head_dim": d, "causal": causal,
        "time_ms": float("nan"), "tflops": float("nan"), "peak_mem_mib": float("nan"),
        "err_out": float("nan"), "err_dq": float("nan"), "err_dk": float("nan"),
        "err_dv": float("nan"), "status": "ok", "config": "",
    }  # fmt: skip
    gen = torch.Generator(device="cpu").manual_seed(0)
    shape = (batch, heads, seqlen, d)
    q, k, v = (torch.randn(shape, generator=gen).to(device, dtype) for _ in range(3))
    try:
        inputs, fn, to_bhsd = provider.make(q, k, v, causal)
        need_grad = mode != "fwd"
        inputs = tuple(t.detach().requires_grad_(need_grad) for t in inputs)
        out = fn(*inputs)  # warm-up / compile / autotune
        grad = torch.randn(out.shape, generator=gen).to(device, dtype)
        grads = ()
        if need_grad:
            grads = torch.autograd.grad(out, inputs, grad)
        # accuracy on (batch 0, head 0)
        out_b = to_bhsd(out.detach())
        q0, k0, v0 = (t[0, 0].double().requires_grad_() for t in (q, k, v))
        check_grads = need_grad and seqlen <= args.grad_check_max_seq
        with torch.enable_grad() if check_grads else torch.no_grad():
            ref = reference_head(q0, k0, v0, causal)
        row["err_out"] = max_err(out_b[0, 0], ref)
        if check_grads:
            ref_grads = torch.autograd.grad(ref, (q0, k0, v0), to_bhsd(grad)[0, 0].double())
            for name, g, r in zip(("err_dq", "err_dk", "err_dv"), grads, ref_grads):
                row[name] = max_err(to_bhsd(g)[0, 0], r)
        del ref, out_b

        if mode == "fwd":

            def step():
                with torch.no_grad():
                    fn(*inputs)

            run_grads = ()
        else:
            out = fn(*inputs)

            def step():
                if mode == "bwd":
                    out.backward(grad, retain_graph=True)
                else:
                    fn(*inputs).backward(grad)

            run_grads = inputs
        mem = {}
        with peak_memory(device, mem):
            step()
        row["peak_mem_mib"] = mem["mib"]
        row["time_ms"] = time_ms(step, device, args.warmup, args.rep, run_grads)
        flops = attention_flops(batch, heads, seqlen, seqlen, d, causal, mode)
        row["tflops"] = flops / (row["time_ms"] * 1e-3) / 1e12
        if provider.name.startswith("turbolm_triton"):
            row["config"] = _triton_configs()
    except torch.cuda.OutOfMemoryError:
        row["status"] = "oom"
    except Exception as exc:  # one failing provider must not stop the sweep
        row["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


# ---- output ---------------------------------------------------------------------------------


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    for known in ("h200", "h100", "a100", "l40s", "a10g", "l4", "b200"):
        if known in name:
            return known
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "cuda"


def _fmt(value, digits=3):
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.{digits}g}"
    return str(value)


def write_markdown(rows: list[dict], path: Path, header: str) -> None:
    cols = ["mode", "head_dim", "causal", "seqlen", "provider", "time_ms", "tflops",
            "peak_mem_mib", "err_out", "err_dq", "status"]  # fmt: skip
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    order = sorted(
        rows, key=lambda r: (r["mode"], r["head_dim"], r["causal"], r["seqlen"], r["provider"])
    )
    for r in order:
        lines.append("| " + " | ".join(_fmt(r[c]) for c in cols) + " |")
    path.write_text("\n".join(lines) + "\n")


def write_plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    panels = sorted({(r["mode"], r["head_dim"], r["causal"]) for r in rows})
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5), squeeze=False)
    for ax, (mode, d, causal) in zip(axes[0], panels):
        for name in sorted({r["provider"] for r in rows}):
            pts = [
                (r["seqlen"], r["tflops"])
                for r in rows
                if (r["mode"], r["head_dim"], r["causal"], r["provider"]) == (mode, d, causal, name)
                and r["status"] == "ok"
            ]
            if pts:
                ax.plot(*zip(*sorted(pts)), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{mode} d={d} causal={causal}", fontsize=9)
        ax.set_xlabel("seqlen")
        ax.set_ylabel("TFLOP/s")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- main -----------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="output folder")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--seqlens", default="512,1024,2048,4096,8192,16384")
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--causal", default="0,1", help="comma list of 0/1")
    p.add_argument("--modes", default="fwd,bwd", help="fwd, bwd, fwd_bwd")
    p.add_argument(
        "--providers", default=None, help=f"comma list (default: {','.join(GPU_PROVIDERS)})"
    )
    p.add_argument("--total-tokens", type=int, default=16384, help="batch = total_tokens // seqlen")
    p.add_argument("--model-dim", type=int, default=2048, help="heads = model_dim // head_dim")
    p.add_argument("--warmup", type=int, default=25, help="ms on GPU (do_bench), runs on CPU")
    p.add_argument("--rep", type=int, default=100, help="ms on GPU (do_bench), runs on CPU")
    p.add_argument("--grad-check-max-seq", type=int, default=4096)
    p.add_argument(
        "--budget-s",
        type=float,
        default=100.0,
        help="stop starting new measurements after this many seconds (0: no limit); the "
        "default fits benchmarks/gpu_check.sh's 150 s step",
    )
    p.add_argument("--dry-run", action="store_true", help="tiny CPU run of every code path")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.dry_run:
        device = torch.device(args.device or "cpu")
        dtype = torch.float32
        seqlens, head_dims = [32, 48], [16]
        args.total_tokens, args.model_dim = 64, 32
        args.warmup, args.rep = 1, 2
        default = ["turbolm_torch", "turbolm_reference", "sdpa_math"]
        if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
            default.insert(0, "turbolm_triton")
    else:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = DTYPES[args.dtype]
        seqlens = [int(s) for s in args.seqlens.split(",")]
        head_dims = [int(d) for d in args.head_dims.split(",")]
        default = list(GPU_PROVIDERS)
    names = args.providers.split(",") if args.providers else default
    causals = [bool(int(c)) for c in args.causal.split(",")]
    modes = args.modes.split(",")
    registry = all_providers()
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise SystemExit(f"unknown providers {unknown}; known: {sorted(registry)}")
    out_dir = args.out
    if out_dir is None:
        if args.dry_run:
            out_dir = Path(tempfile.mkdtemp(prefix="bench_attention_dry_"))
        else:
            out_dir = ROOT / "benchmarks" / "results" / device_slug(device)
    out_dir.mkdir(parents=True, exist_ok=True)

    providers, notes = [], []
    for name in names:
        reason = registry[name].why_not(device, dtype, max(head_dims))
        if reason is None:
            providers.append(registry[name])
        else:
            notes.append(f"- {name}: skipped ({reason})")
            print(f"skip {name}: {reason}", flush=True)

    csv_path = out_dir / "attention.csv"
    rows: list[dict] = []
    start = time.perf_counter()
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        # Short sequences of every panel first: a budget cut drops the longest ones.
        for seqlen in seqlens:
            for d in head_dims:
                for causal in causals:
                    for mode in modes:
                        for provider in providers:
                            if args.budget_s and time.perf_counter() - start > args.budget_s:
                                notes.append(
                                    f"- budget of {args.budget_s:g}s spent: sweep cut short"
                                )
                                break
                            batch = max(1, args.total_tokens // seqlen)
                            heads = max(1, args.model_dim // d)
                            row = measure(
                                provider, mode, batch, heads, seqlen, d, causal, dtype, device, args
                            )
                            rows.append(row)
                            writer.writerow(row)
                            f.flush()
                            print(
                                f"{mode:7s} d={d:<3d} causal={causal!s:5s} T={seqlen:<6d} "
                                f"{provider.name:18s} {_fmt(row['time_ms'])} ms "
                                f"{_fmt(row['tflops'])} TFLOP/s mem {_fmt(row['peak_mem_mib'])} MiB "
                                f"err {_fmt(row['err_out'])} {row['status']}",
                                flush=True,
                            )
    notes = list(dict.fromkeys(notes))
    header = [
        f"# Attention benchmark ({device_slug(device)}, {str(dtype).replace('torch.', '')})",
        "",
        f"Command: `python benchmarks/bench_attention.py {' '.join(argv or sys.argv[1:])}` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {_versions(device)}.",
        "batch = total_tokens // seqlen, heads = model_dim // head_dim; TFLOP/s count visible "
        "pairs only (causal ~ half); time = median ms; peak_mem_mib = peak allocation above the "
        "inputs during one step; err_* = max |x - fp64 reference| on (batch 0, head 0).",
    ]
    if args.dry_run:
        header.append("DRY RUN: tiny CPU shapes, the numbers mean nothing.")
    if notes:
        header += ["", *notes]
    write_markdown(rows, out_dir / "attention.md", "\n".join(header))
    write_plot(rows, out_dir / "attention.png")
    print(f"wrote {csv_path} and {out_dir / 'attention.md'}", flush=True)
    return rows


def _versions(device: torch.device) -> str:
    parts = [f"torch {torch.__version__}"]
    try:
        import triton

        parts.append(f"triton {triton.__version__}")
    except ImportError:
        pass
    if device.type == "cuda":
        parts.append(torch.cuda.get_device_name(device))
    return ", ".join(parts)


if __name__ == "__main__":
    main()
