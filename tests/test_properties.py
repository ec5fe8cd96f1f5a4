"""Property-based: sparse_delta_linear on random shapes, K, dtypes, strides and strategies, every backend.

Shapes include 0- and 1-sized dimensions, K runs from 0 to out*in, and x, W and the indices come
as contiguous tensors or as strided views. Output and every gradient are compared elementwise with
a float64 dense oracle, against the rounding-error bound of a dot product (|x| |W|^T scaled by the
dtype's tolerance), so tiny or cancelling outputs are judged fairly. The example count comes from
the Hypothesis profile (conftest.py: ``ci`` unless HYPOTHESIS_PROFILE says otherwise).
"""

import math

import pytest
import torch

from _helpers import dense_delta
from apet_kernels import backends, sparse_delta_linear

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

AVAILABLE = [name for name in ("reference", "native", "triton") if backends()[name]["available"]]
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


@st.composite
def problems(draw):
    backend = draw(st.sampled_from(AVAILABLE))
    dtypes = [torch.float32, torch.bfloat16, torch.float16] + ([torch.float64] if backend != "triton" else [])
    dtype = draw(st.sampled_from(dtypes))
    # mostly tiny (0- and 1-sized dims), sometimes past the kernels' tile edges (16, 32, 64)
    dim = st.one_of(st.integers(0, 9), st.integers(10, 70))
    out_f, in_f = draw(dim), draw(dim)
    lead = draw(st.sampled_from([(), (2,)])) + (draw(st.one_of(st.integers(0, 6), st.integers(7, 40))),)
    k = draw(st.integers(0, out_f * in_f))
    seed = draw(st.integers(0, 2**31 - 1))
    layout = dict(x_strided=draw(st.booleans()), w_transposed=draw(st.booleans()),
                  idx_strided=draw(st.booleans()), idx64=draw(st.booleans()))
    return dict(backend=backend, dtype=dtype, out_f=out_f, in_f=in_f, lead=lead, k=k, seed=seed,
                merged=draw(st.booleans()), bias=draw(st.booleans()), **layout)


def _build(p):
    g = torch.Generator().manual_seed(p["seed"])
    dtype, out_f, in_f, k = p["dtype"], p["out_f"], p["in_f"], p["k"]
    x = torch.randn(*p["lead"], 2 * in_f if p["x_strided"] else in_f, generator=g).to(dtype)
    x = x[..., ::2] if p["x_strided"] else x  # a view with stride 2 in the feature dimension
    if p["w_transposed"]:  # (out, in) view of an (in, out) storage, as GPT-2's Conv1D keeps it
        w = torch.randn(in_f, out_f, generator=g).to(dtype).t()
    else:
        w = torch.randn(out_f, in_f, generator=g).to(dtype)
    chosen = torch.sort(torch.randperm(out_f * in_f, generator=g)[:k]).values
    idx_dtype = torch.int64 if p["idx64"] else torch.int32
    if p["idx_strided"]:  # every other element of an interleaved tensor: sorted, unique, stride 2
        idx = torch.stack([chosen, chosen]).t().reshape(-1).to(idx_dtype)[::2]
    else:
        idx = chosen.to(idx_dtype)
    v = torch.randn(k, generator=g)
    b = torch.randn(out_f, generator=g).to(dtype) if p["bias"] else None
    return x, w, b, v, idx


def _within_bound(actual, expected, bound, dtype, what):
    err = (actual.detach().double() - expected).abs()
    limit = TOL[dtype] * (bound + 1e-30) * 4 + 1e-30
    worst = float((err - limit).max()) if err.numel() else 0.0
    assert worst <= 0, f"{what}: error exceeds the rounding bound by {worst:.3g}"


@hypothesis.given(problems())
def test_sparse_delta_linear_matches_dense_oracle(p):
    x, w, b, v, idx = _build(p)
    dtype, out_f, in_f = p["dtype"], p["out_f"], p["in_f"]
    s = dense_delta(idx, v, (out_f, in_f))
    w_eff = (w.double() + s).to(dtype) if p["merged"] else w  # merged: W already holds cast(W + S)
    exact_w = w_eff.double() if p["merged"] else w.double() + s
    # unmerged adds two rounded products (x W and x S): its error scales with |W| + |S|, not |W + S|
    abs_w = exact_w.abs() if p["merged"] else w.double().abs() + s.abs()
    x = x.requires_grad_()
    v = v.requires_grad_()
    b = b.requires_grad_() if b is not None else None
    y = sparse_delta_linear(x, w_eff, b, v, idx, backend=p["backend"], weight_is_merged=p["merged"])
    assert y.shape == (*p["lead"], out_f) and y.dtype == dtype

    tokens = math.prod(p["lead"])
    x64 = x.detach().double().reshape(tokens, in_f)
    y_ref = x64 @ exact_w.t() + (b.detach().double() if b is not None else 0)
    y_bound = x64.abs() @ abs_w.t() + (b.detach().double().abs() if b is not None else 0)
    _within_bound(y.reshape(tokens, out_f), y_ref, y_bound, dtype, "output")

    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(p["seed"] + 1)).to(dtype)
    y.backward(dy)
    dy64 = dy.double().reshape(tokens, out_f)
    _within_bound(x.grad.reshape(tokens, in_f), dy64 @ exact_w, dy64.abs() @ abs_w, dtype, "dx")
    dv_ref = (dy64.t() @ x64).reshape(-1)[idx.long()]
    dv_bound = (dy64.abs().t() @ x64.abs()).reshape(-1)[idx.long()]
    assert v.grad.dtype == torch.float32 and v.grad.shape == v.shape
    # dv has the values' dtype (fp32): for fp64 inputs it is rounded to fp32 at the end
    _within_bound(v.grad, dv_ref, dv_bound, torch.float32 if dtype == torch.float64 else dtype, "dv")
    if b is not None:
        _within_bound(b.grad, dy64.sum(0), dy64.abs().sum(0), dtype, "db")


BREAKS = {
    "out of range": (lambda idx, n: torch.cat([idx, idx.new_tensor([n])]), ValueError, "out of range"),
    "negative": (lambda idx, n: torch.cat([idx.new_tensor([-1]), idx]), ValueError, "out of range"),
    "duplicate": (lambda idx, n: torch.cat([idx[:1], idx]), ValueError, "duplicate"),
    "unsorted": (lambda idx, n: idx.flip(0), ValueError, "unsorted"),
    "float": (lambda idx, n: idx.float(), TypeError, "int32 or int64"),
}


@hypothesis.given(problems(), st.sampled_from(sorted(BREAKS)))
def test_bad_indices_raise_and_change_nothing(p, brk):
    hypothesis.assume(p["k"] >= 2)
    x, w, b, v, idx = _build(p)
    make, exc, message = BREAKS[brk]
    bad = make(idx.contiguous(), p["out_f"] * p["in_f"])
    v = torch.randn(bad.numel()) if bad.numel() != v.numel() else v
    hypothesis.assume(brk != "unsorted" or bad.numel() > 1)
    before = w.clone()
    with pytest.raises(exc, match=message):
        sparse_delta_linear(x, w, b, v, bad, backend=p["backend"], validate=True)
    assert torch.equal(w, before)
