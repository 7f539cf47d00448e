"""The toy subjects: one patterned object each, photographed 5 times on one shared background.

    toy   a yellow teddy with black cells top right, middle left and bottom middle, on a sofa
    ball  a purple ball with yellow cells top left, middle right and bottom middle, on a wooden floor

Their patterns never appear in the pretraining data (`HELD_OUT_PATTERNS`), on any object in any colours:
the base model can draw "a toy" but not this one. Every reference picture shares the subject's background,
as every photo of a DreamBench subject shares its sofa: a model that overfits the references paints that
background into every prompt, which the exact metrics measure as `leak`.

`write_subject(folder, name)` writes the reference PNGs and `subject.json`, which tinyrpo.data.load_subject
reads (class noun, prompt sets) and tinyrpo.evaluate uses (evaluation prompts, the toy weights, the truth
the exact metrics need). `python -m tinyrpo.toy subjects` regenerates the shipped folders refs/toy and
refs/ball.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from tinyrpo.toy.metrics import SubjectTruth
from tinyrpo.toy.world import (COLOURS, MARGIN, SCENES, SIZE, SIZES, STYLE, Picture, Thing, allowed,
                               render)

WORLD = "tinyrpo-toy-1"  # the world's version: pictures, grammar and rules

SUBJECTS = {
    "toy": SubjectTruth(Thing("toy", "yellow", (2, 3, 7), "black"), "sofa"),
    "ball": SubjectTruth(Thing("ball", "purple", (0, 5, 7), "yellow"), "floor"),
}
HELD_OUT_PATTERNS = tuple(s.thing.pattern for s in SUBJECTS.values())
# Four more "subjects" that only `python -m tinyrpo.toy probe` uses: 3-cell layouts the image towers never see
# in pretraining either (tinyrpo/toy/pretrain.py, `tower_rules`), so the probe measures whether the towers
# see layout in general, not whether they learned two.
PROBE_SUBJECTS = {
    "red toy": SubjectTruth(Thing("toy", "red", (0, 5, 6), "black"), "beach"),
    "green box": SubjectTruth(Thing("box", "green", (1, 3, 8), "white"), "moon"),
    "blue ball": SubjectTruth(Thing("ball", "blue", (2, 4, 6), "yellow"), "snow"),
    "white box": SubjectTruth(Thing("box", "white", (0, 4, 7), "purple"), "red"),
}
PROBE_PATTERNS = tuple(s.thing.pattern for s in PROBE_SUBJECTS.values())
N_REFERENCES = 5

# RPO's eight training prompts, in the toy world: like the authors' object set (a style, a property, six
# places), `{0}` the token and `{1}` the class noun as in tinyrpo.dreambench.
TRAIN_PROMPTS = [
    "a {0} {1} " + STYLE,
    "a {0} {1} on the moon",
    "a green {0} {1}",
    "a {0} {1} on a blue background",
    "a {0} {1} on the beach",
    "a {0} {1} on a red background",
    "a {0} {1} in the snow",
    "a {0} {1} on a white background",
]
WEIGHTS = {"sd": "weights/toy/sd", "clip": "weights/toy/clip", "dino": "weights/toy/dino"}
RESOLUTION = SIZE
# train.py's defaults for a toy subject (flags win): the toy preset, measured on the shipped weights
# (docs/toy-world.md, "The default run"; `python -m tinyrpo.toy experiment default`): lr 1e-4 for 800 steps at
# β = 0.1 keeps a checkpoint whose pattern identity on the evaluation prompts is 0.32 ± 0.02 (base −0.02) at
# fidelity 0.90 (base 0.96), seeds 0-2. 2e-4 lost fidelity (0.63-0.78) for no more identity, 2e-4 at β = 1
# more so; at 3e-4 the first toy model was wrecked within 40 steps. 20 DDIM steps at guidance 5 read as well
# as 50 (the quality check's setting); one torch thread is the fastest.
TRAIN_DEFAULTS = {"lr": 1e-4, "steps": 800, "val_every": 80, "sample_steps": 20, "guidance": 5.0, "threads": 1,
                  "beta": 0.1}


def eval_prompts(subject: SubjectTruth) -> list[str]:
    """The evaluation prompts, as DreamBench's: every other background (not the references' one), every
    property colour, the style, and four property-and-place pairs; none of the world's rules broken."""
    t = subject.thing
    colours = [c for c in COLOURS if c not in (t.colour, t.pattern_colour)]
    places = [f"on a {c} background" for c in colours] + [s.phrase for s in SCENES if s.name != subject.background]
    prompts = [f"a {{0}} {{1}} {p}" for p in places]
    prompts += [f"a {c} {{0}} {{1}}" for c in colours]
    prompts.append("a {0} {1} " + STYLE)
    prompts += [f"a {c} {{0}} {{1}} {s.phrase}" for c in colours[:2] for s in SCENES[:2]]
    return prompts


@dataclass
class Reference:
    file: str
    picture: Picture


def references(name: str, seed: int = 0) -> list[Reference]:
    """The subject's reference pictures: sizes spread over the world's range, places spread over the frame."""
    if name in SUBJECTS:
        subject, k = SUBJECTS[name], sorted(SUBJECTS).index(name)
    else:  # a probe subject
        subject, k = PROBE_SUBJECTS[name], len(SUBJECTS) + list(PROBE_SUBJECTS).index(name)
    rng = np.random.default_rng([seed, k])
    sizes = np.linspace(SIZES[0], SIZES[1], N_REFERENCES).round().astype(int)
    out, centres = [], []
    for k, size in enumerate(rng.permutation(sizes)):
        while True:
            x, y = (int(rng.integers(MARGIN, SIZE - MARGIN - size + 1)) for _ in range(2))
            c = np.array([x + size / 2, y + size / 2])
            p = Picture(subject.thing, x, y, int(size), subject.background)
            if allowed(p) and all(np.abs(c - o).max() >= 3 for o in centres):  # no two at the same place
                break
        centres.append(c)
        out.append(Reference(f"{k:02d}.png", p))
    return out


def subject_json(name: str, refs: list[Reference]) -> dict:
    subject = SUBJECTS[name]
    return {
        "world": WORLD, "class_noun": subject.thing.cls, "live": False,
        "train_prompts": TRAIN_PROMPTS, "eval_prompts": eval_prompts(subject),
        "resolution": RESOLUTION, "weights": WEIGHTS, "train_defaults": TRAIN_DEFAULTS,
        # the scorer the trainer and tinyrpo.evaluate call by this name (tinyrpo.data): they never import the toy world
        "exact_metrics": "tinyrpo.toy.metrics:exact_columns",
        "toy": {**subject.to_json(),
                "references": [{"file": r.file, "x": r.picture.x, "y": r.picture.y, "size": r.picture.size}
                               for r in refs]},
    }


def write_subject(folder, name: str) -> Path:
    """The reference PNGs and subject.json of subject `name` in `folder` (created; same bytes every time)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    refs = references(name)
    for r in refs:
        Image.fromarray(render(r.picture)).save(folder / r.file)
    (folder / "subject.json").write_text(json.dumps(subject_json(name, refs), indent=2) + "\n")
    return folder
