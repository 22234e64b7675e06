"""Tests of inception_score.py, on the CPU, with random weights in torchvision's format.

    python -m pytest tests/test_inception_score.py -q

The real weights cannot be downloaded here, and no test ever reaches the network: every test
runs with torch.hub's cache in a temporary folder and urlopen replaced (see `offline`). The
full 299 x 299 network runs at a few images/s on two cores, so only a handful of images go
through it; the input handling is checked on the decoded pixels, and the scoring maths on
known prediction matrices.
"""

import email.message
import hashlib
import io
import json
import math
import os
import re
import urllib.error
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import inception_score as IS

# the weight files here are random: the warning that they are not the official file is expected
pytestmark = pytest.mark.filterwarnings("ignore:.*is not the official weight file")

N_IMAGES = 4   # images scored by the real network in the end-to-end tests
SPLITS = 2
BATCH = 2        # one batch size throughout: each new shape costs the CPU a slow first call


# -----------------------------------------------------------------------------
# fixtures: no network, random weights, a folder of numbered PNGs


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """torch.hub's cache in a fresh temporary folder, and any download attempt fails."""
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network in tests")
    monkeypatch.setattr(torch.hub, "urlopen", no_network)
    return hub


def meta_model():
    """The network without memory or random init: for its keys and shapes, or to assign into."""
    with torch.device("meta"):
        return IS.Inception3()


def random_state_dict(seed=0):
    """Random weights with torchvision's keys and shapes, scaled so activations keep their size
    through the 94 conv layers (He init; batch norm near identity)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in meta_model().state_dict().items():
        if k.endswith("num_batches_tracked"):
            out[k] = torch.tensor(0)
        elif k.endswith("conv.weight"):
            out[k] = torch.randn(v.shape, generator=g) * math.sqrt(2 / v[0].numel())
        elif k.endswith(("running_var", "bn.weight")):
            out[k] = torch.rand(v.shape, generator=g) * 0.5 + 0.75
        elif k.endswith(("running_mean", "bn.bias")):
            out[k] = torch.randn(v.shape, generator=g) * 0.1
        elif k.endswith("fc.weight"):
            out[k] = torch.randn(v.shape, generator=g) / math.sqrt(v.shape[1])
        elif k.endswith("fc.bias"):
            out[k] = torch.randn(v.shape, generator=g) * 0.01
        else:
            raise KeyError(k)
    return out


def make_images(n=N_IMAGES, size=32, seed=0):
    """uint8 (n,size,size,3) blocky random images, distinct enough to be told apart."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(n, 3, 4, 4, generator=g)
    big = F.interpolate(small, size=(size, size), mode="nearest")
    return (big * 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


@pytest.fixture(scope="session")
def images():
    return make_images()


@pytest.fixture(scope="session")
def random_sd():
    return random_state_dict()


@pytest.fixture(scope="session")
def weights(tmp_path_factory, images, random_sd):
    """A weight file in torchvision's format whose classifier is calibrated on the test images:
    a random network maps every image to nearly the same features, so fc is applied to the
    features minus their mean and scaled until the predictions are peaked and differ between
    images (the random net would otherwise score ~1.0 on anything)."""
    sd = dict(random_sd)
    model = meta_model().eval()
    model.load_state_dict(sd, assign=True)
    model.fc = torch.nn.Identity()
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    with torch.inference_mode():
        h = torch.cat([model(IS.to_inception_input(b)) for b in x.split(BATCH)]).double()
    w = sd["fc.weight"].double()
    logits = (h - h.mean(0)) @ w.T
    scale = 8 / logits.std().item()          # logits of std 8: top class p ~ 0.9 and up
    sd["fc.weight"] = (w * scale).float()
    sd["fc.bias"] = (-(h.mean(0) @ w.T) * scale).float()
    path = tmp_path_factory.mktemp("weights") / "random_inception.pth"
    torch.save(sd, path)
    return path


@pytest.fixture(scope="session")
def model(weights):
    return IS.load_inception(str(weights), device="cpu")


def write_pngs(folder, images, names=None):
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / (names[i] if names else f"{i + 1}.png"))
    return folder


