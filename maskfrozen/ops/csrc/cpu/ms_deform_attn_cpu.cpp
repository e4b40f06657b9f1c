// Multi-scale deformable attention on the CPU: forward and backward.
//
// Work is split by head first: a thread handles a contiguous run of (batch, head, query)
// items, so while it runs it reads (and in backward, writes) one head's slice of the
// value maps, which keeps the random bilinear gathers inside a cache-sized working set.
// Each sample touches 4 corner rows of head_dim contiguous numbers; the loops over
// head_dim are the vectorised inner loops (compiled for AVX-512 / AVX2 too and picked
// at run time on x86-64 with GCC or Clang).
//
// Backward without atomics: a (batch, head) slice of grad_value is owned by one task.
// When there are fewer (batch, head) slices than threads, the queries of each slice are
// split into S chunks that accumulate into S private copies of grad_value, summed at the end.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "ms_deform_attn.h"

#if defined(__GNUC__)
#define MSDA_INLINE inline __attribute__((always_inline))
#define MSDA_RESTRICT __restrict__
#else
#define MSDA_INLINE inline
#define MSDA_RESTRICT
#endif

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
#define MSDA_X86_DISPATCH 1
#endif

namespace maskfrozen {
namespace {

// Raw pointers and sizes shared by all tasks of one call.
template <typename T>
struct Problem {
  const T* value;      // [N, Len_in, M, D]
  const T* locations;  // [N, Len_q, M, L, P, 2]
  const T* weights;    // [N, Len_q, M, L, P]
  const int64_t* level_hw;     // [L, 2]
  const int64_t* level_start;  // [L]
  int64_t n, len_in, len_q, heads, head_dim, levels, points;
};

// Bilinear footprint of one sample: the 4 corner rows (clamped into the map so reads stay
// in bounds), their weights (zero for corners outside the map) and the fractional part.
template <typename T>
struct Footprint {
  int64_t row[4];  // token index in the level of corners (y0,x0), (y0,x1), (y1,x0), (y1,x1)
  T weight[4];
  T inside[4];  // 1 if the corner lies in the map, else 0
  T fx, fy;
};

// Returns false when no corner of the sample lies in the map (the sample reads zeros).
// x, y are pixel coordinates with centres at integers (loc * size - 0.5).
template <typename T>
MSDA_INLINE bool bilinear_footprint(T x, T y, int64_t h, int64_t w, Footprint<T>& f) {
  if (!(x >= T(-1) && y >= T(-1) && x < T(w) && y < T(h))) return false;  // also rejects NaN
  const T xf = std::floor(x), yf = std::floor(y);
  const int64_t x0 = static_cast<int64_t>(xf), y0 = static_cast<int64_t>(yf);
  const int64_t x1 = x0 + 1, y1 = y0 + 1;
  f.fx = x - xf;
  f.fy = y - yf;
  const bool in_x0 = x0 >= 0, in_x1 = x1 < w, in_y0 = y0 >= 0, in_y1 = y1 < h;
  const int64_t cx0 = in_x0 ? x0 : 0, cx1 = in_x1 ? x1 : w - 1;
  const int64_t cy0 = in_y0 ? y0 : 0, cy1 = in_y1 ? y1 : h - 1;
  f.row[0] = cy0 * w + cx0;
  f.row[1] = cy0 * w + cx1;
  f.row[2] = cy1 * w + cx0;
  f.row[3] = cy1 * w + cx1;
  f.inside[0] = T(in_y0 && in_x0);
  f.inside[1] = T(in_y0 && in_x1);
  f.inside[2] = T(in_y1 && in_x0);
  f.inside[3] = T(in_y1 && in_x1);
  const T hx = T(1) - f.fx, hy = T(1) - f.fy;
  f.weight[0] = hy * hx * f.inside[0];
  f.weight[1] = hy * f.fx * f.inside[1];
  f.weight[2] = f.fy * hx * f.inside[2];
  f.weight[3] = f.fy * f.fx * f.inside[3];
  return true;
}

// out[d] += sum_c w[c] * v_c[d]
template <typename T>
MSDA_INLINE void accumulate_corners(T* MSDA_RESTRICT out, const T* MSDA_RESTRICT v0, const T* MSDA_RESTRICT v1,
                                    const T* MSDA_RESTRICT v2, const T* MSDA_RESTRICT v3, T w0, T w1, T w2, T w3,
                                    int64_t dim) {
#pragma omp simd
  for (int64_t d = 0; d < dim; ++d) out[d] += w0 * v0[d] + w1 * v1[d] + w2 * v2[d] + w3 * v3[d];
}

// Forward for flat items [begin, end) of the (batch, head, query) grid.
template <typename T>
MSDA_INLINE void forward_items(const Problem<T>& pb, T* MSDA_RESTRICT output, int64_t begin, int64_t end) {
  const int64_t dim = pb.head_dim, heads = pb.heads, row_stride = heads * dim;
  const int64_t samples = pb.levels * pb.points;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t q = item % pb.len_q, nm = item / pb.len_q;
    const int64_t m = nm % heads, n = nm / heads;
    const int64_t qm = (n * pb.len_q + q) * heads + m;
    T* MSDA_RESTRICT out = output + qm * dim;
    std::fill(out, out + dim, T(0));
    const T* loc = pb.locations + qm * samples * 2;
    const T* attn = pb.weights + qm * samples;
    for (int64_t l = 0; l < pb.levels; ++l) {
      const int64_t h = pb.level_hw[2 * l], w = pb.level_hw[2 * l + 1];
      const T* base = pb.value + ((n * pb.len_in + pb.level_start[l]) * heads + m) * dim;
      for (int64_t p = 0; p < pb.points; ++p, loc += 2, ++attn) {
        Footprint<T> f;
        if (!bilinear_footprint<T>(loc[0] * T(w) - T(0.5), loc[1] * T(h) - T(0.5), h, w, f)) continue;
        const T a = *attn;
        accumulate_corners<T>(out, base + f.row[0] * row_stride, base + f.row[1] * row_stride,
                              base + f.row[2] * row_stride, base + f.row[3] * row_stride, a * f.weight[0],
                              a * f.weight[1], a * f.weight[2], a * f.weight[3], dim);
      }
    }
  }
}

// One sample's backward over head_dim: returns the 4 dot products <grad_out, v_c> and adds
// a * w_c * grad_out into the corner rows of grad_value (gv_c point to scratch rows for
// corners outside the map, so the 4 destinations never alias).
template <typename T>
MSDA_INLINE void backward_corners(const T* MSDA_RESTRICT g, const T* MSDA_RESTRICT v0, const T* MSDA_RESTRICT v1,
                                  const T* MSDA_RESTRICT v2, const T* MSDA_RESTRICT v3, T* MSDA_RESTRICT gv0,
                                  T* MSDA_RESTRICT gv1, T* MSDA_RESTRICT gv2, T* MSDA_RESTRICT gv3, T w0, T w1, T w2,
                                  T w3, int64_t dim, T dots[4]) {
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
// weight gradients and accumulates into grad_value (layout [N, Len_in, M, D]).
template <typename T>
MSDA_INLINE void backward_queries(const Problem<T>& pb, const T* MSDA_RESTRICT grad_output, T* grad_value,
                                  T* MSDA_RESTRICT grad_locations, T* MSDA_RESTRICT grad_weights, T* scratch,
                                  int64_t n, int64_t m, int64_t q_begin, int64_t q_end) {
  const int64_t dim = pb.head_dim, heads = pb.heads, row_stride = heads * dim;
  const int64_t samples = pb.levels * pb.points;
  for (int64_t q = q_begin; q < q_end; ++q) {
    const int64_t qm = (n * pb.len_q + q) * heads + m;
    const T* g = grad_output + qm * dim;
    const T* loc = pb.locations + qm * samples * 2;
    const T* attn = pb.weights + qm * samples;
    T* g_loc = grad_locations + qm * samples * 2;
    T* g_attn = grad_weights + qm * samples;
    for (int64_t l = 0; l < pb.levels; ++l) {
      const int64_t h = pb.level_hw[2 * l], w = pb.level_hw[2 * l + 1];
      const int64_t offset = ((n * pb.len_in + pb.level_start[l]) * heads + m) * dim;
      const T* base = pb.value + offset;
      T* grad_base = grad_value + offset;
      for (int64_t p = 0; p < pb.points; ++p, loc += 2, ++attn, g_loc += 2, ++g_attn) {
        Footprint<T> f;
        if (!bilinear_footprint<T>(loc[0] * T(w) - T(0.5), loc[1] * T(h) - T(0.5), h, w, f)) {
          g_loc[0] = g_loc[1] = *g_attn = T(0);
          continue;
        }
        const T a = *attn;
        T* gv[4];
        for (int c = 0; c < 4; ++c) gv[c] = f.inside[c] != T(0) ? grad_base + f.row[c] * row_stride : scratch + c * dim;
        T dots[4];
        backward_corners<T>(g, base + f.row[0] * row_stride, base + f.row[1] * row_stride,
                            base + f.row[2] * row_stride, base + f.row[3] * row_stride, gv[0], gv[1], gv[2], gv[3],
                            a * f.weight[0], a * f.weight[1], a * f.weight[2], a * f.weight[3], dim, dots);
        for (int c = 0; c < 4; ++c) dots[c] *= f.inside[c];
        const T hx = T(1) - f.fx, hy = T(1) - f.fy;
        *g_attn = f.weight[0] * dots[0] + f.weight[1] * dots[1] + f.weight[2] * dots[2] + f.weight[3] * dots[3];
        // d sample / d x = d sample / d fx * W (x = loc_x * W - 0.5); likewise for y.
        g_loc[0] = a * T(w) * (hy * (dots[1] - dots[0]) + f.fy * (dots[3] - dots[2]));
        g_loc[1] = a * T(h) * (hx * (dots[2] - dots[0]) + f.fx * (dots[3] - dots[1]));
      }
    }
  }
}

// ---- instruction-set variants: the same inlined bodies compiled for wider vectors ----
template <typename T>
void forward_items_default(const Problem<T>& pb, T* output, int64_t begin, int64_t end) {
  forward_items<T>(pb, output, begin, end);
}
template <typename T>
void backward_queries_default(const Problem<T>& pb, const T* grad_output, T* grad_value, T* grad_locations,
                              T* grad_weights, T* scratch, int64_t n, int64_t m, int64_t q_begin, int64_t q_end) {
  backward_queries<T>(pb, grad_output, grad_value, grad_locations, grad_weights, scratch, n, m, q_begin, q_end);
}

#ifdef MSDA_X86_DISPATCH
#define MSDA_DEFINE_VARIANT(SUFFIX, TARGET)                                                                        \
  template <typename T>                                                                                            \
  __attribute__((target(TARGET))) void forward_items_##SUFFIX(const Problem<T>& pb, T* output, int64_t begin,      \
                                                              int64_t end) {                                       \
    forward_items<T>(pb, output, begin, end);                                                                      \
  }                                                                                                                \
  template <typename T>                                                                                            \
  __attribute__((target(TARGET))) void backward_queries_##SUFFIX(                                                  \
      const Problem<T>& pb, const T* grad_output, T* grad_value, T* grad_locations, T* grad_weights, T* scratch,   \
      int64_t n, int64_t m, int64_t q_begin, int64_t q_end) {                                                      \
    backward_queries<T>(pb, grad_output, grad_value, grad_locations, grad_weights, scratch, n, m, q_begin, q_end); \
  }
