"""LSGAN: the least-squares GAN (Mao et al. 2017) on the DCGAN networks of dcgan.py.

    python lsgan.py --sample 1000          # the built-in icons, about 4 minutes on 2 cores (DATA_DEFAULTS below)
    python lsgan.py --data anime --image-size 32 --epochs 8   # the anime faces at 32x32
    python lsgan.py --data anime --image-size 64 --epochs 4 --batch-size 64 --ngf 32 --ndf 32 --d-norm none

A generator G turns noise z ~ N(0, I) (or a mixture: --z-mixture) into an image; a discriminator D gives each image
a raw score (no sigmoid), pushed to b = 1 for real images and a = 0 for fakes; G wants c = 1:

    D:  min  1/2 E_x (D(x) - b)^2 + 1/2 E_z (D(G(z)) - a)^2
    G:  min  1/2 E_z (D(G(z)) - c)^2

Everything goes to --out (default out/<script>-<data>/): grid.png (64 samples from fixed noise,
every epoch; grids/ keeps them all), curves.csv and curves.png (the losses), checkpoint.pt
(every epoch and on Ctrl-C: --resume continues it exactly), and with --sample N the images
samples/1.png ... N.png (and NAME.zip with --zip NAME). `diff dcgan.py lsgan.py` (or wgan.py)
shows what another objective changes. README: results, and the commands that made them.

Measured on a 2-core CPU (docs/results.md): the first command's samples, scored by tools/modes.py:
80.5% recognised, 36 of 36 modes (seed 0; 50.1% with z ~ N(0, I)); 32x32 faces, 8 epochs: FID 172.7
(other real faces: 6.3); the third command (64x64, 4 epochs): FID 295.9 (dcgan.py: 309.3), and with
--epochs 12 --augment flip --diffaug color,translation: 121.0 (dcgan.py: 103.1). With D's BatchNorm, G
became one grey image at 64x64.
"""

import argparse
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from ganlab import flags
from ganlab import training
from ganlab.fused_op import diff_augment, random_affine, random_diffaug, warp_batch
from ganlab.outputs import to_uint8

# -----------------------------------------------------------------------------
# settings: `--help` lists them all, with their defaults

parser = argparse.ArgumentParser(description=flags.help_from_docstring(__doc__),
                                 formatter_class=flags.HelpFormatter)
group = parser.add_argument_group("model")
group.add_argument("--nz", type=flags.positive_int, default=100, help="size of the noise vector z")
group.add_argument("--ngf", type=flags.positive_int, default=64, help="G's width: channels of its last hidden layer")
group.add_argument("--ndf", type=flags.positive_int, default=64, help="D's width: channels of its first layer")
group.add_argument("--ema", type=flags.decay, default=0.999, help="decay of the average of G's weights (0: off)")
group.add_argument("--z-mixture", type=flags.nonnegative_int, default=0,
                   help="K > 0: z from a mixture of K unit Gaussians around fixed random centres; 0: z ~ N(0, I)")
group.add_argument("--d-norm", default="batch", choices=["batch", "none"],
                   help="D's normalization: BatchNorm (the paper's), or none (needed at 64x64: docs/results.md)")
group = parser.add_argument_group("training")
group.add_argument("--lr-g", type=flags.positive_float, default=2e-4, help="G's learning rate (Adam)")
group.add_argument("--lr-d", type=flags.positive_float, default=2e-4, help="D's learning rate (Adam)")
group.add_argument("--d-steps", type=flags.positive_int, default=1, help="D updates per G update, each on a new batch")
group.add_argument("--diffaug", type=flags.diffaug_policy, default="none",
                   help="DiffAugment of real and fake images in both updates, e.g. color,translation,cutout; or none")
# and the flags every script shares: data, epochs, batch size, seed, device, output, resume
training.add_run_flags(parser, epochs=25, batch_size=128)
MUST_MATCH = ["image_size", "nz", "ngf", "ndf", "d_norm", "z_mixture"]  # a checkpoint fits the same networks and noise
# per data set, settings that differ from the defaults above and training.add_run_flags' (measured:
# docs/results.md); a flag given on the command line wins, and a resumed run keeps its own.
# shapes: the built-in icons in about 6 CPU-minutes (60 epochs: cleaner shapes than 24); z from 64 clouds and
# DiffAugment without translation: 81% recognised (seed 0) where N(0, I) with translation gave 50%
DATA_DEFAULTS = {
    "shapes": dict(max_images=5000, epochs=60, batch_size=64, ngf=24, ndf=16, lr_g=1e-3, lr_d=1e-3, ema=0.99,
                   augment="flip", diffaug="color", z_mixture=64),
}

# -----------------------------------------------------------------------------
# the networks


