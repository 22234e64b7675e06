"""Dataset readers: files on disk -> one uint8 tensor (N, 3, H, W), the image bank the op samples from.

    from ganlab.data import load_images
    x = load_images('shapes')              # built-in procedural icons, (20000, 3, 32, 32), no download
    x = load_images('lld')                 # LLD-icon from data/lld/: hdf5, pkl, png folder or png zip
    x = load_images('anime', size=64)      # anime faces from data/anime/: centre square, resized once
    x = load_images('some/folder_or.zip')  # any images (or an .hdf5/.pkl file), at their own size
    x = load_images('anime', limit=5000)   # only the first 5,000 are decoded (the scripts' --max-images)

    python -m ganlab.data --data anime --image-size 64   # decode once, fill the cache, print time and memory

Where data is looked for: `root` (the scripts' --data-root), else $GANLAB_DATA, else data/ in the
checkout; 'lld' and 'anime' are the folders root/lld and root/anime. In a folder the order of
preference is: an .hdf5 file (LLD-icon.hdf5 first), else its .pkl files, else its images
(recursively; LLD's PNG folders LLD_favicons_full_png, then _clean_png), else its largest .zip.

Images (png, jpg, ...) are decoded once, in parallel, and cached as a .npy of the final uint8
array; later runs map that file (at once; pages are read on first touch). The cache goes to
`cache_dir`, else $GANLAB_CACHE, else a hidden .ganlab-cache/ folder beside the data, else (data
folder not writable) $XDG_CACHE_HOME/ganlab or ~/.cache/ganlab. It is keyed by the source (file
names, sizes, mtimes) and the image size, so a changed source or size builds a new one; a
truncated or corrupt one is rebuilt. HDF5 and pickle files are arrays already: read directly.

Only images are read: never labels or metadata (the models' only input is noise). Only regular
files are opened (a FIFO named like an image would block forever). What cannot work is refused
before anything is read or allocated, with a ValueError naming the scripts' flag: an empty --data,
an --image-size or --max-images below 1, a bank larger than the machine's memory (check_memory).
"""
import argparse
import collections
import concurrent.futures
import contextlib
import hashlib
import io
import math
import multiprocessing
import numbers
import os
import pickle
import signal
import sys
import tempfile
import time
import warnings
import zipfile

import h5py
import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout, which holds data/
LLD_URL = 'https://data.vision.ee.ethz.ch/sagea/lld/'
IMAGE_EXTS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp', '.tif', '.tiff', '.ppm')
CHUNK_BYTES = 32 * 2**20  # pixels a decoding worker hands back at a time
CACHE_VERSION = 1  # bump when decoding changes (filter, crop, colours): old caches are then rebuilt
# The most pixels one image may have (8192 x 8192), checked from its header before it is decoded: a 2 MB
# PNG can unpack to a 12000 x 12000 image (432 MB); a zip entry may unpack to at most 8 bytes a pixel of it.
# The scripts' --max-pixels sets it (set_max_pixels).
MAX_PIXELS = 2 ** 26

MISSING = {
    'lld': ("LLD-icon not found in {folder}/. Download LLD-icon.hdf5 (or the LLD-icon PKL files "
            "LLD-icon_data_0.pkl ..., or a PNG zip, unpacked or not) from " + LLD_URL + " and put it in "
            "{folder}/, or point --data-root / $GANLAB_DATA at a folder holding lld/, or pass --data PATH. "
            "To try things without a download: --data shapes."),
    'anime': ("anime faces not found in {folder}/. Put the assignment's anime-face set (51,223 96x96 "
              "JPEGs, as a folder or a .zip) in {folder}/, or point --data-root / $GANLAB_DATA at a "
              "folder holding anime/, or pass --data PATH to any folder or zip of images. "
              "To try things without a download: --data shapes."),
}


