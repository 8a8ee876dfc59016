"""Per-rank memory of ZeRO stages 0-3 at 1, 2 and 4 ranks (CPU ranks, gloo, fp32).

    python benchmarks/bench_zero.py [--ranks 1 2 4] [--out benchmarks/results/cpu]

For each world size the script starts itself under ``torchrun``; every rank builds the same
TransformerLM (4 layers, d_model 256, vocab 4096: ~4.2M parameters), wraps it in a DeepSpeed
engine with ``configs/deepspeed/zero{0,1,2,3}.json`` ("auto" values filled by turbolm, stage 0
= plain data parallelism), trains one step (so Adam's state exists), runs forward + backward of
a second step (so gradients are live) and then counts the bytes of every tensor storage this
rank holds, each storage once:

* params     the model's weights (ZeRO-3: this rank's partition + persistent small params)
* grads      gradients: ``p.grad`` and the engine's gradient partitions/buffers
* optimizer  Adam ``exp_avg``/``exp_avg_sq`` + the fp32 master partition (ZeRO >= 1)
* other      the engine's remaining buffers (communication buckets, ...)

and the table also shows what the ZeRO paper predicts for fp32 Adam with N ranks and P
parameters: params 4P (ZeRO-3: 4P/N), grads 4P (ZeRO-2/3: 4P/N), optimizer 8P at stage 0 and
(4 + 8)P/N from stage 1 on (DeepSpeed keeps a partitioned fp32 master copy even in fp32).
Numbers are per rank, rank 0 (ranks differ by at most the padding of one partition).

Writes ``zero_memory.md`` and ``zero_memory.csv`` to ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = dict(arch="transformer", vocab_size=4096, context=64, n_layer=4, n_head=4, d_model=256)
MICRO_BATCH = 4
STAGES = (0, 1, 2, 3)


# ------------------------------------------------------------------------------ worker side


def _storages(obj, name: str, found: list, depth: int = 0) -> None:
    """Collect (attribute path, tensor) pairs reachable from ``obj`` through lists, tuples and
    dicts (a few levels: DeepSpeed keeps its buffers in lists of lists and dicts)."""
    import torch

    if isinstance(obj, torch.Tensor):
        found.append((name, obj))
    elif depth < 4 and isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            _storages(item, f"{name}[{i}]", found, depth + 1)
    elif depth < 4 and isinstance(obj, dict):
        for key, item in obj.items():
            _storages(item, f"{name}[{key!r}]", found, depth + 1)


def _classify(engine) -> dict[str, int]:
    """Bytes per category held by this rank, every storage counted once."""
    seen: set[int] = set()
    totals = {"params": 0, "grads": 0, "optimizer": 0, "other": 0}

    def add(category: str, t) -> None:
        if t.device.type == "meta":  # shape-only placeholders (DeepSpeed keeps some)
            return
        storage = t.untyped_storage()
        if storage.nbytes() == 0 or storage.data_ptr() in seen:
            return
        seen.add(storage.data_ptr())
        totals[category] += storage.nbytes()

    module = engine.module
    for p in module.parameters():  # weights first: flat buffers they view count as params
        if hasattr(p, "ds_tensor"):  # ZeRO-3: the partition, plus the full tensor when the
            add("params", p.ds_tensor)  # parameter is persistent (too small to partition)
        add("params", p.data)
    for p in module.parameters():
        if p.grad is not None:
            add("grads", p.grad)
    zero = engine.optimizer
    basic = getattr(zero, "optimizer", zero)
    for state in basic.state.values():
        for value in state.values():
            if hasattr(value, "untyped_storage"):
                add("optimizer", value)
    found: list = []
    if zero is not basic:
        for attr, value in vars(zero).items():
            _storages(value, attr, found)
    for attr, t in found:
        low = attr.lower()
        if "grad" in low:
            add("grads", t)
        elif "fp32" in low or "master" in low:
            add("optimizer", t)
            if t.grad is not None:  # the fp32 partition's gradient (ZeRO-1/2)
                add("grads", t.grad)
        elif any(s in low for s in ("bit16", "fp16", "bf16", "param")):
            add("params", t)
        else:
            add("other", t)
    return totals


def worker(args) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    torch.set_num_threads(1)
    import deepspeed
    import deepspeed.ops

    from turbolm.config import load_config
    from turbolm.models import build_model
    from turbolm.train.distributed import launch_env, read_ds_json, resolve_ds_config

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    from deepspeed.utils import logger

    logger.setLevel("ERROR")
    deepspeed.init_distributed(dist_backend="gloo")
    env = launch_env()
    cfg = load_config(
        None,
        [
            f"train.batch_size={MICRO_BATCH}",
            f"model.d_model={MODEL['d_model']}",
            f"model.n_head={MODEL['n_head']}",
            f"model.n_layer={MODEL['n_layer']}",
            f"model.context={MODEL['context']}",
        ],
    )
    rows = []
    for stage in STAGES:
        path = ROOT / "configs" / "deepspeed" / f"zero{stage}.json"
        raw = read_ds_json(path) if path.is_file() else {"zero_optimization": {"stage": 0}}
        ds = resolve_ds_config(raw, cfg, env.world_size, "fp32", str(path))
        torch.manual_seed(0)
        model = build_model(dict(MODEL))
        n_params = model.num_params()
        groups = model.configure_optimizer_groups(0.1)
        engine, *_ = deepspeed.initialize(
            model=model,
            optimizer=torch.optim.AdamW(groups, lr=1e-3),
            config=ds,
            dist_init_required=False,
        )
        gen = torch.Generator().manual_seed(env.rank)
        for step in range(2):
            x = torch.randint(
                0, MODEL["vocab_size"], (MICRO_BATCH, MODEL["context"]), generator=gen
            )
            _, loss = engine(x, torch.roll(x, -1, 1))
            engine.backward(loss)
            if step == 1:
                measured = _classify(engine)  # grads live, Adam state from step 0
            engine.step()
        rows.append({"stage": stage, "ranks": env.world_size, "n_params": n_params, **measured})
        if hasattr(engine, "destroy"):
            engine.destroy()
        del engine, model
    gathered = [None] * env.world_size
    torch.distributed.all_gather_object(gathered, rows)
    if env.rank == 0:
        Path(args.worker_out).write_text(json.dumps(gathered))


# ------------------------------------------------------------------------------ driver side


def expected(stage: int, n: int, p: int) -> dict[str, float]:
    """ZeRO paper, fp32 Adam: bytes per rank."""
    params = 4 * p / n if stage == 3 else 4 * p
    grads = 4 * p / n if stage >= 2 else 4 * p
    optimizer = 8 * p if stage == 0 else 12 * p / n
    return {"params": params, "grads": grads, "optimizer": optimizer}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(ranks: int) -> list[list[dict]]:
    out = ROOT / "benchmarks" / "results" / "cpu" / f".bench_zero_{ranks}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [
        str(torchrun),
        "--nproc_per_node",
        str(ranks),
        "--master_port",
        str(_free_port()),
        str(Path(__file__).resolve()),
        "--worker-out",
        str(out),
    ]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"bench_zero: {ranks} rank(s) failed:\n{done.stderr[-4000:]}")
    result = json.loads(out.read_text())
    out.unlink()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu"))
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_out:
        worker(args)
        return
    t0 = time.time()
    table = []
    for n in args.ranks:
        per_rank = run(n)  # [rank][stage] rows
        for i, row in enumerate(per_rank[0]):
            spread = max(
                abs(sum(r[i][k] for k in ("params", "grads", "optimizer")) -
                    sum(row[k] for k in ("params", "grads", "optimizer")))
                for r in per_rank
            )  # fmt: skip
            exp = expected(row["stage"], n, row["n_params"])
            table.append(
                {**row, "rank_spread": spread, **{f"expected_{k}": v for k, v in exp.items()}}
            )
    mb = 1 / 2**20
    header = ("ZeRO", "ranks", "params MB", "grads MB", "optimizer MB", "other MB",
              "total MB", "ZeRO-paper p/g/o MB")  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in table:
        total = r["params"] + r["grads"] + r["optimizer"] + r["other"]
        lines.append(
            f"| {r['stage']} | {r['ranks']} | {r['params'] * mb:.2f} | {r['grads'] * mb:.2f} | "
            f"{r['optimizer'] * mb:.2f} | {r['other'] * mb:.2f} | {total * mb:.2f} | "
            f"{r['expected_params'] * mb:.2f} / {r['expected_grads'] * mb:.2f} / "
            f"{r['expected_optimizer'] * mb:.2f} |"
        )
    import deepspeed
    import torch

    n_params = table[0]["n_params"]
    meta = (
        f"TransformerLM {json.dumps(MODEL)} = {n_params:,} parameters, fp32, micro batch "
        f"{MICRO_BATCH}, configs/deepspeed/zero{{1,2,3}}.json (stage 0: plain DeepSpeed data "
        f"parallel). Per rank (rank 0), bytes of live tensor storages after the backward of "
        f"step 2. torch {torch.__version__}, deepspeed {deepspeed.__version__}, "
        f"{platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d')}. "
        f"Command: python benchmarks/bench_zero.py --ranks {' '.join(map(str, args.ranks))}"
    )
    note = (
        "A snapshot, not a peak: at ZeRO-1 DeepSpeed all-reduces the full gradients at the end "
        "of the last micro-step's backward and then keeps only this rank's partition (so the "
        "measured grads are 4P/N; the full 4P exist transiently during backward, as the ZeRO "
        "paper counts them). ZeRO-2 reduces bucket by bucket during backward, so the full "
        "gradients never exist at once. `other` = engine buffers not classified above."
    )
    text = (
        "# ZeRO memory per rank (CPU, gloo)\n\n" + meta + "\n\n" + "\n".join(lines) + "\n\n"
        + note + "\n"
    )  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "zero_memory.md").write_text(text)
    with open(out / "zero_memory.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    print(text)
    print(f"({time.time() - t0:.0f} s; written to {out}/zero_memory.md and .csv)")


if __name__ == "__main__":
    main()
