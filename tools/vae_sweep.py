"""Latent size and minibatch size of vae.py, one factor at a time: a run per variant, then a table and a figure.

    python tools/vae_sweep.py --data anime --image-size 32 --epochs 3          # README: the table this gives
    python tools/vae_sweep.py --latents 16,128 --batch-sizes 64 --epochs 2     # every other flag goes to vae.py

Each latent size of --latents is trained at vae.py's --batch-size, then each batch size of --batch-sizes
at its --latent (the pair in both lists once), each as `vae.py ... --latent Z --batch-size B --out
<out>/latentZ-batchB` with every other flag of this command. A variant whose folder holds a checkpoint
is resumed (one that has all its epochs is only measured), so an interrupted sweep goes on where it
stopped; --force trains them all over. Then, in --out (default out/vae-<data>/sweep/): sweep.csv and
sweep.md (one row per variant: the held-out -ELBO, its terms, bits/dim, squared error, steps, training
time) and sweep.png (the held-out -ELBO per epoch of each factor's variants; under it each variant's
samples.png and reconstructions.png).
"""

import argparse
import csv
import os
import sys

from ganlab import data
from ganlab import flags
import vae


def sizes(text):
    """Argparse type: comma-separated whole numbers >= 1, such as 16,64,256."""
    values = [flags.positive_int(value) for value in text.split(",") if value.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"give whole numbers >= 1 separated by commas, got {text!r}")
    return values


parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                 epilog="Every other flag goes to each vae.py run: see python vae.py --help.")
parser.add_argument("--latents", type=sizes, default="16,32,128,512", help="latent sizes to compare")
parser.add_argument("--batch-sizes", type=sizes, default="16,64,256", help="batch sizes to compare")
parser.add_argument("--out", default=None, help="folder of the sweep; if not given: out/vae-<data>/sweep")
parser.add_argument("--force", action="store_true", help="train every variant over, even one that has a checkpoint")
COLUMNS = ["latent", "batch_size", "steps", "neg_elbo", "recon", "kl", "bits_per_dim", "mse", "train_seconds"]


def main(argv=None):
    args, rest = parser.parse_known_args(argv)
    for flag in ["--resume", "--sample", "--zip"]:
        if any(arg == flag or arg.startswith(flag + "=") for arg in rest):
            parser.error(f"{flag}: the sweep trains (and resumes) its own runs under --out; "
                         "give it to vae.py for one of them instead")
    base = vae.parser.parse_args(rest)  # vae.py's own flags: a bad one is refused now, before any run
    folder = args.out or os.path.join("out", f"vae-{os.path.basename(os.path.normpath(base.data))}", "sweep")
    try:
        flags.check_output_folder(folder)
    except ValueError as error:
        parser.error(str(error))

    variants = [(latent, base.batch_size) for latent in args.latents]
    variants += [(base.latent, batch_size) for batch_size in args.batch_sizes]
    check_batch_sizes(base, {batch_size for _, batch_size in variants})
    rows = []
    for latent, batch_size in dict.fromkeys(variants):  # in order, the pair of the defaults once
        out = os.path.join(folder, f"latent{latent}-batch{batch_size}")
        checkpoint = os.path.join(out, "checkpoint.pt")
        resume = os.path.exists(checkpoint) and not args.force
        run = rest + ["--latent", str(latent), "--batch-size", str(batch_size), "--out", out]
        run += ["--resume", checkpoint] if resume else ["--force"] if args.force else []
        print(f"sweep: python vae.py {' '.join(run)}", file=sys.stderr)
        try:
            result = vae.main(run)
        except SystemExit as error:
            if resume and error.code == 2:  # the checkpoint's settings differ from this command's
                print(f"sweep: {out} holds this variant trained with other settings (see above): pass --force "
                      "to train the sweep over, or give another --out", file=sys.stderr)
            if error.code in (130, 143):  # stopped by Ctrl-C or SIGTERM: its checkpoint is written
                print("sweep: stopped; the same sweep command goes on from there (this variant resumes)",
                      file=sys.stderr)
            raise
        with open(os.path.join(out, "elbo.csv"), newline="") as f:
            curve = [(int(row["epoch"]), float(row["heldout_neg_elbo"])) for row in csv.DictReader(f)]
        rows.append(dict(result, latent=latent, batch_size=batch_size, curve=curve))
    write_table(rows, folder)
    write_figure(rows, folder, base)
    return rows


