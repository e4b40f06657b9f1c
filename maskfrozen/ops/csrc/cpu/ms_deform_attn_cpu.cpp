// Multi-scale deformable attention on the CPU: forward and backward.
//
// The op is bound by the latency of random gathers (each sample reads 4 corner rows of
// head_dim numbers at data-dependent places), not by arithmetic. Hence:
//  * Work is split by head first: a thread handles a run of queries of one
//    (batch, head), so it touches one head's slice of the value maps at a time. When the
//    queries read the maps many times over (encoder-like shapes), the maps are first copied
//    head-major ([N, M, Len_in, D]) so that slice is contiguous (fewer pages, fewer TLB misses).
//  * The bilinear footprints of the next query are computed, and their rows prefetched,
//    while the current query is processed.
//  * The loops over head_dim are the vectorised inner loops, compiled for AVX-512 and
//    AVX2 as well and picked at run time on x86-64 (GCC/Clang).
//  * Backward uses no atomics: a (batch, head) slice of grad_value is owned by one task.
//    When there are fewer slices than threads, the queries of each slice are split into
//    S chunks that accumulate into S private copies of grad_value, summed at the end.
// No [Len_q, L, P, D] intermediate is materialised.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "bilinear.h"
#include "ms_deform_attn.h"

#if defined(__GNUC__)
#define MSDA_RESTRICT __restrict__
#define MSDA_PREFETCH(addr, rw) __builtin_prefetch((addr), (rw), 3)
#else
#define MSDA_RESTRICT
#define MSDA_PREFETCH(addr, rw) ((void)0)
#endif

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
#define MSDA_X86_DISPATCH 1
#endif

