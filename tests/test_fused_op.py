"""Tests of the fused augmentation op (csrc/, fused_op.py) against oracles written elsewhere:
F.affine_grid + F.grid_sample for the warp, torch.flip for orientation, DiffAugment's
published formulas, torch.autograd.gradcheck and torch.library.opcheck."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from ganlab import fused_op
import compile_cuda_headers
from ganlab.fused_op import DiffAugParams

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
# absolute tolerance of the fused op's output in [-1, 1] against grid_sample in float32:
# float32 differs only in rounding (coordinates), the 16-bit types by their final rounding
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.fixture(scope="module", autouse=True)
def extension():
    assert fused_op.load_extension(), "the C++ extension failed to build"


def random_inputs(n, size, batch, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    bank = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    index = torch.randint(0, n, (batch,), generator=g)
    theta = fused_op.random_affine(batch, flip=0.5, translate=0.2, scale=(0.7, 1.4), rotate=30, generator=g)
    return bank.to(device), index.to(device), theta.to(device)


# ----------------------------------------------------------------------------- warp_batch

@pytest.mark.parametrize("in_size,out_size", [(32, 32), (96, 64), (96, 96)])
@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_warp_equals_grid_sample(in_size, out_size, padding, dtype):
    bank, index, theta = random_inputs(7, in_size, 12, seed=in_size + out_size)
    fused = torch.ops.ganlab.warp_batch(bank, index, theta, out_size, out_size,
                                        fused_op.PADDING_MODES[padding], dtype)
    assert fused.dtype == dtype and fused.shape == (12, 3, out_size, out_size)
    images = bank[index].float()
    grid = F.affine_grid(theta, [12, 3, out_size, out_size], align_corners=False)
    oracle = F.grid_sample(images, grid, mode="bilinear", padding_mode=padding, align_corners=False) / 127.5 - 1
    torch.testing.assert_close(fused.float(), oracle, atol=TOLERANCE[dtype], rtol=0)


def cpu_has_avx2():
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_warp_cpu_vector_and_scalar_loops(padding, dtype, monkeypatch):
    # The CPU kernel has an AVX2 loop (8 pixels per step, where all their taps are inside the
    # image) and the plain loop (other CPUs; GANLAB_CPU_SIMD=0). Both against grid_sample on
    # widths that are not multiples of 8 (the tail), zoomed-out matrices (groups that fall
    # back pixel by pixel) and the bank's last image (always the plain loop).
    g = torch.Generator().manual_seed(11)
    bank = torch.randint(0, 256, (4, 3, 21, 30), dtype=torch.uint8, generator=g)
    index = torch.tensor([3, 0, 1, 2, 3, 1])
    theta = fused_op.random_affine(6, flip=0.5, translate=0.3, scale=(0.5, 1.5), rotate=40, generator=g)
    images = bank[index].float()
    grid = F.affine_grid(theta, [6, 3, 19, 29], align_corners=False)
    oracle = F.grid_sample(images, grid, mode="bilinear", padding_mode=padding, align_corners=False) / 127.5 - 1
    outputs = {}
    for setting in ["1", "0"]:
        monkeypatch.setenv("GANLAB_CPU_SIMD", setting)
        outputs[setting] = torch.ops.ganlab.warp_batch(bank, index, theta, 19, 29,
                                                       fused_op.PADDING_MODES[padding], dtype).float()
        torch.testing.assert_close(outputs[setting], oracle, atol=TOLERANCE[dtype], rtol=0)
    if cpu_has_avx2() and dtype == torch.float32:
        # the vector loop rounds differently (fused multiply-adds): proof that it ran
        assert not torch.equal(outputs["1"], outputs["0"])


GUARD_PAGE_SCRIPT = r"""
import ctypes, mmap, sys
import numpy as np, torch
sys.path.insert(0, sys.argv[1])
from ganlab import fused_op
# a bank whose last byte is the last byte before a page the process may not touch
page = mmap.PAGESIZE
shape = (3, 3, 13, 13)
nbytes = int(np.prod(shape))
pages = -(-nbytes // page) + 1
memory = mmap.mmap(-1, pages * page)
address = ctypes.addressof(ctypes.c_char.from_buffer(memory))
libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
assert libc.mprotect(address + (pages - 1) * page, page, 0) == 0  # PROT_NONE
start = (pages - 1) * page - nbytes
array = np.frombuffer(memory, dtype=np.uint8, count=nbytes, offset=start).reshape(shape)
bank = torch.from_numpy(array)
bank.copy_(torch.randint(0, 256, shape, dtype=torch.uint8))
# the last image, zoomed so its taps reach the bottom-right pixel, in every padding mode
index = torch.tensor([2, 1, 2, 0] * 4)
theta = fused_op.random_affine(16, flip=0.5, translate=0.4, scale=(0.6, 1.2), rotate=20)
for padding in ["zeros", "border", "reflection"]:
    out = fused_op.warp_batch(bank, index, theta, 16, padding)
    ref = fused_op.warp_batch_reference(bank, index, theta, 16, padding)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
print("ok")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mprotect guard page: Linux")
def test_warp_never_reads_past_the_bank():
    # the vector loop's gathers read 2 bytes beyond a tap; at the bank's end that would fault
    result = subprocess.run([sys.executable, "-c", GUARD_PAGE_SCRIPT, REPO], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
def test_warp_far_outside_the_image(padding):
    # zoomed out 4x and shifted by several image sizes: reflection folds many times
    g = torch.Generator().manual_seed(5)
    bank = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=g)
    theta = torch.tensor([[[3.7, 0.2, 2.9], [0.1, -4.2, -3.3]], [[-4.0, 0.0, -7.5], [0.0, 4.0, 6.25]]])
    fused = fused_op.warp_batch(bank, torch.tensor([0, 1]), theta, 24, padding)
    oracle = fused_op.warp_batch_reference(bank, torch.tensor([0, 1]), theta, 24, padding)
    torch.testing.assert_close(fused, oracle, atol=2e-3, rtol=0)


def test_warp_non_square_output_and_input():
    g = torch.Generator().manual_seed(3)
    bank = torch.randint(0, 256, (3, 3, 20, 36), dtype=torch.uint8, generator=g)
    index = torch.tensor([2, 0, 1, 2])
    theta = fused_op.random_affine(4, translate=0.1, rotate=10, generator=g)
    fused = fused_op.warp_batch(bank, index, theta, (24, 16), "reflection")
    oracle = fused_op.warp_batch_reference(bank, index, theta, (24, 16), "reflection")
    torch.testing.assert_close(fused, oracle, atol=1e-4, rtol=0)


def test_identity_and_flip_keep_orientation():
    # asymmetric content: a transpose, a vertical mirror or a channel swap would all show
    bank = torch.arange(2 * 3 * 8 * 8).reshape(2, 3, 8, 8).mul(3).remainder(256).to(torch.uint8)
    index = torch.tensor([1, 0])
    identity = torch.tensor([[1.0, 0, 0], [0, 1, 0]]).repeat(2, 1, 1)
    out = fused_op.warp_batch(bank, index, identity, 8)
    torch.testing.assert_close(out, bank[index].float() / 127.5 - 1, atol=1e-6, rtol=0)
    flipped = fused_op.random_affine(2, flip=1.0)  # always mirror left-right
    out = fused_op.warp_batch(bank, index, flipped, 8)
    torch.testing.assert_close(out, torch.flip(bank[index], dims=[3]).float() / 127.5 - 1, atol=1e-5, rtol=0)


def test_zeros_padding_is_black():
    bank = torch.full((1, 3, 4, 4), 200, dtype=torch.uint8)
    far_away = torch.tensor([[[1.0, 0, 5.0], [0, 1, 0]]])  # reads far to the right of the image
    out = fused_op.warp_batch(bank, torch.tensor([0]), far_away, 4, "zeros")
    assert torch.all(out == -1)  # pixel 0, as index -> float -> grid_sample -> normalize gives
    out = fused_op.warp_batch(bank, torch.tensor([0]), far_away, 4, "border")
    torch.testing.assert_close(out, torch.full_like(out, 200 / 127.5 - 1))


def test_warp_non_finite_theta_is_defined():
    bank, index, theta = random_inputs(2, 8, 3, seed=1)
    theta[0, 0, 0] = float("nan")
    theta[1, 1, 2] = float("inf")
    for padding in fused_op.PADDING_MODES:
        out = fused_op.warp_batch(bank, index, theta, 8, padding)
        assert torch.isfinite(out).all() and out.abs().max() <= 1


def test_warp_non_contiguous_index_and_theta():
    bank, index, theta = random_inputs(5, 16, 8, seed=2)
    out = fused_op.warp_batch(bank, index[::2], theta[::2], 16)
    ref = fused_op.warp_batch_reference(bank, index[::2].contiguous(), theta[::2].contiguous(), 16)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_random_affine_samples():
    g = torch.Generator().manual_seed(0)
    theta = fused_op.random_affine(4000, flip=0.3, translate=0.1, scale=(0.8, 1.25), rotate=20, generator=g)
    assert theta.shape == (4000, 2, 3) and theta.dtype == torch.float32
    # determinant = sign / zoom^2: its sign counts flips, its size the zoom
    det = torch.linalg.det(theta[:, :, :2])
    assert abs((det < 0).float().mean().item() - 0.3) < 0.03
    zoom = det.abs().rsqrt()
    assert zoom.min() >= 0.8 - 1e-5 and zoom.max() <= 1.25 + 1e-5
    assert theta[:, :, 2].abs().max() <= 0.2 + 1e-6  # a shift of 10% of the size is 0.2
    again = fused_op.random_affine(4000, flip=0.3, translate=0.1, scale=(0.8, 1.25), rotate=20,
                                  generator=torch.Generator().manual_seed(0))
    assert torch.equal(theta, again)
    plain = fused_op.random_affine(8, flip=0.0)
    assert torch.equal(plain, torch.tensor([[1.0, 0, 0], [0, 1, 0]]).expand(8, 2, 3))


# ----------------------------------------------------------------------------- diffaug

def params_for(x, seed, policy="color,translation,cutout"):
    B, _, H, W = x.shape
    return fused_op.random_diffaug(B, H, W, policy, generator=torch.Generator().manual_seed(seed), device=x.device)


def published_diffaugment(x, p):
    """DiffAugment written out independently, loop by loop, from the formulas in DESIGN.md."""
    out = torch.zeros_like(x)
    B, C, H, W = x.shape
    for n in range(B):
        image = x[n] + p.brightness[n]
        channel_mean = image.mean(dim=0, keepdim=True)
        image = (image - channel_mean) * p.saturation[n] + channel_mean
        image_mean = image.mean()
        image = (image - image_mean) * p.contrast[n] + image_mean
        ty, tx = p.translation[n].tolist()
        top, left, bottom, right = p.cutout[n].tolist()
        for y in range(H):
            for xx in range(W):
                inside_cut = top <= y < bottom and left <= xx < right
                if not inside_cut and 0 <= y + ty < H and 0 <= xx + tx < W:
                    out[n, :, y, xx] = image[:, y + ty, xx + tx]
    return out


@pytest.mark.parametrize("policy", ["color,translation,cutout", "color", "translation", "cutout", ""])
def test_diffaug_equals_published_formulas(policy):
    x = torch.randn(4, 3, 9, 12, dtype=torch.float64).clamp(-1, 1)
    p = params_for(x, seed=len(policy), policy=policy)
    expected = published_diffaugment(x, p)
    torch.testing.assert_close(fused_op.diff_augment(x, p), expected)
    torch.testing.assert_close(fused_op.diff_augment_reference(x, p), expected)


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_diffaug_matches_reference_float32(channels):
    x = torch.rand(16, channels, 32, 32) * 2 - 1
    p = params_for(x, seed=channels)
    torch.testing.assert_close(fused_op.diff_augment(x, p), fused_op.diff_augment_reference(x, p), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_diffaug_half_precision(dtype):
    x = torch.rand(8, 3, 16, 16) * 2 - 1
    p = params_for(x, seed=5)
    out = fused_op.diff_augment(x.to(dtype), p)
    assert out.dtype == dtype
    # accumulates in float32: only the input and output roundings differ from float32
    torch.testing.assert_close(out.float(), fused_op.diff_augment_reference(x, p), atol=0.05, rtol=0)


def test_diffaug_extreme_params_and_non_contiguous_input():
    x = (torch.rand(3, 3, 10, 10) * 2 - 1).transpose(2, 3)  # a non-contiguous view
    p = DiffAugParams(torch.tensor([0.4, -0.5, 0.0]), torch.tensor([0.0, 2.0, 1.0]),
                      torch.tensor([0.5, 1.5, 1.0]), torch.tensor([[30, -30], [-10, 0], [3, 2]]),
                      torch.tensor([[-8, -8, 2, 2], [5, 5, 40, 40], [0, 0, 0, 0]]))
    torch.testing.assert_close(fused_op.diff_augment(x, p), published_diffaugment(x, p), atol=1e-5, rtol=0)


def test_diffaug_rows_of_a_batch_are_augmented_as_in_the_whole_batch():
    # under torchrun each process keeps its rows of parameters drawn for the whole batch (select)
    x = torch.rand(6, 3, 10, 10) * 2 - 1
    p = fused_op.random_diffaug(6, 10, 10, generator=torch.Generator().manual_seed(5))
    rows = slice(3, 6)
    assert all(torch.equal(part, whole[3:6]) for part, whole in zip(p.select(rows), p))
    torch.testing.assert_close(fused_op.diff_augment(x[rows], p.select(rows)), published_diffaugment(x, p)[rows],
                               atol=1e-5, rtol=0)


def test_diffaug_gradcheck():
    x = torch.randn(3, 3, 6, 7, dtype=torch.float64, requires_grad=True)
    p = params_for(x, seed=11)
    assert torch.autograd.gradcheck(lambda t: torch.ops.ganlab.diffaug(t, *p), (x,))
    # second order: a gradient penalty differentiates through the backward
    assert torch.autograd.gradgradcheck(lambda t: torch.ops.ganlab.diffaug(t, *p), (x,))


def test_diffaug_backward_matches_autograd_of_reference():
    x = torch.randn(5, 3, 12, 12, requires_grad=True)
    p = params_for(x, seed=12)
    g = torch.randn(5, 3, 12, 12)
    (fused,) = torch.autograd.grad(fused_op.diff_augment(x, p), x, g)
    (reference,) = torch.autograd.grad(fused_op.diff_augment_reference(x, p), x, g)
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)
    # an expanded (zero-stride) gradient, as .sum() hands back
    (fused,) = torch.autograd.grad(fused_op.diff_augment(x, p).sum(), x)
    (reference,) = torch.autograd.grad(fused_op.diff_augment_reference(x, p).sum(), x)
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)


