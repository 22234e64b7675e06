"""Tests of modes.py: the classifier's held-out accuracy, real icons at the top of every scale,
noise and blurred blobs at the bottom, a collapsed generator's KL at log 36; oracles: the icons'
own labels, scipy.stats.entropy for the KL, scipy.ndimage.gaussian_filter for the blur.

The classifier is trained once for the whole file (about 35 s of CPU time) into a temporary cache.
"""

import json
import math
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage, stats

from ganlab import data
import modes


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    model, accuracy = modes.load_classifier(cache_dir=str(cache), progress=False)
    return model, accuracy, str(cache)


def icons(n, seed):
    return torch.from_numpy(data.make_shapes(n, 32, seed))


def test_held_out_accuracy_and_cache(trained, monkeypatch):
    model, accuracy, cache = trained
    # 2,000 icons of a seed it never saw: every head right, nearly all recognised; non-icons rejected
    assert accuracy["mode"] >= 0.99 and accuracy["recognised"] >= 0.98
    assert accuracy["non-icons rejected"] >= 0.97
    # the second call reads the cache: no training, the same weights
    monkeypatch.setattr(modes, "train_classifier", lambda **kwargs: pytest.fail("trained again"))
    again, accuracy_again = modes.load_classifier(cache_dir=cache, progress=False)
    assert accuracy_again == accuracy
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_real_icons_score_at_the_top(trained):
    model = trained[0]
    x, labels = data.make_shapes(1800, 32, seed=77, labels=True)  # a seed neither the GANs nor it trained on
    result = modes.score(torch.from_numpy(x), model)
    assert result["recognised"] >= 0.98 and result["covered"] == result["modes"] == 36
    # the histogram is the icons' own: each mode's count within 2 of the labels' count
    truth = np.bincount(modes.mode_of(labels["shape"], labels["colour"], labels["background"]), minlength=36)
    assert np.abs(np.array(result["histogram"]) - truth).max() <= 2
    # KL against scipy's, and near the sampling noise (36 - 1) / (2 x 1800) ~ 0.01 of uniform data
    p = np.array(result["histogram"], float)
    assert result["kl"] == pytest.approx(stats.entropy(p / p.sum(), np.full(36, 1 / 36)), abs=1e-9)
    assert result["kl"] < 0.05


def test_noise_and_blurred_blobs_score_at_the_bottom(trained):
    model = trained[0]
    rng = np.random.default_rng(5)
    noise = rng.integers(0, 256, (300, 3, 32, 32), dtype=np.uint8)
    smooth = ndimage.zoom(rng.uniform(0, 255, (300, 3, 4, 4)), (1, 1, 8, 8), order=3).clip(0, 255)
    # blobs: icons of an unseen seed blurred by scipy (sigma 2.5 and 4; the classifier's negatives use 3)
    real = data.make_shapes(400, 32, seed=78).astype(np.float64)
    blobs = np.concatenate([ndimage.gaussian_filter(real[:200], (0, 0, 2.5, 2.5), mode="mirror"),
                            ndimage.gaussian_filter(real[200:], (0, 0, 4, 4), mode="mirror")])
    for name, x in (("noise", noise), ("smooth colour fields", smooth), ("blurred blobs", blobs)):
        result = modes.score(torch.from_numpy(np.rint(x).astype(np.uint8)), model)
        assert result["recognised"] <= 0.05, name
        assert result["covered"] <= 12, name


def test_named_allows_blur_but_not_wrong_backgrounds(trained):
    # the measure for blurred samples (a VAE's): a blur by scipy that "recognised" refuses keeps shape and
    # background named; a blend of two backgrounds, a background the set lacks, and noise are not named
    model = trained[0]
    x, labels = data.make_shapes(400, 32, seed=82, labels=True)
    blurred = np.rint(ndimage.gaussian_filter(x.astype(np.float64), (0, 0, 1.5, 1.5), mode="mirror")).astype(np.uint8)
    result = modes.score(torch.from_numpy(blurred), model)
    assert result["named"] >= 0.9 and result["recognised"] <= result["named"] - 0.3
    # the border colour gives each image its own background back
    np.testing.assert_array_equal(modes.border_background(torch.from_numpy(blurred)).numpy(), labels["background"])
    other = labels["background"] != labels["background"][0]
    blend = (x[other].astype(np.float64) + x[0].astype(np.float64)) / 2  # two backgrounds mixed half and half
    olive = np.array([130, 150, 40], np.uint8)[None, :, None, None] * np.ones((50, 3, 32, 32), np.uint8)
    noise = np.random.default_rng(6).integers(0, 256, (200, 3, 32, 32), dtype=np.uint8)
    for name, images in (("blends", np.rint(blend).astype(np.uint8)), ("olive", olive), ("noise", noise)):
        assert modes.score(torch.from_numpy(images), model)["named"] <= 0.02, name
    assert modes.score(torch.from_numpy(x), model)["named"] >= 0.98


