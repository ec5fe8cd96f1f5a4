import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from _helpers import assert_close_rel, dense_delta, oracle_linear
from apet_kernels import DenseMaskLinear, SparseDeltaLinear, backends

STRATEGIES = ["merged", "unmerged"]


def _linear(in_f=19, out_f=23, bias=True, dtype=torch.float32):
    return nn.Linear(in_f, out_f, bias=bias).to(dtype)


def _randomize(layer):
    with torch.no_grad():
        layer.delta_values.normal_()
    return layer


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_output_at_start_equals_wrapped_linear_exactly(strategy, dtype):
    lin = _linear(dtype=dtype)
    x = torch.randn(3, 7, 19).to(dtype)
    expected = lin(x)
    layer = SparseDeltaLinear.from_linear(copy.deepcopy(lin), k=40, strategy=strategy)
    assert torch.equal(layer(x), expected)


def test_from_linear_reuses_parameters_and_freezes_them():
    lin = _linear()
    layer = SparseDeltaLinear.from_linear(lin, density=0.05, seed=1, key="q")
    assert layer.weight is lin.weight and layer.bias is lin.bias
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["deltas.default.values"]
    assert layer.delta_values.dtype == torch.float32 and not layer.delta_values.any()
    assert layer.delta_indices.numel() == round(0.05 * 19 * 23)
    assert "k=22" in repr(layer) and "strategy=merged" in repr(layer)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_forward_backward_matches_dense_oracle(strategy):
    lin = _linear()
    layer = _randomize(SparseDeltaLinear.from_linear(copy.deepcopy(lin), k=60, strategy=strategy))
    x = torch.randn(11, 19, requires_grad=True)
    y = layer(x)
    y_ref, w_eff = oracle_linear(x, lin.weight, lin.bias, layer.delta_values, layer.delta_indices)
    assert_close_rel(y, y_ref, torch.float32)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert_close_rel(x.grad, dy.double() @ w_eff, torch.float32)
    dv = (dy.double().t() @ x.detach().double()).reshape(-1)[layer.delta_indices.long()]
    assert_close_rel(layer.delta_values.grad, dv, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_equals_unmerged(dtype):
    lin = _linear(dtype=dtype)
    merged = _randomize(SparseDeltaLinear.from_linear(copy.deepcopy(lin), k=50, strategy="merged"))
    unmerged = SparseDeltaLinear.from_linear(copy.deepcopy(lin), k=50, strategy="unmerged")
    with torch.no_grad():
        unmerged.delta_values.copy_(merged.delta_values)
    x = torch.randn(9, 19).to(dtype)
    # merged rounds W + v to the weight dtype, unmerged applies v in fp32: equal to rounding
    assert_close_rel(merged(x), unmerged(x).double(), dtype)
    merged(x).sum().backward()
    unmerged(x).sum().backward()
    assert_close_rel(merged.delta_values.grad, unmerged.delta_values.grad.double(), dtype)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_dense_mask_equivalence(strategy):
    lin = _linear()
    sparse = _randomize(SparseDeltaLinear.from_linear(copy.deepcopy(lin), k=70, strategy=strategy))
    dense = DenseMaskLinear.from_linear(copy.deepcopy(lin), sparse.delta_indices)
    with torch.no_grad():
        dense.delta.copy_(sparse.delta_weight() + torch.randn(23, 19) * ~dense.mask)  # off-mask noise is inert
    x = torch.randn(13, 19)
    ys, yd = sparse(x), dense(x)
    assert_close_rel(ys, yd.double(), torch.float32)
    dy = torch.randn_like(ys)
    ys.backward(dy)
    yd.backward(dy)
    g = dense.delta.grad
    assert_close_rel(sparse.delta_values.grad, g.view(-1)[sparse.delta_indices.long()].double(), torch.float32)
    assert not g[~dense.mask].any()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_training_tracks_dense_mask_apet(strategy):
    lin = _linear()
    sparse = SparseDeltaLinear.from_linear(copy.deepcopy(lin), k=80, strategy=strategy, seed=3)
    dense = DenseMaskLinear.from_linear(copy.deepcopy(lin), sparse.delta_indices)
    opt_s = torch.optim.AdamW(sparse.parameters(), lr=1e-2, weight_decay=0.0)
    opt_d = torch.optim.AdamW([dense.delta], lr=1e-2, weight_decay=0.0)
    x, target = torch.randn(32, 19), torch.randn(32, 23)
    losses = []
    for _ in range(5):
        ls = ((sparse(x) - target) ** 2).mean()
        ld = ((dense(x) - target) ** 2).mean()
        losses.append((ls.item(), ld.item()))
        for opt, loss in ((opt_s, ls), (opt_d, ld)):
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert losses[-1][0] < losses[0][0]  # it trains
    for ls, ld in losses:
        assert abs(ls - ld) <= 1e-5 * abs(ld)
    assert torch.allclose(sparse.delta_values, dense.delta.view(-1)[sparse.delta_indices.long()], atol=1e-6)


def test_optimizer_step_reaches_next_merged_forward():
    layer = SparseDeltaLinear.from_linear(_linear(), k=30, strategy="merged")
    x = torch.randn(4, 19)
    y0 = layer(x)
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)
    y0.sum().backward()
    opt.step()
    y1 = layer(x)
    assert not torch.equal(y0, y1)
    unmerged = copy.deepcopy(layer)
    unmerged.unmerge()
    assert_close_rel(y1, unmerged(x).double(), torch.float32)


