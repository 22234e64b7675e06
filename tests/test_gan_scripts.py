"""dcgan.py, lsgan.py, wgan.py and outputs.py on the CPU, on a few dozen built-in 'shapes' icons.

Each script runs in-process through main(argv) with tiny networks (--ngf 8 --ndf 8), so a
training run takes about a second; the whole file well under three minutes on two cores.
"""

import errno
import functools
import inspect
import os
import signal
import zipfile

import pytest
import torch
from PIL import Image

from ganlab import data
import dcgan
import lsgan
from ganlab import outputs
from ganlab import training
import wgan

SCRIPTS = {"dcgan": dcgan, "lsgan": lsgan, "wgan": wgan}
# --data: any name but "shapes" (the built-in set's own defaults): these tests check the scripts' paper
# defaults; the loader below gives the built-in icons whatever the name
TINY = ["--data", "icons", "--max-images", "64", "--batch-size", "16", "--ngf", "8", "--ndf", "8", "--log-every", "2",
        "--augment", "flip", "--diffaug", "color,translation,cutout"]  # the augmented path, not the defaults
# wgan's default of 5 D steps per G step would need 80 images a step: use 2 in most tests
EXTRA = {"dcgan": [], "lsgan": [], "wgan": ["--d-steps", "2"]}
_real_load_images = data.load_images


@functools.lru_cache(maxsize=None)
def _cached_load(name, root, size):
    # the scripts use at most a few hundred images: make only those, once per test session
    few = {"n": 256} if name == "shapes" and "n" in inspect.signature(_real_load_images).parameters else {}
    return _real_load_images(name, root=root, size=size, **few)


def _icons(name):
    return "shapes" if name == "icons" else name  # the built-in set under another name (TINY's --data)


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: one thread is as fast, and steady on a busy machine
    monkeypatch.setattr(data, "load_images",
                        lambda name, root=None, size=None, **kw: _cached_load(_icons(name), root, size))
    yield
    torch.set_num_threads(threads)


def run(script, tmp_path, *flags, out="run", tiny=True):
    """Run script.main in-process with output in tmp_path/out; returns that folder."""
    folder = str(tmp_path / out)
    argv = (TINY + EXTRA[script] if tiny else []) + ["--out", folder] + [str(f) for f in flags]
    SCRIPTS[script].main(argv)
    return folder


def error_of(capsys, script, argv):
    """The message of a command-line error (argparse's exit status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        SCRIPTS[script].main([str(a) for a in argv])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def ckpt(folder):
    return torch.load(os.path.join(folder, "checkpoint.pt"), weights_only=True)


def no_temp_files(folder):
    leftovers = [f for _, _, files in os.walk(folder) for f in files if f.endswith(".tmp")]
    assert leftovers == []


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished dcgan run (1 epoch = 4 steps) whose checkpoint the sampling tests reuse."""
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "load_images", lambda name, root=None, size=None, **kw: _cached_load(_icons(name), root, size))
        return run("dcgan", tmp_path_factory.mktemp("trained"), "--epochs", 1)