def load_images(name_or_path='shapes', root=None, size=None, *, n=20000, seed=0, limit=None,
                cache_dir=None, workers=None, progress=True, cache=True):
    """Return images as a uint8 tensor (N, 3, size, size), contiguous, on the CPU.

    name_or_path: 'shapes', 'lld', 'anime', or a folder, .zip, .hdf5 or .pkl file.
    size: side in pixels; None gives 32 for 'shapes' and 'lld', 64 for 'anime', an .hdf5/.pkl file's own
      size, and for any other folder or zip its own: its images' shorter side, which the first 16 readable
      ones must agree on (native_size).
    n, seed: how many 'shapes' icons, and their seed.
    limit: make or read only the first `limit` images (the scripts' --max-images): the first `limit` image
      files of a folder or zip in name order (fewer come back if some are unreadable), the first rows of an
      .hdf5/.pkl, min(n, limit) icons of 'shapes'. None: all.
    cache_dir: where decoded images are cached; workers: decoding processes (default: all cores);
    progress: show progress bars and what is read from where.
    cache: False decodes (or resizes) without writing a cache, for a folder read once, such as a run's
      samples scored by modes.py.
    Decoded images come back as a copy-on-write map of their cache file: writes stay in this process.

    Requests that cannot work are refused with a ValueError naming the scripts' flag before anything is
    read or allocated: an empty name or root, a size or limit below 1, and a bank larger than this
    machine's memory (check_memory), e.g.

        >>> load_images('shapes', size=4096)
        ValueError: 20,000 images at 4096x4096 need 937.5 GiB of memory; this machine has 23.5 GiB: ...
    """
    name_or_path = os.fspath(name_or_path)
    _check_request(name_or_path, root, size, limit, n)
    if name_or_path == 'shapes':
        count = min(n, limit or n)  # drawn only up to limit: nothing made is thrown away
        check_memory(count, size or 32)
        return torch.from_numpy(make_shapes(count, size or 32, seed))
    kind, paths = find_source(name_or_path, root)
    if progress:
        print(f'{name_or_path}: reading {", ".join(paths)}', file=sys.stderr)
    if kind in ('folder', 'zip'):
        base = paths[0]
        names, others = _image_names(kind, base)
        size = size or DEFAULT_SIZE.get(name_or_path) or _first_image_side(kind, base, names)
        if limit is not None and limit >= len(names):
            limit = None  # all of them: the same images, and the same cache, as no limit
        names = names[:limit]
        check_memory(len(names), size)
        return torch.from_numpy(_decoded_images(kind, base, names, others, size, limit, cache_dir, workers,
                                                progress, cache))
    if kind == 'pkl':  # how many images a pickle holds is known only once it is read: read_pkls checks then
        x = read_pkls(paths, progress, limit, size)
        if size and x.shape[2:] != (size, size):  # resized once, then cached like decoded images
            x = _cached(paths[0], _stamp(paths), size, cache_dir, progress, lambda: _resize_bank(x, size, progress),
                        limit if limit is not None and limit <= len(x) else None, cache)
        return torch.from_numpy(x)
    count, h, w = _hdf5_shape(paths[0])
    if limit is not None and limit >= count:
        limit = None
    count = min(count, limit or count)
    if not size or (h, w) == (size, size):
        check_memory(count, h)
        return torch.from_numpy(read_hdf5(paths[0], progress, limit))
    # resized once, then cached like decoded images: the file is read only when there is no cache, and
    # then whole, with the smaller bank made beside it
    check_memory(count, size, count * 3 * h * w)
    return torch.from_numpy(_cached(paths[0], _stamp(paths), size, cache_dir, progress,
                                    lambda: _resize_bank(read_hdf5(paths[0], progress, limit), size, progress), limit,
                                    cache))


DEFAULT_SIZE = {'lld': 32, 'anime': 64}  # the named sets: LLD-icon's own 32, the assignment's 64 (of 96)


def _check_request(name_or_path, root, size, limit, n):
    """Refuse what no data can satisfy, naming the scripts' flag (ValueError)."""
    if not name_or_path:
        # abspath('') is the current folder: it would read every image under it (docs, a run's own grids)
        raise ValueError("--data is empty: give 'shapes', 'lld', 'anime' or a folder, .zip, .hdf5 or .pkl")
    if root is not None and not os.fspath(root):
        raise ValueError('--data-root is empty: give the folder that holds lld/ and anime/, or leave it out')
    for flag, value in (('--image-size', size), ('--max-images', limit), ('n', n)):
        if value is not None and (not isinstance(value, numbers.Integral) or value < 1):
            raise ValueError(f'{flag} must be a whole number >= 1, got {value!r}')


def memory_bytes():
    """The memory this process can have: the machine's physical memory, or its container's limit
    (cgroup v2 memory.max) where that is lower."""
    if not hasattr(os, 'sysconf'):  # Windows: unknown, so nothing is refused
        return float('inf')
    total = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    with contextlib.suppress(OSError, ValueError):
        with open('/sys/fs/cgroup/memory.max') as f:
            total = min(total, int(f.read()))  # 'max' (no limit) fails int() and leaves total
    return total


def check_memory(count, size, extra_bytes=0):
    """Refuse (ValueError) a bank of `count` uint8 images of size x size, count * 3 * size**2 bytes, plus
    `extra_bytes` held beside it while it is made, that cannot fit in memory_bytes(): before any of it is
    allocated, rather than swapping for hours or being killed midway. (Decoding holds little beside the
    bank: 2 chunks of at most CHUNK_BYTES per worker.)"""
    need = count * 3 * size * size + extra_bytes
    have = memory_bytes()
    if need > have:
        raise ValueError(f'{count:,} images at {size}x{size} need {format_bytes(need)} of memory; this machine has '
                         f'{format_bytes(have)}: use a smaller --image-size or --max-images')


def format_bytes(nbytes):
    """Bytes as the user reads them: '937.5 GiB', '2.3 MiB'."""
    return f'{nbytes / 2**30:,.1f} GiB' if nbytes >= 2**30 else f'{nbytes / 2**20:,.1f} MiB'


def native_size(name_or_path, root=None):
    """The side load_images should ask for to keep a set's own resolution: 32 for 'shapes', the
    shorter side of the images in a folder or zip (what fit_image's centre crop keeps; they must agree),
    and None for .hdf5/.pkl files, whose arrays load_images already keeps at their own size."""
    name_or_path = os.fspath(name_or_path)
    _check_request(name_or_path, root, None, None, 1)
    if name_or_path == 'shapes':
        return 32
    kind, paths = find_source(name_or_path, root)
    if kind not in ('folder', 'zip'):
        return None
    return _first_image_side(kind, paths[0], _image_names(kind, paths[0])[0])


def _first_image_side(kind, base, names, look=16):
    """The shorter side of the first images in `names` that open (only their headers are read); unreadable
    ones are passed over, as decoding passes over them. Of the first `look` that open, the shorter sides
    must agree: a folder of mixed sizes has no size of its own (ValueError naming what was found and the
    flag that sets the size)."""
    first_error, seen = None, {}
    opened = 0
    with (zipfile.ZipFile(base) if kind == 'zip' else contextlib.nullcontext()) as archive:
        for name in names:
            try:
                with open_checked(kind, base, name, archive) as im:
                    seen.setdefault(min(im.size), (name, im.size))  # the centre square's side
                    opened += 1
            except (OSError, ValueError, Image.DecompressionBombError, zipfile.BadZipFile, KeyError) as e:
                first_error = first_error or f'{name}: {e}'
            if len(seen) > 1 or opened == look:
                break
    if len(seen) > 1:
        found = ', '.join(f'{w}x{h} ({name})' for name, (w, h) in seen.values())
        raise ValueError(f'{base}: its images differ in size ({found}), so it has no size of its own: give '
                         '--image-size N to resize every image to N x N (centre square)')
    if seen:
        return next(iter(seen))
    raise ValueError(f'{base}: none of its {len(names)} image(s) could be read ({first_error})')