def test_a_collapsed_generator_scores_log_36(trained):
    model = trained[0]
    one = icons(1, seed=79).expand(500, -1, -1, -1)
    jitter = torch.randint(-6, 7, one.shape, generator=torch.Generator().manual_seed(0))
    result = modes.score((one.int() + jitter).clamp(0, 255).to(torch.uint8), model)
    assert result["recognised"] >= 0.98 and result["covered"] == 1
    assert result["kl"] == pytest.approx(math.log(36), abs=1e-9)  # p = one mode, q = 1/36 each
    assert modes.score(torch.from_numpy(np.zeros((4, 3, 32, 32), np.uint8)), model)["kl"] == math.inf


def test_gaussian_blur_equals_scipy():
    x = np.random.default_rng(0).uniform(0, 255, (2, 3, 20, 20))
    for sigma in (1.0, 3.0):
        expected = ndimage.gaussian_filter(x, (0, 0, sigma, sigma), mode="mirror", truncate=3.0)
        got = modes.gaussian_blur(torch.from_numpy(x).float(), sigma).double().numpy()
        np.testing.assert_allclose(got, expected, atol=1e-3)


def test_mode_names():
    assert modes.MODES == 36 and len({modes.mode_name(m) for m in range(36)}) == 36
    shape, colour, background = data.SHAPES.index("plus"), 1, 2
    assert modes.mode_name(modes.mode_of(shape, colour, background)) == "green plus on yellow"


def test_command_scores_a_folder_and_a_zip(trained, tmp_path, capsys):
    cache = trained[2]
    folder = tmp_path / "samples"
    folder.mkdir()
    for i, icon in enumerate(data.make_shapes(60, 32, seed=80), start=1):
        Image.fromarray(icon.transpose(1, 2, 0)).save(folder / f"{i}.png")
    result = modes.main([str(folder), "--cache-dir", cache, "--json", str(tmp_path / "modes.json")])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == modes.summary(result) and last.startswith("modes: recognised ") and "(60 images)" in last
    assert result["count"] == 60 and result["recognised"] >= 0.95
    saved = json.loads((tmp_path / "modes.json").read_text())
    assert saved["covered"] == result["covered"] and len(saved["mode_names"]) == 36
    assert saved["classifier_held_out_accuracy"]["mode"] >= 0.99
    with zipfile.ZipFile(tmp_path / "samples.zip", "w") as archive:
        for i in range(1, 61):
            archive.write(folder / f"{i}.png", f"img/{i}.png")
    from_zip = modes.main([str(tmp_path / "samples.zip"), "--cache-dir", cache, "--max-images", "30"])
    assert from_zip["count"] == 30
    # a samples folder is scored once: no decoded-image cache is left beside it (data.py's .ganlab-cache/)
    assert not list(tmp_path.rglob(".ganlab-cache")) and not list(tmp_path.rglob("*.npy"))


def test_grids_scored_one_by_one_in_step_order(trained, tmp_path, capsys):
    from ganlab.outputs import make_grid, png_bytes
    folder = tmp_path / "grids"
    folder.mkdir()
    real = icons(64, seed=81)
    (folder / "epoch-0010-step-780.png").write_bytes(png_bytes(make_grid(real, 8)))
    (folder / "epoch-0002-step-156.png").write_bytes(png_bytes(make_grid(torch.zeros_like(real), 8)))
    results = modes.main([str(folder), "--grids", "--cache-dir", trained[2]])
    assert [name for name, _ in results] == ["epoch-0002-step-156.png", "epoch-0010-step-780.png"]  # 2 before 10
    assert results[0][1]["recognised"] == 0 and results[1][1]["recognised"] >= 0.95
    torch.testing.assert_close(modes.grid_tiles(folder / "epoch-0010-step-780.png"), real)  # lossless PNG
    Image.new("RGB", (50, 40)).save(folder / "epoch-0011-step-858.png")
    with pytest.raises(SystemExit) as exit_info:
        modes.main([str(folder), "--grids", "--cache-dir", trained[2]])
    assert exit_info.value.code == 2 and "is not a grid of 32-pixel icons" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["missing-folder"], "no such file or folder"),
    (["shapes", "--max-images", "0"], "--max-images must be at least 1"),
])
def test_bad_input_is_a_clear_error(tmp_path, capsys, argv, message):
    argv = [str(tmp_path / a) if a == "missing-folder" else a for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        modes.main(argv + ["--cache-dir", str(tmp_path)])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_unusable_cache_is_replaced(tmp_path, monkeypatch, capsys):
    trained = []

    def quick_train(**kwargs):  # a stand-in: this test is about the file, not the training
        trained.append(1)
        return modes.Classifier().eval(), {"mode": 0.5}
    monkeypatch.setattr(modes, "train_classifier", quick_train)
    path = modes.cache_path(str(tmp_path))
    open(path, "wb").write(b"truncated")
    model, accuracy = modes.load_classifier(cache_dir=str(tmp_path), progress=False)
    assert trained == [1] and accuracy == {"mode": 0.5} and "unusable" in capsys.readouterr().err
    assert not [f for f in tmp_path.iterdir() if f.suffix == ".tmp"]  # written atomically: no leftovers
    modes.load_classifier(cache_dir=str(tmp_path), progress=False)
    assert trained == [1]  # the new file is read
