"""Tests of data.py: every format read with the right orientation, the cache, bad inputs, shapes.

Test images are random pixels: a reader that transposes (the bare np.transpose bug), mirrors or
swaps channels gets different numbers. Each test makes its tiny files in tmp_path; the last test
reads the real anime faces in ../shared/data when they are there.
"""
import contextlib
import io
import os
import pickle
import runpy
import signal
import struct
import sys
import zipfile
import zlib

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from ganlab import data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FACES = os.path.join(REPO, '..', 'shared', 'data', 'anime-faces')


@pytest.fixture(autouse=True)
def no_user_folders(tmp_path, monkeypatch):
    """No test reads the user's data or writes to the user's cache."""
    # hidden folders: load_images(tmp_path) skips them, as it skips any hidden file
    monkeypatch.setenv('GANLAB_CACHE', str(tmp_path / '.cache'))
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / '.xdg'))
    monkeypatch.delenv('GANLAB_DATA', raising=False)


def logos(n, h=32, w=32, seed=0):
    """Random uint8 images (n, h, w, 3), channels last like a PNG: asymmetric in every way."""
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def chw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def assert_images(got, want):
    """got == want exactly, as load_images promises (uint8, contiguous, CPU); and want is a test
    image that would catch a transposed, mirrored or channel-swapped read."""
    assert got.dtype == torch.uint8 and got.device.type == 'cpu' and got.is_contiguous()
    assert got.shape == want.shape
    for wrong in (want.transpose(2, 3), want.flip(3), want.flip(2), want.flip(1)):
        assert not torch.equal(wrong, want)
    assert torch.equal(got, want)


def save_pngs(folder, x, names):
    os.makedirs(folder, exist_ok=True)
    for im, name in zip(x, names):
        Image.fromarray(im).save(os.path.join(folder, name))


def load(source, **kw):
    kw.setdefault('progress', False)
    return data.load_images(str(source), **kw)


class Py2Pickler(pickle._Pickler):
    """Writes a numpy array as Python 2 did: raw bytes as a STRING opcode (so reading it back needs
    encoding='latin1') and numpy.core module names."""
    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj):
        self.write(pickle.BINSTRING + struct.pack('<i', len(obj)) + obj)
        self.memoize(obj)
    dispatch[bytes] = save_bytes

    def save_global(self, obj, name=None):
        module = obj.__module__.replace('numpy._core', 'numpy.core')
        self.write(pickle.GLOBAL + f'{module}\n{name or obj.__qualname__}\n'.encode())
        self.memoize(obj)


def save_py2_pickle(path, obj):
    with open(path, 'wb') as f:
        Py2Pickler(f, protocol=2).dump(obj)


def save_hdf5(path, images, **extra):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with h5py.File(path, 'w') as f:
        f['data'] = images
        for name, value in extra.items():
            f[name] = value


# ---------------------------------------------------------------- formats and orientation

def test_png_folder_numeric_order(tmp_path):
    x = logos(5)
    save_pngs(tmp_path / 'icons', x, ['10.png', '2.png', '1.png', '0.png', 'b.png'])
    # numeric names in numeric order (0, 1, 2, 10; lexicographic would put 10 before 2), then the rest
    assert_images(load(tmp_path / 'icons', size=32), chw(x[[3, 2, 1, 0, 4]]))


def test_lld_png_folder_six_digit_names(tmp_path):
    x = logos(3)
    save_pngs(tmp_path / 'lld' / 'LLD_favicons_clean_png', x, ['080770.png', '000001.png', '000100.png'])
    assert_images(load('lld', root=tmp_path), chw(x[[1, 2, 0]]))  # size None keeps 32


def test_lld_hdf5_channels_first_labels_never_read(tmp_path, monkeypatch):
    x = chw(logos(6))
    save_hdf5(tmp_path / 'lld' / 'LLD-icon.hdf5', x.numpy(), **{'labels/resnet/rc_32': np.arange(6)})
    save_pngs(tmp_path / 'lld' / 'LLD_favicons_full_png', logos(2, seed=1), ['0.png', '1.png'])  # hdf5 wins
    opened = []
    getitem = h5py.Group.__getitem__
    monkeypatch.setattr(h5py.Group, '__getitem__', lambda group, key: opened.append(key) or getitem(group, key))
    assert_images(load('lld', root=tmp_path), x)
    assert opened and not any('labels' in str(name) for name in opened)


def test_lld_pkl_python2_channels_last(tmp_path, monkeypatch):
    x = logos(7)
    os.makedirs(tmp_path / 'lld')
    save_py2_pickle(tmp_path / 'lld' / 'LLD-icon_data_0.pkl', x[:4])
    save_py2_pickle(tmp_path / 'lld' / 'LLD-icon_data_1.pkl', x[4:])
    with open(tmp_path / 'lld' / 'LLD-icon_data_0.pkl', 'rb') as f, pytest.raises(UnicodeDecodeError):
        pickle.load(f)  # really a Python 2 pickle: the default encoding cannot read it
    monkeypatch.setenv('GANLAB_DATA', str(tmp_path))  # root from the environment
    assert_images(load('lld'), chw(x))


