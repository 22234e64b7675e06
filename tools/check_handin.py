"""Check a logo hand-in zip against the assignment's rules, before you hand it in.

    python tools/check_handin.py out/dcgan-lld/0860912_img.zip     # ok, or every deviation found; exit 0 or 1
    python tools/check_handin.py other.zip --count 100 --size 64    # another count or size

The rules (the assignment: a missing image means zero points, so every deviation counts):
  - NAME.zip unpacks to one folder NAME/ and nothing else (no __MACOSX/, no files beside it),
  - NAME/ holds exactly --count files named 1.png, 2.png, ..., COUNT.png (no 01.png, 1.PNG, extra or
    duplicate entries, no sub-folders, no links),
  - each a PNG (not another format under a .png name) of --size x --size pixels, RGB: 8 bits a channel,
    no alpha, no palette, no grey, readable to its last pixel (the zip's checksum included).
It reads any zip, whoever made it; it extracts nothing and decodes each entry in memory, refusing an
entry that unpacks to more than 1 MB (a 32x32 RGB PNG is at most a few kB) before reading it.
"""

import argparse
import io
import os
import re
import stat
import sys
import zipfile

from PIL import Image

from ganlab import flags

MAX_ENTRY_BYTES = 2**20
SHOWN = 5  # examples shown of each kind of deviation


def check_handin(path, count=50000, size=32):
    """-> (problems, name): problems maps each kind of deviation to the entries that show it (empty: the
    zip is a valid hand-in); name is the folder the zip must unpack to, NAME for NAME.zip."""
    name = os.path.basename(path)
    name = name[:-4] if name.lower().endswith(".zip") else name
    problems = {}

    def problem(kind, entry):
        problems.setdefault(kind, []).append(entry)

    if not path.lower().endswith(".zip"):
        problem("the file is not named NAME.zip", os.path.basename(path))
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        problem(f"not a readable zip ({error})", path)
        return problems, name
    with archive:
        expected = {f"{name}/{k}.png": k for k in range(1, count + 1)}
        seen = set()
        for info in archive.infolist():
            entry = info.filename
            if info.is_dir():
                if entry != name + "/":
                    problem(f"a folder other than {name}/", entry)
                continue
            if stat.S_ISLNK(info.external_attr >> 16):
                problem("a symbolic link", entry)
                continue
            if entry not in expected:
                top = entry.split("/")[0]
                if top != name or entry.count("/") != 1:
                    problem(f"outside the folder {name}/ (unzip would put it elsewhere)", entry)
                elif re.fullmatch(r"[1-9][0-9]*\.png", entry.split("/")[1]):
                    problem(f"a number above {count}", entry)
                else:
                    problem("a name other than 1.png ... N.png", entry)
                continue
            if entry in seen:
                problem("the same name twice in the zip", entry)
                continue
            seen.add(entry)
            why = _bad_image(archive, info, size)
            if why:
                problem(why, entry)
        missing = [entry for entry in expected if entry not in seen]
        if missing:
            problems[f"missing (of {name}/1.png ... {count}.png)"] = missing
    return problems, name


def _bad_image(archive, info, size):
    """Why this entry is not a size x size RGB PNG, or None."""
    if info.flag_bits & 0x1:
        return "encrypted"
    if info.file_size > MAX_ENTRY_BYTES:
        return f"over {MAX_ENTRY_BYTES:,} bytes unpacked (not a small PNG)"
    try:
        data = archive.read(info)  # checks the zip's CRC-32
        with Image.open(io.BytesIO(data)) as im:
            if im.format != "PNG":
                return f"not a PNG ({im.format or 'unknown'} data under a .png name)"
            if im.size != (size, size):
                return f"not {size}x{size} pixels ({im.size[0]}x{im.size[1]}, the first of them)"
            if im.mode != "RGB":
                return f"not RGB (PNG mode {im.mode}, the first of them)"
            im.load()  # every pixel: a truncated file fails here
    except Exception as error:  # zipfile and Pillow fail in many ways on a damaged entry
        return f"unreadable ({type(error).__name__}, the first: {error})"
    return None


parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter,
                                 epilog="\n".join(__doc__.split("\n")[1:]))
parser.add_argument("zip", help="the hand-in, e.g. out/dcgan-lld/0860912_img.zip")
parser.add_argument("--count", type=flags.positive_int, default=50000,
                    help="how many images it must hold (default: 50000)")
parser.add_argument("--size", type=flags.positive_int, default=32, help="their side in pixels (default: 32)")


def main(argv=None):
    args = parser.parse_args(argv)
    if not os.path.isfile(args.zip):
        parser.error(f"{args.zip}: no such file")
    problems, name = check_handin(args.zip, args.count, args.size)
    if not problems:
        print(f"ok: {args.zip} unpacks to {name}/ holding 1.png ... {args.count}.png, "
              f"each a {args.size}x{args.size} RGB PNG")
        return 0
    total = sum(len(entries) for entries in problems.values())
    print(f"NOT a valid hand-in: {args.zip}, {total} deviation(s); it must unpack to {name}/ holding exactly "
          f"1.png ... {args.count}.png, each a {args.size}x{args.size} RGB PNG:")
    for kind, entries in problems.items():
        more = f" ... ({len(entries) - SHOWN} more)" if len(entries) > SHOWN else ""
        print(f"  {len(entries)} {kind}: {', '.join(entries[:SHOWN])}{more}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
