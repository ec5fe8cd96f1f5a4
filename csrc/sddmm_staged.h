// The staged SDDMM, dv[k] = sum_t dy[t, r_k] x[t, c_k]: one body for the CUDA kernel (apet_cuda.cu) and
// for its CPU emulation (apet_ops.cpp), which runs the same per-thread code block by block, phase by
// phase, so the CPU tests check the kernel's index arithmetic, staging, bands, passes and reduction.
//
// Design (issue 31). Sorted deltas are walked by row bands; a block owns (a token group, a band of rows,
// every n_sub-th pass of J = threads * PER_THREAD deltas of that band). Per tile of TT = 16 / sizeof(scalar)
// tokens it stages x's TT rows (all `in` features) and dy's TT rows (the band's features) into shared
// memory feature-major, so one 16-byte shared load brings a feature's TT tokens: a delta then costs two
// 16-byte loads and TT multiply-adds per tile. Each thread keeps its PER_THREAD deltas' shared-memory
// offsets and fp32 sums in registers across the group's tiles. Token groups write partial sums
// (group, k); a second kernel adds them in group order: deterministic, no atomics.
//
// Roofline, H100 SXM (3.35 TB/s HBM, ~29.6 TB/s shared memory on 132 SMs at 1.75 GHz), bf16, T = 4096,
// 4096 x 4096 (dy and x are 32 MB each):
//  - HBM: dy and x once, 64 MB, ~20 us; a block re-stages x per pass (n_sub passes per band), the repeats
//    from L2: (n_bands * n_sub) * 32 MB + 32 MB of dy in all (0.1%: K = 16.8k, n_sub = 3: ~130 MB of L2).
//  - shared memory: 2 x 16 B per delta per tile: 4 B * K * T = 0.27 GB at 0.1% (~10 us), 2.7 GB at 1%
//    (~95 us), before bank conflicts of the random gathers (a quarter-warp's eight 16-byte loads land on
//    random bank quads).
//  - partial sums: 4 B * K per token group, written and read once (0.1%: ~90 groups, 6 MB).
// So at 0.1% the bound is the L2 re-reads and staging (~25-35 us), at 1% the shared-memory gathers
// (~100 us plus conflicts). Not measured yet: no GPU has run it (bench/gpu_check.sh times it as
// `sddmm staged` beside the warp-per-delta kernel).
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define APET_HD __host__ __device__
#define APET_UNROLL _Pragma("unroll")
#else
#define APET_HD
#define APET_UNROLL
#endif

