// Bilinear footprint of one sampling point, shared by the CPU and the CUDA kernels.
//
// A sample at pixel coordinates (x, y) (centres at integers: x = loc_x * W - 0.5) reads
// the 4 corners (y0,x0), (y0,x1), (y1,x0), (y1,x1) of its cell with the weights
// hy*hx, hy*fx, fy*hx, fy*fx (fx = x - x0, hx = 1 - fx; likewise fy, hy). Corners outside
// the map read zeros (grid_sample's padding_mode="zeros"): their weight is 0 and their
// index is clamped into the map, so reading them anyway stays in bounds.
//
// Non-finite inputs propagate as in grid_sample (so a diverging training shows): a sample
// at a NaN or infinite coordinate reads NaN, and a sample with a NaN or infinite attention
// weight makes the output NaN even when it lies outside the map (0 * NaN). Both are
// encoded as "dummy" footprints: 4 in-bounds reads of the level's first token, marked
// outside (nothing is written there in backward), with NaN (bad coordinate) or 0 (bad
// weight) bilinear weights, so the kernels' ordinary arithmetic carries the NaN along and
// in-map samples pay nothing extra.
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

// A footprint that reads the token at `base` four times with bilinear weight `fill` and
// cell position (`fill`, `fill`), every corner marked outside the map.
template <typename T>
MSDA_HOST_DEVICE MSDA_INLINE void dummy_corners(int64_t base, T fill, BilinearCorners<T>& c) {
  for (int k = 0; k < 4; ++k) {
    c.offset[k] = base;
    c.weight[k] = fill;
    c.inside[k] = T(0);
  }
  c.fx = c.fy = fill;
}

// Fills `c` for a sample at (x, y) on an h x w map whose token t starts at element
// base + t * stride. Returns false, leaving `c` unset, when no corner lies in the map
// and x, y are finite: the sample then reads zeros. A NaN or infinite x or y gives a
// dummy footprint with NaN weights (the sample reads NaN) and returns true.
template <typename T>
MSDA_HOST_DEVICE MSDA_INLINE bool bilinear_corners(T x, T y, int64_t h, int64_t w, int64_t base, int64_t stride,
                                                   BilinearCorners<T>& c) {
  if (!(x >= T(-1) && y >= T(-1) && x < T(w) && y < T(h))) {
    const T nan_or_zero = (x - x) + (y - y);  // 0 when both are finite, else NaN
    if (nan_or_zero == T(0)) return false;
    dummy_corners<T>(base, nan_or_zero, c);
    return true;
  }
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

// bilinear_corners, and also returns true (with a dummy footprint of weight 0) for a
// sample outside the map whose attention weight `attn` is NaN or infinite: the kernels
// multiply the 0 it reads by `attn`, which gives NaN as in the reference.
template <typename T>
MSDA_HOST_DEVICE MSDA_INLINE bool sample_corners(T x, T y, T attn, int64_t h, int64_t w, int64_t base,
                                                 int64_t stride, BilinearCorners<T>& c) {
  if (bilinear_corners<T>(x, y, h, w, base, stride, c)) return true;
  if (attn - attn == T(0)) return false;  // finite weight times zeros: no contribution
  dummy_corners<T>(base, T(0), c);
  return true;
}

}  // namespace maskfrozen
