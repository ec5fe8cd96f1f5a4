// The sparse term's autograd in C++, for the native backend: the same math as SparseDeltaTerm in
// apet_kernels/ops/library.py, with no Python in the forward call, none in the backward node.
// (The Python Function costs tens of microseconds of host time per layer and step: measured with
// bench/forward_overhead.py.)
//   unmerged: y += x S^T in place; backward dx = dy S (SpMM^T), dv = SDDMM(dy, x)
//   merged (W already holds W + S): y passes through; backward dv = SDDMM(dy, x) only
//   linear_sparse: a plain unmerged layer's GEMM and sparse term as one node (dx in one buffer)
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace apet {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// (..., n) -> (tokens, n). Not reshape({-1, n}): ambiguous when a dimension is 0.
at::Tensor as_tokens(const at::Tensor& t) {
  int64_t tokens = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) tokens *= t.size(d);
  return t.reshape({tokens, t.size(-1)});
}

// The native ops through the dispatcher, so the CPU or CUDA kernel runs as the tensors say.
void spmm_(const at::Tensor& out, const at::Tensor& x, const at::Tensor& indices, const at::Tensor& values,
           const at::Tensor& row_ptr) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("apet_native::spmm_", "")
                       .typed<void(at::Tensor, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&)>();
  op.call(out, x, indices, values, row_ptr);
}

void spmm_t_(const at::Tensor& out, const at::Tensor& dy, const at::Tensor& indices, const at::Tensor& values,
             const at::Tensor& col_ptr, const at::Tensor& col_perm) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("apet_native::spmm_t_", "")
                       .typed<void(at::Tensor, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, const at::Tensor&)>();
  op.call(out, dy, indices, values, col_ptr, col_perm);
}

void sddmm_(const at::Tensor& out, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& indices,
            const at::Tensor& row_ptr) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("apet_native::sddmm_", "")
                       .typed<void(at::Tensor, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&)>();
  op.call(out, dy, x, indices, row_ptr);
}

