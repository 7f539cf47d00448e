"""The run and comparison pages (tinyrpo/evaluation/pages.py, the command tinyrpo/report.py), their SVG charts and labelled grids.

Pages are built from a real tiny train.py run and from hand-written run folders (a run in progress, a run
with only the step-0 validation, a method with its own loss terms and exact toy metrics), then rendered
in a real headless Chromium where one is installed.
"""
import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import train
from tests.test_grids import PROMPTS, noise_images, strips_and_cells
from tests.test_train import base_args, make_subject, models  # noqa: F401  (models: the tiny-weights fixture)
from tinyrpo.errors import UserError, run_cli
from tinyrpo.evaluation.grids import grid_cells, labelled_grid
from tinyrpo.evaluation.pages import write_comparison_report, write_report
from tinyrpo.evaluation.svgplot import Series, ema, line_chart, nice_ticks
from tinyrpo.report import main as report_main

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ charts

def test_nice_ticks_and_ema():
    assert nice_ticks(0, 400, 5) == [0, 100, 200, 300, 400]
    assert nice_ticks(0.6, 0.62, 5) == [0.6, 0.605, 0.61, 0.615, 0.62]
    assert nice_ticks(-3, 7, 6) == [-4, -2, 0, 2, 4, 6, 8]
    assert ema([1.0, 3.0], weight=0.5) == pytest.approx([1.0, (0.25 + 1.5) / 0.75])  # debiased
    assert ema([2.0] * 5) == pytest.approx([2.0] * 5)


def svg_points(svg: str, name: str) -> list[tuple[float, float]]:
    m = re.search(rf'data-series="{re.escape(name)}" points="([^"]*)"', svg)
    return [tuple(map(float, p.split(","))) for p in m.group(1).split()]


def test_line_chart_maps_values_to_pixels():
    svg = line_chart([Series("r", [(0, 0.0), (40, 1.0), (80, 0.5), (120, float("nan"))], markers=True)],
                     title="t", mark_x=40, mark_label="best: step 40", width=520, height=240)
    pts = svg_points(svg, "r")
    assert len(pts) == 3 and svg.count("<circle") == 3            # the NaN is skipped
    (x0, y0), (x1, y1), (x2, y2) = pts
    assert x1 - x0 == pytest.approx(x2 - x1) and y0 > y2 > y1      # up is a higher value
    assert y0 - y2 == pytest.approx(y2 - y1)
    mark = re.search(r'<line x1="([\d.]+)"[^>]*class="mark"', svg)
    assert float(mark.group(1)) == pytest.approx(x1) and "best: step 40" in svg
    assert "nothing logged" in line_chart([Series("r", [])], title="empty")


# ------------------------------------------------------------------------------------------ run pages

@pytest.fixture(scope="module")
def tiny_run(models, tmp_path_factory):  # noqa: F811
    """A real train.py run on tiny random weights: 4 steps, validations at 0, 2, 4, two images per prompt."""
    d = tmp_path_factory.mktemp("tiny_run")
    out = d / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 64-px synthetic photos
        train.main(base_args(models, make_subject(d / "subject"), out, "--steps", "4", "--val-every", "2",
                             "--val-images-per-prompt", "2"))
    return out


def embedded_grids(html: str) -> dict[int, Image.Image]:
    figs = re.findall(r'<figure id="step-(\d+)"[^>]*>.*?<img src="data:image/jpeg;base64,([^"]+)"', html, re.S)
    return {int(s): Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB") for s, b in figs}


def log_of(run: Path):
    records = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if x]
    return [r for r in records if not r.get("val")], [r for r in records if r.get("val")]


