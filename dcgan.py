"""DCGAN: the vanilla GAN objective on deep convolutional networks (Radford et al. 2015).

    python dcgan.py                                    # built-in shapes, 32x32: 25 epochs of 20,000 icons, a GPU job
    python dcgan.py --max-images 5000 --epochs 8 --batch-size 64 --ngf 32 --ndf 32 \\
        --augment flip --diffaug color,translation,cutout    # the built-in icons need it: README
                                                       # about 1 min on 2 idle cores: the icons' palette and layout
    python dcgan.py --data anime --epochs 100          # 64x64 anime faces (--image-size 96 for 96x96)
    python dcgan.py --data lld --epochs 20 --sample 50000 --zip 0860912_img    # the LLD hand-in
    python dcgan.py --resume out/dcgan-lld/checkpoint.pt --epochs 0 --sample 50000 --zip 0860912_img

Everything goes to --out (default out/dcgan-<data>/): grid.png (64 samples from fixed noise,
rewritten every epoch; grids/ keeps one per epoch), curves.csv and curves.png (losses, raw and
smoothed), checkpoint.pt (every epoch and on Ctrl-C; --resume continues from it), and with
--sample N: samples/1.png ... N.png (and NAME.zip with --zip NAME).

The objective, as the assignment states it (D(x) is the probability that x is real):

    max_D  E_x log D(x) + E_z log(1 - D(G(z)))
    min_G  E_z log(1 - D(G(z)))

D outputs a logit l with D(x) = sigmoid(l), and both lines are binary cross-entropies on
logits, which are exact and safe under bf16 autocast where log(sigmoid(l)) would not be.

`diff dcgan.py lsgan.py` and `diff dcgan.py wgan.py` show what the other objectives change.
Results on the real anime faces at 32x32 from 8-epoch runs on a 2-core CPU (samples, curves,
sliced Wasserstein distances, the effect of augmentation, the exact commands): README,
"Results on the real anime faces". LLD, 64/96-px faces and Inception Scores need a GPU and
the Inception weights: not measured yet.
"""

import argparse
import contextlib
import copy
import os
import signal

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
from augment import diff_augment, random_affine, random_diffaug, warp_batch
from outputs import CurveLog, resume_settings, save_checkpoint, save_grid, to_uint8, write_samples

SCRIPT = os.path.splitext(os.path.basename(__file__))[0]

# -----------------------------------------------------------------------------
# settings: `python dcgan.py --help` lists them with their defaults

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
group = parser.add_argument_group("data")
group.add_argument("--data", default="shapes", help="shapes (built in), lld, anime, or a folder/file of images")
group.add_argument("--data-root", default=None, help="folder that holds the datasets; if not given: data.py's")
group.add_argument("--image-size", type=int, default=None, help="side of the images G makes and D sees; if not given: the data's own, or the checkpoint's")
group.add_argument("--max-images", type=int, default=None, help="use only the first N images (quick runs)")
group.add_argument("--augment", default="none", help="geometric augmentation of the reals: comma-separated flip[=probability 0.5], translate[=fraction 0.125], scale[=max zoom 1.25], rotate[=degrees 10], or none (measured best on the real faces: README)")
group.add_argument("--diffaug", default="none", help="DiffAugment policy applied to reals and fakes in both steps, e.g. color,translation,cutout, or none (measured best on the real faces: README)")
group = parser.add_argument_group("model")
group.add_argument("--nz", type=int, default=100, help="size of the noise vector z")
group.add_argument("--ngf", type=int, default=64, help="G's width: channels of its last hidden layer")
group.add_argument("--ndf", type=int, default=64, help="D's width: channels of its first layer")
group.add_argument("--ema", type=float, default=0.999, help="decay of the moving average of G's weights used for samples (0: off)")
group = parser.add_argument_group("training")
group.add_argument("--epochs", type=int, default=25, help="train until this many epochs are done in all (0: only sample)")
group.add_argument("--batch-size", type=int, default=128, help="images per D and G update")
group.add_argument("--lr-g", type=float, default=2e-4, help="G's learning rate (Adam)")
group.add_argument("--lr-d", type=float, default=2e-4, help="D's learning rate (Adam)")
group.add_argument("--d-steps", type=int, default=1, help="D updates per G update, each on a new batch")
group.add_argument("--g-loss", default="non-saturating", choices=["non-saturating", "saturating"], help="G's loss: -log D(G(z)) or log(1 - D(G(z)))")
group.add_argument("--seed", type=int, default=0, help="seed of every random draw (reproducible runs)")
group.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
group.add_argument("--compile", action="store_true", help="torch.compile G and D (faster steps after a slow first one)")
group.add_argument("--log-every", type=int, default=20, help="steps between fetches of the losses (progress bar, curves, NaN check)")
group = parser.add_argument_group("output")
group.add_argument("--out", default=None, help="output folder; if not given: out/<script>-<data>")
group.add_argument("--resume", default=None, metavar="CKPT", help="continue from this checkpoint; settings not given here come from it")
group.add_argument("--sample", type=int, default=0, metavar="N", help="after training, write N samples as <out>/samples/1.png ... N.png")
group.add_argument("--zip", default=None, metavar="NAME", help="with --sample: also write <out>/NAME.zip holding the folder NAME/ with the PNGs")
group.add_argument("--force", action="store_true", help="overwrite the samples (and zip) of an earlier run, or start a new run over an old checkpoint")

