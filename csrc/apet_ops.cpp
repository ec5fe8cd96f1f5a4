// Schemas of the native op set (namespace apet_native) and their CPU implementations.
// The Python-level ops (torch.ops.apet.*) stay the single public schema; they forward to
// these when backend="native", so no schema is defined twice.
#include <Python.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "sddmm_staged.h"

namespace apet {
namespace {

// CPU kernels of the sparse op set. Two ways to walk the (token, delta) pairs, chosen per call:
//  - gather: token by token, each delta reads its two features straight from the token's rows of
//    dy and x (contiguous, in L1), no copy at all: about 0.4 ns per pair on the 2-core dev machine.
//  - blocked: a block of 64 tokens of the features some delta reads is converted to fp32 and
//    transposed into per-thread buffers, then each delta is a contiguous 64-long dot/axpy: about
//    1 ns per transposed value plus a few hundredths of a ns per pair.
// The gather walk wins while K is below about twice the number of features read (0.1% density on
// the bench model's MLP: 2,884 deltas, T = 512: 0.3 ms against 1.3 ms); the blocked walk wins above.
// The kernels used to transpose all of dy and x first (t().to(fp32).contiguous(): 78% of the
// SDDMM's time) and, built without -fopenmp, ran on one thread.
constexpr int64_t kTokenBlock = 64;
constexpr int64_t kGatherPerFeature = 2;  // gather while K <= this x features read

#define APET_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))

// The deltas in the order the kernel walks them, grouped by output feature (rows of the weight for
// sddmm and spmm, columns for spmm_t): per non-empty group its feature and range, per delta its
// source feature (the other coordinate), its group's feature and its position k in the indices;
// and the features read on each side. O(K + groups) per call. A delta outside its group (indices
// that disagree with the layout: unsorted or changed ones passed without validation) makes the call
// fail before any memory is touched.
struct Plan {
  std::vector<int64_t> group, begin, end;     // non-empty groups: feature, [begin, end) in walk order
  std::vector<int32_t> source, target;        // per delta in walk order: source feature, group feature
  std::vector<int64_t> position;              // per delta in walk order: k
  std::vector<int64_t> sources;               // distinct source features, ascending
  bool gather() const {
    // APET_NATIVE_WALK=gather|blocked forces one walk (the tests run both on every case)
    const char* forced = std::getenv("APET_NATIVE_WALK");
    if (forced != nullptr && std::strcmp(forced, "gather") == 0) return true;
    if (forced != nullptr && std::strcmp(forced, "blocked") == 0) return false;
    return static_cast<int64_t>(position.size()) <=
           kGatherPerFeature * static_cast<int64_t>(sources.size() + group.size());
  }
};

template <typename index_t>
Plan make_plan(const index_t* p, const index_t* gp, const index_t* perm, int64_t n_groups, int64_t n_k,
               int64_t in_f, int64_t n_src, bool groups_are_rows, const char* op) {
  Plan plan;
  plan.source.resize(n_k);
  plan.target.resize(n_k);
  plan.position.resize(n_k);
  std::vector<char> used(n_src, 0);
  bool consistent = gp[0] == 0 && gp[n_groups] == n_k;
  for (int64_t d = 0; d < n_groups && consistent; ++d) {
    if (gp[d + 1] < gp[d]) consistent = false;
    if (gp[d + 1] <= gp[d]) continue;
    plan.group.push_back(d);
    plan.begin.push_back(gp[d]);
    plan.end.push_back(gp[d + 1]);
    for (int64_t j = gp[d]; j < gp[d + 1] && consistent; ++j) {
      const int64_t k = perm ? static_cast<int64_t>(perm[j]) : j;
      consistent = k >= 0 && k < n_k;
      if (!consistent) break;
      const int64_t flat = p[k];
      // row d owns [d * in, (d + 1) * in); column d holds d, d + in, d + 2 in, ...
      const int64_t src = groups_are_rows ? flat - d * in_f : (flat - d) / in_f;
      consistent = src >= 0 && src < n_src && (groups_are_rows || (flat - d) % in_f == 0);
      if (!consistent) break;
      plan.source[j] = static_cast<int32_t>(src);
      plan.target[j] = static_cast<int32_t>(d);
      plan.position[j] = k;
      used[src] = 1;
    }
  }
  TORCH_CHECK(consistent, op, ": delta indices do not match the layout (unsorted or changed indices? check them with "
              "validate=True or APET_VALIDATE=1)");
  for (int64_t f = 0; f < n_src; ++f)
    if (used[f]) plan.sources.push_back(f);
  return plan;
}

template <typename index_t>
Plan plan_for(const at::Tensor& idx, const at::Tensor& group_ptr, const at::Tensor* perm, int64_t n_groups,
              int64_t in_f, int64_t n_src, bool groups_are_rows, const char* op) {
  return make_plan(idx.data_ptr<index_t>(), group_ptr.data_ptr<index_t>(),
                   perm ? perm->data_ptr<index_t>() : static_cast<const index_t*>(nullptr), n_groups, idx.numel(),
                   in_f, n_src, groups_are_rows, op);
}

// ------------------------------------------------------------------------------- hot loops
// Each loop has a portable version (compiled three times by target_clones and picked at load time)
// and, for fp32 on x86, an AVX2 version with intrinsics where the compiler's own code was slow: GCC
// does not emit gather instructions for the gather walk (it emulates them with scalar inserts,
// slower than scalar code; AVX2 gathers: 0.38 ns per pair instead of 0.57 on the dev machine), and
// one FMA chain per dot product was bound by its latency (33 ns per delta and 64-token block).
#if defined(__x86_64__) && defined(__GNUC__)
const bool kHasAvx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
constexpr bool kHasAvx2 = false;
#endif

template <typename acc_t>
APET_CLONES void gather_dots_portable(const acc_t* a, const acc_t* b, const int32_t* ra, const int32_t* rb,
                                      int64_t n, acc_t* acc) {
  for (int64_t i = 0; i < n; ++i) acc[i] += a[ra[i]] * b[rb[i]];
}

template <typename acc_t>
APET_CLONES void gather_products_portable(const acc_t* src, const int32_t* source, const acc_t* v, int64_t n,
                                          acc_t* prod) {
  for (int64_t i = 0; i < n; ++i) prod[i] = v[i] * src[source[i]];
}

template <typename acc_t>
APET_CLONES void block_dots_portable(const acc_t* row, const acc_t* cols, const int32_t* source, int64_t n,
                                     int64_t tb, acc_t* acc) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t* col = cols + static_cast<int64_t>(source[i]) * tb;
    acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < tb; ++t) sum += row[t] * col[t];
    acc[i] += sum;
  }
}

