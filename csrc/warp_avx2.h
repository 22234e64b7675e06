// warp_batch's CPU loop over one output row, eight pixels at a time with AVX2 and FMA.
//
// The maths is warp_pixel's (kernels.h), lane by lane: the same coordinate formula, padding
// rules, floor, weights and normalisation, so the two paths agree to float rounding (the
// tests run both against grid_sample). What changes is how a pixel's four taps are read:
// one 32-bit gather at the top-left tap's address brings the top-left and top-right bytes
// (the low two of the four it reads), a second gather one row down brings the bottom pair,
// so 8 pixels x 4 taps x 3 channels cost 6 gathers instead of 96 byte loads and table
// lookups. That only works when all four taps lie inside the image, which is most pixels of
// a typical augmentation; a group of 8 with any tap outside (zeros padding near the edges,
// or an image smaller than 2x2) takes warp_pixel, as do the last w % 8 pixels of a row.
//
// Each gather reads two bytes past the right-hand tap. Inside the bank that is harmless (the
// next row, plane or image); after the bank's last byte it is not, so the caller sends rows
// of the bank's last image to the scalar loop.
//
// Compiled for x86-64 with GCC or Clang through a function attribute, whatever the build's
// -march, and used only when the CPU reports AVX2 and FMA at run time; other machines (an
// ARM laptop, an old x86) run the scalar loop.
#pragma once

#include "kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__)
#define GANLAB_HAVE_AVX2 1
#include <immintrin.h>

namespace ganlab {

#define GANLAB_AVX2 inline __attribute__((target("avx2,fma"), always_inline))

inline bool cpu_has_avx2() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
}

// source_coordinate<padding> (kernels.h) on 8 lanes
template <int padding>
GANLAB_AVX2 __m256 source_coordinate8(__m256 normalized, int size) {
  const __m256 one = _mm256_set1_ps(1.0f), span = _mm256_set1_ps((float)size);
  // x = ((normalized + 1) size - 1) / 2
  __m256 x = _mm256_mul_ps(_mm256_sub_ps(_mm256_mul_ps(_mm256_add_ps(normalized, one), span), one),
                           _mm256_set1_ps(0.5f));
  // into [-1e6, 1e6]; maxps returns its second operand when the first is NaN, as the scalar
  // code sends NaN to -1e6
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-1.0e6f)), _mm256_set1_ps(1.0e6f));
  if (padding == kReflection) {
    // reflect_coordinate: distance d from the low edge -0.5, folded by span = size
    const __m256 low = _mm256_set1_ps(-0.5f);
    const __m256 d = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), _mm256_sub_ps(x, low));  // |x - low|
    __m256 flips = _mm256_floor_ps(_mm256_mul_ps(d, _mm256_set1_ps(1.0f / size)));
    const __m256 below_edge = _mm256_cmp_ps(_mm256_sub_ps(d, _mm256_mul_ps(flips, span)), span, _CMP_GE_OQ);
    flips = _mm256_add_ps(flips, _mm256_and_ps(below_edge, one));
    const __m256 extra = _mm256_sub_ps(d, _mm256_mul_ps(flips, span));  // d mod span
    // an odd number of flips mirrors: its lowest bit, moved to the sign bit, drives blendv
    const __m256 odd = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvttps_epi32(flips), 31));
    x = _mm256_blendv_ps(_mm256_add_ps(extra, low), _mm256_add_ps(_mm256_sub_ps(span, extra), low), odd);
  }
  if (padding != kZeros)  // clamp_coordinate
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_setzero_ps()), _mm256_set1_ps((float)(size - 1)));
  return x;
}

GANLAB_AVX2 void store8(float* out, __m256 values) { _mm256_storeu_ps(out, values); }

template <typename out_t>  // float16, bfloat16: converted one by one, as the scalar loop does
GANLAB_AVX2 void store8(out_t* out, __m256 values) {
  alignas(32) float buffer[8];
  _mm256_store_ps(buffer, values);
  for (int k = 0; k < 8; ++k) out[k] = static_cast<out_t>(buffer[k]);
}

