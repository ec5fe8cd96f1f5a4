// CUDA implementations of the native op set (registered for the CUDA dispatch key).
//  - transpose: 32x32 shared-memory tiles, so the kernels below read token rows contiguously.
//  - sddmm: one warp per delta, 16-byte loads where rows are aligned, warp-shuffle reduction.
//  - spmm / spmm_t: a block owns a (64 tokens x 32 destination columns) tile of the output and
//    each of its warps owns whole destination columns: no atomics anywhere.
//  - sddmm_staged_: tokens staged feature-major in shared memory, walked by row bands (sddmm_staged.h).
//  - scatter_merge: one thread per delta.
// Every launch runs on the current stream under a device guard and is followed by a launch check.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "checks.h"
#include "sddmm_staged.h"

namespace apet {
namespace {

constexpr int kTile = 32;

template <typename scalar_t>
__global__ void transpose_kernel(const scalar_t* __restrict__ src, scalar_t* __restrict__ dst, int64_t rows,
                                 int64_t cols, int64_t s_src) {
  __shared__ scalar_t tile[kTile][kTile + 1];  // +1: no bank conflicts on the transposed read
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kTile, c0 = static_cast<int64_t>(blockIdx.x) * kTile;
  for (int i = threadIdx.y; i < kTile; i += blockDim.y) {
    const int64_t r = r0 + i, c = c0 + threadIdx.x;
    if (r < rows && c < cols) tile[i][threadIdx.x] = src[r * s_src + c];
  }
  __syncthreads();
  for (int i = threadIdx.y; i < kTile; i += blockDim.y) {
    const int64_t c = c0 + i, r = r0 + threadIdx.x;
    if (r < rows && c < cols) dst[c * rows + r] = tile[threadIdx.x][i];
  }
}

at::Tensor transpose_cuda(const at::Tensor& t_in) {
  auto t = t_in.stride(1) == 1 ? t_in : t_in.contiguous();
  const int64_t rows = t.size(0), cols = t.size(1);
  auto out = at::empty({cols, rows}, t.options());
  if (t.numel() == 0) return out;
  dim3 block(kTile, 8), grid((cols + kTile - 1) / kTile, (rows + kTile - 1) / kTile);
  TORCH_CHECK(grid.y <= 65535, "apet_native: transpose of ", rows, " rows exceeds the grid limit");
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "apet_transpose", [&] {
    transpose_kernel<scalar_t><<<grid, block, 0, stream>>>(t.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows,
                                                          cols, t.stride(0));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

template <typename scalar_t, typename index_t, bool VEC>
__global__ void sddmm_kernel(const scalar_t* __restrict__ dy_t, const scalar_t* __restrict__ x_t,
                             const index_t* __restrict__ idx, at::opmath_type<scalar_t>* __restrict__ out, int64_t n_k,
                             int64_t n_t, int64_t in_f) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= n_k) return;
  const int64_t p = idx[warp], r = p / in_f, c = p - r * in_f;
  const scalar_t* a = dy_t + r * n_t;
  const scalar_t* b = x_t + c * n_t;
  acc_t acc = 0;
  if constexpr (VEC) {
    constexpr int V = 16 / sizeof(scalar_t);  // 16-byte loads
    for (int64_t i = static_cast<int64_t>(lane) * V; i < n_t; i += 32 * V) {
      alignas(16) scalar_t va[V];
      alignas(16) scalar_t vb[V];
      *reinterpret_cast<uint4*>(va) = *reinterpret_cast<const uint4*>(a + i);
      *reinterpret_cast<uint4*>(vb) = *reinterpret_cast<const uint4*>(b + i);
#pragma unroll
      for (int j = 0; j < V; ++j) acc += static_cast<acc_t>(va[j]) * static_cast<acc_t>(vb[j]);
    }
  } else {
    for (int64_t i = lane; i < n_t; i += 32) acc += static_cast<acc_t>(a[i]) * static_cast<acc_t>(b[i]);
  }
  acc = warp_sum(acc);
  if (lane == 0) out[warp] = acc;
}

constexpr int kTokTile = 64, kDstTile = 32, kWarps = 8;

template <typename scalar_t, typename index_t, bool SRC_IS_COL, bool USE_PERM>
__global__ void group_spmm_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ src_t,
                                  const index_t* __restrict__ group_ptr, const index_t* __restrict__ perm,
                                  const index_t* __restrict__ idx, const float* __restrict__ vals, int64_t n_t,
                                  int64_t n_dst, int64_t in_f, int64_t s_out) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t tile[kDstTile][kTokTile + 1];
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kTokTile, d0 = static_cast<int64_t>(blockIdx.y) * kDstTile;
  const int64_t d_end = d0 + kDstTile < n_dst ? d0 + kDstTile : n_dst;
  if (group_ptr[d0] == group_ptr[d_end]) return;  // no delta lands in this tile: out += 0
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int dl = warp; dl < kDstTile; dl += kWarps) {  // this warp owns column d0 + dl
    acc_t a0 = 0, a1 = 0;
    if (d0 + dl < n_dst) {
      for (int64_t j = group_ptr[d0 + dl]; j < group_ptr[d0 + dl + 1]; ++j) {
        const int64_t k = USE_PERM ? static_cast<int64_t>(perm[j]) : j;
        const int64_t p = idx[k], r = p / in_f, c = p - r * in_f;
        const scalar_t* s = src_t + (SRC_IS_COL ? c : r) * n_t + t0;
        const acc_t v = static_cast<acc_t>(vals[k]);
        if (t0 + lane < n_t) a0 += v * static_cast<acc_t>(s[lane]);
        if (t0 + lane + 32 < n_t) a1 += v * static_cast<acc_t>(s[lane + 32]);
      }
    }
    tile[dl][lane] = a0;
    tile[dl][lane + 32] = a1;
  }
  __syncthreads();
  // write back along destination columns: consecutive threads, consecutive addresses
  for (int e = threadIdx.x; e < kTokTile * kDstTile; e += blockDim.x) {
    const int tt = e / kDstTile, dl = e % kDstTile;
    const int64_t t = t0 + tt, d = d0 + dl;
    if (t < n_t && d < n_dst) {
      scalar_t* o = out + t * s_out + d;
      *o = static_cast<scalar_t>(static_cast<acc_t>(*o) + tile[dl][tt]);
    }
  }
}

