"""sparse_delta_linear against an independent dense float64 computation, per backend."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from _helpers import BACKENDS, assert_close_rel, backend_param, dense_delta, oracle_linear, random_indices
from apet_kernels import backends, sparse_delta_linear
from apet_kernels.ops import build_layout
from apet_kernels.ops.library import BODIES

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (leading dims of x, out, in, k, bias): T=1, K=0, K=out*in, 3-D x, no bias, odd sizes
SHAPES = [((1,), 5, 7, 3, True), ((13,), 17, 19, 0, True), ((9,), 6, 4, 24, False),
          ((2, 5), 23, 31, 40, True), ((37,), 45, 53, 300, False)]


def _inputs(lead, out_f, in_f, k, bias, dtype, index_dtype=torch.int32):
    x = torch.randn(*lead, in_f).to(dtype).requires_grad_()
    w = (torch.randn(out_f, in_f) / in_f ** 0.5).to(dtype)
    b = torch.randn(out_f).to(dtype).requires_grad_() if bias else None
    idx = random_indices((out_f, in_f), k, dtype=index_dtype)
    v = torch.randn(k, dtype=torch.float32).requires_grad_()
    return x, w, b, v, idx


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,out_f,in_f,k,bias", SHAPES)
def test_forward_and_grads_match_dense(backend, dtype, lead, out_f, in_f, k, bias):
    x, w, b, v, idx = _inputs(lead, out_f, in_f, k, bias, dtype)
    y = sparse_delta_linear(x, w, b, v, idx, backend=backend)
    assert y.shape == (*lead, out_f) and y.dtype == dtype
    y_ref, w_eff = oracle_linear(x, w, b, v, idx)
    assert_close_rel(y, y_ref, dtype)
    dy = torch.randn_like(y)
    y.backward(dy)
    dy64, x64 = dy.double().reshape(-1, out_f), x.detach().double().reshape(-1, in_f)
    assert_close_rel(x.grad, (dy64 @ w_eff).reshape(x.shape), dtype)
    if k:
        dv_ref = (dy64.t() @ x64).reshape(-1)[idx.long()]
        assert v.grad.dtype == torch.float32
        assert_close_rel(v.grad, dv_ref, dtype)
    if bias:
        assert_close_rel(b.grad, dy64.sum(0), dtype)
    assert not w.requires_grad and w.grad is None


@pytest.mark.parametrize("backend", [backend_param("reference"), backend_param("native")])  # Triton: no fp64
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_gradcheck_float64(backend, index_dtype):
    x, w, b, v, idx = _inputs((4,), 6, 5, 9, True, torch.float64, index_dtype)
    v = v.detach().double().requires_grad_()
    fn = lambda x_, b_, v_: sparse_delta_linear(x_, w, b_, v_, idx, backend=backend)
    assert torch.autograd.gradcheck(fn, (x, b, v))


def test_weight_is_merged_only_needs_plain_linear():
    x, w, b, v, idx = _inputs((8,), 10, 12, 20, True, torch.float32)
    w_merged = w + dense_delta(idx, v, w.shape).float()
    y = sparse_delta_linear(x, w_merged, b, v, idx, weight_is_merged=True)
    y.sum().backward()
    y_ref, _ = oracle_linear(x, w, b, v, idx)
    assert_close_rel(y, y_ref, torch.float32)
    assert_close_rel(v.grad, (torch.ones(8, 10).double().t() @ x.detach().double()).reshape(-1)[idx.long()],
                     torch.float32)


class _RecordSizes(TorchDispatchMode):
    """Records the element count of every tensor any op allocates, inside apet ops too (views of an
    input, such as the transposed weight inside F.linear's backward, allocate nothing)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "apet":
            with self:  # run the op's Python body with this mode active again
                out = BODIES[func._opname](*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        self.sizes += [t.numel() for t in tree_leaves(out)
                       if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs]
        return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("merged", [False, True])
def test_backward_never_allocates_out_by_in(backend, merged):
    out_f, in_f, tokens = 24, 40, 16  # tokens differ from both dims, so T*dim != out*in
    x, w, b, v, idx = _inputs((tokens,), out_f, in_f, 30, True, torch.float32)
    y = sparse_delta_linear(x, w, b, v, idx, backend=backend, weight_is_merged=merged)
    rec = _RecordSizes()
    with rec:
        y.backward(torch.randn_like(y))
    assert v.grad is not None and x.grad is not None
    assert rec.sizes, "the recorder saw no tensors: it is not observing the backward"
    assert out_f * in_f not in rec.sizes, f"backward created an out x in tensor: {rec.sizes}"
    if backend == "reference":  # the Triton interpreter allocates scratch copies of its own
        assert max(rec.sizes) <= tokens * max(out_f, in_f)


def test_opcheck_schemas_fakes_and_autograd():
    x, _, _, v, idx = _inputs((6,), 7, 9, 11, True, torch.float32)
    layout = build_layout(idx, (7, 9))
    dy = torch.randn(6, 7)
    torch.library.opcheck(torch.ops.apet.sddmm.default, (dy, x.detach(), idx, layout.row_ptr, "reference"))
    torch.library.opcheck(torch.ops.apet.spmm_.default,
                          (torch.randn(6, 7), x.detach(), idx, v.detach(), layout.row_ptr, "reference"))
    torch.library.opcheck(torch.ops.apet.spmm_t_.default,
                          (torch.randn(6, 9), dy, idx, v.detach(), layout.col_ptr, layout.col_perm, "reference"))
    torch.library.opcheck(torch.ops.apet.scatter_merge_.default,
                          (torch.randn(7, 9), idx, torch.randn(11), v.detach(), "reference"))


BAD_CASES = {
    "float indices": (lambda x, w, b, v, i: (x, w, b, v, i.float()), TypeError, "int32 or int64"),
    "out of range": (lambda x, w, b, v, i: (x, w, b, v, torch.cat([i[:-1], i.new_tensor([w.numel()])])),
                     ValueError, "out of range"),
    "unsorted": (lambda x, w, b, v, i: (x, w, b, v, i.flip(0)), ValueError, "unsorted"),
    "duplicate": (lambda x, w, b, v, i: (x, w, b, v, torch.cat([i[:1], i[:-1]])), ValueError, "duplicate"),
    "length mismatch": (lambda x, w, b, v, i: (x, w, b, v[:-1], i), ValueError, "values have shape"),
    "in_features": (lambda x, w, b, v, i: (x[:, :-1], w, b, v, i), ValueError, "last dimension"),
    "int values": (lambda x, w, b, v, i: (x, w, b, v.long(), i), TypeError, "floating point"),
    "dtype mismatch": (lambda x, w, b, v, i: (x.double(), w, b, v, i), TypeError, "share one floating dtype"),
    "bias shape": (lambda x, w, b, v, i: (x, w, b[:-1], v, i), ValueError, "bias has shape"),
    "2-D indices": (lambda x, w, b, v, i: (x, w, b, v, i.view(1, -1)), ValueError, "1-D"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_names_the_problem_and_changes_nothing(case):
    make, exc, message = BAD_CASES[case]
    x, w, b, v, idx = _inputs((5,), 8, 6, 10, True, torch.float32)
    args = make(x.detach(), w, b.detach(), v.detach(), idx)
    before = [a.clone() for a in args if isinstance(a, torch.Tensor)]
    with pytest.raises(exc, match=message):
        sparse_delta_linear(*args)
    after = [a for a in args if isinstance(a, torch.Tensor)]
    assert all(torch.equal(p, q) for p, q in zip(before, after))


def test_device_mismatch_is_reported():
    x, w, b, v, idx = _inputs((5,), 8, 6, 10, True, torch.float32)
    meta_w = w.to("meta")
    with pytest.raises(ValueError, match="one device"):
        sparse_delta_linear(x, meta_w, None, v, idx)


def test_validation_can_be_switched_off_and_on(monkeypatch):
    x, w, b, v, idx = _inputs((5,), 8, 6, 10, True, torch.float32)
    bad = idx.flip(0)
    # trusted caller: no Python-side read of the indices (the reference backend computes garbage)
    sparse_delta_linear(x, w, b, v, bad, validate=False, backend="reference")
    if backends()["native"]["available"]:  # the C++ kernels still never access memory outside W, x or y
        with pytest.raises(RuntimeError, match="do not match"):
            sparse_delta_linear(x, w, b, v, bad, validate=False, backend="native")
    monkeypatch.setenv("APET_VALIDATE", "1")
    with pytest.raises(ValueError, match="unsorted"):
        sparse_delta_linear(x, w, b, v, bad, validate=None)
