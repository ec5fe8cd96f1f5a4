"""Sparse deltas over quantized frozen bases (bitsandbytes 4/8-bit, torchao weight-only int8 / int4).

The oracle: float64 x (dequantize(W) + S)^T + b. A quantization library's own forward may differ
from it (bitsandbytes int8 quantizes the activations too); what APET must add is exactly x S^T and
dy S and the SDDMM, so each check allows the base layer's own error and fp32 rounding, no more.
"""

import copy
import dataclasses
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn

from _helpers import dense_delta, random_indices, rel_err, tiny_llama
from apet_kernels import ApetConfig, SparseDeltaLinear, get_apet_model, load_apet
from apet_kernels.quantized import dequantize, quantization_of

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install apet-kernels[quant])")
torchao = pytest.importorskip("torchao", reason="torchao is not installed (pip install apet-kernels[quant])")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def _bnb4(quant_type, double):
    def make(linear, device):
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=torch.float32, compress_statistics=double, quant_type=quant_type,
                              device="meta")
        q.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False, quant_type=quant_type,
                                     compress_statistics=double)
        q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return q.to(device)
    return make


def _bnb8(linear, device):
    q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                            has_fp16_weights=False, threshold=0.0, device="meta")
    q.weight = bnb.nn.Int8Params(linear.weight.detach().clone(), requires_grad=False, has_fp16_weights=False)
    q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return q.to(device)


def _torchao(config_fn):
    def make(linear, device):
        holder = nn.Sequential(copy.deepcopy(linear).to(device))
        torchao.quantization.quantize_(holder, config_fn())
        return holder[0].requires_grad_(False)
    return make


def _int8_weight_only():
    return torchao.quantization.Int8WeightOnlyConfig()


def _intx_int4():
    from torchao.quantization.granularity import PerGroup
    return torchao.quantization.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))


def _int4_tile_packed():  # torchao's int4 weight-only for CUDA (tinygemm); no CPU kernel in torchao 0.18
    return torchao.quantization.Int4WeightOnlyConfig(group_size=32, int4_packing_format="tile_packed_to_4d")


# kind -> (layer factory, dtype of the layer's float weight and inputs)
KINDS = {
    "bnb-nf4": (_bnb4("nf4", False), torch.float32),
    "bnb-nf4-double": (_bnb4("nf4", True), torch.float32),
    "bnb-fp4": (_bnb4("fp4", False), torch.float32),
    "bnb-fp4-double": (_bnb4("fp4", True), torch.float32),
    "bnb-int8": (_bnb8, torch.float32),
    "torchao-int8": (_torchao(_int8_weight_only), torch.float32),
    "torchao-int4": (_torchao(_intx_int4), torch.float32),
}
CPU_KINDS = list(KINDS)
GPU_KINDS = CPU_KINDS + ["torchao-int4-tinygemm"]
KINDS["torchao-int4-tinygemm"] = (_torchao(_int4_tile_packed), torch.bfloat16)


def quantized_linear(kind, out_f=40, in_f=96, device="cpu", seed=0):
    torch.manual_seed(seed)
    make, dtype = KINDS[kind]
    linear = nn.Linear(in_f, out_f).to(dtype)
    with torch.no_grad():
        linear.bias.normal_()
    return make(linear, device), dtype


def storage_snapshot(module):
    """Every tensor the quantized layer holds (data, scales, quantization state), cloned."""
    w = module.weight
    tensors = [w.data if not hasattr(w, "tensor_data_names") else None]
    tensors += [getattr(w, n) for n in getattr(w, "tensor_data_names", [])]
    state = getattr(w, "quant_state", None)
    if state is not None:
        tensors += [state.absmax] + ([state.state2.absmax] if state.nested else [])
    tensors += [getattr(w, "SCB", None)]
    return [t.detach().clone() for t in tensors if isinstance(t, torch.Tensor)]