# settings that fix the shapes of the networks: a checkpoint only fits the same values
MODEL_SETTINGS = ["image_size", "nz", "ngf", "ndf"]
# settings that belong to one invocation, never taken from a checkpoint
COMMAND_SETTINGS = ["resume", "sample", "zip", "force", "device", "compile"]

# -----------------------------------------------------------------------------
# the networks


def start_size(image_size):
    """G starts from (and D ends at) a start x start map; image_size = start * 2**doublings."""
    start, doublings = image_size, 0
    while start % 2 == 0 and start > 5:
        start, doublings = start // 2, doublings + 1
    if doublings < 2:
        raise ValueError(f"--image-size must be a multiple of 4 such as 32, 48, 64 or 96, got {image_size}")
    return start, doublings


class Generator(nn.Module):
    """z (B, nz, 1, 1) -> images (B, 3, S, S) in [-1, 1]. For S = 64 and ngf = 64:
    (B, 100, 1, 1) -> (B, 512, 4, 4) -> (B, 256, 8, 8) -> (B, 128, 16, 16) -> (B, 64, 32, 32) -> (B, 3, 64, 64)
    """

    def __init__(self, image_size, nz, ngf):
        super().__init__()
        start, doublings = start_size(image_size)
        width = [ngf * min(2 ** k, 8) for k in range(doublings)]  # channels at S/2, S/4, ...
        # BatchNorm always normalizes with the batch's own statistics (track_running_stats=False):
        # that is how G is trained, and samples are then made the same way
        layers = [nn.ConvTranspose2d(nz, width[-1], kernel_size=start, stride=1, padding=0, bias=False),
                  nn.BatchNorm2d(width[-1], track_running_stats=False), nn.ReLU(inplace=True)]  # (B, ngf*8, 4, 4)
        for k in reversed(range(1, doublings)):
            # kernel 4, stride 2, padding 1 doubles the side: (B, width[k], s, s) -> (B, width[k-1], 2s, 2s)
            layers += [nn.ConvTranspose2d(width[k], width[k - 1], kernel_size=4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(width[k - 1], track_running_stats=False), nn.ReLU(inplace=True)]
        # no BatchNorm on G's output layer (DCGAN paper: it made training unstable); tanh -> [-1, 1]
        layers += [nn.ConvTranspose2d(width[0], 3, kernel_size=4, stride=2, padding=1, bias=False), nn.Tanh()]  # (B, 3, S, S)
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z)


