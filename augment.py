"""The fused augmentation op (csrc/) and its pure-PyTorch reference.

Two operations, each a C++ kernel for the CPU and a CUDA kernel for the GPU, registered as
`torch.ops.ganlab.*` and built on first use by torch.utils.cpp_extension (cached after):

    warp_batch(bank, index, theta, size)   the data path: uint8 bank (N, 3, H, W) ->
                                           gather rows `index`, warp each by its 2x3 affine
                                           matrix (bilinear), normalize to [-1, 1]; one pass
    diff_augment(x, params)                DiffAugment (colour, translation, cutout) on a
                                           float batch; differentiable, so G learns through it

and two samplers that draw their per-sample parameters from a torch.Generator, so the op
itself stays deterministic and testable:

    random_affine(batch, ...)  -> theta (B, 2, 3)      flip, translate, scale, rotate
    random_diffaug(batch, ...) -> DiffAugParams        DiffAugment's published distributions

Typical use in a training loop (everything stays on the device):

    bank = data.load_images("anime", size=64).to(device)            # uint8, resident
    index = torch.randint(len(bank), (256,), device=device)
    theta = random_affine(256, flip=0.5, translate=0.05, device=device)
    real = warp_batch(bank, index, theta, 64)                        # float32 in [-1, 1]
    real = diff_augment(real, random_diffaug(256, 64, 64, device=device))

Each op has a `*_reference` twin written with plain PyTorch ops: the readable definition,
the fallback where the extension cannot be built (one warning says so), and the test
oracle. GANLAB_REFERENCE=1 forces the reference.
"""

import glob
import math
import os
import sys
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
PADDING_MODES = {"zeros": 0, "border": 1, "reflection": 2}

# -----------------------------------------------------------------------------
# building and loading the extension


def _build_and_load():
    """Load the ahead-of-time build from setup.py if there is one, else JIT-build csrc/."""
    prebuilt = glob.glob(os.path.join(HERE, "_ganlab_C*.so")) + glob.glob(os.path.join(HERE, "_ganlab_C*.pyd"))
    if prebuilt:
        torch.ops.load_library(prebuilt[0])
        return
    from torch.utils import cpp_extension

    csrc = os.path.join(HERE, "csrc")
    # at::parallel_for is an OpenMP pragma in torch's headers when torch uses OpenMP: without
    # -fopenmp it silently runs on one thread. (Linking libgomp.so.1 adds no second runtime:
    # the loader reuses the one torch has loaded under that name.)
    openmp = ["-fopenmp"] if torch.backends.openmp.is_available() and sys.platform.startswith("linux") else []

    def build(with_cuda):
        sources = [os.path.join(csrc, "augment.cpp")]
        if with_cuda:
            sources += [os.path.join(csrc, "augment_cuda.cpp"), os.path.join(csrc, "augment_kernels.cu")]
        cpp_extension.load(
            name="ganlab_ops_cuda" if with_cuda else "ganlab_ops",
            sources=sources,
            extra_cflags=["-O3"] + openmp,
            extra_ldflags=openmp,
            extra_cuda_cflags=["-O3"],
            with_cuda=with_cuda,
            is_python_module=False,  # the ops register themselves under torch.ops.ganlab
            verbose=os.environ.get("GANLAB_VERBOSE_BUILD") == "1",
        )

    # CUDA kernels only where this torch was built with CUDA and nvcc can be found; if their
    # build fails, the CPU kernels still serve CPU tensors (CUDA ones then take the reference)
    if torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None:
        try:
            return build(with_cuda=True)
        except Exception as error:
            warnings.warn(f"augment: building the CUDA kernels failed ({type(error).__name__}); "
                          "building the CPU kernels only. Set GANLAB_VERBOSE_BUILD=1 for the log.", stacklevel=4)
    build(with_cuda=False)


_state = {"loaded": None, "warned_cuda": False}  # loaded: None not tried yet, True ops available, False reference only


def _use_ops(tensor):
    """Whether the compiled op has a kernel for `tensor`'s device. A CUDA build of torch
    without nvcc (the pip wheels ship none) builds the CPU kernels only: CUDA tensors then
    take the reference, with one warning, instead of failing."""
    if not load_extension():
        return False
    if tensor.device.type != "cuda":
        return True
    if torch._C._dispatch_has_kernel_for_dispatch_key("ganlab::warp_batch", "CUDA"):
        return True
    if not _state["warned_cuda"]:
        _state["warned_cuda"] = True
        warnings.warn("augment: the extension was built without its CUDA kernels (no nvcc found: set "
                      "CUDA_HOME to a CUDA toolkit and clear ~/.cache/torch_extensions); CUDA tensors use "
                      "the pure-PyTorch reference", stacklevel=3)
    return False


