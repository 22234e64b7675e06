// CUDA kernels of the fused augmentation ops, and their raw-pointer launchers.
//
// Needs only the CUDA runtime headers (no PyTorch), so CI compiles it with nvcc on a machine
// without a GPU or a CUDA build of torch. The per-pixel maths is kernels.h, shared with the
// CPU path; augment_cuda.cpp turns tensors into the pointers these launchers take.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include "kernels.h"

namespace ganlab {
namespace {

// dtype codes (kernels.h): 0 float32, 1 float64, 2 float16, 3 bfloat16
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ double to_float(double v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Store a value computed in the accumulation type, rounding to nearest as PyTorch does.
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

constexpr int kThreads = 256;  // a multiple of the warp size: block_sum relies on it

int blocks_for(int64_t work) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return (int)(blocks < (1 << 30) ? blocks : (1 << 30));  // the loops below are grid-stride
}

// ------------------------------------------------------------------------ warp_batch

// One thread per output pixel (b, i, j), writing all three channels.
template <typename out_t, int padding>
__global__ void warp_batch_kernel(const uint8_t* __restrict__ bank, int64_t N, int H, int W,
                                  const int64_t* __restrict__ index,
                                  const float* __restrict__ theta, int64_t B, int h, int w,
                                  out_t* __restrict__ out) {
  const int64_t plane = (int64_t)h * w, total = B * plane;
  for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < total;
       t += (int64_t)gridDim.x * blockDim.x) {
    const int64_t b = t / plane, p = t - b * plane;
    const int i = (int)(p / w), j = (int)(p - (int64_t)i * w);
    out_t* o = out + b * 3 * plane + p;
    const int64_t row = index[b];
    if (row < 0 || row >= N) {  // never read outside the bank: an invalid index gives NaN
      const float nan = __int_as_float(0x7fc00000);
      store(o, nan), store(o + plane, nan), store(o + 2 * plane, nan);
      continue;
    }
    float m[6];
    for (int e = 0; e < 6; ++e) m[e] = __ldg(theta + 6 * b + e);
    float rgb[3];
    const float u = (2 * j + 1) * (1.0f / w) - 1.0f, v = (2 * i + 1) * (1.0f / h) - 1.0f;
    warp_pixel<padding>(bank + row * 3 * (int64_t)H * W, H, W, m, u, v, rgb);
    store(o, rgb[0]), store(o + plane, rgb[1]), store(o + 2 * plane, rgb[2]);
  }
}

// ------------------------------------------------------------------------ diffaug

// Sum of v over the block, returned to every thread.
template <typename acc_t>
__device__ acc_t block_sum(acc_t v) {
  __shared__ acc_t warp_sums[kThreads / 32];
  __shared__ acc_t total;
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / 32 ? warp_sums[lane] : acc_t(0);
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
    if (lane == 0) total = v;
  }
  __syncthreads();
  return total;
}

// One block per image: first the image mean M (a block reduction), then every output pixel.
// Formulas in kernels.h: out = ((x - mc) s + mc - M) k + M + b, translated, cut out.
template <typename scalar_t, typename acc_t>
__global__ void diffaug_kernel(const scalar_t* __restrict__ x, int C, int H, int W,
                               const acc_t* __restrict__ brightness,
                               const acc_t* __restrict__ saturation,
                               const acc_t* __restrict__ contrast,
                               const int64_t* __restrict__ translation,
                               const int64_t* __restrict__ cutout, scalar_t* __restrict__ out) {
  const int64_t n = blockIdx.x;
  const int plane = H * W, image_size = C * plane;
  const scalar_t* xn = x + n * image_size;
  scalar_t* on = out + n * image_size;

  acc_t partial = 0;
  for (int e = threadIdx.x; e < image_size; e += blockDim.x) partial += to_float(xn[e]);
  const acc_t M = block_sum(partial) / image_size;

  const acc_t b = brightness[n], s = saturation[n], k = contrast[n];
  const int64_t ty = translation[2 * n], tx = translation[2 * n + 1];
  const int64_t* rect = cutout + 4 * n;
  for (int p = threadIdx.x; p < plane; p += blockDim.x) {
    const int y = p / W, xx = p - y * W;
    const int64_t sy = y + ty, sx = xx + tx;
    if (!(outside_cutout(y, xx, rect) && sy >= 0 && sy < H && sx >= 0 && sx < W)) {
      for (int c = 0; c < C; ++c) store(on + c * plane + p, acc_t(0));
      continue;
    }
    const int source = (int)(sy * W + sx);
    acc_t mc = 0;
    for (int c = 0; c < C; ++c) mc += to_float(xn[c * plane + source]);
    mc /= C;
    for (int c = 0; c < C; ++c) {
      const acc_t v = to_float(xn[c * plane + source]);
      store(on + c * plane + p, ((v - mc) * s + mc - M) * k + M + b);
    }
  }
}