# ---------------------------------------------------------------- finding the files

def find_source(name_or_path, root=None):
    """'lld', 'anime' or a path -> (kind, paths); kind is 'hdf5', 'pkl', 'folder' or 'zip'."""
    if name_or_path in MISSING:
        root = root or os.environ.get('GANLAB_DATA') or os.path.join(REPO, 'data')
        folder = os.path.abspath(os.path.join(root, name_or_path))
        found = _source_in_folder(folder) if os.path.isdir(folder) else None
        if found is None:
            raise FileNotFoundError(MISSING[name_or_path].format(folder=folder))
        return found
    path = os.path.abspath(name_or_path)  # one name per folder: the cache key is made of paths
    if os.path.isdir(path):
        found = _source_in_folder(path)
        if found is None:
            raise ValueError(f'{path}: no images in it (nor .hdf5, .pkl or .zip files)')
        return found
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder (and not one of 'shapes', 'lld', 'anime')")
    if not os.path.isfile(path):  # reading a FIFO waits forever for a writer; a device never ends
        raise ValueError(f'{path}: not a regular file (a FIFO, socket or device): give a folder, .zip, .hdf5 or .pkl')
    for kind, exts in (('hdf5', ('.hdf5', '.h5')), ('pkl', ('.pkl', '.pickle')), ('zip', ('.zip',))):
        if path.lower().endswith(exts):
            return kind, [path]
    raise ValueError(f'{path}: not a folder, .zip, .hdf5 or .pkl file')


def _source_in_folder(folder):
    """The data in a folder, in the order of preference the module docstring gives, or None."""
    paths = [os.path.join(folder, f) for f in sorted(os.listdir(folder), key=_numeric_first) if f[0] != '.']
    paths = [p for p in paths if os.path.isfile(p)]  # regular files only: a FIFO named x.hdf5 would hang
    hdf5 = [p for p in paths if p.lower().endswith(('.hdf5', '.h5'))]
    if hdf5:
        return 'hdf5', [min(hdf5, key=lambda p: os.path.basename(p) != 'LLD-icon.hdf5')]
    pkl = [p for p in paths if p.lower().endswith(('.pkl', '.pickle'))]
    if pkl:
        return 'pkl', pkl  # LLD-icon_data_0.pkl, _1.pkl, ... all of them, in order
    for sub in ('LLD_favicons_full_png', 'LLD_favicons_clean_png'):
        if os.path.isdir(os.path.join(folder, sub)):
            return 'folder', [os.path.join(folder, sub)]
    if any(p.lower().endswith(IMAGE_EXTS) for p in _files_under(folder)[0]):
        return 'folder', [folder]
    zips = [p for p in paths if p.lower().endswith('.zip')]
    if zips:  # LLD's full set and clean set come as two zips: the larger is the full one
        return 'zip', [max(zips, key=os.path.getsize)]
    return None


def _numeric_first(path):
    """Sort key: in each folder, numeric names in numeric order (2.jpg before 10.jpg), then the others
    in lexicographic order."""
    folder, _, name = path.rpartition('/')
    stem = name.rpartition('.')[0] or name
    return (folder, 0, int(stem), name) if stem.isdecimal() else (folder, 1, 0, name)


def _files_under(folder):
    """-> (regular files under folder, everything else that is not a folder), as relative paths with '/'.

    Only regular files are ever opened: a FIFO named like an image blocks its reader until something
    writes to it (forever), and a device may never end. Links are followed to files, not to folders."""
    regular, special, pending = [], [], ['']
    while pending:
        rel = pending.pop()
        with os.scandir(os.path.join(folder, rel)) as entries:
            for entry in entries:
                path = rel + entry.name
                if entry.is_dir(follow_symlinks=False):
                    pending.append(path + '/')
                else:  # is_file follows links: a link to a regular file counts as one
                    try:
                        is_file = entry.is_file()
                    except OSError:  # a link loop (x.png -> y.png -> x.png), a name the OS cannot stat
                        is_file = False
                    (regular if is_file else special).append(path)
    return regular, special


def _image_names(kind, base):
    """The images of a folder or zip in numeric-first order, and how many other files it holds."""
    names, others = _list_images(_files_under(base)[0]) if kind == 'folder' else _zip_images(base)
    if not names:
        raise ValueError(f'{base}: no images in it ({others} other file(s))')
    return names, others


def _list_images(relpaths):
    """-> (image paths in numeric-first order, number of other files). Hidden files and macOS
    zip junk (__MACOSX/, ._name) are dropped silently: they are not images, whatever the name."""
    relpaths = [p for p in relpaths if '/.' not in '/' + p and '__MACOSX/' not in p]
    images = [p for p in relpaths if p.lower().endswith(IMAGE_EXTS)]
    return sorted(images, key=_numeric_first), len(relpaths) - len(images)


# ---------------------------------------------------------------- arrays: hdf5 and pkl