def decoded(path, workers=0, chunk=4):
    """All images of a source, decoded, as one uint8 (N,3,H,W) tensor in reading order."""
    chunks, _ = IS.open_images(str(path), chunk=chunk)
    return torch.cat(list(IS.batches_from(chunks, workers, pin_memory=False)))


def run_cli(capsys, *argv):
    result = IS.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return result, out.strip().splitlines()[-1], err


# -----------------------------------------------------------------------------
# the network's layout: torchvision's keys and shapes


def test_layout_matches_torchvision():
    model = meta_model()
    sd = model.state_dict()
    # torchvision documents 27,161,264 parameters for inception_v3 (aux classifier included)
    assert sum(p.numel() for p in model.parameters()) == 27_161_264
    expected_shapes = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_4a_3x3.bn.running_var": (192,),
        "Mixed_5b.branch1x1.conv.weight": (64, 192, 1, 1),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
        "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
        "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
        "AuxLogits.conv1.conv.weight": (768, 128, 5, 5),
        "AuxLogits.fc.weight": (1000, 768),
        "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
        "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
        "fc.weight": (1000, 2048),
        "fc.bias": (1000,),
    }
    for key, shape in expected_shapes.items():
        assert tuple(sd[key].shape) == shape, key
    # every conv is bias-free and followed by a batch norm with eps 0.001
    convs = [m for m in model.modules() if isinstance(m, IS.BasicConv2d)]
    assert len(convs) == 94 + 2          # 94 in the main path, 2 in AuxLogits
    assert all(c.conv.bias is None and c.bn.eps == 0.001 for c in convs)


def test_output_shape_and_minimum_size(model):
    with torch.inference_mode():
        assert model(torch.rand(1, 3, IS.MIN_SIZE, IS.MIN_SIZE)).shape == (1, 1000)
        with pytest.raises(RuntimeError):
            model(torch.rand(1, 3, IS.MIN_SIZE - 1, IS.MIN_SIZE - 1))


# -----------------------------------------------------------------------------
# the network against an independent, functional transcription of DESIGN.md's description:
# F.conv2d + F.batch_norm(eps=0.001) + relu, paddings worked out from the kernel shapes


def f_conv(x, sd, name, stride=1, same=True):
    """BasicConv2d: `same` pads k // 2 per axis (stride 1 only); otherwise no padding."""
    w = sd[name + ".conv.weight"]
    pad = (w.shape[2] // 2, w.shape[3] // 2) if same else 0
    y = F.conv2d(x, w, stride=stride, padding=pad)
    y = F.batch_norm(y, sd[name + ".bn.running_mean"], sd[name + ".bn.running_var"],
                     sd[name + ".bn.weight"], sd[name + ".bn.bias"], training=False, eps=0.001)
    return F.relu(y)


def f_chain(x, sd, prefix, names):
    for n in names:
        x = f_conv(x, sd, f"{prefix}.{n}")
    return x


def f_pool_branch(x, sd, prefix):
    return f_conv(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=True), sd, prefix + ".branch_pool")


