"""vae.py and vae_sweep.py: every output of a tiny run, the loss terms against torch.distributions,
learning, resume (also after Ctrl-C), sampling, the sweep, bad input, and torchrun with 2 processes.
CPU, tiny 16x16 'shapes'."""
import csv
import os
import shutil
import signal
import subprocess
import sys
import zipfile

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from ganlab import data
from ganlab import outputs
import dcgan
import vae
import vae_sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a tiny network on 16x16 images: each run takes a second or two on a CPU
TINY = ["--image-size", "16", "--max-images", "96", "--width", "8", "--latent", "8", "--batch-size", "16",
        "--log-every", "2", "--holdout", "0.1"]

_shapes = {}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: these tiny networks gain nothing from two, and on a busy machine (other
    tests, other builds) two threads spinning at every op's barrier make each step ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def few_shapes(monkeypatch):
    """'shapes' makes 20,000 icons by default (seconds each call): make 300 once per size and keep them."""
    real = data.load_images

    def load_images(name_or_path="shapes", root=None, size=None, **kwargs):
        if name_or_path != "shapes":
            return real(name_or_path, root, size, **kwargs)
        if size not in _shapes:
            _shapes[size] = real("shapes", size=size, n=300)
        return _shapes[size][:kwargs.get("limit")].clone()  # the first `limit`, as data.load_images gives

    monkeypatch.setattr(data, "load_images", load_images)


@pytest.fixture
def quick_figures(monkeypatch):
    """For tests about something else: the per-epoch plots are built but not rendered (rendering
    is most of a tiny run's time); a 1x1 PNG stands in. test_tiny_run_writes_every_output and the
    sweep's comparison figure render for real."""
    import matplotlib.figure

    real = matplotlib.figure.Figure.savefig

    def savefig(self, fname, *args, **kwargs):
        if "sweep.png" in str(fname):
            return real(self, fname, *args, **kwargs)
        Image.new("RGB", (1, 1)).save(fname, format="PNG")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)


def run(tmp_path, *extra, name="run"):
    return vae.main(TINY + ["--out", str(tmp_path / name)] + [str(e) for e in extra])


