"""The toy world: 32×32 pictures of one patterned object on a named background, with captions and exact truth.

Every picture is drawn from a `Picture`, the whole truth about it:

    thing       an object instance: class (toy, ball, box, cone), body colour, pattern (which cells of a
                3×3 grid over the object carry the pattern colour) and pattern colour
    x, y, size  where the object is (its square bounding box, in pixels)
    background  a colour ("on a red background") or a scene ("on the beach": sky above, sand below)
    bw          the style word: "in black and white" (the whole picture in grey levels)

Captions come from a small grammar and read like DreamBench prompts: "a red toy on a blue background",
"a photo of a ball on the beach", "a cone in the snow in black and white". Patterns are never named: like
the details that make a real subject itself, they can only be learned from pictures. The subject
(`tinyrpo/toy/subjects.py`) is one pattern that never appears in the pretraining data.

Everything is drawn from numpy generators seeded by (seed, index), so picture i of a data set is the same
whatever else is drawn, and the same on every machine. Backgrounds are constant along each row and objects
keep a 2-pixel margin, which is what lets `tinyrpo/toy/metrics.py` read every picture back exactly.
"""
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np

SIZE = 32        # pictures are SIZE × SIZE RGB
MARGIN = 2       # no object comes closer than this to an edge (the metrics read the background there)
SIZES = (14, 22)  # object side in pixels, inclusive: cells of 4.7-7.3 px, at least one 4-px VAE latent each

# The named colours: an object's body colour, and "on a {colour} background".
COLOURS = {"red": (210, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220),
           "yellow": (235, 205, 40), "purple": (140, 60, 180), "white": (235, 235, 235)}
# Pattern colours: the named ones and black, which no caption ever says.
PATTERN_COLOURS = {**COLOURS, "black": (20, 20, 20)}
CLASSES = ("toy", "ball", "box", "cone")
STYLE = "in black and white"
FILLERS = ("cute", "nice", "old", "new")  # words with no visual effect, as web captions have plenty of


@dataclass(frozen=True)
class Background:
    name: str
    phrase: str   # how captions say it
    bands: tuple  # ((first row, rgb), ...), top to bottom: every row is one colour


# Scenes: a horizon at a fixed row, two colours none of which is a named colour.
SCENES = (
    Background("beach", "on the beach", ((0, (120, 190, 235)), (16, (225, 195, 140)))),   # sky, sand
    Background("snow", "in the snow", ((0, (150, 160, 175)), (18, (245, 248, 255)))),     # grey sky, snow
    Background("moon", "on the moon", ((0, (45, 45, 90)), (20, (125, 125, 125)))),        # night sky, dust
    Background("sofa", "on a sofa", ((0, (45, 125, 125)), (14, (25, 85, 90)))),           # teal back, seat
    Background("floor", "on a wooden floor", ((0, (200, 170, 130)), (18, (130, 80, 40)))),  # wall, boards
)
BACKGROUNDS = {b.name: b for b in
               [Background(c, f"on a {c} background", ((0, rgb),)) for c, rgb in COLOURS.items()] + list(SCENES)}


def background_rows(name: str) -> np.ndarray:
    """The colour of each row of background `name`: uint8 [SIZE, 3]."""
    rows = np.zeros((SIZE, 3), np.uint8)
    for first, rgb in BACKGROUNDS[name].bands:
        rows[first:] = rgb
    return rows


def in_pattern(cells: np.ndarray, pattern: tuple) -> np.ndarray:
    """bool: which entries of a cell-index array are pattern cells (-1, outside any cell, never is)."""
    lut = np.zeros(10, bool)
    lut[list(pattern)] = True
    return lut[cells]


# ----------------------------------------------------------------------------------------------- objects

