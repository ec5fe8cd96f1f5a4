"""Smoke test of an installed wheel: the extension loads and its CPU ops agree with the reference."""

import torch

import apet_kernels
from apet_kernels.ops import build_layout, native, reference

status = apet_kernels.backends()
print(status)
assert status["native"]["available"], status["native"]["reason"]
dy, x = torch.randn(33, 20), torch.randn(33, 17)
idx = apet_kernels.select_indices((20, 17), 40, seed=1)
got = native.sddmm(dy, x, idx, build_layout(idx, (20, 17)).row_ptr)
want = reference.sddmm(dy, x, idx)
assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (got - want).abs().max()
layer = apet_kernels.SparseDeltaLinear.from_linear(torch.nn.Linear(17, 20), k=30, backend="native")
layer(torch.randn(3, 17)).sum().backward()  # the C++ autograd node (apet_native::sparse_term)
assert layer.delta_values.grad is not None
if torch.version.cuda:
    for op in native.OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"apet_native::{op}", "CUDA"), op
print("wheel smoke test passed:", apet_kernels.__file__)