@pytest.mark.parametrize("optimizer", ["foreach", "fused", "single"])
def test_every_optimizer_kind_reaches_next_merged_forward(optimizer):
    # fused optimizers write parameters without bumping their version counter
    lin = _linear()
    merged = SparseDeltaLinear.from_linear(copy.deepcopy(lin), k=40, strategy="merged", seed=2)
    unmerged = SparseDeltaLinear.from_linear(copy.deepcopy(lin), k=40, strategy="unmerged", seed=2)
    kwargs = {"foreach": dict(foreach=True), "fused": dict(fused=True), "single": dict(foreach=False)}[optimizer]
    opts = [torch.optim.AdamW([m.delta_values], lr=1e-2, **kwargs) for m in (merged, unmerged)]
    x = torch.randn(8, 19)
    for _ in range(3):
        for m, opt in zip((merged, unmerged), opts):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    torch.testing.assert_close(merged.delta_values, unmerged.delta_values, rtol=1e-5, atol=1e-6)
    assert_close_rel(merged(x), unmerged(x).double(), torch.float32)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_gradient_accumulation(strategy):
    layer = _randomize(SparseDeltaLinear.from_linear(_linear(), k=30, strategy=strategy))
    x1, x2 = torch.randn(5, 19), torch.randn(6, 19)
    layer(x1).sum().backward()
    layer(x2).sum().backward()
    acc = layer.delta_values.grad.clone()
    layer.delta_values.grad = None
    layer(torch.cat([x1, x2])).sum().backward()
    torch.testing.assert_close(acc, layer.delta_values.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("src", STRATEGIES)
@pytest.mark.parametrize("dst", STRATEGIES)
def test_state_dict_roundtrip(src, dst):
    lin = _linear()
    a = _randomize(SparseDeltaLinear.from_linear(copy.deepcopy(lin), k=40, strategy=src, seed=1))
    x = torch.randn(6, 19)
    ya = a(x)  # merged: weight now holds W + S
    b = SparseDeltaLinear.from_linear(copy.deepcopy(lin), k=40, strategy=dst, seed=2)  # other positions
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.delta_indices, a.delta_indices)
    assert_close_rel(b(x), ya.double(), torch.float32)
    b.unmerge()
    assert torch.equal(b.weight, lin.weight), "loading must not leave deltas baked into W"


