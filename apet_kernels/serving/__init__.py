"""Serving APET adapters: an adapter folder read without its training model (sparse_adapter), and vLLM's plugin
(vllm_plugin: per-request adapters through vLLM's LoRA API, and merge-on-load). Three ways to serve:
``merge_and_unload()`` then any engine; vLLM's ``load_format="apet_merged"``; per-request ``LoRARequest``s."""

from .sparse_adapter import LayerDeltas, read_sparse_adapter

__all__ = ["LayerDeltas", "read_sparse_adapter"]