template <typename acc_t>
APET_CLONES void block_axpys_portable(acc_t* y, const acc_t* cols, const int32_t* source, const acc_t* v, int64_t n,
                                      int64_t tb) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t* col = cols + static_cast<int64_t>(source[i]) * tb;
#pragma omp simd
    for (int64_t t = 0; t < tb; ++t) y[t] += v[i] * col[t];
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2,fma"))) void gather_dots_avx2(const float* a, const float* b, const int32_t* ra,
                                                          const int32_t* rb, int64_t n, float* acc) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i ia = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ra + i));
    const __m256i ib = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rb + i));
    const __m256 prod = _mm256_mul_ps(_mm256_i32gather_ps(a, ia, 4), _mm256_i32gather_ps(b, ib, 4));
    _mm256_storeu_ps(acc + i, _mm256_add_ps(_mm256_loadu_ps(acc + i), prod));
  }
  for (; i < n; ++i) acc[i] += a[ra[i]] * b[rb[i]];
}

__attribute__((target("avx2,fma"))) void gather_products_avx2(const float* src, const int32_t* source, const float* v,
                                                              int64_t n, float* prod) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i is = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(source + i));
    _mm256_storeu_ps(prod + i, _mm256_mul_ps(_mm256_loadu_ps(v + i), _mm256_i32gather_ps(src, is, 4)));
  }
  for (; i < n; ++i) prod[i] = v[i] * src[source[i]];
}

__attribute__((target("avx2,fma"))) inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// Four deltas of one row at a time: the row's 8-token chunk is loaded once for four columns and the
// four dot products run as independent FMA chains. tb is a multiple of 8.
__attribute__((target("avx2,fma"))) void block_dots_avx2(const float* row, const float* cols, const int32_t* source,
                                                         int64_t n, int64_t tb, float* acc) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const float* c0 = cols + static_cast<int64_t>(source[i]) * tb;
    const float* c1 = cols + static_cast<int64_t>(source[i + 1]) * tb;
    const float* c2 = cols + static_cast<int64_t>(source[i + 2]) * tb;
    const float* c3 = cols + static_cast<int64_t>(source[i + 3]) * tb;
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (int64_t t = 0; t < tb; t += 8) {
      const __m256 r = _mm256_loadu_ps(row + t);
      s0 = _mm256_fmadd_ps(r, _mm256_loadu_ps(c0 + t), s0);
      s1 = _mm256_fmadd_ps(r, _mm256_loadu_ps(c1 + t), s1);
      s2 = _mm256_fmadd_ps(r, _mm256_loadu_ps(c2 + t), s2);
      s3 = _mm256_fmadd_ps(r, _mm256_loadu_ps(c3 + t), s3);
    }
    acc[i] += hsum_avx2(s0);
    acc[i + 1] += hsum_avx2(s1);
    acc[i + 2] += hsum_avx2(s2);
    acc[i + 3] += hsum_avx2(s3);
  }
  for (; i < n; ++i) {
    const float* col = cols + static_cast<int64_t>(source[i]) * tb;
    __m256 s0 = _mm256_setzero_ps();
    for (int64_t t = 0; t < tb; t += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(row + t), _mm256_loadu_ps(col + t), s0);
    acc[i] += hsum_avx2(s0);
  }
}