template <typename scalar_t, typename index_t>
__global__ void scatter_merge_kernel(scalar_t* __restrict__ w, const index_t* __restrict__ idx,
                                     const scalar_t* __restrict__ base, const float* __restrict__ vals, int64_t n_k,
                                     int64_t in_f, int64_t s0, int64_t s1) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= n_k) return;
  const int64_t p = idx[k], r = p / in_f, c = p - r * in_f;
  w[r * s0 + c * s1] = static_cast<scalar_t>(static_cast<acc_t>(base[k]) + static_cast<acc_t>(vals[k]));
}

// The staged SDDMM (sddmm_staged.h): block (token group, band * n_sub + s). The loops' bounds are the
// block's, so every thread reaches each __syncthreads.
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(staged::kThreads)
    sddmm_staged_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                        const index_t* __restrict__ idx, const index_t* __restrict__ row_ptr,
                        at::opmath_type<scalar_t>* __restrict__ partial, staged::Plan plan, int64_t n_t, int64_t out_f,
                        int64_t in_f, int64_t n_k, int64_t s_dy, int64_t s_x) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  scalar_t* xs = reinterpret_cast<scalar_t*>(smem_raw);
  scalar_t* dys = xs + in_f * plan.tt;
  const int64_t tid = threadIdx.x;
  const staged::Block b = staged::block_of(plan, row_ptr, out_f, n_t, blockIdx.x, blockIdx.y);
  staged::Lane<scalar_t, acc_t> lane;
  for (int64_t pass = b.first_pass; pass < b.hi; pass += b.pass_stride) {
    lane.load(idx, b, pass, tid, plan.threads, in_f);
    for (int64_t t0 = b.t_begin; t0 < b.t_end; t0 += plan.tt) {
      staged::stage_tile(xs, dys, x, dy, s_x, s_dy, in_f, b, t0, tid, plan.threads);
      __syncthreads();
      lane.accumulate(xs, dys);
      __syncthreads();
    }
    lane.store(partial, n_k, b.group, plan.threads);
  }
}

template <typename acc_t>
__global__ void reduce_groups_kernel(acc_t* __restrict__ out, const acc_t* __restrict__ partial, int64_t n_k,
                                     int64_t n_groups) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k < n_k) staged::reduce_groups(out, partial, n_k, n_groups, k);
}

