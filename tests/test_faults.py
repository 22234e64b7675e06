"""Faults, signals and hostile files (the second campaign): each test replays one of its cases and
failed on the code before the fix it checks.

    stale cache       files moved out while a folder was decoded, then back: the cache must not stand
                      for a folder it does not match
    dead parent       SIGTERM to a process while its decode workers run: no worker outlives it
    full disk         while writing samples and while saving a checkpoint: one line, non-zero, no traceback
    signals           Ctrl-C / SIGTERM while writing samples: no temp zip left, a message, 128 + signal
    link loops        x.png -> y.png -> x.png in a data folder: skipped with a warning, never a crash
    odd names         a file name that is not UTF-8: read and cached
    bombs             an image or zip entry above --max-pixels: skipped before it is decoded, naming the cap
"""

import errno
import os
import signal
import subprocess
import sys
import time
import uuid
import warnings
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import inception_score as IS
from ganlab import data, outputs
from test_gan_scripts import SCRIPTS, quick, run  # noqa: F401 (quick: the tiny built-in set, autouse)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
load_images = data.load_images  # the real reader: `quick` puts the tiny built-in set in its place


def write_pngs(folder, count, size=8, start=0):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(start)
    for k in range(start, start + count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(os.path.join(folder, f"{k}.png"))


# -----------------------------------------------------------------------------
# the data cache and the decode workers


def test_files_moved_out_during_a_load_are_not_cached_and_come_back(tmp_path, monkeypatch):
    folder, away = str(tmp_path / "vanish"), str(tmp_path / "away")
    write_pngs(folder, 30)
    os.makedirs(away)
    moved = [f"{k}.png" for k in range(10, 20)]
    real_decode = data.decode_images

    def decode_while_files_move(kind, base, names, size, workers=None, progress=True):
        for name in moved:  # another process moves them away after the folder was listed
            os.rename(os.path.join(folder, name), os.path.join(away, name))
        return real_decode(kind, base, names, size, workers=1, progress=False)

    monkeypatch.setattr(data, "decode_images", decode_while_files_move)
    cache = str(tmp_path / "cache")
    with pytest.warns(UserWarning, match="changed while it was read"):
        assert len(load_images(folder, cache_dir=cache, progress=False)) == 20
    monkeypatch.setattr(data, "decode_images", real_decode)
    for name in moved:  # ... and back
        os.rename(os.path.join(away, name), os.path.join(folder, name))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no skipped file, no stale cache: the whole folder, read again
        assert len(load_images(folder, cache_dir=cache, workers=1, progress=False)) == 30


CHILD = """
import os, sys, time
sys.path.insert(0, {repo!r})
from ganlab import data
real = data._decode_chunk
def slow(job):  # a chunk that takes long: the workers are busy when the parent is killed
    time.sleep(30)
    return real(job)
data._decode_chunk = slow
print("decoding", flush=True)
data.decode_images("folder", {folder!r}, sorted(os.listdir({folder!r})), 8, workers=2, progress=False)
"""


def marked_processes(mark):
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if f"GANLAB_TEST_MARK={mark}".encode() in f.read():
                    found.append(int(pid))
        except OSError:
            continue
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_no_decode_worker_outlives_its_parent(tmp_path):
    folder, mark = str(tmp_path / "pngs"), uuid.uuid4().hex
    write_pngs(folder, 40)
    # the mark in its environment, which its forked workers share: the test finds them all by it
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(repo=REPO, folder=folder)],
                             stdout=subprocess.PIPE, text=True, env=dict(os.environ, GANLAB_TEST_MARK=mark))
    try:
        assert child.stdout.readline().strip() == "decoding"
        deadline = time.time() + 20
        while len(marked_processes(mark)) < 3 and time.time() < deadline:  # the parent and its 2 workers
            time.sleep(0.1)
        assert len(marked_processes(mark)) == 3
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=10) == -signal.SIGTERM
        deadline = time.time() + 10
        while marked_processes(mark) and time.time() < deadline:
            time.sleep(0.1)
        assert marked_processes(mark) == []  # before: blocked for good, once their chunk was done
    finally:
        for pid in marked_processes(mark):
            os.kill(pid, signal.SIGKILL)


