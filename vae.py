"""A convolutional variational autoencoder (Kingma & Welling 2014), one file, top to bottom.

    python vae.py                                    # built-in 'shapes' icons, 32x32, minutes on a CPU
    python vae.py --data anime --epochs 30           # 64x64 anime faces (--image-size 96 for 96x96)
    python vae.py --resume out/vae-anime/checkpoint.pt --epochs 60        # continue to 60 epochs in all
    python vae.py --resume out/vae-anime/checkpoint.pt --epochs 0 --sample 50000 --zip vae_img
    python vae.py --data anime --image-size 32 --epochs 3 --sweep         # latent size / batch size study

Everything goes to --out (default out/vae-<data>/), rewritten every epoch:
    elbo.csv, elbo.png        the learning curve: -ELBO and its two terms (reconstruction, KL) per
                              epoch, on the training batches (mean over the epoch) and on the held-out split
    curves.csv, curves.png    the same three numbers for every training step, raw and smoothed
    reconstructions.png       8 held-out images (top row) above their reconstructions (bottom row)
    samples.png               64 draws from the prior p(z) = N(0, I), decoded; the same z every epoch
    checkpoint.pt             weights, optimizer, position, random states, curves; --resume continues it
and, on request: samples/1.png ... N.png (--sample N) and NAME.zip (--zip NAME), the same format
as the GAN scripts' so that one tool scores both; sweep/ (--sweep): one run per variant, and
sweep.csv, sweep.md, sweep.png comparing them.

The model: x -> encoder (strided convolutions) -> q(z|x) = N(mu, diag(exp(logvar))) ->
z = mu + exp(logvar / 2) * eps -> decoder (transposed convolutions) -> p(x|z) = N(x_hat, s^2 I)
with s fitted to the error. The loss is the negative ELBO in nats per image, reconstruction + KL: see
"loss" below for the signs, what is summed and what averaged, and why this likelihood.

Measured on the 2-core development CPU (one thread, other jobs running). `python vae.py
--epochs 5` on 'shapes' (3.7 min): the held-out -ELBO falls every epoch, to -1841 nats per image
(6.13 bits/dim, squared error 0.015 per pixel); the reconstructions are close copies, but the
prior samples are patchy colour fields, not icons: flat colours with sharp edges are what a
Gaussian VAE does worst, and (likely, not measured) the 128-dimensional codes of the training
images fill only part of N(0, I). With --latent 16 (-586 nats) the samples are blurry
backgrounds with a blob in the middle. On the
anime faces at 32x32 (3 epochs, see --sweep) latents 16-32 give smooth, blurry, face-like
samples and 128 sharper reconstructions with noisier samples. VAE samples are blurrier than GAN
samples: where the code does not pin an image down, the Gaussian's best guess is an average.
"""

import argparse
import csv
import math
import os
import signal
import sys
import time

import torch
import torch.nn as nn
from tqdm import tqdm

import data
import outputs
from augment import random_affine, to_device, warp_batch

# -----------------------------------------------------------------------------
# settings: `python vae.py --help` lists them with their defaults

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
group = parser.add_argument_group("data")
group.add_argument("--data", default="shapes", help="shapes (built in), lld, anime, or a folder/file of images")
group.add_argument("--data-root", default=None, help="folder that holds the datasets; None: data.py's choice ($GANLAB_DATA, else data/ beside it)")
group.add_argument("--image-size", type=int, default=None, help="side of the images, resized once when loaded; None: the data's own (32 shapes/lld, 64 others), or the checkpoint's")
group.add_argument("--max-images", type=int, default=None, help="use only the first N images (quick runs); None: all")
group.add_argument("--holdout", type=float, default=0.05, help="fraction of the images held out (never trained on) to measure the ELBO")
group.add_argument("--augment", default="flip", help="geometric augmentation of the training batches: comma-separated flip[=p], translate[=fraction], scale[=max zoom], rotate[=degrees], or none")
group = parser.add_argument_group("model")
group.add_argument("--latent", type=int, default=128, help="dimension of the latent z")
group.add_argument("--width", type=int, default=32, help="channels of the encoder's first layer (and the decoder's last hidden one), doubled at each halving up to 512")
group = parser.add_argument_group("training")
group.add_argument("--epochs", type=int, default=20, help="train until this many epochs are done in all (0: only measure and sample)")
group.add_argument("--batch-size", type=int, default=64, help="images per step")
group.add_argument("--lr", type=float, default=1e-3, help="learning rate (Adam)")
group.add_argument("--seed", type=int, default=0, help="seed of every random draw (reproducible runs)")
group.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
group.add_argument("--compile", action="store_true", help="torch.compile the model for the training steps (faster steps after a slow first one)")
group.add_argument("--log-every", type=int, default=20, help="steps between fetches of the losses (progress bar, curves, NaN check)")
group = parser.add_argument_group("output")
group.add_argument("--out", default=None, help="output folder; None: out/vae-<data>, or the checkpoint's folder with --resume")
group.add_argument("--resume", default=None, metavar="CKPT", help="continue from this checkpoint; settings not given here come from it")
group.add_argument("--sample", type=int, default=0, metavar="N", help="after training, write N prior samples as <out>/samples/1.png ... N.png")
group.add_argument("--zip", default=None, metavar="NAME", help="with --sample: also write <out>/NAME.zip holding the folder NAME/ with the PNGs")
group.add_argument("--force", action="store_true", help="overwrite the samples (and zip) of an earlier run, or start a new run over an old checkpoint")
group = parser.add_argument_group("analysis")
group.add_argument("--sweep", action="store_true", help="train one run per --sweep-latents value (at --batch-size) and per --sweep-batch-sizes value (at --latent) under <out>/sweep/, then compare them in sweep.csv, sweep.md and sweep.png")
group.add_argument("--sweep-latents", default="16,32,128,512", help="latent sizes the sweep compares")
group.add_argument("--sweep-batch-sizes", default="16,64,256", help="batch sizes the sweep compares")