// y += v0 c0 + v1 c1 + v2 c2 + v3 c3 per 8-token chunk: one load and store of y for four deltas.
__attribute__((target("avx2,fma"))) void block_axpys_avx2(float* y, const float* cols, const int32_t* source,
                                                          const float* v, int64_t n, int64_t tb) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const float* c0 = cols + static_cast<int64_t>(source[i]) * tb;
    const float* c1 = cols + static_cast<int64_t>(source[i + 1]) * tb;
    const float* c2 = cols + static_cast<int64_t>(source[i + 2]) * tb;
    const float* c3 = cols + static_cast<int64_t>(source[i + 3]) * tb;
    const __m256 v0 = _mm256_set1_ps(v[i]), v1 = _mm256_set1_ps(v[i + 1]), v2 = _mm256_set1_ps(v[i + 2]),
                 v3 = _mm256_set1_ps(v[i + 3]);
    for (int64_t t = 0; t < tb; t += 8) {
      __m256 acc = _mm256_loadu_ps(y + t);
      acc = _mm256_fmadd_ps(v0, _mm256_loadu_ps(c0 + t), acc);
      acc = _mm256_fmadd_ps(v1, _mm256_loadu_ps(c1 + t), acc);
      acc = _mm256_fmadd_ps(v2, _mm256_loadu_ps(c2 + t), acc);
      acc = _mm256_fmadd_ps(v3, _mm256_loadu_ps(c3 + t), acc);
      _mm256_storeu_ps(y + t, acc);
    }
  }
  for (; i < n; ++i) {
    const float* col = cols + static_cast<int64_t>(source[i]) * tb;
    const __m256 vi = _mm256_set1_ps(v[i]);
    for (int64_t t = 0; t < tb; t += 8)
      _mm256_storeu_ps(y + t, _mm256_fmadd_ps(vi, _mm256_loadu_ps(col + t), _mm256_loadu_ps(y + t)));
  }
}
#define APET_HAVE_AVX2_LOOPS 1
#endif

template <typename acc_t>
void gather_dots(const acc_t* a, const acc_t* b, const int32_t* ra, const int32_t* rb, int64_t n, acc_t* acc) {
#ifdef APET_HAVE_AVX2_LOOPS
  if constexpr (std::is_same_v<acc_t, float>) {
    if (kHasAvx2) return gather_dots_avx2(a, b, ra, rb, n, acc);
  }
#endif
  gather_dots_portable(a, b, ra, rb, n, acc);
}

template <typename acc_t>
void gather_products(const acc_t* src, const int32_t* source, const acc_t* v, int64_t n, acc_t* prod) {
#ifdef APET_HAVE_AVX2_LOOPS
  if constexpr (std::is_same_v<acc_t, float>) {
    if (kHasAvx2) return gather_products_avx2(src, source, v, n, prod);
  }
#endif
  gather_products_portable(src, source, v, n, prod);
}

template <typename acc_t>
void block_dots(const acc_t* row, const acc_t* cols, const int32_t* source, int64_t n, int64_t tb, acc_t* acc) {
#ifdef APET_HAVE_AVX2_LOOPS
  if constexpr (std::is_same_v<acc_t, float>) {
    if (kHasAvx2 && tb % 8 == 0) return block_dots_avx2(row, cols, source, n, tb, acc);
  }
#endif
  block_dots_portable(row, cols, source, n, tb, acc);
}

template <typename acc_t>
void block_axpys(acc_t* y, const acc_t* cols, const int32_t* source, const acc_t* v, int64_t n, int64_t tb) {
#ifdef APET_HAVE_AVX2_LOOPS
  if constexpr (std::is_same_v<acc_t, float>) {
    if (kHasAvx2 && tb % 8 == 0) return block_axpys_avx2(y, cols, source, v, n, tb);
  }
#endif
  block_axpys_portable(y, cols, source, v, n, tb);
}

