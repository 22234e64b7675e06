"""Benchmarks: every speed figure in the README comes from this script.

    python bench.py                 # all sections on the default device (cuda if present)
    python bench.py --only op       # just the fused op
    python bench.py --device cpu

Ratios are measured in one process against named baselines (DESIGN.md, "Performance"),
never across machines:

  op      the fused warp_batch (uint8 bank -> augmented float batch) against the chain of
          PyTorch ops it replaces (index, float, affine_grid, grid_sample, normalize) and
          against a per-sample Pillow pipeline in a DataLoader with workers, as a
          torchvision-style input pipeline runs it; on a GPU also against the physical
          floor (bytes moved / measured device-to-device copy bandwidth). DiffAugment
          forward + backward, fused against its reference.
"""

import argparse
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import augment

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device to measure on")
parser.add_argument("--only", default="op", help="comma-separated sections to run: op")
parser.add_argument("--batch-size", type=int, default=256, help="images per batch")
parser.add_argument("--seconds", type=float, default=2.0, help="time spent measuring each row (after warm-up)")


def measure(fn, device, seconds):
    """Calls per second of fn() in steady state (warm-up excluded, GPU work waited for)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        fn()
    sync()
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        if calls % 5 == 0:
            sync()
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return calls / elapsed


def print_table(title, rows):
    print(f"\n{title}")
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        print("  " + "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            print("  " + "  ".join("-" * w for w in widths))


# -----------------------------------------------------------------------------
# op: the data path


class PillowAugmentDataset(torch.utils.data.Dataset):
    """The baseline input pipeline: per sample, an image from the uint8 bank through Pillow
    (flip, affine crop/scale/rotation, resize), to a tensor, normalized."""

    def __init__(self, bank, size, seed):
        self.images = bank.permute(0, 2, 3, 1).numpy()  # (N, H, W, 3) as Pillow wants
        self.size = size
        self.seed = seed

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        rng = np.random.default_rng((self.seed, i))
        image = Image.fromarray(self.images[i])
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        # random zoom, rotation and shift, as one inverse affine map (output -> input pixels)
        H, W = self.images.shape[1:3]
        zoom, angle = rng.uniform(0.9, 1.1), np.radians(rng.uniform(-10, 10))
        dx, dy = rng.uniform(-0.1, 0.1, 2) * (W, H)
        cos, sin = np.cos(angle) / zoom, np.sin(angle) / zoom
        cx, cy = W / 2, H / 2
        coefficients = (cos, -sin, cx - cos * cx + sin * cy + dx, sin, cos, cy - sin * cx - cos * cy + dy)
        image = image.transform((W, H), Image.Transform.AFFINE, coefficients, Image.Resampling.BILINEAR)
        image = image.resize((self.size, self.size), Image.Resampling.BILINEAR)
        tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)  # to_tensor
        return (tensor - 0.5) / 0.5  # normalize to [-1, 1]


def bench_op(args, device):
    B = args.batch_size
    g = torch.Generator().manual_seed(0)
    rows = [("workload / pipeline", "images/s", "vs chain", "vs Pillow")]
    extra = []
    for in_size, out_size, n in [(32, 32, 20000), (96, 64, 5000)]:
        bank = torch.randint(0, 256, (n, 3, in_size, in_size), dtype=torch.uint8, generator=g)
        bank_dev = bank.to(device)
        index = torch.randint(0, n, (B,), generator=g).to(device)
        theta = augment.random_affine(B, flip=0.5, translate=0.1, scale=(0.9, 1.1), rotate=10, generator=g).to(device)

        fused = measure(lambda: augment.warp_batch(bank_dev, index, theta, out_size, check_index=False), device, args.seconds) * B
        chain = measure(lambda: augment.warp_batch_reference(bank_dev, index, theta, out_size), device, args.seconds) * B

        loader = torch.utils.data.DataLoader(PillowAugmentDataset(bank, out_size, seed=1), batch_size=B, shuffle=True,
                                             num_workers=2, persistent_workers=True, drop_last=True)
        batches = iter(loader)
        pillow = measure(lambda: next(batches).to(device), device, args.seconds) * B
        del batches, loader

        name = f"{in_size}->{out_size}"
        rows.append((f"{name} fused warp_batch", f"{fused:,.0f}", f"{fused / chain:.1f}x", f"{fused / pillow:.1f}x"))
        rows.append((f"{name} chain of PyTorch ops", f"{chain:,.0f}", "1.0x", f"{chain / pillow:.1f}x"))
        rows.append((f"{name} Pillow + DataLoader(2 workers)", f"{pillow:,.0f}", "", "1.0x"))

        if device.type == "cuda":
            # the floor: bytes the op must move (uint8 images read + float32 batch written)
            # over the bandwidth of a plain device-to-device copy measured now
            src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
            dst = torch.empty_like(src)
            copy_bandwidth = measure(lambda: dst.copy_(src), device, args.seconds) * 2 * src.numel()
            del src, dst
            moved = B * 3 * (in_size * in_size + out_size * out_size * 4)
            extra.append((f"{name} fused", f"{fused * moved / B / 1e9:,.0f} GB/s",
                          f"{copy_bandwidth / 1e9:,.0f} GB/s", f"{fused * moved / B / copy_bandwidth:.0%}"))

    # DiffAugment on a generated batch, forward + backward
    for size in (32, 64):
        x = torch.randn(B, 3, size, size, device=device, requires_grad=True)
        p = augment.random_diffaug(B, size, size, generator=g, device=device)
        fused = measure(lambda: augment.diff_augment(x, p).sum().backward(), device, args.seconds) * B
        chain = measure(lambda: augment.diff_augment_reference(x, p).sum().backward(), device, args.seconds) * B
        rows.append((f"DiffAugment {size}x{size} fwd+bwd fused", f"{fused:,.0f}", f"{fused / chain:.1f}x", ""))
        rows.append((f"DiffAugment {size}x{size} fwd+bwd reference", f"{chain:,.0f}", "1.0x", ""))

    print_table(f"fused op, batch {B}, on {describe(device)}", rows)
    if extra:
        print_table("fused warp_batch against the copy-bandwidth floor",
                    [("workload", "achieved", "D2D copy", "fraction")] + extra)


def describe(device):
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads), torch {torch.__version__}"


def main():
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"extension: {'C++/CUDA' if augment.load_extension() else 'reference fallback'}")
    sections = {"op": bench_op}
    for name in args.only.split(","):
        if name not in sections:
            raise SystemExit(f"bench.py: unknown section {name!r}; choose from {', '.join(sections)}")
        sections[name](args, device)


if __name__ == "__main__":
    main()
