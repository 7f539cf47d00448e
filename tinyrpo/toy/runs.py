"""Exact metrics of a training run on a toy subject, read from its validation grids.

    python -m tinyrpo.toy score runs/toy             # identity / fidelity / leak at every validation

train.py writes a grid per validation (RUN/val/step_*.png: one row per training prompt, one column per
image); with the run's config.json this is enough to score every image exactly, after the fact, with
tinyrpo/toy/metrics.py. (The same `score_images` can be called by the trainer at each validation.)
"""
import json
from pathlib import Path

from PIL import Image

from tinyrpo.data import read_subject_file
from tinyrpo.errors import UserError
from tinyrpo.evaluation.grids import grid_cells
from tinyrpo.toy.metrics import score_images, subject_truth

COLUMNS = ("identity", "fidelity", "background", "colour", "bw", "class", "leak")


def score_run(run_dir) -> list[dict]:
    """One row per validation grid: {"step", *COLUMNS} (means over the grid's images)."""
    run = Path(run_dir)
    try:
        config = json.loads((run / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{run} is not a training run folder (cannot read config.json: {e})") from None
    truth = subject_truth(read_subject_file(config["subject"]))
    if truth is None:
        raise UserError(f"{config['subject']} is not a toy subject (its subject.json has no \"toy\" truth)")
    prompts, n, res = config["train_prompts"], config["val_images_per_prompt"], config["resolution"]
    rows = []
    for path in sorted((run / "val").glob("step_*.png")):
        with Image.open(path) as grid:
            cells = grid_cells(grid.convert("RGB"), len(prompts), n, (res, res))
        s = score_images(cells, [p for p in prompts for _ in range(n)], truth, config.get("token", "sks"))
        rows.append({"step": int(path.stem.split("_")[1]), **{k: s[k] for k in COLUMNS}})
    return rows


def score_table(rows: list[dict]) -> str:
    lines = ["| step | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append(f"| {r['step']} | " + " | ".join("–" if r[k] != r[k] else f"{r[k]:.3f}" for k in COLUMNS) + " |")
    return "\n".join(lines)
