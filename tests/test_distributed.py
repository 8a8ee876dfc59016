"""DeepSpeed data parallelism on CPU ranks (gloo): ZeRO-1/2/3 equivalence with a single process,
multi-node launches on loopback, a SIGKILLed rank under torchrun --max-restarts, consolidation
of ZeRO-3 shards, resume on another world size, launch scripts and bad input.

Every multi-process test is small (tiny models, 2 ranks, a few steps); the 4-process tests and
those that JIT-build DeepSpeed ops are marked slow. The unit tests at the end start nothing.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import torch

from turbolm.cli import main
from turbolm.config import load_config
from turbolm.data import TrainBatches
from turbolm.errors import ConfigError
from turbolm.train.distributed import (
    launch_env,
    parse_hostfile,
    read_ds_json,
    resolve_ds_config,
)
from turbolm.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DS_CONFIGS = ROOT / "configs" / "deepspeed"
TORCHRUN_SH = ROOT / "scripts" / "launch" / "torchrun.sh"
DEEPSPEED_SH = ROOT / "scripts" / "launch" / "deepspeed_multinode.sh"
SLURM_SBATCH = ROOT / "scripts" / "launch" / "slurm.sbatch"

TINY = [
    "model.n_layer=1",
    "model.d_model=32",
    "model.n_head=2",
    "model.context=32",
    "train.batch_size=4",
    "train.warmup_steps=2",
    "train.eval_batches=3",
    "train.log_every=1",
    "train.sample_tokens=0",
    "train.tensorboard=false",
    "train.threads=1",
]
RNN = ["model.arch=rnn", "model.cell=lstm", "model.n_layer=2", "model.d_hidden=32"]


# ---------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """The stdlib json package as a corpus (as in test_cli), BPE vocabulary 300."""
    import json as json_pkg

    src = Path(json_pkg.__file__).parent
    out = tmp_path_factory.mktemp("ddata") / "prepared"
    rc = main(
        [
            "prepare",
            str(src),
            "--out",
            str(out),
            "--vocab-size",
            "300",
            "--val-fraction",
            "0.3",
            "--no-progress",
        ]
    )
    assert rc == 0
    return out


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHON=sys.executable,
        TORCHRUN=str(BIN / "torchrun"),
        DEEPSPEED=str(BIN / "deepspeed"),
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(ROOT),
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _torchrun(*args, timeout=420, **env) -> subprocess.CompletedProcess:
    """scripts/launch/torchrun.sh with `args` for turbolm train (single node, 2 ranks default)."""
    env.setdefault("NPROC_PER_NODE", 2)
    env.setdefault("MASTER_PORT", _port())
    return subprocess.run(
        ["bash", str(TORCHRUN_SH), "--no-progress", *args],
        capture_output=True,
        text=True,
        env=_env(**env),
        cwd=ROOT,
        timeout=timeout,
    )


def _records(run: Path, key: str) -> dict[int, float]:
    """step -> value of `key` from metrics.jsonl; a later record of a step (resume) wins."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if key in record:
            out[record["step"]] = record[key]
    return out


def _steps_logged(run: Path) -> list[int]:
    return [
        json.loads(line)["step"]
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in line
    ]


class _UnionBatches:
    """Single-process stand-in for a data-parallel step: the concatenation of what ranks
    0..world-1 draw (each a TrainBatches with that rank), in rank order."""

    def __init__(self, streams: list[TrainBatches]):
        self.streams = streams

    def next(self):
        xs, ys = zip(*(s.next() for s in self.streams))
        return torch.cat(xs), torch.cat(ys)

    def state_dict(self):
        return self.streams[0].state_dict()


class _GlobalBatchTrainer(Trainer):
    """The single-process trainer fed the union of ``world`` ranks' micro-batches."""

    world = 2

    def _make_train_batches(self):
        return _UnionBatches(
            [
                TrainBatches(
                    self.data.train,
                    self.tc.batch_size,
                    self.cfg.model.context,
                    seed=self.tc.seed,
                    rank=r,
                    world_size=self.world,
                )
                for r in range(self.world)
            ]
        )


