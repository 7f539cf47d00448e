"""The subject: reference photos, class noun and prompt set, checked the way a user needs them checked.

A subject folder may hold a `subject.json` (the toy subjects do, see tinyrpo/toy/subjects.py) with any of
    {"class_noun": "toy", "live": false,
     "train_prompts": ["a {0} {1} on the moon", ...], "eval_prompts": [...],
     "exact_metrics": "tinyrpo.toy.metrics:exact_columns"}
({0} the token, {1} the class noun, as in tinyrpo.dreambench); flags given explicitly win over it.
"exact_metrics" names a function of tinyrpo's own, `f(meta, images, prompts, token) -> {name: float tensor
[N]}` (meta: the whole subject.json; NaN where a prompt does not ask what a column checks), for a subject
whose images can be scored exactly: the toy world's, whose truth is in its subject.json. The trainer logs
its means at every validation and tinyrpo.evaluate reports it beside DINO and CLIP, without either of them
knowing the world it comes from.
"""
import importlib
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from tinyrpo import dreambench
from tinyrpo.cli import check_input
from tinyrpo.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
MIN_SIDE = 256  # below this the photo is upsampled a lot and the subject's details are guesswork
MIN_PHOTOS = 3  # DreamBooth's and RPO's subjects have 3-6; with fewer, a warning


