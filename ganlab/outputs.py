"""What a run leaves on disk: checkpoints, image grids, numbered samples (+ the hand-in zip), curves.

Shared by vae.py, dcgan.py, lsgan.py and wgan.py (and swd.py, modes.py), so each script stays about its model:

    save_checkpoint(state, path)        one dict -> path, atomically (temp file, fsync, rename)
    load_checkpoint(path)               the dict back, or an error that names the file and what to do
    save_grid(images, path, nrow)       float images in [-1, 1] (B, C, H, W) -> one PNG
    write_samples(images, n, folder)    1.png ... n.png (RGB), optionally NAME.zip with folder NAME/
    atomic_write(path, write)           write(file) on a temp file beside path, fsync, rename
    write_json(path, content)           indented JSON, atomically
    CurveLog(every=20)                  per-step scalars kept on the device, fetched every few steps;
                                        .save(folder) writes curves.csv and curves.png (raw + smoothed)
    write_elbo_curves(history, folder)  vae.py's per-epoch ELBO, training and held-out: elbo.csv, elbo.png

Every file is written under a temporary name in its destination folder and renamed when
complete, so a crash, Ctrl-C or a full disk never leaves a truncated file under the final name.
"""

import csv
import errno
import io
import json
import os
import re
import shutil
import tempfile
import zipfile

import torch
from PIL import Image

# -----------------------------------------------------------------------------
# atomic files


_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK  # what open() would give a new file


def _temporary_file(folder, name):
    """A new temp file in `folder` for the file `name`: .NAME.xxxxxxxx.tmp, renamed to NAME when whole."""
    return tempfile.mkstemp(dir=folder, prefix="." + name + ".", suffix=".tmp")


def is_temporary_file(name):
    """Whether `name` is one of _temporary_file's: what a killed run leaves behind."""
    return re.fullmatch(r"\.[^/]+\.[a-z0-9_]{8}\.tmp", name) is not None


def atomic_write(path, write):
    """Call write(file) on a temp file beside `path`, fsync it, then rename it to `path`."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = _temporary_file(folder, os.path.basename(path))
    try:
        os.chmod(tmp, _FILE_MODE)  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)  # atomic on POSIX and Windows: readers see the old file or the new one
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def write_error(error, folder):
    """What went wrong writing a file into `folder`, in a few words: a full disk is named as such (torch.save
    says only "[enforce fail at inline_container.cc] . unexpected pos ...")."""
    full = getattr(error, "errno", None) == errno.ENOSPC
    try:
        full = full or shutil.disk_usage(folder).free < 2**20
    except OSError:
        pass
    first = (getattr(error, "strerror", None) or str(error)).strip().splitlines()
    return "the disk is full" if full else (first[0] if first else type(error).__name__)


def write_json(path, content):
    """`content` as indented JSON at `path`, atomically."""
    return atomic_write(path, lambda f: f.write(json.dumps(content, indent=2).encode()))


class CheckpointError(RuntimeError):
    """A checkpoint that is missing or cannot be read."""


def save_checkpoint(state, path):
    """Write `state` (a dict of tensors, numbers, strings, lists, dicts) to `path` atomically."""
    return atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint written by save_checkpoint; a clear CheckpointError if that fails."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isfile(path):  # a folder, a device (/dev/zero), a FIFO
        raise CheckpointError(f"checkpoint {path!r} is not a regular file: give the path of a checkpoint.pt "
                              "written by a previous run, or train without --resume.")
    if not os.path.isfile(path):
        raise CheckpointError(
            f"checkpoint {path!r} does not exist. Give the path of a checkpoint.pt written by a "
            "previous run (it is in that run's --out folder), or train without --resume."
        )
    try:
        # weights_only: a checkpoint holds tensors and plain Python values only, so loading one
        # from someone else cannot run code
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        detail = str(error).strip().splitlines()[0].split(". ")[0] if str(error).strip() else "end of file"
        if "Weights only load failed" in detail:
            detail = "not a file written by torch.save, or it holds more than tensors and plain values"
        raise CheckpointError(
            f"checkpoint {path!r} could not be read ({type(error).__name__}: {detail}). It is "
            "truncated, corrupt or not a checkpoint of this project. Use another checkpoint, or "
            "train without --resume."
        ) from error


# -----------------------------------------------------------------------------
# images


def to_uint8(images):
    """Float images in [-1, 1] -> uint8 in [0, 255]: the inverse of p -> p / 127.5 - 1."""
    return ((images.detach().float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def _as_hwc(image):
    """One uint8 (C, H, W) tensor -> an (H, W, 3) numpy array, RGB (grey is repeated)."""
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    return image.permute(1, 2, 0).contiguous().cpu().numpy()


def png_bytes(image):
    """Encode one uint8 (C, H, W) tensor as an RGB PNG; returns the file's bytes."""
    buffer = io.BytesIO()
    Image.fromarray(_as_hwc(image)).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_bytes(path, data):
    """Write one small file (a sample PNG). Separate so tests can make it fail like a full disk."""
    with open(path, "wb") as f:
        f.write(data)


