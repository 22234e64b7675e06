// The fused augmentation ops: schema, argument checks and CPU kernels.
//
//   ganlab::warp_batch(bank, index, theta, out_height, out_width, padding_mode, dtype)
//       uint8 image bank (N, 3, H, W) -> augmented batch (B, 3, h, w) in [-1, 1]: gather
//       by index, one affine warp per sample with bilinear sampling, normalize; one pass.
//   ganlab::diffaug(x, brightness, saturation, contrast, translation, cutout)
//       DiffAugment on a float batch, differentiable (autograd is registered in augment.py)
//   ganlab::diffaug_backward(grad, saturation, contrast, translation, cutout)
//       the gradient of diffaug with respect to x (diffaug is affine in x, so x is not needed)
//
// The per-pixel maths lives in kernels.h, shared with the CUDA kernels. The CUDA
// implementations are registered by augment_cuda.cpp when the extension is built with CUDA.
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "checks.h"
#include "kernels.h"
#include "warp_avx2.h"

#include <cstdlib>
#include <string>

namespace ganlab {

// ------------------------------------------------------------------------ argument checks

void check_warp_args(const at::Tensor& bank, const at::Tensor& index, const at::Tensor& theta,
                     int64_t out_height, int64_t out_width, int64_t padding_mode,
                     at::ScalarType dtype) {
  TORCH_CHECK(bank.scalar_type() == at::kByte,
              "warp_batch: bank must be uint8 (N, 3, H, W), got dtype ", bank.scalar_type());
  TORCH_CHECK(bank.dim() == 4 && bank.size(1) == 3,
              "warp_batch: bank must have shape (N, 3, H, W), got ", bank.sizes());
  TORCH_CHECK(bank.size(0) > 0 && bank.size(2) > 0 && bank.size(3) > 0,
              "warp_batch: bank is empty, shape ", bank.sizes());
  // refuse rather than copy: a silent .contiguous() of a 1.6 GB bank on every step would
  // be a hidden cost (channels_last banks land here too)
  TORCH_CHECK(bank.is_contiguous(),
              "warp_batch: bank must be contiguous in (N, 3, H, W) layout (not channels_last "
              "or a strided view); call bank.contiguous() once after loading");
  TORCH_CHECK(index.scalar_type() == at::kLong,
              "warp_batch: index must be int64, got dtype ", index.scalar_type());
  TORCH_CHECK(index.dim() == 1, "warp_batch: index must be 1-D (B,), got shape ", index.sizes());
  TORCH_CHECK(index.size(0) > 0, "warp_batch: index is empty (a batch of 0 samples)");
  TORCH_CHECK(theta.scalar_type() == at::kFloat,
              "warp_batch: theta must be float32 (B, 2, 3), got dtype ", theta.scalar_type());
  TORCH_CHECK(theta.dim() == 3 && theta.size(1) == 2 && theta.size(2) == 3,
              "warp_batch: theta must have shape (B, 2, 3), got ", theta.sizes());
  TORCH_CHECK(theta.size(0) == index.size(0), "warp_batch: theta has ", theta.size(0),
              " matrices but index has ", index.size(0), " entries; they must match");
  TORCH_CHECK(index.device() == bank.device() && theta.device() == bank.device(),
              "warp_batch: bank, index and theta must be on one device, got bank on ",
              bank.device(), ", index on ", index.device(), ", theta on ", theta.device());
  TORCH_CHECK(out_height > 0 && out_width > 0, "warp_batch: output size must be positive, got ",
              out_height, "x", out_width);
  TORCH_CHECK(padding_mode == kZeros || padding_mode == kBorder || padding_mode == kReflection,
              "warp_batch: padding_mode must be 0 (zeros), 1 (border) or 2 (reflection), got ",
              padding_mode);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "warp_batch: dtype must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(bank.size(2) * bank.size(3) < (int64_t(1) << 31) &&
                  out_height * out_width < (int64_t(1) << 31),
              "warp_batch: images too large");
}