def usage_error(capsys, argv):
    """The message of a command-line error: exit status 2 (argparse's), no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        vae.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    return err


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -----------------------------------------------------------------------------
# the model and the loss


@pytest.mark.parametrize("size", [16, 32, 48, 64, 96])
def test_decoder_mirrors_encoder(size):
    model = vae.VAE(size, latent=5, width=4)
    x = torch.rand(2, 3, size, size) * 2 - 1
    x_hat, mu, logvar = model(x, torch.randn(2, 5))
    assert x_hat.shape == x.shape and mu.shape == logvar.shape == (2, 5)


def test_shape_comments_hold():
    # the docstrings' shapes, at the default 32x32, --width 32, --latent 128
    model = vae.VAE(32, latent=128, width=32)
    x = torch.zeros(2, 3, 32, 32)
    shapes = [tuple(x.shape)]
    for layer in model.encoder.conv:
        x = layer(x)
        if isinstance(layer, torch.nn.LeakyReLU):
            shapes.append(tuple(x.shape))
    assert shapes == [(2, 3, 32, 32), (2, 32, 16, 16), (2, 64, 8, 8), (2, 128, 4, 4)]
    assert (model.encoder.head.in_features, model.encoder.head.out_features) == (2048, 256)
    h = model.decoder.head(torch.zeros(2, 128)).view(-1, *model.decoder.shape)
    shapes = [tuple(h.shape)]
    for layer in model.decoder.deconv:
        h = layer(h)
        if isinstance(layer, torch.nn.ConvTranspose2d):
            shapes.append(tuple(h.shape))
    assert shapes == [(2, 128, 4, 4), (2, 64, 8, 8), (2, 32, 16, 16), (2, 3, 32, 32)]
    assert vae.feature_sizes(96) == [96, 48, 24, 12, 6]


def test_impossible_image_size_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(ValueError, match="image-size 36"):
        vae.feature_sizes(36)  # 36 -> 18 -> 9: odd and too big to end on
    assert "--image-size 36: give 3 to 7 times a power of 2" in usage_error(capsys, TINY + ["--image-size", 36])
    for size in (8, 10, 14):  # one halving: refused, as dcgan.py refuses them
        with pytest.raises(ValueError, match=f"image-size {size}: give 3 to 7 times"):
            vae.feature_sizes(size)
        with pytest.raises(ValueError):
            dcgan.start_size(size)
    for size in (12, 16, 20, 24, 28, 32, 48, 64, 96):  # the sizes both take
        assert vae.feature_sizes(size)[0] == size and dcgan.start_size(size)


def test_kl_term_equals_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(7, 11, generator=g, dtype=torch.float64) * 2
    logvar = torch.randn(7, 11, generator=g, dtype=torch.float64)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    expected = torch.distributions.kl_divergence(q, p).sum(dim=1)  # summed over the latent, per image
    torch.testing.assert_close(vae.kl_divergence(mu, logvar), expected)
    assert (vae.kl_divergence(mu, logvar) > 0).all()
    assert torch.equal(vae.kl_divergence(torch.zeros(3, 4), torch.zeros(3, 4)), torch.zeros(3))


def test_reconstruction_term_is_the_gaussian_negative_log_likelihood():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(5, 3, 4, 4, generator=g, dtype=torch.float64)
    x_hat = torch.rand(5, 3, 4, 4, generator=g, dtype=torch.float64)
    log_scale = torch.tensor(-1.3, dtype=torch.float64)
    expected = -torch.distributions.Normal(x_hat, log_scale.exp()).log_prob(x).flatten(1).sum(dim=1)
    torch.testing.assert_close(vae.reconstruction_nll(x, x_hat, log_scale), expected)


def test_best_scale_maximizes_the_likelihood():
    g = torch.Generator().manual_seed(2)
    x, x_hat = torch.rand(4, 3, 8, 8, generator=g), torch.rand(4, 3, 8, 8, generator=g)
    best = vae.best_log_scale(x, x_hat)
    nll = [vae.reconstruction_nll(x, x_hat, best + d).sum().item() for d in (-0.01, 0.0, 0.01)]
    assert nll[1] < nll[0] and nll[1] < nll[2]
    assert torch.exp(2 * vae.best_log_scale(x, x)).item() == pytest.approx(vae.MIN_SCALE_SQ)  # the floor


def test_running_scale():
    decoder = vae.Decoder(16, 4, 4)
    decoder.track_scale(torch.tensor(0.3))  # the first batch sets it
    assert decoder.scale_sq.item() == pytest.approx(0.3)
    decoder.track_scale(torch.tensor(0.1))  # then the mean
    assert decoder.scale_sq.item() == pytest.approx(0.2)


def test_bits_per_dim():
    # a uniform density on [-1, 1] is 1/2 per dimension: -log(1/2) nats; times the bin width 1/127.5
    # it gives each of the 255.. values probability 1/255, i.e. log2(255) bits
    assert vae.bits_per_dim(3 * 16 * float(np.log(2)), 3 * 16) == pytest.approx(np.log2(255))


def test_loss_falls_when_overfitting_a_fixed_batch():
    torch.manual_seed(0)
    x = data.make_shapes(16, 16, seed=3)
    x = torch.from_numpy(x).float() / 127.5 - 1
    model = vae.VAE(16, latent=8, width=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(80):
        x_hat, mu, logvar = model(x, torch.randn(16, 8))
        log_scale = vae.best_log_scale(x, x_hat)
        loss = (vae.reconstruction_nll(x, x_hat, log_scale) + vae.kl_divergence(mu, logvar)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.decoder.track_scale(torch.exp(2 * log_scale))
        losses.append(loss.item())
    # 768 values per image: the loss falls by hundreds of nats as the fit (and with it s) sharpens
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 400
    assert model.decoder.scale_sq.item() < 0.5 * ((x - x.mean()) ** 2).mean().item()
    model.eval()
    with torch.no_grad():
        err = ((model.decoder(model.encoder(x)[0]) - x) ** 2).mean().item()
    assert err < 0.5 * ((x - x.mean()) ** 2).mean().item()


# -----------------------------------------------------------------------------
# a run and what it writes


def test_tiny_run_writes_every_output(tmp_path, capsys):
    result = run(tmp_path, "--epochs", 2, "--sample", 5, "--zip", "hand_in")
    out = tmp_path / "run"
    for name in ["elbo.csv", "elbo.png", "curves.csv", "curves.png", "reconstructions.png", "samples.png",
                 "checkpoint.pt", "hand_in.zip"]:
        assert (out / name).is_file(), name
    # the learning curve: one row per epoch, train and held-out, -ELBO = reconstruction + KL
    rows = read_csv(out / "elbo.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for r in rows:
        for split in ["train", "heldout"]:
            total, recon, kl = (float(r[f"{split}_{k}"]) for k in ["neg_elbo", "recon", "kl"])
            assert total == pytest.approx(recon + kl, rel=1e-4) and kl >= 0
    # 96 images, 10 held out -> 86 training images, 5 steps of 16 per epoch; a curve row per step
    steps = read_csv(out / "curves.csv")
    assert [int(r["step"]) for r in steps] == list(range(1, 11))
    assert {"neg_elbo", "recon", "kl", "neg_elbo_smooth"} <= set(steps[0])
    # the training columns of elbo.csv are the means of the epoch's rows of curves.csv
    assert float(rows[1]["train_kl"]) == pytest.approx(np.mean([float(r["kl"]) for r in steps[5:]]), rel=1e-4)
    assert "86 training and 10 held-out images, 16x16; 5 steps of 16" in capsys.readouterr().out
    # reconstructions: a row of 8 inputs above a row of 8 reconstructions (16 px + 2 px gaps)
    assert Image.open(out / "reconstructions.png").size == (8 * 18 + 2, 2 * 18 + 2)
    assert Image.open(out / "samples.png").size == (8 * 18 + 2, 8 * 18 + 2)
    # the numbered samples and the hand-in zip, like the GAN scripts'
    assert sorted(os.listdir(out / "samples")) == sorted(f"{i}.png" for i in range(1, 6))
    im = Image.open(out / "samples" / "3.png")
    assert im.size == (16, 16) and im.mode == "RGB"
    with zipfile.ZipFile(out / "hand_in.zip") as z:
        assert {f"hand_in/{i}.png" for i in range(1, 6)} <= set(z.namelist())
    assert result["steps"] == 10 and np.isfinite(result["neg_elbo"])
    assert result["neg_elbo"] == pytest.approx(float(rows[-1]["heldout_neg_elbo"]), rel=1e-4)


@pytest.mark.usefixtures("quick_figures")
def test_checkpoint_holds_the_run(tmp_path):
    run(tmp_path, "--epochs", 1, "--lr", "0.002")
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "step", "epoch", "batch", "args", "rng", "history", "curves"} <= set(state)
    assert state["script"] == "vae"
    assert not any(k.startswith("_orig_mod.") for k in state["model"])
    assert state["epoch"] == 1 and state["step"] == 5 and state["args"]["latent"] == 8
    assert state["model"]["encoder.conv.0.weight"].shape[0] == 8  # --width: the first layer's channels
    assert state["model"]["encoder.head.weight"].shape[0] == 2 * 8  # --latent: mu and logvar
    assert state["model"]["decoder.head.0.weight"].shape[1] == 8
    assert state["optimizer"]["param_groups"][0]["lr"] == 0.002  # --lr reaches the optimizer


@pytest.mark.usefixtures("quick_figures")
def test_resume_continues_exactly(tmp_path):
    run(tmp_path, "--epochs", 2, name="straight")
    run(tmp_path, "--epochs", 1, name="split")
    # settings not given come from the checkpoint (and the output folder is the checkpoint's)
    vae.main(["--resume", str(tmp_path / "split" / "checkpoint.pt"), "--epochs", "2"])
    assert same_weights(weights(tmp_path / "straight" / "checkpoint.pt"), weights(tmp_path / "split" / "checkpoint.pt"))
    assert read_csv(tmp_path / "straight" / "elbo.csv") == read_csv(tmp_path / "split" / "elbo.csv")


@pytest.mark.usefixtures("quick_figures")
def test_ctrl_c_saves_a_checkpoint_and_resume_finishes_the_run(tmp_path, monkeypatch):
    run(tmp_path, "--epochs", 2, name="straight")
    calls = []
    real = vae.warp_batch

    def warp_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # during the third training step of the first epoch
            signal.raise_signal(signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(vae, "warp_batch", warp_then_interrupt)
    handler = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN under nohup ... &
    with pytest.raises(SystemExit) as stop:  # stopped cleanly: 128 + SIGINT, no traceback
        run(tmp_path, "--epochs", 2, name="split")
    assert stop.value.code == 130
    monkeypatch.setattr(vae, "warp_batch", real)
    state = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["step"], state["batch"]) == (0, 3, 3)
    assert signal.getsignal(signal.SIGINT) is handler  # the handler is given back
    vae.main(["--resume", str(tmp_path / "split" / "checkpoint.pt")])
    assert same_weights(weights(tmp_path / "straight" / "checkpoint.pt"), weights(tmp_path / "split" / "checkpoint.pt"))
    assert read_csv(tmp_path / "straight" / "elbo.csv") == read_csv(tmp_path / "split" / "elbo.csv")


@pytest.mark.usefixtures("quick_figures")
def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = []
    real = vae.warp_batch

    def warp_nan_at_step_7(*args, **kwargs):
        calls.append(1)
        x = real(*args, **kwargs)
        return x * float("nan") if len(calls) == 7 else x

    monkeypatch.setattr(vae, "warp_batch", warp_nan_at_step_7)
    with pytest.raises(SystemExit, match="NaN or infinite at step 7.*last good checkpoint.*step 5"):
        run(tmp_path, "--epochs", 3)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 5)  # epoch 1's, not a NaN one
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.usefixtures("quick_figures")
def test_resume_refuses_other_shapes_and_old_checkpoints_are_not_overwritten(tmp_path, capsys):
    run(tmp_path, "--epochs", 1)
    ckpt = str(tmp_path / "run" / "checkpoint.pt")
    assert "trained with --latent 8, not 16" in usage_error(capsys, ["--resume", ckpt, "--latent", "16"])
    assert "--image-size 16, not 32" in usage_error(capsys, ["--resume", ckpt, "--image-size", "32"])
    before = weights(ckpt)
    assert "--force" in usage_error(capsys, TINY + ["--out", tmp_path / "run", "--epochs", 1])  # a new run over it
    assert same_weights(before, weights(ckpt))
    run(tmp_path, "--epochs", 1, "--seed", 5, "--force")  # --force starts over
    assert not same_weights(before, weights(ckpt))
    assert "does not exist" in usage_error(capsys, ["--resume", tmp_path / "nothing.pt"])


@pytest.mark.usefixtures("quick_figures")
def test_resume_writes_where_the_checkpoint_is_and_refuses_other_scripts(tmp_path, capsys):
    run(tmp_path, "--epochs", 1)
    shutil.copytree(tmp_path / "run", tmp_path / "moved")
    before = weights(tmp_path / "run" / "checkpoint.pt")
    vae.main(["--resume", str(tmp_path / "moved" / "checkpoint.pt"), "--epochs", "2"])  # a moved run folder
    assert torch.load(tmp_path / "moved" / "checkpoint.pt", weights_only=True)["epoch"] == 2
    assert same_weights(before, weights(tmp_path / "run" / "checkpoint.pt"))  # the original is untouched
    # --out naming another run's folder: refused without --force, nothing written there
    err = usage_error(capsys, ["--resume", tmp_path / "moved" / "checkpoint.pt", "--epochs", 3,
                               "--out", tmp_path / "run"])
    assert "holds a run" in err and same_weights(before, weights(tmp_path / "run" / "checkpoint.pt"))
    # a checkpoint of another script (dcgan.py's), and one of an older vae.py without the writer's name
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    outputs.save_checkpoint(dict(state, script="dcgan"), tmp_path / "dcgan.pt")
    assert "written by dcgan.py, not vae.py" in usage_error(capsys, ["--resume", tmp_path / "dcgan.pt"])
    outputs.save_checkpoint({k: v for k, v in state.items() if k != "script"}, tmp_path / "old.pt")
    assert "older version" in usage_error(capsys, ["--resume", tmp_path / "old.pt"])
    assert "is a folder" in usage_error(capsys, ["--resume", tmp_path / "run"])


@pytest.mark.usefixtures("quick_figures")
def test_sample_from_a_checkpoint(tmp_path, capsys):
    run(tmp_path, "--epochs", 1)
    ckpt = str(tmp_path / "run" / "checkpoint.pt")
    before = weights(ckpt)
    vae.main(["--resume", ckpt, "--epochs", "0", "--sample", "7"])  # epochs 0: no training, only samples
    folder = tmp_path / "run" / "samples"
    assert sorted(os.listdir(folder), key=lambda f: int(f[:-4])) == [f"{i}.png" for i in range(1, 8)]
    assert same_weights(before, weights(ckpt))
    first = np.asarray(Image.open(folder / "1.png"))
    assert first.std() > 0  # a decoded image, not a blank
    assert "--force" in usage_error(capsys, ["--resume", ckpt, "--sample", "3"])  # refused before any work ...
    vae.main(["--resume", ckpt, "--sample", "3", "--force", "--zip", "again"])  # ... unless --force
    assert sorted(os.listdir(folder)) == ["1.png", "2.png", "3.png"]
    assert (tmp_path / "run" / "again.zip").is_file()
    # the same seed gives the same samples
    assert np.array_equal(first, np.asarray(Image.open(folder / "1.png")))
    shutil.rmtree(folder)
    assert "again.zip exists" in usage_error(capsys, ["--resume", ckpt, "--sample", "3", "--zip", "again"])


def test_gaussian_mixture_recovers_the_mixture_the_codes_came_from():
    # oracle: the parameters the codes were drawn with (three clusters in 4 dimensions, unequal weights)
    g = torch.Generator().manual_seed(3)
    weights, means = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([[4.0, 0, 0, 0], [-4, 2, 0, 0], [0, -4, 3, 1]])
    stds = torch.tensor([[0.5, 0.5, 0.5, 0.5], [1.0, 0.3, 0.3, 0.3], [0.2, 0.2, 1.5, 0.2]])
    j = torch.multinomial(weights, 6000, replacement=True, generator=g)
    codes = means[j] + stds[j] * torch.randn(6000, 4, generator=g)
    log_w, m, v = vae.gaussian_mixture(codes, 3)
    order = [int(torch.cdist(mean[None], m).argmin()) for mean in means]  # component found for each cluster
    assert sorted(order) == [0, 1, 2]
    torch.testing.assert_close(log_w.exp()[order], weights, atol=0.02, rtol=0)
    torch.testing.assert_close(m[order], means, atol=0.1, rtol=0)
    torch.testing.assert_close(v[order].sqrt(), stds, atol=0.05, rtol=0.05)
    # draws from it have the mixture's moments: mean sum_j w_j m_j
    z = vae.draw_latents(20000, 4, torch.Generator().manual_seed(4), (log_w, m, v))
    torch.testing.assert_close(z.mean(0), weights @ means, atol=0.08, rtol=0)
    assert vae.draw_latents(5, 4, torch.Generator().manual_seed(4)).shape == (5, 4)  # no mixture: N(0, I)


@pytest.mark.usefixtures("quick_figures")
def test_prior_mixture_samples_from_the_codes(tmp_path, monkeypatch):
    run(tmp_path, "--epochs", 1)
    ckpt = str(tmp_path / "run" / "checkpoint.pt")
    fitted = []
    real = vae.gaussian_mixture
    monkeypatch.setattr(vae, "gaussian_mixture", lambda codes, k: fitted.append((codes.shape, k)) or real(codes, k))
    vae.main(["--resume", ckpt, "--epochs", "0", "--sample", "6", "--prior-mixture", "4", "--out",
              str(tmp_path / "mix")])
    mixed = np.stack([np.asarray(Image.open(tmp_path / "mix" / "samples" / f"{i}.png")) for i in range(1, 7)])
    vae.main(["--resume", ckpt, "--epochs", "0", "--sample", "6", "--prior-mixture", "0", "--out",
              str(tmp_path / "normal")])
    normal = np.stack([np.asarray(Image.open(tmp_path / "normal" / "samples" / f"{i}.png")) for i in range(1, 7)])
    latent = torch.load(ckpt, weights_only=False)["args"]["latent"]
    assert fitted == [((86, latent), 4)]  # --max-images 96 less 10 held out, encoded once; none for N(0, I)
    assert not np.array_equal(mixed, normal)


# -----------------------------------------------------------------------------
# the flags


@pytest.mark.usefixtures("quick_figures")
def test_augment_flag(tmp_path):
    assert vae.parser.parse_args([]).augment == "flip"  # vae's default: exact mirror images
    results = [run(tmp_path, "--epochs", 1, "--augment", spec, name=spec.replace(",", "_"))["neg_elbo"]
               for spec in ["none", "flip,translate,scale,rotate"]]
    assert np.isfinite(results).all() and results[0] != results[1]


@pytest.mark.usefixtures("quick_figures")
def test_seed_and_device_flags(tmp_path):
    a = run(tmp_path, "--epochs", 1, "--device", "cpu", name="a")
    b = run(tmp_path, "--epochs", 1, "--device", "cpu", name="b")
    c = run(tmp_path, "--epochs", 1, "--seed", 1, name="c")
    assert a["neg_elbo"] == b["neg_elbo"] != c["neg_elbo"]


@pytest.mark.usefixtures("quick_figures")
def test_data_folder_and_data_root(tmp_path, capsys):
    # a folder of images (any size: centre square, resized once when loaded) and a named set under --data-root
    folder = tmp_path / "root" / "anime"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    common = ["--image-size", "16", "--width", "4", "--latent", "4", "--batch-size", "4", "--epochs", "1",
              "--holdout", "0.25", "--log-every", "1"]
    vae.main(common + ["--data", str(folder), "--out", str(tmp_path / "a")])
    vae.main(common + ["--data", "anime", "--data-root", str(tmp_path / "root"), "--max-images", "8",
                       "--out", str(tmp_path / "b")])
    out = capsys.readouterr().out
    assert "9 training and 3 held-out images, 16x16" in out and "6 training and 2 held-out images" in out
    assert len(read_csv(tmp_path / "a" / "curves.csv")) == 2 and len(read_csv(tmp_path / "b" / "curves.csv")) == 1


def test_data_errors_are_usage_errors(tmp_path, capsys):
    """A missing data set, an empty zip, a broken .hdf5 or .pkl: exit status 2 naming the data."""
    common = TINY + ["--out", tmp_path / "out"]
    err = usage_error(capsys, common + ["--data", "anime", "--data-root", tmp_path / "nowhere"])
    assert "anime faces not found" in err
    zipfile.ZipFile(tmp_path / "empty.zip", "w").close()
    (tmp_path / "broken.hdf5").write_bytes(b"not an hdf5 file")
    (tmp_path / "broken.pkl").write_bytes(b"not a pickle")
    for name in ["empty.zip", "broken.hdf5", "broken.pkl"]:
        assert name in usage_error(capsys, common + ["--data", tmp_path / name])
    assert not (tmp_path / "out").exists()


BAD_INPUT = [  # issue 15's vae.py cases: each (argv, what the message must say)
    (["--batch-size", "0"], "--batch-size: must be a whole number >= 1"),
    (["--batch-size", "100"], "--batch-size 100 is more than the 86 training images"),  # not clamped
    (["--max-images", "1"], "--batch-size 16 is more than the 0 training images"),
    (["--max-images", "0"], "--max-images: must be a whole number >= 1"),
    (["--latent", "0"], "--latent: must be a whole number >= 1"),
    (["--width", "-3"], "--width: must be a whole number >= 1"),
    (["--lr", "-1"], "--lr: must be a number > 0"),
    (["--lr", "nan"], "--lr: must be a finite number"),
    (["--holdout", "0"], "--holdout: must be a number > 0"),
    (["--holdout", "1"], "--holdout 1.0: give the fraction of the images to hold out, between 0 and 1"),
    (["--seed", str(2 ** 32)], "--seed: must be a whole number from 0 to 2**32 - 1"),
    (["--device", "xyz"], "--device: must be auto, cpu, cuda or cuda:N"),
    (["--device", "meta"], "--device: 'meta' is not supported here"),
    (["--epochs", "-1"], "--epochs: must be a whole number >= 0"),
    (["--epochs", "0"], "--epochs 0 trains nothing"),
    (["--log-every", "0"], "--log-every: must be a whole number >= 1"),
    (["--image-size", "0"], "--image-size: must be a whole number >= 1"),
    (["--image-size", "4"], "--image-size 4: give 3 to 7 times"),
    (["--augment", "flip=2"], "--augment: flip=2 is out of range"),
    (["--augment", "rotate=abc"], "--augment: rotate='abc' is not a number"),
    (["--augment", "blur"], "--augment: unknown 'blur'"),
    (["--zip", "x"], "--zip NAME needs --sample N"),
    (["--sample", "2", "--zip", "a/b"], "--zip wants a plain name"),
]


@pytest.mark.parametrize("argv, message", BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_is_a_usage_error_naming_the_flag(argv, message, tmp_path, capsys):
    assert message in usage_error(capsys, TINY + ["--out", tmp_path / "out"] + argv)
    assert not (tmp_path / "out").exists()  # refused before any file was written


def test_bad_output_paths_and_devices_are_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert "is a file" in usage_error(capsys, TINY + ["--out", tmp_path / "file"])
    assert "is under" in usage_error(capsys, TINY + ["--out", tmp_path / "file" / "run"])
    if not torch.cuda.is_available():
        assert "sees no CUDA GPU" in usage_error(capsys, TINY + ["--out", tmp_path / "out", "--device", "cuda"])


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as exit:
        vae.main(["--help"])
    assert exit.value.code == 0
    text = capsys.readouterr().out
    for flag in ["--data", "--data-root", "--image-size", "--max-images", "--holdout", "--augment", "--latent",
                 "--width", "--epochs", "--batch-size", "--lr", "--seed", "--device", "--compile", "--log-every",
                 "--out", "--resume", "--sample", "--zip", "--force", "--sync-batchnorm", "--prior-mixture"]:
        assert flag + " " in text


@pytest.mark.usefixtures("quick_figures")
def test_default_out_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    vae.main(TINY + ["--epochs", "1"])
    assert (tmp_path / "out" / "vae-shapes" / "elbo.csv").is_file()


@pytest.mark.usefixtures("quick_figures")
def test_compile_flag(tmp_path):
    pytest.importorskip("torch._inductor")
    result = run(tmp_path, "--epochs", 1, "--compile", "--max-images", "40", "--batch-size", "36")
    assert np.isfinite(result["neg_elbo"])
    assert not any(k.startswith("_orig_mod.") for k in weights(tmp_path / "run" / "checkpoint.pt"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_bf16_autocast(tmp_path):
    result = run(tmp_path, "--epochs", 1, "--device", "cuda")
    assert np.isfinite(result["neg_elbo"])


# -----------------------------------------------------------------------------
# several processes: torchrun with the gloo backend on the CPU


def torchrun(processes, *argv):
    """vae.py under `python -m torch.distributed.run` (torchrun) with N CPU processes; returns its output."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
               os.path.join(REPO, "vae.py"), "--device", "cpu"] + [str(a) for a in argv]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.fixture