def test_random_diffaug_distributions():
    g = torch.Generator().manual_seed(1)
    p = fused_op.random_diffaug(5000, 32, 64, generator=g)
    assert p.brightness.min() >= -0.5 and p.brightness.max() < 0.5
    assert p.saturation.min() >= 0 and p.saturation.max() < 2
    assert p.contrast.min() >= 0.5 and p.contrast.max() < 1.5
    assert p.translation[:, 0].abs().max() == 4 and p.translation[:, 1].abs().max() == 8  # round(size/8)
    assert torch.all(p.cutout[:, 2] - p.cutout[:, 0] == 16) and torch.all(p.cutout[:, 3] - p.cutout[:, 1] == 32)
    centre_y = p.cutout[:, 0] + 8
    assert centre_y.min() == 0 and centre_y.max() == 32  # even side: centres 0 .. size
    again = fused_op.random_diffaug(5000, 32, 64, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(p, again))
    with pytest.raises(ValueError, match="unknown"):
        fused_op.random_diffaug(2, 8, 8, "color,blur")


# ----------------------------------------------------------------------------- registration

def test_opcheck():
    bank, index, theta = random_inputs(4, 12, 5, seed=7)
    for padding in range(3):
        torch.library.opcheck(torch.ops.ganlab.warp_batch, (bank, index, theta, 10, 8, padding, torch.float32))
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    p = params_for(x, seed=8)
    torch.library.opcheck(torch.ops.ganlab.diffaug, (x, *p))
    torch.library.opcheck(torch.ops.ganlab.diffaug_backward, (x, *p[1:]))