def _check_bank(path, dtype, shape, layout):
    channels = shape[1] if layout == 'NCHW' else shape[-1]
    if dtype != np.uint8 or len(shape) != 4 or channels != 3 or shape[0] == 0:
        raise ValueError(f'{path}: expected uint8 RGB images {layout} (N > 0, 3 channels), '
                         f'found {dtype} of shape {tuple(shape)}')


def _hdf5_images(f, path):
    """The checked image dataset of an open LLD-icon HDF5 file."""
    if not isinstance(f.get('data'), h5py.Dataset):
        raise ValueError(f"{path}: no dataset 'data' (LLD-icon keeps its images there)")
    _check_bank(path, f['data'].dtype, f['data'].shape, 'NCHW')
    return f['data']


def _hdf5_shape(path):
    """(images, height, width) of an LLD-icon HDF5 file, from its header: no image is read."""
    try:
        with h5py.File(path, 'r') as f:
            n, _, h, w = _hdf5_images(f, path).shape
    except OSError as e:
        raise ValueError(f'{path}: unreadable HDF5 file ({e})') from e
    return n, h, w


def read_hdf5(path, progress=True, limit=None):
    """LLD-icon HDF5 -> uint8 (N, 3, H, W): dataset 'data' is channels first already, kept as is;
    its first `limit` images only if limit is given. Only 'data' is opened; the label groups under
    labels/ are never read."""
    try:
        with h5py.File(path, 'r') as f:
            data = _hdf5_images(f, path)
            x = np.empty((min(len(data), limit or len(data)),) + data.shape[1:], np.uint8)
            step = 65536  # read in slices only to show progress
            for i in tqdm(range(0, len(x), step), desc='hdf5', unit='slice', disable=not progress):
                rows = np.s_[i:min(i + step, len(x))]
                data.read_direct(x, rows, rows)
    except OSError as e:  # h5py's messages do not say which file
        raise ValueError(f'{path}: unreadable HDF5 file ({e})') from e
    return x


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else: a pickle may call any function it names, and these
    files come from the internet."""
    SAFE = {('numpy', 'ndarray'), ('numpy', 'dtype'), ('_codecs', 'encode'),
            ('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct')}

    def find_class(self, module, name):
        if (module, name) not in self.SAFE:
            raise pickle.UnpicklingError(f'refusing {module}.{name}: only numpy arrays are read')
        return super().find_class(module, name)


def read_pkls(paths, progress=True, limit=None, size=None):
    """LLD-icon PKL files, each a uint8 array (n, H, W, 3) channels last -> one (N, 3, H, W): the first
    `limit` images only if limit is given (later files are then not read). `size`, the side the images
    will be resized to, only enters the memory check made before the output is allocated."""
    parts = []
    for path in tqdm(paths, desc='pkl', unit='file', disable=not progress):
        if limit and sum(len(x) for x in parts) >= limit:
            break
        try:
            with open(path, 'rb') as f:
                # written by Python 2: its byte strings (the pixels) need latin1 to come back as bytes
                x = _ArrayUnpickler(f, encoding='latin1').load()
        except Exception as e:  # truncated or foreign pickles fail in many ways; all mean "unreadable"
            raise ValueError(f'{path}: unreadable pickle ({type(e).__name__}: {e})') from e
        if not isinstance(x, np.ndarray):
            raise ValueError(f'{path}: expected a numpy array, found {type(x).__name__}')
        _check_bank(path, x.dtype, x.shape, 'NHWC')
        if parts and x.shape[1:] != parts[0].shape[1:]:
            raise ValueError(f'{path}: images of shape {x.shape[1:]}, the files before: {parts[0].shape[1:]}')
        parts.append(x)
    count = min(sum(len(x) for x in parts), limit or math.inf)
    _, h, w, _ = parts[0].shape
    # held at once: the pickles read, this channels-first copy, and the resized bank made from it
    resized = size and (size, size) != (h, w)
    check_memory(count, size or h, sum(x.nbytes for x in parts) + (count * 3 * h * w if resized else 0))
    out = np.empty((count, 3, h, w), np.uint8)
    start = 0
    for x in parts:
        x = x[:count - start]
        # channels last -> first keeps the two spatial axes in order: transpose(0, 3, 1, 2). (A bare
        # np.transpose reverses all axes and mirrors every logo along its diagonal.)
        out[start:start + len(x)] = x.transpose(0, 3, 1, 2)
        start += len(x)
    return out


# ---------------------------------------------------------------- images: decode, in parallel, cached

def fit_image(im, size):
    """A PIL image -> uint8 (size, size, 3): upright, RGB, the centre square resized to size."""
    # JPEG only: let the decoder shrink by 1/2, 1/4 or 1/8 in the DCT domain while staying >= size
    # (much faster for big photos; no change for images smaller than twice the size)
    im.draft(None, (size, size))
    if im.getexif().get(0x0112, 1) != 1:  # EXIF orientation: the photo is stored turned; turn it back
        im = ImageOps.exif_transpose(im)
    if im.mode.startswith('I') or im.mode == 'F':
        im = _to_8_bits(im)
    if im.mode in ('RGBA', 'LA', 'PA') or 'transparency' in im.info:
        # transparent pixels become white: logos and icons are drawn to be seen on a white page
        white = Image.new('RGBA', im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im.convert('RGBA'))
    if im.mode != 'RGB':
        im = im.convert('RGB')  # grayscale, palette, CMYK, ...
    w, h = im.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    if s == size and (w, h) != (size, size):
        im = im.crop(box)
    elif s != size:
        # Lanczos: a windowed sinc, widened by the shrink factor so it also anti-aliases; the sharpest
        # of Pillow's filters, and the centre crop is passed as `box` so it costs nothing extra.
        # reducing_gap=3 first box-averages very big images by an integer factor (fast), leaving at
        # least 3x for Lanczos, which Pillow documents as indistinguishable from exact resampling.
        im = im.resize((size, size), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)
    return np.asarray(im)


def _to_8_bits(im):
    """A 16-bit grayscale image (Pillow's modes 'I;16', 'I;16B', ... and 'I', which it also uses for
    16-bit PNGs) -> 8-bit 'L', or 'LA' when one grey level is marked transparent.

    Pillow's own convert('L') clips these values to 0..255: nearly every pixel of a 16-bit image turns
    white. The 16-bit value v in 0..65535 becomes v >> 8, its high byte, floor(v / 256): what Pillow (like
    libpng's default) does to 16-bit colour PNGs, so a grey picture stored as 16-bit grey or as 16-bit RGB
    loads to the same bytes; and an 8-bit value k stored as 16 bits, k * 257, comes back as k exactly.
    (Rounding v * 255 / 65535 instead would differ from it by at most 1 level, and from Pillow's colour
    decode.) Values outside 0..65535 (32-bit integer or float images) have no agreed scale: refused."""
    v = np.asarray(im)
    if im.mode == 'F' or v.min() < 0 or v.max() > 65535:
        raise ValueError(f'{im.mode} pixels from {v.min()} to {v.max()}: only 8- and 16-bit images are read; '
                         'convert it to an 8-bit PNG or JPEG')
    grey = Image.fromarray((v.astype(np.uint32) >> 8).astype(np.uint8), 'L')
    transparent = im.info.get('transparency')
    if isinstance(transparent, int):  # a 16-bit grey PNG's tRNS names one 16-bit level, before the shift
        grey.putalpha(Image.fromarray(np.where(v == transparent, 0, 255).astype(np.uint8), 'L'))
    return grey


def set_max_pixels(n):
    """Images of up to n pixels are decoded (the flag --max-pixels); Pillow's own bomb check follows."""
    global MAX_PIXELS
    MAX_PIXELS = Image.MAX_IMAGE_PIXELS = n


def open_checked(kind, base, name, archive=None):
    """Image.open of a file in the folder `base`, or of a member of the zip open as `archive`, refusing
    what would cost more than MAX_PIXELS before it is decoded (ValueError naming the cap and its flag)."""
    if kind == 'zip':
        unpacked = archive.getinfo(name).file_size
        if unpacked > 8 * MAX_PIXELS:
            raise ValueError(f'{unpacked:,} bytes unpacked, above the cap of {8 * MAX_PIXELS:,} '
                             f'(8 bytes a pixel of --max-pixels {MAX_PIXELS})')
        f = io.BytesIO(archive.read(name))
    else:
        f = os.path.join(base, name)
    with warnings.catch_warnings():  # Pillow's own check warns and fails in its words: ours names the flag
        warnings.simplefilter('ignore', Image.DecompressionBombWarning)
        try:
            im = Image.open(f)
        except Image.DecompressionBombError as e:
            raise ValueError(f'{e}; above the cap of --max-pixels {MAX_PIXELS}') from None
    w, h = im.size
    if w * h > MAX_PIXELS:
        im.close()
        raise ValueError(f'{w}x{h} is {w * h:,} pixels, above the cap of --max-pixels {MAX_PIXELS}')
    return im


def to_chw(im):
    """(H, W, 3) -> (3, H, W) with transpose(2, 0, 1); a bare np.transpose would give (3, W, H)."""
    return im.transpose(2, 0, 1)


def _decode_chunk(job):
    """Worker: decode some images -> uint8 (k, 3, size, size), and [(index, name, why)] of unreadable ones."""
    kind, base, names, size = job
    out = np.zeros((len(names), 3, size, size), np.uint8)
    bad = []
    with (zipfile.ZipFile(base) if kind == 'zip' else contextlib.nullcontext()) as archive:
        for i, name in enumerate(names):
            try:
                with open_checked(kind, base, name, archive) as im:
                    out[i] = to_chw(fit_image(im, size))
            except Exception as e:  # Pillow and zipfile fail in many ways on a bad file: skip it, say why
                bad.append((i, name, f'{type(e).__name__}: {e}'))
    return out, bad


def _die_with_parent(parent):
    """Worker initializer: end this worker when its parent process ends. A parent killed by SIGTERM or
    SIGKILL runs no clean-up, and its workers would wait forever to hand back a chunk. Linux kills the
    worker itself (prctl PR_SET_PDEATHSIG); elsewhere the worker only notices at its next chunk."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


def decode_images(kind, base, names, size, workers=None, progress=True):
    """Decode files under a folder (or members of a zip) -> uint8 (N, 3, size, size), in name order.
    Unreadable images are skipped with one warning that counts them."""
    if not workers:  # the cores this process may use (in a container, fewer than the machine has)
        workers = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    # >= 4 chunks a worker (an even finish), each at most CHUNK_BYTES of pixels
    step = max(1, min(1000, -(-len(names) // (4 * workers)), CHUNK_BYTES // (3 * size * size)))
    jobs = [(kind, base, names[i:i + step], size) for i in range(0, len(names), step)]
    # fork, not spawn: the model scripts are flat files with no `if __name__ == '__main__'`, and a
    # spawned worker would run the whole script again. Where there is no fork (Windows): one process.
    fork = workers > 1 and len(jobs) > 1 and 'fork' in multiprocessing.get_all_start_methods()
    pool = concurrent.futures.ProcessPoolExecutor(
        min(workers, len(jobs)), mp_context=multiprocessing.get_context('fork'),
        initializer=_die_with_parent, initargs=(os.getpid(),)) if fork else None
    out = np.empty((len(names), 3, size, size), np.uint8)
    bad = []
    ahead = 2 * workers  # chunks decoded before they are copied into out: the only memory beside it
    try:
        # submitting forks the workers: before tqdm starts its monitor thread
        pending = collections.deque(pool.submit(_decode_chunk, job) for job in jobs[:ahead]) if pool else None
        with tqdm(total=len(names), desc='decode', unit='img', disable=not progress) as bar:
            for k, start in enumerate(range(0, len(names), step)):
                if pool:
                    x, errors = pending.popleft().result()
                    if k + ahead < len(jobs):
                        pending.append(pool.submit(_decode_chunk, jobs[k + ahead]))
                else:
                    x, errors = _decode_chunk(jobs[k])
                out[start:start + len(x)] = x
                bad += [(start + i, name, why) for i, name, why in errors]
                bar.update(len(x))
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    if bad:
        shown = '; '.join(f'{name} ({why})' for _, name, why in bad[:3])
        more = ' ...' if len(bad) > 3 else ''
        warnings.warn(f'skipped {len(bad)} unreadable image(s) in {base}: {shown}{more}')
        kept = np.setdiff1d(np.arange(len(names)), [i for i, _, _ in bad])
        for to, row in enumerate(kept):  # moved up in place: a second bank-sized copy might not fit
            out[to] = out[row]
        out = out[:len(kept)]
    if len(out) == 0:
        raise ValueError(f'{base}: none of its {len(names)} image(s) could be read')
    return out


def _decoded_images(kind, base, names, others, size, limit, cache_dir, workers, progress, cache=True):
    """The images `names` of a folder or zip at `size` (the first `limit`, or all if limit is None): from
    the cache if it matches the source, else decoded."""
    # a zip changes as a whole: its size and times say so
    paths = [os.path.join(base, p) for p in names] if kind == 'folder' else [base]
    stamp = _stamp(paths)

    def decode():
        if others:
            warnings.warn(f'skipped {others} non-image file(s) in {base}')
        special = [p for p in _files_under(base)[1] if '/.' not in '/' + p] if kind == 'folder' else []
        if special:
            more = ' ...' if len(special) > 3 else ''
            shown = ', '.join(map(repr, special[:3]))  # repr: a name that is not UTF-8 prints safely
            warnings.warn(f'skipped {len(special)} entries of {base} that are not regular files (FIFOs, sockets, '
                          f'devices, links to folders, to nothing or in a loop): {shown}{more}')
        return decode_images(kind, base, names, size, workers, progress)
    return _cached(base, stamp, size, cache_dir, progress, decode, limit, cache, restamp=lambda: _stamp(paths))


def _resize_bank(x, size, progress):
    """Arrays (N, 3, h, w) -> (N, 3, size, size), with the same centre crop and filter as images."""
    out = np.empty((len(x), 3, size, size), np.uint8)
    for i in tqdm(range(len(x)), desc='resize', unit='img', disable=not progress):
        out[i] = to_chw(fit_image(Image.fromarray(x[i].transpose(1, 2, 0)), size))
    return out


def _stamp(paths):
    """What says cheaply whether files changed: their names, sizes, modification times and inode change
    times (a file moved out and back keeps its mtime, not its ctime); 'missing' for a file now gone."""
    def one(p):
        try:
            st = os.stat(p)
        except OSError:
            return f'{p} missing'
        return f'{p} {st.st_size} {st.st_mtime_ns} {st.st_ctime_ns}'
    return '\n'.join(map(one, paths))


def _cached(base, stamp, size, cache_dir, progress, build, limit=None, cache=True, restamp=None):
    """build() -> uint8 (N, 3, size, size), run once: later calls map the cached result for as long as
    the source `base` and its `stamp` stay the same. The first `limit` images (limit not None) are cached
    apart from the whole set, so that neither replaces the other. cache=False: build() alone, nothing
    read or written. restamp(): the stamp again after build(); if the files changed meanwhile (a file
    moved away while it was read), the result is not cached: it stands for no state of the source."""
    if not cache:
        return build()
    first = f'first{limit}-' if limit else ''
    # surrogateescape: file names that are not UTF-8 (they come back from the OS as lone surrogates)
    key = hashlib.sha1(f'{CACHE_VERSION}\n{size}\n{first}{stamp}'.encode('utf-8', 'surrogateescape')).hexdigest()[:16]
    base = os.path.abspath(base)
    where = hashlib.sha1(base.encode('utf-8', 'surrogateescape')).hexdigest()[:8]  # two folders may share a name
    prefix = f'{os.path.basename(base)}-{where}-{size}px-{first}'
    path = os.path.join(_cache_folder(base, cache_dir), prefix + key + '.npy')
    x = _read_cache(path, size)
    if x is not None:
        if progress:
            print(f'cache: {path}', file=sys.stderr)
        return x
    if progress:
        print(f'building it once; cache: {path}', file=sys.stderr)
    x = build()
    if restamp is not None and restamp() != stamp:
        warnings.warn(f'{base} changed while it was read (files moved, removed or rewritten): these images are '
                      'used but not cached; the next run reads the folder again')
        return x
    mapped = _read_cache(path, size) if _write_cache(path, x, prefix) else None
    return x if mapped is None else mapped  # the mapped file, as later runs get it; frees the built copy


def _zip_images(path):
    try:
        with zipfile.ZipFile(path) as archive:
            entries = [i.filename for i in archive.infolist() if not i.is_dir()]
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f'{path}: unreadable zip file ({e})') from e
    # names that climb out of the zip (../x.png, /x.png) are never read: say how many, and which
    outside = [n for n in entries if n.startswith('/') or '..' in n.split('/')]
    if outside:
        shown = ', '.join(outside[:3]) + (' ...' if len(outside) > 3 else '')
        warnings.warn(f'skipped {len(outside)} entries of {path} whose names point outside it: {shown}')
    outside = set(outside)
    return _list_images(n for n in entries if n not in outside)


def _cache_folder(base, cache_dir):
    """cache_dir, else $GANLAB_CACHE, else .ganlab-cache/ beside the data if that folder is writable,
    else the user's cache: $XDG_CACHE_HOME/ganlab or ~/.cache/ganlab."""
    if cache_dir or os.environ.get('GANLAB_CACHE'):
        return cache_dir or os.environ['GANLAB_CACHE']
    beside = os.path.join(os.path.dirname(base), '.ganlab-cache')
    if _writable(beside):
        return beside
    return os.path.join(os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'ganlab')


def _writable(folder):
    """Can we create files in folder (or, if it does not exist yet, in its first existing parent)?
    root passes os.access everywhere, so the permission bits are honoured too: a folder marked
    read-only (like /work/shared) is left alone even by root."""
    while not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    return os.access(folder, os.W_OK) and bool(os.stat(folder).st_mode & 0o222)


def _read_cache(path, size):
    """The cached array, or None if there is none or it is unusable (truncated, corrupt, wrong shape).

    The file is memory-mapped copy-on-write: loading takes no time and no fresh memory (the pages are
    the OS's file cache, read on first touch, shared between runs); writes stay private to the process.
    """
    if not os.path.lexists(path):
        return None
    try:
        if not os.path.isfile(path):  # opening a FIFO would wait forever
            raise ValueError('not a regular file')
        with open(path, 'rb') as f:
            if f.read(6) != b'\x93NUMPY':  # else numpy's message suggests allow_pickle=True: never for a cache
                raise ValueError('not a .npy file: it does not start with the .npy magic bytes')
        x = np.load(path, mmap_mode='c', allow_pickle=False)  # fails on a truncated file: too short to map
        if x.dtype == np.uint8 and x.ndim == 4 and x.shape[1:] == (3, size, size) and len(x) > 0:
            return x
        why = f'{x.dtype} of shape {x.shape}'
    except (OSError, ValueError, EOFError) as e:
        why = str(e)
    warnings.warn(f'cache {path} is unusable ({why}): rebuilding it')
    return None


def _write_cache(path, x, prefix):
    """Write atomically (a temporary file in the same folder, then os.replace), so a run that dies
    midway leaves no half-written cache; then delete older caches of the same source and size."""
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix='.tmp')
        try:
            with os.fdopen(fd, 'wb') as f:
                np.save(f, x)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache beside shared data is for everyone
            os.replace(tmp, path)
        except BaseException:
            os.remove(tmp)
            raise
    except OSError as e:  # full disk, read-only mount, ...: the images are fine, only not cached
        warnings.warn(f'could not write cache {path}: {e}')
        return False
    for f in os.listdir(folder):
        if f.startswith(prefix) and f.endswith('.npy') and f != os.path.basename(path):
            with contextlib.suppress(OSError):  # e.g. still mapped by another run, on Windows
                os.remove(os.path.join(folder, f))
    return True


