"""report.html: one page per training run and per comparison of runs, built from their folders alone.
`python -m tinyrpo.report FOLDER` (tinyrpo/report.py) rebuilds either by hand.

The trainer calls `write_report(run_dir)` after each validation and at the end; the comparison runner calls
`write_comparison_report(compare_dir)`. Both pages live here, as they share every piece of reading and
drawing. Each page is one HTML file, written atomically (a temporary file, then a rename), with no script and nothing fetched: the charts are inline
SVG (tinyrpo/evaluation/svgplot.py says why not matplotlib) and the image grids are embedded JPEGs, each linked to
its full-size PNG.

A run page shows: the status and the chosen checkpoint; the validation λ_val-Harmonic reward, ALIGN-I and
ALIGN-T over the steps with the best step marked (and every key of a record's `exact` dict: the exact
identity and prompt fidelity of toy subjects), and a table of them; the validation grids by step, rows
labelled with their prompts, the best one framed; every numeric term of the per-step records (L_sim,
L_pref, grad norm, or a method's own terms), raw and smoothed; the time of each phase; all settings.

Grids. val/step_*.png is cut into its cells (rows = config `train_prompts`, columns =
`val_images_per_prompt`, cells `resolution` px, with or without label strips: `grids.grid_cells`), each
cell shrunk to THUMB px, and the grid redrawn with `grids.labelled_grid`; a grid that does not fit that
layout is shown whole, shrunk.
"""
import base64
import functools
import io
import json
import os
import re
from dataclasses import dataclass
from html import escape
from pathlib import Path

from PIL import Image

from tinyrpo.errors import UserError
from tinyrpo.evaluation.grids import grid_cells, labelled_grid
from tinyrpo.evaluation.svgplot import Series, ema, line_chart
from tinyrpo.runs.atomic import atomic_write_text
from tinyrpo.runs.runfolder import read_json
from tinyrpo.runs.tracking import numbers

THUMB = 128          # px of an embedded grid cell (the full-size PNG is one click away)
MAX_ROWS = 32        # prompts shown per embedded grid: 1000 rows of 128 px would pass JPEG's size limit
JPEG_MAX = 65_500    # px: the largest side a JPEG can have
VAL_KEYS = ("reward", "align_i", "align_t")
LABELS = {"reward": "λ_val-Harmonic reward", "align_i": "ALIGN-I", "align_t": "ALIGN-T",
          "loss": "loss", "l_sim": "L_sim", "l_pref": "L_pref", "grad_norm": "grad norm (before clipping)",
          "l_instance": "instance loss", "l_prior": "prior-preservation loss", "q": "critic Q_φ",
          "lookforward_mse": "look-forward MSE ‖x̂_0 − x_0‖²", "critic_loss": "critic loss", "cost": "critic target"}