def augment_step(bank, index, theta, p):
    real = fused_op.warp_batch(bank, index, theta, 16, check_index=False)
    return fused_op.diff_augment(real, p)


@pytest.fixture
def fresh_dynamo():
    # fused_op._has_kernel is a constant to torch.compile: graphs traced under a faked answer
    # must not outlive the test that faked it
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compile_recording_graphs(fn, graphs):
    """torch.compile(fn, fullgraph=True) whose backend appends to `graphs` the names of the
    functions each traced graph calls, and runs the graph as traced."""
    def backend(graph_module, example_inputs):
        graphs.append({str(node.target) for node in graph_module.graph.nodes if node.op == "call_function"})
        return graph_module

    return torch.compile(fn, backend=backend, fullgraph=True)


def test_torch_compile_traces_the_ops(fresh_dynamo):
    bank, index, theta = random_inputs(4, 16, 6, seed=9)
    p = params_for(torch.randn(6, 3, 16, 16), seed=9)
    compiled = torch.compile(augment_step, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(bank, index, theta, p), augment_step(bank, index, theta, p))


def test_torch_compile_traces_the_cuda_branch(fresh_dynamo, monkeypatch):
    # CUDA tensors without a GPU: fake tensors on "cuda", which is what Dynamo traces with
    # anyway. Whether the op has CUDA kernels was once asked of the dispatcher at every call,
    # which Dynamo cannot put in a graph ("Unsupported torch.* op returned non-Tensor"); it is
    # now decided when the extension loads. Here the answer a CUDA build gives, yes, is faked.
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setitem(fused_op._state, "kernel_devices", frozenset({"cpu", "cuda"}))
    bank, index, theta = random_inputs(4, 16, 6, seed=9)
    p = params_for(torch.randn(6, 3, 16, 16), seed=9)
    graphs = []
    with FakeTensorMode():
        on_cuda = lambda t: torch.empty(t.shape, dtype=t.dtype, device="cuda")  # shapes, no values
        fake_bank, fake_index, fake_theta = on_cuda(bank), on_cuda(index), on_cuda(theta)
        fake_p = DiffAugParams(*(on_cuda(t) for t in p))
        out = compile_recording_graphs(augment_step, graphs)(fake_bank, fake_index, fake_theta, fake_p)
    assert out.device.type == "cuda" and out.shape == (6, 3, 16, 16)
    (called,) = graphs  # one graph: no break
    assert {"ganlab.warp_batch", "ganlab.diffaug"} <= called, called


