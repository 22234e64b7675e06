"""
Inception Score speed: the reference's pipeline against inception_score.py's, same run.

    python bench_inception.py                                  # CPU, 200 PNGs
    python bench_inception.py --device cuda --images 10000     # on a GPU

Both pipelines score the same freshly written 32x32 PNGs (1.png ... N.png) with the same
random weights in torchvision's format, and must agree on the score. It prints a table:

    | pipeline | device | images | seconds | img/s | speed-up | IS | |IS - ref| | max |p - p_ref| |

(a) "reference": what sbarratt/inception-score-pytorch does with a folder of PNGs, re-written
    here without torchvision: a torch Dataset whose items are decoded one image at a time
    (PIL, then ToTensor and Normalize(0.5, 0.5) arithmetic), a DataLoader of batches of 32 in
    this process, per batch .to(device) + nn.Upsample to 299 (bilinear) + the network in fp32
    + softmax, predictions into a float64 array, then one scipy-style entropy() call per image.
(b) "ours": inception_score.py: worker processes decode whole batches to uint8, the host
    copy is pinned and asynchronous, uint8 -> [-1, 1] and the resize happen on the device,
    large batches, predictions stay on the device, the score is vectorised. Variants add
    --channels-last and, on a GPU, --bf16.

Times exclude loading the weights (the same for both) and include everything from the
folder on disk to the score. Ratios hold within one run on one machine only.
"""

import argparse
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

import inception_score as IS

# -----------------------------------------------------------------------------
# test data: numbered PNGs and random weights in torchvision's format


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


def reference_pipeline(folder, model, device, batch_size=32, splits=10):
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


def our_pipeline(folder, model, device, batch_size, splits=10, workers=None,
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


def run(device="cpu", n_images=200, batch_size=None, workers=None, splits=10, repeats=1):
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


def format_table(rows):
    head = ["pipeline", "device", "images", "seconds", "img/s", "speed-up", "IS", "|IS - ref|", "max |p - p_ref|"]
    keys = ["pipeline", "device", "images", "seconds", "img_per_s", "speedup", "inception_score", "is_diff", "max_prob_diff"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--images", type=int, default=200, help="32x32 PNGs to score")
    p.add_argument("--batch-size", type=int, default=None, help="our batch size (default 200 on "
                   "cuda, 50 on cpu; the reference's is 32)")
    p.add_argument("--workers", type=int, default=None, help="our decoding processes (default min(8, cores))")
    p.add_argument("--splits", type=int, default=10)
    p.add_argument("--repeats", type=int, default=1, help="timings per pipeline, interleaved; best kept")
    args = p.parse_args()
    rows = run(args.device, args.images, args.batch_size, args.workers, args.splits, args.repeats)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores"
          + (f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""))
    print(format_table(rows))