def silhouette(cls: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Is the point (u, v) of the unit square (u right, v down) inside an object of class `cls`?

    Every row and column of the square holds part of the shape, so an object's bounding box is its square.
    """
    if cls == "box":
        return np.ones_like(u, bool)
    if cls == "ball":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    if cls == "cone":  # a trapezoid, 0.2 wide at the top, full width at the bottom
        return np.abs(u - 0.5) <= 0.1 + 0.4 * v
    if cls == "toy":  # a teddy: a body and two ears with a notch between them
        return (v >= 0.35) | (u < 0.3) | (u > 0.7)
    raise ValueError(f"unknown class {cls!r}")


def cell_of(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Index 0..8 (row-major) of the 3×3 pattern cell holding (u, v)."""
    return 3 * np.clip((3 * v).astype(int), 0, 2) + np.clip((3 * u).astype(int), 0, 2)


@lru_cache(maxsize=None)
def visible_cells(cls: str) -> tuple:
    """The cells whose centre lies inside the class's silhouette (the toy's cell 1 is the notch)."""
    c = (np.arange(3) + 0.5) / 3
    v, u = np.meshgrid(c, c, indexing="ij")
    return tuple(int(i) for i in np.flatnonzero(silhouette(cls, u.ravel(), v.ravel())))


@dataclass(frozen=True)
class Thing:
    """An object instance. `pattern`: sorted cells in the pattern colour; the rest of the body is `colour`."""
    cls: str
    colour: str
    pattern: tuple
    pattern_colour: str


@dataclass(frozen=True)
class Picture:
    thing: Thing
    x: int
    y: int
    size: int
    background: str
    bw: bool = False


def unit_coords(x: int, y: int, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (u, v) of the whole image relative to the box at (x, y) of size w × h."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    return (xx + 0.5 - x) / w, (yy + 0.5 - y) / h


@lru_cache(maxsize=None)
def shape(cls: str, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """(bool [h, w] silhouette, int [h, w] cell index) of an object of class `cls` filling a w × h box."""
    v, u = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
    return silhouette(cls, u, v), cell_of(u, v)


def object_mask(cls: str, x: int, y: int, w: int, h: int | None = None) -> np.ndarray:
    """bool [SIZE, SIZE]: the pixels an object of class `cls` with box (x, y, w, h) covers."""
    h = w if h is None else h
    mask = np.zeros((SIZE, SIZE), bool)
    mask[y:y + h, x:x + w] = shape(cls, w, h)[0]
    return mask


def cell_map(x: int, y: int, w: int, h: int) -> np.ndarray:
    """int [SIZE, SIZE]: the pattern cell of each pixel of the box (x, y, w, h); -1 outside it."""
    cells = np.full((SIZE, SIZE), -1)
    cells[y:y + h, x:x + w] = shape("box", w, h)[1]
    return cells


def luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of uint8 / float RGB [..., 3] (what "black and white" keeps)."""
    return np.asarray(rgb, np.float64) @ np.array([0.299, 0.587, 0.114])


def grey(img: np.ndarray) -> np.ndarray:
    """A uint8 RGB picture in black and white (its luma in all three channels)."""
    return np.repeat(np.round(luma(img)).astype(np.uint8)[..., None], 3, axis=-1)


def render_background(name: str, bw: bool = False) -> np.ndarray:
    """The background alone: uint8 [SIZE, SIZE, 3] (a new array)."""
    return _background(name, bw).copy()


@lru_cache(maxsize=None)
def _background(name: str, bw: bool) -> np.ndarray:
    img = np.repeat(background_rows(name)[:, None, :], SIZE, axis=1)
    return grey(img) if bw else img


def render(p: Picture) -> np.ndarray:
    """The picture: uint8 [SIZE, SIZE, 3]."""
    img = render_background(p.background)
    t = p.thing
    mask, cells = shape(t.cls, p.size, p.size)
    box = img[p.y:p.y + p.size, p.x:p.x + p.size]  # a view: drawing into it draws into img
    box[mask] = COLOURS[t.colour]
    box[mask & in_pattern(cells, t.pattern)] = PATTERN_COLOURS[t.pattern_colour]
    return grey(img) if p.bw else img


# ----------------------------------------------------------------------------------------------- captions

def caption(p: Picture, rng: np.random.Generator) -> str:
    """A caption that says some of the truth: always the class, often the colour and the background,
    always the style; the pattern never. E.g. "a photo of a cute red toy on the beach in black and white"."""
    words = ["a photo of a" if rng.random() < 0.15 else "a"]
    if rng.random() < 0.1:
        words.append(FILLERS[rng.integers(len(FILLERS))])
    if rng.random() < 0.8:
        words.append(p.thing.colour)
    words.append(p.thing.cls)
    if rng.random() < 0.85:
        words.append(BACKGROUNDS[p.background].phrase)
    if p.bw:
        words.append(STYLE)
    return " ".join(words)


def parse(prompt: str, token: str | None = None) -> dict:
    """What a prompt of the grammar asks for: {"class", "colour", "background", "bw"} (None / False if unsaid).

    The subject token, fillers and "a photo of" are ignored: "a red sks toy on the beach" ->
    {"class": "toy", "colour": "red", "background": "beach", "bw": False}.
    """
    text = " " + " ".join(w for w in prompt.lower().split() if w != token) + " "
    asks = {"class": None, "colour": None, "background": None, "bw": f" {STYLE} " in text}
    text = text.replace(f" {STYLE} ", " ")
    for b in BACKGROUNDS.values():
        if f" {b.phrase} " in text:
            asks["background"] = b.name
            text = text.replace(f" {b.phrase} ", " ")
    words = text.split()
    for i, w in enumerate(words):
        if w in CLASSES and asks["class"] is None:
            asks["class"] = w
            asks["colour"] = next((c for c in words[:i] if c in COLOURS), None)
    return asks


# ----------------------------------------------------------------------------------------------- sampling

SEPARATION = 60.0  # every object pixel is at least this far (RGB) from the background behind it


def allowed(p: Picture) -> bool:
    """The world's rules: the body colour is the object's majority colour, and every pixel of the object
    (pattern cells too, and in grey for a black and white picture) stands out from the background."""
    t = p.thing
    if t.colour == t.pattern_colour or (p.background == "snow" and t.colour == "white"):
        return False
    mask, cells = shape(t.cls, p.size, p.size)
    if (mask & in_pattern(cells, t.pattern)).sum() >= 0.45 * mask.sum():
        return False
    img, bg = render(p).astype(np.float64), render_background(p.background, p.bw).astype(np.float64)
    return bool(np.linalg.norm(img - bg, axis=-1)[object_mask(t.cls, p.x, p.y, p.size)].min() >= SEPARATION)


@dataclass(frozen=True)
class WorldRules:
    """What pretraining may contain: held-out (class, colour, background) triples (the quality test's
    prompts) and held-out patterns (the subjects')."""
    held_out_patterns: tuple = ()
    held_out_triples: frozenset = frozenset()
    p_bw: float = 0.1

    def admits(self, p: Picture) -> bool:
        return (p.thing.pattern not in self.held_out_patterns
                and (p.thing.cls, p.thing.colour, p.background) not in self.held_out_triples and allowed(p))


def held_out_triples() -> frozenset:
    """About one (class, colour, background) triple in nine, by a fixed rule; never in the pretraining data."""
    names = list(BACKGROUNDS)
    return frozenset((k, c, b) for i, k in enumerate(CLASSES) for j, c in enumerate(COLOURS)
                     for m, b in enumerate(names) if (i + 2 * j + 3 * m) % 9 == 4
                     and allowed(Picture(Thing(k, c, (), "black"), MARGIN, MARGIN, SIZES[1], b)))


def random_pattern(rng: np.random.Generator, cls: str) -> tuple:
    """0-3 distinct visible cells (0 with probability 0.1; at most 2 on the cone, which shows only 5)."""
    cells = visible_cells(cls)
    n = min(rng.choice(4, p=[0.1, 0.2, 0.3, 0.4]), (len(cells) - 1) // 2)
    return tuple(sorted(int(c) for c in rng.choice(cells, size=n, replace=False)))


def random_picture(rng: np.random.Generator, rules: WorldRules, sizes: tuple = SIZES, styled: bool = True) -> Picture:
    """One picture of the pretraining distribution. Class and background are uniform; the rest is drawn
    again until the rules admit the picture. `sizes`: the object's side range; `styled=False`: never black
    and white (and no draw for it), as the image towers' pictures (tinyrpo/toy/towers.py)."""
    cls = CLASSES[rng.integers(len(CLASSES))]
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    bw = bool(styled and rng.random() < rules.p_bw)
    while True:
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        pattern_colour = list(PATTERN_COLOURS)[rng.integers(len(PATTERN_COLOURS))]
        size = int(rng.integers(sizes[0], sizes[1] + 1))
        x, y = (int(rng.integers(MARGIN, SIZE - MARGIN - size + 1)) for _ in range(2))
        p = Picture(Thing(cls, colour, random_pattern(rng, cls), pattern_colour), x, y, size, background, bw)
        if rules.admits(p):
            return p


def sample(seed: int, index: int, rules: WorldRules) -> tuple[Picture, str]:
    """Picture `index` of the data set `seed` and its caption: the same for any other draws."""
    rng = np.random.default_rng([seed, index])
    p = random_picture(rng, rules)
    return p, caption(p, rng)


def dataset(seed: int, n: int, rules: WorldRules, start: int = 0) -> tuple[np.ndarray, list[str], list[Picture]]:
    """Pictures start .. start+n-1 of data set `seed`: (uint8 [n, SIZE, SIZE, 3], captions, truths)."""
    pics, caps = zip(*(sample(seed, i, rules) for i in range(start, start + n))) if n else ((), ())
    images = np.stack([render(p) for p in pics]) if n else np.zeros((0, SIZE, SIZE, 3), np.uint8)
    return images, list(caps), list(pics)


def moved(p: Picture, rng: np.random.Generator) -> Picture:
    """The same thing at another random place and size, on another background (an identity-preserving view)."""
    while True:
        size = int(rng.integers(SIZES[0], SIZES[1] + 1))
        x, y = (int(rng.integers(MARGIN, SIZE - MARGIN - size + 1)) for _ in range(2))
        q = replace(p, x=x, y=y, size=size, background=list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))], bw=False)
        if allowed(q):
            return q
