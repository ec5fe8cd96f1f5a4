"""Build script. The package is pure Python unless the compiled extension is built.

The native extension (csrc/ -> apet_kernels._C) is optional by design: when torch is
missing at build time (isolated builds), when APET_NO_EXT=1, or when csrc/ has no
sources yet, the package installs as pure Python and `apet_kernels.backends()` says why
`native` is unavailable. `import apet_kernels` never depends on it.
"""

import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent


def _extensions():
    """(ext_modules, cmdclass) for apet_kernels._C, or empty when it cannot/should not be built."""
    if os.environ.get("APET_NO_EXT", "") not in ("", "0"):
        return [], {}
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp")) if (ROOT / "csrc").is_dir() else []
    if not sources:
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:  # isolated build without torch: stay pure Python
        return [], {}
    return [CppExtension("apet_kernels._C", sources)], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