at::ScalarType accumulate_type(at::ScalarType image_dtype) {
  return image_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

static void check_param(const char* op, const char* name, const at::Tensor& p,
                        const at::Tensor& x, int64_t last_dim, bool integer) {
  const int64_t B = x.size(0);
  if (last_dim == 0) {
    TORCH_CHECK(p.dim() == 1 && p.size(0) == B, op, ": ", name, " must have shape (", B,
                ",) to match x's batch, got ", p.sizes());
  } else {
    TORCH_CHECK(p.dim() == 2 && p.size(0) == B && p.size(1) == last_dim, op, ": ", name,
                " must have shape (", B, ", ", last_dim, ") to match x's batch, got ", p.sizes());
  }
  if (integer) {
    TORCH_CHECK(p.scalar_type() == at::kLong, op, ": ", name, " must be int64, got dtype ",
                p.scalar_type());
  } else {
    TORCH_CHECK(at::isFloatingType(p.scalar_type()), op, ": ", name,
                " must be a floating tensor, got dtype ", p.scalar_type());
  }
  TORCH_CHECK(p.device() == x.device(), op, ": ", name, " is on ", p.device(),
              " but the images are on ", x.device(), "; they must be on one device");
}

void check_diffaug_args(const char* op, const at::Tensor& x, const at::Tensor& brightness,
                        const at::Tensor& saturation, const at::Tensor& contrast,
                        const at::Tensor& translation, const at::Tensor& cutout) {
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, op,
              ": images must be float32, float64, float16 or bfloat16, got dtype ", t);
  TORCH_CHECK(x.dim() == 4, op, ": images must have shape (B, C, H, W), got ", x.sizes());
  TORCH_CHECK(x.size(0) > 0 && x.size(1) > 0 && x.size(2) > 0 && x.size(3) > 0, op,
              ": images are empty, shape ", x.sizes());
  TORCH_CHECK(x.size(1) * x.size(2) * x.size(3) < (int64_t(1) << 31), op, ": images too large");
  if (brightness.defined()) check_param(op, "brightness", brightness, x, 0, false);
  check_param(op, "saturation", saturation, x, 0, false);
  check_param(op, "contrast", contrast, x, 0, false);
  check_param(op, "translation", translation, x, 2, true);
  check_param(op, "cutout", cutout, x, 4, true);
}

// ------------------------------------------------------------------------ warp_batch, CPU

// use_avx2: take warp_row_avx2 (warp_avx2.h) where the CPU has it; false runs the plain loop
// (GANLAB_CPU_SIMD=0 asks for that, so that the tests can check both paths on one machine).
template <typename out_t, int padding>
static void warp_batch_cpu_kernel(const uint8_t* bank, int64_t N, int64_t H, int64_t W,
                                  const int64_t* index, const float* theta, int64_t B,
                                  int64_t h, int64_t w, out_t* out, bool use_avx2) {
  const int64_t image_size = 3 * H * W, plane = h * w;
  const float inverse_w = 1.0f / w, inverse_h = 1.0f / h;
  // one task per output row: B * h rows, enough to keep every core busy even for B = 1
  at::parallel_for(0, B * h, 8, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / h;
      const int i = (int)(row % h);
      const uint8_t* image = bank + index[b] * image_size;
      out_t* o = out + b * 3 * plane + i * w;
      const float v = (2 * i + 1) * inverse_h - 1.0f;
#ifdef GANLAB_HAVE_AVX2
      // its gathers read 2 bytes past a tap: not allowed past the end of the bank
      if (use_avx2 && index[b] != N - 1) {
        warp_row_avx2<out_t, padding>(image, (int)H, (int)W, theta + 6 * b, v, (int)w, inverse_w, o, plane);
        continue;
      }
#endif
      for (int j = 0; j < (int)w; ++j) {
        float rgb[3];
        warp_pixel<padding>(image, (int)H, (int)W, theta + 6 * b, (2 * j + 1) * inverse_w - 1.0f, v, rgb);
        o[j] = static_cast<out_t>(rgb[0]);
        o[plane + j] = static_cast<out_t>(rgb[1]);
        o[2 * plane + j] = static_cast<out_t>(rgb[2]);
      }
    }
  });
}

static bool cpu_simd_wanted() {
#ifdef GANLAB_HAVE_AVX2
  const char* setting = std::getenv("GANLAB_CPU_SIMD");
  return cpu_has_avx2() && !(setting != nullptr && std::string(setting) == "0");
#else
  return false;
#endif
}