def test_report_of_a_real_run(tiny_run):
    path = write_report(tiny_run)
    assert path == tiny_run / "report.html"
    html = path.read_text()
    steps, vals = log_of(tiny_run)
    summary = json.loads((tiny_run / "summary.json").read_text())
    cfg = json.loads((tiny_run / "config.json").read_text())
    best = summary["best_step"]
    assert [v["step"] for v in vals] == [0, 2, 4]
    for v in vals:  # every validation: its grid, its row in the table with its values
        assert f'id="step-{v["step"]}"' in html
        assert f'{v["reward"]:.4f}' in html and f'{v["align_i"]:.4f}' in html and f'{v["align_t"]:.4f}' in html
    assert re.search(rf'<figure id="step-{best}" class="grid best"', html)
    assert len(re.findall(r'class="grid best"', html)) == 1
    assert f"step {best}</a>: reward {summary['best_reward']:.4f}" in html
    assert f'best: step {best}' in html                                   # marked on the chart
    for name in ("λ_val-Harmonic reward", "ALIGN-I", "ALIGN-T"):           # one dot per validation
        assert len(svg_points(html, name)) == len(vals)
    for key in ("loss", "l_sim", "l_pref", "grad_norm"):                   # every numeric per-step term
        assert len(svg_points(html, key)) == len(steps) == 4
    assert "delta, label, t" in html                                       # lists named, not plotted
    for phase in summary["seconds"]:
        assert f"<td>{phase}</td>" in html
    assert all(f"<li>{p}</li>" in html for p in cfg["train_prompts"]) and "lambda_val" in html
    assert "finished: 4 of 4 steps" in html and 'href="best.safetensors"' in html

    # the embedded grids: labelled rows holding the run's own validation images
    grids = embedded_grids(html)
    assert sorted(grids) == [0, 2, 4]
    rows, cols, res = len(cfg["train_prompts"]), 2, cfg["resolution"]
    for step, im in grids.items():
        strips, cells = strips_and_cells(im, rows, cols, res, res)
        assert all((s < 128).any() for s in strips)
        assert len({s.tobytes() for s in strips}) == rows                # each row its own prompt
        with Image.open(tiny_run / "val" / f"step_{step:05d}.png") as full:
            truth = [np.asarray(c, dtype=float) for c in grid_cells(full.convert("RGB"), rows, cols, (res, res))]
        err = [np.abs(c.astype(float) - t).mean() for c, t in zip(cells, truth)]
        wrong = [np.abs(c.astype(float) - t).mean() for c, t in zip(cells, truth[1:] + truth[:1])]
        assert max(err) < 12 < min(wrong)                                 # JPEG error vs another image
    # nothing else is fetched: no remote URL, no script; rebuilding gives the same page; no temp files left
    assert not re.search(r'(src|href)="(https?:)?//', html) and "<script" not in html
    assert write_report(tiny_run).read_text() == html
    assert [p.name for p in tiny_run.iterdir() if p.name.startswith(".report")] == []


def write_run(folder: Path, config: dict, records: list[dict], summary: dict | None = None, grids=(),
              partial_line: str = "") -> Path:
    """A hand-written run folder; grids are labelled_grid PNGs, as the trainer will write them."""
    (folder / "val").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + partial_line)
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))
    n = config["val_images_per_prompt"]
    for step in grids:
        images = noise_images(len(config["train_prompts"]) * n, config["resolution"], seed=step)
        labelled_grid(images, config["train_prompts"], n).save(folder / "val" / f"step_{step:05d}.png")
    return folder


def config(method="rpo", **kw):
    return {"method": method, "subject": "refs/toy", "train_prompts": PROMPTS, "val_images_per_prompt": 2,
            "resolution": 32, "lambda_val": 0.3, "steps": 10} | kw


def val(step, reward, **kw):
    return {"step": step, "val": True, "reward": reward, "align_i": reward + 0.2, "align_t": reward - 0.2} | kw


def test_report_of_a_run_in_progress(tmp_path):
    steps = [{"step": s, "loss": 1.0 / s, "l_sim": 0.5 / s, "l_pref": 0.69, "delta": [0.1], "label": [1],
              "t": [10], "grad_norm": 2.0} for s in (1, 2, 3)]
    run = write_run(tmp_path / "run", config(), [val(0, 0.50), *steps[:2], val(2, 0.61), steps[2]],
                    grids=(0, 2), partial_line='{"step": 4, "lo')
    html = write_report(run).read_text()
    assert "in progress (no summary.json yet): step 3 of 10 logged" in html
    assert re.search(r'<figure id="step-2" class="grid best"', html) and 'id="step-0" class="grid"' in html
    assert "best: step 2" in html and "timings appear when the run finishes" in html
    assert len(svg_points(html, "loss")) == 3
    assert "rows, top to bottom" not in html                   # the labelled PNGs were cut into their cells
    grids = embedded_grids(html)
    for step, im in grids.items():
        _, cells = strips_and_cells(im, 3, 2, 32, 32)
        truth = noise_images(6, 32, seed=step)
        assert max(np.abs(c.astype(float) - np.asarray(t, dtype=float)).mean() for c, t in zip(cells, truth)) < 12


def test_report_of_step0_only_and_of_an_odd_grid(tmp_path):
    run = write_run(tmp_path / "run", config(), [val(0, 0.5)], grids=(0,))
    html = write_report(run).read_text()
    assert "no training step logged yet" in html and re.search(r'<figure id="step-0" class="grid best"', html)
    assert len(svg_points(html, "λ_val-Harmonic reward")) == 1
    # a grid of another layout is shown whole, and the prompts are listed instead
    Image.new("RGB", (50, 70), "gray").save(run / "val" / "step_00000.png")
    html = write_report(run).read_text()
    assert "rows, top to bottom: " + " | ".join(PROMPTS) in html and embedded_grids(html)[0].size == (50, 70)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(config()))
    html = write_report(empty).read_text()
    assert "no validation yet" in html and "no validation grid yet" in html