#if defined(__x86_64__) && defined(__GNUC__)
// dst[(f0 + i) * tb + t0 + j] = src[(t0 + j) * s_t + f0 + i] for i, j < 8: one 8x8 fp32 tile through
// registers (unpack/shuffle/permute), instead of 64 scalar moves with a 256-byte write stride.
__attribute__((target("avx2"))) void transpose_8x8_avx2(const float* src, int64_t s_t, float* dst, int64_t tb) {
  __m256 r[8], u[8], v[8];
  for (int j = 0; j < 8; ++j) r[j] = _mm256_loadu_ps(src + j * s_t);
  for (int j = 0; j < 8; j += 2) {
    u[j] = _mm256_unpacklo_ps(r[j], r[j + 1]);
    u[j + 1] = _mm256_unpackhi_ps(r[j], r[j + 1]);
  }
  for (int j = 0; j < 8; j += 4) {
    v[j] = _mm256_shuffle_ps(u[j], u[j + 2], 0x44);
    v[j + 1] = _mm256_shuffle_ps(u[j], u[j + 2], 0xEE);
    v[j + 2] = _mm256_shuffle_ps(u[j + 1], u[j + 3], 0x44);
    v[j + 3] = _mm256_shuffle_ps(u[j + 1], u[j + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * tb, _mm256_permute2f128_ps(v[i], v[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * tb, _mm256_permute2f128_ps(v[i], v[i + 4], 0x31));
  }
}
#endif

// Rows t0..t0+tb of a token-major matrix (any strides), features `feats` only -> dst[f * tb + t].
// Runs of 8 consecutive features of a contiguous fp32 matrix go through 8x8 register tiles (most
// features are read at densities where this walk is chosen); the rest are copied one by one.
template <typename scalar_t, typename acc_t>
void transpose_block(const scalar_t* src, int64_t s_t, int64_t s_n, const std::vector<int64_t>& feats, int64_t t0,
                     int64_t tb, acc_t* dst) {
  const int64_t n = static_cast<int64_t>(feats.size());
  int64_t i = 0;
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    if (s_n == 1 && tb % 8 == 0 && kHasAvx2) {
      std::vector<int64_t> rest;
      while (i < n) {
        if (i + 8 <= n && feats[i + 7] - feats[i] == 7) {
          for (int64_t t = 0; t < tb; t += 8)
            transpose_8x8_avx2(src + (t0 + t) * s_t + feats[i], s_t, dst + feats[i] * tb + t, tb);
          i += 8;
        } else {
          rest.push_back(feats[i++]);
        }
      }
      for (int64_t t = 0; t < tb; ++t)
        for (const int64_t f : rest) dst[f * tb + t] = src[(t0 + t) * s_t + f];
      return;
    }
  }
#endif
  for (int64_t i0 = 0; i0 < n; i0 += 32) {  // 32 features x tb tokens: both sides stay in L1
    const int64_t i1 = std::min(n, i0 + 32);
    for (int64_t t = 0; t < tb; ++t) {
      const scalar_t* row = src + (t0 + t) * s_t;
      for (int64_t j = i0; j < i1; ++j) dst[feats[j] * tb + t] = static_cast<acc_t>(row[feats[j] * s_n]);
    }
  }
}

// out[t0 + t, f] += sums[f * tb + t] for the features `feats`: the transpose of transpose_block, adding
// into a token-major output. Runs of 8 consecutive features of a contiguous fp32 output go through
// 8x8 register tiles; the scalar walk (one strided read per value) took most of the SpMM's time.
template <typename scalar_t, typename acc_t>
void add_transposed_block(scalar_t* out, int64_t s_t, int64_t s_n, const std::vector<int64_t>& feats, int64_t t0,
                          int64_t tb, const acc_t* sums) {
  const int64_t n = static_cast<int64_t>(feats.size());
  int64_t i = 0;
  std::vector<int64_t> rest;
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    if (s_n == 1 && tb % 8 == 0 && kHasAvx2) {
      alignas(32) float tile[64];
      while (i < n) {
        if (i + 8 <= n && feats[i + 7] - feats[i] == 7) {
          for (int64_t t = 0; t < tb; t += 8) {
            transpose_8x8_avx2(sums + feats[i] * tb + t, tb, tile, 8);  // tile[j * 8 + f] = sums[f][t + j]
            for (int j = 0; j < 8; ++j) {
              float* row = out + (t0 + t + j) * s_t + feats[i];
#pragma omp simd
              for (int f = 0; f < 8; ++f) row[f] += tile[j * 8 + f];
            }
          }
          i += 8;
        } else {
          rest.push_back(feats[i++]);
        }
      }
    }
  }
#endif
  for (; i < n; ++i) rest.push_back(feats[i]);
  for (int64_t t = 0; t < tb; ++t) {
    scalar_t* row = out + (t0 + t) * s_t;
    for (const int64_t f : rest) row[f * s_n] = static_cast<scalar_t>(static_cast<acc_t>(row[f * s_n]) + sums[f * tb + t]);
  }
}

// Token t of a token-major matrix as a contiguous acc_t row (no copy for contiguous acc_t rows).
template <typename scalar_t, typename acc_t>
const acc_t* token_row(const scalar_t* base, int64_t s_t, int64_t s_n, int64_t n, int64_t t, acc_t* buf) {
  const scalar_t* row = base + t * s_t;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (s_n == 1) return row;
  }
  for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<acc_t>(row[j * s_n]);
  return buf;
}

