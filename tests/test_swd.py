"""Tests of swd.py against oracles written elsewhere: scipy.ndimage.convolve (mode='mirror')
for the pyramid filters, as the paper's own code computes them, and
scipy.stats.wasserstein_distance for the 1-D distances."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage, stats

from ganlab import data
import swd


def binomial_2d():
    k = np.array([1.0, 4.0, 6.0, 4.0, 1.0])
    return np.outer(k, k) / 256


def test_pyramid_filters_equal_scipy():
    x = np.random.default_rng(0).uniform(0, 255, (2, 3, 16, 16))
    kernel = binomial_2d()[None, None]
    down = ndimage.convolve(x, kernel, mode="mirror")[:, :, ::2, ::2]
    spread = np.zeros((2, 3, 32, 32))
    spread[:, :, ::2, ::2] = x
    up = ndimage.convolve(spread, kernel * 4, mode="mirror")
    t = torch.from_numpy(x).float()
    np.testing.assert_allclose(swd.pyramid_down(t).numpy(), down, atol=1e-3)
    np.testing.assert_allclose(swd.pyramid_up(t).numpy(), up, atol=1e-3)


def test_laplacian_pyramid_collapses_to_the_image():
    x = torch.rand(3, 3, 64, 64) * 255
    levels = swd.laplacian_pyramid(x)
    assert [level.shape[-1] for level in levels] == [64, 32, 16]
    rebuilt = levels[-1]
    for level in reversed(levels[:-1]):
        rebuilt = level + swd.pyramid_up(rebuilt)
    torch.testing.assert_close(rebuilt, x, atol=1e-3, rtol=0)
    assert len(swd.laplacian_pyramid(torch.rand(1, 3, 16, 16))) == 1  # already the smallest level


def test_sliced_wasserstein_equals_scipy():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(500, 6, generator=g), torch.randn(500, 6, generator=g) * 1.5 + 0.3
    directions = torch.randn(5, 6, generator=g)
    directions /= directions.norm(dim=1, keepdim=True)
    expected = np.mean([stats.wasserstein_distance((a @ d).numpy(), (b @ d).numpy()) for d in directions])
    assert swd.sliced_wasserstein(a, b, directions) == pytest.approx(expected, rel=1e-4)


def test_descriptors_are_patches_normalized_per_channel():
    level = torch.arange(2 * 3 * 10 * 10, dtype=torch.float32).reshape(2, 3, 10, 10)
    d = swd.descriptors(level, 5, torch.Generator().manual_seed(0))
    assert d.shape == (10, 147)
    per_channel = d.reshape(10, 7, 7, 3)
    torch.testing.assert_close(per_channel.mean(dim=(0, 1, 2)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(per_channel.std(dim=(0, 1, 2)), torch.ones(3), atol=1e-4, rtol=0)
    # within a patch, one step right is +1 and one step down is +10 in the raw level: after
    # the per-channel scaling both differences are still constant across every patch
    right = per_channel[:, :, 1:] - per_channel[:, :, :-1]
    down = per_channel[:, 1:] - per_channel[:, :-1]
    assert torch.allclose(right, right[0, 0, 0], atol=1e-5) and torch.allclose(down, down[0, 0, 0], atol=1e-5)
    torch.testing.assert_close(down[0, 0, 0] / right[0, 0, 0], torch.full((3,), 10.0), rtol=1e-4, atol=0)


def test_swd_ranks_closer_distributions_lower():
    icons = data.make_shapes(1200, 32, seed=3)
    same_kind = torch.from_numpy(icons[:600]), torch.from_numpy(icons[600:])
    # blurry icons (a GAN's typical failure) and noise; a colour scaling would not do: each
    # set's descriptors are normalized per channel, so SWD looks at structure, not levels
    blurry = swd.pyramid_up(swd.pyramid_down(same_kind[1].float())).round().clamp(0, 255).to(torch.uint8)
    noise = torch.randint(0, 256, same_kind[1].shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    close = swd.swd(*same_kind, patches=16)
    blurred = swd.swd(same_kind[0], blurry, patches=16)
    far = swd.swd(same_kind[0], noise, patches=16)
    assert set(close) == {32, 16, "average"}
    assert close[32] * 3 < blurred[32]  # blur removes the finest level's detail
    assert close["average"] < blurred["average"] < far["average"]
    assert swd.swd(*same_kind, patches=16, seed=5) == swd.swd(*same_kind, patches=16, seed=5)  # seeded


def test_swd_refuses_mismatched_sets():
    with pytest.raises(ValueError, match="same shape"):
        swd.swd(torch.zeros(4, 3, 16, 16, dtype=torch.uint8), torch.zeros(4, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="at least 7x7"):
        swd.swd(torch.zeros(4, 3, 4, 4, dtype=torch.uint8), torch.zeros(4, 3, 4, 4, dtype=torch.uint8))


def test_command_line(tmp_path, capsys):
    folder = tmp_path / "samples"
    folder.mkdir()
    for i, icon in enumerate(data.make_shapes(40, 32, seed=9), start=1):
        Image.fromarray(icon.transpose(1, 2, 0)).save(folder / f"{i}.png")
    out = tmp_path / "swd.json"
    # no --image-size: the samples' own 32x32 (not data.py's 64 for folders)
    result = swd.main([str(folder), "shapes", "--max-images", "40", "--patches", "8", "--json", str(out)])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("SWD x 1e3: 32px ") and last.endswith("(40 vs 40 images)")
    saved = json.loads(out.read_text())
    assert saved["image_size"] == 32 and set(saved["swd_x1e3"]) == {"32", "16", "average"}
    assert saved["count"] == 40 and saved["swd_x1e3"]["average"] == pytest.approx(result["average"])
    # the same folder against itself: identical images give a smaller distance than the
    # folder against a disjoint part of itself (--reference-offset), which is still small
    same = swd.main([str(folder), str(folder), "--max-images", "20", "--patches", "8"])
    disjoint = swd.main([str(folder), str(folder), "--max-images", "20", "--patches", "8", "--reference-offset", "20"])
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith("(20 vs 20 images)")
    assert same["average"] < disjoint["average"] < result["average"] * 3


def test_command_line_bad_input(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        swd.main([str(tmp_path / "missing"), "shapes"])
    assert exit_info.value.code == 2
    assert "no such file or folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        swd.main(["shapes", "shapes", "--patches", "0"])
    assert "argument --patches: must be a whole number >= 1" in capsys.readouterr().err


def test_command_line_size_root_and_seed(tmp_path, capsys):
    root = tmp_path / "root"
    (root / "anime").mkdir(parents=True)
    for i, icon in enumerate(data.make_shapes(12, 32, seed=4), start=1):
        Image.fromarray(icon.transpose(1, 2, 0)).save(root / "anime" / f"{i}.png")
    argv = ["anime", "shapes", "--data-root", str(root), "--image-size", "16", "--max-images", "12", "--patches", "4"]
    first = swd.main(argv + ["--seed", "3"])
    assert set(first) == {16, "average"}  # resized to 16x16: one pyramid level
    assert swd.main(argv + ["--seed", "3"]) == first and swd.main(argv + ["--seed", "4"]) != first
    assert "(12 vs 12 images)" in capsys.readouterr().out


def refused(argv, capsys, status=2):
    """swd.main(argv) must exit with `status`, print no traceback, and do no SWD: -> stderr."""
    with pytest.raises(SystemExit) as exit_info:
        swd.main(argv)
    out, err = capsys.readouterr()
    assert exit_info.value.code == status, err
    assert "Traceback" not in err and "SWD x 1e3" not in out
    return err


@pytest.fixture
def no_computation(monkeypatch):
    """Refusals come before the computation: swd() must not run."""
    def computed(*args, **kw):
        raise AssertionError("swd() ran")
    monkeypatch.setattr(swd, "swd", computed)


def test_json_path_checked_before_the_computation(tmp_path, capsys, monkeypatch, no_computation):
    loaded = []
    monkeypatch.setattr(data, "load_images", lambda *args, **kw: loaded.append(args))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "swd.json").write_text("another run's figures")
    (tmp_path / "file").write_text("a file")
    for json_path, words in [(tmp_path / "run", "is a folder"), (str(tmp_path / "run") + "/", "is a folder"),
                             (tmp_path / "file" / "swd.json", "which is a file"), ("", "is a folder")]:
        err = refused(["shapes", "shapes", "--json", str(json_path)], capsys)
        assert "--json" in err and words in err, err
    err = refused([str(tmp_path / "run" / "swd.json"), "shapes", "--json", str(tmp_path / "run" / "swd.json")], capsys)
    assert "--json" in err and "would be overwritten" in err  # the input itself
    assert not loaded and (tmp_path / "run" / "swd.json").read_text() == "another run's figures"
    assert sorted(os.listdir(tmp_path / "run")) == ["swd.json"]


def test_score_printed_before_the_json_is_written(tmp_path, capsys, monkeypatch):
    def disk_full(*args, **kw):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(json, "dumps", disk_full)  # the path passed its check; the disk fills up later
    with pytest.raises(SystemExit) as exit_info:
        swd.main(["shapes", "shapes", "--max-images", "8", "--patches", "2", "--json", str(tmp_path / "swd.json")])
    out, err = capsys.readouterr()
    assert out.startswith("SWD x 1e3: 32px ")  # the result is on the screen even so
    assert "No space left" in str(exit_info.value.code) and "--json" in str(exit_info.value.code)
    assert os.listdir(tmp_path) == []  # no half-written file, no temporary left behind


def test_patches_that_cannot_fit_refused(capsys, no_computation):
    err = refused(["shapes", "shapes", "--max-images", "2", "--patches", "100000000"], capsys)
    assert "--patches 100000000" in err and "GiB of memory" in err and "--max-images" in err


def test_memory_needed_is_an_upper_bound_of_the_measured_peak():
    # the figures memory_needed's docstring gives, measured with resource.getrusage (ru_maxrss)
    assert swd.memory_needed(200, 32, 2048) - swd.memory_needed(200, 32, 512) >= 3195 * 200 * (2048 - 512)
    assert swd.memory_needed(2000, 64, 0) >= 23 * 2 * 2000 * 3 * 64 * 64


def test_tiny_images_blame_what_set_their_size(tmp_path, capsys, no_computation):
    for i in range(4):
        Image.new("RGB", (1, 1), (i, 2 * i, 3 * i)).save(tmp_path / f"{i}.png")
    err = refused([str(tmp_path), "shapes"], capsys)
    assert "the images are 1x1 (their own size, as no --image-size was given)" in err
    assert "pass --image-size 16" in err
    err = refused([str(tmp_path), "shapes", "--image-size", "4"], capsys)
    assert "--image-size must be at least 7" in err and "got 4" in err


def test_nonsense_flags_refused(tmp_path, capsys, no_computation):
    for argv, words in [(["--max-images", "1"], "--max-images must be at least 2"),
                        (["--max-images", "0"], "argument --max-images"),
                        (["--reference-offset", "-1"], "argument --reference-offset"),
                        (["--seed", "-1"], "argument --seed"), (["--seed", str(2 ** 64)], "argument --seed"),
                        (["--image-size", "0"], "argument --image-size"), (["--patches", "1.5"], "argument --patches"),
                        (["--data-root", ""], "--data-root is empty"),
                        (["--reference-offset", "20000"], "need at least 2 images after --reference-offset 20000")]:
        err = refused(["shapes", "shapes", *argv], capsys)
        assert words in err, (argv, err)
    assert "the images argument is empty" in refused(["", "shapes"], capsys)
    assert "the reference argument is empty" in refused(["shapes", ""], capsys)
