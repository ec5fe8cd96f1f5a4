"""Quantized frozen bases: recognize a quantized linear, dequantize it, quantize a weight the same way.

APET never writes quantized storage. Over a quantized layer the deltas run ``dequantized`` (the weight
dequantized for each GEMM, as the library's training path does, with cast(W + v) scattered into that
temporary: apet_kernels.dequantized_linear) or ``unmerged`` (``y = base_layer(x) + x S^T``, the library's
own forward). Besides those GEMMs only three things need the weight as floats, one layer at a time and for
the call only: reading W at the K tuned positions (``delta_base``, the adapter's fingerprint), data-free
magnitude positions, and ``merge_and_unload``.

Supported, recognized by the weight's type (the libraries are imported only when such a layer exists):
bitsandbytes ``Linear4bit`` (NF4 / FP4, with or without double quantization) and ``Linear8bitLt``
(int8 weights, ``has_fp16_weights=False``), as ``transformers``' ``BitsAndBytesConfig`` loads them;
torchao weight-only tensors from ``quantize_`` (``Int8WeightOnlyConfig``, ``IntxWeightOnlyConfig``,
``Int4WeightOnlyConfig``): anything with a ``dequantize()``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from .errors import ApetTypeError, ApetValueError


@dataclass(frozen=True)
class Quantization:
    """What a quantized base layer holds: ``library`` ('bitsandbytes' / 'torchao') and ``scheme``
    ('nf4', 'fp4', 'int8', or torchao's tensor class name)."""
    library: str
    scheme: str
    double_quant: bool = False

    def __str__(self) -> str:
        return f"{self.library} {self.scheme}" + (" (double quantization)" if self.double_quant else "")


def _library_of(t: torch.Tensor) -> str:
    return type(t).__module__.partition(".")[0]


def quantization_of(module: nn.Module) -> Quantization | None:
    """The quantization of a linear-like module's weight, or None for a float weight."""
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor):
        return None
    library, cls = _library_of(w), type(w).__name__
    if library == "bitsandbytes":
        if cls == "Params4bit":
            state = getattr(w, "quant_state", None)
            double = bool(getattr(w, "compress_statistics", False) or getattr(state, "nested", False))
            return Quantization("bitsandbytes", getattr(w, "quant_type", "nf4"), double)
        if cls == "Int8Params" and w.dtype == torch.int8:
            return Quantization("bitsandbytes", "int8")
        return None  # e.g. Int8Params still holding fp16 weights: a float weight, quantized per forward
    if library == "torchao" and callable(getattr(w, "dequantize", None)):
        return Quantization("torchao", cls)
    return None


def is_quantized(module: nn.Module) -> bool:
    return quantization_of(module) is not None


