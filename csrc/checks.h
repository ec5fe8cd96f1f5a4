// Input checks shared by the CPU and CUDA implementations: each names the problem.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "sddmm_staged.h"

namespace apet {

inline void check_indices(const at::Tensor& indices, const char* op) {
  TORCH_CHECK(indices.dim() == 1, op, ": indices must be 1-D, got shape ", indices.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong, op,
              ": indices must be int32 or int64, got ", indices.scalar_type());
}

inline void check_same_index_dtype(const at::Tensor& indices, const at::Tensor& other, const char* what,
                                   const char* op) {
  TORCH_CHECK(other.scalar_type() == indices.scalar_type(), op, ": ", what, " has dtype ", other.scalar_type(),
              " but indices have ", indices.scalar_type(), "; build both with apet_kernels.ops.build_layout");
  TORCH_CHECK(other.dim() == 1 && other.is_contiguous(), op, ": ", what, " must be a contiguous 1-D tensor");
  TORCH_CHECK(other.device() == indices.device(), op, ": ", what, " is on ", other.device(), " but indices are on ",
              indices.device());
}

inline void check_values(const at::Tensor& values, const at::Tensor& indices, const char* op) {
  TORCH_CHECK(values.dim() == 1 && values.numel() == indices.numel(), op, ": values have shape ", values.sizes(),
              " but there are ", indices.numel(), " indices");
  TORCH_CHECK(at::isFloatingType(values.scalar_type()), op, ": values must be floating point, got ",
              values.scalar_type());
  TORCH_CHECK(values.device() == indices.device(), op, ": values are on ", values.device(), " but indices are on ",
              indices.device());
}

inline void check_matrix(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be floating point, got ",
              t.scalar_type());
}

inline void check_device(const at::Tensor& a, const at::Tensor& b, const char* na, const char* nb, const char* op) {
  TORCH_CHECK(a.device() == b.device(), op, ": ", na, " is on ", a.device(), " but ", nb, " is on ", b.device());
}

// The accumulation type: fp32 for fp32/bf16/fp16 data, fp64 for fp64.
inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Common checks of sddmm/spmm/spmm_t arguments; returns nothing, throws with a message.
inline void check_sparse_args(const at::Tensor& dense_a, const at::Tensor& dense_b, const at::Tensor& indices,
                              const char* name_a, const char* name_b, const char* op) {
  check_matrix(dense_a, name_a, op);
  check_matrix(dense_b, name_b, op);
  check_indices(indices, op);
  TORCH_CHECK(dense_a.size(0) == dense_b.size(0), op, ": ", name_a, " has ", dense_a.size(0), " tokens but ",
              name_b, " has ", dense_b.size(0));
  TORCH_CHECK(dense_a.scalar_type() == dense_b.scalar_type(), op, ": ", name_a, " (", dense_a.scalar_type(),
              ") and ", name_b, " (", dense_b.scalar_type(), ") must share one dtype");
  check_device(dense_a, dense_b, name_a, name_b, op);
  check_device(dense_a, indices, name_a, "indices", op);
}

inline void check_sddmm_out(const at::Tensor& out, const at::Tensor& dy, const at::Tensor& indices, const char* op) {
  TORCH_CHECK(out.dim() == 1 && out.numel() == indices.numel() && out.is_contiguous(), op,
              ": out must be a contiguous 1-D tensor with one entry per index (", indices.numel(), "), got shape ",
              out.sizes());
  TORCH_CHECK(out.scalar_type() == acc_type(dy.scalar_type()), op, ": out must have dtype ",
              acc_type(dy.scalar_type()), " for ", dy.scalar_type(), " inputs, got ", out.scalar_type());
  check_device(out, dy, "out", "dy", op);
}

// Full argument checks of each op, shared by the CPU and CUDA implementations.
inline void check_sddmm(const at::Tensor& out, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& indices,
                        const at::Tensor& row_ptr, const char* op) {
  check_sparse_args(dy, x, indices, "dy", "x", op);
  check_same_index_dtype(indices, row_ptr, "row_ptr", op);
  check_sddmm_out(out, dy, indices, op);
  TORCH_CHECK(row_ptr.numel() == dy.size(1) + 1, op, ": row_ptr has ", row_ptr.numel(), " entries, expected ",
              dy.size(1) + 1);
}

inline void check_spmm(const at::Tensor& out, const at::Tensor& x, const at::Tensor& indices,
                       const at::Tensor& values, const at::Tensor& row_ptr, const char* op) {
  check_sparse_args(out, x, indices, "out", "x", op);
  check_same_index_dtype(indices, row_ptr, "row_ptr", op);
  check_values(values, indices, op);
  TORCH_CHECK(row_ptr.numel() == out.size(1) + 1, op, ": row_ptr has ", row_ptr.numel(), " entries, expected ",
              out.size(1) + 1);
}

inline void check_spmm_t(const at::Tensor& out, const at::Tensor& dy, const at::Tensor& indices,
                         const at::Tensor& values, const at::Tensor& col_ptr, const at::Tensor& col_perm,
                         const char* op) {
  check_sparse_args(out, dy, indices, "out", "dy", op);
  check_same_index_dtype(indices, col_ptr, "col_ptr", op);
  check_same_index_dtype(indices, col_perm, "col_perm", op);
  check_values(values, indices, op);
  TORCH_CHECK(col_perm.numel() == indices.numel(), op, ": col_perm and indices must have the same length");
  TORCH_CHECK(col_ptr.numel() == out.size(1) + 1, op, ": col_ptr has ", col_ptr.numel(), " entries, expected ",
              out.size(1) + 1);
}

inline void check_scatter_merge(const at::Tensor& weight, const at::Tensor& indices, const at::Tensor& base,
                                const at::Tensor& values, const char* op) {
  check_matrix(weight, "weight", op);
  check_indices(indices, op);
  check_values(values, indices, op);
  TORCH_CHECK(base.numel() == indices.numel(), op, ": base and indices must have the same length");
  TORCH_CHECK(base.scalar_type() == weight.scalar_type(), op, ": base must have the weight's dtype");
  check_device(weight, indices, "weight", "indices", op);
  check_device(weight, base, "weight", "base", op);
}

// The staged SDDMM's checks, shared by its CUDA kernel and CPU emulation (after check_sddmm): x's rows must fit
// `smem_budget`. Returns false when there is nothing to compute (K = 0; T = 0, where out is zeroed).
inline bool staged_sddmm_has_work(at::Tensor& out, const at::Tensor& dy, const at::Tensor& x,
                                  const at::Tensor& indices, int64_t smem_budget, const char* op) {
  TORCH_CHECK(staged::fits(x.size(1), smem_budget), op, ": ", x.size(1), " input features do not fit ", smem_budget,
              " bytes of shared memory (16 bytes per feature and at least one row of dy)");
  if (indices.numel() == 0) return false;
  if (dy.size(0) == 0) {
    out.zero_();
    return false;
  }
  return true;
}

}  // namespace apet