def test_report_of_another_method_with_exact_metrics(tmp_path):
    records = []
    for s in range(1, 7):
        records.append({"step": s, "loss": 1.0, "instance": 0.1 * s, "prior": 0.2, "q_loss": -s, "stop": False,
                        "t": [s]})
        if s % 3 == 0:
            records.append(val(s, 0.4 + 0.01 * s, exact={"identity": 0.1 * s, "fidelity": 1 - 0.1 * s}))
    summary = {"best_step": 3, "best_reward": 0.43, "steps_run": 6, "stopped_early": True,
               "seconds": {"train": 5.0, "total": 10.0}, "new_key": 1}
    run = write_run(tmp_path / "run", config("dreambooth"), records, summary, grids=(3, 6))
    html = write_report(run).read_text()
    for key in ("loss", "instance", "prior", "q_loss"):
        assert len(svg_points(html, key)) == 6
    assert 'data-series="stop"' not in html and "not plotted: t" in html
    ident, fid = svg_points(html, "exact/identity"), svg_points(html, "exact/fidelity")
    assert len(ident) == len(fid) == 2 and ident[1][1] < ident[0][1] and fid[1][1] > fid[0][1]
    assert "exact metrics (toy subject)" in html
    assert re.search(r'<figure id="step-3" class="grid best"', html)   # summary.json's choice, not the argmax
    assert "stopped early" in html and "<h1>DREAMBOOTH" in html and "50 %" in html