def load_extension():
    """Build/load the C++/CUDA ops once; return True if they are available."""
    if _state["loaded"] is None:
        if os.environ.get("GANLAB_REFERENCE") == "1":
            _state["loaded"] = False
        else:
            try:
                if not hasattr(torch.ops.ganlab, "warp_batch"):
                    _build_and_load()
                _register_python_side()
                _state["loaded"] = True
            except Exception as error:  # no compiler, failed build, ...: still usable
                warnings.warn(
                    f"augment: could not build the C++/CUDA extension ({type(error).__name__}: "
                    f"{str(error).strip().splitlines()[-1] if str(error).strip() else ''}); using the "
                    "pure-PyTorch reference instead (correct, slower). Set GANLAB_VERBOSE_BUILD=1 "
                    "to see the build log.",
                    stacklevel=3,
                )
                _state["loaded"] = False
    return _state["loaded"]


def _register_python_side():
    """Shapes for torch.compile (register_fake) and the backward (register_autograd)."""
    if getattr(_register_python_side, "done", False):
        return
    _register_python_side.done = True

    def same_device(op, named):
        devices = {name: t.device for name, t in named.items()}
        if len(set(devices.values())) > 1:
            listed = ", ".join(f"{name} on {device}" for name, device in devices.items())
            raise RuntimeError(f"{op}: {', '.join(devices)} must be on one device, got {listed}")

    @torch.library.register_fake("ganlab::warp_batch")
    def _(bank, index, theta, out_height, out_width, padding_mode, dtype):
        torch._check(bank.dim() == 4 and index.dim() == 1 and theta.dim() == 3)
        same_device("warp_batch", dict(bank=bank, index=index, theta=theta))
        return bank.new_empty((index.shape[0], bank.shape[1], out_height, out_width), dtype=dtype)

    @torch.library.register_fake("ganlab::diffaug")
    def _(x, brightness, saturation, contrast, translation, cutout):
        same_device("diffaug", dict(x=x, brightness=brightness, saturation=saturation, contrast=contrast,
                                    translation=translation, cutout=cutout))
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("ganlab::diffaug_backward")
    def _(grad, saturation, contrast, translation, cutout):
        same_device("diffaug_backward", dict(grad=grad, saturation=saturation, contrast=contrast,
                                             translation=translation, cutout=cutout))
        return torch.empty_like(grad, memory_format=torch.contiguous_format)

    # diffaug is affine in x: y = T x + (brightness term). Its gradient is T^T g, computed by
    # diffaug_backward; the gradient of that (needed for double backward, e.g. a gradient
    # penalty through the augmentation) is T h, i.e. diffaug with the brightness set to zero.
    def setup_context(ctx, inputs, output):
        ctx.params = inputs[-4:]  # saturation, contrast, translation, cutout

    def diffaug_grad(ctx, grad):
        return torch.ops.ganlab.diffaug_backward(grad, *ctx.params), None, None, None, None, None

    def diffaug_backward_grad(ctx, grad):
        saturation = ctx.params[0]
        zero_brightness = torch.zeros_like(saturation)
        return torch.ops.ganlab.diffaug(grad, zero_brightness, *ctx.params), None, None, None, None

    torch.library.register_autograd("ganlab::diffaug", diffaug_grad, setup_context=setup_context)
    torch.library.register_autograd(
        "ganlab::diffaug_backward", diffaug_backward_grad, setup_context=setup_context
    )


# -----------------------------------------------------------------------------
# the data path: uint8 bank -> augmented float batch


