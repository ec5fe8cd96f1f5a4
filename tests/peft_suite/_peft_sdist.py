"""PEFT's own generic test suite (``tests/test_custom_models.py`` of the installed peft release's sdist), brought in
once per machine and imported as the package ``peft_upstream_tests``.

PEFT ships its tests only in its source distribution. They are fetched with pip (``pip download --no-binary :all:
--no-deps peft==<installed>``) into a cache folder (``APET_PEFT_TESTS_CACHE``, default ``~/.cache/apet-kernels``),
under a lock, since every pytest-xdist worker collects this folder. Nothing of PEFT's is committed here.
"""

from __future__ import annotations

import fcntl
import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import peft

PACKAGE = "peft_upstream_tests"


def _cache_root() -> Path:
    return Path(os.environ.get("APET_PEFT_TESTS_CACHE", Path.home() / ".cache" / "apet-kernels"))


def _fetch(version: str, target: Path) -> None:
    """Download peft's sdist and copy its tests/ folder to ``target`` (a package)."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps",
                        f"peft=={version}", "-d", tmp], check=True)
        archive = next(Path(tmp).glob("peft-*.tar.gz"))
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.name.split("/")[1:2] == ["tests"] and m.name.endswith(".py")]
            try:
                tar.extractall(tmp, members=members, filter="data")
            except TypeError:  # (Pythons before 3.10.12 / 3.11.4 have no extraction filters)
                tar.extractall(tmp, members=members)
        staged = target.with_name(target.name + ".partial")
        shutil.rmtree(staged, ignore_errors=True)
        shutil.copytree(next(Path(tmp).glob("peft-*/tests")), staged)
        (staged / "__init__.py").touch()
        staged.rename(target)


def load(module: str = "test_custom_models"):
    """``peft_upstream_tests.<module>`` for the installed peft, fetched on first use."""
    version = peft.__version__
    root = _cache_root() / f"peft-{version}-tests"
    root.mkdir(parents=True, exist_ok=True)
    target = root / PACKAGE
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "__init__.py").exists():
            _fetch(version, target)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(f"{PACKAGE}.{module}")
