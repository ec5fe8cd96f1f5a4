"""The adapter format is pinned: index values per method, and committed adapters every version must load.

``method="random"`` adapters store a seed, not indices, so any change in select_indices would
silently move every saved adapter's deltas to other positions. The literal values below and the
folders under tests/data/ were written by apet-kernels 0.1/0.2 and must never be regenerated for an
existing format version: a failure here means saved adapters broke.

    python tests/test_adapter_format.py --write   # only when adding a new format version's folder
"""

import hashlib
import sys
from pathlib import Path

import pytest
import torch

from apet_kernels import ApetConfig, get_apet_model, load_apet, select_indices
from apet_kernels.serialization import index_checksum
from apet_kernels.selection import METHODS

DATA = Path(__file__).resolve().parent / "data"
PINNED_FOLDERS = ("adapter-v1-random", "adapter-v1-rows")

# method -> (all 30 indices of a 7x11 weight, first 6 and checksum of 300 in a 64x96 weight), seed 3
PINNED = {
    "random": ([2, 9, 13, 14, 16, 18, 19, 20, 21, 25, 26, 28, 30, 32, 39, 41, 42, 47, 48, 50, 55, 56, 57, 58, 60, 62,
                63, 68, 72, 75],
               [1, 3, 47, 53, 76, 134], "4058c5c45e3b6aa3"),
    "rows": ([0, 1, 2, 3, 4, 5, 6, 7, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 33, 34, 35, 36, 37, 38, 39, 40, 41,
              42, 43],
             [2880, 2881, 2882, 2883, 2884, 2885], "eb2f19ccc9d9f4dc"),
    "cols": ([3, 4, 6, 8, 10, 14, 15, 17, 19, 21, 25, 26, 28, 30, 36, 37, 39, 41, 47, 48, 50, 52, 58, 59, 61, 63, 69,
              70, 72, 74],
             [1, 54, 64, 77, 94, 97], "c955004fbe2fc7ef"),
    "blocks": (list(range(30)), [16, 17, 18, 19, 20, 21], "b240cf5fedd24088"),
}


def test_every_method_is_pinned():
    assert set(PINNED) == set(METHODS), "a new selection method needs pinned values here"


@pytest.mark.parametrize("method", sorted(PINNED))
def test_selected_indices_are_pinned(method):
    small, head, checksum = PINNED[method]
    assert select_indices((7, 11), 30, method=method, seed=3, key="a").tolist() == small
    big = select_indices((64, 96), 300, method=method, seed=3, key="model.layers.0.mlp.up_proj")
    assert big[:6].tolist() == head and index_checksum(big) == checksum


def pinned_base():
    """A tiny LLaMA whose every weight is a fixed function of its name (no dependence on how
    transformers initializes), with every config value that shapes the computation spelled out."""
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rms_norm_eps=1e-6, rope_theta=10000.0, hidden_act="silu", attention_bias=False,
                                   mlp_bias=False, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") & (2**63 - 1)
            noise = torch.randn(p.shape, generator=torch.Generator().manual_seed(seed))
            p.copy_(1.0 + 0.1 * noise if name.endswith("norm.weight") else 0.2 * noise)
    return model


@pytest.mark.parametrize("folder", PINNED_FOLDERS)
def test_committed_adapter_loads_and_reproduces_its_outputs(folder):
    pytest.importorskip("transformers")
    from safetensors.torch import load_file
    expected = load_file(str(DATA / folder / "expected.safetensors"))
    model = load_apet(pinned_base(), str(DATA / folder), strict=True)  # strict: the base fingerprints match
    with torch.no_grad():
        logits = model(input_ids=expected["input_ids"]).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-4, atol=1e-4)
    merged = model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=expected["input_ids"]).logits, expected["logits"],
                                   rtol=1e-4, atol=1e-4)


def _write(folder: str, method: str) -> None:
    from safetensors.torch import save_file
    model = get_apet_model(pinned_base(), ApetConfig(density=0.05, method=method, seed=11))
    g = torch.Generator().manual_seed(5)
    for layer in model.apet_layers().values():
        layer.delta_values.data.copy_(0.3 * torch.randn(layer.delta_values.shape, generator=g))
    ids = torch.randint(0, 64, (2, 10), generator=g)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    model.save_apet(str(DATA / folder))
    save_file({"input_ids": ids, "logits": logits}, str(DATA / folder / "expected.safetensors"))


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    for name in PINNED_FOLDERS:
        if (DATA / name).exists():
            raise SystemExit(f"{DATA / name} exists: pinned folders are never rewritten")
        _write(name, name.rsplit("-", 1)[1])