def warp_batch(bank, index, theta, size, padding="zeros", dtype=torch.float32, check_index=True):
    """Gather bank[index], warp each image by theta with bilinear sampling, map to [-1, 1].

    bank: uint8 (N, 3, H, W), contiguous, on the device the batch is wanted on.
    index: int64 (B,) rows of the bank. theta: float32 (B, 2, 3) in the convention of
    F.affine_grid(align_corners=False): output pixel centre (u, v) in [-1, 1] reads the
    source at theta @ [u, v, 1]. size: int or (h, w) of the output. padding: "zeros"
    (outside reads pixel 0, i.e. -1), "border" or "reflection". dtype: float32, bfloat16
    or float16. Returns (B, 3, h, w).

    On CUDA, checking that every index is in range costs a host sync; pass
    check_index=False on the hot path when the indices are valid by construction (the
    kernel never reads outside the bank either way: an invalid index gives NaN).
    """
    h, w = (size, size) if isinstance(size, int) else size
    if padding not in PADDING_MODES:
        raise ValueError(f"warp_batch: padding must be one of {list(PADDING_MODES)}, got {padding!r}")
    if check_index and isinstance(index, torch.Tensor) and index.is_cuda and index.numel() > 0:
        low, high = torch.stack(torch.aminmax(index)).tolist()  # one transfer, one sync
        if low < 0 or high >= bank.shape[0]:
            raise IndexError(
                f"warp_batch: index values must be in [0, {bank.shape[0] - 1}] for a bank of "
                f"{bank.shape[0]} images, got min {low} and max {high}"
            )
    if _use_ops(bank):
        return torch.ops.ganlab.warp_batch(bank, index, theta, h, w, PADDING_MODES[padding], dtype)
    return warp_batch_reference(bank, index, theta, (h, w), padding, dtype)


def warp_batch_reference(bank, index, theta, size, padding="zeros", dtype=torch.float32):
    """The chain of PyTorch ops warp_batch fuses: index, float, affine_grid, grid_sample, normalize."""
    h, w = (size, size) if isinstance(size, int) else size
    images = bank[index].float()  # (B, 3, H, W) in [0, 255]
    grid = F.affine_grid(theta, [len(index), 3, h, w], align_corners=False)  # (B, h, w, 2)
    warped = F.grid_sample(images, grid, mode="bilinear", padding_mode=padding, align_corners=False)
    return (warped / 127.5 - 1).to(dtype)  # pixel p -> p / 127.5 - 1


def to_device(tensor, device):
    """Copy a small CPU tensor to `device` without making the host wait for the GPU: a
    plain .to("cuda") from pageable memory waits for all queued work first (a host sync per
    step); from pinned memory with non_blocking=True it is queued like a kernel."""
    device = torch.device(device) if device is not None else tensor.device
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def random_affine(batch, flip=0.5, translate=0.0, scale=(1.0, 1.0), rotate=0.0,
                  generator=None, device=None):
    """Draw one 2x3 affine matrix per sample for warp_batch (square images).

    flip: probability of a horizontal flip. translate: largest shift as a fraction of the
    image size, uniform in [-translate, translate] per axis. scale: (low, high) zoom
    factor, uniform; > 1 zooms in (a random crop, with translate), < 1 zooms out. rotate:
    largest rotation in degrees, uniform in [-rotate, rotate]. The parameters are drawn on
    the CPU from `generator` (so runs are reproducible whatever the device) and moved to
    `device` in one small asynchronous copy.
    """
    u = torch.rand(batch, 5, generator=generator)
    sign = torch.where(u[:, 0] < flip, -1.0, 1.0)  # -1 mirrors left-right
    zoom = scale[0] + (scale[1] - scale[0]) * u[:, 1]
    angle = math.radians(rotate) * (2 * u[:, 2] - 1)
    shift = translate * (2 * u[:, 3:5] - 1) * 2  # a fraction f of the size is 2f in [-1, 1] units
    # output point p reads the source at  R(angle) @ diag(sign, 1) @ p / zoom + shift
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([
        torch.stack([cos * sign, -sin, shift[:, 0]], dim=1),
        torch.stack([sin * sign, cos, shift[:, 1]], dim=1),
    ], dim=1)  # (B, 2, 3)
    return to_device(theta.float(), device)


# -----------------------------------------------------------------------------
# the differentiable path: DiffAugment


class DiffAugParams(NamedTuple):
    """Per-sample DiffAugment parameters; the identity is (0, 1, 1, (0, 0), empty rectangle)."""

    brightness: torch.Tensor   # (B,) float, added: x + b, b = u - 0.5
    saturation: torch.Tensor   # (B,) float, factor on the deviation from the channel mean, 2u
    contrast: torch.Tensor     # (B,) float, factor on the deviation from the image mean, u + 0.5
    translation: torch.Tensor  # (B, 2) int64 (ty, tx): out[y, x] = in[y + ty, x + tx], 0 outside
    cutout: torch.Tensor       # (B, 4) int64 (top, left, bottom, right): zeroed, may overhang