namespace apet {
namespace staged {

constexpr int kPerThread = 16;   // deltas per thread per pass: their sums live in registers
constexpr int kThreads = 512;    // threads per block on the GPU (the emulation may use fewer)
constexpr int kRowBytes = 16;    // bytes staged per feature: TT tokens of one feature

template <typename scalar_t>
constexpr int tokens_per_tile() {
  return kRowBytes / static_cast<int>(sizeof(scalar_t));
}

struct Plan {
  int64_t tt = 1;            // tokens per tile
  int64_t band = 1;          // rows of dy staged per block
  int64_t n_bands = 1;
  int64_t n_sub = 1;         // blocks per band; block s takes passes s, s + n_sub, ...
  int64_t n_groups = 1;      // token groups
  int64_t group_tokens = 1;  // tokens per group, a multiple of tt
  int64_t threads = kThreads;
  int64_t smem_bytes = 0;    // (in + band) * 16 bytes
  int64_t blocks() const { return n_groups * n_bands * n_sub; }
};

// Whether x's staged rows leave room for at least one row of dy in `smem_budget` bytes.
inline bool fits(int64_t in_f, int64_t smem_budget) { return (in_f + 1) * kRowBytes <= smem_budget; }

// Grid arithmetic on the host (no device reads): bands as tall as shared memory allows, passes per band
// from the mean deltas per band (random positions; a denser band loops), token groups to fill `sms` twice.
inline Plan make_plan(int64_t n_t, int64_t out_f, int64_t in_f, int64_t k, int64_t elem_size, int64_t threads,
                      int64_t sms, int64_t smem_budget) {
  Plan p;
  p.tt = kRowBytes / elem_size;
  p.threads = threads;
  p.band = std::min<int64_t>(out_f, smem_budget / kRowBytes - in_f);
  p.n_bands = (out_f + p.band - 1) / p.band;
  const int64_t j = threads * kPerThread, per_band = (k + p.n_bands - 1) / p.n_bands;
  p.n_sub = std::max<int64_t>(1, (per_band + j - 1) / j);
  const int64_t n_tiles = (n_t + p.tt - 1) / p.tt;
  const int64_t want = (2 * sms + p.n_bands * p.n_sub - 1) / (p.n_bands * p.n_sub);
  const int64_t groups = std::max<int64_t>(1, std::min<int64_t>(want, n_tiles));
  const int64_t tiles_per_group = (n_tiles + groups - 1) / groups;
  p.group_tokens = tiles_per_group * p.tt;
  p.n_groups = std::max<int64_t>(1, (n_tiles + tiles_per_group - 1) / tiles_per_group);
  p.smem_bytes = (in_f + p.band) * kRowBytes;
  return p;
}

// Where a block works: its band's rows and deltas, its token group.
struct Block {
  int64_t r0, r1;        // rows [r0, r1)
  int64_t lo, hi;        // deltas [lo, hi) of those rows
  int64_t first_pass;    // lo + s * J
  int64_t pass_stride;   // n_sub * J
  int64_t t_begin, t_end;
  int64_t group;
};

template <typename index_t>
APET_HD inline Block block_of(const Plan& p, const index_t* row_ptr, int64_t out_f, int64_t n_t, int64_t group,
                              int64_t y) {
  Block b;
  const int64_t band = y / p.n_sub, s = y - band * p.n_sub, j = p.threads * kPerThread;
  b.r0 = band * p.band;
  b.r1 = b.r0 + p.band < out_f ? b.r0 + p.band : out_f;
  b.lo = static_cast<int64_t>(row_ptr[b.r0]);
  b.hi = static_cast<int64_t>(row_ptr[b.r1]);
  b.first_pass = b.lo + s * j;
  b.pass_stride = p.n_sub * j;
  b.group = group;
  b.t_begin = group * p.group_tokens;
  b.t_end = b.t_begin + p.group_tokens < n_t ? b.t_begin + p.group_tokens : n_t;
  return b;
}

// 16 bytes from `src` to `dst`, both 16-byte aligned (one vector store in shared memory on the GPU).
template <typename scalar_t>
APET_HD inline void copy16(scalar_t* dst, const scalar_t* src) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
#else
  std::memcpy(dst, src, kRowBytes);
#endif
}

// Stage tile [t0, t0 + TT) (tokens at or past the group's end are zeros: they belong to another group):
// xs[c * TT + t] = x[t0 + t, c], dys[(r - r0) * TT + t] = dy[t0 + t, r]. Thread `tid` of `threads` takes every
// threads-th feature: its TT reads are coalesced across a warp (consecutive features) and it writes the
// feature's TT tokens as one 16-byte store (a quarter-warp's eight stores fill 128 contiguous bytes: no bank
// conflicts, and no division per element).
template <typename scalar_t>
APET_HD inline void stage_tile(scalar_t* xs, scalar_t* dys, const scalar_t* x, const scalar_t* dy, int64_t s_x,
                               int64_t s_dy, int64_t in_f, const Block& b, int64_t t0, int64_t tid,
                               int64_t threads) {
  constexpr int TT = tokens_per_tile<scalar_t>();
  const int64_t n_tok = b.t_end - t0 < TT ? b.t_end - t0 : TT;
  alignas(16) scalar_t v[TT];
  const scalar_t* xt = x + t0 * s_x;  // (one base pointer per tile: fewer live 64-bit addresses per thread)
  for (int64_t c = tid; c < in_f; c += threads) {
    APET_UNROLL
    for (int t = 0; t < TT; ++t) v[t] = t < n_tok ? xt[t * s_x + c] : scalar_t(0);
    copy16(xs + c * TT, v);
  }
  const scalar_t* dyt = dy + t0 * s_dy + b.r0;
  for (int64_t r = tid; r < b.r1 - b.r0; r += threads) {
    APET_UNROLL
    for (int t = 0; t < TT; ++t) v[t] = t < n_tok ? dyt[t * s_dy + r] : scalar_t(0);
    copy16(dys + r * TT, v);
  }
}

// One thread's deltas for one pass: their shared-memory offsets and running sums.
template <typename scalar_t, typename acc_t>
struct Lane {
  static constexpr int TT = tokens_per_tile<scalar_t>();
  int32_t x_off[kPerThread];
  int32_t dy_off[kPerThread];
  acc_t acc[kPerThread];
  int64_t first;  // delta of slot 0; slot m is first + m * threads
  int n;          // slots in use

  template <typename index_t>
  APET_HD void load(const index_t* idx, const Block& b, int64_t pass, int64_t tid, int64_t threads, int64_t in_f) {
    const int64_t end = pass + threads * kPerThread < b.hi ? pass + threads * kPerThread : b.hi;
    first = pass + tid;
    n = 0;
    APET_UNROLL
    for (int m = 0; m < kPerThread; ++m) {
      const int64_t k = first + m * threads;
      acc[m] = acc_t(0);
      if (k < end) {
        const int64_t p = static_cast<int64_t>(idx[k]), r = p / in_f, c = p - r * in_f;
        x_off[m] = static_cast<int32_t>(c * TT);
        dy_off[m] = static_cast<int32_t>((r - b.r0) * TT);
        n = m + 1;
      }
    }
  }

  // (loops over all kPerThread slots with a predicate, unrolled: the slots stay in registers on the GPU)
  APET_HD void accumulate(const scalar_t* xs, const scalar_t* dys) {
    APET_UNROLL
    for (int m = 0; m < kPerThread; ++m) {
      if (m >= n) continue;
      alignas(16) scalar_t a[TT];
      alignas(16) scalar_t d[TT];
      copy16(a, xs + x_off[m]);
      copy16(d, dys + dy_off[m]);
      acc_t s = acc[m];
      APET_UNROLL
      for (int t = 0; t < TT; ++t) s += static_cast<acc_t>(a[t]) * static_cast<acc_t>(d[t]);
      acc[m] = s;
    }
  }

  APET_HD void store(acc_t* partial, int64_t n_k, int64_t group, int64_t threads) const {
    APET_UNROLL
    for (int m = 0; m < kPerThread; ++m)
      if (m < n) partial[group * n_k + first + m * threads] = acc[m];
  }
};

// out[k] = sum over groups, in group order (the reduction kernel's body; one k per thread).
template <typename acc_t>
APET_HD inline void reduce_groups(acc_t* out, const acc_t* partial, int64_t n_k, int64_t n_groups, int64_t k) {
  acc_t s = acc_t(0);
  for (int64_t g = 0; g < n_groups; ++g) s += partial[g * n_k + k];
  out[k] = s;
}

}  // namespace staged
}  // namespace apet