def tiny_hdf5(tmp_path):
    """40 16x16 icons in an .hdf5 file: read directly by every process (nothing to decode or cache)."""
    path = tmp_path / "icons.hdf5"
    with h5py.File(path, "w") as f:
        f["data"] = data.make_shapes(40, 16, seed=5)
    return ["--data", path, "--width", "4", "--latent", "4", "--batch-size", "8", "--holdout", "0.2",
            "--log-every", "2", "--augment", "flip,translate"]


@pytest.mark.usefixtures("quick_figures")
def test_torchrun_two_processes_train_and_write_one_set_of_outputs(tiny_hdf5, tmp_path, capsys):
    # 32 training images, 4 steps of 8 per epoch, each process 4 images of every batch
    text = torchrun(2, *tiny_hdf5, "--epochs", 1, "--sample", 3, "--out", tmp_path / "two")
    assert text.count("32 training and 8 held-out images") == 1  # process 0 alone prints ...
    out = tmp_path / "two"
    assert sorted(os.listdir(out / "samples")) == ["1.png", "2.png", "3.png"]  # ... and writes
    for name in ["checkpoint.pt", "elbo.csv", "curves.csv", "reconstructions.png", "samples.png"]:
        assert (out / name).is_file(), name
    assert [int(r["step"]) for r in read_csv(out / "curves.csv")] == [1, 2, 3, 4]
    # run.save checks that both processes hold the same weights (else the run fails); the
    # checkpoint of 2 processes resumes in 1
    vae.main(["--resume", str(out / "checkpoint.pt"), "--epochs", "2", "--device", "cpu"])
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 8