inline int64_t blocks_of(int64_t n_t) { return (n_t + kTokenBlock - 1) / kTokenBlock; }

}  // namespace

void sddmm_cpu(at::Tensor out, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& indices,
               const at::Tensor& row_ptr) {
  const char* op = "apet_native::sddmm_";
  check_sddmm(out, dy, x, indices, row_ptr, op);
  const int64_t n_rows = dy.size(1), in_f = x.size(1), n_t = dy.size(0), n_k = indices.numel();
  if (n_k == 0) return;
  auto idx = indices.contiguous();
  Plan plan;
  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "apet_sddmm_cpu_plan", [&] {
    plan = plan_for<index_t>(idx, row_ptr, nullptr, n_rows, in_f, in_f, /*groups_are_rows=*/true, op);
  });
  const bool gather = plan.gather();
  const int64_t n_units = gather ? n_t : blocks_of(n_t);  // tokens or token blocks
  const int64_t n_parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_units));
  // the tokens are split over threads; each sums into its own K partials, added up at the end
  // (row-major walk order: position == walk index, so partials are in index order). One part
  // sums straight into out.
  auto partial = n_parts == 1 ? out.zero_().view({1, n_k}) : at::zeros({n_parts, n_k}, out.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "apet_sddmm_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *a = dy.data_ptr<scalar_t>(), *b = x.data_ptr<scalar_t>();
    acc_t* part = partial.data_ptr<acc_t>();
    const int64_t per_part = (n_units + n_parts - 1) / n_parts;
    at::parallel_for(0, n_parts, 1, [&](int64_t w0, int64_t w1) {
      for (int64_t w = w0; w < w1; ++w) {
        acc_t* mine = part + w * n_k;
        const int64_t u0 = w * per_part, u1 = std::min(n_units, (w + 1) * per_part);
        if (gather) {
          std::unique_ptr<acc_t[]> row_a(new acc_t[n_rows]), row_b(new acc_t[in_f]);
          for (int64_t t = u0; t < u1; ++t)
            gather_dots(token_row(a, dy.stride(0), dy.stride(1), n_rows, t, row_a.get()),
                        token_row(b, x.stride(0), x.stride(1), in_f, t, row_b.get()), plan.target.data(),
                        plan.source.data(), n_k, mine);
          continue;
        }
        std::unique_ptr<acc_t[]> dy_t(new acc_t[n_rows * kTokenBlock]), x_t(new acc_t[in_f * kTokenBlock]);
        for (int64_t blk = u0; blk < u1; ++blk) {
          const int64_t t0 = blk * kTokenBlock, tb = std::min(kTokenBlock, n_t - t0);
          transpose_block(a, dy.stride(0), dy.stride(1), plan.group, t0, tb, dy_t.get());
          transpose_block(b, x.stride(0), x.stride(1), plan.sources, t0, tb, x_t.get());
          for (size_t g = 0; g < plan.group.size(); ++g)
            block_dots(dy_t.get() + plan.group[g] * tb, x_t.get(), plan.source.data() + plan.begin[g],
                       plan.end[g] - plan.begin[g], tb, mine + plan.begin[g]);
        }
      }
    });
  });
  if (n_parts > 1) at::sum_out(out, partial, 0);
}