def test_torch_compile_takes_the_reference_where_there_is_no_kernel(fresh_dynamo, monkeypatch):
    # the other answer of the load-time decision (as for CUDA tensors when nvcc is missing):
    # the traced graph holds the reference's ops, and computes the same batch
    monkeypatch.setitem(fused_op._state, "kernel_devices", frozenset())
    bank, index, theta = random_inputs(4, 16, 6, seed=9)
    p = params_for(torch.randn(6, 3, 16, 16), seed=9)
    graphs = []
    out = compile_recording_graphs(augment_step, graphs)(bank, index, theta, p)
    (called,) = graphs
    assert not any("ganlab" in name for name in called) and any("grid_sample" in name for name in called), called
    torch.testing.assert_close(out, fused_op.diff_augment_reference(
        fused_op.warp_batch_reference(bank, index, theta, 16), p), atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- bad input

def bad_warp_cases():
    bank, index, theta = random_inputs(4, 8, 3, seed=0)
    return [
        ((bank.float(), index, theta), "bank must be uint8"),
        ((bank[0], index, theta), r"bank must have shape \(N, 3, H, W\)"),
        ((bank[:, :2].contiguous(), index, theta), r"bank must have shape \(N, 3, H, W\)"),
        ((bank[:0], index, theta), "bank is empty"),
        ((bank.contiguous(memory_format=torch.channels_last), index, theta), "bank must be contiguous"),
        ((bank[:, :, ::2], index, theta), "bank must be contiguous"),
        ((bank, index.int(), theta), "index must be int64"),
        ((bank, index[None], theta), r"index must be 1-D"),
        ((bank, index[:0], theta[:0]), "index is empty"),
        ((bank, index, theta.double()), "theta must be float32"),
        ((bank, index, theta[:, :1]), r"theta must have shape \(B, 2, 3\)"),
        ((bank, index, theta[:2]), "theta has 2 matrices but index has 3"),
        ((bank, torch.tensor([0, 4, 1]), theta), r"index\[1\] = 4 is out of range for a bank of 4"),
        ((bank, torch.tensor([0, -1, 1]), theta), r"index\[1\] = -1 is out of range"),
        ((bank, index, theta.to("meta")), "must be on one device"),
    ]


def test_empty_batch_is_refused_alike_everywhere():
    # the compiled op, its fake kernel (what torch.compile traces with) and the reference all
    # refuse an empty batch with the compiled op's words (fused_op.warp_batch says why)
    from torch._subclasses.fake_tensor import FakeTensorMode

    bank, index, theta = random_inputs(4, 8, 3, seed=0)
    x = torch.randn(0, 3, 8, 8)
    p = params_for(torch.randn(3, 3, 8, 8), seed=0)
    p_empty = DiffAugParams(*(t[:0] for t in p))
    warp_message = r"warp_batch: index is empty \(a batch of 0 samples\)"
    diffaug_message = r"diffaug: images are empty, shape \[0, 3, 8, 8\]"
    with pytest.raises(RuntimeError, match=warp_message):
        torch.ops.ganlab.warp_batch(bank, index[:0], theta[:0], 8, 8, 0, torch.float32)
    with pytest.raises(RuntimeError, match=warp_message):
        fused_op.warp_batch_reference(bank, index[:0], theta[:0], 8)
    with pytest.raises(RuntimeError, match=diffaug_message):
        torch.ops.ganlab.diffaug(x, *p_empty)
    with pytest.raises(RuntimeError, match=diffaug_message):
        fused_op.diff_augment_reference(x, p_empty)
    with pytest.raises(RuntimeError, match="diffaug_backward: images are empty"):
        torch.ops.ganlab.diffaug_backward(x, *p_empty[1:])
    empty_index, empty_theta = index[:0], theta[:0]
    with FakeTensorMode() as mode:
        fake_bank, fake_index, fake_theta, fake_x = (mode.from_tensor(t) for t in (bank, empty_index, empty_theta, x))
        fake_p = DiffAugParams(*(mode.from_tensor(t) for t in p_empty))
        with pytest.raises(RuntimeError, match=warp_message):
            torch.ops.ganlab.warp_batch(fake_bank, fake_index, fake_theta, 8, 8, 0, torch.float32)
        with pytest.raises(RuntimeError, match=diffaug_message):
            torch.ops.ganlab.diffaug(fake_x, *fake_p)
        with pytest.raises(RuntimeError, match="diffaug_backward: images are empty"):
            torch.ops.ganlab.diffaug_backward(fake_x, *fake_p[1:])


@pytest.mark.parametrize("case", range(15))
def test_warp_bad_input(case):
    args, message = bad_warp_cases()[case]
    with pytest.raises(RuntimeError, match=message):
        torch.ops.ganlab.warp_batch(*args, 8, 8, 0, torch.float32)


def test_warp_bad_options():
    bank, index, theta = random_inputs(4, 8, 3, seed=0)
    with pytest.raises(RuntimeError, match="padding_mode must be"):
        torch.ops.ganlab.warp_batch(bank, index, theta, 8, 8, 3, torch.float32)
    with pytest.raises(RuntimeError, match="dtype must be float32, float16 or bfloat16"):
        torch.ops.ganlab.warp_batch(bank, index, theta, 8, 8, 0, torch.int32)
    with pytest.raises(RuntimeError, match="output size must be positive"):
        torch.ops.ganlab.warp_batch(bank, index, theta, 0, 8, 0, torch.float32)
    with pytest.raises(ValueError, match="padding must be one of"):
        fused_op.warp_batch(bank, index, theta, 8, padding="wrap")


def bad_diffaug_cases():
    x = torch.randn(3, 3, 8, 8)
    b, s, k, t, r = params_for(x, seed=0)
    return [
        ((x.long(), b, s, k, t, r), "images must be float32, float64, float16 or bfloat16"),
        ((x[0], b, s, k, t, r), r"images must have shape \(B, C, H, W\)"),
        ((x[:, :, :0], b, s, k, t, r), "images are empty"),
        ((x, b[:2], s, k, t, r), r"brightness must have shape \(3,\)"),
        ((x, b, s[:, None], k, t, r), r"saturation must have shape \(3,\)"),
        ((x, b, s, k.long(), t, r), "contrast must be a floating tensor"),
        ((x, b, s, k, t.float(), r), "translation must be int64"),
        ((x, b, s, k, t[:, :1], r), r"translation must have shape \(3, 2\)"),
        ((x, b, s, k, t, r[:, :3]), r"cutout must have shape \(3, 4\)"),
        ((x, b, s, k, t, r.to("meta")), "must be on one device"),
    ]


@pytest.mark.parametrize("case", range(10))
def test_diffaug_bad_input(case):
    args, message = bad_diffaug_cases()[case]
    with pytest.raises(RuntimeError, match=message):
        torch.ops.ganlab.diffaug(*args)


# ----------------------------------------------------------------------------- build, fallback

def test_cpu_tensors_use_the_compiled_op(monkeypatch):
    def no_reference(*args, **kwargs):
        raise AssertionError("the reference ran although the compiled op has a CPU kernel")

    monkeypatch.setattr(fused_op, "warp_batch_reference", no_reference)
    monkeypatch.setattr(fused_op, "diff_augment_reference", no_reference)
    bank, index, theta = random_inputs(4, 8, 3, seed=0)
    x = fused_op.warp_batch(bank, index, theta, 8)
    fused_op.diff_augment(x, params_for(x, seed=0))


# what ninja's output looks like when the CUDA host file does not compile (torch 2.4-2.10
# headers and the old augment_cuda.cpp)
NINJA_FAILURE = """Error building extension 'ganlab_ops_cuda': [1/3] c++ -MMD -MF augment_cuda.o.d ...
FAILED: augment_cuda.o
c++ -MMD -MF augment_cuda.o.d -DTORCH_EXTENSION_NAME=ganlab_ops_cuda -O3 -c csrc/augment_cuda.cpp
csrc/augment_cuda.cpp: In function 'void* ganlab::current_stream(const c10::Device&)':
csrc/augment_cuda.cpp:31:33: error: 'class c10::Stream' has no member named 'native_handle'
   31 |   return impl.getStream(device).native_handle();
ninja: build stopped: subcommand failed."""


@pytest.fixture
def mocked_cuda_build(monkeypatch, tmp_path):
    """A CUDA build of torch with nvcc 13.0 whose CUDA build fails as NINJA_FAILURE, an empty
    extension cache in tmp_path. Returns the list of builds tried: (name, with_cuda)."""
    from torch.utils import cpp_extension

    builds = []

    def fake_load(name, sources, with_cuda, **kwargs):
        builds.append((name, with_cuda))
        assert [os.path.basename(s) for s in sources] == (
            ["augment.cpp", "augment_cuda.cpp", "augment_kernels.cu"] if with_cuda else ["augment.cpp"])
        if with_cuda:
            raise RuntimeError(NINJA_FAILURE)

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/usr/local/cuda")
    monkeypatch.setattr(fused_op, "_nvcc_version", lambda cuda_home: "13.0")
    monkeypatch.setattr(cpp_extension, "load", fake_load)
    return builds


def test_failed_cuda_build_says_why_and_is_not_retried(mocked_cuda_build, monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    # first start: the CUDA build fails, the reason quotes the compiler's error, the CPU
    # kernels are built
    reason = fused_op._build_and_load()
    assert mocked_cuda_build == [("ganlab_ops_cuda", True), ("ganlab_ops", False)]
    assert "has no member named 'native_handle'" in reason and "build stopped" not in reason
    record = tmp_path / "ganlab_ops_cuda.failed"
    assert f"delete {record} to try again" in reason
    # next start, same sources, torch and nvcc: no second try, and the reason says so
    mocked_cuda_build.clear()
    reason = fused_op._build_and_load()
    assert mocked_cuda_build == [("ganlab_ops", False)]
    assert "failed to build earlier" in reason and "has no member named 'native_handle'" in reason
    # another nvcc (or torch, or source) is worth a try
    monkeypatch.setattr(fused_op, "_nvcc_version", lambda cuda_home: "13.1")
    mocked_cuda_build.clear()
    fused_op._build_and_load()
    assert mocked_cuda_build == [("ganlab_ops_cuda", True), ("ganlab_ops", False)]
    # and so is deleting the record, as the message says
    record.unlink()
    mocked_cuda_build.clear()
    fused_op._build_and_load()
    assert mocked_cuda_build == [("ganlab_ops_cuda", True), ("ganlab_ops", False)]
    # a build that works again (here: with another nvcc) leaves no record behind
    monkeypatch.setattr(fused_op, "_nvcc_version", lambda cuda_home: "13.2")
    monkeypatch.setattr(cpp_extension, "load", lambda name, sources, with_cuda, **kwargs: None)
    assert fused_op._build_and_load() is None and not record.exists()


def test_nvcc_of_another_cuda_major_is_not_tried(mocked_cuda_build, monkeypatch):
    # torch refuses such a build anyway: say so, and what to install, without trying
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    reason = fused_op._build_and_load()
    assert mocked_cuda_build == [("ganlab_ops", False)]
    assert "nvcc in /usr/local/cuda is CUDA 13.0" in reason and "built with CUDA 12.8" in reason
    assert "Install a CUDA 12.x toolkit" in reason and "download.pytorch.org/whl/cu130" in reason


def test_build_error_summary_keeps_the_error_lines():
    summary = fused_op._build_error_summary(RuntimeError(NINJA_FAILURE))
    assert summary.splitlines()[-1].strip() == ("csrc/augment_cuda.cpp:31:33: error: 'class c10::Stream' has "
                                                "no member named 'native_handle'")
    # output with no line saying "error": its last lines
    summary = fused_op._build_error_summary(RuntimeError("\n".join(f"line {i}" for i in range(30))), lines=3)
    assert summary.split() == ["line", "27", "line", "28", "line", "29"]


def test_missing_cuda_kernels_are_reported_once_at_load(monkeypatch):
    # a CUDA build of torch on a machine with a GPU whose CUDA kernels were not built: one
    # warning when the extension loads, with the reason; CUDA tensors then take the reference
    monkeypatch.setattr(fused_op, "_state", {"loaded": None, "kernel_devices": frozenset()})
    monkeypatch.setattr(fused_op, "_build_and_load", lambda: "were not built: no nvcc found")
    monkeypatch.setattr(torch.ops, "ganlab", type("NoOps", (), {})())  # as if never loaded
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.warns(UserWarning, match="CUDA tensors use the pure-PyTorch reference .* the CUDA kernels "
                                         "were not built: no nvcc found") as record:
        assert fused_op.load_extension()
        assert fused_op._has_kernel("cpu") and not fused_op._has_kernel("cuda")
    assert len(record) == 1


def test_reference_forced_by_environment():
    code = "from ganlab import fused_op; print(fused_op.load_extension())"
    env = dict(os.environ, GANLAB_REFERENCE="1")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_failed_build_falls_back_with_one_warning(monkeypatch):
    def broken_build():
        raise RuntimeError("Error building extension 'ganlab_ops': no compiler")

    saved = dict(fused_op._state)
    monkeypatch.setattr(fused_op, "_state", {"loaded": None, "kernel_devices": frozenset()})
    monkeypatch.setattr(fused_op, "_build_and_load", broken_build)
    monkeypatch.setattr(torch.ops, "ganlab", type("NoOps", (), {})())  # as if never loaded
    bank, index, theta = random_inputs(3, 8, 2, seed=4)
    with pytest.warns(UserWarning, match="pure-PyTorch reference") as record:
        out = fused_op.warp_batch(bank, index, theta, 8)
        fused_op.warp_batch(bank, index, theta, 8)
    assert len(record) == 1
    torch.testing.assert_close(out, fused_op.warp_batch_reference(bank, index, theta, 8))
    assert saved["loaded"] is True


AOT_CHECK = r"""
import sys
import torch
from torch.utils import cpp_extension
def no_jit(*args, **kwargs):
    raise AssertionError("fused_op.py JIT-built although an ahead-of-time build is present")
cpp_extension.load = no_jit
from ganlab import fused_op
assert fused_op.load_extension()
g = torch.Generator().manual_seed(0)
bank = torch.randint(0, 256, (4, 3, 24, 24), dtype=torch.uint8, generator=g)
index = torch.tensor([0, 3, 1])
theta = fused_op.random_affine(3, flip=0.5, translate=0.1, rotate=10, generator=g)
out = fused_op.warp_batch(bank, index, theta, 16, "reflection")
torch.testing.assert_close(out, fused_op.warp_batch_reference(bank, index, theta, 16, "reflection"), atol=1e-4, rtol=0)
print("ok")
"""


def test_ahead_of_time_build_is_used(tmp_path):
    # `python setup.py build_ext --inplace` in a copy of the checkout (so the .so does not
    # shadow the JIT build of the other tests), then fused_op.py must load it and not JIT-build
    shutil.copy(os.path.join(REPO, "setup.py"), tmp_path / "setup.py")
    for folder in ["csrc", "ganlab"]:
        shutil.copytree(os.path.join(REPO, folder), tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    assert list(tmp_path.glob("_ganlab_C*.so")), "setup.py built no _ganlab_C*.so"
    check = subprocess.run([sys.executable, "-c", AOT_CHECK], cwd=tmp_path, capture_output=True, text=True,
                           timeout=300)
    assert check.returncode == 0 and check.stdout.strip().endswith("ok"), check.stderr[-2000:]


LAUNCH_ERRORS_PROGRAM = r"""
#include <cstdio>
#include "kernels.h"
// no GPU is needed: an unknown dtype code is refused before any launch, and naming an error
// is a lookup in the CUDA runtime
int main() {
  int refused = ganlab::launch_warp_batch(nullptr, 1, 1, 1, nullptr, nullptr, 1, 1, 1, 0, nullptr, 99, nullptr);
  std::printf("%d|%s|%s\n", refused, ganlab::cuda_error_name(refused), ganlab::cuda_error_text(refused));
  std::printf("%s|%s\n", ganlab::cuda_error_name(9), ganlab::cuda_error_text(9));
}
"""


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_kernels_compile_and_name_launch_errors(tmp_path):
    # the kernels compile for sm_80 with no warning (sm_90 and torch's nvcc flags: the next
    # test), and a launch error is reported by its name and text, not as a bare number
    (tmp_path / "main.cu").write_text(LAUNCH_ERRORS_PROGRAM)
    cmd = ["nvcc", "-std=c++17", "-O3", f"-I{os.path.join(REPO, 'csrc')}", str(tmp_path / "main.cu"),
           os.path.join(REPO, "csrc", "augment_kernels.cu"), "-o", str(tmp_path / "errors"),
           "-gencode=arch=compute_80,code=sm_80"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr.lower(), result.stderr
    run = subprocess.run([str(tmp_path / "errors")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    # cudaError_t 1 and 9, as the CUDA runtime API documents them
    assert run.stdout.splitlines() == ["1|cudaErrorInvalidValue|invalid argument",
                                       "cudaErrorInvalidConfiguration|invalid configuration argument"]


@pytest.mark.parametrize("version", [compile_cuda_headers.OLDEST_TORCH, "installed"])
def test_sources_compile_against_torch(version):
    # the CUDA host file, the CPU file and the kernels against the headers of the oldest torch
    # the README promises (fetched once with pip into ~/.cache/ganlab-ci; .ci/run fetches
    # them before pytest) and of the installed one: a GPU user's JIT build compiles them so
    if compile_cuda_headers.cuda_home() is None:
        pytest.skip("no CUDA toolkit (nvcc): the CUDA host file needs the CUDA runtime's headers")
    if version != "installed":
        try:
            compile_cuda_headers.fetch_torch_headers(version)
        except Exception as error:
            pytest.skip(f"the headers of torch {version} cannot be had here ({error}); "
                        f"python tests/compile_cuda_headers.py --fetch-only fetches them")
    results = compile_cuda_headers.check(version)
    failed = [f"{label}:\n{output}" for label, ok, output in results if not ok]
    assert not failed, "\n".join(failed)


# ----------------------------------------------------------------------------- CUDA

@needs_cuda
@pytest.mark.parametrize("padding", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_warp_equals_cpu_and_grid_sample(padding, dtype):
    for in_size, out_size in [(32, 32), (96, 64), (96, 96)]:
        bank, index, theta = random_inputs(9, in_size, 33, seed=padding)
        gpu = torch.ops.ganlab.warp_batch(bank.cuda(), index.cuda(), theta.cuda(), out_size, out_size, padding, dtype)
        cpu = torch.ops.ganlab.warp_batch(bank, index, theta, out_size, out_size, padding, dtype)
        torch.testing.assert_close(gpu.cpu().float(), cpu.float(), atol=TOLERANCE[dtype], rtol=0)
        mode = list(fused_op.PADDING_MODES)[padding]
        oracle = fused_op.warp_batch_reference(bank.cuda(), index.cuda(), theta.cuda(), out_size, mode)
        torch.testing.assert_close(gpu.float(), oracle, atol=TOLERANCE[dtype], rtol=0)


@needs_cuda
def test_cuda_kernels_loaded_and_used():
    # on a GPU machine with nvcc the CUDA kernels must have been built: no silent fallback
    assert fused_op._has_kernel("cuda"), "the extension loaded without its CUDA kernels"

    def no_reference(*args, **kwargs):
        raise AssertionError("the reference ran although the compiled op has a CUDA kernel")

    bank, index, theta = random_inputs(4, 8, 3, seed=0, device="cuda")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fused_op, "warp_batch_reference", no_reference)
        patch.setattr(fused_op, "diff_augment_reference", no_reference)
        x = fused_op.warp_batch(bank, index, theta, 8)
        fused_op.diff_augment(x, params_for(x, seed=0))


@needs_cuda
def test_cuda_without_cuda_kernels_falls_back(monkeypatch):
    # as on a CUDA build of torch with no nvcc: the extension has CPU kernels only
    monkeypatch.setitem(fused_op._state, "kernel_devices", frozenset({"cpu"}))
    bank, index, theta = random_inputs(4, 8, 3, seed=0, device="cuda")
    out = fused_op.warp_batch(bank, index, theta, 8)
    torch.testing.assert_close(out, fused_op.warp_batch_reference(bank, index, theta, 8))


@needs_cuda
def test_cuda_torch_compile_fullgraph(fresh_dynamo):
    bank, index, theta = random_inputs(4, 16, 6, seed=9, device="cuda")
    p = params_for(torch.randn(6, 3, 16, 16, device="cuda"), seed=9)
    graphs = []
    out = compile_recording_graphs(augment_step, graphs)(bank, index, theta, p)
    (called,) = graphs
    assert {"ganlab.warp_batch", "ganlab.diffaug"} <= called, called
    torch.testing.assert_close(out, augment_step(bank, index, theta, p))
    compiled = torch.compile(augment_step, fullgraph=True)  # inductor, as a user would
    torch.testing.assert_close(compiled(bank, index, theta, p), augment_step(bank, index, theta, p))


@needs_cuda
def test_cuda_bad_index():
    bank, index, theta = random_inputs(4, 8, 3, seed=0, device="cuda")
    bad = torch.tensor([0, 9, 1], device="cuda")
    with pytest.raises(IndexError, match="index values must be in"):
        fused_op.warp_batch(bank, bad, theta, 8)
    out = fused_op.warp_batch(bank, bad, theta, 8, check_index=False)  # no read outside the bank
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2]]).all()
    with pytest.raises(RuntimeError, match="must be on one device"):
        torch.ops.ganlab.warp_batch(bank, index.cpu(), theta, 8, 8, 0, torch.float32)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_cuda_diffaug_equals_cpu(dtype):
    x = (torch.rand(17, 3, 64, 64) * 2 - 1).to(dtype)
    p = params_for(x, seed=3)
    pc = DiffAugParams(*(t.cuda() for t in p))
    torch.testing.assert_close(fused_op.diff_augment(x.cuda(), pc).cpu().float(),
                               fused_op.diff_augment(x, p).float(),
                               atol=1e-5 if dtype != torch.bfloat16 else 0.02, rtol=0)
    g = torch.randn_like(x)
    torch.testing.assert_close(torch.ops.ganlab.diffaug_backward(g.cuda(), *pc[1:]).cpu().float(),
                               torch.ops.ganlab.diffaug_backward(g, *p[1:]).float(),
                               atol=1e-5 if dtype != torch.bfloat16 else 0.02, rtol=0)


@needs_cuda
def test_cuda_gradcheck_and_opcheck():
    x = torch.randn(3, 3, 6, 7, dtype=torch.float64, device="cuda", requires_grad=True)
    p = params_for(x, seed=11)
    assert torch.autograd.gradcheck(lambda t: torch.ops.ganlab.diffaug(t, *p), (x,))
    assert torch.autograd.gradgradcheck(lambda t: torch.ops.ganlab.diffaug(t, *p), (x,))
    torch.library.opcheck(torch.ops.ganlab.diffaug, (x, *p))
    torch.library.opcheck(torch.ops.ganlab.diffaug_backward, (x, *p[1:]))
    bank, index, theta = random_inputs(4, 12, 5, seed=7, device="cuda")
    torch.library.opcheck(torch.ops.ganlab.warp_batch, (bank, index, theta, 10, 8, 2, torch.bfloat16))
