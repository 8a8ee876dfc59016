"""Benchmark of attention decoding: one new token (or a few) against a KV cache.

For every cache length it times one decode step of each provider, reports the achieved
bandwidth (bytes of the k/v cache read + q and out, over the time), the fraction of the
measured copy bandwidth, and the max error against an fp64 reference:

* ``turbolm_cuda`` / ``turbolm_cpu``: the decode kernels (``csrc/attention``), through
  ``turbolm.ops.attention(..., backend=...)``; ``turbolm_cuda_op``: the same CUDA kernels
  called directly (``decode_kernels.decode``), without the backend selection;
* ``sdpa`` (``torch.nn.functional.scaled_dot_product_attention``, whatever backend it picks;
  GQA via ``enable_gqa``), ``sdpa_math`` on CPU;
* ``turbolm_triton``: the training kernel (``kernels/attention.py``) on the same shapes (GPU).

Order: the long caches (>= 4096 keys, where decoding is bandwidth-bound) come first, then the
short ones, and ``turbolm_triton`` (a training kernel that autotunes every new shape) comes
after every other row, so a run cut short still has the rows that matter. Each shape's inputs
and its fp64 reference are made once and shared by the providers; ``vs_sdpa`` is SDPA's time
over the provider's (> 1: faster than SDPA). ``--budget-s`` stops starting new rows after that
many seconds (the results written are those measured).

Writes ``decode.csv`` / ``decode.md`` under ``benchmarks/results/<device>/``. Examples::

    python benchmarks/bench_decode.py                       # GPU: bf16, B 1/8/32, Hq 32, Hkv 8, D 128
    python benchmarks/bench_decode.py --batches 1,32 --cache-lens 1,33,4096,16384 --budget-s 30
    python benchmarks/bench_decode.py --device cpu --threads 2 --dtype fp32
    python benchmarks/bench_decode.py --dry-run --out /tmp/x   # tiny CPU run (CI)
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    Rotator,
    copy_bandwidth_gbs,
    set_threads,
    time_stats_ms,
    write_results,
)
from turbolm.ops import attention  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _turbolm(backend: str):
    def run(q, k, v):
        return attention(q, k, v, causal=True, backend=backend)

    return run


def _decode_op():
    """The CUDA op itself (``decode_kernels.decode``): the kernels without the backend
    selection of ``attention(...)``, to tell the Python dispatch cost from the kernels'."""
    from turbolm.ops import decode_kernels

    def run(q, k, v):
        return decode_kernels.decode(q, k, v, causal=True)[0]

    return run


def _sdpa(math_only: bool):
    def run(q, k, v):
        group = q.shape[1] // k.shape[1]
        if math_only:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.MATH):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=group > 1)
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=group > 1)

    return run


def providers(device: str, names: list[str] | None) -> dict:
    table = {
        "turbolm_cuda": (_turbolm("cuda"), device != "cpu"),
        "turbolm_cuda_op": (_decode_op(), device != "cpu"),
        "turbolm_cpu": (_turbolm("cpu"), device == "cpu"),
        "sdpa": (_sdpa(False), True),
        "sdpa_math": (_sdpa(True), device == "cpu"),
        "turbolm_triton": (_turbolm("triton"), device != "cpu"),
    }
    if names:
        unknown = sorted(set(names) - set(table))
        if unknown:
            raise SystemExit(f"bench_decode: unknown providers {unknown}; known: {sorted(table)}")
        return {n: table[n][0] for n in names}
    return {n: fn for n, (fn, default) in table.items() if default}


