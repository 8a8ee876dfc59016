"""Atomic checkpoints: round trips, rotation, incomplete/truncated/foreign checkpoints, kills
during writes, RNG state."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from turbolm.errors import CheckpointError, InputError
from turbolm.train.checkpoint import (
    COMPLETE_FILE,
    MODEL_FILE,
    find_latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model_weights,
    rng_state,
    save_checkpoint,
    set_rng_state,
    verify_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]
CONFIG = {"run": {"train": {"lr": 1e-3}}, "model": {"arch": "transformer", "vocab_size": 50}}


class TinyLM(nn.Module):
    """Embedding -> LayerNorm -> Linear head whose weight *is* the embedding (tied)."""

    def __init__(self, vocab: int = 50, d: int = 16):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, idx):
        return self.head(self.norm(self.emb(idx))) * self.scale


def trained(seed: int = 0) -> tuple[TinyLM, torch.optim.Optimizer, object]:
    """A TinyLM after two AdamW steps (so the optimizer has state) with a scheduler."""
    torch.manual_seed(seed)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for _ in range(2):
        idx = torch.randint(0, 50, (4, 8))
        loss = model(idx).logsumexp(-1).mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched


def assert_same(a, b, where="state"):
    """Exact, recursive equality of nested dicts/lists/tensors."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), where  # NaN == NaN here


def save_tiny(run: Path, step: int, keep: int = 2, **kw) -> Path:
    model, opt, sched = trained(step)
    state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step}
    return save_checkpoint(run, step, model.state_dict(), CONFIG, state, keep=keep, **kw)


# ------------------------------------------------------------------------------ round trip


def test_round_trip_model_optimizer_tied(tmp_path):
    model, opt, sched = trained()
    tok = tmp_path / "tokenizer.json"
    tok.write_text('{"model": "bpe"}')
    trainer_state = {
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": rng_state(),
        "data": {"pos": np.int64(123), "perm": np.arange(5, dtype=np.int64)},
        "step": 200,
        "best_val_loss": float("inf"),
        "patience": 1,
        "metrics": [{"step": 100, "val_loss": 3.5}],
    }
    path = save_checkpoint(
        tmp_path / "run", 200, model.state_dict(), CONFIG, trainer_state, tokenizer_path=tok
    )
    assert path == tmp_path / "run" / "checkpoints" / "step_00000200"
    names = sorted(p.name for p in path.iterdir())
    assert names == sorted(
        ["model.safetensors", "config.json", "tokenizer.json", "trainer_state.pt", "COMPLETE"]
    )
    assert (path / "tokenizer.json").read_text() == tok.read_text()

    ck = load_checkpoint(path)
    assert ck["step"] == 200 and ck["path"] == path
    assert ck["config"]["model"] == CONFIG["model"] and ck["config"]["run"] == CONFIG["run"]
    assert ck["config"]["step"] == 200 and "turbolm_version" in ck["config"]
    assert_same(model.state_dict(), ck["model_state"])
    # the tie is restored: both keys are the same tensor
    assert ck["model_state"]["head.weight"] is ck["model_state"]["emb.weight"]

    ts = ck["trainer_state"]
    assert_same(opt.state_dict(), ts["optimizer"])
    assert ts["scheduler"] == sched.state_dict()
    assert ts["data"]["pos"] == 123 and type(ts["data"]["pos"]) is int  # numpy scalar -> int
    assert torch.equal(ts["data"]["perm"], torch.arange(5))  # numpy array -> tensor
    assert ts["best_val_loss"] == float("inf") and ts["metrics"] == trainer_state["metrics"]

    # restore into fresh objects and compare exactly
    model2, opt2, sched2 = TinyLM(), None, None
    load_model_weights(model2, ck["model_state"])
    assert model2.head.weight is model2.emb.weight
    assert_same(model.state_dict(), model2.state_dict())
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    opt2.load_state_dict(ts["optimizer"])
    assert_same(opt.state_dict(), opt2.state_dict())
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0 / (1 + s))
    sched2.load_state_dict(ts["scheduler"])
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_run_folder_and_checkpoints_folder_resolve_to_latest(tmp_path):
    run = tmp_path / "run"
    for step in (10, 20):
        save_tiny(run, step)
    assert load_checkpoint(run)["step"] == 20
    assert load_checkpoint(run / "checkpoints")["step"] == 20
    assert load_checkpoint(str(run / "checkpoints" / "step_00000010"))["step"] == 10


