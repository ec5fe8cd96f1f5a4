"""Every kernel backend (Triton, native) against the reference, one test matrix.

On the CPU: Triton runs in the interpreter and native runs its C++ kernels (small shapes).
On a GPU: the same tests run on CUDA tensors, plus real sizes (marked gpu).
"""

import copy

import pytest
import torch

from _helpers import assert_close_rel, random_indices
from apet_kernels import DenseMaskLinear, SparseDeltaLinear, backends
from apet_kernels.ops import reference as ref
from apet_kernels.ops.dispatch import implementation
from apet_kernels.ops.layout import build_layout

KERNEL_BACKENDS = ["triton", "native"]


@pytest.fixture(params=["triton", "native-gather", "native-blocked"])
def impl(request, monkeypatch):
    """A kernel backend; the native CPU kernels once per walk (csrc/apet_ops.cpp: gather or blocked)."""
    name, _, walk = request.param.partition("-")
    status = backends()[name]
    if not status["available"]:
        pytest.skip(f"{name} unavailable: {status['reason']}")
    if walk == "blocked" and DEVICE == "cuda":
        pytest.skip("the walks are the CPU kernels': on CUDA native runs once (as native-gather)")
    if walk and DEVICE != "cuda":
        monkeypatch.setenv("APET_NATIVE_WALK", walk)
    return implementation(name)