def test_png_zip_read_without_unpacking(tmp_path):
    x = logos(3)
    os.makedirs(tmp_path / 'anime')
    with zipfile.ZipFile(tmp_path / 'anime' / 'faces.zip', 'w') as z:
        for im, name in zip(x, ['000002', '000010', '000001']):
            png = io.BytesIO()
            Image.fromarray(im).save(png, format='png')
            z.writestr(f'LLD_favicons_full_png/{name}.png', png.getvalue())
            z.writestr(f'__MACOSX/LLD_favicons_full_png/._{name}.png', b'macOS resource fork, not an image')
        z.writestr('readme.txt', 'not an image')
    with pytest.warns(UserWarning, match='skipped 1 non-image'):
        assert_images(load('anime', root=tmp_path, size=32), chw(x[[2, 0, 1]]))
    assert_images(load(tmp_path / 'anime' / 'faces.zip', size=32), chw(x[[2, 0, 1]]))


def test_zip_entries_pointing_outside_are_counted_and_named(tmp_path):
    x = logos(2)
    with zipfile.ZipFile(tmp_path / 'climb.zip', 'w') as z:
        for k, im in enumerate(x):
            png = io.BytesIO()
            Image.fromarray(im).save(png, format='png')
            z.writestr(f'icons/{k + 1}.png', png.getvalue())
            z.writestr(f'../../{k + 1}.png', png.getvalue())
            z.writestr(f'/abs/{k + 1}.png', png.getvalue())
    with pytest.warns(UserWarning, match=r'skipped 4 entries of .*climb.zip whose names point outside it: ../../1.png'):
        assert_images(load(tmp_path / 'climb.zip', size=32, cache_dir=tmp_path / 'cache'), chw(x))
    assert sorted(os.listdir(tmp_path)) == ['cache', 'climb.zip']  # nothing written beside or above it


def test_grayscale_rgba_palette_become_rgb(tmp_path):
    g = logos(1)[0, :, :, 0]
    rgb = logos(1, seed=1)[0]
    alpha = np.zeros((32, 32), np.uint8)
    alpha[:, :10] = 255  # opaque left, half-transparent middle, transparent right
    alpha[:, 10:20] = 128
    palette = Image.fromarray(rgb).quantize(16)
    clear = Image.fromarray(np.asarray(palette))  # 'L' image of palette indices ...
    clear.putpalette(palette.getpalette())        # ... made a palette image again,
    clear.info['transparency'] = 0                # with index 0 transparent
    images = [Image.fromarray(g), Image.fromarray(np.dstack([g, alpha]), 'LA'),
              Image.fromarray(np.dstack([rgb, alpha]), 'RGBA'), palette, clear]
    for i, im in enumerate(images):
        im.save(tmp_path / f'{i}.png', **({'transparency': 0} if i == 4 else {}))
    got = load(tmp_path, size=32).permute(0, 2, 3, 1).numpy().astype(int)

    def on_white(c, a):
        a = a[..., None] / 255
        return c * a + 255 * (1 - a)
    np.testing.assert_array_equal(got[0], np.dstack([g] * 3))
    np.testing.assert_allclose(got[1], on_white(np.dstack([g] * 3), alpha), atol=1)
    np.testing.assert_allclose(got[2], on_white(rgb, alpha), atol=1)
    np.testing.assert_array_equal(got[3], np.asarray(palette.convert('RGB')))
    index = np.asarray(clear)
    want = np.where((index == 0)[..., None], 255, np.asarray(palette.convert('RGB')))
    np.testing.assert_array_equal(got[4], want)
    assert (index == 0).any()


