"""Command-line checks shared by the scripts: a bad flag is refused before any work, naming the flag.

Argparse types (`type=flags.positive_int`) turn a value that makes no sense into argparse's own
usage error, "argument --batch-size: must be a whole number >= 1, got '0'" (exit status 2):

    positive_int, nonnegative_int          whole numbers >= 1 / >= 0
    positive_float, nonnegative_float      finite numbers > 0 / >= 0
    decay                                  a moving-average decay: 0 (off) <= d < 1
    seed                                   0 <= seed < 2**32 (seed * 100_003 + epoch seeds an epoch)
    device                                 auto, cpu, cuda, cuda:N, ... (checked by resolve_device)
    diffaug_policy                         none, or some of color,translation,cutout

HelpFormatter and help_from_docstring make the scripts' --help: the docstring's commands and
outputs, each flag's default (none where a flag has none). Then
checks of paths a run will write, made before the run rather than after it:

    resolve_device(text)                   'auto' -> cuda if there is a GPU else cpu; refuses a
                                           device this torch cannot use, saying what to pass
    check_output_folder(path)              a folder that can be created and written
    check_output_file(path)                a file that can be created (or replaced) and written

The two path checks and resolve_device raise ValueError with a message meant for the user;
the scripts hand it to parser.error.
"""

import argparse
import math
import os

import torch

from ganlab.fused_op import DIFFAUG_POLICIES


def help_from_docstring(doc):
    """A script's --help text from its docstring: the title, the example commands, and the paragraph
    on what a run writes (the one that starts "Everything goes to")."""
    paragraphs = doc.strip().split("\n\n")
    outputs = [p for p in paragraphs if p.startswith("Everything goes to")]
    return "\n\n".join(paragraphs[:2] + outputs)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help: the description as written (its example commands keep their lines), and each flag's
    default, except where there is none to show (the help says what happens when it is not given)."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def diffaug_policy(text):
    """--diffaug: 'none', or a comma-separated subset of color, translation, cutout -> that text."""
    chosen = {part.strip() for part in text.split(",")} - {""}
    unknown = chosen - set(DIFFAUG_POLICIES) - {"none"}
    if unknown or not chosen or ("none" in chosen and len(chosen) > 1):
        raise argparse.ArgumentTypeError(f"give none, or some of color,translation,cutout, got {text!r}")
    return text


def _number(text, kind):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a {'whole ' if kind is int else ''}number, got {text!r}")
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def positive_int(text):
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def nonnegative_int(text):
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}")
    return value


def positive_float(text):
    value = _number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def nonnegative_float(text):
    value = _number(text, float)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def decay(text):
    value = _number(text, float)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be 0 (off) or a decay in (0, 1) such as 0.999, got {text!r}")
    return value


def seed(text):
    value = _number(text, int)
    # below 2**32: the scripts seed each epoch's generator with seed * 100_003 + epoch, which must fit
    # torch.manual_seed's 64 bits (and numpy's seeds are 32-bit)
    if not 0 <= value < 2 ** 32:
        raise argparse.ArgumentTypeError(f"must be a whole number from 0 to 2**32 - 1, got {text!r}")
    return value


def device(text):
    """Argparse type: the device's syntax only (whether it exists is resolve_device's job)."""
    if text == "auto":
        return text
    try:
        parsed = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or cuda:N, got {text!r}")
    if parsed.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r} is not supported here: use auto, cpu, cuda or cuda:N")
    return text


def resolve_device(text):
    """'auto' -> the GPU if there is one, else the CPU; a device this torch cannot use -> ValueError."""
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chosen = torch.device(device(text))
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {text}: this torch sees no CUDA GPU "
                             f"(torch {torch.__version__}); use --device cpu")
        count = torch.cuda.device_count()
        if chosen.index is not None and chosen.index >= count:
            raise ValueError(f"--device {text}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")
    return chosen


def _nearest_existing(path):
    """The path itself or its nearest ancestor that exists."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_output_folder(path, flag="--out"):
    """Refuse a folder a run could not write into, before the run: a file in its place or above
    it, or no permission to create or write it."""
    existing = _nearest_existing(path)
    if not os.path.isdir(existing):
        where = "is a file" if existing == os.path.abspath(path) else f"is under {existing}, which is a file"
        raise ValueError(f"{flag} {path} {where}: give a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: {existing} is not writable: give a folder you can write to")
    return path


def check_output_file(path, flag):
    """Refuse a file path a result could not be written to: a folder, a path under a file, or a
    folder without write permission."""
    if not path or path.endswith(os.sep) or os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a folder: give a file name")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ValueError(f"{flag} {path}: the file exists and is not writable")
    folder = os.path.dirname(os.path.abspath(path))
    existing = _nearest_existing(folder)
    if not os.path.isdir(existing):
        raise ValueError(f"{flag} {path} is under {existing}, which is a file: give a path in a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: {existing} is not writable: give a path you can write to")
    return path