def start_size(image_size):
    """G starts from a start x start map and doubles it until it is the image (D: the reverse).
    Halving while the side is even and above 5: 32 -> 4, 64 -> 4, 96 -> 3, 28 -> 7. The start must
    be 3 to 7 pixels after at least two halvings (as vae.py's sizes: 3 to 7 times a power of 2)."""
    start, doublings = image_size, 0
    while start % 2 == 0 and start > 5:
        start, doublings = start // 2, doublings + 1
    if doublings < 2 or start > 7:
        raise ValueError(f"--image-size {image_size}: give 3 to 7 times a power of 2 of at least 4, "
                         "such as 16, 24, 32, 48, 64 or 96")
    return start, doublings


class Generator(nn.Module):
    """z (B, nz, 1, 1) -> images (B, 3, S, S) in [-1, 1]. Shapes at 32x32, nz 100, ngf 64 (the paper's):
    (B, 100, 1, 1) -> (B, 256, 4, 4) -> (B, 128, 8, 8) -> (B, 64, 16, 16) -> (B, 3, 32, 32)"""

    def __init__(self, image_size, nz, ngf):
        super().__init__()
        start, doublings = start_size(image_size)
        # width[k]: channels of the map 2**(k + 1) times smaller than the image (at most ngf * 8)
        width = [ngf * min(2 ** k, 8) for k in range(doublings)]
        # BatchNorm always normalizes with the batch's own statistics (track_running_stats=False):
        # that is how G is trained, and samples are then made the same way
        layers = [nn.ConvTranspose2d(nz, width[-1], kernel_size=start, stride=1, padding=0, bias=False),
                  nn.BatchNorm2d(width[-1], track_running_stats=False), nn.ReLU(inplace=True)]  # (B, 256, 4, 4)
        for k in reversed(range(1, doublings)):
            # kernel 4, stride 2, padding 1 doubles the side: (B, width[k], s, s) -> (B, width[k-1], 2s, 2s)
            layers += [nn.ConvTranspose2d(width[k], width[k - 1], kernel_size=4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(width[k - 1], track_running_stats=False), nn.ReLU(inplace=True)]
        # no BatchNorm on G's output layer (DCGAN paper: it made training unstable); tanh -> [-1, 1]
        layers += [nn.ConvTranspose2d(width[0], 3, kernel_size=4, stride=2, padding=1, bias=False),
                   nn.Tanh()]  # (B, 3, 32, 32)
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z)


class Discriminator(nn.Module):
    """images (B, 3, S, S) -> one number per image (B,). Shapes at 32x32, ndf 64 (the paper's):
    (B, 3, 32, 32) -> (B, 64, 16, 16) -> (B, 128, 8, 8) -> (B, 256, 4, 4) -> (B,)"""

    def __init__(self, image_size, ndf, batchnorm=True):
        super().__init__()
        start, doublings = start_size(image_size)
        width = [ndf * min(2 ** k, 8) for k in range(doublings)]  # as in G
        # no BatchNorm on D's input layer (DCGAN paper); LeakyReLU(0.2) everywhere
        layers = [nn.Conv2d(3, width[0], kernel_size=4, stride=2, padding=1, bias=False),
                  nn.LeakyReLU(0.2, inplace=True)]  # (B, 64, 16, 16)
        for k in range(1, doublings):
            # kernel 4, stride 2, padding 1 halves the side: (B, width[k-1], s, s) -> (B, width[k], s/2, s/2)
            # (--d-norm none: no BatchNorm, with which G collapsed to one grey image at 64x64; the convolution
            # then has a bias, which BatchNorm's own shift makes redundant)
            layers += [nn.Conv2d(width[k - 1], width[k], kernel_size=4, stride=2, padding=1, bias=not batchnorm),
                       nn.BatchNorm2d(width[k]) if batchnorm else nn.Identity(), nn.LeakyReLU(0.2, inplace=True)]
        # last layer: one raw score per image; no sigmoid, the squared error acts on the score itself
        layers += [nn.Conv2d(width[-1], 1, kernel_size=start, stride=1, padding=0, bias=False)]  # (B, 1, 1, 1)
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x).flatten()  # (B,)


def weights_init(m):
    """DCGAN paper: every weight from N(0, 0.02); BatchNorm scales from N(1, 0.02), shifts 0."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, mean=1.0, std=0.02)
        nn.init.zeros_(m.bias)


# -----------------------------------------------------------------------------
# the loss: the squared error to a target, 1/2 E (D(.) - target)^2, in fp32, with the paper's targets
A, B, C = 0.0, 1.0, 1.0  # a: D's for fakes, b: D's for reals, c: G's for its fakes


def mse(scores, target):
    return 0.5 * F.mse_loss(scores.float(), torch.full_like(scores.float(), target))


def d_loss(d_real, d_fake):
    """D's loss from its scores: 1/2 E (D(x) - b)^2 + 1/2 E (D(G(z)) - a)^2."""
    return mse(d_real, B) + mse(d_fake, A)


