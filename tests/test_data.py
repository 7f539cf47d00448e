"""Subject photos: every PIL mode to the right RGB pixels, EXIF orientation visible after the crop, animations
and too few photos said in one line (through the CLI too)."""
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.fixtures import make_tiny_clip, make_tiny_dino
from tinyrpo.data import (exact_metrics_hook, load_rgb, load_subject, load_subject_images, read_prompt_file,
                          read_subject_file)
from tinyrpo.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def pixels(im: Image.Image) -> np.ndarray:
    assert im.mode == "RGB"
    return np.asarray(im).astype(int)


# ---------------------------------------------------------------------------------------------- modes


def _i16(path):
    a = np.array([[0, 257 * 128], [65535, 257 * 64]], dtype=np.uint16).repeat(8, 0).repeat(8, 1)
    Image.fromarray(a).save(path / "x.png")  # a 16-bit grayscale PNG: PIL opens it as I;16
    assert Image.open(path / "x.png").mode == "I;16"
    return path / "x.png", {(0, 0): 0, (8, 0): 128, (0, 8): 255, (8, 8): 64}


def _i32(path):
    # mode I (32-bit ints) holding 16-bit values, as TIFF scanners and older PIL write 16-bit photos
    a = np.array([[0, 257 * 128], [65535, 257 * 64]], dtype=np.int32).repeat(8, 0).repeat(8, 1)
    Image.fromarray(a, "I").save(path / "x.tif")
    assert Image.open(path / "x.tif").mode == "I"
    return path / "x.tif", {(0, 0): 0, (8, 0): 128, (0, 8): 255, (8, 8): 64}


def _i32_8bit(path):
    a = np.array([[0, 128], [255, 64]], dtype=np.int32).repeat(8, 0).repeat(8, 1)  # an 8-bit range in mode I
    Image.fromarray(a, "I").save(path / "x.tif")
    return path / "x.tif", {(0, 0): 0, (8, 0): 128, (0, 8): 255, (8, 8): 64}


def _float(path):
    a = np.array([[0.0, 0.5], [1.0, 0.25]], dtype=np.float32).repeat(8, 0).repeat(8, 1)  # floats in [0, 1]
    Image.fromarray(a, "F").save(path / "x.tif")
    assert Image.open(path / "x.tif").mode == "F"
    return path / "x.tif", {(0, 0): 0, (8, 0): 128, (0, 8): 255, (8, 8): 64}


def _palette(path):
    im = Image.new("P", (16, 16), 1)
    im.putpalette([0, 0, 0, 10, 200, 30, 250, 5, 5] + [0] * (3 * 253))
    im.paste(2, (8, 0, 16, 16))
    im.paste(0, (0, 8, 8, 16))
    im.save(path / "x.png", transparency=0)  # index 0 transparent -> white
    return path / "x.png", {(0, 0): (10, 200, 30), (8, 0): (250, 5, 5), (0, 8): 255}


def _la(path):
    a = np.zeros((16, 16, 2), np.uint8)
    a[..., 0] = 40
    a[:, :8, 1] = 255      # left: opaque gray 40
    a[:8, 8:, 1] = 0       # top right: transparent -> white
    a[8:, 8:, 1] = 128     # bottom right: half of 40, half of white
    Image.fromarray(a, "LA").save(path / "x.png")
    return path / "x.png", {(0, 0): 40, (8, 0): 255, (8, 8): round(40 * 128 / 255 + 255 * 127 / 255)}


def _bilevel(path):
    im = Image.new("1", (16, 16), 0)
    im.paste(1, (8, 0, 16, 16))
    im.save(path / "x.png")
    return path / "x.png", {(0, 0): 0, (8, 0): 255}


def _cmyk(path):
    im = Image.new("CMYK", (16, 16), (0, 255, 0, 0))  # magenta ink
    im.paste((0, 0, 0, 255), (8, 0, 16, 16))          # black ink
    im.save(path / "x.jpg", quality=100)
    return path / "x.jpg", {(0, 0): (255, 0, 255), (12, 4): 0}


def _rgba(path):
    a = np.zeros((16, 16, 4), np.uint8)
    a[:, :8] = (0, 0, 255, 255)     # opaque blue
    a[:8, 8:] = (255, 0, 0, 0)      # transparent red -> white
    a[8:, 8:] = (0, 0, 0, 128)      # half-transparent black over white
    Image.fromarray(a, "RGBA").save(path / "x.png")
    return path / "x.png", {(0, 0): (0, 0, 255), (8, 0): 255, (8, 8): round(255 * 127 / 255)}


@pytest.mark.parametrize("make", [_i16, _i32, _i32_8bit, _float, _palette, _la, _bilevel, _cmyk, _rgba],
                         ids=["I;16", "I-16bit", "I-8bit", "F", "P-transparency", "LA", "1", "CMYK", "RGBA"])
