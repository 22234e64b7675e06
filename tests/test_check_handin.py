"""tools/check_handin.py: a correct hand-in passes, whoever zipped it; each kind of wrong one is caught.

The correct zip comes from outputs.write_samples (what `--sample N --zip NAME` writes) and, separately,
from plain zipfile calls as other code would make it; each wrong one changes one thing of a correct one.
"""

import io
import os
import sys
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
import check_handin  # noqa: E402
from ganlab.outputs import write_samples  # noqa: E402

COUNT, NAME = 12, "0860912_img"


def png(size=(32, 32), mode="RGB", fmt="PNG", seed=0):
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    buffer = io.BytesIO()
    im.save(buffer, format=fmt)
    return buffer.getvalue()


def make_zip(path, entries, folder_entry=True):
    """entries: {name inside the zip: bytes}, written by plain zipfile calls (deflated, like most tools)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        if folder_entry:
            z.writestr(zipfile.ZipInfo(NAME + "/"), b"")
        for name, data in entries.items():
            z.writestr(name, data)
    return str(path)


def correct():
    return {f"{NAME}/{k}.png": png(seed=k) for k in range(1, COUNT + 1)}


def check(capsys, path, *flags):
    code = check_handin.main([str(path), "--count", str(COUNT), *flags])
    return code, capsys.readouterr().out


def test_the_scripts_hand_in_passes(tmp_path, capsys):
    images = torch.randint(0, 256, (COUNT, 3, 32, 32), dtype=torch.uint8)
    _, zip_path = write_samples([images], COUNT, tmp_path / "samples", zip_name=NAME)
    code, out = check(capsys, zip_path)
    assert code == 0 and out.startswith(f"ok: {zip_path} unpacks to {NAME}/ holding 1.png ... {COUNT}.png")


def test_a_zip_made_by_other_code_passes_with_or_without_a_folder_entry(tmp_path, capsys):
    for folder_entry in (True, False):
        path = make_zip(tmp_path / f"{NAME}.zip", correct(), folder_entry)
        assert check(capsys, path)[0] == 0


def test_the_default_is_the_assignments_50000_at_32px(tmp_path):
    path = make_zip(tmp_path / f"{NAME}.zip", correct())
    problems, name = check_handin.check_handin(path)
    assert name == NAME and len(problems[f"missing (of {NAME}/1.png ... 50000.png)"]) == 50000 - COUNT


def wrong(change):
    entries = correct()
    change(entries)
    return entries


@pytest.mark.parametrize("change,reported", [
    (lambda e: e.pop(f"{NAME}/7.png"), f"1 missing (of {NAME}/1.png ... {COUNT}.png): {NAME}/7.png"),
    (lambda e: e.update({f"{NAME}/{COUNT + 1}.png": png()}), f"1 a number above {COUNT}: {NAME}/{COUNT + 1}.png"),
    (lambda e: e.update({f"{NAME}/01.png": e.pop(f"{NAME}/1.png")}), "a name other than 1.png ... N.png: "
                                                                       f"{NAME}/01.png"),
    (lambda e: e.update({f"{NAME}/2.PNG": e.pop(f"{NAME}/2.png")}), f"a name other than 1.png ... N.png: {NAME}/2.PNG"),
    (lambda e: e.update({f"{NAME}/3.png": png(mode="L")}), f"not RGB (PNG mode L, the first of them): {NAME}/3.png"),
    (lambda e: e.update({f"{NAME}/3.png": png(mode="RGBA")}), "not RGB (PNG mode RGBA, the first of them)"),
    (lambda e: e.update({f"{NAME}/3.png": png(mode="P")}), "not RGB (PNG mode P"),
    (lambda e: e.update({f"{NAME}/4.png": png(size=(33, 32))}), f"not 32x32 pixels (33x32, the first of them): "
                                                                 f"{NAME}/4.png"),
    (lambda e: e.update({f"{NAME}/5.png": png(fmt="JPEG")}), f"not a PNG (JPEG data under a .png name): {NAME}/5.png"),
    (lambda e: e.update({f"{NAME}/6.png": png()[:200]}), "unreadable"),
    (lambda e: e.update({"__MACOSX/._1.png": b"junk"}), "outside the folder"),
    (lambda e: e.update({f"{NAME}/.DS_Store": b"junk"}), "a name other than 1.png"),
    (lambda e: e.update({f"{NAME}/extra/1.png": png()}), "outside the folder"),
])
def test_each_kind_of_wrong_zip_is_refused(change, reported, tmp_path, capsys):
    code, out = check(capsys, make_zip(tmp_path / f"{NAME}.zip", wrong(change)))
    assert code == 1 and out.startswith("NOT a valid hand-in") and reported in out


def test_the_folder_at_the_wrong_depth_is_refused(tmp_path, capsys):
    nested = {f"{NAME}/{name}": data for name, data in correct().items()}  # NAME/NAME/1.png ...
    code, out = check(capsys, make_zip(tmp_path / f"{NAME}.zip", nested))
    assert code == 1 and f"{COUNT} outside the folder {NAME}/" in out and f"{COUNT} missing" in out
    flat = {name.split("/")[1]: data for name, data in correct().items()}  # 1.png ... at the top
    code, out = check(capsys, make_zip(tmp_path / f"{NAME}.zip", flat, folder_entry=False))
    assert code == 1 and "outside the folder" in out and f"{COUNT} missing" in out


def test_a_folder_not_named_after_the_zip_is_refused(tmp_path, capsys):
    code, out = check(capsys, make_zip(tmp_path / "0860912_imgs.zip", correct()))
    assert code == 1 and "outside the folder 0860912_imgs/" in out and f"{COUNT} missing" in out


def test_a_duplicate_entry_a_damaged_checksum_and_a_non_zip_are_refused(tmp_path, capsys):
    entries = correct()
    path = make_zip(tmp_path / f"{NAME}.zip", entries)
    with zipfile.ZipFile(path, "a") as z, pytest.warns(UserWarning, match="Duplicate name"):
        z.writestr(f"{NAME}/1.png", png(seed=99))
    code, out = check(capsys, path)
    assert code == 1 and f"the same name twice in the zip: {NAME}/1.png" in out

    stored = tmp_path / "stored" / f"{NAME}.zip"
    stored.parent.mkdir()
    with zipfile.ZipFile(stored, "w", zipfile.ZIP_STORED) as z:
        for name, data in entries.items():
            z.writestr(name, data)
    raw = bytearray(stored.read_bytes())
    at = raw.index(entries[f"{NAME}/1.png"][40:60])  # a byte inside the first PNG's pixels
    raw[at] ^= 0xFF
    stored.write_bytes(bytes(raw))
    code, out = check(capsys, stored)
    assert code == 1 and f"unreadable (BadZipFile, the first: Bad CRC-32 for file '{NAME}/1.png')" in out

    (tmp_path / "x.zip").write_bytes(b"not a zip")
    code, out = check(capsys, tmp_path / "x.zip")
    assert code == 1 and "not a readable zip" in out


def test_an_entry_too_big_for_a_png_is_not_read(tmp_path, capsys, monkeypatch):
    path = make_zip(tmp_path / f"{NAME}.zip", wrong(lambda e: e.update({f"{NAME}/8.png": b"\0" * (2**20 + 1)})))
    code, out = check(capsys, path)
    assert code == 1 and f"over 1,048,576 bytes unpacked (not a small PNG): {NAME}/8.png" in out


def test_usage_errors(tmp_path, capsys):
    for argv in (["missing.zip"], [str(tmp_path), "--count", "0"]):
        with pytest.raises(SystemExit) as stop:
            check_handin.main(argv)
        assert stop.value.code == 2