def dims(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a quantized linear (its storage may be packed: (n, 1) bytes)."""
    w = module.weight
    if _library_of(w) == "bitsandbytes" and type(w).__name__ == "Params4bit" and w.quant_state is not None:
        return tuple(w.quant_state.shape)
    if hasattr(module, "out_features") and hasattr(module, "in_features"):
        return module.out_features, module.in_features
    return tuple(w.shape)


def float_dtype(module: nn.Module) -> torch.dtype:
    """The float dtype the layer's weight dequantizes to (the dtype it was quantized from)."""
    w = module.weight
    if type(w).__name__ == "Params4bit" and w.quant_state is not None:
        return getattr(w.quant_state, "original_dtype", None) or w.quant_state.dtype
    if type(w).__name__ == "Int8Params":
        return torch.float16  # what bitsandbytes quantized from and computes in
    return w.dtype  # torchao tensor subclasses report their high-precision dtype


def _int8_row_scales(module: nn.Module) -> torch.Tensor:
    """bitsandbytes int8: the row scales, on the weight until the first forward moves them to ``.state``."""
    w = module.weight
    return w.SCB if getattr(w, "SCB", None) is not None else module.state.SCB


def repacked_for_cpu(module: nn.Module) -> bool:
    """bitsandbytes repacked this 4-bit weight for its bf16 CPU kernel (an inference-mode forward did): no cheap
    inverse, so dequantizing it means running its kernel on the identity."""
    return bool(getattr(getattr(module.weight, "quant_state", None), "packing_format_for_cpu", False))


@torch.no_grad()
def dequantize(module: nn.Module) -> torch.Tensor:
    """The layer's weight as floats, (out, in), in ``float_dtype(module)``: an out x in temporary."""
    quant = quantization_of(module)
    if quant is None:
        raise ApetTypeError(f"{type(module).__name__}'s weight is not quantized")
    w = module.weight
    if quant.library == "bitsandbytes":
        import bitsandbytes.functional as bnbf
        if quant.scheme == "int8":
            return bnbf.int8_vectorwise_dequant(w.data, _int8_row_scales(module)).to(float_dtype(module))
        if repacked_for_cpu(module):
            # bitsandbytes repacks a 4-bit weight for its bf16 CPU kernel at an inference-mode forward (block
            # scales in bf16) and has no faithful inverse: its own kernel applied to the identity gives W^T
            # exactly as the layer now computes with it
            eye = torch.eye(dims(module)[1], dtype=module.compute_dtype or torch.float32, device=w.device)
            return bnbf.gemv_4bit(eye, w.data, state=w.quant_state).t().contiguous().to(float_dtype(module))
        return bnbf.dequantize_4bit(w.data, w.quant_state).to(float_dtype(module))
    return w.dequantize().to(float_dtype(module))


@torch.no_grad()
def values_at(module: nn.Module, indices: torch.Tensor) -> torch.Tensor:
    """The dequantized weight at flat row-major (out, in) positions (one layer dequantized, then freed)."""
    dense = dequantize(module)
    return dense.view(-1)[indices.long().to(dense.device)]


def _torchao_config(weight: torch.Tensor, in_features: int):
    """The torchao config that made ``weight``, for the weight-only tensor classes we know."""
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup, PerRow
    cls, block = type(weight).__name__, list(getattr(weight, "block_size", []) or [])
    group = block[-1] if block else in_features
    if cls == "Int8Tensor" and getattr(weight, "act_quant_kwargs", None) is None:
        return Int8WeightOnlyConfig(granularity=PerRow() if group == in_features else PerGroup(group))
    if cls == "IntxUnpackedToInt8Tensor" and getattr(weight, "activation_quantization", None) is None:
        return IntxWeightOnlyConfig(weight_dtype=weight.target_dtype,
                                    granularity=PerAxis(0) if group == in_features else PerGroup(group))
    packing = {"Int4Tensor": "plain", "Int4TilePackedTo4dTensor": "tile_packed_to_4d",
               "Int4PlainInt32Tensor": "plain_int32", "Int4PreshuffledTensor": "preshuffled"}.get(cls)
    if packing is not None:
        return Int4WeightOnlyConfig(group_size=group, int4_packing_format=packing)
    raise ApetValueError(f"cannot tell which torchao config made a {cls} weight: pass it as "
                     f"merge_and_unload(requantize=<config>)")


@torch.no_grad()
def quantize_like(module: nn.Module, weight_oi: torch.Tensor, config=None) -> nn.Module:
    """A new layer of ``module``'s kind and quantization holding ``weight_oi`` (float, (out, in)),
    and ``module``'s bias. ``config``: a torchao config to use instead of the inferred one."""
    quant = quantization_of(module)
    if quant is None:
        raise ApetTypeError(f"{type(module).__name__}'s weight is not quantized")
    out_f, in_f = dims(module)
    w, device, has_bias = module.weight, module.weight.device, module.bias is not None
    weight_oi = weight_oi.to(float_dtype(module))
    if quant.library == "bitsandbytes":
        import bitsandbytes as bnb
        if quant.scheme == "int8":
            new = bnb.nn.Linear8bitLt(in_f, out_f, bias=has_bias, has_fp16_weights=False,
                                      threshold=module.state.threshold, device="meta")
            new.weight = bnb.nn.Int8Params(weight_oi.cpu(), requires_grad=False, has_fp16_weights=False)
        else:
            new = bnb.nn.Linear4bit(in_f, out_f, bias=has_bias, compute_dtype=module.compute_dtype,
                                    compress_statistics=quant.double_quant, quant_type=quant.scheme,
                                    quant_storage=w.quant_storage, device="meta")
            new.weight = bnb.nn.Params4bit(weight_oi.cpu(), requires_grad=False, quant_type=quant.scheme,
                                           compress_statistics=quant.double_quant, blocksize=w.blocksize,
                                           quant_storage=w.quant_storage)
        if has_bias:
            new.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
        return new.to(device)  # bitsandbytes quantizes when the weight moves to its device
    from torchao.quantization import quantize_
    config = config if config is not None else _torchao_config(w, in_f)
    new = nn.Linear(in_f, out_f, bias=has_bias, device=device, dtype=weight_oi.dtype)
    new.weight.copy_(weight_oi)
    if has_bias:
        new.bias.copy_(module.bias.detach())
    holder = nn.Sequential(new)  # quantize_ swaps children in place
    quantize_(holder, config)
    holder[0].requires_grad_(False)
    return holder[0]


def gemm_dtype(module: nn.Module, x_dtype: torch.dtype) -> torch.dtype:
    """The dtype the quantized layer's own GEMMs run in for inputs of ``x_dtype`` (bitsandbytes 4-bit: its
    ``compute_dtype`` when set; the others compute in the input's dtype)."""
    return getattr(module, "compute_dtype", None) or x_dtype


def _per_row_scale(w) -> bool:
    """A torchao Int8Tensor with one scale (and zero point) per row (Int8WeightOnlyConfig's default)."""
    qdata, scale = getattr(w, "qdata", None), getattr(w, "scale", None)
    zero_point = getattr(w, "zero_point", None)
    return (isinstance(qdata, torch.Tensor) and qdata.dim() == 2 and isinstance(scale, torch.Tensor)
            and scale.numel() == qdata.shape[0] and (zero_point is None or zero_point.numel() == qdata.shape[0])
            and list(getattr(w, "block_size", [1, qdata.shape[1]])) == [1, qdata.shape[1]])


def dequantize_for_gemm(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The weight as the library's own training path dequantizes it for its GEMMs, (out, in) in ``dtype``: a
    temporary nobody else holds (the caller may write into it). No autograd: the weight is frozen."""
    w = module.weight
    with torch.no_grad():
        if type(w).__name__ == "Int8Params":  # bitsandbytes' CPU training path: int8 rows times scale / 127
            return w.data.to(dtype).mul_(_int8_row_scales(module).to(dtype).unsqueeze(1).mul(1.0 / 127.0))
        if type(w).__name__ == "Int8Tensor" and _per_row_scale(w):  # torchao int8 weight-only, per row: in place
            out = w.qdata.to(dtype)  # ((q - zero point) * scale, as torchao's dequantize(), which takes ~3x longer)
            if w.zero_point is not None:
                out.sub_(w.zero_point.to(dtype).reshape(-1, 1))
            return out.mul_(w.scale.to(dtype).reshape(-1, 1))
        if type(w).__name__ == "Params4bit" and not repacked_for_cpu(module):
            import bitsandbytes.functional as bnbf
            return bnbf.dequantize_4bit(w.data, w.quant_state).to(dtype)
        out = dequantize(module)
        return out if out.dtype == dtype else out.to(dtype)
