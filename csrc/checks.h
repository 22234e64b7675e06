// Argument checks shared by the CPU (augment.cpp) and CUDA (augment_cuda.cpp) entry points,
// so that both refuse bad input with the same message naming the argument.
#pragma once

#include <ATen/ATen.h>

namespace ganlab {

void check_warp_args(const at::Tensor& bank, const at::Tensor& index, const at::Tensor& theta,
                     int64_t out_height, int64_t out_width, int64_t padding_mode,
                     at::ScalarType dtype);

// brightness is undefined for diffaug_backward, which does not take it
void check_diffaug_args(const char* op, const at::Tensor& x, const at::Tensor& brightness,
                        const at::Tensor& saturation, const at::Tensor& contrast,
                        const at::Tensor& translation, const at::Tensor& cutout);

// the float parameters in the type the kernels accumulate in: double for float64 images,
// float otherwise
at::ScalarType accumulate_type(at::ScalarType image_dtype);

}  // namespace ganlab
