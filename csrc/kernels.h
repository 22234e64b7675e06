// The per-pixel maths of the two ops, shared by the C++ (CPU) loops and the CUDA kernels.
//
// This header needs no PyTorch and no CUDA headers: nvcc compiles the .cu file that
// includes it with the CUDA runtime alone (that is how CI checks the kernels on a machine
// with no GPU and a CPU build of torch), and g++ compiles it for the CPU path. Because the
// CPU tests run this very code, they also check the arithmetic the GPU runs.
#pragma once

#include <stdint.h>
#include <math.h>

// Force inlining on the host too: left to itself, g++ kept warp_pixel out of line and, in a
// -fPIC shared library, called it through the PLT once per pixel (3x slower).
#if defined(__CUDACC__)
#define GANLAB_HD __host__ __device__ __forceinline__
#elif defined(_MSC_VER)
#define GANLAB_HD __forceinline
#else
#define GANLAB_HD inline __attribute__((always_inline))
#endif

namespace ganlab {

// padding_mode argument of warp_batch, in the order of grid_sample's padding_mode names
enum Padding : int { kZeros = 0, kBorder = 1, kReflection = 2 };

// ----------------------------------------------------------------------------------------
// warp_batch: one output pixel of an affine warp with bilinear sampling
//
// Conventions of F.affine_grid + F.grid_sample with align_corners=False:
//   output pixel (i, j) of an h x w output has normalized centre
//       u = (2j + 1) / w - 1,   v = (2i + 1) / h - 1            (both in (-1, 1))
//   (the callers multiply by 1/w and 1/h, computed once: a division per pixel costs more)
//   the sample's 2x3 matrix theta maps it to a normalized source point
//       [gx, gy] = theta @ [u, v, 1]
//   which lands at input pixel coordinates (pixel centres at integers)
//       ix = ((gx + 1) * W - 1) / 2,   iy = ((gy + 1) * H - 1) / 2
// ----------------------------------------------------------------------------------------

// uint8 -> float. On the CPU a table lookup: scalar int-to-float conversions (cvtsi2ss) carry
// a false dependency on their destination register and, 12 per pixel, serialized the loop.
#if defined(__CUDA_ARCH__)
GANLAB_HD float byte_to_float(uint8_t b) { return (float)b; }
#else
struct ByteToFloat {
  float value[256];
  constexpr ByteToFloat() : value() {
    for (int i = 0; i < 256; ++i) value[i] = (float)i;
  }
};
inline constexpr ByteToFloat kByteToFloat{};
GANLAB_HD float byte_to_float(uint8_t b) { return kByteToFloat.value[b]; }
#endif

// Plain comparisons and an integer floor instead of fminf/fmaxf/floorf/fmodf: without
// -ffast-math or SSE4.1, g++ compiles those as calls into libm, several per pixel, which
// made the CPU kernel slower than grid_sample. floor_to_int needs |x| < 2^31.
GANLAB_HD int floor_to_int(float x) {
  const int i = (int)x;  // rounds toward zero
  return x < (float)i ? i - 1 : i;
}

GANLAB_HD float clamp_coordinate(float x, int size) {
  const float high = (float)(size - 1);
  return x < 0.0f ? 0.0f : (x > high ? high : x);
}

// Mirror a coordinate about the image's outer edges (-0.5 and size - 0.5) until it lies
// inside, as grid_sample's padding_mode="reflection" does with align_corners=False.
GANLAB_HD float reflect_coordinate(float x, int size) {
  const float low = -0.5f, span = (float)size;
  x = x < low ? low - x : x - low;  // distance from the low edge
  int flips = floor_to_int(x * (1.0f / span));
  if (x - flips * span >= span) flips += 1;  // the reciprocal may round just below an edge
  const float extra = x - flips * span;  // x mod span
  return (flips % 2 == 0) ? extra + low : span - extra + low;
}

// Source coordinate along one axis after the padding rule. Non-finite or huge values (a
// bad theta) are first pulled into a finite range so that the integer conversion below is
// always defined; such pixels read as padding, never out of bounds.
template <int padding>
GANLAB_HD float source_coordinate(float normalized, int size) {
  float x = ((normalized + 1.0f) * size - 1.0f) * 0.5f;
  if (!(x > -1.0e6f)) x = -1.0e6f;  // also catches NaN
  if (x > 1.0e6f) x = 1.0e6f;
  if (padding == kReflection) x = clamp_coordinate(reflect_coordinate(x, size), size);
  else if (padding == kBorder) x = clamp_coordinate(x, size);
  return x;
}

// The padding mode is a template parameter: one loop per mode, with no per-pixel branch on it.
// Bilinear sample of all 3 channels of one uint8 image (3, H, W) at the output pixel whose
// normalized centre is (u, v), normalized to [-1, 1]. Taps outside the image count as pixel value 0 (zeros padding);
// with border and reflection padding the coordinate is already inside, so every tap is.
// Writes rgb[0..2].
template <int padding>
GANLAB_HD void warp_pixel(const uint8_t* image, int H, int W, const float* theta,
                          float u, float v, float* rgb) {
  const float gx = theta[0] * u + theta[1] * v + theta[2];
  const float gy = theta[3] * u + theta[4] * v + theta[5];
  const float ix = source_coordinate<padding>(gx, W);
  const float iy = source_coordinate<padding>(gy, H);

  // the four neighbours and their weights: (1 - dx)(1 - dy), dx(1 - dy), (1 - dx)dy, dx dy
  const int x0 = floor_to_int(ix), y0 = floor_to_int(iy);
  const int x1 = x0 + 1, y1 = y0 + 1;
  const float dx = ix - x0, dy = iy - y0;
  float w00 = (1.0f - dx) * (1.0f - dy), w01 = dx * (1.0f - dy);
  float w10 = (1.0f - dx) * dy, w11 = dx * dy;
  const int64_t plane = (int64_t)H * W;
  if (x0 >= 0 && x1 < W && y0 >= 0 && y1 < H) {  // most pixels: all four taps inside
    const int64_t a00 = (int64_t)y0 * W + x0;
    for (int c = 0; c < 3; ++c) {
      const uint8_t* p = image + c * plane + a00;
      const float value = w00 * byte_to_float(p[0]) + w01 * byte_to_float(p[1]) +
                          w10 * byte_to_float(p[W]) + w11 * byte_to_float(p[W + 1]);
      rgb[c] = value * (1.0f / 127.5f) - 1.0f;  // pixel p in [0, 255] -> p / 127.5 - 1
    }
    return;
  }
  const bool in_x0 = x0 >= 0 && x0 < W, in_x1 = x1 >= 0 && x1 < W;
  const bool in_y0 = y0 >= 0 && y0 < H, in_y1 = y1 >= 0 && y1 < H;
  // a tap outside the image reads 0: drop its weight and clamp its address so the read
  // below stays inside the image whatever the coordinate was
  if (!(in_x0 && in_y0)) w00 = 0.0f;
  if (!(in_x1 && in_y0)) w01 = 0.0f;
  if (!(in_x0 && in_y1)) w10 = 0.0f;
  if (!(in_x1 && in_y1)) w11 = 0.0f;
  const int cx0 = x0 < 0 ? 0 : (x0 >= W ? W - 1 : x0), cx1 = x1 < 0 ? 0 : (x1 >= W ? W - 1 : x1);
  const int cy0 = y0 < 0 ? 0 : (y0 >= H ? H - 1 : y0), cy1 = y1 < 0 ? 0 : (y1 >= H ? H - 1 : y1);
  const int64_t a00 = (int64_t)cy0 * W + cx0, a01 = (int64_t)cy0 * W + cx1;
  const int64_t a10 = (int64_t)cy1 * W + cx0, a11 = (int64_t)cy1 * W + cx1;
  for (int c = 0; c < 3; ++c) {
    const uint8_t* p = image + c * plane;
    const float value = w00 * byte_to_float(p[a00]) + w01 * byte_to_float(p[a01]) +
                        w10 * byte_to_float(p[a10]) + w11 * byte_to_float(p[a11]);
    // pixel p in [0, 255] -> p / 127.5 - 1 in [-1, 1]
    rgb[c] = value * (1.0f / 127.5f) - 1.0f;
  }
}

// ----------------------------------------------------------------------------------------
// diffaug: DiffAugment's colour, translation and cutout, fused
//
// Applied in sequence to x with per-sample b (brightness offset), s (saturation factor),
// k (contrast factor), with mc = per-pixel mean over channels and M = per-image mean:
//   x1 = x + b;   x2 = (x1 - mc(x1)) s + mc(x1);   x3 = (x2 - M(x2)) k + M(x2)
// Since mc(x1) = mc(x) + b and M(x2) = M(x) + b, this is one affine map of x:
//   x3 = ((x - mc) s + mc - M) k + M + b                       (mc, M of the input x)
// then translation, out[y, x] = x3[y + ty, x + tx] (0 outside), then cutout, out = 0
// inside the rectangle [top, bottom) x [left, right).
// ----------------------------------------------------------------------------------------

// Is output pixel (y, x) kept by the cutout rectangle r = {top, left, bottom, right}?
GANLAB_HD bool outside_cutout(int64_t y, int64_t x, const int64_t* r) {
  return y < r[0] || y >= r[2] || x < r[1] || x >= r[3];
}

}  // namespace ganlab

