// Multi-scale deformable attention on CUDA: forward and backward (float32 / float64;
// half and bfloat16 are upcast by the Python wrapper).
//
// Forward: one thread per output element (batch, query, head, channel); the threads of a
// warp read consecutive channels of the same corner rows, so gathers are coalesced.
// Backward: one warp per (batch, query, head); lanes stride over channels, add their
// share into grad_value with atomicAdd (consecutive addresses across the warp), and the
// per-sample dot products for the location / weight gradients are reduced with shuffles.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <climits>

#include "bilinear.h"
#include "ms_deform_attn.h"

namespace maskfrozen {
namespace {

constexpr int kThreadsPerBlock = 256;
constexpr int kWarpSize = 32;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

struct Sizes {
  int64_t len_in, len_q, heads, dim, levels, points;
};

// out [N, Len_q, M*D]: element i is (batch, query, head, channel) = flat index i.
template <typename T>
__global__ void forward_kernel(const T* __restrict__ value, const int64_t* __restrict__ level_hw,
                               const int64_t* __restrict__ level_start, const T* __restrict__ locations,
                               const T* __restrict__ weights, T* __restrict__ output, int64_t items, Sizes s) {
  const int64_t row_stride = s.heads * s.dim, samples = s.levels * s.points;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < items;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t d = i % s.dim, qm = i / s.dim;
    const int64_t m = qm % s.heads, n = qm / s.heads / s.len_q;
    const T* loc = locations + qm * samples * 2;
    const T* attn = weights + qm * samples;
    const T* base = value + n * s.len_in * row_stride + m * s.dim + d;
    T acc = 0;
    for (int64_t l = 0; l < s.levels; ++l) {
      const int64_t h = level_hw[2 * l], w = level_hw[2 * l + 1];
      const T* level = base + level_start[l] * row_stride;
      for (int64_t p = 0; p < s.points; ++p, loc += 2, ++attn) {
        BilinearCorners<T> f;  // offsets are token indices (base 0, stride 1)
        const T x = loc[0] * T(w) - T(0.5), y = loc[1] * T(h) - T(0.5);
        if (!bilinear_corners<T>(x, y, h, w, 0, 1, f)) {
          acc += nan_unless_finite(x) + nan_unless_finite(y) + nan_unless_finite(*attn);  // 0 or NaN
          continue;
        }
        T sample = 0;
#pragma unroll
        for (int c = 0; c < 4; ++c) sample += f.weight[c] * level[f.offset[c] * row_stride];
        acc += *attn * sample;
      }
    }
    output[i] = acc;
  }
}

// One warp per (batch, query, head) = qm; all lanes of a warp share qm, so the loop trip
// counts and the full-mask shuffles are uniform across the warp.
template <typename T>
__global__ void backward_kernel(const T* __restrict__ value, const int64_t* __restrict__ level_hw,
                                const int64_t* __restrict__ level_start, const T* __restrict__ locations,
                                const T* __restrict__ weights, const T* __restrict__ grad_output,
                                T* __restrict__ grad_value, T* __restrict__ grad_locations,
                                T* __restrict__ grad_weights, int64_t query_heads, Sizes s) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps_in_grid = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarpSize);
  const int64_t row_stride = s.heads * s.dim, samples = s.levels * s.points;
  for (int64_t qm = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kWarpSize; qm < query_heads;
       qm += warps_in_grid) {
    const int64_t m = qm % s.heads, n = qm / s.heads / s.len_q;
    const T* g = grad_output + qm * s.dim;
    const T* loc = locations + qm * samples * 2;
    const T* attn = weights + qm * samples;
    T* g_loc = grad_locations + qm * samples * 2;
    T* g_attn = grad_weights + qm * samples;
    const int64_t slice = n * s.len_in * row_stride + m * s.dim;
    for (int64_t l = 0; l < s.levels; ++l) {
      const int64_t h = level_hw[2 * l], w = level_hw[2 * l + 1];
      const int64_t level = slice + level_start[l] * row_stride;
      for (int64_t p = 0; p < s.points; ++p) {
        const int64_t sample = l * s.points + p;
        // Token indices (base 0, stride 1), scaled in the loop below: element offsets
        // computed here instead raised the register use (float: 80 -> 126 per thread).
        BilinearCorners<T> f;
        const T x = loc[2 * sample] * T(w) - T(0.5), y = loc[2 * sample + 1] * T(h) - T(0.5);
        const T a = attn[sample];
        if (!bilinear_corners<T>(x, y, h, w, 0, 1, f)) {
          if (lane == 0) {  // zeros, or NaN for non-finite inputs (as in grid_sample's backward)
            const T nan_xy = nan_unless_finite(x) + nan_unless_finite(y);
            g_loc[2 * sample] = g_loc[2 * sample + 1] = nan_xy + nan_unless_finite(a);
            g_attn[sample] = nan_xy;
          }
          continue;
        }
        T dots[4] = {0, 0, 0, 0};
        for (int64_t d = lane; d < s.dim; d += kWarpSize) {
          const T gd = g[d];
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const int64_t idx = level + f.offset[c] * row_stride + d;
            dots[c] += gd * value[idx];
            if (f.inside[c] != T(0)) atomicAdd(grad_value + idx, a * f.weight[c] * gd);
          }
        }
#pragma unroll
        for (int c = 0; c < 4; ++c) dots[c] = warp_sum(dots[c]) * f.inside[c];
        if (lane == 0) {
          const T hx = T(1) - f.fx, hy = T(1) - f.fy;
          g_attn[sample] = f.weight[0] * dots[0] + f.weight[1] * dots[1] + f.weight[2] * dots[2] + f.weight[3] * dots[3];
          g_loc[2 * sample] = a * T(w) * (hy * (dots[1] - dots[0]) + f.fy * (dots[3] - dots[2]));
          g_loc[2 * sample + 1] = a * T(h) * (hx * (dots[2] - dots[0]) + f.fx * (dots[3] - dots[1]));
        }
      }
    }
  }
}