class SparseTerm : public torch::autograd::Function<SparseTerm> {
 public:
  static at::Tensor forward(AutogradContext* ctx, at::Tensor y, const at::Tensor& x, const at::Tensor& values,
                            const at::Tensor& indices, const at::Tensor& row_ptr, const at::Tensor& col_ptr,
                            const at::Tensor& col_perm, bool merged) {
    ctx->saved_data["merged"] = merged;
    if (merged) {  // the merged backward needs no column order
      ctx->save_for_backward({x, values, indices, row_ptr});
      return y.view_as(y);
    }
    ctx->save_for_backward({x, values, indices, row_ptr, col_ptr, col_perm});
    TORCH_CHECK(col_perm.numel() == indices.numel() && !col_ptr.is_same(row_ptr),
                "apet_native::sparse_term: the unmerged term needs the column layout (col_ptr, col_perm)");
    spmm_(as_tokens(y), as_tokens(x), indices, values, row_ptr);
    ctx->mark_dirty({y});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &values = saved[1], &indices = saved[2], &row_ptr = saved[3];
    const bool merged = ctx->saved_data["merged"].toBool();
    const at::Tensor& dy = grads[0];
    const at::Tensor dy2 = as_tokens(dy), x2 = as_tokens(x);
    at::Tensor dx, dv;
    if (!merged && ctx->needs_input_grad(1)) {
      dx = at::zeros(x.sizes(), x.options());  // contiguous: its token view is a view, not a copy
      spmm_t_(as_tokens(dx), dy2, indices, values, saved[4], saved[5]);
    }
    if (ctx->needs_input_grad(2)) {
      dv = at::empty({indices.numel()}, dy.options().dtype(dy.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
      sddmm_(dv, dy2, x2, indices, row_ptr);
      if (dv.scalar_type() != values.scalar_type()) dv = dv.to(values.scalar_type());
    }
    return {dy, dx, dv, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor sparse_term(at::Tensor y, const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices,
                       const at::Tensor& row_ptr, const std::optional<at::Tensor>& col_ptr,
                       const std::optional<at::Tensor>& col_perm, bool merged) {
  // Function::apply reads the device of every tensor argument: stand row_ptr in for an absent
  // column order (only the unmerged backward reads it, and it checks it is there)
  return SparseTerm::apply(y, x, values, indices, row_ptr, col_ptr.value_or(row_ptr), col_perm.value_or(row_ptr),
                           merged);
}

// A plain float linear layer run unmerged, as one node: y = x W^T + b, then y += x S^T in place; backward
// dx = dy W, then dx += dy S in place into the same buffer (the base layer's call and a separate sparse node
// would give two dx buffers that autograd then adds: a zero fill and an extra pass over dx per layer and step);
// db = sum dy; dv = SDDMM(dy, x). W is frozen: no dW.
class LinearSparse : public torch::autograd::Function<LinearSparse> {
 public:
  // (needs_input_grad counts tensor arguments only: the bool goes last so the two numberings agree)
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                            const at::Tensor& values, const at::Tensor& indices, const at::Tensor& row_ptr,
                            const at::Tensor& col_ptr, const at::Tensor& col_perm, bool has_bias) {
    TORCH_CHECK(col_perm.numel() == indices.numel() && !col_ptr.is_same(row_ptr),
                "apet_native::linear_sparse: the unmerged term needs the column layout (col_ptr, col_perm)");
    ctx->saved_data["has_bias"] = has_bias;
    ctx->save_for_backward({x, weight, values, indices, row_ptr, col_ptr, col_perm});
    at::Tensor y = has_bias ? at::linear(x, weight, bias) : at::linear(x, weight);
    spmm_(as_tokens(y), as_tokens(x), indices, values, row_ptr);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &values = saved[2], &indices = saved[3];
    const at::Tensor& dy = grads[0];
    const at::Tensor dy2 = as_tokens(dy);
    at::Tensor dx, db, dv;
    if (ctx->needs_input_grad(0)) {
      dx = at::matmul(dy, weight);  // a fresh contiguous buffer: its token view is a view
      spmm_t_(as_tokens(dx), dy2, indices, values, saved[5], saved[6]);
    }
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)) db = dy2.sum(0);
    if (ctx->needs_input_grad(3)) {
      dv = at::empty({indices.numel()}, dy.options().dtype(dy.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
      sddmm_(dv, dy2, as_tokens(x), indices, saved[4]);
      if (dv.scalar_type() != values.scalar_type()) dv = dv.to(values.scalar_type());
    }
    return {dx, at::Tensor(), db, dv, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor linear_sparse(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const at::Tensor& values, const at::Tensor& indices, const at::Tensor& row_ptr,
                         const at::Tensor& col_ptr, const at::Tensor& col_perm) {
  TORCH_CHECK(!weight.requires_grad(), "apet_native::linear_sparse: the weight is frozen (no dW is computed)");
  // (an absent bias: row_ptr stands in, as Function::apply reads the device of every tensor argument)
  return LinearSparse::apply(x, weight, bias.has_value() ? *bias : row_ptr, values, indices, row_ptr, col_ptr,
                             col_perm, bias.has_value());
}

}  // namespace
}  // namespace apet

TORCH_LIBRARY_FRAGMENT(apet_native, m) {
  m.def("sparse_term(Tensor(a!) y, Tensor x, Tensor values, Tensor indices, Tensor row_ptr, Tensor? col_ptr, "
        "Tensor? col_perm, bool merged) -> Tensor(a!)");
  m.def("linear_sparse(Tensor x, Tensor weight, Tensor? bias, Tensor values, Tensor indices, Tensor row_ptr, "
        "Tensor col_ptr, Tensor col_perm) -> Tensor");
}

// One implementation for every device: it builds the autograd node itself and runs the kernels
// through the dispatcher. Eager only; under torch.compile the Python ops are used.
TORCH_LIBRARY_IMPL(apet_native, CompositeImplicitAutograd, m) {
  m.impl("sparse_term", &apet::sparse_term);
  m.impl("linear_sparse", &apet::linear_sparse);
}