def test_unmerge_restores_weight_bit_exactly():
    lin = _linear(dtype=torch.bfloat16)
    layer = _randomize(SparseDeltaLinear.from_linear(copy.deepcopy(lin), k=100, strategy="merged"))
    layer(torch.randn(2, 19).bfloat16())
    assert not torch.equal(layer.weight, lin.weight)
    layer.unmerge()
    assert torch.equal(layer.weight, lin.weight) and layer.strategy == "unmerged"
    layer.merge()
    assert layer.strategy == "merged" and not torch.equal(layer.weight, lin.weight)


def test_delta_weight_is_dense_delta():
    layer = _randomize(SparseDeltaLinear.from_linear(_linear(), k=10))
    dw = layer.delta_weight()
    assert dw.shape == (23, 19) and int((dw != 0).sum()) == 10
    assert torch.equal(dw.view(-1)[layer.delta_indices.long()], layer.delta_values.detach())


def test_trainable_state_bytes_with_adam():
    k = 500
    layer = SparseDeltaLinear.from_linear(_linear(64, 128, dtype=torch.bfloat16), k=k)
    opt = torch.optim.Adam([layer.delta_values])
    layer(torch.randn(4, 64).bfloat16()).sum().backward()
    opt.step()
    state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.numel() == k]
    tensors = [layer.delta_values, layer.delta_values.grad, layer.delta_indices, layer.delta_base, *state]
    per_param = sum(t.numel() * t.element_size() for t in tensors) / k
    # values 4 + grad 4 + Adam moments 8 + int32 index 4 + bf16 base 2
    assert per_param == 22 <= 24


