"""The C++/CUDA extension (``csrc/``): build, cache, load, status.

The extension holds the ``cpu`` and ``cuda`` backends' kernels, registered with PyTorch's
dispatcher as ``torch.ops.turbolm.*`` (``TORCH_LIBRARY_FRAGMENT`` / ``TORCH_LIBRARY_IMPL``),
plus a small pybind11 module with :func:`build_info`.

Where it comes from, first match wins:

1. an ahead-of-time build, ``turbolm._C`` (``TURBOLM_BUILD_EXT=1 pip install
   --no-build-isolation .``, see ``setup.py``), unless it was built from other sources than
   the ``csrc/`` next to this package or ``TURBOLM_EXT_JIT=1``;
2. a just-in-time build with ninja (``torch.utils.cpp_extension.load``), cached in
   ``$TURBOLM_EXT_DIR/<tag>`` (default ``~/.cache/turbolm/ext/<tag>``), where ``<tag>`` names
   the torch version, Python version, ``cuda<version>`` or ``cpu``, the CPU level
   (``avx2`` or ``base``, see :func:`cpu_level`) and, with ``TURBOLM_EXT_OPS``, the families. A file lock makes
   concurrent processes build once; one line on stderr says it is building. A stamp file
   (hash of the sources and flags) lets later processes import the library without running
   the compiler or ninja.

The CUDA sources are compiled when nvcc is found (``$CUDA_HOME``, ``/usr/local/cuda``, or
``nvcc`` on ``PATH``) and torch is a CUDA build; ``TURBOLM_EXT_CUDA=0/1`` forces the choice.
Architectures: ``TURBOLM_CUDA_ARCHS`` or ``TORCH_CUDA_ARCH_LIST``, else the visible GPUs',
else ``8.0;9.0``. ``MAX_JOBS`` limits the parallel compile jobs (torch reads it). Every op-family
folder of ``csrc/`` (``norm``, ``rnn`` ...) goes into the one extension; ``TURBOLM_EXT_OPS=norm``
compiles only the named families (e.g. while another family's sources are being written).

Nothing here builds at import time. :func:`load_extension` builds on first use and returns
the module, or None when the build fails: :func:`extension_status` then gives a readable
one-line reason, and the ``torch`` / ``reference`` backends keep working.

``python -m turbolm.ext`` builds (if needed) and prints the status and build info as JSON.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

# Only the standard library at import time: setup.py loads this file on its own (before
# turbolm is importable) to share the source list and flags.

EXT_NAME = "turbolm_ext"
AOT_MODULE = "turbolm._C"
BUILD_MESSAGE = "turbolm: building the C++/CUDA extension (first use, ~1 min)..."
DEFAULT_CUDA_ARCHS = "8.0;9.0"
_SOURCE_SUFFIXES = (".h", ".cuh", ".hpp", ".cpp", ".cu")

_lock = threading.RLock()
_module: ModuleType | None = None
_origin: str = ""  # where the loaded module came from (for extension_status)
_failure: str | None = None  # why loading failed; not retried in this process
_fakes_registered = False
_built_cache: bool | None = None


# ---- configuration ---------------------------------------------------------------------------


def csrc_dir() -> Path:
    """The C++/CUDA sources: ``$TURBOLM_CSRC`` or the ``csrc/`` of this source checkout."""
    env = os.environ.get("TURBOLM_CSRC")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "csrc"


def cuda_home() -> str | None:
    """The CUDA toolkit folder holding ``bin/nvcc``, or None."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").exists():
            return home
    if Path("/usr/local/cuda/bin/nvcc").exists():
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = Path(nvcc).resolve().parent.parent
        if (home / "include" / "cuda_runtime_api.h").exists():
            return str(home)
    return None


def cuda_choice() -> tuple[bool, str]:
    """(compile the CUDA sources?, why / why not)."""
    import torch

    force = os.environ.get("TURBOLM_EXT_CUDA", "").strip()
    if force == "0":
        return False, "TURBOLM_EXT_CUDA=0"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is not a CUDA build"
    home = cuda_home()
    if home is None:
        return False, "nvcc not found (set CUDA_HOME to the CUDA toolkit folder)"
    return True, f"nvcc in {home}"


