"""Which implementation of the op set runs: availability, reasons, and the `auto` choice.

Backends: ``reference`` (plain PyTorch, any device), ``triton`` (Triton kernels; on CPU
tensors only under ``TRITON_INTERPRET=1``) and ``native`` (the compiled extension
``apet_kernels._C``). ``APET_BACKEND`` overrides an ``auto`` request.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType, SimpleNamespace

import torch

BACKENDS = ("reference", "triton", "native")
CHOICES = ("auto",) + BACKENDS


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _import_status(module: str) -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module(module), ""
    except Exception as exc:  # any failure means "not available", never a broken import
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return None, f"{type(exc).__name__}: {first_line}"


def _triton_status() -> tuple[bool, str]:
    mod, err = _import_status("triton")
    if mod is None:
        return False, f"triton not importable ({err})"
    if torch.cuda.is_available():
        return True, f"triton {mod.__version__} on {torch.cuda.get_device_name()}"
    if triton_interpreting():
        return True, f"triton {mod.__version__} in interpreter mode (TRITON_INTERPRET=1), CPU tensors"
    return False, "no CUDA device (set TRITON_INTERPRET=1 before importing apet_kernels to run the kernels on CPU)"


def _native_status() -> tuple[bool, str]:
    mod, err = _import_status("apet_kernels._C")
    if mod is None:
        return False, f"extension not built: {err}"
    return True, "compiled extension apet_kernels._C"


@functools.lru_cache(maxsize=None)
def _status(interpreting: bool) -> tuple:
    # cached: probing CUDA and imports costs host time, and resolve() runs on every forward
    return (("reference", (True, "plain PyTorch, any device")),
            ("triton", _triton_status()),
            ("native", _native_status()))


def backends() -> dict[str, dict[str, object]]:
    """Each backend name -> {"available": bool, "reason": str}."""
    return {name: {"available": ok, "reason": why} for name, (ok, why) in _status(triton_interpreting())}


@torch.compiler.assume_constant_result  # a pure function of its arguments and the environment
def resolve(backend: str, device: torch.device) -> str:
    """Turn a requested backend (possibly ``auto``) into the one that runs on ``device``."""
    if backend not in CHOICES:
        raise ValueError(f"unknown backend {backend!r}; choose one of {CHOICES}")
    if backend == "auto":
        backend = os.environ.get("APET_BACKEND", "auto") or "auto"
        if backend not in CHOICES:
            raise ValueError(f"APET_BACKEND={backend!r} is not one of {CHOICES}")
    status = backends()
    if backend == "auto":
        if device.type == "cuda":
            if status["triton"]["available"] and status["native"]["available"]:
                return CUDA_AUTO  # per op, the faster of the two (CUDA_AUTO_CHOICE)
            order = ("triton", "native", "reference")
        else:
            order = ("native", "reference")
        return next(name for name in order if status[name]["available"])
    if not status[backend]["available"]:
        raise RuntimeError(f"backend {backend!r} is not available: {status[backend]['reason']}")
    if backend == "triton" and device.type != "cuda" and not triton_interpreting():
        raise RuntimeError("backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before "
                           "apet_kernels is imported (that is how CI runs the kernels)")
    return backend


CUDA_AUTO = "cuda-auto"
# Which GPU backend `auto` uses per op when both are built, from bench/gpu_check.sh runs
# (bench/results/): the faster one at the LLaMA-7B shapes, bf16, T=4096.
CUDA_AUTO_CHOICE = {"sddmm": "triton", "spmm_": "triton", "spmm_t_": "triton", "scatter_merge_": "triton"}


@functools.lru_cache(maxsize=None)
def _cuda_auto() -> SimpleNamespace:
    return SimpleNamespace(**{op: getattr(implementation(name), op) for op, name in CUDA_AUTO_CHOICE.items()})


def implementation(backend: str):
    """The module holding sddmm / spmm_ / spmm_t_ / scatter_merge_ for a resolved backend."""
    if backend == CUDA_AUTO:
        return _cuda_auto()
    if backend == "reference":
        from . import reference
        return reference
    if backend == "triton":
        from .triton import kernels
        return kernels
    if backend == "native":
        from . import native
        return native
    raise ValueError(f"unknown backend {backend!r}")