def f_block_a(x, sd, p):
    return torch.cat([f_chain(x, sd, p, ["branch1x1"]),
                      f_chain(x, sd, p, ["branch5x5_1", "branch5x5_2"]),
                      f_chain(x, sd, p, ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"]),
                      f_pool_branch(x, sd, p)], 1)


def f_block_b(x, sd, p):
    d = f_chain(x, sd, p, ["branch3x3dbl_1", "branch3x3dbl_2"])
    return torch.cat([f_conv(x, sd, p + ".branch3x3", stride=2, same=False),
                      f_conv(d, sd, p + ".branch3x3dbl_3", stride=2, same=False),
                      F.max_pool2d(x, 3, stride=2)], 1)


def f_block_c(x, sd, p):
    return torch.cat([f_chain(x, sd, p, ["branch1x1"]),
                      f_chain(x, sd, p, [f"branch7x7_{i}" for i in (1, 2, 3)]),
                      f_chain(x, sd, p, [f"branch7x7dbl_{i}" for i in (1, 2, 3, 4, 5)]),
                      f_pool_branch(x, sd, p)], 1)


def f_block_d(x, sd, p):
    a = f_chain(x, sd, p, ["branch3x3_1"])
    b = f_chain(x, sd, p, ["branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3"])
    return torch.cat([f_conv(a, sd, p + ".branch3x3_2", stride=2, same=False),
                      f_conv(b, sd, p + ".branch7x7x3_4", stride=2, same=False),
                      F.max_pool2d(x, 3, stride=2)], 1)


def f_block_e(x, sd, p):
    a = f_chain(x, sd, p, ["branch3x3_1"])
    b = f_chain(x, sd, p, ["branch3x3dbl_1", "branch3x3dbl_2"])
    return torch.cat([f_chain(x, sd, p, ["branch1x1"]),
                      f_chain(a, sd, p, ["branch3x3_2a"]), f_chain(a, sd, p, ["branch3x3_2b"]),
                      f_chain(b, sd, p, ["branch3x3dbl_3a"]), f_chain(b, sd, p, ["branch3x3dbl_3b"]),
                      f_pool_branch(x, sd, p)], 1)


def f_inception(x, sd):
    x = f_conv(x, sd, "Conv2d_1a_3x3", stride=2, same=False)
    x = f_conv(x, sd, "Conv2d_2a_3x3", same=False)
    x = f_conv(x, sd, "Conv2d_2b_3x3")
    x = F.max_pool2d(x, 3, stride=2)
    x = f_conv(x, sd, "Conv2d_3b_1x1")
    x = f_conv(x, sd, "Conv2d_4a_3x3", same=False)
    x = F.max_pool2d(x, 3, stride=2)
    for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
        x = f_block_a(x, sd, name)
    x = f_block_b(x, sd, "Mixed_6a")
    for name in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
        x = f_block_c(x, sd, name)
    x = f_block_d(x, sd, "Mixed_7a")
    for name in ("Mixed_7b", "Mixed_7c"):
        x = f_block_e(x, sd, name)
    return F.linear(x.mean(dim=(2, 3)), sd["fc.weight"], sd["fc.bias"])


def test_basic_conv_and_inception_a_match_functional(model):
    sd = model.state_dict()
    x = torch.rand(2, 3, 40, 40) * 2 - 1
    with torch.inference_mode():
        torch.testing.assert_close(model.Conv2d_1a_3x3(x), f_conv(x, sd, "Conv2d_1a_3x3", stride=2, same=False))
        y = torch.rand(2, 192, 35, 35)
        torch.testing.assert_close(model.Mixed_5b(y), f_block_a(y, sd, "Mixed_5b"), rtol=1e-4, atol=1e-4)
        z = torch.rand(2, 1280, 8, 8)
        torch.testing.assert_close(model.Mixed_7b(z), f_block_e(z, sd, "Mixed_7b"), rtol=1e-4, atol=1e-4)


def test_full_network_matches_functional(model):
    sd = model.state_dict()
    x = torch.rand(1, 3, 299, 299) * 2 - 1
    with torch.inference_mode():
        mine, theirs = model(x), f_inception(x, sd)
        assert mine.shape == (1, 1000)
        torch.testing.assert_close(mine, theirs, rtol=1e-3, atol=1e-3)
        x = torch.rand(2, 3, IS.MIN_SIZE, IS.MIN_SIZE) * 2 - 1
        torch.testing.assert_close(model(x), f_inception(x, sd), rtol=1e-3, atol=1e-3)


# -----------------------------------------------------------------------------
# weights: strict load, refusals, the hub cache, the hash, offline


def test_strict_load_with_and_without_batch_counters(tmp_path, model):
    sd = model.state_dict()
    # the 2017 file predates BatchNorm's num_batches_tracked: both forms must load
    old = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    torch.save(old, tmp_path / "old.pth")
    loaded = IS.load_inception(str(tmp_path / "old.pth"), device="cpu")
    for k, v in loaded.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(v, sd[k]), k


@pytest.mark.parametrize("damage, message", [
    (lambda sd: sd.pop("Mixed_6c.branch7x7_2.bn.running_var"), "missing keys: Mixed_6c.branch7x7_2.bn.running_var"),
    (lambda sd: sd.pop("AuxLogits.fc.weight"), "missing keys: AuxLogits.fc.weight"),
    (lambda sd: sd.__setitem__("Mixed_5b.extra.weight", torch.zeros(3)), "unexpected keys: Mixed_5b.extra.weight"),
    (lambda sd: sd.__setitem__("fc.weight", torch.zeros(10, 2048)), "wrong shapes: fc.weight (10, 2048) (expected (1000, 2048))"),
    (lambda sd: sd.__setitem__("Conv2d_1a_3x3.conv.weight", torch.zeros(32, 3, 3)), "wrong shapes: Conv2d_1a_3x3.conv.weight (32, 3, 3)"),
])
def test_wrong_keys_or_shapes_refused(random_sd, damage, message):
    sd = dict(random_sd)
    damage(sd)
    with pytest.raises(ValueError, match=re.escape(message)):
        IS.check_state_dict(meta_model(), sd, "bad.pth")


def test_wrong_file_refused_by_load(tmp_path, random_sd):
    sd = dict(random_sd)
    sd["AuxLogits.extra"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"bad.pth is not torchvision's Inception v3 state dict: 1 unexpected keys: AuxLogits.extra"):
        IS.load_inception(str(tmp_path / "bad.pth"), device="cpu")


def test_not_a_state_dict_refused(tmp_path):
    torch.save([torch.zeros(3)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        IS.load_inception(str(tmp_path / "list.pth"))
    torch.save({"model": {"fc.weight": torch.zeros(1)}, "epoch": 3}, tmp_path / "checkpoint.pth")
    with pytest.raises(ValueError, match="not all its values are tensors"):
        IS.load_inception(str(tmp_path / "checkpoint.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="is not a PyTorch weight file"):
        IS.load_inception(str(tmp_path / "junk.pth"))
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        IS.load_inception(str(tmp_path / "absent.pth"))


def serve(monkeypatch, payload):
    """urlopen replaced by one that serves `payload` as the weight file."""
    def fake_urlopen(request, *args, **kwargs):
        assert request.full_url == IS.WEIGHTS_URL
        response = io.BytesIO(payload)
        headers = email.message.Message()
        headers["Content-Length"] = str(len(payload))
        response.info = lambda: headers
        return response
    monkeypatch.setattr(torch.hub, "urlopen", fake_urlopen)


def test_offline_without_cached_file_says_where_to_get_it(offline):
    with pytest.raises(FileNotFoundError) as e:
        IS.load_inception(device="cpu")
    text = str(e.value)
    assert IS.WEIGHTS_URL in text and IS.WEIGHTS_SHA256 in text and "--weights" in text
    assert str(offline / "checkpoints" / "inception_v3_google-0cc3c7bd.pth") in text
    with pytest.raises(FileNotFoundError, match="--weights"):
        IS.find_weights(download=False)


def test_download_with_bad_hash_refused_and_not_kept(offline, monkeypatch):
    serve(monkeypatch, b"a page of html instead of weights")
    with pytest.raises(ValueError, match="SHA-256"):
        IS.load_inception(device="cpu")
    # torch writes to a temporary file and moves it into place only after the check passes
    assert os.listdir(offline / "checkpoints") == []


def test_download_once_into_hub_cache_then_cached(offline, monkeypatch, weights):
    payload = weights.read_bytes()
    monkeypatch.setattr(IS, "WEIGHTS_SHA256", hashlib.sha256(payload).hexdigest())
    serve(monkeypatch, payload)
    model = IS.load_inception(device="cpu")
    cached = offline / "checkpoints" / "inception_v3_google-0cc3c7bd.pth"
    assert cached.read_bytes() == payload
    # second time: no network needed, the cached file is used (and its hash checked)
    monkeypatch.setattr(torch.hub, "urlopen", lambda *a, **k: pytest.fail("downloaded twice"))
    again = IS.load_inception(device="cpu")
    assert torch.equal(model.fc.weight, again.fc.weight)
    # a damaged cached file is refused, not silently used
    cached.write_bytes(payload[:-1] + b"x")
    with pytest.raises(ValueError, match="fails its SHA-256 check"):
        IS.load_inception(device="cpu")


# -----------------------------------------------------------------------------
# the score from known prediction matrices


def reference_score(probs, splits):
    """The reference's loop, literally, with scipy.stats.entropy (when scipy is at hand)."""
    entropy = pytest.importorskip("scipy.stats").entropy
    n = len(probs)
    split_scores = []
    for k in range(splits):
        part = probs[k * (n // splits):(k + 1) * (n // splits), :]
        py = np.mean(part, axis=0)
        scores = [entropy(part[i, :], py) for i in range(part.shape[0])]
        split_scores.append(np.exp(np.mean(scores)))
    return np.mean(split_scores), np.std(split_scores)


def slow_score(probs, splits):
    """The definition in plain Python floats: an oracle that shares no code with numpy's.
    p(y) is the mean of the rows as given; then, as scipy.stats.entropy(pyx, py) does in the
    reference, each row and p(y) are scaled to sum to 1."""
    size = len(probs) // splits
    scores = []
    for k in range(splits):
        part = probs[k * size:(k + 1) * size].tolist()
        py = [sum(col) / size for col in zip(*part)]
        py = [q / sum(py) for q in py]
        part = [[p / sum(row) for p in row] for row in part]
        kl = [sum(p * math.log(p / q) for p, q in zip(row, py) if p > 0) for row in part]
        scores.append(math.exp(sum(kl) / size))
    mean = sum(scores) / splits
    return mean, math.sqrt(sum((s - mean) ** 2 for s in scores) / splits)


def test_uniform_predictions_score_one():
    mean, std, scores = IS.score_from_probs(np.full((100, 1000), 1e-3), splits=10)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0, abs=1e-12)


@pytest.mark.parametrize("k", [1, 2, 7, 1000])
def test_k_equally_used_one_hot_classes_score_k(k):
    probs = np.eye(1000)[np.arange(10 * k) % k]   # each split of k rows holds each class once
    mean, std, _ = IS.score_from_probs(probs, splits=10)
    assert mean == pytest.approx(k, rel=1e-12) and std == pytest.approx(0, abs=1e-9)


def test_splits_are_consecutive_and_drop_the_tail():
    one_hot = np.eye(1000)
    # split 0: all class 0 (IS 1); split 1: classes 0 and 1 alternating (IS 2); tail: 1 row
    probs = np.concatenate([one_hot[[0] * 4], one_hot[[0, 1] * 2], one_hot[[5]]])
    mean, std, scores = IS.score_from_probs(probs, splits=2)
    assert scores == pytest.approx([1.0, 2.0]) and mean == pytest.approx(1.5) and std == pytest.approx(0.5)
    with pytest.raises(ValueError, match="at least as many images as splits"):
        IS.score_from_probs(probs[:3], splits=4)


def test_score_matches_reference_math_on_random_predictions():
    rng = np.random.default_rng(0)
    # peaked random rows, in float32 as the network's softmax gives them; a few exact zeros
    logits = rng.normal(size=(53, 1000)) * 4
    probs = torch.softmax(torch.from_numpy(logits).float(), 1).double().numpy()
    probs[0, :10] = 0
    mean, std, _ = IS.score_from_probs(probs, splits=5)
    assert (mean, std) == pytest.approx(slow_score(probs, 5), rel=1e-10)
    assert (mean, std) == pytest.approx(reference_score(probs, 5), rel=1e-12)


# -----------------------------------------------------------------------------
# reading images: order, conversion, formats


def test_numeric_order(tmp_path):
    images = make_images(n=12, seed=2)
    names = [f"{i}.png" for i in range(1, 13)]
    folder = write_pngs(tmp_path / "imgs", images, names)
    chunks, _ = IS.open_images(str(folder))
    assert chunks.names == names            # 1, 2, ..., 9, 10, 11, 12 and not 1, 10, 11, 12, 2, ...
    # image k of the folder is k.png, whatever the chunking and the number of workers
    for workers, chunk in ((0, 5), (2, 4)):
        got = decoded(folder, workers=workers, chunk=chunk)
        assert torch.equal(got, torch.from_numpy(images).permute(0, 3, 1, 2))
    assert sorted(["b10.png", "b9.png", "a2.png", "a10.png", "x.png"], key=IS.natural_key) == \
        ["a2.png", "a10.png", "b9.png", "b10.png", "x.png"]


def test_grayscale_rgba_palette_become_rgb(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    rgba = rng.integers(0, 256, (8, 8, 4), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "1.png")
    Image.fromarray(gray).save(tmp_path / "2.png")
    Image.fromarray(rgba).save(tmp_path / "3.png")
    Image.fromarray(rgb).quantize(16).save(tmp_path / "4.png")
    Image.fromarray(rgb).save(tmp_path / "5.jpg", quality=95)
    got = decoded(tmp_path, chunk=10)
    assert got.shape == (5, 3, 8, 8) and got.dtype == torch.uint8
    expect = [rgb, np.stack([gray] * 3, -1), rgba[..., :3],           # alpha is dropped
              np.array(Image.fromarray(rgb).quantize(16).convert("RGB")),
              np.array(Image.open(tmp_path / "5.jpg").convert("RGB"))]
    for k, e in enumerate(expect):
        assert torch.equal(got[k], torch.from_numpy(e).permute(2, 0, 1)), k


def test_folder_zip_npy_npz_decode_identically(tmp_path, images):
    folder = write_pngs(tmp_path / "0860912_img", images)
    with zipfile.ZipFile(tmp_path / "handin.zip", "w") as zf:
        for i in range(N_IMAGES, 0, -1):            # stored out of order on purpose
            zf.write(folder / f"{i}.png", f"0860912_img/{i}.png")
        zf.writestr("0860912_img/readme.txt", "hi")
        zf.writestr("__MACOSX/0860912_img/._1.png", "resource fork")
    np.save(tmp_path / "nhwc.npy", images)
    np.save(tmp_path / "nchw.npy", images.transpose(0, 3, 1, 2))
    np.savez(tmp_path / "arr.npz", images=images)
    want = torch.from_numpy(images).permute(0, 3, 1, 2)
    for source in ("0860912_img", "handin.zip", "nhwc.npy", "nchw.npy", "arr.npz"):
        assert torch.equal(decoded(tmp_path / source, workers=0), want), source
    assert torch.equal(decoded(tmp_path / "handin.zip", workers=2), want)
    _, skipped = IS.open_images(str(tmp_path / "handin.zip"))
    assert skipped == ["0860912_img/readme.txt", "__MACOSX/0860912_img/._1.png"]


# -----------------------------------------------------------------------------
# end to end, through the real network with the random weights


def test_cli_folder_zip_npy_give_identical_scores(tmp_path, capsys, images, weights, model):
    folder = write_pngs(tmp_path / "0860912_img", images)
    (folder / "notes.txt").write_text("not an image")
    (folder / ".DS_Store").write_bytes(b"\0")
    with zipfile.ZipFile(tmp_path / "0860912_img.zip", "w") as zf:
        for i in range(1, N_IMAGES + 1):
            zf.write(folder / f"{i}.png", f"0860912_img/{i}.png")
    np.save(tmp_path / "fakes.npy", images.transpose(0, 3, 1, 2))
    common = ["--weights", weights, "--splits", SPLITS, "--batch-size", BATCH, "--quiet"]
    r_folder, last, err = run_cli(capsys, folder, *common, "--workers", 2, "--json", tmp_path / "out/is.json")
    assert "skipped 2 entries that are not images: .DS_Store, notes.txt" in err
    assert re.fullmatch(rf"Inception Score: \d+\.\d{{3}} ± \d+\.\d{{3}}  \({N_IMAGES} images, {SPLITS} splits\)", last)
    assert r_folder["inception_score"] > 1.3      # the calibrated random classifier is peaked
    assert json.loads((tmp_path / "out/is.json").read_text())["split_scores"] == r_folder["split_scores"]
    r_zip, _, _ = run_cli(capsys, tmp_path / "0860912_img.zip", *common, "--workers", 0)
    r_npy, _, _ = run_cli(capsys, tmp_path / "fakes.npy", *common)
    assert r_folder["split_scores"] == r_zip["split_scores"] == r_npy["split_scores"]

    # the in-memory API gives the same numbers on the same pixels
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    mean, std = IS.inception_score(x, model=model, splits=SPLITS, batch_size=BATCH)
    assert (mean, std) == pytest.approx((r_folder["inception_score"], r_folder["std"]), rel=1e-9)


def test_float_input_is_the_uint8_input():
    x = torch.from_numpy(make_images(n=2, seed=9)).permute(0, 3, 1, 2)
    a, b = IS.to_inception_input(x), IS.to_inception_input(x.float() / 127.5 - 1)
    assert a.shape == (2, 3, 299, 299) and a.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert a.min() >= -1 - 1e-6 and a.max() <= 1 + 1e-6  # bilinear weights sum to 1 up to rounding
    # resize: bilinear, align_corners=False, from the image's own size
    torch.testing.assert_close(a, F.interpolate(x.float() / 127.5 - 1, size=(299, 299), mode="bilinear"))


def test_cli_limit_and_mixed_sizes(tmp_path, capsys, weights, model):
    write_pngs(tmp_path / "imgs", make_images(n=2, seed=3))
    Image.fromarray(make_images(n=1, size=48, seed=4)[0]).save(tmp_path / "imgs" / "3.png")
    write_pngs(tmp_path / "imgs", make_images(n=2, seed=5), ["4.png", "5.png"])
    # images of different sizes are each resized from their own size: one tensor per run of a size
    chunks, _ = IS.open_images(str(tmp_path / "imgs"), chunk=BATCH * 2)
    shapes = [tuple(b.shape) for b in IS.batches_from(chunks, 0, pin_memory=False)]
    assert shapes == [(2, 3, 32, 32), (1, 3, 48, 48), (1, 3, 32, 32), (1, 3, 32, 32)]
    result, last, _ = run_cli(capsys, tmp_path / "imgs", "--weights", weights, "--quiet",
                              "--limit", 4, "--batch-size", BATCH * 2, "--splits", 3)
    assert result["images"] == 4 and last.endswith("(4 images, 3 splits; the last 1 unused, as in the reference)")


# -----------------------------------------------------------------------------
# bad input: every case a clear message


def test_bad_inputs(tmp_path, capsys, weights, images):
    common = ["--weights", weights, "--quiet", "--splits", 2]

    def error(*argv):
        with pytest.raises(SystemExit) as e:
            IS.main([str(a) for a in argv] + [str(a) for a in common])
        return str(e.value.code)

    assert "no such file or folder" in error(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    assert "no images (.png, .jpg, .jpeg) in" in error(tmp_path / "empty")
    (tmp_path / "outer" / "0860912_img").mkdir(parents=True)
    assert "it holds 1 folder(s): 0860912_img" in error(tmp_path / "outer")
    folder = write_pngs(tmp_path / "corrupt", images[:4])
    (folder / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    for workers in (0, 2):
        message = error(folder, "--workers", workers)
        assert "cannot decode image" in message and str(folder / "3.png") in message
    assert "fewer than the 2 splits" in error(write_pngs(tmp_path / "one", images[:1]))
    np.save(tmp_path / "float.npy", images.astype(np.float32))
    assert "expected uint8 images (N,H,W,3) or (N,3,H,W)" in error(tmp_path / "float.npy")
    with zipfile.ZipFile(tmp_path / "two.zip", "w") as zf:
        zf.writestr("a/1.png", (folder / "1.png").read_bytes())
        zf.writestr("b/1.png", (folder / "1.png").read_bytes())
    assert "holds images in 2 folders" in error(tmp_path / "two.zip")
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 cut short")
    assert "broken.zip is not a readable zip" in error(tmp_path / "broken.zip")
    (tmp_path / "x.txt").write_text("hi")
    assert "expected a folder of images, a .zip, or a .npy/.npz array" in error(tmp_path / "x.txt")
    with pytest.raises(ValueError, match=r"must be in \[-1, 1\]"):
        IS.inception_score(torch.full((2, 3, 8, 8), 2.0), model=torch.nn.Identity(), splits=1, device="cpu")


# -----------------------------------------------------------------------------
# the opt-in fast modes stay close to fp32


def test_channels_last_close_to_fp32(model):
    x = torch.from_numpy(make_images(n=BATCH, size=32, seed=7)).permute(0, 3, 1, 2)
    ref = IS.predict(model, [x], BATCH, "cpu")
    fast = IS.predict(model, [x], BATCH, "cpu", channels_last=True)
    assert (fast - ref).abs().max() < 1e-4


def random_features(random_sd):
    """The network with plain random weights (not the calibrated classifier, which magnifies
    rounding on purpose) and its 2048 pooled features as output."""
    model = meta_model().eval()
    model.load_state_dict(random_sd, assign=True)
    model.fc = torch.nn.Identity()
    return model


def test_bf16_close_to_fp32(random_sd):
    model = random_features(random_sd)
    x = torch.rand(2, 3, IS.MIN_SIZE, IS.MIN_SIZE) * 2 - 1
    with torch.inference_mode():
        fp32 = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(x).float()
    # bf16 keeps 8 bits of mantissa; through 48 layers the features stay within a few percent
    assert ((bf16 - fp32).norm() / fp32.norm()) < 0.03


def test_compiled_graph_matches_eager(random_sd):
    # backend aot_eager: dynamo's capture of the whole network, without the C++ code generation
    # that would take minutes on this CPU (on a GPU, --compile uses the default inductor)
    model = random_features(random_sd)
    x = torch.rand(2, 3, IS.MIN_SIZE, IS.MIN_SIZE) * 2 - 1
    with torch.inference_mode():
        torch.testing.assert_close(torch.compile(model, backend="aot_eager", fullgraph=True)(x), model(x))


def test_predict_bf16_and_padding_paths():
    # a stand-in network that is cheap at 299 x 299: mean colour -> 1000 logits
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 1000)).eval()
    x = torch.from_numpy(make_images(n=5, seed=8)).permute(0, 3, 1, 2)
    ref = IS.predict(net, x.split(2), 5, "cpu")
    assert ref.dtype == torch.float64 and ref.shape == (5, 1000)
    torch.testing.assert_close(ref.sum(1), torch.ones(5, dtype=torch.float64))
    # short batches padded to one shape (for torch.compile) give the same predictions
    torch.testing.assert_close(IS.predict(net, x.split(2), 5, "cpu", pad_to=4), ref)
    assert (IS.predict(net, x.split(2), 5, "cpu", bf16=True) - ref).abs().max() < 1e-2