def cuda_archs() -> str | None:
    """The TORCH_CUDA_ARCH_LIST to build with; None means the visible GPUs' (torch's default)."""
    import torch

    archs = os.environ.get("TURBOLM_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST")
    if archs:
        return archs
    if torch.cuda.is_available():
        return None
    return DEFAULT_CUDA_ARCHS


_CPU_LEVELS = {"avx2": ["-mavx2", "-mfma", "-mf16c"], "base": []}


def cpu_level() -> str:
    """Instruction-set level of the CPU kernels: ``avx2`` (AVX2 + FMA + F16C, whose fp16
    conversions are ~5x faster) when this machine has them, else ``base`` (x86-64 / the
    compiler's default). ``TURBOLM_CPU_LEVEL=base|avx2`` overrides; the level is part of the
    cache folder's name, so a shared cache never hands an AVX2 build to an older CPU."""
    forced = os.environ.get("TURBOLM_CPU_LEVEL", "").strip()
    if forced in _CPU_LEVELS:
        return forced
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next(
                (ln.split(":", 1)[1].split() for ln in handle if ln.startswith("flags")), []
            )
    except OSError:
        flags = []
    return "avx2" if {"avx2", "fma", "f16c"} <= set(flags) else "base"


def build_tag(with_cuda: bool) -> str:
    import torch

    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    device = f"cuda{torch.version.cuda}" if with_cuda else "cpu"
    tag = f"torch{torch.__version__}-{py}-{device}-{cpu_level()}"
    if os.environ.get("TURBOLM_EXT_OPS", "").strip():  # a partial build gets its own folder
        tag += "-" + "+".join(op_families())
    return tag


def build_dir(with_cuda: bool) -> Path:
    """Cache folder of the just-in-time build: ``$TURBOLM_EXT_DIR/<tag>``."""
    root = os.environ.get("TURBOLM_EXT_DIR")
    if root:
        base = Path(root).expanduser()
    else:
        cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        base = Path(cache) / "turbolm" / "ext"
    return base / build_tag(with_cuda)


def op_families() -> list[str]:
    """The op-family folders of ``csrc/`` to compile: all of them (``common`` aside), or the
    comma-separated list in ``TURBOLM_EXT_OPS`` (e.g. ``norm``)."""
    root = csrc_dir()
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != "common")
    wanted = os.environ.get("TURBOLM_EXT_OPS", "").strip()
    if not wanted:
        return found
    names = [w.strip() for w in wanted.split(",") if w.strip()]
    missing = [w for w in names if w not in found]
    if missing:
        raise FileNotFoundError(
            f"TURBOLM_EXT_OPS names unknown op folders {missing}; found {found}"
        )
    return names


def build_config(with_cuda: bool) -> dict:
    """Sources and flags of the extension (shared with ``setup.py``): ``csrc/turbolm.cpp``,
    ``csrc/common/`` and every selected op family's ``*.cpp`` (and ``*.cu`` with CUDA)."""
    root = csrc_dir()
    folders = [root / "common"] + [root / f for f in op_families()]
    cpp = [str(root / "turbolm.cpp")] + [str(p) for d in folders for p in sorted(d.glob("*.cpp"))]
    cu = [str(p) for d in folders for p in sorted(d.glob("*.cu"))] if with_cuda else []
    define = ["-DTURBOLM_WITH_CUDA"] if with_cuda else []
    # Only csrc/turbolm.cpp reads the family list, and nvcc would split a -D value at its
    # commas (defining `rnn` etc. as macros), so it goes to the C++ compiler alone.
    families = f"-DTURBOLM_OP_FAMILIES={','.join(op_families())}"
    return {
        "sources": cpp + cu,
        # -ffp-contract=off: no compiler-chosen FMA fusions, so a value computed twice rounds
        # the same both times (LayerNorm's dx of a zero-variance row is then exactly 0, not
        # rstd times a rounding error) and results do not depend on the compiler's choices.
        "cflags": [
            "-O3",
            "-fopenmp",
            "-ffp-contract=off",
            *_CPU_LEVELS[cpu_level()],
            *define,
            families,
        ],
        "cuda_cflags": ["-O3", "-lineinfo", *define],
        "ldflags": ["-fopenmp"],
        "include_dirs": [str(root)],
    }