def test_every_mode_gives_the_right_rgb_pixels(tmp_path, make):
    path, want = make(tmp_path)
    got = pixels(load_rgb(path))
    for (x, y), value in want.items():
        value = (value,) * 3 if isinstance(value, int) else value
        tol = 2 if path.suffix == ".jpg" else 1  # JPEG's rounding; alpha compositing's
        assert np.abs(got[y, x] - value).max() <= tol, (x, y, got[y, x].tolist(), value)


# ---------------------------------------------------------------------------------------------- EXIF

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)
STORED = {"tl": RED, "tr": GREEN, "bl": BLUE, "br": WHITE}
# What a viewer shows in each quadrant, per EXIF orientation (the stored image turned by hand):
# 3 = turned 180°; 6 = stored sideways, turn 90° clockwise; 8 = turn 90° counter-clockwise.
SHOWN = {1: STORED,
         3: {"tl": WHITE, "tr": BLUE, "bl": GREEN, "br": RED},
         6: {"tl": BLUE, "tr": RED, "bl": WHITE, "br": GREEN},
         8: {"tl": GREEN, "tr": WHITE, "bl": RED, "br": BLUE}}


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_exif_orientation_is_applied_before_the_crop(tmp_path, orientation):
    """A phone photo stored landscape (480x320) in four coloured quadrants: after EXIF and the square center
    crop every quadrant must show the colour a viewer shows there. Colours differ in every quadrant, so
    ignoring EXIF or turning the wrong way fails."""
    w, h = 480, 320
    a = np.zeros((h, w, 3), np.uint8)
    a[:h // 2, :w // 2], a[:h // 2, w // 2:] = STORED["tl"], STORED["tr"]
    a[h // 2:, :w // 2], a[h // 2:, w // 2:] = STORED["bl"], STORED["br"]
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = orientation
    (tmp_path / "s").mkdir()
    im.save(tmp_path / "s" / "photo.jpg", exif=exif, quality=95)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one photo: the few-photos warning is tested below
        [out] = load_subject_images(tmp_path / "s", 64)
    got = pixels(out)
    for name, (x, y) in {"tl": (8, 8), "tr": (56, 8), "bl": (8, 56), "br": (56, 56)}.items():
        assert np.abs(got[y, x] - SHOWN[orientation][name]).max() <= 40, (orientation, name, got[y, x].tolist())


# ---------------------------------------------------------------------------------------------- warnings


def photos(folder: Path, n: int, size=300) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for k in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size + 10 * k, 3), dtype=np.uint8)).save(folder / f"{k}.png")
    return folder


def gif(path: Path, colours=((255, 0, 0), (0, 0, 255)), size=300):
    frames = [Image.new("RGB", (size, size), c) for c in colours]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return path


def load_warnings(folder, resolution=64):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = load_subject_images(folder, resolution)
    return images, [str(w.message) for w in caught]


@pytest.mark.parametrize("n", [1, 2, 3])
def test_fewer_than_three_photos_is_one_warning(tmp_path, n):
    images, said = load_warnings(photos(tmp_path / "s", n))
    assert len(images) == n
    if n < 3:
        assert len(said) == 1 and f"only {n} photo" in said[0] and "3-6 photos" in said[0], said
    else:
        assert said == []


def test_animated_gif_gives_its_first_frame_said_once(tmp_path):
    folder = photos(tmp_path / "s", 2)
    gif(folder / "a.gif")
    gif(folder / "b.gif", colours=((0, 255, 0), (255, 255, 255), (0, 0, 0)))
    images, said = load_warnings(folder)
    assert len(images) == 4
    assert (pixels(images[2]) == RED).all() and (pixels(images[3]) == GREEN).all()  # frame 0 of each
    animated = [s for s in said if "animated" in s]
    assert len(animated) == 1 and "a.gif, b.gif" in animated[0] and "first frame" in animated[0], said
    assert not [s for s in said if "only" in s]  # 4 photos


def test_cli_prints_each_warning_as_one_line(tmp_path):
    """Through a command as a user runs it: `warning: <message>`, no file:line, no UserWarning."""
    subject = photos(tmp_path / "toy", 1)
    gif(subject / "moving.gif")  # 2 photos, one animated
    clip, dino = make_tiny_clip(tmp_path / "clip"), make_tiny_dino(tmp_path / "dino")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "tinyrpo.evaluate", "--real", "--subject", str(subject),
                        "--class-noun", "toy", "--resolution", "32", "--eval-clip", str(clip), "--dino", str(dino),
                        "--out", str(tmp_path / "eval"), "--device", "cpu", "--no-progress"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert "UserWarning" not in r.stderr and ".py:" not in r.stderr, r.stderr
    said = [line for line in lines if line.startswith("warning: ")]
    assert len(said) == 2, r.stderr
    assert any("moving.gif" in s and "first frame" in s for s in said)
    assert any("only 2 photos" in s for s in said)
    assert len(lines) == 2, r.stderr  # nothing else: each warning is one line


