"""vae.py: every output of a tiny run, the loss terms against torch.distributions, learning,
resume (also after Ctrl-C), sampling, the sweep, and the flags. CPU, tiny 16x16 'shapes'."""
import csv
import os
import shutil
import signal
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import data
import vae

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
        return _shapes[size].clone()

    monkeypatch.setattr(vae.data, "load_images", load_images)


@pytest.fixture
def quick_figures(monkeypatch):
    """For tests about something else: the per-epoch plots are built but not rendered (rendering
    is most of a tiny run's time); a 1x1 PNG stands in. test_tiny_run_writes_every_output and the
    sweep's comparison figure render for real."""
    import matplotlib.figure

    real = matplotlib.figure.Figure.savefig

    def savefig(self, fname, *args, **kwargs):
        if str(fname).endswith("sweep.png"):
            return real(self, fname, *args, **kwargs)
        Image.new("RGB", (1, 1)).save(fname, format="PNG")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)


def run(tmp_path, *extra, name="run"):
    return vae.main(TINY + ["--out", str(tmp_path / name)] + [str(e) for e in extra])


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
    x_hat, mu, logvar = model(x)
    assert x_hat.shape == x.shape and mu.shape == logvar.shape == (2, 5)


def test_shape_comments_hold():
    # the docstrings' example: 64x64, width 32 -> (B, 256, 4, 4) -> (B, 4096)
    model = vae.VAE(64, latent=128, width=32)
    assert model.encoder.conv(torch.zeros(2, 3, 64, 64)).shape == (2, 256, 4, 4)
    assert model.encoder.head.in_features == 4096 and model.encoder.head.out_features == 256
    assert vae.feature_sizes(96) == [96, 48, 24, 12, 6]


def test_impossible_image_size_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="image-size 36"):
        vae.feature_sizes(36)  # 36 -> 18 -> 9: odd and too big to end on
    with pytest.raises(SystemExit):
        run(tmp_path, "--image-size", "36")


def test_kl_term_equals_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(7, 11, generator=g, dtype=torch.float64) * 2, torch.randn(7, 11, generator=g, dtype=torch.float64)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    expected = torch.distributions.kl_divergence(q, p).sum(dim=1)  # summed over the latent, per image
    torch.testing.assert_close(vae.kl_divergence(mu, logvar), expected)
    assert (vae.kl_divergence(mu, logvar) > 0).all()
    assert torch.equal(vae.kl_divergence(torch.zeros(3, 4), torch.zeros(3, 4)), torch.zeros(3))


def test_reconstruction_term_is_the_gaussian_negative_log_likelihood():
    g = torch.Generator().manual_seed(1)
    x, x_hat = torch.rand(5, 3, 4, 4, generator=g, dtype=torch.float64), torch.rand(5, 3, 4, 4, generator=g, dtype=torch.float64)
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
    assert vae.bits_per_dim(3 * 16 * math_log(2), 3 * 16) == pytest.approx(np.log2(255))


def math_log(v):
    return float(np.log(v))


def test_loss_falls_when_overfitting_a_fixed_batch():
    torch.manual_seed(0)
    x = data.make_shapes(16, 16, seed=3)
    x = torch.from_numpy(x).float() / 127.5 - 1
    model = vae.VAE(16, latent=8, width=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(80):
        x_hat, mu, logvar = model(x)
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
    assert "86 training and 10 held-out images, 16x16; 5 steps of 16" in capsys.readouterr().err
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
    assert {"model", "optimizer", "step", "epoch", "args", "rng", "history", "curves"} <= set(state)
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
    assert run(tmp_path, "--epochs", 2, name="split") is None  # stopped cleanly, no exception
    monkeypatch.setattr(vae, "warp_batch", real)
    state = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["step"], state["image"]) == (0, 3, 48)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is given back
    vae.main(["--resume", str(tmp_path / "split" / "checkpoint.pt")])
    assert same_weights(weights(tmp_path / "straight" / "checkpoint.pt"), weights(tmp_path / "split" / "checkpoint.pt"))


