"""README's code map names every module, and the toy world's page quotes its command outputs as they are."""
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
TOY_DOC = ROOT / "docs" / "toy-world.md"


def code_map() -> str:
    return README[README.index("## Code map"):README.index("\n## ", README.index("## Code map") + 1)]


def code_map_modules() -> set[str]:
    """The modules the code map names, as paths: a bare name in a row is in the folder of the row's first path
    (`tinyrpo/toy/world.py`, `metrics.py` names tinyrpo/toy/metrics.py)."""
    named = set()
    for row in code_map().splitlines():
        cell = row.split("|")[1] if row.startswith("|") else ""
        folder = None
        for name in re.findall(r"`([\w/]+\.py)`", cell):
            if "/" in name:
                folder = name.rsplit("/", 1)[0]
            named.add(name if "/" in name or folder is None else f"{folder}/{name}")
    return named


def test_code_map_names_every_module():
    named = code_map_modules()
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "tinyrpo").rglob("*.py") if p.name != "__init__.py"}
    missing = sorted(modules - named)
    assert not missing, f"README's code map does not name {missing}"
    gone = sorted(named - modules)
    assert not gone, f"README's code map names modules that do not exist: {gone}"


def test_the_toy_page_quotes_the_probe_as_written():
    from tinyrpo.toy.probe import auc_table
    probe = json.loads((ROOT / "weights" / "toy" / "probe.json").read_text())
    assert auc_table(probe["auc"]) in TOY_DOC.read_text()


@pytest.mark.parametrize("name", ["default", "all"])
def test_the_toy_page_quotes_the_experiment_tables_as_written(name):
    """docs/results/<name>.md is the command's own output file (copied from its --out folder); every table
    and note line of it stands in the page unchanged."""
    result = (ROOT / "docs" / "results" / f"{name}.md").read_text()
    page = TOY_DOC.read_text()
    lines = [x for x in result.splitlines() if x.startswith("|") or x.startswith("- ")]
    assert lines
    missing = [x for x in lines if x not in page]
    assert not missing, f"docs/toy-world.md differs from docs/results/{name}.md: {missing[:3]}"


def test_the_toy_page_quotes_the_pretraining_rerun_as_recorded():
    """The measured pretraining time is the rerun's own record (docs/results/pretrain-rerun.json, copied from
    its --out folder): each group's wall, the U-Net's CPU time and the total, as the page rounds them."""
    run = json.loads((ROOT / "docs" / "results" / "pretrain-rerun.json").read_text())
    page = " ".join(TOY_DOC.read_text().split())
    groups = {key: f"{g['wall_s'] / 60:.1f} min" for key, g in run["groups"].items()}
    unet = run["stages"]["unet"]
    quoted = [f"VAE + text tower {groups['vae + clip']}", f"U-Net {groups['unet']}",
              f"CLIP image tower + DINO {groups['clip_image + dino']}",
              f"{run['total']['wall_s'] / 60:.1f} min wall, {run['total']['cpu_s'] / 60:.1f} min CPU",
              f"{unet['wall_s'] / 60:.1f} min wall and {unet['cpu_s'] / 60:.1f} min CPU",
              f"worst AUC {run['probe_worst_auc']:.3f}", run["machine"]["cpu"], run["machine"]["torch"]]
    missing = [x for x in quoted if x not in page]
    assert not missing, f"docs/toy-world.md does not quote docs/results/pretrain-rerun.json: {missing}"