@pytest.fixture
def tk():
    status = backends()["triton"]
    if not status["available"]:
        pytest.skip(f"triton unavailable: {status['reason']}")
    return implementation("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INDEX_DTYPES = [torch.int32, torch.int64]


def _pattern(name, shape, k, index_dtype):
    out_f, in_f = shape
    if name == "random":
        idx = random_indices(shape, k, dtype=torch.int64)
    elif name == "one_row":  # one row holds every delta
        idx = 3 * in_f + torch.sort(torch.randperm(in_f)[:k]).values
    elif name == "few_rows":  # most rows and columns have no delta
        rows = torch.tensor([1, out_f - 2])
        cols = torch.sort(torch.randperm(in_f)[: k // 2]).values
        idx = torch.sort((rows[:, None] * in_f + cols[None, :]).reshape(-1)).values
    else:
        idx = torch.empty(0, dtype=torch.int64)
    return idx.to(index_dtype).to(DEVICE)


# (T, out, in, k, pattern): T=1, K=0, empty rows, a full row, sizes off every block multiple
CASES = [(1, 37, 29, 50, "random"), (70, 45, 53, 300, "random"), (33, 40, 24, 20, "one_row"),
         (17, 33, 65, 40, "few_rows"), (9, 21, 18, 0, "empty")]


def _data(t, out_f, in_f, k, pattern, dtype, index_dtype):
    idx = _pattern(pattern, (out_f, in_f), k, index_dtype)
    v = torch.randn(idx.numel(), device=DEVICE)
    x = torch.randn(t, in_f, device=DEVICE).to(dtype)
    dy = torch.randn(t, out_f, device=DEVICE).to(dtype)
    return x, dy, idx, v


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}-{c[1]}x{c[2]}-k{c[3]}-{c[4]}")
def test_sddmm(impl, case, dtype, index_dtype):
    x, dy, idx, v = _data(*case, dtype, index_dtype)
    layout = build_layout(idx, case[1:3])
    out = torch.full((idx.numel(),), float("nan"), device=DEVICE)  # poison
    got = impl.sddmm(dy, x, idx, layout.row_ptr, out=out)
    assert got.data_ptr() == out.data_ptr() and got.dtype == torch.float32
    if idx.numel():
        assert_close_rel(got, ref.sddmm(dy.double(), x.double(), idx), torch.float32)


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}-{c[1]}x{c[2]}-k{c[3]}-{c[4]}")
def test_spmm_and_spmm_t(impl, case, dtype, index_dtype):
    x, dy, idx, v = _data(*case, dtype, index_dtype)
    t, out_f, in_f = case[:3]
    layout = build_layout(idx, (out_f, in_f))
    y0 = torch.randn(t, out_f, device=DEVICE).to(dtype)
    y = y0.clone()
    impl.spmm_(y, x, idx, v, row_ptr=layout.row_ptr)
    expected = y0.double().clone()
    ref.spmm_(expected, x.double(), idx, v.double())
    assert_close_rel(y, expected, dtype)
    d0 = torch.randn(t, in_f, device=DEVICE).to(dtype)
    d = d0.clone()
    impl.spmm_t_(d, dy, idx, v, col_ptr=layout.col_ptr, col_perm=layout.col_perm)
    expected = d0.double().clone()
    ref.spmm_t_(expected, dy.double(), idx, v.double())
    assert_close_rel(d, expected, dtype)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_merge(impl, dtype, transposed):
    shape = (23, 31)
    w = torch.randn(*shape, device=DEVICE).to(dtype)
    storage = w.t().contiguous() if transposed else w.clone()
    view = storage.t() if transposed else storage  # the (out, in) view, strides as in GPT-2 Conv1D
    idx = random_indices(shape, 100).to(DEVICE)
    base = w.view(-1)[idx.long()].clone()
    v = torch.randn(100, device=DEVICE)
    impl.scatter_merge_(view, idx, base, v)
    expected = w.clone()
    expected.view(-1)[idx.long()] = (base.float() + v).to(dtype)
    assert torch.equal(view, expected)


def test_values_keep_fp32_precision_in_half_dtypes(impl):
    # a delta far below half precision's resolution at 1.0 must still arrive (hi/lo split)
    x = torch.ones(16, 32, device=DEVICE, dtype=torch.float16)
    idx = torch.tensor([5], dtype=torch.int32, device=DEVICE)
    row_ptr = build_layout(idx, (8, 32)).row_ptr
    v = torch.tensor([1.0 + 2.0 ** -14], device=DEVICE)
    out = torch.full((16, 8), 1.0, device=DEVICE, dtype=torch.float16)
    impl.spmm_(out, x, idx, v, row_ptr)
    # row 0 gets 1 + v = 2 + 2^-14, which rounds to 2.0 in fp16, but had v been rounded to
    # fp16 first (1.0) the sum would be 2.0 too, so check a case that tells them apart:
    out2 = torch.full((16, 8), -1.0, device=DEVICE, dtype=torch.float16)
    impl.spmm_(out2, x, idx, v, row_ptr)
    # -1 + (1 + 2^-14) = 2^-14, representable in fp16; v rounded to fp16 would give 0
    assert torch.all(out2[:, 0] == 2.0 ** -14)
    assert torch.all(out[:, 0] == 2.0)


@pytest.mark.parametrize("strategy", ["merged", "unmerged"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_layer_matches_dense_mask(backend, strategy, dtype):
    if not backends()[backend]["available"]:
        pytest.skip(f"{backend} unavailable: {backends()[backend]['reason']}")
    lin = torch.nn.Linear(29, 37).to(DEVICE, dtype)
    layer = SparseDeltaLinear.from_linear(copy.deepcopy(lin), k=90, strategy=strategy, backend=backend)
    with torch.no_grad():
        layer.delta_values.normal_()
    dense = DenseMaskLinear.from_linear(copy.deepcopy(lin), layer.delta_indices)
    with torch.no_grad():
        dense.delta.copy_(layer.delta_weight())
    x = torch.randn(3, 11, 29, device=DEVICE).to(dtype)
    xs, xd = x.clone().requires_grad_(), x.clone().requires_grad_()
    ys, yd = layer(xs), dense(xd)
    assert_close_rel(ys, yd.double(), dtype)
    dy = torch.randn_like(ys)
    ys.backward(dy)
    yd.backward(dy)
    assert_close_rel(xs.grad, xd.grad.double(), dtype)
    dv_dense = dense.delta.grad.view(-1)[layer.delta_indices.long()]
    assert_close_rel(layer.delta_values.grad, dv_dense.double(), dtype)


# ---------------------------------------------------------------- real sizes, GPU only
GPU_SHAPES = [(4096, 4096, 4096), (3001, 4096, 1024)]


@pytest.mark.gpu
@pytest.mark.parametrize("density", [1e-4, 1e-3, 1e-2])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gpu_real_sizes_against_reference(impl, shape, density):
    t, out_f, in_f = shape
    k = int(density * out_f * in_f)
    idx = random_indices((out_f, in_f), k).to(DEVICE)
    v = torch.randn(k, device=DEVICE)
    x = torch.randn(t, in_f, device=DEVICE, dtype=torch.bfloat16)
    dy = torch.randn(t, out_f, device=DEVICE, dtype=torch.bfloat16)
    w = (torch.randn(out_f, in_f, device=DEVICE) / in_f ** 0.5).bfloat16()
    layout = build_layout(idx, (out_f, in_f))
    got = impl.sddmm(dy, x, idx, layout.row_ptr, out=torch.full((k,), float("nan"), device=DEVICE))
    assert_close_rel(got, ref.sddmm(dy.float(), x.float(), idx), torch.float32, factor=10)
    y = torch.nn.functional.linear(x, w)
    impl.spmm_(y, x, idx, v, row_ptr=layout.row_ptr)
    expected = torch.nn.functional.linear(x.float(), w.float())
    ref.spmm_(expected, x.float(), idx, v)
    assert_close_rel(y, expected, torch.bfloat16)
    d0 = torch.randn(t, in_f, device=DEVICE, dtype=torch.bfloat16)
    d = d0.clone()
    impl.spmm_t_(d, dy, idx, v, col_ptr=layout.col_ptr, col_perm=layout.col_perm)
    expected = d0.float()
    ref.spmm_t_(expected, dy.float(), idx, v)
    assert_close_rel(d, expected, torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 130), (65, 64), (100, 3)])
def test_transpose(tk, shape, dtype):
    t = torch.randn(*shape, device=DEVICE).to(dtype)
    got = tk.transpose(t)
    assert got.is_contiguous() and torch.equal(got, t.t())
    assert torch.equal(tk.transpose(t.t().contiguous().t()), t.t())  # non-unit column stride input


@pytest.mark.skipif(not backends()["native"]["available"], reason="the native extension is not built")
def test_the_triton_backend_merges_with_one_native_launch():
    """index_put_ is a chain of small ops; the merged write of every backend is the extension's one kernel."""
    pytest.importorskip("triton")
    from apet_kernels.ops import native
    from apet_kernels.ops.triton import kernels
    assert kernels._native_scatter("cpu") is native.scatter_merge_
    from apet_kernels._build_info import BUILD_INFO
    assert (kernels._native_scatter("cuda") is native.scatter_merge_) == ("CUDA" in BUILD_INFO["kind"])


def test_autotuning_keys_on_token_buckets_not_token_counts():
    """A new sequence length must not stall on autotuning unless it crosses a power of two."""
    pytest.importorskip("triton")
    from apet_kernels.ops.triton import kernels
    assert [kernels.token_bucket(n) for n in (1, 3, 256, 257, 4096)] == [1, 4, 256, 512, 4096]
    for kernel in (kernels._sddmm_kernel, kernels._group_spmm_kernel):
        assert "T_BUCKET" in kernel.keys and not {"T", "T_CHUNK"} & set(kernel.keys)


# ---------------------------------------------------------------- the staged SDDMM (csrc/sddmm_staged.h, issue 31)
@pytest.fixture
def native():
    status = backends()["native"]
    if not status["available"]:
        pytest.skip(f"native unavailable: {status['reason']}")
    from apet_kernels.ops import native
    return native


# (smem_budget bytes, sms, threads) for the emulation: the H100 defaults (one band, one pass, groups), and
# small budgets and thread counts that force many bands (dy rows staged per block), many passes of
# threads * 16 deltas per band, several blocks per band (n_sub), and one or many token groups
STAGED_GRIDS = [(0, 0, 0), (16 * 80, 3, 2), (16 * 70, 50, 1), (16 * 300, 1, 4)]


@pytest.mark.parametrize("grid", STAGED_GRIDS, ids=lambda g: "smem{}-sms{}-threads{}".format(*g))
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES + [(300, 64, 60, 900, "random")],
                         ids=lambda c: f"T{c[0]}-{c[1]}x{c[2]}-k{c[3]}-{c[4]}")
