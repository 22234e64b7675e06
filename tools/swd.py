"""
Sliced Wasserstein distance (SWD) between two sets of images: how far the local statistics
of generated images are from those of real ones, at every scale. Needs no pretrained network,
so it runs offline on any images; we use it to compare runs (augmentation on and off, one
objective against another) where the Inception weights are not at hand.

    python tools/swd.py out/dcgan-anime/samples ../shared/data/anime-faces    # at the samples' size
    python tools/swd.py out/dcgan-anime/samples anime --json out/dcgan-anime/swd.json
    python tools/swd.py anime anime --reference-offset 10000        # real against real: the noise floor

Each argument is anything data.py reads: a folder or zip of images (1.png ... N.png, JPEGs),
an .hdf5/.pkl file, or a dataset name (shapes, lld, anime). The last line printed is

    SWD x 1e3: 32px 5.12, 16px 7.80, average 6.46  (10000 vs 10000 images)

Lower is closer; two samples of the same distribution score a few units (the estimate's own
noise), a generator that has not learned anything scores in the hundreds. Compare figures
made with the same settings (image size, image count, patches), never across those.

Every flag is checked before anything is loaded (--json first: a folder, a path under a file or
one of the inputs is refused); only the first --max-images of each set are made or read; a run
whose --patches cannot fit in memory is refused before it starts; the score is printed before
--json is written (atomically), so a failing write loses nothing.

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
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

from ganlab import data
from ganlab import flags
from ganlab.outputs import write_json

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("images", help="generated images: folder, zip, .hdf5/.pkl, or a dataset name")
parser.add_argument("reference", help="real images, the same kinds")
parser.add_argument("--image-size", type=flags.positive_int, default=None,
                    help="side both sets are resized to (at least 7); "
                         "if not given: the first set's own (its first image's)")
parser.add_argument("--data-root", default=None, help="folder that holds the named datasets; if not given: data.py's")
parser.add_argument("--max-images", type=flags.positive_int, default=10000,
                    help="use the first N images of each set (the smaller count decides; at least 2)")
parser.add_argument("--reference-offset", type=flags.nonnegative_int, default=0,
                    help="skip the reference's first N images: with the same set twice, "
                         "the SWD of two disjoint parts (the noise floor)")
parser.add_argument("--patches", type=flags.positive_int, default=64,
                    help="7x7 neighbourhoods drawn per image and pyramid level")
parser.add_argument("--seed", type=flags.seed, default=0, help="seed of the patch positions and directions")
parser.add_argument("--json", default=None,
                    help="also write the figures to this JSON file (checked before the computation)")

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
        raise ValueError(f"swd: the two sets must have the same shape, "
                         f"got {tuple(images.shape)} and {tuple(reference.shape)}")
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


def memory_needed(count, size, patches):
    """Bytes swd() holds at its peak for two sets of `count` images of size x size: per pixel of both
    sets, ~24 bytes of float pyramids and filter temporaries; per 7x7 neighbourhood drawn (count x
    patches per set and level), ~3,300 bytes: both sets' descriptors (147 floats each), the gather's
    indices, and the 128 sorted projections of a round. Both constants are measured (peak RSS of
    swd() on random images: 3,195 bytes per neighbourhood from 102,400 to 409,600 of them; 23 bytes
    per pixel at 2,000 images of 64x64), with some room."""
    return 2 * count * 3 * size * size * 24 + count * patches * 3300


def too_small(side, given):
    """The error for images smaller than a neighbourhood, naming what decided their size."""
    if given:
        return f"--image-size must be at least {PATCH} (SWD compares {PATCH}x{PATCH} neighbourhoods), got {side}"
    return (f"the images are {side}x{side} (their own size, as no --image-size was given), smaller than SWD's "
            f"{PATCH}x{PATCH} neighbourhoods: pass --image-size 16 (or more) to resize both sets")


def main(argv=None):
    args = parser.parse_args(argv)
    # every check that needs no images first: nothing is loaded or computed for a run that cannot finish
    for name, value in (("the images argument", args.images), ("the reference argument", args.reference)):
        if not value:
            parser.error(f"{name} is empty: give a folder, zip, .hdf5/.pkl file or a dataset name")
    if args.max_images < 2:
        parser.error(f"--max-images must be at least 2 (SWD compares two sets of images), got {args.max_images}")
    if args.image_size is not None and args.image_size < PATCH:
        parser.error(too_small(args.image_size, given=True))
    try:
        if args.json is not None:
            flags.check_output_file(args.json, "--json")
            for name in (args.images, args.reference):
                if os.path.isfile(name) and os.path.samefile(name, args.json):
                    parser.error(f"--json {args.json} is the input {name}: it would be overwritten; give another file")
        size = args.image_size or data.native_size(args.images, args.data_root)
        if size is not None and size < PATCH:
            parser.error(too_small(size, given=False))
        # only the images used are made or read: the first --max-images (after --reference-offset)
        images = data.load_images(args.images, root=args.data_root, size=size, limit=args.max_images)
        if images.shape[-1] < PATCH:  # an .hdf5/.pkl file's own size, known once it is read
            parser.error(too_small(images.shape[-1], given=False))
        reference = data.load_images(args.reference, root=args.data_root, size=images.shape[-1],
                                     limit=args.reference_offset + args.max_images)[args.reference_offset:]
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    if len(images) < 2:
        parser.error(f"{args.images}: need at least 2 images, found {len(images)}")
    if len(reference) < 2:
        skipped = f" after --reference-offset {args.reference_offset}" if args.reference_offset else ""
        parser.error(f"{args.reference}: need at least 2 images{skipped}, found {len(reference)}")
    count = min(len(images), len(reference))
    need, have = memory_needed(count, images.shape[-1], args.patches), data.memory_bytes()
    if need > have:
        parser.error(f"--patches {args.patches} for {count:,} images of {images.shape[-1]}x{images.shape[-1]} "
                     f"needs about {data.format_bytes(need)} of memory; this machine has {data.format_bytes(have)}: "
                     f"use fewer --patches or --max-images")
    result = swd(images[:count], reference[:count], patches=args.patches, seed=args.seed)
    # the score first: if writing the file fails after all, the result is not lost
    per_level = ", ".join(f"{k}px {v:.2f}" for k, v in result.items() if k != "average")
    print(f"SWD x 1e3: {per_level}, average {result['average']:.2f}  ({count} vs {count} images)", flush=True)
    if args.json is not None:
        try:
            write_json(args.json, {"images": args.images, "reference": args.reference, "count": count,
                                   "image_size": images.shape[-1], "patches": args.patches, "seed": args.seed,
                                   "swd_x1e3": {str(k): v for k, v in result.items()}})
        except OSError as error:
            sys.exit(f"swd.py: the score above was not written to --json {args.json}: {error}")
    return result


if __name__ == "__main__":
    main()
