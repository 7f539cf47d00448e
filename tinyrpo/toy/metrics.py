"""Exact metrics of the toy world: read a 32×32 picture back into the truth it shows, then score it.

A generated picture has no truth attached, but the world is simple enough to read back: every background
is constant along rows and objects keep away from the left and right edges, so

    background  the colour of each row, read at the four edge columns, is matched to every background's
                rows (in colour, and in grey for black-and-white pictures): the nearest one
    object      the pixels far from their row's colour, both as read at the edges and as that background's;
                the largest 4-connected blob after specks and seams are opened away; its box
    class       the class whose silhouette, drawn in that box, overlaps the blob best (IoU)
    colour      the named colour most of the blob's pixels are nearest to
    grey        black and white: under 2 % of the pixels have a colour (max - min channel >= 40)

and two scores follow from them:

    identity(image, thing)   the pattern score: which of the subject's visible cells show the pattern
                             colour and which the body colour, read in the found box, compared with the
                             subject's layout and chance-corrected against every other layout of as many
                             cells: 1 for any rendering of the subject, whatever its place, size or
                             background; 0 for a plain object or (on average) a random pattern in its
                             colours, and when no object is found. The body colour is scored apart
                             (`body_colour`): before, one cell score mixed both, and "sks toy is yellow"
                             alone earned 0.6 of it.
    fidelity(image, prompt)  the fraction of what the prompt asks that is there: background, object colour,
                             black and white (NaN when the prompt asks none of them, e.g. "a photo of sks toy").

`score_images` scores a list of images against their prompts and a subject; `quality` scores images of
prompts of the grammar (no subject) on background, colour and class.
"""
from collections import deque
from itertools import combinations
from dataclasses import dataclass

import numpy as np
import torch

from tinyrpo.toy.world import (BACKGROUNDS, CLASSES, MARGIN, PATTERN_COLOURS, SIZE, Thing,
                               background_rows, cell_of, luma, object_mask, parse, unit_coords, visible_cells)

FOREGROUND = 48.0   # RGB distance from the row's background above which a pixel belongs to the object
MIN_OBJECT = 20     # pixels: a smaller blob is noise, not an object
GREY_CHROMA = 40.0  # a pixel whose max - min channel difference is below this is grey ...
GREY_SHARE = 0.02   # ... and a picture with fewer coloured pixels than this share is black and white
EDGE_COLUMNS = [0, 1, SIZE - 2, SIZE - 1]  # never part of an object: the world keeps MARGIN = 2 pixels free
assert MARGIN >= 2

_NAMES = list(PATTERN_COLOURS)
_RGB = np.array([PATTERN_COLOURS[c] for c in _NAMES], np.float64)