static at::Tensor warp_batch_cpu(const at::Tensor& bank, const at::Tensor& index_,
                                 const at::Tensor& theta_, int64_t out_height, int64_t out_width,
                                 int64_t padding_mode, at::ScalarType dtype) {
  check_warp_args(bank, index_, theta_, out_height, out_width, padding_mode, dtype);
  const at::Tensor index = index_.contiguous(), theta = theta_.contiguous();  // small
  const int64_t N = bank.size(0), B = index.size(0);
  const int64_t* idx = index.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(idx[b] >= 0 && idx[b] < N, "warp_batch: index[", b, "] = ", idx[b],
                " is out of range for a bank of ", N, " images (valid: 0 to ", N - 1, ")");
  }
  at::Tensor out = at::empty({B, 3, out_height, out_width}, bank.options().dtype(dtype));
  const bool use_avx2 = cpu_simd_wanted();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "warp_batch_cpu", [&] {
    const auto run = [&](auto kernel) {
      kernel(bank.data_ptr<uint8_t>(), N, bank.size(2), bank.size(3), idx, theta.data_ptr<float>(), B,
             out_height, out_width, out.data_ptr<scalar_t>(), use_avx2);
    };
    if (padding_mode == kZeros) run(warp_batch_cpu_kernel<scalar_t, kZeros>);
    else if (padding_mode == kBorder) run(warp_batch_cpu_kernel<scalar_t, kBorder>);
    else run(warp_batch_cpu_kernel<scalar_t, kReflection>);
  });
  return out;
}

// ------------------------------------------------------------------------ diffaug, CPU

template <typename scalar_t, typename acc_t>
static void diffaug_cpu_kernel(const scalar_t* x, int64_t B, int64_t C, int64_t H, int64_t W,
                               const acc_t* brightness, const acc_t* saturation,
                               const acc_t* contrast, const int64_t* translation,
                               const int64_t* cutout, scalar_t* out) {
  const int64_t plane = H * W, image_size = C * plane;
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* xn = x + n * image_size;
      scalar_t* on = out + n * image_size;
      // M: the image's mean over C, H, W (summed in double: up to ~10^5 terms)
      double sum = 0.0;
      for (int64_t e = 0; e < image_size; ++e) sum += static_cast<double>(xn[e]);
      const acc_t M = static_cast<acc_t>(sum / image_size);
      const acc_t b = brightness[n], s = saturation[n], k = contrast[n];
      const int64_t ty = translation[2 * n], tx = translation[2 * n + 1];
      const int64_t* rect = cutout + 4 * n;
      for (int64_t y = 0; y < H; ++y) {
        for (int64_t xx = 0; xx < W; ++xx) {
          const int64_t sy = y + ty, sx = xx + tx;
          const bool kept = outside_cutout(y, xx, rect) && sy >= 0 && sy < H && sx >= 0 && sx < W;
          if (!kept) {
            for (int64_t c = 0; c < C; ++c) on[c * plane + y * W + xx] = scalar_t(0);
            continue;
          }
          const int64_t source = sy * W + sx;
          acc_t mc = 0;  // the source pixel's mean over channels
          for (int64_t c = 0; c < C; ++c) mc += static_cast<acc_t>(xn[c * plane + source]);
          mc /= C;
          for (int64_t c = 0; c < C; ++c) {
            const acc_t v = static_cast<acc_t>(xn[c * plane + source]);
            // x3 = ((x - mc) s + mc - M) k + M + b
            on[c * plane + y * W + xx] = static_cast<scalar_t>(((v - mc) * s + mc - M) * k + M + b);
          }
        }
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
static void diffaug_backward_cpu_kernel(const scalar_t* grad, int64_t B, int64_t C, int64_t H,
                                        int64_t W, const acc_t* saturation, const acc_t* contrast,
                                        const int64_t* translation, const int64_t* cutout,
                                        scalar_t* grad_x) {
  const int64_t plane = H * W, image_size = C * plane;
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* g = grad + n * image_size;
      scalar_t* gx = grad_x + n * image_size;
      const acc_t s = saturation[n], k = contrast[n];
      const int64_t ty = translation[2 * n], tx = translation[2 * n + 1];
      const int64_t* rect = cutout + 4 * n;
      // G3(c, q): the gradient reaching colour-augmented pixel q = (qy, qx), i.e. the output
      // gradient at the pixel that read q, (qy - ty, qx - tx), unless that pixel lies outside
      // the image or inside the cutout. S = the sum of G3 over the whole image.
      double S = 0.0;
      for (int64_t y = 0; y < H; ++y)
        for (int64_t xx = 0; xx < W; ++xx) {
          const int64_t sy = y + ty, sx = xx + tx;
          if (outside_cutout(y, xx, rect) && sy >= 0 && sy < H && sx >= 0 && sx < W)
            for (int64_t c = 0; c < C; ++c) S += static_cast<double>(g[c * plane + y * W + xx]);
        }
      // d/dx of x3 = ((x - mc) s + mc - M) k + M + b, through mc (per pixel) and M (per image):
      //   grad_x(c, q) = s k G3(c, q) + k (1 - s) / C * sum_c' G3(c', q) + (1 - k) S / (C H W)
      const acc_t shared = static_cast<acc_t>((1.0 - static_cast<double>(k)) * S / image_size);
      for (int64_t qy = 0; qy < H; ++qy) {
        for (int64_t qx = 0; qx < W; ++qx) {
          const int64_t y = qy - ty, xx = qx - tx;
          const bool read = y >= 0 && y < H && xx >= 0 && xx < W && outside_cutout(y, xx, rect);
          acc_t channel_sum = 0;
          if (read)
            for (int64_t c = 0; c < C; ++c) channel_sum += static_cast<acc_t>(g[c * plane + y * W + xx]);
          for (int64_t c = 0; c < C; ++c) {
            const acc_t g3 = read ? static_cast<acc_t>(g[c * plane + y * W + xx]) : acc_t(0);
            gx[c * plane + qy * W + qx] =
                static_cast<scalar_t>(s * k * g3 + k * (1 - s) / C * channel_sum + shared);
          }
        }
      }
    }
  });
}

