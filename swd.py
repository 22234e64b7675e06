"""
Sliced Wasserstein distance (SWD) between two sets of images: how far the local statistics
of generated images are from those of real ones, at every scale. Needs no pretrained network,
so it runs offline on any images; we use it to compare runs (augmentation on and off, one
objective against another) where the Inception weights are not at hand.

    python swd.py out/dcgan-anime/samples ../shared/data/anime-faces    # at the samples' size
    python swd.py out/dcgan-anime/samples anime --json out/dcgan-anime/swd.json
    python swd.py anime anime --reference-offset 10000        # real against real: the noise floor

Each argument is anything data.py reads: a folder or zip of images (1.png ... N.png, JPEGs),
an .hdf5/.pkl file, or a dataset name (shapes, lld, anime). The last line printed is

    SWD x 1e3: 32px 5.12, 16px 7.80, average 6.46  (10000 vs 10000 images)

Lower is closer; two samples of the same distribution score a few units (the estimate's own
noise), a generator that has not learned anything scores in the hundreds. Compare figures
made with the same settings (image size, image count, patches), never across those.

What is computed (Karras et al. 2018, "Progressive Growing of GANs", appendix D):

  1. A Laplacian pyramid of each image, from full size down to 16 x 16: with blur = the
     5 x 5 binomial filter [1 4 6 4 1]^T [1 4 6 4 1] / 256 (mirror padding),
         down(x) = blur(x)[::2, ::2],    up(x) = 4 blur(x with zeros between its pixels),
         level_k = g_k - up(g_{k+1}),  g_0 = the image, g_{k+1} = down(g_k);
     the smallest level is g itself (its colours).
  2. From each level, `patches` random 7 x 7 x 3 neighbourhoods per image: descriptors of
     147 numbers, each channel normalized by its mean and standard deviation over the set.
  3. Per level, the sliced Wasserstein-1 distance between the two sets of descriptors: for
     random unit directions d (4 rounds of 128), project both sets on d, sort, and average
     |sorted_a - sorted_b| (the 1-D Wasserstein distance between equal-size samples); the
     mean over directions, times 1e3 as the paper reports it.
"""

import argparse
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

import data

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("images", help="generated images: folder, zip, .hdf5/.pkl, or a dataset name")
parser.add_argument("reference", help="real images, the same kinds")
parser.add_argument("--image-size", type=int, default=None, help="side both sets are resized to; if not given: the first set's own (its first image's)")
parser.add_argument("--data-root", default=None, help="folder that holds the named datasets; if not given: data.py's")
parser.add_argument("--max-images", type=int, default=10000, help="use the first N images of each set (the smaller count decides)")
parser.add_argument("--reference-offset", type=int, default=0, help="skip the reference's first N images: with the same set twice, the SWD of two disjoint parts (the noise floor)")
parser.add_argument("--patches", type=int, default=64, help="7x7 neighbourhoods drawn per image and pyramid level")
parser.add_argument("--seed", type=int, default=0, help="seed of the patch positions and directions")
parser.add_argument("--json", default=None, help="also write the figures to this JSON file")

PATCH = 7  # side of a neighbourhood
SMALLEST_LEVEL = 16  # the pyramid stops at 16 x 16
BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16  # the 1-D blur; 2-D is its outer product


def blur(x):
    """x (N, C, H, W) float -> the same, filtered by the 5x5 binomial kernel, mirror padding."""
    C = x.shape[1]
    kernel = torch.outer(BINOMIAL, BINOMIAL).to(x)[None, None].expand(C, 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), kernel, groups=C)  # reflect = scipy's 'mirror'


def pyramid_down(x):
    """(N, C, H, W) -> (N, C, H/2, W/2): blur, keep every second pixel."""
    return blur(x)[:, :, ::2, ::2]


def pyramid_up(x):
    """(N, C, H, W) -> (N, C, 2H, 2W): pixels spread onto a grid of zeros, blurred, times 4
    (each output pixel receives a quarter of the kernel's weight)."""
    N, C, H, W = x.shape
    spread = x.new_zeros(N, C, 2 * H, 2 * W)
    spread[:, :, ::2, ::2] = x
    return 4 * blur(spread)


def laplacian_pyramid(x):
    """x (N, C, S, S) float -> [level_0 (S), level_1 (S/2), ..., g (16)]; their collapse,
    level_k + up(level_{k+1} + up(...)), gives x back exactly (up to float rounding)."""
    levels = []
    while x.shape[-1] > SMALLEST_LEVEL and x.shape[-1] % 2 == 0:
        smaller = pyramid_down(x)
        levels.append(x - pyramid_up(smaller))
        x = smaller
    levels.append(x)
    return levels