# ---------------------------------------------------------------- shapes: a built-in procedural set

# The set is built from three factors, each drawn uniformly and independently, so every one of the
# 4 x 3 x 3 = 36 modes (shape, mark colour, background) holds 1/36 of the icons: about 140 of 5,000,
# enough for a small GAN to learn each one. The mark colours and the backgrounds are disjoint sets,
# so every mark stands out from its background, and by a lot: the marks are mid-bright, the
# backgrounds very light or very dark. (A navy background, (30, 40, 70), differs from green and blue
# marks in about one channel; a DCGAN drew shapes there far worse than on white or yellow: 5% and
# 15% of its green and blue marks on navy recognisable against 50-70% elsewhere. README, Quickstart.)
SHAPES = ('disc', 'square', 'triangle', 'plus')
MARK_COLOURS = {'red': (215, 45, 45), 'green': (40, 150, 75), 'blue': (45, 100, 215)}
BACKGROUNDS = {'white': (240, 240, 236), 'black': (20, 20, 24), 'yellow': (250, 205, 60)}
EDGE_PX = 1.5  # width in pixels of the soft edge over which a mark fades into its background


def make_shapes(n=20000, size=32, seed=0, labels=False):
    """Logo-like icons, uint8 (n, 3, size, size), the same for the same seed; with labels=True,
    (icons, {'shape', 'colour', 'background': int64 (n,)}), indices into SHAPES, MARK_COLOURS and
    BACKGROUNDS (in their order), for classifiers that measure what a generator covers (modes.py).

    Each icon: one large mark (disc, square, triangle or plus) in one of 3 colours, on a plain
    background of one of 3 colours, near the centre, with anti-aliased soft edges. 20,000 icons
    take about a second. Deliberately few factors: the set must be learnable in minutes on a CPU
    (README, "Quickstart"), and its 36 modes are what `python tools/modes.py` counts.
    """
    rng = np.random.default_rng(seed)
    # every random choice is drawn up front, so the result does not depend on the chunks below
    p = dict(shape=rng.integers(len(SHAPES), size=n),
             colour=rng.integers(len(MARK_COLOURS), size=n),
             background=rng.integers(len(BACKGROUNDS), size=n),
             cx=rng.uniform(0.46, 0.54, n).astype(np.float32),  # centre, in image widths
             cy=rng.uniform(0.46, 0.54, n).astype(np.float32),
             r=rng.uniform(0.26, 0.34, n).astype(np.float32))  # radius: the mark spans about 60% of the icon
    out = np.empty((n, 3, size, size), np.uint8)
    step = max(1, 2 ** 20 // size ** 2)  # icons per chunk: a few MB of temporaries
    for i in range(0, n, step):
        out[i:i + step] = _draw_icons({name: v[i:i + step] for name, v in p.items()}, size)
    if labels:
        return out, {name: p[name].astype(np.int64) for name in ('shape', 'colour', 'background')}
    return out


def _signed_distance(shape, dx, dy, r):
    """Distance (in image widths) from pixel offsets (dx, dy) to a mark's outline: negative inside.
    Exact for the disc, exact inside the polygons and close enough outside them, where only the
    soft edge (a pixel or two) uses it."""
    if shape == 'disc':
        return np.hypot(dx, dy) - r
    if shape == 'square':  # half side 0.8 r: about the disc's area
        return np.maximum(abs(dx), abs(dy)) - 0.8 * r
    if shape == 'triangle':
        # equilateral, pointing up, inscribed in a circle of radius R = 1.2 r: its three sides lie at
        # distance R/2 from the centre, with outward normals (0, 1) and (+-sqrt(3)/2, -1/2)
        R = 1.2 * r
        half_root3 = np.float32(np.sqrt(3) / 2)
        return np.maximum(dy, np.maximum(half_root3 * dx, -half_root3 * dx) - 0.5 * dy) - 0.5 * R
    if shape == 'plus':  # the union of two bars of half width 0.33 r: the smaller distance
        bar = lambda u, v: np.maximum(abs(u) - r, abs(v) - 0.33 * r)  # noqa: E731
        return np.minimum(bar(dx, dy), bar(dy, dx))
    raise ValueError(f'unknown shape {shape!r}')


def _draw_icons(p, size):
    """Icons with parameters p (arrays, one value per icon) -> uint8 (b, 3, size, size).

    Coverage of a pixel by the mark, from the signed distance d (in pixels) to its outline:
        alpha = clip(1/2 - d / EDGE_PX, 0, 1)
    a linear ramp EDGE_PX pixels wide centred on the outline (1 pixel would be plain anti-aliasing);
    the pixel is then alpha * mark colour + (1 - alpha) * background colour.
    """
    t = (np.arange(size, dtype=np.float32) + 0.5) / size  # pixel centres in [0, 1]
    x, y = t[None, :][None], t[:, None][None]  # (1, 1, size) and (1, size, 1)
    q = {name: v[:, None, None] for name, v in p.items()}  # (b, 1, 1): broadcasts over (b, size, size)
    distance = np.empty((len(p['shape']), size, size), np.float32)
    for m, shape in enumerate(SHAPES):
        i = np.flatnonzero(p['shape'] == m)
        distance[i] = _signed_distance(shape, x - q['cx'][i], y - q['cy'][i], q['r'][i])
    alpha = np.clip(0.5 - distance * size / EDGE_PX, 0, 1)[:, None]  # (b, 1, size, size)
    mark = np.array(list(MARK_COLOURS.values()), np.float32)[p['colour']][:, :, None, None]  # (b, 3, 1, 1)
    background = np.array(list(BACKGROUNDS.values()), np.float32)[p['background']][:, :, None, None]
    return np.rint(alpha * mark + (1 - alpha) * background).astype(np.uint8)


if __name__ == '__main__':
    import resource

    from ganlab import flags
    parser = argparse.ArgumentParser(description='Load a dataset once (fills the cache): shape, time, memory.')
    parser.add_argument('--data', default='shapes', help="'shapes', 'lld', 'anime', or a folder/zip/hdf5/pkl")
    parser.add_argument('--data-root', default=None, help='holds lld/ and anime/ (default: $GANLAB_DATA, data/)')
    parser.add_argument('--image-size', type=flags.positive_int, default=None,
                        help='side in pixels (default: see load_images)')
    parser.add_argument('--max-images', type=flags.positive_int, default=None, help='only the first N images')
    parser.add_argument('--cache-dir', default=None, help='for decoded images (default: see the docstring)')
    parser.add_argument('--workers', type=flags.positive_int, default=None,
                        help='decoding processes (default: all cores)')
    parser.add_argument('--max-pixels', type=flags.positive_int, default=MAX_PIXELS,
                        help=f'skip images of more pixels than this, before decoding them (default: {MAX_PIXELS})')
    args = parser.parse_args()
    set_max_pixels(args.max_pixels)
    if args.cache_dir == '':
        parser.error('--cache-dir is empty: give a folder, or leave it out for the default')
    if args.cache_dir is not None:
        try:
            flags.check_output_folder(args.cache_dir, '--cache-dir')
        except ValueError as error:
            parser.error(str(error))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB
    t0 = time.perf_counter()
    try:
        x = load_images(args.data, root=args.data_root, size=args.image_size, limit=args.max_images,
                        cache_dir=args.cache_dir, workers=args.workers)
    except (FileNotFoundError, ValueError) as error:  # missing, empty or unreadable data
        parser.error(str(error))
    t1 = time.perf_counter()
    brightest = int(x.max())  # reads every pixel: a cache is mapped, and read only when touched
    t2 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f'{args.data}: {tuple(x.shape)} {x.dtype} ({x.numel() / 2**20:.0f} MiB), max {brightest}; '
          f'{os.cpu_count()} cores: load {t1 - t0:.1f} s, then reading every pixel {t2 - t1:.1f} s; '
          f'peak RSS {peak:.0f} MiB (after imports {before:.0f} MiB), largest child {children:.0f} MiB')