namespace maskfrozen {
namespace {

// Element strides of a value-shaped buffer: token-major [N, Len_in, M, D] or head-major
// [N, M, Len_in, D]. value and grad_value buffers of one call share one layout.
struct Layout {
  int64_t batch, head, row;
};

Layout token_major(int64_t len_in, int64_t heads, int64_t dim) { return {len_in * heads * dim, dim, heads * dim}; }
Layout head_major(int64_t len_in, int64_t heads, int64_t dim) { return {heads * len_in * dim, len_in * dim, dim}; }

// Raw pointers and sizes shared by all tasks of one call.
template <typename T>
struct Problem {
  const T* value;  // laid out as `layout`
  Layout layout;
  const T* locations;          // [N, Len_q, M, L, P, 2]
  const T* weights;            // [N, Len_q, M, L, P]
  const int64_t* level_hw;     // [L, 2]
  const int64_t* level_start;  // [L]
  int64_t n, len_in, len_q, heads, head_dim, levels, points;
};

// Footprint of one sample: its bilinear corners (offsets from the (batch, head) base) and
// what the backward needs besides.
template <typename T>
struct Footprint : BilinearCorners<T> {
  T attn, w, h;
  // Samples outside the map only: 0, or NaN when x or y (nan_xy) / x, y or attn (nan_any)
  // is not finite (see bilinear.h).
  T nan_xy, nan_any;
  bool valid;  // false when no corner lies in the map (the sample reads zeros)
};

template <typename T>
MSDA_INLINE void prefetch_row(const T* row, int64_t count, int rw) {
  const char* p = reinterpret_cast<const char*>(row);
  const int64_t bytes = count * static_cast<int64_t>(sizeof(T));
  for (int64_t b = 0; b < bytes; b += 64) {
    if (rw) {
      MSDA_PREFETCH(p + b, 1);
    } else {
      MSDA_PREFETCH(p + b, 0);
    }
  }
}

// Footprints of all L*P samples of query q (head m, batch n); prefetches the value rows
// they read (and, with grad_base, the grad_value rows they write).
template <typename T>
MSDA_INLINE void query_footprints(const Problem<T>& pb, int64_t n, int64_t q, int64_t m, const T* value_base,
                                  const T* grad_base, Footprint<T>* fp) {
  const int64_t samples = pb.levels * pb.points, dim = pb.head_dim, row = pb.layout.row;
  const int64_t qm = (n * pb.len_q + q) * pb.heads + m;
  const T* loc = pb.locations + qm * samples * 2;
  const T* attn = pb.weights + qm * samples;
  for (int64_t l = 0; l < pb.levels; ++l) {
    const int64_t h = pb.level_hw[2 * l], w = pb.level_hw[2 * l + 1];
    const int64_t level_offset = pb.level_start[l] * row;
    for (int64_t p = 0; p < pb.points; ++p, loc += 2, ++attn, ++fp) {
      const T x = loc[0] * T(w) - T(0.5), y = loc[1] * T(h) - T(0.5);
      fp->valid = bilinear_corners<T>(x, y, h, w, level_offset, row, *fp);
      fp->attn = *attn;
      if (!fp->valid) {
        fp->nan_xy = nan_unless_finite(x) + nan_unless_finite(y);
        fp->nan_any = fp->nan_xy + nan_unless_finite(fp->attn);
        continue;
      }
      fp->w = T(w);
      fp->h = T(h);
      for (int c = 0; c < 4; ++c) {
        prefetch_row(value_base + fp->offset[c], dim, 0);
        if (grad_base != nullptr) prefetch_row(grad_base + fp->offset[c], dim, 1);
      }
    }
  }
}

// out[d] += sum_c w[c] * v_c[d]
template <typename T>
MSDA_INLINE void accumulate_corners(T* MSDA_RESTRICT out, const T* MSDA_RESTRICT v0, const T* MSDA_RESTRICT v1,
                                    const T* MSDA_RESTRICT v2, const T* MSDA_RESTRICT v3, T w0, T w1, T w2, T w3,
                                    int64_t dim) {
#pragma omp simd
  for (int64_t d = 0; d < dim; ++d) out[d] += w0 * v0[d] + w1 * v1[d] + w2 * v2[d] + w3 * v3[d];
}

// The per-query rows (locations, weights, and output or its gradients) of one head are
// 1 / M of each [Len_q, M, ...] row, so the hardware prefetcher misses them: fetch them
// this many queries ahead.
constexpr int64_t kQueryPrefetchDistance = 4;

// Forward for queries [q_begin, q_end) of one (batch, head); output is [N, Len_q, M*D].
// `footprints` holds 2 * L * P entries (current and next query).
template <typename T>
MSDA_INLINE void forward_queries(const Problem<T>& pb, T* MSDA_RESTRICT output, Footprint<T>* footprints, int64_t n,
                                 int64_t m, int64_t q_begin, int64_t q_end) {
  const int64_t dim = pb.head_dim, samples = pb.levels * pb.points;
  const T* base = pb.value + n * pb.layout.batch + m * pb.layout.head;
  Footprint<T>* cur = footprints;
  Footprint<T>* next = footprints + samples;
  if (q_begin < q_end) query_footprints<T>(pb, n, q_begin, m, base, nullptr, cur);
  for (int64_t q = q_begin; q < q_end; ++q) {
    if (q + 1 < q_end) query_footprints<T>(pb, n, q + 1, m, base, nullptr, next);
    if (q + kQueryPrefetchDistance < q_end) {
      const int64_t ahead = (n * pb.len_q + q + kQueryPrefetchDistance) * pb.heads + m;
      prefetch_row(pb.locations + ahead * samples * 2, samples * 2, 0);
      prefetch_row(pb.weights + ahead * samples, samples, 0);
      prefetch_row(output + ahead * dim, dim, 1);
    }
    T* MSDA_RESTRICT out = output + ((n * pb.len_q + q) * pb.heads + m) * dim;
    std::fill(out, out + dim, T(0));
    T nan_any = T(0);
    for (int64_t s = 0; s < samples; ++s) {
      const Footprint<T>& f = cur[s];
      if (!f.valid) {
        nan_any += f.nan_any;
        continue;
      }
      const T a = f.attn;
      accumulate_corners<T>(out, base + f.offset[0], base + f.offset[1], base + f.offset[2], base + f.offset[3],
                            a * f.weight[0], a * f.weight[1], a * f.weight[2], a * f.weight[3], dim);
    }
    // a non-finite input outside the map: the whole (query, head) output is NaN, as in grid_sample
    if (nan_any != T(0)) std::fill(out, out + dim, nan_any);
    std::swap(cur, next);
  }
}

// Channels handled per vector step: 32 bytes (one AVX register; two SSE registers).
template <typename T>
constexpr int64_t kChunk = 32 / sizeof(T);

// Sum of acc[0..kChunk) by halving (a fixed order the compiler can vectorise, unlike a
// sequential sum it may not reassociate).
template <typename T>
MSDA_INLINE T tree_sum(T* acc) {
  for (int64_t half = kChunk<T> / 2; half > 0; half /= 2) {
#pragma omp simd
    for (int64_t j = 0; j < half; ++j) acc[j] += acc[j + half];
  }
  return acc[0];
}

// One sample's backward over head_dim: returns the 4 dot products <grad_out, v_c> and adds
// w_c * grad_out into the corner rows gv_c of grad_value (rows of corners outside the map
// are redirected to scratch rows, so the 4 destinations never alias).
template <typename T>
MSDA_INLINE void backward_corners(const T* MSDA_RESTRICT g, const T* MSDA_RESTRICT v0, const T* MSDA_RESTRICT v1,
                                  const T* MSDA_RESTRICT v2, const T* MSDA_RESTRICT v3, T* MSDA_RESTRICT gv0,
                                  T* MSDA_RESTRICT gv1, T* MSDA_RESTRICT gv2, T* MSDA_RESTRICT gv3, T w0, T w1, T w2,
                                  T w3, int64_t dim, T dots[4]) {
  constexpr int64_t chunk = kChunk<T>;
  if (dim % chunk == 0) {  // fixed-width steps with per-lane partial dot products
    alignas(64) T a0[chunk] = {}, a1[chunk] = {}, a2[chunk] = {}, a3[chunk] = {};
    for (int64_t base = 0; base < dim; base += chunk) {
#pragma omp simd
      for (int64_t j = 0; j < chunk; ++j) {
        const int64_t d = base + j;
        const T gd = g[d];
        a0[j] += gd * v0[d];
        a1[j] += gd * v1[d];
        a2[j] += gd * v2[d];
        a3[j] += gd * v3[d];
        gv0[d] += w0 * gd;
        gv1[d] += w1 * gd;
        gv2[d] += w2 * gd;
        gv3[d] += w3 * gd;
      }
    }
    dots[0] = tree_sum<T>(a0);
    dots[1] = tree_sum<T>(a1);
    dots[2] = tree_sum<T>(a2);
    dots[3] = tree_sum<T>(a3);
    return;
  }
  T d0 = 0, d1 = 0, d2 = 0, d3 = 0;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
  for (int64_t d = 0; d < dim; ++d) {
    const T gd = g[d];
    d0 += gd * v0[d];
    d1 += gd * v1[d];
    d2 += gd * v2[d];
    d3 += gd * v3[d];
    gv0[d] += w0 * gd;
    gv1[d] += w1 * gd;
    gv2[d] += w2 * gd;
    gv3[d] += w3 * gd;
  }
  dots[0] = d0;
  dots[1] = d1;
  dots[2] = d2;
  dots[3] = d3;
}

// Backward for queries [q_begin, q_end) of one (batch, head): writes their location and
// weight gradients and accumulates into grad_value (same layout as the value in `pb`).
template <typename T>
MSDA_INLINE void backward_queries(const Problem<T>& pb, const T* MSDA_RESTRICT grad_output, T* grad_value,
                                  T* MSDA_RESTRICT grad_locations, T* MSDA_RESTRICT grad_weights,
                                  Footprint<T>* footprints, T* scratch, int64_t n, int64_t m, int64_t q_begin,
                                  int64_t q_end) {
  const int64_t dim = pb.head_dim, samples = pb.levels * pb.points;
  const int64_t slice_offset = n * pb.layout.batch + m * pb.layout.head;
  const T* base = pb.value + slice_offset;
  T* grad_base = grad_value + slice_offset;
  Footprint<T>* cur = footprints;
  Footprint<T>* next = footprints + samples;
  if (q_begin < q_end) query_footprints<T>(pb, n, q_begin, m, base, grad_base, cur);
  for (int64_t q = q_begin; q < q_end; ++q) {
    if (q + 1 < q_end) query_footprints<T>(pb, n, q + 1, m, base, grad_base, next);
    if (q + kQueryPrefetchDistance < q_end) {
      const int64_t ahead = (n * pb.len_q + q + kQueryPrefetchDistance) * pb.heads + m;
      prefetch_row(pb.locations + ahead * samples * 2, samples * 2, 0);
      prefetch_row(pb.weights + ahead * samples, samples, 0);
      prefetch_row(grad_output + ahead * dim, dim, 0);
      prefetch_row(grad_locations + ahead * samples * 2, samples * 2, 1);
      prefetch_row(grad_weights + ahead * samples, samples, 1);
    }
    const int64_t qm = (n * pb.len_q + q) * pb.heads + m;
    const T* g = grad_output + qm * dim;
    T* g_loc = grad_locations + qm * samples * 2;
    T* g_attn = grad_weights + qm * samples;
    for (int64_t s = 0; s < samples; ++s) {
      const Footprint<T>& f = cur[s];
      if (!f.valid) {  // zeros, or NaN for non-finite inputs (as in grid_sample's backward)
        g_loc[2 * s] = g_loc[2 * s + 1] = f.nan_any;
        g_attn[s] = f.nan_xy;
        continue;
      }
      const T a = f.attn;
      T* gv[4];
      for (int c = 0; c < 4; ++c) gv[c] = f.inside[c] != T(0) ? grad_base + f.offset[c] : scratch + c * dim;
      T dots[4];
      backward_corners<T>(g, base + f.offset[0], base + f.offset[1], base + f.offset[2], base + f.offset[3], gv[0],
                          gv[1], gv[2], gv[3], a * f.weight[0], a * f.weight[1], a * f.weight[2], a * f.weight[3],
                          dim, dots);
      for (int c = 0; c < 4; ++c) dots[c] *= f.inside[c];
      const T hx = T(1) - f.fx, hy = T(1) - f.fy;
      g_attn[s] = f.weight[0] * dots[0] + f.weight[1] * dots[1] + f.weight[2] * dots[2] + f.weight[3] * dots[3];
      // x = loc_x * W - 0.5, so d/d loc_x = W * d/d fx; likewise for y.
      g_loc[2 * s] = a * f.w * (hy * (dots[1] - dots[0]) + f.fy * (dots[3] - dots[2]));
      g_loc[2 * s + 1] = a * f.h * (hx * (dots[2] - dots[0]) + f.fx * (dots[3] - dots[1]));
    }
    std::swap(cur, next);
  }
}

// ---- instruction-set variants: the same inlined bodies compiled for wider vectors ----
#define MSDA_DEFINE_VARIANT(SUFFIX, ATTRIBUTES)                                                                      \
  template <typename T>                                                                                              \
  ATTRIBUTES void forward_queries_##SUFFIX(const Problem<T>& pb, T* output, Footprint<T>* footprints, int64_t n,     \
                                           int64_t m, int64_t q_begin, int64_t q_end) {                              \
    forward_queries<T>(pb, output, footprints, n, m, q_begin, q_end);                                                \
  }                                                                                                                  \
  template <typename T>                                                                                              \
  ATTRIBUTES void backward_queries_##SUFFIX(const Problem<T>& pb, const T* grad_output, T* grad_value,               \
                                            T* grad_locations, T* grad_weights, Footprint<T>* footprints,            \
                                            T* scratch, int64_t n, int64_t m, int64_t q_begin, int64_t q_end) {      \
    backward_queries<T>(pb, grad_output, grad_value, grad_locations, grad_weights, footprints, scratch, n, m,        \
                        q_begin, q_end);                                                                             \
  }
