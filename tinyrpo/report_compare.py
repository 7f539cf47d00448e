"""The comparison page: compare_dir/report.html for a table of runs (methods × subjects × seeds).

The comparison runner writes compare.json and calls `write_comparison_report(compare_dir)`;
`python -m tinyrpo.report COMPARE_DIR` rebuilds the page. Charts and grids are drawn as on a run's page
(tinyrpo/report.py), from the run folders that compare.json names.
"""
from html import escape
from pathlib import Path

from tinyrpo.errors import UserError
from tinyrpo.grids import labelled_grid
from tinyrpo.atomic import atomic_write_text
from tinyrpo.report import (LABELS, NOT_A_RUN, VAL_KEYS, Run, data_uri, grid_cells_of, link,
                            num, page, read_json, read_run, table, val_series)
from tinyrpo.svgplot import Series, line_chart


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
    return table(["method"] + [escape(m) for m in metrics], rows, classes)


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
    return table(["method", "subject", "seed"] + [escape(m) for m in metrics] + ["best step", "run"], rows)


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
