"""A convolutional variational autoencoder (Kingma & Welling 2014), one file, top to bottom.

    python vae.py                         # the built-in icons, 32x32, about 3 CPU-minutes (DATA_DEFAULTS below)
    python vae.py --data anime --image-size 64 --epochs 30                # the anime faces at 64x64
    python vae.py --resume out/vae-anime/checkpoint.pt --epochs 0 --sample 50000 --zip vae_img
    torchrun --standalone --nproc-per-node 8 vae.py --data anime --epochs 30                  # 8 GPUs

The model: x -> encoder (strided convolutions) -> q(z|x) = N(mu, diag(exp(logvar))) ->
z = mu + exp(logvar / 2) * eps -> decoder (transposed convolutions) -> p(x|z) = N(x_hat, s^2 I),
s fitted to the error. It maximizes the evidence lower bound, i.e. minimizes, per image,

    -ELBO(x) = -E_q(z|x)[log p(x|z)] + KL(q(z|x) || N(0, I))     (reconstruction + KL, in nats)

Everything goes to --out (default out/vae-<data>/), rewritten every epoch: elbo.csv and elbo.png
(-ELBO and its two terms per epoch, on the training batches and on a held-out split), curves.csv
and curves.png (the same per step), reconstructions.png (8 held-out images above their
reconstructions), samples.png (64 decoded draws, the same every epoch), checkpoint.pt (--resume
continues it exactly); with --sample N the images samples/1.png ... N.png (and NAME.zip with --zip
NAME) as the GAN scripts write them. tools/vae_sweep.py compares latent sizes and batch sizes.

Measured on a 2-core CPU (docs/results.md): `python vae.py` reconstructs the icons closely, and its
samples from the mixture fitted to the codes have the set's backgrounds (tools/modes.py: recognised
82.9%, named 90.1%; drawn from N(0, I): 1.2%, 13.9%, see "the prior hole"). 64x64 faces, the second
command (30 epochs): FID 191.5 (15 epochs: 211.8).
"""

import argparse
import math
import os
import time

import torch
import torch.nn as nn

from ganlab import flags
from ganlab import training
from ganlab.fused_op import random_affine, to_device, warp_batch
from ganlab.outputs import save_grid, write_elbo_curves

# -----------------------------------------------------------------------------
# settings: `--help` lists them all, with their defaults

parser = argparse.ArgumentParser(description=flags.help_from_docstring(__doc__),
                                 formatter_class=flags.HelpFormatter)
group = parser.add_argument_group("model")
group.add_argument("--latent", type=flags.positive_int, default=128, help="dimension of the latent z")
group.add_argument("--width", type=flags.positive_int, default=32,
                   help="channels of the encoder's first layer (the decoder's last hidden one), doubled per halving")
group.add_argument("--prior-mixture", type=flags.nonnegative_int, default=0, metavar="K",
                   help="draw samples from a mixture of K Gaussians fitted to the training codes, not from the prior "
                        "N(0, I): where the codes leave holes in N(0, I) (see 'the prior hole'); 0: from N(0, I)")
group = parser.add_argument_group("training")
group.add_argument("--lr", type=flags.positive_float, default=1e-3, help="learning rate (Adam)")
group.add_argument("--holdout", type=flags.positive_float, default=0.05,
                   help="fraction of the images held out (never trained on) to measure the ELBO, below 1")
training.add_run_flags(parser, epochs=20, batch_size=64, augment="flip", what_samples="decoded prior samples")
# a checkpoint only fits networks of the same shapes, and its held-out numbers the same split
MUST_MATCH = ["image_size", "latent", "width", "data", "max_images", "holdout"]
# per data set, the settings that differ from the defaults above (measured: docs/results.md); a flag given
# on the command line wins. shapes: the built-in icons, about 3 CPU-minutes
DATA_DEFAULTS = {"shapes": dict(max_images=5000, epochs=24, latent=8, prior_mixture=64)}

# -----------------------------------------------------------------------------
# the model


