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
from ..errors import ApetStateError, ApetValueError

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
    # cached per (request, device type, environment): it runs at every forward of every layer
    return _resolve(backend, device.type, os.environ.get("APET_BACKEND", ""), triton_interpreting())


@functools.lru_cache(maxsize=None)
def _resolve(backend: str, device_type: str, env_backend: str, interpreting: bool) -> str:
    if backend not in CHOICES:
        raise ApetValueError(f"unknown backend {backend!r}; choose one of {CHOICES}")
    if backend == "auto":
        backend = env_backend or "auto"
        if backend not in CHOICES:
            raise ApetValueError(f"APET_BACKEND={backend!r} is not one of {CHOICES}")
    status = backends()
    if device_type == "meta":  # shapes only: plain torch ops compute them, whatever backend was asked for
        return "reference"
    if backend == "auto":
        if device_type == "cuda":
            if status["triton"]["available"] and status["native"]["available"]:
                return CUDA_AUTO  # per op, the faster of the two (CUDA_AUTO_CHOICE)
            order = ("triton", "native", "reference")
        else:
            order = ("native", "reference")
        return next(name for name in order if status[name]["available"])
    if not status[backend]["available"]:
        raise ApetStateError(f"backend {backend!r} is not available: {status[backend]['reason']}")
    if backend == "triton" and device_type != "cuda" and not interpreting:
        raise ApetStateError("backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before "
                             "apet_kernels is imported (that is how CI runs the kernels)")
    return backend


CUDA_AUTO = "cuda-auto"
# `auto` on CUDA when both GPU backends are built: per op, the one that made the layer step
# faster on an H100 (bench/results/h100-2026-11-26-run3, bf16, merged and unmerged steps).
# Small layers are bound by host time per launch, where the C++ ops win (768x3072, T=2048:
# merged 2.96x vs 5.72x of frozen); large ones by kernel time, where Triton wins (11008x4096,
# T=4096: merged 1.11x vs 1.18x). Weights of at most NATIVE_MAX_NUMEL[op] elements go native.
NATIVE_MAX_NUMEL = {"sddmm": 4096 * 4096, "spmm_": 4096 * 4096 - 1, "spmm_t_": 4096 * 4096 - 1}


def _by_size(op: str, numel_of):
    triton_fn = getattr(implementation("triton"), op)
    native_fn = getattr(implementation("native"), op)

    def run(*args, **kwargs):
        fn = native_fn if numel_of(*args) <= NATIVE_MAX_NUMEL[op] else triton_fn
        return fn(*args, **kwargs)

    run.__name__ = op
    return run


@functools.lru_cache(maxsize=None)
def _cuda_auto() -> SimpleNamespace:
    return SimpleNamespace(
        sddmm=_by_size("sddmm", lambda dy, x, *a: dy.shape[1] * x.shape[1]),
        spmm_=_by_size("spmm_", lambda out, x, *a: out.shape[1] * x.shape[1]),
        spmm_t_=_by_size("spmm_t_", lambda out, dy, *a: dy.shape[1] * out.shape[1]),
        # K writes at every merged forward: one native kernel launch instead of index_put_'s chain of
        # small ops (host time per launch is what a small layer's step is bound by)
        scatter_merge_=implementation("native").scatter_merge_)


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
    raise ApetValueError(f"unknown backend {backend!r}")