def sources_digest() -> str:
    """Hash of the sources and headers compiled (``csrc/`` top level, ``common/`` and the
    selected op families); an ahead-of-time build records it to detect that it is stale."""
    digest = hashlib.sha256()
    _hash_sources(digest)
    return digest.hexdigest()[:16]


def source_hash(with_cuda: bool) -> str:
    """:func:`sources_digest` plus the build flags and CUDA archs (the JIT cache's key)."""
    digest = hashlib.sha256()
    _hash_sources(digest)
    config = build_config(with_cuda)
    extra = {k: v for k, v in config.items() if k not in ("sources", "include_dirs")}
    digest.update(json.dumps([extra, with_cuda, cuda_archs() if with_cuda else None]).encode())
    return digest.hexdigest()[:16]


def _hash_sources(digest) -> None:
    root = csrc_dir()
    folders = {"common", *op_families()}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if len(rel.parts) > 1 and rel.parts[0] not in folders:
            continue
        if path.suffix in _SOURCE_SUFFIXES and path.is_file():
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())


# ---- loading ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock across processes (released by the OS if the holder dies)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _cpp_extension() -> ModuleType:
    """``torch.utils.cpp_extension``, imported without its "No CUDA runtime is found" warning:
    nvcc without a GPU is an expected setup here (the CUDA sources compile, they do not run),
    and the warning would land in the middle of `turbolm generate`'s output."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension as cpp_ext
    finally:
        log.setLevel(level)
    return cpp_ext


@contextlib.contextmanager
def _build_env(with_cuda: bool) -> Iterator[None]:
    """CUDA_HOME and TORCH_CUDA_ARCH_LIST for torch's builder, restored afterwards."""
    cpp_ext = _cpp_extension()

    saved_env = {k: os.environ.get(k) for k in ("CUDA_HOME", "TORCH_CUDA_ARCH_LIST")}
    saved_home = cpp_ext.CUDA_HOME
    try:
        if with_cuda:
            home = cuda_home()
            os.environ["CUDA_HOME"] = home
            cpp_ext.CUDA_HOME = home  # torch resolved it at import, maybe to a wrapper's folder
            archs = cuda_archs()
            if archs is not None:
                os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        yield
    finally:
        cpp_ext.CUDA_HOME = saved_home
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _import_library(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, str(path))
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stamp(bdir: Path) -> dict:
    try:
        return json.loads((bdir / "stamp.json").read_text())
    except (OSError, ValueError):
        return {}


def _jit_library(with_cuda: bool) -> Path | None:
    """The cached JIT library if it was built from the current sources, else None."""
    bdir = build_dir(with_cuda)
    library = bdir / f"{EXT_NAME}.so"
    if library.exists() and _stamp(bdir).get("hash") == source_hash(with_cuda):
        return library
    return None


def _aot_module() -> ModuleType | None:
    """The ahead-of-time build if present, from these sources, and not overridden."""
    if os.environ.get("TURBOLM_EXT_JIT") == "1":
        return None
    try:
        if importlib.util.find_spec(AOT_MODULE) is None:
            return None
    except (ImportError, ValueError):
        return None
    module = importlib.import_module(AOT_MODULE)
    built_from = module.build_info().get("source_hash")
    if csrc_dir().is_dir() and built_from and built_from != sources_digest():
        print(
            "turbolm: the prebuilt extension (turbolm._C) is older than csrc/; using a "
            "just-in-time build instead",
            file=sys.stderr,
        )
        return None
    return module


def _summarize_failure(exc: BaseException, log: Path | None) -> str:
    """One readable line: the first compiler error, else the exception's first line."""
    text = str(exc)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    picked = next((ln for ln in lines if re.search(r"\berror\b:|\bfatal\b", ln, re.I)), None)
    picked = picked or next((ln for ln in lines if re.search(r"\berror\b", ln, re.I)), None)
    picked = picked or (lines[0] if lines else type(exc).__name__)
    picked = re.sub(r"\s+", " ", picked)[:300]
    where = f" (full log: {log})" if log is not None else ""
    return f"{type(exc).__name__}: {picked}{where}"