# settings that fix the network's shapes or the held-out split: a checkpoint only fits the same values
MUST_MATCH = ["image_size", "latent", "width", "data", "max_images", "holdout"]
# settings that belong to one invocation, never taken from a checkpoint
COMMAND_SETTINGS = ["resume", "sample", "zip", "force", "device", "compile", "out", "sweep",
                    "sweep_latents", "sweep_batch_sizes"]


def parse_augment(spec):
    """'flip,translate=0.1' -> keyword arguments of augment.random_affine; 'none' -> no change.

    Bare names take these defaults: flip 0.5 (probability), translate 0.125 (of the side),
    scale 1.25 (largest zoom in: a random crop), rotate 10 (degrees either way).
    """
    defaults = {"flip": 0.5, "translate": 0.125, "scale": 1.25, "rotate": 10.0}
    kwargs = {"flip": 0.0}
    for item in spec.split(","):
        name, _, value = item.strip().partition("=")
        if name in ("", "none"):
            continue
        if name not in defaults:
            raise ValueError(f"--augment: unknown {name!r}; use flip, translate, scale, rotate or none")
        try:
            kwargs[name] = float(value) if value else defaults[name]
        except ValueError:
            raise ValueError(f"--augment: {name}={value!r} is not a number") from None
    if "scale" in kwargs:
        kwargs["scale"] = (1.0, kwargs["scale"])  # zoom in by 1 to this factor
    return kwargs


# -----------------------------------------------------------------------------
# model


