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
import hashlib
import math
import os
import re
import subprocess
import sys
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout: csrc/, a prebuilt _ganlab_C
PADDING_MODES = {"zeros": 0, "border": 1, "reflection": 2}
EMPTY_BATCH = "warp_batch: index is empty (a batch of 0 samples)"  # the compiled op's words (csrc/augment.cpp)

# -----------------------------------------------------------------------------
# building and loading the extension


def _build_and_load():
    """Load the ahead-of-time build from setup.py if there is one, else JIT-build csrc/.

    Returns why the extension has no CUDA kernels where that matters (a CUDA build of torch),
    else None: "no nvcc", a CUDA version mismatch, or the build error."""
    prebuilt = glob.glob(os.path.join(REPO, "_ganlab_C*.so")) + glob.glob(os.path.join(REPO, "_ganlab_C*.pyd"))
    if prebuilt:
        torch.ops.load_library(prebuilt[0])
        return f"were not built into {prebuilt[0]} (setup.py found no nvcc, or this torch has no CUDA)"
    from torch.utils import cpp_extension

    csrc = os.path.join(REPO, "csrc")
    # at::parallel_for is an OpenMP pragma in torch's headers when torch uses OpenMP: without
    # -fopenmp it silently runs on one thread. (Linking libgomp.so.1 adds no second runtime:
    # the loader reuses the one torch has loaded under that name.)
    openmp = ["-fopenmp"] if torch.backends.openmp.is_available() and sys.platform.startswith("linux") else []

    def build(with_cuda):
        sources = [os.path.join(csrc, "augment.cpp")]
        if with_cuda:
            sources += [os.path.join(csrc, "augment_cuda.cpp"), os.path.join(csrc, "augment_kernels.cu")]
        name = "ganlab_ops_cuda" if with_cuda else "ganlab_ops"
        cache = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
        built = [path for folder in (cache, os.path.join(cache, "*"))  # torch adds a py311_cpu/ level
                 for path in glob.glob(os.path.join(folder, name, name + ".*"))]
        if not built:  # the first build: say why nothing moves for a while
            print(f"fused_op: building the C++{'/CUDA' if with_cuda else ''} extension once "
                  f"(about {'2 min' if with_cuda else '30 s'}; cached in {cache})", file=sys.stderr, flush=True)
        cpp_extension.load(
            name=name,
            sources=sources,
            extra_cflags=["-O3"] + openmp,
            extra_ldflags=openmp,
            extra_cuda_cflags=["-O3"],
            with_cuda=with_cuda,
            is_python_module=False,  # the ops register themselves under torch.ops.ganlab
            verbose=os.environ.get("GANLAB_VERBOSE_BUILD") == "1",
        )

    # CUDA kernels only where this torch was built with CUDA and a matching nvcc can be found;
    # without them the CPU kernels still serve CPU tensors (CUDA ones then take the reference)
    reason = None
    if torch.version.cuda is None:
        pass  # a CPU build of torch: there are no CUDA tensors to serve
    elif cpp_extension.CUDA_HOME is None:
        reason = ("were not built: no nvcc found (pip's torch wheels ship none). Install a CUDA "
                  f"{torch.version.cuda.split('.')[0]}.x toolkit, set CUDA_HOME to it and start again")
    else:
        reason = _try_cuda_build(lambda: build(with_cuda=True), cpp_extension.CUDA_HOME)
        if reason is None:
            return None
    build(with_cuda=False)
    return reason


def _nvcc_version(cuda_home):
    """The CUDA release of cuda_home/bin/nvcc, e.g. "13.0" (None if it cannot be asked)."""
    try:
        result = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True,
                                text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"release (\d+\.\d+)", result.stdout)
    return match.group(1) if match else None


def _build_error_summary(error, lines=12):
    """The part of a failed build's output that says what failed: the compiler's error lines
    (ninja's output ends with "build stopped", which says nothing), else the last lines."""
    text = str(error).strip().splitlines()
    errors = [line.strip() for line in text if "error" in line.lower() and "build stopped" not in line]
    return "\n    ".join((errors or text)[-lines:])