def test_staged_sddmm_against_float64(native, case, dtype, index_dtype, grid):
    """The CUDA kernel's per-thread code (emulated block by block on the CPU, or the kernel on a GPU) against
    float64, into a poisoned output; bit-equal on a second call (the group reduction runs in a fixed order)."""
    smem, sms, threads = grid
    if DEVICE == "cuda" and (threads or smem):
        pytest.skip("on CUDA the kernel runs its own block size and the device's shared memory")
    x, dy, idx, _ = _data(*case, dtype, index_dtype)
    layout = build_layout(idx, case[1:3])
    out = torch.full((idx.numel(),), float("nan"), device=DEVICE)
    got = native.sddmm_staged(dy, x, idx, layout.row_ptr, out=out, smem_budget=smem, sms=sms, threads=threads)
    assert got.data_ptr() == out.data_ptr()
    if idx.numel():
        assert_close_rel(got, ref.sddmm(dy.double(), x.double(), idx), torch.float32)
        again = native.sddmm_staged(dy, x, idx, layout.row_ptr, out=torch.full_like(out, float("nan")),
                                    smem_budget=smem, sms=sms, threads=threads)
        assert torch.equal(again, got)


def test_staged_grids_reach_many_bands_passes_and_groups(native):
    """The grids above are worth running: between them they cut rows into bands, run several blocks per band
    and several passes per block, and split the tokens into groups (the reduction), on the test cases."""
    seen = set()
    for t, out_f, in_f, k, pattern in CASES + [(300, 64, 60, 900, "random")]:
        for smem, sms, threads in STAGED_GRIDS:
            tt, band, n_bands, n_sub, n_groups, group_tokens, smem_bytes = torch.ops.apet_native.sddmm_staged_plan(
                t, out_f, in_f, k, 2, threads or 512, sms or 132, smem or 227 * 1024)
            assert n_bands * band >= out_f > (n_bands - 1) * band and n_groups * group_tokens >= t
            assert group_tokens % tt == 0 and smem_bytes <= (smem or 227 * 1024)
            rows = _pattern(pattern, (out_f, in_f), k, torch.int64).cpu() // in_f
            per_band = torch.bincount(rows // band, minlength=n_bands)
            passes = int(per_band.max()) // (16 * (threads or 512)) + 1 if k else 0  # the densest band's
            seen |= {"bands"} if n_bands > 1 else set()
            seen |= {"blocks per band"} if n_sub > 1 else set()
            seen |= {"passes per block"} if passes > n_sub else set()
            seen |= {"token groups"} if n_groups > 1 else set()
    assert seen == {"bands", "blocks per band", "passes per block", "token groups"}


def test_staged_sddmm_strided_inputs_and_what_does_not_fit(native):
    out_f, in_f, k = 30, 50, 200
    idx = random_indices((out_f, in_f), k).to(DEVICE)
    layout = build_layout(idx, (out_f, in_f))
    x = torch.randn(40, in_f + 7, device=DEVICE)[:, 3:3 + in_f]
    dy = torch.randn(40, out_f + 2, device=DEVICE)[:, :out_f]
    got = native.sddmm_staged(dy, x, idx, layout.row_ptr)
    assert_close_rel(got, ref.sddmm(dy.double(), x.double(), idx), torch.float32)
    if DEVICE == "cpu":  # 50 features need 816 bytes with one row of dy
        with pytest.raises(RuntimeError, match="50 input features do not fit 800 bytes of shared memory"):
            native.sddmm_staged(dy, x, idx, layout.row_ptr, smem_budget=800)


def test_the_native_sddmm_takes_the_staged_kernel_on_request(native, monkeypatch):
    """Only on CUDA tensors (on the CPU the staged op is an emulation), by APET_NATIVE_SDDMM or `chosen`."""
    calls = []
    real = torch.ops.apet_native.sddmm_staged_
    monkeypatch.setattr(native.torch.ops.apet_native, "sddmm_staged_", lambda *a: calls.append(a) or real(*a),
                        raising=False)
    x, dy, idx, _ = _data(8, 12, 10, 20, "random", torch.float32, torch.int64)
    row_ptr = build_layout(idx, (12, 10)).row_ptr
    monkeypatch.setenv("APET_NATIVE_SDDMM", "staged")
    native.sddmm(dy, x, idx, row_ptr)
    assert len(calls) == (1 if DEVICE == "cuda" else 0)
    with native.chosen("warps"):
        native.sddmm(dy, x, idx, row_ptr)
    assert len(calls) == (1 if DEVICE == "cuda" else 0)
    with pytest.raises(ValueError, match="'warps' or 'staged'"):
        with native.chosen("tokens"):
            pass


@pytest.mark.gpu
@pytest.mark.parametrize("density", [1e-4, 1e-3, 1e-2])
@pytest.mark.parametrize("shape", GPU_SHAPES + [(4096, 11008, 4096), (4096, 4096, 11008)],
                         ids=lambda s: "x".join(map(str, s)))
def test_gpu_staged_sddmm_real_sizes(native, shape, density):
    t, out_f, in_f = shape
    k = int(density * out_f * in_f)
    idx = random_indices((out_f, in_f), k).to(DEVICE)
    x = torch.randn(t, in_f, device=DEVICE, dtype=torch.bfloat16)
    dy = torch.randn(t, out_f, device=DEVICE, dtype=torch.bfloat16)
    layout = build_layout(idx, (out_f, in_f))
    got = native.sddmm_staged(dy, x, idx, layout.row_ptr, out=torch.full((k,), float("nan"), device=DEVICE))
    assert_close_rel(got, ref.sddmm(dy.float(), x.float(), idx), torch.float32, factor=10)
    assert torch.equal(native.sddmm_staged(dy, x, idx, layout.row_ptr), got)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 29), (70, 45)])
