"""Training throughput: dcgan.py's step fed by the resident uint8 bank, against a DataLoader.

    python bench_train.py                      # on cuda if present, else the CPU
    python bench_train.py --device cpu --seconds 20 --only shapes

The same DCGAN step (dcgan.py's loop body: D update on reals and fakes, G update, EMA, with
DiffAugment; bf16 autocast on CUDA, fp32 on the CPU) is fed two ways:

  fused       dcgan.py's data path: the images live on the device as one uint8 tensor (resized
              once at load time); per step, a slice of a device randperm, a random flip drawn
              on the CPU, and warp_batch (gather + warp + normalize in one pass)
  DataLoader  a torchvision-style pipeline: a Dataset of encoded PNG/JPEG bytes (held in
              memory: no disk reads, which favours it), per sample Pillow decode, resize,
              flip, to-tensor, normalize; DataLoader(num_workers=2, pin_memory on CUDA), then
              .to(device)

Rows: images/s of each training loop (measured in alternating rounds, median shown), of the step alone on a fixed batch (the ceiling), and of
each data path alone; "data / step" is the time the fused data path takes as a share of a
whole fused step. Workloads: 'shapes' (data.py's built-in 32x32 icons, as PNGs: the LLD case)
and the real anime faces in ../shared/data/anime-faces (96x96 JPEGs trained at 64x64),
skipped when that folder is absent. Ratios only mean something within one run on one machine.
"""

import argparse
import contextlib
import copy
import io
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import augment
import data
import dcgan

HERE = os.path.dirname(os.path.abspath(__file__))
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device to measure on")
parser.add_argument("--only", default="shapes,anime", help="comma-separated workloads: shapes, anime")
parser.add_argument("--batch-size", type=int, default=128, help="images per step (dcgan.py's default)")
parser.add_argument("--max-images", type=int, default=10000, help="images in each data set")
parser.add_argument("--seconds", type=float, default=10.0, help="time spent measuring each row (after warm-up)")
parser.add_argument("--rounds", type=int, default=3, help="the training rows are measured in this many alternating rounds; the median is shown")
parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes of the baseline")
parser.add_argument("--compile", action="store_true", help="torch.compile G and D, as dcgan.py --compile")
parser.add_argument("--anime", default=os.path.join(HERE, "..", "shared", "data", "anime-faces"), help="folder of anime-face JPEGs")


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


def measure_alternating(fns, device, seconds, rounds):
    """Median calls/s of each fn, measured in turns (a, b, c, a, b, c, ...) so that a machine
    whose load drifts during the run (other processes) biases none of them."""
    rates = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            rates[name].append(measure(fn, device, seconds / rounds))
    return {name: float(np.median(r)) for name, r in rates.items()}


def print_table(title, rows):
    print(f"\n{title}")
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        print("  " + "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            print("  " + "  ".join("-" * w for w in widths))


def describe(device):
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads), torch {torch.__version__}"


class EncodedImages(torch.utils.data.Dataset):
    """The baseline: per sample, decode PNG/JPEG bytes with Pillow, resize, flip, to tensor, normalize."""

    def __init__(self, encoded, size):
        self.encoded, self.size = encoded, size

    def __len__(self):
        return len(self.encoded)

    def __getitem__(self, i):
        image = Image.open(io.BytesIO(self.encoded[i])).convert("RGB")
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.Resampling.BILINEAR)
        if torch.rand(()) < 0.5:  # the workers' torch RNGs are seeded by the DataLoader
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)  # to_tensor
        return (tensor - 0.5) / 0.5  # normalize to [-1, 1]


def to_device(t, device):
    """As dcgan.py: a non_blocking copy from pinned memory, which does not wait for the GPU."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def make_step(size, device, compile_models):
    """dcgan.py's loop body with its defaults, as a function of a batch of reals."""
    torch.manual_seed(0)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    G, D = dcgan.Generator(size, 100, 64).to(device), dcgan.Discriminator(size, 64).to(device)
    G.apply(dcgan.weights_init)
    D.apply(dcgan.weights_init)
    G_ema = copy.deepcopy(G).requires_grad_(False)
    G_train, D_train = (torch.compile(G), torch.compile(D)) if compile_models else (G, D)
    opt_g = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    gen = torch.Generator().manual_seed(0)

    def bce(logits, target):
        return F.binary_cross_entropy_with_logits(logits.float(), torch.full_like(logits.float(), target))

    def diffaug(x):
        params = augment.random_diffaug(len(x), size, size, generator=gen)
        return augment.diff_augment(x, type(params)(*(to_device(t, device) for t in params)))

    def step(real):
        B = len(real)
        z = torch.randn(B, 100, 1, 1, device=device)
        with autocast:
            with torch.no_grad():
                fake = G_train(z)
            loss_d = bce(D_train(diffaug(real)), 1.0) + bce(D_train(diffaug(fake)), 0.0)
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        z = torch.randn(B, 100, 1, 1, device=device)
        with autocast:
            loss_g = bce(D_train(diffaug(G_train(z))), 1.0)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        with torch.no_grad():
            for p_ema, p in zip(G_ema.parameters(), G.parameters()):
                p_ema.lerp_(p, 0.001)
        return loss_d, loss_g

    return step