def _try_cuda_build(build_cuda, cuda_home):
    """Build the CUDA kernels unless they cannot or already failed to. Returns None on
    success, else why there are none.

    A failing CUDA build costs minutes and would fail again at every start with the same
    sources, torch and nvcc: the failure is remembered in the extension cache (a file keyed
    by all three) and not retried until one of them changes or the file is deleted."""
    from torch.utils import cpp_extension

    nvcc = _nvcc_version(cuda_home)
    torch_cuda = torch.version.cuda
    # torch refuses to build with an nvcc of another major version than its own CUDA
    if nvcc is not None and nvcc.split(".")[0] != torch_cuda.split(".")[0]:
        return (f"were not built: nvcc in {cuda_home} is CUDA {nvcc} but this torch ({torch.__version__}) "
                f"was built with CUDA {torch_cuda}, and the major versions must match. Install a CUDA "
                f"{torch_cuda.split('.')[0]}.x toolkit and set CUDA_HOME to it, or a torch built for CUDA "
                f"{nvcc.split('.')[0]} (pip install torch --index-url https://download.pytorch.org/whl/cu"
                f"{nvcc.replace('.', '')})")
    digest = hashlib.sha256(f"torch {torch.__version__} cuda {torch_cuda} nvcc {nvcc}".encode())
    csrc = os.path.join(REPO, "csrc")
    for name in sorted(n for n in os.listdir(csrc) if os.path.isfile(os.path.join(csrc, n))):
        with open(os.path.join(csrc, name), "rb") as f:
            digest.update(name.encode() + f.read())
    key = digest.hexdigest()
    # torch's extension cache (TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions)
    cache = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    record = os.path.join(cache, "ganlab_ops_cuda.failed")
    retry = f"delete {record} to try again"
    try:
        with open(record) as f:
            recorded_key, _, recorded_error = f.read().partition("\n")
        if recorded_key == key:
            return (f"failed to build earlier with these same sources, torch {torch.__version__} and nvcc "
                    f"{nvcc}, so the build is not retried at every start ({retry}; "
                    f"GANLAB_VERBOSE_BUILD=1 shows the whole log):\n    {recorded_error}")
    except OSError:
        pass  # no failure recorded
    try:
        build_cuda()
        if os.path.exists(record):  # a failure of other sources, torch or nvcc: past
            os.remove(record)
        return None
    except Exception as error:
        summary = f"{type(error).__name__}: {_build_error_summary(error)}"
        os.makedirs(os.path.dirname(record), exist_ok=True)
        scratch = f"{record}.{os.getpid()}.tmp"
        with open(scratch, "w") as f:  # written whole, then renamed: never half a record
            f.write(f"{key}\n{summary}")
        os.replace(scratch, record)
        return (f"failed to build (torch {torch.__version__}, CUDA {torch_cuda}, nvcc {nvcc}); not retried "
                f"at every start until the sources, torch or nvcc change ({retry}; GANLAB_VERBOSE_BUILD=1 "
                f"shows the whole log):\n    {summary}")


# loaded: None not tried yet, True ops available, False reference only. kernel_devices: the
# device types ("cpu", "cuda") the compiled op has kernels for, decided once when it loads
_state = {"loaded": None, "kernel_devices": frozenset()}


@torch.compiler.assume_constant_result
def _has_kernel(device_type):
    """Whether the compiled op has a kernel for tensors on `device_type` ("cpu", "cuda").

    Decided once, when the extension loads: torch.compile then takes this as a constant
    (running it, and the build on a first call, outside the graph) and traces the branch it
    picks, instead of meeting a dispatcher query it cannot put in a graph. Where the answer
    is no (a CUDA build of torch without nvcc, a failed CUDA build), tensors of that device
    take the pure-PyTorch reference; load_extension has said why, once."""
    return bool(load_extension()) and device_type in _state["kernel_devices"]


