"""The subject: reference photos, class noun and prompt set, checked the way a user needs them checked."""
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from tinyrpo import dreambench
from tinyrpo.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
MIN_SIDE = 256  # below this the photo is upsampled a lot and the subject's details are guesswork


def load_rgb(path: Path) -> Image.Image:
    """Open an image as RGB with its EXIF orientation applied (phones store photos sideways)."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
            # composite transparency on white rather than the black PIL would give
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, im)
        return im.convert("RGB")


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


def load_subject_images(folder, resolution: int = 512) -> list[Image.Image]:
    """All readable images of a subject folder, resized and center-cropped to `resolution`.

    Unreadable files among good ones are skipped with a warning; a folder with none is an error.
    """
    folder = Path(folder)
    if not folder.exists():
        raise UserError(f"subject folder {folder} does not exist; pass --subject DIR with 3-6 photos of your subject")
    if not folder.is_dir():
        raise UserError(f"--subject {folder} is a file, not a folder; put the photos in a folder and pass that folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise UserError(f"subject folder {folder} is empty; put 3-6 photos (jpg/png/webp) of your subject in it")
    images = []
    for p in files:
        try:
            im = load_rgb(p)
        except (UnidentifiedImageError, OSError, ValueError) as e:
            if p.suffix.lower() in IMAGE_SUFFIXES:
                warnings.warn(f"skipping {p}: not a readable image ({e.__class__.__name__})")
            continue
        if min(im.size) < MIN_SIDE:
            warnings.warn(f"{p} is only {im.size[0]}x{im.size[1]} px; photos of at least {MIN_SIDE} px "
                          f"on the short side give better results")
        images.append(center_crop_resize(im, resolution))
    if not images:
        raise UserError(f"no readable image in {folder} (looked at {len(files)} files); "
                        f"put jpg/png/webp photos of your subject there")
    return images


@dataclass
class Subject:
    name: str                 # folder name, e.g. "dog"
    token: str                # the identifier, e.g. "sks"
    class_noun: str           # e.g. "dog"
    live: bool                # live subjects (dogs, cats) get the live prompt sets
    images: list              # PIL images at the training resolution

    def prompt(self, template: str) -> str:
        return template.format(self.token, self.class_noun)

    @property
    def reference_prompt(self) -> str:
        return self.prompt(dreambench.REFERENCE_PROMPT)


def resolve_class(folder, class_noun: str | None) -> str:
    """The class noun: given, or looked up for a DreamBench subject folder name."""
    if class_noun:
        return class_noun.strip()
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
    images = load_subject_images(folder, resolution)
    return Subject(Path(folder).name, token, cls, dreambench.is_live(cls) if live is None else live, images)