def test_bad_indices_rejected_and_nothing_changed():
    lin = _linear()
    w = lin.weight.detach().clone()
    with pytest.raises(ValueError, match="duplicate"):
        SparseDeltaLinear.from_linear(lin, indices=torch.tensor([1, 1, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="out of range"):
        SparseDeltaLinear.from_linear(lin, indices=torch.tensor([1, 19 * 23], dtype=torch.int32))
    with pytest.raises(ValueError, match="exactly one"):
        SparseDeltaLinear.from_linear(lin)
    assert torch.equal(lin.weight, w)
    layer = _randomize(SparseDeltaLinear.from_linear(lin, k=3, strategy="merged"))
    layer(torch.randn(1, 19))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    bad = dict(layer.state_dict())
    bad["deltas.default.indices"] = bad["deltas.default.indices"].flip(0)
    with pytest.raises(ValueError, match="unsorted"):
        layer.load_state_dict(bad)
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())


def test_merged_rejected_for_shared_weight():
    lin = _linear()
    with pytest.raises(ValueError, match="shared"):
        SparseDeltaLinear.from_linear(lin, k=3, strategy="merged", weight_shared=True)
    layer = SparseDeltaLinear.from_linear(lin, k=3, weight_shared=True)
    assert layer.strategy == "unmerged"
    with pytest.raises(RuntimeError, match="shared"):
        layer.merge()


def test_gpt2_conv1d_without_copy():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D
    conv = Conv1D(23, 19)  # nf=out, nx=in; weight stored (in, out)
    x = torch.randn(5, 19)
    expected = conv(x)
    layer = SparseDeltaLinear.from_linear(conv, k=30)
    assert layer.weight is conv.weight and layer.weight_transposed
    assert torch.equal(layer(x), expected)
    _randomize(layer)
    w_oi = conv.weight.detach().t().double().clone()
    layer.unmerge()
    y_ref, _ = oracle_linear(x, conv.weight.t(), conv.bias, layer.delta_values, layer.delta_indices)
    layer.merge()
    assert_close_rel(layer(x), y_ref, torch.float32)
    layer.unmerge()
    assert torch.equal(conv.weight.t().double(), w_oi)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_torch_compile_matches_eager(strategy):
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    model[0] = _randomize(SparseDeltaLinear.from_linear(model[0], k=40, strategy=strategy))
    x = torch.randn(6, 16)
    eager = copy.deepcopy(model)
    y_e = eager(x)
    y_e.sum().backward()
    compiled = torch.compile(model)  # inductor: the backend users get
    y_c = compiled(x)
    y_c.sum().backward()
    torch.testing.assert_close(y_c, y_e)
    torch.testing.assert_close(model[0].delta_values.grad, eager[0].delta_values.grad)


class _DequantizingLinear(nn.Linear):
    """A base layer whose forward is not F.linear on .weight: it dequantizes a scaled int8 copy."""

    def __init__(self, in_f, out_f):
        super().__init__(in_f, out_f)
        scale = self.weight.detach().abs().max() / 127
        self.register_buffer("q", torch.round(self.weight.detach() / scale).to(torch.int8))
        self.register_buffer("scale", scale)

    def forward(self, x):
        return F.linear(x, self.q.float() * self.scale, self.bias)


def test_unmerged_adds_the_sparse_term_to_any_base_layer():
    base = _DequantizingLinear(19, 23)
    weight_before = base.weight.detach().clone()
    layer = _randomize(SparseDeltaLinear.from_linear(base, k=60))
    assert layer.strategy == "unmerged"  # auto: its forward is not x W^T + b on .weight
    with pytest.raises(ValueError, match="not a plain nn.Linear"):
        SparseDeltaLinear.from_linear(_DequantizingLinear(19, 23), k=60, strategy="merged")
    x = torch.randn(3, 5, 19, requires_grad=True)
    y = layer(x)
    w_eff = base.q.double() * base.scale.double()
    y_ref, _ = oracle_linear(x, w_eff, base.bias, layer.delta_values, layer.delta_indices)
    assert_close_rel(y, y_ref, torch.float32)
    dy = torch.randn_like(y)
    y.backward(dy)
    w_total = w_eff + torch.zeros(23 * 19, dtype=torch.float64).index_put_(
        (layer.delta_indices.long(),), layer.delta_values.detach().double()).view(23, 19)
    assert_close_rel(x.grad, dy.double() @ w_total, torch.float32)
    dv = (dy.double().reshape(-1, 23).t() @ x.detach().double().reshape(-1, 19)).reshape(-1)[layer.delta_indices.long()]
    assert_close_rel(layer.delta_values.grad, dv, torch.float32)
    assert torch.equal(base.weight, weight_before)  # never written


def _oracle_out(weight, bias, layer, x):
    w = weight.detach().clone().reshape(-1)
    w[layer.delta_indices.long()] += layer.delta_values.detach()
    return x @ w.view(layer.out_features, layer.in_features).t() + bias


@pytest.mark.parametrize("how", ["prune", "weight_norm"])
def test_a_weight_computed_from_other_tensors_never_merges_and_is_applied_exactly(how):
    from torch.nn.utils import parametrizations, prune

    def computed(lin):
        if how == "prune":
            prune.l1_unstructured(lin, "weight", 0.5)
        else:
            parametrizations.weight_norm(lin)
        return lin
    torch.manual_seed(0)
    lin = computed(nn.Linear(8, 6))
    with pytest.raises(ValueError, match="computed from other tensors"):
        SparseDeltaLinear.from_linear(lin, k=10, strategy="merged")
    layer = SparseDeltaLinear.from_linear(lin, k=10)
    assert layer.strategy == "unmerged"  # auto
    layer.delta_values.data.normal_()
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x), _oracle_out(lin.weight, lin.bias, layer, x), rtol=1e-5, atol=1e-6)
    # pruned or parametrized after patching: a merged layer refuses its next forward instead of losing S
    lin = nn.Linear(8, 6)
    original = lin.weight.detach().clone()
    layer = SparseDeltaLinear.from_linear(lin, k=10, strategy="merged")
    layer.delta_values.data.normal_()
    layer(x)  # W + S written
    computed(layer.base_layer)
    with pytest.raises(RuntimeError, match="unmerge"):
        layer(x)
    if how == "weight_norm":  # W + S went into g and v: nothing single to restore, refused naming the way out
        with pytest.raises(RuntimeError, match="remove the parametrization"):
            layer.unmerge()
        return
    layer.unmerge()  # restores the Parameter the weight is now computed from
    assert torch.equal(layer.base_layer.weight_orig, original)
    torch.testing.assert_close(layer(x), _oracle_out(layer.base_layer.weight, lin.bias, layer, x), rtol=1e-5,
                               atol=1e-6)