@pytest.mark.usefixtures("quick_figures")
def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = []
    real = vae.warp_batch

    def warp_nan_at_step_7(*args, **kwargs):
        x = real(*args, **kwargs)
        if len(args[1]) == 16:  # training batches (the held-out ones hold 10 or 8 images)
            calls.append(1)
            if len(calls) == 7:
                x = x * float("nan")
        return x

    monkeypatch.setattr(vae, "warp_batch", warp_nan_at_step_7)
    with pytest.raises(SystemExit, match="NaN or infinite at step 7"):
        run(tmp_path, "--epochs", 3)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 5)  # epoch 1's, not a NaN one
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.usefixtures("quick_figures")
def test_resume_refuses_other_shapes_and_old_checkpoints_are_not_overwritten(tmp_path, capsys):
    run(tmp_path, "--epochs", 1)
    ckpt = str(tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(SystemExit):
        vae.main(["--resume", ckpt, "--latent", "16"])
    assert "trained with --latent 8, not 16" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        vae.main(["--resume", ckpt, "--image-size", "32"])
    assert "--image-size 16, not 32" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(tmp_path, "--epochs", 1)  # a new run over the old checkpoint
    assert "--force" in capsys.readouterr().err
    before = weights(ckpt)
    run(tmp_path, "--epochs", 1, "--seed", 5, "--force")  # --force starts over
    assert not same_weights(before, weights(ckpt))
    with pytest.raises(SystemExit):
        vae.main(["--resume", str(tmp_path / "nothing.pt")])
    assert "does not exist" in capsys.readouterr().err


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
    with pytest.raises(SystemExit):  # refused before anything else happens ...
        vae.main(["--resume", ckpt, "--sample", "3"])
    assert "--force" in capsys.readouterr().err
    vae.main(["--resume", ckpt, "--sample", "3", "--force", "--zip", "again"])  # ... unless --force
    assert sorted(os.listdir(folder)) == ["1.png", "2.png", "3.png"]
    assert (tmp_path / "run" / "again.zip").is_file()
    # the same seed gives the same samples
    assert np.array_equal(first, np.asarray(Image.open(folder / "1.png")))
    with pytest.raises(SystemExit):
        run(tmp_path, "--zip", "x", name="other")  # --zip needs --sample
    shutil.rmtree(folder)
    with pytest.raises(SystemExit):
        vae.main(["--resume", ckpt, "--sample", "3", "--zip", "again"])  # the zip exists: --force
    assert "again.zip exists" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# the flags


@pytest.mark.usefixtures("quick_figures")
def test_augment_flag(tmp_path, capsys):
    assert vae.parse_augment("none") == {"flip": 0.0}
    assert vae.parse_augment("flip,translate=0.1,scale,rotate=5") == {
        "flip": 0.5, "translate": 0.1, "scale": (1.0, 1.25), "rotate": 5.0}
    for bad in ["blur", "flip=much"]:
        with pytest.raises(SystemExit):
            run(tmp_path, "--augment", bad)
        assert "--augment" in capsys.readouterr().err
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
    err = capsys.readouterr().err
    assert "9 training and 3 held-out images, 16x16" in err and "6 training and 2 held-out images" in err
    assert len(read_csv(tmp_path / "a" / "curves.csv")) == 2 and len(read_csv(tmp_path / "b" / "curves.csv")) == 1
    with pytest.raises(FileNotFoundError):
        vae.main(common + ["--data", "anime", "--data-root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "c")])


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as exit:
        vae.main(["--help"])
    assert exit.value.code == 0
    text = capsys.readouterr().out
    for flag in ["--data", "--data-root", "--image-size", "--max-images", "--holdout", "--augment", "--latent",
                 "--width", "--epochs", "--batch-size", "--lr", "--seed", "--device", "--compile", "--log-every",
                 "--out", "--resume", "--sample", "--zip", "--force", "--sweep", "--sweep-latents", "--sweep-batch-sizes"]:
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


@pytest.mark.usefixtures("quick_figures")
def test_sweep_compares_latent_and_batch_sizes(tmp_path):
    args = ["--epochs", "1", "--sweep", "--sweep-latents", "4,8", "--sweep-batch-sizes", "8,16"]
    rows = run(tmp_path, *args)
    # latent 4 and 8 at batch 16, then batch 8 and 16 at latent 8: (8, 16) once
    assert [(r["latent"], r["batch_size"]) for r in rows] == [(4, 16), (8, 16), (8, 8)]
    folder = tmp_path / "run" / "sweep"
    table = read_csv(folder / "sweep.csv")
    assert [(int(r["latent"]), int(r["batch_size"]), int(r["steps"])) for r in table] == [(4, 16, 5), (8, 16, 5), (8, 8, 10)]
    assert Image.open(folder / "sweep.png").size[0] > 500
    assert (folder / "sweep.md").read_text().count("\n") == 5
    for r in rows:
        assert (folder / f"latent{r['latent']}-batch{r['batch_size']}" / "samples.png").is_file()
    # run again: the finished variants are measured, not retrained
    again = run(tmp_path, *args)
    assert [r["neg_elbo"] for r in again] == [r["neg_elbo"] for r in rows]
    with pytest.raises(SystemExit):
        run(tmp_path, "--sweep", "--sweep-latents", "0,x")
