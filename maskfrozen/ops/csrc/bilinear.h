// Bilinear footprint of one sampling point, shared by the CPU and the CUDA kernels.
//
// A sample at pixel coordinates (x, y) (centres at integers: x = loc_x * W - 0.5) reads
// the 4 corners (y0,x0), (y0,x1), (y1,x0), (y1,x1) of its cell with the weights
// hy*hx, hy*fx, fy*hx, fy*fx (fx = x - x0, hx = 1 - fx; likewise fy, hy). Corners outside
// the map read zeros (grid_sample's padding_mode="zeros"): their weight is 0 and their
// index is clamped into the map, so reading them anyway stays in bounds.
//
// Non-finite inputs propagate as in grid_sample (so a diverging training shows): a sample
// at a NaN or infinite coordinate reads NaN, and a NaN or infinite attention weight makes
// the output NaN even for a sample outside the map (0 * NaN). Such samples never have a
// corner in the map (NaN fails every comparison), so the kernels handle them on the
// outside-the-map path only, with nan_unless_finite(); in-map samples pay nothing.
#pragma once

#include <cmath>
#include <cstdint>

// MSDA_HOST_DEVICE: callable from host C++ and from CUDA device code.
// MSDA_INLINE: always inlined (the kernels' hot loops rely on it).
#if defined(__CUDACC__)
#define MSDA_HOST_DEVICE __host__ __device__
#define MSDA_INLINE __forceinline__
#elif defined(__GNUC__)
#define MSDA_HOST_DEVICE
#define MSDA_INLINE inline __attribute__((always_inline))
#else
#define MSDA_HOST_DEVICE
#define MSDA_INLINE inline
#endif

namespace maskfrozen {

template <typename T>
struct BilinearCorners {
  int64_t offset[4];  // where each corner's row starts: base + token * stride (token clamped into the map)
  T weight[4];        // bilinear weights, 0 for corners outside the map
  T inside[4];        // 1 if the corner lies in the map, else 0
  T fx, fy;           // position inside the cell (the location gradient needs them)
};

// Fills `c` for a sample at (x, y) on an h x w map whose token t starts at element
// base + t * stride. Returns false, leaving `c` unset, when no corner lies in the map
// (NaN and infinite coordinates included): the sample then reads zeros, unless an input
// is not finite (see nan_unless_finite).
template <typename T>
MSDA_HOST_DEVICE MSDA_INLINE bool bilinear_corners(T x, T y, int64_t h, int64_t w, int64_t base, int64_t stride,
                                                   BilinearCorners<T>& c) {
  if (!(x >= T(-1) && y >= T(-1) && x < T(w) && y < T(h))) return false;
  const T xf = std::floor(x), yf = std::floor(y);
  const int64_t x0 = static_cast<int64_t>(xf), y0 = static_cast<int64_t>(yf);
  const int64_t x1 = x0 + 1, y1 = y0 + 1;
  c.fx = x - xf;
  c.fy = y - yf;
  const bool in_x0 = x0 >= 0, in_x1 = x1 < w, in_y0 = y0 >= 0, in_y1 = y1 < h;
  const int64_t cx0 = in_x0 ? x0 : 0, cx1 = in_x1 ? x1 : w - 1;
  const int64_t cy0 = in_y0 ? y0 : 0, cy1 = in_y1 ? y1 : h - 1;
  c.offset[0] = base + (cy0 * w + cx0) * stride;
  c.offset[1] = base + (cy0 * w + cx1) * stride;
  c.offset[2] = base + (cy1 * w + cx0) * stride;
  c.offset[3] = base + (cy1 * w + cx1) * stride;
  c.inside[0] = T(in_y0 && in_x0);
  c.inside[1] = T(in_y0 && in_x1);
  c.inside[2] = T(in_y1 && in_x0);
  c.inside[3] = T(in_y1 && in_x1);
  const T hx = T(1) - c.fx, hy = T(1) - c.fy;
  c.weight[0] = hy * hx * c.inside[0];
  c.weight[1] = hy * c.fx * c.inside[1];
  c.weight[2] = c.fy * hx * c.inside[2];
  c.weight[3] = c.fy * c.fx * c.inside[3];
  return true;
}

// 0 for a finite v, NaN for NaN or +-inf: summed over a sample's x, y (and attention
// weight) it is what the sample adds to its output and gradients when it lies outside the map.
template <typename T>
MSDA_HOST_DEVICE MSDA_INLINE T nan_unless_finite(T v) {
  return v - v;
}

}  // namespace maskfrozen