def test_multihead_attention_out_proj_is_never_a_target():
    from apet_kernels import ApetConfig, get_apet_model

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(self.attn(x, x, x)[0])
    # MultiheadAttention reads out_proj.weight itself: deltas there would never get a gradient
    model = get_apet_model(Block(), ApetConfig(density=0.1))
    assert list(model.apet_layers()) == ["fc"]
    with pytest.raises(ValueError, match="reads out_proj.weight directly"):
        get_apet_model(Block(), ApetConfig(density=0.1, target_modules=["out_proj", "fc"]))


def test_swap_based_moves_work(monkeypatch):
    # torch's swap_tensors (what .to() uses for tensor subclasses, and for every tensor under this flag)
    # refuses tensors that are weakly referenced: nothing of ours may hold a weak reference to a Parameter
    monkeypatch.setattr(torch.__future__, "get_swap_module_params_on_conversion", lambda: True)
    layer = SparseDeltaLinear.from_linear(nn.Linear(8, 6), k=10, strategy="merged")
    layer.add_adapter("b", torch.tensor([1, 2, 3], dtype=torch.int32))
    layer.set_adapter("b")
    layer.set_adapter("default")
    weight = layer.weight
    layer.to(torch.float64)
    assert layer.weight is weight and weight.dtype == torch.float64  # swapped in place
    assert layer.deltas["b"].values.dtype == torch.float64
    layer(torch.randn(2, 8, dtype=torch.float64)).sum().backward()


@pytest.mark.parametrize("backend", ["native", "triton"])  # (the reference backend is the oracle, not fast)
def test_an_unmerged_plain_layer_forms_dx_in_one_buffer(backend):
    """dx = dy W, then dx += dy S in place (one node: apet_native::linear_sparse, or its Python twin for the other
    backends): no zero-filled second dx and no pass adding two of them, which the base layer's node plus a
    separate sparse node cost."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                self.seen.append((func.overloadpacket.__name__, tuple(out.shape)))
            return out

    if not backends()[backend]["available"]:
        pytest.skip(f"{backend}: {backends()[backend]['reason']}")
    layer = _randomize(SparseDeltaLinear.from_linear(_linear(), k=50, strategy="unmerged", backend=backend))
    x = torch.randn(3, 9, 19, requires_grad=True)
    y = layer(x)
    dy = torch.randn_like(y)
    with Ops() as ops:
        y.backward(dy)
    dx_sized = [name for name, shape in ops.seen if shape in ((3, 9, 19), (27, 19))]
    assert not [n for n in dx_sized if n in ("zeros", "zero_", "fill_", "add", "add_", "new_zeros")], dx_sized
    w_eff = layer.weight.detach().double() + dense_delta(layer.delta_indices, layer.delta_values, (23, 19))
    assert_close_rel(x.grad, dy.double() @ w_eff, torch.float32)
    assert_close_rel(y, x.detach().double() @ w_eff.t() + layer.bias.detach().double(), torch.float32)
    dv = (dy.reshape(-1, 23).double().t() @ x.detach().reshape(-1, 19).double()).reshape(-1)
    assert_close_rel(layer.delta_values.grad, dv[layer.delta_indices.long()], torch.float32)