# A worker that runs several Trainer jobs in one pair of processes (one process group, one
# DeepSpeed import): 6 DeepSpeed jobs would otherwise cost 6 launches.
WORKER = textwrap.dedent(
    """
    import json, sys
    from turbolm.config import load_config
    from turbolm.train.trainer import Trainer

    shapes = {}
    for overrides in json.loads(open(sys.argv[1]).read()):
        trainer = Trainer(load_config(None, overrides), progress=False)
        trainer.run()
        if trainer.rt.stage == 3:  # what this rank holds of each parameter
            shapes[trainer.cfg.train.out_dir] = {
                name: [p.ds_tensor.numel(), p.ds_numel]
                for name, p in trainer.model.named_parameters()
            }
    if trainer.rank == 1:
        open(sys.argv[2], "w").write(json.dumps(shapes))
    """
)


# ------------------------------------------------------------------------ ZeRO equivalence


def test_zero_1_2_3_match_a_single_process_run(prepared, tmp_path):
    """Transformer (tied embeddings) and LSTM LM, 20 steps on 2 ranks under ZeRO-1, 2 and 3
    (and ZeRO-3 with parameter + optimizer offload, and with activation checkpointing; ZeRO-2
    with the fused linear cross-entropy), give the per-step train losses and the
    val losses of one process trained on the union of the ranks' micro-batches."""
    common = [f"data.dir={prepared}", *TINY, "train.max_steps=20", "train.eval_every=10"]
    offload = json.loads((DS_CONFIGS / "zero3_offload.json").read_text())
    offload["optimizer"]["params"]["torch_adam"] = True  # DeepSpeed's CPU Adam needs a JIT build
    (tmp_path / "offload.json").write_text(json.dumps(offload))
    jobs = {
        "t_z1": ("t", 1, DS_CONFIGS / "zero1.json"),
        "t_z2": ("t", 2, DS_CONFIGS / "zero2.json"),
        "t_z3": ("t", 1, DS_CONFIGS / "zero3.json"),
        "t_z3off": ("t", 1, tmp_path / "offload.json"),
        "t_z3ckpt": ("t", 1, DS_CONFIGS / "zero3.json"),  # + activation checkpointing
        "r_z2fused": ("r", 1, DS_CONFIGS / "zero2.json"),  # + fused linear cross-entropy
        "r_z1": ("r", 1, DS_CONFIGS / "zero1.json"),
        "r_z2": ("r", 1, DS_CONFIGS / "zero2.json"),
        "r_z3": ("r", 1, DS_CONFIGS / "zero3.json"),
    }

    def overrides(arch, accum, out):
        return [*common, *(RNN if arch == "r" else []), f"train.grad_accum={accum}",
                f"train.out_dir={out}"]  # fmt: skip

    spec = [
        [*overrides(arch, accum, tmp_path / name), f"train.deepspeed={ds}"]
        + (["train.activation_checkpointing=true"] if name.endswith("ckpt") else [])
        + (["train.fused_cross_entropy=true"] if name.endswith("fused") else [])
        for name, (arch, accum, ds) in jobs.items()
    ]
    (tmp_path / "jobs.json").write_text(json.dumps(spec))
    (tmp_path / "worker.py").write_text(WORKER)
    port = _port()
    done = subprocess.run(
        [
            str(BIN / "torchrun"),
            "--nproc_per_node",
            "2",
            "--master_port",
            str(port),
            str(tmp_path / "worker.py"),
            str(tmp_path / "jobs.json"),
            str(tmp_path / "shapes.json"),
        ],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    # ZeRO-3 really partitioned the LSTM's flat weights and the tied embedding / LM head
    shapes = json.loads((tmp_path / "shapes.json").read_text())
    rnn, tf = shapes[str(tmp_path / "r_z3")], shapes[str(tmp_path / "t_z3")]
    for name in ("rnn.weight_ih_l0", "rnn.weight_hh_l1", "embed.weight"):
        assert rnn[name][0] == -(-rnn[name][1] // 2), (name, rnn[name])
    assert tf["tok_emb.weight"][0] == -(-tf["tok_emb.weight"][1] // 2)
    assert "lm_head.weight" not in tf  # tied: one parameter

    refs = {}
    for arch, accum in {(a, g) for a, g, _ in jobs.values()}:
        out = tmp_path / f"ref_{arch}{accum}"
        _GlobalBatchTrainer(load_config(None, overrides(arch, accum, out)), progress=False).run()
        refs[arch, accum] = out
    for name, (arch, accum, _) in jobs.items():
        ref, got = refs[arch, accum], tmp_path / name
        assert _steps_logged(got) == list(range(1, 21)), f"{name}: rank 0 logs each step once"
        for key in ("loss", "val_loss", "val_accuracy"):
            want, have = _records(ref, key), _records(got, key)
            assert sorted(have) == sorted(want), (name, key)
            for step in want:
                assert have[step] == pytest.approx(want[step], abs=1e-4), (name, key, step)
            worst = max(abs(have[s] - want[s]) for s in want)
            print(f"{name} {key}: max |distributed - single process| = {worst:.2e}")
        marker = json.loads((got / "checkpoints" / "step_00000020" / "COMPLETE").read_text())
        assert marker["kind"] == "deepspeed" and marker["world_size"] == 2
        assert "model.safetensors" in marker["files"]  # the last checkpoint is consolidated


# ------------------------------------------------- ZeRO-3 run: consolidation, fault tolerance

Z3 = [*TINY, "model.dropout=0.1", "train.max_steps=20", "train.eval_every=10",
      "train.checkpoint_every=5", "train.keep_checkpoints=5"]  # fmt: skip


@pytest.fixture(scope="module")
def zero3_run(prepared, tmp_path_factory) -> Path:
    """An uninterrupted 2-rank ZeRO-3 run (dropout on, TensorBoard on)."""
    run = tmp_path_factory.mktemp("z3") / "run"
    done = _torchrun(
        f"data.dir={prepared}",
        f"train.out_dir={run}",
        *Z3,
        "train.tensorboard=true",
        f"train.deepspeed={DS_CONFIGS / 'zero3.json'}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("checkpoint:") == 1  # only rank 0 reports
    return run


def test_zero3_checkpoint_consolidates_to_the_live_model(zero3_run, tmp_path, capsys):
    step10 = zero3_run / "checkpoints" / "step_00000010"
    marker = json.loads((step10 / "COMPLETE").read_text())
    assert marker["zero_stage"] == 3 and marker["world_size"] == 2
    assert "model.safetensors" not in marker["files"]  # intermediate: ZeRO shards only
    assert sum("optim_states" in name for name in marker["files"]) == 2  # one shard per rank

    out = tmp_path / "consolidated"
    assert main(["consolidate", "--checkpoint", str(step10), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "COMPLETE",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "trainer_state.pt",
    ]
    capsys.readouterr()
    live = _records(zero3_run, "val_loss")  # evaluated by the ZeRO-3 engine on 2 ranks
    args = ["--batch-size", "4", "--max-batches", "3", "--json"]
    assert main(["eval", "--checkpoint", str(out), *args]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(live[10], rel=1e-6)
    # The run's last checkpoint was consolidated at the end of training: eval takes the run.
    assert main(["eval", "--checkpoint", str(zero3_run), *args]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["step"] == 20 and metrics["loss"] == pytest.approx(live[20], rel=1e-6)
    # rank 0 alone wrote TensorBoard events
    assert len(list((zero3_run / "tensorboard").glob("events.*"))) == 1


def test_single_process_resume_refuses_a_deepspeed_checkpoint(zero3_run, prepared, capsys):
    rc = main(["train", "--resume", f"data.dir={prepared}", f"train.out_dir={zero3_run}", *Z3,
               "train.max_steps=25"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "DeepSpeed run" in err and len(err.strip().splitlines()) == 1


def _find_worker(tag: str, rank: int) -> int | None:
    """pid of the turbolm worker with RANK=rank started under TURBOLM_TEST_TAG=tag."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if (
            f"TURBOLM_TEST_TAG={tag}".encode() in environ
            and f"RANK={rank}".encode() in environ
            and b"turbolm" in cmdline
            and b"torchrun" not in cmdline
        ):
            return int(pid)
    return None


def test_sigkilled_rank_is_restarted_and_resumes_exactly(zero3_run, prepared, tmp_path):
    """torchrun --max-restarts 1: a rank killed with SIGKILL after the step-10 checkpoint
    restarts the worker group, which resumes from the newest complete checkpoint and ends with
    the losses of the uninterrupted run."""
    run = tmp_path / "killed"
    tag = uuid.uuid4().hex
    proc = subprocess.Popen(
        [
            "bash",
            str(TORCHRUN_SH),
            "--no-progress",
            f"data.dir={prepared}",
            f"train.out_dir={run}",
            *Z3,
            f"train.deepspeed={DS_CONFIGS / 'zero3.json'}",
        ],  # fmt: skip
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=_env(NPROC_PER_NODE=2, MASTER_PORT=_port(), MAX_RESTARTS=1, TURBOLM_TEST_TAG=tag),
    )
    marker = run / "checkpoints" / "step_00000010" / "COMPLETE"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    victim = _find_worker(tag, rank=1)
    assert victim is not None, "rank 1 not found (finished already?)"
    os.kill(victim, signal.SIGKILL)
    out, err = proc.communicate(timeout=420)
    assert proc.returncode == 0, err[-3000:]
    assert "resumed from" in err, err[-3000:]
    resumed_at = int(err.split("resumed from")[1].split("(step ")[1].split(")")[0])
    assert 10 <= resumed_at < 20
    want, got = _records(zero3_run, "loss"), _records(run, "loss")
    assert [got[s] for s in range(resumed_at + 1, 21)] == pytest.approx(
        [want[s] for s in range(resumed_at + 1, 21)], rel=1e-6
    )
    assert got[20] == pytest.approx(want[20], rel=1e-6)


# ----------------------------------------------------------------------- multi-node launches


def test_two_nodes_on_loopback_with_torchrun(prepared, tmp_path):
    """2 "nodes" x 2 processes: one torchrun agent per node, c10d rendezvous on 127.0.0.1;
    4 ranks train ZeRO-2 and write one complete checkpoint with a shard per rank."""
    run = tmp_path / "run"
    args = [f"data.dir={prepared}", f"train.out_dir={run}", *TINY, "train.max_steps=4",
            "train.eval_every=4", "train.checkpoint_every=4",
            f"train.deepspeed={DS_CONFIGS / 'zero2.json'}"]  # fmt: skip
    env = _env(NNODES=2, NPROC_PER_NODE=2, MASTER_PORT=_port(), RDZV_ID=uuid.uuid4().hex[:8])
    nodes = [
        subprocess.Popen(
            ["bash", str(TORCHRUN_SH), "--no-progress", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )
        for _ in range(2)
    ]
    results = [node.communicate(timeout=420) for node in nodes]
    for node, (_, err) in zip(nodes, results):
        assert node.returncode == 0, err[-3000:]
    assert sum(out.count("checkpoint:") for out, _ in results) == 1
    marker = json.loads((run / "checkpoints" / "step_00000004" / "COMPLETE").read_text())
    assert marker["world_size"] == 4
    assert sum("optim_states" in name for name in marker["files"]) == 4
    assert _steps_logged(run) == [1, 2, 3, 4]


@pytest.mark.slow
def test_two_nodes_on_loopback_with_the_deepspeed_launcher(prepared, tmp_path):
    """The deepspeed launcher without ssh, one per "node" (--node_rank), hostfile on loopback;
    then the 4-rank ZeRO-2 checkpoint is resumed on 2 ranks (universal checkpoint)."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two names for this machine\nlocalhost slots=2\n127.0.0.1 slots=2\n")
    run = tmp_path / "run"
    args = [f"data.dir={prepared}", f"train.out_dir={run}", *TINY, "train.max_steps=4",
            "train.eval_every=4", "train.checkpoint_every=4",
            f"train.deepspeed={DS_CONFIGS / 'zero2.json'}"]  # fmt: skip
    port = _port()
    nodes = [
        subprocess.Popen(
            ["bash", str(DEEPSPEED_SH), str(hostfile), "--no-progress", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=_env(NODE_RANK=rank, MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
        )
        for rank in range(2)
    ]
    results = [node.communicate(timeout=600) for node in nodes]
    for node, (out, err) in zip(nodes, results):
        assert node.returncode == 0, (out + err)[-3000:]
    marker = json.loads((run / "checkpoints" / "step_00000004" / "COMPLETE").read_text())
    assert marker["world_size"] == 4
    val_at_4 = _records(run, "val_loss")[4]

    # Resume on another world size, 4 -> 2 ranks (ZeRO-2, universal checkpoint). At max_steps
    # nothing trains and the final evaluation shows the weights came back exactly.
    done = _torchrun(*args, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stderr and "step_00000004" in done.stderr
    assert f"val loss {val_at_4:.4f}" in done.stdout
    done = _torchrun(*args, "--resume", "train.max_steps=6")
    assert done.returncode == 0, done.stderr[-3000:]
    losses = _records(run, "loss")
    assert sorted(losses) == list(range(1, 7)) and all(0 < v < 10 for v in losses.values())
    marker = json.loads((run / "checkpoints" / "step_00000006" / "COMPLETE").read_text())
    assert marker["world_size"] == 2


@pytest.mark.slow
def test_zero3_offload_with_deepspeed_cpu_adam(prepared, tmp_path):
    """The shipped zero3_offload.json as is: DeepSpeed builds its CPU Adam (minutes, once)."""
    run = tmp_path / "run"
    done = _torchrun(f"data.dir={prepared}", f"train.out_dir={run}", *TINY,
                     "train.max_steps=6", "train.eval_every=6", "train.checkpoint_every=6",
                     f"train.deepspeed={DS_CONFIGS / 'zero3_offload.json'}", timeout=1200)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "DeepSpeedCPUAdam" in done.stderr and "offload" in done.stderr
    losses = _records(run, "loss")
    assert losses[6] < losses[1]


def test_single_process_training_never_imports_deepspeed(prepared, tmp_path):
    overrides = [f"data.dir={prepared}", f"train.out_dir={tmp_path / 'r'}", *TINY,
                 "train.max_steps=2", "train.eval_every=2"]  # fmt: skip
    code = textwrap.dedent(
        f"""
        import sys
        from turbolm.config import load_config
        from turbolm.train.trainer import Trainer
        result = Trainer(load_config(None, {overrides!r}), progress=False).run()
        assert result.step == 2 and result.rank == 0
        assert "deepspeed" not in sys.modules, "the single-process path imported deepspeed"
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=_env(), cwd=ROOT, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


# The runtime's collectives on 2 gloo ranks (no DeepSpeed), every tensor they hand to
# torch.distributed recorded: when a collective of the runtime returns, its tensors must be ours
# alone again (use count 1). A gloo worker thread drops its references after the caller resumed,
# which takes the GIL: a rank that exited meanwhile died with "terminate called without an
# active exception" (SIGABRT) although its run had finished.
SETTLE_CHECK = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    from turbolm.train.distributed import DeepSpeedRuntime, launch_env

    dist.init_process_group("gloo")
    seen = []
    for name in ("broadcast", "all_reduce", "all_gather"):
        def spy(*args, _collective=getattr(dist, name), **kwargs):
            for a in args:
                seen.extend(a if isinstance(a, list) else [a])
            return _collective(*args, **kwargs)
        setattr(dist, name, spy)
    rt = DeepSpeedRuntime(launch_env(), {}, torch.device("cpu"))
    rank, held = rt.rank, 0
    for i in range(100):
        obj = {"step": i, "path": "x" * i}
        assert rt.broadcast(obj if rank == 0 else None) == obj
        held += sum(t._use_count() > 1 for t in seen)
        mine = ("rng", rank, "y" * (i * rank))
        assert rt.all_gather(mine) == [("rng", r, "y" * (i * r)) for r in range(2)]
        held += sum(t._use_count() > 1 for t in seen)
        assert rt.all_sum([1.5, float(rank + i)]) == [3.0, float(1 + 2 * i)]
        held += sum(t._use_count() > 1 for t in seen)
        seen.clear()
    rt.finish_job()
    print(f"rank {rank}: {held} tensors still held by gloo when a collective returned")
    sys.exit(held > 0)
    """
)


def test_runtime_collectives_return_once_gloo_let_go_of_their_tensors(tmp_path):
    (tmp_path / "check.py").write_text(SETTLE_CHECK)
    done = subprocess.run(
        [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_port()),
         str(tmp_path / "check.py")],
        capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert done.stdout.count(": 0 tensors still held") == 2, done.stdout


# --------------------------------------------------------------------------------- bad input


def _fails(capsys, argv, *needles):
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc != 0 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def test_bad_deepspeed_configs_give_one_clear_message(capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 2,}}')
    _fails(capsys, ["train", f"train.deepspeed={bad}"], "not valid JSON", "line 1")
    stage = tmp_path / "stage.json"
    stage.write_text('{"zero_optimization": {"stage": 4}}')
    _fails(capsys, ["train", f"train.deepspeed={stage}"], "stage", "does not exist")
    _fails(capsys, ["train", f"train.deepspeed={tmp_path / 'missing.json'}"], "does not exist")
    clash = tmp_path / "clash.json"
    clash.write_text('{"train_micro_batch_size_per_gpu": 3}')
    _fails(capsys, ["train", f"train.deepspeed={clash}", "train.batch_size=4"],
           "train_micro_batch_size_per_gpu", "auto")  # fmt: skip
    _fails(capsys, ["train", f"train.deepspeed={DS_CONFIGS / 'zero3.json'}",
                    "train.fused_cross_entropy=true"], "fused_cross_entropy", "ZeRO-3")  # fmt: skip


def test_bad_hostfile_gives_one_clear_message(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=2\nnode2 slots=two\n")
    done = subprocess.run(
        ["bash", str(DEEPSPEED_SH), str(hostfile), "train.max_steps=1"],
        capture_output=True,
        text=True,
        env=_env(DRY_RUN=1),
        timeout=120,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "line 2" in lines[0] and "slots=two" in lines[0], done.stderr


# ------------------------------------------------------------------- launch scripts (dry run)


def _dry(script: Path, *args, env=None, path_prefix=None) -> list[str]:
    e = _env(DRY_RUN=1, **(env or {}))
    if path_prefix:
        e["PATH"] = f"{path_prefix}{os.pathsep}{e['PATH']}"
    done = subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=e,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_launch_scripts_build_argument_arrays(tmp_path):
    tricky = "train.out_dir=/tmp/a dir; rm -rf x"  # stays one argument, never shell-parsed
    argv = _dry(TORCHRUN_SH, "-c", "configs/tiny.yaml", tricky,
                env=dict(NNODES=2, NPROC_PER_NODE=4, MASTER_ADDR="node0", MASTER_PORT=1234,
                         MAX_RESTARTS=3, RDZV_ID="job7"))  # fmt: skip
    assert argv[1:] == ["--nnodes", "2", "--nproc_per_node", "4", "--rdzv_backend", "c10d",
                        "--rdzv_endpoint", "node0:1234", "--rdzv_id", "job7", "--max_restarts",
                        "3", "-m", "turbolm", "train", "-c", "configs/tiny.yaml", tricky]  # fmt: skip

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("gpu-a slots=8  # first\n\ngpu-b slots=8\n")
    argv = _dry(DEEPSPEED_SH, str(hostfile), tricky)
    assert argv[1:] == ["--hostfile", str(hostfile), "--master_addr", "gpu-a", "--master_port",
                        "29500", "--no_local_rank", "--module", "turbolm", "train", tricky]  # fmt: skip
    argv = _dry(DEEPSPEED_SH, str(hostfile), tricky, env=dict(NODE_RANK=1, MASTER_ADDR="10.0.0.1"))
    assert argv[3:10] == ["--master_addr", "10.0.0.1", "--master_port", "29500", "--no_ssh",
                          "--node_rank", "1"]  # fmt: skip

    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-a\\ngpu-b\\n'\n")
    (stubs / "scontrol").chmod(0o755)
    argv = _dry(SLURM_SBATCH, tricky, path_prefix=stubs,
                env=dict(SLURM_JOB_ID=42, SLURM_JOB_NODELIST="gpu-[a-b]", SLURM_JOB_NUM_NODES=2,
                         SLURM_GPUS_ON_NODE=8))  # fmt: skip
    assert argv[0] == "srun" and argv[-1] == tricky
    joined = " ".join(argv[:-1])
    assert "--nnodes 2 --nproc_per_node 8" in joined and "--rdzv_endpoint gpu-a:29500" in joined
    assert "--rdzv_id 42" in joined and "-m turbolm train" in joined


def test_launch_scripts_reject_bad_environment(tmp_path):
    done = subprocess.run(["bash", str(TORCHRUN_SH)], capture_output=True, text=True,
                          env=_env(DRY_RUN=1, NNODES="two"), timeout=60)  # fmt: skip
    assert done.returncode == 2 and "NNODES" in done.stderr
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("a slots=1\nb slots=1\n")
    done = subprocess.run(["bash", str(DEEPSPEED_SH), str(hostfile)], capture_output=True,
                          text=True, env=_env(DRY_RUN=1, NODE_RANK=2), timeout=120)  # fmt: skip
    assert done.returncode == 2 and "NODE_RANK" in done.stderr


# ---------------------------------------------------------------------------- unit: configs


def _cfg(*extra):
    return load_config(None, ["train.batch_size=4", "train.grad_accum=2", "model.d_model=64",
                              "model.n_head=2", *extra])  # fmt: skip


def test_auto_values_are_filled_from_the_run_config():
    raw = read_ds_json(DS_CONFIGS / "zero3_offload.json")
    ds = resolve_ds_config(raw, _cfg("train.lr=3e-4", "train.grad_clip=0.5"), 8, "bf16")
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 4 * 2 * 8
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    params = ds["optimizer"]["params"]
    assert params["lr"] == 3e-4 and params["betas"] == [0.9, 0.95] and params["eps"] == 1e-8
    assert params["weight_decay"] == 0.1
    zero = ds["zero_optimization"]
    assert zero["reduce_bucket_size"] == 64 * 64
    assert zero["stage3_param_persistence_threshold"] == 640
    assert "auto" not in json.dumps(ds)
    for name in ("zero1", "zero2", "zero3"):
        ds = resolve_ds_config(read_ds_json(DS_CONFIGS / f"{name}.json"), _cfg(), 2, "fp32")
        assert ds["zero_optimization"]["stage"] == int(name[-1])
        assert "optimizer" not in ds  # turbolm's own AdamW is the client optimizer


@pytest.mark.parametrize(
    "raw, needle",
    [
        ({"zero_optimization": {"stage": 7}}, "does not exist"),
        ({"zero_optimization": {"stage": "2"}}, "must be 0, 1, 2 or 3"),
        ({"train_batch_size": 99}, "train_batch_size"),
        ({"gradient_clipping": 5.0}, "train.grad_clip"),
        ({"bf16": {"enabled": True}}, "bf16.enabled"),
        ({"scheduler": {"type": "WarmupLR"}}, "scheduler"),
        ({"optimizer": {"type": "Lamb"}}, "not supported"),
        ({"optimizer": {"type": "AdamW", "params": {"lr": 1.0}}}, "optimizer.params.lr"),
        ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, "stage >= 3"),
        ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "gpu"}}}, "device"),
        ({"zero_optimization": {"stage": 3, "sub_group_size": "auto"}}, "sub_group_size"),
        ({"fp16": []}, "'fp16' must be a JSON object"),
    ],
)
def test_ds_config_errors(raw, needle):
    with pytest.raises(ConfigError, match=None) as e:
        resolve_ds_config(raw, _cfg(), 2, "fp32")
    assert needle in str(e.value)


def test_read_ds_json_errors(tmp_path):
    p = tmp_path / "c.json"
    p.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        read_ds_json(p)
    p.write_text('{\n  "a": 1\n  "b": 2\n}')
    with pytest.raises(ConfigError, match="line 3"):
        read_ds_json(p)


def test_hostfile_parser(tmp_path):
    p = tmp_path / "h"
    p.write_text("# cluster\nworker-0 slots=8\n\nworker-1 slots=4 # spare\n")
    assert parse_hostfile(p) == [("worker-0", 8), ("worker-1", 4)]
    for text, needle in [
        ("a slots=2\na slots=2\n", "listed twice"),
        ("a slots=0\n", "slots must be >= 1"),
        ("a\n", "line 1"),
        ("# nothing\n", "no hosts"),
        ("a slots=2 extra\n", "line 1"),
    ]:
        p.write_text(text)
        with pytest.raises(ConfigError, match=needle):
            parse_hostfile(p)


def test_launch_env():
    assert launch_env({}).world_size == 1
    env = launch_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (env.rank, env.world_size, env.local_rank) == (3, 4, 1)
    slurm = {"SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "MASTER_ADDR": "n0"}
    env = launch_env(slurm)
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (5, 8, 1, "slurm")
    assert slurm["RANK"] == "5" and slurm["MASTER_PORT"] == "29500"
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        launch_env({"SLURM_NTASKS": "2", "SLURM_PROCID": "0"})
    with pytest.raises(ConfigError, match="rank"):
        launch_env({"RANK": "4", "WORLD_SIZE": "4"})