def g_loss(d_gen):
    """G's loss from D's scores of its images: 1/2 E (D(G(z)) - c)^2. It keeps pushing fakes that D classifies
    right but that lie far from the reals, where dcgan.py's log loss has saturated: stronger gradients."""
    return mse(d_gen, C)


# -----------------------------------------------------------------------------


def main(argv=None):
    # the command line, checked before any work (see training.Run: the checkpoint's settings on
    # --resume, else DATA_DEFAULTS for --data; device, seed, torchrun's processes)
    run = training.Run(parser, argv, __file__, MUST_MATCH, curve_groups=[["loss_D", "loss_G"], ["D_x", "D_G_z"]],
                       data_defaults=DATA_DEFAULTS)
    args, device = run.args, run.device

    # data: every image in one uint8 tensor bank (N, 3, S, S) on the device; S is --image-size (when not
    # given, load_images sets it: the images' own size). None is needed to only sample a finished run:
    # run.epochs_left, the epochs this command trains, is 0 then, and the epoch loop below never runs
    bank = run.load_images() if run.epochs_left else None
    S = args.image_size
    images_per_step = args.batch_size * args.d_steps
    steps_per_epoch = len(bank) // images_per_step if bank is not None else 0
    if run.epochs_left and steps_per_epoch == 0:
        run.error(f"--batch-size {args.batch_size} x --d-steps {args.d_steps} is more than the {len(bank)} images")
    # (run.error: prints the message as a usage error and exits with status 2, as argparse does)
    # under torchrun, run.world processes each train on their own rows of every batch: all draw the whole
    # batch from the same generators (so a checkpoint has no rank in it) and keep their rows, `mine`;
    # DistributedDataParallel averages the gradients. One process (plain python): mine is the whole batch
    mine = slice(run.rank * args.batch_size // run.world, (run.rank + 1) * args.batch_size // run.world)

    def diffaug(x):
        """DiffAugment: colour, shift, cutout with fresh parameters for each image; differentiable, so G
        learns through it (augmenting only the reals would teach G the augmented images)."""
        if args.diffaug == "none":
            return x
        params = random_diffaug(args.batch_size, S, S, args.diffaug, generator=run.augment_gen, device=device)
        return diff_augment(x, params.select(mine))

    # the model: G and D are what checkpoints save; G_train and D_train are the same networks as the
    # training steps call them (compiled with --compile, DistributedDataParallel under torchrun);
    # samples come from G_ema, a moving average of G's weights (smoother than G's last step)
    try:
        G, D = Generator(S, args.nz, args.ngf).to(device), Discriminator(S, args.ndf, args.d_norm == "batch").to(device)
    except ValueError as error:
        run.error(str(error))
    G.apply(weights_init)
    D.apply(weights_init)
    G_ema = copy.deepcopy(G).requires_grad_(False) if args.ema else G
    G_train, D_train = run.wrap(G), run.wrap(D)

    # the noise: z ~ N(0, I), as in the paper, or with --z-mixture K, z = c_k + N(0, I) with k uniform among K
    # fixed centres c_k ~ N(0, I) (GM-GAN, Ben-Yosef & Weinshall 2018). Why: G is continuous, so it maps the one
    # connected cloud N(0, I) onto one connected set of images; where the data's modes are apart (a disc, a
    # square) it must draw images between them, neither disc nor square. Separate clouds let it jump.
    noise_gen = torch.Generator().manual_seed(args.seed)
    centres = torch.randn(args.z_mixture, args.nz, generator=noise_gen).to(device)  # (K, nz); (0, nz) when off

    def draw_noise(count, generator=None):
        """count noise vectors (count, nz, 1, 1) on the device: from generator (on the CPU) if given,
        else from the device's own random stream"""
        where = device if generator is None else "cpu"
        z = torch.randn(count, args.nz, generator=generator, device=where)
        if args.z_mixture:
            k = torch.randint(args.z_mixture, (count,), generator=generator, device=where)
            z = z + centres.to(where)[k]
        return z.to(device).view(count, args.nz, 1, 1)

    fixed_z = draw_noise(64, noise_gen)

    # optimizers: Adam(2e-4, betas=(0.5, 0.999)) as in the DCGAN paper; a lower beta1 reacts faster
    # to an opponent that keeps changing
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr_g, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr_d, betas=(0.5, 0.999))
    # what a checkpoint holds besides the position; --resume loads each of them back, and the random states
    state = dict(G=G, D=D, G_ema=G_ema if args.ema else None, opt_g=opt_g, opt_d=opt_d, fixed_z=fixed_z,
                 z_centres=centres if args.z_mixture else None)
    # run.checkpoint: the --resume dict (None without); position: where it stopped (epoch: run.start_epoch)
    position = run.restore(**state) if run.checkpoint else dict(epoch=0, batch=0, step=0)
    step = position["step"]

    run.start(args.epochs * steps_per_epoch, step, images_per_step)  # the progress bar; Ctrl-C handling
    for epoch in range(run.start_epoch, args.epochs):
        # this epoch's order depends only on (seed, epoch), so a resumed run sees the same batches
        # (100,003: more than any epoch count, so no two (seed, epoch) pairs share a generator seed)
        order = torch.randperm(len(bank), device=device,
                               generator=torch.Generator(device).manual_seed(args.seed * 100_003 + epoch))
        # batch counts this epoch's G steps; each takes --d-steps batches of --batch-size images for D
        for batch in range(position["batch"] if epoch == run.start_epoch else 0, steps_per_epoch):
            # (1) update D on reals and fakes: min d_loss (above), --d-steps times, each on a new batch
            for k in range(args.d_steps):
                # a batch of reals: images of the bank, each through its own random affine matrix theta
                # (--augment's flip, shift, zoom, rotation), in one fused pass. In plain PyTorch:
                #     x = bank[index].float() / 127.5 - 1
                #     real = F.grid_sample(x, F.affine_grid(theta, x.shape), padding_mode="reflection")
                first = (batch * args.d_steps + k) * args.batch_size
                index = order[first:first + args.batch_size][mine]
                theta = random_affine(args.batch_size, **run.affine_ranges, generator=run.augment_gen,
                                      device=device)[mine]
                real = warp_batch(bank, index, theta, S, padding="reflection", dtype=run.image_dtype,  # bf16 on GPUs
                                  check_index=False)  # indices from randperm are valid: no check, no sync
                z = draw_noise(args.batch_size)[mine]
                with run.autocast:  # bf16 on a GPU, nothing on the CPU
                    with torch.no_grad():
                        fake = G_train(z)  # the D step does not train G: no graph through G
                    real, fake = diffaug(real), diffaug(fake)
                    d_real, d_fake = D_train(real), D_train(fake)
                    loss_d = d_loss(d_real, d_fake)
                opt_d.zero_grad(set_to_none=True)
                loss_d.backward()
                opt_d.step()

            # (2) update G: min g_loss (above), through D, on fresh noise
            z = draw_noise(args.batch_size)[mine]
            with run.autocast:
                d_gen = D_train(diffaug(G_train(z)))
                loss_g = g_loss(d_gen)
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            if args.ema:  # G_ema <- d G_ema + (1 - d) G, d = min(--ema, (1 + step) / (10 + step)): a warm-up
                training.ema_update(G_ema, G, args.ema, step)
            step += 1

            # the curves: kept on the device, fetched every --log-every steps (one transfer). D_x and D_G_z:
            # D's mean output on the last D step's reals and fakes, augmented as D saw them
            run.log(step, epoch, loss_D=loss_d, loss_G=loss_g, D_x=d_real.float().mean(), D_G_z=d_fake.float().mean())
            run.stop_if_nonfinite()  # a NaN or inf among the fetched losses: exits, the last checkpoint kept
            if run.stop_requested():  # Ctrl-C or SIGTERM: a checkpoint to resume from, then stop
                run.save(dict(epoch=epoch, batch=batch + 1, step=step), **state)
                run.stopped(step)  # says how to resume, then exits 130 (143 on SIGTERM): no samples
        # checkpoint.pt, curves.csv/png; on a full disk, or a NaN since the last fetch, it exits (one line)
        run.save(dict(epoch=epoch + 1, batch=0, step=step), **state)
        with torch.no_grad():
            run.save_grid(G_ema(fixed_z), epoch + 1, step)  # grid.png, and grids/ keeps every epoch's
        run.write(f"epoch {epoch + 1}/{args.epochs}: step {step}, {args.out}/grid.png, {run.ckpt_path}")
    run.finish()  # the progress bar closed, Ctrl-C back to Python's, torchrun's process group left

    if not run.epochs_left:  # only sampling a finished run (maybe into a new --out): its grid too
        with torch.no_grad():
            run.save_grid(G_ema(fixed_z))

    # --sample N: samples from the averaged G, in fp32 (bf16 keeps 8 bits of mantissa: a grey level of error)
    sample_gen = torch.Generator().manual_seed(args.seed + 1)  # not fixed_z's noise

    def generate(count):  # always batches of 500, the last one cut to count: G's BatchNorm normalizes
        with torch.no_grad():  # over the batch it is given, so a batch of a few images would be off
            return to_uint8(G_ema(draw_noise(500, sample_gen)))[:count]

    # calls generate(count) until it has N images: samples/1.png ... N.png (NAME.zip with --zip NAME);
    # nothing without --sample, and only process 0 writes
    run.write_samples(generate)


if __name__ == "__main__":
    main()