MSDA_DEFINE_VARIANT(avx2, "avx2,fma")
MSDA_DEFINE_VARIANT(avx512, "avx512f,avx512vl,avx2,fma")
#undef MSDA_DEFINE_VARIANT
#endif

enum class Isa { kDefault, kAvx2, kAvx512 };

Isa detect_isa() {
#ifdef MSDA_X86_DISPATCH
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")) return Isa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
    return Isa::kDefault;
  }();
  return isa;
#else
  return Isa::kDefault;
#endif
}

template <typename T>
void run_forward_items(Isa isa, const Problem<T>& pb, T* output, int64_t begin, int64_t end) {
#ifdef MSDA_X86_DISPATCH
  if (isa == Isa::kAvx512) return forward_items_avx512<T>(pb, output, begin, end);
  if (isa == Isa::kAvx2) return forward_items_avx2<T>(pb, output, begin, end);
#endif
  forward_items_default<T>(pb, output, begin, end);
}

template <typename T>
void run_backward_queries(Isa isa, const Problem<T>& pb, const T* grad_output, T* grad_value, T* grad_locations,
                          T* grad_weights, T* scratch, int64_t n, int64_t m, int64_t q_begin, int64_t q_end) {
#ifdef MSDA_X86_DISPATCH
  if (isa == Isa::kAvx512)
    return backward_queries_avx512<T>(pb, grad_output, grad_value, grad_locations, grad_weights, scratch, n, m,
                                      q_begin, q_end);
  if (isa == Isa::kAvx2)
    return backward_queries_avx2<T>(pb, grad_output, grad_value, grad_locations, grad_weights, scratch, n, m,
                                    q_begin, q_end);
#endif
  backward_queries_default<T>(pb, grad_output, grad_value, grad_locations, grad_weights, scratch, n, m, q_begin,
                              q_end);
}

