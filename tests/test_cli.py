"""`python -m apet_kernels`: the environment report and the self-test of every available backend."""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import apet_kernels.__main__ as cli
from apet_kernels.ops.dispatch import implementation


def test_report_and_self_test_run_as_a_user_would():
    out = subprocess.run([sys.executable, "-m", "apet_kernels", "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    result = json.loads(out.stdout)
    env = result["environment"]
    assert env["torch"] == torch.__version__ and set(env["backends"]) == {"reference", "triton", "native"}
    assert result["ok"] is True
    tested = {(r["backend"], r["device"]) for r in result["self_test"] if r["result"] == "ok"}
    assert ("reference", "cpu") in tested
    if env["backends"]["native"]["available"]:
        assert ("native", "cpu") in tested
    for r in result["self_test"]:  # every backend is either tested or skipped with its reason
        assert r["result"] == "ok" or (r["result"] == "skipped" and r["detail"])


def test_text_report_names_backends_and_their_reasons():
    out = subprocess.run([sys.executable, "-m", "apet_kernels", "--no-test"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0
    for line in ("torch: ", "backends:", "  reference  available", "extension build: "):
        assert line in out.stdout, line


def test_self_test_catches_a_wrong_kernel(monkeypatch):
    reference = implementation("reference")
    broken = SimpleNamespace(sddmm=lambda dy, x, idx, row_ptr: reference.sddmm(dy, x, idx) * 1.01,
                             spmm_=reference.spmm_, spmm_t_=reference.spmm_t_,
                             scatter_merge_=lambda w, idx, base, v: None)  # writes nothing
    if not cli.backends()["native"]["available"]:
        pytest.skip("the native extension is not built")
    # the op checks see the broken ops under native's name (its layers run the real ones)
    monkeypatch.setattr(cli, "implementation", lambda name: broken if name == "native" else reference)
    failures = cli.self_test_backend("native", "cpu", torch.float32)
    assert any(f.startswith("sddmm: relative error") for f in failures), failures
    assert any(f.startswith("scatter_merge_") for f in failures), failures
    assert not any(f.startswith("spmm_") for f in failures), failures


def test_build_info_warns_when_torch_changed(monkeypatch):
    import types
    fake = types.ModuleType("apet_kernels._build_info")
    fake.BUILD_INFO = {"kind": "CppExtension", "torch": "2.4.0", "cuda": None, "cuda_archs": None}
    monkeypatch.setitem(sys.modules, "apet_kernels._build_info", fake)
    info = cli.build_info()
    assert info["kind"] == "CppExtension" and "rebuild" in info["warning"]