def _jit_build(with_cuda: bool) -> ModuleType:
    cpp_ext = _cpp_extension()

    bdir = build_dir(with_cuda)
    bdir.mkdir(parents=True, exist_ok=True)
    with _file_lock(bdir / "turbolm.lock"):
        library = _jit_library(with_cuda)
        if library is not None:  # built already (perhaps by another process meanwhile)
            return _import_library(library, EXT_NAME)
        if not csrc_dir().is_dir():
            raise FileNotFoundError(
                f"C++ sources not found at {csrc_dir()}; use a source checkout, set "
                "TURBOLM_CSRC, or build ahead of time (TURBOLM_BUILD_EXT=1)"
            )
        config = build_config(with_cuda)
        print(BUILD_MESSAGE, end="", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            with _build_env(with_cuda):
                module = cpp_ext.load(
                    name=EXT_NAME,
                    sources=config["sources"],
                    extra_cflags=config["cflags"],
                    extra_cuda_cflags=config["cuda_cflags"],
                    extra_ldflags=config["ldflags"],
                    extra_include_paths=config["include_dirs"],
                    build_directory=str(bdir),
                    with_cuda=with_cuda,
                    verbose=False,
                )
        except BaseException as exc:
            print(" failed", file=sys.stderr, flush=True)
            log = bdir / "build.log"
            with contextlib.suppress(OSError):
                log.write_text(str(exc))
            raise RuntimeError(_summarize_failure(exc, log)) from exc
        seconds = time.perf_counter() - start
        print(f" done in {seconds:.0f} s", file=sys.stderr, flush=True)
        stamp = {
            "hash": source_hash(with_cuda),
            "cuda": with_cuda,
            "cuda_archs": cuda_archs() if with_cuda else None,
            "build_seconds": round(seconds, 1),
            "built_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        (bdir / "stamp.json").write_text(json.dumps(stamp, indent=1))
        return module


def load_extension() -> ModuleType | None:
    """The extension module, building it on first use; None if it cannot be built or loaded
    (then :func:`extension_status` says why). Never retried within a process after failing."""
    global _module, _origin, _failure
    if _module is not None or _failure is not None:
        return _module
    with _lock:
        if _module is not None or _failure is not None:
            return _module
        try:
            module = _aot_module()
            origin = f"ahead-of-time build {AOT_MODULE}"
            if module is None:
                with_cuda, why = cuda_choice()
                if os.environ.get("TURBOLM_EXT_CUDA", "").strip() == "1" and not with_cuda:
                    raise RuntimeError(
                        f"TURBOLM_EXT_CUDA=1 but the CUDA part cannot be built: {why}"
                    )
                module = _jit_build(with_cuda)
                origin = f"just-in-time build in {build_dir(with_cuda)}"
            _register_fakes()
            _module, _origin = module, origin
        except Exception as exc:  # a failed build must not break the other backends
            reason = str(exc) if isinstance(exc, RuntimeError) else _summarize_failure(exc, None)
            _failure = reason.splitlines()[0] if reason else type(exc).__name__
    return _module


def is_built() -> bool:
    """True when the extension is loaded or loadable without compiling (cheap; cached)."""
    global _built_cache
    if _module is not None:
        return True
    if _failure is not None:
        return False
    if _built_cache is None:
        try:
            aot = os.environ.get("TURBOLM_EXT_JIT") != "1" and (
                importlib.util.find_spec(AOT_MODULE) is not None
            )
            _built_cache = bool(aot) or _jit_library(cuda_choice()[0]) is not None
        except Exception:
            _built_cache = False
    return _built_cache


def extension_status(build: bool = True) -> tuple[bool, str]:
    """(usable, one-line reason). ``build=False`` reports without building or loading."""
    if build:
        load_extension()
    if _module is not None:
        parts = "cpu+cuda" if _module.build_info()["cuda"] else "cpu"
        return True, f"loaded ({parts}) from {_origin}"
    if _failure is not None:
        return False, _failure
    if is_built():
        return True, "built, not loaded yet"
    return False, "not built yet (it builds on first use of the cpu/cuda backends)"


def build_info() -> dict | None:
    """What the loaded build contains (cpu / cuda parts, versions), plus the JIT stamp."""
    module = load_extension()
    if module is None:
        return None
    info = dict(module.build_info())
    info["origin"] = _origin
    if _origin.startswith("just-in-time"):
        stamp = _stamp(build_dir(bool(info["cuda"])))
        info["build_seconds"] = stamp.get("build_seconds")
        info["source_hash"] = stamp.get("hash")
    return info


def has_cuda_kernels() -> bool:
    module = load_extension()
    return module is not None and bool(module.build_info()["cuda"])


def reset_for_tests() -> None:
    """Forget a cached failure / is_built() answer (the loaded library stays loaded)."""
    global _failure, _built_cache
    _failure, _built_cache = None, None


# ---- calling the ops --------------------------------------------------------------------------

_TAGGED = re.compile(r"\[turbolm\.(\w+)\]\s*([^\n]*)")


def ops():
    """``torch.ops.turbolm``, building the extension if needed; BackendError if it cannot."""
    import torch

    from turbolm import errors

    if load_extension() is None:
        raise errors.BackendError(f"the turbolm C++ extension is not available: {_failure}")
    return torch.ops.turbolm


def call(op: Callable, *args):
    """Call a ``torch.ops.turbolm`` op, turning its tagged C++ errors into turbolm.errors."""
    from turbolm import errors

    try:
        return op(*args)
    except (RuntimeError, ValueError, TypeError) as exc:
        match = _TAGGED.search(str(exc))
        if match is None:
            raise
        cls = getattr(errors, match.group(1), None)
        if not (isinstance(cls, type) and issubclass(cls, errors.TurboLMError)):
            cls = errors.InputError
        raise cls(match.group(2).strip()) from None


def _register_fakes() -> None:
    """Shape/dtype-only twins of the norm ops for torch.compile and FakeTensor (opcheck).
    (Other op families register theirs the same way once :func:`load_extension` succeeded.)"""
    global _fakes_registered
    import torch

    if _fakes_registered or not hasattr(torch.ops.turbolm, "layer_norm_fwd"):
        return

    def stat(x):
        return torch.float64 if x.dtype == torch.float64 else torch.float32

    @torch.library.register_fake("turbolm::layer_norm_fwd")
    def _layer_norm_fwd(x, weight, bias, eps):
        rows = x.shape[0]
        return (
            x.new_empty(x.shape),
            x.new_empty((rows,), dtype=stat(x)),
            x.new_empty((rows,), dtype=stat(x)),
        )

    @torch.library.register_fake("turbolm::rms_norm_fwd")
    def _rms_norm_fwd(x, weight, eps):
        return x.new_empty(x.shape), x.new_empty((x.shape[0],), dtype=stat(x))

    @torch.library.register_fake("turbolm::layer_norm_bwd")
    def _layer_norm_bwd(dy, x, weight, mean, rstd, has_bias):
        n = x.shape[1]
        return (
            x.new_empty(x.shape),
            x.new_empty((n if weight is not None else 0,)),
            x.new_empty((n if has_bias else 0,)),
        )

    @torch.library.register_fake("turbolm::rms_norm_bwd")
    def _rms_norm_bwd(dy, x, weight, rstd):
        n = x.shape[1]
        return x.new_empty(x.shape), x.new_empty((n if weight is not None else 0,))

    _fakes_registered = True


def main(argv: list[str] | None = None) -> int:
    """``python -m turbolm.ext``: build if needed, print status and build info as JSON."""
    ok, reason = extension_status(build=True)
    print(json.dumps({"ok": ok, "reason": reason, "build_info": build_info()}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    # Run the package's module, not this __main__ copy: the loaded library and its op
    # registrations must live in one module object.
    from turbolm import ext as _ext

    sys.exit(_ext.main())
