"""Atomic checkpoints: a folder that exists under its final name is always complete.

Layout of a run folder::

    out_dir/checkpoints/step_00000200/
        model.safetensors   the model state dict (tied tensors stored once, re-tied on load)
        config.json         {"turbolm_version", "step", "model": build_model kwargs, ...caller's}
        tokenizer.json      copied from the prepared data (optional)
        trainer_state.pt    optimizer, scheduler, RNG, data loader, step, metrics (torch.save,
                            loadable with weights_only=True)
        COMPLETE            JSON: step, file list with size and sha256; written last

How a save stays atomic: everything is written into ``checkpoints/.tmp-step_XXXXXXXX-<pid>/``,
every file and the folder are fsynced, ``COMPLETE`` is written and fsynced, and only then is
the folder renamed to its final name (a rename within one file system is atomic) and the
parent fsynced. A process killed at any moment therefore leaves either no ``step_*`` folder
or a complete one, plus maybe a hidden ``.tmp-*`` folder that the next save deletes. Old
checkpoints are first renamed to hidden ``.del-*`` names and then deleted, so a kill during
rotation never leaves a half-deleted ``step_*`` folder either.

Readers still verify: ``COMPLETE`` must exist and every listed file must have the recorded
size (and, on request, sha256), which catches truncation and copies that went wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from collections import OrderedDict
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from turbolm.errors import CheckpointError, InputError

__all__ = [
    "save_checkpoint",
    "find_latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_model_weights",
    "verify_checkpoint",
    "rng_state",
    "set_rng_state",
]

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
TRAINER_FILE = "trainer_state.pt"
COMPLETE_FILE = "COMPLETE"
REQUIRED_FILES = (MODEL_FILE, CONFIG_FILE, TRAINER_FILE)
CHECKPOINTS_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_HIDDEN_DIR = re.compile(r"^\.(tmp|old|del)-.*-(\d+)$")  # .tmp-step_00000200-4242
_ALIASES_KEY = "turbolm_aliases"  # safetensors metadata: {"alias key": "stored key"}
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile / DDP wrappers add these


def _turbolm_version() -> str:
    """The installed turbolm version, recorded in every checkpoint."""
    try:
        import turbolm

        version = getattr(turbolm, "__version__", None)
        if version:
            return str(version)
    except ImportError:  # pragma: no cover - we are inside turbolm
        pass
    try:
        return dist_version("turbolm")
    except PackageNotFoundError:
        return "0+unknown"


def step_dir_name(step: int) -> str:
    """``step_00000200``: zero-padded so names sort like steps."""
    return f"step_{step:08d}"


# ---------------------------------------------------------------------------------------------
# Durable file writing
# ---------------------------------------------------------------------------------------------


def _fsync_path(path: Path) -> None:
    """Flush a file's data (or a folder's entries) to disk."""
    if os.name == "nt" and path.is_dir():  # Windows cannot open folders; NTFS journals renames
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: Path, obj: Any) -> None:
    _write_bytes(path, (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode("utf-8"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Model state <-> safetensors (with tied tensors)
# ---------------------------------------------------------------------------------------------


def _dedup_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Split a state dict into tensors to store and aliases.

    safetensors refuses tensors that share memory. Tensors that are the *same view* of the
    same storage (tied embeddings: ``lm_head.weight is tok_emb.weight``) are stored once and
    recorded as an alias, so loading can give both keys the same tensor again. Tensors that
    overlap in other ways (a slice of another) are copied: stored twice, not re-tied.
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen_views: dict[tuple, str] = {}
    seen_storages: set[tuple] = set()
    for key, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise InputError(f"model_state[{key!r}] is a {type(t).__name__}, not a tensor")
        t = t.detach()
        storage = (t.device, t.untyped_storage().data_ptr())
        view = (*storage, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() > 0 and view in seen_views:  # empty tensors may all sit at address 0
            aliases[key] = seen_views[view]
            continue
        t_cpu = t.cpu()
        owns_storage = t_cpu.untyped_storage().nbytes() == t_cpu.numel() * t_cpu.element_size()
        if storage in seen_storages or not owns_storage or not t_cpu.is_contiguous():
            t_cpu = t_cpu.clone(memory_format=torch.contiguous_format)
        seen_views[view] = key
        seen_storages.add(storage)
        tensors[key] = t_cpu
    return tensors, aliases


def _save_model_state(path: Path, state: dict[str, torch.Tensor]) -> None:
    tensors, aliases = _dedup_state(state)
    metadata = {"format": "pt", _ALIASES_KEY: json.dumps(aliases)}
    save_file(tensors, str(path), metadata=metadata)
    _fsync_path(path)


def _load_model_state(path: Path, map_location: str) -> dict[str, torch.Tensor]:
    """Read ``model.safetensors`` and re-tie aliased keys."""
    try:
        with safe_open(str(path), framework="pt", device=map_location) as f:
            metadata = f.metadata() or {}
            state = OrderedDict((k, f.get_tensor(k)) for k in f.keys())
    except Exception as e:  # safetensors raises its own error types (header, I/O)
        raise CheckpointError(f"{path}: corrupt safetensors file ({e})") from e
    try:
        aliases = json.loads(metadata.get(_ALIASES_KEY, "{}"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt '{_ALIASES_KEY}' metadata ({e})") from e
    for alias, source in aliases.items():
        if source not in state:
            raise CheckpointError(f"{path}: tied key {alias!r} refers to missing {source!r}")
        state[alias] = state[source]  # same tensor object: the tie survives
    return state


# ---------------------------------------------------------------------------------------------
# Trainer state (must load with torch.load(weights_only=True))
# ---------------------------------------------------------------------------------------------


def _plain(obj: Any, where: str) -> Any:
    """Convert ``obj`` to types ``torch.load(weights_only=True)`` accepts.

    numpy scalars become Python numbers and numpy arrays become tensors (data loaders like
    to keep ``np.int64`` positions); anything else unexpected is an error now rather than an
    unloadable checkpoint later.
    """
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return obj
    if isinstance(obj, (torch.Tensor, torch.Size, torch.dtype, torch.device)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj).copy())
    if isinstance(obj, dict):
        out = OrderedDict() if isinstance(obj, OrderedDict) else {}
        for k, v in obj.items():
            out[_plain(k, where)] = _plain(v, f"{where}[{k!r}]")
        return out
    if isinstance(obj, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    raise InputError(
        f"{where} is a {type(obj).__module__}.{type(obj).__name__}, which "
        "torch.load(weights_only=True) cannot read back; store tensors, numbers, strings, "
        "lists and dicts"
    )


def _save_trainer_state(path: Path, trainer_state: dict[str, Any]) -> None:
    with open(path, "wb") as f:
        torch.save(trainer_state, f)
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------


def _check_config(config: dict[str, Any]) -> None:
    if not isinstance(config, dict):
        raise InputError(f"config must be a dict, got {type(config).__name__}")
    model = config.get("model")
    if not isinstance(model, dict) or "arch" not in model:
        raise InputError(
            "config must contain 'model': the build_model kwargs (a dict with 'arch'), "
            "e.g. {'run': config_to_dict(cfg), 'model': model_kwargs(cfg.model, vocab_size)}"
        )
    try:  # fail before writing anything, not halfway through the save
        json.dumps(config, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InputError(f"config must be JSON-serialisable (no NaN/inf): {e}") from e


def _write_files(
    folder: Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    config: dict[str, Any],
    trainer_state: dict[str, Any],
    tokenizer_path: str | Path | None,
) -> None:
    """Write every checkpoint file into ``folder`` (fsynced), ``COMPLETE`` last."""
    _save_model_state(folder / MODEL_FILE, model_state)
    meta = {**config, "turbolm_version": _turbolm_version(), "step": step}
    _write_json(folder / CONFIG_FILE, meta)
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, folder / TOKENIZER_FILE)
        _fsync_path(folder / TOKENIZER_FILE)
    _save_trainer_state(folder / TRAINER_FILE, trainer_state)
    files = {}
    for p in sorted(folder.iterdir()):
        files[p.name] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    complete = {
        "format": FORMAT_VERSION,
        "step": step,
        "turbolm_version": meta["turbolm_version"],
        "created": time.time(),
        "files": files,
    }
    _write_json(folder / COMPLETE_FILE, complete)
    _fsync_path(folder)


def _install(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` folder to ``final``, replacing an existing one safely.

    ``os.rename`` cannot replace a non-empty folder, so an old folder of the same name (a
    resumed run saving the same step again) is first moved aside to a hidden name. A kill
    between the two renames leaves the older checkpoints as the latest, never a partial one.
    """
    parent = final.parent
    aside = None
    if final.exists():
        aside = parent / f".old-{final.name}-{os.getpid()}"
        _remove_tree(aside)
        os.rename(final, aside)
    os.rename(tmp, final)
    _fsync_path(parent)
    if aside is not None:
        _remove_tree(aside)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    config: dict[str, Any],
    trainer_state: dict[str, Any],
    tokenizer_path: str | Path | None = None,
    keep: int = 2,
) -> Path:
    """Atomically write ``run_dir/checkpoints/step_XXXXXXXX/`` and return its path.

    ``config`` is stored as ``config.json`` and must hold ``"model"`` (the ``build_model``
    kwargs); the convention is ``{"run": config_to_dict(cfg), "model": model_kwargs(...)}``.
    ``turbolm_version`` and ``step`` are added. ``trainer_state`` must consist of tensors,
    numbers, strings, lists and dicts (numpy scalars/arrays are converted). Afterwards only
    the ``keep`` newest complete checkpoints (always including this one) are kept, and
    leftovers of interrupted saves are deleted.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise InputError(f"step must be an integer >= 0, got {step!r}")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise InputError(f"keep must be an integer >= 1, got {keep!r}")
    if tokenizer_path is not None and not Path(tokenizer_path).is_file():
        raise InputError(f"tokenizer_path {str(tokenizer_path)!r} is not a file")
    _check_config(config)
    trainer_state = _plain(trainer_state, "trainer_state")

    ckpt_dir = Path(run_dir) / CHECKPOINTS_DIR
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / step_dir_name(step)
    tmp = ckpt_dir / f".tmp-{final.name}-{os.getpid()}"
    _remove_tree(tmp)  # a leftover of an earlier failed save by this same pid
    tmp.mkdir()
    try:
        _write_files(tmp, step, model_state, config, trainer_state, tokenizer_path)
    except BaseException:
        _remove_tree(tmp)  # e.g. disk full: leave nothing behind
        raise
    _install(tmp, final)
    _rotate(ckpt_dir, keep=keep, current=final)
    _remove_stale(ckpt_dir)
    return final


# ---------------------------------------------------------------------------------------------
# Listing, verifying, rotating
# ---------------------------------------------------------------------------------------------


def _step_dirs(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``step_*`` folder, newest step first."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found, key=lambda sp: sp[0], reverse=True)


def _read_complete(path: Path) -> dict[str, Any]:
    """Parse ``COMPLETE``; ``CheckpointError`` when it is missing or malformed."""
    marker = path / COMPLETE_FILE
    if not marker.is_file():
        raise CheckpointError(
            f"incomplete checkpoint {path}: no {COMPLETE_FILE} marker "
            "(the write was interrupted or the folder is not a turbolm checkpoint)"
        )
    try:
        complete = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}: unreadable {COMPLETE_FILE} marker ({e})") from e
    files = complete.get("files") if isinstance(complete, dict) else None
    if not isinstance(files, dict):
        raise CheckpointError(f"checkpoint {path}: {COMPLETE_FILE} marker has no file list")
    return complete


def verify_checkpoint(path: str | Path, check_hash: bool = False) -> dict[str, Any]:
    """Check a checkpoint folder against its ``COMPLETE`` marker and return the marker.

    Sizes are always checked (cheap, catches truncation); sha256 only with ``check_hash``
    (reads every byte). Raises ``CheckpointError`` saying what is wrong.
    """
    path = Path(path)
    complete = _read_complete(path)
    files = complete["files"]
    for name in REQUIRED_FILES:
        if name not in files:
            raise CheckpointError(f"checkpoint {path}: {COMPLETE_FILE} does not list {name}")
    for name, info in files.items():
        if not isinstance(info, dict):
            raise CheckpointError(f"checkpoint {path}: malformed {COMPLETE_FILE} entry {name!r}")
        p = path / name
        if not p.is_file():
            raise CheckpointError(f"checkpoint {path}: {name} is missing")
        size = p.stat().st_size
        if size != info.get("size"):
            raise CheckpointError(
                f"checkpoint {path}: {name} is {size} bytes but {COMPLETE_FILE} recorded "
                f"{info.get('size')} (truncated or modified)"
            )
        if check_hash and _sha256(p) != info.get("sha256"):
            raise CheckpointError(
                f"checkpoint {path}: {name} does not match its recorded sha256 (corrupted)"
            )
    return complete


def _is_complete(path: Path, check_hash: bool = False) -> bool:
    try:
        verify_checkpoint(path, check_hash=check_hash)
    except CheckpointError:
        return False
    return True


def list_checkpoints(run_dir: str | Path, check_hash: bool = False) -> list[Path]:
    """Complete checkpoints of a run folder, oldest step first."""
    dirs = _step_dirs(Path(run_dir) / CHECKPOINTS_DIR)
    return [p for _, p in reversed(dirs) if _is_complete(p, check_hash)]


def find_latest_checkpoint(run_dir: str | Path, check_hash: bool = False) -> Path | None:
    """The complete checkpoint with the highest step in ``run_dir/checkpoints``, or None.

    Hidden ``.tmp-*`` folders and folders whose ``COMPLETE`` marker is missing or does not
    match the files (sizes; sha256 too with ``check_hash``) are skipped.
    """
    for _, p in _step_dirs(Path(run_dir) / CHECKPOINTS_DIR):
        if _is_complete(p, check_hash):
            return p
    return None


def _remove_tree(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)


def _delete_checkpoint(path: Path) -> None:
    """Rename to a hidden name first (atomic), then delete: never a half-deleted step_*."""
    doomed = path.parent / f".del-{path.name}-{os.getpid()}"
    _remove_tree(doomed)
    os.rename(path, doomed)
    _fsync_path(path.parent)
    _remove_tree(doomed)


def _rotate(ckpt_dir: Path, keep: int, current: Path) -> None:
    """Delete complete checkpoints beyond the ``keep`` newest; ``current`` always stays."""
    others = [p for _, p in _step_dirs(ckpt_dir) if p != current and _is_complete(p)]
    for p in others[keep - 1 :]:
        _delete_checkpoint(p)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers: this process is past them
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (owned by someone else) or cannot tell: leave it
    return True


def _remove_stale(ckpt_dir: Path) -> None:
    """Delete hidden leftovers (``.tmp-*``, ``.old-*``, ``.del-*``) of dead processes."""
    for p in ckpt_dir.iterdir():
        m = _HIDDEN_DIR.match(p.name)
        if m and p.is_dir() and not _pid_alive(int(m.group(2))):
            _remove_tree(p)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _resolve_checkpoint(path: Path, check_hash: bool) -> Path:
    """A checkpoint folder for ``path``: itself, or the latest complete one of a run folder
    (``run/``) or of a checkpoints folder (``run/checkpoints/``)."""
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint path {path} is a file; give a checkpoint folder "
            f"(…/{CHECKPOINTS_DIR}/step_XXXXXXXX) or a run folder"
        )
    if (path / COMPLETE_FILE).exists() or (path / CONFIG_FILE).exists():
        return path
    if _STEP_DIR.match(path.name):
        return path  # a step folder without marker: verification will say it is incomplete
    ckpt_dir = path / CHECKPOINTS_DIR if (path / CHECKPOINTS_DIR).is_dir() else path
    steps = _step_dirs(ckpt_dir)
    if not steps and ckpt_dir is path:
        raise CheckpointError(
            f"{path} is neither a checkpoint folder (no {COMPLETE_FILE}) nor a run folder "
            f"(no {CHECKPOINTS_DIR}/ subfolder)"
        )
    for _, p in steps:
        if _is_complete(p, check_hash):
            return p
    incomplete = ", ".join(p.name for _, p in steps[:5]) or "none at all"
    raise CheckpointError(f"no complete checkpoint in {ckpt_dir} (step folders: {incomplete})")


def _is_ours(config: Any) -> bool:
    return isinstance(config, dict) and "turbolm_version" in config and "model" in config


def _foreign(path: Path) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} was not written by turbolm: {CONFIG_FILE} lacks the "
        "'turbolm_version' and 'model' keys (a foreign checkpoint?)"
    )


def _read_config(path: Path) -> dict[str, Any]:
    """Read ``config.json`` and make sure turbolm wrote it."""
    p = path / CONFIG_FILE
    try:
        config = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path}: {CONFIG_FILE} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}: unreadable {CONFIG_FILE} ({e})") from e
    if not _is_ours(config):
        raise _foreign(path)
    return config


def _check_foreign(path: Path) -> None:
    """Before blaming a missing marker, say so if the folder is someone else's checkpoint
    (e.g. a Hugging Face folder with its own config.json)."""
    try:
        config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return  # no readable config: the missing marker is the better message
    if not _is_ours(config):
        raise _foreign(path)


def _load_trainer_state(path: Path, map_location: Any) -> dict[str, Any]:
    p = path / TRAINER_FILE
    try:
        return torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        raise CheckpointError(f"checkpoint {path}: cannot load {TRAINER_FILE} ({e})") from e


def load_checkpoint(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    load_trainer_state: bool = True,
    check_hash: bool = False,
) -> dict[str, Any]:
    """Load a checkpoint folder, or the latest complete checkpoint of a run folder.

    Returns ``{"model_state", "config", "trainer_state" (None unless requested), "step",
    "path"}``. Every problem (missing path, incomplete or truncated checkpoint, corrupt
    file, foreign checkpoint) raises ``CheckpointError`` naming the path.
    """
    ckpt = _resolve_checkpoint(Path(path), check_hash)
    if not (ckpt / COMPLETE_FILE).exists():
        _check_foreign(ckpt)
    complete = verify_checkpoint(ckpt, check_hash=check_hash)
    config = _read_config(ckpt)
    device = str(map_location) if isinstance(map_location, torch.device) else map_location
    model_state = _load_model_state(ckpt / MODEL_FILE, device)
    trainer_state = _load_trainer_state(ckpt, map_location) if load_trainer_state else None
    return {
        "model_state": model_state,
        "config": config,
        "trainer_state": trainer_state,
        "step": int(complete.get("step", config.get("step", -1))),
        "path": ckpt,
    }


def _adapt_prefixes(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes (``_orig_mod.`` from torch.compile, ``module.`` from DDP) when
    the checkpoint has them and the model does not."""
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            if not any(k.startswith(prefix) for k in expected):
                state = OrderedDict((k[len(prefix) :], v) for k, v in state.items())
    return state