def reference(q, k, v) -> torch.Tensor:
    """fp64 attention of the new token(s) (causal, bottom-right) on batch 0, (1, Hq, Tq, D), on
    the inputs' device (GQA as a grouped matmul: no repeated k / v)."""
    q, k, v = (t[:1].double() for t in (q, k, v))
    hq, tq, d = q.shape[1], q.shape[2], q.shape[3]
    hkv, tk = k.shape[1], k.shape[2]
    qg = q.reshape(1, hkv, (hq // hkv) * tq, d)  # q heads of a kv head, then tokens
    scores = qg @ k.transpose(-1, -2) / math.sqrt(d)  # (1, Hkv, G * Tq, Tk)
    visible = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(diagonal=tk - tq)
    visible = visible.repeat(hq // hkv, 1)  # row g * Tq + t sees what token t sees
    out = scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v  # (1, Hkv, G * Tq, D)
    return out.reshape(1, hq, tq, d)


def make_inputs(shape, dtype, device):
    """A Rotator over copies of (q, k, v) for one shape (64 MiB+ together on GPU)."""
    batch, hq, hkv, tq, tk, d = shape

    def make():
        q = torch.randn(batch, hq, tq, d, dtype=dtype, device=device)
        k = torch.randn(batch, hkv, tk, d, dtype=dtype, device=device)
        return q, k, torch.randn_like(k)

    return Rotator(make, min_bytes=(64 << 20) if device != "cpu" else 0, max_copies=4)


def measure(name, fn, shape, rot, ref, dtype, device, reps, ceiling) -> dict:
    batch, hq, hkv, tq, tk, d = shape
    row = {"provider": name, "batch": batch, "q_heads": hq, "kv_heads": hkv, "q_len": tq,
           "cache_len": tk, "head_dim": d}  # fmt: skip
    item = torch.empty((), dtype=dtype).element_size()
    nbytes = (2 * batch * hkv * tk * d + 2 * batch * hq * tq * d) * item
    try:
        with torch.no_grad():
            q, k, v = rot.sets[0]
            err = (fn(q, k, v)[:1].double() - ref).abs().max().item()
            med, best = time_stats_ms(lambda: fn(*rot.next()), device, reps=reps, warmup=3)
        gbs = nbytes / (med * 1e-3) / 1e9
        row.update(time_us=med * 1e3, min_us=best * 1e3, gb_s=gbs,
                   pct_copy_bw=100 * gbs / ceiling if ceiling else float("nan"),
                   max_err=err, status="ok")  # fmt: skip
    except Exception as exc:  # a provider that cannot run a shape is a row, not a crash
        row.update(time_us=float("nan"), min_us=float("nan"), gb_s=float("nan"),
                   pct_copy_bw=float("nan"), max_err=float("nan"),
                   status=f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}")  # fmt: skip
    return row


def plan(batches, lens, names) -> list[tuple[int, int, list[str]]]:
    """(batch, cache length, providers) in measuring order: caches >= 4096 first, then the
    short ones; turbolm_triton (slow: it autotunes each shape) in a last pass."""
    sizes = [(b, tk) for b in batches for tk in lens]
    sizes = [s for s in sizes if s[1] >= 4096] + [s for s in sizes if s[1] < 4096]
    first = [n for n in names if n != "turbolm_triton"]
    steps = [(b, tk, first) for b, tk in sizes if first]
    if "turbolm_triton" in names:
        steps += [(b, tk, ["turbolm_triton"]) for b, tk in sizes]
    return steps


def add_sdpa_ratio(rows: list[dict]) -> None:
    """vs_sdpa: SDPA's median time over the row's, at the same shape (nan without SDPA)."""
    key = ("batch", "q_heads", "kv_heads", "q_len", "cache_len", "head_dim")
    sdpa = {tuple(r[k] for k in key): r["time_us"] for r in rows if r["provider"] == "sdpa"}
    for r in rows:
        base = sdpa.get(tuple(r[k] for k in key), float("nan"))
        r["vs_sdpa"] = base / r["time_us"] if r["time_us"] == r["time_us"] else float("nan")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="bf16 GPU / fp32 CPU")
    p.add_argument("--batches", default=None, help="comma list (GPU 1,8,32; CPU 1,8)")
    p.add_argument("--cache-lens", default=None, help="comma list of cache lengths")
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--q-len", type=int, default=1, help="new tokens per step")
    p.add_argument("--providers", default=None, help="comma list (default: all for the device)")
    p.add_argument("--reps", type=int, default=30, help="timed calls on CPU")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch)")
    p.add_argument(
        "--budget-s", type=float, default=0.0, help="start no new row after this many seconds"
    )
    p.add_argument("--out", default=None, help="output folder")
    p.add_argument("--dry-run", action="store_true", help="tiny CPU run of every code path")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    set_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device != "cpu"
    dtype = DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    batches = [int(b) for b in (args.batches or ("1,8,32" if gpu else "1,8")).split(",")]
    default_lens = "1,33,512,2048,4096,8192,16384,32768" if gpu else "1,33,512,4096"
    lens = [int(n) for n in (args.cache_lens or default_lens).split(",")]
    hq, hkv, d = args.q_heads, args.kv_heads, args.head_dim
    if args.dry_run:
        device, gpu, dtype, batches, lens, hq, hkv, d = (
            "cpu",
            False,
            torch.float32,
            [2],
            [1, 33],
            4,
            2,
            16,
        )
        args.reps = 2
    chosen = providers(device, args.providers.split(",") if args.providers else None)
    ceiling = copy_bandwidth_gbs(device, nbytes=(256 << 20) if gpu else (64 << 20))
    rows = []
    start = time.perf_counter()
    skipped = 0
    for batch, tk, names in plan(batches, lens, list(chosen)):
        if args.budget_s and time.perf_counter() - start > args.budget_s:
            skipped += len(names)
            continue
        shape = (batch, hq, hkv, args.q_len, tk, d)
        rot = make_inputs(shape, dtype, device)
        with torch.no_grad():
            ref = reference(*rot.sets[0])
        for name in names:
            row = measure(name, chosen[name], shape, rot, ref, dtype, device, args.reps, ceiling)
            rows.append(row)
            print(
                f"B={batch:<3d} cache={tk:<6d} {name:15s} {row['time_us']:10.1f} us "
                f"{row['gb_s']:8.1f} GB/s err {row['max_err']:.2e} {row['status']}",
                flush=True,
            )
        del rot, ref
    add_sdpa_ratio(rows)
    for r in rows:
        if r["provider"].startswith("turbolm_cuda") and r["status"] == "ok":
            print(
                f"summary B={r['batch']:<3d} cache={r['cache_len']:<6d} {r['provider']:15s} "
                f"{r['time_us']:8.1f} us {r['gb_s']:7.0f} GB/s ({r['pct_copy_bw']:.0f}% of copy) "
                f"x{r['vs_sdpa']:.2f} vs sdpa",
                flush=True,
            )
    notes = [
        f"{str(dtype).replace('torch.', '')}, causal, q_len {args.q_len}; gb_s = bytes of the "
        "k/v cache + q + out over the median time; pct_copy_bw against a measured "
        f"device-to-device copy ({ceiling:.0f} GB/s); max_err vs fp64 on batch 0.",
        "Inputs rotate through several copies (64 MiB+ on GPU) so the cache is not L2-resident.",
        "vs_sdpa: sdpa's median time over the row's (> 1: faster than SDPA).",
    ]
    if skipped:
        notes.append(f"--budget-s {args.budget_s:g}: {skipped} provider rows not measured.")
    if args.dry_run:
        notes.append("DRY RUN: tiny CPU shapes, the numbers mean nothing.")
    out = write_results(rows, device, "decode", "Attention decode benchmark", notes, args.out)
    print(f"wrote {out / 'decode.csv'} and {out / 'decode.md'}", flush=True)
    return rows


if __name__ == "__main__":
    main()
