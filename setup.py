"""Build l2p and its compiled extension ``l2p._C`` through CMake + ninja.

The one build switch is the environment variable ``L2P_CUDA``:
  ``auto`` (default)  CUDA kernels are built when the installed torch is a CUDA build and
                      a CUDA compiler is found; otherwise a CPU-only build.
  ``1``               CUDA kernels are required; the build fails with a message if impossible.
  ``0``               CPU-only build.
``TORCH_CUDA_ARCH_LIST`` (e.g. "8.0;9.0a") picks the GPU architectures; default sm_80 and sm_90a.
``L2P_BUILD_TYPE`` picks the CMake build type (default Release).
CUDA builds take the CUTLASS headers (``python cmake/cutlass_headers.py fetch`` puts those of the
pinned nvidia-cutlass wheel in build/cutlass) for the Hopper fused unpatchify; without them that
one kernel is left out.

Install with ``pip install --no-build-isolation .`` so the extension is compiled against the
torch that is already installed, not a fresh download.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _cuda_compiler() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _cutlass_include() -> str | None:
    """The CUTLASS / CuTe headers (cmake/cutlass_headers.py says where it looks)."""
    sys.path.insert(0, str(ROOT / "cmake"))
    try:
        import cutlass_headers
    finally:
        sys.path.pop(0)
    found = cutlass_headers.find()
    return str(found) if found else None


def _want_cuda() -> bool:
    import torch

    mode = os.environ.get("L2P_CUDA", "auto").strip().lower()
    if mode not in {"auto", "0", "1"}:
        raise SystemExit(f"L2P_CUDA must be one of auto, 0, 1 (got {mode!r})")
    torch_has_cuda = torch.version.cuda is not None
    nvcc = _cuda_compiler()
    if mode == "0":
        return False
    if mode == "1":
        if not torch_has_cuda:
            raise SystemExit(
                "L2P_CUDA=1 but the installed torch is a CPU build; install a CUDA build of "
                "torch or build with L2P_CUDA=0"
            )
        if nvcc is None:
            raise SystemExit("L2P_CUDA=1 but no nvcc was found; set CUDA_HOME or add nvcc to PATH")
        return True
    return torch_has_cuda and nvcc is not None


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configure and build every CMakeExtension with CMake, then place the library where
    setuptools expects it (regular and editable installs alike)."""

    def build_extension(self, ext: Extension) -> None:
        import pybind11
        import torch
        import torch.utils

        with_cuda = _want_cuda()
        build_type = os.environ.get("L2P_BUILD_TYPE", "Release")
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        out_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        out_path.parent.mkdir(parents=True, exist_ok=True)

        args = [
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DL2P_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
            f"-DL2P_OUTPUT_DIR={out_path.parent}",
            f"-DL2P_OUTPUT_NAME={out_path.name}",
        ]
        if shutil.which("ninja"):
            args.append("-GNinja")
        if with_cuda:
            args.append(f"-DCMAKE_CUDA_COMPILER={_cuda_compiler()}")
            arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
            args.append(f"-DL2P_CUDA_ARCHS={arch_list}")
            args.append(f"-DL2P_CUTLASS_INCLUDE={_cutlass_include() or ''}")
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        print(f"l2p: building {'CPU+CUDA' if with_cuda else 'CPU-only'} extension in {build_dir}")
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        subprocess.run(
            ["cmake", "--build", str(build_dir), "--config", build_type, "-j", jobs], check=True
        )


setup(
    ext_modules=[CMakeExtension("l2p._C")],
    cmdclass={"build_ext": CMakeBuild},
)
