"""Merge-on-load: vLLM's ``load_format="apet_merged"`` loads the base checkpoint with one APET adapter merged into its
weights as they stream in, before vLLM packs or shards them; the adapter's base fingerprint is checked against each
weight it merges into. One adapter per deployment, no per-request cost:

    LLM(model=base, load_format="apet_merged", model_loader_extra_config={"apet_adapter": folder})
"""

from __future__ import annotations

import dataclasses

from vllm.model_executor.model_loader import register_model_loader
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

from ..errors import AdapterFileError, ApetValueError
from .sparse_adapter import read_sparse_adapter

LOAD_FORMAT = "apet_merged"
ADAPTER_KEY = "apet_adapter"


class ApetMergedLoader(DefaultModelLoader):
    """vLLM's default loader (safetensors), its weights passed through the adapter's merge."""

    def __init__(self, load_config):
        extra = dict(load_config.model_loader_extra_config or {})
        folder = extra.pop(ADAPTER_KEY, None)
        if folder is None:
            raise ApetValueError(f'load_format="{LOAD_FORMAT}" needs the adapter folder: '
                                 f'model_loader_extra_config={{"{ADAPTER_KEY}": "/path/to/adapter"}}')
        self.folder = folder
        self.layers = read_sparse_adapter(folder)
        super().__init__(dataclasses.replace(load_config, load_format="safetensors",
                                             model_loader_extra_config=extra))

    def get_all_weights(self, model_config, model):
        pending = {f"{name}.weight": deltas for name, deltas in self.layers.items()}
        for name, tensor in super().get_all_weights(model_config, model):
            deltas = pending.pop(name, None)
            if deltas is not None:
                deltas.check_base(tensor, f"the checkpoint {model_config.model}")
                tensor = deltas.merged_into(tensor)
            yield name, tensor
        if pending:
            raise AdapterFileError(f"adapter {self.folder} targets layers the checkpoint {model_config.model} does "
                                   f"not hold: {sorted(pending)[:3]}: a folder for another model?")


def install() -> None:
    register_model_loader(LOAD_FORMAT)(ApetMergedLoader)
