"""Liger-Kernel beside APET: its fused linear-cross-entropy reads lm_head.weight directly, so APET stays
off lm_head there and says so when asked to target it. Liger's kernels are Triton kernels that do not
run in Triton's CPU interpreter: the training comparison is a GPU test."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from _helpers import tiny_llama
from apet_kernels import ApetConfig, get_apet_model
from apet_kernels.targets import fuses_output_layer

ROOT = Path(__file__).resolve().parent.parent


def _liger_like(model):
    """The model with a forward that looks like Liger's fused linear-cross-entropy one (instance-level,
    as apply_liger_kernel_to_llama(model=...) patches; the real one patches the class for the process)."""
    def lce_forward(self, *args, **kwargs):
        raise AssertionError("not called")
    lce_forward.__module__ = "liger_kernel.transformers.model.llama"
    model.forward = lce_forward.__get__(model)
    return model


def test_apet_stays_off_lm_head_under_fused_linear_cross_entropy():
    model = _liger_like(tiny_llama())
    assert fuses_output_layer(model) and not fuses_output_layer(tiny_llama())
    with pytest.raises(ValueError, match="fused linear-cross-entropy"):
        get_apet_model(model, ApetConfig(density=0.05, target_modules=["q_proj", "lm_head"]))
    assert not any(type(m).__name__ == "SparseDeltaLinear" for m in model.modules())  # nothing changed
    apet = get_apet_model(model, ApetConfig(density=0.05))  # all-linear leaves the output layer alone
    assert "lm_head" not in apet.apet_layers()
    # without Liger, lm_head can be a target
    assert "lm_head" in get_apet_model(tiny_llama(), ApetConfig(density=0.05, target_modules=["lm_head"])).apet_layers()


SCRIPT = textwrap.dedent("""
    import sys, torch, transformers
    from apet_kernels import ApetConfig, get_apet_model
    liger = sys.argv[1] == "liger"
    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
        apply_liger_kernel_to_llama()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    model = get_apet_model(transformers.LlamaForCausalLM(cfg).cuda(), ApetConfig(density=0.01))
    ids = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(1)).cuda()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward(); opt.step(); opt.zero_grad()
        print(f"LOSS {loss.item():.6f}")
""")


@pytest.mark.gpu
def test_liger_and_apet_train_to_the_same_losses_as_apet_alone():
    pytest.importorskip("liger_kernel")
    losses = {}
    for mode in ("plain", "liger"):  # each in its own process: Liger patches the model classes globally
        out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=300,
                             env={"PYTHONPATH": str(ROOT), **__import__("os").environ})
        assert out.returncode == 0, out.stderr[-3000:]
        losses[mode] = [float(line.split()[1]) for line in out.stdout.splitlines() if line.startswith("LOSS")]
    torch.testing.assert_close(torch.tensor(losses["liger"]), torch.tensor(losses["plain"]), rtol=2e-3, atol=2e-3)
    assert losses["plain"][-1] < losses["plain"][0]
