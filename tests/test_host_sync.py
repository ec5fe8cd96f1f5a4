"""A training step of a patched model never makes the host wait for the GPU (issue 22): no .item(), no
data-dependent shapes, no validation reads of the indices. torch.cuda.set_sync_debug_mode("error") turns any
synchronizing call into an error. GPU only."""

import pytest
import torch

from _helpers import tiny_llama
from apet_kernels import ApetConfig, backends, get_apet_model


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("strategy", ["merged", "unmerged"])
def test_a_training_step_never_synchronizes_the_host(strategy, backend):
    pytest.importorskip("transformers")
    if not backends()[backend]["available"]:
        pytest.skip(f"{backend}: {backends()[backend]['reason']}")
    model = get_apet_model(tiny_llama().cuda(), ApetConfig(density=0.05, strategy=strategy, backend=backend))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, 99, (2, 16), device="cuda")

    def step():
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):  # autotuning, lazy initialization and the first layouts may synchronize
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
