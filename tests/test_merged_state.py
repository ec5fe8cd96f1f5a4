"""The merged weight equals cast(base + values) at every forward, whatever changed the values.

Each test changes the values of a merged layer by one path that bypasses version counters or
tensor attributes, then compares the merged output with the float64 dense oracle for the
values the layer holds now (fp32: to 1e-6 relative), on every backend.
"""

import copy
import pickle
import threading

import pytest
import torch
import torch.nn as nn

from _helpers import BACKENDS, oracle_linear, rel_err
from apet_kernels import SparseDeltaLinear
from apet_kernels.merged_weight import MergedWeight

IN, OUT, K = 19, 23, 60


def _merged(backend, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(IN, OUT)
    pure = (lin.weight.detach().clone(), lin.bias.detach().clone())
    layer = SparseDeltaLinear.from_linear(lin, k=K, strategy="merged", backend=backend, seed=seed)
    layer.delta_values.data.normal_()  # version counter stays 0, as a fresh tensor's
    layer(torch.randn(2, IN))  # W now holds W + S for these values
    return layer, pure


def _assert_follows(layer, pure, x=None, values=None):
    """The layer's output equals the oracle for its current values (or ``values``), to 1e-6."""
    x = torch.randn(7, IN) if x is None else x
    values = layer.delta_values if values is None else values
    expected, _ = oracle_linear(x, pure[0], pure[1], values, layer.delta_indices)
    err = rel_err(layer(x), expected)
    assert err <= 1e-6, f"merged output is stale: relative error {err:.3g}"


def _train(layer, steps=3, **adam):
    opt = torch.optim.AdamW([layer.delta_values], lr=0.1, **adam)
    for _ in range(steps):
        opt.zero_grad()
        layer(torch.randn(5, IN)).square().mean().backward()
        opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_deepcopy_then_fused_adamw_follows_values(backend):
    layer, pure = _merged(backend)
    clone = copy.deepcopy(layer)
    _train(clone, fused=True)  # fused AdamW does not bump version counters
    _assert_follows(clone, pure)
    _assert_follows(layer, pure)  # the original is untouched by the copy's training
    assert not torch.equal(clone.delta_values, layer.delta_values)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pickled_copy_then_fused_adamw_follows_values(backend):
    layer, pure = _merged(backend)
    clone = pickle.loads(pickle.dumps(layer))
    _train(clone, fused=True)
    _assert_follows(clone, pure)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("edit", ["data.add_", "data =", "vector_to_parameters", "new Parameter"])
def test_edits_that_bypass_version_counters_reach_the_forward(backend, edit):
    layer, pure = _merged(backend)
    new = torch.randn(K)
    if edit == "data.add_":
        layer.delta_values.data.add_(new)
    elif edit == "data =":
        layer.delta_values.data = new.clone()
    elif edit == "vector_to_parameters":
        torch.nn.utils.vector_to_parameters(new.clone(), [layer.delta_values])
    else:
        layer.delta_values = nn.Parameter(new.clone())
    _assert_follows(layer, pure)


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_state_dict_assign_follows_values(backend):
    layer, pure = _merged(backend)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["deltas.default.values"] = torch.randn(K)
    layer.load_state_dict(state, assign=True)
    assert layer.delta_values.requires_grad
    _assert_follows(layer, pure)
    assert torch.equal(layer.delta_values, state["deltas.default.values"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_call_uses_the_values_it_is_given(backend):
    layer, pure = _merged(backend)
    other = torch.randn(K)
    x = torch.randn(6, IN)
    y = torch.func.functional_call(layer, {"deltas.default.values": other}, (x,))
    expected, _ = oracle_linear(x, pure[0], pure[1], other, layer.delta_indices)
    assert rel_err(y, expected) <= 1e-6
    _assert_follows(layer, pure, x)  # and the layer's own values again afterwards


@pytest.mark.parametrize("backend", BACKENDS)
def test_deepcopy_of_model_then_fused_adamw_follows_values(backend):
    model = nn.Sequential(nn.Linear(IN, 32), nn.GELU(), nn.Linear(32, OUT))
    pure = {i: (model[i].weight.detach().clone(), model[i].bias.detach().clone()) for i in (0, 2)}
    for i in (0, 2):
        model[i] = SparseDeltaLinear.from_linear(model[i], k=40, strategy="merged", backend=backend, key=str(i))
    x = torch.randn(4, IN)
    model(x)
    clone = copy.deepcopy(model)
    opt = torch.optim.AdamW([clone[0].delta_values, clone[2].delta_values], lr=0.1, fused=True)
    for _ in range(3):
        opt.zero_grad()
        clone(x).square().mean().backward()
        opt.step()
    h = torch.nn.functional.gelu(oracle_linear(x, *pure[0], clone[0].delta_values, clone[0].delta_indices)[0])
    expected, _ = oracle_linear(h, *pure[2], clone[2].delta_values, clone[2].delta_indices)
    assert rel_err(clone(x), expected) <= 1e-6


def test_deepcopy_of_layer_over_tied_weight_still_refuses_to_merge():
    layer = SparseDeltaLinear.from_linear(nn.Linear(IN, OUT), k=K, weight_shared=True)
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert clone.strategy == "unmerged"
        with pytest.raises(RuntimeError, match="shared"):
            clone.merge()


@pytest.mark.parametrize("backend", BACKENDS)
def test_threads_forwarding_while_optimizer_steps_never_leave_it_stale(backend):
    layer, pure = _merged(backend)
    opt = torch.optim.AdamW([layer.delta_values], lr=0.05, fused=True)
    stop = threading.Event()
    errors = []

    def forwards():
        try:
            while not stop.is_set():
                with torch.no_grad():
                    layer(torch.randn(3, IN))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=forwards) for _ in range(3)]
    for t in threads:
        t.start()
    for _ in range(20):
        layer.delta_values.grad = torch.randn(K)
        opt.step()
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors
    _assert_follows(layer, pure)


def test_writes_to_weight_do_not_invalidate_saved_graphs():
    # two forwards (e.g. gradient checkpointing's recompute) before one backward: W's version
    # counter must not move, or autograd refuses the backward
    layer, _ = _merged("reference")
    x = torch.randn(4, IN, requires_grad=True)
    version = layer.weight._version
    y1 = layer(x)
    y2 = layer(x)
    (y1 + y2).sum().backward()
    assert layer.weight._version == version
    assert x.grad is not None and layer.delta_values.grad is not None


def test_cpu_forwards_with_unchanged_values_skip_the_writes(monkeypatch):
    pytest.importorskip("apet_kernels._C", reason="the content hash comes with the native extension")
    from apet_kernels.ops import native
    layer, pure = _merged("native")
    writes = []
    real = native.scatter_merge_
    monkeypatch.setattr(native, "scatter_merge_", lambda *a: (writes.append(1), real(*a)))
    x = torch.randn(3, IN)
    for _ in range(3):
        layer(x)
    assert writes == [], "unchanged values were written again"
    layer.delta_values.data[5] += 1.0  # one value, through .data: only its content says it changed
    _assert_follows(layer, pure, x)
    assert writes == [1]
    with torch.no_grad():
        layer.weight.add_(0.0)  # W changed through its own version counter: written again too
    layer(x)
    assert writes == [1, 1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_merged_weight_invariants(backend):
    """apet_kernels.merged_weight (the merged strategy's state): what W holds at the K positions after each operation, bit for bit, and
    which operations move W's version counter (only the structural ones)."""
    torch.manual_seed(3)
    lin = nn.Linear(IN, OUT)
    with torch.no_grad():
        lin.weight.view(-1)[::5] = -0.0
    pure = lin.weight.detach().clone()
    layer = SparseDeltaLinear.from_linear(lin, k=K, strategy="merged", backend=backend, seed=4)
    merge, idx = MergedWeight.of(layer), layer.delta_indices.long()
    assert torch.equal(layer.delta_base, pure.view(-1)[idx])  # base read from the pure W
    values = torch.randn(K)
    version = lin.weight._version
    merge.write(values, layer._backend_name())
    expected = (pure.view(-1)[idx].float() + values).to(pure.dtype)
    assert torch.equal(lin.weight.view(-1)[idx], expected) and lin.weight._version == version
    outside = torch.ones(IN * OUT, dtype=torch.bool)
    outside[idx] = False
    assert torch.equal(lin.weight.view(-1)[outside], pure.view(-1)[outside])  # nothing else written
    merge.restore()
    assert torch.equal(lin.weight, pure) and torch.equal(torch.signbit(lin.weight), torch.signbit(pure))
    assert lin.weight._version == version
    with merge.pure(values, layer._backend_name()) as w:  # pure inside, W + S after
        assert torch.equal(w, pure)
    assert torch.equal(lin.weight.view(-1)[idx], expected)
    merge.structural_change()
    assert lin.weight._version == version + 1  # a graph saved before now fails its backward in autograd