NOT_A_RUN = "give a run folder (train.py --out) or a comparison folder (holding compare.json)"

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.2em 2em; color: #222; }
h1 { font-size: 1.5em; margin-bottom: .2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
.status { color: #555; } .best-line { font-size: 1.1em; }
.badge { background: #e6a100; color: #fff; border-radius: 3px; padding: 0 .4em; font-size: .85em; }
.charts { display: flex; flex-wrap: wrap; gap: 1em; }
svg.chart { background: #fff; border: 1px solid #e4e4e4; font-size: 11px; }
svg.chart .title { font-weight: 600; font-size: 12px; } svg.chart .grid { stroke: #eee; }
svg.chart line.mark { stroke: #e6a100; stroke-width: 1.5; stroke-dasharray: 4 3; }
svg.chart text.mark { fill: #b07a00; }
table { border-collapse: collapse; margin: .5em 0; }
td, th { border: 1px solid #ddd; padding: .2em .6em; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.best td { background: #fff4d6; } tr.published td { color: #555; font-style: italic; }
.grids { display: flex; gap: 1em; overflow-x: auto; align-items: flex-start; padding-bottom: .5em; }
figure { margin: 0; padding: 6px; border: 3px solid transparent; }
figure.best { border-color: #e6a100; background: #fff8e6; }
figure img { display: block; } figcaption { margin-bottom: 4px; }
.bar { background: #1f77b4; height: .8em; display: inline-block; }
.empty { color: #888; font-style: italic; }
"""


# -------------------------------------------------------------------------------------------- reading

def read_log(path: Path) -> list[dict]:
    """log.jsonl's records; a line still being written (a run in progress) is skipped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict) and isinstance(r.get("step"), int):
            records.append(r)
    return records


@dataclass
class Run:
    path: Path
    config: dict
    steps: list[dict]          # per-step records, one per step (the last written wins)
    vals: list[dict]           # validation records, one per step
    summary: dict | None       # None while the run is in progress
    grids: dict[int, Path]     # validation step -> val/step_*.png

    @property
    def best_step(self) -> int | None:
        if self.summary and isinstance(self.summary.get("best_step"), int):
            return self.summary["best_step"]
        scored = [v for v in self.vals if isinstance(v.get("reward"), (int, float))]
        return max(scored, key=lambda v: v["reward"])["step"] if scored else None  # first of equals, as the trainer

    @property
    def prompts(self) -> list[str]:
        return [str(p) for p in self.config.get("train_prompts") or []]

    @property
    def name(self) -> str:
        return self.path.resolve().name


def read_run(run_dir) -> Run:
    path = Path(run_dir)
    if not path.is_dir():
        raise UserError(f"{path} is not a folder; {NOT_A_RUN}")
    if not (path / "config.json").exists():
        raise UserError(f"{path} is not a run folder (it has no config.json); {NOT_A_RUN}")
    config = read_json(path / "config.json", "the run's settings")
    records = read_log(path / "log.jsonl")
    steps = {r["step"]: r for r in records if not r.get("val")}
    vals = {r["step"]: r for r in records if r.get("val")}
    summary = read_json(path / "summary.json", "the run's summary") if (path / "summary.json").exists() else None
    grids = {}
    for f in (path / "val").glob("step_*.png"):
        if m := re.fullmatch(r"step_(\d+)\.png", f.name):
            grids[int(m.group(1))] = f
    return Run(path, config if isinstance(config, dict) else {}, [steps[k] for k in sorted(steps)],
               [vals[k] for k in sorted(vals)], summary if isinstance(summary, dict) else None, dict(sorted(grids.items())))


# -------------------------------------------------------------------------------------------- images

@functools.lru_cache(maxsize=512)
def _cells(path: str, mtime_ns: int, rows: int, cols: int, cell: int) -> tuple[Image.Image, ...] | None:
    """A validation grid's cells shrunk to THUMB px, or None when the grid is not rows × cols cells of `cell`
    px. Cached: the trainer rebuilds the page after each validation, and old grids do not change."""
    with Image.open(path) as im:
        grid = im.convert("RGB")
    try:
        cells = grid_cells(grid, rows, cols, (cell, cell))
    except ValueError:
        return None
    size = min(THUMB, cell)
    return tuple(c.resize((size, size), Image.LANCZOS) for c in cells)


def grid_cells_of(run: Run, step: int) -> tuple[Image.Image, ...] | None:
    path, cfg = run.grids.get(step), run.config
    rows, cols, res = len(run.prompts), cfg.get("val_images_per_prompt"), cfg.get("resolution")
    if path is None or not rows or not isinstance(cols, int) or not isinstance(res, int):
        return None
    try:
        return _cells(str(path), path.stat().st_mtime_ns, rows, cols, res)
    except OSError:  # unreadable or half-written: the next rebuild will have it
        return None


def data_uri(im: Image.Image) -> str:
    if max(im.size) > JPEG_MAX:  # shrunk to fit (a grid shown whole): JPEG cannot hold it otherwise
        f = JPEG_MAX / max(im.size)
        im = im.resize((max(1, int(im.width * f)), max(1, int(im.height * f))))
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "JPEG", quality=90, subsampling=0)  # 4:4:4: crisp label text, true colours
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def shrunk_whole(path: Path, width: int = 1024) -> Image.Image | None:
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except OSError:
        return None
    return im.resize((width, round(im.height * width / im.width))) if im.width > width else im


def link(path: Path, base: Path) -> str:
    return escape(Path(os.path.relpath(path, base)).as_posix())


# -------------------------------------------------------------------------------------------- pieces

def num(v, digits: int = 4) -> str:
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "—"


def html_table(header: list[str], rows: list[list[str]], row_classes: list[str] | None = None) -> str:
    """Cells are HTML already; numbers get right-aligned."""
    out = ["<table><tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr>"]
    for k, row in enumerate(rows):
        cls = f' class="{row_classes[k]}"' if row_classes and row_classes[k] else ""
        tds = "".join(f'<td class="num">{c}</td>' if re.fullmatch(r"[-−+\d.e ±()n=—]+", c) else f"<td>{c}</td>"
                      for c in row)
        out.append(f"<tr{cls}>{tds}</tr>")
    return "\n".join(out + ["</table>"])


def val_series(vals: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Every numeric quantity of the validation records over steps, `exact` entries as exact/<key>."""
    out: dict[str, list] = {}
    for v in vals:
        for k, x in numbers(v).items():
            out.setdefault(k, []).append((v["step"], x))
    return out


def val_charts(run: Run) -> str:
    series, best = val_series(run.vals), run.best_step
    mark = dict(mark_x=best, mark_label=f"best: step {best}") if best is not None else {}
    groups = [("validation", [k for k in VAL_KEYS if k in series]),
              ("exact metrics (toy subject)", [k for k in series if k.startswith("exact/")]),
              ("other validation metrics", [k for k in series if k not in VAL_KEYS and not k.startswith("exact/")])]
    charts = [line_chart([Series(LABELS.get(k, k), series[k], markers=True) for k in keys], title=title, **mark)
              for title, keys in groups if keys]
    return "\n".join(charts) or '<p class="empty">no validation yet</p>'


def loss_charts(steps: list[dict], max_points: int = 1500) -> str:
    """One chart per numeric term of the per-step records: raw (faint) and EMA-smoothed."""
    series: dict[str, list] = {}
    for r in steps:
        for k, x in numbers(r).items():
            series.setdefault(k, []).append((r["step"], x))
    if not series:
        return '<p class="empty">no training step logged yet</p>'
    charts = []
    for k, pts in series.items():
        smooth = list(zip([x for x, _ in pts], ema([y for _, y in pts])))
        stride = max(1, len(pts) // max_points)  # a long run: every stride-th point is plenty for a chart
        charts.append(line_chart([Series(k, pts[::stride], faint=True, legend=False),
                                  Series(f"{k} (EMA 0.9)", smooth[::stride], color="#1f77b4")],
                                 title=LABELS.get(k, k), width=360, height=220))
    lists = sorted({k for r in steps for k, v in r.items() if isinstance(v, list)})
    note = f'<p class="empty">per-pair lists not plotted: {escape(", ".join(lists))}</p>' if lists else ""
    return '<div class="charts">' + "\n".join(charts) + "</div>" + note


def val_table(run: Run) -> str:
    series = val_series(run.vals)
    keys = [k for k in VAL_KEYS if k in series] + [k for k in series if k not in VAL_KEYS]
    rows = [[f'<a href="#step-{v["step"]}">{v["step"]}</a>' if v["step"] in run.grids else str(v["step"])]
            + [num(dict(series[k]).get(v["step"])) for k in keys] for v in run.vals]
    classes = ["best" if v["step"] == run.best_step else "" for v in run.vals]
    return html_table(["step"] + [escape(LABELS.get(k, k)) for k in keys], rows, classes) if rows else ""


def grids_section(run: Run) -> str:
    vals = {v["step"]: v for v in run.vals}
    figures = []
    shown = run.prompts[:MAX_ROWS]
    for step, path in run.grids.items():
        cells = grid_cells_of(run, step)
        cols = run.config.get("val_images_per_prompt")
        im = labelled_grid(list(cells[:len(shown) * cols]), shown, cols) if cells else shrunk_whole(path)
        v = vals.get(step, {})
        best = step == run.best_step
        caption = (f"step {step}" + (f" · reward {num(v['reward'])}" if "reward" in v else "")
                   + (' <span class="badge">best</span>' if best else "")
                   + f' · <a href="{link(path, run.path)}">full size</a>')
        img = (f'<img src="{data_uri(im)}" width="{im.width}" height="{im.height}" '
               f'alt="validation grid at step {step}">' if im else '<p class="empty">unreadable image</p>')
        figures.append(f'<figure id="step-{step}" class="grid{" best" if best else ""}" data-step="{step}">'
                       f'<figcaption>{caption}</figcaption><a href="{link(path, run.path)}">{img}</a></figure>')
    if not figures:
        return '<p class="empty">no validation grid yet</p>'
    note = "" if all(grid_cells_of(run, s) for s in run.grids) else (
        "<p>rows, top to bottom: " + escape(" | ".join(run.prompts)) + "</p>")
    if len(run.prompts) > len(shown):
        note += (f"<p>each grid shows the first {len(shown)} of the {len(run.prompts)} prompts; its full-size PNG "
                 "(click it) holds them all</p>")
    return note + '<div class="grids">' + "\n".join(figures) + "</div>"


def duration(s: float) -> str:
    """Seconds as m:ss, or h:mm:ss from an hour."""
    s = round(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def timings(summary: dict | None) -> str:
    secs = (summary or {}).get("seconds")
    if not isinstance(secs, dict) or not secs:
        return '<p class="empty">timings appear when the run finishes (summary.json)</p>'
    secs = {k: v for k, v in secs.items() if isinstance(v, (int, float))}
    total = secs.get("total") or sum(secs.values()) or 1.0
    rows = [[escape(k), f"{v:.1f} s", duration(v), f'<span class="bar" style="width:{200 * v / total:.0f}px"></span>'
             f" {100 * v / total:.0f} %"] for k, v in secs.items()]
    return html_table(["phase", "seconds", "h:mm:ss", "share of total"], rows)


def settings(config: dict) -> str:
    def value(v):
        if isinstance(v, list) and all(isinstance(x, str) for x in v) and v:
            return "<ol>" + "".join(f"<li>{escape(x)}</li>" for x in v) + "</ol>"
        return escape(v if isinstance(v, str) else json.dumps(v))
    return html_table(["setting", "value"], [[escape(str(k)), value(v)] for k, v in config.items()])


def page(title: str, body: list[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{escape(title)}</title><style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


# -------------------------------------------------------------------------------------------- run page

def status_line(run: Run) -> str:
    cfg, s = run.config, run.summary
    last = max([r["step"] for r in run.steps + run.vals], default=0)
    total = cfg.get("steps", "?")
    if s is None:
        return f"in progress (no summary.json yet): step {last} of {total} logged"
    return (f"finished: {s.get('steps_run', last)} of {total} steps"
            + (", stopped early (no improvement for --patience validations)" if s.get("stopped_early") else ""))


def run_page(run: Run) -> str:
    cfg, best = run.config, run.best_step
    bv = next((v for v in run.vals if v["step"] == best), {})
    subject = Path(str(cfg.get("subject", run.name))).name
    head = [f"<h1>{escape(cfg.get('method', 'run').upper())} · {escape(subject)} "
            f"<small>({escape(run.name)})</small></h1>",
            f'<p class="status">{escape(status_line(run))} · λ_val = {escape(str(cfg.get("lambda_val", "?")))}</p>']
    if best is not None:
        name = "best.safetensors" if (run.path / "best.safetensors").exists() else None
        ckpt = f' · checkpoint <a href="{name}">{name}</a>' if name else ""
        head.append(f'<p class="best-line"><span class="badge">best</span> <a href="#step-{best}">step {best}</a>: '
                    f"reward {num(bv.get('reward'))}, ALIGN-I {num(bv.get('align_i'))}, "
                    f"ALIGN-T {num(bv.get('align_t'))}{ckpt}</p>")
    links = [f'<a href="{f}">{f}</a>' for f in ("config.json", "log.jsonl", "summary.json", "last.pt")
             if (run.path / f).exists()]
    head.append("<p>files: " + " · ".join(links) + "</p>")
    return page(f"{cfg.get('method', 'run')} {subject}: report", head + [
        "<h2>Validation</h2>", f'<div class="charts">{val_charts(run)}\n{val_table(run)}</div>',
        "<h2>Validation grids</h2>", grids_section(run),
        "<h2>Training losses</h2>", loss_charts(run.steps),
        "<h2>Timings</h2>", timings(run.summary),
        "<h2>Settings</h2>", "<details open><summary>config.json</summary>", settings(cfg), "</details>"])


def write_report(run_dir) -> Path:
    """Build run_dir/report.html from the run folder's files (finished or in progress); return its path."""
    run = read_run(run_dir)
    return atomic_write_text(run.path / "report.html", run_page(run))


# -------------------------------------------------------------------------------------------- the comparison page
# compare_dir/report.html for a table of runs (methods × subjects × seeds): the comparison runner
# (tinyrpo/evaluation/comparison.py) writes compare.json and calls write_comparison_report; charts and grids are drawn as on
# a run's page, from the run folders compare.json names.

def read_compare(compare_dir: Path) -> dict:
    if not compare_dir.is_dir():
        raise UserError(f"{compare_dir} is not a folder; {NOT_A_RUN}")
    data = read_json(compare_dir / "compare.json", "the comparison")
    need = ("methods", "metrics", "cells")
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in need):
        raise UserError(f"{compare_dir / 'compare.json'} is not a comparison: it needs the lists {', '.join(need)}")
    return data


def compare_table(data: dict) -> str:
    metrics = [str(m) for m in data["metrics"]]
    rows, classes = [], []
    for r in data.get("table") or []:
        cells = [(f"{r[m]['mean']:.3f} ± {r[m].get('std', 0):.3f} (n={r[m].get('n', '?')})"
                  if isinstance(r.get(m), dict) and isinstance(r[m].get("mean"), (int, float)) else "—")
                 for m in metrics]
        rows.append([escape(str(r.get("method")))] + cells)
        classes.append("")
    for r in data.get("published") or []:
        rows.append([escape(str(r.get("name"))) + " (published)"] + [num(r.get(m), 3) for m in metrics])
        classes.append("published")
    return html_table(["method"] + [escape(m) for m in metrics], rows, classes)


def load_cell_runs(data: dict, compare_dir: Path) -> list[tuple[dict, Run | None]]:
    out = []
    for c in data["cells"]:
        try:
            run = read_run(compare_dir / str(c.get("run", "")))
        except UserError:
            run = None  # not trained yet, or moved: the cell shows it
        out.append((c, run))
    return out


def cells_table(data: dict, cell_runs, compare_dir: Path) -> str:
    metrics = [str(m) for m in data["metrics"]]
    rows = []
    for c, run in cell_runs:
        where = escape(str(c.get("run")))
        if run is not None:
            target = run.path / "report.html"
            where = f'<a href="{link(target if target.exists() else run.path, compare_dir)}">{where}</a>'
        ev = c.get("eval") or {}
        rows.append([escape(str(c.get(k))) for k in ("method", "subject", "seed")]
                    + [num(ev.get(m), 3) for m in metrics]
                    + [str(run.best_step) if run and run.best_step is not None else "—",
                       where if run else where + ' <span class="empty">(missing)</span>'])
    return html_table(["method", "subject", "seed"] + [escape(m) for m in metrics] + ["best step", "run"], rows)


def compare_curves(data: dict, cell_runs) -> str:
    """For each validation quantity a row of charts, one per method, one line per (subject, seed)."""
    per_method = {m: [(c, run) for c, run in cell_runs if c.get("method") == m and run] for m in data["methods"]}
    keys = {k: None for _, run in cell_runs if run for k in val_series(run.vals)}
    order = [k for k in VAL_KEYS if k in keys] + [k for k in keys if k not in VAL_KEYS]
    out = []
    for k in order:
        ys = [y for _, run in cell_runs if run for _, y in val_series(run.vals).get(k, [])]
        charts = []
        for m, items in per_method.items():
            series = [Series(f"{c.get('subject')} seed {c.get('seed')}", val_series(run.vals).get(k, []),
                             markers=True, legend=len(items) <= 10) for c, run in items]
            charts.append(line_chart(series, title=f"{m}: {LABELS.get(k, k)}", y_range=(min(ys), max(ys)),
                                     width=420, height=240))
        out.append(f"<h3>{escape(LABELS.get(k, k))}</h3><div class=\"charts\">" + "\n".join(charts) + "</div>")
    return "\n".join(out) or '<p class="empty">no validation curves yet</p>'


def compare_grids(data: dict, cell_runs) -> str:
    """Per subject and prompt: one row per method, the images of its best validation (first seed's run)."""
    seeds = data.get("seeds") or []
    rank = lambda c: seeds.index(c.get("seed")) if c.get("seed") in seeds else len(seeds)  # noqa: E731
    subjects = data.get("subjects") or list(dict.fromkeys(c.get("subject") for c, _ in cell_runs))
    out = []
    for subject in subjects:
        chosen = {}  # method -> (run, step, cells)
        for m in data["methods"]:
            items = sorted([(c, r) for c, r in cell_runs if c.get("method") == m and c.get("subject") == subject
                            and r and r.grids], key=lambda cr: rank(cr[0]))
            for c, run in items[:1]:
                step = run.best_step if run.best_step in run.grids else max(run.grids)
                if cells := grid_cells_of(run, step):
                    chosen[m] = (run, step, cells)
        if not chosen:
            continue
        prompts = next(iter(chosen.values()))[0].prompts
        cols = min(run.config["val_images_per_prompt"] for run, _, _ in chosen.values())
        figures = []
        for p, prompt in enumerate(prompts):
            rows, labels = [], []
            for m, (run, step, cells) in chosen.items():
                if prompt in run.prompts:
                    q, n = run.prompts.index(prompt), run.config["val_images_per_prompt"]
                    rows += cells[q * n:q * n + cols]
                    labels.append(f"{m} (step {step})")
            im = labelled_grid(rows, labels, cols)
            figures.append(f"<figure><figcaption>{escape(prompt)}</figcaption><img src=\"{data_uri(im)}\" "
                           f"width=\"{im.width}\" height=\"{im.height}\" alt=\"{escape(prompt)}\"></figure>")
        out.append(f"<h3>{escape(str(subject))}</h3><div class=\"grids\">" + "\n".join(figures) + "</div>")
    return "\n".join(out) or '<p class="empty">no validation grids yet</p>'


def comparison_page(data: dict, compare_dir: Path) -> str:
    cell_runs = load_cell_runs(data, compare_dir)
    count = f"{len(data['methods'])} methods × {len(data.get('subjects') or [])} subjects × {len(data.get('seeds') or [])} seeds"
    return page("tinyrpo comparison", [
        f"<h1>Comparison <small>({escape(compare_dir.resolve().name)})</small></h1><p class=\"status\">{count}; "
        "mean ± std over subjects and seeds (n cells), published figures below</p>",
        "<h2>Results</h2>", compare_table(data),
        "<details><summary>every run</summary>", cells_table(data, cell_runs, compare_dir), "</details>",
        "<h2>Validation curves</h2>", compare_curves(data, cell_runs),
        "<h2>Validation images by prompt</h2><p>each method's best validation step (the checkpoint it keeps), "
        "the run of the first seed</p>", compare_grids(data, cell_runs)])


def write_comparison_report(compare_dir) -> Path:
    """Build compare_dir/report.html from compare_dir/compare.json and the run folders it names.

    compare.json (written by the comparison runner):

        {"methods": ["rpo", "dreambooth", ...], "subjects": ["dog", ...], "seeds": [0, 1, ...],
         "metrics": ["dino", "clip_i", "clip_t", ...],
         "cells": [{"method": str, "subject": str, "seed": int,
                    "run": "<run folder, relative to compare_dir>", "eval": {metric: float}}, ...],
         "table": [{"method": str, metric: {"mean": float, "std": float, "n": int}, ...}, ...],
         "published": [{"name": str, metric: float or null, ...}, ...]}

    The page: the table with the published rows under it, every cell with a link to its run's report,
    the validation curves of each method side by side (one line per subject and seed), and for each
    subject and training prompt a grid with one row per method: the images of that method's best
    validation step in its first seed's run. Missing run folders are listed, not fatal.
    """
    compare_dir = Path(compare_dir)
    data = read_compare(compare_dir)
    return atomic_write_text(compare_dir / "report.html", comparison_page(data, compare_dir))