def _first(items: list[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", … ({len(items) - n} more)" if len(items) > n else "")


def load_model_weights(model: torch.nn.Module, model_state: dict[str, torch.Tensor]) -> None:
    """``model.load_state_dict(model_state, strict=True)`` with a readable error.

    Raises ``CheckpointError`` listing (the first few) missing keys, unexpected keys and
    shape mismatches when the checkpoint does not fit the model.
    """
    expected = model.state_dict()
    state = _adapt_prefixes(dict(model_state), set(expected))
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_first(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_first(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): {_first(shapes)}")
    if problems:
        raise CheckpointError(
            f"checkpoint does not fit {type(model).__name__}: " + "; ".join(problems)
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"cannot load weights into {type(model).__name__}: {e}") from e


# ---------------------------------------------------------------------------------------------
# RNG state
# ---------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Python ``random``, numpy's global RNG, torch CPU and CUDA (if available) states, as
    plain lists/numbers/tensors that ``torch.load(weights_only=True)`` reads back."""
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss_next],
        "numpy": {
            "name": str(name),
            "keys": [int(k) for k in keys],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": None,
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state()`` returned. CUDA states are restored for the devices present
    (a run resumed on CPU or on fewer GPUs keeps going)."""
    try:
        version, internal, gauss_next = state["python"]
        random.setstate((int(version), tuple(int(x) for x in internal), gauss_next))
        np_state = state["numpy"]
        np.random.set_state(
            (
                np_state["name"],
                np.asarray(np_state["keys"], dtype=np.uint32),
                int(np_state["pos"]),
                int(np_state["has_gauss"]),
                float(np_state["cached_gaussian"]),
            )
        )
        # set_rng_state wants a CPU ByteTensor; map_location may have moved it.
        torch.set_rng_state(torch.as_tensor(state["torch"]).cpu().to(torch.uint8))
        cuda_states = state.get("cuda")
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"malformed RNG state in checkpoint ({e!r})") from e
    if cuda_states and torch.cuda.is_available():
        for i, s in enumerate(cuda_states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(torch.as_tensor(s).cpu().to(torch.uint8), device=i)
