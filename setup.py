"""Packaging: `kernels/` ships as `turbolm.kernels` (a top-level `kernels` would clash on PyPI).

The C++/CUDA extension is built just in time on first use; ahead-of-time builds are added
with the extension itself (TURBOLM_BUILD_EXT=1).
"""

from setuptools import find_packages, setup

packages = find_packages(include=["turbolm", "turbolm.*"]) + ["turbolm.kernels"]
setup(
    packages=packages,
    package_dir={"turbolm.kernels": "kernels"},
)