def test_load_without_trainer_state_and_map_location(tmp_path):
    path = save_tiny(tmp_path / "run", 1)
    ck = load_checkpoint(path, map_location=torch.device("cpu"), load_trainer_state=False)
    assert ck["trainer_state"] is None and ck["model_state"]["emb.weight"].device.type == "cpu"


def test_shared_views_that_are_not_ties(tmp_path):
    big = torch.randn(6, 4)
    state = {"full": big, "slice": big[:2], "t": big.t(), "same": big, "empty": torch.empty(0)}
    path = save_checkpoint(tmp_path / "run", 1, state, CONFIG, {})
    loaded = load_checkpoint(path)["model_state"]
    assert_same({k: v.contiguous() for k, v in state.items()}, loaded)
    assert loaded["same"] is loaded["full"]  # identical views are re-tied
    assert loaded["slice"] is not loaded["full"]


def test_saving_does_not_modify_inputs(tmp_path):
    model, opt, _ = trained()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    save_checkpoint(tmp_path / "run", 1, model.state_dict(), CONFIG, {"opt": opt.state_dict()})
    assert_same(before, model.state_dict())


# ---------------------------------------------------------------------- rotation and replace


def test_keep_last_k(tmp_path):
    run = tmp_path / "run"
    for step in range(1, 6):
        save_tiny(run, step, keep=2)
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step_00000004", "step_00000005"]  # no hidden leftovers either
    assert [p.name for p in list_checkpoints(run)] == names
    save_tiny(run, 6, keep=1)
    assert [p.name for p in list_checkpoints(run)] == ["step_00000006"]


def test_current_checkpoint_is_never_rotated_away(tmp_path):
    run = tmp_path / "run"
    save_tiny(run, 10)
    path = save_tiny(run, 3, keep=1)  # a run resumed from an earlier point
    assert path.is_dir() and list_checkpoints(run) == [path]


def test_resaving_a_step_replaces_it(tmp_path):
    run = tmp_path / "run"
    save_checkpoint(run, 5, {"w": torch.zeros(3)}, CONFIG, {"v": 1})
    save_checkpoint(run, 5, {"w": torch.ones(3)}, CONFIG, {"v": 2})
    ck = load_checkpoint(run)
    assert torch.equal(ck["model_state"]["w"], torch.ones(3)) and ck["trainer_state"]["v"] == 2
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000005"]


def test_stale_tmp_folders_are_removed(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    stale = ckpts / ".tmp-step_00000007-999999999"  # a pid that cannot exist
    stale.mkdir(parents=True)
    (stale / MODEL_FILE).write_bytes(b"partial")
    save_tiny(tmp_path / "run", 1)
    assert not stale.exists()


# ----------------------------------------------------------------- incomplete and interrupted


def test_find_latest_ignores_incomplete(tmp_path):
    run = tmp_path / "run"
    assert find_latest_checkpoint(run) is None  # no folder at all
    good = save_tiny(run, 1)
    # a newer folder without the COMPLETE marker (killed write copied by hand, say)
    bad = run / "checkpoints" / "step_00000002"
    bad.mkdir()
    for f in good.iterdir():
        if f.name != COMPLETE_FILE:
            (bad / f.name).write_bytes(f.read_bytes())
    # an even newer tmp folder
    (run / "checkpoints" / ".tmp-step_00000003-1").mkdir()
    assert find_latest_checkpoint(run) == good
    assert load_checkpoint(run)["step"] == 1
    with pytest.raises(CheckpointError, match="incomplete checkpoint .*step_00000002"):
        load_checkpoint(bad)


def test_no_complete_checkpoint_in_run_folder(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000001").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no complete checkpoint in .*checkpoints"):
        load_checkpoint(run)
    assert find_latest_checkpoint(run) is None


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    import turbolm.train.checkpoint as ckmod

    run = tmp_path / "run"
    first = save_tiny(run, 1)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckmod, "_save_trainer_state", boom)
    with pytest.raises(OSError, match="disk full"):
        save_tiny(run, 2)
    assert [p.name for p in (run / "checkpoints").iterdir()] == [first.name]
    assert find_latest_checkpoint(run) == first


def test_trainer_state_must_be_weights_only_loadable(tmp_path):
    class Opaque:
        pass

    with pytest.raises(InputError, match=r"trainer_state\['data'\]\['obj'\].*weights_only"):
        save_checkpoint(
            tmp_path / "run", 1, {"w": torch.ones(1)}, CONFIG, {"data": {"obj": Opaque()}}
        )
    assert find_latest_checkpoint(tmp_path / "run") is None


