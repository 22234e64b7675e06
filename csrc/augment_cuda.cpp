// CUDA implementations of the ganlab ops: argument checks, then the raw-pointer launchers in
// augment_kernels.cu, on the current stream of the tensors' device.
//
// Only headers that every torch from 2.4 on ships, CPU wheels included, are used here:
// c10::cuda::getCurrentCUDAStream (not c10::Stream::native_handle, which first exists in
// torch 2.11). They need the CUDA runtime's headers, not a GPU or a CUDA build of torch, so CI
// compiles this file on a machine without either, against the headers of torch 2.4 and of
// the installed torch (tests/compile_cuda_headers.py).
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "kernels.h"

namespace ganlab {

static int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kDouble: return 1;
    case at::kHalf: return 2;
    case at::kBFloat16: return 3;
    default: TORCH_CHECK(false, "ganlab: unsupported dtype ", t);
  }
  return -1;
}

// the cudaStream_t that PyTorch is currently using on `device`
static void* current_stream(const at::Device& device) {
  return c10::cuda::getCurrentCUDAStream(device.index()).stream();
}

// error: the launch's cudaError_t, named by the runtime (augment_kernels.cu), e.g.
// "cudaErrorInvalidConfiguration (invalid configuration argument)"
static void check_launch(int error, const char* op) {
  TORCH_CHECK(error == 0, op, ": CUDA kernel launch failed: ", cuda_error_name(error), " (",
              cuda_error_text(error), "); run with CUDA_LAUNCH_BLOCKING=1 for the exact place");
}

static at::Tensor warp_batch_cuda(const at::Tensor& bank, const at::Tensor& index_,
                                  const at::Tensor& theta_, int64_t out_height, int64_t out_width,
                                  int64_t padding_mode, at::ScalarType dtype) {
  check_warp_args(bank, index_, theta_, out_height, out_width, padding_mode, dtype);
  const c10::DeviceGuard guard(bank.device());
  const at::Tensor index = index_.contiguous(), theta = theta_.contiguous();
  // The index values are not checked here: that would cost a host sync per call. The kernel
  // never reads outside the bank (an invalid index gives NaN); augment.warp_batch checks the
  // values first unless told the indices are valid by construction.
  at::Tensor out = at::empty({index.size(0), 3, out_height, out_width}, bank.options().dtype(dtype));
  check_launch(launch_warp_batch(bank.data_ptr<uint8_t>(), bank.size(0), (int)bank.size(2),
                                 (int)bank.size(3), index.data_ptr<int64_t>(),
                                 theta.data_ptr<float>(), index.size(0), (int)out_height,
                                 (int)out_width, (int)padding_mode, out.data_ptr(),
                                 dtype_code(dtype), current_stream(bank.device())),
               "warp_batch");
  return out;
}

static at::Tensor diffaug_cuda(const at::Tensor& x_, const at::Tensor& brightness,
                               const at::Tensor& saturation, const at::Tensor& contrast,
                               const at::Tensor& translation, const at::Tensor& cutout) {
  check_diffaug_args("diffaug", x_, brightness, saturation, contrast, translation, cutout);
  const c10::DeviceGuard guard(x_.device());
  const at::Tensor x = x_.contiguous();
  const auto acc = accumulate_type(x.scalar_type());
  const at::Tensor b = brightness.to(acc).contiguous(), s = saturation.to(acc).contiguous(),
                   k = contrast.to(acc).contiguous(), t = translation.contiguous(),
                   r = cutout.contiguous();
  at::Tensor out = at::empty_like(x);
  check_launch(launch_diffaug(x.data_ptr(), x.size(0), (int)x.size(1), (int)x.size(2),
                              (int)x.size(3), b.data_ptr(), s.data_ptr(), k.data_ptr(),
                              t.data_ptr<int64_t>(), r.data_ptr<int64_t>(), out.data_ptr(),
                              dtype_code(x.scalar_type()), current_stream(x.device())),
               "diffaug");
  return out;
}

static at::Tensor diffaug_backward_cuda(const at::Tensor& grad_, const at::Tensor& saturation,
                                        const at::Tensor& contrast, const at::Tensor& translation,
                                        const at::Tensor& cutout) {
  check_diffaug_args("diffaug_backward", grad_, at::Tensor(), saturation, contrast, translation,
                     cutout);
  const c10::DeviceGuard guard(grad_.device());
  const at::Tensor grad = grad_.contiguous();
  const auto acc = accumulate_type(grad.scalar_type());
  const at::Tensor s = saturation.to(acc).contiguous(), k = contrast.to(acc).contiguous(),
                   t = translation.contiguous(), r = cutout.contiguous();
  at::Tensor grad_x = at::empty_like(grad);
  check_launch(launch_diffaug_backward(grad.data_ptr(), grad.size(0), (int)grad.size(1),
                                       (int)grad.size(2), (int)grad.size(3), s.data_ptr(),
                                       k.data_ptr(), t.data_ptr<int64_t>(), r.data_ptr<int64_t>(),
                                       grad_x.data_ptr(), dtype_code(grad.scalar_type()),
                                       current_stream(grad.device())),
               "diffaug_backward");
  return grad_x;
}

}  // namespace ganlab

TORCH_LIBRARY_IMPL(ganlab, CUDA, m) {
  m.impl("warp_batch", &ganlab::warp_batch_cuda);
  m.impl("diffaug", &ganlab::diffaug_cuda);
  m.impl("diffaug_backward", &ganlab::diffaug_backward_cuda);
}
