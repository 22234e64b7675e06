"""
Mode coverage on the built-in shapes: which of the set's 36 modes a generator's samples cover,
how evenly, and how many samples are recognisable at all. Needs no download: a small classifier
is trained on the built-in set's own labels (seconds on a CPU) and cached.

    python tools/modes.py out/dcgan-shapes/samples                 # a folder of 1.png ... N.png, or a zip
    python tools/modes.py out/dcgan-shapes/samples --json out/dcgan-shapes/modes.json
    python tools/modes.py shapes --max-images 2000                 # real icons: the top of every scale
    python tools/modes.py out/dcgan-shapes/grids --grids           # each per-epoch grid (64 samples), in step order

The last line printed is

    modes: recognised 100.0%, covered 36/36, KL 0.009, named 100.0%  (2000 images)
    (python tools/modes.py shapes --max-images 2000)

The Stacked MNIST measure of the GAN literature (Metz et al. 2017; Srivastava et al. 2017,
VEEGAN; Lin et al. 2018, PacGAN), on the built-in icons. Every icon is one of 4 shapes x 3 mark
colours x 3 backgrounds = 36 modes, each 1/36 of the data (data.make_shapes). For N samples:

  recognised  the share the classifier names confidently: each of its three answers (shape,
              colour, background) has probability >= 0.9, and the shape is not "no icon".
              A quality measure: noise, colour fields, blurred blobs and blends of two icons fail it.
  covered     how many of the 36 modes at least one recognised sample falls in.
  KL          KL(p || q) = sum_m p_m log(p_m / q_m) in nats, p the recognised samples' mode
              histogram, q the data's (uniform, 1/36). 0 for a generator that spreads its
              samples over the modes as the data does; log 36 = 3.58 for one that makes a
              single mode. N real icons score about (36 - 1) / (2 N), the estimate's own bias.
  named       a measure that allows blur (a VAE's samples are blurred by design): the share
              whose background is one of the set's three, read from the pixels (the median
              colour of the 2-pixel border within 40 levels, RGB distance, of white, black or
              yellow), and whose shape the classifier names among the four with probability
              >= 0.9 when "no icon" is left out. Blends of two backgrounds, wrong background
              colours and noise fail it; a blurred disc on yellow passes.

The classifier: three 3x3 convolutions (16, 32, 64 channels, each followed by a 2x2 max pool)
and a hidden layer of 128, with three heads: shape (4 shapes + "no icon"), mark colour,
background. It is trained on 12,000 icons of seeds the GAN scripts never use, mildly perturbed
(blur up to a pixel, noise, colour shifts: what a good generator's samples look like), and on
6,000 non-icons labelled "no icon": noise, smooth colour fields, icons blurred by 3 pixels,
blends of two icons. Its held-out accuracy (2,000 new icons; 1,000 new non-icons, rejected) is
printed when it is trained and stored beside its weights: in our run 100.00% of the icons' modes
right, 100.00% recognised, 99.40% of the non-icons rejected (tests/test_modes.py requires >= 99%,
>= 98%, >= 97%); training took 17 s on two idle cores. The cache file goes to --cache-dir, else
$GANLAB_CACHE, else $XDG_CACHE_HOME/ganlab or ~/.cache/ganlab, written atomically; its name
carries a hash of the set's definition, so a changed data.make_shapes trains a new one.
"""

import argparse
import hashlib
import inspect
import math
import os
import re
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from ganlab import data
from ganlab.outputs import atomic_write, write_json

parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("images", help="samples: a folder or zip of images, an .hdf5/.pkl file, or 'shapes' (real icons)")
parser.add_argument("--max-images", type=int, default=10000, help="score the first N images")
parser.add_argument("--data-root", default=None, help="folder that holds the named datasets; if not given: data.py's")
parser.add_argument("--cache-dir", default=None,
                    help="where the classifier is kept; if not given: $GANLAB_CACHE, else ~/.cache/ganlab")
parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
parser.add_argument("--grids", action="store_true",
                    help="images is a folder of sample grids (icons with 2-pixel gaps, as the scripts write "
                         "grids/epoch-*-step-*.png): score each grid on its own, ordered by the numbers in the names")

VERSION = 1  # bump when the classifier or its training changes: the cache key includes it
SIZE = 32  # the classifier's input side; other sizes are resized by data.load_images
CONFIDENCE = 0.9  # each head's top probability must reach this for a sample to count as recognised
NO_ICON = len(data.SHAPES)  # the shape head's extra class
TRAIN_SEED = 1000  # icons of seeds 1000 and up: the GAN scripts train on seed 0
MODES = len(data.SHAPES) * len(data.MARK_COLOURS) * len(data.BACKGROUNDS)
BACKGROUND_TOLERANCE = 40  # levels (RGB distance) from a background colour for "named"


def mode_of(shape, colour, background):
    """(shape, colour, background) indices -> mode index in 0 .. MODES - 1."""
    return (shape * len(data.MARK_COLOURS) + colour) * len(data.BACKGROUNDS) + background


def mode_name(mode):
    """Mode index -> e.g. 'red disc on black'."""
    mode, background = divmod(mode, len(data.BACKGROUNDS))
    shape, colour = divmod(mode, len(data.MARK_COLOURS))
    return f"{list(data.MARK_COLOURS)[colour]} {data.SHAPES[shape]} on {list(data.BACKGROUNDS)[background]}"


# -----------------------------------------------------------------------------
# the classifier


class Classifier(nn.Module):
    """uint8 or float icons (B, 3, 32, 32) -> logits (shape + no icon (B, 5), colour (B, 3), background (B, 3))."""

    def __init__(self):
        super().__init__()

        def block(c_in, c_out):  # (B, c_in, s, s) -> (B, c_out, s/2, s/2)
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*block(3, 16), *block(16, 32), *block(32, 64),  # (B, 64, 4, 4)
                                      nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(inplace=True))
        self.shape = nn.Linear(128, len(data.SHAPES) + 1)
        self.colour = nn.Linear(128, len(data.MARK_COLOURS))
        self.background = nn.Linear(128, len(data.BACKGROUNDS))

    def forward(self, x):
        h = self.features(x.float() / 127.5 - 1)  # pixels p -> p/127.5 - 1, as the GANs see them
        return self.shape(h), self.colour(h), self.background(h)


def gaussian_blur(x, sigma):
    """Float images (B, 3, H, W) -> blurred by a Gaussian of sigma pixels, reflect padding.
    Separable: the 1-D kernel exp(-t^2 / 2 sigma^2), normalized, along rows then along columns."""
    radius = math.ceil(3 * sigma)
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-t ** 2 / (2 * sigma ** 2))
    kernel = (kernel / kernel.sum()).expand(3, 1, 1, 2 * radius + 1)  # one per channel (groups=3)
    y = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, kernel, groups=3)  # along rows
    return F.conv2d(y, kernel.transpose(2, 3), groups=3)  # along columns


def perturbed_icons(n, seed, generator):
    """n icons with their labels, each mildly perturbed as a good generator's samples are: a blur
    (a random mix of the icon and its blur by sigma = 1 px), Gaussian noise of 0..8 grey levels,
    a colour shift of up to 15 levels per channel. -> (uint8 (n, 3, 32, 32), shape, colour, background (int64 (n,)))."""
    icons, labels = data.make_shapes(n, SIZE, seed, labels=True)
    x = torch.from_numpy(icons).float()
    x = torch.lerp(x, gaussian_blur(x, 1.0), torch.rand(n, 1, 1, 1, generator=generator))
    x = x + torch.randn(x.shape, generator=generator) * 8 * torch.rand(n, 1, 1, 1, generator=generator)
    x = x + (torch.rand(n, 3, 1, 1, generator=generator) * 2 - 1) * 15
    return (x.round().clamp(0, 255).to(torch.uint8),
            *(torch.from_numpy(labels[k]) for k in ("shape", "colour", "background")))


