"""report.html: one page per training run and per comparison of runs, built from their folders alone.

    python -m tinyrpo.report runs/dog           # (re)build runs/dog/report.html, finished or still running
    python -m tinyrpo.report runs/compare       # a comparison folder: the one holding compare.json

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
import argparse
import sys
from pathlib import Path

from tinyrpo.cli import HelpFormatter
from tinyrpo.errors import UserError, run_cli
from tinyrpo.evaluation.pages import NOT_A_RUN, write_comparison_report, write_report


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m tinyrpo.report", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("folders", nargs="+", metavar="FOLDER",
                    help="a run folder (train.py --out) or a comparison folder (holding compare.json)")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    for f in args.folders:
        if not Path(f).exists():
            raise UserError(f"{f} does not exist; {NOT_A_RUN}")
        if (Path(f) / "compare.json").exists():
            path = write_comparison_report(f)
        else:
            path = write_report(f)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