def test_config_must_have_model_kwargs(tmp_path):
    with pytest.raises(InputError, match="'model'"):
        save_checkpoint(tmp_path / "run", 1, {"w": torch.ones(1)}, {"run": {}}, {})


def test_config_must_be_json(tmp_path):
    bad = {**CONFIG, "data_dir": Path("x")}
    with pytest.raises(InputError, match="JSON"):
        save_checkpoint(tmp_path / "run", 1, {"w": torch.ones(1)}, bad, {})
    assert not (tmp_path / "run").exists()  # nothing written


@pytest.mark.parametrize("step, keep", [(-1, 2), (1.5, 2), (1, 0)])
def test_bad_save_arguments(tmp_path, step, keep):
    with pytest.raises(InputError):
        save_checkpoint(tmp_path / "run", step, {"w": torch.ones(1)}, CONFIG, {}, keep=keep)


# ------------------------------------------------------------------ truncated and corrupted


def test_truncated_model_file(tmp_path):
    run = tmp_path / "run"
    older = save_tiny(run, 1)
    path = save_tiny(run, 2)
    model_file = path / MODEL_FILE
    with open(model_file, "r+b") as f:
        f.truncate(model_file.stat().st_size // 2)
    with pytest.raises(CheckpointError, match="model.safetensors is .* bytes.*truncated") as e:
        load_checkpoint(path)
    assert str(path) in str(e.value)
    assert find_latest_checkpoint(run) == older  # skipped, the older one is used


def test_corrupt_safetensors_header(tmp_path):
    path = save_tiny(tmp_path / "run", 1)
    model_file = path / MODEL_FILE
    data = bytearray(model_file.read_bytes())
    data[8:24] = b"\x00" * 16  # same size, garbage JSON header
    model_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt safetensors") as e:
        load_checkpoint(path)
    assert str(model_file) in str(e.value)


def test_hash_check_catches_same_size_corruption(tmp_path):
    path = save_tiny(tmp_path / "run", 1)
    model_file = path / MODEL_FILE
    data = bytearray(model_file.read_bytes())
    data[-1] ^= 0xFF  # inside tensor data: the header still parses
    model_file.write_bytes(bytes(data))
    load_checkpoint(path)  # sizes match: fast default check passes
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(path, check_hash=True)
    assert find_latest_checkpoint(tmp_path / "run", check_hash=True) is None
    with pytest.raises(CheckpointError, match="sha256"):
        verify_checkpoint(path, check_hash=True)


def test_corrupt_trainer_state(tmp_path):
    path = save_tiny(tmp_path / "run", 1)
    f = path / "trainer_state.pt"
    f.write_bytes(b"\x00" * f.stat().st_size)
    with pytest.raises(CheckpointError, match="cannot load trainer_state.pt"):
        load_checkpoint(path)
    assert load_checkpoint(path, load_trainer_state=False)["step"] == 1


def test_missing_listed_file(tmp_path):
    path = save_tiny(tmp_path / "run", 1)
    (path / "trainer_state.pt").unlink()
    with pytest.raises(CheckpointError, match="trainer_state.pt is missing"):
        load_checkpoint(path)


# --------------------------------------------------------------------------- foreign / paths


def test_foreign_checkpoint_without_marker(tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "hf_model"
    folder.mkdir()
    save_file({"w": torch.ones(2)}, str(folder / MODEL_FILE))
    (folder / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(CheckpointError, match="not written by turbolm") as e:
        load_checkpoint(folder)
    assert str(folder) in str(e.value)


def test_foreign_config_with_valid_marker(tmp_path):
    path = save_tiny(tmp_path / "run", 1)
    cfg = path / "config.json"
    text = json.dumps({"model_type": "gpt2"}).ljust(cfg.stat().st_size)  # keep the size
    cfg.write_text(text)
    with pytest.raises(CheckpointError, match="turbolm_version"):
        load_checkpoint(path)


def test_path_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist") as e:
        load_checkpoint(tmp_path / "missing")
    assert str(tmp_path / "missing") in str(e.value)
    a_file = tmp_path / "model.safetensors"
    a_file.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a file"):
        load_checkpoint(a_file)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="neither a checkpoint folder"):
        load_checkpoint(empty)


# ------------------------------------------------------------------------- load_model_weights


def test_load_model_weights_reports_mismatches():
    state = TinyLM().state_dict()
    state.pop("norm.bias")
    state["extra.weight"] = torch.zeros(1)
    state["norm.weight"] = torch.ones(7)
    with pytest.raises(CheckpointError) as e:
        load_model_weights(TinyLM(), state)
    msg = str(e.value)
    assert "missing key(s): norm.bias" in msg
    assert "unexpected key(s): extra.weight" in msg
    assert "norm.weight: checkpoint (7,) vs model (16,)" in msg


def test_load_model_weights_strips_compile_prefix():
    src = TinyLM()
    state = {f"_orig_mod.{k}": v for k, v in src.state_dict().items()}
    dst = TinyLM()
    load_model_weights(dst, state)
    assert_same(src.state_dict(), dst.state_dict())


# --------------------------------------------------------------------------------- RNG state


def draws() -> tuple:
    return (
        [random.random() for _ in range(3)],
        np.random.rand(3).tolist(),
        np.random.randn(1).tolist(),  # leaves a cached gaussian behind
        torch.rand(3).tolist(),
        random.gauss(0, 1),
    )


def test_rng_state_round_trip(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    draws()  # move away from the seeds; leave cached gaussians in the state
    state = rng_state()
    expected = draws()
    draws()
    set_rng_state(state)
    assert draws() == expected
    # through a checkpoint (torch.load with weights_only=True)
    path = save_checkpoint(tmp_path / "run", 1, {"w": torch.ones(1)}, CONFIG, {"rng": state})
    draws()
    set_rng_state(load_checkpoint(path)["trainer_state"]["rng"])
    assert draws() == expected


def test_malformed_rng_state():
    with pytest.raises(CheckpointError, match="malformed RNG state"):
        set_rng_state({"python": [3, [], None]})


# ------------------------------------------------------------------ killed during writes

CHILD = r"""
import sys
sys.path.insert(0, sys.argv[2])
from test_checkpoint import CONFIG, payload
from turbolm.train.checkpoint import find_latest_checkpoint, save_checkpoint

run = sys.argv[1]
latest = find_latest_checkpoint(run)
# Start by saving the latest step again: exercises replacing an existing folder.
step = int(latest.name[len("step_"):]) if latest else 1
print("ready", flush=True)
while True:
    model_state, trainer_state = payload(step)
    save_checkpoint(run, step, model_state, CONFIG, trainer_state, keep=2)
    step += 1
"""


def payload(step: int) -> tuple[dict, dict]:
    """Deterministic checkpoint content for ``step`` (~12 MB, so a save takes some ms)."""
    g = torch.Generator().manual_seed(step)
    emb = torch.randn(1024, 1024, generator=g)
    model_state = {"emb.weight": emb, "head.weight": emb, "w": torch.randn(512, 1024, generator=g)}
    trainer_state = {
        "step": step,
        "optimizer": {"exp_avg": torch.randn(1024, 1024, generator=g)},
        "data": {"pos": np.int64(step * 7)},
    }
    return model_state, trainer_state


def check_loads_as_saved(path: Path) -> None:
    step = int(path.name[len("step_") :])
    ck = load_checkpoint(path, check_hash=True)
    model_state, trainer_state = payload(step)
    trainer_state["data"]["pos"] = int(trainer_state["data"]["pos"])
    assert ck["step"] == step
    assert_same(model_state, ck["model_state"], f"{path} model")
    assert ck["model_state"]["head.weight"] is ck["model_state"]["emb.weight"]
    assert_same(trainer_state, ck["trainer_state"], f"{path} trainer state")


def test_kill_during_writes_never_leaves_a_bad_checkpoint(tmp_path):
    run = tmp_path / "run"
    rng = random.Random(20240601)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    hidden_seen = 0
    for kill in range(5):
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(run), str(Path(__file__).parent)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        try:
            line = proc.stdout.readline()
            assert line.strip() == b"ready", proc.stderr.read().decode()
            delay = rng.uniform(0.05, 0.6)
            time.sleep(delay)
            assert proc.poll() is None, proc.stderr.read().decode()  # still saving
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()

        ckpts = run / "checkpoints"
        hidden_seen += any(p.name.startswith(".") for p in ckpts.iterdir()) if ckpts.exists() else 0
        latest = find_latest_checkpoint(run)
        step_dirs = sorted(ckpts.glob("step_*")) if ckpts.exists() else []
        # Every folder under a final name is complete and holds exactly what was saved.
        for path in step_dirs:
            check_loads_as_saved(path)
        assert latest == (step_dirs[-1] if step_dirs else None), f"kill {kill} after {delay:.3f}s"
    assert find_latest_checkpoint(run) is not None  # the test saw real saves
    print(f"kills that left an interrupted save behind: {hidden_seen} of 5")
