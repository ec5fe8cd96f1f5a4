import pytest
import torch

import apet_kernels
from apet_kernels.ops import dispatch


def test_backends_report_availability_and_reasons():
    status = apet_kernels.backends()
    assert set(status) == {"reference", "triton", "native"}
    for name, entry in status.items():
        assert isinstance(entry["available"], bool) and isinstance(entry["reason"], str) and entry["reason"]
    assert status["reference"]["available"]


def test_auto_on_cpu_prefers_native_then_reference():
    expected = "native" if apet_kernels.backends()["native"]["available"] else "reference"
    assert dispatch.resolve("auto", torch.device("cpu")) == expected


def test_env_override_and_bad_names(monkeypatch):
    monkeypatch.setenv("APET_BACKEND", "reference")
    assert dispatch.resolve("auto", torch.device("cpu")) == "reference"
    monkeypatch.setenv("APET_BACKEND", "fast")
    with pytest.raises(ValueError, match="APET_BACKEND"):
        dispatch.resolve("auto", torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown backend"):
        dispatch.resolve("cuda", torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_triton_on_cpu_without_interpreter_says_so(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dispatch.resolve("triton", torch.device("cpu"))


def test_native_ops_have_cpu_and_cuda_kernels():
    status = apet_kernels.backends()["native"]
    if not status["available"]:
        pytest.skip(f"native unavailable: {status['reason']}")
    from apet_kernels.ops import native
    keys = ["CPU"] + (["CUDA"] if torch.version.cuda else [])
    for op in native.OPS:
        for key in keys:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"apet_native::{op}", key), (op, key)


def test_native_errors_name_the_problem():
    status = apet_kernels.backends()["native"]
    if not status["available"]:
        pytest.skip(f"native unavailable: {status['reason']}")
    x, dy = torch.randn(4, 6), torch.randn(4, 5)
    idx = torch.tensor([1, 7], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="row_ptr has"):
        torch.ops.apet_native.sddmm_(torch.empty(2), dy, x, idx, torch.zeros(3, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="must share one dtype"):
        torch.ops.apet_native.sddmm_(torch.empty(2), dy, x.double(), idx, torch.zeros(6, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="int32 or int64"):
        torch.ops.apet_native.sddmm_(torch.empty(2), dy, x, idx.float(), torch.zeros(6, dtype=torch.int32))


def test_cuda_auto_picks_per_op_by_size(monkeypatch):
    status = apet_kernels.backends()
    if not (status["triton"]["available"] and status["native"]["available"]):
        pytest.skip("needs both triton and native")
    calls = []
    from apet_kernels.ops import native
    from apet_kernels.ops.triton import kernels
    monkeypatch.setattr(native, "sddmm", lambda *a, **k: calls.append("native"))
    monkeypatch.setattr(kernels, "sddmm", lambda *a, **k: calls.append("triton"))
    dispatch._cuda_auto.cache_clear()
    try:
        auto = dispatch.implementation(dispatch.CUDA_AUTO)
        auto.sddmm(torch.empty(2, 64), torch.empty(2, 32), None)
        auto.sddmm(torch.empty(2, 8192), torch.empty(2, 4096), None)
    finally:
        dispatch._cuda_auto.cache_clear()
    assert calls == ["native", "triton"]


def test_native_fingerprint_sees_every_single_bit_change():
    status = apet_kernels.backends()["native"]
    if not status["available"]:
        pytest.skip(f"native unavailable: {status['reason']}")
    from apet_kernels.ops.native import fingerprint
    values = torch.randn(37)  # 148 bytes: four-lane stripes, an 8-byte tail and a 4-byte tail
    base = fingerprint(values)
    assert fingerprint(values.clone()) == base
    seen = {base}
    raw = values.view(torch.int32)
    for i in range(values.numel()):
        for bit in (0, 13, 31):
            flipped = raw.clone()
            flipped[i] ^= (1 << bit) if bit < 31 else -(2**31)
            seen.add(fingerprint(flipped.view(torch.float32)))
    assert len(seen) == 1 + 3 * values.numel()
    assert fingerprint(values[:-1].clone()) != base and fingerprint(values.view(torch.int32)) != base
    assert fingerprint(torch.empty(0)) != fingerprint(torch.empty(0, dtype=torch.float16))


def test_native_kernels_refuse_indices_that_disagree_with_their_layout():
    # with validation off the kernels trust the indices, but never touch memory outside their tensors
    status = apet_kernels.backends()["native"]
    if not status["available"]:
        pytest.skip(f"native unavailable: {status['reason']}")
    from apet_kernels.ops import build_layout
    dy, x, w = torch.randn(70, 5), torch.randn(70, 6), torch.randn(5, 6)
    good = torch.tensor([1, 7, 20, 29], dtype=torch.int32)
    layout = build_layout(good, (5, 6))
    moved = torch.tensor([1, 7, 27, 29], dtype=torch.int32)  # 27: row 4, col 3; the layout says row 3, col 2
    unsorted = torch.tensor([29, 1, 7, 20], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="do not match the layout"):
        torch.ops.apet_native.sddmm_(torch.empty(4), dy, x, moved, layout.row_ptr)
    with pytest.raises(RuntimeError, match="do not match the layout"):
        torch.ops.apet_native.spmm_(dy.clone(), x, moved, torch.ones(4), layout.row_ptr)
    with pytest.raises(RuntimeError, match="do not match the layout"):
        torch.ops.apet_native.spmm_t_(x.clone(), dy, moved, torch.ones(4), layout.col_ptr, layout.col_perm)
    before = w.clone()
    with pytest.raises(RuntimeError, match="unsorted or out of range"):
        torch.ops.apet_native.scatter_merge_(w, unsorted, torch.zeros(4), torch.ones(4))
    untouched = torch.ones(30, dtype=torch.bool)
    untouched[unsorted.long()] = False
    assert torch.equal(w.view(-1)[untouched], before.view(-1)[untouched])
