"""Bad input to dcgan.py, lsgan.py and wgan.py: refused before any work, naming the flag or file,
with argparse's exit status 2 and no traceback, and no file of another run changed.

The runs are the tiny in-process ones of test_gan_scripts.py (a few dozen built-in icons).
"""

import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from test_gan_scripts import SCRIPTS, TINY, ckpt, quick, run, trained  # noqa: F401 (fixtures)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from ganlab import data  # noqa: E402

real_load_images = data.load_images  # before any test patches it


def refused(capsys, script, argv):
    """Run the script with argv; it must stop with a usage error. Returns the message."""
    with pytest.raises(SystemExit) as exit_info:
        SCRIPTS[script].main([str(a) for a in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def snapshot(folder):
    """Every file under folder with its bytes: to prove that nothing changed."""
    return {os.path.join(d, f): open(os.path.join(d, f), "rb").read() for d, _, files in os.walk(folder) for f in files}


@pytest.fixture(scope="module")
def finished(trained):
    """A finished 1-epoch dcgan run (test_gan_scripts' fixture: one run for both files)."""
    return trained


@pytest.mark.parametrize("flags,named", [
    (["--batch-size", 0], "--batch-size"), (["--batch-size", -5], "--batch-size"),
    (["--d-steps", 0], "--d-steps"), (["--d-steps", -2], "--d-steps"),
    (["--nz", 0], "--nz"), (["--ngf", 0], "--ngf"), (["--ndf", -3], "--ndf"),
    (["--lr-g", -1], "--lr-g"), (["--lr-d", "nan"], "--lr-d"), (["--lr-g", "inf"], "--lr-g"),
    (["--seed", 2 ** 32], "--seed"), (["--seed", -1], "--seed"),
    (["--device", "xyz"], "--device"), (["--device", "meta"], "--device"),
    (["--max-images", 0], "--max-images"), (["--max-images", -3], "--max-images"),
    (["--epochs", -1], "--epochs"), (["--ema", 1.5], "--ema"), (["--ema", -0.1], "--ema"), (["--ema", "nan"], "--ema"),
    (["--log-every", 0], "--log-every"), (["--image-size", 0], "--image-size"), (["--image-size", -32], "--image-size"),
    (["--sample", -1], "--sample"),
    (["--augment", "flip=2"], "--augment: flip=2"), (["--augment", "flip=-1"], "--augment: flip=-1"),
    (["--augment", "translate=5"], "--augment: translate=5"), (["--augment", "scale=0"], "--augment: scale=0"),
    (["--augment", "rotate=abc"], "--augment: rotate='abc'"),
    (["--zip", "a/b", "--sample", 2], "--zip"), (["--zip", "..", "--sample", 2], "--zip"),
    (["--zip", ".zip", "--sample", 2], "--zip"),
])
def test_nonsense_flags_are_usage_errors(flags, named, tmp_path, capsys):
    assert named in refused(capsys, "dcgan", TINY + ["--out", tmp_path / "run", "--epochs", 1] + flags)
    assert not os.path.exists(tmp_path / "run" / "checkpoint.pt")


@pytest.mark.parametrize("flags,named", [
    (["--clip", 0], "--clip"), (["--clip", -0.01], "--clip"), (["--gp", -1], "--gp"), (["--lr-g", 0], "--lr-g"),
])
def test_wgan_nonsense_is_refused(flags, named, tmp_path, capsys):
    assert named in refused(capsys, "wgan", TINY + ["--out", tmp_path / "run", "--epochs", 1] + flags)


def test_forgetting_resume_does_not_overwrite_a_run(finished, capsys):
    before = snapshot(finished)
    message = refused(capsys, "dcgan", ["--epochs", 0, "--sample", 5, "--out", finished])
    assert "--resume" in message and "--force" in message
    message = refused(capsys, "dcgan", TINY + ["--epochs", 1, "--out", finished])
    assert "--resume" in message
    assert snapshot(finished) == before


def test_epochs_0_without_a_checkpoint_is_refused(tmp_path, capsys):
    assert "--epochs 0" in refused(capsys, "dcgan", ["--epochs", 0, "--sample", 5, "--out", tmp_path / "new"])
    assert not os.path.exists(tmp_path / "new")


@pytest.mark.parametrize("script", ["lsgan", "wgan"])
def test_checkpoint_of_another_script_is_refused_naming_the_writer(script, finished, capsys):
    before = snapshot(finished)
    message = refused(capsys, script, ["--resume", os.path.join(finished, "checkpoint.pt"), "--epochs", 2])
    assert "dcgan.py" in message and f"not {script}.py" in message
    assert snapshot(finished) == before


def test_checkpoint_without_identity_is_refused(finished, tmp_path, capsys):
    state = ckpt(finished)
    del state["script"]
    torch.save(state, tmp_path / "old.pt")
    assert "older version" in refused(capsys, "dcgan", ["--resume", tmp_path / "old.pt", "--epochs", 2])


def test_a_moved_run_resumes_where_its_checkpoint_is(finished, tmp_path):
    moved = str(tmp_path / "renamed")
    shutil.copytree(finished, moved)
    before = snapshot(finished)
    SCRIPTS["dcgan"].main(["--resume", os.path.join(moved, "checkpoint.pt"), "--epochs", "2"])
    assert ckpt(moved)["epoch"] == 2 and snapshot(finished) == before


def test_resume_into_another_runs_folder_needs_force(finished, tmp_path, capsys):
    other = run("dcgan", tmp_path, "--epochs", 1, "--seed", 5, out="other")
    before = snapshot(other)
    message = refused(capsys, "dcgan", ["--resume", os.path.join(finished, "checkpoint.pt"), "--epochs", 2,
                                        "--out", other])
    assert "holds a run" in message and "--force" in message
    assert snapshot(other) == before


def test_output_paths_are_checked_before_any_work(tmp_path, capsys, monkeypatch):
    from ganlab import data
    monkeypatch.setattr(data, "load_images", lambda *a, **k: pytest.fail("the data must not be loaded"))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert "is a file" in refused(capsys, "dcgan", TINY + ["--epochs", 1, "--out", a_file])
    assert "is a file" in refused(capsys, "dcgan", TINY + ["--epochs", 1, "--out", a_file / "run"])
    assert a_file.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_read_only_out_is_refused_before_any_work(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert "not writable" in refused(capsys, "dcgan", TINY + ["--epochs", 1, "--out", locked / "run"])


def test_resume_of_a_folder_names_the_checkpoint(finished, capsys):
    message = refused(capsys, "dcgan", ["--resume", finished])
    assert "is a folder" in message and os.path.join(finished, "checkpoint.pt") in message


def test_nan_before_any_checkpoint_does_not_advise_resuming(tmp_path, monkeypatch):
    import dcgan
    real = dcgan.warp_batch
    monkeypatch.setattr(dcgan, "warp_batch", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(SystemExit) as exit_info:
        run("dcgan", tmp_path, "--epochs", 1)
    message = str(exit_info.value.code)
    assert "no checkpoint had been written yet" in message and "resume" not in message


def test_resume_past_epochs_is_refused_saying_what_to_give(capsys, tmp_path):
    finished = run("dcgan", tmp_path, "--epochs", 2)
    before = open(os.path.join(finished, "checkpoint.pt"), "rb").read()
    message = refused(capsys, "dcgan", ["--resume", os.path.join(finished, "checkpoint.pt"), "--epochs", 1])
    assert "has trained 2 epochs, more than --epochs 1" in message and "--epochs 0 --sample N" in message
    assert open(os.path.join(finished, "checkpoint.pt"), "rb").read() == before


@pytest.mark.parametrize("part", ["G_ema", "opt_d"])
def test_a_checkpoint_holding_nan_is_refused_naming_where(part, capsys, tmp_path):
    finished = run("dcgan", tmp_path, "--epochs", 1, "--ema", 0.9)
    state = ckpt(finished)
    if part == "G_ema":
        state["G_ema"]["net.0.weight"][0, 0, 0, 0] = float("nan")
    else:
        state["opt_d"]["state"][0]["exp_avg_sq"][0] = float("inf")
    torch.save(state, tmp_path / "bad.pt")
    message = refused(capsys, "dcgan", ["--resume", tmp_path / "bad.pt", "--epochs", 0, "--sample", 10,
                                        "--out", tmp_path / "again"])
    where = "G_ema.net.0.weight" if part == "G_ema" else "opt_d.state.0.exp_avg_sq"
    assert f"holds NaN or infinite values in {where}" in message
    assert not os.path.exists(tmp_path / "again" / "samples")


def test_a_checkpoint_that_is_a_device_is_named_as_such(capsys, tmp_path):
    os.symlink("/dev/zero", tmp_path / "zero.pt")
    message = refused(capsys, "dcgan", ["--resume", tmp_path / "zero.pt", "--epochs", 2])
    assert "is not a regular file" in message and "does not exist" not in message


def test_a_second_run_on_a_held_folder_is_refused_at_once(tmp_path):
    """Two runs on one --out (issue: the second's checkpoint replaced the first's): while one process
    trains there, another is refused before any work, naming the process; then the folder is free."""
    out = tmp_path / "shared"
    command = [sys.executable, os.path.join(REPO, "dcgan.py"), "--max-images", "64", "--batch-size", "16",
               "--ngf", "8", "--ndf", "8", "--device", "cpu", "--out", str(out)]
    first = subprocess.Popen(command + ["--epochs", "500"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.time() + 120
        while not os.path.exists(out / "checkpoint.pt") and time.time() < deadline:  # it is training
            time.sleep(0.2)
        second = subprocess.run(command + ["--epochs", "1", "--seed", "2", "--force"], capture_output=True,
                                text=True, timeout=120)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert f"is in use by another run (process {first.pid})" in second.stderr
    finally:
        first.kill()
        first.wait()
    again = subprocess.run(command + ["--epochs", "1", "--force"], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]  # the lock died with its process


def test_a_folder_of_mixed_sizes_says_what_it_found_and_the_flag(capsys, tmp_path, monkeypatch):
    from PIL import Image
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.new("RGB", (1, 1), (200, 0, 0)).save(folder / "0.png")
    for k in range(1, 5):
        Image.new("RGB", (32, 32) if k % 2 else (40, 30), (0, 0, 200)).save(folder / f"{k}.png")
    monkeypatch.setattr(data, "load_images", real_load_images)  # the real reader, not the tests' built-in set
    message = refused(capsys, "dcgan", ["--data", folder, "--out", tmp_path / "run", "--epochs", 1])
    # a 1x1 image first, then 32x32 and 40x30 ones: no size of its own (the campaign: "--image-size 1: give
    # 3, 4 or 5 times a power of 2", a flag that was never given)
    assert "its images differ in size (1x1 (0.png), 32x32 (1.png))" in message and "--image-size N" in message
    assert "give 3 to 7 times" not in message


def test_a_folder_of_tiny_images_is_named_as_the_source_of_the_size(capsys, tmp_path, monkeypatch):
    from PIL import Image
    folder = tmp_path / "tiny"
    folder.mkdir()
    for k in range(4):
        Image.new("RGB", (2, 2), (50 * k, 0, 0)).save(folder / f"{k}.png")
    monkeypatch.setattr(data, "load_images", real_load_images)
    message = refused(capsys, "dcgan", ["--data", folder, "--out", tmp_path / "run", "--epochs", 1])
    assert "came out 2x2, the size of its first image" in message and "--image-size N" in message
