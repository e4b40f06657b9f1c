// Multi-scale deformable attention kernels (Deformable-DETR eq. 3).
//
// Shapes (all tensors on one device):
//   value              [N, Len_in, M, D]   float32 / float64
//   spatial_shapes     [L, 2]              int64 (H, W) per level
//   level_start_index  [L]                 int64
//   sampling_locations [N, Len_q, M, L, P, 2]  normalised (x, y)
//   attention_weights  [N, Len_q, M, L, P]
//   output             [N, Len_q, M * D]
// Bilinear sampling at (x * W - 0.5, y * H - 0.5) with zeros outside the map, i.e.
// grid_sample(align_corners=False, padding_mode="zeros"). As there, NaN or infinite
// locations read NaN and NaN weights propagate to the output (see bilinear.h).
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <tuple>

namespace maskfrozen {

at::Tensor ms_deform_attn_cpu_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights);

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_cpu_backward(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights, const at::Tensor& grad_output);

// Instruction set of the CPU kernels' inner loops: "default", "avx2" or "avx512" (the best
// the CPU supports unless overridden; overriding is for tests and benchmarks).
std::string ms_deform_attn_cpu_isa();
std::string ms_deform_attn_set_cpu_isa(const std::string& name);  // returns the previous one

#ifdef WITH_CUDA
at::Tensor ms_deform_attn_cuda_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights);

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_cuda_backward(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights, const at::Tensor& grad_output);
#endif

}  // namespace maskfrozen