MSDA_DEFINE_VARIANT(default, )
#ifdef MSDA_X86_DISPATCH
MSDA_DEFINE_VARIANT(avx2, __attribute__((target("avx2,fma"))))
MSDA_DEFINE_VARIANT(avx512, __attribute__((target("avx512f,avx512vl,avx2,fma"))))
#endif
#undef MSDA_DEFINE_VARIANT

enum class Isa { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };
const char* const kIsaNames[] = {"default", "avx2", "avx512"};

Isa best_isa() {
#ifdef MSDA_X86_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")) return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kDefault;
}

Isa& active_isa() {
  static Isa isa = best_isa();
  return isa;
}

template <typename T>
void run_forward_queries(Isa isa, const Problem<T>& pb, T* output, Footprint<T>* footprints, int64_t n, int64_t m,
                         int64_t q_begin, int64_t q_end) {
#ifdef MSDA_X86_DISPATCH
  if (isa == Isa::kAvx512) return forward_queries_avx512<T>(pb, output, footprints, n, m, q_begin, q_end);
  if (isa == Isa::kAvx2) return forward_queries_avx2<T>(pb, output, footprints, n, m, q_begin, q_end);
#endif
  forward_queries_default<T>(pb, output, footprints, n, m, q_begin, q_end);
}

