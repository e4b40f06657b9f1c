// Python bindings of maskfrozen._C: input checks, then dispatch by device to the CPU or
// CUDA kernel. The Python wrapper (maskfrozen/ops/dispatch.py) checks the same
// things with friendlier messages; these checks keep direct calls safe.
#include <torch/extension.h>

#include <vector>

#include "ms_deform_attn.h"

namespace maskfrozen {
namespace {

void check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                  const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be [N, Len_in, n_heads, head_dim], got ", value.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
              "ms_deform_attn: sampling_locations must be [N, Len_q, n_heads, n_levels, n_points, 2], got ",
              sampling_locations.sizes());
  const int64_t n = value.size(0), m = value.size(2);
  const int64_t len_q = sampling_locations.size(1), num_levels = sampling_locations.size(3),
                num_points = sampling_locations.size(4);
  TORCH_CHECK(sampling_locations.size(0) == n && sampling_locations.size(2) == m, "ms_deform_attn: sampling_locations ",
              sampling_locations.sizes(), " disagrees with value ", value.sizes(), " in batch size or heads");
  const std::vector<int64_t> weights_shape{n, len_q, m, num_levels, num_points};
  TORCH_CHECK(attention_weights.sizes() == at::IntArrayRef(weights_shape),
              "ms_deform_attn: attention_weights must be [N, Len_q, n_heads, n_levels, n_points] = ",
              at::IntArrayRef(weights_shape), ", got ", attention_weights.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(0) == num_levels && spatial_shapes.size(1) == 2,
              "ms_deform_attn: spatial_shapes must be [n_levels=", num_levels, ", 2], got ", spatial_shapes.sizes());
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == num_levels,
              "ms_deform_attn: level_start_index must be [n_levels=", num_levels, "], got ", level_start_index.sizes());
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong,
              "ms_deform_attn: spatial_shapes and level_start_index must be int64, got ", spatial_shapes.scalar_type(),
              " and ", level_start_index.scalar_type());
  TORCH_CHECK(value.scalar_type() == at::kFloat || value.scalar_type() == at::kDouble,
              "ms_deform_attn: the compiled kernels take float32 or float64, got ", value.scalar_type());
  TORCH_CHECK(sampling_locations.scalar_type() == value.scalar_type() &&
                  attention_weights.scalar_type() == value.scalar_type(),
              "ms_deform_attn: value, sampling_locations and attention_weights must share one dtype, got ",
              value.scalar_type(), ", ", sampling_locations.scalar_type(), ", ", attention_weights.scalar_type());
  const auto device = value.device();
  TORCH_CHECK(spatial_shapes.device() == device && level_start_index.device() == device &&
                  sampling_locations.device() == device && attention_weights.device() == device,
              "ms_deform_attn: all inputs must be on one device; value is on ", device, ", spatial_shapes on ",
              spatial_shapes.device(), ", level_start_index on ", level_start_index.device(),
              ", sampling_locations on ", sampling_locations.device(), ", attention_weights on ",
              attention_weights.device());
}

// Level geometry must describe value exactly, or the kernels would read out of bounds.
// Checked on CPU only: on CUDA it would need a device-to-host copy (the Python wrapper checks).
void check_levels_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index) {
  const auto shapes = spatial_shapes.contiguous();
  const auto starts = level_start_index.contiguous();
  const int64_t* hw = shapes.data_ptr<int64_t>();
  const int64_t* start = starts.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t l = 0; l < shapes.size(0); ++l) {
    TORCH_CHECK(hw[2 * l] > 0 && hw[2 * l + 1] > 0, "ms_deform_attn: spatial_shapes[", l, "] = (", hw[2 * l], ", ",
                hw[2 * l + 1], ") must be positive");
    TORCH_CHECK(start[l] == total, "ms_deform_attn: level_start_index[", l, "] = ", start[l],
                " is inconsistent with spatial_shapes (expected ", total, ")");
    total += hw[2 * l] * hw[2 * l + 1];
  }
  TORCH_CHECK(total == value.size(1), "ms_deform_attn: value has Len_in=", value.size(1),
              " tokens but spatial_shapes sum to ", total, " (sum of H*W)");
}

at::Tensor forward(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                   const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  if (value.is_cuda()) {
#ifdef WITH_CUDA
    return ms_deform_attn_cuda_forward(value, spatial_shapes, level_start_index, sampling_locations,
                                       attention_weights);
#else
    TORCH_CHECK(false, "ms_deform_attn: maskfrozen._C was built without CUDA");
#endif
  }
  TORCH_CHECK(value.device().is_cpu(), "ms_deform_attn: no kernel for device ", value.device());
  check_levels_cpu(value, spatial_shapes, level_start_index);
  return ms_deform_attn_cpu_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                                        const at::Tensor& level_start_index,
                                                        const at::Tensor& sampling_locations,
                                                        const at::Tensor& attention_weights,
                                                        const at::Tensor& grad_output) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const std::vector<int64_t> expected{value.size(0), sampling_locations.size(1), value.size(2) * value.size(3)};
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(expected), "ms_deform_attn: grad_output must be ",
              at::IntArrayRef(expected), ", got ",
              grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == value.scalar_type() && grad_output.device() == value.device(),
              "ms_deform_attn: grad_output must match value's dtype and device");
  if (value.is_cuda()) {
#ifdef WITH_CUDA
    return ms_deform_attn_cuda_backward(value, spatial_shapes, level_start_index, sampling_locations,
                                        attention_weights, grad_output);
#else
    TORCH_CHECK(false, "ms_deform_attn: maskfrozen._C was built without CUDA");
#endif
  }
  TORCH_CHECK(value.device().is_cpu(), "ms_deform_attn: no kernel for device ", value.device());
  check_levels_cpu(value, spatial_shapes, level_start_index);
  return ms_deform_attn_cpu_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                                     grad_output);
}

bool cuda_compiled() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace
}  // namespace maskfrozen

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "maskfrozen compiled ops: multi-scale deformable attention (CPU; CUDA when built with it)";
  m.def("ms_deform_attn_forward", &maskfrozen::forward, "multi-scale deformable attention forward",
        py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"), py::arg("sampling_locations"),
        py::arg("attention_weights"));
  m.def("ms_deform_attn_backward", &maskfrozen::backward,
        "multi-scale deformable attention backward -> (grad_value, grad_sampling_locations, grad_attention_weights)",
        py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"), py::arg("sampling_locations"),
        py::arg("attention_weights"), py::arg("grad_output"));
  m.def("cpu_isa", &maskfrozen::ms_deform_attn_cpu_isa, "instruction set used by the CPU kernels");
  m.def("set_cpu_isa", &maskfrozen::ms_deform_attn_set_cpu_isa,
        "force the CPU kernels' instruction set (default, avx2, avx512); returns the previous one", py::arg("name"));
  m.def("cuda_compiled", &maskfrozen::cuda_compiled, "whether the CUDA kernels were compiled in");
}