def non_icons(n, seed, generator):
    """n images that are no icon, a quarter of each kind: uniform noise; smooth colour fields
    (noise at 4x4, upsampled bicubically); icons blurred by sigma = 3 px (blobs); blends
    t a + (1 - t) b of two icons of different shapes, t in 0.35..0.65. -> uint8 (n, 3, 32, 32)."""
    k = n // 4
    noise = torch.rand(n - 3 * k, 3, SIZE, SIZE, generator=generator) * 255
    fields = F.interpolate(torch.rand(k, 3, 4, 4, generator=generator) * 255, size=SIZE, mode="bicubic",
                           align_corners=False)
    icons, labels = data.make_shapes(3 * k, SIZE, seed, labels=True)
    icons = torch.from_numpy(icons).float()
    blobs = gaussian_blur(icons[:k], 3.0)
    a, b = icons[k:2 * k], icons[2 * k:]
    differ = torch.from_numpy(labels["shape"][k:2 * k] != labels["shape"][2 * k:])
    b = torch.where(differ[:, None, None, None], b, b.flip(-2))  # same shape: the other upside down
    t = 0.35 + 0.3 * torch.rand(k, 1, 1, 1, generator=generator)
    blends = t * a + (1 - t) * b
    return torch.cat([noise, fields, blobs, blends]).round().clamp(0, 255).to(torch.uint8)