def test_cli(tiny_run, tmp_path, capsys):
    (tiny_run / "report.html").unlink(missing_ok=True)
    r = subprocess.run([sys.executable, "-m", "tinyrpo.report", str(tiny_run)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and (tiny_run / "report.html").exists() and "wrote" in r.stdout, r.stderr
    # mistakes: one line, exit status 2 (in-process: the same run_cli the module's __main__ uses)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{")
    for folder, expect in [(tmp_path, "is not a run folder"), (tmp_path / "nope", "does not exist"),
                           (tmp_path / "bad", "cannot read")]:
        with pytest.raises(SystemExit) as e:
            run_cli(report_main, [str(folder)])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and expect in err and err.startswith("error:")


# ------------------------------------------------------------------------------------------ comparison

def make_comparison(root: Path) -> Path:
    cells = []
    for m, reward in (("rpo", 0.6), ("dreambooth", 0.5)):
        for seed in (0, 1):
            name = f"runs/{m}-toy-{seed}"
            records = [val(0, 0.45), val(2, reward + 0.01 * seed), val(4, reward - 0.02)]
            write_run(root / name, config(m), records, grids=(0, 2, 4))
            cells.append({"method": m, "subject": "toy", "seed": seed, "run": name,
                          "eval": {"dino": 0.6, "clip_i": 0.8, "clip_t": 0.3}})
    cells.append({"method": "rpo", "subject": "mug", "seed": 0, "run": "runs/gone", "eval": {}})
    data = {"methods": ["rpo", "dreambooth"], "subjects": ["toy", "mug"], "seeds": [0, 1],
            "metrics": ["dino", "clip_i", "clip_t"], "cells": cells,
            "table": [{"method": "rpo", "dino": {"mean": 0.6512, "std": 0.0123, "n": 3},
                       "clip_i": {"mean": 0.8, "std": 0.01, "n": 3}},
                      {"method": "dreambooth", "dino": {"mean": 0.6, "std": 0.02, "n": 2}}],
            "published": [{"name": "RPO (paper)", "dino": None, "clip_i": 0.833, "clip_t": 0.314}]}
    (root / "compare.json").write_text(json.dumps(data))
    return root


def test_comparison_report(tmp_path):
    root = make_comparison(tmp_path / "cmp")
    html = write_comparison_report(root).read_text()
    assert "<td>rpo</td><td class=\"num\">0.651 ± 0.012 (n=3)</td>" in html
    assert "<td>RPO (paper) (published)</td><td class=\"num\">—</td><td class=\"num\">0.833</td>" in html
    assert "runs/gone" in html and "(missing)" in html
    assert 'href="runs/rpo-toy-0"' in html                       # each run linked
    for m in ("rpo", "dreambooth"):                                 # curves side by side, one line per seed
        assert f"{m}: λ_val-Harmonic reward" in html
    assert len(svg_points(html, "toy seed 1")) == 3
    figs = re.findall(r"<figure><figcaption>([^<]*)</figcaption><img src=\"data:image/jpeg;base64,([^\"]+)\"", html)
    assert [f[0] for f in figs] == PROMPTS                           # a grid per prompt (subject toy)
    for p, (_, b64) in enumerate(figs):                              # rows: rpo, dreambooth; best step 2, seed 0
        im = Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")
        strips, cells = strips_and_cells(im, 2, 2, 32, 32)
        assert len({s.tobytes() for s in strips}) == 2
        truth = noise_images(6, 32, seed=2)[2 * p:2 * p + 2] * 2    # both runs' step-2 grids (same noise seed)
        other = noise_images(6, 32, seed=4)[2 * p:2 * p + 2] * 2
        err = [np.abs(c.astype(float) - np.asarray(t, dtype=float)).mean() for c, t in zip(cells, truth)]
        wrong = [np.abs(c.astype(float) - np.asarray(t, dtype=float)).mean() for c, t in zip(cells, other)]
        assert max(err) < 12 < min(wrong)
    (root / "compare.json").write_text(json.dumps({"methods": []}))
    with pytest.raises(UserError, match="is not a comparison"):
        write_comparison_report(root)


# ------------------------------------------------------------------------------------------ a real browser

def find_browser():
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if path := shutil.which(name):
            return path
    return None


CHECK = """<script>addEventListener('load', () => {
  const broken = [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).length;
  document.body.setAttribute('data-check', `images=${document.images.length} broken=${broken} ` +
    `svg=${document.querySelectorAll('svg polyline').length}`); });</script>"""


def render(browser: str, page: Path, tmp: Path) -> tuple[str, Image.Image]:
    """Open the page headless: the DOM after load (with a probe of every image) and a screenshot."""
    probe = page.with_name("probe.html")  # beside the page, so relative links resolve the same
    probe.write_text(page.read_text().replace("</body>", CHECK + "</body>"))
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
              f"--user-data-dir={tmp / 'profile'}", "--window-size=1280,1600"]
    env = os.environ | {"HOME": str(tmp)}
    dom = subprocess.run([*common, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120, env=env)
    assert dom.returncode == 0, dom.stderr[-2000:]
    shot = tmp / "shot.png"
    r = subprocess.run([*common, f"--screenshot={shot}", page.as_uri()], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0 and shot.exists(), r.stderr[-2000:]
    probe.unlink()
    return dom.stdout, Image.open(shot).convert("RGB")


@pytest.mark.skipif(find_browser() is None, reason="no headless Chromium installed (apt-get install chromium; "
                                                   ".ci/run installs it)")
def test_pages_render_in_a_browser(tiny_run, tmp_path):
    browser = find_browser()
    for page in (write_report(tiny_run), write_comparison_report(make_comparison(tmp_path / "cmp"))):
        dom, shot = render(browser, page, tmp_path)
        m = re.search(r'data-check="images=(\d+) broken=(\d+) svg=(\d+)"', dom)
        assert m, dom[:500]
        images, broken, lines = map(int, m.groups())
        assert images >= 3 and broken == 0 and lines >= 3
        a = np.asarray(shot)
        assert shot.size == (1280, 1600) and a.std() > 10       # something was drawn, not a blank page
        assert (a.reshape(-1, 3) == 255).all(axis=1).mean() > 0.3  # ... on a white page, not an error screen


def test_report_of_a_run_with_1000_prompts(tmp_path):
    """1000 prompts make a grid 72,000 px tall, past JPEG's 65,500: the page shows the first MAX_ROWS prompts of
    each grid, unchanged, says so, and links the full PNG; a whole grid shown shrunk is fitted to JPEG."""
    prompts = [f"a sks toy, prompt {k}" for k in range(1000)]
    run = write_run(tmp_path / "run", config(train_prompts=prompts, val_images_per_prompt=1), [val(0, 0.5)], grids=(0,))
    assert Image.open(run / "val" / "step_00000.png").height > 65_500
    html = write_report(run).read_text()
    grid = embedded_grids(html)[0]
    strips, cells = strips_and_cells(grid, 32, 1, 32, 32)
    truth = noise_images(1000, 32, seed=0)[:32]
    assert max(np.abs(c.astype(float) - np.asarray(t, dtype=float)).mean() for c, t in zip(cells, truth)) < 12
    assert "each grid shows the first 32 of the 1000 prompts" in html and 'href="val/step_00000.png"' in html
    Image.new("RGB", (20, 70_000), "gray").save(run / "val" / "step_00000.png")  # narrower than a cell: shown whole
    grid = embedded_grids(write_report(run).read_text())[0]
    assert max(grid.size) <= 65_500 and grid.height > 60_000