def feature_sizes(image_size):
    """Spatial sizes through the encoder: halve while the side is even and at least 8.

    64 -> [64, 32, 16, 8, 4]; 96 -> [96, 48, 24, 12, 6]; 32 -> [32, 16, 8, 4]. The decoder walks
    the same list backwards, doubling, so any size of the form (4 to 7) * 2^k comes back exactly.
    """
    sizes = [image_size]
    while sizes[-1] >= 8 and sizes[-1] % 2 == 0:
        sizes.append(sizes[-1] // 2)
    if image_size < 8 or sizes[-1] > 7:
        raise ValueError(f"--image-size {image_size} cannot be halved down to 4 to 7 pixels: use a size "
                         "like 16, 32, 48, 64 or 96 (4 to 7 times a power of 2, at least 8)")
    return sizes


def channels(width, n):
    """Channels after each of n halvings: width, 2 width, 4 width, ..., at most 512."""
    return [min(width * 2 ** i, 512) for i in range(n)]


class Encoder(nn.Module):
    """x (B, 3, S, S) in [-1, 1] -> mu, logvar (B, latent) of q(z|x).

    For --image-size 64, --width 32:
        (B, 3, 64, 64) -> (B, 32, 32, 32) -> (B, 64, 16, 16) -> (B, 128, 8, 8) -> (B, 256, 4, 4)
        -> flatten (B, 4096) -> linear (B, 2 * latent), split into mu and logvar
    """

    def __init__(self, image_size, latent, width):
        super().__init__()
        sizes = feature_sizes(image_size)
        chans = channels(width, len(sizes) - 1)
        layers, c_in = [], 3
        for i, c in enumerate(chans):
            # conv 4x4 stride 2 halves the side: (B, c_in, s, s) -> (B, c, s/2, s/2)
            layers.append(nn.Conv2d(c_in, c, 4, 2, 1, bias=i == 0))
            if i > 0:  # no norm on the first layer: it sees the raw pixels (as in DCGAN's D)
                layers.append(nn.BatchNorm2d(c))
            layers.append(nn.LeakyReLU(0.2))
            c_in = c
        self.conv = nn.Sequential(*layers)
        # one linear map to both parameters; logvar rather than sigma so that it is unconstrained
        self.head = nn.Linear(c_in * sizes[-1] ** 2, 2 * latent)  # (B, c * f * f) -> (B, 2 * latent)

    def forward(self, x):
        h = self.conv(x).flatten(1)                 # (B, c * f * f)
        mu, logvar = self.head(h).chunk(2, dim=1)   # (B, latent) each
        return mu, logvar


class Decoder(nn.Module):
    """z (B, latent) -> x_hat (B, 3, S, S), the mean of the Gaussian p(x|z); the mirror of the encoder.

    For --image-size 64, --width 32:
        (B, latent) -> linear (B, 4096) -> (B, 256, 4, 4) -> (B, 128, 8, 8) -> (B, 64, 16, 16)
        -> (B, 32, 32, 32) -> (B, 3, 64, 64)
    """

    def __init__(self, image_size, latent, width):
        super().__init__()
        sizes = feature_sizes(image_size)
        chans = channels(width, len(sizes) - 1)[::-1]  # widest first
        self.shape = (chans[0], sizes[-1], sizes[-1])  # (c, f, f)
        self.head = nn.Sequential(nn.Linear(latent, chans[0] * sizes[-1] ** 2, bias=False),
                                  nn.BatchNorm1d(chans[0] * sizes[-1] ** 2), nn.ReLU())
        layers = []
        for c_in, c in zip(chans, chans[1:] + [3]):
            # transposed conv 4x4 stride 2 doubles the side: (B, c_in, s, s) -> (B, c, 2s, 2s)
            layers.append(nn.ConvTranspose2d(c_in, c, 4, 2, 1, bias=c == 3))
            if c != 3:
                layers += [nn.BatchNorm2d(c), nn.ReLU()]
        # no tanh on the output: x_hat is the mean of a Gaussian, which needs no bounds; images
        # are clamped to [-1, 1] only when they are saved
        self.deconv = nn.Sequential(*layers)
        # s^2 of p(x|z) = N(x_hat, s^2 I) for held-out images and samples: the running mean of the
        # training batches' s^2 (see "loss"), kept like batch norm's running statistics
        self.register_buffer("scale_sq", torch.ones(()))
        self.register_buffer("scale_updates", torch.zeros(()))

    @torch.no_grad()
    def track_scale(self, scale_sq):
        """Running mean of s^2: the plain mean over the first 20 batches, then an exponential one
        (weight 0.05) that follows the decoder as it improves. Device ops only, no host sync."""
        self.scale_updates += 1
        self.scale_sq.lerp_(scale_sq, torch.clamp(1 / self.scale_updates, min=0.05))

    def log_scale(self):
        return 0.5 * torch.log(self.scale_sq)

    def forward(self, z):
        h = self.head(z).view(-1, *self.shape)  # (B, c, f, f)
        return self.deconv(h)                    # (B, 3, S, S)


class VAE(nn.Module):
    def __init__(self, image_size, latent, width):
        super().__init__()
        self.encoder = Encoder(image_size, latent, width)
        self.decoder = Decoder(image_size, latent, width)

    def forward(self, x, eps=None):
        mu, logvar = self.encoder(x)
        # reparameterization: z = mu + sigma * eps, eps ~ N(0, I), so that gradients reach mu and
        # sigma through a sample (sampling z directly would have no gradient with respect to them)
        eps = torch.randn_like(mu) if eps is None else eps
        z = mu + torch.exp(0.5 * logvar) * eps
        return self.decoder(z), mu, logvar


# -----------------------------------------------------------------------------
# loss: negative ELBO = reconstruction + KL, each summed over its dimensions, one value per image
#
# ELBO(x) = E_q(z|x)[log p(x|z)] - KL(q(z|x) || p(z))  <=  log p(x)
# We minimize its negative. Both terms are SUMS over the dimensions of one image (pixels for the
# first, latent units for the second), because the ELBO is a bound on the log density of the whole
# image; averaging one of them over its dimensions instead silently reweights the two (the
# confusion in pytorch/examples, whose BCE and KLD are also summed over the batch). Over the images
# of a batch we take the MEAN, so the loss is "nats per image" whatever the batch size, and the
# learning rate means the same thing for every --batch-size (the sweep compares batch sizes).
#
# Why a Gaussian whose scale s is fitted to the reconstruction error, for p(x|z): the pixels are
# continuous values in [-1, 1] (Lanczos-resized, bilinearly augmented), not coin flips, so the
# Bernoulli/BCE likelihood of pytorch/examples is not a density for them and its ELBO bounds
# nothing. A Gaussian with a FIXED s is the squared error times 1 / (2 s^2): s then decides how
# much reconstruction counts against the KL (a hidden beta: s = 1 on [-1, 1] data gives blurry
# mush; a tiny s, an autoencoder whose latents the KL no longer pulls toward the prior, so prior
# samples are poor). So s is not a constant we pick but a parameter of the likelihood, and for a
# given decoder its maximum-likelihood value has a closed form: d/ds of the NLL is zero at
# s^2 = mean squared error. Each training step uses that value for its batch (the "optimal
# sigma-VAE" of Rybkin et al. 2021). Learning log s by gradient steps gets there too, but Adam
# moves it by about --lr a step, thousands of steps from s = 1, and meanwhile the weak
# reconstruction term lets the KL switch latent units off. (Measured, 6,000 faces at 32x32, one
# epoch: held-out -ELBO 2877 nats with a learned s, KL 25; 1399 with this one, KL 101.)
# Held-out images and samples use the running mean of the batches' s^2, a number fixed before
# they are seen, so the held-out ELBO is a true bound, comparable across the sweep's runs.
# s is kept above the 8-bit grid's own rounding noise (std 1 / (127.5 sqrt(12))): the data say
# nothing finer, and s -> 0 would send the loss to minus infinity on a memorized batch.
MIN_SCALE_SQ = 1 / (127.5 ** 2 * 12)


def best_log_scale(x, x_hat):
    """log s with s^2 = the batch's mean squared error (at least MIN_SCALE_SQ): the s that
    maximizes the batch's likelihood. A number, not part of the graph (detached): at the optimum
    the loss does not change with s, so no gradient is lost."""
    return 0.5 * torch.log(((x - x_hat) ** 2).mean().detach().clamp(min=MIN_SCALE_SQ))


def reconstruction_nll(x, x_hat, log_scale):
    """-log N(x | x_hat, s^2 I), summed over the pixels of each image -> (B,) nats. float32."""
    # -log N(x | m, s^2) = (x - m)^2 / (2 s^2) + log s + log(2 pi) / 2, per pixel
    per_pixel = 0.5 * ((x - x_hat) * torch.exp(-log_scale)) ** 2 + log_scale + 0.5 * math.log(2 * math.pi)
    return per_pixel.flatten(1).sum(dim=1)


def kl_divergence(mu, logvar):
    """KL(N(mu, diag(exp(logvar))) || N(0, I)), summed over the latent units of each image -> (B,) nats."""
    # KL = 1/2 sum_j (mu_j^2 + sigma_j^2 - log sigma_j^2 - 1): positive, 0 only when q = N(0, I)
    return 0.5 * (mu ** 2 + torch.exp(logvar) - logvar - 1).sum(dim=1)


def bits_per_dim(nats_per_image, dims):
    """Negative ELBO in nats per image (continuous density on [-1, 1]) -> bits per 8-bit subpixel.

    Pixel p is stored as p / 127.5 - 1, so the 8-bit values are 1 / 127.5 apart. A density on
    [-1, 1] times that bin width approximates the probability of the 8-bit value (Theis et al.
    2016): add log(127.5) nats per dimension, then divide by ln 2.
    """
    return (nats_per_image / dims + math.log(127.5)) / math.log(2)


# -----------------------------------------------------------------------------
# the learning curve: -ELBO per epoch, training and held-out, with its two terms

ELBO_COLUMNS = ["epoch", "step", "train_neg_elbo", "train_recon", "train_kl", "train_scale", "heldout_neg_elbo",
                "heldout_recon", "heldout_kl", "heldout_scale", "heldout_bits_per_dim", "heldout_mse"]


def write_elbo_curve(history, folder):
    """history (one dict per epoch) -> folder/elbo.csv and folder/elbo.png, each written whole
    under a temporary name and then renamed.

    The training numbers are the mean over the epoch's steps (augmented batches, batch norm in
    training mode, weights changing as they go); the held-out numbers are measured at the end
    of the epoch. outputs.CurveLog draws one series per step, so this per-epoch pair is drawn here.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    path = os.path.join(folder, "elbo.csv")
    with open(path + ".tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, ELBO_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()} for row in history)
    os.replace(path + ".tmp", path)

    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), layout="constrained")
    for ax, key, title in zip(axes, ["neg_elbo", "recon", "kl"],
                              ["-ELBO = reconstruction + KL (the loss)", "reconstruction: -E_q[log p(x|z)]",
                               "KL(q(z|x) || N(0, I))"]):
        for split, style in [("train", "-"), ("heldout", "o-")]:
            ax.plot(epochs, [h[f"{split}_{key}"] for h in history], style, label=split.replace("heldout", "held-out"))
        ax.set(title=title, xlabel="epoch", ylabel="nats per image")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(os.path.join(folder, "elbo.png.tmp"), format="png", dpi=100)
    plt.close(fig)
    os.replace(os.path.join(folder, "elbo.png.tmp"), os.path.join(folder, "elbo.png"))


# -----------------------------------------------------------------------------
# the analysis: latent size and minibatch size, one at a time around the defaults


def parse_sizes(text, flag):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        parser.error(f"{flag} wants positive integers separated by commas, got {text!r}")
    return values


def run_sweep(args):
    """Train the variants under <out>/sweep/, then write sweep.csv, sweep.md and sweep.png there.

    One factor at a time: each latent size at --batch-size, then each batch size at --latent;
    every other setting (data, epochs, learning rate, seed) is this command's. A variant whose
    folder holds a checkpoint is resumed, not restarted (one that has all its epochs is only
    measured), so an interrupted sweep continues where it stopped; --force starts them all over.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    variants = [(z, args.batch_size) for z in parse_sizes(args.sweep_latents, "--sweep-latents")]
    variants += [(args.latent, b) for b in parse_sizes(args.sweep_batch_sizes, "--sweep-batch-sizes")]
    variants = list(dict.fromkeys(variants))  # the default pair may be in both lists
    folder = os.path.join(args.out, "sweep")
    # this command's settings, spelt out for each run: every flag except the sweep's own
    common = []
    for key, value in vars(args).items():
        if key in COMMAND_SETTINGS + ["latent", "batch_size"] or value is None or value is False:
            continue
        common += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    common += ["--device", args.device] + (["--compile"] if args.compile else [])
    rows = []
    for latent, batch_size in variants:
        out = os.path.join(folder, f"latent{latent}-batch{batch_size}")
        run = common + ["--latent", str(latent), "--batch-size", str(batch_size), "--out", out]
        checkpoint = os.path.join(out, "checkpoint.pt")
        run += ["--force"] if args.force else ["--resume", checkpoint] if os.path.exists(checkpoint) else []
        print(f"sweep: python vae.py {' '.join(run)}", file=sys.stderr)
        result = main(run)
        if result is None:  # stopped by Ctrl-C: its checkpoint is saved; so is the sweep's progress
            return None
        rows.append(dict(latent=latent, batch_size=batch_size, **result))

    # the table: one row per variant
    columns = ["latent", "batch_size", "steps", "neg_elbo", "recon", "kl", "bits_per_dim", "mse", "train_seconds"]
    with open(os.path.join(folder, "sweep.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in r.items()} for r in rows)
    lines = ["| latent | batch | steps | held-out -ELBO (nats/image) | reconstruction | KL | bits/dim "
             "| MSE per pixel | train time (s) |", "|---:" * 9 + "|"]
    for r in rows:
        lines.append(f"| {r['latent']} | {r['batch_size']} | {r['steps']} | {r['neg_elbo']:.1f} | {r['recon']:.1f} "
                     f"| {r['kl']:.1f} | {r['bits_per_dim']:.3f} | {r['mse']:.4f} | {r['train_seconds']:.0f} |")
    table = "\n".join(lines) + "\n"
    with open(os.path.join(folder, "sweep.md"), "w") as f:
        f.write(table)

    # the figure: the held-out -ELBO per epoch of each factor's runs; under it, each run's prior
    # samples and reconstructions side by side
    n = len(rows)
    fig = plt.figure(figsize=(max(8, 2.6 * n), 9), layout="constrained")
    fig.suptitle(f"vae.py --sweep on {args.data}: {args.image_size}x{args.image_size}, {args.epochs} epochs, "
                 f"lr {args.lr}, seed {args.seed}")
    grid = fig.add_gridspec(3, 2 * n, height_ratios=[1.4, 1, 0.3])
    for k, (factor, fixed) in enumerate([("latent", "batch_size"), ("batch_size", "latent")]):
        ax = fig.add_subplot(grid[0, k * n:(k + 1) * n])
        for r in sorted(rows, key=lambda r: r[factor]):
            if r[fixed] == getattr(args, fixed):
                ax.plot(r["heldout_epochs"], r["heldout_curve"], "o-", label=f"{factor.replace('_', ' ')} {r[factor]}")
        ax.set(title=f"held-out -ELBO by {factor.replace('_', ' ')} ({fixed.replace('_', ' ')} {getattr(args, fixed)})",
               xlabel="epoch", ylabel="nats per image (lower is better)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    for j, r in enumerate(rows):
        for i, (name, caption) in enumerate([("samples.png", f"-ELBO {r['neg_elbo']:.0f}\nsamples"),
                                              ("reconstructions.png", f"MSE {r['mse']:.4f}\nreconstructions")]):
            ax = fig.add_subplot(grid[i + 1, 2 * j:2 * j + 2])
            ax.imshow(plt.imread(os.path.join(r["out"], name)))
            ax.set_axis_off()
            ax.set_title(f"latent {r['latent']}, batch {r['batch_size']}: {caption}", fontsize=9)
    fig.savefig(os.path.join(folder, "sweep.png"), dpi=100)
    plt.close(fig)
    print(table, end="")
    print(f"sweep: wrote {folder}/sweep.csv, sweep.md and sweep.png", file=sys.stderr)
    return rows


# -----------------------------------------------------------------------------


def main(argv=None):
    args = parser.parse_args(argv)
    # resume: settings not given on this command line come from the checkpoint
    checkpoint = outputs.resume_settings(parser, argv, args, MUST_MATCH, COMMAND_SETTINGS) if args.resume else None
    if args.resume:
        args.out = args.out or os.path.dirname(os.path.abspath(args.resume))
    args.out = args.out or os.path.join("out", f"vae-{os.path.splitext(os.path.basename(os.path.normpath(args.data)))[0]}")
    try:
        affine = parse_augment(args.augment)
        if args.image_size is not None:
            feature_sizes(args.image_size)
    except ValueError as error:
        parser.error(str(error))
    for key in ["batch_size", "latent", "width", "log_every"]:
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be at least 1")
    if args.epochs < 0 or args.sample < 0 or (args.max_images is not None and args.max_images < 2):
        parser.error("--epochs and --sample cannot be negative, and --max-images must be at least 2")
    if not 0 < args.holdout < 1:
        parser.error("--holdout must be a fraction between 0 and 1")
    if args.zip and not args.sample:
        parser.error("--zip NAME needs --sample N")
    if args.sweep:
        if args.resume or args.sample:
            parser.error("--sweep trains its own runs under <out>/sweep/ (and resumes them): leave out --resume and --sample")
        return run_sweep(args)
    # refuse now what would be refused after training
    samples_dir = os.path.join(args.out, "samples")
    if args.sample and os.path.isdir(samples_dir) and os.listdir(samples_dir) and not args.force:
        parser.error(f"{samples_dir} is not empty: pass --force to overwrite it, or choose another --out")
    zip_path = os.path.join(args.out, args.zip.removesuffix(".zip") + ".zip") if args.zip else None
    if zip_path and os.path.exists(zip_path) and not args.force:
        parser.error(f"{zip_path} exists: pass --force to overwrite it, or choose another --out or --zip")
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    if not args.resume and os.path.exists(ckpt_path) and not args.force:
        parser.error(f"{ckpt_path} exists: pass --resume {ckpt_path} to continue it, --force to start over, or another --out")

    # setup: seeds, device, precision
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    # bf16 autocast on the GPU (bf16 has float32's range: no loss scaling needed, unlike fp16);
    # the loss itself is computed in float32 below. Plain float32 on the CPU.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    augment_gen = torch.Generator().manual_seed(args.seed)  # draws every augmentation parameter, on the CPU

    # data: one uint8 tensor (N, 3, H, W) that lives on the device; a batch is a slice of indices
    bank = data.load_images(args.data, root=args.data_root, size=args.image_size)
    bank = bank[:args.max_images].contiguous() if args.max_images else bank
    args.image_size = bank.shape[-1]
    try:
        feature_sizes(args.image_size)
    except ValueError as error:
        parser.error(f"{error} (the data's images are {args.image_size}x{args.image_size})")
    bank = bank.to(device)
    # the held-out split: the last --holdout of a fixed permutation (seed 0 whatever --seed), so
    # every run, every seed and every variant of the sweep is measured on the same images
    n_heldout = max(1, round(args.holdout * len(bank)))
    permutation = torch.randperm(len(bank), generator=torch.Generator().manual_seed(0)).to(device)
    train_index, heldout_index = permutation[:-n_heldout], permutation[-n_heldout:]
    batch_size = min(args.batch_size, len(train_index))
    steps_per_epoch = len(train_index) // batch_size  # the last, partial batch is dropped: steady shapes
    S, dims = args.image_size, 3 * args.image_size ** 2
    no_warp = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], device=device)  # identity: the image as it is
    print(f"{args.data}: {len(train_index)} training and {n_heldout} held-out images, {S}x{S}; "
          f"{steps_per_epoch} steps of {batch_size} per epoch on {device}", file=sys.stderr)

    def heldout_batch(index):
        """Held-out images as they are (no augmentation), float32 in [-1, 1]."""
        return warp_batch(bank, index, no_warp.expand(len(index), 2, 3), S, check_index=False)

    # model
    model = VAE(S, args.latent, args.width).to(device)
    # torch.compile wraps the module for the training steps; evaluation, sampling and checkpoints
    # use the plain one (its state_dict has no "_orig_mod." prefix; other batch shapes, no recompile)
    model_train = torch.compile(model) if args.compile else model
    fixed_z = torch.randn(64, args.latent, generator=torch.Generator().manual_seed(args.seed)).to(device)

    # optimizer: Adam with its default betas; the VAE objective is a plain minimization (no
    # opponent, unlike the GANs), so the usual momentum 0.9 suits it
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)

    # resume: weights, optimizer moments, position in the data, random states, curves
    log = outputs.CurveLog(every=args.log_every, window=max(args.log_every, steps_per_epoch // 2),
                           groups=[["neg_elbo"], ["recon"], ["kl"], ["scale"]])
    history = []  # one dict per epoch: the rows of elbo.csv
    step, start_epoch, start_image, seconds = 0, 0, 0, 0.0
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        for param_group in optimizer.param_groups:
            param_group["lr"] = args.lr  # this command's learning rate, if it gives a new one
        step, start_epoch, start_image = checkpoint["step"], checkpoint["epoch"], checkpoint["image"]
        seconds, history = checkpoint["seconds"], checkpoint["history"]
        torch.set_rng_state(checkpoint["rng"]["cpu"])
        if device.type == "cuda" and checkpoint["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], device)
        augment_gen.set_state(checkpoint["rng"]["augment"])
        log.load_state_dict(checkpoint["curves"])
        print(f"resumed {args.resume}: epoch {start_epoch}, step {step}", file=sys.stderr)

    def save(epoch, image):
        """Checkpoint (atomically: a crash never leaves half of one) and figures, unless a loss
        went NaN/inf since the last fetch: then the last good checkpoint stays as it is."""
        log.flush()
        stop_if_nonfinite()
        outputs.save_checkpoint({
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "step": step, "epoch": epoch, "image": image, "seconds": seconds, "args": vars(args),
            "rng": {"cpu": torch.get_rng_state(), "augment": augment_gen.get_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
            "history": history, "curves": log.state_dict(),
        }, ckpt_path)
        write_figures()

    def stop_if_nonfinite():
        if log.nonfinite:
            bad_step, name = log.nonfinite
            log.save(args.out, title=f"vae on {args.data}: training loss per step (nats per image)")
            kept = (f"the last good checkpoint, {ckpt_path}, is kept" if os.path.exists(ckpt_path)
                    else "no checkpoint had been written yet")
            raise SystemExit(f"vae: {name} is NaN or infinite at step {bad_step}: stopping; {kept}. "
                             "Lower --lr, or resume from that checkpoint.")

    @torch.no_grad()
    def evaluate():
        """-ELBO, its two terms and the squared error per pixel, averaged over the held-out split.
        Batch norm in eval mode, no augmentation, and the same eps at every call, so that the
        numbers of two epochs (or two runs) differ only by the model."""
        model.eval()
        sums = torch.zeros(4, device=device)
        noise = torch.Generator().manual_seed(1)
        for first in range(0, n_heldout, 256):
            x = heldout_batch(heldout_index[first:first + 256])
            eps = to_device(torch.randn(len(x), args.latent, generator=noise), device)  # no host sync per batch
            with autocast:
                x_hat, mu, logvar = model(x, eps)
            recon = reconstruction_nll(x, x_hat.float(), model.decoder.log_scale())
            kl = kl_divergence(mu.float(), logvar.float())
            mse = ((x - x_hat.float()) ** 2).flatten(1).mean(dim=1)
            sums += torch.stack([(recon + kl).sum(), recon.sum(), kl.sum(), mse.sum()])
        model.train()
        neg_elbo, recon, kl, mse = (sums / n_heldout).tolist()
        return dict(neg_elbo=neg_elbo, recon=recon, kl=kl, scale=model.decoder.log_scale().exp().item(),
                    bits_per_dim=bits_per_dim(neg_elbo, dims), mse=mse)

    @torch.no_grad()
    def decode(z):
        """Images for latents z: the decoder's means, clamped to [-1, 1] for saving."""
        model.eval()
        with autocast:
            x = model.decoder(z).float().clamp(-1, 1)
        model.train()
        return x

    @torch.no_grad()
    def write_figures():
        log.save(args.out, title=f"vae on {args.data}: training loss per step (nats per image)")
        write_elbo_curve(history, args.out)
        # 8 held-out images above their reconstructions, decoded from the posterior mean mu (a
        # sampled z would add the posterior's noise to what the model can rebuild)
        x = heldout_batch(heldout_index[:8])
        model.eval()
        with autocast:
            mu = model.encoder(x)[0]
        outputs.save_grid(torch.cat([x, decode(mu)]), os.path.join(args.out, "reconstructions.png"), nrow=len(x))
        outputs.save_grid(decode(fixed_z), os.path.join(args.out, "samples.png"), nrow=8)

    # Ctrl-C: finish the current step, write a checkpoint, exit cleanly (twice: stop at once)
    stop = []

    def request_stop(signum, frame):
        stop.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        tqdm.write("Ctrl-C: saving a checkpoint after this step (press again to quit without one)")

    train = start_epoch < args.epochs
    previous_handler = signal.signal(signal.SIGINT, request_stop) if train else None
    bar = tqdm(total=args.epochs * steps_per_epoch, initial=min(step, args.epochs * steps_per_epoch),
               unit="step", dynamic_ncols=True, disable=not train)
    started = time.time()
    try:
        for epoch in range(start_epoch, args.epochs):
            # this epoch's order depends only on (seed, epoch): a resumed run sees the same batches
            order = train_index[torch.randperm(len(train_index), device=device,
                                               generator=torch.Generator(device).manual_seed(args.seed * 100_003 + epoch))]
            epoch_start = step - (start_image // batch_size if epoch == start_epoch else 0)
            for batch in range(start_image // batch_size if epoch == start_epoch else 0, steps_per_epoch):
                index = order[batch * batch_size:(batch + 1) * batch_size]  # valid by construction: no check
                theta = random_affine(len(index), **affine, generator=augment_gen, device=device)
                # uint8 bank -> augmented float32 batch in [-1, 1], in one fused op; it is both the
                # encoder's input and the target of the reconstruction
                x = warp_batch(bank, index, theta, S, padding="reflection", check_index=False)
                with autocast:
                    x_hat, mu, logvar = model_train(x)
                x_hat, mu, logvar = x_hat.float(), mu.float(), logvar.float()  # the loss in float32
                # s of p(x|z): the best one for this batch, s^2 = its mean squared error ("loss" above)
                log_scale = best_log_scale(x, x_hat)
                # -ELBO per image = reconstruction + KL (each summed over its dimensions); the
                # mean over the batch's images
                recon = reconstruction_nll(x, x_hat, log_scale).mean()
                kl = kl_divergence(mu, logvar).mean()
                loss = recon + kl
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                model.decoder.track_scale(torch.exp(2 * log_scale))
                step += 1

                # losses stay on the device; every --log-every steps one transfer fetches them
                shown = log.append(step, neg_elbo=loss, recon=recon, kl=kl, scale=torch.exp(log_scale))
                if shown:
                    stop_if_nonfinite()
                    bar.update(step - bar.n)
                    bar.set_postfix_str(f"epoch {epoch + 1} -ELBO {shown['neg_elbo']:.1f} = "
                                        f"{shown['recon']:.1f} + KL {shown['kl']:.1f}")
                if stop:
                    seconds += time.time() - started
                    save(epoch, (batch + 1) * batch_size)
                    bar.close()
                    print(f"stopped at step {step}; continue with: python vae.py --resume {ckpt_path}", file=sys.stderr)
                    return None
            # end of an epoch: the training means over its steps, the held-out numbers, a checkpoint
            log.flush()
            stop_if_nonfinite()
            bar.update(step - bar.n)
            seconds += time.time() - started
            rows = [row for s, row in zip(log.steps, log.rows) if s > epoch_start]
            train_mean = dict(zip(log.names, (sum(column) / len(column) for column in zip(*rows))))
            result = evaluate()
            history.append(dict(epoch=epoch + 1, step=step, **{f"train_{k}": v for k, v in train_mean.items()},
                                **{f"heldout_{k}": v for k, v in result.items()}))
            tqdm.write(f"epoch {epoch + 1}/{args.epochs}: step {step}, held-out -ELBO {result['neg_elbo']:.1f} = "
                       f"reconstruction {result['recon']:.1f} + KL {result['kl']:.1f} nats/image "
                       f"({result['bits_per_dim']:.3f} bits/dim), MSE per pixel {result['mse']:.4f}")
            save(epoch + 1, 0)
            started = time.time()  # the measurement and the figures do not count as training time
    finally:
        bar.close()
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)

    # outputs: the final numbers (and the figures, unless the last epoch has just written them);
    # the numbered samples from the prior
    result = evaluate()
    if not train:
        write_figures()
    if args.sample:
        sample_gen = torch.Generator().manual_seed(args.seed + 1)

        def generate(count):  # at most 500 prior samples at a time, in [-1, 1]
            return decode(torch.randn(min(count, 500), args.latent, generator=sample_gen).to(device))

        folder, zip_path = outputs.write_samples(generate, args.sample, samples_dir, force=args.force, zip_name=args.zip)
        print(f"wrote {args.sample} samples ({S}x{S} RGB) to {folder}" + (f" and {zip_path}" if zip_path else ""),
              file=sys.stderr)
    print(f"held-out -ELBO {result['neg_elbo']:.1f} nats/image ({result['bits_per_dim']:.3f} bits/dim), "
          f"MSE per pixel {result['mse']:.4f}; outputs in {args.out}", file=sys.stderr)
    return dict(result, steps=step, train_seconds=seconds, out=args.out,
                heldout_epochs=[h["epoch"] for h in history], heldout_curve=[h["heldout_neg_elbo"] for h in history])


if __name__ == "__main__":
    main()
