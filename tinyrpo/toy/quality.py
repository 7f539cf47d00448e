"""How good the toy Stable Diffusion is, measured exactly: does it draw what a prompt asks?

The prompts are "a {colour} {class} {background}" for the (class, colour, background) triples the
pretraining data never contains (world.held_out_triples), eight seeds each: every answer is a composition
the model has to generalize to. Each picture is read back (tinyrpo/toy/metrics.py) and scored on its
background, its object's colour and its object's class.
"""
import json
from pathlib import Path

from tinyrpo.pipeline import generate
from tinyrpo.toy import metrics
from tinyrpo.toy.world import BACKGROUNDS, SIZE, held_out_triples

SEEDS_PER_TRIPLE = 8


def quality_prompts(per_triple: int = SEEDS_PER_TRIPLE) -> list[str]:
    """Every held-out triple once, then again: any prefix of the list covers the triples evenly."""
    triples = sorted(held_out_triples())
    return [f"a {colour} {cls} {BACKGROUNDS[bg].phrase}" for _ in range(per_triple) for cls, colour, bg in triples]


def run_quality(sd, prompts: list[str], guidance: float = 5.0, steps: int = 25, seed: int = 0,
                batch_size: int = 64, progress: bool = True) -> dict:
    """Generate one picture per prompt (prompt p with seed + p, as sample.py) and score them."""
    images, _ = generate(sd, prompts, n=1, steps=steps, guidance=guidance, seed=seed, height=SIZE, width=SIZE,
                         batch_size=batch_size, progress=progress, desc="quality")
    result = metrics.quality(images, prompts)
    readings = [metrics.read_picture(a) for a in metrics.to_array(images)]
    result["per_image"] = [{"prompt": p, "background": r.background, "colour": r.colour, "class": r.cls}
                           for p, r in zip(prompts, readings)]
    return result


def write_quality(path, result: dict, settings: dict) -> None:
    Path(path).write_text(json.dumps({"settings": settings, **result}, indent=2) + "\n")