def train_classifier(steps=400, batch_size=128, seed=0, progress=True):
    """Train a Classifier from scratch (about 10-20 s on 2 CPU cores) -> (model, held-out accuracies)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    x, shape, colour, background = perturbed_icons(12000, TRAIN_SEED, generator)
    negatives = non_icons(6000, TRAIN_SEED + 1, generator)
    x = torch.cat([x, negatives])
    shape = torch.cat([shape, torch.full((len(negatives),), NO_ICON)])
    ignored = torch.full((len(negatives),), -100)  # cross_entropy's ignore_index: no colour for non-icons
    colour, background = torch.cat([colour, ignored]), torch.cat([background, ignored])

    model = Classifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    started = time.perf_counter()
    for step in range(steps):
        i = torch.randint(len(x), (batch_size,), generator=generator)
        flip = torch.rand(batch_size, generator=generator) < 0.5  # every shape here is mirror-symmetric
        batch = torch.where(flip[:, None, None, None], x[i].flip(-1), x[i])
        logits = model(batch)
        # the sum of the three heads' cross-entropies; colour and background only on icons
        loss = sum(F.cross_entropy(out, target[i]) for out, target in zip(logits, (shape, colour, background)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    accuracy = held_out_accuracy(model, generator)
    if progress:
        print(f"modes: trained the classifier in {time.perf_counter() - started:.0f} s; held out: "
              + ", ".join(f"{k} {100 * v:.2f}%" for k, v in accuracy.items()), file=sys.stderr)
    return model, accuracy


def held_out_accuracy(model, generator):
    """On 2,000 new clean icons: accuracy of each head, of the full mode, and the share recognised;
    on 1,000 new non-icons: the share rejected (not recognised)."""
    icons, labels = data.make_shapes(2000, SIZE, TRAIN_SEED + 2, labels=True)
    found = classify(model, torch.from_numpy(icons))
    truth = mode_of(*(torch.from_numpy(labels[k]) for k in ("shape", "colour", "background")))
    rejected = ~classify(model, non_icons(1000, TRAIN_SEED + 3, generator))["recognised"]
    return {"shape": (found["shape"] == torch.from_numpy(labels["shape"])).float().mean().item(),
            "colour": (found["colour"] == torch.from_numpy(labels["colour"])).float().mean().item(),
            "background": (found["background"] == torch.from_numpy(labels["background"])).float().mean().item(),
            "mode": (found["mode"] == truth).float().mean().item(),
            "recognised": found["recognised"].float().mean().item(),
            "non-icons rejected": rejected.float().mean().item()}


@torch.no_grad()
def classify(model, images, batch_size=500):
    """uint8 (N, 3, 32, 32) -> {'shape', 'colour', 'background', 'mode': int64 (N,);
    'recognised', 'named': bool (N,)}."""
    logits = [torch.cat(parts) for parts in zip(*(model(images[start:start + batch_size])
                                                   for start in range(0, len(images), batch_size)))]
    (shape_p, shape), (colour_p, colour), (background_p, background) = (
        F.softmax(head, dim=1).max(dim=1) for head in logits)
    recognised = (shape != NO_ICON) & (torch.stack([shape_p, colour_p, background_p]).min(0).values >= CONFIDENCE)
    # "named": the shape among the four alone (no "no icon"), the background from the border's pixels
    shape_only_p = F.softmax(logits[0][:, :NO_ICON], dim=1).max(dim=1).values
    named = (shape_only_p >= CONFIDENCE) & (border_background(images) >= 0)
    return {"shape": shape, "colour": colour, "background": background,
            "mode": mode_of(shape.clamp_max(NO_ICON - 1), colour, background), "recognised": recognised,
            "named": named}


def border_background(images):
    """uint8 (N, 3, H, W) -> (N,) int64: the index in data.BACKGROUNDS of the colour of each image's
    border (the per-channel median of its outer 2 pixels), -1 where that is more than
    BACKGROUND_TOLERANCE levels from all of them. Blur does not reach the border; blends do."""
    x = images.float()
    border = torch.cat([x[:, :, :2].flatten(2), x[:, :, -2:].flatten(2), x[:, :, 2:-2, :2].flatten(2),
                        x[:, :, 2:-2, -2:].flatten(2)], dim=2).median(dim=2).values  # (N, 3)
    distance, index = torch.cdist(border, torch.tensor(list(data.BACKGROUNDS.values()), dtype=torch.float32)).min(1)
    return torch.where(distance <= BACKGROUND_TOLERANCE, index, -1)


# -----------------------------------------------------------------------------
# the cache


def cache_path(cache_dir=None):
    """Where the classifier for this version of the set lives: its name hashes the set's definition
    (factors, colours, edge width and the source of the drawing functions) and VERSION."""
    folder = (cache_dir or os.environ.get("GANLAB_CACHE")
              or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ganlab"))
    definition = repr((VERSION, data.SHAPES, data.MARK_COLOURS, data.BACKGROUNDS, data.EDGE_PX,
                       inspect.getsource(data.make_shapes), inspect.getsource(data._draw_icons),
                       inspect.getsource(data._signed_distance)))
    return os.path.join(folder, f"modes-classifier-{hashlib.sha1(definition.encode()).hexdigest()[:16]}.pt")


def load_classifier(cache_dir=None, progress=True):
    """The cached classifier, or a newly trained one (then cached, atomically) -> (model, held-out accuracies)."""
    path = cache_path(cache_dir)
    model = Classifier()
    if os.path.exists(path):
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(saved["model"])
            return model.eval(), saved["accuracy"]
        except Exception as e:  # truncated or foreign file: train again, and replace it
            print(f"modes: cache {path} is unusable ({type(e).__name__}: {e}): training again", file=sys.stderr)
    if progress:
        print(f"modes: training the classifier once (cache: {path})", file=sys.stderr)
    model, accuracy = train_classifier(progress=progress)
    try:
        # atomically: a run that dies midway leaves no half-written cache
        atomic_write(path, lambda f: torch.save({"model": model.state_dict(), "accuracy": accuracy}, f))
    except OSError as e:  # read-only or full disk: the classifier works, only it is not kept
        print(f"modes: could not write {path}: {e}", file=sys.stderr)
    return model, accuracy


# -----------------------------------------------------------------------------
# the score


def score(images, model):
    """uint8 (N, 3, 32, 32) -> {'count', 'recognised' (share), 'covered' (modes), 'modes' (all),
    'kl' (nats; inf if nothing is recognised), 'histogram' (recognised samples per mode), 'named' (share)}."""
    found = classify(model, images)
    histogram = torch.bincount(found["mode"][found["recognised"]], minlength=MODES)
    recognised = int(histogram.sum())
    # KL(p || q) = sum_m p_m log(p_m / q_m), q_m = 1/MODES; empty modes add 0 (p log p -> 0)
    p = histogram.double() / max(recognised, 1)
    kl = float((p[p > 0] * torch.log(p[p > 0] * MODES)).sum()) if recognised else math.inf
    return {"count": len(images), "recognised": recognised / len(images), "covered": int((histogram > 0).sum()),
            "modes": MODES, "kl": kl, "histogram": histogram.tolist(), "named": found["named"].float().mean().item()}


def summary(result):
    return (f"modes: recognised {100 * result['recognised']:.1f}%, covered {result['covered']}/{result['modes']}, "
            f"KL {result['kl']:.3f}, named {100 * result['named']:.1f}%  ({result['count']} images)")


def grid_tiles(path, side=SIZE, padding=2):
    """A PNG grid written by outputs.save_grid (icons left to right, `padding` black pixels around
    each) -> uint8 (N, 3, side, side), its icons in order."""
    grid = np.asarray(Image.open(path).convert("RGB"))
    rows, columns = (grid.shape[0] - padding) // (side + padding), (grid.shape[1] - padding) // (side + padding)
    if rows < 1 or columns < 1 or grid.shape[:2] != (rows * (side + padding) + padding,
                                                      columns * (side + padding) + padding):
        raise ValueError(f"{path}: {grid.shape[1]}x{grid.shape[0]} is not a grid of {side}-pixel icons "
                         f"with {padding}-pixel gaps")
    tiles = [grid[padding + r * (side + padding):(r + 1) * (side + padding),
                  padding + c * (side + padding):(c + 1) * (side + padding)]
             for r in range(rows) for c in range(columns)]
    return torch.from_numpy(np.stack(tiles).transpose(0, 3, 1, 2).copy())


def score_grids(folder, model):
    """Every *.png grid in folder, ordered by the numbers in its name (epoch-0003-step-234.png),
    -> [(name, score)]."""
    names = sorted((f for f in os.listdir(folder) if f.lower().endswith(".png")),
                   key=lambda f: [int(d) for d in re.findall(r"[0-9]+", f)])
    if not names:
        raise ValueError(f"{folder}: no .png grids in it")
    return [(name, score(grid_tiles(os.path.join(folder, name)), model)) for name in names]


def main(argv=None):
    args = parser.parse_args(argv)
    if args.max_images < 1:
        parser.error("--max-images must be at least 1")
    if args.grids:
        if not os.path.isdir(args.images):
            parser.error(f"--grids: {args.images} is not a folder of grid PNGs")
        model, accuracy = load_classifier(args.cache_dir)
        try:
            results = score_grids(args.images, model)
        except (OSError, ValueError) as error:
            parser.error(str(error))
        if args.json:
            write_json(args.json, [{"grid": name, **r, "kl": None if math.isinf(r["kl"]) else r["kl"]}
                                    for name, r in results])
        for name, result in results:
            print(f"{name}: {summary(result)}")
        return results
    try:
        # only the first --max-images are decoded, and nothing is cached: a samples folder is scored once
        images = data.load_images(args.images, root=args.data_root, size=SIZE, limit=args.max_images, cache=False)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    model, accuracy = load_classifier(args.cache_dir)
    result = score(torch.as_tensor(images), model)
    result["classifier_held_out_accuracy"] = accuracy
    if args.json:  # inf is not JSON: nothing recognised is written as null
        kl = None if math.isinf(result["kl"]) else result["kl"]
        write_json(args.json, {"images": args.images, **result, "kl": kl,
                                "mode_names": [mode_name(m) for m in range(MODES)]})
    print(summary(result))
    return result


if __name__ == "__main__":
    main()