static at::Tensor diffaug_cpu(const at::Tensor& x_, const at::Tensor& brightness,
                              const at::Tensor& saturation, const at::Tensor& contrast,
                              const at::Tensor& translation, const at::Tensor& cutout) {
  check_diffaug_args("diffaug", x_, brightness, saturation, contrast, translation, cutout);
  const at::Tensor x = x_.contiguous();
  const auto acc = accumulate_type(x.scalar_type());
  const at::Tensor b = brightness.to(acc).contiguous(), s = saturation.to(acc).contiguous(),
                   k = contrast.to(acc).contiguous(), t = translation.contiguous(),
                   r = cutout.contiguous();
  at::Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "diffaug_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    diffaug_cpu_kernel<scalar_t, acc_t>(x.data_ptr<scalar_t>(), x.size(0), x.size(1), x.size(2),
                                        x.size(3), b.data_ptr<acc_t>(), s.data_ptr<acc_t>(),
                                        k.data_ptr<acc_t>(), t.data_ptr<int64_t>(),
                                        r.data_ptr<int64_t>(), out.data_ptr<scalar_t>());
  });
  return out;
}

static at::Tensor diffaug_backward_cpu(const at::Tensor& grad_, const at::Tensor& saturation,
                                       const at::Tensor& contrast, const at::Tensor& translation,
                                       const at::Tensor& cutout) {
  check_diffaug_args("diffaug_backward", grad_, at::Tensor(), saturation, contrast, translation,
                     cutout);
  const at::Tensor grad = grad_.contiguous();  // autograd often hands in expanded gradients
  const auto acc = accumulate_type(grad.scalar_type());
  const at::Tensor s = saturation.to(acc).contiguous(), k = contrast.to(acc).contiguous(),
                   t = translation.contiguous(), r = cutout.contiguous();
  at::Tensor grad_x = at::empty_like(grad);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "diffaug_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    diffaug_backward_cpu_kernel<scalar_t, acc_t>(
        grad.data_ptr<scalar_t>(), grad.size(0), grad.size(1), grad.size(2), grad.size(3),
        s.data_ptr<acc_t>(), k.data_ptr<acc_t>(), t.data_ptr<int64_t>(), r.data_ptr<int64_t>(),
        grad_x.data_ptr<scalar_t>());
  });
  return grad_x;
}

}  // namespace ganlab

// ------------------------------------------------------------------------ registration

TORCH_LIBRARY(ganlab, m) {
  m.def("warp_batch(Tensor bank, Tensor index, Tensor theta, int out_height, int out_width, "
        "int padding_mode, ScalarType dtype) -> Tensor");
  m.def("diffaug(Tensor x, Tensor brightness, Tensor saturation, Tensor contrast, "
        "Tensor translation, Tensor cutout) -> Tensor");
  m.def("diffaug_backward(Tensor grad, Tensor saturation, Tensor contrast, Tensor translation, "
        "Tensor cutout) -> Tensor");
}

TORCH_LIBRARY_IMPL(ganlab, CPU, m) {
  m.impl("warp_batch", &ganlab::warp_batch_cpu);
  m.impl("diffaug", &ganlab::diffaug_cpu);
  m.impl("diffaug_backward", &ganlab::diffaug_backward_cpu);
}