def _gray_range(mode: str, a: np.ndarray) -> float:
    """The white level of a one-channel image that is not 8-bit. "I;16*" is 16-bit by definition; "I"
    (32-bit ints) and "F" (floats) carry no range, so take the smallest usual one that holds the data:
    [0, 1] (floats), 8-bit, 16-bit (a 16-bit PNG or TIFF opened as "I"), else the image's own maximum."""
    if mode.startswith("I;16"):
        return 65535.0
    top = float(a.max(initial=0))
    for white in ((1.0,) if mode == "F" else ()) + (255.0, 65535.0):
        if top <= white:
            return white
    return top


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Transparency (RGBA, LA, P or L with a transparent colour) is composited on
    white rather than the black PIL would give; 16-bit, 32-bit and float grayscale are scaled to 8 bits
    (PIL's own convert clips them, so a 16-bit photo comes out almost all white)."""
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        a = np.asarray(im).astype(np.float64)
        gray = Image.fromarray(np.clip(np.rint(a / _gray_range(im.mode, a) * 255), 0, 255).astype(np.uint8))
        key = im.info.get("transparency")
        if isinstance(key, int):  # a 16-bit PNG's tRNS: one gray value means transparent
            gray.paste(255, mask=Image.fromarray((np.asarray(im) == key).astype(np.uint8) * 255))
        return gray.convert("RGB")
    if "A" in im.getbands() or "a" in im.getbands() or "transparency" in im.info:
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, RGB


def open_huge(path: Path) -> Image.Image:
    """Image.open, with Pillow's "decompression bomb DOS attack" warning and error in tinyrpo's words: a photo
    above Pillow's limit (MAX_IMAGE_PIXELS, 89 megapixels) is still used, with a warning that it is slow;
    one above twice the limit, which Pillow refuses to open, is a UserError."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            im = Image.open(path)
    except Image.DecompressionBombError:
        raise UserError(f"{path} has more than {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels, too many to open "
                        "safely; use a copy downscaled to about 1024 px on the short side") from None
    for w in caught:
        if issubclass(w.category, Image.DecompressionBombWarning):
            warnings.warn(f"{path} is {im.size[0]}x{im.size[1]} px ({im.size[0] * im.size[1] / 1e6:.0f} megapixels): "
                          "decoding it takes seconds and gigabytes; a copy downscaled to about 1024 px on the short "
                          "side loads faster and gives the same crop")
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return im


def open_photo(path: Path) -> tuple[Image.Image, int]:
    """(the image as RGB with its EXIF orientation applied, its number of frames). Phones store photos
    sideways and say so in EXIF; an animation (GIF, APNG, WebP) gives its first frame."""
    with open_huge(path) as im:
        frames = getattr(im, "n_frames", 1)
        im.seek(0)
        return to_rgb(ImageOps.exif_transpose(im)), frames


def load_rgb(path: Path) -> Image.Image:
    """Open an image as RGB with its EXIF orientation applied (the first frame of an animation)."""
    return open_photo(path)[0]


def center_crop_resize(im: Image.Image, size: int) -> Image.Image:
    """Resize the short side to `size` (bicubic), then center-crop a square. No flips: the subject's
    left/right asymmetries (a logo, a patch of fur) are part of its identity."""
    w, h = im.size
    s = size / min(w, h)
    im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return im.crop((left, top, left + size, top + size))


def to_tensor(im: Image.Image) -> torch.Tensor:
    """PIL RGB -> float tensor [3, H, W] in [-1, 1] (the VAE's input range)."""
    x = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()) / 127.5 - 1.0
    return x.permute(2, 0, 1)


def check_subject_folder(folder) -> Path:
    folder = Path(folder)
    if not folder.exists():
        raise UserError(f"subject folder {folder} does not exist; pass --subject DIR with 3-6 photos of your subject")
    if not folder.is_dir():
        raise UserError(f"--subject {folder} is a file, not a folder; put the photos in a folder and pass that folder")
    return folder


def load_subject_images(folder, resolution: int = 512) -> list[Image.Image]:
    """All readable images of a subject folder, resized and center-cropped to `resolution`.

    Unreadable files among good ones are skipped with a warning; a folder with none is an error.
    """
    folder = check_subject_folder(folder)
    files = sorted(p for p in folder.iterdir() if not p.is_dir() and not p.name.startswith("."))
    for p in files:
        check_input(p, "the subject photo")
    files = [p for p in files if p.is_file()]  # a dangling link is no photo
    if not files:
        raise UserError(f"subject folder {folder} is empty; put 3-6 photos (jpg/png/webp) of your subject in it")
    images, animated = [], []
    for p in files:
        try:
            im, frames = open_photo(p)
        except (UnidentifiedImageError, OSError, ValueError) as e:
            if p.suffix.lower() in IMAGE_SUFFIXES:
                warnings.warn(f"skipping {p}: not a readable image ({e.__class__.__name__})")
            continue
        if frames > 1:
            animated.append(p.name)
        if min(im.size) < min(MIN_SIDE, resolution):  # a 32-px picture for the 32-px toy world is no upsampling
            warnings.warn(f"{p} is only {im.size[0]}x{im.size[1]} px; photos of at least "
                          f"{min(MIN_SIDE, resolution)} px on the short side give better results")
        images.append(center_crop_resize(im, resolution))
    if not images:
        raise UserError(f"no readable image in {folder} (looked at {len(files)} files); "
                        f"put jpg/png/webp photos of your subject there")
    if animated:
        warnings.warn(f"{', '.join(animated)} in {folder} {'is' if len(animated) == 1 else 'are'} animated: "
                      f"the first frame is used")
    if len(images) < MIN_PHOTOS:
        warnings.warn(f"only {len(images)} photo{'s' if len(images) > 1 else ''} of the subject in {folder}; "
                      f"3-6 photos from different angles and backgrounds keep the model from copying one photo")
    return images


SUBJECT_FILE = "subject.json"


def read_subject_file(folder) -> dict:
    """The folder's subject.json, checked; {} when there is none."""
    path = Path(folder) / SUBJECT_FILE
    if not path.exists():
        return {}
    check_input(path, "the subject file")
    if path.is_dir():
        raise UserError(f"{path} is a folder; a subject's {SUBJECT_FILE} is a JSON file: remove the folder")
    try:
        meta = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); save it "
                        "as UTF-8 JSON, or delete it") from None
    except ValueError as e:  # json.JSONDecodeError
        raise UserError(f"{path} is not valid JSON ({e}); fix it or delete it") from None
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror}); fix it or delete it") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path} is not a JSON object ({{...}}); fix it or delete it")
    kinds = {"class_noun": str, "live": bool, "train_prompts": list, "eval_prompts": list, "exact_metrics": str}
    bad = [k for k, kind in kinds.items() if k in meta and not isinstance(meta[k], kind)]
    bad += [k for k in ("train_prompts", "eval_prompts") if k in meta and k not in bad
            and not (meta[k] and all(isinstance(t, str) and "{0}" in t for t in meta[k]))]
    if bad:
        raise UserError(f"{path}: {bad[0]} is not valid (class_noun: a string, live: true/false, *_prompts: "
                        "lists of prompts with {0} for the token, exact_metrics: module:function); fix it or "
                        "delete it")
    return meta