// One block per image: first S, the sum of the gradient that reaches the colour-augmented
// image, then grad_x(c, q) = s k G3(c, q) + k (1 - s) / C sum_c' G3(c', q) + (1 - k) S / (C H W).
template <typename scalar_t, typename acc_t>
__global__ void diffaug_backward_kernel(const scalar_t* __restrict__ grad, int C, int H, int W,
                                        const acc_t* __restrict__ saturation,
                                        const acc_t* __restrict__ contrast,
                                        const int64_t* __restrict__ translation,
                                        const int64_t* __restrict__ cutout,
                                        scalar_t* __restrict__ grad_x) {
  const int64_t n = blockIdx.x;
  const int plane = H * W, image_size = C * plane;
  const scalar_t* g = grad + n * image_size;
  scalar_t* gx = grad_x + n * image_size;
  const acc_t s = saturation[n], k = contrast[n];
  const int64_t ty = translation[2 * n], tx = translation[2 * n + 1];
  const int64_t* rect = cutout + 4 * n;

  acc_t partial = 0;
  for (int p = threadIdx.x; p < plane; p += blockDim.x) {
    const int y = p / W, xx = p - y * W;
    const int64_t sy = y + ty, sx = xx + tx;
    if (outside_cutout(y, xx, rect) && sy >= 0 && sy < H && sx >= 0 && sx < W)
      for (int c = 0; c < C; ++c) partial += to_float(g[c * plane + p]);
  }
  const acc_t shared = (1 - k) * block_sum(partial) / image_size;

  for (int q = threadIdx.x; q < plane; q += blockDim.x) {
    const int qy = q / W, qx = q - qy * W;
    const int64_t y = qy - ty, xx = qx - tx;  // the output pixel that read q
    const bool read = y >= 0 && y < H && xx >= 0 && xx < W && outside_cutout(y, xx, rect);
    const int source = read ? (int)(y * W + xx) : 0;
    acc_t channel_sum = 0;
    if (read)
      for (int c = 0; c < C; ++c) channel_sum += to_float(g[c * plane + source]);
    for (int c = 0; c < C; ++c) {
      const acc_t g3 = read ? (acc_t)to_float(g[c * plane + source]) : acc_t(0);
      store(gx + c * plane + q, s * k * g3 + k * (1 - s) / C * channel_sum + shared);
    }
  }
}

}  // namespace

// ------------------------------------------------------------------------ launchers

int launch_warp_batch(const uint8_t* bank, int64_t N, int H, int W, const int64_t* index,
                      const float* theta, int64_t B, int h, int w, int padding, void* out,
                      int out_dtype, void* stream_) {
  cudaStream_t stream = (cudaStream_t)stream_;
  const int blocks = blocks_for(B * (int64_t)h * w);
#define GANLAB_WARP(T, P) \
  warp_batch_kernel<T, P><<<blocks, kThreads, 0, stream>>>(bank, N, H, W, index, theta, B, h, w, (T*)out)
#define GANLAB_WARP_PADDINGS(T)                        \
  if (padding == kZeros) GANLAB_WARP(T, kZeros);       \
  else if (padding == kBorder) GANLAB_WARP(T, kBorder); \
  else GANLAB_WARP(T, kReflection)
  switch (out_dtype) {
    case 0: GANLAB_WARP_PADDINGS(float); break;
    case 2: GANLAB_WARP_PADDINGS(__half); break;
    case 3: GANLAB_WARP_PADDINGS(__nv_bfloat16); break;
    default: return (int)cudaErrorInvalidValue;
  }
#undef GANLAB_WARP_PADDINGS
#undef GANLAB_WARP
  return (int)cudaGetLastError();
}

int launch_diffaug(const void* x, int64_t B, int C, int H, int W, const void* brightness,
                   const void* saturation, const void* contrast, const int64_t* translation,
                   const int64_t* cutout, void* out, int dtype, void* stream_) {
  cudaStream_t stream = (cudaStream_t)stream_;
  const dim3 grid((unsigned)B);
#define GANLAB_DIFFAUG(T, A)                                                              \
  diffaug_kernel<T, A><<<grid, kThreads, 0, stream>>>((const T*)x, C, H, W, (const A*)brightness, \
      (const A*)saturation, (const A*)contrast, translation, cutout, (T*)out)
  switch (dtype) {
    case 0: GANLAB_DIFFAUG(float, float); break;
    case 1: GANLAB_DIFFAUG(double, double); break;
    case 2: GANLAB_DIFFAUG(__half, float); break;
    case 3: GANLAB_DIFFAUG(__nv_bfloat16, float); break;
    default: return (int)cudaErrorInvalidValue;
  }
#undef GANLAB_DIFFAUG
  return (int)cudaGetLastError();
}

int launch_diffaug_backward(const void* grad, int64_t B, int C, int H, int W,
                            const void* saturation, const void* contrast,
                            const int64_t* translation, const int64_t* cutout, void* grad_x,
                            int dtype, void* stream_) {
  cudaStream_t stream = (cudaStream_t)stream_;
  const dim3 grid((unsigned)B);
#define GANLAB_DIFFAUG_BACKWARD(T, A)                                                      \
  diffaug_backward_kernel<T, A><<<grid, kThreads, 0, stream>>>((const T*)grad, C, H, W,     \
      (const A*)saturation, (const A*)contrast, translation, cutout, (T*)grad_x)
  switch (dtype) {
    case 0: GANLAB_DIFFAUG_BACKWARD(float, float); break;
    case 1: GANLAB_DIFFAUG_BACKWARD(double, double); break;
    case 2: GANLAB_DIFFAUG_BACKWARD(__half, float); break;
    case 3: GANLAB_DIFFAUG_BACKWARD(__nv_bfloat16, float); break;
    default: return (int)cudaErrorInvalidValue;
  }
#undef GANLAB_DIFFAUG_BACKWARD
  return (int)cudaGetLastError();
}

const char* cuda_error_name(int error) { return cudaGetErrorName((cudaError_t)error); }
const char* cuda_error_text(int error) { return cudaGetErrorString((cudaError_t)error); }

}  // namespace ganlab