// ----------------------------------------------------------------------------------------
// CUDA launchers, defined in augment_kernels.cu; raw pointers and a stream only, so that
// the host side (augment_cuda.cpp) and the kernels compile separately. Each returns the
// launch's cudaError_t as an int (0 = success). dtype codes: 0 float32, 1 float64,
// 2 float16, 3 bfloat16. `stream` is a cudaStream_t.
// ----------------------------------------------------------------------------------------
namespace ganlab {
int launch_warp_batch(const uint8_t* bank, int64_t N, int H, int W, const int64_t* index,
                      const float* theta, int64_t B, int h, int w, int padding,
                      void* out, int out_dtype, void* stream);
// float params are in the accumulation type: double for float64 x, float otherwise
int launch_diffaug(const void* x, int64_t B, int C, int H, int W, const void* brightness,
                   const void* saturation, const void* contrast, const int64_t* translation,
                   const int64_t* cutout, void* out, int dtype, void* stream);
int launch_diffaug_backward(const void* grad, int64_t B, int C, int H, int W,
                            const void* saturation, const void* contrast,
                            const int64_t* translation, const int64_t* cutout,
                            void* grad_x, int dtype, void* stream);
// the name and the text of a cudaError_t (cudaGetErrorName, cudaGetErrorString), for messages
const char* cuda_error_name(int error);
const char* cuda_error_text(int error);
}  // namespace ganlab
