"""Fused linear + cross-entropy (``turbolm.ops.linear_cross_entropy``): time and memory of the LM
head + loss, forward + backward, against PyTorch and Liger-Kernel.

Providers: ``torch`` (F.linear + F.cross_entropy in fp32, what a model does without fusion),
``torch_compile`` (the same under torch.compile), ``turbolm_cpu`` / ``turbolm_triton`` (the
chunked op with the C++ / Triton step), ``liger`` (``LigerFusedLinearCrossEntropyLoss``, GPU
only, when installed: ``pip install liger-kernel`` or its wheel in ``wheels/``).

Columns: ``fwd_bwd_ms`` (median and min), ``peak_MB`` (GPU: the allocator's peak extra
allocation of one forward + backward; CPU: the profiler's total allocation, an upper bound),
``err_loss`` / ``err_dx`` / ``err_dw`` (max abs error against the torch provider in fp32).

    python benchmarks/bench_cross_entropy.py                  # CPU -> results/cpu/
    python benchmarks/bench_cross_entropy.py --device cuda    # GPU preset (Llama-3 vocab)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import peak_memory_mb, set_threads, time_stats_ms, write_results  # noqa: E402

from turbolm.ops.cross_entropy import linear_cross_entropy  # noqa: E402

# (tokens, hidden, vocab)
PRESETS = {
    "cpu": [(1024, 256, 8192), (2048, 512, 16384)],
    "gpu": [(4096, 4096, 128256), (8192, 4096, 128256), (8192, 2048, 32000)],
    "tiny": [(64, 16, 300)],
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _torch_loss(x, w, t):
    return F.cross_entropy(F.linear(x, w).float(), t)


def provider_fn(name: str):
    """loss(x, weight, targets) for a provider, or None when it cannot run here."""
    if name == "torch":
        return _torch_loss
    if name == "torch_compile":
        return torch.compile(_torch_loss)
    if name in ("turbolm_cpu", "turbolm_triton"):
        backend = name.removeprefix("turbolm_")
        return lambda x, w, t: linear_cross_entropy(x, w, t, backend=backend)
    if name == "liger":
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except ImportError:
            return None
        loss_fn = LigerFusedLinearCrossEntropyLoss()

        def liger(x, w, t):
            out = loss_fn(w, x, t)
            return out[0] if isinstance(out, tuple) else out

        return liger
    raise ValueError(f"unknown provider {name!r}")


def measure(n, c, v, dtype, device, providers, reps):
    gen = torch.Generator(device="cpu").manual_seed(0)
    x0 = torch.randn(n, c, generator=gen).to(device, dtype)
    w0 = (torch.randn(v, c, generator=gen) / c**0.5).to(device, dtype)
    t = torch.randint(0, v, (n,), generator=gen).to(device)
    t[::10] = -100  # some ignored positions, as padding would give
    x = x0.clone().requires_grad_()
    w = w0.clone().requires_grad_()

    def run(fn):
        loss = fn(x, w, t)
        gx, gw = torch.autograd.grad(loss, (x, w))
        return loss.detach().float(), gx.float(), gw.float()

    reference = run(_torch_loss)
    rows = []
    for name in providers:
        fn = provider_fn(name)
        row = {"tokens": n, "hidden": c, "vocab": v, "dtype": str(dtype).replace("torch.", ""),
               "provider": name}  # fmt: skip
        try:
            if fn is None:
                raise RuntimeError("not installed")
            got = run(fn)
            med, low = time_stats_ms(lambda fn=fn: run(fn), device, reps=reps, warmup=2)
            peak = peak_memory_mb(lambda fn=fn: run(fn), device)
        except Exception as exc:  # noqa: BLE001 - a provider that cannot run is reported
            rows.append({**row, "fwd_bwd_ms": None, "fwd_bwd_min_ms": None, "peak_MB": None,
                         "err_loss": None, "err_dx": None, "err_dw": None,
                         "note": f"{type(exc).__name__}: {str(exc)[:80]}"})  # fmt: skip
            continue
        errs = [float((a - b).abs().max()) for a, b in zip(got, reference)]
        rows.append({**row, "fwd_bwd_ms": med, "fwd_bwd_min_ms": low, "peak_MB": peak,
                     "err_loss": errs[0], "err_dx": errs[1], "err_dw": errs[2], "note": ""})  # fmt: skip
    base = next((r for r in rows if r["provider"] == "torch"), None)
    for row in rows:
        ok = base and row["fwd_bwd_min_ms"] and base["fwd_bwd_min_ms"]
        row["speedup_vs_torch"] = base["fwd_bwd_min_ms"] / row["fwd_bwd_min_ms"] if ok else None
        ok = base and row["peak_MB"] and base["peak_MB"]
        row["memory_vs_torch"] = row["peak_MB"] / base["peak_MB"] if ok else None
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    parser.add_argument("--providers", default=None, help="comma list (default: per device)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="results folder (default results/<device>)")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    gpu = args.device != "cpu"
    sizes = PRESETS[args.preset or ("gpu" if gpu else "cpu")]
    dtype = DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    default = "torch,torch_compile,turbolm_triton,liger" if gpu else "torch,turbolm_cpu"
    providers = (args.providers or default).split(",")
    rows = [
        r for n, c, v in sizes for r in measure(n, c, v, dtype, args.device, providers, args.reps)
    ]
    notes = [
        "One forward + backward of loss = cross_entropy(x @ W^T, targets) with grads of x and W; "
        "10% of the targets are ignore_index.",
        "peak_MB: GPU allocator peak of the step; CPU: profiler total allocation (upper bound).",
        "err_*: max abs difference from the torch provider (fp32 softmax) in the same dtype.",
    ]
    folder = write_results(
        rows,
        args.device,
        "cross_entropy",
        "Fused linear cross-entropy: time and memory",
        notes,
        args.out,
        argv=None if argv is None else ["benchmarks/bench_cross_entropy.py", *argv],
    )
    print((folder / "cross_entropy.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