def check_batch_sizes(base, batch_sizes):
    """Refuse a missing dataset, or a batch size larger than the training split, now: not at that
    variant's turn, after the ones before it have trained."""
    if base.holdout >= 1:
        return  # vae.py refuses it, at the first variant, before any training
    try:
        count = len(data.load_images(base.data, root=base.data_root, size=base.image_size, limit=base.max_images,
                                     progress=False))
    except (FileNotFoundError, ValueError, OSError) as error:
        parser.error(str(error))
    n_train = count - vae.heldout_count(count, base.holdout)
    too_big = sorted(b for b in batch_sizes if b > n_train)
    if too_big:
        parser.error(f"batch size {', '.join(map(str, too_big))}: more than the {n_train} training images "
                     f"({count} images less {count - n_train} held out): give smaller --batch-sizes / --batch-size, "
                     "or more images (--max-images)")


def write_table(rows, folder):
    """sweep.csv and sweep.md: one row per variant; the Markdown table is also printed."""
    with open(os.path.join(folder, "sweep.csv.tmp"), "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()} for row in rows)
    os.replace(os.path.join(folder, "sweep.csv.tmp"), os.path.join(folder, "sweep.csv"))
    lines = ["| latent | batch | steps | held-out -ELBO (nats/image) | reconstruction | KL | bits/dim "
             "| MSE per pixel | train time (s) |", "|---:" * 9 + "|"]
    for r in rows:
        lines.append(f"| {r['latent']} | {r['batch_size']} | {r['steps']} | {r['neg_elbo']:.1f} | {r['recon']:.1f} "
                     f"| {r['kl']:.1f} | {r['bits_per_dim']:.3f} | {r['mse']:.4f} | {r['train_seconds']:.0f} |")
    table = "\n".join(lines) + "\n"
    with open(os.path.join(folder, "sweep.md.tmp"), "w") as f:
        f.write(table)
    os.replace(os.path.join(folder, "sweep.md.tmp"), os.path.join(folder, "sweep.md"))
    print(table, end="")


def write_figure(rows, folder, base):
    """sweep.png: on top, the held-out -ELBO per epoch by latent size (at the base batch size) and by
    batch size (at the base latent size); under it, each variant's samples and reconstructions."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(rows)
    fig = plt.figure(figsize=(max(8, 2.6 * n), 9), layout="constrained")
    run = rows[0]["settings"]  # what is common to the variants
    fig.suptitle(f"vae.py on {run['data']}: {run['image_size']}x{run['image_size']}, {run['epochs']} epochs, "
                 f"lr {run['lr']}, seed {run['seed']}")
    grid = fig.add_gridspec(3, 2 * n, height_ratios=[1.4, 1, 0.3])
    for k, (factor, fixed) in enumerate([("latent", "batch_size"), ("batch_size", "latent")]):
        ax = fig.add_subplot(grid[0, k * n:(k + 1) * n])
        for r in sorted(rows, key=lambda r: r[factor]):
            if r[fixed] == getattr(base, fixed):
                ax.plot(*zip(*r["curve"]), "o-", label=f"{factor.replace('_', ' ')} {r[factor]}")
        ax.set(title=f"held-out -ELBO by {factor.replace('_', ' ')} ({fixed.replace('_', ' ')} {getattr(base, fixed)})",
               xlabel="epoch", ylabel="nats per image (lower is better)")
        ax.grid(alpha=0.3)
        ax.legend()
    for j, r in enumerate(rows):
        for i, (name, caption) in enumerate([("samples.png", f"-ELBO {r['neg_elbo']:.0f}\nsamples"),
                                              ("reconstructions.png", f"MSE {r['mse']:.4f}\nreconstructions")]):
            ax = fig.add_subplot(grid[i + 1, 2 * j:2 * j + 2])
            ax.imshow(plt.imread(os.path.join(r["settings"]["out"], name)))
            ax.set_axis_off()
            ax.set_title(f"latent {r['latent']}, batch {r['batch_size']}: {caption}", fontsize=9)
    fig.savefig(os.path.join(folder, "sweep.png.tmp"), format="png", dpi=100)
    plt.close(fig)
    os.replace(os.path.join(folder, "sweep.png.tmp"), os.path.join(folder, "sweep.png"))
    print(f"sweep: wrote {folder}/sweep.csv, sweep.md and sweep.png", file=sys.stderr)


if __name__ == "__main__":
    main()