# -----------------------------------------------------------------------------
# --help and training outputs


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_every_common_flag_with_its_default(script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        SCRIPTS[script].main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag in ["--data", "--data-root", "--image-size", "--epochs", "--batch-size", "--lr-g", "--lr-d",
                 "--nz", "--out", "--resume", "--sample", "--zip", "--seed", "--device", "--compile",
                 "--augment", "--diffaug", "--max-images", "--force", "--ema", "--log-every", "--d-steps"]:
        assert flag in text
    assert "(default: shapes)" in text and "(default: 100)" in text
    assert text.count("or none (default: none)") == 2  # --augment and --diffaug: off, as measured best


@pytest.mark.parametrize("script,flags", [("dcgan", []), ("lsgan", []), ("lsgan", ["--d-norm", "none"]), ("wgan", []),
                                         ("wgan", ["--gp", 10])],
                         ids=["dcgan", "lsgan", "lsgan-no-norm", "wgan-clip", "wgan-gp"])
def test_training_writes_grid_curves_and_checkpoint(script, flags, tmp_path):
    folder = run(script, tmp_path, "--epochs", 2, *flags)
    steps = 2 * 64 // (16 * (2 if script == "wgan" else 1))
    state = ckpt(folder)
    assert (state["step"], state["epoch"], state["batch"]) == (steps, 2, 0)
    assert set(state) >= {"G", "D", "G_ema", "opt_g", "opt_d", "args", "rng", "fixed_z", "curves"}
    assert not any(k.startswith("_orig_mod.") for k in state["G"])
    # both optimizers took one step per update: G once a step, D --d-steps times
    assert state["opt_g"]["state"][0]["step"].item() == steps
    assert state["opt_d"]["state"][0]["step"].item() == steps * (2 if script == "wgan" else 1)
    # a grid of 64 samples from the fixed noise: 8 x 8 images of 32 px with 2 px gaps
    grid = Image.open(os.path.join(folder, "grid.png"))
    assert grid.size == (8 * 34 + 2, 8 * 34 + 2) and grid.mode == "RGB"
    assert len(os.listdir(os.path.join(folder, "grids"))) == 2  # one per epoch
    lines = open(os.path.join(folder, "curves.csv")).read().split()
    assert lines[0] == "step,loss_D,loss_G,D_x,D_G_z,loss_D_smooth,loss_G_smooth,D_x_smooth,D_G_z_smooth"
    assert [int(line.split(",")[0]) for line in lines[1:]] == list(range(1, steps + 1))
    assert Image.open(os.path.join(folder, "curves.png")).size[0] > 100
    no_temp_files(folder)
    if script == "wgan" and flags:  # WGAN-GP: Adam(1e-4, betas (0, 0.9)), no BatchNorm in the critic
        assert state["opt_d"]["param_groups"][0]["betas"] == (0.0, 0.9)
        assert state["opt_d"]["param_groups"][0]["lr"] == 1e-4
        assert not any("running_mean" in k for k in state["D"])
    elif script == "wgan":  # WGAN: RMSprop(5e-5), weights clipped to [-0.01, 0.01]
        assert "betas" not in state["opt_d"]["param_groups"][0] and state["opt_d"]["param_groups"][0]["lr"] == 5e-5
        assert max(p.abs().max().item() for k, p in state["D"].items()
                   if "running" not in k and "num_batches" not in k) <= 0.01
    else:
        assert state["opt_d"]["param_groups"][0]["betas"] == (0.5, 0.999)
    if script == "lsgan":  # --d-norm: BatchNorm in D's hidden layers, or none (then the convolutions have biases)
        has_norm = flags != ["--d-norm", "none"]
        assert any("running_mean" in k for k in state["D"]) == has_norm
        assert ("net.2.bias" in state["D"]) != has_norm  # net.2: the first hidden convolution


def test_architecture_follows_image_size_and_widths():
    for size, start, layers in [(32, 4, 4), (64, 4, 5), (96, 3, 6), (48, 3, 5)]:
        G, D = dcgan.Generator(size, 100, 8), dcgan.Discriminator(size, 8)
        assert G(torch.randn(2, 100, 1, 1)).shape == (2, 3, size, size)
        assert D(torch.randn(2, 3, size, size)).shape == (2,)
        assert G.net[0].kernel_size == (start, start)
        assert sum(isinstance(m, torch.nn.ConvTranspose2d) for m in G.net) == layers
    D = dcgan.Discriminator(64, 8)
    assert not isinstance(D.net[1], torch.nn.BatchNorm2d)  # none on D's input layer
    assert all(m.eps == 1e-5 for m in D.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_image_size_nz_and_sample_size(tmp_path):
    folder = run("lsgan", tmp_path, "--epochs", 1, "--image-size", 64, "--nz", 16, "--sample", 3)
    assert ckpt(folder)["G"]["net.0.weight"].shape[0] == 16  # (nz, ngf*8, 4, 4)
    assert Image.open(os.path.join(folder, "grid.png")).size == (8 * 66 + 2, 8 * 66 + 2)
    samples = os.path.join(folder, "samples")
    assert {Image.open(os.path.join(samples, f)).size for f in os.listdir(samples)} == {(64, 64)}


# -----------------------------------------------------------------------------
# Ctrl-C, resume, NaN


def interrupt_at(monkeypatch, module, call, signum=signal.SIGINT):
    """Send ourselves SIGINT (as Ctrl-C does) from the call-th draw of augmentation parameters."""
    calls = []

    def random_affine(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            signal.raise_signal(signum)
        return real(*args, **kwargs)

    real = module.random_affine
    monkeypatch.setattr(module, "random_affine", random_affine)


def test_sigterm_checkpoints_and_says_so(tmp_path, monkeypatch, capsys):
    # a scheduler's SIGTERM stops like Ctrl-C, and the message names it (no "press again")
    interrupt_at(monkeypatch, SCRIPTS["dcgan"], call=3, signum=signal.SIGTERM)
    with pytest.raises(SystemExit) as stop:  # 128 + 15, as a process killed by SIGTERM: it did not finish
        run("dcgan", tmp_path, "--epochs", 2, "--sample", 5, "--zip", "hand_in", out="stopped")
    assert stop.value.code == 143
    folder = str(tmp_path / "stopped")
    printed = capsys.readouterr()
    # the samples were not written, and the message says how to get them
    assert not os.path.exists(os.path.join(folder, "samples"))
    assert not os.path.exists(os.path.join(folder, "hand_in.zip"))
    assert "--sample 5 --zip hand_in (--sample was not done" in printed.out
    assert "SIGTERM: saving a checkpoint" in printed.out + printed.err
    assert "Ctrl-C" not in printed.out + printed.err and "press again" not in printed.out + printed.err
    assert "continue with: python dcgan.py --resume" in printed.out
    assert ckpt(folder)["step"] == 3


@pytest.mark.parametrize("script", SCRIPTS)
def test_ctrl_c_checkpoints_and_resume_continues_exactly(script, tmp_path, monkeypatch, capsys):
    d_steps = 2 if script == "wgan" else 1
    straight = run(script, tmp_path, "--epochs", 2, "--ema", 0.9, out="straight")

    handler = signal.getsignal(signal.SIGINT)
    interrupt_at(monkeypatch, SCRIPTS[script], call=3 * d_steps)  # during step 3 (of 4 or 2 in an epoch)
    with pytest.raises(SystemExit) as stop:  # 128 + 2: the run did not finish
        run(script, tmp_path, "--epochs", 2, "--ema", 0.9, out="stopped")
    assert stop.value.code == 130
    folder = str(tmp_path / "stopped")
    printed = capsys.readouterr()
    assert "Ctrl-C" in printed.out + printed.err and "--resume" in printed.out
    state = ckpt(folder)
    # the step in progress was finished; (epoch, batch) is where to go on
    assert (state["step"], state["epoch"], state["batch"]) == ((3, 0, 3) if d_steps == 1 else (3, 1, 1))
    assert signal.getsignal(signal.SIGINT) is handler  # the script gave the handler back

    # every other setting comes from the checkpoint
    SCRIPTS[script].main(["--resume", os.path.join(folder, "checkpoint.pt")])
    assert "resumed" in capsys.readouterr().out
    a, b = ckpt(straight), ckpt(folder)
    assert b["step"] == a["step"] == 8 // d_steps and b["epoch"] == 2
    for key in ["G", "D", "G_ema"]:
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resuming"
    for opt in ["opt_g", "opt_d"]:
        for p, moments in a[opt]["state"].items():
            for name, value in moments.items():
                assert torch.equal(value, b[opt]["state"][p][name]), f"{opt} {name} differs after resuming"
    assert torch.equal(a["curves"]["values"], b["curves"]["values"])


def test_resume_with_more_epochs_and_new_learning_rate(trained, tmp_path):
    folder = run("dcgan", tmp_path, "--resume", os.path.join(trained, "checkpoint.pt"), "--epochs", 2,
                 "--lr-d", 1e-4, tiny=False)
    state = ckpt(folder)
    assert state["step"] == 8 and state["opt_d"]["state"][0]["step"].item() == 8
    assert state["opt_d"]["param_groups"][0]["lr"] == 1e-4 and state["opt_g"]["param_groups"][0]["lr"] == 2e-4
    assert state["args"]["max_images"] == 64 and state["args"]["ngf"] == 8  # from the checkpoint


def test_resume_refuses_incompatible_settings(trained, capsys):
    path = os.path.join(trained, "checkpoint.pt")
    message = error_of(capsys, "dcgan", ["--resume", path, "--image-size", 64])
    assert "--image-size 32, not 64" in message
    message = error_of(capsys, "dcgan", ["--resume", path, "--nz", 50, "--epochs", 2])
    assert "--nz 100, not 50" in message


def test_lsgan_resume_refuses_another_d_norm(tmp_path, capsys):
    folder = run("lsgan", tmp_path, "--epochs", 1)
    message = error_of(capsys, "lsgan", ["--resume", os.path.join(folder, "checkpoint.pt"), "--d-norm", "none"])
    assert "--d-norm batch, not none" in message


@pytest.mark.parametrize("script", SCRIPTS)
def test_z_mixture_feeds_g_noise_around_fixed_centres(script, tmp_path, monkeypatch, capsys):
    # --z-mixture K: z = c_k + e, k uniform in 0..K-1, e ~ N(0, I), the K centres drawn once and kept in the
    # checkpoint. Record every z G is given (training, the grid and the samples) and check that definition.
    seen = []
    module = SCRIPTS[script]
    forward = module.Generator.forward
    monkeypatch.setattr(module.Generator, "forward", lambda self, z: seen.append(z.detach()) or forward(self, z))
    folder = run(script, tmp_path, "--epochs", 2, "--nz", 16, "--z-mixture", 3, "--sample", 600)
    centres = ckpt(folder)["z_centres"]
    assert centres.shape == (3, 16) and ckpt(folder)["args"]["z_mixture"] == 3

    def check_noise(min_count):
        z = torch.cat(seen).flatten(1)  # (n, 16)
        nearest = torch.cdist(z, centres).argmin(1)  # (n,)
        e = z - centres[nearest]
        # the centres are ~sqrt(2 * 16) = 5.7 apart and e's norm is ~4: the nearest centre is the one drawn
        assert len(z) >= min_count and torch.bincount(nearest, minlength=3).min() > len(z) / 5  # all three, evenly
        assert abs(e.mean().item()) < 0.05 and abs(e.std().item() - 1) < 0.05

    check_noise(1000)
    # resumed only to sample, the run draws from the same centres; another K is refused (G was trained on this noise)
    seen.clear()
    module.main(["--resume", os.path.join(folder, "checkpoint.pt"), "--epochs", "0", "--sample", "500",
                "--out", str(tmp_path / "again")])
    check_noise(500)
    message = error_of(capsys, script, ["--resume", os.path.join(folder, "checkpoint.pt"), "--z-mixture", 0])
    assert "--z-mixture 3, not 0" in message


def test_missing_and_corrupt_checkpoints_are_clear_errors(tmp_path, capsys):
    missing = tmp_path / "nothing.pt"
    assert "does not exist" in error_of(capsys, "dcgan", ["--resume", missing])
    corrupt = tmp_path / "corrupt.pt"
    torch.save({"G": torch.zeros(1000)}, corrupt)
    corrupt.write_bytes(corrupt.read_bytes()[:300])  # a truncated file
    message = error_of(capsys, "wgan", ["--resume", corrupt])
    assert str(corrupt) in message and "could not be read" in message


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    calls = []

    def warp_batch(*args, **kwargs):  # NaN images from the 6th batch on: step 6, in epoch 2
        calls.append(1)
        images = real(*args, **kwargs)
        return images * float("nan") if len(calls) >= 6 else images

    real = dcgan.warp_batch
    monkeypatch.setattr(dcgan, "warp_batch", warp_batch)
    with pytest.raises(SystemExit) as exit_info:
        run("dcgan", tmp_path, "--epochs", 3)
    message = str(exit_info.value.code)
    assert "at step 6" in message and "NaN" in message and "checkpoint.pt (step 4)" in message
    state = ckpt(str(tmp_path / "run"))
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["G"].values())


# -----------------------------------------------------------------------------
# samples and the hand-in zip


def numbered(folder):
    return sorted(os.listdir(folder), key=lambda name: int(name.split(".")[0]))


def test_sample_64_only_samples_without_the_data(trained, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "load_images", lambda *a, **k: pytest.fail("sampling must not load the data"))
    before = ckpt(trained)
    folder = run("dcgan", tmp_path, "--epochs", 0, "--resume", os.path.join(trained, "checkpoint.pt"),
                 "--sample", 64, tiny=False)
    samples = os.path.join(folder, "samples")
    assert numbered(samples) == [f"{i}.png" for i in range(1, 65)]
    for name in ["1.png", "64.png"]:
        image = Image.open(os.path.join(samples, name))
        assert image.size == (32, 32) and image.mode == "RGB"
    assert os.path.exists(os.path.join(folder, "grid.png"))
    assert not os.path.exists(os.path.join(folder, "checkpoint.pt"))  # nothing trained, nothing saved
    assert torch.equal(ckpt(trained)["G"]["net.0.weight"], before["G"]["net.0.weight"])


def test_zip_holds_one_folder_with_the_pngs(trained, tmp_path):
    folder = run("dcgan", tmp_path, "--epochs", 0, "--resume", os.path.join(trained, "checkpoint.pt"),
                 "--sample", 12, "--zip", "0860912_img", tiny=False)
    with zipfile.ZipFile(os.path.join(folder, "0860912_img.zip")) as archive:
        names = archive.namelist()
        assert {name.split("/")[0] for name in names} == {"0860912_img"}
        assert sorted(n for n in names if n.endswith(".png")) == sorted(f"0860912_img/{i}.png" for i in range(1, 13))
        with archive.open("0860912_img/12.png") as f:
            assert Image.open(f).size == (32, 32)
    no_temp_files(folder)


def test_nonempty_samples_folder_refused_unless_force(trained, tmp_path, capsys):
    ck = os.path.join(trained, "checkpoint.pt")
    folder = run("dcgan", tmp_path, "--epochs", 0, "--resume", ck, "--sample", 12, tiny=False)
    argv = ["--epochs", 0, "--resume", ck, "--out", folder, "--sample", 5]
    assert "not empty" in error_of(capsys, "dcgan", argv)
    dcgan.main([str(a) for a in argv + ["--force"]])
    assert numbered(os.path.join(folder, "samples")) == [f"{i}.png" for i in range(1, 6)]  # none left over


def test_disk_full_while_sampling_leaves_no_zip(trained, tmp_path, monkeypatch):
    written = []

    def write_bytes(path, data_):
        if len(written) == 7:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(path)
        with open(path, "wb") as f:
            f.write(data_)

    monkeypatch.setattr(outputs, "_write_bytes", write_bytes)
    with pytest.raises(SystemExit) as error:  # one line, no traceback (tests/test_faults.py)
        run("dcgan", tmp_path, "--epochs", 0, "--resume", os.path.join(trained, "checkpoint.pt"),
            "--sample", 20, "--zip", "hand_in", tiny=False)
    assert "the disk is full" in str(error.value) and "7 of 20" in str(error.value) and "no " in str(error.value)
    folder = str(tmp_path / "run")
    assert not os.path.exists(os.path.join(folder, "hand_in.zip"))
    assert [f for f in os.listdir(folder) if "hand_in" in f] == []  # no partial zip under any name


# -----------------------------------------------------------------------------
# the remaining flags and bad input


def test_flags_reach_the_training_loop(tmp_path, monkeypatch):
    seen = {"affine": [], "diffaug": [], "load": []}
    real_affine, real_diffaug = dcgan.random_affine, dcgan.random_diffaug
    monkeypatch.setattr(dcgan, "random_affine", lambda *a, **k: seen["affine"].append(k) or real_affine(*a, **k))
    monkeypatch.setattr(dcgan, "random_diffaug", lambda *a, **k: seen["diffaug"].append(a) or real_diffaug(*a, **k))
    monkeypatch.setattr(training, "CurveLog",
                        lambda every, **k: seen.update(every=every) or outputs.CurveLog(every, **k))
    monkeypatch.setattr(data, "load_images",
                        lambda name, root=None, size=None, **kw: seen["load"].append(root)
                        or _cached_load(_icons(name), None, size))
    folder = run("dcgan", tmp_path, "--epochs", 1, "--augment", "flip,translate=0.1,scale=1.2,rotate=15",
                 "--diffaug", "translation", "--g-loss", "saturating", "--d-steps", 2, "--ema", 0,
                 "--lr-g", 1e-3, "--lr-d", 3e-4, "--seed", 3, "--device", "cpu", "--data-root", tmp_path,
                 "--batch-size", 8, "--max-images", 48, "--log-every", 5)
    assert seen["affine"][0] == {"flip": 0.5, "translate": 0.1, "scale": (1.0, 1.2), "rotate": 15.0,
                                 "generator": seen["affine"][0]["generator"], "device": torch.device("cpu")}
    assert {a[3] for a in seen["diffaug"]} == {"translation"} and seen["load"] == [str(tmp_path)]
    assert seen["every"] == 5
    state = ckpt(folder)
    assert state["G_ema"] is None and state["step"] == 3  # 48 images / (8 x 2)
    assert state["opt_g"]["param_groups"][0]["lr"] == 1e-3 and state["opt_d"]["param_groups"][0]["lr"] == 3e-4
    assert state["opt_d"]["state"][0]["step"].item() == 6
    assert state["args"]["g_loss"] == "saturating" and state["args"]["seed"] == 3

    # --augment none keeps the fused uint8 -> float path with the identity; --diffaug none skips it
    seen["affine"].clear(), seen["diffaug"].clear()
    monkeypatch.setattr(dcgan, "diff_augment", lambda *a: pytest.fail("--diffaug none must not augment"))
    run("dcgan", tmp_path, "--epochs", 1, "--augment", "none", "--diffaug", "none", out="plain")
    assert seen["affine"][0]["flip"] == 0.0 and set(seen["affine"][0]) == {"flip", "generator", "device"}
    assert all(a[3] == "" for a in seen["diffaug"])  # only the check of the policy, no draws


@pytest.mark.parametrize("script", ["dcgan", "wgan"])
def test_the_largest_seed_trains_and_samples(script, tmp_path):
    # the epoch generators take seed * 100_003 + epoch and the samples seed + 1: all must fit 64 bits
    folder = run(script, tmp_path, "--epochs", 2, "--seed", 2 ** 32 - 1, "--sample", 3)
    assert ckpt(folder)["epoch"] == 2 and len(os.listdir(os.path.join(folder, "samples"))) == 3


def test_seed_changes_the_run_and_fixes_it(tmp_path):
    a = ckpt(run("dcgan", tmp_path, "--epochs", 1, "--seed", 1, out="a"))
    b = ckpt(run("dcgan", tmp_path, "--epochs", 1, "--seed", 1, "--force", out="a"))
    c = ckpt(run("dcgan", tmp_path, "--epochs", 1, "--seed", 2, out="c"))
    assert torch.equal(a["G"]["net.0.weight"], b["G"]["net.0.weight"])
    assert not torch.equal(a["G"]["net.0.weight"], c["G"]["net.0.weight"])
    assert not torch.equal(a["fixed_z"], c["fixed_z"])


def test_compile_trains_and_saves_plain_state_dicts(tmp_path, monkeypatch):
    compiled = []
    real_compile = torch.compile

    def compile_eager(module, **kwargs):  # the same graph capture without inductor's slow C++ build
        compiled.append(type(module).__name__)
        return real_compile(module, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", compile_eager)
    folder = run("wgan", tmp_path, "--epochs", 1, "--compile", "--gp", 10)
    assert compiled == ["Generator", "Discriminator"]
    assert not any(k.startswith("_orig_mod.") for k in ckpt(folder)["D"])


def test_default_out_folder_is_under_out(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    wgan.main(["--max-images", "160", "--batch-size", "16", "--ngf", "8", "--ndf", "8", "--epochs", "1"])
    assert ckpt(str(tmp_path / "out" / "wgan-shapes"))["step"] == 10  # 160 / 16: one D step (DATA_DEFAULTS)


@pytest.mark.parametrize("argv,expected", [
    (["--data", "no_such_dataset"], "no_such_dataset"),
    (["--augment", "wobble"], "--augment: unknown 'wobble'"),
    (["--diffaug", "sparkle"], "sparkle"),
    (["--zip", "x"], "--zip NAME needs --sample N"),
    (["--image-size", 30], "--image-size 30: give 3 to 7 times a power of 2"),
    (["--image-size", 8], "--image-size 8: give 3 to 7 times a power of 2 of at least 4"),
    (["--image-size", 36], "--image-size 36: give 3 to 7 times a power of 2"),  # 9 x 4: vae.py refuses it too
    (["--batch-size", 100], "more than the 64 images"),
    pytest.param(["--device", "cuda"], "no CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has a GPU")),
])
def test_bad_input_is_a_clear_error(argv, expected, tmp_path, capsys):
    assert expected in error_of(capsys, "dcgan", TINY + ["--out", tmp_path / "bad", "--epochs", 1] + argv)


def test_existing_checkpoint_is_not_overwritten_without_force(trained, capsys):
    message = error_of(capsys, "dcgan", TINY + ["--out", trained, "--epochs", 1])
    assert "--resume" in message and "--force" in message


# -----------------------------------------------------------------------------
# outputs.py directly


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    outputs.save_checkpoint({"step": 1}, path)

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        outputs.save_checkpoint({"step": 2}, path)
    assert outputs.load_checkpoint(path) == {"step": 1} and os.listdir(tmp_path) == ["ck.pt"]


def test_curve_log_fetches_every_few_steps_and_smooths():
    log = outputs.CurveLog(every=4, window=2)
    shown = [log.append(step, a=torch.tensor(float(step)), b=torch.tensor(1.0)) for step in range(1, 9)]
    assert [s is not None for s in shown] == [False, False, False, True] * 2
    assert shown[3] == {"a": 2.5, "b": 1.0}
    assert [row[0] for row in log.smoothed()] == [1.0, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5]
    log.append(9, a=torch.tensor(float("inf")), b=torch.tensor(1.0))
    log.flush()
    assert log.nonfinite == (9, "a")


def test_write_samples_accepts_float_batches_and_grey(tmp_path):
    batches = [torch.zeros(3, 1, 5, 5), torch.ones(3, 1, 5, 5)]  # floats in [-1, 1], one channel
    outputs.write_samples(batches, 5, tmp_path / "s")
    assert numbered(tmp_path / "s") == [f"{i}.png" for i in range(1, 6)]
    image = Image.open(tmp_path / "s" / "5.png")
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(RuntimeError, match="ran out after 6 of 7"):
        outputs.write_samples(batches, 7, tmp_path / "t")


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_built_in_set_takes_its_own_defaults_and_a_given_flag_wins(script, tmp_path, capsys):
    module = SCRIPTS[script]
    small = ["--max-images", "64", "--batch-size", "16", "--ngf", "8", "--ndf", "8", "--epochs", "1"]
    module.main(small + ["--out", str(tmp_path / "shapes")])
    settings = ckpt(str(tmp_path / "shapes"))["args"]
    for key, value in module.DATA_DEFAULTS["shapes"].items():
        if key not in ("max_images", "batch_size", "ngf", "ndf", "epochs"):  # given above: those win
            assert settings[key] == value, key
    assert (settings["max_images"], settings["ngf"], settings["epochs"]) == (64, 8, 1)
    # resumed, the run keeps its own settings; another data set has the paper's (the parser's) defaults
    module.main(["--resume", str(tmp_path / "shapes" / "checkpoint.pt"), "--epochs", "2"])
    assert ckpt(str(tmp_path / "shapes"))["args"]["ema"] == module.DATA_DEFAULTS["shapes"]["ema"]
    module.main(small + ["--data", "icons", "--out", str(tmp_path / "other")] + EXTRA[script])
    other = ckpt(str(tmp_path / "other"))["args"]
    assert other["ema"] == module.parser.get_default("ema") != module.DATA_DEFAULTS["shapes"]["ema"]
    assert other["augment"] == other["diffaug"] == "none"
    with pytest.raises(SystemExit):
        module.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "with --data shapes (the built-in icons, the default) these defaults change: --max-images 5000" in help_text
    assert "(default: None)" not in help_text
    assert f"python {script}.py --sample 1000" in help_text and "Everything goes to --out" in help_text  # an example


def test_a_new_run_removes_the_temporary_files_a_killed_run_left(tmp_path, capsys):
    folder = tmp_path / "run"
    (folder / "samples").mkdir(parents=True)
    left = [folder / ".checkpoint.pt.k3j_9x2a.tmp", folder / ".curves.png.0a1b2c3d.tmp",
            folder / "samples" / ".17.png.zz99yy88.tmp"]
    others = [folder / "notes.tmp", folder / ".keep", folder / "samples" / "mine.png.tmp"]
    for path in left + others:
        path.write_bytes(b"x" * 100)
    run("dcgan", tmp_path, "--epochs", 1)
    assert "removed 3 temporary file(s) that a killed run left in" in capsys.readouterr().out
    assert not any(path.exists() for path in left) and all(path.exists() for path in others)


def test_a_sample_does_not_depend_on_how_many_are_asked_for(trained, tmp_path):
    # G's BatchNorm normalizes over the batch it is given: every batch is 500, the last one cut, so
    # image 501 of --sample 501 (once a batch of 1) is image 501 of --sample 510
    for n in (501, 510):
        run("dcgan", tmp_path, "--resume", os.path.join(trained, "checkpoint.pt"), "--epochs", 1, "--sample", n,
            out=f"n{n}", tiny=False)
    for k in (1, 500, 501):
        assert (tmp_path / "n501" / "samples" / f"{k}.png").read_bytes() == \
               (tmp_path / "n510" / "samples" / f"{k}.png").read_bytes(), k


def test_lld_takes_the_settings_measured_on_real_logos(tmp_path, monkeypatch, capsys):
    module = SCRIPTS["dcgan"]
    monkeypatch.setattr(data, "load_images",  # the built-in set stands in for LLD-icon
                        lambda name, root=None, size=None, **kw: _cached_load("shapes", root, size))
    small = ["--max-images", "64", "--batch-size", "16", "--epochs", "1", "--data", "lld"]
    module.main(small + ["--out", str(tmp_path / "lld")])
    settings = ckpt(str(tmp_path / "lld"))["args"]
    for key, value in module.DATA_DEFAULTS["lld"].items():
        assert settings[key] == value, key
    assert settings["ema"] == module.parser.get_default("ema")  # the rest: the paper's
    module.main(small + ["--out", str(tmp_path / "given"), "--ngf", "16"])
    assert ckpt(str(tmp_path / "given"))["args"]["ngf"] == 16  # a given flag wins
    with pytest.raises(SystemExit):
        module.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "with --data lld (LLD-icon, the logo hand-in) these defaults change" in help_text


def test_anime_takes_the_augmentation_measured_at_64x64(tmp_path, monkeypatch):
    module = SCRIPTS["dcgan"]
    monkeypatch.setattr(data, "load_images",  # the built-in set stands in for the faces
                        lambda name, root=None, size=None, **kw: _cached_load("shapes", root, size))
    small = ["--max-images", "64", "--batch-size", "16", "--epochs", "1", "--data", "anime"]
    module.main(small + ["--out", str(tmp_path / "anime")])
    settings = ckpt(str(tmp_path / "anime"))["args"]
    assert (settings["augment"], settings["diffaug"]) == ("flip", "color,translation")
    assert settings["ngf"] == module.parser.get_default("ngf")  # the rest: the paper's
    module.main(small + ["--out", str(tmp_path / "none"), "--augment", "none", "--diffaug", "none"])
    given = ckpt(str(tmp_path / "none"))["args"]
    assert (given["augment"], given["diffaug"]) == ("none", "none")  # given flags win