def quadrants(w, h):
    """A w x h image: black margins around a centre square split into red, green / blue, yellow."""
    s = min(w, h)
    x0, y0 = (w - s) // 2, (h - s) // 2
    im = np.zeros((h, w, 3), np.uint8)
    im[y0:y0 + s // 2, x0:x0 + s // 2] = (255, 0, 0)
    im[y0:y0 + s // 2, x0 + s // 2:x0 + s] = (0, 255, 0)
    im[y0 + s // 2:y0 + s, x0:x0 + s // 2] = (0, 0, 255)
    im[y0 + s // 2:y0 + s, x0 + s // 2:x0 + s] = (255, 255, 0)
    return im


def assert_quadrants(img, tol=40):
    """img (3, n, n): red, green / blue, yellow, judged away from the edges and the seams."""
    q = img.shape[-1] // 4
    img = img.permute(1, 2, 0).numpy().astype(int)
    for (y, x), colour in {(q, q): (255, 0, 0), (q, 3 * q): (0, 255, 0),
                           (3 * q, q): (0, 0, 255), (3 * q, 3 * q): (255, 255, 0)}.items():
        assert np.abs(img[y - 1:y + 2, x - 1:x + 2] - colour).max() <= tol, (y, x, img[y, x])


def test_any_size_centre_cropped_resized_upright(tmp_path):
    for i, (w, h) in enumerate([(120, 80), (80, 120), (50, 50)]):
        Image.fromarray(quadrants(w, h)).save(tmp_path / f'{i}.jpg', quality=95)
    Image.fromarray(quadrants(90, 60)).save(tmp_path / '3.png')
    # a photo stored turned a quarter, with the EXIF tag that says so: shown (and loaded) upright
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    stored = Image.fromarray(quadrants(70, 100)).transpose(Image.Transpose.ROTATE_90)
    stored.save(tmp_path / '4.jpg', exif=exif)
    x = load(tmp_path, size=24)
    assert x.shape == (5, 3, 24, 24)
    for img in x:
        assert_quadrants(img)
    # size None: the images' own shorter side, which these do not share (80, 80, 50, 60, 70): no size of their own
    with pytest.raises(ValueError, match=r"differ in size \(120x80 \(0.jpg\), 50x50 \(2.jpg\)\).*--image-size N"):
        load(tmp_path)
    for name in ['2.jpg', '3.png', '4.jpg']:
        os.remove(tmp_path / name)
    assert load(tmp_path).shape == (2, 3, 80, 80)  # 120x80 and 80x120: their shorter side, 80


def test_image_of_the_right_size_is_pillows_decode(tmp_path):
    x = logos(2, 24, 24)
    save_pngs(tmp_path, x, ['0.png', '1.png'])
    assert_images(load(tmp_path, size=24), chw(x))


def test_hdf5_resized_when_asked_and_cached(tmp_path, monkeypatch):
    save_hdf5(tmp_path / 'q.hdf5', chw(quadrants(32, 32)[None]).numpy())
    x = load(tmp_path / 'q.hdf5', size=16)
    assert x.shape == (1, 3, 16, 16)
    assert_quadrants(x[0])
    monkeypatch.setattr(data, '_resize_bank', None)  # resized once: the second time comes from the cache
    assert torch.equal(load(tmp_path / 'q.hdf5', size=16), x)
    assert load(tmp_path / 'q.hdf5').shape == (1, 3, 32, 32)  # size None: the file's own
    assert load(tmp_path / 'q.hdf5', size=32).shape == (1, 3, 32, 32)  # its own size asked for: read, not cached
    assert len(cache_files(tmp_path / '.cache')) == 1


def test_parallel_decoding_equals_serial(tmp_path):
    x = logos(40)
    save_pngs(tmp_path / 'icons', x, [f'{i}.png' for i in range(40)])
    assert_images(load(tmp_path / 'icons', size=32, workers=2, cache_dir=tmp_path / 'a'), chw(x))
    assert_images(load(tmp_path / 'icons', size=32, workers=1, cache_dir=tmp_path / 'b'), chw(x))
    with zipfile.ZipFile(tmp_path / 'icons.zip', 'w') as z:  # each worker opens the zip itself
        for i in range(40):
            z.write(tmp_path / 'icons' / f'{i}.png', f'{i}.png')
    assert_images(load(tmp_path / 'icons.zip', size=32, workers=2), chw(x))


# ---------------------------------------------------------------- the cache

def cache_files(folder):
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def test_cache_reused_invalidated_rebuilt(tmp_path, monkeypatch):
    x = logos(3)
    src, cache = tmp_path / 'icons', tmp_path / '.cache'
    save_pngs(src, x, ['0.png', '1.png', '2.png'])
    assert_images(load(src, size=32), chw(x))
    assert len(cache_files(cache)) == 1 and cache_files(cache)[0].endswith('.npy')

    def no_decoding(*args, **kw):
        raise AssertionError('decoded again')
    decode = data.decode_images
    monkeypatch.setattr(data, 'decode_images', no_decoding)
    y = load(src, size=32)
    assert_images(y, chw(x))  # from the cache
    y[0] = 0  # the mapped cache is copy-on-write: the file keeps its pixels
    assert_images(load(src, size=32), chw(x))
    with pytest.raises(AssertionError, match='decoded again'):
        load(src, size=16)  # another size is another cache

    x[1] = logos(1, seed=9)[0]  # the source changes: the cache is stale
    save_pngs(src, x[1:2], ['1.png'])
    st = os.stat(src / '1.png')  # a later edit, even where the file system keeps whole seconds only
    os.utime(src / '1.png', ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    with pytest.raises(AssertionError, match='decoded again'):
        load(src, size=32)
    monkeypatch.setattr(data, 'decode_images', decode)
    assert_images(load(src, size=32), chw(x))
    assert len(cache_files(cache)) == 1  # the stale one is gone, no temporary file left

    path = os.path.join(cache, cache_files(cache)[0])
    for damage in (lambda b: b[:len(b) // 2], lambda b: b'garbage', lambda b: b''):  # truncated, corrupt
        with open(path, 'rb') as f:
            good = f.read()
        with open(path, 'wb') as f:
            f.write(damage(good))
        with pytest.warns(UserWarning, match='unusable') as caught:
            assert_images(load(src, size=32), chw(x))
        assert 'allow_pickle' not in str(caught[0].message)  # never advise loading a pickle from a cache
        assert cache_files(cache) == [os.path.basename(path)]

    uncached = load(src, size=16, cache=False)
    assert len(cache_files(cache)) == 1  # cache=False writes nothing ...
    assert_images(uncached, load(src, size=16))  # ... and gives the pixels a cached read gives
    monkeypatch.setattr(data, 'decode_images', no_decoding)
    with pytest.raises(AssertionError, match='decoded again'):
        load(src, size=32, cache=False)  # nor is a matching cache read: decoded every time
    monkeypatch.setattr(data, 'decode_images', decode)


def test_cache_beside_data_else_user_cache(tmp_path, monkeypatch):
    monkeypatch.delenv('GANLAB_CACHE')
    x = logos(2)
    save_pngs(tmp_path / 'rw' / 'icons', x, ['0.png', '1.png'])
    assert_images(load(tmp_path / 'rw' / 'icons', size=32), chw(x))
    assert len(cache_files(tmp_path / 'rw' / '.ganlab-cache')) == 1
    save_pngs(tmp_path / 'ro' / 'icons', x, ['0.png', '1.png'])
    os.chmod(tmp_path / 'ro', 0o555)  # read-only, like /work/shared (even for root: the bits are honoured)
    try:
        assert_images(load(tmp_path / 'ro' / 'icons', size=32), chw(x))
    finally:
        os.chmod(tmp_path / 'ro', 0o755)
    assert not os.path.exists(tmp_path / 'ro' / '.ganlab-cache')
    assert len(cache_files(tmp_path / '.xdg' / 'ganlab')) == 1


# ---------------------------------------------------------------- bad inputs

def test_missing_dataset_says_what_to_get_and_where(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError) as e:
        load('lld', root=tmp_path)
    for words in ('LLD-icon.hdf5', data.LLD_URL, str(tmp_path / 'lld')):
        assert words in str(e.value)
    monkeypatch.setenv('GANLAB_DATA', str(tmp_path / 'env'))
    with pytest.raises(FileNotFoundError, match='anime faces not found') as e:
        load('anime')
    assert str(tmp_path / 'env' / 'anime') in str(e.value)
    with pytest.raises(FileNotFoundError, match='no such file or folder'):
        load(tmp_path / 'nowhere')


def test_corrupt_images_skipped_and_counted(tmp_path):
    x = logos(2)
    save_pngs(tmp_path, x, ['0.png', '3.png'])
    (tmp_path / '1.png').write_bytes(b'not a png at all')
    jpeg = io.BytesIO()
    Image.fromarray(logos(1, 64, 64)[0]).save(jpeg, format='jpeg')
    (tmp_path / '2.jpg').write_bytes(jpeg.getvalue()[:len(jpeg.getvalue()) // 2])  # truncated
    (tmp_path / 'notes.txt').write_text('hello')
    with pytest.warns(UserWarning) as caught:
        got = load(tmp_path, size=32)
    messages = ' '.join(str(w.message) for w in caught)
    assert 'skipped 2 unreadable' in messages and '1.png' in messages and '2.jpg' in messages
    assert 'skipped 1 non-image' in messages
    assert_images(got, chw(x))


def test_empty_or_imageless_sources_are_errors(tmp_path):
    os.makedirs(tmp_path / 'empty')
    with pytest.raises(ValueError, match='no images in it'):
        load(tmp_path / 'empty')
    (tmp_path / 'text').mkdir()
    (tmp_path / 'text' / 'a.txt').write_text('hello')
    with pytest.raises(ValueError, match='no images in it'):
        load(tmp_path / 'text')
    (tmp_path / 'bad').mkdir()
    (tmp_path / 'bad' / '0.png').write_bytes(b'junk')
    with pytest.warns(UserWarning), pytest.raises(ValueError, match='none of its 1 image'):
        load(tmp_path / 'bad', size=32)
    with pytest.raises(ValueError, match='none of its 1 image.*0.png'):  # no size: no image to take it from
        load(tmp_path / 'bad')
    with zipfile.ZipFile(tmp_path / 'e.zip', 'w') as z:
        z.writestr('a.txt', 'hello')
    with pytest.raises(ValueError, match='no images'):
        load(tmp_path / 'e.zip')
    (tmp_path / 'b.zip').write_bytes(b'not a zip')
    with pytest.raises(ValueError, match='b.zip'):
        load(tmp_path / 'b.zip')


def test_corrupt_hdf5_and_pkl_name_the_file(tmp_path):
    (tmp_path / 'junk.hdf5').write_bytes(b'\x89HDF junk' * 100)
    save_hdf5(tmp_path / 'cut.hdf5', chw(logos(50)).numpy())
    whole = (tmp_path / 'cut.hdf5').read_bytes()
    (tmp_path / 'cut.hdf5').write_bytes(whole[:len(whole) // 2])
    (tmp_path / 'junk.pkl').write_bytes(b'not a pickle')
    save_py2_pickle(tmp_path / 'cut.pkl', logos(5))
    whole = (tmp_path / 'cut.pkl').read_bytes()
    (tmp_path / 'cut.pkl').write_bytes(whole[:len(whole) // 2])
    for name in ('junk.hdf5', 'cut.hdf5', 'junk.pkl', 'cut.pkl'):
        with pytest.raises(ValueError, match='unreadable') as e:
            load(tmp_path / name)
        assert str(tmp_path / name) in str(e.value)


def test_wrong_dtype_or_shape_names_the_file(tmp_path):
    save_hdf5(tmp_path / 'float.hdf5', chw(logos(2)).numpy().astype(np.float32))
    save_hdf5(tmp_path / 'hwc.hdf5', logos(2))  # channels last, but LLD's hdf5 is channels first
    with h5py.File(tmp_path / 'nodata.hdf5', 'w') as f:
        f['images'] = chw(logos(2)).numpy()
    save_py2_pickle(tmp_path / 'chw.pkl', chw(logos(2)).numpy())  # channels first, but LLD's pkl is last
    save_py2_pickle(tmp_path / 'list.pkl', [logos(1)])
    for name, words in [('float.hdf5', 'float32'), ('hwc.hdf5', r'\(2, 32, 32, 3\)'),
                        ('nodata.hdf5', "'data'"), ('chw.pkl', r'\(2, 3, 32, 32\)'), ('list.pkl', 'list')]:
        with pytest.raises(ValueError, match=words) as e:
            load(tmp_path / name)
        assert str(tmp_path / name) in str(e.value)


def test_pickle_cannot_run_code(tmp_path):
    class Exploit:
        def __reduce__(self):
            return os.system, (f'touch {tmp_path / "ran"}',)
    with open(tmp_path / 'evil.pkl', 'wb') as f:
        pickle.dump(Exploit(), f, protocol=2)
    with pytest.raises(ValueError, match='refusing'):
        load(tmp_path / 'evil.pkl')
    assert not os.path.exists(tmp_path / 'ran')


def png_16_bit_rgb(path, rgb):
    """Write uint16 (h, w, 3) as a 16-bit RGB PNG, chunk by chunk (Pillow cannot write one)."""
    def chunk(kind, body):
        return struct.pack('>I', len(body)) + kind + body + struct.pack('>I', zlib.crc32(kind + body))
    h, w, _ = rgb.shape
    rows = b''.join(b'\0' + row.astype('>u2').tobytes() for row in rgb)  # filter 0 (none) before each row
    header = struct.pack('>IIBBBBB', w, h, 16, 2, 0, 0, 0)  # 16 bits, colour type 2: RGB
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(rows))
                     + chunk(b'IEND', b''))


def test_16_bit_grey_png_scaled_not_clipped(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 65536, (32, 32), dtype=np.uint16)
    grey[0, :4] = [0, 255, 65535, 257 * 200]  # black, dark, white, and an 8-bit level stored as 16 bits
    Image.fromarray(grey).save(tmp_path / '0.png')
    assert Image.open(tmp_path / '0.png').mode == 'I;16'  # really a 16-bit grey PNG
    png_16_bit_rgb(tmp_path / '1.png', np.dstack([grey] * 3))
    got = load(tmp_path, size=32).numpy()
    # the oracle: Pillow's own decode of the same values as a 16-bit colour PNG
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / '1.png')), np.dstack([grey >> 8] * 3))
    np.testing.assert_array_equal(got[0], got[1])
    assert list(got[0, 0, 0, :4]) == [0, 0, 255, 200]
    assert (got[0] == 255).mean() < 0.01  # not clipped to white (Pillow's convert('RGB') makes 99.6% white)
    Image.fromarray(grey.astype(np.int32)).save(tmp_path / '2.tif')  # Pillow's 32-bit mode 'I', 16-bit values
    Image.fromarray(grey.astype(np.int32) * 4).save(tmp_path / '3.tif')  # beyond 16 bits: no agreed scale
    with pytest.warns(UserWarning, match=r'skipped 1 unreadable.*3\.tif.*only 8- and 16-bit'):
        got = load(tmp_path, size=32, cache_dir=tmp_path / '.other').numpy()
    assert len(got) == 3 and (got[2] == got[0]).all()


def test_16_bit_grey_transparent_level_on_white(tmp_path):
    grey = np.full((8, 8), 1000, np.uint16)
    grey[:, :4] = 40000
    Image.fromarray(grey).save(tmp_path / 'a.png', transparency=40000)
    got = load(tmp_path, size=8).numpy()[0]
    assert (got[:, :, :4] == 255).all() and (got[:, :, 4:] == 1000 >> 8).all()


def fifo(path):
    os.mkfifo(path)
    return path


@contextlib.contextmanager
def no_hang(seconds=30):
    """Fail (instead of hanging the test run) if the body blocks, e.g. opening a FIFO nobody writes to."""
    def stop(*_):
        raise TimeoutError(f'blocked for {seconds} s')
    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.skipif(not hasattr(os, 'mkfifo'), reason='no FIFOs here')
def test_fifo_never_read(tmp_path):
    x = logos(2)
    save_pngs(tmp_path / 'icons', x, ['0.png', '2.png'])
    fifo(tmp_path / 'icons' / '1.png')
    fifo(tmp_path / 'icons' / 'z.hdf5')  # would be preferred to the images if it were a file
    os.symlink(tmp_path / 'nowhere.png', tmp_path / 'icons' / '3.png')  # a link to nothing
    with no_hang(), pytest.warns(UserWarning, match=r'skipped 3 entries .* not regular files') as caught:
        got = load(tmp_path / 'icons', workers=1)
    assert '1.png' in str(caught[-1].message)
    assert_images(got, chw(x))
    assert data.native_size(tmp_path / 'icons') == 32
    for path in (fifo(tmp_path / 'data.hdf5'), fifo(tmp_path / 'data.zip')):  # given as the data itself
        with no_hang(), pytest.raises(ValueError, match='not a regular file') as e:
            load(path)
        assert str(path) in str(e.value)


def test_empty_name_or_root_refused(tmp_path, monkeypatch):
    save_pngs(tmp_path, logos(1), ['0.png'])
    monkeypatch.chdir(tmp_path)  # '' would read the current folder, this one
    for call in (lambda: load(''), lambda: data.native_size('')):
        with pytest.raises(ValueError, match='--data is empty'):
            call()
    with pytest.raises(ValueError, match='--data-root is empty'):
        load('anime', root='')


def test_sizes_and_limits_below_one_refused():
    for kw, flag in [(dict(size=0), '--image-size'), (dict(size=-32), '--image-size'), (dict(size=2.5), '--image-size'),
                     (dict(limit=0), '--max-images'), (dict(limit=-3), '--max-images'), (dict(n=0), 'n must')]:
        with pytest.raises(ValueError, match=flag):
            load('shapes', **kw)


def test_folders_default_to_their_own_size_named_sets_keep_theirs(tmp_path):
    x = logos(2)
    save_pngs(tmp_path / 'anime', x, ['0.png', '1.png'])
    assert_images(load(tmp_path / 'anime'), chw(x))  # 32x32 images: kept at 32, not blown up to 64
    assert load('anime', root=tmp_path).shape == (2, 3, 64, 64)  # the named set: 64 as documented


def spy(monkeypatch, name):
    """Record the arguments of every call of data.<name>, and still make the call."""
    calls, real = [], getattr(data, name)
    monkeypatch.setattr(data, name, lambda *args, **kw: calls.append(args) or real(*args, **kw))
    return calls


def test_limit_reads_only_the_first_images(tmp_path, monkeypatch):
    x = logos(5)
    save_pngs(tmp_path / 'icons', x, [f'{i}.png' for i in range(5)])
    decoded = spy(monkeypatch, 'decode_images')
    assert_images(load(tmp_path / 'icons'), chw(x))
    assert_images(load(tmp_path / 'icons', limit=2), chw(x[:2]))
    assert decoded[-1][2] == ['0.png', '1.png']  # only those two were decoded
    assert_images(load(tmp_path / 'icons'), chw(x))  # the first N are cached apart: the whole set's cache stays
    assert_images(load(tmp_path / 'icons', limit=2), chw(x[:2]))
    assert_images(load(tmp_path / 'icons', limit=9), chw(x))  # more than there are: all, the same cache
    assert len(decoded) == 2 and len(cache_files(tmp_path / '.cache')) == 2
    with zipfile.ZipFile(tmp_path / 'icons.zip', 'w') as z:
        for i in range(5):
            z.write(tmp_path / 'icons' / f'{i}.png', f'{i}.png')
    assert_images(load(tmp_path / 'icons.zip', limit=3), chw(x[:3]))
    save_hdf5(tmp_path / 'h' / 'x.hdf5', chw(x).numpy())
    assert_images(load(tmp_path / 'h' / 'x.hdf5', limit=3), chw(x[:3]))
    assert_images(load(tmp_path / 'h' / 'x.hdf5', limit=3, size=16), load(tmp_path / 'h' / 'x.hdf5', size=16)[:3])
    os.makedirs(tmp_path / 'p')
    save_py2_pickle(tmp_path / 'p' / 'LLD-icon_data_0.pkl', x[:2])
    save_py2_pickle(tmp_path / 'p' / 'LLD-icon_data_1.pkl', x[2:])
    opened = spy(monkeypatch, '_ArrayUnpickler')
    assert_images(load(tmp_path / 'p', limit=2), chw(x[:2]))
    assert len(opened) == 1  # the second file was not read
    made = spy(monkeypatch, 'make_shapes')
    assert load('shapes', n=500, limit=10).shape == (10, 3, 32, 32) and made[-1][0] == 10


def test_bank_larger_than_memory_refused_before_allocating(tmp_path, monkeypatch):
    def not_drawn(*args):
        raise AssertionError('drew the icons')
    monkeypatch.setattr(data, 'make_shapes', not_drawn)
    with pytest.raises(ValueError, match=r'20,000 images at 4096x4096 need 937\.5 GiB.*--image-size or --max-images'):
        load('shapes', size=4096)  # the 938 GiB, on any machine with less than that
    monkeypatch.undo()
    monkeypatch.setenv('GANLAB_CACHE', str(tmp_path / '.cache'))
    monkeypatch.setattr(data, 'memory_bytes', lambda: 2 ** 20)  # a machine with 1 MiB
    assert load('shapes', n=100, size=32).shape == (100, 3, 32, 32)  # 0.3 MiB: fits
    with pytest.raises(ValueError, match=r'200 images at 64x64 need 2\.3 MiB .* has 1\.0 MiB'):
        load('shapes', n=200, size=64)  # 2.3 MiB
    save_pngs(tmp_path / 'icons', logos(3), ['0.png', '1.png', '2.png'])
    save_hdf5(tmp_path / 'h' / 'x.hdf5', chw(logos(3)).numpy())
    os.makedirs(tmp_path / 'p')
    save_py2_pickle(tmp_path / 'p' / 'x.pkl', logos(3))
    decoded, resized = spy(monkeypatch, 'decode_images'), spy(monkeypatch, '_resize_bank')
    for source in ('icons', 'h/x.hdf5', 'p'):
        with pytest.raises(ValueError, match='3 images at 512x512'):
            load(tmp_path / source, size=512)
        assert load(tmp_path / source, size=64, limit=1).shape == (1, 3, 64, 64)
    assert [len(call[2]) for call in decoded] == [1] and [len(call[0]) for call in resized] == [1, 1]


# ---------------------------------------------------------------- shapes

def test_shapes_deterministic_varied():
    a = load('shapes', n=500, seed=3)
    assert a.shape == (500, 3, 32, 32) and a.dtype == torch.uint8 and a.is_contiguous()
    assert torch.equal(a, load('shapes', n=500, seed=3))
    assert not torch.equal(a, load('shapes', n=500, seed=4))
    assert len(torch.unique(a.flatten(1), dim=0)) > 490  # nearly all different
    assert a.float().std(0).mean() > 40  # and not small variations of one picture
    assert len(torch.unique(a)) > 20  # anti-aliased edges, not just the palette


def test_shapes_default_and_sizes():
    assert load('shapes').shape == (20000, 3, 32, 32)
    assert load('shapes', size=64, n=10).shape == (10, 3, 64, 64)


def test_shapes_labels_say_what_is_drawn():
    x, labels = data.make_shapes(600, 32, seed=5, labels=True)
    assert np.array_equal(x, data.make_shapes(600, 32, seed=5))  # labels change nothing in the images
    marks = np.array(list(data.MARK_COLOURS.values()))[labels['colour']]
    backgrounds = np.array(list(data.BACKGROUNDS.values()))[labels['background']]
    # the centre lies inside every mark, the corners outside all of them
    np.testing.assert_array_equal(x[:, :, 16, 16], marks)
    for y, x_ in ((0, 0), (0, 31), (31, 0), (31, 31)):
        np.testing.assert_array_equal(x[:, :, y, x_], backgrounds)
    # the mark's area, as the share alpha of each pixel it covers (recovered from the colours), against
    # the area of the labelled shape with the drawn radius r in 0.26..0.34 of the side (so a range):
    # disc pi r^2, square (1.6 r)^2, equilateral triangle in a circle of 1.2 r: 3 sqrt(3)/4 (1.2 r)^2,
    # plus: two 2r x 0.66r bars less their 0.66r x 0.66r overlap
    span = (marks - backgrounds).astype(float)[:, :, None, None]
    channel = np.abs(span).argmax(1, keepdims=True)  # the channel where the colours differ most
    alpha = np.take_along_axis((x - backgrounds[:, :, None, None]) / span, channel, 1)
    area = alpha.sum(axis=(1, 2, 3)) / 32 ** 2
    unit = {'disc': np.pi, 'square': 1.6 ** 2, 'triangle': 3 * np.sqrt(3) / 4 * 1.2 ** 2,
            'plus': 2 * 2 * 0.66 - 0.66 ** 2}
    for m, shape in enumerate(data.SHAPES):
        a = area[labels['shape'] == m]
        assert len(a) > 100
        assert unit[shape] * 0.26 ** 2 * 0.97 < a.min() and a.max() < unit[shape] * 0.34 ** 2 * 1.03, shape
    # soft edges: a ring of partly covered pixels around each mark, not a hard step
    partial = ((alpha > 0.05) & (alpha < 0.95)).sum(axis=(1, 2, 3))
    assert partial.min() >= 20


def test_shapes_modes_equally_likely():
    _, labels = data.make_shapes(7200, 32, seed=6, labels=True)
    counts = np.zeros((len(data.SHAPES), len(data.MARK_COLOURS), len(data.BACKGROUNDS)), int)
    np.add.at(counts, (labels['shape'], labels['colour'], labels['background']), 1)
    assert counts.size == 36 and counts.min() > 150 and counts.max() < 250  # 200 each; +-25% is > 3.5 sigma


# ---------------------------------------------------------------- the real faces

@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(FACES), reason='no ../shared/data/anime-faces')
def test_real_anime_faces(tmp_path):
    names = [0, 1, 17, 33430]
    for size in (96, 64):
        x = load(FACES, size=size, cache_dir=tmp_path)
        assert x.shape == (33431, 3, size, size) and x.dtype == torch.uint8 and x.is_contiguous()
        for i in names:
            with Image.open(os.path.join(FACES, f'{i}.jpg')) as im:
                im = im.convert('RGB')
                if size != 96:
                    im = im.resize((size, size), Image.Resampling.LANCZOS)
                assert_images(x[i:i + 1], chw(np.asarray(im)[None]))
    assert len(cache_files(tmp_path)) == 2


def test_native_size(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (48, 40)).save(folder / "2.png")
    Image.new("RGB", (40, 44)).save(folder / "10.png")
    assert data.native_size(folder) == 40  # the shorter side both have
    with zipfile.ZipFile(tmp_path / "imgs.zip", "w") as archive:
        archive.write(folder / "2.png", "imgs/2.png")
    assert data.native_size(tmp_path / "imgs.zip") == 40
    Image.new("RGB", (20, 20)).save(folder / "11.png")
    with pytest.raises(ValueError, match=r"differ in size \(48x40 \(2.png\), 20x20 \(11.png\)\)"):
        data.native_size(folder)
    os.remove(folder / "11.png")
    assert data.native_size("shapes") == 32
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        data.native_size(tmp_path / "empty")
    (folder / "1.png").write_bytes(b"not a png")
    assert data.native_size(folder) == 40  # passed over, as decoding passes over it
    (folder / "2.png").write_bytes(b"not a png")
    (folder / "10.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="none of its 3 image.*1.png"):
        data.native_size(folder)


def run_data_py(argv, monkeypatch, capsys):
    """python -m ganlab.data ARGV in this process -> (exit status, stderr)."""
    monkeypatch.setattr(sys, 'argv', ['data.py', *argv])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(os.path.join(REPO, 'ganlab', 'data.py'), run_name='__main__')
    return exit_info.value.code, capsys.readouterr().err


def test_command_line_bad_input(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'file').write_text('not a folder')
    for argv, words in [(['--data', ''], '--data is empty'), (['--image-size', '0'], '--image-size'),
                        (['--max-images', '-3'], '--max-images'), (['--workers', '0'], '--workers'),
                        (['--cache-dir', ''], '--cache-dir is empty'), (['--cache-dir', 'file/c'], '--cache-dir'),
                        (['--image-size', '4096'], '937.5 GiB')]:
        status, err = run_data_py(argv, monkeypatch, capsys)
        assert status == 2 and words in err and 'Traceback' not in err, (argv, err)
    assert os.listdir(tmp_path) == ['file']


# ---------------------------------------------------------------- the real icons (LLD-icon's PNG folder layout)

ICONS = os.path.join(REPO, '..', 'shared', 'data', 'real-icons')


@pytest.mark.skipif(not os.path.isdir(ICONS), reason='no ../shared/data/real-icons')
@pytest.mark.parametrize('folder,count', [('logos', 4512), ('emoji', 3786)])
def test_real_icons_load_as_lld_png_folders(folder, count, tmp_path, monkeypatch):
    # as --data lld reads them from data/lld/ (a flat folder of 6-digit PNG names), at their own 32x32
    monkeypatch.setenv('GANLAB_DATA', str(tmp_path))
    os.symlink(os.path.join(ICONS, folder), tmp_path / 'lld')
    x = load('lld', cache_dir=tmp_path / 'cache')
    assert x.shape == (count, 3, 32, 32) and x.dtype == torch.uint8
    for i in (0, 1, count // 2, count - 1):  # 000001.png is image 0: name order, pixel for pixel
        with Image.open(os.path.join(ICONS, folder, f'{i + 1:06d}.png')) as im:
            assert_images(x[i:i + 1], chw(np.asarray(im.convert('RGB'))[None]))
