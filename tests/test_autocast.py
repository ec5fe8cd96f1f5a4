"""Mixed precision: under torch.autocast (bf16 on the CPU, as Trainer(bf16=True) runs) a patched layer computes
what a dense ``F.linear(x, W + S)`` computes under autocast, forward and gradients, on every backend and both
strategies, for inference too."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from _helpers import BACKENDS, rel_err
from apet_kernels import SparseDeltaLinear

IN, OUT, K = 37, 29, 90


def _dense_oracle(layer, x, dy):
    """y, dx, dv of F.linear(x, W + S) under the same autocast, with S dense (float64 accumulation aside)."""
    w = layer.weight.detach().clone()
    idx = layer.delta_indices.long()
    values = layer.delta_values.detach().clone().requires_grad_(True)
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dense = w.reshape(-1).index_add(0, idx, values.to(w.dtype)).reshape(w.shape)  # W + S, in W's dtype
        y = F.linear(x, dense, layer.bias)
    y.backward(dy)
    return y.detach(), x.grad, values.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("strategy", ["merged", "unmerged"])
def test_autocast_forward_and_gradients_match_a_dense_linear(backend, strategy):
    torch.manual_seed(0)
    layer = SparseDeltaLinear.from_linear(nn.Linear(IN, OUT), k=K, strategy=strategy, backend=backend, seed=2)
    with torch.no_grad():
        layer.delta_values.normal_(0, 0.1)
    x = torch.randn(3, 5, IN)
    dy = torch.randn(3, 5, OUT, dtype=torch.bfloat16)
    y_ref, dx_ref, dv_ref = _dense_oracle(layer, x, dy)
    xg = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(xg)
    assert y.dtype == torch.bfloat16
    y.backward(dy)
    assert xg.grad.dtype == torch.float32 and layer.delta_values.grad.dtype == torch.float32
    # bf16 GEMMs on both sides; the sparse term's own rounding differs from the dense GEMM's by bf16 eps
    assert rel_err(y, y_ref) <= 2e-2
    assert rel_err(xg.grad, dx_ref) <= 2e-2
    assert rel_err(layer.delta_values.grad, dv_ref) <= 2e-2
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # inference too
        assert rel_err(layer(x), y_ref) <= 2e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_with_apet_disabled_gives_the_base_layer(backend):
    torch.manual_seed(1)
    lin = nn.Linear(IN, OUT)
    reference = nn.Linear(IN, OUT)
    reference.load_state_dict(lin.state_dict())
    layer = SparseDeltaLinear.from_linear(lin, k=K, strategy="merged", backend=backend)
    with torch.no_grad():
        layer.delta_values.normal_(0, 0.1)
    x = torch.randn(4, IN, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    layer.apet_disabled = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        y_ref = reference(x_ref)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    assert torch.equal(y, y_ref)
    assert rel_err(x.grad, x_ref.grad) <= 1e-2
