"""The fine-tuning methods bench/compare.py puts side by side, each applied to the same model.

Every method patches the same target linears (all q/k/v/o and MLP projections) of a freshly
built model and returns the parameters its optimizer trains. Positions of the sparse methods
are the same everywhere (select_indices with the layer name as key), so dense-mask APET and
sparse APET train exactly the same scalars.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from apet_kernels import ApetConfig, DenseMaskLinear, get_apet_model
from apet_kernels.linear_like import linear_shape
from apet_kernels.targets import find_targets, replace_linears


class CloneScatterLinear(nn.Module):
    """What SpIEL's and SHiRA's released code do: copy W, scatter the deltas into the copy, and let
    autograd form the dense dW (out x in) to gather the K entries from. A baseline, not a method
    to use."""

    def __init__(self, linear: nn.Linear, indices: torch.Tensor):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        idx = indices.long()
        self.register_buffer("rows", idx // self.weight.shape[1])
        self.register_buffer("cols", idx % self.weight.shape[1])
        self.register_buffer("base", self.weight.detach()[self.rows, self.cols].clone())
        self.values = nn.Parameter(torch.zeros(idx.numel(), device=self.weight.device))

    def forward(self, x):
        w = self.weight.detach().clone().index_put((self.rows, self.cols), (self.base.float() + self.values)
                                                    .to(self.weight.dtype))
        return F.linear(x, w, self.bias)


def _targets(model):
    return find_targets(model, ApetConfig(num_params=0))


def _budget_indices(model, num_params: int) -> dict[str, torch.Tensor]:
    """The positions sparse APET uses: get_apet_model's own split and selection, then unpatched."""
    apet = get_apet_model(model, ApetConfig(num_params=num_params))
    indices = {name: layer.delta_indices for name, layer in apet.apet_layers().items()}
    apet.unload()
    return indices


def _freeze(model):
    for p in model.parameters():
        p.requires_grad_(False)


def frozen(model, k, **_):
    _freeze(model)
    return model, [], {}


def sparse(model, k, strategy, backend, **_):
    apet = get_apet_model(model, ApetConfig(num_params=k, strategy=strategy, backend=backend))
    return apet, [p for p in apet.parameters() if p.requires_grad], {}


def _replace_each(model, k, make):
    _freeze(model)
    indices = _budget_indices(model, k)
    device = next(model.parameters()).device
    new = replace_linears(model, lambda name, linear: make(linear, indices[name].to(device)), indices)
    return model, [p for m in new.values() for p in m.parameters() if p.requires_grad], {}


def dense_mask(model, k, **_):
    return _replace_each(model, k, DenseMaskLinear.from_linear)


def clone_scatter(model, k, **_):
    return _replace_each(model, k, CloneScatterLinear)


def _matched_rank(model, k) -> int:
    per_rank = sum(sum(linear_shape(m)) for m in _targets(model).values())
    return max(1, round(k / per_rank))


def lora(model, k, **_):
    import peft
    r = _matched_rank(model, k)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=r, target_modules=list(_short_names(model)),
                                                         lora_dropout=0.0))
    return wrapped, [p for p in wrapped.parameters() if p.requires_grad], {"rank": r}


def shira(model, k, **_):
    import peft
    r = _matched_rank(model, k)
    wrapped = peft.get_peft_model(model, peft.ShiraConfig(r=r, target_modules=list(_short_names(model)),
                                                          random_seed=0))
    return wrapped, [p for p in wrapped.parameters() if p.requires_grad], {"rank": r}


def full(model, k, **_):
    for p in model.parameters():
        p.requires_grad_(True)
    return model, [p for p in model.parameters()], {}


def _short_names(model):
    return sorted({n.split(".")[-1] for n in _targets(model)})


METHODS = {
    "frozen": frozen,
    "sparse merged": lambda m, k, backend, **kw: sparse(m, k, "merged", backend),
    "sparse unmerged": lambda m, k, backend, **kw: sparse(m, k, "unmerged", backend),
    "sparse dequantized": lambda m, k, backend, **kw: sparse(m, k, "dequantized", backend),  # (quantized bases)
    "dense-mask": dense_mask,
    "clone-scatter": clone_scatter,
    "lora (peft)": lora,
    "shira (peft)": shira,
    "full fine-tuning": full,
}
NEEDS = {"lora (peft)": "peft", "shira (peft)": "peft.ShiraConfig"}

# ----------------------------------------------------------------------------- quantized bases
# kind -> (library it needs, transformers quantization config for a compute dtype and device). Loaded the way
# users load them (from_pretrained with a quantization_config), so the same linears are quantized as there.
QUANT_KINDS = {
    "nf4": "bitsandbytes",  # QLoRA's choice: NF4 with double quantization
    "int8": "bitsandbytes",  # LLM.int8() weights (threshold 0: no fp16 outlier columns)
    "torchao-int8": "torchao",  # weight-only int8, per row
    "torchao-int4": "torchao",  # weight-only int4, groups of 32 (CPU: IntxWeightOnly; CUDA: tinygemm layout)
}
QUANT_METHODS = ("frozen", "sparse dequantized", "sparse unmerged", "lora (peft)")  # the rows a quantized base gets


def quantization_config(kind: str, dtype, device: str):
    import torch
    import transformers
    if kind == "nf4":
        return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    if kind == "int8":
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup
    if kind == "torchao-int8":
        return transformers.TorchAoConfig(Int8WeightOnlyConfig())
    if kind == "torchao-int4":
        config = (Int4WeightOnlyConfig(group_size=32, int4_packing_format="tile_packed_to_4d")
                  if device.startswith("cuda") else IntxWeightOnlyConfig(weight_dtype=torch.int4,
                                                                         granularity=PerGroup(32)))
        return transformers.TorchAoConfig(config)
    raise ValueError(f"unknown quantization {kind!r}; choose one of {', '.join(QUANT_KINDS)}")


def quantized(model, kind: str, dtype, device: str):
    """``model`` (float) saved and loaded back with ``kind``'s quantization_config on ``device``."""
    import tempfile
    import warnings
    cls = type(model)
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(folder)
        return cls.from_pretrained(folder, quantization_config=quantization_config(kind, dtype, device),
                                   dtype=dtype, device_map=device)


def weight_storage_bytes(model) -> int:
    """Bytes the target linears' weights take, with their quantization state (scales, codebooks)."""
    import torch
    total = 0
    for module in _targets(model).values():
        w = module.weight
        tensors = [getattr(w, n) for n in getattr(w, "tensor_data_names", [])] or [w.data]
        state = getattr(w, "quant_state", None)
        if state is not None:
            tensors += [state.absmax, state.code] + ([state.state2.absmax, state.state2.code] if state.nested else [])
        tensors += [getattr(w, "SCB", None), getattr(getattr(module, "state", None), "SCB", None)]
        seen = set()
        for t in tensors:
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total
