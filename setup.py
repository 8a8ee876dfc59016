"""Packaging: `kernels/` ships as `turbolm.kernels` (a top-level `kernels` would clash on PyPI).

The C++/CUDA extension is built just in time on first use (turbolm/ext.py). To build it ahead
of time instead (DeepSpeed style), as the module ``turbolm._C``:

    TURBOLM_BUILD_EXT=1 [TURBOLM_CUDA_ARCHS="8.0;9.0"] [MAX_JOBS=4] \\
        pip install --no-build-isolation .      (or: python setup.py build_ext --inplace)

The CPU part is always compiled; the CUDA part where nvcc and a CUDA build of torch exist
(``TURBOLM_EXT_CUDA=0/1`` forces it). The CPU kernels target this machine's level (AVX2/F16C
when present; ``TURBOLM_CPU_LEVEL=base`` for a build that runs on any x86-64). torch must be
installed first (hence ``--no-build-isolation``).
"""

import importlib.util
import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def _extension_kwargs() -> dict:
    """ext_modules / cmdclass for the ahead-of-time build, from turbolm/ext.py's config."""
    spec = importlib.util.spec_from_file_location(
        "_turbolm_ext_config", ROOT / "turbolm" / "ext.py"
    )
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)  # stdlib-only at import: turbolm itself need not import

    import torch.utils.cpp_extension as cpp_ext

    with_cuda, why = ext.cuda_choice()
    if os.environ.get("TURBOLM_EXT_CUDA", "").strip() == "1" and not with_cuda:
        raise SystemExit(f"TURBOLM_EXT_CUDA=1 but the CUDA part cannot be built: {why}")
    print(f"turbolm: building the extension ahead of time (cuda: {with_cuda}, {why})")
    if with_cuda:
        os.environ["CUDA_HOME"] = ext.cuda_home()
        cpp_ext.CUDA_HOME = os.environ["CUDA_HOME"]
        archs = ext.cuda_archs()
        if archs is not None:
            os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    config = ext.build_config(with_cuda)
    stamp = f"-DTURBOLM_SOURCE_HASH=h{ext.sources_digest()}"
    sources = [_unique_object_name(Path(s)) for s in config["sources"]]
    make = cpp_ext.CUDAExtension if with_cuda else cpp_ext.CppExtension
    module = make(
        "turbolm._C",
        sources=sources,
        include_dirs=config["include_dirs"],
        extra_compile_args={
            "cxx": config["cflags"] + [stamp],
            "nvcc": config["cuda_cflags"] + [stamp],
        },
        extra_link_args=config["ldflags"],
    )
    return {"ext_modules": [module], "cmdclass": {"build_ext": cpp_ext.BuildExtension}}


def _unique_object_name(source: Path) -> str:
    """``source`` relative to this folder; a ``.cu`` file that shares its stem with a ``.cpp``
    beside it (``norm/norm.cpp`` + ``norm/norm.cu``, which setuptools would both compile to
    ``norm.o``) goes through a one-line wrapper named ``<stem>_cuda.cu`` under build/."""
    if source.suffix == ".cu" and source.with_suffix(".cpp").exists():
        wrapper = ROOT / "build" / "turbolm_aot" / source.parent.name / f"{source.stem}_cuda.cu"
        wrapper.parent.mkdir(parents=True, exist_ok=True)
        text = f'#include "{source.resolve()}"\n'
        if not wrapper.exists() or wrapper.read_text() != text:
            wrapper.write_text(text)
        source = wrapper
    return os.path.relpath(source, ROOT)


packages = find_packages(include=["turbolm", "turbolm.*"]) + ["turbolm.kernels"]
setup(
    packages=packages,
    package_dir={"turbolm.kernels": "kernels"},
    package_data={"turbolm": ["configs/*.yaml"]},
    **(_extension_kwargs() if os.environ.get("TURBOLM_BUILD_EXT") == "1" else {}),
)
