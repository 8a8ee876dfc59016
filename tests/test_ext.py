"""The C++/CUDA extension loader (turbolm/ext.py): lazy build, cache, status, failures, CUDA.

Most checks run in subprocesses with their own TURBOLM_EXT_DIR / TURBOLM_CSRC, so they
neither touch the shared cache nor load a second copy of the ops into this process.
"""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from turbolm import ext


def _run(code: str, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=Path(__file__).resolve().parent.parent,
    )


def _cuda_toolchain() -> str | None:
    """None when nvcc and a CUDA build of torch are present, else why not."""
    if torch.version.cuda is None:
        return "torch is not a CUDA build"
    if ext.cuda_home() is None:
        return "nvcc not found"
    return None


def test_import_builds_nothing_and_auto_uses_torch(tmp_path):
    """Importing turbolm and running ops on `auto` never starts a compiler."""
    result = _run(
        """
        import torch, turbolm, turbolm.nn
        from turbolm import ext
        from turbolm.ops import layer_norm, select
        x = torch.randn(3, 8)
        layer_norm(x, 8)
        print(select("layer_norm", "cpu", None, x=x, auto=True).name, ext._module is None)
        """,
        {"TURBOLM_EXT_DIR": str(tmp_path / "cache"), "TURBOLM_EXT_JIT": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["torch", "True"]
    assert "building" not in result.stderr
    assert not (tmp_path / "cache").exists()


def test_failed_build_gives_one_line_reason_and_torch_keeps_working(tmp_path):
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    (csrc / "turbolm.cpp").write_text("int main() { this is not C++; }\n")
    result = _run(
        """
        import torch
        from turbolm import ext
        from turbolm.errors import BackendError
        from turbolm.ops import layer_norm
        ok, reason = ext.extension_status()
        print("STATUS", ok, reason)
        x = torch.randn(3, 8)
        layer_norm(x, 8, backend="torch")
        try:
            layer_norm(x, 8, backend="cpu")
        except BackendError as e:
            print("BACKEND", e)
        """,
        {
            "TURBOLM_CSRC": str(csrc),
            "TURBOLM_EXT_DIR": str(tmp_path / "cache"),
            "TURBOLM_EXT_JIT": "1",
            "TURBOLM_EXT_CUDA": "0",
            "TURBOLM_EXT_OPS": "",
        },
    )
    assert result.returncode == 0, result.stderr
    status = next(ln for ln in result.stdout.splitlines() if ln.startswith("STATUS"))
    assert status.startswith("STATUS False") and "error" in status and "turbolm.cpp" in status
    assert "full log:" in status
    backend = next(ln for ln in result.stdout.splitlines() if ln.startswith("BACKEND"))
    assert "extension not built" in backend
    assert "turbolm: building the C++/CUDA extension" in result.stderr


def test_loaded_extension_is_cached_and_stamped():
    if ext.load_extension() is None:
        pytest.fail(f"extension failed to build: {ext.extension_status(build=False)[1]}")
    assert ext.is_built()
    info = ext.build_info()
    assert info["cpu"] is True
    if info["origin"].startswith("just-in-time"):
        assert info["source_hash"] == ext.source_hash(bool(info["cuda"]))
        print(f"extension build took {info['build_seconds']} s (cuda={info['cuda']})")


def test_cuda_sources_compile_and_link(tmp_path):
    """With nvcc and a CUDA torch the .cu files compile and link (timed); no GPU needed."""
    why_not = _cuda_toolchain()
    if why_not:
        pytest.skip(why_not)
    module = ext.load_extension()
    if module is not None and module.build_info()["cuda"]:
        info = ext.build_info()
        assert info["cuda_version"] and info["cuda_archs"]
        print(f"CUDA build: {info['build_seconds']} s, archs {info['cuda_archs']}")
        return
    # The in-process build has no CUDA part (e.g. TURBOLM_EXT_CUDA=0): build one aside.
    start = time.perf_counter()
    result = _run(
        "from turbolm import ext; import json; print(json.dumps(ext.build_info()))",
        {
            "TURBOLM_EXT_DIR": str(tmp_path / "cache"),
            "TURBOLM_EXT_CUDA": "1",
            "TURBOLM_EXT_OPS": os.environ.get("TURBOLM_EXT_OPS", ""),
        },
    )
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info and info["cuda"] and info["cuda_archs"], result.stderr
    print(f"CUDA build: {time.perf_counter() - start:.0f} s, archs {info['cuda_archs']}")


MINIMAL_EXT = """
#include <pybind11/pybind11.h>
namespace py = pybind11;
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("build_info", [] { py::dict d; d["cpu"] = true; d["cuda"] = false; return d; });
}
"""


@pytest.mark.slow
def test_concurrent_processes_build_once(tmp_path):
    """Two processes loading a fresh cache: one builds, the other waits and imports it."""
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    (csrc / "turbolm.cpp").write_text(MINIMAL_EXT)
    env = {
        **os.environ,
        "TURBOLM_CSRC": str(csrc),
        "TURBOLM_EXT_DIR": str(tmp_path / "cache"),
        "TURBOLM_EXT_JIT": "1",
        "TURBOLM_EXT_CUDA": "0",
        "TURBOLM_EXT_OPS": "",
    }
    code = "from turbolm import ext; print(ext.extension_status())"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert all("(True," in out for out, _ in outs), outs
    assert sum(err.count("turbolm: building") for _, err in outs) == 1, outs


def test_python_m_turbolm_ext_reports_json(tmp_path):
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    (csrc / "turbolm.cpp").write_text("#error deliberately broken\n")
    result = subprocess.run(
        [sys.executable, "-m", "turbolm.ext"],
        env={
            **os.environ,
            "TURBOLM_CSRC": str(csrc),
            "TURBOLM_EXT_DIR": str(tmp_path / "cache"),
            "TURBOLM_EXT_JIT": "1",
            "TURBOLM_EXT_CUDA": "0",
            "TURBOLM_EXT_OPS": "",
        },
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False and "deliberately broken" in report["reason"]
    assert "RuntimeWarning" not in result.stderr