class Discriminator(nn.Module):
    """images (B, 3, S, S) -> one score per image (B,). For S = 64 and ndf = 64:
    (B, 3, 64, 64) -> (B, 64, 32, 32) -> (B, 128, 16, 16) -> (B, 256, 8, 8) -> (B, 512, 4, 4) -> (B,)
    """

    def __init__(self, image_size, ndf):
        super().__init__()
        start, doublings = start_size(image_size)
        width = [ndf * min(2 ** k, 8) for k in range(doublings)]  # channels at S/2, S/4, ...
        # no BatchNorm on D's input layer (DCGAN paper); LeakyReLU(0.2) everywhere
        layers = [nn.Conv2d(3, width[0], kernel_size=4, stride=2, padding=1, bias=False),
                  nn.LeakyReLU(0.2, inplace=True)]  # (B, ndf, S/2, S/2)
        for k in range(1, doublings):
            # kernel 4, stride 2, padding 1 halves the side: (B, width[k-1], s, s) -> (B, width[k], s/2, s/2)
            layers += [nn.Conv2d(width[k - 1], width[k], kernel_size=4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(width[k]), nn.LeakyReLU(0.2, inplace=True)]
        # last layer: one logit per image, D(x) = sigmoid(logit); the sigmoid lives inside the loss
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


def parse_augment(spec):
    """'flip,translate=0.1' -> keyword arguments of random_affine; 'none' -> the identity."""
    defaults = {"flip": 0.5, "translate": 0.125, "scale": 1.25, "rotate": 10.0}
    kwargs = {"flip": 0.0}
    for item in spec.split(","):
        name, _, value = item.strip().partition("=")
        if name in ("", "none"):
            continue
        if name not in defaults:
            raise ValueError(f"--augment: unknown {name!r}; use flip, translate, scale, rotate or none")
        kwargs[name] = float(value) if value else defaults[name]
    if "scale" in kwargs:
        kwargs["scale"] = (1.0, kwargs["scale"])  # zoom in by up to this factor: a random crop
    return kwargs


# -----------------------------------------------------------------------------


def main(argv=None):
    args = parser.parse_args(argv)
    # resume: settings not given on this command line come from the checkpoint
    checkpoint = resume_settings(parser, argv, args, MODEL_SETTINGS, COMMAND_SETTINGS) if args.resume else None
    args.out = args.out or os.path.join("out", f"{SCRIPT}-{os.path.basename(os.path.normpath(args.data))}")
    use_diffaug = args.diffaug not in ("", "none")
    try:
        affine = parse_augment(args.augment)
        random_diffaug(1, 8, 8, args.diffaug if use_diffaug else "")  # raises for an unknown policy
    except ValueError as error:
        parser.error(str(error))
    if args.sample < 0 or (args.zip and not args.sample):
        parser.error("--sample N needs N > 0, and --zip NAME needs --sample N")
    # refuse now what would be refused after training
    samples_dir = os.path.join(args.out, "samples")
    if args.sample and os.path.isdir(samples_dir) and os.listdir(samples_dir) and not args.force:
        parser.error(f"{samples_dir} is not empty: pass --force to overwrite it, or choose another --out")
    zip_path = os.path.join(args.out, args.zip.removesuffix(".zip") + ".zip") if args.zip else None
    if zip_path and os.path.exists(zip_path) and not args.force:
        parser.error(f"{zip_path} exists: pass --force to overwrite it, or choose another --out or --zip")
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    if not args.resume and args.epochs > 0 and os.path.exists(ckpt_path) and not args.force:
        parser.error(f"{ckpt_path} exists: pass --resume {ckpt_path} to continue it, --force to start over, or another --out")

    # setup: seeds, device, precision
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this torch sees no CUDA GPU; use --device cpu")
    # bf16 autocast on the GPU (no loss scaling needed, unlike fp16); plain fp32 on the CPU
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    image_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    augment_gen = torch.Generator().manual_seed(args.seed)  # draws every augmentation parameter, on the CPU
    start_epoch = checkpoint["epoch"] if checkpoint else 0
    train = start_epoch < args.epochs

    # data: one uint8 tensor (N, 3, H, W) that lives on the device; a batch is a slice of indices
    bank = None
    if train or args.image_size is None:
        try:
            bank = data.load_images(args.data, root=args.data_root, size=args.image_size)
        except (FileNotFoundError, ValueError) as error:  # unknown name, missing or unreadable files
            parser.error(str(error))
        bank = bank[: args.max_images].contiguous() if args.max_images else bank
        args.image_size = args.image_size or bank.shape[-1]
        bank = bank.to(device)
    images_per_step = args.batch_size * args.d_steps
    steps_per_epoch = len(bank) // images_per_step if bank is not None else 0
    if train and steps_per_epoch == 0:
        parser.error(f"--batch-size {args.batch_size} x --d-steps {args.d_steps} is more than the {len(bank)} images")
    S = args.image_size
    try:
        start_size(S)
    except ValueError as error:
        parser.error(str(error))

    # model
    G = Generator(S, args.nz, args.ngf).to(device)
    D = Discriminator(S, args.ndf).to(device)
    G.apply(weights_init)
    D.apply(weights_init)
    G_ema = copy.deepcopy(G).requires_grad_(False) if args.ema > 0 else G  # the weights samples come from
    # torch.compile wraps the modules; checkpoints save the plain ones (the wrapper's state_dict
    # prefixes every key with "_orig_mod.")
    G_train, D_train = (torch.compile(G), torch.compile(D)) if args.compile else (G, D)

    # loss: binary cross-entropy on logits, BCE(l, y) = -[y log sigmoid(l) + (1 - y) log(1 - sigmoid(l))]
    def bce(logits, target):
        return F.binary_cross_entropy_with_logits(logits.float(), torch.full_like(logits.float(), target))

    # optimizers: Adam(2e-4, betas=(0.5, 0.999)) as in the DCGAN paper; a lower beta1 reacts faster
    # to an opponent that keeps changing
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr_g, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr_d, betas=(0.5, 0.999))

    # resume: weights, optimizer moments, position in the data, random states, curves
    log = CurveLog(every=args.log_every, groups=[["loss_D", "loss_G"], ["D_x", "D_G_z"]])
    fixed_z = torch.randn(64, args.nz, 1, 1, generator=torch.Generator().manual_seed(args.seed)).to(device)
    step, start_batch = 0, 0
    if checkpoint:
        G.load_state_dict(checkpoint["G"])
        D.load_state_dict(checkpoint["D"])
        if args.ema > 0:
            G_ema.load_state_dict(checkpoint["G_ema"] or checkpoint["G"])
        opt_g.load_state_dict(checkpoint["opt_g"])
        opt_d.load_state_dict(checkpoint["opt_d"])
        for opt, lr in ((opt_g, args.lr_g), (opt_d, args.lr_d)):
            for param_group in opt.param_groups:
                param_group["lr"] = lr  # this command's learning rates, if it gives new ones
        step, start_batch = checkpoint["step"], checkpoint["batch"]
        torch.set_rng_state(checkpoint["rng"]["cpu"])
        if device.type == "cuda" and checkpoint["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], device)
        augment_gen.set_state(checkpoint["rng"]["augment"])
        fixed_z = checkpoint["fixed_z"].to(device)
        log.load_state_dict(checkpoint["curves"])
        print(f"resumed {args.resume}: epoch {start_epoch}, step {step}")
    saved = {"path": None, "step": None}  # the last checkpoint this run wrote

    def save(epoch, batch):
        """Checkpoint, curves and sample grid, unless a loss went NaN/inf since the last fetch."""
        log.flush()
        stop_if_nonfinite()
        save_checkpoint({
            "G": G.state_dict(), "D": D.state_dict(), "G_ema": G_ema.state_dict() if args.ema > 0 else None,
            "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
            "step": step, "epoch": epoch, "batch": batch, "args": vars(args),
            "rng": {"cpu": torch.get_rng_state(), "augment": augment_gen.get_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
            "fixed_z": fixed_z.cpu(), "curves": log.state_dict(),
        }, ckpt_path)
        saved.update(path=ckpt_path, step=step)
        bar.update(step * images_per_step - bar.n)
        log.save(args.out, title=f"{SCRIPT} on {args.data}")
        with torch.no_grad():
            grid = G_ema(fixed_z)
        save_grid(grid, os.path.join(args.out, "grids", f"epoch-{epoch:04d}-step-{step}.png"))
        save_grid(grid, os.path.join(args.out, "grid.png"))

    def stop_if_nonfinite():
        if log.nonfinite:
            bad_step, name = log.nonfinite
            log.save(args.out, title=f"{SCRIPT} on {args.data}")
            good = saved if saved["path"] else {"path": args.resume, "step": checkpoint and checkpoint["step"]}
            kept = (f"the last good checkpoint, {good['path']} (step {good['step']}), is kept" if good["path"]
                    else "no checkpoint had been written yet")
            raise SystemExit(f"{SCRIPT}: {name} is NaN or infinite at step {bad_step}: stopping; {kept}. "
                             "Lower --lr-d/--lr-g, or resume from that checkpoint.")

    def augment(x):
        """DiffAugment with fresh parameters: differentiable, so G learns through it."""
        if not use_diffaug:
            return x
        params = random_diffaug(len(x), S, S, args.diffaug, generator=augment_gen, device=device)  # drawn on the CPU, copied without a host sync
        return diff_augment(x, params)

    # Ctrl-C: finish the current step, write a checkpoint, exit cleanly (twice: stop at once)
    stop = []

    def request_stop(signum, frame):
        stop.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        tqdm.write("Ctrl-C: saving a checkpoint after this step (press again to quit without one)")

    previous_handler = signal.signal(signal.SIGINT, request_stop) if train else None
    bar = tqdm(total=args.epochs * steps_per_epoch * images_per_step, initial=step * images_per_step,
               unit="img", unit_scale=True, dynamic_ncols=True, disable=not train)
    try:
        for epoch in range(start_epoch, args.epochs):
            # this epoch's order depends only on (seed, epoch): a resumed run sees the same batches
            order = torch.randperm(len(bank), device=device,
                                   generator=torch.Generator(device).manual_seed(args.seed * 100_003 + epoch))
            for batch in range(start_batch if epoch == start_epoch else 0, steps_per_epoch):
                # (1) Update D: maximize E log D(x) + E log(1 - D(G(z)))
                #     i.e. minimize BCE(D(x), 1) + BCE(D(G(z)), 0)
                for k in range(args.d_steps):
                    first = (batch * args.d_steps + k) * args.batch_size
                    index = order[first: first + args.batch_size]  # valid by construction: no check
                    theta = random_affine(args.batch_size, **affine, generator=augment_gen, device=device)
                    real = warp_batch(bank, index, theta, S, padding="reflection", dtype=image_dtype, check_index=False)
                    z = torch.randn(args.batch_size, args.nz, 1, 1, device=device)
                    with autocast:
                        with torch.no_grad():
                            fake = G_train(z)  # the D step does not train G: no graph through G needed
                        real, fake = augment(real), augment(fake)
                        d_real, d_fake = D_train(real), D_train(fake)
                        loss_d = bce(d_real, 1.0) + bce(d_fake, 0.0)
                    opt_d.zero_grad(set_to_none=True)
                    loss_d.backward()
                    opt_d.step()

                # (2) Update G: the assignment's  min_G E log(1 - D(G(z)))  saturates: when D
                #     rejects the fakes confidently, log(1 - D(G(z))) is flat and G gets almost no
                #     gradient. The non-saturating loss min_G -E log D(G(z)) = BCE(D(G(z)), 1) has the
                #     same fixed point and strong gradients exactly then (Goodfellow et al. 2014).
                z = torch.randn(args.batch_size, args.nz, 1, 1, device=device)
                with autocast:
                    d_gen = D_train(augment(G_train(z)))
                    loss_g = bce(d_gen, 1.0) if args.g_loss == "non-saturating" else -bce(d_gen, 0.0)
                opt_g.zero_grad(set_to_none=True)
                loss_g.backward()
                opt_g.step()

                # (3) moving average of G's weights: ema = d * ema + (1 - d) * G, with d small at
                #     first so that early samples are not the random initialization
                if args.ema > 0:
                    decay = min(args.ema, (1 + step) / (10 + step))
                    with torch.no_grad():
                        for p_ema, p in zip(G_ema.parameters(), G.parameters()):
                            p_ema.lerp_(p, 1 - decay)
                step += 1

                # losses stay on the device; every --log-every steps one transfer fetches them
                shown = log.append(step, loss_D=loss_d, loss_G=loss_g, D_x=torch.sigmoid(d_real.float()).mean(),
                                   D_G_z=torch.sigmoid(d_fake.float()).mean())
                if shown:
                    stop_if_nonfinite()
                    bar.update(step * images_per_step - bar.n)
                    bar.set_postfix_str(f"epoch {epoch + 1} D {shown['loss_D']:.3f} G {shown['loss_G']:.3f} "
                                        f"D(x) {shown['D_x']:.2f} D(G(z)) {shown['D_G_z']:.2f}")
                if stop:
                    save(epoch, batch + 1)
                    bar.close()
                    print(f"stopped at step {step}; continue with: python {SCRIPT}.py --resume {ckpt_path}")
                    return
            save(epoch + 1, 0)
            tqdm.write(f"epoch {epoch + 1}/{args.epochs}: step {step}, {args.out}/grid.png, {ckpt_path}")
    finally:
        bar.close()
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)

    # outputs: samples from the moving-average G, at the training size, in fp32 (bf16 keeps 8
    # bits of mantissa: up to a grey level of error in a PNG)
    if not train:
        with torch.no_grad():
            save_grid(G_ema(fixed_z), os.path.join(args.out, "grid.png"))
    if args.sample:
        sample_gen = torch.Generator().manual_seed(args.seed + 1)

        def generate(count):
            z = torch.randn(min(count, 500), args.nz, 1, 1, generator=sample_gen).to(device)
            with torch.no_grad():
                return to_uint8(G_ema(z))

        folder, zip_path = write_samples(generate, args.sample, samples_dir, force=args.force, zip_name=args.zip)
        print(f"wrote {args.sample} samples ({S}x{S} RGB) to {folder}" + (f" and {zip_path}" if zip_path else ""))


if __name__ == "__main__":
    main()