// Output row i of one sample: o points at its first pixel in channel 0, out_plane = h w.
// theta is the sample's 2x3 matrix, v the row's normalized centre (2i + 1) / h - 1.
template <typename out_t, int padding>
__attribute__((target("avx2,fma"))) void warp_row_avx2(const uint8_t* image, int H, int W,
                                                      const float* theta, float v, int w,
                                                      float inverse_w, out_t* o, int64_t out_plane) {
  const int64_t plane = (int64_t)H * W;
  const __m256 one = _mm256_set1_ps(1.0f);
  // gx = theta0 u + (theta1 v + theta2), gy = theta3 u + (theta4 v + theta5): v is fixed on a row
  const __m256 t0 = _mm256_set1_ps(theta[0]), t3 = _mm256_set1_ps(theta[3]);
  const __m256 gx_row = _mm256_set1_ps(theta[1] * v + theta[2]);
  const __m256 gy_row = _mm256_set1_ps(theta[4] * v + theta[5]);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i low_byte = _mm256_set1_epi32(0xFF);
  int j = 0;
  for (; j + 8 <= w; j += 8) {
    // u = (2j + 1) / w - 1 for the pixels j, ..., j + 7
    const __m256i columns = _mm256_add_epi32(_mm256_set1_epi32(j), lane);
    const __m256i odd_columns = _mm256_add_epi32(_mm256_add_epi32(columns, columns), _mm256_set1_epi32(1));
    const __m256 u = _mm256_sub_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(odd_columns), _mm256_set1_ps(inverse_w)), one);
    const __m256 ix = source_coordinate8<padding>(_mm256_fmadd_ps(t0, u, gx_row), W);
    const __m256 iy = source_coordinate8<padding>(_mm256_fmadd_ps(t3, u, gy_row), H);
    const __m256 fx = _mm256_floor_ps(ix), fy = _mm256_floor_ps(iy);
    const __m256i x0 = _mm256_cvttps_epi32(fx), y0 = _mm256_cvttps_epi32(fy);
    // all four taps inside: 0 <= x0 <= W - 2 and 0 <= y0 <= H - 2 in every lane
    const __m256i minus_one = _mm256_set1_epi32(-1);
    const __m256i inside = _mm256_and_si256(
        _mm256_and_si256(_mm256_cmpgt_epi32(x0, minus_one), _mm256_cmpgt_epi32(_mm256_set1_epi32(W - 1), x0)),
        _mm256_and_si256(_mm256_cmpgt_epi32(y0, minus_one), _mm256_cmpgt_epi32(_mm256_set1_epi32(H - 1), y0)));
    if (_mm256_movemask_epi8(inside) != -1) {
      for (int k = j; k < j + 8; ++k) {
        float rgb[3];
        warp_pixel<padding>(image, H, W, theta, (2 * k + 1) * inverse_w - 1.0f, v, rgb);
        for (int c = 0; c < 3; ++c) o[c * out_plane + k] = static_cast<out_t>(rgb[c]);
      }
      continue;
    }
    // weights (1 - dx)(1 - dy), dx(1 - dy), (1 - dx)dy, dx dy
    const __m256 dx = _mm256_sub_ps(ix, fx), dy = _mm256_sub_ps(iy, fy);
    const __m256 ex = _mm256_sub_ps(one, dx), ey = _mm256_sub_ps(one, dy);
    const __m256 w00 = _mm256_mul_ps(ex, ey), w01 = _mm256_mul_ps(dx, ey);
    const __m256 w10 = _mm256_mul_ps(ex, dy), w11 = _mm256_mul_ps(dx, dy);
    const __m256i top_left = _mm256_add_epi32(_mm256_mullo_epi32(y0, _mm256_set1_epi32(W)), x0);
    for (int c = 0; c < 3; ++c) {
      const uint8_t* p = image + c * plane;
      // bytes [a, a + 3] for the top row, [a + W, a + W + 3] for the bottom row
      const __m256i top = _mm256_i32gather_epi32((const int*)p, top_left, 1);
      const __m256i bottom = _mm256_i32gather_epi32((const int*)(p + W), top_left, 1);
      const __m256 p00 = _mm256_cvtepi32_ps(_mm256_and_si256(top, low_byte));
      const __m256 p01 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(top, 8), low_byte));
      const __m256 p10 = _mm256_cvtepi32_ps(_mm256_and_si256(bottom, low_byte));
      const __m256 p11 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(bottom, 8), low_byte));
      const __m256 value = _mm256_fmadd_ps(w11, p11, _mm256_fmadd_ps(w10, p10,
                                                     _mm256_fmadd_ps(w01, p01, _mm256_mul_ps(w00, p00))));
      // pixel p in [0, 255] -> p / 127.5 - 1 in [-1, 1]
      store8(o + c * out_plane + j, _mm256_fmsub_ps(value, _mm256_set1_ps(1.0f / 127.5f), one));
    }
  }
  for (; j < w; ++j) {  // the last w % 8 pixels
    float rgb[3];
    warp_pixel<padding>(image, H, W, theta, (2 * j + 1) * inverse_w - 1.0f, v, rgb);
    for (int c = 0; c < 3; ++c) o[c * out_plane + j] = static_cast<out_t>(rgb[c]);
  }
}

#undef GANLAB_AVX2

}  // namespace ganlab

#endif  // x86-64 with GCC or Clang