@pytest.mark.usefixtures("quick_figures")
def test_torchrun_with_one_process_equals_plain_python(tiny_hdf5, tmp_path):
    torchrun(1, *tiny_hdf5, "--epochs", 2, "--out", tmp_path / "torchrun")
    vae.main([str(a) for a in tiny_hdf5] + ["--epochs", "2", "--device", "cpu", "--out", str(tmp_path / "python")])
    # torchrun's one process trains through DistributedDataParallel: the same numbers, bit for bit
    torchrun_run, python_run = tmp_path / "torchrun", tmp_path / "python"
    assert same_weights(weights(torchrun_run / "checkpoint.pt"), weights(python_run / "checkpoint.pt"))
    assert read_csv(torchrun_run / "curves.csv") == read_csv(python_run / "curves.csv")


# -----------------------------------------------------------------------------
# vae_sweep.py


@pytest.mark.usefixtures("quick_figures")
def test_sweep_compares_latent_and_batch_sizes(tmp_path, capsys):
    argv = TINY + ["--epochs", "1", "--out", str(tmp_path / "sweep"), "--latents", "4,8", "--batch-sizes", "8,16"]
    rows = vae_sweep.main(argv)
    # latent 4 and 8 at batch 16, then batch 8 and 16 at latent 8: (8, 16) once
    assert [(r["latent"], r["batch_size"]) for r in rows] == [(4, 16), (8, 16), (8, 8)]
    folder = tmp_path / "sweep"
    table = read_csv(folder / "sweep.csv")
    assert [(int(r["latent"]), int(r["batch_size"]), int(r["steps"])) for r in table] == [(4, 16, 5), (8, 16, 5),
                                                                                          (8, 8, 10)]
    assert Image.open(folder / "sweep.png").size[0] > 500
    assert (folder / "sweep.md").read_text().count("\n") == 5
    for r in rows:
        assert (folder / f"latent{r['latent']}-batch{r['batch_size']}" / "samples.png").is_file()
    # run again: the finished variants are measured, not retrained
    again = vae_sweep.main(argv)
    assert [r["neg_elbo"] for r in again] == [r["neg_elbo"] for r in rows]
    assert [r["steps"] for r in again] == [5, 5, 10]
    capsys.readouterr()
    # a changed setting that the checkpoints cannot follow: the advice is the sweep's, not --resume's
    with pytest.raises(SystemExit):
        vae_sweep.main(argv + ["--max-images", "80"])
    assert "pass --force to train the sweep over" in capsys.readouterr().err
    for bad, message in [(["--latents", "0,x"], "--latents"), (["--resume", "x"], "--resume"),
                         (["--lr", "-1"], "--lr")]:
        with pytest.raises(SystemExit) as exit_info:
            vae_sweep.main(argv + bad)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_sweep_refuses_what_a_later_variant_would_refuse_before_training_any(tmp_path, capsys):
    # 96 images, 10 held out (0.1 of them): 86 to train on. Batch 86 fits; 87 and 200 would stop the
    # sweep at their turn, after the variants before them had trained: refused before the first
    out = tmp_path / "sweep"
    argv = TINY + ["--epochs", "1", "--out", str(out), "--latents", "4", "--batch-sizes", "8,86,200,87"]
    with pytest.raises(SystemExit) as exit_info:
        vae_sweep.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "batch size 87, 200: more than the 86 training images (96 images less 10 held out)" in err
    assert not out.exists() or not any(out.iterdir())  # nothing trained
    with pytest.raises(SystemExit) as exit_info:  # a missing dataset: vae.py's own advice, at once
        vae_sweep.main(argv[:-1] + ["86", "--data", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2 and "nowhere" in capsys.readouterr().err