def exact_metrics_hook(spec: str, path) -> Callable:
    """subject.json's "exact_metrics", "module:function", as the function it names."""
    module, _, name = spec.partition(":")
    # tinyrpo's own modules only: a subject folder is data, often downloaded, and must not make train.py
    # import (run) code of its choosing.
    if module.split(".")[0] != "tinyrpo" or not name:
        raise UserError(f"{path}: exact_metrics must name a function of tinyrpo as module:function, e.g. "
                        f"tinyrpo.toy.metrics:exact_columns (got {spec!r}); fix it or delete it")
    try:
        hook = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"{path}: exact_metrics {spec!r} cannot be loaded ({e}); fix it or delete it") from None
    if not callable(hook):
        raise UserError(f"{path}: exact_metrics {spec!r} is not a function; fix it or delete it")
    return hook


@dataclass
class Subject:
    name: str                 # folder name, e.g. "dog"
    token: str                # the identifier, e.g. "sks"
    class_noun: str           # e.g. "dog"
    live: bool                # live subjects (dogs, cats) get the live prompt sets
    images: list              # PIL images at the training resolution
    train_prompts: list | None = None  # templates from subject.json, else the trainer's (DreamBench) defaults
    eval_prompts: list | None = None
    meta: dict = field(default_factory=dict)  # the whole subject.json
    exact_metrics: Callable | None = None  # subject.json's scorer, f(meta, images, prompts, token) (see above)

    def prompt(self, template: str) -> str:
        return template.format(self.token, self.class_noun)

    @property
    def reference_prompt(self) -> str:
        return self.prompt(dreambench.REFERENCE_PROMPT)


def resolve_class(folder, class_noun: str | None) -> str:
    """The class noun: given, else the folder's subject.json's, else looked up for a DreamBench folder name."""
    if class_noun:
        return class_noun.strip()
    check_subject_folder(folder)  # a mistyped folder is named as such, not as an unknown class
    from_file = read_subject_file(folder).get("class_noun")
    if from_file:
        return from_file.strip()
    name = Path(folder).name
    if name in dreambench.SUBJECT_CLASSES:
        return dreambench.SUBJECT_CLASSES[name]
    raise UserError(f"don't know what kind of thing '{name}' is; pass --class-noun, e.g. --class-noun dog "
                    f"(the word the base model knows for your subject's class)")


def load_subject(folder, token: str = "sks", class_noun: str | None = None, live: bool | None = None,
                 resolution: int = 512) -> Subject:
    cls = resolve_class(folder, class_noun)
    if not token or any(c.isspace() for c in token):
        raise UserError(f"--token must be one word (got {token!r}); the default 'sks' is a rare token")
    meta = read_subject_file(folder)
    images = load_subject_images(folder, resolution)
    live = meta.get("live", dreambench.is_live(cls)) if live is None else live
    hook = exact_metrics_hook(meta["exact_metrics"], Path(folder) / SUBJECT_FILE) if "exact_metrics" in meta else None
    return Subject(Path(folder).name, token, cls, live, images, meta.get("train_prompts"), meta.get("eval_prompts"),
                   meta, hook)


def read_prompt_file(path) -> list[str]:
    """One training prompt per line (UTF-8); `[V]` (or `{0}`) is the token, `{cls}` (or `{1}`) the class noun."""
    check_input(path, "--prompts")
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()  # -sig: Notepad's BOM is no prompt
    except UnicodeDecodeError as e:
        raise UserError(f"--prompts {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                        "save it as UTF-8 (or pass a text file of prompts, one per line)") from None
    except OSError as e:
        raise UserError(f"cannot read --prompts {path}: {e.strerror}") from None
    templates = [ln.strip().replace("[V]", "{0}").replace("{cls}", "{1}") for ln in lines]
    templates = [t for t in templates if t and not t.startswith("#")]
    if not templates:
        raise UserError(f"--prompts {path} has no prompts (one per line, e.g. 'a [V] {{cls}} on the Moon')")
    return templates