namespace {
// out[:, d] += sum_{j in group d} v_j src[:, source_j] (groups: rows of the weight for spmm, columns
// for spmm_t). Tokens go to threads whole, so no two threads write one output row.
// The staged CUDA SDDMM (sddmm_staged.h) emulated on the CPU: the same per-thread code, run block by
// block and phase by phase (every thread's stage, then every thread's accumulate: the kernel's
// __syncthreads), so its arithmetic is tested where no GPU is. A test oracle, not a CPU kernel.
// smem_budget, sms and threads stand in for the device's (<= 0: an H100's 227 KB, 132 SMs, 512 threads).
void sddmm_staged_cpu(at::Tensor out, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& indices,
                      const at::Tensor& row_ptr, int64_t smem_budget, int64_t sms, int64_t threads) {
  const char* op = "apet_native::sddmm_staged_";
  check_sddmm(out, dy, x, indices, row_ptr, op);
  smem_budget = smem_budget > 0 ? smem_budget : 227 * 1024;
  sms = sms > 0 ? sms : 132;
  threads = threads > 0 ? threads : staged::kThreads;
  if (!staged_sddmm_has_work(out, dy, x, indices, smem_budget, op)) return;
  const int64_t n_t = dy.size(0), out_f = dy.size(1), in_f = x.size(1), n_k = indices.numel();
  auto idx = indices.contiguous();
  auto xc = x.stride(1) == 1 ? x : x.contiguous();
  auto dyc = dy.stride(1) == 1 ? dy : dy.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "apet_sddmm_staged_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const staged::Plan plan =
        staged::make_plan(n_t, out_f, in_f, n_k, sizeof(scalar_t), threads, sms, smem_budget);
    auto partial = plan.n_groups == 1 ? out : at::empty({plan.n_groups * n_k}, out.options());
    std::vector<scalar_t> smem(plan.smem_bytes / sizeof(scalar_t));
    scalar_t *xs = smem.data(), *dys = smem.data() + in_f * plan.tt;
    std::vector<staged::Lane<scalar_t, acc_t>> lanes(threads);
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "apet_sddmm_staged_cpu_idx", [&] {
      const index_t *ix = idx.data_ptr<index_t>(), *rp = row_ptr.data_ptr<index_t>();
      for (int64_t g = 0; g < plan.n_groups; ++g) {
        for (int64_t y = 0; y < plan.n_bands * plan.n_sub; ++y) {
          const staged::Block b = staged::block_of(plan, rp, out_f, n_t, g, y);
          for (int64_t pass = b.first_pass; pass < b.hi; pass += b.pass_stride) {
            for (int64_t tid = 0; tid < threads; ++tid) lanes[tid].load(ix, b, pass, tid, threads, in_f);
            for (int64_t t0 = b.t_begin; t0 < b.t_end; t0 += plan.tt) {
              for (int64_t tid = 0; tid < threads; ++tid)
                staged::stage_tile(xs, dys, xc.data_ptr<scalar_t>(), dyc.data_ptr<scalar_t>(), xc.stride(0),
                                   dyc.stride(0), in_f, b, t0, tid, threads);
              for (int64_t tid = 0; tid < threads; ++tid) lanes[tid].accumulate(xs, dys);
            }
            for (int64_t tid = 0; tid < threads; ++tid)
              lanes[tid].store(partial.data_ptr<acc_t>(), n_k, g, threads);
          }
        }
      }
    });
    if (plan.n_groups > 1)
      for (int64_t k = 0; k < n_k; ++k)
        staged::reduce_groups(out.data_ptr<acc_t>(), partial.data_ptr<acc_t>(), n_k, plan.n_groups, k);
  });
}

// The staged SDDMM's grid for these sizes (tt, band, n_bands, n_sub, n_groups, group_tokens, smem_bytes): what
// the tests read to show that their small shapes reach many bands, passes and token groups.
std::vector<int64_t> sddmm_staged_plan(int64_t n_t, int64_t out_f, int64_t in_f, int64_t k, int64_t elem_size,
                                       int64_t threads, int64_t sms, int64_t smem_budget) {
  TORCH_CHECK(elem_size > 0 && elem_size <= 16 && 16 % elem_size == 0 && threads > 0 && sms > 0 &&
                  staged::fits(in_f, smem_budget) && out_f > 0,
              "apet_native::sddmm_staged_plan: bad arguments");
  const staged::Plan p = staged::make_plan(n_t, out_f, in_f, k, elem_size, threads, sms, smem_budget);
  return {p.tt, p.band, p.n_bands, p.n_sub, p.n_groups, p.group_tokens, p.smem_bytes};
}