def to_array(images) -> np.ndarray:
    """PIL images, a uint8 array [N, H, W, 3] or a float tensor [N, 3, H, W] in [0, 1] -> uint8 [N, 32, 32, 3].

    Pictures of another size are box-filtered to 32×32 (the metrics are defined on the world's grid).
    """
    if isinstance(images, torch.Tensor):
        x = images.detach().float().clamp(0, 1)
        if x.ndim == 3:
            x = x[None]
        if x.shape[-1] != SIZE:
            x = torch.nn.functional.adaptive_avg_pool2d(x, SIZE)
        return (x.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    if isinstance(images, np.ndarray):
        arr = images if images.ndim == 4 else images[None]
    else:
        images = [images] if hasattr(images, "convert") else list(images)
        arr = np.stack([np.asarray(im.convert("RGB")) for im in images]) if images else np.zeros((0, SIZE, SIZE, 3))
    if arr.shape[1:3] != (SIZE, SIZE):
        return to_array(torch.from_numpy(arr.astype(np.float32) / 255).permute(0, 3, 1, 2))
    return arr.astype(np.uint8)


def nearest_colour(rgb: np.ndarray) -> np.ndarray:
    """Index into PATTERN_COLOURS of the nearest colour of each RGB [..., 3]."""
    d = ((np.asarray(rgb, np.float64)[..., None, :] - _RGB) ** 2).sum(-1)
    return d.argmin(-1)


# ----------------------------------------------------------------------------------------------- reading

def edge_rows(img: np.ndarray) -> np.ndarray:
    """The background colour of each row, read where no object may be: float [SIZE, 3]."""
    return np.median(img[:, EDGE_COLUMNS].astype(np.float64), axis=1)


def is_grey(img: np.ndarray) -> bool:
    """Black and white: (almost) no pixel has a colour. (A picture of grey things is black and white too.)"""
    x = img.astype(np.float64)
    return float(((x.max(-1) - x.min(-1)) >= GREY_CHROMA).mean()) < GREY_SHARE


def nearest_background(img: np.ndarray) -> tuple[str, np.ndarray]:
    """(name, its rows) of the background whose rows, in colour or in grey, are nearest to the picture's
    edge rows: float [SIZE, 3], the grey version when that is the nearer one."""
    rows = edge_rows(img)
    best, found = np.inf, None
    for b in BACKGROUNDS:
        ref = background_rows(b).astype(np.float64)
        for cand in (ref, np.repeat(luma(ref)[:, None], 3, axis=1)):
            d = np.linalg.norm(rows - cand, axis=1).mean()
            if d < best:
                best, found = d, (b, cand)
    return found


def read_background(img: np.ndarray) -> str:
    return nearest_background(img)[0]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected set of True pixels (an all-False mask if none)."""
    seen = np.zeros_like(mask, bool)
    best = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, blob = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            blob.append((y, x))
            for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= yy < SIZE and 0 <= xx < SIZE and mask[yy, xx] and not seen[yy, xx]:
                    seen[yy, xx] = True
                    queue.append((yy, xx))
        if len(blob) > len(best):
            best = blob
    out = np.zeros_like(mask, bool)
    if best:
        out[tuple(np.array(best).T)] = True
    return out


@dataclass
class Found:
    mask: np.ndarray  # bool [SIZE, SIZE]: the object's pixels
    x: int            # its box
    y: int
    w: int
    h: int


def _neighbours(mask: np.ndarray) -> list[np.ndarray]:
    p = np.pad(mask, 1)
    return [p[1 + dy:1 + dy + SIZE, 1 + dx:1 + dx + SIZE] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]


def erode(mask: np.ndarray) -> np.ndarray:
    return np.logical_and.reduce(_neighbours(mask))


def dilate(mask: np.ndarray) -> np.ndarray:
    return np.logical_or.reduce(_neighbours(mask))


def find_object(img: np.ndarray, rows: np.ndarray | None = None) -> Found | None:
    """The object: the largest blob of pixels far from their row's background colour, or None.

    Far from both the colour read at the row's edges and the colour of the nearest background's row
    (`nearest_background`): a generated picture's background can be off the ideal colour, and its edges can
    be off the background's colour (a seam), but rarely both.
    """
    rows = nearest_background(img)[1] if rows is None else rows
    x = img.astype(np.float64)
    far = ((np.linalg.norm(x - rows[:, None, :], axis=-1) > FOREGROUND)
           & (np.linalg.norm(x - edge_rows(img)[:, None, :], axis=-1) > FOREGROUND))
    far[:, EDGE_COLUMNS] = False  # the edge columns are the background by construction
    # The largest blob once strips and specks under 3 pixels wide are opened away (3×3 erosion, then
    # dilation: a generated picture's noise, a bright seam along the border), grown back by 2 pixels
    # into the far pixels, so thin parts of the object itself (the cone's bottom corners) are kept.
    core = largest_component(dilate(erode(far)))
    blob = largest_component(far & dilate(dilate(core)))
    if blob.sum() < MIN_OBJECT:
        return None
    ys, xs = np.nonzero(blob)
    return Found(blob, int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1))


def read_class(found: Found) -> str:
    """The class whose silhouette in the found box overlaps the object best."""
    def iou(cls):
        t = object_mask(cls, found.x, found.y, found.w, found.h)
        return (t & found.mask).sum() / max((t | found.mask).sum(), 1)
    return max(CLASSES, key=iou)


def read_colour(img: np.ndarray, found: Found) -> str:
    """The colour (of PATTERN_COLOURS) most of the object's pixels are nearest to: its body colour."""
    counts = np.bincount(nearest_colour(img[found.mask]), minlength=len(_NAMES))
    return _NAMES[int(counts.argmax())]


@dataclass
class Reading:
    """What a picture shows, read back from its pixels (None where there is no object)."""
    background: str
    grey: bool
    cls: str | None
    colour: str | None
    found: Found | None


def read_picture(img: np.ndarray) -> Reading:
    background, rows = nearest_background(img)
    found = find_object(img, rows)
    return Reading(background, is_grey(img), read_class(found) if found else None,
                   read_colour(img, found) if found else None, found)


# ----------------------------------------------------------------------------------------------- scores

def read_cells(img: np.ndarray, thing: Thing, colour: str | None = None, found: Found | None = None) -> dict:
    """{visible cell: "pattern", "body" or None}: which of `thing`'s two colours each cell shows, read in the
    found box (None: neither, or no object found).

    Each cell is read as the mean of its inner pixels inside the thing's silhouette drawn in the found box;
    its nearest named colour is the pattern colour, the body colour (`colour` when the prompt re-colours the
    subject, "a red sks toy", else the thing's own) or another. In a black and white picture a cell is
    whichever of the two its grey level is nearer.
    """
    cells_seen = visible_cells(thing.cls)
    found = find_object(img) if found is None else found
    if found is None:
        return dict.fromkeys(cells_seen)
    body = colour or thing.colour
    u, v = unit_coords(found.x, found.y, found.w, found.h)
    inner = (np.abs((3 * u) % 1 - 0.5) < 0.35) & (np.abs((3 * v) % 1 - 0.5) < 0.35)
    inside = object_mask(thing.cls, found.x, found.y, found.w, found.h)
    cells = cell_of(u, v)
    grey = is_grey(img)
    out = {}
    for c in cells_seen:
        pick = inside & (cells == c)
        pixels = img[pick & inner] if (pick & inner).any() else img[pick]
        if len(pixels) == 0:
            out[c] = None
            continue
        mean = pixels.astype(np.float64).mean(0)
        if grey:
            lp, lb, lc = luma(PATTERN_COLOURS[thing.pattern_colour]), luma(PATTERN_COLOURS[body]), luma(mean)
            out[c] = "pattern" if abs(lc - lp) < abs(lc - lb) else "body"
        else:
            name = _NAMES[int(nearest_colour(mean))]
            out[c] = "pattern" if name == thing.pattern_colour else "body" if name == body else None
    return out


def agreement(cells: dict, layout: tuple) -> float:
    """The share of the visible cells that show what a thing with pattern `layout` shows there."""
    return float(np.mean([r == ("pattern" if c in layout else "body") for c, r in cells.items()]))


def chance_corrected(cells: dict, pattern: tuple) -> float:
    """(agreement with `pattern` − its mean agreement with every other layout of as many cells), divided by
    the same for the exact rendering: 1 for the thing itself, 0 for a plain object in its colours (it agrees
    with every layout alike) and, averaged over all layouts, for a randomly patterned one (exactly: the
    other layouts of the toy's 3 of 8 cells average −1/55). NaN for a pattern with no other layout."""
    others = [L for L in combinations(sorted(cells), len(pattern)) if L != tuple(pattern)]
    if not others:
        return float("nan")
    exact = {c: "pattern" if c in pattern else "body" for c in cells}
    gain = agreement(cells, pattern) - np.mean([agreement(cells, L) for L in others])
    return float(gain / (1 - np.mean([agreement(exact, L) for L in others])))


def identity(img: np.ndarray, thing: Thing, colour: str | None = None, found: Found | None = None) -> float:
    """The pattern score: how much more the picture's cells agree with `thing`'s layout than with any other
    layout of as many cells (`chance_corrected`); 0 when no object is found. Body colour is left out on
    purpose: a plain yellow teddy agreed with 62 % of the teddy's cells, the base model's "yellow toy" 58 %."""
    cells = read_cells(img, thing, colour, found)
    return 0.0 if all(r is None for r in cells.values()) else chance_corrected(cells, thing.pattern)


def body_colour(reading: Reading, thing: Thing, colour: str | None = None) -> float:
    """1 if the object's colour as read (most of its pixels) is the subject's, or the one the prompt asks;
    NaN in black and white."""
    if reading.grey:
        return float("nan")
    return float(reading.colour == (colour or thing.colour))


def fidelity_checks(reading: Reading, asks: dict) -> dict:
    """{check: right?} for what the prompt asks: background, colour (not in black and white), bw."""
    checks = {}
    if asks["background"] is not None:
        checks["background"] = reading.background == asks["background"]
    if asks["colour"] is not None and not asks["bw"]:
        checks["colour"] = reading.colour == asks["colour"]
    if asks["bw"]:
        checks["bw"] = reading.grey
    return checks


def fidelity(img: np.ndarray, prompt: str, token: str | None = None) -> float:
    """The fraction of what `prompt` asks for (background, object colour, black and white) that the picture
    shows; NaN if it asks none of them."""
    checks = fidelity_checks(read_picture(img), parse(prompt, token))
    return float(np.mean(list(checks.values()))) if checks else float("nan")


@dataclass(frozen=True)
class SubjectTruth:
    """What the exact metrics need to know about a subject (subject.json's "toy" entry)."""
    thing: Thing
    background: str  # the background every reference picture shares (the paper's "sofa")

    @classmethod
    def from_json(cls, d: dict) -> "SubjectTruth":
        return cls(Thing(d["class"], d["colour"], tuple(d["pattern"]), d["pattern_colour"]), d["background"])

    def to_json(self) -> dict:
        t = self.thing
        return {"class": t.cls, "colour": t.colour, "pattern": list(t.pattern), "pattern_colour": t.pattern_colour,
                "background": self.background}


def subject_truth(meta: dict) -> SubjectTruth | None:
    """The truth of a toy subject from its subject.json (tinyrpo.data.Subject.meta); None for other subjects."""
    return SubjectTruth.from_json(meta["toy"]) if isinstance(meta.get("toy"), dict) else None


def _nanmean(values) -> float:
    values = [v for v in values if v == v]
    return float(np.mean(values)) if values else float("nan")


def score_images(images, prompts: list[str], subject: SubjectTruth, token: str = "sks") -> dict:
    """Exact metrics of generated images of a subject, each with the prompt it was made from.

    Returns the means {"identity", "body", "fidelity", "background", "colour", "bw", "class", "leak"} (a check a
    prompt does not ask is left out of its mean; NaN if no prompt asks it) and "per_image": one dict per
    image. "leak": how often the background is the references' one when the prompt asks another (the
    overfitting RPO's early stopping guards against).
    """
    arr = to_array(images)
    if len(arr) != len(prompts):
        raise ValueError(f"{len(arr)} images but {len(prompts)} prompts")
    rows = []
    for img, prompt in zip(arr, prompts):
        asks = parse(prompt, token)
        reading = read_picture(img)
        checks = fidelity_checks(reading, asks)
        row = {"prompt": prompt, "identity": identity(img, subject.thing, asks["colour"], reading.found),
               "body": body_colour(reading, subject.thing, asks["colour"]),
               "fidelity": float(np.mean(list(checks.values()))) if checks else float("nan"),
               "background_read": reading.background, "colour_read": reading.colour, "class_read": reading.cls,
               "class": float(reading.cls == subject.thing.cls)}
        row.update({k: float(v) for k, v in checks.items()})
        asked_bg = asks["background"]
        row["leak"] = (float(reading.background == subject.background)
                       if asked_bg is not None and asked_bg != subject.background else float("nan"))
        rows.append(row)
    means = {k: _nanmean([r.get(k, float("nan")) for r in rows])
             for k in ("identity", "body", "fidelity", "background", "colour", "bw", "class", "leak")}
    return {**means, "per_image": rows}


EXACT_COLUMNS = ("identity", "body", "fidelity", "leak")


def exact_columns(meta: dict, images, prompts: list[str], token: str = "sks") -> dict[str, torch.Tensor]:
    """tinyrpo.evaluate's extra columns for a toy subject: {name: float tensor [N]} of EXACT_COLUMNS, NaN
    where a prompt does not ask what a column checks; {} when the subject is not a toy one."""
    truth = subject_truth(meta)
    if truth is None:
        return {}
    rows = score_images(images, prompts, truth, token)["per_image"]
    return {k: torch.tensor([r[k] for r in rows], dtype=torch.float64) for k in EXACT_COLUMNS}


def quality(images, prompts: list[str]) -> dict:
    """How often pictures of grammar prompts (no subject) show the asked background, colour and class:
    {"background", "colour", "class"} accuracies, each over the prompts that ask it, and "n"."""
    arr = to_array(images)
    hits = {"background": [], "colour": [], "class": []}
    for img, prompt in zip(arr, prompts):
        asks, reading = parse(prompt), read_picture(img)
        for key, got in (("background", reading.background), ("colour", reading.colour), ("class", reading.cls)):
            if asks[key] is not None and not (key == "colour" and asks["bw"]):
                hits[key].append(got == asks[key])
    return {**{k: float(np.mean(v)) if v else float("nan") for k, v in hits.items()}, "n": len(arr)}
