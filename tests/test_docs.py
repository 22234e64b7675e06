"""The commands the README's code blocks and the scripts' docstrings show are ones the scripts accept:
every `python X.py ...` and `torchrun ... X.py ...` line is parsed by X.py's own argument parser (no
work is done). A renamed or removed flag, or a value a check refuses, fails here, not for a reader."""

import contextlib
import importlib
import io
import os
import re
import shlex

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["dcgan", "lsgan", "wgan", "vae", "vae_sweep", "modes", "swd", "inception_score", "bench", "check_handin"]
TOOLS = ["vae_sweep", "modes", "swd", "bench", "check_handin"]  # in tools/; the others at the top level
PATHS = {name: f"tools/{name}.py" if name in TOOLS else f"{name}.py" for name in SCRIPTS}


def commands(text):
    """[(script, argv text)] of the commands on the indented (code) lines of text, continuation lines
    joined; lines with placeholders such as "(the same flags)" are prose, and are left out."""
    text = re.sub(r"\\\\?\n", " ", text)  # a docstring's "\\" + newline, or a README's "\" + newline
    found = []
    for line in text.splitlines():
        code = line.split("#")[0]
        if not line.startswith("    ") or "(" in code or "`" in code:
            continue
        for part in re.split(r"&&|;", code):
            match = re.search(r"(?:python|torchrun.*?)\s+((?:[\w.-]+/)*(\w+)\.py)\b(.*)", part)
            if match and match.group(2) in SCRIPTS:
                # a command must name the script where it is: tools/modes.py, not modes.py
                found.append((match.group(2) if match.group(1) == PATHS[match.group(2)] else match.group(1),
                              match.group(3)))
    return found


def documented():
    with open(os.path.join(REPO, "README.md")) as f:
        cases = [("README.md", *c) for c in commands(f.read())]
    for name in SCRIPTS:
        cases += [(f"{name}.py docstring", *c) for c in commands(importlib.import_module(name).__doc__)]
    return cases


def parse(script, argv):
    """Parse argv with the script's own parser (and its own checks that need no files): -> the error or None."""
    module = importlib.import_module(script)
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            if script == "inception_score":
                module.parse_args(argv)
            elif script == "vae_sweep":  # its own flags, then vae.py's for the rest
                _, rest = module.parser.parse_known_args(argv)
                importlib.import_module("vae").parser.parse_args(rest)
            else:
                module.parser.parse_args(argv)
    except SystemExit:
        return stderr.getvalue().strip().splitlines()[-1]
    return None


CASES = documented()


def test_the_docs_show_commands_of_every_script():
    assert len(CASES) >= 40
    assert {script for _, script, _ in CASES} == set(SCRIPTS)


@pytest.mark.parametrize("where, script, rest", CASES, ids=[f"{w}: {s}{r[:60]}" for w, s, r in CASES])
def test_documented_command_parses(where, script, rest, tmp_path, monkeypatch):
    assert script in SCRIPTS, f"{where}: python {script}{rest}: the script is {PATHS[script[:-3]]}"
    monkeypatch.chdir(tmp_path)  # output paths are checked for writability where they would go
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # --device cuda lines are for GPU machines
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert parse(script, shlex.split(rest)) is None, f"{where}: python {script}.py{rest}"


@pytest.mark.parametrize("name", SCRIPTS)
def test_docstring_lines_stay_lines(name):
    # a lone backslash at a line's end in a (non-raw) docstring joins the lines: the command is shown as
    # one long line with a gap; a continuation there must be written \\
    for line in importlib.import_module(name).__doc__.splitlines():
        assert not re.search(r"\S {8,}--", line), f"{name}.py docstring: {line.strip()[:80]}"


def test_a_wrong_flag_is_caught():  # the check itself can fail
    assert commands("    python dcgan.py --epochs 3 --no-such-flag\n") == [("dcgan", " --epochs 3 --no-such-flag")]
    assert commands("    python tools/modes.py shapes\n") == [("modes", " shapes")]
    assert commands("    python modes.py shapes\n") == [("modes.py", " shapes")]  # not where it is: fails below
    assert "unrecognized arguments: --no-such-flag" in parse("dcgan", ["--epochs", "3", "--no-such-flag"])