template <typename T>
void run_backward_queries(Isa isa, const Problem<T>& pb, const T* grad_output, T* grad_value, T* grad_locations,
                          T* grad_weights, Footprint<T>* footprints, T* scratch, int64_t n, int64_t m,
                          int64_t q_begin, int64_t q_end) {
#ifdef MSDA_X86_DISPATCH
  if (isa == Isa::kAvx512)
    return backward_queries_avx512<T>(pb, grad_output, grad_value, grad_locations, grad_weights, footprints, scratch,
                                      n, m, q_begin, q_end);
  if (isa == Isa::kAvx2)
    return backward_queries_avx2<T>(pb, grad_output, grad_value, grad_locations, grad_weights, footprints, scratch,
                                    n, m, q_begin, q_end);
#endif
  backward_queries_default<T>(pb, grad_output, grad_value, grad_locations, grad_weights, footprints, scratch, n, m,
                              q_begin, q_end);
}

// Head-major pays off when each value row is read many times: Len_q * L * P samples
// (4 corner rows each) against Len_in rows to copy.
bool use_head_major(int64_t len_in, int64_t len_q, int64_t levels, int64_t points, int64_t heads) {
  return heads > 1 && len_q * levels * points >= 4 * len_in;
}

template <typename T>
Problem<T> make_problem(const at::Tensor& value, const Layout& layout, const at::Tensor& spatial_shapes,
                        const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                        const at::Tensor& attention_weights, int64_t len_in, int64_t heads, int64_t dim) {
  Problem<T> pb;
  pb.value = value.data_ptr<T>();
  pb.layout = layout;
  pb.locations = sampling_locations.data_ptr<T>();
  pb.weights = attention_weights.data_ptr<T>();
  pb.level_hw = spatial_shapes.data_ptr<int64_t>();
  pb.level_start = level_start_index.data_ptr<int64_t>();
  pb.n = sampling_locations.size(0);
  pb.len_in = len_in;
  pb.heads = heads;
  pb.head_dim = dim;
  pb.len_q = sampling_locations.size(1);
  pb.levels = sampling_locations.size(3);
  pb.points = sampling_locations.size(4);
  return pb;
}