def test_small_photos_warn_only_when_upsampled_a_lot(tmp_path):
    """64-px photos for a 512-px model are guesswork and say so; 32-px pictures for the 32-px toy world are not."""
    for i in range(3):
        Image.fromarray(np.full((64, 64, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_subject_images(tmp_path, 512)
    assert [str(w.message) for w in caught] == [
        f"{tmp_path / f'{i}.png'} is only 64x64 px; photos of at least 256 px on the short side give better results"
        for i in range(3)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_subject_images(tmp_path, 64)
    assert not caught


# ---------------------------------------------------------------------------------------------- odd files (issue 19)


def test_huge_photo_is_one_warning_in_our_words(tmp_path, monkeypatch):
    """Above Pillow's MAX_IMAGE_PIXELS (89 Mpx: a 10000x10000 photo) the photo is used, with one warning that
    says what to do instead of Pillow's "decompression bomb DOS attack"; above twice that it is refused."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)  # the same checks, on photos a test can afford
    folder = photos(tmp_path / "s", 3, size=90)
    Image.fromarray(np.full((120, 120, 3), 200, np.uint8)).save(folder / "huge.png")  # 14400 px: a warning
    images, said = load_warnings(folder)
    assert len(images) == 4 and (pixels(images[3]) == 200).all()  # still used
    assert said == [f"{folder / 'huge.png'} is 120x120 px (0 megapixels): decoding it takes seconds and gigabytes; "
                    "a copy downscaled to about 1024 px on the short side loads faster and gives the same crop"]
    Image.fromarray(np.full((150, 150, 3), 200, np.uint8)).save(folder / "huge.png")  # 22500 > 2 x 10000: refused
    with pytest.raises(UserError, match=r"huge.png has more than 0 megapixels, too many to open safely; use a copy "
                                        "downscaled"):
        load_warnings(folder)


def test_non_regular_photo_is_refused(tmp_path):
    folder = photos(tmp_path / "s", 3)
    os.mkfifo(folder / "3.png")
    with pytest.raises(UserError, match=r"the subject photo .*3.png is a named pipe \(FIFO\), not a regular file"):
        load_subject_images(folder, 64)


@pytest.mark.parametrize("content, says", [
    (b"a [V] {cls} on the moon\n\xff\xfe caf\xe9\n", "is not UTF-8 text (byte 0xff at offset 24); save it as UTF-8"),
    (b"\xef\xbb\xbfa [V] {cls}\n", None),  # UTF-8 with Notepad's byte-order mark: read, the mark dropped
])
def test_prompt_file_encoding(tmp_path, content, says):
    path = tmp_path / "prompts.txt"
    path.write_bytes(content)
    if says is None:
        assert read_prompt_file(path) == ["a {0} {1}"]
        return
    with pytest.raises(UserError, match=f"--prompts {re.escape(str(path))} {re.escape(says)}"):
        read_prompt_file(path)


def test_prompt_file_fifo_is_refused(tmp_path):
    os.mkfifo(tmp_path / "prompts.txt")
    with pytest.raises(UserError, match="--prompts .* is a named pipe"):
        read_prompt_file(tmp_path / "prompts.txt")


@pytest.mark.parametrize("content, says", [
    (b'{"class_noun": "caf\xe9"}', "is not UTF-8 text (byte 0xe9 at offset 19)"),
    (b'{"class_noun": toy}', "is not valid JSON (Expecting value: line 1 column 16"),
    (b'["toy"]', "is not a JSON object"),
    (None, "is a named pipe (FIFO), not a regular file"),
])
def test_subject_file_errors(tmp_path, content, says):
    path = tmp_path / "subject.json"
    if content is None:
        os.mkfifo(path)
    else:
        path.write_bytes(content)
    with pytest.raises(UserError) as e:
        read_subject_file(tmp_path)
    assert says in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value), e.value


@pytest.mark.parametrize("spec, says", [
    ("os:system", "must name a function of tinyrpo as module:function"),  # a downloaded folder runs no code
    ("tinyrpo.toy.metrics", "must name a function of tinyrpo as module:function"),
    ("tinyrpo.toy.nothing:f", "cannot be loaded (No module named 'tinyrpo.toy.nothing')"),
    ("tinyrpo.toy.metrics:nothing", "cannot be loaded"),
    ("tinyrpo.toy.metrics:EXACT_COLUMNS", "is not a function"),
])
def test_exact_metrics_hook_errors(tmp_path, spec, says):
    """subject.json's exact_metrics names the scorer by module:function; anything else is one line."""
    with pytest.raises(UserError) as e:
        exact_metrics_hook(spec, tmp_path / "subject.json")
    assert says in str(e.value) and "\n" not in str(e.value), e.value


def test_exact_metrics_hook_of_the_toy_subject():
    from tinyrpo.toy.metrics import exact_columns
    assert load_subject(ROOT / "refs" / "toy", resolution=32).exact_metrics is exact_columns


def test_a_mistyped_subject_folder_is_named_before_its_class(tmp_path):
    """Without --class-noun the class is looked up from the folder; a folder that is not there is the mistake."""
    from tinyrpo.data import resolve_class
    with pytest.raises(UserError, match="does not exist; pass --subject DIR"):
        resolve_class(tmp_path / "dgo", None)
    (tmp_path / "dog").mkdir()
    assert resolve_class(tmp_path / "dog", None) == "dog"