int blocks_for(int64_t threads) {
  return static_cast<int>(std::min<int64_t>((threads + kThreadsPerBlock - 1) / kThreadsPerBlock, INT_MAX));
}

Sizes sizes_of(const at::Tensor& value, const at::Tensor& sampling_locations) {
  return {value.size(1), sampling_locations.size(1), value.size(2), value.size(3), sampling_locations.size(3),
          sampling_locations.size(4)};
}

}  // namespace

at::Tensor ms_deform_attn_cuda_forward(const at::Tensor& value_in, const at::Tensor& spatial_shapes_in,
                                       const at::Tensor& level_start_index_in,
                                       const at::Tensor& sampling_locations_in,
                                       const at::Tensor& attention_weights_in) {
  const c10::cuda::CUDAGuard device_guard(value_in.device());
  const auto value = value_in.contiguous();
  const auto spatial_shapes = spatial_shapes_in.contiguous();
  const auto level_start_index = level_start_index_in.contiguous();
  const auto sampling_locations = sampling_locations_in.contiguous();
  const auto attention_weights = attention_weights_in.contiguous();
  const Sizes s = sizes_of(value, sampling_locations);
  auto output = at::empty({value.size(0), s.len_q, s.heads * s.dim}, value.options());
  const int64_t items = output.numel();
  if (items == 0) return output;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_cuda_forward", [&] {
    forward_kernel<scalar_t><<<blocks_for(items), kThreadsPerBlock, 0, stream>>>(
        value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(), level_start_index.data_ptr<int64_t>(),
        sampling_locations.data_ptr<scalar_t>(), attention_weights.data_ptr<scalar_t>(),
        output.data_ptr<scalar_t>(), items, s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_cuda_backward(
    const at::Tensor& value_in, const at::Tensor& spatial_shapes_in, const at::Tensor& level_start_index_in,
    const at::Tensor& sampling_locations_in, const at::Tensor& attention_weights_in,
    const at::Tensor& grad_output_in) {
  const c10::cuda::CUDAGuard device_guard(value_in.device());
  const auto value = value_in.contiguous();
  const auto spatial_shapes = spatial_shapes_in.contiguous();
  const auto level_start_index = level_start_index_in.contiguous();
  const auto sampling_locations = sampling_locations_in.contiguous();
  const auto attention_weights = attention_weights_in.contiguous();
  const auto grad_output = grad_output_in.contiguous();
  const Sizes s = sizes_of(value, sampling_locations);
  auto grad_value = at::zeros_like(value);
  auto grad_locations = at::empty_like(sampling_locations);
  auto grad_weights = at::empty_like(attention_weights);
  const int64_t query_heads = value.size(0) * s.len_q * s.heads;
  if (query_heads == 0 || s.dim == 0) {
    grad_locations.zero_();
    grad_weights.zero_();
    return std::make_tuple(grad_value, grad_locations, grad_weights);
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_cuda_backward", [&] {
    backward_kernel<scalar_t><<<blocks_for(query_heads * kWarpSize), kThreadsPerBlock, 0, stream>>>(
        value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(), level_start_index.data_ptr<int64_t>(),
        sampling_locations.data_ptr<scalar_t>(), attention_weights.data_ptr<scalar_t>(),
        grad_output.data_ptr<scalar_t>(), grad_value.data_ptr<scalar_t>(), grad_locations.data_ptr<scalar_t>(),
        grad_weights.data_ptr<scalar_t>(), query_heads, s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return std::make_tuple(grad_value, grad_locations, grad_weights);
}

}  // namespace maskfrozen