def random_diffaug(batch, height, width, policy="color,translation,cutout", generator=None,
                   device=None):
    """Draw DiffAugment parameters with the published distributions (Zhao et al. 2020).

    policy: comma-separated subset of color, translation, cutout; what is left out gets the
    identity. Drawn on the CPU from `generator`, moved to `device` asynchronously.
    """
    chosen = {p.strip() for p in policy.split(",") if p.strip()}
    unknown = chosen - {"color", "translation", "cutout"}
    if unknown:
        raise ValueError(f"diffaug policy: unknown {sorted(unknown)}; use color,translation,cutout")
    u = torch.rand(batch, 3, generator=generator)
    if "color" in chosen:
        brightness, saturation, contrast = u[:, 0] - 0.5, 2 * u[:, 1], u[:, 2] + 0.5
    else:
        brightness, saturation, contrast = torch.zeros(batch), torch.ones(batch), torch.ones(batch)
    translation = torch.zeros(batch, 2, dtype=torch.long)
    if "translation" in chosen:
        # integer shift of up to round(0.125 * size) pixels per axis
        max_y, max_x = int(height * 0.125 + 0.5), int(width * 0.125 + 0.5)
        translation[:, 0] = torch.randint(-max_y, max_y + 1, (batch,), generator=generator)
        translation[:, 1] = torch.randint(-max_x, max_x + 1, (batch,), generator=generator)
    cutout = torch.zeros(batch, 4, dtype=torch.long)
    if "cutout" in chosen:
        # a square of side round(0.5 * size) centred anywhere in the image (may overhang)
        side_y, side_x = int(height * 0.5 + 0.5), int(width * 0.5 + 0.5)
        centre_y = torch.randint(0, height + (1 - side_y % 2), (batch,), generator=generator)
        centre_x = torch.randint(0, width + (1 - side_x % 2), (batch,), generator=generator)
        top, left = centre_y - side_y // 2, centre_x - side_x // 2
        cutout = torch.stack([top, left, top + side_y, left + side_x], dim=1)
    return DiffAugParams(*(to_device(t, device) for t in (brightness, saturation, contrast, translation, cutout)))


def diff_augment(x, params):
    """DiffAugment x (B, C, H, W) with `params` (DiffAugParams); differentiable in x."""
    if _use_ops(x):
        return torch.ops.ganlab.diffaug(x, *params)
    return diff_augment_reference(x, params)


def diff_augment_reference(x, params):
    """DiffAugment transcribed from its published formulas, one step at a time."""
    brightness, saturation, contrast, translation, cutout = params
    per_sample = lambda t: t.to(x.dtype).view(-1, 1, 1, 1)
    # brightness: x + (u - 0.5)
    x = x + per_sample(brightness)
    # saturation: (x - m) * 2u + m, m = per-pixel mean over channels
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * per_sample(saturation) + mean
    # contrast: (x - m) * (u + 0.5) + m, m = per-image mean over C, H, W
    mean = x.mean(dim=[1, 2, 3], keepdim=True)
    x = (x - mean) * per_sample(contrast) + mean
    # translation with zero fill: pad by one zero pixel, clamp the shifted index into the pad
    B, C, H, W = x.shape
    rows = (torch.arange(H, device=x.device)[None, :, None] + translation[:, 0, None, None] + 1).clamp(0, H + 1)
    cols = (torch.arange(W, device=x.device)[None, None, :] + translation[:, 1, None, None] + 1).clamp(0, W + 1)
    padded = F.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1)  # (B, H + 2, W + 2, C)
    x = padded[torch.arange(B, device=x.device)[:, None, None], rows, cols].permute(0, 3, 1, 2)
    # cutout: zero the rectangle [top, bottom) x [left, right)
    y = torch.arange(H, device=x.device)[None, :, None]
    xx = torch.arange(W, device=x.device)[None, None, :]
    inside = ((y >= cutout[:, 0, None, None]) & (y < cutout[:, 2, None, None])
              & (xx >= cutout[:, 1, None, None]) & (xx < cutout[:, 3, None, None]))
    return x * (~inside).to(x.dtype)[:, None]