def feature_sizes(image_size):
    """Spatial sizes through the encoder, halving while the side is even and at least 8: 32 -> [32, 16,
    8, 4]; 96 -> [96, 48, 24, 12, 6]. The decoder doubles back through them to the image exactly."""
    sizes = [image_size]
    while sizes[-1] >= 8 and sizes[-1] % 2 == 0:
        sizes.append(sizes[-1] // 2)
    # the sizes the GAN scripts take too (their start_size), so that every model trains on the same data
    if image_size not in {m * 2 ** k for m in range(3, 8) for k in range(2, 12)}:
        raise ValueError(f"--image-size {image_size}: give 3 to 7 times a power of 2 of at least 4, "
                         "such as 16, 24, 32, 48, 64 or 96")
    return sizes


def channels(width, n):
    """Channels after each of n halvings: width, 2 width, 4 width, ..., at most 512."""
    return [min(width * 2 ** i, 512) for i in range(n)]


class Encoder(nn.Module):
    """x (B, 3, S, S) in [-1, 1] -> mu, logvar (B, latent) of q(z|x). Shapes at the default 32x32,
    --width 32, --latent 128:
        (B, 3, 32, 32) -> (B, 32, 16, 16) -> (B, 64, 8, 8) -> (B, 128, 4, 4)
        -> flatten (B, 2048) -> linear (B, 256), split into mu and logvar (B, 128) each
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
        self.head = nn.Linear(c_in * sizes[-1] ** 2, 2 * latent)  # (B, 2048) -> (B, 256) at the default

    def forward(self, x):
        h = self.conv(x).flatten(1)                 # (B, 2048) at the default
        mu, logvar = self.head(h).chunk(2, dim=1)   # (B, 128) each
        return mu, logvar


class Decoder(nn.Module):
    """z (B, latent) -> x_hat (B, 3, S, S), the mean of the Gaussian p(x|z); the mirror of the
    encoder. Shapes at the default 32x32, --width 32, --latent 128:
        (B, 128) -> linear (B, 2048) -> (B, 128, 4, 4) -> (B, 64, 8, 8) -> (B, 32, 16, 16) -> (B, 3, 32, 32)
    """

    def __init__(self, image_size, latent, width):
        super().__init__()
        sizes = feature_sizes(image_size)
        chans = channels(width, len(sizes) - 1)[::-1]  # widest first
        self.shape = (chans[0], sizes[-1], sizes[-1])  # (128, 4, 4) at the default
        self.head = nn.Sequential(nn.Linear(latent, chans[0] * sizes[-1] ** 2, bias=False),
                                  nn.BatchNorm1d(chans[0] * sizes[-1] ** 2), nn.ReLU())
        layers = []
        for c_in, c in zip(chans, chans[1:] + [3]):
            # transposed conv 4x4 stride 2 doubles the side: (B, c_in, s, s) -> (B, c, 2s, 2s)
            layers.append(nn.ConvTranspose2d(c_in, c, 4, 2, 1, bias=c == 3))
            if c != 3:
                layers += [nn.BatchNorm2d(c), nn.ReLU()]
        # no tanh on the output: x_hat is a Gaussian's mean, which needs no bounds (clamped only when saved)
        self.deconv = nn.Sequential(*layers)
        # s^2 of p(x|z) = N(x_hat, s^2 I) for held-out images and samples: the running mean of the
        # training batches' s^2 (see "the loss"), kept like batch norm's running statistics
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
        h = self.head(z).view(-1, *self.shape)  # (B, 128, 4, 4) at the default
        return self.deconv(h)                    # (B, 3, S, S)


class VAE(nn.Module):
    def __init__(self, image_size, latent, width):
        super().__init__()
        self.latent = latent
        self.encoder = Encoder(image_size, latent, width)
        self.decoder = Decoder(image_size, latent, width)

    def forward(self, x, eps):
        """-> x_hat, mu, logvar. eps ~ N(0, I) (B, latent) is drawn by the caller (the whole batch's, once)."""
        mu, logvar = self.encoder(x)
        return self.decoder(reparameterize(mu, logvar, eps)), mu, logvar


def reparameterize(mu, logvar, eps):
    """A draw z ~ q(z|x) = N(mu, diag(exp(logvar))) as z = mu + sigma * eps, sigma = exp(logvar / 2),
    so that gradients reach mu and sigma through the sample (drawing z directly would have none)."""
    return mu + torch.exp(0.5 * logvar) * eps


# -----------------------------------------------------------------------------
# the loss: negative ELBO = reconstruction + KL, each summed over its dimensions, one value per image
#
# ELBO(x) = E_q(z|x)[log p(x|z)] - KL(q(z|x) || p(z))  <=  log p(x)
# Both terms are SUMS over the dimensions of one image (pixels, latent units): the ELBO bounds the
# log density of the whole image, and averaging one of them instead silently reweights the two (a
# common slip). Over a batch we take the MEAN: "nats per image", whatever the --batch-size.
#
# p(x|z) is a Gaussian N(x_hat, s^2 I): the pixels are continuous values in [-1, 1] (resized,
# bilinearly augmented), so a Bernoulli likelihood (binarized MNIST's) is no density for them. A FIXED
# s weighs the squared error by 1 / (2 s^2) against the KL (a hidden beta: s = 1 on [-1, 1] gives blurry
# mush, a tiny s an autoencoder). Here s is a parameter of the likelihood, with a closed-form maximum:
# s^2 = the mean squared error, taken for each batch (the "optimal sigma-VAE", Rybkin et al. 2021).
# Learning log s by gradient steps gets there too, slowly (Adam moves it about --lr a step), and
# meanwhile the weak reconstruction term lets the KL switch latent units off (measured, 6,000 faces at
# 32x32, one epoch: held-out -ELBO 2877 nats with a learned s, KL 25; 1399 with this one, KL 101).
# Held-out images use the running mean of the batches' s^2, fixed before they are seen, so the held-out
# ELBO is a true bound. s stays above the 8-bit grid's rounding noise (std 1 / (127.5 sqrt(12))): the
# data say nothing finer, and s -> 0 would send the loss to minus infinity on a memorized batch.
MIN_SCALE_SQ = 1 / (127.5 ** 2 * 12)


def best_log_scale(x, x_hat):
    """log s with s^2 = the batch's mean squared error (at least MIN_SCALE_SQ): the s that maximizes the
    batch's likelihood. Detached: at the optimum the loss does not change with s, so no gradient is lost."""
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
    """Negative ELBO in nats per image (a density on [-1, 1]) -> bits per 8-bit subpixel. Pixel p is
    stored as p / 127.5 - 1: a density times that bin width, 1 / 127.5, approximates the probability of
    the 8-bit value (Theis et al. 2016), so add log(127.5) nats per dimension, then divide by ln 2."""
    return (nats_per_image / dims + math.log(127.5)) / math.log(2)


# -----------------------------------------------------------------------------
# measuring and showing the model: the held-out ELBO, the figures


@torch.no_grad()
def evaluate(model, bank, heldout_index, autocast):
    """-ELBO, its two terms and the squared error per pixel, averaged over the held-out images. Batch norm in
    eval mode, no augmentation, the same eps at every call: two epochs' (or runs') numbers differ by the model."""
    model.eval()
    sums = torch.zeros(4, device=bank.device)
    noise = torch.Generator().manual_seed(1)
    for first in range(0, len(heldout_index), 256):
        x = bank[heldout_index[first:first + 256]].float() / 127.5 - 1  # the images as they are
        eps = to_device(torch.randn(len(x), model.latent, generator=noise), bank.device)  # no host sync
        with autocast:
            x_hat, mu, logvar = model(x, eps)
        recon = reconstruction_nll(x, x_hat.float(), model.decoder.log_scale())
        kl = kl_divergence(mu.float(), logvar.float())
        mse = ((x - x_hat.float()) ** 2).flatten(1).mean(dim=1)
        sums += torch.stack([(recon + kl).sum(), recon.sum(), kl.sum(), mse.sum()])
    model.train()
    neg_elbo, recon, kl, mse = (sums / len(heldout_index)).tolist()
    return dict(neg_elbo=neg_elbo, recon=recon, kl=kl, scale=model.decoder.log_scale().exp().item(),
                bits_per_dim=bits_per_dim(neg_elbo, bank[0].numel()), mse=mse)


@torch.no_grad()
def decode(model, z, autocast):
    """Images for latents z: the decoder's means (batch norm in eval mode), clamped to [-1, 1] for saving."""
    model.eval()
    with autocast:
        x = model.decoder(z).float().clamp(-1, 1)
    model.train()
    return x


def write_figures(folder, model, heldout_images, mixture, seed, autocast):
    """reconstructions.png: 8 held-out images above their reconstructions, decoded from the
    posterior mean mu (a sampled z would add the posterior's noise to what the model can rebuild);
    samples.png: 64 draws (N(0, I), or the fitted mixture), the same random numbers every epoch."""
    model.eval()
    with torch.no_grad(), autocast:
        mu = model.encoder(heldout_images)[0]
    model.train()
    images = torch.cat([heldout_images, decode(model, mu, autocast)])
    save_grid(images, os.path.join(folder, "reconstructions.png"), nrow=len(heldout_images))
    z = draw_latents(64, model.latent, torch.Generator().manual_seed(seed), mixture).to(heldout_images.device)
    save_grid(decode(model, z, autocast), os.path.join(folder, "samples.png"))


# -----------------------------------------------------------------------------
# the prior hole: N(0, I) draws that land where no training code is. On the built-in icons the codes
# form a tight cluster per mode (posterior sigma about 0.03) spread over 2 to 3 standard deviations, the
# backgrounds in a row, white - yellow - black: most N(0, I) draws fall between clusters and decode to
# blends, olive and pale yellow (docs/results.md). A stronger KL (a larger s) narrows the spread but
# keeps the clusters apart; a Gaussian mixture fitted to the codes (Ghosh et al. 2020) has no holes.


@torch.no_grad()
def fit_code_mixture(model, bank, index, k, autocast):
    """--prior-mixture K: the mixture fitted to the posterior means mu of the images bank[index]; None if k is 0."""
    if k == 0:
        return None
    model.eval()
    with autocast:  # the codes (N, latent), 500 images at a time
        codes = torch.cat([model.encoder(bank[index[i:i + 500]].float() / 127.5 - 1)[0].float()
                           for i in range(0, len(index), 500)])
    model.train()
    return gaussian_mixture(codes, min(k, len(codes)))


def gaussian_mixture(codes, k, iterations=50):
    """A mixture of k Gaussians with diagonal covariances fitted to codes (N, D) by EM (k codes of a
    fixed draw as the first means) -> (log weights (k,), means (k, D), variances (k, D))."""
    means = codes[torch.randperm(len(codes), generator=torch.Generator().manual_seed(0))[:k].to(codes.device)]
    variances = codes.var(dim=0).expand(k, -1).clone()
    log_weights = torch.full((k,), -math.log(k), device=codes.device)
    for _ in range(iterations):
        # E step: r[i, j] = p(component j | code i) from log w_j + log N(code_i | mean_j, diag(variance_j)), with
        # sum_d (c_d - m_d)^2 / v_d expanded so that no (N, k, D) tensor is made
        log_p = log_weights - 0.5 * (codes ** 2 @ (1 / variances).T - 2 * codes @ (means / variances).T
                                     + (means ** 2 / variances + variances.log()).sum(dim=1))
        r = log_p.softmax(dim=1)  # (N, k)
        # M step: each component's weight, mean and variance from the codes, weighted by r
        n = r.sum(dim=0) + 1e-8
        log_weights, means = (n / len(codes)).log(), (r.T @ codes) / n[:, None]
        variances = ((r.T @ codes ** 2) / n[:, None] - means ** 2).clamp(min=1e-4)
    return log_weights, means, variances


def draw_latents(count, latent, generator, mixture=None):
    """count latents (count, latent) on the CPU: from the prior N(0, I), or from a fitted mixture."""
    if mixture is None:
        return torch.randn(count, latent, generator=generator)
    log_weights, means, variances = (t.cpu() for t in mixture)
    j = torch.multinomial(log_weights.exp(), count, replacement=True, generator=generator)  # a component each
    return means[j] + variances[j].sqrt() * torch.randn(count, latent, generator=generator)


# -----------------------------------------------------------------------------


def heldout_count(n, holdout):
    """How many of n images are held out: the fraction --holdout of them, at least one."""
    return max(1, round(holdout * n))


def main(argv=None):
    """Train (or with --epochs 0 only measure and sample); returns the final held-out numbers, the settings."""
    # the command line, checked before any work (training.Run: checkpoint settings, DATA_DEFAULTS, device, seed)
    run = training.Run(parser, argv, __file__, MUST_MATCH, curve_groups=[["neg_elbo"], ["recon"], ["kl"]],
                       data_defaults=DATA_DEFAULTS)
    args, device, B = run.args, run.device, run.args.batch_size
    if args.holdout >= 1:
        run.error(f"--holdout {args.holdout}: give the fraction of the images to hold out, between 0 and 1")
    try:
        if args.image_size:  # a size given (or resumed) is refused before the data are read
            feature_sizes(args.image_size)
    except ValueError as error:
        run.error(str(error))

    # data: every image in one uint8 tensor (N, 3, S, S) on the device; a batch is a set of indices
    # into it, and warp_batch reads them and applies each image's affine matrix theta (the flip,
    # shift, zoom, rotation of --augment) in one fused pass. In plain PyTorch it is
    #     x = bank[index].float() / 127.5 - 1
    #     x = F.grid_sample(x, F.affine_grid(theta, x.shape), padding_mode="reflection")
    bank = run.load_images()
    S = args.image_size
    # the held-out split: the last --holdout of a fixed permutation (seed 0 whatever --seed): the same for every run
    n_heldout = heldout_count(len(bank), args.holdout)
    permutation = torch.randperm(len(bank), generator=torch.Generator().manual_seed(0)).to(device)
    train_index, heldout_index = permutation[:-n_heldout], permutation[-n_heldout:]
    steps_per_epoch = len(train_index) // B  # the last, partial batch is dropped: steady shapes
    if steps_per_epoch == 0:
        run.error(f"--batch-size {B} is more than the {len(train_index)} training images ({len(bank)} images less "
                  f"{n_heldout} held out): give a smaller --batch-size, or more images (--max-images)")
    run.print(f"{args.data}: {len(train_index)} training and {n_heldout} held-out images, {S}x{S}; "
              f"{steps_per_epoch} steps of {B} per epoch on {device}")
    mine = slice(run.rank * B // run.world, (run.rank + 1) * B // run.world)  # this process's rows (torchrun)

    # the model; model_train: the same network as the training steps call it (--compile, torchrun's DDP)
    try:
        model = VAE(S, args.latent, args.width).to(device)
    except ValueError as error:
        run.error(f"{error} (the data's images are {S}x{S})")
    model_train = run.wrap(model)
    shown = bank[heldout_index[:8]].float() / 127.5 - 1  # the held-out images of reconstructions.png

    # optimizer: Adam with its default betas: a plain minimization (no opponent, unlike the GANs)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    # resume: weights, optimizer moments, position in the data, random states, curves, the ELBO history
    position = (run.restore(model=model, optimizer=optimizer) if run.checkpoint else
                dict(epoch=0, batch=0, step=0, seconds=0.0, history=[]))
    step, seconds, history = position["step"], position["seconds"], position["history"]

    run.start(args.epochs * steps_per_epoch, step, B)  # progress bar; Ctrl-C -> checkpoint
    started = time.time()
    for epoch in range(run.start_epoch, args.epochs):
        # this epoch's order depends only on (seed, epoch): a resumed run sees the same batches
        order = train_index[torch.randperm(len(train_index), device=device,
                                           generator=torch.Generator(device).manual_seed(args.seed * 100_003 + epoch))]
        first_batch = position["batch"] if epoch == run.start_epoch else 0
        epoch_start = step - first_batch
        for batch in range(first_batch, steps_per_epoch):
            # every random number is drawn for the whole batch; under torchrun each process keeps its rows, mine
            index = order[batch * B:(batch + 1) * B][mine]  # valid by construction: no check
            theta = random_affine(B, **run.affine_ranges, generator=run.augment_gen, device=device)[mine]
            eps = torch.randn(B, args.latent, device=device)[mine]
            # the augmented image is both the encoder's input and the reconstruction's target
            x = warp_batch(bank, index, theta, S, padding="reflection", check_index=False)
            with run.autocast:
                x_hat, mu, logvar = model_train(x, eps)
            x_hat, mu, logvar = x_hat.float(), mu.float(), logvar.float()  # the loss in float32
            # s of p(x|z): the best one for this batch, s^2 = its mean squared error (this process's rows')
            log_scale = best_log_scale(x, x_hat)
            # -ELBO per image = reconstruction + KL (each summed over its dimensions), mean over the images
            recon = reconstruction_nll(x, x_hat, log_scale).mean()
            kl = kl_divergence(mu, logvar).mean()
            loss = recon + kl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            model.decoder.track_scale(torch.exp(2 * log_scale))
            step += 1

            # the curves: kept on the device, fetched every --log-every steps (one transfer)
            run.log(step, epoch, neg_elbo=loss, recon=recon, kl=kl, scale=torch.exp(log_scale))
            run.stop_if_nonfinite()  # a NaN or inf among the fetched losses: exits, the last checkpoint kept
            if run.stop_requested():  # Ctrl-C or SIGTERM: a checkpoint to resume from, then stop
                seconds += time.time() - started
                run.save(dict(epoch=epoch, batch=batch + 1, step=step, seconds=seconds, history=history),
                         model=model, optimizer=optimizer)
                run.stopped(step)  # says how to resume, then exits 130 (143 on SIGTERM): no samples
        # end of an epoch: the training means over its steps, the held-out numbers, a checkpoint, figures
        seconds += time.time() - started
        train_mean = run.curves.means_after(epoch_start)  # the mean of each curve over this epoch's steps
        result = evaluate(model, bank, heldout_index, run.autocast)
        history.append(dict(epoch=epoch + 1, step=step, **{f"train_{k}": v for k, v in train_mean.items()},
                            **{f"heldout_{k}": v for k, v in result.items()}))
        run.save(dict(epoch=epoch + 1, batch=0, step=step, seconds=seconds, history=history),
                 model=model, optimizer=optimizer)
        if run.main:
            write_elbo_curves(history, args.out)
            mixture = fit_code_mixture(model, bank, train_index, args.prior_mixture, run.autocast)
            write_figures(args.out, model, shown, mixture, args.seed, run.autocast)
        run.write(f"epoch {epoch + 1}/{args.epochs}: step {step}, held-out -ELBO {result['neg_elbo']:.1f} = "
                  f"reconstruction {result['recon']:.1f} + KL {result['kl']:.1f} nats/image "
                  f"({result['bits_per_dim']:.3f} bits/dim), MSE per pixel {result['mse']:.4f}")
        started = time.time()  # the measurement and the figures do not count as training time
    run.finish()

    # the final numbers (and the figures, unless the last epoch has just drawn them); samples
    result = evaluate(model, bank, heldout_index, run.autocast)
    mixture = fit_code_mixture(model, bank, train_index, args.prior_mixture, run.autocast)
    if run.main and not run.epochs_left:
        write_elbo_curves(history, args.out)
        write_figures(args.out, model, shown, mixture, args.seed, run.autocast)
    sample_gen = torch.Generator().manual_seed(args.seed + 1)

    def generate(count):  # 500 draws at a time, cut to count: sample i is the same whatever --sample N
        return decode(model, draw_latents(500, args.latent, sample_gen, mixture)[:count].to(device), run.autocast)

    run.write_samples(generate)
    run.print(f"held-out -ELBO {result['neg_elbo']:.1f} nats/image ({result['bits_per_dim']:.3f} bits/dim), "
              f"MSE per pixel {result['mse']:.4f}; outputs in {args.out}")
    return dict(result, steps=step, train_seconds=seconds, settings=vars(args))


if __name__ == "__main__":
    main()