def test_slot_spmm_applies_each_tokens_adapter(tk, shape, dtype):
    """Serving: one launch adds each token's adapter (its slot in a stacked table; -1: none) to its output row. Three
    adapters of different K, an empty slot, base tokens, and a capacity above every K (the padding must not count)."""
    from apet_kernels.ops.layout import stack_slots
    out_f, in_f = shape
    adapters = [(random_indices(shape, k, dtype=torch.int64), torch.randn(k)) for k in (50, 7, 200)]
    table = stack_slots([adapters[0], None, adapters[1], adapters[2]], shape, capacity=211, dtype=torch.float32,
                        device=DEVICE)
    token_slots = torch.tensor([0, -1, 2, 3, 3, 1, 0, -1, 2, 2, 3, 0, -1], device=DEVICE)
    x = torch.randn(len(token_slots), in_f, device=DEVICE).to(dtype)
    y0 = torch.randn(len(token_slots), out_f, device=DEVICE).to(dtype)  # (accumulated into: never zeros)
    y = y0.clone()
    tk.slot_spmm_(y, x, token_slots, *table)
    expected = y0.double()
    for t, slot in enumerate(token_slots.tolist()):
        adapter = {0: adapters[0], 2: adapters[1], 3: adapters[2]}.get(slot)
        if adapter is not None:
            row = expected[t:t + 1].clone()
            ref.spmm_(row, x[t:t + 1].double(), adapter[0].to(DEVICE), adapter[1].double().to(DEVICE))
            expected[t] = row[0]
    assert_close_rel(y, expected, dtype)
    assert torch.equal(y[token_slots < 0], y0[token_slots < 0])  # base tokens untouched, bit for bit
    again = y0.double()
    ref.slot_spmm_(again, x.double(), token_slots, table.indices, table.values.double(), table.row_ptr)
    torch.testing.assert_close(again, expected)