def make_grid(images, nrow=8, padding=2):
    """uint8 (B, C, H, W) -> uint8 (C, rows*(H+p)+p, nrow*(W+p)+p): images left to right, black gaps."""
    B, C, H, W = images.shape
    nrow = max(1, min(nrow, B))
    rows = (B + nrow - 1) // nrow
    grid = images.new_zeros(C, rows * (H + padding) + padding, nrow * (W + padding) + padding)
    for k in range(B):
        top, left = padding + (k // nrow) * (H + padding), padding + (k % nrow) * (W + padding)
        grid[:, top:top + H, left:left + W] = images[k]
    return grid


def save_grid(images, path, nrow=8):
    """Float images in [-1, 1] (B, C, H, W) -> one PNG grid of `nrow` images a row, atomically."""
    grid = make_grid(to_uint8(images).cpu(), nrow)
    return atomic_write(path, lambda f: f.write(png_bytes(grid)))


# -----------------------------------------------------------------------------
# numbered samples and the hand-in zip

_NUMBERED_PNG = re.compile(r"^[0-9]+\.png$")


def write_samples(images, n, folder, force=False, zip_name=None, zip_dir=None):
    """Write n images as folder/1.png ... folder/n.png (RGB); optionally zip them.

    images: a function count -> a batch of at most `count` images, or an iterable of
    batches; a batch is uint8 (B, C, H, W) in [0, 255] or float in [-1, 1], on any device.
    A folder that already holds files is refused unless force (then its numbered PNGs are
    deleted first, so the folder ends up with exactly 1.png ... n.png).

    zip_name: also write ZIP_DIR/NAME.zip (ZIP_DIR defaults to the folder's parent) whose
    single top folder NAME/ holds the n PNGs: the assignment's hand-in format. It is written
    under a temporary name and renamed only once complete; if anything fails (a full disk),
    no NAME.zip is left behind. Returns (folder, zip path or None).
    """
    folder = os.fspath(folder)
    zip_path = None
    if zip_name is not None:
        zip_name = zip_name[:-4] if zip_name.endswith(".zip") else zip_name
        if not zip_name or zip_name in (".", "..") or "/" in zip_name or os.sep in zip_name:
            raise ValueError(f"--zip wants a plain name such as 0860912_img, got {zip_name!r}")
        zip_dir = os.path.dirname(os.path.abspath(folder)) if zip_dir is None else os.fspath(zip_dir)
        zip_path = os.path.join(zip_dir, zip_name + ".zip")
    if n < 1:
        raise ValueError(f"the number of samples must be at least 1, got {n}")

    # refuse to mix a new set with an old one: the hand-in must be exactly 1.png ... n.png
    existing = os.listdir(folder) if os.path.isdir(folder) else []
    if existing and not force:
        raise FileExistsError(
            f"{folder} already holds {len(existing)} files; pass --force to replace its "
            "numbered PNGs, or choose another --out"
        )
    if zip_path is not None and os.path.exists(zip_path) and not force:
        raise FileExistsError(f"{zip_path} already exists; pass --force to replace it")
    os.makedirs(folder, exist_ok=True)
    for name in existing:
        if _NUMBERED_PNG.match(name):
            os.remove(os.path.join(folder, name))

    if callable(images):
        batches = iter(lambda: images(n - written), None)  # ask for what is still missing
    else:
        batches = iter(images)
    written, tmp_zip, archive = 0, None, None
    try:
        if zip_path is not None:
            os.makedirs(zip_dir, exist_ok=True)
            fd, tmp_zip = _temporary_file(zip_dir, zip_name + ".zip")
            os.close(fd)
            os.chmod(tmp_zip, _FILE_MODE)
            # PNGs are compressed already: store them as they are
            archive = zipfile.ZipFile(tmp_zip, "w", compression=zipfile.ZIP_STORED)
            archive.writestr(zipfile.ZipInfo(zip_name + "/"), b"")  # the top folder itself
        while written < n:
            batch = next(batches, None)
            if batch is None:
                raise RuntimeError(f"the image source ran out after {written} of {n} images")
            batch = batch if batch.dtype == torch.uint8 else to_uint8(batch)
            for image in batch[: n - written].cpu():
                data = png_bytes(image)
                _write_bytes(os.path.join(folder, f"{written + 1}.png"), data)
                if archive is not None:
                    archive.writestr(f"{zip_name}/{written + 1}.png", data)
                written += 1
        if archive is not None:
            archive.close()
            archive = None
            with open(tmp_zip, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp_zip, zip_path)
            tmp_zip = None
    except OSError as error:
        full = " (the disk is full)" if error.errno == errno.ENOSPC else ""
        raise OSError(
            error.errno,
            f"writing samples failed after {written} of {n} images{full}: {error.strerror or error}. "
            f"{folder} is incomplete" + (f" and no {zip_path} was written" if zip_path else "")
            + "; free some space and run again with --force",
        ) from error
    finally:
        if archive is not None:
            try:
                archive.close()
            except OSError:
                pass
        if tmp_zip is not None and os.path.exists(tmp_zip):
            os.remove(tmp_zip)
    return folder, zip_path


# -----------------------------------------------------------------------------
# learning curves


class CurveLog:
    """Per-step scalars (losses, D(x), ...), fetched from the device only every `every` steps.

    log.append(step, loss_D=t1, loss_G=t2) keeps the 0-dim tensors where they are (no host
    sync); every `every` calls it copies them to the CPU in one transfer and returns the
    block's means as a dict (for a progress bar), else None. `nonfinite` then names the first
    step with a NaN or inf. save(folder) writes curves.csv (step, raw values, smoothed values)
    and curves.png (raw values faint, their moving average over `window` steps on top).
    groups: lists of names drawn on the same axes, e.g. [["loss_D", "loss_G"]]; the rest get
    an axes each. reduce: a function applied to each fetched block on the device first.
    """

    def __init__(self, every=20, window=100, groups=None, reduce=None):
        self.every, self.window, self.groups = max(1, int(every)), max(1, int(window)), groups or []
        self.reduce = reduce  # e.g. the mean over the processes of a torchrun run
        self.names, self.steps, self.rows = [], [], []  # rows: lists of floats, one per step
        self.nonfinite = None  # (step, name) of the first NaN/inf seen
        self._pending_steps, self._pending = [], []

    def append(self, step, **values):
        if not self.names:
            self.names = list(values)
        if list(values) != self.names:
            raise ValueError(f"CurveLog: expected the values {self.names}, got {list(values)}")
        row = torch.stack([torch.as_tensor(v).detach().float().reshape(()) for v in values.values()])
        self._pending_steps.append(int(step))
        self._pending.append(row)  # stays on the device until flush
        return self.flush() if len(self._pending) >= self.every else None

    def means_after(self, step):
        """{name: the mean of its values at the steps after `step`} (what is pending is fetched first)."""
        self.flush()
        rows = [row for s, row in zip(self.steps, self.rows) if s > step]
        return dict(zip(self.names, (sum(column) / len(column) for column in zip(*rows))))

    def flush(self):
        """Fetch what is pending (one host sync); return its means per name, or None if nothing."""
        if not self._pending:
            return None
        block = torch.stack(self._pending)  # (steps, names)
        block = (self.reduce(block) if self.reduce else block).cpu()  # the one transfer
        steps = self._pending_steps
        self._pending_steps, self._pending = [], []
        finite = torch.isfinite(block)
        if self.nonfinite is None and not finite.all():
            r, c = (~finite).nonzero()[0].tolist()
            self.nonfinite = (steps[r], self.names[c])
        self.steps.extend(steps)
        self.rows.extend(block.tolist())
        return dict(zip(self.names, block.mean(0).tolist()))

    def smoothed(self):
        """Trailing moving average of each column over `window` steps (fewer at the start)."""
        if not self.rows:
            return []
        values = torch.tensor(self.rows, dtype=torch.float64)  # (steps, names)
        cumsum = torch.cat([values.new_zeros(1, values.shape[1]), values.cumsum(0)])
        ends = torch.arange(1, len(values) + 1)
        starts = (ends - self.window).clamp(min=0)
        return ((cumsum[ends] - cumsum[starts]) / (ends - starts)[:, None]).tolist()

    def save(self, folder, title=None):
        """Write folder/curves.csv and folder/curves.png (both atomically); returns their paths."""
        self.flush()
        smooth = self.smoothed()

        def write_csv(f):
            text = io.StringIO()
            writer = csv.writer(text)
            writer.writerow(["step"] + self.names + [n + "_smooth" for n in self.names])
            for step, raw, avg in zip(self.steps, self.rows, smooth):
                writer.writerow([step] + [f"{v:.6g}" for v in raw] + [f"{v:.6g}" for v in avg])
            f.write(text.getvalue().encode())

        csv_path = atomic_write(os.path.join(folder, "curves.csv"), write_csv)
        png_path = atomic_write(os.path.join(folder, "curves.png"), lambda f: self._plot(f, smooth, title))
        return csv_path, png_path

    def _plot(self, f, smooth, title):
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt

        grouped = [[n for n in g if n in self.names] for g in self.groups]
        grouped = [g for g in grouped if g]
        grouped += [[n] for n in self.names if not any(n in g for g in grouped)]
        fig, axes = plt.subplots(len(grouped) or 1, 1, figsize=(8, 3 * max(1, len(grouped))),
                                 sharex=True, squeeze=False)
        for ax, names in zip(axes[:, 0], grouped):
            for name in names:
                k = self.names.index(name)
                raw = [row[k] for row in self.rows]
                line, = ax.plot(self.steps, raw, alpha=0.25, linewidth=0.8)
                ax.plot(self.steps, [row[k] for row in smooth], color=line.get_color(),
                        label=f"{name} (moving average, {self.window} steps)")
            ax.legend(loc="upper right", fontsize="small")
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("step")
        if title:
            axes[0, 0].set_title(title)
        fig.tight_layout()
        fig.savefig(f, format="png", dpi=100)
        plt.close(fig)

    def state_dict(self):
        """The whole history, for a checkpoint (so a resumed run extends the same curves)."""
        self.flush()
        return {
            "names": list(self.names),
            "steps": torch.tensor(self.steps, dtype=torch.int64),
            "values": torch.tensor(self.rows, dtype=torch.float32).reshape(len(self.rows), len(self.names)),
        }

    def load_state_dict(self, state):
        self.names = list(state["names"])
        self.steps = state["steps"].tolist()
        self.rows = state["values"].tolist()
        self._pending_steps, self._pending = [], []


# -----------------------------------------------------------------------------
# vae.py's per-epoch curves


ELBO_COLUMNS = ["epoch", "step"] + [f"{split}_{name}" for split in ["train", "heldout"]
                                    for name in ["neg_elbo", "recon", "kl", "scale"]] + [
               "heldout_bits_per_dim", "heldout_mse"]


def write_elbo_curves(history, folder):
    """history (one dict per epoch) -> elbo.csv and elbo.png (both atomically): -ELBO, reconstruction
    and KL per epoch; training (the mean over the epoch's augmented batches, weights changing as
    they go) against held-out (measured at the end of the epoch)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def write_csv(f):
        text = io.StringIO()
        writer = csv.DictWriter(text, ELBO_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()} for row in history)
        f.write(text.getvalue().encode())

    def plot(f):
        fig, axes = plt.subplots(1, 3, figsize=(14, 4), layout="constrained")
        for ax, name, title in zip(axes, ["neg_elbo", "recon", "kl"], ["-ELBO = reconstruction + KL (the loss)",
                                   "reconstruction: -E_q[log p(x|z)]", "KL(q(z|x) || N(0, I))"]):
            for split, style, label in [("train", "-", "training"), ("heldout", "o-", "held-out")]:
                ax.plot([h["epoch"] for h in history], [h[f"{split}_{name}"] for h in history], style, label=label)
            ax.set(title=title, xlabel="epoch", ylabel="nats per image")
            ax.grid(alpha=0.3)
            ax.legend()
        fig.savefig(f, format="png", dpi=100)
        plt.close(fig)

    atomic_write(os.path.join(folder, "elbo.csv"), write_csv)
    atomic_write(os.path.join(folder, "elbo.png"), plot)