void group_spmm_cuda(at::Tensor& out, const at::Tensor& src, const at::Tensor& indices, const at::Tensor& values,
                     const at::Tensor& group_ptr, const at::Tensor* perm, int64_t in_f, bool src_is_col,
                     const char* op) {
  const int64_t n_t = out.size(0), n_dst = out.size(1);
  TORCH_CHECK(out.stride(1) == 1, op, ": out must have unit stride along its last dimension");
  if (indices.numel() == 0 || n_t == 0) return;
  TORCH_CHECK(out.scalar_type() != at::kDouble, op, ": CUDA kernels take fp32/bf16/fp16, got float64");
  auto src_t = transpose_cuda(src);
  auto vals = values.to(at::kFloat).contiguous();
  auto idx = indices.contiguous();
  dim3 grid((n_t + kTokTile - 1) / kTokTile, (n_dst + kDstTile - 1) / kDstTile);
  TORCH_CHECK(grid.y <= 65535, op, ": ", n_dst, " output columns exceed the grid limit");
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "apet_spmm_cuda", [&] {
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "apet_spmm_cuda_idx", [&] {
      const index_t* pm = perm ? perm->data_ptr<index_t>() : nullptr;
      auto kernel = src_is_col ? group_spmm_kernel<scalar_t, index_t, true, false>
                               : group_spmm_kernel<scalar_t, index_t, false, true>;
      kernel<<<grid, kWarps * 32, 0, stream>>>(out.data_ptr<scalar_t>(), src_t.data_ptr<scalar_t>(),
                                               group_ptr.data_ptr<index_t>(), pm, idx.data_ptr<index_t>(),
                                               vals.data_ptr<float>(), n_t, n_dst, in_f, out.stride(0));
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void sddmm_cuda(at::Tensor out, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& indices,
                const at::Tensor& row_ptr) {
  const char* op = "apet_native::sddmm_";
  check_sddmm(out, dy, x, indices, row_ptr, op);
  c10::cuda::CUDAGuard guard(dy.device());
  const int64_t n_t = dy.size(0), n_k = indices.numel(), in_f = x.size(1);
  if (n_k == 0) return;
  if (n_t == 0) {
    out.zero_();
    return;
  }
  auto dy_t = transpose_cuda(dy), x_t = transpose_cuda(x);
  auto idx = indices.contiguous();
  const int threads = 256;
  const int64_t blocks = (n_k * 32 + threads - 1) / threads;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "apet_sddmm_cuda", [&] {
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "apet_sddmm_cuda_idx", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      // rows of the transposes start at multiples of n_t elements: 16-byte aligned iff n_t is
      const bool vec = (n_t * sizeof(scalar_t)) % 16 == 0;
      if (vec) {
        sddmm_kernel<scalar_t, index_t, true><<<blocks, threads, 0, stream>>>(
            dy_t.data_ptr<scalar_t>(), x_t.data_ptr<scalar_t>(), idx.data_ptr<index_t>(), out.data_ptr<acc_t>(), n_k,
            n_t, in_f);
      } else {
        sddmm_kernel<scalar_t, index_t, false><<<blocks, threads, 0, stream>>>(
            dy_t.data_ptr<scalar_t>(), x_t.data_ptr<scalar_t>(), idx.data_ptr<index_t>(), out.data_ptr<acc_t>(), n_k,
            n_t, in_f);
      }
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// smem_budget, sms: <= 0 for the device's own (opt-in shared memory per block, SM count); threads must be
// the kernel's (512) or 0. Raises when x's rows do not fit shared memory (the caller then uses sddmm_).
void sddmm_staged_cuda(at::Tensor out, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& indices,
                       const at::Tensor& row_ptr, int64_t smem_budget, int64_t sms, int64_t threads) {
  const char* op = "apet_native::sddmm_staged_";
  check_sddmm(out, dy, x, indices, row_ptr, op);
  TORCH_CHECK(dy.scalar_type() != at::kDouble, op, ": CUDA kernels take fp32/bf16/fp16, got float64");
  TORCH_CHECK(threads <= 0 || threads == staged::kThreads, op, ": the CUDA kernel runs ", staged::kThreads,
              " threads per block, not ", threads);
  c10::cuda::CUDAGuard guard(dy.device());
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  smem_budget = smem_budget > 0 ? std::min<int64_t>(smem_budget, prop->sharedMemPerBlockOptin)
                                : static_cast<int64_t>(prop->sharedMemPerBlockOptin);
  sms = sms > 0 ? sms : prop->multiProcessorCount;
  if (!staged_sddmm_has_work(out, dy, x, indices, smem_budget, op)) return;
  const int64_t n_t = dy.size(0), out_f = dy.size(1), in_f = x.size(1), n_k = indices.numel();
  auto idx = indices.contiguous();
  auto xc = x.stride(1) == 1 ? x : x.contiguous();
  auto dyc = dy.stride(1) == 1 ? dy : dy.contiguous();
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "apet_sddmm_staged_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const staged::Plan plan =
        staged::make_plan(n_t, out_f, in_f, n_k, sizeof(scalar_t), staged::kThreads, sms, smem_budget);
    TORCH_CHECK(plan.n_bands * plan.n_sub <= 65535, op, ": ", plan.n_bands * plan.n_sub, " row blocks exceed the grid");
    auto partial = plan.n_groups == 1 ? out : at::empty({plan.n_groups * n_k}, out.options());
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "apet_sddmm_staged_cuda_idx", [&] {
      auto kernel = sddmm_staged_kernel<scalar_t, index_t>;
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(plan.smem_bytes)));
      dim3 grid(static_cast<unsigned>(plan.n_groups), static_cast<unsigned>(plan.n_bands * plan.n_sub));
      kernel<<<grid, staged::kThreads, plan.smem_bytes, stream>>>(
          dyc.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), idx.data_ptr<index_t>(), row_ptr.data_ptr<index_t>(),
          partial.data_ptr<acc_t>(), plan, n_t, out_f, in_f, n_k, dyc.stride(0), xc.stride(0));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    if (plan.n_groups > 1) {
      reduce_groups_kernel<acc_t><<<(n_k + 255) / 256, 256, 0, stream>>>(out.data_ptr<acc_t>(),
                                                                          partial.data_ptr<acc_t>(), n_k, plan.n_groups);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

void spmm_cuda(at::Tensor out, const at::Tensor& x, const at::Tensor& indices, const at::Tensor& values,
               const at::Tensor& row_ptr) {
  const char* op = "apet_native::spmm_";
  check_spmm(out, x, indices, values, row_ptr, op);
  c10::cuda::CUDAGuard guard(out.device());
  group_spmm_cuda(out, x, indices, values, row_ptr, nullptr, x.size(1), true, op);
}

void spmm_t_cuda(at::Tensor out, const at::Tensor& dy, const at::Tensor& indices, const at::Tensor& values,
                 const at::Tensor& col_ptr, const at::Tensor& col_perm) {
  const char* op = "apet_native::spmm_t_";
  check_spmm_t(out, dy, indices, values, col_ptr, col_perm, op);
  c10::cuda::CUDAGuard guard(out.device());
  group_spmm_cuda(out, dy, indices, values, col_ptr, &col_perm, out.size(1), false, op);
}

void scatter_merge_cuda(at::Tensor weight, const at::Tensor& indices, const at::Tensor& base,
                        const at::Tensor& values) {
  const char* op = "apet_native::scatter_merge_";
  check_scatter_merge(weight, indices, base, values, op);
  c10::cuda::CUDAGuard guard(weight.device());
  const int64_t n_k = indices.numel();
  if (n_k == 0) return;
  auto vals = values.to(at::kFloat).contiguous();
  auto b = base.contiguous();
  auto idx = indices.contiguous();
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "apet_scatter_cuda", [&] {
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "apet_scatter_cuda_idx", [&] {
      scatter_merge_kernel<scalar_t, index_t><<<(n_k + 255) / 256, 256, 0, stream>>>(
          weight.data_ptr<scalar_t>(), idx.data_ptr<index_t>(), b.data_ptr<scalar_t>(), vals.data_ptr<float>(), n_k,
          weight.size(1), weight.stride(0), weight.stride(1));
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace apet

TORCH_LIBRARY_IMPL(apet_native, CUDA, m) {
  m.impl("sddmm_", &apet::sddmm_cuda);
  m.impl("spmm_", &apet::spmm_cuda);
  m.impl("spmm_t_", &apet::spmm_t_cuda);
  m.impl("scatter_merge_", &apet::scatter_merge_cuda);
  m.impl("sddmm_staged_", &apet::sddmm_staged_cuda);
}