void group_spmm_cpu(at::Tensor& out, const at::Tensor& src, const at::Tensor& indices, const at::Tensor& values,
                    const at::Tensor& group_ptr, const at::Tensor* perm, int64_t in_f, bool groups_are_rows,
                    const char* op) {
  const int64_t n_t = out.size(0), n_dst = out.size(1), n_src = src.size(1), n_k = indices.numel();
  if (n_k == 0 || n_t == 0) return;
  auto idx = indices.contiguous();
  Plan plan;
  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "apet_spmm_cpu_plan", [&] {
    plan = plan_for<index_t>(idx, group_ptr, perm, n_dst, in_f, n_src, groups_are_rows, op);
  });
  const bool gather = plan.gather();
  auto vals = values.to(acc_type(out.scalar_type())).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "apet_spmm_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* s = src.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t so_t = out.stride(0), so_d = out.stride(1);
    std::vector<acc_t> v(n_k);  // values in walk order
    const acc_t* vk = vals.data_ptr<acc_t>();
    for (int64_t j = 0; j < n_k; ++j) v[j] = vk[plan.position[j]];
    const size_t n_groups = plan.group.size();
    if (gather) {
      at::parallel_for(0, n_t, 16, [&](int64_t t0, int64_t t1) {
        std::unique_ptr<acc_t[]> row_buf(new acc_t[n_src]), prod(new acc_t[n_k]);
        for (int64_t t = t0; t < t1; ++t) {
          gather_products(token_row(s, src.stride(0), src.stride(1), n_src, t, row_buf.get()), plan.source.data(),
                          v.data(), n_k, prod.get());
          scalar_t* row = o + t * so_t;
          for (size_t g = 0; g < n_groups; ++g) {
            acc_t sum = 0;
            for (int64_t j = plan.begin[g]; j < plan.end[g]; ++j) sum += prod[j];
            scalar_t& dst = row[plan.group[g] * so_d];
            dst = static_cast<scalar_t>(static_cast<acc_t>(dst) + sum);
          }
        }
      });
      return;
    }
    at::parallel_for(0, blocks_of(n_t), 1, [&](int64_t b0, int64_t b1) {
      std::unique_ptr<acc_t[]> src_t(new acc_t[n_src * kTokenBlock]), sums(new acc_t[n_dst * kTokenBlock]);
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t t0 = blk * kTokenBlock, tb = std::min(kTokenBlock, n_t - t0);
        transpose_block(s, src.stride(0), src.stride(1), plan.sources, t0, tb, src_t.get());
        for (size_t g = 0; g < n_groups; ++g) {
          acc_t* acc = sums.get() + plan.group[g] * tb;
          std::fill(acc, acc + tb, acc_t(0));
          block_axpys(acc, src_t.get(), plan.source.data() + plan.begin[g], v.data() + plan.begin[g],
                      plan.end[g] - plan.begin[g], tb);
        }
        add_transposed_block(o, so_t, so_d, plan.group, t0, tb, sums.get());
      }
    });
  });
}
}  // namespace

void spmm_cpu(at::Tensor out, const at::Tensor& x, const at::Tensor& indices, const at::Tensor& values,
              const at::Tensor& row_ptr) {
  const char* op = "apet_native::spmm_";
  check_spmm(out, x, indices, values, row_ptr, op);
  group_spmm_cpu(out, x, indices, values, row_ptr, nullptr, x.size(1), /*groups_are_rows=*/true, op);
}

void spmm_t_cpu(at::Tensor out, const at::Tensor& dy, const at::Tensor& indices, const at::Tensor& values,
                const at::Tensor& col_ptr, const at::Tensor& col_perm) {
  const char* op = "apet_native::spmm_t_";
  check_spmm_t(out, dy, indices, values, col_ptr, col_perm, op);
  group_spmm_cpu(out, dy, indices, values, col_ptr, &col_perm, out.size(1), /*groups_are_rows=*/false, op);
}

void scatter_merge_cpu(at::Tensor weight, const at::Tensor& indices, const at::Tensor& base, const at::Tensor& values) {
  const char* op = "apet_native::scatter_merge_";
  check_scatter_merge(weight, indices, base, values, op);
  const int64_t n_k = indices.numel(), n_rows = weight.size(0), in_f = weight.size(1), s0 = weight.stride(0),
                s1 = weight.stride(1);
  if (n_k == 0) return;
  std::atomic<bool> stray{false};
  auto acc = acc_type(weight.scalar_type());
  auto vals = values.to(acc).contiguous();
  auto b = base.contiguous();
  auto idx = indices.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "apet_scatter_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "apet_scatter_cpu_idx", [&] {
      scalar_t* w = weight.data_ptr<scalar_t>();
      const scalar_t* bp = b.data_ptr<scalar_t>();
      const acc_t* v = vals.data_ptr<acc_t>();
      const index_t* p = idx.data_ptr<index_t>();
      // Sorted indices let each chunk walk the rows instead of dividing per delta (the 64-bit
      // division was most of the cost: 12.7 us for 2,884 deltas on the 2-core machine).
      at::parallel_for(0, n_k, 16384, [&](int64_t k0, int64_t k1) {
        int64_t r = static_cast<int64_t>(p[k0]) / in_f, row_end = (r + 1) * in_f;
        for (int64_t k = k0; k < k1; ++k) {
          const int64_t flat = p[k];
          while (flat >= row_end) {
            ++r;
            row_end += in_f;
          }
          if (flat < row_end - in_f || r >= n_rows) {  // unsorted or out of range: never write outside W
            stray = true;
            continue;
          }
          w[r * s0 + (flat - r * in_f) * s1] = static_cast<scalar_t>(static_cast<acc_t>(bp[k]) + v[k]);
        }
      });
    });
  });
  TORCH_CHECK(!stray, "apet_native::scatter_merge_: delta indices are unsorted or out of range; nothing outside "
              "the weight was written (check them with validate=True or APET_VALIDATE=1)");
}

