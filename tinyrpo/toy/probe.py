"""Do the toy reward and evaluation models see the subject? `python -m tinyrpo.toy probe`

Real CLIP and DINO tell a subject from another object of its kind (DreamBench's real photos: CLIP-I 0.885,
DINO 0.774 against each other); a laboratory whose towers cannot would measure backgrounds. The probe
scores a picture as DreamBench's CLIP-I and DINO do — the mean cosine of its embedding to the subject's
5 references — and asks, by ROC AUC, whether the subject scores above an impostor: the same class and
colours with another 3-cell layout, the only thing that tells them apart. Three comparisons:

    same background     the subject vs an impostor, both on the references' background
    across backgrounds  both on random other backgrounds
    elsewhere           the subject on another background vs an impostor on the references' background:
                        a tower that rewards the references' sofa instead of the teddy fails here

for the two subjects and the four PROBE_SUBJECTS (tinyrpo/toy/subjects.py), whose layouts the towers never
saw either. AUC 1: always right; 0.5: blind; 0: fooled by the background. The embeddings are the ones the
reward (tinyrpo.reward.CLIPScorer) and the evaluation (DINO's class token) compute.
"""
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from tinyrpo.dino import dino_preprocess
from tinyrpo.formats.weights import load_clip, load_dino
from tinyrpo.reward import CLIPScorer
from tinyrpo.runs.atomic import atomic_write_json
from tinyrpo.toy.subjects import PROBE_SUBJECTS, SUBJECTS, references
from tinyrpo.toy.world import BACKGROUNDS, MARGIN, SIZE, SIZES, Picture, Thing, allowed, render, visible_cells

ROWS = {"same": "same background", "across": "across backgrounds", "elsewhere": "elsewhere vs refs' background"}
TARGET = 0.95  # every AUC of the shipped towers (the issue that made the towers see identity)


def all_subjects() -> dict:
    return {**SUBJECTS, **PROBE_SUBJECTS}


def _place(thing: Thing, background: str, rng: np.random.Generator) -> Picture:
    while True:
        size = int(rng.integers(SIZES[0], SIZES[1] + 1))
        x, y = (int(rng.integers(MARGIN, SIZE - MARGIN - size + 1)) for _ in range(2))
        p = Picture(thing, x, y, size, background)
        if allowed(p):
            return p


def impostor(thing: Thing, rng: np.random.Generator) -> Thing:
    """The same class and colours with another layout of as many cells."""
    while True:
        pattern = tuple(sorted(int(c) for c in rng.choice(visible_cells(thing.cls), len(thing.pattern),
                                                          replace=False)))
        if pattern != thing.pattern:
            return Thing(thing.cls, thing.colour, pattern, thing.pattern_colour)


def probe_sets(name: str, n: int, seed: int = 1) -> dict:
    """{row: (n subject pictures, n impostor pictures)} for subject `name`."""
    s = all_subjects()[name]
    rng = np.random.default_rng([seed, 7, list(all_subjects()).index(name)])
    others = [b for b in BACKGROUNDS if b != s.background]

    def elsewhere(thing):
        while True:
            b = others[rng.integers(len(others))]
            if allowed(Picture(thing, MARGIN, MARGIN, SIZES[1], b)):
                return _place(thing, b, rng)

    rows = {"same": ([_place(s.thing, s.background, rng) for _ in range(n)],
                     [_place(impostor(s.thing, rng), s.background, rng) for _ in range(n)])}
    rows["across"] = ([elsewhere(s.thing) for _ in range(n)], [elsewhere(impostor(s.thing, rng)) for _ in range(n)])
    rows["elsewhere"] = ([elsewhere(s.thing) for _ in range(n)],
                         [_place(impostor(s.thing, rng), s.background, rng) for _ in range(n)])
    return rows


def auc(pos, neg) -> float:
    """ROC AUC of scores `pos` above `neg` (Mann–Whitney U / (n·m), ties counting half)."""
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    above = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(above / (len(pos) * len(neg)))


def embedders(clip, dino) -> dict:
    """{"CLIP-I": f, "DINO": f}, f(list of Pictures) -> unit embeddings [N, D]: the reward's and the
    evaluation's own code paths."""
    scorer = CLIPScorer(clip, batch_size=256)

    def pil(pictures):
        return [Image.fromarray(render(p)) for p in pictures]

    @torch.no_grad()
    def dino_embed(pictures):
        x = dino_preprocess(pil(pictures), dino.config.image_size)
        return F.normalize(torch.cat([dino(x[i:i + 256]).float() for i in range(0, len(x), 256)]), dim=-1)

    return {"CLIP-I": lambda pictures: scorer.embed_images(pil(pictures)).float(), "DINO": dino_embed}


@torch.no_grad()
def probe(clip, dino, n: int = 200, names=None, seed: int = 1) -> dict:
    """{model: {subject: {row: AUC}}} with `n` pictures per set."""
    names = list(all_subjects()) if names is None else names
    sets = {name: probe_sets(name, n, seed) for name in names}
    out = {}
    for model, embed in embedders(clip, dino).items():
        out[model] = {}
        for name in names:
            refs = embed([r.picture for r in references(name)])
            out[model][name] = {row: round(auc((embed(pos) @ refs.T).mean(1).numpy(),
                                               (embed(neg) @ refs.T).mean(1).numpy()), 3)
                                for row, (pos, neg) in sets[name].items()}
    return out


def worst(result: dict) -> float:
    return min(a for subjects in result.values() for rows in subjects.values() for a in rows.values())


def auc_table(result: dict) -> str:
    """A markdown table: one row per subject, CLIP-I and DINO side by side for each comparison."""
    models = list(result)
    head = "| subject | " + " | ".join(f"{ROWS[r]}: {m}" for r in ROWS for m in models) + " |"
    lines = [head, "|" + " --- |" * (1 + len(ROWS) * len(models))]
    for name in next(iter(result.values())):
        lines.append(f"| {name} | " + " | ".join(f"{result[m][name][r]:.3f}" for r in ROWS for m in models) + " |")
    return "\n".join(lines)


def run_probe(weights: str = "weights/toy", n: int = 200, out: str | None = None) -> dict:
    """The probe of the towers in `weights`/clip and `weights`/dino; writes `weights`/probe.json."""
    result = probe(load_clip(Path(weights) / "clip"), load_dino(Path(weights) / "dino"), n)
    report = {"n": n, "auc": result, "worst": worst(result), "target": TARGET}
    atomic_write_json(Path(out) if out else Path(weights) / "probe.json", report)
    return report


def main_text(report: dict) -> str:
    verdict = "every AUC" if report["worst"] >= TARGET else "NOT every AUC"
    return (auc_table(report["auc"]) + f"\n\n{report['n']} pictures per set; worst AUC {report['worst']:.3f}: "
            f"{verdict} ≥ {TARGET}")