def check_against_oracle(kind, device, strategy):
    base, dtype = quantized_linear(kind, device=device)
    layer = SparseDeltaLinear(base, random_indices((40, 96), 300).to(device), strategy=strategy)
    with torch.no_grad():
        layer.delta_values.normal_(0, 0.05)
    before = storage_snapshot(base)
    x = torch.randn(3, 5, 96, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(3, 5, 40, device=device, dtype=dtype)
    y = layer(x)
    y.backward(g)

    # the base library's own forward and dx, and their error against the dequantized float64 oracle
    xb = x.detach().clone().requires_grad_()
    yb = base(xb)
    yb.backward(g)
    w64 = dequantize(base).double().cpu()
    s64 = dense_delta(layer.delta_indices, layer.delta_values, (40, 96))
    x64, g64, b64 = x.detach().double().cpu(), g.double().cpu(), base.bias.detach().double().cpu()
    base_y_err = (yb.detach().double().cpu() - (x64 @ w64.t() + b64)).abs().max().item()
    base_dx_err = (xb.grad.double().cpu() - g64 @ w64).abs().max().item()
    scale = (x64 @ w64.t()).abs().max().item()
    assert base_y_err <= 0.05 * scale, f"{kind}: the base layer itself is off by {base_y_err} (scale {scale})"

    eps = 5e-5 if dtype == torch.float32 else 2e-2  # fp32 / bf16 rounding of the sparse term
    y_oracle = x64 @ (w64 + s64).t() + b64
    dx_oracle = g64 @ (w64 + s64)
    assert (y.detach().double().cpu() - y_oracle).abs().max().item() <= base_y_err + eps * scale
    assert (x.grad.double().cpu() - dx_oracle).abs().max().item() <= base_dx_err + eps * max(1.0, dx_oracle.abs().max())
    # what APET adds, checked on its own: exactly x S^T and dy S
    sparse_scale = (x64 @ s64.t()).abs().max().item()
    assert ((y - yb).detach().double().cpu() - x64 @ s64.t()).abs().max().item() <= eps * max(1.0, sparse_scale) * 4
    assert ((x.grad - xb.grad).double().cpu() - g64 @ s64).abs().max().item() <= eps * 4
    # dv is the SDDMM of dy and x: it never reads W
    dv64 = (g64.reshape(-1, 40).t() @ x64.reshape(-1, 96)).reshape(-1)[layer.delta_indices.long().cpu()]
    torch.testing.assert_close(layer.delta_values.grad.double().cpu(), dv64, rtol=1e-4 if dtype == torch.float32
                               else 2e-2, atol=1e-4 * dv64.abs().max().item())
    # nothing wrote the quantized storage
    for a, b in zip(before, storage_snapshot(base)):
        assert torch.equal(a, b), f"{kind}: the quantized storage changed"


@pytest.mark.parametrize("strategy", ["dequantized", "unmerged"])
@pytest.mark.parametrize("kind,device", [(k, "cpu") for k in CPU_KINDS] +
                         [pytest.param(k, "cuda", marks=pytest.mark.gpu) for k in GPU_KINDS])
def test_outputs_and_gradients_match_the_dequantized_oracle(kind, device, strategy):
    check_against_oracle(kind, device, strategy)


@pytest.mark.parametrize("kind", CPU_KINDS)
def test_moves_copies_and_state_dicts_of_a_quantized_layer(kind):
    import copy
    layer = SparseDeltaLinear(quantized_linear(kind)[0], random_indices((40, 96), 300))
    with torch.no_grad():
        layer.delta_values.normal_(0, 0.05)
    x = torch.randn(3, 96)
    with torch.no_grad():
        y = layer(x)
        # a dtype move converts the deltas and the base with the rest (torchao's tensors move by swap_tensors)
        moved = copy.deepcopy(layer).to(torch.bfloat16)
        assert moved.delta_base.dtype == moved.delta_values.dtype == torch.bfloat16
        assert rel_err(moved(x.bfloat16()), y) <= 3e-2
        # a state dict loads into a layer over another quantized base of the same kind: the same outputs, and
        # the loading never writes the quantized storage it gets (a quantized weight is never merged)
        state = layer.state_dict()
        other = SparseDeltaLinear(quantized_linear(kind, seed=1)[0], random_indices((40, 96), 300))
        # (strict=False: bitsandbytes' 4-bit layers report their quantization state's keys as unexpected and keep
        # their own scales; what the base library loads is its business, what APET loads is checked here)
        other.load_state_dict(state, strict=False)
        plain = quantized_linear(kind, seed=1)[0]
        plain.load_state_dict({k[len("base_layer."):]: v for k, v in state.items() if k.startswith("base_layer.")},
                              strict=False)
        for a, b in zip(storage_snapshot(plain), storage_snapshot(other.base_layer)):
            assert torch.equal(a, b)  # the base holds exactly what its own loading put there
        assert torch.equal(other.delta_values, layer.delta_values)
        torch.testing.assert_close(other(x) - other.base_layer(x), y - layer.base_layer(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", CPU_KINDS)
def test_merging_never_writes_the_quantized_storage(kind):
    base, _ = quantized_linear(kind)
    with pytest.raises(ValueError, match="quantized.*'dequantized'"):
        SparseDeltaLinear(base, random_indices((40, 96), 10), strategy="merged")
    with pytest.raises(ValueError, match="not quantized"):
        SparseDeltaLinear(nn.Linear(96, 40), random_indices((40, 96), 10), strategy="dequantized")
    layer = SparseDeltaLinear(base, random_indices((40, 96), 10))
    assert layer.strategy == "dequantized" and "quantized=" in repr(layer)  # what auto picks over a quantized base
    with torch.no_grad():
        layer.delta_values.normal_()
    x = torch.randn(3, 96)
    y = layer(x)
    layer.unmerge()  # -> the unmerged strategy: the same function
    assert layer.strategy == "unmerged" and layer.layout.col_perm is not None
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    layer.merge()  # over a quantized base merging means the dequantized strategy, nothing is written
    assert layer.strategy == "dequantized"
    layer.merge()
    assert layer.strategy == "dequantized"
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    # a weight shared with another module may run dequantized: what the GEMM reads is a temporary
    shared = SparseDeltaLinear(quantized_linear(kind)[0], random_indices((40, 96), 10), weight_shared=True)
    assert shared.strategy == "dequantized"
    assert layer.delta_base.is_floating_point()  # the dequantized values there, not bytes of the storage
    torch.testing.assert_close(layer.delta_base, dequantize(base).reshape(-1)[layer.delta_indices.long()])


def test_kinds_are_recognized_with_their_parameters():
    names = {kind: str(quantization_of(quantized_linear(kind)[0])) for kind in CPU_KINDS}
    assert names["bnb-nf4"] == "bitsandbytes nf4" and names["bnb-fp4-double"] == "bitsandbytes fp4 (double quantization)"
    assert names["bnb-int8"] == "bitsandbytes int8" and names["torchao-int8"] == "torchao Int8Tensor"
    assert quantization_of(nn.Linear(3, 4)) is None


def test_dequantize_survives_bitsandbytes_cpu_repacking():
    """bitsandbytes (on CPUs with AVX512-BF16) repacks a 4-bit weight for its bf16 kernel at an
    inference-mode forward, weights rounded to bf16: dequantize reads either layout, and
    leaves the layer's own one alone."""
    # (its repacking needs out_features divisible by 32 and in_features by the block size, 64)
    base, _ = quantized_linear("bnb-nf4", out_f=64, in_f=128)
    dense = dequantize(base).clone()
    with torch.no_grad():
        base.eval()(torch.randn(2, 128))
    packed = getattr(base.weight.quant_state, "packing_format_for_cpu", False)
    storage = base.weight.data.clone()
    torch.testing.assert_close(dequantize(base), dense, rtol=2 ** -6 if packed else 0, atol=0)
    assert torch.equal(base.weight.data, storage)
    assert getattr(base.weight.quant_state, "packing_format_for_cpu", False) == packed


# ----------------------------------------------------------------------------- models from transformers
def _llama_quantization_configs():
    from transformers import BitsAndBytesConfig, TorchAoConfig
    return {
        "bnb-nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
        "bnb-fp4-double": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True,
                                             bnb_4bit_compute_dtype=torch.float32),
        "bnb-int8": BitsAndBytesConfig(load_in_8bit=True),
        "torchao-int8": TorchAoConfig(_int8_weight_only()),
        "torchao-int4": TorchAoConfig(_intx_int4()),
    }


MODEL_KINDS = ["bnb-nf4", "bnb-fp4-double", "bnb-int8", "torchao-int8", "torchao-int4"]


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    tiny_llama(seed=3).save_pretrained(path)
    other = tmp_path_factory.mktemp("other_llama")
    tiny_llama(seed=4).save_pretrained(other)
    return path, other


def load_llama(path, kind=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind is None:
            return transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).train()
        return transformers.LlamaForCausalLM.from_pretrained(
            path, quantization_config=_llama_quantization_configs()[kind], device_map="cpu",
            dtype=torch.float32).train()  # (train mode: bitsandbytes' bf16 inference repacking stays off)


def _train(model, steps=25, seed=0):
    torch.manual_seed(seed)
    ids = torch.randint(0, 99, (4, 12))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


CONFIG = ApetConfig(density=0.05, target_modules="all-linear")


@pytest.mark.parametrize("strategy", ["auto", "unmerged"])
@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_a_quantized_llama_trains_like_the_float_one(saved_llama, kind, strategy):
    float_losses = _train(get_apet_model(load_llama(saved_llama[0]), CONFIG))
    model = get_apet_model(load_llama(saved_llama[0], kind), dataclasses.replace(CONFIG, strategy=strategy))
    layers = model.apet_layers()
    want = "dequantized" if strategy == "auto" else strategy  # auto: the deltas go into the dequantized weight
    assert layers and all(m.quantization is not None and m.strategy == want for m in layers.values())
    before = {n: storage_snapshot(m.base_layer) for n, m in layers.items()}
    losses = _train(model)
    drop, float_drop = losses[0] - losses[-1], float_losses[0] - float_losses[-1]
    assert float_drop > 0.2 and drop > 0.6 * float_drop, (kind, losses[::6], float_losses[::6])
    assert abs(losses[0] - float_losses[0]) < 0.05  # the same model up to quantization
    for name, m in layers.items():
        assert all(torch.equal(a, b) for a, b in zip(before[name], storage_snapshot(m.base_layer)))


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_merge_and_unload_dequantizes_and_adds_the_deltas(saved_llama, kind):
    model = get_apet_model(load_llama(saved_llama[0], kind), CONFIG)
    _train(model, steps=3)
    ids = torch.randint(0, 99, (2, 10))
    with torch.no_grad():
        unmerged = model(ids).logits
    expected = {n: (dequantize(m.base_layer).double() + dense_delta(m.delta_indices, m.delta_values,
                                                                    (m.out_features, m.in_features)))
                for n, m in model.apet_layers().items()}
    merged = model.merge_and_unload()
    for name, w in expected.items():
        layer = merged.get_submodule(name)
        assert type(layer) is nn.Linear and quantization_of(layer) is None
        torch.testing.assert_close(layer.weight.double(), w.to(layer.weight.dtype).double(), rtol=0, atol=0)
    with torch.no_grad():
        got = merged(ids).logits
    # bitsandbytes int8 quantizes activations in its own forward; the float model does not
    atol = 5e-2 if kind == "bnb-int8" else 1e-4
    torch.testing.assert_close(got, unmerged, rtol=1e-3, atol=atol)


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_merge_and_unload_can_requantize_and_reports_what_it_loses(saved_llama, kind):
    model = get_apet_model(load_llama(saved_llama[0], kind), CONFIG)
    layers = model.apet_layers()
    kinds = {n: str(m.quantization) for n, m in layers.items()}
    with torch.no_grad():  # deltas far below the quantization step: re-quantization rounds them away
        for m in layers.values():
            m.delta_values.fill_(1e-7)
    with pytest.warns(UserWarning, match="re-quantizing"):
        merged = model.merge_and_unload(requantize=True)
    report = model.requantization_report
    assert set(report) == set(layers)
    for n, layer in ((n, merged.get_submodule(n)) for n in layers):
        assert str(quantization_of(layer)) == kinds[n]
    # the error re-quantization adds is at least the deltas' own size: they are lost in it
    assert min(r["error_over_delta"] for r in report.values()) >= 0.99

    # deltas larger than the quantization step survive (most of them)
    model = get_apet_model(load_llama(saved_llama[0], kind), CONFIG)
    with torch.no_grad():
        for m in model.apet_layers().values():
            m.delta_values.copy_(torch.randn_like(m.delta_values) * 0.1)
    with pytest.warns(UserWarning, match="re-quantizing"):
        model.merge_and_unload(requantize=True)
    report = model.requantization_report.values()
    assert min(r["positions_changed"] for r in report) > 0.95
    assert sum(r["delta_retained"] for r in report) / len(report) > 0.7


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_through_peft_a_quantized_base_trains_round_trips_and_merges(saved_llama, kind, tmp_path):
    """The PEFT entry point over the same quantized bases: training, a from_pretrained round trip onto a freshly
    quantized base (bit-exact), merge_and_unload to floats and with requantize=True."""
    import peft
    model = peft.get_peft_model(load_llama(saved_llama[0], kind), CONFIG)
    losses = _train(model, steps=3)
    assert losses[-1] < losses[0]
    ids = torch.randint(0, 99, (2, 10))
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(load_llama(saved_llama[0], kind), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, SparseDeltaLinear) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-3, atol=5e-2 if kind == "bnb-int8" else 1e-4)
    with pytest.warns(UserWarning, match="re-quantizing"):
        small = loaded.merge_and_unload(requantize=True)
    assert small.requantization_report and all(quantization_of(m) is not None for m in small.modules()
                                                if isinstance(m, nn.Linear) and m is not small.lm_head)


def test_requantize_on_a_float_model_is_refused_and_changes_nothing(saved_llama):
    model = get_apet_model(load_llama(saved_llama[0]), CONFIG)
    with pytest.raises(ValueError, match="requantize needs quantized layers"):
        model.merge_and_unload(requantize=True)
    assert model.apet_layers() and model.merge_and_unload() is model


@pytest.mark.parametrize("kind", ["bnb-nf4", "torchao-int8"])
def test_adapters_save_and_load_over_quantized_bases(saved_llama, tmp_path, kind):
    model = get_apet_model(load_llama(saved_llama[0], kind), CONFIG)
    _train(model, steps=3)
    model.save_apet(tmp_path / "a")
    from safetensors.torch import load_file
    stored = load_file(tmp_path / "a" / "model.safetensors")
    assert all(k.endswith(".deltas.default.values") for k in stored)  # never the base's weights
    ids = torch.randint(0, 99, (2, 10))
    with torch.no_grad():
        expected = model(ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same quantized base: no fingerprint warning
        loaded = load_apet(load_llama(saved_llama[0], kind), tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["bnb-nf4", "bnb-int8", "torchao-int4"])
def test_a_float_adapter_loads_onto_the_quantized_base_with_a_warning(saved_llama, tmp_path, kind):
    float_model = get_apet_model(load_llama(saved_llama[0]), CONFIG)
    _train(float_model, steps=3)
    float_model.save_apet(tmp_path / "f")
    with pytest.warns(UserWarning, match="differs from the one the adapter was trained on only by quantization"):
        loaded = load_apet(load_llama(saved_llama[0], kind), tmp_path / "f", strict=True)
    assert all(m.quantization is not None for m in loaded.apet_layers().values())
    # another base model, quantized the same way, is not mistaken for it
    with pytest.warns(UserWarning, match="base fingerprint mismatch"):
        load_apet(load_llama(saved_llama[1], kind), tmp_path / "f")
    with pytest.raises(ValueError, match="strict"):
        load_apet(load_llama(saved_llama[1], kind), tmp_path / "f", strict=True)


@pytest.mark.parametrize("method", ["magnitude", "gradient"])
def test_data_driven_positions_over_a_quantized_base(saved_llama, method):
    model = load_llama(saved_llama[0], "bnb-nf4")
    ids = torch.randint(0, 99, (2, 8))
    calibration = [{"input_ids": ids, "labels": ids}] if method == "gradient" else None
    apet = get_apet_model(model, ApetConfig(num_params=600, method=method, target_modules=["q_proj"]),
                          calibration=calibration)
    for m in apet.apet_layers().values():
        if method == "magnitude":  # the smallest |W| of the dequantized weight
            w = dequantize(m.base_layer).abs().reshape(-1)
            assert w[m.delta_indices.long()].max() <= torch.kthvalue(w, m.delta_indices.numel() + 1).values
        assert m.quantization is not None
    _train(apet, steps=2)


def test_trainer_trains_a_quantized_base_through_the_peft_entry_point(saved_llama, tmp_path):
    """transformers' Trainer trains a quantized model only as a PeftModel (or with its own PEFT flag, which a
    patched model no longer borrows: issue 32): get_peft_model is the way, and the in-place model is refused
    by transformers with its own message."""
    import peft
    from transformers import Trainer, TrainingArguments
    ids = torch.randint(0, 99, (8, 12))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, save_strategy="no", learning_rate=1e-2)
    model = peft.get_peft_model(load_llama(saved_llama[0], "bnb-nf4"), CONFIG)
    layers = [m for m in model.modules() if isinstance(m, SparseDeltaLinear)]
    assert layers and all(m.quantization is not None for m in layers)
    before = [m.delta_values.detach().clone() for m in layers]
    Trainer(model=model, args=args, train_dataset=data).train()
    assert any(not torch.equal(b, m.delta_values) for b, m in zip(before, layers))
    with pytest.raises(ValueError, match="purely quantized"):
        Trainer(model=get_apet_model(load_llama(saved_llama[0], "bnb-nf4"), CONFIG), args=args, train_dataset=data)


def test_without_the_quantization_libraries_everything_else_works():
    """`import apet_kernels` and the float paths never import bitsandbytes or torchao."""
    code = (
        "import sys\n"
        "sys.modules['bitsandbytes'] = None; sys.modules['torchao'] = None\n"  # importing them now fails
        "import torch, apet_kernels\n"
        "from apet_kernels import SparseDeltaLinear\n"
        "layer = SparseDeltaLinear.from_linear(torch.nn.Linear(8, 6), k=5)\n"
        "layer(torch.randn(2, 8, requires_grad=True)).sum().backward()\n"
        "assert layer.strategy == 'merged' and layer.delta_values.grad is not None\n"
        "print('ok')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.parametrize("kind", CPU_KINDS)
def test_the_weight_dequantized_for_a_gemm_is_the_library_dequantization(kind):
    from apet_kernels.quantized import dequantize_for_gemm
    base, _ = quantized_linear(kind)
    before = storage_snapshot(base)
    got = dequantize_for_gemm(base, torch.float32)
    want = dequantize(base)  # (bitsandbytes int8: in fp16, what it was quantized from)
    torch.testing.assert_close(got, want.float(), rtol=1e-5 if want.dtype == torch.float32 else 1e-3, atol=1e-7)
    got.add_(1.0)  # a temporary of its own: writing it changes nothing the layer holds
    for a, b in zip(before, storage_snapshot(base)):
        assert torch.equal(a, b)