def load_extension():
    """Build/load the C++/CUDA ops once; return True if they are available."""
    if _state["loaded"] is None:
        if os.environ.get("GANLAB_REFERENCE") == "1":
            _state["loaded"] = False
            return False
        try:
            missing_cuda = None
            if not hasattr(torch.ops.ganlab, "warp_batch"):
                missing_cuda = _build_and_load()
            _register_python_side()
        except Exception as error:  # no compiler, failed build, ...: still usable
            warnings.warn(
                f"fused_op: could not build the C++/CUDA extension ({type(error).__name__}: "
                f"{str(error).strip().splitlines()[-1] if str(error).strip() else ''}); using the "
                "pure-PyTorch reference instead (correct, slower). Set GANLAB_VERBOSE_BUILD=1 "
                "to see the build log.",
                stacklevel=3,
            )
            _state["loaded"] = False
            return False
        _state["loaded"] = True
        _state["kernel_devices"] = frozenset(
            device for device, key in [("cpu", "CPU"), ("cuda", "CUDA")]
            if torch._C._dispatch_has_kernel_for_dispatch_key("ganlab::warp_batch", key))
        if "cuda" not in _state["kernel_devices"] and torch.cuda.is_available():
            warnings.warn(f"fused_op: CUDA tensors use the pure-PyTorch reference (correct, slower): the CUDA "
                          f"kernels {missing_cuda or 'are missing from the loaded extension'}", stacklevel=3)
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

    # the fake kernels refuse what the compiled ones refuse (an empty batch included), so
    # that a traced program fails where an eager one would
    @torch.library.register_fake("ganlab::warp_batch")
    def _(bank, index, theta, out_height, out_width, padding_mode, dtype):
        torch._check(bank.dim() == 4 and index.dim() == 1 and theta.dim() == 3)
        torch._check(index.shape[0] > 0, lambda: EMPTY_BATCH)
        same_device("warp_batch", dict(bank=bank, index=index, theta=theta))
        return bank.new_empty((index.shape[0], bank.shape[1], out_height, out_width), dtype=dtype)

    @torch.library.register_fake("ganlab::diffaug")
    def _(x, brightness, saturation, contrast, translation, cutout):
        torch._check(x.numel() > 0, lambda: f"diffaug: images are empty, shape {list(x.shape)}")
        same_device("diffaug", dict(x=x, brightness=brightness, saturation=saturation, contrast=contrast,
                                    translation=translation, cutout=cutout))
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("ganlab::diffaug_backward")
    def _(grad, saturation, contrast, translation, cutout):
        torch._check(grad.numel() > 0, lambda: f"diffaug_backward: images are empty, shape {list(grad.shape)}")
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

    An empty batch (B = 0) is an error, the same RuntimeError from the compiled op, its fake
    kernel under torch.compile and the reference: in a training loop it is always a bug
    upstream (a slice past the end, a batch size of 0), and the empty batch it would return
    shows up steps later as a NaN loss (the mean over no samples) far from its cause.
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
    if _has_kernel(bank.device.type):
        return torch.ops.ganlab.warp_batch(bank, index, theta, h, w, PADDING_MODES[padding], dtype)
    return warp_batch_reference(bank, index, theta, (h, w), padding, dtype)


def warp_batch_reference(bank, index, theta, size, padding="zeros", dtype=torch.float32):
    """The chain of PyTorch ops warp_batch fuses: index, float, affine_grid, grid_sample, normalize."""
    if len(index) == 0:  # refused as the compiled op refuses it (see warp_batch)
        raise RuntimeError(EMPTY_BATCH)
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

    def select(self, rows):
        """The parameters of some of the images: rows, an index or slice of the batch dimension."""
        return DiffAugParams(*(part[rows] for part in self))


DIFFAUG_POLICIES = ("color", "translation", "cutout")  # the parts of DiffAugment a policy names


def random_diffaug(batch, height, width, policy="color,translation,cutout", generator=None,
                   device=None):
    """Draw DiffAugment parameters with the published distributions (Zhao et al. 2020).

    policy: comma-separated subset of color, translation, cutout; what is left out gets the
    identity. Drawn on the CPU from `generator`, moved to `device` asynchronously.
    """
    chosen = {p.strip() for p in policy.split(",") if p.strip()}
    unknown = chosen - set(DIFFAUG_POLICIES)
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
    if _has_kernel(x.device.type):
        return torch.ops.ganlab.diffaug(x, *params)
    return diff_augment_reference(x, params)


def diff_augment_reference(x, params):
    """DiffAugment transcribed from its published formulas, one step at a time."""
    if x.numel() == 0:  # refused as the compiled op refuses it (see warp_batch)
        raise RuntimeError(f"diffaug: images are empty, shape {list(x.shape)}")
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