def load_workload(name, args):
    """-> (encoded bytes per image, uint8 bank (N, 3, S, S) resized once, training size S)."""
    if name == "shapes":
        bank = data.load_images("shapes", n=args.max_images)
        encoded = []
        for image in bank:
            buffer = io.BytesIO()
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
            encoded.append(buffer.getvalue())
        return encoded, bank, 32
    files = sorted(f for f in os.listdir(args.anime) if f.lower().endswith((".jpg", ".jpeg", ".png")))[: args.max_images]
    encoded = [open(os.path.join(args.anime, f), "rb").read() for f in files]
    # what data.load_images does once at load time: decode and resize to the training size
    bank = torch.stack([torch.from_numpy(np.array(Image.open(io.BytesIO(b)).convert("RGB").resize(
        (64, 64), Image.Resampling.BILINEAR))).permute(2, 0, 1) for b in encoded]).contiguous()
    return encoded, bank, 64


def bench_train(args, device):
    B = args.batch_size
    for name in args.only.split(","):
        if name == "anime" and not os.path.isdir(args.anime):
            print(f"\nanime: skipped ({args.anime} not found)")
            continue
        encoded, bank, S = load_workload(name, args)
        bank_dev = bank.to(device)
        image_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        gen = torch.Generator().manual_seed(1)
        position = {"order": None, "i": 0}

        def fused_batch():
            # dcgan.py's data path: randperm slice, flip parameters, warp_batch
            if position["order"] is None or (position["i"] + 1) * B > len(bank_dev):
                position["order"], position["i"] = torch.randperm(len(bank_dev), device=device), 0
            index = position["order"][position["i"] * B: (position["i"] + 1) * B]
            position["i"] += 1
            theta = to_device(augment.random_affine(B, flip=0.5, generator=gen), device)
            return augment.warp_batch(bank_dev, index, theta, S, padding="reflection", dtype=image_dtype, check_index=False)

        loader = torch.utils.data.DataLoader(EncodedImages(encoded, S), batch_size=B, shuffle=True, drop_last=True,
                                             num_workers=args.workers, persistent_workers=args.workers > 0,
                                             pin_memory=device.type == "cuda")
        stream = {"it": iter(loader)}

        def loader_batch():
            try:
                batch = next(stream["it"])
            except StopIteration:
                stream["it"] = iter(loader)
                batch = next(stream["it"])
            return batch.to(device, non_blocking=True)

        step = make_step(S, device, args.compile)
        fixed = fused_batch()
        rates = measure_alternating({"step": lambda: step(fixed), "fused": lambda: step(fused_batch()),
                                     "loader": lambda: step(loader_batch())}, device, args.seconds, args.rounds)
        step_only, fused, baseline = (rates[k] * B for k in ("step", "fused", "loader"))
        fused_data = measure(fused_batch, device, args.seconds) * B
        loader_data = measure(loader_batch, device, args.seconds) * B
        del stream, loader

        rows = [("pipeline", "images/s", "vs DataLoader", "data / step")]
        rows.append(("train: fused (dcgan.py)", f"{fused:,.0f}", f"{fused / baseline:.2f}x", f"{fused / fused_data:.1%}"))
        rows.append((f"train: DataLoader ({args.workers} workers)", f"{baseline:,.0f}", "1.00x", ""))
        rows.append(("train step alone, fixed batch", f"{step_only:,.0f}", f"{step_only / baseline:.2f}x", ""))
        rows.append(("data alone: fused", f"{fused_data:,.0f}", "", ""))
        rows.append((f"data alone: DataLoader ({args.workers} workers)", f"{loader_data:,.0f}", "", ""))
        print_table(f"{name}: {len(bank)} images, {S}x{S}, batch {B}, DCGAN ngf=ndf=64"
                    f"{', compiled' if args.compile else ''}, on {describe(device)}", rows)


def main():
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"extension: {'C++/CUDA' if augment.load_extension() else 'reference fallback'}")
    bench_train(args, device)


if __name__ == "__main__":
    main()