def descriptors(level, patches, generator):
    """Random 7x7 neighbourhoods of a pyramid level (N, C, S, S) -> (N * patches, C * 49),
    each channel normalized to mean 0 and standard deviation 1 over all neighbourhoods."""
    N, C, S, _ = level.shape
    y = torch.randint(0, S - PATCH + 1, (N, patches, 1, 1), generator=generator)
    x = torch.randint(0, S - PATCH + 1, (N, patches, 1, 1), generator=generator)
    offsets = torch.arange(PATCH)
    rows, cols = y + offsets[:, None], x + offsets[None, :]  # (N, patches, 7, 1), (N, patches, 1, 7)
    image = torch.arange(N)[:, None, None, None]
    d = level.permute(0, 2, 3, 1)[image, rows, cols]  # (N, patches, 7, 7, C)
    d = d - d.mean(dim=(0, 1, 2, 3))
    d = d / d.std(dim=(0, 1, 2, 3)).clamp_min(1e-8)
    return d.reshape(N * patches, PATCH * PATCH * C)


def sliced_wasserstein(a, b, directions):
    """Mean over the unit directions (D, K) of the 1-D Wasserstein-1 distance between the
    projections of a (M, K) and b (M, K): sort both, average the absolute differences."""
    # (D, M): one row per direction, sorted; numpy's sort (SIMD) is several times torch's here
    projected_a = np.sort((directions @ a.T).numpy(), axis=1)
    projected_b = np.sort((directions @ b.T).numpy(), axis=1)
    return float(np.abs(projected_a - projected_b).mean(dtype=np.float64))


def swd(images, reference, patches=64, seed=0, rounds=4, directions_per_round=128):
    """SWD x 1e3 per pyramid level between two uint8 (N, 3, S, S) tensors of equal size and
    count: {side in pixels: distance}, plus 'average'."""
    if images.shape != reference.shape:
        raise ValueError(f"swd: the two sets must have the same shape, got {tuple(images.shape)} and {tuple(reference.shape)}")
    if images.shape[-1] < PATCH or images.shape[-2] != images.shape[-1]:
        raise ValueError(f"swd: images must be square and at least {PATCH}x{PATCH}, got {tuple(images.shape[2:])}")
    generator = torch.Generator().manual_seed(seed)
    pyramids = [laplacian_pyramid(x.float()) for x in (images, reference)]
    result = {}
    for level_a, level_b in zip(*pyramids):
        a, b = descriptors(level_a, patches, generator), descriptors(level_b, patches, generator)
        distances = []
        for _ in range(rounds):
            d = torch.randn(directions_per_round, a.shape[1], generator=generator)
            distances.append(sliced_wasserstein(a, b, d / d.norm(dim=1, keepdim=True)))
        result[level_a.shape[-1]] = 1e3 * float(np.mean(distances))
    result["average"] = float(np.mean(list(result.values())))
    return result


def load(name_or_path, size, root, limit, offset=0):
    x = data.load_images(name_or_path, root=root, size=size)
    return x[offset:offset + limit]


def main(argv=None):
    args = parser.parse_args(argv)
    try:
        size = args.image_size or data.native_size(args.images, args.data_root)
        images = load(args.images, size, args.data_root, args.max_images)
        reference = load(args.reference, images.shape[-1], args.data_root, args.max_images, args.reference_offset)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    count = min(len(images), len(reference))
    if count < 2:
        parser.error(f"need at least 2 images in each set, got {len(images)} and {len(reference)}")
    if args.reference_offset < 0:
        parser.error("--reference-offset must be >= 0")
    if args.patches < 1:
        parser.error("--patches must be at least 1")
    if images.shape[-1] < PATCH:
        parser.error(f"--image-size must be at least {PATCH}")
    result = swd(images[:count], reference[:count], patches=args.patches, seed=args.seed)
    if args.json:
        temporary = args.json + ".tmp"
        with open(temporary, "w") as f:
            json.dump({"images": args.images, "reference": args.reference, "count": count,
                       "image_size": images.shape[-1], "patches": args.patches, "seed": args.seed,
                       "swd_x1e3": {str(k): v for k, v in result.items()}}, f, indent=2)
        os.replace(temporary, args.json)
    per_level = ", ".join(f"{k}px {v:.2f}" for k, v in result.items() if k != "average")
    print(f"SWD x 1e3: {per_level}, average {result['average']:.2f}  ({count} vs {count} images)")
    return result


if __name__ == "__main__":
    main()