# -----------------------------------------------------------------------------
# full disk and signals while writing


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_while_writing_samples_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(outputs, "_write_bytes", full_disk)
    with pytest.raises(SystemExit) as stop:
        run("dcgan", tmp_path, "--epochs", 1, "--sample", 7, "--zip", "hand_in")
    message = str(stop.value.code)
    assert "the disk is full" in message and "after 0 of 7 images" in message
    assert "--resume" in message and "--epochs 0 --sample 7 --zip hand_in --force" in message
    assert "Traceback" not in capsys.readouterr().err
    assert not any(name.endswith((".zip", ".tmp")) for name in os.listdir(tmp_path / "run"))
    monkeypatch.undo()  # the disk has room again: the command the message gave writes them
    SCRIPTS["dcgan"].main(["--resume", str(tmp_path / "run" / "checkpoint.pt"), "--epochs", "0", "--sample", "7",
                           "--zip", "hand_in", "--force"])
    assert len(zipfile.ZipFile(tmp_path / "run" / "hand_in.zip").namelist()) == 8  # hand_in/ and 7 PNGs


def test_full_disk_while_saving_a_checkpoint_keeps_the_last_one(tmp_path, monkeypatch, capsys):
    run("dcgan", tmp_path, "--epochs", 1)
    before = open(tmp_path / "run" / "checkpoint.pt", "rb").read()

    def torch_save_on_a_full_disk(state, f):  # how torch.save says it (a RuntimeError, no errno)
        f.write(b"x" * 100)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 6553664 vs 6553552")

    monkeypatch.setattr(torch, "save", torch_save_on_a_full_disk)
    with pytest.raises(SystemExit) as stop:
        SCRIPTS["dcgan"].main(["--resume", str(tmp_path / "run" / "checkpoint.pt"), "--epochs", "2"])
    message = str(stop.value.code)
    assert "writing" in message and "checkpoint.pt at step 8 failed" in message and "inline_container" in message
    assert "is unchanged" in message and "Traceback" not in capsys.readouterr().err
    assert open(tmp_path / "run" / "checkpoint.pt", "rb").read() == before
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path / "run"))


def test_a_full_disk_is_named_even_when_the_error_does_not_say_so(tmp_path, monkeypatch):
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda folder: type("U", (), {"free": 4096})())
    assert outputs.write_error(RuntimeError("[enforce fail at inline_container.cc:672]"), tmp_path) == \
        "the disk is full"


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_while_writing_samples_leaves_no_temp_zip(signum, code, tmp_path, monkeypatch, capsys):
    real, calls = outputs.png_bytes, []

    def png_bytes_then_signal(image):
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signum)
        return real(image)

    monkeypatch.setattr(outputs, "png_bytes", png_bytes_then_signal)
    handler = signal.getsignal(signum)
    with pytest.raises(SystemExit) as stop:
        run("dcgan", tmp_path, "--epochs", 1, "--sample", 9, "--zip", "hand_in")
    assert stop.value.code == code and signal.getsignal(signum) is handler
    err = capsys.readouterr().err
    assert "while writing the samples" in err and "--epochs 0 --sample 9 --zip hand_in --force" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert [n for n in os.listdir(tmp_path / "run") if n.endswith((".zip", ".tmp"))] == []