template <typename T>
Problem<T> make_problem(const at::Tensor& value, const at::Tensor& spatial_shapes,
                        const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                        const at::Tensor& attention_weights) {
  Problem<T> pb;
  pb.value = value.data_ptr<T>();
  pb.locations = sampling_locations.data_ptr<T>();
  pb.weights = attention_weights.data_ptr<T>();
  pb.level_hw = spatial_shapes.data_ptr<int64_t>();
  pb.level_start = level_start_index.data_ptr<int64_t>();
  pb.n = value.size(0);
  pb.len_in = value.size(1);
  pb.heads = value.size(2);
  pb.head_dim = value.size(3);
  pb.len_q = sampling_locations.size(1);
  pb.levels = sampling_locations.size(3);
  pb.points = sampling_locations.size(4);
  return pb;
}

// Items per parallel chunk: enough work to amortise scheduling, small enough to balance.
constexpr int64_t kForwardGrain = 64;

}  // namespace

at::Tensor ms_deform_attn_cpu_forward(const at::Tensor& value_in, const at::Tensor& spatial_shapes_in,
                                      const at::Tensor& level_start_index_in,
                                      const at::Tensor& sampling_locations_in,
                                      const at::Tensor& attention_weights_in) {
  const auto value = value_in.contiguous();
  const auto spatial_shapes = spatial_shapes_in.contiguous();
  const auto level_start_index = level_start_index_in.contiguous();
  const auto sampling_locations = sampling_locations_in.contiguous();
  const auto attention_weights = attention_weights_in.contiguous();
  const int64_t n = value.size(0), heads = value.size(2), dim = value.size(3), len_q = sampling_locations.size(1);
  auto output = at::empty({n, len_q, heads * dim}, value.options());
  const Isa isa = detect_isa();
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_cpu_forward", [&] {
    const auto pb = make_problem<scalar_t>(value, spatial_shapes, level_start_index, sampling_locations,
                                           attention_weights);
    scalar_t* out = output.data_ptr<scalar_t>();
    at::parallel_for(0, n * heads * len_q, kForwardGrain, [&](int64_t begin, int64_t end) {
      run_forward_items<scalar_t>(isa, pb, out, begin, end);
    });
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_cpu_backward(
    const at::Tensor& value_in, const at::Tensor& spatial_shapes_in, const at::Tensor& level_start_index_in,
    const at::Tensor& sampling_locations_in, const at::Tensor& attention_weights_in,
    const at::Tensor& grad_output_in) {
  const auto value = value_in.contiguous();
  const auto spatial_shapes = spatial_shapes_in.contiguous();
  const auto level_start_index = level_start_index_in.contiguous();
  const auto sampling_locations = sampling_locations_in.contiguous();
  const auto attention_weights = attention_weights_in.contiguous();
  const auto grad_output = grad_output_in.contiguous();
  const int64_t n = value.size(0), heads = value.size(2), dim = value.size(3), len_q = sampling_locations.size(1);

  // S private copies of grad_value when (batch, head) slices are fewer than threads.
  const int64_t slices = n * heads;
  const int64_t threads = at::get_num_threads();
  const int64_t splits = (slices == 0 || len_q == 0) ? 1 : std::max<int64_t>(1, (threads + slices - 1) / slices);
  auto grad_value_parts = at::zeros({splits, value.size(0), value.size(1), heads, dim}, value.options());
  auto grad_locations = at::empty_like(sampling_locations);
  auto grad_weights = at::empty_like(attention_weights);
  const Isa isa = detect_isa();

  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_cpu_backward", [&] {
    const auto pb = make_problem<scalar_t>(value, spatial_shapes, level_start_index, sampling_locations,
                                           attention_weights);
    const scalar_t* g_out = grad_output.data_ptr<scalar_t>();
    scalar_t* g_value = grad_value_parts.data_ptr<scalar_t>();
    scalar_t* g_loc = grad_locations.data_ptr<scalar_t>();
    scalar_t* g_attn = grad_weights.data_ptr<scalar_t>();
    const int64_t part_numel = value.numel();
    at::parallel_for(0, slices * splits, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> scratch(4 * dim);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t split = task % splits, slice = task / splits;
        const int64_t q_begin = len_q * split / splits, q_end = len_q * (split + 1) / splits;
        run_backward_queries<scalar_t>(isa, pb, g_out, g_value + split * part_numel, g_loc, g_attn, scratch.data(),
                                       slice / heads, slice % heads, q_begin, q_end);
      }
    });
  });
  auto grad_value = splits == 1 ? grad_value_parts.squeeze(0) : grad_value_parts.sum(0);
  return std::make_tuple(grad_value, grad_locations, grad_weights);
}

}  // namespace maskfrozen
