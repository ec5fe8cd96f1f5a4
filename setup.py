"""Build script. The compiled extension (csrc/ -> apet_kernels._C) is optional by design.

- torch is a CUDA build and nvcc is found: CUDAExtension (CPU + CUDA kernels). Honours
  CUDA_HOME (default /usr/local/cuda when it exists), TORCH_CUDA_ARCH_LIST (default "8.0;9.0")
  and MAX_JOBS; adds the include folders of the `nvidia` wheels torch pulls in when the
  toolkit lacks headers torch's CUDA headers need (cusparse.h, cublas_v2.h).
- torch without CUDA (or no nvcc): CppExtension with the CPU kernels only.
- APET_NO_EXT=1, no torch at build time (an isolated build) or no working compiler: pure Python.
`import apet_kernels` never depends on the extension; `apet_kernels.backends()` says why
`native` is missing. Build with `pip install --no-build-isolation -e .` so the extension
compiles against the torch you run.
"""

import glob
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"


def _log(msg: str) -> None:
    print(f"apet-kernels setup: {msg}", file=sys.stderr)


def _cuda_home() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home and Path("/usr/local/cuda/bin/nvcc").exists():
        home = "/usr/local/cuda"  # torch would otherwise guess /usr/local and miss -lcudart
    if not home and shutil.which("nvcc"):
        home = str(Path(shutil.which("nvcc")).resolve().parent.parent)
    if home:
        os.environ["CUDA_HOME"] = home
    return home


def _nvidia_wheel_includes() -> list[str]:
    import site
    dirs = []
    for sp in site.getsitepackages() + [site.getusersitepackages()]:
        dirs += glob.glob(os.path.join(sp, "nvidia", "*", "include"))
        dirs += glob.glob(os.path.join(sp, "nvidia", "include"))
    return sorted(set(d for d in dirs if os.path.isdir(d)))


def _extensions():
    if os.environ.get("APET_NO_EXT", "") not in ("", "0"):
        _log("APET_NO_EXT is set: pure Python install")
        return [], {}
    cpp = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cpp"))
    cu = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cu"))
    if not cpp:
        return [], {}
    cuda_home = _cuda_home()  # before cpp_extension is imported: it reads CUDA_HOME once, at import
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        _log("torch is not importable at build time (isolated build?): pure Python install; "
             "use `pip install --no-build-isolation .` to compile the extension")
        return [], {}
    # the C++ standard is torch's choice (2.14 needs C++20). -fopenmp: at::parallel_for is an inline
    # template that compiles to an OpenMP region only with it (without, every CPU kernel ran on one
    # thread); the library it links is the libgomp.so.1 that torch has already loaded.
    cxx = ["-O3", "-fopenmp", "-Werror=return-type"]
    link = ["-fopenmp"]
    use_cuda = bool(torch.version.cuda) and bool(cu) and cuda_home is not None
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        _write_build_info("CUDAExtension (CPU + CUDA kernels)", torch, os.environ["TORCH_CUDA_ARCH_LIST"])
        _log(f"building CUDAExtension for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} "
             f"with CUDA_HOME={os.environ['CUDA_HOME']}")
        ext = CUDAExtension("apet_kernels._C", cpp + cu, include_dirs=_nvidia_wheel_includes(), extra_link_args=link,
                            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo", "-Xcompiler", "-Werror=return-type"]})
    else:
        why = "torch has no CUDA" if not torch.version.cuda else "nvcc not found (set CUDA_HOME)"
        _log(f"building the CPU-only CppExtension: {why}")
        _write_build_info(f"CppExtension (CPU kernels only: {why})", torch, None)
        ext = CppExtension("apet_kernels._C", cpp, extra_compile_args={"cxx": cxx}, extra_link_args=link)
    return [ext], {"build_ext": _TolerantBuild.wrap(BuildExtension)}


def _write_build_info(kind: str, torch, cuda_archs: str | None) -> None:
    """apet_kernels/_build_info.py: what `python -m apet_kernels` reports about this build."""
    info = dict(kind=kind, torch=torch.__version__, cuda=torch.version.cuda, cuda_archs=cuda_archs,
                python=sys.version.split()[0])
    (ROOT / "apet_kernels" / "_build_info.py").write_text(
        "# written by setup.py at build time (not tracked)\nBUILD_INFO = " + repr(info) + "\n")


class _TolerantBuild:
    """A failed compile must not fail the install: the package still works without _C."""

    @staticmethod
    def wrap(base):
        class Build(base):
            def run(self):
                try:
                    super().run()
                except Exception as exc:  # compiler missing or broken
                    if os.environ.get("APET_REQUIRE_EXT", "") not in ("", "0"):
                        raise
                    _log(f"extension build failed, installing pure Python: {exc}")
                    (ROOT / "apet_kernels" / "_build_error.txt").write_text(str(exc)[:2000])

        return Build


def _requirements(has_extension: bool) -> list[str]:
    """torch>=2.4 in general; a wheel carrying the compiled extension pins the torch minor it was
    built against (an extension built for one torch does not load in another)."""
    torch_req = "torch>=2.4"
    if has_extension and os.environ.get("APET_PIN_TORCH", "") not in ("", "0"):
        import torch
        major, minor = torch.__version__.split("+")[0].split(".")[:2]
        torch_req = f"torch>={major}.{minor},<{major}.{int(minor) + 1}"
        _log(f"pinning {torch_req} in the wheel metadata")
    # peft: ApetConfig is a peft.PeftConfig and APET registers itself as a PEFT method on import (issue 32);
    # 0.21 is the first PEFT whose state-dict code asks the method's tuner (apet_kernels.peft_registry); it
    # brings transformers, accelerate and safetensors
    # < 0.22: peft 0.22.0 (on PyPI since 2026-12-07) fails PEFT's own generic suite with APET's cases beside
    # LoRA's (tests/peft_suite: 52 failed, 88 errors, CI of 2026-12-07) and transformers' PEFT integration test;
    # lifted when the suite passes under it
    return [torch_req, "numpy", "peft>=0.21,<0.22"]


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass, install_requires=_requirements(bool(ext_modules)))