def test_a_stopped_vae_sweep_says_how_to_go_on(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import vae_sweep

    def stopped(argv):
        raise SystemExit(130)

    monkeypatch.setattr(vae_sweep.vae, "main", stopped)
    with pytest.raises(SystemExit) as stop:
        vae_sweep.main(["--data", "shapes", "--latents", "4", "--batch-sizes", "8", "--out", str(tmp_path)])
    assert stop.value.code == 130 and "the same sweep command goes on" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# hostile files: link loops, names that are not UTF-8, decompression bombs


def test_a_link_loop_in_a_data_folder_is_skipped_with_a_warning(tmp_path):
    folder = str(tmp_path / "loop")
    write_pngs(folder, 4)
    os.symlink("y.png", os.path.join(folder, "x.png"))
    os.symlink("x.png", os.path.join(folder, "y.png"))
    with pytest.warns(UserWarning, match="in a loop.*'(x|y).png'"):
        assert load_images(folder, workers=1, progress=False, cache=False).shape == (4, 3, 8, 8)
    chunks, skipped = IS.open_images(folder)
    assert chunks.count() == 4 and skipped == ["x.png", "y.png"]


def test_a_file_name_that_is_not_utf8_is_read_and_cached(tmp_path):
    folder = tmp_path / "names"
    write_pngs(str(folder), 3)
    odd = os.path.join(os.fsencode(str(folder)), b"\xff\xfe.png")
    os.rename(str(folder / "2.png"), odd)
    cache = str(tmp_path / "cache")
    x = load_images(str(folder), cache_dir=cache, workers=1, progress=False)
    assert x.shape == (3, 3, 8, 8)
    assert torch.equal(load_images(str(folder), cache_dir=cache, workers=1, progress=False), x)
    assert len(os.listdir(cache)) == 1


def test_images_above_max_pixels_are_skipped_before_decoding(tmp_path, monkeypatch):
    folder = str(tmp_path / "bomb")
    write_pngs(folder, 3, size=8, start=1)
    Image.new("RGB", (40, 40)).save(os.path.join(folder, "0.png"))  # first: the folder's size if read
    monkeypatch.setattr(data, "MAX_PIXELS", 1000)
    opened = []
    real_load = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda im: opened.append(im.size) or real_load(im))
    with pytest.warns(UserWarning, match=r"0.png \(ValueError: 40x40 is 1,600 pixels, above the cap of "
                                         r"--max-pixels 1000\)"):
        x = load_images(folder, workers=1, progress=False, cache=False)  # its size: 8, not 40
    assert x.shape == (3, 3, 8, 8) and (40, 40) not in opened  # never decoded


def test_a_zip_entry_that_unpacks_above_the_cap_is_never_read(tmp_path, monkeypatch):
    path = str(tmp_path / "bomb.zip")
    write_pngs(str(tmp_path / "p"), 2)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("a/0.png", b"\0" * 100_000)  # 100 kB unpacked, a few hundred bytes packed
        for k in range(2):
            z.write(str(tmp_path / "p" / f"{k}.png"), f"a/{k + 1}.png")
    monkeypatch.setattr(data, "MAX_PIXELS", 1000)
    read = []
    real_read = zipfile.ZipFile.read
    monkeypatch.setattr(zipfile.ZipFile, "read", lambda self, name, *a: read.append(name) or real_read(self, name, *a))
    with pytest.warns(UserWarning, match=r"a/0.png \(ValueError: 100,000 bytes unpacked, above the cap of 8,000"):
        assert load_images(path, size=8, workers=1, progress=False, cache=False).shape == (2, 3, 8, 8)
    assert "a/0.png" not in read
    monkeypatch.setattr(IS, "MAX_PIXELS", 1000)
    chunks, _ = IS.open_images(path)
    assert "100,000 bytes unpacked" in str(chunks.decode("a/0.png"))


def test_max_pixels_is_a_flag_of_the_scripts_and_of_inception_score(tmp_path, monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(data, "set_max_pixels", seen.append)
    run("dcgan", tmp_path, "--epochs", 1, "--max-pixels", 12345)
    assert seen == [12345]
    with pytest.raises(SystemExit):
        IS.parse_args(["x", "--max-pixels", "0"])
    assert "--max-pixels must be at least 1" in capsys.readouterr().err


def test_a_folder_of_mixed_sizes_has_no_size_of_its_own(tmp_path):
    folder = str(tmp_path / "mixed")
    write_pngs(folder, 2, size=32)
    Image.new("RGB", (40, 30)).save(os.path.join(folder, "2.png"))
    with pytest.raises(ValueError, match=r"differ in size \(32x32 \(0.png\), 40x30 \(2.png\)\).*--image-size N"):
        load_images(folder, progress=False, cache=False)
    assert load_images(folder, size=16, workers=1, progress=False, cache=False).shape == (3, 3, 16, 16)