// A 64-bit hash of a contiguous CPU tensor's bytes (xxHash64-style: four independent lanes over
// 32-byte stripes, merged and avalanched at the end). The merged strategy compares the values'
// hash with the one it last wrote, so a CPU forward whose values did not change skips K random
// writes into W (about 20 ns each once the GEMM has streamed W through the caches). The values are
// usually cold too by then, so the loop prefetches a few cache lines ahead of its reads.
namespace {
constexpr uint64_t kP1 = 0x9E3779B185EBCA87ULL, kP2 = 0xC2B2AE3D27D4EB4FULL, kP3 = 0x165667B19E3779F9ULL;
inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
inline uint64_t lane_round(uint64_t acc, uint64_t word) { return rotl(acc + word * kP2, 31) * kP1; }
inline uint64_t load_word(const unsigned char* p) {
  uint64_t w;
  std::memcpy(&w, p, 8);
  return w;
}
}  // namespace

int64_t fingerprint_cpu(const at::Tensor& t) {
  TORCH_CHECK(t.is_contiguous(), "apet_native::fingerprint: the tensor must be contiguous");
  const auto* bytes = static_cast<const unsigned char*>(t.data_ptr());
  const size_t n = t.numel() * t.element_size();
  uint64_t lane[4] = {kP1 + kP2, kP2, 0, 0 - kP1};
  size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __builtin_prefetch(bytes + i + 512);
    for (int l = 0; l < 4; ++l) lane[l] = lane_round(lane[l], load_word(bytes + i + 8 * l));
  }
  uint64_t h = rotl(lane[0], 1) + rotl(lane[1], 7) + rotl(lane[2], 12) + rotl(lane[3], 18);
  h ^= static_cast<uint64_t>(n) * kP1 ^ static_cast<uint64_t>(t.scalar_type()) * kP3;
  for (; i + 8 <= n; i += 8) h = rotl(h ^ lane_round(0, load_word(bytes + i)), 27) * kP1 + kP3;
  for (; i < n; ++i) h = rotl(h ^ (bytes[i] * kP3), 11) * kP1;
  h ^= h >> 33;
  h *= kP2;
  h ^= h >> 29;
  h *= kP3;
  h ^= h >> 32;
  return static_cast<int64_t>(h);
}

}  // namespace apet

TORCH_LIBRARY(apet_native, m) {
  m.def("sddmm_(Tensor(a!) out, Tensor dy, Tensor x, Tensor indices, Tensor row_ptr) -> ()");
  m.def("spmm_(Tensor(a!) out, Tensor x, Tensor indices, Tensor values, Tensor row_ptr) -> ()");
  m.def("spmm_t_(Tensor(a!) out, Tensor dy, Tensor indices, Tensor values, Tensor col_ptr, Tensor col_perm) -> ()");
  m.def("scatter_merge_(Tensor(a!) weight, Tensor indices, Tensor base, Tensor values) -> ()");
  m.def("fingerprint(Tensor t) -> int");
  // the staged SDDMM (csrc/sddmm_staged.h): CUDA kernel; on the CPU its emulation (tests)
  m.def("sddmm_staged_(Tensor(a!) out, Tensor dy, Tensor x, Tensor indices, Tensor row_ptr, int smem_budget=0, "
        "int sms=0, int threads=0) -> ()");
  m.def("sddmm_staged_plan(int n_t, int out_f, int in_f, int k, int elem_size, int threads, int sms, "
        "int smem_budget) -> int[]", &apet::sddmm_staged_plan);
}

TORCH_LIBRARY_IMPL(apet_native, CPU, m) {
  m.impl("sddmm_", &apet::sddmm_cpu);
  m.impl("spmm_", &apet::spmm_cpu);
  m.impl("spmm_t_", &apet::spmm_t_cpu);
  m.impl("scatter_merge_", &apet::scatter_merge_cpu);
  m.impl("fingerprint", &apet::fingerprint_cpu);
  m.impl("sddmm_staged_", &apet::sddmm_staged_cpu);
}

// A plain Python module: importing apet_kernels._C loads the library and runs the
// registrations above. No pybind11 needed, which keeps the build short.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "apet-kernels native op set (apet_native::*)",
                                      -1, nullptr};
  return PyModule_Create(&module);
}
