"""``import apet_kernels`` installs no process-wide hook; the first APET layer or tuner installs what is needed, in one
place (apet_kernels.process_hooks), and the last unload() removes every handle (issue 41). Run in a fresh
interpreter: other tests in this worker may hold layers."""

import subprocess
import sys
from pathlib import Path

SCRIPT = r"""
import torch, peft, apet_kernels
from torch.nn.modules import module as M
from torch.optim import optimizer as O
from apet_kernels import process_hooks
from _helpers import tiny_llama

def state():
    return process_hooks.installed(), len(M._global_module_registration_hooks), len(O._global_optimizer_pre_hooks)

assert state() == ([], 0, 0), state()
in_place = apet_kernels.get_apet_model(tiny_llama(), apet_kernels.ApetConfig(num_params=400))
in_place.add_adapter(apet_kernels.ApetConfig(num_params=400, seed=1), "b")
in_place.set_adapter("b")  # (an optimizer check: adapters that are no longer trained)
assert state() == (["module registration", "optimizer step"], 1, 1), state()
wrapped = peft.get_peft_model(tiny_llama(), apet_kernels.ApetConfig(num_params=400))
assert "load_state_dict" in wrapped.__dict__  # adopted through the registration hook
in_place.unload()
assert state()[0] == ["module registration", "optimizer step"], state()  # (the PeftModel still needs them)
wrapped.unload()
assert state() == ([], 0, 0), state()
print("ok")
"""


def test_hooks_come_with_the_first_layer_and_go_with_the_last_unload():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).parent)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