// Queries per parallel chunk in forward: enough to amortise scheduling, small enough to balance.
constexpr int64_t kForwardGrain = 64;

}  // namespace

std::string ms_deform_attn_cpu_isa() { return kIsaNames[static_cast<int>(active_isa())]; }

std::string ms_deform_attn_set_cpu_isa(const std::string& name) {
  const std::string previous = ms_deform_attn_cpu_isa();
  const Isa best = best_isa();
  for (int i = 0; i < 3; ++i) {
    if (name == kIsaNames[i]) {
      TORCH_CHECK(static_cast<int>(best) >= i, "ms_deform_attn: this CPU does not support the '", name,
                  "' kernels (best: '", kIsaNames[static_cast<int>(best)], "')");
      active_isa() = static_cast<Isa>(i);
      return previous;
    }
  }
  TORCH_CHECK(false, "ms_deform_attn: unknown CPU instruction set '", name, "' (default, avx2, avx512)");
}

at::Tensor ms_deform_attn_cpu_forward(const at::Tensor& value_in, const at::Tensor& spatial_shapes_in,
                                      const at::Tensor& level_start_index_in,
                                      const at::Tensor& sampling_locations_in,
                                      const at::Tensor& attention_weights_in) {
  const auto spatial_shapes = spatial_shapes_in.contiguous();
  const auto level_start_index = level_start_index_in.contiguous();
  const auto sampling_locations = sampling_locations_in.contiguous();
  const auto attention_weights = attention_weights_in.contiguous();
  const int64_t n = value_in.size(0), len_in = value_in.size(1), heads = value_in.size(2), dim = value_in.size(3);
  const int64_t len_q = sampling_locations.size(1), levels = sampling_locations.size(3),
                points = sampling_locations.size(4);
  const bool by_head = use_head_major(len_in, len_q, levels, points, heads);
  const auto value = by_head ? value_in.transpose(1, 2).contiguous() : value_in.contiguous();
  const Layout layout = by_head ? head_major(len_in, heads, dim) : token_major(len_in, heads, dim);
  auto output = at::empty({n, len_q, heads * dim}, value.options());
  const Isa isa = active_isa();
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_cpu_forward", [&] {
    const auto pb = make_problem<scalar_t>(value, layout, spatial_shapes, level_start_index, sampling_locations,
                                           attention_weights, len_in, heads, dim);
    scalar_t* out = output.data_ptr<scalar_t>();
    // items are (batch, head, query) in that order, so a chunk is mostly one head's queries
    at::parallel_for(0, n * heads * len_q, kForwardGrain, [&](int64_t begin, int64_t end) {
      std::vector<Footprint<scalar_t>> footprints(2 * levels * points);
      for (int64_t item = begin; item < end;) {
        const int64_t slice = item / len_q, q_begin = item % len_q;
        const int64_t q_end = std::min(len_q, q_begin + (end - item));
        run_forward_queries<scalar_t>(isa, pb, out, footprints.data(), slice / heads, slice % heads, q_begin, q_end);
        item += q_end - q_begin;
      }
    });
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_cpu_backward(
    const at::Tensor& value_in, const at::Tensor& spatial_shapes_in, const at::Tensor& level_start_index_in,
    const at::Tensor& sampling_locations_in, const at::Tensor& attention_weights_in,
    const at::Tensor& grad_output_in) {
  const auto spatial_shapes = spatial_shapes_in.contiguous();
  const auto level_start_index = level_start_index_in.contiguous();
  const auto sampling_locations = sampling_locations_in.contiguous();
  const auto attention_weights = attention_weights_in.contiguous();
  const auto grad_output = grad_output_in.contiguous();
  const int64_t n = value_in.size(0), len_in = value_in.size(1), heads = value_in.size(2), dim = value_in.size(3);
  const int64_t len_q = sampling_locations.size(1), levels = sampling_locations.size(3),
                points = sampling_locations.size(4);
  const bool by_head = use_head_major(len_in, len_q, levels, points, heads);
  auto value = by_head ? value_in.transpose(1, 2).contiguous() : value_in.contiguous();
  const Layout layout = by_head ? head_major(len_in, heads, dim) : token_major(len_in, heads, dim);

  // S private copies of grad_value when (batch, head) slices are fewer than threads.
  const int64_t slices = n * heads;
  const int64_t threads = at::get_num_threads();
  const int64_t splits = (slices == 0 || len_q == 0) ? 1 : std::max<int64_t>(1, (threads + slices - 1) / slices);
  auto grad_parts = at::zeros({splits, value.size(0), value.size(1), value.size(2), dim}, value.options());
  auto grad_locations = at::empty_like(sampling_locations);
  auto grad_weights = at::empty_like(attention_weights);
  const Isa isa = active_isa();

  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_cpu_backward", [&] {
    const auto pb = make_problem<scalar_t>(value, layout, spatial_shapes, level_start_index, sampling_locations,
                                           attention_weights, len_in, heads, dim);
    const scalar_t* g_out = grad_output.data_ptr<scalar_t>();
    scalar_t* g_value = grad_parts.data_ptr<scalar_t>();
    scalar_t* g_loc = grad_locations.data_ptr<scalar_t>();
    scalar_t* g_attn = grad_weights.data_ptr<scalar_t>();
    const int64_t part_numel = value.numel();
    at::parallel_for(0, slices * splits, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> scratch(4 * dim);
      std::vector<Footprint<scalar_t>> footprints(2 * levels * points);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t split = task % splits, slice = task / splits;
        const int64_t q_begin = len_q * split / splits, q_end = len_q * (split + 1) / splits;
        run_backward_queries<scalar_t>(isa, pb, g_out, g_value + split * part_numel, g_loc, g_attn,
                                       footprints.data(), scratch.data(), slice / heads, slice % heads, q_begin,
                                       q_end);
      }
    });
  });
  value.reset();  // a head-major copy is no longer needed: lower the peak before the reduction
  auto grad_value = splits == 1 ? grad_parts.select(0, 0) : grad_parts.sum(0);
  grad_parts.reset();
  if (by_head) grad_value = grad_value.transpose(1, 2).contiguous();
  return std::make_tuple(grad_value, grad_locations, grad_weights);
}

}  // namespace maskfrozen
